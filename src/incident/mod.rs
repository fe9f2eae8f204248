//! Components and incidents: the evaluator that turns runs into component status and
//! incident transitions (written with their outbox rows in one transaction). (stub)

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ComponentConfig, Config, SpanError};
use crate::metrics::Metrics;
use crate::probe::RunResult;
use crate::store::Store;

/// `[[maintenance]]`: a window in which incidents are suppressed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Components in maintenance during the window.
    pub components: Vec<String>,
}

impl MaintenanceConfig {
    pub fn validate(&self, _components: &[ComponentConfig]) -> Result<(), SpanError> {
        Ok(())
    }
}

/// Consumes runs, keeps per-component state, opens/updates/resolves incidents.
pub struct Evaluator {
    _config: Arc<Config>,
    _store: Store,
    _metrics: Metrics,
}

impl Evaluator {
    pub fn new(config: Arc<Config>, store: Store, metrics: Metrics) -> anyhow::Result<Self> {
        Ok(Evaluator { _config: config, _store: store, _metrics: metrics })
    }

    /// Runs until `runs` closes (the scheduler has drained); `shutdown` is informational.
    pub async fn run(self, mut runs: mpsc::Receiver<RunResult>, _shutdown: CancellationToken) {
        while runs.recv().await.is_some() {}
    }
}

/// Incidents as JSON objects, newest first (for the CLI and the API).
pub fn list_incidents(_conn: &rusqlite::Connection, _open_only: bool) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(Vec::new())
}

/// Human table of incidents for `watchpost incidents`.
pub fn render_incidents(list: &[serde_json::Value]) -> String {
    if list.is_empty() {
        return "no incidents\n".into();
    }
    list.iter().map(|v| format!("{v}\n")).collect()
}
