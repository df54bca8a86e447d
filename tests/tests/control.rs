//! The control socket, driven as `socat` would: JSON lines in and out of a running agent.
//! Changes take effect in the data path (checked with real connections), malformed requests
//! are answered precisely and change nothing, many clients at once are all served, and a
//! client that is not allowed to change anything can still read.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::Value;
use zdd_tests::{
    Agent, Lab, Node, VIP_V4, connect_and_get,
    control::{Client, result},
    lab_spec, require_privileged,
};

fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

fn web(lab: &Lab, split: &str) -> String {
    zdd_tests::agent::web_service(lab, split)
}

/// Groups that answered `n` new connections.
fn groups(lab: &Lab, n: usize) -> std::collections::BTreeMap<String, usize> {
    lab.in_ns(Node::Client, || {
        let mut g = std::collections::BTreeMap::new();
        for _ in 0..n {
            let r = connect_and_get(vip()).expect("a new connection");
            *g.entry(r.group).or_insert(0) += 1;
        }
        g
    })
}

fn code(answer: &Value) -> &str {
    answer["error"]["code"].as_str().unwrap_or("")
}

fn split_of(agent: &Agent) -> Value {
    let s = agent
        .ask(r#"{"id":1,"cmd":"status","service":"web"}"#)
        .unwrap();
    result(&s).unwrap()["services"][0]["split"].clone()
}

#[test]
fn split_switch_and_rollback_over_the_socket() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();

    let a = agent
        .ask(r#"{"v":1,"id":"s1","cmd":"switch","service":"web","to":"green"}"#)
        .unwrap();
    assert_eq!(a["id"], "s1");
    assert!(
        result(&a).unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("blue=100 green=0 -> blue=0 green=100"),
        "{a}"
    );
    assert_eq!(groups(&lab, 20).get("green"), Some(&20));

    let st = agent.ask(r#"{"id":2,"cmd":"status"}"#).unwrap();
    let svc = &result(&st).unwrap()["services"][0];
    assert_eq!(svc["previous_split"]["blue"], 100.0, "{st}");
    assert_eq!(result(&st).unwrap()["differs_from_file"], true, "{st}");

    let a = agent
        .ask(r#"{"id":3,"cmd":"split","service":"web","split":{"blue":50,"green":50}}"#)
        .unwrap();
    result(&a).unwrap();
    let a = agent
        .ask(r#"{"id":4,"cmd":"rollback","service":"web"}"#)
        .unwrap();
    result(&a).unwrap();
    assert_eq!(split_of(&agent)["green"], 100.0);
    let a = agent
        .ask(r#"{"id":5,"cmd":"rollback","service":"web"}"#)
        .unwrap();
    result(&a).unwrap();
    assert_eq!(split_of(&agent)["blue"], 100.0);
    assert_eq!(groups(&lab, 20).get("blue"), Some(&20));
    let a = agent
        .ask(r#"{"id":6,"cmd":"rollback","service":"web"}"#)
        .unwrap();
    assert_eq!(code(&a), "refused", "{a}");

    // Every change is an event with who made it.
    let ev = agent.ask(r#"{"id":7,"cmd":"events","limit":10}"#).unwrap();
    let kinds: Vec<&str> = result(&ev)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["start", "switch", "split", "rollback", "rollback"],
        "{ev}"
    );
    let e = &result(&ev).unwrap()[1];
    assert_eq!(e["who"]["uid"], 0);
    assert_eq!(e["who"]["via"], "socket");
}

#[test]
fn bad_requests_are_answered_precisely_and_change_nothing() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    let before = agent.ask(r#"{"cmd":"status"}"#).unwrap();

    let mut c = Client::connect(&agent.socket_path()).unwrap();
    for (req, want) in [
        ("this is not json", "bad_request"),
        (r#"{"id":1,"cmd":"launch"}"#, "unknown_command"),
        (r#"{"id":1,"v":7,"cmd":"status"}"#, "unsupported_version"),
        (
            r#"{"id":1,"cmd":"split","service":"web","split":"blue"}"#,
            "bad_request",
        ),
        (
            r#"{"id":1,"cmd":"split","service":"web","split":{"blue":60,"green":30}}"#,
            "invalid",
        ),
        (
            r#"{"id":1,"cmd":"split","service":"nope","split":{"blue":100}}"#,
            "unknown_service",
        ),
        (
            r#"{"id":1,"cmd":"switch","service":"web","to":"purple"}"#,
            "unknown_group",
        ),
        (
            r#"{"id":1,"cmd":"backend_set","service":"web","name":"blue-9","weight":5}"#,
            "unknown_backend",
        ),
        (
            r#"{"id":1,"cmd":"backend_set","service":"web","name":"blue-1","weight":70000}"#,
            "invalid",
        ),
        (
            r#"{"id":1,"cmd":"backend_add","service":"web","name":"x","addr":"nope","group":"blue"}"#,
            "invalid",
        ),
    ] {
        // The same connection keeps serving after each bad request.
        let a = c.ask(req).unwrap();
        assert_eq!(a["ok"], false, "{req}: {a}");
        assert_eq!(code(&a), want, "{req}: {a}");
        assert!(!a["error"]["message"].as_str().unwrap().is_empty());
    }

    // Oversized: answered, then the connection is closed.
    let mut big = Client::connect(&agent.socket_path()).unwrap();
    big.send_raw(&vec![b'x'; 70 * 1024]).unwrap();
    let a = big.read().unwrap().unwrap();
    assert_eq!(code(&a), "too_large", "{a}");

    // Half a line then silence: answered after the request timeout, then closed.
    let mut half = Client::connect(&agent.socket_path()).unwrap();
    half.send_raw(br#"{"cmd":"sta"#).unwrap();
    let t = Instant::now();
    let a = half.read().unwrap().unwrap();
    assert_eq!(code(&a), "timeout", "{a}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // Half a line then close: nothing to answer, nothing changes.
    let mut gone = Client::connect(&agent.socket_path()).unwrap();
    gone.send_raw(br#"{"cmd":"switch","service":"web","to":"gr"#)
        .unwrap();
    drop(gone);

    // 100 clients at once, while a stuck client holds its connection open.
    let _stuck = Client::connect(&agent.socket_path()).unwrap();
    let socket = agent.socket_path();
    let answers: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..100)
            .map(|i| {
                let socket = socket.clone();
                s.spawn(move || {
                    Client::connect(&socket)
                        .unwrap()
                        .ask(&format!(r#"{{"id":{i},"cmd":"status"}}"#))
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a["id"], i, "{a}");
        assert_eq!(a["ok"], true, "{a}");
    }

    let after = agent.ask(r#"{"cmd":"status"}"#).unwrap();
    assert_eq!(before["result"]["services"], after["result"]["services"]);
    assert_eq!(groups(&lab, 20).get("blue"), Some(&20));
}

#[test]
fn a_user_outside_socket_group_may_read_but_not_change() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    // Members of "users" (gid 100) may change; the client runs as nobody (uid 65534), which
    // is not a member, yet reaches the socket through a supplementary group of its process.
    let agent = Agent::start_with(
        &lab,
        "socket_group = \"users\"",
        &web(&lab, "blue = 100, green = 0"),
    )
    .unwrap();
    let socket = agent.socket_path();
    let meta = std::fs::metadata(&socket).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 100);
    // The lab's log directory must let nobody through to the socket.
    std::fs::set_permissions(lab.log_dir(), std::fs::Permissions::from_mode(0o711)).unwrap();

    let run_as_nobody = |req: &str| -> Value {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("python3");
        cmd.args([
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); \
             s.sendall((sys.argv[2]+'\\n').encode()); print(s.makefile().readline())",
            socket.to_str().unwrap(),
            req,
        ]);
        // SAFETY: setgroups, setgid and setuid between fork and exec, async-signal-safe; in
        // this order, since only root may set groups.
        unsafe {
            cmd.pre_exec(|| {
                let groups = [100 as libc::gid_t];
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let st = run_as_nobody(r#"{"id":1,"cmd":"status"}"#);
    assert_eq!(st["ok"], true, "{st}");
    let ch = run_as_nobody(r#"{"id":2,"cmd":"switch","service":"web","to":"green"}"#);
    assert_eq!(code(&ch), "permission_denied", "{ch}");
    assert!(
        ch["error"]["message"]
            .as_str()
            .unwrap()
            .contains("group users"),
        "{ch}"
    );
    assert_eq!(split_of(&agent)["blue"], 100.0);
    assert!(
        agent.log().contains("refused switch from uid 65534"),
        "{}",
        agent.log()
    );
}

#[test]
fn the_metrics_endpoint_exports_counters_states_and_the_split() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start_with(
        &lab,
        "metrics = \"127.0.0.1:9580\"",
        &web(&lab, "blue = 100, green = 0"),
    )
    .unwrap();
    assert_eq!(groups(&lab, 10).get("blue"), Some(&10));
    let scrape = |path: &str| -> String {
        use std::io::{Read, Write};
        lab.in_ns(Node::Edge, || {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9580").unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    };
    let m = scrape("/metrics");
    assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
    let sum = |name: &str, group: &str| -> u64 {
        m.lines()
            .filter(|l| l.starts_with(name) && l.contains(&format!("group=\"{group}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(sum("zdd_backend_new_flows_total", "blue"), 10, "{m}");
    assert_eq!(sum("zdd_backend_new_flows_total", "green"), 0, "{m}");
    assert!(
        m.contains("zdd_service_split_percent{service=\"web\",group=\"blue\"} 100.0"),
        "{m}"
    );
    assert!(m.contains("# TYPE zdd_backend_state gauge"), "{m}");
    assert!(m.contains("# EOF"), "{m}");
    assert!(scrape("/other").starts_with("HTTP/1.1 404"));
    drop(agent);
}
