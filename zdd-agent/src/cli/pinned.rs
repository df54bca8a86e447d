//! `zdd --pin-dir DIR stats`: the data-path counters read straight from the maps the agent
//! pinned, without the agent (it works while the agent is stopped or restarting).

use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use zdd_common::{
    Backend, Counters, LAYOUT_VERSION, PROTO_TCP, Service, Stat, VipKey, backend_flags, map_names,
};

use crate::{
    api::{CounterRow, StatsResult},
    maps::total,
    state::socket_addr_of,
};

fn open(pin_dir: &Path, name: &str) -> Result<Map, String> {
    let path = pin_dir.join(format!("v{LAYOUT_VERSION}")).join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        format!(
            "cannot open {}: {e} (is zdd-agent running with agent.pin_dir = {}?)",
            path.display(),
            pin_dir.display()
        )
    })?;
    Map::from_map_data(data).map_err(|e| e.to_string())
}

fn row(addr: String, c: Counters) -> CounterRow {
    CounterRow {
        name: addr.clone(),
        addr,
        packets: c.packets,
        bytes: c.bytes,
        new_flows: c.new_flows,
    }
}

/// The counters, summed over CPUs; services and backends are named by their address.
pub fn stats(pin_dir: &Path) -> Result<StatsResult, String> {
    let e = |e: aya::maps::MapError| e.to_string();
    let g: PerCpuArray<_, u64> =
        PerCpuArray::try_from(open(pin_dir, map_names::GLOBAL_STATS)?).map_err(e)?;
    let global = Stat::ALL
        .iter()
        .map(|s| {
            g.get(&(*s as u32), 0)
                .map(|v| (s.name().to_string(), v.iter().sum()))
                .map_err(e)
        })
        .collect::<Result<_, _>>()?;

    let svc: HashMap<_, VipKey, Service> =
        HashMap::try_from(open(pin_dir, map_names::SERVICES)?).map_err(e)?;
    let sst: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(open(pin_dir, map_names::SERVICE_STATS)?).map_err(e)?;
    let mut services = Vec::new();
    for kv in svc.iter() {
        let (k, v) = kv.map_err(e)?;
        if k.port == 0 && k.proto == 0 {
            continue; // a VIP address marker, not a service
        }
        let proto = if k.proto == PROTO_TCP { "tcp" } else { "udp" };
        let addr = format!("{}/{proto}", socket_addr_of(&k.addr, k.port, k.family));
        services.push(row(addr, total(&sst.get(&v.id, 0).map_err(e)?)));
    }
    services.sort_by(|a, b| a.addr.cmp(&b.addr));

    let be: Array<_, Backend> = Array::try_from(open(pin_dir, map_names::BACKENDS)?).map_err(e)?;
    let bst: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(open(pin_dir, map_names::BACKEND_STATS)?).map_err(e)?;
    let mut backends = Vec::new();
    for (id, b) in be.iter().enumerate() {
        let b = b.map_err(e)?;
        if b.flags & backend_flags::LIVE == 0 {
            continue;
        }
        let addr = socket_addr_of(&b.addr, b.port, b.family).to_string();
        backends.push(row(addr, total(&bst.get(&(id as u32), 0).map_err(e)?)));
    }
    backends.sort_by(|a, b| a.addr.cmp(&b.addr));
    Ok(StatsResult {
        global,
        services,
        backends,
    })
}

/// The text the tests and scripts of the first releases parse: `NAME VALUE` a line for the
/// global counters, then `service|backend ADDR packets N bytes N new_flows N`.
pub fn text(r: &StatsResult) -> String {
    let global = super::render::global_counters(&r.global);
    let w = global.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out: Vec<String> = global
        .into_iter()
        .map(|(k, v)| format!("{k:<w$} {v}"))
        .collect();
    for (title, rows) in [("service", &r.services), ("backend", &r.backends)] {
        for row in rows {
            out.push(format!(
                "{title} {} packets {} bytes {} new_flows {}",
                row.addr, row.packets, row.bytes, row.new_flows
            ));
        }
    }
    out.join("\n")
}
