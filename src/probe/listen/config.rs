//! The `kind = "listen"` probe file: its keys ([`ListenFile`]), the closed sets among them
//! (serde enums), and the validated [`ListenSpec`] a run uses. Parse → validate → build;
//! `watchpost validate` runs all of it (audio included), nothing here touches the network.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_tungstenite::tungstenite::Bytes;

use super::audio::{self, Audio};
use super::{deepgram, flux, generic, omi, wer, Dialect};
use crate::config::{duration::human, Dur, Errors, Interp, Rest, SpanError};
use crate::probe::websocket as wsock;

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

/// Longest expected transcript, in words after normalisation: the WER work of a run is
/// (expected words × heard words), and the heard side is capped by the transcript cap.
pub const MAX_EXPECTED_WORDS: usize = 2000;

/// `dialect`: which wire protocol the socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DialectName {
    Deepgram,
    Flux,
    Omi,
    Generic,
}

impl DialectName {
    const NAMES: &'static [&'static str] = &["deepgram", "flux", "omi", "generic"];
    pub fn as_str(self) -> &'static str {
        match self {
            DialectName::Deepgram => "deepgram",
            DialectName::Flux => "flux",
            DialectName::Omi => "omi",
            DialectName::Generic => "generic",
        }
    }
}

/// `end` (deepgram): how a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeepgramEnd {
    /// CloseStream → final results → Metadata → close 1000.
    #[default]
    CloseStream,
    /// Finalize → `from_finalize` final results; the socket stays open.
    Finalize,
}

impl DeepgramEnd {
    const NAMES: &'static [&'static str] = &["close_stream", "finalize"];
}

/// `accumulate` (generic): what a final result does to the transcript.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Accumulate {
    /// Finals are consecutive pieces of the utterance.
    #[default]
    Append,
    /// Each final is the whole utterance so far.
    Replace,
}

impl Accumulate {
    const NAMES: &'static [&'static str] = &["append", "replace"];
}

/// serde words an unknown variant as "unknown variant `x`, expected one of `a`, `b`": say
/// which key it was, in the words every other config error uses. The key is known by its
/// set of values (the three sets are disjoint).
fn closed_set_error(mut e: SpanError) -> SpanError {
    let Some((value, tail)) = e
        .message
        .strip_prefix("unknown variant `")
        .and_then(|r| r.split_once("`, expected "))
    else {
        return e;
    };
    for (key, names) in [
        ("dialect", DialectName::NAMES),
        ("end", DeepgramEnd::NAMES),
        ("accumulate", Accumulate::NAMES),
    ] {
        let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
        let serde_list = match quoted.len() {
            2 => format!("{} or {}", quoted[0], quoted[1]),
            _ => format!("one of {}", quoted.join(", ")),
        };
        if tail == serde_list {
            e.message = format!("unknown {key} {value:?} (expected {})", names.join(", "));
            break;
        }
    }
    e
}

/// JSON Schema of this kind's keys (see `crate::probe::KIND_SCHEMAS`).
pub fn schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    <ListenFile as schemars::JsonSchema>::json_schema(g)
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    /// Wire dialect: `deepgram`, `omi` or `generic`.
    // Required, but read as an option: a misspelt dialect must not hide the file's other
    // problems (the builder reports a missing one).
    #[schemars(with = "DialectName", required)]
    dialect: Option<toml::Spanned<DialectName>>,
    /// ws:// or wss:// URL of the realtime endpoint, query included
    /// (`encoding=linear16&sample_rate=16000&channels=1` for Deepgram).
    #[schemars(with = "Interp")]
    url: toml::Spanned<Interp>,
    /// Upgrade request headers, e.g. `Authorization = "Token ${DEEPGRAM_API_KEY}"`.
    #[serde(default)]
    headers: BTreeMap<String, Interp>,
    /// Subprotocols offered in `Sec-WebSocket-Protocol`.
    #[serde(default)]
    subprotocols: Vec<String>,
    /// WAV file (PCM 16-bit), relative to the probe file.
    #[schemars(with = "String")]
    audio: toml::Spanned<String>,
    /// Send only this channel (0-based) of a multichannel file, as mono.
    channel: Option<u16>,
    /// Sample rate the server expects when the URL has no `sample_rate=`.
    #[schemars(with = "Option<u32>")]
    sample_rate: Option<toml::Spanned<u32>>,
    /// Channel count the server expects when the URL has no `channels=`.
    #[schemars(with = "Option<u16>")]
    channels: Option<toml::Spanned<u16>>,
    /// Expected transcript (default: the audio's entry in `manifest.toml` next to it).
    #[schemars(with = "Option<String>")]
    transcript: Option<toml::Spanned<String>>,
    /// Highest word error rate accepted, after normalisation (0.0–1.0).
    #[serde(default = "default_max_wer")]
    #[schemars(with = "f64")]
    max_wer: toml::Spanned<f64>,
    /// Phrases that must each occur in the transcript (after normalisation).
    #[serde(default)]
    contains: Vec<String>,
    /// Audio per frame (10ms–1s).
    #[serde(default = "default_chunk")]
    #[schemars(with = "Dur")]
    chunk: toml::Spanned<Dur>,
    /// Pace: 1.0 = real time, 2.0 = twice as fast (0.1–20).
    #[serde(default = "default_speed")]
    #[schemars(with = "f64")]
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
    /// How long after the last audio frame the final transcript may take (for omi and
    /// generic: until the transcript last changed; the settle wait comes on top).
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
    #[schemars(with = "Option<DeepgramEnd>")]
    end: Option<toml::Spanned<DeepgramEnd>>,
    /// Largest frame or message accepted from the server, in bytes; larger is `frame_too_large`.
    #[serde(default = "default_max_message_bytes")]
    max_message_bytes: usize,
    /// PEM file of extra CA certificates to trust, relative to the probe file.
    #[schemars(with = "Option<String>")]
    ca_file: Option<toml::Spanned<String>>,
    /// Upgrade response header holding the request id (default `dg-request-id` for
    /// deepgram, `x-request-id` otherwise).
    request_id_header: Option<String>,
    /// generic: dotted JSON path of the transcript text in a server message.
    #[schemars(with = "Option<String>")]
    transcript_path: Option<toml::Spanned<String>>,
    /// generic: dotted JSON path of the flag marking a final result (default: every result
    /// is final).
    #[schemars(with = "Option<String>")]
    final_path: Option<toml::Spanned<String>>,
    /// generic: dotted JSON path of an in-band error text.
    #[schemars(with = "Option<String>")]
    error_path: Option<toml::Spanned<String>>,
    /// generic: final results `append` (default) to the transcript or `replace` it.
    #[schemars(with = "Option<Accumulate>")]
    accumulate: Option<toml::Spanned<Accumulate>>,
    /// generic: text frames sent after the last audio frame (e.g. `['{"type":"CloseStream"}']`).
    #[schemars(with = "Option<Vec<Interp>>")]
    end_messages: Option<toml::Spanned<Vec<Interp>>>,
    /// generic: text frame sent as a keepalive while no audio flows.
    #[schemars(with = "Option<Interp>")]
    keepalive_message: Option<toml::Spanned<Interp>>,
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

fn only_for<T>(
    dialect: DialectName,
    want: DialectName,
    key: &str,
    v: &Option<toml::Spanned<T>>,
    errs: &mut Errors,
) {
    if let Some(s) = v.as_ref().filter(|_| dialect != want) {
        let hint = if key == "end" {
            " (generic uses end_messages)".to_string()
        } else {
            format!(" (this probe is {:?})", dialect.as_str())
        };
        errs.push(SpanError::at(
            s.span(),
            format!("{key} is only for dialect = {:?}{hint}", want.as_str()),
        ));
    }
}

/// The dialect and its settings; keys of another dialect are errors at their position.
/// Without a readable dialect there is nothing to check them against.
fn dialect(f: &ListenFile, errs: &mut Errors) -> Option<Dialect> {
    use DialectName as D;
    let dialect = f.dialect.as_ref()?;
    let name = *dialect.get_ref();
    only_for(
        name,
        D::Generic,
        "transcript_path",
        &f.transcript_path,
        errs,
    );
    only_for(name, D::Generic, "final_path", &f.final_path, errs);
    only_for(name, D::Generic, "error_path", &f.error_path, errs);
    only_for(name, D::Generic, "accumulate", &f.accumulate, errs);
    only_for(name, D::Generic, "end_messages", &f.end_messages, errs);
    only_for(
        name,
        D::Generic,
        "keepalive_message",
        &f.keepalive_message,
        errs,
    );
    only_for(name, D::Deepgram, "end", &f.end, errs);
    Some(match name {
        D::Deepgram => Dialect::Deepgram(deepgram::Settings {
            end: f.end.as_ref().map(|e| *e.get_ref()).unwrap_or_default(),
        }),
        D::Flux => Dialect::Flux(flux::Settings),
        D::Omi => Dialect::Omi(omi::Settings),
        D::Generic => {
            let Some(tp) = &f.transcript_path else {
                // An unreadable transcript_path has its own error.
                if errs.read("transcript_path") {
                    errs.push(SpanError::at(
                        dialect.span(),
                        "dialect = \"generic\" needs transcript_path (the dotted JSON path of the transcript text)",
                    ));
                }
                return None;
            };
            Dialect::Generic(generic::Settings {
                layout: generic::Layout {
                    transcript_path: tp.get_ref().clone(),
                    final_path: f.final_path.as_ref().map(|p| p.get_ref().clone()),
                    error_path: f.error_path.as_ref().map(|p| p.get_ref().clone()),
                },
                accumulate: f
                    .accumulate
                    .as_ref()
                    .map(|a| *a.get_ref())
                    .unwrap_or_default(),
                end_messages: f
                    .end_messages
                    .as_ref()
                    .map(|m| m.get_ref().iter().map(|s| s.to_string()).collect())
                    .unwrap_or_default(),
                keepalive_message: f
                    .keepalive_message
                    .as_ref()
                    .map(|k| k.get_ref().to_string()),
            })
        }
    })
}

/// `max_wer`, `chunk`, `speed`, `max_message_bytes` within their ranges; each one out of
/// range is recorded.
fn check_numbers(f: &ListenFile, errs: &mut Errors) {
    let max_wer = *f.max_wer.get_ref();
    if !(0.0..=1.0).contains(&max_wer) {
        errs.push(SpanError::at(
            f.max_wer.span(),
            format!("max_wer {max_wer} is not between 0.0 and 1.0"),
        ));
    }
    let chunk = f.chunk.get_ref().0;
    if chunk < Duration::from_millis(10) || chunk > Duration::from_secs(1) {
        errs.push(SpanError::at(
            f.chunk.span(),
            format!("chunk {} is not between 10ms and 1s", human(chunk)),
        ));
    }
    let speed = *f.speed.get_ref();
    if !(0.1..=20.0).contains(&speed) {
        errs.push(SpanError::at(
            f.speed.span(),
            format!("speed {speed} is not between 0.1 and 20"),
        ));
    }
    if f.max_message_bytes < 1024 {
        errs.push(SpanError::key(
            &["max_message_bytes"],
            "max_message_bytes must be at least 1024",
        ));
    }
}

/// Check the audio is what the URL (or `sample_rate`/`channels`) tells the server to
/// expect; each mismatch is recorded.
fn check_format(
    f: &ListenFile,
    audio: &Audio,
    url: &url::Url,
    dialect: Option<&Dialect>,
    errs: &mut Errors,
) {
    let query: BTreeMap<String, String> = url
        .query_pairs()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let shown = f.audio.get_ref();
    // The URL's value wins over the key; errors point at whichever declared it.
    let declared = |key: &str, from_key: Option<std::ops::Range<usize>>| match query.get(key) {
        Some(_) => f.url.span(),
        None => from_key.unwrap_or(f.url.span()),
    };
    let number = |key: &str| -> Result<Option<u64>, SpanError> {
        query
            .get(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    SpanError::at(
                        f.url.span(),
                        format!("url has {key}={v:?}, which is not a whole number"),
                    )
                })
            })
            .transpose()
    };
    let declared_rate = errs
        .check(number("sample_rate"))
        .flatten()
        .or(f.sample_rate.as_ref().map(|r| *r.get_ref() as u64));
    match declared_rate {
        Some(r) if r != audio.sample_rate as u64 => errs.push(SpanError::at(
            declared("sample_rate", f.sample_rate.as_ref().map(|r| r.span())),
            format!(
                "{shown} is {} Hz but the probe declares sample_rate={r}",
                audio.sample_rate
            ),
        )),
        None => {
            if let Some(d) = dialect.filter(|d| d.wire().needs_declared_format()) {
                errs.push(SpanError::at(
                    f.url.span(),
                    format!(
                        "{} needs encoding=linear16&sample_rate={}&channels={} in the url to read raw PCM",
                        d.name(),
                        audio.sample_rate,
                        audio.channels
                    ),
                ));
            }
        }
        _ => {}
    }
    let declared_channels = errs
        .check(number("channels"))
        .flatten()
        .or(f.channels.as_ref().map(|c| *c.get_ref() as u64));
    if let Some(c) = declared_channels.filter(|c| *c != audio.channels as u64) {
        let how = match f.channel {
            Some(ch) => format!("channel {ch} of {shown} is sent as 1 channel"),
            None if audio.channels > 1 => format!(
                "{shown} has {} channels (pick one with channel = 0)",
                audio.channels
            ),
            None => format!("{shown} has {} channel", audio.channels),
        };
        errs.push(SpanError::at(
            declared("channels", f.channels.as_ref().map(|c| c.span())),
            format!("{how} but the probe declares channels={c}"),
        ));
    }
    for (key, ok) in [
        ("encoding", ["linear16", "pcm16", "pcm_s16le"]),
        ("codec", ["pcm16", "linear16", "pcm_s16le"]),
    ] {
        if let Some(v) = query.get(key).filter(|v| !ok.contains(&v.as_str())) {
            errs.push(SpanError::at(
                f.url.span(),
                format!(
                    "url has {key}={v} but {shown} is sent as PCM 16-bit ({key}={})",
                    ok[0]
                ),
            ));
        }
    }
}

/// The expected transcript (from the file or the manifest) and phrases; `None` with its
/// problems recorded.
fn expectation(f: &ListenFile, audio_path: &Path, errs: &mut Errors) -> Option<Expectation> {
    let (transcript, span) = match &f.transcript {
        Some(t) => (Some(t.get_ref().clone()), t.span()),
        None => (
            errs.check(
                audio::manifest_transcript(audio_path)
                    .map_err(|e| SpanError::at(f.audio.span(), e)),
            )?,
            f.audio.span(),
        ),
    };
    let before = errs.len();
    if let Some(t) = &transcript {
        let words = wer::normalize(t).len();
        if words == 0 {
            errs.push(SpanError::at(span, "transcript has no words to compare"));
        } else if words > MAX_EXPECTED_WORDS {
            errs.push(SpanError::at(
                span,
                format!("transcript has {words} words; at most {MAX_EXPECTED_WORDS} are compared"),
            ));
        }
    }
    if f.contains
        .iter()
        .any(|p| wer::normalize(p).len() > MAX_EXPECTED_WORDS)
    {
        errs.push(SpanError::key(
            &["contains"],
            format!("a contains phrase has more than {MAX_EXPECTED_WORDS} words"),
        ));
    }
    if transcript.is_none() && f.contains.is_empty() {
        errs.push(SpanError::at(
            f.audio.span(),
            format!(
                "no expected transcript for {}: set transcript or contains, or list it in manifest.toml next to it",
                f.audio.get_ref()
            ),
        ));
    }
    (errs.len() == before).then(|| Expectation {
        transcript,
        max_wer: *f.max_wer.get_ref(),
        contains: f.contains.clone(),
    })
}

impl ListenSpec {
    /// Every problem of the file, each at its key; `budget` keys are checked against
    /// [`super::PHASES`]. What depends on a bad value (the audio's format against a bad
    /// URL, say) is left until that value is right.
    pub fn from_config(
        rest: Rest<'_>,
        dir: &Path,
        budget: &[toml::Spanned<String>],
    ) -> Result<Self, Errors> {
        let table = rest.span();
        let (f, errs) = rest.parse::<ListenFile>();
        let mut errs = errs.map(closed_set_error);
        let phases = super::PHASES.map(String::from);
        crate::probe::check_budget("listen", &phases, None, budget, &mut errs);
        let Some(f) = f else { return Err(errs) };
        if f.dialect.is_none() && errs.read("dialect") {
            errs.push(SpanError::at(
                table,
                format!(
                    "missing field `dialect` (expected one of {})",
                    DialectName::NAMES.join(", ")
                ),
            ));
        }
        let dialect = dialect(&f, &mut errs);
        let url = errs.check(wsock::validate_ws_url(&f.url));
        wsock::validate_headers(&f.headers, &mut errs);
        check_numbers(&f, &mut errs);
        let audio_path = dir.join(f.audio.get_ref());
        // The file is read as `channel` says, and judged against `sample_rate`/`channels`.
        let audio = if ["channel", "sample_rate", "channels"]
            .iter()
            .all(|k| errs.read(k))
        {
            errs.check(
                Audio::load(&audio_path, f.channel)
                    .map_err(|e| SpanError::at(f.audio.span(), e.to_string())),
            )
        } else {
            None
        };
        if let (Some(audio), Some(url)) = (&audio, &url) {
            check_format(&f, audio, url, dialect.as_ref(), &mut errs);
        }
        let expect = if errs.read("transcript") && errs.read("contains") {
            expectation(&f, &audio_path, &mut errs)
        } else {
            None
        };
        let ca_pem = errs.check(wsock::read_ca_file(dir, &f.ca_file));
        let (Some(dialect), Some(audio), Some(expect), Some(ca_pem)) =
            (dialect, audio, expect, ca_pem)
        else {
            return Err(errs);
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        let chunk = f.chunk.get_ref().0;
        let frames = audio.frames(chunk, f.lead_in.0, f.tail.0);
        let request_id_header = f
            .request_id_header
            .clone()
            .unwrap_or_else(|| dialect.wire().request_id_header().to_string())
            .to_ascii_lowercase();
        Ok(ListenSpec {
            dialect,
            url: f.url.get_ref().to_string(),
            headers: f.headers.into_iter().collect(),
            subprotocols: f.subprotocols,
            audio: Arc::new(audio),
            frames: Arc::new(frames),
            expect,
            chunk,
            speed: *f.speed.get_ref(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_set_errors_name_the_key_and_the_values() {
        for (msg, want) in [
            (
                "unknown variant `deepgramm`, expected one of `deepgram`, `flux`, `omi`, `generic`",
                "unknown dialect \"deepgramm\" (expected deepgram, flux, omi, generic)",
            ),
            (
                "unknown variant `flush`, expected `close_stream` or `finalize`",
                "unknown end \"flush\" (expected close_stream, finalize)",
            ),
            (
                "unknown variant `merge`, expected `append` or `replace`",
                "unknown accumulate \"merge\" (expected append, replace)",
            ),
            ("invalid type: integer `5`", "invalid type: integer `5`"),
        ] {
            let e = closed_set_error(SpanError::at(3..7, msg));
            assert_eq!(e.message, want);
            assert_eq!(e.span, Some(3..7), "the position is kept");
        }
    }
}
