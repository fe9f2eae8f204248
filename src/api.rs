//! The agent's own HTTP surface: `/health` (the same health contract it reads), `/metrics`
//! (Prometheus), the JSON API under `/api/v1` (reads open; state changes behind the bearer
//! token, see [`Authorized`]) and a one-page dashboard. Reads open their own read
//! connection; state changes go through [`Control`] to the scheduler and the evaluator, and
//! only the writer task writes.
//!
//! Nothing a client does may blind the agent: [`serve`] closes a connection whose request
//! headers are not complete within [`HEADER_TIMEOUT`] (also the idle keep-alive limit) and
//! one on which nothing moved for [`IDLE_TIMEOUT`], and serves at most
//! [`Limits::max_connections`] at once (derived from the open-files budget, see
//! `fdlimit`): beyond that a new connection is accepted and closed at once. Database reads
//! and reports are bounded in concurrency; a report is kept for [`REPORT_TTL`] per window.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{Command, CommandError, Control, Origin};
use crate::health::{Check, Health};
use crate::incident::alerts::{self, Source};
use crate::metrics::Metrics;
use crate::store::{self, Store};

/// How long the store writer may take to answer a ping before `/health` calls it wedged.
const WRITER_PING: Duration = Duration::from_secs(5);
/// How long a client has to send a request's complete headers, counted from when the
/// server starts waiting for the request: also how long an idle keep-alive connection
/// stays open (the dashboard asks every 3 s).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection on which no byte moved either way for this long is closed (a client that
/// stopped reading its response).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed `accept` (out of descriptors), wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(250);
/// At most one warning per this period about refused connections or failed accepts.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Database reads in flight at once (each holds its own connection: three descriptors).
const READERS: usize = 4;
/// How long a read waits for a free reader before the answer is 503.
const READ_WAIT: Duration = Duration::from_secs(5);
/// Reports computed at once (one costs seconds of CPU on a large store).
const REPORTS: usize = 1;
/// How long a report request waits for its turn before the answer is 503 + Retry-After.
const REPORT_WAIT: Duration = Duration::from_secs(2);
/// The Retry-After of a 503 (seconds).
const RETRY_AFTER: u32 = 5;
/// A computed report is served again for this long to any request for the same window.
pub const REPORT_TTL: Duration = Duration::from_secs(5);
/// Windows kept in the report cache.
const REPORT_CACHE: usize = 8;
/// Largest inbound alert payload (bytes); a bigger one is refused with 413.
pub const MAX_ALERT_BODY: usize = 1 << 20;

/// What the listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are accepted and closed at once.
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Limits {
    /// The default timeouts with this connection cap.
    pub fn new(max_connections: usize) -> Limits {
        Limits {
            max_connections: max_connections.max(1),
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// "Busy": the read or report could not start within its wait (→ 503 + Retry-After).
#[derive(Debug, thiserror::Error)]
#[error("busy: {0}; retry later")]
struct Busy(&'static str);

/// Reports in the making and the ones just made.
#[derive(Default)]
struct Reports {
    cache: Mutex<Vec<(ReportKey, Instant, Bytes)>>,
}

/// A report's window and location (`None`: fleet-wide).
type ReportKey = (Duration, Option<String>);

impl Reports {
    fn get(&self, window: &ReportKey) -> Option<Bytes> {
        let now = Instant::now();
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.iter()
            .find(|(w, at, _)| w == window && now.duration_since(*at) < REPORT_TTL)
            .map(|(_, _, b)| b.clone())
    }

    fn put(&self, window: ReportKey, body: Bytes) {
        let now = Instant::now();
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|(w, at, _)| *w != window && now.duration_since(*at) < REPORT_TTL);
        if c.len() >= REPORT_CACHE {
            c.remove(0);
        }
        c.push((window, now, body));
    }
}

#[derive(Clone)]
pub struct AppState {
    config: Arc<Config>,
    metrics: Metrics,
    /// The writer handle for `/health`'s ping; released at shutdown so that a connection
    /// still open does not keep the writer from finishing.
    store: Arc<Mutex<Option<Store>>>,
    /// The running agent, for the mutating routes (none: they answer 503). Released with
    /// the store.
    control: Arc<Mutex<Option<Control>>>,
    db: store::Target,
    health: Health,
    /// Database reads in flight.
    readers: Arc<Semaphore>,
    /// Reports computed at once.
    report_turns: Arc<Semaphore>,
    reports: Arc<Reports>,
    /// The hourly part of each SLO window's sums, slid between `/slo` computations.
    hourly_sums: Arc<crate::store::HourlySums>,
    /// Fleet mode: every location's newest runs, followed through the run feed.
    fleet_view: Arc<store::view::FleetView>,
}

impl AppState {
    pub fn new(config: Arc<Config>, metrics: Metrics, store: Store, health: Health) -> Self {
        AppState {
            config,
            metrics,
            db: store.target().clone(),
            store: Arc::new(Mutex::new(Some(store))),
            control: Arc::default(),
            health,
            readers: Arc::new(Semaphore::new(READERS)),
            report_turns: Arc::new(Semaphore::new(REPORTS)),
            reports: Arc::default(),
            hourly_sums: Arc::default(),
            fleet_view: Arc::default(),
        }
    }

    /// Whether the store is a fleet's Postgres (reads cover every location).
    fn fleet(&self) -> bool {
        matches!(self.db, store::Target::Postgres(_))
    }

    /// Serve the mutating routes through `control`.
    pub fn with_control(self, control: Control) -> Self {
        *self.control.lock().unwrap_or_else(|p| p.into_inner()) = Some(control);
        self
    }

    /// Drop the writer handle and the control handle (the API is stopping).
    pub fn release_store(&self) {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// The store handle (`None` once the API has released it).
    fn store(&self) -> Option<Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The paused probes (empty without a control handle).
    fn paused(&self) -> crate::control::Paused {
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.paused().clone())
            .unwrap_or_default()
    }

    /// The control handle, or the 503 to answer without one.
    pub fn control(&self) -> Result<Control, ApiError> {
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the agent is not running its scheduler and evaluator here (or is stopping)",
                )
            })
    }
}

/// Proof that a request carries the agent's API token: `Authorization: Bearer <token>` with
/// the value of `[agent] api_token_env`. Every route that changes state takes it as its
/// first argument (before any body is read), so a refused request changes nothing:
///
/// * no token configured → 403 (mutating routes are off);
/// * header missing, not `Bearer`, or a wrong token → 401 with `WWW-Authenticate: Bearer`.
///
/// The comparison is constant-time over SHA-256 digests of both sides (`subtle`), so
/// neither the token's bytes nor its length leak through response timing.
#[derive(Debug, Clone)]
pub struct Authorized {
    /// The client's address, for the log and the timeline (`unknown` if not known).
    pub remote: String,
}

impl FromRequestParts<AppState> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let remote = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or_else(|| "unknown".to_string(), |c| c.0.to_string());
        let path = parts.uri.path().to_string();
        let Some(token) = &s.config.agent.api_token else {
            tracing::warn!(%remote, path, "mutating API call refused: no api_token_env configured");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "no API token is configured ([agent] api_token_env): state-changing routes are off",
            ));
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let ok = presented.is_some_and(|p| token_matches(p, token.expose()));
        if !ok {
            tracing::warn!(%remote, path, header = presented.is_some(), "mutating API call refused: missing or wrong bearer token");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <token from api_token_env>)",
            ));
        }
        Ok(Authorized { remote })
    }
}

/// Constant-time token check (digests first, so the lengths need not match).
fn token_matches(presented: &str, token: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(token.as_bytes());
    a.ct_eq(&b).into()
}

/// A refused API call: answered as `{"error": "..."}` with its status (a 401 also says
/// `WWW-Authenticate: Bearer`, a 503 `Retry-After`).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub msg: String,
}

impl ApiError {
    pub fn new(status: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError {
            status,
            msg: msg.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = no_store((self.status, Json(json!({"error": self.msg}))).into_response());
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER));
        }
        r
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> ApiError {
        let status = match &e {
            CommandError::NotFound(_) => StatusCode::NOT_FOUND,
            CommandError::Invalid(_) => StatusCode::BAD_REQUEST,
            CommandError::Conflict(_) => StatusCode::CONFLICT,
            CommandError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            CommandError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        // The first, unversioned paths stay as aliases (dashboards and scripts use them).
        .route("/api/runs/latest", get(latest))
        .route("/api/incidents", get(incidents))
        .route("/api/report", get(report))
        .route("/api/v1/runs/latest", get(latest))
        .route("/api/v1/incidents", get(incidents))
        .route("/api/v1/report", get(report))
        .route("/api/v1/components", get(components))
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/chart", get(chart))
        .route("/api/v1/slo", get(slo))
        .route("/api/v1/probes/{name}/pause", post(pause))
        .route("/api/v1/probes/{name}/resume", post(resume))
        .route("/api/v1/probes/{name}/run", post(run_now))
        .route(
            "/api/v1/maintenance",
            post(start_maintenance).get(list_maintenance),
        )
        .route("/api/v1/maintenance/{id}", delete(end_maintenance))
        .route("/api/v1/incidents/{id}/resolve", post(resolve))
        .route("/api/v1/alerts/alertmanager", post(alertmanager))
        .route("/api/v1/alerts/grafana", post(grafana))
        .route(
            "/api/v1/rehearsals",
            post(start_rehearsal).get(list_rehearsals),
        )
        .route("/api/v1/rehearsals/{id}", get(get_rehearsal))
        .with_state(state)
}

/// The warning due when the API listens on `addr`: reads are open to whoever can reach
/// a non-loopback address, and without a token the mutating routes will be refused there.
pub fn exposure_warning(addr: SocketAddr, token: bool) -> Option<&'static str> {
    (!addr.ip().is_loopback() && !token).then_some(
        "the API listens on a non-loopback address without api_token_env: runs, incidents, \
         reports and metrics are readable by anyone who can reach it, and mutating routes are \
         refused; publish the port only where it is needed, or set api_token_env",
    )
}

/// Serve the API on `listener` within `limits` until `stop`; then stop accepting, let each
/// connection finish its request in flight and return once they are all closed.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    limits: Limits,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        if let Some(w) = exposure_warning(addr, state.config.agent.api_token.is_some()) {
            tracing::warn!(%addr, "{w}");
        }
    }
    let metrics = state.metrics.clone();
    let app = router(state);
    let mut conns = JoinSet::new();
    let mut last_warn: Option<Instant> = None;
    let mut may_warn = move || {
        let now = Instant::now();
        let due = last_warn.is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
        if due {
            last_warn = Some(now);
        }
        due
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(done) = conns.join_next() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        let what = crate::pipeline::panic_message(e.into_panic().as_ref());
                        tracing::warn!(panic = %what, "an API connection panicked");
                    }
                }
                metrics.api_connections.set(conns.len() as f64);
                continue;
            }
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            // The peer gave up before we took it: nothing to wait for.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue
            }
            // Out of descriptors, most likely: wait rather than spin.
            Err(e) => {
                if may_warn() {
                    tracing::warn!(error = %e, "the API cannot accept a connection");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        if conns.len() >= limits.max_connections {
            refuse(stream);
            metrics.api_connections_refused.inc();
            if may_warn() {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "the API serves its maximum of connections; closing new ones"
                );
            }
            continue;
        }
        conns.spawn(connection(stream, peer, app.clone(), limits, stop.clone()));
        metrics.api_connections.set(conns.len() as f64);
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    metrics.api_connections.set(0.0);
    Ok(())
}

/// Best effort: tell the client why before closing (nothing waits for it to be sent).
fn refuse(stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n\
        Connection: close\r\nContent-Length: 0\r\n\r\n";
    let _ = stream.try_write(BUSY);
}

/// One connection: HTTP/1.1 with the header-read timeout; closed when idle for
/// `idle_timeout`; on `stop`, finishes the request in flight and closes.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let seen = Arc::new(Progress::new());
    let io = TokioIo::new(Watched {
        io: stream,
        seen: seen.clone(),
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    // The client's address for the handlers (who changed what, in the log).
    let app = tower::ServiceExt::map_request(app, move |mut req: axum::extract::Request<_>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    });
    let conn = b.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let idle_at = seen.last() + limits.idle_timeout;
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "API connection ended");
                }
                return;
            }
            _ = stop.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep_until(idle_at) => {
                if seen.last() + limits.idle_timeout <= Instant::now() {
                    tracing::debug!(idle_ms = limits.idle_timeout.as_millis() as u64, "closing an idle API connection");
                    return;
                }
            }
        }
    }
}

/// When bytes last moved on a connection.
struct Progress {
    start: Instant,
    ms: AtomicU64,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            start: Instant::now(),
            ms: AtomicU64::new(0),
        }
    }
    fn mark(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.ms.fetch_max(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }
}

/// A socket that marks [`Progress`] whenever a read or write moves bytes.
struct Watched {
    io: TcpStream,
    seen: Arc<Progress>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.seen.mark();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.seen.mark();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.seen.mark();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn internal(e: anyhow::Error) -> Response {
    if let Some(b) = e.downcast_ref::<Busy>() {
        return busy(b.0);
    }
    if e.is::<store::UnknownLocation>() {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("{e:#}")})),
        )
            .into_response();
    }
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"error": format!("{e:#}")})),
    )
        .into_response()
}

/// 503 with Retry-After: the agent is busy with the same kind of work.
fn busy(what: &str) -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": format!("busy: {what}; retry later")})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER));
    no_store(r)
}

/// Run a blocking read on its own connection off the async threads, at most [`READERS`]
/// at once (a read that waits longer than [`READ_WAIT`] fails as [`Busy`]).
async fn read<T: Send + 'static>(
    s: &AppState,
    f: impl FnOnce(&crate::store::db::Conn) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<Option<T>> {
    let permit = match tokio::time::timeout(READ_WAIT, s.readers.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => return Err(Busy("too many database reads in flight").into()),
    };
    let db = s.db.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        match db.reader()? {
            Some(c) => f(&c).map(Some),
            None => Ok(None),
        }
    })
    .await?
}

/// Every check of `/health`, in contract order: the writer answers a ping through its queue
/// (a round trip of everything queued before it; `None`: the agent is stopping); in fleet
/// mode, the store (degraded while Postgres is unreachable and runs are buffered on local
/// disk, and while the buffer is flushed); the other parts by their progress stamps and
/// faults. The heartbeat asks the same question.
pub async fn all_checks(store: Option<Store>, health: &Health) -> Vec<(String, Check)> {
    let t = Instant::now();
    let pinger = store.clone();
    let ping = async {
        match pinger {
            Some(store) => store.ping().await,
            None => Err(anyhow::anyhow!("the agent is stopping")),
        }
    };
    let writer = match tokio::time::timeout(WRITER_PING, ping).await {
        Ok(Ok(())) => Check::Ok {
            latency_ms: t.elapsed().as_secs_f64() * 1e3,
        },
        Ok(Err(e)) => Check::Fail {
            error: format!("{e:#}"),
        },
        Err(_) => Check::Fail {
            error: format!(
                "wedged: the store writer did not answer a ping within {} s",
                WRITER_PING.as_secs()
            ),
        },
    };
    let writer = match health.part("writer") {
        Some(dead @ Check::Fail { .. }) => dead,
        _ => writer,
    };
    // Read after the ping: it has seen what the writer saw about the database.
    let store = store
        .as_ref()
        .and_then(Store::link)
        .map(|l| match l.problem() {
            Some(error) => Check::Degraded { error },
            None => Check::Ok {
                latency_ms: match &writer {
                    Check::Ok { latency_ms } => *latency_ms,
                    _ => 0.0,
                },
            },
        });
    let mut checks = vec![("writer".to_string(), writer)];
    checks.extend(store.map(|c| ("store".to_string(), c)));
    checks.extend(health.checks());
    checks
}

/// Each part of the pipeline (see [`all_checks`]).
async fn health(State(s): State<AppState>) -> Response {
    let store = s.store();
    let checks = all_checks(store, &s.health).await;
    let status = if checks.iter().any(|(_, c)| c.status() == "fail") {
        "fail"
    } else if checks.iter().any(|(_, c)| c.status() == "degraded") {
        "degraded"
    } else {
        "ok"
    };
    let checks: serde_json::Map<String, Value> =
        checks.into_iter().map(|(n, c)| (n, c.to_json())).collect();
    let body = json!({
        "status": status,
        "service": "watchpost",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.health.uptime().as_secs(),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "checks": checks,
    });
    let code = if status == "fail" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    no_store((code, Json(body)).into_response())
}

async fn metrics(State(s): State<AppState>) -> Response {
    s.metrics.uptime.set(s.health.uptime().as_secs_f64());
    let link = s.store().as_ref().and_then(Store::link);
    if let Some(l) = link {
        s.metrics.store_buffered.set(l.buffered as f64);
        let seen = s.metrics.store_dropped.get();
        s.metrics
            .store_dropped
            .inc_by(l.dropped.saturating_sub(seen));
    }
    no_store(
        (
            [(header::CONTENT_TYPE, crate::metrics::TEXT_FORMAT)],
            s.metrics.render(),
        )
            .into_response(),
    )
}

async fn latest(State(s): State<AppState>) -> Response {
    // From the store's memory; from the database once the API has released the store.
    let mem = s.store().as_ref().map(Store::latest);
    // Paused probes are listed by name (their newest run stays in `runs`).
    let paused = s.paused().names();
    if let Some(l) = mem {
        return no_store(Json(json!({"runs": l.runs(), "paused": paused})).into_response());
    }
    match read(&s, |c| Ok(store::latest_runs(c)?)).await {
        Ok(v) => {
            no_store(Json(json!({"runs": v.unwrap_or_default(), "paused": paused})).into_response())
        }
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct OverviewQuery {
    /// The page's mode: only the series changed since this cursor (empty: all), with
    /// compact strips.
    since: Option<String>,
    /// Fleet: one location's runs (default: every location's).
    location: Option<String>,
}

/// A series' recent runs as JSON: with `page`, one letter per run (`strip`: `u` up, `d`
/// degraded, `x` down, `s` a planned run skipped because the previous one was still going)
/// with its start (`strip_t0`, ms) and each run's offset from it in seconds (`strip_dt`);
/// else `recent`, the runs themselves.
fn strip_json(item: &mut Value, recent: &store::Recent, page: bool) {
    if page {
        let t0 = recent.runs.front().map_or(0, |t| t.0);
        let letters: String = recent
            .runs
            .iter()
            .map(|t| match t.1 {
                "up" => 'u',
                "degraded" => 'd',
                crate::store::SKIPPED => 's',
                _ => 'x',
            })
            .collect();
        let dt: Vec<i64> = recent.runs.iter().map(|t| (t.0 - t0) / 1000).collect();
        item["strip"] = json!(letters);
        item["strip_t0"] = json!(t0);
        item["strip_dt"] = json!(dt);
    } else {
        item["recent"] = json!(recent.runs);
    }
}

/// Every series' newest run, its uptime strip and newest failure: on a single machine from
/// the store's memory (no database work); in a fleet from every location's runs, followed
/// through the run feed (one short indexed read per refresh), fleet-wide with each
/// location's newest run and strip under `locations`, or one location's with `?location=`.
///
/// With `?since=CURSOR` (what the page asks): only the series whose newest run changed
/// since the answer that gave the cursor (all of them when the cursor is empty or stale:
/// `full`), each strip compact (see [`strip_json`]).
async fn overview(State(s): State<AppState>, Query(q): Query<OverviewQuery>) -> Response {
    let paused = s.paused().names();
    let page = q.since.is_some();
    let cursor = q.since.filter(|c| !c.is_empty());
    let location = q.location.filter(|l| !l.is_empty());
    // Fleet mode: what the view could not read is said in `stale`, and the view answers
    // from memory (a Postgres outage does not blank the page).
    let mut stale = None;
    let changes = if s.fleet() {
        let (view, cfg) = (s.fleet_view.clone(), s.config.clone());
        if let Err(e) = read(&s, move |c| Ok(view.refresh(c, &cfg)?)).await {
            tracing::debug!(error = %format!("{e:#}"), "the dashboard's fleet view is not up to date");
            stale = Some(format!("{e:#}"));
        }
        Some(
            s.fleet_view
                .changed_since(location.as_deref(), cursor.as_deref()),
        )
    } else {
        s.store().map(|st| {
            let c = st.latest().changed_since(cursor.as_deref());
            store::view::FleetChanges {
                cursor: c.cursor,
                full: c.full,
                series: c
                    .series
                    .into_iter()
                    .map(|(latest, recent)| store::view::SeriesView {
                        latest,
                        recent,
                        locations: Vec::new(),
                    })
                    .collect(),
                locations: Vec::new(),
            }
        })
    };
    let (next, full, locations) = changes.as_ref().map_or((String::new(), true, vec![]), |c| {
        (c.cursor.clone(), c.full, c.locations.clone())
    });
    let series: Vec<Value> = changes
        .map(|c| c.series)
        .unwrap_or_default()
        .into_iter()
        .map(|v| {
            let run = v.latest;
            let kind = s
                .config
                .probe(&run.probe)
                .map_or(run.kind.as_str(), |p| p.kind());
            let mut item = json!({
                "name": run.probe,
                "kind": kind,
                "wer": v.recent.wer,
                "last_bad": v.recent.last_bad,
            });
            strip_json(&mut item, &v.recent, page);
            item["latest"] = json!(run);
            if !v.locations.is_empty() {
                let per: Vec<Value> = v
                    .locations
                    .iter()
                    .map(|(l, run, recent)| {
                        let mut x =
                            json!({"location": l, "latest": run, "last_bad": recent.last_bad});
                        strip_json(&mut x, recent, page);
                        x
                    })
                    .collect();
                item["locations"] = json!(per);
            }
            item
        })
        .collect();
    let mut body =
        json!({"now": chrono::Utc::now().timestamp_millis(), "series": series, "paused": paused});
    if page {
        body["cursor"] = json!(next);
        body["full"] = json!(full);
    }
    if s.fleet() {
        body["locations"] = json!(locations);
        body["stale"] = json!(stale);
    }
    no_store(Json(body).into_response())
}

#[derive(Deserialize)]
struct ChartQuery {
    series: String,
    window: Option<String>,
    /// Fleet: one location's chart (default: every location merged).
    location: Option<String>,
}

/// Longest chart window.
const CHART_MAX: Duration = Duration::from_secs(31 * 86400);

/// One series' p50/p95/p99 per phase and availability per bucket over `window` (1h, 24h,
/// 7d…): indexed reads of that series only.
async fn chart(State(s): State<AppState>, Query(q): Query<ChartQuery>) -> Response {
    let window = match crate::config::duration::parse(q.window.as_deref().unwrap_or("1h")) {
        Ok(w) if w >= Duration::from_secs(60) && w <= CHART_MAX => w,
        Ok(_) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "window must be between 1m and 31d")
                .into_response()
        }
        Err(e) => return ApiError::new(StatusCode::BAD_REQUEST, e).into_response(),
    };
    let cfg = s.config.clone();
    let now = chrono::Utc::now().timestamp_millis();
    let r = read(&s, move |c| {
        let location = q.location.as_deref().filter(|l| !l.is_empty());
        Ok(crate::report::series_chart(
            &cfg, c, &q.series, window, now, location,
        )?)
    })
    .await;
    match r {
        Ok(v) => no_store(Json(v).into_response()),
        Err(e) => internal(e),
    }
}

/// Objectives, availability, error budget and burn of every component over its SLO window;
/// computed at most every [`REPORT_TTL`] and served from memory in between.
async fn slo(State(s): State<AppState>) -> Response {
    if let Some(body) = s.reports.get(&(SLO_KEY, None)) {
        return json_bytes(body);
    }
    let (cfg, sums) = (s.config.clone(), s.hourly_sums.clone());
    let now = chrono::Utc::now().timestamp_millis();
    let built = read(&s, move |c| {
        // Every location's runs count (a fleet's; a single machine has one).
        let locations = store::locations(c)?;
        let list = cfg
            .components
            .iter()
            .map(|comp| crate::slo::component_slo_in(c, comp, now, Some(&sums), &locations))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Bytes::from(serde_json::to_vec(
            &json!({"components": list}),
        )?))
    })
    .await;
    match built {
        Ok(Some(body)) => {
            s.reports.put((SLO_KEY, None), body.clone());
            json_bytes(body)
        }
        Ok(None) => no_store(Json(json!({"components": []})).into_response()),
        Err(e) => internal(e),
    }
}

/// The SLO figures share the report cache under a window no report uses.
const SLO_KEY: Duration = Duration::from_nanos(1);

#[derive(Deserialize)]
struct IncidentQuery {
    #[serde(default)]
    open: bool,
    /// Newest this many (at most 500).
    limit: Option<usize>,
}

async fn incidents(State(s): State<AppState>, Query(q): Query<IncidentQuery>) -> Response {
    let limit = q.limit.unwrap_or(usize::MAX);
    match read(&s, move |c| {
        crate::incident::read::list_incidents_limited(c, q.open, limit)
    })
    .await
    {
        Ok(v) => no_store(Json(json!({"incidents": v.unwrap_or_default()})).into_response()),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct ReportQuery {
    window: Option<String>,
    /// Fleet: one location's report (default: every location merged).
    location: Option<String>,
}

async fn report(State(s): State<AppState>, Query(q): Query<ReportQuery>) -> Response {
    let window = match q
        .window
        .as_deref()
        .map(crate::config::duration::parse)
        .unwrap_or(Ok(Duration::from_secs(86400)))
    {
        Ok(w) => w,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    };
    let key = (window, q.location.filter(|l| !l.is_empty()));
    if let Some(body) = s.reports.get(&key) {
        return json_bytes(body);
    }
    // One report in the making at a time; the others wait a little, then 503.
    let Ok(Ok(_turn)) = tokio::time::timeout(REPORT_WAIT, s.report_turns.acquire()).await else {
        return busy("a report is being computed");
    };
    // Made by the request we waited behind?
    if let Some(body) = s.reports.get(&key) {
        return json_bytes(body);
    }
    let cfg = s.config.clone();
    let now = chrono::Utc::now().timestamp_millis();
    let location = key.1.clone();
    let built = read(&s, move |c| {
        let r = crate::report::build_for(&cfg, c, window, now, location.as_deref())?;
        Ok(Bytes::from(serde_json::to_vec(&r)?))
    })
    .await;
    match built {
        Ok(Some(body)) => {
            s.reports.put(key, body.clone());
            json_bytes(body)
        }
        Ok(None) => no_store(Json(Value::Null).into_response()),
        Err(e) => internal(e),
    }
}

fn json_bytes(body: Bytes) -> Response {
    no_store(
        (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(body),
        )
            .into_response(),
    )
}

/// `GET /api/v1/components`: every component with its status, open incident, members and
/// active maintenance window.
async fn components(State(s): State<AppState>) -> Response {
    let (cfg, paused) = (s.config.clone(), s.paused());
    let now = chrono::Utc::now().timestamp_millis();
    let r = read(&s, move |c| {
        crate::incident::read::list_components(c, &cfg, &paused, now)
    })
    .await;
    match r {
        Ok(v) => no_store(Json(json!({"components": v.unwrap_or_default()})).into_response()),
        Err(e) => internal(e),
    }
}

/// Largest JSON body a control route accepts.
const MAX_CONTROL_BODY: usize = 64 * 1024;

/// The JSON body of a control route; an empty body is `T::default()`.
fn body<T: DeserializeOwned + Default>(b: &Bytes) -> Result<T, ApiError> {
    if b.len() > MAX_CONTROL_BODY {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body over {MAX_CONTROL_BODY} bytes"),
        ));
    }
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(b)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// `{reason}`, optional, of pause, resume, run and resolve.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Why {
    #[serde(default)]
    reason: String,
}

impl Why {
    fn origin(self, who: Authorized) -> Origin {
        Origin {
            who: who.remote,
            reason: self.reason,
        }
    }
}

type Answer = Result<Response, ApiError>;

fn answer(status: StatusCode, v: Value) -> Answer {
    Ok(no_store((status, Json(v)).into_response()))
}

async fn set_paused(s: AppState, who: Authorized, name: String, b: Bytes, paused: bool) -> Answer {
    let origin = body::<Why>(&b)?.origin(who);
    let changed = s.control()?.set_paused(&name, paused, &origin).await?;
    answer(
        StatusCode::OK,
        json!({"probe": name, "paused": paused, "changed": changed}),
    )
}

/// `POST /api/v1/probes/{name}/pause`: no more scheduled runs until resumed (kept across
/// restarts).
async fn pause(
    who: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
    b: Bytes,
) -> Answer {
    set_paused(s, who, name, b, true).await
}

/// `POST /api/v1/probes/{name}/resume`.
async fn resume(
    who: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
    b: Bytes,
) -> Answer {
    set_paused(s, who, name, b, false).await
}

/// `POST /api/v1/probes/{name}/run`: run now; the answer is the run as `check --json`
/// prints it.
async fn run_now(
    who: Authorized,
    State(s): State<AppState>,
    Path(name): Path<String>,
    b: Bytes,
) -> Answer {
    let origin = body::<Why>(&b)?.origin(who);
    let control = s.control()?;
    // Its own task: a client that hangs up (or the idle timeout on a long listen run) does
    // not cut the run; it is still stored and evaluated.
    let run = tokio::spawn(async move { control.run_now(&name, &origin).await });
    let r = run.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the run failed: {e}"),
        )
    })??;
    answer(StatusCode::OK, r.to_json())
}

/// `POST /api/v1/maintenance` body.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartWindow {
    component: String,
    /// `"15m"`, `"2h"`…
    duration: String,
    #[serde(default)]
    reason: String,
}

/// `POST /api/v1/maintenance`: a window on `component` from now for `duration`; answers
/// 201 with the window (its `id` ends it).
async fn start_maintenance(who: Authorized, State(s): State<AppState>, b: Bytes) -> Answer {
    let req: StartWindow = body(&b)?;
    if req.component.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "component is required",
        ));
    }
    let duration = crate::config::duration::parse(&req.duration)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("duration: {e}")))?;
    let origin = Origin {
        who: who.remote,
        reason: req.reason,
    };
    let w = s
        .control()?
        .command(|reply| Command::StartMaintenance {
            component: req.component,
            duration,
            origin,
            reply,
        })
        .await?;
    answer(StatusCode::CREATED, w.to_json())
}

/// `GET /api/v1/maintenance`: windows started through the API that have not ended.
async fn list_maintenance(State(s): State<AppState>) -> Response {
    let now = chrono::Utc::now().timestamp_millis();
    // The agent serving this has migrated its database: the table is there.
    let r = read(&s, move |c| {
        Ok(crate::control::load_windows(c, now)?
            .iter()
            .map(crate::control::Window::to_json)
            .collect::<Vec<_>>())
    })
    .await;
    match r {
        Ok(v) => no_store(Json(json!({"windows": v.unwrap_or_default()})).into_response()),
        Err(e) => internal(e),
    }
}

/// `DELETE /api/v1/maintenance/{id}`: end a running window now.
async fn end_maintenance(
    who: Authorized,
    State(s): State<AppState>,
    Path(id): Path<i64>,
) -> Answer {
    let origin = Why::default().origin(who);
    let w = s
        .control()?
        .command(|reply| Command::EndMaintenance { id, origin, reply })
        .await?;
    answer(StatusCode::OK, w.to_json())
}

/// `POST /api/v1/incidents/{id}/resolve` with `{reason}`: resolve by hand; the reason goes
/// on the timeline and into the resolve notifications.
async fn resolve(
    who: Authorized,
    State(s): State<AppState>,
    Path(id): Path<i64>,
    b: Bytes,
) -> Answer {
    let why: Why = body(&b)?;
    if why.reason.trim().is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "reason is required"));
    }
    let origin = why.origin(who);
    s.control()?
        .command(|reply| Command::Resolve {
            incident: id,
            origin,
            reply,
        })
        .await?;
    answer(StatusCode::OK, json!({"incident": id, "resolved": true}))
}

/// `POST /api/v1/rehearsals` body.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartRehearsal {
    /// A rehearsal file inside the agent's config directory (`rehearsals/drill.toml`).
    #[serde(default)]
    file: String,
}

/// `POST /api/v1/rehearsals` with `{"file"}`: start that rehearsal on this agent; 202 with
/// its document (`status: running`, `rehearsal_id` to follow it). 409 while another runs or
/// when a component of the drill is in maintenance or has an incident open.
async fn start_rehearsal(who: Authorized, State(s): State<AppState>, b: Bytes) -> Answer {
    let req: StartRehearsal = body(&b)?;
    if req.file.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "file is required: a rehearsal file in the agent's config directory, e.g. rehearsals/drill.toml",
        ));
    }
    let doc = s
        .control()?
        .rehearsals()
        .start(&req.file, &format!("api {}", who.remote))
        .await?;
    answer(StatusCode::ACCEPTED, doc)
}

/// The running rehearsal's document (`None`: none runs, or not this id).
fn running_rehearsal(s: &AppState, id: Option<&str>) -> Option<Value> {
    s.control().ok().and_then(|c| c.rehearsals().current(id))
}

/// `GET /api/v1/rehearsals`: the one running (if any) and the stored ones, newest first,
/// without timelines.
async fn list_rehearsals(State(s): State<AppState>) -> Response {
    let running = running_rehearsal(&s, None).map(|mut v| {
        if let Some(o) = v.as_object_mut() {
            o.remove("timeline");
        }
        v
    });
    let r = read(&s, |c| Ok(crate::chaos::live::list(c)?)).await;
    match r {
        Ok(stored) => {
            let mut all: Vec<Value> = running.into_iter().collect();
            let ids: Vec<Value> = all.iter().map(|v| v["rehearsal_id"].clone()).collect();
            all.extend(
                stored
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|v| !ids.contains(&v["rehearsal_id"])),
            );
            no_store(Json(json!({"rehearsals": all})).into_response())
        }
        Err(e) => internal(e),
    }
}

/// `GET /api/v1/rehearsals/{id}`: progress (`status: running`, the timeline so far) and
/// then the final verdict, in the `rehearse --json` shape.
async fn get_rehearsal(State(s): State<AppState>, Path(id): Path<String>) -> Answer {
    if let Some(doc) = running_rehearsal(&s, Some(&id)) {
        return answer(StatusCode::OK, doc);
    }
    let key = id.clone();
    let found = read(&s, move |c| Ok(crate::chaos::live::stored(c, &key)?))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    match found.flatten() {
        Some(doc) => answer(StatusCode::OK, doc),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no rehearsal {id:?} on this agent"),
        )),
    }
}

/// How much of a refused body is still read and dropped, and for how long, so that a
/// client still writing it reads the 413 instead of a reset connection.
const DRAIN_MAX: u64 = 8 << 20;
const DRAIN_FOR: Duration = Duration::from_secs(2);

/// Read a request body of at most `max` bytes; a bigger one is a 413 (from its
/// Content-Length when it has one, before anything is kept). The rest of a refused body is
/// drained, bounded by [`DRAIN_MAX`] and [`DRAIN_FOR`], before the answer goes out.
async fn body_within(headers: &HeaderMap, mut body: Body, max: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "payload over {max} bytes; send fewer alerts per notification (e.g. Alertmanager max_alerts)"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut kept = Vec::new();
    let mut seen = 0u64;
    if declared.is_none_or(|n| n <= max as u64) {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
            })?;
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen > max as u64 {
                    break;
                }
                kept.extend_from_slice(&data);
            }
        }
        if seen <= max as u64 {
            return Ok(Bytes::from(kept));
        }
    }
    if declared.is_none_or(|n| n <= DRAIN_MAX) {
        let drain = async {
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > DRAIN_MAX {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_FOR, drain).await;
    }
    Err(too_large())
}

/// `POST /api/v1/alerts/alertmanager`: an Alertmanager webhook payload (version 4).
async fn alertmanager(
    who: Authorized,
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    inbound_alerts(s, who, Source::Alertmanager, headers, body).await
}

/// `POST /api/v1/alerts/grafana`: a Grafana webhook contact point payload.
async fn grafana(
    who: Authorized,
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    inbound_alerts(s, who, Source::Grafana, headers, body).await
}

/// The alert routes: the token ([`Authorized`], before the body is read), then the body
/// cap, then the payload; only a payload that passed all three reaches the evaluator, so a
/// refused request stores nothing. 200 with the [`alerts::AlertReport`] once the alerts'
/// state is committed.
async fn inbound_alerts(
    s: AppState,
    who: Authorized,
    source: Source,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let body = body_within(&headers, body, MAX_ALERT_BODY).await?;
    let alerts = alerts::parse(source, &body).map_err(|e| {
        tracing::warn!(source = source.as_str(), remote = %who.remote, error = %e, "inbound alerts refused");
        ApiError::new(StatusCode::BAD_REQUEST, e)
    })?;
    let report = s.control()?.alerts(alerts).await?;
    tracing::info!(
        source = source.as_str(), remote = %who.remote, received = report.received,
        applied = report.applied, stale = report.stale, unmatched = report.unmatched.len(),
        components = %report.components.join(", "), "inbound alerts"
    );
    answer(StatusCode::OK, json!(report))
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

/// The dashboard: one page, embedded in the binary, no external requests. It polls
/// `/api/v1/overview?since=` (the series changed since its last poll), `/components`, `/incidents?limit=20` and `/slo` every 5 s and loads a
/// chart (`/api/v1/chart`) for each probe card on screen.
const DASHBOARD: &str = include_str!("dashboard.html");

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Served {
        addr: SocketAddr,
        state: AppState,
        stop: CancellationToken,
        _dir: tempfile::TempDir,
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    async fn start(limits: Limits) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = dir.path().join("watchpost.toml");
        std::fs::write(
            &main,
            "[agent]\ndata_dir = \"data\"\nprobes = []\nlisten = \"\"\n",
        )
        .expect("write config");
        let config = match crate::config::load(&main) {
            Ok(c) => Arc::new(c),
            Err(e) => panic!("config: {e}"),
        };
        let (store, _writer) = Store::start(&config.db_path()).expect("store");
        let state = AppState::new(config, Metrics::new(), store, Health::default());
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let stop = CancellationToken::new();
        tokio::spawn(serve(l, state.clone(), limits, stop.clone()));
        Served {
            addr,
            state,
            stop,
            _dir: dir,
        }
    }

    /// A request on a fresh connection: (status, Retry-After, body).
    async fn get(addr: SocketAddr, path: impl AsRef<str>) -> (u16, Option<String>, String) {
        let path = path.as_ref();
        let c = reqwest::Client::new();
        let r = c
            .get(format!("http://{addr}{path}"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("response");
        let retry = r
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (
            r.status().as_u16(),
            retry,
            r.text().await.unwrap_or_default(),
        )
    }

    /// Read until the server closes; how long that took (None: still open at `within`).
    async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
        let t = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(t + within, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
                Ok(Ok(_)) => continue,
                Err(_) => return None,
            }
        }
    }

    #[test]
    fn tokens_match_only_exactly() {
        let cases = [
            ("s3cret", "s3cret", true),
            ("s3cret", "s3cre", false),
            ("s3cret", "s3cretx", false),
            ("S3cret", "s3cret", false),
            ("", "s3cret", false),
            ("s3cret ", "s3cret", false),
        ];
        for (presented, token, want) in cases {
            assert_eq!(token_matches(presented, token), want, "{presented:?}");
        }
    }

    #[test]
    fn a_non_loopback_listener_without_a_token_is_warned_about() {
        let cases = [
            ("127.0.0.1:9464", false, false),
            ("[::1]:9464", false, false),
            ("0.0.0.0:9464", false, true),
            ("0.0.0.0:9464", true, false),
            ("[::]:9464", false, true),
            ("192.0.2.7:9464", false, true),
        ];
        for (addr, token, warned) in cases {
            let addr: SocketAddr = addr.parse().expect("addr");
            assert_eq!(
                exposure_warning(addr, token).is_some(),
                warned,
                "{addr} {token}"
            );
        }
    }

    #[tokio::test]
    async fn beyond_the_cap_connections_are_closed_and_half_sent_ones_time_out() {
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(30),
        };
        let s = start(limits).await;
        let mut held = Vec::new();
        let opened = Instant::now();
        for _ in 0..2 {
            let mut c = TcpStream::connect(s.addr).await.expect("connect");
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("half a request");
            held.push(c);
        }
        // Let the server take both before the third arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = TcpStream::connect(s.addr).await.expect("connect");
        let _ = extra
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await;
        let cut = closed_within(&mut extra, Duration::from_millis(300)).await;
        assert!(
            cut.is_some(),
            "a connection beyond the cap must be closed at once"
        );
        assert_eq!(s.state.metrics.api_connections_refused.get(), 1);
        for c in &mut held {
            let cut = closed_within(c, Duration::from_secs(3)).await;
            assert!(
                cut.is_some(),
                "a half-sent request must be cut by the header timeout"
            );
        }
        let t = opened.elapsed();
        assert!(
            t >= Duration::from_millis(450),
            "cut before the header timeout: {t:?}"
        );
        let (status, _, body) = get(s.addr, "/health").await;
        assert_eq!(status, 200, "{body}");
    }

    #[tokio::test]
    async fn a_connection_whose_client_stops_reading_is_closed_when_idle() {
        let limits = Limits {
            max_connections: 4,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_millis(500),
        };
        let s = start(limits).await;
        // A /metrics far larger than what the socket buffers hold.
        let label = "x".repeat(1000);
        for i in 0..10_000 {
            s.state
                .metrics
                .probe_up
                .with([&format!("{label}{i}")])
                .set(1.0);
        }
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096)
            .expect("small receive buffer");
        let mut c = sock.connect(s.addr).await.expect("connect");
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let open = || s.state.metrics.api_connections.get();
        let t = Instant::now();
        while open() != 1.0 && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(open(), 1.0, "the connection is served");
        // Never read: the server's write stalls; it must give up after the idle timeout.
        while open() != 0.0 && t.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(open(), 0.0, "a stalled connection must be closed");
        drop(c);
    }

    #[tokio::test]
    async fn one_report_at_a_time_the_others_get_503_and_a_fresh_one_comes_from_memory() {
        let s = start(Limits::new(16)).await;
        let (status, _, first) = get(s.addr, "/api/report?window=1h").await;
        assert_eq!(status, 200, "{first}");
        // Someone else is computing a report.
        let turn = s.state.report_turns.acquire().await.expect("turn");
        let t = Instant::now();
        let (status, _, again) = get(s.addr, "/api/report?window=1h").await;
        assert_eq!(
            status, 200,
            "the same window within the TTL is served from memory"
        );
        assert_eq!(again, first);
        assert!(t.elapsed() < Duration::from_secs(1));
        let many = ["2h", "3h", "3h"].map(|w| get(s.addr, format!("/api/report?window={w}")));
        for (status, retry, body) in futures_util::future::join_all(many).await {
            assert_eq!(status, 503, "{body}");
            assert_eq!(retry.as_deref(), Some("5"));
        }
        assert!(t.elapsed() >= REPORT_WAIT, "they waited their turn first");
        drop(turn);
        let (status, _, body) = get(s.addr, "/api/report?window=2h").await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert!(v.get("rows").is_some(), "{v}");
    }
}
