//! A raw client of the control socket, as `socat - UNIX-CONNECT:PATH` is: lines of JSON in,
//! lines of JSON out. Tests use it to send exactly what they mean, malformed requests too.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::Value;

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client> {
        let s = UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Writes raw bytes (no newline added).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes)?;
        Ok(())
    }

    /// Reads one answer line; None at the end of the stream.
    pub fn read(&mut self) -> Result<Option<Value>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        Ok(Some(
            serde_json::from_str(&line).with_context(|| format!("answer {line:?}"))?,
        ))
    }

    /// Sends one request line and reads its answer.
    pub fn ask(&mut self, request: &str) -> Result<Value> {
        self.send_raw(format!("{request}\n").as_bytes())?;
        self.read()?
            .context("the agent closed the connection without an answer")
    }

    pub fn stream(&self) -> &UnixStream {
        &self.writer
    }
}

/// `answer["result"]`, or an error with the answer's error.
pub fn result(answer: &Value) -> Result<&Value> {
    if answer["ok"] == Value::Bool(true) {
        Ok(&answer["result"])
    } else {
        anyhow::bail!("{}", answer["error"])
    }
}
