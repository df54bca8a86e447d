//! The **flow table** step. A flow is pinned to its backend at its first packet and stays
//! there until it closes (FIN both ways or RST, then a short grace) or idles out. nat replies
//! find their flow here too (`reply_of`).

use zdd_common::{
    Backend, Config, FlowEntry, FlowKey, PROTO_TCP, ReplyTarget, Service, VipKey, backend_flags,
    flow_flags,
};

use crate::{
    maps::{ZDD_BACKENDS, ZDD_FLOWS, ZDD_REPLIES, ZDD_SERVICE_STATE},
    parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN},
};

/// `last_seen` is refreshed at most this often (about 1 s), to keep established packets
/// from dirtying the entry's cache line on every packet. The `variant` build (a program of
/// other bytes and the same behaviour, for the upgrade test) differs here by a nanosecond.
#[cfg(not(feature = "variant"))]
const TOUCH_NS: u64 = 1 << 30;
#[cfg(feature = "variant")]
const TOUCH_NS: u64 = (1 << 30) + 1;

#[inline(always)]
pub fn key(pkt: &Packet) -> FlowKey {
    FlowKey {
        src: pkt.ip.src,
        dst: pkt.ip.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.ip.proto,
        family: pkt.ip.family,
        _pad: [0; 2],
    }
}

/// An established flow on a live backend of a live service.
pub struct Hit {
    pub backend: u16,
    pub be: &'static Backend,
    pub service: u32,
    pub service_flags: u32,
}

/// What the flow table says about a packet to a VIP port.
pub enum Lookup {
    Hit(Hit),
    /// Established, but its backend is gone: select again.
    Orphan,
    /// No entry, or an expired, closed one, or one of a service that is gone.
    Miss,
}

#[inline(always)]
fn timeout(cfg: &Config, proto: u8, flags: u8) -> u64 {
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
fn closing(flags: u8, tcp_flags: u8, fin_bit: u8) -> u8 {
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
    let age = now.saturating_sub(e.last_seen);
    if age > timeout(cfg, pkt.ip.proto, e.flags)
        || (pkt.tcp_flags & TCP_SYN != 0 && e.flags & flow_flags::CLOSING != 0)
    {
        return Lookup::Miss;
    }
    let Some(state) = ZDD_SERVICE_STATE.get(e.service as u32) else {
        return Lookup::Miss;
    };
    if state.generation == 0 || state.generation as u8 != e.service_gen {
        return Lookup::Miss;
    }
    let Some(be) = ZDD_BACKENDS.get(e.backend as u32) else {
        return Lookup::Orphan;
    };
    if be.flags & backend_flags::LIVE == 0 || be.generation != e.backend_gen {
        return Lookup::Orphan;
    }
    if age > TOUCH_NS {
        e.last_seen = now;
    }
    if pkt.ip.proto == PROTO_TCP && pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        e.flags = closing(e.flags, pkt.tcp_flags, flow_flags::FIN_FWD);
    }
    Lookup::Hit(Hit {
        backend: e.backend,
        be,
        service: e.service as u32,
        service_flags: state.flags,
    })
}

/// Records a new flow. False when the table refused it.
#[inline(always)]
pub fn insert(
    key: &FlowKey,
    backend: u16,
    be: &Backend,
    svc: &Service,
    pkt: &Packet,
    now: u64,
) -> bool {
    let entry = FlowEntry {
        backend,
        backend_gen: be.generation,
        service: svc.id as u16,
        service_gen: svc.generation as u8,
        flags: if pkt.ip.proto == PROTO_TCP {
            closing(0, pkt.tcp_flags, flow_flags::FIN_FWD)
        } else {
            0
        },
        last_seen: now,
    };
    ZDD_FLOWS.insert(key, &entry, 0).is_ok()
}

/// A packet from a nat backend: the VIP to translate it back to, if it answers a flow zdd
/// pinned to that backend. `client`/`cport` are the reply's destination.
#[inline(always)]
pub fn reply_of(
    backend: &VipKey,
    client: &zdd_common::Addr,
    cport: u16,
) -> Option<(ReplyTarget, *mut FlowEntry)> {
    // SAFETY: copied out at once.
    let t = unsafe { ZDD_REPLIES.get(backend).copied() }?;
    let fwd = FlowKey {
        src: *client,
        dst: t.vip,
        sport: cport,
        dport: t.vport,
        proto: backend.proto,
        family: backend.family,
        _pad: [0; 2],
    };
    let e = ZDD_FLOWS.get_ptr_mut(&fwd)?;
    // SAFETY: a valid entry for this program run, as in `lookup`.
    if unsafe { (*e).backend } != t.backend {
        return None;
    }
    Some((t, e))
}

/// A FIN or RST from the backend.
///
/// # Safety
/// `e` is a flow entry returned by [`reply_of`] in this program run.
#[inline(always)]
pub unsafe fn note_reply_close(e: *mut FlowEntry, tcp_flags: u8) {
    // SAFETY: the caller's contract: the entry stays valid for this program run (RCU); a
    // concurrent update on another CPU can at worst lose a flag bit.
    unsafe { (*e).flags = closing((*e).flags, tcp_flags, flow_flags::FIN_REV) };
}
