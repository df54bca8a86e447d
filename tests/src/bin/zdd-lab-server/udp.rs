//! UDP echo: every datagram is answered with `<name> <group>\n` from the same socket.
//!
//! The reply's source is the request's destination (IP_PKTINFO / IPV6_PKTINFO), not whatever
//! the route would pick: with DSR the request is addressed to a VIP on `lo`, and the client only
//! accepts an answer from the VIP.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::thread;
use std::time::Duration;

use libc::{c_int, c_void, cmsghdr, in_pktinfo, in6_pktinfo, iovec, msghdr, sockaddr_storage};

use crate::Ident;

/// Room for one pktinfo control message, 8-byte aligned as cmsghdr needs.
type Control = [u64; 8];

enum Dst {
    V4(in_pktinfo),
    V6(in6_pktinfo),
}

pub fn echo(sock: UdpSocket, ident: &Ident) {
    let fd = sock.as_raw_fd();
    let v6 = sock.local_addr().is_ok_and(|a| a.is_ipv6());
    let (level, opt) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    if let Err(e) = setsockopt_on(fd, level, opt) {
        eprintln!("zdd-lab-server: pktinfo: {e}");
    }
    let mut data = [0u8; 2048];
    loop {
        match recv(fd, &mut data) {
            Ok((peer, peer_len, dst)) => {
                if let Err(e) = send(fd, &peer, peer_len, dst, &ident.body) {
                    eprintln!("zdd-lab-server: udp send: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("zdd-lab-server: udp recv: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn setsockopt_on(fd: c_int, level: c_int, opt: c_int) -> io::Result<()> {
    let one: c_int = 1;
    // SAFETY: valid pointer and length of an int.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const one).cast(),
            size_of::<c_int>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: c_int, data: &mut [u8]) -> io::Result<(sockaddr_storage, u32, Option<Dst>)> {
    // SAFETY: all-zero is a valid value of these plain C structs.
    let (mut peer, mut ctrl, mut msg): (sockaddr_storage, Control, msghdr) =
        unsafe { (zeroed(), zeroed(), zeroed()) };
    let mut iov = iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    msg.msg_name = (&raw mut peer).cast();
    msg.msg_namelen = size_of::<sockaddr_storage>() as u32;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<Control>();
    // SAFETY: msg points at live buffers of the given sizes.
    if unsafe { libc::recvmsg(fd, &mut msg, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut dst = None;
    // SAFETY: the CMSG_* walk stays inside msg_control as filled in by the kernel.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (lvl, ty, p) = ((*c).cmsg_level, (*c).cmsg_type, libc::CMSG_DATA(c));
            if lvl == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
                dst = Some(Dst::V4(p.cast::<in_pktinfo>().read_unaligned()));
            } else if lvl == libc::IPPROTO_IPV6 && ty == libc::IPV6_PKTINFO {
                dst = Some(Dst::V6(p.cast::<in6_pktinfo>().read_unaligned()));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((peer, msg.msg_namelen, dst))
}

fn send(
    fd: c_int,
    peer: &sockaddr_storage,
    peer_len: u32,
    dst: Option<Dst>,
    reply: &[u8],
) -> io::Result<()> {
    // SAFETY: all-zero is a valid value of these plain C structs.
    let (mut ctrl, mut msg): (Control, msghdr) = unsafe { (zeroed(), zeroed()) };
    let mut iov = iovec {
        iov_base: reply.as_ptr() as *mut c_void,
        iov_len: reply.len(),
    };
    msg.msg_name = (peer as *const sockaddr_storage).cast_mut().cast();
    msg.msg_namelen = peer_len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    // Source = the address the request was sent to, unless that was multicast/broadcast.
    let source = match dst {
        Some(Dst::V4(mut pi)) if !is_multi_v4(pi.ipi_addr.s_addr) => {
            pi.ipi_spec_dst = pi.ipi_addr;
            pi.ipi_ifindex = 0;
            Some((libc::IPPROTO_IP, libc::IP_PKTINFO, as_bytes(&pi).to_vec()))
        }
        Some(Dst::V6(mut pi)) if pi.ipi6_addr.s6_addr[0] != 0xff => {
            // The interface matters only for link-local addresses.
            if !(pi.ipi6_addr.s6_addr[0] == 0xfe && pi.ipi6_addr.s6_addr[1] & 0xc0 == 0x80) {
                pi.ipi6_ifindex = 0;
            }
            Some((
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                as_bytes(&pi).to_vec(),
            ))
        }
        _ => None,
    };
    if let Some((level, ty, bytes)) = source {
        // SAFETY: CMSG_SPACE(len) fits in Control for either pktinfo; pointers stay inside it.
        unsafe {
            msg.msg_control = ctrl.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(bytes.len() as u32) as usize;
            let c: *mut cmsghdr = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = level;
            (*c).cmsg_type = ty;
            (*c).cmsg_len = libc::CMSG_LEN(bytes.len() as u32) as usize;
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), libc::CMSG_DATA(c), bytes.len());
        }
    }
    // SAFETY: msg points at live buffers of the given sizes.
    if unsafe { libc::sendmsg(fd, &msg, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `s_addr` is in network order: the first octet is the lowest byte in memory.
fn is_multi_v4(s_addr: u32) -> bool {
    let first = s_addr.to_ne_bytes()[0];
    first >= 224 || s_addr == u32::MAX
}

fn as_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: in_pktinfo and in6_pktinfo have no padding: every byte is initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
}
