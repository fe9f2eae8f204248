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
//! non-empty transcript), `final` (last audio frame → final transcript), `total`.
//!
//! Files: [`audio`] reads WAVs, [`wer`] normalises and scores, [`deepgram`], [`omi`] and
//! [`generic`] read each dialect's messages; this file is the config and the session
//! driver. Not here: transcoding (audio must already be PCM 16-bit at the declared rate).

pub mod audio;
pub mod deepgram;
pub mod generic;
pub mod omi;
pub mod wer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use self::audio::Audio;
use super::assert::excerpt;
use super::websocket::{self as wsock, close_text, secs, Failure, Target, Ws};
use super::{Attempt, ErrorClass};
use crate::config::{duration::human, Dur, Interp, ProbeConfig, Rest, SpanError};

/// The phases a listen run times.
pub const PHASES: [&str; 4] = ["connect", "first_result", "final", "total"];

// ---------------------------------------------------------------------------------------
// Messages, as the dialects read them
// ---------------------------------------------------------------------------------------

/// One transcript segment (Omi).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Segments with the same id replace each other.
    pub id: Option<String>,
    pub text: String,
}

/// What a server text message means to the session.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// A service status event (Omi `service_status`).
    Status { status: String, text: String },
    /// The server says the stream is complete (Deepgram `Metadata`).
    Done { request_id: Option<String> },
    /// The server reported an error in-band.
    ServerError(String),
    /// Nothing to judge (pings, speech events, unknown types).
    Ignore,
}

// ---------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------

fn default_max_wer() -> toml::Spanned<f64> {
    toml::Spanned::new(0..0, 0.2)
}
fn default_chunk() -> toml::Spanned<Dur> {
    toml::Spanned::new(0..0, Dur::millis(100))
}
fn default_speed() -> toml::Spanned<f64> {
    toml::Spanned::new(0..0, 1.0)
}
fn default_final_timeout() -> Dur {
    Dur::secs(10)
}
fn default_connect_timeout() -> Dur {
    Dur::secs(10)
}
fn default_keepalive() -> Dur {
    Dur::secs(3)
}
fn default_settle() -> Dur {
    Dur::secs(2)
}
fn default_max_message_bytes() -> usize {
    wsock::DEFAULT_MAX_MESSAGE_BYTES
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    /// Wire dialect: `deepgram`, `omi` or `generic`.
    dialect: toml::Spanned<String>,
    /// ws:// or wss:// URL of the realtime endpoint, query included
    /// (`encoding=linear16&sample_rate=16000&channels=1` for Deepgram).
    url: toml::Spanned<Interp>,
    /// Upgrade request headers, e.g. `Authorization = "Token ${DEEPGRAM_API_KEY}"`.
    #[serde(default)]
    headers: BTreeMap<String, Interp>,
    /// Subprotocols offered in `Sec-WebSocket-Protocol`.
    #[serde(default)]
    subprotocols: Vec<String>,
    /// WAV file (PCM 16-bit), relative to the probe file.
    audio: toml::Spanned<String>,
    /// Send only this channel (0-based) of a multichannel file, as mono.
    channel: Option<u16>,
    /// Sample rate the server expects when the URL has no `sample_rate=`.
    sample_rate: Option<toml::Spanned<u32>>,
    /// Channel count the server expects when the URL has no `channels=`.
    channels: Option<toml::Spanned<u16>>,
    /// Expected transcript (default: the audio's entry in `manifest.toml` next to it).
    transcript: Option<String>,
    /// Highest word error rate accepted, after normalisation (0.0–1.0).
    #[serde(default = "default_max_wer")]
    max_wer: toml::Spanned<f64>,
    /// Phrases that must each occur in the transcript (after normalisation).
    #[serde(default)]
    contains: Vec<String>,
    /// Audio per frame (10ms–1s).
    #[serde(default = "default_chunk")]
    chunk: toml::Spanned<Dur>,
    /// Pace: 1.0 = real time, 2.0 = twice as fast (0.1–20).
    #[serde(default = "default_speed")]
    speed: toml::Spanned<f64>,
    /// Silence sent before the audio (part of the paced stream).
    #[serde(default)]
    lead_in: Dur,
    /// Silence sent after the audio (part of the paced stream).
    #[serde(default)]
    tail: Dur,
    /// Time after connecting before the audio starts; keepalives flow meanwhile.
    #[serde(default)]
    idle_before: Dur,
    /// How long after the last audio frame the final transcript may take.
    #[serde(default = "default_final_timeout")]
    final_timeout: Dur,
    /// Deadline for TCP + TLS + upgrade.
    #[serde(default = "default_connect_timeout")]
    connect_timeout: Dur,
    /// Send a keepalive after this long without sending anything (deepgram, or generic with
    /// `keepalive_message`); `"0s"` never sends one.
    #[serde(default = "default_keepalive")]
    keepalive: Dur,
    /// omi and generic: once the audio is sent, the transcript counts as final after it has
    /// not changed for this long.
    #[serde(default = "default_settle")]
    settle: Dur,
    /// deepgram: how the stream ends: `close_stream` (CloseStream → finals → Metadata →
    /// close 1000; the default) or `finalize` (Finalize → `from_finalize` finals).
    end: Option<toml::Spanned<String>>,
    /// Largest frame or message accepted from the server, in bytes; larger is `frame_too_large`.
    #[serde(default = "default_max_message_bytes")]
    max_message_bytes: usize,
    /// PEM file of extra CA certificates to trust, relative to the probe file.
    ca_file: Option<toml::Spanned<String>>,
    /// Upgrade response header holding the request id (default `dg-request-id` for
    /// deepgram, `x-request-id` otherwise).
    request_id_header: Option<String>,
    /// generic: dotted JSON path of the transcript text in a server message.
    transcript_path: Option<toml::Spanned<String>>,
    /// generic: dotted JSON path of the flag marking a final result (default: every result
    /// is final).
    final_path: Option<toml::Spanned<String>>,
    /// generic: dotted JSON path of an in-band error text.
    error_path: Option<toml::Spanned<String>>,
    /// generic: final results `append` (default) to the transcript or `replace` it.
    accumulate: Option<toml::Spanned<String>>,
    /// generic: text frames sent after the last audio frame (e.g. `['{"type":"CloseStream"}']`).
    end_messages: Option<toml::Spanned<Vec<Interp>>>,
    /// generic: text frame sent as a keepalive while no audio flows.
    keepalive_message: Option<toml::Spanned<Interp>>,
}

/// How a Deepgram stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeepgramEnd {
    CloseStream,
    Finalize,
}

/// The dialect and its settings.
#[derive(Debug, Clone)]
pub enum Dialect {
    Deepgram {
        end: DeepgramEnd,
    },
    Omi,
    Generic {
        layout: generic::Layout,
        replace: bool,
        end_messages: Vec<String>,
        keepalive_message: Option<String>,
    },
}

impl Dialect {
    pub fn name(&self) -> &'static str {
        match self {
            Dialect::Deepgram { .. } => "deepgram",
            Dialect::Omi => "omi",
            Dialect::Generic { .. } => "generic",
        }
    }
    fn parse(&self, text: &str) -> Result<Event, String> {
        match self {
            Dialect::Deepgram { .. } => deepgram::parse(text),
            Dialect::Omi => omi::parse(text),
            Dialect::Generic { layout, .. } => generic::parse(layout, text),
        }
    }
    fn keepalive_message(&self) -> Option<&str> {
        match self {
            Dialect::Deepgram { .. } => Some(deepgram::KEEPALIVE),
            Dialect::Omi => None,
            Dialect::Generic {
                keepalive_message, ..
            } => keepalive_message.as_deref(),
        }
    }
    fn end_messages(&self) -> Vec<&str> {
        match self {
            Dialect::Deepgram {
                end: DeepgramEnd::CloseStream,
            } => vec![deepgram::CLOSE_STREAM],
            Dialect::Deepgram {
                end: DeepgramEnd::Finalize,
            } => vec![deepgram::FINALIZE],
            Dialect::Omi => vec![],
            Dialect::Generic { end_messages, .. } => {
                end_messages.iter().map(String::as_str).collect()
            }
        }
    }
    /// Whether "stable for `settle`" ends the wait for the final transcript.
    fn settles(&self) -> bool {
        !matches!(self, Dialect::Deepgram { .. })
    }
}

/// What the transcript must look like.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// Expected transcript, judged by word error rate.
    pub transcript: Option<String>,
    pub max_wer: f64,
    /// Phrases that must occur.
    pub contains: Vec<String>,
}

/// A validated listen probe. Audio is loaded and cut into frames once, here.
#[derive(Debug, Clone)]
pub struct ListenSpec {
    pub dialect: Dialect,
    pub url: String,
    pub headers: Vec<(String, Interp)>,
    pub subprotocols: Vec<String>,
    pub audio: Arc<Audio>,
    pub frames: Arc<Vec<Bytes>>,
    pub expect: Expectation,
    pub chunk: Duration,
    pub speed: f64,
    pub lead_in: Duration,
    pub tail: Duration,
    pub idle_before: Duration,
    pub final_timeout: Duration,
    pub connect_timeout: Duration,
    pub keepalive: Option<Duration>,
    pub settle: Duration,
    pub max_message_bytes: usize,
    pub ca_pem: Option<Arc<Vec<u8>>>,
    pub request_id_header: String,
}

fn only_generic<T>(
    dialect: &str,
    key: &str,
    v: &Option<toml::Spanned<T>>,
) -> Result<(), SpanError> {
    match v {
        Some(s) if dialect != "generic" => Err(SpanError::at(
            s.span(),
            format!("{key} is only for dialect = \"generic\" (this probe is {dialect:?})"),
        )),
        _ => Ok(()),
    }
}

impl ListenSpec {
    pub fn from_config(rest: Rest<'_>, dir: &Path) -> Result<Self, SpanError> {
        let f: ListenFile = rest.parse()?;
        let dname = f.dialect.get_ref().as_str();
        if !matches!(dname, "deepgram" | "omi" | "generic") {
            return Err(SpanError::at(
                f.dialect.span(),
                format!("unknown dialect {dname:?} (expected deepgram, omi, generic)"),
            ));
        }
        for (key, v) in [
            ("transcript_path", &f.transcript_path),
            ("final_path", &f.final_path),
            ("error_path", &f.error_path),
            ("accumulate", &f.accumulate),
        ] {
            only_generic(dname, key, v)?;
        }
        only_generic(dname, "end_messages", &f.end_messages)?;
        only_generic(dname, "keepalive_message", &f.keepalive_message)?;
        if let Some(e) = &f.end {
            if dname != "deepgram" {
                return Err(SpanError::at(
                    e.span(),
                    "end is only for dialect = \"deepgram\" (generic uses end_messages)",
                ));
            }
        }
        let dialect = match dname {
            "deepgram" => {
                let end = match f.end.as_ref().map(|e| (e.get_ref().as_str(), e.span())) {
                    None | Some(("close_stream", _)) => DeepgramEnd::CloseStream,
                    Some(("finalize", _)) => DeepgramEnd::Finalize,
                    Some((other, span)) => {
                        return Err(SpanError::at(
                            span,
                            format!("unknown end {other:?} (expected close_stream, finalize)"),
                        ))
                    }
                };
                Dialect::Deepgram { end }
            }
            "omi" => Dialect::Omi,
            _ => {
                let Some(tp) = &f.transcript_path else {
                    return Err(SpanError::at(
                        f.dialect.span(),
                        "dialect = \"generic\" needs transcript_path (the dotted JSON path of the transcript text)",
                    ));
                };
                let replace = match f
                    .accumulate
                    .as_ref()
                    .map(|a| (a.get_ref().as_str(), a.span()))
                {
                    None | Some(("append", _)) => false,
                    Some(("replace", _)) => true,
                    Some((other, span)) => {
                        return Err(SpanError::at(
                            span,
                            format!("unknown accumulate {other:?} (expected append, replace)"),
                        ))
                    }
                };
                let end_messages: Vec<String> = f
                    .end_messages
                    .as_ref()
                    .map(|m| m.get_ref().iter().map(|s| s.to_string()).collect())
                    .unwrap_or_default();
                Dialect::Generic {
                    layout: generic::Layout {
                        transcript_path: tp.get_ref().clone(),
                        final_path: f.final_path.as_ref().map(|p| p.get_ref().clone()),
                        error_path: f.error_path.as_ref().map(|p| p.get_ref().clone()),
                    },
                    replace,
                    end_messages,
                    keepalive_message: f
                        .keepalive_message
                        .as_ref()
                        .map(|k| k.get_ref().to_string()),
                }
            }
        };

        let url = wsock::validate_ws_url(&f.url)?;
        wsock::validate_headers(&f.headers)?;

        // Numbers.
        let max_wer = *f.max_wer.get_ref();
        if !(0.0..=1.0).contains(&max_wer) {
            return Err(SpanError::at(
                f.max_wer.span(),
                format!("max_wer {max_wer} is not between 0.0 and 1.0"),
            ));
        }
        let chunk = f.chunk.get_ref().0;
        if chunk < Duration::from_millis(10) || chunk > Duration::from_secs(1) {
            return Err(SpanError::at(
                f.chunk.span(),
                format!("chunk {} is not between 10ms and 1s", human(chunk)),
            ));
        }
        let speed = *f.speed.get_ref();
        if !(0.1..=20.0).contains(&speed) {
            return Err(SpanError::at(
                f.speed.span(),
                format!("speed {speed} is not between 0.1 and 20"),
            ));
        }
        if f.max_message_bytes < 1024 {
            return Err(SpanError::new("max_message_bytes must be at least 1024"));
        }

        // Audio, and whether it is what the server is told to expect.
        let audio_path = dir.join(f.audio.get_ref());
        let audio = Audio::load(&audio_path, f.channel)
            .map_err(|e| SpanError::at(f.audio.span(), e.to_string()))?;
        let query: BTreeMap<String, String> = url
            .query_pairs()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let shown = f.audio.get_ref();
        let declared_rate = match query.get("sample_rate") {
            Some(r) => Some(r.parse::<u32>().map_err(|_| {
                SpanError::at(
                    f.url.span(),
                    format!("url has sample_rate={r:?}, which is not a whole number"),
                )
            })?),
            None => f.sample_rate.as_ref().map(|r| *r.get_ref()),
        };
        let rate_span = if query.contains_key("sample_rate") {
            f.url.span()
        } else {
            f.sample_rate
                .as_ref()
                .map(|r| r.span())
                .unwrap_or(f.url.span())
        };
        match declared_rate {
            Some(r) if r != audio.sample_rate => {
                return Err(SpanError::at(
                    rate_span,
                    format!("{shown} is {} Hz but the probe declares sample_rate={r}", audio.sample_rate),
                ))
            }
            None if dname == "deepgram" => {
                return Err(SpanError::at(
                    f.url.span(),
                    format!(
                        "deepgram needs encoding=linear16&sample_rate={}&channels={} in the url to read raw PCM",
                        audio.sample_rate, audio.channels
                    ),
                ))
            }
            _ => {}
        }
        let declared_channels = match query.get("channels") {
            Some(c) => Some(c.parse::<u16>().map_err(|_| {
                SpanError::at(
                    f.url.span(),
                    format!("url has channels={c:?}, which is not a whole number"),
                )
            })?),
            None => f.channels.as_ref().map(|c| *c.get_ref()),
        };
        if let Some(c) = declared_channels {
            if c != audio.channels {
                let span = if query.contains_key("channels") {
                    f.url.span()
                } else {
                    f.channels
                        .as_ref()
                        .map(|c| c.span())
                        .unwrap_or(f.url.span())
                };
                let how = match f.channel {
                    Some(ch) => format!("channel {ch} of {shown} is sent as 1 channel"),
                    None if audio.channels > 1 => format!(
                        "{shown} has {} channels (pick one with channel = 0)",
                        audio.channels
                    ),
                    None => format!("{shown} has {} channel", audio.channels),
                };
                return Err(SpanError::at(
                    span,
                    format!("{how} but the probe declares channels={c}"),
                ));
            }
        }
        for (key, ok) in [
            ("encoding", ["linear16", "pcm16", "pcm_s16le"]),
            ("codec", ["pcm16", "linear16", "pcm_s16le"]),
        ] {
            if let Some(v) = query.get(key) {
                if !ok.contains(&v.as_str()) {
                    return Err(SpanError::at(
                        f.url.span(),
                        format!(
                            "url has {key}={v} but {shown} is sent as PCM 16-bit ({key}={})",
                            ok[0]
                        ),
                    ));
                }
            }
        }

        // Expectation.
        let transcript = match f.transcript.clone() {
            Some(t) => Some(t),
            None => audio::manifest_transcript(&audio_path)
                .map_err(|e| SpanError::at(f.audio.span(), e))?,
        };
        if transcript
            .as_deref()
            .is_some_and(|t| wer::normalize(t).is_empty())
        {
            return Err(SpanError::new("transcript has no words to compare"));
        }
        if transcript.is_none() && f.contains.is_empty() {
            return Err(SpanError::at(
                f.audio.span(),
                format!("no expected transcript for {shown}: set transcript or contains, or list it in manifest.toml next to it"),
            ));
        }

        let ca_pem = wsock::read_ca_file(dir, &f.ca_file)?;
        let frames = audio.frames(chunk, f.lead_in.0, f.tail.0);
        let request_id_header = f
            .request_id_header
            .clone()
            .unwrap_or_else(|| {
                if dname == "deepgram" {
                    "dg-request-id"
                } else {
                    "x-request-id"
                }
                .to_string()
            })
            .to_ascii_lowercase();
        Ok(ListenSpec {
            dialect,
            url: f.url.get_ref().to_string(),
            headers: f.headers.into_iter().collect(),
            subprotocols: f.subprotocols,
            audio: Arc::new(audio),
            frames: Arc::new(frames),
            expect: Expectation {
                transcript,
                max_wer,
                contains: f.contains,
            },
            chunk,
            speed,
            lead_in: f.lead_in.0,
            tail: f.tail.0,
            idle_before: f.idle_before.0,
            final_timeout: f.final_timeout.0,
            connect_timeout: f.connect_timeout.0,
            keepalive: (!f.keepalive.0.is_zero()).then_some(f.keepalive.0),
            settle: f.settle.0,
            max_message_bytes: f.max_message_bytes,
            ca_pem,
            request_id_header,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Time the paced stream takes (lead-in + audio + tail at `speed`).
    pub fn stream_duration(&self) -> Duration {
        (self.lead_in + self.audio.duration() + self.tail).div_f64(self.speed)
    }

    /// A deadline that leaves room for every phase, used when the probe sets no `timeout`.
    pub fn default_timeout(&self) -> Duration {
        let settle = if self.dialect.settles() {
            self.settle
        } else {
            Duration::ZERO
        };
        self.connect_timeout.min(Duration::from_secs(5))
            + self.idle_before
            + self.stream_duration()
            + self.final_timeout
            + settle
            + Duration::from_secs(2)
    }
}

// ---------------------------------------------------------------------------------------
// The session
// ---------------------------------------------------------------------------------------

/// Timings of one session beyond what goes into details, for the benchmark.
#[derive(Debug, Clone, Default)]
pub struct SessionStats {
    /// Per frame: sent (write returned) minus its absolute deadline.
    pub lateness: Vec<Duration>,
    /// When the last audio frame was sent.
    pub last_frame_at: Option<Instant>,
    /// When the final transcript was known.
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

/// What has been heard so far.
#[derive(Default)]
struct Heard {
    finals: Vec<String>,
    interim: String,
    segments: Vec<Segment>,
    interim_count: u32,
    final_count: u32,
    first_result: Option<Instant>,
    /// Last time the (final) transcript changed.
    last_change: Option<Instant>,
    /// Last final result (any text) — Deepgram's flush answer may be empty.
    last_final: Option<Instant>,
}

impl Heard {
    fn final_text(&self) -> String {
        let parts = self
            .finals
            .iter()
            .map(String::as_str)
            .chain(self.segments.iter().map(|s| s.text.as_str()));
        join_words(parts)
    }
    /// Everything heard, interim included (for messages).
    fn so_far(&self) -> String {
        join_words([self.final_text().as_str(), self.interim.as_str()])
    }
}

fn join_words<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    parts
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// How the wait ended.
enum End {
    /// The server said it was complete (Metadata, close 1000, from_finalize, settled).
    Complete(&'static str),
    /// `final_timeout` passed after the audio.
    FinalTimeout,
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

    /// One session, with the raw timings the benchmark needs.
    pub async fn run_with_stats(&self) -> (Attempt, SessionStats) {
        let mut a = Attempt::new();
        let mut stats = SessionStats::default();
        let t0 = Instant::now();
        let deadline = t0 + self.timeout;
        let s = &self.spec;
        a.detail("dialect", s.dialect.name());

        let c = match wsock::connect(&self.target, s.connect_timeout.min(self.timeout)).await {
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
        let connected_at = Instant::now();
        let result = self
            .session(&mut ws, connected_at, deadline, &mut a, &mut stats)
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
        match result {
            Ok(closed_by_server) => {
                if !closed_by_server {
                    wsock::close_quietly(&mut ws, 1000).await;
                }
            }
            Err(f) => {
                f.apply(&mut a);
                wsock::close_quietly(&mut ws, 1000).await;
            }
        }
        (a, stats)
    }

    /// Stream, wait, judge. `Ok(true)` when the server already closed the socket.
    async fn session(
        &self,
        ws: &mut Ws,
        connected_at: Instant,
        deadline: Instant,
        a: &mut Attempt,
        stats: &mut SessionStats,
    ) -> Result<bool, Failure> {
        let s = &self.spec;
        let frames = &s.frames;
        let n = frames.len();
        let per_frame = s.chunk.div_f64(s.speed);
        let start = connected_at + s.idle_before;
        let keepalive_msg = s.dialect.keepalive_message();
        let mut heard = Heard::default();
        let mut next = 0usize;
        let mut first_frame_at: Option<Instant> = None;
        let mut last_sent = connected_at;
        let mut degraded: Option<String> = None;
        let mut server_error: Option<String> = None;
        let mut closed_by_server = false;
        let timeout = self.timeout;

        let end = loop {
            let now = Instant::now();
            let audio_done = stats.last_frame_at;
            let send_at = (next < n).then(|| start + per_frame.mul_f64(next as f64));
            // Every other timer, soonest first.
            let mut timer = deadline;
            // A keepalive is due only when no audio frame is due first: before the stream
            // starts (`idle_before`) and after it ends.
            let keepalive_at = match (keepalive_msg, s.keepalive) {
                (Some(_), Some(k)) if send_at.map_or(true, |t| t > last_sent + k) => {
                    Some(last_sent + k)
                }
                _ => None,
            };
            if let Some(k) = keepalive_at {
                timer = timer.min(k);
            }
            let final_deadline = audio_done.map(|t| t + s.final_timeout);
            if let Some(f) = final_deadline {
                timer = timer.min(f);
            }
            let settle_at = match (audio_done, heard.last_change) {
                (Some(done), Some(ch)) if s.dialect.settles() && !heard.final_text().is_empty() => {
                    Some(ch.max(done) + s.settle)
                }
                _ => None,
            };
            if let Some(t) = settle_at {
                timer = timer.min(t);
            }

            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(send_at.unwrap_or(deadline).into()), if send_at.is_some() => {
                    let due = send_at.unwrap_or(now);
                    let frame = frames[next].clone();
                    self.send(ws, Message::Binary(frame), deadline, connected_at, &heard,
                        &format!("audio frame {} of {n}", next + 1)).await?;
                    let sent = Instant::now();
                    stats.lateness.push(sent.saturating_duration_since(due));
                    last_sent = sent;
                    first_frame_at.get_or_insert(sent);
                    next += 1;
                    if next == n {
                        stats.last_frame_at = Some(sent);
                        for m in s.dialect.end_messages() {
                            self.send(ws, Message::text(m.to_string()), deadline, connected_at, &heard,
                                "the end-of-stream message").await?;
                        }
                        last_sent = Instant::now();
                    }
                }
                msg = ws.next() => {
                    let at = Instant::now();
                    let since = at.saturating_duration_since(connected_at);
                    let msg = match msg {
                        None => {
                            return Err(closed_failure(None, "the connection ended without a close frame", since, &heard));
                        }
                        Some(Err(e)) => {
                            let mut f = wsock::read_error(&e, s.max_message_bytes, since);
                            if f.class == ErrorClass::WsClosed {
                                f.message.push_str(&heard_suffix(&heard));
                            }
                            return Err(f);
                        }
                        Some(Ok(m)) => m,
                    };
                    let text = match msg {
                        Message::Text(t) => t,
                        Message::Binary(b) => {
                            if matches!(s.dialect, Dialect::Generic { .. }) {
                                continue;
                            }
                            return Err(Failure::new(ErrorClass::Protocol, format!(
                                "server sent an unexpected binary message ({} bytes) after {}", b.len(), secs(since))));
                        }
                        Message::Close(frame) => {
                            closed_by_server = true;
                            let (code, reason_text) = close_text(&frame);
                            a.detail("close_code", code);
                            a.detail("close_reason", frame.as_ref().map(|f| f.reason.to_string()).unwrap_or_default());
                            if code == 1000 && audio_done.is_some() {
                                break End::Complete("close 1000");
                            }
                            let what = format!("server closed the socket with {reason_text}");
                            let mut f = closed_failure(Some(code), &what, since, &heard);
                            if let Some(e) = &server_error {
                                f.message.push_str(&format!(" (server error: {e})"));
                            }
                            if audio_done.is_none() {
                                f.message.push_str(&format!(" while audio was streaming (frame {next} of {n} sent)"));
                            }
                            return Err(f);
                        }
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                    };
                    let ev = s.dialect.parse(&text).map_err(|why| Failure::new(ErrorClass::Protocol, format!(
                        "server sent a malformed message after {} ({why}): {}", secs(since), excerpt(&text, 120))))?;
                    match ev {
                        Event::Ignore => {}
                        Event::Results { text, is_final, from_finalize, request_id } => {
                            if stats.request_id.is_none() {
                                stats.request_id = request_id;
                            }
                            if !text.trim().is_empty() {
                                heard.first_result.get_or_insert(at);
                            }
                            if is_final {
                                heard.final_count += 1;
                                heard.last_final = Some(at);
                                if !text.trim().is_empty() {
                                    if matches!(s.dialect, Dialect::Generic { replace: true, .. }) {
                                        heard.finals.clear();
                                    }
                                    heard.finals.push(text);
                                    heard.last_change = Some(at);
                                }
                                heard.interim.clear();
                                if from_finalize && audio_done.is_some()
                                    && matches!(s.dialect, Dialect::Deepgram { end: DeepgramEnd::Finalize })
                                {
                                    break End::Complete("from_finalize result");
                                }
                            } else {
                                heard.interim_count += 1;
                                heard.interim = text;
                            }
                        }
                        Event::Segments(segs) => {
                            let mut changed = false;
                            for seg in segs {
                                if !seg.text.trim().is_empty() {
                                    heard.first_result.get_or_insert(at);
                                }
                                match seg.id.as_ref().and_then(|id| heard.segments.iter_mut().find(|s| s.id.as_ref() == Some(id))) {
                                    Some(old) if old.text == seg.text => {}
                                    Some(old) => { old.text = seg.text; changed = true; }
                                    None => { heard.segments.push(seg); changed = true; }
                                }
                            }
                            heard.final_count += 1;
                            if changed {
                                heard.last_change = Some(at);
                                heard.last_final = Some(at);
                            }
                        }
                        Event::Status { status, text } => {
                            let line = if text.is_empty() { status.clone() } else { format!("{status}: {text}") };
                            a.detail("service_status", line.clone());
                            match status.as_str() {
                                "stt_degraded" => {
                                    degraded.get_or_insert(format!("server reported service_status {line} after {}", secs(since)));
                                }
                                "stt_failed" => {
                                    return Err(Failure::new(ErrorClass::SttFailed, format!(
                                        "server reported service_status {line} after {}{}", secs(since), heard_suffix(&heard))));
                                }
                                _ => {}
                            }
                        }
                        Event::Done { request_id } => {
                            if stats.request_id.is_none() {
                                stats.request_id = request_id;
                            }
                            if audio_done.is_some() {
                                heard.last_final.get_or_insert(at);
                                break End::Complete("Metadata");
                            }
                        }
                        Event::ServerError(e) => {
                            a.detail("server_error", e.clone());
                            server_error = Some(e);
                        }
                    }
                }
                _ = tokio::time::sleep_until(timer.into()) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let phase = match audio_done {
                            None if first_frame_at.is_none() => "before the audio started".to_string(),
                            None => format!("while streaming audio (frame {next} of {n} sent)"),
                            Some(t) => format!("while waiting for the final transcript ({} after the last audio frame)",
                                secs(now.saturating_duration_since(t))),
                        };
                        return Err(Failure::new(ErrorClass::Timeout, format!("the {} timeout hit {phase}{}", human(timeout), heard_suffix(&heard))));
                    }
                    if settle_at.is_some_and(|t| now >= t) {
                        break End::Complete("settled");
                    }
                    if final_deadline.is_some_and(|t| now >= t) {
                        break End::FinalTimeout;
                    }
                    if keepalive_at.is_some_and(|t| now >= t) {
                        if let Some(m) = keepalive_msg {
                            self.send(ws, Message::text(m.to_string()), deadline, connected_at, &heard, "a keepalive").await?;
                            last_sent = Instant::now();
                            a.detail("keepalives", a.details.get("keepalives").and_then(Value::as_u64).unwrap_or(0) + 1);
                        }
                    }
                }
            }
        };

        // Deepgram closes right after Metadata: take the close code if it comes promptly.
        if let End::Complete("Metadata") = end {
            let wait = tokio::time::sleep(Duration::from_millis(300));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    m = ws.next() => match m {
                        Some(Ok(Message::Close(frame))) => {
                            closed_by_server = true;
                            a.detail("close_code", close_text(&frame).0);
                            a.detail("close_reason", frame.as_ref().map(|f| f.reason.to_string()).unwrap_or_default());
                            break;
                        }
                        Some(Ok(_)) => continue,
                        _ => break,
                    }
                }
            }
        }

        // Judge.
        let last_frame = stats.last_frame_at.unwrap_or(connected_at);
        a.detail("frames", n as u64);
        a.detail("audio_ms", super::ms(s.audio.duration()));
        a.detail("interim_results", heard.interim_count);
        a.detail("final_results", heard.final_count);
        if let (Some(first), Some(fr)) = (first_frame_at, heard.first_result) {
            a.phase("first_result", fr.saturating_duration_since(first));
        }
        let text = heard.final_text();
        a.detail("text", text.clone());
        if let Some(t) = &s.expect.transcript {
            a.detail("expected", t.clone());
        }
        let after = secs(s.final_timeout);
        let (judged, interim_only) = match end {
            End::Complete(how) => {
                if text.is_empty() {
                    let mut msg = format!(
                        "no transcript: the stream ended ({how}) {} after the last audio frame with nothing heard",
                        secs(Instant::now().saturating_duration_since(last_frame))
                    );
                    if !heard.interim.trim().is_empty() {
                        msg = format!(
                            "no final transcript ({how}); only interim results: {:?}",
                            heard.interim.trim()
                        );
                    }
                    return Err(Failure::new(ErrorClass::NoTranscript, msg));
                }
                let final_at = heard.last_final.unwrap_or_else(Instant::now);
                stats.final_at = Some(final_at);
                a.phase("final", final_at.saturating_duration_since(last_frame));
                a.detail("completed_by", how);
                (text, false)
            }
            End::FinalTimeout => {
                if !text.is_empty() {
                    // Finals arrived but the server never said it was done (no Metadata /
                    // close): the transcript is judged, the run is at best degraded.
                    let final_at = heard.last_final.unwrap_or(last_frame);
                    stats.final_at = Some(final_at);
                    a.phase("final", final_at.saturating_duration_since(last_frame));
                    degraded.get_or_insert(format!(
                        "the server did not finish the stream (no Metadata or close) {after} after the last audio frame"
                    ));
                    (text, false)
                } else if !heard.interim.trim().is_empty() {
                    (heard.interim.trim().to_string(), true)
                } else {
                    let msg = if heard.final_count > 0 {
                        format!(
                            "no transcript {after} after the last audio frame (only empty results)"
                        )
                    } else {
                        format!(
                            "no transcript {after} after the last audio frame (no results at all)"
                        )
                    };
                    return Err(Failure::new(ErrorClass::NoTranscript, msg));
                }
            }
        };
        if interim_only {
            a.detail("text", judged.clone());
        }

        if let Some(expected) = &s.expect.transcript {
            let w = wer::wer(expected, &judged);
            a.detail("wer", (w * 1000.0).round() / 1000.0);
            if w > s.expect.max_wer + 1e-9 {
                // Partial interim text that never finalised is a missing transcript, not a
                // misheard one.
                if interim_only {
                    return Err(Failure::new(
                        ErrorClass::NoTranscript,
                        format!(
                            "no final transcript {after} after the last audio frame; interim results only \
                             ({judged:?}, WER {w:.2} against {expected:?})"
                        ),
                    ));
                }
                return Err(Failure::new(
                    ErrorClass::TranscriptMismatch,
                    format!(
                        "expected {expected:?} but heard {judged:?} (WER {w:.2} > {:.2})",
                        s.expect.max_wer
                    ),
                ));
            }
        }
        for phrase in &s.expect.contains {
            if !wer::contains_phrase(&judged, phrase) {
                return Err(Failure::new(
                    ErrorClass::TranscriptMismatch,
                    format!("heard {judged:?}, which does not contain {phrase:?}"),
                ));
            }
        }
        if interim_only {
            a.degrade(
                ErrorClass::InterimOnly,
                format!("only interim results; no final transcript {after} after the last audio frame (heard {judged:?})"),
            );
        }
        if let Some(d) = degraded {
            let class = if d.starts_with("server reported service_status") {
                ErrorClass::SttDegraded
            } else {
                ErrorClass::Timeout
            };
            a.degrade(class, d);
        }
        Ok(closed_by_server)
    }

    async fn send(
        &self,
        ws: &mut Ws,
        m: Message,
        deadline: Instant,
        connected_at: Instant,
        heard: &Heard,
        what: &str,
    ) -> Result<(), Failure> {
        match tokio::time::timeout_at(deadline.into(), ws.send(m)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                // The peer may have closed with a reason we have not read yet: look briefly.
                let since = connected_at.elapsed();
                if let Ok(Some(Ok(Message::Close(frame)))) =
                    tokio::time::timeout(Duration::from_millis(200), ws.next()).await
                {
                    let (code, text) = close_text(&frame);
                    let what = format!("server closed the socket with {text}");
                    return Err(closed_failure(Some(code), &what, since, heard));
                }
                let f = wsock::read_error(&e, self.spec.max_message_bytes, since);
                Err(Failure::new(
                    f.class,
                    format!("cannot send {what}: {}", f.message),
                ))
            }
            Err(_) => Err(Failure::new(
                ErrorClass::Timeout,
                format!(
                    "the {} timeout hit while sending {what} (is the server reading?)",
                    human(self.timeout)
                ),
            )),
        }
    }
}

/// `server closed the socket with 1011 NET-0001 after 10.2 s without a transcript`.
fn closed_failure(code: Option<u16>, what: &str, since: Duration, heard: &Heard) -> Failure {
    let mut f = Failure::new(
        ErrorClass::WsClosed,
        format!("{what} after {}{}", secs(since), heard_suffix(heard)),
    );
    if let Some(c) = code {
        f.details.push(("close_code", Value::from(c)));
    }
    f
}

fn heard_suffix(heard: &Heard) -> String {
    let so_far = heard.so_far();
    if so_far.is_empty() {
        " without a transcript".to_string()
    } else {
        format!(" (heard so far: {:?})", excerpt(&so_far, 120))
    }
}
