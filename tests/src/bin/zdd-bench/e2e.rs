//! `zdd-bench e2e [--quick]`: real sockets through the lab. wrk in the client namespace, nginx on
//! four backends, four paths through the edge host measured in the same run, interleaved:
//! direct kernel routing to one backend (the base), nftables DNAT with conntrack, zdd nat and
//! zdd dsr (the real `zdd-agent`). Two loads: keep-alive and a new connection per request.
//! Method and traps: BENCHMARKS.md in the design notes.
//!
//! Replies: the lab's backends route to the client via the edge host, except during dsr checks
//! and runs, when they route via the lab's return router (replies bypass the edge: what dsr is
//! for; nat replies must pass the edge to be translated back, so they stay there). The direct
//! base is a second nginx on blue-1 with one worker per backend of the balanced paths (4), so
//! that every path has the same number of nginx workers to spread its load over.

#[path = "e2e_nft.rs"]
mod nft;
#[path = "e2e_nginx.rs"]
mod nginx;
#[path = "e2e_return.rs"]
mod ret;
#[path = "e2e_wrk.rs"]
mod wrk;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use zdd_tests::{Agent, Lab, LabSpec, Node, VIP_V4, connect_and_get};

use wrk::WrkResult;

/// Where nginx listens on every backend (and so the dsr VIP's port: dsr does not rewrite ports).
const BACKEND_PORT: u16 = 8080;
/// The nat service and the nftables DNAT share this VIP (never at the same time).
/// (The lab tests' VIP, [`VIP_V4`]; `run` checks that they agree.)
const NAT_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 100, 1), 80);
const DSR_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 100, 2), BACKEND_PORT);
/// The backend the direct path goes to, and the port of its second nginx, the one with as many
/// workers as the lab has backends (the balanced paths spread their load over that many).
const DIRECT_BACKEND: &str = "blue-1";
const DIRECT_PORT: u16 = 8081;
/// During a dsr run, the edge may see at most this share of the frames it forwards coming back
/// from the backends' side (ARP and the like); replies through the edge made it about 1:1.
const DSR_MAX_RETURN_SHARE: f64 = 0.05;
/// The split of the zdd services and of the nftables map (every backend weighs 100).
const SPLIT: &[(&str, u32)] = &[("blue", 50), ("green", 50)];
const WEIGHT: u32 = 100;
/// Source of the checks made before each path's runs; runs use 10.0.1.100 and up, one each.
const CHECK_SOURCE: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 99);
const FIRST_RUN_SOURCE: u8 = 100;
const LAST_RUN_SOURCE: u8 = 250;
/// A run is started on a busy machine when more than this many CPUs were busy (others' work,
/// steal included) in the sample window just before it, while nothing of the bench ran.
const BUSY_CPUS: f64 = 1.5;
const LOAD_WINDOW: Duration = Duration::from_secs(2);
/// How long to wait for a busy machine to calm down before the one redo.
const BUSY_WAIT: Duration = Duration::from_secs(30);
const CHECK_REQUESTS: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PathKind {
    Direct,
    Nftables,
    ZddNat,
    ZddDsr,
}

impl PathKind {
    const ALL: [PathKind; 4] = [
        PathKind::Direct,
        PathKind::Nftables,
        PathKind::ZddNat,
        PathKind::ZddDsr,
    ];

    fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct (kernel routing to blue-1, 4 nginx workers, no XDP)",
            PathKind::Nftables => "nftables DNAT (numgen weight map, conntrack)",
            PathKind::ZddNat => "zdd nat",
            PathKind::ZddDsr => "zdd dsr (replies via the return router)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Nftables => "nftables",
            PathKind::ZddNat => "zdd nat",
            PathKind::ZddDsr => "zdd dsr",
        }
    }

    /// dsr replies bypass the edge (via the lab's return router); every other path's replies
    /// pass it (nat and nftables: to be translated back).
    fn replies_via_router(self) -> bool {
        matches!(self, PathKind::ZddDsr)
    }

    fn target(self, lab: &Lab) -> SocketAddr {
        match self {
            PathKind::Direct => {
                SocketAddr::new(lab.backend(DIRECT_BACKEND).ipv4.into(), DIRECT_PORT)
            }
            PathKind::Nftables | PathKind::ZddNat => NAT_VIP.into(),
            PathKind::ZddDsr => DSR_VIP.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LoadKind {
    KeepAlive,
    Close,
}

impl LoadKind {
    const ALL: [LoadKind; 2] = [LoadKind::KeepAlive, LoadKind::Close];

    fn label(self) -> &'static str {
        match self {
            LoadKind::KeepAlive => "keep-alive",
            LoadKind::Close => "new connection per request",
        }
    }
}

/// What the paths are set up by: one setup may serve several paths (the agent serves both zdd
/// services).
#[derive(Debug, Clone, Copy)]
enum Setup {
    Direct,
    Nftables,
    Zdd,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::Direct, Setup::Nftables, Setup::Zdd];

    fn paths(self) -> &'static [PathKind] {
        match self {
            Setup::Direct => &[PathKind::Direct],
            Setup::Nftables => &[PathKind::Nftables],
            Setup::Zdd => &[PathKind::ZddNat, PathKind::ZddDsr],
        }
    }
}

struct Opts {
    quick: bool,
    secs: u32,
    rounds: usize,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut quick = false;
        let mut rounds = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => quick = true,
                "--rounds" => {
                    let v = it.next().context("--rounds needs a number")?;
                    let n: usize = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=20).contains(n))
                        .with_context(|| format!("--rounds {v:?}: use 1 to 20"))?;
                    rounds = Some(n);
                }
                "-h" | "--help" => {
                    println!(
                        "zdd-bench e2e [--quick] [--rounds N]: wrk through the lab, direct vs \
                         nftables vs zdd nat/dsr\n  --quick   3 s runs, one round (default: 10 s \
                         runs, 3 rounds)\n  --rounds  rounds of interleaved runs (1..20)"
                    );
                    std::process::exit(0);
                }
                _ => bail!("unknown argument {a:?} (use --quick, --rounds N)"),
            }
        }
        Ok(Opts {
            quick,
            secs: if quick { 3 } else { 10 },
            rounds: rounds.unwrap_or(if quick { 1 } else { 3 }),
        })
    }
}

/// The machine's load before a run: the 1-minute load average, and how many CPUs were busy
/// (user, system, interrupts, steal) during a short window in which the bench itself was idle.
/// The load average also holds the bench's own previous runs (back to back they keep it near 2
/// on 2 cores), so "busy" is judged on the window.
#[derive(Debug, Clone, Copy)]
struct LoadSample {
    avg1: f64,
    busy_cpus: f64,
}

impl LoadSample {
    fn busy(&self) -> bool {
        self.busy_cpus > BUSY_CPUS
    }
}

fn cpu_times() -> Result<(u64, u64, usize)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ncpu = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8) // user nice system idle iowait irq softirq steal (guest is inside user)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(v.len() == 8, "unexpected /proc/stat: {line}");
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Ok((total - idle, total, ncpu.max(1)))
}

fn sample_load() -> Result<LoadSample> {
    let text = std::fs::read_to_string("/proc/loadavg")?;
    let avg1 = text
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .context("reading /proc/loadavg")?;
    let (b0, t0, n) = cpu_times()?;
    std::thread::sleep(LOAD_WINDOW);
    let (b1, t1, _) = cpu_times()?;
    let busy_cpus = if t1 > t0 {
        (b1 - b0) as f64 / (t1 - t0) as f64 * n as f64
    } else {
        0.0
    };
    Ok(LoadSample { avg1, busy_cpus })
}

/// Fresh client source addresses, one per run.
struct Sources {
    next: u8,
}

impl Sources {
    fn fresh(&mut self, lab: &Lab) -> Result<Ipv4Addr> {
        ensure!(
            self.next <= LAST_RUN_SOURCE,
            "out of fresh client source addresses"
        );
        let a = Ipv4Addr::new(10, 0, 1, self.next);
        self.next += 1;
        lab.set_client_source_v4(a)?;
        Ok(a)
    }
}

/// zdd's data-path counters (from `zdd stats`).
type Counters = BTreeMap<String, u64>;

fn xdp_counters(agent: &Agent) -> Result<Counters> {
    let out = agent.zdd(&["stats"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect())
}

fn counters_delta(before: &Counters, after: &Counters) -> Counters {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

struct RunRecord {
    /// Round the run belongs to (ratios pair each run with the same round's direct run).
    round: usize,
    path: PathKind,
    load: LoadKind,
    before: LoadSample,
    /// The first attempt was started on a busy machine and discarded.
    redone: bool,
    wrk: WrkResult,
}

struct Bench<'a> {
    lab: &'a Lab,
    opts: &'a Opts,
    round: usize,
    sources: Sources,
    runs: Vec<RunRecord>,
    /// Problems found by the checks, for the summary.
    problems: Vec<String>,
}

impl Bench<'_> {
    /// One wrk run on a fresh source address, after a load sample; redone once (after waiting
    /// for the machine to calm down) if it would start on a busy machine.
    fn measure(
        &mut self,
        path: PathKind,
        load: LoadKind,
        agent: Option<&Agent>,
    ) -> Result<&RunRecord> {
        let mut before = sample_load()?;
        let mut redone = false;
        if before.busy() {
            println!(
                "  busy machine before {} {} (load avg {:.2}, {:.2} CPUs busy): run discarded; \
                 redoing it once, after up to {} s for the machine to calm down",
                path.short(),
                load.label(),
                before.avg1,
                before.busy_cpus,
                BUSY_WAIT.as_secs()
            );
            let start = Instant::now();
            while before.busy() && start.elapsed() < BUSY_WAIT {
                before = sample_load()?;
            }
            redone = true;
        }
        let src = self.sources.fresh(self.lab)?;
        let url = format!("http://{}/", path.target(self.lab));
        ret::expect_return_via_router(self.lab, path.replies_via_router())?;
        let xdp_before = agent.map(xdp_counters).transpose()?;
        let frames_before = ret::ReturnFrames::read(self.lab)?;
        let (wrk, text) = wrk::run(self.lab, &url, self.opts.secs, load == LoadKind::Close)?;
        let frames = ret::ReturnFrames::read(self.lab)?.since(frames_before);
        let mut line = format!(
            "  {:<9} {:<27} src {src:<11} load {:.2} busy {:.2}{}: {:>9.0} req/s  p50 {}  p99 {}  errors {}",
            path.short(),
            load.label(),
            before.avg1,
            before.busy_cpus,
            if before.busy() { " (STILL BUSY)" } else { "" },
            wrk.rps,
            fmt_us(wrk.p50_us),
            fmt_us(wrk.p99_us),
            wrk.errors(),
        );
        let _ = write!(
            line,
            "\n            frames from the backends' side: edge eth1 +{}, return router +{}",
            frames.edge, frames.router
        );
        if let (Some(agent), Some(b)) = (agent, xdp_before) {
            let d = counters_delta(&b, &xdp_counters(agent)?);
            let show: Vec<String> = d.iter().map(|(k, v)| format!("{k} +{v}")).collect();
            let _ = write!(line, "\n            xdp: {}", show.join(", "));
            let forwarded = d.get("forward").copied().unwrap_or(0);
            if forwarded < wrk.requests {
                let p = format!(
                    "{} {}: only {forwarded} frames forwarded by XDP for {} requests: the \
                     traffic did not take zdd's path",
                    path.short(),
                    load.label(),
                    wrk.requests
                );
                let _ = write!(line, "\n            WARNING: {p}");
                self.problems.push(p);
            }
            if path == PathKind::ZddDsr {
                // Replies through the edge: XDP passes each to the kernel (`pass` ~ `forward`)
                // and eth1 receives them. Via the router neither grows.
                let passed = d.get("pass").copied().unwrap_or(0);
                let limit = (forwarded as f64 * DSR_MAX_RETURN_SHARE) as u64;
                if passed > limit || frames.edge > limit {
                    let p = format!(
                        "dsr {}: the edge still saw the replies (XDP pass +{passed}, eth1 rx \
                         +{} frames, for forward +{forwarded})",
                        load.label(),
                        frames.edge
                    );
                    let _ = write!(line, "\n            WARNING: {p}");
                    self.problems.push(p);
                }
            }
        }
        println!("{line}");
        if wrk.errors() > 0 || wrk.requests == 0 {
            println!("            wrk said:\n{text}");
            self.problems.push(format!(
                "{} {} from {src}: {} requests, {} socket errors, {} non-2xx/3xx",
                path.short(),
                load.label(),
                wrk.requests,
                wrk.socket_errors,
                wrk.bad_status
            ));
        }
        self.runs.push(RunRecord {
            round: self.round,
            path,
            load,
            before,
            redone,
            wrk,
        });
        Ok(self.runs.last().expect("just pushed"))
    }

    /// A few new connections through the path from [`CHECK_SOURCE`]: every answer must be a 200
    /// from an expected backend that saw the client's own address. Returns a summary.
    fn check(&self, path: PathKind) -> Result<String> {
        self.lab.set_client_source_v4(CHECK_SOURCE)?;
        ret::expect_return_via_router(self.lab, path.replies_via_router())?;
        let target = path.target(self.lab);
        let answers = self.lab.in_ns(Node::Client, || {
            (0..CHECK_REQUESTS)
                .map(|_| connect_and_get(target))
                .collect::<Vec<_>>()
        });
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for a in answers {
            let r = a?;
            ensure!(r.status == 200, "status {} from {}", r.status, r.backend);
            let body = String::from_utf8_lossy(&r.body);
            let client = body.split_whitespace().nth(1).unwrap_or("");
            ensure!(
                client == CHECK_SOURCE.to_string(),
                "{} saw the client as {client:?}, not {CHECK_SOURCE}",
                r.backend
            );
            *seen.entry(r.backend).or_default() += 1;
        }
        if path == PathKind::Direct {
            ensure!(
                seen.keys().all(|b| b == DIRECT_BACKEND),
                "direct answers from {seen:?}"
            );
        }
        Ok(seen
            .iter()
            .map(|(b, n)| format!("{b} {n}"))
            .collect::<Vec<_>>()
            .join(", "))
    }

    fn check_or_report(&mut self, path: PathKind, agent: Option<&Agent>) -> Result<()> {
        match self.check(path) {
            Ok(s) => {
                println!(
                    "  check {}: {CHECK_REQUESTS} new connections from {CHECK_SOURCE} -> {}: {s}",
                    path.short(),
                    path.target(self.lab)
                );
                Ok(())
            }
            Err(e) if agent.is_some() => {
                // zdd is under development: measure and report rather than stop.
                let p = format!("{} does not work end to end: {e:#}", path.short());
                println!("  CHECK FAILED: {p}");
                if let Some(agent) = agent {
                    if let Ok(c) = xdp_counters(agent) {
                        println!("  zdd stats: {c:?}");
                    }
                    let log = agent.log();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    println!("  agent log (last lines):");
                    for l in tail.iter().rev() {
                        println!("    {l}");
                    }
                }
                self.problems.push(p);
                Ok(())
            }
            Err(e) => Err(e.context(format!("the {} path does not work", path.short()))),
        }
    }

    fn setup_and_run(&mut self, setup: Setup) -> Result<()> {
        // What a path must not run through: XDP for direct and nftables, nftables for direct
        // and zdd (each setup's guard removed its part before the next setup).
        edge_clean(
            self.lab,
            !matches!(setup, Setup::Zdd),
            !matches!(setup, Setup::Nftables),
        )?;
        match setup {
            Setup::Direct => {
                self.check_or_report(PathKind::Direct, None)?;
                for load in LoadKind::ALL {
                    self.measure(PathKind::Direct, load, None)?;
                }
            }
            Setup::Nftables => {
                let _rules = nft::NftDnat::load(self.lab, &nft_rules(self.lab)?)?;
                self.check_or_report(PathKind::Nftables, None)?;
                for load in LoadKind::ALL {
                    self.measure(PathKind::Nftables, load, None)?;
                }
                // `_rules` deletes the table here, before any other path runs.
            }
            Setup::Zdd => {
                let mut agent = Agent::start(self.lab, &zdd_services(self.lab))
                    .context("starting zdd-agent")?;
                for p in setup.paths() {
                    let _via = return_path(self.lab, *p)?;
                    self.check_or_report(*p, Some(&agent))?;
                }
                for load in LoadKind::ALL {
                    for p in setup.paths() {
                        let _via = return_path(self.lab, *p)?;
                        self.measure(*p, load, Some(&agent))?;
                        // `_via` routes the replies via the edge again here.
                    }
                }
                let st = agent.stop()?;
                if !st.success() {
                    self.problems
                        .push(format!("zdd-agent exited with {st}:\n{}", agent.log()));
                }
            }
        }
        Ok(())
    }
}

/// Routes the backends' replies the way the path needs until the guard is dropped: via the
/// return router for dsr, via the edge (the lab's default) for the rest.
fn return_path(lab: &Lab, path: PathKind) -> Result<Option<ret::ViaRouter<'_>>> {
    if path.replies_via_router() {
        Ok(Some(ret::ViaRouter::new(lab)?))
    } else {
        Ok(None)
    }
}

/// Errors if the edge host has an XDP program attached (`no_xdp`) or any nftables table
/// (`no_nft`).
fn edge_clean(lab: &Lab, no_xdp: bool, no_nft: bool) -> Result<()> {
    if no_xdp {
        for iface in [lab.edge_client_iface(), lab.edge_backend_iface()] {
            let out = lab.ip(Node::Edge, &["-d", "link", "show", "dev", iface])?;
            ensure!(
                !out.split_whitespace().any(|w| w.starts_with("xdp")),
                "an XDP program is still attached to the edge's {iface}:\n{out}"
            );
        }
    }
    if no_nft {
        let out = lab.exec(Node::Edge, &["nft", "list", "ruleset"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.trim().is_empty(),
            "nftables rules are still loaded on the edge:\n{text}"
        );
    }
    Ok(())
}

/// Each backend's share of new flows, in percent: the group's split times the backend's share
/// of its group's weight.
fn shares(lab: &Lab) -> Vec<(SocketAddrV4, u32)> {
    let mut out: Vec<(SocketAddrV4, u32)> = Vec::new();
    for (group, pct) in SPLIT {
        let members: Vec<_> = lab
            .backends()
            .iter()
            .filter(|b| b.group == *group)
            .collect();
        let total = WEIGHT * members.len() as u32;
        let mut given = 0;
        for (i, b) in members.iter().enumerate() {
            let s = if i + 1 == members.len() {
                pct - given
            } else {
                pct * WEIGHT / total
            };
            given += s;
            out.push((SocketAddrV4::new(b.ipv4, BACKEND_PORT), s));
        }
    }
    out
}

fn nft_rules(lab: &Lab) -> Result<String> {
    nft::ruleset(NAT_VIP, &shares(lab))
}

/// The agent's services: nat on NAT_VIP and dsr on DSR_VIP, the same backends and split.
fn zdd_services(lab: &Lab) -> String {
    let split: Vec<String> = SPLIT.iter().map(|(g, p)| format!("{g} = {p}")).collect();
    let mut s = String::new();
    for (name, vip, fwd) in [("bench-nat", NAT_VIP, "nat"), ("bench-dsr", DSR_VIP, "dsr")] {
        let _ = write!(
            s,
            "[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"tcp\"\n\
             forwarding = \"{fwd}\"\nsplit = {{ {} }}\n",
            split.join(", ")
        );
        for b in lab.backends() {
            let _ = write!(
                s,
                "\n[[services.backends]]\nname = \"{}\"\naddr = \"{}:{BACKEND_PORT}\"\n\
                 group = \"{}\"\nweight = {WEIGHT}\n",
                b.name, b.ipv4, b.group
            );
        }
        s.push('\n');
    }
    s
}

fn fmt_us(us: f64) -> String {
    if us.is_nan() {
        "-".into()
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Summary {
    rps: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    max_avg1: f64,
    max_busy: f64,
    redone: usize,
    /// Runs started on a busy machine even after the wait.
    busy: usize,
}

fn summarize(runs: &[RunRecord], path: PathKind, load: LoadKind) -> Summary {
    let mine: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| r.path == path && r.load == load)
        .collect();
    let f = |g: fn(&RunRecord) -> f64| median(mine.iter().map(|r| g(r)).collect());
    Summary {
        rps: f(|r| r.wrk.rps),
        p50: f(|r| r.wrk.p50_us),
        p99: f(|r| r.wrk.p99_us),
        errors: mine.iter().map(|r| r.wrk.errors()).sum(),
        max_avg1: mine.iter().map(|r| r.before.avg1).fold(0.0, f64::max),
        max_busy: mine.iter().map(|r| r.before.busy_cpus).fold(0.0, f64::max),
        redone: mine.iter().filter(|r| r.redone).count(),
        busy: mine.iter().filter(|r| r.before.busy()).count(),
    }
}

fn fmt_rps(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn report(bench: &Bench, opts: &Opts) {
    let mut table: BTreeMap<(LoadKind, PathKind), Summary> = BTreeMap::new();
    for load in LoadKind::ALL {
        for path in PathKind::ALL {
            table.insert((load, path), summarize(&bench.runs, path, load));
        }
    }
    // Each path's run against the direct run of the same round, then the median over rounds:
    // pairs runs made close together, so slow drifts of the shared machine cancel.
    let ratio = |load: LoadKind, path: PathKind| {
        let rps = |p: PathKind, round: usize| {
            bench
                .runs
                .iter()
                .find(|r| r.path == p && r.load == load && r.round == round)
                .map(|r| r.wrk.rps)
        };
        median(
            (0..opts.rounds)
                .filter_map(|round| {
                    Some(rps(path, round)? / rps(PathKind::Direct, round)?.max(f64::MIN_POSITIVE))
                })
                .collect(),
        )
    };

    println!();
    println!(
        "## zdd end to end: {} runs",
        if opts.quick { "quick" } else { "full" }
    );
    println!();
    for load in LoadKind::ALL {
        let close = if load == LoadKind::Close {
            " -H 'Connection: close'"
        } else {
            ""
        };
        println!(
            "### {} (`wrk -t2 -c50 -d{}s --latency{close}`, median of {})",
            load.label(),
            opts.secs,
            opts.rounds
        );
        println!();
        println!(
            "| path | load | req/s | p50 | p99 | errors | × direct (median of per-round ratios) |"
        );
        println!("|---|---|---|---|---|---|---|");
        for path in PathKind::ALL {
            let s = &table[&(load, path)];
            let mut redo = String::new();
            if s.redone > 0 {
                let _ = write!(redo, ", {} redone", s.redone);
            }
            if s.busy > 0 {
                let _ = write!(redo, ", {} started BUSY", s.busy);
            }
            println!(
                "| {} | {:.2} ({:.2} busy{redo}) | {} | {} | {} | {} | {:.2} |",
                path.label(),
                s.max_avg1,
                s.max_busy,
                fmt_rps(s.rps),
                fmt_us(s.p50),
                fmt_us(s.p99),
                s.errors,
                ratio(load, path)
            );
        }
        println!();
    }
    println!(
        "load: the highest 1-minute load average seen before the path's runs, and in brackets the \
         most CPUs that were busy (steal included) in the {} s before a run while the bench was \
         idle. A run is discarded and redone once when that exceeds {BUSY_CPUS} of {} CPUs (the \
         load average also counts this bench's own previous runs). errors: socket errors + \
         non-2xx/3xx responses, summed over the runs; p50/p99 are medians of the runs'.",
        LOAD_WINDOW.as_secs(),
        cpu_times().map(|c| c.2).unwrap_or(0),
    );
    println!(
        "Each run used a fresh client source address (10.0.1.{FIRST_RUN_SOURCE} and up, made the \
         default route's src in the client namespace, since wrk cannot bind): so no run meets the \
         TIME_WAIT sockets an earlier run left on the backends. Client namespace: \
         ip_local_port_range {}, tcp_tw_reuse {}.",
        client_sysctl(bench.lab, "net/ipv4/ip_local_port_range"),
        client_sysctl(bench.lab, "net/ipv4/tcp_tw_reuse"),
    );
    println!();

    println!("### Targets");
    println!();
    let line = |what: String, ok: bool| {
        println!("- {what}: {}", if ok { "met" } else { "NOT met" });
    };
    let nat_ka = ratio(LoadKind::KeepAlive, PathKind::ZddNat);
    let nat_cl = ratio(LoadKind::Close, PathKind::ZddNat);
    line(
        format!("zdd nat ≥ 0.95× direct with keep-alive: {nat_ka:.2}×"),
        nat_ka >= 0.95,
    );
    line(
        format!("zdd nat ≥ 0.90× direct with a new connection per request: {nat_cl:.2}×"),
        nat_cl >= 0.90,
    );
    for load in LoadKind::ALL {
        let nat = ratio(load, PathKind::ZddNat);
        let dsr = ratio(load, PathKind::ZddDsr);
        let nft = ratio(load, PathKind::Nftables);
        line(
            format!(
                "{}: zdd dsr above zdd nat: {dsr:.2}× vs {nat:.2}×",
                load.label()
            ),
            dsr > nat,
        );
        line(
            format!(
                "{}: zdd nat and dsr above nftables: {nat:.2}× and {dsr:.2}× vs {nft:.2}×",
                load.label()
            ),
            nat > nft && dsr > nft,
        );
    }
    if !bench.problems.is_empty() {
        println!();
        println!("### Problems seen");
        println!();
        for p in &bench.problems {
            println!("- {p}");
        }
    }
}

fn client_sysctl(lab: &Lab, key: &str) -> String {
    lab.in_ns(Node::Client, || {
        std::fs::read_to_string(format!("/proc/sys/{key}"))
    })
    .map(|s| s.split_whitespace().collect::<Vec<_>>().join("-"))
    .unwrap_or_else(|e| format!("? ({e})"))
}

/// `Agent` finds `zdd-agent` and `zdd` through `workspace_bin`, which looks one folder above
/// the running executable (right for test binaries in target/<profile>/deps); this bench runs
/// from target/<profile>/ itself, beside them.
pub(crate) fn point_at_sibling_binaries() -> Result<()> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable folder")?;
    for (name, var) in [("zdd-agent", "ZDD_ZDD_AGENT_BIN"), ("zdd", "ZDD_ZDD_BIN")] {
        if std::env::var_os(var).is_some() {
            continue;
        }
        let p: PathBuf = dir.join(name);
        ensure!(
            p.is_file(),
            "{} is not built (run `cargo xtask bench e2e`)",
            p.display()
        );
        // SAFETY: called first thing in `run`, before this process starts any thread.
        unsafe { std::env::set_var(var, &p) };
    }
    Ok(())
}

pub fn run(args: &[String]) -> Result<()> {
    let opts = Opts::parse(args)?;
    ensure!(NAT_VIP.ip().to_string() == VIP_V4, "NAT_VIP is not VIP_V4");
    point_at_sibling_binaries()?;
    let started = Instant::now();
    println!(
        "zdd-bench e2e{}: {} round(s) of {} s runs; paths interleaved, every run from a fresh \
         client source address",
        if opts.quick { " --quick" } else { "" },
        opts.rounds,
        opts.secs
    );

    // The lab's own zdd-lab-server would hold port 8080: none is started (server_bin None).
    let lab = Lab::new(LabSpec::default().with_return_router(true)).context("building the lab")?;
    for b in lab.backends() {
        lab.add_vip_on_backend_lo(&b.name, (*DSR_VIP.ip()).into())?;
    }
    let _nginx = nginx::Nginx::start(&lab, BACKEND_PORT)?;
    let workers = lab.backends().len() as u32;
    let direct = std::slice::from_ref(lab.backend(DIRECT_BACKEND));
    let _nginx_direct = nginx::Nginx::start_on(&lab, direct, DIRECT_PORT, workers)?;
    println!(
        "lab {}: {} backends with nginx (1 worker, keepalive_requests 1000000, access_log off) \
         on :{BACKEND_PORT}; dsr VIP {} on each backend's lo; split {}, weight {WEIGHT} each",
        lab.prefix(),
        lab.backends().len(),
        DSR_VIP.ip(),
        SPLIT
            .iter()
            .map(|(g, p)| format!("{g} {p}%"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "direct base: a second nginx on {DIRECT_BACKEND} :{DIRECT_PORT} with {workers} workers \
         (reuseport), as many as the balanced paths spread their load over (one on each \
         backend); before, the base had one worker, so a single process's scheduling could \
         limit the base alone (the worker count is the only change)"
    );
    println!(
        "replies: via the edge host for direct, nftables and zdd nat (the edge translates nat \
         replies back); via the lab's return router ({} on the backends' bridge, a second link \
         to the client) for zdd dsr, so dsr replies bypass the edge as dsr is meant to; the \
         backends' route to {} is switched around each dsr check and run",
        zdd_tests::lab::ROUTER_BACKEND_V4,
        zdd_tests::lab::CLIENT_NET_V4
    );

    let mut bench = Bench {
        lab: &lab,
        opts: &opts,
        round: 0,
        sources: Sources {
            next: FIRST_RUN_SOURCE,
        },
        runs: Vec::new(),
        problems: Vec::new(),
    };
    for round in 0..opts.rounds {
        println!("round {}/{}", round + 1, opts.rounds);
        bench.round = round;
        // Rotate which setup goes first, so that no path always follows the same one.
        for i in 0..Setup::ALL.len() {
            let setup = Setup::ALL[(round + i) % Setup::ALL.len()];
            bench.setup_and_run(setup)?;
        }
    }
    report(&bench, &opts);
    println!();
    println!("(took {:.0} s)", started.elapsed().as_secs_f64());
    Ok(())
}
