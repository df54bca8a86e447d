//! Following a deployment that `canary` or `rolling` started: the agent is asked for its
//! deployments every [`POLL`] and the one with the started id is shown, live on a terminal
//! (an `indicatif` bar and the step's signals), else one line (or one JSON object) per
//! change, until it ends. Ctrl-C only stops following; an agent that goes away (a restart)
//! is waited for, as it resumes its deployments.

use std::{
    io::{self, IsTerminal},
    path::Path,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::Value;

use super::{
    EXIT_FAILED, Out,
    client::{Client, Failure},
    deploy::{self, now_ms},
};
use crate::api::{Command, DeploymentStatus, DeploymentsResult};

/// Time between two polls of the agent.
const POLL: Duration = Duration::from_millis(500);
/// How long a missing agent (or deployment) is waited for before giving up.
const AGENT_GONE: Duration = Duration::from_secs(30);
/// 128 + SIGINT, as a shell reports a command stopped by Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on Ctrl-C sets [`INTERRUPTED`] instead of killing zdd, so that the live view is
/// cleared and the user is told the deployment goes on.
fn catch_ctrl_c() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe); `sa` is zeroed then
    // filled before use.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
}

/// Sleeps `d`, waking early on Ctrl-C: true when interrupted.
fn sleep_or_interrupt(d: Duration) -> bool {
    let end = Instant::now() + d;
    while !INTERRUPTED.load(Ordering::SeqCst) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
    true
}

/// Where following shows the deployment.
enum View {
    /// A terminal: a bar over the steps with the current step's details under it; the
    /// change lines are printed above it.
    Live(ProgressBar),
    /// A pipe or a file: one line per change.
    Lines,
    /// `--json`: one `DeploymentStatus` a line per change.
    Json,
}

impl View {
    fn new(json: bool, d: &DeploymentStatus) -> View {
        if json {
            return View::Json;
        }
        if !io::stdout().is_terminal() {
            return View::Lines;
        }
        let pb = ProgressBar::with_draw_target(
            Some(d.steps.len().max(1) as u64),
            ProgressDrawTarget::stdout(),
        );
        // The bar on a line of its own: the step's text under it is as wide as it needs.
        // The template is fixed and valid; a failure would only lose the layout.
        if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len}\n{msg}") {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_prefix(format!("{} {} #{}", d.service, d.kind, d.id));
        View::Live(pb)
    }

    /// Shows `cur`, after `shown` (None: the first status).
    fn show(&self, shown: Option<&DeploymentStatus>, cur: &DeploymentStatus, out: &mut Out) {
        match self {
            View::Json => {
                if shown.is_none_or(|s| deploy::progress_key(s) != deploy::progress_key(cur)) {
                    out.line(&serde_json::to_string(cur).unwrap_or_default());
                }
            }
            View::Lines => {
                for l in deploy::changes(shown, cur) {
                    out.line(&l);
                }
            }
            View::Live(pb) => {
                for l in deploy::changes(shown, cur) {
                    pb.println(l);
                }
                self.tick(cur);
            }
        }
    }

    /// Redraws the live view (its countdown moves while nothing else does).
    fn tick(&self, cur: &DeploymentStatus) {
        if let View::Live(pb) = self {
            pb.set_length(cur.steps.len().max(1) as u64);
            pb.set_position(cur.step.min(cur.steps.len()) as u64);
            pb.set_message(deploy::live(cur, now_ms()));
        }
    }

    /// A word to the user that is not the deployment's progress: on stderr, or above the
    /// live view.
    fn note(&self, msg: &str) {
        match self {
            View::Live(pb) => pb.println(format!("note: {msg}")),
            _ => eprintln!("note: {msg}"),
        }
    }

    fn clear(&self) {
        if let View::Live(pb) = self {
            pb.finish_and_clear();
        }
    }
}

/// The deployment `id` of `service` as the agent lists it now (None: not listed).
fn poll(socket: &Path, service: &str, id: u64) -> Result<Option<DeploymentStatus>, Failure> {
    let mut c = Client::send(
        socket,
        Command::Deployments {
            service: Some(service.to_string()),
            limit: None,
        },
    )?;
    let v = c.answer()?.unwrap_or(Value::Null);
    let r = DeploymentsResult::deserialize(&v).map_err(|e| {
        Failure::Failed(format!("unreadable deployments from zdd-agent ({e}): {v}"))
    })?;
    Ok(r.active.into_iter().chain(r.past).find(|d| d.id == id))
}

/// Starts the deployment with `cmd` (`canary` or `rolling`), then follows it to its end.
pub fn follow(socket: &Path, cmd: Command, out: &mut Out) -> Result<ExitCode, Failure> {
    let asked = match &cmd {
        Command::Canary { service, .. } | Command::Rolling { service, .. } => service.clone(),
        _ => String::new(),
    };
    let v = Client::send(socket, cmd)?.answer()?.unwrap_or(Value::Null);
    let first = DeploymentStatus::deserialize(&v)
        .map_err(|e| Failure::Failed(format!("unreadable answer from zdd-agent ({e}): {v}")))?;
    let service = if first.service.is_empty() {
        asked
    } else {
        first.service.clone()
    };
    let id = first.id;
    catch_ctrl_c();
    let view = View::new(out.json, &first);
    let mut shown: Option<DeploymentStatus> = None;
    let mut cur = first;
    // Since when the agent has not answered, and since when it has not listed the deployment.
    let mut gone: Option<Instant> = None;
    let mut missing: Option<Instant> = None;
    loop {
        view.show(shown.as_ref(), &cur, out);
        if cur.finished || cur.state == "stopped" {
            view.clear();
            let (lines, ok) = deploy::outcome(&cur);
            if !out.json {
                for l in lines {
                    out.line(&l);
                }
            }
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            });
        }
        shown = Some(cur.clone());
        loop {
            if sleep_or_interrupt(POLL) {
                view.clear();
                eprintln!(
                    "stopped following {} #{id}: the deployment goes on; `zdd deployments \
                     {service}` shows it",
                    cur.kind
                );
                return Ok(ExitCode::from(EXIT_INTERRUPTED));
            }
            match poll(socket, &service, id) {
                Ok(Some(d)) => {
                    if gone.take().is_some() {
                        view.note(&format!("zdd-agent answers again: following #{id}"));
                    }
                    missing = None;
                    cur = d;
                    break;
                }
                Ok(None) => {
                    gone = None;
                    let since = *missing.get_or_insert_with(Instant::now);
                    if since.elapsed() > AGENT_GONE {
                        view.clear();
                        return Err(Failure::Failed(format!(
                            "zdd-agent has not listed {} #{id} of {service} for {}s; `zdd \
                             deployments {service}` shows what it knows",
                            cur.kind,
                            AGENT_GONE.as_secs()
                        )));
                    }
                }
                // No answer: the agent restarting (it resumes its deployments), or busy.
                Err(Failure::Failed(m)) => {
                    let since = match gone {
                        Some(since) => since,
                        None => {
                            view.note(&format!(
                                "lost zdd-agent: {m}. Trying again for up to {}s (a restarted \
                                 agent resumes the deployment)",
                                AGENT_GONE.as_secs()
                            ));
                            Instant::now()
                        }
                    };
                    if since.elapsed() > AGENT_GONE {
                        view.clear();
                        return Err(Failure::Failed(format!(
                            "zdd-agent did not come back within {}s ({m}); the deployment goes \
                             on once it does: `zdd deployments {service}` shows it",
                            AGENT_GONE.as_secs()
                        )));
                    }
                    gone = Some(since);
                }
                Err(refused) => {
                    view.clear();
                    return Err(refused);
                }
            }
            view.tick(&cur);
        }
    }
}
