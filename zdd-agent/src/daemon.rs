//! `zdd-agent run`: load, apply, attach, then serve signals until told to stop.
//! SIGHUP re-reads the config and applies it without detaching; SIGINT/SIGTERM detach,
//! remove the pins and exit.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{self, AgentSettings, Config},
    maps::{Dataplane, LoadOptions},
};

/// Data-path tunables from the agent settings.
pub fn dp_config(a: &AgentSettings) -> zdd_common::Config {
    zdd_common::Config {
        tcp_idle_ns: a.tcp_idle.as_nanos() as u64,
        udp_idle_ns: a.udp_idle.as_nanos() as u64,
        nexthop_ttl_ns: a.nexthop_refresh.as_nanos() as u64,
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

/// Loads the program and applies `cfg`, then attaches. On any failure, everything done so
/// far is undone: nothing half-applied stays behind.
pub fn start(cfg: &Config) -> Result<Dataplane> {
    let a = &cfg.agent;
    let mut dp = Dataplane::load(&LoadOptions {
        pin_dir: a.pin_dir.clone(),
        flow_table_size: a.flow_table_size,
        config: dp_config(a),
    })?;
    if dp.adopted() {
        log::info!(
            "adopted maps pinned in {} (flows kept)",
            dp.pin_dir().display()
        );
    }
    let result = (|| -> Result<()> {
        let report = dp.apply(&cfg.state).context("applying the config")?;
        log::info!("applied config: {report}");
        resolve_dsr_neighbours(&cfg.state);
        for iface in &a.interfaces {
            let mode = dp.attach(iface, a.xdp_mode)?;
            log::info!("attached to {iface} ({mode})");
        }
        Ok(())
    })();
    if let Err(e) = result {
        if dp.adopted() {
            // The predecessor's pinned links and maps keep forwarding as they were: leave them
            // alone rather than take the data path down with us.
            log::error!(
                "start failed; the pinned data path in {} keeps running",
                dp.pin_dir().display()
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

/// Applies a re-read config. Settings that need a restart are refused, whole.
pub fn reload(dp: &mut Dataplane, running: &AgentSettings, new: &Config) -> Result<()> {
    let a = &new.agent;
    for (field, same) in [
        ("interfaces", a.interfaces == running.interfaces),
        ("xdp_mode", a.xdp_mode == running.xdp_mode),
        ("pin_dir", a.pin_dir == running.pin_dir),
        (
            "flow_table_size",
            a.flow_table_size == running.flow_table_size,
        ),
    ] {
        if !same {
            bail!("agent.{field} changed: it takes effect at a restart; nothing was applied");
        }
    }
    let report = dp.apply(&new.state).context("applying the config")?;
    dp.write_config(&dp_config(a))?;
    resolve_dsr_neighbours(&new.state);
    log::info!("reloaded config: {report}");
    Ok(())
}

pub async fn run(path: &Path) -> Result<()> {
    let mut cfg = config::load(path)?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut dp = start(&cfg)?;
    log::info!(
        "zdd-agent ready: {} service(s) on {}",
        cfg.state.services.len(),
        cfg.agent.interfaces.join(",")
    );
    let routes = crate::netlink::RouteWatch::new()
        .context("subscribing to route and neighbour changes (rtnetlink)")?;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut unresolved = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // The data path met a dsr backend whose neighbour is not resolved: resolve.
                let now = dp.stats().map(|s| s.get(zdd_common::Stat::Unresolved)).unwrap_or(0);
                if now > unresolved {
                    resolve_dsr_neighbours(&cfg.state);
                }
                unresolved = now;
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
                match dp.invalidate_nexthops() {
                    Ok(n) => log::debug!("routes or neighbours changed: {n} next hop(s) to re-resolve"),
                    Err(e) => log::warn!("invalidating next hops: {e}"),
                }
            }
            _ = hup.recv() => {
                match config::load(path).map_err(anyhow::Error::from).and_then(|new| {
                    reload(&mut dp, &cfg.agent, &new)?;
                    Ok(new)
                }) {
                    Ok(new) => cfg = new,
                    Err(e) => log::error!("reload refused, still running the previous config: {e:#}"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    log::info!(
        "stopping: detaching from {}",
        dp.attached_interfaces().join(",")
    );
    dp.detach_all();
    dp.unpin_all()
        .with_context(|| format!("removing pins in {}", dp.pin_dir().display()))?;
    log::info!("zdd-agent stopped");
    Ok(())
}
