//! The notification event: what the evaluator writes into the outbox (as JSON) and every
//! notifier renders in its own wire shape. Also the texts people read (titles, bodies), so
//! every notifier says the same thing the same way.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::incident::state::{Cause, EventKind, Status};

/// One notification: a component transition, or a test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub component: String,
    /// Status after the transition.
    pub status: Status,
    /// Status before it.
    pub previous: Status,
    pub incident_id: Option<i64>,
    /// When the incident opened (ms since the epoch).
    pub opened_at: Option<i64>,
    /// When the transition happened (ms since the epoch).
    pub at: i64,
    #[serde(default)]
    pub flapping: bool,
    /// The member and error behind the status (for resolves: the last error seen).
    pub cause: Option<Cause>,
    /// Free text: maintenance reason, flapping note.
    pub note: Option<String>,
    /// Vantage point (`[agent].location`).
    pub location: String,
    /// Phases and details of the causing run (WER, transcript, latency…).
    #[serde(default)]
    pub details: Option<Value>,
    /// Sent by `watchpost notify-test`.
    #[serde(default)]
    pub test: bool,
    /// The agent's installation id, set by the dispatcher when it delivers (never stored
    /// with the event): part of every key other systems see. `None` for incidents opened
    /// before the database had one, which keep their old keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation: Option<String>,
    /// Sent by a rehearsal: its run id (titles say `[REHEARSAL]`; dedup keys carry the id,
    /// so they never meet a real incident's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rehearsal: Option<String>,
}

/// RFC 3339 UTC with milliseconds.
pub fn iso(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `7m 12s`, `1h 3m`, `45s`, `1d 2h`.
pub fn human_span(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    let (d, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Cut `s` to at most `max` characters, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

impl Event {
    /// A test event for `notify-test`.
    pub fn test(location: &str, now_ms: i64) -> Event {
        Event {
            kind: EventKind::Test,
            component: "watchpost notify-test".into(),
            status: Status::Degraded,
            previous: Status::Operational,
            incident_id: None,
            opened_at: Some(now_ms),
            at: now_ms,
            flapping: false,
            cause: Some(Cause {
                member: "notify-test".into(),
                class: "test".into(),
                message: "This is a test notification sent by `watchpost notify-test`; no action is needed.".into(),
            }),
            note: Some("TEST".into()),
            location: location.to_string(),
            details: None,
            test: true,
            installation: None,
            rehearsal: None,
        }
    }

    /// Stable per incident, across restarts, and unique across agents and databases:
    /// `watchpost/<installation>/<component>/<incident id>` (≤ 255);
    /// `watchpost/<component>/<incident id>` for incidents older than the installation id.
    pub fn dedup_key(&self) -> String {
        let inst = self
            .installation
            .as_deref()
            .map(|i| format!("{i}/"))
            .unwrap_or_default();
        let key = match (self.test, self.incident_id, &self.rehearsal) {
            (true, _, _) | (false, None, _) => format!("watchpost/{inst}test/{}", self.at),
            (false, Some(id), None) => format!("watchpost/{inst}{}/{}", self.component, id),
            (false, Some(id), Some(r)) => {
                format!("watchpost/{inst}rehearsal/{r}/{}/{}", self.component, id)
            }
        };
        truncate(&key, 255)
    }

    /// Whether the event ends the incident.
    pub fn is_resolve(&self) -> bool {
        self.kind == EventKind::Resolved
    }

    /// `DOWN`, `DEGRADED`, `RESOLVED`, `MAINTENANCE`, `TEST`…
    pub fn tag(&self) -> &'static str {
        match self.kind {
            EventKind::Test => "TEST",
            EventKind::Resolved => "RESOLVED",
            EventKind::MaintenanceStarted => "MAINTENANCE",
            EventKind::MaintenanceEnded => "OPERATIONAL",
            _ => match self.status {
                Status::MajorOutage | Status::PartialOutage => "DOWN",
                Status::Degraded => "DEGRADED",
                Status::Maintenance => "MAINTENANCE",
                Status::Operational => "OPERATIONAL",
            },
        }
    }

    /// How long the incident lasted (resolves) or has lasted so far.
    pub fn duration_ms(&self) -> Option<i64> {
        self.opened_at.map(|o| (self.at - o).max(0))
    }

    /// The health details the probe named (`details = [...]`), as
    /// `active_connections=20, checks.database.failures=3`.
    pub fn health(&self) -> Option<&serde_json::Map<String, Value>> {
        self.details
            .as_ref()?
            .get("details")?
            .get("health")?
            .as_object()
    }

    fn health_text(&self) -> Option<String> {
        let h = self.health()?;
        let parts: Vec<String> = h
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// `listen-deepgram: server closed the socket with 1011` (or the member alone).
    pub fn cause_text(&self) -> Option<String> {
        self.cause
            .as_ref()
            .map(|c| format!("{}: {}", c.member, c.message))
    }

    /// The inbound alert behind the event (`details.alert`), as labelled lines for people:
    /// the alert and its severity, its description and where it came from (the summary is
    /// the cause's message already).
    pub fn alert_lines(&self) -> Vec<(&'static str, String)> {
        let Some(a) = self.details.as_ref().and_then(|d| d.get("alert")) else {
            return Vec::new();
        };
        let text = |k: &str| a.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
        let mut out = Vec::new();
        if let Some(name) = text("name") {
            let from = text("source").unwrap_or("alert");
            out.push((
                "Alert",
                match text("severity") {
                    Some(sev) => format!("{name} ({from}, severity {sev})"),
                    None => format!("{name} ({from})"),
                },
            ));
        }
        if let Some(d) = text("description") {
            out.push(("Description", d.to_string()));
        }
        if let Some(u) = text("generator_url") {
            out.push(("Alert source", u.to_string()));
        }
        out
    }

    /// One line: `[DOWN] Realtime Transcription: listen-deepgram: closed with 1011`,
    /// `[RESOLVED] Realtime Transcription after 7m 12s`.
    pub fn title(&self) -> String {
        let t = match self.kind {
            EventKind::Resolved => {
                format!(
                    "[RESOLVED] {} after {}",
                    self.component,
                    human_span(self.duration_ms().unwrap_or(0))
                )
            }
            EventKind::MaintenanceStarted => {
                format!(
                    "[MAINTENANCE] {}: {}",
                    self.component,
                    self.note.as_deref().unwrap_or("scheduled maintenance")
                )
            }
            EventKind::MaintenanceEnded => {
                format!("[OPERATIONAL] {}: maintenance over", self.component)
            }
            EventKind::Test => {
                "[TEST] watchpost notify-test: this is a test, no action needed".to_string()
            }
            _ => match self.cause_text() {
                Some(c) => format!("[{}] {}: {}", self.tag(), self.component, c),
                None => format!(
                    "[{}] {} is {}",
                    self.tag(),
                    self.component,
                    self.status.human()
                ),
            },
        };
        match self.rehearsal {
            Some(_) => truncate(&format!("[REHEARSAL] {t}"), 200),
            None => truncate(&t, 200),
        }
    }

    /// A few lines for people: what, since when, why, from where.
    pub fn body_text(&self) -> String {
        let mut lines = Vec::new();
        let what = match self.kind {
            EventKind::Opened => format!(
                "{} is {} (new incident).",
                self.component,
                self.status.human()
            ),
            EventKind::Escalated => format!(
                "{} got worse: {} → {}.",
                self.component,
                self.previous.human(),
                self.status.human()
            ),
            EventKind::Deescalated => format!(
                "{} improved: {} → {}.",
                self.component,
                self.previous.human(),
                self.status.human()
            ),
            EventKind::Resolved => format!(
                "{} is operational again after {}.",
                self.component,
                human_span(self.duration_ms().unwrap_or(0))
            ),
            EventKind::MaintenanceStarted => format!("{} is under maintenance.", self.component),
            EventKind::MaintenanceEnded => format!(
                "{}: maintenance is over; it is operational.",
                self.component
            ),
            EventKind::Test => {
                "This is a test notification sent by `watchpost notify-test`. No action is needed."
                    .to_string()
            }
        };
        lines.push(what);
        if let Some(r) = &self.rehearsal {
            lines.push(format!(
                "REHEARSAL {r}: this is a drill (`watchpost rehearse`), not a real outage."
            ));
        }
        if let Some(c) = &self.cause {
            let label = if self.is_resolve() {
                "Last error"
            } else {
                "Cause"
            };
            lines.push(format!("{label}: {} [{}] {}", c.member, c.class, c.message));
        }
        for (label, v) in self.alert_lines() {
            lines.push(format!("{label}: {v}"));
        }
        if let Some(n) = &self.note {
            if !self.test {
                lines.push(format!("Note: {n}"));
            }
        }
        if let Some(h) = self.health_text() {
            lines.push(format!("Health: {h}"));
        }
        if self.flapping {
            lines.push(
                "The component is flapping: it stays in one incident until it settles.".into(),
            );
        }
        if let Some(o) = self.opened_at {
            if !self.test {
                lines.push(format!("Incident opened: {}", iso(o)));
            }
        }
        if let Some(id) = self.incident_id {
            lines.push(format!("Incident: #{id} ({})", self.dedup_key()));
        }
        lines.push(format!("Seen from: {} at {}", self.location, iso(self.at)));
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, status: Status) -> Event {
        Event {
            kind,
            component: "Realtime Transcription".into(),
            status,
            previous: Status::Operational,
            incident_id: Some(7),
            opened_at: Some(1_000),
            at: 1_000 + 432_000,
            flapping: false,
            cause: Some(Cause {
                member: "listen-deepgram".into(),
                class: "ws_closed".into(),
                message: "closed with 1011".into(),
            }),
            note: None,
            location: "eu-west-1".into(),
            details: None,
            test: false,
            installation: None,
            rehearsal: None,
        }
    }

    #[test]
    fn rehearsal_events_are_marked_and_keyed_apart() {
        let real = ev(EventKind::Opened, Status::MajorOutage);
        let drill = Event {
            rehearsal: Some("1700000000000".into()),
            ..real.clone()
        };
        assert!(drill
            .title()
            .starts_with("[REHEARSAL] [DOWN] Realtime Transcription"));
        assert!(drill.body_text().contains("REHEARSAL 1700000000000"));
        assert_ne!(drill.dedup_key(), real.dedup_key());
        assert_eq!(
            drill.dedup_key(),
            "watchpost/rehearsal/1700000000000/Realtime Transcription/7"
        );
        assert!(!real.title().contains("REHEARSAL"));
    }

    #[test]
    fn titles() {
        let table = [
            (
                EventKind::Opened,
                Status::MajorOutage,
                "[DOWN] Realtime Transcription: listen-deepgram: closed with 1011",
            ),
            (
                EventKind::Escalated,
                Status::PartialOutage,
                "[DOWN] Realtime Transcription: listen-deepgram: closed with 1011",
            ),
            (
                EventKind::Opened,
                Status::Degraded,
                "[DEGRADED] Realtime Transcription: listen-deepgram: closed with 1011",
            ),
            (
                EventKind::Resolved,
                Status::Operational,
                "[RESOLVED] Realtime Transcription after 7m 12s",
            ),
        ];
        for (k, s, want) in table {
            assert_eq!(ev(k, s).title(), want);
        }
        let mut e = ev(EventKind::Opened, Status::MajorOutage);
        assert_eq!(e.dedup_key(), "watchpost/Realtime Transcription/7");
        e.installation = Some("00c0ffee00c0ffee".into());
        assert_eq!(
            e.dedup_key(),
            "watchpost/00c0ffee00c0ffee/Realtime Transcription/7"
        );
    }

    #[test]
    fn spans_and_truncation() {
        for (ms, want) in [
            (0, "0s"),
            (45_000, "45s"),
            (432_000, "7m 12s"),
            (3_780_000, "1h 3m"),
            (93_600_000, "1d 2h"),
        ] {
            assert_eq!(human_span(ms), want);
        }
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert!(Event::test("x", 5)
            .dedup_key()
            .starts_with("watchpost/test/"));
    }
}
