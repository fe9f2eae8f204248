//! Cron schedules of the config (`[[rehearsal]] schedule`, and any other key that runs
//! something on a calendar): the pattern parsed once by `croner` and the next time it fires.
//! Five fields (`minute hour day-of-month month day-of-week`, e.g. `"0 9 * * MON"`), or six
//! with seconds first (`"*/30 * * * * *"`), nicknames such as `@daily`; times are UTC, like
//! maintenance windows.
//!
//! Not here: what runs at those times, or waiting for them (each user sleeps on its own
//! clock until [`Schedule::next_after`]).

use chrono::{DateTime, Utc};

/// A parsed cron pattern.
#[derive(Debug, Clone)]
pub struct Schedule {
    text: String,
    cron: croner::Cron,
}

impl Schedule {
    /// Parse `text`; the error is a sentence for a `file:line:col: message`.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err("empty cron schedule (e.g. \"0 9 * * MON\")".into());
        }
        let cron = croner::parser::CronParser::builder()
            .build()
            .parse(trimmed)
            .map_err(|e| {
                format!(
                    "invalid cron schedule {text:?}: {e} (expected 5 fields `minute hour day month weekday` like \"0 9 * * MON\", or 6 with seconds first)"
                )
            })?;
        Ok(Schedule {
            text: trimmed.to_string(),
            cron,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first time strictly after `t` the schedule fires (`None`: never again).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t, false).ok()
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn next_after_is_strictly_after_and_in_utc() {
        let cases = [
            // 2026-11-22 is a Sunday.
            (
                "0 9 * * MON",
                "2026-11-22T21:00:00Z",
                "2026-11-23T09:00:00Z",
            ),
            (
                "0 9 * * MON",
                "2026-11-23T09:00:00Z",
                "2026-11-30T09:00:00Z",
            ),
            (
                "*/15 * * * *",
                "2026-11-22T21:07:10Z",
                "2026-11-22T21:15:00Z",
            ),
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
            ("@daily", "2026-11-22T21:07:10Z", "2026-11-23T00:00:00Z"),
            ("30 3 1 * *", "2026-11-22T21:07:10Z", "2026-12-01T03:30:00Z"),
        ];
        for (pattern, from, want) in cases {
            let s = Schedule::parse(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            assert_eq!(
                s.next_after(at(from)),
                Some(at(want)),
                "{pattern} after {from}"
            );
        }
    }

    #[test]
    fn bad_patterns_are_sentences_naming_the_pattern() {
        for bad in [
            "",
            "0 9 * *",
            "61 * * * *",
            "0 9 * * FUNDAY",
            "every monday",
        ] {
            let e = Schedule::parse(bad).expect_err(bad);
            assert!(
                e.contains("cron schedule") && (bad.is_empty() || e.contains(bad)),
                "{bad}: {e}"
            );
        }
    }
}
