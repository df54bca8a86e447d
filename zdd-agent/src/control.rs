//! The owner of the live state: one task, the only writer of maps and of the state
//! directory. Socket requests, SIGHUP, flow counts and ticks arrive as intents on one
//! channel; each is validated → planned → written (idle slot, flip) → persisted → recorded as
//! an event → answered. Nothing else holds a lock on the state, so no slow client, probe or
//! long drain can stall a switch: a long wait (`drain --wait`) is a waiter answered later.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{
    api::{
        Actor, ApiError, BackendStatus, ChangeResult, Command, CounterRow, DrainResult, ErrorCode,
        Event, PinStatus, ServiceStatus, StatsResult, StatusResult,
    },
    config::{self, Config},
    daemon::{dp_config, resolve_dsr_neighbours},
    health::{self, BackendHealth, HealthMap, ProbeResult, Transition},
    live::{self, LiveState},
    maps::{
        ApplyError, Dataplane,
        flows::{CountRules, FlowCounts},
    },
    probe::Probers,
    state::HealthKind,
    state::{BackendSpec, Forwarding},
    store::{STATE_VERSION, Saved, Store, services_hash},
};

/// Who sent a request (from SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

pub type Reply = oneshot::Sender<Result<Value, ApiError>>;

pub enum Intent {
    /// A socket request; the answer goes back on `reply` (for `drain --wait` and `remove`,
    /// when the drain ends).
    Request {
        cmd: Command,
        peer: Peer,
        reply: Reply,
    },
    /// A receiver of every new event (for `events --follow`), and the recent ones.
    Subscribe {
        limit: usize,
        reply: oneshot::Sender<(Vec<Event>, broadcast::Receiver<Event>)>,
    },
    /// SIGHUP: apply the config file.
    Reload,
    /// The metrics text (for the Prometheus endpoint).
    Metrics { reply: oneshot::Sender<String> },
    /// A new count of active flows per backend.
    FlowCounts(Counted),
    /// A probe's result.
    Probe {
        service: String,
        backend: String,
        addr: std::net::SocketAddr,
        result: ProbeResult,
    },
    /// A canary step's queries and check finished (`attempt` tells a late answer apart).
    Analysis {
        id: u64,
        attempt: u64,
        results: Vec<crate::api::CheckResult>,
    },
    /// A rolling batch's update command finished.
    Exec {
        id: u64,
        attempt: u64,
        result: Result<(), String>,
    },
}

/// A count of active flows, and when it began (a flow that ended before that is not in it).
pub struct Counted {
    pub counts: FlowCounts,
    pub started: Instant,
    pub started_ms: u64,
}

/// Events kept in memory (older ones are in the journal).
const RING: usize = 1024;
/// `backend remove` drains this long at most, unless told otherwise.
pub const DEFAULT_REMOVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The Prometheus client for `agent.prometheus` (validated with the config).
pub fn prom_client(a: &config::AgentSettings) -> Option<crate::prom::PromClient> {
    let url = a.prometheus.as_ref()?;
    match crate::prom::PromClient::new(url, Duration::from_secs(5)) {
        Ok(c) => Some(c),
        Err(e) => {
            log::error!("agent.prometheus: {e}");
            None
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A `drain --wait` or `remove` waiting for the backend's flows to end.
struct Waiter {
    service: String,
    backend: String,
    /// `backend remove`: the backend is removed when the wait ends.
    remove: bool,
    slot: (u16, u16),
    started: Instant,
    deadline: Instant,
    reply: Reply,
}

/// Rates of one backend: the counters at the last two reads.
#[derive(Default)]
struct Rate {
    last: Option<(Instant, zdd_common::Counters)>,
    new_flows_per_s: f64,
    bytes_per_s: f64,
}

pub struct Control {
    pub dp: Dataplane,
    pub live: LiveState,
    pub cfg: Config,
    pub config_path: PathBuf,
    store: Store,
    file_hash: Option<String>,
    ring: VecDeque<Event>,
    seq: u64,
    events: broadcast::Sender<Event>,
    waiters: Vec<Waiter>,
    pub(crate) counts: FlowCounts,
    counts_at: Option<Instant>,
    /// Wall-clock start of the last count (Unix ms), to compare with drains' start.
    pub(crate) counts_at_ms: u64,
    rates: HashMap<(u16, u16), Rate>,
    /// Tells the flow counter what to count.
    pub count_rules: tokio::sync::watch::Sender<(CountRules, BTreeSet<u16>, Duration)>,
    /// Health of every checked backend, fed by the probes.
    pub health: HealthMap,
    probers: Probers,
    /// The owner's own channel, given to the probe tasks.
    pub(crate) intents: Option<mpsc::Sender<Intent>>,
    /// The groups health last put in panic mode.
    panic: BTreeSet<(String, String)>,
    /// Where alerts go (never blocks).
    pub alerts: crate::alerts::Alerts,
    /// Prometheus for canary analysis (`agent.prometheus`).
    pub prom: Option<crate::prom::PromClient>,
    /// Alerts sent firing without an end, by what they are about: a resolution is sent
    /// with the same labels.
    pub(crate) firing_alerts: HashMap<String, crate::alerts::Alert>,
    /// When those were last re-sent to Alertmanager (Unix ms).
    pub(crate) alerts_refreshed_ms: u64,
}

/// A service as events show it before and after a change: the protocol's words (split in
/// percent, backends with weight and drain), not the agent's internal form.
fn service_view(s: &live::LiveService) -> Value {
    json!({
        "name": s.spec.name,
        "split": live::split_percent(&s.spec.split),
        "backends": s.spec.backends.iter().map(|b| json!({
            "name": b.name,
            "addr": b.addr.to_string(),
            "group": b.group,
            "weight": b.weight,
            "draining": s.drains.contains_key(&b.name),
        })).collect::<Vec<_>>(),
        "pins": s.spec.pins.iter().map(|p| json!({
            "source": p.prefix.to_string(),
            "group": p.group,
        })).collect::<Vec<_>>(),
    })
}

fn actor(peer: Option<Peer>, via: &str) -> Actor {
    Actor {
        via: via.into(),
        uid: peer.map(|p| p.uid),
        pid: peer.map(|p| p.pid),
    }
}

fn err(code: ErrorCode, m: impl Into<String>) -> ApiError {
    ApiError::new(code, m)
}

pub(crate) fn parse_timeout(t: &Option<String>, default: Duration) -> Result<Duration, ApiError> {
    match t {
        None => Ok(default),
        Some(s) => config::parse_duration(s).map_err(|m| err(ErrorCode::Invalid, m)),
    }
}

impl Control {
    pub fn new(
        dp: Dataplane,
        live: LiveState,
        cfg: Config,
        config_path: PathBuf,
        store: Store,
        file_hash: Option<String>,
    ) -> Control {
        let ring: VecDeque<Event> = store.last_events(RING).into();
        let seq = ring.back().map(|e| e.seq).unwrap_or(0);
        let (events, _) = broadcast::channel(RING);
        let (count_rules, _) = tokio::sync::watch::channel((
            CountRules {
                now_ns: 0,
                tcp_idle_ns: 0,
                udp_idle_ns: 0,
            },
            BTreeSet::new(),
            Duration::from_secs(2),
        ));
        let mut c = Control {
            dp,
            live,
            cfg,
            config_path,
            store,
            file_hash,
            ring,
            seq,
            events,
            waiters: Vec::new(),
            counts: FlowCounts::new(),
            counts_at: None,
            counts_at_ms: 0,
            rates: HashMap::new(),
            count_rules,
            health: HealthMap::new(),
            probers: Probers::default(),
            intents: None,
            panic: BTreeSet::new(),
            alerts: crate::alerts::Alerts::disabled(),
            prom: None,
            firing_alerts: HashMap::new(),
            alerts_refreshed_ms: 0,
        };
        c.update_count_rules();
        c
    }

    /// Gives the owner its own channel (for the probe tasks) and starts the probes.
    pub fn start_probes(&mut self, to: mpsc::Sender<Intent>) {
        self.intents = Some(to);
        let live = self.live.clone();
        self.sync_health(&live);
        self.reconcile_probes();
    }

    /// Health entries for every checked backend of `live`: new ones start `starting`
    /// (startup readiness), removed ones are forgotten.
    fn sync_health(&mut self, live: &LiveState) {
        let mut want = BTreeSet::new();
        for s in &live.services {
            if s.spec.health.kind == HealthKind::None {
                continue;
            }
            for b in &s.spec.backends {
                want.insert((s.spec.name.clone(), b.name.clone()));
            }
        }
        self.health.retain(|k, _| want.contains(k));
        for k in want {
            self.health
                .entry(k)
                .or_insert_with(|| BackendHealth::new(health::State::Starting));
        }
    }

    fn reconcile_probes(&mut self) {
        let Some(to) = self.intents.clone() else {
            return;
        };
        let want = self
            .live
            .services
            .iter()
            .filter(|s| s.spec.health.kind != HealthKind::None)
            .flat_map(|s| {
                s.spec.backends.iter().map(move |b| {
                    (
                        s.spec.name.clone(),
                        b.name.clone(),
                        b.addr,
                        s.spec.health.clone(),
                    )
                })
            })
            .collect();
        self.probers.reconcile(want, &to);
    }

    fn probe_result(
        &mut self,
        service: String,
        backend: String,
        addr: std::net::SocketAddr,
        result: ProbeResult,
    ) {
        let Ok(s) = self.live.service(&service) else {
            return;
        };
        // A result for an address the backend no longer has is stale.
        if !s
            .spec
            .backends
            .iter()
            .any(|b| b.name == backend && b.addr == addr)
        {
            return;
        }
        let (rise, fall) = (s.spec.health.rise, s.spec.health.fall);
        let Some(h) = self.health.get_mut(&(service.clone(), backend.clone())) else {
            return;
        };
        let was_down = h.state == health::State::Down;
        let Some(t) = h.record(result, rise, fall) else {
            return;
        };
        let (kind, message) = match &t {
            Transition::Up => (
                "backend_up",
                format!("{service}: backend {backend} is up (probes pass)"),
            ),
            Transition::Down(why) => (
                "backend_down",
                format!("{service}: backend {backend} is down: {why}"),
            ),
        };
        let group = self.group_of(&service, &backend);
        let reason = match &t {
            Transition::Down(why) => why.clone(),
            Transition::Up => String::new(),
        };
        // A first pass after start resolves nothing: only a comeback does.
        if was_down || matches!(t, Transition::Down(_)) {
            self.alert(
                "ZddBackendDown",
                matches!(t, Transition::Down(_)),
                &[
                    ("service", &service),
                    ("group", &group),
                    ("backend", &backend),
                    ("reason", &reason),
                    ("severity", "warning"),
                ],
                message.clone(),
                None,
            );
        }
        self.record(
            actor(None, "agent"),
            kind,
            Some(&service),
            message,
            Value::Null,
            Value::Null,
        );
        self.reapply();
    }

    /// Reads the data path's passive signals (once a second), ejects outliers and returns
    /// those whose ejection is over. nat services with `outlier_ratio` only.
    pub fn passive_tick(&mut self) {
        let now = now_ms();
        // (kind, service, message, backend): an event and an alert each.
        let mut events: Vec<(&str, String, String, String)> = Vec::new();
        for s in &self.live.services {
            let h = &s.spec.health;
            if h.kind == HealthKind::None {
                continue;
            }
            let name = s.spec.name.clone();
            // Ejections that are over.
            for b in &s.spec.backends {
                if let Some(bh) = self.health.get_mut(&(name.clone(), b.name.clone()))
                    && bh.end_ejection(now)
                {
                    let m = format!(
                        "{name}: backend {} returns after its ejection (slow start)",
                        b.name
                    );
                    events.push(("backend_returned", name.clone(), m, b.name.clone()));
                }
            }
            if h.outlier_ratio_pct == 0 || s.spec.forwarding != crate::state::Forwarding::Nat {
                continue;
            }
            for b in &s.spec.backends {
                let Ok(Some(c)) = self.dp.passive_counters(&name, &b.name) else {
                    continue;
                };
                let key = (name.clone(), b.name.clone());
                let Some(bh) = self.health.get_mut(&key) else {
                    continue;
                };
                if bh.ejected() || bh.state != health::State::Up {
                    continue;
                }
                bh.sample(now, c.attempts, c.answered, c.resets, h.outlier_window_ms);
                let Some(why) = health::outlier(
                    &bh.samples,
                    h.outlier_ratio_pct,
                    h.outlier_min_attempts,
                    h.outlier_window_ms,
                ) else {
                    continue;
                };
                // Never more than max_ejected of the group at once.
                let group: Vec<&str> = s
                    .spec
                    .backends
                    .iter()
                    .filter(|x| x.group == b.group)
                    .map(|x| x.name.as_str())
                    .collect();
                let ejected = group
                    .iter()
                    .filter(|x| {
                        self.health
                            .get(&(name.clone(), x.to_string()))
                            .is_some_and(|y| y.ejected())
                    })
                    .count();
                if (ejected + 1) * 100 > h.max_ejected_pct as usize * group.len() {
                    log::warn!(
                        "{name}: backend {} is an outlier ({why}), but ejecting it would exceed max_ejected {}% of group {}",
                        b.name,
                        h.max_ejected_pct,
                        b.group
                    );
                    continue;
                }
                let Some(bh) = self.health.get_mut(&key) else {
                    continue;
                };
                let period = bh.eject(now, h.ejection_ms, why.clone());
                let m = format!(
                    "{name}: backend {} ejected for {:.1} s: {why}",
                    b.name,
                    period as f64 / 1e3
                );
                events.push(("backend_ejected", name.clone(), m, b.name.clone()));
            }
        }
        let changed = !events.is_empty();
        for (kind, svc, message, backend) in &events {
            let group = self.group_of(svc, backend);
            self.alert(
                "ZddBackendEjected",
                *kind == "backend_ejected",
                &[
                    ("service", svc),
                    ("group", &group),
                    ("backend", backend),
                    ("reason", "outlier"),
                    ("severity", "warning"),
                ],
                message.clone(),
                None,
            );
        }
        for (kind, svc, message, _) in events {
            self.record(
                actor(None, "agent"),
                kind,
                Some(&svc),
                message,
                Value::Null,
                Value::Null,
            );
        }
        if changed {
            self.reapply();
        }
    }

    /// Applies what health makes of the live state now (a transition, a slow-start step).
    /// The planner leaves unchanged services alone, so a second with nothing new writes
    /// nothing.
    pub fn reapply(&mut self) {
        let outcome = health::apply(&self.live, self.live.effective(), &self.health, now_ms());
        let report = match self.dp.apply(&outcome.state) {
            Ok(r) => r,
            Err(ApplyError::CleanUp { report, error }) => {
                log::warn!("health: cleaning up after an apply failed (retried): {error}");
                *report
            }
            Err(e) => {
                log::error!("health: applying the tables failed, they are as they were: {e}");
                return;
            }
        };
        if !(report.added.is_empty() && report.changed.is_empty()) {
            resolve_dsr_neighbours(&outcome.state);
        }
        self.note_panic(outcome.panic);
    }

    /// Records panic mode starting and ending, loudly.
    fn note_panic(&mut self, now: BTreeSet<(String, String)>) {
        let started: Vec<_> = now.difference(&self.panic).cloned().collect();
        let ended: Vec<_> = self.panic.difference(&now).cloned().collect();
        for (svc, g) in started.iter().chain(ended.iter()) {
            let firing = started.contains(&(svc.clone(), g.clone()));
            self.alert(
                "ZddPanicMode",
                firing,
                &[("service", svc), ("group", g), ("severity", "critical")],
                format!(
                    "{svc}: group {g} {}",
                    if firing {
                        "is in panic mode: too few healthy backends, forwarding to all of them"
                    } else {
                        "is out of panic mode"
                    }
                ),
                None,
            );
        }
        for (svc, g) in started {
            log::error!(
                "PANIC: {svc}: group {g} has too few healthy backends: forwarding to all of them"
            );
            self.record(
                actor(None, "agent"),
                "panic",
                Some(&svc),
                format!("{svc}: panic mode: group {g} has too few healthy backends, so it forwards to all its configured backends"),
                Value::Null,
                Value::Null,
            );
        }
        for (svc, g) in ended {
            self.record(
                actor(None, "agent"),
                "panic_over",
                Some(&svc),
                format!("{svc}: panic mode over: group {g} has enough healthy backends again"),
                Value::Null,
                Value::Null,
            );
        }
        self.panic = now;
    }

    /// Passive signals, deployments and alert counts for the metrics endpoint.
    fn metrics_extra(&self) -> crate::metrics::Extra {
        let mut passive = Vec::new();
        for s in &self.live.services {
            for b in &s.spec.backends {
                if let Ok(Some(c)) = self.dp.passive_counters(&s.spec.name, &b.name) {
                    passive.push((
                        s.spec.name.clone(),
                        b.name.clone(),
                        c.attempts,
                        c.answered,
                        c.resets,
                    ));
                }
            }
        }
        let now = now_ms();
        let deployments = self
            .live
            .services
            .iter()
            .filter_map(|s| {
                self.active_deployment(&s.spec.name).or_else(|| {
                    self.live
                        .deployments
                        .iter()
                        .rev()
                        .find(|d| d.service == s.spec.name)
                })
            })
            .map(|d| d.status(crate::api::Split::new(), Vec::new(), now))
            .collect();
        crate::metrics::Extra {
            passive,
            deployments,
            outcomes: self.live.outcomes.clone(),
            alerts: self.alerts.counts(),
        }
    }

    fn group_of(&self, service: &str, backend: &str) -> String {
        self.live
            .service(service)
            .ok()
            .and_then(|s| s.spec.backends.iter().find(|b| b.name == backend))
            .map(|b| b.group.clone())
            .unwrap_or_default()
    }

    /// Persists the live state.
    pub fn save(&self) -> Result<(), ApiError> {
        self.store
            .save(&Saved {
                version: STATE_VERSION,
                live: self.live.clone(),
                file_hash: self.file_hash.clone(),
            })
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))
    }

    /// Records an event: the ring, the journal, followers, the log.
    pub fn record(
        &mut self,
        who: Actor,
        kind: &str,
        service: Option<&str>,
        message: String,
        before: Value,
        after: Value,
    ) -> Event {
        self.seq += 1;
        let e = Event {
            seq: self.seq,
            time_ms: now_ms(),
            who,
            kind: kind.into(),
            service: service.map(str::to_string),
            message,
            before,
            after,
        };
        match (e.who.uid, e.who.pid) {
            (Some(uid), Some(pid)) => {
                log::info!("{} (by uid {uid}, pid {pid} via {})", e.message, e.who.via)
            }
            _ => log::info!("{} (via {})", e.message, e.who.via),
        }
        if let Err(x) = self.store.append_event(&e) {
            log::warn!("event journal: {x}");
        }
        if self.ring.len() == RING {
            self.ring.pop_front();
        }
        self.ring.push_back(e.clone());
        let _ = self.events.send(e.clone());
        e
    }

    fn update_count_rules(&mut self) {
        let any_drain = self.live.services.iter().any(|s| !s.drains.is_empty());
        let a = &self.cfg.agent;
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let rules = CountRules {
            now_ns: 0,
            tcp_idle_ns: ns(a.tcp_idle),
            udp_idle_ns: ns(a.udp_idle),
        };
        // Drains wait on the count: count often while one is in progress.
        let every = if any_drain || !self.waiters.is_empty() {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(2)
        };
        // send_replace: the value must change even before the counter subscribed.
        self.count_rules
            .send_replace((rules, self.dp.applied().dsr_service_ids(), every));
    }

    /// Makes `next` the live state: validated, written to the maps, persisted. On an error
    /// nothing changed (or, for a clean-up failure after the flip, the change is in force
    /// and that is said).
    pub(crate) fn commit(
        &mut self,
        next: LiveState,
        force: bool,
    ) -> Result<Option<String>, ApiError> {
        next.validate(force)?;
        self.sync_health(&next);
        let outcome = health::apply(&next, next.effective(), &self.health, now_ms());
        let effective = outcome.state;
        let warning = match self.dp.apply(&effective) {
            Ok(_) => None,
            Err(e @ ApplyError::CleanUp { .. }) => Some(e.to_string()),
            Err(ApplyError::Plan(e)) => return Err(err(ErrorCode::Invalid, e.to_string())),
            Err(e) => return Err(err(ErrorCode::NotApplied, e.to_string())),
        };
        self.live = next;
        resolve_dsr_neighbours(&effective);
        self.note_panic(outcome.panic);
        self.reconcile_probes();
        if let Err(e) = self.save() {
            log::error!("{e}");
            return Ok(Some(format!(
                "in force, but not saved: {e} (a restart would start from the last saved state)"
            )));
        }
        self.update_count_rules();
        Ok(warning)
    }

    /// Applies a change made by a request and records it.
    fn change(
        &mut self,
        peer: Peer,
        kind: &str,
        service: &str,
        force: bool,
        f: impl FnOnce(&mut LiveState) -> Result<String, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut next = self.live.clone();
        let message = f(&mut next)?;
        let before = self
            .live
            .service(service)
            .ok()
            .map(service_view)
            .unwrap_or(Value::Null);
        let after = next
            .service(service)
            .ok()
            .map(service_view)
            .unwrap_or(Value::Null);
        let warning = self.commit(next, force)?;
        let message = match warning {
            Some(w) => format!("{message} ({w})"),
            None => message,
        };
        let e = self.record(
            actor(Some(peer), "socket"),
            kind,
            Some(service),
            message.clone(),
            before,
            after,
        );
        Ok(json!(ChangeResult {
            message,
            events: vec![e],
        }))
    }

    /// Handles one intent.
    pub fn handle(&mut self, intent: Intent) {
        match intent {
            Intent::Request { cmd, peer, reply } => self.request(cmd, peer, reply),
            Intent::Subscribe { limit, reply } => {
                let recent: Vec<Event> = self
                    .ring
                    .iter()
                    .skip(self.ring.len().saturating_sub(limit))
                    .cloned()
                    .collect();
                let _ = reply.send((recent, self.events.subscribe()));
            }
            Intent::Reload => self.reload(),
            Intent::Metrics { reply } => {
                let text = match (self.status(None), self.stats()) {
                    (Ok(st), Ok(stats)) => {
                        crate::metrics::render(&st, &stats, &self.metrics_extra())
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        log::warn!("metrics: {e}");
                        String::new()
                    }
                };
                let _ = reply.send(text);
            }
            Intent::Probe {
                service,
                backend,
                addr,
                result,
            } => self.probe_result(service, backend, addr, result),
            Intent::FlowCounts(c) => {
                self.counts = c.counts;
                self.counts_at = Some(c.started);
                self.counts_at_ms = c.started_ms;
                self.check_drains();
                self.deploy_tick();
            }
            Intent::Analysis {
                id,
                attempt,
                results,
            } => self.on_analysis(id, attempt, results),
            Intent::Exec {
                id,
                attempt,
                result,
            } => self.on_exec(id, attempt, result),
        }
    }

    fn request(&mut self, cmd: Command, peer: Peer, reply: Reply) {
        // While a canary runs it owns the split and pins.
        let owned = match &cmd {
            Command::Split { service, .. } => Some((service, "split")),
            Command::Switch { service, .. } => Some((service, "switch")),
            Command::Rollback { service } => Some((service, "rollback")),
            Command::Pin { service, .. } => Some((service, "pin")),
            Command::Unpin { service, .. } => Some((service, "unpin")),
            _ => None,
        };
        if let Some((service, what)) = owned
            && let Err(e) = self.refuse_if_canary(service, what)
        {
            let _ = reply.send(Err(e));
            return;
        }
        let answer = match cmd {
            Command::Status { service, .. } => self.status(service.as_deref()).map(|s| json!(s)),
            Command::Stats => self.stats().map(|s| json!(s)),
            Command::Events { limit, .. } => {
                let n = limit.unwrap_or(100);
                Ok(json!(
                    self.ring
                        .iter()
                        .skip(self.ring.len().saturating_sub(n))
                        .collect::<Vec<_>>()
                ))
            }
            Command::Split { service, split } => live::split_buckets(&split).and_then(|b| {
                self.change(peer, "split", &service, false, |l| l.set_split(&service, b))
            }),
            Command::Switch { service, to, force } => self.switch(peer, &service, &to, force),
            Command::Rollback { service } => {
                let before = self.shares(&service);
                self.change(peer, "rollback", &service, false, |l| l.rollback(&service))
                    .map(|v| self.with_capacity_warning(&service, &before, v))
            }
            Command::BackendAdd {
                service,
                name,
                addr,
                group,
                weight,
            } => addr
                .parse()
                .map_err(|_| {
                    err(
                        ErrorCode::Invalid,
                        format!("{addr:?} is not ip:port (IPv6: [addr]:port)"),
                    )
                })
                .and_then(|addr| {
                    let b = BackendSpec {
                        name: name.clone(),
                        addr,
                        group,
                        weight: weight.unwrap_or(100),
                    };
                    self.change(peer, "backend_add", &service, false, |l| {
                        l.backend_add(&service, b)
                    })
                }),
            Command::BackendSet {
                service,
                name,
                weight,
            } => self.change(peer, "backend_set", &service, false, |l| {
                l.backend_set_weight(&service, &name, weight)
            }),
            Command::BackendUndrain { service, name } => {
                let r = self.change(peer, "backend_undrain", &service, false, |l| {
                    l.backend_undrain(&service, &name)
                });
                if r.is_ok() {
                    self.cancel_waiters(&service, &name, peer);
                }
                r
            }
            Command::BackendDrain {
                service,
                name,
                wait,
                timeout,
            } => {
                return self.drain(peer, service, name, wait, timeout, reply);
            }
            Command::BackendRemove {
                service,
                name,
                now,
                timeout,
            } => {
                if now {
                    self.change(peer, "backend_remove", &service, false, |l| {
                        l.backend_remove(&service, &name)
                    })
                } else {
                    return self.remove_after_drain(peer, service, name, timeout, reply);
                }
            }
            Command::Pin {
                service,
                source,
                group,
            } => self.change(peer, "pin", &service, false, |l| {
                l.pin(&service, &source, &group)
            }),
            Command::Unpin { service, source } => {
                self.change(peer, "unpin", &service, false, |l| {
                    l.unpin(&service, &source)
                })
            }
            Command::Apply { config, dry_run } => self.apply_text(peer, &config, dry_run),
            c @ (Command::Canary { .. }
            | Command::Rolling { .. }
            | Command::Pause { .. }
            | Command::Resume { .. }
            | Command::Promote { .. }
            | Command::Abort { .. }
            | Command::Deployments { .. }) => self.deploy_request(c, peer),
        };
        let _ = reply.send(answer);
    }

    fn switch(
        &mut self,
        peer: Peer,
        service: &str,
        to: &str,
        force: bool,
    ) -> Result<Value, ApiError> {
        let s = self.live.service(service)?;
        if !self.group_serves(service, to)
            && !force
            && s.spec.backends.iter().any(|b| b.group == to)
        {
            return Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: group {to} has no healthy backend that takes new flows (down, not probed yet, at weight 0 or draining): fix or add one, or use --force to switch anyway"
                ),
            ));
        }
        let before = self.shares(service);
        self.change(peer, "switch", service, force, |l| l.switch(service, to))
            .map(|v| self.with_capacity_warning(service, &before, v))
    }

    /// Each group's share now.
    fn shares(&self, service: &str) -> std::collections::BTreeMap<String, u32> {
        self.live
            .service(service)
            .map(|s| s.spec.split.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds a capacity warning (and its event) to a change's answer when new flows moved
    /// back to a group that is now smaller than when it last took them all.
    fn with_capacity_warning(
        &mut self,
        service: &str,
        before: &std::collections::BTreeMap<String, u32>,
        mut answer: Value,
    ) -> Value {
        if let Some(w) = self.check_capacity(service, before)
            && let Some(m) = answer.get_mut("message")
        {
            *m = Value::String(format!("{}; WARNING: {w}", m.as_str().unwrap_or_default()));
        }
        answer
    }

    /// A drain or removal must leave each group that gets new flows (a share or a pin) a
    /// backend that takes them; say so in words rather than as a broken rule.
    fn check_leaves_serving(&self, service: &str, name: &str) -> Result<(), ApiError> {
        let s = self.live.service(service)?;
        let Some(b) = s.spec.backends.iter().find(|b| b.name == name) else {
            return Ok(()); // the change itself reports the unknown backend
        };
        let g = &b.group;
        let share = s
            .spec
            .split
            .iter()
            .find(|(x, _)| x == g)
            .map(|(_, b)| *b)
            .unwrap_or(0);
        let starved = s
            .spec
            .groups_starved_without(&[name.to_string()], &|o| s.drains.contains_key(o));
        if starved.contains(g) {
            return Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: {name} is the last backend of group {g} that takes new flows, and {g} gets {}: switch or split away from {g} first (zdd switch {service} --to GROUP), or add a backend to it",
                    if share > 0 {
                        format!("{}% of them", share as f64 / 100.0)
                    } else {
                        "pinned clients".to_string()
                    }
                ),
            ));
        }
        Ok(())
    }

    fn drain(
        &mut self,
        peer: Peer,
        service: String,
        name: String,
        wait: bool,
        timeout: Option<String>,
        reply: Reply,
    ) {
        let timeout = match parse_timeout(&timeout, Duration::from_secs(60)) {
            Ok(t) => t,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let now = now_ms();
        let r = self.check_leaves_serving(&service, &name).and_then(|()| {
            self.change(peer, "backend_drain", &service, false, |l| {
                l.backend_drain(&service, &name, now, None)
            })
        });
        match r {
            Ok(_) if wait => self.wait_for(service, name, timeout, reply, false),
            other => {
                let _ = reply.send(other);
            }
        }
    }

    fn remove_after_drain(
        &mut self,
        peer: Peer,
        service: String,
        name: String,
        timeout: Option<String>,
        reply: Reply,
    ) {
        let timeout = match parse_timeout(&timeout, DEFAULT_REMOVE_TIMEOUT) {
            Ok(t) => t,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let now = now_ms();
        let at = now + timeout.as_millis() as u64;
        let r = self.check_leaves_serving(&service, &name).and_then(|()| {
            self.change(peer, "backend_remove", &service, false, |l| {
                l.backend_drain(&service, &name, now, Some(at))
            })
        });
        match r {
            Ok(_) => self.wait_for(service, name, timeout, reply, true),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn wait_for(
        &mut self,
        service: String,
        backend: String,
        timeout: Duration,
        reply: Reply,
        remove: bool,
    ) {
        let Some(slot) = self.dp.applied().backend_slot(&service, &backend) else {
            let _ = reply.send(Err(err(ErrorCode::Internal, "backend not in the maps")));
            return;
        };
        let started = Instant::now();
        self.waiters.push(Waiter {
            service,
            backend,
            remove,
            slot,
            started,
            deadline: started + timeout,
            reply,
        });
        self.update_count_rules();
    }

    /// Answers the drains and removals waiting on a backend that was undrained: cancelled.
    fn cancel_waiters(&mut self, service: &str, backend: &str, by: Peer) {
        let (gone, keep): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.service == service && w.backend == backend);
        self.waiters = keep;
        for w in gone {
            let what = if w.remove { "removal" } else { "drain" };
            let _ = w.reply.send(Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: the {what} of backend {backend} was cancelled: it was undrained (by uid {}, pid {}); it serves again",
                    by.uid, by.pid
                ),
            )));
        }
        self.update_count_rules();
    }

    pub(crate) fn active(&self, slot: (u16, u16)) -> u64 {
        self.counts.get(&slot).copied().unwrap_or(0)
    }

    /// Answers waiters whose backend drained or whose time is up, and removes backends whose
    /// removal is due. Runs on every flow count and every tick.
    pub fn check_drains(&mut self) {
        let now = Instant::now();
        // Only counts taken after a waiter started can say its backend is empty.
        let fresh = |w: &Waiter, at: Option<Instant>| at.is_some_and(|t| t > w.started);
        let mut still = Vec::new();
        for w in std::mem::take(&mut self.waiters) {
            let left = self.active(w.slot);
            let drained = fresh(&w, self.counts_at) && left == 0;
            if drained || now >= w.deadline {
                let waited = now.duration_since(w.started);
                let message = match (drained, w.remove) {
                    (true, false) => {
                        format!(
                            "{}: backend {} drained: no flows left",
                            w.service, w.backend
                        )
                    }
                    (true, true) => {
                        format!("{}: backend {} drained and removed", w.service, w.backend)
                    }
                    (false, false) => format!(
                        "{}: backend {}: {left} flow(s) left after {:.1}s (timeout)",
                        w.service,
                        w.backend,
                        waited.as_secs_f64()
                    ),
                    (false, true) => format!(
                        "{}: backend {} removed after {:.1}s with {left} flow(s) left (timeout): they move to live backends",
                        w.service,
                        w.backend,
                        waited.as_secs_f64()
                    ),
                };
                still.push((
                    w.service.clone(),
                    w.backend.clone(),
                    Some((
                        w.reply,
                        DrainResult {
                            message,
                            remaining_flows: left,
                            waited_ms: waited.as_millis() as u64,
                            timed_out: !drained,
                        },
                    )),
                ));
            } else {
                self.waiters.push(w);
            }
        }
        // Removals due: drained, or past their time.
        let wall = now_ms();
        let mut due: Vec<(String, String)> = Vec::new();
        for s in &self.live.services {
            for (b, d) in &s.drains {
                if let Some(at) = d.remove_at_ms {
                    let slot = self.dp.applied().backend_slot(&s.spec.name, b);
                    // Only a count that began after the drain can say the backend is empty.
                    let empty =
                        self.counts_at_ms > d.since_ms && slot.is_some_and(|x| self.active(x) == 0);
                    if wall >= at || empty {
                        due.push((s.spec.name.clone(), b.clone()));
                    }
                }
            }
        }
        for (service, backend) in due {
            let left = self
                .dp
                .applied()
                .backend_slot(&service, &backend)
                .map(|x| self.active(x))
                .unwrap_or(0);
            let mut next = self.live.clone();
            match next.backend_remove(&service, &backend) {
                Ok(m) => match self.commit(next, false) {
                    Ok(_) => {
                        let m = if left > 0 {
                            format!(
                                "{m} after its drain timed out ({left} flow(s) moved to live backends)"
                            )
                        } else {
                            format!("{m} after its drain")
                        };
                        self.record(
                            actor(None, "agent"),
                            "backend_removed",
                            Some(&service),
                            m,
                            Value::Null,
                            Value::Null,
                        );
                    }
                    Err(e) => log::error!("removing {service}/{backend} after its drain: {e}"),
                },
                Err(e) => log::error!("removing {service}/{backend}: {e}"),
            }
        }
        for (_, _, r) in still {
            if let Some((reply, result)) = r {
                let _ = reply.send(Ok(json!(result)));
            }
        }
        self.update_count_rules();
    }

    /// SIGHUP: the config file's services become the live state (agent settings that need a
    /// restart are refused).
    fn reload(&mut self) {
        let new = match config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                log::error!("reload refused, still running the previous config: {e}");
                return;
            }
        };
        match self.apply_config(new, actor(None, "config"), false) {
            Ok(changes) => log::info!(
                "reloaded config: {}",
                if changes.is_empty() {
                    "no change".to_string()
                } else {
                    changes.join("; ")
                }
            ),
            Err(e) => log::error!("reload refused, still running the previous config: {e}"),
        }
    }

    /// Applies a whole config (file or `apply` request): agent settings (those that can
    /// change without a restart) and services, whole or not at all.
    fn apply_config(
        &mut self,
        new: Config,
        who: Actor,
        from_request: bool,
    ) -> Result<Vec<String>, ApiError> {
        let a = &new.agent;
        let r = &self.cfg.agent;
        if !from_request {
            for (field, same) in [
                ("interfaces", a.interfaces == r.interfaces),
                ("xdp_mode", a.xdp_mode == r.xdp_mode),
                ("pin_dir", a.pin_dir == r.pin_dir),
                ("flow_table_size", a.flow_table_size == r.flow_table_size),
                ("socket", a.socket == r.socket),
                ("socket_group", a.socket_group == r.socket_group),
                ("state_dir", a.state_dir == r.state_dir),
                ("metrics", a.metrics == r.metrics),
            ] {
                if !same {
                    return Err(err(
                        ErrorCode::Refused,
                        format!(
                            "agent.{field} changed: it takes effect at a restart; nothing was applied"
                        ),
                    ));
                }
            }
        }
        let mut next = self.live.clone();
        let changes = next.apply_file(&new.state);
        for d in self.live.deployments.iter().filter(|d| d.active()) {
            let (now, then) = (
                next.service(&d.service).ok(),
                self.live.service(&d.service).ok(),
            );
            let owned = matches!(d.plan, crate::deploy::Plan::Canary(_));
            let conflict = match (now, then) {
                (None, _) => Some("removes the service"),
                (Some(a), Some(b)) if owned && a.spec.split != b.spec.split => {
                    Some("changes its split")
                }
                (Some(a), Some(b)) if owned && a.spec.pins != b.spec.pins => {
                    Some("changes its pins")
                }
                _ => None,
            };
            if let Some(what) = conflict {
                return Err(err(
                    ErrorCode::Refused,
                    format!(
                        "{}: {} is in progress and the config {what}: `zdd promote {}` or `zdd abort {}` first, or leave the split and pins as they are in the file; nothing was applied",
                        d.service,
                        d.position(),
                        d.service,
                        d.service
                    ),
                ));
            }
        }
        let (old_dp, new_dp) = (dp_config(r), dp_config(a));
        let tunables = !from_request && old_dp != new_dp;
        if tunables {
            self.dp.write_config(&new_dp).map_err(|e| {
                err(
                    ErrorCode::NotApplied,
                    format!("writing data-path settings: {e}; nothing was applied"),
                )
            })?;
        }
        let before = json!(
            self.live
                .services
                .iter()
                .map(service_view)
                .collect::<Vec<_>>()
        );
        if let Err(e) = self.commit(next, false) {
            if tunables && let Err(back) = self.dp.write_config(&old_dp) {
                return Err(err(
                    ErrorCode::NotApplied,
                    format!("{e}; and restoring the previous data-path settings failed: {back}"),
                ));
            }
            return Err(e);
        }
        if !from_request {
            self.file_hash = Some(services_hash(&new.state));
            if new.alerts != self.cfg.alerts {
                log::info!("alert receivers changed: restarting the alert senders");
                self.alerts = crate::alerts::Alerts::start(new.alerts.clone());
            }
            if new.agent.prometheus != self.cfg.agent.prometheus {
                self.prom = prom_client(&new.agent);
            }
            self.cfg = new;
            let _ = self.save();
        }
        if !changes.is_empty() || tunables {
            let message = if changes.is_empty() {
                "config applied: data-path settings changed".to_string()
            } else {
                format!("config applied: {}", changes.join("; "))
            };
            self.record(
                who,
                "apply",
                None,
                message,
                before,
                json!(self.live.desired()),
            );
        }
        Ok(changes)
    }

    fn apply_text(&mut self, peer: Peer, text: &str, dry_run: bool) -> Result<Value, ApiError> {
        let parsed = config::parse(std::path::Path::new("-"), text).map_err(|e| {
            err(
                ErrorCode::Invalid,
                match e {
                    config::ConfigError::Invalid { at, message, .. } => format!("{at}: {message}"),
                    config::ConfigError::Parse { message, .. } => message,
                    other => other.to_string(),
                },
            )
        })?;
        if dry_run {
            let changes = live::diff(&self.live.desired(), &parsed.state);
            return Ok(json!(crate::api::ApplyResult {
                changes,
                applied: false,
                dry_run: true,
            }));
        }
        let hash = services_hash(&parsed.state);
        let changes = self.apply_config(parsed, actor(Some(peer), "socket"), true)?;
        // Applying what the config file says (e.g. `zdd apply -f /etc/zdd/zdd.toml` after an
        // edit) counts as applying the file: a restart then keeps later run-time changes.
        if config::load(&self.config_path).is_ok_and(|f| services_hash(&f.state) == hash) {
            self.file_hash = Some(hash);
            let _ = self.save();
        }
        Ok(json!(crate::api::ApplyResult {
            changes,
            applied: true,
            dry_run: false,
        }))
    }

    /// Reads the data path's counters and turns them into rates (once a second).
    pub fn sample_rates(&mut self) {
        let now = Instant::now();
        let slots: Vec<(String, String)> = self
            .live
            .services
            .iter()
            .flat_map(|s| {
                s.spec
                    .backends
                    .iter()
                    .map(move |b| (s.spec.name.clone(), b.name.clone()))
            })
            .collect();
        for (service, backend) in slots {
            let Some(slot) = self.dp.applied().backend_slot(&service, &backend) else {
                continue;
            };
            let Ok(Some(c)) = self.dp.backend_counters(&service, &backend) else {
                continue;
            };
            let r = self.rates.entry(slot).or_default();
            if let Some((t, last)) = r.last {
                let dt = now.duration_since(t).as_secs_f64();
                if dt > 0.0 {
                    r.new_flows_per_s = c.new_flows.saturating_sub(last.new_flows) as f64 / dt;
                    r.bytes_per_s = c.bytes.saturating_sub(last.bytes) as f64 / dt;
                }
            }
            r.last = Some((now, c));
        }
    }

    fn status(&self, only: Option<&str>) -> Result<StatusResult, ApiError> {
        if let Some(s) = only {
            self.live.service(s)?;
        }
        let file = config::load(&self.config_path).ok();
        let mut out = StatusResult {
            config_file: self.config_path.display().to_string(),
            ..Default::default()
        };
        if let Some(f) = &file {
            out.differs_from_file = !live::diff(&self.live.desired(), &f.state).is_empty();
        }
        for s in &self.live.services {
            if only.is_some_and(|o| o != s.spec.name) {
                continue;
            }
            let spec = &s.spec;
            let differs = file.as_ref().map(|f| {
                let mine = crate::state::DesiredState {
                    services: vec![spec.clone()],
                };
                let theirs = crate::state::DesiredState {
                    services: f
                        .state
                        .services
                        .iter()
                        .filter(|x| x.name == spec.name)
                        .cloned()
                        .collect(),
                };
                live::diff(&theirs, &mine)
            });
            let backends = spec
                .backends
                .iter()
                .map(|b| {
                    let slot = self.dp.applied().backend_slot(&spec.name, &b.name);
                    let active = slot.map(|x| self.active(x)).unwrap_or(0);
                    let rate = slot.and_then(|x| self.rates.get(&x));
                    let state = match s.drains.get(&b.name) {
                        None => "serving",
                        Some(d) if d.remove_at_ms.is_some() => "removed",
                        Some(d) if active == 0 && self.counts_at_ms > d.since_ms => "drained",
                        Some(_) => "draining",
                    };
                    let h = self.health.get(&(spec.name.clone(), b.name.clone()));
                    let effective_weight = self
                        .dp
                        .applied()
                        .backend_weight(&spec.name, &b.name)
                        .unwrap_or(0);
                    BackendStatus {
                        name: b.name.clone(),
                        addr: b.addr.to_string(),
                        group: b.group.clone(),
                        weight: b.weight,
                        state: state.into(),
                        active_flows: active,
                        new_flows_per_s: rate.map(|r| r.new_flows_per_s).unwrap_or(0.0),
                        bytes_per_s: rate.map(|r| r.bytes_per_s).unwrap_or(0.0),
                        health: match (spec.health.kind, h.map(|h| h.state)) {
                            (HealthKind::None, _) => "unchecked",
                            (_, Some(_)) if h.is_some_and(|h| h.ejected()) => "ejected",
                            (_, Some(health::State::Up)) => "up",
                            (_, Some(health::State::Down)) => "down",
                            _ => "starting",
                        }
                        .into(),
                        last_probe: h.and_then(|h| h.last.as_ref()).map(|r| {
                            format!("{} {}", if r.ok { "ok:" } else { "failed:" }, r.detail)
                        }),
                        probe_latency_ms: h.and_then(|h| h.last.as_ref()).map(|r| r.latency_ms),
                        down_reason: h.and_then(|h| {
                            h.down_reason.clone().or_else(|| {
                                h.eject_reason.as_ref().map(|r| {
                                    format!(
                                        "ejected for {:.1} s more: {r}",
                                        h.ejected_until_ms.unwrap_or(0).saturating_sub(now_ms())
                                            as f64
                                            / 1e3
                                    )
                                })
                            })
                        }),
                        effective_weight,
                    }
                })
                .collect();
            out.services.push(ServiceStatus {
                name: spec.name.clone(),
                vip: spec.vip.to_string(),
                protocol: match spec.protocol {
                    crate::state::Protocol::Tcp => "tcp",
                    crate::state::Protocol::Udp => "udp",
                }
                .into(),
                forwarding: match spec.forwarding {
                    Forwarding::Nat => "nat",
                    Forwarding::Dsr => "dsr",
                }
                .into(),
                affinity: if spec.client_affinity {
                    "client"
                } else {
                    "flow"
                }
                .into(),
                split: live::split_percent(&spec.split),
                previous_split: s.history.last().map(|h| live::split_percent(h)),
                pins: spec
                    .pins
                    .iter()
                    .map(|p| PinStatus {
                        source: p.prefix.to_string(),
                        group: p.group.clone(),
                    })
                    .collect(),
                backends,
                differs_from_file: differs.and_then(|d| (!d.is_empty()).then(|| d.join("; "))),
                panic_groups: self
                    .panic
                    .iter()
                    .filter(|(sv, _)| *sv == spec.name)
                    .map(|(_, g)| g.clone())
                    .collect(),
                deployment: self.deployment_status(&spec.name),
            });
        }
        Ok(out)
    }

    fn stats(&self) -> Result<StatsResult, ApiError> {
        let internal = |e: crate::maps::DataplaneError| err(ErrorCode::Internal, e.to_string());
        let mut out = StatsResult::default();
        for (k, v) in self.dp.stats().map_err(internal)?.values {
            out.global.insert(k.to_string(), v);
        }
        for s in &self.live.services {
            if let Some(c) = self.dp.service_counters(&s.spec.name).map_err(internal)? {
                out.services.push(CounterRow {
                    name: s.spec.name.clone(),
                    addr: s.spec.vip.to_string(),
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                });
            }
            for b in &s.spec.backends {
                if let Some(c) = self
                    .dp
                    .backend_counters(&s.spec.name, &b.name)
                    .map_err(internal)?
                {
                    out.backends.push(CounterRow {
                        name: format!("{}/{}", s.spec.name, b.name),
                        addr: b.addr.to_string(),
                        packets: c.packets,
                        bytes: c.bytes,
                        new_flows: c.new_flows,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Counts active flows on a blocking thread at the cadence the owner asks for, and sends the
/// counts to it as intents. Ends when the owner's channel closes.
pub fn spawn_flow_counter(
    pin_dir: PathBuf,
    mut rules: tokio::sync::watch::Receiver<(CountRules, BTreeSet<u16>, Duration)>,
    to: mpsc::Sender<Intent>,
) {
    std::thread::spawn(move || {
        let table = match crate::maps::flows::FlowTable::open(&pin_dir) {
            Ok(t) => t,
            Err(e) => {
                log::error!("active-flow counting disabled: {e}");
                return;
            }
        };
        loop {
            let (mut r, dsr, every) = rules.borrow_and_update().clone();
            r.now_ns = crate::maps::coarse_now_ns();
            let started = Instant::now();
            let started_ms = now_ms();
            match table.count(&r, &dsr) {
                Ok(counts) => {
                    let c = Counted {
                        counts,
                        started,
                        started_ms,
                    };
                    if to.blocking_send(Intent::FlowCounts(c)).is_err() {
                        return;
                    }
                }
                Err(e) => log::warn!("counting active flows: {e}"),
            }
            log::debug!("counted active flows in {:?}", started.elapsed());
            // Sleep until the next count is due, or at once when the owner asks for another
            // cadence (a drain began).
            while started.elapsed() < every && !rules.has_changed().unwrap_or(true) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if to.is_closed() || rules.has_changed().is_err() {
                return;
            }
        }
    });
}
