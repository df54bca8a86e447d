//! Route and neighbour changes, from rtnetlink: the data path caches each backend's next
//! hop, and the agent drops those cache entries as soon as the kernel's routing or
//! neighbour tables change (the data path's own timer is only the safety net).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

/// A netlink socket subscribed to route and neighbour notifications of this namespace.
pub struct RouteWatch {
    fd: AsyncFd<OwnedFd>,
}

impl RouteWatch {
    pub fn new() -> io::Result<RouteWatch> {
        // SAFETY: plain socket/bind calls; the fd is owned right after creation.
        let fd = unsafe {
            let raw = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(raw);
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            sa.nl_groups = RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
            if libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            fd
        };
        // SAFETY: the fd is a valid socket we own, and it stays open as long as the AsyncFd.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(RouteWatch { fd })
    }

    /// Waits for at least one notification, then drains what is queued (the content does
    /// not matter: any change invalidates the cache).
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut got = false;
            let mut buf = [0u8; 16384];
            loop {
                // SAFETY: recv into a stack buffer of the given length.
                let n = unsafe {
                    libc::recv(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    // Notifications were lost: a change happened for sure.
                    Some(libc::ENOBUFS) => {
                        got = true;
                        continue;
                    }
                    _ if n == 0 => break,
                    _ => return Err(err),
                }
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}
