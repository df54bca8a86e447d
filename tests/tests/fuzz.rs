//! Fuzzing the XDP program through `BPF_PROG_TEST_RUN`: random frames and mutations of valid
//! ones (VIP frames, replies of known nat flows, traffic not for zdd) go through the loaded
//! program, and every result is held to these properties:
//!
//! 1. A frame that is neither addressed to a VIP (by the independent parser of
//!    `zdd_tests::packet`) nor a reply of a nat flow (one whose source is a nat backend in
//!    `ZDD_REPLIES` and whose forward flow is in `ZDD_FLOWS`) comes out untouched with
//!    XDP_PASS; a fragment to a VIP address may instead be dropped, untouched.
//! 2. An altered frame parses, differs from its input only where nat or dsr may write (MACs,
//!    TTL, IP checksum, the translated address and port, the L4 checksum), carries a backend
//!    address (forward) or the VIP (reply), and a TTL equal to or one below the input's.
//! 3. If the input's checksums were right, the altered output's are right; an IPv4 UDP
//!    checksum of 0 stays 0.
//! 4. The verdict is never XDP_ABORTED.
//! 5. ICMP / ICMPv6 errors (valid ones about live flows, in both directions, and mutations of
//!    them) are held to the rules of `icmp.rs`, read by the independent parser: an error of a
//!    translated type (v4 3 and 11, v6 1 to 3) whose quote (within the ICMP message as the IP
//!    length gives it) holds the ports of a live flow — towards the backend (quoted source =
//!    VIP, outer destination = VIP) or towards the client (quoted destination = the nat
//!    backend the flow is pinned to) — must come out translated: it parses, only the fields
//!    of that direction changed (outer destination, TTL, IP checksum and MACs, quoted
//!    address and port, quoted IPv4 header checksum, ICMP checksum; dsr: MACs only), they
//!    hold the backend / the VIP, and each checksum that was right (outer IPv4 header,
//!    ICMP/ICMPv6 with pseudo-header, quoted IPv4 header) is still right. One towards the
//!    backend with TTL ≤ 1 passes untouched. Every other ICMP frame comes out untouched.
//!
//! 6. The counters add up over the run: every XDP_DROP verdict is counted in `drop`, `drop`
//!    is the sum of the drop reasons, `malformed` (passed untouched) never exceeds the frames
//!    that came out untouched with XDP_PASS, and `rewrite_failed` (a frame that parsed but
//!    could not be rewritten) never happens.
//!
//! `ZDD_FUZZ_FRAMES` sets the number of frames (default 200,000), `ZDD_FUZZ_SEED` the seed
//! (printed, so a failure can be replayed).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use aya::maps::HashMap;
use zdd_common::{FlowEntry, FlowKey, Stat, map_names};
use zdd_tests::packet::*;
use zdd_tests::{Lab, LabSpec, Node, require_privileged};

const DEFAULT_FRAMES: u64 = 200_000;
const DEFAULT_SEED: u64 = 0x2dd0_f022_5eed_0001;
const CLIENT_MAC: Mac = [0x02, 0xc1, 0, 0, 0, 0x02];

/// xorshift64*: small, fast, and reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn neigh_mac(ip: IpAddr) -> Mac {
    let o: Vec<u8> = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let n = o.len();
    [
        0x02,
        0x4e,
        if ip.is_ipv4() { 4 } else { 6 },
        o[n - 3],
        o[n - 2],
        o[n - 1],
    ]
}

/// (name, vip, protocol, forwarding, backend, has a neighbour entry)
const SERVICES: &[(&str, &str, &str, &str, &str, bool)] = &[
    (
        "web4",
        "10.0.100.1:80",
        "tcp",
        "nat",
        "10.0.2.11:8080",
        true,
    ),
    (
        "dns4",
        "10.0.100.1:53",
        "udp",
        "nat",
        "10.0.2.13:5353",
        true,
    ),
    (
        "web6",
        "[fd00:100::1]:80",
        "tcp",
        "nat",
        "[fd00:2::11]:8080",
        true,
    ),
    (
        "dns6",
        "[fd00:100::1]:53",
        "udp",
        "nat",
        "[fd00:2::13]:5353",
        true,
    ),
    ("dsr4", "10.0.100.3:80", "tcp", "dsr", "10.0.2.31:80", true),
    (
        "dsr6",
        "[fd00:100::3]:80",
        "tcp",
        "dsr",
        "[fd00:2::31]:80",
        true,
    ),
    (
        "nn4",
        "10.0.100.8:80",
        "tcp",
        "nat",
        "10.0.2.81:8080",
        false,
    ),
];

fn config() -> String {
    let mut s = String::from("[agent]\ninterfaces = [\"eth0\"]\n");
    for (name, vip, proto, fwd, be, _) in SERVICES {
        s += &format!(
            "\n[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"{proto}\"\n\
             forwarding = \"{fwd}\"\nsplit = {{ blue = 100 }}\n\n[[services.backends]]\n\
             name = \"{name}-1\"\naddr = \"{be}\"\ngroup = \"blue\"\n"
        );
    }
    s
}

struct Vip {
    backend: SocketAddr,
    dsr: bool,
}

struct Model {
    /// (VIP address, port, protocol) → service.
    vips: BTreeMap<(IpAddr, u16, u8), Vip>,
    vip_addrs: BTreeSet<IpAddr>,
    backend_ports: BTreeSet<u16>,
    /// nat backend (address:port, protocol) → (service, VIP).
    nat_backends: BTreeMap<(SocketAddr, u8), (&'static str, SocketAddr)>,
    /// (VIP, protocol) → service name.
    service_of: BTreeMap<(SocketAddr, u8), &'static str>,
}

impl Model {
    fn new() -> Model {
        let mut m = Model {
            vips: BTreeMap::new(),
            vip_addrs: BTreeSet::new(),
            backend_ports: BTreeSet::new(),
            nat_backends: BTreeMap::new(),
            service_of: BTreeMap::new(),
        };
        for (name, vip, proto, fwd, be, _) in SERVICES {
            let (vip, be) = (sa(vip), sa(be));
            let proto = if *proto == "tcp" {
                PROTO_TCP
            } else {
                PROTO_UDP
            };
            m.vips.insert(
                (vip.ip(), vip.port(), proto),
                Vip {
                    backend: be,
                    dsr: *fwd == "dsr",
                },
            );
            m.vip_addrs.insert(vip.ip());
            m.service_of.insert((vip, proto), *name);
            if *fwd == "nat" {
                m.backend_ports.insert(be.port());
                m.nat_backends.insert((be, proto), (*name, vip));
            }
        }
        m
    }
}

/// Where the IP header starts, following the data path's rule (one 802.1Q/802.1ad tag).
fn l3_of(f: &[u8]) -> Option<(usize, u16)> {
    if f.len() < 14 {
        return None;
    }
    let et = u16::from_be_bytes([f[12], f[13]]);
    if et == ETH_P_8021Q || et == ETH_P_8021AD {
        if f.len() < 18 {
            return None;
        }
        return Some((18, u16::from_be_bytes([f[16], f[17]])));
    }
    Some((14, et))
}

/// A fragment to a VIP address, read as leniently as the data path reads one (no need for
/// the options or the IPv6 fragment header to be present).
fn fragment_to_vip_addr(f: &[u8], m: &Model) -> bool {
    let Some((l3, et)) = l3_of(f) else {
        return false;
    };
    match et {
        ETH_P_IP if f.len() >= l3 + 20 => {
            let h = &f[l3..];
            let ihl = (h[0] & 0xf) as usize * 4;
            let tot = u16::from_be_bytes([h[2], h[3]]) as usize;
            let frag = u16::from_be_bytes([h[6], h[7]]);
            h[0] >> 4 == 4
                && ihl >= 20
                && tot >= ihl
                && frag & 0x3fff != 0
                && m.vip_addrs
                    .contains(&IpAddr::from([h[16], h[17], h[18], h[19]]))
        }
        ETH_P_IPV6 if f.len() >= l3 + 40 => {
            let h = &f[l3..];
            let mut d = [0u8; 16];
            d.copy_from_slice(&h[24..40]);
            h[0] >> 4 == 6 && h[6] == PROTO_FRAGMENT && m.vip_addrs.contains(&IpAddr::from(d))
        }
        _ => false,
    }
}

/// Recomputes every checksum of a frame that parses whole (after a mutation), so that
/// mutated headers also reach the data path with right checksums.
fn fix_checksums(f: &mut [u8]) {
    let Ok(p) = parse(f) else { return };
    if let Net::V4(h) = &p.net {
        f[p.l3 + 10] = 0;
        f[p.l3 + 11] = 0;
        let c = ipv4_header_checksum(&f[p.l3..p.l3 + h.ihl]);
        f[p.l3 + 10..p.l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    if let (Some(i), true) = (&p.icmp, p.lengths_ok) {
        let end = match &p.net {
            Net::V4(h) => p.l3 + h.tot_len as usize,
            Net::V6(h) => p.l3 + 40 + h.payload_len as usize,
            Net::NotIp => return,
        };
        if let Some(q) = &i.quoted
            && q.src.is_ipv4()
            && q.len >= q.hlen
        {
            f[q.off + 10] = 0;
            f[q.off + 11] = 0;
            let c = ipv4_header_checksum(&f[q.off..q.off + q.hlen]);
            f[q.off + 10..q.off + 12].copy_from_slice(&c.to_be_bytes());
        }
        f[i.off + 2] = 0;
        f[i.off + 3] = 0;
        let c = icmp_checksum(p.src_ip().unwrap(), p.dst_ip().unwrap(), &f[i.off..end]);
        f[i.off + 2..i.off + 4].copy_from_slice(&c.to_be_bytes());
        return;
    }
    let (Some(t), true) = (&p.transport, p.lengths_ok) else {
        return;
    };
    let n = match &p.net {
        Net::V4(h) => h.tot_len as usize - h.ihl,
        Net::V6(h) => h.payload_len as usize,
        Net::NotIp => return,
    };
    let co = t.off + if t.proto == PROTO_TCP { 16 } else { 6 };
    if p.is_udp_v4_no_checksum() {
        return;
    }
    f[co] = 0;
    f[co + 1] = 0;
    let c = l4_checksum(
        p.src_ip().unwrap(),
        p.dst_ip().unwrap(),
        t.proto,
        &f[t.off..t.off + n],
    );
    f[co..co + 2].copy_from_slice(&c.to_be_bytes());
}

fn mutate(r: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut f = base.to_vec();
    let rounds = 1 + r.below(3);
    for _ in 0..rounds {
        let l3 = l3_of(&f).map(|x| x.0).unwrap_or(14);
        let v4 = f.len() > l3 && f[l3] >> 4 == 4;
        let l4 = if v4 {
            l3 + (f[l3] & 0xf) as usize * 4
        } else {
            l3 + 40
        };
        let set = |f: &mut Vec<u8>, at: usize, b: u8| {
            if at < f.len() {
                f[at] = b;
            }
        };
        match r.below(14) {
            0 | 1 => {
                for _ in 0..1 + r.below(4) {
                    let i = r.below(f.len());
                    f[i] ^= 1 << r.below(8);
                }
            }
            2 => {
                let i = r.below(f.len());
                f[i] = r.byte();
            }
            3 => {
                // Truncate (the kernel refuses frames under 14 bytes).
                let n = 14 + r.below(f.len().saturating_sub(14).max(1));
                f.truncate(n);
            }
            4 => {
                let n = r.below(64);
                let extra = r.bytes(n);
                f.extend_from_slice(&extra);
            }
            5 => {
                let any = r.next() as u16;
                let et: u16 = r.pick(&[
                    ETH_P_IP,
                    ETH_P_IPV6,
                    ETH_P_8021Q,
                    ETH_P_8021AD,
                    ETH_P_ARP,
                    any,
                ]);
                let at = if l3 == 18 && r.chance(50) { 16 } else { 12 };
                f[at..at + 2].copy_from_slice(&et.to_be_bytes());
            }
            6 => {
                let any = r.byte();
                let proto = r.pick(&[
                    PROTO_TCP,
                    PROTO_UDP,
                    PROTO_ICMP,
                    PROTO_FRAGMENT,
                    PROTO_HOPOPTS,
                    PROTO_ICMPV6,
                    any,
                ]);
                set(&mut f, l3 + if v4 { 9 } else { 6 }, proto);
            }
            7 => {
                if l3 < f.len() {
                    f[l3] = (f[l3] & 0xf0) | r.below(16) as u8;
                }
            }
            8 => {
                if l4 + 12 < f.len() {
                    f[l4 + 12] = (r.below(16) as u8) << 4 | (f[l4 + 12] & 0xf);
                }
            }
            9 => {
                // IP length fields.
                let at = l3 + if v4 { 2 } else { 4 };
                let any = r.next() as u16;
                let v = r.pick(&[0u16, 19, 20, 39, 40, 41, any, f.len() as u16]);
                if at + 1 < f.len() {
                    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
                }
            }
            10 => {
                if v4 && l3 + 7 < f.len() {
                    let any = r.next() as u16;
                    let v = r.pick(&[0x2000u16, 0x0001, 0x4000, 0x3fff, any]);
                    f[l3 + 6..l3 + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            11 => {
                let ttl = r.pick(&[0u8, 1, 2, 255]);
                set(&mut f, l3 + if v4 { 8 } else { 7 }, ttl);
            }
            12 => {
                // Insert or remove an 802.1Q tag.
                if l3 == 18 && r.chance(50) {
                    f.drain(12..16);
                } else if f.len() >= 14 {
                    f.splice(12..12, [0x81, 0x00, 0x00, r.byte()]);
                }
            }
            _ => {
                // Random bytes after a plausible Ethernet + IP start.
                let keep = r.below(f.len().min(l4 + 4) + 1).max(14);
                f.truncate(keep);
                let n = r.below(80);
                let extra = r.bytes(n);
                f.extend_from_slice(&extra);
            }
        }
        if f.len() < 14 {
            f.resize(14, 0);
        }
    }
    if r.chance(50) {
        fix_checksums(&mut f);
    }
    f
}

/// Valid frames the mutations start from: VIP frames of every service (and their replies, once
/// the flows exist), and frames not for zdd.
fn base_frames(r: &mut Rng, mac_c: Mac, mac_b: Mac) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut fwd = Vec::new();
    let mut replies = Vec::new();
    for (i, (_, vip, proto, fwd_mode, be, _)) in SERVICES.iter().enumerate() {
        let (vip, be) = (sa(vip), sa(be));
        let client: IpAddr = if vip.is_ipv4() {
            "10.0.1.2".parse().unwrap()
        } else {
            "fd00:1::2".parse().unwrap()
        };
        for k in 0..6u16 {
            let c = SocketAddr::new(client, 30_000 + i as u16 * 16 + k);
            let plen = if r.chance(10) { 1000 } else { r.below(40) };
            let payload = r.bytes(plen);
            let mk = |s: SocketAddr, d: SocketAddr| {
                if *proto == "tcp" {
                    FrameSpec::tcp(s, d)
                } else {
                    FrameSpec::udp(s, d)
                }
            };
            let mut s = mk(c, vip).macs(CLIENT_MAC, mac_c).payload(&payload);
            let mut rep = mk(be, c).macs(neigh_mac(be.ip()), mac_b).payload(&payload);
            match k {
                1 => {
                    s = s.vlan(100);
                    rep = rep.vlan(101);
                }
                2 if vip.is_ipv4() => {
                    s = s.ipv4_options(&[1, 1, 0x94, 4, 0, 0]);
                    rep = rep.ipv4_options(&[1, 1, 1, 1]);
                }
                3 if *proto == "udp" && vip.is_ipv4() => {
                    s = s.udp_no_checksum();
                    rep = rep.udp_no_checksum();
                }
                4 if *proto == "tcp" => {
                    s = s.tcp_options(&[2, 4, 5, 0xb4]).flags(TCP_ACK | TCP_PSH);
                    rep = rep.flags(TCP_ACK);
                }
                _ => {}
            }
            fwd.push(s.build());
            if *fwd_mode == "nat" {
                replies.push(rep.build());
            }
        }
    }
    (fwd, replies)
}

fn other_frames(mac_c: Mac) -> Vec<Vec<u8>> {
    let c4 = sa("10.0.1.2:33333");
    let c6 = sa("[fd00:1::2]:33333");
    vec![
        FrameSpec::tcp(c4, sa("10.0.100.1:81"))
            .macs(CLIENT_MAC, mac_c)
            .build(),
        FrameSpec::tcp(c4, sa("10.0.100.99:80"))
            .macs(CLIENT_MAC, mac_c)
            .build(),
        FrameSpec::udp(c4, sa("10.0.100.1:80"))
            .macs(CLIENT_MAC, mac_c)
            .build(),
        FrameSpec::udp(c6, sa("[fd00:100::1]:54"))
            .macs(CLIENT_MAC, mac_c)
            .build(),
        FrameSpec::tcp(c6, sa("[fd00:100::77]:80"))
            .macs(CLIENT_MAC, mac_c)
            .build(),
        FrameSpec::tcp(sa("10.0.2.11:8080"), sa("10.0.1.2:1"))
            .macs(CLIENT_MAC, mac_c)
            .build(),
        FrameSpec::udp(c4, sa("10.0.100.1:53"))
            .ipv4_frag(0x2000)
            .macs(CLIENT_MAC, mac_c)
            .build(),
        FrameSpec::udp(c6, sa("[fd00:100::1]:53"))
            .ipv6_frag(3, false)
            .macs(CLIENT_MAC, mac_c)
            .build(),
        FrameSpec::icmp_echo(c4.ip(), "10.0.100.1".parse().unwrap())
            .macs(CLIENT_MAC, mac_c)
            .build(),
        FrameSpec::icmp_echo(c6.ip(), "fd00:100::1".parse().unwrap())
            .macs(CLIENT_MAC, mac_c)
            .build(),
        arp_request(
            CLIENT_MAC,
            "10.0.1.2".parse().unwrap(),
            "10.0.100.1".parse().unwrap(),
        ),
    ]
}

/// A reply of a nat flow zdd made: the frame comes from a nat backend, and the flow table
/// holds the client's flow to that backend's VIP, pinned to that backend. Returns the VIP.
fn reply_of(t: &mut TestRunner, m: &Model, p: &Packet) -> Option<SocketAddr> {
    let proto = p.proto()?;
    let (svc, vip) = *m.nat_backends.get(&(p.src_sock()?, proto))?;
    let key = flow_key(p.dst_sock()?, vip, proto);
    let id = t.dp.applied().backend_id(svc, &format!("{svc}-1"))?;
    let map = t.dp.ebpf_mut().map(map_names::FLOWS)?;
    let h: HashMap<_, FlowKey, FlowEntry> = HashMap::try_from(map).ok()?;
    let e = h.get(&key, 0).ok()?;
    (e.backend == id).then_some(vip)
}

// ---------------------------------------------------------------------------------------------
// ICMP errors.
// ---------------------------------------------------------------------------------------------

/// The frame's parse, if it is an ICMP message.
fn icmp_view(f: &[u8]) -> Option<Packet> {
    parse(f).ok().filter(|p| p.icmp.is_some())
}

/// What zdd must do with an ICMP frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IcmpExpect {
    /// Not an error about a zdd flow: untouched.
    Untouched,
    /// About a reply the VIP sent: to this backend (nat: translated; dsr: MACs only).
    ToBackend { backend: SocketAddr, dsr: bool },
    /// About what a client sent to a nat backend: the quote gets this VIP back.
    ToClient { vip: SocketAddr },
}

/// The flow `client` → `vip` exists and is pinned to `svc`'s backend.
fn flow_pinned(
    t: &mut TestRunner,
    svc: &str,
    client: SocketAddr,
    vip: SocketAddr,
    proto: u8,
) -> bool {
    let Some(id) = t.dp.applied().backend_id(svc, &format!("{svc}-1")) else {
        return false;
    };
    let Some(map) = t.dp.ebpf_mut().map(map_names::FLOWS) else {
        return false;
    };
    let Ok(h) = HashMap::<_, FlowKey, FlowEntry>::try_from(map) else {
        return false;
    };
    h.get(&flow_key(client, vip, proto), 0)
        .is_ok_and(|e| e.backend == id)
}

fn icmp_expect(t: &mut TestRunner, m: &Model, p: &Packet) -> IcmpExpect {
    let Some(i) = &p.icmp else {
        return IcmpExpect::Untouched;
    };
    // An IP length that does not fit the frame (or leaves no room for the message): the
    // data path counts it malformed and passes it untouched, as the kernel would drop it.
    if !p.lengths_ok {
        return IcmpExpect::Untouched;
    }
    let v6 = matches!(p.net, Net::V6(_));
    let translated_type = if v6 {
        (1..=3).contains(&i.kind)
    } else {
        i.kind == 3 || i.kind == 11
    };
    let Some(q) = i.quoted.as_ref().filter(|_| translated_type) else {
        return IcmpExpect::Untouched;
    };
    let (Some(qs), Some(qd)) = (q.src_sock(), q.dst_sock()) else {
        return IcmpExpect::Untouched;
    };
    if Some(q.src) == p.dst_ip()
        && let Some(vip) = m.vips.get(&(qs.ip(), qs.port(), q.proto))
    {
        let svc = m.service_of[&(qs, q.proto)];
        return if flow_pinned(t, svc, qd, qs, q.proto) {
            IcmpExpect::ToBackend {
                backend: vip.backend,
                dsr: vip.dsr,
            }
        } else {
            IcmpExpect::Untouched
        };
    }
    if let Some(&(svc, vip)) = m.nat_backends.get(&(qd, q.proto))
        && flow_pinned(t, svc, qs, vip, q.proto)
    {
        return IcmpExpect::ToClient { vip };
    }
    IcmpExpect::Untouched
}

/// Byte ranges a translation of ICMP error `p` may change.
fn icmp_writable(p: &Packet, e: IcmpExpect) -> Vec<std::ops::Range<usize>> {
    let (l3, i) = (p.l3, p.icmp.as_ref().unwrap());
    let q = i.quoted.as_ref().unwrap();
    let v6 = matches!(p.net, Net::V6(_));
    let mut w = Vec::with_capacity(8);
    w.push(i.off + 2..i.off + 4);
    if !v6 {
        w.push(q.off + 10..q.off + 12);
    }
    match e {
        IcmpExpect::ToBackend { dsr: true, .. } => return std::iter::once(0..12).collect(),
        IcmpExpect::ToBackend { dsr: false, .. } => {
            w.push(0..12);
            if v6 {
                w.push(l3 + 7..l3 + 8);
                w.push(l3 + 24..l3 + 40);
                w.push(q.off + 8..q.off + 24);
            } else {
                w.push(l3 + 8..l3 + 9);
                w.push(l3 + 10..l3 + 12);
                w.push(l3 + 16..l3 + 20);
                w.push(q.off + 12..q.off + 16);
            }
            w.push(q.l4_off..q.l4_off + 2);
        }
        IcmpExpect::ToClient { .. } => {
            w.push(if v6 {
                q.off + 24..q.off + 40
            } else {
                q.off + 16..q.off + 20
            });
            w.push(q.l4_off + 2..q.l4_off + 4);
        }
        IcmpExpect::Untouched => unreachable!(),
    }
    w
}

/// Property 5 for one ICMP frame (`p` its parse, `e` what it is).
fn check_icmp(
    p: &Packet,
    e: IcmpExpect,
    input: &[u8],
    v: u32,
    out: &[u8],
    tally: &mut Tally,
) -> Result<(), String> {
    tally.icmp_errors += 1;
    let ttl = p.ttl().unwrap();
    let untouched = |what: &str| -> Result<(), String> {
        if out != input {
            return Err(format!("{what} was altered: {}", diff(input, out)));
        }
        if v != XDP_PASS {
            return Err(format!("{what} got {}", verdict_name(v)));
        }
        Ok(())
    };
    match e {
        IcmpExpect::Untouched => return untouched("ICMP frame not about a zdd flow"),
        // nat routes (TTL − 1), so an expiring TTL goes to the kernel untranslated; dsr only
        // switches the frame, as it does ordinary packets.
        IcmpExpect::ToBackend { dsr: false, .. } if ttl <= 1 => {
            return untouched("ICMP error to a nat backend with TTL <= 1");
        }
        _ => {}
    }
    if out == input {
        return Err(format!(
            "ICMP error about a zdd flow ({e:?}) not translated ({})",
            verdict_name(v)
        ));
    }
    tally.icmp_translated += 1;
    let ok_verdict = match e {
        IcmpExpect::ToBackend { .. } => [XDP_TX, XDP_REDIRECT, XDP_PASS].contains(&v),
        _ => v == XDP_PASS,
    };
    if !ok_verdict {
        return Err(format!(
            "translated ICMP error ({e:?}) got {}",
            verdict_name(v)
        ));
    }
    if out.len() != input.len() {
        return Err(format!("length changed: {}", diff(input, out)));
    }
    parse(out).map_err(|e| format!("translated ICMP error does not parse: {e}"))?;
    let o = icmp_view(out).ok_or("translated ICMP error is no ICMP message")?;
    let allowed = icmp_writable(p, e);
    if let Some(i) =
        (0..out.len()).find(|&i| out[i] != input[i] && !allowed.iter().any(|r| r.contains(&i)))
    {
        return Err(format!(
            "byte {i} changed, not a field of this translation ({e:?}): {}",
            diff(input, out)
        ));
    }
    let (qi, qo) = (
        p.quoted().unwrap(),
        o.quoted().ok_or("output quotes nothing")?,
    );
    match e {
        IcmpExpect::ToBackend {
            backend,
            dsr: false,
        } => {
            if o.dst_ip() != Some(backend.ip()) || qo.src_sock() != Some(backend) {
                return Err(format!(
                    "to backend {backend}: outer destination {:?}, quoted source {:?}",
                    o.dst_ip(),
                    qo.src_sock()
                ));
            }
            let want_ttl = if v == XDP_PASS { ttl } else { ttl - 1 };
            if o.ttl() != Some(want_ttl) {
                return Err(format!(
                    "TTL {ttl} became {:?} ({})",
                    o.ttl(),
                    verdict_name(v)
                ));
            }
        }
        IcmpExpect::ToClient { vip }
            if qo.dst_sock() != Some(vip) || qo.src_sock() != qi.src_sock() =>
        {
            return Err(format!(
                "to client: quoted {:?} -> {:?}, expected {:?} -> {vip}",
                qo.src_sock(),
                qo.dst_sock(),
                qi.src_sock()
            ));
        }
        _ => {}
    }
    // Each checksum that was right stays right (read strictly, from the frames themselves).
    let (p, o) = (parse(input).unwrap(), parse(out).unwrap());
    let (p, o) = (&p, &o);
    let (ii, io) = (p.icmp.as_ref().unwrap(), o.icmp.as_ref().unwrap());
    let v4_ok = |x: &Packet| match &x.net {
        Net::V4(h) => h.checksum_ok,
        _ => true,
    };
    if v4_ok(p) && !v4_ok(o) {
        return Err("outer IPv4 header checksum was right, is wrong".into());
    }
    if ii.checksum_ok == Some(true) && io.checksum_ok != Some(true) {
        return Err(format!(
            "ICMP checksum was right, is not: {:?}",
            verify(out).err()
        ));
    }
    if let (Some(qi), Some(qo)) = (p.quoted(), o.quoted())
        && qi.header_checksum_ok == Some(true)
        && qo.header_checksum_ok != Some(true)
    {
        return Err("quoted IPv4 header checksum was right, is wrong".into());
    }
    if verify(input).is_ok() {
        tally.icmp_checked += 1;
        verify(out).map_err(|e| format!("input verified, output does not: {e}"))?;
    }
    Ok(())
}

/// Valid ICMP errors about the base flows (run after them), both directions, and a few about
/// nothing zdd knows.
fn icmp_base_frames(r: &mut Rng, mac_c: Mac, mac_b: Mac) -> Vec<(Vec<u8>, bool)> {
    let mut v = Vec::new();
    for (i, (_, vip, proto, fwd_mode, be, _)) in SERVICES.iter().enumerate() {
        let (vip, be) = (sa(vip), sa(be));
        let v4 = vip.is_ipv4();
        let (client, router_c, router_b): (IpAddr, IpAddr, IpAddr) = if v4 {
            (
                "10.0.1.2".parse().unwrap(),
                "10.0.1.254".parse().unwrap(),
                "10.0.2.254".parse().unwrap(),
            )
        } else {
            (
                "fd00:1::2".parse().unwrap(),
                "fd00:1::fe".parse().unwrap(),
                "fd00:2::fe".parse().unwrap(),
            )
        };
        let dsr = *fwd_mode == "dsr";
        for k in 0..7u16 {
            // k = 6: a client port without a flow.
            let port = if k == 6 {
                29_999
            } else {
                30_000 + i as u16 * 16 + k
            };
            let c = SocketAddr::new(client, port);
            let mk = |s: SocketAddr, d: SocketAddr| {
                if *proto == "tcp" {
                    FrameSpec::tcp(s, d).flags(TCP_SYN | TCP_ACK)
                } else {
                    FrameSpec::udp(s, d)
                }
            };
            let plen = r.below(40);
            let payload = r.bytes(plen);
            let mut sent = mk(vip, c).payload(&payload).ttl(63);
            let mut fwd = mk(c, if dsr { vip } else { be }).payload(&payload).ttl(63);
            if k == 2 && v4 {
                sent = sent.ipv4_options(&[1, 1, 1, 1]);
                fwd = fwd.ipv4_options(&[0x94, 4, 0, 0]);
            }
            let len = r.pick(&[Some(8), None, Some(4), Some(20)]);
            let kinds: &[(u8, u8)] = if v4 {
                &[(3, 4), (11, 0), (3, 3), (3, 1)]
            } else {
                &[(2, 0), (3, 0), (1, 4), (1, 0)]
            };
            let (kind, code) = r.pick(kinds);
            let mtu = r.pick(&[1280u32, 1400, 1500, 576]);
            let mut to_vip = FrameSpec::icmp_error(
                router_c,
                vip.ip(),
                kind,
                code,
                mtu,
                &quote(&sent.ip_packet(), len),
            )
            .macs(CLIENT_MAC, mac_c);
            let mut to_client = FrameSpec::icmp_error(
                router_b,
                client,
                kind,
                code,
                mtu,
                &quote(&fwd.ip_packet(), len),
            )
            .macs(neigh_mac(router_b), mac_b);
            if k == 1 {
                to_vip = to_vip.vlan(100);
                to_client = to_client.vlan(101);
            }
            if k == 3 && v4 {
                to_vip = to_vip.ipv4_options(&[1, 1, 1, 1]);
            }
            v.push((to_vip.build(), false));
            if !dsr {
                v.push((to_client.build(), true));
            }
        }
        // An echo whose data looks like a quote of a live flow.
        let c = SocketAddr::new(client, 30_000 + i as u16 * 16);
        let sent = FrameSpec::udp(vip, c).ttl(63);
        let echo = if v4 { ICMP_ECHO } else { ICMPV6_ECHO_REQUEST };
        v.push((
            FrameSpec::icmp_error(router_c, vip.ip(), echo, 0, 0x10001, &sent.ip_packet())
                .macs(CLIENT_MAC, mac_c)
                .build(),
            false,
        ));
    }
    v
}

/// Mutations aimed at the fields of an ICMP error and its quote.
fn mutate_icmp(r: &mut Rng, m: &Model, base: &[u8]) -> Vec<u8> {
    let mut f = base.to_vec();
    let Ok(p) = parse(&f) else { return f };
    let (Some(i), v6) = (p.icmp.clone(), matches!(p.net, Net::V6(_))) else {
        return f;
    };
    let q = i.quoted.clone();
    let qoff = i.off + 8;
    let addrs: Vec<IpAddr> = m
        .vip_addrs
        .iter()
        .copied()
        .chain(m.nat_backends.keys().map(|(b, _)| b.ip()))
        .chain(["10.0.1.2".parse().unwrap(), "fd00:1::2".parse().unwrap()])
        .filter(|a| a.is_ipv6() == v6)
        .collect();
    let put_addr = |f: &mut Vec<u8>, at: usize, a: IpAddr| {
        let b: Vec<u8> = match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        if at + b.len() <= f.len() {
            f[at..at + b.len()].copy_from_slice(&b);
        }
    };
    let set = |f: &mut Vec<u8>, at: usize, b: u8| {
        if at < f.len() {
            f[at] = b;
        }
    };
    let (hlen, ql4) = q.as_ref().map_or(
        (if v6 { 40 } else { 20 }, qoff + if v6 { 40 } else { 20 }),
        |q| (q.hlen, q.l4_off),
    );
    for _ in 0..1 + r.below(2) {
        match r.below(11) {
            0 => {
                let any = r.byte();
                let kind = if v6 {
                    r.pick(&[1, 2, 3, 4, 128, 129, any])
                } else {
                    r.pick(&[3, 11, 4, 5, 12, 0, 8, any])
                };
                set(&mut f, i.off, kind);
                if r.chance(30) {
                    let code = r.byte();
                    set(&mut f, i.off + 1, code);
                }
            }
            1 => {
                let n = qoff + r.below(hlen + 9);
                f.truncate(n.max(14));
            }
            2 => {
                let b = (r.below(16) as u8) << 4;
                if qoff < f.len() {
                    f[qoff] = b | (f[qoff] & 0xf);
                }
            }
            3 => {
                if v6 {
                    let any = r.byte();
                    let nh = r.pick(&[
                        PROTO_TCP,
                        PROTO_UDP,
                        PROTO_ICMPV6,
                        PROTO_FRAGMENT,
                        PROTO_HOPOPTS,
                        any,
                    ]);
                    set(&mut f, qoff + 6, nh);
                } else if qoff < f.len() {
                    f[qoff] = (f[qoff] & 0xf0) | r.below(16) as u8;
                }
            }
            4 if !v6 => {
                let any = r.byte();
                let pr = r.pick(&[PROTO_TCP, PROTO_UDP, PROTO_ICMP, any]);
                set(&mut f, qoff + 9, pr);
            }
            5 => {
                let at = ql4 + 2 * r.below(2);
                if at + 2 <= f.len() {
                    let old = u16::from_be_bytes([f[at], f[at + 1]]);
                    let any = r.next() as u16;
                    let new = r.pick(&[
                        old.wrapping_add(1),
                        old.wrapping_sub(1),
                        any,
                        80,
                        53,
                        8080,
                        5353,
                    ]);
                    f[at..at + 2].copy_from_slice(&new.to_be_bytes());
                }
            }
            6 => {
                let a = r.pick(&addrs);
                let at = qoff
                    + if v6 {
                        8 + 16 * r.below(2)
                    } else {
                        12 + 4 * r.below(2)
                    };
                put_addr(&mut f, at, a);
            }
            7 => {
                let a = r.pick(&addrs);
                put_addr(&mut f, p.l3 + if v6 { 24 } else { 16 }, a);
            }
            8 => {
                let ttl = r.pick(&[0u8, 1, 2, 255]);
                set(&mut f, p.l3 + if v6 { 7 } else { 8 }, ttl);
            }
            9 => {
                // The IP length ends inside the quote (the rest stays in the frame).
                let end = qoff + r.below(hlen + 9);
                let (at, v) = if v6 {
                    (p.l3 + 4, end.saturating_sub(p.l3 + 40))
                } else {
                    (p.l3 + 2, end - p.l3)
                };
                f[at..at + 2].copy_from_slice(&(v as u16).to_be_bytes());
            }
            _ => {
                if !v6 && qoff + 8 <= f.len() {
                    let any = r.next() as u16;
                    let v = r.pick(&[0x2000u16, 0x0001, 0x4000, any]);
                    f[qoff + 6..qoff + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
        }
    }
    if r.chance(60) {
        fix_checksums(&mut f);
    }
    f
}

/// Byte offsets a rewrite of `p` may change.
fn writable(p: &Packet, forward: bool, reply: bool) -> Vec<std::ops::Range<usize>> {
    let mut w = Vec::with_capacity(8);
    w.push(0..12); // MACs
    let l3 = p.l3;
    let t = p
        .transport
        .as_ref()
        .expect("only TCP/UDP frames are rewritten");
    match &p.net {
        Net::V4(_) => {
            w.push(l3 + 8..l3 + 9);
            w.push(l3 + 10..l3 + 12);
            if forward {
                w.push(l3 + 16..l3 + 20);
            }
            if reply {
                w.push(l3 + 12..l3 + 16);
            }
        }
        Net::V6(_) => {
            w.push(l3 + 7..l3 + 8);
            if forward {
                w.push(l3 + 24..l3 + 40);
            }
            if reply {
                w.push(l3 + 8..l3 + 24);
            }
        }
        Net::NotIp => unreachable!(),
    }
    if forward {
        w.push(t.off + 2..t.off + 4);
    }
    if reply {
        w.push(t.off..t.off + 2);
    }
    let c = t.off + if t.proto == PROTO_TCP { 16 } else { 6 };
    w.push(c..c + 2);
    w
}

struct Tally {
    frames: u64,
    verdicts: [u64; 5],
    altered: u64,
    altered_checked: u64,
    vip: u64,
    replies: u64,
    icmp_errors: u64,
    icmp_translated: u64,
    icmp_checked: u64,
    /// Frames that came out untouched with XDP_PASS.
    untouched_pass: u64,
    failures: Vec<String>,
    failed: u64,
    /// Growth of every counter over the run, in `Stat::ALL` order.
    counters: Vec<u64>,
}

fn check(
    t: &mut TestRunner,
    m: &Model,
    input: &[u8],
    ingress: u32,
    tally: &mut Tally,
) -> Result<(), String> {
    let p = parse(input).ok().filter(|p| p.transport.is_some());
    let vip = p.as_ref().and_then(|p| {
        m.vips
            .get(&(p.dst_ip()?, p.transport.as_ref()?.dport, p.proto()?))
    });
    let rev = match &p {
        Some(p)
            if m.backend_ports
                .contains(&p.transport.as_ref().unwrap().sport) =>
        {
            reply_of(t, m, p)
        }
        _ => None,
    };
    let icmp = icmp_view(input);
    let icmp_e = icmp.as_ref().map(|p| icmp_expect(t, m, p));
    let frag_vip = fragment_to_vip_addr(input, m);
    let (v, out) = t.run(input, ingress).map_err(|e| format!("{e:#}"))?;
    tally.frames += 1;
    tally.verdicts[(v as usize).min(4)] += 1;
    tally.vip += vip.is_some() as u64;
    tally.replies += rev.is_some() as u64;
    tally.untouched_pass += (v == XDP_PASS && out == input) as u64;
    if v > XDP_REDIRECT || v == XDP_ABORTED {
        return Err(format!("verdict {}", verdict_name(v)));
    }
    if let (Some(p), Some(e)) = (&icmp, icmp_e) {
        return check_icmp(p, e, input, v, &out, tally);
    }
    if vip.is_none() && rev.is_none() {
        if out != input {
            return Err(format!(
                "frame not for zdd was altered: {}",
                diff(input, &out)
            ));
        }
        let ok = v == XDP_PASS || (frag_vip && v == XDP_DROP);
        if !ok {
            return Err(format!(
                "frame not for zdd got {} (fragment to a VIP address: {frag_vip})",
                verdict_name(v)
            ));
        }
        return Ok(());
    }
    if out == input {
        return Ok(());
    }
    tally.altered += 1;
    let p = p.unwrap();
    if out.len() != input.len() {
        return Err(format!("length changed: {}", diff(input, &out)));
    }
    let q = parse(&out).map_err(|e| format!("altered frame does not parse: {e}"))?;
    let allowed = writable(&p, vip.is_some(), rev.is_some());
    if let Some(i) =
        (0..out.len()).find(|&i| out[i] != input[i] && !allowed.iter().any(|r| r.contains(&i)))
    {
        return Err(format!(
            "byte {i} changed, not a rewritable field: {}",
            diff(input, &out)
        ));
    }
    let (tin, tout) = (p.ttl().unwrap(), q.ttl().unwrap());
    if tout != tin && tout != tin.wrapping_sub(1) {
        return Err(format!("TTL {tin} became {tout}"));
    }
    let fwd_ok = vip.is_some_and(|s| {
        let d = q.dst_sock().unwrap();
        d == p.dst_sock().unwrap() || (!s.dsr && d == s.backend)
    });
    let rev_ok = rev.is_some_and(|vip| {
        let s = q.src_sock().unwrap();
        s == vip || s == p.src_sock().unwrap()
    });
    if !(fwd_ok || rev_ok) {
        return Err(format!(
            "rewritten to {:?} -> {:?}, not a backend/VIP of this flow",
            q.src_sock(),
            q.dst_sock()
        ));
    }
    if p.is_udp_v4_no_checksum() && !q.is_udp_v4_no_checksum() {
        return Err("IPv4 UDP checksum 0 was changed".into());
    }
    if verify(input).is_ok() {
        tally.altered_checked += 1;
        verify(&out).map_err(|e| format!("input verified, output does not: {e}"))?;
    }
    Ok(())
}

#[test]
fn fuzz_frames_through_the_program() {
    require_privileged!();
    let frames: u64 = std::env::var("ZDD_FUZZ_FRAMES")
        .ok()
        .map(|v| {
            v.replace('_', "")
                .parse()
                .expect("ZDD_FUZZ_FRAMES: a number")
        })
        .unwrap_or(DEFAULT_FRAMES);
    let seed: u64 = std::env::var("ZDD_FUZZ_SEED")
        .ok()
        .map(|v| {
            let v = v.trim();
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(&h.replace('_', ""), 16),
                None => v.replace('_', "").parse(),
            }
            .expect("ZDD_FUZZ_SEED: a number (decimal or 0x hex)")
        })
        .unwrap_or(DEFAULT_SEED);
    println!(
        "zdd fuzz: {frames} frames, seed {seed:#x} (replay with ZDD_FUZZ_SEED={seed:#x} ZDD_FUZZ_FRAMES={frames})"
    );
    let lab = Lab::new(LabSpec::default().with_backends(Vec::<(String, String)>::new()))
        .expect("building the lab");
    let tally = lab.in_ns(Node::Edge, || run(&lab, frames, seed));
    println!(
        "zdd fuzz: {} frames in {:.1?} ({:.1} us/frame); verdicts drop {} pass {} tx {} redirect {}; \
         to a VIP {}, known replies {}, altered {} ({} with checked checksums); ICMP {} \
         (translated {}, {} with checked checksums); {} failed",
        tally.0.frames,
        tally.1,
        tally.1.as_secs_f64() * 1e6 / tally.0.frames.max(1) as f64,
        tally.0.verdicts[1],
        tally.0.verdicts[2],
        tally.0.verdicts[3],
        tally.0.verdicts[4],
        tally.0.vip,
        tally.0.replies,
        tally.0.altered,
        tally.0.altered_checked,
        tally.0.icmp_errors,
        tally.0.icmp_translated,
        tally.0.icmp_checked,
        tally.0.failed,
    );
    for f in &tally.0.failures {
        println!("\n{f}");
    }
    assert!(
        tally.0.failures.is_empty(),
        "{} of {} frames broke a property (seed {seed:#x}); first: {}",
        tally.0.failed,
        tally.0.frames,
        tally.0.failures[0]
    );
    assert_eq!(tally.0.frames, frames);
    // Property 6: counters that mean one thing each.
    let grew = |s: Stat| tally.0.counters[s as usize];
    let reasons = [
        Stat::Fragment,
        Stat::NoBackend,
        Stat::FibFailure,
        Stat::Unresolved,
        Stat::RewriteFailed,
        Stat::TooBigDropped,
    ];
    assert_eq!(
        grew(Stat::Drop),
        tally.0.verdicts[XDP_DROP as usize],
        "every XDP_DROP verdict is counted in `drop`"
    );
    assert_eq!(
        grew(Stat::Drop),
        reasons.iter().map(|r| grew(*r)).sum::<u64>(),
        "`drop` is the sum of the drop reasons {reasons:?}"
    );
    assert!(
        grew(Stat::Malformed) <= tally.0.untouched_pass,
        "`malformed` grew by {}, but only {} frames came out untouched with XDP_PASS",
        grew(Stat::Malformed),
        tally.0.untouched_pass
    );
    assert_eq!(
        grew(Stat::RewriteFailed),
        0,
        "a parsed frame could not be rewritten"
    );
    assert!(
        tally.0.altered_checked > 0,
        "no altered frame had right checksums: weak run"
    );
    assert!(
        tally.0.icmp_checked > 0,
        "no translated ICMP error had right checksums: weak run"
    );
}

fn run(lab: &Lab, frames: u64, seed: u64) -> (Tally, std::time::Duration) {
    let mut t = TestRunner::load("fuzz", 65_536).expect("loading");
    t.apply_toml(&config()).expect("applying");
    let if_c = lab.ifindex(Node::Edge, "eth0").unwrap();
    let if_b = lab.ifindex(Node::Edge, "eth1").unwrap();
    let mac_c = lab.mac(Node::Edge, "eth0").unwrap();
    let mac_b = lab.mac(Node::Edge, "eth1").unwrap();
    let neigh = |ip: IpAddr, dev: &str| {
        lab.set_neighbour(Node::Edge, ip, neigh_mac(ip), dev)
            .unwrap()
    };
    for (.., be, has) in SERVICES {
        if *has {
            neigh(sa(be).ip(), "eth1");
        }
    }
    neigh("10.0.1.2".parse().unwrap(), "eth0");
    neigh("fd00:1::2".parse().unwrap(), "eth0");

    let model = Model::new();
    let mut r = Rng::new(seed);
    let (fwd, replies) = base_frames(&mut r, mac_c, mac_b);
    let others = other_frames(mac_c);
    let icmp = icmp_base_frames(&mut r, mac_c, mac_b);
    let mut tally = Tally {
        frames: 0,
        verdicts: [0; 5],
        altered: 0,
        altered_checked: 0,
        vip: 0,
        replies: 0,
        icmp_errors: 0,
        icmp_translated: 0,
        icmp_checked: 0,
        untouched_pass: 0,
        failures: Vec::new(),
        failed: 0,
        counters: Vec::new(),
    };
    let before = t.stats();
    // The base frames themselves first: this creates the flows whose replies are fuzzed.
    let started = Instant::now();
    let record = |tally: &mut Tally, i: u64, input: &[u8], ingress: u32, e: String| {
        tally.failed += 1;
        if tally.failures.len() < 10 {
            tally.failures.push(format!(
                "frame #{i} (ingress {ingress}): {e}\n  input {}",
                hex(input)
            ));
        }
    };
    let mut i = 0u64;
    for f in fwd.iter().chain(&others) {
        if let Err(e) = check(&mut t, &model, f, if_c, &mut tally) {
            record(&mut tally, i, f, if_c, e);
        }
        i += 1;
    }
    for f in &replies {
        if let Err(e) = check(&mut t, &model, f, if_b, &mut tally) {
            record(&mut tally, i, f, if_b, e);
        }
        i += 1;
    }
    for (f, from_b) in &icmp {
        let ingress = if *from_b { if_b } else { if_c };
        if let Err(e) = check(&mut t, &model, f, ingress, &mut tally) {
            record(&mut tally, i, f, ingress, e);
        }
        i += 1;
    }
    while i < frames {
        let (input, ingress) = match r.below(13) {
            0..=3 => {
                let b = r.below(fwd.len());
                (mutate(&mut r, &fwd[b]), if_c)
            }
            4..=6 => {
                let b = r.below(replies.len());
                (mutate(&mut r, &replies[b]), if_b)
            }
            7 | 8 => {
                let b = r.below(others.len());
                (mutate(&mut r, &others[b]), if_c)
            }
            9 => {
                let n = 14 + r.below(120);
                (r.bytes(n), if r.chance(50) { if_c } else { if_b })
            }
            _ => {
                let (b, from_b) = &icmp[r.below(icmp.len())];
                let f = match r.below(10) {
                    0 => b.clone(),
                    1..=6 => mutate_icmp(&mut r, &model, b),
                    _ => mutate(&mut r, b),
                };
                (f, if *from_b { if_b } else { if_c })
            }
        };
        if let Err(e) = check(&mut t, &model, &input, ingress, &mut tally) {
            record(&mut tally, i, &input, ingress, e);
        }
        i += 1;
    }
    let after = t.stats();
    tally.counters = before.iter().zip(&after).map(|(b, a)| a - b).collect();
    (tally, started.elapsed())
}
