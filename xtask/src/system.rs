//! The system programs that `demo`, `bench` and `test` run (ip, ethtool, nft, wrk, nginx...):
//! installed with apt-get when missing on Debian/Ubuntu (as root, unless ZDD_NO_INSTALL is
//! set), otherwise named with the package to install.

use std::{env, fs, os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

// The one table of programs and packages, shared with the lab's preflight.
#[path = "../../tests/src/lab/tools.rs"]
#[allow(dead_code)]
pub mod tools;

/// Set (to anything but "", "0") to make xtask install nothing and fail naming the packages.
const NO_INSTALL: &str = "ZDD_NO_INSTALL";
/// Debian's hook that `invoke-rc.d` asks before it starts a service (101: do not).
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Makes sure that every program of `cmds` (names of [`tools::TOOLS`]) can be run, installing
/// the missing ones with apt-get where it can. `what` names the command for the messages.
pub fn ensure_tools(what: &str, cmds: &[&str], root: bool) -> Result<()> {
    crate::step(&format!(
        "check the programs for {what} ({})",
        cmds.join(", ")
    ));
    let missing = tools::missing(cmds);
    if missing.is_empty() {
        println!("    all present");
        return Ok(());
    }
    let hint = tools::install_hint(&missing);
    if let Some(why) = cannot_install(root) {
        bail!("{what} needs programs that are missing here ({why}):\n{hint}");
    }
    for (t, why) in &missing {
        println!("    `{}` {why} (used by {})", t.cmd, t.used_by);
    }
    let packages = debian_packages(&missing.iter().map(|(t, _)| *t).collect::<Vec<_>>())?;
    println!(
        "    installing with apt-get: {} (set {NO_INSTALL}=1 to install them yourself instead)",
        packages.join(" ")
    );
    apt_install(&packages).with_context(|| {
        format!(
            "installing {} with apt-get failed; the packages:\n{hint}",
            packages.join(" ")
        )
    })?;
    let still = tools::missing(cmds);
    if !still.is_empty() {
        bail!(
            "apt-get installed {} but these programs still cannot be run:\n{}",
            packages.join(" "),
            tools::install_hint(&still)
        );
    }
    println!("    installed; all present now");
    Ok(())
}

/// Why xtask cannot install packages here, if it cannot.
fn cannot_install(root: bool) -> Option<String> {
    if env::var(NO_INSTALL).is_ok_and(|v| !matches!(v.trim(), "" | "0")) {
        return Some(format!("{NO_INSTALL} is set, so xtask installs nothing"));
    }
    if !root {
        return Some("not root, so xtask cannot install them".into());
    }
    if !command_runs("apt-get", &["--version"]) {
        return Some(
            "no apt-get: this is not Debian/Ubuntu, so install them with your package manager"
                .into(),
        );
    }
    None
}

fn command_runs(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The Debian package of each tool: the first of its candidates that apt knows (`nginx-light`
/// where it exists, else `nginx`). Reads the package lists, so they are updated first.
fn debian_packages(missing: &[&tools::Tool]) -> Result<Vec<&'static str>> {
    crate::step("apt-get update");
    let mut cmd = apt("apt-get");
    cmd.args(["update", "-q"]);
    crate::run(cmd)
        .context("`apt-get update` failed: check network access and /etc/apt/sources.list*")?;
    let mut out: Vec<&'static str> = Vec::new();
    for t in missing {
        let pick = t
            .debian
            .iter()
            .copied()
            .find(|p| command_runs("apt-cache", &["show", "--no-all-versions", p]))
            .unwrap_or(t.debian[0]);
        if !out.contains(&pick) {
            out.push(pick);
        }
    }
    Ok(out)
}

fn apt(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    c.env("DEBIAN_FRONTEND", "noninteractive");
    c
}

fn apt_install(packages: &[&str]) -> Result<()> {
    crate::step(&format!("apt-get install {}", packages.join(" ")));
    // Package scripts must not start nginx as a system service (it would hold port 80, and the
    // user asked for a demo, not a web server). Leave an existing policy alone.
    let _policy = NoServiceStarts::install()?;
    let mut cmd = apt("apt-get");
    cmd.args(["install", "-y", "-q", "--no-install-recommends"])
        // Wait for another apt or dpkg (unattended upgrades) instead of failing at once.
        .args(["-o", "DPkg::Lock::Timeout=300"])
        .args(packages);
    crate::run(cmd)
}

/// A `policy-rc.d` that refuses every service start, removed when dropped (if it made one).
struct NoServiceStarts(bool);

impl NoServiceStarts {
    fn install() -> Result<NoServiceStarts> {
        let p = Path::new(POLICY_RC_D);
        if p.exists() {
            return Ok(NoServiceStarts(false));
        }
        fs::write(p, "#!/bin/sh\nexit 101\n").with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(p, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(NoServiceStarts(true))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.0 {
            let _ = fs::remove_file(POLICY_RC_D);
        }
    }
}
