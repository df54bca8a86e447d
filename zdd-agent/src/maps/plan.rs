//! Planning an apply: from what the maps hold ([`Applied`]) and what they should hold
//! ([`DesiredState`]) to every id, group index, table and entry to write, and to what becomes
//! unreachable afterwards. Pure: it touches no map, so it is unit-tested without a kernel;
//! the writer (`writer.rs`) only carries a plan out.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use zdd_common::{
    Backend, MAX_BACKENDS, MAX_MAGLEV_TABLES, MAX_SERVICES, MaglevTable, PIN_KEY_FIXED_BITS,
    PinKey, ReplyTarget, Selection, Service, ServiceState, VipKey, port_flags, service_flags,
};

use crate::{
    state::{BackendSpec, DesiredState, Forwarding, ServiceSpec, family, wire_addr},
    tables::{groups, maglev, split},
};

#[derive(Clone, Debug)]
pub(super) struct BackendSlot {
    pub id: u16,
    pub generation: u16,
    pub spec: BackendSpec,
}

/// The members a Maglev table was built from: (id, identity, weight), by identity.
pub(super) type Members = Vec<(u16, String, u32)>;

/// A service as it is in the maps.
#[derive(Clone, Debug)]
pub(super) struct AppliedService {
    pub spec: ServiceSpec,
    pub id: u32,
    pub generation: u32,
    pub key: VipKey,
    pub slot: u32,
    pub groups: BTreeMap<String, u8>,
    /// Every Maglev table the slot in force uses.
    pub tables: Vec<u32>,
    /// Group → its Maglev table and the members it was built from: a change that leaves a
    /// group's members as they were (a switch, a split) reuses its table, unwritten.
    pub group_tables: BTreeMap<String, (u32, Members)>,
    pub buckets: Vec<u8>,
    pub backends: BTreeMap<String, BackendSlot>,
    pub pins: Vec<(u32, PinKey)>,
}

/// A service a predecessor left in the pinned maps, read back at adoption: enough to carry
/// on exactly where it was (same id, same bucket ownership, same group indices).
#[derive(Clone, Debug)]
pub(super) struct StaleService {
    pub key: VipKey,
    pub value: Service,
    /// The split table in force (bucket → group index).
    pub buckets: Vec<u8>,
    /// Maglev table ids in use by the slot in force.
    pub tables: Vec<u32>,
    /// Group index → addresses of the backends in its Maglev table.
    pub members: BTreeMap<u8, Vec<SocketAddr>>,
}

/// What is unreachable after a flip and is to be removed; kept in [`Applied`] until done,
/// so a clean-up that failed is finished by the next apply.
#[derive(Clone, Debug, Default)]
pub(super) struct Cleanup {
    /// `SERVICES` entries (VIP keys) to remove.
    pub services: BTreeSet<VipKey>,
    /// VIP address markers (`SERVICES`, port 0 protocol 0) to remove.
    pub markers: BTreeSet<VipKey>,
    /// Service ids whose `SERVICE_STATE` is to be reset.
    pub service_ids: BTreeSet<u32>,
    /// Pins of old slots.
    pub pins: Vec<(u32, PinKey)>,
    /// Backends to mark not live (their flows are re-selected).
    pub backends: BTreeSet<u16>,
    /// `REPLIES` keys to remove.
    pub replies: BTreeSet<VipKey>,
    /// `PORTS` entries to set exactly (bits added before the flip and no longer needed).
    pub ports: BTreeMap<u16, u8>,
}

impl Cleanup {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.markers.is_empty()
            && self.service_ids.is_empty()
            && self.pins.is_empty()
            && self.backends.is_empty()
            && self.replies.is_empty()
            && self.ports.is_empty()
    }
}

/// What is in the maps now. Also what an adopting agent found left by its predecessor
/// (`stale_*`): kept running until the first apply replaces it.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub(super) services: BTreeMap<String, AppliedService>,
    pub(super) generations: BTreeMap<u16, u16>,
    pub(super) service_generations: BTreeMap<u32, u32>,
    pub(super) replies: BTreeMap<VipKey, ReplyTarget>,
    pub(super) ports: BTreeMap<u16, u8>,
    pub(super) markers: BTreeSet<VipKey>,
    pub(super) stale_services: Vec<StaleService>,
    pub(super) stale_backends: BTreeMap<u16, Backend>,
    pub(super) stale_pins: Vec<(u32, PinKey)>,
    pub(super) pending: Cleanup,
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

    /// (id, generation) of a backend: what its flow entries carry.
    pub fn backend_slot(&self, service: &str, backend: &str) -> Option<(u16, u16)> {
        let b = self.services.get(service)?.backends.get(backend)?;
        Some((b.id, b.generation))
    }

    /// The weight a backend has in the tables now (after drains and health).
    pub fn backend_weight(&self, service: &str, backend: &str) -> Option<u32> {
        Some(
            self.services
                .get(service)?
                .backends
                .get(backend)?
                .spec
                .weight,
        )
    }

    /// Ids of the services that forward dsr.
    pub fn dsr_service_ids(&self) -> BTreeSet<u16> {
        self.services
            .values()
            .filter(|s| s.spec.forwarding == Forwarding::Dsr)
            .filter_map(|s| u16::try_from(s.id).ok())
            .collect()
    }

    /// Group name → index of a service.
    pub fn groups(&self, service: &str) -> BTreeMap<String, u8> {
        self.services
            .get(service)
            .map(|s| s.groups.clone())
            .unwrap_or_default()
    }

    /// The split table in force for a service (bucket → group index).
    pub fn buckets(&self, service: &str) -> Option<&[u8]> {
        self.services.get(service).map(|s| s.buckets.as_slice())
    }

    /// Every backend id in use (applied, or left by a predecessor).
    pub(super) fn backend_ids(&self) -> Vec<u16> {
        self.services
            .values()
            .flat_map(|s| s.backends.values().map(|b| b.id))
            .collect()
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

/// One service's new slot.
pub(super) struct ServicePlan {
    pub svc: AppliedService,
    pub tables: Vec<(u32, Box<MaglevTable>)>,
    pub selection: Box<Selection>,
    /// Backends with a fresh id: their entry, next hop and counters are written anew.
    pub new_backends: Vec<BackendSlot>,
    /// The `SERVICES` value in force before the flip (None: a new service).
    pub old: Option<Service>,
    /// The `SERVICE_STATE` value in force before the flip.
    pub old_state: ServiceState,
}

impl ServicePlan {
    pub fn value(&self) -> Service {
        service_value(&self.svc)
    }

    pub fn state(&self) -> ServiceState {
        ServiceState {
            generation: self.svc.generation,
            flags: flags(&self.svc.spec, !self.svc.pins.is_empty()),
        }
    }
}

/// The whole plan of an apply.
pub(super) struct Plan {
    pub services: Vec<ServicePlan>,
    pub report: ApplyReport,
    /// `PORTS` as they must be once the apply is done.
    pub ports: BTreeMap<u16, u8>,
    /// `REPLIES` as they must be once the apply is done.
    pub replies: BTreeMap<VipKey, ReplyTarget>,
}

/// Why a plan cannot be made. Nothing has been written.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Capacity(String),
    #[error("services[{service}]: {message}")]
    Invalid { service: String, message: String },
}

/// A service's flags, in `SERVICES` and `SERVICE_STATE` alike.
pub(super) fn flags(spec: &ServiceSpec, has_pins: bool) -> u32 {
    let mut f = 0;
    if spec.forwarding == Forwarding::Dsr {
        f |= service_flags::DSR;
    }
    if spec.client_affinity {
        f |= service_flags::AFFINITY_CLIENT;
    }
    if has_pins {
        f |= service_flags::HAS_PINS;
    }
    f
}

pub(super) fn service_value(s: &AppliedService) -> Service {
    Service {
        id: s.id,
        flags: flags(&s.spec, !s.pins.is_empty()),
        slot: s.slot,
        generation: s.generation,
    }
}

pub(super) fn vip_key(s: &ServiceSpec) -> VipKey {
    VipKey {
        addr: wire_addr(s.vip.ip()),
        port: s.vip.port().to_be(),
        proto: s.protocol.number(),
        family: family(s.vip.ip()),
    }
}

/// The `SERVICES` key that marks a VIP address (port 0, protocol 0).
pub(super) fn marker(k: &VipKey) -> VipKey {
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

/// A generation for a new use of service id `id` (never 0, low byte never 0): flows of an
/// earlier service with this id end.
fn next_service_generation(last: u32) -> u32 {
    match last.wrapping_add(1) & 0xff {
        0 => last.wrapping_add(2),
        _ => last.wrapping_add(1),
    }
    .max(1)
}

/// Plans an apply of `state` over `a`.
pub(super) fn plan(a: &Applied, state: &DesiredState) -> Result<Plan, PlanError> {
    let cap = PlanError::Capacity;
    // Ids in use now stay reserved until the clean-up: packets may still reach them.
    let mut used_services: BTreeSet<u32> = a.services.values().map(|s| s.id).collect();
    used_services.extend(a.stale_services.iter().map(|s| s.value.id));
    used_services.extend(&a.pending.service_ids);
    let mut used_backends: BTreeSet<u16> = a.backend_ids().into_iter().collect();
    used_backends.extend(a.stale_backends.keys());
    used_backends.extend(&a.pending.backends);
    let mut used_tables: BTreeSet<u32> = a
        .services
        .values()
        .flat_map(|s| s.tables.iter().copied())
        .collect();
    used_tables.extend(
        a.stale_services
            .iter()
            .flat_map(|s| s.tables.iter().copied()),
    );
    let mut claimed_stale: BTreeSet<u16> = BTreeSet::new();

    let mut report = ApplyReport::default();
    let mut services = Vec::new();
    for spec in &state.services {
        let invalid = |message: String| PlanError::Invalid {
            service: spec.name.clone(),
            message,
        };
        let key = vip_key(spec);
        let old = a.services.get(&spec.name).filter(|o| o.key == key);
        let stale = a.stale_services.iter().find(|s| s.key == key);
        match (old, stale) {
            (Some(o), _) if o.spec == *spec => {
                report.unchanged.push(spec.name.clone());
                continue;
            }
            (None, None) => report.added.push(spec.name.clone()),
            _ => report.changed.push(spec.name.clone()),
        }

        // Where the service carries on from: its own applied state, a predecessor's (same
        // VIP), or nothing. Group indices and buckets come from the same place, so a restart
        // changes no client's group.
        let (id, generation, slot, old_value, old_state, kept_groups, prev_buckets) =
            match (old, stale) {
                (Some(o), _) => {
                    let v = service_value(o);
                    (
                        o.id,
                        o.generation,
                        1 - o.slot,
                        Some(v),
                        ServiceState {
                            generation: o.generation,
                            flags: v.flags,
                        },
                        o.groups.clone(),
                        Some(o.buckets.as_slice()),
                    )
                }
                (None, Some(s)) => (
                    s.value.id,
                    s.value.generation,
                    1 - s.value.slot,
                    Some(s.value),
                    ServiceState {
                        generation: s.value.generation,
                        flags: s.value.flags,
                    },
                    groups::infer(&s.members, &spec.backends),
                    Some(s.buckets.as_slice()),
                ),
                (None, None) => {
                    let id = lowest_free(&used_services, MAX_SERVICES)
                        .ok_or_else(|| cap(format!("more than {MAX_SERVICES} services")))?;
                    used_services.insert(id);
                    let last = a.service_generations.get(&id).copied().unwrap_or(0);
                    (
                        id,
                        next_service_generation(last),
                        0,
                        None,
                        ServiceState::default(),
                        BTreeMap::new(),
                        None,
                    )
                }
            };

        let group_index = groups::assign(&spec.groups(), &kept_groups).map_err(invalid)?;

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
                if let Some((id, e)) = reuse {
                    // Live in the maps already, with its flows: nothing to write.
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
                    let s = BackendSlot {
                        id,
                        generation,
                        spec: b.clone(),
                    };
                    new_backends.push(s.clone());
                    s
                }
            };
            backends.insert(b.name.clone(), slot_);
        }

        // One Maglev table per group that has a backend with weight. A group whose members
        // (ids, identities, weights) are unchanged keeps its table: tables are never written
        // while a slot refers to them, so both slots may share one.
        let mut selection = Box::new(Selection::default());
        let mut tables = Vec::new();
        let mut group_tables = BTreeMap::new();
        let mut in_use = Vec::new();
        for (g, &gi) in &group_index {
            let members: Vec<maglev::Member> = backends
                .values()
                .filter(|b| &b.spec.group == g)
                .map(|b| maglev::Member {
                    id: b.id,
                    key: format!("{}@{}", b.spec.name, b.spec.addr),
                    weight: b.spec.weight,
                })
                .collect();
            let mut signature: Members = members
                .iter()
                .filter(|m| m.weight > 0)
                .map(|m| (m.id, m.key.clone(), m.weight))
                .collect();
            signature.sort_by(|a, b| a.1.cmp(&b.1));
            if signature.is_empty() {
                continue;
            }
            if let Some((tid, _)) = old
                .and_then(|o| o.group_tables.get(g))
                .filter(|(_, sig)| *sig == signature)
            {
                selection.tables[gi as usize] = *tid;
                in_use.push(*tid);
                group_tables.insert(g.clone(), (*tid, signature));
                continue;
            }
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
                in_use.push(tid);
                group_tables.insert(g.clone(), (tid, signature));
                tables.push((tid, t));
            }
        }

        let buckets = split::plan(prev_buckets, &group_index, &spec.split).map_err(invalid)?;
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
        for p in &spec.pins {
            if !group_index.contains_key(&p.group) {
                return Err(invalid(format!("pin to unknown group {:?}", p.group)));
            }
        }
        let svc = AppliedService {
            spec: spec.clone(),
            id,
            generation,
            key,
            slot,
            groups: group_index,
            tables: in_use,
            group_tables,
            buckets,
            backends,
            pins,
        };
        services.push(ServicePlan {
            svc,
            tables,
            selection,
            new_backends,
            old: old_value,
            old_state,
        });
    }
    let ports = desired_ports(state);
    let replies = desired_replies(a, state, &services);
    for name in a.services.keys() {
        if !state.services.iter().any(|s| &s.name == name) {
            report.removed.push(name.clone());
        }
    }
    Ok(Plan {
        services,
        report,
        ports,
        replies,
    })
}

/// Reply targets of every nat backend in `state`: ids from the plans (changed services)
/// or from what is applied (unchanged ones).
fn desired_replies(
    a: &Applied,
    state: &DesiredState,
    plans: &[ServicePlan],
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
            .or_else(|| a.services.get(&spec.name));
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

pub(super) fn pin_bytes(k: &PinKey) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..4].copy_from_slice(&k.service.to_ne_bytes());
    b[4] = k.slot;
    b[5] = k.family;
    b[6..22].copy_from_slice(&k.addr);
    b
}

/// What the flip of `plan` makes unreachable, given what is applied.
pub(super) fn cleanup_after(a: &Applied, state: &DesiredState, plan: &Plan) -> Cleanup {
    let keep: BTreeSet<&str> = state.services.iter().map(|s| s.name.as_str()).collect();
    let new_keys: BTreeSet<VipKey> = state.services.iter().map(vip_key).collect();
    let planned: BTreeSet<u32> = plan.services.iter().map(|p| p.svc.id).collect();
    let mut c = Cleanup {
        pins: a.stale_pins.clone(),
        ..Default::default()
    };

    // Services replaced by a plan or removed: their old slot is now unreachable.
    for (name, old) in &a.services {
        let replacement = plan.services.iter().find(|p| &p.svc.spec.name == name);
        let removed = !keep.contains(name.as_str());
        if replacement.is_none() && !removed {
            continue;
        }
        c.pins.extend(old.pins.iter().copied());
        let new_ids: BTreeSet<u16> = replacement
            .map(|p| p.svc.backends.values().map(|b| b.id).collect())
            .unwrap_or_default();
        c.backends.extend(
            old.backends
                .values()
                .map(|b| b.id)
                .filter(|id| !new_ids.contains(id)),
        );
        let same_key = replacement.is_some_and(|p| p.svc.key == old.key);
        if removed || !same_key {
            if !new_keys.contains(&old.key) {
                c.services.insert(old.key);
            }
            if !planned.contains(&old.id) {
                c.service_ids.insert(old.id);
            }
        }
    }
    for s in &a.stale_services {
        if !new_keys.contains(&s.key) {
            c.services.insert(s.key);
            if !planned.contains(&s.value.id) {
                c.service_ids.insert(s.value.id);
            }
        }
    }
    let claimed: BTreeSet<u16> = plan
        .services
        .iter()
        .flat_map(|p| p.svc.backends.values().map(|b| b.id))
        .collect();
    c.backends.extend(
        a.stale_backends
            .keys()
            .copied()
            .filter(|id| !claimed.contains(id)),
    );
    // Pins written by this plan share no key with old ones (other slot), but never remove
    // a key that is in force.
    let fresh: BTreeSet<(u32, [u8; 24])> = plan
        .services
        .iter()
        .flat_map(|p| p.svc.pins.iter().map(|(l, k)| (*l, pin_bytes(k))))
        .collect();
    c.pins.retain(|(l, k)| !fresh.contains(&(*l, pin_bytes(k))));

    let wanted: BTreeSet<VipKey> = new_keys.iter().map(marker).collect();
    c.markers = a
        .markers
        .iter()
        .chain(plan.services.iter().map(|p| &p.svc.key))
        .map(marker)
        .filter(|m| !wanted.contains(m))
        .collect();
    c.replies = a
        .replies
        .keys()
        .filter(|k| !plan.replies.contains_key(k))
        .copied()
        .collect();
    // Bits added before the flip are a union with the old ones; set every port exactly.
    for p in plan.ports.keys().chain(a.ports.keys()) {
        let want = plan.ports.get(p).copied().unwrap_or(0);
        let have = a.ports.get(p).copied().unwrap_or(0);
        if want | have != want {
            c.ports.insert(*p, want);
        }
    }
    c
}

impl Applied {
    /// The bookkeeping of a flip that took effect: `plan` is in force, `cleanup` pending.
    pub(super) fn commit(&mut self, plan: Plan, cleanup: Cleanup) {
        for name in &plan.report.removed {
            self.services.remove(name);
        }
        for id in &cleanup.backends {
            if let Some(b) = self.stale_backends.get(id) {
                self.generations.insert(*id, b.generation);
            }
        }
        for p in plan.services {
            self.service_generations.insert(p.svc.id, p.svc.generation);
            self.markers.insert(marker(&p.svc.key));
            for b in p.svc.backends.values() {
                self.generations.insert(b.id, b.generation);
            }
            self.services.insert(p.svc.spec.name.clone(), p.svc);
        }
        for m in &cleanup.markers {
            self.markers.remove(m);
        }
        for (p, v) in &plan.ports {
            *self.ports.entry(*p).or_default() |= v;
        }
        self.replies = plan.replies;
        self.stale_services.clear();
        self.stale_backends.clear();
        self.stale_pins.clear();
        self.pending = cleanup;
    }

    /// The bookkeeping of a clean-up that completed.
    pub(super) fn cleaned(&mut self) {
        let done = std::mem::take(&mut self.pending);
        for (p, v) in done.ports {
            if v == 0 {
                self.ports.remove(&p);
            } else {
                self.ports.insert(p, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Pin, Prefix, Protocol};

    fn backend(name: &str, group: &str, i: u8) -> BackendSpec {
        BackendSpec {
            name: name.into(),
            addr: format!("10.0.2.{}:8080", 10 + i).parse().unwrap(),
            group: group.into(),
            weight: 100,
        }
    }

    fn web(split: &[(&str, u32)], backends: Vec<BackendSpec>) -> DesiredState {
        DesiredState {
            services: vec![ServiceSpec {
                name: "web".into(),
                vip: "10.0.100.1:80".parse().unwrap(),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Nat,
                client_affinity: true,
                split: split.iter().map(|(g, s)| (g.to_string(), *s)).collect(),
                backends,
                pins: vec![],
                health: crate::state::HealthSpec::defaults(
                    crate::state::HealthKind::None,
                    Protocol::Tcp,
                ),
                cohorts: vec![],
                analysis: vec![],
                canary: Default::default(),
            }],
        }
    }

    /// Plans and commits as an apply that succeeded would.
    fn apply(a: &mut Applied, state: &DesiredState) -> ApplyReport {
        let p = plan(a, state).unwrap();
        let report = p.report.clone();
        let c = cleanup_after(a, state, &p);
        a.commit(p, c);
        a.cleaned();
        report
    }

    /// What an adopting agent reads back from the maps `a` describes (see `adopt.rs`).
    fn restart(a: &Applied) -> Applied {
        let mut next = Applied {
            generations: a.generations.clone(),
            service_generations: a.service_generations.clone(),
            replies: a.replies.clone(),
            ports: a.ports.clone(),
            markers: a.markers.clone(),
            ..Default::default()
        };
        for s in a.services.values() {
            let mut members: BTreeMap<u8, Vec<SocketAddr>> = BTreeMap::new();
            for (g, &i) in &s.groups {
                let addrs: Vec<SocketAddr> = s
                    .backends
                    .values()
                    .filter(|b| &b.spec.group == g && b.spec.weight > 0)
                    .map(|b| b.spec.addr)
                    .collect();
                if !addrs.is_empty() {
                    members.insert(i, addrs);
                }
            }
            next.stale_services.push(StaleService {
                key: s.key,
                value: service_value(s),
                buckets: s.buckets.clone(),
                tables: s.tables.clone(),
                members,
            });
            for b in s.backends.values() {
                next.stale_backends.insert(
                    b.id,
                    Backend {
                        addr: wire_addr(b.spec.addr.ip()),
                        port: b.spec.addr.port().to_be(),
                        family: family(b.spec.addr.ip()),
                        flags: zdd_common::backend_flags::LIVE,
                        generation: b.generation,
                        _pad: 0,
                    },
                );
            }
            next.stale_pins.extend(s.pins.iter().copied());
        }
        next
    }

    fn stable_then_canary() -> Vec<DesiredState> {
        let stable = vec![
            backend("stable-1", "stable", 1),
            backend("stable-2", "stable", 2),
        ];
        let mut both = stable.clone();
        both.push(backend("canary-1", "canary", 3));
        vec![
            web(&[("stable", 10_000)], stable),
            web(&[("stable", 9_500), ("canary", 500)], both.clone()),
            web(&[("stable", 7_500), ("canary", 2_500)], both),
        ]
    }

    #[test]
    fn a_group_added_later_keeps_its_index_and_buckets_across_a_restart() {
        let steps = stable_then_canary();
        let mut a = Applied::default();
        for s in &steps[..2] {
            apply(&mut a, s);
        }
        // The example: canary added at 5% gets index 1 and the top 500 buckets.
        assert_eq!(a.groups("web")["stable"], 0);
        assert_eq!(a.groups("web")["canary"], 1);
        let buckets = a.buckets("web").unwrap().to_vec();
        assert!(buckets[9_500..].iter().all(|&g| g == 1));
        assert!(buckets[..9_500].iter().all(|&g| g == 0));

        let mut b = restart(&a);
        let report = apply(&mut b, &steps[1]);
        assert_eq!(
            report.changed,
            vec!["web".to_string()],
            "adoption rewrites the slot"
        );
        assert_eq!(b.groups("web"), a.groups("web"));
        assert_eq!(b.buckets("web").unwrap(), buckets.as_slice());
        assert_eq!(b.service_id("web"), a.service_id("web"));
        for name in ["stable-1", "stable-2", "canary-1"] {
            assert_eq!(b.backend_id("web", name), a.backend_id("web", name));
        }
    }

    #[test]
    fn the_split_stays_monotonic_across_any_mix_of_reloads_and_restarts() {
        let stable = vec![backend("stable-1", "stable", 1)];
        let mut both = stable.clone();
        both.push(backend("canary-1", "canary", 2));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20 {
            let mut a = Applied::default();
            apply(&mut a, &web(&[("stable", 10_000)], stable.clone()));
            let mut shares: Vec<u32> = (0..6).map(|_| (rnd() % 10_001) as u32).collect();
            shares.sort();
            let mut prev = a.buckets("web").unwrap().to_vec();
            for s in shares {
                if rnd() % 2 == 0 {
                    a = restart(&a);
                }
                apply(
                    &mut a,
                    &web(&[("stable", 10_000 - s), ("canary", s)], both.clone()),
                );
                let canary = a.groups("web")["canary"];
                let now = a.buckets("web").unwrap().to_vec();
                assert_eq!(now.iter().filter(|&&g| g == canary).count() as u32, s);
                for (before, after) in prev.iter().zip(&now) {
                    assert!(
                        !(*before == canary && *after != canary),
                        "a canary bucket went back"
                    );
                }
                prev = now;
            }
        }
    }

    #[test]
    fn a_renamed_config_after_a_crash_releases_unknown_groups() {
        let steps = stable_then_canary();
        let mut a = Applied::default();
        for s in &steps {
            apply(&mut a, s);
        }
        // The agent comes back with a config where the canary's backend is gone and a new
        // group "next" takes 25%: canary's buckets are released to the groups that grow,
        // stable keeps all of its buckets.
        let before = a.buckets("web").unwrap().to_vec();
        let mut b = restart(&a);
        let state = web(
            &[("stable", 7_500), ("next", 2_500)],
            vec![
                backend("stable-1", "stable", 1),
                backend("stable-2", "stable", 2),
                backend("next-1", "next", 4),
            ],
        );
        apply(&mut b, &state);
        let g = b.groups("web");
        assert_eq!(g["stable"], 0);
        let after = b.buckets("web").unwrap();
        for (x, y) in before.iter().zip(after) {
            if *x == 0 {
                assert_eq!(*y, 0, "a stable bucket moved");
            }
        }
    }

    #[test]
    fn a_split_change_reuses_the_groups_tables_and_a_weight_change_rebuilds_one() {
        let steps = stable_then_canary();
        let mut a = Applied::default();
        apply(&mut a, &steps[1]);
        let before = a.services["web"].tables.clone();
        let p = plan(&a, &steps[2]).unwrap();
        assert!(
            p.services[0].tables.is_empty(),
            "a split change wrote a table"
        );
        assert_eq!(p.services[0].svc.tables, before);
        apply(&mut a, &steps[2]);
        let mut w = steps[2].clone();
        w.services[0].backends[0].weight = 50;
        let p = plan(&a, &w).unwrap();
        assert_eq!(
            p.services[0].tables.len(),
            1,
            "only stable's table is rebuilt"
        );
        let stable = a.services["web"].group_tables["stable"].0;
        assert!(!p.services[0].svc.tables.contains(&stable));
        // The canary's table is shared by both slots, so no new plan may take its id.
        let canary = a.services["web"].group_tables["canary"].0;
        assert!(p.services[0].svc.tables.contains(&canary));
        assert_ne!(p.services[0].tables[0].0, canary);
    }

    #[test]
    fn unchanged_services_are_not_planned_and_removed_ones_are_cleaned_up() {
        let steps = stable_then_canary();
        let mut a = Applied::default();
        apply(&mut a, &steps[1]);
        let p = plan(&a, &steps[1]).unwrap();
        assert!(p.services.is_empty());
        assert_eq!(p.report.unchanged, vec!["web".to_string()]);

        let empty = DesiredState::default();
        let p = plan(&a, &empty).unwrap();
        assert_eq!(p.report.removed, vec!["web".to_string()]);
        let c = cleanup_after(&a, &empty, &p);
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.markers.len(), 1);
        assert_eq!(c.backends.len(), 3);
        assert_eq!(c.replies.len(), 3);
        assert_eq!(c.service_ids.len(), 1);
        // Port 80 (VIP) and 8080 (nat backends) go back to 0.
        assert_eq!(c.ports.get(&80), Some(&0));
        assert_eq!(c.ports.get(&8080), Some(&0));
    }

    #[test]
    fn a_pending_clean_up_reserves_its_ids() {
        let steps = stable_then_canary();
        let mut a = Applied::default();
        apply(&mut a, &steps[1]);
        let p = plan(&a, &DesiredState::default()).unwrap();
        let c = cleanup_after(&a, &DesiredState::default(), &p);
        a.commit(p, c);
        // The clean-up did not run: a new service must not reuse ids it will touch.
        let p = plan(&a, &steps[0]).unwrap();
        let s = &p.services[0];
        assert!(!a.pending.service_ids.contains(&s.svc.id));
        for b in s.svc.backends.values() {
            assert!(!a.pending.backends.contains(&b.id));
        }
    }

    #[test]
    fn pins_name_a_known_group_and_capacity_is_checked() {
        let steps = stable_then_canary();
        let mut s = steps[1].clone();
        s.services[0].pins.push(Pin {
            prefix: Prefix {
                addr: "10.20.0.0".parse().unwrap(),
                len: 16,
            },
            group: "canary".into(),
        });
        let p = plan(&Applied::default(), &s).unwrap();
        assert_eq!(p.services[0].svc.pins.len(), 1);
        assert!(p.services[0].value().flags & service_flags::HAS_PINS != 0);

        let mut many = DesiredState::default();
        for i in 0..=MAX_SERVICES {
            let mut svc = steps[0].services[0].clone();
            svc.name = format!("s{i}");
            svc.vip = SocketAddr::new("10.0.100.1".parse().unwrap(), 1000 + i as u16);
            many.services.push(svc);
        }
        let e = plan(&Applied::default(), &many).err().unwrap();
        assert!(matches!(e, PlanError::Capacity(_)), "{e}");
    }
}
