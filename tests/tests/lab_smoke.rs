//! The lab without any XDP: the kernel routes client -> edge -> bridge -> backends.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use zdd_tests::lab::{Backend, Lab, LabSpec, Node, list_netns};
use zdd_tests::{connect_and_get, http_get, lab_spec, require_privileged};

fn assert_gone(names: &[String]) {
    let left: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    for n in names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n)),
            "`ip netns list` still shows {n}"
        );
    }
}

fn pid_gone(pid: u32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid as i32, 0) != 0 }
}

fn udp_echo(addr: SocketAddr) -> Result<String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = UdpSocket::bind(bind)?;
    // Connected: the reply must come from the address we sent to.
    s.connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send(b"ping")?;
    let mut buf = [0u8; 256];
    let n = s
        .recv(&mut buf)
        .with_context(|| format!("UDP echo from {addr}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn check_backend(b: &Backend) -> Result<()> {
    let want_body = format!("{} {}\n", b.name, b.group);
    for addr in [b.http_v4(), b.http_v6()] {
        let r = connect_and_get(addr)?;
        ensure!(r.status == 200, "{addr}: status {}", r.status);
        ensure!(r.backend == b.name && r.group == b.group, "{addr}: {r:?}");
        ensure!(r.body == want_body.as_bytes() && r.close, "{addr}: {r:?}");

        // Keep-alive: three requests on one connection.
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        let local = s.local_addr()?;
        for _ in 0..3 {
            let r = http_get(&mut s, &addr.to_string(), "/x")?;
            ensure!(r.backend == b.name && !r.close, "{addr} keep-alive: {r:?}");
        }
        ensure!(s.local_addr()? == local);
    }
    for addr in [b.udp_v4(), b.udp_v6()] {
        let got = udp_echo(addr)?;
        ensure!(got == want_body, "{addr}: UDP echo {got:?}");
    }
    Ok(())
}

#[test]
fn lab_routes_http_and_udp_to_every_backend() {
    require_privileged!();
    let t0 = Instant::now();
    let lab = Lab::new(lab_spec!()).expect("lab");
    let built = t0.elapsed();
    let names = lab.ns_names().to_vec();
    assert_eq!(names.len(), 3 + 4);
    for n in &names {
        assert!(list_netns().contains(n), "{n} missing");
    }

    // A real client, from the client namespace, routed by the edge host.
    let backends = lab.backends().to_vec();
    lab.in_ns(Node::Client, || -> Result<()> {
        for b in &backends {
            check_backend(b)?;
        }
        Ok(())
    })
    .expect("client checks");

    // The edge forwards; the client does not (settings are per namespace).
    let fwd = |node| {
        lab.in_ns(node, || {
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        })
    };
    assert_eq!(fwd(Node::Edge).unwrap().trim(), "1");
    assert_eq!(fwd(Node::Client).unwrap().trim(), "0");

    // GRO on every veth end (XDP_REDIRECT into a veth needs it).
    let k = lab.exec(Node::Lan, &["ethtool", "-k", "to-edge"]).unwrap();
    assert!(String::from_utf8_lossy(&k.stdout).contains("generic-receive-offload: on"));

    // A nonzero exit is an error.
    assert!(lab.exec(Node::Client, &["false"]).is_err());

    let b = lab.backend("green-1");
    let out = lab
        .exec(
            Node::Client,
            &[
                "curl",
                "-sS",
                "-m",
                "5",
                "-i",
                &format!("http://{}/", b.http_v4()),
            ],
        )
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("X-Backend: green-1") && text.contains("X-Group: green"),
        "{text}"
    );
    assert!(text.ends_with("green-1 green\n"), "{text}");

    let t1 = Instant::now();
    drop(lab);
    eprintln!("lab: new {built:?}, drop {:?}", t1.elapsed());
    assert_gone(&names);
}

#[test]
fn lab_is_removed_when_a_test_panics() {
    require_privileged!();
    let seen: Mutex<Option<(Vec<String>, u32)>> = Mutex::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new(lab_spec!()).expect("lab");
        let server = lab
            .spawn(Node::Backend(0), {
                let mut c = std::process::Command::new("sleep");
                c.arg("1000");
                c
            })
            .expect("spawn");
        *seen.lock().unwrap() = Some((lab.ns_names().to_vec(), server.pid()));
        panic!("deliberate panic inside a lab");
    }));
    assert!(result.is_err());
    let (names, pid) = seen.into_inner().unwrap().expect("lab was built");
    assert_gone(&names);
    assert!(pid_gone(pid), "process {pid} spawned in the lab still runs");
}

#[test]
fn lab_creation_failing_half_way_leaves_nothing() {
    require_privileged!();
    // `false` exits at once: Lab::new fails after every namespace and link exists.
    let spec = LabSpec {
        server_bin: Some("/bin/false".into()),
        ..LabSpec::default().with_backends([("halfway-1", "blue")])
    };
    let err = Lab::new(spec).expect_err("a server that exits must fail the lab");
    assert!(
        format!("{err:#}").contains("halfway-1 server exited"),
        "{err:#}"
    );
    // This process's labs only: another test process may be building its own right now.
    let mine = format!("zl{:x}x", std::process::id());
    let left: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| n.starts_with(&mine) && n.ends_with("-halfway-1"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn vip_on_backend_lo_answers_from_the_vip() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).expect("lab");
    let b = lab.backend("blue-2").clone();
    let (vip4, vip6) = ("10.0.3.100", "fd00:3::100");
    lab.add_vip_on_backend_lo(&b.name, vip4.parse().unwrap())
        .unwrap();
    lab.add_vip_on_backend_lo(&b.name, vip6.parse().unwrap())
        .unwrap();
    // Stand-in for the balancer: the edge routes the VIP to blue-2, which answers directly.
    lab.ip(
        Node::Edge,
        &["route", "add", vip4, "via", &b.ipv4.to_string()],
    )
    .unwrap();
    lab.ip(
        Node::Edge,
        &["route", "add", vip6, "via", &b.ipv6.to_string()],
    )
    .unwrap();
    let arp_ignore = lab.in_ns(b.node, || {
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/arp_ignore")
    });
    assert_eq!(arp_ignore.unwrap().trim(), "1");

    lab.in_ns(Node::Client, || -> Result<()> {
        for ip in [vip4, vip6] {
            let ip: std::net::IpAddr = ip.parse()?;
            let r = connect_and_get((ip, 8080).into())?;
            ensure!(r.backend == "blue-2", "{r:?}");
            // The reply must come from the VIP, or the connected socket would not take it.
            ensure!(udp_echo((ip, 9000).into())? == "blue-2 blue\n");
        }
        Ok(())
    })
    .expect("VIP checks");
}

#[test]
fn many_short_connections_from_the_client() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).expect("lab");
    let targets: Vec<SocketAddr> = lab.backends().iter().map(Backend::http_v4).collect();
    let t = Instant::now();
    let served = lab.in_ns(Node::Client, || {
        (0..2000)
            .map(|i| connect_and_get(targets[i % targets.len()]).map(|r| r.status))
            .filter(|r| matches!(r, Ok(200)))
            .count()
    });
    eprintln!("2000 connections in {:?}", t.elapsed());
    assert_eq!(served, 2000);
}
