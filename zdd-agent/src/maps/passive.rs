//! Passive health signals of a backend, as the data path counts them (`PASSIVE_STATS`, per
//! CPU, summed here): TCP connection attempts sent to it, attempts it answered (SYN-ACK) and
//! resets it sent. nat sees both directions and counts all three; dsr sees only the clients'
//! side, so its `answered` and `resets` stay 0.

use aya::maps::{MapData, PerCpuArray};
use zdd_common::{PassiveCounters, map_names};

use super::{Dataplane, DataplaneError, map_err, open};

impl Dataplane {
    /// The passive counters of a backend (service, backend name), summed over CPUs, if it is
    /// applied. They count from when its id was first given out; take deltas between reads.
    pub fn passive_counters(
        &self,
        service: &str,
        backend: &str,
    ) -> Result<Option<PassiveCounters>, DataplaneError> {
        let Some(id) = self.applied().backend_id(service, backend) else {
            return Ok(None);
        };
        let m: PerCpuArray<&MapData, PassiveCounters> = open(&self.ebpf, map_names::PASSIVE_STATS)?;
        let v = m
            .get(&(id as u32), 0)
            .map_err(map_err(map_names::PASSIVE_STATS, "read"))?;
        Ok(Some(v.iter().fold(PassiveCounters::default(), |a, c| {
            PassiveCounters {
                attempts: a.attempts.wrapping_add(c.attempts),
                answered: a.answered.wrapping_add(c.answered),
                resets: a.resets.wrapping_add(c.resets),
            }
        })))
    }
}
