//! `kind = "http"`: one request, judged like a user and like an instrument.
//!
//! Phases: `ttfb` (request sent → response headers) and `total` (→ body read). The body is
//! read under a size cap; JSON bodies follow the health contract (top-level `status`)
//! unless `read_status = false`; `subchecks` turns a `{name: {status, latency_ms}}` object
//! into series of their own. Each connection is fresh (no pooling), so every run pays and
//! measures DNS, TCP and TLS the way a new user would.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::Value;

use super::assert::{any_status, excerpt, json_path, JsonAssert, Re, StatusPattern};
use super::{Attempt, ErrorClass, Outcome, SubCheck};
use crate::chaos::fault::{Injection, Mode};
use crate::config::{duration::human, Errors, Interp, ProbeConfig, Rest, SpanError};

/// Largest sub-check `latency_ms` recorded (1 h, the top of the latency histograms).
const MAX_SUBCHECK_LATENCY_MS: f64 = 3_600_000.0;

/// The phases an HTTP run times.
pub const PHASES: [&str; 2] = ["ttfb", "total"];

/// The `User-Agent` every request carries.
pub const USER_AGENT: &str = concat!("watchpost/", env!("CARGO_PKG_VERSION"));

/// JSON Schema of this kind's keys (see `crate::probe::KIND_SCHEMAS`).
pub fn schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    <HttpFile as schemars::JsonSchema>::json_schema(g)
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    /// http:// or https:// URL.
    #[schemars(with = "Interp")]
    url: toml::Spanned<Interp>,
    /// Request method.
    #[serde(default = "default_method")]
    #[schemars(with = "String")]
    method: toml::Spanned<String>,
    /// Extra request headers (values may use `${ENV}`).
    #[serde(default)]
    headers: BTreeMap<String, Interp>,
    /// Request body.
    body: Option<Interp>,
    /// Redirects followed before giving up (0 = none).
    #[serde(default = "default_max_redirects")]
    max_redirects: usize,
    /// PEM file of extra CA certificates to trust, relative to the probe file.
    #[schemars(with = "Option<String>")]
    ca_file: Option<toml::Spanned<String>>,
    /// Largest body read, in bytes; larger is `body_too_large`.
    #[serde(default = "default_max_body")]
    max_body_bytes: u64,
    /// Let a top-level JSON `status` decide the outcome (health contract).
    #[serde(default = "yes")]
    read_status: bool,
    /// Dotted path of a `{name: {status, latency_ms | error}}` object to record as sub-checks.
    subchecks: Option<String>,
    /// Dotted JSON paths of health details worth seeing in an alert (`active_connections`,
    /// `checks.database.failures`): kept in the run's details under `health` and shown in
    /// every notification.
    #[serde(default)]
    details: Vec<String>,
    /// What a good response looks like.
    #[serde(default)]
    expect: Expect,
    /// What makes an otherwise good response degraded.
    #[serde(default)]
    degraded_when: DegradedWhen,
}

fn default_method() -> toml::Spanned<String> {
    toml::Spanned::new(0..0, "GET".into())
}
fn default_max_redirects() -> usize {
    5
}
fn default_max_body() -> u64 {
    1024 * 1024
}
fn yes() -> bool {
    true
}
fn default_status() -> Vec<StatusPattern> {
    vec![StatusPattern::Class(2)]
}

/// `[expect]`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Accepted status codes or classes (default `["2xx"]`).
    #[serde(default = "default_status")]
    pub status: Vec<StatusPattern>,
    /// The body must contain this text.
    pub body_contains: Option<String>,
    /// The body must match this regex.
    pub body_matches: Option<Re>,
    /// JSON assertions.
    #[serde(default)]
    pub json: Vec<JsonAssert>,
    /// The TLS certificate must be valid for at least this many more days.
    pub cert_min_days: Option<i64>,
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            status: default_status(),
            body_contains: None,
            body_matches: None,
            json: vec![],
            cert_min_days: None,
        }
    }
}

/// `[degraded_when]`.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DegradedWhen {
    /// Status codes or classes that mean degraded (207 always does).
    #[serde(default)]
    pub status: Vec<StatusPattern>,
    /// The body contains this text.
    pub body_contains: Option<String>,
    /// Any of these JSON assertions holds.
    #[serde(default)]
    pub json: Vec<JsonAssert>,
}

/// A validated HTTP probe.
#[derive(Debug, Clone)]
pub struct HttpSpec {
    /// Kept as the template for `Debug`: the expanded URL may carry a secret.
    pub url: Interp,
    pub method: reqwest::Method,
    pub headers: Vec<(String, Interp)>,
    pub body: Option<Interp>,
    pub max_redirects: usize,
    pub ca_pem: Option<Arc<Vec<u8>>>,
    pub max_body_bytes: u64,
    pub read_status: bool,
    pub subchecks: Option<String>,
    pub details: Vec<String>,
    pub expect: Expect,
    pub degraded_when: DegradedWhen,
}

/// Most `details` paths a probe may name.
pub const MAX_DETAIL_PATHS: usize = 16;

impl HttpSpec {
    /// Every problem of the file, each at its key; `budget` keys are checked against
    /// [`PHASES`] and the sub-checks.
    pub fn from_config(
        rest: Rest<'_>,
        dir: &Path,
        budget: &[toml::Spanned<String>],
    ) -> Result<Self, Errors> {
        let (f, mut errs) = rest.parse::<HttpFile>();
        let Some(f) = f else { return Err(errs) };
        // With an unreadable `subchecks`, a sub-check's budget cannot be told from a typo.
        if errs.read("subchecks") {
            let phases = PHASES.map(String::from);
            super::check_budget("http", &phases, f.subchecks.as_deref(), budget, &mut errs);
        }
        if f.details.len() > MAX_DETAIL_PATHS {
            errs.push(SpanError::key(
                &["details"],
                format!(
                    "details names {} paths; at most {MAX_DETAIL_PATHS}",
                    f.details.len()
                ),
            ));
        }
        let url_span = f.url.span();
        let url = f.url.into_inner();
        match url::Url::parse(&url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            Ok(u) => errs.push(SpanError::at(
                url_span,
                format!("url scheme {:?} is not http or https", u.scheme()),
            )),
            Err(e) => errs.push(SpanError::at(
                url_span,
                format!("invalid url {:?}: {e}", url.template()),
            )),
        }
        let method =
            reqwest::Method::from_bytes(f.method.get_ref().to_ascii_uppercase().as_bytes())
                .map_err(|_| {
                    SpanError::at(
                        f.method.span(),
                        format!("invalid method {:?}", f.method.get_ref()),
                    )
                });
        let method = errs.check(method);
        super::websocket::validate_headers(&f.headers, &mut errs);
        let ca_pem = errs.check(super::websocket::read_ca_file(dir, &f.ca_file));
        let (Some(method), Some(ca_pem)) = (method, ca_pem) else {
            return Err(errs);
        };
        errs.finish(HttpSpec {
            url,
            method,
            headers: f.headers.into_iter().collect(),
            body: f.body,
            max_redirects: f.max_redirects,
            ca_pem,
            max_body_bytes: f.max_body_bytes,
            read_status: f.read_status,
            details: f.details,
            subchecks: f.subchecks,
            expect: f.expect,
            degraded_when: f.degraded_when,
        })
    }
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// An HTTP probe with its client built.
pub struct HttpProbe {
    name: String,
    spec: HttpSpec,
    /// The spec's URL, parsed once rather than on every request.
    url: reqwest::Url,
    client: reqwest::Client,
    headers: HeaderMap,
    timeout: Duration,
    /// Sub-check series this probe has reported, capped at [`MAX_SUBCHECKS`]: the watched
    /// service does not decide how many series, rows and metrics we keep.
    known_subchecks: Mutex<super::SeriesBudget>,
}

/// Most distinct sub-check series one probe records over its life.
pub const MAX_SUBCHECKS: usize = 64;
/// Longest sub-check name recorded (characters).
pub const MAX_SUBCHECK_NAME: usize = 64;

/// Clients shared by probes with the same trust roots. A reqwest client carries a parsed
/// root store and TLS config; 10,000 probes must not hold 10,000 of them. Connections are
/// never pooled, so sharing a client shares no connection state. Redirects are followed by
/// [`HttpProbe::fetch`] itself (see there), never by the client. Owned by whoever builds the
/// probes (the pipeline, `check`), not by the process.
#[derive(Clone, Default)]
pub struct Clients(Arc<Mutex<HashMap<Option<Vec<u8>>, reqwest::Client>>>);

fn shared_client(
    clients: &Clients,
    ca_pem: Option<&Arc<Vec<u8>>>,
) -> anyhow::Result<reqwest::Client> {
    let key = ca_pem.map(|p| p.as_ref().clone());
    let mut map = clients.0.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = map.get(&key) {
        return Ok(c.clone());
    }
    let client = client_builder(ca_pem.map(|p| p.as_slice()))?.build()?;
    map.insert(key, client.clone());
    Ok(client)
}

/// How every probe client is built: no redirects, no referer, no pooling, TLS facts kept.
fn client_builder(ca_pem: Option<&[u8]>) -> anyhow::Result<reqwest::ClientBuilder> {
    let mut b = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .referer(false)
        .pool_max_idle_per_host(0)
        .tls_info(true);
    if let Some(pem) = ca_pem {
        for c in reqwest::Certificate::from_pem_bundle(pem)? {
            b = b.add_root_certificate(c);
        }
    }
    Ok(b)
}

/// Same scheme, host and port: configured headers may follow a redirect only there.
fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

impl HttpProbe {
    pub fn new(cfg: &ProbeConfig, spec: &HttpSpec, clients: &Clients) -> anyhow::Result<Self> {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        for (k, v) in &spec.headers {
            headers.insert(
                HeaderName::from_bytes(k.as_bytes())?,
                HeaderValue::from_str(v)?,
            );
        }
        Ok(HttpProbe {
            name: cfg.name.clone(),
            spec: spec.clone(),
            url: reqwest::Url::parse(&spec.url)?,
            client: shared_client(clients, spec.ca_pem.as_ref())?,
            headers,
            timeout: cfg.timeout,
            known_subchecks: Mutex::new(super::SeriesBudget::new(MAX_SUBCHECKS)),
        })
    }

    pub async fn run(&self) -> Attempt {
        self.run_with(None).await
    }

    /// One attempt under a rehearsal fault: a transport fault goes through the fault proxy
    /// as the client's HTTP proxy (same URL and Host; TLS, SNI and certificate check end to
    /// end through CONNECT);
    /// `http_status` replaces the real response's status and body before it is judged.
    pub async fn run_with(&self, fault: Option<&Injection>) -> Attempt {
        let mut a = Attempt::new();
        let via_client;
        let client = match fault.and_then(|f| f.via) {
            Some(via) => {
                // The fault proxy is the client's HTTP proxy: `https` goes through a
                // CONNECT tunnel (TLS, SNI and the certificate check stay the target's).
                let built = client_builder(self.spec.ca_pem.as_ref().map(|p| p.as_slice()))
                    .and_then(|b| {
                        let proxy = reqwest::Proxy::all(format!("http://{via}"))?;
                        Ok(b.proxy(proxy).build()?)
                    });
                match built {
                    Ok(c) => {
                        via_client = c;
                        &via_client
                    }
                    Err(e) => {
                        a.down(
                            ErrorClass::Internal,
                            format!("cannot build the client: {e:#}"),
                        );
                        return a;
                    }
                }
            }
            None => &self.client,
        };
        if let Some(mut resp) = self.fetch(client, &mut a).await {
            if let Some(Mode::HttpStatus { status, body }) = fault.map(|f| &f.mode) {
                resp.status = reqwest::StatusCode::from_u16(*status)
                    .unwrap_or(reqwest::StatusCode::BAD_GATEWAY);
                resp.body = body.as_bytes().to_vec();
                resp.content_type = String::new();
                a.detail("status", *status);
                a.detail("bytes", resp.body.len() as u64);
            }
            judge(&self.spec, &self.name, &resp, &mut a);
        }
        self.cap_subchecks(&mut a);
        a
    }

    /// Keep sub-checks already known, and new ones while under the cap; say how many were
    /// dropped (a body with 40,000 changing names must not grow 40,000 series).
    fn cap_subchecks(&self, a: &mut Attempt) {
        if a.subchecks.is_empty() {
            return;
        }
        let prefix_len = self.name.len() + self.spec.subchecks.as_deref().unwrap_or("").len() + 2;
        let dropped = self
            .known_subchecks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(&mut a.subchecks, |sc| {
                let name = sc.series.get(prefix_len..).unwrap_or("");
                name.chars().count() <= MAX_SUBCHECK_NAME
            });
        if dropped > 0 {
            a.detail("subchecks_dropped", dropped as u64);
            a.detail(
                "subchecks_note",
                format!(
                    "{dropped} sub-check(s) not recorded: at most {MAX_SUBCHECKS} series per probe, names up to {MAX_SUBCHECK_NAME} characters"
                ),
            );
        }
    }

    /// Send the request, following up to `max_redirects` redirects by hand: on a hop to
    /// another origin the configured headers (API keys, tokens) are dropped, and no hop ever
    /// carries a `Referer` (it would hold the original URL and its `?token=`). 301/302 of
    /// a non-GET and every 303 continue as GET without body, as browsers do. With
    /// `max_redirects = 0` the 3xx itself is the answer that is judged.
    async fn send_following_redirects(
        &self,
        client: &reqwest::Client,
        a: &mut Attempt,
        t0: Instant,
    ) -> Option<reqwest::Response> {
        let s = &self.spec;
        let mut url = self.url.clone();
        let origin = url.clone();
        let mut method = s.method.clone();
        let mut body = s.body.as_ref().map(|b| b.to_string());
        let mut hops = 0;
        loop {
            let headers = if same_origin(&origin, &url) {
                self.headers.clone()
            } else {
                let mut h = HeaderMap::new();
                h.insert(
                    reqwest::header::CACHE_CONTROL,
                    HeaderValue::from_static("no-cache"),
                );
                h
            };
            let left = self.timeout.saturating_sub(t0.elapsed());
            let mut req = client
                .request(method.clone(), url.clone())
                .headers(headers)
                .timeout(left.max(Duration::from_millis(1)));
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    // Messages never carry the URL: it may hold a `${ENV}` secret.
                    let (class, msg) = classify(&e.without_url(), self.timeout, "request");
                    a.down(class, msg);
                    return None;
                }
            };
            let status = resp.status();
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| url.join(l).ok());
            let (true, Some(next), false) =
                (status.is_redirection(), location, s.max_redirects == 0)
            else {
                return Some(resp);
            };
            if hops == s.max_redirects {
                a.down(
                    ErrorClass::TooManyRedirects,
                    format!(
                        "more than {} redirects (the last one to {})",
                        s.max_redirects,
                        crate::redact::redact_url(next.as_str())
                    ),
                );
                return None;
            }
            hops += 1;
            let code = status.as_u16();
            if code == 303 || (matches!(code, 301 | 302) && method != reqwest::Method::GET) {
                if method != reqwest::Method::HEAD {
                    method = reqwest::Method::GET;
                }
                body = None;
            }
            url = next;
        }
    }

    /// Send the request and read the body under the cap. Records `ttfb`, `total` and the
    /// response facts in `a`; `None` when the transaction itself failed (`a` says why).
    async fn fetch(&self, client: &reqwest::Client, a: &mut Attempt) -> Option<Fetched> {
        let s = &self.spec;
        let t0 = Instant::now();
        let resp = self.send_following_redirects(client, a, t0).await?;
        a.phase("ttfb", t0.elapsed());
        let status = resp.status();
        a.detail("status", status.as_u16());
        if resp.url() != &self.url {
            // Where redirects led, redacted like every URL we show (credentials, path
            // tokens and query values may be secrets).
            a.detail("final_url", crate::redact::redact_url(resp.url().as_str()));
        }
        let not_after = resp
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|t| t.peer_certificate())
            .and_then(der_not_after);
        let cert_days = not_after.map(|t| (t - chrono::Utc::now()).num_days());
        if let (Some(t), Some(days)) = (not_after, cert_days) {
            a.detail("cert_days_left", days);
            // Exact, for `watchpost_probe_cert_expiry_timestamp_seconds`.
            a.detail("cert_not_after", t.timestamp());
        }
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let body = match read_capped(resp, s.max_body_bytes).await {
            Ok(b) => b,
            Err(BodyError::TooLarge(n)) => {
                a.phase("total", t0.elapsed());
                a.down(
                    ErrorClass::BodyTooLarge,
                    format!(
                        "response body exceeds the {} byte cap (read {n} bytes, stopped)",
                        s.max_body_bytes
                    ),
                );
                return None;
            }
            Err(BodyError::Read(e)) => {
                let (class, msg) = classify(&e.without_url(), self.timeout, "body");
                a.down(class, format!("HTTP {}, then {msg}", status.as_u16()));
                return None;
            }
        };
        a.phase("total", t0.elapsed());
        a.detail("bytes", body.len() as u64);
        Some(Fetched {
            status,
            content_type,
            body,
            cert_days,
        })
    }
}

/// Judge a complete response as a run of `spec` would (no network): the health-body reader
/// on its own, for tests and fuzzing. Sub-check caps are not applied (they need the probe).
pub fn judge_response(
    spec: &HttpSpec,
    probe: &str,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> Attempt {
    let mut a = Attempt::new();
    let Ok(status) = reqwest::StatusCode::from_u16(status) else {
        a.down(
            ErrorClass::Protocol,
            format!("invalid HTTP status {status}"),
        );
        return a;
    };
    let r = Fetched {
        status,
        content_type: content_type.to_ascii_lowercase(),
        body: body.to_vec(),
        cert_days: None,
    };
    judge(spec, probe, &r, &mut a);
    a
}

/// A complete response, as [`judge`] sees it.
#[derive(Debug)]
struct Fetched {
    status: reqwest::StatusCode,
    content_type: String,
    body: Vec<u8>,
    cert_days: Option<i64>,
}

/// The verdict on a complete response (no I/O): status, body assertions, certificate, the
/// health contract and `[degraded_when]`, in that order; the first failure decides.
fn judge(s: &HttpSpec, name: &str, r: &Fetched, a: &mut Attempt) {
    let code = r.status.as_u16();
    let text = String::from_utf8_lossy(&r.body);
    // JSON when the server says so or it looks like it; strict UTF-8 (from_slice), so a body
    // with invalid bytes is never read as healthy through replacement characters.
    let declared_json = r.content_type.contains("json");
    let looks_json = declared_json || matches!(text.trim_start().chars().next(), Some('{' | '['));
    let needs_json =
        !s.expect.json.is_empty() || !s.degraded_when.json.is_empty() || s.subchecks.is_some();
    let parsed: Option<Result<Value, serde_json::Error>> =
        (looks_json || needs_json).then(|| serde_json::from_slice::<Value>(&r.body));
    let json = parsed.as_ref().and_then(|p| p.as_ref().ok());
    let body_status = json
        .and_then(|j| j.get("status"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let body_error = json.and_then(body_error_text);
    // Sub-checks are their own series: recorded whatever the run's verdict.
    if let (Some(path), Some(j)) = (&s.subchecks, json) {
        a.subchecks = read_subchecks(name, path, j);
    }
    if let (false, Some(j)) = (s.details.is_empty(), json) {
        let health = health_details(&s.details, j);
        if !health.is_empty() {
            a.detail("health", Value::Object(health));
        }
    }

    // Status first: a 5xx with an HTML or empty body is an `http_status`, not a JSON problem.
    if !any_status(&s.expect.status, code) && !any_status(&s.degraded_when.status, code) {
        a.down(
            ErrorClass::HttpStatus,
            status_message(
                r.status,
                body_status.as_deref(),
                body_error.as_deref(),
                json,
                &text,
            ),
        );
        return;
    }
    if let Some(Err(e)) = &parsed {
        if declared_json || needs_json {
            let why = if text.trim().is_empty() {
                "an empty body".to_string()
            } else if std::str::from_utf8(&r.body).is_err() {
                "it is not valid UTF-8".to_string()
            } else {
                e.to_string()
            };
            a.down(
                ErrorClass::InvalidJson,
                format!(
                    "HTTP {code} body is not valid JSON ({why}): {}",
                    excerpt(&text, 120)
                ),
            );
            return;
        }
    }
    if let Err((class, msg)) = check_expect(s, &text, json, r.cert_days) {
        a.down(class, msg);
        return;
    }
    judge_degraded(s, r, &text, json, body_status.as_deref(), body_error, a);
}

/// `[expect]`: body text, JSON assertions and the certificate's remaining days.
fn check_expect(
    s: &HttpSpec,
    text: &str,
    json: Option<&Value>,
    cert_days: Option<i64>,
) -> Result<(), (ErrorClass, String)> {
    if let Some(needle) = &s.expect.body_contains {
        if !text.contains(needle.as_str()) {
            return Err((
                ErrorClass::Assertion,
                format!("body does not contain {needle:?}"),
            ));
        }
    }
    if let Some(re) = &s.expect.body_matches {
        if !re.0.is_match(text) {
            return Err((
                ErrorClass::Assertion,
                format!("body does not match /{}/", re.0.as_str()),
            ));
        }
    }
    match json {
        Some(j) => {
            for check in &s.expect.json {
                check.check(j).map_err(|msg| (ErrorClass::Assertion, msg))?;
            }
        }
        None if !s.expect.json.is_empty() => {
            return Err((
                ErrorClass::InvalidJson,
                "body is not JSON, so the JSON assertions cannot hold".into(),
            ))
        }
        None => {}
    }
    if let Some(min) = s.expect.cert_min_days {
        match cert_days {
            Some(d) if d < min => {
                return Err((
                    ErrorClass::CertExpiry,
                    format!("TLS certificate expires in {d} days (minimum {min})"),
                ))
            }
            None if s.url.starts_with("https") => {
                return Err((
                    ErrorClass::CertExpiry,
                    "could not read the TLS certificate's expiry date".into(),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The health contract (the body's own status word) and `[degraded_when]`.
fn judge_degraded(
    s: &HttpSpec,
    r: &Fetched,
    text: &str,
    json: Option<&Value>,
    body_status: Option<&str>,
    body_error: Option<String>,
    a: &mut Attempt,
) {
    // Only words of the health contract decide; any other `status` (a call-spawn route's
    // `"active"`) is the application's own field, judged by `[expect]` if at all.
    let known = body_status.and_then(|st| Some((st, Outcome::from_known_health_word(st)?)));
    let code = r.status.as_u16();
    // A status the probe says means degraded (a capacity gate's 429) is degraded, whatever
    // word the refusal's body uses.
    let status_degrades = code == 207 || any_status(&s.degraded_when.status, code);
    let known = known.filter(|(_, o)| !(status_degrades && *o == Outcome::Down));
    if let (true, Some((st, said))) = (s.read_status, known) {
        match said {
            Outcome::Down => {
                let mut msg = format!("service reports status {st:?}");
                if let Some(err) = &body_error {
                    msg.push_str(&format!(": {err}"));
                }
                a.down(ErrorClass::Unhealthy, msg);
                return;
            }
            Outcome::Degraded => {
                let mut msg = format!("service reports status {st:?}");
                if let Some(bad) = a.subchecks.iter().find(|c| c.outcome != Outcome::Up) {
                    msg.push_str(&format!(" ({} is {})", bad.series, bad.outcome.as_str()));
                }
                a.degrade(ErrorClass::Degraded, msg);
            }
            Outcome::Up => {}
        }
    }
    if status_degrades {
        let said = if (200..300).contains(&code) {
            format!("HTTP {}", r.status)
        } else {
            // A 429 from a capacity gate: which limit, in the gate's words.
            status_message(r.status, body_status, body_error.as_deref(), json, text)
        };
        a.degrade(ErrorClass::Degraded, format!("{said} means degraded"));
    }
    if let Some(needle) = &s.degraded_when.body_contains {
        if text.contains(needle.as_str()) {
            a.degrade(ErrorClass::Degraded, format!("body contains {needle:?}"));
        }
    }
    if let Some(j) = json {
        for check in &s.degraded_when.json {
            if check.check(j).is_ok() {
                let v = json_path(j, &check.path)
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                a.degrade(ErrorClass::Degraded, format!("{} is {v}", check.path));
            }
        }
    }
}

/// `HTTP 429 Too Many Requests, body status "fail": capacity exhausted (code
/// "capacity_exceeded", scope "org")`: the status, the body's own status word, its error
/// text, and the `code`/`scope` a capacity gate (osmTalk's) says which limit was hit with.
fn status_message(
    status: reqwest::StatusCode,
    body_status: Option<&str>,
    body_error: Option<&str>,
    json: Option<&Value>,
    text: &str,
) -> String {
    let mut msg = format!("HTTP {status}");
    if let Some(st) = body_status {
        msg.push_str(&format!(", body status {st:?}"));
    }
    match body_error {
        Some(err) => msg.push_str(&format!(": {err}")),
        None if json.is_none() && !text.trim().is_empty() => {
            msg.push_str(&format!(": {}", excerpt(text, 120)))
        }
        None => {}
    }
    let tags: Vec<String> = ["code", "scope"]
        .iter()
        .filter_map(|k| {
            let v = json?.get(*k).or_else(|| json?.get("error")?.get(*k))?;
            let v = match v {
                Value::String(s) => excerpt(s, 80),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some(format!("{k} {v:?}"))
        })
        .collect();
    if !tags.is_empty() {
        msg.push_str(&format!(" ({})", tags.join(", ")));
    }
    msg
}

/// The named health details that are present: numbers, booleans and null as they are,
/// anything else as an excerpt of its text (the service does not decide our memory).
fn health_details(paths: &[String], j: &Value) -> serde_json::Map<String, Value> {
    paths
        .iter()
        .filter_map(|p| {
            let v = match json_path(j, p)? {
                v @ (Value::Number(_) | Value::Bool(_) | Value::Null) => v.clone(),
                Value::String(s) => Value::from(excerpt(s, 200)),
                other => Value::from(excerpt(&other.to_string(), 200)),
            };
            Some((p.clone(), v))
        })
        .collect()
}

/// The human part of an error body: `error`, `message`, `err_msg` or `error.message`.
fn body_error_text(j: &Value) -> Option<String> {
    for key in ["error", "message", "err_msg", "detail", "reason"] {
        match j.get(key) {
            Some(Value::String(s)) => return Some(excerpt(s, 200)),
            Some(Value::Object(o)) => {
                if let Some(Value::String(s)) = o.get("message") {
                    return Some(excerpt(s, 200));
                }
            }
            _ => {}
        }
    }
    None
}

/// Read `{name: {status, latency_ms | error}}` or `{name: "ok"}` into sub-checks.
fn read_subchecks(probe: &str, path: &str, j: &Value) -> Vec<SubCheck> {
    let Some(Value::Object(m)) = json_path(j, path) else {
        return Vec::new();
    };
    m.iter()
        .map(|(name, v)| {
            let series = format!("{probe}/{path}.{name}");
            let (status, latency, err) = match v {
                Value::String(s) => (s.clone(), None, None),
                Value::Bool(b) => ((if *b { "ok" } else { "fail" }).to_string(), None, None),
                Value::Object(o) => (
                    o.get("status")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string(),
                    o.get("latency_ms").and_then(Value::as_f64),
                    o.get("error")
                        .or_else(|| o.get("message"))
                        .and_then(Value::as_str)
                        .map(|s| excerpt(s, 200)),
                ),
                _ => ("unknown".to_string(), None, None),
            };
            let outcome = Outcome::from_health_word(&status);
            let error = (outcome != Outcome::Up).then(|| super::ErrorInfo {
                class: if outcome == Outcome::Down {
                    ErrorClass::Unhealthy
                } else {
                    ErrorClass::Degraded
                },
                message: match err {
                    Some(e) => format!("{name} reports {status:?}: {e}"),
                    None => format!("{name} reports {status:?}"),
                },
            });
            SubCheck {
                series,
                outcome,
                latency: latency
                    // The service's own figure: anything outside 0 ms – 1 h (the histogram
                    // range) is nonsense and not recorded, never a panic.
                    .filter(|l| l.is_finite() && (0.0..=MAX_SUBCHECK_LATENCY_MS).contains(l))
                    .and_then(|l| Duration::try_from_secs_f64(l / 1000.0).ok()),
                error,
            }
        })
        .collect()
}

enum BodyError {
    TooLarge(u64),
    Read(reqwest::Error),
}

async fn read_capped(mut resp: reqwest::Response, cap: u64) -> Result<Vec<u8>, BodyError> {
    if let Some(len) = resp.content_length() {
        if len > cap {
            return Err(BodyError::TooLarge(0));
        }
    }
    // One allocation when the server says how much is coming (a health body: a few hundred
    // bytes); the cap bounds it either way.
    let mut buf = Vec::with_capacity(resp.content_length().unwrap_or(0).min(cap) as usize);
    // The client's overall timeout also bounds this loop: a trickling body times out.
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        if buf.len() as u64 + chunk.len() as u64 > cap {
            return Err(BodyError::TooLarge(buf.len() as u64 + chunk.len() as u64));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Map a transport error to a stable class and a sentence.
fn classify(e: &reqwest::Error, timeout: Duration, stage: &str) -> (ErrorClass, String) {
    let chain = error_chain(e);
    let lower = chain.to_ascii_lowercase();
    let io_kind = io_error_kind(e);
    if e.is_timeout() {
        let what = if stage == "body" {
            "body not complete"
        } else {
            "no response"
        };
        return (
            ErrorClass::Timeout,
            format!("{what} within the {} timeout", human(timeout)),
        );
    }
    if e.is_redirect() {
        return (
            ErrorClass::TooManyRedirects,
            format!("redirect loop or too many redirects: {chain}"),
        );
    }
    use std::io::ErrorKind as K;
    let class = match io_kind {
        Some(K::ConnectionRefused) => ErrorClass::ConnectRefused,
        Some(K::ConnectionReset) | Some(K::ConnectionAborted) | Some(K::BrokenPipe) => {
            ErrorClass::ConnectionReset
        }
        Some(K::UnexpectedEof) => ErrorClass::ConnectionClosed,
        _ if lower.contains("certificate")
            || lower.contains("tls")
            || lower.contains("handshake") =>
        {
            ErrorClass::Tls
        }
        _ if lower.contains("dns error") || lower.contains("failed to lookup") => ErrorClass::Dns,
        _ if lower.contains("connection closed")
            || lower.contains("incomplete")
            || lower.contains("unexpected eof") =>
        {
            ErrorClass::ConnectionClosed
        }
        _ if lower.contains("reset") => ErrorClass::ConnectionReset,
        _ if e.is_connect() => ErrorClass::Unreachable,
        // The body stopped coming: the server (or something between) ended the stream.
        _ if e.is_body() => ErrorClass::ConnectionClosed,
        // Anything else the HTTP layer refuses (garbage status line, bad headers, bad encoding).
        _ => ErrorClass::Protocol,
    };
    let sentence = match class {
        ErrorClass::ConnectRefused => format!("connection refused ({chain})"),
        ErrorClass::ConnectionReset => {
            format!("connection reset by the server during the {stage} ({chain})")
        }
        ErrorClass::ConnectionClosed => {
            format!("server closed the connection during the {stage} ({chain})")
        }
        ErrorClass::Tls => format!("TLS failed: {chain}"),
        ErrorClass::Dns => format!("DNS lookup failed: {chain}"),
        ErrorClass::Unreachable => format!("cannot connect: {chain}"),
        _ => format!("the server broke the HTTP protocol during the {stage}: {chain}"),
    };
    (class, sentence)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

fn io_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = cur {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = s.source();
    }
    None
}

/// Minimal DER walk to `tbsCertificate.validity.notAfter`; avoids an X.509 crate for one field.
fn der_not_after(der: &[u8]) -> Option<chrono::DateTime<chrono::Utc>> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *b.first()?;
        let first = *b.get(1)? as usize;
        let (len, hdr) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            if n == 0 || n > 4 {
                return None;
            }
            let mut l = 0usize;
            for i in 0..n {
                l = (l << 8) | *b.get(2 + i)? as usize;
            }
            (l, 2 + n)
        };
        let body = b.get(hdr..hdr + len)?;
        Some((tag, body, &b[hdr + len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit version
    }
    let (_, _, r) = tlv(rest)?; // serial
    let (_, _, r) = tlv(r)?; // signature algorithm
    let (_, _, r) = tlv(r)?; // issuer
    let (_, validity, _) = tlv(r)?;
    let (_, _, r) = tlv(validity)?; // notBefore
    let (tag, t, _) = tlv(r)?;
    let s = std::str::from_utf8(t).ok()?;
    let full = match tag {
        0x17 => {
            // UTCTime YYMMDDHHMMSSZ
            let yy: i32 = s.get(0..2)?.parse().ok()?;
            format!(
                "{}{}",
                if yy >= 50 { 1900 + yy } else { 2000 + yy },
                s.get(2..)?
            )
        }
        0x18 => s.to_string(),
        _ => return None,
    };
    chrono::NaiveDateTime::parse_from_str(full.trim_end_matches('Z'), "%Y%m%d%H%M%S")
        .ok()
        .map(|n| n.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subchecks_both_shapes() {
        let j = json!({"status":"degraded","checks":{
            "database":{"status":"ok","latency_ms":12},
            "transcription":{"status":"fail","error":"upstream 503"}}});
        let s = read_subchecks("api", "checks", &j);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].series, "api/checks.database");
        assert_eq!(s[0].outcome, Outcome::Up);
        assert_eq!(s[0].latency, Some(Duration::from_millis(12)));
        assert_eq!(s[1].outcome, Outcome::Down);
        assert!(s[1]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("upstream 503"));
        let j = json!({"status":"healthy","checks":{"api":"ok","db":"degraded"}});
        let s = read_subchecks("x", "checks", &j);
        assert_eq!(s[0].outcome, Outcome::Up);
        assert_eq!(s[1].outcome, Outcome::Degraded);
        assert!(read_subchecks("x", "nope", &j).is_empty());
    }

    #[test]
    fn body_error_shapes() {
        assert_eq!(
            body_error_text(&json!({"status":"down","error":"db timeout"})).as_deref(),
            Some("db timeout")
        );
        assert_eq!(
            body_error_text(&json!({"error":{"code":"x","message":"bad"}})).as_deref(),
            Some("bad")
        );
        assert_eq!(body_error_text(&json!({"status":"ok"})), None);
    }
}
