//! The Omi dialect (`/v4/listen`): `Bearer` auth, raw audio frames, transcripts as a bare
//! JSON array of segments (or `{"type":"segments","segments":[…]}`), `ping` text frames to
//! ignore, and `service_status` events (`ready`, `stt_degraded`, `stt_recovered`,
//! `stt_failed`). There is no "final" flag: a run ends when the transcript has been stable
//! for the configured settle time after the audio. Segment merges arrive as an updated
//! segment (same `id`) plus `{"type":"segments_deleted","segment_ids":[…]}`.

use serde_json::Value;

use super::{Event, Segment, Wire};

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
            Some("service_status") => Ok(Event::Status {
                status: m
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                text: m
                    .get("status_text")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| m.get("metadata").map(Value::to_string))
                    .unwrap_or_default(),
            }),
            // Memory, translation and speaker events are not about the transcript.
            _ => Ok(Event::Ignore),
        },
        other => Err(format!("unexpected JSON {}", other)),
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
        out.push(Segment { id, text });
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
        let seg = |id: &str, t: &str| Segment {
            id: Some(id.into()),
            text: t.into(),
        };
        assert_eq!(
            parse(r#"[{"id":"a","text":"hello","speaker":"SPEAKER_0","start":0.1,"end":0.5}]"#)
                .unwrap(),
            Event::Segments(vec![seg("a", "hello")])
        );
        assert_eq!(
            parse(r#"{"type":"segments","segments":[{"id":"b","text":"world"}]}"#).unwrap(),
            Event::Segments(vec![seg("b", "world")])
        );
        assert_eq!(
            parse(
                r#"{"type":"service_status","status":"stt_degraded","status_text":"batch mode"}"#
            )
            .unwrap(),
            Event::Status {
                status: "stt_degraded".into(),
                text: "batch mode".into()
            }
        );
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
