//! `cargo xtask lint`: rustfmt and clippy with warnings as errors, for the workspace and for
//! the eBPF crate (outside the workspace: nightly, bpfel-unknown-none, `-Z build-std=core`),
//! the same way in CI (`.ci/run`) and on a developer's machine.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Result, bail};

use crate::{BPF_TARGET, NIGHTLY, STABLE, describe, output, run, secs, status, step, tool};

/// Runs every check, also after one failed, then fails naming the ones that did.
pub fn lint(ws: &Path) -> Result<()> {
    let total = Instant::now();
    step("ensure rustfmt and clippy (stable), clippy and rust-src (nightly)");
    ensure_components(STABLE, &["rustfmt", "clippy"])?;
    ensure_components(NIGHTLY, &["clippy", "rust-src"])?;

    let ebpf = ws.join("zdd-ebpf");
    let mut checks: Vec<(&str, Command)> = Vec::new();

    // One formatter (stable rustfmt) for both: what `cargo fmt` runs in either folder.
    let mut cmd = crate::workspace_cargo(ws);
    cmd.args(["fmt", "--all", "--check"]);
    checks.push(("rustfmt: workspace (cargo +stable fmt --all --check)", cmd));

    let mut cmd = tool("cargo");
    cmd.current_dir(&ebpf)
        .arg(format!("+{STABLE}"))
        .args(["fmt", "--check"]);
    checks.push(("rustfmt: zdd-ebpf (cargo +stable fmt --check)", cmd));

    let mut cmd = crate::workspace_cargo(ws);
    // --keep-going: every crate's findings, not only the first failing crate's.
    cmd.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--keep-going",
        "--",
        "-D",
        "warnings",
    ]);
    checks.push((
        "clippy: workspace (cargo +stable clippy --workspace --all-targets --keep-going -- -D warnings)",
        cmd,
    ));

    // As build-ebpf builds it (release profile, same target folder), checked instead of built.
    let mut cmd = tool("cargo");
    cmd.current_dir(&ebpf)
        .arg(format!("+{NIGHTLY}"))
        .args([
            "clippy",
            "--keep-going",
            "--release",
            "--target",
            BPF_TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(ws.join("target/ebpf"))
        .args(["--", "-D", "warnings"]);
    checks.push((
        "clippy: zdd-ebpf (cargo +nightly clippy --keep-going --release --target \
         bpfel-unknown-none -Z build-std=core -- -D warnings)",
        cmd,
    ));

    let mut failed = Vec::new();
    for (name, mut cmd) in checks {
        step(name);
        let t = Instant::now();
        match status(&mut cmd) {
            Ok(s) if s.success() => println!("    ok [{}]", secs(t)),
            Ok(s) => {
                println!("    FAILED ({s}) [{}]", secs(t));
                failed.push(name);
            }
            Err(e) => {
                println!("    FAILED: {e:#}");
                failed.push(name);
            }
        }
    }
    println!("==> lint total {}", secs(total));
    if !failed.is_empty() {
        bail!(
            "lint failed (details above):\n  {}\n`cargo fmt --all` (and `cargo fmt` in zdd-ebpf) \
             fixes formatting; clippy's messages say what to change",
            failed.join("\n  ")
        );
    }
    Ok(())
}

/// `rustup component add` for those of `components` that `toolchain` lacks.
fn ensure_components(toolchain: &str, components: &[&str]) -> Result<()> {
    let mut cmd = tool("rustup");
    cmd.args(["component", "list", "--installed", "--toolchain", toolchain]);
    let installed = output(cmd)?;
    // Listed as `clippy-x86_64-unknown-linux-gnu`, or `rust-src` without a target.
    let have = |c: &str| {
        installed
            .lines()
            .map(str::trim)
            .any(|l| l == c || l.strip_prefix(c).is_some_and(|rest| rest.starts_with('-')))
    };
    let missing: Vec<&str> = components.iter().copied().filter(|c| !have(c)).collect();
    if missing.is_empty() {
        println!("    {toolchain}: {} installed", components.join(", "));
        return Ok(());
    }
    let mut cmd = tool("rustup");
    cmd.args(["component", "add", "--toolchain", toolchain])
        .args(&missing);
    println!("    {toolchain}: installing {}", missing.join(", "));
    let line = describe(&cmd);
    run(cmd).map_err(|e| e.context(format!("`{line}` failed: check network access")))
}
