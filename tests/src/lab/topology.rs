//! Building a lab's namespaces, links, addresses and settings.

use std::fmt::Display;
use std::fs;
use std::process::Command;
use std::thread;

use anyhow::{Context, Result};

use super::{EDGE_BACKEND_IFACE, EDGE_CLIENT_IFACE, Lab, Node, netns, spawn};

/// Bridge port in the lan namespace that faces the edge host's eth1.
pub(super) const LAN_EDGE_PORT: &str = "to-edge";

/// Bridge port in the lan namespace that faces the return router's eth0.
pub(super) const LAN_ROUTER_PORT: &str = "to-router";
/// The return router's interface on the bridge, and the one to the client (also `eth1` there).
const ROUTER_LAN_IFACE: &str = "eth0";
const ROUTER_CLIENT_IFACE: &str = "eth1";
const CLIENT_ROUTER_IFACE: &str = "eth1";

/// Bridge port in the lan namespace that faces backend `i`.
pub(super) fn lan_backend_port(i: usize) -> String {
    format!("to-b{i}")
}

pub(super) fn build(lab: &Lab) -> Result<()> {
    netns::add_all(&lab.ns).context("creating namespaces")?;
    sysctls(lab).context("setting sysctls")?;
    veths(lab).context("creating veth pairs")?;
    configure(lab).context("configuring links and addresses")?;
    offloads(lab).context("setting veth offloads")?;
    Ok(())
}

/// Writes `/proc/sys/<key>` = `value`; /proc/sys/net shows the calling thread's namespace.
pub(super) fn write_sysctl(key: &str, value: &str) -> Result<()> {
    fs::write(format!("/proc/sys/{key}"), value).with_context(|| format!("sysctl {key}={value}"))
}

/// Set before any link exists, so that each link inherits `default`.
fn sysctls(lab: &Lab) -> Result<()> {
    const COMMON: &[(&str, &str)] = &[
        // Addresses are usable at once (link-local ones too), not after a second of DAD.
        ("net/ipv6/conf/all/accept_dad", "0"),
        ("net/ipv6/conf/default/accept_dad", "0"),
        // Asymmetric paths (DSR, XDP redirects) must not be filtered.
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
    ];
    const EDGE: &[(&str, &str)] = &[
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv6/conf/all/forwarding", "1"),
    ];
    // Many short connections from one client: more ports, and reuse of TIME_WAIT ones.
    const CLIENT: &[(&str, &str)] = &[
        ("net/ipv4/ip_local_port_range", "1024 65535"),
        ("net/ipv4/tcp_tw_reuse", "1"),
    ];
    // One thread visits every namespace in turn: setns is per thread and may be repeated.
    thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            for node in lab.nodes() {
                netns::enter(&netns::open(lab.ns_name(node))?)?;
                let extra = match node {
                    // rp_filter is off everywhere (COMMON), so the client also takes replies
                    // that arrive on eth1 for its eth0 addresses.
                    Node::Edge | Node::Router => EDGE,
                    Node::Client => CLIENT,
                    _ => &[],
                };
                for (k, v) in COMMON.iter().chain(extra) {
                    write_sysctl(k, v).with_context(|| format!("in {}", lab.ns_name(node)))?;
                }
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Each veth is created with both ends directly in their namespaces. Not `up` here: the peer
/// end cannot be (the kernel sets it up before the pair is joined: ENOTCONN).
fn veths(lab: &Lab) -> Result<()> {
    let pair = |a: &str, a_ns: Node, b: &str, b_ns: Node| {
        format!(
            "link add {a} netns {} type veth peer name {b} netns {}",
            lab.ns_name(a_ns),
            lab.ns_name(b_ns)
        )
    };
    let mut lines = vec![
        pair("eth0", Node::Client, EDGE_CLIENT_IFACE, Node::Edge),
        pair(EDGE_BACKEND_IFACE, Node::Edge, LAN_EDGE_PORT, Node::Lan),
    ];
    for i in 0..lab.backends.len() {
        lines.push(pair(
            &lan_backend_port(i),
            Node::Lan,
            "eth0",
            Node::Backend(i),
        ));
    }
    if lab.spec.return_router {
        lines.push(pair(
            ROUTER_LAN_IFACE,
            Node::Router,
            LAN_ROUTER_PORT,
            Node::Lan,
        ));
        lines.push(pair(
            ROUTER_CLIENT_IFACE,
            Node::Router,
            CLIENT_ROUTER_IFACE,
            Node::Client,
        ));
    }
    netns::ip_batch(&[], &lines)
}

fn addr_lines(iface: &str, v4: impl Display, v6: impl Display) -> [String; 2] {
    [
        format!("addr add {v4}/24 dev {iface}"),
        // nodad: usable at once, whatever accept_dad says.
        format!("addr add {v6}/64 dev {iface} nodad"),
    ]
}

fn route_lines(v4: impl Display, v6: impl Display) -> [String; 2] {
    [
        format!("route add default via {v4}"),
        format!("route add ::/0 via {v6}"),
    ]
}

/// One `ip -n NS -batch` per namespace, all at once.
fn configure(lab: &Lab) -> Result<()> {
    let up = |ifaces: &[&str]| -> Vec<String> {
        ifaces.iter().map(|i| format!("link set {i} up")).collect()
    };
    let mut plan: Vec<(Node, Vec<String>)> = Vec::new();

    let mut client = up(&["lo", "eth0"]);
    client.extend(addr_lines("eth0", super::CLIENT_V4, super::CLIENT_V6));
    client.extend(route_lines(super::EDGE_CLIENT_V4, super::EDGE_CLIENT_V6));
    if lab.spec.return_router {
        // Only for replies coming in: the client's routes stay as they were (via the edge).
        client.extend(up(&[CLIENT_ROUTER_IFACE]));
        client.extend(addr_lines(
            CLIENT_ROUTER_IFACE,
            super::CLIENT_ROUTER_V4,
            super::CLIENT_ROUTER_V6,
        ));
    }
    plan.push((Node::Client, client));

    let mut edge = up(&["lo", EDGE_CLIENT_IFACE, EDGE_BACKEND_IFACE]);
    edge.extend(addr_lines(
        EDGE_CLIENT_IFACE,
        super::EDGE_CLIENT_V4,
        super::EDGE_CLIENT_V6,
    ));
    edge.extend(addr_lines(
        EDGE_BACKEND_IFACE,
        super::EDGE_BACKEND_V4,
        super::EDGE_BACKEND_V6,
    ));
    plan.push((Node::Edge, edge));

    let mut lan = up(&["lo", LAN_EDGE_PORT]);
    // No STP and no forward delay: ports forward at once. No multicast snooping: IPv6
    // neighbour discovery is flooded, never filtered by what the bridge has (not) seen.
    lan.push("link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0".into());
    lan.push(format!("link set {LAN_EDGE_PORT} master br0"));
    for i in 0..lab.backends.len() {
        let port = lan_backend_port(i);
        lan.push(format!("link set {port} master br0"));
        lan.push(format!("link set {port} up"));
    }
    if lab.spec.return_router {
        lan.push(format!("link set {LAN_ROUTER_PORT} master br0"));
        lan.push(format!("link set {LAN_ROUTER_PORT} up"));
    }
    lan.push("link set br0 up".into());
    plan.push((Node::Lan, lan));

    for b in &lab.backends {
        let mut lines = up(&["lo", "eth0"]);
        lines.extend(addr_lines("eth0", b.ipv4, b.ipv6));
        lines.extend(route_lines(super::EDGE_BACKEND_V4, super::EDGE_BACKEND_V6));
        plan.push((b.node, lines));
    }

    if lab.spec.return_router {
        let mut router = up(&["lo", ROUTER_LAN_IFACE, ROUTER_CLIENT_IFACE]);
        router.extend(addr_lines(
            ROUTER_LAN_IFACE,
            super::ROUTER_BACKEND_V4,
            super::ROUTER_BACKEND_V6,
        ));
        router.extend(addr_lines(
            ROUTER_CLIENT_IFACE,
            super::ROUTER_CLIENT_V4,
            super::ROUTER_CLIENT_V6,
        ));
        // To the client network; no default route: the router carries replies only.
        router.push(format!(
            "route add {} via {}",
            super::CLIENT_NET_V4,
            super::CLIENT_ROUTER_V4
        ));
        router.push(format!(
            "route add {} via {}",
            super::CLIENT_NET_V6,
            super::CLIENT_ROUTER_V6
        ));
        plan.push((Node::Router, router));
    }

    thread::scope(|s| {
        let jobs: Vec<_> = plan
            .iter()
            .map(|(node, lines)| s.spawn(|| netns::ip_batch(&["-n", lab.ns_name(*node)], lines)))
            .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

/// Every veth end, every namespace: see [`super::LabSpec::tx_offload`] for why.
fn offloads(lab: &Lab) -> Result<()> {
    let mut ends: Vec<(Node, String)> = vec![
        (Node::Client, "eth0".into()),
        (Node::Edge, EDGE_CLIENT_IFACE.into()),
        (Node::Edge, EDGE_BACKEND_IFACE.into()),
        (Node::Lan, LAN_EDGE_PORT.into()),
    ];
    for (i, b) in lab.backends.iter().enumerate() {
        ends.push((Node::Lan, lan_backend_port(i)));
        ends.push((b.node, "eth0".into()));
    }
    if lab.spec.return_router {
        ends.push((Node::Client, CLIENT_ROUTER_IFACE.into()));
        ends.push((Node::Lan, LAN_ROUTER_PORT.into()));
        ends.push((Node::Router, ROUTER_LAN_IFACE.into()));
        ends.push((Node::Router, ROUTER_CLIENT_IFACE.into()));
    }
    let tx_off = !lab.spec.tx_offload;
    thread::scope(|s| {
        let jobs: Vec<_> = ends
            .iter()
            .map(|(node, iface)| {
                s.spawn(move || {
                    let mut cmd = Command::new("ethtool");
                    cmd.args(["-K", iface, "gro", "on"]);
                    if tx_off {
                        cmd.args(["tx", "off"]);
                    }
                    spawn::output_in(lab.ns_name(*node), cmd).map(drop)
                })
            })
            .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}
