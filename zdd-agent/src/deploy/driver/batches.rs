//! A rolling update's batches: drain, the user's update command, health, restore; and the
//! stop where one fails.

use super::*;

impl Control {
    // -----------------------------------------------------------------------------------
    // Rolling
    // -----------------------------------------------------------------------------------

    pub(super) fn start_rolling(
        &mut self,
        peer: Peer,
        service: &str,
        batch: &str,
        exec: String,
        timeouts: [Option<String>; 3],
    ) -> Result<Value, ApiError> {
        let s = self.live.service(service)?;
        self.refuse_if_active(service)?;
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
        let size = rolling::Batch::parse(batch)
            .map_err(|m| err(ErrorCode::Invalid, format!("--batch {m}")))?
            .size(spec.backends.len());
        let batches = rolling::batches(&spec, size);
        let drains = s.drains.clone();
        for (i, b) in batches.iter().enumerate() {
            let starved = spec.groups_starved_without(b, &|n: &str| {
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
            drained_before: drains
                .keys()
                .filter(|n| spec.backends.iter().any(|b| &&b.name == n))
                .cloned()
                .collect(),
            plan: Plan::Rolling(plan),
        };
        d.message = format!("{}: draining (started by uid {})", d.position(), peer.uid);
        drain_batch(&mut next, &d, now)?;
        self.launch(next, d)
    }

    pub(super) fn rolling_tick(&mut self, d: &Deployment, now: u64) {
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
            for b in batch.iter().filter(|b| !d.drained_before.contains(b)) {
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
                .commit_deploy(
                    next,
                    true,
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
        if let Err(e) = self.commit_deploy(next, false, "rolling_batch", &d.service, m, Value::Null)
        {
            log::error!("{}: restoring batch {}: {e}", d.service, d.step + 1);
        }
    }

    fn stop_rolling(&mut self, d: &Deployment, batch: &[String], why: String) {
        let message = format!(
            "{} stopped: {why}; the service serves on its other backends ({} drained); `zdd resume {}` retries the batch, `zdd abort {}` ends the update",
            d.position(),
            crate::deploy::batch_stays(batch),
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
}

/// Drains a rolling deployment's current batch in `next`.
pub(super) fn drain_batch(next: &mut LiveState, d: &Deployment, now: u64) -> Result<(), ApiError> {
    let Plan::Rolling(r) = &d.plan else {
        return Ok(());
    };
    let s = service_mut(next, d)?;
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
