//! Counter reads: per-CPU values summed.

use aya::maps::PerCpuArray;
use zdd_common::{Counters, STAT_COUNT, Stat, map_names};

use super::{Dataplane, DataplaneError, map_err};

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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl Dataplane {
    pub fn stats(&self) -> Result<Stats, DataplaneError> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::GLOBAL_STATS).unwrap())
                .map_err(map_err(map_names::GLOBAL_STATS))?;
        let mut values = Vec::with_capacity(STAT_COUNT as usize);
        for s in Stat::ALL {
            let v = m
                .get(&(s as u32), 0)
                .map_err(map_err(map_names::GLOBAL_STATS))?;
            values.push((s.name(), v.iter().sum()));
        }
        Ok(Stats { values })
    }

    fn counters(&self, map: &'static str, index: u32) -> Result<CounterSnapshot, DataplaneError> {
        let m: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.ebpf.map(map).unwrap()).map_err(map_err(map))?;
        let v = m.get(&index, 0).map_err(map_err(map))?;
        Ok(v.iter()
            .fold(CounterSnapshot::default(), |a, c| CounterSnapshot {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
                new_flows: a.new_flows + c.new_flows,
            }))
    }

    /// Counters of a service by name, if it is applied.
    pub fn service_counters(&self, name: &str) -> Result<Option<CounterSnapshot>, DataplaneError> {
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
    ) -> Result<Option<CounterSnapshot>, DataplaneError> {
        match self.applied().backend_id(service, backend) {
            Some(id) => Ok(Some(self.counters(map_names::BACKEND_STATS, id as u32)?)),
            None => Ok(None),
        }
    }
}
