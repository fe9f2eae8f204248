//! Read models of incidents for the CLI (`watchpost incidents`), the API
//! (`/api/v1/incidents`) and the dashboard: typed rows, serialized to the documented JSON
//! shape. Only reads; the evaluator is the one writer of these tables.

use std::fmt::Write as _;

use crate::store::db::Conn;
use serde::Serialize;

use crate::notify::event::{human_span, iso, truncate};

/// Most incidents one listing returns (newest first).
const LIST_LIMIT: usize = 500;

/// One incident with its timeline and notifications.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncidentView {
    pub id: i64,
    pub component: String,
    pub status: String,
    pub worst_status: String,
    pub open: bool,
    pub opened_at: String,
    pub resolved_at: Option<String>,
    /// Open incidents: time so far.
    pub duration_seconds: i64,
    pub flapping: bool,
    /// Opened during a rehearsal on the live agent: its run id (its notifications said
    /// `[REHEARSAL]`).
    pub rehearsal: Option<String>,
    pub cause: Option<CauseView>,
    pub timeline: Vec<TimelineEntry>,
    pub notifications: Vec<NotificationView>,
}

/// The member and error that opened (or last changed) the incident.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CauseView {
    pub member: String,
    pub class: Option<String>,
    pub message: Option<String>,
}

/// One transition of the incident.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEntry {
    pub at: String,
    pub kind: String,
    pub from: String,
    pub to: String,
    pub member: Option<String>,
    pub class: Option<String>,
    pub message: Option<String>,
    pub note: Option<String>,
}

/// One outbox row of the incident: a notification to one notifier.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotificationView {
    pub id: i64,
    pub notifier: String,
    pub event: String,
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub queued_at: String,
    pub finished_at: Option<String>,
}

/// Incidents newest first (at most 500), each with its timeline and notifications.
pub fn list_incidents(conn: &Conn, open_only: bool) -> anyhow::Result<Vec<IncidentView>> {
    list_incidents_limited(conn, open_only, LIST_LIMIT)
}

/// [`list_incidents`], at most `limit` (and never more than 500).
pub fn list_incidents_limited(
    conn: &Conn,
    open_only: bool,
    limit: usize,
) -> anyhow::Result<Vec<IncidentView>> {
    let limit = limit.min(LIST_LIMIT);
    if !conn.table_exists("incidents")? {
        return Ok(Vec::new());
    }
    // A database an older version left (read without migrating) has no `rehearsal` yet.
    let rehearsal = if conn.columns("incidents")?.iter().any(|c| c == "rehearsal") {
        "rehearsal"
    } else {
        "NULL"
    };
    let sql = format!(
        "SELECT id, component, status, worst_status, opened_at, resolved_at, flapping, cause_member, cause_class, cause_message, {rehearsal}
         FROM incidents {} ORDER BY opened_at DESC, id DESC LIMIT {limit}",
        if open_only { "WHERE resolved_at IS NULL" } else { "" }
    );
    let now = chrono::Utc::now().timestamp_millis();
    let mut st = conn.prepare(&sql)?;
    let mut list = st
        .query_map([], |r| {
            let opened: i64 = r.get(4)?;
            let resolved: Option<i64> = r.get(5)?;
            let member: Option<String> = r.get(7)?;
            Ok(IncidentView {
                id: r.get(0)?,
                component: r.get(1)?,
                status: r.get(2)?,
                worst_status: r.get(3)?,
                open: resolved.is_none(),
                opened_at: iso(opened),
                resolved_at: resolved.map(iso),
                duration_seconds: (resolved.unwrap_or(now) - opened).max(0) / 1000,
                flapping: r.get(6)?,
                rehearsal: r.get(10)?,
                cause: match member {
                    Some(member) => Some(CauseView {
                        member,
                        class: r.get(8)?,
                        message: r.get(9)?,
                    }),
                    None => None,
                },
                timeline: Vec::new(),
                notifications: Vec::new(),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut ev_st = conn.prepare(
        "SELECT at, kind, from_status, to_status, member, error_class, message, note FROM incident_events WHERE incident_id = ?1 ORDER BY id",
    )?;
    let mut out_st = conn.prepare(
        "SELECT id, notifier, kind, status, attempts, last_error, created_at, finished_at FROM outbox WHERE incident_id = ?1 ORDER BY id",
    )?;
    for inc in &mut list {
        inc.timeline = ev_st
            .query_map([inc.id], |r| {
                Ok(TimelineEntry {
                    at: iso(r.get(0)?),
                    kind: r.get(1)?,
                    from: r.get(2)?,
                    to: r.get(3)?,
                    member: r.get(4)?,
                    class: r.get(5)?,
                    message: r.get(6)?,
                    note: r.get(7)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        inc.notifications = out_st
            .query_map([inc.id], |r| {
                Ok(NotificationView {
                    id: r.get(0)?,
                    notifier: r.get(1)?,
                    event: r.get(2)?,
                    status: r.get(3)?,
                    attempts: r.get(4)?,
                    last_error: r.get(5)?,
                    queued_at: iso(r.get(6)?),
                    finished_at: r.get::<_, Option<i64>>(7)?.map(iso),
                })
            })?
            .collect::<Result<_, _>>()?;
    }
    Ok(list)
}

/// Human table of incidents for `watchpost incidents`.
pub fn render_incidents(list: &[IncidentView]) -> String {
    if list.is_empty() {
        return "no incidents\n".into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<24} {:<24} {:<24} {:<10} CAUSE",
        "ID", "COMPONENT", "STATUS", "OPENED", "DURATION"
    );
    for v in list {
        let status = if v.open {
            v.status.clone()
        } else {
            format!("resolved ({})", v.worst_status)
        };
        let dur = human_span(v.duration_seconds * 1000);
        let cause = v
            .cause
            .as_ref()
            .map(|c| {
                format!(
                    "{} [{}] {}",
                    c.member,
                    c.class.as_deref().unwrap_or(""),
                    c.message.as_deref().unwrap_or("")
                )
            })
            .unwrap_or_default();
        let flap = match (&v.rehearsal, v.flapping) {
            (Some(r), true) => format!(" (flapping, rehearsal {r})"),
            (Some(r), false) => format!(" (rehearsal {r})"),
            (None, true) => " (flapping)".to_string(),
            (None, false) => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<5} {:<24} {:<24} {:<24} {:<10} {}{flap}",
            v.id,
            truncate(&v.component, 24),
            status,
            v.opened_at,
            if v.open { format!("{dur}+") } else { dur },
            truncate(&cause, 100),
        );
        for n in v.notifications.iter().filter(|n| n.status != "delivered") {
            let _ = writeln!(
                out,
                "      ↳ {} {}: {} after {} attempt(s){}",
                n.notifier,
                n.event,
                n.status,
                n.attempts,
                n.last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
    }
    out
}

/// One component as `/api/v1/components` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentView {
    pub name: String,
    /// `operational`, `maintenance`, `degraded`, `partial_outage` or `major_outage`.
    pub status: String,
    /// The open incident, if any.
    pub incident: Option<OpenIncidentView>,
    pub members: Vec<MemberView>,
    /// The maintenance window active now, if any.
    pub maintenance: Option<MaintenanceView>,
    /// Fleet: members the locations see differently now (the leader's `locations_disagree`
    /// entries not followed by `locations_agree`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disagreements: Vec<DisagreementView>,
}

/// Locations that see a member differently.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DisagreementView {
    pub member: String,
    /// What each location sees (`eu sees it down (http_status: …); us sees it up`).
    pub note: String,
    /// When the leader last noted it (the note changes with what the locations see).
    pub noted_at: String,
}

/// The open incident of a component.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpenIncidentView {
    pub id: i64,
    pub opened_at: String,
    pub flapping: bool,
}

/// One member series of a component and what the evaluator knows of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberView {
    /// A probe or a sub-check (`api-health/checks.database`).
    pub name: String,
    /// `down` or `degraded` once confirmed (failure_threshold bad runs), else null.
    pub level: Option<String>,
    pub bad_streak: u32,
    pub good_streak: u32,
    pub last_error: Option<CauseView>,
    /// An active latency-budget breach.
    pub budget: Option<String>,
    /// The member's probe is paused through the API.
    pub paused: bool,
    /// Set for an inbound alert (`alert:<alertname>/<fingerprint>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertView>,
}

/// What a component knows of an inbound alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertView {
    /// The status it asks for while firing (from its severity).
    pub status: &'static str,
    pub firing: bool,
    pub starts_at: String,
    pub ended_at: Option<String>,
}

/// An active maintenance window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MaintenanceView {
    /// `api` (started through the API; `id` ends it) or `config` (`[[maintenance]]`).
    pub source: &'static str,
    pub id: Option<i64>,
    pub reason: String,
    /// End of an API window (configured ones follow their calendar).
    pub ends_at: Option<String>,
}

/// Every configured component with its stored state at `now_ms` (state not yet stored:
/// operational with fresh members).
pub fn list_components(
    conn: &Conn,
    config: &crate::config::Config,
    paused: &crate::control::Paused,
    now_ms: i64,
) -> anyhow::Result<Vec<ComponentView>> {
    use crate::incident::state::{ComponentState, Level};
    let mut saved = std::collections::HashMap::new();
    let mut windows = Vec::new();
    if conn.table_exists("component_state")? {
        let mut st = conn.prepare("SELECT component, state FROM component_state")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (c, s) = row?;
            if let Ok(state) = serde_json::from_str::<ComponentState>(&s) {
                saved.insert(c, state);
            }
        }
    }
    if conn.table_exists("maintenance_windows")? {
        windows = crate::control::load_windows(conn, now_ms)?;
    }
    let term = leader_since(conn)?;
    let now_dt = chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
    let mut out = Vec::new();
    for c in &config.components {
        let name = c.name.get_ref().clone();
        let state = saved.remove(&name).unwrap_or_default();
        // The configured members, then the inbound alerts the component tracks.
        let alerts = state
            .members
            .iter()
            .filter(|(_, m)| m.alert.is_some())
            .map(|(k, _)| k.clone());
        let members = c
            .probes
            .iter()
            .map(|m| m.get_ref().clone())
            .chain(alerts)
            .map(|m| {
                let s = state.members.get(&m).cloned().unwrap_or_default();
                let probe = m.split('/').next().unwrap_or(&m);
                MemberView {
                    paused: s.alert.is_none() && paused.contains(probe),
                    alert: s.alert.map(|a| AlertView {
                        status: a.status.as_str(),
                        firing: a.ended_at.is_none(),
                        starts_at: iso(a.starts_at),
                        ended_at: a.ended_at.map(iso),
                    }),
                    name: m.clone(),
                    level: s.level.map(|l| match l {
                        Level::Down => "down".to_string(),
                        Level::Degraded => "degraded".to_string(),
                    }),
                    bad_streak: s.bad_streak,
                    good_streak: s.good_streak,
                    last_error: s.last_error.map(|e| CauseView {
                        member: e.member,
                        class: Some(e.class),
                        message: Some(e.message),
                    }),
                    budget: s.budget.map(|b| b.message),
                }
            })
            .collect();
        let maintenance =
            match crate::incident::maintenance::active_reason(&config.maintenance, &name, now_dt) {
                Some(reason) => Some(MaintenanceView {
                    source: "config",
                    id: None,
                    reason: reason.to_string(),
                    ends_at: None,
                }),
                None => windows
                    .iter()
                    .find(|w| w.component == name && w.active(now_ms))
                    .map(|w| MaintenanceView {
                        source: "api",
                        id: Some(w.id),
                        reason: w.reason.clone(),
                        ends_at: Some(iso(w.ends_at)),
                    }),
            };
        let since = (term - CLOCK_SLACK_MS).max(now_ms - DISAGREEMENT_LOOKBACK_MS);
        let disagreements = disagreements(conn, &name, since)?;
        out.push(ComponentView {
            name,
            status: state.status.as_str().to_string(),
            incident: state.incident.map(|i| OpenIncidentView {
                id: i.id,
                opened_at: iso(i.opened_at),
                flapping: i.flapping,
            }),
            members,
            maintenance,
            disagreements,
        });
    }
    Ok(out)
}

/// How far back the location notes of a component are read.
const DISAGREEMENT_LOOKBACK_MS: i64 = 24 * 3600 * 1000;
/// Notes are stamped by the leader's clock, the lease by the database's: notes this much
/// older than the lease still count.
const CLOCK_SLACK_MS: i64 = 30_000;

/// When the current fleet leader took the lease (0 without one: a single machine). A new
/// leader judges from scratch and notes a disagreement that goes on again, so only notes of
/// its term are current (a disagreement that ended during the handover has no
/// `locations_agree`).
fn leader_since(conn: &Conn) -> anyhow::Result<i64> {
    if !conn.table_exists("leases")? {
        return Ok(0);
    }
    Ok(conn.query_row(
        "SELECT coalesce(max(acquired_at), 0) FROM leases WHERE name = 'leader'",
        [],
        |r| r.get(0),
    )?)
}

/// The members of `component` whose newest location note since `since_ms` says the
/// locations disagree (by the component's timeline index).
fn disagreements(
    conn: &Conn,
    component: &str,
    since_ms: i64,
) -> anyhow::Result<Vec<DisagreementView>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    conn.prepare_cached(
        "SELECT member, kind, note, at FROM incident_events
         WHERE component = ?1 AND at >= ?2 AND kind IN ('locations_disagree', 'locations_agree')
         ORDER BY at DESC, id DESC LIMIT 1000",
    )?
    .query_each(crate::store::db::params![component, since_ms], |r| {
        let member: Option<String> = r.get(0)?;
        let Some(member) = member else { return Ok(()) };
        if seen.insert(member.clone()) && r.get::<_, String>(1)? == "locations_disagree" {
            out.push(DisagreementView {
                member,
                note: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                noted_at: iso(r.get(3)?),
            });
        }
        Ok(())
    })?;
    out.sort_by(|a, b| a.member.cmp(&b.member));
    Ok(out)
}
