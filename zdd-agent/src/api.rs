//! The control socket's protocol, shared by the agent (server) and the `zdd` client: one JSON
//! object a line in each direction.
//!
//! Request:  `{"v":1,"id":7,"cmd":"split","service":"web","split":{"blue":95,"green":5}}`
//! Response: `{"v":1,"id":7,"ok":true,"result":{...}}` or
//!           `{"v":1,"id":7,"ok":false,"error":{"code":"unknown_service","message":"..."}}`
//! Streams (`events` with `follow`, `status` with `watch`): any number of
//! `{"v":1,"id":7,"ok":true,"stream":true,"result":{...}}` lines, until the client closes.
//!
//! `v` is the protocol version (a request without it is taken as version 1); `id` is any JSON
//! value the client chooses, echoed in every line of the answer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted, newline included.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/zdd/zdd.sock";

/// One request line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Request {
    #[serde(default = "version_one")]
    pub v: u32,
    #[serde(default)]
    pub id: Value,
    #[serde(flatten)]
    pub cmd: Command,
}

fn version_one() -> u32 {
    1
}

/// Percent per group, as on the command line and in the config (`blue = 95`). Steps of 0.01.
pub type Split = BTreeMap<String, f64>;

/// What a request asks for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Services, splits, backends with state and rates. `watch`: a status line every
    /// `interval` (default 1s) until the client closes.
    Status {
        #[serde(default)]
        service: Option<String>,
        #[serde(default)]
        watch: bool,
        #[serde(default)]
        interval: Option<String>,
    },
    /// Data-path counters.
    Stats,
    /// Recent events (`limit`, default 100), then with `follow` every new one as it happens.
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Sets a service's split at once.
    Split {
        service: String,
        split: Split,
    },
    /// Blue-green: all new flows (new clients) to `to`.
    Switch {
        service: String,
        to: String,
        #[serde(default)]
        force: bool,
    },
    /// Back to the split before the last change.
    Rollback {
        service: String,
    },
    BackendAdd {
        service: String,
        name: String,
        addr: String,
        group: String,
        #[serde(default)]
        weight: Option<u32>,
    },
    /// Drains first (up to `timeout`, default 30s) then removes; `now`: at once.
    BackendRemove {
        service: String,
        name: String,
        #[serde(default)]
        now: bool,
        #[serde(default)]
        timeout: Option<String>,
    },
    BackendSet {
        service: String,
        name: String,
        weight: u32,
    },
    /// No new flows; with `wait` the answer comes when no flow is left or after `timeout`
    /// (default 60s).
    BackendDrain {
        service: String,
        name: String,
        #[serde(default)]
        wait: bool,
        #[serde(default)]
        timeout: Option<String>,
    },
    BackendUndrain {
        service: String,
        name: String,
    },
    Pin {
        service: String,
        source: String,
        group: String,
    },
    Unpin {
        service: String,
        source: String,
    },
    /// Applies a whole config file's services (TOML text), or only says what would change.
    Apply {
        config: String,
        #[serde(default)]
        dry_run: bool,
    },
}

impl Command {
    /// True for requests that change nothing (open to every peer that can connect).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Command::Status { .. } | Command::Stats | Command::Events { .. }
        )
    }

    /// The request's name, as in `cmd`.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status { .. } => "status",
            Command::Stats => "stats",
            Command::Events { .. } => "events",
            Command::Split { .. } => "split",
            Command::Switch { .. } => "switch",
            Command::Rollback { .. } => "rollback",
            Command::BackendAdd { .. } => "backend_add",
            Command::BackendRemove { .. } => "backend_remove",
            Command::BackendSet { .. } => "backend_set",
            Command::BackendDrain { .. } => "backend_drain",
            Command::BackendUndrain { .. } => "backend_undrain",
            Command::Pin { .. } => "pin",
            Command::Unpin { .. } => "unpin",
            Command::Apply { .. } => "apply",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Results. Every `result` is one of these, as JSON.
// ---------------------------------------------------------------------------------------------

/// `status`: every service (or the one asked for).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusResult {
    pub services: Vec<ServiceStatus>,
    /// The config file's services differ from the live state (runtime changes since it was
    /// last applied, or an edited file not applied yet).
    pub differs_from_file: bool,
    pub config_file: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub forwarding: String,
    pub affinity: String,
    pub split: Split,
    /// What `rollback` would restore (None: no earlier split).
    pub previous_split: Option<Split>,
    pub pins: Vec<PinStatus>,
    pub backends: Vec<BackendStatus>,
    /// The live service differs from the config file's (None: same; else what differs).
    pub differs_from_file: Option<String>,
    /// Groups in panic mode: too few healthy backends, so all configured ones get flows.
    #[serde(default)]
    pub panic_groups: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PinStatus {
    pub source: String,
    pub group: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub name: String,
    pub addr: String,
    pub group: String,
    pub weight: u32,
    /// `serving`, `draining` (no new flows, flows left), `drained` (no new flows, none
    /// left), `removed` (being removed after its drain).
    pub state: String,
    /// Flows in the flow table on this backend that have not ended.
    pub active_flows: u64,
    /// New flows per second and bytes per second (both directions the data path sees), over
    /// the last few seconds.
    pub new_flows_per_s: f64,
    pub bytes_per_s: f64,
    /// `up`, `down`, `starting` (not probed yet: no new flows), or `unchecked` (no health
    /// checking for the service).
    #[serde(default)]
    pub health: String,
    /// The last probe's result (`status 200 in 1.2 ms`, `timeout after 500 ms`, ...).
    #[serde(default)]
    pub last_probe: Option<String>,
    #[serde(default)]
    pub probe_latency_ms: Option<f64>,
    /// Why it is down.
    #[serde(default)]
    pub down_reason: Option<String>,
    /// The weight the data path uses now (0 when down, draining or starting; ramping during
    /// slow start; the configured weight in panic mode).
    #[serde(default)]
    pub effective_weight: u32,
}

/// `stats`: the data path's counters, summed over CPUs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StatsResult {
    /// Global counters by name (`pass`, `forward`, ... as in the README).
    pub global: BTreeMap<String, u64>,
    pub services: Vec<CounterRow>,
    pub backends: Vec<CounterRow>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CounterRow {
    /// Service or `service/backend`.
    pub name: String,
    pub addr: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Who made a change.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Actor {
    /// `socket` (with uid/pid), `config` (SIGHUP or start), `agent` (the agent itself).
    pub via: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
}

/// One event: every change and state transition.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Increasing, never reused (continues from the journal after a restart).
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub who: Actor,
    /// `split`, `switch`, `rollback`, `backend_add`, `drain`, `apply`, `start`, ...
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// One line for people.
    pub message: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub before: Value,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub after: Value,
}

/// The answer to a change: what it did, in words and as before/after.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ChangeResult {
    pub message: String,
    /// The events the change recorded.
    pub events: Vec<Event>,
}

/// `backend_drain` with `wait`, and `backend_remove`: how the drain ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DrainResult {
    pub message: String,
    /// Flows left when the command returned (0: drained).
    pub remaining_flows: u64,
    pub waited_ms: u64,
    pub timed_out: bool,
}

/// `apply`: the difference between the live state and the file, and whether it was applied.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ApplyResult {
    /// One line per difference (`web: split blue=100 -> blue=50 green=50`).
    pub changes: Vec<String>,
    pub applied: bool,
    pub dry_run: bool,
}

/// Stable error codes: scripts match on these, people read the message.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not an object of the documented shape.
    BadRequest,
    UnknownCommand,
    UnsupportedVersion,
    /// The request line is longer than `MAX_REQUEST_BYTES`.
    TooLarge,
    /// A request started and was not finished in time.
    Timeout,
    /// A change from a peer that is neither root nor in `socket_group`.
    PermissionDenied,
    UnknownService,
    UnknownBackend,
    UnknownGroup,
    /// A value out of range or a state that fails validation (the message says which).
    Invalid,
    /// Refused in the current state (e.g. a switch to a group without a backend that can
    /// take traffic, without `force`).
    Refused,
    /// The maps could not be written; nothing changed.
    NotApplied,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Timeout => "timeout",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::UnknownService => "unknown_service",
            ErrorCode::UnknownBackend => "unknown_backend",
            ErrorCode::UnknownGroup => "unknown_group",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Refused => "refused",
            ErrorCode::NotApplied => "not_applied",
            ErrorCode::Internal => "internal",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// One response line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub v: u32,
    pub id: Value,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    /// A line of a stream: more follow.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

impl Response {
    pub fn ok(id: Value, result: Value) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            result: Some(result),
            error: None,
            stream: false,
        }
    }

    pub fn stream(id: Value, result: Value) -> Response {
        Response {
            stream: true,
            ..Response::ok(id, result)
        }
    }

    pub fn err(id: Value, e: ApiError) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            result: None,
            error: Some(e),
            stream: false,
        }
    }

    /// The line to send (no newline).
    pub fn to_line(&self) -> String {
        // Serializing these types cannot fail (string keys, no non-finite floats).
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                "{{\"v\":{PROTOCOL_VERSION},\"ok\":false,\"error\":{{\"code\":\"internal\",\"message\":\"encoding the answer: {e}\"}}}}"
            )
        })
    }
}

/// Parses a request line, with an error that says what was wrong.
pub fn parse_request(line: &str) -> Result<Request, (Value, ApiError)> {
    let v: Value = serde_json::from_str(line).map_err(|e| {
        (
            Value::Null,
            ApiError::new(ErrorCode::BadRequest, format!("not JSON: {e}")),
        )
    })?;
    let id = v.get("id").cloned().unwrap_or(Value::Null);
    let Some(obj) = v.as_object() else {
        return Err((
            id,
            ApiError::new(
                ErrorCode::BadRequest,
                "a request is a JSON object: {\"v\":1,\"id\":1,\"cmd\":\"status\"}",
            ),
        ));
    };
    let version = obj.get("v").map(|v| v.as_u64());
    match version {
        None => {}
        Some(Some(n)) if n == PROTOCOL_VERSION as u64 => {}
        Some(_) => {
            return Err((
                id,
                ApiError::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "protocol version {} is not supported: this agent speaks {PROTOCOL_VERSION}",
                        obj["v"]
                    ),
                ),
            ));
        }
    }
    let Some(cmd) = obj.get("cmd").and_then(Value::as_str).map(str::to_string) else {
        return Err((
            id,
            ApiError::new(ErrorCode::BadRequest, "missing \"cmd\" (a string)"),
        ));
    };
    if !COMMANDS.contains(&cmd.as_str()) {
        return Err((
            id,
            ApiError::new(
                ErrorCode::UnknownCommand,
                format!("unknown command {cmd:?}; known: {}", COMMANDS.join(", ")),
            ),
        ));
    }
    serde_json::from_value::<Request>(v).map_err(|e| {
        (
            id,
            ApiError::new(ErrorCode::BadRequest, format!("{cmd}: {e}")),
        )
    })
}

/// Every `cmd` the agent knows.
pub const COMMANDS: &[&str] = &[
    "status",
    "stats",
    "events",
    "split",
    "switch",
    "rollback",
    "backend_add",
    "backend_remove",
    "backend_set",
    "backend_drain",
    "backend_undrain",
    "pin",
    "unpin",
    "apply",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = parse_request(
            r#"{"v":1,"id":7,"cmd":"split","service":"web","split":{"blue":95,"green":5}}"#,
        )
        .unwrap();
        assert_eq!(r.id, Value::from(7));
        match &r.cmd {
            Command::Split { service, split } => {
                assert_eq!(service, "web");
                assert_eq!(split["blue"], 95.0);
            }
            c => panic!("{c:?}"),
        }
        let back = serde_json::to_string(&r).unwrap();
        assert_eq!(parse_request(&back).unwrap(), r);
        // No version: version 1.
        let r = parse_request(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r.v, 1);
        assert!(r.cmd.is_read_only());
        assert_eq!(COMMANDS.len(), 14);
    }

    #[test]
    fn malformed_requests_get_precise_errors() {
        let code = |l: &str| parse_request(l).unwrap_err().1.code;
        assert_eq!(code("not json"), ErrorCode::BadRequest);
        assert_eq!(code("[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"id":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"cmd":"explode"}"#), ErrorCode::UnknownCommand);
        assert_eq!(
            code(r#"{"v":2,"cmd":"status"}"#),
            ErrorCode::UnsupportedVersion
        );
        let (id, e) =
            parse_request(r#"{"id":"a","cmd":"split","service":"web","split":"x"}"#).unwrap_err();
        assert_eq!(id, Value::from("a"));
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.starts_with("split:"), "{e}");
        let e = parse_request(r#"{"cmd":"rollback","service":"web","extra":1}"#).unwrap_err();
        assert!(e.1.message.contains("extra"), "{}", e.1);
    }

    #[test]
    fn responses_serialize_as_documented() {
        let ok = Response::ok(Value::from(1), serde_json::json!({"a": 1})).to_line();
        assert_eq!(ok, r#"{"v":1,"id":1,"ok":true,"result":{"a":1}}"#);
        let e = Response::err(
            Value::from(2),
            ApiError::new(ErrorCode::UnknownService, "no service \"x\""),
        )
        .to_line();
        assert_eq!(
            e,
            r#"{"v":1,"id":2,"ok":false,"error":{"code":"unknown_service","message":"no service \"x\""}}"#
        );
    }
}
