//! The Deepgram live dialect (`wss://api.deepgram.com/v1/listen`): `Token` auth, `Results`
//! messages whose `is_final` transcripts concatenate into the utterance, `Metadata` after
//! `CloseStream`, `UtteranceEnd` / `SpeechStarted` events, `KeepAlive` while no audio flows.
//! Messages are read as loose JSON because fields come and go between API versions.

use std::time::Duration;

use serde_json::Value;

pub use super::config::DeepgramEnd;
use super::{Event, Wire};
use crate::probe::assert::json_path;

/// Upgrade response header carrying the request id support asks for.
pub const REQUEST_ID_HEADER: &str = "dg-request-id";
/// After `Metadata` the server closes with 1000: wait this long to record the close code.
pub const CLOSE_AFTER_METADATA: Duration = Duration::from_millis(300);

/// Text frame that keeps an idle stream open (Deepgram closes with 1011 NET-0001 after ~10 s
/// without audio or a KeepAlive).
pub const KEEPALIVE: &str = r#"{"type":"KeepAlive"}"#;
/// Flush: the server answers with `from_finalize` final results and keeps the socket open.
pub const FINALIZE: &str = r#"{"type":"Finalize"}"#;
/// Flush and finish: final results, then `Metadata`, then close 1000.
pub const CLOSE_STREAM: &str = r#"{"type":"CloseStream"}"#;

/// The dialect's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub end: DeepgramEnd,
}

impl Wire for Settings {
    fn name(&self) -> &'static str {
        "deepgram"
    }
    fn parse(&self, text: &str) -> Result<Event, String> {
        parse(text)
    }
    fn keepalive_message(&self) -> Option<&str> {
        Some(KEEPALIVE)
    }
    fn end_messages(&self) -> Vec<&str> {
        match self.end {
            DeepgramEnd::CloseStream => vec![CLOSE_STREAM],
            DeepgramEnd::Finalize => vec![FINALIZE],
        }
    }
    /// The server says when it is done (Metadata, a `from_finalize` result, close 1000).
    fn settles(&self) -> bool {
        false
    }
    fn completes(&self, ev: &Event) -> Option<&'static str> {
        match (ev, self.end) {
            (Event::Done { .. }, _) => Some("Metadata"),
            (
                Event::Results {
                    is_final: true,
                    from_finalize: true,
                    ..
                },
                DeepgramEnd::Finalize,
            ) => Some("from_finalize result"),
            _ => None,
        }
    }
    fn unfinished(&self) -> &'static str {
        match self.end {
            DeepgramEnd::CloseStream => {
                "the server did not finish the stream (no Metadata or close)"
            }
            DeepgramEnd::Finalize => {
                "the server did not finish the stream (no from_finalize result)"
            }
        }
    }
    fn linger_after(&self, how: &str) -> Option<Duration> {
        (how == "Metadata").then_some(CLOSE_AFTER_METADATA)
    }
    fn request_id_header(&self) -> &'static str {
        REQUEST_ID_HEADER
    }
    /// Raw PCM is only read when the URL says what it is.
    fn needs_declared_format(&self) -> bool {
        true
    }
}

/// Read one server text message.
pub fn parse(text: &str) -> Result<Event, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(_) = v else {
        return Err("not a JSON object".into());
    };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    Ok(match kind {
        // Older API versions sent Results without a `type`.
        "Results" | "" if v.get("channel").is_some() => {
            let transcript = match json_path(&v, "channel.alternatives.0.transcript") {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => String::new(),
                Some(other) => {
                    return Err(format!(
                        "channel.alternatives.0.transcript is {other}, not a string"
                    ))
                }
            };
            let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
            Event::Results {
                text: transcript,
                is_final: flag("is_final"),
                from_finalize: flag("from_finalize"),
                request_id: json_path(&v, "metadata.request_id")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            }
        }
        "Results" => return Err("Results message without a channel".into()),
        "Metadata" => Event::Done {
            request_id: v
                .get("request_id")
                .and_then(Value::as_str)
                .map(str::to_string),
        },
        "Error" => Event::ServerError(
            ["description", "message", "err_msg", "variant"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_str))
                .unwrap_or("unspecified error")
                .to_string(),
        ),
        // UtteranceEnd, SpeechStarted and anything newer: nothing to judge.
        _ => Event::Ignore,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let r = parse(r#"{"type":"Results","is_final":true,"from_finalize":true,"channel":{"alternatives":[{"transcript":"hi there"}]},"metadata":{"request_id":"r1"}}"#).unwrap();
        assert_eq!(
            r,
            Event::Results {
                text: "hi there".into(),
                is_final: true,
                from_finalize: true,
                request_id: Some("r1".into())
            }
        );
        let r = parse(r#"{"type":"Results","channel":{"alternatives":[]}}"#).unwrap();
        assert_eq!(
            r,
            Event::Results {
                text: String::new(),
                is_final: false,
                from_finalize: false,
                request_id: None
            }
        );
        assert_eq!(
            parse(r#"{"type":"Metadata","request_id":"x"}"#).unwrap(),
            Event::Done {
                request_id: Some("x".into())
            }
        );
        assert_eq!(
            parse(r#"{"type":"UtteranceEnd","last_word_end":1.2}"#).unwrap(),
            Event::Ignore
        );
        assert_eq!(parse(r#"{"type":"SpeechStarted"}"#).unwrap(), Event::Ignore);
        assert!(parse("not json").is_err());
        assert!(parse("[1,2]").is_err());
        assert!(parse(r#"{"type":"Results"}"#).is_err());
        assert!(
            parse(r#"{"type":"Results","channel":{"alternatives":[{"transcript":5}]}}"#).is_err()
        );
    }
}
