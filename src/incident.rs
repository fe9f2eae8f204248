//! Components and incidents. (stub)

use serde::Deserialize;

use crate::config::{ComponentConfig, SpanError};

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
