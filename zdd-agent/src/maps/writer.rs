//! The map writer: turns a `DesiredState` into map contents, so that no packet ever sees a
//! half-written change.
//!
//! Order of an apply:
//!   1. plan: ids, group indices, Maglev and split tables, pins — pure, may fail, touches
//!      nothing;
//!   2. write what no packet can reach yet: new backends, tables and pins into each changed
//!      service's idle slot, port-filter bits that are added;
//!   3. flip: one `SERVICES` update per service switches it to its new slot (a hash-map
//!      update replaces the value whole). A failure here flips the done ones back;
//!   4. clean up what no packet can reach any more: removed services, old slots' pins and
//!      tables, removed backends (marked not live, so their flows are re-selected).

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key},
};
use zdd_common::{
    Backend, Counters, MAX_BACKENDS, MAX_GROUPS, MAX_MAGLEV_TABLES, MAX_SERVICES, MaglevTable,
    NO_TABLE, NextHop, PIN_KEY_FIXED_BITS, PinKey, PortFlags, ReplyTarget, SLOTS, Selection,
    Service, ServiceState, VipKey, backend_flags, map_names as n, port_flags, service_flags,
};

use super::{Dataplane, DataplaneError, map_err};
use crate::{
    state::{BackendSpec, DesiredState, Forwarding, ServiceSpec, family, wire_addr},
    tables::{maglev, split},
};

#[derive(Clone, Debug)]
struct BackendSlot {
    id: u16,
    generation: u16,
    spec: BackendSpec,
}

#[derive(Clone, Debug)]
struct AppliedService {
    spec: ServiceSpec,
    id: u32,
    generation: u32,
    key: VipKey,
    slot: u32,
    groups: BTreeMap<String, u8>,
    tables: Vec<u32>,
    buckets: Vec<u8>,
    backends: BTreeMap<String, BackendSlot>,
    pins: Vec<(u32, PinKey)>,
}

/// What is in the maps now. Also what an adopting agent found left by its predecessor
/// (`stale_*`): kept running until the first apply replaces it.
#[derive(Default)]
pub struct Applied {
    services: BTreeMap<String, AppliedService>,
    generations: BTreeMap<u16, u16>,
    service_generations: BTreeMap<u32, u32>,
    replies: BTreeMap<VipKey, ReplyTarget>,
    ports: BTreeMap<u16, u8>,
    markers: BTreeSet<VipKey>,
    stale_services: Vec<(VipKey, Service)>,
    stale_backends: BTreeMap<u16, Backend>,
    stale_tables: BTreeSet<u32>,
    stale_pins: Vec<(u32, PinKey)>,
}

impl Applied {
    pub fn service_id(&self, name: &str) -> Option<u32> {
        self.services.get(name).map(|s| s.id)
    }

    pub fn backend_id(&self, service: &str, backend: &str) -> Option<u16> {
        self.services
            .get(service)?
            .backends
            .get(backend)
            .map(|b| b.id)
    }

    /// Group index → name of a service (for tests and status).
    pub fn groups(&self, service: &str) -> Vec<(String, u8)> {
        self.services
            .get(service)
            .map(|s| s.groups.iter().map(|(g, i)| (g.clone(), *i)).collect())
            .unwrap_or_default()
    }

    /// Reads what a previous agent left in pinned maps.
    pub(super) fn adopt(ebpf: &mut Ebpf) -> Result<Applied, DataplaneError> {
        let mut a = Applied::default();
        let services: HashMap<_, VipKey, Service> =
            HashMap::try_from(ebpf.map(n::SERVICES).unwrap()).map_err(map_err(n::SERVICES))?;
        for kv in services.iter() {
            let (k, v) = kv.map_err(map_err(n::SERVICES))?;
            if k.port == 0 && k.proto == 0 {
                a.markers.insert(k);
            } else {
                a.stale_services.push((k, v));
            }
        }
        let select: Array<_, Selection> =
            Array::try_from(ebpf.map(n::SELECT).unwrap()).map_err(map_err(n::SELECT))?;
        for (_, s) in &a.stale_services {
            let sel = select
                .get(&(s.id * SLOTS + s.slot), 0)
                .map_err(map_err(n::SELECT))?;
            a.stale_tables
                .extend(sel.tables.iter().copied().filter(|&t| t != NO_TABLE));
        }
        let backends: Array<_, Backend> =
            Array::try_from(ebpf.map(n::BACKENDS).unwrap()).map_err(map_err(n::BACKENDS))?;
        for (id, b) in backends.iter().enumerate() {
            let b = b.map_err(map_err(n::BACKENDS))?;
            if b.generation != 0 {
                a.generations.insert(id as u16, b.generation);
            }
            if b.flags & backend_flags::LIVE != 0 {
                a.stale_backends.insert(id as u16, b);
            }
        }
        let states: Array<_, ServiceState> = Array::try_from(ebpf.map(n::SERVICE_STATE).unwrap())
            .map_err(map_err(n::SERVICE_STATE))?;
        for (id, st) in states.iter().enumerate() {
            let st = st.map_err(map_err(n::SERVICE_STATE))?;
            if st.generation != 0 {
                a.service_generations.insert(id as u32, st.generation);
            }
        }
        let replies: HashMap<_, VipKey, ReplyTarget> =
            HashMap::try_from(ebpf.map(n::REPLIES).unwrap()).map_err(map_err(n::REPLIES))?;
        for kv in replies.iter() {
            let (k, v) = kv.map_err(map_err(n::REPLIES))?;
            a.replies.insert(k, v);
        }
        let pins: LpmTrie<_, PinKey, u32> =
            LpmTrie::try_from(ebpf.map(n::PINS).unwrap()).map_err(map_err(n::PINS))?;
        for k in pins.keys() {
            let k = k.map_err(map_err(n::PINS))?;
            a.stale_pins.push((k.prefix_len(), k.data()));
        }
        let ports: Array<_, PortFlags> =
            Array::try_from(ebpf.map(n::PORTS).unwrap()).map_err(map_err(n::PORTS))?;
        for (p, f) in ports.iter().enumerate() {
            let f = f.map_err(map_err(n::PORTS))?;
            if f.flags != 0 {
                a.ports.insert(p as u16, f.flags);
            }
        }
        Ok(a)
    }
}

/// What an apply did, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
}

impl std::fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &Vec<String>| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(",")
            }
        };
        write!(
            f,
            "added {} changed {} removed {} unchanged {}",
            list(&self.added),
            list(&self.changed),
            list(&self.removed),
            list(&self.unchanged)
        )
    }
}

/// One service's planned new slot.
struct Plan {
    svc: AppliedService,
    flags: u32,
    tables: Vec<(u32, Box<MaglevTable>)>,
    selection: Box<Selection>,
    new_backends: Vec<BackendSlot>,
    old: Option<Service>,
}

fn vip_key(s: &ServiceSpec) -> VipKey {
    VipKey {
        addr: wire_addr(s.vip.ip()),
        port: s.vip.port().to_be(),
        proto: s.protocol.number(),
        family: family(s.vip.ip()),
    }
}

fn marker(k: &VipKey) -> VipKey {
    VipKey {
        port: 0,
        proto: 0,
        ..*k
    }
}

fn lowest_free<T: Ord + Copy + TryFrom<u32>>(used: &BTreeSet<T>, max: u32) -> Option<T> {
    (0..max)
        .filter_map(|i| T::try_from(i).ok())
        .find(|i| !used.contains(i))
}

fn desired_ports(state: &DesiredState) -> BTreeMap<u16, u8> {
    let mut p: BTreeMap<u16, u8> = BTreeMap::new();
    for s in &state.services {
        *p.entry(s.vip.port()).or_default() |= port_flags::VIP;
        if s.forwarding == Forwarding::Nat {
            for b in &s.backends {
                *p.entry(b.addr.port()).or_default() |= port_flags::BACKEND;
            }
        }
    }
    p
}

impl Dataplane {
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// Makes the maps match `state`, whole or not at all.
    pub fn apply(&mut self, state: &DesiredState) -> Result<ApplyReport, DataplaneError> {
        let mut report = ApplyReport::default();
        let plans = self.plan(state, &mut report)?;
        self.write_idle(&plans)?;
        let ports = desired_ports(state);
        self.write_ports(&ports, true)?;
        let replies = self.desired_replies(state, &plans);
        self.write_replies(&replies)?;
        self.flip(&plans)?;
        self.clean_up(state, plans, ports, &mut report)?;
        self.remove_stale_replies(replies)?;
        Ok(report)
    }

    fn plan(
        &self,
        state: &DesiredState,
        report: &mut ApplyReport,
    ) -> Result<Vec<Plan>, DataplaneError> {
        let a = &self.applied;
        let cap = |m: String| DataplaneError::Capacity(m);
        // Ids in use now stay reserved until the clean-up: packets may still reach them.
        let mut used_services: BTreeSet<u32> = a.services.values().map(|s| s.id).collect();
        used_services.extend(a.stale_services.iter().map(|(_, s)| s.id));
        let mut used_backends: BTreeSet<u16> = a
            .services
            .values()
            .flat_map(|s| s.backends.values().map(|b| b.id))
            .collect();
        used_backends.extend(a.stale_backends.keys());
        let mut used_tables: BTreeSet<u32> = a
            .services
            .values()
            .flat_map(|s| s.tables.iter().copied())
            .collect();
        used_tables.extend(&a.stale_tables);
        let mut claimed_stale: BTreeSet<u16> = BTreeSet::new();

        let mut plans = Vec::new();
        for spec in &state.services {
            let key = vip_key(spec);
            let old = a.services.get(&spec.name).filter(|o| o.key == key);
            if let Some(o) = old {
                if o.spec == *spec {
                    report.unchanged.push(spec.name.clone());
                    continue;
                }
                report.changed.push(spec.name.clone());
            } else {
                report.added.push(spec.name.clone());
            }
            let stale = a
                .stale_services
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, s)| *s);
            let (id, generation, slot, old_value) = match (old, stale) {
                (Some(o), _) => (o.id, o.generation, 1 - o.slot, Some(self.service_value(o))),
                (None, Some(s)) => (s.id, s.generation, 1 - s.slot, Some(s)),
                (None, None) => {
                    let id = lowest_free(&used_services, MAX_SERVICES)
                        .ok_or_else(|| cap(format!("more than {MAX_SERVICES} services")))?;
                    used_services.insert(id);
                    // A new generation, so flows of an earlier service with this id end.
                    let last = a.service_generations.get(&id).copied().unwrap_or(0);
                    let generation = match last.wrapping_add(1) & 0xff {
                        0 => last.wrapping_add(2),
                        _ => last.wrapping_add(1),
                    }
                    .max(1);
                    (id, generation, 0, None)
                }
            };

            // Group indices are stable for the life of a service.
            let mut groups: BTreeMap<String, u8> = BTreeMap::new();
            let names = spec.groups();
            if let Some(o) = old {
                for (g, i) in &o.groups {
                    if names.contains(g) {
                        groups.insert(g.clone(), *i);
                    }
                }
            }
            for g in &names {
                if !groups.contains_key(g) {
                    let taken: BTreeSet<u8> = groups.values().copied().collect();
                    let i = lowest_free(&taken, MAX_GROUPS as u32).ok_or_else(|| {
                        cap(format!("{}: more than {MAX_GROUPS} groups", spec.name))
                    })?;
                    groups.insert(g.clone(), i);
                }
            }

            // Backends keep their id while name and address stay; an adopting agent reuses
            // the id its predecessor gave the same address, so flows carry on.
            let mut backends = BTreeMap::new();
            let mut new_backends = Vec::new();
            for b in &spec.backends {
                let kept = old
                    .and_then(|o| o.backends.get(&b.name))
                    .filter(|s| s.spec.addr == b.addr);
                let slot_ = if let Some(k) = kept {
                    BackendSlot {
                        spec: b.clone(),
                        ..k.clone()
                    }
                } else {
                    let wa = wire_addr(b.addr.ip());
                    let reuse = a.stale_backends.iter().find(|(id, e)| {
                        !claimed_stale.contains(id)
                            && e.addr == wa
                            && e.port == b.addr.port().to_be()
                            && e.family == family(b.addr.ip())
                    });
                    let s = if let Some((id, e)) = reuse {
                        claimed_stale.insert(*id);
                        BackendSlot {
                            id: *id,
                            generation: e.generation,
                            spec: b.clone(),
                        }
                    } else {
                        let id = lowest_free(&used_backends, MAX_BACKENDS)
                            .ok_or_else(|| cap(format!("more than {MAX_BACKENDS} backends")))?;
                        used_backends.insert(id);
                        let generation = a
                            .generations
                            .get(&id)
                            .copied()
                            .unwrap_or(0)
                            .wrapping_add(1)
                            .max(1);
                        BackendSlot {
                            id,
                            generation,
                            spec: b.clone(),
                        }
                    };
                    new_backends.push(s.clone());
                    s
                };
                backends.insert(b.name.clone(), slot_);
            }

            // One Maglev table per group that has a backend with weight.
            let mut selection = Box::new(Selection::default());
            let mut tables = Vec::new();
            for (g, &gi) in &groups {
                let members: Vec<maglev::Member> = backends
                    .values()
                    .filter(|b| &b.spec.group == g)
                    .map(|b| maglev::Member {
                        id: b.id,
                        key: format!("{}@{}", b.spec.name, b.spec.addr),
                        weight: b.spec.weight,
                    })
                    .collect();
                if let Some(entries) = maglev::build(&members) {
                    let tid = lowest_free(&used_tables, MAX_MAGLEV_TABLES).ok_or_else(|| {
                        cap(format!(
                            "out of Maglev tables ({MAX_MAGLEV_TABLES}): fewer groups or services"
                        ))
                    })?;
                    used_tables.insert(tid);
                    let mut t = Box::new(MaglevTable {
                        entries: [0; maglev::SIZE],
                        _pad: 0,
                    });
                    t.entries.copy_from_slice(&entries);
                    selection.tables[gi as usize] = tid;
                    tables.push((tid, t));
                }
            }

            let width = groups.values().map(|&i| i as usize + 1).max().unwrap_or(1);
            let mut targets = vec![0u32; width];
            for (g, share) in &spec.split {
                targets[groups[g] as usize] = *share;
            }
            let buckets = split::build(old.map(|o| o.buckets.as_slice()), &targets);
            selection.buckets.copy_from_slice(&buckets);

            let pins = spec
                .pins
                .iter()
                .map(|p| {
                    let mut addr = [0u8; 16];
                    match p.prefix.addr {
                        std::net::IpAddr::V4(v) => addr[..4].copy_from_slice(&v.octets()),
                        std::net::IpAddr::V6(v) => addr.copy_from_slice(&v.octets()),
                    }
                    (
                        PIN_KEY_FIXED_BITS + p.prefix.len as u32,
                        PinKey {
                            service: id,
                            slot: slot as u8,
                            family: family(p.prefix.addr),
                            addr,
                            _pad: [0; 2],
                        },
                    )
                })
                .collect::<Vec<_>>();
            let mut flags = 0;
            if spec.forwarding == Forwarding::Dsr {
                flags |= service_flags::DSR;
            }
            if spec.client_affinity {
                flags |= service_flags::AFFINITY_CLIENT;
            }
            if !pins.is_empty() {
                flags |= service_flags::HAS_PINS;
            }
            let svc = AppliedService {
                spec: spec.clone(),
                id,
                generation,
                key,
                slot,
                groups,
                tables: tables.iter().map(|(t, _)| *t).collect(),
                buckets,
                backends,
                pins,
            };
            plans.push(Plan {
                svc,
                flags,
                tables,
                selection,
                new_backends,
                old: old_value,
            });
        }
        Ok(plans)
    }

    /// Forgets every cached next hop: the data path re-resolves at the next packet.
    pub fn invalidate_nexthops(&mut self) -> Result<usize, DataplaneError> {
        let ids: Vec<u16> = self
            .applied
            .services
            .values()
            .flat_map(|s| s.backends.values().map(|b| b.id))
            .collect();
        let mut nh: Array<&mut MapData, NextHop> =
            Array::try_from(self.ebpf.map_mut(n::NEXTHOP).unwrap()).map_err(map_err(n::NEXTHOP))?;
        for id in &ids {
            nh.set(*id as u32, NextHop::default(), 0)
                .map_err(map_err(n::NEXTHOP))?;
        }
        // Reply next hops (per CPU, by client) are many: one epoch write marks them all stale.
        let mut epoch: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut(n::HOP_EPOCH).unwrap())
                .map_err(map_err(n::HOP_EPOCH))?;
        epoch
            .set(0, coarse_now_ns(), 0)
            .map_err(map_err(n::HOP_EPOCH))?;
        Ok(ids.len())
    }

    fn service_value(&self, s: &AppliedService) -> Service {
        let mut flags = 0;
        if s.spec.forwarding == Forwarding::Dsr {
            flags |= service_flags::DSR;
        }
        if s.spec.client_affinity {
            flags |= service_flags::AFFINITY_CLIENT;
        }
        if !s.pins.is_empty() {
            flags |= service_flags::HAS_PINS;
        }
        Service {
            id: s.id,
            flags,
            slot: s.slot,
            generation: s.generation,
        }
    }

    // The tables are passed by reference on purpose: by value they would be copied onto the
    // stack (a Maglev table is 128 KiB).
    #[allow(clippy::needless_borrows_for_generic_args)]
    fn write_idle(&mut self, plans: &[Plan]) -> Result<(), DataplaneError> {
        let ncpu = aya::util::nr_cpus()
            .map_err(|(_, e)| DataplaneError::Capacity(format!("cannot count CPUs: {e}")))?;
        let zero = || PerCpuValues::try_from(vec![Counters::default(); ncpu]).unwrap();
        for p in plans {
            {
                let mut be: Array<&mut MapData, Backend> =
                    Array::try_from(self.ebpf.map_mut(n::BACKENDS).unwrap())
                        .map_err(map_err(n::BACKENDS))?;
                for b in &p.new_backends {
                    let e = Backend {
                        addr: wire_addr(b.spec.addr.ip()),
                        port: b.spec.addr.port().to_be(),
                        family: family(b.spec.addr.ip()),
                        flags: backend_flags::LIVE,
                        generation: b.generation,
                        _pad: 0,
                    };
                    be.set(b.id as u32, e, 0).map_err(map_err(n::BACKENDS))?;
                }
            }
            {
                let mut nh: Array<&mut MapData, NextHop> =
                    Array::try_from(self.ebpf.map_mut(n::NEXTHOP).unwrap())
                        .map_err(map_err(n::NEXTHOP))?;
                for b in &p.new_backends {
                    nh.set(b.id as u32, NextHop::default(), 0)
                        .map_err(map_err(n::NEXTHOP))?;
                }
            }
            {
                let mut st: PerCpuArray<&mut MapData, Counters> =
                    PerCpuArray::try_from(self.ebpf.map_mut(n::BACKEND_STATS).unwrap())
                        .map_err(map_err(n::BACKEND_STATS))?;
                for b in &p.new_backends {
                    st.set(b.id as u32, zero(), 0)
                        .map_err(map_err(n::BACKEND_STATS))?;
                }
            }
            if p.old.is_none() {
                let mut st: PerCpuArray<&mut MapData, Counters> =
                    PerCpuArray::try_from(self.ebpf.map_mut(n::SERVICE_STATS).unwrap())
                        .map_err(map_err(n::SERVICE_STATS))?;
                st.set(p.svc.id, zero(), 0)
                    .map_err(map_err(n::SERVICE_STATS))?;
            }
            {
                let mut mt: Array<&mut MapData, MaglevTable> =
                    Array::try_from(self.ebpf.map_mut(n::MAGLEV).unwrap())
                        .map_err(map_err(n::MAGLEV))?;
                for (tid, t) in &p.tables {
                    mt.set(*tid, &**t, 0).map_err(map_err(n::MAGLEV))?;
                }
            }
            {
                let mut sel: Array<&mut MapData, Selection> =
                    Array::try_from(self.ebpf.map_mut(n::SELECT).unwrap())
                        .map_err(map_err(n::SELECT))?;
                sel.set(p.svc.id * SLOTS + p.svc.slot, &*p.selection, 0)
                    .map_err(map_err(n::SELECT))?;
            }
            {
                let mut pins: LpmTrie<&mut MapData, PinKey, u32> =
                    LpmTrie::try_from(self.ebpf.map_mut(n::PINS).unwrap())
                        .map_err(map_err(n::PINS))?;
                for ((len, k), pin) in p.svc.pins.iter().zip(&p.svc.spec.pins) {
                    let g = p.svc.groups[&pin.group] as u32;
                    pins.insert(&Key::new(*len, *k), g, 0)
                        .map_err(map_err(n::PINS))?;
                }
            }
        }
        Ok(())
    }

    /// Writes port-filter bits: the union with what is there (before a flip) or exactly
    /// `ports` (after it).
    fn write_ports(
        &mut self,
        ports: &BTreeMap<u16, u8>,
        union: bool,
    ) -> Result<(), DataplaneError> {
        let mut m: Array<&mut MapData, PortFlags> =
            Array::try_from(self.ebpf.map_mut(n::PORTS).unwrap()).map_err(map_err(n::PORTS))?;
        let all: BTreeSet<u16> = ports
            .keys()
            .chain(self.applied.ports.keys())
            .copied()
            .collect();
        for p in all {
            let want = ports.get(&p).copied().unwrap_or(0);
            let have = self.applied.ports.get(&p).copied().unwrap_or(0);
            let v = if union { want | have } else { want };
            if v != have || !union {
                m.set(
                    p as u32,
                    PortFlags {
                        flags: v,
                        _pad: [0; 3],
                    },
                    0,
                )
                .map_err(map_err(n::PORTS))?;
            }
        }
        if union {
            for (p, v) in ports {
                *self.applied.ports.entry(*p).or_default() |= v;
            }
        }
        Ok(())
    }

    /// Reply targets of every nat backend in `state`: ids from the plans (changed services)
    /// or from what is applied (unchanged ones).
    fn desired_replies(
        &self,
        state: &DesiredState,
        plans: &[Plan],
    ) -> BTreeMap<VipKey, ReplyTarget> {
        let mut out = BTreeMap::new();
        for spec in state
            .services
            .iter()
            .filter(|s| s.forwarding == Forwarding::Nat)
        {
            let svc = plans
                .iter()
                .map(|p| &p.svc)
                .find(|s| s.spec.name == spec.name)
                .or_else(|| self.applied.services.get(&spec.name));
            let Some(svc) = svc else { continue };
            for b in svc.backends.values() {
                let key = VipKey {
                    addr: wire_addr(b.spec.addr.ip()),
                    port: b.spec.addr.port().to_be(),
                    proto: spec.protocol.number(),
                    family: family(b.spec.addr.ip()),
                };
                out.insert(
                    key,
                    ReplyTarget {
                        vip: svc.key.addr,
                        vport: svc.key.port,
                        backend: b.id,
                        service: svc.id,
                    },
                );
            }
        }
        out
    }

    fn write_replies(
        &mut self,
        want: &BTreeMap<VipKey, ReplyTarget>,
    ) -> Result<(), DataplaneError> {
        let mut m: HashMap<&mut MapData, VipKey, ReplyTarget> =
            HashMap::try_from(self.ebpf.map_mut(n::REPLIES).unwrap())
                .map_err(map_err(n::REPLIES))?;
        for (k, v) in want {
            if self.applied.replies.get(k) != Some(v) {
                m.insert(k, v, 0).map_err(map_err(n::REPLIES))?;
                self.applied.replies.insert(*k, *v);
            }
        }
        Ok(())
    }

    fn remove_stale_replies(
        &mut self,
        want: BTreeMap<VipKey, ReplyTarget>,
    ) -> Result<(), DataplaneError> {
        let mut m: HashMap<&mut MapData, VipKey, ReplyTarget> =
            HashMap::try_from(self.ebpf.map_mut(n::REPLIES).unwrap())
                .map_err(map_err(n::REPLIES))?;
        for k in self.applied.replies.keys() {
            if !want.contains_key(k) {
                let _ = m.remove(k);
            }
        }
        self.applied.replies = want;
        Ok(())
    }

    fn flip(&mut self, plans: &[Plan]) -> Result<(), DataplaneError> {
        {
            // Established flows check their service here; new ones read the SERVICES value.
            let mut st: Array<&mut MapData, ServiceState> =
                Array::try_from(self.ebpf.map_mut(n::SERVICE_STATE).unwrap())
                    .map_err(map_err(n::SERVICE_STATE))?;
            for p in plans {
                let v = ServiceState {
                    generation: p.svc.generation,
                    flags: p.flags,
                };
                st.set(p.svc.id, v, 0).map_err(map_err(n::SERVICE_STATE))?;
                self.applied
                    .service_generations
                    .insert(p.svc.id, p.svc.generation);
            }
        }
        let mut m: HashMap<&mut MapData, VipKey, Service> =
            HashMap::try_from(self.ebpf.map_mut(n::SERVICES).unwrap())
                .map_err(map_err(n::SERVICES))?;
        let marker_value = Service {
            id: u32::MAX,
            ..Default::default()
        };
        for p in plans {
            let mk = marker(&p.svc.key);
            if !self.applied.markers.contains(&mk) {
                m.insert(mk, marker_value, 0)
                    .map_err(map_err(n::SERVICES))?;
                self.applied.markers.insert(mk);
            }
        }
        for (i, p) in plans.iter().enumerate() {
            let v = Service {
                id: p.svc.id,
                flags: p.flags,
                slot: p.svc.slot,
                generation: p.svc.generation,
            };
            if let Err(e) = m.insert(p.svc.key, v, 0) {
                // Put back the services already switched: the old slots are untouched.
                for q in &plans[..i] {
                    let _ = match q.old {
                        Some(o) => m.insert(q.svc.key, o, 0),
                        None => m.remove(&q.svc.key),
                    };
                }
                return Err(map_err(n::SERVICES)(e));
            }
        }
        Ok(())
    }

    fn clean_up(
        &mut self,
        state: &DesiredState,
        plans: Vec<Plan>,
        ports: BTreeMap<u16, u8>,
        report: &mut ApplyReport,
    ) -> Result<(), DataplaneError> {
        let keep: BTreeSet<&str> = state.services.iter().map(|s| s.name.as_str()).collect();
        let new_keys: BTreeSet<VipKey> = state.services.iter().map(vip_key).collect();
        let mut old_pins: Vec<(u32, PinKey)> = std::mem::take(&mut self.applied.stale_pins);
        let mut dead_backends: BTreeSet<u16> = BTreeSet::new();
        let mut gone_keys: Vec<VipKey> = Vec::new();
        let mut gone_ids: Vec<u32> = Vec::new();

        // Services replaced by a plan or removed: their old slot is now unreachable.
        let replaced: BTreeSet<&str> = plans.iter().map(|p| p.svc.spec.name.as_str()).collect();
        let names: Vec<String> = self.applied.services.keys().cloned().collect();
        for name in names {
            let replaced_here = replaced.contains(name.as_str());
            let removed = !keep.contains(name.as_str());
            let same_key = plans.iter().any(|p| {
                p.svc.spec.name == name
                    && Some(&p.svc.key) == self.applied.services.get(&name).map(|s| &s.key)
            });
            if !(replaced_here || removed) {
                continue;
            }
            let old = self.applied.services.remove(&name).unwrap();
            old_pins.extend(old.pins.iter().copied());
            let new_ids: BTreeSet<u16> = plans
                .iter()
                .filter(|p| p.svc.spec.name == name)
                .flat_map(|p| p.svc.backends.values().map(|b| b.id))
                .collect();
            dead_backends.extend(
                old.backends
                    .values()
                    .map(|b| b.id)
                    .filter(|id| !new_ids.contains(id)),
            );
            if removed || !same_key {
                if !new_keys.contains(&old.key) {
                    gone_keys.push(old.key);
                }
                if !plans.iter().any(|p| p.svc.id == old.id) {
                    gone_ids.push(old.id);
                }
                if removed {
                    report.removed.push(name.clone());
                }
            }
        }
        for (k, s) in std::mem::take(&mut self.applied.stale_services) {
            if !new_keys.contains(&k) {
                gone_keys.push(k);
                if !plans.iter().any(|p| p.svc.id == s.id) {
                    gone_ids.push(s.id);
                }
            }
        }
        let claimed: BTreeSet<u16> = plans
            .iter()
            .flat_map(|p| p.svc.backends.values().map(|b| b.id))
            .collect();
        dead_backends.extend(
            std::mem::take(&mut self.applied.stale_backends)
                .into_keys()
                .filter(|id| !claimed.contains(id)),
        );
        self.applied.stale_tables.clear();

        {
            let mut m: HashMap<&mut MapData, VipKey, Service> =
                HashMap::try_from(self.ebpf.map_mut(n::SERVICES).unwrap())
                    .map_err(map_err(n::SERVICES))?;
            for k in &gone_keys {
                let _ = m.remove(k);
            }
            let wanted: BTreeSet<VipKey> = new_keys.iter().map(marker).collect();
            let markers: Vec<VipKey> = self.applied.markers.iter().copied().collect();
            for mk in markers {
                if !wanted.contains(&mk) {
                    let _ = m.remove(&mk);
                    self.applied.markers.remove(&mk);
                }
            }
        }
        {
            let mut st: Array<&mut MapData, ServiceState> =
                Array::try_from(self.ebpf.map_mut(n::SERVICE_STATE).unwrap())
                    .map_err(map_err(n::SERVICE_STATE))?;
            for id in &gone_ids {
                // Generation kept in `service_generations`, so a reuse of the id gets a new one.
                st.set(*id, ServiceState::default(), 0)
                    .map_err(map_err(n::SERVICE_STATE))?;
            }
        }
        {
            let mut pins: LpmTrie<&mut MapData, PinKey, u32> =
                LpmTrie::try_from(self.ebpf.map_mut(n::PINS).unwrap()).map_err(map_err(n::PINS))?;
            let fresh: BTreeSet<(u32, [u8; 24])> = plans
                .iter()
                .flat_map(|p| p.svc.pins.iter().map(|(l, k)| (*l, pin_bytes(k))))
                .collect();
            for (len, k) in old_pins {
                if !fresh.contains(&(len, pin_bytes(&k))) {
                    let _ = pins.remove(&Key::new(len, k));
                }
            }
        }
        {
            let mut be: Array<&mut MapData, Backend> =
                Array::try_from(self.ebpf.map_mut(n::BACKENDS).unwrap())
                    .map_err(map_err(n::BACKENDS))?;
            for id in &dead_backends {
                let mut e = be.get(&(*id as u32), 0).map_err(map_err(n::BACKENDS))?;
                e.flags &= !backend_flags::LIVE;
                self.applied.generations.insert(*id, e.generation);
                be.set(*id as u32, e, 0).map_err(map_err(n::BACKENDS))?;
            }
        }
        for p in plans {
            for b in p.svc.backends.values() {
                self.applied.generations.insert(b.id, b.generation);
            }
            self.applied.services.insert(p.svc.spec.name.clone(), p.svc);
        }
        self.write_ports(&ports, false)?;
        self.applied.ports = ports;
        Ok(())
    }
}

fn pin_bytes(k: &PinKey) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..4].copy_from_slice(&k.service.to_ne_bytes());
    b[4] = k.slot;
    b[5] = k.family;
    b[6..22].copy_from_slice(&k.addr);
    b
}

/// `CLOCK_MONOTONIC_COARSE`, the clock of the data path's `bpf_ktime_get_coarse_ns`.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
