//! zdd's XDP program. A packet reads top to bottom, through these steps (the README's "How
//! the data path behaves" has the same names; each module says which step it is):
//!
//! 1. **parse** (`parse`): Ethernet, one VLAN tag, IPv4/IPv6, TCP/UDP/ICMP.
//! 2. **VIP port?** (here): one array read; ports no VIP uses and no nat backend answers
//!    from pass untouched.
//! 3. **flow table** (`flow`): an established flow goes to its backend; a nat reply finds
//!    the flow it answers.
//! 4. **select** (`select`, with `record`): a new flow gets a backend (pin or split → group,
//!    Maglev → backend) and is recorded (dsr: within the record limit).
//! 5. **rewrite** (`nat`): nat changes the destination (or, for a reply, the source back to
//!    the VIP); dsr changes nothing here. Done once the next hop is known (step 6 looks it
//!    up first), so a frame too big for it is still as it arrived.
//! 6. **forward** (`forward`): the next hop (cached, with its MTU), its MACs, out by
//!    XDP_TX/XDP_REDIRECT; a frame too big for it is answered with ICMP instead
//!    (`icmp::too_big`).
//!
//! ICMP errors about VIP flows take their own path (`icmp::handle`). The benchmark's
//! programs and the lab's live in objects of their own (`src/bench.rs`, `src/lab.rs`), never
//! in this one.
#![no_std]
#![no_main]
// Map keys and values are passed by reference: the helpers take pointers, and a by-value
// argument would only add a stack copy.
#![allow(clippy::needless_borrows_for_generic_args)]

mod csum;
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
    Addr, Backend, Config, FlowEntry, FlowKey, PROTO_TCP, ReplyTarget, Service, Stat, VipKey,
    port_flags, service_flags,
};

use crate::{
    flow::Lookup,
    forward::{Hop, NextHopExt},
    maps::{ZDD_CONFIG, ZDD_PORTS, ZDD_SERVICES},
    nat::End,
    parse::{Ip, Packet, Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
};

#[xdp]
pub fn zdd_xdp(ctx: XdpContext) -> u32 {
    let pkt = match parse::parse(&ctx) {
        Parsed::Packet(p) => p,
        Parsed::Fragment { family, dst } => return fragment(family, &dst),
        Parsed::Icmp(icmp) => {
            return match config() {
                Some(cfg) => icmp::handle(&ctx, &icmp, cfg, now()),
                None => pass(),
            };
        }
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
            addr: pkt.ip.src,
            port: pkt.sport,
            proto: pkt.ip.proto,
            family: pkt.ip.family,
        };
        if let Some((target, entry)) = flow::reply_of(&backend, &pkt.ip.dst, pkt.dport) {
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
        addr: pkt.ip.dst,
        port: pkt.dport,
        proto: pkt.ip.proto,
        family: pkt.ip.family,
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
    // SAFETY: presence check only; nothing is read through the reference.
    if unsafe { ZDD_SERVICES.get(&key) }.is_some() {
        return drop(Stat::Fragment);
    }
    pass()
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: plain helper call without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The data-path tunables (`ZDD_CONFIG[0]`, always there), by reference: a copy would take
/// 40 bytes of the 512-byte stack.
#[inline(always)]
fn config() -> Option<&'static Config> {
    ZDD_CONFIG.get(0)
}

/// Forward direction. An established flow needs one hash lookup (the flow table); only a
/// new flow looks its VIP up. None: not a VIP after all, the caller goes on.
#[inline(always)]
fn to_backend(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    let cfg = config()?;
    let now = now();
    let key = flow::key(pkt);
    // A connection's first packet (SYN without ACK) starts a flow whatever the table holds:
    // no lookup (as Katran does). A retransmitted SYN selects again and re-records: the same
    // backend while the tables are unchanged; after a change, a handshake that never
    // completed starts on the new choice, and a reused 5-tuple is a new connection anyway.
    let found = if pkt.ip.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        Lookup::Miss
    } else {
        flow::lookup(&key, pkt, cfg, now)
    };
    // One `deliver` for both branches: inlined once, not twice.
    let (id, be, nat) = match found {
        Lookup::Hit(hit) => {
            stats::count_flow(hit.service, hit.backend, frame_len(ctx), false);
            (
                hit.backend,
                hit.be,
                hit.service_flags & service_flags::DSR == 0,
            )
        }
        _ => match new_flow(ctx, pkt, &key, matches!(found, Lookup::Orphan), cfg, now)? {
            Ok(target) => target,
            Err(verdict) => return Some(verdict),
        },
    };
    Some(deliver(ctx, pkt, id, be, nat, cfg, now))
}

/// A packet without a (usable) flow entry: its service, a backend (id, entry, nat), the flow
/// recorded; or the verdict when the service has no backend for it. None: not a VIP after
/// all.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    orphan: bool,
    cfg: &Config,
    now: u64,
) -> Option<Result<(u16, &'static Backend, bool), u32>> {
    let svc = service(pkt)?;
    let Some((id, be)) = select::select(&svc, pkt) else {
        return Some(Err(drop(Stat::NoBackend)));
    };
    count(if orphan {
        Stat::Reselected
    } else {
        Stat::NewFlow
    });
    let nat = svc.flags & service_flags::DSR == 0;
    if nat || record::may_record(cfg, now) {
        if !flow::insert(key, id, be, &svc, pkt, now) {
            count(Stat::FlowTableFull);
        }
    } else {
        count(Stat::Unrecorded);
    }
    stats::count_flow(svc.id, id, frame_len(ctx), true);
    // A connection attempt (UDP has no flags: 0). Only here, never on an established packet.
    if pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        stats::count_attempt(id);
    }
    Some(Ok((id, be, nat)))
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// Sends a client's frame on to backend `id` (translating it first for nat).
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
    if nat && nat::ttl(ctx, &pkt.ip).unwrap_or(0) <= 1 {
        count(Stat::TtlExpired);
        return XDP_PASS;
    }
    send_to_backend(ctx, &ClientFrame { pkt, be, nat }, id, be, cfg, now)
}

/// A frame on its way to a backend (a client's, or an ICMP error about a flow), as
/// [`send_to_backend`] needs it.
pub(crate) trait ToBackend {
    fn ip(&self) -> &Ip;
    /// nat (translated, routed: TTL − 1) or dsr (only the MACs change).
    fn nat(&self) -> bool;
    /// The nat rewrite, done once the next hop is known (before that, nothing is changed: a
    /// frame too big for the next hop is still as it arrived).
    fn translate(&self, ctx: &XdpContext) -> Option<()>;
    /// The verdict for a frame larger than the next hop's MTU `mtu`.
    fn too_big(&self, ctx: &XdpContext, mtu: u16) -> u32;
}

/// A client's frame to a VIP.
struct ClientFrame<'a> {
    pkt: &'a Packet,
    be: &'a Backend,
    nat: bool,
}

impl ToBackend for ClientFrame<'_> {
    #[inline(always)]
    fn ip(&self) -> &Ip {
        &self.pkt.ip
    }
    #[inline(always)]
    fn nat(&self) -> bool {
        self.nat
    }
    #[inline(always)]
    fn translate(&self, ctx: &XdpContext) -> Option<()> {
        nat::rewrite(ctx, self.pkt, End::Dst, &self.be.addr, self.be.port)
    }
    #[inline(always)]
    fn too_big(&self, ctx: &XdpContext, mtu: u16) -> u32 {
        too_big(ctx, &self.pkt.ip, mtu, self.nat.then_some(self))
    }
}

/// The next hop towards backend `id` and what follows from it: the one place that turns a
/// next hop into a verdict, for every frame sent to a backend.
#[inline(always)]
pub(crate) fn send_to_backend(
    ctx: &XdpContext,
    frame: &impl ToBackend,
    id: u16,
    be: &Backend,
    cfg: &Config,
    now: u64,
) -> u32 {
    let nat = frame.nat();
    match forward::to_backend(ctx, frame.ip(), id, be, cfg, now) {
        Hop::Via(nh) if nh.too_small_for(frame.ip()) => frame.too_big(ctx, nh.mtu),
        Hop::Via(nh) => {
            if nat {
                if frame.translate(ctx).is_none() {
                    return drop(Stat::RewriteFailed);
                }
                nat::decrement_ttl(ctx, frame.ip());
            }
            forward::send(ctx, nh, Stat::Forward)
        }
        Hop::TooBig(mtu) => frame.too_big(ctx, mtu),
        // The kernel forwards this one (already translated) and resolves the neighbour.
        Hop::Unresolved if nat => {
            if frame.translate(ctx).is_none() {
                return drop(Stat::RewriteFailed);
            }
            count(Stat::PassToKernel);
            XDP_PASS
        }
        // dsr: the kernel would route the VIP elsewhere; the agent resolves dsr backends.
        Hop::Unresolved => drop(Stat::Unresolved),
        Hop::Failed => drop(Stat::FibFailure),
    }
}

/// A frame larger than the MTU towards its next hop, still as it arrived. With DF (or
/// IPv6): answered with ICMP (`icmp::too_big`). Without DF (IPv4): translated by `nat` and handed
/// to the kernel, which fragments it; dsr (`nat` None) cannot be, so it is dropped.
#[inline(always)]
fn too_big(ctx: &XdpContext, ip: &Ip, mtu: u16, nat: Option<&impl ToBackend>) -> u32 {
    if ip.dont_fragment {
        // Out of line (a BPF-to-BPF call), only for frames too big: inlined, its code and the
        // values it needs cost every other frame registers and stack (measured: 5-10% on the
        // established path); its stack comes on top of this function's (512 bytes in all).
        return icmp::too_big(ctx.ctx, mtu);
    }
    let Some(frame) = nat else {
        return drop(Stat::TooBigDropped);
    };
    if frame.translate(ctx).is_none() {
        return drop(Stat::RewriteFailed);
    }
    count(Stat::FragmentedByKernel);
    count(Stat::PassToKernel);
    XDP_PASS
}

/// A nat reply, translated back to the VIP (for [`too_big`]).
struct Reply<'a> {
    pkt: &'a Packet,
    t: &'a ReplyTarget,
}

impl ToBackend for Reply<'_> {
    #[inline(always)]
    fn ip(&self) -> &Ip {
        &self.pkt.ip
    }
    #[inline(always)]
    fn nat(&self) -> bool {
        true
    }
    #[inline(always)]
    fn translate(&self, ctx: &XdpContext) -> Option<()> {
        nat::rewrite(ctx, self.pkt, End::Src, &self.t.vip, self.t.vport)?;
        count(Stat::Reverse);
        Some(())
    }
    #[inline(always)]
    fn too_big(&self, ctx: &XdpContext, mtu: u16) -> u32 {
        // The backend hears it from the client (the frame's destination), about its frame
        // as it sent it.
        too_big(ctx, &self.pkt.ip, mtu, Some(self))
    }
}

/// Reply of a nat flow: the backend's address becomes the VIP again.
#[inline(always)]
fn to_client(ctx: &XdpContext, pkt: &Packet, t: &ReplyTarget, entry: *mut FlowEntry) -> u32 {
    if nat::ttl(ctx, &pkt.ip).unwrap_or(0) <= 1 {
        count(Stat::TtlExpired);
        return XDP_PASS;
    }
    // One test for every reply that is not a plain data segment or ACK (UDP: flags 0).
    if pkt.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            // SAFETY: `entry` came from `flow::reply_of` in this run.
            unsafe { flow::note_reply_close(entry, pkt.tcp_flags) };
        }
        // Passive health signals: a SYN-ACK answers an attempt, an RST is a reset.
        stats::count_reply_signal(t.backend, pkt.tcp_flags);
    }
    let reply = Reply { pkt, t };
    let Some(cfg) = config() else {
        return pass();
    };
    match forward::to_client(ctx, &pkt.ip, &t.vip, &pkt.ip.dst, cfg, now()) {
        Hop::Via(nh) if nh.too_small_for(&pkt.ip) => reply.too_big(ctx, nh.mtu),
        Hop::Via(nh) => {
            if nat::rewrite(ctx, pkt, End::Src, &t.vip, t.vport).is_none() {
                return drop(Stat::RewriteFailed);
            }
            nat::decrement_ttl(ctx, &pkt.ip);
            forward::send(ctx, nh, Stat::Reverse)
        }
        Hop::TooBig(mtu) => reply.too_big(ctx, mtu),
        Hop::Unresolved => {
            if reply.translate(ctx).is_none() {
                return drop(Stat::RewriteFailed);
            }
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
