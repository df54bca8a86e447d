//! Counters: per-CPU, so counting never contends; the agent sums the CPUs. What each one
//! counts: `zdd_common::Stat` and the README's counter table.

use zdd_common::{Counters, Stat};

use crate::{
    maps::{ZDD_BACKEND_STATS, ZDD_GLOBAL_STATS, ZDD_PASSIVE_STATS, ZDD_SERVICE_STATS},
    parse::{TCP_ACK, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(c) = ZDD_GLOBAL_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, valid for the program run; only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(c: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = c {
        // SAFETY: per-CPU slot, valid for the program run; only this CPU writes it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

#[inline(always)]
pub fn count_flow(service: u32, backend: u16, bytes: u64, new_flow: bool) {
    add(ZDD_SERVICE_STATS.get_ptr_mut(service), bytes, new_flow);
    add(
        ZDD_BACKEND_STATS.get_ptr_mut(backend as u32),
        bytes,
        new_flow,
    );
}

/// A client's SYN without ACK taken on for `backend` (nat and dsr): one connection attempt.
#[inline(always)]
pub fn count_attempt(backend: u16) {
    if let Some(c) = ZDD_PASSIVE_STATS.get_ptr_mut(backend as u32) {
        // SAFETY: per-CPU slot, valid for the program run; only this CPU writes it.
        unsafe { (*c).attempts += 1 };
    }
}

/// A reply of `backend` (nat) with SYN, FIN or RST set: a SYN-ACK is an attempt answered, an
/// RST a reset. The caller tests the flags first, so other replies never come here.
#[inline(always)]
pub fn count_reply_signal(backend: u16, tcp_flags: u8) {
    let synack = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    let rst = tcp_flags & TCP_RST != 0;
    if !synack && !rst {
        return;
    }
    if let Some(c) = ZDD_PASSIVE_STATS.get_ptr_mut(backend as u32) {
        // SAFETY: per-CPU slot, valid for the program run; only this CPU writes it.
        unsafe {
            if synack {
                (*c).answered += 1;
            }
            if rst {
                (*c).resets += 1;
            }
        }
    }
}
