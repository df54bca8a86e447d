//! `cargo xtask demo`: the lab, the agent, live traffic, and a split moving from blue to
//! green in steps driven by the `zdd` command-line client, ending with a blue-green switch
//! and a rollback. Prints each command, then, each second, how many answers came from each
//! group and how many requests failed; one keep-alive connection shows that established
//! flows stay put. Then a canary with automated analysis, followed live by `zdd canary`,
//! which the agent rolls back on its own when green starts resetting its clients.

use std::{
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use zdd_tests::{
    Agent, Lab, LabSpec, Node, VIP_V4, agent::workspace_bin, connect_and_get, http_get,
};

/// Each step: the `zdd` command (after `--socket PATH`) and the split it leads to.
const STEPS: [(&[&str], (u32, u32)); 7] = [
    (&[], (100, 0)),
    (&["split", "web", "blue=90", "green=10"], (90, 10)),
    (&["split", "web", "blue=75", "green=25"], (75, 25)),
    (&["split", "web", "blue=50", "green=50"], (50, 50)),
    (&["switch", "web", "--to", "green"], (0, 100)),
    (&["rollback", "web"], (50, 50)),
    (&["rollback", "web"], (75, 25)),
];
const SECONDS_PER_STEP: u64 = 2;

#[derive(Default)]
struct Counts {
    blue: AtomicU64,
    green: AtomicU64,
    failed: AtomicU64,
}

/// "web" with HTTP health checks every 500 ms.
fn services(lab: &Lab, blue: u32, green: u32) -> String {
    zdd_tests::agent::web_service(lab, &format!("blue = {blue}, green = {green}")).replacen(
        "\n\n[[services.backends]]",
        "\n[services.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"500ms\"\n\n[[services.backends]]",
        1,
    )
}

fn main() -> ExitCode {
    // The message alone: with RUST_BACKTRACE set, returning the error would print a
    // backtrace of the demo itself above what to do.
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    zdd_tests::lab::preflight()
        .map_err(|e| anyhow::anyhow!("the demo needs root and a network-namespace lab: {e}"))?;
    // The agent pins under /sys/fs/bpf/<lab>: a fresh machine may have no bpffs there yet.
    zdd_tests::lab::ensure_bpffs_and_say(std::path::Path::new("/sys/fs/bpf"), "zdd demo")?;
    println!("zdd demo: building the lab (client, edge host, blue-1, blue-2, green-1, green-2)");
    let lab = Lab::new(LabSpec::with_server(workspace_bin("zdd-lab-server")))?;
    let mut agent = Agent::start(&lab, &services(&lab, 100, 0))
        .context("starting zdd-agent in the edge namespace")?;
    println!(
        "zdd-agent attached to the edge host's eth0 and eth1; VIP {VIP_V4}:80 (config {})",
        agent.config_path().display()
    );
    let vip: SocketAddr = format!("{VIP_V4}:80").parse()?;

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Two clients opening a new connection per request, as fast as they can.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (counts, stop, ns) = (
                counts.clone(),
                stop.clone(),
                lab.ns_name(Node::Client).to_string(),
            );
            std::thread::spawn(move || {
                zdd_tests::lab::enter_netns(&ns).expect("enter the client namespace");
                while !stop.load(Relaxed) {
                    match connect_and_get(vip) {
                        Ok(r) if r.group == "blue" => counts.blue.fetch_add(1, Relaxed),
                        Ok(r) if r.group == "green" => counts.green.fetch_add(1, Relaxed),
                        _ => counts.failed.fetch_add(1, Relaxed),
                    };
                }
            })
        })
        .collect();
    // One long-lived keep-alive connection: it must stay on its first backend throughout.
    let mut keep = lab.in_ns(Node::Client, || {
        TcpStream::connect_timeout(&vip, Duration::from_secs(2))
    })?;
    let first = http_get(&mut keep, VIP_V4, "/")?.backend;

    println!();
    println!("  time  split (blue/green)   answers: blue  green  failed   keep-alive connection");
    let start = Instant::now();
    let (mut total_failed, mut keep_moved) = (0u64, false);
    for (cmd, (blue, green)) in STEPS {
        if !cmd.is_empty() {
            let said = agent
                .zdd(cmd)
                .with_context(|| format!("zdd {}", cmd.join(" ")))?;
            println!("  $ zdd {}\n    {}", cmd.join(" "), said.trim());
        }
        for _ in 0..SECONDS_PER_STEP {
            std::thread::sleep(Duration::from_secs(1));
            let b = counts.blue.swap(0, Relaxed);
            let g = counts.green.swap(0, Relaxed);
            let f = counts.failed.swap(0, Relaxed);
            total_failed += f;
            let k = match http_get(&mut keep, VIP_V4, "/") {
                Ok(r) => r.backend,
                Err(e) => format!("error: {e}"),
            };
            keep_moved |= k != first;
            println!(
                "  {:>3}s  {:>3}% / {:>3}%          {:>6} {:>6} {:>7}   {k}",
                start.elapsed().as_secs(),
                blue,
                green,
                b,
                g,
                f
            );
        }
    }
    let part1 = format!(
        "{} steps through `zdd` (canary 10/25/50%, switch to green, two rollbacks): {} failed request(s); the keep-alive connection {} on {first}",
        STEPS.len() - 1,
        total_failed,
        if keep_moved {
            "MOVED from its backend"
        } else {
            "stayed"
        }
    );
    println!("\n{part1}");
    let status = agent.zdd(&["status", "web"])?;
    println!("\n$ zdd status web\n{status}");

    // Part 2: a canary that the agent judges by itself.
    println!("Part 2: a canary with automated analysis. Green will start resetting every");
    println!("client connection when the canary reaches its second step (its /healthz still");
    println!("passes): the data path's own signals fail the step and the agent rolls back.\n");
    let reset = ["split", "web", "blue=100", "green=0"];
    println!(
        "  $ zdd {}\n    {}",
        reset.join(" "),
        agent.zdd(&reset)?.trim()
    );
    std::thread::sleep(Duration::from_secs(1));
    counts.failed.swap(0, Relaxed);
    let canary_over = Arc::new(AtomicBool::new(false));
    let breaker = {
        let socket = agent.socket_path();
        let done = canary_over.clone();
        let lab = &lab;
        move || -> Result<Option<Instant>> {
            // Waits for step 2, then breaks green.
            while !done.load(Relaxed) {
                let mut c = zdd_tests::control::Client::connect(&socket)?;
                let a = c.ask(r#"{"cmd":"deployments","service":"web"}"#)?;
                let at_step_2 = a["result"]["active"]
                    .as_array()
                    .and_then(|v| v.first())
                    .is_some_and(|d| d["step"] == 1);
                if at_step_2 {
                    for g in ["green-1", "green-2"] {
                        lab.set_server_control(g, "reset=1\n")?;
                    }
                    return Ok(Some(Instant::now()));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(None)
        }
    };
    let canary = [
        "canary",
        "web",
        "--to",
        "green",
        "--steps",
        "10,25,50,100",
        "--interval",
        "3s",
        "--min-flows",
        "20",
    ];
    println!("  $ zdd {}", canary.join(" "));
    let (code, broke) = std::thread::scope(|sc| -> Result<_> {
        let watcher = sc.spawn(breaker);
        // The CLI draws its live progress on this terminal.
        let code = agent
            .zdd_command()
            .args(canary)
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            .status()
            .context("running zdd canary")?;
        canary_over.store(true, Relaxed);
        let broke = watcher
            .join()
            .map_err(|_| anyhow::anyhow!("the watcher panicked"))??;
        Ok((code, broke))
    })?;
    let canary_failed = counts.failed.swap(0, Relaxed);
    for g in ["green-1", "green-2"] {
        lab.set_server_control(g, "")?;
    }
    println!(
        "\n  zdd canary exited with {} ({}); requests failed during the canary: {canary_failed}{}",
        code.code().unwrap_or(-1),
        if code.code() == Some(1) {
            "1: rolled back"
        } else {
            "expected 1"
        },
        match broke {
            Some(t) => format!(
                " (green reset its clients from {:.1}s before the rollback until it, at 25%)",
                t.elapsed().as_secs_f64()
            ),
            None => String::new(),
        }
    );
    let deployments = agent.zdd(&["deployments", "web"])?;
    let events = agent.zdd(&["events", "--limit", "8"])?;
    // Rates in `status` are per second: let one pass since the rollback.
    std::thread::sleep(Duration::from_millis(1500));
    let status = agent.zdd(&["status", "web"])?;
    stop.store(true, Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let after = counts.failed.swap(0, Relaxed);
    agent.stop()?;
    println!("\n$ zdd deployments web\n{deployments}");
    println!("$ zdd events --limit 8\n{events}");
    println!("$ zdd status web\n{status}");
    println!("{part1}");
    println!("requests failed after the rollback: {after}");
    println!("the agent stopped; its data path kept forwarding until the lab was removed");
    println!("tearing down the lab");
    if code.code() != Some(1) {
        anyhow::bail!("the canary was expected to be rolled back (exit 1)");
    }
    Ok(())
}
