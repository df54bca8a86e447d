//! Progressive delivery: canary and rolling deployments as state machines kept in the live
//! state, so they are saved with every change and carry on after an agent restart.
//!
//! - [`canary`]: steps (percentages of new flows, or cohorts pinned to the new group), the
//!   split of each step, and the analysis that compares the canary group with the baseline.
//! - [`rolling`]: batches of backends: drain, the user's update command, health, restore.
//! - [`run`]: what runs off the owner task (Prometheus queries, the user's commands).
//! - [`driver`]: the owner task's side: start, tick, results, pause/resume/promote/abort.

pub mod canary;
pub mod driver;
pub mod rolling;
pub mod run;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    api::{CheckResult, DeploymentStatus, GroupSignals},
    state::Pin,
};

/// "blue-1 stays" or "blue-1,blue-2 stay": a batch and its verb.
pub fn batch_stays(batch: &[String]) -> String {
    format!(
        "{} {}",
        batch.join(","),
        if batch.len() == 1 { "stays" } else { "stay" }
    )
}

/// Finished deployments kept (for `zdd deployments`).
pub const KEEP_PAST: usize = 50;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Plan {
    Canary(CanaryPlan),
    Rolling(RollingPlan),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CanaryPlan {
    pub to: String,
    pub baseline: String,
    pub steps: Vec<Step>,
    pub interval_ms: u64,
    #[serde(default)]
    pub check: Option<String>,
    pub min_flows: u64,
}

/// One canary step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// New flows to the canary, in buckets of 0.01%.
    Percent(u32),
    /// A cohort's sources are pinned to the canary.
    Cohort(String),
}

impl Step {
    pub fn label(&self) -> String {
        match self {
            Step::Percent(b) => format!("{}%", *b as f64 / 100.0),
            Step::Cohort(c) => c.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollingPlan {
    /// Backend names, batch by batch.
    pub batches: Vec<Vec<String>>,
    pub exec: String,
    pub drain_timeout_ms: u64,
    pub exec_timeout_ms: u64,
    pub health_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    /// Clock stopped (by `pause`, or after an inconclusive analysis).
    Paused,
    /// A rolling batch failed: `resume` retries it.
    Stopped,
    Succeeded,
    RolledBack,
    Aborted,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
            State::Succeeded => "succeeded",
            State::RolledBack => "rolled_back",
            State::Aborted => "aborted",
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, State::Succeeded | State::RolledBack | State::Aborted)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Canary: the step's traffic is being observed.
    Observing,
    /// Canary: the step's analysis runs (Prometheus, `--check`).
    Analysing,
    /// Rolling: the batch takes no new flows; waiting for its flows to end.
    Draining,
    /// Rolling: the user's command runs.
    Updating,
    /// Rolling: waiting for the batch to pass `rise` probes.
    WaitingHealth,
    Done,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Observing => "observing",
            Phase::Analysing => "analysing",
            Phase::Draining => "draining",
            Phase::Updating => "updating",
            Phase::WaitingHealth => "waiting_health",
            Phase::Done => "done",
        }
    }
}

/// A backend's totals at some moment: the data path's counters and the probes'.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snap {
    pub new_flows: u64,
    pub attempts: u64,
    pub answered: u64,
    pub resets: u64,
    pub probes: u64,
    pub probe_failures: u64,
    pub latency_us_sum: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: u64,
    pub service: String,
    pub plan: Plan,
    pub state: State,
    pub phase: Phase,
    /// Step (canary) or batch (rolling) in progress.
    pub step: usize,
    pub started_ms: u64,
    #[serde(default)]
    pub ended_ms: Option<u64>,
    pub step_started_ms: u64,
    /// When the current phase's time is up (canary: the step's analysis is due).
    #[serde(default)]
    pub step_ends_ms: Option<u64>,
    /// Time that was left when it was paused.
    #[serde(default)]
    pub paused_left_ms: Option<u64>,
    pub extensions: u32,
    /// Backend totals at the start of the current step (the analysis takes differences).
    #[serde(default)]
    pub snapshot: BTreeMap<String, Snap>,
    #[serde(default)]
    pub analysis: Vec<CheckResult>,
    pub message: String,
    /// Who started it: the user's commands run with these ids.
    pub uid: u32,
    pub gid: u32,
    /// Canary: the split and pins before it began (what a rollback restores).
    #[serde(default)]
    pub before_split: Vec<(String, u32)>,
    #[serde(default)]
    pub before_pins: Vec<Pin>,
    /// Counts analyses and commands started, so a late answer for an earlier one is ignored.
    #[serde(default)]
    pub attempt: u64,
    /// Rolling: backends a person had drained before the update began; they are updated
    /// but stay drained.
    #[serde(default)]
    pub drained_before: Vec<String>,
}

// The floats inside (analysis values) are finite or absent.
impl Eq for Deployment {}

impl Deployment {
    pub fn kind(&self) -> &'static str {
        match self.plan {
            Plan::Canary(_) => "canary",
            Plan::Rolling(_) => "rolling",
        }
    }

    pub fn active(&self) -> bool {
        !self.state.finished()
    }

    pub fn step_count(&self) -> usize {
        match &self.plan {
            Plan::Canary(c) => c.steps.len(),
            Plan::Rolling(r) => r.batches.len(),
        }
    }

    /// "canary #3 step 2/4 (25%)", "rolling #4 batch 3/4 (blue-3)".
    pub fn position(&self) -> String {
        let n = self.step_count();
        let i = (self.step + 1).min(n);
        match &self.plan {
            Plan::Canary(c) => format!(
                "canary #{} step {i}/{n} ({})",
                self.id,
                c.steps.get(self.step).map(Step::label).unwrap_or_default()
            ),
            Plan::Rolling(r) => format!(
                "rolling #{} batch {i}/{n} ({})",
                self.id,
                r.batches
                    .get(self.step)
                    .map(|b| b.join(","))
                    .unwrap_or_default()
            ),
        }
    }

    pub fn status(
        &self,
        split: crate::api::Split,
        groups: Vec<GroupSignals>,
        now_ms: u64,
    ) -> DeploymentStatus {
        let (to, baseline, steps) = match &self.plan {
            Plan::Canary(c) => (
                Some(c.to.clone()),
                Some(c.baseline.clone()),
                c.steps.iter().map(Step::label).collect(),
            ),
            Plan::Rolling(r) => (None, None, r.batches.iter().map(|b| b.join(",")).collect()),
        };
        DeploymentStatus {
            id: self.id,
            service: self.service.clone(),
            kind: self.kind().into(),
            state: self.state.name().into(),
            finished: self.state.finished(),
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            duration_ms: self
                .ended_ms
                .unwrap_or(now_ms)
                .saturating_sub(self.started_ms),
            to,
            baseline,
            steps,
            step: self.step,
            phase: self.phase.name().into(),
            step_started_ms: self.step_started_ms,
            step_ends_ms: if self.state == State::Running {
                self.step_ends_ms
            } else {
                None
            },
            extensions: self.extensions,
            split,
            groups,
            analysis: self.analysis.clone(),
            message: self.message.clone(),
        }
    }
}
