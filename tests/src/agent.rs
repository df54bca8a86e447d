//! The agent as a user runs it: the `zdd-agent` binary, started in the lab's edge namespace
//! with a config file, reloaded with SIGHUP, stopped with SIGTERM. Dropping the guard stops
//! it and removes its pins, also when a test panics.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use zdd_agent::api::{StatsResult, StatusResult};

use crate::lab::{ChildGuard, EDGE_BACKEND_IFACE, EDGE_CLIENT_IFACE, Lab, Node};

/// The VIP the lab tests use (routed to the edge by the client's default route).
pub const VIP_V4: &str = "10.0.100.1";
pub const VIP_V6: &str = "fd00:100::1";

/// The `[[services]]` table most lab tests use: service "web" on `VIP_V4:80` (tcp, nat) with
/// `split` (TOML, e.g. `blue = 100, green = 0`) and every backend of the lab (IPv4, weight
/// 100).
pub fn web_service(lab: &Lab, split: &str) -> String {
    let mut s =
        format!("[[services]]\nname = \"web\"\nvip = \"{VIP_V4}:80\"\nsplit = {{ {split} }}\n");
    for b in lab.backends() {
        s += &format!(
            "\n[[services.backends]]\nname = \"{}\"\naddr = \"{}\"\ngroup = \"{}\"\n",
            b.name,
            b.http_v4(),
            b.group
        );
    }
    s
}

/// The data path's upgrade-test variant (other bytes, same maps and behaviour), built by
/// `cargo xtask test` as target/ebpf/zdd-variant.bpf.o.
pub fn variant_object() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/zdd-variant.bpf.o");
    assert!(
        p.is_file(),
        "{} is not built: run `cargo xtask test` (it builds the variant object)",
        p.display()
    );
    p
}

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
    /// Leave the pins when dropped (a restart hands them to the next agent).
    keep_pins: bool,
}

impl<'a> Agent<'a> {
    /// The `[agent]` section the lab uses, then `services` (TOML `[[services]]` tables).
    pub fn config_text(lab: &Lab, services: &str) -> String {
        Self::config_text_with(lab, "", services)
    }

    /// As [`Agent::config_text`], with `agent_extra` (TOML lines such as
    /// `flow_table_size = 1024`) added to the `[agent]` section.
    pub fn config_text_with(lab: &Lab, agent_extra: &str, services: &str) -> String {
        Self::config_text_in(lab, &Self::pin_dir_of(lab), agent_extra, services)
    }

    fn config_text_in(lab: &Lab, pin_dir: &Path, agent_extra: &str, services: &str) -> String {
        format!(
            "[agent]\ninterfaces = [\"{EDGE_CLIENT_IFACE}\", \"{EDGE_BACKEND_IFACE}\"]\n\
             pin_dir = \"{}\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n{agent_extra}\n\n{services}\n",
            pin_dir.display(),
            lab.log_dir().join("zdd.sock").display(),
            lab.log_dir().join("state").display()
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
        Self::start_in(lab, &Self::pin_dir_of(lab), agent_extra, services)
    }

    /// As [`Agent::start_with`], with `agent.pin_dir = pin_dir` (removed on drop as well).
    pub fn start_in(
        lab: &'a Lab,
        pin_dir: &Path,
        agent_extra: &str,
        services: &str,
    ) -> Result<Agent<'a>> {
        let config = lab.log_dir().join("zdd.toml");
        std::fs::write(
            &config,
            Self::config_text_in(lab, pin_dir, agent_extra, services),
        )?;
        let mut agent = Self::spawn(lab, pin_dir, agent_extra, config, false)?;
        agent.wait_for("zdd-agent ready", 1, Duration::from_secs(15))?;
        Ok(agent)
    }

    fn spawn(
        lab: &'a Lab,
        pin_dir: &Path,
        agent_extra: &str,
        config: PathBuf,
        keep_pins: bool,
    ) -> Result<Agent<'a>> {
        Self::spawn_env(lab, pin_dir, agent_extra, config, keep_pins, &[])
    }

    fn spawn_env(
        lab: &'a Lab,
        pin_dir: &Path,
        agent_extra: &str,
        config: PathBuf,
        keep_pins: bool,
        env: &[(&str, &Path)],
    ) -> Result<Agent<'a>> {
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
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = lab.spawn(Node::Edge, cmd)?;
        Ok(Agent {
            lab,
            child: Some(child),
            config,
            log,
            pin_dir: pin_dir.to_path_buf(),
            reloads: 0,
            agent_extra: agent_extra.to_string(),
            keep_pins,
        })
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

    /// The control socket (`agent.socket` in the lab's config).
    pub fn socket_path(&self) -> PathBuf {
        self.lab.log_dir().join("zdd.sock")
    }

    /// The state directory (`agent.state_dir` in the lab's config).
    pub fn state_dir(&self) -> PathBuf {
        self.lab.log_dir().join("state")
    }

    /// The status of one backend of `service`, as the socket's `status` answers it.
    pub fn backend_status(&self, service: &str, name: &str) -> Result<serde_json::Value> {
        let a = self.ask(&format!(r#"{{"cmd":"status","service":"{service}"}}"#))?;
        let st = crate::control::result(&a)?;
        st["services"][0]["backends"]
            .as_array()
            .and_then(|v| v.iter().find(|b| b["name"] == name))
            .cloned()
            .with_context(|| format!("no backend {name} in {st}"))
    }

    /// Sends one request line (JSON text) on a fresh connection and returns the answer.
    pub fn ask(&self, request: &str) -> Result<serde_json::Value> {
        crate::control::Client::connect(&self.socket_path())?.ask(request)
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
            Self::config_text_in(self.lab, &self.pin_dir, &self.agent_extra, services),
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

    /// Starts a new agent on the same pins, state and config (the old one stopped or
    /// killed before), with `services`. On failure the pins are left as they are (a failed
    /// start must not take the data path down); [`PinsGuard`] removes them at the end.
    pub fn restart(old: Agent<'a>, services: &str) -> Result<Agent<'a>> {
        Self::restart_with_env(old, services, &[])
    }

    /// As [`Agent::restart`], with extra environment for the new agent (e.g.
    /// `ZDD_XDP_OBJECT`, to start a rebuilt program).
    pub fn restart_with_env(
        mut old: Agent<'a>,
        services: &str,
        env: &[(&str, &Path)],
    ) -> Result<Agent<'a>> {
        old.keep_pins = true;
        let (lab, pin_dir, extra) = (old.lab, old.pin_dir.clone(), old.agent_extra.clone());
        drop(old);
        let config = lab.log_dir().join("zdd.toml");
        std::fs::write(
            &config,
            Self::config_text_in(lab, &pin_dir, &extra, services),
        )?;
        let mut agent = Self::spawn_env(lab, &pin_dir, &extra, config, true, env)?;
        agent.wait_for("zdd-agent ready", 1, Duration::from_secs(15))?;
        agent.keep_pins = false;
        Ok(agent)
    }

    /// SIGKILL: the agent dies without cleaning up (a crash).
    pub fn kill(&mut self) -> Result<()> {
        let mut c = self.child.take().context("agent not running")?;
        c.kill()?;
        Ok(())
    }

    /// The `zdd` command aimed at this agent's control socket (`zdd --socket PATH`), for the
    /// caller to add arguments to: for a child that streams (`events --follow`), or output the
    /// caller judges itself.
    pub fn zdd_command(&self) -> Command {
        let mut c = Command::new(workspace_bin("zdd"));
        c.env_remove("ZDD_SOCKET")
            .arg("--socket")
            .arg(self.socket_path())
            .stdin(Stdio::null());
        c
    }

    /// Runs `zdd --socket <ours> ARGS` and returns how it ended, whatever its exit code.
    pub fn zdd_run(&self, args: &[&str]) -> Result<ZddRun> {
        let out = self
            .zdd_command()
            .args(args)
            .output()
            .with_context(|| format!("running zdd {args:?}"))?;
        Ok(ZddRun {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `zdd --socket <ours> ARGS` and returns stdout; an error (with stderr) unless it
    /// exited 0.
    pub fn zdd(&self, args: &[&str]) -> Result<String> {
        let r = self.zdd_run(args)?;
        if r.code != 0 {
            bail!("zdd {args:?} exited {}: {}{}", r.code, r.stderr, r.stdout);
        }
        Ok(r.stdout)
    }

    /// Runs `zdd --socket <ours> --json ARGS` and parses its output (one JSON value); an
    /// error unless it exited 0.
    pub fn zdd_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.zdd(&all)?;
        serde_json::from_str(out.trim()).with_context(|| format!("zdd {all:?} printed {out:?}"))
    }

    /// The data-path counters, read with `zdd --json stats`.
    pub fn stats(&self) -> Result<StatsResult> {
        let v = self.zdd_json(&["stats"])?;
        serde_json::from_value(v.clone()).with_context(|| format!("zdd --json stats printed {v}"))
    }

    /// (packets, bytes, new flows) of a service (`"service"`: by name, by `VIP:port`, or by
    /// `VIP:port/proto`) or a backend (`"backend"`: by `service/name` or by `addr:port`),
    /// read with `zdd --json stats`; None if not listed.
    pub fn counters(&self, kind: &str, what: &str) -> Result<Option<(u64, u64, u64)>> {
        let stats = self.stats()?;
        let rows = match kind {
            "service" => &stats.services,
            "backend" => &stats.backends,
            _ => bail!("counters of {kind:?}: say \"service\" or \"backend\""),
        };
        // `VIP:port/proto`: the service with that VIP and protocol, from `zdd --json status`
        // (the stats rows give the VIP, not the protocol).
        let named = match what.rsplit_once('/') {
            Some((vip, proto)) if kind == "service" => {
                let st = self.zdd_json(&["status"])?;
                let status: StatusResult = serde_json::from_value(st.clone())
                    .with_context(|| format!("zdd --json status printed {st}"))?;
                match status
                    .services
                    .iter()
                    .find(|s| s.vip == vip && s.protocol == proto)
                {
                    Some(s) => s.name.clone(),
                    None => return Ok(None),
                }
            }
            _ => what.to_string(),
        };
        Ok(rows
            .iter()
            .find(|r| r.name == named || r.addr == named)
            .map(|r| (r.packets, r.bytes, r.new_flows)))
    }

    /// One data-path counter (`forward`, `reselected`, ... as in the README), read with
    /// `zdd --json stats`.
    pub fn stat(&self, name: &str) -> Result<u64> {
        let stats = self.stats()?;
        stats.global.get(name).copied().with_context(|| {
            format!(
                "no counter {name} in zdd stats: {:?}",
                stats.global.keys().collect::<Vec<_>>()
            )
        })
    }
}

/// How a `zdd` run ended: [`Agent::zdd_run`].
#[derive(Debug, Clone)]
pub struct ZddRun {
    /// The exit code (-1: killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
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
        if !self.keep_pins && self.pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

/// Removes an agent's pin directory when dropped (for tests whose last agent failed to start
/// and so left the pins to forward).
pub struct PinsGuard(pub PathBuf);

impl Drop for PinsGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
