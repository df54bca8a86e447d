//! `zdd-agent check` as a user runs it: exit status and message for a good and a bad config.
//! `zdd`'s deployment commands without an agent: usage errors, and following a deployment
//! that a fake agent moves along.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use zdd_agent::api::{
    self, CheckResult, DeploymentStatus, DeploymentsResult, Response, parse_request,
};
use zdd_tests::agent::workspace_bin;

/// A new empty folder of this process's own: the tests run in parallel threads, and two of
/// them may check configs of the same length (the old name used the length), so the name
/// comes from a counter.
fn fresh_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("zdd-cli-{}-{n}", std::process::id()));
    // Left over from an earlier run whose pid was the same.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    dir
}

fn check(text: &str) -> (i32, String, String) {
    let dir = fresh_dir();
    let path = dir.join("zdd.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(workspace_bin("zdd-agent"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = r#"
[agent]
interfaces = ["eth0", "eth1"]

[[services]]
name = "web"
vip = "10.10.1.100:80"
split = { blue = 95, green = 5 }

[[services.backends]]
name = "blue-1"
addr = "10.10.2.11:8080"
group = "blue"

[[services.backends]]
name = "green-1"
addr = "10.10.2.21:8080"
group = "green"
"#;

#[test]
fn check_accepts_a_good_config_and_summarises_it() {
    let (code, out, err) = check(GOOD);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok (1 service(s), 2 backend(s), interfaces eth0,eth1)"),
        "{out}"
    );
}

#[test]
fn check_names_the_place_of_each_mistake() {
    for (broken, want) in [
        (
            GOOD.replace("green = 5 }", "green = 15 }"),
            "services[web].split: shares add up to 110%",
        ),
        (
            GOOD.replace("10.10.2.21:8080", "10.10.2.21"),
            "services[web].backends[green-1].addr",
        ),
        (
            GOOD.replace("\"eth1\"", "\"eth0\""),
            "agent.interfaces[1]: \"eth0\" is listed twice",
        ),
        (GOOD.replace("vip =", "vipp ="), "unknown field `vipp`"),
        (
            GOOD.replace("group = \"green\"", "group = \"grene\""),
            "services[web].split.green",
        ),
    ] {
        let (code, _, err) = check(&broken);
        assert_eq!(code, 2, "{want}: {err}");
        assert!(err.contains(want), "want {want:?} in: {err}");
    }
    let (code, _, err) = {
        let out = Command::new(workspace_bin("zdd-agent"))
            .args(["check", "--config", "/nonexistent/zdd.toml"])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            (),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, 2);
    assert!(err.contains("cannot read /nonexistent/zdd.toml"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// `zdd` for deployments, without an agent: usage errors before anything is sent, and following
// a deployment that a fake agent (a thread on a socket) moves along.
// ---------------------------------------------------------------------------------------------

fn zdd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("zdd"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn deployment_arguments_are_usage_errors_before_any_connection() {
    // A socket that does not exist: a command that got as far as connecting would exit 1.
    let sock = ["--socket", "/nonexistent/zdd.sock"];
    for (args, want) in [
        (
            &["canary", "web", "--to", "green", "--steps", "5,25,10"][..],
            "the percentages must increase: 10 comes after 25",
        ),
        (
            &["canary", "web", "--to", "green", "--steps", "5,0.001"],
            "steps of 0.01%",
        ),
        (
            &[
                "canary",
                "web",
                "--to",
                "g",
                "--steps",
                "50",
                "--baseline",
                "g",
            ],
            "--baseline g is the group rolled out",
        ),
        (
            &["rolling", "web", "--batch", "0%", "--exec", "true"],
            "a batch is a number of backends",
        ),
        (&["pause"], "<SERVICE>"),
    ] {
        let all: Vec<&str> = sock.iter().chain(args).copied().collect();
        let (code, _, err) = zdd(&all);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    // Well-formed: they get as far as the (missing) agent.
    for args in [
        &[
            "canary",
            "web",
            "--to",
            "green",
            "--steps",
            "internal,5,100",
        ][..],
        &[
            "rolling", "web", "--batch", "1", "--exec", "true", "--detach",
        ],
        &["deployments", "web"],
        &["abort", "web"],
    ] {
        let all: Vec<&str> = sock.iter().chain(args).copied().collect();
        let (code, _, err) = zdd(&all);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("no socket at /nonexistent/zdd.sock"), "{err}");
    }
    let (code, out, _) = zdd(&["completions", "bash"]);
    assert_eq!(code, 0);
    for word in ["canary", "rolling", "deployments", "promote", "--steps"] {
        assert!(out.contains(word), "{word} missing from the completions");
    }
}

/// A fake agent: answers `canary` with `start`, then each `deployments` with the next of
/// `polls` (the last one again once they run out). Returns the socket's path.
fn fake_agent(name: &str, start: DeploymentStatus, polls: Vec<DeploymentStatus>) -> PathBuf {
    let path = fresh_dir().join(format!("{name}.sock"));
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut n = 0;
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let mut line = String::new();
            if BufReader::new(&s).read_line(&mut line).is_err() {
                continue;
            }
            let req = parse_request(&line).unwrap();
            let result = match req.cmd {
                api::Command::Canary { .. } => serde_json::to_value(&start).unwrap(),
                api::Command::Deployments { .. } => {
                    let d = polls[n.min(polls.len() - 1)].clone();
                    n += 1;
                    let (active, past) = if d.finished {
                        (vec![], vec![d])
                    } else {
                        (vec![d], vec![])
                    };
                    serde_json::to_value(DeploymentsResult { active, past }).unwrap()
                }
                c => panic!("unexpected {c:?}"),
            };
            let _ = writeln!(&s, "{}", Response::ok(req.id, result).to_line());
        }
    });
    path
}

fn canary_at(step: usize, state: &str) -> DeploymentStatus {
    DeploymentStatus {
        id: 9,
        service: "web".into(),
        kind: "canary".into(),
        state: state.into(),
        finished: matches!(state, "succeeded" | "rolled_back" | "aborted"),
        to: Some("green".into()),
        baseline: Some("blue".into()),
        steps: ["10", "50", "100"].map(String::from).to_vec(),
        step,
        phase: "observing".into(),
        duration_ms: step as u64 * 30_000,
        split: [
            ("blue".to_string(), [90.0, 50.0, 0.0][step.min(2)]),
            ("green".to_string(), [10.0, 50.0, 100.0][step.min(2)]),
        ]
        .into(),
        ..Default::default()
    }
}

#[test]
fn following_a_canary_prints_its_steps_and_exits_with_its_outcome() {
    let mut failed = canary_at(1, "rolled_back");
    failed.message = "step 2/3 (50%) failed: failures 4.2% > baseline 0.3% + 1".into();
    failed.analysis = vec![CheckResult {
        name: "failures".into(),
        verdict: "fail".into(),
        value: Some(4.2),
        detail: "4.2% > baseline 0.3% + 1".into(),
    }];
    let sock = fake_agent(
        "rollback",
        canary_at(0, "running"),
        vec![canary_at(0, "running"), canary_at(1, "running"), failed],
    );
    let sock = sock.to_str().unwrap();
    let (code, out, err) = zdd(&[
        "--socket",
        sock,
        "canary",
        "web",
        "--to",
        "green",
        "--steps",
        "10,50,100",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "[+0s] web: canary #9 started: to green (baseline blue), steps 10%, 50%, 100%",
            "[+0s] web: canary #9 step 1/3 (10%): observing; split blue=90% green=10%",
            "[+30s] web: canary #9 step 2/3 (50%): observing; split blue=50% green=50%",
            "[+30s] web: canary #9 analysis failed: failures fail: 4.2% > baseline 0.3% + 1",
            "web: canary #9 rolled back at step 2/3 (50%): step 2/3 (50%) failed: failures 4.2% \
             > baseline 0.3% + 1",
            "  failed: failures (4.2% > baseline 0.3% + 1)",
        ],
        "{out}"
    );

    let mut done = canary_at(3, "succeeded");
    done.message = "green has 100% of new flows".into();
    let sock = fake_agent("success", canary_at(0, "running"), vec![done]);
    let (code, out, err) = zdd(&[
        "--socket",
        sock.to_str().unwrap(),
        "--json",
        "canary",
        "web",
        "--to",
        "green",
        "--steps",
        "10,50,100",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // One status a line, each time it changed: the start and the end.
    let states: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<DeploymentStatus>(l).unwrap().state)
        .collect();
    assert_eq!(states, ["running", "succeeded"], "{out}");
}
