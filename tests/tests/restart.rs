//! A restarted agent carries on exactly where its predecessor was: every client keeps its
//! group and its backend, and the split stays monotonic across restarts. And on a machine
//! where nothing mounted a BPF filesystem, the agent mounts one.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use zdd_tests::{Agent, Lab, LabSpec, Node, VIP_V4, connect_from_and_get, require_privileged};

const CLIENTS: u8 = 200;

fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

/// 10.0.1.20 ..= 10.0.1.219: the clients, on the client's link beside its own address.
fn client_addrs() -> Vec<IpAddr> {
    (0..CLIENTS)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 1, 20 + i)))
        .collect()
}

/// The "web" service with client affinity: `split`, and the backends whose group is in
/// `groups`.
fn web(lab: &Lab, split: &str, groups: &[&str]) -> String {
    let mut s = format!(
        "[[services]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\naffinity = \"client\"\nsplit = {{ {split} }}\n",
        vip()
    );
    for b in lab
        .backends()
        .iter()
        .filter(|b| groups.contains(&b.group.as_str()))
    {
        s += &format!(
            "\n[[services.backends]]\nname = \"{}\"\naddr = \"{}\"\ngroup = \"{}\"\n",
            b.name,
            b.http_v4(),
            b.group
        );
    }
    s
}

/// One new connection from each client address: the backend that answered it.
fn backend_of_each_client(lab: &Lab, agent: &Agent) -> BTreeMap<IpAddr, String> {
    lab.in_ns(Node::Client, || {
        client_addrs()
            .into_iter()
            .map(|src| match connect_from_and_get(src, vip()) {
                Ok(r) if r.status == 200 => (src, r.backend),
                Ok(r) => panic!("{src}: status {}\n{}", r.status, agent.log()),
                Err(e) => panic!("{src}: {e:#}\n{}", agent.log()),
            })
            .collect()
    })
}

fn group_of(lab: &Lab, backend: &str) -> String {
    lab.backend(backend).group.clone()
}

#[test]
fn a_restarted_agent_keeps_every_clients_group_and_backend() {
    require_privileged!();
    // "canary" sorts before "stable" but is added later: numbering the groups afresh at a
    // restart (by name) would swap their indices and move a large share of the clients.
    let spec = LabSpec::with_server(env!("CARGO_BIN_EXE_zdd-lab-server")).with_backends([
        ("stable-1", "stable"),
        ("stable-2", "stable"),
        ("canary-1", "canary"),
        ("canary-2", "canary"),
    ]);
    let lab = Lab::new(spec).unwrap();
    for a in client_addrs() {
        lab.ip(
            Node::Client,
            &["addr", "add", &format!("{a}/32"), "dev", "eth0"],
        )
        .unwrap();
    }

    // The split's history: stable alone, canary added at 10%, then grown to 40%.
    let mut agent = Agent::start(&lab, &web(&lab, "stable = 100", &["stable"])).unwrap();
    agent
        .reload(&web(
            &lab,
            "stable = 90, canary = 10",
            &["stable", "canary"],
        ))
        .unwrap();
    let forty = web(&lab, "stable = 60, canary = 40", &["stable", "canary"]);
    agent.reload(&forty).unwrap();
    let before = backend_of_each_client(&lab, &agent);
    let on_canary = before
        .values()
        .filter(|b| group_of(&lab, b) == "canary")
        .count();
    assert!(
        (50..=110).contains(&on_canary),
        "about 40% of {CLIENTS} clients on canary, got {on_canary}"
    );

    agent.kill().unwrap();
    let mut agent = Agent::start(&lab, &forty).unwrap();
    assert!(agent.log().contains("adopted"), "{}", agent.log());
    let after = backend_of_each_client(&lab, &agent);
    let moved: Vec<String> = before
        .iter()
        .filter(|(a, b)| after.get(a) != Some(b))
        .map(|(a, b)| format!("{a}: {b} -> {}", after[a]))
        .collect();
    assert!(
        moved.is_empty(),
        "{} of {CLIENTS} clients changed backend across the restart: {moved:?}",
        moved.len()
    );

    // The canary grows after the restart: no client on canary goes back to stable.
    agent
        .reload(&web(
            &lab,
            "stable = 20, canary = 80",
            &["stable", "canary"],
        ))
        .unwrap();
    let grown = backend_of_each_client(&lab, &agent);
    let back: Vec<&IpAddr> = before
        .iter()
        .filter(|(a, b)| group_of(&lab, b) == "canary" && group_of(&lab, &grown[*a]) != "canary")
        .map(|(a, _)| a)
        .collect();
    assert!(back.is_empty(), "clients back on stable: {back:?}");
    let now_on_canary = grown
        .values()
        .filter(|b| group_of(&lab, b) == "canary")
        .count();
    assert!(now_on_canary > on_canary, "{now_on_canary} <= {on_canary}");
}

/// Unmounts a mount point, also when the test fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.0.as_os_str().to_string_lossy().as_bytes()) {
            // SAFETY: umount2 with a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.0);
        if let Some(p) = self.0.parent() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

fn is_bpffs(p: &std::path::Path) -> bool {
    let c = std::ffi::CString::new(p.as_os_str().to_string_lossy().as_bytes()).unwrap();
    // SAFETY: statfs on a valid C string into a zeroed struct.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == 0xcafe_4a11
    }
}

#[test]
fn the_agent_mounts_a_bpf_filesystem_where_none_is() {
    require_privileged!();
    let lab = Lab::new(LabSpec::with_server(env!("CARGO_BIN_EXE_zdd-lab-server"))).unwrap();
    // An empty directory on an ordinary filesystem, as /sys/fs/bpf is on a fresh machine.
    let parent = std::env::temp_dir().join(format!("{}-bpffs", lab.prefix()));
    let mount_point = parent.join("bpf");
    std::fs::create_dir_all(&mount_point).unwrap();
    let _unmount = Unmount(mount_point.clone());
    assert!(!is_bpffs(&mount_point));

    let services = web(&lab, "blue = 100", &["blue"]);
    let mut agent = Agent::start_in(&lab, &mount_point.join("zdd"), "", &services).unwrap();
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "mounted a BPF filesystem at {} (none was mounted)",
            mount_point.display()
        )),
        "{log}"
    );
    assert!(is_bpffs(&mount_point));
    // And it forwards.
    let r = lab.in_ns(Node::Client, || {
        connect_from_and_get(IpAddr::V4(lab.client_v4()), vip())
    });
    assert_eq!(r.unwrap().group, "blue");
    agent.stop().unwrap();

    // A directory with files in it is never mounted over: the error says why.
    let busy = parent.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep-me"), "x").unwrap();
    let e = Agent::start_in(&lab, &busy.join("zdd"), "", &services)
        .err()
        .expect("the agent must refuse");
    assert!(
        format!("{e:#}").contains("not empty (a mount would hide its files)"),
        "{e:#}"
    );
    assert!(busy.join("keep-me").exists());
    let _ = std::fs::remove_dir_all(&busy);
}
