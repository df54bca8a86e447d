//! The **select** step: a backend for a new flow. Group first (cohort pin, else the split
//! bucket), then the group's Maglev table. Both tables are built by the agent; here they are
//! only indexed, O(1).

use aya_ebpf::maps::lpm_trie::Key;
use zdd_common::{
    Backend, MAX_GROUPS, NO_TABLE, PIN_KEY_FIXED_BITS, PinKey, SLOTS, Service, backend_flags, hash,
    service_flags,
};

use crate::{
    maps::{ZDD_BACKENDS, ZDD_MAGLEV, ZDD_PINS, ZDD_SELECT},
    parse::Packet,
};

/// The hash a service selects by: the 5-tuple, or the client address alone.
#[inline(always)]
fn selection_hash(svc: &Service, pkt: &Packet) -> u32 {
    if svc.flags & service_flags::AFFINITY_CLIENT != 0 {
        hash::client_hash(&pkt.ip.src, pkt.ip.family)
    } else {
        let ip = &pkt.ip;
        hash::flow_hash(&ip.src, &ip.dst, pkt.sport, pkt.dport, ip.proto, ip.family)
    }
}

/// Group of a pinned cohort the source belongs to, if any (longest prefix wins).
#[inline(always)]
fn pinned_group(svc: &Service, pkt: &Packet) -> Option<u32> {
    // SAFETY: Addr is [u32; 4], 16 plain bytes in wire order; any bytes are a valid [u8; 16].
    let addr: [u8; 16] = unsafe { core::mem::transmute(pkt.ip.src) };
    let bits = if pkt.ip.family == zdd_common::FAMILY_V4 {
        32
    } else {
        128
    };
    let key = Key::new(
        PIN_KEY_FIXED_BITS + bits,
        PinKey {
            service: svc.id,
            slot: (svc.slot & 1) as u8,
            family: pkt.ip.family,
            addr,
            _pad: [0; 2],
        },
    );
    ZDD_PINS.get(&key).copied()
}

/// Backend id and entry for a new flow, or None when the chosen group has no backend.
#[inline(always)]
pub fn select(svc: &Service, pkt: &Packet) -> Option<(u16, &'static Backend)> {
    let h = selection_hash(svc, pkt);
    let sel = ZDD_SELECT.get(svc.id * SLOTS + (svc.slot & 1))?;
    let mut group = *sel.buckets.get(hash::split_bucket(h) as usize)? as u32;
    if svc.flags & service_flags::HAS_PINS != 0
        && let Some(g) = pinned_group(svc, pkt)
    {
        group = g;
    }
    let table = *sel.tables.get((group as usize) & (MAX_GROUPS - 1))?;
    if table == NO_TABLE {
        return None;
    }
    let id = *ZDD_MAGLEV
        .get(table)?
        .entries
        .get(hash::maglev_slot(h) as usize)?;
    let be = ZDD_BACKENDS.get(id as u32)?;
    if be.flags & backend_flags::LIVE == 0 {
        return None;
    }
    Some((id, be))
}
