//! The **parse** step: Ethernet, one 802.1Q/802.1ad tag, IPv4 (with options) or IPv6, then
//! TCP, UDP or ICMP. Every access is bounds-checked against `data_end`; a frame that fails a
//! check is reported as malformed and is never rewritten.
//!
//! The raw access helpers live here too: `ptr_at` is the only bounds check, and the
//! `load*`/`store*` functions are `unsafe`, for pointers it returned.

use aya_ebpf::programs::XdpContext;
use zdd_common::{Addr, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
/// Ethernet: offset of the destination MAC, the source MAC, the EtherType (or VLAN TPID).
pub const ETH_DST: usize = 0;
pub const ETH_SRC: usize = 6;
pub const ETH_TYPE: usize = 12;
/// Ethernet plus one VLAN tag: the longest link header zdd reads.
pub const ETH_VLAN_HLEN: usize = 18;
const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tag: the inner EtherType, after the TCI.
const VLAN_INNER_TYPE: usize = 2;
const VLAN_HLEN: usize = 4;

pub const IPV4_HLEN: usize = 20;
/// IPv4 header field offsets.
pub mod v4 {
    pub const VER_IHL: usize = 0;
    pub const TOT_LEN: usize = 2;
    pub const FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    /// `FRAG`: don't fragment.
    pub const DF: u16 = 0x4000;
    /// `FRAG`: more fragments, and the fragment offset.
    pub const MF_OFFSET: u16 = 0x3fff;
}
pub const IPV6_HLEN: usize = 40;
/// IPv6 header field offsets.
pub mod v6 {
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
}
const NEXTHDR_FRAGMENT: u8 = 44;

pub const TCP_HLEN: usize = 20;
/// TCP header field offsets (the ports are at 0 and 2, as in UDP).
const TCP_DOFF: usize = 12;
const TCP_FLAGS: usize = 13;
pub const TCP_CSUM: usize = 16;
pub const UDP_HLEN: usize = 8;
pub const UDP_CSUM: usize = 6;
/// TCP and UDP: offsets of the source and the destination port.
pub const SPORT: usize = 0;
pub const DPORT: usize = 2;

pub const ICMP_HLEN: usize = 8;
/// ICMP and ICMPv6: offset of the checksum.
pub const ICMP_CSUM: usize = 2;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The IP header fields the later steps use. Addresses are as on the wire.
pub struct Ip {
    /// Offset of the IP header.
    pub l3: usize,
    pub family: u8,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    /// IPv4 total length or IPv6 payload length + 40, host order.
    pub ip_len: u16,
    /// IPv4 DF set, or IPv6 (routers never fragment it): too big for the next hop means an
    /// ICMP error, not fragmentation.
    pub dont_fragment: bool,
}

/// A parsed TCP or UDP packet. Ports are as on the wire.
pub struct Packet {
    pub ip: Ip,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
}

/// A parsed ICMP or ICMPv6 message (no ports).
pub struct Icmp {
    pub ip: Ip,
    /// Offset of the ICMP header.
    pub l4: usize,
    /// ICMP type (the code is not needed: the type says whether it is an error).
    pub kind: u8,
}

pub enum Parsed {
    Packet(Packet),
    /// A fragment (IPv4 MF/offset, IPv6 fragment header), with its destination.
    Fragment {
        family: u8,
        dst: Addr,
    },
    /// ICMP or ICMPv6 (errors about VIP flows are translated, see `icmp`).
    Icmp(Icmp),
    /// Not IP, or an IP protocol zdd does not balance.
    Other,
    /// Truncated or inconsistent headers.
    Malformed,
}

/// Pointer to `len` bytes at `off`, or None if the frame is shorter. The only bounds check:
/// every `load*`/`store*` below is given a pointer from here, within its `len`.
#[inline(always)]
pub fn ptr_at(ctx: &XdpContext, off: usize, len: usize) -> Option<*mut u8> {
    let start = ctx.data();
    if start + off + len > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut u8)
}

/// # Safety
/// `p` points into the frame with at least 1 byte left (from [`ptr_at`]).
#[inline(always)]
pub unsafe fn load8(p: *const u8) -> u8 {
    // SAFETY: the caller's contract.
    unsafe { *p }
}

/// # Safety
/// `p` points into the frame with at least 2 bytes left (from [`ptr_at`]).
#[inline(always)]
pub unsafe fn load16(p: *const u8) -> u16 {
    // SAFETY: the caller's contract; unaligned reads are fine for BPF.
    unsafe { (p as *const u16).read_unaligned() }
}

/// # Safety
/// `p` points into the frame with at least 4 bytes left (from [`ptr_at`]).
#[inline(always)]
pub unsafe fn load32(p: *const u8) -> u32 {
    // SAFETY: the caller's contract.
    unsafe { (p as *const u32).read_unaligned() }
}

/// An IPv6 address at `p`.
///
/// # Safety
/// `p` points into the frame with at least 16 bytes left (from [`ptr_at`]).
#[inline(always)]
pub unsafe fn load_addr6(p: *const u8) -> Addr {
    // SAFETY: the caller's contract: 16 bytes.
    unsafe {
        [
            load32(p),
            load32(p.add(4)),
            load32(p.add(8)),
            load32(p.add(12)),
        ]
    }
}

/// # Safety
/// `p` points into the frame with at least 1 byte left (from [`ptr_at`]).
#[inline(always)]
pub unsafe fn store8(p: *mut u8, v: u8) {
    // SAFETY: the caller's contract.
    unsafe { *p = v }
}

/// # Safety
/// `p` points into the frame with at least 2 bytes left (from [`ptr_at`]).
#[inline(always)]
pub unsafe fn store16(p: *mut u8, v: u16) {
    // SAFETY: the caller's contract.
    unsafe { (p as *mut u16).write_unaligned(v) }
}

/// # Safety
/// `p` points into the frame with at least 4 bytes left (from [`ptr_at`]).
#[inline(always)]
pub unsafe fn store32(p: *mut u8, v: u32) {
    // SAFETY: the caller's contract.
    unsafe { (p as *mut u32).write_unaligned(v) }
}

/// Writes an address of either family (4 or 16 bytes) at `p`.
///
/// # Safety
/// `p` points into the frame with at least 16 bytes left for IPv6, 4 for IPv4.
#[inline(always)]
pub unsafe fn store_addr(p: *mut u8, a: &Addr, v6: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        store32(p, a[0]);
        if v6 {
            store32(p.add(4), a[1]);
            store32(p.add(8), a[2]);
            store32(p.add(12), a[3]);
        }
    }
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at(ctx, 0, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let mut l3 = ETH_HLEN;
    // SAFETY: within the ETH_HLEN bytes checked above.
    let mut ethertype = u16::from_be(unsafe { load16(eth.add(ETH_TYPE)) });
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(tag) = ptr_at(ctx, ETH_HLEN, VLAN_HLEN) else {
            return Parsed::Malformed;
        };
        // SAFETY: within the VLAN_HLEN bytes checked above.
        ethertype = u16::from_be(unsafe { load16(tag.add(VLAN_INNER_TYPE)) });
        l3 += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => parse_v4(ctx, l3),
        ETH_P_IPV6 => parse_v6(ctx, l3),
        _ => Parsed::Other,
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize) -> Parsed {
    let Some(ip) = ptr_at(ctx, l3, IPV4_HLEN) else {
        return Parsed::Malformed;
    };
    // SAFETY: every offset is within the IPV4_HLEN bytes checked above.
    let (vihl, frag, proto, ip_len) = unsafe {
        (
            load8(ip.add(v4::VER_IHL)),
            u16::from_be(load16(ip.add(v4::FRAG))),
            load8(ip.add(v4::PROTO)),
            u16::from_be(load16(ip.add(v4::TOT_LEN))),
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    // A total length past the end of the frame: truncated (the kernel drops it too). XDP
    // sees single packets, never GSO, so a valid one always fits.
    if vihl >> 4 != 4
        || ihl < IPV4_HLEN
        || (ip_len as usize) < ihl
        || ptr_at(ctx, l3, ip_len as usize).is_none()
    {
        return Parsed::Malformed;
    }
    // SAFETY: within the IPV4_HLEN bytes checked above.
    let dst = [unsafe { load32(ip.add(v4::DST)) }, 0, 0, 0];
    // MF set or a non-zero offset: a fragment.
    if frag & v4::MF_OFFSET != 0 {
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
    // SAFETY: within the IPV4_HLEN bytes checked above.
    let src = unsafe { load32(ip.add(v4::SRC)) };
    let hdr = Ip {
        l3,
        family: FAMILY_V4,
        proto,
        src: [src, 0, 0, 0],
        dst,
        ip_len,
        dont_fragment: frag & v4::DF != 0,
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
    // SAFETY: every offset is within the IPV6_HLEN bytes checked above.
    let (vers, next, payload) = unsafe {
        (
            load8(ip) >> 4,
            load8(ip.add(v6::NEXT)),
            u16::from_be(load16(ip.add(v6::PAYLOAD_LEN))),
        )
    };
    if vers != 6 {
        return Parsed::Malformed;
    }
    if ptr_at(ctx, l3, IPV6_HLEN + payload as usize).is_none() {
        return Parsed::Malformed;
    }
    // SAFETY: within the IPV6_HLEN bytes checked above.
    let dst = unsafe { load_addr6(ip.add(v6::DST)) };
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
        // SAFETY: within the IPV6_HLEN bytes checked above.
        src: unsafe { load_addr6(ip.add(v6::SRC)) },
        dst,
        ip_len: payload.wrapping_add(IPV6_HLEN as u16),
        dont_fragment: true,
    };
    if next == PROTO_ICMPV6 {
        return icmp(ctx, hdr, l3 + IPV6_HLEN);
    }
    l4(ctx, hdr, l3 + IPV6_HLEN)
}

#[inline(always)]
fn icmp(ctx: &XdpContext, ip: Ip, l4: usize) -> Parsed {
    let Some(h) = ptr_at(ctx, l4, ICMP_HLEN) else {
        return Parsed::Malformed;
    };
    // SAFETY: the type is the first of the ICMP_HLEN bytes checked above.
    let kind = unsafe { load8(h) };
    Parsed::Icmp(Icmp { ip, l4, kind })
}

#[inline(always)]
fn l4(ctx: &XdpContext, ip: Ip, l4: usize) -> Parsed {
    // Separate checks per protocol: the verifier must see a constant length for each.
    let (sport, dport, tcp_flags) = if ip.proto == PROTO_TCP {
        let Some(h) = ptr_at(ctx, l4, TCP_HLEN) else {
            return Parsed::Malformed;
        };
        // SAFETY: every offset is within the TCP_HLEN bytes checked above.
        let (doff, flags, sport, dport) = unsafe {
            (
                load8(h.add(TCP_DOFF)) >> 4,
                load8(h.add(TCP_FLAGS)),
                load16(h.add(SPORT)),
                load16(h.add(DPORT)),
            )
        };
        if doff < 5 {
            return Parsed::Malformed;
        }
        (sport, dport, flags)
    } else {
        let Some(h) = ptr_at(ctx, l4, UDP_HLEN) else {
            return Parsed::Malformed;
        };
        // SAFETY: within the UDP_HLEN bytes checked above.
        unsafe { (load16(h.add(SPORT)), load16(h.add(DPORT)), 0) }
    };
    Parsed::Packet(Packet {
        ip,
        l4,
        sport,
        dport,
        tcp_flags,
    })
}
