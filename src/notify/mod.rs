//! Notifiers: destinations for incident transitions (Instatus, PagerDuty, e-mail, webhook),
//! fed from the SQLite outbox by one worker per notifier.
//!
//! The evaluator writes each transition and its outbox rows in one transaction; the
//! [`Dispatcher`] then delivers them: per notifier a worker with its own rate limit
//! (governor), retry policy ([`retry`]: exponential backoff with jitter, `Retry-After`
//! honoured, other 4xx dead-lettered) and circuit breaker ([`breaker`]). Workers run
//! concurrently, so one slow or dead notifier never delays another; within a notifier rows
//! are delivered in order per component. Rows stay pending until delivered, so a restart
//! picks up where the last run stopped.
//!
//! Adding a notifier: a new file with a config struct implementing [`Spec`] and a runtime
//! type implementing [`Destination`], plus one line in [`KINDS`].
//!
//! Not here: deciding when to notify (see `crate::incident`).

pub mod breaker;
pub mod email;
pub mod event;
pub mod instatus;
pub mod outbox;
pub mod pagerduty;
pub mod retry;
pub mod webhook;

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Config, Dur, Errors, Rest, SpanError};
use crate::health::{Beat, Health};
use crate::metrics::Metrics;
use crate::pipeline::Shared;
use crate::store::Store;
pub use event::{Event, EventKind, Status};
pub use retry::{DeliveryError, Retry};

/// A boxed future, for object-safe async trait methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Parses one notifier kind's keys (everything but `kind`).
type Parse = fn(Rest<'_>) -> Result<Arc<dyn Spec>, Errors>;

/// The notifier kinds: one registration line each (its name, its parser, and the schema of
/// the struct the parser deserializes, for `watchpost schema`).
pub const KINDS: &[(&str, Parse, crate::config::schema::SchemaFn)] = &[
    (
        "instatus",
        instatus::parse,
        <instatus::InstatusConfig as JsonSchema>::json_schema,
    ),
    (
        "pagerduty",
        pagerduty::parse,
        <pagerduty::PagerDutyConfig as JsonSchema>::json_schema,
    ),
    (
        "email",
        email::parse,
        <email::EmailConfig as JsonSchema>::json_schema,
    ),
    (
        "webhook",
        webhook::parse,
        <webhook::WebhookConfig as JsonSchema>::json_schema,
    ),
];

/// A `[notifier.NAME]` table in the JSON Schema: exactly one of the kinds.
pub struct NotifierTable;

impl JsonSchema for NotifierTable {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Notifier".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        crate::config::schema::one_of_kinds(
            "A notifier: `kind` decides which other keys it takes.",
            KINDS.iter().map(|(k, _, schema)| (*k, schema(g))),
        )
    }
}

/// A notifier's validated configuration.
pub trait Spec: fmt::Debug + Send + Sync {
    fn kind(&self) -> &'static str;
    /// Retry, rate and timeout settings.
    fn delivery(&self) -> &DeliveryOptions;
    /// Requests per second when `delivery.rate_limit` is not set.
    fn default_rate(&self) -> f64 {
        5.0
    }
    /// Whether this notifier wants the event (decided when the outbox row would be written).
    fn accepts(&self, ev: &Event) -> bool;
    /// Whether the notifier can serve `component` (e.g. Instatus needs its component id).
    fn check_component(&self, _component: &str) -> Result<(), String> {
        Ok(())
    }
    /// Build the runtime side (clients, transports).
    fn build(&self) -> anyhow::Result<Arc<dyn Destination>>;
    /// Whether [`Destination::review`] can carry a `[[review]]` (e-mail and webhook).
    fn carries_reviews(&self) -> bool {
        false
    }
}

/// A notifier at run time.
pub trait Destination: Send + Sync {
    /// Deliver one event. Must be idempotent per (notifier, outbox row): a retry after a
    /// partial success must not repeat the parts already done (use [`Ctx::once`]).
    fn deliver<'a>(
        &'a self,
        ctx: &'a Ctx,
        ev: &'a Event,
    ) -> BoxFuture<'a, Result<(), DeliveryError>>;
    /// `watchpost notify-test`: send one event marked as a test; returns what was done.
    fn test<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, Result<String, DeliveryError>>;
    /// Send a scheduled review (see `crate::review`); returns what was done. Only kinds
    /// whose [`Spec::carries_reviews`] is true implement it.
    fn review<'a>(
        &'a self,
        _ctx: &'a Ctx,
        _msg: &'a crate::review::ReviewMessage,
    ) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async {
            Err(DeliveryError::Invalid(
                "this notifier kind does not carry reviews".into(),
            ))
        })
    }
}

/// Kind-specific notifier configuration (a validated [`Spec`]).
#[derive(Debug, Clone)]
pub struct NotifierConfig(pub Arc<dyn Spec>);

impl NotifierConfig {
    /// Parse a `[notifier.NAME]` table whose `kind` was `kind`.
    pub fn from_kind(kind: &str, span: Range<usize>, rest: Rest<'_>) -> Result<Self, Errors> {
        match KINDS.iter().find(|(k, _, _)| *k == kind) {
            Some((_, parse, _)) => parse(rest).map(NotifierConfig),
            None => {
                let known: Vec<&str> = KINDS.iter().map(|(k, _, _)| *k).collect();
                Err(SpanError::at(
                    span,
                    format!(
                        "unknown notifier kind {kind:?} (expected {})",
                        known.join(", ")
                    ),
                )
                .into())
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        self.0.kind()
    }

    pub fn accepts(&self, ev: &Event) -> bool {
        self.0.accepts(ev)
    }

    pub fn check_component(&self, component: &str) -> Result<(), String> {
        self.0.check_component(component)
    }
}

fn default_timeout() -> Dur {
    Dur::secs(10)
}
fn default_retry_initial() -> Dur {
    Dur::secs(1)
}
fn default_retry_max() -> Dur {
    Dur::secs(300)
}
fn default_give_up() -> Dur {
    Dur::secs(24 * 3600)
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> Dur {
    Dur::secs(30)
}

/// `[notifier.NAME.delivery]`: how hard to try. Every key is optional.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryOptions {
    /// Deadline of one request (connect, send, answer).
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Most requests per second to this notifier (default: instatus 1, pagerduty 2, others 5).
    pub rate_limit: Option<f64>,
    /// First retry delay; it doubles per failed attempt (with jitter) up to `retry_max`.
    #[serde(default = "default_retry_initial")]
    pub retry_initial: Dur,
    /// Longest delay between retries.
    #[serde(default = "default_retry_max")]
    pub retry_max: Dur,
    /// A notification still failing this long after it was queued is dead-lettered.
    #[serde(default = "default_give_up")]
    pub give_up_after: Dur,
    /// Consecutive failed attempts that open the circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker waits before one probing attempt (doubles while it fails).
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown: Dur,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        DeliveryOptions {
            timeout: default_timeout(),
            rate_limit: None,
            retry_initial: default_retry_initial(),
            retry_max: default_retry_max(),
            give_up_after: default_give_up(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown: default_breaker_cooldown(),
        }
    }
}

impl DeliveryOptions {
    /// Check values; each problem is recorded at its key under `delivery` (positioned by
    /// the loader).
    pub fn validate(&self, errs: &mut Errors) {
        if let Some(r) = self.rate_limit {
            if !(r.is_finite() && r > 0.0 && r <= 1000.0) {
                errs.push(SpanError::key(
                    &["delivery", "rate_limit"],
                    format!(
                        "delivery.rate_limit = {r} must be between 0 and 1000 requests per second"
                    ),
                ));
            }
        }
        if self.timeout.0.is_zero() {
            errs.push(SpanError::key(
                &["delivery", "timeout"],
                "delivery.timeout must be above zero",
            ));
        }
        if self.retry_initial.0.is_zero() || self.retry_max.0 < self.retry_initial.0 {
            errs.push(SpanError::key(
                &["delivery", "retry_initial"],
                "delivery.retry_initial must be above zero and at most retry_max",
            ));
        }
        if self.breaker_failures == 0 {
            errs.push(SpanError::key(
                &["delivery", "breaker_failures"],
                "delivery.breaker_failures must be at least 1",
            ));
        }
    }
}

/// What a notifier needs while delivering: an HTTP client with its deadline, the rate
/// limiter, and (in the daemon) the store for references that survive restarts.
#[derive(Clone)]
pub struct Ctx {
    pub notifier: String,
    pub client: reqwest::Client,
    pub limiter: Arc<DefaultDirectRateLimiter>,
    pub timeout: Duration,
    pub store: Option<Store>,
    /// The outbox row being delivered (a stable delivery id for receivers).
    pub delivery_id: Option<i64>,
    /// `[agent].location`, for test events.
    pub location: String,
    /// The database's installation id (the daemon; `None` for notify-test).
    pub installation: Option<crate::store::Installation>,
}

/// Largest response body read from a notifier endpoint.
const MAX_BODY: usize = 64 * 1024;

impl Ctx {
    /// Build a context for notifier `name` (no store: nothing persists, e.g. notify-test).
    pub fn new(
        name: &str,
        spec: &dyn Spec,
        store: Option<Store>,
        location: &str,
    ) -> anyhow::Result<Ctx> {
        let opts = spec.delivery();
        let timeout = opts.timeout.0;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("watchpost/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building HTTP client")?;
        let rate = opts.rate_limit.unwrap_or_else(|| spec.default_rate());
        let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::MIN);
        Ok(Ctx {
            notifier: name.to_string(),
            client,
            limiter: Arc::new(RateLimiter::direct(quota)),
            timeout,
            store,
            delivery_id: None,
            location: location.to_string(),
            installation: None,
        })
    }

    /// Wait for the rate limiter.
    pub async fn turn(&self) {
        self.limiter.until_ready().await;
    }

    /// Send one HTTP request (after the rate limiter) and return the body of a 2xx answer;
    /// anything else becomes a [`DeliveryError`] carrying the status and `Retry-After`.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<String, DeliveryError> {
        self.turn().await;
        let t = self.timeout;
        let resp = match tokio::time::timeout(t, req.send()).await {
            Err(_) => return Err(DeliveryError::Timeout(t)),
            Ok(Err(e)) if e.is_timeout() => return Err(DeliveryError::Timeout(t)),
            // Never the URL: webhook paths and integration URLs carry tokens.
            Ok(Err(e)) => return Err(DeliveryError::Network(error_chain(&e.without_url()))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::parse_retry_after(v, chrono::Utc::now()));
        let body = match tokio::time::timeout(t, read_capped(resp)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) if (200..300).contains(&status) => {
                return Err(DeliveryError::Network(error_chain(&e.without_url())))
            }
            Ok(Err(_)) => String::new(),
            Err(_) => return Err(DeliveryError::Timeout(t)),
        };
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(DeliveryError::Status {
                status,
                body: event::truncate(body.trim(), 300),
                retry_after,
            })
        }
    }

    /// A stored reference (e.g. the Instatus incident id) for `scope` (an incident id).
    pub async fn get_ref(&self, scope: i64, key: &str) -> Result<Option<String>, DeliveryError> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let (n, k) = (self.notifier.clone(), key.to_string());
        store
            .write(move |c| outbox::get_ref(c, &n, scope, &k))
            .await
            .map_err(|e| DeliveryError::Transient(format!("reading notifier state: {e:#}")))
    }

    /// Store a reference; committed before this returns.
    pub async fn set_ref(&self, scope: i64, key: &str, value: &str) -> Result<(), DeliveryError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let (n, k, v) = (self.notifier.clone(), key.to_string(), value.to_string());
        let now = chrono::Utc::now().timestamp_millis();
        let r = store
            .write(move |c| outbox::set_ref(c, &n, scope, &k, &v, now))
            .await;
        let r = match r {
            Ok(()) => store.flush().await,
            Err(e) => Err(e),
        };
        r.map_err(|e| DeliveryError::Transient(format!("storing notifier state: {e:#}")))
    }

    /// Run one step of a multi-request delivery at most once per outbox row, across retries
    /// and restarts (a resolve that posted the incident update but failed to reset the
    /// component does not post the update again).
    pub async fn once<F>(&self, step: &str, f: F) -> Result<(), DeliveryError>
    where
        F: Future<Output = Result<(), DeliveryError>>,
    {
        let Some(id) = self.delivery_id else {
            return f.await;
        };
        // Steps are scoped by the negated outbox id so they never collide with incident ids.
        let key = format!("step:{step}");
        if self.get_ref(-id, &key).await?.is_some() {
            return Ok(());
        }
        f.await?;
        self.set_ref(-id, &key, "done").await
    }
}

async fn read_capped(mut resp: reqwest::Response) -> Result<String, reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_BODY.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= MAX_BODY {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

/// Parse a notifier's keys with `T` and validate them: every unknown key and bad value,
/// every problem of the delivery options and every one `validate` records, in one go.
pub(crate) fn parse_with<T, F>(rest: Rest<'_>, validate: F) -> Result<Arc<dyn Spec>, Errors>
where
    T: serde::de::DeserializeOwned + Spec + 'static,
    F: FnOnce(&T, Range<usize>, &mut Errors),
{
    let span = rest.span();
    let (spec, mut errs) = rest.parse::<T>();
    let Some(spec) = spec else { return Err(errs) };
    spec.delivery().validate(&mut errs);
    validate(&spec, span, &mut errs);
    errs.finish(Arc::new(spec))
}

// ---------------------------------------------------------------------------------------
// Dispatcher
// ---------------------------------------------------------------------------------------

/// How often workers look at the outbox when nobody rings the bell.
const POLL: Duration = Duration::from_millis(500);

/// Delivers outbox rows to notifiers: one concurrent worker per notifier.
pub struct Dispatcher {
    workers: Vec<Worker>,
    store: Store,
    metrics: Metrics,
    health: Health,
}

struct Worker {
    name: String,
    dest: Arc<dyn Destination>,
    ctx: Ctx,
    opts: DeliveryOptions,
    store: Store,
    metrics: Metrics,
    clock: Clock,
    bell: outbox::Bell,
    beat: Beat,
    /// Fleet mode: the agent id rows are claimed as before delivery.
    claim_as: Option<String>,
}

/// How long a fleet claim outlives the delivery's own deadline.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);

/// The monotonic "now" the breaker is given: tokio's clock, so paused time moves it.
fn mono_now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Run blocking SQLite work with a read connection on a blocking thread, handing the
/// connection back for reuse; the connection is dropped when the work failed.
async fn off_thread<T: Send + 'static>(
    store: &Store,
    reader: &mut Option<crate::store::db::Conn>,
    f: impl FnOnce(&crate::store::db::Conn) -> crate::store::db::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let conn = match reader.take() {
        Some(c) => c,
        None => store.reader()?,
    };
    let (conn, r) = tokio::task::spawn_blocking(move || {
        let r = f(&conn);
        (conn, r)
    })
    .await?;
    if r.is_ok() {
        *reader = Some(conn);
    }
    Ok(r?)
}

impl Dispatcher {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        metrics: Metrics,
        shared: &Shared,
    ) -> anyhow::Result<Self> {
        let installation = crate::store::Installation::read(&store.reader()?)
            .context("reading the installation id")?;
        let mut workers = Vec::new();
        for n in &config.notifiers {
            let spec = n.config.0.as_ref();
            let dest = spec
                .build()
                .with_context(|| format!("notifier {}", n.name))?;
            let mut ctx = Ctx::new(&n.name, spec, Some(store.clone()), &config.agent.location)
                .with_context(|| format!("notifier {}", n.name))?;
            ctx.installation = Some(installation.clone());
            let opts = spec.delivery().clone();
            // A worker is busy for at most one delivery (its outer deadline) between loops.
            let stale_after = outer_deadline(&opts) + POLL * 2 + Duration::from_secs(5);
            workers.push(Worker {
                name: n.name.clone(),
                dest,
                ctx,
                opts,
                store: store.clone(),
                metrics: metrics.clone(),
                clock: shared.clock,
                bell: shared.bell.clone(),
                beat: shared.health.beat(
                    "dispatcher",
                    &format!("notifier worker {}", n.name),
                    stale_after,
                ),
                claim_as: shared.member.as_ref().map(|m| m.id.clone()),
            });
        }
        Ok(Dispatcher {
            workers,
            store,
            metrics,
            health: shared.health.clone(),
        })
    }

    /// Deliver until `stop` is cancelled; a delivery in progress then finishes unless
    /// `force` (the shutdown deadline) cuts it, and stays pending for the next start.
    /// A worker that panics or returns before `stop` is an error naming the notifier.
    pub async fn run(
        self,
        stop: CancellationToken,
        force: CancellationToken,
    ) -> anyhow::Result<()> {
        let names: Vec<String> = self.workers.iter().map(|w| w.name.clone()).collect();
        self.report_orphans(&names).await;
        let beat = self
            .health
            .beat("dispatcher", "dispatcher", Duration::from_secs(10));
        let mut set = tokio::task::JoinSet::new();
        let mut ids = std::collections::HashMap::new();
        for w in self.workers {
            let name = w.name.clone();
            let h = set.spawn(w.run(stop.clone(), force.clone()));
            ids.insert(h.id(), name);
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            beat.stamp();
            // With no notifier (or all stopped at shutdown) it waits for `stop`.
            let done = tokio::select! {
                _ = tick.tick() => continue,
                _ = stop.cancelled(), if set.is_empty() => return Ok(()),
                Some(done) = set.join_next_with_id() => done,
            };
            let (id, what) = match done {
                Ok((id, ())) => (id, "returned".to_string()),
                Err(e) if e.is_panic() => (
                    e.id(),
                    format!(
                        "panicked: {}",
                        crate::pipeline::panic_message(e.into_panic().as_ref())
                    ),
                ),
                Err(e) => (e.id(), "was cancelled".to_string()),
            };
            let name = ids.get(&id).cloned().unwrap_or_default();
            if !stop.is_cancelled() || what != "returned" {
                set.abort_all();
                anyhow::bail!("notifier worker {name} {what}");
            }
        }
    }

    async fn report_orphans(&self, names: &[String]) {
        let Ok(counts) = off_thread(&self.store, &mut None, outbox::counts).await else {
            return;
        };
        for (n, (pending, dead)) in counts {
            if names.contains(&n) {
                self.metrics.outbox_dead_letters.with([&n]).set(dead as f64);
            } else if pending > 0 {
                tracing::warn!(notifier = %n, pending, "outbox rows for a notifier that is no longer configured stay undelivered");
            }
        }
    }
}

/// The deadline of one delivery, which may make several requests (and wait for the rate
/// limiter between them); each request has its own `timeout`.
fn outer_deadline(opts: &DeliveryOptions) -> Duration {
    opts.timeout.0 * 4 + Duration::from_secs(10)
}

impl Worker {
    async fn run(self, shutdown: CancellationToken, force: CancellationToken) {
        let mut bell = self.bell.subscribe();
        let mut breaker =
            breaker::Breaker::new(self.opts.breaker_failures, self.opts.breaker_cooldown.0);
        let mut reader = None;
        loop {
            self.beat.stamp();
            if shutdown.is_cancelled() {
                return;
            }
            bell.borrow_and_update();
            let name = self.name.clone();
            let rows = match off_thread(&self.store, &mut reader, move |c| {
                outbox::pending(c, &name)
            })
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(notifier = %self.name, error = %format!("{e:#}"), "cannot read the outbox");
                    Vec::new()
                }
            };
            self.metrics
                .outbox_pending
                .with([&self.name])
                .set(rows.len() as f64);
            let now = self.clock.now_ms();
            let heads = outbox::heads(&rows);
            let due: Vec<&outbox::Row> = heads
                .iter()
                .copied()
                .filter(|r| r.next_attempt_at <= now)
                .collect();
            if due.is_empty() {
                let next = heads.iter().map(|r| r.next_attempt_at).min();
                let wait = next.map_or(POLL, |t| {
                    Duration::from_millis((t - now).clamp(1, POLL.as_millis() as i64) as u64)
                });
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                    _ = bell.changed() => {}
                }
                continue;
            }
            for row in due {
                if shutdown.is_cancelled() {
                    return;
                }
                if let Err(until) = breaker.allow(mono_now()) {
                    // Wait in poll-sized steps so the worker keeps stamping its beat.
                    let until = tokio::time::Instant::from_std(until)
                        .min(tokio::time::Instant::now() + POLL);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(until) => {}
                    }
                    break;
                }
                if !self.claim(row.id).await {
                    // Another agent holds it, or this one no longer leads: look again later.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(POLL) => {}
                    }
                    break;
                }
                if !self.attempt(row, &mut breaker, &force).await {
                    return;
                }
                self.metrics
                    .notifier_circuit_open
                    .with([&self.name])
                    .set(if breaker.is_open() { 1.0 } else { 0.0 });
            }
        }
    }

    /// Fleet mode: claim the row for this agent before delivering it, so two leaders never
    /// deliver the same row (see `crate::fleet::claim`). Always `true` on a single machine.
    async fn claim(&self, id: i64) -> bool {
        let Some(agent) = self.claim_as.clone() else {
            return true;
        };
        let ttl = outer_deadline(&self.opts) + CLAIM_MARGIN;
        match self
            .store
            .write(move |c| crate::fleet::claim(c, id, &agent, ttl))
            .await
        {
            Ok(claimed) => {
                if !claimed {
                    tracing::debug!(notifier = %self.name, id, "outbox row not claimed: another agent delivers it, or this one no longer leads");
                }
                claimed
            }
            Err(e) => {
                tracing::warn!(notifier = %self.name, id, error = %format!("{e:#}"), "cannot claim the outbox row");
                false
            }
        }
    }

    /// One delivery attempt of `row`; `false` when the shutdown deadline cut it (the row
    /// stays pending and is delivered after the next start).
    async fn attempt(
        &self,
        row: &outbox::Row,
        breaker: &mut breaker::Breaker,
        force: &CancellationToken,
    ) -> bool {
        let attempts = row.attempts.saturating_add(1);
        let ev = match &row.event {
            Ok(ev) => ev,
            Err(msg) => {
                self.dead(row, attempts, msg).await;
                return true;
            }
        };
        let mut ctx = self.ctx.clone();
        ctx.delivery_id = Some(row.id);
        let ev = &Event {
            installation: ctx
                .installation
                .as_ref()
                .and_then(|i| i.for_incident(ev.incident_id)),
            ..ev.clone()
        };
        // The notifier's own requests have deadlines; this outer one bounds a delivery that
        // makes several requests (and waits for the rate limiter between them).
        let outer = outer_deadline(&self.opts);
        let result = tokio::select! {
            _ = force.cancelled() => {
                tracing::warn!(notifier = %self.name, id = row.id, "shutdown deadline: delivery cut; it stays pending");
                return false;
            }
            r = tokio::time::timeout(outer, self.dest.deliver(&ctx, ev)) => match r {
                Ok(r) => r,
                Err(_) => Err(DeliveryError::Timeout(outer)),
            },
        };
        let now = self.clock.now_ms();
        match result {
            Ok(()) => {
                breaker.success();
                self.metrics
                    .notifications
                    .with([&self.name, "delivered"])
                    .inc();
                self.metrics
                    .notification_delay
                    .with([&self.name])
                    .observe((now - row.created_at).max(0) as f64 / 1000.0);
                tracing::info!(notifier = %self.name, component = %row.component, event = ev.kind.as_str(), id = row.id, attempts, "notification delivered");
                let id = row.id;
                self.commit(move |c| outbox::mark_delivered(c, id, attempts, now))
                    .await;
            }
            Err(e) => match e.retry() {
                Retry::Never => {
                    self.dead(
                        row,
                        attempts,
                        &format!("{e} (not retried: the notifier rejected it)"),
                    )
                    .await
                }
                Retry::Later(retry_after) => {
                    if breaker.failure(mono_now()) {
                        tracing::warn!(notifier = %self.name, cooldown_ms = self.opts.breaker_cooldown.0.as_millis() as u64, "circuit breaker open: pausing deliveries to this notifier");
                    }
                    let age = Duration::from_millis((now - row.created_at).max(0) as u64);
                    if age >= self.opts.give_up_after.0 {
                        self.dead(
                            row,
                            attempts,
                            &format!(
                                "{e} (gave up after {} of retries)",
                                crate::config::duration::human(age)
                            ),
                        )
                        .await;
                        return true;
                    }
                    let delay = retry::next_delay(
                        retry_after,
                        attempts,
                        self.opts.retry_initial.0,
                        self.opts.retry_max.0,
                        rand::random::<f64>(),
                    );
                    self.metrics.notifications.with([&self.name, "retry"]).inc();
                    tracing::warn!(
                        notifier = %self.name, component = %row.component, id = row.id, attempts,
                        class = e.class(), error = %e, retry_in_ms = delay.as_millis() as u64, "notification failed; will retry"
                    );
                    let (id, msg, next) = (row.id, e.to_string(), now + delay.as_millis() as i64);
                    self.commit(move |c| outbox::mark_retry(c, id, attempts, next, &msg))
                        .await;
                }
            },
        }
        true
    }

    async fn dead(&self, row: &outbox::Row, attempts: u32, reason: &str) {
        self.metrics
            .notifications
            .with([&self.name, "dead_letter"])
            .inc();
        tracing::error!(
            notifier = %self.name, component = %row.component, id = row.id, attempts, error = %reason,
            "notification dead-lettered: it will not be retried (see `watchpost incidents`)"
        );
        let (id, msg, now) = (row.id, reason.to_string(), self.clock.now_ms());
        self.commit(move |c| outbox::mark_dead(c, id, attempts, &msg, now))
            .await;
        if let Ok(counts) = off_thread(&self.store, &mut None, outbox::counts).await {
            let dead = counts.get(&self.name).map_or(0, |c| c.1);
            self.metrics
                .outbox_dead_letters
                .with([&self.name])
                .set(dead as f64);
        }
    }

    /// Write and wait for the commit, so the next outbox read sees it.
    async fn commit<F>(&self, f: F)
    where
        F: FnOnce(&crate::store::db::Conn) -> crate::store::db::Result<()> + Send + 'static,
    {
        let r = match self.store.write(f).await {
            Ok(()) => self.store.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::error!(notifier = %self.name, error = %format!("{e:#}"), "cannot update the outbox");
            tokio::time::sleep(POLL).await;
        }
    }
}

/// `watchpost notify-test NOTIFIER`: send one event marked as a test.
pub async fn notify_test(config: &Config, name: &str) -> anyhow::Result<()> {
    let Some(n) = config.notifiers.iter().find(|n| n.name == name) else {
        let known: Vec<&str> = config.notifiers.iter().map(|n| n.name.as_str()).collect();
        anyhow::bail!(
            "unknown notifier {name:?} (configured: {})",
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        );
    };
    let spec = n.config.0.as_ref();
    let dest = spec.build().with_context(|| format!("notifier {name}"))?;
    let ctx = Ctx::new(name, spec, None, &config.agent.location)?;
    match dest.test(&ctx).await {
        Ok(what) => {
            println!("{name} ({}): {what}", spec.kind());
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "{name} ({}): test notification failed: {e}",
            spec.kind()
        )),
    }
}

/// The notifier names `component` sends to, checked against the configured notifiers.
pub fn component_notifiers<'a>(
    config: &'a Config,
    component: &str,
) -> Vec<&'a crate::config::Notifier> {
    let Some(c) = config
        .components
        .iter()
        .find(|c| c.name.get_ref() == component)
    else {
        return Vec::new();
    };
    c.notify
        .iter()
        .filter_map(|n| config.notifiers.iter().find(|x| &x.name == n.get_ref()))
        .collect()
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `url` is a usable http(s) URL; the message says why not.
pub(crate) fn check_http_url(url: &str) -> Result<(), String> {
    match url::Url::parse(url) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host_str().is_some() => {
            Ok(())
        }
        Ok(u) => Err(format!(
            "URL {url:?} must be http:// or https:// with a host (got scheme {:?})",
            u.scheme()
        )),
        Err(e) => Err(format!("invalid URL {url:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination whose delivery panics (a bug in a notifier).
    struct PanickingDestination;

    impl Destination for PanickingDestination {
        fn deliver<'a>(
            &'a self,
            _ctx: &'a Ctx,
            ev: &'a Event,
        ) -> BoxFuture<'a, Result<(), DeliveryError>> {
            Box::pin(async move { panic!("cannot format component {}", ev.component) })
        }
        fn test<'a>(&'a self, _ctx: &'a Ctx) -> BoxFuture<'a, Result<String, DeliveryError>> {
            Box::pin(async { Ok(String::new()) })
        }
    }

    #[tokio::test]
    async fn a_notifier_worker_that_dies_stops_the_dispatcher_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = Store::start(&dir.path().join("w.db")).unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        let ev = Event {
            kind: EventKind::Opened,
            component: "API".into(),
            status: Status::MajorOutage,
            previous: Status::Operational,
            incident_id: Some(1),
            opened_at: Some(now),
            at: now,
            flapping: false,
            cause: None,
            note: None,
            location: "here".into(),
            details: None,
            test: false,
            installation: None,
            rehearsal: None,
        };
        store
            .write(move |c| outbox::enqueue(c, "pager", &ev, now).map(|_| ()))
            .await
            .unwrap();
        let shared = Shared::default();
        let metrics = Metrics::new();
        let opts = DeliveryOptions::default();
        let worker = Worker {
            name: "pager".into(),
            dest: Arc::new(PanickingDestination),
            ctx: Ctx {
                notifier: "pager".into(),
                client: reqwest::Client::new(),
                limiter: Arc::new(RateLimiter::direct(Quota::per_second(NonZeroU32::MIN))),
                timeout: opts.timeout.0,
                store: Some(store.clone()),
                delivery_id: None,
                location: "here".into(),
                installation: None,
            },
            beat: shared.health.beat(
                "dispatcher",
                "notifier worker pager",
                Duration::from_secs(60),
            ),
            opts,
            store: store.clone(),
            metrics: metrics.clone(),
            clock: shared.clock,
            bell: shared.bell.clone(),
            claim_as: None,
        };
        let d = Dispatcher {
            workers: vec![worker],
            store: store.clone(),
            metrics,
            health: shared.health.clone(),
        };
        let (stop, force) = (CancellationToken::new(), CancellationToken::new());
        let r = tokio::time::timeout(Duration::from_secs(10), d.run(stop, force)).await;
        let err = match r {
            Ok(Err(e)) => format!("{e:#}"),
            other => panic!("expected the dispatcher to fail, got {other:?}"),
        };
        assert_eq!(
            err,
            "notifier worker pager panicked: cannot format component API"
        );
        drop(store);
        writer.join().await;
    }
}
