//! Path MTU discovery through the VIP: a "fragmentation needed" error about a packet the VIP
//! sent reaches the flow's backend with its headers translated, and the backend's kernel
//! accepts it (it lowers its path MTU towards the client). The error is injected as a real
//! frame on the client's link, as a router on the client's side of the edge would send it.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use zdd_tests::{Agent, Lab, Node, VIP_V4, lab_spec, require_privileged};

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn csum(data: &[u8]) -> [u8; 2] {
    let mut s = sum16(data);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    (!(s as u16)).to_be_bytes()
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = csum(&h);
    h[10..12].copy_from_slice(&c);
    h
}

#[allow(clippy::too_many_arguments)]
/// Ethernet frame: ICMP "fragmentation needed" (MTU `mtu`) from `from` to the VIP, quoting a
/// UDP datagram VIP:`vport` → client:`cport`.
fn frag_needed(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    from: Ipv4Addr,
    client: Ipv4Addr,
    vip: Ipv4Addr,
    vport: u16,
    cport: u16,
    mtu: u16,
) -> Vec<u8> {
    let mut quoted_udp = Vec::new();
    quoted_udp.extend_from_slice(&vport.to_be_bytes());
    quoted_udp.extend_from_slice(&cport.to_be_bytes());
    quoted_udp.extend_from_slice(&1400u16.to_be_bytes());
    quoted_udp.extend_from_slice(&[0, 0]);
    let mut quoted = ipv4_header(vip, client, 17, 1392);
    quoted.extend_from_slice(&quoted_udp);
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&quoted);
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c);
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ipv4_header(from, vip, 1, icmp.len()));
    f.extend_from_slice(&icmp);
    f
}

fn send_frame(ifindex: u32, dst_mac: [u8; 6], frame: &[u8]) {
    // SAFETY: plain socket calls with valid buffers and a zeroed sockaddr_ll.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&dst_mac);
        let n = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        libc::close(fd);
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn route_mtu(lab: &Lab, node: Node, to: Ipv4Addr) -> Option<u32> {
    let out = lab.ip(node, &["route", "get", &to.to_string()]).unwrap();
    let mut it = out.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mtu" {
            return it.next()?.parse().ok();
        }
    }
    None
}

#[test]
fn frag_needed_about_a_vip_flow_reaches_its_backend_translated() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let mut services = format!(
        "[[services]]\nname = \"dns\"\nvip = \"{VIP_V4}:53\"\nprotocol = \"udp\"\nsplit = {{ blue = 100 }}\n"
    );
    for b in lab.backends() {
        services += &format!(
            "\n[[services.backends]]\nname = \"{}\"\naddr = \"{}\"\ngroup = \"{}\"\n",
            b.name,
            b.udp_v4(),
            b.group
        );
    }
    let agent = Agent::start(&lab, &services).unwrap();
    let vip: Ipv4Addr = VIP_V4.parse().unwrap();

    // A UDP flow: the answer names the backend the flow is pinned to.
    let (cport, backend) = lab.in_ns(Node::Client, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect((vip, 53)).unwrap();
        s.send(b"hello").unwrap();
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf).unwrap();
        let name = String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        (s.local_addr().unwrap().port(), name)
    });
    let be = lab.backend(&backend).clone();
    assert_eq!(
        route_mtu(&lab, be.node, lab.client_v4()),
        None,
        "no PMTU exception yet"
    );

    let frame = frag_needed(
        lab.mac(Node::Edge, "eth0").unwrap(),
        lab.mac(Node::Client, "eth0").unwrap(),
        lab.client_v4(),
        lab.client_v4(),
        vip,
        53,
        cport,
        1280,
    );
    let ifindex = lab.ifindex(Node::Client, "eth0").unwrap();
    let dst = lab.mac(Node::Edge, "eth0").unwrap();
    lab.in_ns(Node::Client, || send_frame(ifindex, dst, &frame));

    // The backend's kernel checks the ICMP checksum, the quoted header and its socket before
    // it records the lower MTU: seeing it proves the translation end to end.
    let start = Instant::now();
    let mut mtu = None;
    while start.elapsed() < Duration::from_secs(3) && mtu.is_none() {
        mtu = route_mtu(&lab, be.node, lab.client_v4());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        mtu,
        Some(1280),
        "backend {backend} did not lower its path MTU\n{}",
        agent.log()
    );
    assert_eq!(agent.stat("icmp_translated").unwrap(), 1);
    // Only the flow's backend hears about it.
    for other in lab.backends().iter().filter(|b| b.name != backend) {
        assert_eq!(
            route_mtu(&lab, other.node, lab.client_v4()),
            None,
            "{}",
            other.name
        );
    }
}
