//! zdd's XDP program. A packet reads top to bottom:
//!
//!   parse → addressed to a VIP?            → forward direction (to_backend)
//!         → else a reply of a nat flow?     → translate back (to_client)
//!         → else XDP_PASS, untouched
//!
//!   to_backend: flow table hit? else select (pin or split → group, Maglev → backend) and
//!   record the flow (dsr: within the record limit) → rewrite (nat) → next hop → redirect.
#![no_std]
#![no_main]
// Map keys and values are passed by reference: the helpers take pointers, and a by-value
// argument would only add a stack copy.
#![allow(clippy::needless_borrows_for_generic_args)]

mod csum;
mod floor;
mod flow;
mod forward;
mod icmp;
mod maps;
mod nat;
mod parse;
mod record;
mod select;
mod stats;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::xdp,
    programs::XdpContext,
};
use zdd_common::{
    Addr, Backend, Config, FlowEntry, PROTO_TCP, ReplyTarget, Service, Stat, VipKey, port_flags,
    service_flags,
};

use crate::{
    flow::Lookup,
    forward::Hop,
    maps::{ZDD_CONFIG, ZDD_PORTS, ZDD_SERVICES},
    nat::End,
    parse::{Packet, Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
};

#[xdp]
pub fn zdd_xdp(ctx: XdpContext) -> u32 {
    let pkt = match parse::parse(&ctx) {
        Parsed::Packet(p) => p,
        Parsed::Fragment { family, dst } => return fragment(family, &dst),
        Parsed::Icmp(icmp) => return icmp::handle(&ctx, &icmp, &config(), now()),
        Parsed::Other => return pass(),
        Parsed::Malformed => {
            count(Stat::Malformed);
            return XDP_PASS;
        }
    };
    if port_bits(pkt.dport) & port_flags::VIP != 0
        && let Some(verdict) = to_backend(&ctx, &pkt)
    {
        return verdict;
    }
    if port_bits(pkt.sport) & port_flags::BACKEND != 0 {
        let backend = VipKey {
            addr: pkt.src,
            port: pkt.sport,
            proto: pkt.proto,
            family: pkt.family,
        };
        if let Some((target, entry)) = flow::reply_of(&backend, &pkt.dst, pkt.dport) {
            return to_client(&ctx, &pkt, &target, entry);
        }
    }
    pass()
}

#[inline(always)]
pub(crate) fn pass() -> u32 {
    count(Stat::Pass);
    XDP_PASS
}

#[inline(always)]
pub(crate) fn drop(reason: Stat) -> u32 {
    count(reason);
    count(Stat::Drop);
    XDP_DROP
}

#[inline(always)]
fn port_bits(port: u16) -> u8 {
    ZDD_PORTS
        .get(u16::from_be(port) as u32)
        .map(|p| p.flags)
        .unwrap_or(0)
}

#[inline(always)]
fn service(pkt: &Packet) -> Option<Service> {
    let key = VipKey {
        addr: pkt.dst,
        port: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
    };
    // SAFETY: copied out at once; a concurrent replace publishes a whole new value.
    unsafe { ZDD_SERVICES.get(&key).copied() }
}

/// Fragments to a VIP address are dropped (documented policy: they cannot be matched to a
/// flow without reassembly); others pass. A VIP address is marked by port 0, protocol 0.
#[inline(always)]
fn fragment(family: u8, dst: &Addr) -> u32 {
    let key = VipKey {
        addr: *dst,
        port: 0,
        proto: 0,
        family,
    };
    // SAFETY: presence check only.
    if unsafe { ZDD_SERVICES.get(&key) }.is_some() {
        return drop(Stat::Fragment);
    }
    pass()
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn config() -> Config {
    ZDD_CONFIG.get(0).copied().unwrap_or_default()
}

/// Forward direction. An established flow needs one hash lookup (the flow table); only a
/// new flow looks its VIP up. None: not a VIP after all, the caller goes on.
#[inline(always)]
fn to_backend(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    let cfg = config();
    let now = now();
    let key = flow::key(pkt);
    // A connection's first packet (SYN without ACK) starts a flow whatever the table holds:
    // no lookup (as Katran does). A retransmitted SYN selects again and re-records: the same
    // backend while the tables are unchanged; after a change, a handshake that never
    // completed starts on the new choice, and a reused 5-tuple is a new connection anyway.
    let found = if pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        Lookup::Miss
    } else {
        flow::lookup(&key, pkt, &cfg, now)
    };
    if let Lookup::Hit(hit) = found {
        stats::count_flow(hit.service, hit.backend, frame_len(ctx), false);
        let nat = hit.service_flags & service_flags::DSR == 0;
        return Some(deliver(ctx, pkt, hit.backend, hit.be, nat, &cfg, now));
    }
    let svc = service(pkt)?;
    let Some((id, be)) = select::select(&svc, pkt) else {
        return Some(drop(Stat::NoBackend));
    };
    count(if matches!(found, Lookup::Orphan) {
        Stat::Reselected
    } else {
        Stat::NewFlow
    });
    let nat = svc.flags & service_flags::DSR == 0;
    if nat || record::may_record(&cfg, now) {
        if !flow::insert(&key, id, be, &svc, pkt, now) {
            count(Stat::FlowTableFull);
        }
    } else {
        count(Stat::Unrecorded);
    }
    stats::count_flow(svc.id, id, frame_len(ctx), true);
    Some(deliver(ctx, pkt, id, be, nat, &cfg, now))
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// Rewrite (nat) and send to backend `id`.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    pkt: &Packet,
    id: u16,
    be: &Backend,
    nat: bool,
    cfg: &Config,
    now: u64,
) -> u32 {
    if nat {
        if nat::ttl(ctx, pkt).unwrap_or(0) <= 1 {
            count(Stat::TtlExpired);
            return XDP_PASS;
        }
        if nat::rewrite(ctx, pkt, End::Dst, &be.addr, be.port).is_none() {
            return drop(Stat::Malformed);
        }
    }
    match forward::to_backend(ctx, pkt, id, be, cfg, now) {
        Hop::Via(nh) => {
            if nat {
                nat::decrement_ttl(ctx, pkt);
            }
            count(Stat::Forward);
            forward::send(ctx, &nh)
        }
        // The kernel forwards this one (already translated) and resolves the neighbour.
        Hop::Unresolved if nat => {
            count(Stat::PassToKernel);
            XDP_PASS
        }
        // dsr: the kernel would route the VIP elsewhere; the agent resolves dsr backends.
        Hop::Unresolved => drop(Stat::Unresolved),
        Hop::Failed => drop(Stat::FibFailure),
    }
}

/// Reply of a nat flow: the backend's address becomes the VIP again.
#[inline(always)]
fn to_client(ctx: &XdpContext, pkt: &Packet, t: &ReplyTarget, entry: *mut FlowEntry) -> u32 {
    if nat::ttl(ctx, pkt).unwrap_or(0) <= 1 {
        count(Stat::TtlExpired);
        return XDP_PASS;
    }
    if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flow::note_reply_close(entry, pkt.tcp_flags);
    }
    if nat::rewrite(ctx, pkt, End::Src, &t.vip, t.vport).is_none() {
        return drop(Stat::Malformed);
    }
    count(Stat::Reverse);
    let cfg = config();
    match forward::to_client(ctx, pkt, &t.vip, &pkt.dst, &cfg, now()) {
        Hop::Via(nh) => {
            nat::decrement_ttl(ctx, pkt);
            forward::send(ctx, &nh)
        }
        Hop::Unresolved => {
            count(Stat::PassToKernel);
            XDP_PASS
        }
        Hop::Failed => drop(Stat::FibFailure),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
