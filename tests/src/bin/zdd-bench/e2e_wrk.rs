//! Running wrk in the client namespace and reading its report.

use anyhow::{Context, Result, bail};
use zdd_tests::{Lab, Node};

/// What one wrk run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// connect + read + write + timeout.
    pub socket_errors: u64,
    /// wrk's "Non-2xx or 3xx responses".
    pub bad_status: u64,
}

impl WrkResult {
    pub fn errors(&self) -> u64 {
        self.socket_errors + self.bad_status
    }
}

/// `wrk -t2 -c50 -dNs --latency [-H 'Connection: close'] URL` from the client namespace.
pub fn run(lab: &Lab, url: &str, secs: u32, close: bool) -> Result<(WrkResult, String)> {
    let dur = format!("-d{secs}s");
    let mut args = vec!["wrk", "-t2", "-c50", &dur, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = lab.exec(Node::Client, &args)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let r = parse(&text).with_context(|| format!("reading wrk's report:\n{text}"))?;
    Ok((r, text))
}

/// Reads wrk 4's report (with `--latency`).
pub fn parse(text: &str) -> Result<WrkResult> {
    let mut requests = None;
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut socket_errors = 0;
    let mut bad_status = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => p50 = Some(duration_us(v)?),
            ["99%", v] => p99 = Some(duration_us(v)?),
            ["Requests/sec:", v] => rps = Some(v.parse::<f64>().context("Requests/sec")?),
            [n, "requests", "in", ..] => requests = Some(n.parse::<u64>().context("requests")?),
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                bad_status = n.parse().context("Non-2xx")?
            }
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                for pair in rest.chunks(2) {
                    if let [_, n] = pair {
                        socket_errors += n
                            .trim_end_matches(',')
                            .parse::<u64>()
                            .context("Socket errors")?;
                    }
                }
            }
            _ => {}
        }
    }
    let (Some(requests), Some(rps)) = (requests, rps) else {
        bail!("no request count or rate");
    };
    let (Some(p50_us), Some(p99_us)) = (p50, p99) else {
        // wrk prints no distribution when no request completed.
        if requests == 0 {
            return Ok(WrkResult {
                requests,
                rps,
                p50_us: f64::NAN,
                p99_us: f64::NAN,
                socket_errors,
                bad_status,
            });
        }
        bail!("no latency distribution (was --latency given?)");
    };
    Ok(WrkResult {
        requests,
        rps,
        p50_us,
        p99_us,
        socket_errors,
        bad_status,
    })
}

/// `320.00us`, `1.20ms`, `2.00s`, `1.00m` → microseconds.
fn duration_us(v: &str) -> Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {v:?}"))?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("bad duration {v:?}"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("unknown unit in {v:?}"),
    };
    Ok(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 3s test @ http://10.0.100.1:80/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   710.12us  300.55us  12.91ms   90.12%
    Req/Sec    35.10k     1.20k   38.00k    70.00%
  Latency Distribution
     50%  650.00us
     75%  780.00us
     90%  0.96ms
     99%    1.52ms
  209512 requests in 3.00s, 33.77MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:  69801.44
Transfer/sec:     11.25MB
";

    #[test]
    fn parses_a_report() {
        let r = parse(REPORT).unwrap();
        assert_eq!(r.requests, 209_512);
        assert!((r.rps - 69_801.44).abs() < 1e-6);
        assert!((r.p50_us - 650.0).abs() < 1e-6);
        assert!((r.p99_us - 1520.0).abs() < 1e-6);
        assert_eq!(r.socket_errors, 6);
        assert_eq!(r.bad_status, 5);
        assert_eq!(r.errors(), 11);
    }

    #[test]
    fn a_clean_report_has_no_errors() {
        let clean: String = REPORT
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse(&clean).unwrap().errors(), 0);
    }

    #[test]
    fn units() {
        assert_eq!(duration_us("2.00s").unwrap(), 2e6);
        assert_eq!(duration_us("1.00m").unwrap(), 60e6);
        assert!(duration_us("3").is_err());
    }
}
