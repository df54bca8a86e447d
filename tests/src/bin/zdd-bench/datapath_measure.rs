//! BPF_PROG_TEST_RUN runs, each checked against the global counters (see BENCHMARKS.md: a run
//! whose counters show another path is rejected, not reported).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use zdd_agent::maps::Dataplane;
use zdd_common::{FLOOR_PROGRAM_NAME, INSERT_PROBE_PROGRAM_NAME, Stat};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn verdict_name(v: u32) -> &'static str {
    match v {
        0 => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "?",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    Zdd,
    Floor,
    /// The floor plus one flow-table insert (calibration).
    InsertProbe,
}

/// `struct xdp_md` for ctx_in: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
/// egress_ifindex.
pub fn xdp_md(len: usize, ingress: u32) -> [u8; 24] {
    let words = [0, len as u32, 0, ingress, 0, 0];
    let mut b = [0u8; 24];
    for (i, w) in words.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    b
}

/// Where a case's frames come from.
pub enum Frames {
    /// The same frame every call (the kernel copies it in afresh for each call).
    Fixed(Vec<u8>),
    /// A new frame for every call (new flows): called with a running index.
    Fresh(Box<dyn FnMut(u64) -> Vec<u8>>),
}

/// One thing to measure.
pub struct Case {
    pub prog: Prog,
    pub frames: Frames,
    /// Ingress ifindex written into the xdp_md.
    pub ingress: u32,
    pub repeat: u32,
    /// Verdict every call must return.
    pub verdict: u32,
    /// Growth of each counter per packet (repeat counts as packets); every other counter must
    /// stay where it is.
    pub per_packet: Vec<(Stat, u64)>,
    /// Index for `Frames::Fresh`.
    pub next: u64,
}

impl Case {
    fn frame(&mut self) -> Vec<u8> {
        match &mut self.frames {
            Frames::Fixed(f) => f.clone(),
            Frames::Fresh(g) => {
                let f = g(self.next);
                self.next += 1;
                f
            }
        }
    }
}

pub struct Bench<'a> {
    pub dp: &'a mut Dataplane,
    /// The benchmark's own object (floor, insert probe), from [`load_bench_object`].
    pub progs: Ebpf,
}

/// Where `cargo xtask build-ebpf` installs the benchmark's object (`ZDD_BENCH_OBJECT`
/// overrides it).
fn bench_object_path() -> PathBuf {
    std::env::var_os("ZDD_BENCH_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/zdd-bench.bpf.o")
        })
}

/// Loads the benchmark's object (`zdd-bench.bpf.o`: the floor and the insert probe, kept out
/// of the production object) with its programs, beside `dp`: its `ZDD_FLOWS` is declared
/// pinned by name, so with `dp`'s pin directory it is the data path's own flow table.
pub fn load_bench_object(dp: &Dataplane) -> Result<Ebpf> {
    let path = bench_object_path();
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading the benchmark's XDP object {} (built by `cargo xtask build-ebpf`)",
            path.display()
        )
    })?;
    // The ELF is parsed in place: give it 8-byte-aligned memory.
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `words` owns at least `bytes.len()` bytes, any byte pattern is a valid u64,
    // and the byte view does not outlive this statement.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len()) }
        .copy_from_slice(&bytes);
    // SAFETY: as above; the view lives as long as `words`, which outlives the load.
    let aligned = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), bytes.len()) };
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dp.pin_dir())
        .load(aligned)
        .with_context(|| format!("loading {}", path.display()))?;
    for name in [FLOOR_PROGRAM_NAME, INSERT_PROBE_PROGRAM_NAME] {
        let p: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in {}", path.display()))?
            .try_into()?;
        p.load()
            .with_context(|| format!("loading program {name}"))?;
    }
    Ok(ebpf)
}

fn prog<'a>(dp: &'a mut Dataplane, progs: &'a mut Ebpf, p: Prog) -> Result<&'a mut Xdp> {
    let name = match p {
        Prog::Zdd => return Ok(dp.program_mut()?),
        Prog::Floor => FLOOR_PROGRAM_NAME,
        Prog::InsertProbe => INSERT_PROBE_PROGRAM_NAME,
    };
    Ok(progs
        .program_mut(name)
        .with_context(|| format!("no program {name} in the benchmark's object"))?
        .try_into()?)
}

pub type Counts = Vec<(Stat, u64)>;

impl Bench<'_> {
    pub fn counters(&self) -> Result<Counts> {
        let s = self.dp.stats().context("reading counters")?;
        Ok(Stat::ALL.iter().map(|&st| (st, s.get(st))).collect())
    }

    /// One BPF_PROG_TEST_RUN call. Returns (verdict, duration in ns as the kernel reports it:
    /// the average over `repeat`).
    fn call(
        &mut self,
        p: Prog,
        frame: &[u8],
        ingress: u32,
        repeat: u32,
        out: Option<&mut [u8]>,
    ) -> Result<(u32, u64, usize)> {
        let ctx = xdp_md(frame.len(), ingress);
        let r = prog(self.dp, &mut self.progs, p)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: out,
                ctx_in: Some(&ctx),
                repeat,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        Ok((
            r.return_value,
            r.duration.as_nanos() as u64,
            r.data_size_out as usize,
        ))
    }

    /// One call whose output frame is returned, with the counters' growth.
    pub fn probe(&mut self, case: &mut Case) -> Result<(u32, Vec<u8>, Counts)> {
        let frame = case.frame();
        let before = self.counters()?;
        let mut out = vec![0u8; frame.len() + 256];
        let (v, _, n) = self.call(case.prog, &frame, case.ingress, 1, Some(&mut out))?;
        out.truncate(n);
        let after = self.counters()?;
        Ok((v, out, delta(&before, &after)))
    }

    /// Calls without checking counters (warm-up); verdicts are still checked.
    pub fn warm(&mut self, case: &mut Case, calls: usize) -> Result<()> {
        for _ in 0..calls {
            let f = case.frame();
            let (v, _, _) = self.call(case.prog, &f, case.ingress, case.repeat.min(1000), None)?;
            if v != case.verdict {
                bail!(
                    "warm-up: verdict {} instead of {}",
                    verdict_name(v),
                    verdict_name(case.verdict)
                );
            }
        }
        Ok(())
    }

    /// A measured run of `calls` calls: ns per packet (mean of the kernel-reported durations).
    /// Fails when a verdict or a counter shows another path.
    pub fn run(&mut self, case: &mut Case, calls: usize, label: &str) -> Result<f64> {
        // Frames of a fresh case are made before the run, off the clock anyway (the kernel
        // times only the program), but this keeps the calls back to back.
        let frames: Vec<Vec<u8>> = match case.frames {
            Frames::Fixed(_) => Vec::new(),
            Frames::Fresh(_) => (0..calls).map(|_| case.frame()).collect(),
        };
        let fixed = match &case.frames {
            Frames::Fixed(f) => f.clone(),
            Frames::Fresh(_) => Vec::new(),
        };
        let before = self.counters()?;
        let mut total: u64 = 0;
        let mut wrong: Option<(usize, u32)> = None;
        for i in 0..calls {
            let f = if frames.is_empty() {
                &fixed
            } else {
                &frames[i]
            };
            let (v, ns, _) = self.call(case.prog, f, case.ingress, case.repeat, None)?;
            if v != case.verdict && wrong.is_none() {
                wrong = Some((i, v));
            }
            total += ns;
        }
        let after = self.counters()?;
        if let Some((i, v)) = wrong {
            bail!(
                "{label}: call {i} returned {} instead of {}: run rejected",
                verdict_name(v),
                verdict_name(case.verdict)
            );
        }
        let packets = calls as u64 * case.repeat as u64;
        let d = delta(&before, &after);
        check_counts(&d, &case.per_packet, packets)
            .with_context(|| format!("{label}: run rejected, the counters show another path"))?;
        Ok(total as f64 / calls as f64)
    }
}

pub fn delta(before: &Counts, after: &Counts) -> Counts {
    before
        .iter()
        .zip(after)
        .map(|((s, b), (_, a))| (*s, a.wrapping_sub(*b)))
        .collect()
}

pub fn show(d: &Counts) -> String {
    let v: Vec<String> = d
        .iter()
        .filter(|(_, n)| *n != 0)
        .map(|(s, n)| format!("{}+{n}", s.name()))
        .collect();
    if v.is_empty() {
        "no counter moved".into()
    } else {
        v.join(", ")
    }
}

/// Every counter grew by exactly `per_packet × packets` (0 for those not listed).
pub fn check_counts(d: &Counts, per_packet: &[(Stat, u64)], packets: u64) -> Result<()> {
    for (s, got) in d {
        let want = per_packet
            .iter()
            .find(|(p, _)| p == s)
            .map(|(_, n)| n * packets)
            .unwrap_or(0);
        if *got != want {
            bail!(
                "{} grew by {got}, expected {want} (for {packets} packets); all changes: {}",
                s.name(),
                show(d)
            );
        }
    }
    Ok(())
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}
