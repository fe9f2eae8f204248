//! PagerDuty Events API v2: `trigger` when an incident opens or escalates, `resolve` when it
//! resolves, keyed by `dedup_key = watchpost/<component>/<incident id>` — stable per
//! incident, so a retry or a restart never opens a second alert and the resolve always
//! closes the right one.
//!
//! Wire shape: see PROTOCOLS.md. 202 is success, 400 is a bad event (dead-lettered), 429 and
//! 5xx are retried.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::event::{iso, truncate, Event, EventKind, Status};
use super::{BoxFuture, Ctx, DeliveryError, DeliveryOptions, Destination, Spec};
use crate::config::{Errors, Interp, Rest, Secret, SpanError};

fn default_events_url() -> Interp {
    Interp::literal("https://events.pagerduty.com/v2/enqueue")
}

/// A link shown on the alert.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Target URL.
    pub href: Interp,
    /// Link text.
    pub text: String,
}

/// `[notifier.NAME]` with `kind = "pagerduty"`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PagerDutyConfig {
    /// Environment variable holding the Events API v2 integration key (routing key).
    pub routing_key_env: Secret,
    /// Events API endpoint (override for tests or a proxy).
    #[serde(default = "default_events_url")]
    pub events_url: Interp,
    /// URL of your dashboard: sent as `client_url` and as the first link of each alert.
    pub client_url: Option<Interp>,
    /// More links shown on each alert (`[{ href = "…", text = "runbook" }]`).
    #[serde(default)]
    pub links: Vec<Link>,
    /// Retry, rate limit (default 2/s) and timeout settings.
    #[serde(default)]
    pub delivery: DeliveryOptions,
}

pub fn parse(rest: Rest<'_>) -> Result<Arc<dyn Spec>, Errors> {
    super::parse_with::<PagerDutyConfig, _>(rest, |c, _span, errs| {
        if let Err(m) = super::check_http_url(&c.events_url) {
            errs.push(SpanError::key(&["events_url"], format!("events_url: {m}")));
        }
        if let Some(Err(m)) = c.client_url.as_ref().map(|u| super::check_http_url(u)) {
            errs.push(SpanError::key(&["client_url"], format!("client_url: {m}")));
        }
    })
}

impl Spec for PagerDutyConfig {
    fn kind(&self) -> &'static str {
        "pagerduty"
    }
    fn delivery(&self) -> &DeliveryOptions {
        &self.delivery
    }
    fn default_rate(&self) -> f64 {
        2.0
    }
    fn accepts(&self, ev: &Event) -> bool {
        // De-escalations and maintenance do not page; the alert stays open until resolved.
        matches!(
            ev.kind,
            EventKind::Opened | EventKind::Escalated | EventKind::Resolved | EventKind::Test
        )
    }
    fn build(&self) -> anyhow::Result<Arc<dyn Destination>> {
        Ok(Arc::new(self.clone()))
    }
}

/// PagerDuty severity for a component status.
pub fn severity(s: Status) -> &'static str {
    match s {
        Status::MajorOutage => "critical",
        Status::PartialOutage => "error",
        Status::Degraded => "warning",
        Status::Operational | Status::Maintenance => "info",
    }
}

impl PagerDutyConfig {
    /// The Events v2 body for `ev`.
    pub fn body(&self, ev: &Event) -> Value {
        let key = self.routing_key_env.expose();
        if ev.kind == EventKind::Resolved {
            return json!({"routing_key": key, "dedup_key": ev.dedup_key(), "event_action": "resolve"});
        }
        let member = ev.cause.as_ref().map(|c| c.member.as_str()).unwrap_or("");
        let probe = member.split('/').next().unwrap_or(member);
        let mut custom = json!({
            "component": ev.component,
            "status": ev.status.as_str(),
            "previous_status": ev.previous.as_str(),
            "incident_id": ev.incident_id,
            "opened_at": ev.opened_at.map(iso),
            "location": ev.location,
            "flapping": ev.flapping,
        });
        if let Some(c) = &ev.cause {
            custom["member"] = json!(c.member);
            custom["error_class"] = json!(c.class);
            custom["last_error"] = json!(c.message);
        }
        if let Some(n) = &ev.note {
            custom["note"] = json!(n);
        }
        if let Some(h) = ev.health() {
            // The health details the probe named, where a responder looks first.
            custom["health"] = Value::Object(h.clone());
        }
        match ev.details.as_ref().map(|d| (d.get("alert"), d)) {
            // The inbound alert behind the status: summary, description, labels, source.
            Some((Some(a), _)) => custom["alert"] = a.clone(),
            // WER, transcript, phase latencies… of the run that caused the status.
            Some((None, d)) => custom["run"] = d.clone(),
            None => {}
        }
        let mut payload = json!({
            "summary": truncate(&ev.title(), 1024),
            "source": ev.location,
            "severity": if ev.test { "info" } else { severity(ev.status) },
            "timestamp": iso(ev.at),
            "component": ev.component,
            "custom_details": custom,
        });
        if !probe.is_empty() {
            payload["group"] = json!(probe);
        }
        if let Some(c) = &ev.cause {
            payload["class"] = json!(c.class);
        }
        let mut body = json!({
            "routing_key": key,
            "event_action": "trigger",
            "dedup_key": ev.dedup_key(),
            "payload": payload,
            "client": "watchpost",
        });
        let mut links: Vec<Value> = Vec::new();
        if let Some(u) = &self.client_url {
            body["client_url"] = json!(u.as_str());
            links.push(json!({"href": u.as_str(), "text": "watchpost dashboard"}));
        }
        if let Some(u) = ev
            .details
            .as_ref()
            .and_then(|d| d["alert"]["generator_url"].as_str())
        {
            links.push(json!({"href": u, "text": "alert source"}));
        }
        links.extend(
            self.links
                .iter()
                .map(|l| json!({"href": l.href.as_str(), "text": l.text})),
        );
        if !links.is_empty() {
            body["links"] = Value::Array(links);
        }
        body
    }

    async fn post(&self, ctx: &Ctx, body: &Value) -> Result<(), DeliveryError> {
        ctx.send(ctx.client.post(self.events_url.as_str()).json(body))
            .await
            .map(|_| ())
    }
}

impl Destination for PagerDutyConfig {
    fn deliver<'a>(
        &'a self,
        ctx: &'a Ctx,
        ev: &'a Event,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move { self.post(ctx, &self.body(ev)).await })
    }

    fn test<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let ev = Event::test(&ctx.location, chrono::Utc::now().timestamp_millis());
            self.post(ctx, &self.body(&ev)).await?;
            let mut resolve = ev.clone();
            resolve.kind = EventKind::Resolved;
            self.post(ctx, &self.body(&resolve)).await?;
            Ok(format!(
                "triggered and resolved a test alert (dedup_key {})",
                ev.dedup_key()
            ))
        })
    }
}
