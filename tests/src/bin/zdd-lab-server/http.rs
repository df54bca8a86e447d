//! HTTP/1.1: a thread per connection, keep-alive unless told otherwise.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use crate::Ident;

const MAX_HEAD: usize = 16 * 1024;

pub fn accept_loop(listener: TcpListener, ident: Arc<Ident>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let ident = ident.clone();
                // A connection's failure (reset, vanished client) ends its thread only.
                thread::spawn(move || {
                    let _ = serve(stream, &ident);
                });
            }
            // E.g. EMFILE under load, ECONNABORTED: keep serving.
            Err(e) => {
                eprintln!("zdd-lab-server: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

struct Request {
    path: String,
    head_only: bool,
    keep_alive: bool,
    body_len: usize,
}

fn serve(mut s: TcpStream, ident: &Ident) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > MAX_HEAD {
                return Ok(());
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        // Unparseable: not a client of ours; drop the connection.
        let Some(mut req) = parse(&buf[..head_end]) else {
            return Ok(());
        };
        // Discard the body; whatever follows it is the next (pipelined) request.
        let buffered = (buf.len() - head_end).min(req.body_len);
        buf.drain(..head_end + buffered);
        let mut left = req.body_len - buffered;
        while left > 0 {
            let n = s.read(&mut chunk[..left.min(4096)])?;
            if n == 0 {
                return Ok(());
            }
            left -= n;
        }
        let c = Control::read(ident);
        // A graceful shutdown's first half: this answer says `Connection: close`, so a
        // keep-alive client opens a new connection (through the VIP: to another backend).
        if c.close {
            req.keep_alive = false;
        }
        // Probes and scrapes are not traffic: they are neither counted nor made to fail.
        if req.path == "/healthz" {
            if c.healthz_delay_ms > 0 {
                thread::sleep(Duration::from_millis(c.healthz_delay_ms));
            }
        } else if req.path != "/metrics" && c.reset {
            ident.requests.fetch_add(1, Ordering::Relaxed);
            // An abortive close: the client gets a TCP reset instead of an answer.
            let sock = socket2::SockRef::from(&s);
            let _ = sock.set_linger(Some(Duration::ZERO));
            return Ok(());
        }
        let out = if req.path == "/metrics" {
            response(&req, ident, 200, METRICS_TYPE, &metrics(ident))
        } else if req.path == "/healthz" {
            response(&req, ident, c.healthz, "text/plain", &ident.body)
        } else {
            let status = c.status.unwrap_or(200);
            ident.requests.fetch_add(1, Ordering::Relaxed);
            if status >= 500 {
                ident.errors.fetch_add(1, Ordering::Relaxed);
            }
            response(&req, ident, status, "text/plain", &ident.body)
        };
        s.write_all(&out)?;
        if !req.keep_alive {
            let _ = s.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

fn parse(head: &[u8]) -> Option<Request> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path, version) = (first.next()?, first.next()?, first.next()?);
    let mut keep_alive = version == "HTTP/1.1";
    let mut body_len = 0;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            body_len = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked bodies are not read: answer, then close rather than misparse.
            keep_alive = false;
        }
    }
    Some(Request {
        path: path.to_string(),
        head_only: method == "HEAD",
        keep_alive,
        body_len,
    })
}

/// What the control file says now (absent or unreadable: behave).
struct Control {
    healthz: u16,
    healthz_delay_ms: u64,
    reset: bool,
    /// `status=CODE`: every request but `/healthz` and `/metrics` is answered with CODE.
    status: Option<u16>,
    /// `close=1`: every answer closes its connection (`Connection: close`).
    close: bool,
}

impl Control {
    fn read(ident: &Ident) -> Control {
        let mut c = Control {
            healthz: 200,
            healthz_delay_ms: 0,
            reset: false,
            status: None,
            close: false,
        };
        let Some(text) = ident
            .control
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        else {
            return c;
        };
        for line in text.lines() {
            match line.trim().split_once('=') {
                Some(("healthz", v)) => c.healthz = v.trim().parse().unwrap_or(200),
                Some(("healthz_delay_ms", v)) => c.healthz_delay_ms = v.trim().parse().unwrap_or(0),
                Some(("reset", v)) => c.reset = v.trim() == "1",
                Some(("close", v)) => c.close = v.trim() == "1",
                Some(("status", v)) => c.status = v.trim().parse().ok().filter(|s| valid(*s)),
                _ => {}
            }
        }
        c
    }
}

/// A code an HTTP/1.1 status line can carry (three digits).
fn valid(status: u16) -> bool {
    (100..=999).contains(&status)
}

/// The Prometheus text format (what Prometheus 2.x scrapes by default).
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The counters in the Prometheus text format.
fn metrics(ident: &Ident) -> Vec<u8> {
    let labels = format!(
        "backend=\"{}\",group=\"{}\",version=\"{}\"",
        escape(&ident.name),
        escape(&ident.group),
        escape(&ident.version)
    );
    let mut out = String::new();
    for (name, help, v) in [
        (
            "zdd_lab_requests_total",
            "HTTP requests answered (or reset), /metrics and /healthz excepted",
            &ident.requests,
        ),
        (
            "zdd_lab_errors_total",
            "Of those, the ones answered with a status of 500 or more",
            &ident.errors,
        ),
    ] {
        out += &format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{labels}}} {}\n",
            v.load(Ordering::Relaxed)
        );
    }
    out.into_bytes()
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn response(req: &Request, ident: &Ident, status: u16, ctype: &str, body: &[u8]) -> Vec<u8> {
    let conn = if req.keep_alive {
        "keep-alive"
    } else {
        "close"
    };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nX-Backend: {}\r\nX-Group: {}\r\nX-Version: {}\r\n\
         Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n",
        reason(status),
        ident.name,
        ident.group,
        ident.version,
        body.len()
    )
    .into_bytes();
    if !req.head_only {
        out.extend_from_slice(body);
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
