//! Desired state: what the data path should do, validated, in one type. The config file
//! produces it today; the socket API, health checks and deployments will produce it too.

use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => zdd_common::PROTO_TCP,
            Protocol::Udp => zdd_common::PROTO_UDP,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    Nat,
    Dsr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub name: String,
    pub addr: SocketAddr,
    pub group: String,
    pub weight: u32,
}

/// A source prefix, e.g. `10.20.0.0/16` (as that string in JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an address/prefix-length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if l.is_empty() {
            max
        } else {
            l.parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?
        };
        // Host bits set is almost always a typo; say so rather than guess.
        let masked = mask(addr, len);
        if masked != addr {
            return Err(format!(
                "{s:?} has host bits set; did you mean {masked}/{len}?"
            ));
        }
        Ok(Prefix { addr, len })
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub prefix: Prefix,
    pub group: String,
}

/// How a service's backends are checked (`[services.health]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// Not checked: every backend counts as healthy.
    #[default]
    None,
    /// A TCP connect to the backend's address.
    Tcp,
    /// An HTTP request to the backend's address.
    Http,
}

/// What happens to the established flows of a backend that goes down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// They stay on it (a TCP connection may well outlive a failed probe).
    Keep,
    /// They move to live backends at their next packet (UDP flows, whose next datagram is
    /// better served elsewhere).
    Move,
}

/// A service's health checking, validated (durations in milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    pub kind: HealthKind,
    pub method: String,
    pub path: String,
    /// `Host` header (default: the backend's address).
    pub host: Option<String>,
    /// Status codes that pass, as inclusive ranges.
    pub expect: Vec<(u16, u16)>,
    /// A substring the body must contain.
    pub body: Option<String>,
    pub interval_ms: u64,
    /// Each interval is lengthened by a random part of this, so probes of many backends
    /// spread out.
    pub jitter_ms: u64,
    pub timeout_ms: u64,
    /// A probe slower than this fails.
    pub max_latency_ms: Option<u64>,
    pub rise: u32,
    pub fall: u32,
    /// A backend that comes up ramps from near 0 to its weight over this (0: at once).
    pub slow_start_ms: u64,
    pub on_down: OnDown,
    /// Panic mode when a group's healthy share (by count) is below this percent; 0: when no
    /// backend of the group is healthy.
    pub panic_below_pct: u32,
    /// Outlier ejection on the data path's passive signals (nat only): a backend whose
    /// failure ratio (attempts unanswered, plus resets, per attempt) over `outlier_window_ms`
    /// reaches this percent, with at least `outlier_min_attempts` attempts, is ejected.
    /// 0: off.
    #[serde(default)]
    pub outlier_ratio_pct: u32,
    #[serde(default)]
    pub outlier_min_attempts: u64,
    #[serde(default)]
    pub outlier_window_ms: u64,
    /// The first ejection lasts this; each repeat doubles it.
    #[serde(default)]
    pub ejection_ms: u64,
    /// At most this percent of a group is ejected at once.
    #[serde(default)]
    pub max_ejected_pct: u32,
}

impl HealthSpec {
    /// The defaults for `kind` and `protocol` (`on_down`: keep for tcp, move for udp).
    pub fn defaults(kind: HealthKind, protocol: Protocol) -> HealthSpec {
        HealthSpec {
            kind,
            method: "GET".into(),
            path: "/".into(),
            host: None,
            expect: vec![(200, 399)],
            body: None,
            interval_ms: 1_000,
            jitter_ms: 100,
            timeout_ms: 500,
            max_latency_ms: None,
            rise: 2,
            fall: 3,
            slow_start_ms: 0,
            on_down: match protocol {
                Protocol::Tcp => OnDown::Keep,
                Protocol::Udp => OnDown::Move,
            },
            panic_below_pct: 0,
            outlier_ratio_pct: 0,
            outlier_min_attempts: 20,
            outlier_window_ms: 10_000,
            ejection_ms: 30_000,
            max_ejected_pct: 50,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub client_affinity: bool,
    /// Group → share in buckets of 0.01% (sums to `SPLIT_BUCKETS`).
    pub split: Vec<(String, u32)>,
    pub backends: Vec<BackendSpec>,
    pub pins: Vec<Pin>,
    /// Health checking (`kind = none` when the service has no `[services.health]`).
    #[serde(default = "no_health")]
    pub health: HealthSpec,
    /// Named sets of client sources that canary steps can name (`internal`).
    #[serde(default)]
    pub cohorts: Vec<Cohort>,
    /// Prometheus queries every canary step must pass.
    #[serde(default)]
    pub analysis: Vec<AnalysisQuery>,
    /// How canary steps are judged.
    #[serde(default)]
    pub canary: CanarySpec,
}

/// A name a rollout step can use for a cohort: ASCII letters, digits, `-` and `_`, starting
/// with a letter (so `--steps internal,10` reads unambiguously).
pub fn is_cohort_name(n: &str) -> bool {
    n.starts_with(|c: char| c.is_ascii_alphabetic())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `[[services.cohorts]]`: clients a rollout step can name, e.g. the company's own network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cohort {
    pub name: String,
    pub sources: Vec<Prefix>,
}

/// `[[services.analysis]]`: a PromQL template (`{{group}}`, `{{baseline}}`, `{{service}}`,
/// `{{interval}}`) whose value for the canary group must stay within `max` / above `min`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnalysisQuery {
    pub name: String,
    pub query: String,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub min: Option<f64>,
}

// Thresholds are finite (validated), so equality is total in practice.
impl Eq for AnalysisQuery {}

/// `[services.canary]`: the evidence a step needs and the margins it must stay within.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CanarySpec {
    /// Step length when `zdd canary` gives no `--interval`.
    pub interval_ms: u64,
    /// New flows the canary group needs in a step for the step to count.
    pub min_flows: u64,
    /// Times a step without enough evidence is extended before the canary pauses.
    pub max_extensions: u32,
    /// Connection failures (unanswered + resets, % of attempts) the canary may have above
    /// the baseline's, in percentage points; also for probe failures.
    pub failure_margin_pct: f64,
    /// The canary's mean probe latency may be up to this times the baseline's (and always
    /// up to 5 ms above it).
    pub latency_ratio: f64,
    /// Longest run of `--check`.
    pub check_timeout_ms: u64,
}

impl Eq for CanarySpec {}

impl Default for CanarySpec {
    fn default() -> CanarySpec {
        CanarySpec {
            interval_ms: 30_000,
            min_flows: 50,
            max_extensions: 3,
            failure_margin_pct: 1.0,
            latency_ratio: 2.0,
            check_timeout_ms: 60_000,
        }
    }
}

fn no_health() -> HealthSpec {
    HealthSpec::defaults(HealthKind::None, Protocol::Tcp)
}

impl ServiceSpec {
    /// Groups that get new flows (a share or a pin) and would have no backend taking them
    /// without the backends in `out` (backends at weight 0, or for which `unavailable` says
    /// so, drained or down, take none either). A drain, a removal or a rolling batch must
    /// leave this empty.
    pub fn groups_starved_without(
        &self,
        out: &[String],
        unavailable: &dyn Fn(&str) -> bool,
    ) -> Vec<String> {
        self.groups()
            .into_iter()
            .filter(|g| {
                let share = self.split.iter().any(|(x, b)| x == g && *b > 0);
                let pinned = self.pins.iter().any(|p| &p.group == g);
                let left = self.backends.iter().any(|b| {
                    &b.group == g && b.weight > 0 && !out.contains(&b.name) && !unavailable(&b.name)
                });
                (share || pinned) && !left
            })
            .collect()
    }

    /// Every group the service knows: from the split and from the backends, sorted.
    pub fn groups(&self) -> Vec<String> {
        let mut g: Vec<String> = self.split.iter().map(|(g, _)| g.clone()).collect();
        g.extend(self.backends.iter().map(|b| b.group.clone()));
        g.sort();
        g.dedup();
        g
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub services: Vec<ServiceSpec>,
}

/// An address in the data path's form: wire-order bytes in `[u32; 4]`, IPv4 in word 0.
pub fn wire_addr(ip: IpAddr) -> zdd_common::Addr {
    match ip {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The inverse of [`wire_addr`].
pub fn ip_of(a: &zdd_common::Addr, family: u8) -> IpAddr {
    if family == zdd_common::FAMILY_V4 {
        IpAddr::V4(a[0].to_ne_bytes().into())
    } else {
        let mut b = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(b.into())
    }
}

/// An address and a port in network byte order, as the maps hold them.
pub fn socket_addr_of(a: &zdd_common::Addr, port_be: u16, family: u8) -> SocketAddr {
    SocketAddr::new(ip_of(a, family), u16::from_be(port_be))
}

pub fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        zdd_common::FAMILY_V4
    } else {
        zdd_common::FAMILY_V6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_reject_host_bits() {
        let p: Prefix = "10.20.0.0/16".parse().unwrap();
        assert_eq!(p.len, 16);
        assert!(
            "10.20.0.1/16"
                .parse::<Prefix>()
                .unwrap_err()
                .contains("10.20.0.0/16")
        );
        assert_eq!("fd00::/8".parse::<Prefix>().unwrap().len, 8);
        assert_eq!("10.1.2.3".parse::<Prefix>().unwrap().len, 32);
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("nope/8".parse::<Prefix>().is_err());
    }

    #[test]
    fn wire_addr_keeps_network_order_bytes() {
        let a = wire_addr("10.0.2.11".parse().unwrap());
        assert_eq!(a[0].to_ne_bytes(), [10, 0, 2, 11]);
        let b = wire_addr("fd00:2::b".parse().unwrap());
        assert_eq!(b[0].to_ne_bytes(), [0xfd, 0, 0, 2]);
        assert_eq!(b[3].to_ne_bytes(), [0, 0, 0, 0x0b]);
        for s in ["10.0.2.11:8080", "[fd00:2::b]:443"] {
            let sa: SocketAddr = s.parse().unwrap();
            let back = socket_addr_of(&wire_addr(sa.ip()), sa.port().to_be(), family(sa.ip()));
            assert_eq!(back, sa);
        }
    }
}
