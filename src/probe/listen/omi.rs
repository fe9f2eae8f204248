//! The Omi dialect (`/v4/listen`): `Bearer` auth, raw audio frames, transcripts as a bare
//! JSON array of segments (or `{"type":"segments","segments":[…]}`), `ping` text frames to
//! ignore, and `service_status` events (`ready`, `stt_degraded`, `stt_recovered`,
//! `stt_failed`). There is no "final" flag: a run ends when the transcript has been stable
//! for the configured settle time after the audio. Segment merges arrive as an updated
//! segment (same `id`) plus `{"type":"segments_deleted","segment_ids":[…]}`.

use std::time::Duration;

use serde_json::Value;

use super::{Event, Segment, Wire};
use crate::config::duration::human;

/// Batch interval assumed when `stt_degraded` says `batch_mode` without an interval
/// (Omi's default, PR #6059).
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_secs(30);
/// Longest batch interval believed: a server claiming more does not stretch a run further.
pub const MAX_BATCH_INTERVAL: Duration = Duration::from_secs(300);

/// The Omi dialect has no settings of its own.
#[derive(Debug, Clone, Default)]
pub struct Settings;

impl Wire for Settings {
    fn name(&self) -> &'static str {
        "omi"
    }
    fn parse(&self, text: &str) -> Result<Event, String> {
        parse(text)
    }
    /// Omi has no final flag and no end-of-stream message: the transcript is final once it
    /// has been unchanged for `settle` (or the server closes with 1000).
    fn settles(&self) -> bool {
        true
    }
    fn unfinished(&self) -> &'static str {
        "the transcript never settled"
    }
}

/// Read one server text message.
pub fn parse(text: &str) -> Result<Event, String> {
    if text.trim() == "ping" {
        return Ok(Event::Ignore);
    }
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    match &v {
        Value::Array(items) => segments(items),
        Value::Object(m) => match m.get("type").and_then(Value::as_str) {
            Some("segments") => match m.get("segments") {
                Some(Value::Array(items)) => segments(items),
                _ => Err("segments message without a segments array".into()),
            },
            Some("segments_deleted") => match m.get("segment_ids") {
                Some(Value::Array(ids)) => Ok(Event::SegmentsDeleted(
                    ids.iter().filter_map(segment_id).collect(),
                )),
                _ => Err("segments_deleted message without a segment_ids array".into()),
            },
            Some("service_status") => Ok(service_status(m)),
            // Memory, translation and speaker events are not about the transcript.
            _ => Ok(Event::Ignore),
        },
        other => Err(format!("unexpected JSON {}", other)),
    }
}

/// `{"type":"service_status","status","status_text","metadata":{"batch_mode",
/// "batch_interval_seconds","degraded_duration_s"}}`. Metadata that is missing or malformed
/// is read as absent: the status word alone still counts.
fn service_status(m: &serde_json::Map<String, Value>) -> Event {
    let meta = m.get("metadata");
    let num = |k: &str| meta.and_then(|md| md.get(k)).and_then(Value::as_f64);
    let secs =
        |v: f64, max: f64| (v.is_finite() && v > 0.0).then(|| Duration::from_secs_f64(v.min(max)));
    let batch = match meta.and_then(|md| md.get("batch_mode")) {
        Some(Value::Bool(true)) => Some(
            num("batch_interval_seconds")
                .and_then(|v| secs(v, MAX_BATCH_INTERVAL.as_secs_f64()))
                .unwrap_or(DEFAULT_BATCH_INTERVAL),
        ),
        _ => None,
    };
    let text = match (m.get("status_text").and_then(Value::as_str), batch) {
        (Some(t), Some(b)) => format!("{t} (batch mode: results every {})", human(b)),
        (Some(t), None) => t.to_string(),
        (None, Some(b)) => format!("batch mode: results every {}", human(b)),
        (None, None) => meta.map(Value::to_string).unwrap_or_default(),
    };
    Event::Status {
        status: m
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        text,
        batch,
        degraded_for: num("degraded_duration_s").and_then(|v| secs(v, 86_400.0)),
    }
}

fn segments(items: &[Value]) -> Result<Event, String> {
    let mut out = Vec::with_capacity(items.len());
    for (i, s) in items.iter().enumerate() {
        let Value::Object(m) = s else {
            return Err(format!("segment {i} is not an object"));
        };
        let text = match m.get("text") {
            Some(Value::String(t)) => t.clone(),
            _ => return Err(format!("segment {i} has no text")),
        };
        let id = m.get("id").and_then(segment_id);
        let start = m
            .get("start")
            .and_then(Value::as_f64)
            .filter(|s| s.is_finite());
        out.push(Segment { id, text, start });
    }
    Ok(Event::Segments(out))
}

fn segment_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(parse("ping").unwrap(), Event::Ignore);
        let seg = |id: &str, t: &str, start: Option<f64>| Segment {
            id: Some(id.into()),
            text: t.into(),
            start,
        };
        assert_eq!(
            parse(r#"[{"id":"a","text":"hello","speaker":"SPEAKER_0","start":0.1,"end":0.5}]"#)
                .unwrap(),
            Event::Segments(vec![seg("a", "hello", Some(0.1))])
        );
        assert_eq!(
            parse(r#"{"type":"segments","segments":[{"id":"b","text":"world"}]}"#).unwrap(),
            Event::Segments(vec![seg("b", "world", None)])
        );
        assert_eq!(
            parse(
                r#"{"type":"service_status","status":"stt_degraded","status_text":"batch mode"}"#
            )
            .unwrap(),
            Event::Status {
                status: "stt_degraded".into(),
                text: "batch mode".into(),
                batch: None,
                degraded_for: None,
            }
        );
        assert_eq!(
            parse(r#"{"type":"service_status","status":"stt_degraded","metadata":{"batch_mode":true,"batch_interval_seconds":30}}"#)
                .unwrap(),
            Event::Status {
                status: "stt_degraded".into(),
                text: "batch mode: results every 30s".into(),
                batch: Some(Duration::from_secs(30)),
                degraded_for: None,
            }
        );
        // Defensive: no interval → Omi's default; nonsense → capped or absent.
        for (meta, want) in [
            (r#"{"batch_mode":true}"#, Some(DEFAULT_BATCH_INTERVAL)),
            (
                r#"{"batch_mode":true,"batch_interval_seconds":1e9}"#,
                Some(MAX_BATCH_INTERVAL),
            ),
            (
                r#"{"batch_mode":true,"batch_interval_seconds":-3}"#,
                Some(DEFAULT_BATCH_INTERVAL),
            ),
            (r#"{"batch_mode":false,"batch_interval_seconds":30}"#, None),
            (r#""weird""#, None),
        ] {
            let m =
                format!(r#"{{"type":"service_status","status":"stt_degraded","metadata":{meta}}}"#);
            let Event::Status { batch, .. } = parse(&m).unwrap() else {
                panic!("{m}");
            };
            assert_eq!(batch, want, "{m}");
        }
        let Event::Status { degraded_for, .. } = parse(
            r#"{"type":"service_status","status":"stt_recovered","metadata":{"degraded_duration_s":42.5}}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(degraded_for, Some(Duration::from_millis(42_500)));
        assert_eq!(
            parse(r#"{"type":"memory_created"}"#).unwrap(),
            Event::Ignore
        );
        assert_eq!(
            parse(r#"{"type":"segments_deleted","segment_ids":["a",7]}"#).unwrap(),
            Event::SegmentsDeleted(vec!["a".into(), "7".into()])
        );
        assert!(parse(r#"{"type":"segments_deleted"}"#).is_err());
        assert!(parse("{oops").is_err());
        assert!(parse(r#"[{"id":"a"}]"#).is_err());
        assert!(parse("42").is_err());
    }
}
