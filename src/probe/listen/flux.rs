//! The Deepgram Flux dialect (`wss://api.deepgram.com/v2/listen`, `model=flux-general-en`):
//! turn-based STT for voice agents, per Deepgram's published AsyncAPI spec (`listen.v2`).
//! `Token` auth as v1; the server says `Connected` (with the request id), then `TurnInfo`
//! messages whose `event` is `StartOfTurn`, `Update`, `EagerEndOfTurn`, `TurnResumed` or
//! `EndOfTurn`, each carrying the turn's transcript so far; the utterance is the
//! `EndOfTurn` transcripts in turn order. `ConfigureSuccess` / `ConfigureFailure` answer a
//! client `Configure`; a `FatalError` (type `Error` in older specs) precedes the close.
//! The client sends binary audio and, at the end, `CloseStream`: the server flushes the last
//! turn and closes with 1000. There is no v1-style `KeepAlive`.

use serde_json::Value;

use super::{Event, Wire};

/// Flush the last turn and close.
pub const CLOSE_STREAM: &str = r#"{"type":"CloseStream"}"#;

/// The Flux dialect has no settings of its own (turn thresholds go in the URL query).
#[derive(Debug, Clone, Default)]
pub struct Settings;

impl Wire for Settings {
    fn name(&self) -> &'static str {
        "flux"
    }
    fn parse(&self, text: &str) -> Result<Event, String> {
        parse(text)
    }
    fn end_messages(&self) -> Vec<&str> {
        vec![CLOSE_STREAM]
    }
    /// The server says when it is done: it closes with 1000 after the last turn.
    fn settles(&self) -> bool {
        false
    }
    fn unfinished(&self) -> &'static str {
        "the server did not finish the stream (no close after CloseStream)"
    }
    fn request_id_header(&self) -> &'static str {
        super::deepgram::REQUEST_ID_HEADER
    }
    /// Raw PCM is only read when the URL says what it is.
    fn needs_declared_format(&self) -> bool {
        true
    }
}

fn text_of(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Read one server text message.
pub fn parse(text: &str) -> Result<Event, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(_) = v else {
        return Err("not a JSON object".into());
    };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    Ok(match kind {
        "Connected" => Event::Connected {
            request_id: text_of(&v, "request_id"),
        },
        "TurnInfo" => {
            let transcript = match v.get("transcript") {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => String::new(),
                Some(other) => return Err(format!("transcript is {other}, not a string")),
            };
            let event = v.get("event").and_then(Value::as_str).unwrap_or("");
            Event::Results {
                text: transcript,
                // Only the end of a turn is final; an eager end may still resume.
                is_final: event == "EndOfTurn",
                from_finalize: false,
                request_id: text_of(&v, "request_id"),
            }
        }
        "FatalError" | "Error" | "ConfigureFailure" => {
            let what = [text_of(&v, "code"), text_of(&v, "description")]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ");
            Event::ServerError(if what.is_empty() {
                kind.to_string()
            } else {
                format!("{kind} {what}")
            })
        }
        // ConfigureSuccess and anything newer: nothing to judge.
        _ => Event::Ignore,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(
            parse(r#"{"type":"Connected","request_id":"r-1","sequence_id":0}"#).unwrap(),
            Event::Connected {
                request_id: Some("r-1".into())
            }
        );
        let turn = |event: &str| {
            format!(
                r#"{{"type":"TurnInfo","request_id":"r-1","sequence_id":3,"event":"{event}","turn_index":0,"audio_window_start":0.0,"audio_window_end":1.5,"transcript":"testing one","words":[{{"word":"testing","confidence":0.9}}],"end_of_turn_confidence":0.7}}"#
            )
        };
        for (event, fin) in [
            ("StartOfTurn", false),
            ("Update", false),
            ("EagerEndOfTurn", false),
            ("TurnResumed", false),
            ("EndOfTurn", true),
        ] {
            assert_eq!(
                parse(&turn(event)).unwrap(),
                Event::Results {
                    text: "testing one".into(),
                    is_final: fin,
                    from_finalize: false,
                    request_id: Some("r-1".into())
                },
                "{event}"
            );
        }
        assert_eq!(
            parse(r#"{"type":"FatalError","sequence_id":4,"code":"INTERNAL_SERVER_ERROR","description":"model crashed"}"#)
                .unwrap(),
            Event::ServerError("FatalError INTERNAL_SERVER_ERROR: model crashed".into())
        );
        assert_eq!(
            parse(r#"{"type":"Error","code":"X"}"#).unwrap(),
            Event::ServerError("Error X".into())
        );
        assert_eq!(
            parse(r#"{"type":"ConfigureSuccess"}"#).unwrap(),
            Event::Ignore
        );
        assert!(parse(r#"{"type":"TurnInfo","transcript":7}"#).is_err());
        assert!(parse("[1]").is_err());
        assert!(parse("nope").is_err());
    }
}
