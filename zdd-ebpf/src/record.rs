//! Part of the **select** step: the new-flow record limit (dsr only). Recording a flow is the most expensive step of a
//! new flow (an LRU insert); a flood of new flows above the limit is forwarded by the
//! current tables without entries, so it cannot evict the established flows' entries. A
//! later packet of an unrecorded flow selects the same backend while the tables are
//! unchanged, and is recorded once the rate falls. nat flows are always recorded: their
//! replies are translated by the entry.

use zdd_common::Config;

use crate::maps::ZDD_RECORDS;

const WINDOW_NS: u64 = 1_000_000_000;

/// Whether this CPU may record one more flow in the current one-second window.
#[inline(always)]
pub fn may_record(cfg: &Config, now: u64) -> bool {
    if cfg.record_limit == 0 {
        return true;
    }
    let Some(w) = ZDD_RECORDS.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU slot, only this CPU writes it.
    unsafe {
        if now.saturating_sub((*w).start_ns) >= WINDOW_NS {
            (*w).start_ns = now;
            (*w).count = 1;
            return true;
        }
        (*w).count += 1;
        (*w).count <= cfg.record_limit as u64
    }
}
