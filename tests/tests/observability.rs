//! The agent's metrics and the backends' own, as the real Prometheus (Debian's package) sees
//! them in the lab: Prometheus runs in the edge namespace beside the agent and scrapes the
//! agent's endpoint and every backend's `/metrics` while load runs through the VIP. Per-group
//! request rates, zdd's counters and a group whose answers turn into errors (its probes still
//! passing) are read back with PromQL.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use zdd_tests::{
    Agent, Lab, VIP_V4, lab_spec,
    load::{Load, LoadSpec},
    observability::{Prometheus, Sample},
    require_privileged,
};

/// The agent's metrics endpoint: its address on the backends' side, so Prometheus in the edge
/// namespace reaches it as it reaches the backends.
const METRICS: &str = "10.0.2.1:9580";

fn vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().unwrap(), 80)
}

/// "web" with every lab backend, checked over HTTP every 200 ms.
fn web(lab: &Lab, split: &str) -> String {
    zdd_tests::agent::web_service(lab, split).replacen(
        "\n\n[[services.backends]]",
        "\n[services.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\n\
         timeout = \"150ms\"\nrise = 2\nfall = 2\n\n[[services.backends]]",
        1,
    )
}

/// `label` → value of each series.
fn by(samples: &[Sample], label: &str) -> BTreeMap<String, f64> {
    samples
        .iter()
        .map(|(l, v)| (l.get(label).cloned().unwrap_or_default(), *v))
        .collect()
}

fn positive(samples: &[Sample], label: &str, keys: &[&str]) -> bool {
    let m = by(samples, label);
    keys.iter().all(|k| m.get(*k).is_some_and(|v| *v > 0.0))
}

#[test]
fn prometheus_scrapes_the_agent_and_the_backends_and_sees_a_group_fail() {
    require_privileged!();
    let t0 = Instant::now();
    let lab = Lab::new(lab_spec!().with_backends([
        ("blue-1", "blue"),
        ("blue-2", "blue"),
        ("green-1", "green"),
    ]))
    .unwrap();
    let agent = Agent::start_with(
        &lab,
        &format!("metrics = \"{METRICS}\""),
        &web(&lab, "blue = 50, green = 50"),
    )
    .unwrap();
    let prom = Prometheus::for_lab(&lab, METRICS).unwrap();
    prom.wait_targets_up(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    let ready = t0.elapsed();

    let load = Load::start(
        &lab,
        vip(),
        LoadSpec {
            new_conn_threads: 2,
            new_conn_pause: Duration::from_millis(10),
            keepalive: 2,
            keepalive_pause: Duration::from_millis(20),
            max_duration: Duration::from_secs(40),
        },
    );

    // Both groups get traffic (50/50), and Prometheus sees it from the backends' side...
    let t = Instant::now();
    let requests = prom
        .wait_until(
            "sum by (group) (rate(zdd_lab_requests_total[5s]))",
            Duration::from_secs(15),
            |v| positive(v, "group", &["blue", "green"]),
        )
        .unwrap();
    println!(
        "requests/s per group, from the backends' /metrics: {:?} (after {:?})",
        by(&requests, "group"),
        t.elapsed()
    );
    let versions = prom
        .query("count by (version) (zdd_lab_requests_total)")
        .unwrap();
    assert_eq!(
        by(&versions, "version"),
        BTreeMap::from([("v1".to_string(), 3.0)]),
        "every backend says its version"
    );

    // ... and from zdd's: new flows per group, the split, health.
    let flows = prom
        .wait_until(
            "sum by (group) (rate(zdd_backend_new_flows_total{service=\"web\"}[5s]))",
            Duration::from_secs(10),
            |v| positive(v, "group", &["blue", "green"]),
        )
        .unwrap();
    println!("zdd new flows/s per group: {:?}", by(&flows, "group"));
    let split = prom
        .query("zdd_service_split_percent{service=\"web\"}")
        .unwrap();
    assert_eq!(
        by(&split, "group"),
        BTreeMap::from([("blue".to_string(), 50.0), ("green".to_string(), 50.0)])
    );
    let up = prom
        .query("sum(zdd_backend_health{service=\"web\",health=\"up\"})")
        .unwrap();
    assert_eq!(up.first().map(|s| s.1), Some(3.0), "{up:?}");
    let forwarded = prom
        .query("zdd_datapath_packets_total{reason=\"forward\"}")
        .unwrap();
    assert!(
        forwarded.first().is_some_and(|s| s.1 > 0.0),
        "{forwarded:?}"
    );
    let no_errors = prom.query("sum(zdd_lab_errors_total)").unwrap();
    assert_eq!(no_errors.first().map(|s| s.1), Some(0.0), "{no_errors:?}");

    // green-1 answers 500 to its clients; its /healthz still passes, so zdd keeps it up.
    let broke = Instant::now();
    lab.set_server_control("green-1", "status=500").unwrap();
    let ratio = prom
        .wait_until(
            "sum by (group) (rate(zdd_lab_errors_total[5s])) \
             / sum by (group) (rate(zdd_lab_requests_total[5s]))",
            Duration::from_secs(10),
            |v| {
                let m = by(v, "group");
                m.get("green").is_some_and(|r| *r > 0.5) && m.get("blue") == Some(&0.0)
            },
        )
        .unwrap();
    println!(
        "error ratio per group after green-1 answered 500: {:?} (seen after {:?})",
        by(&ratio, "group"),
        broke.elapsed()
    );
    let errors = prom
        .query("sum by (backend) (zdd_lab_errors_total)")
        .unwrap();
    let errors = by(&errors, "backend");
    assert!(errors["green-1"] > 0.0, "{errors:?}");
    assert_eq!(errors["blue-1"] + errors["blue-2"], 0.0, "{errors:?}");
    let still_up = prom
        .query("zdd_backend_health{service=\"web\",backend=\"green-1\",health=\"up\"}")
        .unwrap();
    assert_eq!(
        still_up.first().map(|s| s.1),
        Some(1.0),
        "probes pass: {still_up:?}"
    );

    let r = load.stop();
    println!(
        "load: {} new + {} keep-alive requests answered 200, failed per group {:?}; \
         lab up and scraped after {ready:?}, whole test {:?}",
        r.new_ok,
        r.keepalive_ok,
        r.failed_by_group,
        t0.elapsed()
    );
    // The load counts the 500s as failures, and knows whose they were.
    assert!(
        r.failed_by_group.get("green").is_some_and(|n| *n > 0),
        "{r:?}"
    );
    assert_eq!(r.failed_by_group.get("blue"), None, "{:?}", r.errors);
    assert_eq!(
        r.failed(),
        r.failed_by_group.values().sum::<u64>(),
        "every failure was an answer with a status: {:?}",
        r.errors
    );
}
