//! Progressive delivery in the lab, under continuous load, through the control socket a user's
//! `zdd` drives: canaries that complete, that are rolled back by a real Prometheus's query, by
//! the data path's own signals or by the user's check; a canary without enough traffic that
//! waits instead of promoting; rolling updates with the user's update command; a cohort
//! rollout with client affinity; and a canary that carries on after the agent is killed.
//! Failed-request counts are printed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use zdd_tests::{
    Agent, Lab, Node, VIP_V4, connect_from_and_get,
    control::result,
    lab_spec,
    load::{Load, LoadReport, LoadSpec},
    observability::{Alertmanager, Prometheus},
    require_privileged,
};

fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

/// "web" with every lab backend, checked over HTTP every 200 ms, with `extra` TOML (service
/// keys such as `affinity`, then sections such as `[[services.cohorts]]`) appended.
fn web(lab: &Lab, split: &str, keys: &str, sections: &str) -> String {
    let base = zdd_tests::agent::web_service(lab, split).replacen(
        "\n\n[[services.backends]]",
        &format!(
            "\n{keys}\n[services.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\n\
             timeout = \"150ms\"\njitter = \"20ms\"\nrise = 2\nfall = 2\nslow_start = \"1s\"\n\n[[services.backends]]"
        ),
        1,
    );
    format!("{base}\n{sections}\n")
}

fn ok(agent: &Agent, req: Value) -> Value {
    let line = req.to_string();
    let a = agent.ask(&line).unwrap();
    result(&a)
        .unwrap_or_else(|e| panic!("{line}: {e}\n{}", agent.log()))
        .clone()
}

/// The service's deployment with `id`, in progress or finished.
fn deployment(agent: &Agent, id: u64) -> Value {
    let r = ok(agent, json!({"cmd": "deployments", "service": "web"}));
    for list in ["active", "past"] {
        if let Some(d) = r[list]
            .as_array()
            .and_then(|v| v.iter().find(|d| d["id"] == id))
        {
            return d.clone();
        }
    }
    panic!("no deployment {id}: {r}");
}

/// Polls the deployment until `done` accepts it.
fn wait_deployment(
    agent: &Agent,
    id: u64,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let d = deployment(agent, id);
        if done(&d) {
            return d;
        }
        assert!(
            t.elapsed() < limit,
            "deployment {id}: not {what} after {limit:?}: {d:#}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finished(agent: &Agent, id: u64, limit: Duration) -> Value {
    wait_deployment(agent, id, limit, "finished", |d| d["finished"] == true)
}

fn split_of(agent: &Agent) -> Value {
    ok(agent, json!({"cmd": "status", "service": "web"}))["services"][0]["split"].clone()
}

fn events(agent: &Agent, kind: &str) -> Vec<Value> {
    ok(agent, json!({"cmd": "events", "limit": 1000}))
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

fn new_connections_only() -> LoadSpec {
    LoadSpec {
        keepalive: 0,
        ..LoadSpec::default()
    }
}

fn report(what: &str, r: &LoadReport, secs: f64) {
    let total = r.new_ok + r.new_failed + r.keepalive_ok + r.keepalive_failed;
    eprintln!(
        "{what}: {total} requests in {secs:.1}s ({:.0}/s): {} failed (new {} / keep-alive {}), {} keep-alive moved, by group {:?}, failed by group {:?}",
        total as f64 / secs,
        r.failed(),
        r.new_failed,
        r.keepalive_failed,
        r.moved,
        r.new_by_group,
        r.failed_by_group,
    );
}

/// Waits until every backend is up (probes pass), so a canary may start.
fn wait_all_up(agent: &Agent, lab: &Lab) {
    let t = Instant::now();
    for b in lab.backends() {
        while agent.backend_status("web", &b.name).unwrap()["health"] != "up" {
            assert!(t.elapsed() < Duration::from_secs(10), "{} not up", b.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_canary_to_a_healthy_green_completes_without_a_failed_request() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", "", "")).unwrap();
    wait_all_up(&agent, &lab);
    let load = Load::start(&lab, vip(), LoadSpec::default());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let d = ok(
        &agent,
        json!({"cmd": "canary", "service": "web", "to": "green",
               "steps": ["10", "50", "100"], "interval": "2s", "min_flows": 20}),
    );
    let id = d["id"].as_u64().unwrap();
    assert_eq!(d["state"], "running");
    assert_eq!(d["split"]["green"], 10.0, "{d}");
    let done = finished(&agent, id, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    let r = load.stop();
    report("canary 10,50,100", &r, t0.elapsed().as_secs_f64());
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(split_of(&agent)["green"], 100.0);
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
    assert_eq!(r.moved, 0, "{:?}", r.errors);
    // Every step passed on evidence: the last analysis has the new flows it needed.
    let nf = done["analysis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "new_flows")
        .cloned()
        .unwrap();
    assert_eq!(nf["verdict"], "pass", "{done:#}");
    assert_eq!(
        events(&agent, "canary_step").len(),
        1,
        "one step in between"
    );
    assert_eq!(events(&agent, "deployment_succeeded").len(), 1);
}

#[test]
fn a_canary_whose_responses_turn_to_errors_is_rolled_back_by_prometheus() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let analysis = "[[services.analysis]]\nname = \"error-ratio\"\n\
        query = 'sum(rate(zdd_lab_errors_total{group=\"{{group}}\"}[{{interval}}])) / sum(rate(zdd_lab_requests_total{group=\"{{group}}\"}[{{interval}}]))'\n\
        max = 0.05\n";
    let extra = "metrics = \"127.0.0.1:9580\"\nprometheus = \"http://127.0.0.1:9090\"\n\n\
                 [alerts]\nalertmanager = [\"http://127.0.0.1:9093\"]\n";
    let services = web(&lab, "blue = 100, green = 0", "", analysis);
    let agent = Agent::start_with(&lab, extra, &services).unwrap();
    let prom = Prometheus::for_lab(&lab, "127.0.0.1:9580").unwrap();
    let am = Alertmanager::start(&lab, Node::Edge).unwrap();
    prom.wait_targets_up(Duration::from_secs(15)).unwrap();
    wait_all_up(&agent, &lab);
    // New connections only: a keep-alive connection to green stays on green (its flow is
    // never moved), so after a rollback it would keep failing for as long as it lives.
    let load = Load::start(&lab, vip(), new_connections_only());
    let t0 = Instant::now();
    let interval = 4.0;
    let d = ok(
        &agent,
        json!({"cmd": "canary", "service": "web", "to": "green",
               "steps": ["10", "50", "100"], "interval": "4s", "min_flows": 20}),
    );
    let id = d["id"].as_u64().unwrap();
    // Step 1 passes; at step 2 green's answers turn into 500s (its probes still pass).
    wait_deployment(&agent, id, Duration::from_secs(20), "at step 2", |d| {
        d["step"] == 1 || d["finished"] == true
    });
    let broke = Instant::now();
    for g in ["green-1", "green-2"] {
        lab.set_server_control(g, "status=500\n").unwrap();
    }
    let done = finished(&agent, id, Duration::from_secs(30));
    let detect = broke.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let r = load.stop();
    let secs = t0.elapsed().as_secs_f64();
    report("canary rolled back by Prometheus", &r, secs);
    eprintln!(
        "errors began at step 2; rolled back {detect:.2}s later: {}",
        done["message"]
    );
    assert_eq!(done["state"], "rolled_back", "{done:#}");
    let failing: Vec<&Value> = done["analysis"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "fail")
        .collect();
    assert!(
        failing.iter().any(|c| c["name"] == "error-ratio"),
        "the query failed it: {done:#}"
    );
    assert!(done["message"].as_str().unwrap().contains("error-ratio"));
    assert_eq!(split_of(&agent)["blue"], 100.0);
    // Bounded by the canary's share (50%) of the requests during one interval, plus the
    // analysis's own latency and a scrape (2 s).
    let rate = (r.new_ok + r.new_failed) as f64 / secs;
    let bound = (rate * 0.5 * (interval + 2.0)) as u64;
    eprintln!(
        "failed requests {} (bound: {bound} = {rate:.0}/s × 50% × {}s)",
        r.failed(),
        interval + 2.0
    );
    assert!(r.failed() > 0, "green did fail some requests");
    assert!(r.failed() <= bound, "{} failed > {bound}", r.failed());
    assert_eq!(
        r.failed(),
        r.failed_by_group.get("green").copied().unwrap_or(0),
        "only green failed: {:?}",
        r.failed_by_group
    );
    // And the rollback reached Alertmanager, with its labels.
    let a = am
        .wait_for_alert("ZddCanaryRolledBack", Duration::from_secs(15))
        .unwrap();
    assert_eq!(a["labels"]["service"], "web", "{a:#}");
    assert_eq!(a["labels"]["group"], "green", "{a:#}");
    assert!(
        a["labels"]["reason"]
            .as_str()
            .unwrap()
            .contains("error-ratio")
    );
}

#[test]
fn a_canary_that_resets_connections_is_rolled_back_by_the_data_path_alone() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", "", "")).unwrap();
    wait_all_up(&agent, &lab);
    // Green resets every request while its /healthz passes: only the data path sees it.
    for g in ["green-1", "green-2"] {
        lab.set_server_control(g, "reset=1\n").unwrap();
    }
    let load = Load::start(&lab, vip(), new_connections_only());
    let t0 = Instant::now();
    let d = ok(
        &agent,
        json!({"cmd": "canary", "service": "web", "to": "green",
               "steps": ["10", "50", "100"], "interval": "2s", "min_flows": 20}),
    );
    let id = d["id"].as_u64().unwrap();
    let done = finished(&agent, id, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    let r = load.stop();
    let secs = t0.elapsed().as_secs_f64();
    report("canary rolled back by resets", &r, secs);
    assert_eq!(done["state"], "rolled_back", "{done:#}");
    assert_eq!(done["step"], 0, "failed at the first step: {done:#}");
    let failures = done["analysis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "failures")
        .cloned()
        .unwrap();
    assert_eq!(failures["verdict"], "fail", "{done:#}");
    assert!(failures["value"].as_f64().unwrap() > 50.0, "{failures}");
    // The event carries the numbers that failed it.
    let e = events(&agent, "canary_rolled_back");
    assert_eq!(e.len(), 1);
    let m = e[0]["message"].as_str().unwrap();
    assert!(m.contains("failures:") && m.contains("reset"), "{m}");
    assert!(e[0]["after"]["signals"].is_array(), "{:#}", e[0]);
    assert_eq!(split_of(&agent)["blue"], 100.0);
    let rate = (r.new_ok + r.new_failed) as f64 / secs;
    let bound = (rate * 0.10 * (2.0 + 1.0)) as u64;
    eprintln!("failed requests {} (bound {bound})", r.failed());
    assert!(r.failed() <= bound, "{} > {bound}", r.failed());
}

#[test]
fn a_canary_with_almost_no_traffic_extends_its_step_and_does_not_promote() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let services = web(
        &lab,
        "blue = 100, green = 0",
        "",
        "[services.canary]\nmin_flows = 50\nmax_extensions = 2\n",
    );
    let agent = Agent::start_with(&lab, ALERTS, &services).unwrap();
    let am = Alertmanager::start(&lab, Node::Edge).unwrap();
    wait_all_up(&agent, &lab);
    // A trickle: a few connections, far from 50 to green.
    let trickle = Load::start(
        &lab,
        vip(),
        LoadSpec {
            new_conn_threads: 1,
            new_conn_pause: Duration::from_millis(200),
            keepalive: 1,
            ..LoadSpec::default()
        },
    );
    let d = ok(
        &agent,
        json!({"cmd": "canary", "service": "web", "to": "green",
               "steps": ["10", "100"], "interval": "1s"}),
    );
    let id = d["id"].as_u64().unwrap();
    let paused = wait_deployment(&agent, id, Duration::from_secs(15), "paused", |d| {
        d["state"] == "paused" || d["finished"] == true
    });
    let r = trickle.stop();
    assert_eq!(paused["state"], "paused", "{paused:#}");
    assert_eq!(paused["step"], 0, "never promoted: {paused:#}");
    assert_eq!(split_of(&agent)["green"], 10.0);
    let ext = events(&agent, "canary_step_extended");
    assert_eq!(ext.len(), 2, "extended twice, then paused: {ext:#?}");
    assert!(
        ext[0]["message"].as_str().unwrap().contains("new flows"),
        "says why: {}",
        ext[0]["message"]
    );
    assert!(
        paused["message"]
            .as_str()
            .unwrap()
            .contains("not enough evidence")
    );
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
    // It stays there: no step passes blindly.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(deployment(&agent, id)["state"], "paused");
    // A person is needed: Alertmanager says so.
    let a = am
        .wait_for_alert("ZddDeploymentPaused", Duration::from_secs(15))
        .unwrap();
    assert_eq!(a["labels"]["reason"], "inconclusive", "{a:#}");
    // Abort: back to blue, the deployment ends, and so does the alert.
    let a = ok(&agent, json!({"cmd": "abort", "service": "web"}));
    assert_eq!(a["state"], "aborted", "{a:#}");
    assert_eq!(split_of(&agent)["blue"], 100.0);
    am.wait_until_gone("ZddDeploymentPaused", Duration::from_secs(15))
        .unwrap();
}

#[test]
fn a_check_command_that_fails_fails_the_step() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", "", "")).unwrap();
    wait_all_up(&agent, &lab);
    let load = Load::start(&lab, vip(), LoadSpec::default());
    let seen = lab.log_dir().join("check-env");
    let check = format!(
        "echo \"$ZDD_STEP $ZDD_STEP_LABEL $ZDD_GROUP $ZDD_BASELINE\" >> {}; [ \"$ZDD_STEP\" -lt 2 ] || {{ echo 'smoke test failed' >&2; exit 4; }}",
        seen.display()
    );
    let d = ok(
        &agent,
        json!({"cmd": "canary", "service": "web", "to": "green",
               "steps": ["10", "50", "100"], "interval": "1s", "min_flows": 5, "check": check}),
    );
    let id = d["id"].as_u64().unwrap();
    let done = finished(&agent, id, Duration::from_secs(20));
    let r = load.stop();
    assert_eq!(done["state"], "rolled_back", "{done:#}");
    assert_eq!(done["step"], 1, "step 1 passed, step 2 failed: {done:#}");
    let c = done["analysis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "check")
        .cloned()
        .unwrap();
    assert_eq!(c["verdict"], "fail");
    assert_eq!(c["value"], 4.0);
    assert!(
        c["detail"].as_str().unwrap().contains("smoke test failed"),
        "{c}"
    );
    let env = std::fs::read_to_string(&seen).unwrap();
    assert_eq!(
        env, "1 10% green blue\n2 50% green blue\n",
        "the step is in its environment"
    );
    assert_eq!(split_of(&agent)["blue"], 100.0);
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
}

/// The user's update step, as a rolling update runs it: asks the test (through files in
/// `dir`) to restart the backend's server with `--version v2`, and waits until it has. Fails
/// for backends listed in `dir/fail`.
fn update_command(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "if grep -qx \"$ZDD_BACKEND\" {d}/fail 2>/dev/null; then echo \"cannot update $ZDD_BACKEND\" >&2; exit 3; fi; \
         echo \"$ZDD_ADDR $ZDD_GROUP $ZDD_BATCH\" > {d}/req.$ZDD_BACKEND; \
         while [ ! -e {d}/done.$ZDD_BACKEND ]; do sleep 0.05; done; rm -f {d}/done.$ZDD_BACKEND"
    )
}

/// Serves update requests: for each `req.NAME`, lets keep-alive clients leave (`close=1`: the
/// next answer says `Connection: close`), restarts the server as v2, says done. Stops when
/// `stop` is set.
fn updater<'a>(
    lab: &'a Lab,
    dir: &'a Path,
    stop: &'a AtomicBool,
    log: &'a std::sync::Mutex<Vec<String>>,
) -> impl FnOnce() + Send + 'a {
    move || {
        while !stop.load(Ordering::Relaxed) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some(b) = name.strip_prefix("req.") else {
                    continue;
                };
                let b = b.to_string();
                let what = std::fs::read_to_string(e.path()).unwrap();
                std::fs::remove_file(e.path()).unwrap();
                lab.set_server_control(&b, "close=1\n").unwrap();
                std::thread::sleep(Duration::from_millis(300));
                lab.kill_server(&b).unwrap();
                lab.set_server_control(&b, "").unwrap();
                lab.start_server_with(&b, &["--version", "v2"]).unwrap();
                log.lock().unwrap().push(format!("{b} {}", what.trim()));
                std::fs::write(dir.join(format!("done.{b}")), "").unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `f` with the updates folder (for [`update_command`]) while an [`updater`] serves
/// it, the backends in `fail` refused by the command; returns the updates made, in order.
fn with_updater(lab: &Lab, fail: &[&str], f: impl FnOnce(&Path)) -> Vec<String> {
    let dir = lab.log_dir().join("updates");
    std::fs::create_dir_all(&dir).unwrap();
    if !fail.is_empty() {
        std::fs::write(dir.join("fail"), fail.join("\n") + "\n").unwrap();
    }
    let stop = AtomicBool::new(false);
    let log = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        sc.spawn(updater(lab, &dir, &stop, &log));
        // Also when an assertion fails: the scope waits for the updater.
        let _stop = StopOnDrop(&stop);
        f(&dir);
    });
    log.into_inner().unwrap()
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn version_of(lab: &Lab, backend: &str) -> String {
    let b = lab.backend(backend);
    let addr = b.http_v4();
    lab.in_ns(Node::Edge, || {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-D",
                "-",
                "-o",
                "/dev/null",
                &format!("http://{addr}/"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("X-Version: ").map(|v| v.trim().to_string()))
            .unwrap_or_default()
    })
}

#[test]
fn a_rolling_update_replaces_every_backend_without_a_failed_request() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 50, green = 50", "", "")).unwrap();
    wait_all_up(&agent, &lab);
    let updated = with_updater(&lab, &[], |dir| {
        let load = Load::start(&lab, vip(), LoadSpec::default());
        let t0 = Instant::now();
        let d = ok(
            &agent,
            json!({"cmd": "rolling", "service": "web", "batch": "1",
                   "exec": update_command(dir), "drain_timeout": "2s"}),
        );
        let id = d["id"].as_u64().unwrap();
        assert_eq!(d["steps"].as_array().unwrap().len(), 4, "{d:#}");
        let done = finished(&agent, id, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(300));
        let r = load.stop();
        report("rolling over 4 backends", &r, t0.elapsed().as_secs_f64());
        eprintln!(
            "rolling took {:.1}s",
            done["duration_ms"].as_f64().unwrap() / 1e3
        );
        assert_eq!(done["state"], "succeeded", "{done:#}");
        assert_eq!(r.failed(), 0, "{:?}", r.errors);
        assert_eq!(r.moved, 0, "{:?}", r.errors);
    });
    assert_eq!(
        updated,
        vec![
            format!("blue-1 {} blue 1", lab.backend("blue-1").http_v4()),
            format!("blue-2 {} blue 2", lab.backend("blue-2").http_v4()),
            format!("green-1 {} green 3", lab.backend("green-1").http_v4()),
            format!("green-2 {} green 4", lab.backend("green-2").http_v4()),
        ],
        "one at a time, with each backend's name, address, group and batch"
    );
    for b in lab.backends() {
        assert_eq!(version_of(&lab, &b.name), "v2", "{}", b.name);
        let s = agent.backend_status("web", &b.name).unwrap();
        assert_eq!(s["state"], "serving", "{s}");
        assert_eq!(s["health"], "up", "{s}");
    }
}

#[test]
fn a_failing_update_stops_the_rolling_update_with_the_service_serving() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent =
        Agent::start_with(&lab, ALERTS, &web(&lab, "blue = 50, green = 50", "", "")).unwrap();
    let am = Alertmanager::start(&lab, Node::Edge).unwrap();
    wait_all_up(&agent, &lab);
    let updated = with_updater(&lab, &["green-1"], |dir| {
        let load = Load::start(&lab, vip(), LoadSpec::default());
        let t0 = Instant::now();
        let d = ok(
            &agent,
            json!({"cmd": "rolling", "service": "web", "batch": "1",
                   "exec": update_command(dir), "drain_timeout": "1s"}),
        );
        let id = d["id"].as_u64().unwrap();
        let stopped = wait_deployment(&agent, id, Duration::from_secs(40), "stopped", |d| {
            d["state"] == "stopped" || d["finished"] == true
        });
        assert_eq!(stopped["state"], "stopped", "{stopped:#}");
        assert_eq!(stopped["step"], 2, "the third batch: {stopped:#}");
        let m = stopped["message"].as_str().unwrap();
        assert!(
            m.contains("green-1") && m.contains("cannot update green-1"),
            "{m}"
        );
        // Still serving, on the rest: green-1 takes no new flows.
        std::thread::sleep(Duration::from_secs(1));
        let s = agent.backend_status("web", "green-1").unwrap();
        assert_ne!(s["state"], "serving", "{s}");
        assert!(!events(&agent, "rolling_stopped").is_empty());
        // Someone is told: the alert names the backend and why.
        let a = am
            .wait_for_alert("ZddRollingStopped", Duration::from_secs(15))
            .unwrap();
        assert_eq!(a["labels"]["backend"], "green-1", "{a:#}");
        assert!(
            a["labels"]["reason"]
                .as_str()
                .unwrap()
                .contains("cannot update green-1"),
            "{a:#}"
        );
        // Fixed: resume retries the batch and the update completes; the alert resolves.
        std::fs::remove_file(dir.join("fail")).unwrap();
        let r = ok(&agent, json!({"cmd": "resume", "service": "web"}));
        assert_eq!(r["state"], "running");
        am.wait_until_gone("ZddRollingStopped", Duration::from_secs(15))
            .unwrap();
        let done = finished(&agent, id, Duration::from_secs(40));
        let r = load.stop();
        report(
            "rolling stopped at green-1, resumed",
            &r,
            t0.elapsed().as_secs_f64(),
        );
        assert_eq!(done["state"], "succeeded", "{done:#}");
        assert_eq!(r.failed(), 0, "{:?}", r.errors);
    });
    assert_eq!(updated.len(), 4, "{updated:?}");
}

/// `[alerts]` to the lab's Alertmanager (in the edge namespace, beside the agent).
const ALERTS: &str = "\n[alerts]\nalertmanager = [\"http://127.0.0.1:9093\"]\n";

#[test]
fn an_aborted_rolling_update_stops_and_says_what_stays_drained() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 50, green = 50", "", "")).unwrap();
    wait_all_up(&agent, &lab);
    let load = Load::start(&lab, vip(), LoadSpec::default());
    let d = ok(
        &agent,
        json!({"cmd": "rolling", "service": "web", "batch": "25%",
               "exec": "echo \"disk full on $ZDD_BACKEND\" >&2; exit 2", "drain_timeout": "1s"}),
    );
    let id = d["id"].as_u64().unwrap();
    assert_eq!(
        d["steps"],
        json!(["blue-1", "blue-2", "green-1", "green-2"]),
        "{d:#}"
    );
    let stopped = wait_deployment(&agent, id, Duration::from_secs(20), "stopped", |d| {
        d["state"] == "stopped"
    });
    assert!(
        stopped["message"]
            .as_str()
            .unwrap()
            .contains("disk full on blue-1"),
        "{stopped:#}"
    );
    let a = ok(&agent, json!({"cmd": "abort", "service": "web"}));
    assert_eq!(a["state"], "aborted", "{a:#}");
    let m = a["message"].as_str().unwrap();
    assert!(m.contains("blue-1 stays drained"), "{m}");
    // The service serves on the others; blue-1 stays out until someone undrains it.
    std::thread::sleep(Duration::from_millis(500));
    let r = load.stop();
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
    assert_ne!(
        agent.backend_status("web", "blue-1").unwrap()["state"],
        "serving"
    );
    assert_eq!(
        agent.backend_status("web", "blue-2").unwrap()["state"],
        "serving",
        "the next batch never started"
    );
    // Nothing runs any more.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(deployment(&agent, id)["state"], "aborted");
    ok(
        &agent,
        json!({"cmd": "backend_undrain", "service": "web", "name": "blue-1"}),
    );
}

#[test]
fn a_rolling_update_leaves_a_backend_drained_by_a_person_drained() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", "", "")).unwrap();
    wait_all_up(&agent, &lab);
    ok(
        &agent,
        json!({"cmd": "backend_drain", "service": "web", "name": "green-2"}),
    );
    let d = ok(
        &agent,
        json!({"cmd": "rolling", "service": "web", "batch": "1",
               "exec": "true", "drain_timeout": "1s"}),
    );
    let done = finished(&agent, d["id"].as_u64().unwrap(), Duration::from_secs(40));
    assert_eq!(done["state"], "succeeded", "{done:#}");
    for b in ["blue-1", "blue-2", "green-1"] {
        assert_eq!(agent.backend_status("web", b).unwrap()["state"], "serving");
    }
    assert_ne!(
        agent.backend_status("web", "green-2").unwrap()["state"],
        "serving",
        "updated, but still drained as before"
    );
}

#[test]
fn a_cohort_rollout_that_fails_takes_the_feature_away_from_everyone() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let services = web(
        &lab,
        "blue = 100, green = 0",
        "affinity = \"client\"",
        "[[services.cohorts]]\nname = \"internal\"\nsources = [\"10.0.1.0/24\"]\n",
    );
    let agent = Agent::start(&lab, &services).unwrap();
    wait_all_up(&agent, &lab);
    let load = Load::start(&lab, vip(), LoadSpec::default());
    let d = ok(
        &agent,
        json!({"cmd": "canary", "service": "web", "to": "green",
               "steps": ["internal", "100"], "interval": "2s", "min_flows": 5,
               "check": "[ \"$ZDD_STEP_LABEL\" != internal ] || exit 9"}),
    );
    let id = d["id"].as_u64().unwrap();
    // The whole client network is the cohort: green gets every new flow until the check.
    let st = ok(&agent, json!({"cmd": "status", "service": "web"}));
    assert_eq!(st["services"][0]["pins"][0]["group"], "green", "{st:#}");
    let done = finished(&agent, id, Duration::from_secs(20));
    let r = load.stop();
    assert_eq!(done["state"], "rolled_back", "{done:#}");
    let st = ok(&agent, json!({"cmd": "status", "service": "web"}));
    assert_eq!(st["services"][0]["pins"], json!([]), "{st:#}");
    assert_eq!(st["services"][0]["split"]["green"], 0.0);
    let back = lab.in_ns(Node::Client, || zdd_tests::connect_and_get(vip()).unwrap());
    assert_eq!(back.group, "blue", "nobody sees the feature any more");
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
}

const CLIENTS: u8 = 200;

/// 10.0.1.20 ..= 10.0.1.219; the internal cohort is 10.0.1.16/28 (.20 to .31 of them).
fn client_addrs() -> Vec<IpAddr> {
    (0..CLIENTS)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 1, 20 + i)))
        .collect()
}

fn internal(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V4(v) if (16..32).contains(&v.octets()[3]))
}

fn group_of_each_client(lab: &Lab) -> BTreeMap<IpAddr, String> {
    lab.in_ns(Node::Client, || {
        client_addrs()
            .into_iter()
            .map(|src| {
                let r = connect_from_and_get(src, vip()).unwrap();
                assert_eq!(r.status, 200);
                (src, r.group)
            })
            .collect()
    })
}

#[test]
fn a_cohort_rollout_goes_internal_then_ten_percent_then_all_with_each_user_keeping_its_version() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    for a in client_addrs() {
        lab.ip(
            Node::Client,
            &["addr", "add", &format!("{a}/32"), "dev", "eth0"],
        )
        .unwrap();
    }
    let services = web(
        &lab,
        "blue = 100, green = 0",
        "affinity = \"client\"",
        "[[services.cohorts]]\nname = \"internal\"\nsources = [\"10.0.1.16/28\"]\n",
    );
    let agent = Agent::start(&lab, &services).unwrap();
    wait_all_up(&agent, &lab);
    let load = Load::start(&lab, vip(), LoadSpec::default());
    let d = ok(
        &agent,
        json!({"cmd": "canary", "service": "web", "to": "green",
               "steps": ["internal", "10", "50", "100"], "interval": "1s", "min_flows": 5}),
    );
    let id = d["id"].as_u64().unwrap();
    // Each step is held (pause) while the clients are counted, then resumed.
    let mut seen: Vec<BTreeMap<IpAddr, String>> = Vec::new();
    for step in 0..3 {
        wait_deployment(&agent, id, Duration::from_secs(20), "at its step", |d| {
            d["step"] == step
        });
        ok(&agent, json!({"cmd": "pause", "service": "web"}));
        let d = deployment(&agent, id);
        assert_eq!(d["step"], step, "paused at step {step}: {d:#}");
        seen.push(group_of_each_client(&lab));
        ok(&agent, json!({"cmd": "resume", "service": "web"}));
    }
    let done = finished(&agent, id, Duration::from_secs(20));
    let r = load.stop();
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let green = |m: &BTreeMap<IpAddr, String>| -> Vec<IpAddr> {
        m.iter()
            .filter(|(_, g)| *g == "green")
            .map(|(a, _)| *a)
            .collect()
    };
    // Step 1: the internal cohort, and only it.
    let g0 = green(&seen[0]);
    assert_eq!(g0.len(), 12, "{g0:?}");
    assert!(g0.iter().all(internal), "{g0:?}");
    // Step 2: internal plus about 10% of the others.
    let g1 = green(&seen[1]);
    let public = g1.iter().filter(|a| !internal(a)).count();
    eprintln!(
        "cohort rollout: green at internal {}, at 10% {} ({public} of 188 others), at 50% {}",
        g0.len(),
        g1.len(),
        green(&seen[2]).len()
    );
    assert!((5..=40).contains(&public), "about 10% of 188: {public}");
    // Each client keeps its version from step to step.
    for w in seen.windows(2) {
        for a in green(&w[0]) {
            assert_eq!(w[1][&a], "green", "{a} went back to blue");
        }
    }
    assert!(green(&seen[2]).len() > g1.len());
    // Done: everyone on green, the cohort pins removed (green has all new flows anyway).
    let st = ok(&agent, json!({"cmd": "status", "service": "web"}));
    assert_eq!(st["services"][0]["split"]["green"], 100.0);
    assert_eq!(st["services"][0]["pins"], json!([]));
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
}

#[test]
fn a_canary_carries_on_at_its_step_after_the_agent_is_killed() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let services = web(&lab, "blue = 100, green = 0", "", "");
    let mut agent = Agent::start(&lab, &services).unwrap();
    wait_all_up(&agent, &lab);
    let load = Load::start(&lab, vip(), LoadSpec::default());
    let t0 = Instant::now();
    let d = ok(
        &agent,
        json!({"cmd": "canary", "service": "web", "to": "green",
               "steps": ["10", "50", "100"], "interval": "3s", "min_flows": 20}),
    );
    let id = d["id"].as_u64().unwrap();
    wait_deployment(&agent, id, Duration::from_secs(20), "at step 2", |d| {
        d["step"] == 1
    });
    agent.kill().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let agent = Agent::restart(agent, &services).unwrap();
    let d = deployment(&agent, id);
    assert_eq!(d["step"], 1, "resumed at its step: {d:#}");
    assert_eq!(d["state"], "running", "{d:#}");
    assert_eq!(split_of(&agent)["green"], 50.0);
    let done = finished(&agent, id, Duration::from_secs(30));
    let r = load.stop();
    report(
        "canary across an agent kill",
        &r,
        t0.elapsed().as_secs_f64(),
    );
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
    assert_eq!(r.moved, 0, "{:?}", r.errors);
    assert!(
        agent.log().contains("carry on after the restart"),
        "{}",
        agent.log()
    );
}

#[test]
fn a_rollback_to_a_baseline_that_lost_capacity_warns() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent =
        Agent::start_with(&lab, ALERTS, &web(&lab, "blue = 100, green = 0", "", "")).unwrap();
    let am = Alertmanager::start(&lab, Node::Edge).unwrap();
    wait_all_up(&agent, &lab);
    // Blue serves everything with blue-1 and blue-2 (capacity 200) for a moment.
    std::thread::sleep(Duration::from_millis(1500));
    let d = ok(
        &agent,
        json!({"cmd": "canary", "service": "web", "to": "green",
               "steps": ["10", "100"], "interval": "30s"}),
    );
    let id = d["id"].as_u64().unwrap();
    // While the canary runs it owns the split: a manual change is refused, precisely.
    let a = agent
        .ask(
            &json!({"cmd": "split", "service": "web", "split": {"blue": 50, "green": 50}})
                .to_string(),
        )
        .unwrap();
    assert_eq!(a["error"]["code"], "refused", "{a}");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("zdd abort web"),
        "{a}"
    );
    // Blue loses half its capacity during the canary; then the canary is aborted.
    lab.kill_server("blue-2").unwrap();
    let t = Instant::now();
    while agent.backend_status("web", "blue-2").unwrap()["health"] != "down" {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    let down = am
        .wait_for_alert("ZddBackendDown", Duration::from_secs(15))
        .unwrap();
    assert_eq!(
        (&down["labels"]["backend"], &down["labels"]["group"]),
        (&json!("blue-2"), &json!("blue")),
        "{down:#}"
    );
    let a = ok(&agent, json!({"cmd": "abort", "service": "web"}));
    assert_eq!(a["state"], "aborted");
    assert_eq!(deployment(&agent, id)["state"], "aborted");
    let w = events(&agent, "capacity_warning");
    assert_eq!(w.len(), 1, "{w:#?}");
    let m = w[0]["message"].as_str().unwrap();
    eprintln!("capacity warning: {m}");
    assert!(
        m.contains("group blue") && m.contains("100") && m.contains("200"),
        "{m}"
    );
    am.wait_for_alert("ZddRollbackCapacity", Duration::from_secs(15))
        .unwrap();
    am.wait_for_alert("ZddDeploymentFinished", Duration::from_secs(15))
        .unwrap();
}
