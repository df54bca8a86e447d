//! A minimal HTTP/1.1 client for tests: one GET, one response, nothing left unread.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Connect, read and write timeout: a test fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// `X-Backend`, empty if absent.
    pub backend: String,
    /// `X-Group`, empty if absent.
    pub group: String,
    pub body: Vec<u8>,
    /// The server said `Connection: close`.
    pub close: bool,
}

/// Sends one keep-alive GET on `stream` and reads exactly its response (by Content-Length), so
/// the connection can carry the next one. Sets [`IO_TIMEOUT`] on a stream without timeouts.
pub fn http_get(stream: &mut TcpStream, host: &str, path: &str) -> Result<Response> {
    request(stream, host, path, false)
}

/// One connection, one GET with `Connection: close`, all under [`IO_TIMEOUT`].
pub fn connect_and_get(addr: SocketAddr) -> Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    request(&mut s, &addr.to_string(), "/", true).with_context(|| format!("GET from {addr}"))
}

/// As [`connect_and_get`], from source address `src` (one of the client's addresses).
pub fn connect_from_and_get(src: std::net::IpAddr, addr: SocketAddr) -> Result<Response> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("binding to {src}"))?;
    sock.connect_timeout(&addr.into(), IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr} from {src}"))?;
    let mut s: TcpStream = sock.into();
    request(&mut s, &addr.to_string(), "/", true)
        .with_context(|| format!("GET from {addr} (source {src})"))
}

fn request(s: &mut TcpStream, host: &str, path: &str, close: bool) -> Result<Response> {
    if s.read_timeout()?.is_none() {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
    }
    if s.write_timeout()?.is_none() {
        s.set_write_timeout(Some(IO_TIMEOUT))?;
    }
    let conn = if close { "close" } else { "keep-alive" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n");
    s.write_all(req.as_bytes()).context("sending request")?;

    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > MAX_HEAD {
            bail!("response head over {MAX_HEAD} bytes");
        }
        let n = s.read(&mut chunk).context("reading response head")?;
        if n == 0 {
            bail!(
                "connection closed before a response ({} bytes read)",
                buf.len()
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let (mut backend, mut group, mut len, mut server_close) =
        (String::new(), String::new(), None, false);
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "x-backend" => backend = value.to_string(),
            "x-group" => group = value.to_string(),
            "content-length" => len = Some(value.parse::<usize>().context("bad Content-Length")?),
            "connection" => server_close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let len = len.context("response without Content-Length")?;
    let mut body = buf.split_off(head_end);
    if body.len() > len {
        bail!("{} bytes after the response body", body.len() - len);
    }
    let have = body.len();
    body.resize(len, 0);
    s.read_exact(&mut body[have..])
        .context("reading response body")?;
    Ok(Response {
        status,
        backend,
        group,
        body,
        close: server_close,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
