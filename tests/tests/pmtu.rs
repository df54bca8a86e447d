//! Path MTU discovery through the VIP, both ways:
//!
//! - a "fragmentation needed" error about a packet the VIP sent reaches the flow's backend
//!   with its headers translated, and the backend's kernel accepts it (it lowers its path MTU
//!   towards the client). The error is injected as a real frame on the client's link, as a
//!   router on the client's side of the edge would send it;
//! - a client's full-size segments, too big for the edge's link to the backends: zdd answers
//!   with fragmentation needed / packet too big from the VIP, the client lowers its path MTU
//!   and the upload completes (with the next hop from a FIB lookup and from the cache).

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use zdd_tests::{Agent, Lab, Node, VIP_V4, VIP_V6, lab_spec, require_privileged};

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

fn route_mtu(lab: &Lab, node: Node, to: impl Into<IpAddr>) -> Option<u32> {
    let out = lab
        .ip(node, &["route", "get", &to.into().to_string()])
        .unwrap();
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

/// MTU of the edge's link to the backends' bridge (both ends); the client's is 1500.
const BACKEND_LINK_MTU: u32 = 1400;
/// The upload: many full-size segments.
const POST_BYTES: usize = 200_000;

/// Attaches the lab's XDP_PASS program (`zdd-lab.bpf.o`, see zdd-ebpf/src/lab.rs) to the
/// client's veth end, until the returned object is dropped: a veth flushes the frames sent
/// back with XDP_TX (zdd's ICMP answers) to a peer only when the peer has an XDP program;
/// without one they wait in its ring (a real NIC has no such condition).
fn xdp_pass_on_client(lab: &Lab) -> aya::Ebpf {
    use aya::programs::{Xdp, XdpMode};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/ebpf/zdd-lab.bpf.o");
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("{path} (built by `cargo xtask build-ebpf`): {e}"));
    // The ELF is parsed in place: give it 8-byte-aligned memory.
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `words` owns at least `bytes.len()` bytes and any bytes are a valid u64; the
    // byte view lives only as long as this statement.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len()) }
        .copy_from_slice(&bytes);
    // SAFETY: as above; `words` outlives the load.
    let aligned = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), bytes.len()) };
    let mut ebpf = aya::Ebpf::load(aligned).expect("loading zdd-lab.bpf.o");
    let prog: &mut Xdp = ebpf
        .program_mut("zdd_lab_pass")
        .expect("zdd_lab_pass in zdd-lab.bpf.o")
        .try_into()
        .unwrap();
    prog.load().expect("loading zdd_lab_pass");
    lab.in_ns(Node::Client, || {
        prog.attach("eth0", XdpMode::Default).map(drop)
    })
    .expect("attaching zdd_lab_pass to the client's eth0");
    ebpf
}

/// One `POST /` of `POST_BYTES` to `vip` from the client's namespace, after `pause` (with the
/// connection open): the backend that answered, or why it did not.
fn post(vip: SocketAddr, pause: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))
        .map_err(|e| format!("connecting to {vip}: {e}"))?;
    // Without PMTU discovery working, the segments vanish and this times out.
    for t in [
        s.set_read_timeout(Some(Duration::from_secs(10))),
        s.set_write_timeout(Some(Duration::from_secs(10))),
    ] {
        t.map_err(|e| e.to_string())?;
    }
    std::thread::sleep(pause);
    let mut req = format!(
        "POST / HTTP/1.1\r\nHost: {vip}\r\nContent-Length: {POST_BYTES}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    req.extend(std::iter::repeat_n(b'z', POST_BYTES));
    s.write_all(&req)
        .map_err(|e| format!("sending {POST_BYTES} bytes: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("reading the answer: {e}"))?;
    if !answer.starts_with("HTTP/1.1 200") {
        return Err(format!("answer: {answer:?}"));
    }
    answer
        .lines()
        .find_map(|l| l.strip_prefix("X-Backend: "))
        .map(str::to_string)
        .ok_or_else(|| format!("no X-Backend in {answer:?}"))
}

/// A client with a 1500-byte path sends full-size segments to the VIP (PMTU discovery on, the
/// default: DF set), and the edge's link to the backends carries only `BACKEND_LINK_MTU`
/// (the backends themselves have 1500, so they announce an MSS the client cannot use). zdd
/// answers each segment too big with an ICMP error from the VIP quoting it as the client sent
/// it: the client lowers its path MTU and the uploads complete. First with the connection
/// idle past the next-hop cache's 1 s (the big segments' next hop comes from a FIB lookup,
/// which reports the frame too big), then at once (from the next hop the SYN cached).
fn uploads_through_a_smaller_backend_link(vip: IpAddr) {
    let lab = Lab::new(lab_spec!()).unwrap();
    let mtu = BACKEND_LINK_MTU.to_string();
    lab.ip(
        Node::Edge,
        &["link", "set", lab.edge_backend_iface(), "mtu", &mtu],
    )
    .unwrap();
    // The bridge's port towards the edge (`LAN_EDGE_PORT`).
    lab.ip(Node::Lan, &["link", "set", "to-edge", "mtu", &mtu])
        .unwrap();
    let mut services = format!(
        "[[services]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\nsplit = {{ blue = 100 }}\n",
        SocketAddr::new(vip, 80)
    );
    for b in lab.backends() {
        let addr = if vip.is_ipv4() {
            b.http_v4()
        } else {
            b.http_v6()
        };
        services += &format!(
            "\n[[services.backends]]\nname = \"{}\"\naddr = \"{addr}\"\ngroup = \"{}\"\n",
            b.name, b.group
        );
    }
    let agent = Agent::start(&lab, &services).unwrap();
    let _pass = xdp_pass_on_client(&lab);
    let vip_sock = SocketAddr::new(vip, 80);
    let mut too_big = agent.stat("too_big").unwrap();
    for (round, pause) in [
        ("next hop from a FIB lookup", Duration::from_millis(1300)),
        ("next hop from the cache", Duration::ZERO),
    ] {
        // Each round starts from a 1500-byte path MTU.
        let family = if vip.is_ipv4() { "-4" } else { "-6" };
        lab.ip(Node::Client, &[family, "route", "flush", "cache"])
            .unwrap();
        assert_eq!(
            route_mtu(&lab, Node::Client, vip),
            None,
            "{round}: stale PMTU"
        );
        let answered = lab.in_ns(Node::Client, || post(vip_sock, pause));
        let backend = answered.unwrap_or_else(|e| {
            panic!(
                "{round}: the upload did not complete: {e}\ncounters: too_big {:?}, forward {:?}\n{}",
                agent.stat("too_big"),
                agent.stat("forward"),
                agent.log()
            )
        });
        assert!(
            lab.backends().iter().any(|b| b.name == backend),
            "{backend}"
        );
        // The client learnt the MTU from zdd's error (nothing else on the path sends one).
        assert_eq!(
            route_mtu(&lab, Node::Client, vip),
            Some(BACKEND_LINK_MTU),
            "{round}: the client's path MTU to the VIP"
        );
        let now = agent.stat("too_big").unwrap();
        assert!(now > too_big, "{round}: too_big did not grow ({now})");
        too_big = now;
    }
}

#[test]
fn full_size_segments_too_big_for_the_backend_link_v4_upload_completes() {
    require_privileged!();
    uploads_through_a_smaller_backend_link(VIP_V4.parse().unwrap());
}

#[test]
fn full_size_segments_too_big_for_the_backend_link_v6_upload_completes() {
    require_privileged!();
    uploads_through_a_smaller_backend_link(VIP_V6.parse().unwrap());
}
