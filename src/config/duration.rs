//! Human durations in config: `"250ms"`, `"5s"`, `"3m"`, `"48h"`, `"7d"`, and sums like
//! `"1m30s"`. Parsing errors surface through serde, so toml points at the offending value.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration read from config.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", human(self.0))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", human(self.0))
    }
}

/// Parse a duration string; the error says what was expected.
pub fn parse(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("invalid duration {s:?} (expected a number and a unit: ms, s, m, h or d, e.g. \"250ms\", \"5s\", \"1m30s\")")
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_secs = match &rest[..unit_end] {
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_end..];
        let secs = n * unit_secs;
        if !secs.is_finite() || secs > 1e10 {
            return Err(bad());
        }
        total += Duration::from_secs_f64(secs);
    }
    Ok(total)
}

/// Short human form: `850ms`, `2.5s`, `7m 12s`, `3h 5m`, `2d 4h`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        if d.as_micros() < 1000 && !d.is_zero() {
            return format!("{}µs", d.as_micros());
        }
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    if s < 60 {
        let tenths = (ms % 1000) / 100;
        return if tenths == 0 {
            format!("{s}s")
        } else {
            format!("{s}.{tenths}s")
        };
    }
    let (d_, h, m, sec) = (s / 86400, (s / 3600) % 24, (s / 60) % 60, s % 60);
    match (d_, h) {
        (0, 0) if sec == 0 => format!("{m}m"),
        (0, 0) => format!("{m}m {sec}s"),
        (0, _) if m == 0 => format!("{h}h"),
        (0, _) => format!("{h}h {m}m"),
        _ if h == 0 => format!("{d_}d"),
        _ => format!("{d_}d {h}h"),
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let s = super::interp::expand(&s).map_err(serde::de::Error::custom)?;
        parse(&s).map(Dur).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Dur {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration: a number and a unit (us, ms, s, m, h, d), or a sum like \"1m30s\"; `${ENV}` allowed.",
            "pattern": "^\\s*([0-9.]+(us|µs|ms|s|m|h|d))+\\s*$|\\$\\{",
            "examples": ["250ms", "5s", "1m30s", "7d"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table() {
        let cases = [
            ("250ms", 250),
            ("5s", 5_000),
            ("3m", 180_000),
            ("48h", 172_800_000),
            ("7d", 604_800_000),
            ("1m30s", 90_000),
            ("1.5s", 1_500),
            (" 2s ", 2_000),
        ];
        for (s, ms) in cases {
            assert_eq!(parse(s).unwrap(), Duration::from_millis(ms), "{s}");
        }
        for bad in ["", "5", "s", "5x", "-1s", "1e9999s", "ms5"] {
            assert!(parse(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn human_table() {
        let cases = [
            (Duration::from_millis(850), "850ms"),
            (Duration::from_millis(2500), "2.5s"),
            (Duration::from_secs(432), "7m 12s"),
            (Duration::from_secs(180), "3m"),
            (Duration::from_secs(3600 * 3 + 300), "3h 5m"),
            (Duration::from_secs(86400 * 2 + 3600 * 4), "2d 4h"),
        ];
        for (d, s) in cases {
            assert_eq!(human(d), s);
        }
    }
}
