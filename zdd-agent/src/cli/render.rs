//! Human output: the agent's results as tables and lines. Pure functions from a result to a
//! string, so that they are tested without an agent.

use std::collections::BTreeMap;

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

use super::{args::fmt_pct, deploy};
use crate::api::{
    ApplyResult, ChangeResult, Command, CounterRow, DeploymentStatus, DeploymentsResult,
    DrainResult, Event, Split, StatsResult, StatusResult,
};

/// Which result a command gets, for its human rendering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Status,
    Stats,
    Events,
    Apply,
    /// A change: `ChangeResult`, or `DrainResult` for the commands that wait on a drain.
    Change,
    /// One deployment (`DeploymentStatus`): the answer to starting, pausing, resuming,
    /// promoting and aborting one.
    Deployment,
    /// `DeploymentsResult`.
    Deployments,
}

impl Shape {
    pub fn of(cmd: &Command) -> Shape {
        match cmd {
            Command::Status { .. } => Shape::Status,
            Command::Stats => Shape::Stats,
            Command::Events { .. } => Shape::Events,
            Command::Apply { .. } => Shape::Apply,
            Command::Canary { .. }
            | Command::Rolling { .. }
            | Command::Pause { .. }
            | Command::Resume { .. }
            | Command::Promote { .. }
            | Command::Abort { .. } => Shape::Deployment,
            Command::Deployments { .. } => Shape::Deployments,
            _ => Shape::Change,
        }
    }
}

/// The human text for one result line (no trailing newline). A result of another shape than
/// expected (an agent newer than this client) is printed as JSON rather than lost.
pub fn human(shape: Shape, v: &Value) -> String {
    fn typed<T: DeserializeOwned>(v: &Value, f: impl Fn(&T) -> String) -> String {
        match T::deserialize(v) {
            Ok(t) => f(&t),
            Err(_) => serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()),
        }
    }
    match shape {
        Shape::Status => typed(v, status),
        Shape::Stats => typed(v, stats),
        Shape::Apply => typed(v, apply),
        Shape::Events => match events_of(v) {
            Some(events) => events.iter().map(event).collect::<Vec<_>>().join("\n"),
            None => serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()),
        },
        Shape::Change if v.get("remaining_flows").is_some() => typed(v, drain),
        Shape::Change => typed(v, change),
        Shape::Deployment => typed(v, |d: &DeploymentStatus| deploy::line(d)),
        Shape::Deployments => typed(v, |r: &DeploymentsResult| deploy::table_of(r)),
    }
}

/// The events in an `events` result: a list, `{"events":[...]}`, or one event (a stream line).
pub fn events_of(v: &Value) -> Option<Vec<Event>> {
    let list = match v {
        Value::Array(_) => v,
        Value::Object(o) if o.contains_key("events") => &o["events"],
        Value::Object(o) if o.contains_key("seq") => {
            return Event::deserialize(v).ok().map(|e| vec![e]);
        }
        _ => return None,
    };
    Vec::<Event>::deserialize(list).ok()
}

/// A borderless table (columns two spaces apart, numbers right-aligned), trailing spaces
/// trimmed.
pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>, right: &[usize]) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    if !header.is_empty() {
        t.set_header(header.to_vec());
    }
    for r in rows {
        t.add_row(r);
    }
    let n = t.column_count();
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, if i + 1 == n { 0 } else { 2 }));
        if right.contains(&i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.trim_fmt()
}

/// `blue=95% green=5%` (as `zdd split` takes it back).
pub fn split_text(s: &Split) -> String {
    if s.is_empty() {
        return "none".into();
    }
    s.iter()
        .map(|(g, p)| format!("{g}={}%", fmt_pct(*p)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bytes per second in SI units: `950 B/s`, `1.2 kB/s`, `12.3 MB/s`.
pub fn bytes_rate(b: f64) -> String {
    let units = ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"];
    let mut v = b.max(0.0);
    let mut u = 0;
    while v >= 999.95 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", units[0])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// `status`: per service its settings, then its backends.
pub fn status(r: &StatusResult) -> String {
    status_at(r, deploy::now_ms())
}

/// `status` at `now` (Unix ms), for a deployment's time to its next step.
pub fn status_at(r: &StatusResult, now: u64) -> String {
    let mut out: Vec<String> = Vec::new();
    if r.services.is_empty() {
        out.push("no services".into());
    }
    for s in &r.services {
        let mut rows = vec![
            vec!["service".into(), s.name.clone()],
            vec!["vip".into(), s.vip.clone()],
            vec!["protocol".into(), s.protocol.clone()],
            vec!["forwarding".into(), s.forwarding.clone()],
            vec!["affinity".into(), s.affinity.clone()],
            vec!["split".into(), split_text(&s.split)],
            vec![
                "previous split".into(),
                match &s.previous_split {
                    Some(p) => format!("{} (`zdd rollback {}` restores it)", split_text(p), s.name),
                    None => "none (nothing to roll back to)".into(),
                },
            ],
            vec![
                "pins".into(),
                if s.pins.is_empty() {
                    "none".into()
                } else {
                    s.pins
                        .iter()
                        .map(|p| format!("{} -> {}", p.source, p.group))
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            ],
        ];
        if let Some(d) = &s.deployment {
            rows.push(vec!["deployment".into(), deploy::status_row(d, now)]);
        }
        if let Some(d) = &s.differs_from_file {
            rows.push(vec!["config file".into(), format!("differs: {d}")]);
        }
        if !s.panic_groups.is_empty() {
            rows.push(vec![
                "PANIC".into(),
                format!(
                    "group(s) {} have too few healthy backends: forwarding to all of them",
                    s.panic_groups.join(", ")
                ),
            ]);
        }
        out.push(table(&[], rows, &[]));
        if s.backends.is_empty() {
            out.push("no backends".into());
        } else {
            // Health columns only for services that are checked.
            let checked = s
                .backends
                .iter()
                .any(|b| !b.health.is_empty() && b.health != "unchecked");
            let rows = s
                .backends
                .iter()
                .map(|b| {
                    let mut row = vec![
                        b.name.clone(),
                        b.addr.clone(),
                        b.group.clone(),
                        b.weight.to_string(),
                        b.state.clone(),
                        b.active_flows.to_string(),
                        format!("{:.1}", b.new_flows_per_s),
                        bytes_rate(b.bytes_per_s),
                    ];
                    if checked {
                        row.push(health_text(b));
                        row.push(b.last_probe.clone().unwrap_or_else(|| "-".into()));
                    }
                    row
                })
                .collect();
            let mut header = vec![
                "BACKEND",
                "ADDRESS",
                "GROUP",
                "WEIGHT",
                "STATE",
                "ACTIVE FLOWS",
                "NEW FLOWS/S",
                "BYTES/S",
            ];
            if checked {
                header.extend(["HEALTH", "LAST PROBE"]);
            }
            out.push(table(&header, rows, &[3, 5, 6, 7]));
            for b in s.backends.iter().filter(|b| b.down_reason.is_some()) {
                out.push(format!(
                    "{} is down: {}",
                    b.name,
                    b.down_reason.as_deref().unwrap_or("")
                ));
            }
        }
        out.push(String::new());
    }
    if r.differs_from_file {
        let file = if r.config_file.is_empty() {
            "the config file".to_string()
        } else {
            r.config_file.clone()
        };
        out.push(format!(
            "note: the live state differs from {file} (changes made with zdd since it was \
             applied, or edits to it not applied yet); `zdd apply -f {} --dry-run` lists the \
             differences",
            if r.config_file.is_empty() {
                "FILE"
            } else {
                &r.config_file
            }
        ));
    }
    out.join("\n").trim_end().to_string()
}

/// `up`, `down`, `starting`, or `up, slow start 35%` while a comeback ramps.
fn health_text(b: &crate::api::BackendStatus) -> String {
    if b.health == "up" && b.weight > 0 && b.effective_weight < b.weight && b.state == "serving" {
        return format!(
            "up, slow start {}%",
            (b.effective_weight as u64 * 100 / b.weight as u64).max(1)
        );
    }
    b.health.clone()
}

fn counter_rows(kind: &str, rows: &[CounterRow]) -> String {
    table(
        &[kind, "ADDRESS", "PACKETS", "BYTES", "NEW FLOWS"],
        rows.iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.addr.clone(),
                    r.packets.to_string(),
                    r.bytes.to_string(),
                    r.new_flows.to_string(),
                ]
            })
            .collect(),
        &[2, 3, 4],
    )
}

/// The global counters in the data path's order (as the README lists them), then any this
/// client does not know, by name.
pub fn global_counters(g: &BTreeMap<String, u64>) -> Vec<(&str, u64)> {
    let known = zdd_common::Stat::ALL.map(|s| s.name());
    let mut out: Vec<(&str, u64)> = known
        .iter()
        .filter_map(|k| g.get_key_value(*k).map(|(k, v)| (k.as_str(), *v)))
        .collect();
    out.extend(
        g.iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), *v)),
    );
    out
}

/// `stats`: the global counters (`NAME VALUE` a line), then per service and per backend.
pub fn stats(r: &StatsResult) -> String {
    let mut out = vec![table(
        &["COUNTER", "VALUE"],
        global_counters(&r.global)
            .into_iter()
            .map(|(k, v)| vec![k.to_string(), v.to_string()])
            .collect(),
        &[1],
    )];
    if !r.services.is_empty() {
        out.push(String::new());
        out.push(counter_rows("SERVICE", &r.services));
    }
    if !r.backends.is_empty() {
        out.push(String::new());
        out.push(counter_rows("BACKEND", &r.backends));
    }
    out.join("\n")
}

/// Unix milliseconds as UTC: `2025-03-01 12:00:05.250Z`.
pub fn time_text(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| format!("{ms}ms"))
}

/// One event a line: time, who, what, service, message.
pub fn event(e: &Event) -> String {
    let who = match (e.who.via.as_str(), e.who.uid) {
        (_, Some(uid)) => format!("uid {uid}"),
        (via, None) => via.to_string(),
    };
    format!(
        "{}  {who:<9} {:<20} {:<12} {}",
        time_text(e.time_ms),
        e.kind,
        e.service.as_deref().unwrap_or("-"),
        e.message
    )
    .trim_end()
    .to_string()
}

pub fn change(r: &ChangeResult) -> String {
    r.message.clone()
}

pub fn drain(r: &DrainResult) -> String {
    let mut s = r.message.clone();
    let secs = r.waited_ms as f64 / 1000.0;
    s.push_str(&format!(
        "\nwaited {secs:.1}s; {} active flow(s) left{}",
        r.remaining_flows,
        if r.timed_out { " (timed out)" } else { "" }
    ));
    s.trim_start().to_string()
}

pub fn apply(r: &ApplyResult) -> String {
    let mut out: Vec<String> = r.changes.clone();
    let n = r.changes.len();
    out.push(if n == 0 {
        "no changes: the live state is the file's".into()
    } else if r.dry_run {
        format!("dry run: {n} change(s) would be applied; nothing changed")
    } else if r.applied {
        format!("applied {n} change(s)")
    } else {
        format!("{n} change(s) not applied")
    });
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Actor, BackendStatus, PinStatus, ServiceStatus};

    fn web() -> ServiceStatus {
        ServiceStatus {
            name: "web".into(),
            vip: "10.10.1.100:80".into(),
            protocol: "tcp".into(),
            forwarding: "nat".into(),
            affinity: "flow".into(),
            split: Split::from([("blue".into(), 95.0), ("green".into(), 5.0)]),
            previous_split: Some(Split::from([("blue".into(), 100.0)])),
            pins: vec![
                PinStatus {
                    source: "10.20.0.0/16".into(),
                    group: "green".into(),
                },
                PinStatus {
                    source: "10.30.0.0/16".into(),
                    group: "blue".into(),
                },
            ],
            backends: vec![
                BackendStatus {
                    name: "blue-1".into(),
                    addr: "10.10.2.11:8080".into(),
                    group: "blue".into(),
                    weight: 100,
                    state: "serving".into(),
                    active_flows: 1234,
                    new_flows_per_s: 12.345,
                    bytes_per_s: 1_234_567.0,
                    ..Default::default()
                },
                BackendStatus {
                    name: "green-1".into(),
                    addr: "10.10.2.21:8080".into(),
                    group: "green".into(),
                    weight: 5,
                    state: "draining".into(),
                    active_flows: 3,
                    new_flows_per_s: 0.0,
                    bytes_per_s: 512.0,
                    ..Default::default()
                },
            ],
            differs_from_file: Some("split blue=100 -> blue=95 green=5".into()),
            panic_groups: vec![],
            deployment: None,
        }
    }

    #[test]
    fn health_columns_and_panic_for_checked_services() {
        let mut w = web();
        w.backends[0].health = "up".into();
        w.backends[0].effective_weight = 35;
        w.backends[0].last_probe = Some("ok: status 200 in 1.0 ms".into());
        w.backends[1].health = "down".into();
        w.backends[1].down_reason = Some("3 probe(s) failed in a row, the last: timeout".into());
        w.panic_groups = vec!["green".into()];
        let r = StatusResult {
            services: vec![w],
            ..Default::default()
        };
        let s = status(&r);
        assert!(s.contains("HEALTH") && s.contains("LAST PROBE"), "{s}");
        assert!(s.contains("up, slow start 35%"), "{s}");
        assert!(s.contains("green-1 is down: 3 probe(s) failed"), "{s}");
        assert!(s.contains("PANIC"), "{s}");
    }

    #[test]
    fn status_shows_every_field_of_a_service_and_its_backends() {
        let r = StatusResult {
            services: vec![web()],
            differs_from_file: true,
            config_file: "/etc/zdd/zdd.toml".into(),
        };
        let s = status(&r);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "service         web");
        assert_eq!(lines[1], "vip             10.10.1.100:80");
        assert!(s.contains("\nprotocol        tcp\n"), "{s}");
        assert!(s.contains("\nforwarding      nat\n"), "{s}");
        assert!(s.contains("\naffinity        flow\n"), "{s}");
        assert!(s.contains("\nsplit           blue=95% green=5%\n"), "{s}");
        assert!(
            s.contains("\nprevious split  blue=100% (`zdd rollback web` restores it)\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "\npins            10.20.0.0/16 -> green\n                10.30.0.0/16 -> blue\n"
            ),
            "{s}"
        );
        assert!(
            s.contains("\nconfig file     differs: split blue=100 -> blue=95 green=5\n"),
            "{s}"
        );
        let header = lines.iter().position(|l| l.starts_with("BACKEND")).unwrap();
        assert_eq!(
            &lines[header..header + 3],
            &[
                "BACKEND  ADDRESS          GROUP  WEIGHT  STATE     ACTIVE FLOWS  NEW FLOWS/S   BYTES/S",
                "blue-1   10.10.2.11:8080  blue      100  serving           1234         12.3  1.2 MB/s",
                "green-1  10.10.2.21:8080  green       5  draining             3          0.0   512 B/s",
            ]
        );
        assert!(
            lines.last().unwrap().starts_with(
                "note: the live state differs from /etc/zdd/zdd.toml (changes made with zdd"
            ),
            "{s}"
        );
        assert!(
            s.contains("`zdd apply -f /etc/zdd/zdd.toml --dry-run`"),
            "{s}"
        );
        assert!(
            !s.lines().any(|l| l.ends_with(' ')),
            "trailing spaces:\n{s}"
        );
    }

    #[test]
    fn status_of_a_fresh_service_and_of_none() {
        let mut w = web();
        w.previous_split = None;
        w.pins.clear();
        w.backends.clear();
        w.differs_from_file = None;
        let s = status(&StatusResult {
            services: vec![w],
            differs_from_file: false,
            config_file: "/etc/zdd/zdd.toml".into(),
        });
        assert!(
            s.contains("previous split  none (nothing to roll back to)"),
            "{s}"
        );
        assert!(s.contains("\npins            none\n"), "{s}");
        assert!(s.ends_with("\nno backends"), "{s}");
        assert!(!s.contains("config file"), "{s}");
        assert!(!s.contains("note:"), "{s}");
        assert_eq!(status(&StatusResult::default()), "no services");
    }

    #[test]
    fn human_falls_back_to_json_for_an_unknown_shape() {
        let v = serde_json::json!({"services": "not a list"});
        let s = human(Shape::Status, &v);
        assert!(s.contains("\"not a list\""), "{s}");
        let v = serde_json::to_value(StatusResult {
            services: vec![web()],
            ..Default::default()
        })
        .unwrap();
        assert!(human(Shape::Status, &v).starts_with("service         web"));
    }

    #[test]
    fn stats_keep_one_counter_a_line() {
        let r = StatsResult {
            global: [("forward".to_string(), 42u64), ("pass".to_string(), 7)].into(),
            services: vec![CounterRow {
                name: "web".into(),
                addr: "10.10.1.100:80/tcp".into(),
                packets: 10,
                bytes: 1000,
                new_flows: 2,
            }],
            backends: vec![CounterRow {
                name: "web/blue-1".into(),
                addr: "10.10.2.11:8080".into(),
                packets: 10,
                bytes: 1000,
                new_flows: 2,
            }],
        };
        let s = stats(&r);
        let lines: Vec<&str> = s.lines().collect();
        // The data path's order: pass before forward.
        assert_eq!(
            &lines[..3],
            &["COUNTER  VALUE", "pass         7", "forward     42"]
        );
        let g = [("zzz_new".to_string(), 1u64), ("drop".to_string(), 2)].into();
        assert_eq!(global_counters(&g), vec![("drop", 2), ("zzz_new", 1)]);
        assert!(
            s.contains(
                "SERVICE  ADDRESS             PACKETS  BYTES  NEW FLOWS\n\
                 web      10.10.1.100:80/tcp       10   1000          2"
            ),
            "{s}"
        );
        assert!(s.contains("web/blue-1  10.10.2.11:8080"), "{s}");
    }

    #[test]
    fn events_in_every_shape_the_agent_may_send() {
        let e = Event {
            seq: 12,
            time_ms: 1_700_000_000_250,
            who: Actor {
                via: "socket".into(),
                uid: Some(1000),
                pid: Some(42),
            },
            kind: "split".into(),
            service: Some("web".into()),
            message: "split blue=100 -> blue=95 green=5".into(),
            ..Default::default()
        };
        let line = event(&e);
        assert_eq!(
            line,
            "2023-11-14 22:13:20.250Z  uid 1000  split                web          split blue=100 -> blue=95 green=5"
        );
        let one = serde_json::to_value(&e).unwrap();
        let list = serde_json::json!([one.clone(), one.clone()]);
        let obj = serde_json::json!({ "events": [one.clone()] });
        assert_eq!(events_of(&one).unwrap().len(), 1);
        assert_eq!(events_of(&list).unwrap().len(), 2);
        assert_eq!(events_of(&obj).unwrap(), vec![e.clone()]);
        assert_eq!(human(Shape::Events, &list), format!("{line}\n{line}"));
        let start = Event {
            who: Actor {
                via: "agent".into(),
                ..Default::default()
            },
            kind: "start".into(),
            message: "started".into(),
            ..e
        };
        assert!(
            event(&start).contains("  agent     start"),
            "{}",
            event(&start)
        );
        assert_eq!(time_text(0), "1970-01-01 00:00:00.000Z");
    }

    #[test]
    fn changes_drains_and_applies() {
        let c = serde_json::json!({"message": "web: split blue=95% green=5%", "events": []});
        assert_eq!(human(Shape::Change, &c), "web: split blue=95% green=5%");
        let d = serde_json::to_value(DrainResult {
            message: "web/blue-1 drained".into(),
            remaining_flows: 2,
            waited_ms: 30_000,
            timed_out: true,
        })
        .unwrap();
        assert_eq!(
            human(Shape::Change, &d),
            "web/blue-1 drained\nwaited 30.0s; 2 active flow(s) left (timed out)"
        );
        let mut a = ApplyResult {
            changes: vec!["web: split blue=100 -> blue=50 green=50".into()],
            applied: false,
            dry_run: true,
        };
        assert_eq!(
            apply(&a),
            "web: split blue=100 -> blue=50 green=50\ndry run: 1 change(s) would be applied; nothing changed"
        );
        a.dry_run = false;
        a.applied = true;
        assert!(apply(&a).ends_with("\napplied 1 change(s)"));
        assert_eq!(
            apply(&ApplyResult::default()),
            "no changes: the live state is the file's"
        );
    }

    #[test]
    fn a_deployment_shows_under_its_service() {
        let d = DeploymentStatus {
            id: 3,
            service: "web".into(),
            kind: "canary".into(),
            state: "running".into(),
            steps: ["5", "25", "50", "100"].map(String::from).to_vec(),
            step: 1,
            phase: "observing".into(),
            step_ends_ms: Some(60_000),
            analysis: vec![crate::api::CheckResult {
                name: "failures".into(),
                verdict: "pass".into(),
                value: Some(0.1),
                detail: "0.1% ≤ baseline 0.2% + 1".into(),
            }],
            ..Default::default()
        };
        let mut w = web();
        w.deployment = Some(d.clone());
        let s = status_at(
            &StatusResult {
                services: vec![w],
                ..Default::default()
            },
            48_000,
        );
        assert!(
            s.contains(
                "\ndeployment      canary #3 running at step 2/4 (25%), next step in 12s; last \
                 analysis passed (failures pass)\n"
            ),
            "{s}"
        );
        let pause = Command::Pause {
            service: "web".into(),
        };
        assert_eq!(Shape::of(&pause), Shape::Deployment);
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(
            human(Shape::Deployment, &v),
            "web: canary #3 running at step 2/4 (25%)"
        );
        let list = Command::Deployments {
            service: None,
            limit: None,
        };
        assert_eq!(Shape::of(&list), Shape::Deployments);
        let v = serde_json::to_value(DeploymentsResult {
            active: vec![d],
            past: vec![],
        })
        .unwrap();
        assert!(human(Shape::Deployments, &v).starts_with("ID  SERVICE"));
    }

    #[test]
    fn rates_are_readable() {
        assert_eq!(bytes_rate(0.0), "0 B/s");
        assert_eq!(bytes_rate(999.0), "999 B/s");
        assert_eq!(bytes_rate(1000.0), "1.0 kB/s");
        assert_eq!(bytes_rate(1_234_567.0), "1.2 MB/s");
        assert_eq!(bytes_rate(9.9e12), "9.9 TB/s");
        assert_eq!(bytes_rate(-1.0), "0 B/s");
        assert_eq!(split_text(&Split::new()), "none");
    }
}
