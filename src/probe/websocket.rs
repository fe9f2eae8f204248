//! `kind = "websocket"`: connect (headers, subprotocols), then a scripted list of steps —
//! send text / binary / JSON, expect a message matching JSON assertions, a regex or a
//! substring within a deadline, wait, close. Phases: `connect` (TCP + TLS + upgrade), one per
//! step (`step<N>` counting from 1, or the step's `name`) and `total`.
//!
//! Also the WebSocket plumbing the listen probe shares: connecting with frame and message
//! size caps, turning a refused upgrade into `ws_rejected` with the body's error code, and
//! classifying read errors and close frames. Not here: anything speech-specific.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::assert::{excerpt, JsonAssert, Re};
use super::stamp::Stamped;
use super::{Attempt, ErrorClass};
use crate::chaos::fault::{Injection, Mode};
use crate::config::{duration::human, interp, Dur, Errors, Interp, ProbeConfig, Rest, SpanError};

/// The connected socket type both WebSocket-based kinds use: its reads carry the bytes'
/// arrival ([`arrived`]).
pub type Ws = WebSocketStream<MaybeTlsStream<Stamped>>;

/// When the latest bytes read from `ws` reached the socket (the kernel's stamp, under TLS
/// too): the time a message that read completed arrived, however late the agent read it.
pub fn arrived(ws: &Ws) -> Option<tokio::time::Instant> {
    let s = match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s,
        MaybeTlsStream::Rustls(t) => t.get_ref().0,
        _ => return None,
    };
    s.arrived().map(|a| a.at)
}

/// Default cap on one received frame and one received message (1 MiB): a broken or hostile
/// server must not make the agent allocate without bound.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

fn default_connect_timeout() -> Dur {
    Dur::secs(10)
}
fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}
fn default_within() -> Dur {
    Dur::secs(5)
}
fn yes() -> bool {
    true
}

// ---------------------------------------------------------------------------------------
// Shared plumbing
// ---------------------------------------------------------------------------------------

/// A run-ending problem: class, sentence and the details worth keeping.
#[derive(Debug, Clone)]
pub struct Failure {
    pub class: ErrorClass,
    pub message: String,
    pub details: Vec<(&'static str, Value)>,
}

impl Failure {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Failure {
            class,
            message: message.into(),
            details: Vec::new(),
        }
    }
    /// Record this failure on an attempt (down).
    pub fn apply(self, a: &mut Attempt) {
        for (k, v) in self.details {
            a.detail(k, v);
        }
        a.down(self.class, self.message);
    }
}

/// How to open a socket.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub headers: Vec<(String, Interp)>,
    pub subprotocols: Vec<String>,
    pub max_message_bytes: usize,
    pub tls: Arc<rustls::ClientConfig>,
}

/// A socket after a successful upgrade.
pub struct Connected {
    pub ws: Ws,
    /// Response headers of the upgrade (lower-case names).
    pub headers: BTreeMap<String, String>,
    /// TCP + TLS + upgrade.
    pub elapsed: Duration,
}

/// Check header names and values at config time; each bad one is recorded.
pub fn validate_headers(headers: &BTreeMap<String, Interp>, errs: &mut Errors) {
    for (k, v) in headers {
        if HeaderName::from_bytes(k.as_bytes()).is_err() {
            errs.push(SpanError::key(
                &["headers", k],
                format!("invalid header name {k:?}"),
            ));
        } else if HeaderValue::from_str(v).is_err() {
            errs.push(SpanError::key(
                &["headers", k],
                format!("invalid value for header {k:?}"),
            ));
        }
    }
}

/// Check a ws:// or wss:// URL at config time.
pub fn validate_ws_url(url: &toml::Spanned<Interp>) -> Result<url::Url, SpanError> {
    match url::Url::parse(url.get_ref()) {
        Ok(u) if u.scheme() == "ws" || u.scheme() == "wss" => Ok(u),
        Ok(u) => Err(SpanError::at(
            url.span(),
            format!("url scheme {:?} is not ws or wss", u.scheme()),
        )),
        Err(e) => Err(SpanError::at(
            url.span(),
            format!("invalid url {:?}: {e}", url.get_ref().template()),
        )),
    }
}

/// Read a PEM CA bundle at config time.
pub fn read_ca_file(
    dir: &Path,
    p: &Option<toml::Spanned<String>>,
) -> Result<Option<Arc<Vec<u8>>>, SpanError> {
    let Some(p) = p else { return Ok(None) };
    let path = dir.join(p.get_ref());
    let bytes = std::fs::read(&path).map_err(|e| {
        SpanError::at(
            p.span(),
            format!("cannot read ca_file {}: {e}", path.display()),
        )
    })?;
    let mut rd = bytes.as_slice();
    let n = rustls_pemfile::certs(&mut rd).filter(Result::is_ok).count();
    if n == 0 {
        return Err(SpanError::at(
            p.span(),
            format!("ca_file {} holds no PEM certificate", path.display()),
        ));
    }
    Ok(Some(Arc::new(bytes)))
}

/// TLS client config: the webpki roots plus any extra CA certificates. Built with the ring
/// provider explicitly so it never depends on a process-wide default provider.
pub fn tls_config(extra_ca_pem: Option<&[u8]>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        let mut rd = pem;
        for cert in rustls_pemfile::certs(&mut rd) {
            roots.add(cert?)?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Open the socket within `timeout` (TCP + TLS + upgrade).
pub async fn connect(t: &Target, timeout: Duration) -> Result<Connected, Failure> {
    connect_via(t, timeout, None).await
}

/// [`connect`], with the TCP connection going to `via` (a rehearsal's fault proxy) instead
/// of the URL's host; the upgrade, Host header, SNI and certificate check are the URL's.
pub async fn connect_via(
    t: &Target,
    timeout: Duration,
    via: Option<std::net::SocketAddr>,
) -> Result<Connected, Failure> {
    let mut req = t.url.as_str().into_client_request().map_err(|e| {
        Failure::new(
            ErrorClass::Internal,
            format!("cannot build the upgrade request: {e}"),
        )
    })?;
    let h = req.headers_mut();
    h.insert(
        "user-agent",
        HeaderValue::from_static(super::http::USER_AGENT),
    );
    for (k, v) in &t.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) else {
            return Err(Failure::new(
                ErrorClass::Internal,
                format!("invalid header {k:?}"),
            ));
        };
        h.insert(name, value);
    }
    if !t.subprotocols.is_empty() {
        match HeaderValue::from_str(&t.subprotocols.join(", ")) {
            Ok(v) => {
                h.insert("sec-websocket-protocol", v);
            }
            Err(_) => {
                return Err(Failure::new(
                    ErrorClass::Internal,
                    "invalid subprotocol name",
                ))
            }
        }
    }
    // Small read buffers: a probe reads small messages, and hundreds of concurrent listen
    // sessions should not each hold the 128 KiB default. tungstenite also zeroes this much
    // before every read (docs/BENCHMARKS.md, listen profile); a longer message still arrives
    // whole: the frame's length is reserved once its header is read.
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .max_message_size(Some(t.max_message_bytes))
        .max_frame_size(Some(t.max_message_bytes));
    let connector = Connector::Rustls(t.tls.clone());
    let t0 = Instant::now();
    let fut = async move {
        let sock = match via {
            Some(addr) => TcpStream::connect(addr).await?,
            None => {
                let uri = req.uri();
                // The resolver takes an IPv6 literal without its brackets.
                let host = uri.host().unwrap_or_default();
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                    Some("wss") => 443,
                    _ => 80,
                });
                TcpStream::connect((host, port)).await?
            }
        };
        let _ = sock.set_nodelay(true);
        tokio_tungstenite::client_async_tls_with_config(
            req,
            Stamped::new(sock),
            Some(cfg),
            Some(connector),
        )
        .await
    };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(Failure::new(
            ErrorClass::Timeout,
            format!(
                "no WebSocket upgrade within the {} connect timeout",
                human(timeout)
            ),
        )),
        Ok(Err(e)) => Err(connect_error(e)),
        Ok(Ok((ws, resp))) => {
            let headers = resp
                .headers()
                .iter()
                .filter_map(|(k, v)| {
                    v.to_str()
                        .ok()
                        .map(|v| (k.as_str().to_ascii_lowercase(), v.to_string()))
                })
                .collect();
            Ok(Connected {
                ws,
                headers,
                elapsed: t0.elapsed(),
            })
        }
    }
}

fn connect_error(e: tungstenite::Error) -> Failure {
    use tungstenite::Error as E;
    match e {
        E::Http(resp) => rejected(
            resp.status().as_u16(),
            resp.status().canonical_reason(),
            resp.body().as_deref(),
        ),
        E::Io(io) => {
            let text = io.to_string();
            // tokio-tungstenite hands a failed rustls handshake up as an I/O error.
            if let Some(t) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                let hint = match t {
                    rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                        " (not signed by a trusted CA; set ca_file to trust a private one)"
                    }
                    _ => "",
                };
                Failure::new(ErrorClass::Tls, format!("TLS handshake failed: {t}{hint}"))
            } else if io.kind() == std::io::ErrorKind::ConnectionReset {
                Failure::new(
                    ErrorClass::ConnectionReset,
                    format!("connection reset by the server during the upgrade: {text}"),
                )
            } else if io.kind() == std::io::ErrorKind::ConnectionRefused {
                Failure::new(
                    ErrorClass::ConnectRefused,
                    format!("connection refused: {text}"),
                )
            } else if text.contains("lookup")
                || text.contains("resolve")
                || text.contains("Name or service")
            {
                Failure::new(ErrorClass::Dns, format!("cannot resolve the host: {text}"))
            } else {
                Failure::new(ErrorClass::Unreachable, format!("cannot connect: {text}"))
            }
        }
        E::Tls(t) => Failure::new(ErrorClass::Tls, format!("TLS handshake failed: {t}")),
        E::Url(u) => Failure::new(ErrorClass::Internal, format!("bad url: {u}")),
        E::Protocol(ProtocolError::HttparseError(h)) => Failure::new(
            ErrorClass::Protocol,
            format!("WebSocket upgrade failed: the server answered with something that is not an HTTP response ({h}); is this a WebSocket endpoint?"),
        ),
        E::Capacity(c) => Failure::new(
            ErrorClass::Protocol,
            format!("upgrade response too large: {c}"),
        ),
        other => Failure::new(
            ErrorClass::Protocol,
            format!("WebSocket upgrade failed: {other}"),
        ),
    }
}

/// A refused upgrade: keep the status and the vendor's error fields (Deepgram puts
/// `err_code`, `err_msg`, `request_id` in a JSON body; others use `error`/`message`).
pub fn rejected(status: u16, reason: Option<&str>, body: Option<&[u8]>) -> Failure {
    let mut f = Failure::new(ErrorClass::WsRejected, String::new());
    f.details.push(("http_status", Value::from(status)));
    let mut msg = format!("upgrade refused with HTTP {status}");
    if let Some(r) = reason {
        msg.push_str(&format!(" {r}"));
    }
    let text = body.map(String::from_utf8_lossy).unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(j) => {
            let field = |names: &[&str]| -> Option<String> {
                names
                    .iter()
                    .find_map(|n| match super::assert::json_path(&j, n) {
                        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                        Some(v @ Value::Number(_)) => Some(v.to_string()),
                        _ => None,
                    })
            };
            let code = field(&["err_code", "error.code", "code"]);
            let text = field(&["err_msg", "error.message", "message", "error", "detail"]);
            let rid = field(&["request_id", "requestId"]);
            if let Some(c) = &code {
                msg.push_str(&format!(": {c}"));
                f.details.push(("err_code", Value::from(c.clone())));
            }
            if let Some(t) = &text {
                msg.push_str(if code.is_some() { " " } else { ": " });
                msg.push_str(&excerpt(t, 200));
                f.details.push(("err_msg", Value::from(t.clone())));
            }
            if let Some(r) = rid {
                msg.push_str(&format!(" (request id {r})"));
                f.details.push(("request_id", Value::from(r)));
            }
        }
        Err(_) if !text.trim().is_empty() => msg.push_str(&format!(": {}", excerpt(&text, 160))),
        Err(_) => {}
    }
    f.message = msg;
    f
}

/// A read error after the upgrade, as class + sentence (`after` is time since connect).
pub fn read_error(e: &tungstenite::Error, cap: usize, after: Duration) -> Failure {
    use tungstenite::Error as E;
    let at = secs(after);
    match e {
        E::Capacity(CapacityError::MessageTooLong { size, max_size }) => Failure::new(
            ErrorClass::FrameTooLarge,
            format!("server sent a {size} byte frame/message after {at}, over the {max_size} byte cap; refused"),
        ),
        E::Capacity(c) => Failure::new(ErrorClass::FrameTooLarge, format!("refused an oversized message after {at}: {c}")),
        E::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Failure::new(
            ErrorClass::WsClosed,
            format!("server dropped the connection without a close frame after {at}"),
        ),
        E::Protocol(p) => Failure::new(ErrorClass::Protocol, format!("WebSocket protocol violation after {at}: {p}")),
        E::Utf8(_) => Failure::new(ErrorClass::Protocol, format!("server sent a text frame that is not UTF-8 after {at}")),
        E::Io(io) => Failure::new(ErrorClass::WsClosed, format!("connection failed after {at}: {io}")),
        E::ConnectionClosed | E::AlreadyClosed => {
            Failure::new(ErrorClass::WsClosed, format!("connection closed after {at}"))
        }
        other => {
            let _ = cap;
            Failure::new(ErrorClass::Protocol, format!("WebSocket error after {at}: {other}"))
        }
    }
}

/// `1011 NET-0001`, `1000`, `1006 (no close frame)`.
pub fn close_text(frame: &Option<CloseFrame>) -> (u16, String) {
    match frame {
        // tungstenite answers a close frame with an illegal code (999, 1005, 1006, 5000…)
        // with its own 1002 "Protocol violation" and hands that up instead: the server did
        // not send 1002, so say what it did send.
        Some(f) if u16::from(f.code) == 1002 && f.reason == "Protocol violation" => (
            1002,
            "a close code that is not a valid close code (999, 1005, 1006, 1015 and ≥ 5000 \
             may never be sent)"
                .into(),
        ),
        Some(f) => {
            let code = u16::from(f.code);
            let reason = f.reason.to_string();
            let text = if reason.is_empty() {
                code.to_string()
            } else {
                format!("{code} {}", excerpt(&reason, 120))
            };
            (code, text)
        }
        None => (1005, "1005 (no status code)".into()),
    }
}

/// Seconds for sentences: `10.2 s`.
pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Close politely and do not wait long for the peer's answer.
pub async fn close_quietly(ws: &mut Ws, code: u16) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: "".into(),
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// kind = "websocket"
// ---------------------------------------------------------------------------------------

/// JSON Schema of this kind's keys (see `crate::probe::KIND_SCHEMAS`).
pub fn schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    <WsFile as schemars::JsonSchema>::json_schema(g)
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct WsFile {
    /// ws:// or wss:// URL.
    #[schemars(with = "Interp")]
    url: toml::Spanned<Interp>,
    /// Extra upgrade request headers (values may use `${ENV}`).
    #[serde(default)]
    headers: BTreeMap<String, Interp>,
    /// Subprotocols offered in `Sec-WebSocket-Protocol`, in order of preference.
    #[serde(default)]
    subprotocols: Vec<String>,
    /// Deadline for TCP + TLS + upgrade.
    #[serde(default = "default_connect_timeout")]
    connect_timeout: Dur,
    /// Largest frame or message accepted from the server, in bytes; larger is `frame_too_large`.
    #[serde(default = "default_max_message_bytes")]
    max_message_bytes: usize,
    /// PEM file of extra CA certificates to trust, relative to the probe file.
    #[schemars(with = "Option<String>")]
    ca_file: Option<toml::Spanned<String>>,
    /// The script, run in order: `[[step]]` tables.
    #[serde(default)]
    #[schemars(with = "Vec<StepFile>")]
    step: Vec<toml::Spanned<StepFile>>,
}

/// One `[[step]]`: exactly one of `send`, `send_json`, `send_binary`, `expect`, `wait`, `close`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct StepFile {
    /// Phase name for this step (default `step<N>`, counting from 1).
    #[schemars(with = "Option<String>")]
    name: Option<toml::Spanned<String>>,
    /// Send this text frame (may use `${ENV}`).
    send: Option<Interp>,
    /// Send this value as a JSON text frame (strings may use `${ENV}`).
    send_json: Option<Value>,
    /// Send these bytes (base64) as a binary frame.
    #[schemars(with = "Option<String>")]
    send_binary: Option<toml::Spanned<String>>,
    /// Wait for a message like this.
    expect: Option<ExpectFile>,
    /// Pause this long.
    wait: Option<Dur>,
    /// Close the socket with this code (1000 = normal).
    #[schemars(with = "Option<u16>")]
    close: Option<toml::Spanned<u16>>,
}

/// `expect = { … }` of a step: every given condition must hold for one message.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpectFile {
    /// JSON assertions on the message (which must then be JSON).
    #[serde(default)]
    pub json: Vec<JsonAssert>,
    /// The message text must match this regex.
    pub matches: Option<Re>,
    /// The message text must contain this.
    pub contains: Option<String>,
    /// Deadline for a matching message, from the start of the step.
    #[serde(default = "default_within")]
    pub within: Dur,
    /// Skip messages that do not match (true) or fail on the first one that does not (false).
    #[serde(default = "yes")]
    pub skip_others: bool,
}

/// What a validated step does.
#[derive(Debug, Clone)]
pub enum Action {
    SendText(String),
    SendBinary(Bytes),
    Expect(ExpectFile),
    Wait(Duration),
    Close(u16),
}

/// A validated step.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub action: Action,
}

/// A validated WebSocket probe.
#[derive(Debug, Clone)]
pub struct WsSpec {
    pub url: String,
    pub headers: Vec<(String, Interp)>,
    pub subprotocols: Vec<String>,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
    pub ca_pem: Option<Arc<Vec<u8>>>,
    pub steps: Vec<Step>,
}

/// The phases a WebSocket run times: `connect`, one per step (by name), `total`.
pub fn phases(step_names: impl Iterator<Item = String>) -> Vec<String> {
    std::iter::once("connect".to_string())
        .chain(step_names)
        .chain(std::iter::once("total".to_string()))
        .collect()
}

/// A step's phase name: its own, or `step<N>` counting from 1.
fn step_name(i: usize, s: &StepFile) -> String {
    s.name
        .as_ref()
        .map_or_else(|| format!("step{}", i + 1), |n| n.get_ref().clone())
}

fn expand_json(v: Value) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => Value::String(interp::expand(&s)?),
        Value::Array(a) => Value::Array(a.into_iter().map(expand_json).collect::<Result<_, _>>()?),
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| Ok((k, expand_json(v)?)))
                .collect::<Result<Map<_, _>, String>>()?,
        ),
        other => other,
    })
}

impl WsSpec {
    /// Every problem of the file, each at its key or step; `budget` keys are checked
    /// against the phases the steps name.
    pub fn from_config(
        rest: Rest<'_>,
        dir: &Path,
        budget: &[toml::Spanned<String>],
    ) -> Result<Self, Errors> {
        let (f, mut errs) = rest.parse::<WsFile>();
        let Some(f) = f else { return Err(errs) };
        // Where each step's keys are: from its start to the next step's (a `[[step]]`
        // table's own span is its header).
        let starts: Vec<usize> = f.step.iter().map(|s| s.span().start).collect();
        let region = |i: usize| starts[i]..starts.get(i + 1).copied().unwrap_or(usize::MAX);
        // A step whose name could not be read would be budgeted under its default name.
        if f.step
            .iter()
            .enumerate()
            .all(|(i, s)| s.get_ref().name.is_some() || errs.intact("step", &region(i)))
        {
            let names = f
                .step
                .iter()
                .enumerate()
                .map(|(i, s)| step_name(i, s.get_ref()));
            super::check_budget("websocket", &phases(names), None, budget, &mut errs);
        }
        errs.check(validate_ws_url(&f.url));
        validate_headers(&f.headers, &mut errs);
        for p in &f.subprotocols {
            if p.is_empty() || !p.chars().all(|c| c.is_ascii_graphic() && c != ',') {
                errs.push(SpanError::key(
                    &["subprotocols"],
                    format!("invalid subprotocol name {p:?}"),
                ));
            }
        }
        if f.max_message_bytes < 125 {
            errs.push(SpanError::key(
                &["max_message_bytes"],
                "max_message_bytes must be at least 125",
            ));
        }
        let ca_pem = errs.check(read_ca_file(dir, &f.ca_file));
        let mut steps = Vec::new();
        // Every step's name, kept or not, so a duplicate is found next to a broken step.
        let mut names: Vec<String> = Vec::new();
        for (i, s) in f.step.into_iter().enumerate() {
            let span = s.span();
            let s = s.into_inner();
            let name = step_name(i, &s);
            let name_at = s.name.as_ref().map_or(span.clone(), |n| n.span());
            if name.is_empty() || matches!(name.as_str(), "connect" | "total") {
                errs.push(SpanError::at(
                    name_at,
                    format!("step name {name:?} is empty or reserved"),
                ));
            } else if names.contains(&name) {
                errs.push(SpanError::at(
                    name_at,
                    format!("duplicate step name {name:?}"),
                ));
            }
            names.push(name.clone());
            let mut actions = Vec::new();
            // A key that failed to parse is one action fewer: its step is not counted.
            let mut counted = errs.intact("step", &region(i));
            if let Some(t) = s.send {
                actions.push(Action::SendText(t.to_string()));
            }
            if let Some(j) = s.send_json {
                match expand_json(j) {
                    Ok(j) => actions.push(Action::SendText(j.to_string())),
                    Err(e) => {
                        errs.push(SpanError::at(span.clone(), e));
                        counted = false;
                    }
                }
            }
            if let Some(b) = s.send_binary {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b.get_ref().trim())
                    .map_err(|e| format!("send_binary is not valid base64: {e}"))
                    .and_then(|v| match v.is_empty() {
                        true => Err("send_binary is empty".to_string()),
                        false => Ok(v),
                    });
                match bytes {
                    Ok(bytes) => actions.push(Action::SendBinary(Bytes::from(bytes))),
                    Err(m) => {
                        errs.push(SpanError::at(b.span(), m));
                        counted = false;
                    }
                }
            }
            if let Some(e) = s.expect {
                actions.push(Action::Expect(e));
            }
            if let Some(w) = s.wait {
                actions.push(Action::Wait(w.0));
            }
            if let Some(c) = s.close {
                let (at, c) = (c.span(), c.into_inner());
                if !(c == 1000 || (3000..=4999).contains(&c) || (1001..=1003).contains(&c)) {
                    errs.push(SpanError::at(
                        at,
                        format!("close code {c} cannot be sent (use 1000, 1001 or 3000-4999)"),
                    ));
                }
                actions.push(Action::Close(c));
            }
            if actions.len() != 1 {
                if counted {
                    errs.push(SpanError::at(
                        span,
                        format!(
                            "step {} needs exactly one of send, send_json, send_binary, expect, wait, close (found {})",
                            i + 1,
                            actions.len()
                        ),
                    ));
                }
                continue;
            }
            steps.push(Step {
                name,
                action: actions.remove(0),
            });
        }
        let Some(ca_pem) = ca_pem else {
            return Err(errs);
        };
        errs.finish(WsSpec {
            url: f.url.into_inner().to_string(),
            headers: f.headers.into_iter().collect(),
            subprotocols: f.subprotocols,
            connect_timeout: f.connect_timeout.0,
            max_message_bytes: f.max_message_bytes,
            ca_pem,
            steps,
        })
    }
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// A WebSocket probe ready to run.
pub struct WsProbe {
    spec: WsSpec,
    target: Target,
    timeout: Duration,
}

impl WsProbe {
    pub fn new(cfg: &ProbeConfig, spec: &WsSpec) -> anyhow::Result<Self> {
        let target = Target {
            url: spec.url.clone(),
            headers: spec.headers.clone(),
            subprotocols: spec.subprotocols.clone(),
            max_message_bytes: spec.max_message_bytes,
            tls: tls_config(spec.ca_pem.as_deref().map(Vec::as_slice))?,
        };
        Ok(WsProbe {
            spec: spec.clone(),
            target,
            timeout: cfg.timeout,
        })
    }

    pub async fn run(&self) -> Attempt {
        self.run_with(None).await
    }

    /// One attempt under a rehearsal fault: transport faults connect through the fault
    /// proxy; `ws_close` ends the script `after` its time as a server close would.
    pub async fn run_with(&self, fault: Option<&Injection>) -> Attempt {
        let close = match fault.map(|f| &f.mode) {
            Some(Mode::WsClose {
                code,
                reason,
                after,
            }) => Some((*code, reason.as_str(), *after)),
            _ => None,
        };
        let Some((code, reason, after)) = close else {
            return self.script(fault.and_then(|f| f.via)).await;
        };
        let t0 = Instant::now();
        let timer = async {
            tokio::time::sleep(after).await;
            let frame = Some(CloseFrame {
                code: code.into(),
                reason: reason.to_string().into(),
            });
            let (code, text) = close_text(&frame);
            let mut a = Attempt::new();
            a.detail("close_code", code);
            a.detail("close_reason", reason.to_string());
            a.down(
                ErrorClass::WsClosed,
                format!("server closed the socket with {text} after {}", secs(after)),
            );
            a.phase("total", t0.elapsed());
            a
        };
        tokio::select! {
            a = self.script(None) => a,
            a = timer => a,
        }
    }

    async fn script(&self, via: Option<std::net::SocketAddr>) -> Attempt {
        let mut a = Attempt::new();
        let t0 = Instant::now();
        let deadline = t0 + self.timeout;
        let c = match connect_via(
            &self.target,
            self.spec.connect_timeout.min(self.timeout),
            via,
        )
        .await
        {
            Ok(c) => c,
            Err(f) => {
                f.apply(&mut a);
                return a;
            }
        };
        a.phase("connect", c.elapsed);
        if let Some(p) = c.headers.get("sec-websocket-protocol") {
            a.detail("subprotocol", p.clone());
        }
        let mut ws = c.ws;
        let connected_at = Instant::now();
        let mut received = 0u64;
        let mut closed = false;
        for (i, step) in self.spec.steps.iter().enumerate() {
            let st = Instant::now();
            let label = format!("step {} ({})", i + 1, step.name);
            // Ok(when the step ended).
            let r = match &step.action {
                Action::SendText(t) => send(
                    &mut ws,
                    Message::text(t.clone()),
                    deadline,
                    &label,
                    connected_at,
                )
                .await
                .map(|()| Instant::now()),
                Action::SendBinary(b) => send(
                    &mut ws,
                    Message::Binary(b.clone()),
                    deadline,
                    &label,
                    connected_at,
                )
                .await
                .map(|()| Instant::now()),
                Action::Wait(d) => {
                    let until = (st + *d).min(deadline);
                    tokio::time::sleep_until(until.into()).await;
                    if until < st + *d {
                        Err(Failure::new(
                            ErrorClass::Timeout,
                            format!("the {} timeout hit during {label}", human(self.timeout)),
                        ))
                    } else {
                        Ok(Instant::now())
                    }
                }
                Action::Close(code) => {
                    closed = true;
                    close_quietly(&mut ws, *code).await;
                    Ok(Instant::now())
                }
                Action::Expect(e) => {
                    expect(
                        &mut ws,
                        e,
                        deadline,
                        self.timeout,
                        &label,
                        connected_at,
                        &mut received,
                    )
                    .await
                }
            };
            let ended = match r {
                Ok(ended) => ended,
                Err(f) => {
                    a.detail("failed_step", step.name.clone());
                    a.detail("messages_received", received);
                    f.apply(&mut a);
                    a.phase("total", t0.elapsed());
                    if !closed {
                        close_quietly(&mut ws, 1000).await;
                    }
                    return a;
                }
            };
            a.phase(&step.name, ended.saturating_duration_since(st));
        }
        a.phase("total", t0.elapsed());
        a.detail("messages_received", received);
        if !closed {
            close_quietly(&mut ws, 1000).await;
        }
        a
    }
}

async fn send(
    ws: &mut Ws,
    m: Message,
    deadline: Instant,
    label: &str,
    since: Instant,
) -> Result<(), Failure> {
    match tokio::time::timeout_at(deadline.into(), ws.send(m)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            let mut f = read_error(&e, 0, since.elapsed());
            f.message = format!("{label}: cannot send: {}", f.message);
            Err(f)
        }
        Err(_) => Err(Failure::new(
            ErrorClass::Timeout,
            format!("{label}: the send did not complete before the timeout"),
        )),
    }
}

/// Why a message does not satisfy an expectation (None = it does).
pub fn mismatch(e: &ExpectFile, text: &str) -> Option<String> {
    if let Some(c) = &e.contains {
        if !text.contains(c.as_str()) {
            return Some(format!("does not contain {c:?}"));
        }
    }
    if let Some(re) = &e.matches {
        if !re.0.is_match(text) {
            return Some(format!("does not match /{}/", re.0.as_str()));
        }
    }
    if !e.json.is_empty() {
        let j: Value = match serde_json::from_str(text) {
            Ok(j) => j,
            Err(_) => return Some("is not JSON".into()),
        };
        for check in &e.json {
            if let Err(m) = check.check(&j) {
                return Some(m);
            }
        }
    }
    None
}

async fn expect(
    ws: &mut Ws,
    e: &ExpectFile,
    run_deadline: Instant,
    run_timeout: Duration,
    label: &str,
    since: Instant,
    received: &mut u64,
) -> Result<Instant, Failure> {
    let st = Instant::now();
    let own = st + e.within.0;
    let deadline = own.min(run_deadline);
    let mut last: Option<(String, String)> = None;
    loop {
        let msg = match tokio::time::timeout_at(deadline.into(), ws.next()).await {
            Err(_) => {
                let why = if own <= run_deadline {
                    format!("within {}", human(e.within.0))
                } else {
                    format!("before the {} timeout", human(run_timeout))
                };
                return Err(match last {
                    Some((text, reason)) => Failure::new(
                        ErrorClass::Assertion,
                        format!(
                            "{label}: no matching message {why}; the last one {reason}: {}",
                            excerpt(&text, 160)
                        ),
                    ),
                    None => Failure::new(ErrorClass::Timeout, format!("{label}: no message {why}")),
                });
            }
            Ok(None) => {
                return Err(Failure::new(
                    ErrorClass::WsClosed,
                    format!("{label}: connection ended after {}", secs(since.elapsed())),
                ))
            }
            Ok(Some(Err(err))) => {
                let mut f = read_error(&err, 0, since.elapsed());
                f.message = format!("{label}: {}", f.message);
                return Err(f);
            }
            Ok(Some(Ok(m))) => m,
        };
        let text = match msg {
            Message::Text(t) => t.to_string(),
            Message::Binary(b) => String::from_utf8_lossy(&b).to_string(),
            Message::Close(frame) => {
                let (code, text) = close_text(&frame);
                let mut f = Failure::new(
                    ErrorClass::WsClosed,
                    format!(
                        "{label}: server closed the socket with {text} after {}",
                        secs(since.elapsed())
                    ),
                );
                f.details.push(("close_code", Value::from(code)));
                return Err(f);
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        *received += 1;
        match mismatch(e, &text) {
            // The step ends when the matching message arrived, not when it was read.
            None => return Ok(arrived(ws).map_or_else(Instant::now, |t| t.into_std())),
            Some(reason) if !e.skip_others => {
                return Err(Failure::new(
                    ErrorClass::Assertion,
                    format!("{label}: message {reason}: {}", excerpt(&text, 160)),
                ));
            }
            Some(reason) => last = Some((text, reason)),
        }
    }
}
