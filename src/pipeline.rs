//! The pipeline: one place that builds and supervises everything the daemon runs — the
//! store writer, the scheduler, the fan-out (store + metrics + evaluator), the incident
//! evaluator, the notifier dispatcher, store maintenance and the HTTP API. [`crate::run`],
//! the integration tests and the benchmarks all start it the same way.
//!
//! Supervision: every task is kept by name. One that panics, fails or returns before
//! shutdown is a fault: it is logged with its name, `/health` fails for it, and the daemon
//! stops with an error naming it (a non-zero exit). Shutdown has one deadline
//! (`[agent] shutdown_grace`) for everything: in-flight runs, evaluation and a notification
//! delivery in flight; what is still going then is cut (a cut delivery stays pending).
//!
//! Not here: what any part does (see `schedule`, `incident`, `notify`, `store`, `api`).

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::control::{self, Command, Control, Paused};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::notify::outbox::Bell;
use crate::probe::{self, RunResult};
use crate::schedule::Gate;
use crate::store::{Store, WriterHandle};
use crate::{api, incident, notify, schedule};

/// How often old minute histograms are rolled up and old rows pruned.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(600);
/// After the other tasks stopped, how long the writer may take to commit what is queued.
const WRITER_FLUSH: Duration = Duration::from_secs(5);

/// What the parts of one agent share instead of process-wide statics.
#[derive(Clone, Default)]
pub struct Shared {
    /// The wall clock of the evaluator and the dispatcher (follows paused tokio time).
    pub clock: Clock,
    /// Rung by the evaluator after committing outbox rows; the dispatcher's workers listen.
    pub bell: Bell,
    /// HTTP clients shared by the probes.
    pub http: probe::http::Clients,
    /// Progress stamps and faults of the parts, for `/health`.
    pub health: Health,
    /// Probes paused through the API (read back from the store at start).
    pub paused: Paused,
    /// Rehearsal faults the probes see (empty unless a rehearsal runs).
    pub faults: crate::chaos::fault::Faults,
    /// The live rehearsal whose run id marks incidents opening on its components.
    pub drill: crate::chaos::live::Drill,
    /// The probes this agent runs (all of them, except in fleet mode).
    pub ownership: crate::fleet::Ownership,
    /// This agent in the fleet (fleet mode only).
    pub member: Option<Arc<crate::fleet::Member>>,
    /// A lock per probe held by its runs, so that none overlaps another.
    pub busy: crate::schedule::Busy,
}

/// What to start.
pub struct Options {
    /// Schedule the enabled probes (off: runs come from [`Pipeline::send`]).
    pub scheduler: bool,
    /// Deliver notifications.
    pub dispatcher: bool,
    /// Serve the API, `/health`, `/metrics` and the dashboard here.
    pub listener: Option<TcpListener>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scheduler: true,
            dispatcher: true,
            listener: None,
        }
    }
}

/// A task that died before shutdown.
#[derive(Debug, Clone)]
pub struct Fault {
    pub task: &'static str,
    pub what: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task {} {}", self.task, self.what)
    }
}

struct Task {
    name: &'static str,
    handle: JoinHandle<anyhow::Result<()>>,
}

/// A running agent.
pub struct Pipeline {
    pub config: Arc<Config>,
    /// Pause/resume/run-now and the evaluator's commands (what the API's mutating routes use).
    pub control: Control,
    pub store: Store,
    pub metrics: Metrics,
    pub shared: Shared,
    /// Input of the fan-out when the scheduler is off.
    runs: Option<mpsc::Sender<RunResult>>,
    tasks: Vec<Task>,
    writer: Option<Task>,
    sched_stop: CancellationToken,
    stop: CancellationToken,
    force: CancellationToken,
    /// Stops what must outlive the others (fleet membership: the lease is held until the
    /// leader's work has stopped).
    last: CancellationToken,
}

/// The text of a panic payload.
pub fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

fn spawn<F>(name: &'static str, f: F) -> Task
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    Task {
        name,
        handle: tokio::spawn(f),
    }
}

/// What a finished task's result means.
fn judge(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> Option<String> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("failed: {e:#}")),
        Err(e) if e.is_panic() => Some(format!(
            "panicked: {}",
            panic_message(e.into_panic().as_ref())
        )),
        Err(_) => Some("was killed".to_string()),
    }
}

impl Pipeline {
    /// Open the store and start every part `opts` asks for. Needs a tokio runtime.
    pub fn start(config: Arc<Config>, opts: Options) -> anyhow::Result<Pipeline> {
        Pipeline::start_with(config, opts, Shared::default())
    }

    /// [`Pipeline::start`] with a given [`Shared`] (e.g. a clock made under paused time).
    pub fn start_with(
        config: Arc<Config>,
        opts: Options,
        mut shared: Shared,
    ) -> anyhow::Result<Pipeline> {
        let (store, writer) = Store::open(crate::store::Target::of(&config)?)?;
        let metrics = Metrics::new();
        shared
            .paused
            .load(&store.reader()?)
            .context("reading the paused probes")?;
        for p in config.probes.iter().filter(|p| p.enabled) {
            control::export_paused(&metrics, &p.name, shared.paused.contains(&p.name));
        }
        let member = crate::fleet::Member::of(&config).map(Arc::new);
        if let Some(m) = &member {
            tracing::info!(agent = %m.id, location = %m.location, "fleet mode: joining the agents that share this database");
            shared.ownership = crate::fleet::Ownership::fleet(&m.id);
            shared.member = Some(m.clone());
        }
        let (sched_stop, stop, force, last) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let mut tasks = Vec::new();
        let writer = spawn("writer", async move {
            join_writer(writer).await;
            Ok(())
        });

        let (run_tx, run_rx) = mpsc::channel::<RunResult>(1024);
        let (eval_tx, eval_rx) = mpsc::channel::<incident::Located>(1024);
        let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(64);
        match &member {
            // Fleet mode: runs go to the feed; whichever agent leads evaluates and notifies.
            Some(m) => {
                let (role_tx, role_rx) = tokio::sync::watch::channel(None);
                let cursor = crate::fleet::Cursor::default();
                tasks.push(spawn(
                    "feed",
                    crate::fleet::feed(eval_rx, store.clone(), m.clone(), config.clone()),
                ));
                tasks.push(spawn(
                    "fleet",
                    crate::fleet::membership(
                        m.clone(),
                        store.clone(),
                        shared.clone(),
                        role_tx,
                        cursor.clone(),
                        last.clone(),
                    ),
                ));
                let leader = crate::fleet::Leader {
                    config: config.clone(),
                    store: store.clone(),
                    metrics: metrics.clone(),
                    shared: shared.clone(),
                    member: m.clone(),
                    dispatcher: opts.dispatcher,
                };
                tasks.push(spawn(
                    "leader",
                    leader.run(cmd_rx, role_rx, cursor, stop.clone(), force.clone()),
                ));
            }
            None => {
                let evaluator = incident::Evaluator::new(
                    config.clone(),
                    store.clone(),
                    metrics.clone(),
                    &shared,
                )?;
                let halt = force.clone();
                tasks.push(spawn("evaluator", async move {
                    evaluator.run(eval_rx, &mut cmd_rx, halt).await
                }));
                if opts.dispatcher {
                    let d = notify::Dispatcher::new(
                        config.clone(),
                        store.clone(),
                        metrics.clone(),
                        &shared,
                    )?;
                    tasks.push(spawn("dispatcher", d.run(stop.clone(), force.clone())));
                }
            }
        }
        let gate = Gate::new(&config);
        let control = Control::new(
            config.clone(),
            store.clone(),
            metrics.clone(),
            shared.clone(),
            gate.clone(),
            run_tx.downgrade(),
            cmd_tx,
        );
        tasks.push(spawn("rehearsals", control.rehearsals().clone().run()));
        if let Some(m) = member.as_ref().filter(|m| m.confirm && opts.scheduler) {
            tasks.push(spawn(
                "confirm",
                crate::fleet::confirmations(
                    m.clone(),
                    store.clone(),
                    control.clone(),
                    shared.ownership.clone(),
                    sched_stop.clone(),
                    force.clone(),
                ),
            ));
        }
        tasks.push(spawn(
            "fan-out",
            fan_out(
                run_rx,
                eval_tx,
                store.clone(),
                metrics.clone(),
                force.clone(),
            ),
        ));
        if let Some(hb) = config.agent.heartbeat.clone() {
            tasks.push(spawn(
                "heartbeat",
                crate::heartbeat::run(hb, store.clone(), shared.health.clone(), stop.clone()),
            ));
        }
        tasks.push(spawn(
            "maintenance",
            maintenance(config.clone(), store.clone(), shared.clock, stop.clone()),
        ));
        // In fleet mode the leader sends the reviews (`fleet::Leader`), so they go out once.
        if opts.dispatcher && !config.reviews.is_empty() && shared.member.is_none() {
            tasks.push(spawn(
                "reviews",
                crate::review::run(config.clone(), store.clone(), shared.clock, stop.clone()),
            ));
        }
        if let Some(l) = opts.listener {
            let addr = l.local_addr().context("API listener")?;
            let soft = crate::fdlimit::limits().map(|(soft, _)| soft);
            let reserve = crate::fdlimit::reserve(&config);
            let limits = api::Limits::new(crate::fdlimit::api_connection_cap(soft, reserve));
            tracing::info!(
                %addr,
                max_connections = limits.max_connections,
                fd_reserve = reserve,
                "serving API, /metrics and dashboard"
            );
            let state = api::AppState::new(
                config.clone(),
                metrics.clone(),
                store.clone(),
                shared.health.clone(),
            )
            .with_control(control.clone());
            let (stop, force) = (stop.clone(), force.clone());
            tasks.push(spawn("api", async move {
                let serve = api::serve(l, state.clone(), limits, stop);
                let r = tokio::select! {
                    r = serve => r.context("API server"),
                    _ = force.cancelled() => Ok(()),
                };
                state.release_store();
                r
            }));
        }
        let runs = if opts.scheduler {
            let scheduler = schedule::Scheduler {
                config: config.clone(),
                metrics: metrics.clone(),
                store: Some(store.clone()),
                sink: run_tx,
                shared: shared.clone(),
                gate,
            };
            tasks.push(spawn(
                "scheduler",
                scheduler.run(sched_stop.clone(), force.clone()),
            ));
            None
        } else {
            Some(run_tx)
        };
        Ok(Pipeline {
            config,
            control,
            store,
            metrics,
            shared,
            runs,
            tasks,
            writer: Some(writer),
            sched_stop,
            stop,
            force,
            last,
        })
    }

    /// Feed a run to the fan-out (stored, counted, evaluated) when the scheduler is off.
    pub async fn send(&self, r: RunResult) -> anyhow::Result<()> {
        let tx = self
            .runs
            .as_ref()
            .context("the scheduler feeds this pipeline")?;
        tx.send(r)
            .await
            .map_err(|_| anyhow::anyhow!("fan-out has stopped"))
    }

    /// Kill one task as a crash would (for supervision tests). `false` if there is none.
    pub fn abort(&self, task: &str) -> bool {
        match self.tasks.iter().find(|t| t.name == task) {
            Some(t) => {
                t.handle.abort();
                true
            }
            None => false,
        }
    }

    /// Wait until a task ends (any end before shutdown is a fault), log it and mark it on
    /// `/health`.
    pub async fn fault(&mut self) -> Fault {
        let writer = self.writer.as_mut().map(|w| &mut w.handle);
        let handles = self.tasks.iter_mut().map(|t| &mut t.handle);
        let all: Vec<_> = handles.chain(writer).collect();
        let (r, i, _) = futures_util::future::select_all(all).await;
        let mut task = if i < self.tasks.len() {
            self.tasks.remove(i).name
        } else {
            self.writer.take().map_or("writer", |w| w.name)
        };
        let mut what = judge(r);
        // A task that returned cleanly may only be following one that died (the evaluator
        // ends when the fan-out is gone): name the one that died, if it already ended too.
        if what.is_none() {
            tokio::task::yield_now().await;
            while let Some(j) = self.tasks.iter().position(|t| t.handle.is_finished()) {
                let t = self.tasks.remove(j);
                if let Some(w) = judge(t.handle.await) {
                    (task, what) = (t.name, Some(w));
                    break;
                }
            }
        }
        let what = what.unwrap_or_else(|| "returned before shutdown".to_string());
        tracing::error!(task, what = %what, "a task of the daemon stopped; stopping the daemon");
        let part = match task {
            "fan-out" | "feed" | "leader" => "evaluator",
            "fleet" | "confirm" => "scheduler",
            t => t,
        };
        self.shared
            .health
            .fail(part, &format!("task {task} {what}"));
        Fault { task, what }
    }

    /// Run until `shutdown` completes or a task dies, then stop. A fault is an error naming
    /// the task.
    pub async fn wait(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let fault = tokio::select! {
            _ = shutdown => None,
            f = self.fault() => Some(f),
        };
        if fault.is_none() {
            tracing::info!("shutting down: no new runs; waiting for in-flight work");
        }
        let r = self.stop().await;
        match fault {
            Some(f) => Err(anyhow::anyhow!("{f}; the daemon stopped")),
            None => r,
        }
    }

    /// A clean stop under one deadline (`shutdown_grace`): no new runs; in-flight runs
    /// finish, are stored and evaluated; the dispatcher finishes its delivery in flight;
    /// whatever is still going at the deadline is cut. Then the writer commits what is
    /// queued. Errors name the tasks that failed on the way.
    pub async fn stop(self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.config.agent.shutdown_grace;
        let Pipeline {
            store,
            control,
            runs,
            mut tasks,
            writer,
            sched_stop,
            stop,
            force,
            last,
            ..
        } = self;
        let timer = {
            let force = force.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                force.cancel();
            })
        };
        let mut errors = Vec::new();
        sched_stop.cancel();
        control.rehearsals().shutdown();
        drop(runs);
        for (stage, then) in [
            // A drill in progress first: its fault lifted, its end hooks run, its row kept.
            (
                &[
                    "rehearsals",
                    "scheduler",
                    "confirm",
                    "fan-out",
                    "evaluator",
                    "feed",
                ][..],
                &stop,
            ),
            (
                &["dispatcher", "leader", "maintenance", "api", "heartbeat"],
                &last,
            ),
            (&["fleet"], &last),
        ] {
            for name in stage {
                if let Some(i) = tasks.iter().position(|t| t.name == *name) {
                    let t = tasks.remove(i);
                    join_task(t, deadline, &mut errors).await;
                }
            }
            then.cancel();
        }
        timer.abort();
        // The control handle holds a writer handle too.
        drop((store, control));
        if let Some(w) = writer {
            let limit = deadline.max(Instant::now() + WRITER_FLUSH);
            join_task(w, limit, &mut errors).await;
        }
        if errors.is_empty() {
            tracing::info!("stopped cleanly");
            Ok(())
        } else {
            Err(anyhow::anyhow!(errors.join("; ")))
        }
    }

    /// A crash: every task aborted where it is (nothing after the last commit happens),
    /// then the writer finishes what was queued.
    pub async fn kill(self) {
        for t in &self.tasks {
            t.handle.abort();
        }
        for t in self.tasks {
            let _ = t.handle.await;
        }
        drop(self.runs);
        drop(self.store);
        drop(self.control);
        if let Some(w) = self.writer {
            let _ = w.handle.await;
        }
    }
}

/// Await a task until `limit` (then abort it); record how it ended if that is an error.
async fn join_task(mut t: Task, limit: Instant, errors: &mut Vec<String>) {
    // A little past the deadline: tasks stop on `force` themselves; this is the backstop.
    let r = tokio::time::timeout_at(limit + Duration::from_secs(1), &mut t.handle).await;
    let what = match r {
        Ok(r) => judge(r),
        Err(_) => {
            t.handle.abort();
            Some("did not stop by the shutdown deadline".to_string())
        }
    };
    if let Some(what) = what {
        tracing::error!(task = t.name, what = %what, "task failed during shutdown");
        errors.push(format!("task {} {what}", t.name));
    }
}

async fn join_writer(w: WriterHandle) {
    w.join().await;
}

/// Most distinct sub-check series one agent records over all its probes (each probe has its
/// own, smaller cap): the watched services do not decide our memory, rows or metrics.
pub const MAX_AGENT_SUBCHECKS: usize = 10_000;

/// The agent-wide budget of sub-check series: a [`probe::SeriesBudget`] that also marks
/// the run and warns once when the cap is reached.
pub struct AgentSeries {
    budget: probe::SeriesBudget,
    warned: bool,
}

impl AgentSeries {
    pub fn new(cap: usize) -> Self {
        AgentSeries {
            budget: probe::SeriesBudget::new(cap),
            warned: false,
        }
    }

    /// Drop the run's sub-checks that would be new series beyond the cap.
    pub fn admit(&mut self, r: &mut RunResult) {
        let dropped = self.budget.admit(&mut r.subchecks, |_| true);
        if dropped > 0 {
            r.details
                .insert("subchecks_dropped_agent".into(), (dropped as u64).into());
            if !self.warned {
                self.warned = true;
                tracing::warn!(probe = %r.probe, cap = self.budget.cap(), "agent-wide sub-check series cap reached; new sub-checks are not recorded");
            }
        }
    }
}

/// Every run: counted, stored, then evaluated. Runs that arrive after the shutdown deadline
/// stopped the evaluator are still stored (the evaluator reads its state back at start).
async fn fan_out(
    mut runs: mpsc::Receiver<RunResult>,
    eval: mpsc::Sender<incident::Located>,
    store: Store,
    metrics: Metrics,
    force: CancellationToken,
) -> anyhow::Result<()> {
    let mut eval = Some(eval);
    let mut budget = AgentSeries::new(MAX_AGENT_SUBCHECKS);
    while let Some(mut r) = runs.recv().await {
        budget.admit(&mut r);
        observe_run(&metrics, &r);
        store.record(r.clone()).await;
        let Some(tx) = &eval else { continue };
        let run = incident::Located {
            run: r,
            location: None,
        };
        let sent = tokio::select! {
            sent = tx.send(run) => sent.is_ok(),
            _ = force.cancelled() => false,
        };
        if !sent {
            if !force.is_cancelled() {
                anyhow::bail!("the evaluator is gone");
            }
            eval = None;
        }
    }
    Ok(())
}

/// Roll up and prune on a fixed period until `stop`.
async fn maintenance(
    config: Arc<Config>,
    store: Store,
    clock: Clock,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(e) = maintain_once(&config, &store, clock.now_ms()).await {
            tracing::warn!(error = %format!("{e:#}"), "store maintenance failed");
        }
    }
}

/// One maintenance pass at `now_ms`: roll up and prune runs and histograms, then prune the
/// outbox, resolved incidents' timelines and notifier references by the runs retention.
pub async fn maintain_once(
    config: &Config,
    store: &Store,
    now_ms: i64,
) -> anyhow::Result<incident::PruneStats> {
    let s = store.maintain(now_ms, &config.retention).await?;
    let before = now_ms - config.retention.runs.0.as_millis() as i64;
    let p = store.write(move |c| incident::prune(c, before)).await?;
    let skipped = store
        .write(move |c| crate::chaos::live::prune_skipped(c, before))
        .await?;
    tracing::debug!(
        rolled_hours = s.rolled_hours,
        chunks = s.chunks,
        pruned_runs = s.pruned_runs,
        pruned_outbox = p.outbox,
        pruned_events = p.events,
        pruned_refs = p.refs,
        pruned_skipped_rehearsals = skipped,
        "store maintenance"
    );
    Ok(p)
}

fn observe_run(m: &Metrics, r: &RunResult) {
    let (o, probe) = (r.outcome.as_str(), r.probe.as_str());
    m.runs.with([probe, o]).inc();
    let up = |outcome| {
        if outcome == probe::Outcome::Down {
            0.0
        } else {
            1.0
        }
    };
    m.probe_up.with([probe]).set(up(r.outcome));
    m.probe_outcome.with([probe]).set(r.outcome as u8 as f64);
    let ended = r.started_at.timestamp_millis() as f64 / 1000.0 + r.duration.as_secs_f64();
    m.probe_last_run.with([probe]).set(ended);
    for (phase, d) in &r.phases {
        m.probe_duration
            .with([probe, phase])
            .observe(d.as_secs_f64());
    }
    for s in &r.subchecks {
        m.probe_up.with([&s.series]).set(up(s.outcome));
    }
    // Details the probes record (see the probe kinds): kept as last-seen values.
    let detail = |k: &str| r.details.get(k).and_then(serde_json::Value::as_f64);
    if let Some(t) = detail("cert_not_after") {
        m.probe_cert_expiry.with([probe]).set(t);
    }
    if let Some(wer) = detail("wer") {
        m.listen_wer.with([probe]).set(wer);
    }
    // A run that is up is a debug line: at thousands of probes a line per run costs more CPU
    // than the probe's own store write, and floods the journal (docs/BENCHMARKS.md).
    match &r.error {
        Some(e) => {
            tracing::info!(probe = %r.probe, outcome = %o, class = %e.class, error = %e.message, duration_ms = probe::ms(r.duration), "run")
        }
        None if r.outcome != probe::Outcome::Up => {
            tracing::info!(probe = %r.probe, outcome = %o, duration_ms = probe::ms(r.duration), "run")
        }
        None => {
            tracing::debug!(probe = %r.probe, outcome = %o, duration_ms = probe::ms(r.duration), "run")
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn agent_series_budget_admits_known_series_and_new_ones_under_the_cap() {
        use crate::probe::{Outcome, SubCheck};
        let run = |names: &[&str]| RunResult {
            probe: "p".into(),
            kind: "http",
            started_at: chrono::Utc::now(),
            duration: Duration::from_millis(1),
            lag: None,
            outcome: Outcome::Up,
            error: None,
            phases: vec![],
            details: Default::default(),
            subchecks: names
                .iter()
                .map(|n| SubCheck {
                    series: format!("p/checks.{n}"),
                    outcome: Outcome::Up,
                    latency: None,
                    error: None,
                })
                .collect(),
        };
        let mut b = AgentSeries::new(3);
        let mut r = run(&["a", "b"]);
        b.admit(&mut r);
        assert_eq!(r.subchecks.len(), 2);
        assert!(!r.details.contains_key("subchecks_dropped_agent"));
        let mut r = run(&["a", "c", "d", "e"]);
        b.admit(&mut r);
        let kept: Vec<&str> = r.subchecks.iter().map(|s| s.series.as_str()).collect();
        assert_eq!(kept, ["p/checks.a", "p/checks.c"]);
        assert_eq!(r.details["subchecks_dropped_agent"], 2);
        // Known series keep passing once the cap is reached.
        let mut r = run(&["b", "c", "z"]);
        b.admit(&mut r);
        assert_eq!(r.subchecks.len(), 2);
    }

    use super::*;

    #[tokio::test]
    async fn a_task_end_is_judged_by_how_it_ended() {
        let panicked = tokio::spawn(async {
            if std::hint::black_box(true) {
                panic!("index out of bounds");
            }
            Ok(())
        });
        assert_eq!(
            judge(panicked.await).as_deref(),
            Some("panicked: index out of bounds")
        );
        let failed = tokio::spawn(async { Err(anyhow::anyhow!("disk full")) });
        assert_eq!(judge(failed.await).as_deref(), Some("failed: disk full"));
        let killed = tokio::spawn(std::future::pending::<anyhow::Result<()>>());
        killed.abort();
        assert_eq!(judge(killed.await).as_deref(), Some("was killed"));
        assert_eq!(judge(tokio::spawn(async { Ok(()) }).await), None);
    }
}
