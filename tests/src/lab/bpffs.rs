//! A BPF filesystem where the benchmarks and the demo pin: a fresh machine may have none
//! mounted yet (nothing mounts /sys/fs/bpf unless systemd or a BPF tool did).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// `f_type` of a BPF filesystem (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` lies on a BPF filesystem (false if it does not exist).
pub fn on_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a valid C string into a zeroed struct that it fills.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure that `dir` is on a BPF filesystem, for pins under `dir`: if it is not, creates
/// it and mounts one there (`mount -t bpf bpf <dir>`, mode 0700), as Cilium's agent does.
/// Returns whether it mounted; the mount stays (it is what a later run expects to find).
pub fn ensure_bpffs(dir: &Path) -> Result<bool> {
    if on_bpffs(dir) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating {} to mount bpffs on", dir.display()))?;
    let target = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: valid C strings; a plain mount(2).
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        bail!(
            "no BPF filesystem at {0}, and mounting one there failed ({e}): run \
             `mount -t bpf bpf {0}` as root",
            dir.display()
        );
    }
    if !on_bpffs(dir) {
        bail!(
            "mounted bpffs at {} but statfs does not see it",
            dir.display()
        );
    }
    Ok(true)
}

/// [`ensure_bpffs`] for `dir`, telling the user (with `who` as the prefix) when it mounted.
pub fn ensure_bpffs_and_say(dir: &Path, who: &str) -> Result<()> {
    if ensure_bpffs(dir)? {
        println!(
            "{who}: no BPF filesystem was mounted at {0}: mounted one there \
             (`mount -t bpf bpf {0}`); it stays mounted",
            dir.display()
        );
    }
    Ok(())
}
