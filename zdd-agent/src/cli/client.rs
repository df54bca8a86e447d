//! The connection to the agent: one request line out, answer lines in. Every way it can fail
//! becomes a message that says what was wrong and what to do.

use std::{
    io::{self, BufRead, BufReader, ErrorKind, Write},
    os::unix::{fs::FileTypeExt, fs::MetadataExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use crate::api::{ApiError, Command, MAX_REQUEST_BYTES, PROTOCOL_VERSION, Request, Response};

/// How long an answer may take, unless the command waits on purpose.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no answer to print.
#[derive(Debug)]
pub enum Failure {
    /// The agent answered `ok:false`.
    Refused(ApiError),
    /// No usable answer: no agent, no permission, a broken connection.
    Failed(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(e) => write!(f, "{} ({})", e.message, e.code.as_str()),
            Failure::Failed(m) => f.write_str(m),
        }
    }
}

/// How long to wait for the answer to `cmd`: None for streams, and for the commands where the
/// agent answers only at the end of a wait it bounds itself (`drain --wait`, `remove`).
pub fn answer_timeout(cmd: &Command) -> Option<Duration> {
    match cmd {
        Command::Status { watch: true, .. }
        | Command::Events { follow: true, .. }
        | Command::BackendDrain { wait: true, .. }
        | Command::BackendRemove { now: false, .. } => None,
        _ => Some(ANSWER_TIMEOUT),
    }
}

/// True when the agent answers `cmd` with a stream of lines, until the client closes.
pub fn is_stream(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Status { watch: true, .. } | Command::Events { follow: true, .. }
    )
}

/// The message for a failed connect to `path`.
pub fn connect_error(path: &Path, e: &io::Error) -> String {
    let p = path.display();
    match e.kind() {
        ErrorKind::NotFound => format!(
            "no socket at {p}: is zdd-agent running? (agent.socket in its config; --socket to \
             use another path)"
        ),
        ErrorKind::ConnectionRefused => match std::fs::metadata(path) {
            Ok(m) if !m.file_type().is_socket() => format!(
                "{p} is not a socket: give the agent's control socket with --socket (agent.socket \
                 in its config)"
            ),
            _ => format!(
                "nothing answers at {p}: zdd-agent is not running (the socket was left by an agent \
                 that stopped); start it (systemctl start zdd-agent, or zdd-agent run --config \
                 FILE)"
            ),
        },
        ErrorKind::PermissionDenied => {
            let owner = match std::fs::metadata(path) {
                Ok(m) => format!(
                    " (mode {:04o}, owner uid {} gid {})",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid()
                ),
                Err(_) => " (or its directory)".into(),
            };
            format!(
                "permission denied on {p}{owner}: run zdd as root (sudo), or as a member of the \
                 group set as agent.socket_group in the agent's config"
            )
        }
        _ => format!("cannot connect to {p}: {e}"),
    }
}

/// One request on its own connection.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    line: String,
    id: Value,
    done: bool,
    /// A line of the answer came already (a stream that ends is not a missing answer).
    answered: bool,
}

impl Client {
    /// Connects and sends `cmd`; the answer is read with [`Client::answer`].
    pub fn send(path: &Path, cmd: Command) -> Result<Client, Failure> {
        let timeout = answer_timeout(&cmd);
        let stream =
            UnixStream::connect(path).map_err(|e| Failure::Failed(connect_error(path, &e)))?;
        let fail =
            |what: &str, e: io::Error| Failure::Failed(format!("{what} {}: {e}", path.display()));
        stream
            .set_read_timeout(timeout)
            .map_err(|e| fail("cannot set a timeout on", e))?;
        stream
            .set_write_timeout(Some(ANSWER_TIMEOUT))
            .map_err(|e| fail("cannot set a timeout on", e))?;
        let id = Value::from(std::process::id());
        let req = Request {
            v: PROTOCOL_VERSION,
            id: id.clone(),
            cmd,
        };
        let mut line = serde_json::to_string(&req)
            .map_err(|e| Failure::Failed(format!("cannot encode the request: {e}")))?;
        line.push('\n');
        if line.len() > MAX_REQUEST_BYTES {
            return Err(Failure::Failed(format!(
                "the request is {} bytes; zdd-agent takes at most {} KiB a request",
                line.len(),
                MAX_REQUEST_BYTES / 1024
            )));
        }
        (&stream)
            .write_all(line.as_bytes())
            .map_err(|e| fail("cannot send the request to", e))?;
        Ok(Client {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            line: String::new(),
            id,
            done: false,
            answered: false,
        })
    }

    /// The next answer line's result: Ok(None) after the last one. An `ok:false` line is
    /// `Failure::Refused`.
    pub fn answer(&mut self) -> Result<Option<Value>, Failure> {
        if self.done {
            return Ok(None);
        }
        self.line.clear();
        let p = self.path.display();
        match self.reader.read_line(&mut self.line) {
            Ok(0) => {
                self.done = true;
                let what = if self.answered {
                    "the stream"
                } else {
                    "the connection without an answer"
                };
                return Err(Failure::Failed(format!(
                    "zdd-agent at {p} closed {what} (stopped or restarted? its log says why)"
                )));
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                self.done = true;
                return Err(Failure::Failed(format!(
                    "no answer from zdd-agent at {p} within {}s: it is busy or stuck (its log \
                     says which)",
                    ANSWER_TIMEOUT.as_secs()
                )));
            }
            Err(e) => {
                self.done = true;
                return Err(Failure::Failed(format!("reading the answer from {p}: {e}")));
            }
        }
        self.answered = true;
        let r = match parse_response(&self.line, &self.id) {
            Ok(r) => r,
            // An error inside a stream (events missed by a slow reader) is told, and the
            // stream goes on.
            Err(Failure::Refused(e)) if stream_line(&self.line) => {
                eprintln!("warning: {} ({})", e.message, e.code.as_str());
                return self.answer();
            }
            Err(e) => {
                self.done = true;
                return Err(e);
            }
        };
        if !r.stream {
            self.done = true;
        }
        Ok(Some(r.result.unwrap_or(Value::Null)))
    }
}

fn stream_line(line: &str) -> bool {
    serde_json::from_str::<Response>(line.trim_end()).is_ok_and(|r| r.stream)
}

/// One answer line: the response, or why it is not one.
pub fn parse_response(line: &str, id: &Value) -> Result<Response, Failure> {
    let r: Response = serde_json::from_str(line.trim_end()).map_err(|e| {
        Failure::Failed(format!(
            "unreadable answer from zdd-agent ({e}): {}",
            line.trim_end()
        ))
    })?;
    if !r.ok {
        return Err(Failure::Refused(r.error.unwrap_or_else(|| {
            ApiError::new(
                crate::api::ErrorCode::Internal,
                "the agent refused without saying why",
            )
        })));
    }
    if r.v != PROTOCOL_VERSION {
        return Err(Failure::Failed(format!(
            "zdd-agent answered in protocol version {}; this zdd speaks {PROTOCOL_VERSION}: \
             use the zdd that came with the agent",
            r.v
        )));
    }
    if r.id != *id && !r.id.is_null() {
        return Err(Failure::Failed(format!(
            "zdd-agent answered request {} instead of {id}",
            r.id
        )));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::api::ErrorCode;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("zdd-cli-client-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn connect_errors_say_what_to_do() {
        let d = tmp("connect");
        let path = d.join("zdd.sock");
        let e = Client::send(&path, Command::Stats)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with(&format!("no socket at {}:", path.display())),
            "{e}"
        );
        assert!(e.contains("--socket"), "{e}");

        // A socket nobody listens on: an agent that stopped.
        drop(UnixListener::bind(&path).unwrap());
        let e = Client::send(&path, Command::Stats)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("zdd-agent is not running"), "{e}");

        let file = d.join("file");
        std::fs::write(&file, "").unwrap();
        let e = Client::send(&file, Command::Stats)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is not a socket"), "{e}");

        let e = connect_error(&path, &io::Error::from(ErrorKind::PermissionDenied));
        assert!(e.starts_with("permission denied on"), "{e}");
        assert!(e.contains("mode 0"), "{e}");
        assert!(e.contains("socket_group"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn answers_and_refusals() {
        let id = Value::from(7);
        let r = parse_response(r#"{"v":1,"id":7,"ok":true,"result":{"a":1}}"#, &id).unwrap();
        assert_eq!(r.result, Some(serde_json::json!({"a": 1})));
        assert!(!r.stream);
        match parse_response(
            r#"{"v":1,"id":7,"ok":false,"error":{"code":"unknown_service","message":"no service \"x\""}}"#,
            &id,
        ) {
            Err(f @ Failure::Refused(_)) => {
                assert_eq!(f.to_string(), "no service \"x\" (unknown_service)")
            }
            other => panic!("{other:?}"),
        }
        match parse_response("garbage\n", &id) {
            Err(Failure::Failed(m)) => assert!(m.contains("unreadable answer"), "{m}"),
            other => panic!("{other:?}"),
        }
        match parse_response(r#"{"v":2,"id":7,"ok":true,"result":{}}"#, &id) {
            Err(Failure::Failed(m)) => assert!(m.contains("protocol version 2"), "{m}"),
            other => panic!("{other:?}"),
        }
        // An error about a request the agent could not read carries no id.
        match parse_response(
            r#"{"v":1,"id":null,"ok":false,"error":{"code":"too_large","message":"m"}}"#,
            &id,
        ) {
            Err(Failure::Refused(e)) => assert_eq!(e.code, ErrorCode::TooLarge),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn timeouts_per_command() {
        assert_eq!(answer_timeout(&Command::Stats), Some(ANSWER_TIMEOUT));
        let drain = |wait| Command::BackendDrain {
            service: "s".into(),
            name: "b".into(),
            wait,
            timeout: None,
        };
        assert_eq!(answer_timeout(&drain(false)), Some(ANSWER_TIMEOUT));
        assert_eq!(answer_timeout(&drain(true)), None);
        let events = Command::Events {
            follow: true,
            limit: None,
        };
        assert_eq!(answer_timeout(&events), None);
        assert!(is_stream(&events));
        assert!(!is_stream(&drain(true)));
    }

    /// A fake agent on a real socket: the request goes out as one line, a stream comes back.
    #[test]
    fn a_request_and_a_stream_over_a_socket() {
        let d = tmp("stream");
        let path = d.join("zdd.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            let req = crate::api::parse_request(&line).unwrap();
            let id = req.id.clone();
            let mut w = &s;
            for n in 0..2 {
                let r = Response::stream(id.clone(), serde_json::json!({ "n": n }));
                writeln!(w, "{}", r.to_line()).unwrap();
                // A warning inside the stream does not end it.
                let e = ApiError::new(crate::api::ErrorCode::Internal, "1 event(s) missed");
                let r = Response {
                    stream: true,
                    ..Response::err(id.clone(), e)
                };
                writeln!(w, "{}", r.to_line()).unwrap();
            }
            req
        });
        let mut c = Client::send(
            &path,
            Command::Events {
                follow: true,
                limit: Some(3),
            },
        )
        .unwrap();
        assert_eq!(c.answer().unwrap(), Some(serde_json::json!({"n": 0})));
        assert_eq!(c.answer().unwrap(), Some(serde_json::json!({"n": 1})));
        let req = server.join().unwrap();
        assert_eq!(
            req.cmd,
            Command::Events {
                follow: true,
                limit: Some(3)
            }
        );
        // The agent went away in the middle of the stream.
        let e = c.answer().unwrap_err().to_string();
        assert!(e.contains("closed the stream"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
