//! Health checking in the lab, under load: a killed server, a failing /healthz, a backend
//! that drops packets, a slow probe, every backend of a group down (panic mode), and the way
//! back with slow start. Detection times and failed requests are printed.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::Value;
use zdd_tests::{
    Agent, Lab, Node, VIP_V4, connect_and_get,
    control::result,
    lab_spec,
    load::{Load, LoadSpec},
    observability::Alertmanager,
    require_privileged,
};

/// `[alerts]` to the lab's Alertmanager (in the edge namespace, beside the agent).
const ALERTS: &str = "\n[alerts]\nalertmanager = [\"http://127.0.0.1:9093\"]\n";

fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

/// "web" with every lab backend, checked over HTTP every 200 ms.
fn web(lab: &Lab, split: &str, health: &str) -> String {
    zdd_tests::agent::web_service(lab, split).replacen(
        "\n\n[[services.backends]]",
        &format!(
            "\n[services.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\n\
             timeout = \"150ms\"\njitter = \"20ms\"\nrise = 2\nfall = 2\n{health}\n\n[[services.backends]]"
        ),
        1,
    )
}

fn ok(agent: &Agent, req: &str) -> Value {
    let a = agent.ask(req).unwrap();
    result(&a)
        .unwrap_or_else(|e| panic!("{req}: {e}\n{}", agent.log()))
        .clone()
}

fn backend(agent: &Agent, name: &str) -> Value {
    agent.backend_status("web", name).unwrap()
}

/// Waits until `name`'s health is `want`; returns how long it took.
fn wait_health(agent: &Agent, name: &str, want: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let b = backend(agent, name);
        if b["health"] == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{name} not {want} after {limit:?}: {b}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// New connections now: backend → count.
fn spread(lab: &Lab, n: usize) -> BTreeMap<String, usize> {
    lab.in_ns(Node::Client, || {
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let r = connect_and_get(vip()).expect("a new connection");
            *m.entry(r.backend).or_insert(0) += 1;
        }
        m
    })
}

fn new_connections_only() -> LoadSpec {
    LoadSpec {
        keepalive: 0,
        ..LoadSpec::default()
    }
}

#[test]
fn a_killed_server_leaves_at_once_and_returns_with_slow_start() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(
        &lab,
        &web(&lab, "blue = 100, green = 0", "slow_start = \"3s\""),
    )
    .unwrap();
    wait_health(&agent, "blue-1", "up", Duration::from_secs(3));
    wait_health(&agent, "blue-2", "up", Duration::from_secs(3));
    let load = Load::start(&lab, vip(), new_connections_only());
    std::thread::sleep(Duration::from_millis(500));

    let killed = Instant::now();
    lab.kill_server("blue-1").unwrap();
    let detect = wait_health(&agent, "blue-1", "down", Duration::from_secs(3));
    let before = load.report();
    println!(
        "blue-1 killed: down after {detect:?} (fall 2 x interval 200 ms + timeout 150 ms = 550 ms \
         at most, plus jitter); {} request(s) failed before that",
        before.new_failed
    );
    assert!(killed.elapsed() < Duration::from_millis(1500), "{detect:?}");
    std::thread::sleep(Duration::from_secs(2));
    let after = load.report();
    assert_eq!(
        after.new_failed, before.new_failed,
        "new connections failed after blue-1 was down: {:?}",
        after.errors
    );
    let b = backend(&agent, "blue-1");
    assert!(
        b["down_reason"].as_str().unwrap().contains("connect"),
        "{b}"
    );
    assert_eq!(b["effective_weight"], 0);

    // Back: `rise` probes, then its share ramps over slow_start (3 s).
    lab.start_server("blue-1").unwrap();
    let back = Instant::now();
    let up = wait_health(&agent, "blue-1", "up", Duration::from_secs(3));
    let mut shares = Vec::new();
    // Sample until the ramp (3 s) is over, and a little more.
    while back.elapsed() < Duration::from_secs(5) {
        let s = spread(&lab, 60);
        let share = *s.get("blue-1").unwrap_or(&0) as f64 / 60.0;
        let w = backend(&agent, "blue-1")["effective_weight"]
            .as_u64()
            .unwrap();
        shares.push((back.elapsed().as_millis(), w, share));
        std::thread::sleep(Duration::from_millis(300));
    }
    println!(
        "blue-1 up again after {up:?}; (ms since restart, effective weight, share of new connections): {shares:?}"
    );
    let r = load.stop();
    assert_eq!(r.new_failed, before.new_failed, "{:?}", r.errors);
    let (first, last) = (shares[0], shares[shares.len() - 1]);
    assert!(first.1 < 60, "slow start did not start low: {shares:?}");
    assert_eq!(
        last.1, 100,
        "slow start did not reach the weight: {shares:?}"
    );
    assert!(last.2 > first.2, "the share did not ramp: {shares:?}");
}

#[test]
fn healthz_500_takes_a_backend_down_and_200_brings_it_back() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", "")).unwrap();
    wait_health(&agent, "blue-2", "up", Duration::from_secs(3));
    let load = Load::start(&lab, vip(), LoadSpec::default());
    lab.set_server_control("blue-2", "healthz=500").unwrap();
    let t = wait_health(&agent, "blue-2", "down", Duration::from_secs(3));
    let b = backend(&agent, "blue-2");
    assert!(
        b["down_reason"].as_str().unwrap().contains("status 500"),
        "{b}"
    );
    let s = spread(&lab, 30);
    assert_eq!(s.get("blue-2"), None, "{s:?}");
    lab.set_server_control("blue-2", "").unwrap();
    let back = wait_health(&agent, "blue-2", "up", Duration::from_secs(3));
    println!("/healthz 500: down after {t:?}; 200 again: up after {back:?}");
    // The server kept answering its clients: nothing failed, no keep-alive connection moved
    // (on_down = keep for tcp).
    let r = load.stop();
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
    assert_eq!(r.moved, 0, "{:?}", r.errors);
    let kinds: Vec<String> = ok(&agent, r#"{"cmd":"events","limit":10}"#)
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.contains(&"backend_down".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"backend_up".to_string()), "{kinds:?}");
}

#[test]
fn a_backend_that_drops_packets_goes_down_by_timeout() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", "")).unwrap();
    wait_health(&agent, "blue-1", "up", Duration::from_secs(3));
    let node = lab.backend("blue-1").node;
    let nft = |args: &[&str]| {
        let mut all = vec!["nft"];
        all.extend_from_slice(args);
        lab.exec(node, &all)
            .unwrap_or_else(|e| panic!("{all:?}: {e:#}"));
    };
    nft(&["add", "table", "inet", "zddtest"]);
    nft(&[
        "add",
        "chain",
        "inet",
        "zddtest",
        "input",
        "{ type filter hook input priority 0; }",
    ]);
    nft(&[
        "add", "rule", "inet", "zddtest", "input", "tcp", "dport", "8080", "drop",
    ]);
    let t = wait_health(&agent, "blue-1", "down", Duration::from_secs(3));
    let b = backend(&agent, "blue-1");
    assert!(
        b["down_reason"].as_str().unwrap().contains("timeout"),
        "{b}"
    );
    println!("packets dropped: down after {t:?} by the timeout path ({b})");
    let s = spread(&lab, 20);
    assert_eq!(s.get("blue-1"), None, "{s:?}");
    nft(&["delete", "table", "inet", "zddtest"]);
    wait_health(&agent, "blue-1", "up", Duration::from_secs(3));
}

#[test]
fn a_probe_slower_than_max_latency_fails() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(
        &lab,
        &web(&lab, "blue = 100, green = 0", "max_latency = \"40ms\""),
    )
    .unwrap();
    wait_health(&agent, "blue-1", "up", Duration::from_secs(3));
    lab.set_server_control("blue-1", "healthz_delay_ms=80")
        .unwrap();
    let t = wait_health(&agent, "blue-1", "down", Duration::from_secs(3));
    let b = backend(&agent, "blue-1");
    assert!(
        b["down_reason"]
            .as_str()
            .unwrap()
            .contains("slower than max_latency 40 ms"),
        "{b}"
    );
    println!("probe 80 ms > max_latency 40 ms: down after {t:?}");
}

#[test]
fn every_backend_of_a_group_down_panic_mode_keeps_forwarding() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start_with(&lab, ALERTS, &web(&lab, "blue = 100, green = 0", "")).unwrap();
    let am = Alertmanager::start(&lab, Node::Edge).unwrap();
    for b in ["blue-1", "blue-2", "green-1", "green-2"] {
        wait_health(&agent, b, "up", Duration::from_secs(3));
    }
    let load = Load::start(&lab, vip(), LoadSpec::default());
    // /healthz fails on both blue backends while they still serve their clients.
    lab.set_server_control("blue-1", "healthz=503").unwrap();
    lab.set_server_control("blue-2", "healthz=503").unwrap();
    wait_health(&agent, "blue-1", "down", Duration::from_secs(3));
    wait_health(&agent, "blue-2", "down", Duration::from_secs(3));
    let st = ok(&agent, r#"{"cmd":"status","service":"web"}"#);
    assert_eq!(
        st["services"][0]["panic_groups"],
        serde_json::json!(["blue"]),
        "{st}"
    );
    // Someone is told, by Alertmanager.
    let a = am
        .wait_for_alert("ZddPanicMode", Duration::from_secs(15))
        .unwrap();
    assert_eq!(a["labels"]["group"], "blue", "{a:#}");
    // Panic: blue keeps getting its flows rather than none.
    let s = spread(&lab, 20);
    assert_eq!(
        s.get("blue-1").unwrap_or(&0) + s.get("blue-2").unwrap_or(&0),
        20,
        "{s:?}"
    );
    // Health gates the control plane: green down too, a switch to it is refused.
    lab.set_server_control("green-1", "healthz=503").unwrap();
    lab.set_server_control("green-2", "healthz=503").unwrap();
    wait_health(&agent, "green-1", "down", Duration::from_secs(3));
    wait_health(&agent, "green-2", "down", Duration::from_secs(3));
    let a = agent
        .ask(r#"{"cmd":"switch","service":"web","to":"green"}"#)
        .unwrap();
    assert_eq!(a["error"]["code"], "refused", "{a}");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no healthy backend"),
        "{a}"
    );
    for b in ["blue-1", "blue-2", "green-1", "green-2"] {
        lab.set_server_control(b, "").unwrap();
    }
    wait_health(&agent, "blue-1", "up", Duration::from_secs(3));
    let r = load.stop();
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
    // Over: the panic alert is resolved (no longer active in Alertmanager).
    am.wait_until_gone("ZddPanicMode", Duration::from_secs(15))
        .unwrap();
    let events = ok(&agent, r#"{"cmd":"events","limit":30}"#).to_string();
    assert!(events.contains("\"kind\":\"panic\""), "{events}");
    assert!(events.contains("panic mode: group blue"), "{events}");
    assert!(agent.log().contains("PANIC"), "{}", agent.log());
}

#[test]
fn a_new_backend_takes_no_flow_before_its_first_probe_passes() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", "")).unwrap();
    wait_health(&agent, "blue-1", "up", Duration::from_secs(3));
    // A backend whose /healthz fails from the start never gets a new flow.
    lab.set_server_control("blue-2", "healthz=500").unwrap();
    ok(
        &agent,
        r#"{"cmd":"backend_remove","service":"web","name":"blue-2","now":true}"#,
    );
    ok(
        &agent,
        r#"{"cmd":"backend_add","service":"web","name":"blue-2","addr":"10.0.2.12:8080","group":"blue"}"#,
    );
    let b = backend(&agent, "blue-2");
    assert!(b["health"] == "starting" || b["health"] == "down", "{b}");
    std::thread::sleep(Duration::from_millis(300));
    let s = spread(&lab, 30);
    assert_eq!(s.get("blue-2"), None, "{s:?}");
    lab.set_server_control("blue-2", "").unwrap();
    wait_health(&agent, "blue-2", "up", Duration::from_secs(3));
    let s = spread(&lab, 40);
    assert!(s.get("blue-2").copied().unwrap_or(0) > 0, "{s:?}");
}

#[test]
fn a_backend_that_resets_its_clients_is_ejected_by_the_passive_signals() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start_with(
        &lab,
        ALERTS,
        &web(
            &lab,
            "blue = 100, green = 0",
            "outlier_ratio = 50\noutlier_min_attempts = 10\noutlier_window = \"2s\"\nejection = \"4s\"",
        ),
    )
    .unwrap();
    let am = Alertmanager::start(&lab, Node::Edge).unwrap();
    wait_health(&agent, "blue-1", "up", Duration::from_secs(3));
    wait_health(&agent, "blue-2", "up", Duration::from_secs(3));
    let load = Load::start(&lab, vip(), new_connections_only());
    std::thread::sleep(Duration::from_millis(500));
    // blue-1 resets every client connection, while its /healthz passes.
    lab.set_server_control("blue-1", "reset=1").unwrap();
    let t = wait_health(&agent, "blue-1", "ejected", Duration::from_secs(5));
    let at_ejection = load.report();
    let b = backend(&agent, "blue-1");
    assert!(
        b["down_reason"]
            .as_str()
            .unwrap()
            .contains("reset by the backend"),
        "{b}"
    );
    println!(
        "blue-1 resets its clients: ejected after {t:?}, {} request(s) failed before ({b})",
        at_ejection.new_failed
    );
    // Someone is told (well within the 4 s ejection: Alertmanager holds it at once).
    let a = am
        .wait_for_alert("ZddBackendEjected", Duration::from_secs(2))
        .unwrap();
    assert_eq!(a["labels"]["backend"], "blue-1", "{a:#}");
    // While it is ejected, nothing fails.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        load.report().new_failed,
        at_ejection.new_failed,
        "{:?}",
        load.report().errors
    );
    // Fixed while ejected: it comes back when the ejection is over, and stays.
    lab.set_server_control("blue-1", "").unwrap();
    let back = wait_health(&agent, "blue-1", "up", Duration::from_secs(8));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(backend(&agent, "blue-1")["health"], "up");
    let r = load.stop();
    println!(
        "back after {back:?}; {} request(s) failed in all",
        r.new_failed
    );
    assert_eq!(r.new_failed, at_ejection.new_failed, "{:?}", r.errors);
    let events = ok(&agent, r#"{"cmd":"events","limit":20}"#).to_string();
    assert!(
        events.contains("backend_ejected") && events.contains("backend_returned"),
        "{events}"
    );
}
