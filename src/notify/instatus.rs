//! Instatus status pages, in one of two modes:
//!
//! - **API** (`page_id`, `api_key_env`, `components`): the component's status follows the
//!   evaluator (`PUT /v1/{page}/components/{id}`), an incident is opened
//!   (`POST /v1/{page}/incidents`, INVESTIGATING, with `statuses`), updated on escalation and
//!   de-escalation, and resolved (`POST …/incident-updates` RESOLVED, component back to
//!   OPERATIONAL). Maintenance windows set UNDERMAINTENANCE. The Instatus incident id is
//!   stored in SQLite, so updates and the resolve reach the same incident after a restart.
//! - **Integration** (`webhooks`): per-component monitoring-integration webhooks, no API key:
//!   `{"trigger":"down"}` when an incident opens and `{"trigger":"up"}` when it resolves.
//!
//! Requests are rate limited (default 1/s: Instatus's limits are unconfirmed) and a delivery
//! that makes several requests records each finished step, so a retry never opens a second
//! incident or posts the same update twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::event::{iso, Event, EventKind, Status};
use super::{BoxFuture, Ctx, DeliveryError, DeliveryOptions, Destination, Retry, Spec};
use crate::config::{Errors, Interp, Rest, Secret, SpanError};

fn default_base_url() -> Interp {
    Interp::literal("https://api.instatus.com")
}
fn yes() -> bool {
    true
}

/// `[notifier.NAME]` with `kind = "instatus"`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstatusConfig {
    /// API mode: the status page id.
    pub page_id: Option<Interp>,
    /// API mode: environment variable holding the Instatus API key.
    pub api_key_env: Option<Secret>,
    /// API base URL (overridable for tests).
    #[serde(default = "default_base_url")]
    pub base_url: Interp,
    /// API mode: watchpost component name → Instatus component id.
    #[serde(default)]
    pub components: BTreeMap<String, Interp>,
    /// Integration mode: watchpost component name → monitoring-integration webhook (the full
    /// `https://api.instatus.com/v3/integrations/webhook/…` URL, or just its id).
    #[serde(default)]
    pub webhooks: BTreeMap<String, Interp>,
    /// API mode: open status-page incidents (false: only component statuses change).
    #[serde(default = "yes")]
    pub incidents: bool,
    /// API mode: let Instatus notify the page's subscribers about incidents and updates.
    #[serde(default = "yes")]
    pub notify_subscribers: bool,
    /// Retry, rate limit (default 1/s) and timeout settings.
    #[serde(default)]
    pub delivery: DeliveryOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Api,
    Integration,
}

pub fn parse(rest: Rest<'_>) -> Result<Arc<dyn Spec>, Errors> {
    super::parse_with::<InstatusConfig, _>(rest, |c, span, errs| {
        let mut err = |m: &str| errs.push(SpanError::at(span.clone(), m.to_string()));
        let api = c.page_id.is_some() || c.api_key_env.is_some() || !c.components.is_empty();
        let integration = !c.webhooks.is_empty();
        match (api, integration) {
            (true, true) => err("use either the API (page_id, api_key_env, components) or integration webhooks (webhooks), not both"),
            (false, false) => err("needs page_id, api_key_env and components (API mode) or webhooks (integration mode)"),
            (true, false) => {
                if c.page_id.as_deref().is_none_or(str::is_empty) {
                    err("API mode needs page_id");
                }
                if c.api_key_env.is_none() {
                    err("API mode needs api_key_env");
                }
                if c.components.is_empty() {
                    err("API mode needs components = { \"<watchpost component>\" = \"<Instatus component id>\" }");
                }
            }
            (false, true) => {}
        }
        for (name, w) in &c.webhooks {
            if w.is_empty() || (!w.starts_with("http") && w.contains('/')) {
                err(&format!("webhooks.{name:?}: expected a webhook URL or id"));
            }
        }
        if let Err(m) = super::check_http_url(&c.base_url) {
            errs.push(SpanError::key(&["base_url"], format!("base_url: {m}")));
        }
        for (name, w) in c.webhooks.iter().filter(|(_, w)| w.starts_with("http")) {
            if let Err(m) = super::check_http_url(w) {
                errs.push(SpanError::key(
                    &["webhooks", name],
                    format!("webhooks.{name:?}: {m}"),
                ));
            }
        }
    })
}

/// Instatus component status for a watchpost status.
pub fn component_status(s: Status) -> &'static str {
    match s {
        Status::Operational => "OPERATIONAL",
        Status::Maintenance => "UNDERMAINTENANCE",
        Status::Degraded => "DEGRADEDPERFORMANCE",
        Status::PartialOutage => "PARTIALOUTAGE",
        Status::MajorOutage => "MAJOROUTAGE",
    }
}

/// The suffix of a status-page incident's name that ties it to watchpost incident `id`.
/// A rehearsal's incidents carry its run id too: their numbers restart at 1 in the
/// rehearsal's own store and must never adopt a real incident's page entry.
fn incident_marker(id: i64, rehearsal: Option<&str>) -> String {
    match rehearsal {
        Some(r) => format!(" (#rehearsal-{r}-{id})"),
        None => format!(" (#{id})"),
    }
}

/// An Instatus id (a string, or a number in some answers).
fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The id of the first unresolved incident in a `GET /v1/{page}/incidents` answer (an array,
/// or an object with `incidents`) whose name ends with `marker`.
fn find_marked(text: &str, marker: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    let list = v
        .as_array()
        .or_else(|| v.get("incidents").and_then(Value::as_array))?;
    list.iter()
        .filter(|i| {
            i.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| n.ends_with(marker))
        })
        .filter(|i| i.get("status").and_then(Value::as_str) != Some("RESOLVED"))
        .find_map(|i| i.get("id").and_then(id_string))
}

impl InstatusConfig {
    fn mode(&self) -> Mode {
        if self.webhooks.is_empty() {
            Mode::Api
        } else {
            Mode::Integration
        }
    }

    fn api(&self, path: &str) -> String {
        format!(
            "{}/v1/{}{path}",
            self.base_url.trim_end_matches('/'),
            self.page_id.as_deref().unwrap_or("")
        )
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key_env {
            Some(k) => req.bearer_auth(k.expose()),
            None => req,
        }
    }

    fn webhook_url(&self, component: &str) -> Option<String> {
        let w = self.webhooks.get(component)?;
        Some(if w.starts_with("http") {
            w.to_string()
        } else {
            format!(
                "{}/v3/integrations/webhook/{}",
                self.base_url.trim_end_matches('/'),
                w.as_str()
            )
        })
    }

    async fn put_component(
        &self,
        ctx: &Ctx,
        cid: &str,
        status: Status,
    ) -> Result<(), DeliveryError> {
        let req = self
            .auth(ctx.client.put(self.api(&format!("/components/{cid}"))))
            .json(&json!({"status": component_status(status)}));
        ctx.send(req).await.map(|_| ())
    }

    /// Open the status-page incident (once per watchpost incident) and remember its id.
    ///
    /// Instatus has no idempotency key, so a POST that was accepted but whose answer never
    /// reached us (a timeout, a crash before the id was stored) would open a second incident
    /// on retry. The name carries a marker (` (#<incident id>)`), a flag is stored before
    /// every POST, and a retry with the flag set first looks for an unresolved incident with
    /// that marker and adopts it.
    async fn open(
        &self,
        ctx: &Ctx,
        ev: &Event,
        cid: &str,
        incident: i64,
    ) -> Result<(), DeliveryError> {
        if ctx.get_ref(incident, "incident").await?.is_some() {
            return Ok(());
        }
        let marker = incident_marker(incident, ev.rehearsal.as_deref());
        if ctx.get_ref(incident, "open_posting").await?.is_some() {
            match ctx
                .send(self.auth(ctx.client.get(self.api("/incidents"))))
                .await
            {
                Ok(text) => {
                    if let Some(id) = find_marked(&text, &marker) {
                        tracing::info!(notifier = %ctx.notifier, component = %ev.component, incident, instatus_incident = %id, "adopting the Instatus incident an earlier attempt opened");
                        return ctx.set_ref(incident, "incident", &id).await;
                    }
                }
                // The list cannot be read for good (e.g. 403 for this key): a possible
                // duplicate is better than no incident on the page.
                Err(e) if e.retry() == Retry::Never => {
                    tracing::warn!(notifier = %ctx.notifier, component = %ev.component, incident, error = %e, "cannot list Instatus incidents to find an earlier attempt's; opening the incident again");
                }
                Err(e) => return Err(e),
            }
        }
        let body = json!({
            "name": format!(
                "{}{} {}{marker}",
                if ev.rehearsal.is_some() { "[REHEARSAL] " } else { "" },
                ev.component,
                ev.status.human()
            ),
            "message": ev.body_text(),
            "components": [cid],
            "started": iso(ev.opened_at.unwrap_or(ev.at)),
            "status": "INVESTIGATING",
            "notify": self.notify_subscribers,
            "statuses": [{"id": cid, "status": component_status(ev.status)}],
        });
        ctx.set_ref(incident, "open_posting", "1").await?;
        let text = ctx
            .send(
                self.auth(ctx.client.post(self.api("/incidents")))
                    .json(&body),
            )
            .await?;
        match serde_json::from_str::<Value>(&text)
            .ok()
            .as_ref()
            .and_then(|v| v.get("id"))
            .and_then(id_string)
        {
            Some(id) => ctx.set_ref(incident, "incident", &id).await,
            None => {
                // Opened, but we cannot follow it up: say so; updates fall back to components.
                tracing::warn!(notifier = %ctx.notifier, component = %ev.component, "Instatus answered without an incident id; later updates only set the component status");
                ctx.set_ref(incident, "incident", "").await
            }
        }
    }

    async fn update(
        &self,
        ctx: &Ctx,
        ev: &Event,
        cid: &str,
        incident: i64,
        status: &str,
        comp: Status,
    ) -> Result<(), DeliveryError> {
        let Some(sid) = ctx
            .get_ref(incident, "incident")
            .await?
            .filter(|s| !s.is_empty())
        else {
            tracing::warn!(notifier = %ctx.notifier, component = %ev.component, incident, "no Instatus incident recorded for this incident; only the component status is set");
            return Ok(());
        };
        let body = json!({
            "message": ev.body_text(),
            "components": [cid],
            "started": iso(ev.at),
            "status": status,
            "notify": self.notify_subscribers,
            "statuses": [{"id": cid, "status": component_status(comp)}],
        });
        ctx.send(
            self.auth(
                ctx.client
                    .post(self.api(&format!("/incidents/{sid}/incident-updates"))),
            )
            .json(&body),
        )
        .await
        .map(|_| ())
    }

    async fn deliver_api(&self, ctx: &Ctx, ev: &Event) -> Result<(), DeliveryError> {
        let Some(cid) = self.components.get(&ev.component) else {
            return Err(DeliveryError::Invalid(format!(
                "no Instatus component id for {:?}",
                ev.component
            )));
        };
        let cid = cid.as_str();
        let incident = ev.incident_id.filter(|_| self.incidents);
        match (ev.kind, incident) {
            (EventKind::Opened, Some(i)) => {
                ctx.once("open", self.open(ctx, ev, cid, i)).await?;
            }
            (EventKind::Escalated, Some(i)) => {
                ctx.once(
                    "update",
                    self.update(ctx, ev, cid, i, "INVESTIGATING", ev.status),
                )
                .await?;
            }
            (EventKind::Deescalated, Some(i)) => {
                ctx.once(
                    "update",
                    self.update(ctx, ev, cid, i, "MONITORING", ev.status),
                )
                .await?;
            }
            (EventKind::Resolved, Some(i)) => {
                ctx.once(
                    "update",
                    self.update(ctx, ev, cid, i, "RESOLVED", Status::Operational),
                )
                .await?;
            }
            _ => {}
        }
        // Set the component explicitly too: the incident's `statuses` may be ignored, and
        // without incidents this is the only signal.
        self.put_component(ctx, cid, ev.status).await
    }

    async fn deliver_integration(&self, ctx: &Ctx, ev: &Event) -> Result<(), DeliveryError> {
        let Some(url) = self.webhook_url(&ev.component) else {
            return Err(DeliveryError::Invalid(format!(
                "no Instatus webhook for {:?}",
                ev.component
            )));
        };
        let trigger = if ev.is_resolve() { "up" } else { "down" };
        ctx.send(ctx.client.post(url).json(&json!({"trigger": trigger})))
            .await
            .map(|_| ())
    }
}

impl Spec for InstatusConfig {
    fn kind(&self) -> &'static str {
        "instatus"
    }
    fn delivery(&self) -> &DeliveryOptions {
        &self.delivery
    }
    fn default_rate(&self) -> f64 {
        1.0
    }
    fn accepts(&self, ev: &Event) -> bool {
        match self.mode() {
            Mode::Api => self.components.contains_key(&ev.component) && ev.kind != EventKind::Test,
            Mode::Integration => {
                self.webhooks.contains_key(&ev.component)
                    && matches!(ev.kind, EventKind::Opened | EventKind::Resolved)
            }
        }
    }
    fn check_component(&self, component: &str) -> Result<(), String> {
        let (map, what) = match self.mode() {
            Mode::Api => (&self.components, "components"),
            Mode::Integration => (&self.webhooks, "webhooks"),
        };
        if map.contains_key(component) {
            Ok(())
        } else {
            Err(format!(
                "has no entry for component {component:?} in its {what} table"
            ))
        }
    }
    fn build(&self) -> anyhow::Result<Arc<dyn Destination>> {
        Ok(Arc::new(self.clone()))
    }
}

impl Destination for InstatusConfig {
    fn deliver<'a>(
        &'a self,
        ctx: &'a Ctx,
        ev: &'a Event,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            match self.mode() {
                Mode::Api => self.deliver_api(ctx, ev).await,
                Mode::Integration => self.deliver_integration(ctx, ev).await,
            }
        })
    }

    /// A status page is public: the test changes nothing. In API mode it reads the page's
    /// components (checking the key, the page id and every mapped component id); integration
    /// webhooks have no harmless request, so the test refuses.
    fn test<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            if self.mode() == Mode::Integration {
                return Err(DeliveryError::Invalid(
                    "integration webhooks have no test event: \"down\" or \"up\" would change the public status page; \
                     check the webhook URLs in the Instatus dashboard instead"
                        .into(),
                ));
            }
            let text = ctx
                .send(self.auth(ctx.client.get(self.api("/components"))))
                .await?;
            let list: Value = serde_json::from_str(&text).map_err(|e| {
                DeliveryError::Invalid(format!("unexpected components answer: {e}"))
            })?;
            let ids: Vec<&str> = list
                .as_array()
                .or_else(|| list.get("components").and_then(Value::as_array))
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.get("id").and_then(Value::as_str))
                        .collect()
                })
                .unwrap_or_default();
            let missing: Vec<String> = self
                .components
                .iter()
                .filter(|(_, id)| !ids.contains(&id.as_str()))
                .map(|(name, id)| format!("{name:?} → {}", id.as_str()))
                .collect();
            if !missing.is_empty() {
                return Err(DeliveryError::Invalid(format!(
                    "component ids not found on the page: {}",
                    missing.join(", ")
                )));
            }
            Ok(format!(
                "API key and page are valid; all {} mapped components exist (nothing was changed on the public page)",
                self.components.len()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_incidents_are_found_only_when_unresolved_and_exact() {
        let list = r#"[
            {"id": "a", "name": "API major outage (#11)", "status": "INVESTIGATING"},
            {"id": "b", "name": "API major outage (#1)", "status": "RESOLVED"},
            {"id": "c", "name": "API major outage (#1) again", "status": "INVESTIGATING"},
            {"id": 7, "name": "API partial outage (#1)", "status": "MONITORING"}
        ]"#;
        let cases: &[(&str, i64, Option<&str>)] = &[
            (list, 1, Some("7")),
            (list, 11, Some("a")),
            (list, 2, None),
            (
                r#"{"incidents": [{"id": "x", "name": "n (#3)", "status": "IDENTIFIED"}]}"#,
                3,
                Some("x"),
            ),
            (
                r#"[{"id": "", "name": "n (#3)", "status": "INVESTIGATING"}]"#,
                3,
                None,
            ),
            (r#"[{"name": "n (#3)"}]"#, 3, None),
            ("not json", 3, None),
            (r#"{"error": {"code": "x"}}"#, 3, None),
        ];
        for (text, id, want) in cases {
            assert_eq!(
                find_marked(text, &incident_marker(*id, None)).as_deref(),
                *want,
                "{text} #{id}"
            );
        }
    }
}
