//! The `zdd` CLI end to end, as a user runs it against a running agent in the lab: every
//! command in human output and in `--json`, its exit code (0 done, 1 refused or failed, 2
//! usage), and its effect in the data path, checked with real connections from the client.
//! Also the two ways to test green before a switch: a cohort pin and a preview service.
//!
//! Each `zdd` run is printed as `$ zdd ARGS` and its output (see them with `--nocapture`).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr, TcpStream},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use zdd_tests::{
    Agent, Lab, Node, VIP_V4, VIP_V6,
    agent::{ZddRun, workspace_bin},
    connect_and_get, connect_from_and_get, http_get, lab_spec, require_privileged,
};

fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

/// The preview service's VIP: see [`a_preview_service_shows_green_while_the_main_vip_sends_everyone_to_blue`].
fn preview_vip() -> SocketAddr {
    SocketAddr::new(VIP_V6.parse().unwrap(), 8081)
}

/// The service "web" on [`vip`] with the lab's backends named in `names` (all: empty).
fn web(lab: &Lab, split: &str, names: &[&str]) -> String {
    let mut s = format!(
        "[[services]]\nname = \"web\"\nvip = \"{}\"\nsplit = {{ {split} }}\n",
        vip()
    );
    for b in lab.backends() {
        if names.is_empty() || names.contains(&b.name.as_str()) {
            s += &format!(
                "\n[[services.backends]]\nname = \"{}\"\naddr = \"{}\"\ngroup = \"{}\"\n",
                b.name,
                b.http_v4(),
                b.group
            );
        }
    }
    s
}

/// Runs `zdd --socket <agent's> ARGS`, prints it as a user would see it, and checks the
/// exit code.
fn zdd(agent: &Agent, args: &[&str], want_code: i32) -> ZddRun {
    let r = agent.zdd_run(args).unwrap();
    println!("$ zdd {}\n{}{}", args.join(" "), r.stdout, r.stderr);
    assert_eq!(
        r.code,
        want_code,
        "zdd {args:?}: exit {} (want {want_code})\nstdout: {}\nstderr: {}\nagent log:\n{}",
        r.code,
        r.stdout,
        r.stderr,
        agent.log()
    );
    r
}

/// `zdd ARGS` that must succeed: its stdout.
fn done(agent: &Agent, args: &[&str]) -> String {
    zdd(agent, args, 0).stdout
}

/// `zdd --json ARGS` that must succeed: its one line of JSON.
fn json(agent: &Agent, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = done(agent, &all);
    assert_eq!(out.lines().count(), 1, "one line of JSON: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `zdd ARGS` refused by the agent (exit 1), in text and in `--json`: the stderr of the text
/// run and the error object of the JSON run.
fn refused(agent: &Agent, args: &[&str], code: &str) -> String {
    let text = zdd(agent, args, 1);
    assert!(
        text.stderr.starts_with("error: ") && text.stderr.contains(&format!("({code})")),
        "zdd {args:?}: want a ({code}) error, got: {}",
        text.stderr
    );
    assert!(text.stdout.is_empty(), "{}", text.stdout);
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let j = zdd(agent, &all, 1);
    let v: Value = serde_json::from_str(&j.stdout).unwrap_or_else(|e| panic!("{e}: {}", j.stdout));
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        text.stderr
            .contains(v["error"]["message"].as_str().unwrap()),
        "the same message in both: {v} / {}",
        text.stderr
    );
    text.stderr
}

/// A usage error (exit 2): its stderr, with nothing sent to the agent.
fn usage(agent: &Agent, args: &[&str]) -> String {
    let before = agent.log().matches("(by uid").count();
    let r = zdd(agent, args, 2);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert_eq!(
        agent.log().matches("(by uid").count(),
        before,
        "a change was made"
    );
    r.stderr
}

/// `zdd --json status SERVICE`: that service.
fn service(agent: &Agent, name: &str) -> Value {
    let v = json(agent, &["status", name]);
    assert_eq!(v["services"].as_array().unwrap().len(), 1, "{v}");
    v["services"][0].clone()
}

fn backend(agent: &Agent, name: &str) -> Option<Value> {
    service(agent, "web")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
}

/// The split as `[("blue", 100.0), ...]`.
fn split(v: &Value) -> Vec<(String, f64)> {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(g, p)| (g.clone(), p.as_f64().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

fn pct(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
    pairs.iter().map(|(g, p)| (g.to_string(), *p)).collect()
}

/// What answered `n` new connections to `to` from the client, by `X-Group` (`by_group`) or
/// by `X-Backend`, from source `src` (None: the client's own address).
fn answered(
    lab: &Lab,
    to: SocketAddr,
    src: Option<IpAddr>,
    n: usize,
    by_group: bool,
) -> BTreeMap<String, usize> {
    lab.in_ns(Node::Client, || {
        let mut m = BTreeMap::new();
        for i in 0..n {
            let r = match src {
                Some(a) => connect_from_and_get(a, to),
                None => connect_and_get(to),
            }
            .unwrap_or_else(|e| panic!("connection {i} to {to} from {src:?}: {e:#}"));
            *m.entry(if by_group { r.group } else { r.backend })
                .or_insert(0) += 1;
        }
        m
    })
}

fn groups(lab: &Lab, n: usize) -> BTreeMap<String, usize> {
    answered(lab, vip(), None, n, true)
}

fn only(name: &str, n: usize) -> BTreeMap<String, usize> {
    BTreeMap::from([(name.to_string(), n)])
}

/// A keep-alive connection from the client that reached `backend` (new connections are made
/// until one does); returns it after one request.
fn keepalive_to(lab: &Lab, backend: &str) -> TcpStream {
    lab.in_ns(Node::Client, || {
        for _ in 0..50 {
            let mut s = TcpStream::connect_timeout(&vip(), Duration::from_secs(2)).unwrap();
            if http_get(&mut s, VIP_V4, "/").unwrap().backend == backend {
                return s;
            }
        }
        panic!("no new connection reached {backend}");
    })
}

fn still_on(lab: &Lab, s: &mut TcpStream, backend: &str) {
    let r = lab
        .in_ns(Node::Client, || http_get(s, VIP_V4, "/"))
        .unwrap();
    assert_eq!(r.backend, backend, "the keep-alive connection moved");
}

fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `zdd` child process (a stream, or a command that waits), its stdout read line by line
/// on a thread; killed when dropped.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    args: Vec<String>,
}

impl Running {
    fn start(agent: &Agent, args: &[&str]) -> Running {
        let mut child = agent
            .zdd_command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        println!("$ zdd {} &", args.join(" "));
        Running {
            child,
            lines,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn line(&self) -> String {
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("zdd {:?}: no line within 5s ({e})", self.args));
        println!("{l}");
        l
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the exit (at most `limit`): the exit code, when it exited, and stdout.
    fn wait(mut self, limit: Duration) -> (i32, Instant, String) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < limit,
                "zdd {:?} still running after {limit:?}",
                self.args
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let at = Instant::now();
        let mut out = String::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            out += &l;
            out.push('\n');
        }
        println!("{out}");
        (status.code().unwrap_or(-1), at, out)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn status_split_switch_and_rollback_from_the_cli() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", &[])).unwrap();

    // status, as a table and as JSON, for all services and for one.
    let out = done(&agent, &["status"]);
    for want in [
        "service         web",
        "vip             10.0.100.1:80",
        "split           blue=100% green=0%",
        "previous split  none (nothing to roll back to)",
        "pins            none",
        "BACKEND  ADDRESS",
        "STATE    ACTIVE FLOWS  NEW FLOWS/S  BYTES/S",
    ] {
        assert!(out.contains(want), "want {want:?} in:\n{out}");
    }
    assert_eq!(out.matches("serving").count(), 4, "{out}");
    assert_eq!(done(&agent, &["status", "web"]), out);
    let all = json(&agent, &["status"]);
    assert_eq!(all["differs_from_file"], false, "{all}");
    let web_ = service(&agent, "web");
    assert_eq!(web_, all["services"][0]);
    assert_eq!(
        split(&web_["split"]),
        pct(&[("blue", 100.0), ("green", 0.0)])
    );
    assert_eq!(web_["previous_split"], Value::Null);
    assert_eq!(web_["protocol"], "tcp");
    assert_eq!(web_["forwarding"], "nat");
    for b in web_["backends"].as_array().unwrap() {
        assert_eq!(
            (&b["state"], &b["weight"]),
            (&Value::from("serving"), &Value::from(100)),
            "{b}"
        );
    }
    let e = refused(&agent, &["status", "nope"], "unknown_service");
    assert!(e.contains("no service \"nope\"; services: web"), "{e}");

    // split: text, then JSON; new connections follow.
    let out = done(&agent, &["split", "web", "blue=50", "green=50"]);
    assert_eq!(
        out.trim(),
        "web: split blue=100 green=0 -> blue=50 green=50"
    );
    let g = groups(&lab, 40);
    assert!(
        g.get("blue") >= Some(&8) && g.get("green") >= Some(&8),
        "{g:?}"
    );
    let r = json(&agent, &["split", "web", "blue=0", "green=100%"]);
    assert_eq!(
        r["message"], "web: split blue=50 green=50 -> blue=0 green=100",
        "{r}"
    );
    assert_eq!(r["events"][0]["kind"], "split", "{r}");
    assert_eq!(r["events"][0]["who"]["uid"], 0, "{r}");
    assert_eq!(groups(&lab, 20), only("green", 20));

    // Malformed splits are usage errors (2), refused before the agent sees them.
    for (args, want) in [
        (
            &["split", "web", "blue=60", "green=30"][..],
            "the shares add up to 90%, not 100%",
        ),
        (&["split", "web", "blue"], "a share is GROUP=PERCENT"),
        (&["split", "web", "blue=101"], "outside 0..100"),
        (
            &["split", "web", "blue=99.995", "green=0.005"],
            "steps of 0.01%",
        ),
        (&["split", "web"], "required"),
        (&["--json", "split", "web", "blue=50"], "add up to 50%"),
    ] {
        let e = usage(&agent, args);
        assert!(e.contains(want), "{args:?}: want {want:?} in {e}");
    }
    // Refused by the agent (1): an unknown service or group.
    let e = refused(&agent, &["split", "nope", "blue=100"], "unknown_service");
    assert!(e.contains("no service \"nope\""), "{e}");
    let e = refused(
        &agent,
        &["split", "web", "blue=50", "purple=50"],
        "unknown_group",
    );
    assert!(
        e.contains("no group \"purple\"; groups: blue, green"),
        "{e}"
    );
    assert_eq!(
        split(&service(&agent, "web")["split"]),
        pct(&[("blue", 0.0), ("green", 100.0)])
    );

    // switch: text, then JSON.
    let out = done(&agent, &["switch", "web", "--to", "blue"]);
    assert_eq!(
        out.trim(),
        "web: split blue=0 green=100 -> blue=100 green=0"
    );
    assert_eq!(groups(&lab, 20), only("blue", 20));
    let r = json(&agent, &["switch", "web", "--to", "green"]);
    assert_eq!(
        r["message"], "web: split blue=100 green=0 -> blue=0 green=100",
        "{r}"
    );
    assert_eq!(r["events"][0]["kind"], "switch", "{r}");
    assert_eq!(groups(&lab, 20), only("green", 20));
    let e = refused(
        &agent,
        &["switch", "web", "--to", "purple"],
        "unknown_group",
    );
    assert!(e.contains("purple"), "{e}");
    usage(&agent, &["switch", "web"]);

    // status shows what a rollback restores.
    let s = service(&agent, "web");
    assert_eq!(
        split(&s["previous_split"]),
        pct(&[("blue", 100.0), ("green", 0.0)])
    );
    let out = done(&agent, &["status", "web"]);
    assert!(
        out.contains("previous split  blue=100% green=0% (`zdd rollback web` restores it)"),
        "{out}"
    );
    assert!(
        out.contains("config file     differs: web: split blue=100 green=0 -> blue=0 green=100"),
        "{out}"
    );
    assert!(out.contains("note: the live state differs from"), "{out}");
    assert_eq!(json(&agent, &["status"])["differs_from_file"], true);

    // rollback: text, then JSON, then back through the history until there is none.
    let out = done(&agent, &["rollback", "web"]);
    assert_eq!(
        out.trim(),
        "web: rolled back, split blue=0 green=100 -> blue=100 green=0"
    );
    assert_eq!(groups(&lab, 20), only("blue", 20));
    let r = json(&agent, &["rollback", "web"]);
    assert_eq!(
        r["message"], "web: rolled back, split blue=100 green=0 -> blue=0 green=100",
        "{r}"
    );
    assert_eq!(r["events"][0]["kind"], "rollback", "{r}");
    assert_eq!(groups(&lab, 20), only("green", 20));
    done(&agent, &["rollback", "web"]); // -> 50/50
    done(&agent, &["rollback", "web"]); // -> blue=100, as at the start
    let s = service(&agent, "web");
    assert_eq!(split(&s["split"]), pct(&[("blue", 100.0), ("green", 0.0)]));
    assert_eq!(s["previous_split"], Value::Null, "{s}");
    let e = refused(&agent, &["rollback", "web"], "refused");
    assert!(e.contains("web: no earlier split to roll back to"), "{e}");
    refused(&agent, &["rollback", "nope"], "unknown_service");
    assert_eq!(groups(&lab, 20), only("blue", 20));

    // A switch to a group with no backend that takes new flows: refused, unless --force.
    done(
        &agent,
        &["backend", "set", "web", "green-1", "--weight", "0"],
    );
    done(&agent, &["backend", "set", "web/green-2", "--weight", "0"]);
    let e = refused(&agent, &["switch", "web", "--to", "green"], "refused");
    assert!(
        e.contains("group green has no healthy backend that takes new flows")
            && e.contains("--force"),
        "{e}"
    );
    assert_eq!(groups(&lab, 10), only("blue", 10));
    let out = done(&agent, &["switch", "web", "--to", "green", "--force"]);
    assert!(out.contains("-> blue=0 green=100"), "{out}");
    // Green took every new flow earlier with a capacity of 200: now it has none up.
    assert!(
        out.contains(
            "WARNING: web: group green now takes 100% of new flows with a healthy capacity of 0"
        ),
        "{out}"
    );
    done(&agent, &["rollback", "web"]);
    assert_eq!(groups(&lab, 10), only("blue", 10));

    // Every change is an event, with who made it: JSON lines, and a line each as text.
    let out = done(&agent, &["--json", "events"]);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "start",
            "split",
            "split",
            "switch",
            "switch",
            "rollback",
            "rollback",
            "rollback",
            "rollback",
            "backend_set",
            "backend_set",
            "switch",
            "capacity_warning",
            "rollback"
        ],
        "{out}"
    );
    // Changes by the socket's peer; the warning is the agent's own observation.
    assert!(
        events[1..]
            .iter()
            .filter(|e| e["kind"] != "capacity_warning")
            .all(|e| e["who"]["uid"] == 0 && e["who"]["via"] == "socket"),
        "{out}"
    );
    let out = done(&agent, &["events"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), events.len(), "{out}");
    assert!(lines[0].contains(" agent     start "), "{out}");
    for (l, e) in lines.iter().zip(&events).skip(1) {
        let kind = e["kind"].as_str().unwrap();
        let who = if kind == "capacity_warning" {
            "agent"
        } else {
            "uid 0"
        };
        assert!(
            l.contains(&format!("  {who:<9} {kind} "))
                && l.ends_with(e["message"].as_str().unwrap()),
            "{l}"
        );
    }
}

#[test]
fn backend_add_set_drain_undrain_and_remove_from_the_cli() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(
        &lab,
        &web(
            &lab,
            "blue = 100, green = 0",
            &["blue-1", "green-1", "green-2"],
        ),
    )
    .unwrap();
    let blue2 = lab.backend("blue-2").http_v4().to_string();
    let backends = |n| answered(&lab, vip(), None, n, false);

    // add: text; the new backend takes new flows at once.
    let out = done(
        &agent,
        &["backend", "add", "web", "blue-2", &blue2, "--group", "blue"],
    );
    assert_eq!(
        out.trim(),
        format!("web: backend blue-2 {blue2} added to group blue (weight 100)")
    );
    let b = backends(40);
    assert!(
        b.get("blue-1") >= Some(&5) && b.get("blue-2") >= Some(&5),
        "{b:?}"
    );
    let e = refused(
        &agent,
        &["backend", "add", "web/blue-2", &blue2, "--group", "blue"],
        "invalid",
    );
    assert!(e.contains("web has a backend \"blue-2\" already"), "{e}");
    let e = usage(
        &agent,
        &[
            "backend",
            "add",
            "web",
            "blue-3",
            "10.0.2.99",
            "--group",
            "blue",
        ],
    );
    assert!(e.contains("\"10.0.2.99\" is not ip:port"), "{e}");
    refused(
        &agent,
        &[
            "backend",
            "add",
            "nope",
            "x",
            "10.0.2.99:80",
            "--group",
            "blue",
        ],
        "unknown_service",
    );

    // set: by NAME alone (one service has it), text; then SERVICE/NAME, JSON.
    let out = done(&agent, &["backend", "set", "blue-1", "--weight", "0"]);
    assert_eq!(out.trim(), "web: backend blue-1 weight 100 -> 0");
    assert_eq!(backends(10), only("blue-2", 10));
    let mut k = keepalive_to(&lab, "blue-2");
    let r = json(&agent, &["backend", "set", "web/blue-1", "--weight", "100"]);
    assert_eq!(r["message"], "web: backend blue-1 weight 0 -> 100", "{r}");
    assert_eq!(r["events"][0]["kind"], "backend_set", "{r}");
    let e = usage(
        &agent,
        &["backend", "set", "web/blue-1", "--weight", "65536"],
    );
    assert!(e.contains("a weight is a whole number in 0..=65535"), "{e}");
    let e = refused(
        &agent,
        &["backend", "set", "web", "blue-9", "--weight", "5"],
        "unknown_backend",
    );
    assert!(e.contains("service web has no backend \"blue-9\""), "{e}");
    let e = refused(
        &agent,
        &["backend", "set", "blue-9", "--weight", "5"],
        "unknown_backend",
    );
    assert!(
        e.contains("no service has a backend named \"blue-9\""),
        "{e}"
    );

    // drain: no new flows; the keep-alive connection goes on; status says draining and
    // counts it.
    let out = done(&agent, &["backend", "drain", "web", "blue-2"]);
    assert_eq!(out.trim(), "web: backend blue-2 draining");
    assert_eq!(backends(20), only("blue-1", 20));
    still_on(&lab, &mut k, "blue-2");
    eventually(
        "status counts the keep-alive connection",
        Duration::from_secs(5),
        || {
            let b = backend(&agent, "blue-2").unwrap();
            assert_eq!(b["state"], "draining", "{b}");
            b["active_flows"] == 1
        },
    );
    let out = done(&agent, &["status", "web"]);
    let row = out.lines().find(|l| l.starts_with("blue-2")).unwrap();
    assert_eq!(
        row.split_whitespace().take(6).collect::<Vec<_>>(),
        ["blue-2", blue2.as_str(), "blue", "100", "draining", "1"],
        "{out}"
    );

    // undrain: JSON; new flows again, and a second undrain is refused.
    let r = json(&agent, &["backend", "undrain", "web/blue-2"]);
    assert_eq!(r["message"], "web: backend blue-2 serving again", "{r}");
    assert_eq!(backend(&agent, "blue-2").unwrap()["state"], "serving");
    assert!(backends(30).get("blue-2") >= Some(&3));
    let e = refused(&agent, &["backend", "undrain", "blue-2"], "refused");
    assert!(e.contains("web: backend blue-2 is not draining"), "{e}");
    still_on(&lab, &mut k, "blue-2");

    // drain --wait that times out with the connection still open: exit 1, says how many.
    let r = zdd(
        &agent,
        &[
            "backend",
            "drain",
            "web",
            "blue-2",
            "--wait",
            "--timeout",
            "1s",
        ],
        1,
    );
    assert!(
        r.stdout
            .contains("web: backend blue-2: 1 flow(s) left after 1.")
            && r.stdout.contains("1 active flow(s) left (timed out)"),
        "{}",
        r.stdout
    );
    let e = usage(
        &agent,
        &["backend", "drain", "web", "blue-2", "--timeout", "1s"],
    );
    assert!(e.contains("--wait"), "{e}");

    // drain --wait (JSON) returns once the keep-alive connection closes.
    let mut wait = Running::start(
        &agent,
        &[
            "--json",
            "backend",
            "drain",
            "web",
            "blue-2",
            "--wait",
            "--timeout",
            "30s",
        ],
    );
    std::thread::sleep(Duration::from_millis(800));
    assert!(wait.running(), "drain --wait returned with a flow left");
    still_on(&lab, &mut k, "blue-2");
    assert_eq!(backends(10), only("blue-1", 10));
    let closed = Instant::now();
    drop(k);
    let (code, at, out) = wait.wait(Duration::from_secs(10));
    assert_eq!(code, 0, "{out}");
    let after = at.duration_since(closed);
    println!("drain --wait returned {after:?} after the last connection closed");
    assert!(after < Duration::from_secs(1), "{after:?}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["message"], "web: backend blue-2 drained: no flows left",
        "{v}"
    );
    assert_eq!(
        (&v["remaining_flows"], &v["timed_out"]),
        (&Value::from(0), &Value::from(false)),
        "{v}"
    );
    assert_eq!(backend(&agent, "blue-2").unwrap()["state"], "drained");
    // Text: an already drained backend returns at once.
    let out = done(&agent, &["backend", "drain", "blue-2", "--wait"]);
    assert!(
        out.starts_with("web: backend blue-2 drained: no flows left\nwaited ")
            && out.contains("; 0 active flow(s) left"),
        "{out}"
    );

    // remove: drains first, lets the keep-alive connection finish, then removes.
    done(&agent, &["backend", "undrain", "web", "blue-2"]);
    done(
        &agent,
        &["backend", "set", "web", "blue-1", "--weight", "0"],
    );
    let mut k = keepalive_to(&lab, "blue-2");
    done(
        &agent,
        &["backend", "set", "web", "blue-1", "--weight", "100"],
    );
    eventually(
        "status counts the keep-alive connection",
        Duration::from_secs(5),
        || backend(&agent, "blue-2").unwrap()["active_flows"] == 1,
    );
    let mut remove = Running::start(
        &agent,
        &["backend", "remove", "web", "blue-2", "--timeout", "20s"],
    );
    eventually(
        "the backend shows as removed",
        Duration::from_secs(5),
        || backend(&agent, "blue-2").is_some_and(|b| b["state"] == "removed"),
    );
    for _ in 0..10 {
        still_on(&lab, &mut k, "blue-2");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(remove.running(), "backend remove returned with a flow left");
    assert_eq!(backends(10), only("blue-1", 10));
    drop(k);
    let (code, _, out) = remove.wait(Duration::from_secs(5));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("web: backend blue-2 drained and removed\nwaited "),
        "{out}"
    );
    eventually("blue-2 is no longer listed", Duration::from_secs(3), || {
        backend(&agent, "blue-2").is_none()
    });
    // remove --now: JSON.
    let r = json(&agent, &["backend", "remove", "web/green-2", "--now"]);
    assert_eq!(r["message"], "web: backend green-2 removed", "{r}");
    assert!(backend(&agent, "green-2").is_none());
    usage(
        &agent,
        &[
            "backend",
            "remove",
            "web",
            "green-1",
            "--now",
            "--timeout",
            "5s",
        ],
    );
    refused(
        &agent,
        &["backend", "remove", "web", "green-2", "--now"],
        "unknown_backend",
    );
    assert_eq!(backends(10), only("blue-1", 10));
    assert_eq!(agent.stat("reselected").unwrap(), 0, "a flow was moved");
}

#[test]
fn a_cohort_pin_sends_testers_to_green_before_the_switch() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", &[])).unwrap();
    // The testers are 10.0.1.0/25 (the lab's client, 10.0.1.2, is one); 10.0.1.200 is
    // everyone else.
    lab.ip(
        Node::Client,
        &["addr", "add", "10.0.1.200/24", "dev", "eth0"],
    )
    .unwrap();
    let tester: IpAddr = lab.client_v4().into();
    let other: IpAddr = "10.0.1.200".parse().unwrap();
    let from = |src: IpAddr| answered(&lab, vip(), Some(src), 20, true);
    assert_eq!(from(tester), only("blue", 20));
    assert_eq!(from(other), only("blue", 20));

    let out = done(&agent, &["pin", "web", "10.0.1.0/25", "--group", "green"]);
    assert_eq!(out.trim(), "web: pin 10.0.1.0/25 -> green");
    assert_eq!(from(tester), only("green", 20));
    assert_eq!(from(other), only("blue", 20));
    let s = service(&agent, "web");
    assert_eq!(
        s["pins"],
        serde_json::json!([{"source": "10.0.1.0/25", "group": "green"}])
    );
    assert_eq!(split(&s["split"]), pct(&[("blue", 100.0), ("green", 0.0)]));
    let out = done(&agent, &["status", "web"]);
    assert!(
        out.contains("pins            10.0.1.0/25 -> green"),
        "{out}"
    );

    let e = usage(&agent, &["pin", "web", "10.0.1.7/25", "--group", "green"]);
    assert!(e.contains("did you mean 10.0.1.0/25"), "{e}");
    usage(&agent, &["pin", "web", "10.0.1.0/25"]);
    let e = refused(
        &agent,
        &["pin", "web", "10.0.1.0/25", "--group", "purple"],
        "unknown_group",
    );
    assert!(e.contains("no group \"purple\""), "{e}");
    refused(
        &agent,
        &["pin", "nope", "10.0.1.0/25", "--group", "green"],
        "unknown_service",
    );

    // unpin (JSON): the testers follow the split again.
    let r = json(&agent, &["unpin", "web", "10.0.1.0/25"]);
    assert_eq!(r["message"], "web: pin 10.0.1.0/25 removed", "{r}");
    assert_eq!(r["events"][0]["kind"], "unpin", "{r}");
    assert_eq!(from(tester), only("blue", 20));
    assert_eq!(service(&agent, "web")["pins"], serde_json::json!([]));
    let e = refused(&agent, &["unpin", "web", "10.0.1.0/25"], "invalid");
    assert!(e.contains("web: 10.0.1.0/25 is not pinned"), "{e}");

    // Green looked good to the testers: pin (JSON), then switch everyone.
    let r = json(&agent, &["pin", "web", "10.0.1.0/25", "--group", "green"]);
    assert_eq!(r["events"][0]["kind"], "pin", "{r}");
    done(&agent, &["switch", "web", "--to", "green"]);
    assert_eq!(from(other), only("green", 20));
    assert_eq!(from(tester), only("green", 20));
    done(&agent, &["unpin", "web", "10.0.1.0/25"]);
    assert_eq!(from(tester), only("green", 20));
    done(&agent, &["rollback", "web"]);
    assert_eq!(from(other), only("blue", 20));
}

/// The preview service is a second VIP whose split is green = 100. A nat backend's
/// address:port answers for one VIP (the data path matches replies by it), so the preview
/// cannot name green's `10.0.2.x:8080` again; the lab's servers listen on 8080 only (TCP, v4
/// and v6), so the preview reaches the same green servers by their IPv6 addresses, on an
/// IPv6 VIP (a VIP and its backends are of one address family), port 8081.
#[test]
fn a_preview_service_shows_green_while_the_main_vip_sends_everyone_to_blue() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", &[])).unwrap();
    let mut preview = format!(
        "\n[[services]]\nname = \"web-preview\"\nvip = \"{}\"\nsplit = {{ green = 100 }}\n",
        preview_vip()
    );
    for b in lab.backends().iter().filter(|b| b.group == "green") {
        preview += &format!(
            "\n[[services.backends]]\nname = \"{}\"\naddr = \"{}\"\ngroup = \"green\"\n",
            b.name,
            b.http_v6()
        );
    }
    // The file with the preview service added, applied with `zdd apply`.
    let file = lab.log_dir().join("zdd-with-preview.toml");
    let text = std::fs::read_to_string(agent.config_path()).unwrap() + &preview;
    std::fs::write(&file, &text).unwrap();
    let f = file.to_str().unwrap();
    let added = format!(
        "web-preview: service added ({} tcp, 2 backends, split green=100)",
        preview_vip()
    );
    let out = done(&agent, &["apply", "-f", f, "--dry-run"]);
    assert_eq!(
        out.trim(),
        format!("{added}\ndry run: 1 change(s) would be applied; nothing changed")
    );
    assert_eq!(
        json(&agent, &["status"])["services"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let out = done(&agent, &["apply", "-f", f]);
    assert_eq!(out.trim(), format!("{added}\napplied 1 change(s)"));

    let p = service(&agent, "web-preview");
    assert_eq!(split(&p["split"]), pct(&[("green", 100.0)]));
    assert_eq!(p["vip"], preview_vip().to_string());
    let out = done(&agent, &["status", "web-preview"]);
    assert!(out.contains("split           green=100%"), "{out}");
    // Testers reach green on the preview VIP; everyone on the main VIP still gets blue.
    assert_eq!(
        answered(&lab, preview_vip(), None, 20, true),
        only("green", 20)
    );
    assert_eq!(groups(&lab, 20), only("blue", 20));

    // Then the switch, and the rollback: the preview is untouched by both.
    done(&agent, &["switch", "web", "--to", "green"]);
    assert_eq!(groups(&lab, 20), only("green", 20));
    done(&agent, &["rollback", "web"]);
    assert_eq!(groups(&lab, 20), only("blue", 20));
    assert_eq!(
        answered(&lab, preview_vip(), None, 20, true),
        only("green", 20)
    );

    // The preview goes away with the file without it.
    let out = done(
        &agent,
        &["apply", "-f", agent.config_path().to_str().unwrap()],
    );
    assert!(out.contains("web-preview: service removed"), "{out}");
    refused(&agent, &["status", "web-preview"], "unknown_service");
}

#[test]
fn apply_events_stats_and_completions_from_the_cli() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let mut agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0", &[])).unwrap();
    assert_eq!(groups(&lab, 10), only("blue", 10));

    // stats: text, JSON, and from the pinned maps without the agent (--pin-dir).
    let out = done(&agent, &["stats"]);
    for want in [
        "COUNTER",
        "forward",
        "reselected",
        "SERVICE",
        "BACKEND",
        "NEW FLOWS",
    ] {
        assert!(out.contains(want), "want {want:?} in:\n{out}");
    }
    let row = out.lines().find(|l| l.starts_with("web ")).unwrap();
    assert_eq!(
        row.split_whitespace().nth(1),
        Some("10.0.100.1:80"),
        "{out}"
    );
    assert_eq!(
        row.split_whitespace().nth(4),
        Some("10"),
        "10 new flows: {out}"
    );
    assert!(out.lines().any(|l| l.starts_with("web/green-2 ")), "{out}");
    let s = agent.stats().unwrap();
    assert!(
        s.global["forward"] > 0 && s.global["new_flow"] >= 10,
        "{s:?}"
    );
    let new = |name: &str| {
        s.backends
            .iter()
            .find(|r| r.name == name)
            .unwrap()
            .new_flows
    };
    assert_eq!(new("web/blue-1") + new("web/blue-2"), 10, "{s:?}");
    assert_eq!(new("web/green-1") + new("web/green-2"), 0, "{s:?}");
    assert_eq!(
        agent
            .counters("service", "10.0.100.1:80/tcp")
            .unwrap()
            .map(|c| c.2),
        Some(10)
    );
    assert_eq!(
        agent.counters("service", "10.0.100.1:80/udp").unwrap(),
        None
    );
    let pin_dir = agent.pin_dir().to_path_buf();
    let pinned = |args: &[&str]| {
        let out = std::process::Command::new(workspace_bin("zdd"))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(args)
            .output()
            .unwrap();
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        println!(
            "$ zdd --pin-dir {} {}\n{o}{e}",
            pin_dir.display(),
            args.join(" ")
        );
        (out.status.code(), o.into_owned(), e.into_owned())
    };
    let (code, out, _) = pinned(&["stats"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("service 10.0.100.1:80/tcp packets "), "{out}");
    assert!(out.contains(" new_flows 10\n"), "{out}");
    let (code, out, _) = pinned(&["--json", "stats"]);
    assert_eq!(code, Some(0));
    let p: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["global"]["new_flow"], s.global["new_flow"], "{p}");
    let (code, _, e) = pinned(&["status"]);
    assert_eq!(code, Some(2));
    assert!(e.contains("--pin-dir works with `stats` only"), "{e}");

    // apply of a file with one invalid backend: refused, names it, nothing changes.
    let good = std::fs::read_to_string(agent.config_path())
        .unwrap()
        .replace("blue = 100, green = 0", "blue = 0, green = 100");
    let file = lab.log_dir().join("next.toml");
    let f = file.to_str().unwrap();
    std::fs::write(&file, good.replace("10.0.2.13:8080", "10.0.2.13:0")).unwrap();
    let before = json(&agent, &["status"]);
    let e = refused(&agent, &["apply", "-f", f], "invalid");
    assert!(e.contains("services[web].backends[green-1].addr"), "{e}");
    let e = refused(&agent, &["apply", "-f", f, "--dry-run"], "invalid");
    assert!(e.contains("backends[green-1]"), "{e}");
    assert_eq!(json(&agent, &["status"]), before);
    assert_eq!(groups(&lab, 10), only("blue", 10));
    let e = zdd(&agent, &["apply", "-f", "/nonexistent/zdd.toml"], 1).stderr;
    assert!(e.contains("cannot read /nonexistent/zdd.toml"), "{e}");
    usage(&agent, &["apply"]);

    // The file without the mistake: a dry run (JSON) says what would change and changes
    // nothing; then apply (JSON) applies it; a second apply has nothing to do.
    std::fs::write(&file, &good).unwrap();
    let change = "web: split blue=100 green=0 -> blue=0 green=100";
    let r = json(&agent, &["apply", "-f", f, "--dry-run"]);
    assert_eq!(
        r,
        serde_json::json!({"changes": [change], "applied": false, "dry_run": true})
    );
    assert_eq!(groups(&lab, 10), only("blue", 10));
    let r = json(&agent, &["apply", "--file", f]);
    assert_eq!(
        r,
        serde_json::json!({"changes": [change], "applied": true, "dry_run": false})
    );
    assert_eq!(groups(&lab, 10), only("green", 10));
    let out = done(&agent, &["apply", "-f", f]);
    assert_eq!(out.trim(), "no changes: the live state is the file's");

    // events: text and JSON lines.
    let out = done(&agent, &["events"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains(" agent     start "), "{out}");
    assert!(
        lines[1].contains("  uid 0     apply ")
            && lines[1].contains(" config applied: ")
            && lines[1].ends_with(change),
        "{out}"
    );
    let out = done(&agent, &["--json", "events", "-n", "1"]);
    let e: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (&e["kind"], &e["who"]["uid"]),
        (&Value::from("apply"), &Value::from(0)),
        "{e}"
    );
    assert_eq!(e["seq"], 2, "{e}");

    // events --follow: a change made while it runs is streamed as it happens.
    let follow = Running::start(&agent, &["--json", "events", "--follow", "-n", "1"]);
    let first: Value = serde_json::from_str(&follow.line()).unwrap();
    assert_eq!(first["seq"], 2, "{first}");
    let text = Running::start(&agent, &["events", "-f", "-n", "1"]);
    assert!(text.line().ends_with(&format!("config applied: {change}")));
    done(&agent, &["switch", "web", "--to", "blue"]);
    let next: Value = serde_json::from_str(&follow.line()).unwrap();
    assert_eq!(
        (&next["kind"], &next["seq"]),
        (&Value::from("switch"), &Value::from(3)),
        "{next}"
    );
    assert_eq!(
        next["message"],
        "web: split blue=0 green=100 -> blue=100 green=0"
    );
    let l = text.line();
    assert!(
        l.contains(" switch ") && l.ends_with("web: split blue=0 green=100 -> blue=100 green=0"),
        "{l}"
    );
    drop((follow, text));

    // status --watch: a status a line every interval, until killed.
    let watch = Running::start(
        &agent,
        &["--json", "status", "web", "--watch", "--interval", "200ms"],
    );
    let t = Instant::now();
    for _ in 0..3 {
        let v: Value = serde_json::from_str(&watch.line()).unwrap();
        assert_eq!(v["services"][0]["name"], "web", "{v}");
    }
    assert!(
        t.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t.elapsed()
    );
    drop(watch);
    usage(&agent, &["status", "--interval", "1s"]);

    // completions: a script, with or without an agent.
    let out = std::process::Command::new(workspace_bin("zdd"))
        .args(["--socket", "/nonexistent/zdd.sock", "completions", "bash"])
        .output()
        .unwrap();
    let script = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        script.contains("_zdd()") && script.contains("complete -F _zdd"),
        "{script}"
    );
    for word in ["backend", "rollback", "undrain", "--dry-run", "--follow"] {
        assert!(script.contains(word), "{word} not in the bash completions");
    }
    usage(&agent, &["completions", "cmd.exe"]);

    // A wrong socket path, and the agent stopped: exit 1 with what to do. The pinned maps
    // still forward, and `--pin-dir` still reads their counters.
    let out = std::process::Command::new(workspace_bin("zdd"))
        .args(["--socket", "/nonexistent/zdd.sock", "status"])
        .env_remove("ZDD_SOCKET")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.starts_with("error: no socket at /nonexistent/zdd.sock: is zdd-agent running?")
            && e.contains("--socket"),
        "{e}"
    );
    let last = agent.stats().unwrap().global["new_flow"];
    agent.stop().unwrap();
    let r = agent.zdd_run(&["switch", "web", "--to", "green"]).unwrap();
    println!("$ zdd switch web --to green\n{}", r.stderr);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("zdd-agent is not running") || r.stderr.contains("is zdd-agent running?"),
        "{r:?}"
    );
    assert_eq!(groups(&lab, 10), only("blue", 10));
    let (code, out, _) = pinned(&["--json", "stats"]);
    assert_eq!(code, Some(0));
    let p: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["global"]["new_flow"], last + 10, "{p}");
}
