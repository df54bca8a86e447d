//! zdd's agent: config → desired state → tables → maps. The binaries `zdd-agent` and `zdd`
//! are thin layers over this library; the integration tests use it directly too.

pub mod alerts;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod deploy;
pub mod health;
pub mod live;
pub mod maps;
pub mod metrics;
pub mod netlink;
pub mod probe;
pub mod prom;
pub mod server;
pub mod state;
pub mod store;
pub mod tables;
