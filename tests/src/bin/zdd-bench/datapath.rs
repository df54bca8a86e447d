//! `cargo xtask bench datapath [-- --quick]`: the XDP program's cost per packet, by path, with
//! BPF_PROG_TEST_RUN, as ratios to a floor program (MAC swap + XDP_TX) measured the same way
//! in the same run. Method: BENCHMARKS.md (repeat-1 calls for rewriting paths, each from the
//! original frame; every run checked against the per-verdict/per-reason counters).
//!
//! Everything runs in the edge namespace of a lab (no servers): `bpf_fib_lookup` resolves the
//! backends there, through permanent neighbour entries, on one thread pinned to one CPU.

#[path = "datapath_frames.rs"]
mod frames;
#[path = "datapath_measure.rs"]
mod measure;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use zdd_agent::maps::{Dataplane, LoadOptions};
use zdd_common::{DEFAULT_FLOW_TABLE_SIZE, FlowEntry, FlowKey, Stat, map_names};
use zdd_tests::lab::{CLIENT_V4, CLIENT_V6};
use zdd_tests::{Lab, LabSpec, Node};

use frames::{PROTO_TCP, PROTO_UDP, Seen, Spec, TCP_ACK, TCP_PSH, TCP_SYN, mac_str};
use measure::{
    Bench, Case, Frames, Prog, XDP_PASS, XDP_REDIRECT, XDP_TX, check_counts, median, min_max, show,
    verdict_name,
};

const VIP4_NAT: Ipv4Addr = Ipv4Addr::new(10, 0, 100, 1);
const VIP6_NAT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
const VIP4_DSR: Ipv4Addr = Ipv4Addr::new(10, 0, 100, 2);
const VIP6_DSR: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
const VIP_PORT: u16 = 80;
const UDP_VIP_PORT: u16 = 53;
const NAT_PORT: u16 = 8080;
const UDP_PORT: u16 = 9000;
const CLIENT_PORT: u16 = 40000;
const MEMORY_FLOWS: u32 = 1_000_000;
const BIG_REPEAT: u32 = 1_000_000;

struct Args {
    calls: usize,
    runs: usize,
    warmup: usize,
    cpu: usize,
    quick: bool,
    /// Flow-table size; None = big enough that no run evicts.
    table: Option<u32>,
}

fn parse_args(args: &[String]) -> Result<Args> {
    let mut a = Args {
        calls: 100_000,
        runs: 5,
        warmup: 5_000,
        cpu: 1,
        quick: false,
        table: None,
    };
    let mut it = args.iter();
    while let Some(x) = it.next() {
        let mut num = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .replace('_', "")
                .parse()
                .with_context(|| format!("{name}: not a number"))
        };
        match x.as_str() {
            "--quick" => {
                a.quick = true;
                a.calls = 20_000;
                a.warmup = 2_000;
            }
            "--calls" => a.calls = num("--calls")?,
            "--runs" => a.runs = num("--runs")?,
            "--cpu" => a.cpu = num("--cpu")?,
            "--flow-table" => a.table = Some(num("--flow-table")? as u32),
            "-h" | "--help" => {
                println!(
                    "zdd-bench datapath [--quick] [--calls N] [--runs N] [--cpu N]\n  \
                     --quick   20,000 repeat-1 calls per run (default 100,000)\n  \
                     --calls   repeat-1 calls per run\n  --runs    runs per path (default 5)\n  \
                     --cpu     CPU to pin the measuring thread to (default 1)\n  \
                     --flow-table N  flow-table size (default: large enough that nothing is \
                     evicted); a small table measures new flows with LRU eviction"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    ensure!(
        a.calls >= 1 && a.runs >= 1,
        "--calls and --runs must be at least 1"
    );
    Ok(a)
}

/// Removes the pins of a benchmark Dataplane, also on error or panic.
struct Pinned(Dataplane);

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Err(e) = self.0.unpin_all() {
            eprintln!(
                "warning: removing pins in {}: {e}",
                self.0.pin_dir().display()
            );
        }
    }
}

fn load(pin_dir: &Path, flow_table_size: u32) -> Result<Pinned> {
    let dp = Dataplane::load(&LoadOptions {
        pin_dir: pin_dir.to_path_buf(),
        flow_table_size,
        config: zdd_common::Config::default(),
    })
    .with_context(|| format!("loading the data path (pins in {})", pin_dir.display()))?;
    Ok(Pinned(dp))
}

/// What the measuring thread needs to know about the lab.
#[derive(Clone)]
struct Net {
    eth0: u32,
    eth1: u32,
    eth0_mac: [u8; 6],
    eth1_mac: [u8; 6],
    client_mac: [u8; 6],
    /// Backend address (v4 and v6) → its MAC.
    backend_mac: HashMap<IpAddr, [u8; 6]>,
    /// (ip v4, ip v6) of each backend, in lab order.
    backends: Vec<(Ipv4Addr, Ipv6Addr)>,
}

fn config_text(net: &Net) -> String {
    let mut s = String::from("[agent]\ninterfaces = [\"eth0\"]\n");
    let groups = ["blue", "blue", "green", "green"];
    let mut service = |name: &str, vip: String, proto: &str, fwd: &str, addrs: Vec<String>| {
        s += &format!(
            "\n[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"{proto}\"\n\
             forwarding = \"{fwd}\"\nsplit = {{ blue = 100, green = 0 }}\n"
        );
        for (i, a) in addrs.iter().enumerate() {
            s += &format!(
                "\n[[services.backends]]\nname = \"{}-{i}\"\naddr = \"{a}\"\ngroup = \"{}\"\n",
                groups[i % 4],
                groups[i % 4]
            );
        }
    };
    let v4 = |port: u16| -> Vec<String> {
        net.backends
            .iter()
            .map(|(a, _)| format!("{a}:{port}"))
            .collect()
    };
    let v6 = |port: u16| -> Vec<String> {
        net.backends
            .iter()
            .map(|(_, a)| format!("[{a}]:{port}"))
            .collect()
    };
    service(
        "tcp4-nat",
        format!("{VIP4_NAT}:{VIP_PORT}"),
        "tcp",
        "nat",
        v4(NAT_PORT),
    );
    service(
        "tcp6-nat",
        format!("[{VIP6_NAT}]:{VIP_PORT}"),
        "tcp",
        "nat",
        v6(NAT_PORT),
    );
    service(
        "tcp4-dsr",
        format!("{VIP4_DSR}:{VIP_PORT}"),
        "tcp",
        "dsr",
        v4(VIP_PORT),
    );
    service(
        "tcp6-dsr",
        format!("[{VIP6_DSR}]:{VIP_PORT}"),
        "tcp",
        "dsr",
        v6(VIP_PORT),
    );
    service(
        "udp4-nat",
        format!("{VIP4_NAT}:{UDP_VIP_PORT}"),
        "udp",
        "nat",
        v4(UDP_PORT),
    );
    s
}

fn loadavg() -> (f64, String) {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let one = text
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    (one, text.trim().to_string())
}

fn ncpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let args = parse_args(args)?;
    let (load1, text) = loadavg();
    println!("# zdd data path: ns per packet (BPF_PROG_TEST_RUN), ratio to the floor\n");
    println!("machine load before start (/proc/loadavg): {text}");
    let cpus = ncpus();
    if load1 > 0.5 * cpus as f64 {
        println!(
            "WARNING: the machine is busy (1-min load {load1:.2} on {cpus} CPUs): absolute \
             numbers and even ratios may be off; rerun on an idle machine"
        );
    }
    ensure!(
        args.cpu < cpus,
        "--cpu {} but this machine has {cpus} CPUs",
        args.cpu
    );

    let started = Instant::now();
    let lab = Lab::new(LabSpec::default()).context("building the lab")?;
    let net = lab_net(&lab)?;
    let out = lab.in_ns(Node::Edge, || measure_all(&args, &net));
    drop(lab);
    let report = out?;
    print!("{report}");
    let (_, text) = loadavg();
    println!(
        "\nmachine load after the run: {text}; wall time {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Neighbour entries and addresses the data path will look up.
fn lab_net(lab: &Lab) -> Result<Net> {
    let eth0 = lab.ifindex(Node::Edge, "eth0")?;
    let eth1 = lab.ifindex(Node::Edge, "eth1")?;
    let eth0_mac = lab.mac(Node::Edge, "eth0")?;
    let eth1_mac = lab.mac(Node::Edge, "eth1")?;
    let client_mac = lab.mac(Node::Client, "eth0")?;
    let mut backend_mac = HashMap::new();
    let mut backends = Vec::new();
    let neigh = |ip: IpAddr, mac: &[u8; 6], dev: &str| lab.set_neighbour(Node::Edge, ip, *mac, dev);
    for b in lab.backends() {
        let mac = lab.mac(b.node, "eth0")?;
        for ip in [IpAddr::V4(b.ipv4), IpAddr::V6(b.ipv6)] {
            neigh(ip, &mac, "eth1")?;
            backend_mac.insert(ip, mac);
        }
        backends.push((b.ipv4, b.ipv6));
    }
    neigh(IpAddr::V4(CLIENT_V4), &client_mac, "eth0")?;
    neigh(IpAddr::V6(CLIENT_V6), &client_mac, "eth0")?;
    Ok(Net {
        eth0,
        eth1,
        eth0_mac,
        eth1_mac,
        client_mac,
        backend_mac,
        backends,
    })
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity(CPU {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// One line of the table.
struct Row {
    name: String,
    ns: Vec<f64>,
    /// Floor runs interleaved with this row's runs (same repeat mode).
    floor: Vec<f64>,
    note: String,
}

impl Row {
    fn ratio(&self) -> f64 {
        median(&self.ns) / median(&self.floor)
    }
}

struct Ctx<'a, 'b> {
    bench: &'a mut Bench<'b>,
    args: &'a Args,
    net: &'a Net,
    /// Every repeat-1 floor run, for the floor's own row.
    floor_runs: Vec<f64>,
}

fn floor_case(net: &Net, repeat: u32) -> Case {
    let f = frames::build(&Spec {
        dmac: net.eth0_mac,
        smac: net.client_mac,
        src: IpAddr::V4(CLIENT_V4),
        dst: IpAddr::V4(VIP4_NAT),
        proto: PROTO_TCP,
        sport: CLIENT_PORT,
        dport: VIP_PORT,
        flags: TCP_ACK | TCP_PSH,
    });
    Case {
        prog: Prog::Floor,
        frames: Frames::Fixed(f),
        ingress: net.eth0,
        repeat,
        verdict: XDP_TX,
        per_packet: vec![],
        next: 0,
    }
}

impl Ctx<'_, '_> {
    /// `runs` × (floor run, candidate run), after a warm-up of both.
    fn interleaved(
        &mut self,
        name: &str,
        cand: &mut Case,
        calls: usize,
        note: String,
    ) -> Result<Row> {
        let mut floor = floor_case(self.net, cand.repeat);
        let warm = if cand.repeat > 1 { 1 } else { self.args.warmup };
        self.bench.warm(&mut floor, warm)?;
        self.bench.warm(cand, warm)?;
        let mut row = Row {
            name: name.into(),
            ns: vec![],
            floor: vec![],
            note,
        };
        for r in 0..self.args.runs {
            let f = self
                .bench
                .run(&mut floor, calls, &format!("floor beside {name}, run {r}"))?;
            let c = self.bench.run(cand, calls, &format!("{name}, run {r}"))?;
            row.floor.push(f);
            row.ns.push(c);
            if cand.repeat == 1 {
                self.floor_runs.push(f);
            }
        }
        eprintln!(
            "  {name}: {:.1} ns (floor beside it {:.1} ns)",
            median(&row.ns),
            median(&row.floor)
        );
        Ok(row)
    }

    /// The checked call before a row's runs: verdict, counters, then `check` on the output.
    fn probe(
        &mut self,
        name: &str,
        case: &mut Case,
        per_call: &[(Stat, u64)],
        check: impl FnOnce(&Seen) -> Result<()>,
    ) -> Result<Seen> {
        let (v, out, d) = self.bench.probe(case)?;
        let ctx = || format!("{name}: path check");
        if v != case.verdict {
            bail!(
                "{}: verdict {} instead of {} (counters: {})",
                ctx(),
                verdict_name(v),
                verdict_name(case.verdict),
                show(&d)
            );
        }
        check_counts(&d, per_call, 1).with_context(ctx)?;
        let seen = frames::read(&out).with_context(|| format!("{}: output frame", ctx()))?;
        check(&seen).with_context(ctx)?;
        Ok(seen)
    }
}

fn fixed(net: &Net, spec: &Spec, ingress: u32, verdict: u32, per_packet: Vec<(Stat, u64)>) -> Case {
    let _ = net;
    Case {
        prog: Prog::Zdd,
        frames: Frames::Fixed(frames::build(spec)),
        ingress,
        repeat: 1,
        verdict,
        per_packet,
        next: 0,
    }
}

fn client_spec(net: &Net, src: IpAddr, dst: IpAddr, proto: u8, dport: u16, flags: u8) -> Spec {
    Spec {
        dmac: net.eth0_mac,
        smac: net.client_mac,
        src,
        dst,
        proto,
        sport: CLIENT_PORT,
        dport,
        flags,
    }
}

fn measure_all(args: &Args, net: &Net) -> Result<String> {
    pin_to_cpu(args.cpu)?;
    let pid = std::process::id();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/zdd-bench-{pid}"));
    // Room for every new flow of the new-flow rows, so that no run evicts (an LRU table that
    // evicts measures eviction too), unless --flow-table asks for that.
    // Three recorded new-flow rows and the insert probe.
    let new_flows = 4 * (args.runs * args.calls + args.warmup + 1) as u32;
    let table = args.table.unwrap_or(
        (new_flows + 1024)
            .max(DEFAULT_FLOW_TABLE_SIZE)
            .next_power_of_two(),
    );
    let mut dp = load(&pin_dir, table)?;
    let state = zdd_agent::config::parse(Path::new("bench.toml"), &config_text(net))
        .context("the benchmark's config")?
        .state;
    dp.0.apply(&state)
        .context("applying the benchmark's services")?;
    let insns = program_size(&mut dp.0);
    if let Some(to) = std::env::var_os("ZDD_BENCH_DUMP") {
        dump_program(&mut dp.0, Path::new(&to))?;
    }

    let progs = measure::load_bench_object(&dp.0)?;
    let mut bench = Bench {
        dp: &mut dp.0,
        progs,
    };
    let mut c = Ctx {
        bench: &mut bench,
        args,
        net,
        floor_runs: vec![],
    };
    let calls = args.calls;
    let mut rows: Vec<Row> = Vec::new();

    eprintln!(
        "measuring on CPU {} ({} runs of {} repeat-1 calls per path, flow table {table})",
        args.cpu, args.runs, calls
    );

    // The floor's own path check.
    {
        let mut f = floor_case(net, 1);
        let (eth0_mac, client_mac) = (net.eth0_mac, net.client_mac);
        c.probe("floor", &mut f, &[], |s| {
            ensure!(
                s.dmac == client_mac && s.smac == eth0_mac,
                "MACs not swapped: {s:?}"
            );
            Ok(())
        })?;
    }

    // Established flows: the first call creates the flow (and warms NEXTHOP), the next one is
    // the checked call, then the runs. Same 5-tuple throughout.
    let established: [(&str, IpAddr, IpAddr, u8, u16, bool); 5] = [
        (
            "established TCP IPv4 nat",
            CLIENT_V4.into(),
            VIP4_NAT.into(),
            PROTO_TCP,
            VIP_PORT,
            true,
        ),
        (
            "established TCP IPv6 nat",
            CLIENT_V6.into(),
            VIP6_NAT.into(),
            PROTO_TCP,
            VIP_PORT,
            true,
        ),
        (
            "established TCP IPv4 dsr",
            CLIENT_V4.into(),
            VIP4_DSR.into(),
            PROTO_TCP,
            VIP_PORT,
            false,
        ),
        (
            "established TCP IPv6 dsr",
            CLIENT_V6.into(),
            VIP6_DSR.into(),
            PROTO_TCP,
            VIP_PORT,
            false,
        ),
        (
            "established UDP IPv4 nat",
            CLIENT_V4.into(),
            VIP4_NAT.into(),
            PROTO_UDP,
            UDP_VIP_PORT,
            true,
        ),
    ];
    // Backend chosen for the IPv4 TCP nat flow: the reply row answers from it.
    let mut tcp4_backend: Option<Seen> = None;
    for (name, src, dst, proto, dport, nat) in established {
        let flags = if proto == PROTO_TCP {
            TCP_ACK | TCP_PSH
        } else {
            0
        };
        let spec = client_spec(net, src, dst, proto, dport, flags);
        let mut first = fixed(net, &spec, net.eth0, XDP_REDIRECT, vec![]);
        let (v, _, d) = c.bench.probe(&mut first)?;
        ensure!(
            v == XDP_REDIRECT && d.iter().any(|(s, n)| *s == Stat::NewFlow && *n == 1),
            "{name}: creating the flow: verdict {}, counters {}",
            verdict_name(v),
            show(&d)
        );
        let mut case = fixed(net, &spec, net.eth0, XDP_REDIRECT, vec![(Stat::Forward, 1)]);
        let seen = c.probe(name, &mut case, &[(Stat::Forward, 1)], |s| {
            check_forward(net, &spec, s, nat)
        })?;
        if name == "established TCP IPv4 nat" {
            tcp4_backend = Some(seen.clone());
        }
        let note = format!("→ {}:{} via eth1, XDP_REDIRECT", seen.dst, seen.dport);
        rows.push(c.interleaved(name, &mut case, calls, note)?);
    }

    // A reply of the IPv4 nat flow, from its backend (extra row: Katran has no reverse path).
    {
        let fwd = tcp4_backend.expect("measured above");
        let spec = Spec {
            dmac: net.eth1_mac,
            smac: net.backend_mac[&fwd.dst],
            src: fwd.dst,
            dst: CLIENT_V4.into(),
            proto: PROTO_TCP,
            sport: fwd.dport,
            dport: CLIENT_PORT,
            flags: TCP_ACK | TCP_PSH,
        };
        let mut case = fixed(net, &spec, net.eth1, XDP_REDIRECT, vec![(Stat::Reverse, 1)]);
        let (eth0_mac, client_mac) = (net.eth0_mac, net.client_mac);
        c.probe("nat reply IPv4", &mut case, &[(Stat::Reverse, 1)], |s| {
            let want = Seen {
                dmac: client_mac,
                smac: eth0_mac,
                src: VIP4_NAT.into(),
                sport: VIP_PORT,
                ttl: 63,
                ..Seen::of(&spec)
            };
            ensure!(*s == want, "output {s:?}, expected {want:?}");
            Ok(())
        })?;
        rows.push(c.interleaved(
            "nat reply TCP IPv4 (extra)",
            &mut case,
            calls,
            "backend → client: source back to the VIP, next hop from the reply cache".into(),
        )?);
    }

    // Calibration: the floor plus one insert of a random flow, nothing else. What recording
    // a flow costs in the kernel alone, to read the recorded new-flow rows against. Measured
    // first, into the emptiest table, so that it is not inflated by the rows' flows.
    let calibration = {
        let before = count_entries(c.bench.dp, map_names::FLOWS)?;
        let mut probe = Case {
            prog: Prog::InsertProbe,
            ..floor_case(net, 1)
        };
        let mut row = c.interleaved(
            "floor + one flow-table insert (calibration, extra)",
            &mut probe,
            calls,
            String::new(),
        )?;
        let grew = count_entries(c.bench.dp, map_names::FLOWS)? - before;
        let sent = args.runs * calls + args.warmup;
        // Random keys: a few repeat, and an evicting table (--flow-table) need not grow.
        ensure!(
            args.table.is_some() || grew * 100 >= sent * 99,
            "insert probe: {sent} calls but the flow table grew by only {grew}"
        );
        row.note = format!(
            "MAC swap + one LRU insert of a random flow: the kernel's cost of recording a flow, \
             {:.0} ns above the floor",
            median(&row.ns) - median(&row.floor)
        );
        row
    };

    // New flows: a distinct source address and port on every call, so every call misses.
    // Recorded rows: no record limit, every flow gets its entry (the LRU insert). Rows above
    // the record limit (dsr): limit 1 and this CPU's window saturated, so no call records.
    c.bench
        .dp
        .write_config(&zdd_common::Config {
            record_limit: 0,
            ..zdd_common::Config::default()
        })
        .context("writing the data-path config")?;
    let mut flows_before = count_entries(c.bench.dp, map_names::FLOWS)?;
    let mut new_flow_rows = Vec::new();
    let kinds = [
        ("new flow TCP IPv4 SYN, recorded", false, false, true),
        ("new flow TCP IPv6 SYN, recorded", true, false, true),
        (
            "new flow TCP IPv4 SYN, dsr, recorded (extra)",
            false,
            true,
            true,
        ),
        (
            "new flow TCP IPv4 SYN, dsr, above the record limit",
            false,
            true,
            false,
        ),
        (
            "new flow TCP IPv6 SYN, dsr, above the record limit",
            true,
            true,
            false,
        ),
    ];
    for (k, (name, v6, dsr, recorded)) in kinds.into_iter().enumerate() {
        if !recorded {
            saturate_record_window(c.bench.dp)?;
        }
        let vip: IpAddr = match (v6, dsr) {
            (false, false) => VIP4_NAT.into(),
            (true, false) => VIP6_NAT.into(),
            (false, true) => VIP4_DSR.into(),
            (true, true) => VIP6_DSR.into(),
        };
        // Each row its own source range: every flow of the benchmark is distinct.
        let base: u64 = (k as u64) << 22;
        let n = net.clone();
        let make = move |i: u64| -> Vec<u8> {
            let src: IpAddr = if v6 {
                Ipv6Addr::from((0xfd00_0064u128 << 96) + (base + i) as u128).into()
            } else {
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + (base + i) as u32).into()
            };
            frames::build(&Spec {
                sport: 1024 + ((i * 7919) % 64000) as u16,
                ..client_spec(&n, src, vip, PROTO_TCP, VIP_PORT, TCP_SYN)
            })
        };
        let per = if recorded {
            vec![(Stat::NewFlow, 1), (Stat::Forward, 1)]
        } else {
            vec![
                (Stat::NewFlow, 1),
                (Stat::Unrecorded, 1),
                (Stat::Forward, 1),
            ]
        };
        let mut case = Case {
            prog: Prog::Zdd,
            frames: Frames::Fresh(Box::new(make)),
            ingress: net.eth0,
            repeat: 1,
            verdict: XDP_REDIRECT,
            per_packet: per.clone(),
            next: 0,
        };
        let probe_src: IpAddr = if v6 {
            Ipv6Addr::from((0xfd00_0064u128 << 96) + base as u128).into()
        } else {
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + base as u32).into()
        };
        let probe_spec = Spec {
            sport: 1024,
            ..client_spec(net, probe_src, vip, PROTO_TCP, VIP_PORT, TCP_SYN)
        };
        c.probe(name, &mut case, &per, |s| {
            check_forward(net, &probe_spec, s, !dsr)
        })?;
        let row = c.interleaved(name, &mut case, calls, String::new())?;
        let after = count_entries(c.bench.dp, map_names::FLOWS)?;
        let made = case.next as usize;
        let want = if recorded { made } else { 0 };
        ensure!(
            args.table.is_some() || after - flows_before == want,
            "{name}: {made} new flows sent, {want} to be recorded, but the flow table grew by {}",
            after.saturating_sub(flows_before)
        );
        new_flow_rows.push((row, made, after, recorded));
        flows_before = after;
    }
    c.bench
        .dp
        .write_config(&zdd_common::Config::default())
        .context("writing the data-path config")?;
    for (mut row, made, after, recorded) in new_flow_rows {
        row.note = if recorded {
            format!(
                "{made} distinct flows, each recorded; table then held {after} of {table} \
                 entries{}",
                if args.table.is_some() {
                    " (LRU evicting)"
                } else {
                    " (no eviction)"
                }
            )
        } else {
            format!(
                "{made} distinct flows, none recorded (the path of a flood above \
                 new_flow_record_limit; Katran's reference skips its insert the same way above \
                 125,000 new flows/s per CPU)"
            )
        };
        rows.push(row);
    }
    rows.push(calibration);

    // Not for zdd: passes untouched.
    let pass_spec = Spec {
        sport: 51000,
        ..client_spec(
            net,
            CLIENT_V4.into(),
            net.backends[2].0.into(),
            PROTO_TCP,
            22,
            TCP_ACK | TCP_PSH,
        )
    };
    let pass_per = vec![(Stat::Pass, 1)];
    let mut pass = fixed(net, &pass_spec, net.eth0, XDP_PASS, pass_per.clone());
    c.probe("non-VIP", &mut pass, &pass_per, |s| {
        ensure!(*s == Seen::of(&pass_spec), "frame changed: {s:?}");
        Ok(())
    })?;
    rows.push(c.interleaved(
        "non-VIP, XDP_PASS",
        &mut pass,
        calls,
        "TCP to a backend's port 22: two port-array reads".into(),
    )?);
    // Extra: not a VIP, but to a VIP's port (the service hash lookup misses).
    let pass80_spec = Spec {
        dport: VIP_PORT,
        ..pass_spec
    };
    let mut pass80 = fixed(net, &pass80_spec, net.eth0, XDP_PASS, pass_per.clone());
    c.probe("non-VIP to port 80", &mut pass80, &pass_per, |s| {
        ensure!(*s == Seen::of(&pass80_spec), "frame changed: {s:?}");
        Ok(())
    })?;
    rows.push(c.interleaved(
        "non-VIP to a VIP port, XDP_PASS (extra)",
        &mut pass80,
        calls,
        "port 80 of a non-VIP address: plus one service-hash miss".into(),
    )?);

    // repeat = 10^6: valid for paths that leave the frame as it was.
    pass.repeat = BIG_REPEAT;
    let big = c.interleaved(
        "non-VIP, XDP_PASS, repeat 10^6",
        &mut pass,
        1,
        String::new(),
    )?;

    let floor_r1 = Row {
        name: "floor (MAC swap, XDP_TX)".into(),
        ns: c.floor_runs.clone(),
        floor: c.floor_runs.clone(),
        note: format!("all {} floor runs of this benchmark", c.floor_runs.len()),
    };
    let floor_big = Row {
        name: "floor, repeat 10^6".into(),
        ns: big.floor.clone(),
        floor: big.floor.clone(),
        note: String::new(),
    };
    let fwd_entries = count_entries(c.bench.dp, map_names::FLOWS)?;
    // The benchmark's program and maps go before the 1,000,000-flow memory probe loads.
    drop(dp);

    let mem = memory(&PathBuf::from(format!("/sys/fs/bpf/zdd-bench-{pid}-mem")))?;
    Ok(report(
        args,
        &floor_r1,
        &floor_big,
        &rows,
        &big,
        &mem,
        fwd_entries,
        table,
        &insns,
    ))
}

/// A forwarded frame: nat rewrote destination, port and TTL; dsr only the MACs. Either way
/// the MACs are a blue backend's and eth1's, and every checksum is right.
fn check_forward(net: &Net, spec: &Spec, s: &Seen, nat: bool) -> Result<()> {
    // blue = 100: the first two backends.
    let blue_ip: Vec<IpAddr> = net.backends[..2]
        .iter()
        .flat_map(|b| [IpAddr::V4(b.0), IpAddr::V6(b.1)])
        .collect();
    let blue_mac: Vec<[u8; 6]> = blue_ip.iter().map(|ip| net.backend_mac[ip]).collect();
    let mut want = Seen {
        dmac: s.dmac,
        smac: net.eth1_mac,
        ..Seen::of(spec)
    };
    if nat {
        ensure!(
            blue_ip.contains(&s.dst),
            "destination {} is not a blue backend",
            s.dst
        );
        want.dmac = net.backend_mac[&s.dst];
        want.dst = s.dst;
        want.dport = if spec.proto == PROTO_UDP {
            UDP_PORT
        } else {
            NAT_PORT
        };
        want.ttl -= 1;
    } else {
        ensure!(
            blue_mac.contains(&s.dmac),
            "dsr: destination MAC {} is not a blue backend's",
            mac_str(&s.dmac)
        );
    }
    ensure!(*s == want, "output {s:?}, expected {want:?}");
    Ok(())
}

fn count_entries(dp: &mut Dataplane, name: &str) -> Result<usize> {
    let map = dp
        .ebpf_mut()
        .map(name)
        .with_context(|| format!("no map {name}"))?;
    // Only keys are read; values are taken as raw bytes of the right size.
    let n = aya::maps::HashMap::<_, FlowKey, FlowEntry>::try_from(map)
        .with_context(|| format!("map {name}"))?
        .keys()
        .filter(|k| k.is_ok())
        .count();
    Ok(n)
}

/// Size of the loaded program: (xlated instructions, JIT bytes, verified instructions).
fn program_size(dp: &mut Dataplane) -> String {
    let info = dp
        .program_mut()
        .map_err(anyhow::Error::from)
        .and_then(|p| Ok(p.info()?));
    match info {
        Ok(i) => format!(
            "{} BPF instructions after the verifier, {} bytes of JIT code, {} instructions \
             verified",
            i.size_translated().unwrap_or(0) / 8,
            i.size_jitted(),
            i.verified_instruction_count().unwrap_or(0)
        ),
        Err(e) => format!("(program info unavailable: {e})"),
    }
}

/// `ZDD_BENCH_DUMP=DIR`: the loaded program's xlated and JIT code, by `bpftool`, for
/// looking at a slow path.
fn dump_program(dp: &mut Dataplane, dir: &Path) -> Result<()> {
    let id = dp
        .program_mut()?
        .info()
        .context("program info")?
        .id()
        .to_string();
    std::fs::create_dir_all(dir)?;
    for kind in ["xlated", "jited"] {
        let out = std::process::Command::new("bpftool")
            .args(["prog", "dump", kind, "id", &id])
            .output()
            .context("running bpftool")?;
        std::fs::write(dir.join(format!("zdd_xdp.{kind}")), &out.stdout)?;
    }
    eprintln!("program {id} dumped into {}", dir.display());
    Ok(())
}

/// The kernel's accounting of a map (`memlock:` in its fdinfo), with its max_entries.
fn map_memlock(pin: &Path) -> Result<(u64, u64)> {
    use std::os::fd::{AsFd, AsRawFd};
    let info = aya::maps::MapInfo::from_pin(pin)
        .with_context(|| format!("opening pinned map {}", pin.display()))?;
    let fd = info.fd().context("map fd")?;
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
    let field = |k: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .with_context(|| format!("no {k} in fdinfo of {}", pin.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{k} in fdinfo"))
    };
    Ok((field("memlock:")?, field("max_entries:")?))
}

struct Memory {
    flows: u64,
    entries: u64,
}

/// Loads a Dataplane with a 1,000,000-flow table and reads what the kernel charges for it.
fn memory(pin_dir: &Path) -> Result<Memory> {
    let dp = load(pin_dir, MEMORY_FLOWS)?;
    let dir = dp.0.pin_dir().to_path_buf();
    let (flows, e1) = map_memlock(&dir.join(map_names::FLOWS))?;
    ensure!(
        e1 == MEMORY_FLOWS as u64,
        "flow table has {e1} entries, asked for {MEMORY_FLOWS}"
    );
    Ok(Memory { flows, entries: e1 })
}

fn range(v: &[f64]) -> String {
    let (lo, hi) = min_max(v);
    format!("{lo:.0}–{hi:.0}")
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    floor: &Row,
    floor_big: &Row,
    rows: &[Row],
    big: &Row,
    mem: &Memory,
    fwd_entries: usize,
    table: u32,
    insns: &str,
) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n{} runs per path, {} repeat-1 calls per run{} (each call from the original frame; \
         ns = mean of the kernel-reported durations), CPU {}; floor runs interleaved with every \
         path's runs, × floor = median / median of the floor runs beside it.\n",
        args.runs,
        args.calls,
        if args.quick { " (--quick)" } else { "" },
        args.cpu
    );
    let _ = writeln!(
        o,
        "| path | ns/packet median | min–max | × floor | floor beside (ns) | notes |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    let mut line = |r: &Row, ratio: String| {
        let _ = writeln!(
            o,
            "| {} | {:.1} | {} | {} | {:.1} | {} |",
            r.name,
            median(&r.ns),
            range(&r.ns),
            ratio,
            median(&r.floor),
            r.note
        );
    };
    line(floor, "1.00".into());
    for r in rows {
        line(r, format!("{:.2}", r.ratio()));
    }
    line(floor_big, "(1.00)".into());
    line(big, format!("{:.2} × floor at 10^6", big.ratio()));
    let overhead = median(&floor.ns) - median(&floor_big.ns);
    let _ = writeln!(
        o,
        "\nper-call overhead of BPF_PROG_TEST_RUN (floor repeat 1 − floor repeat 10^6): {overhead:.1} ns"
    );
    let _ = writeln!(o, "zdd program: {insns}");

    // Targets from the issue, with Katran's ratios (BENCHMARKS.md) beside them.
    let katran = |name: &str| -> &str {
        match name {
            n if n.starts_with("established TCP IPv4") => "2.9",
            n if n.starts_with("established TCP IPv6") => "2.9",
            n if n.starts_with("established UDP IPv4") => "3.3",
            n if n.starts_with("new flow TCP IPv4") => "5.3",
            n if n.starts_with("new flow TCP IPv6") => "5.7",
            "non-VIP, XDP_PASS" => "1.7",
            n if n.starts_with("non-VIP, XDP_PASS, repeat") => "3.1 (vs floor at 10^6)",
            _ => "–",
        }
    };
    let _ = writeln!(o, "\n| target | path | × floor | Katran × floor | |");
    let _ = writeln!(o, "|---|---|---|---|---|");
    let mut target = |r: &Row, limit: f64| {
        let x = r.ratio();
        let _ = writeln!(
            o,
            "| ≤ {limit}× | {} | {x:.2} | {} | {} |",
            r.name,
            katran(&r.name),
            if x <= limit { "met" } else { "NOT MET" }
        );
    };
    for r in rows {
        if r.name.starts_with("established") {
            target(r, 2.5);
        } else if r.name.starts_with("new flow") {
            target(r, 4.5);
        } else if r.name == "non-VIP, XDP_PASS" {
            target(r, 1.3);
        }
    }
    target(big, 1.3);

    let per_flow = mem.flows as f64 / mem.entries as f64;
    let _ = writeln!(
        o,
        "\nflow-table memory (kernel accounting, `memlock` in fdinfo, a table of {} entries): \
         ZDD_FLOWS {:.1} MB → {per_flow:.0} bytes per flow (nat and dsr alike: replies need \
         no entry of their own), {:.1} MB for 1,000,000 flows (key {} B, value {} B)",
        mem.entries,
        mem.flows as f64 / 1e6,
        mem.flows as f64 / 1e6 * (1e6 / mem.entries as f64),
        std::mem::size_of::<FlowKey>(),
        std::mem::size_of::<FlowEntry>(),
    );
    let _ = writeln!(
        o,
        "flow table at the end of the benchmark: {fwd_entries} entries of {table} \
         (LRU)"
    );
    o
}

/// Sets every CPU's record-limit window as if the limit had been reached, with a start in
/// the far future so it never rolls over during the benchmark: every new dsr flow is then
/// forwarded unrecorded (with `record_limit` ≥ 1).
fn saturate_record_window(dp: &mut zdd_agent::maps::Dataplane) -> Result<()> {
    use aya::maps::{PerCpuArray, PerCpuValues};
    dp.write_config(&zdd_common::Config {
        record_limit: 1,
        ..zdd_common::Config::default()
    })
    .context("writing the data-path config")?;
    let map = dp
        .ebpf_mut()
        .map_mut(map_names::RECORDS)
        .context("the record-window map")?;
    let mut w: PerCpuArray<_, zdd_common::RecordWindow> = PerCpuArray::try_from(map)?;
    let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let full = zdd_common::RecordWindow {
        start_ns: u64::MAX,
        count: 1 << 62,
    };
    w.set(0, PerCpuValues::try_from(vec![full; n])?, 0)?;
    Ok(())
}
