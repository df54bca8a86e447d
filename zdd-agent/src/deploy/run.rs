//! What a deployment runs off the owner task: Prometheus queries and the user's commands
//! (`--check`, `--exec`). Their results come back to the owner as intents, so a slow
//! Prometheus or a long update never stalls a switch.

use std::time::Duration;

use crate::{api::CheckResult, prom::PromClient};

/// One `[[services.analysis]]` query, rendered for a step.
#[derive(Clone, Debug)]
pub struct Query {
    pub name: String,
    pub promql: String,
    pub max: Option<f64>,
    pub min: Option<f64>,
}

/// A user's command: `sh -c line`, as `uid`/`gid`, with `env`, killed after `timeout`.
#[derive(Clone, Debug)]
pub struct UserCommand {
    pub line: String,
    pub env: Vec<(String, String)>,
    pub uid: u32,
    pub gid: u32,
    pub timeout: Duration,
}

/// Runs the step's queries (concurrently) and its check command.
pub async fn analyse(
    prom: Option<PromClient>,
    queries: Vec<Query>,
    check: Option<UserCommand>,
) -> Vec<CheckResult> {
    let runs = queries.into_iter().map(|q| {
        let prom = prom.clone();
        async move { query(prom, q).await }
    });
    let mut out = futures_join_all(runs).await;
    if let Some(c) = check {
        out.push(match run_command(&c).await {
            Ok(_) => CheckResult {
                name: "check".into(),
                verdict: "pass".into(),
                value: Some(0.0),
                detail: format!("`{}` exited 0", c.line),
            },
            Err(e) => CheckResult {
                name: "check".into(),
                verdict: "fail".into(),
                value: e.status.map(f64::from),
                detail: format!("`{}` {}", c.line, e.message),
            },
        });
    }
    out
}

/// Awaits all of them, in order (a few queries: no need for a crate).
async fn futures_join_all<F: std::future::Future<Output = CheckResult> + Send + 'static>(
    runs: impl Iterator<Item = F>,
) -> Vec<CheckResult> {
    let handles: Vec<_> = runs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        match h.await {
            Ok(r) => out.push(r),
            Err(e) => out.push(CheckResult {
                name: "analysis".into(),
                verdict: "inconclusive".into(),
                value: None,
                detail: format!("a query task failed: {e}"),
            }),
        }
    }
    out
}

async fn query(prom: Option<PromClient>, q: Query) -> CheckResult {
    let mk = |verdict: &str, value: Option<f64>, detail: String| CheckResult {
        name: q.name.clone(),
        verdict: verdict.into(),
        value,
        detail,
    };
    let Some(prom) = prom else {
        return mk(
            "inconclusive",
            None,
            "no Prometheus configured (agent.prometheus)".into(),
        );
    };
    match prom.query(&q.promql).await {
        // Prometheus unreachable or the query broken: no evidence, never a pass.
        Err(e) => mk("inconclusive", None, format!("query failed: {e}")),
        Ok(None) => mk(
            "inconclusive",
            None,
            format!("no data for `{}` (too little traffic?)", q.promql),
        ),
        Ok(Some(v)) => {
            let (ok, bound) = match (q.max, q.min) {
                (Some(m), _) => (v <= m, format!("≤ max {m}")),
                (None, Some(m)) => (v >= m, format!("≥ min {m}")),
                (None, None) => (true, "no threshold".into()),
            };
            mk(
                if ok { "pass" } else { "fail" },
                Some(v),
                format!("{v:.4} {} {bound}", if ok { "is" } else { "is not" }),
            )
        }
    }
}

/// How a command failed.
#[derive(Clone, Debug)]
pub struct CommandError {
    /// Its exit status, when it exited.
    pub status: Option<i32>,
    pub message: String,
}

/// Runs a user's command in its own process group (a timeout kills all of it). Returns the
/// tail of its output.
pub async fn run_command(c: &UserCommand) -> Result<String, CommandError> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&c.line)
        .envs(c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if c.uid != euid {
        // As the user who asked for it, never as the agent's root.
        cmd.gid(c.gid).uid(c.uid);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| CommandError {
        status: None,
        message: format!("could not be started: {e}"),
    })?;
    let pid = child.id();
    match tokio::time::timeout(c.timeout, child.wait_with_output()).await {
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: signals the process group the child leads (process_group(0)).
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
            Err(CommandError {
                status: None,
                message: format!("did not finish within {:?} (killed)", c.timeout),
            })
        }
        Ok(Err(e)) => Err(CommandError {
            status: None,
            message: format!("failed: {e}"),
        }),
        Ok(Ok(out)) => {
            let tail = tail(&out.stderr).or_else(|| tail(&out.stdout));
            if out.status.success() {
                Ok(tail.unwrap_or_default())
            } else {
                let what = match out.status.code() {
                    Some(n) => format!("exited with status {n}"),
                    None => "was killed by a signal".to_string(),
                };
                Err(CommandError {
                    status: out.status.code(),
                    message: match tail {
                        Some(t) => format!("{what}: {t}"),
                        None => what,
                    },
                })
            }
        }
    }
}

/// The last line or so of a command's output, for a message.
fn tail(b: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(b);
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let start = s.len().saturating_sub(300);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    Some(s[start..].replace('\n', " | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(line: &str, timeout_ms: u64) -> UserCommand {
        UserCommand {
            line: line.into(),
            env: vec![("ZDD_STEP".into(), "2".into())],
            // SAFETY: no preconditions.
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[tokio::test]
    async fn commands_pass_fail_and_time_out() {
        assert_eq!(
            run_command(&cmd("echo step $ZDD_STEP", 5000))
                .await
                .unwrap(),
            "step 2"
        );
        let e = run_command(&cmd("echo broken >&2; exit 3", 5000))
            .await
            .unwrap_err();
        assert_eq!(e.status, Some(3));
        assert!(e.message.contains("status 3: broken"), "{}", e.message);
        let t0 = std::time::Instant::now();
        let e = run_command(&cmd("sleep 5 & sleep 5", 200))
            .await
            .unwrap_err();
        assert!(e.message.contains("did not finish"), "{}", e.message);
        assert!(t0.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn analysis_without_prometheus_is_inconclusive_and_check_fails() {
        let r = analyse(
            None,
            vec![Query {
                name: "errors".into(),
                promql: "x".into(),
                max: Some(0.1),
                min: None,
            }],
            Some(cmd("exit 1", 5000)),
        )
        .await;
        assert_eq!(r[0].verdict, "inconclusive");
        assert_eq!(r[1].verdict, "fail");
        assert_eq!(r[1].value, Some(1.0));
    }
}
