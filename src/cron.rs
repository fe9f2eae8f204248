//! Cron schedules: `[[review]] schedule`, `[[rehearsal]] schedule` (and any other key that
//! fires on a calendar). Five fields — minute, hour, day of month, month, day of week, e.g.
//! `"0 9 * * MON"` — or an alias (`@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`),
//! with cron's ranges, steps and lists and croner's `L`, `W` and `#`; where a key allows it
//! ([`Schedule::parse_with_seconds`]), six with seconds first. Evaluated in UTC (as
//! maintenance windows are). Parsing is croner's; this module only fixes the dialect and the
//! time zone.
//!
//! Not here: running anything on a schedule (see `review`, `chaos::live`).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use croner::parser::{CronParser, Seconds, Year};

/// A parsed cron schedule.
#[derive(Clone)]
pub struct Schedule {
    cron: croner::Cron,
    text: String,
}

impl Schedule {
    /// Parse a five-field pattern or an alias; a pattern that never fires (`0 0 30 2 *`) is
    /// an error too.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        Schedule::build(
            text,
            Seconds::Disallowed,
            "five fields: minute hour day-of-month month day-of-week, e.g. \"0 9 * * MON\"",
        )
    }

    /// [`Schedule::parse`], or six fields with seconds first (`"*/30 * * * * *"`), for keys
    /// where a minute is too coarse (`[[rehearsal]]`: a drill every few seconds in a test).
    pub fn parse_with_seconds(text: &str) -> Result<Schedule, String> {
        Schedule::build(
            text,
            Seconds::Optional,
            "five fields: minute hour day-of-month month day-of-week, e.g. \"0 9 * * MON\", or six with seconds first",
        )
    }

    fn build(text: &str, seconds: Seconds, expected: &str) -> Result<Schedule, String> {
        let cron = CronParser::builder()
            .seconds(seconds)
            .year(Year::Disallowed)
            .build()
            .parse(text)
            .map_err(|e| format!("invalid cron schedule {text:?}: {e} ({expected})"))?;
        let s = Schedule {
            cron,
            text: text.trim().to_string(),
        };
        let epoch = Utc.timestamp_opt(0, 0).single().unwrap_or_default();
        if s.next_after(epoch).is_none() {
            return Err(format!("cron schedule {text:?} never fires"));
        }
        Ok(s)
    }

    /// The first time the schedule fires strictly after `t` (`None`: never again).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t, false).ok()
    }

    /// The last time the schedule fired at or before `t` (`None`: never before).
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&t, true).ok()
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Schedule, String> {
        Schedule::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn next_times() {
        let cases = [
            // Mondays 09:00, from a Sunday, from Monday 09:00 itself (strictly after).
            (
                "0 9 * * MON",
                "2026-11-22T10:00:00Z",
                "2026-11-23T09:00:00Z",
            ),
            (
                "0 9 * * MON",
                "2026-11-23T09:00:00Z",
                "2026-11-30T09:00:00Z",
            ),
            ("0 9 * * 1", "2026-11-23T08:59:59Z", "2026-11-23T09:00:00Z"),
            (
                "*/15 * * * *",
                "2026-11-22T10:07:00Z",
                "2026-11-22T10:15:00Z",
            ),
            ("@daily", "2026-11-22T10:00:00Z", "2026-11-23T00:00:00Z"),
            ("30 6 1 * *", "2026-11-22T10:00:00Z", "2026-12-01T06:30:00Z"),
            ("0 0 L * *", "2026-11-22T10:00:00Z", "2026-11-30T00:00:00Z"),
        ];
        for (pattern, from, want) in cases {
            let s = Schedule::parse(pattern).unwrap();
            assert_eq!(
                s.next_after(at(from)),
                Some(at(want)),
                "{pattern} after {from}"
            );
            // And back: the slot itself is the last one at or before it.
            assert_eq!(s.last_at_or_before(at(want)), Some(at(want)), "{pattern}");
        }
        let mondays = Schedule::parse("0 9 * * MON").unwrap();
        assert_eq!(
            mondays.last_at_or_before(at("2026-11-22T10:00:00Z")),
            Some(at("2026-11-16T09:00:00Z"))
        );
    }

    #[test]
    fn bad_patterns_say_why() {
        for bad in [
            "",
            "every monday",
            "0 9 * *",
            "61 * * * *",
            "0 25 * * *",
            "0 0 9 * * MON",
            "0 0 30 2 *",
        ] {
            let e = Schedule::parse(bad).unwrap_err();
            assert!(e.contains("cron schedule"), "{bad}: {e}");
        }
    }

    #[test]
    fn seconds_where_a_key_allows_them() {
        let cases = [
            (
                "* * * * * *",
                "2026-11-22T21:07:10.400Z",
                "2026-11-22T21:07:11Z",
            ),
            (
                "*/2 * * * * *",
                "2026-11-22T21:07:10Z",
                "2026-11-22T21:07:12Z",
            ),
            (
                "0 9 * * MON",
                "2026-11-22T21:00:00Z",
                "2026-11-23T09:00:00Z",
            ),
            (
                "30 0 9 * * MON",
                "2026-11-22T21:00:00Z",
                "2026-11-23T09:00:30Z",
            ),
        ];
        for (pattern, from, want) in cases {
            let s = Schedule::parse_with_seconds(pattern).unwrap();
            assert_eq!(s.next_after(at(from)), Some(at(want)), "{pattern}");
        }
        for bad in [
            "",
            "0 9 * *",
            "61 * * * * *",
            "0 0 0 30 2 *",
            "0 0 9 * * MON 2027",
        ] {
            let e = Schedule::parse_with_seconds(bad).unwrap_err();
            assert!(e.contains("cron schedule"), "{bad}: {e}");
        }
    }
}
