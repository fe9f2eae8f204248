//! The generic dialect: any JSON-speaking realtime STT described in config — where the
//! transcript text is (`transcript_path`), how a final result is marked (`final_path`),
//! whether finals append or replace, and which text messages end the stream
//! (`end_messages`). Lets a new provider be probed without code.

use serde_json::Value;

pub use super::config::Accumulate;
use super::{Event, Wire};
use crate::probe::assert::json_path;

/// The dialect's settings, all from config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub layout: Layout,
    pub accumulate: Accumulate,
    /// Text frames sent after the last audio frame.
    pub end_messages: Vec<String>,
    /// Text frame sent as a keepalive while no audio flows.
    pub keepalive_message: Option<String>,
}

impl Wire for Settings {
    fn name(&self) -> &'static str {
        "generic"
    }
    fn parse(&self, text: &str) -> Result<Event, String> {
        parse(&self.layout, text)
    }
    fn keepalive_message(&self) -> Option<&str> {
        self.keepalive_message.as_deref()
    }
    fn end_messages(&self) -> Vec<&str> {
        self.end_messages.iter().map(String::as_str).collect()
    }
    /// Providers differ in how they end a stream; a close 1000 ends it, and otherwise the
    /// transcript is final once unchanged for `settle`.
    fn settles(&self) -> bool {
        true
    }
    fn replaces(&self) -> bool {
        self.accumulate == Accumulate::Replace
    }
    fn unfinished(&self) -> &'static str {
        "the transcript never settled"
    }
    /// Binary messages carry nothing this dialect reads (some providers send audio or
    /// protobuf side channels): skipped, not a protocol error.
    fn ignores_binary(&self) -> bool {
        true
    }
}

/// The JSON layout of a provider's messages.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Dotted path of the transcript text.
    pub transcript_path: String,
    /// Dotted path of a boolean marking final results; `None` = every result is final.
    pub final_path: Option<String>,
    /// Dotted path of an error text; a message carrying it is reported.
    pub error_path: Option<String>,
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => matches!(s.as_str(), "true" | "final" | "yes" | "1"),
        _ => false,
    }
}

/// Read one server text message.
pub fn parse(layout: &Layout, text: &str) -> Result<Event, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    if let Some(p) = &layout.error_path {
        if let Some(e) = json_path(&v, p).filter(|e| !e.is_null()) {
            let e = e
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            return Ok(Event::ServerError(e));
        }
    }
    match json_path(&v, &layout.transcript_path) {
        Some(Value::String(t)) => Ok(Event::Results {
            text: t.clone(),
            is_final: layout
                .final_path
                .as_ref()
                .is_none_or(|p| truthy(json_path(&v, p))),
            from_finalize: false,
            request_id: None,
        }),
        Some(Value::Null) | None => Ok(Event::Ignore),
        Some(other) => Err(format!(
            "{} is {other}, not a string",
            layout.transcript_path
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let l = Layout {
            transcript_path: "result.text".into(),
            final_path: Some("result.final".into()),
            error_path: Some("error".into()),
        };
        assert_eq!(
            parse(&l, r#"{"result":{"text":"hi","final":true}}"#).unwrap(),
            Event::Results {
                text: "hi".into(),
                is_final: true,
                from_finalize: false,
                request_id: None
            }
        );
        assert_eq!(
            parse(&l, r#"{"result":{"text":"h"}}"#).unwrap(),
            Event::Results {
                text: "h".into(),
                is_final: false,
                from_finalize: false,
                request_id: None
            }
        );
        assert_eq!(parse(&l, r#"{"event":"started"}"#).unwrap(), Event::Ignore);
        assert_eq!(
            parse(&l, r#"{"error":"quota"}"#).unwrap(),
            Event::ServerError("quota".into())
        );
        assert!(parse(&l, "nope").is_err());
        assert!(parse(&l, r#"{"result":{"text":7}}"#).is_err());
        let all_final = Layout {
            transcript_path: "t".into(),
            final_path: None,
            error_path: None,
        };
        assert!(matches!(
            parse(&all_final, r#"{"t":"x"}"#).unwrap(),
            Event::Results { is_final: true, .. }
        ));
    }
}
