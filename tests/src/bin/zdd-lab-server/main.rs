//! zdd-lab-server: the lab's backend. Answers every HTTP request with 200 and its own name and
//! group (headers `X-Backend`, `X-Group`, `X-Version`), and echoes its name and group to every
//! UDP datagram. `GET /metrics` counts its requests in the Prometheus text format
//! (`zdd_lab_requests_total`, `zdd_lab_errors_total`), so Prometheus can compare groups.
//!
//! `zdd-lab-server --name blue-1 --group blue [--version v2] --listen 0.0.0.0:8080
//!  [--listen [::]:8080] [--udp-echo 0.0.0.0:9000] ...`

mod http;
mod udp;

use std::net::SocketAddr;
use std::process::exit;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread;

use socket2::{Domain, Protocol, Socket, Type};

const USAGE: &str = "usage: zdd-lab-server --name NAME --group GROUP [--version V] \
    [--listen ADDR:PORT]... [--udp-echo ADDR:PORT]... [--control FILE]";

/// Who this server is: what it says in every answer.
pub struct Ident {
    pub name: String,
    pub group: String,
    /// `--version V` (default `v1`): the release this server stands for.
    pub version: String,
    /// `<name> <group>\n`
    pub body: Vec<u8>,
    /// `--control FILE`: read at every request; lines `healthz=CODE`,
    /// `healthz_delay_ms=N`, `reset=1`, `status=CODE` make the server misbehave on purpose
    /// (tests).
    pub control: Option<std::path::PathBuf>,
    /// Requests answered or reset since start, `/metrics` and `/healthz` excepted.
    pub requests: AtomicU64,
    /// Of those, the ones answered with a status of 500 or more.
    pub errors: AtomicU64,
}

struct Args {
    ident: Ident,
    listen: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let (mut name, mut group, mut listen, mut udp) = (None, None, Vec::new(), Vec::new());
    let mut control = None;
    let mut version = "v1".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let addr = |v: String| v.parse::<SocketAddr>().map_err(|e| format!("{v}: {e}"));
        match flag.as_str() {
            "--name" => name = Some(value()?),
            "--group" => group = Some(value()?),
            "--version" => version = value()?,
            "--listen" => listen.push(addr(value()?)?),
            "--udp-echo" => udp.push(addr(value()?)?),
            "--control" => control = Some(value()?.into()),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    let (Some(name), Some(group)) = (name, group) else {
        return Err("--name and --group are required".into());
    };
    if listen.is_empty() && udp.is_empty() {
        return Err("nothing to serve: give --listen or --udp-echo".into());
    }
    // It goes into a header line and a label value as it is.
    if version.is_empty() || version.chars().any(|c| c.is_control()) {
        return Err(format!("--version {version:?}: give a non-empty word"));
    }
    let body = format!("{name} {group}\n").into_bytes();
    Ok(Args {
        ident: Ident {
            name,
            group,
            version,
            body,
            control,
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        },
        listen,
        udp,
    })
}

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    // [::]:P beside 0.0.0.0:P: the IPv6 socket must not claim IPv4 too.
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("zdd-lab-server: {e}\n{USAGE}");
        exit(2)
    });
    let ident = Arc::new(args.ident);
    let fail = |what: &str, addr: SocketAddr, e: std::io::Error| -> ! {
        eprintln!("zdd-lab-server: {what} {addr}: {e}");
        exit(1)
    };
    let mut threads = Vec::new();
    // UDP before TCP: whoever sees TCP accept knows that UDP is bound too.
    for addr in args.udp {
        let sock =
            socket(addr, Type::DGRAM, Protocol::UDP).unwrap_or_else(|e| fail("udp", addr, e));
        let ident = ident.clone();
        threads.push(thread::spawn(move || udp::echo(sock.into(), &ident)));
    }
    for addr in args.listen {
        let sock = socket(addr, Type::STREAM, Protocol::TCP)
            .and_then(|s| s.listen(1024).map(|()| s))
            .unwrap_or_else(|e| fail("listen", addr, e));
        let ident = ident.clone();
        threads.push(thread::spawn(move || http::accept_loop(sock.into(), ident)));
    }
    for t in threads {
        let _ = t.join();
    }
}
