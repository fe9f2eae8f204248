//! Inbound alerts: the Alertmanager webhook payload (version 4) and the Grafana webhook
//! contact point payload, read into [`Alert`]s, and which components an alert belongs to.
//! An alert becomes a member `alert:<alertname>/<fingerprint>` of each component it belongs
//! to; what that member does to the component is in [`super::state`] (`Input::Alert`).
//!
//! Not here: the HTTP routes and their refusals (see `crate::api`).

use std::collections::BTreeMap;

use chrono::DateTime;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::state::{Cause, ALERT_PREFIX};
use crate::notify::event::truncate;

/// Who sent a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Alertmanager,
    Grafana,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Alertmanager => "alertmanager",
            Source::Grafana => "grafana",
        }
    }
    fn human(self) -> &'static str {
        match self {
            Source::Alertmanager => "Alertmanager",
            Source::Grafana => "Grafana",
        }
    }
}

/// The parts of both payloads watchpost reads (they share the alert shape); other keys are
/// ignored, since both senders add fields over time.
#[derive(Deserialize)]
struct Payload {
    version: Option<String>,
    #[serde(default)]
    receiver: String,
    alerts: Vec<RawAlert>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawStatus {
    Firing,
    Resolved,
}

#[derive(Deserialize)]
struct RawAlert {
    status: RawStatus,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(rename = "startsAt", default)]
    starts_at: Option<String>,
    #[serde(rename = "endsAt", default)]
    ends_at: Option<String>,
    #[serde(rename = "generatorURL", default)]
    generator_url: Option<String>,
    #[serde(default)]
    fingerprint: Option<String>,
}

/// Longest alert name kept in a member name.
const MAX_NAME: usize = 100;
/// Longest summary (the cause message) and description kept.
const MAX_SUMMARY: usize = 300;
const MAX_DESCRIPTION: usize = 1000;
const MAX_URL: usize = 1000;
/// Labels kept in notification details, and the length of each key and value.
const MAX_LABELS: usize = 20;
const MAX_LABEL_VALUE: usize = 100;
/// Largest details blob one alert member keeps (bytes of JSON): it is stored with the
/// component's state, which holds up to `MAX_ALERT_MEMBERS` of them.
pub const MAX_ALERT_DETAILS: usize = 3072;

/// One alert from a payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub source: Source,
    /// The payload's `receiver`.
    pub receiver: String,
    pub firing: bool,
    /// The `alertname` label (Grafana: also the rule title), or `alert`.
    pub name: String,
    /// The sender's fingerprint (stable per label set), or one made from the labels.
    pub fingerprint: String,
    pub labels: BTreeMap<String, String>,
    pub summary: Option<String>,
    pub description: Option<String>,
    pub generator_url: Option<String>,
    /// `startsAt` (ms since the epoch), when given.
    pub starts_at: Option<i64>,
    /// `endsAt` (ms), when given and not the zero time.
    pub ends_at: Option<i64>,
}

/// Read a payload. Errors are sentences for the sender (HTTP 400).
pub fn parse(source: Source, body: &[u8]) -> Result<Vec<Alert>, String> {
    let p: Payload = serde_json::from_slice(body)
        .map_err(|e| format!("invalid {} webhook payload: {e}", source.human()))?;
    if source == Source::Alertmanager && p.version.as_deref() != Some("4") {
        return Err(format!(
            "unsupported Alertmanager webhook payload version {} (expected \"4\")",
            p.version
                .map_or_else(|| "(none)".to_string(), |v| format!("{v:?}"))
        ));
    }
    Ok(p.alerts
        .into_iter()
        .map(|a| Alert::from_raw(source, &p.receiver, a))
        .collect())
}

/// RFC 3339 to ms; the zero time (`0001-01-01T00:00:00Z`, "not ended") and garbage are `None`.
fn time(s: Option<&str>) -> Option<i64> {
    let t = DateTime::parse_from_rfc3339(s?).ok()?.timestamp_millis();
    (t > 0).then_some(t)
}

fn non_empty(s: Option<&String>, max: usize) -> Option<String> {
    s.map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| truncate(s, max))
}

impl Alert {
    fn from_raw(source: Source, receiver: &str, a: RawAlert) -> Alert {
        let name = a
            .labels
            .get("alertname")
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .map_or_else(|| "alert".to_string(), |n| truncate(n, MAX_NAME));
        // The sender's fingerprint when it looks like one (Alertmanager and Grafana send 16
        // hex digits); otherwise one of our own from the labels, which is as stable.
        let fingerprint = a
            .fingerprint
            .filter(|f| {
                !f.is_empty() && f.len() <= 64 && f.bytes().all(|b| b.is_ascii_alphanumeric())
            })
            .unwrap_or_else(|| {
                let mut h = Sha256::new();
                for (k, v) in &a.labels {
                    h.update(k.as_bytes());
                    h.update([0]);
                    h.update(v.as_bytes());
                    h.update([0]);
                }
                crate::notify::hex(&h.finalize()[..8])
            });
        Alert {
            source,
            receiver: truncate(receiver, MAX_LABEL_VALUE),
            firing: a.status == RawStatus::Firing,
            name,
            fingerprint,
            summary: non_empty(a.annotations.get("summary"), MAX_SUMMARY),
            description: non_empty(a.annotations.get("description"), MAX_DESCRIPTION),
            generator_url: non_empty(a.generator_url.as_ref(), MAX_URL),
            starts_at: time(a.starts_at.as_deref()),
            ends_at: time(a.ends_at.as_deref()),
            labels: a.labels,
        }
    }

    /// The component member this alert is: `alert:<alertname>/<fingerprint>`.
    pub fn member(&self) -> String {
        format!("{ALERT_PREFIX}{}/{}", self.name, self.fingerprint)
    }

    /// The `severity` label.
    pub fn severity(&self) -> Option<&str> {
        self.labels.get("severity").map(String::as_str)
    }

    /// The member, class `alert`, and the summary (else the description, else the name and
    /// severity) as the message.
    pub fn cause(&self) -> Cause {
        let message = self
            .summary
            .clone()
            .or_else(|| self.description.as_ref().map(|d| truncate(d, MAX_SUMMARY)))
            .unwrap_or_else(|| match self.severity() {
                Some(s) => format!("{} is firing (severity {s})", self.name),
                None => format!("{} is firing", self.name),
            });
        Cause {
            member: self.member(),
            class: "alert".into(),
            message,
        }
    }

    /// What notifications show of the alert (under `details.alert`), at most
    /// [`MAX_ALERT_DETAILS`] bytes: labels go first, then the description is shortened.
    pub fn details(&self) -> Value {
        let mut v = self.full_details();
        if v.to_string().len() > MAX_ALERT_DETAILS {
            v["alert"]["labels"] = json!("(omitted: too large)");
        }
        if v.to_string().len() > MAX_ALERT_DETAILS {
            v["alert"]["description"] = json!(self
                .description
                .as_deref()
                .map(|d| truncate(d, MAX_SUMMARY)));
        }
        v
    }

    fn full_details(&self) -> Value {
        let labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .take(MAX_LABELS)
            .map(|(k, v)| {
                (
                    truncate(k, MAX_LABEL_VALUE),
                    json!(truncate(v, MAX_LABEL_VALUE)),
                )
            })
            .collect();
        json!({"alert": {
            "source": self.source.as_str(),
            "receiver": self.receiver,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "status": if self.firing { "firing" } else { "resolved" },
            "severity": self.severity(),
            "summary": self.summary,
            "description": self.description,
            "generator_url": self.generator_url,
            "starts_at": self.starts_at.map(crate::notify::event::iso),
            "ends_at": self.ends_at.map(crate::notify::event::iso),
            "labels": labels,
        }})
    }

    /// Whether the alert belongs to the component `name` with `alert_labels`: its
    /// `component` label names it, or it carries every one of the `alert_labels`.
    pub fn belongs_to(&self, name: &str, alert_labels: &BTreeMap<String, String>) -> bool {
        self.labels.get("component").is_some_and(|c| c == name)
            || (!alert_labels.is_empty()
                && alert_labels
                    .iter()
                    .all(|(k, v)| self.labels.get(k) == Some(v)))
    }
}

/// What the evaluator did with one payload (the answer of the alert routes).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AlertReport {
    /// Alerts in the payload.
    pub received: usize,
    /// Alert memberships updated (an alert that belongs to two components counts twice).
    pub applied: usize,
    /// Older notifications than one already seen (a late firing after its resolve): ignored.
    pub stale: usize,
    /// Ignored because the component already tracks its maximum of firing alerts.
    pub dropped: usize,
    /// The components the payload touched.
    pub components: Vec<String>,
    /// Alerts that belong to no component (`alert:<alertname>/<fingerprint>`): accepted,
    /// logged, and otherwise ignored.
    pub unmatched: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const AM: &str = r#"{
      "version": "4", "groupKey": "{}:{alertname=\"Latency\"}", "truncatedAlerts": 0,
      "status": "firing", "receiver": "watchpost",
      "groupLabels": {"alertname": "Latency"}, "commonLabels": {}, "commonAnnotations": {},
      "externalURL": "http://am:9093",
      "alerts": [
        {"status": "firing", "labels": {"alertname": "Latency", "service": "listen", "severity": "critical"},
         "annotations": {"summary": "p95 over 2s", "description": "The listen p95 is 3.1s."},
         "startsAt": "2026-11-22T10:00:00.5Z", "endsAt": "0001-01-01T00:00:00Z",
         "generatorURL": "http://prom:9090/graph?g0.expr=x", "fingerprint": "a1b2c3d4e5f60718"},
        {"status": "resolved", "labels": {"alertname": "Errors", "component": "API"},
         "annotations": {}, "startsAt": "2026-11-22T09:00:00Z", "endsAt": "2026-11-22T09:30:00Z",
         "generatorURL": "", "fingerprint": "../../etc"}
      ]}"#;

    #[test]
    fn alertmanager_payload_is_read() {
        let a = parse(Source::Alertmanager, AM.as_bytes()).expect("parse");
        assert_eq!(a.len(), 2);
        assert!(a[0].firing);
        assert_eq!(a[0].member(), "alert:Latency/a1b2c3d4e5f60718");
        assert_eq!(a[0].severity(), Some("critical"));
        assert_eq!(a[0].cause().message, "p95 over 2s");
        assert_eq!(a[0].starts_at, Some(1_795_341_600_500));
        assert_eq!(a[0].ends_at, None, "the zero time is not an end");
        let d = a[0].details();
        assert_eq!(
            d["alert"]["generator_url"],
            "http://prom:9090/graph?g0.expr=x"
        );
        assert_eq!(d["alert"]["description"], "The listen p95 is 3.1s.");
        // A fingerprint that is not one is replaced by a stable one from the labels.
        assert!(!a[1].firing);
        assert_eq!(a[1].fingerprint.len(), 16);
        assert_eq!(
            a[1].fingerprint,
            parse(Source::Alertmanager, AM.as_bytes()).unwrap()[1].fingerprint
        );
        assert_eq!(a[1].generator_url, None);
        assert_eq!(a[1].cause().message, "Errors is firing");
    }

    #[test]
    fn details_stay_small_whatever_the_alert_carries() {
        let labels: serde_json::Map<String, Value> = (0..100)
            .map(|i| {
                (
                    format!("label{i}{}", "k".repeat(300)),
                    json!("v".repeat(5000)),
                )
            })
            .collect();
        let body = json!({"version": "4", "alerts": [{
            "status": "firing", "labels": labels,
            "annotations": {"summary": "s".repeat(5000), "description": "d".repeat(50_000)},
            "generatorURL": format!("http://x/{}", "u".repeat(50_000)),
        }]});
        let a = &parse(Source::Alertmanager, body.to_string().as_bytes()).unwrap()[0];
        let d = a.details().to_string();
        assert!(d.len() <= MAX_ALERT_DETAILS, "{} bytes", d.len());
        assert!(a.cause().message.chars().count() <= MAX_SUMMARY);
        assert!(a.member().len() < 200);
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let cases = [
            (
                Source::Alertmanager,
                "{",
                "invalid Alertmanager webhook payload: EOF",
            ),
            (
                Source::Alertmanager,
                r#"{"version":"3","alerts":[]}"#,
                "version \"3\" (expected \"4\")",
            ),
            (Source::Alertmanager, r#"{"alerts":[]}"#, "version (none)"),
            (
                Source::Grafana,
                r#"{"alerts":[{"status":"pending"}]}"#,
                "unknown variant `pending`",
            ),
            (
                Source::Grafana,
                r#"{"status":"firing"}"#,
                "missing field `alerts`",
            ),
            (Source::Grafana, r#"[1]"#, "invalid Grafana webhook payload"),
        ];
        for (src, body, want) in cases {
            let e = parse(src, body.as_bytes()).expect_err(body);
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn membership_by_component_label_or_all_alert_labels() {
        let a = |labels: &[(&str, &str)]| Alert {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..parse(Source::Grafana, br#"{"alerts":[{"status":"firing"}]}"#).unwrap()[0].clone()
        };
        let want: BTreeMap<String, String> = [
            ("service".into(), "listen".into()),
            ("env".into(), "prod".into()),
        ]
        .into();
        let none = BTreeMap::new();
        let table = [
            (a(&[("component", "API")]), "API", &none, true),
            (a(&[("component", "API")]), "Other", &none, false),
            (
                a(&[("service", "listen"), ("env", "prod"), ("x", "y")]),
                "T",
                &want,
                true,
            ),
            (a(&[("service", "listen")]), "T", &want, false),
            (
                a(&[("service", "listen"), ("env", "dev")]),
                "T",
                &want,
                false,
            ),
            (a(&[]), "T", &none, false),
        ];
        for (alert, name, labels, belongs) in table {
            assert_eq!(
                alert.belongs_to(name, labels),
                belongs,
                "{:?} {name}",
                alert.labels
            );
        }
    }
}
