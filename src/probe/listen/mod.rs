//! `kind = "listen"`: stream test speech to a realtime STT socket and judge the transcript. (stub)

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::Attempt;
use crate::config::{Interp, ProbeConfig, Rest, SpanError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSpec {
    /// ws:// or wss:// URL of the realtime STT endpoint.
    pub url: Interp,
}

impl ListenSpec {
    pub fn from_config(rest: Rest<'_>, _dir: &Path) -> Result<Self, SpanError> {
        rest.parse()
    }
    pub fn url(&self) -> &str {
        &self.url
    }
    pub fn default_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
}

pub struct ListenProbe;

impl ListenProbe {
    pub fn new(_cfg: &ProbeConfig, _spec: &ListenSpec) -> anyhow::Result<Self> {
        Ok(ListenProbe)
    }
    pub async fn run(&self) -> Attempt {
        let mut a = Attempt::new();
        a.down("unsupported", "listen probes are not implemented yet");
        a
    }
}
