//! watchpost: a synthetic monitoring agent for HTTP, WebSocket and realtime speech-to-text
//! services. `main.rs` is only the CLI; everything else lives here.

pub mod config;
pub mod incident;
pub mod notify;
pub mod probe;
