//! Notifiers: destinations for incident transitions. (stub)

use std::ops::Range;

use crate::config::{Rest, SpanError};

/// Kind-specific notifier configuration.
#[derive(Debug, Clone)]
pub enum NotifierConfig {}

impl NotifierConfig {
    pub fn from_kind(kind: &str, span: Range<usize>, _rest: Rest<'_>) -> Result<Self, SpanError> {
        Err(SpanError::at(span, format!("unknown notifier kind {kind:?}")))
    }
}
