//! ICMP, both ways, so that path MTU discovery (and the other errors) work through the edge
//! host:
//!
//! - errors arriving, about VIP flows ([`handle`]):
//!   - towards the backend: an error about a packet the VIP sent (a reply, translated by us)
//!     reaches the edge addressed to the VIP. It goes on to the flow's backend with the
//!     outer destination and the quoted packet's source put back to the backend's (nat), or
//!     with only the MACs changed (dsr), so the backend lowers its path MTU.
//!   - towards the client: an error about a packet a client sent (after translation, to a
//!     backend) gets the VIP back in the quoted destination; the kernel forwards it.
//! - errors the program sends itself ([`too_big`]): a frame of a VIP flow (or a nat reply)
//!   larger than the MTU towards its next hop is answered with fragmentation needed / packet
//!   too big, from the frame's destination (the VIP for a client's frame), quoting the frame
//!   as it arrived (so the sender matches it to its socket, which the kernel's own error,
//!   quoting the translated frame, would not allow).
//!
//! Only ICMP frames and oversize frames pay for this; everything else never reaches here.

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_PASS, XDP_TX},
        xdp_md,
    },
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use zdd_common::{
    Addr, Backend, Config, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Stat, VipKey,
    backend_flags, service_flags,
};

use crate::{
    ToBackend, csum, flow,
    maps::{ZDD_BACKENDS, ZDD_FLOWS, ZDD_SERVICES},
    nat,
    parse::{
        DPORT, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV6, ETH_SRC, ETH_TYPE, ETH_VLAN_HLEN,
        ICMP_CSUM, ICMP_HLEN, IPV4_HLEN, IPV6_HLEN, Icmp, Ip, PROTO_ICMP, PROTO_ICMPV6, SPORT,
        load_addr6, load8, load16, load32, ptr_at, store_addr, store8, store16, store32, v4, v6,
    },
    stats::count,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
/// ICMP header: the next-hop MTU of fragmentation needed (16 bits at 6), of packet too big
/// (32 bits at 4).
const ICMP_FRAG_MTU: usize = 6;
const ICMPV6_MTU: usize = 4;

/// Bytes of the oversize datagram an IPv4 error quotes: the longest IPv4 header (60) and 8
/// bytes of what follows, the quote RFC 792 asks for, whatever the header's length.
pub const QUOTE_V4: usize = 68;
/// Bytes of the oversize packet an ICMPv6 error quotes: as much as fits in the minimum IPv6
/// MTU (1280 − 40 − 8), as RFC 4443 asks. An oversize IPv6 packet is always longer.
pub const QUOTE_V6: usize = 1232;
/// TTL / hop limit of the errors the program sends.
const ERROR_TTL: u8 = 64;

/// Whether `icmp` is an error zdd translates.
#[inline(always)]
fn is_error(icmp: &Icmp) -> bool {
    if icmp.ip.family == FAMILY_V4 {
        // Destination unreachable (incl. fragmentation needed), time exceeded.
        icmp.kind == ICMP_DEST_UNREACH || icmp.kind == ICMP_TIME_EXCEEDED
    } else {
        icmp.kind == ICMPV6_DEST_UNREACH
            || icmp.kind == ICMPV6_PKT_TOOBIG
            || icmp.kind == ICMPV6_TIME_EXCEED
    }
}

/// The packet quoted inside an ICMP error.
struct Quoted {
    /// Offset of the quoted IP header.
    l3: usize,
    /// Offset of the quoted TCP/UDP header.
    l4: usize,
    proto: u8,
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
}

#[inline(always)]
fn quoted(ctx: &XdpContext, icmp: &Icmp) -> Option<Quoted> {
    let l3 = icmp.l4 + ICMP_HLEN;
    // The quote ends where the outer datagram ends, not where the frame does (a trailer or
    // a short length must not be taken for quoted bytes).
    let end = icmp.ip.l3 + icmp.ip.ip_len as usize;
    let (l4, proto, src, dst) = if icmp.ip.family == FAMILY_V4 {
        let ip = ptr_at(ctx, l3, IPV4_HLEN)?;
        // SAFETY: every offset is within the IPV4_HLEN bytes checked above.
        let (vihl, proto, src, dst) = unsafe {
            (
                load8(ip.add(v4::VER_IHL)),
                load8(ip.add(v4::PROTO)),
                load32(ip.add(v4::SRC)),
                load32(ip.add(v4::DST)),
            )
        };
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < IPV4_HLEN {
            return None;
        }
        (l3 + ihl, proto, [src, 0, 0, 0], [dst, 0, 0, 0])
    } else {
        let ip = ptr_at(ctx, l3, IPV6_HLEN)?;
        // SAFETY: every offset is within the IPV6_HLEN bytes checked above.
        let (vers, proto, src, dst) = unsafe {
            (
                load8(ip) >> 4,
                load8(ip.add(v6::NEXT)),
                load_addr6(ip.add(v6::SRC)),
                load_addr6(ip.add(v6::DST)),
            )
        };
        if vers != 6 {
            return None;
        }
        (l3 + IPV6_HLEN, proto, src, dst)
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    // ICMP quotes at least the first 8 bytes of the transport header: the ports.
    if l4 + 4 > end {
        return None;
    }
    let ports = ptr_at(ctx, l4, 4)?;
    // SAFETY: both ports lie within the 4 bytes checked above.
    let (sport, dport) = unsafe { (load16(ports.add(SPORT)), load16(ports.add(DPORT))) };
    Some(Quoted {
        l3,
        l4,
        proto,
        src,
        dst,
        sport,
        dport,
    })
}

/// Writes `new` over the address at `off` and returns the checksum difference.
#[inline(always)]
fn put_addr(ctx: &XdpContext, off: usize, old: &Addr, new: &Addr, v6: bool) -> Option<u64> {
    if v6 {
        let p = ptr_at(ctx, off, 16)?;
        // SAFETY: 16 bytes checked above.
        unsafe { store_addr(p, new, true) };
    } else {
        let p = ptr_at(ctx, off, 4)?;
        // SAFETY: 4 bytes checked above.
        unsafe { store_addr(p, new, false) };
    }
    Some(csum::diff_addr(old, new, v6))
}

/// Rewrites one end (the source with `src_end`) of the quoted packet; returns the difference
/// for the ICMP checksum (which covers the quoted bytes).
#[inline(always)]
fn rewrite_quoted(
    ctx: &XdpContext,
    icmp: &Icmp,
    q: &Quoted,
    src_end: bool,
    addr: &Addr,
    port: u16,
) -> Option<u64> {
    let v6 = icmp.ip.family == FAMILY_V6;
    let (addr_off, old, port_off, old_port) = match (src_end, v6) {
        (true, false) => (v4::SRC, &q.src, SPORT, q.sport),
        (false, false) => (v4::DST, &q.dst, DPORT, q.dport),
        (true, true) => (v6::SRC, &q.src, SPORT, q.sport),
        (false, true) => (v6::DST, &q.dst, DPORT, q.dport),
    };
    let mut d = put_addr(ctx, q.l3 + addr_off, old, addr, v6)?;
    let pp = ptr_at(ctx, q.l4 + port_off, 2)?;
    // SAFETY: 2 bytes checked above.
    unsafe { store16(pp, port) };
    d += csum::diff16(old_port, port);
    if !v6 {
        // The quoted IPv4 header's own checksum, itself part of the ICMP payload.
        let hc = ptr_at(ctx, q.l3 + v4::CSUM, 2)?;
        // SAFETY: 2 bytes checked above.
        unsafe {
            let old_c = load16(hc);
            let new_c = csum::apply(old_c, csum::diff_addr(old, addr, false));
            store16(hc, new_c);
            d += csum::diff16(old_c, new_c);
        }
    }
    Some(d)
}

#[inline(always)]
fn patch_icmp_csum(ctx: &XdpContext, icmp: &Icmp, diff: u64) -> Option<()> {
    let c = ptr_at(ctx, icmp.l4 + ICMP_CSUM, 2)?;
    // SAFETY: 2 bytes checked above.
    unsafe { store16(c, csum::apply(load16(c), diff)) };
    Some(())
}

/// An ICMP error arriving: translated when it is about a VIP flow, else passed untouched.
#[inline(always)]
pub fn handle(ctx: &XdpContext, icmp: &Icmp, cfg: &Config, now: u64) -> u32 {
    if !is_error(icmp) {
        return crate::pass();
    }
    let Some(q) = quoted(ctx, icmp) else {
        return crate::pass();
    };
    let vip = VipKey {
        addr: q.src,
        port: q.sport,
        proto: q.proto,
        family: icmp.ip.family,
    };
    if q.src == icmp.ip.dst {
        // SAFETY: copied out at once.
        if let Some(svc) = unsafe { ZDD_SERVICES.get(&vip).copied() } {
            return to_backend(ctx, icmp, &q, svc.flags, cfg, now);
        }
    }
    // About a packet a client sent, translated by us towards a nat backend.
    let backend = VipKey {
        addr: q.dst,
        port: q.dport,
        proto: q.proto,
        family: icmp.ip.family,
    };
    if let Some((t, _)) = flow::reply_of(&backend, &q.src, q.sport) {
        return match rewrite_quoted(ctx, icmp, &q, false, &t.vip, t.vport)
            .and_then(|d| patch_icmp_csum(ctx, icmp, d))
        {
            Some(()) => {
                count(Stat::IcmpTranslated);
                XDP_PASS
            }
            None => crate::drop(Stat::RewriteFailed),
        };
    }
    crate::pass()
}

/// An error about a packet the VIP sent: to the backend of that flow.
fn to_backend(
    ctx: &XdpContext,
    icmp: &Icmp,
    q: &Quoted,
    flags: u32,
    cfg: &Config,
    now: u64,
) -> u32 {
    let fkey = FlowKey {
        src: q.dst,
        dst: q.src,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        family: icmp.ip.family,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    let Some(flow) = (unsafe { ZDD_FLOWS.get(&fkey).copied() }) else {
        return crate::pass();
    };
    let Some(be) = ZDD_BACKENDS.get(flow.backend as u32) else {
        return crate::pass();
    };
    if be.flags & backend_flags::LIVE == 0 || be.generation != flow.backend_gen {
        return crate::pass();
    }
    // As for ordinary packets: nat routes (TTL − 1), dsr only switches the frame.
    let nat = flags & service_flags::DSR == 0;
    if nat && nat::ttl(ctx, &icmp.ip).unwrap_or(0) <= 1 {
        count(Stat::TtlExpired);
        return XDP_PASS;
    }
    count(Stat::IcmpTranslated);
    let frame = ErrorFrame { icmp, q, be, nat };
    crate::send_to_backend(ctx, &frame, flow.backend, be, cfg, now)
}

/// An ICMP error about a flow, on its way to the flow's backend.
struct ErrorFrame<'a> {
    icmp: &'a Icmp,
    q: &'a Quoted,
    be: &'a Backend,
    nat: bool,
}

impl ToBackend for ErrorFrame<'_> {
    #[inline(always)]
    fn ip(&self) -> &Ip {
        &self.icmp.ip
    }
    #[inline(always)]
    fn nat(&self) -> bool {
        self.nat
    }
    #[inline(always)]
    fn translate(&self, ctx: &XdpContext) -> Option<()> {
        let (icmp, be) = (self.icmp, self.be);
        let v6 = icmp.ip.family == FAMILY_V6;
        let mut d = rewrite_quoted(ctx, icmp, self.q, true, &be.addr, be.port)?;
        let dst_off = if v6 { v6::DST } else { v4::DST };
        let outer = put_addr(ctx, icmp.ip.l3 + dst_off, &icmp.ip.dst, &be.addr, v6)?;
        if v6 {
            // ICMPv6's checksum covers the pseudo-header with the outer destination.
            d += outer;
        } else {
            let hc = ptr_at(ctx, icmp.ip.l3 + v4::CSUM, 2)?;
            // SAFETY: 2 bytes checked above.
            unsafe { store16(hc, csum::apply(load16(hc), outer)) };
        }
        patch_icmp_csum(ctx, icmp, d)
    }
    #[inline(always)]
    fn too_big(&self, _ctx: &XdpContext, _mtu: u16) -> u32 {
        // Never answer an error with an error: one too big for the next hop is dropped.
        crate::drop(Stat::TooBigDropped)
    }
}

/// Answers the frame (as it arrived: nothing rewritten yet) with an ICMP fragmentation
/// needed (IPv4) / packet too big (IPv6) error about it, with the next-hop MTU `mtu`, from
/// the frame's destination (the VIP for a client's frame; for a nat reply, the client) to its
/// sender, ready to go back out where it came in: XDP_TX, counted `too_big`. The MACs are
/// swapped, a VLAN tag is kept, the quote is the first [`QUOTE_V4`] / [`QUOTE_V6`] bytes of
/// the original IP packet. Dropped (`rewrite_failed`) when a helper refuses or the frame is
/// too short to quote.
///
/// A function of its own (a BPF-to-BPF call) that takes plain values and reads the rest
/// (link header, family) from the frame again: it runs only for oversize frames, and inlined
/// into the main function its code and the values it needs would cost every other frame
/// registers and stack (measured: about 10% on the established path). Its stack frame comes
/// on top of the main function's: the two must stay within 512 bytes (376 + 112 now).
#[inline(never)]
pub fn too_big(ctx: *mut xdp_md, mtu: u16) -> u32 {
    let ctx = XdpContext::new(ctx);
    let done = (|| {
        let eth = ptr_at(&ctx, 0, ETH_VLAN_HLEN)?;
        // SAFETY: within the ETH_VLAN_HLEN bytes checked above.
        let (outer, inner) = unsafe {
            (
                u16::from_be(load16(eth.add(ETH_TYPE))),
                u16::from_be(load16(eth.add(ETH_TYPE + 4))),
            )
        };
        // The frame parsed as IPv4 or IPv6, with or without one tag.
        let (l3, ethertype) = if outer == ETH_P_8021Q || outer == ETH_P_8021AD {
            (ETH_VLAN_HLEN, inner)
        } else {
            (ETH_HLEN, outer)
        };
        if ethertype == ETH_P_IPV6 {
            build_too_big::<{ IPV6_HLEN + ICMP_HLEN }, QUOTE_V6>(&ctx, l3, true, mtu)
        } else {
            build_too_big::<{ IPV4_HLEN + ICMP_HLEN }, QUOTE_V4>(&ctx, l3, false, mtu)
        }
    })();
    if done.is_none() {
        return crate::drop(Stat::RewriteFailed);
    }
    count(Stat::TooBig);
    XDP_TX
}

/// [`too_big`] for one family: `HDR` = the new IP and ICMP headers, `QUOTE` = bytes quoted.
#[inline(always)]
fn build_too_big<const HDR: usize, const QUOTE: usize>(
    ctx: &XdpContext,
    l3: usize,
    v6: bool,
    mtu: u16,
) -> Option<()> {
    // Room for the new headers in front: the original frame moves to offset HDR.
    // SAFETY: helper call with the program's context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(HDR as i32)) } != 0 {
        return None;
    }
    // Link header: the MACs swapped, the rest (EtherType, or a VLAN tag and the inner
    // EtherType) copied; with no tag, bytes 14..18 are overwritten by the IP header below.
    let eth = ptr_at(ctx, 0, HDR + ETH_VLAN_HLEN)?;
    // SAFETY: all reads and writes are within the HDR + ETH_VLAN_HLEN bytes checked above.
    unsafe {
        let old = eth.add(HDR);
        for i in 0..6 {
            store8(eth.add(i), load8(old.add(ETH_SRC + i)));
            store8(eth.add(ETH_SRC + i), load8(old.add(i)));
        }
        for i in ETH_TYPE..ETH_VLAN_HLEN {
            store8(eth.add(i), load8(old.add(i)));
        }
    }
    // The new IP and ICMP headers at the old IP header's place, the quote (which starts with
    // the old IP header) right after them.
    let h = ptr_at(ctx, l3, HDR + QUOTE)?;
    let old = h.wrapping_add(HDR);
    // The quote's sum first: few values live across the helper calls, little stack.
    let quote_sum = sum_quote::<QUOTE>(old)?;
    // SAFETY: all reads and writes are within the HDR + QUOTE bytes checked above (no helper
    // that moves the frame ran since); the new headers [h, h + HDR) and the old IP header
    // [h + HDR, ...) do not overlap.
    unsafe {
        if v6 {
            // The quote must come from the packet itself; an oversize one is always long
            // enough (it is longer than an MTU, at least 1280 bytes).
            let ip_len = u16::from_be(load16(old.add(v6::PAYLOAD_LEN))) as usize + IPV6_HLEN;
            if ip_len < QUOTE {
                return None;
            }
            let len = (ICMP_HLEN + QUOTE) as u16;
            store32(h, 0x6000_0000u32.to_be());
            store16(h.add(v6::PAYLOAD_LEN), len.to_be());
            store8(h.add(v6::NEXT), PROTO_ICMPV6);
            store8(h.add(v6::HOP_LIMIT), ERROR_TTL);
            // To the sender, from the frame's destination.
            copy_addr(h.add(v6::DST), old.add(v6::SRC), true);
            copy_addr(h.add(v6::SRC), old.add(v6::DST), true);
            let icmp = h.add(IPV6_HLEN);
            store8(icmp, ICMPV6_PKT_TOOBIG);
            store8(icmp.add(1), 0);
            store16(icmp.add(ICMP_CSUM), 0);
            store32(icmp.add(ICMPV6_MTU), (mtu as u32).to_be());
            // Pseudo-header (addresses, upper-layer length, next header), the header, the
            // quote.
            let sum = sum_words::<32>(h.add(v6::SRC))
                + len.to_be() as u64
                + (PROTO_ICMPV6 as u16).to_be() as u64
                + sum_words::<ICMP_HLEN>(icmp)
                + quote_sum;
            store16(icmp.add(ICMP_CSUM), csum::finish(sum));
        } else {
            // As above: an oversize datagram is longer than an MTU, at least 68 bytes.
            let ip_len = u16::from_be(load16(old.add(v4::TOT_LEN))) as usize;
            if ip_len < QUOTE {
                return None;
            }
            let len = (HDR + QUOTE) as u16;
            store16(h, 0x4500u16.to_be());
            store16(h.add(v4::TOT_LEN), len.to_be());
            store32(h.add(4), (v4::DF as u32).to_be());
            store8(h.add(v4::TTL), ERROR_TTL);
            store8(h.add(v4::PROTO), PROTO_ICMP);
            store16(h.add(v4::CSUM), 0);
            copy_addr(h.add(v4::DST), old.add(v4::SRC), false);
            copy_addr(h.add(v4::SRC), old.add(v4::DST), false);
            store16(h.add(v4::CSUM), csum::finish(sum_words::<IPV4_HLEN>(h)));
            let icmp = h.add(IPV4_HLEN);
            store8(icmp, ICMP_DEST_UNREACH);
            store8(icmp.add(1), ICMP_FRAG_NEEDED);
            store32(icmp.add(ICMP_CSUM), 0);
            store16(icmp.add(ICMP_FRAG_MTU), mtu.to_be());
            let sum = sum_words::<ICMP_HLEN>(icmp) + quote_sum;
            store16(icmp.add(ICMP_CSUM), csum::finish(sum));
        }
    }
    // Cut the frame after the quote.
    let keep = (l3 + HDR + QUOTE) as i64;
    let len = (ctx.data_end() - ctx.data()) as i64;
    // SAFETY: a read of our own local. Volatile, so that LLVM keeps `len` a difference of the
    // two packet pointers and does not fold `keep - len` into arithmetic on `data_end` (which
    // the verifier refuses).
    let len = unsafe { core::ptr::read_volatile(&len) };
    // SAFETY: helper call with the program's context; the delta only shrinks the frame.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, (keep - len) as i32) } != 0 {
        return None;
    }
    Some(())
}

/// Copies an address (16 bytes with `v6`, else 4) from `src` to `dst`.
///
/// # Safety
/// Both point into the frame with room for the address, and do not overlap.
#[inline(always)]
unsafe fn copy_addr(dst: *mut u8, src: *const u8, v6: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        store32(dst, load32(src));
        if v6 {
            store32(dst.add(4), load32(src.add(4)));
            store32(dst.add(8), load32(src.add(8)));
            store32(dst.add(12), load32(src.add(12)));
        }
    }
}

/// Sum of the `N / 2` 16-bit words at `p`.
///
/// # Safety
/// `p` points into the frame with at least `N` bytes left.
#[inline(always)]
unsafe fn sum_words<const N: usize>(p: *const u8) -> u64 {
    let mut s = 0u64;
    for i in 0..N / 2 {
        // SAFETY: the caller's contract.
        s += unsafe { load16(p.add(i * 2)) } as u64;
    }
    s
}

/// Sum of the `N` bytes at `q`, by `bpf_csum_diff` in pieces of at most 512 bytes (its
/// limit). `q` is within a range the caller checked; each piece is checked again here, so
/// the verifier sees a constant size against a known bound. None if the frame is shorter.
#[inline(always)]
fn sum_quote<const N: usize>(q: *mut u8) -> Option<u64> {
    const PIECE: usize = 512;
    let mut s = 0u64;
    let mut off = 0;
    while off < N {
        let n = if N - off < PIECE { N - off } else { PIECE };
        // SAFETY: helper call reading `n` (a multiple of 4, at most 512) bytes of the frame,
        // within the bounds the caller checked for `q`.
        let r = unsafe {
            bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                q.wrapping_add(off) as *mut u32,
                n as u32,
                0,
            )
        };
        if r < 0 {
            return None;
        }
        s += r as u64;
        off += PIECE;
    }
    Some(s)
}
