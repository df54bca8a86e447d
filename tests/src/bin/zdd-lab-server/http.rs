//! HTTP/1.1: a thread per connection, keep-alive unless told otherwise.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
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
        let Some(req) = parse(&buf[..head_end]) else {
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
        if req.path == "/healthz" {
            if c.healthz_delay_ms > 0 {
                thread::sleep(Duration::from_millis(c.healthz_delay_ms));
            }
        } else if c.reset {
            // An abortive close: the client gets a TCP reset instead of an answer.
            let sock = socket2::SockRef::from(&s);
            let _ = sock.set_linger(Some(Duration::ZERO));
            return Ok(());
        }
        let status = if req.path == "/healthz" {
            c.healthz
        } else {
            200
        };
        s.write_all(&response(ident, &req, status))?;
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
}

impl Control {
    fn read(ident: &Ident) -> Control {
        let mut c = Control {
            healthz: 200,
            healthz_delay_ms: 0,
            reset: false,
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
                _ => {}
            }
        }
        c
    }
}

fn response(ident: &Ident, req: &Request, status: u16) -> Vec<u8> {
    let conn = if req.keep_alive {
        "keep-alive"
    } else {
        "close"
    };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nX-Backend: {}\r\nX-Group: {}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: {conn}\r\n\r\n",
        if status == 200 { "OK" } else { "Status" },
        ident.name,
        ident.group,
        ident.body.len()
    )
    .into_bytes();
    if !req.head_only {
        out.extend_from_slice(&ident.body);
    }
    out
}
