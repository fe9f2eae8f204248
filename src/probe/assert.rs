//! Assertions shared by probe kinds: dotted JSON paths, JSON operators, status patterns and
//! regexes that compile while the config is parsed (so a bad one points at its line).

use std::fmt;

use regex::Regex;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Look up a dotted path with numeric indexes (`channel.alternatives.0.transcript`).
/// An empty path is the root.
pub fn json_path<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(root);
    }
    path.split('.').try_fold(root, |v, seg| match v {
        Value::Object(m) => m.get(seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// A regex compiled at config time.
#[derive(Clone)]
pub struct Re(pub Regex);

impl fmt::Debug for Re {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for Re {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Regex::new(&s).map(Re).map_err(|e| {
            serde::de::Error::custom(format!("invalid regex {s:?}: {}", regex_error(&e)))
        })
    }
}

/// The one-line reason of a regex error: the parser's message draws the pattern and a
/// caret on lines of their own, which a `file:line:col: message` line cannot hold.
fn regex_error(e: &regex::Error) -> String {
    let full = e.to_string();
    let reason = full
        .lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .unwrap_or(full.lines().next().unwrap_or_default());
    reason.trim().to_string()
}

impl schemars::JsonSchema for Re {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Regex".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "format": "regex",
            "description": "A regular expression (Rust `regex` syntax)."
        })
    }
}

/// One JSON assertion: `{ path = "checks.db.latency_ms", lt = 500 }`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonAssert {
    /// Dotted path with numeric indexes.
    pub path: String,
    /// Value must equal this.
    pub equals: Option<Value>,
    /// Value must not equal this.
    pub not_equals: Option<Value>,
    /// Value must be one of these.
    #[serde(rename = "in")]
    pub in_: Option<Vec<Value>>,
    /// The path must (true) or must not (false) exist.
    pub exists: Option<bool>,
    /// The value (as text) must match this regex.
    pub matches: Option<Re>,
    /// The value must be a number below this.
    pub lt: Option<f64>,
    /// The value must be a number at most this.
    pub le: Option<f64>,
    /// The value must be a number above this.
    pub gt: Option<f64>,
    /// The value must be a number at least this.
    pub ge: Option<f64>,
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}…", &s[..s.floor_char_boundary_compat(80)])
    } else {
        s
    }
}

trait FloorBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while i > 0 && !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Cut text to at most `n` bytes on a char boundary, adding `…` when cut.
pub fn excerpt(s: &str, n: usize) -> String {
    let s = s.trim();
    if s.len() <= n {
        s.to_string()
    } else {
        format!("{}…", &s[..s.floor_char_boundary_compat(n)])
    }
}

impl JsonAssert {
    /// `Err` carries a sentence such as `checks.database.latency_ms is 812, expected < 500`.
    pub fn check(&self, root: &Value) -> Result<(), String> {
        let p = &self.path;
        let found = json_path(root, p);
        if let Some(want) = self.exists {
            match (want, found) {
                (true, None) => return Err(format!("{p} is missing")),
                (false, Some(v)) => {
                    return Err(format!("{p} is {}, expected it to be absent", show(v)))
                }
                _ => {}
            }
        }
        let needs_value = self.equals.is_some()
            || self.not_equals.is_some()
            || self.in_.is_some()
            || self.matches.is_some()
            || self.lt.is_some()
            || self.le.is_some()
            || self.gt.is_some()
            || self.ge.is_some();
        let Some(v) = found else {
            return if needs_value {
                Err(format!("{p} is missing"))
            } else {
                Ok(())
            };
        };
        if let Some(want) = &self.equals {
            if !same(v, want) {
                return Err(format!("{p} is {}, expected {}", show(v), show(want)));
            }
        }
        if let Some(bad) = &self.not_equals {
            if same(v, bad) {
                return Err(format!("{p} is {}, expected anything else", show(v)));
            }
        }
        if let Some(set) = &self.in_ {
            if !set.iter().any(|w| same(v, w)) {
                let list: Vec<String> = set.iter().map(show).collect();
                return Err(format!(
                    "{p} is {}, expected one of {}",
                    show(v),
                    list.join(", ")
                ));
            }
        }
        if let Some(re) = &self.matches {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if !re.0.is_match(&text) {
                return Err(format!(
                    "{p} is {}, expected to match /{}/",
                    show(v),
                    re.0.as_str()
                ));
            }
        }
        let cmps = [
            (self.lt, "<"),
            (self.le, "<="),
            (self.gt, ">"),
            (self.ge, ">="),
        ];
        for (bound, op) in cmps {
            let Some(bound) = bound else { continue };
            let Some(x) = v.as_f64() else {
                return Err(format!(
                    "{p} is {}, expected a number {op} {bound}",
                    show(v)
                ));
            };
            let ok = match op {
                "<" => x < bound,
                "<=" => x <= bound,
                ">" => x > bound,
                _ => x >= bound,
            };
            if !ok {
                return Err(format!("{p} is {}, expected {op} {bound}", show(v)));
            }
        }
        Ok(())
    }
}

/// An HTTP status pattern: `200` or a class like `"2xx"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPattern {
    Code(u16),
    Class(u16),
}

impl StatusPattern {
    pub fn matches(&self, code: u16) -> bool {
        match self {
            StatusPattern::Code(c) => *c == code,
            StatusPattern::Class(c) => code / 100 == *c,
        }
    }
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid status {s:?} (expected a code like \"200\" or a class like \"2xx\")")
        };
        let t = s.trim().to_ascii_lowercase();
        if let Some(d) = t.strip_suffix("xx") {
            let c: u16 = d.parse().map_err(|_| bad())?;
            return if (1..=5).contains(&c) {
                Ok(StatusPattern::Class(c))
            } else {
                Err(bad())
            };
        }
        let c: u16 = t.parse().map_err(|_| bad())?;
        if (100..=599).contains(&c) {
            Ok(StatusPattern::Code(c))
        } else {
            Err(bad())
        }
    }
}

impl<'de> Deserialize<'de> for StatusPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        let s = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::S(s) => s,
        };
        StatusPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for StatusPattern {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HttpStatus".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An HTTP status code (200, \"404\") or class (\"2xx\").",
            "anyOf": [
                { "type": "integer", "minimum": 100, "maximum": 599 },
                { "type": "string", "pattern": "^\\s*([1-5][xX][xX]|[1-5][0-9][0-9])\\s*$" }
            ]
        })
    }
}

pub fn any_status(patterns: &[StatusPattern], code: u16) -> bool {
    patterns.iter().any(|p| p.matches(code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn a(v: Value) -> JsonAssert {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn paths() {
        let v = json!({"channel":{"alternatives":[{"transcript":"hi"}]},"a":{"b":1}});
        assert_eq!(
            json_path(&v, "channel.alternatives.0.transcript"),
            Some(&json!("hi"))
        );
        assert_eq!(json_path(&v, "a.b"), Some(&json!(1)));
        assert_eq!(json_path(&v, "a.c"), None);
        assert_eq!(json_path(&v, "channel.alternatives.5"), None);
        assert_eq!(json_path(&v, ""), Some(&v));
    }

    #[test]
    fn operators_table() {
        let doc =
            json!({"service":"api","n":812,"s":"degraded","checks":{"db":{"latency_ms":12.5}}});
        let cases = [
            (json!({"path":"service","equals":"api"}), true),
            (json!({"path":"service","equals":"web"}), false),
            (json!({"path":"n","equals":812.0}), true),
            (json!({"path":"s","not_equals":"ok"}), true),
            (json!({"path":"s","not_equals":"degraded"}), false),
            (json!({"path":"s","in":["ok","degraded"]}), true),
            (json!({"path":"s","in":["ok"]}), false),
            (json!({"path":"service","exists":true}), true),
            (json!({"path":"nope","exists":true}), false),
            (json!({"path":"nope","exists":false}), true),
            (json!({"path":"service","exists":false}), false),
            (json!({"path":"s","matches":"^deg"}), true),
            (json!({"path":"s","matches":"^ok$"}), false),
            (json!({"path":"n","lt":500}), false),
            (json!({"path":"checks.db.latency_ms","lt":500}), true),
            (json!({"path":"n","le":812}), true),
            (json!({"path":"n","gt":812}), false),
            (json!({"path":"n","ge":812}), true),
            (json!({"path":"service","lt":1}), false),
            (json!({"path":"missing","lt":1}), false),
        ];
        for (spec, ok) in cases {
            let r = a(spec.clone()).check(&doc);
            assert_eq!(r.is_ok(), ok, "{spec} -> {r:?}");
        }
        let msg = a(json!({"path":"n","lt":500})).check(&doc).unwrap_err();
        assert_eq!(msg, "n is 812, expected < 500");
    }

    #[test]
    fn status_patterns() {
        assert!(StatusPattern::parse("2xx").unwrap().matches(204));
        assert!(!StatusPattern::parse("2xx").unwrap().matches(301));
        assert!(StatusPattern::parse("207").unwrap().matches(207));
        for bad in ["9xx", "abc", "42", "600", ""] {
            assert!(StatusPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn excerpt_cuts_on_char_boundary() {
        assert_eq!(excerpt("héllo", 2), "h…");
        assert_eq!(excerpt(" short ", 10), "short");
    }
}
