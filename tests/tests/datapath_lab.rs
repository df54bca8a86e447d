//! Data-path features end to end: the real `zdd-agent` in the lab's edge namespace, real
//! clients in the client namespace, real backends. IPv6, UDP, DSR, client affinity, cohort
//! pins, backend removal under load, a flood larger than the flow table, a refused reload and
//! an agent crash/restart.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use aya::maps::{HashMap as AyaHashMap, MapData};
use zdd_common::{FAMILY_V4, FlowEntry, FlowKey, LAYOUT_VERSION, PROTO_TCP, map_names};
use zdd_tests::{
    Agent, Backend, Lab, Node, VIP_V4, VIP_V6, connect_and_get, http_get, lab_spec,
    require_privileged,
};

fn vip4(port: u16) -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), port)
}

fn vip6(port: u16) -> SocketAddr {
    SocketAddr::new(VIP_V6.parse().unwrap(), port)
}

/// One `[[services]]` table: `settings` are its TOML lines (protocol, forwarding, split...),
/// then the given backends (name and group from the lab, address as given), then `pins`
/// (`(source, group)`).
fn service<'b>(
    name: &str,
    vip: SocketAddr,
    settings: &str,
    backends: impl IntoIterator<Item = (&'b Backend, SocketAddr)>,
    pins: &[(&str, &str)],
) -> String {
    let mut s = format!("[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\n{settings}\n");
    for (b, addr) in backends {
        s += &format!(
            "\n[[services.backends]]\nname = \"{}\"\naddr = \"{addr}\"\ngroup = \"{}\"\nweight = 100\n",
            b.name, b.group
        );
    }
    for (source, group) in pins {
        s += &format!("\n[[services.pins]]\nsource = \"{source}\"\ngroup = \"{group}\"\n");
    }
    s
}

/// TCP nat service "web" on VIP_V4:80 with every lab backend (IPv4) and `split`.
fn web(lab: &Lab, split: &str) -> String {
    web_with(lab, split, |_| true, &[])
}

/// As [`web`], with only the backends `keep` accepts, and cohort pins.
fn web_with(
    lab: &Lab,
    split: &str,
    keep: impl Fn(&Backend) -> bool,
    pins: &[(&str, &str)],
) -> String {
    service(
        "web",
        vip4(80),
        &format!("protocol = \"tcp\"\nforwarding = \"nat\"\nsplit = {{ {split} }}"),
        lab.backends()
            .iter()
            .filter(|b| keep(b))
            .map(|b| (b, b.http_v4())),
        pins,
    )
}

/// `n` new connections to `vip`, one request each: answers per backend, and errors.
fn new_connections(lab: &Lab, vip: SocketAddr, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    lab.in_ns(Node::Client, || {
        let mut backends = BTreeMap::new();
        let mut errors = Vec::new();
        for i in 0..n {
            match connect_and_get(vip) {
                Ok(r) if r.status == 200 => *backends.entry(r.backend).or_insert(0) += 1,
                Ok(r) => errors.push(format!("status {}: {r:?}", r.status)),
                Err(e) => errors.push(format!("{e:#}")),
            }
            // Bounded: a broken path costs a few timeouts, not n of them.
            if errors.len() >= 3 {
                errors.push(format!("stopped after {} of {n} connections", i + 1));
                break;
            }
        }
        (backends, errors)
    })
}

/// Backend counts summed per group.
fn by_group(lab: &Lab, backends: &BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    let mut g = BTreeMap::new();
    for (name, n) in backends {
        *g.entry(lab.backend(name).group.clone()).or_insert(0) += n;
    }
    g
}

/// A keep-alive connection from the client and the backend its first request reached.
struct Conn {
    stream: TcpStream,
    backend: String,
}

fn keep_alive_connections(lab: &Lab, vip: SocketAddr, n: usize) -> Vec<Conn> {
    lab.in_ns(Node::Client, || {
        (0..n)
            .map(|i| {
                let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("connection {i} to {vip}: {e}"));
                let r = http_get(&mut stream, &vip.to_string(), "/")
                    .unwrap_or_else(|e| panic!("connection {i} to {vip}: {e:#}"));
                Conn {
                    stream,
                    backend: r.backend,
                }
            })
            .collect()
    })
}

/// One more request on each connection: every one must answer from its first backend.
fn assert_sticky(conns: &mut [Conn], host: &str, when: &str, log: impl Fn() -> String) {
    for (i, c) in conns.iter_mut().enumerate() {
        let r = http_get(&mut c.stream, host, "/")
            .unwrap_or_else(|e| panic!("{when}: connection {i} ({}): {e:#}\n{}", c.backend, log()));
        assert_eq!(
            r.backend,
            c.backend,
            "{when}: connection {i} moved\n{}",
            log()
        );
    }
}

/// Counter deltas: `after - before` per name.
fn stats(agent: &Agent) -> BTreeMap<String, u64> {
    let out = agent.zdd(&["stats"]).unwrap();
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, name: &str) -> u64 {
    after[name] - before[name]
}

/// Sends `ping` on a connected UDP socket and returns the answer (`<name> <group>\n`).
fn udp_ask(s: &UdpSocket) -> Result<String> {
    s.send(b"ping")?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).context("no UDP answer")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn udp_connected(local_port: u16, to: SocketAddr) -> Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::new("0.0.0.0".parse()?, local_port))?;
    // Connected: the kernel only delivers datagrams from `to`, so an answer proves that the
    // reply was translated back to the VIP and its port.
    s.connect(to)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

/// The backend name in a UDP echo answer, checked against the lab.
fn udp_backend(lab: &Lab, answer: &str) -> Result<String> {
    let (name, group) = answer
        .trim_end()
        .split_once(' ')
        .with_context(|| format!("bad answer {answer:?}"))?;
    let b = lab
        .backends()
        .iter()
        .find(|b| b.name == name)
        .with_context(|| format!("answer {answer:?} names no backend"))?;
    ensure!(
        b.group == group,
        "answer {answer:?}: {} is in {}",
        name,
        b.group
    );
    Ok(name.to_string())
}

/// Whether the data path holds the flow entry (`FLOWS`) of a client connection to an IPv4
/// VIP, and on which backend id, read from the agent's pinned maps. For failure messages.
fn flow_entries(lab: &Lab, agent: &Agent, conn: &Conn) -> String {
    let (Ok(SocketAddr::V4(local)), Ok(SocketAddr::V4(vip))) =
        (conn.stream.local_addr(), conn.stream.peer_addr())
    else {
        return "not an IPv4 connection".into();
    };
    let SocketAddr::V4(be) = lab.backend(&conn.backend).http_v4() else {
        unreachable!("http_v4 is IPv4")
    };
    let w = |a: &std::net::Ipv4Addr| [u32::from_ne_bytes(a.octets()), 0, 0, 0];
    let fwd = FlowKey {
        src: w(local.ip()),
        dst: w(vip.ip()),
        sport: local.port().to_be(),
        dport: vip.port().to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let dir = agent.pin_dir().join(format!("v{LAYOUT_VERSION}"));
    let open = |name: &str| -> Result<aya::maps::Map> {
        let data = MapData::from_pin(dir.join(name))?;
        Ok(aya::maps::Map::from_map_data(data)?)
    };
    let present = || -> Result<Option<FlowEntry>> {
        let flows: AyaHashMap<_, FlowKey, FlowEntry> =
            AyaHashMap::try_from(open(map_names::FLOWS)?)?;
        Ok(flows.get(&fwd, 0).ok())
    };
    match present() {
        Ok(Some(e)) => format!(
            "{local} -> {vip} on {be}: flow entry present, backend id {}",
            e.backend
        ),
        Ok(None) => format!("{local} -> {vip} on {be}: flow entry MISSING"),
        Err(e) => format!("cannot read the flow maps: {e:#}"),
    }
}

// 1 ------------------------------------------------------------------------------------------

#[test]
fn ipv6_nat_splits_and_keeps_established_connections() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let vip = vip6(80);
    let svc = |split: &str| {
        service(
            "web6",
            vip,
            &format!("protocol = \"tcp\"\nforwarding = \"nat\"\nsplit = {{ {split} }}"),
            lab.backends().iter().map(|b| (b, b.http_v6())),
            &[],
        )
    };
    let mut agent = Agent::start(&lab, &svc("blue = 50, green = 50")).unwrap();
    let before = stats(&agent);

    let (backends, errors) = new_connections(&lab, vip, 200);
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    let groups = by_group(&lab, &backends);
    println!("IPv6 50/50: {backends:?}");
    let blue = *groups.get("blue").unwrap_or(&0);
    let green = *groups.get("green").unwrap_or(&0);
    assert_eq!(blue + green, 200, "{backends:?}");
    assert!(
        (80..=120).contains(&blue),
        "blue {blue} of 200: {backends:?}"
    );
    assert!(
        (80..=120).contains(&green),
        "green {green} of 200: {backends:?}"
    );
    assert_eq!(backends.len(), 4, "every backend gets flows: {backends:?}");
    let after = stats(&agent);
    assert!(delta(&before, &after, "new_flow") >= 200, "{after:?}");
    assert!(delta(&before, &after, "reverse") > 0, "{after:?}");

    // Stickiness across a split change, over IPv6.
    let mut conns = keep_alive_connections(&lab, vip, 10);
    agent.reload(&svc("blue = 0, green = 100")).unwrap();
    for round in 0..5 {
        assert_sticky(
            &mut conns,
            &vip.to_string(),
            &format!("round {round}"),
            || agent.log(),
        );
    }
    let (backends, errors) = new_connections(&lab, vip, 50);
    assert!(errors.is_empty(), "errors: {errors:?}");
    assert_eq!(
        by_group(&lab, &backends).get("green"),
        Some(&50),
        "{backends:?}"
    );
}

// 2 ------------------------------------------------------------------------------------------

#[test]
fn udp_nat_answers_from_the_vip_and_keeps_a_source_port_on_one_backend() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let vip = vip4(53);
    let svc = service(
        "dns",
        vip,
        "protocol = \"udp\"\nforwarding = \"nat\"\nsplit = { blue = 50, green = 50 }",
        lab.backends().iter().map(|b| (b, b.udp_v4())),
        &[],
    );
    let agent = Agent::start(&lab, &svc).unwrap();
    let before = stats(&agent);

    lab.in_ns(Node::Client, || {
        // 200 distinct source ports, all sockets open at once.
        let socks: Vec<(u16, UdpSocket)> = (0..200u16)
            .map(|i| {
                let port = 41_000 + i;
                (port, udp_connected(port, vip).unwrap())
            })
            .collect();
        let mut first = Vec::new();
        let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
        for (port, s) in &socks {
            let a =
                udp_ask(s).unwrap_or_else(|e| panic!("source port {port}: {e:#}\n{}", agent.log()));
            let b = udp_backend(&lab, &a).unwrap();
            *per_backend.entry(b.clone()).or_insert(0) += 1;
            first.push(b);
        }
        println!("UDP 50/50 over 200 source ports: {per_backend:?}");
        let groups = by_group(&lab, &per_backend);
        assert!(
            groups.get("blue").is_some_and(|&n| n >= 60)
                && groups.get("green").is_some_and(|&n| n >= 60),
            "{per_backend:?}"
        );
        // The same source port: the same backend, every time.
        for ((port, s), b) in socks.iter().zip(&first).take(40) {
            for k in 0..5 {
                let a = udp_ask(s).unwrap();
                assert_eq!(
                    &udp_backend(&lab, &a).unwrap(),
                    b,
                    "port {port}, datagram {k}"
                );
            }
        }
        // Also from a new socket on the same port (the flow entry outlives the socket).
        drop(socks);
        for (i, b) in first.iter().enumerate().take(20) {
            let port = 41_000 + i as u16;
            let s = udp_connected(port, vip).unwrap();
            let a = udp_ask(&s).unwrap();
            assert_eq!(&udp_backend(&lab, &a).unwrap(), b, "port {port} again");
        }
    });
    let after = stats(&agent);
    assert!(delta(&before, &after, "new_flow") >= 200, "{after:?}");
    assert!(
        delta(&before, &after, "new_flow") <= 210,
        "a known source port made a new flow: {after:?}"
    );
    assert!(
        delta(&before, &after, "reverse") >= 200 + 200 + 20,
        "{after:?}"
    );
}

// 3 ------------------------------------------------------------------------------------------

/// A dsr service on VIP:8080 over every backend (each holds the VIP on its loopback).
fn dsr_web(lab: &Lab) -> (SocketAddr, String) {
    let vip = vip4(8080);
    for b in lab.backends() {
        lab.add_vip_on_backend_lo(&b.name, vip.ip()).unwrap();
    }
    let svc = service(
        "web-dsr",
        vip,
        "protocol = \"tcp\"\nforwarding = \"dsr\"\nsplit = { blue = 50, green = 50 }",
        lab.backends().iter().map(|b| (b, b.http_v4())),
        &[],
    );
    (vip, svc)
}

#[test]
fn dsr_replies_bypass_the_data_path() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let (vip, svc) = dsr_web(&lab);
    let agent = Agent::start(&lab, &svc).unwrap();
    let before = stats(&agent);
    let (backends, errors) = new_connections(&lab, vip, 100);
    assert!(
        errors.is_empty(),
        "errors: {errors:?}\ncounters: {:?}\nedge neighbours:\n{}\n{}",
        stats(&agent),
        lab.ip(Node::Edge, &["neigh", "show"]).unwrap_or_default(),
        agent.log()
    );
    println!("DSR: {backends:?}");
    assert!(backends.len() >= 3, "{backends:?}");
    let after = stats(&agent);
    // Every client packet of every connection went through XDP (SYN, ACK, request, FIN...).
    assert!(
        delta(&before, &after, "forward") + delta(&before, &after, "pass_to_kernel") >= 300,
        "{after:?}"
    );
    assert!(delta(&before, &after, "new_flow") >= 100, "{after:?}");
    // No reply was translated: the backends answered from the VIP themselves. (They route
    // through the edge host, which forwards them as any router would; XDP passes them.)
    assert_eq!(
        delta(&before, &after, "reverse"),
        0,
        "replies went through the nat path: {after:?}"
    );

    // Keep-alive works too (several segments each way on one flow).
    let mut conns = keep_alive_connections(&lab, vip, 5);
    for round in 0..3 {
        assert_sticky(
            &mut conns,
            &vip.to_string(),
            &format!("round {round}"),
            || agent.log(),
        );
    }
    assert_eq!(stats(&agent)["reverse"], before["reverse"]);
}

#[test]
fn dsr_flows_above_the_record_limit_are_served_unrecorded() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let (vip, svc) = dsr_web(&lab);
    // Two flows recorded per CPU per second: nearly every connection below goes unrecorded.
    let agent = Agent::start_with(&lab, "new_flow_record_limit = 2", &svc).unwrap();
    let before = stats(&agent);
    let (backends, errors) = new_connections(&lab, vip, 100);
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    assert!(backends.len() >= 3, "{backends:?}");
    // Keep-alive connections: every later segment misses the table and is selected again,
    // onto the same backend (the tables did not change).
    let mut conns = keep_alive_connections(&lab, vip, 5);
    for round in 0..3 {
        assert_sticky(
            &mut conns,
            &vip.to_string(),
            &format!("round {round}"),
            || agent.log(),
        );
    }
    let after = stats(&agent);
    println!(
        "record limit 2/s: new_flow +{}, unrecorded +{}",
        delta(&before, &after, "new_flow"),
        delta(&before, &after, "unrecorded")
    );
    assert!(delta(&before, &after, "new_flow") >= 105, "{after:?}");
    assert!(
        delta(&before, &after, "unrecorded") >= 50,
        "most flows should have gone unrecorded: {after:?}"
    );
}

// 4 ------------------------------------------------------------------------------------------

#[test]
fn client_affinity_sends_every_connection_of_a_client_to_one_backend() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let svc = service(
        "web",
        vip4(80),
        "protocol = \"tcp\"\naffinity = \"client\"\nsplit = { blue = 50, green = 50 }",
        lab.backends().iter().map(|b| (b, b.http_v4())),
        &[],
    );
    let agent = Agent::start(&lab, &svc).unwrap();
    let (backends, errors) = new_connections(&lab, vip4(80), 200);
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    assert_eq!(
        backends.len(),
        1,
        "one client, 200 source ports, several backends: {backends:?}"
    );
    assert_eq!(backends.values().sum::<usize>(), 200);
}

// 5 ------------------------------------------------------------------------------------------

#[test]
fn cohort_pin_sends_the_client_to_green_until_unpinned() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let pinned = web_with(
        &lab,
        "blue = 100, green = 0",
        |_| true,
        &[("10.0.1.0/24", "green")],
    );
    let mut agent = Agent::start(&lab, &pinned).unwrap();

    let (backends, errors) = new_connections(&lab, vip4(80), 50);
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    assert_eq!(
        by_group(&lab, &backends).get("green"),
        Some(&50),
        "pinned client (10.0.1.2 in 10.0.1.0/24): {backends:?}"
    );
    // A pin in another prefix does not catch this client.
    agent
        .reload(&web_with(
            &lab,
            "blue = 100, green = 0",
            |_| true,
            &[("10.0.9.0/24", "green")],
        ))
        .unwrap();
    let (backends, errors) = new_connections(&lab, vip4(80), 20);
    assert!(errors.is_empty(), "errors: {errors:?}");
    assert_eq!(
        by_group(&lab, &backends).get("blue"),
        Some(&20),
        "{backends:?}"
    );

    // Pinned again; one connection stays open across the unpin.
    agent.reload(&pinned).unwrap();
    let mut conns = keep_alive_connections(&lab, vip4(80), 3);
    assert!(
        conns
            .iter()
            .all(|c| lab.backend(&c.backend).group == "green"),
        "re-pinned"
    );
    agent.reload(&web(&lab, "blue = 100, green = 0")).unwrap();
    let (backends, errors) = new_connections(&lab, vip4(80), 50);
    assert!(errors.is_empty(), "errors: {errors:?}");
    assert_eq!(
        by_group(&lab, &backends).get("blue"),
        Some(&50),
        "unpinned: {backends:?}"
    );
    assert_sticky(&mut conns, VIP_V4, "after unpin", || agent.log());
}

// 6 ------------------------------------------------------------------------------------------

#[test]
fn removing_a_backend_moves_only_its_flows() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let mut agent = Agent::start(&lab, &web(&lab, "blue = 50, green = 50")).unwrap();
    let mut conns = keep_alive_connections(&lab, vip4(80), 40);
    let on: BTreeSet<&str> = conns.iter().map(|c| c.backend.as_str()).collect();
    assert!(on.len() >= 3 && on.contains("blue-1"), "spread: {on:?}");
    let (mut gone, mut kept): (Vec<Conn>, Vec<Conn>) =
        conns.drain(..).partition(|c| c.backend == "blue-1");
    let before = stats(&agent);

    agent
        .reload(&web_with(
            &lab,
            "blue = 50, green = 50",
            |b| b.name != "blue-1",
            &[],
        ))
        .unwrap();

    // The others carry on, on their backend, several requests each.
    for round in 0..3 {
        assert_sticky(&mut kept, VIP_V4, &format!("round {round}"), || agent.log());
    }
    // blue-1's flows are re-selected: their next segment reaches another backend, which has
    // no such connection (it resets it). Whatever happens, blue-1 does not answer.
    for (i, c) in gone.iter_mut().enumerate() {
        match http_get(&mut c.stream, VIP_V4, "/") {
            Ok(r) => assert_ne!(r.backend, "blue-1", "removed backend answered conn {i}"),
            Err(e) => println!("connection {i} (was on blue-1): {e:#}"),
        }
    }
    let after = stats(&agent);
    assert!(
        delta(&before, &after, "reselected") >= gone.len() as u64,
        "{} flows were on blue-1: {after:?}",
        gone.len()
    );
    let (backends, errors) = new_connections(&lab, vip4(80), 100);
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    assert!(!backends.contains_key("blue-1"), "{backends:?}");
    assert!(backends.contains_key("blue-2"), "{backends:?}");
    // And the kept ones still work after all that.
    assert_sticky(&mut kept, VIP_V4, "at the end", || agent.log());
}

// 7 ------------------------------------------------------------------------------------------

#[test]
fn a_flood_larger_than_the_flow_table_keeps_established_flows_on_their_backend() {
    require_privileged!();
    const TABLE: usize = 1024;
    const FLOOD: usize = 8 * TABLE;
    /// Datagrams sent from one CPU before the flood moves to the next.
    const BATCH: usize = 256;
    let start = Instant::now();
    let lab = Lab::new(lab_spec!()).unwrap();
    let services = web(&lab, "blue = 50, green = 50")
        + "\n"
        + &service(
            "dns",
            vip4(53),
            "protocol = \"udp\"\nsplit = { blue = 50, green = 50 }",
            lab.backends().iter().map(|b| (b, b.udp_v4())),
            &[],
        );
    let agent = Agent::start_with(&lab, &format!("flow_table_size = {TABLE}"), &services).unwrap();
    let mut conns = keep_alive_connections(&lab, vip4(80), 20);
    let before = stats(&agent);

    // New flows, 8x the table: one datagram each from a distinct source port (answers come
    // back to closed sockets; the client's kernel drops them). The sender moves over every
    // CPU in turn: the program runs on the sending CPU, and the kernel's LRU keeps each CPU's
    // newest entries on a list of that CPU's own until that CPU inserts again, so a flood from
    // one CPU could not evict flows recorded on another.
    let cpus = allowed_cpus();
    lab.in_ns(Node::Client, || {
        for i in 0..FLOOD {
            if i % BATCH == 0 {
                pin_thread_to(cpus[i / BATCH % cpus.len()]);
            }
            let port = 20_000 + i as u16;
            let s = UdpSocket::bind(SocketAddr::new("0.0.0.0".parse().unwrap(), port)).unwrap();
            s.send_to(b"x", vip4(53)).unwrap();
        }
    });
    // Wait for the count, not for a time: until the program has seen every datagram.
    let mut mid = stats(&agent);
    for _ in 0..100 {
        if delta(&before, &mid, "new_flow") >= FLOOD as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        mid = stats(&agent);
    }
    println!(
        "flood: new_flow +{}, reverse +{}, flow_table_full +{}",
        delta(&before, &mid, "new_flow"),
        delta(&before, &mid, "reverse"),
        delta(&before, &mid, "flow_table_full")
    );
    assert!(
        delta(&before, &mid, "new_flow") >= FLOOD as u64,
        "every datagram of the flood was a new flow: {mid:?}"
    );

    // Why the established connections survive: the flow maps are LRU, so the flood evicts
    // the least recently used entries, and these 20 may well be among them (they were idle).
    // An evicted flow is not lost: its next packet misses, and selection runs again with the
    // same hash over the same split and Maglev tables (nothing changed), so it picks the same
    // backend and records the flow again (forward and reverse entries). That counts as a new
    // flow, not as a re-selection (which is for flows whose backend went away).
    // Before any packet touches them again: where do the 20 flows stand in the maps?
    let entries: Vec<String> = conns
        .iter()
        .map(|c| flow_entries(&lab, &agent, c))
        .collect();
    let evicted = entries.iter().filter(|e| e.contains("MISSING")).count();
    println!("after the flood, {evicted} of 20 established flows lost an entry");
    // Otherwise this test would not test what it says: eight times the table's size in new
    // flows, on every CPU, leaves no idle entry of an LRU table in place.
    assert_eq!(
        evicted,
        20,
        "the flood did not evict the established flows:\n{}",
        entries.join("\n")
    );
    for round in 0..3 {
        assert_sticky(&mut conns, VIP_V4, &format!("round {round}"), || {
            format!(
                "flow entries after the flood:\n{}\ncounters now: {:?}",
                entries.join("\n"),
                stats(&agent)
            )
        });
    }
    let after = stats(&agent);
    let again = delta(&mid, &after, "new_flow");
    println!("established flows recorded again after eviction: {again} of 20");
    assert!(
        again >= evicted as u64,
        "{evicted} flows were evicted, but only {again} were recorded again: {after:?}"
    );
    assert!(
        again <= 20 * 3,
        "more new flows than requests on the kept connections: {after:?}"
    );
    assert_eq!(
        delta(&before, &after, "reselected"),
        0,
        "no backend changed, yet flows were re-selected: {after:?}"
    );
    let (_, errors) = new_connections(&lab, vip4(80), 50);
    assert!(errors.is_empty(), "errors: {errors:?}");
    // No time limit: the work is bounded by counts; a slow machine takes longer, that is all.
    println!("took {:?}", start.elapsed());
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let rc = libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set);
        assert_eq!(
            rc,
            0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        set
    };
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: the index is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    assert!(!cpus.is_empty());
    cpus
}

/// Moves the calling thread to `cpu`.
fn pin_thread_to(cpu: usize) {
    // SAFETY: as in `allowed_cpus`; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity({cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
}

// 8 ------------------------------------------------------------------------------------------

#[test]
fn sighup_with_an_invalid_config_keeps_the_running_one() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let mut agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    let mut conns = keep_alive_connections(&lab, vip4(80), 3);

    // Shares that add up to 90%.
    let e = agent
        .reload(&web(&lab, "blue = 50, green = 40"))
        .expect_err("an invalid split was accepted");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("services[web].split") && msg.contains("90%"),
        "the error does not name the field: {msg}"
    );
    assert!(
        agent.log().contains("still running the previous config"),
        "{}",
        agent.log()
    );
    let (backends, errors) = new_connections(&lab, vip4(80), 50);
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    assert_eq!(
        by_group(&lab, &backends).get("blue"),
        Some(&50),
        "{backends:?}"
    );
    assert_sticky(&mut conns, VIP_V4, "after a refused reload", || agent.log());

    // A setting that needs a restart is refused whole, naming it.
    std::fs::write(
        agent.config_path(),
        Agent::config_text_with(
            &lab,
            "flow_table_size = 2048",
            &web(&lab, "blue = 0, green = 100"),
        ),
    )
    .unwrap();
    let msg = format!(
        "{:#}",
        agent.reload_file().expect_err("restart-only change")
    );
    assert!(msg.contains("agent.flow_table_size"), "{msg}");
    let (backends, _) = new_connections(&lab, vip4(80), 20);
    assert_eq!(
        by_group(&lab, &backends).get("blue"),
        Some(&20),
        "{backends:?}"
    );

    // Not even TOML.
    std::fs::write(agent.config_path(), "[agent\ninterfaces = ").unwrap();
    let msg = format!("{:#}", agent.reload_file().expect_err("broken TOML"));
    assert!(msg.contains("zdd.toml"), "the error names no file: {msg}");

    // The agent is alive and takes a good config after all that.
    agent.reload(&web(&lab, "blue = 0, green = 100")).unwrap();
    let (backends, errors) = new_connections(&lab, vip4(80), 20);
    assert!(errors.is_empty(), "errors: {errors:?}");
    assert_eq!(
        by_group(&lab, &backends).get("green"),
        Some(&20),
        "{backends:?}"
    );
    assert_sticky(&mut conns, VIP_V4, "after the good reload", || agent.log());
}

// 9 ------------------------------------------------------------------------------------------

#[test]
fn a_killed_agent_is_replaced_without_moving_established_connections() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let services = web(&lab, "blue = 50, green = 50");
    let mut first = Agent::start(&lab, &services).unwrap();
    let mut conns = keep_alive_connections(&lab, vip4(80), 20);
    let on: BTreeSet<&str> = conns.iter().map(|c| c.backend.as_str()).collect();
    assert!(on.len() >= 2, "{on:?}");
    let (groups_before, _) = new_connections(&lab, vip4(80), 50);

    first.kill().unwrap();
    // No agent at all: the pinned link and maps keep forwarding.
    assert_sticky(&mut conns, VIP_V4, "while no agent runs", String::new);
    let (_, errors) = new_connections(&lab, vip4(80), 20);
    assert!(errors.is_empty(), "without an agent: {errors:?}");

    let second = Agent::start(&lab, &services).unwrap();
    let log = second.log();
    assert!(
        log.contains("adopted"),
        "the new agent did not adopt:\n{log}"
    );
    for iface in [lab.edge_client_iface(), lab.edge_backend_iface()] {
        assert!(
            log.contains(&format!("attached to {iface} (adopted")),
            "{iface} not taken over:\n{log}"
        );
    }
    for round in 0..3 {
        assert_sticky(
            &mut conns,
            VIP_V4,
            &format!("after restart, round {round}"),
            || second.log(),
        );
    }
    // New flows are served after the restart, by as many backends as before. (That every
    // client keeps its group and backend across a restart is proved in restart.rs, with
    // client affinity and 200 client addresses; 50 flows with random ports cannot show it.)
    let (after, errors) = new_connections(&lab, vip4(80), 50);
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", second.log());
    assert_eq!(
        after.keys().collect::<BTreeSet<_>>().len(),
        groups_before.len(),
        "before {groups_before:?}, after {after:?}"
    );
    assert_eq!(second.stat("reselected").unwrap(), 0, "flows were moved");
    // One XDP program per interface, not two.
    for iface in [lab.edge_client_iface(), lab.edge_backend_iface()] {
        let link = lab.ip(Node::Edge, &["-d", "link", "show", iface]).unwrap();
        assert_eq!(link.matches("prog/xdp").count(), 1, "{iface}:\n{link}");
    }
}
