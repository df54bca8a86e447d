//! Frames for the data-path fixtures and the fuzz test (`tests/tests/fixtures.rs`,
//! `tests/tests/fuzz.rs`), Katran-style: a frame goes into `BPF_PROG_TEST_RUN`, a verdict and a
//! frame come out, and both are compared byte for byte with what is expected.
//!
//! - [`FrameSpec`] builds Ethernet frames (one optional 802.1Q tag; IPv4 with options and
//!   fragment fields, or IPv6 with an optional fragment header; TCP, UDP, ICMP echo, or an
//!   ICMP / ICMPv6 error quoting a packet: [`FrameSpec::icmp_error`], [`quote`]).
//! - [`parse`] reads a frame back, independently of the data path, and [`verify`] checks that
//!   it is whole and that every checksum is right (for ICMP errors also the ICMP/ICMPv6
//!   checksum and the quoted IPv4 header's checksum).
//!
//! Checksums are computed here in full, from the definitions (RFC 1071 sum; IPv4 header RFC 791;
//! TCP RFC 793 and UDP RFC 768 with the IPv4 pseudo-header; RFC 8200 §8.1 for the IPv6
//! pseudo-header), never incrementally as the data path does, so the two cannot share a mistake.
//!
//! The end of this file holds [`TestRunner`]: the XDP program loaded as the agent loads it, and
//! one `BPF_PROG_TEST_RUN` call per frame.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use zdd_agent::maps::{Dataplane, LoadOptions};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const PROTO_HOPOPTS: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_FRAGMENT: u8 = 44;
pub const PROTO_ICMPV6: u8 = 58;

/// ICMP types (RFC 792) and the codes the fixtures use.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_SOURCE_QUENCH: u8 = 4;
pub const ICMP_REDIRECT: u8 = 5;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROB: u8 = 12;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 types (RFC 4443).
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
pub const ICMPV6_TIME_EXCEED: u8 = 3;
pub const ICMPV6_PARAMPROB: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// XDP verdicts (enum xdp_action).
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn verdict_name(v: u32) -> String {
    match v {
        XDP_ABORTED => "XDP_ABORTED".into(),
        XDP_DROP => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        XDP_TX => "XDP_TX".into(),
        XDP_REDIRECT => "XDP_REDIRECT".into(),
        n => format!("verdict {n}"),
    }
}

pub type Mac = [u8; 6];

// ---------------------------------------------------------------------------------------------
// Checksums, in full (RFC 1071).
// ---------------------------------------------------------------------------------------------

/// Adds the big-endian 16-bit words of `data` to `acc` (an odd last byte is padded with a zero
/// byte on its right, RFC 1071 §4.1). Not folded.
pub fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    if let [last] = words.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

/// Folds the carries back in: the 16-bit ones' complement sum.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Sum of the TCP/UDP pseudo-header: IPv4 (RFC 793 §3.1, RFC 768) or IPv6 (RFC 8200 §8.1).
fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize) -> u64 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = Vec::with_capacity(12);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.push(0);
            p.push(proto);
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            sum_words(&p, 0)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = Vec::with_capacity(40);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(l4_len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
            sum_words(&p, 0)
        }
        _ => panic!("pseudo-header of mixed families"),
    }
}

/// The checksum field value for an IPv4 header whose checksum field is zero (RFC 791).
pub fn ipv4_header_checksum(header: &[u8]) -> u16 {
    !fold(sum_words(header, 0))
}

/// The checksum field value for a TCP/UDP segment whose checksum field is zero.
/// UDP's computed 0 is sent as 0xffff (RFC 768: 0 means "no checksum").
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let c = !fold(sum_words(
        segment,
        pseudo_sum(src, dst, proto, segment.len()),
    ));
    if proto == PROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// The checksum field value for an ICMP message (RFC 792: the message alone) or ICMPv6 message
/// (RFC 4443 §2.3: with the IPv6 pseudo-header) whose checksum field is zero.
pub fn icmp_checksum(src: IpAddr, dst: IpAddr, message: &[u8]) -> u16 {
    let acc = if src.is_ipv6() {
        pseudo_sum(src, dst, PROTO_ICMPV6, message.len())
    } else {
        0
    };
    !fold(sum_words(message, acc))
}

/// True when the segment (checksum field included) sums to all ones with its pseudo-header.
pub fn l4_checksum_ok(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> bool {
    fold(sum_words(
        segment,
        pseudo_sum(src, dst, proto, segment.len()),
    )) == 0xffff
}

// ---------------------------------------------------------------------------------------------
// Building frames.
// ---------------------------------------------------------------------------------------------

/// An IPv6 fragment header (RFC 8200 §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V6Frag {
    /// Offset in 8-byte units.
    pub offset: u16,
    pub more: bool,
    pub id: u32,
}

/// The body of an ICMP / ICMPv6 error (RFC 792, RFC 4443 §3): type, code, the 32 bits after
/// the checksum (unused, next-hop MTU, pointer), then the quoted packet (an IP packet, usually
/// cut short; see [`quote`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpError {
    pub kind: u8,
    pub code: u8,
    pub rest: u32,
    pub quoted: Vec<u8>,
}

/// The first `transport_bytes` bytes after the IP header of `ip_packet` (an IPv4 datagram with
/// its options, or an IPv6 packet whose transport header follows the fixed header), with that
/// header: what an ICMP error quotes. `None` quotes the whole packet. RFC 792 routers quote 8.
pub fn quote(ip_packet: &[u8], transport_bytes: Option<usize>) -> Vec<u8> {
    let hlen = match ip_packet[0] >> 4 {
        4 => (ip_packet[0] & 0xf) as usize * 4,
        _ => 40,
    };
    let n = transport_bytes.map_or(ip_packet.len(), |t| (hlen + t).min(ip_packet.len()));
    ip_packet[..n].to_vec()
}

/// Bytes of the original IP packet that zdd's own "too big" errors quote: the longest IPv4
/// header and 8 bytes (RFC 792's minimum for any header length); for IPv6 as much as fits in
/// the minimum MTU, 1280 − 40 − 8 (RFC 4443).
pub const TOO_BIG_QUOTE_V4: usize = 68;
pub const TOO_BIG_QUOTE_V6: usize = 1232;

/// What zdd answers to `original` (a frame as it arrived) when it is larger than the MTU
/// `mtu` towards its next hop: ICMP fragmentation needed (IPv4) / packet too big (IPv6) from
/// `from` (zdd uses the frame's destination) to the frame's sender, quoting the start of the original IP packet (see
/// [`TOO_BIG_QUOTE_V4`]), sent back to the MAC it came from, VLAN tag kept. Its IPv4 header:
/// DF, id 0, TOS 0, TTL 64; IPv6: traffic class and flow label 0, hop limit 64.
pub fn too_big_answer(original: &FrameSpec, from: IpAddr, mtu: u32) -> FrameSpec {
    let ip = original.ip_packet();
    let mut s = if from.is_ipv4() {
        let q = &ip[..TOO_BIG_QUOTE_V4.min(ip.len())];
        FrameSpec::frag_needed(from, original.src, mtu as u16, q)
    } else {
        let q = &ip[..TOO_BIG_QUOTE_V6.min(ip.len())];
        FrameSpec::packet_too_big(from, original.src, mtu, q)
    };
    s.ip_id = 0;
    s.ipv4_frag = 0x4000;
    s.tos = 0;
    s.ttl = 64;
    s.flow_label = 0;
    s.vlan = original.vlan;
    s.macs(original.dst_mac, original.src_mac)
}

/// Offset, inside a quoted IPv4/IPv6 packet (as [`quote`] returns it), of its TCP or UDP
/// checksum field, if the quote reaches the whole field.
pub fn quoted_l4_checksum_at(quoted: &[u8]) -> Option<usize> {
    let (hlen, proto) = match quoted.first()? >> 4 {
        4 if quoted.len() >= 20 => ((quoted[0] & 0xf) as usize * 4, quoted[9]),
        6 if quoted.len() >= 40 => (40, quoted[6]),
        _ => return None,
    };
    let at = hlen
        + match proto {
            PROTO_TCP => 16,
            PROTO_UDP => 6,
            _ => return None,
        };
    (at + 2 <= quoted.len()).then_some(at)
}

/// Everything of a frame that a fixture may want to set. Build with [`FrameSpec::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    /// 802.1Q tag control information (PCP, DEI, VLAN id), if tagged.
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP, UDP, or ICMP / ICMPv6 (an echo request: `sport` is its identifier, `dport` its
    /// sequence number).
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    pub tcp_window: u16,
    /// TCP options (padded with zeros to a multiple of 4).
    pub tcp_options: Vec<u8>,
    /// TTL or hop limit.
    pub ttl: u8,
    pub tos: u8,
    pub ip_id: u16,
    /// IPv4 flags and fragment offset, as on the wire (0x4000 = DF, 0x2000 = MF).
    pub ipv4_frag: u16,
    /// IPv4 options (padded with zeros to a multiple of 4).
    pub ipv4_options: Vec<u8>,
    pub ipv6_frag: Option<V6Frag>,
    pub flow_label: u32,
    /// IPv4 UDP only: send checksum 0 ("not computed").
    pub udp_no_checksum: bool,
    pub payload: Vec<u8>,
    /// ICMP / ICMPv6 only: an error message instead of an echo request (then `sport`, `dport`
    /// and `payload` are not used).
    pub icmp_error: Option<IcmpError>,
}

/// MACs the builder uses unless told otherwise.
pub const DEFAULT_SRC_MAC: Mac = [0x02, 0xc1, 0, 0, 0, 0x01];
pub const DEFAULT_DST_MAC: Mac = [0x02, 0xed, 0, 0, 0, 0x01];

impl FrameSpec {
    fn new(proto: u8, src: SocketAddr, dst: SocketAddr) -> Self {
        assert_eq!(src.is_ipv4(), dst.is_ipv4(), "one family per frame");
        FrameSpec {
            dst_mac: DEFAULT_DST_MAC,
            src_mac: DEFAULT_SRC_MAC,
            vlan: None,
            src: src.ip(),
            dst: dst.ip(),
            proto,
            sport: src.port(),
            dport: dst.port(),
            tcp_flags: if proto == PROTO_TCP { TCP_SYN } else { 0 },
            tcp_seq: 0x1234_5678,
            tcp_ack: 0,
            tcp_window: 64_240,
            tcp_options: Vec::new(),
            ttl: 64,
            tos: 0,
            ip_id: 0x4242,
            ipv4_frag: 0,
            ipv4_options: Vec::new(),
            ipv6_frag: None,
            flow_label: 0x12345,
            udp_no_checksum: false,
            payload: b"zdd fixture payload".to_vec(),
            icmp_error: None,
        }
    }

    /// A TCP SYN.
    pub fn tcp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self::new(PROTO_TCP, src, dst)
    }

    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self::new(PROTO_UDP, src, dst)
    }

    /// An ICMP (IPv4) or ICMPv6 echo request.
    pub fn icmp_echo(src: IpAddr, dst: IpAddr) -> Self {
        let proto = if src.is_ipv4() {
            PROTO_ICMP
        } else {
            PROTO_ICMPV6
        };
        Self::new(proto, SocketAddr::new(src, 0x77), SocketAddr::new(dst, 1))
    }

    /// An ICMP (IPv4) or ICMPv6 error from `src` to `dst` quoting `quoted` (see [`quote`]).
    pub fn icmp_error(
        src: IpAddr,
        dst: IpAddr,
        kind: u8,
        code: u8,
        rest: u32,
        quoted: &[u8],
    ) -> Self {
        let mut s = Self::icmp_echo(src, dst);
        s.icmp_error = Some(IcmpError {
            kind,
            code,
            rest,
            quoted: quoted.to_vec(),
        });
        s
    }

    /// ICMP destination unreachable, fragmentation needed (type 3 code 4), next-hop MTU `mtu`.
    pub fn frag_needed(src: IpAddr, dst: IpAddr, mtu: u16, quoted: &[u8]) -> Self {
        Self::icmp_error(
            src,
            dst,
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            mtu as u32,
            quoted,
        )
    }

    /// ICMPv6 packet too big (type 2), MTU `mtu`.
    pub fn packet_too_big(src: IpAddr, dst: IpAddr, mtu: u32, quoted: &[u8]) -> Self {
        Self::icmp_error(src, dst, ICMPV6_PKT_TOOBIG, 0, mtu, quoted)
    }

    /// ICMP time exceeded (type 11) or ICMPv6 time exceeded (type 3), in transit (code 0).
    pub fn time_exceeded(src: IpAddr, dst: IpAddr, quoted: &[u8]) -> Self {
        let kind = if src.is_ipv4() {
            ICMP_TIME_EXCEEDED
        } else {
            ICMPV6_TIME_EXCEED
        };
        Self::icmp_error(src, dst, kind, 0, 0, quoted)
    }

    /// Replaces the quoted packet of an ICMP error.
    pub fn quoted(mut self, q: &[u8]) -> Self {
        self.icmp_error
            .as_mut()
            .expect("quoted(): not an ICMP error")
            .quoted = q.to_vec();
        self
    }

    pub fn macs(mut self, src: Mac, dst: Mac) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }
    pub fn vlan(mut self, tci: u16) -> Self {
        self.vlan = Some(tci);
        self
    }
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }
    pub fn flags(mut self, f: u8) -> Self {
        self.tcp_flags = f;
        self
    }
    pub fn ipv4_options(mut self, o: &[u8]) -> Self {
        self.ipv4_options = o.to_vec();
        self
    }
    pub fn tcp_options(mut self, o: &[u8]) -> Self {
        self.tcp_options = o.to_vec();
        self
    }
    pub fn ipv4_frag(mut self, field: u16) -> Self {
        self.ipv4_frag = field;
        self
    }
    pub fn ipv6_frag(mut self, offset: u16, more: bool) -> Self {
        self.ipv6_frag = Some(V6Frag {
            offset,
            more,
            id: 0xabcd_0001,
        });
        self
    }
    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }
    pub fn udp_no_checksum(mut self) -> Self {
        self.udp_no_checksum = true;
        self
    }
    pub fn src(mut self, a: SocketAddr) -> Self {
        self.src = a.ip();
        self.sport = a.port();
        self
    }
    pub fn dst(mut self, a: SocketAddr) -> Self {
        self.dst = a.ip();
        self.dport = a.port();
        self
    }

    pub fn src_sock(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.sport)
    }
    pub fn dst_sock(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dport)
    }

    fn padded(v: &[u8]) -> Vec<u8> {
        let mut o = v.to_vec();
        while !o.len().is_multiple_of(4) {
            o.push(0);
        }
        o
    }

    /// The transport header and payload, checksummed.
    fn l4(&self) -> Vec<u8> {
        let mut s = Vec::new();
        match self.proto {
            PROTO_TCP => {
                let opts = Self::padded(&self.tcp_options);
                let doff = (20 + opts.len()) / 4;
                s.extend_from_slice(&self.sport.to_be_bytes());
                s.extend_from_slice(&self.dport.to_be_bytes());
                s.extend_from_slice(&self.tcp_seq.to_be_bytes());
                s.extend_from_slice(&self.tcp_ack.to_be_bytes());
                s.push((doff as u8) << 4);
                s.push(self.tcp_flags);
                s.extend_from_slice(&self.tcp_window.to_be_bytes());
                s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                s.extend_from_slice(&opts);
                s.extend_from_slice(&self.payload);
                let c = l4_checksum(self.src, self.dst, PROTO_TCP, &s);
                s[16..18].copy_from_slice(&c.to_be_bytes());
            }
            PROTO_UDP => {
                let len = (8 + self.payload.len()) as u16;
                s.extend_from_slice(&self.sport.to_be_bytes());
                s.extend_from_slice(&self.dport.to_be_bytes());
                s.extend_from_slice(&len.to_be_bytes());
                s.extend_from_slice(&[0, 0]);
                s.extend_from_slice(&self.payload);
                if !(self.udp_no_checksum && self.src.is_ipv4()) {
                    let c = l4_checksum(self.src, self.dst, PROTO_UDP, &s);
                    s[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                if let Some(e) = &self.icmp_error {
                    s.extend_from_slice(&[e.kind, e.code, 0, 0]);
                    s.extend_from_slice(&e.rest.to_be_bytes());
                    s.extend_from_slice(&e.quoted);
                } else {
                    let echo = if self.proto == PROTO_ICMP { 8 } else { 128 };
                    s.extend_from_slice(&[echo, 0, 0, 0]);
                    s.extend_from_slice(&self.sport.to_be_bytes());
                    s.extend_from_slice(&self.dport.to_be_bytes());
                    s.extend_from_slice(&self.payload);
                }
                // ICMP sums the message alone (RFC 792); ICMPv6 adds the pseudo-header (RFC 4443).
                let c = if self.proto == PROTO_ICMP {
                    !fold(sum_words(&s, 0))
                } else {
                    !fold(sum_words(
                        &s,
                        pseudo_sum(self.src, self.dst, PROTO_ICMPV6, s.len()),
                    ))
                };
                s[2..4].copy_from_slice(&c.to_be_bytes());
            }
            _ => s.extend_from_slice(&self.payload),
        }
        s
    }

    /// The IP packet alone (the frame without its Ethernet header and tag): what an ICMP error
    /// about this packet quotes (see [`quote`]).
    pub fn ip_packet(&self) -> Vec<u8> {
        let f = self.build();
        f[ETH_HLEN + if self.vlan.is_some() { 4 } else { 0 }..].to_vec()
    }

    /// The whole frame.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4();
        let mut f = Vec::with_capacity(80 + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(tci) = self.vlan {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let opts = Self::padded(&self.ipv4_options);
                let hlen = 20 + opts.len();
                let mut h = Vec::with_capacity(hlen);
                h.push(0x40 | (hlen / 4) as u8);
                h.push(self.tos);
                h.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
                h.extend_from_slice(&self.ip_id.to_be_bytes());
                h.extend_from_slice(&self.ipv4_frag.to_be_bytes());
                h.push(self.ttl);
                h.push(self.proto);
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h.extend_from_slice(&opts);
                let c = ipv4_header_checksum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let vtf = 6u32 << 28 | (self.tos as u32) << 20 | (self.flow_label & 0xf_ffff);
                f.extend_from_slice(&vtf.to_be_bytes());
                let ext = if self.ipv6_frag.is_some() { 8 } else { 0 };
                f.extend_from_slice(&((ext + l4.len()) as u16).to_be_bytes());
                f.push(if self.ipv6_frag.is_some() {
                    PROTO_FRAGMENT
                } else {
                    self.proto
                });
                f.push(self.ttl);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                if let Some(fr) = self.ipv6_frag {
                    f.push(self.proto);
                    f.push(0);
                    f.extend_from_slice(&(fr.offset << 3 | fr.more as u16).to_be_bytes());
                    f.extend_from_slice(&fr.id.to_be_bytes());
                }
            }
            _ => panic!("one family per frame"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// An ARP request (who has `target`? tell `sender`).
pub fn arp_request(src_mac: Mac, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

// ---------------------------------------------------------------------------------------------
// Parsing frames.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Info {
    /// Header length in bytes.
    pub ihl: usize,
    pub tot_len: u16,
    pub ttl: u8,
    pub proto: u8,
    /// Flags and fragment offset field.
    pub frag: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub checksum_ok: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6Info {
    pub payload_len: u16,
    pub hop_limit: u8,
    /// Next header of the fixed header.
    pub next_header: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub fragment: Option<V6Frag>,
    /// The upper-layer protocol: `next_header`, or the fragment header's next header.
    pub proto: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Net {
    V4(Ipv4Info),
    V6(Ipv6Info),
    /// Not IP (ARP, ...).
    NotIp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transport {
    /// Frame offset of the TCP/UDP header.
    pub off: usize,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP only.
    pub tcp_flags: u8,
    /// The checksum field.
    pub checksum: u16,
    /// Checksum verdict: None when the IP length fields do not fit the frame (nothing to sum
    /// over), or for an IPv4 UDP datagram without checksum (0).
    pub checksum_ok: Option<bool>,
}

/// The packet quoted in an ICMP / ICMPv6 error, read as far as the quote goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quoted {
    /// Frame offset of the quoted IP header.
    pub off: usize,
    /// Bytes quoted: up to the end of the ICMP message as the outer IP length gives it (or of
    /// the frame, when that length does not fit it).
    pub len: usize,
    /// IPv4: the header length (IHL × 4); IPv6: 40.
    pub hlen: usize,
    /// IPv4 protocol, or IPv6 next header.
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 flags and fragment offset (0 for IPv6).
    pub frag: u16,
    /// Frame offset of the quoted transport header (the quote may end before it).
    pub l4_off: usize,
    /// TCP/UDP source and destination ports, when the quote reaches them.
    pub ports: Option<(u16, u16)>,
    /// IPv4 header checksum verdict, when the whole quoted header is quoted (None for IPv6).
    pub header_checksum_ok: Option<bool>,
}

impl Quoted {
    pub fn src_sock(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.src, self.ports?.0))
    }
    pub fn dst_sock(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.dst, self.ports?.1))
    }
}

/// An ICMP or ICMPv6 message (not a fragment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    /// Frame offset of the ICMP header.
    pub off: usize,
    pub kind: u8,
    pub code: u8,
    pub checksum: u16,
    /// The 32 bits after the checksum.
    pub rest: u32,
    /// Checksum verdict (ICMPv6 with its pseudo-header): None when the IP length fields do not
    /// fit the frame (nothing to sum over).
    pub checksum_ok: Option<bool>,
    /// An error message (RFC 792 types 3, 4, 5, 11, 12; RFC 4443 types below 128): its quoted
    /// packet, when at least a whole fixed IP header of the right version is quoted.
    pub quoted: Option<Quoted>,
}

/// Whether an ICMP (`v6` false) or ICMPv6 type is an error message that quotes a packet.
pub fn icmp_type_is_error(kind: u8, v6: bool) -> bool {
    if v6 {
        kind < 128
    } else {
        matches!(
            kind,
            ICMP_DEST_UNREACH
                | ICMP_SOURCE_QUENCH
                | ICMP_REDIRECT
                | ICMP_TIME_EXCEEDED
                | ICMP_PARAMETER_PROB
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub vlan: Option<u16>,
    pub ethertype: u16,
    /// Frame offset of the IP header.
    pub l3: usize,
    pub net: Net,
    /// TCP or UDP, not a fragment.
    pub transport: Option<Transport>,
    /// ICMP (in IPv4) or ICMPv6 (in IPv6), not a fragment.
    pub icmp: Option<Icmp>,
    /// The IP length fields fit inside the frame (an Ethernet pad after them is fine), and for
    /// UDP the UDP length equals the IP payload length.
    pub lengths_ok: bool,
}

impl Packet {
    pub fn is_fragment(&self) -> bool {
        match &self.net {
            Net::V4(h) => h.frag & 0x3fff != 0,
            Net::V6(h) => h.fragment.is_some(),
            Net::NotIp => false,
        }
    }
    pub fn src_ip(&self) -> Option<IpAddr> {
        match &self.net {
            Net::V4(h) => Some(h.src.into()),
            Net::V6(h) => Some(h.src.into()),
            Net::NotIp => None,
        }
    }
    pub fn dst_ip(&self) -> Option<IpAddr> {
        match &self.net {
            Net::V4(h) => Some(h.dst.into()),
            Net::V6(h) => Some(h.dst.into()),
            Net::NotIp => None,
        }
    }
    pub fn ttl(&self) -> Option<u8> {
        match &self.net {
            Net::V4(h) => Some(h.ttl),
            Net::V6(h) => Some(h.hop_limit),
            Net::NotIp => None,
        }
    }
    pub fn proto(&self) -> Option<u8> {
        match &self.net {
            Net::V4(h) => Some(h.proto),
            Net::V6(h) => Some(h.proto),
            Net::NotIp => None,
        }
    }
    pub fn src_sock(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            self.src_ip()?,
            self.transport.as_ref()?.sport,
        ))
    }
    pub fn dst_sock(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            self.dst_ip()?,
            self.transport.as_ref()?.dport,
        ))
    }

    /// Every checksum present verifies (IPv4 header; TCP/UDP when summable). IPv4 UDP checksum
    /// 0 counts as right (it means "none").
    pub fn checksums_ok(&self) -> bool {
        let ip = match &self.net {
            Net::V4(h) => h.checksum_ok,
            _ => true,
        };
        let l4 = match &self.transport {
            Some(t) => match t.checksum_ok {
                Some(ok) => ok,
                None => self.is_udp_v4_no_checksum(),
            },
            None => true,
        };
        let icmp = self.icmp.as_ref().is_none_or(|i| {
            i.checksum_ok != Some(false)
                && i.quoted
                    .as_ref()
                    .is_none_or(|q| q.header_checksum_ok != Some(false))
        });
        ip && l4 && icmp
    }

    /// The quoted packet, if this is an ICMP error that quotes one.
    pub fn quoted(&self) -> Option<&Quoted> {
        self.icmp.as_ref()?.quoted.as_ref()
    }

    pub fn is_udp_v4_no_checksum(&self) -> bool {
        matches!(self.net, Net::V4(_))
            && self
                .transport
                .as_ref()
                .is_some_and(|t| t.proto == PROTO_UDP && t.checksum == 0)
    }
}

fn be16(f: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([f[o], f[o + 1]])
}

fn need(f: &[u8], off: usize, len: usize, what: &str) -> Result<(), String> {
    if off + len > f.len() {
        Err(format!(
            "truncated {what}: needs bytes {off}..{} of a {}-byte frame",
            off + len,
            f.len()
        ))
    } else {
        Ok(())
    }
}

/// Reads a frame. Fails (naming the place) when a header is cut short or inconsistent in
/// itself: Ethernet, 802.1Q tag, IPv4 (version, IHL, options, total length below IHL), IPv6
/// (version, fragment header), TCP (data offset below 5) or UDP. Length fields that point past
/// the frame do not fail the parse: they show in [`Packet::lengths_ok`].
pub fn parse(f: &[u8]) -> Result<Packet, String> {
    need(f, 0, ETH_HLEN, "Ethernet header")?;
    let mut dst_mac = [0; 6];
    let mut src_mac = [0; 6];
    dst_mac.copy_from_slice(&f[0..6]);
    src_mac.copy_from_slice(&f[6..12]);
    let mut ethertype = be16(f, 12);
    let mut l3 = ETH_HLEN;
    let mut vlan = None;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        need(f, ETH_HLEN, 4, "802.1Q tag")?;
        vlan = Some(be16(f, 14));
        ethertype = be16(f, 16);
        l3 += 4;
    }
    let mut p = Packet {
        dst_mac,
        src_mac,
        vlan,
        ethertype,
        l3,
        net: Net::NotIp,
        transport: None,
        icmp: None,
        lengths_ok: true,
    };
    let (l4_off, l4_len, src, dst, proto) = match ethertype {
        ETH_P_IP => {
            need(f, l3, 20, "IPv4 header")?;
            let h = &f[l3..];
            if h[0] >> 4 != 4 {
                return Err(format!("IPv4 version {}", h[0] >> 4));
            }
            let ihl = (h[0] & 0xf) as usize * 4;
            if ihl < 20 {
                return Err(format!("IPv4 IHL {} below 5", ihl / 4));
            }
            need(f, l3, ihl, "IPv4 options")?;
            let tot_len = be16(h, 2);
            if (tot_len as usize) < ihl {
                return Err(format!("IPv4 total length {tot_len} below IHL {ihl}"));
            }
            let info = Ipv4Info {
                ihl,
                tot_len,
                ttl: h[8],
                proto: h[9],
                frag: be16(h, 6),
                src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
                dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
                checksum_ok: fold(sum_words(&h[..ihl], 0)) == 0xffff,
            };
            let fits = l3 + tot_len as usize <= f.len();
            p.lengths_ok = fits;
            let r = (
                l3 + ihl,
                fits.then(|| tot_len as usize - ihl),
                IpAddr::V4(info.src),
                IpAddr::V4(info.dst),
                info.proto,
            );
            let frag = info.frag & 0x3fff != 0;
            p.net = Net::V4(info);
            if frag {
                return Ok(p);
            }
            r
        }
        ETH_P_IPV6 => {
            need(f, l3, 40, "IPv6 header")?;
            let h = &f[l3..];
            if h[0] >> 4 != 6 {
                return Err(format!("IPv6 version {}", h[0] >> 4));
            }
            let payload_len = be16(h, 4);
            let next_header = h[6];
            let mut a = [0u8; 16];
            a.copy_from_slice(&h[8..24]);
            let src = Ipv6Addr::from(a);
            a.copy_from_slice(&h[24..40]);
            let dst = Ipv6Addr::from(a);
            let mut off = l3 + 40;
            let mut proto = next_header;
            let mut fragment = None;
            if next_header == PROTO_FRAGMENT {
                need(f, off, 8, "IPv6 fragment header")?;
                proto = f[off];
                let w = be16(f, off + 2);
                fragment = Some(V6Frag {
                    offset: w >> 3,
                    more: w & 1 != 0,
                    id: u32::from_be_bytes([f[off + 4], f[off + 5], f[off + 6], f[off + 7]]),
                });
                off += 8;
            }
            let fits =
                l3 + 40 + payload_len as usize <= f.len() && payload_len as usize >= off - l3 - 40;
            p.lengths_ok = fits;
            let l4_len = fits.then(|| payload_len as usize - (off - l3 - 40));
            p.net = Net::V6(Ipv6Info {
                payload_len,
                hop_limit: h[7],
                next_header,
                src,
                dst,
                fragment,
                proto,
            });
            if fragment.is_some() {
                return Ok(p);
            }
            (off, l4_len, IpAddr::V6(src), IpAddr::V6(dst), proto)
        }
        _ => return Ok(p),
    };
    match proto {
        PROTO_TCP => {
            need(f, l4_off, 20, "TCP header")?;
            let doff = (f[l4_off + 12] >> 4) as usize;
            if doff < 5 {
                return Err(format!("TCP data offset {doff} below 5"));
            }
            let checksum_ok = l4_len
                .filter(|&n| n >= 20)
                .map(|n| l4_checksum_ok(src, dst, PROTO_TCP, &f[l4_off..l4_off + n]));
            if l4_len.is_some_and(|n| n < doff * 4) {
                p.lengths_ok = false;
            }
            p.transport = Some(Transport {
                off: l4_off,
                proto,
                sport: be16(f, l4_off),
                dport: be16(f, l4_off + 2),
                tcp_flags: f[l4_off + 13],
                checksum: be16(f, l4_off + 16),
                checksum_ok,
            });
        }
        PROTO_UDP => {
            need(f, l4_off, 8, "UDP header")?;
            let udp_len = be16(f, l4_off + 4) as usize;
            if l4_len != Some(udp_len) {
                p.lengths_ok = false;
            }
            let checksum = be16(f, l4_off + 6);
            let v4_none = src.is_ipv4() && checksum == 0;
            let checksum_ok = l4_len
                .filter(|&n| n == udp_len && !v4_none)
                .map(|n| l4_checksum_ok(src, dst, PROTO_UDP, &f[l4_off..l4_off + n]));
            p.transport = Some(Transport {
                off: l4_off,
                proto,
                sport: be16(f, l4_off),
                dport: be16(f, l4_off + 2),
                tcp_flags: 0,
                checksum,
                checksum_ok,
            });
        }
        PROTO_ICMP | PROTO_ICMPV6 if (proto == PROTO_ICMPV6) == src.is_ipv6() => {
            need(f, l4_off, 8, "ICMP header")?;
            if l4_len.is_some_and(|n| n < 8) {
                p.lengths_ok = false;
            }
            // An IP length with no room for the ICMP message: what follows is trailer, so
            // nothing is quoted.
            let no_room = l4_len.is_some_and(|n| n < 8);
            let l4_len = l4_len.filter(|&n| n >= 8);
            let end = l4_len.map_or(f.len(), |n| l4_off + n);
            let msg = &f[l4_off..end];
            let checksum_ok = l4_len.map(|_| {
                let acc = if src.is_ipv6() {
                    pseudo_sum(src, dst, PROTO_ICMPV6, msg.len())
                } else {
                    0
                };
                fold(sum_words(msg, acc)) == 0xffff
            });
            let kind = f[l4_off];
            let quoted = if icmp_type_is_error(kind, src.is_ipv6()) && !no_room {
                parse_quote(f, l4_off + 8, end, src.is_ipv6())
            } else {
                None
            };
            p.icmp = Some(Icmp {
                off: l4_off,
                kind,
                code: f[l4_off + 1],
                checksum: be16(f, l4_off + 2),
                rest: u32::from_be_bytes([
                    f[l4_off + 4],
                    f[l4_off + 5],
                    f[l4_off + 6],
                    f[l4_off + 7],
                ]),
                checksum_ok,
                quoted,
            });
        }
        _ => {}
    }
    Ok(p)
}

/// The packet quoted at `off` (up to `end`) by an ICMP error of the family `v6` says.
fn parse_quote(f: &[u8], off: usize, end: usize, v6: bool) -> Option<Quoted> {
    let q = f.get(off..end)?;
    let (hlen, proto, src, dst, ttl, frag) = if v6 {
        if q.len() < 40 || q[0] >> 4 != 6 {
            return None;
        }
        let mut a = [0u8; 16];
        a.copy_from_slice(&q[8..24]);
        let src = IpAddr::V6(Ipv6Addr::from(a));
        a.copy_from_slice(&q[24..40]);
        (40, q[6], src, IpAddr::V6(Ipv6Addr::from(a)), q[7], 0)
    } else {
        if q.len() < 20 || q[0] >> 4 != 4 || q[0] & 0xf < 5 {
            return None;
        }
        (
            (q[0] & 0xf) as usize * 4,
            q[9],
            IpAddr::from([q[12], q[13], q[14], q[15]]),
            IpAddr::from([q[16], q[17], q[18], q[19]]),
            q[8],
            be16(q, 6),
        )
    };
    let ports = (matches!(proto, PROTO_TCP | PROTO_UDP) && q.len() >= hlen + 4)
        .then(|| (be16(q, hlen), be16(q, hlen + 2)));
    let header_checksum_ok =
        (!v6 && q.len() >= hlen).then(|| fold(sum_words(&q[..hlen], 0)) == 0xffff);
    Some(Quoted {
        off,
        len: q.len(),
        hlen,
        proto,
        src,
        dst,
        ttl,
        frag,
        l4_off: off + hlen,
        ports,
        header_checksum_ok,
    })
}

/// Parses and insists on a whole, consistent frame whose every checksum is right.
pub fn verify(f: &[u8]) -> Result<Packet, String> {
    let p = parse(f)?;
    if !p.lengths_ok {
        return Err("IP/UDP length fields do not match the frame".into());
    }
    if let Net::V4(h) = &p.net
        && !h.checksum_ok
    {
        return Err(format!(
            "IPv4 header checksum wrong (field {:#06x}, should be {:#06x})",
            be16(f, p.l3 + 10),
            {
                let mut h = f[p.l3..p.l3 + h.ihl].to_vec();
                h[10] = 0;
                h[11] = 0;
                ipv4_header_checksum(&h)
            }
        ));
    }
    if let Some(t) = &p.transport
        && t.checksum_ok == Some(false)
    {
        let (src, dst) = (p.src_ip().unwrap(), p.dst_ip().unwrap());
        let n = match &p.net {
            Net::V4(h) => h.tot_len as usize - h.ihl,
            Net::V6(h) => h.payload_len as usize,
            Net::NotIp => unreachable!(),
        };
        let mut seg = f[t.off..t.off + n].to_vec();
        let co = if t.proto == PROTO_TCP { 16 } else { 6 };
        seg[co] = 0;
        seg[co + 1] = 0;
        return Err(format!(
            "{} checksum wrong (field {:#06x}, should be {:#06x})",
            if t.proto == PROTO_TCP { "TCP" } else { "UDP" },
            t.checksum,
            l4_checksum(src, dst, t.proto, &seg)
        ));
    }
    if let Some(i) = &p.icmp {
        if i.checksum_ok == Some(false) {
            let end = match &p.net {
                Net::V4(h) => p.l3 + h.tot_len as usize,
                Net::V6(h) => p.l3 + 40 + h.payload_len as usize,
                Net::NotIp => unreachable!(),
            };
            let mut msg = f[i.off..end].to_vec();
            msg[2] = 0;
            msg[3] = 0;
            let want = icmp_checksum(p.src_ip().unwrap(), p.dst_ip().unwrap(), &msg);
            return Err(format!(
                "ICMP checksum wrong (field {:#06x}, should be {want:#06x})",
                i.checksum
            ));
        }
        if let Some(q) = &i.quoted
            && q.header_checksum_ok == Some(false)
        {
            let mut h = f[q.off..q.off + q.hlen].to_vec();
            h[10] = 0;
            h[11] = 0;
            return Err(format!(
                "quoted IPv4 header checksum wrong (field {:#06x}, should be {:#06x})",
                be16(f, q.off + 10),
                ipv4_header_checksum(&h)
            ));
        }
    }
    Ok(p)
}

/// A readable account of where two frames differ (for assertion messages).
pub fn diff(expected: &[u8], got: &[u8]) -> String {
    let mut s = String::new();
    if expected.len() != got.len() {
        s += &format!("length {} expected {}; ", got.len(), expected.len());
    }
    let d: Vec<String> = expected
        .iter()
        .zip(got)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| format!("[{i}] {b:02x} expected {a:02x}"))
        .collect();
    s += &d.join(", ");
    s += &format!("\n  got      {}\n  expected {}", hex(got), hex(expected));
    s
}

pub fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN harness.
// ---------------------------------------------------------------------------------------------

/// The XDP program loaded as the agent loads it, pinned in a directory of its own that is
/// removed on drop.
pub struct TestRunner {
    pub dp: Dataplane,
}

impl TestRunner {
    /// Loads the program (maps pinned under a fresh `/sys/fs/bpf/zdd-<tag>-<pid>-<n>`).
    pub fn load(tag: &str, flow_table_size: u32) -> Result<TestRunner> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/zdd-{tag}-{}-{n}", std::process::id()));
        let dp = Dataplane::load(&LoadOptions {
            pin_dir,
            flow_table_size,
            config: zdd_common::Config::default(),
        })
        .context("loading the XDP program")?;
        Ok(TestRunner { dp })
    }

    /// Applies a config file's services (its `[agent]` section is required but unused).
    pub fn apply_toml(&mut self, toml: &str) -> Result<()> {
        let cfg = zdd_agent::config::parse(Path::new("fixture.toml"), toml)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.dp.apply(&cfg.state).context("apply")?;
        Ok(())
    }

    /// One run of the program on `frame`, received on `ingress_ifindex`: (verdict, frame out).
    pub fn run(&mut self, frame: &[u8], ingress_ifindex: u32) -> Result<(u32, Vec<u8>)> {
        let ctx = xdp_md(frame.len(), ingress_ifindex);
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .dp
            .program_mut()?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::new()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN on a {}-byte frame", frame.len()))?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    pub fn stat(&self, s: zdd_common::Stat) -> u64 {
        self.dp.stats().expect("reading counters").get(s)
    }

    pub fn stats(&self) -> Vec<u64> {
        let st = self.dp.stats().expect("reading counters");
        zdd_common::Stat::ALL.iter().map(|s| st.get(*s)).collect()
    }
}

impl Drop for TestRunner {
    fn drop(&mut self) {
        if let Err(e) = self.dp.unpin_all() {
            eprintln!("removing pins of {}: {e}", self.dp.pin_dir().display());
        }
    }
}

/// `struct xdp_md` for `ctx_in`: data 0, data_end = len, data_meta 0, the ingress ifindex,
/// rx queue 0, egress 0.
pub fn xdp_md(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let mut c = [0u8; 24];
    let words = [0u32, len as u32, 0, ingress_ifindex, 0, 0];
    for (i, w) in words.iter().enumerate() {
        c[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    c
}

/// Wire-order address as the data path keeps it (`zdd_common::Addr`).
pub fn wire_addr(ip: IpAddr) -> zdd_common::Addr {
    zdd_agent::state::wire_addr(ip)
}

/// The `FlowKey` of a frame's tuple as sent (forward: client → VIP; reverse: backend → client).
pub fn flow_key(src: SocketAddr, dst: SocketAddr, proto: u8) -> zdd_common::FlowKey {
    zdd_common::FlowKey {
        src: wire_addr(src.ip()),
        dst: wire_addr(dst.ip()),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        family: if src.is_ipv4() {
            zdd_common::FAMILY_V4
        } else {
            zdd_common::FAMILY_V6
        },
        _pad: [0; 2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 1071 §3's example words: 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
    #[test]
    fn rfc1071_example() {
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_words(&d, 0)), 0xddf2);
    }

    // A well-known IPv4 header (Wikipedia's "IPv4 header checksum" example): checksum b861.
    #[test]
    fn ipv4_header_example() {
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
    }

    #[test]
    fn built_frames_verify_and_parse_back() {
        let c4: SocketAddr = "10.0.1.2:40000".parse().unwrap();
        let v4: SocketAddr = "10.0.100.1:80".parse().unwrap();
        let c6: SocketAddr = "[fd00:1::2]:40000".parse().unwrap();
        let v6: SocketAddr = "[fd00:100::1]:53".parse().unwrap();
        for spec in [
            FrameSpec::tcp(c4, v4),
            FrameSpec::tcp(c4, v4)
                .vlan(100)
                .ipv4_options(&[1, 1, 1, 0, 7, 7, 4]),
            FrameSpec::udp(c4, v4).payload(b"odd"),
            FrameSpec::udp(c4, v4).udp_no_checksum(),
            FrameSpec::tcp(c6, v6).tcp_options(&[2, 4, 5, 0xb4]),
            FrameSpec::udp(c6, v6),
        ] {
            let f = spec.build();
            let p = verify(&f).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_eq!(p.src_sock(), Some(spec.src_sock()));
            assert_eq!(p.dst_sock(), Some(spec.dst_sock()));
            assert_eq!(p.ttl(), Some(spec.ttl));
            assert_eq!(p.vlan, spec.vlan);
            // Any single flipped bit in a checksummed part is caught.
            let mut g = f.clone();
            let last = g.len() - 1;
            g[last] ^= 0x10;
            assert!(verify(&g).is_err() || spec.udp_no_checksum);
        }
        let p = verify(&FrameSpec::udp(c4, v4).udp_no_checksum().build()).unwrap();
        assert!(p.is_udp_v4_no_checksum());
    }

    #[test]
    fn icmp_errors_verify_and_parse_back() {
        let c4: SocketAddr = "10.0.1.2:40000".parse().unwrap();
        let v4: SocketAddr = "10.0.100.1:80".parse().unwrap();
        let c6: SocketAddr = "[fd00:1::2]:40000".parse().unwrap();
        let v6: SocketAddr = "[fd00:100::1]:53".parse().unwrap();
        let r4: IpAddr = "10.0.1.254".parse().unwrap();
        let r6: IpAddr = "fd00:1::fe".parse().unwrap();
        let q4 = FrameSpec::tcp(v4, c4)
            .ipv4_options(&[1, 1, 1, 1])
            .ip_packet();
        let q6 = FrameSpec::udp(v6, c6).payload(b"odd").ip_packet();
        for (spec, quoted) in [
            (
                FrameSpec::frag_needed(r4, v4.ip(), 1400, &quote(&q4, Some(8))),
                &q4,
            ),
            (FrameSpec::time_exceeded(r4, v4.ip(), &q4).vlan(3), &q4),
            (FrameSpec::packet_too_big(r6, v6.ip(), 1280, &q6), &q6),
            (
                FrameSpec::time_exceeded(r6, v6.ip(), &quote(&q6, Some(4))),
                &q6,
            ),
        ] {
            let f = spec.build();
            let p = verify(&f).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            let i = p.icmp.as_ref().expect("ICMP");
            assert_eq!(i.kind, spec.icmp_error.as_ref().unwrap().kind);
            let q = i.quoted.as_ref().expect("quoted packet");
            assert_eq!(q.src_sock(), Some(if q.src.is_ipv4() { v4 } else { v6 }));
            assert_eq!(q.dst_sock(), Some(if q.src.is_ipv4() { c4 } else { c6 }));
            assert_eq!(&f[q.off..q.off + q.len], &quoted[..q.len]);
            assert_eq!(q.header_checksum_ok, q.src.is_ipv4().then_some(true));
            // A flipped bit in the quote breaks the ICMP checksum; in the quoted IPv4 header,
            // the quoted header checksum as well.
            let mut g = f.clone();
            g[q.off + 13] ^= 0x04;
            assert!(verify(&g).is_err());
            if q.src.is_ipv4() {
                let p = parse(&g).unwrap();
                assert_eq!(p.quoted().unwrap().header_checksum_ok, Some(false));
            }
        }
        // ICMPv6 sums the pseudo-header: a changed outer destination is caught.
        let mut f = FrameSpec::packet_too_big(r6, v6.ip(), 1280, &q6).build();
        f[14 + 39] ^= 1;
        assert_eq!(parse(&f).unwrap().icmp.unwrap().checksum_ok, Some(false));
        // An echo quotes nothing.
        let p = verify(&FrameSpec::icmp_echo(r4, v4.ip()).build()).unwrap();
        assert!(p.icmp.unwrap().quoted.is_none());
        // The quoted transport checksum field is found where it lies.
        assert_eq!(quoted_l4_checksum_at(&q4), Some(24 + 16));
        assert_eq!(quoted_l4_checksum_at(&quote(&q4, Some(8))), None);
        assert_eq!(quoted_l4_checksum_at(&q6), Some(40 + 6));
    }
}
