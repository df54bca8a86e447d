//! The owner task's side of deployments: requests (start, pause, resume, promote, abort,
//! list), the once-a-second tick that moves them on, and the results of what runs off the
//! task (analyses, update commands). The canary's steps are in [`steps`], the rolling
//! update's batches in [`batches`], the capacity check of rollbacks in [`capacity`]. Every
//! change of split, pins or drains goes through `Control::commit` with the deployment's new
//! state in the same live state, so both are applied and saved together or not at all.

mod batches;
mod capacity;
mod steps;

use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    alerts::Alert,
    api::{
        ApiError, CheckResult, Command, DeploymentStatus, DeploymentsResult, ErrorCode,
        GroupSignals,
    },
    control::{Control, Intent, Peer, now_ms},
    deploy::{
        CanaryPlan, Deployment, KEEP_PAST, Phase, Plan, RollingPlan, Snap, State, Step, canary,
        rolling,
        run::{self, Query, UserCommand},
    },
    health::{self, BackendHealth},
    live::{self, LiveState},
    state::HealthKind,
};

/// How often firing alerts are re-sent to Alertmanager.
const ALERT_REFRESH_MS: u64 = 60_000;

fn err(code: ErrorCode, m: impl Into<String>) -> ApiError {
    ApiError::new(code, m)
}

fn duration_ms(v: &Option<String>, default_ms: u64, what: &str) -> Result<u64, ApiError> {
    let d = crate::control::parse_timeout(v, Duration::from_millis(default_ms))
        .map_err(|e| err(e.code, format!("{what}: {}", e.message)))?;
    if d < Duration::from_secs(1) {
        return Err(err(ErrorCode::Invalid, format!("{what}: at least 1s")));
    }
    Ok(d.as_millis() as u64)
}

impl Control {
    // -----------------------------------------------------------------------------------
    // Requests
    // -----------------------------------------------------------------------------------

    /// `canary`, `rolling`, `pause`, `resume`, `promote`, `abort`, `deployments`.
    pub(crate) fn deploy_request(&mut self, cmd: Command, peer: Peer) -> Result<Value, ApiError> {
        match cmd {
            Command::Canary {
                service,
                to,
                steps,
                interval,
                baseline,
                check,
                min_flows,
            } => self.start_canary(
                peer, &service, &to, &steps, interval, baseline, check, min_flows,
            ),
            Command::Rolling {
                service,
                batch,
                exec,
                drain_timeout,
                exec_timeout,
                health_timeout,
            } => self.start_rolling(
                peer,
                &service,
                &batch,
                exec,
                [drain_timeout, exec_timeout, health_timeout],
            ),
            Command::Pause { service } => self.pause(peer, &service),
            Command::Resume { service } => self.resume(peer, &service),
            Command::Promote { service } => self.promote(peer, &service),
            Command::Abort { service } => self.abort(peer, &service),
            Command::Deployments { service, limit } => {
                if let Some(s) = &service {
                    self.live.service(s)?;
                }
                let now = now_ms();
                let mine = |d: &&Deployment| service.as_ref().is_none_or(|s| *s == d.service);
                let active = self
                    .live
                    .deployments
                    .iter()
                    .filter(mine)
                    .filter(|d| d.active())
                    .map(|d| self.status_of(d, now))
                    .collect();
                let past = self
                    .live
                    .deployments
                    .iter()
                    .rev()
                    .filter(mine)
                    .filter(|d| !d.active())
                    .take(limit.unwrap_or(20))
                    .map(|d| self.status_of(d, now))
                    .collect();
                Ok(json!(DeploymentsResult { active, past }))
            }
            other => Err(err(
                ErrorCode::Internal,
                format!("{} is not a deployment request", other.name()),
            )),
        }
    }

    /// The deployment in progress on `service`, if any.
    pub(crate) fn active_deployment(&self, service: &str) -> Option<&Deployment> {
        self.live
            .deployments
            .iter()
            .find(|d| d.service == service && d.active())
    }

    /// One deployment per service at a time.
    fn refuse_if_active(&self, service: &str) -> Result<(), ApiError> {
        match self.active_deployment(service) {
            Some(d) => Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: {} is in progress ({}): `zdd {}{service}` first",
                    d.position(),
                    d.state.name(),
                    if matches!(d.plan, Plan::Canary(_)) {
                        format!("promote {service}` or `zdd abort ")
                    } else {
                        "abort ".to_string()
                    }
                ),
            )),
            None => Ok(()),
        }
    }

    /// Refuses a manual change of split or pins while a canary owns them.
    pub(crate) fn refuse_if_canary(&self, service: &str, what: &str) -> Result<(), ApiError> {
        match self.active_deployment(service) {
            Some(d) if matches!(d.plan, Plan::Canary(_)) => Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: {} is in progress ({}) and owns the split and pins: `zdd promote {service}` or `zdd abort {service}` before a manual {what}",
                    d.position(),
                    d.state.name()
                ),
            )),
            _ => Ok(()),
        }
    }

    pub(crate) fn deployment_status(&self, service: &str) -> Option<DeploymentStatus> {
        self.active_deployment(service)
            .map(|d| self.status_of(d, now_ms()))
    }

    fn status_of(&self, d: &Deployment, now: u64) -> DeploymentStatus {
        let split = self
            .live
            .service(&d.service)
            .map(|s| live::split_percent(&s.spec.split))
            .unwrap_or_default();
        let groups = if d.active() {
            self.group_signals(d)
        } else {
            Vec::new()
        };
        d.status(split, groups, now)
    }

    fn deployment_mut(next: &mut LiveState, id: u64) -> Option<&mut Deployment> {
        next.deployments.iter_mut().find(|d| d.id == id)
    }

    fn find(&self, id: u64) -> Option<&Deployment> {
        self.live.deployments.iter().find(|d| d.id == id)
    }

    fn active_or_refuse(&self, service: &str, verb: &str) -> Result<Deployment, ApiError> {
        self.live.service(service)?;
        self.active_deployment(service).cloned().ok_or_else(|| {
            err(
                ErrorCode::Refused,
                format!("{service}: no deployment in progress to {verb}"),
            )
        })
    }

    /// The backend's totals now.
    fn snap(&self, service: &str, backend: &str) -> Snap {
        let c = self.dp.backend_counters(service, backend).ok().flatten();
        let p = self.dp.passive_counters(service, backend).ok().flatten();
        let h = self.health.get(&(service.to_string(), backend.to_string()));
        Snap {
            new_flows: c.map(|c| c.new_flows).unwrap_or(0),
            attempts: p.map(|p| p.attempts).unwrap_or(0),
            answered: p.map(|p| p.answered).unwrap_or(0),
            resets: p.map(|p| p.resets).unwrap_or(0),
            probes: h.map(|h| h.probes).unwrap_or(0),
            probe_failures: h.map(|h| h.probe_failures).unwrap_or(0),
            latency_us_sum: h.map(|h| h.latency_us_sum).unwrap_or(0),
        }
    }

    fn snapshot(&self, service: &str) -> std::collections::BTreeMap<String, Snap> {
        self.live
            .service(service)
            .map(|s| {
                s.spec
                    .backends
                    .iter()
                    .map(|b| (b.name.clone(), self.snap(service, &b.name)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A canary's baseline and canary groups' signals since the step began.
    fn group_signals(&self, d: &Deployment) -> Vec<GroupSignals> {
        let Plan::Canary(c) = &d.plan else {
            return Vec::new();
        };
        let Ok(s) = self.live.service(&d.service) else {
            return Vec::new();
        };
        [&c.baseline, &c.to]
            .iter()
            .map(|g| {
                let pairs: Vec<(Snap, Snap)> = s
                    .spec
                    .backends
                    .iter()
                    .filter(|b| &&b.group == g)
                    .map(|b| {
                        (
                            d.snapshot.get(&b.name).copied().unwrap_or_default(),
                            self.snap(&d.service, &b.name),
                        )
                    })
                    .collect();
                canary::signals(g, &pairs)
            })
            .collect()
    }

    fn healthy(&self, service: &str, backend: &str) -> bool {
        let Ok(s) = self.live.service(service) else {
            return false;
        };
        if s.spec.health.kind == HealthKind::None {
            return true;
        }
        self.health
            .get(&(service.to_string(), backend.to_string()))
            .is_some_and(|h| h.state == health::State::Up && !h.ejected())
    }

    /// The group has a backend that takes new flows now: healthy, not drained, weight > 0
    /// (what `switch` and `canary` need of the group they send flows to).
    pub(crate) fn group_serves(&self, service: &str, group: &str) -> bool {
        let Ok(s) = self.live.service(service) else {
            return false;
        };
        s.spec.backends.iter().any(|b| {
            b.group == group
                && b.weight > 0
                && !s.drains.contains_key(&b.name)
                && self.healthy(service, &b.name)
        })
    }

    /// The weights of a group's backends that take new flows now (healthy, not drained).
    pub(crate) fn healthy_capacity(&self, service: &str, group: &str) -> u32 {
        let Ok(s) = self.live.service(service) else {
            return 0;
        };
        s.spec
            .backends
            .iter()
            .filter(|b| b.group == group && !s.drains.contains_key(&b.name))
            .filter(|b| self.healthy(service, &b.name))
            .map(|b| b.weight)
            .sum()
    }

    // -----------------------------------------------------------------------------------
    // pause, resume, promote, abort
    // -----------------------------------------------------------------------------------

    fn pause(&mut self, peer: Peer, service: &str) -> Result<Value, ApiError> {
        let d = self.active_or_refuse(service, "pause")?;
        if d.state != State::Running {
            return Err(err(
                ErrorCode::Refused,
                format!("{service}: {} is {} already", d.position(), d.state.name()),
            ));
        }
        let now = now_ms();
        let message = format!("{} paused by uid {}", d.position(), peer.uid);
        if let Some(x) = self.live.deployments.iter_mut().find(|x| x.id == d.id) {
            x.state = State::Paused;
            if matches!(x.plan, Plan::Canary(_)) {
                x.paused_left_ms = Some(x.step_ends_ms.unwrap_or(now).saturating_sub(now));
            }
            x.message = message.clone();
        }
        self.save()?;
        self.record_deploy("deployment_paused", service, message, Value::Null);
        self.answer(d.id)
    }

    fn resume(&mut self, peer: Peer, service: &str) -> Result<Value, ApiError> {
        let d = self.active_or_refuse(service, "resume")?;
        let now = now_ms();
        let message = format!("{} resumed by uid {}", d.position(), peer.uid);
        match (&d.plan, d.state) {
            (_, State::Running) => {
                return Err(err(
                    ErrorCode::Refused,
                    format!("{service}: {} is running already", d.position()),
                ));
            }
            (Plan::Canary(c), _) => {
                self.alert(
                    "ZddDeploymentPaused",
                    false,
                    &[("service", service)],
                    message.clone(),
                    None,
                );
                if let Some(x) = self.live.deployments.iter_mut().find(|x| x.id == d.id) {
                    x.state = State::Running;
                    x.extensions = 0;
                    let left = x.paused_left_ms.take().unwrap_or(c.interval_ms);
                    x.step_ends_ms = Some(now + left);
                    x.message = message.clone();
                }
                self.save()?;
            }
            (Plan::Rolling(r), State::Paused) if d.phase != Phase::Done => {
                // The batch in progress went on while paused; only the clock of the next waits.
                let _ = r;
                if let Some(x) = self.live.deployments.iter_mut().find(|x| x.id == d.id) {
                    x.state = State::Running;
                    x.message = message.clone();
                }
                self.save()?;
            }
            (Plan::Rolling(r), _) => {
                // Stopped (retry the batch) or paused between batches: drain it and go.
                let mut next = self.live.clone();
                let Some(x) = Self::deployment_mut(&mut next, d.id) else {
                    return Err(err(ErrorCode::Internal, "deployment vanished"));
                };
                x.state = State::Running;
                x.phase = Phase::Draining;
                x.step_started_ms = now;
                x.step_ends_ms = Some(now + r.drain_timeout_ms);
                x.message = message.clone();
                let x = x.clone();
                batches::drain_batch(&mut next, &x, now)?;
                self.commit(next, false)?;
                self.alert(
                    "ZddRollingStopped",
                    false,
                    &[("service", service)],
                    message.clone(),
                    Some(now),
                );
            }
        }
        self.record_deploy("deployment_resumed", service, message, Value::Null);
        self.answer(d.id)
    }

    fn promote(&mut self, peer: Peer, service: &str) -> Result<Value, ApiError> {
        let d = self.active_or_refuse(service, "promote")?;
        match &d.plan {
            Plan::Canary(c) => {
                let message = format!(
                    "{} promoted by uid {}: {} gets all new flows",
                    d.position(),
                    peer.uid,
                    c.to
                );
                self.end_canary_now(&d, State::Succeeded, message)?;
                self.answer(d.id)
            }
            Plan::Rolling(_) if d.state == State::Running => Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: {} is running: it does not wait between batches",
                    d.position()
                ),
            )),
            Plan::Rolling(_) => self.resume(peer, service),
        }
    }

    fn abort(&mut self, peer: Peer, service: &str) -> Result<Value, ApiError> {
        let d = self.active_or_refuse(service, "abort")?;
        let now = now_ms();
        match &d.plan {
            Plan::Canary(c) => {
                let message = format!(
                    "{} aborted by uid {}: back to {}",
                    d.position(),
                    peer.uid,
                    c.baseline
                );
                self.end_canary_now(&d, State::Aborted, message)?;
            }
            Plan::Rolling(r) => {
                let batch = r.batches.get(d.step).cloned().unwrap_or_default();
                let mut next = self.live.clone();
                // Nothing was run on a batch still draining: it can serve again.
                let undrain = d.phase == Phase::Draining && d.state == State::Running;
                if undrain
                    && let Some(s) = next.services.iter_mut().find(|s| s.spec.name == service)
                {
                    for b in batch.iter().filter(|b| !d.drained_before.contains(b)) {
                        s.drains.remove(b);
                    }
                }
                let left = if undrain || d.phase == Phase::Done || batch.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} drained (`zdd backend undrain {service} NAME` when fine)",
                        crate::deploy::batch_stays(&batch)
                    )
                };
                let message = format!("{} aborted by uid {}{left}", d.position(), peer.uid);
                if let Some(x) = Self::deployment_mut(&mut next, d.id) {
                    x.state = State::Aborted;
                    x.phase = Phase::Done;
                    x.ended_ms = Some(now);
                    x.step_ends_ms = None;
                    x.message = message.clone();
                }
                count_outcome(&mut next, &d, State::Aborted);
                self.commit_deploy(
                    next,
                    true,
                    "deployment_aborted",
                    service,
                    message.clone(),
                    Value::Null,
                )?;
                self.alert(
                    "ZddRollingStopped",
                    false,
                    &[("service", service)],
                    message.clone(),
                    Some(now),
                );
                self.deployment_finished_alert(&d, State::Aborted, &message);
            }
        }
        self.answer(d.id)
    }

    /// `promote` or `abort` of a canary: ends it at once, or says it could not.
    fn end_canary_now(
        &mut self,
        d: &Deployment,
        state: State,
        message: String,
    ) -> Result<(), ApiError> {
        self.finish_canary(d, d.analysis.clone(), state, message, Value::Null);
        if self.find(d.id).is_some_and(|x| x.active()) {
            return Err(err(
                ErrorCode::NotApplied,
                format!(
                    "{}: ending {} failed, it goes on as it was: see the agent's log",
                    d.service,
                    d.position()
                ),
            ));
        }
        Ok(())
    }

    /// Starts deployment `d`: `next` (with what its first step changes) plus `d`, committed
    /// together; answers its status.
    fn launch(&mut self, mut next: LiveState, d: Deployment) -> Result<Value, ApiError> {
        let (service, message, now) = (d.service.clone(), d.message.clone(), d.started_ms);
        next.deployments.push(d.clone());
        self.commit_deploy(
            next,
            false,
            "deployment_started",
            &service,
            message,
            Value::Null,
        )?;
        Ok(json!(self.status_of(&d, now)))
    }

    fn answer(&self, id: u64) -> Result<Value, ApiError> {
        let d = self
            .find(id)
            .ok_or_else(|| err(ErrorCode::Internal, "deployment vanished"))?;
        Ok(json!(self.status_of(d, now_ms())))
    }

    // -----------------------------------------------------------------------------------
    // Tick, restart, capacity
    // -----------------------------------------------------------------------------------

    /// Moves deployments on (once a second and after each flow count).
    pub fn deploy_tick(&mut self) {
        let now = now_ms();
        let active: Vec<Deployment> = self
            .live
            .deployments
            .iter()
            .filter(|d| d.active())
            .cloned()
            .collect();
        for d in active {
            match (&d.plan, d.state) {
                (Plan::Canary(_), State::Running)
                    if d.phase == Phase::Observing && d.step_ends_ms.is_some_and(|t| now >= t) =>
                {
                    self.begin_analysis(d.id)
                }
                (Plan::Rolling(_), State::Running | State::Paused) => self.rolling_tick(&d, now),
                _ => {}
            }
        }
        self.track_capacity();
        self.refresh_alerts(now);
    }

    /// Re-sends the alerts still firing to Alertmanager once a minute, well within its
    /// `resolve_timeout` (5 min by default), so a backend down for an hour stays an alert.
    fn refresh_alerts(&mut self, now: u64) {
        if now.saturating_sub(self.alerts_refreshed_ms) < ALERT_REFRESH_MS {
            return;
        }
        self.alerts_refreshed_ms = now;
        for a in self.firing_alerts.values() {
            self.alerts.refresh(a.clone());
        }
    }

    /// After a restart: an analysis or update that was running is gone with the old agent.
    pub fn resume_deployments_after_restart(&mut self) {
        let now = now_ms();
        let mut changed = Vec::new();
        for d in self.live.deployments.iter_mut().filter(|d| d.active()) {
            match (&d.plan, d.phase) {
                (Plan::Canary(_), Phase::Analysing) => {
                    // Its evidence is in the snapshot: analyse again at once.
                    d.phase = Phase::Observing;
                    d.step_ends_ms = Some(now);
                }
                (Plan::Rolling(_), Phase::Updating) if d.state != State::Stopped => {
                    d.state = State::Stopped;
                    d.message = format!(
                        "{} stopped: the agent restarted while the update command ran; `zdd resume {}` runs it again",
                        d.position(),
                        d.service
                    );
                    changed.push((d.service.clone(), d.message.clone()));
                }
                (Plan::Rolling(r), Phase::WaitingHealth) => {
                    // Health starts afresh (adopted backends start up): make the batch prove
                    // itself again.
                    for b in r.batches.get(d.step).into_iter().flatten() {
                        if let Some(h) = self.health.get_mut(&(d.service.clone(), b.clone())) {
                            *h = BackendHealth::new(health::State::Down);
                        }
                    }
                }
                _ => {}
            }
        }
        let n = self.live.deployments.iter().filter(|d| d.active()).count();
        if n > 0 {
            log::info!("{n} deployment(s) in progress carry on after the restart");
        }
        let _ = self.save();
        for (svc, m) in changed {
            self.record_deploy("rolling_stopped", &svc, m, Value::Null);
        }
    }

    // -----------------------------------------------------------------------------------
    // Plumbing
    // -----------------------------------------------------------------------------------

    /// Commits `next` (a deployment's change with the split, pins or drains it makes) and
    /// records the event. `force`: ending a deployment (back to the baseline, or all to the
    /// canary) is never refused by the serving-group rule; `numbers` go in the event.
    fn commit_deploy(
        &mut self,
        next: LiveState,
        force: bool,
        kind: &str,
        service: &str,
        message: String,
        numbers: Value,
    ) -> Result<(), ApiError> {
        let warning = self.commit(next, force)?;
        let message = match warning {
            Some(w) => format!("{message} ({w})"),
            None => message,
        };
        self.record_deploy(kind, service, message, numbers);
        Ok(())
    }

    fn record_deploy(&mut self, kind: &str, service: &str, message: String, after: Value) {
        self.record(
            crate::api::Actor {
                via: "agent".into(),
                ..Default::default()
            },
            kind,
            Some(service),
            message,
            Value::Null,
            after,
        );
    }

    /// Sends an alert (never blocks). Labels with an empty value are left out. A resolved
    /// alert is sent with the labels and start of the one it resolves (Alertmanager matches
    /// them by their labels), and only when that one fired.
    pub(crate) fn alert(
        &mut self,
        name: &str,
        firing: bool,
        labels: &[(&str, &str)],
        summary: String,
        ends_ms: Option<u64>,
    ) {
        let labels: std::collections::BTreeMap<String, String> = labels
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // What a firing alert is about: its name and where (not why, which may change).
        let key = ["service", "group", "backend"]
            .iter()
            .fold(name.to_string(), |k, l| {
                format!("{k}/{}", labels.get(*l).map(String::as_str).unwrap_or(""))
            });
        let now = now_ms();
        if firing {
            let a = Alert {
                name: name.into(),
                firing,
                labels,
                summary,
                starts_ms: now,
                ends_ms,
            };
            if ends_ms.is_none() {
                self.firing_alerts.insert(key, a.clone());
            }
            self.alerts.send(a);
        } else {
            // Resolves every firing one of that name about what the labels given name
            // (`service` alone: all of the service's).
            let about = |a: &Alert| {
                a.name == name
                    && ["service", "group", "backend"]
                        .iter()
                        .all(|l| labels.get(*l).is_none_or(|v| a.labels.get(*l) == Some(v)))
            };
            let keys: Vec<String> = self
                .firing_alerts
                .iter()
                .filter(|(_, a)| about(a))
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                if let Some(fired) = self.firing_alerts.remove(&k) {
                    self.alerts.send(Alert {
                        firing: false,
                        summary: summary.clone(),
                        ends_ms: Some(ends_ms.unwrap_or(now).max(fired.starts_ms + 1)),
                        ..fired
                    });
                }
            }
        }
    }

    fn deployment_finished_alert(&mut self, d: &Deployment, state: State, message: &str) {
        let now = now_ms();
        if matches!(d.plan, Plan::Canary(_)) {
            // A pause for want of evidence is over once it ends.
            self.alert(
                "ZddDeploymentPaused",
                false,
                &[("service", &d.service)],
                message.into(),
                Some(now),
            );
        }
        self.alert(
            "ZddDeploymentFinished",
            true,
            &[
                ("service", &d.service),
                ("kind", d.kind()),
                ("outcome", state.name()),
                (
                    "severity",
                    if state == State::Succeeded {
                        "info"
                    } else {
                        "warning"
                    },
                ),
            ],
            message.into(),
            Some(now + 300_000),
        );
    }
}

/// Counts a finished deployment and keeps the last `KEEP_PAST` finished ones.
fn count_outcome(next: &mut LiveState, d: &Deployment, state: State) {
    *next
        .outcomes
        .entry(format!("{}/{}/{}", d.service, d.kind(), state.name()))
        .or_default() += 1;
    let finished = next
        .deployments
        .iter()
        .filter(|x| !x.active() || x.id == d.id)
        .count();
    if finished > KEEP_PAST {
        let mut drop = finished - KEEP_PAST;
        next.deployments.retain(|x| {
            if drop > 0 && !x.active() && x.id != d.id {
                drop -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// The deployment's service in `next`.
fn service_mut<'a>(
    next: &'a mut LiveState,
    d: &Deployment,
) -> Result<&'a mut live::LiveService, ApiError> {
    next.services
        .iter_mut()
        .find(|s| s.spec.name == d.service)
        .ok_or_else(|| {
            err(
                ErrorCode::UnknownService,
                format!("no service {:?}", d.service),
            )
        })
}
