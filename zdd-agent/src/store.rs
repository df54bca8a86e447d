//! The state directory (`agent.state_dir`, default /var/lib/zdd): the live state, written
//! atomically (temporary file, fsync, rename, fsync of the directory) after every change, and
//! the append-only event journal. Behind this small interface so that a shared store (etcd,
//! for a fleet) can replace local files later.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{api::Event, live::LiveState};

const STATE_FILE: &str = "state.json";
const JOURNAL_FILE: &str = "events.jsonl";
/// Format of `state.json`; a file of another version is refused, never rewritten.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state file {path} is unreadable: {message}. Nothing was changed: the data path keeps forwarding on its pinned maps. Move the file aside to start from the config file, or restore it from a backup"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `state.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    pub live: LiveState,
    /// Hash of the config file's services when they were last applied from the file: a file
    /// that changed since is applied at start, an unchanged one is not (run-time changes
    /// survive restarts).
    pub file_hash: Option<String>,
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating when missing, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        let store = Store {
            dir: dir.to_path_buf(),
        };
        store.end_journal_line()?;
        Ok(store)
    }

    /// A journal whose last line a crash cut short gets a newline, so the next event starts a
    /// line of its own (the cut line is skipped by readers).
    fn end_journal_line(&self) -> Result<(), StoreError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.journal_path();
        let Ok(mut f) = OpenOptions::new().read(true).append(true).open(&path) else {
            return Ok(());
        };
        let werr = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let len = f.metadata().map_err(werr)?.len();
        if len == 0 {
            return Ok(());
        }
        f.seek(SeekFrom::End(-1)).map_err(werr)?;
        let mut last = [0u8; 1];
        f.read_exact(&mut last).map_err(werr)?;
        if last[0] != b'\n' {
            f.write_all(b"\n").map_err(werr)?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// The saved state; None when there is none yet.
    pub fn load(&self) -> Result<Option<Saved>, StoreError> {
        let path = self.state_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Corrupt {
                    path,
                    message: e.to_string(),
                });
            }
        };
        let saved: Saved = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: format!("not a zdd state file: {e}"),
        })?;
        if saved.version != STATE_VERSION {
            return Err(StoreError::Corrupt {
                path,
                message: format!(
                    "version {} (this agent reads version {STATE_VERSION})",
                    saved.version
                ),
            });
        }
        Ok(Some(saved))
    }

    /// Writes the state atomically: a reader (or a crash) sees the old file or the new one.
    pub fn save(&self, saved: &Saved) -> Result<(), StoreError> {
        let path = self.state_path();
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let werr = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(saved)
            .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(werr)?;
            f.write_all(&text).map_err(werr)?;
            f.sync_all().map_err(werr)?;
        }
        std::fs::rename(&tmp, &path).map_err(werr)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(werr)?;
        Ok(())
    }

    /// Appends one event to the journal.
    pub fn append_event(&self, e: &Event) -> Result<(), StoreError> {
        let path = self.journal_path();
        let werr = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(e).map_err(|e| werr(std::io::Error::other(e)))?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(werr)?;
        // One write of a whole line: an append of it is never interleaved with another.
        f.write_all(&line).map_err(werr)
    }

    /// The last `n` events of the journal (lines that do not parse, such as a line cut by a
    /// crash, are skipped).
    pub fn last_events(&self, n: usize) -> Vec<Event> {
        let Ok(f) = File::open(self.journal_path()) else {
            return Vec::new();
        };
        let mut ring = std::collections::VecDeque::with_capacity(n.min(4096));
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            if let Ok(e) = serde_json::from_str::<Event>(&line) {
                if ring.len() == n {
                    ring.pop_front();
                }
                ring.push_back(e);
            }
        }
        ring.into_iter().collect()
    }
}

/// A stable hash of a set of services (FNV-1a over their JSON), to tell whether the config
/// file changed since it was last applied.
pub fn services_hash(state: &crate::state::DesiredState) -> String {
    let text = serde_json::to_string(state).unwrap_or_default();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("zdd-store-{tag}-{}-{n}", std::process::id()))
    }

    #[test]
    fn state_round_trips_and_a_corrupt_file_is_refused_untouched() {
        let dir = tmp("rt");
        let s = Store::open(&dir).unwrap();
        assert!(s.load().unwrap().is_none());
        let saved = Saved {
            version: STATE_VERSION,
            live: LiveState::default(),
            file_hash: Some("abc".into()),
        };
        s.save(&saved).unwrap();
        assert_eq!(s.load().unwrap(), Some(saved));
        std::fs::write(s.state_path(), "{ not json").unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(
            e.contains("state.json") && e.contains("keeps forwarding"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(s.state_path()).unwrap(),
            "{ not json"
        );
        std::fs::write(s.state_path(), r#"{"version":9,"live":{"services":[]}}"#).unwrap();
        assert!(s.load().unwrap_err().to_string().contains("version 9"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_journal_keeps_the_last_events() {
        let dir = tmp("j");
        let s = Store::open(&dir).unwrap();
        for seq in 1..=10 {
            s.append_event(&Event {
                seq,
                kind: "split".into(),
                ..Default::default()
            })
            .unwrap();
        }
        // A line cut short by a crash is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(s.journal_path())
            .unwrap()
            .write_all(b"{\"seq\":11,\"ki")
            .unwrap();
        let last: Vec<u64> = s.last_events(3).iter().map(|e| e.seq).collect();
        assert_eq!(last, vec![8, 9, 10]);
        // Reopened (a restart), the next event gets a line of its own.
        let s = Store::open(&dir).unwrap();
        s.append_event(&Event {
            seq: 12,
            ..Default::default()
        })
        .unwrap();
        let last: Vec<u64> = s.last_events(2).iter().map(|e| e.seq).collect();
        assert_eq!(last, vec![10, 12]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
