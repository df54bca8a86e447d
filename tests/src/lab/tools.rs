//! The programs that the lab, `cargo xtask demo`, the benchmarks and the tests run, and the
//! package that provides each one.
//!
//! std only: xtask includes this file too (`#[path]`), to install what is missing before it
//! builds anything, so the table exists once.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::process::{Command, Stdio};

/// A program that something here runs, and where to get it.
#[derive(Debug)]
pub struct Tool {
    /// The command, as run (looked up on PATH).
    pub cmd: &'static str,
    /// Arguments for the presence check: they make the program print its version and exit.
    pub probe: &'static [&'static str],
    /// The Debian/Ubuntu packages that provide it, in order of preference (the first one that
    /// apt knows is installed).
    pub debian: &'static [&'static str],
    /// The Fedora/RHEL package.
    pub fedora: &'static str,
    /// The Arch Linux package.
    pub arch: &'static str,
    /// Who runs it, for the message that asks to install it.
    pub used_by: &'static str,
}

/// Every program run by the lab, the demo, the benchmarks and the tests (beyond coreutils).
pub const TOOLS: &[Tool] = &[
    Tool {
        cmd: "ip",
        probe: &["-V"],
        debian: &["iproute2"],
        fedora: "iproute",
        arch: "iproute2",
        used_by: "the lab: namespaces, veth pairs, addresses, routes",
    },
    Tool {
        cmd: "ethtool",
        probe: &["--version"],
        debian: &["ethtool"],
        fedora: "ethtool",
        arch: "ethtool",
        used_by: "the lab: GRO on every veth end, for XDP_TX/XDP_REDIRECT",
    },
    Tool {
        cmd: "curl",
        probe: &["--version"],
        debian: &["curl"],
        fedora: "curl",
        arch: "curl",
        used_by: "the lab tests: tests/tests/lab_smoke.rs",
    },
    Tool {
        cmd: "python3",
        probe: &["--version"],
        debian: &["python3"],
        fedora: "python3",
        arch: "python",
        used_by: "the control socket tests: a client of another uid (tests/tests/control.rs)",
    },
    Tool {
        cmd: "nft",
        probe: &["--version"],
        debian: &["nftables"],
        fedora: "nftables",
        arch: "nftables",
        used_by: "`bench e2e`: the nftables DNAT baseline",
    },
    Tool {
        cmd: "wrk",
        probe: &["--version"],
        debian: &["wrk"],
        fedora: "wrk",
        arch: "wrk",
        used_by: "`bench e2e`: the load generator",
    },
    Tool {
        cmd: "nginx",
        probe: &["-v"],
        // nginx-light is the small build (Debian 12, Ubuntu 22.04); later releases have
        // only `nginx`.
        debian: &["nginx-light", "nginx"],
        fedora: "nginx",
        arch: "nginx",
        used_by: "`bench e2e`: the backends' web server",
    },
    Tool {
        cmd: "prometheus",
        probe: &["--version"],
        debian: &["prometheus"],
        fedora: "golang-github-prometheus",
        arch: "prometheus",
        used_by: "the observability tests: the real Prometheus scrapes the agent and backends",
    },
    Tool {
        // Debian's name; upstream builds (Fedora, Arch) call it `alertmanager`, which
        // tests/src/observability.rs also accepts.
        cmd: "prometheus-alertmanager",
        probe: &["--version"],
        debian: &["prometheus-alertmanager"],
        fedora: "golang-github-prometheus-alertmanager",
        arch: "alertmanager",
        used_by: "the observability tests: the real Alertmanager receives the agent's alerts",
    },
    Tool {
        cmd: "bpftool",
        probe: &["version"],
        debian: &["bpftool"],
        fedora: "bpftool",
        arch: "bpf",
        used_by: "`bench datapath` with ZDD_BENCH_DUMP set: dumps the program's code",
    },
];

/// What the lab itself runs ([`crate::lab::preflight`] checks these).
pub const LAB: &[&str] = &["ip", "ethtool"];
/// `cargo xtask demo`.
pub const DEMO: &[&str] = LAB;
/// `cargo xtask test` (the lab, and clients that some lab tests run).
pub const TEST: &[&str] = &[
    "ip",
    "ethtool",
    "curl",
    "python3",
    "nft",
    "prometheus",
    "prometheus-alertmanager",
];
/// `cargo xtask bench datapath` (bpftool only with ZDD_BENCH_DUMP: see [`bench_datapath`]).
pub const BENCH_DATAPATH: &[&str] = LAB;
/// `cargo xtask bench e2e`.
pub const BENCH_E2E: &[&str] = &["ip", "ethtool", "nft", "wrk", "nginx"];

/// What `bench datapath` runs, given whether ZDD_BENCH_DUMP is set.
pub fn bench_datapath(dump: bool) -> Vec<&'static str> {
    let mut v = BENCH_DATAPATH.to_vec();
    if dump {
        v.push("bpftool");
    }
    v
}

/// The table entry of `cmd`. Panics for a command that is not in [`TOOLS`] (a caller's bug:
/// a unit test checks every list above).
pub fn tool(cmd: &str) -> &'static Tool {
    TOOLS
        .iter()
        .find(|t| t.cmd == cmd)
        .unwrap_or_else(|| panic!("`{cmd}` is not in the tool table (tests/src/lab/tools.rs)"))
}

/// Whether `cmd` can be started (found on PATH and executable). The exit status does not
/// count: some programs (wrk) exit nonzero after printing their version.
pub fn runnable(cmd: &str) -> Result<(), String> {
    runnable_with_path(cmd, None)
}

/// As [`runnable`], looking `cmd` up in `path` instead of this process's PATH when given.
pub fn runnable_with_path(cmd: &str, path: Option<&OsStr>) -> Result<(), String> {
    let t = tool(cmd);
    let mut c = Command::new(t.cmd);
    c.args(t.probe)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = path {
        // std looks the program up in the PATH given to the child.
        c.env("PATH", p);
    }
    match c.status() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Err("not found on PATH".into()),
        Err(e) => Err(format!("cannot be run: {e}")),
    }
}

/// The tools of `cmds` that cannot be run, each with the reason.
pub fn missing(cmds: &[&str]) -> Vec<(&'static Tool, String)> {
    missing_with_path(cmds, None)
}

/// As [`missing`], with [`runnable_with_path`].
pub fn missing_with_path(cmds: &[&str], path: Option<&OsStr>) -> Vec<(&'static Tool, String)> {
    cmds.iter()
        .filter_map(|c| runnable_with_path(c, path).err().map(|why| (tool(c), why)))
        .collect()
}

/// One line per missing tool, then the install command for each family of distributions, e.g.
///
/// ```text
/// `ethtool` not found on PATH (used by the lab: GRO on every veth end, ...)
/// install: Debian/Ubuntu: apt-get install ethtool; Fedora/RHEL: dnf install ethtool; Arch: pacman -S ethtool
/// ```
pub fn install_hint(missing: &[(&Tool, String)]) -> String {
    let mut s = String::new();
    for (t, why) in missing {
        s += &format!("`{}` {why} (used by {})\n", t.cmd, t.used_by);
    }
    let list = |f: &dyn Fn(&Tool) -> &str| {
        let mut v: Vec<&str> = Vec::new();
        for (t, _) in missing {
            let p = f(t);
            if !v.contains(&p) {
                v.push(p);
            }
        }
        v.join(" ")
    };
    s += &format!(
        "install: Debian/Ubuntu: apt-get install {}; Fedora/RHEL: dnf install {}; Arch: pacman -S {}",
        list(&|t| t.debian[0]),
        list(&|t| t.fedora),
        list(&|t| t.arch),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_names_tools_of_the_table_and_no_tool_twice() {
        for list in [
            LAB,
            DEMO,
            TEST,
            BENCH_DATAPATH,
            BENCH_E2E,
            &bench_datapath(true),
        ] {
            for cmd in list {
                let t = tool(cmd);
                assert!(!t.debian.is_empty(), "{cmd}: no Debian package");
                assert!(!t.fedora.is_empty() && !t.arch.is_empty(), "{cmd}");
            }
        }
        for (i, t) in TOOLS.iter().enumerate() {
            assert!(
                TOOLS[i + 1..].iter().all(|u| u.cmd != t.cmd),
                "{} twice",
                t.cmd
            );
        }
    }

    #[test]
    fn the_packages_are_the_ones_debian_ships() {
        // The exact names matter: they are what the message tells a user to install and what
        // xtask gives apt-get.
        let deb = |c| tool(c).debian;
        assert_eq!(deb("ip"), ["iproute2"]);
        assert_eq!(deb("ethtool"), ["ethtool"]);
        assert_eq!(deb("nft"), ["nftables"]);
        assert_eq!(deb("wrk"), ["wrk"]);
        assert_eq!(deb("nginx"), ["nginx-light", "nginx"]);
        assert_eq!(deb("curl"), ["curl"]);
        assert_eq!(deb("bpftool"), ["bpftool"]);
        assert_eq!(deb("prometheus"), ["prometheus"]);
        assert_eq!(deb("prometheus-alertmanager"), ["prometheus-alertmanager"]);
        assert_eq!(tool("ip").fedora, "iproute");
    }

    #[test]
    fn the_hint_names_the_package_of_every_missing_tool() {
        let m = vec![
            (tool("ip"), "not found on PATH".to_string()),
            (tool("nft"), "not found on PATH".to_string()),
        ];
        let h = install_hint(&m);
        assert!(
            h.contains("`ip` not found on PATH (used by the lab: "),
            "{h}"
        );
        assert!(
            h.contains("`nft` not found on PATH (used by `bench e2e`: "),
            "{h}"
        );
        assert!(
            h.contains("apt-get install iproute2 nftables;")
                && h.contains("dnf install iproute nftables;")
                && h.contains("pacman -S iproute2 nftables"),
            "{h}"
        );
    }

    #[test]
    fn a_tool_hidden_from_path_is_missing_and_named() {
        // A PATH that holds `ip` alone (a link to the real one): `ethtool` is missing there,
        // whether or not this machine has it.
        let real_ip = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join("ip"))
            .find(|p| p.is_file())
            .expect("`ip` on PATH (iproute2 is on every machine the lab runs on)");
        let dir = std::env::temp_dir().join(format!("zdd-tools-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(&real_ip, dir.join("ip")).unwrap();
        let m = missing_with_path(LAB, Some(dir.as_os_str()));
        let _ = std::fs::remove_dir_all(&dir);
        let names: Vec<&str> = m.iter().map(|(t, _)| t.cmd).collect();
        assert_eq!(names, ["ethtool"], "{m:?}");
        assert_eq!(m[0].1, "not found on PATH");
        let h = install_hint(&m);
        assert!(h.contains("apt-get install ethtool;"), "{h}");
        assert_eq!(
            runnable_with_path("ip", Some(dir.as_os_str())),
            Err("not found on PATH".into()),
            "the folder is gone"
        );
    }
}
