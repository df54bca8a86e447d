//! Step 6: forward. The next hop comes from `bpf_fib_lookup`; a backend's is cached in
//! `NEXTHOP`, a client's (nat replies) in `REPLY_HOPS`, each refreshed after
//! `nexthop_ttl_ns` and dropped by the agent on route and neighbour changes, so an
//! established flow pays array reads, not a FIB walk, in both directions. An unresolved
//! neighbour is left to the kernel once.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use zdd_common::{Addr, Backend, Config, FAMILY_V4, NextHop, REPLY_HOP_SLOTS, hash};

use crate::{
    maps::{ZDD_HOP_EPOCH, ZDD_NEXTHOP, ZDD_REPLY_HOPS},
    parse::{Packet, ptr_at},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[repr(C, align(8))]
struct AlignedParams(FibParams);

pub enum Hop {
    Via(NextHop),
    /// Route found, neighbour not resolved yet: the kernel will resolve it.
    Unresolved,
    /// No route, or forwarding not possible.
    Failed,
}

/// FIB lookup for `dst`, from the ingress interface.
#[inline(always)]
pub fn fib(ctx: &XdpContext, pkt: &Packet, src: &Addr, dst: &Addr) -> Hop {
    // Zeroed in place, 8 bytes at a time: `mem::zeroed` (or a copy of a zeroed value)
    // becomes a byte-at-a-time memset call in BPF.
    let mut raw = core::mem::MaybeUninit::<AlignedParams>::uninit();
    let words = raw.as_mut_ptr() as *mut u64;
    for i in 0..core::mem::size_of::<AlignedParams>() / 8 {
        // SAFETY: within the struct; volatile keeps LLVM from folding it into a memset.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte is initialised above; all-zero is a valid value of this C struct.
    let p = unsafe { &mut (*raw.as_mut_ptr()).0 };
    p.l4_protocol = pkt.proto;
    p.__bindgen_anon_1.tot_len = pkt.ip_len;
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    if pkt.family == FAMILY_V4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        p.family = AF_INET6;
        // Word by word, for the same reason as above (no memcpy call).
        for i in 0..4 {
            unsafe {
                p.__bindgen_anon_3.ipv6_src[i] = src[i];
                p.__bindgen_anon_4.ipv6_dst[i] = dst[i];
            }
        }
    }
    // SAFETY: helper call with a pointer to our stack struct and its exact size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            p as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Hop::Via(NextHop {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
            resolved_at: 0,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Hop::Unresolved,
        _ => Hop::Failed,
    }
}

/// Next hop towards backend `id`, from the cache when fresh.
#[inline(always)]
pub fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    id: u16,
    be: &Backend,
    cfg: &Config,
    now: u64,
) -> Hop {
    let Some(cached) = ZDD_NEXTHOP.get_ptr_mut(id as u32) else {
        return Hop::Failed;
    };
    // SAFETY: array slot of this backend; concurrent refreshes write the same values.
    let cached = unsafe { &mut *cached };
    if cached.resolved_at != 0 && now.wrapping_sub(cached.resolved_at) < cfg.nexthop_ttl_ns {
        return Hop::Via(*cached);
    }
    let hop = fib(ctx, pkt, &pkt.src, &be.addr);
    if let Hop::Via(nh) = &hop {
        *cached = NextHop {
            resolved_at: now.max(1),
            ..*nh
        };
    }
    hop
}

/// Next hop towards `client` for a nat reply (already translated: source `vip`), from the
/// cache when fresh and resolved after the last route or neighbour change.
#[inline(always)]
pub fn to_client(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &Addr,
    client: &Addr,
    cfg: &Config,
    now: u64,
) -> Hop {
    let slot = hash::client_hash(client, pkt.family) & (REPLY_HOP_SLOTS - 1);
    let Some(c) = ZDD_REPLY_HOPS.get_ptr_mut(slot) else {
        return fib(ctx, pkt, vip, client);
    };
    // SAFETY: per-CPU slot, only this CPU writes it.
    let c = unsafe { &mut *c };
    let epoch = ZDD_HOP_EPOCH.get(0).copied().unwrap_or(0);
    if c.hop.resolved_at > epoch
        && now.wrapping_sub(c.hop.resolved_at) < cfg.nexthop_ttl_ns
        && c.family == pkt.family
        && c.addr == *client
    {
        return Hop::Via(c.hop);
    }
    let hop = fib(ctx, pkt, vip, client);
    if let Hop::Via(nh) = &hop {
        c.addr = *client;
        c.family = pkt.family;
        c.hop = NextHop {
            resolved_at: now.max(1),
            ..*nh
        };
    }
    hop
}

/// Writes the next hop's MACs and sends the frame out of its interface.
#[inline(always)]
pub fn send(ctx: &XdpContext, nh: &NextHop) -> u32 {
    let Some(eth) = ptr_at(ctx, 0, 12) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: 12 bytes checked above.
    unsafe {
        core::ptr::copy_nonoverlapping(nh.dmac.as_ptr(), eth, 6);
        core::ptr::copy_nonoverlapping(nh.smac.as_ptr(), eth.add(6), 6);
    }
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if nh.ifindex == ingress {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(nh.ifindex, 0) as u32 }
}
