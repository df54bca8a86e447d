//! Named network namespaces (`/run/netns/NAME`, as `ip netns` makes them) and entering them.

use std::ffi::CString;
use std::fs::{self, File};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Every name a lab creates starts with this, then the creating pid in hex, then `x`.
const PREFIX: &str = "zl";

pub(crate) fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// A prefix unique across labs of this process (counter) and across processes (pid); the
/// random part keeps a recycled pid from meeting a lab its previous owner leaked.
pub(crate) fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let rnd = RandomState::new().hash_one(n) as u16;
    format!("{PREFIX}{:x}x{n:x}r{rnd:04x}", std::process::id())
}

/// Runs `ip [args] -batch -` with `lines` on stdin; `ip` stops at the first failing line.
pub(crate) fn ip_batch(args: &[&str], lines: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(args)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip")?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(lines.join("\n").as_bytes())?;
    drop(stdin);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip {} -batch failed ({}): {}\nbatch:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("\n")
        );
    }
    Ok(())
}

pub(crate) fn add_all(names: &[String]) -> Result<()> {
    let lines: Vec<String> = names.iter().map(|n| format!("netns add {n}")).collect();
    ip_batch(&[], &lines)
}

/// What `ip netns del` does: detach the bind mount, remove the file. A name that does not
/// exist is fine (creation may have stopped half way).
pub(crate) fn delete(name: &str) -> io::Result<()> {
    let p = path(name);
    if fs::symlink_metadata(&p).is_err() {
        return Ok(());
    }
    let c = CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in path");
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (e.g. `ip netns add` died before mounting).
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    match fs::remove_file(&p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub(crate) fn open(name: &str) -> io::Result<File> {
    File::open(path(name))
        .map_err(|e| io::Error::new(e.kind(), format!("opening netns {name}: {e}")))
}

/// Moves the calling thread (only it: setns is per thread) into the namespace.
pub(crate) fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on an open fd.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Names in /run/netns (what `ip netns list` shows).
pub fn list() -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Removes labs left by test processes that died without dropping them (SIGKILL, timeout):
/// kills what still runs inside, then deletes the namespaces. Once per process.
pub(crate) fn reap_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for name in list() {
            let Some(pid) = creator_pid(&name) else {
                continue;
            };
            if pid_alive(pid) {
                continue;
            }
            kill_processes_in(&name);
            if let Err(e) = delete(&name) {
                eprintln!("zdd lab: removing stale netns {name}: {e}");
            }
        }
    });
}

fn creator_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (hex, tail) = rest.split_once('x')?;
    if !tail.contains('-') {
        return None;
    }
    i32::from_str_radix(hex, 16).ok()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() != libc::ESRCH }
}

fn kill_processes_in(name: &str) {
    let Ok(ns) = fs::metadata(path(name)) else {
        return;
    };
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(m) = fs::metadata(p.path().join("ns/net"))
            && m.ino() == ns.ino()
            && m.dev() == ns.dev()
        {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
