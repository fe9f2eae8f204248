//! Probes: one scripted transaction each. The kinds are a closed set (an enum, one file per
//! kind); each kind parses its own config keys, validates them without the network, and runs
//! one attempt. What is common to every kind lives here: the [`RunResult`] shape, the outer
//! deadline, per-run budgets and quick confirmation retries.
//!
//! A failing probe is data, never an `Err`: every attempt ends in an [`Attempt`] with an
//! outcome, and, when not up, an error class and a sentence a human can act on.

pub mod assert;
pub mod class;
pub mod http;
pub mod listen;
pub mod stamp;
pub mod websocket;

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::chaos::fault::{Faults, Injection, Mode};
use crate::config::{duration::human, subcheck_budget_key, Errors, ProbeConfig, Rest, SpanError};
pub use class::ErrorClass;
use toml::Spanned;

/// The outcome of a run. Ordered by severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Up,
    Degraded,
    Down,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Up => "up",
            Outcome::Degraded => "degraded",
            Outcome::Down => "down",
        }
    }
    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "up" => Some(Outcome::Up),
            "degraded" => Some(Outcome::Degraded),
            "down" => Some(Outcome::Down),
            _ => None,
        }
    }
    /// The outcome a known health word (`ok`, `degraded`, `fail`, …) means; `None` for any
    /// other word (a call-spawn route's `"active"`, a job's `"queued"`), which must not decide.
    pub fn from_known_health_word(s: &str) -> Option<Outcome> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ok" | "up" | "healthy" | "pass" | "passed" | "green" | "operational" => {
                Some(Outcome::Up)
            }
            "degraded" | "warn" | "warning" | "yellow" => Some(Outcome::Degraded),
            "down" | "fail" | "failed" | "failing" | "failure" | "error" | "unhealthy"
            | "critical" | "red" => Some(Outcome::Down),
            _ => None,
        }
    }
    /// A sub-check's health word: unknown words are down (a named check that says nothing
    /// we understand is not a passing check).
    pub fn from_health_word(s: &str) -> Outcome {
        Outcome::from_known_health_word(s).unwrap_or(Outcome::Down)
    }
}

/// Why a run is not up: a stable snake_case class and a human sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorInfo {
    pub class: ErrorClass,
    pub message: String,
}

/// A named part of a health response body, recorded as its own series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubCheck {
    /// Series name: `<probe>/<path>.<name>`.
    pub series: String,
    pub outcome: Outcome,
    #[serde(serialize_with = "ser_opt_ms")]
    pub latency: Option<Duration>,
    pub error: Option<ErrorInfo>,
}

/// A cap on distinct sub-check series: series already known always pass, new ones only
/// while under the cap (and when `fits` accepts them). The watched service does not decide
/// how many series, rows and metrics we keep. Used per probe and per agent.
#[derive(Debug, Default)]
pub struct SeriesBudget {
    known: std::collections::HashSet<String>,
    cap: usize,
}

impl SeriesBudget {
    pub fn new(cap: usize) -> Self {
        SeriesBudget {
            known: Default::default(),
            cap,
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Keep the sub-checks that are known or may become known; returns how many were dropped.
    pub fn admit(
        &mut self,
        subchecks: &mut Vec<SubCheck>,
        fits: impl Fn(&SubCheck) -> bool,
    ) -> usize {
        let before = subchecks.len();
        let (known, cap) = (&mut self.known, self.cap);
        subchecks.retain(|sc| {
            known.contains(&sc.series)
                || (known.len() < cap && fits(sc) && known.insert(sc.series.clone()))
        });
        before - subchecks.len()
    }
}

/// What one attempt of a probe found. Probe kinds build these.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub outcome: Outcome,
    pub error: Option<ErrorInfo>,
    /// Timed phases, in the order they happened.
    pub phases: Vec<(String, Duration)>,
    pub details: Map<String, Value>,
    pub subchecks: Vec<SubCheck>,
}

impl Default for Attempt {
    fn default() -> Self {
        Attempt::new()
    }
}

impl Attempt {
    pub fn new() -> Self {
        Attempt {
            outcome: Outcome::Up,
            error: None,
            phases: Vec::new(),
            details: Map::new(),
            subchecks: Vec::new(),
        }
    }
    /// Set the outcome to down with a class and sentence (keeps phases and details).
    pub fn down(&mut self, class: ErrorClass, message: impl Into<String>) -> &mut Self {
        self.set(Outcome::Down, class, message)
    }
    /// Mark degraded unless already worse.
    pub fn degrade(&mut self, class: ErrorClass, message: impl Into<String>) -> &mut Self {
        if self.outcome == Outcome::Up {
            self.set(Outcome::Degraded, class, message);
        }
        self
    }
    fn set(
        &mut self,
        outcome: Outcome,
        class: ErrorClass,
        message: impl Into<String>,
    ) -> &mut Self {
        self.outcome = outcome;
        self.error = Some(ErrorInfo {
            class,
            message: message.into(),
        });
        self
    }
    pub fn phase(&mut self, name: &str, d: Duration) -> &mut Self {
        self.phases.retain(|(n, _)| n != name);
        self.phases.push((name.to_string(), d));
        self
    }
    pub fn detail(&mut self, key: &str, v: impl Into<Value>) -> &mut Self {
        self.details.insert(key.to_string(), v.into());
        self
    }
    pub fn is_up(&self) -> bool {
        self.outcome == Outcome::Up
    }
}

/// One run of a probe, as stored and printed.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub probe: String,
    pub kind: &'static str,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    /// Actual start minus planned start, for scheduled runs.
    pub lag: Option<Duration>,
    pub outcome: Outcome,
    pub error: Option<ErrorInfo>,
    pub phases: Vec<(String, Duration)>,
    pub details: Map<String, Value>,
    pub subchecks: Vec<SubCheck>,
}

/// What a detail of an up run says, for the store, which keeps an up run's details only when
/// they say something new (a run that is not up keeps them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpDetail {
    /// Part of the probe's state (a status, a transcript): stored when it changes.
    State,
    /// Changes on every run and says nothing new (a request id): not stored.
    Routine,
    /// A routine figure past a notable threshold (a listen run's send lateness): stored with
    /// this run, not compared with the next.
    Notable,
}

/// What detail `key` of an up run of `kind` says (see [`listen::up_detail`]).
pub fn up_detail(kind: &str, key: &str, details: &Map<String, Value>) -> UpDetail {
    match kind {
        "listen" => listen::up_detail(key, details),
        _ => UpDetail::State,
    }
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn ser_opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(ms(*d)),
        None => s.serialize_none(),
    }
}

impl RunResult {
    /// The `check --json` line shape (see DESIGN.md).
    pub fn to_json(&self) -> Value {
        let phases: Map<String, Value> = self
            .phases
            .iter()
            .map(|(n, d)| (n.clone(), json!(ms(*d))))
            .collect();
        let mut details = self.details.clone();
        if !self.subchecks.is_empty() {
            let subs: Map<String, Value> = self
                .subchecks
                .iter()
                .map(|s| {
                    (
                        s.series.clone(),
                        serde_json::to_value(s).unwrap_or(Value::Null),
                    )
                })
                .collect();
            details.insert("subchecks".into(), Value::Object(subs));
        }
        json!({
            "probe": self.probe,
            "kind": self.kind,
            "outcome": self.outcome,
            "started_at": self.started_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "duration_ms": ms(self.duration),
            "phases": phases,
            "error": self.error,
            "details": details,
        })
    }

    /// One human line: `api-health  up  ttfb 12ms · total 14ms`.
    pub fn summary(&self) -> String {
        let phases: Vec<String> = self
            .phases
            .iter()
            .map(|(n, d)| format!("{n} {}", human_ms(*d)))
            .collect();
        let mut s = format!(
            "{:<24} {:<8} {}",
            self.probe,
            self.outcome.as_str(),
            phases.join(" · ")
        );
        if let Some(e) = &self.error {
            s.push_str(&format!("  [{}] {}", e.class, e.message));
        }
        for sc in &self.subchecks {
            s.push_str(&format!("\n  {:<22} {:<8}", sc.series, sc.outcome.as_str()));
            if let Some(l) = sc.latency {
                s.push_str(&format!(" {}", human_ms(l)));
            }
            if let Some(e) = &sc.error {
                s.push_str(&format!("  {}", e.message));
            }
        }
        s
    }
}

/// Latency for people: `850µs`, `12ms`, `1.24s`.
pub fn human_ms(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1000 {
        format!("{us}µs")
    } else if us < 10_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else if us < 1_000_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

/// The probe kinds with the JSON Schema of each kind's own keys (`watchpost schema probe`):
/// the structs `ProbeSpec::from_kind` deserializes.
pub const KIND_SCHEMAS: &[(&str, crate::config::schema::SchemaFn)] = &[
    ("http", http::schema),
    ("websocket", websocket::schema),
    ("listen", listen::config::schema),
];

/// Each `[budget]` key must name one of `phases` (the phases a `kind` probe times) or, with
/// `subchecks`, one of its sub-checks (`"<subchecks>.<name>"`).
pub fn check_budget(
    kind: &str,
    phases: &[String],
    subchecks: Option<&str>,
    keys: &[Spanned<String>],
    errs: &mut Errors,
) {
    for key in keys {
        let k = key.get_ref();
        if phases.iter().any(|p| p == k) || subcheck_budget_key(subchecks, k).is_some() {
            continue;
        }
        let (or_sub, subs) = match subchecks {
            Some(path) => (
                " or one of its sub-checks",
                format!(", or a sub-check as \"{path}.<name>\""),
            ),
            None => ("", String::new()),
        };
        errs.push(SpanError::at(
            key.span(),
            format!(
                "[budget] {k:?} is not a phase of a {kind} probe{or_sub} (expected one of: {}{subs})",
                phases.join(", ")
            ),
        ));
    }
}

/// Kind-specific validated configuration.
#[derive(Debug, Clone)]
pub enum ProbeSpec {
    Http(http::HttpSpec),
    WebSocket(websocket::WsSpec),
    Listen(listen::ListenSpec),
}

impl ProbeSpec {
    /// Parse and validate the kind-specific keys of a probe file (no network), and the
    /// `[budget]` keys against the kind's phases; every problem found, not just the first.
    pub fn from_kind(
        kind: &str,
        kind_span: Range<usize>,
        rest: Rest<'_>,
        dir: &Path,
        budget: &[Spanned<String>],
    ) -> Result<Self, Errors> {
        match kind {
            "http" => http::HttpSpec::from_config(rest, dir, budget).map(ProbeSpec::Http),
            "websocket" => {
                websocket::WsSpec::from_config(rest, dir, budget).map(ProbeSpec::WebSocket)
            }
            "listen" => listen::ListenSpec::from_config(rest, dir, budget).map(ProbeSpec::Listen),
            other => Err(SpanError::at(
                kind_span,
                format!("unknown probe kind {other:?} (expected http, websocket, listen)"),
            )
            .into()),
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeSpec::Http(_) => "http",
            ProbeSpec::WebSocket(_) => "websocket",
            ProbeSpec::Listen(_) => "listen",
        }
    }
    /// The phases a run of this probe can time, in the order they happen: the only names a
    /// `[budget]` key may use.
    pub fn phases(&self) -> Vec<String> {
        let fixed = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        match self {
            ProbeSpec::Http(_) => fixed(&http::PHASES),
            ProbeSpec::WebSocket(s) => websocket::phases(s.steps.iter().map(|st| st.name.clone())),
            ProbeSpec::Listen(_) => fixed(&listen::PHASES),
        }
    }
    /// The `subchecks` path of an HTTP probe: `[budget]` keys `<path>.<name>` budget its
    /// sub-check series.
    pub fn subcheck_path(&self) -> Option<&str> {
        match self {
            ProbeSpec::Http(s) => s.subchecks.as_deref(),
            _ => None,
        }
    }
    /// A kind may want a longer default attempt deadline than `[defaults].timeout`.
    pub fn default_timeout(&self) -> Option<Duration> {
        match self {
            ProbeSpec::Listen(s) => Some(s.default_timeout()),
            _ => None,
        }
    }
    /// The URL the probe talks to.
    pub fn url(&self) -> &str {
        match self {
            ProbeSpec::Http(s) => s.url(),
            ProbeSpec::WebSocket(s) => s.url(),
            ProbeSpec::Listen(s) => s.url(),
        }
    }
    /// Host the probe talks to, for the per-host rate limit.
    pub fn host(&self) -> Option<String> {
        url::Url::parse(self.url())
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
    }
}

/// A probe ready to run (clients built, audio loaded).
pub enum Probe {
    Http(http::HttpProbe),
    WebSocket(websocket::WsProbe),
    Listen(listen::ListenProbe),
}

impl Probe {
    /// Build with a client cache of its own (one-off uses such as tests).
    pub fn build(cfg: &ProbeConfig) -> anyhow::Result<Probe> {
        Probe::build_with(cfg, &http::Clients::default())
    }

    /// Build, sharing HTTP clients through `clients`.
    pub fn build_with(cfg: &ProbeConfig, clients: &http::Clients) -> anyhow::Result<Probe> {
        Ok(match &cfg.spec {
            ProbeSpec::Http(s) => Probe::Http(http::HttpProbe::new(cfg, s, clients)?),
            ProbeSpec::WebSocket(s) => Probe::WebSocket(websocket::WsProbe::new(cfg, s)?),
            ProbeSpec::Listen(s) => Probe::Listen(listen::ListenProbe::new(cfg, s)?),
        })
    }

    async fn attempt(&self, fault: Option<&Injection>) -> Attempt {
        match self {
            Probe::Http(p) => p.run_with(fault).await,
            Probe::WebSocket(p) => p.run_with(fault).await,
            Probe::Listen(p) => p.run_with(fault).await,
        }
    }
}

/// Run one attempt under the probe's deadline and judge per-run budgets.
pub async fn attempt_once(probe: &Probe, cfg: &ProbeConfig) -> (Attempt, DateTime<Utc>, Duration) {
    attempt_once_with(probe, cfg, None).await
}

/// [`attempt_once`] under a rehearsal's fault, if any: `down` fails the run without touching
/// the network; every other mode is met by the kind's own code (see [`Injection`]). A
/// faulted run says so in its details (`rehearsal_fault`).
pub async fn attempt_once_with(
    probe: &Probe,
    cfg: &ProbeConfig,
    fault: Option<&Injection>,
) -> (Attempt, DateTime<Utc>, Duration) {
    let started_at = Utc::now();
    let t0 = Instant::now();
    if let Some(f) = fault.filter(|f| f.mode == Mode::Down) {
        let mut a = Attempt::new();
        a.down(
            ErrorClass::Unreachable,
            "cannot connect: rehearsal fault `down` (the network was not touched)",
        );
        a.detail("rehearsal_fault", f.mode.name());
        return (a, started_at, t0.elapsed());
    }
    // Kinds keep their own, phase-aware deadlines; this outer one is the guarantee that
    // nothing hangs. A little slack lets the kind's own message win when both fire.
    let outer = cfg.timeout + Duration::from_millis(250);
    let mut a = match tokio::time::timeout(outer, probe.attempt(fault)).await {
        Ok(a) => a,
        Err(_) => {
            let mut a = Attempt::new();
            a.down(
                ErrorClass::Timeout,
                format!(
                    "no complete answer within the {} timeout",
                    human(cfg.timeout)
                ),
            );
            a
        }
    };
    let elapsed = t0.elapsed();
    apply_run_budgets(&mut a, cfg);
    if let Some(f) = fault {
        a.detail("rehearsal_fault", f.mode.name());
    }
    (a, started_at, elapsed)
}

/// A phase over its `budget.<phase>.run` makes an otherwise good run degraded.
pub fn apply_run_budgets(a: &mut Attempt, cfg: &ProbeConfig) {
    if a.outcome != Outcome::Up {
        return;
    }
    for (phase, d) in &a.phases {
        if let Some(limit) = cfg.budget.get(phase).and_then(|b| b.run) {
            if *d > limit.0 {
                let msg = format!(
                    "{phase} took {} (run budget {})",
                    human_ms(*d),
                    human(limit.0)
                );
                a.degrade(ErrorClass::Budget, msg);
                return;
            }
        }
    }
}

/// Run a probe with its quick confirmation retries: a down attempt is retried up to
/// `retries` times, `retry_delay` apart, and only the last attempt decides the outcome.
pub async fn run_confirmed(probe: &Probe, cfg: &ProbeConfig) -> RunResult {
    run_confirmed_gated(probe, cfg, || async {}).await
}

/// [`run_confirmed`] where every attempt first passes `gate` (the scheduler's concurrency
/// cap and per-host rate limit) and holds what it returns only while it runs: a retry
/// waiting out `retry_delay` holds no permit.
pub async fn run_confirmed_gated<G, Fut, P>(probe: &Probe, cfg: &ProbeConfig, gate: G) -> RunResult
where
    G: FnMut() -> Fut,
    Fut: std::future::Future<Output = P>,
{
    run_confirmed_faulted(probe, cfg, None, gate).await
}

/// [`run_confirmed_gated`] where each attempt first looks up the probe's active rehearsal
/// fault in `faults` (a fault that starts or ends between attempts is seen by the next one).
pub async fn run_confirmed_faulted<G, Fut, P>(
    probe: &Probe,
    cfg: &ProbeConfig,
    faults: Option<&Faults>,
    mut gate: G,
) -> RunResult
where
    G: FnMut() -> Fut,
    Fut: std::future::Future<Output = P>,
{
    let mut attempts_log = Vec::new();
    let mut first_start = None;
    let mut tries = 0;
    loop {
        let permit = gate().await;
        let fault = faults.and_then(|f| f.get(&cfg.name));
        let (a, started_at, elapsed) = attempt_once_with(probe, cfg, fault.as_deref()).await;
        drop(permit);
        first_start.get_or_insert(started_at);
        tries += 1;
        attempts_log.push(json!({
            "outcome": a.outcome,
            "class": a.error.as_ref().map(|e| e.class),
            "duration_ms": ms(elapsed),
        }));
        if a.outcome == Outcome::Down && tries <= cfg.retries {
            tokio::time::sleep(cfg.retry_delay).await;
            continue;
        }
        let mut details = a.details;
        if attempts_log.len() > 1 {
            details.insert("attempts".into(), Value::Array(attempts_log));
        }
        return RunResult {
            probe: cfg.name.clone(),
            kind: cfg.kind(),
            started_at: first_start.unwrap_or(started_at),
            duration: elapsed,
            lag: None,
            outcome: a.outcome,
            error: a.error,
            phases: a.phases,
            details,
            subchecks: a.subchecks,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_words() {
        for (w, o) in [
            ("ok", Outcome::Up),
            ("UP", Outcome::Up),
            ("healthy", Outcome::Up),
            ("pass", Outcome::Up),
            ("degraded", Outcome::Degraded),
            ("warn", Outcome::Degraded),
            ("warning", Outcome::Degraded),
            ("down", Outcome::Down),
            ("fail", Outcome::Down),
            ("error", Outcome::Down),
            ("unhealthy", Outcome::Down),
            ("critical", Outcome::Down),
            ("banana", Outcome::Down),
        ] {
            assert_eq!(Outcome::from_health_word(w), o, "{w}");
        }
        for w in ["active", "banana", "", "queued"] {
            assert_eq!(Outcome::from_known_health_word(w), None, "{w}");
        }
    }

    #[test]
    fn human_ms_table() {
        assert_eq!(human_ms(Duration::from_micros(850)), "850µs");
        assert_eq!(human_ms(Duration::from_micros(2500)), "2.5ms");
        assert_eq!(human_ms(Duration::from_millis(120)), "120ms");
        assert_eq!(human_ms(Duration::from_millis(1240)), "1.24s");
    }
}
