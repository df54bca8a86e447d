//! The return router: replies take it only from backends pointed there, and it goes with the
//! lab. (The rest of the lab is covered by the integration tests in `tests/tests/lab_smoke.rs`.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::{Lab, LabSpec, Node, list_netns, privileged_or_skip};

const PORT: u16 = 7070;
/// Big enough that the reply's frames stand out from ARP and neighbour discovery.
const REPLY: usize = 256 * 1024;

fn rx_frames(lab: &Lab, node: Node, iface: &str) -> u64 {
    let out = lab.exec(node, &["cat", "/proc/net/dev"]).expect("cat");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == iface).then(|| rest.split_whitespace().nth(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {iface} in {}", lab.ns_name(node)))
}

/// One connection from the client to `addr` (served by `listener`), `REPLY` bytes back.
/// Returns the frames that the edge's eth1 and the router's eth0 received meanwhile.
fn fetch(lab: &Lab, listener: &TcpListener, addr: SocketAddr) -> Result<(u64, u64)> {
    let edge0 = rx_frames(lab, Node::Edge, "eth1");
    let router0 = rx_frames(lab, Node::Router, "eth0");
    thread::scope(|s| -> Result<()> {
        let server = s.spawn(|| -> Result<()> {
            let (mut c, _) = listener.accept()?;
            c.write_all(&vec![7u8; REPLY])?;
            Ok(())
        });
        let got = lab.in_ns(Node::Client, || -> Result<usize> {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            c.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = Vec::new();
            c.read_to_end(&mut buf)?;
            Ok(buf.len())
        });
        server.join().expect("server thread")?;
        ensure!(got.with_context(|| format!("fetching from {addr}"))? == REPLY);
        Ok(())
    })?;
    Ok((
        rx_frames(lab, Node::Edge, "eth1") - edge0,
        rx_frames(lab, Node::Router, "eth0") - router0,
    ))
}

#[test]
fn replies_bypass_the_edge_only_when_routed_via_the_router() {
    if !privileged_or_skip("lab::tests::replies_bypass_the_edge_only_when_routed_via_the_router") {
        return;
    }
    let lab = Lab::new(LabSpec::default().with_return_router(true)).expect("lab");
    let names = lab.ns_names().to_vec();
    assert!(names.iter().any(|n| n.ends_with("-router")), "{names:?}");
    let b = lab.backends()[0].clone();
    let other = lab.backends()[1].name.clone();
    for addr in [
        SocketAddr::new(b.ipv4.into(), PORT),
        SocketAddr::new(b.ipv6.into(), PORT),
    ] {
        let bind = SocketAddr::new(addr.ip(), PORT);
        let listener = lab.in_ns(b.node, || TcpListener::bind(bind)).expect("bind");

        // The lab as built: replies through the edge.
        assert!(!lab.clients_routed_via_router(&b.name).unwrap());
        let (edge, router) = fetch(&lab, &listener, addr).unwrap();
        assert!(
            edge > 40 && router < 10,
            "{addr} via edge: {edge} / {router}"
        );

        // This backend only: via the router.
        lab.route_backend_clients_via_router(&b.name, true).unwrap();
        assert!(lab.clients_routed_via_router(&b.name).unwrap());
        assert!(!lab.clients_routed_via_router(&other).unwrap());
        let (edge, router) = fetch(&lab, &listener, addr).unwrap();
        assert!(
            router > 40 && edge < 10,
            "{addr} via router: {edge} / {router}"
        );

        // All, then back (twice: switching is idempotent).
        lab.route_clients_via_router(true).unwrap();
        lab.route_clients_via_router(true).unwrap();
        assert!(lab.clients_routed_via_router(&other).unwrap());
        lab.route_clients_via_router(false).unwrap();
        lab.route_clients_via_router(false).unwrap();
        assert!(!lab.clients_routed_via_router(&b.name).unwrap());
        let (edge, router) = fetch(&lab, &listener, addr).unwrap();
        assert!(
            edge > 40 && router < 10,
            "{addr} via edge again: {edge} / {router}"
        );
    }
    drop(lab);
    let left: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_lab_without_a_router_has_none() {
    if !privileged_or_skip("lab::tests::a_lab_without_a_router_has_none") {
        return;
    }
    let lab = Lab::new(LabSpec::default()).expect("lab");
    assert!(!lab.has_return_router());
    assert!(!lab.nodes().any(|n| n == Node::Router));
    assert_eq!(lab.ns_names().len(), 3 + lab.backends().len());
    assert!(lab.route_clients_via_router(true).is_err());
    assert!(!lab.clients_routed_via_router("blue-1").unwrap());
    let out = lab.ip(Node::Client, &["-o", "link"]).unwrap();
    assert!(!out.contains("eth1"), "{out}");
}

#[test]
fn router_is_a_reserved_name_only_with_a_router() {
    let spec = LabSpec::default().with_backends([("router", "blue")]);
    assert!(spec.validate().is_ok());
    assert!(spec.with_return_router(true).validate().is_err());
}

#[test]
fn ensure_bpffs_mounts_one_where_none_is_and_only_there() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0
        && !privileged_or_skip("lab::tests::ensure_bpffs_mounts_one_where_none_is_and_only_there")
    {
        return;
    }
    // A folder that does not exist yet, on whatever /tmp is (not bpffs).
    let base = std::env::temp_dir().join(format!("zdd-bpffs-test-{}", std::process::id()));
    let dir = base.join("bpf");
    struct Cleanup(std::path::PathBuf, std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Ok(c) = std::ffi::CString::new(self.1.as_os_str().as_encoded_bytes()) {
                // SAFETY: valid C string; detaching a mount this test made (or none).
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(base.clone(), dir.clone());
    assert!(!super::on_bpffs(&base));
    assert!(!super::on_bpffs(&dir), "does not exist yet");

    assert!(super::ensure_bpffs(&dir).unwrap(), "mounted");
    assert!(super::on_bpffs(&dir));
    assert!(!super::on_bpffs(&base), "the mount is on the folder only");
    // Pins can go there now, and a second call leaves it as it is.
    std::fs::create_dir(dir.join("pins")).unwrap();
    assert!(super::on_bpffs(&dir.join("pins")));
    assert!(
        !super::ensure_bpffs(&dir).unwrap(),
        "already bpffs: nothing mounted"
    );
    assert!(
        !super::ensure_bpffs(&dir.join("pins")).unwrap(),
        "inside bpffs"
    );
    assert!(
        dir.join("pins").is_dir(),
        "the same filesystem, not a new one on top"
    );
}
