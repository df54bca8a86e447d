//! An apply is whole or nothing, and says the truth when it is neither: the real program,
//! loaded by the agent's own code, answers real frames (BPF_PROG_TEST_RUN) after applies
//! that fail at each step. The kernel offers no way to make a map write fail on demand, so
//! the failures are injected at the step boundaries (`Dataplane::inject_failure`).

use std::net::SocketAddr;

use zdd_agent::maps::{ApplyError, Failpoint};
use zdd_tests::{
    Lab, LabSpec, Node,
    packet::{FrameSpec, TestRunner, parse},
    require_privileged,
};

const CLIENT: &str = "10.0.1.2";

fn service(name: &str, port: u16, split: &str) -> String {
    let mut s = format!(
        "\n[[services]]\nname = \"{name}\"\nvip = \"10.0.100.1:{port}\"\nsplit = {{ {split} }}\n"
    );
    for (b, group, addr) in [("b", "blue", "10.0.2.11"), ("g", "green", "10.0.2.21")] {
        s += &format!(
            "\n[[services.backends]]\nname = \"{name}-{b}\"\naddr = \"{addr}:{}\"\ngroup = \"{group}\"\n",
            8000 + port
        );
    }
    s
}

fn config(services: &[String]) -> String {
    format!("[agent]\ninterfaces = [\"eth0\"]\n{}", services.concat())
}

struct Probe {
    t: TestRunner,
    ifindex: u32,
    port: u16,
}

impl Probe {
    /// Where a new flow to VIP port `vport` goes: the rewritten destination, or None when the
    /// frame came out untouched (not a VIP).
    fn new_flow(&mut self, vport: u16) -> Option<SocketAddr> {
        self.port += 1;
        let src: SocketAddr = format!("{CLIENT}:{}", self.port).parse().unwrap();
        let vip: SocketAddr = format!("10.0.100.1:{vport}").parse().unwrap();
        let frame = FrameSpec::tcp(src, vip).build();
        let (_, out) = self.t.run(&frame, self.ifindex).unwrap();
        let dst = parse(&out).unwrap().dst_sock().unwrap();
        (dst != vip).then_some(dst)
    }

    fn backend(&mut self, vport: u16) -> String {
        match self.new_flow(vport) {
            Some(d) if d.ip().to_string() == "10.0.2.11" => "blue".into(),
            Some(d) if d.ip().to_string() == "10.0.2.21" => "green".into(),
            Some(d) => format!("unexpected {d}"),
            None => "not a VIP".into(),
        }
    }
}

#[test]
fn a_failed_apply_changes_nothing_and_a_failed_clean_up_is_reported_and_finished() {
    require_privileged!();
    let lab = Lab::new(LabSpec::default().with_backends(Vec::<(String, String)>::new())).unwrap();
    lab.in_ns(Node::Edge, || run(&lab));
}

fn run(lab: &Lab) {
    let t = TestRunner::load("apply", 4096).unwrap();
    let ifindex = lab.ifindex(Node::Edge, lab.edge_client_iface()).unwrap();
    let mut p = Probe {
        t,
        ifindex,
        port: 20_000,
    };
    let a = config(&[
        service("web", 80, "blue = 100"),
        service("api", 81, "blue = 100"),
        service("old", 82, "blue = 100"),
    ]);
    let b_text = config(&[
        service("web", 80, "green = 100"),
        service("api", 81, "green = 100"),
    ]);
    let parse_cfg = |t: &str| {
        zdd_agent::config::parse(std::path::Path::new("t.toml"), t)
            .unwrap()
            .state
    };
    let (a, b) = (parse_cfg(&a), parse_cfg(&b_text));
    p.t.dp.apply(&a).unwrap();
    let everything_blue = |p: &mut Probe, when: &str| {
        for port in [80, 81, 82] {
            assert_eq!(p.backend(port), "blue", "port {port} {when}");
        }
    };
    everything_blue(&mut p, "after the first apply");

    for at in [Failpoint::Stage, Failpoint::Flip] {
        p.t.dp.inject_failure(Some(at));
        let e = p.t.dp.apply(&b).expect_err("injected");
        assert!(!e.in_force(), "{at:?}: {e}");
        assert!(matches!(e, ApplyError::NotApplied(_)), "{at:?}: {e}");
        assert!(e.to_string().contains("nothing was changed"), "{e}");
        // web is switched before api fails at the flip: it must have been switched back.
        everything_blue(&mut p, &format!("after a failure at {at:?}"));
        assert_eq!(p.t.dp.applied().groups("web").len(), 2);
        assert!(p.t.dp.applied().service_id("old").is_some());
    }

    p.t.dp.inject_failure(Some(Failpoint::CleanUp));
    let e = p.t.dp.apply(&b).expect_err("injected");
    assert!(e.in_force(), "{e}");
    assert!(e.to_string().contains("the new config is in force"), "{e}");
    assert_eq!(p.backend(80), "green");
    assert_eq!(p.backend(81), "green");
    assert!(p.t.dp.applied().service_id("old").is_none());
    assert!(p.t.dp.cleanup_pending());
    // The removed service is still in the maps until the clean-up is done.
    assert_eq!(p.backend(82), "blue");

    // The next apply (here: the same config again) finishes the clean-up first.
    let report = p.t.dp.apply(&b).unwrap();
    assert_eq!(report.unchanged, vec!["web".to_string(), "api".to_string()]);
    assert!(!p.t.dp.cleanup_pending());
    assert_eq!(p.backend(82), "not a VIP");
    assert_eq!(p.backend(80), "green");
}

#[test]
fn active_flows_are_counted_per_backend_from_the_flow_table() {
    require_privileged!();
    let lab = Lab::new(LabSpec::default().with_backends(Vec::<(String, String)>::new())).unwrap();
    lab.in_ns(Node::Edge, || count(&lab));
}

fn count(lab: &Lab) {
    use zdd_agent::maps::flows::{CountRules, FlowTable};
    let mut t = TestRunner::load("count", 4096).unwrap();
    let ifindex = lab.ifindex(Node::Edge, lab.edge_client_iface()).unwrap();
    t.apply_toml(&config(&[service("web", 80, "blue = 100")]))
        .unwrap();
    for port in 0..300u16 {
        let src: SocketAddr = format!("{CLIENT}:{}", 30_000 + port).parse().unwrap();
        let vip: SocketAddr = "10.0.100.1:80".parse().unwrap();
        t.run(&FrameSpec::tcp(src, vip).build(), ifindex).unwrap();
    }
    let table = FlowTable::open(t.dp.pin_dir()).unwrap();
    let rules = CountRules {
        now_ns: zdd_agent::maps::coarse_now_ns(),
        tcp_idle_ns: 3_600_000_000_000,
        udp_idle_ns: 30_000_000_000,
    };
    let mut seen = 0;
    table.for_each(|_, _| seen += 1).unwrap();
    assert_eq!(seen, 300, "entries read back");
    let slot = t.dp.applied().backend_slot("web", "web-b").unwrap();
    let counts = table.count(&rules, &Default::default()).unwrap();
    assert_eq!(
        counts.get(&slot),
        Some(&300),
        "{counts:?} (blue is {slot:?})"
    );
}
