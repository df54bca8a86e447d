//! Prometheus HTTP API client for canary analysis: one instant query gives one number, as in
//! Flagger's and Argo Rollouts' metric checks. Queries are templates (`{{group}}` and so on)
//! rendered by [`render_template`] before they are sent.

use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

/// An answer larger than this is refused: a canary query yields one number, so a huge answer
/// means a query that was not aggregated, and reading it whole would only cost memory.
const MAX_BODY: usize = 4 << 20;

/// How much of a non-JSON error body goes into [`PromError::Status`].
const EXCERPT_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("Prometheus URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
    #[error("connecting to {url} failed: {reason}")]
    Connect { url: String, reason: String },
    #[error("{url} did not answer within {after:?} (timeout)")]
    Timeout { url: String, after: Duration },
    #[error("request to {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("{url} answered HTTP {status}: {excerpt}")]
    Status {
        url: String,
        status: u16,
        excerpt: String,
    },
    #[error("Prometheus API error ({error_type}): {error}")]
    Api { error_type: String, error: String },
    #[error("the query returned {0} series; aggregate it to one (e.g. sum(...))")]
    TooManySeries(usize),
    #[error("cannot decode Prometheus' answer: {0}")]
    Decode(String),
}

/// A Prometheus server. Cloning is cheap: the clones share one connection pool.
#[derive(Clone, Debug)]
pub struct PromClient {
    /// `{base}/api/v1/query`, parsed once.
    query_url: Url,
    timeout: Duration,
    http: reqwest::Client,
}

impl PromClient {
    /// `base_url` is where Prometheus' API lives, e.g. `http://127.0.0.1:9090` (a path prefix
    /// such as `http://host/prometheus` is kept). `timeout` bounds each query, connect included.
    pub fn new(base_url: &str, timeout: Duration) -> Result<PromClient, PromError> {
        let bad = |reason: String| PromError::BadUrl {
            url: base_url.to_string(),
            reason,
        };
        let base = check_url(base_url, false).map_err(bad)?;
        if timeout.is_zero() {
            return Err(PromError::Client(
                "the query timeout must be above zero".into(),
            ));
        }
        let query_url = Url::parse(&format!(
            "{}/api/v1/query",
            base.as_str().trim_end_matches('/')
        ))
        .map_err(|e| bad(e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| PromError::Client(error_chain(&e)))?;
        Ok(PromClient {
            query_url,
            timeout,
            http,
        })
    }

    /// Instant query. `Ok(None)` is "no data": an empty vector, or NaN/±Inf (e.g. a ratio over
    /// no requests). `Ok(Some(v))` for a scalar or a one-sample vector.
    pub async fn query(&self, promql: &str) -> Result<Option<f64>, PromError> {
        let url = self.query_url.as_str();
        let resp = self
            .http
            .get(self.query_url.clone())
            .query(&[("query", promql)])
            .send()
            .await
            .map_err(|e| self.request_error(&e))?;
        let status = resp.status();
        let body = read_limited(resp)
            .await
            .map_err(|e| self.request_error(&e))?;
        let body = match body {
            Some(b) => String::from_utf8_lossy(&b).into_owned(),
            None => {
                return Err(PromError::Decode(format!(
                    "the answer is larger than {} MiB; aggregate the query to one series",
                    MAX_BODY >> 20
                )));
            }
        };
        if !status.is_success() {
            // Prometheus answers bad queries with 400/422 and its usual JSON error, which says
            // more than the status; anything else (a proxy's page) is shown as an excerpt.
            if let Err(e @ PromError::Api { .. }) = decode(&body) {
                return Err(e);
            }
            return Err(PromError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                excerpt: excerpt(&body),
            });
        }
        decode(&body)
    }

    fn request_error(&self, e: &reqwest::Error) -> PromError {
        let url = self.query_url.to_string();
        if e.is_timeout() {
            PromError::Timeout {
                url,
                after: self.timeout,
            }
        } else if e.is_connect() {
            PromError::Connect {
                url,
                reason: error_chain(e),
            }
        } else {
            PromError::Request {
                url,
                reason: error_chain(e),
            }
        }
    }
}

/// The body, or `None` if it is larger than [`MAX_BODY`].
async fn read_limited(mut resp: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_BODY {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// An error and its causes on one line. reqwest's own message is only "error sending request
/// for url (...)"; the cause ("Connection refused") is further down the chain.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        // hyper and reqwest often repeat the inner message in the outer one.
        if !parts.last().is_some_and(|p| p.contains(&m)) {
            parts.push(m);
        }
        cur = s.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// The start of `body` on one line, for error messages.
pub(crate) fn excerpt(body: &str) -> String {
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return "(empty body)".into();
    }
    match one_line.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

/// Checks an http(s) URL as written in the config. `allow_query`: webhooks may carry a token
/// in the query; base URLs may not, since a path is appended to them.
pub(crate) fn check_url(s: &str, allow_query: bool) -> Result<Url, String> {
    let url = Url::parse(s)
        .map_err(|e| format!("not a URL ({e}); write it like \"http://127.0.0.1:9090\""))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme {:?} is not supported; use http:// or https://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host; write it like \"http://127.0.0.1:9090\"".into());
    }
    if !allow_query && url.query().is_some() {
        return Err(
            "has a query part (\"?...\"); write the base URL only, e.g. \"http://127.0.0.1:9090\""
                .into(),
        );
    }
    if url.fragment().is_some() {
        return Err("has a fragment (\"#...\"); remove it".into());
    }
    Ok(url)
}

/// The API's envelope: `data` on success, `errorType`/`error` on failure.
#[derive(Deserialize)]
struct Envelope {
    status: String,
    data: Option<Data>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct Sample {
    /// `[unix seconds, "value"]`
    value: (f64, String),
}

/// Prometheus' JSON answer to an instant query → one number, or `None` for no data.
pub fn decode(body: &str) -> Result<Option<f64>, PromError> {
    let bad = |m: String| PromError::Decode(m);
    let env: Envelope = serde_json::from_str(body)
        .map_err(|e| bad(format!("{e}; the body starts with: {}", excerpt(body))))?;
    match env.status.as_str() {
        "success" => {}
        "error" => {
            return Err(PromError::Api {
                error_type: env.error_type.unwrap_or_else(|| "unknown".into()),
                error: env.error.unwrap_or_else(|| "(no message)".into()),
            });
        }
        s => return Err(bad(format!("unknown status {s:?}"))),
    }
    let data = env
        .data
        .ok_or_else(|| bad("status \"success\" without \"data\"".into()))?;
    let text = match data.result_type.as_str() {
        "scalar" => {
            let (_, v): (f64, String) = serde_json::from_value(data.result)
                .map_err(|e| bad(format!("scalar result: {e}")))?;
            v
        }
        "vector" => {
            let mut samples: Vec<Sample> = serde_json::from_value(data.result)
                .map_err(|e| bad(format!("vector result: {e}")))?;
            match samples.len() {
                0 => return Ok(None),
                1 => samples.remove(0).value.1,
                n => return Err(PromError::TooManySeries(n)),
            }
        }
        "matrix" => {
            return Err(bad(
                "the query returned a range vector (matrix); wrap the range selector in a \
                 function such as rate(...[1m]) or avg_over_time(...[1m])"
                    .into(),
            ));
        }
        t => {
            return Err(bad(format!(
                "the query returned a {t}, not a number; write a query whose result is a scalar \
                 or a single-series vector"
            )));
        }
    };
    let v =
        parse_value(&text).ok_or_else(|| bad(format!("sample value {text:?} is not a number")))?;
    Ok(v.is_finite().then_some(v))
}

/// Prometheus writes sample values as Go's strconv does: "1.5", "1e+06", "NaN", "+Inf", "-Inf".
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// Replaces each `{{name}}` (spaces allowed inside: `{{ name }}`) with its value from `vars`.
/// Values go in as they are, unescaped: they are zdd's own names (service, group, interval).
/// An unknown name, an empty `{{}}` or an unclosed `{{` is an error that names it.
pub fn render_template(template: &str, vars: &[(&str, &str)]) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            let at = template.len() - rest.len() + open;
            return Err(format!(
                "unclosed \"{{{{\" at byte {at} ({:?}); close it with \"}}}}\"",
                excerpt_at(&rest[open..])
            ));
        };
        let name = after[..close].trim();
        if name.is_empty() {
            return Err(format!(
                "empty \"{{{{}}}}\"; use one of {}",
                known_names(vars)
            ));
        }
        match vars.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => out.push_str(v),
            None => {
                return Err(format!(
                    "unknown variable {{{{{name}}}}}; use one of {}",
                    known_names(vars)
                ));
            }
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn known_names(vars: &[(&str, &str)]) -> String {
    if vars.is_empty() {
        return "(none: this template takes no variables)".into();
    }
    vars.iter()
        .map(|(k, _)| format!("{{{{{k}}}}}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Up to 20 characters from `s`, to show where an unclosed `{{` is.
fn excerpt_at(s: &str) -> &str {
    match s.char_indices().nth(20) {
        Some((cut, _)) => &s[..cut],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(values: &[&str]) -> String {
        let samples: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!(r#"{{"metric":{{"pod":"p{i}"}},"value":[1714000000.123,"{v}"]}}"#)
            })
            .collect();
        format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#,
            samples.join(",")
        )
    }

    #[test]
    fn decode_vector_one_sample() {
        assert_eq!(decode(&vector(&["0.25"])).unwrap(), Some(0.25));
        assert_eq!(decode(&vector(&["1e+06"])).unwrap(), Some(1e6));
        assert_eq!(decode(&vector(&["-3"])).unwrap(), Some(-3.0));
        assert_eq!(decode(&vector(&["0"])).unwrap(), Some(0.0));
    }

    #[test]
    fn decode_empty_vector_is_no_data() {
        assert_eq!(decode(&vector(&[])).unwrap(), None);
    }

    #[test]
    fn decode_nan_and_inf_are_no_data() {
        for v in ["NaN", "+Inf", "-Inf"] {
            assert_eq!(decode(&vector(&[v])).unwrap(), None, "{v}");
        }
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"NaN"]}}"#;
        assert_eq!(decode(scalar).unwrap(), None);
    }

    #[test]
    fn decode_scalar() {
        let body =
            r#"{"status":"success","data":{"resultType":"scalar","result":[1714000000,"42.5"]}}"#;
        assert_eq!(decode(body).unwrap(), Some(42.5));
    }

    #[test]
    fn decode_many_series_says_aggregate() {
        let e = decode(&vector(&["1", "2", "3"])).unwrap_err();
        assert!(matches!(e, PromError::TooManySeries(3)), "{e:?}");
        let m = e.to_string();
        assert!(m.contains("returned 3 series"), "{m}");
        assert!(m.contains("sum(...)"), "{m}");
    }

    #[test]
    fn decode_api_error() {
        let body = r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:5: parse error"}"#;
        match decode(body).unwrap_err() {
            PromError::Api { error_type, error } => {
                assert_eq!(error_type, "bad_data");
                assert!(error.contains("parse error"), "{error}");
            }
            e => panic!("{e:?}"),
        }
        let m = decode(body).unwrap_err().to_string();
        assert!(m.contains("bad_data") && m.contains("parse error"), "{m}");
    }

    #[test]
    fn decode_api_error_without_details() {
        match decode(r#"{"status":"error"}"#).unwrap_err() {
            PromError::Api { error_type, error } => {
                assert_eq!(error_type, "unknown");
                assert_eq!(error, "(no message)");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn decode_warnings_are_ignored() {
        let body = r#"{"status":"success","warnings":["PromQL info: something"],"data":{"resultType":"vector","result":[{"metric":{},"value":[1,"7"]}]}}"#;
        assert_eq!(decode(body).unwrap(), Some(7.0));
    }

    #[test]
    fn decode_matrix_and_string_are_errors() {
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"1"],[2,"2"]]}]}}"#;
        let m = decode(matrix).unwrap_err().to_string();
        assert!(m.contains("range vector"), "{m}");
        let string = r#"{"status":"success","data":{"resultType":"string","result":[1,"hello"]}}"#;
        let m = decode(string).unwrap_err().to_string();
        assert!(m.contains("string"), "{m}");
    }

    #[test]
    fn decode_garbage() {
        for body in [
            "",
            "<html>502 Bad Gateway</html>",
            "{}",
            r#"{"status":"success"}"#,
            r#"{"status":"weird","data":null}"#,
            r#"{"status":"success","data":{"resultType":"vector","result":{}}}"#,
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,2]}]}}"#,
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"abc"]}]}}"#,
            r#"{"status":"success","data":{"resultType":"scalar","result":"1"}}"#,
        ] {
            match decode(body) {
                Err(PromError::Decode(m)) => assert!(!m.is_empty()),
                other => panic!("{body:?}: {other:?}"),
            }
        }
        let m = decode("<html>502 Bad Gateway</html>")
            .unwrap_err()
            .to_string();
        assert!(m.contains("502 Bad Gateway"), "{m}");
    }

    #[test]
    fn parse_value_go_forms() {
        assert_eq!(parse_value("1.5"), Some(1.5));
        assert_eq!(parse_value("1e-07"), Some(1e-7));
        assert!(parse_value("NaN").unwrap().is_nan());
        assert_eq!(parse_value("+Inf"), Some(f64::INFINITY));
        assert_eq!(parse_value("-Inf"), Some(f64::NEG_INFINITY));
        assert_eq!(parse_value("x"), None);
        assert_eq!(parse_value(""), None);
    }

    const VARS: &[(&str, &str)] = &[
        ("group", "green"),
        ("baseline", "blue"),
        ("service", "web"),
        ("interval", "30s"),
    ];

    #[test]
    fn render_substitutes() {
        let t = r#"sum(rate(http_requests_total{service="{{service}}",group="{{ group }}",code=~"5.."}[{{interval}}])) / sum(rate(http_requests_total{service="{{service}}",group="{{group}}"}[{{interval}}]))"#;
        assert_eq!(
            render_template(t, VARS).unwrap(),
            r#"sum(rate(http_requests_total{service="web",group="green",code=~"5.."}[30s])) / sum(rate(http_requests_total{service="web",group="green"}[30s]))"#
        );
        assert_eq!(
            render_template("{{baseline}}{{group}}", VARS).unwrap(),
            "bluegreen"
        );
        assert_eq!(render_template("{{\tgroup\n}}", VARS).unwrap(), "green");
    }

    #[test]
    fn render_without_placeholders_is_unchanged() {
        for t in ["", "up", "x{a=\"b\"}", "a}}b", "{single}", "{ {group} }"] {
            assert_eq!(render_template(t, VARS).unwrap(), t);
        }
    }

    #[test]
    fn render_unknown_name() {
        let e = render_template("x{g=\"{{grup}}\"}", VARS).unwrap_err();
        assert!(e.contains("{{grup}}"), "{e}");
        assert!(e.contains("{{group}}") && e.contains("{{interval}}"), "{e}");
    }

    #[test]
    fn render_empty_name() {
        let e = render_template("a{{ }}b", VARS).unwrap_err();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn render_unclosed() {
        let e = render_template("rate(x[{{interval])", VARS).unwrap_err();
        assert!(e.contains("unclosed"), "{e}");
        assert!(e.contains("byte 7"), "{e}");
        assert!(e.contains("{{interval])"), "{e}");
        let e = render_template("{{group}} and {{", VARS).unwrap_err();
        assert!(e.contains("unclosed") && e.contains("byte 14"), "{e}");
    }

    #[test]
    fn render_no_vars() {
        let e = render_template("{{group}}", &[]).unwrap_err();
        assert!(e.contains("{{group}}") && e.contains("no variables"), "{e}");
    }

    #[test]
    fn render_values_are_not_rescanned() {
        // A value that looks like a placeholder stays as it is.
        let vars = [("a", "{{b}}")];
        assert_eq!(render_template("{{a}}", &vars).unwrap(), "{{b}}");
    }

    #[test]
    fn render_multibyte() {
        assert_eq!(render_template("é{{group}}ü", VARS).unwrap(), "égreenü");
        let e = render_template("éééééééééééééééééééééééé{{ééééééééééééééééééééééééé", VARS)
            .unwrap_err();
        assert!(e.contains("unclosed"), "{e}");
    }

    #[test]
    fn client_rejects_bad_urls() {
        let t = Duration::from_secs(1);
        for (url, want) in [
            ("127.0.0.1:9090", "not a URL"),
            ("ftp://prom:9090", "scheme"),
            ("http://prom:9090/?x=1", "query part"),
            ("http://prom:9090/#top", "fragment"),
            ("not a url", "not a URL"),
        ] {
            let e = PromClient::new(url, t).unwrap_err();
            assert!(matches!(e, PromError::BadUrl { .. }), "{url}: {e:?}");
            let m = e.to_string();
            assert!(m.contains(want), "{url}: {m}");
        }
        assert!(PromClient::new("http://prom:9090", Duration::ZERO).is_err());
    }

    #[test]
    fn client_builds_query_url() {
        let t = Duration::from_secs(1);
        for (base, want) in [
            (
                "http://127.0.0.1:9090",
                "http://127.0.0.1:9090/api/v1/query",
            ),
            (
                "http://127.0.0.1:9090/",
                "http://127.0.0.1:9090/api/v1/query",
            ),
            (
                "https://mon.example/prometheus/",
                "https://mon.example/prometheus/api/v1/query",
            ),
        ] {
            assert_eq!(PromClient::new(base, t).unwrap().query_url.as_str(), want);
        }
    }

    #[test]
    fn excerpt_is_one_short_line() {
        assert_eq!(excerpt("  a\n\n b \t c "), "a b c");
        assert_eq!(excerpt(""), "(empty body)");
        let long = "x".repeat(500);
        let e = excerpt(&long);
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
    }

    // Network failures, on local sockets: what a user sees when Prometheus is down or hangs,
    // or a proxy in front of it fails.

    #[tokio::test(flavor = "current_thread")]
    async fn query_connect_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let c =
            PromClient::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2)).unwrap();
        let e = c.query("up").await.unwrap_err();
        assert!(matches!(e, PromError::Connect { .. }), "{e:?}");
        let m = e.to_string();
        assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}");
        assert!(m.to_lowercase().contains("refused"), "{m}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn query_timeout() {
        // Accepts (the kernel does) but never answers.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = PromClient::new(
            &format!("http://127.0.0.1:{port}"),
            Duration::from_millis(300),
        )
        .unwrap();
        let t = std::time::Instant::now();
        let e = c.query("up").await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(matches!(e, PromError::Timeout { .. }), "{e:?}");
        let m = e.to_string();
        assert!(m.contains("300ms") && m.contains("timeout"), "{m}");
        drop(l);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn query_http_error_from_a_proxy() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            let body = "<html><body>\n<h1>502 Bad Gateway</h1>\n</body></html>";
            write!(
                s,
                "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let c = PromClient::new(
            &format!("http://127.0.0.1:{port}/prom/"),
            Duration::from_secs(2),
        )
        .unwrap();
        let e = c.query("sum(rate(x[1m]))").await.unwrap_err();
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /prom/api/v1/query?query=sum%28rate%28x%5B1m%5D%29%29 "),
            "{request}"
        );
        match &e {
            PromError::Status {
                status, excerpt, ..
            } => {
                assert_eq!(*status, 502);
                assert_eq!(
                    excerpt,
                    "<html><body> <h1>502 Bad Gateway</h1> </body></html>"
                );
            }
            e => panic!("{e:?}"),
        }
        assert!(e.to_string().contains("HTTP 502"), "{e}");
    }
}
