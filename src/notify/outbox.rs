//! The outbox tables: notification rows written in the same transaction as the incident
//! transition that caused them, then delivered (in id order per notifier and component) by
//! the dispatcher's workers; plus the per-notifier references that make delivery idempotent
//! across restarts (the Instatus incident id, steps of a multi-request delivery already
//! done). Also the "bell" the evaluator rings after committing rows so workers do not wait
//! for their next poll.
//!
//! Schema: see `crate::incident::MIGRATION`.

use std::collections::HashMap;

use crate::store::db::{self, params, Conn, OptionalExtension};
use tokio::sync::watch;

use super::event::Event;

/// One pending outbox row.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub component: String,
    pub incident_id: Option<i64>,
    /// The event, or why it cannot be read (such rows are dead-lettered).
    pub event: Result<Event, String>,
    pub created_at: i64,
    pub attempts: u32,
    pub next_attempt_at: i64,
}

/// Queue `ev` for `notifier`. Call inside the transition's transaction.
pub fn enqueue(conn: &Conn, notifier: &str, ev: &Event, now_ms: i64) -> db::Result<i64> {
    let json = serde_json::to_string(ev)
        .map_err(|e| db::Error::Other(format!("cannot encode the outbox event: {e}")))?;
    conn.query_row(
        "INSERT INTO outbox (notifier, component, incident_id, kind, event, created_at, status, attempts, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?6) RETURNING id",
        params![notifier, ev.component, ev.incident_id, ev.kind.as_str(), json, now_ms],
        |r| r.get(0),
    )
}

/// Pending rows of one notifier, oldest first.
pub fn pending(conn: &Conn, notifier: &str) -> db::Result<Vec<Row>> {
    let mut st = conn.prepare_cached(
        "SELECT id, component, incident_id, event, created_at, attempts, next_attempt_at FROM outbox
         WHERE notifier = ?1 AND status = 'pending' ORDER BY id",
    )?;
    let rows = st.query_map([notifier], |r| {
        let json: String = r.get(3)?;
        Ok(Row {
            id: r.get(0)?,
            component: r.get(1)?,
            incident_id: r.get(2)?,
            event: serde_json::from_str(&json).map_err(|e| format!("unreadable outbox event: {e}")),
            created_at: r.get(4)?,
            attempts: r.get::<_, i64>(5)?.clamp(0, u32::MAX as i64) as u32,
            next_attempt_at: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// The first pending row of each component: only these may be attempted, so delivery stays
/// in order per component while one component's retries never block another's.
pub fn heads(rows: &[Row]) -> Vec<&Row> {
    let mut seen = std::collections::HashSet::new();
    rows.iter()
        .filter(|r| seen.insert(r.component.as_str()))
        .collect()
}

pub fn mark_delivered(conn: &Conn, id: i64, attempts: u32, now_ms: i64) -> db::Result<()> {
    conn.execute(
        "UPDATE outbox SET status = 'delivered', attempts = ?2, finished_at = ?3, last_error = NULL WHERE id = ?1",
        params![id, attempts, now_ms],
    )?;
    Ok(())
}

pub fn mark_retry(
    conn: &Conn,
    id: i64,
    attempts: u32,
    next_at_ms: i64,
    error: &str,
) -> db::Result<()> {
    conn.execute(
        "UPDATE outbox SET attempts = ?2, next_attempt_at = ?3, last_error = ?4, claimed_by = NULL,
         claim_until = NULL WHERE id = ?1",
        params![id, attempts, next_at_ms, error],
    )?;
    Ok(())
}

pub fn mark_dead(conn: &Conn, id: i64, attempts: u32, error: &str, now_ms: i64) -> db::Result<()> {
    conn.execute(
        "UPDATE outbox SET status = 'dead', attempts = ?2, last_error = ?3, finished_at = ?4 WHERE id = ?1",
        params![id, attempts, error, now_ms],
    )?;
    Ok(())
}

/// Pending and dead-lettered row counts per notifier.
pub fn counts(conn: &Conn) -> db::Result<HashMap<String, (u64, u64)>> {
    let mut st = conn.prepare("SELECT notifier, status, count(*) FROM outbox WHERE status != 'delivered' GROUP BY notifier, status")?;
    let mut out: HashMap<String, (u64, u64)> = HashMap::new();
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (n, status, c) = row?;
        let e = out.entry(n).or_default();
        if status == "pending" {
            e.0 += c.max(0) as u64;
        } else {
            e.1 += c.max(0) as u64;
        }
    }
    Ok(out)
}

/// Delete delivered and dead rows finished before `before_ms`.
pub fn prune(conn: &Conn, before_ms: i64) -> db::Result<usize> {
    conn.execute(
        "DELETE FROM outbox WHERE status != 'pending' AND finished_at < ?1",
        [before_ms],
    )
}

pub fn get_ref(conn: &Conn, notifier: &str, scope: i64, key: &str) -> db::Result<Option<String>> {
    conn.query_row(
        "SELECT value FROM notifier_refs WHERE notifier = ?1 AND incident_id = ?2 AND key = ?3",
        params![notifier, scope, key],
        |r| r.get(0),
    )
    .optional()
}

pub fn set_ref(
    conn: &Conn,
    notifier: &str,
    scope: i64,
    key: &str,
    value: &str,
    now_ms: i64,
) -> db::Result<()> {
    conn.execute(
        "INSERT INTO notifier_refs (notifier, incident_id, key, value, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (notifier, incident_id, key) DO UPDATE SET value = excluded.value",
        params![notifier, scope, key, value, now_ms],
    )?;
    Ok(())
}

/// The bell the evaluator rings after committing outbox rows, so the dispatcher's workers
/// do not wait for their next poll. Owned by the pipeline (one per agent). Cheap to clone.
#[derive(Clone)]
pub struct Bell(watch::Sender<u64>);

impl Default for Bell {
    fn default() -> Self {
        Bell(watch::channel(0).0)
    }
}

impl Bell {
    /// Tell the workers that rows were committed.
    pub fn ring(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever [`Bell::ring`] is called.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}
