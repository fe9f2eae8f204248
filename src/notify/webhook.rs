//! Webhook: a JSON `POST` per event to your own endpoint (e.g. a mitigation hook that pauses
//! outbound calls while a component is down and resumes them on resolve), in one of two
//! formats:
//!
//! - `watchpost`: the documented event below;
//! - `grafana`: the Grafana webhook contact-point shape (`status: firing|resolved`, `alerts`,
//!   stable `groupKey`/`fingerprint` per incident), so Grafana-style receivers — including
//!   Instatus's Grafana integration — accept it.
//!
//! Headers on every request:
//! - `Content-Type: application/json`
//! - `X-Watchpost-Event`: the event kind (`opened`, `escalated`, `deescalated`, `resolved`,
//!   `maintenance_started`, `maintenance_ended`, `test`)
//! - `X-Watchpost-Delivery`: a delivery id, stable across retries of the same notification
//!   (use it to ignore duplicates): `<installation>-<notifier>-<outbox id>`
//! - `X-Watchpost-Signature: sha256=<hex>` (when `secret_env` is set): HMAC-SHA256 of the raw
//!   request body with the secret as key. Verify it over the exact bytes received, before
//!   parsing, with a constant-time comparison.
//!
//! The `watchpost` format:
//! ```json
//! {"version": 1, "event": "incident.opened", "delivery_id": 42, "test": false,
//!  "component": "Realtime Transcription", "status": "major_outage",
//!  "previous_status": "operational",
//!  "incident": {"id": 7, "key": "watchpost/3f9c0a1b2d4e6f70/Realtime Transcription/7",
//!               "opened_at": "2026-05-01T10:00:00.000Z", "resolved_at": null,
//!               "duration_seconds": 0, "flapping": false},
//!  "cause": {"member": "listen-deepgram", "class": "ws_closed", "message": "…"},
//!  "note": null, "title": "[DOWN] Realtime Transcription: listen-deepgram: …",
//!  "text": "…", "location": "eu-west-1", "installation": "3f9c0a1b2d4e6f70",
//!  "timestamp": "2026-05-01T10:00:00.000Z",
//!  "details": {…}}
//! ```
//! `event` is `incident.opened|escalated|deescalated|resolved`,
//! `component.maintenance_started|maintenance_ended`, or `test`; `incident` is null for
//! maintenance and test events.

use std::collections::BTreeMap;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::event::{iso, Event, EventKind};
use super::{BoxFuture, Ctx, DeliveryError, DeliveryOptions, Destination, Spec};
use crate::config::{Errors, Interp, Rest, Secret, SpanError};
use crate::review::ReviewMessage;

/// Body format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The documented watchpost event.
    #[default]
    Watchpost,
    /// The Grafana webhook contact-point shape.
    Grafana,
}

fn default_signature_header() -> String {
    "X-Watchpost-Signature".into()
}

fn default_content_type() -> String {
    "application/json".into()
}

/// `[notifier.NAME]` with `kind = "webhook"`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Endpoint receiving the `POST`s.
    pub url: Interp,
    /// Environment variable holding the HMAC-SHA256 signing secret (recommended).
    pub secret_env: Option<Secret>,
    /// Header carrying the signature `sha256=<hex>`.
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    /// Body format: `watchpost` (default) or `grafana`.
    #[serde(default)]
    pub format: Format,
    /// Extra request headers, e.g. `{ Authorization = "Bearer ${HOOK_TOKEN}" }`.
    #[serde(default)]
    pub headers: BTreeMap<String, Interp>,
    /// Only these events (`opened`, `escalated`, `deescalated`, `resolved`,
    /// `maintenance_started`, `maintenance_ended`); default: all.
    pub events: Option<Vec<String>>,
    /// Sent as Grafana's `externalURL`/`generatorURL` (e.g. your watchpost dashboard).
    pub external_url: Option<Interp>,
    /// A minijinja template that renders the body instead of `format` (Slack, Teams, your
    /// app's own `/health/alert`); variables: see the README.
    pub body_template: Option<String>,
    /// `Content-Type` of a templated body; `application/json` bodies must render to JSON.
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// Retry, rate limit and timeout settings.
    #[serde(default)]
    pub delivery: DeliveryOptions,
}

const EVENT_NAMES: &[&str] = &[
    "opened",
    "escalated",
    "deescalated",
    "resolved",
    "maintenance_started",
    "maintenance_ended",
];

pub fn parse(rest: Rest<'_>) -> Result<Arc<dyn Spec>, Errors> {
    super::parse_with::<WebhookConfig, _>(rest, |c, _span, errs| {
        if let Err(m) = super::check_http_url(&c.url) {
            errs.push(SpanError::key(&["url"], format!("url: {m}")));
        }
        for e in c.events.iter().flatten() {
            if !EVENT_NAMES.contains(&e.as_str()) {
                errs.push(SpanError::key(
                    &["events"],
                    format!(
                        "unknown event {e:?} in events (expected {})",
                        EVENT_NAMES.join(", ")
                    ),
                ));
            }
        }
        for k in c.headers.keys().chain(std::iter::once(&c.signature_header)) {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                errs.push(SpanError::key(
                    &["headers", k],
                    format!("invalid header name {k:?}"),
                ));
            }
        }
        for (k, v) in &c.headers {
            if reqwest::header::HeaderValue::from_str(v).is_err() {
                errs.push(SpanError::key(
                    &["headers", k],
                    format!("invalid value for header {k:?}"),
                ));
            }
        }
        if reqwest::header::HeaderValue::from_str(&c.content_type).is_err() {
            errs.push(SpanError::key(
                &["content_type"],
                format!("invalid content_type {:?}", c.content_type),
            ));
        }
        if let Some(t) = &c.body_template {
            errs.check(check_template(c, t));
        }
    })
}

/// A `body_template`'s variables, and its rendering against a sample of every event kind it
/// is sent, so a syntax error or a misspelt variable is a config error now, not a dead letter
/// during an outage.
fn check_template(c: &WebhookConfig, t: &str) -> Result<(), SpanError> {
    let at = |m: String| SpanError::key(&["body_template"], format!("body_template: {m}"));
    check_variables(t).map_err(at)?;
    use EventKind as K;
    let kinds = [
        K::Opened,
        K::Escalated,
        K::Deescalated,
        K::Resolved,
        K::MaintenanceStarted,
        K::MaintenanceEnded,
    ];
    let wanted = |k: &K| {
        c.events
            .as_ref()
            .is_none_or(|l| l.iter().any(|e| e == k.as_str()))
    };
    for kind in kinds.into_iter().filter(wanted) {
        let mut ev = Event::test("validate", 0);
        ev.test = false;
        ev.kind = kind;
        ev.component = "validate".into();
        let maintenance = matches!(kind, K::MaintenanceStarted | K::MaintenanceEnded);
        ev.incident_id = (!maintenance).then_some(1);
        render(t, &c.content_type, &ev, Some(1)).map_err(at)?;
    }
    Ok(())
}

/// The variables a `body_template` sees: the `watchpost` body (its `rehearsal` included)
/// plus `kind` (`opened`, `resolved`, …) and `reason`.
pub fn template_vars(ev: &Event, delivery_id: Option<i64>) -> Value {
    let mut v = watchpost_body(ev, delivery_id);
    v["kind"] = json!(ev.kind.as_str());
    // Why, in one line: the maintenance or manual-resolve note, else the cause.
    v["reason"] = json!(ev
        .note
        .clone()
        .or_else(|| ev.cause_text())
        .unwrap_or_else(|| ev.title()));
    // `rehearsal` (true for a drill's notifications) is in the body already.
    v
}

/// Every variable the template reads must be one of [`template_vars`]'s (strict rendering
/// alone lets a misspelt name through a filter such as `tojson`).
fn check_variables(template: &str) -> Result<(), String> {
    let env = minijinja::Environment::new();
    let t = env.template_from_str(template).map_err(|e| e.to_string())?;
    let known = template_vars(&Event::test("validate", 0), None);
    let mut unknown: Vec<String> = t
        .undeclared_variables(false)
        .into_iter()
        // minijinja's global functions are not variables.
        .filter(|v| known.get(v).is_none() && env.globals().all(|(g, _)| g != v.as_str()))
        .collect();
    unknown.sort();
    match unknown.first() {
        None => Ok(()),
        Some(_) => {
            let mut names: Vec<&str> = known
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            names.sort_unstable();
            Err(format!(
                "unknown variable {} (known: {})",
                unknown.join(", "),
                names.join(", ")
            ))
        }
    }
}

/// Render `template` for `ev`; a JSON content type must come out as JSON.
pub fn render(
    template: &str,
    content_type: &str,
    ev: &Event,
    delivery_id: Option<i64>,
) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    // A misspelt variable is an error, not an empty string in a mitigation request.
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    let out = env
        .render_str(template, template_vars(ev, delivery_id))
        .map_err(|e| {
            let mut m = e.to_string();
            if let Some(d) = e.detail() {
                m.push_str(&format!(" ({d})"));
            }
            m
        })?;
    if content_type.contains("json") {
        if let Err(e) = serde_json::from_str::<Value>(&out) {
            return Err(format!(
                "renders to invalid JSON ({e}): {}",
                super::event::truncate(&out, 200)
            ));
        }
    }
    Ok(out)
}

impl Spec for WebhookConfig {
    fn kind(&self) -> &'static str {
        "webhook"
    }
    fn delivery(&self) -> &DeliveryOptions {
        &self.delivery
    }
    fn accepts(&self, ev: &Event) -> bool {
        if ev.kind == EventKind::Test {
            return true;
        }
        if self.format == Format::Grafana
            && matches!(
                ev.kind,
                EventKind::MaintenanceStarted | EventKind::MaintenanceEnded
            )
        {
            // Grafana receivers only know firing and resolved; maintenance is neither.
            return false;
        }
        match &self.events {
            Some(list) => list.iter().any(|e| e == ev.kind.as_str()),
            None => true,
        }
    }
    fn carries_reviews(&self) -> bool {
        true
    }
    fn build(&self) -> anyhow::Result<Arc<dyn Destination>> {
        Ok(Arc::new(self.clone()))
    }
}

/// `sha256=<hex>` HMAC of `body` with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(body);
    format!("sha256={}", super::hex(&mac.finalize().into_bytes()))
}

/// The `watchpost` webhook body.
pub fn watchpost_body(ev: &Event, delivery_id: Option<i64>) -> Value {
    let event = match ev.kind {
        EventKind::Test => "test".to_string(),
        EventKind::MaintenanceStarted | EventKind::MaintenanceEnded => {
            format!("component.{}", ev.kind.as_str())
        }
        k => format!("incident.{}", k.as_str()),
    };
    let incident = match (ev.incident_id, ev.test) {
        (Some(id), false) => json!({
            "id": id,
            "key": ev.dedup_key(),
            "opened_at": ev.opened_at.map(iso),
            "resolved_at": ev.is_resolve().then(|| iso(ev.at)),
            "duration_seconds": ev.duration_ms().map(|d| d / 1000),
            "flapping": ev.flapping,
        }),
        _ => Value::Null,
    };
    json!({
        "version": 1,
        "event": event,
        "delivery_id": delivery_id,
        "test": ev.test,
        "rehearsal": ev.rehearsal.is_some(),
        "component": ev.component,
        "status": ev.status.as_str(),
        "previous_status": ev.previous.as_str(),
        "incident": incident,
        "cause": ev.cause,
        "note": ev.note,
        "title": ev.title(),
        "text": ev.body_text(),
        "location": ev.location,
        "installation": ev.installation,
        "timestamp": iso(ev.at),
        "details": ev.details,
    })
}

/// The Grafana-shaped body; `receiver` is the notifier name.
pub fn grafana_body(ev: &Event, receiver: &str, external_url: &str) -> Value {
    let resolved = ev.is_resolve();
    let status = if resolved { "resolved" } else { "firing" };
    let key = ev.dedup_key();
    let fingerprint = super::hex(&Sha256::digest(key.as_bytes())[..8]);
    let mut labels = json!({
        "alertname": ev.component,
        "component": ev.component,
        "severity": super::pagerduty::severity(ev.status),
        "status": ev.status.as_str(),
        "location": ev.location,
        "source": "watchpost",
    });
    if let Some(c) = &ev.cause {
        labels["member"] = json!(c.member);
        labels["class"] = json!(c.class);
    }
    let annotations = json!({"summary": ev.title(), "description": ev.body_text()});
    let alert = json!({
        "status": status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": iso(ev.opened_at.unwrap_or(ev.at)),
        "endsAt": if resolved { iso(ev.at) } else { "0001-01-01T00:00:00Z".to_string() },
        "generatorURL": external_url,
        "fingerprint": fingerprint,
    });
    json!({
        "receiver": receiver,
        "status": status,
        "orgId": 1,
        "alerts": [alert],
        "groupLabels": {"alertname": ev.component},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": external_url,
        "version": "1",
        "groupKey": key,
        "truncatedAlerts": 0,
        "title": format!("[{}] {}", status.to_uppercase(), ev.component),
        "state": if resolved { "ok" } else { "alerting" },
        "message": ev.body_text(),
    })
}

impl WebhookConfig {
    async fn post(&self, ctx: &Ctx, ev: &Event) -> Result<(), DeliveryError> {
        let ext = self.external_url.as_deref().unwrap_or("");
        let bytes = match (&self.body_template, self.format) {
            (Some(t), _) => render(t, &self.content_type, ev, ctx.delivery_id)
                .map_err(|m| DeliveryError::Invalid(format!("body_template: {m}")))?
                .into_bytes(),
            (None, Format::Watchpost) => {
                serde_json::to_vec(&watchpost_body(ev, ctx.delivery_id))
                    .map_err(|e| DeliveryError::Invalid(format!("encoding body: {e}")))?
            }
            (None, Format::Grafana) => serde_json::to_vec(&grafana_body(ev, &ctx.notifier, ext))
                .map_err(|e| DeliveryError::Invalid(format!("encoding body: {e}")))?,
        };
        let content_type = match self.body_template {
            Some(_) => self.content_type.as_str(),
            None => "application/json",
        };
        // Unique across agents and databases, like the incident key.
        let inst = ev
            .installation
            .as_deref()
            .map(|i| format!("{i}-"))
            .unwrap_or_default();
        let delivery = match ctx.delivery_id {
            Some(id) => format!("{inst}{}-{id}", ctx.notifier),
            None => format!("{inst}{}-test-{}", ctx.notifier, ev.at),
        };
        let mut req = ctx
            .client
            .post(self.url.as_str())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header("X-Watchpost-Event", ev.kind.as_str())
            .header("X-Watchpost-Delivery", delivery);
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(secret) = &self.secret_env {
            req = req.header(
                self.signature_header.as_str(),
                signature(secret.expose().as_bytes(), &bytes),
            );
        }
        ctx.send(req.body(bytes)).await.map(|_| ())
    }
}

impl WebhookConfig {
    /// POST a review's JSON (`X-Watchpost-Event: review`), signed like every event.
    async fn post_review(&self, ctx: &Ctx, r: &ReviewMessage) -> Result<(), DeliveryError> {
        let mut req = ctx
            .client
            .post(self.url.as_str())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Watchpost-Event", "review")
            .header(
                "X-Watchpost-Delivery",
                format!("{}-review-{}-{}", ctx.notifier, r.review, r.slot_ms),
            );
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(secret) = &self.secret_env {
            req = req.header(
                self.signature_header.as_str(),
                signature(secret.expose().as_bytes(), &r.json),
            );
        }
        ctx.send(req.body(r.json.clone())).await.map(|_| ())
    }
}

impl Destination for WebhookConfig {
    fn deliver<'a>(
        &'a self,
        ctx: &'a Ctx,
        ev: &'a Event,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(self.post(ctx, ev))
    }

    fn test<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let ev = Event::test(&ctx.location, chrono::Utc::now().timestamp_millis());
            self.post(ctx, &ev).await?;
            Ok(format!(
                "posted a test event to {}",
                crate::redact::redact_url(self.url.as_str())
            ))
        })
    }

    fn review<'a>(
        &'a self,
        ctx: &'a Ctx,
        msg: &'a ReviewMessage,
    ) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            self.post_review(ctx, msg).await?;
            Ok(format!(
                "posted the review to {}",
                crate::redact::redact_url(self.url.as_str())
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn grafana_pair_keeps_keys() {
        let mut ev = Event::test("here", 1000);
        ev.test = false;
        ev.kind = EventKind::Opened;
        ev.incident_id = Some(3);
        ev.component = "API".into();
        let open = grafana_body(&ev, "hook", "");
        ev.kind = EventKind::Resolved;
        ev.at = 5000;
        let res = grafana_body(&ev, "hook", "");
        assert_eq!(open["status"], "firing");
        assert_eq!(res["status"], "resolved");
        assert_eq!(open["groupKey"], res["groupKey"]);
        assert_eq!(
            open["alerts"][0]["fingerprint"],
            res["alerts"][0]["fingerprint"]
        );
        assert_eq!(open["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(res["alerts"][0]["endsAt"], "1970-01-01T00:00:05.000Z");
    }
}
