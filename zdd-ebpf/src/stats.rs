//! Counters: per-CPU, so counting never contends; the agent sums the CPUs. What each one
//! counts: `zdd_common::Stat` and the README's counter table.

use zdd_common::{Counters, Stat};

use crate::maps::{ZDD_BACKEND_STATS, ZDD_GLOBAL_STATS, ZDD_SERVICE_STATS};

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
