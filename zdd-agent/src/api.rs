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
    /// Starts a canary: new flows move to `to` step by step (`steps`: percentages of new
    /// flows, or names of the service's cohorts, whose sources are pinned to `to`), with an
    /// analysis at the end of every step that compares `to` with the baseline.
    Canary {
        service: String,
        to: String,
        /// `["internal", "10", "50", "100"]`.
        steps: Vec<String>,
        /// How long each step lasts before its analysis (default `[services.canary]
        /// interval`, else 30s).
        #[serde(default)]
        interval: Option<String>,
        /// The group new flows come back to on a rollback (default: the group with the
        /// largest share now).
        #[serde(default)]
        baseline: Option<String>,
        /// A shell command run at the end of every step (as the requesting user); a
        /// non-zero exit fails the step.
        #[serde(default)]
        check: Option<String>,
        /// New flows the canary group must have had in a step for its analysis to count
        /// (default `[services.canary] min_flows`).
        #[serde(default)]
        min_flows: Option<u64>,
    },
    /// Starts a rolling update: batch by batch, drain → `exec` → health → restore.
    Rolling {
        service: String,
        /// `"1"` (backends per batch) or `"25%"` (of the service's backends, rounded up).
        batch: String,
        /// The user's update step, run by `sh -c` as the requesting user, once per backend,
        /// with ZDD_SERVICE, ZDD_BACKEND, ZDD_ADDR, ZDD_IP, ZDD_PORT, ZDD_GROUP, ZDD_BATCH.
        exec: String,
        /// Longest wait for a batch's flows to end (default 60s).
        #[serde(default)]
        drain_timeout: Option<String>,
        /// Longest run of `exec` (default 5m).
        #[serde(default)]
        exec_timeout: Option<String>,
        /// Longest wait for the updated backends to pass `rise` probes (default 60s).
        #[serde(default)]
        health_timeout: Option<String>,
    },
    /// Stops a deployment's clock where it is (a canary keeps its split).
    Pause {
        service: String,
    },
    /// Continues a paused deployment; a stopped rolling update retries its batch.
    Resume {
        service: String,
    },
    /// Finishes a deployment now: a canary goes to 100% at once; a rolling update runs its
    /// remaining batches without waiting on a pause.
    Promote {
        service: String,
    },
    /// Stops a deployment: a canary goes back to its baseline (cohort pins removed); a
    /// rolling update stops where it is (the batch in progress stays drained).
    Abort {
        service: String,
    },
    /// Deployments in progress and past ones (newest first, `limit` default 20).
    Deployments {
        #[serde(default)]
        service: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
    },
}

impl Command {
    /// True for requests that change nothing (open to every peer that can connect).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Command::Status { .. }
                | Command::Stats
                | Command::Events { .. }
                | Command::Deployments { .. }
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
            Command::Canary { .. } => "canary",
            Command::Rolling { .. } => "rolling",
            Command::Pause { .. } => "pause",
            Command::Resume { .. } => "resume",
            Command::Promote { .. } => "promote",
            Command::Abort { .. } => "abort",
            Command::Deployments { .. } => "deployments",
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
    /// The deployment in progress (running or paused), if any.
    #[serde(default)]
    pub deployment: Option<DeploymentStatus>,
}

/// `deployments`: those in progress, then past ones, newest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DeploymentsResult {
    pub active: Vec<DeploymentStatus>,
    pub past: Vec<DeploymentStatus>,
}

/// One deployment as the API shows it (also the answer to `canary`, `rolling`, `pause`,
/// `resume`, `promote` and `abort`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DeploymentStatus {
    /// Increasing per agent state directory, never reused.
    pub id: u64,
    pub service: String,
    /// `canary` or `rolling`.
    pub kind: String,
    /// `running`, `paused` (clock stopped: by `pause`, or waiting for a person after an
    /// inconclusive analysis), `stopped` (a rolling batch failed: `resume` retries it,
    /// `abort` ends it), then one of the outcomes `succeeded`, `rolled_back` (a canary's
    /// analysis failed), `aborted`.
    pub state: String,
    /// True for `succeeded`, `rolled_back` and `aborted`.
    pub finished: bool,
    /// Unix ms.
    pub started_ms: u64,
    #[serde(default)]
    pub ended_ms: Option<u64>,
    /// Until now for a deployment in progress.
    pub duration_ms: u64,
    /// Canary: the group rolled out, and the one rolled back to.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub baseline: Option<String>,
    /// Canary: the steps as given (`internal`, `10`, ...); rolling: one entry per batch,
    /// its backends joined by `,`.
    pub steps: Vec<String>,
    /// Index into `steps` of the step or batch in progress (== steps.len() when finished
    /// with success).
    pub step: usize,
    /// Rolling: `draining`, `updating` (exec running), `waiting_health`, `restoring`;
    /// canary: `analysing` while a step's analysis runs, else `observing`.
    pub phase: String,
    /// Unix ms when the current step began, and when it ends (None while paused or for
    /// rolling phases without a deadline).
    pub step_started_ms: u64,
    #[serde(default)]
    pub step_ends_ms: Option<u64>,
    /// Times the current step was extended for want of evidence.
    pub extensions: u32,
    /// The service's split now.
    pub split: Split,
    /// Canary: per group (baseline and canary), the signals over the current step so far.
    #[serde(default)]
    pub groups: Vec<GroupSignals>,
    /// Canary: the last analysis (of the last step that ended).
    #[serde(default)]
    pub analysis: Vec<CheckResult>,
    /// Why it is paused, stopped, rolled back; how it ended.
    pub message: String,
}

/// A group's data-path and probe signals over a window.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GroupSignals {
    pub group: String,
    pub new_flows: u64,
    /// TCP connection attempts (nat) and those the backends did not answer.
    pub attempts: u64,
    pub unanswered: u64,
    /// Resets sent by the group's backends.
    pub resets: u64,
    /// (unanswered + resets) / attempts, percent (None without attempts).
    #[serde(default)]
    pub failure_pct: Option<f64>,
    pub probes: u64,
    pub probe_failures: u64,
    #[serde(default)]
    pub probe_latency_ms: Option<f64>,
}

/// One criterion of an analysis.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CheckResult {
    /// `new_flows`, `failures`, `probe_failures`, `probe_latency`, `health`, a
    /// `[[services.analysis]]` name, or `check`.
    pub name: String,
    /// `pass`, `fail`, or `inconclusive` (not enough evidence: the step is extended).
    pub verdict: String,
    #[serde(default)]
    pub value: Option<f64>,
    /// In words: `2.1% ≤ baseline 0.3% + 1`, `exit status 3`, ...
    pub detail: String,
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
    "canary",
    "rolling",
    "pause",
    "resume",
    "promote",
    "abort",
    "deployments",
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
        assert_eq!(COMMANDS.len(), 21);
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
