//! Step 1: parse. Ethernet, one 802.1Q tag, IPv4 (with options) or IPv6, then TCP or UDP.
//! Every access is bounds-checked against `data_end`; a frame that fails a check is reported
//! as malformed and is never rewritten.

use aya_ebpf::programs::XdpContext;
use zdd_common::{Addr, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV6_HLEN: usize = 40;
const NEXTHDR_FRAGMENT: u8 = 44;
const TCP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
const UDP_HLEN: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A parsed TCP or UDP packet. Addresses and ports are as on the wire.
pub struct Packet {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    pub family: u8,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// IPv4 total length or IPv6 payload length + 40, host order.
    pub ip_len: u16,
}

pub enum Parsed {
    Packet(Packet),
    /// A fragment (IPv4 MF/offset, IPv6 fragment header), with its destination.
    Fragment {
        family: u8,
        dst: Addr,
    },
    /// ICMP or ICMPv6 (errors about VIP flows are translated, see `icmp`).
    Icmp(Packet),
    /// Not IP, or an IP protocol zdd does not balance.
    Other,
    /// Truncated or inconsistent headers.
    Malformed,
}

/// Pointer to `len` bytes at `off`, or None if the frame is shorter.
#[inline(always)]
pub fn ptr_at(ctx: &XdpContext, off: usize, len: usize) -> Option<*mut u8> {
    let start = ctx.data();
    if start + off + len > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut u8)
}

#[inline(always)]
pub fn load16(p: *const u8) -> u16 {
    // SAFETY: callers obtained `p` from `ptr_at` with room for 2 bytes.
    unsafe { (p as *const u16).read_unaligned() }
}

#[inline(always)]
pub fn load32(p: *const u8) -> u32 {
    // SAFETY: as above, 4 bytes.
    unsafe { (p as *const u32).read_unaligned() }
}

/// An IPv6 address at `p` (16 bytes the caller checked).
#[inline(always)]
pub fn load_addr6(p: *const u8) -> Addr {
    // SAFETY: the caller checked 16 bytes at `p`.
    unsafe {
        [
            load32(p),
            load32(p.add(4)),
            load32(p.add(8)),
            load32(p.add(12)),
        ]
    }
}

/// The IP header fields the transport step carries on.
struct Ip {
    l3: usize,
    family: u8,
    proto: u8,
    src: Addr,
    dst: Addr,
    ip_len: u16,
}

impl Ip {
    #[inline(always)]
    fn with_l4(self, l4: usize, sport: u16, dport: u16, tcp_flags: u8) -> Packet {
        Packet {
            l3: self.l3,
            l4,
            family: self.family,
            proto: self.proto,
            src: self.src,
            dst: self.dst,
            sport,
            dport,
            tcp_flags,
            ip_len: self.ip_len,
        }
    }
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at(ctx, 0, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be(load16(unsafe { eth.add(12) }));
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(tag) = ptr_at(ctx, ETH_HLEN, 4) else {
            return Parsed::Malformed;
        };
        ethertype = u16::from_be(load16(unsafe { tag.add(2) }));
        l3 += 4;
    }
    match ethertype {
        ETH_P_IP => parse_v4(ctx, l3),
        ETH_P_IPV6 => parse_v6(ctx, l3),
        _ => Parsed::Other,
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize) -> Parsed {
    let Some(ip) = ptr_at(ctx, l3, 20) else {
        return Parsed::Malformed;
    };
    // SAFETY: 20 bytes checked above.
    let (vihl, frag, proto) = unsafe { (*ip, u16::from_be(load16(ip.add(6))), *ip.add(9)) };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let ip_len = u16::from_be(load16(unsafe { ip.add(2) }));
    // A total length past the end of the frame: truncated (the kernel drops it too). XDP
    // sees single packets, never GSO, so a valid one always fits.
    if vihl >> 4 != 4
        || ihl < 20
        || (ip_len as usize) < ihl
        || ptr_at(ctx, l3, ip_len as usize).is_none()
    {
        return Parsed::Malformed;
    }
    let dst = [load32(unsafe { ip.add(16) }), 0, 0, 0];
    // MF set or a non-zero offset: a fragment.
    if frag & 0x3fff != 0 {
        return Parsed::Fragment {
            family: FAMILY_V4,
            dst,
        };
    }
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
        return Parsed::Other;
    }
    // Options: make sure the whole header is there before trusting `ihl`.
    if ptr_at(ctx, l3, ihl).is_none() {
        return Parsed::Malformed;
    }
    let src = [load32(unsafe { ip.add(12) }), 0, 0, 0];
    let hdr = Ip {
        l3,
        family: FAMILY_V4,
        proto,
        src,
        dst,
        ip_len,
    };
    if proto == PROTO_ICMP {
        return icmp(ctx, hdr, l3 + ihl);
    }
    l4(ctx, hdr, l3 + ihl)
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize) -> Parsed {
    let Some(ip) = ptr_at(ctx, l3, IPV6_HLEN) else {
        return Parsed::Malformed;
    };
    // SAFETY: 40 bytes checked above.
    let (vers, next) = unsafe { (*ip >> 4, *ip.add(6)) };
    if vers != 6 {
        return Parsed::Malformed;
    }
    let payload = u16::from_be(load16(unsafe { ip.add(4) }));
    if ptr_at(ctx, l3, IPV6_HLEN + payload as usize).is_none() {
        return Parsed::Malformed;
    }
    let addr = |o: usize| load_addr6(unsafe { ip.add(o) });
    let dst = addr(24);
    if next == NEXTHDR_FRAGMENT {
        return Parsed::Fragment {
            family: FAMILY_V6,
            dst,
        };
    }
    if next != PROTO_TCP && next != PROTO_UDP && next != PROTO_ICMPV6 {
        return Parsed::Other;
    }
    let hdr = Ip {
        l3,
        family: FAMILY_V6,
        proto: next,
        src: addr(8),
        dst,
        ip_len: payload.wrapping_add(IPV6_HLEN as u16),
    };
    if next == PROTO_ICMPV6 {
        return icmp(ctx, hdr, l3 + IPV6_HLEN);
    }
    l4(ctx, hdr, l3 + IPV6_HLEN)
}

/// An ICMP header: `tcp_flags` carries the type, `sport` the code (no ports in ICMP).
#[inline(always)]
fn icmp(ctx: &XdpContext, ip: Ip, l4: usize) -> Parsed {
    let Some(h) = ptr_at(ctx, l4, ICMP_HLEN) else {
        return Parsed::Malformed;
    };
    // SAFETY: 8 bytes checked above.
    let (kind, code) = unsafe { (*h, *h.add(1)) };
    Parsed::Icmp(ip.with_l4(l4, code as u16, 0, kind))
}

#[inline(always)]
fn l4(ctx: &XdpContext, ip: Ip, l4: usize) -> Parsed {
    // Separate checks per protocol: the verifier must see a constant length for each.
    let (sport, dport, tcp_flags) = if ip.proto == PROTO_TCP {
        let Some(h) = ptr_at(ctx, l4, TCP_HLEN) else {
            return Parsed::Malformed;
        };
        // SAFETY: 20 bytes checked above.
        let (doff, flags) = unsafe { (*h.add(12) >> 4, *h.add(13)) };
        if doff < 5 {
            return Parsed::Malformed;
        }
        (load16(h), load16(unsafe { h.add(2) }), flags)
    } else {
        let Some(h) = ptr_at(ctx, l4, UDP_HLEN) else {
            return Parsed::Malformed;
        };
        (load16(h), load16(unsafe { h.add(2) }), 0)
    };
    Parsed::Packet(ip.with_l4(l4, sport, dport, tcp_flags))
}
