//! The real Prometheus and Alertmanager (Debian's `prometheus` and `prometheus-alertmanager`)
//! run inside a lab namespace, as an operator would run them beside the agent: Prometheus
//! scrapes the agent's and the backends' `/metrics`, Alertmanager receives the agent's alerts.
//!
//! Each listens on loopback of its namespace (Prometheus 127.0.0.1:9090, Alertmanager
//! 127.0.0.1:9093), so labs running at once do not collide; the agent runs in the edge
//! namespace, so that is where both usually go. Config, data and log files are written to the
//! lab's log folder; the log's tail is printed when a test panics. The processes are stopped
//! when the runner is dropped (also during a panic).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::lab::{ChildGuard, Lab, Node, tools};

/// Where Prometheus listens, inside its namespace.
pub const PROMETHEUS_ADDR: &str = "127.0.0.1:9090";
/// Where Alertmanager listens, inside its namespace.
pub const ALERTMANAGER_ADDR: &str = "127.0.0.1:9093";
/// How long either may take to say it is ready (Prometheus replays an empty WAL: well under).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// One HTTP exchange with either, connect to last byte.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// A series of a query's answer: its labels (`__name__` included when kept) and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// A server of the two (Prometheus or Alertmanager) running in a lab namespace, with its
/// config, data and log in the lab's log folder.
struct Daemon<'a> {
    lab: &'a Lab,
    node: Node,
    addr: &'static str,
    _child: ChildGuard,
    log: PathBuf,
}

impl<'a> Daemon<'a> {
    /// Writes `config` (JSON is YAML: no escaping of our own to get wrong), starts the first
    /// of `bins` found with the arguments `args(config file, data folder)` in `node`'s
    /// namespace, and waits until it answers `GET /-/ready`.
    fn start(
        lab: &'a Lab,
        node: Node,
        what: &str,
        bins: &[&'static str],
        addr: &'static str,
        config: Value,
        args: impl FnOnce(&Path, &Path) -> Vec<String>,
    ) -> Result<Daemon<'a>> {
        let name = format!("{}-{}", bins[0], node_label(lab, node));
        let config_file = lab.log_dir().join(format!("{name}.yml"));
        let data = lab.log_dir().join(format!("{name}-data"));
        let log = lab.log_dir().join(format!("{name}.log"));
        std::fs::write(&config_file, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("writing {}", config_file.display()))?;
        std::fs::create_dir_all(&data)?;
        let mut cmd = Command::new(binary(bins)?);
        cmd.args(args(&config_file, &data));
        let mut child = spawn_logged(lab, node, cmd, &log, what)?;
        wait_ready(lab, node, addr, &mut child, &log, what)?;
        Ok(Daemon {
            lab,
            node,
            addr,
            _child: child,
            log,
        })
    }

    fn get(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        get(self.lab, self.node, self.addr, path)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", log_tail(&self.log));
        }
    }
}

/// Prometheus, running in a lab namespace.
pub struct Prometheus<'a>(Daemon<'a>);

impl<'a> Prometheus<'a> {
    /// Starts Prometheus in `node`'s namespace, scraping every second each `(job, targets)` of
    /// `scrape` (targets as `host:port`, path `/metrics`), rules evaluated every second, and
    /// waits until it is ready.
    pub fn start(
        lab: &'a Lab,
        node: Node,
        scrape: &[(&str, Vec<String>)],
    ) -> Result<Prometheus<'a>> {
        let jobs: Vec<Value> = scrape
            .iter()
            .map(
                |(job, targets)| json!({"job_name": job, "static_configs": [{"targets": targets}]}),
            )
            .collect();
        let config = json!({
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": jobs,
        });
        Daemon::start(
            lab,
            node,
            "Prometheus",
            &["prometheus"],
            PROMETHEUS_ADDR,
            config,
            |config, data| {
                vec![
                    format!("--config.file={}", config.display()),
                    format!("--storage.tsdb.path={}", data.display()),
                    format!("--web.listen-address={PROMETHEUS_ADDR}"),
                    "--storage.tsdb.retention.time=1h".into(),
                ]
            },
        )
        .map(Prometheus)
    }

    /// Prometheus in the edge namespace as the tests use it: job `zdd` scrapes the agent's
    /// endpoint at `agent_metrics` (`ip:port`), job `backends` every lab backend's server.
    pub fn for_lab(lab: &'a Lab, agent_metrics: &str) -> Result<Prometheus<'a>> {
        let backends = lab
            .backends()
            .iter()
            .map(|b| b.http_v4().to_string())
            .collect();
        Self::start(
            lab,
            Node::Edge,
            &[
                ("zdd", vec![agent_metrics.to_string()]),
                ("backends", backends),
            ],
        )
    }

    /// The base URL, as seen from inside its namespace.
    pub fn url(&self) -> String {
        self.0.url()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.0.log()
    }

    /// An instant query (`/api/v1/query`): one `(labels, value)` per series; a scalar answer
    /// is one entry without labels. An error for a query Prometheus refuses (with its reason)
    /// and for range vectors (ask for an instant vector).
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let (_, body) = self.0.get(&path)?;
        let v: Value = serde_json::from_slice(&body)
            .with_context(|| format!("query {promql:?}: not JSON: {}", lossy(&body)))?;
        if v["status"] != "success" {
            bail!(
                "query {promql:?}: {} {}",
                v["errorType"].as_str().unwrap_or("?"),
                v["error"].as_str().unwrap_or("(no reason given)")
            );
        }
        let data = &v["data"];
        let sample = |pair: &Value| -> Result<f64> {
            pair[1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("query {promql:?}: bad sample {pair}"))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .context("vector without result")?
                .iter()
                .map(|s| {
                    let labels = s["metric"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                                .collect()
                        })
                        .unwrap_or_default();
                    Ok((labels, sample(&s["value"])?))
                })
                .collect(),
            Some("scalar") => Ok(vec![(BTreeMap::new(), sample(&data["result"])?)]),
            other => bail!("query {promql:?}: result type {other:?}, not an instant vector"),
        }
    }

    /// Polls `promql` until it returns at least one series (at most `timeout`) and returns
    /// them; the error names the query and the last answer or error.
    pub fn wait_for_series(&self, promql: &str, timeout: Duration) -> Result<Vec<Sample>> {
        self.wait_until(promql, timeout, |v| !v.is_empty())
    }

    /// Polls `promql` until `done` accepts its answer (at most `timeout`), every 250 ms.
    pub fn wait_until(
        &self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(&[Sample]) -> bool,
    ) -> Result<Vec<Sample>> {
        let start = Instant::now();
        loop {
            let last = self.query(promql);
            if let Ok(v) = &last
                && done(v)
            {
                return Ok(v.clone());
            }
            if start.elapsed() > timeout {
                bail!(
                    "query {promql:?}: not as expected within {timeout:?}; last answer: {}",
                    match last {
                        Ok(v) => format!("{v:?}"),
                        Err(e) => format!("{e:#}"),
                    }
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The scrape targets (`/api/v1/targets`, `activeTargets`).
    pub fn targets(&self) -> Result<Vec<Value>> {
        let (_, body) = self.0.get("/api/v1/targets")?;
        let v: Value = serde_json::from_slice(&body)
            .with_context(|| format!("targets: not JSON: {}", lossy(&body)))?;
        Ok(v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits until every target has been scraped successfully (health `up`).
    pub fn wait_targets_up(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let targets = self.targets()?;
            let down: Vec<String> = targets
                .iter()
                .filter(|t| t["health"] != "up")
                .map(|t| {
                    format!(
                        "{} {} ({}: {})",
                        t["labels"]["job"].as_str().unwrap_or("?"),
                        t["scrapeUrl"].as_str().unwrap_or("?"),
                        t["health"].as_str().unwrap_or("?"),
                        t["lastError"].as_str().unwrap_or("")
                    )
                })
                .collect();
            if !targets.is_empty() && down.is_empty() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "Prometheus targets not up within {timeout:?}: {}",
                    if targets.is_empty() {
                        "no target at all".to_string()
                    } else {
                        down.join("; ")
                    }
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Alertmanager, running in a lab namespace, with one receiver that sends nowhere: the
/// tests read the alerts back from its API.
pub struct Alertmanager<'a>(Daemon<'a>);

impl<'a> Alertmanager<'a> {
    /// Starts Alertmanager in `node`'s namespace (alerts grouped by name and sent on at once:
    /// group_wait 0s, group_interval 1s; no clustering) and waits until it is ready.
    pub fn start(lab: &'a Lab, node: Node) -> Result<Alertmanager<'a>> {
        let config = json!({
            "route": {
                "receiver": "null",
                "group_by": ["alertname"],
                "group_wait": "0s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [{"name": "null"}],
        });
        Daemon::start(
            lab,
            node,
            "Alertmanager",
            // Debian's name first; upstream's where it is installed under that one.
            &["prometheus-alertmanager", "alertmanager"],
            ALERTMANAGER_ADDR,
            config,
            |config, data| {
                vec![
                    format!("--config.file={}", config.display()),
                    format!("--storage.path={}", data.display()),
                    format!("--web.listen-address={ALERTMANAGER_ADDR}"),
                    // Empty: no gossip listener, a single instance.
                    "--cluster.listen-address=".into(),
                ]
            },
        )
        .map(Alertmanager)
    }

    /// The base URL, as seen from inside its namespace.
    pub fn url(&self) -> String {
        self.0.url()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.0.log()
    }

    /// The alerts it holds (`GET /api/v2/alerts`: active, silenced and inhibited ones).
    pub fn alerts(&self) -> Result<Vec<Value>> {
        let (status, body) = self.0.get("/api/v2/alerts")?;
        if status != 200 {
            bail!("GET /api/v2/alerts: status {status}: {}", lossy(&body));
        }
        let v: Value = serde_json::from_slice(&body)
            .with_context(|| format!("alerts: not JSON: {}", lossy(&body)))?;
        v.as_array()
            .cloned()
            .with_context(|| format!("alerts: not a list: {v}"))
    }

    /// Waits until no alert with label `alertname` is held any more (it was resolved).
    pub fn wait_until_gone(&self, alertname: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let held = self
                .alerts()
                .map(|v| v.iter().any(|a| a["labels"]["alertname"] == alertname));
            if let Ok(false) = held {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("alert {alertname:?} still held (or unreadable: {held:?}) after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until an alert with label `alertname` arrives (at most `timeout`) and returns it.
    pub fn wait_for_alert(&self, alertname: &str, timeout: Duration) -> Result<Value> {
        let start = Instant::now();
        loop {
            // A read that fails (a busy machine) is retried like one without the alert.
            let alerts = self.alerts();
            if let Some(a) = alerts.as_ref().ok().and_then(|v| {
                v.iter()
                    .find(|a| a["labels"]["alertname"] == alertname)
                    .cloned()
            }) {
                return Ok(a);
            }
            if start.elapsed() > timeout {
                let held = match &alerts {
                    Ok(v) => format!(
                        "alerts held: {:?}",
                        v.iter()
                            .map(|a| a["labels"]["alertname"].as_str().unwrap_or("?"))
                            .collect::<Vec<_>>()
                    ),
                    Err(e) => format!("the last read failed: {e:#}"),
                };
                bail!("no alert {alertname:?} within {timeout:?}; {held}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `edge`, `blue-1`, ...: the namespace's name without the lab's prefix.
fn node_label(lab: &Lab, node: Node) -> String {
    let ns = lab.ns_name(node);
    ns.strip_prefix(lab.prefix())
        .map(|s| s.trim_start_matches('-'))
        .unwrap_or(ns)
        .to_string()
}

/// The first of `names` on PATH; otherwise an error that names the package to install.
fn binary(names: &[&'static str]) -> Result<&'static str> {
    if let Some(n) = names.iter().find(|n| which(n).is_some()) {
        return Ok(n);
    }
    // The tool table knows the packages (the first name is the one it lists).
    let missing = tools::missing(&names[..1]);
    bail!(
        "{} (`cargo xtask test` installs it on Debian/Ubuntu)",
        tools::install_hint(&missing).replace('\n', "; ")
    )
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs `cmd` in `node`'s namespace with stdout and stderr to `log`, in the log folder as its
/// working directory (Prometheus writes nothing there, but a stray relative path lands in a
/// folder the lab removes).
fn spawn_logged(
    lab: &Lab,
    node: Node,
    mut cmd: Command,
    log: &Path,
    what: &str,
) -> Result<ChildGuard> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.current_dir(lab.log_dir())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    lab.spawn(node, cmd)
        .with_context(|| format!("starting {what} in {}", lab.ns_name(node)))
}

/// Polls `GET /-/ready` until it answers 200; an error with the log's tail if the process
/// exits or the time is up.
fn wait_ready(
    lab: &Lab,
    node: Node,
    addr: &str,
    child: &mut ChildGuard,
    log: &Path,
    what: &str,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Ok((200, _)) = get(lab, node, addr, "/-/ready") {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "{what} exited ({st}) before it was ready: {}",
                log_tail(log)
            );
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!(
                "{what} not ready on {addr} within {READY_TIMEOUT:?}: {}",
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One `GET` from inside `node`'s namespace: (status, body). HTTP/1.0, so the server sends the
/// body whole (never chunked) and closes the connection: read to the end.
fn get(lab: &Lab, node: Node, addr: &str, path: &str) -> Result<(u16, Vec<u8>)> {
    let sa: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let raw = lab.in_ns(node, || -> Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&sa, HTTP_TIMEOUT)?;
        s.set_read_timeout(Some(HTTP_TIMEOUT))?;
        s.set_write_timeout(Some(HTTP_TIMEOUT))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    });
    let raw = raw.with_context(|| format!("GET http://{addr}{path}"))?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("GET http://{addr}{path}: no response head"))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET http://{addr}{path}: bad status line in {head:?}"))?;
    Ok((status, raw[end + 4..].to_vec()))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    s.chars().take(500).collect()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(30);
    format!("log {}:\n{}", log.display(), lines[from..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urlencode_keeps_only_unreserved_characters() {
        assert_eq!(
            urlencode("sum by (group) (rate(x{a=\"b\"}[5s]))"),
            "sum%20by%20%28group%29%20%28rate%28x%7Ba%3D%22b%22%7D%5B5s%5D%29%29"
        );
        assert_eq!(urlencode("a-b_c.d~e"), "a-b_c.d~e");
    }
}
