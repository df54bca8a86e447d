//! The `zdd` command-line client: parses the command line ([`args`]), sends one request over
//! the agent's control socket ([`client`]) and prints the answer as text ([`render`],
//! [`deploy`]) or JSON. `canary` and `rolling` then follow the deployment they started
//! (`follow`).
//!
//! Exit codes: 0 done; 1 refused by the agent or failed (a followed deployment that did not
//! succeed); 2 usage; 130 Ctrl-C while following.

pub mod args;
pub mod client;
pub mod deploy;
mod follow;
pub mod pinned;
pub mod render;

use std::{
    io::{self, IsTerminal, Read, Write},
    path::Path,
    process::ExitCode,
};

use clap::{CommandFactory, Parser};
use serde::Deserialize;
use serde_json::Value;

use crate::api::{ApiError, Command, ErrorCode, StatusResult};
use args::{Cli, Cmd, Plan};
use client::{Client, Failure};
use render::Shape;

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// `zdd`'s main.
pub fn main() -> ExitCode {
    let cli = Cli::parse(); // usage errors exit 2 here
    // `apply`'s file is read first: a file that cannot be read is a failure (1), not usage.
    let text = match &cli.cmd {
        Cmd::Apply { file, .. } => match read_file(file) {
            Ok(t) => Some(t),
            Err(m) => return fail(&Failure::Failed(m), cli.json),
        },
        _ => None,
    };
    let plan = match cli.plan(|_| Ok(text.clone().unwrap_or_default())) {
        Ok(p) => p,
        Err(m) => {
            eprintln!("error: {m}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut out = Out { json: cli.json };
    match run(&cli, plan, &mut out) {
        Ok(code) => code,
        Err(f) => fail(&f, cli.json),
    }
}

fn read_file(path: &Path) -> Result<String, String> {
    if path == Path::new("-") {
        let mut s = String::new();
        io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read the config from standard input: {e}"))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Prints a failure: text on stderr; with `--json`, an agent's refusal also as JSON on stdout.
fn fail(f: &Failure, json: bool) -> ExitCode {
    if let (true, Failure::Refused(e)) = (json, f) {
        println!("{}", serde_json::json!({ "error": e }));
    }
    eprintln!("error: {f}");
    ExitCode::from(EXIT_FAILED)
}

/// Standard output. A closed pipe (`zdd events -f | head`) ends zdd quietly.
struct Out {
    json: bool,
}

impl Out {
    fn line(&mut self, s: &str) {
        let mut o = io::stdout().lock();
        if let Err(e) = writeln!(o, "{s}").and_then(|_| o.flush()) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: writing to standard output: {e}");
            std::process::exit(EXIT_FAILED.into());
        }
    }
}

fn run(cli: &Cli, plan: Plan, out: &mut Out) -> Result<ExitCode, Failure> {
    match plan {
        Plan::Completions(shell) => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "zdd", &mut buf);
            out.line(String::from_utf8_lossy(&buf).trim_end());
            Ok(ExitCode::SUCCESS)
        }
        Plan::PinnedStats(dir) => {
            let r = pinned::stats(&dir).map_err(Failure::Failed)?;
            if out.json {
                out.line(&serde_json::to_string(&r).unwrap_or_default());
            } else {
                out.line(&pinned::text(&r));
            }
            Ok(ExitCode::SUCCESS)
        }
        Plan::Lookup { name, op } => match find_backend(&cli.socket, &name)? {
            Found::One(service) => request(cli, op.command(service, name), out),
            Found::Many(services) => {
                eprintln!(
                    "error: services {} each have a backend named {name:?}: name it as \
                     SERVICE/NAME ({}/{name})",
                    services.join(", "),
                    services[0]
                );
                Ok(ExitCode::from(EXIT_USAGE))
            }
        },
        Plan::Request(cmd) => request(cli, cmd, out),
        Plan::Follow(cmd) => follow::follow(&cli.socket, cmd, out),
    }
}

enum Found {
    One(String),
    Many(Vec<String>),
}

/// The service that has a backend called `name`, from the agent's status.
fn find_backend(socket: &Path, name: &str) -> Result<Found, Failure> {
    let mut c = Client::send(
        socket,
        Command::Status {
            service: None,
            watch: false,
            interval: None,
        },
    )?;
    let v = c.answer()?.unwrap_or(Value::Null);
    let status = StatusResult::deserialize(&v)
        .map_err(|e| Failure::Failed(format!("unreadable status from zdd-agent ({e}): {v}")))?;
    let mut services: Vec<String> = status
        .services
        .into_iter()
        .filter(|s| s.backends.iter().any(|b| b.name == name))
        .map(|s| s.name)
        .collect();
    match services.len() {
        0 => Err(Failure::Refused(ApiError::new(
            ErrorCode::UnknownBackend,
            format!("no service has a backend named {name:?}; `zdd status` lists them"),
        ))),
        1 => Ok(Found::One(services.remove(0))),
        _ => Ok(Found::Many(services)),
    }
}

/// Sends `cmd` and prints every answer line.
fn request(cli: &Cli, cmd: Command, out: &mut Out) -> Result<ExitCode, Failure> {
    let shape = Shape::of(&cmd);
    let watch = matches!(cmd, Command::Status { watch: true, .. });
    let drain_wait = matches!(cmd, Command::BackendDrain { wait: true, .. });
    let clear = watch && !out.json && io::stdout().is_terminal();
    let mut code = ExitCode::SUCCESS;
    let mut c = Client::send(&cli.socket, cmd)?;
    let mut first = true;
    while let Some(v) = c.answer()? {
        if out.json {
            match (&v, shape) {
                // Events are JSON Lines, one event a line, with --follow or without.
                (Value::Array(events), Shape::Events) => {
                    for e in events {
                        out.line(&e.to_string());
                    }
                }
                _ => out.line(&v.to_string()),
            }
        } else {
            let text = render::human(shape, &v);
            if clear {
                out.line(&format!("\x1b[H\x1b[2J{text}"));
            } else {
                if watch && !first {
                    out.line("");
                }
                if !text.is_empty() {
                    out.line(&text);
                }
            }
        }
        // A drain that timed out with flows left did not do what was asked.
        if drain_wait
            && v.get("timed_out").and_then(Value::as_bool) == Some(true)
            && v.get("remaining_flows").and_then(Value::as_u64) > Some(0)
        {
            code = ExitCode::from(EXIT_FAILED);
        }
        first = false;
    }
    Ok(code)
}
