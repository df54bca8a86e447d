//! What a lab is made of: [`LabSpec`] in, [`Node`]s and [`Backend`]s out.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Result, bail};

use super::{HTTP_PORT, UDP_PORT};

const MAX_BACKENDS: usize = 200;

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// `(name, group)` of each backend, in order: backend `i` gets 10.0.2.(11+i).
    pub backends: Vec<(String, String)>,
    /// The `zdd-lab-server` binary to run on each backend; `None` runs none. Integration tests
    /// fill it with `env!("CARGO_BIN_EXE_zdd-lab-server")` (see [`crate::lab_spec!`]).
    pub server_bin: Option<PathBuf>,
    /// Keep tx checksum offload (and so TSO) on the veths. Off by default: with it, locally sent
    /// TCP/UDP frames carry only a partial checksum that the kernel completes later, which XDP
    /// sees, and which an XDP_TX/XDP_REDIRECT passes on as a wrong checksum (checked here: a SYN
    /// redirected from the edge's eth0 to eth1 was dropped by the backend, TcpInCsumErrors +1).
    /// Without it every frame is MTU-sized with a full checksum, as from a real NIC.
    pub tx_offload: bool,
    /// Also build a return router (see [`LabSpec::with_return_router`]). Off by default.
    pub return_router: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        let b = |n: &str, g: &str| (n.to_string(), g.to_string());
        LabSpec {
            backends: vec![
                b("blue-1", "blue"),
                b("blue-2", "blue"),
                b("green-1", "green"),
                b("green-2", "green"),
            ],
            server_bin: None,
            tx_offload: false,
            return_router: false,
        }
    }
}

impl LabSpec {
    /// The default backends, each running the given `zdd-lab-server`.
    pub fn with_server(bin: impl Into<PathBuf>) -> Self {
        LabSpec {
            server_bin: Some(bin.into()),
            ..Default::default()
        }
    }

    /// Replaces the backends with `(name, group)` pairs.
    pub fn with_backends<N: Into<String>, G: Into<String>>(
        mut self,
        list: impl IntoIterator<Item = (N, G)>,
    ) -> Self {
        self.backends = list
            .into_iter()
            .map(|(n, g)| (n.into(), g.into()))
            .collect();
        self
    }

    /// Adds a "router" namespace on the backends' bridge (10.0.2.254, fd00:2::fe) with a second
    /// link to the client (client eth1 10.0.4.2/fd00:4::2 <-> router eth1 10.0.4.1/fd00:4::1):
    /// a path from the backends back to the client that bypasses the edge host, as the return
    /// path of DSR has on a real network. Nothing uses it until a backend's route to the client
    /// network points there ([`super::Lab::route_clients_via_router`]); requests always go
    /// through the edge.
    pub fn with_return_router(mut self, on: bool) -> Self {
        self.return_router = on;
        self
    }

    pub(super) fn validate(&self) -> Result<()> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
        };
        if self.backends.len() > MAX_BACKENDS {
            bail!("at most {MAX_BACKENDS} backends");
        }
        let mut seen = HashSet::new();
        for (name, group) in &self.backends {
            if !ok(name) || !ok(group) {
                bail!("backend {name:?}/{group:?}: use 1-32 of [A-Za-z0-9._-]");
            }
            // Backend names name namespaces, beside these.
            let router = self.return_router && name == "router";
            if ["client", "edge", "lan"].contains(&name.as_str()) || router || !seen.insert(name) {
                bail!("backend name {name:?} is reserved or repeated");
            }
        }
        Ok(())
    }
}

/// A namespace of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    Client,
    Edge,
    /// The bridge joining the edge host and the backends.
    Lan,
    /// Backend by index in [`LabSpec::backends`].
    Backend(usize),
    /// The return router, in labs built with [`LabSpec::with_return_router`].
    Router,
}

impl Node {
    /// Where the node's namespace is in the lab's list: the router comes after the backends.
    pub(super) fn index(self, backends: usize) -> usize {
        match self {
            Node::Client => 0,
            Node::Edge => 1,
            Node::Lan => 2,
            Node::Backend(i) => 3 + i,
            Node::Router => 3 + backends,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    pub group: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub node: Node,
}

impl Backend {
    pub fn http_v4(&self) -> SocketAddr {
        (self.ipv4, HTTP_PORT).into()
    }
    pub fn http_v6(&self) -> SocketAddr {
        (self.ipv6, HTTP_PORT).into()
    }
    pub fn udp_v4(&self) -> SocketAddr {
        (self.ipv4, UDP_PORT).into()
    }
    pub fn udp_v6(&self) -> SocketAddr {
        (self.ipv6, UDP_PORT).into()
    }
}
