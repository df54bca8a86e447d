//! The TOML config: parsed with serde, then validated into a `DesiredState`. Every error
//! names the exact place (`services[web].split`) and what to do; nothing is applied unless
//! the whole file is valid.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::state::{
    AnalysisQuery, BackendSpec, CanarySpec, Cohort, DesiredState, Forwarding, HealthKind,
    HealthSpec, OnDown, Pin, Prefix, Protocol, ServiceSpec,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {at}: {message}")]
    Invalid {
        path: PathBuf,
        at: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub agent: AgentSection,
    #[serde(default)]
    pub alerts: Option<crate::alerts::AlertsSection>,
    #[serde(default)]
    pub services: Vec<ServiceSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub interfaces: Vec<String>,
    #[serde(default = "default_mode")]
    pub xdp_mode: String,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default)]
    pub flow_table_size: Option<u32>,
    #[serde(default)]
    pub tcp_idle_timeout: Option<String>,
    #[serde(default)]
    pub udp_idle_timeout: Option<String>,
    #[serde(default)]
    pub nexthop_refresh: Option<String>,
    #[serde(default)]
    pub new_flow_record_limit: Option<i64>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub socket_group: Option<String>,
    #[serde(default)]
    pub metrics: Option<String>,
    /// Prometheus HTTP API base URL for `[[services.analysis]]` queries.
    #[serde(default)]
    pub prometheus: Option<String>,
}

fn default_state_dir() -> PathBuf {
    "/var/lib/zdd".into()
}

fn default_mode() -> String {
    "auto".into()
}
fn default_socket() -> PathBuf {
    "/run/zdd/zdd.sock".into()
}
fn default_pin_dir() -> PathBuf {
    "/sys/fs/bpf/zdd".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub name: String,
    pub vip: String,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(default = "default_forwarding")]
    pub forwarding: String,
    #[serde(default = "default_affinity")]
    pub affinity: String,
    #[serde(default)]
    pub split: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub health: Option<HealthSection>,
    #[serde(default)]
    pub backends: Vec<BackendSection>,
    #[serde(default)]
    pub pins: Vec<PinSection>,
    #[serde(default)]
    pub cohorts: Vec<CohortSection>,
    #[serde(default)]
    pub analysis: Vec<AnalysisSection>,
    #[serde(default)]
    pub canary: Option<CanarySection>,
}

/// `[[services.cohorts]]`: `name = "internal"`, `sources = ["10.20.0.0/16"]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortSection {
    pub name: String,
    pub sources: Vec<String>,
}

/// `[[services.analysis]]`: `name`, `query` (PromQL template), `max` or `min`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSection {
    pub name: String,
    pub query: String,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub min: Option<f64>,
}

/// `[services.canary]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySection {
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub min_flows: Option<u64>,
    #[serde(default)]
    pub max_extensions: Option<u32>,
    #[serde(default)]
    pub failure_margin: Option<f64>,
    #[serde(default)]
    pub latency_ratio: Option<f64>,
    #[serde(default)]
    pub check_timeout: Option<String>,
}

fn default_protocol() -> String {
    "tcp".into()
}
fn default_forwarding() -> String {
    "nat".into()
}
fn default_affinity() -> String {
    "flow".into()
}

/// `[services.health]`: active probes and what their verdicts do.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    pub kind: String,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    /// Status codes that pass: `[200, "200-299", 301]` (default 200-399).
    #[serde(default)]
    pub expect: Option<Vec<toml::Value>>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub jitter: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub max_latency: Option<String>,
    #[serde(default)]
    pub rise: Option<u32>,
    #[serde(default)]
    pub fall: Option<u32>,
    #[serde(default)]
    pub slow_start: Option<String>,
    #[serde(default)]
    pub on_down: Option<String>,
    #[serde(default)]
    pub panic_below: Option<u32>,
    #[serde(default)]
    pub outlier_ratio: Option<u32>,
    #[serde(default)]
    pub outlier_min_attempts: Option<u64>,
    #[serde(default)]
    pub outlier_window: Option<String>,
    #[serde(default)]
    pub ejection: Option<String>,
    #[serde(default)]
    pub max_ejected: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub name: String,
    pub addr: String,
    pub group: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    100
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinSection {
    pub source: String,
    pub group: String,
}

/// Agent settings, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeSetting,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub flow_table_size: u32,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
    /// Longest time a cached next hop is used without a FIB lookup (route and neighbour
    /// changes refresh it at once anyway).
    pub nexthop_refresh: Duration,
    /// New dsr flows recorded per CPU per second (0: no limit); above it they are forwarded
    /// by the current tables without a flow-table entry.
    pub new_flow_record_limit: u32,
    /// Where the live state and the event journal are kept.
    pub state_dir: PathBuf,
    /// Members of this group may make changes over the socket (mode 0660); without it the
    /// socket is 0600, root only.
    pub socket_group: Option<SocketGroup>,
    /// Prometheus text endpoint (`ip:port`), off when None.
    pub metrics: Option<SocketAddr>,
    /// Prometheus HTTP API (`http://host:9090`) for canary analysis queries.
    pub prometheus: Option<String>,
}

/// `agent.socket_group`, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketGroup {
    pub name: String,
    pub gid: u32,
}

/// The gid of group `name`, from the system's group database.
fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam with a valid C string; the result is read at once, before any other
    // call that could reuse its static buffer.
    unsafe {
        let g = libc::getgrnam(c.as_ptr());
        if g.is_null() { None } else { Some((*g).gr_gid) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeSetting {
    /// Native, falling back to skb (generic) where the driver refuses.
    Auto,
    Native,
    Skb,
}

/// A whole validated config.
#[derive(Clone, Debug)]
pub struct Config {
    pub agent: AgentSettings,
    pub alerts: crate::alerts::AlertSettings,
    pub state: DesiredState,
}

/// Parses "500ms", "1s", "30s", "5m", "1h". The data path counts in nanoseconds in a u64,
/// so anything longer than that holds (about 584 years) is refused rather than wrapped.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} needs a unit: ms, s, m or h"))?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!("duration {s:?} must start with a whole number"));
    }
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("duration {s:?}: unit must be ms, s, m or h")),
    };
    let too_long = || {
        format!(
            "duration {s:?} is too long: at most {}h",
            u64::MAX / 1_000_000 / 3_600_000
        )
    };
    // All digits, so a parse error can only be an overflow.
    let n: u64 = num.parse().map_err(|_| too_long())?;
    let ms = n
        .checked_mul(ms_per_unit)
        .filter(|ms| ms.checked_mul(1_000_000).is_some())
        .ok_or_else(too_long)?;
    Ok(Duration::from_millis(ms))
}

pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

pub fn parse(path: &std::path::Path, text: &str) -> Result<Config, ConfigError> {
    let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let invalid = |at: String, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        at,
        message,
    };
    let agent = validate_agent(&file.agent).map_err(|(at, m)| invalid(at, m))?;
    let alerts = match &file.alerts {
        Some(a) => crate::alerts::settings(a).map_err(|(at, m)| invalid(at, m))?,
        None => crate::alerts::AlertSettings::default(),
    };
    let state = validate_services(&file.services).map_err(|(at, m)| invalid(at, m))?;
    if agent.prometheus.is_none()
        && let Some(s) = state.services.iter().find(|s| !s.analysis.is_empty())
    {
        return Err(invalid(
            format!("services[{}].analysis", s.name),
            "queries need a Prometheus: set agent.prometheus = \"http://127.0.0.1:9090\"".into(),
        ));
    }
    Ok(Config {
        agent,
        alerts,
        state,
    })
}

type Invalid = (String, String);

/// Checks a state made at run time (socket requests) by exactly the file's rules: it is
/// written back as the file's sections and validated like them. The error names the place
/// as the file would (`services[web].split`).
/// With `force`, a group may have a share (or a pin) and no backend with a weight above 0:
/// its new flows are dropped until one has.
pub fn validate_state(state: &DesiredState, force: bool) -> Result<(), Invalid> {
    let sections: Vec<ServiceSection> = state.services.iter().map(section_of).collect();
    validate_services_with(&sections, !force).map(|_| ())
}

/// A validated health spec written back as the file's section (for `validate_state`).
fn health_section(h: &HealthSpec) -> Option<HealthSection> {
    let d = |ms: u64| Some(format!("{ms}ms"));
    Some(HealthSection {
        kind: match h.kind {
            HealthKind::None => "none",
            HealthKind::Tcp => "tcp",
            HealthKind::Http => "http",
        }
        .into(),
        method: (h.kind == HealthKind::Http).then(|| h.method.clone()),
        path: (h.kind == HealthKind::Http).then(|| h.path.clone()),
        host: h.host.clone(),
        expect: (h.kind == HealthKind::Http).then(|| {
            h.expect
                .iter()
                .map(|(a, b)| toml::Value::String(format!("{a}-{b}")))
                .collect()
        }),
        body: h.body.clone(),
        interval: d(h.interval_ms),
        jitter: d(h.jitter_ms),
        timeout: d(h.timeout_ms),
        max_latency: h.max_latency_ms.and_then(d),
        rise: Some(h.rise),
        fall: Some(h.fall),
        slow_start: d(h.slow_start_ms),
        on_down: Some(
            match h.on_down {
                OnDown::Keep => "keep",
                OnDown::Move => "move",
            }
            .into(),
        ),
        panic_below: Some(h.panic_below_pct),
        outlier_ratio: Some(h.outlier_ratio_pct),
        outlier_min_attempts: Some(h.outlier_min_attempts),
        outlier_window: d(h.outlier_window_ms),
        ejection: d(h.ejection_ms),
        max_ejected: Some(h.max_ejected_pct),
    })
}

fn section_of(s: &ServiceSpec) -> ServiceSection {
    ServiceSection {
        name: s.name.clone(),
        vip: s.vip.to_string(),
        protocol: match s.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
        .into(),
        forwarding: match s.forwarding {
            Forwarding::Nat => "nat",
            Forwarding::Dsr => "dsr",
        }
        .into(),
        affinity: if s.client_affinity { "client" } else { "flow" }.into(),
        split: s
            .split
            .iter()
            .map(|(g, b)| (g.clone(), toml::Value::Float(*b as f64 / 100.0)))
            .collect(),
        health: health_section(&s.health),
        backends: s
            .backends
            .iter()
            .map(|b| BackendSection {
                name: b.name.clone(),
                addr: b.addr.to_string(),
                group: b.group.clone(),
                weight: b.weight,
            })
            .collect(),
        pins: s
            .pins
            .iter()
            .map(|p| PinSection {
                source: p.prefix.to_string(),
                group: p.group.clone(),
            })
            .collect(),
        cohorts: s
            .cohorts
            .iter()
            .map(|c| CohortSection {
                name: c.name.clone(),
                sources: c.sources.iter().map(|p| p.to_string()).collect(),
            })
            .collect(),
        analysis: s
            .analysis
            .iter()
            .map(|q| AnalysisSection {
                name: q.name.clone(),
                query: q.query.clone(),
                max: q.max,
                min: q.min,
            })
            .collect(),
        canary: Some(CanarySection {
            interval: Some(format!("{}ms", s.canary.interval_ms)),
            min_flows: Some(s.canary.min_flows),
            max_extensions: Some(s.canary.max_extensions),
            failure_margin: Some(s.canary.failure_margin_pct),
            latency_ratio: Some(s.canary.latency_ratio),
            check_timeout: Some(format!("{}ms", s.canary.check_timeout_ms)),
        }),
    }
}

fn validate_agent(a: &AgentSection) -> Result<AgentSettings, Invalid> {
    let at = |f: &str| format!("agent.{f}");
    if a.interfaces.is_empty() {
        return Err((
            at("interfaces"),
            "list at least one interface to attach to".into(),
        ));
    }
    for (i, name) in a.interfaces.iter().enumerate() {
        if name.is_empty() || name.len() > 15 || name.contains('/') || name.contains(' ') {
            return Err((
                format!("agent.interfaces[{i}]"),
                format!("{name:?} is not an interface name"),
            ));
        }
        if a.interfaces[..i].contains(name) {
            return Err((
                format!("agent.interfaces[{i}]"),
                format!("{name:?} is listed twice"),
            ));
        }
    }
    let xdp_mode = match a.xdp_mode.as_str() {
        "auto" => XdpModeSetting::Auto,
        "native" => XdpModeSetting::Native,
        "skb" => XdpModeSetting::Skb,
        m => {
            return Err((
                at("xdp_mode"),
                format!("{m:?}: use \"auto\", \"native\" or \"skb\""),
            ));
        }
    };
    let flow_table_size = a
        .flow_table_size
        .unwrap_or(zdd_common::DEFAULT_FLOW_TABLE_SIZE);
    if !(1024..=64 << 20).contains(&flow_table_size) {
        return Err((
            at("flow_table_size"),
            format!("{flow_table_size}: must be between 1024 and 67108864"),
        ));
    }
    let dur = |f: &str, v: &Option<String>, default: u64| -> Result<Duration, Invalid> {
        match v {
            None => Ok(Duration::from_secs(default)),
            Some(s) => {
                let d = parse_duration(s).map_err(|m| (at(f), m))?;
                if d.is_zero() {
                    return Err((at(f), "must be above zero".into()));
                }
                Ok(d)
            }
        }
    };
    let new_flow_record_limit = match a.new_flow_record_limit {
        None => zdd_common::DEFAULT_RECORD_LIMIT,
        Some(n) => u32::try_from(n).map_err(|_| {
            (
                at("new_flow_record_limit"),
                format!("{n}: must be between 0 (no limit) and {}", u32::MAX),
            )
        })?,
    };
    let socket_group = match &a.socket_group {
        None => None,
        Some(name) => Some(SocketGroup {
            gid: group_id(name).ok_or_else(|| {
                (
                    at("socket_group"),
                    format!("no group {name:?} on this system (getent group {name})"),
                )
            })?,
            name: name.clone(),
        }),
    };
    let metrics = match &a.metrics {
        None => None,
        Some(m) => Some(m.parse::<SocketAddr>().map_err(|_| {
            (
                at("metrics"),
                format!("{m:?} is not ip:port (e.g. \"127.0.0.1:9580\")"),
            )
        })?),
    };
    if let Some(u) = &a.prometheus {
        crate::prom::PromClient::new(u, Duration::from_secs(5))
            .map_err(|e| (at("prometheus"), e.to_string()))?;
    }
    if !a.state_dir.is_absolute() {
        return Err((
            at("state_dir"),
            format!("{}: must be an absolute path", a.state_dir.display()),
        ));
    }
    if !a.socket.is_absolute() {
        return Err((
            at("socket"),
            format!("{}: must be an absolute path", a.socket.display()),
        ));
    }
    Ok(AgentSettings {
        state_dir: a.state_dir.clone(),
        socket_group,
        metrics,
        prometheus: a.prometheus.clone(),
        interfaces: a.interfaces.clone(),
        xdp_mode,
        socket: a.socket.clone(),
        pin_dir: a.pin_dir.clone(),
        flow_table_size,
        tcp_idle: dur("tcp_idle_timeout", &a.tcp_idle_timeout, 3600)?,
        udp_idle: dur("udp_idle_timeout", &a.udp_idle_timeout, 30)?,
        nexthop_refresh: dur("nexthop_refresh", &a.nexthop_refresh, 1)?,
        new_flow_record_limit,
    })
}

/// Split percentages into buckets of 0.01%: whole numbers or up to two decimals.
fn split_buckets(at: &str, group: &str, v: &toml::Value) -> Result<u32, Invalid> {
    let pct = match v {
        toml::Value::Integer(i) => *i as f64,
        toml::Value::Float(f) => *f,
        other => {
            return Err((
                format!("{at}.{group}"),
                format!("{other} is not a percentage"),
            ));
        }
    };
    if !(0.0..=100.0).contains(&pct) {
        return Err((format!("{at}.{group}"), format!("{pct} is outside 0..100")));
    }
    let b = pct * 100.0;
    if (b - b.round()).abs() > 1e-6 {
        return Err((
            format!("{at}.{group}"),
            format!("{pct}: the split is set in steps of 0.01%"),
        ));
    }
    Ok(b.round() as u32)
}

fn validate_services(services: &[ServiceSection]) -> Result<DesiredState, Invalid> {
    validate_services_with(services, true)
}

/// `serving_groups`: every group with a share, and every pinned group, must have a backend
/// with a weight above 0 (the file's rule; a forced change at run time may break it).
fn validate_services_with(
    services: &[ServiceSection],
    serving_groups: bool,
) -> Result<DesiredState, Invalid> {
    let mut out: Vec<ServiceSpec> = Vec::new();
    if services.len() > zdd_common::MAX_SERVICES as usize {
        return Err((
            "services".into(),
            format!(
                "{} services; at most {}",
                services.len(),
                zdd_common::MAX_SERVICES
            ),
        ));
    }
    for (i, s) in services.iter().enumerate() {
        let at = if s.name.is_empty() {
            format!("services[{i}]")
        } else {
            format!("services[{}]", s.name)
        };
        let f = |field: &str| format!("{at}.{field}");
        if s.name.is_empty()
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err((
                f("name"),
                format!("{:?}: use letters, digits, '-', '_' or '.'", s.name),
            ));
        }
        if out.iter().any(|o| o.name == s.name) {
            return Err((f("name"), "another service has this name".into()));
        }
        let vip: SocketAddr = s.vip.parse().map_err(|_| {
            (
                f("vip"),
                format!("{:?} is not ip:port (IPv6: [addr]:port)", s.vip),
            )
        })?;
        if vip.port() == 0 {
            return Err((f("vip"), "port 0 is not a service port".into()));
        }
        let protocol = match s.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            p => return Err((f("protocol"), format!("{p:?}: use \"tcp\" or \"udp\""))),
        };
        if let Some(o) = out.iter().find(|o| o.vip == vip && o.protocol == protocol) {
            return Err((
                f("vip"),
                format!("service {} already uses this VIP and protocol", o.name),
            ));
        }
        let forwarding = match s.forwarding.as_str() {
            "nat" => Forwarding::Nat,
            "dsr" => Forwarding::Dsr,
            m => return Err((f("forwarding"), format!("{m:?}: use \"nat\" or \"dsr\""))),
        };
        let client_affinity = match s.affinity.as_str() {
            "flow" => false,
            "client" => true,
            a => return Err((f("affinity"), format!("{a:?}: use \"flow\" or \"client\""))),
        };
        let health = match &s.health {
            Some(h) => validate_health(&f("health"), h, protocol)?,
            None => HealthSpec::defaults(HealthKind::None, protocol),
        };

        let mut backends: Vec<BackendSpec> = Vec::new();
        for (j, b) in s.backends.iter().enumerate() {
            let bat = if b.name.is_empty() {
                format!("{at}.backends[{j}]")
            } else {
                format!("{at}.backends[{}]", b.name)
            };
            if b.name.is_empty() {
                return Err((bat, "needs a name".into()));
            }
            if backends.iter().any(|o| o.name == b.name) {
                return Err((
                    format!("{bat}.name"),
                    "another backend of this service has this name".into(),
                ));
            }
            let addr: SocketAddr = b.addr.parse().map_err(|_| {
                (
                    format!("{bat}.addr"),
                    format!("{:?} is not ip:port (IPv6: [addr]:port)", b.addr),
                )
            })?;
            if addr.is_ipv4() != vip.is_ipv4() {
                return Err((
                    format!("{bat}.addr"),
                    "must be of the VIP's address family".into(),
                ));
            }
            if addr.port() == 0 {
                return Err((format!("{bat}.addr"), "port 0 is not a backend port".into()));
            }
            if let Some(o) = backends.iter().find(|o| o.addr == addr) {
                return Err((
                    format!("{bat}.addr"),
                    format!("{addr} is backend {} already", o.name),
                ));
            }
            if forwarding == Forwarding::Dsr && addr.port() != vip.port() {
                return Err((
                    format!("{bat}.addr"),
                    format!(
                        "dsr does not rewrite ports: the backend must listen on the VIP's port {}",
                        vip.port()
                    ),
                ));
            }
            if b.group.is_empty() {
                return Err((format!("{bat}.group"), "needs a group".into()));
            }
            if b.weight > 65_535 {
                return Err((
                    format!("{bat}.weight"),
                    format!("{}: at most 65535", b.weight),
                ));
            }
            backends.push(BackendSpec {
                name: b.name.clone(),
                addr,
                group: b.group.clone(),
                weight: b.weight,
            });
        }

        let mut split: Vec<(String, u32)> = Vec::new();
        for (g, v) in &s.split {
            split.push((g.clone(), split_buckets(&f("split"), g, v)?));
        }
        if split.is_empty() {
            return Err((
                f("split"),
                "give the share of each group, e.g. split = { blue = 100 }".into(),
            ));
        }
        let total: u32 = split.iter().map(|(_, b)| b).sum();
        if total != zdd_common::SPLIT_BUCKETS {
            return Err((
                f("split"),
                format!("shares add up to {}%, not 100%", total as f64 / 100.0),
            ));
        }
        for (g, b) in &split {
            if serving_groups
                && *b > 0
                && !backends.iter().any(|be| &be.group == g && be.weight > 0)
            {
                return Err((
                    format!("{}.{g}", f("split")),
                    format!(
                        "group {g:?} gets {}% but has no backend with a weight above 0",
                        *b as f64 / 100.0
                    ),
                ));
            }
        }

        let mut pins = Vec::new();
        for (k, p) in s.pins.iter().enumerate() {
            let pat = format!("{at}.pins[{k}]");
            let prefix: Prefix = p.source.parse().map_err(|m| (format!("{pat}.source"), m))?;
            if prefix.addr.is_ipv4() != vip.is_ipv4() {
                return Err((
                    format!("{pat}.source"),
                    "must be of the VIP's address family".into(),
                ));
            }
            if serving_groups
                && !backends
                    .iter()
                    .any(|be| be.group == p.group && be.weight > 0)
            {
                return Err((
                    format!("{pat}.group"),
                    format!("group {:?} has no backend with a weight above 0", p.group),
                ));
            }
            if pins.iter().any(|o: &Pin| o.prefix == prefix) {
                return Err((
                    format!("{pat}.source"),
                    "this prefix is pinned twice".into(),
                ));
            }
            pins.push(Pin {
                prefix,
                group: p.group.clone(),
            });
        }

        let mut groups: Vec<&str> = split.iter().map(|(g, _)| g.as_str()).collect();
        groups.extend(backends.iter().map(|b| b.group.as_str()));
        groups.sort();
        groups.dedup();
        if groups.len() > zdd_common::MAX_GROUPS {
            return Err((
                f("split"),
                format!(
                    "{} groups; at most {}",
                    groups.len(),
                    zdd_common::MAX_GROUPS
                ),
            ));
        }

        let cohorts = validate_cohorts(&at, &s.cohorts, vip.is_ipv4(), &groups)?;
        let analysis = validate_analysis(&at, &s.analysis)?;
        let canary = match &s.canary {
            Some(c) => validate_canary(&f("canary"), c)?,
            None => CanarySpec::default(),
        };
        out.push(ServiceSpec {
            name: s.name.clone(),
            vip,
            protocol,
            forwarding,
            client_affinity,
            split,
            backends,
            pins,
            health,
            cohorts,
            analysis,
            canary,
        });
    }
    // nat replies are matched by the backend's address and port: each serves one VIP.
    let mut seen: BTreeMap<(SocketAddr, Protocol), &str> = BTreeMap::new();
    for s in out.iter().filter(|s| s.forwarding == Forwarding::Nat) {
        for b in &s.backends {
            if let Some(other) = seen.insert((b.addr, s.protocol), &s.name)
                && other != s.name
            {
                return Err((
                    format!("services[{}].backends[{}].addr", s.name, b.name),
                    format!(
                        "{} is also a nat backend of service {other}; a nat backend address:port answers for one VIP (replies are matched by it): give it another port",
                        b.addr
                    ),
                ));
            }
        }
    }
    let total_backends: usize = out.iter().map(|s| s.backends.len()).sum();
    if total_backends > zdd_common::MAX_BACKENDS as usize {
        return Err((
            "services".into(),
            format!(
                "{total_backends} backends in all; at most {}",
                zdd_common::MAX_BACKENDS
            ),
        ));
    }
    // While a change is applied, the old slot's pins and the new slot's share the map.
    let total_pins: usize = out.iter().map(|s| s.pins.len()).sum();
    let max_pins = zdd_common::MAX_PINS as usize / 2;
    if total_pins > max_pins {
        return Err((
            "services".into(),
            format!(
                "{total_pins} pins in all; at most {max_pins} (the pin map holds {} entries, and a change holds the old and the new pins at once)",
                zdd_common::MAX_PINS
            ),
        ));
    }
    Ok(DesiredState { services: out })
}

fn validate_cohorts(
    at: &str,
    cohorts: &[CohortSection],
    v4: bool,
    groups: &[&str],
) -> Result<Vec<Cohort>, Invalid> {
    let mut out: Vec<Cohort> = Vec::new();
    for (i, c) in cohorts.iter().enumerate() {
        let cat = format!("{at}.cohorts[{i}]");
        if !crate::state::is_cohort_name(&c.name) {
            return Err((
                format!("{cat}.name"),
                format!(
                    "{:?}: a cohort name starts with a letter and has letters, digits, '-' or '_' (so steps like `internal,10,50` read unambiguously)",
                    c.name
                ),
            ));
        }
        if groups.contains(&c.name.as_str()) {
            return Err((
                format!("{cat}.name"),
                format!(
                    "{:?} is also a group's name; name the cohort otherwise",
                    c.name
                ),
            ));
        }
        if out.iter().any(|o| o.name == c.name) {
            return Err((format!("{cat}.name"), "another cohort has this name".into()));
        }
        if c.sources.is_empty() {
            return Err((
                format!("{cat}.sources"),
                "list at least one source prefix (\"10.20.0.0/16\")".into(),
            ));
        }
        let mut sources: Vec<Prefix> = Vec::new();
        for (k, src) in c.sources.iter().enumerate() {
            let sat = format!("{cat}.sources[{k}]");
            let p: Prefix = src.parse().map_err(|m| (sat.clone(), m))?;
            if p.addr.is_ipv4() != v4 {
                return Err((sat, "must be of the VIP's address family".into()));
            }
            if sources.contains(&p) {
                return Err((sat, "listed twice".into()));
            }
            sources.push(p);
        }
        out.push(Cohort {
            name: c.name.clone(),
            sources,
        });
    }
    Ok(out)
}

fn validate_analysis(at: &str, queries: &[AnalysisSection]) -> Result<Vec<AnalysisQuery>, Invalid> {
    let mut out: Vec<AnalysisQuery> = Vec::new();
    for (i, q) in queries.iter().enumerate() {
        let qat = format!("{at}.analysis[{i}]");
        if q.name.is_empty()
            || !q
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err((
                format!("{qat}.name"),
                format!("{:?}: use letters, digits, '-', '_' or '.'", q.name),
            ));
        }
        if out.iter().any(|o| o.name == q.name) {
            return Err((format!("{qat}.name"), "another query has this name".into()));
        }
        crate::prom::render_template(
            &q.query,
            &[
                ("group", "g"),
                ("baseline", "b"),
                ("service", "s"),
                ("interval", "30s"),
            ],
        )
        .map_err(|m| (format!("{qat}.query"), m))?;
        match (q.max, q.min) {
            (None, None) => {
                return Err((
                    qat,
                    "give a threshold: `max = 0.05` (the value must not exceed it) or `min = 0.99`"
                        .into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err((qat, "give `max` or `min`, not both".into()));
            }
            (Some(v), None) | (None, Some(v)) if !v.is_finite() => {
                return Err((qat, format!("{v}: the threshold must be a finite number")));
            }
            _ => {}
        }
        out.push(AnalysisQuery {
            name: q.name.clone(),
            query: q.query.clone(),
            max: q.max,
            min: q.min,
        });
    }
    Ok(out)
}

fn validate_canary(at: &str, c: &CanarySection) -> Result<CanarySpec, Invalid> {
    let d = CanarySpec::default();
    let ms = |field: &str, v: &Option<String>, default: u64| -> Result<u64, Invalid> {
        match v {
            None => Ok(default),
            Some(t) => {
                let x = parse_duration(t).map_err(|m| (format!("{at}.{field}"), m))?;
                if x < Duration::from_secs(1) {
                    return Err((format!("{at}.{field}"), format!("{t}: at least 1s")));
                }
                Ok(x.as_millis() as u64)
            }
        }
    };
    let failure_margin_pct = c.failure_margin.unwrap_or(d.failure_margin_pct);
    if !(0.0..=100.0).contains(&failure_margin_pct) {
        return Err((
            format!("{at}.failure_margin"),
            format!("{failure_margin_pct}: percentage points between 0 and 100"),
        ));
    }
    let latency_ratio = c.latency_ratio.unwrap_or(d.latency_ratio);
    if !latency_ratio.is_finite() || latency_ratio < 1.0 {
        return Err((
            format!("{at}.latency_ratio"),
            format!("{latency_ratio}: a ratio of at least 1"),
        ));
    }
    let max_extensions = c.max_extensions.unwrap_or(d.max_extensions);
    if max_extensions > 100 {
        return Err((
            format!("{at}.max_extensions"),
            format!("{max_extensions}: at most 100"),
        ));
    }
    Ok(CanarySpec {
        interval_ms: ms("interval", &c.interval, d.interval_ms)?,
        min_flows: c.min_flows.unwrap_or(d.min_flows),
        max_extensions,
        failure_margin_pct,
        latency_ratio,
        check_timeout_ms: ms("check_timeout", &c.check_timeout, d.check_timeout_ms)?,
    })
}

fn validate_health(at: &str, h: &HealthSection, protocol: Protocol) -> Result<HealthSpec, Invalid> {
    let f = |name: &str| format!("{at}.{name}");
    let kind = match h.kind.as_str() {
        "tcp" => HealthKind::Tcp,
        "http" => HealthKind::Http,
        "none" => HealthKind::None,
        k => {
            return Err((
                f("kind"),
                format!("{k:?}: use \"tcp\", \"http\" or \"none\""),
            ));
        }
    };
    let mut spec = HealthSpec::defaults(kind, protocol);
    let ms =
        |name: &str, v: &Option<String>, default: u64, zero_ok: bool| -> Result<u64, Invalid> {
            match v {
                None => Ok(default),
                Some(s) => {
                    let d = parse_duration(s).map_err(|m| (f(name), m))?;
                    if d.is_zero() && !zero_ok {
                        return Err((f(name), "must be above zero".into()));
                    }
                    Ok(d.as_millis() as u64)
                }
            }
        };
    spec.interval_ms = ms("interval", &h.interval, spec.interval_ms, false)?;
    spec.timeout_ms = ms("timeout", &h.timeout, spec.timeout_ms, false)?;
    spec.jitter_ms = ms("jitter", &h.jitter, spec.interval_ms / 10, true)?;
    spec.slow_start_ms = ms("slow_start", &h.slow_start, 0, true)?;
    if h.max_latency.is_some() {
        spec.max_latency_ms = Some(ms("max_latency", &h.max_latency, 0, false)?);
    }
    if spec.timeout_ms > spec.interval_ms {
        return Err((
            f("timeout"),
            format!(
                "{}ms is longer than the interval ({}ms): a probe would still run when the next is due",
                spec.timeout_ms, spec.interval_ms
            ),
        ));
    }
    for (name, v, dst) in [
        ("rise", h.rise, &mut spec.rise),
        ("fall", h.fall, &mut spec.fall),
    ] {
        if let Some(n) = v {
            if n == 0 || n > 100 {
                return Err((f(name), format!("{n}: must be 1..100")));
            }
            *dst = n;
        }
    }
    if let Some(p) = &h.path {
        if !p.starts_with('/') || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err((
                f("path"),
                format!("{p:?} must start with '/' and hold no spaces"),
            ));
        }
        spec.path = p.clone();
    }
    if let Some(m) = &h.method {
        if m.is_empty() || !m.bytes().all(|c| c.is_ascii_uppercase()) {
            return Err((
                f("method"),
                format!("{m:?}: an HTTP method such as GET or HEAD"),
            ));
        }
        spec.method = m.clone();
    }
    if let Some(host) = &h.host {
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err((f("host"), format!("{host:?} is not a Host header value")));
        }
        spec.host = Some(host.clone());
    }
    if let Some(list) = &h.expect {
        let mut ranges = Vec::new();
        for v in list {
            let bad = || {
                (
                    f("expect"),
                    format!("{v}: a status code (200) or a range (\"200-299\")"),
                )
            };
            let (lo, hi) = match v {
                toml::Value::Integer(n) => (*n, *n),
                toml::Value::String(s) => {
                    let (a, b) = s.split_once('-').unwrap_or((s, s));
                    let p = |x: &str| x.trim().parse::<i64>().map_err(|_| bad());
                    (p(a)?, p(b)?)
                }
                _ => return Err(bad()),
            };
            if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
                return Err(bad());
            }
            ranges.push((lo as u16, hi as u16));
        }
        if ranges.is_empty() {
            return Err((f("expect"), "list at least one status code".into()));
        }
        spec.expect = ranges;
    }
    spec.body = h.body.clone();
    if kind != HealthKind::Http {
        for (name, set) in [
            ("method", h.method.is_some()),
            ("path", h.path.is_some()),
            ("host", h.host.is_some()),
            ("expect", h.expect.is_some()),
            ("body", h.body.is_some()),
        ] {
            if set {
                return Err((
                    f(name),
                    format!("only for kind = \"http\" (this is {:?})", h.kind),
                ));
            }
        }
    }
    if let Some(o) = &h.on_down {
        spec.on_down = match o.as_str() {
            "keep" => OnDown::Keep,
            "move" => OnDown::Move,
            _ => return Err((f("on_down"), format!("{o:?}: use \"keep\" or \"move\""))),
        };
    }
    if let Some(p) = h.panic_below {
        if p > 100 {
            return Err((f("panic_below"), format!("{p}: a percentage, 0..100")));
        }
        spec.panic_below_pct = p;
    }
    for (name, v, dst) in [
        (
            "outlier_ratio",
            h.outlier_ratio,
            &mut spec.outlier_ratio_pct,
        ),
        ("max_ejected", h.max_ejected, &mut spec.max_ejected_pct),
    ] {
        if let Some(p) = v {
            if p > 100 {
                return Err((f(name), format!("{p}: a percentage, 0..100")));
            }
            *dst = p;
        }
    }
    if let Some(n) = h.outlier_min_attempts {
        if n == 0 {
            return Err((f("outlier_min_attempts"), "must be at least 1".into()));
        }
        spec.outlier_min_attempts = n;
    }
    spec.outlier_window_ms = ms(
        "outlier_window",
        &h.outlier_window,
        spec.outlier_window_ms,
        false,
    )?;
    spec.ejection_ms = ms("ejection", &h.ejection, spec.ejection_ms, false)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const GOOD: &str = r#"
[agent]
interfaces = ["eth0"]

[[services]]
name = "web"
vip = "10.10.1.100:80"
split = { blue = 95, green = 5 }

[services.health]
kind = "http"
path = "/healthz"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 3

[[services.backends]]
name = "blue-1"
addr = "10.10.2.11:8080"
group = "blue"

[[services.backends]]
name = "green-1"
addr = "10.10.2.21:8080"
group = "green"
weight = 50

[[services.pins]]
source = "10.20.0.0/16"
group = "green"
"#;

    fn err(text: &str) -> String {
        parse(Path::new("zdd.toml"), text).unwrap_err().to_string()
    }

    #[test]
    fn product_example_parses() {
        let c = parse(Path::new("zdd.toml"), GOOD).unwrap();
        let s = &c.state.services[0];
        assert_eq!(s.split, vec![("blue".into(), 9_500), ("green".into(), 500)]);
        assert_eq!(s.backends[1].weight, 50);
        assert_eq!(s.pins[0].prefix.len, 16);
        assert_eq!(c.agent.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(c.agent.tcp_idle, Duration::from_secs(3600));
        assert_eq!(
            c.agent.new_flow_record_limit,
            zdd_common::DEFAULT_RECORD_LIMIT
        );
    }

    #[test]
    fn record_limit() {
        let with =
            |v: &str| GOOD.replace("[agent]", &format!("[agent]\nnew_flow_record_limit = {v}"));
        let c = parse(Path::new("zdd.toml"), &with("0")).unwrap();
        assert_eq!(c.agent.new_flow_record_limit, 0);
        let c = parse(Path::new("zdd.toml"), &with("5000")).unwrap();
        assert_eq!(c.agent.new_flow_record_limit, 5000);
        let e = err(&with("-1"));
        assert!(
            e.contains("agent.new_flow_record_limit") && e.contains("-1: must be between 0"),
            "{e}"
        );
        let e = err(&with("4294967296"));
        assert!(e.contains("agent.new_flow_record_limit"), "{e}");
        let e = err(&with("\"lots\""));
        assert!(e.contains("new_flow_record_limit"), "{e}");
    }

    #[test]
    fn errors_name_the_place() {
        let e = err(&GOOD.replace("green = 5 }", "green = 4 }"));
        assert!(
            e.contains("services[web].split") && e.contains("99%"),
            "{e}"
        );
        let e = err(&GOOD.replace("blue = 95, green = 5", "blue = 94.995, green = 5.005"));
        assert!(e.contains("steps of 0.01%"), "{e}");
        let e = err(&GOOD.replace(
            "group = \"green\"\nweight = 50",
            "group = \"green\"\nweight = 0",
        ));
        assert!(e.contains("services[web].split.green"), "{e}");
        let e = err(&GOOD.replace("10.10.2.11:8080", "10.10.2.11"));
        assert!(e.contains("services[web].backends[blue-1].addr"), "{e}");
        let e = err(&GOOD.replace("10.20.0.0/16", "10.20.0.1/16"));
        assert!(
            e.contains("pins[0].source") && e.contains("10.20.0.0/16"),
            "{e}"
        );
        let e = err(&GOOD.replace("interfaces = [\"eth0\"]", "interfaces = []"));
        assert!(e.contains("agent.interfaces"), "{e}");
        let e = err(&GOOD.replace("[agent]", "[agent]\nbogus = 1"));
        assert!(e.contains("bogus"), "{e}");
        // dsr with backends on port 8080 behind a VIP on port 80.
        let e = err(&GOOD.replace("split = { blue", "forwarding = \"dsr\"\nsplit = { blue"));
        assert!(e.contains("dsr does not rewrite ports"), "{e}");
        let e = err(&GOOD.replace("vip = \"10.10.1.100:80\"", "vip = \"[fd00::1]:80\""));
        assert!(e.contains("address family"), "{e}");
        let e = err(&GOOD.replace("interval = \"1s\"", "interval = \"1 sec\""));
        assert!(e.contains("health.interval"), "{e}");
    }

    #[test]
    fn duplicate_vips_are_refused() {
        let second = GOOD
            .split("[[services]]")
            .nth(1)
            .unwrap()
            .replace("\"web\"", "\"web2\"");
        let e = err(&format!("{GOOD}\n[[services]]{second}"));
        assert!(
            e.contains("services[web2].vip") && e.contains("already uses"),
            "{e}"
        );
    }

    #[test]
    fn a_state_round_trips_through_the_files_rules() {
        let c = parse(Path::new("t.toml"), GOOD).unwrap();
        validate_state(&c.state, false).unwrap();
        let sections: Vec<ServiceSection> = c.state.services.iter().map(section_of).collect();
        assert_eq!(validate_services(&sections).unwrap(), c.state);
        let mut bad = c.state.clone();
        bad.services[0].split = vec![("blue".into(), 9_000)];
        let (at, m) = validate_state(&bad, false).unwrap_err();
        assert_eq!(at, "services[web].split");
        assert!(m.contains("90%"), "{m}");
    }

    /// GOOD with cohorts, a query, canary settings and a Prometheus.
    fn with_deploy() -> String {
        GOOD.replace(
            "interfaces = [\"eth0\"]",
            "interfaces = [\"eth0\"]\nprometheus = \"http://127.0.0.1:9090\"",
        ) + r#"
[[services.cohorts]]
name = "internal"
sources = ["10.30.0.0/16", "10.31.1.0/24"]

[[services.analysis]]
name = "error-ratio"
query = 'sum(rate(errors{group="{{group}}"}[{{ interval }}]))'
max = 0.01

[services.canary]
interval = "10s"
min_flows = 5
failure_margin = 2.5
"#
    }

    #[test]
    fn deployment_sections_parse_and_round_trip() {
        let c = parse(Path::new("t.toml"), &with_deploy()).unwrap();
        let s = &c.state.services[0];
        assert_eq!(c.agent.prometheus.as_deref(), Some("http://127.0.0.1:9090"));
        assert_eq!(s.cohorts[0].name, "internal");
        assert_eq!(s.cohorts[0].sources[1].to_string(), "10.31.1.0/24");
        assert_eq!(s.analysis[0].max, Some(0.01));
        assert_eq!(
            (
                s.canary.interval_ms,
                s.canary.min_flows,
                s.canary.max_extensions
            ),
            (10_000, 5, 3)
        );
        assert_eq!(s.canary.failure_margin_pct, 2.5);
        // Written back as sections (run-time validation), the same spec.
        validate_state(&c.state, false).unwrap();
        let sections: Vec<ServiceSection> = c.state.services.iter().map(section_of).collect();
        assert_eq!(validate_services(&sections).unwrap(), c.state);
    }

    #[test]
    fn deployment_sections_are_checked() {
        let base = with_deploy();
        for (from, to, want) in [
            ("name = \"internal\"", "name = \"10pct\"", "cohorts[0].name"),
            ("name = \"internal\"", "name = \"green\"", "also a group"),
            ("\"10.31.1.0/24\"]", "\"10.31.1.1/24\"]", "host bits"),
            ("\"10.31.1.0/24\"]", "\"fd00::/64\"]", "address family"),
            (
                "sources = [\"10.30.0.0/16\", \"10.31.1.0/24\"]",
                "sources = []",
                "at least one",
            ),
            ("max = 0.01", "", "give a threshold"),
            ("max = 0.01", "max = 0.01\nmin = 0.5", "not both"),
            ("{{ interval }}", "{{ window }}", "analysis[0].query"),
            (
                "min_flows = 5",
                "min_flows = 5\nlatency_ratio = 0.5",
                "latency_ratio",
            ),
            (
                "interval = \"10s\"",
                "interval = \"100ms\"",
                "canary.interval",
            ),
            (
                "failure_margin = 2.5",
                "failure_margin = 200",
                "failure_margin",
            ),
        ] {
            assert!(base.contains(from), "{from}");
            let e = err(&base.replacen(from, to, 1));
            assert!(e.contains(want), "{from} -> {to}: {e}");
        }
        // Queries need a Prometheus to ask.
        let e = err(&base.replace("prometheus = \"http://127.0.0.1:9090\"", ""));
        assert!(e.contains("agent.prometheus"), "{e}");
        let e = err(&base.replace("http://127.0.0.1:9090", "127.0.0.1:9090"));
        assert!(e.contains("agent.prometheus"), "{e}");
    }

    #[test]
    fn health_sections_are_validated_with_defaults_per_protocol() {
        let c = parse(Path::new("t.toml"), GOOD).unwrap();
        let h = &c.state.services[0].health;
        assert_eq!(h.kind, HealthKind::Http);
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.rise, h.fall),
            (1000, 500, 2, 3)
        );
        assert_eq!(h.expect, vec![(200, 399)]);
        assert_eq!(h.on_down, OnDown::Keep);
        let more = GOOD.replace(
            "fall = 3",
            "fall = 3\nexpect = [200, \"204-206\"]\nbody = \"ok\"\nmax_latency = \"100ms\"\nslow_start = \"10s\"\non_down = \"move\"\npanic_below = 50\nhost = \"web.example\"\nmethod = \"HEAD\"",
        );
        let h = parse(Path::new("t.toml"), &more).unwrap().state.services[0]
            .health
            .clone();
        assert_eq!(h.expect, vec![(200, 200), (204, 206)]);
        assert_eq!((h.max_latency_ms, h.slow_start_ms), (Some(100), 10_000));
        assert_eq!((h.on_down, h.panic_below_pct), (OnDown::Move, 50));
        // The written-back section validates to the same spec.
        let st = parse(Path::new("t.toml"), &more).unwrap().state;
        validate_state(&st, false).unwrap();
        let sections: Vec<ServiceSection> = st.services.iter().map(section_of).collect();
        assert_eq!(validate_services(&sections).unwrap(), st);
        for (from, to, want) in [
            ("timeout = \"500ms\"", "timeout = \"2s\"", "health.timeout"),
            ("fall = 3", "fall = 0", "health.fall"),
            ("fall = 3", "fall = 3\nexpect = [99]", "health.expect"),
            ("fall = 3", "fall = 3\non_down = \"drop\"", "health.on_down"),
            ("kind = \"http\"", "kind = \"tcp\"", "health.path"),
            ("fall = 3", "fall = 3\nmethod = \"get\"", "health.method"),
        ] {
            let e = err(&GOOD.replace(from, to));
            assert!(e.contains(want), "{to}: {e}");
        }
        // No section: none; udp services move flows of a down backend by default.
        let udp = GOOD
            .replace("[services.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nrise = 2\nfall = 3\n", "")
            .replace("split = { blue", "protocol = \"udp\"\nsplit = { blue");
        let h = parse(Path::new("t.toml"), &udp).unwrap().state.services[0]
            .health
            .clone();
        assert_eq!((h.kind, h.on_down), (HealthKind::None, OnDown::Move));
    }

    #[test]
    fn pins_are_limited_to_half_the_pin_map() {
        let pins = |n: usize| {
            (0..n)
                .map(|i| {
                    format!(
                        "\n[[services.pins]]\nsource = \"10.{}.{}.0/24\"\ngroup = \"green\"\n",
                        100 + i / 256,
                        i % 256
                    )
                })
                .collect::<String>()
        };
        let base = GOOD.replace(
            "[[services.pins]]\nsource = \"10.20.0.0/16\"\ngroup = \"green\"\n",
            "",
        );
        assert!(parse(Path::new("t.toml"), &format!("{base}{}", pins(2048))).is_ok());
        let e = err(&format!("{base}{}", pins(2049)));
        assert!(e.contains("2049 pins in all; at most 2048"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("ms").unwrap_err().contains("whole number"));
        // u64 nanoseconds end at 5124095h 34m 33.7s: one more hour must not wrap around.
        assert_eq!(
            parse_duration("5124095h").unwrap(),
            Duration::from_secs(5_124_095 * 3600)
        );
        for long in [
            "5124096h",
            "18446744073709551615ms",
            "99999999999999999999999s",
        ] {
            let e = parse_duration(long).unwrap_err();
            assert!(
                e.contains("too long") && e.contains("5124095h"),
                "{long}: {e}"
            );
        }
    }
}
