//! Step 2 and 4: the flow table. A flow is pinned to its backend at its first packet and
//! stays there until it closes (FIN both ways or RST, then a short grace) or idles out.

use zdd_common::{
    Config, FlowEntry, FlowKey, PROTO_TCP, ReverseEntry, backend_flags, flow_flags,
};

use crate::{
    maps::{ZDD_BACKENDS, ZDD_FLOWS, ZDD_REVERSE},
    parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn key(pkt: &Packet) -> FlowKey {
    FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// What the flow table says about a packet to a VIP.
pub enum Lookup {
    /// Established on a live backend.
    Hit(u16),
    /// Established, but its backend is gone: select again.
    Orphan,
    /// No entry, or an expired or closed one.
    Miss,
}

#[inline(always)]
fn timeout(cfg: &Config, proto: u8, flags: u32) -> u64 {
    if flags & flow_flags::CLOSING != 0 {
        cfg.closing_ns
    } else if proto == PROTO_TCP {
        cfg.tcp_idle_ns
    } else {
        cfg.udp_idle_ns
    }
}

/// Close-state bits after a packet with `tcp_flags` from one side (`fin_bit`).
#[inline(always)]
fn closing(flags: u32, tcp_flags: u8, fin_bit: u32) -> u32 {
    let mut f = flags;
    if tcp_flags & TCP_FIN != 0 {
        f |= fin_bit;
    }
    if tcp_flags & TCP_RST != 0
        || f & (flow_flags::FIN_FWD | flow_flags::FIN_REV)
            == (flow_flags::FIN_FWD | flow_flags::FIN_REV)
    {
        f |= flow_flags::CLOSING;
    }
    f
}

/// Looks the flow up and, on a hit, records this packet (time, FIN/RST).
#[inline(always)]
pub fn lookup(key: &FlowKey, pkt: &Packet, cfg: &Config, now: u64) -> Lookup {
    let Some(e) = ZDD_FLOWS.get_ptr_mut(key) else {
        return Lookup::Miss;
    };
    // SAFETY: the entry stays valid for this program run (RCU); a concurrent update of the
    // same flow on another CPU can at worst lose a timestamp or a flag bit.
    let e = unsafe { &mut *e };
    let expired = now.saturating_sub(e.last_seen) > timeout(cfg, pkt.proto, e.flags);
    let reopened = pkt.tcp_flags & TCP_SYN != 0 && e.flags & flow_flags::CLOSING != 0;
    if expired || reopened {
        return Lookup::Miss;
    }
    let live = match ZDD_BACKENDS.get(e.backend as u32) {
        Some(b) => b.flags & backend_flags::LIVE != 0 && b.generation == e.generation,
        None => false,
    };
    if !live {
        return Lookup::Orphan;
    }
    e.last_seen = now;
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        e.flags = closing(e.flags, pkt.tcp_flags, flow_flags::FIN_FWD);
    }
    Lookup::Hit(e.backend)
}

/// Records a new flow. False when the table refused it.
#[inline(always)]
pub fn insert(key: &FlowKey, backend: u16, generation: u16, pkt: &Packet, now: u64) -> bool {
    let entry = FlowEntry {
        backend,
        generation,
        flags: if pkt.proto == PROTO_TCP {
            closing(0, pkt.tcp_flags, flow_flags::FIN_FWD)
        } else {
            0
        },
        last_seen: now,
    };
    ZDD_FLOWS.insert(key, &entry, 0).is_ok()
}

/// nat: the key under which the backend's answers are found.
#[inline(always)]
pub fn reverse_key(pkt: &Packet, backend_addr: &zdd_common::Addr, backend_port: u16) -> FlowKey {
    FlowKey {
        src: *backend_addr,
        dst: pkt.src,
        sport: backend_port,
        dport: pkt.sport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

#[inline(always)]
pub fn insert_reverse(rkey: &FlowKey, pkt: &Packet, service: u32, now: u64) -> bool {
    let entry = ReverseEntry {
        vip: pkt.dst,
        vport: pkt.dport,
        _pad: 0,
        service,
        last_seen: now,
    };
    ZDD_REVERSE.insert(rkey, &entry, 0).is_ok()
}

/// A FIN or RST from the backend: mark the forward entry, found from the reply's tuple.
#[inline(always)]
pub fn note_reply_close(pkt: &Packet, rev: &ReverseEntry) {
    let fwd = FlowKey {
        src: pkt.dst,
        dst: rev.vip,
        sport: pkt.dport,
        dport: rev.vport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    if let Some(e) = ZDD_FLOWS.get_ptr_mut(&fwd) {
        // SAFETY: as in `lookup`.
        unsafe { (*e).flags = closing((*e).flags, pkt.tcp_flags, flow_flags::FIN_REV) };
    }
}
