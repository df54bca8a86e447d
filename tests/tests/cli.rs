//! `zdd-agent check` as a user runs it: exit status and message for a good and a bad config.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

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
