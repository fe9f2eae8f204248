//! `[[maintenance]]` windows: a fixed `start`/`end`, or a recurring `at` + `duration` on
//! some `days` of the week (UTC). While a window is active for a component no incident
//! opens for it and its status is `maintenance` (sent to notifiers that support it).
//!
//! Not here: what the component does when a window starts or ends (see `state`).

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveTime, Utc, Weekday};
use serde::Deserialize;
use toml::Spanned;

use crate::config::{ComponentConfig, Dur, Errors, SpanError};

/// `[[maintenance]]`: a window in which incidents are suppressed.
///
/// ```toml
/// [[maintenance]]
/// components = ["Realtime Transcription"]
/// reason = "database upgrade"
/// start = "2026-05-01T02:00:00Z"
/// end = "2026-05-01T04:00:00Z"
///
/// [[maintenance]]
/// components = ["API"]
/// reason = "weekly deploy"
/// days = ["tue", "thu"]    # default: every day
/// at = "03:00"             # UTC
/// duration = "30m"
/// ```
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Components in maintenance during the window.
    #[schemars(with = "Vec<String>")]
    pub components: Vec<Spanned<String>>,
    /// Shown on the timeline and in notifications.
    #[serde(default)]
    pub reason: String,
    /// Fixed window: start, RFC 3339 (`2026-05-01T02:00:00Z`).
    #[schemars(with = "Option<String>")]
    pub start: Option<Spanned<String>>,
    /// Fixed window: end, RFC 3339; must be after `start`.
    #[schemars(with = "Option<String>")]
    pub end: Option<Spanned<String>>,
    /// Recurring window: days of the week (`mon` … `sun`); every day when omitted.
    #[schemars(with = "Option<Vec<String>>")]
    pub days: Option<Vec<Spanned<String>>>,
    /// Recurring window: start time of day, `HH:MM` in UTC.
    #[schemars(with = "Option<String>")]
    pub at: Option<Spanned<String>>,
    /// Recurring window: length (at most 7 days).
    #[schemars(with = "Option<Dur>")]
    pub duration: Option<Spanned<Dur>>,
}

/// A window, parsed.
#[derive(Debug, Clone, PartialEq)]
enum Window {
    Fixed {
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    },
    Recurring {
        days: Vec<Weekday>,
        at: NaiveTime,
        duration: ChronoDuration,
    },
}

fn parse_time(s: &Spanned<String>) -> Result<DateTime<Utc>, SpanError> {
    DateTime::parse_from_rfc3339(s.get_ref())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            SpanError::at(
                s.span(),
                format!(
                    "invalid time {:?}: {e} (expected RFC 3339 like \"2026-05-01T02:00:00Z\")",
                    s.get_ref()
                ),
            )
        })
}

fn parse_day(s: &Spanned<String>) -> Result<Weekday, SpanError> {
    let d = match s.get_ref().to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Mon,
        "tue" | "tuesday" => Weekday::Tue,
        "wed" | "wednesday" => Weekday::Wed,
        "thu" | "thursday" => Weekday::Thu,
        "fri" | "friday" => Weekday::Fri,
        "sat" | "saturday" => Weekday::Sat,
        "sun" | "sunday" => Weekday::Sun,
        other => {
            return Err(SpanError::at(
                s.span(),
                format!("unknown day {other:?} (expected mon, tue, wed, thu, fri, sat or sun)"),
            ))
        }
    };
    Ok(d)
}

impl MaintenanceConfig {
    fn anchor(&self) -> Option<std::ops::Range<usize>> {
        self.components
            .first()
            .map(|c| c.span())
            .or_else(|| self.start.as_ref().map(|s| s.span()))
            .or_else(|| self.at.as_ref().map(|s| s.span()))
    }

    fn err(&self, msg: &str) -> SpanError {
        match self.anchor() {
            Some(s) => SpanError::at(s, format!("maintenance window: {msg}")),
            None => SpanError::new(format!("maintenance window: {msg}")),
        }
    }

    /// The window, or every problem of its keys.
    fn window(&self) -> Result<Window, Errors> {
        let fixed = self.start.is_some() || self.end.is_some();
        let recurring = self.at.is_some() || self.duration.is_some() || self.days.is_some();
        let mut errs = Errors::default();
        match (fixed, recurring) {
            (true, true) => Err(self
                .err("use either start/end (fixed) or at/duration/days (recurring), not both")
                .into()),
            (false, false) => Err(self
                .err("needs start and end (fixed) or at and duration (recurring)")
                .into()),
            (true, false) => {
                let (Some(s), Some(e)) = (&self.start, &self.end) else {
                    return Err(self.err("a fixed window needs both start and end").into());
                };
                let (start, end) = (errs.check(parse_time(s)), errs.check(parse_time(e)));
                let (Some(start), Some(end)) = (start, end) else {
                    return Err(errs);
                };
                if end <= start {
                    errs.push(SpanError::at(
                        e.span(),
                        "maintenance window: end must be after start",
                    ));
                }
                errs.finish(Window::Fixed { start, end })
            }
            (false, true) => {
                let (Some(at), Some(d)) = (&self.at, &self.duration) else {
                    return Err(self
                        .err("a recurring window needs both at and duration")
                        .into());
                };
                let t = NaiveTime::parse_from_str(at.get_ref(), "%H:%M").map_err(|_| {
                    SpanError::at(
                        at.span(),
                        format!(
                            "invalid time of day {:?} (expected HH:MM in UTC)",
                            at.get_ref()
                        ),
                    )
                });
                let t = errs.check(t);
                let dur = d.get_ref().0;
                let duration = if dur.is_zero() || dur > std::time::Duration::from_secs(7 * 86400) {
                    errs.push(SpanError::at(
                        d.span(),
                        "maintenance duration must be between 1s and 7d",
                    ));
                    None
                } else {
                    errs.check(
                        ChronoDuration::from_std(dur)
                            .map_err(|_| SpanError::at(d.span(), "duration out of range")),
                    )
                };
                let days = match &self.days {
                    Some(list) if list.is_empty() => {
                        errs.push(self.err("days is empty (omit it for every day)"));
                        Vec::new()
                    }
                    Some(list) => list
                        .iter()
                        .filter_map(|day| errs.check(parse_day(day)))
                        .collect(),
                    None => Vec::new(),
                };
                let (Some(at), Some(duration)) = (t, duration) else {
                    return Err(errs);
                };
                errs.finish(Window::Recurring { days, at, duration })
            }
        }
    }

    /// Check the window and that every component exists; every problem found.
    pub fn validate(&self, components: &[ComponentConfig]) -> Result<(), Errors> {
        let mut errs = Errors::default();
        if self.components.is_empty() {
            errs.push(self.err("components is empty"));
        }
        for c in &self.components {
            if !components.iter().any(|k| k.name.get_ref() == c.get_ref()) {
                let known: Vec<&str> = components
                    .iter()
                    .map(|k| k.name.get_ref().as_str())
                    .collect();
                errs.push(SpanError::at(
                    c.span(),
                    format!(
                        "unknown component {:?} in maintenance window (defined: {})",
                        c.get_ref(),
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
        if let Err(w) = self.window() {
            errs.extend(w);
        }
        errs.finish(())
    }

    /// Whether the window covers `component` at `now`.
    pub fn active(&self, component: &str, now: DateTime<Utc>) -> bool {
        if !self.components.iter().any(|c| c.get_ref() == component) {
            return false;
        }
        match self.window() {
            Ok(w) => window_active(&w, now),
            Err(_) => false,
        }
    }

    /// The reason to show, never empty.
    pub fn reason(&self) -> &str {
        if self.reason.is_empty() {
            "scheduled maintenance"
        } else {
            &self.reason
        }
    }
}

fn window_active(w: &Window, now: DateTime<Utc>) -> bool {
    match w {
        Window::Fixed { start, end } => *start <= now && now < *end,
        Window::Recurring { days, at, duration } => {
            // A window that started on one of the last few days may still be running.
            let back = duration.num_days() + 1;
            (0..=back).any(|k| {
                let day = now.date_naive() - ChronoDuration::days(k);
                if !days.is_empty() && !days.contains(&day.weekday()) {
                    return false;
                }
                let start = day.and_time(*at).and_utc();
                start <= now && now < start + *duration
            })
        }
    }
}

/// The reason of the first window active for `component` at `now`.
pub fn active_reason<'a>(
    windows: &'a [MaintenanceConfig],
    component: &str,
    now: DateTime<Utc>,
) -> Option<&'a str> {
    windows
        .iter()
        .find(|w| w.active(component, now))
        .map(|w| w.reason())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> MaintenanceConfig {
        toml::from_str(s).unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn fixed_window() {
        let m = parse("components = [\"A\"]\nstart = \"2026-05-01T02:00:00Z\"\nend = \"2026-05-01T04:00:00Z\"");
        let table = [
            ("2026-05-01T01:59:59Z", false),
            ("2026-05-01T02:00:00Z", true),
            ("2026-05-01T03:59:59Z", true),
            ("2026-05-01T04:00:00Z", false),
        ];
        for (now, want) in table {
            assert_eq!(m.active("A", t(now)), want, "{now}");
        }
        assert!(!m.active("B", t("2026-05-01T03:00:00Z")));
    }

    #[test]
    fn recurring_window_crossing_midnight() {
        // 2026-05-05 is a Tuesday.
        let m = parse("components = [\"A\"]\ndays = [\"tue\"]\nat = \"23:30\"\nduration = \"1h\"");
        let table = [
            ("2026-05-05T23:29:00Z", false),
            ("2026-05-05T23:30:00Z", true),
            ("2026-05-06T00:29:59Z", true),
            ("2026-05-06T00:30:00Z", false),
            ("2026-05-06T23:45:00Z", false), // Wednesday
            ("2026-05-12T23:45:00Z", true),  // next Tuesday
        ];
        for (now, want) in table {
            assert_eq!(m.active("A", t(now)), want, "{now}");
        }
        let daily = parse("components = [\"A\"]\nat = \"02:00\"\nduration = \"30m\"");
        assert!(daily.active("A", t("2026-05-09T02:10:00Z")));
        assert!(!daily.active("A", t("2026-05-09T02:30:00Z")));
    }

    #[test]
    fn validation_messages() {
        let cases = [
            ("components = [\"A\"]", "needs start and end"),
            ("components = [\"A\"]\nstart = \"2026-05-01T02:00:00Z\"", "both start and end"),
            ("components = [\"A\"]\nstart = \"x\"\nend = \"y\"", "invalid time \"x\""),
            ("components = [\"A\"]\nstart = \"2026-05-01T02:00:00Z\"\nend = \"2026-05-01T01:00:00Z\"", "end must be after start"),
            ("components = [\"A\"]\nat = \"25:00\"\nduration = \"1h\"", "invalid time of day"),
            ("components = [\"A\"]\nat = \"02:00\"\nduration = \"1h\"\ndays = [\"funday\"]", "unknown day"),
            ("components = [\"A\"]\nat = \"02:00\"\nduration = \"1h\"\nstart = \"2026-05-01T02:00:00Z\"", "not both"),
            ("components = [\"Nope\"]\nat = \"02:00\"\nduration = \"1h\"", "unknown component \"Nope\""),
        ];
        let comps: Vec<ComponentConfig> =
            vec![toml::from_str("name = \"A\"\nprobes = [\"p\"]").unwrap()];
        for (src, want) in cases {
            let errs = parse(src).validate(&comps).unwrap_err();
            let e = errs.iter().next().expect("an error");
            assert!(e.message.contains(want), "{src}: {}", e.message);
            assert!(e.span.is_some(), "{src}: error has a position");
        }
        // Every problem of a window, not the first.
        let errs = parse(
            "components = [\"A\", \"Nope\"]\nat = \"25:00\"\nduration = \"0s\"\ndays = [\"mon\", \"funday\"]",
        )
        .validate(&comps)
        .unwrap_err();
        let messages: Vec<&str> = errs.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages.len(), 4, "{messages:#?}");
        for want in [
            "unknown component \"Nope\"",
            "invalid time of day",
            "between 1s and 7d",
            "unknown day \"funday\"",
        ] {
            assert!(
                messages.iter().any(|m| m.contains(want)),
                "{want}: {messages:#?}"
            );
        }
        assert!(
            parse("components = [\"A\"]\nat = \"02:00\"\nduration = \"1h\"")
                .validate(&comps)
                .is_ok()
        );
    }
}
