//! `cargo xtask bench datapath|e2e`: benchmarks that print numbers (see BENCHMARKS.md in the
//! design notes for the method: ratios against a baseline measured in the same run).

mod datapath;
mod e2e;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (kind, rest) = match args.split_first() {
        Some((k, r)) => (k.as_str(), r),
        None => ("", &[][..]),
    };
    let result = match kind {
        "datapath" => datapath::run(rest),
        "e2e" => e2e::run(rest),
        _ => Err(anyhow::anyhow!("usage: zdd-bench datapath|e2e [--quick]")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
