//! XDP attachment: native first (in auto mode), skb where the driver refuses; every link
//! pinned so a restarted or upgraded agent can take it over with an atomic program swap.

use std::path::{Path, PathBuf};

use aya::programs::{
    Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};

use super::{Dataplane, DataplaneError};
use crate::config::XdpModeSetting;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Skb,
    /// An existing pinned link was taken over: the program was swapped in atomically.
    Adopted,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Skb => "skb",
            AttachedMode::Adopted => "adopted pinned link",
        })
    }
}

/// A bpf_link, pinned at `path`: lives until the pin is removed and our fd closed.
struct Held {
    link: FdLink,
    path: PathBuf,
}

#[derive(Default)]
pub struct Links {
    held: Vec<(String, Held)>,
}

impl Links {
    pub fn unpin_all(&mut self) {
        for (_, h) in self.held.drain(..) {
            let _ = std::fs::remove_file(&h.path);
            drop(h.link);
        }
    }
}

fn try_attach(prog: &mut Xdp, iface: &str, mode: XdpMode) -> Result<XdpLink, String> {
    let id = prog.attach(iface, mode).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        msg
    })?;
    prog.take_link(id).map_err(|e| e.to_string())
}

fn link_path(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("link_{iface}"))
}

impl Dataplane {
    /// Attaches to `iface`, or takes over the link an earlier agent pinned there.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: XdpModeSetting,
    ) -> Result<AttachedMode, DataplaneError> {
        let path = link_path(&self.dir, iface);
        let err = |message: String| DataplaneError::Attach {
            iface: iface.to_string(),
            message,
        };
        let name =
            std::ffi::CString::new(iface).map_err(|_| err("not an interface name".into()))?;
        // SAFETY: plain libc call with a valid C string.
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            return Err(err(
                "no such interface in this network namespace (agent.interfaces)".into(),
            ));
        }
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path)
                .map_err(|e| err(format!("cannot open pinned link {}: {e}", path.display())))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| err(format!("pinned link is not XDP: {e}")))?;
            let prog = self.program_mut()?;
            match prog.attach_to_link(link) {
                Ok(id) => {
                    let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
                    let link = FdLink::try_from(link).map_err(|e| err(e.to_string()))?;
                    self.links.held.push((iface.into(), Held { link, path }));
                    return Ok(AttachedMode::Adopted);
                }
                Err(e) => {
                    // A link whose interface went away (deleted, or re-created under the same
                    // name) is defunct: it forwards nothing and cannot take a program. Drop
                    // its pin and attach afresh.
                    log::warn!(
                        "{iface}: the pinned link {} no longer works ({e}): attaching afresh",
                        path.display()
                    );
                    std::fs::remove_file(&path).map_err(|e| {
                        err(format!("removing the defunct pin {}: {e}", path.display()))
                    })?;
                }
            }
        }

        let prog = self.program_mut()?;
        let (link, got) = match mode {
            XdpModeSetting::Native => (
                try_attach(prog, iface, XdpMode::Driver).map_err(err)?,
                AttachedMode::Native,
            ),
            XdpModeSetting::Skb => (
                try_attach(prog, iface, XdpMode::Skb).map_err(err)?,
                AttachedMode::Skb,
            ),
            // Drivers refuse native mode in several ways (EINVAL, EOPNOTSUPP, ERANGE for a
            // large MTU on veth), so any refusal falls back to skb.
            XdpModeSetting::Auto => match try_attach(prog, iface, XdpMode::Driver) {
                Ok(l) => (l, AttachedMode::Native),
                Err(native) => match try_attach(prog, iface, XdpMode::Skb) {
                    Ok(l) => {
                        log::warn!("{iface}: native XDP refused ({native}); using skb mode");
                        (l, AttachedMode::Skb)
                    }
                    Err(skb) => {
                        return Err(err(format!("native: {native}; skb: {skb}")));
                    }
                },
            },
        };
        // A netlink attachment (kernels before 5.9) cannot be pinned or adopted.
        let fd = FdLink::try_from(link)
            .map_err(|_| err("the kernel has no XDP bpf_link (needs Linux 5.9 or later)".into()))?;
        let pinned = fd
            .pin(&path)
            .map_err(|e| err(format!("cannot pin link at {}: {e}", path.display())))?;
        let held = Held {
            link: pinned.into(),
            path,
        };
        self.links.held.push((iface.into(), held));
        Ok(got)
    }

    /// Detaches from every interface and removes the link pins.
    pub fn detach_all(&mut self) {
        self.links.unpin_all();
    }

    /// Removes links pinned (by an earlier agent) for interfaces not in `keep`, which
    /// detaches them. Returns their interface names.
    pub fn detach_unconfigured(&mut self, keep: &[String]) -> Vec<String> {
        let mut gone = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return gone;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("link_")
                && !keep.iter().any(|k| k == iface)
                && std::fs::remove_file(e.path()).is_ok()
            {
                gone.push(iface.to_string());
            }
        }
        gone
    }

    pub fn attached_interfaces(&self) -> Vec<String> {
        self.links.held.iter().map(|(i, _)| i.clone()).collect()
    }
}
