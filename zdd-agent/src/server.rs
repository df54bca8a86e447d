//! The control socket: one task per client, each reading request lines (bounded in size and
//! time), checking who may change what (SO_PEERCRED), handing requests to the owner task and
//! writing its answers. A slow or stuck client only ever holds up its own task.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{broadcast, mpsc, oneshot},
};

use crate::{
    api::{self, ApiError, Command, ErrorCode, MAX_REQUEST_BYTES, Response},
    config::SocketGroup,
    control::{Intent, Peer},
};

/// A request started must be complete within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection without a request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that does not read an answer within this is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("control socket {path}: {message}")]
    Setup { path: PathBuf, message: String },
}

/// Creates the socket: its directory when missing, a stale socket file replaced (a live
/// one, answered by another agent, is an error), mode 0600 (root) or 0660 with the group.
pub async fn bind(path: &Path, group: Option<&SocketGroup>) -> Result<UnixListener, SocketError> {
    let fail = |message: String| SocketError::Setup {
        path: path.to_path_buf(),
        message,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(fail(format!(
                "another zdd-agent is using {} (it answers on it): stop it first, or give this one another agent.socket",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| fail(format!("removing a stale socket: {e}")))?;
    }
    let l = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("chmod: {e}")))?;
    if let Some(g) = group {
        std::os::unix::fs::chown(path, Some(0), Some(g.gid))
            .map_err(|e| fail(format!("chown to group {}: {e}", g.name)))?;
    }
    Ok(l)
}

/// Whether `peer` may make changes: root, or a member of `socket_group`.
pub fn may_change(peer: &Peer, group: Option<&SocketGroup>) -> bool {
    if peer.uid == 0 {
        return true;
    }
    let Some(g) = group else { return false };
    peer.gid == g.gid || member_of(peer.uid, g.gid)
}

/// Supplementary group membership of `uid` (from the user and group databases).
fn member_of(uid: u32, gid: u32) -> bool {
    // SAFETY: getpwuid's static result is read at once; getgrouplist writes at most `n`
    // entries into our buffer and says how many it needs.
    unsafe {
        let pw = libc::getpwuid(uid);
        if pw.is_null() {
            return false;
        }
        let name = (*pw).pw_name;
        let base = (*pw).pw_gid;
        let mut n: libc::c_int = 64;
        let mut groups = vec![0 as libc::gid_t; n as usize];
        if libc::getgrouplist(name, base, groups.as_mut_ptr(), &mut n) < 0 {
            groups = vec![0; n.max(0) as usize];
            if libc::getgrouplist(name, base, groups.as_mut_ptr(), &mut n) < 0 {
                return false;
            }
        }
        groups.truncate(n.max(0) as usize);
        groups.contains(&gid)
    }
}

/// Accepts clients until the owner's channel closes.
pub async fn serve(listener: UnixListener, to: mpsc::Sender<Intent>, group: Option<SocketGroup>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if to.is_closed() {
            return;
        }
        let to = to.clone();
        let group = group.clone();
        tokio::spawn(async move {
            if let Err(e) = client(stream, to, group).await {
                log::debug!("control socket client: {e}");
            }
        });
    }
}

/// Reads one line of at most `MAX_REQUEST_BYTES`. Ok(None) at a clean end of the stream.
async fn read_line(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Result<Option<String>, ApiError> {
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return String::from_utf8(line)
                .map(|s| Some(s.trim_end().to_string()))
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "a request must be UTF-8"));
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!("a request is at most {MAX_REQUEST_BYTES} bytes, newline included"),
            ));
        }
        // Idle between requests: a long wait; inside a request: a short one.
        let limit = if buf.is_empty() {
            IDLE_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        };
        let mut chunk = [0u8; 4096];
        let want = chunk.len().min(MAX_REQUEST_BYTES - buf.len());
        let n = match tokio::time::timeout(limit, stream.read(&mut chunk[..want])).await {
            Err(_) if buf.is_empty() => return Ok(None),
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::Timeout,
                    format!(
                        "the request was not finished within {}s: send one JSON object and a newline",
                        REQUEST_TIMEOUT.as_secs()
                    ),
                ));
            }
            Ok(Err(e)) => return Err(ApiError::new(ErrorCode::BadRequest, e.to_string())),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            // The client closed; a half-sent request is dropped.
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn write(stream: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = r.to_line();
    line.push('\n');
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(line.as_bytes())).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client does not read its answers",
        )),
    }
}

async fn ask(to: &mpsc::Sender<Intent>, cmd: Command, peer: Peer) -> Result<Value, ApiError> {
    let (tx, rx) = oneshot::channel();
    to.send(Intent::Request {
        cmd,
        peer,
        reply: tx,
    })
    .await
    .map_err(|_| ApiError::new(ErrorCode::Internal, "the agent is stopping"))?;
    rx.await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "the agent dropped the request"))?
}

async fn client(
    mut stream: UnixStream,
    to: mpsc::Sender<Intent>,
    group: Option<SocketGroup>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid().unwrap_or(0),
    };
    let mut buf = Vec::new();
    loop {
        let line = match read_line(&mut stream, &mut buf).await {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(e) => {
                // Too large, timed out or not UTF-8: say so and close (the stream's framing
                // cannot be trusted any more).
                let _ = write(&mut stream, &Response::err(Value::Null, e)).await;
                return Ok(());
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let req = match api::parse_request(&line) {
            Ok(r) => r,
            Err((id, e)) => {
                write(&mut stream, &Response::err(id, e)).await?;
                continue;
            }
        };
        let id = req.id.clone();
        if !req.cmd.is_read_only() && !may_change(&peer, group.as_ref()) {
            let who = match &group {
                Some(g) => format!("root or members of group {}", g.name),
                None => "root (set agent.socket_group to allow a group)".to_string(),
            };
            log::warn!(
                "refused {} from uid {} (pid {}): not allowed to make changes",
                req.cmd.name(),
                peer.uid,
                peer.pid
            );
            let e = ApiError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "uid {} may read status, stats and events but not make changes: changes are open to {who}",
                    peer.uid
                ),
            );
            write(&mut stream, &Response::err(id, e)).await?;
            continue;
        }
        match req.cmd {
            Command::Events {
                follow: true,
                limit,
            } => return follow_events(stream, &to, id, limit.unwrap_or(100)).await,
            Command::Status {
                watch: true,
                service,
                interval,
            } => {
                let every = match interval.as_deref().map(crate::config::parse_duration) {
                    None => Duration::from_secs(1),
                    Some(Ok(d)) if d >= Duration::from_millis(100) => d,
                    Some(Ok(_)) => {
                        let e = ApiError::new(ErrorCode::Invalid, "interval: at least 100ms");
                        write(&mut stream, &Response::err(id, e)).await?;
                        continue;
                    }
                    Some(Err(m)) => {
                        let e = ApiError::new(ErrorCode::Invalid, format!("interval: {m}"));
                        write(&mut stream, &Response::err(id, e)).await?;
                        continue;
                    }
                };
                return watch_status(stream, &to, id, service, every, peer).await;
            }
            cmd => {
                let answer = ask(&to, cmd, peer).await;
                let r = match answer {
                    Ok(v) => Response::ok(id, v),
                    Err(e) => Response::err(id, e),
                };
                write(&mut stream, &r).await?;
            }
        }
    }
}

/// Waits until the client closes its end (EOF) or sends anything (ignored while streaming).
async fn closed(r: &mut tokio::net::unix::ReadHalf<'_>) {
    let mut b = [0u8; 256];
    loop {
        match r.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn write_half(w: &mut tokio::net::unix::WriteHalf<'_>, r: &Response) -> std::io::Result<()> {
    let mut line = r.to_line();
    line.push('\n');
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(line.as_bytes())).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client does not read its stream",
        )),
    }
}

async fn follow_events(
    mut stream: UnixStream,
    to: &mpsc::Sender<Intent>,
    id: Value,
    limit: usize,
) -> std::io::Result<()> {
    let (tx, rx) = oneshot::channel();
    if to
        .send(Intent::Subscribe { limit, reply: tx })
        .await
        .is_err()
    {
        return Ok(());
    }
    let Ok((recent, mut events)) = rx.await else {
        return Ok(());
    };
    let (mut r, mut w) = stream.split();
    for e in recent {
        write_half(&mut w, &Response::stream(id.clone(), json!(e))).await?;
    }
    loop {
        tokio::select! {
            _ = closed(&mut r) => return Ok(()),
            e = events.recv() => match e {
                Ok(e) => write_half(&mut w, &Response::stream(id.clone(), json!(e))).await?,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let e = ApiError::new(ErrorCode::Internal, format!("{n} event(s) missed: this client reads too slowly (zdd events shows them)"));
                    write_half(&mut w, &Response { stream: true, ..Response::err(id.clone(), e) }).await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
    }
}

async fn watch_status(
    mut stream: UnixStream,
    to: &mpsc::Sender<Intent>,
    id: Value,
    service: Option<String>,
    every: Duration,
    peer: Peer,
) -> std::io::Result<()> {
    let (mut r, mut w) = stream.split();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = closed(&mut r) => return Ok(()),
            _ = tick.tick() => {
                let cmd = Command::Status { service: service.clone(), watch: false, interval: None };
                let line = match ask(to, cmd, peer).await {
                    Ok(v) => Response::stream(id.clone(), v),
                    Err(e) => {
                        let _ = write_half(&mut w, &Response::err(id.clone(), e)).await;
                        return Ok(());
                    }
                };
                write_half(&mut w, &line).await?;
            }
        }
    }
}
