//! Can a lab run here? And what a test does when it cannot.

use std::fs;
use std::io::Write;
use std::sync::OnceLock;
use std::thread;

use super::netns::NETNS_DIR;
use super::tools;

/// Checks what a lab needs: root, the programs of [`tools::LAB`] (`ip`, `ethtool`; a missing
/// one is named with its package), a usable /run/netns, and that a network namespace can
/// really be made (uid 0 in an unprivileged container cannot). Cached.
pub fn preflight() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT.get_or_init(check).clone()
}

fn check() -> Result<(), String> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root (geteuid != 0)".into());
    }
    let missing = tools::missing(tools::LAB);
    if !missing.is_empty() {
        // One line: it ends up in `ZDD-SKIPPED: <test>: <reason>`.
        return Err(format!(
            "{} (`cargo xtask demo`, `bench` and `test` install what is missing on Debian/Ubuntu)",
            tools::install_hint(&missing).replace('\n', "; ")
        ));
    }
    fs::create_dir_all(NETNS_DIR).map_err(|e| format!("cannot create {NETNS_DIR}: {e}"))?;
    // unshare affects only this short-lived thread; its namespace dies with it.
    let unshared = thread::spawn(|| {
        // SAFETY: plain syscall.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    })
    .join()
    .expect("unshare thread");
    unshared.map_err(|e| format!("cannot create a network namespace: {e}"))
}

/// True when the lab can run. Otherwise: if `ZDD_REQUIRE_PRIVILEGED` or `CI` is set, panics (a
/// skipped test must not pass for a run that promised to run it); if not, prints
/// `ZDD-SKIPPED: <test>: <reason>` and returns false so that the test returns early.
pub fn privileged_or_skip(test_name: &str) -> bool {
    let Err(reason) = preflight() else {
        return true;
    };
    if let Some(var) = ["ZDD_REQUIRE_PRIVILEGED", "CI"]
        .into_iter()
        .find(|v| env_set(v))
    {
        panic!("{test_name}: the lab cannot run here ({reason}), and {var} requires it to");
    }
    // Straight to fd 2: libtest captures print!/eprint! and would hide the line on success.
    let _ = writeln!(
        std::io::stderr().lock(),
        "ZDD-SKIPPED: {test_name}: {reason}"
    );
    false
}

fn env_set(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "no"))
}

/// The running test's name: libtest names each test's thread after the test.
pub fn current_test_name(fallback: &str) -> String {
    match thread::current().name() {
        Some(n) if n != "main" => n.to_string(),
        _ => fallback.to_string(),
    }
}
