//! `cargo xtask bench datapath|e2e|control`: benchmarks that print numbers (see BENCHMARKS.md in the
//! design notes for the method: ratios against a baseline measured in the same run).

mod control;
mod datapath;
mod e2e;

use std::{path::Path, process::ExitCode};

use zdd_tests::lab::{ensure_bpffs_and_say, tools};

/// Where both benchmarks pin (datapath: `zdd-bench-<pid>`, e2e: the agent's pin_dir).
const BPFFS: &str = "/sys/fs/bpf";

/// What a fresh machine lacks: every program the benchmark runs (named with its package when
/// missing; `cargo xtask bench` installs them on Debian/Ubuntu first), and a BPF filesystem at
/// [`BPFFS`] (mounted here when there is none).
fn prepare(cmds: &[&str]) -> anyhow::Result<()> {
    let missing = tools::missing(cmds);
    if !missing.is_empty() {
        anyhow::bail!(
            "missing programs (`cargo xtask bench` installs them on Debian/Ubuntu):\n{}",
            tools::install_hint(&missing)
        );
    }
    ensure_bpffs_and_say(Path::new(BPFFS), "zdd-bench")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (kind, rest) = match args.split_first() {
        Some((k, r)) => (k.as_str(), r),
        None => ("", &[][..]),
    };
    let result = match kind {
        "datapath" => prepare(&tools::bench_datapath(
            std::env::var_os("ZDD_BENCH_DUMP").is_some(),
        ))
        .and_then(|()| datapath::run(rest)),
        "e2e" => prepare(tools::BENCH_E2E).and_then(|()| e2e::run(rest)),
        "control" => prepare(tools::DEMO).and_then(|()| control::run(rest)),
        _ => Err(anyhow::anyhow!(
            "usage: zdd-bench datapath|e2e|control [--quick]"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
