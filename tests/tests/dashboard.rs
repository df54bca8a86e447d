//! The Grafana dashboard (dist/grafana/zdd-dashboard.json) against the real thing: every
//! panel's query, with the dashboard's variables filled in, must return data from the real
//! Prometheus scraping a real agent in the lab, while load runs, a canary runs, and alerts go
//! to the real Alertmanager. A query that names a metric the agent does not export (or no
//! longer exports, or only when something goes wrong) fails here.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;
use zdd_tests::{
    Agent, Lab, Node, VIP_V4,
    control::result,
    lab_spec,
    load::{Load, LoadSpec},
    observability::{Alertmanager, Prometheus},
    require_privileged,
};

/// The agent's metrics endpoint: its address on the backends' side, where Prometheus in the
/// edge namespace reaches it.
const METRICS: &str = "10.0.2.1:9580";
/// How long each panel's query may take to return data.
const PANEL_TIMEOUT: Duration = Duration::from_secs(20);

fn dashboard() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/grafana/zdd-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// (panel title, refId, expr) of every query.
fn queries(d: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or("?").to_string(),
                t["refId"].as_str().unwrap_or("?").to_string(),
                t["expr"]
                    .as_str()
                    .expect("every target has an expr")
                    .to_string(),
            ));
        }
    }
    out
}

/// The expression as Grafana would send it for service `web` (`$__rate_interval` at a 1 s
/// scrape interval is at least 4 scrapes: 5 s).
fn substitute(expr: &str) -> String {
    expr.replace("${service}", "web")
        .replace("$service", "web")
        .replace("${__rate_interval}", "5s")
        .replace("$__rate_interval", "5s")
        .replace("${__interval}", "5s")
        .replace("$__interval", "5s")
        .replace("${__range}", "1m")
        .replace("$__range", "1m")
}

#[test]
fn the_dashboard_is_well_formed() {
    let d = dashboard();
    assert_eq!(d["schemaVersion"], 39);
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("DS_PROMETHEUS")["type"], "datasource");
    assert_eq!(var("DS_PROMETHEUS")["query"], "prometheus");
    let service = var("service");
    assert_eq!(service["type"], "query");
    assert_eq!(
        service["definition"],
        "label_values(zdd_service_split_percent, service)"
    );
    assert_eq!(service["datasource"]["uid"], "${DS_PROMETHEUS}");

    let mut ids = Vec::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        ids.push(p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id")));
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24 && g["h"].as_u64().unwrap() > 0, "{title}: {g}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}"));
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        }
    }
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "panel ids are unique");

    let exprs: Vec<String> = queries(&d).into_iter().map(|q| q.2).collect();
    for q in &exprs {
        let s = substitute(q);
        assert!(!s.contains('$'), "a variable the test does not fill: {q}");
    }
    // The panels the dashboard is for, by the metrics they read.
    for metric in [
        "zdd_service_split_percent",
        "zdd_backend_new_flows_total",
        "zdd_backend_active_flows",
        "zdd_backend_health",
        "zdd_backend_effective_weight",
        "zdd_backend_probe_latency_seconds",
        "zdd_backend_passive_attempts_total",
        "zdd_backend_passive_answered_total",
        "zdd_backend_passive_resets_total",
        "zdd_group_panic",
        "zdd_deployment_state",
        "zdd_deployment_step",
        "zdd_deployment_steps",
        "zdd_deployments_total",
        "zdd_alerts_sent_total",
        "zdd_alerts_failed_total",
        "zdd_alerts_dropped_total",
        "zdd_datapath_packets_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel reads {metric}"
        );
    }
}

#[test]
fn every_panel_of_the_dashboard_shows_data_from_a_live_agent() {
    require_privileged!();
    let t0 = Instant::now();
    let d = dashboard();
    let queries = queries(&d);
    let lab = Lab::new(lab_spec!()).unwrap();
    let alertmanager = Alertmanager::start(&lab, Node::Edge).unwrap();
    // [alerts] is a table of its own: it goes before the services.
    let services = format!(
        "[alerts]\nalertmanager = [\"{}\"]\n\n{}",
        alertmanager.url(),
        zdd_tests::agent::web_service(&lab, "blue = 100, green = 0").replacen(
            "\n\n[[services.backends]]",
            "\n[services.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\n\
             timeout = \"150ms\"\nrise = 2\nfall = 2\n\n[[services.backends]]",
            1,
        )
    );
    let agent = Agent::start_with(&lab, &format!("metrics = \"{METRICS}\""), &services).unwrap();
    let prom = Prometheus::for_lab(&lab, METRICS).unwrap();
    prom.wait_targets_up(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    let load = Load::start(
        &lab,
        SocketAddr::new(VIP_V4.parse().unwrap(), 80),
        LoadSpec {
            new_conn_threads: 2,
            new_conn_pause: Duration::from_millis(10),
            keepalive: 2,
            keepalive_pause: Duration::from_millis(20),
            max_duration: Duration::from_secs(60),
        },
    );
    // Some flows on blue before the canary, so its analysis has a baseline.
    std::thread::sleep(Duration::from_secs(1));
    let ready = t0.elapsed();

    let answer = agent
        .ask(
            r#"{"v":1,"id":1,"cmd":"canary","service":"web","to":"green","steps":["10","100"],"interval":"2s","min_flows":1}"#,
        )
        .unwrap();
    println!("canary: {answer}");
    if let Err(e) = result(&answer) {
        panic!("the agent refused the canary: {e}\n{}", agent.log());
    }

    // Every panel is polled from now on, in parallel, while the canary runs.
    let started = Instant::now();
    let results: Vec<(String, Result<usize, String>, Duration)> = std::thread::scope(|s| {
        let pollers: Vec<_> = queries
            .iter()
            .map(|(title, refid, expr)| {
                let prom = &prom;
                s.spawn(move || {
                    let q = substitute(expr);
                    let t = Instant::now();
                    let r = prom
                        .wait_for_series(&q, PANEL_TIMEOUT)
                        .map(|v| v.len())
                        .map_err(|e| format!("{e:#}"));
                    (format!("{title} [{refid}]: {q}"), r, t.elapsed())
                })
            })
            .collect();
        pollers
            .into_iter()
            .map(|p| p.join().expect("poller"))
            .collect()
    });
    let report = load.stop();
    // The alert counters above may all be 0: the deployment's end is an alert that must reach
    // the real Alertmanager, and be counted as sent.
    let sent = prom.wait_until("sum(zdd_alerts_sent_total)", Duration::from_secs(15), |v| {
        v.first().is_some_and(|s| s.1 > 0.0)
    });

    let deployments = agent
        .ask(r#"{"cmd":"deployments","service":"web"}"#)
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("{e:#}"));
    println!("deployments: {deployments}");
    let alerts = alertmanager.alerts().unwrap();
    let names: Vec<&str> = alerts
        .iter()
        .map(|x| x["labels"]["alertname"].as_str().unwrap_or("?"))
        .collect();
    println!("Alertmanager holds {} alert(s): {names:?}", alerts.len());
    let mut failed = Vec::new();
    for (what, r, took) in &results {
        match r {
            Ok(n) => println!("ok   {n:>3} series after {took:>9.3?}  {what}"),
            Err(e) => {
                println!("FAIL {e}");
                failed.push(what.clone());
            }
        }
    }
    println!(
        "{} queries of {} panels, polled for {:?}; lab ready after {ready:?}, whole test {:?}; \
         load: {} ok, {} failed",
        results.len(),
        panels(&d).iter().filter(|p| p["type"] != "row").count(),
        started.elapsed(),
        t0.elapsed(),
        report.new_ok + report.keepalive_ok,
        report.failed()
    );
    assert!(
        sent.is_ok() && !alerts.is_empty(),
        "no alert reached Alertmanager: {sent:?}, {names:?}\nagent log:\n{}",
        agent.log()
    );
    assert!(
        failed.is_empty(),
        "{} dashboard queries returned no data within {PANEL_TIMEOUT:?}:\n{}\nagent log:\n{}",
        failed.len(),
        failed.join("\n"),
        agent.log()
    );
}
