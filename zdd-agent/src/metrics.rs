//! The Prometheus endpoint (`agent.metrics = "127.0.0.1:9580"`, off by default): per-service
//! and per-backend counters of the data path, active flows, weights, states and the current
//! split, in the OpenMetrics text format (prometheus-client). The text is made by the owner
//! task from the same numbers `zdd status` shows; the HTTP side only carries it.

use std::net::SocketAddr;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{api::StatsResult, api::StatusResult, control::Intent};

type Labels = Vec<(String, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What the metrics show besides the status and the counters.
#[derive(Default)]
pub struct Extra {
    /// (service, backend, attempts, answered, resets): the passive signals' totals.
    pub passive: Vec<(String, String, u64, u64, u64)>,
    /// Each service's latest deployment (in progress or finished).
    pub deployments: Vec<crate::api::DeploymentStatus>,
    /// Finished deployments by `service/kind/outcome`.
    pub outcomes: std::collections::BTreeMap<String, u64>,
    pub alerts: Vec<crate::alerts::ReceiverCounts>,
}

/// The metrics text for a status and the counters (a fresh registry each time: the values
/// are totals read from the data path, not increments).
pub fn render(status: &StatusResult, stats: &StatsResult, extra: &Extra) -> String {
    let mut reg = Registry::default();
    let backend_packets = Counters::default();
    let backend_bytes = Counters::default();
    let backend_new_flows = Counters::default();
    let service_packets = Counters::default();
    let service_bytes = Counters::default();
    let service_new_flows = Counters::default();
    let datapath = Counters::default();
    let active = Gauges::default();
    let weight = Gauges::default();
    let state = Gauges::default();
    let split = Gauges::default();
    let health = Gauges::default();
    let probe_latency = Gauges::default();
    let panic = Gauges::default();
    let effective = Gauges::default();
    let passive_attempts = Counters::default();
    let passive_answered = Counters::default();
    let passive_resets = Counters::default();
    let dep_state = Gauges::default();
    let dep_step = Gauges::default();
    let dep_steps = Gauges::default();
    let outcomes = Counters::default();
    let alerts_sent = Counters::default();
    let alerts_failed = Counters::default();
    let alerts_dropped = Counters::default();

    let group_of = |service: &str, backend: &str| -> String {
        status
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.backends.iter().find(|b| b.name == backend))
            .map(|b| b.group.clone())
            .unwrap_or_default()
    };
    for row in &stats.backends {
        let (service, backend) = row.name.split_once('/').unwrap_or((&row.name, ""));
        let g = group_of(service, backend);
        let labels = l(&[("service", service), ("backend", backend), ("group", &g)]);
        backend_packets.get_or_create(&labels).inc_by(row.packets);
        backend_bytes.get_or_create(&labels).inc_by(row.bytes);
        backend_new_flows
            .get_or_create(&labels)
            .inc_by(row.new_flows);
    }
    for row in &stats.services {
        let labels = l(&[("service", &row.name)]);
        service_packets.get_or_create(&labels).inc_by(row.packets);
        service_bytes.get_or_create(&labels).inc_by(row.bytes);
        service_new_flows
            .get_or_create(&labels)
            .inc_by(row.new_flows);
    }
    for (reason, v) in &stats.global {
        datapath.get_or_create(&l(&[("reason", reason)])).inc_by(*v);
    }
    for s in &status.services {
        for (g, pct) in &s.split {
            split
                .get_or_create(&l(&[("service", &s.name), ("group", g)]))
                .set(*pct);
        }
        // Every group, 0 or 1, so a dashboard shows panic as a line rather than a gap.
        let mut groups: Vec<&String> = s.split.keys().collect();
        groups.extend(s.backends.iter().map(|b| &b.group));
        groups.sort();
        groups.dedup();
        for g in groups {
            panic
                .get_or_create(&l(&[("service", &s.name), ("group", g)]))
                .set(if s.panic_groups.contains(g) { 1.0 } else { 0.0 });
        }
        for b in &s.backends {
            let labels = l(&[
                ("service", &s.name),
                ("backend", &b.name),
                ("group", &b.group),
            ]);
            if !b.health.is_empty() && b.health != "unchecked" {
                for st in ["up", "down", "starting", "ejected"] {
                    let mut with = labels.clone();
                    with.push(("health".into(), st.into()));
                    health
                        .get_or_create(&with)
                        .set(if b.health == st { 1.0 } else { 0.0 });
                }
                if let Some(ms) = b.probe_latency_ms {
                    probe_latency.get_or_create(&labels).set(ms / 1e3);
                }
            }
            active.get_or_create(&labels).set(b.active_flows as f64);
            weight.get_or_create(&labels).set(b.weight as f64);
            effective
                .get_or_create(&labels)
                .set(b.effective_weight as f64);
            for st in ["serving", "draining", "drained", "removed"] {
                let mut with = labels.clone();
                with.push(("state".into(), st.into()));
                state
                    .get_or_create(&with)
                    .set(if b.state == st { 1.0 } else { 0.0 });
            }
        }
    }
    for (service, backend, attempts, answered, resets) in &extra.passive {
        let g = group_of(service, backend);
        let labels = l(&[("service", service), ("backend", backend), ("group", &g)]);
        passive_attempts.get_or_create(&labels).inc_by(*attempts);
        passive_answered.get_or_create(&labels).inc_by(*answered);
        passive_resets.get_or_create(&labels).inc_by(*resets);
    }
    for d in &extra.deployments {
        for st in [
            "running",
            "paused",
            "stopped",
            "succeeded",
            "rolled_back",
            "aborted",
        ] {
            dep_state
                .get_or_create(&l(&[
                    ("service", &d.service),
                    ("kind", &d.kind),
                    ("state", st),
                ]))
                .set(if d.state == st { 1.0 } else { 0.0 });
        }
        let labels = l(&[("service", &d.service), ("kind", &d.kind)]);
        dep_step
            .get_or_create(&labels)
            .set((d.step + 1).min(d.steps.len()) as f64);
        dep_steps.get_or_create(&labels).set(d.steps.len() as f64);
    }
    for (key, n) in &extra.outcomes {
        let mut parts = key.splitn(3, '/');
        let (Some(service), Some(kind), Some(outcome)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        outcomes
            .get_or_create(&l(&[
                ("service", service),
                ("kind", kind),
                ("outcome", outcome),
            ]))
            .inc_by(*n);
    }
    for a in &extra.alerts {
        let labels = l(&[("receiver", &a.receiver), ("kind", a.kind)]);
        alerts_sent.get_or_create(&labels).inc_by(a.sent);
        alerts_failed.get_or_create(&labels).inc_by(a.failed);
        alerts_dropped.get_or_create(&labels).inc_by(a.dropped);
    }
    reg.register(
        "zdd_backend_effective_weight",
        "The weight the data path uses now (0 when down, draining or starting; ramping in slow start)",
        effective,
    );
    reg.register(
        "zdd_backend_passive_attempts",
        "TCP connection attempts (SYNs) the data path sent to the backend",
        passive_attempts,
    );
    reg.register(
        "zdd_backend_passive_answered",
        "Connection attempts the backend answered (SYN-ACK seen, nat)",
        passive_answered,
    );
    reg.register(
        "zdd_backend_passive_resets",
        "TCP resets the backend sent (nat)",
        passive_resets,
    );
    reg.register(
        "zdd_deployment_state",
        "1 for the state of the service's latest deployment (running, paused, stopped, succeeded, rolled_back, aborted)",
        dep_state,
    );
    reg.register(
        "zdd_deployment_step",
        "The latest deployment's step or batch in progress (1-based; the last when finished)",
        dep_step,
    );
    reg.register(
        "zdd_deployment_steps",
        "The latest deployment's number of steps or batches",
        dep_steps,
    );
    reg.register(
        "zdd_deployments",
        "Finished deployments by outcome (succeeded, rolled_back, aborted)",
        outcomes,
    );
    reg.register("zdd_alerts_sent", "Alerts a receiver accepted", alerts_sent);
    reg.register(
        "zdd_alerts_failed",
        "Alerts given up on after every retry",
        alerts_failed,
    );
    reg.register(
        "zdd_alerts_dropped",
        "Alerts dropped because the receiver's queue was full",
        alerts_dropped,
    );
    reg.register(
        "zdd_backend_packets",
        "Packets the data path forwarded to the backend",
        backend_packets,
    );
    reg.register(
        "zdd_backend_bytes",
        "Bytes the data path forwarded to the backend",
        backend_bytes,
    );
    reg.register(
        "zdd_backend_new_flows",
        "New flows the data path sent to the backend",
        backend_new_flows,
    );
    reg.register(
        "zdd_service_packets",
        "Packets to the service's VIP",
        service_packets,
    );
    reg.register(
        "zdd_service_bytes",
        "Bytes to the service's VIP",
        service_bytes,
    );
    reg.register(
        "zdd_service_new_flows",
        "New flows to the service's VIP",
        service_new_flows,
    );
    reg.register(
        "zdd_datapath_packets",
        "Data-path verdicts and reasons (see the README's counter table)",
        datapath,
    );
    reg.register(
        "zdd_backend_active_flows",
        "Flows on the backend that have not ended",
        active,
    );
    reg.register(
        "zdd_backend_weight",
        "The backend's configured weight",
        weight,
    );
    reg.register(
        "zdd_backend_state",
        "1 for the backend's state (serving, draining, drained, removed)",
        state,
    );
    reg.register(
        "zdd_backend_health",
        "1 for the backend's health (up, down, starting, ejected) when the service is checked",
        health,
    );
    reg.register(
        "zdd_backend_probe_latency_seconds",
        "The last probe's latency",
        probe_latency,
    );
    reg.register(
        "zdd_group_panic",
        "1 while the group is in panic mode (too few healthy backends: all get flows)",
        panic,
    );
    reg.register(
        "zdd_service_split_percent",
        "Share of new flows (new clients) per group, percent",
        split,
    );
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &reg) {
        log::warn!("encoding metrics: {e}");
    }
    out
}

/// Serves `GET /metrics` on `addr` until the owner's channel closes.
pub async fn serve(listener: TcpListener, to: mpsc::Sender<Intent>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let to = to.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = String::from_utf8_lossy(&head);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = if line.starts_with("GET ") && path == "/metrics" {
                let (tx, rx) = oneshot::channel();
                if to.send(Intent::Metrics { reply: tx }).await.is_err() {
                    return;
                }
                match rx.await {
                    Ok(text) => (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    Err(_) => return,
                }
            } else {
                (
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    "zdd serves GET /metrics\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                s.write_all(resp.as_bytes()),
            )
            .await;
        });
    }
}

/// Binds the endpoint.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("agent.metrics {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackendStatus, CounterRow, ServiceStatus};

    #[test]
    fn conventional_names_types_and_labels() {
        let status = StatusResult {
            services: vec![ServiceStatus {
                name: "web".into(),
                split: [("blue".to_string(), 95.0), ("green".to_string(), 5.0)].into(),
                backends: vec![BackendStatus {
                    name: "blue-1".into(),
                    group: "blue".into(),
                    weight: 100,
                    state: "draining".into(),
                    active_flows: 7,
                    health: "down".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let stats = StatsResult {
            global: [("forward".to_string(), 42)].into(),
            services: vec![CounterRow {
                name: "web".into(),
                packets: 10,
                ..Default::default()
            }],
            backends: vec![CounterRow {
                name: "web/blue-1".into(),
                packets: 9,
                bytes: 900,
                new_flows: 3,
                ..Default::default()
            }],
        };
        let t = render(&status, &stats, &Extra::default());
        for want in [
            "# TYPE zdd_backend_packets counter",
            "zdd_backend_packets_total{service=\"web\",backend=\"blue-1\",group=\"blue\"} 9",
            "zdd_backend_bytes_total{service=\"web\",backend=\"blue-1\",group=\"blue\"} 900",
            "zdd_service_packets_total{service=\"web\"} 10",
            "zdd_datapath_packets_total{reason=\"forward\"} 42",
            "# TYPE zdd_backend_active_flows gauge",
            "zdd_backend_active_flows{service=\"web\",backend=\"blue-1\",group=\"blue\"} 7.0",
            "zdd_backend_state{service=\"web\",backend=\"blue-1\",group=\"blue\",state=\"draining\"} 1.0",
            "zdd_backend_state{service=\"web\",backend=\"blue-1\",group=\"blue\",state=\"serving\"} 0.0",
            "zdd_service_split_percent{service=\"web\",group=\"green\"} 5.0",
            "zdd_backend_health{service=\"web\",backend=\"blue-1\",group=\"blue\",health=\"down\"} 1.0",
            "# EOF",
        ] {
            assert!(t.contains(want), "missing {want:?} in:\n{t}");
        }
    }
}
