//! Project automation: `cargo xtask build-ebpf`, `test`, `lint`, `demo` and `bench`.
//!
//! Only `rustup` with a stable and a nightly toolchain is assumed. Everything else
//! (the nightly's `rust-src`, a `bpf-linker` built against the nightly's own libLLVM)
//! is installed into the workspace's ignored `.build/` folder on first use.

use std::{
    env, fs,
    io::ErrorKind,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};

mod lint;
mod system;

use system::tools;

/// bpf-linker release pinned for the nightly's LLVM (0.13.0 offers llvm-21, llvm-22, llvm-23).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Target triple of the XDP object.
const BPF_TARGET: &str = "bpfel-unknown-none";
/// The `[[bin]]`s of zdd-ebpf/Cargo.toml and where each object is installed: the data path
/// (embedded in the agent), the benchmark's own programs (loaded by `zdd-bench` only) and the
/// lab's (attached by tests to their own veth ends).
const BPF_OBJECTS: &[(&str, &str)] = &[
    ("zdd", "zdd.bpf.o"),
    ("zdd-bench", "zdd-bench.bpf.o"),
    ("zdd-lab", "zdd-lab.bpf.o"),
];
/// Toolchain used for the eBPF build.
const NIGHTLY: &str = "nightly";
/// Toolchain used for host tools and the workspace.
const STABLE: &str = "stable";

#[derive(Parser)]
#[command(name = "xtask", about = "zdd project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain if missing (rust-src, bpf-linker) and build the XDP objects:
    /// target/ebpf/zdd.bpf.o (the data path), zdd-bench.bpf.o and zdd-lab.bpf.o (benchmark and
    /// tests only).
    BuildEbpf(BuildEbpfArgs),
    /// Build the eBPF object, build the whole workspace and run its tests.
    /// Arguments after `--` go to the test binaries (after `--test-threads=2`).
    Test(TestArgs),
    /// rustfmt and clippy (warnings are errors) for the workspace and the eBPF crate, as CI
    /// runs them.
    Lint,
    /// Bring up the lab, start the agent, move live traffic from blue to green in steps,
    /// print answers per group and failures per second, tear everything down.
    /// Installs the programs it runs (ip, ethtool) with apt-get when missing on Debian/Ubuntu.
    Demo(TestArgs),
    /// Benchmarks that print numbers: `datapath` (BPF_PROG_TEST_RUN against a floor
    /// program), `e2e` (the lab with wrk and nginx, against direct routing and nftables) or
    /// `control` (the control socket, switch latency, table rebuilds, flow counting).
    /// Installs the programs they run with apt-get when missing on Debian/Ubuntu.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// `datapath`, `e2e` or `control`.
    kind: String,
    /// Extra arguments for the benchmark (e.g. `--quick`).
    #[arg(last = true)]
    extra: Vec<String>,
}

#[derive(Args)]
struct BuildEbpfArgs {
    /// Install nothing and write no object: verify the toolchain (nightly, rust-src,
    /// an up-to-date bpf-linker) and type-check the eBPF crate with `cargo check`.
    #[arg(long)]
    check_only: bool,
}

#[derive(Args)]
struct TestArgs {
    /// Extra arguments passed to the test binaries.
    #[arg(last = true)]
    extra: Vec<String>,
}

fn main() {
    if let Err(err) = real_main() {
        // Print the context chain only: RUST_BACKTRACE=1 would otherwise make anyhow dump a
        // backtrace of xtask itself, which hides the message that says what to do.
        eprintln!("error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let ws = workspace_root()?;
    match cli.cmd {
        Cmd::BuildEbpf(args) => {
            let start = Instant::now();
            build_ebpf(&ws, args.check_only)?;
            println!("==> done in {}", secs(start));
        }
        Cmd::Test(args) => test(&ws, &args.extra)?,
        Cmd::Lint => lint::lint(&ws)?,
        Cmd::Demo(args) => run_lab_bin(&ws, false, "zdd-demo", tools::DEMO, &args.extra)?,
        Cmd::Bench(args) => {
            ensure!(
                matches!(args.kind.as_str(), "datapath" | "e2e" | "control"),
                "unknown benchmark `{}`: use `cargo xtask bench datapath`, `e2e` or `control`",
                args.kind
            );
            let needs = if args.kind == "e2e" {
                tools::BENCH_E2E.to_vec()
            } else if args.kind == "control" {
                tools::DEMO.to_vec()
            } else {
                tools::bench_datapath(env::var_os("ZDD_BENCH_DUMP").is_some())
            };
            let mut extra = vec![args.kind.clone()];
            extra.extend(args.extra);
            run_lab_bin(&ws, true, "zdd-bench", &needs, &extra)?
        }
    }
    Ok(())
}

/// The workspace root is the parent of xtask's manifest directory.
fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's CARGO_MANIFEST_DIR has no parent directory")
}

fn secs(since: Instant) -> String {
    format!("{:.1}s", since.elapsed().as_secs_f64())
}

fn step(name: &str) {
    println!("==> {name}");
}

// ---------------------------------------------------------------------------------------------
// Process helpers
// ---------------------------------------------------------------------------------------------

/// Environment variables set by the outer `cargo run` (or by the user) that would change which
/// toolchain, compiler, flags or target directory the inner cargo/rustc invocations use.
const INTERFERING_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_RUSTC_CURRENT_DIR",
    "CARGO_MAKEFLAGS",
    "CARGO_PROFILE_RELEASE_LTO",
];

/// A rustup proxy (`cargo`, `rustc`, `rustup`) that understands `+toolchain`.
///
/// Prefer `$CARGO_HOME/bin/<name>` so that a toolchain directory put first on PATH (older rustup
/// did that for child processes) cannot shadow the proxy.
fn proxy(name: &str) -> PathBuf {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        let p = home.join("bin").join(name);
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from(name)
}

/// Variables the outer `cargo run` sets for xtask itself; they describe xtask, not the
/// commands it runs.
const CARGO_RUN_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_RUSTC_CURRENT_DIR",
    "CARGO_MAKEFLAGS",
];

/// A command for a rustup proxy with an environment cleaned of everything that could change
/// the toolchain, compiler, flags or target directory (used for the nightly eBPF build and the
/// bpf-linker install).
fn tool(name: &str) -> Command {
    let mut cmd = light_tool(name);
    for var in INTERFERING_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// A command for a rustup proxy without the variables of the outer `cargo run`, but keeping
/// the user's own settings (RUSTFLAGS, CARGO_TARGET_DIR, ...), for the workspace build.
fn light_tool(name: &str) -> Command {
    let mut cmd = Command::new(proxy(name));
    for var in CARGO_RUN_ENV {
        cmd.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_") || key.starts_with("CARGO_TARGET_BPFEL_") {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Run a command and return its stdout; fail with the command line and its stderr.
fn output(mut cmd: Command) -> Result<String> {
    let line = describe(&cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// Run a command with inherited stdio; fail if it does not succeed.
fn run(mut cmd: Command) -> Result<()> {
    let status = status(&mut cmd)?;
    ensure!(status.success(), "`{}` failed ({status})", describe(&cmd));
    Ok(())
}

fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))
}

// ---------------------------------------------------------------------------------------------
// build-ebpf
// ---------------------------------------------------------------------------------------------

struct Nightly {
    /// Full `rustc +nightly -vV` output; it is the bpf-linker stamp.
    verbose_version: String,
    llvm_major: u32,
    llvm_full: String,
    sysroot: PathBuf,
}

fn build_ebpf(ws: &Path, check_only: bool) -> Result<()> {
    let t = Instant::now();
    step("find the nightly toolchain");
    let nightly = find_nightly().context(
        "step `find the nightly toolchain` failed: install it with \
         `rustup toolchain install nightly --profile minimal`",
    )?;
    println!(
        "    rustc {} (LLVM {}), sysroot {} [{}]",
        nightly
            .verbose_version
            .lines()
            .next()
            .unwrap_or("?")
            .trim_start_matches("rustc "),
        nightly.llvm_full,
        nightly.sysroot.display(),
        secs(t)
    );

    let t = Instant::now();
    step("ensure rust-src for nightly");
    ensure_rust_src(check_only).context(
        "step `ensure rust-src for nightly` failed: run \
         `rustup component add rust-src --toolchain nightly` and check network access",
    )?;
    println!("    [{}]", secs(t));

    let t = Instant::now();
    step(&format!(
        "ensure bpf-linker {BPF_LINKER_VERSION} (llvm-{})",
        nightly.llvm_major
    ));
    let tools_bin = ensure_bpf_linker(ws, &nightly, check_only).with_context(|| {
        if check_only {
            "step `ensure bpf-linker` failed: run `cargo xtask build-ebpf` (without --check-only) \
             to install or rebuild it"
                .to_string()
        } else {
            format!(
                "step `ensure bpf-linker` failed: it is built with `cargo +stable install \
                 bpf-linker --version {BPF_LINKER_VERSION} --features llvm-{}` against the \
                 nightly's libLLVM; check network access to crates.io, that a C++ toolchain \
                 (g++, libstdc++) is installed, and that {} holds libLLVM.so.*; delete {} to \
                 start over",
                nightly.llvm_major,
                nightly.sysroot.join("lib").display(),
                ws.join(".build").display()
            )
        }
    })?;
    println!("    [{}]", secs(t));

    let t = Instant::now();
    if check_only {
        step("check the eBPF crate (cargo +nightly check)");
        cargo_ebpf(ws, &tools_bin, "check").context(
            "step `check the eBPF crate` failed: fix the compile errors in zdd-ebpf reported above",
        )?;
        println!("    [{}]", secs(t));
        return Ok(());
    }

    step("build the eBPF objects (cargo +nightly build --release)");
    let built_dir = ws.join("target/ebpf").join(BPF_TARGET).join("release");
    let before: Vec<_> = BPF_OBJECTS
        .iter()
        .map(|(bin, _)| mtime(&built_dir.join(bin)))
        .collect();
    cargo_ebpf(ws, &tools_bin, "build").context(
        "step `build the eBPF object` failed: fix the errors reported above (compile errors are \
         in zdd-ebpf; `bpf-linker` errors may need `cargo xtask build-ebpf` after deleting .build/)",
    )?;
    let after: Vec<_> = BPF_OBJECTS
        .iter()
        .map(|(bin, _)| mtime(&built_dir.join(bin)))
        .collect();
    if before.iter().all(Option::is_some) && before == after {
        println!("    nothing rebuilt: objects are up to date [{}]", secs(t));
    } else {
        println!("    objects rebuilt [{}]", secs(t));
    }

    step("install the objects");
    for (bin, object) in BPF_OBJECTS {
        let dest = ws.join("target/ebpf").join(object);
        let changed = copy_if_changed(&built_dir.join(bin), &dest).context(
            "step `install the objects` failed: check that target/ebpf is writable and has free \
             space",
        )?;
        println!(
            "    {} ({})",
            dest.display(),
            if changed { "updated" } else { "unchanged" }
        );
    }
    Ok(())
}

fn find_nightly() -> Result<Nightly> {
    let mut cmd = tool("rustc");
    cmd.args([&format!("+{NIGHTLY}"), "-vV"]);
    let verbose_version = output(cmd)?;
    let llvm_full = verbose_version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .map(|v| v.trim().to_string())
        .context("`rustc +nightly -vV` prints no `LLVM version:` line")?;
    let llvm_major = llvm_full
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot parse the LLVM major version from `{llvm_full}`"))?;

    let mut cmd = tool("rustc");
    cmd.args([&format!("+{NIGHTLY}"), "--print", "sysroot"]);
    let sysroot = PathBuf::from(output(cmd)?.trim());
    ensure!(
        sysroot.is_dir(),
        "nightly sysroot {} is not a directory",
        sysroot.display()
    );
    Ok(Nightly {
        verbose_version,
        llvm_major,
        llvm_full,
        sysroot,
    })
}

fn ensure_rust_src(check_only: bool) -> Result<()> {
    let mut cmd = tool("rustup");
    cmd.args(["component", "list", "--toolchain", NIGHTLY, "--installed"]);
    let installed = output(cmd)?;
    if installed
        .lines()
        .any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src "))
    {
        println!("    rust-src is installed");
        return Ok(());
    }
    ensure!(!check_only, "rust-src is not installed for nightly");
    println!("    installing rust-src");
    let mut cmd = tool("rustup");
    cmd.args(["component", "add", "rust-src", "--toolchain", NIGHTLY]);
    run(cmd)
}

/// Make sure `<ws>/.build/tools/bin/bpf-linker` exists and was built for this nightly's LLVM.
/// Returns the directory holding it.
fn ensure_bpf_linker(ws: &Path, nightly: &Nightly, check_only: bool) -> Result<PathBuf> {
    let llvm_prefix = ws.join(".build/llvm");
    let tools = ws.join(".build/tools");
    let bin_dir = tools.join("bin");
    let linker = bin_dir.join("bpf-linker");
    let stamp_path = tools.join("bpf-linker.stamp");
    let features = format!("llvm-{}", nightly.llvm_major);
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION} --no-default-features --features {features}\n\
         LLVM_PREFIX {}\n{}",
        llvm_prefix.display(),
        nightly.verbose_version
    );

    let (lib_name, lib_path) = find_libllvm(&nightly.sysroot)?;
    let links_ok = libllvm_links_ok(&llvm_prefix.join("lib"), &lib_name, &lib_path);
    let stamp_ok = fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp);
    let exists = linker.is_file();

    if check_only {
        ensure!(
            exists && stamp_ok && links_ok,
            "{} is {}",
            linker.display(),
            if exists {
                "stale: built for another nightly/LLVM or version"
            } else {
                "missing"
            }
        );
        println!("    up to date: {}", linker.display());
        return Ok(bin_dir);
    }

    // Cheap and idempotent: keeps the rpath target valid even if the folder was cleaned.
    link_libllvm(&llvm_prefix.join("lib"), &lib_name, &lib_path)?;

    if exists && stamp_ok {
        println!(
            "    up to date: {} (stamp matches, nothing rebuilt)",
            linker.display()
        );
        return Ok(bin_dir);
    }
    if exists {
        println!("    stamp differs (nightly/LLVM or pinned version changed): rebuilding");
    } else {
        println!("    not installed: building from crates.io (about a minute or two)");
    }

    // Remove the stamp first, so an interrupted install is retried next time.
    match fs::remove_file(&stamp_path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", stamp_path.display())),
    }

    let mut cmd = tool("cargo");
    cmd.arg(format!("+{STABLE}"))
        .args(["install", "bpf-linker", "--locked", "--version"])
        .arg(BPF_LINKER_VERSION)
        .args(["--no-default-features", "--features", &features])
        .arg("--root")
        .arg(&tools)
        .env("LLVM_PREFIX", &llvm_prefix);
    if exists {
        cmd.arg("--force");
    }
    run(cmd)?;
    println!("    (cargo's PATH warning above is expected: xtask puts that folder on PATH itself)");

    ensure!(
        linker.is_file(),
        "cargo install succeeded but {} does not exist",
        linker.display()
    );
    // Smoke test: the binary must load the nightly's libLLVM through its rpath.
    let mut cmd = Command::new(&linker);
    cmd.arg("--version");
    let version = output(cmd).context("the freshly built bpf-linker does not run")?;
    println!("    built {}", version.trim());

    fs::create_dir_all(&tools)?;
    fs::write(&stamp_path, &stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(bin_dir)
}

/// The nightly's shared libLLVM: `<sysroot>/lib/libLLVM.so.*`.
fn find_libllvm(sysroot: &Path) -> Result<(String, PathBuf)> {
    let lib = sysroot.join("lib");
    let mut found: Vec<(String, PathBuf)> = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            name.starts_with("libLLVM.so.").then(|| (name, e.path()))
        })
        .collect();
    found.sort();
    match found.len() {
        0 => bail!(
            "no libLLVM.so.* in {} (is the nightly toolchain complete? \
             try `rustup toolchain install nightly --force`)",
            lib.display()
        ),
        1 => Ok(found.remove(0)),
        _ => bail!(
            "several libLLVM.so.* in {}: {:?}",
            lib.display(),
            found.iter().map(|(n, _)| n).collect::<Vec<_>>()
        ),
    }
}

fn libllvm_links_ok(dir: &Path, lib_name: &str, target: &Path) -> bool {
    ["libLLVM.so", lib_name]
        .iter()
        .all(|name| fs::read_link(dir.join(name)).is_ok_and(|t| t == target))
}

/// `<dir>/libLLVM.so` and `<dir>/<lib_name>` both link to the nightly's libLLVM.
fn link_libllvm(dir: &Path, lib_name: &str, target: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in ["libLLVM.so", lib_name] {
        let link = dir.join(name);
        if fs::read_link(&link).is_ok_and(|t| t == target) {
            continue;
        }
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", link.display())),
        }
        symlink(target, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    }
    // Links left over from an older nightly would be harmless but confusing.
    for entry in fs::read_dir(dir)?.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libLLVM.so.") && name != lib_name {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// `cargo +nightly <subcommand> --release --target bpfel-unknown-none -Z build-std=core` in
/// zdd-ebpf, with the workspace's bpf-linker first on PATH.
fn cargo_ebpf(ws: &Path, tools_bin: &Path, subcommand: &str) -> Result<()> {
    cargo_ebpf_in(ws, tools_bin, subcommand, &ws.join("target/ebpf"), &[])
}

/// The data path built with `--features variant` (other bytes, same maps and behaviour) as
/// `target/ebpf/zdd-variant.bpf.o`, for the test that starts a rebuilt program over a running
/// one. A target folder of its own, so the two builds do not rebuild each other.
fn build_ebpf_variant(ws: &Path) -> Result<()> {
    step("build the data path's upgrade-test variant (--features variant)");
    let nightly = find_nightly()?;
    let tools_bin = ensure_bpf_linker(ws, &nightly, false)?;
    let dir = ws.join("target/ebpf-variant");
    cargo_ebpf_in(
        ws,
        &tools_bin,
        "build",
        &dir,
        &["--features", "variant", "--bin", "zdd"],
    )
    .context("building the variant object failed (zdd-ebpf with --features variant)")?;
    let built = dir.join(BPF_TARGET).join("release").join("zdd");
    copy_if_changed(&built, &ws.join("target/ebpf/zdd-variant.bpf.o"))?;
    Ok(())
}

fn cargo_ebpf_in(
    ws: &Path,
    tools_bin: &Path,
    subcommand: &str,
    target_dir: &Path,
    extra: &[&str],
) -> Result<()> {
    let crate_dir = ws.join("zdd-ebpf");
    let path = env::var_os("PATH").unwrap_or_default();
    let path =
        env::join_paths(std::iter::once(tools_bin.to_path_buf()).chain(env::split_paths(&path)))
            .context("PATH contains an invalid entry")?;
    let mut cmd = tool("cargo");
    cmd.current_dir(&crate_dir)
        .arg(format!("+{NIGHTLY}"))
        .arg(subcommand)
        .args(["--release", "--target", BPF_TARGET, "-Z", "build-std=core"])
        .args(extra)
        .arg("--target-dir")
        .arg(target_dir)
        .env("PATH", path);
    run(cmd)
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Copy `src` to `dest` unless `dest` already has the same content. Returns whether it copied.
fn copy_if_changed(src: &Path, dest: &Path) -> Result<bool> {
    let new = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    if fs::read(dest).is_ok_and(|old| old == new) {
        return Ok(false);
    }
    // Write then rename, so readers never see a half-written object.
    let tmp = dest.with_extension("o.tmp");
    fs::write(&tmp, &new).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// test
// ---------------------------------------------------------------------------------------------

fn test(ws: &Path, extra: &[String]) -> Result<()> {
    let total = Instant::now();
    let ci = env::var_os("CI").is_some_and(|v| !v.is_empty());
    if ci {
        step("privilege check (CI is set)");
        let euid = effective_uid().context("step `privilege check` failed")?;
        ensure!(
            euid == 0,
            "step `privilege check` failed: CI is set but this runs as uid {euid}; the \
             privileged tests (XDP, network namespaces, bpffs) must not be skipped in CI. \
             Run as root (e.g. `sudo -E cargo xtask test`), or unset CI for a local run."
        );
    }

    // The lab tests need these; without them they skip (or fail when CI is set).
    let root = effective_uid().is_ok_and(|u| u == 0);
    if let Err(e) = system::ensure_tools("the lab tests", tools::TEST, root) {
        if ci {
            return Err(e);
        }
        println!("    warning: {e:#}\n    (the lab tests skip until these are installed)");
    }

    let t = Instant::now();
    build_ebpf(ws, false).context("cargo xtask test: building the eBPF object failed")?;
    build_ebpf_variant(ws)?;
    println!("    build-ebpf total [{}]", secs(t));

    let t = Instant::now();
    step("build the workspace (cargo build --workspace --all-targets)");
    let mut cmd = workspace_cargo(ws);
    cmd.args(["build", "--workspace", "--all-targets"]);
    run(cmd).context("step `build the workspace` failed: fix the compile errors reported above")?;
    println!("    [{}]", secs(t));

    let t = Instant::now();
    let mut cmd = workspace_cargo(ws);
    cmd.args(["test", "--workspace", "--", "--test-threads=2"])
        .args(extra);
    step(&format!(
        "run the tests (cargo test --workspace -- --test-threads=2{}{})",
        if extra.is_empty() { "" } else { " " },
        extra.join(" ")
    ));
    if ci {
        cmd.env("ZDD_REQUIRE_PRIVILEGED", "1");
    }
    let line = describe(&cmd);
    let status = status(&mut cmd)?;
    println!("    [{}]", secs(t));
    println!("==> total {}", secs(total));
    if !status.success() {
        eprintln!("error: step `run the tests` failed: `{line}` exited with {status}");
        std::process::exit(status.code().unwrap_or(101));
    }
    Ok(())
}

/// Installs the programs `needs` (names in tests/src/lab/tools.rs) where missing, builds the
/// eBPF object, the agent and the lab tools, then runs one of the lab tools (`zdd-demo`,
/// `zdd-bench`) as root.
fn run_lab_bin(
    ws: &Path,
    release: bool,
    bin: &str,
    needs: &[&str],
    extra: &[String],
) -> Result<()> {
    let euid = effective_uid()?;
    ensure!(
        euid == 0,
        "`{bin}` builds network namespaces and loads XDP programs: run it as root \
         (e.g. `sudo -E cargo xtask ...`)"
    );
    system::ensure_tools(&format!("`{bin}`"), needs, true)?;
    build_ebpf(ws, false).context("building the eBPF object failed")?;
    step(&format!("build zdd-agent, zdd and {bin}"));
    let mut cmd = workspace_cargo(ws);
    cmd.args(["build", "-p", "zdd-agent", "-p", "zdd-tests", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(cmd).context("building the binaries failed: fix the compile errors reported above")?;
    let path = ws
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join(bin);
    step(&format!("run {}", path.display()));
    let mut cmd = Command::new(&path);
    cmd.args(extra);
    let status = status(&mut cmd)?;
    if !status.success() {
        eprintln!("error: {bin} exited with {status}");
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// Stable cargo for the workspace, with the eBPF object's path exported.
fn workspace_cargo(ws: &Path) -> Command {
    let mut cmd = light_tool("cargo");
    cmd.current_dir(ws)
        .arg(format!("+{STABLE}"))
        .env("ZDD_EBPF_OBJECT", ws.join("target/ebpf/zdd.bpf.o"));
    cmd
}

fn effective_uid() -> Result<u32> {
    let mut cmd = Command::new("id");
    cmd.arg("-u");
    let out = output(cmd).context("running `id -u`")?;
    out.trim()
        .parse()
        .with_context(|| format!("`id -u` printed `{}`", out.trim()))
}
