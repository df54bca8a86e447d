//! One nginx per lab backend (one worker, keep-alive without a request limit, no access log,
//! a small fixed body naming the backend), and on request one more instance with several
//! workers on one backend (the direct base: as many workers as the balanced paths reach). Dropping [`Nginx`] stops them all with SIGTERM (nginx's
//! fast shutdown) and reaps them; the lab's log folder holds their files and goes with the lab.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use zdd_tests::{Backend, ChildGuard, Lab};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Nginx {
    servers: Vec<ChildGuard>,
}

fn config(dir: &Path, b: &Backend, port: u16, workers: u32) -> String {
    let d = dir.display();
    // Several workers: one listening socket each (reuseport), connections spread by the kernel's
    // hash, as the balancers spread them over the backends' single workers.
    let reuseport = if workers > 1 { " reuseport" } else { "" };
    // The body names the backend and the client address it saw (so that a check can see the
    // source address a path preserves); X-Backend/X-Group are what the lab's HTTP client reads.
    format!(
        "daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    default_type text/plain;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {port} backlog=4096{reuseport};
        location / {{
            add_header X-Backend {name} always;
            add_header X-Group {group} always;
            return 200 \"{name} $remote_addr\\n\";
        }}
    }}
}}
",
        name = b.name,
        group = b.group,
    )
}

impl Nginx {
    /// Starts nginx on every backend, listening on `port` on all of the backend's addresses
    /// (a VIP on its `lo` included), and waits until each accepts connections.
    pub fn start(lab: &Lab, port: u16) -> Result<Nginx> {
        Self::start_on(lab, lab.backends(), port, 1)
    }

    /// One nginx with `workers` workers on each of `backends`, listening on `port`.
    pub fn start_on(lab: &Lab, backends: &[Backend], port: u16, workers: u32) -> Result<Nginx> {
        let mut me = Nginx {
            servers: Vec::new(),
        };
        let mut dirs = Vec::new();
        for b in backends {
            let dir = lab.log_dir().join(format!("nginx-{}-{port}", b.name));
            std::fs::create_dir_all(&dir)?;
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, config(&dir, b, port, workers))?;
            let mut cmd = Command::new("nginx");
            cmd.arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            me.servers.push(lab.spawn(b.node, cmd)?);
            dirs.push(dir);
        }
        for ((b, s), dir) in backends.iter().zip(&mut me.servers).zip(&dirs) {
            wait_ready(lab, b, SocketAddr::new(b.ipv4.into(), port), s, dir)?;
        }
        Ok(me)
    }
}

fn wait_ready(
    lab: &Lab,
    b: &Backend,
    addr: SocketAddr,
    s: &mut ChildGuard,
    dir: &Path,
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    lab.in_ns(b.node, || -> Result<()> {
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            let log = || std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            if let Some(st) = s.try_wait()? {
                bail!("nginx of {} exited ({st}): {}", b.name, log());
            }
            if Instant::now() > deadline {
                bail!("nginx of {} not accepting on {addr}: {}", b.name, log());
            }
            thread::sleep(Duration::from_millis(10));
        }
    })
    .with_context(|| format!("starting nginx on {}", b.name))
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to all first, so they shut down in parallel; each guard then waits for its own
        // (and sends SIGKILL only if one is still there after the grace period).
        for s in &mut self.servers {
            let _ = s.signal(libc::SIGTERM);
        }
        self.servers.clear();
    }
}
