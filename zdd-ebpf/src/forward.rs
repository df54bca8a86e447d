//! The **forward** step. The next hop comes from `bpf_fib_lookup`; a backend's is cached in
//! `ZDD_NEXTHOP`, a client's (nat replies) in `ZDD_REPLY_HOPS`, each refreshed after
//! `nexthop_ttl_ns` and dropped by the agent on route and neighbour changes, so an
//! established flow pays array reads, not a FIB walk, in both directions. The cache keeps
//! the route's MTU too, so a frame too big for it is caught with or without a FIB walk. An
//! unresolved neighbour is left to the kernel once.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use zdd_common::{Addr, Backend, Config, FAMILY_V4, NextHop, REPLY_HOP_SLOTS, Stat, hash};

use crate::{
    maps::{ZDD_FIB_SCRATCH, ZDD_HOP_EPOCH, ZDD_NEXTHOP, ZDD_REPLY_HOPS},
    parse::{ETH_DST, ETH_SRC, Ip, ptr_at},
    stats::count,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

pub enum Hop {
    /// The next hop, in its cache slot (never copied: a copy through the stack measurably
    /// slowed the established path). The caller checks the frame against its MTU
    /// (`too_small_for`): a cached one has not been checked.
    Via(&'static NextHop),
    /// The FIB says the frame is larger than the MTU towards the next hop (the MTU, host
    /// order).
    TooBig(u16),
    /// Route found, neighbour not resolved yet: the kernel will resolve it.
    Unresolved,
    /// No route, or forwarding not possible.
    Failed,
}

/// The MTU check of a next hop, cached or fresh.
pub trait NextHopExt {
    /// The frame is larger than the MTU towards this next hop (0: not known, no check).
    fn too_small_for(&self, ip: &Ip) -> bool;
}

impl NextHopExt for NextHop {
    #[inline(always)]
    fn too_small_for(&self, ip: &Ip) -> bool {
        self.mtu != 0 && ip.ip_len > self.mtu
    }
}

/// What a FIB lookup found (the next hop itself is written into the caller's slot).
enum Fib {
    Found,
    TooBig(u16),
    Unresolved,
    Failed,
}

/// FIB lookup for `dst`, from the ingress interface; on success the next hop is written into
/// `out` (resolved at `now`). `tot_len` is the frame's, so the kernel checks the route's MTU
/// (before the neighbour: a frame too big is reported as such even when the neighbour is
/// unresolved); on success it reports the MTU (`mtu_result`, 5.12+).
#[inline(always)]
fn fib(ctx: &XdpContext, ip: &Ip, src: &Addr, dst: &Addr, out: &mut NextHop, now: u64) -> Fib {
    // The parameter block lives in a per-CPU scratch slot, not on the stack: inlined at each
    // lookup site, 64 bytes of stack each would not fit the program's 512.
    let Some(raw) = ZDD_FIB_SCRATCH.get_ptr_mut(0) else {
        return Fib::Failed;
    };
    // Zeroed in place, 8 bytes at a time (a `mem::zeroed` value would be copied in).
    let words = raw as *mut u64;
    for i in 0..core::mem::size_of::<FibParams>() / 8 {
        // SAFETY: within the per-CPU slot (its size is a multiple of 8), which only this CPU
        // uses, for this program run; volatile keeps LLVM from turning it into a memset call.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: the slot is valid and zeroed above; all-zero is a valid value of this C struct.
    let p = unsafe { &mut *raw };
    p.l4_protocol = ip.proto;
    p.__bindgen_anon_1.tot_len = ip.ip_len;
    // SAFETY: `ctx.ctx` is the program's valid `xdp_md` for this run.
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    if ip.family == FAMILY_V4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        p.family = AF_INET6;
        // Word by word, for the same reason as above (no memcpy call).
        for i in 0..4 {
            // SAFETY: writes of plain integers into a C union of same-sized arrays.
            unsafe {
                p.__bindgen_anon_3.ipv6_src[i] = src[i];
                p.__bindgen_anon_4.ipv6_dst[i] = dst[i];
            }
        }
    }
    // SAFETY: helper call with the program's context and a pointer to our stack struct with
    // its exact size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            p as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    // SAFETY: the union's other member is the same u16, written by the kernel.
    let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            *out = NextHop {
                ifindex: p.ifindex,
                mtu,
                smac: p.smac,
                dmac: p.dmac,
                _pad: 0,
                _pad2: 0,
                resolved_at: now.max(1),
            };
            Fib::Found
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Fib::TooBig(mtu),
        BPF_FIB_LKUP_RET_NO_NEIGH => Fib::Unresolved,
        _ => Fib::Failed,
    }
}

/// Next hop towards backend `id`, from the cache when fresh.
#[inline(always)]
pub fn to_backend(ctx: &XdpContext, ip: &Ip, id: u16, be: &Backend, cfg: &Config, now: u64) -> Hop {
    let Some(cached) = ZDD_NEXTHOP.get_ptr_mut(id as u32) else {
        return Hop::Failed;
    };
    // SAFETY: array slot of this backend, valid for the program run; concurrent refreshes
    // write the same values.
    let cached = unsafe { &mut *cached };
    if cached.resolved_at == 0 || now.wrapping_sub(cached.resolved_at) >= cfg.nexthop_ttl_ns {
        match fib(ctx, ip, &ip.src, &be.addr, cached, now) {
            Fib::Found => {}
            Fib::TooBig(mtu) => return Hop::TooBig(mtu),
            Fib::Unresolved => return Hop::Unresolved,
            Fib::Failed => return Hop::Failed,
        }
    }
    Hop::Via(cached)
}

/// Next hop towards `client` for a nat reply (to leave with source `vip`), from the cache
/// when fresh and resolved after the last route or neighbour change.
#[inline(always)]
pub fn to_client(
    ctx: &XdpContext,
    ip: &Ip,
    vip: &Addr,
    client: &Addr,
    cfg: &Config,
    now: u64,
) -> Hop {
    let slot = hash::client_hash(client, ip.family) & (REPLY_HOP_SLOTS - 1);
    let Some(c) = ZDD_REPLY_HOPS.get_ptr_mut(slot) else {
        // Cannot happen (the slot is within the array): no next hop without a place for it.
        return Hop::Failed;
    };
    // SAFETY: per-CPU slot, valid for the program run; only this CPU writes it.
    let c = unsafe { &mut *c };
    let epoch = ZDD_HOP_EPOCH.get(0).copied().unwrap_or(0);
    if !(c.hop.resolved_at > epoch
        && now.wrapping_sub(c.hop.resolved_at) < cfg.nexthop_ttl_ns
        && c.family == ip.family
        && c.addr == *client)
    {
        match fib(ctx, ip, vip, client, &mut c.hop, now) {
            Fib::Found => {
                c.addr = *client;
                c.family = ip.family;
            }
            Fib::TooBig(mtu) => return Hop::TooBig(mtu),
            Fib::Unresolved => return Hop::Unresolved,
            Fib::Failed => return Hop::Failed,
        }
    }
    Hop::Via(&c.hop)
}

/// Writes the next hop's MACs, counts `stat` and sends the frame out of its interface.
#[inline(always)]
pub fn send(ctx: &XdpContext, nh: &NextHop, stat: Stat) -> u32 {
    let Some(eth) = ptr_at(ctx, 0, 12) else {
        return crate::drop(Stat::RewriteFailed);
    };
    // SAFETY: both MACs lie within the 12 bytes checked above; the sources are our own.
    unsafe {
        core::ptr::copy_nonoverlapping(nh.dmac.as_ptr(), eth.add(ETH_DST), 6);
        core::ptr::copy_nonoverlapping(nh.smac.as_ptr(), eth.add(ETH_SRC), 6);
    }
    count(stat);
    // SAFETY: `ctx.ctx` is the program's valid `xdp_md` for this run.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if nh.ifindex == ingress {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(nh.ifindex, 0) as u32 }
}
