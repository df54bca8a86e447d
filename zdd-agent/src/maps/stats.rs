//! Counter reads: per-CPU values summed.

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use zdd_common::{Counters, STAT_COUNT, Stat, map_names};

use super::{Dataplane, DataplaneError, map_err, open};

/// Global counters by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub values: Vec<(&'static str, u64)>,
}

impl Stats {
    pub fn get(&self, stat: Stat) -> u64 {
        self.values
            .iter()
            .find(|(n, _)| *n == stat.name())
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
}

/// A per-CPU `Counters` value summed over CPUs.
pub fn total(values: &PerCpuValues<Counters>) -> Counters {
    values.iter().fold(Counters::default(), |a, c| Counters {
        packets: a.packets.wrapping_add(c.packets),
        bytes: a.bytes.wrapping_add(c.bytes),
        new_flows: a.new_flows.wrapping_add(c.new_flows),
    })
}

impl Dataplane {
    pub fn stats(&self) -> Result<Stats, DataplaneError> {
        let m: PerCpuArray<&MapData, u64> = open(&self.ebpf, map_names::GLOBAL_STATS)?;
        let mut values = Vec::with_capacity(STAT_COUNT as usize);
        for s in Stat::ALL {
            let v = m
                .get(&(s as u32), 0)
                .map_err(map_err(map_names::GLOBAL_STATS, "read"))?;
            values.push((s.name(), v.iter().sum()));
        }
        Ok(Stats { values })
    }

    fn counters(&self, map: &'static str, index: u32) -> Result<Counters, DataplaneError> {
        let m: PerCpuArray<&MapData, Counters> = open(&self.ebpf, map)?;
        let v = m.get(&index, 0).map_err(map_err(map, "read"))?;
        Ok(total(&v))
    }

    /// Counters of a service by name, if it is applied.
    pub fn service_counters(&self, name: &str) -> Result<Option<Counters>, DataplaneError> {
        match self.applied().service_id(name) {
            Some(id) => Ok(Some(self.counters(map_names::SERVICE_STATS, id)?)),
            None => Ok(None),
        }
    }

    /// Counters of a backend (service, backend name), if it is applied.
    pub fn backend_counters(
        &self,
        service: &str,
        backend: &str,
    ) -> Result<Option<Counters>, DataplaneError> {
        match self.applied().backend_id(service, backend) {
            Some(id) => Ok(Some(self.counters(map_names::BACKEND_STATS, id as u32)?)),
            None => Ok(None),
        }
    }
}
