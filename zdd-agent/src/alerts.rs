//! Alerts to Alertmanager (v2 API) and to plain webhooks. Sending never blocks the agent: each
//! receiver has its own bounded queue and worker task, so a dead receiver backs up (and then
//! drops from) its own queue only, and every other receiver still gets its alerts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::prom::{check_url, error_chain, excerpt};

const DEFAULT_QUEUE: usize = 1024;
const MAX_QUEUE: usize = 100_000;
const DEFAULT_RETRIES: u32 = 5;
const MAX_RETRIES: u32 = 20;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// At most one "queue full" warning per receiver in this time: a dead receiver under a burst
/// of alerts would otherwise flood the log.
const DROP_WARN_EVERY: Duration = Duration::from_secs(10);

/// `[alerts]` as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    /// Alertmanager base URLs, e.g. "http://127.0.0.1:9093".
    pub alertmanager: Option<Vec<String>>,
    /// URLs that get each alert as a JSON POST.
    pub webhooks: Option<Vec<String>>,
    /// Queue length per receiver (default 1024).
    pub queue: Option<usize>,
    /// Retries after a failed attempt (default 5).
    pub retries: Option<u32>,
    /// Per attempt (default "5s").
    pub timeout: Option<String>,
    /// Extra labels on every alert, e.g. env = "prod".
    pub labels: Option<BTreeMap<String, String>>,
}

/// `[alerts]`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertSettings {
    pub alertmanager: Vec<String>,
    pub webhooks: Vec<String>,
    pub queue: usize,
    pub retries: u32,
    pub timeout: Duration,
    pub labels: BTreeMap<String, String>,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            alertmanager: Vec::new(),
            webhooks: Vec::new(),
            queue: DEFAULT_QUEUE,
            retries: DEFAULT_RETRIES,
            timeout: DEFAULT_TIMEOUT,
            labels: BTreeMap::new(),
        }
    }
}

/// Checks `[alerts]`. `Err((at, message))`: `at` is the field ("alerts.webhooks[1]"), the
/// message says what to write instead.
pub fn settings(s: &AlertsSection) -> Result<AlertSettings, (String, String)> {
    let mut out = AlertSettings::default();
    for (i, url) in s.alertmanager.iter().flatten().enumerate() {
        let at = format!("alerts.alertmanager[{i}]");
        let parsed = check_url(url, false).map_err(|m| (at.clone(), format!("{url:?}: {m}")))?;
        if parsed
            .path()
            .trim_end_matches('/')
            .ends_with("/api/v2/alerts")
        {
            return Err((
                at,
                format!(
                    "{url:?}: write Alertmanager's base URL (e.g. \"http://127.0.0.1:9093\"); \
                     zdd adds /api/v2/alerts itself"
                ),
            ));
        }
        // Trailing slashes would give "//api/v2/alerts" and make equal URLs look different.
        let url = url.trim_end_matches('/').to_string();
        if let Some(j) = out.alertmanager.iter().position(|u| *u == url) {
            return Err((
                at,
                format!("{url:?} is listed twice (also alerts.alertmanager[{j}]); remove one"),
            ));
        }
        out.alertmanager.push(url);
    }
    for (i, url) in s.webhooks.iter().flatten().enumerate() {
        let at = format!("alerts.webhooks[{i}]");
        check_url(url, true).map_err(|m| (at.clone(), format!("{url:?}: {m}")))?;
        if let Some(j) = out.webhooks.iter().position(|u| u == url) {
            return Err((
                at,
                format!("{url:?} is listed twice (also alerts.webhooks[{j}]); remove one"),
            ));
        }
        out.webhooks.push(url.clone());
    }
    if let Some(q) = s.queue {
        if !(1..=MAX_QUEUE).contains(&q) {
            return Err((
                "alerts.queue".into(),
                format!("{q}: must be between 1 and {MAX_QUEUE} (default {DEFAULT_QUEUE})"),
            ));
        }
        out.queue = q;
    }
    if let Some(r) = s.retries {
        if r > MAX_RETRIES {
            return Err((
                "alerts.retries".into(),
                format!("{r}: must be between 0 and {MAX_RETRIES} (default {DEFAULT_RETRIES})"),
            ));
        }
        out.retries = r;
    }
    if let Some(t) = &s.timeout {
        let at = || "alerts.timeout".to_string();
        let d = crate::config::parse_duration(t).map_err(|m| (at(), m))?;
        if d.is_zero() {
            return Err((at(), format!("{t:?}: must be above zero (default \"5s\")")));
        }
        out.timeout = d;
    }
    for (name, value) in s.labels.iter().flatten() {
        let at = format!("alerts.labels.{name}");
        if !valid_label_name(name) {
            return Err((
                at,
                format!(
                    "{name:?} is not a label name: use letters, digits and '_', not starting \
                     with a digit (e.g. env = \"prod\")"
                ),
            ));
        }
        if name == "alertname" {
            return Err((
                at,
                "zdd sets alertname itself; pick another label name".into(),
            ));
        }
        if value.is_empty() {
            // Prometheus and Alertmanager treat an empty label as an absent one.
            return Err((
                at,
                "the value is empty; give it a value or remove it".into(),
            ));
        }
    }
    out.labels = s.labels.clone().unwrap_or_default();
    Ok(out)
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, Prometheus' label names.
fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One alert, firing or resolved.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Alert {
    /// alertname, e.g. "ZddCanaryRolledBack".
    pub name: String,
    /// false: resolved.
    pub firing: bool,
    /// service, group, backend, reason, severity (only those that apply).
    pub labels: BTreeMap<String, String>,
    /// One line for people.
    pub summary: String,
    /// Unix ms.
    pub starts_ms: u64,
    /// Set for resolved alerts (and may be set for one-off "info" alerts).
    pub ends_ms: Option<u64>,
}

/// Unix ms now.
pub fn now_ms() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_millisecond()).unwrap_or(0)
}

/// Unix ms → RFC 3339 in UTC ("2024-05-01T12:00:00.5Z").
pub fn rfc3339(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    jiff::Timestamp::from_millisecond(ms)
        .unwrap_or(jiff::Timestamp::MAX)
        .to_string()
}

/// The alert's labels with the configured extra ones. The alert's own win on a clash: they
/// are the more specific.
fn merged_labels(alert: &Alert, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut labels = extra.clone();
    labels.extend(alert.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
}

/// The end time sent for `alert`: its own, or now for a resolved alert without one (so that
/// Alertmanager resolves it), or none for a firing one (Alertmanager then keeps it active for
/// its resolve_timeout).
fn ends_ms(alert: &Alert) -> Option<u64> {
    match alert.ends_ms {
        Some(ms) => Some(ms),
        None if !alert.firing => Some(now_ms()),
        None => None,
    }
}

/// Body of POST /api/v2/alerts: an array of one alert.
pub fn alertmanager_body(alert: &Alert, extra_labels: &BTreeMap<String, String>) -> Value {
    let mut labels = merged_labels(alert, extra_labels);
    labels.insert("alertname".into(), alert.name.clone());
    let mut a = json!({
        "labels": labels,
        "annotations": { "summary": alert.summary },
        "startsAt": rfc3339(alert.starts_ms),
    });
    if let Some(end) = ends_ms(alert) {
        a["endsAt"] = rfc3339(end).into();
    }
    json!([a])
}

/// Body of a webhook POST. `labels` holds the configured extra labels too.
pub fn webhook_body(alert: &Alert, extra_labels: &BTreeMap<String, String>) -> Value {
    json!({
        "version": 1,
        "status": if alert.firing { "firing" } else { "resolved" },
        "alertname": alert.name,
        "labels": merged_labels(alert, extra_labels),
        "summary": alert.summary,
        "starts_at": rfc3339(alert.starts_ms),
        "ends_at": ends_ms(alert).map(rfc3339),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Alertmanager,
    Webhook,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Alertmanager => "alertmanager",
            Kind::Webhook => "webhook",
        }
    }
}

/// Counters of one receiver, for the metrics endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReceiverCounts {
    /// The URL as configured.
    pub receiver: String,
    /// "alertmanager" or "webhook".
    pub kind: &'static str,
    pub sent: u64,
    /// Given up on after all retries.
    pub failed: u64,
    /// Not queued: the queue was full.
    pub dropped: u64,
    /// Waiting in the queue now (not counting the one being delivered).
    pub queued: u64,
}

struct Receiver {
    url: String,
    kind: Kind,
    tx: mpsc::Sender<Alert>,
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    /// When the last "queue full" warning was logged: ms since `Inner::epoch`, plus one
    /// (0: never). An atomic, so that send() takes no lock.
    last_drop_warn: AtomicU64,
}

struct Inner {
    receivers: Vec<Arc<Receiver>>,
    epoch: Instant,
}

/// The alert sender. Cloning is cheap; the workers stop once every clone is dropped and their
/// queues are empty.
#[derive(Clone)]
pub struct Alerts {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self
            .inner
            .iter()
            .flat_map(|i| i.receivers.iter().map(|r| r.url.as_str()))
            .collect();
        f.debug_struct("Alerts").field("receivers", &urls).finish()
    }
}

impl Alerts {
    /// An `Alerts` whose send() does nothing.
    pub fn disabled() -> Alerts {
        Alerts { inner: None }
    }

    /// Starts one worker task per receiver. Must be called inside a tokio runtime. With no
    /// receivers this is [`Alerts::disabled`].
    pub fn start(settings: AlertSettings) -> Alerts {
        let receivers: Vec<(String, Kind)> = settings
            .alertmanager
            .iter()
            .map(|u| (u.clone(), Kind::Alertmanager))
            .chain(settings.webhooks.iter().map(|u| (u.clone(), Kind::Webhook)))
            .collect();
        if receivers.is_empty() {
            return Alerts::disabled();
        }
        // One client (connection pool) for all receivers; settings() has checked every URL,
        // so only a broken TLS setup can fail here, and then alerting cannot work at all.
        let http = match reqwest::Client::builder().timeout(settings.timeout).build() {
            Ok(c) => c,
            Err(e) => {
                warn!(
                    "alerts: cannot set up the HTTP client, no alerts will be sent: {}",
                    error_chain(&e)
                );
                return Alerts::disabled();
            }
        };
        let labels = Arc::new(settings.labels.clone());
        let mut out = Vec::new();
        for (url, kind) in receivers {
            let (tx, rx) = mpsc::channel(settings.queue);
            let r = Arc::new(Receiver {
                url,
                kind,
                tx,
                sent: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                last_drop_warn: AtomicU64::new(0),
            });
            let worker = Worker {
                // The worker holds no Sender (only the counters): the queue closes, and the
                // worker ends, when the last Alerts clone is dropped.
                receiver: Arc::downgrade(&r),
                url: r.url.clone(),
                kind,
                http: http.clone(),
                labels: labels.clone(),
                retries: settings.retries,
            };
            tokio::spawn(worker.run(rx));
            out.push(r);
        }
        Alerts {
            inner: Some(Arc::new(Inner {
                receivers: out,
                epoch: Instant::now(),
            })),
        }
    }

    /// Queues `alert` for every receiver. Never blocks or waits: a receiver whose queue is
    /// full does not get it (counted as dropped, and warned about at most every 10 s).
    pub fn send(&self, alert: Alert) {
        let Some(inner) = &self.inner else {
            return;
        };
        // Each receiver but the last gets a clone; the last takes the alert itself.
        let Some((last, rest)) = inner.receivers.split_last() else {
            return;
        };
        for r in rest {
            inner.offer(r, alert.clone());
        }
        inner.offer(last, alert);
    }

    /// Queues `alert` again for the Alertmanagers only: a firing alert without an end must
    /// be re-sent before Alertmanager's `resolve_timeout` (5 min by default) takes it for
    /// resolved; webhooks got it once and need no repeat.
    pub fn refresh(&self, alert: Alert) {
        let Some(inner) = &self.inner else {
            return;
        };
        for r in inner
            .receivers
            .iter()
            .filter(|r| r.kind == Kind::Alertmanager)
        {
            inner.offer(r, alert.clone());
        }
    }

    /// Counters of every receiver, Alertmanagers first, in config order.
    pub fn counts(&self) -> Vec<ReceiverCounts> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        inner
            .receivers
            .iter()
            .map(|r| ReceiverCounts {
                receiver: r.url.clone(),
                kind: r.kind.name(),
                sent: r.sent.load(Ordering::Relaxed),
                failed: r.failed.load(Ordering::Relaxed),
                dropped: r.dropped.load(Ordering::Relaxed),
                queued: (r.tx.max_capacity() - r.tx.capacity()) as u64,
            })
            .collect()
    }
}

impl Inner {
    fn offer(&self, r: &Receiver, alert: Alert) {
        match r.tx.try_send(alert) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(a)) => {
                let dropped = r.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if self.may_warn(r) {
                    warn!(
                        "alerts: queue of {} {} is full ({} alerts waiting), dropped {} ({}); \
                         {dropped} dropped so far",
                        r.kind.name(),
                        r.url,
                        r.tx.max_capacity(),
                        a.name,
                        status_word(&a),
                    );
                }
            }
            // Only if the worker task is gone (its runtime shut down): nothing to do.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                r.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// True at most once per [`DROP_WARN_EVERY`] for a receiver.
    fn may_warn(&self, r: &Receiver) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = r.last_drop_warn.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < DROP_WARN_EVERY.as_millis() as u64 {
            return false;
        }
        // Two threads dropping at once: only the one that wins the swap warns.
        r.last_drop_warn
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

struct Worker {
    receiver: std::sync::Weak<Receiver>,
    url: String,
    kind: Kind,
    http: reqwest::Client,
    labels: Arc<BTreeMap<String, String>>,
    retries: u32,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Alert>) {
        while let Some(alert) = rx.recv().await {
            let delivered = self.deliver(&alert).await;
            // Counters live with the Alerts handle; when it is gone nobody reads them.
            if let Some(r) = self.receiver.upgrade() {
                let c = if delivered { &r.sent } else { &r.failed };
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Posts `alert`, retrying with exponential backoff. True once a 2xx came back.
    async fn deliver(&self, alert: &Alert) -> bool {
        let (url, body) = match self.kind {
            Kind::Alertmanager => (
                format!("{}/api/v2/alerts", self.url),
                alertmanager_body(alert, &self.labels),
            ),
            Kind::Webhook => (self.url.clone(), webhook_body(alert, &self.labels)),
        };
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            match self.post(&url, &body).await {
                Ok(()) => {
                    if attempt > 0 {
                        info!(
                            "alerts: {} {} took {} ({}) after {attempt} retries",
                            self.kind.name(),
                            self.url,
                            alert.name,
                            status_word(alert),
                        );
                    }
                    return true;
                }
                Err(e) if attempt >= self.retries => {
                    warn!(
                        "alerts: giving up on {} ({}) to {} {} after {} attempts; last error: {e}",
                        alert.name,
                        status_word(alert),
                        self.kind.name(),
                        self.url,
                        attempt + 1,
                    );
                    return false;
                }
                Err(_) => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }

    async fn post(&self, url: &str, body: &Value) -> Result<(), String> {
        let resp = self.http.post(url).json(body).send().await.map_err(|e| {
            if e.is_timeout() {
                "no answer in time (timeout)".to_string()
            } else {
                error_chain(&e)
            }
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        // The body explains a 4xx (Alertmanager says which field it rejected).
        let text = resp.text().await.unwrap_or_default();
        Err(format!("HTTP {}: {}", status.as_u16(), excerpt(&text)))
    }
}

fn status_word(a: &Alert) -> &'static str {
    if a.firing { "firing" } else { "resolved" }
}

/// Builds an alert's labels from pairs, leaving out empty values ("only those that apply").
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml_text: &str) -> AlertsSection {
        toml::from_str(toml_text).unwrap()
    }

    fn err(toml_text: &str) -> (String, String) {
        settings(&section(toml_text)).unwrap_err()
    }

    #[test]
    fn empty_section_is_the_default() {
        let s = settings(&AlertsSection::default()).unwrap();
        assert_eq!(s, AlertSettings::default());
        assert!(s.alertmanager.is_empty() && s.webhooks.is_empty());
        assert_eq!(s.queue, 1024);
        assert_eq!(s.retries, 5);
        assert_eq!(s.timeout, Duration::from_secs(5));
    }

    #[test]
    fn full_section() {
        let s = settings(&section(
            r#"
            alertmanager = ["http://127.0.0.1:9093", "https://am.example:9093/prefix/"]
            webhooks = ["http://127.0.0.1:8080/hook?token=abc", "https://hooks.example/x"]
            queue = 10
            retries = 0
            timeout = "1500ms"
            labels = { env = "prod", _team = "net", dc2 = "x" }
            "#,
        ))
        .unwrap();
        assert_eq!(
            s.alertmanager,
            ["http://127.0.0.1:9093", "https://am.example:9093/prefix"]
        );
        assert_eq!(
            s.webhooks,
            [
                "http://127.0.0.1:8080/hook?token=abc",
                "https://hooks.example/x"
            ]
        );
        assert_eq!(s.queue, 10);
        assert_eq!(s.retries, 0);
        assert_eq!(s.timeout, Duration::from_millis(1500));
        assert_eq!(s.labels.len(), 3);
        assert_eq!(s.labels["env"], "prod");
    }

    #[test]
    fn unknown_field_is_refused() {
        let e = toml::from_str::<AlertsSection>("webhook = [\"http://x\"]").unwrap_err();
        assert!(e.to_string().contains("webhook"), "{e}");
    }

    #[test]
    fn bad_urls() {
        let (at, m) = err(r#"alertmanager = ["127.0.0.1:9093"]"#);
        assert_eq!(at, "alerts.alertmanager[0]");
        assert!(
            m.contains("http://127.0.0.1:9090") || m.contains("http://"),
            "{m}"
        );

        let (at, m) = err(r#"alertmanager = ["http://a:9093", "http://b:9093?x=1"]"#);
        assert_eq!(at, "alerts.alertmanager[1]");
        assert!(m.contains("query"), "{m}");

        let (at, m) = err(r#"alertmanager = ["http://a:9093/api/v2/alerts"]"#);
        assert_eq!(at, "alerts.alertmanager[0]");
        assert!(
            m.contains("base URL") && m.contains("/api/v2/alerts"),
            "{m}"
        );

        let (at, m) = err(r#"alertmanager = ["http://a:9093", "http://a:9093/"]"#);
        assert_eq!(at, "alerts.alertmanager[1]");
        assert!(
            m.contains("twice") && m.contains("alerts.alertmanager[0]"),
            "{m}"
        );

        let (at, m) = err(r#"webhooks = ["http://ok/", "ftp://files/x"]"#);
        assert_eq!(at, "alerts.webhooks[1]");
        assert!(m.contains("http://") && m.contains("ftp"), "{m}");

        let (at, m) = err(r#"webhooks = ["http://ok/#frag"]"#);
        assert_eq!(at, "alerts.webhooks[0]");
        assert!(m.contains("fragment"), "{m}");

        let (at, m) = err(r#"webhooks = ["http://ok/a", "http://ok/a"]"#);
        assert_eq!(at, "alerts.webhooks[1]");
        assert!(m.contains("twice"), "{m}");
    }

    #[test]
    fn bad_numbers() {
        for (text, at, want) in [
            ("queue = 0", "alerts.queue", "between 1 and 100000"),
            ("queue = 100001", "alerts.queue", "between 1 and 100000"),
            ("retries = 21", "alerts.retries", "between 0 and 20"),
            ("timeout = \"5\"", "alerts.timeout", "unit"),
            ("timeout = \"0s\"", "alerts.timeout", "above zero"),
            ("timeout = \"soon\"", "alerts.timeout", "whole number"),
        ] {
            let (a, m) = err(text);
            assert_eq!(a, at, "{text}");
            assert!(m.contains(want), "{text}: {m}");
        }
        assert_eq!(settings(&section("queue = 100000")).unwrap().queue, 100_000);
        assert_eq!(settings(&section("retries = 20")).unwrap().retries, 20);
    }

    #[test]
    fn bad_labels() {
        for (text, at, want) in [
            (
                r#"labels = { "1x" = "a" }"#,
                "alerts.labels.1x",
                "label name",
            ),
            (
                r#"labels = { "a-b" = "a" }"#,
                "alerts.labels.a-b",
                "label name",
            ),
            (r#"labels = { "" = "a" }"#, "alerts.labels.", "label name"),
            (r#"labels = { "é" = "a" }"#, "alerts.labels.é", "label name"),
            (
                r#"labels = { alertname = "a" }"#,
                "alerts.labels.alertname",
                "zdd sets",
            ),
            (r#"labels = { env = "" }"#, "alerts.labels.env", "empty"),
        ] {
            let (a, m) = err(text);
            assert_eq!(a, at, "{text}");
            assert!(m.contains(want), "{text}: {m}");
        }
    }

    #[test]
    fn label_names() {
        for ok in ["a", "_", "A_1", "__meta", "env"] {
            assert!(valid_label_name(ok), "{ok}");
        }
        for bad in ["", "1", "a.b", "a b", "a-b", "ä"] {
            assert!(!valid_label_name(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_714_565_400_000), "2024-05-01T12:10:00Z");
        assert_eq!(rfc3339(1_714_565_400_500), "2024-05-01T12:10:00.5Z");
        // Out of range does not panic.
        assert!(rfc3339(u64::MAX).starts_with("9999-"));
        let now = now_ms();
        assert!(now > 1_700_000_000_000, "{now}");
    }

    fn rolled_back(firing: bool) -> Alert {
        Alert {
            name: "ZddCanaryRolledBack".into(),
            firing,
            labels: labels(&[
                ("service", "web"),
                ("group", "green"),
                ("backend", ""),
                ("reason", "error_rate"),
                ("env", "canary-env"),
            ]),
            summary: "web: canary green rolled back (error rate 7% > 5%)".into(),
            starts_ms: 1_714_565_400_000,
            ends_ms: (!firing).then_some(1_714_565_460_250),
        }
    }

    fn extra() -> BTreeMap<String, String> {
        labels(&[("env", "prod"), ("dc", "fra1")])
    }

    #[test]
    fn labels_leave_out_empty_values() {
        let l = rolled_back(true).labels;
        assert!(!l.contains_key("backend"));
        assert_eq!(l.len(), 4);
    }

    #[test]
    fn alertmanager_json() {
        assert_eq!(
            alertmanager_body(&rolled_back(true), &extra()),
            json!([{
                "labels": {
                    "alertname": "ZddCanaryRolledBack",
                    "service": "web",
                    "group": "green",
                    "reason": "error_rate",
                    "env": "canary-env",
                    "dc": "fra1",
                },
                "annotations": { "summary": "web: canary green rolled back (error rate 7% > 5%)" },
                "startsAt": "2024-05-01T12:10:00Z",
            }])
        );
        let resolved = alertmanager_body(&rolled_back(false), &BTreeMap::new());
        assert_eq!(resolved[0]["endsAt"], "2024-05-01T12:11:00.25Z");
        assert_eq!(resolved[0]["labels"]["env"], "canary-env");
        assert!(resolved[0].get("generatorURL").is_none());
    }

    #[test]
    fn alertname_cannot_be_overridden_by_alert_labels() {
        let mut a = rolled_back(true);
        a.labels.insert("alertname".into(), "Other".into());
        assert_eq!(
            alertmanager_body(&a, &BTreeMap::new())[0]["labels"]["alertname"],
            "ZddCanaryRolledBack"
        );
    }

    #[test]
    fn resolved_without_end_ends_now() {
        let mut a = rolled_back(false);
        a.ends_ms = None;
        let before = now_ms();
        let body = webhook_body(&a, &BTreeMap::new());
        let end: jiff::Timestamp = body["ends_at"].as_str().unwrap().parse().unwrap();
        assert!(end.as_millisecond() as u64 >= before);
        assert!(alertmanager_body(&a, &BTreeMap::new())[0]["endsAt"].is_string());
    }

    #[test]
    fn webhook_json() {
        assert_eq!(
            webhook_body(&rolled_back(true), &extra()),
            json!({
                "version": 1,
                "status": "firing",
                "alertname": "ZddCanaryRolledBack",
                "labels": {
                    "service": "web",
                    "group": "green",
                    "reason": "error_rate",
                    "env": "canary-env",
                    "dc": "fra1",
                },
                "summary": "web: canary green rolled back (error rate 7% > 5%)",
                "starts_at": "2024-05-01T12:10:00Z",
                "ends_at": null,
            })
        );
        let r = webhook_body(&rolled_back(false), &extra());
        assert_eq!(r["status"], "resolved");
        assert_eq!(r["ends_at"], "2024-05-01T12:11:00.25Z");
    }

    /// A local port with nothing listening: connections are refused at once.
    fn closed_port_url() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("http://127.0.0.1:{port}/hook")
    }

    #[test]
    fn disabled_does_nothing() {
        let a = Alerts::disabled();
        a.send(rolled_back(true));
        assert!(a.counts().is_empty());
        // No receivers: no runtime needed, nothing started.
        let a = Alerts::start(AlertSettings::default());
        a.send(rolled_back(true));
        assert!(a.counts().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn full_queue_drops_and_counts_without_blocking() {
        let url = closed_port_url();
        let alerts = Alerts::start(AlertSettings {
            webhooks: vec![url.clone()],
            queue: 2,
            retries: 3,
            ..AlertSettings::default()
        });
        let t = Instant::now();
        for _ in 0..100 {
            alerts.send(rolled_back(true));
        }
        let took = t.elapsed();
        assert!(took < Duration::from_millis(100), "100 sends took {took:?}");
        // On this single-threaded runtime the worker has not run yet: two queued, rest dropped.
        assert_eq!(
            alerts.counts(),
            [ReceiverCounts {
                receiver: url,
                kind: "webhook",
                sent: 0,
                failed: 0,
                dropped: 98,
                queued: 2,
            }]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn refresh_goes_to_alertmanagers_only() {
        let (am, hook) = (closed_port_url(), closed_port_url());
        let alerts = Alerts::start(AlertSettings {
            alertmanager: vec![am.replace("/hook", "")],
            webhooks: vec![hook],
            queue: 10,
            ..AlertSettings::default()
        });
        alerts.refresh(rolled_back(true));
        alerts.refresh(rolled_back(true));
        // The worker has not run yet on this runtime: what is queued is what was offered.
        let queued: Vec<(&str, u64)> = alerts.counts().iter().map(|c| (c.kind, c.queued)).collect();
        assert_eq!(queued, [("alertmanager", 2), ("webhook", 0)]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn dead_receiver_fails_after_retries() {
        let url = closed_port_url();
        let alerts = Alerts::start(AlertSettings {
            alertmanager: vec![url.trim_end_matches("/hook").to_string()],
            webhooks: vec![url.clone()],
            retries: 1,
            timeout: Duration::from_secs(1),
            ..AlertSettings::default()
        });
        let t = Instant::now();
        alerts.send(rolled_back(true));
        let counts = loop {
            let c = alerts.counts();
            if c.iter().all(|c| c.failed == 1) {
                break c;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{c:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // One retry after the first backoff.
        assert!(t.elapsed() >= FIRST_BACKOFF, "{:?}", t.elapsed());
        assert_eq!(counts[0].kind, "alertmanager");
        assert_eq!(counts[1].kind, "webhook");
        for c in counts {
            assert_eq!((c.sent, c.dropped, c.queued), (0, 0, 0), "{c:?}");
        }
    }

    #[test]
    fn drop_warnings_are_rate_limited() {
        let (tx, _rx) = mpsc::channel(1);
        let r = Arc::new(Receiver {
            url: "http://x".into(),
            kind: Kind::Webhook,
            tx,
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_drop_warn: AtomicU64::new(0),
        });
        let inner = Inner {
            receivers: vec![r.clone()],
            epoch: Instant::now(),
        };
        assert!(inner.may_warn(&r));
        assert!(!inner.may_warn(&r));
        assert!(!inner.may_warn(&r));
        // As if the last warning was 10 s ago: the epoch moved back by that much.
        let inner = Inner {
            receivers: vec![r.clone()],
            epoch: inner.epoch - DROP_WARN_EVERY,
        };
        assert!(inner.may_warn(&r));
        assert!(!inner.may_warn(&r));
    }
}
