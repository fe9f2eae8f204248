//! Harness for the incident and notifier tests: writes a config (disabled probe files plus
//! a component and notifiers pointing at local recorders), starts the daemon's
//! [`Pipeline`] without its scheduler, and feeds synthetic runs (the evaluator is the unit
//! under test; probes are tested elsewhere).
//!
//! Virtual time: under `#[tokio::test(start_paused = true)]` the evaluator's and the
//! dispatcher's clocks follow tokio time, which then moves only when the test calls
//! `tokio::time::advance` (tokio does not auto-advance while a blocking task runs, and the
//! pipeline's writer supervision is one for its whole life). The waiting helpers here wait
//! in real time ([`settle`]), so real work (SQLite, sockets) proceeds while virtual time
//! stands still.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Once};
use std::time::Duration;

use watchpost::clock::Clock;
use watchpost::config::{self, Config};
use watchpost::metrics::Metrics;
use watchpost::pipeline::{Options, Pipeline, Shared};
use watchpost::probe::{ErrorInfo, Outcome, RunResult, SubCheck};
use watchpost::store::Store;

pub const PD_KEY: &str = "pd-routing-key-0123";
pub const INSTATUS_KEY: &str = "instatus-api-key-4567";
pub const HOOK_SECRET: &str = "hook-secret-89";
pub const SMTP_USER: &str = "mailer";
pub const SMTP_PASS: &str = "s3cret";

pub fn env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("WPT_PD_KEY", PD_KEY);
        std::env::set_var("WPT_INSTATUS_KEY", INSTATUS_KEY);
        std::env::set_var("WPT_HOOK_SECRET", HOOK_SECRET);
        std::env::set_var("WPT_SMTP_USER", SMTP_USER);
        std::env::set_var("WPT_SMTP_PASS", SMTP_PASS);
    });
}

/// Fast retries for tests.
pub const FAST: &str = r#"delivery = { retry_initial = "50ms", retry_max = "400ms", timeout = "2s", rate_limit = 50 }"#;

/// Where the notifiers point; `None` leaves a notifier out.
#[derive(Default, Clone)]
pub struct Targets {
    pub instatus: Option<String>,
    pub pagerduty: Option<String>,
    pub webhook: Option<String>,
    pub smtp: Option<String>,
    /// Extra lines in every notifier table (default: [`FAST`]).
    pub delivery: Option<String>,
}

pub const THRESHOLDS: &str = "failure_threshold = 2\nsuccess_threshold = 2\nrecovery = \"300ms\"";

/// The notifier tables for `t` and their names.
pub fn notifiers_toml(t: &Targets) -> (String, Vec<&'static str>) {
    let d = t.delivery.clone().unwrap_or_else(|| FAST.to_string());
    let mut s = String::new();
    let mut names = Vec::new();
    if let Some(u) = &t.instatus {
        names.push("statuspage");
        s += &format!(
            "[notifier.statuspage]\nkind = \"instatus\"\npage_id = \"page1\"\napi_key_env = \"WPT_INSTATUS_KEY\"\nbase_url = \"{u}\"\ncomponents = {{ \"API\" = \"comp-api\" }}\n{d}\n\n"
        );
    }
    if let Some(u) = &t.pagerduty {
        names.push("pager");
        s += &format!(
            "[notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"WPT_PD_KEY\"\nevents_url = \"{u}/v2/enqueue\"\nclient_url = \"http://dash.example/\"\n{d}\n\n"
        );
    }
    if let Some(u) = &t.webhook {
        names.push("mitigate");
        s += &format!("[notifier.mitigate]\nkind = \"webhook\"\nurl = \"{u}/hooks/watchpost\"\nsecret_env = \"WPT_HOOK_SECRET\"\n{d}\n\n");
    }
    if let Some(u) = &t.smtp {
        names.push("oncall");
        s += &format!(
            "[notifier.oncall]\nkind = \"email\"\nsmtp_url = \"{u}\"\nusername_env = \"WPT_SMTP_USER\"\npassword_env = \"WPT_SMTP_PASS\"\nfrom = \"watchpost <watchpost@example.com>\"\nto = [\"oncall@example.com\"]\n{d}\n\n"
        );
    }
    (s, names)
}

/// Write `watchpost.toml` (component "API" = probes `api` and `db`) into `dir` and load it.
/// `component` holds the threshold lines, `extra` anything else (e.g. maintenance).
pub fn write_config(dir: &Path, t: &Targets, component: &str, extra: &str) -> Arc<Config> {
    let (notifiers, names) = notifiers_toml(t);
    write_config_raw(dir, &names, &notifiers, component, extra)
}

/// Like [`write_config`] with hand-written notifier tables; `notify` names the ones the
/// component sends to.
pub fn write_config_raw(
    dir: &Path,
    notify: &[&str],
    notifiers: &str,
    component: &str,
    extra: &str,
) -> Arc<Config> {
    let path = write_config_file(dir, notify, notifiers, component, extra);
    match config::load(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test config invalid:\n{e}"),
    }
}

/// Write the files only (for tests of validation errors); returns the config path.
pub fn write_config_file(
    dir: &Path,
    notify: &[&str],
    notifiers: &str,
    component: &str,
    extra: &str,
) -> std::path::PathBuf {
    env();
    let probes = dir.join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    for name in ["api", "db"] {
        std::fs::write(
            probes.join(format!("{name}.toml")),
            // `api` has a latency budget far above the synthetic runs' 3 ms.
            format!(
                "name = \"{name}\"\nkind = \"http\"\nenabled = false\nurl = \"http://127.0.0.1:9/{name}\"\n{}",
                if name == "api" { "[budget]\ntotal = { p95 = \"100ms\" }\n" } else { "" }
            ),
        )
        .unwrap();
    }
    let notify: Vec<String> = notify.iter().map(|n| format!("\"{n}\"")).collect();
    let text = format!(
        "[agent]\nlocation = \"test-vantage\"\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n\
         [[component]]\nname = \"API\"\nprobes = [\"api\", \"db\"]\n{component}\nnotify = [{}]\n\n{extra}\n\n{notifiers}",
        notify.join(", ")
    );
    let path = dir.join("watchpost.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A run of `probe` with `outcome` (an error class and message when not up).
pub fn run(probe: &str, outcome: Outcome) -> RunResult {
    let error = match outcome {
        Outcome::Up => None,
        Outcome::Degraded => Some(ErrorInfo {
            class: watchpost::probe::ErrorClass::HttpStatus,
            message: "answered 207 (degraded)".into(),
        }),
        Outcome::Down => Some(ErrorInfo {
            class: watchpost::probe::ErrorClass::ConnectRefused,
            message: "connection refused by 127.0.0.1:9".into(),
        }),
    };
    RunResult {
        probe: probe.to_string(),
        kind: "http",
        started_at: chrono::Utc::now(),
        duration: Duration::from_millis(3),
        lag: None,
        outcome,
        error,
        phases: vec![("total".into(), Duration::from_millis(3))],
        details: serde_json::Map::new(),
        subchecks: Vec::<SubCheck>::new(),
    }
}

/// The daemon's pipeline without the scheduler (runs are fed by the test), with or without
/// the dispatcher: the same store, fan-out, evaluator and dispatcher `watchpost::run` starts.
pub struct Agent {
    pub config: Arc<Config>,
    pub store: Store,
    pub metrics: Metrics,
    pipeline: Pipeline,
}

impl Agent {
    /// Start with a clock that follows tokio time (the wall clock unless a test pauses it).
    pub async fn start(config: Arc<Config>, dispatcher: bool) -> Agent {
        let shared = Shared {
            clock: Clock::tokio(),
            ..Shared::default()
        };
        Agent::start_with(config, dispatcher, shared).await
    }

    /// Start with a given [`Shared`] (e.g. one whose clock was made under paused time).
    pub async fn start_with(config: Arc<Config>, dispatcher: bool, shared: Shared) -> Agent {
        Agent::start_opts(config, dispatcher, shared, None).await
    }

    /// Start serving the API on `listener` too (tokio clock, dispatcher on).
    pub async fn start_serving(config: Arc<Config>, listener: tokio::net::TcpListener) -> Agent {
        let shared = Shared {
            clock: Clock::tokio(),
            ..Shared::default()
        };
        Agent::start_opts(config, true, shared, Some(listener)).await
    }

    async fn start_opts(
        config: Arc<Config>,
        dispatcher: bool,
        shared: Shared,
        listener: Option<tokio::net::TcpListener>,
    ) -> Agent {
        let opts = Options {
            scheduler: false,
            dispatcher,
            listener,
        };
        let pipeline = Pipeline::start_with(config.clone(), opts, shared).unwrap();
        Agent {
            config,
            store: pipeline.store.clone(),
            metrics: pipeline.metrics.clone(),
            pipeline,
        }
    }

    /// Hand a run to the fan-out (stored, counted, evaluated), as the scheduler does; it
    /// starts now by the agent's clock.
    pub async fn send(&self, mut r: RunResult) {
        r.started_at = self.pipeline.shared.clock.now();
        self.pipeline.send(r).await.unwrap();
    }

    /// Send runs of both members.
    pub async fn both(&self, o: Outcome) {
        self.send(run("api", o)).await;
        self.send(run("db", o)).await;
    }

    /// A clean stop: evaluator drained, dispatcher stopped, writer flushed.
    pub async fn stop(self) {
        drop(self.store);
        self.pipeline.stop().await.unwrap();
    }

    /// A crash: tasks aborted where they are (nothing after the last commit happens).
    pub async fn kill(self) {
        drop(self.store);
        self.pipeline.kill().await;
    }

    pub fn incident_views(&self, open_only: bool) -> Vec<watchpost::incident::IncidentView> {
        let conn = self.store.reader().unwrap();
        watchpost::incident::list_incidents(&conn, open_only).unwrap()
    }

    pub fn incidents(&self, open_only: bool) -> Vec<serde_json::Value> {
        let conn = self.store.reader().unwrap();
        watchpost::incident::list_incidents(&conn, open_only)
            .unwrap()
            .into_iter()
            .map(|i| serde_json::to_value(i).unwrap())
            .collect()
    }

    /// The key other systems see for incident `id`: `watchpost/<installation>/API/<id>`.
    pub fn key(&self, id: i64) -> String {
        let conn = self.store.reader().unwrap();
        let inst = watchpost::store::Installation::read(&conn).unwrap();
        format!("watchpost/{}/API/{id}", inst.id)
    }

    /// Outbox rows: (notifier, kind, status, attempts).
    pub fn outbox(&self) -> Vec<(String, String, String, i64)> {
        let conn = self.store.reader().unwrap();
        let mut st = conn
            .prepare("SELECT notifier, kind, status, attempts FROM outbox ORDER BY id")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// Wait until no outbox row is pending.
    pub async fn drained(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.outbox().iter().all(|r| r.2 != "pending") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "outbox not drained: {:?}",
                self.outbox()
            );
            settle(Duration::from_millis(20)).await;
        }
    }
}

/// Wait until `f` is true (polling in real time), or panic with `what`.
pub async fn until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        settle(Duration::from_millis(20)).await;
    }
}

/// Let real work (the writer thread, sockets) run for `d` of real time; under paused tokio
/// time, virtual time does not move meanwhile.
pub async fn settle(d: Duration) {
    let _ = tokio::task::spawn_blocking(move || std::thread::sleep(d)).await;
}

/// Advance virtual time in `step`s, letting real work settle after each, until `f` holds.
pub async fn advance_until(what: &str, step: Duration, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::advance(step).await;
        settle(Duration::from_millis(10)).await;
    }
}
