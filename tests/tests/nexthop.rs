//! The next-hop caches follow the kernel: with the caches' own timer set to an hour, a route
//! change on the edge host still takes effect at once, towards backends and (nat replies)
//! towards clients, because the agent watches rtnetlink and drops the cached next hops.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use zdd_tests::{Agent, Lab, Node, VIP_V4, connect_and_get, lab_spec, require_privileged};

fn one_backend(lab: &Lab) -> String {
    let b = lab.backend("blue-1");
    format!(
        "[[services]]\nname = \"web\"\nvip = \"{VIP_V4}:80\"\nsplit = {{ blue = 100 }}\n\n\
         [[services.backends]]\nname = \"blue-1\"\naddr = \"{}\"\ngroup = \"blue\"\n",
        b.http_v4()
    )
}

/// Polls `ok` until it holds or 3 s pass.
fn eventually(mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// One request through the VIP from the client.
fn get(lab: &Lab) -> anyhow::Result<zdd_tests::Response> {
    let vip: SocketAddr = format!("{VIP_V4}:80").parse().unwrap();
    lab.in_ns(Node::Client, || connect_and_get(vip))
}

/// The agent with the caches' own timer at an hour, and both caches warm (towards the
/// backend and, for replies, towards the client; the first packet may go through the kernel
/// while ARP resolves).
fn started_and_warm(lab: &Lab) -> Agent<'_> {
    let agent = Agent::start_with(lab, "nexthop_refresh = \"1h\"", &one_backend(lab)).unwrap();
    assert!(eventually(|| get(lab).is_ok()), "{}", agent.log());
    agent
}

#[test]
fn route_changes_refresh_the_cached_next_hop_at_once() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = started_and_warm(&lab);
    assert_eq!(get(&lab).unwrap().backend, "blue-1");

    // The operator blackholes the backend: the FIB says "no", so must the data path.
    blackhole_takes_effect_at_once(&lab, &agent, "10.0.2.11/32", "next hop");
}

/// Blackholes `prefix` on the edge host: requests through the VIP must fail at once (the
/// cached next hop is not used) and work again as soon as the route is removed.
fn blackhole_takes_effect_at_once(lab: &Lab, agent: &Agent, prefix: &str, what: &str) {
    let get = || get(lab);
    let failures = agent.stat("fib_failure").unwrap();
    lab.ip(Node::Edge, &["route", "add", "blackhole", prefix])
        .unwrap();
    assert!(
        eventually(|| get().is_err() && agent.stat("fib_failure").unwrap() > failures),
        "the cached {what} was still used after the route changed\n{}",
        agent.log()
    );
    lab.ip(Node::Edge, &["route", "del", "blackhole", prefix])
        .unwrap();
    assert!(
        eventually(|| get().is_ok()),
        "{what}: not forwarded again after the route came back"
    );
}

#[test]
fn route_changes_refresh_the_cached_reply_next_hop_at_once() {
    require_privileged!();
    let lab = Lab::new(lab_spec!()).unwrap();
    let agent = started_and_warm(&lab);
    assert!(get(&lab).is_ok());
    let reverse = agent.stat("reverse").unwrap();
    assert!(reverse > 0, "replies were not translated by XDP");

    // The client's address is blackholed on the edge host: the replies' FIB lookup says
    // "no", and the cached next hop towards the client must not be used any more.
    let client = format!("{}/32", lab.client_v4());
    blackhole_takes_effect_at_once(&lab, &agent, &client, "reply next hop");
}
