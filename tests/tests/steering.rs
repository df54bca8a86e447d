//! The first data path, end to end: the real `zdd-agent` in the lab's edge namespace, real
//! TCP connections from the client namespace to the VIP, answered by real backends.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use zdd_tests::{
    Agent, Lab, Node, VIP_V4, connect_and_get, http_get, lab_spec, require_privileged,
};

fn vip() -> SocketAddr {
    format!("{VIP_V4}:80").parse().unwrap()
}

/// One service "web" on the VIP with the lab's four backends and the given split.
fn web(lab: &Lab, split: &str) -> String {
    let mut s = format!(
        "[[services]]\nname = \"web\"\nvip = \"{VIP_V4}:80\"\nprotocol = \"tcp\"\n\
         forwarding = \"nat\"\nsplit = {{ {split} }}\n"
    );
    for b in lab.backends() {
        s += &format!(
            "\n[[services.backends]]\nname = \"{}\"\naddr = \"{}\"\ngroup = \"{}\"\nweight = 100\n",
            b.name,
            b.http_v4(),
            b.group
        );
    }
    s
}

/// `n` new connections, one request each, from the client: answers per group, and errors.
fn new_connections(lab: &Lab, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    lab.in_ns(Node::Client, || {
        let mut groups = BTreeMap::new();
        let mut errors = Vec::new();
        for _ in 0..n {
            match connect_and_get(vip()) {
                Ok(r) => *groups.entry(r.group).or_insert(0) += 1,
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        (groups, errors)
    })
}

#[test]
fn split_blue_100_sends_every_new_connection_to_blue() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    let (groups, errors) = new_connections(&lab, 200);
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    assert_eq!(groups.get("blue"), Some(&200), "answers: {groups:?}");
    // The data path did the work (not the kernel): 200 new flows, on blue backends only, are
    // in the per-service and per-backend counters.
    assert!(agent.stat("new_flow").unwrap() >= 200);
    let (packets, bytes, flows) = agent
        .counters("service", &format!("{VIP_V4}:80/tcp"))
        .unwrap()
        .unwrap();
    assert_eq!(flows, 200);
    assert!(
        packets >= 200 * 4 && bytes > packets * 54,
        "{packets} packets {bytes} bytes"
    );
    let mut per_group = BTreeMap::new();
    for b in lab.backends() {
        let (_, _, f) = agent
            .counters("backend", &b.http_v4().to_string())
            .unwrap()
            .unwrap();
        *per_group.entry(b.group.clone()).or_insert(0) += f;
    }
    assert_eq!(per_group.get("blue"), Some(&200), "{per_group:?}");
    assert_eq!(per_group.get("green"), Some(&0), "{per_group:?}");
}

#[test]
fn split_50_50_divides_new_connections_evenly() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 50, green = 50")).unwrap();
    let (groups, errors) = new_connections(&lab, 2000);
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    let blue = *groups.get("blue").unwrap_or(&0) as f64 / 2000.0;
    let green = *groups.get("green").unwrap_or(&0) as f64 / 2000.0;
    println!("blue {:.1}% green {:.1}%", blue * 100.0, green * 100.0);
    assert!((0.45..=0.55).contains(&blue), "blue {blue}: {groups:?}");
    assert!((0.45..=0.55).contains(&green), "green {green}: {groups:?}");
}

#[test]
fn established_connection_stays_on_its_backend_when_the_split_moves() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let mut agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();

    let mut conn = lab.in_ns(Node::Client, || {
        TcpStream::connect_timeout(&vip(), Duration::from_secs(2)).unwrap()
    });
    let first = http_get(&mut conn, VIP_V4, "/").unwrap();
    assert_eq!(first.group, "blue");

    // The operator edits the config and sends SIGHUP.
    agent.reload(&web(&lab, "blue = 0, green = 100")).unwrap();

    for i in 0..50 {
        let r = http_get(&mut conn, VIP_V4, "/").unwrap_or_else(|e| panic!("request {i}: {e:#}"));
        assert_eq!(r.backend, first.backend, "request {i} moved");
    }
    let (groups, errors) = new_connections(&lab, 100);
    assert!(errors.is_empty(), "errors: {errors:?}");
    assert_eq!(
        groups.get("green"),
        Some(&100),
        "new connections: {groups:?}"
    );
}

#[test]
fn traffic_not_for_a_vip_passes_untouched() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    let green = lab.backend("green-1").http_v4();
    let forwarded_before = agent.stat("forward").unwrap();
    let passed_before = agent.stat("pass").unwrap();

    // Another address: a backend reached directly through the edge, routed by the kernel.
    // A VIP flow would be rewritten to blue; this one must reach green-1 itself.
    let direct = lab.in_ns(Node::Client, || {
        (0..20).map(|_| connect_and_get(green)).collect::<Vec<_>>()
    });
    for r in direct {
        assert_eq!(r.unwrap().backend, "green-1");
    }
    // Another port of the VIP address: not a service, so the kernel answers it (the edge
    // has no route for it), and nothing of zdd rewrites it towards a backend.
    let other_port: SocketAddr = format!("{VIP_V4}:81").parse().unwrap();
    let e = lab
        .in_ns(Node::Client, || {
            TcpStream::connect_timeout(&other_port, Duration::from_secs(2))
        })
        .expect_err("nothing serves VIP:81");
    assert!(
        matches!(
            e.kind(),
            ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::ConnectionRefused
                | ErrorKind::TimedOut
        ),
        "{e}"
    );
    assert_eq!(
        agent.stat("forward").unwrap(),
        forwarded_before,
        "non-VIP traffic was forwarded by XDP"
    );
    assert!(agent.stat("pass").unwrap() > passed_before + 20);
}

#[test]
fn stopping_the_agent_keeps_forwarding_and_detach_removes_everything() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let mut agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    let has_xdp = |iface: &str| {
        lab.ip(Node::Edge, &["-d", "link", "show", iface])
            .unwrap()
            .contains("xdp")
    };
    for iface in ["eth0", "eth1"] {
        assert!(has_xdp(iface), "{iface} has no XDP program while running");
    }
    let config = agent.config_path().to_path_buf();
    let detach = || {
        lab.exec(
            Node::Edge,
            &[
                zdd_tests::agent::workspace_bin("zdd-agent").as_os_str(),
                std::ffi::OsStr::new("detach"),
                std::ffi::OsStr::new("--config"),
                config.as_os_str(),
            ],
        )
    };
    // Not while an agent runs (exec fails on a non-zero exit, with its stderr).
    let refused = format!("{:#}", detach().expect_err("detach while the agent runs"));
    assert!(refused.contains("another zdd-agent is using"), "{refused}");
    let status = agent.stop().unwrap();
    assert!(status.success(), "exit {status}\n{}", agent.log());
    assert!(
        agent.log().contains("the data path keeps forwarding"),
        "{}",
        agent.log()
    );
    // Stopped, the agent leaves the data path forwarding (a restart or upgrade never
    // interrupts traffic).
    for iface in ["eth0", "eth1"] {
        assert!(has_xdp(iface), "{iface} lost its XDP program at stop");
    }
    let (groups, errors) = new_connections(&lab, 20);
    assert!(errors.is_empty(), "without an agent: {errors:?}");
    assert_eq!(groups.get("blue"), Some(&20));

    // `zdd-agent detach` removes it all.
    let out = detach().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("detached from eth0,eth1"), "{said}");
    for iface in ["eth0", "eth1"] {
        assert!(!has_xdp(iface), "{iface} still has XDP after detach");
    }
    assert!(
        !agent.pin_dir().exists(),
        "pins left in {}",
        agent.pin_dir().display()
    );
    // With nothing attached, VIP traffic is no longer steered anywhere.
    let r = lab.in_ns(Node::Client, || connect_and_get(vip()));
    assert!(r.is_err(), "VIP still answered after detach: {r:?}");
}

#[test]
fn a_second_agent_on_the_same_pins_is_refused_and_the_first_keeps_serving() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = Agent::start(&lab, &web(&lab, "blue = 100, green = 0")).unwrap();
    // The same config (same pin_dir), started by hand so that its failure cleans nothing up.
    let mut cmd = std::process::Command::new(zdd_tests::agent::workspace_bin("zdd-agent"));
    cmd.arg("run")
        .arg("--config")
        .arg(agent.config_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = lab
        .spawn(Node::Edge, cmd)
        .unwrap()
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second agent started:\n{err}");
    assert!(err.contains("another zdd-agent is using"), "{err}");
    let (groups, errors) = new_connections(&lab, 50);
    assert!(errors.is_empty(), "errors: {errors:?}\n{}", agent.log());
    assert_eq!(groups.get("blue"), Some(&50));
}
