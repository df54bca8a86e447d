//! Active flows per backend, counted from what the data path knows: the entries of the flow
//! table (`ZDD_FLOWS`) pinned to the backend (its id and generation) that have not ended —
//! not closing (no RST, no FIN in both directions; for dsr, whose replies the data path
//! never sees, no FIN from the client) and seen within the idle timeout of their protocol.
//!
//! The table is read with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6), thousands of entries a
//! syscall, from its own handle on the pinned map, so counting runs on a blocking thread and
//! never holds up the agent's owner task.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::{MapData, MapError};
use zdd_common::{FlowEntry, FlowKey, PROTO_TCP, flow_flags, map_names};

use super::DataplaneError;

/// What counting needs to know besides the table.
#[derive(Clone, Copy, Debug)]
pub struct CountRules {
    pub now_ns: u64,
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
}

/// Active flows by (backend id, backend generation).
pub type FlowCounts = HashMap<(u16, u16), u64>;

/// Whether an entry is a flow that has not ended. `dsr`: the service forwards dsr (replies
/// unseen, so a client FIN ends the flow as far as anyone can tell).
pub fn is_active(e: &FlowEntry, proto: u8, dsr: bool, r: &CountRules) -> bool {
    if e.flags & flow_flags::CLOSING != 0 {
        return false;
    }
    if dsr && e.flags & flow_flags::FIN_FWD != 0 {
        return false;
    }
    let idle = if proto == PROTO_TCP {
        r.tcp_idle_ns
    } else {
        r.udp_idle_ns
    };
    r.now_ns.saturating_sub(e.last_seen) < idle
}

/// A handle on the pinned flow table, for counting.
pub struct FlowTable {
    map: MapData,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BATCH: usize = 4096;

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

impl FlowTable {
    /// Opens the flow table pinned in `pin_dir` (the layout directory).
    pub fn open(pin_dir: &Path) -> Result<FlowTable, DataplaneError> {
        let map =
            MapData::from_pin(pin_dir.join(map_names::FLOWS)).map_err(|e| DataplaneError::Map {
                name: map_names::FLOWS,
                op: "open pinned",
                source: e,
            })?;
        Ok(FlowTable { map })
    }

    /// Calls `f` for every entry. Batches of `BATCH` entries; entries added or evicted while
    /// it runs may be missed or seen (the counts are a snapshot of a moving table).
    pub fn for_each(&self, mut f: impl FnMut(&FlowKey, &FlowEntry)) -> Result<(), DataplaneError> {
        let fd = self.map.fd().as_fd().as_raw_fd();
        let mut keys = vec![FlowKey::default(); BATCH];
        let mut values = vec![FlowEntry::default(); BATCH];
        // The kernel's batch token for hash maps is a bucket index (u32); a key-sized buffer
        // is what its documentation asks for.
        let mut token_in = [0u8; size_of::<FlowKey>()];
        let mut token_out = [0u8; size_of::<FlowKey>()];
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    token_in.as_mut_ptr() as u64
                },
                out_batch: token_out.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            // SAFETY: the bpf syscall with an attr whose pointers name buffers of BATCH keys
            // and values and key-sized tokens, all alive for the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    size_of::<BatchAttr>() as u32,
                )
            };
            let err = (rc < 0).then(std::io::Error::last_os_error);
            let n = attr.count as usize;
            for i in 0..n.min(BATCH) {
                f(&keys[i], &values[i]);
            }
            match err {
                None => {}
                // The end of the table.
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Some(e) => {
                    return Err(DataplaneError::Map {
                        name: map_names::FLOWS,
                        op: "batch lookup",
                        source: MapError::SyscallError(aya::sys::SyscallError {
                            call: "bpf_map_lookup_batch",
                            io_error: e,
                        }),
                    });
                }
            }
            token_in = token_out;
            first = false;
        }
    }

    /// Active flows per backend. `dsr_services`: ids of services that forward dsr.
    pub fn count(
        &self,
        rules: &CountRules,
        dsr_services: &std::collections::BTreeSet<u16>,
    ) -> Result<FlowCounts, DataplaneError> {
        let mut out = FlowCounts::new();
        self.for_each(|k, e| {
            if is_active(e, k.proto, dsr_services.contains(&e.service), rules) {
                *out.entry((e.backend, e.backend_gen)).or_default() += 1;
            }
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_and_idle_flows_are_not_active() {
        let r = CountRules {
            now_ns: 100_000_000_000,
            tcp_idle_ns: 10_000_000_000,
            udp_idle_ns: 1_000_000_000,
        };
        let e = |flags: u8, age_ns: u64| FlowEntry {
            flags,
            last_seen: r.now_ns - age_ns,
            ..Default::default()
        };
        assert!(is_active(&e(0, 0), PROTO_TCP, false, &r));
        assert!(is_active(&e(flow_flags::FIN_FWD, 0), PROTO_TCP, false, &r));
        assert!(!is_active(&e(flow_flags::FIN_FWD, 0), PROTO_TCP, true, &r));
        assert!(!is_active(&e(flow_flags::CLOSING, 0), PROTO_TCP, false, &r));
        assert!(!is_active(&e(0, 11_000_000_000), PROTO_TCP, false, &r));
        assert!(is_active(
            &e(0, 500_000_000),
            zdd_common::PROTO_UDP,
            false,
            &r
        ));
        assert!(!is_active(
            &e(0, 2_000_000_000),
            zdd_common::PROTO_UDP,
            false,
            &r
        ));
    }
}
