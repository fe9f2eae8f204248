//! Error classes: the closed set of short stable words that say why a run is not up.
//! Scripts, alert rules and the README rely on these exact words, so they are one enum here
//! and nowhere else; adding a class means adding a variant, its word and its README line.

use serde::{Deserialize, Serialize};

macro_rules! classes {
    ($($(#[doc = $doc:literal])* $variant:ident = $word:literal,)*) => {
        /// Why a run is not up. Serialized as its snake_case word (see [`ErrorClass::as_str`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum ErrorClass {
            $($(#[doc = $doc])* #[serde(rename = $word)] $variant,)*
        }

        impl ErrorClass {
            /// Every class, in README order.
            pub const ALL: &'static [ErrorClass] = &[$(ErrorClass::$variant,)*];

            /// The stable word (`connect_refused`, `timeout`, …).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorClass::$variant => $word,)*
                }
            }

            /// The class a stored word names, if any.
            pub fn parse(word: &str) -> Option<ErrorClass> {
                match word {
                    $($word => Some(ErrorClass::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

classes! {
    /// The TCP connection was refused.
    ConnectRefused = "connect_refused",
    /// The host could not be reached (no route, network unreachable, connect failed otherwise).
    Unreachable = "unreachable",
    /// The server reset the connection.
    ConnectionReset = "connection_reset",
    /// The server closed the connection before the answer was complete.
    ConnectionClosed = "connection_closed",
    /// The host name did not resolve.
    Dns = "dns",
    /// The TLS handshake failed (certificate, protocol).
    Tls = "tls",
    /// No (complete) answer within a deadline.
    Timeout = "timeout",
    /// An HTTP status outside `[expect] status`.
    HttpStatus = "http_status",
    /// A body that should be JSON is not (or not UTF-8).
    InvalidJson = "invalid_json",
    /// A body over the probe's `max_body` cap.
    BodyTooLarge = "body_too_large",
    /// An `[expect]` assertion failed.
    Assertion = "assertion",
    /// The body's own status says down.
    Unhealthy = "unhealthy",
    /// The service says it is degraded (body status, HTTP 207, `[degraded_when]`).
    Degraded = "degraded",
    /// A phase over its per-run budget.
    Budget = "budget",
    /// The TLS certificate expires within `cert_min_days`.
    CertExpiry = "cert_expiry",
    /// A redirect loop or more redirects than `max_redirects`.
    TooManyRedirects = "too_many_redirects",
    /// The WebSocket upgrade was refused.
    WsRejected = "ws_rejected",
    /// The WebSocket closed (or dropped) before the transaction was complete.
    WsClosed = "ws_closed",
    /// No transcript arrived in time.
    NoTranscript = "no_transcript",
    /// The transcript arrived but does not match the expected one.
    TranscriptMismatch = "transcript_mismatch",
    /// Only interim results arrived; no final transcript.
    InterimOnly = "interim_only",
    /// The STT service reported itself degraded during the session.
    SttDegraded = "stt_degraded",
    /// The STT service reported itself failed during the session.
    SttFailed = "stt_failed",
    /// The server broke the protocol (HTTP or WebSocket framing, garbage, bad UTF-8 frames).
    Protocol = "protocol",
    /// A WebSocket frame or message over the probe's `max_message_bytes` cap.
    FrameTooLarge = "frame_too_large",
    /// A fault inside watchpost itself (a bug): the run is recorded as down with the panic message.
    Internal = "internal",
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_are_snake_case() {
        for c in ErrorClass::ALL {
            let w = c.as_str();
            assert_eq!(ErrorClass::parse(w), Some(*c));
            assert!(
                w.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'),
                "{w}"
            );
            assert_eq!(serde_json::to_value(c).unwrap(), serde_json::json!(w));
        }
        assert_eq!(ErrorClass::parse("connect_failed"), None);
    }

    #[test]
    fn readme_lists_exactly_these_classes() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("## Error classes")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has an Error classes section");
        // One table row per class: "| `word` | meaning |".
        let listed: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        let known: Vec<&str> = ErrorClass::ALL.iter().map(|c| c.as_str()).collect();
        for w in &known {
            assert!(listed.contains(w), "README does not document class {w}");
        }
        for w in &listed {
            assert!(known.contains(w), "README documents unknown class {w}");
        }
    }
}
