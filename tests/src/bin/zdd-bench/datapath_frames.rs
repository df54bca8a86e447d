//! Frames for the data-path benchmark: a thin layer over the shared frame builder and
//! independent verifier (`zdd_tests::packet`), in the terms the benchmark checks.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, anyhow};
use zdd_tests::packet::{self, FrameSpec};

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_PSH: u8 = 0x08;

const PAYLOAD: &[u8] = b"zdd bench packet";
const TTL: u8 = 64;

/// What a frame carries.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (ignored for UDP).
    pub flags: u8,
}

/// The frame of `s`, with valid checksums.
pub fn build(s: &Spec) -> Vec<u8> {
    let (src, dst) = (
        SocketAddr::new(s.src, s.sport),
        SocketAddr::new(s.dst, s.dport),
    );
    let f = if s.proto == PROTO_TCP {
        FrameSpec::tcp(src, dst).flags(s.flags)
    } else {
        FrameSpec::udp(src, dst)
    };
    f.macs(s.smac, s.dmac).ttl(TTL).payload(PAYLOAD).build()
}

/// A frame read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
}

/// Parses a frame built by [`build`] (possibly rewritten) and checks every checksum in it.
pub fn read(f: &[u8]) -> Result<Seen> {
    let p = packet::verify(f).map_err(|e| anyhow!(e))?;
    let t = p.transport.as_ref().context("no TCP/UDP header")?;
    Ok(Seen {
        dmac: p.dst_mac,
        smac: p.src_mac,
        src: p.src_ip().context("not IP")?,
        dst: p.dst_ip().context("not IP")?,
        proto: t.proto,
        sport: t.sport,
        dport: t.dport,
        ttl: p.ttl().context("not IP")?,
    })
}

impl Seen {
    /// What an untouched frame of `s` reads as.
    pub fn of(s: &Spec) -> Seen {
        Seen {
            dmac: s.dmac,
            smac: s.smac,
            src: s.src,
            dst: s.dst,
            proto: s.proto,
            sport: s.sport,
            dport: s.dport,
            ttl: TTL,
        }
    }
}

pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_read_back() {
        for (src, dst) in [("10.0.1.2", "10.0.100.1"), ("fd00:1::2", "fd00:100::1")] {
            for proto in [PROTO_TCP, PROTO_UDP] {
                let s = Spec {
                    dmac: [1; 6],
                    smac: [2; 6],
                    src: src.parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    proto,
                    sport: 40000,
                    dport: 80,
                    flags: TCP_ACK,
                };
                assert_eq!(read(&build(&s)).unwrap(), Seen::of(&s));
            }
        }
    }
}
