//! zdd: the command-line client. Until the control socket lands it reads the pinned maps
//! directly, which works as long as an agent (or its pins) is there.

use std::{path::PathBuf, process::ExitCode};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use clap::{Parser, Subcommand};
use zdd_common::{
    Addr, Backend, Counters, FAMILY_V4, LAYOUT_VERSION, PROTO_TCP, Service, Stat, VipKey,
    backend_flags, map_names,
};

#[derive(Parser)]
#[command(name = "zdd", version, about = "zdd client")]
struct Cli {
    /// Base pin directory of the agent (agent.pin_dir).
    #[arg(long, default_value = "/sys/fs/bpf/zdd", global = true)]
    pin_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Data-path counters, summed over CPUs: verdicts and reasons, then packets, bytes and
    /// new flows per service (by VIP) and per backend (by address).
    Stats,
}

fn open(cli: &Cli, name: &str) -> Result<Map, String> {
    let path = cli.pin_dir.join(format!("v{LAYOUT_VERSION}")).join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        format!(
            "cannot open {}: {e} (is zdd-agent running with agent.pin_dir = {}?)",
            path.display(),
            cli.pin_dir.display()
        )
    })?;
    Map::from_map_data(data).map_err(|e| e.to_string())
}

fn ip(a: &Addr, family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        Ipv4Addr::from(a[0].to_ne_bytes()).into()
    } else {
        let mut b = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ipv6Addr::from(b).into()
    }
}

/// Counters of one service (by VIP) or backend (by address), summed over CPUs.
struct Row {
    what: String,
    c: Counters,
}

struct Report {
    global: Vec<(&'static str, u64)>,
    services: Vec<Row>,
    backends: Vec<Row>,
}

fn sum(v: &aya::maps::PerCpuValues<Counters>) -> Counters {
    v.iter().fold(Counters::default(), |a, c| Counters {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
        new_flows: a.new_flows + c.new_flows,
    })
}

fn stats(cli: &Cli) -> Result<Report, String> {
    let e = |e: aya::maps::MapError| e.to_string();
    let g: PerCpuArray<_, u64> =
        PerCpuArray::try_from(open(cli, map_names::GLOBAL_STATS)?).map_err(e)?;
    let global = Stat::ALL
        .iter()
        .map(|s| {
            g.get(&(*s as u32), 0)
                .map(|v| (s.name(), v.iter().sum()))
                .map_err(e)
        })
        .collect::<Result<_, _>>()?;

    let svc: HashMap<_, VipKey, Service> =
        HashMap::try_from(open(cli, map_names::SERVICES)?).map_err(e)?;
    let sst: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(open(cli, map_names::SERVICE_STATS)?).map_err(e)?;
    let mut services = Vec::new();
    for kv in svc.iter() {
        let (k, v) = kv.map_err(e)?;
        if k.port == 0 && k.proto == 0 {
            continue; // a VIP address marker, not a service
        }
        let proto = if k.proto == PROTO_TCP { "tcp" } else { "udp" };
        let what = format!(
            "{}/{proto}",
            SocketAddr::new(ip(&k.addr, k.family), u16::from_be(k.port))
        );
        services.push(Row {
            what,
            c: sum(&sst.get(&v.id, 0).map_err(e)?),
        });
    }
    services.sort_by(|a, b| a.what.cmp(&b.what));

    let be: Array<_, Backend> = Array::try_from(open(cli, map_names::BACKENDS)?).map_err(e)?;
    let bst: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(open(cli, map_names::BACKEND_STATS)?).map_err(e)?;
    let mut backends = Vec::new();
    for (id, b) in be.iter().enumerate() {
        let b = b.map_err(e)?;
        if b.flags & backend_flags::LIVE == 0 {
            continue;
        }
        let what = SocketAddr::new(ip(&b.addr, b.family), u16::from_be(b.port)).to_string();
        backends.push(Row {
            what,
            c: sum(&bst.get(&(id as u32), 0).map_err(e)?),
        });
    }
    backends.sort_by(|a, b| a.what.cmp(&b.what));
    Ok(Report {
        global,
        services,
        backends,
    })
}

fn rows_json(rows: &[Row]) -> String {
    let r: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"addr\":\"{}\",\"packets\":{},\"bytes\":{},\"new_flows\":{}}}",
                r.what, r.c.packets, r.c.bytes, r.c.new_flows
            )
        })
        .collect();
    format!("[{}]", r.join(","))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Stats => match stats(&cli) {
            Ok(r) => {
                if cli.json {
                    let body: Vec<String> = r
                        .global
                        .iter()
                        .map(|(k, v)| format!("\"{k}\":{v}"))
                        .collect();
                    println!(
                        "{{\"global\":{{{}}},\"services\":{},\"backends\":{}}}",
                        body.join(","),
                        rows_json(&r.services),
                        rows_json(&r.backends)
                    );
                } else {
                    for (k, v) in &r.global {
                        println!("{k:<16} {v}");
                    }
                    for (title, rows) in [("service", &r.services), ("backend", &r.backends)] {
                        for row in rows {
                            println!(
                                "{title} {} packets {} bytes {} new_flows {}",
                                row.what, row.c.packets, row.c.bytes, row.c.new_flows
                            );
                        }
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
