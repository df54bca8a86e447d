//! Deployments (canary and rolling) as text: the one-line answer to `pause`, `resume`,
//! `promote` and `abort`, the `deployments` table, the `status` line, and what following a
//! deployment prints. Pure functions of a `DeploymentStatus` (and the time, where a countdown
//! is shown), tested without an agent.

use crate::api::{CheckResult, DeploymentStatus, DeploymentsResult, GroupSignals};

use super::{
    args::fmt_pct,
    render::{split_text, table},
};

/// The table's MESSAGE column: longer messages are cut (`zdd deployments --json` has them
/// whole).
const MESSAGE_WIDTH: usize = 60;

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `45s`, `2m05s`, `1h02m` (rounded down).
pub fn duration_text(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// A time left, rounded up: 0.2s left is `1s`, not `0s`.
pub fn countdown_text(ms: u64) -> String {
    duration_text(ms.div_ceil(1000) * 1000)
}

/// Unix milliseconds to the second, as `events` prints times: `2025-03-01 12:00:05Z`.
pub fn started_text(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| format!("{ms}ms"))
}

fn is_rolling(d: &DeploymentStatus) -> bool {
    d.kind == "rolling"
}

/// `rolled_back` -> `rolled back`.
fn state_text(d: &DeploymentStatus) -> String {
    d.state.replace('_', " ")
}

fn phase_text(phase: &str) -> String {
    match phase {
        "updating" => "running --exec".into(),
        "waiting_health" => "waiting for health".into(),
        p => p.replace('_', " "),
    }
}

/// The index of the step to show: the one in progress, or the last one once all are done.
fn shown_step(d: &DeploymentStatus) -> Option<usize> {
    (!d.steps.is_empty()).then(|| d.step.min(d.steps.len() - 1))
}

/// A canary step as people read it: `25%`, `cohort internal`.
pub fn canary_step_label(step: &str) -> String {
    if step.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        match step.trim_end_matches('%').parse::<f64>() {
            Ok(p) => format!("{}%", fmt_pct(p)),
            Err(_) => step.to_string(),
        }
    } else {
        format!("cohort {step}")
    }
}

/// `step 2/4 (25%)`, `step 1/4 (cohort internal)`, `batch 2/3 (web-3, web-4)`.
pub fn step_text(d: &DeploymentStatus) -> String {
    let word = if is_rolling(d) { "batch" } else { "step" };
    let Some(i) = shown_step(d) else {
        return format!("{word} -");
    };
    let what = if is_rolling(d) {
        d.steps[i].replace(',', ", ")
    } else {
        canary_step_label(&d.steps[i])
    };
    format!("{word} {}/{} ({what})", i + 1, d.steps.len())
}

/// The table's STEP: `2/4 25%`, `1/4 internal`, `batch 3/4`.
pub fn step_cell(d: &DeploymentStatus) -> String {
    let Some(i) = shown_step(d) else {
        return "-".into();
    };
    let n = format!("{}/{}", i + 1, d.steps.len());
    if is_rolling(d) {
        format!("batch {n}")
    } else if d.steps[i].starts_with(|c: char| c.is_ascii_alphabetic()) {
        format!("{n} {}", d.steps[i])
    } else {
        format!("{n} {}", canary_step_label(&d.steps[i]))
    }
}

/// `canary #3 paused at step 2/4 (25%)`, `rolling #4 running at batch 2/3 (web-3),
/// draining`, `canary #3 succeeded after 2m00s`.
fn body(d: &DeploymentStatus) -> String {
    let mut s = format!("{} #{} {}", d.kind, d.id, state_text(d));
    if d.state == "succeeded" {
        s.push_str(&format!(" after {}", duration_text(d.duration_ms)));
        return s;
    }
    s.push_str(&format!(" at {}", step_text(d)));
    // A canary observes most of the time: only the other phases are worth a word.
    if !d.finished && !d.phase.is_empty() && d.phase != "observing" {
        s.push_str(&format!(", {}", phase_text(&d.phase)));
    }
    s
}

/// The answer to `canary --detach`, `rolling --detach`, `pause`, `resume`, `promote`,
/// `abort`: `web: canary #3 paused at step 2/4 (25%): paused by uid 1000`.
pub fn line(d: &DeploymentStatus) -> String {
    let mut s = format!("{}: {}", d.service, body(d));
    let m = own_message(d);
    if !m.is_empty() {
        s.push_str(&format!(": {m}"));
    }
    s
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim_end()
}

/// The message's first line without what the text around it says already: the agent starts
/// its messages with the deployment and its step (`canary #3 step 2/4 (25%) paused by uid
/// 0`). A step other than the one shown (the step that passed last) is kept.
pub fn own_message(d: &DeploymentStatus) -> &str {
    let m = first_line(&d.message);
    let Some(rest) = m.strip_prefix(&format!("{} #{}", d.kind, d.id)) else {
        return m;
    };
    let mut rest = rest.trim_start_matches([' ', ':']);
    if let Some(i) = shown_step(d) {
        let word = if is_rolling(d) { "batch" } else { "step" };
        let head = format!("{word} {}/{} (", i + 1, d.steps.len());
        if let Some((_, after)) = rest.strip_prefix(&head).and_then(|r| r.split_once(')')) {
            rest = after.trim_start_matches([' ', ':']);
        }
    }
    // `paused: not enough evidence` after `paused at step 2/4`.
    if let Some(after) = rest
        .strip_prefix(state_text(d).as_str())
        .filter(|r| r.starts_with(':'))
    {
        rest = after;
    }
    rest.trim_start_matches([' ', ':'])
}

/// True when the agent's message says already what a person can do.
fn has_hints(d: &DeploymentStatus) -> bool {
    d.message.contains("zdd resume")
}

/// The first line of `s`, cut to `width` characters with `…`.
pub fn truncate(s: &str, width: usize) -> String {
    let l = first_line(s);
    let more_lines = s.trim_end().contains('\n');
    if l.chars().count() <= width && !more_lines {
        return l.to_string();
    }
    let mut t: String = l.chars().take(width.saturating_sub(1)).collect();
    // Cut between words rather than in one, unless that loses more than half.
    let mid_word = l[t.len()..].starts_with(|c: char| !c.is_whitespace());
    if let Some(space) = t.rfind(' ').filter(|i| mid_word && *i > t.len() / 2) {
        t.truncate(space);
    }
    t.truncate(t.trim_end_matches([' ', ',', ';', ':']).len());
    t.push('…');
    t
}

/// `deployments`: those in progress, then past ones.
pub fn table_of(r: &DeploymentsResult) -> String {
    if r.active.is_empty() && r.past.is_empty() {
        return "no deployments".into();
    }
    let rows = r
        .active
        .iter()
        .chain(&r.past)
        .map(|d| {
            vec![
                d.id.to_string(),
                d.service.clone(),
                d.kind.clone(),
                state_text(d),
                step_cell(d),
                started_text(d.started_ms),
                duration_text(d.duration_ms),
                truncate(own_message(d), MESSAGE_WIDTH),
            ]
        })
        .collect();
    table(
        &[
            "ID", "SERVICE", "KIND", "STATE", "STEP", "STARTED", "DURATION", "MESSAGE",
        ],
        rows,
        &[0, 6],
    )
}

/// `fail` if a check failed, else `inconclusive` if one was, else `pass`.
fn verdict(checks: &[CheckResult]) -> &'static str {
    if checks.iter().any(|c| c.verdict == "fail") {
        "failed"
    } else if checks.iter().any(|c| c.verdict == "inconclusive") {
        "inconclusive"
    } else {
        "passed"
    }
}

/// `passed (new_flows pass, failures pass)`: the verdicts only.
pub fn verdicts(checks: &[CheckResult]) -> String {
    format!(
        "{} ({})",
        verdict(checks),
        checks
            .iter()
            .map(|c| format!("{} {}", c.name, c.verdict))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// One check with its numbers: `failures fail: 4.2% > baseline 0.3% + 1`.
pub fn check_text(c: &CheckResult) -> String {
    match (c.detail.is_empty(), c.value) {
        (false, _) => format!("{} {}: {}", c.name, c.verdict, c.detail),
        (true, Some(v)) => format!("{} {}: {v}", c.name, c.verdict),
        (true, None) => format!("{} {}", c.name, c.verdict),
    }
}

/// `next step in 12s` (canary), `12s left` (a rolling phase with a deadline); None while
/// paused or without a deadline.
fn time_left(d: &DeploymentStatus, now: u64) -> Option<String> {
    let end = d.step_ends_ms.filter(|_| d.state == "running")?;
    // Past the end the agent is analysing or moving on: a countdown stuck at 0s says nothing.
    let left = countdown_text(Some(end.saturating_sub(now)).filter(|l| *l > 0)?);
    Some(if is_rolling(d) {
        format!("{left} left")
    } else if d.step + 1 >= d.steps.len() {
        format!("last analysis in {left}")
    } else {
        format!("next step in {left}")
    })
}

/// `status`'s line for a service's deployment: kind, state, step, time to the next step,
/// the last analysis' verdicts.
pub fn status_row(d: &DeploymentStatus, now: u64) -> String {
    let mut s = body(d);
    if let Some(t) = time_left(d, now) {
        s.push_str(&format!(", {t}"));
    }
    if d.extensions > 0 {
        s.push_str(&format!(", extended {}x", d.extensions));
    }
    if d.state != "running" && !own_message(d).is_empty() {
        s.push_str(&format!(": {}", own_message(d)));
    }
    if !d.analysis.is_empty() {
        s.push_str(&format!("; last analysis {}", verdicts(&d.analysis)));
    }
    s
}

/// What following prints a line for when it changes.
pub fn progress_key(d: &DeploymentStatus) -> (&str, usize, &str, u32, &[CheckResult]) {
    (&d.state, d.step, &d.phase, d.extensions, &d.analysis)
}

/// What a person can do about a paused or stopped deployment.
fn hints(d: &DeploymentStatus) -> String {
    let s = &d.service;
    if d.state == "stopped" {
        format!(
            "`zdd resume {s}` retries the batch; `zdd abort {s}` ends the update (the batch \
             stays drained)"
        )
    } else if is_rolling(d) {
        format!(
            "`zdd resume {s}` goes on; `zdd promote {s}` runs the remaining batches; `zdd abort \
             {s}` stops the update"
        )
    } else {
        format!(
            "`zdd resume {s}` goes on; `zdd promote {s}` goes to 100% now; `zdd abort {s}` \
             rolls back"
        )
    }
}

/// The lines following prints for the change from `prev` (None: the first answer) to `cur`,
/// without a pipe's spinner or redraws: each starts with the time since the deployment
/// began. The end (finished, or stopped) is [`outcome`]'s.
pub fn changes(prev: Option<&DeploymentStatus>, cur: &DeploymentStatus) -> Vec<String> {
    if prev.is_some_and(|p| progress_key(p) == progress_key(cur)) {
        return Vec::new();
    }
    let at = format!("[+{}] {}:", duration_text(cur.duration_ms), cur.service);
    let who = format!("{} #{}", cur.kind, cur.id);
    let mut out = Vec::new();
    if prev.is_none() {
        out.push(if is_rolling(cur) {
            format!("{at} {who} started: {} batch(es)", cur.steps.len())
        } else {
            format!(
                "{at} {who} started: to {}{}, steps {}",
                cur.to.as_deref().unwrap_or("?"),
                cur.baseline
                    .as_deref()
                    .map(|b| format!(" (baseline {b})"))
                    .unwrap_or_default(),
                cur.steps
                    .iter()
                    .map(|s| canary_step_label(s))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
    }
    if !cur.analysis.is_empty() && prev.is_none_or(|p| p.analysis != cur.analysis) {
        out.push(format!(
            "{at} {who} analysis {}: {}",
            verdict(&cur.analysis),
            cur.analysis
                .iter()
                .map(check_text)
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let ended = cur.finished || cur.state == "stopped";
    let moved = prev.is_none_or(|p| p.step != cur.step || p.phase != cur.phase);
    if moved && !ended {
        let mut l = format!("{at} {who} {}", step_text(cur));
        if !cur.phase.is_empty() {
            l.push_str(&format!(": {}", phase_text(&cur.phase)));
        }
        if !is_rolling(cur) && prev.is_none_or(|p| p.step != cur.step) {
            l.push_str(&format!("; split {}", split_text(&cur.split)));
        }
        out.push(l);
    }
    if cur.extensions > 0 && prev.is_none_or(|p| p.extensions != cur.extensions) {
        out.push(format!(
            "{at} {who} {} extended ({}x): not enough evidence yet",
            step_text(cur),
            cur.extensions
        ));
    }
    let state_changed = prev.is_none_or(|p| p.state != cur.state);
    if state_changed && !ended {
        match cur.state.as_str() {
            "paused" => {
                let mut l = format!("{at} {who} paused at {}", step_text(cur));
                if !own_message(cur).is_empty() {
                    l.push_str(&format!(": {}", own_message(cur)));
                }
                if !has_hints(cur) {
                    l.push_str(&format!("; {}", hints(cur)));
                }
                out.push(l);
            }
            "running" if prev.is_some() => {
                out.push(format!("{at} {who} running again at {}", step_text(cur)))
            }
            _ => {}
        }
    }
    out
}

/// The lines that end following, and whether the deployment did what was asked (exit 0).
/// For a rollback or an abort: the message (it carries the numbers that failed the step) and
/// the failed checks; for a stopped rolling update: the message and what to do.
pub fn outcome(d: &DeploymentStatus) -> (Vec<String>, bool) {
    let mut out = vec![line(d)];
    let ok = d.state == "succeeded";
    if !ok {
        // The message may have more lines than the one `line` shows.
        out.extend(d.message.lines().skip(1).map(|l| format!("  {l}")));
        out.extend(d.analysis.iter().filter(|c| c.verdict == "fail").map(|c| {
            match (c.detail.is_empty(), c.value) {
                (false, _) => format!("  failed: {} ({})", c.name, c.detail),
                (true, Some(v)) => format!("  failed: {} ({v})", c.name),
                (true, None) => format!("  failed: {}", c.name),
            }
        }));
    }
    if d.state == "stopped" {
        out.push(format!("  {}", hints(d)));
    }
    (out, ok)
}

fn group_rows(d: &DeploymentStatus) -> String {
    let role = |g: &GroupSignals| {
        if d.to.as_deref() == Some(g.group.as_str()) {
            format!("{} (canary)", g.group)
        } else if d.baseline.as_deref() == Some(g.group.as_str()) {
            format!("{} (baseline)", g.group)
        } else {
            g.group.clone()
        }
    };
    let rows = d
        .groups
        .iter()
        .map(|g| {
            vec![
                role(g),
                g.new_flows.to_string(),
                g.failure_pct.map_or("-".into(), |p| format!("{p:.2}%")),
                g.probe_latency_ms
                    .map_or("-".into(), |l| format!("{l:.1} ms")),
            ]
        })
        .collect();
    table(
        &["GROUP", "NEW FLOWS", "FAILURES", "PROBE LATENCY"],
        rows,
        &[1, 2, 3],
    )
}

/// The live view's text under its bar, on a terminal: the step (and phase, time left,
/// extensions), then for a canary its split and per group the signals of the step so far.
pub fn live(d: &DeploymentStatus, now: u64) -> String {
    let mut first = step_text(d);
    if d.state != "running" {
        first.push_str(&format!(" - {}", state_text(d).to_uppercase()));
        if !own_message(d).is_empty() {
            first.push_str(&format!(": {}", own_message(d)));
        }
    } else if !d.phase.is_empty() {
        first.push_str(&format!(": {}", phase_text(&d.phase)));
    }
    if let Some(t) = time_left(d, now) {
        first.push_str(&format!(", {t}"));
    }
    if d.extensions > 0 {
        first.push_str(&format!(", extended {}x", d.extensions));
    }
    let mut out = vec![first];
    if !is_rolling(d) {
        out.push(format!("split {}", split_text(&d.split)));
    }
    if !d.groups.is_empty() {
        out.extend(group_rows(d).lines().map(str::to_string));
    }
    if d.state == "paused" && !has_hints(d) {
        out.push(hints(d));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Split;

    /// A canary at its second step, 25% to green, 12 s into a 30 s step.
    fn canary() -> DeploymentStatus {
        DeploymentStatus {
            id: 3,
            service: "web".into(),
            kind: "canary".into(),
            state: "running".into(),
            finished: false,
            started_ms: 1_700_000_000_000,
            ended_ms: None,
            duration_ms: 42_000,
            to: Some("green".into()),
            baseline: Some("blue".into()),
            steps: ["5", "25", "50", "100"].map(String::from).to_vec(),
            step: 1,
            phase: "observing".into(),
            step_started_ms: 1_700_000_030_000,
            step_ends_ms: Some(1_700_000_060_000),
            extensions: 0,
            split: Split::from([("blue".into(), 75.0), ("green".into(), 25.0)]),
            groups: vec![
                GroupSignals {
                    group: "blue".into(),
                    new_flows: 1200,
                    attempts: 1200,
                    unanswered: 1,
                    resets: 0,
                    failure_pct: Some(0.083),
                    probes: 24,
                    probe_failures: 0,
                    probe_latency_ms: Some(1.21),
                },
                GroupSignals {
                    group: "green".into(),
                    new_flows: 410,
                    attempts: 410,
                    failure_pct: Some(0.0),
                    probes: 24,
                    probe_latency_ms: Some(1.4),
                    ..Default::default()
                },
            ],
            analysis: vec![
                CheckResult {
                    name: "new_flows".into(),
                    verdict: "pass".into(),
                    value: Some(152.0),
                    detail: "152 ≥ 100".into(),
                },
                CheckResult {
                    name: "failures".into(),
                    verdict: "pass".into(),
                    value: Some(0.1),
                    detail: "0.1% ≤ baseline 0.2% + 1".into(),
                },
            ],
            message: String::new(),
        }
    }

    fn rolling() -> DeploymentStatus {
        DeploymentStatus {
            id: 4,
            service: "api".into(),
            kind: "rolling".into(),
            state: "running".into(),
            started_ms: 1_700_000_100_000,
            duration_ms: 75_000,
            steps: vec!["api-1,api-2".into(), "api-3,api-4".into(), "api-5".into()],
            step: 1,
            phase: "draining".into(),
            step_ends_ms: Some(1_700_000_200_000),
            ..Default::default()
        }
    }

    #[test]
    fn durations_and_countdowns() {
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(59_999), "59s");
        assert_eq!(duration_text(125_000), "2m05s");
        assert_eq!(duration_text(3_720_000), "1h02m");
        assert_eq!(countdown_text(200), "1s");
        assert_eq!(countdown_text(0), "0s");
        assert_eq!(countdown_text(12_000), "12s");
        assert_eq!(started_text(1_700_000_000_250), "2023-11-14 22:13:20Z");
    }

    #[test]
    fn steps_as_people_read_them() {
        let mut d = canary();
        assert_eq!(step_text(&d), "step 2/4 (25%)");
        assert_eq!(step_cell(&d), "2/4 25%");
        d.steps = ["internal", "10", "100"].map(String::from).to_vec();
        d.step = 0;
        assert_eq!(step_text(&d), "step 1/3 (cohort internal)");
        assert_eq!(step_cell(&d), "1/3 internal");
        // Done: the last step, not 4/3.
        d.step = 3;
        assert_eq!(step_cell(&d), "3/3 100%");
        d.steps.clear();
        assert_eq!(step_text(&d), "step -");
        assert_eq!(step_cell(&d), "-");
        let r = rolling();
        assert_eq!(step_text(&r), "batch 2/3 (api-3, api-4)");
        assert_eq!(step_cell(&r), "batch 2/3");
        assert_eq!(canary_step_label("2.5"), "2.5%");
        // The agent labels its steps `25%`.
        assert_eq!(canary_step_label("25%"), "25%");
        d.steps = ["internal", "10%", "100%"].map(String::from).to_vec();
        d.step = 1;
        assert_eq!(step_text(&d), "step 2/3 (10%)");
        assert_eq!(step_cell(&d), "2/3 10%");
    }

    #[test]
    fn one_line_answers() {
        let mut d = canary();
        d.state = "paused".into();
        d.message = "paused by uid 1000".into();
        assert_eq!(
            line(&d),
            "web: canary #3 paused at step 2/4 (25%): paused by uid 1000"
        );
        d.state = "running".into();
        d.phase = "analysing".into();
        d.message.clear();
        assert_eq!(
            line(&d),
            "web: canary #3 running at step 2/4 (25%), analysing"
        );
        d.state = "succeeded".into();
        d.finished = true;
        d.step = 4;
        d.duration_ms = 120_000;
        d.message = "green has 100% of new flows".into();
        assert_eq!(
            line(&d),
            "web: canary #3 succeeded after 2m00s: green has 100% of new flows"
        );
        let mut r = rolling();
        assert_eq!(
            line(&r),
            "api: rolling #4 running at batch 2/3 (api-3, api-4), draining"
        );
        r.phase = "waiting_health".into();
        assert!(line(&r).ends_with(", waiting for health"), "{}", line(&r));
    }

    #[test]
    fn the_agents_messages_lose_what_the_line_says_already() {
        let mut d = canary();
        d.state = "paused".into();
        d.message = "canary #3 step 2/4 (25%) paused by uid 0".into();
        assert_eq!(own_message(&d), "paused by uid 0");
        assert_eq!(
            line(&d),
            "web: canary #3 paused at step 2/4 (25%): paused by uid 0"
        );
        d.message = "canary #3 step 2/4 (25%): started (by uid 0)".into();
        assert_eq!(own_message(&d), "started (by uid 0)");
        // Another step than the one shown stays: it says which step passed.
        d.message = "canary #3 step 1/4 (5%) passed; green gets all new flows".into();
        assert_eq!(
            own_message(&d),
            "step 1/4 (5%) passed; green gets all new flows"
        );
        d.message = "canary #3 step 2/4 (25%)".into();
        assert_eq!(line(&d), "web: canary #3 paused at step 2/4 (25%)");
        d.message = "someone else's words\nand more".into();
        assert_eq!(own_message(&d), "someone else's words");
        let mut r = rolling();
        r.message = "rolling #4 batch 2/3 (api-3,api-4): restored".into();
        assert_eq!(own_message(&r), "restored");
        // Hints the agent gave are not given twice.
        d.message = "canary #3 step 2/4 (25%) paused: not enough evidence; `zdd resume web` \
                     observes longer"
            .into();
        let mut running = d.clone();
        running.state = "running".into();
        let l = changes(Some(&running), &d);
        assert_eq!(
            l,
            [
                "[+42s] web: canary #3 paused at step 2/4 (25%): not enough evidence; `zdd resume \
                 web` observes longer"
            ]
        );
        assert!(!live(&d, 0).contains("goes on"));
        d.message = "canary #3 step 2/4 (25%) paused: still not enough evidence".into();
        assert_eq!(own_message(&d), "still not enough evidence");
        d.message = "canary #3 step 2/4 (25%) paused by uid 0".into();
        assert_eq!(own_message(&d), "paused by uid 0");
    }

    #[test]
    fn the_deployments_table() {
        let mut past = canary();
        past.id = 2;
        past.state = "rolled_back".into();
        past.finished = true;
        past.duration_ms = 65_000;
        past.message = "step 2/4 (25%) failed: failures 4.2% > baseline 0.3% + 1; probe_latency \
                        38.0 ms > 2 × baseline 12.0 ms"
            .into();
        let r = DeploymentsResult {
            active: vec![rolling()],
            past: vec![past],
        };
        let t = table_of(&r);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "ID  SERVICE  KIND     STATE        STEP       STARTED               DURATION  MESSAGE",
                " 4  api      rolling  running      batch 2/3  2023-11-14 22:15:00Z     1m15s",
                " 2  web      canary   rolled back  2/4 25%    2023-11-14 22:13:20Z     1m05s  step 2/4 (25%) failed: failures 4.2% > baseline 0.3% + 1…",
            ]
        );
        assert_eq!(table_of(&DeploymentsResult::default()), "no deployments");
    }

    #[test]
    fn messages_are_cut_to_their_first_line_and_a_width() {
        assert_eq!(truncate("short", 60), "short");
        assert_eq!(truncate("one\ntwo", 60), "one…");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("ab, cdef", 4), "ab…");
        assert_eq!(truncate("one two three four", 12), "one two…");
        assert_eq!(truncate("one two three four", 14), "one two three…");
        assert_eq!(truncate("ééééé", 4).chars().count(), 4);
        assert_eq!(truncate("", 10), "");
    }

    #[test]
    fn the_status_line_counts_down_and_gives_the_verdicts() {
        let d = canary();
        let now = 1_700_000_048_000;
        assert_eq!(
            status_row(&d, now),
            "canary #3 running at step 2/4 (25%), next step in 12s; last analysis passed \
             (new_flows pass, failures pass)"
        );
        let mut p = d.clone();
        p.state = "paused".into();
        p.step_ends_ms = None;
        p.extensions = 2;
        p.message = "analysis inconclusive after 2 extensions".into();
        p.analysis[0].verdict = "inconclusive".into();
        assert_eq!(
            status_row(&p, now),
            "canary #3 paused at step 2/4 (25%), extended 2x: analysis inconclusive after 2 \
             extensions; last analysis inconclusive (new_flows inconclusive, failures pass)"
        );
        let mut last = d;
        last.step = 3;
        last.analysis.clear();
        assert_eq!(
            status_row(&last, now),
            "canary #3 running at step 4/4 (100%), last analysis in 12s"
        );
        assert_eq!(
            status_row(&rolling(), 1_700_000_158_000),
            "rolling #4 running at batch 2/3 (api-3, api-4), draining, 42s left"
        );
    }

    #[test]
    fn following_prints_a_line_per_change_only() {
        let mut d = canary();
        d.step = 0;
        d.duration_ms = 0;
        d.split = Split::from([("blue".into(), 95.0), ("green".into(), 5.0)]);
        d.analysis.clear();
        let first = changes(None, &d);
        assert_eq!(
            first,
            [
                "[+0s] web: canary #3 started: to green (baseline blue), steps 5%, 25%, 50%, 100%",
                "[+0s] web: canary #3 step 1/4 (5%): observing; split blue=95% green=5%",
            ]
        );
        // Only the signals moved: nothing to say.
        let mut same = d.clone();
        same.groups[0].new_flows += 10;
        same.duration_ms = 500;
        assert!(changes(Some(&d), &same).is_empty());

        let mut analysing = same.clone();
        analysing.phase = "analysing".into();
        analysing.duration_ms = 30_000;
        assert_eq!(
            changes(Some(&same), &analysing),
            ["[+30s] web: canary #3 step 1/4 (5%): analysing"]
        );
        let mut next = canary();
        next.duration_ms = 30_500;
        assert_eq!(
            changes(Some(&analysing), &next),
            [
                "[+30s] web: canary #3 analysis passed: new_flows pass: 152 ≥ 100; failures pass: \
                 0.1% ≤ baseline 0.2% + 1",
                "[+30s] web: canary #3 step 2/4 (25%): observing; split blue=75% green=25%",
            ]
        );
        let mut paused = next.clone();
        paused.extensions = 1;
        paused.state = "paused".into();
        paused.message = "analysis inconclusive: 12 new flows < min_flows 100".into();
        assert_eq!(
            changes(Some(&next), &paused),
            [
                "[+30s] web: canary #3 step 2/4 (25%) extended (1x): not enough evidence yet",
                "[+30s] web: canary #3 paused at step 2/4 (25%): analysis inconclusive: 12 new \
                 flows < min_flows 100; `zdd resume web` goes on; `zdd promote web` goes to 100% \
                 now; `zdd abort web` rolls back",
            ]
        );
        assert_eq!(
            changes(Some(&paused), &next),
            ["[+30s] web: canary #3 running again at step 2/4 (25%)"]
        );
        // The end is outcome's to print.
        let mut done = next.clone();
        done.state = "rolled_back".into();
        done.finished = true;
        assert!(changes(Some(&next), &done).is_empty());
    }

    #[test]
    fn a_rolling_update_prints_its_phases() {
        let r = rolling();
        let mut h = r.clone();
        h.phase = "updating".into();
        assert_eq!(
            changes(Some(&r), &h),
            ["[+1m15s] api: rolling #4 batch 2/3 (api-3, api-4): running --exec"]
        );
        assert_eq!(
            changes(None, &r)[0],
            "[+1m15s] api: rolling #4 started: 3 batch(es)"
        );
    }

    #[test]
    fn outcomes_and_their_exit() {
        let mut d = canary();
        d.state = "succeeded".into();
        d.finished = true;
        d.step = 4;
        d.duration_ms = 125_000;
        assert_eq!(
            outcome(&d),
            (
                vec!["web: canary #3 succeeded after 2m05s".to_string()],
                true
            )
        );
        d.state = "rolled_back".into();
        d.step = 1;
        d.message = "step 2/4 (25%) failed: failures 4.2% > baseline 0.3% + 1".into();
        d.analysis[1] = CheckResult {
            name: "failures".into(),
            verdict: "fail".into(),
            value: Some(4.2),
            detail: "4.2% > baseline 0.3% + 1".into(),
        };
        d.analysis.push(CheckResult {
            name: "check".into(),
            verdict: "fail".into(),
            value: None,
            detail: "exit status 3".into(),
        });
        let (lines, ok) = outcome(&d);
        assert!(!ok);
        assert_eq!(
            lines,
            [
                "web: canary #3 rolled back at step 2/4 (25%): step 2/4 (25%) failed: failures \
                 4.2% > baseline 0.3% + 1",
                "  failed: failures (4.2% > baseline 0.3% + 1)",
                "  failed: check (exit status 3)",
            ]
        );
        let mut r = rolling();
        r.state = "stopped".into();
        r.phase = "waiting_health".into();
        r.message = "api-3 did not pass 3 probes within 60s".into();
        let (lines, ok) = outcome(&r);
        assert!(!ok);
        assert_eq!(
            lines,
            [
                "api: rolling #4 stopped at batch 2/3 (api-3, api-4), waiting for health: api-3 \
                 did not pass 3 probes within 60s",
                "  `zdd resume api` retries the batch; `zdd abort api` ends the update (the \
                 batch stays drained)",
            ]
        );
    }

    #[test]
    fn the_live_view() {
        let d = canary();
        let s = live(&d, 1_700_000_048_000);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines,
            [
                "step 2/4 (25%): observing, next step in 12s",
                "split blue=75% green=25%",
                "GROUP            NEW FLOWS  FAILURES  PROBE LATENCY",
                "blue (baseline)       1200     0.08%         1.2 ms",
                "green (canary)         410     0.00%         1.4 ms",
            ]
        );
        let mut p = d;
        p.state = "paused".into();
        p.extensions = 3;
        p.message = "inconclusive".into();
        p.groups.clear();
        assert_eq!(
            live(&p, 0),
            "step 2/4 (25%) - PAUSED: inconclusive, extended 3x\nsplit blue=75% green=25%\n\
             `zdd resume web` goes on; `zdd promote web` goes to 100% now; `zdd abort web` \
             rolls back"
        );
        assert_eq!(
            live(&rolling(), 1_700_000_158_000),
            "batch 2/3 (api-3, api-4): draining, 42s left"
        );
    }
}
