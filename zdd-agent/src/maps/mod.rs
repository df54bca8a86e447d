//! The only code that touches BPF maps: loading the program, pinning and adopting maps,
//! attaching links, writing desired state, reading counters.

mod adopt;
pub mod flows;
mod links;
pub mod passive;
mod plan;
mod stats;
mod writer;

use std::{
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapError},
    programs::Xdp,
};
use zdd_common::{Config as DpConfig, LAYOUT_VERSION, PROGRAM_NAME, map_names};

pub use links::AttachedMode;
pub use plan::{Applied, ApplyReport};
pub use stats::{Stats, total};
pub use writer::{ApplyError, coarse_now_ns};

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
        "{path} is not on a BPF filesystem, and mounting one at {target} failed: {reason}; mount one (`mount -t bpf bpf /sys/fs/bpf`) or set agent.pin_dir"
    )]
    NotBpffs {
        path: PathBuf,
        target: PathBuf,
        reason: String,
    },
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
    #[error("map {name}: {op}: {source}")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "map {0} is not in the XDP object: the agent and its program were built from different sources; rebuild both (`cargo xtask build-ebpf`, then the agent)"
    )]
    MissingMap(&'static str),
    #[error(
        "program {0} is not an XDP program of the object: the agent and its program were built from different sources; rebuild both"
    )]
    MissingProgram(String),
    #[error("interface {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error(
        "another zdd-agent is using {0} (its maps and links): stop it first, or give this one another agent.pin_dir"
    )]
    InUse(PathBuf),
    #[error("{0}")]
    Capacity(String),
    #[error("injected failure at {0:?} (test)")]
    Injected(Failpoint),
}

/// The error of operation `op` (read, write, remove, ...) on map `name`.
pub(crate) fn map_err(name: &'static str, op: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, op, source }
}

/// Map `name` of the object, typed (`Array<&MapData, T>`, `HashMap<...>`, ...).
pub(crate) fn open<'a, M>(ebpf: &'a Ebpf, name: &'static str) -> Result<M, DataplaneError>
where
    M: TryFrom<&'a Map, Error = MapError>,
{
    let m = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    M::try_from(m).map_err(map_err(name, "open"))
}

/// As [`open`], writable.
pub(crate) fn open_mut<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M, DataplaneError>
where
    M: TryFrom<&'a mut Map, Error = MapError>,
{
    let m = ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
    M::try_from(m).map_err(map_err(name, "open"))
}

/// The XDP program `name` of the object.
fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut Xdp>::try_from(p).ok())
        .ok_or_else(|| DataplaneError::MissingProgram(name.to_string()))
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
    /// Where this agent mounted a BPF filesystem because none was mounted.
    mounted: Option<PathBuf>,
    applied: Applied,
    links: links::Links,
    failpoint: Option<Failpoint>,
}

/// A step of an apply that tests can make fail (the kernel gives no way to make a map write
/// fail on demand): [`Dataplane::inject_failure`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failpoint {
    /// After everything was staged, before the flip.
    Stage,
    /// At the last service's switch, after the others were switched.
    Flip,
    /// At the start of the clean-up, after the flip.
    CleanUp,
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

/// Mounts a BPF filesystem at the pin directory's parent when none is mounted on the way to
/// the pin directory, as Cilium's agent does at /sys/fs/bpf: on a fresh machine nothing may
/// have mounted one yet. Returns where it mounted one. Never mounts over a directory that
/// holds files (that would hide them) nor over `/`.
fn ensure_bpffs(base: &Path) -> Result<Option<PathBuf>, DataplaneError> {
    let probe = base
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(probe) {
        return Ok(None);
    }
    let target = base
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let fail = |reason: String| DataplaneError::NotBpffs {
        path: base.to_path_buf(),
        target: target.clone(),
        reason,
    };
    if target == Path::new("/") {
        return Err(fail("the pin directory's parent is /".into()));
    }
    // A mount made in a mount namespace of our own (e.g. under `ip netns exec`) ends with the
    // agent, and the pinned data path with it: a restart would find nothing to adopt.
    let ns = |p: &str| std::fs::read_link(p).ok();
    if let (Some(mine), Some(host)) = (ns("/proc/self/ns/mnt"), ns("/proc/1/ns/mnt"))
        && mine != host
    {
        return Err(fail(format!(
            "this agent runs in a mount namespace of its own ({}), where a mount would vanish with it; mount bpffs at {} in the host's mount namespace first",
            mine.display(),
            target.display()
        )));
    }
    if target.exists() {
        let mut entries = std::fs::read_dir(&target).map_err(|e| fail(e.to_string()))?;
        if entries.next().is_some() {
            return Err(fail(
                "the directory is not empty (a mount would hide its files)".into(),
            ));
        }
    } else {
        std::fs::create_dir_all(&target).map_err(|e| fail(format!("creating it: {e}")))?;
    }
    let c = |s: &[u8]| std::ffi::CString::new(s).map_err(|_| fail("a NUL byte in the path".into()));
    let (src, dir, fstype, opts) = (
        c(b"bpf")?,
        c(target.as_os_str().as_bytes())?,
        c(b"bpf")?,
        c(b"mode=0700")?,
    );
    // SAFETY: mount(2) with valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    Ok(Some(target))
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

/// Removes zdd's pinned links (which detaches the program from their interfaces) and maps
/// under `base`. Refused while an agent holds the pin directory. Returns the interfaces
/// detached.
pub fn detach(base: &Path) -> Result<Vec<String>, DataplaneError> {
    if !base.exists() {
        return Ok(Vec::new());
    }
    let _lock = lock_dir(base)?;
    let dir = base.join(format!("v{LAYOUT_VERSION}"));
    let mut ifaces = Vec::new();
    let pin_err = |source| DataplaneError::PinDir {
        path: dir.clone(),
        source,
    };
    if dir.exists() {
        for e in std::fs::read_dir(&dir).map_err(pin_err)? {
            let e = e.map_err(pin_err)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("link_") {
                std::fs::remove_file(e.path()).map_err(pin_err)?;
                ifaces.push(iface.to_string());
            }
        }
        std::fs::remove_dir_all(&dir).map_err(pin_err)?;
    }
    ifaces.sort();
    // Only if empty: another layout version's pins may live beside ours.
    let _ = std::fs::remove_dir(base);
    Ok(ifaces)
}

impl Dataplane {
    /// Loads the program, creating its maps or adopting the ones pinned by an earlier agent.
    pub fn load(opts: &LoadOptions) -> Result<Self, DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        Self::load_object(opts, OBJECT)
    }

    /// As [`Dataplane::load`], with the XDP object `object` instead of the embedded one (a
    /// program built apart from the agent, of the same layout version).
    pub fn load_object(opts: &LoadOptions, object: &[u8]) -> Result<Self, DataplaneError> {
        let base = &opts.pin_dir;
        let mounted = ensure_bpffs(base)?;
        let dir = base.join(format!("v{LAYOUT_VERSION}"));
        let created = !dir.exists();
        std::fs::create_dir_all(&dir).map_err(|source| DataplaneError::PinDir {
            path: dir.clone(),
            source,
        })?;
        let lock = lock_dir(base)?;
        let adopted = dir.join(map_names::SERVICES).exists();
        let loaded = Self::load_in(opts, object, &dir, lock, adopted).map(|mut dp| {
            dp.mounted = mounted;
            dp
        });
        if loaded.is_err() && created {
            // Nothing was adopted: leave no empty directory or half-pinned maps behind.
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_dir(base);
        }
        loaded
    }

    fn load_in(
        opts: &LoadOptions,
        object: &[u8],
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
            .load(object)
            .map_err(|e| {
                if errno_in_chain(&e) == Some(libc::EPERM) {
                    DataplaneError::NotPermitted
                } else {
                    DataplaneError::Load(e)
                }
            })?;
        xdp_program(&mut ebpf, PROGRAM_NAME)?
            .load()
            .map_err(DataplaneError::Verifier)?;

        let mut dp = Dataplane {
            ebpf,
            _lock: lock,
            dir: dir.to_path_buf(),
            adopted,
            mounted: None,
            failpoint: None,
            applied: Applied::default(),
            links: links::Links::default(),
        };
        dp.check_layout()?;
        dp.write_config(&opts.config)?;
        if adopted {
            dp.applied = adopt::read(&dp.ebpf)?;
        }
        Ok(dp)
    }

    fn check_layout(&mut self) -> Result<(), DataplaneError> {
        let cfg: Array<_, DpConfig> = open(&self.ebpf, map_names::CONFIG)?;
        let found = cfg.get(&0, 0).map_err(map_err(map_names::CONFIG, "read"))?;
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
        let mut m: Array<_, DpConfig> = open_mut(&mut self.ebpf, map_names::CONFIG)?;
        m.set(0, cfg, 0)
            .map_err(map_err(map_names::CONFIG, "write"))
    }

    /// Makes the next apply fail at `at` (tests only).
    #[doc(hidden)]
    pub fn inject_failure(&mut self, at: Option<Failpoint>) {
        self.failpoint = at;
    }

    /// Fails if the injected failure is `at` (once).
    fn failpoint(&mut self, at: Failpoint) -> Result<(), DataplaneError> {
        if self.failpoint == Some(at) {
            self.failpoint = None;
            return Err(DataplaneError::Injected(at));
        }
        Ok(())
    }

    /// The loaded program's tag (a hash of its instructions, as `bpftool prog` shows it).
    pub fn program_tag(&mut self) -> Option<u64> {
        self.program_mut().ok()?.info().ok().map(|i| i.tag())
    }

    /// Where this agent mounted a BPF filesystem (none was mounted), if it did.
    pub fn mounted_bpffs(&self) -> Option<&Path> {
        self.mounted.as_deref()
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
    pub fn program_mut(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf, PROGRAM_NAME)
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
