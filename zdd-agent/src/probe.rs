//! Active probes: one task per checked backend, each probing the backend's own address
//! (not the VIP) every `interval` plus a random part of `jitter`, and sending each result to
//! the owner task. TCP: a connect. HTTP: one request (`Connection: close`), the status line
//! against `expect`, optionally the body against `body`; a probe slower than `max_latency`
//! fails. Every probe is bounded by `timeout`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    control::{Intent, now_ms},
    health::ProbeResult,
    state::{HealthKind, HealthSpec},
};

/// Longest response read for a `body` check.
const MAX_BODY: usize = 64 * 1024;

fn fail(started: Instant, detail: String) -> ProbeResult {
    ProbeResult {
        ok: false,
        latency_ms: started.elapsed().as_secs_f64() * 1e3,
        detail,
        at_ms: now_ms(),
    }
}

/// One probe of `addr`.
pub async fn probe(addr: SocketAddr, h: &HealthSpec) -> ProbeResult {
    let started = Instant::now();
    let timeout = Duration::from_millis(h.timeout_ms);
    let run = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if h.kind != HealthKind::Http {
            return Ok("connected".to_string());
        }
        let host = h.host.clone().unwrap_or_else(|| addr.to_string());
        let req = format!(
            "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: zdd-health\r\nConnection: close\r\n\r\n",
            h.method, h.path
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let have_head = buf.windows(4).any(|w| w == b"\r\n\r\n");
            if (have_head && h.body.is_none()) || buf.len() >= MAX_BODY {
                break;
            }
        }
        let text = String::from_utf8_lossy(&buf);
        let status: u16 = text
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| "no HTTP status line in the answer".to_string())?;
        if !h.expect.iter().any(|(a, b)| (*a..=*b).contains(&status)) {
            let want: Vec<String> = h
                .expect
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        format!("{a}")
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            return Err(format!("status {status} (expected {})", want.join(",")));
        }
        if let Some(b) = &h.body
            && !text.contains(b.as_str())
        {
            return Err(format!("status {status}, but the body lacks {b:?}"));
        }
        Ok(format!("status {status}"))
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => fail(started, format!("timeout after {} ms", h.timeout_ms)),
        Ok(Err(e)) => fail(started, e),
        Ok(Ok(what)) => {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            if let Some(max) = h.max_latency_ms
                && ms > max as f64
            {
                return fail(
                    started,
                    format!("{what} in {ms:.1} ms, slower than max_latency {max} ms"),
                );
            }
            ProbeResult {
                ok: true,
                latency_ms: ms,
                detail: format!("{what} in {ms:.1} ms"),
                at_ms: now_ms(),
            }
        }
    }
}

/// A small random number (jitter need not be strong, only spread).
fn jitter(seed: &mut u64, max_ms: u64) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    if max_ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(*seed % (max_ms + 1))
}

/// The probe tasks, keyed by (service, backend); each knows what it probes, so a change of
/// address or health settings restarts it.
#[derive(Default)]
pub struct Probers {
    tasks: HashMap<(String, String), (SocketAddr, HealthSpec, JoinHandle<()>)>,
}

impl Probers {
    /// Makes the running probes match `want` (service, backend, address, settings).
    pub fn reconcile(
        &mut self,
        want: Vec<(String, String, SocketAddr, HealthSpec)>,
        to: &mpsc::Sender<Intent>,
    ) {
        let keys: std::collections::HashSet<(String, String)> = want
            .iter()
            .map(|(s, b, _, _)| (s.clone(), b.clone()))
            .collect();
        self.tasks.retain(|k, (_, _, t)| {
            let keep = keys.contains(k);
            if !keep {
                t.abort();
            }
            keep
        });
        for (service, backend, addr, spec) in want {
            let key = (service.clone(), backend.clone());
            if let Some((a, s, _)) = self.tasks.get(&key)
                && *a == addr
                && *s == spec
            {
                continue;
            }
            if let Some((_, _, t)) = self.tasks.remove(&key) {
                t.abort();
            }
            let to = to.clone();
            let h = spec.clone();
            let task = tokio::spawn(async move {
                let mut seed = (now_ms() ^ (addr.port() as u64) << 32) | 1;
                loop {
                    let result = probe(addr, &h).await;
                    let sent = to
                        .send(Intent::Probe {
                            service: service.clone(),
                            backend: backend.clone(),
                            addr,
                            result,
                        })
                        .await;
                    if sent.is_err() {
                        return;
                    }
                    tokio::time::sleep(
                        Duration::from_millis(h.interval_ms) + jitter(&mut seed, h.jitter_ms),
                    )
                    .await;
                }
            });
            self.tasks.insert(key, (addr, spec, task));
        }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Protocol;

    /// A one-shot HTTP server on loopback answering `answer` after `delay`.
    async fn server(answer: &'static str, delay: Duration) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                tokio::time::sleep(delay).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    fn http() -> HealthSpec {
        let mut h = HealthSpec::defaults(HealthKind::Http, Protocol::Tcp);
        h.path = "/healthz".into();
        h
    }

    #[tokio::test]
    async fn http_probes_check_status_body_latency_and_time() {
        let ok = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            Duration::ZERO,
        )
        .await;
        let r = probe(ok, &http()).await;
        assert!(r.ok, "{r:?}");
        let mut body = http();
        body.body = Some("ready".into());
        let r = probe(ok, &body).await;
        assert!(!r.ok && r.detail.contains("lacks \"ready\""), "{r:?}");
        let bad = server(
            "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
            Duration::ZERO,
        )
        .await;
        let r = probe(bad, &http()).await;
        assert!(
            !r.ok && r.detail.contains("status 500 (expected 200-399)"),
            "{r:?}"
        );
        let slow = server("HTTP/1.1 200 OK\r\n\r\n", Duration::from_millis(120)).await;
        let mut max = http();
        max.max_latency_ms = Some(50);
        let r = probe(slow, &max).await;
        assert!(
            !r.ok && r.detail.contains("slower than max_latency"),
            "{r:?}"
        );
        let mut short = http();
        short.timeout_ms = 40;
        let r = probe(slow, &short).await;
        assert!(!r.ok && r.detail.contains("timeout after 40 ms"), "{r:?}");
        // Nobody listens: a failed connect.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut tcp = HealthSpec::defaults(HealthKind::Tcp, Protocol::Tcp);
        tcp.timeout_ms = 200;
        let r = probe(closed, &tcp).await;
        assert!(!r.ok && r.detail.contains("connect"), "{r:?}");
        assert!(probe(ok, &tcp).await.ok);
    }
}
