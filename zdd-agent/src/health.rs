//! Health: what the probes' results make of each backend, and what that makes of the tables.
//! Pure (the clock is passed in), so the transitions, slow start and panic mode are
//! unit-tested without a kernel or a network; `probe.rs` runs the probes, the owner task
//! feeds their results here and applies the outcome like any other change.
//!
//! - A backend starts `starting`: no new flows until its first probe passes (startup
//!   readiness). Backends of an adopted data path start `up` (they were serving).
//! - `fall` failures in a row: `down`, out of the tables at once (its established flows stay,
//!   or move to live backends with `on_down = "move"`).
//! - `rise` passes in a row: `up` again, its weight ramping from 1% to its configured weight
//!   over `slow_start`.
//! - Panic: when a group's share of `up` backends falls below `panic_below` percent (default:
//!   none is up, and at least one is known down), the group forwards to all its configured
//!   backends rather than to none.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{
    live::LiveState,
    state::{DesiredState, HealthKind, OnDown},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Starting,
    Up,
    Down,
}

/// One probe's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub ok: bool,
    pub latency_ms: f64,
    /// `200 in 1.2 ms`, `timeout after 500 ms`, `status 500 (expected 200-399)`, ...
    pub detail: String,
    pub at_ms: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendHealth {
    pub state: State,
    pub ok_streak: u32,
    pub fail_streak: u32,
    pub last: Option<ProbeResult>,
    /// When it last came up (slow start runs from here).
    pub up_since_ms: Option<u64>,
    pub down_reason: Option<String>,
    /// Passive samples: (time, attempts, answered, resets), the data path's totals.
    pub samples: std::collections::VecDeque<(u64, u64, u64, u64)>,
    /// Ejected by the passive signals until then (Unix ms).
    pub ejected_until_ms: Option<u64>,
    pub ejections: u32,
    pub eject_reason: Option<String>,
    /// Probe totals since the agent started (canary analysis takes differences).
    pub probes: u64,
    pub probe_failures: u64,
    /// Sum of the latencies of passed probes, in µs.
    pub latency_us_sum: u64,
}

/// Why the passive signals say a backend is an outlier, if they do.
pub fn outlier(
    samples: &std::collections::VecDeque<(u64, u64, u64, u64)>,
    ratio_pct: u32,
    min_attempts: u64,
    window_ms: u64,
) -> Option<String> {
    let (first, last) = (samples.front()?, samples.back()?);
    let attempts = last.1.saturating_sub(first.1);
    let answered = last.2.saturating_sub(first.2);
    let resets = last.3.saturating_sub(first.3);
    // Retransmitted SYNs and SYN-ACKs both count again: unanswered never goes below 0.
    let failed = attempts.saturating_sub(answered) + resets;
    if ratio_pct == 0 || attempts < min_attempts || failed * 100 < ratio_pct as u64 * attempts {
        return None;
    }
    Some(format!(
        "{failed} of {attempts} connection attempts failed ({} unanswered, {resets} reset by the backend) in {:.1} s, at least {ratio_pct}% with {min_attempts} attempts ejects (window {:.1} s)",
        attempts.saturating_sub(answered),
        last.0.saturating_sub(first.0) as f64 / 1e3,
        window_ms as f64 / 1e3
    ))
}

impl BackendHealth {
    /// Adds a passive sample, keeping `window_ms` of them.
    pub fn sample(
        &mut self,
        at_ms: u64,
        attempts: u64,
        answered: u64,
        resets: u64,
        window_ms: u64,
    ) {
        self.samples.push_back((at_ms, attempts, answered, resets));
        while self.samples.len() > 2 && self.samples[1].0 + window_ms <= at_ms {
            self.samples.pop_front();
        }
    }

    /// Ejects it for `base_ms` doubled per earlier ejection (at most 32 times).
    pub fn eject(&mut self, now_ms: u64, base_ms: u64, reason: String) -> u64 {
        let period = base_ms.saturating_mul(1 << self.ejections.min(5));
        self.ejections += 1;
        self.ejected_until_ms = Some(now_ms + period);
        self.eject_reason = Some(reason);
        self.samples.clear();
        period
    }

    /// Ends an ejection whose time is up; true when it did. The backend comes back with slow
    /// start, as after any outage.
    pub fn end_ejection(&mut self, now_ms: u64) -> bool {
        match self.ejected_until_ms {
            Some(t) if now_ms >= t => {
                self.ejected_until_ms = None;
                self.eject_reason = None;
                self.samples.clear();
                self.up_since_ms = Some(now_ms);
                true
            }
            _ => false,
        }
    }

    pub fn ejected(&self) -> bool {
        self.ejected_until_ms.is_some()
    }
}

impl BackendHealth {
    pub fn new(state: State) -> BackendHealth {
        BackendHealth {
            state,
            ok_streak: 0,
            fail_streak: 0,
            last: None,
            up_since_ms: None,
            down_reason: None,
            samples: std::collections::VecDeque::new(),
            ejected_until_ms: None,
            ejections: 0,
            eject_reason: None,
            probes: 0,
            probe_failures: 0,
            latency_us_sum: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down(String),
}

impl BackendHealth {
    /// Takes a probe's result; returns the transition it caused, if any.
    pub fn record(&mut self, r: ProbeResult, rise: u32, fall: u32) -> Option<Transition> {
        let now = r.at_ms;
        let ok = r.ok;
        let detail = r.detail.clone();
        self.probes += 1;
        if ok {
            self.latency_us_sum += (r.latency_ms * 1000.0).max(0.0) as u64;
        } else {
            self.probe_failures += 1;
        }
        self.last = Some(r);
        if ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
        }
        match self.state {
            State::Starting if ok => {
                self.state = State::Up;
                // Never served yet: no ramp to protect (slow start is for comebacks).
                self.up_since_ms = None;
                Some(Transition::Up)
            }
            State::Down if ok && self.ok_streak >= rise => {
                self.state = State::Up;
                self.up_since_ms = Some(now);
                self.down_reason = None;
                Some(Transition::Up)
            }
            State::Up | State::Starting if !ok && self.fail_streak >= fall => {
                self.state = State::Down;
                self.down_reason = Some(format!(
                    "{fall} probe(s) failed in a row, the last: {detail}"
                ));
                Some(Transition::Down(detail))
            }
            _ => None,
        }
    }

    /// The share of its weight an up backend gets now (slow start), in 1/1000.
    pub fn ramp_permille(&self, slow_start_ms: u64, now_ms: u64) -> u32 {
        match (self.up_since_ms, slow_start_ms) {
            (Some(since), s) if s > 0 => {
                let done = now_ms.saturating_sub(since).saturating_mul(1000) / s;
                done.clamp(10, 1000) as u32
            }
            _ => 1000,
        }
    }
}

/// Health of every checked backend: (service, backend) → health.
pub type HealthMap = BTreeMap<(String, String), BackendHealth>;

/// What health does to the tables: the effective state, and the groups in panic mode.
pub struct Outcome {
    pub state: DesiredState,
    pub panic: BTreeSet<(String, String)>,
}

/// Applies health to `effective` (the live state with its drains applied).
pub fn apply(
    live: &LiveState,
    effective: DesiredState,
    health: &HealthMap,
    now_ms: u64,
) -> Outcome {
    let mut out = effective;
    let mut panic = BTreeSet::new();
    for (svc, ls) in out.services.iter_mut().zip(&live.services) {
        let h = &ls.spec.health;
        if h.kind == HealthKind::None {
            continue;
        }
        // An ejected backend is out of the tables like a down one.
        let state_of = |b: &str| {
            health
                .get(&(svc.name.clone(), b.to_string()))
                .map(|x| if x.ejected() { State::Down } else { x.state })
                .unwrap_or(State::Starting)
        };
        let groups: BTreeSet<String> = svc.backends.iter().map(|b| b.group.clone()).collect();
        let mut remove = BTreeSet::new();
        for g in groups {
            let members: Vec<&str> = svc
                .backends
                .iter()
                .filter(|b| b.group == g)
                .map(|b| b.name.as_str())
                .collect();
            let up = members.iter().filter(|b| state_of(b) == State::Up).count();
            let down = members
                .iter()
                .filter(|b| state_of(b) == State::Down)
                .count();
            let below = if h.panic_below_pct == 0 {
                up == 0 && down > 0
            } else {
                (up * 100) < (h.panic_below_pct as usize * members.len())
            };
            if below {
                // Rather all configured backends than none.
                panic.insert((svc.name.clone(), g.clone()));
                continue;
            }
            for b in svc.backends.iter_mut().filter(|b| b.group == g) {
                let key = (svc.name.clone(), b.name.clone());
                match state_of(&b.name) {
                    State::Up => {
                        let ramp = health
                            .get(&key)
                            .map(|x| x.ramp_permille(h.slow_start_ms, now_ms))
                            .unwrap_or(1000);
                        if ramp < 1000 && b.weight > 0 {
                            b.weight =
                                ((b.weight as u64 * ramp as u64).div_ceil(1000)).max(1) as u32;
                        }
                    }
                    State::Starting => b.weight = 0,
                    State::Down => match h.on_down {
                        OnDown::Keep => b.weight = 0,
                        OnDown::Move => {
                            remove.insert(b.name.clone());
                        }
                    },
                }
            }
        }
        svc.backends.retain(|b| !remove.contains(&b.name));
    }
    Outcome { state: out, panic }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BackendSpec, Forwarding, HealthSpec, Protocol, ServiceSpec};

    fn r(ok: bool, at_ms: u64) -> ProbeResult {
        ProbeResult {
            ok,
            latency_ms: 1.0,
            detail: if ok { "200".into() } else { "timeout".into() },
            at_ms,
        }
    }

    #[test]
    fn starting_up_down_and_back_with_rise_and_fall() {
        let mut h = BackendHealth::new(State::Starting);
        assert_eq!(h.record(r(true, 0), 2, 3), Some(Transition::Up));
        assert_eq!(h.record(r(false, 1), 2, 3), None);
        assert_eq!(h.record(r(false, 2), 2, 3), None);
        assert!(matches!(
            h.record(r(false, 3), 2, 3),
            Some(Transition::Down(_))
        ));
        assert!(h.down_reason.as_deref().unwrap().contains("timeout"));
        assert_eq!(h.record(r(true, 4), 2, 3), None);
        assert_eq!(
            h.record(r(false, 5), 2, 3),
            None,
            "a failure resets the streak"
        );
        assert_eq!(h.record(r(true, 6), 2, 3), None);
        assert_eq!(h.record(r(true, 7), 2, 3), Some(Transition::Up));
        assert_eq!(h.up_since_ms, Some(7));
        // A starting backend that never passes goes down after `fall`.
        let mut s = BackendHealth::new(State::Starting);
        s.record(r(false, 0), 2, 2);
        assert!(matches!(
            s.record(r(false, 1), 2, 2),
            Some(Transition::Down(_))
        ));
    }

    #[test]
    fn outliers_by_the_passive_signals() {
        let mut h = BackendHealth::new(State::Up);
        let w = 2_000;
        h.sample(0, 100, 100, 0, w);
        h.sample(1_000, 110, 110, 0, w);
        assert_eq!(outlier(&h.samples, 50, 5, w), None);
        // 20 attempts in the window, all answered, 12 then reset: 60% failed.
        h.sample(2_000, 120, 120, 12, w);
        let why = outlier(&h.samples, 50, 5, w).unwrap();
        assert!(why.contains("12 of 20"), "{why}");
        // Older samples leave the window.
        h.sample(3_500, 130, 130, 12, w);
        assert_eq!(h.samples.front().unwrap().0, 1_000);
        // Below the minimum of attempts: nothing.
        assert_eq!(outlier(&h.samples, 50, 100, w), None);
        // Unanswered attempts count too.
        let mut u = BackendHealth::new(State::Up);
        u.sample(0, 0, 0, 0, w);
        u.sample(500, 20, 5, 0, w);
        assert!(
            outlier(&u.samples, 50, 5, w)
                .unwrap()
                .contains("15 unanswered")
        );
        // Ejections double, and end with slow start.
        assert_eq!(h.eject(3_000, 1_000, "x".into()), 1_000);
        assert!(h.ejected() && !h.end_ejection(3_500));
        assert!(h.end_ejection(4_000));
        assert_eq!(h.up_since_ms, Some(4_000));
        assert_eq!(h.eject(5_000, 1_000, "x".into()), 2_000);
    }

    #[test]
    fn slow_start_ramps_from_one_percent() {
        let mut h = BackendHealth::new(State::Down);
        h.record(r(true, 1000), 1, 1);
        assert_eq!(h.ramp_permille(10_000, 1000), 10);
        assert_eq!(h.ramp_permille(10_000, 6000), 500);
        assert_eq!(h.ramp_permille(10_000, 11_000), 1000);
        assert_eq!(h.ramp_permille(0, 1000), 1000);
    }

    fn live(on_down: OnDown, panic_below_pct: u32) -> LiveState {
        let mut health = HealthSpec::defaults(HealthKind::Http, Protocol::Tcp);
        health.on_down = on_down;
        health.panic_below_pct = panic_below_pct;
        health.slow_start_ms = 10_000;
        let be = |n: &str, g: &str, i: u8| BackendSpec {
            name: n.into(),
            addr: format!("10.0.2.{i}:80").parse().unwrap(),
            group: g.into(),
            weight: 100,
        };
        LiveState::from_desired(&DesiredState {
            services: vec![ServiceSpec {
                name: "web".into(),
                vip: "10.0.100.1:80".parse().unwrap(),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Nat,
                client_affinity: false,
                split: vec![("blue".into(), 10_000)],
                backends: vec![
                    be("b1", "blue", 1),
                    be("b2", "blue", 2),
                    be("b3", "blue", 3),
                ],
                pins: vec![],
                health,
                cohorts: vec![],
                analysis: vec![],
                canary: Default::default(),
            }],
        })
    }

    fn map(states: &[(&str, State, Option<u64>)]) -> HealthMap {
        states
            .iter()
            .map(|(n, s, since)| {
                let mut h = BackendHealth::new(*s);
                h.up_since_ms = *since;
                (("web".to_string(), n.to_string()), h)
            })
            .collect()
    }

    fn weights(o: &Outcome) -> Vec<(String, u32)> {
        o.state.services[0]
            .backends
            .iter()
            .map(|b| (b.name.clone(), b.weight))
            .collect()
    }

    #[test]
    fn down_starting_and_ramping_backends_in_the_tables() {
        let l = live(OnDown::Keep, 0);
        let m = map(&[
            ("b1", State::Up, None),
            ("b2", State::Down, None),
            ("b3", State::Up, Some(0)),
        ]);
        let o = apply(&l, l.effective(), &m, 5_000);
        assert_eq!(
            weights(&o),
            vec![("b1".into(), 100), ("b2".into(), 0), ("b3".into(), 50)]
        );
        assert!(o.panic.is_empty());
        // on_down = move: the down backend leaves the service (its flows are re-selected).
        let l = live(OnDown::Move, 0);
        let o = apply(&l, l.effective(), &m, 20_000);
        assert_eq!(weights(&o), vec![("b1".into(), 100), ("b3".into(), 100)]);
        // Not probed yet: no new flows.
        let o = apply(&l, l.effective(), &HealthMap::new(), 0);
        assert!(weights(&o).iter().all(|(_, w)| *w == 0));
        assert!(o.panic.is_empty(), "starting is not panic");
    }

    #[test]
    fn panic_mode_forwards_to_all_configured_backends() {
        let l = live(OnDown::Keep, 0);
        let all_down = map(&[
            ("b1", State::Down, None),
            ("b2", State::Down, None),
            ("b3", State::Starting, None),
        ]);
        let o = apply(&l, l.effective(), &all_down, 0);
        assert!(o.panic.contains(&("web".to_string(), "blue".to_string())));
        assert!(weights(&o).iter().all(|(_, w)| *w == 100));
        // With a threshold: 1 of 3 up is below 50%.
        let l = live(OnDown::Keep, 50);
        let one_up = map(&[
            ("b1", State::Up, None),
            ("b2", State::Down, None),
            ("b3", State::Down, None),
        ]);
        assert_eq!(apply(&l, l.effective(), &one_up, 0).panic.len(), 1);
        let l = live(OnDown::Keep, 0);
        assert!(apply(&l, l.effective(), &one_up, 0).panic.is_empty());
    }
}
