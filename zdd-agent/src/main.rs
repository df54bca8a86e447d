//! zdd-agent: the daemon. `run` attaches and serves; `check` validates a config.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "zdd-agent",
    version,
    about = "zero-downtime traffic shifting with XDP"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach to the configured interfaces, apply the live state and serve the control
    /// socket. SIGHUP applies the config file. SIGTERM stops the agent and leaves the data
    /// path forwarding (pinned); `detach` removes it.
    Run {
        #[arg(long, short, default_value = "/etc/zdd/zdd.toml")]
        config: PathBuf,
    },
    /// Remove zdd from the configured interfaces and its maps from bpffs (traffic to the VIPs
    /// stops being balanced). Refused while an agent runs.
    Detach {
        #[arg(long, short, default_value = "/etc/zdd/zdd.toml")]
        config: PathBuf,
    },
    /// Validate a config and say precisely what is wrong.
    Check {
        #[arg(long, short, default_value = "/etc/zdd/zdd.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { config } => match zdd_agent::config::load(&config) {
            Ok(c) => {
                let backends: usize = c.state.services.iter().map(|s| s.backends.len()).sum();
                println!(
                    "{}: ok ({} service(s), {} backend(s), interfaces {})",
                    config.display(),
                    c.state.services.len(),
                    backends,
                    c.agent.interfaces.join(",")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Detach { config } => {
            let cfg = match zdd_agent::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match zdd_agent::daemon::detach(&cfg.agent) {
                Ok(ifaces) if ifaces.is_empty() => {
                    println!(
                        "nothing to detach: no zdd pins in {}",
                        cfg.agent.pin_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Ok(ifaces) => {
                    println!(
                        "detached from {}; pins in {} removed",
                        ifaces.join(","),
                        cfg.agent.pin_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run { config } => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(zdd_agent::daemon::run(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
