//! The only code that touches BPF maps: loading the program, pinning and adopting maps,
//! attaching links, writing desired state, reading counters.

mod links;
mod stats;
mod writer;

use std::{
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::{Ebpf, EbpfLoader, maps::Array, programs::Xdp};
use zdd_common::{Config as DpConfig, LAYOUT_VERSION, PROGRAM_NAME, map_names};

pub use links::AttachedMode;
pub use stats::{CounterSnapshot, Stats};
pub use writer::{Applied, ApplyReport};

/// The XDP object, embedded at build time by build.rs (from `cargo xtask build-ebpf`).
#[cfg(zdd_ebpf_embedded)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("ZDD_EBPF_OBJECT_PATH"));
#[cfg(not(zdd_ebpf_embedded))]
static OBJECT: &[u8] = &[];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "this zdd-agent was built without its XDP program: run `cargo xtask build-ebpf`, then rebuild"
    )]
    NoObject,
    #[error(
        "{0} is not on a BPF filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or set agent.pin_dir"
    )]
    NotBpffs(PathBuf),
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "not permitted to create BPF maps or programs: run zdd-agent as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
    )]
    NotPermitted,
    #[error("loading the XDP program failed (is BPF enabled in this kernel?): {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel refused the XDP program: {0}")]
    Verifier(#[source] aya::programs::ProgramError),
    #[error(
        "pinned maps in {dir} have layout version {found}, this agent uses {LAYOUT_VERSION}: remove the directory or run the matching agent"
    )]
    Layout { dir: PathBuf, found: u32 },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("interface {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error(
        "another zdd-agent is using {0} (its maps and links): stop it first, or give this one another agent.pin_dir"
    )]
    InUse(PathBuf),
    #[error("{0}")]
    Capacity(String),
}

pub(crate) fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Base pin directory on bpffs; maps go to `<pin_dir>/v<LAYOUT_VERSION>/`.
    pub pin_dir: PathBuf,
    pub flow_table_size: u32,
    pub config: DpConfig,
}

/// The loaded program and its maps, plus what has been written to them.
pub struct Dataplane {
    ebpf: Ebpf,
    /// Held for the agent's life: one agent per pin directory.
    _lock: std::fs::File,
    dir: PathBuf,
    adopted: bool,
    applied: Applied,
    links: links::Links,
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a valid C string into a zeroed struct.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == BPF_FS_MAGIC
    }
}

/// The OS error number at the root of an error chain, if there is one.
fn errno_in_chain(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        cur = err.source();
    }
    None
}

/// An exclusive lock on the pin directory: two agents adopting the same pins would fight
/// over the maps and links. The kernel drops it when the process ends, however it ends.
fn lock_dir(base: &Path) -> Result<std::fs::File, DataplaneError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(base).map_err(|source| DataplaneError::PinDir {
        path: base.to_path_buf(),
        source,
    })?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DataplaneError::InUse(base.to_path_buf()));
        }
        return Err(DataplaneError::PinDir {
            path: base.to_path_buf(),
            source: e,
        });
    }
    Ok(f)
}

impl Dataplane {
    /// Loads the program, creating its maps or adopting the ones pinned by an earlier agent.
    pub fn load(opts: &LoadOptions) -> Result<Self, DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        let base = &opts.pin_dir;
        let probe = base
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(probe) {
            return Err(DataplaneError::NotBpffs(base.clone()));
        }
        let dir = base.join(format!("v{LAYOUT_VERSION}"));
        let created = !dir.exists();
        std::fs::create_dir_all(&dir).map_err(|source| DataplaneError::PinDir {
            path: dir.clone(),
            source,
        })?;
        let lock = lock_dir(base)?;
        let adopted = dir.join(map_names::SERVICES).exists();
        let loaded = Self::load_in(opts, &dir, lock, adopted);
        if loaded.is_err() && created {
            // Nothing was adopted: leave no empty directory or half-pinned maps behind.
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_dir(base);
        }
        loaded
    }

    fn load_in(
        opts: &LoadOptions,
        dir: &Path,
        lock: std::fs::File,
        adopted: bool,
    ) -> Result<Self, DataplaneError> {
        // The kernel charges BPF memory to the cgroup since 5.11; raising MEMLOCK is only
        // needed (and only allowed) on older kernels, so failure is not fatal.
        let rl = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain syscall with a valid struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
            log::debug!("setrlimit(MEMLOCK) refused; relying on cgroup accounting of BPF memory");
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .map_max_entries(map_names::FLOWS, opts.flow_table_size)
            .load(OBJECT)
            .map_err(|e| {
                if errno_in_chain(&e) == Some(libc::EPERM) {
                    DataplaneError::NotPermitted
                } else {
                    DataplaneError::Load(e)
                }
            })?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .expect("program is in the object")
            .try_into()
            .expect("program is XDP");
        prog.load().map_err(DataplaneError::Verifier)?;

        let mut dp = Dataplane {
            ebpf,
            _lock: lock,
            dir: dir.to_path_buf(),
            adopted,
            applied: Applied::default(),
            links: links::Links::default(),
        };
        dp.check_layout()?;
        dp.write_config(&opts.config)?;
        if adopted {
            dp.applied = writer::Applied::adopt(&mut dp.ebpf)?;
        }
        Ok(dp)
    }

    fn check_layout(&mut self) -> Result<(), DataplaneError> {
        let cfg: Array<_, DpConfig> = Array::try_from(self.ebpf.map(map_names::CONFIG).unwrap())
            .map_err(map_err(map_names::CONFIG))?;
        let found = cfg.get(&0, 0).map_err(map_err(map_names::CONFIG))?;
        if found.layout_version != 0 && found.layout_version != LAYOUT_VERSION {
            return Err(DataplaneError::Layout {
                dir: self.dir.clone(),
                found: found.layout_version,
            });
        }
        Ok(())
    }

    /// Writes the data-path tunables (timeouts).
    pub fn write_config(&mut self, cfg: &DpConfig) -> Result<(), DataplaneError> {
        let mut m: Array<_, DpConfig> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).unwrap())
                .map_err(map_err(map_names::CONFIG))?;
        m.set(0, cfg, 0).map_err(map_err(map_names::CONFIG))
    }

    /// True when maps pinned by an earlier agent were adopted (flows kept).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Where the maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// The loaded XDP program (for BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("program is in the object")
            .try_into()
            .expect("program is XDP")
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Removes every pin (maps and links): after this, nothing of zdd outlives the process.
    pub fn unpin_all(&mut self) -> std::io::Result<()> {
        self.links.unpin_all();
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)?;
        }
        if let Some(base) = self.dir.parent() {
            // Only if empty: another layout version's pins may live beside ours.
            let _ = std::fs::remove_dir(base);
        }
        Ok(())
    }
}

impl Dataplane {
    /// Loads the benchmark floor program from the same object (never attached by the agent).
    pub fn load_floor(&mut self) -> Result<&mut Xdp, DataplaneError> {
        self.load_bench_program(zdd_common::FLOOR_PROGRAM_NAME)
    }

    /// Loads a benchmark program of the object by name (`zdd_floor`, `zdd_insert_probe`);
    /// they share the data path's maps and are never attached by the agent.
    pub fn load_bench_program(&mut self, name: &str) -> Result<&mut Xdp, DataplaneError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .expect("benchmark programs are in the object")
            .try_into()
            .expect("program is XDP");
        if prog.fd().is_err() {
            prog.load().map_err(DataplaneError::Verifier)?;
        }
        Ok(prog)
    }
}
