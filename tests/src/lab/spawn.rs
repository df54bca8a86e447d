//! Running processes and closures inside a lab namespace.

use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Output};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::netns;

/// How long a [`ChildGuard`] waits after SIGTERM before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Makes `cmd` enter the namespace between fork and exec. Not `ip netns exec`: that also
/// remounts /sys, which hides bpffs from the child.
pub(crate) fn enter_in_child(cmd: &mut Command, ns: &str) -> io::Result<()> {
    let file = netns::open(ns)?;
    // Its own process group, so that stopping the child also stops what it started.
    cmd.process_group(0);
    // SAFETY: the closure only makes a syscall (async-signal-safe); `file` is opened
    // O_CLOEXEC by std, so the child does not keep it after exec.
    unsafe {
        cmd.pre_exec(move || netns::enter(&file));
    }
    Ok(())
}

pub(crate) fn spawn_in(ns: &str, mut cmd: Command) -> Result<ChildGuard> {
    enter_in_child(&mut cmd, ns)?;
    let label = format!("{:?} in {ns}", cmd.get_program());
    let child = cmd.spawn().with_context(|| format!("spawning {label}"))?;
    Ok(ChildGuard {
        child: Some(child),
        label,
    })
}

/// Runs `cmd` in the namespace to completion; a nonzero status is an error carrying its output.
pub(crate) fn output_in(ns: &str, mut cmd: Command) -> Result<Output> {
    enter_in_child(&mut cmd, ns)?;
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} in {ns}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} in {ns} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `f` on a fresh thread that has entered the namespace; its panic is passed on.
pub(crate) fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = netns::open(ns)?;
    thread::scope(|s| {
        let h = s.spawn(move || {
            netns::enter(&file)?;
            Ok(f())
        });
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A child process that is stopped (SIGTERM, then SIGKILL after [`STOP_GRACE`]) and reaped when
/// dropped. Signals go to its process group.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    label: String,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    pub fn child(&self) -> &Child {
        self.child.as_ref().expect("child present until drop")
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    /// `Some(status)` once the child has exited (and is reaped).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child_mut().try_wait()
    }

    /// Sends `sig` to the child's process group unless the child is already reaped (its pid could
    /// belong to someone else by then).
    pub fn signal(&mut self, sig: libc::c_int) -> io::Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pgid = self.pid() as libc::pid_t;
        // SAFETY: plain syscall; the unreaped child keeps the pid (and group id) ours.
        if unsafe { libc::kill(-pgid, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait()? {
                return Ok(st);
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.kill()
    }

    /// SIGKILL (a crash, as far as the child is concerned) and reap.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        self.child_mut().wait()
    }

    /// Waits for the child to exit by itself and collects piped stdout/stderr.
    pub fn wait_with_output(mut self) -> io::Result<Output> {
        self.child.take().expect("child present").wait_with_output()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        match self.stop(STOP_GRACE) {
            Ok(st) if st.signal().is_none() && !st.success() => {
                eprintln!("zdd lab: {} had exited with {st}", self.label)
            }
            Ok(_) => {}
            Err(e) => eprintln!("zdd lab: stopping {}: {e}", self.label),
        }
    }
}
