//! watchpost: a synthetic monitoring agent for HTTP, WebSocket and realtime speech-to-text
//! services. `main.rs` is only the CLI; everything else lives here. [`run`] is the daemon:
//! the supervised [`pipeline::Pipeline`] (scheduler → one store writer + the incident
//! evaluator → notifier dispatcher, plus the HTTP API), stopped by one shutdown future.

pub mod api;
pub mod chaos;
pub mod check;
pub mod clock;
pub mod config;
pub mod control;
pub mod cron;
pub mod demo;
pub mod demo_stt;
pub mod fdlimit;
pub mod fleet;
pub mod health;
pub mod heartbeat;
pub mod incident;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod probe;
pub mod redact;
pub mod report;
pub mod review;
pub mod schedule;
pub mod slo;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use config::Config;
use pipeline::{Options, Pipeline};

/// The daemon. Schedules every enabled probe, records runs, evaluates components, delivers
/// notifications and serves the API on `listener` (if any) until `shutdown` completes; then
/// stops scheduling, lets in-flight work finish within `shutdown_grace`, flushes the writer
/// and returns. A task of the daemon that dies before that is an error naming it.
pub async fn run(
    config: Arc<Config>,
    listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Probes must not run out of descriptors: take all the process may have.
    fdlimit::raise();
    let p = Pipeline::start(
        config.clone(),
        Options {
            listener,
            ..Options::default()
        },
    )?;
    tracing::info!(
        probes = config.probes.iter().filter(|p| p.enabled).count(),
        "watchpost running"
    );
    p.wait(shutdown).await
}
