//! The agent as a user runs it: the `zdd-agent` binary, started in the lab's edge namespace
//! with a config file, reloaded with SIGHUP, stopped with SIGTERM. Dropping the guard stops
//! it and removes its pins, also when a test panics.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::lab::{ChildGuard, EDGE_BACKEND_IFACE, EDGE_CLIENT_IFACE, Lab, Node};

/// The VIP the lab tests use (routed to the edge by the client's default route).
pub const VIP_V4: &str = "10.0.100.1";
pub const VIP_V6: &str = "fd00:100::1";

/// Path of a workspace binary next to the running test executable (target/<profile>/).
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("ZDD_{}_BIN", name.to_uppercase().replace('-', "_")))
    {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is not built: run `cargo xtask test` (or `cargo build --workspace`) first",
        bin.display()
    );
    bin
}

pub struct Agent<'a> {
    lab: &'a Lab,
    child: Option<ChildGuard>,
    config: PathBuf,
    log: PathBuf,
    pin_dir: PathBuf,
    reloads: usize,
    /// Extra `[agent]` settings (TOML lines) given to [`Agent::start_with`], kept on reloads.
    agent_extra: String,
}

impl<'a> Agent<'a> {
    /// The `[agent]` section the lab uses, then `services` (TOML `[[services]]` tables).
    pub fn config_text(lab: &Lab, services: &str) -> String {
        Self::config_text_with(lab, "", services)
    }

    /// As [`Agent::config_text`], with `agent_extra` (TOML lines such as
    /// `flow_table_size = 1024`) added to the `[agent]` section.
    pub fn config_text_with(lab: &Lab, agent_extra: &str, services: &str) -> String {
        format!(
            "[agent]\ninterfaces = [\"{EDGE_CLIENT_IFACE}\", \"{EDGE_BACKEND_IFACE}\"]\n\
             pin_dir = \"{}\"\nsocket = \"{}\"\n{agent_extra}\n\n{services}\n",
            Self::pin_dir_of(lab).display(),
            lab.log_dir().join("zdd.sock").display()
        )
    }

    fn pin_dir_of(lab: &Lab) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", lab.prefix()))
    }

    /// Starts `zdd-agent run` in the edge namespace and waits until it says it is ready.
    pub fn start(lab: &'a Lab, services: &str) -> Result<Agent<'a>> {
        Self::start_with(lab, "", services)
    }

    /// As [`Agent::start`], with extra `[agent]` settings (TOML lines, e.g.
    /// `flow_table_size = 1024`); [`Agent::reload`] keeps them.
    pub fn start_with(lab: &'a Lab, agent_extra: &str, services: &str) -> Result<Agent<'a>> {
        let config = lab.log_dir().join("zdd.toml");
        std::fs::write(&config, Self::config_text_with(lab, agent_extra, services))?;
        let log = lab.log_dir().join("zdd-agent.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(workspace_bin("zdd-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = lab.spawn(Node::Edge, cmd)?;
        let mut agent = Agent {
            lab,
            child: Some(child),
            config,
            log,
            pin_dir: Self::pin_dir_of(lab),
            reloads: 0,
            agent_extra: agent_extra.to_string(),
        };
        agent.wait_for("zdd-agent ready", 1, Duration::from_secs(15))?;
        Ok(agent)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    fn wait_for(&mut self, needle: &str, count: usize, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("zdd-agent exited ({status}) before {needle:?}:\n{log}");
            }
            if start.elapsed() > limit {
                bail!("zdd-agent did not say {needle:?} within {limit:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the config with `services`, sends SIGHUP and waits for the agent to apply it.
    /// Errors if the agent refused it (with its reason).
    pub fn reload(&mut self, services: &str) -> Result<()> {
        std::fs::write(
            &self.config,
            Self::config_text_with(self.lab, &self.agent_extra, services),
        )?;
        self.reload_file()
    }

    /// Sends SIGHUP for the config file as it is now.
    pub fn reload_file(&mut self) -> Result<()> {
        let refused_before = self.log().matches("reload refused").count();
        self.child
            .as_mut()
            .context("agent not running")?
            .signal(libc::SIGHUP)?;
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.matches("reloaded config").count() > self.reloads {
                self.reloads += 1;
                return Ok(());
            }
            if log.matches("reload refused").count() > refused_before {
                let line = log
                    .lines()
                    .rev()
                    .find(|l| l.contains("reload refused"))
                    .unwrap_or("");
                bail!("{line}");
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("no reload within 10 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut c = self.child.take().context("agent not running")?;
        c.signal(libc::SIGTERM)?;
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("zdd-agent did not stop within 10 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: the agent dies without cleaning up (a crash).
    pub fn kill(&mut self) -> Result<()> {
        let mut c = self.child.take().context("agent not running")?;
        c.kill()?;
        Ok(())
    }

    /// Runs `zdd --pin-dir <ours> ARGS` and returns stdout.
    pub fn zdd(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(workspace_bin("zdd"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("zdd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// (packets, bytes, new flows) of a service (`"service"`, by `VIP:port/proto`) or a
    /// backend (`"backend"`, by `addr:port`), read with `zdd stats`; None if not listed.
    pub fn counters(&self, kind: &str, what: &str) -> Result<Option<(u64, u64, u64)>> {
        let out = self.zdd(&["stats"])?;
        for l in out.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() == 8 && w[0] == kind && w[1] == what {
                let n = |i: usize| w[i].parse::<u64>().with_context(|| format!("in {l:?}"));
                return Ok(Some((n(3)?, n(5)?, n(7)?)));
            }
        }
        Ok(None)
    }

    /// One data-path counter, read with `zdd stats`.
    pub fn stat(&self, name: &str) -> Result<u64> {
        let out = self.zdd(&["stats"])?;
        out.lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(name)).then(|| it.next()?.parse().ok())?
            })
            .with_context(|| format!("no counter {name} in:\n{out}"))
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.signal(libc::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // A crashed agent leaves pins (that is their point); the test's are removed here.
        if self.pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}
