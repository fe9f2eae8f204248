//! `kind = "listen"`: stream test speech to a realtime speech-to-text socket the way an app
//! does, and judge what comes back — the transaction HTTP health checks never see (a socket
//! that upgrades fine and then never transcribes, closes with 1011 mid-stream, or falls back
//! to a degraded batch mode).
//!
//! One run: connect → (optional idle time with keepalives) → audio frames of `chunk` each,
//! paced at `speed` × real time against absolute deadlines (frame *n* is due at
//! `start + n × chunk / speed`, so a late frame never delays the next one) → the dialect's
//! end-of-stream messages → wait for the final transcript → judge it against the expected
//! transcript (word error rate after normalisation) and/or required phrases.
//!
//! Phases: `connect` (TCP + TLS + upgrade), `first_result` (first audio frame → first
//! non-empty transcript), `final` (last audio frame → final transcript; for dialects that
//! settle, → the last change of the transcript), `total`.
//!
//! Files: [`config`] reads and validates the probe file, [`session`] drives one run,
//! [`transcript`] assembles what is heard (capped), [`judge`] turns it into an outcome (a
//! pure function), [`wer`] normalises and scores, [`audio`] reads WAVs; [`deepgram`],
//! [`flux`], [`omi`] and [`generic`] hold everything that differs between dialects
//! ([`Wire`]).
//! Not here: transcoding (audio must already be PCM 16-bit at the declared rate).

pub mod audio;
pub mod config;
pub mod deepgram;
pub mod flux;
#[cfg(test)]
mod fuzz;
pub mod generic;
pub mod judge;
pub mod omi;
mod session;
pub mod transcript;
pub mod wer;

use std::time::Duration;

use tokio::time::Instant;

pub use self::config::{Accumulate, DeepgramEnd, DialectName, Expectation, ListenSpec};
use super::websocket::{self as wsock, Target};
use super::{Attempt, UpDetail};
use crate::chaos::fault::Injection;
use crate::config::ProbeConfig;

/// The phases a listen run times.
pub const PHASES: [&str; 4] = ["connect", "first_result", "final", "total"];

// ---------------------------------------------------------------------------------------
// Messages, and what differs between dialects
// ---------------------------------------------------------------------------------------

/// One transcript segment (Omi).
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Segments with the same id replace each other.
    pub id: Option<String>,
    pub text: String,
    /// Seconds into the stream: a merged segment that arrives under a new id still takes
    /// its place in time, not at the end.
    pub start: Option<f64>,
}

/// What a server text message means to the session.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A transcript result (interim or final).
    Results {
        text: String,
        is_final: bool,
        from_finalize: bool,
        request_id: Option<String>,
    },
    /// Omi transcript segments.
    Segments(Vec<Segment>),
    /// Omi: these segments were merged into another one.
    SegmentsDeleted(Vec<String>),
    /// A service status event (Omi `service_status`).
    Status {
        status: String,
        text: String,
        /// Degraded batch mode: results arrive only once per this interval.
        batch: Option<Duration>,
        /// `stt_recovered`: how long the server says it was degraded.
        degraded_for: Option<Duration>,
    },
    /// The server says the stream is complete (Deepgram `Metadata`).
    Done { request_id: Option<String> },
    /// The server reported an error in-band.
    ServerError(String),
    /// The session is open (Flux `Connected`), with the request id support asks for.
    Connected { request_id: Option<String> },
    /// Nothing to judge (pings, speech events, unknown types).
    Ignore,
}

/// Everything that differs between dialects: how messages read, how a stream ends, how
/// an unfinished one is worded, keepalives. Each dialect file implements it; the session
/// asks, and never branches on which dialect it is.
pub trait Wire: std::fmt::Debug + Send + Sync {
    /// `deepgram`, `omi`, `generic`.
    fn name(&self) -> &'static str;
    /// Read one server text message.
    fn parse(&self, text: &str) -> Result<Event, String>;
    /// Text frame sent while no audio flows, if the dialect has one.
    fn keepalive_message(&self) -> Option<&str> {
        None
    }
    /// Text frames sent after the last audio frame.
    fn end_messages(&self) -> Vec<&str> {
        Vec::new()
    }
    /// Whether "unchanged for `settle`" ends the wait for the final transcript (then
    /// `final_timeout` bounds the last change, not the end of the wait).
    fn settles(&self) -> bool {
        true
    }
    /// Whether a final result is the whole utterance so far (else it appends).
    fn replaces(&self) -> bool {
        false
    }
    /// Whether `ev`, arriving after the audio was sent, completes the stream — and how.
    fn completes(&self, _ev: &Event) -> Option<&'static str> {
        None
    }
    /// A stream with a transcript that never completed, e.g. "the server did not finish
    /// the stream (no Metadata or close)".
    fn unfinished(&self) -> &'static str;
    /// Whether binary messages from the server are skipped (else a protocol error).
    fn ignores_binary(&self) -> bool {
        false
    }
    /// After a completion `how`, keep reading this long for the server's close frame.
    fn linger_after(&self, _how: &str) -> Option<Duration> {
        None
    }
    /// Upgrade response header carrying the request id.
    fn request_id_header(&self) -> &'static str {
        "x-request-id"
    }
    /// Whether the URL (or `sample_rate`) must declare the audio format.
    fn needs_declared_format(&self) -> bool {
        false
    }
}

/// The dialect and its settings.
#[derive(Debug, Clone)]
pub enum Dialect {
    Deepgram(deepgram::Settings),
    Flux(flux::Settings),
    Omi(omi::Settings),
    Generic(generic::Settings),
}

impl Dialect {
    /// The dialect's rules.
    pub fn wire(&self) -> &dyn Wire {
        match self {
            Dialect::Deepgram(d) => d,
            Dialect::Flux(f) => f,
            Dialect::Omi(o) => o,
            Dialect::Generic(g) => g,
        }
    }
    pub fn name(&self) -> &'static str {
        self.wire().name()
    }
    pub fn settles(&self) -> bool {
        self.wire().settles()
    }
}

// ---------------------------------------------------------------------------------------
// The probe
// ---------------------------------------------------------------------------------------

/// Send lateness (p99 over a run's frames) from which an up run's lateness figures are worth
/// storing: the agent, not the service, was slow, and they say how far to trust its timings.
/// The target for 1,000 concurrent sessions is 5 ms.
pub const NOTABLE_LATENESS_MS: f64 = 5.0;

/// How the store treats detail `key` of an up listen run (see [`crate::probe::UpDetail`]):
/// the server's request id (what a vendor needs about a failed run) and the count of interim
/// results change on every run and say nothing new; the send lateness neither, unless its
/// p99 reaches [`NOTABLE_LATENESS_MS`].
pub fn up_detail(key: &str, details: &serde_json::Map<String, serde_json::Value>) -> UpDetail {
    match key {
        "request_id" | "interim_results" => UpDetail::Routine,
        "send_lateness_p50_ms" | "send_lateness_p99_ms" | "send_lateness_max_ms" => {
            let p99 = details
                .get("send_lateness_p99_ms")
                .and_then(serde_json::Value::as_f64);
            match p99 {
                Some(v) if v >= NOTABLE_LATENESS_MS => UpDetail::Notable,
                _ => UpDetail::Routine,
            }
        }
        _ => UpDetail::State,
    }
}

/// Timings of one session beyond what goes into details, for the benchmark.
#[derive(Debug, Clone, Default)]
pub struct SessionStats {
    /// Per frame: sent (write returned) minus its absolute deadline.
    pub lateness: Vec<Duration>,
    /// When the write of the last audio frame began (where the `final` phase starts).
    pub last_frame_at: Option<Instant>,
    /// When the final transcript reached the socket (where the `final` phase ends).
    pub final_at: Option<Instant>,
    /// The server's request id, if it gave one.
    pub request_id: Option<String>,
}

/// A listen probe ready to run.
pub struct ListenProbe {
    spec: ListenSpec,
    target: Target,
    timeout: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl ListenProbe {
    pub fn new(cfg: &ProbeConfig, spec: &ListenSpec) -> anyhow::Result<Self> {
        let target = Target {
            url: spec.url.clone(),
            headers: spec.headers.clone(),
            subprotocols: spec.subprotocols.clone(),
            max_message_bytes: spec.max_message_bytes,
            tls: wsock::tls_config(spec.ca_pem.as_deref().map(Vec::as_slice))?,
        };
        Ok(ListenProbe {
            spec: spec.clone(),
            target,
            timeout: cfg.timeout,
        })
    }

    pub async fn run(&self) -> Attempt {
        self.run_with_stats().await.0
    }

    /// One session under a rehearsal fault (transport faults connect through the fault
    /// proxy; `ws_close`, `garble` and `stt_degraded` are met inside the session).
    pub async fn run_with(&self, fault: Option<&Injection>) -> Attempt {
        self.session(fault).await.0
    }

    /// One session, with the raw timings the benchmark needs.
    pub async fn run_with_stats(&self) -> (Attempt, SessionStats) {
        self.session(None).await
    }

    async fn session(&self, fault: Option<&Injection>) -> (Attempt, SessionStats) {
        let mut a = Attempt::new();
        let mut stats = SessionStats::default();
        let t0 = Instant::now();
        let deadline = t0 + self.timeout;
        let s = &self.spec;
        a.detail("dialect", s.dialect.name());

        let timeout = s.connect_timeout.min(self.timeout);
        let c = match wsock::connect_via(&self.target, timeout, fault.and_then(|f| f.via)).await {
            Ok(c) => c,
            Err(f) => {
                f.apply(&mut a);
                return (a, stats);
            }
        };
        a.phase("connect", c.elapsed);
        if let Some(rid) = c.headers.get(&s.request_id_header) {
            stats.request_id = Some(rid.clone());
        }
        let mut ws = c.ws;
        let result = session::Session::new(s, self.timeout, &mut ws, deadline, &mut a, &mut stats)
            .with_fault(fault.map(|f| &f.mode))
            .run()
            .await;
        a.phase("total", t0.elapsed());
        if let Some(rid) = &stats.request_id {
            a.detail("request_id", rid.clone());
        }
        let mut late = stats.lateness.clone();
        late.sort_unstable();
        if !late.is_empty() {
            a.detail("send_lateness_p50_ms", super::ms(percentile(&late, 50.0)));
            a.detail("send_lateness_p99_ms", super::ms(percentile(&late, 99.0)));
            a.detail("send_lateness_max_ms", super::ms(late[late.len() - 1]));
        }
        // The polite close must not push a run judged at its deadline past the caller's own
        // (which allows 250 ms of slack) and turn the verdict into a bare timeout.
        let close_by = deadline.max(Instant::now()) + Duration::from_millis(200);
        let close = |ws| tokio::time::timeout_at(close_by, wsock::close_quietly(ws, 1000));
        match result {
            Ok(true) => {
                // Answer the server's close frame: tungstenite queued the reply when it read
                // the close, and sends it on the next flush.
                use futures_util::SinkExt as _;
                let _ = tokio::time::timeout_at(close_by, ws.flush()).await;
            }
            Ok(false) => {
                let _ = close(&mut ws).await;
            }
            Err(f) => {
                f.apply(&mut a);
                let _ = close(&mut ws).await;
            }
        }
        (a, stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn up_details_table() {
        let quiet = json!({"send_lateness_p99_ms": 4.999})
            .as_object()
            .cloned()
            .unwrap();
        let busy = json!({"send_lateness_p99_ms": 5.0})
            .as_object()
            .cloned()
            .unwrap();
        let none = serde_json::Map::new();
        for (key, details, want) in [
            ("request_id", &busy, UpDetail::Routine),
            ("interim_results", &quiet, UpDetail::Routine),
            ("send_lateness_p50_ms", &quiet, UpDetail::Routine),
            ("send_lateness_max_ms", &quiet, UpDetail::Routine),
            ("send_lateness_p99_ms", &none, UpDetail::Routine),
            ("send_lateness_p50_ms", &busy, UpDetail::Notable),
            ("send_lateness_p99_ms", &busy, UpDetail::Notable),
            ("send_lateness_max_ms", &busy, UpDetail::Notable),
            ("text", &busy, UpDetail::State),
            ("wer", &quiet, UpDetail::State),
            ("close_code", &none, UpDetail::State),
        ] {
            assert_eq!(up_detail(key, details), want, "{key} {details:?}");
        }
        assert_eq!(
            crate::probe::up_detail("http", "request_id", &busy),
            UpDetail::State,
            "only listen runs have routine details"
        );
    }
}
