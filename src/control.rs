//! The control seam: what the mutating API routes (and later the inbound alerts and
//! rehearsals) ask of a running agent. [`Control`] is the one handle they get; it reaches
//! the scheduler (pause, resume, run now) and the incident evaluator ([`Command`]s with a
//! reply channel: maintenance windows, manual resolve). State it changes is persisted
//! through the store's writer ([`MIGRATION`]), so it survives a restart.
//!
//! Not here: HTTP and authentication (see `api`), the rules of components (see `incident`).

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::store::db::{self, params, Conn};
use anyhow::Context as _;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::Shared;
use crate::probe::{run_confirmed_faulted, Probe, RunResult};
use crate::schedule::{guard_run, Gate};
use crate::store::Store;

/// Schema of what the control API changes (migration 4 in `crate::store::MIGRATIONS`;
/// idempotent, so a database whose version was wound back re-applies it harmlessly):
/// paused probes, and maintenance windows started on demand (`ends_at` is moved to the end
/// time when one is ended early).
pub const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS paused_probes (
    probe TEXT PRIMARY KEY,
    at INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS maintenance_windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    component TEXT NOT NULL,
    starts_at INTEGER NOT NULL,
    ends_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    ended_early INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS maintenance_windows_end ON maintenance_windows(ends_at);
";

/// Longest maintenance window the API starts (the same bound as a configured one).
pub const MAX_MAINTENANCE: Duration = Duration::from_secs(7 * 86400);

/// The probes that are paused: not scheduled until resumed. Shared by the scheduler (which
/// checks it at every planned start) and the API; persisted in `paused_probes`.
#[derive(Clone, Default)]
pub struct Paused(Arc<RwLock<BTreeSet<String>>>);

impl Paused {
    pub fn contains(&self, probe: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(probe)
    }

    /// The paused probes, sorted.
    pub fn names(&self) -> Vec<String> {
        let set = self.0.read().unwrap_or_else(|p| p.into_inner());
        set.iter().cloned().collect()
    }

    /// Set or clear a probe's pause; whether that changed anything.
    fn set(&self, probe: &str, paused: bool) -> bool {
        let mut set = self.0.write().unwrap_or_else(|p| p.into_inner());
        if paused {
            set.insert(probe.to_string())
        } else {
            set.remove(probe)
        }
    }

    /// Read the persisted pauses (replacing what is in memory).
    pub fn load(&self, conn: &Conn) -> db::Result<()> {
        let mut st = conn.prepare("SELECT probe FROM paused_probes")?;
        let names = st
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<db::Result<BTreeSet<String>>>()?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = names;
        Ok(())
    }
}

/// A maintenance window started through the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    pub id: i64,
    pub component: String,
    /// Milliseconds since the epoch.
    pub starts_at: i64,
    pub ends_at: i64,
    pub reason: String,
}

impl Window {
    pub fn active(&self, now_ms: i64) -> bool {
        self.starts_at <= now_ms && now_ms < self.ends_at
    }

    /// The JSON the API answers with (times in RFC 3339).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "component": self.component,
            "starts_at": crate::notify::event::iso(self.starts_at),
            "ends_at": crate::notify::event::iso(self.ends_at),
            "reason": self.reason,
        })
    }
}

/// Windows still running or yet to come at `now_ms`, oldest first.
pub fn load_windows(conn: &Conn, now_ms: i64) -> db::Result<Vec<Window>> {
    let mut st = conn.prepare(
        "SELECT id, component, starts_at, ends_at, reason FROM maintenance_windows
         WHERE ends_at > ?1 ORDER BY id",
    )?;
    let rows = st.query_map([now_ms], |r| {
        Ok(Window {
            id: r.get(0)?,
            component: r.get(1)?,
            starts_at: r.get(2)?,
            ends_at: r.get(3)?,
            reason: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Why a command was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No such probe, component, window or open incident (→ 404).
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but cannot be done (→ 400).
    #[error("{0}")]
    Invalid(String),
    /// It conflicts with what the agent is doing (a rehearsal already running → 409).
    #[error("{0}")]
    Conflict(String),
    /// The agent is stopping, or the part that does it has stopped (→ 503).
    #[error("{0}")]
    Unavailable(String),
    /// Storing it failed (→ 500).
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

/// Who asked and why, for the log and the timeline.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The client's address (or `cli`, `alertmanager`…).
    pub who: String,
    pub reason: String,
}

/// A non-run input of the incident evaluator, answered on `reply` once it is stored.
#[derive(Debug)]
pub enum Command {
    /// Start a maintenance window on `component` now, for `duration`.
    StartMaintenance {
        component: String,
        duration: Duration,
        origin: Origin,
        reply: oneshot::Sender<Result<Window, CommandError>>,
    },
    /// End a running window now.
    EndMaintenance {
        id: i64,
        origin: Origin,
        reply: oneshot::Sender<Result<Window, CommandError>>,
    },
    /// Resolve an open incident by hand; notifications go out as for an automatic resolve.
    Resolve {
        incident: i64,
        origin: Origin,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Apply a payload of inbound alerts (`POST /api/v1/alerts/…`); the report says what
    /// became of them once their state (and any transition with its outbox rows) is stored.
    Alerts {
        alerts: Vec<crate::incident::Alert>,
        reply: oneshot::Sender<Result<crate::incident::AlertReport, CommandError>>,
    },
}

impl Command {
    /// Answer the command with `e` without doing it (e.g. on a fleet agent that does not
    /// lead).
    pub fn refuse(self, e: CommandError) {
        match self {
            Command::StartMaintenance { reply, .. } | Command::EndMaintenance { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Command::Resolve { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Command::Alerts { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// The handle the API holds on a running agent.
#[derive(Clone)]
pub struct Control {
    config: Arc<Config>,
    store: Store,
    metrics: Metrics,
    shared: Shared,
    gate: Gate,
    /// The fan-out's input; weak so that an API connection never keeps the pipeline from
    /// draining at shutdown.
    runs: mpsc::WeakSender<RunResult>,
    commands: mpsc::Sender<Command>,
    rehearsals: crate::chaos::live::Rehearsals,
}

impl Control {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        metrics: Metrics,
        shared: Shared,
        gate: Gate,
        runs: mpsc::WeakSender<RunResult>,
        commands: mpsc::Sender<Command>,
    ) -> Control {
        let rehearsals = crate::chaos::live::Rehearsals::new(
            crate::chaos::run::Agent {
                config: config.clone(),
                store: store.clone(),
                faults: shared.faults.clone(),
                clock: shared.clock,
            },
            shared.drill.clone(),
        );
        Control {
            config,
            store,
            metrics,
            shared,
            gate,
            runs,
            commands,
            rehearsals,
        }
    }

    /// Rehearsals on this agent (`POST /api/v1/rehearsals`).
    pub fn rehearsals(&self) -> &crate::chaos::live::Rehearsals {
        &self.rehearsals
    }

    pub fn paused(&self) -> &Paused {
        &self.shared.paused
    }

    fn known_probe(&self, name: &str) -> Result<&crate::config::ProbeConfig, CommandError> {
        self.config
            .probe(name)
            .ok_or_else(|| CommandError::NotFound(format!("no probe named {name:?}")))
    }

    /// Pause (`true`) or resume a probe: stored first, then applied. Whether it changed.
    pub async fn set_paused(
        &self,
        probe: &str,
        paused: bool,
        origin: &Origin,
    ) -> Result<bool, CommandError> {
        self.known_probe(probe)?;
        let (name, reason, now) = (
            probe.to_string(),
            crate::notify::event::truncate(origin.reason.trim(), 500),
            self.shared.clock.now_ms(),
        );
        self.store
            .write(move |c| {
                if paused {
                    c.execute(
                        "INSERT INTO paused_probes (probe, at, reason) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                        params![name, now, reason],
                    )
                } else {
                    c.execute("DELETE FROM paused_probes WHERE probe = ?1", [name])
                }
            })
            .await
            .map_err(CommandError::Internal)?;
        let changed = self.shared.paused.set(probe, paused);
        export_paused(&self.metrics, probe, paused);
        tracing::info!(
            probe,
            what = if paused { "pause" } else { "resume" },
            changed,
            who = %origin.who,
            reason = %origin.reason,
            "probe schedule changed by the API"
        );
        Ok(changed)
    }

    /// Run a probe now (paused or not), through the scheduler's concurrency cap and per-host
    /// limit, once its run in flight (if any) has ended; the run is stored and evaluated like
    /// a scheduled one, and returned.
    pub async fn run_now(&self, probe: &str, origin: &Origin) -> Result<RunResult, CommandError> {
        let cfg = self.known_probe(probe)?;
        tracing::info!(probe, what = "run now", who = %origin.who, "probe run requested by the API");
        self.execute(cfg, None).await
    }

    /// Run a probe now because location `asked_by` saw it go bad (fleet mode,
    /// `crate::fleet::confirmations`): as [`Control::run_now`], and as the scheduler runs it
    /// (an active rehearsal fault applies), with the run marked
    /// `details.confirmation_for = asked_by`.
    pub async fn confirm(&self, probe: &str, asked_by: &str) -> Result<RunResult, CommandError> {
        let cfg = self.known_probe(probe)?;
        if !cfg.enabled {
            return Err(CommandError::Invalid(format!("probe {probe} is disabled")));
        }
        tracing::info!(
            probe,
            asked_by,
            "confirmation run asked for by another location"
        );
        self.execute(cfg, Some(asked_by)).await
    }

    /// One run of `cfg` through the gate, sent to the fan-out; a confirmation run for
    /// location `confirmation_for` sees rehearsal faults and is marked.
    async fn execute(
        &self,
        cfg: &crate::config::ProbeConfig,
        confirmation_for: Option<&str>,
    ) -> Result<RunResult, CommandError> {
        let built = Probe::build_with(cfg, &self.shared.http)
            .context("building the probe")
            .map_err(CommandError::Internal)?;
        // A run of the probe in flight (scheduled, or asked for) ends first: never two at once.
        let _busy = self.shared.busy.of(&cfg.name).lock_owned().await;
        let host = cfg.spec.host().unwrap_or_default();
        let (gate, host) = (&self.gate, &host);
        let health = &self.shared.health;
        let faults = confirmation_for.map(|_| &self.shared.faults);
        let mut r = guard_run(&cfg.name, cfg.kind(), &self.metrics, health, async {
            run_confirmed_faulted(
                &built,
                cfg,
                faults,
                move || async move { gate.pass(host).await },
            )
            .await
        })
        .await;
        if let Some(location) = confirmation_for {
            r.details
                .insert(crate::fleet::CONFIRMATION.into(), location.into());
        }
        let Some(tx) = self.runs.upgrade() else {
            return Err(CommandError::Unavailable(
                "the agent is shutting down; the run was not recorded".into(),
            ));
        };
        tx.send(r.clone()).await.map_err(|_| {
            CommandError::Unavailable("the agent is shutting down; the run was not recorded".into())
        })?;
        Ok(r)
    }

    /// Send a command to the evaluator and wait for its answer.
    pub async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, CommandError>>) -> Command,
    ) -> Result<T, CommandError> {
        let gone = || CommandError::Unavailable("the incident evaluator has stopped".into());
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// How long an inbound alert payload may wait for the evaluator (queue and work) before the
/// sender is told to retry.
pub const ALERTS_WAIT: Duration = Duration::from_secs(10);

impl Control {
    /// Hand inbound alerts to the evaluator and wait (at most [`ALERTS_WAIT`]) for its report.
    pub async fn alerts(
        &self,
        alerts: Vec<crate::incident::Alert>,
    ) -> Result<crate::incident::AlertReport, CommandError> {
        let asked = self.command(|reply| Command::Alerts { alerts, reply });
        tokio::time::timeout(ALERTS_WAIT, asked)
            .await
            .map_err(|_| {
                CommandError::Unavailable(format!(
                    "the incident evaluator did not answer within {}s; retry later",
                    ALERTS_WAIT.as_secs()
                ))
            })?
    }
}

/// `watchpost_probe_paused{probe}`: 1 while paused.
pub fn export_paused(metrics: &Metrics, probe: &str, paused: bool) {
    metrics
        .probe_paused
        .with([probe])
        .set(if paused { 1.0 } else { 0.0 });
}

/// How long the CLI waits for the agent's answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest answer the CLI reads from the agent.
const MAX_ANSWER: usize = 1 << 20;

/// The agent's API base URL for CLI commands: `agent` when given, else `[agent].listen`
/// (an unspecified address such as `0.0.0.0` means this host's loopback).
pub fn agent_url(config: &Config, agent: Option<&str>) -> anyhow::Result<String> {
    if let Some(a) = agent {
        let a = a.trim_end_matches('/');
        return Ok(if a.contains("://") {
            a.to_string()
        } else {
            format!("http://{a}")
        });
    }
    let Some(listen) = &config.agent.listen else {
        anyhow::bail!("[agent] listen is off in the config: pass --agent URL");
    };
    let addr: std::net::SocketAddr = listen.parse().with_context(|| {
        format!("[agent] listen {listen:?} is not an address: pass --agent URL")
    })?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    Ok(format!(
        "http://{}",
        std::net::SocketAddr::new(ip, addr.port())
    ))
}

/// Why a CLI call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached or did not answer in time.
    #[error("cannot reach the agent at {url}: {msg}")]
    Unreachable { url: String, msg: String },
    /// The agent answered with an error status.
    #[error("the agent refused ({status}): {msg}")]
    Refused { status: u16, msg: String },
}

/// One call of the agent's API with the configured bearer token (if any): the JSON answer
/// of a 2xx, or why not. The token never appears in an error.
pub async fn call(
    base: &str,
    token: Option<&crate::config::Secret>,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let url = format!("{base}{path}");
    let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable {
        url: crate::redact::redact_url(&url),
        msg: e.to_string(),
    };
    let client = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .map_err(|e| unreachable(&e.without_url()))?;
    let mut req = client.request(method, &url);
    if let Some(t) = token {
        req = req.bearer_auth(t.expose());
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| unreachable(&e.without_url()))?;
    let status = resp.status();
    let mut bytes = Vec::new();
    let mut resp = resp;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| unreachable(&e.without_url()))?
    {
        if bytes.len() + chunk.len() > MAX_ANSWER {
            return Err(unreachable(&"answer over 1 MiB"));
        }
        bytes.extend_from_slice(&chunk);
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::json!({"error": crate::notify::event::truncate(&String::from_utf8_lossy(&bytes), 300)})
    });
    if status.is_success() {
        return Ok(v);
    }
    let msg = v
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or("no reason given")
        .to_string();
    Err(ClientError::Refused {
        status: status.as_u16(),
        msg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str) -> Config {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = dir.path().join("watchpost.toml");
        std::fs::write(
            &main,
            format!("[agent]\ndata_dir = \"data\"\nprobes = []\nlisten = \"{listen}\"\n"),
        )
        .expect("write config");
        match crate::config::load(&main) {
            Ok(c) => c,
            Err(e) => panic!("config: {e}"),
        }
    }

    #[test]
    fn the_cli_finds_the_agent_from_listen_or_agent() {
        let cases = [
            ("127.0.0.1:9464", None, Ok("http://127.0.0.1:9464")),
            ("0.0.0.0:9464", None, Ok("http://127.0.0.1:9464")),
            ("[::]:9464", None, Ok("http://[::1]:9464")),
            ("[::1]:80", None, Ok("http://[::1]:80")),
            ("", None, Err("pass --agent")),
            ("", Some("10.0.0.5:9464"), Ok("http://10.0.0.5:9464")),
            (
                "127.0.0.1:1",
                Some("https://agent.example/"),
                Ok("https://agent.example"),
            ),
        ];
        for (listen, agent, want) in cases {
            let got = agent_url(&config(listen), agent).map_err(|e| e.to_string());
            match want {
                Ok(url) => assert_eq!(got.as_deref(), Ok(url), "{listen} {agent:?}"),
                Err(msg) => assert!(
                    got.as_ref().is_err_and(|e| e.contains(msg)),
                    "{listen} {agent:?}: {got:?}"
                ),
            }
        }
    }
}
