//! Runs of rolled-up hours, packed into one `run_hours` row per series and hour
//! ([`codec::encode_hour`]), and the readers that see a series' runs whichever table holds
//! them.
//!
//! When maintenance rolls an hour of a series up, its `runs` rows move into one packed row in
//! the same transaction ([`pack`]): a run's key, record header and cell overhead go (a run
//! costs 30–45 % fewer bytes: docs/BENCHMARKS.md), and the packed rows of a rowid table are
//! appended in hour order (full pages; an hour's blob of 1–1.5 KB stays in-page). A run that arrives after its hour was packed stays
//! in `runs`, as a late run always has (it is merged into the hour's rolled-up rows
//! directly), so every reader reads both tables: [`each_run`] for sums over a span,
//! [`runs_back`] for the newest runs first. `runs` rows written before migration 15 stay
//! where they are until they age out.
//!
//! Not here: what the runs mean (the store's readers decide).

use super::codec::{self, PackedRun};
use super::db::{self, params, Conn, OptionalExtension};
use super::{hist, query_ids, series_in, HOUR, HOUR_MS};

/// Migration 15: packed hours of runs. A rowid table on purpose (see the module docs); the
/// unique index finds a series' hours. On Postgres ([`db::pg_ddl`]) `id` becomes a `BIGINT`
/// identity column and `data` `BYTEA` in an ordinary heap table; an hour of ~1.5 KB stays
/// inline there too (TOAST starts at about 2 KB).
pub const MIGRATION: &str = "CREATE TABLE run_hours (
        id INTEGER PRIMARY KEY,
        bucket_start INTEGER NOT NULL,
        series INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    CREATE UNIQUE INDEX run_hours_by_series ON run_hours (series, bucket_start);";

/// `runs` rows read per statement by [`runs_back`].
const PAGE: usize = 64;

/// The columns of a `runs` row that [`loose`] reads.
const RUN_COLUMNS: &str = "started_at, outcome, lag_us, data, note";

/// A stored run owning its bytes (kept across statements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub started_at: i64,
    /// 0 up, 1 degraded, 2 down.
    pub outcome: u8,
    pub lag_us: Option<u64>,
    /// The phases and duration ([`codec::encode`]).
    pub phases: Vec<u8>,
    /// The note (error, details) as JSON text.
    pub note: Option<String>,
}

impl Run {
    pub fn of(r: &PackedRun) -> Run {
        Run {
            started_at: r.started_at,
            outcome: r.outcome,
            lag_us: r.lag_us,
            phases: r.phases.to_vec(),
            note: r.note.map(str::to_string),
        }
    }

    pub fn view(&self) -> PackedRun<'_> {
        PackedRun {
            started_at: self.started_at,
            outcome: self.outcome,
            lag_us: self.lag_us,
            phases: &self.phases,
            note: self.note.as_deref(),
        }
    }
}

/// A `runs` row's [`RUN_COLUMNS`], from column `at` on, as a run.
fn loose(r: &db::Row, at: usize) -> db::Result<PackedRun<'_>> {
    Ok(PackedRun {
        started_at: r.get(at)?,
        outcome: match r.get::<_, i64>(at + 1)? {
            0 => 0,
            1 => 1,
            _ => 2,
        },
        lag_us: r.get::<_, Option<i64>>(at + 2)?.map(|l| l.max(0) as u64),
        phases: r.blob(at + 3),
        note: r.text(at + 4),
    })
}

/// The runs of a packed row; an unreadable row (the file was edited) is left out, logged.
fn unpack(series: i64, hour: i64, data: &[u8]) -> Vec<PackedRun<'_>> {
    codec::decode_hour(data, hour).unwrap_or_else(|| {
        tracing::warn!(series, hour, "unreadable packed hour of runs left out");
        Vec::new()
    })
}

/// Every stored run of `ids` started in `[lo, hi)`, as `f(series, run)`: the `runs` rows,
/// then the packed hours' (for sums: the two sources are not merged in time order).
pub fn each_run(
    conn: &Conn,
    ids: &[i64],
    (lo, hi): (i64, i64),
    mut f: impl FnMut(i64, &PackedRun),
) -> db::Result<()> {
    let sql = format!(
        "SELECT series, {RUN_COLUMNS} FROM runs WHERE started_at >= ?1 AND started_at < ?2 AND {}",
        series_in("series", 3)
    );
    query_ids(
        conn,
        &sql,
        &[db::Value::Int(lo), db::Value::Int(hi)],
        ids,
        |r| {
            f(r.get(0)?, &loose(r, 1)?);
            Ok(())
        },
    )?;
    packed_runs(conn, ids, (lo, hi), f)
}

/// The runs of `ids` in `[lo, hi)` that packed hours hold, as `f(series, run)`.
pub fn packed_runs(
    conn: &Conn,
    ids: &[i64],
    (lo, hi): (i64, i64),
    mut f: impl FnMut(i64, &PackedRun),
) -> db::Result<()> {
    let sql = format!(
        "SELECT series, bucket_start, data FROM run_hours
         WHERE bucket_start >= ?1 AND bucket_start < ?2 AND {}",
        series_in("series", 3)
    );
    let head = [
        db::Value::Int(lo.saturating_sub(lo.rem_euclid(HOUR_MS))),
        db::Value::Int(hi),
    ];
    query_ids(conn, &sql, &head, ids, |r| {
        let series = r.get(0)?;
        for run in unpack(series, r.get(1)?, r.blob(2)) {
            if lo <= run.started_at && run.started_at < hi {
                f(series, &run);
            }
        }
        Ok(())
    })
}

/// The runs of `series` started at or before `at`, newest first, for as long as `f` returns
/// true. Both tables are read a page at a time (a page of `runs` rows, one packed hour) and
/// merged, so a series' newest run costs two short statements, not its history.
pub fn runs_back(
    conn: &Conn,
    series: i64,
    at: i64,
    mut f: impl FnMut(&PackedRun) -> bool,
) -> db::Result<()> {
    // Each page oldest first: `pop` takes the newest.
    let (mut loose_page, mut packed_page): (Vec<Run>, Vec<Run>) = (Vec::new(), Vec::new());
    let (mut loose_to, mut packed_to) = (Some(at), Some(at));
    loop {
        if let (true, Some(to)) = (loose_page.is_empty(), loose_to) {
            conn.prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE series = ?1 AND started_at <= ?2
                 ORDER BY started_at DESC LIMIT ?3"
            ))?
            .query_each(params![series, to, PAGE], |r| {
                loose_page.push(Run::of(&loose(r, 0)?));
                Ok(())
            })?;
            loose_page.reverse();
            loose_to = match loose_page.first() {
                Some(oldest) if loose_page.len() == PAGE => {
                    Some(oldest.started_at.saturating_sub(1))
                }
                _ => None,
            };
        }
        while let (true, Some(to)) = (packed_page.is_empty(), packed_to) {
            let hour: Option<(i64, Vec<u8>)> = conn
                .prepare_cached(
                    "SELECT bucket_start, data FROM run_hours WHERE series = ?1 AND bucket_start <= ?2
                     ORDER BY bucket_start DESC LIMIT 1",
                )?
                .query_row(params![series, to], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            packed_to = hour.as_ref().map(|h| h.0.saturating_sub(1));
            if let Some((start, data)) = hour {
                packed_page = unpack(series, start, &data)
                    .iter()
                    .filter(|r| r.started_at <= at)
                    .map(Run::of)
                    .collect();
            }
        }
        let newer_loose = match (loose_page.last(), packed_page.last()) {
            (None, None) => return Ok(()),
            (Some(l), Some(p)) => l.started_at >= p.started_at,
            (l, _) => l.is_some(),
        };
        let page = if newer_loose {
            &mut loose_page
        } else {
            &mut packed_page
        };
        if let Some(run) = page.pop() {
            if !f(&run.view()) {
                return Ok(());
            }
        }
    }
}

/// Whether a packed hour holds the run of `series` started at `at`.
pub(crate) fn is_packed(tx: &Conn, series: i64, at: i64) -> db::Result<bool> {
    let hour = hist::floor(at, HOUR);
    let data: Option<Vec<u8>> = tx
        .prepare_cached("SELECT data FROM run_hours WHERE series = ?1 AND bucket_start = ?2")?
        .query_row(params![series, hour], |r| r.get(0))
        .optional()?;
    Ok(data.is_some_and(|d| unpack(series, hour, &d).iter().any(|r| r.started_at == at)))
}

/// Move the `runs` rows of `series` in the hour starting at `hour` into the hour's packed row
/// (merged with the runs it holds, should the hour be rolled again); returns the runs moved,
/// in time order.
pub(crate) fn pack(tx: &Conn, series: i64, hour: i64) -> db::Result<Vec<Run>> {
    let mut moved = Vec::new();
    // Read and deleted in one statement: a run another agent commits meanwhile stays in `runs`.
    tx.prepare_cached(&format!(
        "DELETE FROM runs WHERE series = ?1 AND started_at >= ?2 AND started_at < ?3
         RETURNING {RUN_COLUMNS}"
    ))?
    .query_each(params![series, hour, hour + HOUR_MS], |r| {
        let mut run = Run::of(&loose(r, 0)?);
        if !codec::is_whole(&run.phases) {
            // Unreadable already (the file was edited): kept as a run without phases.
            run.phases.clear();
            codec::encode(&mut run.phases, &[], 0);
        }
        moved.push(run);
        Ok(())
    })?;
    if moved.is_empty() {
        return Ok(moved);
    }
    moved.sort_by_key(|r| r.started_at);
    let old: Option<Vec<u8>> = tx
        .prepare_cached("SELECT data FROM run_hours WHERE series = ?1 AND bucket_start = ?2")?
        .query_row(params![series, hour], |r| r.get(0))
        .optional()?;
    let mut all: Vec<PackedRun> = moved.iter().map(Run::view).collect();
    if let Some(old) = &old {
        all.extend(unpack(series, hour, old));
        all.sort_by_key(|r| r.started_at); // stable: a moved run first, kept by dedup
        all.dedup_by_key(|r| r.started_at);
    }
    let mut data = Vec::with_capacity(all.len() * 24);
    codec::encode_hour(&mut data, hour, &all)
        .ok_or_else(|| db::Error::Other(format!("cannot pack hour {hour} of series {series}")))?;
    tx.prepare_cached(
        "INSERT INTO run_hours (bucket_start, series, data) VALUES (?1, ?2, ?3)
         ON CONFLICT (series, bucket_start) DO UPDATE SET data = excluded.data",
    )?
    .execute(params![hour, series, data])?;
    Ok(moved)
}

/// Delete up to `limit` packed hours of `series` that end at or before `before`, oldest
/// first; returns how many hours, and how many runs they held.
pub(crate) fn prune(tx: &Conn, series: i64, before: i64, limit: i64) -> db::Result<(i64, usize)> {
    let (mut hours, mut runs) = (0, 0);
    tx.prepare_cached(
        "DELETE FROM run_hours WHERE id IN (SELECT id FROM run_hours
           WHERE series = ?1 AND bucket_start <= ?2 ORDER BY bucket_start LIMIT ?3)
         RETURNING bucket_start, data",
    )?
    .query_each(
        params![series, before.saturating_sub(HOUR_MS), limit],
        |r| {
            hours += 1;
            runs += unpack(series, r.get(0)?, r.blob(1)).len();
            Ok(())
        },
    )?;
    Ok((hours, runs))
}
