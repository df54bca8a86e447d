//! Frames for the data-path benchmark: built with valid checksums, and read back after a run
//! to check what the program did to them.

use std::net::IpAddr;

use anyhow::{Result, bail, ensure};

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

/// One's complement sum of `data` (as big-endian words), not folded.
fn sum(data: &[u8]) -> u32 {
    let mut s = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        s += (*b as u32) << 8;
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Pseudo-header sum for the L4 checksum.
fn pseudo(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u32 {
    sum(src) + sum(dst) + proto as u32 + l4_len as u32
}

pub fn build(s: &Spec) -> Vec<u8> {
    let v6 = s.src.is_ipv6();
    assert_eq!(v6, s.dst.is_ipv6(), "mixed families");
    let mut l4 = Vec::new();
    l4.extend_from_slice(&s.sport.to_be_bytes());
    l4.extend_from_slice(&s.dport.to_be_bytes());
    if s.proto == PROTO_TCP {
        l4.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
        let ack = if s.flags & TCP_ACK != 0 {
            0x0bad_cafe
        } else {
            0
        };
        l4.extend_from_slice(&(ack as u32).to_be_bytes());
        l4.push(5 << 4);
        l4.push(s.flags);
        l4.extend_from_slice(&64240u16.to_be_bytes()); // window
        l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    } else {
        l4.extend_from_slice(&((8 + PAYLOAD.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(PAYLOAD);
    let (src, dst) = (ip_bytes(s.src), ip_bytes(s.dst));
    let csum_off = if s.proto == PROTO_TCP { 16 } else { 6 };
    let mut c = !fold(pseudo(&src, &dst, s.proto, l4.len()) + sum(&l4));
    if s.proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    l4[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());

    let mut f = Vec::with_capacity(14 + 40 + l4.len());
    f.extend_from_slice(&s.dmac);
    f.extend_from_slice(&s.smac);
    if v6 {
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        f.push(s.proto);
        f.push(TTL);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
    } else {
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0x4d, 0x2a, 0x40, 0]); // id, DF
        ip.push(TTL);
        ip.push(s.proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let c = !fold(sum(&ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
    }
    f.extend_from_slice(&l4);
    f
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
    ensure!(f.len() >= 14, "frame of {} bytes", f.len());
    let mac = |o: usize| -> [u8; 6] { f[o..o + 6].try_into().unwrap() };
    let et = u16::from_be_bytes([f[12], f[13]]);
    let (src, dst, proto, ttl, l4, srcb, dstb) = match et {
        0x0800 => {
            ensure!(f.len() >= 34, "short IPv4 frame");
            let ip = &f[14..34];
            ensure!(ip[0] == 0x45, "IPv4 header with options or bad version");
            ensure!(
                fold(sum(ip)) == 0xffff,
                "IPv4 header checksum is wrong ({:#06x})",
                u16::from_be_bytes([ip[10], ip[11]])
            );
            let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            ensure!(
                14 + tot == f.len(),
                "IPv4 total length {tot} vs frame {}",
                f.len()
            );
            let s: [u8; 4] = ip[12..16].try_into().unwrap();
            let d: [u8; 4] = ip[16..20].try_into().unwrap();
            (
                IpAddr::from(s),
                IpAddr::from(d),
                ip[9],
                ip[8],
                &f[34..],
                s.to_vec(),
                d.to_vec(),
            )
        }
        0x86dd => {
            ensure!(f.len() >= 54, "short IPv6 frame");
            let ip = &f[14..54];
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            ensure!(
                54 + plen == f.len(),
                "IPv6 payload length {plen} vs frame {}",
                f.len()
            );
            let s: [u8; 16] = ip[8..24].try_into().unwrap();
            let d: [u8; 16] = ip[24..40].try_into().unwrap();
            (
                IpAddr::from(s),
                IpAddr::from(d),
                ip[6],
                ip[7],
                &f[54..],
                s.to_vec(),
                d.to_vec(),
            )
        }
        e => bail!("ethertype {e:#06x}"),
    };
    ensure!(l4.len() >= 8, "short L4 header");
    let csum = fold(pseudo(&srcb, &dstb, proto, l4.len()) + sum(l4));
    let udp_v4_none = proto == PROTO_UDP && src.is_ipv4() && l4[6] == 0 && l4[7] == 0;
    if !udp_v4_none {
        ensure!(
            csum == 0xffff,
            "{} checksum is wrong (sum {csum:#06x})",
            if proto == PROTO_TCP { "TCP" } else { "UDP" }
        );
    }
    Ok(Seen {
        dmac: mac(0),
        smac: mac(6),
        src,
        dst,
        proto,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        ttl,
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
