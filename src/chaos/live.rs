//! Rehearsals on the live daemon: started through the API (`POST /api/v1/rehearsals`, what
//! `watchpost rehearse FILE --agent URL` calls) or by a `[[rehearsal]]` schedule. The fault
//! goes into the daemon's own probes (the fault registry its scheduler consults), the
//! verdicts are read from its own incidents and outbox, and incidents that open on the
//! drill's components while it runs carry its run id ([`Drill`]), so their notifications
//! are marked `[REHEARSAL]` with dedup keys apart. One at a time; never while a component
//! of the drill is in maintenance or already has an incident open. Every rehearsal — run,
//! refused by its schedule, or cut short by the daemon stopping — is kept in the
//! `rehearsals` table ([`MIGRATION`]), which `watchpost report` lists.
//!
//! Not here: the drill itself (see `chaos::run`), HTTP (see `api`).

use std::path::{Component, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context as _;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::file::{self, Event, Rehearsal};
use super::run::{self, Agent, Mark, Report};
use crate::config::{Config, ScheduledRehearsal};
use crate::control::CommandError;
use crate::store::db::{self, params, Conn, OptionalExtension as _};

/// Schema of the rehearsals the daemon ran (appended to `crate::store::MIGRATIONS`):
/// when, which file, who started it, the verdict, the measured times (the first `status` or
/// `opened`, `delivered` and `resolved` expectation's) and the whole report as JSON; and
/// which incidents a rehearsal opened.
pub const MIGRATION: &str = "
CREATE TABLE rehearsals (
    id INTEGER PRIMARY KEY,
    rehearsal_id TEXT NOT NULL,
    name TEXT NOT NULL,
    file TEXT NOT NULL,
    origin TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    status TEXT NOT NULL,
    passed INTEGER,
    reason TEXT,
    detect_ms INTEGER,
    page_ms INTEGER,
    resolve_ms INTEGER,
    report TEXT
);
CREATE INDEX rehearsals_run ON rehearsals(rehearsal_id);
CREATE INDEX rehearsals_time ON rehearsals(started_at);
ALTER TABLE incidents ADD COLUMN rehearsal TEXT;
";

/// Rehearsals listed by `GET /api/v1/rehearsals`, newest first.
const LIST_LIMIT: i64 = 100;

/// The drill running on this agent, for the evaluator: an incident that opens on one of
/// its components carries its run id. Empty on a daemon that is not rehearsing.
#[derive(Clone, Default)]
pub struct Drill(Arc<RwLock<Option<Marked>>>);

/// A drill's run id and the components whose new incidents it marks.
struct Marked {
    id: String,
    components: Vec<String>,
}

impl Drill {
    /// The run id to mark a new incident of `component` with, if a drill covers it.
    pub fn id_for(&self, component: &str) -> Option<String> {
        let d = self.0.read().unwrap_or_else(|p| p.into_inner());
        d.as_ref()
            .filter(|m| m.components.iter().any(|c| c == component))
            .map(|m| m.id.clone())
    }

    fn set(&self, id: &str, components: Vec<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Marked {
            id: id.to_string(),
            components,
        });
    }

    fn clear(&self) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Frees the one-at-a-time slot and the drill's marker however its task ends (a panic
/// too), after its row is written.
struct Slot(Rehearsals);

impl Drop for Slot {
    fn drop(&mut self) {
        let inner = &self.0 .0;
        inner.drill.clear();
        inner
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// The one running now, as far as it got.
struct Running {
    report: Report,
    origin: String,
}

struct Inner {
    agent: Agent,
    drill: Drill,
    /// The daemon is stopping: the running drill is interrupted, none starts.
    stop: CancellationToken,
    current: Mutex<Option<Running>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The live agent's rehearsals. Cheap to clone.
#[derive(Clone)]
pub struct Rehearsals(Arc<Inner>);

/// `file` (as an API client names it) resolved inside the config directory: relative, no
/// `..`, so a client can only start the drills the operator put there.
fn resolve(config: &Config, file: &str) -> Result<PathBuf, CommandError> {
    let rel = std::path::Path::new(file);
    let inside = !file.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        return Err(CommandError::Invalid(format!(
            "file {file:?} must be a relative path inside the agent's config directory (e.g. rehearsals/drill.toml)"
        )));
    }
    let path = config.dir.join(rel);
    if !path.is_file() {
        return Err(CommandError::NotFound(format!(
            "no rehearsal file {file:?} in the agent's config directory"
        )));
    }
    Ok(path)
}

/// Why `r` must not start now: a component it touches is in maintenance or already has an
/// incident open (a drill would be judged against a real outage, or never page at all).
fn blocked(config: &Config, r: &Rehearsal, conn: &Conn, now_ms: i64) -> db::Result<Option<String>> {
    let now = chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
    let windows = crate::control::load_windows(conn, now_ms)?;
    for comp in run::involved_components(config, r) {
        let open: Option<(String, Option<i64>)> = conn
            .query_row(
                "SELECT status, incident_id FROM component_state WHERE component = ?1",
                [comp.as_str()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((status, Some(id))) = &open {
            return Ok(Some(format!(
                "component {comp:?} has incident #{id} open ({status}): a drill now would be judged against it"
            )));
        }
        let reason = crate::incident::maintenance::active_reason(&config.maintenance, &comp, now)
            .map(str::to_string)
            .or_else(|| {
                windows
                    .iter()
                    .find(|w| w.component == comp && w.active(now_ms))
                    .map(|w| w.reason.clone())
            });
        if let Some(reason) = reason {
            return Ok(Some(format!(
                "component {comp:?} is in a maintenance window ({reason}): no incident could open"
            )));
        }
    }
    Ok(None)
}

/// The measured times a row keeps: the first `status`/`opened`, `delivered` and `resolved`
/// expectation's.
fn times(r: &Report) -> (Option<i64>, Option<i64>, Option<i64>) {
    let first = |events: &[&str]| {
        r.expectations
            .iter()
            .filter(|v| events.contains(&v.event.as_str()))
            .find_map(|v| v.measured_ms)
    };
    (
        first(&[Event::Status.as_str(), Event::Opened.as_str()]),
        first(&[Event::Delivered.as_str()]),
        first(&[Event::Resolved.as_str()]),
    )
}

fn status_of(r: &Report) -> &'static str {
    if r.aborted.is_some() {
        "aborted"
    } else if r.passed {
        "passed"
    } else {
        "failed"
    }
}

/// The document the API answers with: the `--json` report plus `status` (`running`,
/// `passed`, `failed`, `aborted`, `skipped`), `origin` and `reason`.
fn doc(r: &Report, status: &str, origin: &str, reason: Option<&str>) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or_else(|_| json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("status".into(), status.into());
        o.insert("origin".into(), origin.into());
        o.insert("reason".into(), reason.into());
    }
    v
}

/// A stored row as the API document.
fn row_doc(row: &db::Row) -> db::Result<Value> {
    let id: String = row.get(0)?;
    let name: String = row.get(1)?;
    let file: String = row.get(2)?;
    let origin: String = row.get(3)?;
    let started_at: i64 = row.get(4)?;
    let status: String = row.get(5)?;
    let reason: Option<String> = row.get(6)?;
    let report: Option<String> = row.get(7)?;
    let stored = report.and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let mut v = stored.unwrap_or_else(|| {
        json!({
            "name": name, "file": file, "rehearsal_id": id,
            "started_at": crate::notify::event::iso(started_at),
            "passed": false, "aborted": reason, "expectations": [], "timeline": [],
        })
    });
    if let Some(o) = v.as_object_mut() {
        o.insert("status".into(), status.into());
        o.insert("origin".into(), origin.into());
        o.insert("reason".into(), reason.into());
    }
    Ok(v)
}

const ROW_COLUMNS: &str = "rehearsal_id, name, file, origin, started_at, status, reason, report";

/// A stored rehearsal by its run id (the newest row of that id).
pub fn stored(conn: &Conn, id: &str) -> db::Result<Option<Value>> {
    let mut out = None;
    conn.query_each(
        &format!(
            "SELECT {ROW_COLUMNS} FROM rehearsals WHERE rehearsal_id = ?1 ORDER BY id DESC LIMIT 1"
        ),
        [id],
        |row| {
            out = Some(row_doc(row)?);
            Ok(())
        },
    )?;
    Ok(out)
}

/// The newest stored rehearsals, without their timelines.
pub fn list(conn: &Conn) -> db::Result<Vec<Value>> {
    let mut out = Vec::new();
    conn.query_each(
        &format!("SELECT {ROW_COLUMNS} FROM rehearsals ORDER BY id DESC LIMIT ?1"),
        [LIST_LIMIT],
        |row| {
            let mut v = row_doc(row)?;
            if let Some(o) = v.as_object_mut() {
                o.remove("timeline");
            }
            out.push(v);
            Ok(())
        },
    )?;
    Ok(out)
}

/// A drill starts: its row, `running`.
pub fn insert_running(c: &Conn, r: &Report, origin: &str, at_ms: i64) -> db::Result<usize> {
    c.execute(
        "INSERT INTO rehearsals (rehearsal_id, name, file, origin, started_at, status) VALUES (?1, ?2, ?3, ?4, ?5, 'running')",
        params![r.rehearsal_id, r.name, r.file, origin, at_ms],
    )
}

/// A drill ended: its verdict, measured times and whole report on its `running` row.
pub fn finish(c: &Conn, r: &Report, ended_ms: i64) -> db::Result<usize> {
    let (detect, page, resolve) = times(r);
    let json = serde_json::to_string(r).unwrap_or_default();
    c.execute(
        "UPDATE rehearsals SET ended_at = ?2, status = ?3, passed = ?4, reason = ?5, detect_ms = ?6, page_ms = ?7, resolve_ms = ?8, report = ?9
         WHERE rehearsal_id = ?1 AND status = 'running'",
        params![r.rehearsal_id, ended_ms, status_of(r), r.passed, r.aborted, detect, page, resolve, json],
    )
}

/// A firing of a schedule that did not start, and why.
pub fn insert_skipped(
    c: &Conn,
    name: &str,
    file: &str,
    origin: &str,
    at_ms: i64,
    why: &str,
) -> db::Result<usize> {
    c.execute(
        "INSERT INTO rehearsals (rehearsal_id, name, file, origin, started_at, ended_at, status, passed, reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, 'skipped', 0, ?6)",
        params![at_ms.to_string(), name, file, origin, at_ms, why],
    )
}

/// Retention: skipped firings older than `before_ms` go (drills that ran are kept).
pub fn prune_skipped(c: &Conn, before_ms: i64) -> db::Result<usize> {
    c.execute(
        "DELETE FROM rehearsals WHERE status = 'skipped' AND started_at < ?1",
        [before_ms],
    )
}

/// At start: rows a crash left `running` are `aborted`.
pub fn close_interrupted(c: &Conn) -> db::Result<usize> {
    c.execute(
        "UPDATE rehearsals SET status = 'aborted', reason = 'the agent stopped during the rehearsal' WHERE status = 'running'",
        [],
    )
}

impl Rehearsals {
    /// Rehearsals on `agent`, marking incidents through `drill` (the evaluator's).
    pub fn new(agent: Agent, drill: Drill) -> Rehearsals {
        Rehearsals(Arc::new(Inner {
            agent,
            drill,
            stop: CancellationToken::new(),
            current: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
        }))
    }

    /// The agent is stopping: end the running drill (its fault lifted, its end hooks run,
    /// its row kept) and start no other; [`Rehearsals::run`] returns once that is done.
    pub fn shutdown(&self) {
        self.0.stop.cancel();
    }

    /// The running rehearsal's document, if its id is `id` (any id: `None`).
    pub fn current(&self, id: Option<&str>) -> Option<Value> {
        let cur = self.0.current.lock().unwrap_or_else(|p| p.into_inner());
        cur.as_ref()
            .filter(|c| id.is_none_or(|id| c.report.rehearsal_id == id))
            .map(|c| doc(&c.report, "running", &c.origin, None))
    }

    /// Start the rehearsal file `file` (relative to the config directory) now, for `origin`
    /// (who asked). The answer is its document (`status: running`).
    pub async fn start(&self, file: &str, origin: &str) -> Result<Value, CommandError> {
        let config = self.0.agent.config.clone();
        let path = resolve(&config, file)?;
        let r = file::load(&path, &config).map_err(|e| CommandError::Invalid(e.to_string()))?;
        self.launch(r, file, origin).await
    }

    async fn launch(&self, r: Rehearsal, file: &str, origin: &str) -> Result<Value, CommandError> {
        if !r.notify.is_empty() {
            return Err(CommandError::Invalid(
                "[notify] swaps work only in a standalone rehearsal (without --agent): the live agent delivers through its own notifiers".into(),
            ));
        }
        if self.0.stop.is_cancelled() {
            return Err(CommandError::Unavailable("the agent is stopping".into()));
        }
        let a = &self.0.agent;
        let conn = a.store.reader().map_err(CommandError::Internal)?;
        let started = a.clock.now();
        let report = {
            let mut cur = self.0.current.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cur.as_ref() {
                return Err(CommandError::Conflict(format!(
                    "rehearsal {} ({:?}) is running; one at a time",
                    c.report.rehearsal_id, c.report.name
                )));
            }
            let why = blocked(&a.config, &r, &conn, started.timestamp_millis())
                .map_err(|e| CommandError::Internal(e.into()))?;
            if let Some(why) = why {
                return Err(CommandError::Conflict(why));
            }
            let report = Report::begin(&r, file, &started.timestamp_millis().to_string(), started);
            *cur = Some(Running {
                report: report.clone(),
                origin: origin.to_string(),
            });
            report
        };
        drop(conn);
        let (row, who) = (report.clone(), origin.to_string());
        let stored = a
            .store
            .write(move |c| insert_running(c, &row, &who, started.timestamp_millis()))
            .await;
        if let Err(e) = stored {
            self.0
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            return Err(CommandError::Internal(e));
        }
        tracing::info!(rehearsal = %report.rehearsal_id, name = %r.name, file, origin, "rehearsal started on the live agent");
        let answer = doc(&report, "running", origin, None);
        let me = self.clone();
        let handle = tokio::spawn(async move { me.drive(r, report).await });
        let mut tasks = self.0.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
        Ok(answer)
    }

    /// The drill, then its row.
    async fn drive(self, r: Rehearsal, begun: Report) {
        let _slot = Slot(self.clone());
        let a = &self.0.agent;
        let id = begun.rehearsal_id.clone();
        self.0
            .drill
            .set(&id, run::involved_components(&a.config, &r));
        let progress = self.clone();
        let mut live = move |m: &Mark| {
            let mut cur = progress.0.current.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cur.as_mut() {
                c.report.timeline.push(m.clone());
            }
        };
        let res = run::drive(
            a,
            &r,
            begun.clone(),
            self.0.stop.clone().cancelled_owned(),
            &mut live,
        )
        .await;
        self.0.drill.clear();
        let report = match res {
            Ok(rep) => rep,
            Err(e) => {
                let mut rep = self
                    .0
                    .current
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map_or(begun, |c| c.report.clone());
                rep.aborted = Some(format!("{e:#}"));
                rep
            }
        };
        let status = status_of(&report);
        tracing::info!(rehearsal = %id, name = %report.name, status, aborted = report.aborted.as_deref(), "rehearsal ended");
        let ended = a.clock.now_ms();
        let r = a.store.write(move |c| finish(c, &report, ended)).await;
        if let Err(e) = r {
            tracing::error!(error = %format!("{e:#}"), "cannot store the rehearsal's verdict");
        }
    }

    /// Keep a schedule's firing that did not start, and why.
    async fn skipped(&self, e: &ScheduledRehearsal, name: &str, why: &str) {
        let a = &self.0.agent;
        let now = a.clock.now_ms();
        tracing::warn!(file = %e.file, schedule = %e.schedule, reason = why, "scheduled rehearsal skipped");
        let (file, name, why) = (e.file.clone(), name.to_string(), why.to_string());
        let origin = format!("schedule {}", e.schedule);
        let r = a
            .store
            .write(move |c| insert_skipped(c, &name, &file, &origin, now, &why))
            .await;
        if let Err(e) = r {
            tracing::error!(error = %format!("{e:#}"), "cannot store the skipped rehearsal");
        }
    }

    /// One firing of a `[[rehearsal]]` schedule.
    async fn fire(&self, e: &ScheduledRehearsal) {
        let config = self.0.agent.config.clone();
        let r = match file::load(&e.path, &config) {
            Ok(r) => r,
            Err(err) => {
                let why = format!("the rehearsal file does not load: {err}");
                self.skipped(e, &e.file, &why).await;
                return;
            }
        };
        let name = r.name.clone();
        if let Err(err) = self
            .launch(r, &e.file, &format!("schedule {}", e.schedule))
            .await
        {
            self.skipped(e, &name, &err.to_string()).await;
        }
    }

    /// The `[[rehearsal]]` schedules until `stop`; then wait for the drill in progress to
    /// lift its fault, run its end hooks and store its row. Rows a crash left `running`
    /// are closed first.
    pub async fn run(self) -> anyhow::Result<()> {
        let a = self.0.agent.clone();
        a.store
            .write(close_interrupted)
            .await
            .context("closing rehearsals a crash left running")?;
        let stop = self.0.stop.clone();
        let entries = &a.config.rehearsals;
        let mut from = a.clock.now();
        loop {
            // The earliest firing of any schedule; several due at once fire in order (the
            // second finds the first running and is kept as skipped).
            let due: Vec<(usize, chrono::DateTime<chrono::Utc>)> = entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| e.schedule.next_after(from).map(|t| (i, t)))
                .collect();
            let Some(at) = due.iter().map(|d| d.1).min() else {
                stop.cancelled().await;
                break;
            };
            let wait = (at - a.clock.now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            // Never the same firing twice, even if the sleep ended a little early.
            from = at.max(a.clock.now());
            for (i, _) in due.iter().filter(|d| d.1 == at) {
                self.fire(&entries[*i]).await;
            }
        }
        let tasks = std::mem::take(&mut *self.0.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "a rehearsal task failed");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_clients_name_files_inside_the_config_directory_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("rehearsals")).expect("mkdir");
        std::fs::write(dir.path().join("rehearsals/d.toml"), "").expect("write");
        let main = dir.path().join("watchpost.toml");
        std::fs::write(
            &main,
            "[agent]\ndata_dir = \"data\"\nprobes = []\nlisten = \"\"\n",
        )
        .expect("write");
        let c = crate::config::load(&main).unwrap_or_else(|e| panic!("{e}"));
        assert!(resolve(&c, "rehearsals/d.toml").is_ok());
        assert!(resolve(&c, "./rehearsals/d.toml").is_ok());
        for bad in ["", "/etc/passwd", "../x.toml", "rehearsals/../../x.toml"] {
            assert!(
                matches!(resolve(&c, bad), Err(CommandError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            resolve(&c, "rehearsals/nope.toml"),
            Err(CommandError::NotFound(_))
        ));
    }
}
