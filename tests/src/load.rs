//! Continuous load for the zero-downtime tests: from the client namespace, new connections
//! (one request each) at a steady rate, and keep-alive connections that send a request every
//! few milliseconds and check that they stay on their first backend. Counts failed requests
//! (no answer, a reset, or any status but 200, so 5xx answers too), resets and connections that
//! changed backend. Bounded: it stops when told, and at the
//! latest after `max_duration`.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    http::{IO_TIMEOUT, Response, http_get},
    lab::{Lab, Node, enter_netns},
};

/// What a load saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub new_ok: u64,
    pub new_failed: u64,
    pub keepalive_ok: u64,
    pub keepalive_failed: u64,
    /// Keep-alive requests answered by another backend than the connection's first one.
    pub moved: u64,
    /// New connections per group, in order of completion windows (for "follows the split").
    pub new_by_group: BTreeMap<String, u64>,
    /// Failed requests (new and keep-alive) per group, for those answered with a status other
    /// than 200 and an `X-Group` header (a failure without an answer has no group).
    pub failed_by_group: BTreeMap<String, u64>,
    /// The first few failures, for the assertion message.
    pub errors: Vec<String>,
}

impl LoadReport {
    pub fn failed(&self) -> u64 {
        self.new_failed + self.keepalive_failed
    }
}

#[derive(Default)]
struct Shared {
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    keepalive_ok: AtomicU64,
    keepalive_failed: AtomicU64,
    moved: AtomicU64,
    by_group: Mutex<BTreeMap<String, u64>>,
    failed_by_group: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn failed_in(&self, group: &str) {
        if group.is_empty() {
            return;
        }
        *self
            .failed_by_group
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(group.to_string())
            .or_default() += 1;
    }

    fn error(&self, e: String) {
        let mut v = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < 20 {
            v.push(e);
        }
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// How much load.
#[derive(Clone, Copy, Debug)]
pub struct LoadSpec {
    /// Threads opening new connections, each one at a time.
    pub new_conn_threads: usize,
    /// Pause between two new connections of a thread.
    pub new_conn_pause: Duration,
    /// Keep-alive connections (one thread each).
    pub keepalive: usize,
    pub keepalive_pause: Duration,
    /// The load stops by itself after this, whatever happens.
    pub max_duration: Duration,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            new_conn_threads: 2,
            new_conn_pause: Duration::from_millis(5),
            keepalive: 4,
            keepalive_pause: Duration::from_millis(10),
            max_duration: Duration::from_secs(120),
        }
    }
}

impl Load {
    /// Starts the load against `vip` from the lab's client namespace.
    pub fn start(lab: &Lab, vip: SocketAddr, spec: LoadSpec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let ns = lab.ns_name(Node::Client).to_string();
        let until = Instant::now() + spec.max_duration;
        let mut threads = Vec::new();
        for _ in 0..spec.new_conn_threads {
            let (stop, shared, ns) = (stop.clone(), shared.clone(), ns.clone());
            threads.push(std::thread::spawn(move || {
                if let Err(e) = enter_netns(&ns) {
                    shared.error(format!("entering {ns}: {e}"));
                    return;
                }
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    match one_request(vip) {
                        Ok(r) if r.status == 200 => {
                            shared.new_ok.fetch_add(1, Ordering::Relaxed);
                            *shared
                                .by_group
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(r.group)
                                .or_default() += 1;
                        }
                        Ok(r) => {
                            shared.new_failed.fetch_add(1, Ordering::Relaxed);
                            shared.failed_in(&r.group);
                            shared.error(format!(
                                "new connection: status {} from {}",
                                r.status, r.backend
                            ));
                        }
                        Err(e) => {
                            shared.new_failed.fetch_add(1, Ordering::Relaxed);
                            shared.error(format!("new connection: {e:#}"));
                        }
                    }
                    std::thread::sleep(spec.new_conn_pause);
                }
            }));
        }
        for i in 0..spec.keepalive {
            let (stop, shared, ns) = (stop.clone(), shared.clone(), ns.clone());
            threads.push(std::thread::spawn(move || {
                if let Err(e) = enter_netns(&ns) {
                    shared.error(format!("entering {ns}: {e}"));
                    return;
                }
                let mut conn = match TcpStream::connect_timeout(&vip, IO_TIMEOUT) {
                    Ok(c) => c,
                    Err(e) => {
                        shared.keepalive_failed.fetch_add(1, Ordering::Relaxed);
                        shared.error(format!("keep-alive {i}: connect: {e}"));
                        return;
                    }
                };
                let mut first: Option<String> = None;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    match http_get(&mut conn, &vip.to_string(), "/") {
                        Ok(r) if r.status == 200 => {
                            shared.keepalive_ok.fetch_add(1, Ordering::Relaxed);
                            match &first {
                                None => first = Some(r.backend.clone()),
                                Some(b) if *b != r.backend => {
                                    shared.moved.fetch_add(1, Ordering::Relaxed);
                                    shared.error(format!(
                                        "keep-alive {i} moved from {b} to {}",
                                        r.backend
                                    ));
                                }
                                Some(_) => {}
                            }
                            // The server closes it gracefully (`Connection: close`): as an
                            // HTTP client does, open a new one (a new flow, maybe elsewhere).
                            if r.close {
                                match TcpStream::connect_timeout(&vip, IO_TIMEOUT) {
                                    Ok(c) => {
                                        conn = c;
                                        first = None;
                                    }
                                    Err(e) => {
                                        shared.keepalive_failed.fetch_add(1, Ordering::Relaxed);
                                        shared.error(format!("keep-alive {i}: reconnect: {e}"));
                                        return;
                                    }
                                }
                            }
                        }
                        Ok(r) => {
                            shared.keepalive_failed.fetch_add(1, Ordering::Relaxed);
                            shared.failed_in(&r.group);
                            shared.error(format!(
                                "keep-alive {i}: status {} from {}",
                                r.status, r.backend
                            ));
                        }
                        Err(e) => {
                            // A broken keep-alive connection: counted once, not retried.
                            shared.keepalive_failed.fetch_add(1, Ordering::Relaxed);
                            shared.error(format!("keep-alive {i}: {e:#}"));
                            return;
                        }
                    }
                    std::thread::sleep(spec.keepalive_pause);
                }
            }));
        }
        Load {
            stop,
            shared,
            threads,
        }
    }

    /// What the load saw so far.
    pub fn report(&self) -> LoadReport {
        let s = &self.shared;
        LoadReport {
            new_ok: s.new_ok.load(Ordering::Relaxed),
            new_failed: s.new_failed.load(Ordering::Relaxed),
            keepalive_ok: s.keepalive_ok.load(Ordering::Relaxed),
            keepalive_failed: s.keepalive_failed.load(Ordering::Relaxed),
            moved: s.moved.load(Ordering::Relaxed),
            new_by_group: s.by_group.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            failed_by_group: s
                .failed_by_group
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            errors: s.errors.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Stops the load and waits for its threads.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.report()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One new connection, one request; the client closes first (so TIME_WAIT stays on the
/// client, whose port choice avoids it, and not on the backend, where a reused port would
/// meet it after NAT). Any answer is returned, whatever its status: the caller judges it.
fn one_request(vip: SocketAddr) -> anyhow::Result<Response> {
    let mut s = TcpStream::connect_timeout(&vip, IO_TIMEOUT)?;
    http_get(&mut s, &vip.to_string(), "/")
}
