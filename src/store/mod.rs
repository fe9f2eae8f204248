//! SQLite storage: runs, per-minute latency histograms (rolled up hourly), skips, and the
//! tables other modules add through [`MIGRATIONS`]. rusqlite is synchronous, so one thread
//! owns the write connection and applies queued operations in batched transactions; readers
//! open their own connections ([`Store::reader`]).
//!
//! Not here: deciding anything. The store records and answers queries.

pub mod hist;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use crate::probe::{ms, RunResult};
pub use hist::{Hist, HIST_MAX_US};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Append only: never edit a shipped entry.
pub const MIGRATIONS: &[&str] = &[
    // 1: runs, histograms, skips
    "CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        probe TEXT NOT NULL,
        kind TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        error_class TEXT,
        error_message TEXT,
        duration_ms REAL NOT NULL,
        lag_ms REAL,
        phases TEXT NOT NULL,
        details TEXT NOT NULL
    );
    CREATE INDEX runs_probe_time ON runs(probe, started_at);
    CREATE INDEX runs_time ON runs(started_at);
    CREATE TABLE histograms (
        series TEXT NOT NULL,
        phase TEXT NOT NULL,
        resolution INTEGER NOT NULL,
        bucket_start INTEGER NOT NULL,
        count INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (series, phase, resolution, bucket_start)
    ) WITHOUT ROWID;
    CREATE INDEX histograms_time ON histograms(resolution, bucket_start);
    CREATE TABLE skips (probe TEXT NOT NULL, planned_at INTEGER NOT NULL);
    CREATE INDEX skips_time ON skips(planned_at);",
    // 2: incidents, timeline, component state, notification outbox, notifier references
    crate::incident::MIGRATION,
];

/// Seconds per minute bucket and per hourly bucket (the `resolution` column).
pub const MINUTE: i64 = 60;
pub const HOUR: i64 = 3600;

/// Open (creating if needed) the database for writing and bring the schema up to date.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating data directory {}", dir.display()))?;
        }
    }
    let mut conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Open a read-only connection; `None` when the database does not exist yet.
pub fn open_reader(path: &Path) -> anyhow::Result<Option<Connection>> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} for reading", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(Some(conn))
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let version: usize =
        conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    if version > MIGRATIONS.len() {
        anyhow::bail!(
            "database schema version {version} is newer than this watchpost knows ({}); upgrade watchpost",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("applying migration {}", i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// Called once the batch holding the operation has committed (`Ok`) or failed (`Err`).
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
type ExecFn = Box<dyn FnOnce(&Connection) -> Reply + Send>;

enum Op {
    Run(Box<RunResult>),
    Skip { probe: String, planned_at_ms: i64 },
    Exec(ExecFn),
}

/// Handle to the single writer. Cheap to clone; the writer stops when every handle is gone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    path: PathBuf,
}

/// Join handle of the writer thread.
pub struct WriterHandle(std::thread::JoinHandle<()>);

impl WriterHandle {
    /// Wait until the writer has applied everything queued and exited (all handles dropped).
    pub async fn join(self) {
        let _ = tokio::task::spawn_blocking(move || self.0.join()).await;
    }
}

/// Most operations applied in one transaction.
const BATCH: usize = 1024;

impl Store {
    /// Open the database and start the writer thread.
    pub fn start(path: &Path) -> anyhow::Result<(Store, WriterHandle)> {
        let conn = open(path)?;
        let (tx, rx) = mpsc::channel(8192);
        let handle = std::thread::Builder::new()
            .name("watchpost-writer".into())
            .spawn(move || writer_loop(conn, rx))?;
        Ok((
            Store {
                tx,
                path: path.to_path_buf(),
            },
            WriterHandle(handle),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queue a run (and its histograms) for writing.
    pub async fn record(&self, run: RunResult) {
        if self.tx.send(Op::Run(Box::new(run))).await.is_err() {
            tracing::error!("store writer has stopped; run dropped");
        }
    }

    /// Record that a probe's run was skipped because the previous one was still going.
    pub async fn record_skip(&self, probe: &str, planned_at_ms: i64) {
        let _ = self
            .tx
            .send(Op::Skip {
                probe: probe.to_string(),
                planned_at_ms,
            })
            .await;
    }

    /// Run `f` on the writer connection inside a savepoint of the current batch: all its
    /// writes commit together or not at all. Returns what `f` returns.
    pub async fn write<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (otx, orx) = oneshot::channel::<anyhow::Result<T>>();
        let op = Op::Exec(Box::new(move |conn: &Connection| -> Reply {
            let r = (|| {
                conn.execute_batch("SAVEPOINT op")?;
                match f(conn) {
                    Ok(v) => {
                        conn.execute_batch("RELEASE op")?;
                        Ok(v)
                    }
                    Err(e) => {
                        let _ = conn.execute_batch("ROLLBACK TO op; RELEASE op");
                        Err(e)
                    }
                }
            })();
            // Answer only after the batch commits, so callers never see uncommitted writes.
            Box::new(move |commit: Result<(), String>| {
                let r = match commit {
                    Ok(()) => r.map_err(anyhow::Error::from),
                    Err(e) => Err(anyhow::anyhow!("store commit failed: {e}")),
                };
                let _ = otx.send(r);
            })
        }));
        self.tx
            .send(op)
            .await
            .map_err(|_| anyhow::anyhow!("store writer has stopped"))?;
        orx.await
            .map_err(|_| anyhow::anyhow!("store writer dropped the operation"))?
    }

    /// Wait until everything queued before this call is committed.
    pub async fn flush(&self) -> anyhow::Result<()> {
        self.write(|_| Ok(())).await
    }

    /// A fresh read connection.
    pub fn reader(&self) -> anyhow::Result<Connection> {
        open_reader(&self.path)?.context("database disappeared")
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Op>) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(op) = rx.blocking_recv() {
        batch.push(op);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if let Err(e) = apply_batch(&mut conn, &mut batch) {
            tracing::error!(error = %format!("{e:#}"), "store write failed; batch lost");
        }
        batch.clear();
    }
    let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
}

fn apply_batch(conn: &mut Connection, batch: &mut Vec<Op>) -> anyhow::Result<()> {
    let mut replies: Vec<Reply> = Vec::new();
    let result = apply_ops(conn, batch, &mut replies);
    let outcome = result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}"));
    for reply in replies {
        reply(outcome.clone());
    }
    result
}

type HistKey = (String, String, i64);

fn flush_hists(tx: &Connection, hists: &mut HashMap<HistKey, Vec<u64>>) -> rusqlite::Result<()> {
    for ((series, phase, bucket), values) in hists.drain() {
        hist::add_values(tx, &series, &phase, MINUTE, bucket, &values)?;
    }
    Ok(())
}

fn apply_ops(
    conn: &mut Connection,
    batch: &mut Vec<Op>,
    replies: &mut Vec<Reply>,
) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    // Histogram updates are grouped per bucket and written before any operation that may read
    // them, and at the end, so every operation sees the batch's earlier effects.
    let mut hists: HashMap<HistKey, Vec<u64>> = HashMap::new();
    for op in batch.drain(..) {
        match op {
            Op::Run(r) => insert_run(&tx, &r, &mut hists)?,
            Op::Skip {
                probe,
                planned_at_ms,
            } => {
                tx.execute(
                    "INSERT INTO skips (probe, planned_at) VALUES (?1, ?2)",
                    params![probe, planned_at_ms],
                )?;
            }
            Op::Exec(f) => {
                flush_hists(&tx, &mut hists)?;
                replies.push(f(&tx));
            }
        }
    }
    flush_hists(&tx, &mut hists)?;
    tx.commit()?;
    Ok(())
}

fn insert_run(
    tx: &Connection,
    r: &RunResult,
    hists: &mut HashMap<HistKey, Vec<u64>>,
) -> rusqlite::Result<()> {
    let mut ins = tx.prepare_cached(
        "INSERT INTO runs (probe, kind, started_at, outcome, error_class, error_message, duration_ms, lag_ms, phases, details)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    let started = r.started_at.timestamp_millis();
    let minute = started.div_euclid(MINUTE * 1000) * MINUTE * 1000;
    let phases: serde_json::Map<String, serde_json::Value> = r
        .phases
        .iter()
        .map(|(n, d)| (n.clone(), serde_json::json!(ms(*d))))
        .collect();
    ins.execute(params![
        r.probe,
        r.kind,
        started,
        r.outcome.as_str(),
        r.error.as_ref().map(|e| e.class.as_str()),
        r.error.as_ref().map(|e| e.message.as_str()),
        ms(r.duration),
        r.lag.map(ms),
        serde_json::Value::Object(phases).to_string(),
        serde_json::Value::Object(r.details.clone()).to_string(),
    ])?;
    for (phase, d) in &r.phases {
        hists
            .entry((r.probe.clone(), phase.clone(), minute))
            .or_default()
            .push(d.as_micros() as u64);
    }
    for s in &r.subchecks {
        let phases = match s.latency {
            Some(l) => {
                hists
                    .entry((s.series.clone(), "latency".into(), minute))
                    .or_default()
                    .push(l.as_micros() as u64);
                serde_json::json!({"latency": ms(l)})
            }
            None => serde_json::json!({}),
        };
        ins.execute(params![
            s.series,
            "subcheck",
            started,
            s.outcome.as_str(),
            s.error.as_ref().map(|e| e.class.as_str()),
            s.error.as_ref().map(|e| e.message.as_str()),
            s.latency.map(ms).unwrap_or(0.0),
            Option::<f64>::None,
            phases.to_string(),
            "{}",
        ])?;
    }
    Ok(())
}

/// Roll minute histograms older than `minute_keep` into hourly ones and prune by retention.
/// Runs on the writer (through [`Store::write`]) or directly on a write connection.
pub fn maintain(
    conn: &Connection,
    now_ms: i64,
    retention: &crate::config::Retention,
) -> rusqlite::Result<MaintainStats> {
    let minute_cutoff = now_ms - retention.minute_histograms.0.as_millis() as i64;
    let rolled = hist::rollup(conn, minute_cutoff)?;
    let hourly_cutoff = now_ms - retention.hourly_histograms.0.as_millis() as i64;
    let pruned_hist = conn.execute(
        "DELETE FROM histograms WHERE resolution = ?1 AND bucket_start < ?2",
        params![HOUR, hourly_cutoff],
    )?;
    let runs_cutoff = now_ms - retention.runs.0.as_millis() as i64;
    let pruned_runs = conn.execute(
        "DELETE FROM runs WHERE started_at < ?1",
        params![runs_cutoff],
    )?;
    conn.execute(
        "DELETE FROM skips WHERE planned_at < ?1",
        params![runs_cutoff],
    )?;
    Ok(MaintainStats {
        rolled_minutes: rolled,
        pruned_hourly: pruned_hist,
        pruned_runs,
    })
}

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MaintainStats {
    pub rolled_minutes: usize,
    pub pruned_hourly: usize,
    pub pruned_runs: usize,
}

/// Outcome counts of one series over a window.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub up: u64,
    pub degraded: u64,
    pub down: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.up + self.degraded + self.down
    }
    /// Share of runs that were not down, in percent.
    pub fn availability(&self) -> Option<f64> {
        let t = self.total();
        (t > 0).then(|| 100.0 * (self.up + self.degraded) as f64 / t as f64)
    }
}

/// Outcome counts per series since `since_ms`.
pub fn counts_since(conn: &Connection, since_ms: i64) -> rusqlite::Result<HashMap<String, Counts>> {
    let mut st = conn.prepare(
        "SELECT probe, outcome, count(*) FROM runs WHERE started_at >= ?1 GROUP BY probe, outcome",
    )?;
    let mut out: HashMap<String, Counts> = HashMap::new();
    let rows = st.query_map([since_ms], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (probe, outcome, n) = row?;
        let c = out.entry(probe).or_default();
        match outcome.as_str() {
            "up" => c.up += n as u64,
            "degraded" => c.degraded += n as u64,
            _ => c.down += n as u64,
        }
    }
    Ok(out)
}

/// The newest stored run of each series.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatestRun {
    pub probe: String,
    pub kind: String,
    pub started_at: i64,
    pub outcome: String,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub duration_ms: f64,
    pub phases: serde_json::Value,
}

pub fn latest_runs(conn: &Connection) -> rusqlite::Result<Vec<LatestRun>> {
    let mut st = conn.prepare(
        "SELECT probe, kind, started_at, outcome, error_class, error_message, duration_ms, phases FROM runs
         WHERE id IN (SELECT max(id) FROM runs GROUP BY probe) ORDER BY probe",
    )?;
    let rows = st.query_map([], |r| {
        Ok(LatestRun {
            probe: r.get(0)?,
            kind: r.get(1)?,
            started_at: r.get(2)?,
            outcome: r.get(3)?,
            error_class: r.get(4)?,
            error_message: r.get(5)?,
            duration_ms: r.get(6)?,
            phases: serde_json::from_str(&r.get::<_, String>(7)?)
                .unwrap_or(serde_json::Value::Null),
        })
    })?;
    rows.collect()
}
