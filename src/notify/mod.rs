//! Notifiers: destinations for incident transitions, fed from the SQLite outbox. (stub)

use std::ops::Range;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Rest, SpanError};
use crate::metrics::Metrics;
use crate::store::Store;

/// Kind-specific notifier configuration.
#[derive(Debug, Clone)]
pub enum NotifierConfig {}

impl NotifierConfig {
    pub fn from_kind(kind: &str, span: Range<usize>, _rest: Rest<'_>) -> Result<Self, SpanError> {
        Err(SpanError::at(span, format!("unknown notifier kind {kind:?}")))
    }
}

/// Delivers outbox rows to notifiers.
pub struct Dispatcher;

impl Dispatcher {
    pub fn new(_config: Arc<Config>, _store: Store, _metrics: Metrics) -> anyhow::Result<Self> {
        Ok(Dispatcher)
    }

    /// Deliver until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
    }
}

/// `watchpost notify-test NOTIFIER`: send one event marked as a test.
pub async fn notify_test(_config: &Config, name: &str) -> anyhow::Result<()> {
    anyhow::bail!("unknown notifier {name:?}")
}
