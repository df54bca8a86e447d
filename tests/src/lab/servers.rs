//! The `zdd-lab-server` on each backend: start it and wait until it serves.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Backend, ChildGuard, HTTP_PORT, UDP_PORT, spawn};

/// How long a server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn log_path(log_dir: &Path, b: &Backend) -> std::path::PathBuf {
    log_dir.join(format!("{}.log", b.name))
}

/// The server's control file (see zdd-lab-server's `--control`).
pub(super) fn control_path(log_dir: &Path, b: &Backend) -> std::path::PathBuf {
    log_dir.join(format!("{}.control", b.name))
}

/// Starts the server in the backend's namespace; its stderr goes to a log file in `log_dir`.
pub(super) fn start(
    bin: &Path,
    ns: &str,
    b: &Backend,
    log_dir: &Path,
    extra: &[&str],
) -> Result<ChildGuard> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path(log_dir, b))
        .context("server log")?;
    let mut cmd = Command::new(bin);
    cmd.args(["--name", &b.name, "--group", &b.group])
        .args(["--listen", &format!("0.0.0.0:{HTTP_PORT}")])
        .args(["--listen", &format!("[::]:{HTTP_PORT}")])
        .args(["--udp-echo", &format!("0.0.0.0:{UDP_PORT}")])
        .args(["--udp-echo", &format!("[::]:{UDP_PORT}")])
        .arg("--control")
        .arg(control_path(log_dir, b))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    spawn::spawn_in(ns, cmd)
}

/// Polls a TCP connect to both of the backend's addresses from inside its namespace. The server
/// binds its UDP sockets before it listens on TCP, so this covers UDP too.
pub(super) fn wait_ready(ns: &str, b: &Backend, server: &mut ChildGuard, log: &Path) -> Result<()> {
    let targets = [b.http_v4(), b.http_v6()];
    let deadline = Instant::now() + READY_TIMEOUT;
    spawn::run_in(ns, || -> Result<()> {
        for addr in targets {
            loop {
                if connects(addr) {
                    break;
                }
                if let Some(st) = server.try_wait()? {
                    bail!("{} server exited ({st}): {}", b.name, log_tail(log));
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} server not accepting on {addr}: {}",
                        b.name,
                        log_tail(log)
                    );
                }
                thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    })?
}

fn connects(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

pub(super) fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("log {}: {}", log.display(), text[start..].trim())
}
