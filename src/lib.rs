//! watchpost: a synthetic monitoring agent for HTTP, WebSocket and realtime speech-to-text
//! services. `main.rs` is only the CLI; everything else lives here. [`run`] is the daemon:
//! scheduler → one store writer + the incident evaluator → notifier dispatcher, plus the
//! HTTP API, all stopped by one shutdown future.

pub mod api;
pub mod check;
pub mod config;
pub mod demo;
pub mod demo_stt;
pub mod incident;
pub mod metrics;
pub mod notify;
pub mod probe;
pub mod redact;
pub mod report;
pub mod schedule;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use config::Config;
use metrics::Metrics;
use probe::RunResult;
use store::Store;

/// How often old minute histograms are rolled up and old rows pruned.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(600);

/// The daemon. Schedules every enabled probe, records runs, evaluates components, delivers
/// notifications and serves the API on `listener` (if any) until `shutdown` completes; then
/// stops scheduling, lets in-flight runs finish within `shutdown_grace`, flushes the writer
/// and returns.
pub async fn run(
    config: Arc<Config>,
    listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (store, writer) = Store::start(&config.db_path())?;
    let metrics = Metrics::new();
    describe_metrics(&metrics);
    let token = CancellationToken::new();

    let (run_tx, mut run_rx) = mpsc::channel::<RunResult>(1024);
    let (eval_tx, eval_rx) = mpsc::channel::<RunResult>(1024);

    let evaluator = incident::Evaluator::new(config.clone(), store.clone(), metrics.clone())?;
    let dispatcher = notify::Dispatcher::new(config.clone(), store.clone(), metrics.clone())?;
    let eval_task = tokio::spawn(evaluator.run(eval_rx, token.clone()));
    let dispatch_task = tokio::spawn(dispatcher.run(token.clone()));

    // Every run: stored, counted, then evaluated.
    let fan_store = store.clone();
    let fan_metrics = metrics.clone();
    let fanout = tokio::spawn(async move {
        while let Some(r) = run_rx.recv().await {
            observe_run(&fan_metrics, &r);
            fan_store.record(r.clone()).await;
            let _ = eval_tx.send(r).await;
        }
    });

    let maint_store = store.clone();
    let maint_cfg = config.clone();
    let maint_token = token.clone();
    let maintenance = tokio::spawn(async move {
        let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
        loop {
            tokio::select! {
                _ = maint_token.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = chrono::Utc::now().timestamp_millis();
            let retention = maint_cfg.retention.clone();
            match maint_store
                .write(move |c| store::maintain(c, now, &retention))
                .await
            {
                Ok(s) => tracing::debug!(
                    rolled = s.rolled_minutes,
                    pruned_runs = s.pruned_runs,
                    "store maintenance"
                ),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "store maintenance failed"),
            }
        }
    });

    let api_task = match listener {
        Some(l) => {
            let addr = l.local_addr()?;
            tracing::info!(%addr, "serving API, /metrics and dashboard");
            let state =
                api::AppState::new(config.clone(), metrics.clone(), store.path().to_path_buf());
            let t = token.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(l, api::router(state))
                    .with_graceful_shutdown(t.cancelled_owned())
                    .await
                {
                    tracing::error!(error = %e, "API server failed");
                }
            }))
        }
        None => None,
    };

    let scheduler = schedule::Scheduler {
        config: config.clone(),
        metrics: metrics.clone(),
        store: Some(store.clone()),
        sink: run_tx,
    };
    let sched_token = CancellationToken::new();
    let sched_task = tokio::spawn(scheduler.run(sched_token.clone()));
    tracing::info!(
        probes = config.probes.iter().filter(|p| p.enabled).count(),
        "watchpost running"
    );

    shutdown.await;
    tracing::info!("shutting down: no new runs; waiting for in-flight runs");
    sched_token.cancel();
    let _ = sched_task.await; // drops the run sender once in-flight runs are done
    let _ = fanout.await; // all runs stored and handed to the evaluator
    let _ = eval_task.await; // evaluator saw every run
    token.cancel();
    let _ = dispatch_task.await;
    let _ = maintenance.await;
    if let Some(t) = api_task {
        let _ = t.await;
    }
    drop(store);
    writer.join().await;
    tracing::info!("stopped cleanly");
    Ok(())
}

fn describe_metrics(m: &Metrics) {
    m.describe(
        "watchpost_probe_up",
        "gauge",
        "1 when the probe's last run was up or degraded, 0 when down.",
    );
    m.describe(
        "watchpost_probe_outcome",
        "gauge",
        "Last outcome: 0 up, 1 degraded, 2 down.",
    );
    m.describe(
        "watchpost_probe_duration_seconds",
        "histogram",
        "Phase latency of runs, by probe and phase.",
    );
    m.describe(
        "watchpost_runs_total",
        "counter",
        "Runs by probe and outcome.",
    );
    m.describe(
        "watchpost_runs_skipped_total",
        "counter",
        "Planned runs skipped because the previous run was still going.",
    );
    m.describe(
        "watchpost_schedule_lag_seconds",
        "histogram",
        "Actual start minus planned start of runs.",
    );
}

fn observe_run(m: &Metrics, r: &RunResult) {
    let o = r.outcome.as_str();
    m.inc(
        "watchpost_runs_total",
        &[("probe", &r.probe), ("outcome", o)],
    );
    m.set(
        "watchpost_probe_up",
        &[("probe", &r.probe)],
        if r.outcome == probe::Outcome::Down {
            0.0
        } else {
            1.0
        },
    );
    m.set(
        "watchpost_probe_outcome",
        &[("probe", &r.probe)],
        r.outcome as u8 as f64,
    );
    for (phase, d) in &r.phases {
        m.observe(
            "watchpost_probe_duration_seconds",
            &[("probe", &r.probe), ("phase", phase)],
            d.as_secs_f64(),
        );
    }
    for s in &r.subchecks {
        m.set(
            "watchpost_probe_up",
            &[("probe", &s.series)],
            if s.outcome == probe::Outcome::Down {
                0.0
            } else {
                1.0
            },
        );
    }
    match &r.error {
        Some(e) => {
            tracing::info!(probe = %r.probe, outcome = %o, class = %e.class, message = %e.message, duration_ms = probe::ms(r.duration), "run")
        }
        None => {
            tracing::info!(probe = %r.probe, outcome = %o, duration_ms = probe::ms(r.duration), "run")
        }
    }
}
