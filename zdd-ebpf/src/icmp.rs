//! ICMP errors about VIP flows, so that path MTU discovery (and the other errors) work
//! through the edge host:
//!
//! - towards the backend: an error about a packet the VIP sent (a reply, translated by us)
//!   reaches the edge addressed to the VIP. It goes on to the flow's backend with the outer
//!   destination and the quoted packet's source put back to the backend's (nat), or with
//!   only the MACs changed (dsr), so the backend lowers its path MTU.
//! - towards the client: an error about a packet a client sent (after translation, to a
//!   backend) gets the VIP back in the quoted destination; the kernel forwards it.
//!
//! Only ICMP frames pay for this; everything else never reaches here.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
use zdd_common::{
    Addr, Config, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Stat, VipKey, backend_flags,
    service_flags,
};

use crate::{
    csum, flow,
    forward::{self, Hop},
    maps::{ZDD_BACKENDS, ZDD_FLOWS, ZDD_SERVICES},
    nat,
    parse::{Packet, load_addr6, load16, load32, ptr_at},
    stats::count,
};

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
fn is_error(icmp: &Packet) -> bool {
    let kind = icmp.tcp_flags;
    if icmp.family == FAMILY_V4 {
        // Destination unreachable (incl. fragmentation needed), time exceeded.
        kind == 3 || kind == 11
    } else {
        // Destination unreachable, packet too big, time exceeded.
        (1..=3).contains(&kind)
    }
}

#[inline(always)]
fn quoted(ctx: &XdpContext, icmp: &Packet) -> Option<Quoted> {
    let l3 = icmp.l4 + 8;
    // The quote ends where the outer datagram ends, not where the frame does (a trailer or
    // a short length must not be taken for quoted bytes).
    let end = icmp.l3 + icmp.ip_len as usize;
    let (l4, proto, src, dst) = if icmp.family == FAMILY_V4 {
        let ip = ptr_at(ctx, l3, 20)?;
        // SAFETY: 20 bytes checked above.
        let (vihl, proto) = unsafe { (*ip, *ip.add(9)) };
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        let src = [load32(unsafe { ip.add(12) }), 0, 0, 0];
        let dst = [load32(unsafe { ip.add(16) }), 0, 0, 0];
        (l3 + ihl, proto, src, dst)
    } else {
        let ip = ptr_at(ctx, l3, 40)?;
        // SAFETY: within the 40 bytes checked above.
        if unsafe { *ip } >> 4 != 6 {
            return None;
        }
        let a = |o: usize| load_addr6(unsafe { ip.add(o) });
        (l3 + 40, unsafe { *ip.add(6) }, a(8), a(24))
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    // ICMP quotes at least the first 8 bytes of the transport header: the ports.
    if l4 + 4 > end {
        return None;
    }
    let ports = ptr_at(ctx, l4, 4)?;
    Some(Quoted {
        l3,
        l4,
        proto,
        src,
        dst,
        sport: load16(ports),
        dport: load16(unsafe { ports.add(2) }),
    })
}

#[inline(always)]
fn store16(p: *mut u8, v: u16) {
    // SAFETY: callers hold a bounds-checked pointer with room for 2 bytes.
    unsafe { (p as *mut u16).write_unaligned(v) }
}

/// Writes `new` over the address at `off` and returns the checksum difference.
#[inline(always)]
fn put_addr(ctx: &XdpContext, off: usize, old: &Addr, new: &Addr, v6: bool) -> Option<u64> {
    if v6 {
        let p = ptr_at(ctx, off, 16)?;
        // SAFETY: 16 bytes checked above.
        unsafe {
            for (i, w) in new.iter().enumerate() {
                (p.add(i * 4) as *mut u32).write_unaligned(*w);
            }
        }
    } else {
        let p = ptr_at(ctx, off, 4)?;
        unsafe { (p as *mut u32).write_unaligned(new[0]) };
    }
    Some(csum::diff_addr(old, new, v6))
}

/// Rewrites one end (source at `addr_off`/`port_off`) of the quoted packet; returns the
/// difference for the ICMP checksum (which covers the quoted bytes).
#[inline(always)]
fn rewrite_quoted(
    ctx: &XdpContext,
    icmp: &Packet,
    q: &Quoted,
    src_end: bool,
    addr: &Addr,
    port: u16,
) -> Option<u64> {
    let v6 = icmp.family == FAMILY_V6;
    let (addr_off, old, port_off, old_port) = match (src_end, v6) {
        (true, false) => (12, &q.src, 0, q.sport),
        (false, false) => (16, &q.dst, 2, q.dport),
        (true, true) => (8, &q.src, 0, q.sport),
        (false, true) => (24, &q.dst, 2, q.dport),
    };
    let mut d = put_addr(ctx, q.l3 + addr_off, old, addr, v6)?;
    let pp = ptr_at(ctx, q.l4 + port_off, 2)?;
    store16(pp, port);
    d += csum::diff16(old_port, port);
    if !v6 {
        // The quoted IPv4 header's own checksum, itself part of the ICMP payload.
        let hc = ptr_at(ctx, q.l3 + 10, 2)?;
        let old_c = load16(hc);
        let new_c = csum::apply(old_c, csum::diff_addr(old, addr, false));
        store16(hc, new_c);
        d += csum::diff16(old_c, new_c);
    }
    Some(d)
}

#[inline(always)]
fn patch_icmp_csum(ctx: &XdpContext, icmp: &Packet, diff: u64) -> Option<()> {
    let c = ptr_at(ctx, icmp.l4 + 2, 2)?;
    store16(c, csum::apply(load16(c), diff));
    Some(())
}

pub fn handle(ctx: &XdpContext, icmp: &Packet, cfg: &Config, now: u64) -> u32 {
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
        family: icmp.family,
    };
    if q.src == icmp.dst {
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
        family: icmp.family,
    };
    if let Some((t, _)) = flow::reply_of(&backend, &q.src, q.sport) {
        match rewrite_quoted(ctx, icmp, &q, false, &t.vip, t.vport)
            .and_then(|d| patch_icmp_csum(ctx, icmp, d))
        {
            Some(()) => {
                count(Stat::IcmpTranslated);
                return XDP_PASS;
            }
            None => return crate::drop(Stat::Malformed),
        }
    }
    crate::pass()
}

/// An error about a packet the VIP sent: to the backend of that flow.
fn to_backend(
    ctx: &XdpContext,
    icmp: &Packet,
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
        family: icmp.family,
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
    let v6 = icmp.family == FAMILY_V6;
    if flags & service_flags::DSR == 0 {
        // As for ordinary packets: nat routes (TTL − 1), dsr only switches the frame.
        if nat::ttl(ctx, icmp).unwrap_or(0) <= 1 {
            count(Stat::TtlExpired);
            return XDP_PASS;
        }
        let done = (|| {
            let mut d = rewrite_quoted(ctx, icmp, q, true, &be.addr, be.port)?;
            let outer = put_addr(
                ctx,
                icmp.l3 + if v6 { 24 } else { 16 },
                &icmp.dst,
                &be.addr,
                v6,
            )?;
            if v6 {
                // ICMPv6's checksum covers the pseudo-header with the outer destination.
                d += outer;
            } else {
                let hc = ptr_at(ctx, icmp.l3 + 10, 2)?;
                store16(hc, csum::apply(load16(hc), outer));
            }
            patch_icmp_csum(ctx, icmp, d)
        })();
        if done.is_none() {
            return crate::drop(Stat::Malformed);
        }
    }
    count(Stat::IcmpTranslated);
    match forward::to_backend(ctx, icmp, flow.backend, be, cfg, now) {
        Hop::Via(nh) => {
            if flags & service_flags::DSR == 0 {
                nat::decrement_ttl(ctx, icmp);
            }
            count(Stat::Forward);
            forward::send(ctx, &nh)
        }
        Hop::Unresolved if flags & service_flags::DSR == 0 => {
            count(Stat::PassToKernel);
            XDP_PASS
        }
        Hop::Unresolved => crate::drop(Stat::Unresolved),
        Hop::Failed => crate::drop(Stat::FibFailure),
    }
}
