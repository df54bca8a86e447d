//! A lab of network namespaces for integration tests:
//!
//! ```text
//! client ns            edge ns                      lan ns        backend ns (one each)
//! eth0 10.0.1.2 ---- eth0 10.0.1.1                  br0
//!                    eth1 10.0.2.1 ------------ to-edge
//!                                                   to-b0 ------- eth0 10.0.2.11
//!                                                   to-b1 ------- eth0 10.0.2.12 ...
//! ```
//! IPv6 alike: fd00:1::/64 on the client side, fd00:2::/64 on the backend side (backend i has
//! fd00:2::(11+i), written in hex). The edge routes; each backend runs `zdd-lab-server`.
//!
//! Optionally ([`LabSpec::with_return_router`]) a return path that bypasses the edge:
//! ```text
//! client eth1 10.0.4.2 ---- eth1 10.0.4.1  router  eth0 10.0.2.254 ---- to-router (on br0)
//! ```
//! (fd00:4::2, fd00:4::1, fd00:2::fe), used by the backends that
//! [`Lab::route_clients_via_router`] points there.
//! Everything is removed when the [`Lab`] is dropped, including during a panic.

mod bpffs;
mod netns;
mod preflight;
mod servers;
mod spawn;
mod spec;
pub mod tools;
mod topology;

use std::ffi::OsStr;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow, bail};

pub use bpffs::{ensure_bpffs, ensure_bpffs_and_say, on_bpffs};
pub use netns::list as list_netns;
pub use preflight::{current_test_name, preflight, privileged_or_skip};
pub use spawn::{ChildGuard, STOP_GRACE};
pub use spec::{Backend, LabSpec, Node};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
pub const EDGE_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
pub const EDGE_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
pub const EDGE_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
pub const EDGE_BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
/// The edge host's interface towards the client (and the XDP attach point for VIP traffic).
pub const EDGE_CLIENT_IFACE: &str = "eth0";
/// The edge host's interface towards the backends' bridge.
pub const EDGE_BACKEND_IFACE: &str = "eth1";
/// The return router's address on the backends' bridge (labs with a return router).
pub const ROUTER_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 254);
pub const ROUTER_BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0xfe);
/// The two ends of the router's link to the client (the client's `eth1`, the router's `eth1`).
pub const ROUTER_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 4, 1);
pub const ROUTER_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 4, 0, 0, 0, 0, 0, 1);
pub const CLIENT_ROUTER_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 4, 2);
pub const CLIENT_ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 4, 0, 0, 0, 0, 0, 2);
/// The client network (every client source address is in it): what a backend routes via the
/// return router when told to.
pub const CLIENT_NET_V4: &str = "10.0.1.0/24";
pub const CLIENT_NET_V6: &str = "fd00:1::/64";
/// Where every backend's server answers HTTP (IPv4 and IPv6).
pub const HTTP_PORT: u16 = 8080;
/// Where every backend's server echoes UDP (IPv4 and IPv6).
pub const UDP_PORT: u16 = 9000;

/// A built lab. Dropping it stops its servers and deletes its namespaces (which deletes their
/// links).
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    /// Namespace names, indexed by [`Node::index`].
    ns: Vec<String>,
    backends: Vec<Backend>,
    spec: LabSpec,
    /// One slot per backend; `None` when no server runs there.
    servers: Mutex<Vec<Option<ChildGuard>>>,
    log_dir: PathBuf,
}

impl Lab {
    /// Builds the lab and waits until every backend's server accepts connections. On error,
    /// whatever was already made is removed.
    pub fn new(spec: LabSpec) -> Result<Lab> {
        preflight().map_err(|e| anyhow!("lab preflight: {e}"))?;
        spec.validate()?;
        netns::reap_stale();
        let prefix = netns::unique_prefix();
        let mut ns: Vec<String> = ["client", "edge", "lan"]
            .iter()
            .map(|n| format!("{prefix}-{n}"))
            .collect();
        let mut backends = Vec::new();
        for (i, (name, group)) in spec.backends.iter().enumerate() {
            ns.push(format!("{prefix}-{name}"));
            let host = 11 + i as u16;
            backends.push(Backend {
                name: name.clone(),
                group: group.clone(),
                ipv4: Ipv4Addr::new(10, 0, 2, host as u8),
                // fd00:2::11 for 10.0.2.11: the same digits, read as hex.
                ipv6: Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, hex_digits(host)),
                node: Node::Backend(i),
            });
        }
        if spec.return_router {
            // After the backends: see `Node::index`.
            ns.push(format!("{prefix}-router"));
        }
        // The Lab exists before anything is made: its Drop removes whatever part was made.
        let lab = Lab {
            log_dir: std::env::temp_dir().join(format!("{prefix}-logs")),
            prefix,
            ns,
            servers: Mutex::new(backends.iter().map(|_| None).collect()),
            backends,
            spec,
        };
        fs::create_dir_all(&lab.log_dir).context("creating the lab's log folder")?;
        topology::build(&lab).with_context(|| format!("building lab {}", lab.prefix))?;
        lab.start_all_servers()
            .with_context(|| format!("starting servers of lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn start_all_servers(&self) -> Result<()> {
        let Some(bin) = &self.spec.server_bin else {
            return Ok(());
        };
        let mut servers = self.lock_servers();
        // Start all, then wait for each: they come up in parallel.
        for (i, b) in self.backends.iter().enumerate() {
            servers[i] = Some(servers::start(
                bin,
                self.ns_name(b.node),
                b,
                &self.log_dir,
                &[],
            )?);
        }
        for (i, b) in self.backends.iter().enumerate() {
            let server = servers[i].as_mut().expect("just started");
            let log = servers::log_path(&self.log_dir, b);
            servers::wait_ready(self.ns_name(b.node), b, server, &log)?;
        }
        Ok(())
    }

    fn lock_servers(&self) -> std::sync::MutexGuard<'_, Vec<Option<ChildGuard>>> {
        // A test that panicked while holding the lock leaves the data intact.
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The names' common prefix, e.g. `zl1f2ax0r9c3e` (namespaces are `<prefix>-<node>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Panics for [`Node::Router`] in a lab without one (a test's own mistake).
    pub fn ns_name(&self, node: Node) -> &str {
        if node == Node::Router && !self.spec.return_router {
            panic!("this lab has no return router (LabSpec::with_return_router)");
        }
        &self.ns[node.index(self.backends.len())]
    }

    /// Whether the lab was built with a return router.
    pub fn has_return_router(&self) -> bool {
        self.spec.return_router
    }

    /// Every namespace of the lab.
    pub fn ns_names(&self) -> &[String] {
        &self.ns
    }

    pub fn nodes(&self) -> impl Iterator<Item = Node> + use<> {
        [Node::Client, Node::Edge, Node::Lan]
            .into_iter()
            .chain((0..self.backends.len()).map(Node::Backend))
            .chain(self.spec.return_router.then_some(Node::Router))
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The backend with this name. Panics if there is none (a test's own mistake).
    pub fn backend(&self, name: &str) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend named {name:?} in this lab"))
    }

    pub fn client_v4(&self) -> Ipv4Addr {
        CLIENT_V4
    }

    pub fn client_v6(&self) -> Ipv6Addr {
        CLIENT_V6
    }

    pub fn edge_client_iface(&self) -> &'static str {
        EDGE_CLIENT_IFACE
    }

    pub fn edge_backend_iface(&self) -> &'static str {
        EDGE_BACKEND_IFACE
    }

    /// Where the backends' servers write their stderr (removed with the lab; printed if the lab
    /// is dropped during a panic).
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Runs `cmd` inside the node's namespace. The guard stops and reaps it when dropped.
    pub fn spawn(&self, node: Node, cmd: Command) -> Result<ChildGuard> {
        spawn::spawn_in(self.ns_name(node), cmd)
    }

    /// Runs `f` on a fresh thread inside the node's namespace (so plain std sockets act from
    /// there) and returns its result; a panic in `f` is passed on. Panics if the namespace cannot
    /// be entered.
    pub fn in_ns<T: Send>(&self, node: Node, f: impl FnOnce() -> T + Send) -> T {
        let ns = self.ns_name(node);
        spawn::run_in(ns, f).unwrap_or_else(|e| panic!("entering netns {ns}: {e}"))
    }

    /// Runs `args[0]` with the rest as arguments inside the node's namespace; a nonzero exit is
    /// an error that carries stdout and stderr.
    pub fn exec<S: AsRef<OsStr>>(&self, node: Node, args: &[S]) -> Result<Output> {
        let (prog, rest) = args.split_first().context("exec: empty command")?;
        let mut cmd = Command::new(prog);
        cmd.args(rest);
        spawn::output_in(self.ns_name(node), cmd)
    }

    /// `ip ARGS` in the node's namespace; returns stdout.
    pub fn ip(&self, node: Node, args: &[&str]) -> Result<String> {
        let mut all = vec!["ip"];
        all.extend_from_slice(args);
        let out = self.exec(node, &all)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds `ip` to the backend's `lo` (for DSR), and makes the backend neither answer ARP for
    /// it nor use it as a source in ARP (arp_ignore=1, arp_announce=2), so that the VIP stays
    /// the edge host's on the wire.
    pub fn add_vip_on_backend_lo(&self, backend: &str, ip: IpAddr) -> Result<()> {
        let node = self.backend(backend).node;
        self.in_ns(node, || -> Result<()> {
            for conf in ["all", "eth0"] {
                topology::write_sysctl(&format!("net/ipv4/conf/{conf}/arp_ignore"), "1")?;
                topology::write_sysctl(&format!("net/ipv4/conf/{conf}/arp_announce"), "2")?;
            }
            Ok(())
        })?;
        let addr = match ip {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        };
        let mut args = vec!["addr", "add", &addr, "dev", "lo"];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        self.ip(node, &args)?;
        Ok(())
    }

    /// Makes `addr` the client's IPv4 source for new connections: adds it to the client's eth0
    /// (as a /24 beside [`CLIENT_V4`], once) and replaces the default route with one that names
    /// it as `src`. For tools that cannot bind (wrk): a fresh source per run keeps NAT runs clear
    /// of the TIME_WAIT sockets earlier runs left on the backends.
    pub fn set_client_source_v4(&self, addr: Ipv4Addr) -> Result<()> {
        let have = self.ip(Node::Client, &["-4", "-o", "addr", "show", "dev", "eth0"])?;
        let cidr = format!("{addr}/24");
        if !have.split_whitespace().any(|w| w == cidr) {
            self.ip(Node::Client, &["addr", "add", &cidr, "dev", "eth0"])?;
        }
        let via = EDGE_CLIENT_V4.to_string();
        let src = addr.to_string();
        self.ip(
            Node::Client,
            &["route", "replace", "default", "via", &via, "src", &src],
        )?;
        Ok(())
    }

    /// Points every backend's route to the client network ([`CLIENT_NET_V4`], [`CLIENT_NET_V6`])
    /// at the return router (`true`), or back at the edge host (`false`: the route is removed,
    /// so the default route via the edge applies again, as when the lab was built). Replies then
    /// reach the client without passing the edge: right for DSR, wrong for anything whose
    /// replies the edge must translate back (NAT). Errors in a lab without a return router.
    pub fn route_clients_via_router(&self, via_router: bool) -> Result<()> {
        for b in &self.backends {
            self.route_backend_clients_via_router(&b.name, via_router)?;
        }
        Ok(())
    }

    /// [`Lab::route_clients_via_router`] for one backend.
    pub fn route_backend_clients_via_router(&self, backend: &str, via_router: bool) -> Result<()> {
        if !self.spec.return_router {
            bail!("this lab has no return router (LabSpec::with_return_router)");
        }
        let node = self.backend(backend).node;
        let mut lines = Vec::new();
        for (v, net, via) in [
            ("-4", CLIENT_NET_V4, ROUTER_BACKEND_V4.to_string()),
            ("-6", CLIENT_NET_V6, ROUTER_BACKEND_V6.to_string()),
        ] {
            if via_router {
                // `ip -batch` takes no options per line: the prefix says the family.
                lines.push(format!("route replace {net} via {via} dev eth0"));
            } else if !self
                .ip(node, &[v, "route", "show", "exact", net])?
                .trim()
                .is_empty()
            {
                lines.push(format!("route del {net}"));
            }
        }
        if lines.is_empty() {
            return Ok(());
        }
        netns::ip_batch(&["-n", self.ns_name(node)], &lines)
            .with_context(|| format!("routing {backend}'s replies to the client"))
    }

    /// Whether the backend's route to the client network points at the return router.
    pub fn clients_routed_via_router(&self, backend: &str) -> Result<bool> {
        if !self.spec.return_router {
            return Ok(false);
        }
        let node = self.backend(backend).node;
        let via = ROUTER_BACKEND_V4.to_string();
        let out = self.ip(node, &["-4", "route", "show", "exact", CLIENT_NET_V4])?;
        Ok(out.split_whitespace().any(|w| w == via))
    }

    /// A permanent neighbour entry on `node`: `ip` is at `mac` on `dev` (no ARP or ND needed,
    /// so packet fixtures and benchmarks know the next hop's MAC in advance).
    pub fn set_neighbour(&self, node: Node, ip: IpAddr, mac: [u8; 6], dev: &str) -> Result<()> {
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        let ip = ip.to_string();
        self.ip(
            node,
            &[
                "neigh",
                "replace",
                &ip,
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ],
        )?;
        Ok(())
    }

    /// The interface's MAC address.
    pub fn mac(&self, node: Node, iface: &str) -> Result<[u8; 6]> {
        let out = self.ip(node, &["-o", "link", "show", "dev", iface])?;
        let text = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .with_context(|| format!("no link/ether in: {out}"))?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 6 {
            bail!("bad MAC {text:?}");
        }
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {text:?}"))?;
        }
        Ok(mac)
    }

    /// The interface's index inside its namespace.
    pub fn ifindex(&self, node: Node, iface: &str) -> Result<u32> {
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: valid C string.
        let idx = self.in_ns(node, || unsafe { libc::if_nametoindex(name.as_ptr()) });
        if idx == 0 {
            bail!("no interface {iface} in {}", self.ns_name(node));
        }
        Ok(idx)
    }

    /// Kills the backend's server with SIGKILL (a crash: its connections are lost).
    pub fn kill_server(&self, backend: &str) -> Result<()> {
        let i = self.backend_index(backend);
        if let Some(mut s) = self.lock_servers()[i].take() {
            s.kill()?;
        }
        Ok(())
    }

    /// Starts the backend's server again (after [`Lab::kill_server`]) and waits until it serves.
    pub fn start_server(&self, backend: &str) -> Result<()> {
        self.start_server_with(backend, &[])
    }

    /// As [`Lab::start_server`], with more arguments for zdd-lab-server (`--version v2`).
    pub fn start_server_with(&self, backend: &str, extra: &[&str]) -> Result<()> {
        let bin = self
            .spec
            .server_bin
            .as_ref()
            .context("this lab has no server_bin")?;
        let i = self.backend_index(backend);
        let b = &self.backends[i];
        let mut servers = self.lock_servers();
        if let Some(s) = servers[i].as_mut()
            && s.try_wait()?.is_none()
        {
            bail!("the server of {backend} is running");
        }
        servers[i] = Some(servers::start(
            bin,
            self.ns_name(b.node),
            b,
            &self.log_dir,
            extra,
        )?);
        let log = servers::log_path(&self.log_dir, b);
        servers::wait_ready(self.ns_name(b.node), b, servers[i].as_mut().unwrap(), &log)
    }

    /// Tells the backend's server how to misbehave, at its next request (the lines of
    /// zdd-lab-server's `--control` file): `healthz=500` (`/healthz` answers 500),
    /// `healthz_delay_ms=300`, `reset=1` (every other request is answered with a TCP reset),
    /// `status=500` (every other request is answered 500), `close=1` (every answer closes its
    /// connection: a graceful shutdown's first half). An empty text: behave.
    pub fn set_server_control(&self, backend: &str, text: &str) -> Result<()> {
        let b = self.backend(backend);
        let path = servers::control_path(&self.log_dir, b);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn backend_index(&self, name: &str) -> usize {
        match self.backend(name).node {
            Node::Backend(i) => i,
            _ => unreachable!("backends are Node::Backend"),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut servers = std::mem::take(self.servers.get_mut().unwrap_or_else(|e| e.into_inner()));
        // Signal all first so that they exit in parallel; each guard then reaps its own.
        for s in servers.iter_mut().flatten() {
            let _ = s.signal(libc::SIGTERM);
        }
        drop(servers);
        if std::thread::panicking() {
            for b in &self.backends {
                let log = servers::log_path(&self.log_dir, b);
                if fs::metadata(&log).is_ok_and(|m| m.len() > 0) {
                    eprintln!("zdd lab {}: {}", self.prefix, servers::log_tail(&log));
                }
            }
        }
        for name in &self.ns {
            if let Err(e) = netns::delete(name) {
                eprintln!("zdd lab: deleting netns {name}: {e}");
            }
        }
        let _ = fs::remove_dir_all(&self.log_dir);
    }
}

/// The number whose hex digits are `n`'s decimal digits (11 -> 0x11).
fn hex_digits(n: u16) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex digits")
}

/// Moves the calling thread into namespace `ns` (by name), for long-lived worker threads;
/// see [`Lab::in_ns`] for one-off work.
pub fn enter_netns(ns: &str) -> std::io::Result<()> {
    netns::enter(&netns::open(ns)?)
}

#[cfg(test)]
mod tests;
