//! Zero downtime, measured: under continuous load (new connections and keep-alive ones), a
//! switch and a rollback, agent restarts, drains and removals cost no failed request and
//! move no established connection.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::Value;
use zdd_tests::{
    Agent, Lab, Node, VIP_V4, connect_and_get,
    control::result,
    http_get, lab_spec,
    load::{Load, LoadSpec},
    require_privileged,
};

fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

fn web(lab: &Lab, split: &str) -> String {
    zdd_tests::agent::web_service(lab, split)
}

/// Sends `req` on a connection of its own, from a thread: for requests answered later
/// (`drain --wait`, `remove`). The thread returns when it was answered, and the answer.
fn ask_later(agent: &Agent, req: String) -> std::thread::JoinHandle<(Instant, Value)> {
    let socket = agent.socket_path();
    std::thread::spawn(move || {
        let a = zdd_tests::control::Client::connect(&socket)
            .unwrap()
            .ask(&req)
            .unwrap();
        (Instant::now(), a)
    })
}

fn ok(agent: &Agent, req: &str) -> Value {
    let a = agent.ask(req).unwrap();
    result(&a)
        .unwrap_or_else(|e| panic!("{req}: {e}\n{}", agent.log()))
        .clone()
}

/// The group a new connection reaches now.
fn group_now(lab: &Lab) -> String {
    lab.in_ns(Node::Client, || connect_and_get(vip()).unwrap().group)
}

fn assert_clean(r: &zdd_tests::load::LoadReport, what: &str) {
    println!("{what}: {r:?}");
    assert_eq!(r.failed(), 0, "{what}: failed requests: {:?}", r.errors);
    assert_eq!(
        r.moved, 0,
        "{what}: keep-alive connections moved: {:?}",
        r.errors
    );
    assert!(
        r.new_ok > 100 && r.keepalive_ok > 100,
        "{what}: too little load: {r:?}"
    );
}

#[test]
fn twenty_switches_and_rollbacks_under_load() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    let load = Load::start(&lab, vip(), LoadSpec::default());
    std::thread::sleep(Duration::from_millis(300));
    let mut took = Vec::new();
    for round in 0..20 {
        let t = Instant::now();
        ok(&agent, r#"{"cmd":"switch","service":"web","to":"green"}"#);
        took.push(t.elapsed());
        assert_eq!(group_now(&lab), "green", "round {round}: after the switch");
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        ok(&agent, r#"{"cmd":"rollback","service":"web"}"#);
        took.push(t.elapsed());
        assert_eq!(group_now(&lab), "blue", "round {round}: after the rollback");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = load.stop();
    assert_clean(&r, "20 x (switch, rollback)");
    assert!(
        r.new_by_group.get("green").copied().unwrap_or(0) > 0,
        "{r:?}"
    );
    took.sort();
    println!(
        "switch/rollback round trip: median {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
}

#[test]
fn five_restarts_under_load_keep_connections_and_the_split() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let mut agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    // A split set at run time, not in the file: it must survive every restart.
    ok(
        &agent,
        r#"{"cmd":"split","service":"web","split":{"blue":50,"green":50}}"#,
    );
    let load = Load::start(&lab, vip(), LoadSpec::default());
    std::thread::sleep(Duration::from_millis(300));
    let services = web(&lab, "blue = 100, green = 0");
    let tag = |log: String| {
        log.lines()
            .find_map(|l| {
                l.split("(tag ")
                    .nth(1)
                    .map(|t| t.trim_end_matches(')').to_string())
            })
            .unwrap_or_else(|| panic!("no program tag in the log:\n{log}"))
    };
    let first_tag = tag(agent.log());
    let variant = zdd_tests::agent::variant_object();
    // 2 x SIGTERM, 2 x SIGKILL, then a start of a rebuilt program (other bytes, same layout).
    let rounds = [
        (false, false),
        (true, false),
        (false, false),
        (true, false),
        (false, true),
    ];
    for (i, (kill, rebuilt)) in rounds.into_iter().enumerate() {
        if kill {
            agent.kill().unwrap();
        } else {
            agent.stop().unwrap();
        }
        // No agent at all for a moment: the pinned data path forwards.
        std::thread::sleep(Duration::from_millis(300));
        let env: &[(&str, &std::path::Path)] = if rebuilt {
            &[("ZDD_XDP_OBJECT", variant.as_path())]
        } else {
            &[]
        };
        agent = Agent::restart_with_env(agent, &services, env).unwrap();
        let log = agent.log();
        assert!(
            log.contains("(adopted pinned link)"),
            "restart {i}: not swapped in:\n{log}"
        );
        if rebuilt {
            assert!(log.contains("ZDD_XDP_OBJECT"), "{log}");
            assert_ne!(
                tag(log),
                first_tag,
                "the rebuilt program has the same instructions"
            );
        }
        let st = ok(&agent, r#"{"cmd":"status","service":"web"}"#);
        let split = &st["services"][0]["split"];
        assert_eq!(
            (split["blue"].as_f64(), split["green"].as_f64()),
            (Some(50.0), Some(50.0)),
            "restart {i}: {st}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let r = load.stop();
    assert_clean(
        &r,
        "5 restarts (2 x SIGTERM, 2 x SIGKILL, 1 x a rebuilt program)",
    );
    let g = &r.new_by_group;
    assert!(
        g.get("blue").copied().unwrap_or(0) > 20 && g.get("green").copied().unwrap_or(0) > 20,
        "{g:?}"
    );
}

/// Keep-alive connections on one backend: (backend, connections).
fn keepalive_on_one_backend(lab: &Lab, n: usize) -> (String, Vec<TcpStream>) {
    lab.in_ns(Node::Client, || {
        let mut by: std::collections::BTreeMap<String, Vec<TcpStream>> = Default::default();
        for _ in 0..n {
            let mut s = TcpStream::connect_timeout(&vip(), Duration::from_secs(2)).unwrap();
            let r = http_get(&mut s, VIP_V4, "/").unwrap();
            by.entry(r.backend).or_default().push(s);
        }
        by.into_iter().max_by_key(|(_, v)| v.len()).unwrap()
    })
}

#[test]
fn drain_wait_returns_when_the_last_connection_closes() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    let (backend, conns) = keepalive_on_one_backend(&lab, 8);
    let waiter = ask_later(
        &agent,
        format!(
            r#"{{"cmd":"backend_drain","service":"web","name":"{backend}","wait":true,"timeout":"30s"}}"#
        ),
    );
    // The drained backend takes no new connection while its old ones go on.
    std::thread::sleep(Duration::from_millis(800));
    for _ in 0..20 {
        let r = lab.in_ns(Node::Client, || connect_and_get(vip()).unwrap());
        assert_ne!(r.backend, backend);
    }
    let b = agent.backend_status("web", &backend).unwrap();
    assert_eq!(b["state"], "draining", "{b}\n{}", agent.log());
    assert_eq!(b["active_flows"], conns.len() as u64, "{b}");
    assert!(
        !waiter.is_finished(),
        "drain --wait returned with flows left"
    );
    let closed = Instant::now();
    drop(conns);
    let (answered, a) = waiter.join().unwrap();
    let r = result(&a).unwrap();
    assert_eq!(r["remaining_flows"], 0, "{a}");
    assert_eq!(r["timed_out"], false, "{a}");
    let after = answered.duration_since(closed);
    println!("drain --wait answered {after:?} after the last connection closed");
    assert!(after < Duration::from_secs(1), "{after:?}");
    let st = ok(&agent, r#"{"cmd":"status","service":"web"}"#);
    assert!(st.to_string().contains("\"state\":\"drained\""), "{st}");
}

#[test]
fn remove_lets_keepalive_connections_finish_without_a_reset() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    let (backend, mut conns) = keepalive_on_one_backend(&lab, 6);
    let waiter = ask_later(
        &agent,
        format!(r#"{{"cmd":"backend_remove","service":"web","name":"{backend}","timeout":"20s"}}"#),
    );
    // While the removal waits, the connections keep working on their backend.
    for round in 0..20 {
        for c in &mut conns {
            let r = lab
                .in_ns(Node::Client, || http_get(c, VIP_V4, "/"))
                .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
            assert_eq!(r.backend, backend);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(conns);
    let (_, a) = waiter.join().unwrap();
    assert_eq!(result(&a).unwrap()["remaining_flows"], 0, "{a}");
    // Removed shortly after (on the next count).
    let t = Instant::now();
    loop {
        let st = ok(&agent, r#"{"cmd":"status","service":"web"}"#);
        if !st.to_string().contains(&format!("\"name\":\"{backend}\"")) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(3), "still listed: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agent.stat("reselected").unwrap(), 0);
}

#[test]
fn apply_with_one_invalid_backend_changes_nothing() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    let before = ok(&agent, r#"{"cmd":"status"}"#);
    let mut text = std::fs::read_to_string(agent.config_path()).unwrap();
    text = text.replace("blue = 100, green = 0", "blue = 0, green = 100");
    text = text.replace("10.0.2.13:8080", "10.0.2.13:0");
    let req = serde_json::json!({"cmd": "apply", "config": text}).to_string();
    let a = agent.ask(&req).unwrap();
    assert_eq!(a["error"]["code"], "invalid", "{a}");
    let m = a["error"]["message"].as_str().unwrap();
    assert!(m.contains("backends[green-1].addr"), "{m}");
    assert_eq!(
        ok(&agent, r#"{"cmd":"status"}"#)["services"],
        before["services"]
    );
    assert_eq!(group_now(&lab), "blue");

    // The same file without the mistake: a dry run says what would change, then it applies.
    let text = text.replace("10.0.2.13:0", "10.0.2.13:8080");
    let dry = ok(
        &agent,
        &serde_json::json!({"cmd": "apply", "config": text, "dry_run": true}).to_string(),
    );
    assert_eq!(
        dry["changes"],
        serde_json::json!(["web: split blue=100 green=0 -> blue=0 green=100"])
    );
    assert_eq!(group_now(&lab), "blue");
    let done = ok(
        &agent,
        &serde_json::json!({"cmd": "apply", "config": text}).to_string(),
    );
    assert_eq!(done["applied"], true);
    assert_eq!(group_now(&lab), "green");
}

#[test]
fn a_corrupt_state_file_is_named_and_forwarding_goes_on() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let services = web(&lab, "blue = 100, green = 0");
    let mut agent = Agent::start(&lab, &services).unwrap();
    let _pins = zdd_tests::agent::PinsGuard(agent.pin_dir().to_path_buf());
    ok(&agent, r#"{"cmd":"switch","service":"web","to":"green"}"#);
    agent.stop().unwrap();
    let state = agent.state_dir().join("state.json");
    std::fs::write(&state, "{\"version\":1,\"live\":").unwrap();
    let e = Agent::restart(agent, &services)
        .err()
        .expect("a corrupt state must stop the start");
    let e = format!("{e:#}");
    assert!(
        e.contains(&state.display().to_string()) && e.contains("keeps forwarding"),
        "{e}"
    );
    // Nothing was wiped: the file is as it was, and the pinned data path forwards as the
    // last agent left it (green).
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "{\"version\":1,\"live\":"
    );
    assert_eq!(group_now(&lab), "green");
}

#[test]
fn undrain_cancels_a_pending_remove() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    let (backend, conns) = keepalive_on_one_backend(&lab, 4);
    let waiter = ask_later(
        &agent,
        format!(r#"{{"cmd":"backend_remove","service":"web","name":"{backend}","timeout":"20s"}}"#),
    );
    std::thread::sleep(Duration::from_millis(500));
    ok(
        &agent,
        &format!(r#"{{"cmd":"backend_undrain","service":"web","name":"{backend}"}}"#),
    );
    let (_, a) = waiter.join().unwrap();
    assert_eq!(a["error"]["code"], "refused", "{a}");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{a}"
    );
    let b = agent
        .backend_status("web", &backend)
        .unwrap_or_else(|e| panic!("{backend} was removed: {e:#}"));
    assert_eq!(b["state"], "serving", "{b}");
    drop(conns);
}

#[test]
fn run_time_changes_after_applying_the_config_file_survive_a_restart() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let services = web(&lab, "blue = 100, green = 0");
    let agent = Agent::start(&lab, &services).unwrap();
    // The file is edited and applied over the socket (not SIGHUP), then a switch follows.
    let edited = std::fs::read_to_string(agent.config_path())
        .unwrap()
        .replace("name = \"blue-1\"", "name = \"blue-1\"\nweight = 50");
    std::fs::write(agent.config_path(), &edited).unwrap();
    ok(
        &agent,
        &serde_json::json!({"cmd": "apply", "config": edited}).to_string(),
    );
    ok(&agent, r#"{"cmd":"switch","service":"web","to":"green"}"#);
    let services = services.replace("name = \"blue-1\"", "name = \"blue-1\"\nweight = 50");
    let agent = Agent::restart(agent, &services).unwrap();
    let st = ok(&agent, r#"{"cmd":"status","service":"web"}"#);
    assert_eq!(
        st["services"][0]["split"]["green"],
        100.0,
        "{st}\n{}",
        agent.log()
    );
    assert_eq!(group_now(&lab), "green");
}
