//! The command line (clap derive) and the checks made before anything is sent: a request the
//! agent would refuse for its shape (a split that does not add up to 100, a malformed address,
//! prefix or duration) is a usage error here, exit code 2, with the same words the agent uses.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use clap_complete::Shell;

use crate::{
    api::{self, Command, Split},
    config::parse_duration,
    state::Prefix,
};

const AFTER_HELP: &str = "\
Backends are named within their service: every `backend` command takes SERVICE NAME or
SERVICE/NAME, and the commands on an existing backend also take NAME alone when exactly one
service has a backend of that name.

Exit codes: 0 done; 1 refused by the agent or failed (no agent, no permission, a drain that
timed out with flows left, a followed deployment that was rolled back, aborted or stopped);
2 usage (a malformed command line, split, steps, address or duration); 130 when Ctrl-C stops
following a deployment (the deployment goes on).";

/// zdd: moves live traffic between versions of a service without dropping a connection.
/// Talks to zdd-agent over its control socket.
#[derive(Debug, Parser)]
#[command(name = "zdd", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// The agent's control socket (agent.socket in its config).
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "ZDD_SOCKET",
        default_value = api::DEFAULT_SOCKET,
        help_heading = "Global options"
    )]
    pub socket: PathBuf,
    /// Print the agent's answer as JSON, for scripts.
    ///
    /// One object a line: the `result` of the agent's answer (one line per update for
    /// --watch; one event a line for `events`; the deployment, each time it changes, while
    /// `canary` or `rolling` follows it). Errors go to stderr as text; a refusal by
    /// the agent also goes to stdout as {"error":{"code":"...","message":"..."}}.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    /// `stats` only: read the counters from the pinned maps under DIR (agent.pin_dir).
    ///
    /// Asks no agent: works while the agent is stopped. The text is one counter a line
    /// (`NAME VALUE`, then `service|backend ADDR packets N bytes N new_flows N`).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        help_heading = "Global options"
    )]
    pub pin_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Services, splits, pins and backends with state, active flows and rates
    ///
    /// Per service: VIP, protocol, forwarding, affinity, split, the previous split (what
    /// `zdd rollback` restores), pins, and whether the live state differs from the config
    /// file. Per backend: address, group, weight, state (serving, draining, drained,
    /// removed), active flows, new flows/s and bytes/s over the last seconds.
    Status {
        /// Only this service.
        service: Option<String>,
        /// Print the status again every --interval until interrupted (Ctrl-C).
        #[arg(long, short)]
        watch: bool,
        /// Time between two --watch updates (500ms, 2s, ...; the agent's default is 1s).
        #[arg(long, value_name = "D", requires = "watch", value_parser = duration)]
        interval: Option<String>,
    },
    /// Add, remove, reweight, drain and undrain backends
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Set a service's split at once: `zdd split web blue=95 green=5`
    ///
    /// New flows (new clients, with client affinity) follow the new split; established
    /// flows stay where they are. `zdd rollback SERVICE` restores the split before.
    Split {
        service: String,
        /// One share per group, GROUP=PERCENT (`blue=95`, `green=5%`, `v2=33.33`); they
        /// must add up to 100, in steps of 0.01.
        #[arg(required = true, value_name = "GROUP=PERCENT", value_parser = share)]
        shares: Vec<(String, f64)>,
    },
    /// Blue-green: send all new flows to GROUP at once
    ///
    /// New flows (new clients, with client affinity) go to GROUP in one atomic update;
    /// established flows finish where they are. `zdd rollback SERVICE` undoes it.
    Switch {
        service: String,
        /// The group that gets 100%.
        #[arg(long, value_name = "GROUP")]
        to: String,
        /// Switch even when GROUP has no backend that can take traffic.
        #[arg(long)]
        force: bool,
    },
    /// Restore the split before the last change (again: the one before that)
    Rollback { service: String },
    /// Send new flows from a source prefix (testers, internal users) to GROUP
    ///
    /// Whatever the split: e.g. `zdd pin web 10.20.0.0/16 --group green` lets testers see
    /// green before a switch.
    Pin {
        service: String,
        /// Source prefix: 10.20.0.0/16, 2001:db8::/32, or one address.
        #[arg(value_name = "CIDR", value_parser = cidr)]
        source: String,
        #[arg(long, value_name = "GROUP")]
        group: String,
    },
    /// Remove a pin: new flows from CIDR follow the split again
    Unpin {
        service: String,
        #[arg(value_name = "CIDR", value_parser = cidr)]
        source: String,
    },
    /// Move new flows to GROUP step by step, with an analysis after each step
    ///
    /// Each step lasts --interval; then an analysis compares GROUP's new flows, connection
    /// failures and probe latency with the baseline's, and runs --check. A failed step sends
    /// new flows back to the baseline (rolled back); an inconclusive one (too few flows) is
    /// extended, then paused for a person to `zdd resume`, `zdd promote` or `zdd abort`.
    ///
    /// zdd follows the deployment until it ends (exit 0 succeeded; 1 rolled back or
    /// aborted), unless --detach. Ctrl-C stops following, not the deployment.
    Canary {
        service: String,
        /// The group rolled out (the new version).
        #[arg(long, value_name = "GROUP")]
        to: String,
        /// Comma-separated steps: percentages of new flows, increasing, more than 0 and at
        /// most 100, in steps of 0.01 (`5,25,50,100`); or names of the service's cohorts,
        /// whose sources are pinned to GROUP (`internal,10,100`).
        #[arg(long, value_name = "STEPS", value_parser = steps)]
        steps: Steps,
        /// How long each step lasts before its analysis (default: the service's
        /// [services.canary] interval, else 30s).
        #[arg(long, value_name = "D", value_parser = positive_duration)]
        interval: Option<String>,
        /// The group new flows come back to on a rollback (default: the group with the
        /// largest share now).
        #[arg(long, value_name = "GROUP")]
        baseline: Option<String>,
        /// A shell command run at the end of every step (as you); a non-zero exit fails the
        /// step.
        #[arg(long, value_name = "CMD", value_parser = shell_command)]
        check: Option<String>,
        /// New flows GROUP must have had in a step for its analysis to count (default: the
        /// service's [services.canary] min_flows).
        #[arg(long, value_name = "N")]
        min_flows: Option<u64>,
        /// Start the deployment and return at once, without following it.
        #[arg(long, short)]
        detach: bool,
    },
    /// Update backends batch by batch: drain, run --exec, wait for health, restore
    ///
    /// For each batch of backends: no new flows, wait for their flows to end
    /// (--drain-timeout), run --exec once per backend (--exec-timeout), wait until they pass
    /// their health checks (--health-timeout), then give them new flows again. A batch that
    /// fails stops the update: `zdd resume SERVICE` retries it, `zdd abort SERVICE` ends it.
    ///
    /// zdd follows the update until it ends (exit 0 succeeded; 1 stopped or aborted),
    /// unless --detach. Ctrl-C stops following, not the update.
    Rolling {
        service: String,
        /// Backends per batch (`1`), or a share of the service's backends, rounded up
        /// (`25%`).
        #[arg(long, value_name = "N|N%", value_parser = batch)]
        batch: String,
        /// The update step, run by `sh -c` as you, once per backend, with ZDD_SERVICE,
        /// ZDD_BACKEND, ZDD_ADDR, ZDD_IP, ZDD_PORT, ZDD_GROUP and ZDD_BATCH set.
        #[arg(long, value_name = "CMD", value_parser = shell_command)]
        exec: String,
        /// Longest wait for a batch's flows to end (the agent's default is 60s).
        #[arg(long, value_name = "D", value_parser = duration)]
        drain_timeout: Option<String>,
        /// Longest run of --exec (the agent's default is 5m).
        #[arg(long, value_name = "D", value_parser = positive_duration)]
        exec_timeout: Option<String>,
        /// Longest wait for the updated backends to pass their health checks (the agent's
        /// default is 60s).
        #[arg(long, value_name = "D", value_parser = positive_duration)]
        health_timeout: Option<String>,
        /// Start the update and return at once, without following it.
        #[arg(long, short)]
        detach: bool,
    },
    /// Stop a deployment's clock where it is (a canary keeps its split)
    Pause { service: String },
    /// Continue a paused deployment; a stopped rolling update retries its batch
    Resume { service: String },
    /// Finish a deployment now, without more steps or pauses
    ///
    /// A canary goes to 100% at once; a rolling update runs its remaining batches without
    /// pausing.
    Promote { service: String },
    /// Stop a deployment: a canary rolls back, a rolling update stops
    ///
    /// A canary's new flows go back to its baseline (its cohort pins are removed); a rolling
    /// update stops where it is (the batch in progress stays drained).
    Abort { service: String },
    /// Deployments in progress, then past ones, newest first
    Deployments {
        /// Only this service's.
        service: Option<String>,
        /// How many past deployments (the agent's default is 20).
        #[arg(long, short = 'n', value_name = "N")]
        limit: Option<usize>,
    },
    /// Make the live services those of a config file, all or nothing
    ///
    /// Prints the difference between the live state and the file, then applies all of it
    /// or none of it.
    Apply {
        /// The config file (TOML, as zdd-agent's); `-` reads standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Only print what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Recent events: every change and state transition, when and by whom
    Events {
        /// Then print every new event as it happens, until interrupted (Ctrl-C).
        #[arg(long, short)]
        follow: bool,
        /// How many recent events (the agent's default is 100).
        #[arg(long, short = 'n', value_name = "N")]
        limit: Option<usize>,
    },
    /// Data-path counters, summed over CPUs
    ///
    /// Verdicts and reasons, then packets, bytes and new flows per service and per
    /// backend.
    Stats,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    ///
    /// E.g. `zdd completions bash > /etc/bash_completion.d/zdd`. Needs no agent.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackendCmd {
    /// Add a backend: `zdd backend add web blue-3 10.10.2.13:8080 --group blue`
    #[command(
        override_usage = "zdd backend add [OPTIONS] --group <GROUP> <SERVICE> <NAME> <ADDR>\n       \
                        zdd backend add [OPTIONS] --group <GROUP> <SERVICE/NAME> <ADDR>"
    )]
    Add {
        /// The service, or SERVICE/NAME in one argument.
        #[arg(value_name = "SERVICE")]
        first: String,
        /// The backend's name, unique within its service (its ADDR after SERVICE/NAME).
        #[arg(value_name = "NAME")]
        second: String,
        /// ip:port, [ipv6]:port.
        #[arg(value_name = "ADDR")]
        addr: Option<String>,
        /// The backend's group (version label: blue, green, v42).
        #[arg(long, value_name = "GROUP")]
        group: String,
        /// Its weight within the group, 0..=65535 (the agent's default is 100).
        #[arg(long, value_name = "W", value_parser = weight)]
        weight: Option<u32>,
    },
    /// Drain a backend, then remove it (--now: at once)
    ///
    /// Waits until the backend's flows have ended or --timeout passed, then removes it;
    /// flows still on it then move to live backends.
    Remove {
        #[command(flatten)]
        backend: BackendArg,
        /// Remove at once, without draining first.
        #[arg(long, conflicts_with = "timeout")]
        now: bool,
        /// Longest drain before the removal (the agent's default is 30s).
        #[arg(long, value_name = "D", value_parser = duration)]
        timeout: Option<String>,
    },
    /// Set a backend's weight within its group
    Set {
        #[command(flatten)]
        backend: BackendArg,
        /// 0..=65535; 0 takes no new flows (as a drain) but keeps the backend listed.
        #[arg(long, value_name = "W", value_parser = weight)]
        weight: u32,
    },
    /// Send a backend no new flows; its established flows go on
    Drain {
        #[command(flatten)]
        backend: BackendArg,
        /// Return only when the backend has no active flow left, or after --timeout (then
        /// say how many remain, and exit 1).
        #[arg(long)]
        wait: bool,
        /// Longest wait (the agent's default is 60s).
        #[arg(long, value_name = "D", requires = "wait", value_parser = duration)]
        timeout: Option<String>,
    },
    /// Let a drained backend take new flows again
    Undrain {
        #[command(flatten)]
        backend: BackendArg,
    },
}

/// An existing backend on the command line: `SERVICE NAME`, `SERVICE/NAME` or `NAME`.
#[derive(Debug, clap::Args)]
pub struct BackendArg {
    /// The service; or SERVICE/NAME in one argument; or the backend's NAME alone when
    /// exactly one service has a backend of that name.
    #[arg(value_name = "SERVICE")]
    pub first: String,
    /// The backend's name (unique within its service).
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
}

/// A backend as named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendRef {
    Full {
        service: String,
        name: String,
    },
    /// NAME alone: the agent's status says which service has it.
    Bare(String),
}

impl BackendArg {
    pub fn resolve(&self) -> Result<BackendRef, String> {
        backend_ref(&self.first, self.name.as_deref())
    }
}

/// `SERVICE NAME` | `SERVICE/NAME` | `NAME`.
pub fn backend_ref(first: &str, name: Option<&str>) -> Result<BackendRef, String> {
    match (first.split_once('/'), name) {
        (Some((s, n)), None) => {
            if s.is_empty() || n.is_empty() || n.contains('/') {
                Err(format!(
                    "{first:?}: name a backend as SERVICE/NAME (one '/'), or SERVICE NAME"
                ))
            } else {
                Ok(BackendRef::Full {
                    service: s.into(),
                    name: n.into(),
                })
            }
        }
        (Some(_), Some(n)) => Err(format!(
            "{first:?} {n:?}: name a backend as SERVICE NAME or as SERVICE/NAME, not both"
        )),
        (None, Some(n)) => Ok(BackendRef::Full {
            service: first.into(),
            name: n.into(),
        }),
        (None, None) => Ok(BackendRef::Bare(first.into())),
    }
}

/// `backend add`'s positionals: `SERVICE NAME ADDR` or `SERVICE/NAME ADDR`.
pub fn add_args(args: &[String]) -> Result<(String, String, String), String> {
    let (service, name, addr) = match args {
        [s, n, a] if !s.contains('/') && !n.contains('/') => (s.clone(), n.clone(), a.clone()),
        [sn, a] => match backend_ref(sn, None)? {
            BackendRef::Full { service, name } => (service, name, a.clone()),
            BackendRef::Bare(_) => {
                return Err(format!(
                    "backend add needs SERVICE NAME ADDR or SERVICE/NAME ADDR; got {sn:?} {a:?}"
                ));
            }
        },
        _ => {
            return Err(format!(
                "backend add needs SERVICE NAME ADDR or SERVICE/NAME ADDR; got {}",
                args.iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    };
    addr.parse::<SocketAddr>()
        .map_err(|_| format!("{addr:?} is not ip:port (IPv6: [addr]:port)"))?;
    Ok((service, name, addr))
}

/// `GROUP=PERCENT`, percent in 0..=100 in steps of 0.01, an optional `%` after it.
pub fn share(s: &str) -> Result<(String, f64), String> {
    let Some((g, p)) = s.split_once('=') else {
        return Err(format!("{s:?}: a share is GROUP=PERCENT, e.g. blue=95"));
    };
    let g = g.trim();
    if g.is_empty() {
        return Err(format!("{s:?}: the group name is missing (GROUP=PERCENT)"));
    }
    let p = p.trim();
    let p = p.strip_suffix('%').unwrap_or(p);
    let pct: f64 = p
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .ok_or_else(|| format!("{s:?}: {p:?} is not a percentage"))?;
    if !(0.0..=100.0).contains(&pct) {
        return Err(format!("{s:?}: {pct} is outside 0..100"));
    }
    let b = pct * 100.0;
    if (b - b.round()).abs() > 1e-6 {
        return Err(format!("{s:?}: the split is set in steps of 0.01%"));
    }
    Ok((g.to_string(), pct))
}

/// The shares as a split: each group once, adding up to 100.
pub fn split_of(shares: &[(String, f64)]) -> Result<Split, String> {
    let mut split = Split::new();
    let mut buckets = 0u64;
    for (g, p) in shares {
        if split.insert(g.clone(), *p).is_some() {
            return Err(format!("group {g:?} is given twice"));
        }
        buckets += (p * 100.0).round() as u64;
    }
    if buckets != zdd_common::SPLIT_BUCKETS as u64 {
        return Err(format!(
            "the shares add up to {}%, not 100% ({})",
            fmt_pct(buckets as f64 / 100.0),
            shares
                .iter()
                .map(|(g, p)| format!("{g}={}", fmt_pct(*p)))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    Ok(split)
}

/// A percentage without needless decimals: 95, 2.5, 33.33.
pub fn fmt_pct(p: f64) -> String {
    let s = format!("{p:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn duration(s: &str) -> Result<String, String> {
    parse_duration(s).map(|_| s.trim().to_string())
}

/// A duration longer than zero (a step or a wait of 0 is a mistake).
fn positive_duration(s: &str) -> Result<String, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("duration {:?} must be longer than 0", s.trim())),
        _ => Ok(s.trim().to_string()),
    }
}

fn shell_command(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("the command is empty (it is run by `sh -c`)".into());
    }
    Ok(s.to_string())
}

/// A canary's steps, as sent: percentages without `%` (`25`, `2.5`) and cohort names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steps(pub Vec<String>);

/// `--steps`: comma-separated percentages (more than 0, at most 100, in steps of 0.01,
/// increasing, an optional `%`) and cohort names, checked by the agent's own rules (the
/// agent also checks that the cohorts exist).
pub fn steps(s: &str) -> Result<Steps, String> {
    let raw: Vec<String> = s.split(',').map(str::to_string).collect();
    let parsed = crate::deploy::canary::parse_step_list(&raw)?;
    Ok(Steps(
        parsed
            .into_iter()
            .map(|step| match step {
                crate::deploy::Step::Percent(b) => fmt_pct(b as f64 / 100.0),
                crate::deploy::Step::Cohort(c) => c,
            })
            .collect(),
    ))
}

/// `--batch`: `N` backends (at least 1) or `N%` of them (1..=100), as sent.
pub fn batch(s: &str) -> Result<String, String> {
    crate::deploy::rolling::Batch::parse(s).map(|b| b.to_string())
}

fn cidr(s: &str) -> Result<String, String> {
    s.parse::<Prefix>().map(|_| s.to_string())
}

fn weight(s: &str) -> Result<u32, String> {
    s.parse::<u32>()
        .ok()
        .filter(|w| *w <= 65_535)
        .ok_or_else(|| format!("{s:?}: a weight is a whole number in 0..=65535"))
}

/// What a command line asks for, once checked.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// One request to the agent.
    Request(Command),
    /// A request that starts a deployment, then following it until it ends.
    Follow(Command),
    /// A backend command that named the backend alone: the agent's status says which service
    /// has it, then the request is made.
    Lookup {
        name: String,
        op: BackendOp,
    },
    Completions(Shell),
    /// `--pin-dir DIR stats`: the counters from the pinned maps.
    PinnedStats(PathBuf),
}

/// A backend command before its service is known.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendOp {
    Remove { now: bool, timeout: Option<String> },
    Set { weight: u32 },
    Drain { wait: bool, timeout: Option<String> },
    Undrain,
}

impl BackendOp {
    pub fn command(self, service: String, name: String) -> Command {
        match self {
            BackendOp::Remove { now, timeout } => Command::BackendRemove {
                service,
                name,
                now,
                timeout,
            },
            BackendOp::Set { weight } => Command::BackendSet {
                service,
                name,
                weight,
            },
            BackendOp::Drain { wait, timeout } => Command::BackendDrain {
                service,
                name,
                wait,
                timeout,
            },
            BackendOp::Undrain => Command::BackendUndrain { service, name },
        }
    }
}

impl Cli {
    /// The checked request; Err is a usage error (exit 2). `read` reads `apply`'s file.
    pub fn plan(
        &self,
        read: impl Fn(&std::path::Path) -> Result<String, String>,
    ) -> Result<Plan, String> {
        if let Some(dir) = &self.pin_dir {
            return match self.cmd {
                Cmd::Stats => Ok(Plan::PinnedStats(dir.clone())),
                _ => Err(
                    "--pin-dir works with `stats` only; other commands ask the agent \
                     (--socket PATH)"
                        .into(),
                ),
            };
        }
        let cmd = match &self.cmd {
            Cmd::Status {
                service,
                watch,
                interval,
            } => Command::Status {
                service: service.clone(),
                watch: *watch,
                interval: interval.clone(),
            },
            Cmd::Backend(b) => {
                let (backend, op) = match b {
                    BackendCmd::Add {
                        first,
                        second,
                        addr,
                        group,
                        weight,
                    } => {
                        let args: Vec<String> = [Some(first), Some(second), addr.as_ref()]
                            .into_iter()
                            .flatten()
                            .cloned()
                            .collect();
                        let (service, name, addr) = add_args(&args)?;
                        return Ok(Plan::Request(Command::BackendAdd {
                            service,
                            name,
                            addr,
                            group: group.clone(),
                            weight: *weight,
                        }));
                    }
                    BackendCmd::Remove {
                        backend,
                        now,
                        timeout,
                    } => (
                        backend,
                        BackendOp::Remove {
                            now: *now,
                            timeout: timeout.clone(),
                        },
                    ),
                    BackendCmd::Set { backend, weight } => {
                        (backend, BackendOp::Set { weight: *weight })
                    }
                    BackendCmd::Drain {
                        backend,
                        wait,
                        timeout,
                    } => (
                        backend,
                        BackendOp::Drain {
                            wait: *wait,
                            timeout: timeout.clone(),
                        },
                    ),
                    BackendCmd::Undrain { backend } => (backend, BackendOp::Undrain),
                };
                return Ok(match backend.resolve()? {
                    BackendRef::Full { service, name } => Plan::Request(op.command(service, name)),
                    BackendRef::Bare(name) => Plan::Lookup { name, op },
                });
            }
            Cmd::Split { service, shares } => Command::Split {
                service: service.clone(),
                split: split_of(shares)?,
            },
            Cmd::Switch { service, to, force } => Command::Switch {
                service: service.clone(),
                to: to.clone(),
                force: *force,
            },
            Cmd::Rollback { service } => Command::Rollback {
                service: service.clone(),
            },
            Cmd::Pin {
                service,
                source,
                group,
            } => Command::Pin {
                service: service.clone(),
                source: source.clone(),
                group: group.clone(),
            },
            Cmd::Unpin { service, source } => Command::Unpin {
                service: service.clone(),
                source: source.clone(),
            },
            Cmd::Canary {
                service,
                to,
                steps,
                interval,
                baseline,
                check,
                min_flows,
                detach,
            } => {
                if baseline.as_ref() == Some(to) {
                    return Err(format!(
                        "--baseline {to} is the group rolled out (--to): the baseline is the \
                         group new flows go back to on a rollback"
                    ));
                }
                let cmd = Command::Canary {
                    service: service.clone(),
                    to: to.clone(),
                    steps: steps.0.clone(),
                    interval: interval.clone(),
                    baseline: baseline.clone(),
                    check: check.clone(),
                    min_flows: *min_flows,
                };
                return Ok(if *detach {
                    Plan::Request(cmd)
                } else {
                    Plan::Follow(cmd)
                });
            }
            Cmd::Rolling {
                service,
                batch,
                exec,
                drain_timeout,
                exec_timeout,
                health_timeout,
                detach,
            } => {
                let cmd = Command::Rolling {
                    service: service.clone(),
                    batch: batch.clone(),
                    exec: exec.clone(),
                    drain_timeout: drain_timeout.clone(),
                    exec_timeout: exec_timeout.clone(),
                    health_timeout: health_timeout.clone(),
                };
                return Ok(if *detach {
                    Plan::Request(cmd)
                } else {
                    Plan::Follow(cmd)
                });
            }
            Cmd::Pause { service } => Command::Pause {
                service: service.clone(),
            },
            Cmd::Resume { service } => Command::Resume {
                service: service.clone(),
            },
            Cmd::Promote { service } => Command::Promote {
                service: service.clone(),
            },
            Cmd::Abort { service } => Command::Abort {
                service: service.clone(),
            },
            Cmd::Deployments { service, limit } => Command::Deployments {
                service: service.clone(),
                limit: *limit,
            },
            Cmd::Apply { file, dry_run } => Command::Apply {
                config: read(file)?,
                dry_run: *dry_run,
            },
            Cmd::Events { follow, limit } => Command::Events {
                follow: *follow,
                limit: *limit,
            },
            Cmd::Stats => Command::Stats,
            Cmd::Completions { shell } => return Ok(Plan::Completions(*shell)),
        };
        Ok(Plan::Request(cmd))
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("zdd").chain(args.iter().copied()))
    }

    fn plan(args: &[&str]) -> Result<Plan, String> {
        parse(args)
            .map_err(|e| e.to_string())?
            .plan(|p| Ok(format!("text of {}", p.display())))
    }

    fn request(args: &[&str]) -> Command {
        match plan(args) {
            Ok(Plan::Request(c)) => c,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn usage_error(args: &[&str]) -> String {
        match parse(args) {
            Err(e) => {
                assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
                e.to_string()
            }
            Ok(cli) => cli
                .plan(|_| Ok(String::new()))
                .expect_err(&format!("{args:?} was accepted")),
        }
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_anywhere() {
        let cli = parse(&["status", "--json", "--socket", "/tmp/s"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.socket, PathBuf::from("/tmp/s"));
        let cli = parse(&["--socket=/x", "stats"]).unwrap();
        assert_eq!(cli.socket, PathBuf::from("/x"));
        assert!(!cli.json);
    }

    #[test]
    fn status_and_its_watch() {
        assert_eq!(
            request(&["status"]),
            Command::Status {
                service: None,
                watch: false,
                interval: None
            }
        );
        assert_eq!(
            request(&["status", "web", "--watch", "--interval", "500ms"]),
            Command::Status {
                service: Some("web".into()),
                watch: true,
                interval: Some("500ms".into())
            }
        );
        let e = usage_error(&["status", "--interval", "2s"]);
        assert!(e.contains("--watch"), "{e}");
        let e = usage_error(&["status", "-w", "--interval", "2"]);
        assert!(e.contains("needs a unit"), "{e}");
    }

    #[test]
    fn split_pairs_are_checked_before_sending() {
        match request(&["split", "web", "blue=95", "green=5%"]) {
            Command::Split { service, split } => {
                assert_eq!(service, "web");
                assert_eq!(
                    split,
                    Split::from([("blue".into(), 95.0), ("green".into(), 5.0)])
                );
            }
            c => panic!("{c:?}"),
        }
        match request(&["split", "web", "a=33.33", "b=33.33", "c=33.34"]) {
            Command::Split { split, .. } => assert_eq!(split["c"], 33.34),
            c => panic!("{c:?}"),
        }
        for (args, want) in [
            (
                &["split", "web", "blue=95", "green=15"][..],
                "the shares add up to 110%, not 100% (blue=95 green=15)",
            ),
            (&["split", "web", "blue=99.5"], "add up to 99.5%"),
            (&["split", "web", "blue"], "a share is GROUP=PERCENT"),
            (&["split", "web", "=100"], "the group name is missing"),
            (&["split", "web", "blue=x"], "\"x\" is not a percentage"),
            (&["split", "web", "blue=101"], "101 is outside 0..100"),
            (&["split", "web", "blue=-1"], "outside 0..100"),
            (&["split", "web", "blue=NaN"], "is not a percentage"),
            (&["split", "web", "blue=99.995"], "steps of 0.01%"),
            (
                &["split", "web", "blue=50", "blue=50"],
                "group \"blue\" is given twice",
            ),
        ] {
            let e = usage_error(args);
            assert!(e.contains(want), "{args:?}: want {want:?} in {e}");
        }
        // No share at all.
        let e = parse(&["split", "web"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn backends_are_named_service_name_or_service_slash_name() {
        let full = |s: &str, n: &str| BackendRef::Full {
            service: s.into(),
            name: n.into(),
        };
        assert_eq!(
            backend_ref("web", Some("blue-1")),
            Ok(full("web", "blue-1"))
        );
        assert_eq!(backend_ref("web/blue-1", None), Ok(full("web", "blue-1")));
        assert_eq!(
            backend_ref("blue-1", None),
            Ok(BackendRef::Bare("blue-1".into()))
        );
        for bad in ["web/", "/blue-1", "a/b/c"] {
            assert!(backend_ref(bad, None).is_err(), "{bad}");
        }
        assert!(
            backend_ref("web/blue-1", Some("x"))
                .unwrap_err()
                .contains("not both")
        );

        assert_eq!(
            request(&[
                "backend",
                "drain",
                "web/blue-1",
                "--wait",
                "--timeout",
                "1m"
            ]),
            Command::BackendDrain {
                service: "web".into(),
                name: "blue-1".into(),
                wait: true,
                timeout: Some("1m".into())
            }
        );
        assert_eq!(
            request(&["backend", "undrain", "web", "blue-1"]),
            Command::BackendUndrain {
                service: "web".into(),
                name: "blue-1".into()
            }
        );
        assert_eq!(
            plan(&["backend", "set", "blue-1", "--weight", "0"]),
            Ok(Plan::Lookup {
                name: "blue-1".into(),
                op: BackendOp::Set { weight: 0 }
            })
        );
        assert_eq!(
            request(&["backend", "remove", "web", "blue-1", "--now"]),
            Command::BackendRemove {
                service: "web".into(),
                name: "blue-1".into(),
                now: true,
                timeout: None
            }
        );
        usage_error(&["backend", "remove", "web", "b", "--now", "--timeout", "5s"]);
        let e = usage_error(&["backend", "drain", "web", "b", "--timeout", "5s"]);
        assert!(e.contains("--wait"), "{e}");
        let e = usage_error(&["backend", "set", "web/b", "--weight", "65536"]);
        assert!(e.contains("0..=65535"), "{e}");
        usage_error(&["backend", "set", "web/b"]);
    }

    #[test]
    fn backend_add_takes_either_form_and_checks_the_address() {
        let want = Command::BackendAdd {
            service: "web".into(),
            name: "blue-3".into(),
            addr: "10.10.2.13:8080".into(),
            group: "blue".into(),
            weight: Some(50),
        };
        assert_eq!(
            request(&[
                "backend",
                "add",
                "web",
                "blue-3",
                "10.10.2.13:8080",
                "--group",
                "blue",
                "--weight",
                "50"
            ]),
            want
        );
        assert_eq!(
            request(&[
                "backend",
                "add",
                "--group=blue",
                "--weight=50",
                "web/blue-3",
                "10.10.2.13:8080"
            ]),
            want
        );
        match request(&[
            "backend",
            "add",
            "web/v6",
            "[2001:db8::1]:80",
            "--group",
            "g",
        ]) {
            Command::BackendAdd { addr, weight, .. } => {
                assert_eq!(addr, "[2001:db8::1]:80");
                assert_eq!(weight, None);
            }
            c => panic!("{c:?}"),
        }
        let e = usage_error(&["backend", "add", "web", "10.0.0.1:80", "--group", "g"]);
        assert!(e.contains("SERVICE NAME ADDR or SERVICE/NAME ADDR"), "{e}");
        let e = usage_error(&["backend", "add", "web", "b", "10.0.0.1", "--group", "g"]);
        assert!(e.contains("\"10.0.0.1\" is not ip:port"), "{e}");
        usage_error(&["backend", "add", "web", "b", "10.0.0.1:80"]); // no --group
        usage_error(&["backend", "add", "a", "b", "c", "d", "--group", "g"]);
        let e = usage_error(&[
            "backend",
            "add",
            "web/b",
            "x",
            "10.0.0.1:80",
            "--group",
            "g",
        ]);
        assert!(e.contains("SERVICE NAME ADDR or SERVICE/NAME ADDR"), "{e}");
    }

    #[test]
    fn switch_rollback_pin_unpin() {
        assert_eq!(
            request(&["switch", "web", "--to", "green"]),
            Command::Switch {
                service: "web".into(),
                to: "green".into(),
                force: false
            }
        );
        assert_eq!(
            request(&["switch", "web", "--to", "green", "--force"]),
            Command::Switch {
                service: "web".into(),
                to: "green".into(),
                force: true
            }
        );
        usage_error(&["switch", "web"]);
        assert_eq!(
            request(&["rollback", "web"]),
            Command::Rollback {
                service: "web".into()
            }
        );
        assert_eq!(
            request(&["pin", "web", "10.20.0.0/16", "--group", "green"]),
            Command::Pin {
                service: "web".into(),
                source: "10.20.0.0/16".into(),
                group: "green".into()
            }
        );
        let e = usage_error(&["pin", "web", "10.20.0.1/16", "--group", "green"]);
        assert!(e.contains("did you mean 10.20.0.0/16"), "{e}");
        usage_error(&["pin", "web", "10.20.0.0/33", "--group", "green"]);
        assert_eq!(
            request(&["unpin", "web", "2001:db8::/32"]),
            Command::Unpin {
                service: "web".into(),
                source: "2001:db8::/32".into()
            }
        );
    }

    #[test]
    fn apply_events_stats_completions() {
        assert_eq!(
            request(&["apply", "-f", "/etc/zdd/zdd.toml", "--dry-run"]),
            Command::Apply {
                config: "text of /etc/zdd/zdd.toml".into(),
                dry_run: true
            }
        );
        let cli = parse(&["apply", "--file", "/nope"]).unwrap();
        assert_eq!(
            cli.plan(|_| Err("cannot read /nope".into())),
            Err("cannot read /nope".into())
        );
        assert_eq!(
            request(&["events", "-f", "-n", "5"]),
            Command::Events {
                follow: true,
                limit: Some(5)
            }
        );
        assert_eq!(request(&["stats"]), Command::Stats);
        assert_eq!(
            plan(&["--pin-dir", "/sys/fs/bpf/zdd", "stats"]),
            Ok(Plan::PinnedStats("/sys/fs/bpf/zdd".into()))
        );
        assert!(
            plan(&["--pin-dir", "/x", "status"])
                .unwrap_err()
                .contains("--pin-dir works with `stats` only")
        );
        assert_eq!(
            plan(&["completions", "zsh"]),
            Ok(Plan::Completions(Shell::Zsh))
        );
        usage_error(&["completions", "cmd.exe"]);
    }

    #[test]
    fn canary_steps_are_checked_before_sending() {
        let want = Command::Canary {
            service: "web".into(),
            to: "green".into(),
            steps: ["internal", "5", "25.5", "100"].map(String::from).to_vec(),
            interval: Some("30s".into()),
            baseline: Some("blue".into()),
            check: Some("curl -fsS http://green/health".into()),
            min_flows: Some(50),
        };
        assert_eq!(
            plan(&[
                "canary",
                "web",
                "--to",
                "green",
                "--steps",
                "internal, 5%,25.50,100",
                "--interval",
                "30s",
                "--baseline",
                "blue",
                "--check",
                "curl -fsS http://green/health",
                "--min-flows",
                "50"
            ]),
            Ok(Plan::Follow(want.clone()))
        );
        // --detach: one request, its answer printed.
        match plan(&["canary", "web", "--to", "g", "--steps", "10,100", "-d"]) {
            Ok(Plan::Request(Command::Canary {
                steps,
                interval,
                baseline,
                check,
                min_flows,
                ..
            })) => {
                assert_eq!(steps, ["10", "100"]);
                assert_eq!(
                    (interval, baseline, check, min_flows),
                    (None, None, None, None)
                );
            }
            other => panic!("{other:?}"),
        }
        for (steps, want) in [
            (
                "5,25,10",
                "the percentages must increase: 10 comes after 25",
            ),
            ("5,5", "the percentages must increase: 5 comes after 5"),
            (
                "0,100",
                "step 0: a percentage step is more than 0 and at most 100",
            ),
            (
                "50,101",
                "step 101: a percentage step is more than 0 and at most 100",
            ),
            ("12.345", "step 12.345: the split is set in steps of 0.01%"),
            ("5,,100", "a step is empty"),
            ("", "a step is empty"),
            ("-5,100", "step \"-5\" is neither a percentage"),
            ("1e2", "step \"1e2\" is neither a percentage"),
            ("10%%", "is neither a percentage"),
            (
                "int.ernal,100",
                "step \"int.ernal\": a cohort name has only letters",
            ),
            ("beta,beta,100", "cohort \"beta\" is given twice"),
        ] {
            // `=`: a value may start with '-'.
            let e = usage_error(&["canary", "web", "--to", "g", &format!("--steps={steps}")]);
            assert!(e.contains(want), "{steps:?}: want {want:?} in {e}");
            assert!(e.contains("--steps"), "{e}");
        }
        // Cohorts do not take part in the order of the percentages.
        assert_eq!(
            steps("5,qa_team-2,25").unwrap(),
            Steps(["5", "qa_team-2", "25"].map(String::from).to_vec())
        );
        assert!(crate::state::is_cohort_name("a1-_"));
        assert!(
            !crate::state::is_cohort_name("1a")
                && !crate::state::is_cohort_name("")
                && !crate::state::is_cohort_name("é")
        );

        let e = usage_error(&[
            "canary",
            "web",
            "--to",
            "g",
            "--steps",
            "50",
            "--baseline",
            "g",
        ]);
        assert!(e.contains("--baseline g is the group rolled out"), "{e}");
        let e = usage_error(&[
            "canary",
            "web",
            "--to",
            "g",
            "--steps",
            "50",
            "--interval",
            "0s",
        ]);
        assert!(e.contains("must be longer than 0"), "{e}");
        let e = usage_error(&[
            "canary", "web", "--to", "g", "--steps", "50", "--check", " ",
        ]);
        assert!(e.contains("the command is empty"), "{e}");
        usage_error(&["canary", "web", "--steps", "50"]); // no --to
        usage_error(&["canary", "web", "--to", "g"]); // no --steps
        usage_error(&[
            "canary",
            "web",
            "--to",
            "g",
            "--steps",
            "50",
            "--min-flows",
            "-1",
        ]);
    }

    #[test]
    fn rolling_batches_and_timeouts() {
        assert_eq!(
            plan(&[
                "rolling",
                "web",
                "--batch",
                "25%",
                "--exec",
                "systemctl restart app@$ZDD_BACKEND",
                "--drain-timeout",
                "0s",
                "--exec-timeout",
                "5m",
                "--health-timeout",
                "90s"
            ]),
            Ok(Plan::Follow(Command::Rolling {
                service: "web".into(),
                batch: "25%".into(),
                exec: "systemctl restart app@$ZDD_BACKEND".into(),
                drain_timeout: Some("0s".into()),
                exec_timeout: Some("5m".into()),
                health_timeout: Some("90s".into()),
            }))
        );
        assert!(matches!(
            plan(&[
                "rolling", "web", "--batch", "2", "--exec", "true", "--detach"
            ]),
            Ok(Plan::Request(Command::Rolling { .. }))
        ));
        assert_eq!(batch("1"), Ok("1".into()));
        assert_eq!(batch("100%"), Ok("100%".into()));
        for bad in ["0", "0%", "101%", "2.5", "x", "", "-1", "25 %"] {
            let e = usage_error(&[
                "rolling",
                "web",
                &format!("--batch={bad}"),
                "--exec",
                "true",
            ]);
            assert!(
                e.contains("a batch is a number of backends"),
                "{bad:?}: {e}"
            );
        }
        let e = usage_error(&["rolling", "web", "--batch", "1", "--exec", ""]);
        assert!(e.contains("the command is empty"), "{e}");
        let e = usage_error(&[
            "rolling",
            "web",
            "--batch",
            "1",
            "--exec",
            "true",
            "--health-timeout",
            "5",
        ]);
        assert!(e.contains("needs a unit"), "{e}");
        usage_error(&["rolling", "web", "--batch", "1"]); // no --exec
    }

    #[test]
    fn deployment_controls_and_list() {
        let s = || "web".to_string();
        assert_eq!(request(&["pause", "web"]), Command::Pause { service: s() });
        assert_eq!(
            request(&["resume", "web"]),
            Command::Resume { service: s() }
        );
        assert_eq!(
            request(&["promote", "web"]),
            Command::Promote { service: s() }
        );
        assert_eq!(request(&["abort", "web"]), Command::Abort { service: s() });
        usage_error(&["pause"]);
        assert_eq!(
            request(&["deployments"]),
            Command::Deployments {
                service: None,
                limit: None
            }
        );
        assert_eq!(
            request(&["deployments", "web", "-n", "5"]),
            Command::Deployments {
                service: Some(s()),
                limit: Some(5)
            }
        );
        usage_error(&["deployments", "--limit", "x"]);
    }

    #[test]
    fn completions_know_the_deployment_commands() {
        let mut buf = Vec::new();
        clap_complete::generate(Shell::Bash, &mut Cli::command(), "zdd", &mut buf);
        let script = String::from_utf8(buf).unwrap();
        for word in [
            "canary",
            "rolling",
            "pause",
            "resume",
            "promote",
            "abort",
            "deployments",
            "--steps",
            "--min-flows",
            "--batch",
            "--exec-timeout",
            "--detach",
        ] {
            assert!(
                script.contains(word),
                "{word} is not in the bash completions"
            );
        }
    }

    #[test]
    fn percentages_print_without_needless_decimals() {
        assert_eq!(fmt_pct(95.0), "95");
        assert_eq!(fmt_pct(2.5), "2.5");
        assert_eq!(fmt_pct(33.33), "33.33");
        assert_eq!(fmt_pct(0.0), "0");
        assert_eq!(fmt_pct(100.0), "100");
    }
}
