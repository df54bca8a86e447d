//! The canary's pure parts: its steps, the split and pins of each step, and the analysis
//! that judges a step from the signals of the canary group against the baseline's.

use crate::{
    api::{CheckResult, GroupSignals},
    deploy::{Snap, Step},
    state::{CanarySpec, Cohort, Pin, is_cohort_name},
};

/// Steps as written (`["internal", "10", "2.5%", "100"]`), checked on their own (the CLI
/// checks them so before sending): percentages above 0 and at most 100 in steps of 0.01,
/// increasing, and nothing after 100; cohort names, each once, anywhere.
pub fn parse_step_list(raw: &[String]) -> Result<Vec<Step>, String> {
    if raw.is_empty() {
        return Err("give at least one step (e.g. --steps 10,50,100)".into());
    }
    let mut out = Vec::new();
    let mut last: Option<u32> = None;
    for r in raw {
        let t = r.trim();
        if t.is_empty() {
            return Err(
                "a step is empty: give steps separated by single commas, e.g. 5,25,50,100".into(),
            );
        }
        if last == Some(zdd_common::SPLIT_BUCKETS) {
            return Err(format!(
                "step {t:?} comes after 100%: the canary ends there"
            ));
        }
        // A word is a cohort; anything that starts like a number must be a percentage (so
        // `1e2` or `-5` are mistakes, not cohort names).
        if t.starts_with(|c: char| c.is_ascii_alphabetic()) {
            if !is_cohort_name(t) {
                return Err(format!(
                    "step {t:?}: a cohort name has only letters, digits, '-' and '_'"
                ));
            }
            if out.iter().any(|s| *s == Step::Cohort(t.to_string())) {
                return Err(format!("cohort {t:?} is given twice"));
            }
            out.push(Step::Cohort(t.to_string()));
            continue;
        }
        let num = t.strip_suffix('%').unwrap_or(t);
        let pct = Some(num)
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit() || c == '.'))
            .and_then(|n| n.parse::<f64>().ok())
            .ok_or_else(|| {
                format!(
                    "step {t:?} is neither a percentage (5, 2.5%) nor a cohort name (letters, \
                     digits, '-' and '_', starting with a letter)"
                )
            })?;
        if pct <= 0.0 || pct > 100.0 {
            return Err(format!(
                "step {t}: a percentage step is more than 0 and at most 100"
            ));
        }
        let b = crate::live::percent_buckets(pct).map_err(|m| format!("step {t}: {m}"))?;
        if let Some(prev) = last
            && b <= prev
        {
            return Err(format!(
                "the percentages must increase: {} comes after {}",
                b as f64 / 100.0,
                prev as f64 / 100.0
            ));
        }
        last = Some(b);
        out.push(Step::Percent(b));
    }
    Ok(out)
}

/// As [`parse_step_list`], and every cohort is one of the service's.
pub fn parse_steps(raw: &[String], cohorts: &[Cohort]) -> Result<Vec<Step>, String> {
    let steps = parse_step_list(raw)?;
    for s in &steps {
        let Step::Cohort(name) = s else { continue };
        if !cohorts.iter().any(|c| &c.name == name) {
            let known: Vec<&str> = cohorts.iter().map(|c| c.name.as_str()).collect();
            return Err(if known.is_empty() {
                format!("step {name:?} is not a cohort: the service has no [[services.cohorts]]")
            } else {
                format!(
                    "step {name:?} is not a cohort of the service (cohorts: {})",
                    known.join(", ")
                )
            });
        }
    }
    Ok(steps)
}

/// The canary's share at step `i`: the last percentage at or before it (0 before any).
pub fn percent_at(steps: &[Step], i: usize) -> u32 {
    steps
        .iter()
        .take(i + 1)
        .filter_map(|s| match s {
            Step::Percent(b) => Some(*b),
            Step::Cohort(_) => None,
        })
        .next_back()
        .unwrap_or(0)
}

/// The split with `share` buckets to `to` and the rest to `baseline` (every other group 0),
/// in the order of `before` (with `to` added if it was not there).
pub fn split_for(
    before: &[(String, u32)],
    baseline: &str,
    to: &str,
    share: u32,
) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = before
        .iter()
        .map(|(g, _)| {
            let b = if g == to {
                share
            } else if g == baseline {
                zdd_common::SPLIT_BUCKETS - share
            } else {
                0
            };
            (g.clone(), b)
        })
        .collect();
    for g in [baseline, to] {
        if !out.iter().any(|(x, _)| x == g) {
            let b = if g == to {
                share
            } else {
                zdd_common::SPLIT_BUCKETS - share
            };
            out.push((g.to_string(), b));
        }
    }
    out
}

/// The pins at step `i`: those from before, with every cohort named up to step `i` pinned
/// to `to`.
pub fn pins_at(before: &[Pin], steps: &[Step], i: usize, cohorts: &[Cohort], to: &str) -> Vec<Pin> {
    let mut pins: Vec<Pin> = before.to_vec();
    for s in steps.iter().take(i + 1) {
        let Step::Cohort(name) = s else { continue };
        let Some(c) = cohorts.iter().find(|c| &c.name == name) else {
            continue;
        };
        for p in &c.sources {
            pins.retain(|x| x.prefix != *p);
            pins.push(Pin {
                prefix: *p,
                group: to.to_string(),
            });
        }
    }
    pins
}

/// A group's signals over a window: the sum over its backends of now − then.
pub fn signals(group: &str, per_backend: &[(Snap, Snap)]) -> GroupSignals {
    let mut d = Snap::default();
    for (then, now) in per_backend {
        d.new_flows += now.new_flows.saturating_sub(then.new_flows);
        d.attempts += now.attempts.saturating_sub(then.attempts);
        d.answered += now.answered.saturating_sub(then.answered);
        d.resets += now.resets.saturating_sub(then.resets);
        d.probes += now.probes.saturating_sub(then.probes);
        d.probe_failures += now.probe_failures.saturating_sub(then.probe_failures);
        d.latency_us_sum += now.latency_us_sum.saturating_sub(then.latency_us_sum);
    }
    let unanswered = d.attempts.saturating_sub(d.answered);
    GroupSignals {
        group: group.to_string(),
        new_flows: d.new_flows,
        attempts: d.attempts,
        unanswered,
        resets: d.resets,
        failure_pct: (d.attempts > 0)
            .then(|| ((unanswered + d.resets) as f64 * 100.0 / d.attempts as f64).min(100.0)),
        probes: d.probes,
        probe_failures: d.probe_failures,
        probe_latency_ms: (d.probes > d.probe_failures)
            .then(|| d.latency_us_sum as f64 / 1e3 / (d.probes - d.probe_failures) as f64),
    }
}

fn result(name: &str, verdict: &str, value: Option<f64>, detail: String) -> CheckResult {
    CheckResult {
        name: name.into(),
        verdict: verdict.into(),
        value,
        detail,
    }
}

/// The agent's own criteria for one step: evidence (new flows), connection failures, probe
/// failures and latency, health now. `unhealthy`: canary backends down or ejected now, with
/// why. `connection_signals`: the service records attempts (tcp nat).
pub fn evaluate(
    canary: &GroupSignals,
    baseline: &GroupSignals,
    spec: &CanarySpec,
    min_flows: u64,
    unhealthy: &[String],
    connection_signals: bool,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let m = spec.failure_margin_pct;
    out.push(if canary.new_flows >= min_flows {
        result(
            "new_flows",
            "pass",
            Some(canary.new_flows as f64),
            format!("{} new flows ≥ {min_flows}", canary.new_flows),
        )
    } else {
        result(
            "new_flows",
            "inconclusive",
            Some(canary.new_flows as f64),
            format!(
                "only {} new flows to {} (needs {min_flows})",
                canary.new_flows, canary.group
            ),
        )
    });
    if connection_signals {
        match canary.failure_pct {
            None => out.push(result(
                "failures",
                "inconclusive",
                None,
                "no connection attempts to the canary".into(),
            )),
            Some(c) => {
                let b = baseline.failure_pct.unwrap_or(0.0);
                let detail = format!(
                    "{c:.2}% of {} attempts failed ({} unanswered, {} reset) vs baseline {b:.2}% + {m}",
                    canary.attempts, canary.unanswered, canary.resets
                );
                out.push(result(
                    "failures",
                    if c <= b + m { "pass" } else { "fail" },
                    Some(c),
                    detail,
                ));
            }
        }
    }
    if canary.probes > 0 {
        let pct = |g: &GroupSignals| {
            if g.probes == 0 {
                0.0
            } else {
                g.probe_failures as f64 * 100.0 / g.probes as f64
            }
        };
        let (c, b) = (pct(canary), pct(baseline));
        out.push(result(
            "probe_failures",
            if c <= b + m { "pass" } else { "fail" },
            Some(c),
            format!(
                "{} of {} probes failed ({c:.1}%) vs baseline {b:.1}% + {m}",
                canary.probe_failures, canary.probes
            ),
        ));
        if let (Some(c), Some(b)) = (canary.probe_latency_ms, baseline.probe_latency_ms) {
            let limit = (b * spec.latency_ratio).max(b + 5.0);
            out.push(result(
                "probe_latency",
                if c <= limit { "pass" } else { "fail" },
                Some(c),
                format!("mean probe latency {c:.2} ms vs limit {limit:.2} ms (baseline {b:.2} ms)"),
            ));
        }
    }
    out.push(if unhealthy.is_empty() {
        result("health", "pass", None, "every canary backend is up".into())
    } else {
        result("health", "fail", None, unhealthy.join("; "))
    });
    out
}

/// What a step's results add up to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

/// Any failure fails the step; else any criterion without enough evidence makes it
/// inconclusive (extended, never passed blindly).
pub fn verdict(results: &[CheckResult]) -> Verdict {
    if results.iter().any(|r| r.verdict == "fail") {
        Verdict::Fail
    } else if results.iter().any(|r| r.verdict != "pass") {
        Verdict::Inconclusive
    } else {
        Verdict::Pass
    }
}

/// The results that decided a verdict, in one line: `failures: 43.0% of 120 attempts ...`.
pub fn summary(results: &[CheckResult], verdict: &str) -> String {
    results
        .iter()
        .filter(|r| r.verdict == verdict)
        .map(|r| format!("{}: {}", r.name, r.detail))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cohorts() -> Vec<Cohort> {
        vec![Cohort {
            name: "internal".into(),
            sources: vec!["10.20.0.0/16".parse().unwrap()],
        }]
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn steps_parse_and_are_checked() {
        assert_eq!(
            parse_steps(&s(&["internal", "10", "50", "100"]), &cohorts()).unwrap(),
            vec![
                Step::Cohort("internal".into()),
                Step::Percent(1000),
                Step::Percent(5000),
                Step::Percent(10000)
            ]
        );
        assert_eq!(
            parse_steps(&s(&["0.5", "25%"]), &[]).unwrap(),
            vec![Step::Percent(50), Step::Percent(2500)]
        );
        for (bad, want) in [
            (vec!["50", "10"], "must increase: 10 comes after 50"),
            (vec!["0"], "more than 0"),
            (vec!["101"], "at most 100"),
            (vec!["0.001"], "0.01%"),
            (vec!["1e2"], "neither a percentage"),
            (vec!["staff"], "cohorts: internal"),
            (vec!["internal", "internal"], "twice"),
            (vec!["100", "internal"], "after 100%"),
            (vec!["10", ""], "a step is empty"),
        ] {
            let e = parse_steps(&s(&bad), &cohorts()).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        // A cohort may widen a canary after a percentage (employees after 10% of users).
        assert_eq!(
            parse_steps(&s(&["10", "internal", "50"]), &cohorts()).unwrap(),
            vec![
                Step::Percent(1000),
                Step::Cohort("internal".into()),
                Step::Percent(5000)
            ]
        );
        assert!(parse_steps(&[], &[]).is_err());
        assert!(
            parse_steps(&s(&["x"]), &[])
                .unwrap_err()
                .contains("no [[services.cohorts]]")
        );
    }

    #[test]
    fn splits_and_pins_per_step() {
        let steps = parse_steps(&s(&["internal", "10", "100"]), &cohorts()).unwrap();
        assert_eq!(percent_at(&steps, 0), 0);
        assert_eq!(percent_at(&steps, 1), 1000);
        assert_eq!(percent_at(&steps, 2), 10000);
        let before = vec![("blue".to_string(), 10000), ("green".to_string(), 0)];
        assert_eq!(
            split_for(&before, "blue", "green", 1000),
            vec![("blue".to_string(), 9000), ("green".to_string(), 1000)]
        );
        let only_blue = vec![("blue".to_string(), 10000)];
        assert_eq!(
            split_for(&only_blue, "blue", "green", 0),
            vec![("blue".to_string(), 10000), ("green".to_string(), 0)]
        );
        let other: Pin = Pin {
            prefix: "10.9.0.0/16".parse().unwrap(),
            group: "blue".into(),
        };
        let p = pins_at(std::slice::from_ref(&other), &steps, 0, &cohorts(), "green");
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].group, "green");
        assert_eq!(p[1].prefix.to_string(), "10.20.0.0/16");
        // Later steps keep the cohort pinned.
        assert_eq!(pins_at(&[], &steps, 2, &cohorts(), "green").len(), 1);
    }

    fn g(name: &str, new: u64, att: u64, ans: u64, rst: u64) -> GroupSignals {
        signals(
            name,
            &[(
                Snap::default(),
                Snap {
                    new_flows: new,
                    attempts: att,
                    answered: ans,
                    resets: rst,
                    ..Default::default()
                },
            )],
        )
    }

    #[test]
    fn analysis_compares_with_the_baseline_and_wants_evidence() {
        let spec = CanarySpec::default();
        let base = g("blue", 900, 900, 900, 0);
        // Healthy canary.
        let ok = evaluate(&g("green", 100, 100, 100, 0), &base, &spec, 50, &[], true);
        assert_eq!(verdict(&ok), Verdict::Pass, "{ok:?}");
        // Resets: fail, with the numbers.
        let bad = evaluate(&g("green", 100, 100, 100, 40), &base, &spec, 50, &[], true);
        assert_eq!(verdict(&bad), Verdict::Fail);
        let line = summary(&bad, "fail");
        assert!(
            line.contains("40.00% of 100 attempts") && line.contains("40 reset"),
            "{line}"
        );
        // Too little traffic: inconclusive, not a pass.
        let thin = evaluate(&g("green", 3, 3, 3, 0), &base, &spec, 50, &[], true);
        assert_eq!(verdict(&thin), Verdict::Inconclusive);
        assert!(summary(&thin, "inconclusive").contains("only 3 new flows"));
        // A down backend fails it whatever the traffic.
        let down = evaluate(
            &g("green", 100, 100, 100, 0),
            &base,
            &spec,
            50,
            &["green-1 is down".into()],
            true,
        );
        assert_eq!(verdict(&down), Verdict::Fail);
        // Baseline failing as much: not the canary's fault.
        let both = evaluate(
            &g("green", 100, 100, 90, 0),
            &g("blue", 900, 900, 810, 0),
            &spec,
            50,
            &[],
            true,
        );
        assert_eq!(verdict(&both), Verdict::Pass, "{both:?}");
    }

    #[test]
    fn probe_latency_has_a_floor() {
        let spec = CanarySpec::default();
        let mk = |lat_ms: u64| {
            signals(
                "x",
                &[(
                    Snap::default(),
                    Snap {
                        new_flows: 100,
                        probes: 10,
                        latency_us_sum: lat_ms * 1000 * 10,
                        ..Default::default()
                    },
                )],
            )
        };
        // 3 ms vs 1 ms: thrice, but within 5 ms.
        let r = evaluate(&mk(3), &mk(1), &spec, 50, &[], false);
        assert_eq!(verdict(&r), Verdict::Pass, "{r:?}");
        let r = evaluate(&mk(30), &mk(10), &spec, 50, &[], false);
        assert_eq!(verdict(&r), Verdict::Fail, "{r:?}");
    }
}
