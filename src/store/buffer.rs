//! The outage buffer of a fleet agent: runs that could not be written because Postgres was
//! unreachable wait here, in a small SQLite file in the data directory
//! (`<data_dir>/outage-buffer.db`), until the writer flushes them to Postgres, oldest first.
//! One row per run (with its sub-checks) or skip mark, numbered in arrival order. Bounded:
//! past `max` entries the oldest are dropped and counted. The file outlives the process: an
//! agent that starts with entries left flushes them before what it records itself. The
//! file is created at the first outage; a fleet agent that never lost Postgres has none.
//!
//! Flushing is idempotent: a run is keyed by series and start (`runs` primary key), so one
//! written twice (a commit whose answer was lost, then flushed from here) is stored once.
//!
//! Not here: when to buffer and when to flush (the writer in [`super`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Row;

/// The buffer's file name in the data directory.
pub const FILE: &str = "outage-buffer.db";

/// Where a store buffers while Postgres is unreachable, and how much.
#[derive(Debug, Clone)]
pub struct Spec {
    pub path: PathBuf,
    /// Entries (runs and skip marks) kept at most; older ones are dropped.
    pub max: u64,
}

/// One buffered operation: a run as the rows it is stored as, or a skip mark.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Entry {
    Run(Vec<Kept>),
    Skip { probe: String, planned_at_ms: i64 },
}

/// A [`Row`] that owns its data (what the buffer keeps of it).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Kept {
    series: String,
    kind: String,
    started_ms: i64,
    /// 0 up, 1 degraded, 2 down (as in `runs`).
    outcome: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lag_us: Option<u64>,
    duration_us: u64,
    phases: Vec<(String, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    details: Option<Map<String, Value>>,
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Kept {
    pub(super) fn of(r: &Row) -> Kept {
        Kept {
            series: r.series.to_string(),
            kind: r.kind.to_string(),
            started_ms: r.started_ms,
            outcome: super::outcome_code(r.outcome),
            lag_us: r.lag.map(us),
            duration_us: us(r.duration),
            phases: r
                .phases
                .iter()
                .map(|(n, d)| (n.to_string(), us(*d)))
                .collect(),
            error: r.error.map(|(c, m)| (c.to_string(), m.to_string())),
            details: r.details.cloned(),
        }
    }

    pub(super) fn row(&self) -> Row<'_> {
        Row {
            series: &self.series,
            kind: &self.kind,
            started_ms: self.started_ms,
            outcome: super::outcome_of(self.outcome),
            lag: self.lag_us.map(Duration::from_micros),
            duration: Duration::from_micros(self.duration_us),
            phases: self
                .phases
                .iter()
                .map(|(n, d)| (n.as_str(), Duration::from_micros(*d)))
                .collect(),
            error: self.error.as_ref().map(|(c, m)| (c.as_str(), m.as_str())),
            details: self.details.as_ref(),
        }
    }
}

/// The open buffer file.
pub struct Buffer {
    conn: rusqlite::Connection,
    spec: Spec,
    len: u64,
}

impl Buffer {
    /// Open (creating if needed) the buffer file.
    pub fn open(spec: &Spec) -> anyhow::Result<Buffer> {
        if let Some(dir) = spec.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating data directory {}", dir.display()))?;
        }
        let conn = rusqlite::Connection::open(&spec.path)
            .with_context(|| format!("opening the outage buffer {}", spec.path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // AUTOINCREMENT: ids keep growing after the oldest rows are flushed or dropped, so
        // they are the arrival order.
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS buffered (id INTEGER PRIMARY KEY AUTOINCREMENT, entry TEXT NOT NULL)",
        )?;
        let len: i64 = conn.query_row("SELECT count(*) FROM buffered", [], |r| r.get(0))?;
        Ok(Buffer {
            conn,
            spec: spec.clone(),
            len: len as u64,
        })
    }

    /// Open the buffer only if its file exists (entries left by an earlier run).
    pub fn open_existing(spec: &Spec) -> anyhow::Result<Option<Buffer>> {
        if spec.path.exists() {
            Buffer::open(spec).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn path(&self) -> &Path {
        &self.spec.path
    }

    pub fn max(&self) -> u64 {
        self.spec.max
    }

    /// Entries waiting.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append entries (one transaction), then drop the oldest beyond the bound; returns how
    /// many were dropped.
    pub(super) fn push(&mut self, entries: &[Entry]) -> anyhow::Result<u64> {
        if entries.is_empty() {
            return Ok(0);
        }
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached("INSERT INTO buffered (entry) VALUES (?1)")?;
            for e in entries {
                st.execute([serde_json::to_string(e)?])?;
            }
        }
        let len = self.len + entries.len() as u64;
        let over = len.saturating_sub(self.spec.max.max(1));
        if over > 0 {
            tx.execute(
                "DELETE FROM buffered WHERE id IN (SELECT id FROM buffered ORDER BY id LIMIT ?1)",
                [over as i64],
            )?;
        }
        tx.commit()?;
        self.len = len - over;
        Ok(over)
    }

    /// The oldest `n` entries with their ids. An entry that does not parse (a file written
    /// by another version) comes back as `None`, to be dropped.
    pub(super) fn oldest(&self, n: usize) -> anyhow::Result<Vec<(i64, Option<Entry>)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, entry FROM buffered ORDER BY id LIMIT ?1")?;
        let rows = st.query_map([n as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, text) = row?;
            out.push((id, serde_json::from_str(&text).ok()));
        }
        Ok(out)
    }

    /// Forget every entry up to and including `id` (flushed, or dropped).
    pub fn remove_through(&mut self, id: i64) -> anyhow::Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM buffered WHERE id <= ?1", [id])?;
        self.len = self.len.saturating_sub(n as u64);
        if self.len == 0 {
            // Give the space back once the outage is over.
            let _ = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Outcome;

    fn skip(i: i64) -> Entry {
        Entry::Skip {
            probe: "p".into(),
            planned_at_ms: i,
        }
    }

    fn ids(b: &Buffer) -> Vec<i64> {
        b.oldest(100)
            .unwrap()
            .into_iter()
            .map(|(_, e)| match e {
                Some(Entry::Skip { planned_at_ms, .. }) => planned_at_ms,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn keeps_the_newest_entries_up_to_its_bound_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            path: dir.path().join("data").join(FILE),
            max: 3,
        };
        assert!(Buffer::open_existing(&spec).unwrap().is_none());
        let mut b = Buffer::open(&spec).unwrap();
        assert_eq!(b.push(&[skip(1), skip(2)]).unwrap(), 0);
        assert_eq!(b.push(&[skip(3), skip(4), skip(5)]).unwrap(), 2);
        assert_eq!(b.len(), 3);
        assert_eq!(ids(&b), [3, 4, 5]);
        drop(b);
        let mut b = Buffer::open_existing(&spec).unwrap().unwrap();
        assert_eq!((b.len(), ids(&b)), (3, vec![3, 4, 5]));
        let first = b.oldest(2).unwrap();
        b.remove_through(first[1].0).unwrap();
        assert_eq!((b.len(), ids(&b)), (1, vec![5]));
        b.push(&[skip(6)]).unwrap();
        assert_eq!(ids(&b), [5, 6], "arrival order survives removals");
    }

    #[test]
    fn a_kept_row_round_trips() {
        let details: Map<String, Value> = [("status".to_string(), Value::from(200))]
            .into_iter()
            .collect();
        let row = Row {
            series: "api",
            kind: "http",
            started_ms: 1_767_225_600_123,
            outcome: Outcome::Degraded,
            lag: Some(Duration::from_micros(1500)),
            duration: Duration::from_micros(21_000),
            phases: vec![
                ("ttfb", Duration::from_micros(20_000)),
                ("total", Duration::from_micros(20_900)),
            ],
            error: Some(("http_status", "answered 207")),
            details: Some(&details),
        };
        let text = serde_json::to_string(&Entry::Run(vec![Kept::of(&row)])).unwrap();
        let Ok(Entry::Run(kept)) = serde_json::from_str::<Entry>(&text) else {
            panic!("{text}")
        };
        let back = kept[0].row();
        assert_eq!(back.series, "api");
        assert_eq!(back.started_ms, row.started_ms);
        assert_eq!(back.outcome, Outcome::Degraded);
        assert_eq!(back.lag, row.lag);
        assert_eq!(back.duration, row.duration);
        assert_eq!(back.phases, row.phases);
        assert_eq!(back.error, row.error);
        assert_eq!(back.details, Some(&details));
    }
}
