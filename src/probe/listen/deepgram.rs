//! The Deepgram live dialect (`wss://api.deepgram.com/v1/listen`): `Token` auth, `Results`
//! messages whose `is_final` transcripts concatenate into the utterance, `Metadata` after
//! `CloseStream`, `UtteranceEnd` / `SpeechStarted` events, `KeepAlive` while no audio flows.
//! Messages are read as loose JSON because fields come and go between API versions.

use serde_json::Value;

use super::Event;
use crate::probe::assert::json_path;

/// Text frame that keeps an idle stream open (Deepgram closes with 1011 NET-0001 after ~10 s
/// without audio or a KeepAlive).
pub const KEEPALIVE: &str = r#"{"type":"KeepAlive"}"#;
/// Flush: the server answers with `from_finalize` final results and keeps the socket open.
pub const FINALIZE: &str = r#"{"type":"Finalize"}"#;
/// Flush and finish: final results, then `Metadata`, then close 1000.
pub const CLOSE_STREAM: &str = r#"{"type":"CloseStream"}"#;

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
