//! Alerts as they reach real receivers: a real Alertmanager (the Debian package
//! prometheus-alertmanager) gets a firing alert and then its resolution; a webhook that fails
//! twice gets the alert on the third attempt, while a dead webhook beside it does not hold it up.
//! Needs no root.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use zdd_agent::alerts::{Alert, AlertSettings, Alerts, labels, now_ms, rfc3339};
use zdd_tests::lab::current_test_name;

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

fn env_set(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "no"))
}

/// True when Alertmanager is installed. Otherwise fails under CI (a skipped test must not pass
/// for a run that promised to run it), else prints `ZDD-SKIPPED: ...` and returns false.
fn alertmanager_or_skip() -> bool {
    if Path::new(ALERTMANAGER).exists() {
        return true;
    }
    let test = current_test_name(module_path!());
    let reason = format!(
        "{ALERTMANAGER} is missing; install the Debian package prometheus-alertmanager \
         (apt-get install prometheus-alertmanager)"
    );
    if let Some(var) = ["CI", "ZDD_REQUIRE_PRIVILEGED"]
        .into_iter()
        .find(|v| env_set(v))
    {
        panic!("{test}: {reason}, and {var} requires this test to run");
    }
    // Straight to fd 2: libtest captures eprintln! and would hide the line on success.
    let _ = writeln!(std::io::stderr().lock(), "ZDD-SKIPPED: {test}: {reason}");
    false
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A new empty folder of this process's own.
fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zdd-{what}-{}", std::process::id()));
    // Left over from an earlier run whose pid was the same.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running Alertmanager; killed (and its folder removed) on drop, also when a test panics.
struct Alertmanager {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Alertmanager {
    fn start() -> Alertmanager {
        let dir = temp_dir("alertmanager");
        // Every alert goes to a receiver that sends nothing: the test reads alerts back from
        // the API, which lists them whatever the route does with them.
        std::fs::write(
            dir.join("alertmanager.yml"),
            "route:\n  receiver: \"null\"\nreceivers:\n  - name: \"null\"\n",
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("alertmanager.log")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(ALERTMANAGER)
            .arg(format!(
                "--config.file={}",
                dir.join("alertmanager.yml").display()
            ))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            // Empty: no cluster, so no gossip port to collide on and no peers to wait for.
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ALERTMANAGER}: {e}"));
        let mut am = Alertmanager { child, dir, addr };
        am.wait_ready();
        am
    }

    fn wait_ready(&mut self) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "Alertmanager exited ({st}) before it was ready:\n{}",
                    self.log()
                );
            }
            if get(self.addr, "/-/ready").is_ok_and(|(status, _)| status == 200) {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "Alertmanager not ready on {} after 20 s:\n{}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("alertmanager.log")).unwrap_or_default()
    }

    /// GET /api/v2/alerts (its defaults: active, silenced, inhibited and unprocessed alerts;
    /// resolved ones are not listed): the alerts named `name`.
    fn alerts(&self, name: &str) -> Vec<Value> {
        let (status, body) = get(self.addr, "/api/v2/alerts")
            .unwrap_or_else(|e| panic!("GET /api/v2/alerts: {e}\n{}", self.log()));
        assert_eq!(status, 200, "GET /api/v2/alerts: {body}");
        let all: Vec<Value> = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET /api/v2/alerts: {e}: {body}"));
        all.into_iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .collect()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTP/1.0 GET: the server closes the connection after its answer and sends no chunked
/// body, so reading to the end is the whole answer.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let bad = || std::io::Error::other(format!("not an HTTP answer: {answer:?}"));
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits (letting the alert workers run) until `f` gives `Some`, for at most `limit`.
async fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < limit, "{what}: not after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// RFC 3339 ("2024-05-01T12:10:00.123Z", "...+02:00") → unix ms. The tests crate has no
/// date library, and this is all that Alertmanager's answers need.
fn unix_ms(v: &Value) -> u64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    fn bad<T>(s: &str) -> T {
        panic!("not an RFC 3339 time: {s:?}")
    }
    let num = |r: std::ops::Range<usize>| -> i64 {
        s.get(r)
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| bad(s))
    };
    let (y, mo, d) = (num(0..4), num(5..7), num(8..10));
    let secs_of_day = num(11..13) * 3600 + num(14..16) * 60 + num(17..19);
    let mut rest = &s[19..];
    let mut ms = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or_else(|| bad(s));
        let padded = format!("{:0<3}", &frac[..digits.min(3)]);
        ms = padded.parse::<i64>().unwrap();
        rest = &frac[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => bad(s),
            };
            let h: i64 = rest
                .get(1..3)
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| bad(s));
            let m: i64 = rest
                .get(4..6)
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| bad(s));
            sign * (h * 3600 + m * 60)
        }
    };
    // Days from 1970-01-01 to y-mo-d (Howard Hinnant's days_from_civil).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from((days * 86_400 + secs_of_day - offset_s) * 1000 + ms).unwrap()
}

#[test]
fn unix_ms_reads_rfc3339() {
    for ms in [
        0,
        1_714_565_400_000,
        1_714_565_400_500,
        951_782_400_123,
        4_102_444_799_999,
    ] {
        assert_eq!(unix_ms(&Value::from(rfc3339(ms))), ms, "{}", rfc3339(ms));
    }
    assert_eq!(
        unix_ms(&Value::from("2024-05-01T14:10:00.25+02:00")),
        1_714_565_400_250
    );
    assert_eq!(
        unix_ms(&Value::from("2024-05-01T12:10:00.123456789Z")),
        1_714_565_400_123
    );
}

fn rolled_back(firing: bool, starts_ms: u64) -> Alert {
    Alert {
        name: "ZddCanaryRolledBack".into(),
        firing,
        labels: labels(&[
            ("service", "web"),
            ("group", "green"),
            ("backend", "web-g1"),
            ("reason", "error_rate"),
            ("severity", "warning"),
        ]),
        summary: "web: canary green rolled back: error rate 7.1% > 5%".into(),
        starts_ms,
        ends_ms: (!firing).then(now_ms),
    }
}

#[test]
fn alertmanager_gets_firing_then_resolved() {
    if !alertmanager_or_skip() {
        return;
    }
    let am = Alertmanager::start();
    runtime().block_on(async {
        let alerts = Alerts::start(AlertSettings {
            alertmanager: vec![am.url()],
            labels: BTreeMap::from([("env".to_string(), "test".to_string())]),
            ..AlertSettings::default()
        });
        let starts_ms = now_ms();
        alerts.send(rolled_back(true, starts_ms));

        // "unprocessed" until Alertmanager's dispatcher has taken it in, then "active".
        let listed = wait_for(Duration::from_secs(10), "the firing alert active", || {
            am.alerts("ZddCanaryRolledBack")
                .into_iter()
                .find(|a| a["status"]["state"] == "active")
        })
        .await;
        let want_labels = serde_json::json!({
            "alertname": "ZddCanaryRolledBack",
            "service": "web",
            "group": "green",
            "backend": "web-g1",
            "reason": "error_rate",
            "severity": "warning",
            "env": "test",
        });
        assert_eq!(listed["labels"], want_labels, "{listed}");
        assert_eq!(
            listed["annotations"]["summary"],
            "web: canary green rolled back: error rate 7.1% > 5%"
        );
        // Alertmanager writes times its own way; compare instants, not strings.
        assert_eq!(unix_ms(&listed["startsAt"]), starts_ms, "{listed}");
        // No endsAt sent: Alertmanager keeps it firing for its resolve_timeout (5m default).
        assert!(unix_ms(&listed["endsAt"]) > now_ms(), "{listed}");
        let c = &alerts.counts()[0];
        assert_eq!(
            (c.kind, c.sent, c.failed, c.dropped),
            ("alertmanager", 1, 0, 0)
        );
        assert_eq!(c.receiver, am.url());

        alerts.send(rolled_back(false, starts_ms));
        // A resolved alert (endsAt in the past) is no longer listed.
        wait_for(Duration::from_secs(10), "the alert resolved", || {
            am.alerts("ZddCanaryRolledBack").is_empty().then_some(())
        })
        .await;
        let (status, body) = get(am.addr, "/api/v2/alerts?active=true").unwrap();
        assert_eq!(status, 200);
        assert!(!body.contains("ZddCanaryRolledBack"), "{body}");
        let c = &alerts.counts()[0];
        assert_eq!((c.sent, c.failed, c.dropped, c.queued), (2, 0, 0, 0));
    });
}

struct Request {
    at: Instant,
    head: String,
    body: String,
}

/// A webhook receiver on 127.0.0.1: answers 500 to the first `failures` requests, then 200,
/// until `stop` is set. Every request is recorded.
fn flaky_webhook(
    failures: usize,
    stop: Arc<AtomicBool>,
) -> (
    SocketAddr,
    Arc<Mutex<Vec<Request>>>,
    std::thread::JoinHandle<()>,
) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // Non-blocking accept so that the thread sees `stop` even when nobody connects.
    l.set_nonblocking(true).unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let thread = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut s = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let (head, body) = read_request(&mut s);
            let n = {
                let mut r = seen.lock().unwrap();
                r.push(Request {
                    at: Instant::now(),
                    head,
                    body,
                });
                r.len()
            };
            let answer = if n <= failures {
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntry later"
            } else {
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            };
            let _ = s.write_all(answer.as_bytes());
        }
    });
    (addr, requests, thread)
}

/// Head and body of one request (the body by Content-Length).
fn read_request(s: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed inside the request head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed inside the request body");
        body.extend_from_slice(&chunk[..n]);
    }
    (head, String::from_utf8(body).unwrap())
}

#[test]
fn webhook_retried_until_accepted() {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, requests, server) = flaky_webhook(2, stop.clone());
    let live = format!("http://{addr}/hook?token=t1");
    // Nothing listens there: its worker retries in vain, in its own queue.
    let dead = format!("http://127.0.0.1:{}/hook", free_port());
    let starts_ms = now_ms();
    runtime().block_on(async {
        let alerts = Alerts::start(AlertSettings {
            webhooks: vec![dead.clone(), live.clone()],
            timeout: Duration::from_secs(2),
            labels: BTreeMap::from([("env".to_string(), "test".to_string())]),
            ..AlertSettings::default()
        });
        let t = Instant::now();
        alerts.send(rolled_back(true, starts_ms));
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        wait_for(Duration::from_secs(10), "the webhook delivery", || {
            (alerts.counts()[1].sent == 1).then_some(())
        })
        .await;
        // Time for any extra, unwanted attempt to show up.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let counts = alerts.counts();
        assert_eq!(counts[1].receiver, live);
        assert_eq!(
            (
                counts[1].kind,
                counts[1].sent,
                counts[1].failed,
                counts[1].dropped
            ),
            ("webhook", 1, 0, 0)
        );
        // The dead one is still retrying (backoff 0.5 s, 1 s, 2 s, ...): nothing sent yet.
        assert_eq!(counts[0].receiver, dead);
        assert_eq!((counts[0].sent, counts[0].failed), (0, 0));
    });
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();

    let requests = requests.lock().unwrap();
    assert_eq!(requests.len(), 3, "two refused, one accepted, no more");
    for r in requests.iter() {
        assert!(
            r.head.starts_with("POST /hook?token=t1 HTTP/1.1\r\n"),
            "{}",
            r.head
        );
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{}",
            r.head
        );
        // Every attempt carries the same alert.
        assert_eq!(r.body, requests[0].body);
    }
    // Exponential backoff: 0.5 s, then 1 s (some slack for the scheduler).
    let gap1 = requests[1].at - requests[0].at;
    let gap2 = requests[2].at - requests[1].at;
    assert!(gap1 >= Duration::from_millis(450), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(950), "{gap2:?}");
    assert!(gap2 > gap1, "{gap1:?} then {gap2:?}");

    let body: Value = serde_json::from_str(&requests[2].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "version": 1,
            "status": "firing",
            "alertname": "ZddCanaryRolledBack",
            "labels": {
                "service": "web",
                "group": "green",
                "backend": "web-g1",
                "reason": "error_rate",
                "severity": "warning",
                "env": "test",
            },
            "summary": "web: canary green rolled back: error rate 7.1% > 5%",
            "starts_at": rfc3339(starts_ms),
            "ends_at": null,
        })
    );
}
