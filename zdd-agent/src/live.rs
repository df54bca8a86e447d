//! The live state: what the agent runs now — the services as last applied (from the file or
//! changed at run time), each backend's drain, and each service's earlier splits (what
//! `rollback` restores). Every change is a pure function of (state, request) that returns
//! the new state or a precise error; the owner task then writes the maps and persists it.
//! The data path gets `effective()`: a drained backend takes no new flows (weight 0).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    api::{ApiError, ErrorCode, Split},
    state::{BackendSpec, DesiredState, Pin, Prefix, ServiceSpec},
};

/// How many earlier splits a service remembers.
pub const HISTORY: usize = 16;

/// A backend that takes no new flows; its flows go on until they end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// Unix ms when the drain began.
    pub since_ms: u64,
    /// Set for `backend remove`: the backend is removed once it has no flows left, or at this
    /// time (Unix ms), whichever comes first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_at_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveService {
    pub spec: ServiceSpec,
    #[serde(default)]
    pub drains: BTreeMap<String, Drain>,
    /// Earlier splits, oldest first.
    #[serde(default)]
    pub history: Vec<Vec<(String, u32)>>,
    /// Per group, its healthy capacity (sum of the effective weights of its healthy
    /// backends) the last time it had all new flows: what a rollback to it must be able to
    /// take again.
    #[serde(default)]
    pub full_capacity: BTreeMap<String, u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveState {
    pub services: Vec<LiveService>,
    /// Deployments in progress, then finished ones (the last `deploy::KEEP_PAST`), oldest
    /// first.
    #[serde(default)]
    pub deployments: Vec<crate::deploy::Deployment>,
    #[serde(default)]
    pub next_deployment_id: u64,
    /// Finished deployments by `service/kind/outcome` (for the metrics' counter).
    #[serde(default)]
    pub outcomes: BTreeMap<String, u64>,
}

fn err(code: ErrorCode, m: impl Into<String>) -> ApiError {
    ApiError::new(code, m)
}

/// A split as people write it: `blue=95 green=5`.
pub fn split_text(split: &[(String, u32)]) -> String {
    let parts: Vec<String> = split
        .iter()
        .map(|(g, b)| format!("{g}={}", *b as f64 / 100.0))
        .collect();
    parts.join(" ")
}

/// Buckets as percent, for the API.
pub fn split_percent(split: &[(String, u32)]) -> Split {
    split
        .iter()
        .map(|(g, b)| (g.clone(), *b as f64 / 100.0))
        .collect()
}

/// A percentage (0..=100, steps of 0.01) in buckets of 0.01%.
pub fn percent_buckets(pct: f64) -> Result<u32, &'static str> {
    if !pct.is_finite() || !(0.0..=100.0).contains(&pct) {
        return Err("a share is a percentage between 0 and 100");
    }
    let b = pct * 100.0;
    if (b - b.round()).abs() > 1e-6 {
        return Err("the split is set in steps of 0.01%");
    }
    Ok(b.round() as u32)
}

/// Percent (steps of 0.01) to buckets, every share checked.
pub fn split_buckets(split: &Split) -> Result<Vec<(String, u32)>, ApiError> {
    let mut out = Vec::new();
    for (g, pct) in split {
        let b = percent_buckets(*pct)
            .map_err(|m| err(ErrorCode::Invalid, format!("{g}={pct}: {m}")))?;
        out.push((g.clone(), b));
    }
    let total: u32 = out.iter().map(|(_, b)| b).sum();
    if total != zdd_common::SPLIT_BUCKETS {
        return Err(err(
            ErrorCode::Invalid,
            format!(
                "shares add up to {}%, not 100%: {}",
                total as f64 / 100.0,
                split_text(&out)
            ),
        ));
    }
    Ok(out)
}

impl LiveState {
    /// The live state of a freshly applied file: no drains, no history.
    pub fn from_desired(d: &DesiredState) -> LiveState {
        LiveState {
            services: d
                .services
                .iter()
                .map(|s| LiveService {
                    spec: s.clone(),
                    drains: BTreeMap::new(),
                    history: Vec::new(),
                    full_capacity: BTreeMap::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// What the data path must do: the services, with drained backends at weight 0.
    pub fn effective(&self) -> DesiredState {
        DesiredState {
            services: self
                .services
                .iter()
                .map(|s| {
                    let mut spec = s.spec.clone();
                    for b in &mut spec.backends {
                        if s.drains.contains_key(&b.name) {
                            b.weight = 0;
                        }
                    }
                    spec
                })
                .collect(),
        }
    }

    /// The services as configured (drains not applied): what compares with a config file.
    pub fn desired(&self) -> DesiredState {
        DesiredState {
            services: self.services.iter().map(|s| s.spec.clone()).collect(),
        }
    }

    pub fn service(&self, name: &str) -> Result<&LiveService, ApiError> {
        self.services
            .iter()
            .find(|s| s.spec.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.services.iter().map(|s| s.spec.name.as_str()).collect();
                err(
                    ErrorCode::UnknownService,
                    format!(
                        "no service {name:?}; services: {}",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
            })
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut LiveService, ApiError> {
        self.service(name)?;
        self.services
            .iter_mut()
            .find(|s| s.spec.name == name)
            .ok_or_else(|| err(ErrorCode::Internal, "service vanished"))
    }

    /// Checks the state by the config file's rules (`force` lets a group with a share have
    /// no backend that takes new flows).
    pub fn validate(&self, force: bool) -> Result<(), ApiError> {
        crate::config::validate_state(&self.effective(), force)
            .map_err(|(at, m)| err(ErrorCode::Invalid, format!("{at}: {m}")))
    }

    /// Sets a split; the one before goes to the history.
    pub fn set_split(
        &mut self,
        service: &str,
        split: Vec<(String, u32)>,
    ) -> Result<String, ApiError> {
        let s = self.service_mut(service)?;
        for (g, _) in &split {
            if !s.spec.backends.iter().any(|be| &be.group == g) {
                return Err(err(
                    ErrorCode::UnknownGroup,
                    format!(
                        "service {service} has no group {g:?}; groups: {}",
                        s.spec.groups().join(", ")
                    ),
                ));
            }
        }
        let before = split_text(&s.spec.split);
        push_history(s, split);
        Ok(format!(
            "{service}: split {before} -> {}",
            split_text(&s.spec.split)
        ))
    }

    /// Blue-green: every group 0 but `to`, 100.
    pub fn switch(&mut self, service: &str, to: &str) -> Result<String, ApiError> {
        let s = self.service(service)?;
        if !s.spec.backends.iter().any(|b| b.group == to) {
            return Err(err(
                ErrorCode::UnknownGroup,
                format!(
                    "service {service} has no group {to:?}; groups: {}",
                    s.spec.groups().join(", ")
                ),
            ));
        }
        let mut split: Vec<(String, u32)> =
            s.spec.split.iter().map(|(g, _)| (g.clone(), 0)).collect();
        if !split.iter().any(|(g, _)| g == to) {
            split.push((to.to_string(), 0));
        }
        for (g, b) in &mut split {
            if g == to {
                *b = zdd_common::SPLIT_BUCKETS;
            }
        }
        split.sort();
        self.set_split(service, split)
    }

    /// Restores the split before the last change (again: the one before that).
    pub fn rollback(&mut self, service: &str) -> Result<String, ApiError> {
        let s = self.service_mut(service)?;
        let Some(prev) = s.history.pop() else {
            return Err(err(
                ErrorCode::Refused,
                format!("{service}: no earlier split to roll back to"),
            ));
        };
        let before = split_text(&s.spec.split);
        s.spec.split = prev;
        Ok(format!(
            "{service}: rolled back, split {before} -> {}",
            split_text(&s.spec.split)
        ))
    }

    pub fn backend_add(&mut self, service: &str, b: BackendSpec) -> Result<String, ApiError> {
        let s = self.service_mut(service)?;
        if s.spec.backends.iter().any(|o| o.name == b.name) {
            return Err(err(
                ErrorCode::Invalid,
                format!("{service} has a backend {:?} already", b.name),
            ));
        }
        let m = format!(
            "{service}: backend {} {} added to group {} (weight {})",
            b.name, b.addr, b.group, b.weight
        );
        s.spec.backends.push(b);
        Ok(m)
    }

    fn backend_mut<'a>(
        s: &'a mut LiveService,
        name: &str,
    ) -> Result<&'a mut BackendSpec, ApiError> {
        let service = s.spec.name.clone();
        let known: Vec<String> = s.spec.backends.iter().map(|b| b.name.clone()).collect();
        s.spec
            .backends
            .iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| {
                err(
                    ErrorCode::UnknownBackend,
                    format!(
                        "service {service} has no backend {name:?}; backends: {}",
                        known.join(", ")
                    ),
                )
            })
    }

    pub fn backend_set_weight(
        &mut self,
        service: &str,
        name: &str,
        weight: u32,
    ) -> Result<String, ApiError> {
        if weight > 65_535 {
            return Err(err(
                ErrorCode::Invalid,
                format!("weight {weight} is out of range: 0..65535"),
            ));
        }
        let s = self.service_mut(service)?;
        let b = Self::backend_mut(s, name)?;
        let before = b.weight;
        b.weight = weight;
        Ok(format!(
            "{service}: backend {name} weight {before} -> {weight}"
        ))
    }

    /// Removes a backend at once (its flows move to live backends).
    pub fn backend_remove(&mut self, service: &str, name: &str) -> Result<String, ApiError> {
        let s = self.service_mut(service)?;
        Self::backend_mut(s, name)?;
        s.spec.backends.retain(|b| b.name != name);
        s.drains.remove(name);
        Ok(format!("{service}: backend {name} removed"))
    }

    /// No new flows for a backend (or, with `remove_at_ms`, until it is removed).
    pub fn backend_drain(
        &mut self,
        service: &str,
        name: &str,
        now_ms: u64,
        remove_at_ms: Option<u64>,
    ) -> Result<String, ApiError> {
        let s = self.service_mut(service)?;
        Self::backend_mut(s, name)?;
        let d = s.drains.entry(name.to_string()).or_insert(Drain {
            since_ms: now_ms,
            remove_at_ms: None,
        });
        if remove_at_ms.is_some() {
            d.remove_at_ms = remove_at_ms;
        }
        Ok(match remove_at_ms {
            Some(_) => format!("{service}: backend {name} draining, to be removed"),
            None => format!("{service}: backend {name} draining"),
        })
    }

    pub fn backend_undrain(&mut self, service: &str, name: &str) -> Result<String, ApiError> {
        let s = self.service_mut(service)?;
        Self::backend_mut(s, name)?;
        if s.drains.remove(name).is_none() {
            return Err(err(
                ErrorCode::Refused,
                format!("{service}: backend {name} is not draining"),
            ));
        }
        Ok(format!("{service}: backend {name} serving again"))
    }

    pub fn pin(&mut self, service: &str, source: &str, group: &str) -> Result<String, ApiError> {
        let prefix: Prefix = source
            .parse()
            .map_err(|m: String| err(ErrorCode::Invalid, m))?;
        let s = self.service_mut(service)?;
        if !s.spec.backends.iter().any(|b| b.group == group) {
            return Err(err(
                ErrorCode::UnknownGroup,
                format!(
                    "service {service} has no group {group:?}; groups: {}",
                    s.spec.groups().join(", ")
                ),
            ));
        }
        if let Some(p) = s.spec.pins.iter_mut().find(|p| p.prefix == prefix) {
            let before = std::mem::replace(&mut p.group, group.to_string());
            return Ok(format!("{service}: pin {prefix} {before} -> {group}"));
        }
        s.spec.pins.push(Pin {
            prefix,
            group: group.to_string(),
        });
        Ok(format!("{service}: pin {prefix} -> {group}"))
    }

    pub fn unpin(&mut self, service: &str, source: &str) -> Result<String, ApiError> {
        let prefix: Prefix = source
            .parse()
            .map_err(|m: String| err(ErrorCode::Invalid, m))?;
        let s = self.service_mut(service)?;
        let n = s.spec.pins.len();
        s.spec.pins.retain(|p| p.prefix != prefix);
        if s.spec.pins.len() == n {
            return Err(err(
                ErrorCode::Invalid,
                format!("{service}: {prefix} is not pinned"),
            ));
        }
        Ok(format!("{service}: pin {prefix} removed"))
    }

    /// Takes a file's services as the new live state: drains of backends that remain are
    /// kept (they are operations in progress, not configuration), a changed split goes to
    /// the history. Returns one line per difference (empty: nothing changes).
    pub fn apply_file(&mut self, file: &DesiredState) -> Vec<String> {
        let changes = diff(&self.desired(), file);
        let mut next = Vec::new();
        for spec in &file.services {
            let old = self.services.iter().find(|s| s.spec.name == spec.name);
            let mut s = LiveService {
                spec: spec.clone(),
                drains: BTreeMap::new(),
                history: Vec::new(),
                full_capacity: BTreeMap::new(),
            };
            if let Some(o) = old {
                s.history = o.history.clone();
                s.full_capacity = o.full_capacity.clone();
                s.drains = o
                    .drains
                    .iter()
                    .filter(|(n, _)| spec.backends.iter().any(|b| &&b.name == n))
                    .map(|(n, d)| (n.clone(), d.clone()))
                    .collect();
                if o.spec.split != spec.split {
                    s.history.push(o.spec.split.clone());
                    trim(&mut s.history);
                }
            }
            next.push(s);
        }
        self.services = next;
        changes
    }
}

fn trim(h: &mut Vec<Vec<(String, u32)>>) {
    if h.len() > HISTORY {
        let drop = h.len() - HISTORY;
        h.drain(..drop);
    }
}

/// Sets a service's split, remembering the one it replaces (what `rollback` restores).
pub(crate) fn push_history(s: &mut LiveService, split: Vec<(String, u32)>) {
    if s.spec.split != split {
        let old = std::mem::replace(&mut s.spec.split, split);
        s.history.push(old);
        trim(&mut s.history);
    }
}

/// What differs between two sets of services, one line per difference, in words.
pub fn diff(from: &DesiredState, to: &DesiredState) -> Vec<String> {
    let mut out = Vec::new();
    for s in &from.services {
        if !to.services.iter().any(|t| t.name == s.name) {
            out.push(format!("{}: service removed", s.name));
        }
    }
    for t in &to.services {
        let Some(s) = from.services.iter().find(|s| s.name == t.name) else {
            out.push(format!(
                "{}: service added ({} {}, {} backends, split {})",
                t.name,
                t.vip,
                match t.protocol {
                    crate::state::Protocol::Tcp => "tcp",
                    crate::state::Protocol::Udp => "udp",
                },
                t.backends.len(),
                split_text(&t.split)
            ));
            continue;
        };
        let n = &t.name;
        if s.vip != t.vip || s.protocol != t.protocol {
            out.push(format!("{n}: vip {} -> {}", s.vip, t.vip));
        }
        if s.forwarding != t.forwarding {
            out.push(format!(
                "{n}: forwarding {:?} -> {:?}",
                s.forwarding, t.forwarding
            ));
        }
        if s.client_affinity != t.client_affinity {
            out.push(format!(
                "{n}: affinity {} -> {}",
                if s.client_affinity { "client" } else { "flow" },
                if t.client_affinity { "client" } else { "flow" }
            ));
        }
        if s.split != t.split {
            out.push(format!(
                "{n}: split {} -> {}",
                split_text(&s.split),
                split_text(&t.split)
            ));
        }
        for b in &s.backends {
            match t.backends.iter().find(|x| x.name == b.name) {
                None => out.push(format!("{n}: backend {} removed", b.name)),
                Some(x) if x != b => {
                    let mut what = Vec::new();
                    if x.addr != b.addr {
                        what.push(format!("addr {} -> {}", b.addr, x.addr));
                    }
                    if x.group != b.group {
                        what.push(format!("group {} -> {}", b.group, x.group));
                    }
                    if x.weight != b.weight {
                        what.push(format!("weight {} -> {}", b.weight, x.weight));
                    }
                    out.push(format!("{n}: backend {} {}", b.name, what.join(", ")));
                }
                Some(_) => {}
            }
        }
        for x in &t.backends {
            if !s.backends.iter().any(|b| b.name == x.name) {
                out.push(format!(
                    "{n}: backend {} added ({}, group {}, weight {})",
                    x.name, x.addr, x.group, x.weight
                ));
            }
        }
        for p in &s.pins {
            match t.pins.iter().find(|q| q.prefix == p.prefix) {
                None => out.push(format!("{n}: pin {} removed", p.prefix)),
                Some(q) if q.group != p.group => {
                    out.push(format!("{n}: pin {} {} -> {}", p.prefix, p.group, q.group))
                }
                Some(_) => {}
            }
        }
        for q in &t.pins {
            if !s.pins.iter().any(|p| p.prefix == q.prefix) {
                out.push(format!("{n}: pin {} -> {} added", q.prefix, q.group));
            }
        }
        if s.cohorts != t.cohorts {
            let names = |c: &[crate::state::Cohort]| {
                c.iter()
                    .map(|c| {
                        let src: Vec<String> = c.sources.iter().map(|p| p.to_string()).collect();
                        format!("{}=[{}]", c.name, src.join(","))
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            out.push(format!(
                "{n}: cohorts {} -> {}",
                names(&s.cohorts),
                names(&t.cohorts)
            ));
        }
        if s.analysis != t.analysis {
            let names = |a: &[crate::state::AnalysisQuery]| {
                a.iter()
                    .map(|q| q.name.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            out.push(format!(
                "{n}: analysis queries [{}] -> [{}]",
                names(&s.analysis),
                names(&t.analysis)
            ));
        }
        if s.canary != t.canary {
            out.push(format!("{n}: canary settings changed"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Forwarding, Protocol};

    fn be(name: &str, group: &str, i: u8) -> BackendSpec {
        BackendSpec {
            name: name.into(),
            addr: format!("10.0.2.{}:8080", 10 + i).parse().unwrap(),
            group: group.into(),
            weight: 100,
        }
    }

    fn state() -> LiveState {
        LiveState::from_desired(&DesiredState {
            services: vec![ServiceSpec {
                name: "web".into(),
                vip: "10.0.100.1:80".parse().unwrap(),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Nat,
                client_affinity: false,
                split: vec![("blue".into(), 10_000), ("green".into(), 0)],
                backends: vec![be("blue-1", "blue", 1), be("green-1", "green", 2)],
                pins: vec![],
                health: crate::state::HealthSpec::defaults(
                    crate::state::HealthKind::None,
                    Protocol::Tcp,
                ),
                cohorts: vec![],
                analysis: vec![],
                canary: Default::default(),
            }],
        })
    }

    #[test]
    fn switch_and_rollback_walk_the_history() {
        let mut s = state();
        s.switch("web", "green").unwrap();
        assert_eq!(
            s.service("web").unwrap().spec.split,
            vec![("blue".into(), 0), ("green".into(), 10_000)]
        );
        s.set_split(
            "web",
            split_buckets(&[("blue".into(), 50.0), ("green".into(), 50.0)].into()).unwrap(),
        )
        .unwrap();
        s.rollback("web").unwrap();
        assert_eq!(s.service("web").unwrap().spec.split[1].1, 10_000);
        s.rollback("web").unwrap();
        assert_eq!(s.service("web").unwrap().spec.split[0].1, 10_000);
        let e = s.rollback("web").unwrap_err();
        assert_eq!(e.code, ErrorCode::Refused);
        // Switching to where it is adds nothing to the history.
        s.switch("web", "blue").unwrap();
        assert!(s.service("web").unwrap().history.is_empty());
    }

    #[test]
    fn errors_name_what_is_unknown() {
        let mut s = state();
        assert_eq!(
            s.switch("nope", "green").unwrap_err().code,
            ErrorCode::UnknownService
        );
        let e = s.switch("web", "purple").unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownGroup);
        assert!(e.message.contains("groups: blue, green"), "{e}");
        let e = s.backend_set_weight("web", "blue-9", 5).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownBackend);
        assert_eq!(
            s.backend_set_weight("web", "blue-1", 70_000)
                .unwrap_err()
                .code,
            ErrorCode::Invalid
        );
        let e = split_buckets(&[("blue".into(), 95.0), ("green".into(), 4.0)].into()).unwrap_err();
        assert!(e.message.contains("99%, not 100%"), "{e}");
        assert!(split_buckets(&[("blue".into(), 99.995), ("green".into(), 0.005)].into()).is_err());
    }

    #[test]
    fn a_drain_is_weight_zero_in_the_data_path_only() {
        let mut s = state();
        s.backend_drain("web", "green-1", 1, None).unwrap();
        assert_eq!(s.effective().services[0].backends[1].weight, 0);
        assert_eq!(s.desired().services[0].backends[1].weight, 100);
        // green has no share: fine. Draining blue's only backend while blue has 100% is not.
        s.validate(false).unwrap();
        s.backend_drain("web", "blue-1", 1, None).unwrap();
        let e = s.validate(false).unwrap_err();
        assert!(
            e.message.contains("no backend with a weight above 0"),
            "{e}"
        );
        s.validate(true).unwrap();
        s.backend_undrain("web", "blue-1").unwrap();
        assert_eq!(
            s.backend_undrain("web", "blue-1").unwrap_err().code,
            ErrorCode::Refused
        );
    }

    #[test]
    fn a_file_apply_keeps_drains_and_history_and_says_what_changed() {
        let mut s = state();
        s.backend_drain("web", "green-1", 1, None).unwrap();
        let mut file = s.desired();
        file.services[0].split = vec![("blue".into(), 5_000), ("green".into(), 5_000)];
        file.services[0].backends.push(be("blue-2", "blue", 3));
        let changes = s.apply_file(&file);
        assert_eq!(
            changes,
            vec![
                "web: split blue=100 green=0 -> blue=50 green=50".to_string(),
                "web: backend blue-2 added (10.0.2.13:8080, group blue, weight 100)".to_string()
            ]
        );
        let w = s.service("web").unwrap();
        assert!(w.drains.contains_key("green-1"));
        assert_eq!(w.history.len(), 1);
        assert!(s.apply_file(&file).is_empty());
    }

    #[test]
    fn pins_are_set_replaced_and_removed() {
        let mut s = state();
        s.pin("web", "10.20.0.0/16", "green").unwrap();
        s.pin("web", "10.20.0.0/16", "blue").unwrap();
        assert_eq!(s.service("web").unwrap().spec.pins.len(), 1);
        assert!(
            s.pin("web", "10.20.0.1/16", "blue")
                .unwrap_err()
                .message
                .contains("host bits")
        );
        s.unpin("web", "10.20.0.0/16").unwrap();
        assert_eq!(
            s.unpin("web", "10.20.0.0/16").unwrap_err().code,
            ErrorCode::Invalid
        );
    }

    #[test]
    fn history_is_bounded() {
        let mut s = state();
        for i in 0..40u32 {
            let g = i * 10 + 1;
            s.set_split(
                "web",
                vec![("blue".into(), 10_000 - g), ("green".into(), g)],
            )
            .unwrap();
        }
        assert_eq!(s.service("web").unwrap().history.len(), HISTORY);
    }
}
