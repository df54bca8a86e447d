//! zdd: the command-line client. Until the control socket lands it reads the pinned maps
//! directly, which works as long as an agent (or its pins) is there.

use std::{path::PathBuf, process::ExitCode};

use aya::maps::{Map, MapData, PerCpuArray};
use clap::{Parser, Subcommand};
use zdd_common::{LAYOUT_VERSION, Stat, map_names};

#[derive(Parser)]
#[command(name = "zdd", version, about = "zdd client")]
struct Cli {
    /// Base pin directory of the agent (agent.pin_dir).
    #[arg(long, default_value = "/sys/fs/bpf/zdd", global = true)]
    pin_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Data-path counters: verdicts and reasons, summed over CPUs.
    Stats,
}

fn stats(cli: &Cli) -> Result<Vec<(&'static str, u64)>, String> {
    let path = cli
        .pin_dir
        .join(format!("v{LAYOUT_VERSION}"))
        .join(map_names::GLOBAL_STATS);
    let data = MapData::from_pin(&path).map_err(|e| {
        format!(
            "cannot open {}: {e} (is zdd-agent running with agent.pin_dir = {}?)",
            path.display(),
            cli.pin_dir.display()
        )
    })?;
    let map = Map::from_map_data(data).map_err(|e| e.to_string())?;
    let m: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(|e| e.to_string())?;
    Stat::ALL
        .iter()
        .map(|s| {
            m.get(&(*s as u32), 0)
                .map(|v| (s.name(), v.iter().sum()))
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Stats => match stats(&cli) {
            Ok(values) => {
                if cli.json {
                    let body: Vec<String> =
                        values.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    println!("{{{}}}", body.join(","));
                } else {
                    for (k, v) in values {
                        println!("{k:<16} {v}");
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
