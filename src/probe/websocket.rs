//! `kind = "websocket"`: connect, then a scripted list of send/expect steps. (stub)

use std::path::Path;

use serde::Deserialize;

use super::Attempt;
use crate::config::{Interp, ProbeConfig, Rest, SpanError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsSpec {
    /// ws:// or wss:// URL.
    pub url: Interp,
}

impl WsSpec {
    pub fn from_config(rest: Rest<'_>, _dir: &Path) -> Result<Self, SpanError> {
        rest.parse()
    }
    pub fn url(&self) -> &str {
        &self.url
    }
}

pub struct WsProbe;

impl WsProbe {
    pub fn new(_cfg: &ProbeConfig, _spec: &WsSpec) -> anyhow::Result<Self> {
        Ok(WsProbe)
    }
    pub async fn run(&self) -> Attempt {
        let mut a = Attempt::new();
        a.down("unsupported", "websocket probes are not implemented yet");
        a
    }
}
