//! zdd's agent: config → desired state → tables → maps. The binaries `zdd-agent` and `zdd`
//! are thin layers over this library; the integration tests use it directly too.

pub mod config;
pub mod daemon;
pub mod maps;
pub mod netlink;
pub mod state;
pub mod tables;
