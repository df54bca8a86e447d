//! Test support for zdd: a lab of network namespaces joined by veth pairs ([`lab`]),
//! the backend server it runs (`zdd-lab-server`), and a minimal HTTP client ([`http`]).

pub mod agent;
pub mod control;
pub mod http;
pub mod lab;
pub mod load;
pub mod observability;
pub mod packet;

pub use agent::{Agent, VIP_V4, VIP_V6};
pub use http::{Response, connect_and_get, connect_from_and_get, http_get};
pub use lab::{Backend, ChildGuard, Lab, LabSpec, Node, preflight, privileged_or_skip};

/// A [`LabSpec`] (default backends) that starts `zdd-lab-server` on every backend.
///
/// Only usable from this package's integration tests and benches: Cargo sets
/// `CARGO_BIN_EXE_zdd-lab-server` for those alone, and `env!` is read where the macro expands.
#[macro_export]
macro_rules! lab_spec {
    () => {
        $crate::lab::LabSpec::with_server(env!("CARGO_BIN_EXE_zdd-lab-server"))
    };
}

/// Returns early from the calling test (with `$ret`, default `()`) when the lab cannot run here;
/// see [`privileged_or_skip`]. The test name is taken from libtest's thread name.
#[macro_export]
macro_rules! require_privileged {
    () => {
        $crate::require_privileged!(())
    };
    ($ret:expr) => {
        if !$crate::lab::privileged_or_skip(&$crate::lab::current_test_name(module_path!())) {
            return $ret;
        }
    };
}
