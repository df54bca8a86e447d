//! A canary's steps: start, the analysis at the end of each step and what its verdict
//! does (next step, extension, pause, rollback), and the end (promoted or rolled back).

use super::*;

impl Control {
    // -----------------------------------------------------------------------------------
    // Canary
    // -----------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_canary(
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
        self.refuse_if_active(service)?;
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
        if !self.group_serves(service, to) {
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
        let mut d = Deployment {
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
            drained_before: Vec::new(),
            plan: Plan::Canary(plan),
        };
        d.message = format!("{}: started (by uid {})", d.position(), peer.uid);
        set_canary_step(&mut next, &d, 0)?;
        self.launch(next, d)
    }

    /// Starts the analysis of a canary's step: the agent's own criteria now, the queries
    /// and the check off the task.
    pub(super) fn begin_analysis(&mut self, id: u64) {
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
                if let Err(e) =
                    self.commit_deploy(next, false, "canary_step", &d.service, message, Value::Null)
                {
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
    pub(super) fn finish_canary(
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
            live::push_history(s, split);
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
        let r = self.commit_deploy(next, true, kind, &d.service, message.clone(), numbers);
        if let Err(e) = r {
            log::error!("{}: ending {} failed: {e}", d.service, d.position());
            return;
        }
        if state != State::Succeeded {
            self.check_capacity(&d.service, &before_share);
        }
        self.deployment_finished_alert(d, state, &message);
    }
}

/// Sets the service's split and pins in `next` to what step `i` of a canary needs.
fn set_canary_step(next: &mut LiveState, d: &Deployment, i: usize) -> Result<(), ApiError> {
    let Plan::Canary(c) = &d.plan else {
        return Ok(());
    };
    let s = service_mut(next, d)?;
    let split = canary::split_for(
        &d.before_split,
        &c.baseline,
        &c.to,
        canary::percent_at(&c.steps, i),
    );
    live::push_history(s, split);
    s.spec.pins = canary::pins_at(&d.before_pins, &c.steps, i, &s.spec.cohorts, &c.to);
    Ok(())
}
