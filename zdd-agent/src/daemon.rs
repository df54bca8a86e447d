//! `zdd-agent run`: load (or adopt) the data path, apply the live state, attach, then serve
//! the control socket and signals. SIGHUP applies the config file. SIGTERM/SIGINT stop the
//! agent and leave the data path forwarding on its pinned maps and links: a restart or an
//! upgrade never interrupts traffic. `zdd-agent detach` removes zdd from the interfaces.

use std::path::Path;

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    api::Actor,
    config::{self, AgentSettings},
    control::{Control, Intent, spawn_flow_counter},
    live::LiveState,
    maps::{ApplyError, Dataplane, LoadOptions},
    state::DesiredState,
    store::{Store, services_hash},
};

/// Data-path tunables from the agent settings.
pub fn dp_config(a: &AgentSettings) -> zdd_common::Config {
    // Durations are parsed to fit u64 nanoseconds; saturate rather than wrap all the same.
    let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    zdd_common::Config {
        tcp_idle_ns: ns(a.tcp_idle),
        udp_idle_ns: ns(a.udp_idle),
        nexthop_ttl_ns: ns(a.nexthop_refresh),
        record_limit: a.new_flow_record_limit,
        ..Default::default()
    }
}

/// dsr forwards at layer 2 only, so the kernel never talks to a dsr backend by itself and
/// its neighbour entry would stay unresolved (the data path drops such frames as
/// `unresolved`). An empty datagram to the discard port makes the kernel resolve the next
/// hop towards each dsr backend.
pub fn resolve_dsr_neighbours(state: &crate::state::DesiredState) {
    for s in state
        .services
        .iter()
        .filter(|s| s.forwarding == crate::state::Forwarding::Dsr)
    {
        for b in &s.backends {
            let bind = if b.addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sent = std::net::UdpSocket::bind(bind)
                .and_then(|sock| sock.send_to(&[], (b.addr.ip(), 9)));
            if let Err(e) = sent {
                log::warn!(
                    "resolving the neighbour of dsr backend {} ({}): {e}",
                    b.name,
                    b.addr.ip()
                );
            }
        }
    }
}

/// Loads the program and applies `state`, then attaches. On any failure, everything done so
/// far is undone: nothing half-applied stays behind.
pub fn start(a: &AgentSettings, state: &DesiredState) -> Result<Dataplane> {
    let opts = LoadOptions {
        pin_dir: a.pin_dir.clone(),
        flow_table_size: a.flow_table_size,
        config: dp_config(a),
    };
    // A program built apart from the agent (same layout version), e.g. to swap in a rebuilt
    // data path without rebuilding the agent.
    let mut dp = match std::env::var_os("ZDD_XDP_OBJECT") {
        Some(path) => {
            let bytes = std::fs::read(&path).with_context(|| {
                format!("reading ZDD_XDP_OBJECT {}", Path::new(&path).display())
            })?;
            // ELF parsing wants the object 8-byte aligned, as the embedded one is.
            let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
            // SAFETY: a u64 buffer viewed as bytes; the length is within it.
            let view = unsafe {
                std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), bytes.len())
            };
            view.copy_from_slice(&bytes);
            log::info!(
                "loading the XDP program from {} (ZDD_XDP_OBJECT)",
                Path::new(&path).display()
            );
            Dataplane::load_object(&opts, view)?
        }
        None => Dataplane::load(&opts)?,
    };
    if let Some(tag) = dp.program_tag() {
        log::info!(
            "XDP program {} loaded (tag {tag:016x})",
            zdd_common::PROGRAM_NAME
        );
    }
    if let Some(m) = dp.mounted_bpffs() {
        log::info!(
            "mounted a BPF filesystem at {} (none was mounted)",
            m.display()
        );
    }
    if dp.adopted() {
        log::info!(
            "adopted maps pinned in {} (flows kept)",
            dp.pin_dir().display()
        );
    }
    let mut in_force = false;
    let result = (|| -> Result<()> {
        match dp.apply(state) {
            Ok(report) => log::info!("applied config: {report}"),
            Err(ApplyError::CleanUp { report, error }) => {
                log::warn!(
                    "applied config: {report}; cleaning up after it failed: {error} (retried)"
                );
            }
            Err(e) => return Err(e).context("applying the config"),
        }
        in_force = true;
        resolve_dsr_neighbours(state);
        for iface in &a.interfaces {
            let mode = dp.attach(iface, a.xdp_mode)?;
            log::info!("attached to {iface} ({mode})");
        }
        Ok(())
    })();
    if let Err(e) = result {
        if dp.adopted() {
            // The predecessor's pinned links and maps keep forwarding: leave them alone rather
            // than take the data path down with us.
            log::error!(
                "start failed; the pinned data path in {} keeps running {}",
                dp.pin_dir().display(),
                if in_force {
                    "with this config's services applied"
                } else {
                    "as the previous agent left it"
                }
            );
        } else {
            dp.detach_all();
            let _ = dp.unpin_all();
        }
        return Err(e);
    }
    for iface in dp.detach_unconfigured(&a.interfaces) {
        log::info!("detached from {iface}: no longer in agent.interfaces");
    }
    Ok(dp)
}

/// Removes the socket file when the agent ends, however `run` returns.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub async fn run(path: &Path) -> Result<()> {
    let cfg = config::load(path)?;
    let a = cfg.agent.clone();
    // The saved live state: run-time changes survive restarts. A config file that changed
    // since it was last applied is applied on top (drains and split history kept).
    let store = Store::open(&a.state_dir)?;
    let saved = store.load()?;
    let file_hash = services_hash(&cfg.state);
    let live = match saved {
        Some(s) if s.file_hash.as_deref() == Some(file_hash.as_str()) => {
            log::info!(
                "live state from {} (the config file is unchanged since it was applied)",
                store.state_path().display()
            );
            s.live
        }
        Some(s) => {
            let mut l = s.live;
            let changes = l.apply_file(&cfg.state);
            log::info!(
                "the config file changed since it was last applied: {}",
                if changes.is_empty() {
                    "no service changes".to_string()
                } else {
                    changes.join("; ")
                }
            );
            l
        }
        None => LiveState::from_desired(&cfg.state),
    };
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Everything that can fail is set up before the data path is touched, so a failure
    // here leaves nothing behind; `start` undoes its own work on failure.
    let routes = crate::netlink::RouteWatch::new()
        .context("subscribing to route and neighbour changes (rtnetlink)")?;
    let listener = crate::server::bind(&a.socket, a.socket_group.as_ref()).await?;
    let metrics = match a.metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let _socket_file = SocketFile(a.socket.clone());
    // Health at start: the backends of a data path already pinned were serving, so they
    // start up (probes take them down if they fail); on a fresh start they start
    // `starting`, taking no new flow until their first probe passes.
    let adopting = a
        .pin_dir
        .join(format!("v{}", zdd_common::LAYOUT_VERSION))
        .join(zdd_common::map_names::SERVICES)
        .exists();
    let mut health = crate::health::HealthMap::new();
    for s in &live.services {
        if s.spec.health.kind != crate::state::HealthKind::None {
            for b in &s.spec.backends {
                let st = if adopting {
                    crate::health::State::Up
                } else {
                    crate::health::State::Starting
                };
                health.insert(
                    (s.spec.name.clone(), b.name.clone()),
                    crate::health::BackendHealth::new(st),
                );
            }
        }
    }
    let first = crate::health::apply(&live, live.effective(), &health, crate::control::now_ms());
    let dp = start(&a, &first.state)?;
    let pin_dir = dp.pin_dir().to_path_buf();
    let alert_settings = cfg.alerts.clone();
    let mut ctl = Control::new(dp, live, cfg, path.to_path_buf(), store, Some(file_hash));
    ctl.health = health;
    ctl.alerts = crate::alerts::Alerts::start(alert_settings);
    ctl.prom = crate::control::prom_client(&a);
    if let Err(e) = ctl.save() {
        log::error!("{e}");
    }
    ctl.record(
        Actor {
            via: "agent".into(),
            ..Default::default()
        },
        "start",
        None,
        format!(
            "zdd-agent started: {} service(s) on {}",
            ctl.live.services.len(),
            a.interfaces.join(",")
        ),
        serde_json::Value::Null,
        serde_json::Value::Null,
    );
    let (tx, mut rx) = mpsc::channel::<Intent>(256);
    spawn_flow_counter(pin_dir, ctl.count_rules.subscribe(), tx.clone());
    ctl.start_probes(tx.clone());
    ctl.resume_deployments_after_restart();
    tokio::spawn(crate::server::serve(
        listener,
        tx.clone(),
        a.socket_group.clone(),
    ));
    if let Some(m) = metrics {
        log::info!("metrics on http://{}/metrics", m.local_addr()?);
        tokio::spawn(crate::metrics::serve(m, tx.clone()));
    }
    log::info!(
        "zdd-agent ready: {} service(s) on {}, control socket {}",
        ctl.live.services.len(),
        a.interfaces.join(","),
        a.socket.display()
    );
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut unresolved = 0;
    loop {
        tokio::select! {
            Some(intent) = rx.recv() => ctl.handle(intent),
            _ = tick.tick() => {
                ctl.sample_rates();
                ctl.check_drains();
                // Passive signals (outlier ejection), then slow start: weights ramp up
                // between transitions.
                ctl.passive_tick();
                ctl.reapply();
                ctl.deploy_tick();
                // The data path met a dsr backend whose neighbour is not resolved: resolve.
                let now = ctl.dp.stats().map(|s| s.get(zdd_common::Stat::Unresolved)).unwrap_or(0);
                if now > unresolved {
                    resolve_dsr_neighbours(&ctl.live.effective());
                }
                unresolved = now;
                // An earlier apply's clean-up failed: finish it without waiting for the next.
                if ctl.dp.cleanup_pending() {
                    match ctl.dp.retry_cleanup() {
                        Ok(_) => log::info!("clean-up after the last apply completed"),
                        Err(e) => log::warn!("clean-up after the last apply failed again: {e}"),
                    }
                }
            }
            r = routes.changed() => {
                if let Err(e) = r {
                    log::warn!("rtnetlink: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
                // Coalesce a burst of changes (a route flap brings many) into one refresh.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let _ = tokio::time::timeout(std::time::Duration::ZERO, routes.changed()).await;
                match ctl.dp.invalidate_nexthops() {
                    Ok(n) => log::debug!("routes or neighbours changed: {n} next hop(s) to re-resolve"),
                    Err(e) => log::warn!("invalidating next hops: {e}"),
                }
            }
            _ = hup.recv() => ctl.handle(Intent::Reload),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    log::info!(
        "zdd-agent stopped; the data path keeps forwarding on the maps and links pinned in {} (`zdd-agent detach` removes it)",
        ctl.dp.pin_dir().display()
    );
    Ok(())
}

/// `zdd-agent detach`: removes zdd from every interface and its pins from bpffs. Refused
/// while an agent runs on the same pin directory.
pub fn detach(a: &AgentSettings) -> Result<Vec<String>> {
    Ok(crate::maps::detach(&a.pin_dir)?)
}
