//! Packet fixtures, Katran-style: each named case sends frames through the real XDP program
//! with `BPF_PROG_TEST_RUN` and checks, for every frame, the verdict, the output frame byte for
//! byte (expected frames are built independently by `zdd_tests::packet`, checksums computed in
//! full), the exact change of every global counter, and that the output's checksums verify
//! whenever the input's did.
//!
//! The program runs in the edge namespace of a lab without backends: `bpf_fib_lookup` resolves
//! next hops from that namespace's routes and from permanent neighbour entries this test adds,
//! so every expected MAC is known. Backends are addresses on the edge's eth1 subnet that exist
//! only as neighbour entries; nothing is ever sent.
//!
//! All cases run in one test (they share one loaded program and one lab, in a fixed order);
//! each case is reported by name, and the test fails listing every failed case.

use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use aya::maps::HashMap;
use zdd_common::{FlowEntry, FlowKey, PassiveCounters, Stat, flow_flags, map_names};
use zdd_tests::packet::*;
use zdd_tests::{Lab, LabSpec, Node, require_privileged};

type R = Result<(), String>;

const CLIENT_MAC: Mac = [0x02, 0xc1, 0x00, 0x00, 0x00, 0x02];

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The MAC this test gives the neighbour entry of `ip` (unique per address).
fn neigh_mac(ip: IpAddr) -> Mac {
    let (fam, o): (u8, Vec<u8>) = match ip {
        IpAddr::V4(a) => (4, a.octets().to_vec()),
        IpAddr::V6(a) => (6, a.octets().to_vec()),
    };
    let n = o.len();
    [0x02, 0x4e, fam, o[n - 3], o[n - 2], o[n - 1]]
}

// Addresses of the fixture services (see `config`).
const WEB4: &str = "10.0.100.1:80";
const WEB4_BLUE: &str = "10.0.2.11:8080";
const GREEN4: &str = "10.0.100.2:80";
const GREEN4_GREEN: &str = "10.0.2.22:8080";
const DNS4: &str = "10.0.100.1:53";
const DNS4_BE: &str = "10.0.2.13:5353";
const WEB6: &str = "[fd00:100::1]:80";
const WEB6_BE: &str = "[fd00:2::11]:8080";
const DNS6: &str = "[fd00:100::1]:53";
const DNS6_BE: &str = "[fd00:2::13]:5353";
const DSR4: &str = "10.0.100.3:80";
const DSR4_BE: &str = "10.0.2.31:80";
const DSR4U: &str = "10.0.100.3:53";
const DSR4U_BE: &str = "10.0.2.32:53";
const DSR6: &str = "[fd00:100::3]:80";
const DSR6_BE: &str = "[fd00:2::31]:80";
const AFF4: &str = "10.0.100.4:80";
const PIN4: &str = "10.0.100.5:80";
const PIN6: &str = "[fd00:100::5]:80";
const ZERO4: &str = "10.0.100.6:80";
const RM4: &str = "10.0.100.7:80";
const NN4: &str = "10.0.100.8:80";
const NN4_BE: &str = "10.0.2.81:8080";
const NN6: &str = "[fd00:100::8]:80";
const NN6_BE: &str = "[fd00:2::81]:8080";
const RN4: &str = "10.0.100.9:80";
const RN4_BE: &str = "10.0.2.91:8080";
const NOROUTE4: &str = "10.0.100.10:80";
const DSRNN4: &str = "10.0.100.11:80";
// Backends behind a route with a smaller MTU (`SMALL_MTU`, locked): frames too big for it.
const MTU4: &str = "10.0.100.12:80";
const MTU4_BE: &str = "10.0.3.11:8080";
const MTU4U: &str = "10.0.100.12:53";
const MTU4U_BE: &str = "10.0.3.12:5353";
const MTU6: &str = "[fd00:100::12]:80";
const MTU6_BE: &str = "[fd00:3::11]:8080";
const MTUDSR4: &str = "10.0.100.13:80";
const MTUDSR4_BE: &str = "10.0.3.31:80";
/// The MTU of the routes to the `MTU*` backends and to the `CLIENT*_SMALL` clients.
const SMALL_MTU: u32 = 1280;

const CLIENT4: &str = "10.0.1.2";
const CLIENT4_PINNED: &str = "10.0.1.200";
const CLIENT4_NO_NEIGH: &str = "10.0.1.77";
const CLIENT6: &str = "fd00:1::2";
const CLIENT6_PINNED: &str = "fd00:1::1:0:0:2";
/// A client on the backends' side (eth1): its flows leave by the interface they came in.
const CLIENT4_HAIRPIN: &str = "10.0.2.200";
/// Clients behind a route with the smaller MTU (for replies too big for it).
const CLIENT4_SMALL: &str = "10.0.4.2";
const CLIENT6_SMALL: &str = "fd00:4::2";

/// (service, vip, protocol, forwarding, affinity, split, backends (name, addr, group, weight), pins)
type Svc = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str, &'static str, u32)>,
    Vec<(&'static str, &'static str)>,
);

fn services() -> Vec<Svc> {
    let one = |n, a| vec![(n, a, "blue", 100)];
    vec![
        (
            "web4",
            WEB4,
            "tcp",
            "nat",
            "flow",
            "blue = 100, green = 0",
            vec![
                ("web4-blue", WEB4_BLUE, "blue", 100),
                ("web4-green", "10.0.2.21:8080", "green", 100),
            ],
            vec![],
        ),
        (
            "green4",
            GREEN4,
            "tcp",
            "nat",
            "flow",
            "blue = 0, green = 100",
            vec![
                ("green4-blue", "10.0.2.12:8080", "blue", 100),
                ("green4-green", GREEN4_GREEN, "green", 100),
            ],
            vec![],
        ),
        (
            "dns4",
            DNS4,
            "udp",
            "nat",
            "flow",
            "blue = 100",
            one("dns4-1", DNS4_BE),
            vec![],
        ),
        (
            "web6",
            WEB6,
            "tcp",
            "nat",
            "flow",
            "blue = 100",
            one("web6-1", WEB6_BE),
            vec![],
        ),
        (
            "dns6",
            DNS6,
            "udp",
            "nat",
            "flow",
            "blue = 100",
            one("dns6-1", DNS6_BE),
            vec![],
        ),
        (
            "dsr4",
            DSR4,
            "tcp",
            "dsr",
            "flow",
            "blue = 100",
            one("dsr4-1", DSR4_BE),
            vec![],
        ),
        (
            "dsr4u",
            DSR4U,
            "udp",
            "dsr",
            "flow",
            "blue = 100",
            one("dsr4u-1", DSR4U_BE),
            vec![],
        ),
        (
            "dsr6",
            DSR6,
            "tcp",
            "dsr",
            "flow",
            "blue = 100",
            one("dsr6-1", DSR6_BE),
            vec![],
        ),
        (
            "aff4",
            AFF4,
            "tcp",
            "nat",
            "client",
            "blue = 50, green = 50",
            vec![
                ("aff-b1", "10.0.2.41:8080", "blue", 100),
                ("aff-b2", "10.0.2.42:8080", "blue", 100),
                ("aff-g1", "10.0.2.43:8080", "green", 100),
                ("aff-g2", "10.0.2.44:8080", "green", 100),
            ],
            vec![],
        ),
        (
            "pin4",
            PIN4,
            "tcp",
            "nat",
            "flow",
            "blue = 100, green = 0",
            vec![
                ("pin4-blue", "10.0.2.51:8080", "blue", 100),
                ("pin4-green", "10.0.2.52:8080", "green", 100),
            ],
            vec![("10.0.1.128/25", "green")],
        ),
        (
            "pin6",
            PIN6,
            "tcp",
            "nat",
            "flow",
            "blue = 100, green = 0",
            vec![
                ("pin6-blue", "[fd00:2::51]:8080", "blue", 100),
                ("pin6-green", "[fd00:2::52]:8080", "green", 100),
            ],
            vec![("fd00:1:0:0:1::/80", "green")],
        ),
        (
            "zero4",
            ZERO4,
            "tcp",
            "nat",
            "flow",
            "blue = 100, green = 0",
            vec![
                ("zero-blue", "10.0.2.61:8080", "blue", 100),
                ("zero-green", "10.0.2.62:8080", "green", 0),
            ],
            vec![],
        ),
        (
            "rm4",
            RM4,
            "tcp",
            "nat",
            "flow",
            "blue = 100",
            vec![
                ("rm-1", "10.0.2.71:8080", "blue", 100),
                ("rm-2", "10.0.2.72:8080", "blue", 100),
            ],
            vec![],
        ),
        (
            "nn4",
            NN4,
            "tcp",
            "nat",
            "flow",
            "blue = 100",
            one("nn4-1", NN4_BE),
            vec![],
        ),
        (
            "nn6",
            NN6,
            "tcp",
            "nat",
            "flow",
            "blue = 100",
            one("nn6-1", NN6_BE),
            vec![],
        ),
        (
            "rn4",
            RN4,
            "tcp",
            "nat",
            "flow",
            "blue = 100",
            one("rn4-1", RN4_BE),
            vec![],
        ),
        (
            "dsrnn4",
            DSRNN4,
            "tcp",
            "dsr",
            "flow",
            "blue = 100",
            one("dsrnn4-1", "10.0.2.82:80"),
            vec![],
        ),
        (
            "noroute4",
            NOROUTE4,
            "tcp",
            "nat",
            "flow",
            "blue = 100",
            one("noroute4-1", "192.0.2.1:8080"),
            vec![],
        ),
        (
            "mtu4",
            MTU4,
            "tcp",
            "nat",
            "flow",
            "blue = 100",
            one("mtu4-1", MTU4_BE),
            vec![],
        ),
        (
            "mtu4u",
            MTU4U,
            "udp",
            "nat",
            "flow",
            "blue = 100",
            one("mtu4u-1", MTU4U_BE),
            vec![],
        ),
        (
            "mtu6",
            MTU6,
            "tcp",
            "nat",
            "flow",
            "blue = 100",
            one("mtu6-1", MTU6_BE),
            vec![],
        ),
        (
            "mtudsr4",
            MTUDSR4,
            "tcp",
            "dsr",
            "flow",
            "blue = 100",
            one("mtudsr4-1", MTUDSR4_BE),
            vec![],
        ),
    ]
}

/// The config: every service, without the backend named `removed` if any.
fn config(removed: Option<&str>) -> String {
    let mut s = String::from("[agent]\ninterfaces = [\"eth0\", \"eth1\"]\n");
    for (name, vip, proto, fwd, aff, split, backends, pins) in services() {
        s += &format!(
            "\n[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"{proto}\"\n\
             forwarding = \"{fwd}\"\naffinity = \"{aff}\"\nsplit = {{ {split} }}\n"
        );
        for (bn, addr, group, weight) in backends {
            if Some(bn) == removed {
                continue;
            }
            s += &format!(
                "\n[[services.backends]]\nname = \"{bn}\"\naddr = \"{addr}\"\ngroup = \"{group}\"\nweight = {weight}\n"
            );
        }
        for (src, group) in pins {
            s += &format!("\n[[services.pins]]\nsource = \"{src}\"\ngroup = \"{group}\"\n");
        }
    }
    s
}

/// Backend address of every backend name, for reading flow entries back.
fn backend_addr(name: &str) -> SocketAddr {
    services()
        .into_iter()
        .flat_map(|s| s.6)
        .find(|b| b.0 == name)
        .map(|b| sa(b.1))
        .unwrap_or_else(|| panic!("no backend {name}"))
}

struct Fx<'a> {
    lab: &'a Lab,
    t: TestRunner,
    /// Edge ifindex and MAC of eth0 (clients) and eth1 (backends).
    if_c: u32,
    if_b: u32,
    mac_c: Mac,
    mac_b: Mac,
    next_port: u16,
    results: Vec<(String, R)>,
}

const NEW_FWD: &[(Stat, u64)] = &[(Stat::NewFlow, 1), (Stat::Forward, 1)];
const HIT_FWD: &[(Stat, u64)] = &[(Stat::Forward, 1)];
const PASS: &[(Stat, u64)] = &[(Stat::Pass, 1)];
const MALFORMED: &[(Stat, u64)] = &[(Stat::Malformed, 1)];
const FRAGMENT: &[(Stat, u64)] = &[(Stat::Fragment, 1), (Stat::Drop, 1)];
const REVERSE: &[(Stat, u64)] = &[(Stat::Reverse, 1)];

impl<'a> Fx<'a> {
    fn port(&mut self) -> u16 {
        self.next_port += 1;
        self.next_port
    }

    fn case(&mut self, name: &str, f: impl FnOnce(&mut Fx<'a>) -> R) {
        let r = catch_unwind(AssertUnwindSafe(|| f(self))).unwrap_or_else(|p| {
            Err(format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            ))
        });
        self.results.push((name.to_string(), r));
    }

    /// A frame from a client (MACs: client → edge eth0).
    fn client_frame(&self, proto: u8, src: SocketAddr, dst: SocketAddr) -> FrameSpec {
        let s = if proto == PROTO_TCP {
            FrameSpec::tcp(src, dst)
        } else {
            FrameSpec::udp(src, dst)
        };
        s.macs(CLIENT_MAC, self.mac_c)
    }

    /// A frame from a backend (MACs: backend → edge eth1).
    fn backend_frame(&self, proto: u8, src: SocketAddr, dst: SocketAddr) -> FrameSpec {
        let s = if proto == PROTO_TCP {
            FrameSpec::tcp(src, dst).flags(TCP_SYN | TCP_ACK)
        } else {
            FrameSpec::udp(src, dst).payload(b"answer")
        };
        s.macs(neigh_mac(src.ip()), self.mac_b)
    }

    /// What nat makes of `spec` towards `backend`: destination, TTL − 1, MACs of eth1 and the
    /// backend's neighbour entry; checksums computed in full by the builder.
    fn nat_out(&self, spec: &FrameSpec, backend: SocketAddr) -> Vec<u8> {
        spec.clone()
            .dst(backend)
            .ttl(spec.ttl - 1)
            .macs(self.mac_b, neigh_mac(backend.ip()))
            .build()
    }

    /// What nat makes of a backend's reply: source = VIP, TTL − 1, MACs towards the client.
    fn reply_out(&self, spec: &FrameSpec, vip: SocketAddr) -> Vec<u8> {
        spec.clone()
            .src(vip)
            .ttl(spec.ttl - 1)
            .macs(self.mac_c, neigh_mac(spec.dst))
            .build()
    }

    /// Runs one frame; checks the verdict, that every counter changed by exactly `deltas`
    /// (all others unchanged), and that the output verifies if the input did. Returns the
    /// output frame.
    fn run(
        &mut self,
        input: &[u8],
        ingress: u32,
        verdict: u32,
        deltas: &[(Stat, u64)],
    ) -> Result<Vec<u8>, String> {
        let before = self.t.stats();
        let (v, out) = self.t.run(input, ingress).map_err(|e| format!("{e:#}"))?;
        let after = self.t.stats();
        let mut errs = Vec::new();
        if v != verdict {
            errs.push(format!(
                "verdict {} expected {}",
                verdict_name(v),
                verdict_name(verdict)
            ));
        }
        for (i, s) in Stat::ALL.iter().enumerate() {
            let want = deltas
                .iter()
                .find(|(d, _)| d == s)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            let got = after[i].wrapping_sub(before[i]);
            if got != want {
                errs.push(format!("counter {} +{got}, expected +{want}", s.name()));
            }
        }
        if verify(input).is_ok()
            && let Err(e) = verify(&out)
        {
            errs.push(format!("output frame does not verify: {e}"));
        }
        if errs.is_empty() {
            Ok(out)
        } else {
            Err(format!(
                "{}\n  in  {}\n  out {}",
                errs.join("; "),
                hex(input),
                hex(&out)
            ))
        }
    }

    /// `run`, then the output must equal `expected` byte for byte.
    fn expect(
        &mut self,
        input: &[u8],
        ingress: u32,
        verdict: u32,
        expected: &[u8],
        deltas: &[(Stat, u64)],
    ) -> R {
        verify(expected)
            .map(drop)
            .or_else(|e| {
                if verify(input).is_ok() {
                    Err(e)
                } else {
                    Ok(())
                }
            })
            .map_err(|e| format!("fixture bug: expected frame does not verify: {e}"))?;
        let out = self.run(input, ingress, verdict, deltas)?;
        same(expected, &out)
    }

    /// Not for zdd: XDP_PASS, frame untouched, `deltas` counted.
    fn untouched(&mut self, input: &[u8], ingress: u32, verdict: u32, deltas: &[(Stat, u64)]) -> R {
        self.expect(input, ingress, verdict, input, deltas)
    }

    fn flow(&mut self, src: SocketAddr, dst: SocketAddr, proto: u8) -> Option<FlowEntry> {
        let m = self.t.dp.ebpf_mut().map(map_names::FLOWS)?;
        let h: HashMap<_, FlowKey, FlowEntry> = HashMap::try_from(m).ok()?;
        h.get(&flow_key(src, dst, proto), 0).ok()
    }

    /// The backend (service's name for it) a flow is pinned to.
    fn flow_backend(
        &mut self,
        svc: &str,
        src: SocketAddr,
        dst: SocketAddr,
        proto: u8,
    ) -> Result<String, String> {
        let e = self
            .flow(src, dst, proto)
            .ok_or_else(|| format!("no flow entry for {src} -> {dst}"))?;
        let names: Vec<&str> = services()
            .into_iter()
            .filter(|s| s.0 == svc)
            .flat_map(|s| s.6.into_iter().map(|b| b.0))
            .collect();
        names
            .into_iter()
            .find(|n| self.t.dp.applied().backend_id(svc, n) == Some(e.backend))
            .map(str::to_string)
            .ok_or_else(|| format!("flow entry names backend id {} not in {svc}", e.backend))
    }

    fn neigh(&self, ip: &str, dev: &str) {
        let ip = ip.parse().unwrap();
        self.lab
            .set_neighbour(Node::Edge, ip, neigh_mac(ip), dev)
            .unwrap();
    }
}

fn same(expected: &[u8], got: &[u8]) -> R {
    if expected == got {
        Ok(())
    } else {
        Err(format!("output frame differs: {}", diff(expected, got)))
    }
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> R {
    if cond { Ok(()) } else { Err(msg()) }
}

#[test]
fn fixtures() {
    require_privileged!();
    let lab = Lab::new(LabSpec::default().with_backends(Vec::<(String, String)>::new()))
        .expect("building the lab");
    let started = Instant::now();
    let results = lab.in_ns(Node::Edge, || run_all(&lab));
    let failed: Vec<&(String, R)> = results.iter().filter(|(_, r)| r.is_err()).collect();
    println!(
        "{} fixture cases in {:.1?}: {} passed, {} failed",
        results.len(),
        started.elapsed(),
        results.len() - failed.len(),
        failed.len()
    );
    for (name, r) in &results {
        println!("  {} {name}", if r.is_ok() { "ok  " } else { "FAIL" });
    }
    for (name, r) in &failed {
        println!("\nFAILED {name}: {}", r.as_ref().unwrap_err());
    }
    // Exact: a case that silently stopped being registered is a failure too.
    assert_eq!(results.len(), FIXTURE_CASES, "fixture cases run");
    assert!(
        failed.is_empty(),
        "{} of {} fixture cases failed: {}",
        failed.len(),
        results.len(),
        failed
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// How many cases `run_all` registers.
const FIXTURE_CASES: usize = 163;

fn run_all(lab: &Lab) -> Vec<(String, R)> {
    let mut t = TestRunner::load("fx", 65_536).expect("loading");
    t.apply_toml(&config(None))
        .expect("applying the fixture config");
    let mut fx = Fx {
        lab,
        t,
        if_c: lab.ifindex(Node::Edge, "eth0").unwrap(),
        if_b: lab.ifindex(Node::Edge, "eth1").unwrap(),
        mac_c: lab.mac(Node::Edge, "eth0").unwrap(),
        mac_b: lab.mac(Node::Edge, "eth1").unwrap(),
        next_port: 40_000,
        results: Vec::new(),
    };
    // Neighbours: every backend but the unresolved ones (nn4, nn6) and the unroutable one, the
    // clients, and the hairpin client on the backends' side.
    for s in services() {
        for (name, addr, ..) in s.6 {
            if ["nn4-1", "nn6-1", "noroute4-1", "dsrnn4-1"].contains(&name) {
                continue;
            }
            fx.neigh(&sa(addr).ip().to_string(), "eth1");
        }
    }
    for c in [CLIENT4, CLIENT4_PINNED, CLIENT6, CLIENT6_PINNED] {
        fx.neigh(c, "eth0");
    }
    fx.neigh(CLIENT4_HAIRPIN, "eth1");
    // Routes with a smaller MTU, locked (so forwarding uses it, not the device's): to the
    // `MTU*` backends and to the `CLIENT*_SMALL` clients.
    let mtu = SMALL_MTU.to_string();
    for (net, dev) in [
        ("10.0.3.0/24", "eth1"),
        ("fd00:3::/64", "eth1"),
        ("10.0.4.0/24", "eth0"),
        ("fd00:4::/64", "eth0"),
    ] {
        lab.ip(
            Node::Edge,
            &["route", "add", net, "dev", dev, "mtu", "lock", &mtu],
        )
        .expect("adding a small-MTU route");
    }
    for c in [CLIENT4_SMALL, CLIENT6_SMALL] {
        fx.neigh(c, "eth0");
    }

    not_for_zdd(&mut fx);
    fragments(&mut fx);
    truncated_and_malformed(&mut fx);
    nat_v4(&mut fx);
    nat_v6(&mut fx);
    dsr(&mut fx);
    selection(&mut fx);
    next_hops(&mut fx);
    removed_backend(&mut fx);
    icmp_errors(&mut fx);
    too_big(&mut fx);
    passive_signals(&mut fx);
    fx.results
}

fn c4(port: u16) -> SocketAddr {
    SocketAddr::new(CLIENT4.parse().unwrap(), port)
}
fn c6(port: u16) -> SocketAddr {
    SocketAddr::new(CLIENT6.parse().unwrap(), port)
}

fn not_for_zdd(fx: &mut Fx) {
    let (ic, ib) = (fx.if_c, fx.if_b);
    fx.case("pass_v4_tcp_other_port", |fx| {
        let f = fx
            .client_frame(PROTO_TCP, c4(41000), sa("10.0.100.1:81"))
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_v4_tcp_other_addr", |fx| {
        let f = fx
            .client_frame(PROTO_TCP, c4(41000), sa("10.0.100.99:80"))
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_v4_udp_to_tcp_vip", |fx| {
        let f = fx.client_frame(PROTO_UDP, c4(41000), sa(WEB4)).build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_v4_tcp_to_udp_vip", |fx| {
        let f = fx.client_frame(PROTO_TCP, c4(41000), sa(DNS4)).build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_v6_tcp_other_port", |fx| {
        let f = fx
            .client_frame(PROTO_TCP, c6(41000), sa("[fd00:100::1]:81"))
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_v6_tcp_other_addr", |fx| {
        let f = fx
            .client_frame(PROTO_TCP, c6(41000), sa("[fd00:100::99]:80"))
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_v4_tcp_vlan_other_port", |fx| {
        let f = fx
            .client_frame(PROTO_TCP, c4(41000), sa("10.0.100.1:81"))
            .vlan(100)
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_arp_request_for_vip", |fx| {
        let f = arp_request(
            CLIENT_MAC,
            "10.0.1.2".parse().unwrap(),
            "10.0.100.1".parse().unwrap(),
        );
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_lldp_ethertype", |fx| {
        let mut f = fx.client_frame(PROTO_TCP, c4(41000), sa(WEB4)).build();
        f[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_qinq_double_tag", |fx| {
        // 802.1ad outer tag, then an 802.1Q tag: zdd reads one tag only.
        let mut f = fx
            .client_frame(PROTO_TCP, c4(41000), sa(WEB4))
            .vlan(100)
            .build();
        f[12..14].copy_from_slice(&ETH_P_8021AD.to_be_bytes());
        f.splice(16..16, [0x81, 0x00, 0x00, 0x64]);
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_icmp_echo_to_vip", |fx| {
        let f = FrameSpec::icmp_echo(CLIENT4.parse().unwrap(), "10.0.100.1".parse().unwrap())
            .macs(CLIENT_MAC, fx.mac_c)
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_icmpv6_echo_to_vip", |fx| {
        let f = FrameSpec::icmp_echo(CLIENT6.parse().unwrap(), "fd00:100::1".parse().unwrap())
            .macs(CLIENT_MAC, fx.mac_c)
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_v6_hop_by_hop_to_vip", |fx| {
        // An extension header before TCP: not balanced (zdd reads no extension headers).
        let tcp = fx.client_frame(PROTO_TCP, c6(41000), sa(WEB6)).build();
        let mut spec = fx.client_frame(PROTO_TCP, c6(41000), sa(WEB6));
        spec.proto = PROTO_HOPOPTS;
        let mut hbh = vec![PROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
        hbh.extend_from_slice(&tcp[14 + 40..]);
        spec.payload = hbh;
        let f = spec.build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("pass_v4_from_backend_port_unknown_flow", |fx| {
        // Source port of a nat backend, but no flow: not a reply zdd made.
        let f = fx
            .backend_frame(PROTO_TCP, sa(WEB4_BLUE), c4(59999))
            .build();
        fx.untouched(&f, ib, XDP_PASS, PASS)
    });
    fx.case("pass_v6_from_backend_port_unknown_flow", |fx| {
        let f = fx.backend_frame(PROTO_TCP, sa(WEB6_BE), c6(59999)).build();
        fx.untouched(&f, ib, XDP_PASS, PASS)
    });
}

fn fragments(fx: &mut Fx) {
    let ic = fx.if_c;
    fx.case("frag_v4_mf_to_vip_drop", |fx| {
        let f = fx
            .client_frame(PROTO_UDP, c4(41001), sa(DNS4))
            .ipv4_frag(0x2000)
            .build();
        fx.untouched(&f, ic, XDP_DROP, FRAGMENT)
    });
    fx.case("frag_v4_offset_to_vip_drop", |fx| {
        let f = fx
            .client_frame(PROTO_TCP, c4(41001), sa(WEB4))
            .ipv4_frag(185)
            .build();
        fx.untouched(&f, ic, XDP_DROP, FRAGMENT)
    });
    fx.case("frag_v4_last_fragment_df_offset_to_vip_drop", |fx| {
        let f = fx
            .client_frame(PROTO_TCP, c4(41001), sa(WEB4))
            .ipv4_frag(0x4000 | 7)
            .build();
        fx.untouched(&f, ic, XDP_DROP, FRAGMENT)
    });
    fx.case("frag_v4_to_vip_addr_other_port_drop", |fx| {
        let f = fx
            .client_frame(PROTO_TCP, c4(41001), sa("10.0.100.1:81"))
            .ipv4_frag(0x2000)
            .build();
        fx.untouched(&f, ic, XDP_DROP, FRAGMENT)
    });
    fx.case("frag_v4_mf_other_addr_pass", |fx| {
        let f = fx
            .client_frame(PROTO_UDP, c4(41001), sa("10.0.100.99:53"))
            .ipv4_frag(0x2000)
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("frag_v4_offset_other_addr_pass", |fx| {
        let f = fx
            .client_frame(PROTO_UDP, c4(41001), sa("10.0.100.99:53"))
            .ipv4_frag(100)
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("frag_v6_first_to_vip_drop", |fx| {
        let f = fx
            .client_frame(PROTO_UDP, c6(41001), sa(DNS6))
            .ipv6_frag(0, true)
            .build();
        fx.untouched(&f, ic, XDP_DROP, FRAGMENT)
    });
    fx.case("frag_v6_offset_to_vip_drop", |fx| {
        let f = fx
            .client_frame(PROTO_TCP, c6(41001), sa(WEB6))
            .ipv6_frag(181, false)
            .build();
        fx.untouched(&f, ic, XDP_DROP, FRAGMENT)
    });
    fx.case("frag_v6_other_addr_pass", |fx| {
        let f = fx
            .client_frame(PROTO_UDP, c6(41001), sa("[fd00:100::99]:53"))
            .ipv6_frag(0, true)
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("not_frag_v4_df_to_vip_forward", |fx| {
        // DF alone is not a fragment: balanced as usual.
        let p = fx.port();
        let s = fx
            .client_frame(PROTO_TCP, c4(p), sa(WEB4))
            .ipv4_frag(0x4000);
        let want = fx.nat_out(&s, sa(WEB4_BLUE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
}

fn truncated_and_malformed(fx: &mut Fx) {
    let ic = fx.if_c;
    let v4tcp = fx.client_frame(PROTO_TCP, c4(41002), sa(WEB4)).build();
    let v4udp = fx.client_frame(PROTO_UDP, c4(41002), sa(DNS4)).build();
    let v4opt = fx
        .client_frame(PROTO_TCP, c4(41002), sa(WEB4))
        .ipv4_options(&[1, 1, 1, 7, 7, 4, 0, 0, 0, 0])
        .build();
    let v4vlan = fx
        .client_frame(PROTO_TCP, c4(41002), sa(WEB4))
        .vlan(7)
        .build();
    let v6tcp = fx.client_frame(PROTO_TCP, c6(41002), sa(WEB6)).build();
    let v6udp = fx.client_frame(PROTO_UDP, c6(41002), sa(DNS6)).build();
    let cut = |f: &[u8], n: usize| f[..n].to_vec();
    let table: Vec<(&str, Vec<u8>)> = vec![
        ("trunc_vlan_tag_0_of_4", cut(&v4vlan, 14)),
        ("trunc_vlan_tag_2_of_4", cut(&v4vlan, 16)),
        ("trunc_vlan_v4_header_0_of_20", cut(&v4vlan, 18)),
        ("trunc_v4_header_0_of_20", cut(&v4tcp, 14)),
        ("trunc_v4_header_19_of_20", cut(&v4tcp, 33)),
        ("trunc_v4_options_0_of_12", cut(&v4opt, 34)),
        ("trunc_v4_options_11_of_12", cut(&v4opt, 45)),
        ("trunc_v4_options_tcp_0_of_20", cut(&v4opt, 46)),
        ("trunc_v4_tcp_0_of_20", cut(&v4tcp, 34)),
        ("trunc_v4_tcp_19_of_20", cut(&v4tcp, 53)),
        ("trunc_vlan_v4_tcp_19_of_20", cut(&v4vlan, 57)),
        ("trunc_v4_udp_0_of_8", cut(&v4udp, 34)),
        ("trunc_v4_udp_7_of_8", cut(&v4udp, 41)),
        ("trunc_v6_header_0_of_40", cut(&v6tcp, 14)),
        ("trunc_v6_header_39_of_40", cut(&v6tcp, 53)),
        ("trunc_v6_tcp_0_of_20", cut(&v6tcp, 54)),
        ("trunc_v6_tcp_19_of_20", cut(&v6tcp, 73)),
        ("trunc_v6_udp_7_of_8", cut(&v6udp, 61)),
    ];
    for (name, f) in table {
        fx.case(name, |fx| {
            ensure(parse(&f).is_err(), || "fixture bug: frame parses".into())?;
            fx.untouched(&f, ic, XDP_PASS, MALFORMED)
        });
    }
    fx.case("trunc_eth_13_of_14_refused_by_kernel", |fx| {
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (EINVAL): the
        // program can never see one, so there is nothing of zdd to check below 14 bytes.
        match fx.t.run(&v4tcp[..13], ic) {
            Err(e) => ensure(format!("{e:#}").contains("nvalid argument"), || {
                format!("unexpected error: {e:#}")
            }),
            Ok((v, _)) => Err(format!("kernel ran a 13-byte frame: {}", verdict_name(v))),
        }
    });
    let mutated = |f: &[u8], at: usize, b: u8| {
        let mut g = f.to_vec();
        g[at] = b;
        g
    };
    let table: Vec<(&str, Vec<u8>)> = vec![
        ("malformed_v4_ihl_4", mutated(&v4tcp, 14, 0x44)),
        (
            "malformed_v4_version_6_in_ipv4_frame",
            mutated(&v4tcp, 14, 0x65),
        ),
        (
            "malformed_v4_total_length_below_ihl",
            mutated(&v4tcp, 17, 19),
        ),
        ("malformed_v4_ihl_15_past_frame_end", {
            // IHL 15 (60 bytes) but the frame ends inside the would-be options.
            let mut g = mutated(&v4tcp, 14, 0x4f);
            g.truncate(14 + 50);
            g
        }),
        (
            "malformed_v6_version_4_in_ipv6_frame",
            mutated(&v6tcp, 14, 0x40),
        ),
        (
            "malformed_v4_tcp_data_offset_4",
            mutated(&v4tcp, 34 + 12, 0x40),
        ),
        (
            "malformed_v6_tcp_data_offset_0",
            mutated(&v6tcp, 54 + 12, 0x00),
        ),
    ];
    for (name, f) in table {
        fx.case(name, |fx| {
            ensure(parse(&f).is_err(), || "fixture bug: frame parses".into())?;
            fx.untouched(&f, ic, XDP_PASS, MALFORMED)
        });
    }
}

/// Forward a new flow, then the backend's answer: both must come out translated.
fn nat_round_trip(
    fx: &mut Fx,
    proto: u8,
    fwd: FrameSpec,
    vip: SocketAddr,
    backend: SocketAddr,
    reply: impl FnOnce(FrameSpec) -> FrameSpec,
) -> R {
    let want = fx.nat_out(&fwd, backend);
    fx.expect(&fwd.build(), fx.if_c, XDP_REDIRECT, &want, NEW_FWD)
        .map_err(|e| format!("forward: {e}"))?;
    let r = reply(fx.backend_frame(proto, backend, fwd.src_sock()));
    let want = fx.reply_out(&r, vip);
    fx.expect(&r.build(), fx.if_b, XDP_REDIRECT, &want, REVERSE)
        .map_err(|e| format!("reply: {e}"))
}

fn nat_v4(fx: &mut Fx) {
    let (ic, ib) = (fx.if_c, fx.if_b);
    fx.case("nat_v4_tcp_syn_forward_and_flow_recorded", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        let want = fx.nat_out(&s, sa(WEB4_BLUE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        let b = fx.flow_backend("web4", c4(p), sa(WEB4), PROTO_TCP)?;
        ensure(b == "web4-blue", || format!("flow on {b}"))
    });
    fx.case("nat_v4_tcp_established_ack_forward", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let s = s
            .flags(TCP_ACK | TCP_PSH)
            .payload(b"GET / HTTP/1.1\r\n\r\n");
        let want = fx.nat_out(&s, sa(WEB4_BLUE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, HIT_FWD)
    });
    fx.case("nat_v4_tcp_round_trip_syn_synack", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        nat_round_trip(fx, PROTO_TCP, s, sa(WEB4), sa(WEB4_BLUE), |r| r)
    });
    fx.case("nat_v4_tcp_odd_payload_and_options", |fx| {
        let p = fx.port();
        let s = fx
            .client_frame(PROTO_TCP, c4(p), sa(WEB4))
            .tcp_options(&[2, 4, 5, 0xb4, 1, 3, 3, 7, 4, 2])
            .payload(b"odd-length payload!");
        nat_round_trip(fx, PROTO_TCP, s, sa(WEB4), sa(WEB4_BLUE), |r| {
            r.flags(TCP_ACK).payload(b"odd")
        })
    });
    fx.case("nat_v4_udp_round_trip", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_UDP, c4(p), sa(DNS4));
        nat_round_trip(fx, PROTO_UDP, s, sa(DNS4), sa(DNS4_BE), |r| r)
    });
    fx.case("nat_v4_udp_checksum_0_stays_0_both_ways", |fx| {
        let p = fx.port();
        let s = fx
            .client_frame(PROTO_UDP, c4(p), sa(DNS4))
            .udp_no_checksum();
        nat_round_trip(fx, PROTO_UDP, s, sa(DNS4), sa(DNS4_BE), |r| {
            r.udp_no_checksum()
        })
    });
    fx.case("nat_v4_udp_checksum_ffff_edge", |fx| {
        // Find a payload whose translated datagram sums to zero, so the right checksum field
        // is 0xffff (RFC 768): an incremental update must not write 0 there.
        let p = fx.port();
        let base = fx.client_frame(PROTO_UDP, c4(p), sa(DNS4));
        let mut chosen = None;
        for x in 0..=u16::MAX {
            let s = base.clone().payload(&x.to_be_bytes());
            let out = fx.nat_out(&s, sa(DNS4_BE));
            let l4 = 14 + 20;
            if out[l4 + 6..l4 + 8] == [0xff, 0xff] {
                chosen = Some(s);
                break;
            }
        }
        let s = chosen.ok_or("no payload gives checksum 0xffff")?;
        let want = fx.nat_out(&s, sa(DNS4_BE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
    fx.case("nat_v4_tcp_checksum_0000_edge", |fx| {
        // A segment whose translated sum is all ones: the right field is 0x0000.
        let p = fx.port();
        let base = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4)).flags(TCP_ACK);
        let s = (0..=u16::MAX)
            .map(|x| base.clone().payload(&x.to_be_bytes()))
            .find(|s| fx.nat_out(s, sa(WEB4_BLUE))[14 + 20 + 16..14 + 20 + 18] == [0, 0])
            .ok_or("no payload gives checksum 0")?;
        fx.run(
            &base.clone().flags(TCP_SYN).build(),
            ic,
            XDP_REDIRECT,
            NEW_FWD,
        )?;
        let want = fx.nat_out(&s, sa(WEB4_BLUE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, HIT_FWD)
    });
    fx.case("nat_v4_reply_udp_checksum_ffff_edge", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_UDP, c4(p), sa(DNS4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let base = fx.backend_frame(PROTO_UDP, sa(DNS4_BE), c4(p));
        let r = (0..=u16::MAX)
            .map(|x| base.clone().payload(&x.to_be_bytes()))
            .find(|r| fx.reply_out(r, sa(DNS4))[14 + 20 + 6..14 + 20 + 8] == [0xff, 0xff])
            .ok_or("no payload gives checksum 0xffff")?;
        let want = fx.reply_out(&r, sa(DNS4));
        fx.expect(&r.build(), ib, XDP_REDIRECT, &want, REVERSE)
    });
    fx.case("nat_v4_udp_flow_idles_out_then_new_flow", |fx| {
        let short = zdd_common::Config {
            udp_idle_ns: 50_000_000,
            ..zdd_common::Config::default()
        };
        fx.t.dp.write_config(&short).map_err(|e| format!("{e:#}"))?;
        let p = fx.port();
        let s = fx.client_frame(PROTO_UDP, c4(p), sa(DNS4));
        let want = fx.nat_out(&s, sa(DNS4_BE));
        let r = (|| {
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, HIT_FWD)?;
            std::thread::sleep(Duration::from_millis(150));
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
                .map_err(|e| format!("after the idle timeout: {e}"))
        })();
        fx.t.dp
            .write_config(&zdd_common::Config::default())
            .map_err(|e| format!("{e:#}"))?;
        r
    });
    fx.case("nat_v4_options_round_trip", |fx| {
        let p = fx.port();
        // NOP, NOP, NOP, Record Route (len 7, pointer 4, one empty slot): IHL 8.
        let s = fx
            .client_frame(PROTO_TCP, c4(p), sa(WEB4))
            .ipv4_options(&[1, 1, 1, 7, 7, 4, 0, 0, 0, 0]);
        nat_round_trip(fx, PROTO_TCP, s, sa(WEB4), sa(WEB4_BLUE), |r| {
            r.ipv4_options(&[0x94, 4, 0, 0])
        })
    });
    fx.case("nat_v4_options_max_ihl_15", |fx| {
        let p = fx.port();
        let s = fx
            .client_frame(PROTO_UDP, c4(p), sa(DNS4))
            .ipv4_options(&[1; 40]);
        let want = fx.nat_out(&s, sa(DNS4_BE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
    fx.case("nat_v4_vlan_round_trip_tag_kept", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4)).vlan(0x2064);
        nat_round_trip(fx, PROTO_TCP, s, sa(WEB4), sa(WEB4_BLUE), |r| {
            r.vlan(0x0065)
        })
    });
    fx.case("nat_v4_vlan_udp_checksum_0", |fx| {
        let p = fx.port();
        let s = fx
            .client_frame(PROTO_UDP, c4(p), sa(DNS4))
            .vlan(100)
            .udp_no_checksum();
        let want = fx.nat_out(&s, sa(DNS4_BE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
    fx.case("nat_v4_ethernet_padding_kept", |fx| {
        // A minimum-size frame: 60 bytes, the IP datagram shorter, padding after it.
        let p = fx.port();
        let s = fx.client_frame(PROTO_UDP, c4(p), sa(DNS4)).payload(b"x");
        let mut f = s.build();
        let mut want = fx.nat_out(&s, sa(DNS4_BE));
        f.resize(60, 0xa5);
        want.resize(60, 0xa5);
        fx.expect(&f, ic, XDP_REDIRECT, &want, NEW_FWD)
    });
    fx.case("nat_v4_ttl_2_forward_ttl_1", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4)).ttl(2);
        let want = fx.nat_out(&s, sa(WEB4_BLUE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
    fx.case("nat_v4_ttl_1_pass_untranslated", |fx| {
        let p = fx.port();
        let f = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4)).ttl(1).build();
        // The flow is recorded before the TTL check (NewFlow), then the kernel answers.
        fx.untouched(
            &f,
            ic,
            XDP_PASS,
            &[(Stat::NewFlow, 1), (Stat::TtlExpired, 1)],
        )
    });
    fx.case("nat_v4_ttl_0_pass_untranslated", |fx| {
        let p = fx.port();
        let f = fx.client_frame(PROTO_UDP, c4(p), sa(DNS4)).ttl(0).build();
        fx.untouched(
            &f,
            ic,
            XDP_PASS,
            &[(Stat::NewFlow, 1), (Stat::TtlExpired, 1)],
        )
    });
    fx.case("nat_v4_reply_ttl_1_pass_untranslated", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let r = fx
            .backend_frame(PROTO_TCP, sa(WEB4_BLUE), c4(p))
            .ttl(1)
            .build();
        fx.untouched(&r, ib, XDP_PASS, &[(Stat::TtlExpired, 1)])
    });
    fx.case("nat_v4_hairpin_client_on_backend_side_xdp_tx", |fx| {
        let client: SocketAddr = SocketAddr::new(CLIENT4_HAIRPIN.parse().unwrap(), 43210);
        let s = FrameSpec::tcp(client, sa(WEB4)).macs(neigh_mac(client.ip()), fx.mac_b);
        let want = fx.nat_out(&s, sa(WEB4_BLUE));
        fx.expect(&s.build(), ib, XDP_TX, &want, NEW_FWD)?;
        let r = fx.backend_frame(PROTO_TCP, sa(WEB4_BLUE), client);
        let want = r
            .clone()
            .src(sa(WEB4))
            .ttl(63)
            .macs(fx.mac_b, neigh_mac(client.ip()))
            .build();
        fx.expect(&r.build(), ib, XDP_TX, &want, REVERSE)
    });
    fx.case("nat_v4_rst_closes_then_syn_is_new_flow", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let rst = s.clone().flags(TCP_RST | TCP_ACK).payload(b"");
        let want = fx.nat_out(&rst, sa(WEB4_BLUE));
        fx.expect(&rst.build(), ic, XDP_REDIRECT, &want, HIT_FWD)?;
        let e = fx.flow(c4(p), sa(WEB4), PROTO_TCP).ok_or("flow gone")?;
        ensure(e.flags & flow_flags::CLOSING != 0, || {
            format!("flags {:#x} after RST", e.flags)
        })?;
        let want = fx.nat_out(&s, sa(WEB4_BLUE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
    fx.case("nat_v4_fin_both_ways_marks_closing", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let fin = s.clone().flags(TCP_FIN | TCP_ACK);
        fx.run(&fin.build(), ic, XDP_REDIRECT, HIT_FWD)?;
        let r = fx
            .backend_frame(PROTO_TCP, sa(WEB4_BLUE), c4(p))
            .flags(TCP_FIN | TCP_ACK);
        let want = fx.reply_out(&r, sa(WEB4));
        fx.expect(&r.build(), ib, XDP_REDIRECT, &want, REVERSE)?;
        let e = fx.flow(c4(p), sa(WEB4), PROTO_TCP).ok_or("flow gone")?;
        let all = flow_flags::FIN_FWD | flow_flags::FIN_REV | flow_flags::CLOSING;
        ensure(e.flags & all == all, || format!("flags {:#x}", e.flags))
    });
    fx.case(
        "pass_reply_from_a_backend_the_flow_is_not_pinned_to",
        |fx| {
            // web4-green serves web4 too, but this flow is pinned to web4-blue: its packet to
            // the client is not a reply of this flow and must not be made to look like one.
            let p = fx.port();
            let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
            fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
            let r = fx
                .backend_frame(PROTO_TCP, backend_addr("web4-green"), c4(p))
                .build();
            fx.untouched(&r, ib, XDP_PASS, PASS)
        },
    );
    fx.case("nat_v4_reply_unresolved_client_pass_translated", |fx| {
        let client = SocketAddr::new(CLIENT4_NO_NEIGH.parse().unwrap(), 45000);
        let s = fx.client_frame(PROTO_TCP, client, sa(WEB4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let r = fx.backend_frame(PROTO_TCP, sa(WEB4_BLUE), client);
        // Translated, TTL and MACs left to the kernel, which forwards it.
        let want = r.clone().src(sa(WEB4)).build();
        fx.expect(
            &r.build(),
            ib,
            XDP_PASS,
            &want,
            &[(Stat::Reverse, 1), (Stat::PassToKernel, 1)],
        )
    });
}

fn nat_v6(fx: &mut Fx) {
    let (ic, ib) = (fx.if_c, fx.if_b);
    fx.case("nat_v6_tcp_round_trip", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c6(p), sa(WEB6));
        nat_round_trip(fx, PROTO_TCP, s, sa(WEB6), sa(WEB6_BE), |r| r)
    });
    fx.case("nat_v6_tcp_established_payload", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c6(p), sa(WEB6));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let s = s
            .flags(TCP_ACK | TCP_PSH)
            .payload(b"GET /odd HTTP/1.1\r\n\r\n");
        let want = fx.nat_out(&s, sa(WEB6_BE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, HIT_FWD)
    });
    fx.case("nat_v6_udp_round_trip", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_UDP, c6(p), sa(DNS6)).payload(b"q?");
        nat_round_trip(fx, PROTO_UDP, s, sa(DNS6), sa(DNS6_BE), |r| {
            r.payload(b"odd")
        })
    });
    fx.case("nat_v6_vlan_round_trip_tag_kept", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c6(p), sa(WEB6)).vlan(42);
        nat_round_trip(fx, PROTO_TCP, s, sa(WEB6), sa(WEB6_BE), |r| r.vlan(43))
    });
    fx.case("nat_v6_hop_limit_1_pass_untranslated", |fx| {
        let p = fx.port();
        let f = fx.client_frame(PROTO_TCP, c6(p), sa(WEB6)).ttl(1).build();
        fx.untouched(
            &f,
            ic,
            XDP_PASS,
            &[(Stat::NewFlow, 1), (Stat::TtlExpired, 1)],
        )
    });
    fx.case("nat_v6_reply_hop_limit_1_pass_untranslated", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_UDP, c6(p), sa(DNS6));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let r = fx
            .backend_frame(PROTO_UDP, sa(DNS6_BE), c6(p))
            .ttl(1)
            .build();
        fx.untouched(&r, ib, XDP_PASS, &[(Stat::TtlExpired, 1)])
    });
}

fn dsr(fx: &mut Fx) {
    let (ic, ib) = (fx.if_c, fx.if_b);
    let dsr_out =
        |fx: &Fx, s: &FrameSpec, be: &str| s.clone().macs(fx.mac_b, neigh_mac(sa(be).ip())).build();
    fx.case("dsr_v4_tcp_only_macs_change", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(DSR4));
        let want = dsr_out(fx, &s, DSR4_BE);
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        let s = s.flags(TCP_ACK).payload(b"more");
        let want = dsr_out(fx, &s, DSR4_BE);
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, HIT_FWD)
    });
    fx.case("tcp_syn_starts_the_flow_again", |fx| {
        // A SYN without ACK is not looked up: it selects and records afresh (a retransmitted
        // SYN lands on the same backend while the tables are unchanged).
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(DSR4));
        let want = dsr_out(fx, &s, DSR4_BE);
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        let a = s.flags(TCP_ACK);
        let want = dsr_out(fx, &a, DSR4_BE);
        fx.expect(&a.build(), ic, XDP_REDIRECT, &want, HIT_FWD)
    });
    fx.case("dsr_record_limit_forwards_unrecorded_flows", |fx| {
        let limited = zdd_common::Config {
            record_limit: 2,
            ..zdd_common::Config::default()
        };
        fx.t.dp
            .write_config(&limited)
            .map_err(|e| format!("{e:#}"))?;
        // The record window is per CPU: every call of this case on one CPU.
        let _cpu = OneCpu::here()?;
        let r = (|| {
            reset_record_window(fx)?;
            let unrecorded: &[(Stat, u64)] = &[
                (Stat::NewFlow, 1),
                (Stat::Unrecorded, 1),
                (Stat::Forward, 1),
            ];
            let ports = [fx.port(), fx.port(), fx.port()];
            for (i, p) in ports.into_iter().enumerate() {
                let s = fx.client_frame(PROTO_TCP, c4(p), sa(DSR4));
                let want = dsr_out(fx, &s, DSR4_BE);
                let deltas = if i < 2 { NEW_FWD } else { unrecorded };
                fx.expect(&s.build(), ic, XDP_REDIRECT, &want, deltas)
                    .map_err(|e| format!("SYN {i}: {e}"))?;
                let recorded = fx.flow(c4(p), sa(DSR4), PROTO_TCP).is_some();
                if recorded != (i < 2) {
                    return Err(format!("SYN {i}: recorded {recorded}, limit 2 per second"));
                }
            }
            // Later packets of the unrecorded flow: same backend by the tables, and recorded
            // once a new window starts.
            let a = fx
                .client_frame(PROTO_TCP, c4(ports[2]), sa(DSR4))
                .flags(TCP_ACK);
            let want = dsr_out(fx, &a, DSR4_BE);
            fx.expect(&a.build(), ic, XDP_REDIRECT, &want, unrecorded)
                .map_err(|e| format!("unrecorded ACK: {e}"))?;
            reset_record_window(fx)?;
            fx.expect(&a.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
                .map_err(|e| format!("ACK in a new window: {e}"))?;
            fx.expect(&a.build(), ic, XDP_REDIRECT, &want, HIT_FWD)
        })();
        fx.t.dp
            .write_config(&zdd_common::Config::default())
            .map_err(|e| format!("{e:#}"))?;
        r
    });
    fx.case("nat_flows_are_recorded_above_the_record_limit", |fx| {
        // nat replies are translated by the flow entry: the limit never applies to nat.
        let limited = zdd_common::Config {
            record_limit: 1,
            ..zdd_common::Config::default()
        };
        fx.t.dp
            .write_config(&limited)
            .map_err(|e| format!("{e:#}"))?;
        let r = (|| {
            reset_record_window(fx)?;
            for _ in 0..3 {
                let p = fx.port();
                let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
                let want = fx.nat_out(&s, sa(WEB4_BLUE));
                fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
                if fx.flow(c4(p), sa(WEB4), PROTO_TCP).is_none() {
                    return Err("a nat flow was not recorded".into());
                }
            }
            Ok(())
        })();
        fx.t.dp
            .write_config(&zdd_common::Config::default())
            .map_err(|e| format!("{e:#}"))?;
        r
    });
    fx.case("dsr_v4_udp_only_macs_change", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_UDP, c4(p), sa(DSR4U));
        let want = dsr_out(fx, &s, DSR4U_BE);
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
    fx.case("dsr_v4_vlan_only_macs_change", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(DSR4)).vlan(5);
        let want = dsr_out(fx, &s, DSR4_BE);
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
    fx.case("dsr_v4_ttl_1_forwarded_unchanged", |fx| {
        // dsr is not a router hop: the TTL is neither checked nor decremented.
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(DSR4)).ttl(1);
        let want = dsr_out(fx, &s, DSR4_BE);
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
    fx.case("dsr_v6_tcp_only_macs_change", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c6(p), sa(DSR6));
        let want = dsr_out(fx, &s, DSR6_BE);
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
    fx.case("dsr_v4_backend_answer_from_own_address_passes", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(DSR4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        // A dsr backend answers from the VIP itself; anything from its own address passes.
        let r = fx.backend_frame(PROTO_TCP, sa(DSR4_BE), c4(p)).build();
        fx.untouched(&r, ib, XDP_PASS, PASS)
    });
}

fn selection(fx: &mut Fx) {
    let ic = fx.if_c;
    fx.case("split_100_0_all_new_flows_blue", |fx| {
        for _ in 0..32 {
            let p = fx.port();
            let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
            let want = fx.nat_out(&s, sa(WEB4_BLUE));
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        }
        Ok(())
    });
    fx.case("split_0_100_all_new_flows_green", |fx| {
        for _ in 0..32 {
            let p = fx.port();
            let s = fx.client_frame(PROTO_TCP, c4(p), sa(GREEN4));
            let want = fx.nat_out(&s, sa(GREEN4_GREEN));
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        }
        Ok(())
    });
    fx.case("split_0_100_many_clients_all_green", |fx| {
        // Same service over many client addresses (not just ports).
        for i in 0..32u8 {
            let client = SocketAddr::new(format!("10.0.1.{}", 10 + i).parse().unwrap(), 5000);
            let s = fx.client_frame(PROTO_TCP, client, sa(GREEN4));
            fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
            let b = fx.flow_backend("green4", client, sa(GREEN4), PROTO_TCP)?;
            ensure(b == "green4-green", || format!("{client} on {b}"))?;
        }
        Ok(())
    });
    fx.case("zero_weight_group_with_split_0_never_selected", |fx| {
        for _ in 0..64 {
            let p = fx.port();
            let s = fx.client_frame(PROTO_TCP, c4(p), sa(ZERO4));
            let want = fx.nat_out(&s, backend_addr("zero-blue"));
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        }
        Ok(())
    });
    fx.case(
        "client_affinity_same_client_other_ports_same_backend",
        |fx| {
            let mut seen = Vec::new();
            for _ in 0..16 {
                let p = fx.port();
                let s = fx.client_frame(PROTO_TCP, c4(p), sa(AFF4));
                let out = fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
                let b = fx.flow_backend("aff4", c4(p), sa(AFF4), PROTO_TCP)?;
                same(&fx.nat_out(&s, backend_addr(&b)), &out)?;
                seen.push(b);
            }
            seen.dedup();
            ensure(seen.len() == 1, || format!("one client, backends {seen:?}"))
        },
    );
    fx.case("client_affinity_spreads_clients", |fx| {
        // Different clients are hashed apart: 64 clients must not all share one backend.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..64u8 {
            let client = SocketAddr::new(format!("10.0.1.{}", 100 + i).parse().unwrap(), 6000);
            let s = fx.client_frame(PROTO_TCP, client, sa(AFF4));
            fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
            seen.insert(fx.flow_backend("aff4", client, sa(AFF4), PROTO_TCP)?);
        }
        ensure(seen.len() == 4, || format!("backends used: {seen:?}"))
    });
    fx.case("pin_v4_cohort_goes_to_green_despite_split_0", |fx| {
        for _ in 0..8 {
            let p = fx.port();
            let client = SocketAddr::new(CLIENT4_PINNED.parse().unwrap(), p);
            let s = fx.client_frame(PROTO_TCP, client, sa(PIN4));
            let want = fx.nat_out(&s, backend_addr("pin4-green"));
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        }
        Ok(())
    });
    fx.case("pin_v4_outside_cohort_follows_split_blue", |fx| {
        for _ in 0..8 {
            let p = fx.port();
            let s = fx.client_frame(PROTO_TCP, c4(p), sa(PIN4));
            let want = fx.nat_out(&s, backend_addr("pin4-blue"));
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        }
        Ok(())
    });
    fx.case("pin_v6_cohort_goes_to_green_despite_split_0", |fx| {
        let p = fx.port();
        let client = SocketAddr::new(CLIENT6_PINNED.parse().unwrap(), p);
        let s = fx.client_frame(PROTO_TCP, client, sa(PIN6));
        let want = fx.nat_out(&s, backend_addr("pin6-green"));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        let r = fx.backend_frame(PROTO_TCP, backend_addr("pin6-green"), client);
        let want = fx.reply_out(&r, sa(PIN6));
        fx.expect(&r.build(), fx.if_b, XDP_REDIRECT, &want, REVERSE)
    });
    fx.case("pin_v6_outside_cohort_follows_split_blue", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c6(p), sa(PIN6));
        let want = fx.nat_out(&s, backend_addr("pin6-blue"));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)
    });
}

fn next_hops(fx: &mut Fx) {
    let ic = fx.if_c;
    fx.case("unresolved_neighbour_v4_pass_translated", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(NN4));
        // Translated (destination), TTL and MACs left to the kernel.
        let want = s.clone().dst(sa(NN4_BE)).build();
        fx.expect(
            &s.build(),
            ic,
            XDP_PASS,
            &want,
            &[(Stat::NewFlow, 1), (Stat::PassToKernel, 1)],
        )
    });
    fx.case("unresolved_neighbour_v6_pass_translated", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c6(p), sa(NN6));
        let want = s.clone().dst(sa(NN6_BE)).build();
        fx.expect(
            &s.build(),
            ic,
            XDP_PASS,
            &want,
            &[(Stat::NewFlow, 1), (Stat::PassToKernel, 1)],
        )
    });
    fx.case("dsr_unresolved_neighbour_drop", |fx| {
        // dsr cannot hand the frame to the kernel (it is addressed to the VIP): dropped, and
        // counted as `unresolved` (the agent resolves dsr backends' neighbours).
        let p = fx.port();
        let f = fx.client_frame(PROTO_TCP, c4(p), sa(DSRNN4)).build();
        fx.untouched(
            &f,
            ic,
            XDP_DROP,
            &[(Stat::NewFlow, 1), (Stat::Unresolved, 1), (Stat::Drop, 1)],
        )
    });
    fx.case("no_route_to_backend_drop", |fx| {
        let p = fx.port();
        let f = fx.client_frame(PROTO_TCP, c4(p), sa(NOROUTE4)).build();
        fx.run(
            &f,
            ic,
            XDP_DROP,
            &[(Stat::NewFlow, 1), (Stat::FibFailure, 1), (Stat::Drop, 1)],
        )
        .map(drop)
    });
    fx.case("removed_neighbour_cached_1s_then_pass_translated", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(RN4));
        let want = fx.nat_out(&s, sa(RN4_BE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        let ip = sa(RN4_BE).ip().to_string();
        fx.lab
            .ip(Node::Edge, &["neigh", "del", &ip, "dev", "eth1"])
            .map_err(|e| format!("{e:#}"))?;
        let s = s.flags(TCP_ACK);
        // The next hop is cached for 1 s: still sent to the old MAC at once...
        let want = fx.nat_out(&s, sa(RN4_BE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, HIT_FWD)
            .map_err(|e| format!("within the cache time: {e}"))?;
        std::thread::sleep(Duration::from_millis(1200));
        // ...then the FIB says "no neighbour": translated, handed to the kernel.
        let want = s.clone().dst(sa(RN4_BE)).build();
        fx.expect(&s.build(), ic, XDP_PASS, &want, &[(Stat::PassToKernel, 1)])
            .map_err(|e| format!("after the cache time: {e}"))
    });
}

fn removed_backend(fx: &mut Fx) {
    let (ic, ib) = (fx.if_c, fx.if_b);
    fx.case("removed_backend_flow_reselected_to_live_backend", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(RM4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let first = fx.flow_backend("rm4", c4(p), sa(RM4), PROTO_TCP)?;
        let other = if first == "rm-1" { "rm-2" } else { "rm-1" };
        fx.t.apply_toml(&config(Some(&first)))
            .map_err(|e| format!("{e:#}"))?;
        let s = s.flags(TCP_ACK).payload(b"after removal");
        let want = fx.nat_out(&s, backend_addr(other));
        let r = fx.expect(
            &s.build(),
            ic,
            XDP_REDIRECT,
            &want,
            &[(Stat::Reselected, 1), (Stat::Forward, 1)],
        );
        let now = fx.flow_backend("rm4", c4(p), sa(RM4), PROTO_TCP);
        // Put the removed backend back for anything after this case.
        fx.t.apply_toml(&config(None))
            .map_err(|e| format!("{e:#}"))?;
        r?;
        ensure(now.as_deref() == Ok(other), || {
            format!("flow now on {now:?}")
        })?;
        // The new backend's answers are translated back.
        let rep = fx
            .backend_frame(PROTO_TCP, backend_addr(other), c4(p))
            .flags(TCP_ACK);
        let want = fx.reply_out(&rep, sa(RM4));
        fx.expect(&rep.build(), ib, XDP_REDIRECT, &want, REVERSE)
    });
}

// ---------------------------------------------------------------------------------------------
// ICMP / ICMPv6 errors about VIP flows (icmp.rs).
// ---------------------------------------------------------------------------------------------

/// Routers that send errors: on the clients' side (errors about what the VIP sent) and on the
/// backends' side (errors about what a client sent, after translation).
const ROUTER4_C: &str = "10.0.1.254";
const ROUTER6_C: &str = "fd00:1::fe";
const ROUTER4_B: &str = "10.0.2.254";
const ROUTER6_B: &str = "fd00:2::fe";

const ICMP_FWD: &[(Stat, u64)] = &[(Stat::IcmpTranslated, 1), (Stat::Forward, 1)];
const ICMP_BACK: &[(Stat, u64)] = &[(Stat::IcmpTranslated, 1)];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// How a fixture's error quotes its packet: `None` whole, or this many transport bytes.
type QuoteLen = Option<usize>;

/// The quote of `translated` (what a router saw) and what zdd must make of it: the quote of
/// `original` (the same packet before or after zdd's nat), with the transport checksum left as
/// it was quoted (zdd puts addresses and ports back, and patches the quoted IPv4 header
/// checksum and the ICMP checksum; the quoted TCP/UDP checksum is not touched).
fn quotes(translated: &FrameSpec, original: &FrameSpec, len: QuoteLen) -> (Vec<u8>, Vec<u8>) {
    let q_in = quote(&translated.ip_packet(), len);
    let mut q_out = quote(&original.ip_packet(), len);
    if let Some(at) = quoted_l4_checksum_at(&q_in) {
        q_out[at..at + 2].copy_from_slice(&q_in[at..at + 2]);
    }
    (q_in, q_out)
}

/// The output of a translated error must carry right checksums, and the verifier must have been
/// able to check them all (ICMP/ICMPv6 with its pseudo-header; the quoted IPv4 header whenever
/// the quote holds all of it).
fn icmp_checksums_checked(out: &[u8]) -> R {
    let p = verify(out).map_err(|e| format!("output does not verify: {e}"))?;
    let i = p.icmp.as_ref().ok_or("output: no ICMP message")?;
    ensure(i.checksum_ok == Some(true), || {
        format!("ICMP checksum not checked/right: {:?}", i.checksum_ok)
    })?;
    if let Some(q) = &i.quoted
        && q.src.is_ipv4()
        && q.len >= q.hlen
    {
        ensure(q.header_checksum_ok == Some(true), || {
            "quoted IPv4 header checksum not right".into()
        })?;
    }
    Ok(())
}

impl Fx<'_> {
    /// Opens a flow `client` → `vip` (its first packet goes to the backend).
    fn open(
        &mut self,
        proto: u8,
        client: SocketAddr,
        vip: SocketAddr,
    ) -> Result<FrameSpec, String> {
        let s = self.client_frame(proto, client, vip);
        self.run(&s.build(), self.if_c, XDP_REDIRECT, NEW_FWD)
            .map_err(|e| format!("opening the flow: {e}"))?;
        Ok(s)
    }

    /// What the VIP sent to `client` on a nat flow (as a router past the edge saw it) and the
    /// backend's original of it.
    fn vip_reply(
        &self,
        proto: u8,
        client: SocketAddr,
        vip: SocketAddr,
        backend: SocketAddr,
        tweak: impl Fn(FrameSpec) -> FrameSpec,
    ) -> (FrameSpec, FrameSpec) {
        let original = tweak(self.backend_frame(proto, backend, client)).ttl(63);
        (original.clone().src(vip), original)
    }

    /// An error about a reply of the nat flow `client` → `vip` (pinned to `backend`), sent by
    /// `err(outer destination, quote)` to the VIP: it must go to the backend with the outer
    /// destination and the quoted source put back, TTL − 1, MACs of the backend's next hop.
    #[allow(clippy::too_many_arguments)]
    fn icmp_nat_to_backend(
        &mut self,
        proto: u8,
        client: SocketAddr,
        vip: SocketAddr,
        backend: SocketAddr,
        len: QuoteLen,
        tweak: impl Fn(FrameSpec) -> FrameSpec,
        err: impl Fn(IpAddr, &[u8]) -> FrameSpec,
    ) -> R {
        self.open(proto, client, vip)?;
        let (sent, original) = self.vip_reply(proto, client, vip, backend, tweak);
        let (q_in, q_out) = quotes(&sent, &original, len);
        let input = err(vip.ip(), &q_in).macs(CLIENT_MAC, self.mac_c);
        let want = err(backend.ip(), &q_out)
            .ttl(input.ttl - 1)
            .macs(self.mac_b, neigh_mac(backend.ip()))
            .build();
        let out = self.run(&input.build(), self.if_c, XDP_REDIRECT, ICMP_FWD)?;
        same(&want, &out)?;
        icmp_checksums_checked(&out)
    }

    /// An error about what `client` sent on its nat flow to `vip` (after translation, to
    /// `backend`), from `err(quote)` on the backends' side: the quoted destination gets the VIP
    /// back, and the kernel forwards it (XDP_PASS).
    fn icmp_nat_to_client(
        &mut self,
        proto: u8,
        client: SocketAddr,
        vip: SocketAddr,
        backend: SocketAddr,
        len: QuoteLen,
        err: impl Fn(&[u8]) -> FrameSpec,
    ) -> R {
        let fwd = self.open(proto, client, vip)?.ttl(63);
        let (q_in, q_out) = quotes(&fwd.clone().dst(backend), &fwd, len);
        let input = err(&q_in).build();
        let want = err(&q_out).build();
        let out = self.run(&input, self.if_b, XDP_PASS, ICMP_BACK)?;
        same(&want, &out)?;
        icmp_checksums_checked(&out)
    }

    /// The error from a clients'-side router to the VIP address, MACs client → edge.
    fn to_vip(&self, spec: FrameSpec) -> FrameSpec {
        spec.macs(CLIENT_MAC, self.mac_c)
    }
}

fn icmp_errors(fx: &mut Fx) {
    let (ic, ib) = (fx.if_c, fx.if_b);
    let r4c = ip(ROUTER4_C);
    let r6c = ip(ROUTER6_C);
    let mb = fx.mac_b;

    // Towards the backend, nat.
    fx.case("icmp_v4_frag_needed_tcp_nat_to_backend", |fx| {
        // RFC 792 quote: IP header and the first 8 bytes of TCP.
        let p = fx.port();
        fx.icmp_nat_to_backend(
            PROTO_TCP,
            c4(p),
            sa(WEB4),
            sa(WEB4_BLUE),
            Some(8),
            |r| r,
            |dst, q| FrameSpec::frag_needed(r4c, dst, 1400, q),
        )
    });
    fx.case("icmp_v4_frag_needed_udp_nat_to_backend_whole_quote", |fx| {
        let p = fx.port();
        fx.icmp_nat_to_backend(
            PROTO_UDP,
            c4(p),
            sa(DNS4),
            sa(DNS4_BE),
            None,
            |r| r.payload(b"a long enough answer, odd"),
            |dst, q| FrameSpec::frag_needed(r4c, dst, 1280, q),
        )
    });
    fx.case("icmp_v6_packet_too_big_tcp_nat_to_backend", |fx| {
        // The ICMPv6 checksum covers the pseudo-header: the outer destination change counts.
        let p = fx.port();
        fx.icmp_nat_to_backend(
            PROTO_TCP,
            c6(p),
            sa(WEB6),
            sa(WEB6_BE),
            None,
            |r| r.flags(TCP_ACK).payload(b"HTTP/1.1 200 OK\r\n"),
            |dst, q| FrameSpec::packet_too_big(r6c, dst, 1280, q),
        )
    });
    fx.case("icmp_v6_packet_too_big_udp_nat_to_backend", |fx| {
        let p = fx.port();
        fx.icmp_nat_to_backend(
            PROTO_UDP,
            c6(p),
            sa(DNS6),
            sa(DNS6_BE),
            None,
            |r| r.payload(b"odd"),
            |dst, q| FrameSpec::packet_too_big(r6c, dst, 1400, q),
        )
    });
    fx.case("icmp_v4_time_exceeded_tcp_nat_to_backend", |fx| {
        let p = fx.port();
        fx.icmp_nat_to_backend(
            PROTO_TCP,
            c4(p),
            sa(WEB4),
            sa(WEB4_BLUE),
            None,
            |r| r.flags(TCP_ACK).payload(b"x"),
            |dst, q| FrameSpec::time_exceeded(r4c, dst, q),
        )
    });
    fx.case("icmp_v6_time_exceeded_udp_nat_to_backend", |fx| {
        let p = fx.port();
        fx.icmp_nat_to_backend(
            PROTO_UDP,
            c6(p),
            sa(DNS6),
            sa(DNS6_BE),
            Some(8),
            |r| r,
            |dst, q| FrameSpec::time_exceeded(r6c, dst, q),
        )
    });
    fx.case("icmp_v4_frag_needed_vlan_nat_to_backend_tag_kept", |fx| {
        let p = fx.port();
        fx.icmp_nat_to_backend(
            PROTO_TCP,
            c4(p),
            sa(WEB4),
            sa(WEB4_BLUE),
            Some(8),
            |r| r,
            |dst, q| FrameSpec::frag_needed(r4c, dst, 1400, q).vlan(0x3064),
        )
    });
    fx.case(
        "icmp_v6_packet_too_big_vlan_nat_to_backend_tag_kept",
        |fx| {
            let p = fx.port();
            fx.icmp_nat_to_backend(
                PROTO_TCP,
                c6(p),
                sa(WEB6),
                sa(WEB6_BE),
                Some(8),
                |r| r,
                |dst, q| FrameSpec::packet_too_big(r6c, dst, 1280, q).vlan(42),
            )
        },
    );
    fx.case(
        "icmp_v4_frag_needed_quoting_ipv4_options_nat_to_backend",
        |fx| {
            // Quoted header of IHL 8: the ports and the quoted checksum follow the options.
            let p = fx.port();
            fx.icmp_nat_to_backend(
                PROTO_TCP,
                c4(p),
                sa(WEB4),
                sa(WEB4_BLUE),
                None,
                |r| r.ipv4_options(&[1, 1, 1, 7, 7, 4, 0, 0, 0, 0]),
                |dst, q| FrameSpec::frag_needed(r4c, dst, 1400, q),
            )
        },
    );
    fx.case(
        "icmp_v4_frag_needed_outer_ipv4_options_nat_to_backend",
        |fx| {
            let p = fx.port();
            fx.icmp_nat_to_backend(
                PROTO_UDP,
                c4(p),
                sa(DNS4),
                sa(DNS4_BE),
                None,
                |r| r.ipv4_options(&[0x94, 4, 0, 0]),
                |dst, q| FrameSpec::frag_needed(r4c, dst, 1400, q).ipv4_options(&[1; 40]),
            )
        },
    );
    fx.case("icmp_v4_frag_needed_icmp_checksum_0000_edge", |fx| {
        // An MTU that makes the translated ICMP message sum to all ones: the right field is
        // 0x0000 (an incremental update must not leave 0xffff there).
        let p = fx.port();
        fx.open(PROTO_UDP, c4(p), sa(DNS4))?;
        let (sent, orig) = fx.vip_reply(PROTO_UDP, c4(p), sa(DNS4), sa(DNS4_BE), |r| r);
        let (q_in, q_out) = quotes(&sent, &orig, None);
        let be = sa(DNS4_BE).ip();
        let want = |mtu| {
            FrameSpec::frag_needed(r4c, be, mtu, &q_out)
                .ttl(63)
                .macs(mb, neigh_mac(be))
                .build()
        };
        let mtu = (0..=u16::MAX)
            .find(|&m| want(m)[14 + 20 + 2..14 + 20 + 4] == [0, 0])
            .ok_or("no MTU gives ICMP checksum 0")?;
        let input = fx.to_vip(FrameSpec::frag_needed(r4c, sa(DNS4).ip(), mtu, &q_in));
        let out = fx.run(&input.build(), ic, XDP_REDIRECT, ICMP_FWD)?;
        same(&want(mtu), &out)?;
        icmp_checksums_checked(&out)
    });

    // Towards the backend, dsr: only the MACs change.
    fx.case("icmp_v4_frag_needed_dsr_to_backend_only_macs", |fx| {
        let p = fx.port();
        fx.open(PROTO_TCP, c4(p), sa(DSR4))?;
        // A dsr backend answers from the VIP itself.
        let sent = fx.backend_frame(PROTO_TCP, sa(DSR4), c4(p)).ttl(63);
        let input = fx.to_vip(FrameSpec::frag_needed(
            r4c,
            sa(DSR4).ip(),
            1400,
            &quote(&sent.ip_packet(), None),
        ));
        let want = input
            .clone()
            .macs(fx.mac_b, neigh_mac(sa(DSR4_BE).ip()))
            .build();
        let out = fx.run(&input.build(), ic, XDP_REDIRECT, ICMP_FWD)?;
        same(&want, &out)?;
        icmp_checksums_checked(&out)
    });
    fx.case("icmp_v6_packet_too_big_dsr_to_backend_only_macs", |fx| {
        let p = fx.port();
        fx.open(PROTO_TCP, c6(p), sa(DSR6))?;
        let sent = fx.backend_frame(PROTO_TCP, sa(DSR6), c6(p)).ttl(63);
        let input = fx.to_vip(FrameSpec::packet_too_big(
            r6c,
            sa(DSR6).ip(),
            1280,
            &quote(&sent.ip_packet(), None),
        ));
        let want = input
            .clone()
            .macs(fx.mac_b, neigh_mac(sa(DSR6_BE).ip()))
            .build();
        let out = fx.run(&input.build(), ic, XDP_REDIRECT, ICMP_FWD)?;
        same(&want, &out)?;
        icmp_checksums_checked(&out)
    });

    // Towards the client: the quoted destination gets the VIP back.
    fx.case("icmp_v4_frag_needed_to_client_quoted_dst_gets_vip", |fx| {
        let p = fx.port();
        fx.icmp_nat_to_client(PROTO_TCP, c4(p), sa(WEB4), sa(WEB4_BLUE), Some(8), |q| {
            from_b(
                FrameSpec::frag_needed(ip(ROUTER4_B), ip(CLIENT4), 1400, q),
                mb,
            )
        })
    });
    fx.case(
        "icmp_v6_packet_too_big_to_client_quoted_dst_gets_vip",
        |fx| {
            let p = fx.port();
            fx.icmp_nat_to_client(PROTO_UDP, c6(p), sa(DNS6), sa(DNS6_BE), None, |q| {
                from_b(
                    FrameSpec::packet_too_big(ip(ROUTER6_B), ip(CLIENT6), 1280, q),
                    mb,
                )
            })
        },
    );
    fx.case("icmp_v4_port_unreachable_from_backend_to_client", |fx| {
        // The backend itself says "port unreachable" about a datagram it got: the quoted
        // destination becomes the VIP's again (the outer source stays the backend's).
        let p = fx.port();
        fx.icmp_nat_to_client(PROTO_UDP, c4(p), sa(DNS4), sa(DNS4_BE), None, |q| {
            from_b(
                FrameSpec::icmp_error(
                    sa(DNS4_BE).ip(),
                    ip(CLIENT4),
                    ICMP_DEST_UNREACH,
                    ICMP_PORT_UNREACH,
                    0,
                    q,
                ),
                mb,
            )
        })
    });
    fx.case(
        "icmp_v6_time_exceeded_to_client_quoted_dst_gets_vip",
        |fx| {
            let p = fx.port();
            fx.icmp_nat_to_client(PROTO_TCP, c6(p), sa(WEB6), sa(WEB6_BE), Some(8), |q| {
                from_b(FrameSpec::time_exceeded(ip(ROUTER6_B), ip(CLIENT6), q), mb)
            })
        },
    );
    fx.case(
        "icmp_v4_to_client_about_backend_the_flow_is_not_pinned_to_passes",
        |fx| {
            // web4-green serves web4 too, but the flow is pinned to web4-blue.
            let p = fx.port();
            let fwd = fx.open(PROTO_TCP, c4(p), sa(WEB4))?.ttl(63);
            let q = quote(&fwd.dst(backend_addr("web4-green")).ip_packet(), Some(8));
            let f = from_b(
                FrameSpec::frag_needed(ip(ROUTER4_B), ip(CLIENT4), 1400, &q),
                mb,
            )
            .build();
            fx.untouched(&f, ib, XDP_PASS, PASS)
        },
    );

    // Not about a zdd flow, or not an error zdd translates: untouched.
    fx.case("icmp_v4_error_about_unknown_flow_pass_untouched", |fx| {
        let sent = fx
            .backend_frame(PROTO_TCP, sa(WEB4_BLUE), c4(59998))
            .src(sa(WEB4))
            .ttl(63);
        let f = fx
            .to_vip(FrameSpec::frag_needed(
                r4c,
                sa(WEB4).ip(),
                1400,
                &quote(&sent.ip_packet(), Some(8)),
            ))
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("icmp_v6_error_about_unknown_flow_pass_untouched", |fx| {
        let sent = fx
            .backend_frame(PROTO_UDP, sa(DNS6_BE), c6(59998))
            .src(sa(DNS6))
            .ttl(63);
        let f = fx
            .to_vip(FrameSpec::packet_too_big(
                r6c,
                sa(DNS6).ip(),
                1280,
                &sent.ip_packet(),
            ))
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case(
        "icmp_v4_quote_truncated_before_ports_pass_untouched",
        |fx| {
            let p = fx.port();
            fx.open(PROTO_TCP, c4(p), sa(WEB4))?;
            let (sent, _) = fx.vip_reply(PROTO_TCP, c4(p), sa(WEB4), sa(WEB4_BLUE), |r| r);
            for n in [0, 2, 3] {
                let f = fx
                    .to_vip(FrameSpec::frag_needed(
                        r4c,
                        sa(WEB4).ip(),
                        1400,
                        &quote(&sent.ip_packet(), Some(n)),
                    ))
                    .build();
                fx.untouched(&f, ic, XDP_PASS, PASS)
                    .map_err(|e| format!("{n} transport bytes quoted: {e}"))?;
            }
            Ok(())
        },
    );
    fx.case(
        "icmp_v6_quote_truncated_before_ports_pass_untouched",
        |fx| {
            let p = fx.port();
            fx.open(PROTO_UDP, c6(p), sa(DNS6))?;
            let (sent, _) = fx.vip_reply(PROTO_UDP, c6(p), sa(DNS6), sa(DNS6_BE), |r| r);
            for n in [0, 3] {
                let f = fx
                    .to_vip(FrameSpec::packet_too_big(
                        r6c,
                        sa(DNS6).ip(),
                        1280,
                        &quote(&sent.ip_packet(), Some(n)),
                    ))
                    .build();
                fx.untouched(&f, ic, XDP_PASS, PASS)
                    .map_err(|e| format!("{n} transport bytes quoted: {e}"))?;
            }
            // A quoted IPv6 header cut short.
            let f = fx
                .to_vip(FrameSpec::packet_too_big(
                    r6c,
                    sa(DNS6).ip(),
                    1280,
                    &sent.ip_packet()[..39],
                ))
                .build();
            fx.untouched(&f, ic, XDP_PASS, PASS)
                .map_err(|e| format!("39 bytes of IPv6 header quoted: {e}"))
        },
    );
    fx.case(
        "icmp_v4_ip_length_ends_before_quoted_ports_pass_untouched",
        |fx| {
            // The IP datagram (and the ICMP checksum) ends 2 bytes into the quoted TCP header; the
            // rest of the quote lies after it in the frame (a trailer). Not part of the message:
            // the quote is truncated before its ports.
            let p = fx.port();
            fx.open(PROTO_TCP, c4(p), sa(WEB4))?;
            let (sent, _) = fx.vip_reply(PROTO_TCP, c4(p), sa(WEB4), sa(WEB4_BLUE), |r| r);
            let whole = quote(&sent.ip_packet(), Some(8));
            let mut f = fx
                .to_vip(FrameSpec::frag_needed(
                    r4c,
                    sa(WEB4).ip(),
                    1400,
                    &whole[..22],
                ))
                .build();
            f.extend_from_slice(&whole[22..]);
            fx.untouched(&f, ic, XDP_PASS, PASS)
        },
    );
    fx.case(
        "icmp_v4_to_client_ip_length_ends_before_quoted_dport_pass_untouched",
        |fx| {
            // Towards the client: the quoted destination port lies after the IP datagram, outside
            // the ICMP checksum; rewriting it and patching the checksum breaks the message.
            let p = fx.port();
            let fwd = fx.open(PROTO_TCP, c4(p), sa(WEB4))?.ttl(63);
            let whole = quote(&fwd.dst(sa(WEB4_BLUE)).ip_packet(), Some(8));
            let mut f = from_b(
                FrameSpec::frag_needed(ip(ROUTER4_B), ip(CLIENT4), 1400, &whole[..22]),
                mb,
            )
            .build();
            f.extend_from_slice(&whole[22..]);
            fx.untouched(&f, ib, XDP_PASS, PASS)
        },
    );
    fx.case("icmp_v4_error_ttl_1_pass_untranslated", |fx| {
        let p = fx.port();
        fx.open(PROTO_TCP, c4(p), sa(WEB4))?;
        let (sent, _) = fx.vip_reply(PROTO_TCP, c4(p), sa(WEB4), sa(WEB4_BLUE), |r| r);
        let f = fx
            .to_vip(FrameSpec::frag_needed(
                r4c,
                sa(WEB4).ip(),
                1400,
                &quote(&sent.ip_packet(), Some(8)),
            ))
            .ttl(1)
            .build();
        fx.untouched(&f, ic, XDP_PASS, &[(Stat::TtlExpired, 1)])
    });
    fx.case("icmp_v6_error_hop_limit_1_pass_untranslated", |fx| {
        let p = fx.port();
        fx.open(PROTO_TCP, c6(p), sa(WEB6))?;
        let (sent, _) = fx.vip_reply(PROTO_TCP, c6(p), sa(WEB6), sa(WEB6_BE), |r| r);
        let f = fx
            .to_vip(FrameSpec::packet_too_big(
                r6c,
                sa(WEB6).ip(),
                1280,
                &sent.ip_packet(),
            ))
            .ttl(1)
            .build();
        fx.untouched(&f, ic, XDP_PASS, &[(Stat::TtlExpired, 1)])
    });
    fx.case("icmp_v4_echo_with_quote_like_data_to_vip_untouched", |fx| {
        // Echo request and echo reply whose data is a quote of a live flow: not errors.
        let p = fx.port();
        fx.open(PROTO_TCP, c4(p), sa(WEB4))?;
        let (sent, _) = fx.vip_reply(PROTO_TCP, c4(p), sa(WEB4), sa(WEB4_BLUE), |r| r);
        for kind in [ICMP_ECHO, ICMP_ECHO_REPLY] {
            let f = fx
                .to_vip(FrameSpec::icmp_error(
                    r4c,
                    sa(WEB4).ip(),
                    kind,
                    0,
                    0x0077_0001,
                    &sent.ip_packet(),
                ))
                .build();
            fx.untouched(&f, ic, XDP_PASS, PASS)
                .map_err(|e| format!("type {kind}: {e}"))?;
        }
        Ok(())
    });
    fx.case("icmp_v6_echo_with_quote_like_data_to_vip_untouched", |fx| {
        let p = fx.port();
        fx.open(PROTO_TCP, c6(p), sa(WEB6))?;
        let (sent, _) = fx.vip_reply(PROTO_TCP, c6(p), sa(WEB6), sa(WEB6_BE), |r| r);
        for kind in [ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY] {
            let f = fx
                .to_vip(FrameSpec::icmp_error(
                    r6c,
                    sa(WEB6).ip(),
                    kind,
                    0,
                    0x0077_0001,
                    &sent.ip_packet(),
                ))
                .build();
            fx.untouched(&f, ic, XDP_PASS, PASS)
                .map_err(|e| format!("type {kind}: {e}"))?;
        }
        Ok(())
    });
    fx.case("icmp_v4_parameter_problem_and_v6_type_4_untouched", |fx| {
        // Errors zdd does not translate (only v4 types 3 and 11, v6 types 1 to 3).
        let p = fx.port();
        fx.open(PROTO_TCP, c4(p), sa(WEB4))?;
        let (sent, _) = fx.vip_reply(PROTO_TCP, c4(p), sa(WEB4), sa(WEB4_BLUE), |r| r);
        let f = fx
            .to_vip(FrameSpec::icmp_error(
                r4c,
                sa(WEB4).ip(),
                ICMP_PARAMETER_PROB,
                0,
                0x0800_0000,
                &quote(&sent.ip_packet(), Some(8)),
            ))
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)?;
        let p = fx.port();
        fx.open(PROTO_TCP, c6(p), sa(WEB6))?;
        let (sent, _) = fx.vip_reply(PROTO_TCP, c6(p), sa(WEB6), sa(WEB6_BE), |r| r);
        let f = fx
            .to_vip(FrameSpec::icmp_error(
                r6c,
                sa(WEB6).ip(),
                ICMPV6_PARAMPROB,
                0,
                6,
                &sent.ip_packet(),
            ))
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case("icmp_v4_error_quoting_icmp_pass_untouched", |fx| {
        // A quoted packet that is neither TCP nor UDP (an echo reply from the VIP address).
        let sent = FrameSpec::icmp_echo(sa(WEB4).ip(), ip(CLIENT4)).ttl(63);
        let f = fx
            .to_vip(FrameSpec::frag_needed(
                r4c,
                sa(WEB4).ip(),
                1400,
                &quote(&sent.ip_packet(), Some(8)),
            ))
            .build();
        fx.untouched(&f, ic, XDP_PASS, PASS)
    });
    fx.case(
        "icmp_quoted_header_of_the_wrong_ip_version_pass_untouched",
        |fx| {
            // A quote about a live flow whose IP version nibble is wrong: not a quoted packet.
            let p = fx.port();
            fx.open(PROTO_TCP, c4(p), sa(WEB4))?;
            let (sent, _) = fx.vip_reply(PROTO_TCP, c4(p), sa(WEB4), sa(WEB4_BLUE), |r| r);
            let mut q = quote(&sent.ip_packet(), Some(8));
            q[0] = 0x65;
            let f = fx
                .to_vip(FrameSpec::frag_needed(r4c, sa(WEB4).ip(), 1400, &q))
                .build();
            fx.untouched(&f, ic, XDP_PASS, PASS)
                .map_err(|e| format!("IPv4 quote with version 6: {e}"))?;
            let p = fx.port();
            fx.open(PROTO_TCP, c6(p), sa(WEB6))?;
            let (sent, _) = fx.vip_reply(PROTO_TCP, c6(p), sa(WEB6), sa(WEB6_BE), |r| r);
            let mut q = sent.ip_packet();
            q[0] = 0x40 | (q[0] & 0x0f);
            let f = fx
                .to_vip(FrameSpec::packet_too_big(r6c, sa(WEB6).ip(), 1280, &q))
                .build();
            fx.untouched(&f, ic, XDP_PASS, PASS)
                .map_err(|e| format!("IPv6 quote with version 4: {e}"))
        },
    );
    fx.case("icmp_v4_truncated_icmp_header_malformed", |fx| {
        let f = fx
            .to_vip(FrameSpec::frag_needed(r4c, sa(WEB4).ip(), 1400, &[]))
            .build();
        let f = f[..f.len() - 1].to_vec();
        ensure(parse(&f).is_err(), || "fixture bug: frame parses".into())?;
        fx.untouched(&f, ic, XDP_PASS, MALFORMED)
    });

    // Next hops of errors towards the backend.
    fx.case(
        "icmp_v4_error_unresolved_backend_neighbour_pass_translated",
        |fx| {
            // Translated; TTL and MACs left to the kernel, which resolves the neighbour.
            let p = fx.port();
            fx.open_unresolved(c4(p), sa(NN4))?;
            let (sent, orig) = fx.vip_reply(PROTO_TCP, c4(p), sa(NN4), sa(NN4_BE), |r| r);
            let (q_in, q_out) = quotes(&sent, &orig, Some(8));
            let input = fx.to_vip(FrameSpec::frag_needed(r4c, sa(NN4).ip(), 1400, &q_in));
            let want = fx
                .to_vip(FrameSpec::frag_needed(r4c, sa(NN4_BE).ip(), 1400, &q_out))
                .build();
            let out = fx.run(
                &input.build(),
                ic,
                XDP_PASS,
                &[(Stat::IcmpTranslated, 1), (Stat::PassToKernel, 1)],
            )?;
            same(&want, &out)?;
            icmp_checksums_checked(&out)
        },
    );
    fx.case(
        "icmp_v4_error_dsr_unresolved_neighbour_drop_counted_unresolved",
        |fx| {
            // As for any dsr packet whose backend's neighbour is unknown: dropped, and counted as
            // `unresolved` ("FIB lookup failed for another reason" is `fib_failure`).
            let p = fx.port();
            let s = fx.client_frame(PROTO_TCP, c4(p), sa(DSRNN4));
            fx.run(
                &s.build(),
                ic,
                XDP_DROP,
                &[(Stat::NewFlow, 1), (Stat::Unresolved, 1), (Stat::Drop, 1)],
            )?;
            let sent = fx.backend_frame(PROTO_TCP, sa(DSRNN4), c4(p)).ttl(63);
            let f = fx
                .to_vip(FrameSpec::frag_needed(
                    r4c,
                    sa(DSRNN4).ip(),
                    1400,
                    &quote(&sent.ip_packet(), Some(8)),
                ))
                .build();
            fx.untouched(
                &f,
                ic,
                XDP_DROP,
                &[
                    (Stat::IcmpTranslated, 1),
                    (Stat::Unresolved, 1),
                    (Stat::Drop, 1),
                ],
            )
        },
    );
}

/// An error from a backends'-side router or backend: MACs sender → edge eth1 (`mac_b`).
fn from_b(spec: FrameSpec, mac_b: Mac) -> FrameSpec {
    let src = spec.src;
    spec.macs(neigh_mac(src), mac_b)
}

impl Fx<'_> {
    /// Opens a flow to a nat service whose backend has no neighbour entry (passed to the
    /// kernel, translated).
    fn open_unresolved(&mut self, client: SocketAddr, vip: SocketAddr) -> R {
        let s = self.client_frame(PROTO_TCP, client, vip);
        self.run(
            &s.build(),
            self.if_c,
            XDP_PASS,
            &[(Stat::NewFlow, 1), (Stat::PassToKernel, 1)],
        )
        .map(drop)
        .map_err(|e| format!("opening the flow: {e}"))
    }
}

/// Starts a new record-limit window on every CPU (as if a second had passed).
fn reset_record_window(fx: &mut Fx) -> R {
    use aya::maps::{PerCpuArray, PerCpuValues};
    let m =
        fx.t.dp
            .ebpf_mut()
            .map_mut(map_names::RECORDS)
            .ok_or("no record-window map")?;
    let mut w: PerCpuArray<_, zdd_common::RecordWindow> =
        PerCpuArray::try_from(m).map_err(|e| e.to_string())?;
    let n = aya::util::nr_cpus().map_err(|(_, e)| e.to_string())?;
    let fresh = PerCpuValues::try_from(vec![zdd_common::RecordWindow::default(); n])
        .map_err(|e| e.to_string())?;
    w.set(0, fresh, 0).map_err(|e| e.to_string())
}

/// Keeps the calling thread on the CPU it runs on until dropped (the previous mask back).
struct OneCpu(libc::cpu_set_t);

impl OneCpu {
    fn here() -> Result<OneCpu, String> {
        // SAFETY: cpu_set_t is plain data; the calls get the calling thread (pid 0) and a
        // pointer to a set of the size given.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            if libc::sched_getaffinity(0, size, &mut old) != 0 {
                return Err(format!(
                    "sched_getaffinity: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let cpu = libc::sched_getcpu();
            if cpu < 0 {
                return Err(format!("sched_getcpu: {}", std::io::Error::last_os_error()));
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut one);
            if libc::sched_setaffinity(0, size, &one) != 0 {
                return Err(format!(
                    "sched_setaffinity: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(OneCpu(old))
        }
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `here`.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0);
        }
    }
}

/// Frames larger than the MTU towards their next hop (the `MTU*` services and `CLIENT*_SMALL`
/// clients sit behind routes with `SMALL_MTU`): with DF or IPv6, answered by the program with
/// ICMP fragmentation needed / packet too big from the frame's destination (the VIP for a
/// client's frame, the client for a nat reply), quoting the frame as it arrived;
/// IPv4 without DF: translated and left to the kernel to fragment (nat) or dropped (dsr).
/// Both from a FIB lookup (the first packet towards a next hop) and from the next-hop caches.
fn too_big(fx: &mut Fx) {
    let (ic, ib) = (fx.if_c, fx.if_b);
    let big = vec![0x5a; 1300];
    const TOO_BIG: &[(Stat, u64)] = &[(Stat::TooBig, 1)];
    const NEW_TOO_BIG: &[(Stat, u64)] = &[(Stat::NewFlow, 1), (Stat::TooBig, 1)];
    const DF: u16 = 0x4000;
    let data = TCP_ACK | TCP_PSH;

    fx.case(
        "too_big_v4_tcp_nat_from_fib_icmp_frag_needed_from_vip",
        |fx| {
            // A flow's first packet, nothing cached for its backend yet: the FIB says too big.
            let p = fx.port();
            let s = fx
                .client_frame(PROTO_TCP, c4(p), sa(MTU4))
                .flags(data)
                .ipv4_frag(DF)
                .payload(&big);
            let want = too_big_answer(&s, sa(MTU4).ip(), SMALL_MTU).build();
            fx.expect(&s.build(), ic, XDP_TX, &want, NEW_TOO_BIG)
        },
    );
    fx.case(
        "too_big_v4_tcp_nat_cached_next_hop_icmp_and_mtu_fits",
        |fx| {
            let p = fx.port();
            let s = fx.client_frame(PROTO_TCP, c4(p), sa(MTU4)).ipv4_frag(DF);
            // The SYN caches the backend's next hop, with its MTU.
            let want = fx.nat_out(&s, sa(MTU4_BE));
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
            let b = s.flags(data).payload(&big);
            let want = too_big_answer(&b, sa(MTU4).ip(), SMALL_MTU).build();
            fx.expect(&b.build(), ic, XDP_TX, &want, TOO_BIG)
                .map_err(|e| format!("too big, next hop cached: {e}"))?;
            // Exactly the MTU (20 + 20 + 1240 bytes) fits.
            let fit = b.payload(&big[..SMALL_MTU as usize - 40]);
            let want = fx.nat_out(&fit, sa(MTU4_BE));
            fx.expect(&fit.build(), ic, XDP_REDIRECT, &want, HIT_FWD)
                .map_err(|e| format!("MTU-sized: {e}"))
        },
    );
    fx.case(
        "too_big_v4_vlan_and_60_byte_header_quote_68_bytes_tag_kept",
        |fx| {
            let p = fx.port();
            let s = fx
                .client_frame(PROTO_TCP, c4(p), sa(MTU4))
                .vlan(0x2005)
                .ipv4_options(&[1; 40])
                .flags(data)
                .ipv4_frag(DF)
                .payload(&big);
            let want = too_big_answer(&s, sa(MTU4).ip(), SMALL_MTU).build();
            fx.expect(&s.build(), ic, XDP_TX, &want, NEW_TOO_BIG)
        },
    );
    fx.case(
        "too_big_v6_tcp_nat_from_fib_packet_too_big_from_vip",
        |fx| {
            let p = fx.port();
            let s = fx
                .client_frame(PROTO_TCP, c6(p), sa(MTU6))
                .flags(data)
                .payload(&big);
            let want = too_big_answer(&s, sa(MTU6).ip(), SMALL_MTU).build();
            fx.expect(&s.build(), ic, XDP_TX, &want, NEW_TOO_BIG)
        },
    );
    fx.case("too_big_v6_tcp_nat_cached_next_hop_and_mtu_fits", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c6(p), sa(MTU6));
        let want = fx.nat_out(&s, sa(MTU6_BE));
        fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
        let b = s.flags(data).payload(&big);
        let want = too_big_answer(&b, sa(MTU6).ip(), SMALL_MTU).build();
        fx.expect(&b.build(), ic, XDP_TX, &want, TOO_BIG)
            .map_err(|e| format!("too big, next hop cached: {e}"))?;
        let fit = b.payload(&big[..SMALL_MTU as usize - 60]);
        let want = fx.nat_out(&fit, sa(MTU6_BE));
        fx.expect(&fit.build(), ic, XDP_REDIRECT, &want, HIT_FWD)
            .map_err(|e| format!("MTU-sized: {e}"))
    });
    fx.case("too_big_v4_udp_nat_df_icmp_from_vip", |fx| {
        let p = fx.port();
        let s = fx
            .client_frame(PROTO_UDP, c4(p), sa(MTU4U))
            .ipv4_frag(DF)
            .payload(&big);
        let want = too_big_answer(&s, sa(MTU4U).ip(), SMALL_MTU).build();
        fx.expect(&s.build(), ic, XDP_TX, &want, NEW_TOO_BIG)
    });
    fx.case(
        "too_big_v4_udp_nat_without_df_translated_for_the_kernel",
        |fx| {
            // Without DF a router fragments: translated, handed to the kernel (TTL and MACs are
            // the kernel's to change).
            let p = fx.port();
            let s = fx.client_frame(PROTO_UDP, c4(p), sa(MTU4U)).payload(&big);
            let want = s.clone().dst(sa(MTU4U_BE)).build();
            fx.expect(
                &s.build(),
                ic,
                XDP_PASS,
                &want,
                &[
                    (Stat::NewFlow, 1),
                    (Stat::FragmentedByKernel, 1),
                    (Stat::PassToKernel, 1),
                ],
            )
        },
    );
    fx.case("too_big_v4_dsr_df_icmp_from_vip", |fx| {
        let p = fx.port();
        let s = fx
            .client_frame(PROTO_TCP, c4(p), sa(MTUDSR4))
            .flags(data)
            .ipv4_frag(DF)
            .payload(&big);
        let want = too_big_answer(&s, sa(MTUDSR4).ip(), SMALL_MTU).build();
        fx.expect(&s.build(), ic, XDP_TX, &want, NEW_TOO_BIG)
    });
    fx.case("too_big_v4_dsr_without_df_dropped", |fx| {
        // dsr cannot hand it to the kernel (it would route the VIP elsewhere).
        let p = fx.port();
        let s = fx
            .client_frame(PROTO_TCP, c4(p), sa(MTUDSR4))
            .flags(data)
            .payload(&big);
        fx.untouched(
            &s.build(),
            ic,
            XDP_DROP,
            &[
                (Stat::NewFlow, 1),
                (Stat::TooBigDropped, 1),
                (Stat::Drop, 1),
            ],
        )
    });
    for (name, client, vip, backend) in [
        (
            "too_big_v4_nat_reply_icmp_to_backend_fib_then_cache",
            CLIENT4_SMALL,
            MTU4,
            MTU4_BE,
        ),
        (
            "too_big_v6_nat_reply_icmp_to_backend_fib_then_cache",
            CLIENT6_SMALL,
            MTU6,
            MTU6_BE,
        ),
    ] {
        fx.case(name, |fx| {
            // The reply cache is per CPU: stay on one.
            let _cpu = OneCpu::here()?;
            let p = fx.port();
            let cl = SocketAddr::new(ip(client), p);
            let s = fx.client_frame(PROTO_TCP, cl, sa(vip));
            let want = fx.nat_out(&s, sa(backend));
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
            let r = fx
                .backend_frame(PROTO_TCP, sa(backend), cl)
                .flags(data)
                .ipv4_frag(DF)
                .payload(&big);
            // The backend hears it from the reply's destination (the client), about its reply as
            // it sent it.
            let want = too_big_answer(&r, cl.ip(), SMALL_MTU).build();
            fx.expect(&r.build(), ib, XDP_TX, &want, TOO_BIG)
                .map_err(|e| format!("from the FIB: {e}"))?;
            // A reply that fits fills the reply cache, MTU included...
            let small = r.clone().payload(b"ok");
            let out = fx.reply_out(&small, sa(vip));
            fx.expect(&small.build(), ib, XDP_REDIRECT, &out, REVERSE)?;
            // ...and the cache catches the next big one.
            fx.expect(&r.build(), ib, XDP_TX, &want, TOO_BIG)
                .map_err(|e| format!("from the reply cache: {e}"))
        });
    }
    fx.case(
        "too_big_v4_nat_reply_without_df_translated_for_the_kernel",
        |fx| {
            let p = fx.port();
            let cl = SocketAddr::new(ip(CLIENT4_SMALL), p);
            let s = fx.client_frame(PROTO_UDP, cl, sa(MTU4U));
            let want = fx.nat_out(&s, sa(MTU4U_BE));
            fx.expect(&s.build(), ic, XDP_REDIRECT, &want, NEW_FWD)?;
            let r = fx.backend_frame(PROTO_UDP, sa(MTU4U_BE), cl).payload(&big);
            let want = r.clone().src(sa(MTU4U)).build();
            fx.expect(
                &r.build(),
                ib,
                XDP_PASS,
                &want,
                &[
                    (Stat::Reverse, 1),
                    (Stat::FragmentedByKernel, 1),
                    (Stat::PassToKernel, 1),
                ],
            )
        },
    );
    fx.case(
        "too_big_icmp_error_for_a_backend_dropped_never_answered",
        |fx| {
            // An error (quoting a whole big reply) too big for the backend's next hop: never
            // answered with another error.
            let p = fx.port();
            fx.open(PROTO_TCP, c4(p), sa(MTU4))?;
            let sent = FrameSpec::tcp(sa(MTU4), c4(p)).flags(data).payload(&big);
            let f = fx
                .to_vip(FrameSpec::frag_needed(
                    ip(ROUTER4_C),
                    sa(MTU4).ip(),
                    1000,
                    &quote(&sent.ip_packet(), None),
                ))
                .build();
            fx.untouched(
                &f,
                ic,
                XDP_DROP,
                &[
                    (Stat::IcmpTranslated, 1),
                    (Stat::TooBigDropped, 1),
                    (Stat::Drop, 1),
                ],
            )
        },
    );
    fx.case("too_big_answers_verify_with_the_independent_parser", |fx| {
        // Every answer above is compared byte for byte with the builder's; this one checks
        // what the parser reads in one of them: type, code, MTU, and a quote that is the
        // frame as it arrived.
        let p = fx.port();
        let s = fx
            .client_frame(PROTO_TCP, c4(p), sa(MTU4))
            .flags(data)
            .ipv4_frag(DF)
            .payload(&big);
        let out = fx.run(&s.build(), ic, XDP_TX, NEW_TOO_BIG)?;
        let pk = verify(&out).map_err(|e| format!("does not verify: {e}"))?;
        let i = pk.icmp.as_ref().ok_or("no ICMP")?;
        ensure(
            i.kind == ICMP_DEST_UNREACH && i.code == ICMP_FRAG_NEEDED,
            || format!("type {} code {}", i.kind, i.code),
        )?;
        ensure(i.rest == SMALL_MTU, || format!("MTU {}", i.rest))?;
        let q = i.quoted.as_ref().ok_or("no quote")?;
        ensure(
            q.src_sock() == Some(c4(p)) && q.dst_sock() == Some(sa(MTU4)),
            || format!("quote {:?} -> {:?}", q.src_sock(), q.dst_sock()),
        )?;
        icmp_checksums_checked(&out)
    });
}

/// Passive counters of every backend of the fixture config, by (service, backend).
fn all_passive(fx: &Fx) -> Result<Vec<(String, PassiveCounters)>, String> {
    let mut v = Vec::new();
    for s in services() {
        for (b, ..) in s.6 {
            let c =
                fx.t.dp
                    .passive_counters(s.0, b)
                    .map_err(|e| format!("{e:#}"))?
                    .ok_or_else(|| format!("backend {b} of {} not applied", s.0))?;
            v.push((format!("{}/{b}", s.0), c));
        }
    }
    Ok(v)
}

/// Runs `f`; then backend `who` (`service/backend`) must have counted exactly `want`
/// (attempts, answered, resets) more, and every other backend nothing.
fn passive_delta(fx: &mut Fx, who: &str, want: (u64, u64, u64), f: impl FnOnce(&mut Fx) -> R) -> R {
    let before = all_passive(fx)?;
    f(fx)?;
    let after = all_passive(fx)?;
    let mut errs = Vec::new();
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        let got = (
            a.attempts.wrapping_sub(b.attempts),
            a.answered.wrapping_sub(b.answered),
            a.resets.wrapping_sub(b.resets),
        );
        let expected = if name == who { want } else { (0, 0, 0) };
        if got != expected {
            errs.push(format!(
                "{name}: (attempts, answered, resets) +{got:?}, expected +{expected:?}"
            ));
        }
    }
    ensure(errs.is_empty(), || errs.join("; "))
}

/// Passive health signals (`PASSIVE_STATS`): attempts (client SYN without ACK), answered
/// (SYN-ACK in a nat reply), resets (RST in a nat reply), per backend; dsr counts attempts only.
fn passive_signals(fx: &mut Fx) {
    let (ic, ib) = (fx.if_c, fx.if_b);
    fx.case("passive_nat_v4_syn_counts_one_attempt", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        passive_delta(fx, "web4/web4-blue", (1, 0, 0), |fx| {
            fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD).map(drop)
        })
    });
    fx.case("passive_nat_v4_retransmitted_syn_counts_again", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        passive_delta(fx, "web4/web4-blue", (2, 0, 0), |fx| {
            fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
            fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD).map(drop)
        })
    });
    fx.case("passive_nat_v4_synack_reply_counts_one_answered", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let r = fx.backend_frame(PROTO_TCP, sa(WEB4_BLUE), c4(p));
        let want = fx.reply_out(&r, sa(WEB4));
        passive_delta(fx, "web4/web4-blue", (0, 1, 0), |fx| {
            fx.expect(&r.build(), ib, XDP_REDIRECT, &want, REVERSE)
        })
    });
    fx.case("passive_nat_v4_rst_reply_counts_one_reset", |fx| {
        // A backend refusing the connection: RST+ACK in answer to the SYN.
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let r = fx
            .backend_frame(PROTO_TCP, sa(WEB4_BLUE), c4(p))
            .flags(TCP_RST | TCP_ACK);
        let want = fx.reply_out(&r, sa(WEB4));
        passive_delta(fx, "web4/web4-blue", (0, 0, 1), |fx| {
            fx.expect(&r.build(), ib, XDP_REDIRECT, &want, REVERSE)
        })
    });
    fx.case("passive_nat_v4_established_counts_nothing", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
        fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
        let a = s
            .flags(TCP_ACK | TCP_PSH)
            .payload(b"GET / HTTP/1.1\r\n\r\n");
        let r = fx
            .backend_frame(PROTO_TCP, sa(WEB4_BLUE), c4(p))
            .flags(TCP_ACK | TCP_PSH)
            .payload(b"HTTP/1.1 200 OK\r\n\r\n");
        let fin = fx
            .backend_frame(PROTO_TCP, sa(WEB4_BLUE), c4(p))
            .flags(TCP_FIN | TCP_ACK);
        passive_delta(fx, "web4/web4-blue", (0, 0, 0), |fx| {
            fx.run(&a.build(), ic, XDP_REDIRECT, HIT_FWD)?;
            fx.run(&r.build(), ib, XDP_REDIRECT, REVERSE)?;
            fx.run(&fin.build(), ib, XDP_REDIRECT, REVERSE).map(drop)
        })
    });
    fx.case(
        "passive_nat_v4_reply_of_another_backend_counts_nothing",
        |fx| {
            // Not a reply of a flow zdd steered to web4-green: passed, and no signal for anyone.
            let p = fx.port();
            let s = fx.client_frame(PROTO_TCP, c4(p), sa(WEB4));
            fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
            let r = fx
                .backend_frame(PROTO_TCP, backend_addr("web4-green"), c4(p))
                .flags(TCP_RST | TCP_ACK)
                .build();
            passive_delta(fx, "web4/web4-green", (0, 0, 0), |fx| {
                fx.untouched(&r, ib, XDP_PASS, PASS)
            })
        },
    );
    fx.case("passive_nat_v6_handshake_and_reset", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c6(p), sa(WEB6));
        let sa_ = fx.backend_frame(PROTO_TCP, sa(WEB6_BE), c6(p));
        let rst = fx
            .backend_frame(PROTO_TCP, sa(WEB6_BE), c6(p))
            .flags(TCP_RST);
        passive_delta(fx, "web6/web6-1", (1, 1, 1), |fx| {
            fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
            fx.run(&sa_.build(), ib, XDP_REDIRECT, REVERSE)?;
            fx.run(&rst.build(), ib, XDP_REDIRECT, REVERSE).map(drop)
        })
    });
    fx.case("passive_nat_udp_counts_nothing", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_UDP, c4(p), sa(DNS4));
        let r = fx.backend_frame(PROTO_UDP, sa(DNS4_BE), c4(p));
        passive_delta(fx, "dns4/none", (0, 0, 0), |fx| {
            fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
            fx.run(&r.build(), ib, XDP_REDIRECT, REVERSE).map(drop)
        })
    });
    fx.case("passive_dsr_counts_attempts_only", |fx| {
        let p = fx.port();
        let s = fx.client_frame(PROTO_TCP, c4(p), sa(DSR4));
        let a = s.clone().flags(TCP_ACK).payload(b"more");
        passive_delta(fx, "dsr4/dsr4-1", (1, 0, 0), |fx| {
            fx.run(&s.build(), ic, XDP_REDIRECT, NEW_FWD)?;
            fx.run(&a.build(), ic, XDP_REDIRECT, HIT_FWD).map(drop)
        })
    });
}
