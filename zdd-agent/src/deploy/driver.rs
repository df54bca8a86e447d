//! The owner task's side of deployments: requests (start, pause, resume, promote, abort,
//! list), the once-a-second tick that moves them on, and the results of what runs off the
//! task (analyses, update commands). Every change of split, pins or drains goes through
//! `Control::commit` with the deployment's new state in the same live state, so both are
//! applied and saved together or not at all.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    alerts::Alert,
    api::{
        ApiError, CheckResult, Command, DeploymentStatus, DeploymentsResult, ErrorCode,
        GroupSignals,
    },
    config,
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

fn err(code: ErrorCode, m: impl Into<String>) -> ApiError {
    ApiError::new(code, m)
}

fn duration_ms(v: &Option<String>, default_ms: u64, what: &str) -> Result<u64, ApiError> {
    match v {
        None => Ok(default_ms),
        Some(s) => {
            let d = config::parse_duration(s)
                .map_err(|m| err(ErrorCode::Invalid, format!("{what}: {m}")))?;
            if d < Duration::from_secs(1) {
                return Err(err(ErrorCode::Invalid, format!("{what} {s}: at least 1s")));
            }
            Ok(d.as_millis() as u64)
        }
    }
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
    // Canary
    // -----------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn start_canary(
        &mut self,
        peer: Peer,
        service: &str,
        to: &str,
        steps: &[String],
        interval: Option<String>,
        baseline: Option<String>,
        check: Option<String>,
        min_flows: Option<u64>,
    ) -> Result<Value, ApiError> {
        let s = self.live.service(service)?;
        if let Some(d) = self.active_deployment(service) {
            return Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: {} is in progress ({}): `zdd promote {service}` or `zdd abort {service}` first",
                    d.position(),
                    d.state.name()
                ),
            ));
        }
        let spec = &s.spec;
        if !spec.backends.iter().any(|b| b.group == to) {
            return Err(err(
                ErrorCode::UnknownGroup,
                format!("{service}: group {to} has no backends: add some first (zdd backend add)"),
            ));
        }
        let steps =
            canary::parse_steps(steps, &spec.cohorts).map_err(|m| err(ErrorCode::Invalid, m))?;
        let interval_ms = duration_ms(&interval, spec.canary.interval_ms, "--interval")?;
        let share = |g: &str| {
            spec.split
                .iter()
                .find(|(x, _)| x == g)
                .map(|(_, b)| *b)
                .unwrap_or(0)
        };
        let baseline = match baseline {
            Some(b) => {
                if !spec.groups().contains(&b) {
                    return Err(err(
                        ErrorCode::UnknownGroup,
                        format!("{service}: no group {b}"),
                    ));
                }
                b
            }
            None => spec
                .split
                .iter()
                .filter(|(g, _)| g != to)
                .max_by_key(|(_, b)| *b)
                .map(|(g, _)| g.clone())
                .ok_or_else(|| {
                    err(
                        ErrorCode::Refused,
                        format!("{service}: no group besides {to} has a share to be the baseline"),
                    )
                })?,
        };
        if baseline == to {
            return Err(err(
                ErrorCode::Invalid,
                format!("{service}: the baseline and the canary are both {to}"),
            ));
        }
        if share(to) > 0 {
            return Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: {to} already gets {}% of new flows; a canary starts from none (zdd split {service} {baseline}=100 first)",
                    share(to) as f64 / 100.0
                ),
            ));
        }
        let others: Vec<String> = spec
            .split
            .iter()
            .filter(|(g, b)| *b > 0 && g != &baseline && g != to)
            .map(|(g, b)| format!("{g}={}", *b as f64 / 100.0))
            .collect();
        if !others.is_empty() {
            return Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: groups besides the baseline {baseline} have a share ({}): a canary compares two groups; give {baseline} all new flows first",
                    others.join(" ")
                ),
            ));
        }
        let serving = spec.backends.iter().any(|b| {
            b.group == to
                && b.weight > 0
                && !s.drains.contains_key(&b.name)
                && self.healthy(service, &b.name)
        });
        if !serving {
            return Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: group {to} has no healthy backend that takes new flows (down, not probed yet, at weight 0 or draining)"
                ),
            ));
        }
        let now = now_ms();
        let min_flows = min_flows.unwrap_or(spec.canary.min_flows);
        let plan = CanaryPlan {
            to: to.to_string(),
            baseline: baseline.clone(),
            steps,
            interval_ms,
            check,
            min_flows,
        };
        let mut next = self.live.clone();
        next.next_deployment_id = next.next_deployment_id.max(1);
        let id = next.next_deployment_id;
        next.next_deployment_id += 1;
        let d = Deployment {
            id,
            service: service.to_string(),
            state: State::Running,
            phase: Phase::Observing,
            step: 0,
            started_ms: now,
            ended_ms: None,
            step_started_ms: now,
            step_ends_ms: Some(now + interval_ms),
            paused_left_ms: None,
            extensions: 0,
            snapshot: self.snapshot(service),
            analysis: Vec::new(),
            message: String::new(),
            uid: peer.uid,
            gid: peer.gid,
            before_split: spec.split.clone(),
            before_pins: spec.pins.clone(),
            attempt: 0,
            plan: Plan::Canary(plan),
        };
        let mut d = d;
        d.message = format!("{}: started (by uid {})", d.position(), peer.uid);
        set_canary_step(&mut next, &d, 0)?;
        next.deployments.push(d.clone());
        self.commit_deploy(next, "deployment_started", service, d.message.clone())?;
        Ok(json!(self.status_of(&d, now)))
    }

    /// Starts the analysis of a canary's step: the agent's own criteria now, the queries
    /// and the check off the task.
    fn begin_analysis(&mut self, id: u64) {
        let Some(d) = self.find(id).cloned() else {
            return;
        };
        let Plan::Canary(c) = &d.plan else { return };
        let Ok(s) = self.live.service(&d.service) else {
            return;
        };
        let spec = s.spec.clone();
        let sig = self.group_signals(&d);
        let (base, can) = (&sig[0], &sig[1]);
        let unhealthy: Vec<String> = if spec.health.kind == HealthKind::None {
            Vec::new()
        } else {
            spec.backends
                .iter()
                .filter(|b| b.group == c.to)
                .filter_map(|b| {
                    let h = self.health.get(&(d.service.clone(), b.name.clone()))?;
                    if h.ejected() {
                        Some(format!(
                            "{} is ejected: {}",
                            b.name,
                            h.eject_reason.clone().unwrap_or_default()
                        ))
                    } else if h.state == health::State::Down {
                        Some(format!(
                            "{} is down: {}",
                            b.name,
                            h.down_reason.clone().unwrap_or_default()
                        ))
                    } else {
                        None
                    }
                })
                .collect()
        };
        let connection_signals = spec.protocol == crate::state::Protocol::Tcp
            && spec.forwarding == crate::state::Forwarding::Nat;
        let own = canary::evaluate(
            can,
            base,
            &spec.canary,
            c.min_flows,
            &unhealthy,
            connection_signals,
        );
        let now = now_ms();
        let window = format!("{}s", (now.saturating_sub(d.step_started_ms) / 1000).max(1));
        let vars = [
            ("group", c.to.as_str()),
            ("baseline", c.baseline.as_str()),
            ("service", d.service.as_str()),
            ("interval", window.as_str()),
        ];
        let queries: Vec<Query> = spec
            .analysis
            .iter()
            .filter_map(|q| {
                crate::prom::render_template(&q.query, &vars)
                    .ok()
                    .map(|promql| Query {
                        name: q.name.clone(),
                        promql,
                        max: q.max,
                        min: q.min,
                    })
            })
            .collect();
        let label = c.steps.get(d.step).map(Step::label).unwrap_or_default();
        let check = c.check.clone().map(|line| UserCommand {
            line,
            env: vec![
                ("ZDD_SERVICE".into(), d.service.clone()),
                ("ZDD_DEPLOYMENT".into(), d.id.to_string()),
                ("ZDD_STEP".into(), (d.step + 1).to_string()),
                ("ZDD_STEP_LABEL".into(), label.clone()),
                ("ZDD_GROUP".into(), c.to.clone()),
                ("ZDD_BASELINE".into(), c.baseline.clone()),
                (
                    "ZDD_PERCENT".into(),
                    (canary::percent_at(&c.steps, d.step) as f64 / 100.0).to_string(),
                ),
            ],
            uid: d.uid,
            gid: d.gid,
            timeout: Duration::from_millis(spec.canary.check_timeout_ms),
        });
        let attempt = d.attempt + 1;
        if let Some(x) = self.live.deployments.iter_mut().find(|x| x.id == id) {
            x.phase = Phase::Analysing;
            x.attempt = attempt;
            x.analysis = own;
        }
        let prom = self.prom.clone();
        match self.intents.clone() {
            Some(to) => {
                tokio::spawn(async move {
                    let results = run::analyse(prom, queries, check).await;
                    let _ = to
                        .send(Intent::Analysis {
                            id,
                            attempt,
                            results,
                        })
                        .await;
                });
            }
            // No channel (unit tests): only the agent's own criteria.
            None => self.on_analysis(id, attempt, Vec::new()),
        }
    }

    /// A step's analysis is complete: pass → next step (or done), fail → rollback,
    /// inconclusive → extend (or pause at the limit).
    pub(crate) fn on_analysis(&mut self, id: u64, attempt: u64, results: Vec<CheckResult>) {
        let Some(d) = self.find(id).cloned() else {
            return;
        };
        if d.attempt != attempt || d.phase != Phase::Analysing || !d.active() {
            return;
        }
        let Plan::Canary(c) = &d.plan else { return };
        let mut all = d.analysis.clone();
        all.extend(results);
        let v = canary::verdict(&all);
        let now = now_ms();
        let n = c.steps.len();
        let here = d.position();
        let signals = self.group_signals(&d);
        let numbers = json!({ "analysis": all, "signals": signals });
        let max_ext = self
            .live
            .service(&d.service)
            .map(|s| s.spec.canary.max_extensions)
            .unwrap_or(0);
        match v {
            canary::Verdict::Fail => {
                let why = canary::summary(&all, "fail");
                let message = format!("{here} failed, rolled back to {}: {why}", c.baseline);
                self.finish_canary(&d, all, State::RolledBack, message.clone(), numbers);
                self.alert(
                    "ZddCanaryRolledBack",
                    true,
                    &[
                        ("service", &d.service),
                        ("group", &c.to),
                        ("reason", &why),
                        ("severity", "critical"),
                    ],
                    message,
                    Some(now + 3_600_000),
                );
            }
            canary::Verdict::Inconclusive
                if d.state == State::Running && d.extensions < max_ext =>
            {
                let why = canary::summary(&all, "inconclusive");
                let mut next = self.live.clone();
                if let Some(x) = Self::deployment_mut(&mut next, id) {
                    x.extensions += 1;
                    x.phase = Phase::Observing;
                    x.step_ends_ms = Some(now + c.interval_ms);
                    x.analysis = all;
                    x.message = format!(
                        "{here} extended ({}/{max_ext}): not enough evidence: {why}",
                        x.extensions
                    );
                    let m = x.message.clone();
                    self.live = next;
                    let _ = self.save();
                    self.record_deploy("canary_step_extended", &d.service, m, numbers);
                }
            }
            canary::Verdict::Inconclusive => {
                let why = canary::summary(&all, "inconclusive");
                let mut next = self.live.clone();
                if let Some(x) = Self::deployment_mut(&mut next, id) {
                    x.state = State::Paused;
                    x.phase = Phase::Observing;
                    x.paused_left_ms = Some(c.interval_ms);
                    x.analysis = all;
                    x.message = format!(
                        "{here} paused: still not enough evidence after {} extension(s): {why}; `zdd resume {}` observes longer, `zdd promote` / `zdd abort` decide",
                        d.extensions, d.service
                    );
                    let m = x.message.clone();
                    self.live = next;
                    let _ = self.save();
                    self.record_deploy("deployment_paused", &d.service, m.clone(), numbers);
                    self.alert(
                        "ZddDeploymentPaused",
                        true,
                        &[
                            ("service", &d.service),
                            ("group", &c.to),
                            ("reason", "inconclusive"),
                            ("severity", "warning"),
                        ],
                        m,
                        None,
                    );
                }
            }
            canary::Verdict::Pass if d.state != State::Running => {
                // Paused while the analysis ran: keep the step, analyse again on resume.
                if let Some(x) = self.live.deployments.iter_mut().find(|x| x.id == id) {
                    x.phase = Phase::Observing;
                    x.paused_left_ms = Some(0);
                    x.analysis = all;
                }
                let _ = self.save();
            }
            canary::Verdict::Pass => {
                let passed = canary::summary(&all, "pass");
                let last = d.step + 1 >= n
                    || (d.step + 2 == n
                        && c.steps[n - 1] == Step::Percent(zdd_common::SPLIT_BUCKETS));
                if last {
                    let message = format!("{here} passed; {} gets all new flows: {passed}", c.to);
                    self.finish_canary(&d, all, State::Succeeded, message, numbers);
                    return;
                }
                let mut next = self.live.clone();
                let step = d.step + 1;
                let snapshot = self.snapshot(&d.service);
                let Some(x) = Self::deployment_mut(&mut next, id) else {
                    return;
                };
                x.step = step;
                x.phase = Phase::Observing;
                x.extensions = 0;
                x.step_started_ms = now;
                x.step_ends_ms = Some(now + c.interval_ms);
                x.snapshot = snapshot;
                x.analysis = all;
                let x = x.clone();
                if let Err(e) = set_canary_step(&mut next, &x, step) {
                    log::error!("{}: next canary step: {e}", d.service);
                    return;
                }
                let message = format!("{here} passed ({passed}); now {}", x.position());
                if let Some(y) = Self::deployment_mut(&mut next, id) {
                    y.message = message.clone();
                }
                if let Err(e) = self.commit_deploy(next, "canary_step", &d.service, message) {
                    log::error!(
                        "{}: applying the next canary step failed, it stays at the current one: {e}",
                        d.service
                    );
                    if let Some(y) = self.live.deployments.iter_mut().find(|y| y.id == id) {
                        y.phase = Phase::Observing;
                        y.step_ends_ms = Some(now + 1000);
                    }
                }
            }
        }
    }

    /// Ends a canary: success (all new flows to the canary, cohort pins gone since everyone
    /// is there) or back to the split and pins from before it (rollback, abort).
    fn finish_canary(
        &mut self,
        d: &Deployment,
        analysis: Vec<CheckResult>,
        state: State,
        message: String,
        numbers: Value,
    ) {
        let Plan::Canary(c) = &d.plan else { return };
        let mut next = self.live.clone();
        let before_share: std::collections::BTreeMap<String, u32> = self
            .live
            .service(&d.service)
            .map(|s| s.spec.split.iter().cloned().collect())
            .unwrap_or_default();
        if let Some(s) = next.services.iter_mut().find(|s| s.spec.name == d.service) {
            let split = if state == State::Succeeded {
                canary::split_for(
                    &d.before_split,
                    &c.baseline,
                    &c.to,
                    zdd_common::SPLIT_BUCKETS,
                )
            } else {
                d.before_split.clone()
            };
            if s.spec.split != split {
                let old = std::mem::replace(&mut s.spec.split, split);
                s.history.push(old);
                if s.history.len() > live::HISTORY {
                    s.history.remove(0);
                }
            }
            s.spec.pins = d.before_pins.clone();
        }
        let now = now_ms();
        if let Some(x) = Self::deployment_mut(&mut next, d.id) {
            x.state = state;
            x.phase = Phase::Done;
            x.ended_ms = Some(now);
            x.step_ends_ms = None;
            x.analysis = analysis;
            x.message = message.clone();
            if state == State::Succeeded {
                x.step = x.step_count();
            }
        }
        count_outcome(&mut next, d, state);
        let kind = match state {
            State::Succeeded => "deployment_succeeded",
            State::RolledBack => "canary_rolled_back",
            _ => "deployment_aborted",
        };
        // Back to the baseline must never be refused: force past the serving-group rule.
        let r = self.commit_forced(next, kind, &d.service, message.clone(), numbers);
        if let Err(e) = r {
            log::error!("{}: ending {} failed: {e}", d.service, d.position());
            return;
        }
        if state != State::Succeeded {
            self.check_capacity(&d.service, &before_share);
        }
        self.deployment_finished_alert(d, state, &message);
    }

    // -----------------------------------------------------------------------------------
    // Rolling
    // -----------------------------------------------------------------------------------

    fn start_rolling(
        &mut self,
        peer: Peer,
        service: &str,
        batch: &str,
        exec: String,
        timeouts: [Option<String>; 3],
    ) -> Result<Value, ApiError> {
        let s = self.live.service(service)?;
        if let Some(d) = self.active_deployment(service) {
            return Err(err(
                ErrorCode::Refused,
                format!(
                    "{service}: {} is in progress ({}): `zdd abort {service}` first",
                    d.position(),
                    d.state.name()
                ),
            ));
        }
        if exec.trim().is_empty() {
            return Err(err(
                ErrorCode::Invalid,
                "--exec: give the command that updates one backend",
            ));
        }
        let spec = s.spec.clone();
        if spec.backends.is_empty() {
            return Err(err(
                ErrorCode::Refused,
                format!("{service}: no backends to update"),
            ));
        }
        let size = rolling::batch_size(batch, spec.backends.len())
            .map_err(|m| err(ErrorCode::Invalid, m))?;
        let batches = rolling::batches(&spec, size);
        let drains = s.drains.clone();
        for (i, b) in batches.iter().enumerate() {
            let starved = rolling::starved_groups(&spec, b, &|n: &str| {
                drains.contains_key(n) || !self.healthy(service, n)
            });
            if !starved.is_empty() {
                return Err(err(
                    ErrorCode::Refused,
                    format!(
                        "{service}: batch {} ({}) would leave group {} with no healthy backend taking new flows: use a smaller --batch, or fix or add backends first",
                        i + 1,
                        b.join(","),
                        starved.join(", ")
                    ),
                ));
            }
        }
        let [drain, exec_t, health_t] = timeouts;
        let plan = RollingPlan {
            batches,
            exec,
            drain_timeout_ms: duration_ms(&drain, 60_000, "--drain-timeout")?,
            exec_timeout_ms: duration_ms(&exec_t, 300_000, "--exec-timeout")?,
            health_timeout_ms: duration_ms(&health_t, 60_000, "--health-timeout")?,
        };
        let now = now_ms();
        let mut next = self.live.clone();
        next.next_deployment_id = next.next_deployment_id.max(1);
        let id = next.next_deployment_id;
        next.next_deployment_id += 1;
        let mut d = Deployment {
            id,
            service: service.to_string(),
            state: State::Running,
            phase: Phase::Draining,
            step: 0,
            started_ms: now,
            ended_ms: None,
            step_started_ms: now,
            step_ends_ms: Some(now + plan.drain_timeout_ms),
            paused_left_ms: None,
            extensions: 0,
            snapshot: Default::default(),
            analysis: Vec::new(),
            message: String::new(),
            uid: peer.uid,
            gid: peer.gid,
            before_split: Vec::new(),
            before_pins: Vec::new(),
            attempt: 0,
            plan: Plan::Rolling(plan),
        };
        d.message = format!("{}: draining (started by uid {})", d.position(), peer.uid);
        drain_batch(&mut next, &d, now)?;
        next.deployments.push(d.clone());
        self.commit_deploy(next, "deployment_started", service, d.message.clone())?;
        Ok(json!(self.status_of(&d, now)))
    }

    fn rolling_tick(&mut self, d: &Deployment, now: u64) {
        let Plan::Rolling(r) = &d.plan else { return };
        let Some(batch) = r.batches.get(d.step).cloned() else {
            return;
        };
        match d.phase {
            Phase::Draining => {
                let fresh = self.counts_at_ms > d.step_started_ms;
                let left: u64 = batch
                    .iter()
                    .filter_map(|b| self.dp.applied().backend_slot(&d.service, b))
                    .map(|slot| self.active(slot))
                    .sum();
                let timed_out = d.step_ends_ms.is_some_and(|t| now >= t);
                if (fresh && left == 0) || timed_out {
                    let how = if left == 0 {
                        "drained".to_string()
                    } else {
                        format!("drain timed out with {left} flow(s) left")
                    };
                    self.begin_exec(d, &batch, how);
                }
            }
            Phase::WaitingHealth => {
                let up = batch.iter().all(|b| self.healthy(&d.service, b));
                if up {
                    self.restore_batch(d, &batch);
                } else if d.step_ends_ms.is_some_and(|t| now >= t) {
                    let why: Vec<String> = batch
                        .iter()
                        .filter(|b| !self.healthy(&d.service, b))
                        .map(|b| {
                            let h = self.health.get(&(d.service.clone(), b.clone()));
                            let last = h
                                .and_then(|h| h.last.as_ref())
                                .map(|p| p.detail.clone())
                                .unwrap_or_else(|| "no probe answered".into());
                            format!("{b} (last probe: {last})")
                        })
                        .collect();
                    self.stop_rolling(
                        d,
                        &batch,
                        format!(
                            "not healthy {:.0}s after the update: {}",
                            r.health_timeout_ms as f64 / 1e3,
                            why.join("; ")
                        ),
                    );
                }
            }
            _ => {}
        }
    }

    fn begin_exec(&mut self, d: &Deployment, batch: &[String], how: String) {
        let Plan::Rolling(r) = &d.plan else { return };
        let Ok(s) = self.live.service(&d.service) else {
            return;
        };
        let cmds: Vec<(String, UserCommand)> = batch
            .iter()
            .filter_map(|name| s.spec.backends.iter().find(|b| &b.name == name))
            .map(|b| {
                (
                    b.name.clone(),
                    UserCommand {
                        line: r.exec.clone(),
                        env: vec![
                            ("ZDD_SERVICE".into(), d.service.clone()),
                            ("ZDD_DEPLOYMENT".into(), d.id.to_string()),
                            ("ZDD_BACKEND".into(), b.name.clone()),
                            ("ZDD_ADDR".into(), b.addr.to_string()),
                            ("ZDD_IP".into(), b.addr.ip().to_string()),
                            ("ZDD_PORT".into(), b.addr.port().to_string()),
                            ("ZDD_GROUP".into(), b.group.clone()),
                            ("ZDD_BATCH".into(), (d.step + 1).to_string()),
                        ],
                        uid: d.uid,
                        gid: d.gid,
                        timeout: Duration::from_millis(r.exec_timeout_ms),
                    },
                )
            })
            .collect();
        let now = now_ms();
        let attempt = d.attempt + 1;
        let id = d.id;
        let message = format!("{}: {how}; running the update", d.position());
        if let Some(x) = self.live.deployments.iter_mut().find(|x| x.id == id) {
            x.phase = Phase::Updating;
            x.attempt = attempt;
            x.step_started_ms = now;
            x.step_ends_ms = Some(now + r.exec_timeout_ms);
            x.message = message.clone();
        }
        let _ = self.save();
        self.record_deploy("rolling_batch", &d.service, message, Value::Null);
        let Some(to) = self.intents.clone() else {
            return;
        };
        tokio::spawn(async move {
            let mut result = Ok(());
            for (name, c) in cmds {
                if let Err(e) = run::run_command(&c).await {
                    result = Err(format!(
                        "the update of {name} failed: `{}` {}",
                        c.line, e.message
                    ));
                    break;
                }
            }
            let _ = to
                .send(Intent::Exec {
                    id,
                    attempt,
                    result,
                })
                .await;
        });
    }

    /// The batch's update command finished.
    pub(crate) fn on_exec(&mut self, id: u64, attempt: u64, result: Result<(), String>) {
        let Some(d) = self.find(id).cloned() else {
            return;
        };
        if d.attempt != attempt || d.phase != Phase::Updating || !d.active() {
            return;
        }
        let Plan::Rolling(r) = &d.plan else { return };
        let batch = r.batches.get(d.step).cloned().unwrap_or_default();
        if let Err(why) = result {
            self.stop_rolling(&d, &batch, why);
            return;
        }
        let now = now_ms();
        // Updated backends must prove themselves again: `rise` passes from down, then slow
        // start (what health does for any comeback).
        for b in &batch {
            if let Some(h) = self.health.get_mut(&(d.service.clone(), b.clone())) {
                let mut fresh = BackendHealth::new(health::State::Down);
                fresh.down_reason = Some("updated: waiting for `rise` probes to pass".into());
                fresh.probes = h.probes;
                fresh.probe_failures = h.probe_failures;
                fresh.latency_us_sum = h.latency_us_sum;
                *h = fresh;
            }
        }
        let message = format!("{}: updated; waiting for health", d.position());
        if let Some(x) = self.live.deployments.iter_mut().find(|x| x.id == id) {
            x.phase = Phase::WaitingHealth;
            x.step_started_ms = now;
            x.step_ends_ms = Some(now + r.health_timeout_ms);
            x.message = message.clone();
        }
        let _ = self.save();
        self.record_deploy("rolling_batch", &d.service, message, Value::Null);
        self.rolling_tick(&self.find(id).cloned().unwrap_or(d), now);
    }

    /// The batch is healthy: it takes new flows again (slow start), then the next batch.
    fn restore_batch(&mut self, d: &Deployment, batch: &[String]) {
        let Plan::Rolling(r) = &d.plan else { return };
        let now = now_ms();
        let mut next = self.live.clone();
        if let Some(s) = next.services.iter_mut().find(|s| s.spec.name == d.service) {
            for b in batch {
                s.drains.remove(b);
            }
        }
        let step = d.step + 1;
        let here = d.position();
        if step >= r.batches.len() {
            let message = format!("{here}: restored; every batch is updated");
            if let Some(x) = Self::deployment_mut(&mut next, d.id) {
                x.step = step;
                x.state = State::Succeeded;
                x.phase = Phase::Done;
                x.ended_ms = Some(now);
                x.step_ends_ms = None;
                x.message = message.clone();
            }
            count_outcome(&mut next, d, State::Succeeded);
            if self
                .commit_forced(
                    next,
                    "deployment_succeeded",
                    &d.service,
                    message.clone(),
                    Value::Null,
                )
                .is_ok()
            {
                self.deployment_finished_alert(d, State::Succeeded, &message);
            }
            return;
        }
        let Some(x) = Self::deployment_mut(&mut next, d.id) else {
            return;
        };
        x.step = step;
        x.step_started_ms = now;
        let x = if d.state == State::Paused {
            // Paused: the next batch waits for `resume`.
            x.phase = Phase::Done;
            x.step_ends_ms = None;
            x.message = format!("{here}: restored; paused before the next batch");
            x.clone()
        } else {
            x.phase = Phase::Draining;
            x.step_ends_ms = Some(now + r.drain_timeout_ms);
            x.message = format!("{here}: restored; now {}: draining", {
                let mut y = x.clone();
                y.step = step;
                y.position()
            });
            x.clone()
        };
        if x.phase == Phase::Draining
            && let Err(e) = drain_batch(&mut next, &x, now)
        {
            log::error!("{}: draining the next batch: {e}", d.service);
        }
        let m = x.message.clone();
        if let Err(e) = self.commit_deploy(next, "rolling_batch", &d.service, m) {
            log::error!("{}: restoring batch {}: {e}", d.service, d.step + 1);
        }
    }

    fn stop_rolling(&mut self, d: &Deployment, batch: &[String], why: String) {
        let message = format!(
            "{} stopped: {why}; the service serves on its other backends ({} stay drained); `zdd resume {}` retries the batch, `zdd abort {}` ends the update",
            d.position(),
            batch.join(","),
            d.service,
            d.service
        );
        if let Some(x) = self.live.deployments.iter_mut().find(|x| x.id == d.id) {
            x.state = State::Stopped;
            x.step_ends_ms = None;
            x.message = message.clone();
        }
        let _ = self.save();
        self.record_deploy("rolling_stopped", &d.service, message.clone(), Value::Null);
        let backend = batch.join(",");
        self.alert(
            "ZddRollingStopped",
            true,
            &[
                ("service", &d.service),
                ("backend", &backend),
                ("reason", &why),
                ("severity", "critical"),
            ],
            message,
            None,
        );
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
                drain_batch(&mut next, &x, now)?;
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
                let analysis = d.analysis.clone();
                self.finish_canary(&d, analysis, State::Succeeded, message, Value::Null);
                if self.find(d.id).is_some_and(|x| x.active()) {
                    return Err(err(
                        ErrorCode::NotApplied,
                        "promoting failed: see the agent's log",
                    ));
                }
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
                let analysis = d.analysis.clone();
                self.finish_canary(&d, analysis, State::Aborted, message, Value::Null);
                if self.find(d.id).is_some_and(|x| x.active()) {
                    return Err(err(
                        ErrorCode::NotApplied,
                        "aborting failed: see the agent's log",
                    ));
                }
            }
            Plan::Rolling(r) => {
                let batch = r.batches.get(d.step).cloned().unwrap_or_default();
                let mut next = self.live.clone();
                // Nothing was run on a batch still draining: it can serve again.
                let undrain = d.phase == Phase::Draining && d.state == State::Running;
                if undrain
                    && let Some(s) = next.services.iter_mut().find(|s| s.spec.name == service)
                {
                    for b in &batch {
                        s.drains.remove(b);
                    }
                }
                let left = if undrain || d.phase == Phase::Done || batch.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} stay drained (`zdd backend undrain {service} NAME` when they are fine)",
                        batch.join(",")
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
                self.commit_forced(
                    next,
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

    /// Remembers each group's healthy capacity while it has all new flows.
    fn track_capacity(&mut self) {
        let mut updates = Vec::new();
        for s in &self.live.services {
            for (g, b) in &s.spec.split {
                if *b == zdd_common::SPLIT_BUCKETS {
                    let cap = self.healthy_capacity(&s.spec.name, g);
                    if cap > 0 && s.full_capacity.get(g) != Some(&cap) {
                        updates.push((s.spec.name.clone(), g.clone(), cap));
                    }
                }
            }
        }
        if updates.is_empty() {
            return;
        }
        for (svc, g, cap) in updates {
            if let Some(s) = self.live.services.iter_mut().find(|s| s.spec.name == svc) {
                s.full_capacity.insert(g, cap);
            }
        }
        let _ = self.save();
    }

    /// After new flows moved back to a group (rollback, abort, switch): warns when its
    /// healthy capacity now is below what it had when it last took all new flows, scaled to
    /// its share now. Returns the warning.
    pub(crate) fn check_capacity(
        &mut self,
        service: &str,
        before: &std::collections::BTreeMap<String, u32>,
    ) -> Option<String> {
        let s = self.live.service(service).ok()?.clone();
        let mut warnings = Vec::new();
        for (g, share) in &s.spec.split {
            let was = before.get(g).copied().unwrap_or(0);
            if *share <= was {
                continue;
            }
            let Some(full) = s.full_capacity.get(g).copied() else {
                continue;
            };
            let need = (full as u64 * *share as u64 / zdd_common::SPLIT_BUCKETS as u64) as u32;
            let have = self.healthy_capacity(service, g);
            if have < need {
                warnings.push(format!(
                    "{service}: group {g} now takes {}% of new flows with a healthy capacity of {have} (weights of healthy backends), below the {need} it had for that share when it last served all of them: it may be overloaded; add or restore backends in {g}",
                    *share as f64 / 100.0
                ));
            }
        }
        if warnings.is_empty() {
            return None;
        }
        let m = warnings.join("; ");
        log::warn!("{m}");
        self.record_deploy("capacity_warning", service, m.clone(), Value::Null);
        self.alert(
            "ZddRollbackCapacity",
            true,
            &[
                ("service", service),
                ("severity", "warning"),
                ("reason", "capacity"),
            ],
            m.clone(),
            Some(now_ms() + 3_600_000),
        );
        Some(m)
    }

    // -----------------------------------------------------------------------------------
    // Plumbing
    // -----------------------------------------------------------------------------------

    fn commit_deploy(
        &mut self,
        next: LiveState,
        kind: &str,
        service: &str,
        message: String,
    ) -> Result<(), ApiError> {
        let warning = self.commit(next, false)?;
        let message = match warning {
            Some(w) => format!("{message} ({w})"),
            None => message,
        };
        self.record_deploy(kind, service, message, Value::Null);
        Ok(())
    }

    fn commit_forced(
        &mut self,
        next: LiveState,
        kind: &str,
        service: &str,
        message: String,
        numbers: Value,
    ) -> Result<(), ApiError> {
        let warning = self.commit(next, true)?;
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

    /// Sends an alert (never blocks). Labels with an empty value are left out.
    pub(crate) fn alert(
        &self,
        name: &str,
        firing: bool,
        labels: &[(&str, &str)],
        summary: String,
        ends_ms: Option<u64>,
    ) {
        self.alerts.send(Alert {
            name: name.into(),
            firing,
            labels: labels
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            summary,
            starts_ms: now_ms(),
            ends_ms: if firing {
                ends_ms
            } else {
                Some(ends_ms.unwrap_or_else(now_ms))
            },
        });
    }

    fn deployment_finished_alert(&self, d: &Deployment, state: State, message: &str) {
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

/// Sets the service's split and pins in `next` to what step `i` of a canary needs.
fn set_canary_step(next: &mut LiveState, d: &Deployment, i: usize) -> Result<(), ApiError> {
    let Plan::Canary(c) = &d.plan else {
        return Ok(());
    };
    let s = next
        .services
        .iter_mut()
        .find(|s| s.spec.name == d.service)
        .ok_or_else(|| {
            err(
                ErrorCode::UnknownService,
                format!("no service {:?}", d.service),
            )
        })?;
    let split = canary::split_for(
        &d.before_split,
        &c.baseline,
        &c.to,
        canary::percent_at(&c.steps, i),
    );
    if s.spec.split != split {
        let old = std::mem::replace(&mut s.spec.split, split);
        s.history.push(old);
        if s.history.len() > live::HISTORY {
            s.history.remove(0);
        }
    }
    s.spec.pins = canary::pins_at(&d.before_pins, &c.steps, i, &s.spec.cohorts, &c.to);
    Ok(())
}

/// Drains a rolling deployment's current batch in `next`.
fn drain_batch(next: &mut LiveState, d: &Deployment, now: u64) -> Result<(), ApiError> {
    let Plan::Rolling(r) = &d.plan else {
        return Ok(());
    };
    let s = next
        .services
        .iter_mut()
        .find(|s| s.spec.name == d.service)
        .ok_or_else(|| {
            err(
                ErrorCode::UnknownService,
                format!("no service {:?}", d.service),
            )
        })?;
    for b in r.batches.get(d.step).into_iter().flatten() {
        if s.spec.backends.iter().any(|x| &x.name == b) {
            s.drains.entry(b.clone()).or_insert(live::Drain {
                since_ms: now,
                remove_at_ms: None,
            });
        }
    }
    Ok(())
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
