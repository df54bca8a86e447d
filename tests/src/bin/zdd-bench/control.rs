//! `zdd-bench control [--quick]`: the control plane's costs, printed as numbers.
//! - request round trip (p50, p99) of `status` and `split` over the control socket;
//! - switch latency: from sending `switch` to the first new connection that lands on the new
//!   group (a prober in the client namespace opens connections back to back);
//! - rebuild and flip of a service with 1,000 backends (the agent's own map writer);
//! - counting active flows in a table of 1,000,000 flows.

use std::{
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use zdd_tests::{
    Agent, Lab, LabSpec, Node, VIP_V4,
    control::{Client, result},
    http_get,
    lab::enter_netns,
    packet::{FrameSpec, TestRunner},
};

struct Opts {
    quick: bool,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "web" (tcp, port 80) and "dns" (udp, port 53) on the lab's backends.
fn web(lab: &Lab) -> String {
    let mut s = zdd_tests::agent::web_service(lab, "blue = 100, green = 0");
    s += &format!(
        "\n[[services]]\nname = \"dns\"\nvip = \"{VIP_V4}:53\"\nprotocol = \"udp\"\nsplit = {{ blue = 100, green = 0 }}\n"
    );
    for b in lab.backends() {
        s += &format!(
            "\n[[services.backends]]\nname = \"{}\"\naddr = \"{}\"\ngroup = \"{}\"\n",
            b.name,
            b.udp_v4(),
            b.group
        );
    }
    s
}

fn round_trips(agent: &Agent, n: usize) -> Result<()> {
    let mut c = Client::connect(&agent.socket_path())?;
    let mut status = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let a = c.ask(r#"{"cmd":"status"}"#)?;
        status.push(ms(t.elapsed()));
        result(&a)?;
    }
    let mut split = Vec::with_capacity(n);
    for i in 0..n {
        let req = if i % 2 == 0 {
            r#"{"cmd":"split","service":"web","split":{"blue":60,"green":40}}"#
        } else {
            r#"{"cmd":"split","service":"web","split":{"blue":100,"green":0}}"#
        };
        let t = Instant::now();
        let a = c.ask(req)?;
        split.push(ms(t.elapsed()));
        result(&a)?;
    }
    println!(
        "request round trip, {n} each: status p50 {:.3} ms p99 {:.3} ms; split (validate, plan, \
         write, flip, persist with fsync, event) p50 {:.3} ms p99 {:.3} ms",
        pct(&mut status.clone(), 0.5),
        pct(&mut status, 0.99),
        pct(&mut split.clone(), 0.5),
        pct(&mut split, 0.99)
    );
    Ok(())
}

/// New flows opened back to back from the client namespace: (start time, group). TCP: a
/// connection and a request each; UDP: a datagram from a fresh socket each (a new flow at a
/// fraction of the cost, so a finer clock).
fn prober(
    lab: &Lab,
    udp: bool,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
) -> std::thread::JoinHandle<()> {
    let ns = lab.ns_name(Node::Client).to_string();
    let port = if udp { 53 } else { 80 };
    let vip = SocketAddr::new(VIP_V4.parse().unwrap_or([0, 0, 0, 0].into()), port);
    std::thread::spawn(move || {
        if enter_netns(&ns).is_err() {
            return;
        }
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let group = if udp {
                let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0") else {
                    continue;
                };
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 128];
                if s.connect(vip).is_err() || s.send(b"ping").is_err() {
                    continue;
                }
                match s.recv(&mut buf) {
                    Ok(n) => String::from_utf8_lossy(&buf[..n])
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("")
                        .to_string(),
                    Err(_) => continue,
                }
            } else {
                let Ok(mut s) = TcpStream::connect_timeout(&vip, Duration::from_secs(1)) else {
                    continue;
                };
                match http_get(&mut s, VIP_V4, "/") {
                    Ok(r) => r.group,
                    Err(_) => continue,
                }
            };
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((t, group));
        }
    })
}

fn switch_latency(lab: &Lab, agent: &Agent, rounds: usize, udp: bool) -> Result<()> {
    let service = if udp { "dns" } else { "web" };
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let p = prober(lab, udp, stop.clone(), seen.clone());
    let mut c = Client::connect(&agent.socket_path())?;
    let mut latency = Vec::new();
    let mut gaps = Vec::new();
    for i in 0..rounds {
        let to = if i % 2 == 0 { "green" } else { "blue" };
        std::thread::sleep(Duration::from_millis(30));
        let t0 = Instant::now();
        let a = c.ask(&format!(
            r#"{{"cmd":"switch","service":"{service}","to":"{to}"}}"#
        ))?;
        result(&a)?;
        std::thread::sleep(Duration::from_millis(30));
        let s = seen.lock().unwrap_or_else(|p| p.into_inner());
        let first = s.iter().find(|(t, g)| *t >= t0 && g == to);
        let Some((t, _)) = first else {
            bail!("round {i}: no new connection reached {to} within 30 ms of the switch");
        };
        latency.push(ms(t.duration_since(t0)));
        // The prober's resolution: the gap between connection starts around the switch.
        let before = s.iter().rev().find(|(t, _)| *t < t0).map(|x| x.0);
        if let Some(b) = before {
            gaps.push(ms(t.duration_since(b)));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = p.join();
    println!(
        "switch latency ({}), command sent -> first new flow started on the new group, {rounds} \
         switches: p50 {:.3} ms p99 {:.3} ms max {:.3} ms (prober resolution: a new flow every \
         {:.3} ms, median)",
        if udp {
            "udp, a datagram from a fresh socket"
        } else {
            "tcp, a connection and a request"
        },
        pct(&mut latency.clone(), 0.5),
        pct(&mut latency.clone(), 0.99),
        pct(&mut latency, 1.0),
        pct(&mut gaps, 0.5) / 2.0
    );
    Ok(())
}

fn big_service(backends: usize, green: u32) -> String {
    big_service_w(backends, green, 100)
}

/// `backends` backends, half blue half green; backend b0 has weight `w0`.
fn big_service_w(backends: usize, green: u32, w0: u32) -> String {
    let mut s = format!(
        "[agent]\ninterfaces = [\"eth0\"]\n\n[[services]]\nname = \"big\"\nvip = \"10.0.100.1:80\"\n\
         split = {{ blue = {}, green = {green} }}\n",
        100 - green
    );
    for i in 0..backends {
        let group = if i % 2 == 0 { "blue" } else { "green" };
        s += &format!(
            "\n[[services.backends]]\nname = \"b{i}\"\naddr = \"10.1.{}.{}:8080\"\ngroup = \"{group}\"\nweight = {}\n",
            i / 250,
            i % 250 + 1,
            if i == 0 { w0 } else { 100 }
        );
    }
    s
}

fn rebuild_and_flip(runs: usize) -> Result<()> {
    let mut t = TestRunner::load("ctlbench", 4096)?;
    let parse = |text: &str| -> Result<zdd_agent::state::DesiredState> {
        Ok(
            zdd_agent::config::parse(std::path::Path::new("bench.toml"), text)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .state,
        )
    };
    let time =
        |t: &mut TestRunner, states: &[zdd_agent::state::DesiredState]| -> Result<Vec<f64>> {
            let mut took = Vec::new();
            for i in 0..runs {
                let s = &states[(i + 1) % 2];
                let start = Instant::now();
                t.dp.apply(s).context("apply")?;
                took.push(ms(start.elapsed()));
            }
            Ok(took)
        };
    // A weight change: one group's Maglev table is rebuilt and written.
    let weights = [
        parse(&big_service_w(1000, 5, 100))?,
        parse(&big_service_w(1000, 5, 50))?,
    ];
    t.dp.apply(&weights[0]).context("first apply")?;
    let mut rebuild = time(&mut t, &weights)?;
    // A split change (a switch, a canary step): the tables are reused, only the split moves.
    let splits = [parse(&big_service(1000, 0))?, parse(&big_service(1000, 5))?];
    t.dp.apply(&splits[0]).context("first apply")?;
    let mut split = time(&mut t, &splits)?;
    println!(
        "1 service of 1,000 backends (2 groups, Maglev tables of 65,537 entries), {runs} changes \
         each: a weight change (plan, rebuild one group's Maglev table, write it and the split \
         table to the idle slot, flip) p50 {:.1} ms p99 {:.1} ms; a split change (tables \
         reused) p50 {:.2} ms p99 {:.2} ms",
        pct(&mut rebuild.clone(), 0.5),
        pct(&mut rebuild, 0.99),
        pct(&mut split.clone(), 0.5),
        pct(&mut split, 0.99)
    );
    Ok(())
}

fn count_flows(lab: &Lab, flows: u32) -> Result<()> {
    use zdd_agent::maps::flows::{CountRules, FlowTable};
    lab.in_ns(Node::Edge, || -> Result<()> {
        let mut t = TestRunner::load("ctlcount", flows * 2)?;
        t.apply_toml(&big_service(4, 50))?;
        let ifindex = lab.ifindex(Node::Edge, lab.edge_client_iface())?;
        let vip: SocketAddr = "10.0.100.1:80".parse()?;
        let fill = Instant::now();
        for i in 0..flows {
            // A distinct flow per call: 256 source ports on each of 4,096+ source addresses.
            let src = SocketAddr::from((
                [10, 200 + (i >> 24) as u8, (i >> 16) as u8, (i >> 8) as u8],
                (i & 0xff) as u16 + 1024,
            ));
            t.run(&FrameSpec::tcp(src, vip).build(), ifindex)?;
        }
        let filled = fill.elapsed();
        let table = FlowTable::open(t.dp.pin_dir())?;
        let rules = CountRules {
            now_ns: zdd_agent::maps::coarse_now_ns(),
            tcp_idle_ns: 3_600_000_000_000,
            udp_idle_ns: 30_000_000_000,
        };
        let mut took = Vec::new();
        let mut total = 0;
        for _ in 0..5 {
            let start = Instant::now();
            let c = table.count(&rules, &Default::default())?;
            took.push(ms(start.elapsed()));
            total = c.values().sum::<u64>();
        }
        ensure!(
            total as f64 >= flows as f64 * 0.99,
            "counted {total} of {flows} flows"
        );
        println!(
            "active-flow count of a table of {total} flows (BPF_MAP_LOOKUP_BATCH, 4,096 a call, on \
             the agent's counting thread): median {:.0} ms, min {:.0} ms (table filled by {flows} \
             SYNs through the program in {:.1} s)",
            pct(&mut took.clone(), 0.5),
            pct(&mut took, 0.0),
            filled.as_secs_f64()
        );
        Ok(())
    })
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage into a zeroed struct we own.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The agent's probe tasks (its own code) probing `n` HTTP backends every second, answered
/// by a zdd-lab-server in another process on loopback: the probing side's CPU share.
fn probe_cost(server: &std::path::Path, n: u16, secs: u64) -> Result<()> {
    use zdd_agent::{
        control::Intent,
        probe::Probers,
        state::{HealthKind, HealthSpec, Protocol},
    };
    let base = 20_000u16;
    let mut cmd = std::process::Command::new(server);
    cmd.args(["--name", "probe-target", "--group", "g"]);
    for i in 0..n {
        cmd.args(["--listen", &format!("127.0.0.1:{}", base + i)]);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting zdd-lab-server for the probes")?;
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", base + n - 1)).is_err() {
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "probe targets not listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ok, failed, cpu, wall) = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Intent>(4096);
        let mut h = HealthSpec::defaults(HealthKind::Http, Protocol::Tcp);
        h.path = "/healthz".into();
        let want = (0..n)
            .map(|i| {
                (
                    "svc".to_string(),
                    format!("b{i}"),
                    SocketAddr::from(([127, 0, 0, 1], base + i)),
                    h.clone(),
                )
            })
            .collect();
        let mut probers = Probers::default();
        probers.reconcile(want, &tx);
        // Warm up one round, then measure.
        tokio::time::sleep(Duration::from_secs(2)).await;
        while rx.try_recv().is_ok() {}
        let (c0, t0) = (cpu_time(), Instant::now());
        let (mut ok, mut failed) = (0u64, 0u64);
        let end = tokio::time::Instant::now() + Duration::from_secs(secs);
        while let Ok(Some(i)) = tokio::time::timeout_at(end, rx.recv()).await {
            if let Intent::Probe { result, .. } = i {
                if result.ok {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
        }
        (ok, failed, cpu_time() - c0, t0.elapsed())
    });
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "active probes: {n} HTTP backends every 1 s (jitter 100 ms), {} s: {ok} probes passed, \
         {failed} failed; the probing side used {:.1}% of one core ({:.0} us of CPU a probe)",
        secs,
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
        cpu.as_secs_f64() * 1e6 / (ok + failed).max(1) as f64
    );
    ensure!(
        failed == 0,
        "{failed} probes failed against a healthy target"
    );
    Ok(())
}

pub fn run(args: &[String]) -> Result<()> {
    let mut o = Opts { quick: false };
    for a in args {
        match a.as_str() {
            "--quick" => o.quick = true,
            _ => bail!("unknown argument {a:?} (use --quick)"),
        }
    }
    crate::e2e::point_at_sibling_binaries()?;
    let server = std::env::current_exe()?
        .parent()
        .context("executable folder")?
        .join("zdd-lab-server");
    let lab = Lab::new(LabSpec::with_server(server.clone())).context("building the lab")?;
    let agent = Agent::start(&lab, &web(&lab))?;
    let n = if o.quick { 200 } else { 1000 };
    round_trips(&agent, n)?;
    switch_latency(&lab, &agent, if o.quick { 20 } else { 100 }, false)?;
    switch_latency(&lab, &agent, if o.quick { 20 } else { 100 }, true)?;
    drop(agent);
    rebuild_and_flip(if o.quick { 5 } else { 20 })?;
    count_flows(&lab, if o.quick { 100_000 } else { 1_000_000 })?;
    probe_cost(&server, 1000, if o.quick { 3 } else { 10 })?;
    Ok(())
}
