//! The map writer: carries out a plan (`plan.rs`) so that no packet ever sees a half-written
//! change, and says truthfully how far it got.
//!
//! Order of an apply:
//!   1. finish a clean-up an earlier apply left pending (nothing else is written if it fails);
//!   2. plan: ids, group indices, Maglev and split tables, pins — pure, may fail, touches
//!      nothing;
//!   3. stage what no packet can reach yet: new backends, tables and pins into each changed
//!      service's idle slot, port-filter bits that are added, reply targets. A failure here
//!      undoes what was staged: the old config is untouched;
//!   4. flip: one `SERVICES` update per service switches it to its new slot (a hash-map
//!      update replaces the value whole). A failure here flips the done ones back;
//!   5. from here the new config is in force and recorded as applied; clean up what no
//!      packet can reach any more (removed services, old slots' pins, removed backends marked
//!      not live so their flows are re-selected). A failure here is reported as such and
//!      retried by the next apply.

use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key};
use zdd_common::{
    Backend, Counters, MaglevTable, NextHop, PassiveCounters, PinKey, PortFlags, ReplyTarget,
    SLOTS, Selection, Service, ServiceState, VipKey, backend_flags, map_names as n,
};

use super::{
    Dataplane, DataplaneError, Failpoint, map_err, open_mut,
    plan::{self, ApplyReport, Cleanup, Plan, PlanError, marker},
};
use crate::state::{DesiredState, family, wire_addr};

/// How an apply failed, and so what is in force.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Nothing of the new state took effect: every packet sees the previous config.
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("{0}; nothing was changed")]
    NotApplied(DataplaneError),
    /// The new state is in force; leftovers of the old one are still in the maps (harmless
    /// to packets, removed by the next apply).
    #[error(
        "the new config is in force, but removing what it replaced failed: {error} (the next apply retries)"
    )]
    CleanUp {
        report: Box<ApplyReport>,
        error: Box<DataplaneError>,
    },
}

impl ApplyError {
    /// True when the new state took effect despite the error.
    pub fn in_force(&self) -> bool {
        matches!(self, ApplyError::CleanUp { .. })
    }
}

fn set_port(
    m: &mut Array<&mut MapData, PortFlags>,
    p: u16,
    flags: u8,
) -> Result<(), DataplaneError> {
    m.set(
        p as u32,
        PortFlags {
            flags,
            _pad: [0; 3],
        },
        0,
    )
    .map_err(map_err(n::PORTS, "write"))
}

impl Dataplane {
    pub fn applied(&self) -> &super::Applied {
        &self.applied
    }

    /// Makes the maps match `state`, whole or not at all (see the module docs for what a
    /// failure after the flip means).
    pub fn apply(&mut self, state: &DesiredState) -> Result<ApplyReport, ApplyError> {
        self.retry_cleanup().map_err(ApplyError::NotApplied)?;
        let plan = plan::plan(&self.applied, state)?;
        if let Err(e) = self
            .stage(&plan)
            .and_then(|()| self.failpoint(Failpoint::Stage))
        {
            self.unstage(&plan);
            return Err(ApplyError::NotApplied(e));
        }
        if let Err(e) = self.flip(&plan) {
            self.unstage(&plan);
            return Err(ApplyError::NotApplied(e));
        }
        let cleanup = plan::cleanup_after(&self.applied, state, &plan);
        let report = plan.report.clone();
        self.applied.commit(plan, cleanup);
        let pending = self.applied.pending.clone();
        match self
            .failpoint(Failpoint::CleanUp)
            .and_then(|()| self.clean_up(&pending))
        {
            Ok(()) => {
                self.applied.cleaned();
                Ok(report)
            }
            Err(error) => Err(ApplyError::CleanUp {
                report: Box::new(report),
                error: Box::new(error),
            }),
        }
    }

    /// True while a clean-up after an apply is still to be done (it failed once).
    pub fn cleanup_pending(&self) -> bool {
        !self.applied.pending.is_empty()
    }

    /// Retries a pending clean-up. Ok(true) when one was done now.
    pub fn retry_cleanup(&mut self) -> Result<bool, DataplaneError> {
        if self.applied.pending.is_empty() {
            return Ok(false);
        }
        let pending = self.applied.pending.clone();
        self.clean_up(&pending)?;
        self.applied.cleaned();
        Ok(true)
    }

    // The tables are passed by reference on purpose: by value they would be copied onto the
    // stack (a Maglev table is 128 KiB).
    #[allow(clippy::needless_borrows_for_generic_args)]
    fn stage(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        let ncpu = aya::util::nr_cpus()
            .map_err(|(_, e)| DataplaneError::Capacity(format!("cannot count CPUs: {e}")))?;
        let zero = || {
            PerCpuValues::try_from(vec![Counters::default(); ncpu]).map_err(|e| {
                DataplaneError::Capacity(format!("per-CPU counters for {ncpu} CPUs: {e}"))
            })
        };
        for p in &plan.services {
            {
                let mut be: Array<&mut MapData, Backend> = open_mut(&mut self.ebpf, n::BACKENDS)?;
                for b in &p.new_backends {
                    let e = Backend {
                        addr: wire_addr(b.spec.addr.ip()),
                        port: b.spec.addr.port().to_be(),
                        family: family(b.spec.addr.ip()),
                        flags: backend_flags::LIVE,
                        generation: b.generation,
                        _pad: 0,
                    };
                    be.set(b.id as u32, e, 0)
                        .map_err(map_err(n::BACKENDS, "write"))?;
                }
            }
            {
                let mut nh: Array<&mut MapData, NextHop> = open_mut(&mut self.ebpf, n::NEXTHOP)?;
                for b in &p.new_backends {
                    nh.set(b.id as u32, NextHop::default(), 0)
                        .map_err(map_err(n::NEXTHOP, "write"))?;
                }
            }
            {
                let mut st: PerCpuArray<&mut MapData, Counters> =
                    open_mut(&mut self.ebpf, n::BACKEND_STATS)?;
                for b in &p.new_backends {
                    st.set(b.id as u32, zero()?, 0)
                        .map_err(map_err(n::BACKEND_STATS, "write"))?;
                }
            }
            {
                // A reused id starts with no passive signals of its predecessor.
                let mut ps: PerCpuArray<&mut MapData, PassiveCounters> =
                    open_mut(&mut self.ebpf, n::PASSIVE_STATS)?;
                for b in &p.new_backends {
                    let zero = PerCpuValues::try_from(vec![PassiveCounters::default(); ncpu])
                        .map_err(|e| {
                            DataplaneError::Capacity(format!(
                                "per-CPU counters for {ncpu} CPUs: {e}"
                            ))
                        })?;
                    ps.set(b.id as u32, zero, 0)
                        .map_err(map_err(n::PASSIVE_STATS, "write"))?;
                }
            }
            if p.old.is_none() {
                let mut st: PerCpuArray<&mut MapData, Counters> =
                    open_mut(&mut self.ebpf, n::SERVICE_STATS)?;
                st.set(p.svc.id, zero()?, 0)
                    .map_err(map_err(n::SERVICE_STATS, "write"))?;
            }
            {
                let mut mt: Array<&mut MapData, MaglevTable> = open_mut(&mut self.ebpf, n::MAGLEV)?;
                for (tid, t) in &p.tables {
                    mt.set(*tid, &**t, 0).map_err(map_err(n::MAGLEV, "write"))?;
                }
            }
            {
                let mut sel: Array<&mut MapData, Selection> = open_mut(&mut self.ebpf, n::SELECT)?;
                sel.set(p.svc.id * SLOTS + p.svc.slot, &*p.selection, 0)
                    .map_err(map_err(n::SELECT, "write"))?;
            }
            {
                let mut pins: LpmTrie<&mut MapData, PinKey, u32> =
                    open_mut(&mut self.ebpf, n::PINS)?;
                for ((len, k), pin) in p.svc.pins.iter().zip(&p.svc.spec.pins) {
                    let g = p.svc.groups.get(&pin.group).copied().ok_or_else(|| {
                        DataplaneError::Capacity(format!("pin to unknown group {}", pin.group))
                    })? as u32;
                    pins.insert(&Key::new(*len, *k), g, 0)
                        .map_err(map_err(n::PINS, "insert"))?;
                }
            }
        }
        // Port bits: the union of old and new until the clean-up, so both configs' packets
        // are looked at while either may be in force.
        {
            let mut m: Array<&mut MapData, PortFlags> = open_mut(&mut self.ebpf, n::PORTS)?;
            for (p, want) in &plan.ports {
                let have = self.applied.ports.get(p).copied().unwrap_or(0);
                if want | have != have {
                    set_port(&mut m, *p, want | have)?;
                }
            }
        }
        {
            let mut m: HashMap<&mut MapData, VipKey, ReplyTarget> =
                open_mut(&mut self.ebpf, n::REPLIES)?;
            for (k, v) in &plan.replies {
                if self.applied.replies.get(k) != Some(v) {
                    m.insert(k, v, 0).map_err(map_err(n::REPLIES, "insert"))?;
                }
            }
        }
        Ok(())
    }

    /// Undoes what `stage` may have written where a packet can see it (port bits, reply
    /// targets) and the idle slots' pins (they take room in a shared map); tables and unused
    /// ids are left as they are, unreachable. Best effort: it runs after a failure.
    fn unstage(&mut self, plan: &Plan) {
        if let Ok(mut pins) =
            open_mut::<LpmTrie<&mut MapData, PinKey, u32>>(&mut self.ebpf, n::PINS)
        {
            for p in &plan.services {
                for (len, k) in &p.svc.pins {
                    let _ = pins.remove(&Key::new(*len, *k));
                }
            }
        }
        if let Ok(mut m) = open_mut::<Array<&mut MapData, PortFlags>>(&mut self.ebpf, n::PORTS) {
            for p in plan.ports.keys() {
                let have = self.applied.ports.get(p).copied().unwrap_or(0);
                let _ = set_port(&mut m, *p, have);
            }
        }
        if let Ok(mut m) =
            open_mut::<HashMap<&mut MapData, VipKey, ReplyTarget>>(&mut self.ebpf, n::REPLIES)
        {
            for k in plan.replies.keys() {
                let _ = match self.applied.replies.get(k) {
                    Some(v) => m.insert(k, v, 0),
                    None => m.remove(k),
                };
            }
        }
    }

    fn flip(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        let mut states_done = Vec::new();
        let mut markers_added = Vec::new();
        let mut services_done = Vec::new();
        let result = self.flip_steps(
            plan,
            &mut states_done,
            &mut markers_added,
            &mut services_done,
        );
        if result.is_err() {
            // Put back what was switched: the old slots are untouched, so this restores the
            // previous config exactly.
            if let Ok(mut m) =
                open_mut::<HashMap<&mut MapData, VipKey, Service>>(&mut self.ebpf, n::SERVICES)
            {
                for i in &services_done {
                    let q = &plan.services[*i];
                    let _ = match q.old {
                        Some(o) => m.insert(q.svc.key, o, 0),
                        None => m.remove(&q.svc.key),
                    };
                }
                for mk in &markers_added {
                    let _ = m.remove(mk);
                }
            }
            if let Ok(mut st) =
                open_mut::<Array<&mut MapData, ServiceState>>(&mut self.ebpf, n::SERVICE_STATE)
            {
                for i in &states_done {
                    let q = &plan.services[*i];
                    let _ = st.set(q.svc.id, q.old_state, 0);
                }
            }
        }
        result
    }

    fn flip_steps(
        &mut self,
        plan: &Plan,
        states_done: &mut Vec<usize>,
        markers_added: &mut Vec<VipKey>,
        services_done: &mut Vec<usize>,
    ) -> Result<(), DataplaneError> {
        {
            // Established flows check their service here; new ones read the SERVICES value.
            let mut st: Array<&mut MapData, ServiceState> =
                open_mut(&mut self.ebpf, n::SERVICE_STATE)?;
            for (i, p) in plan.services.iter().enumerate() {
                st.set(p.svc.id, p.state(), 0)
                    .map_err(map_err(n::SERVICE_STATE, "write"))?;
                states_done.push(i);
            }
        }
        let mut m: HashMap<&mut MapData, VipKey, Service> = open_mut(&mut self.ebpf, n::SERVICES)?;
        let marker_value = Service {
            id: u32::MAX,
            ..Default::default()
        };
        for p in &plan.services {
            let mk = marker(&p.svc.key);
            if !self.applied.markers.contains(&mk) && !markers_added.contains(&mk) {
                m.insert(mk, marker_value, 0)
                    .map_err(map_err(n::SERVICES, "insert"))?;
                markers_added.push(mk);
            }
        }
        for (i, p) in plan.services.iter().enumerate() {
            if i + 1 == plan.services.len() && self.failpoint == Some(Failpoint::Flip) {
                self.failpoint = None;
                return Err(DataplaneError::Injected(Failpoint::Flip));
            }
            m.insert(p.svc.key, p.value(), 0)
                .map_err(map_err(n::SERVICES, "insert"))?;
            services_done.push(i);
        }
        Ok(())
    }

    /// Removes what no packet can reach any more. Idempotent: a retry after a partial run
    /// redoes only harmless writes.
    fn clean_up(&mut self, c: &Cleanup) -> Result<(), DataplaneError> {
        // A missing entry is what a remove aims for: only other errors count.
        let gone = |r: Result<(), aya::maps::MapError>| match r {
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        };
        {
            let mut m: HashMap<&mut MapData, VipKey, Service> =
                open_mut(&mut self.ebpf, n::SERVICES)?;
            for k in c.services.iter().chain(&c.markers) {
                gone(m.remove(k)).map_err(map_err(n::SERVICES, "remove"))?;
            }
        }
        {
            let mut st: Array<&mut MapData, ServiceState> =
                open_mut(&mut self.ebpf, n::SERVICE_STATE)?;
            for id in &c.service_ids {
                // The generation is kept in `service_generations`, so a reuse of the id gets
                // a new one.
                st.set(*id, ServiceState::default(), 0)
                    .map_err(map_err(n::SERVICE_STATE, "write"))?;
            }
        }
        {
            let mut pins: LpmTrie<&mut MapData, PinKey, u32> = open_mut(&mut self.ebpf, n::PINS)?;
            for (len, k) in &c.pins {
                gone(pins.remove(&Key::new(*len, *k))).map_err(map_err(n::PINS, "remove"))?;
            }
        }
        {
            let mut be: Array<&mut MapData, Backend> = open_mut(&mut self.ebpf, n::BACKENDS)?;
            for id in &c.backends {
                let mut e = be
                    .get(&(*id as u32), 0)
                    .map_err(map_err(n::BACKENDS, "read"))?;
                e.flags &= !backend_flags::LIVE;
                be.set(*id as u32, e, 0)
                    .map_err(map_err(n::BACKENDS, "write"))?;
            }
        }
        {
            let mut m: HashMap<&mut MapData, VipKey, ReplyTarget> =
                open_mut(&mut self.ebpf, n::REPLIES)?;
            for k in &c.replies {
                gone(m.remove(k)).map_err(map_err(n::REPLIES, "remove"))?;
            }
        }
        {
            let mut m: Array<&mut MapData, PortFlags> = open_mut(&mut self.ebpf, n::PORTS)?;
            for (p, v) in &c.ports {
                set_port(&mut m, *p, *v)?;
            }
        }
        Ok(())
    }

    /// Forgets every cached next hop: the data path re-resolves at the next packet.
    pub fn invalidate_nexthops(&mut self) -> Result<usize, DataplaneError> {
        let ids = self.applied.backend_ids();
        let mut nh: Array<&mut MapData, NextHop> = open_mut(&mut self.ebpf, n::NEXTHOP)?;
        for id in &ids {
            nh.set(*id as u32, NextHop::default(), 0)
                .map_err(map_err(n::NEXTHOP, "write"))?;
        }
        // Reply next hops (per CPU, by client) are many: one epoch write marks them all stale.
        let mut epoch: Array<&mut MapData, u64> = open_mut(&mut self.ebpf, n::HOP_EPOCH)?;
        epoch
            .set(0, coarse_now_ns(), 0)
            .map_err(map_err(n::HOP_EPOCH, "write"))?;
        Ok(ids.len())
    }
}

/// `CLOCK_MONOTONIC_COARSE`, the clock of the data path's `bpf_ktime_get_coarse_ns`.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
