//! SQLite storage: compact runs, hourly latency histograms rolled up from them, skips, and the
//! tables other modules add through [`MIGRATIONS`]. rusqlite is synchronous, so one thread
//! owns the write connection and applies queued operations in batched transactions; readers
//! open their own connections ([`Store::reader`]). The newest run of every series is kept in
//! memory ([`Store::latest`]).
//!
//! A run is one row of about 30 bytes: the series as an integer id (`series` table), start in
//! ms, outcome as 0/1/2 (up/degraded/down), lag in µs, phase times in a varint blob
//! ([`codec`]), and a `note` (error class and message, details) only when the run has an error,
//! is not up, or its details say something new against the last stored up run's: the series'
//! first run since start, a change after a failure, or a change at most hourly
//! ([`DETAILS_EVERY_MS`]); an up run's routine
//! details (a request id, a send lateness: [`UpDetail`]) are kept only when notable.
//! Minute-level latency comes from the runs; whole hours are rolled up into one `hourly` row
//! per series holding every phase ([`hist`]), and the hour's runs into one packed
//! `run_hours` row ([`packed`]: 30–45 % fewer bytes a run; readers read both tables).
//! Rollup and pruning run in chunks of a few milliseconds on the writer
//! ([`Store::maintain`]).
//!
//! In fleet mode (Postgres) the writer survives the database going away: a batch that fails
//! because Postgres cannot be reached is kept, with every run after it, in the outage buffer
//! on local disk ([`buffer`]) while the writer tries to reach Postgres again off its thread;
//! once it answers, the buffer is flushed in order before newer runs ([`LinkStatus`] shows
//! where it stands, for `/health`). Writes other than runs are refused meanwhile.
//!
//! Not here: deciding anything. The store records and answers queries.

pub mod buffer;
pub mod codec;
pub mod db;
pub mod hist;
pub mod packed;
pub mod view;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
pub use buffer::Buffer;
use buffer::{Entry, Kept};
use db::params;
pub use db::{Conn, OptionalExtension, Target};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::probe::{ms, Outcome, RunResult, UpDetail};
pub use hist::{Hist, HIST_MAX_US};
pub use packed::{each_run, runs_back};

/// Migration 3: compact runs keyed by series id, hourly histograms, bookkeeping. Its rows are
/// converted from the version-1 tables by [`convert_v1`] once the schema is current.
const COMPACT: &str = "ALTER TABLE runs RENAME TO runs_v1;
    ALTER TABLE histograms RENAME TO histograms_v1;
    CREATE TABLE series (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        phases TEXT NOT NULL DEFAULT '[]'
    );
    CREATE TABLE runs (
        series INTEGER NOT NULL,
        started_at INTEGER NOT NULL,
        outcome INTEGER NOT NULL,
        lag_us INTEGER,
        data BLOB NOT NULL,
        note TEXT,
        PRIMARY KEY (series, started_at)
    ) WITHOUT ROWID;
    CREATE TABLE hourly (
        bucket_start INTEGER NOT NULL,
        series INTEGER NOT NULL,
        phase TEXT NOT NULL,
        count INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (bucket_start, series, phase)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;";

/// Migration 7: the location a series is measured from. A fleet (Postgres) keeps one series
/// per probe and location; the single-machine SQLite store leaves it empty.
const LOCATION: &str = "ALTER TABLE series ADD COLUMN location TEXT NOT NULL DEFAULT '';
    -- postgres: ALTER TABLE series DROP CONSTRAINT series_name_key;
    CREATE UNIQUE INDEX series_location_name ON series (location, name);";

/// Schema migrations, applied in order; `PRAGMA user_version` (SQLite) or the
/// `watchpost_schema` table (Postgres) records how many ran. Append only: never edit a
/// shipped entry. Each is SQLite DDL that Postgres runs through [`db::pg_ddl`], so a new
/// table is added once for both databases (see [`db`] for the shared dialect).
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
    // 3: compact runs, series ids, hourly histograms (old rows converted)
    COMPACT,
    // 4: paused probes, maintenance windows started through the API
    crate::control::MIGRATION,
    // 5: the installation id (see [`Installation`])
    INSTALLATION,
    // 6: outcome counts per series and hour, rolled up with the hourly histograms, so that
    // availability over an SLO window outlives the runs
    "CREATE TABLE hourly_outcomes (
        bucket_start INTEGER NOT NULL,
        series INTEGER NOT NULL,
        up INTEGER NOT NULL,
        degraded INTEGER NOT NULL,
        down INTEGER NOT NULL,
        PRIMARY KEY (bucket_start, series)
    ) WITHOUT ROWID;",
    // 7: series.location
    LOCATION,
    // 8: rehearsals the daemon ran, incidents.rehearsal
    crate::chaos::live::MIGRATION,
    // 9: fleet mode: members, the leader lease, the run feed, outbox claims
    crate::fleet::MIGRATION,
    // 10: per-series indexes for the dashboard's reads, and where outcome rows are complete
    DASHBOARD_INDEXES,
    // 11: the last slot each scheduled review was sent for, per notifier
    crate::review::MIGRATION,
    // 12: fleet mode: confirmation requests across locations
    crate::fleet::CONFIRM_MIGRATION,
    // 13: one hourly row per series and hour, every phase in one blob (old rows converted)
    HOURLY_PER_SERIES,
    // 14: outcome counts per series and day, summed from the hourly ones
    DAILY_OUTCOMES,
    // 15: a rolled-up hour's runs packed into one row per series
    packed::MIGRATION,
];

/// Migration 14: outcome counts per series and UTC day, each the sum of the day's hourly
/// outcome rows (kept so by [`roll_day`]), so that an SLO window reads a row per day and
/// series instead of 24: a cold 30-day window of 1,000 probes is 30,000 rows, not 720,000.
/// Filled from the hourly rows already kept.
const DAILY_OUTCOMES: &str = "CREATE TABLE daily_outcomes (
        bucket_start INTEGER NOT NULL,
        series INTEGER NOT NULL,
        up INTEGER NOT NULL,
        degraded INTEGER NOT NULL,
        down INTEGER NOT NULL,
        PRIMARY KEY (bucket_start, series)
    ) WITHOUT ROWID;
    CREATE INDEX daily_outcomes_by_series ON daily_outcomes (series, bucket_start, up, degraded, down);
    INSERT INTO daily_outcomes (bucket_start, series, up, degraded, down)
        SELECT bucket_start - bucket_start % 86400000, series, CAST(sum(up) AS BIGINT),
          CAST(sum(degraded) AS BIGINT), CAST(sum(down) AS BIGINT)
        FROM hourly_outcomes GROUP BY 1, 2;";

/// Migration 13: hourly latency as one row per series × hour holding every phase's histogram
/// ([`hist::encode_hour`]) instead of a row per phase: the row and its index entry cost more
/// than a phase's histogram. The old rows are converted by [`convert_hourly`] once the
/// schema is current.
const HOURLY_PER_SERIES: &str = "ALTER TABLE hourly RENAME TO hourly_v1;
    DROP INDEX hourly_by_series;
    CREATE TABLE hourly (
        bucket_start INTEGER NOT NULL,
        series INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (bucket_start, series)
    ) WITHOUT ROWID;
    CREATE INDEX hourly_by_series ON hourly (series, bucket_start);";

/// Migration 10: the dashboard reads one series' hourly rows (its chart) and its members'
/// hourly outcomes (SLO figures) by series, and a component's maintenance from its timeline.
/// `outcomes_from`: hours rolled up from here on have outcome rows (older versions rolled
/// hours without them), so an SLO window reads those hours from `hourly_outcomes` instead
/// of counting the runs.
const DASHBOARD_INDEXES: &str = "CREATE INDEX IF NOT EXISTS hourly_by_series ON hourly (series, bucket_start);
    CREATE INDEX IF NOT EXISTS hourly_outcomes_by_series ON hourly_outcomes (series, bucket_start, up, degraded, down);
    CREATE INDEX IF NOT EXISTS incident_events_component ON incident_events (component, at);
    INSERT INTO meta (key, value) SELECT 'outcomes_from', coalesce(max(value), 0) FROM meta
        WHERE key LIKE 'rolled_until%' ON CONFLICT (key) DO NOTHING;";

/// Migration 5: a random installation id, generated once with the database, and the first
/// incident id whose notification keys carry it (incidents already open when an older
/// database is upgraded keep the keys their alerts were opened with).
const INSTALLATION: &str = "INSERT OR IGNORE INTO meta (key, value)
        VALUES ('installation_id', random() & 9223372036854775807);
    INSERT OR IGNORE INTO meta (key, value)
        VALUES ('installation_since', (SELECT coalesce(max(id), 0) + 1 FROM incidents));";

/// This database's identity in the keys other systems see (PagerDuty dedup keys, webhook
/// incident keys and delivery ids): two agents, or one whose database was reset, number
/// their incidents from 1 alike, and must never resolve each other's alerts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installation {
    /// 16 hex digits, stable for the life of the database.
    pub id: String,
    /// Incidents numbered below this were opened before the id existed.
    pub since_incident: i64,
}

impl Installation {
    /// Read it (the migration created it).
    pub fn read(conn: &Conn) -> db::Result<Installation> {
        Ok(Installation {
            id: format!("{:016x}", hist::meta(conn, "installation_id")?),
            since_incident: hist::meta(conn, "installation_since")?,
        })
    }

    /// The id to put in the keys of `incident`'s notifications: `None` for an incident
    /// opened before the id existed (its alert must resolve under the key it opened with).
    pub fn for_incident(&self, incident: Option<i64>) -> Option<String> {
        match incident {
            Some(id) if id < self.since_incident => None,
            _ => Some(self.id.clone()),
        }
    }
}

/// Migrations whose SQLite text Postgres cannot run as mapped by [`db::pg_ddl`]: their
/// Postgres form, by index into [`MIGRATIONS`]. Add one only where the dialects disagree.
const PG_OVERRIDES: &[(usize, &str)] = &[(
    4,
    // INSTALLATION: `INSERT OR IGNORE` and SQLite's 64-bit `random()`.
    "INSERT INTO meta (key, value)
        VALUES ('installation_id', floor(random() * 4611686018427387903)::bigint) ON CONFLICT DO NOTHING;
    INSERT INTO meta (key, value)
        VALUES ('installation_since', (SELECT coalesce(max(id), 0) + 1 FROM incidents)) ON CONFLICT DO NOTHING;",
)];

/// Migration `i` (0-based) as Postgres runs it.
fn pg_migration(i: usize) -> String {
    match PG_OVERRIDES.iter().find(|(j, _)| *j == i) {
        Some((_, sql)) => sql.to_string(),
        None => db::pg_ddl(MIGRATIONS[i]),
    }
}

/// Seconds per minute and per hour (histogram bucket sizes).
pub const MINUTE: i64 = 60;
pub const HOUR: i64 = 3600;
const HOUR_MS: i64 = HOUR * 1000;
const DAY: i64 = 24 * HOUR;
const DAY_MS: i64 = DAY * 1000;

/// An hour is rolled up this long after it ends, so runs still in flight at its end (a slow
/// probe, its confirmation retries) are in. A run that arrives later still is merged into
/// its hourly row directly.
const ROLL_DELAY_MS: i64 = 5 * 60 * 1000;

/// Work one maintenance chunk does before it yields the writer to queued runs.
pub const CHUNK_BUDGET: Duration = Duration::from_millis(5);

/// An up run's details are stored when they differ from the last stored up run's and those
/// are this old (or a failure came since). Details that change on every run (a request id, a send
/// lateness: [`UpDetail::Routine`]) are left out of an up run's, unless notable.
const DETAILS_EVERY_MS: i64 = HOUR_MS;

/// Rows one pruning statement deletes at most.
const PRUNE_ROWS: i64 = 200;
/// Packed hours of runs one pruning statement deletes at most (each ~60 runs at a 60 s
/// interval, decoded to count them).
const PRUNE_HOURS: i64 = 8;

/// Open (creating if needed) the SQLite database for writing and bring the schema up to date.
pub fn open(path: &Path) -> anyhow::Result<Conn> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating data directory {}", dir.display()))?;
        }
    }
    let c =
        rusqlite::Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    c.busy_timeout(Duration::from_secs(5))?;
    let conn = Conn::sqlite(c);
    migrate(&conn)?;
    Ok(conn)
}

/// Open a read-only SQLite connection; `None` when the database does not exist yet.
pub fn open_reader(path: &Path) -> anyhow::Result<Option<Conn>> {
    if !path.exists() {
        return Ok(None);
    }
    let c = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} for reading", path.display()))?;
    c.busy_timeout(Duration::from_secs(5))?;
    Ok(Some(Conn::sqlite(c)))
}

impl Target {
    /// The database `config` names: Postgres when `[agent] database_url_env` is set, else
    /// SQLite in the data directory.
    pub fn of(config: &crate::config::Config) -> anyhow::Result<Target> {
        match &config.agent.database_url {
            Some(url) => Ok(Target::Postgres(
                db::Pg::new(url.expose(), &config.agent.location)?.with_buffer(buffer::Spec {
                    path: config.agent.data_dir.join(buffer::FILE),
                    max: config.agent.outage_buffer_runs,
                }),
            )),
            None => Ok(Target::Sqlite(config.db_path())),
        }
    }

    /// A read connection; `None` when a SQLite database does not exist yet.
    pub fn reader(&self) -> anyhow::Result<Option<Conn>> {
        match self {
            Target::Sqlite(p) => open_reader(p),
            Target::Postgres(pg) => Ok(Some(pg.conn()?)),
        }
    }

    /// A connection for the writer, schema brought up to date.
    fn writer(&self) -> anyhow::Result<Conn> {
        match self {
            Target::Sqlite(p) => open(p),
            Target::Postgres(pg) => {
                let conn = pg.conn().context("connecting to Postgres")?;
                migrate(&conn)?;
                Ok(conn)
            }
        }
    }
}

/// Advisory lock key that serialises migrations of agents starting at once ("watchpost").
const MIGRATE_LOCK: i64 = 0x7761_7463_6870_6f73;

fn migrate(conn: &Conn) -> anyhow::Result<()> {
    if conn.is_postgres() {
        conn.execute("SELECT pg_advisory_lock(?1)", [MIGRATE_LOCK])?;
        let r = migrate_locked(conn);
        let _ = conn.execute("SELECT pg_advisory_unlock(?1)", [MIGRATE_LOCK]);
        return r;
    }
    migrate_locked(conn)
}

fn schema_version(conn: &Conn) -> db::Result<usize> {
    if conn.is_postgres() {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS watchpost_schema (version BIGINT NOT NULL)",
        )?;
        conn.query_row(
            "SELECT coalesce(max(version), 0) FROM watchpost_schema",
            [],
            |r| r.get(0),
        )
    } else {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
    }
}

fn set_schema_version(conn: &Conn, v: usize) -> db::Result<()> {
    if conn.is_postgres() {
        conn.execute("DELETE FROM watchpost_schema", [])?;
        conn.execute("INSERT INTO watchpost_schema (version) VALUES (?1)", [v])?;
        Ok(())
    } else {
        conn.execute_batch(&format!("PRAGMA user_version = {v}"))
    }
}

fn migrate_locked(conn: &Conn) -> anyhow::Result<()> {
    let version = schema_version(conn)?;
    if version > MIGRATIONS.len() {
        anyhow::bail!(
            "database schema version {version} is newer than this watchpost knows ({}); upgrade watchpost",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        conn.begin()?;
        let r = (|| -> anyhow::Result<()> {
            if conn.is_postgres() {
                conn.execute_batch(&pg_migration(i))
            } else {
                conn.execute_batch(sql)
            }
            .with_context(|| format!("applying migration {}", i + 1))?;
            set_schema_version(conn, i + 1)?;
            Ok(())
        })();
        match r {
            Ok(()) => conn.commit()?,
            Err(e) => {
                let _ = conn.rollback();
                return Err(e);
            }
        }
    }
    // Old rows are converted once the schema is current (migrations 3 and 13 renamed their
    // tables; a conversion drops them, so an interrupted one is taken up again).
    convert_once(
        conn,
        "hourly_v1",
        convert_hourly,
        "converting hourly histograms (migration 13)",
        "converted hourly histograms to one row per series and hour",
    )?;
    convert_once(
        conn,
        "runs_v1",
        convert_v1,
        "converting stored runs (migration 3)",
        "converted stored runs to the compact format",
    )?;
    Ok(())
}

/// Convert the rows of a renamed old table in one transaction, when it is still there.
fn convert_once(
    conn: &Conn,
    old: &str,
    convert: fn(&Conn) -> db::Result<usize>,
    context: &'static str,
    done: &'static str,
) -> anyhow::Result<()> {
    if !conn.table_exists(old)? {
        return Ok(());
    }
    conn.begin()?;
    match convert(conn) {
        Ok(n) => {
            conn.commit()?;
            if n > 0 {
                tracing::info!(rows = n, "{done}");
            }
            Ok(())
        }
        Err(e) => {
            let _ = conn.rollback();
            Err(anyhow::Error::from(e).context(context))
        }
    }
}

fn outcome_code(o: Outcome) -> i64 {
    match o {
        Outcome::Up => 0,
        Outcome::Degraded => 1,
        Outcome::Down => 2,
    }
}

fn outcome_of(code: i64) -> Outcome {
    match code {
        0 => Outcome::Up,
        1 => Outcome::Degraded,
        _ => Outcome::Down,
    }
}

/// The newest run of each series and a strip of its recent outcomes, kept by the writer
/// after every commit (the dashboard reads them without touching the database).
#[derive(Clone, Default)]
pub struct Latest(Arc<RwLock<LatestMap>>);

struct LatestMap {
    runs: HashMap<String, LatestRun>,
    recent: HashMap<String, Recent>,
    /// Random per process: a cursor from another process (a restarted agent) is not ours.
    epoch: u32,
    /// Bumped by every update; a series remembers the version that last changed it.
    version: u64,
}

impl Default for LatestMap {
    fn default() -> Self {
        LatestMap {
            runs: HashMap::new(),
            recent: HashMap::new(),
            epoch: rand::random(),
            version: 0,
        }
    }
}

/// What changed since a cursor ([`Latest::changed_since`]).
pub struct Changes {
    /// The cursor to ask with next time.
    pub cursor: String,
    /// Every series is listed (the cursor was absent, stale or from another process).
    pub full: bool,
    /// Newest run and recent outcomes of each listed series, by name.
    pub series: Vec<(LatestRun, Recent)>,
}

/// Outcomes kept per series in memory for the dashboard's uptime strip.
pub const RECENT_RUNS: usize = 60;
/// Skip marks read at most when the strips are seeded at start.
const SEED_SKIPS: i64 = 100_000;

/// One run in the uptime strip: start (ms) and outcome (`up`/`degraded`/`down`), or a
/// planned run that was skipped because the previous one was still going ([`SKIPPED`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tick(pub i64, pub &'static str);

/// The outcome word of a skipped run in the uptime strip.
pub const SKIPPED: &str = "skipped";

/// A series' recent runs and its newest failure, in memory.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Recent {
    pub runs: std::collections::VecDeque<Tick>,
    /// WER of recent listen runs (start ms, WER), oldest first.
    pub wer: std::collections::VecDeque<(i64, f64)>,
    /// The newest run that was not up.
    pub last_bad: Option<LatestRun>,
    /// The [`LatestMap`] version of the last change.
    #[serde(skip)]
    changed: u64,
}

impl Recent {
    /// Put a tick in the strip in time order (a run that took longer than its interval
    /// lands after the skip mark of the slot it overran); one older than the whole strip is
    /// left out.
    fn tick(&mut self, t: Tick) {
        let at = self
            .runs
            .iter()
            .rposition(|x| x.0 <= t.0)
            .map_or(0, |i| i + 1);
        if at == 0 && self.runs.len() >= RECENT_RUNS {
            return;
        }
        self.runs.insert(at, t);
        while self.runs.len() > RECENT_RUNS {
            self.runs.pop_front();
        }
    }

    fn push(&mut self, r: &LatestRun) {
        let outcome = Outcome::parse(&r.outcome).unwrap_or(Outcome::Down);
        // A run read again (the fleet view follows the feed from before its seed) is not
        // counted twice.
        if self
            .runs
            .iter()
            .rev()
            .take_while(|t| t.0 >= r.started_at)
            .any(|t| t.0 == r.started_at && t.1 != SKIPPED)
        {
            return;
        }
        let newest = self.runs.iter().rev().find(|t| t.1 != SKIPPED);
        let late = newest.is_some_and(|t| t.0 > r.started_at);
        self.tick(Tick(r.started_at, outcome.as_str()));
        if late {
            return; // the WER line and the newest failure show the present
        }
        if let Some(w) = r.wer {
            self.wer.push_back((r.started_at, w));
            while self.wer.len() > RECENT_RUNS {
                self.wer.pop_front();
            }
        }
        if outcome != Outcome::Up {
            self.last_bad = Some(r.clone());
        }
    }
}

impl Latest {
    /// Every series' newest run, ordered by series name.
    pub fn runs(&self) -> Vec<LatestRun> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<LatestRun> = map.runs.values().cloned().collect();
        v.sort_by(|a, b| a.probe.cmp(&b.probe));
        v
    }

    /// Every series' newest run with its recent outcomes, ordered by series name.
    pub fn overview(&self) -> Vec<(LatestRun, Recent)> {
        self.changed_since(None).series
    }

    /// The series changed since `cursor` (from an earlier answer), ordered by name; all of
    /// them without a cursor or with one this process did not hand out.
    pub fn changed_since(&self, cursor: Option<&str>) -> Changes {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        let since = cursor
            .and_then(|c| c.split_once('.'))
            .filter(|(e, _)| e.parse::<u32>().ok() == Some(map.epoch))
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .filter(|v| *v <= map.version);
        let mut v: Vec<(LatestRun, Recent)> = map
            .runs
            .values()
            .filter_map(|r| {
                let recent = map.recent.get(&r.probe);
                let changed = recent.map_or(0, |x| x.changed);
                (since.is_none_or(|s| changed > s))
                    .then(|| (r.clone(), recent.cloned().unwrap_or_default()))
            })
            .collect();
        v.sort_by(|a, b| a.0.probe.cmp(&b.0.probe));
        Changes {
            cursor: format!("{}.{}", map.epoch, map.version),
            full: since.is_none(),
            series: v,
        }
    }

    /// The named series this map has, with their recent outcomes, ordered by name.
    fn some(&self, names: &std::collections::BTreeSet<String>) -> Vec<(LatestRun, Recent)> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        names
            .iter()
            .filter_map(|n| {
                let r = map.runs.get(n)?.clone();
                Some((r, map.recent.get(n).cloned().unwrap_or_default()))
            })
            .collect()
    }

    fn update(&self, runs: Vec<LatestRun>) {
        if runs.is_empty() {
            return;
        }
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        map.version += 1;
        let version = map.version;
        for r in runs {
            let recent = map.recent.entry(r.probe.clone()).or_default();
            recent.push(&r);
            recent.changed = version;
            match map.runs.get_mut(&r.probe) {
                Some(old) if old.started_at > r.started_at => {}
                Some(old) => *old = r,
                None => {
                    map.runs.insert(r.probe.clone(), r);
                }
            }
        }
    }

    /// A planned run of `probe` at `at_ms` was skipped: a mark in its strip.
    fn skipped(&self, probe: &str, at_ms: i64) {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        map.version += 1;
        let version = map.version;
        let recent = map.recent.entry(probe.to_string()).or_default();
        recent.tick(Tick(at_ms, SKIPPED));
        recent.changed = version;
    }

    /// Seed from the database (at start): the newest runs and the strips, with the skip
    /// marks of the last day among them.
    fn seed(&self, conn: &Conn, latest: Vec<LatestRun>) -> db::Result<()> {
        let series = hist::series_names(conn)?;
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        for (id, s) in series {
            let mut ticks = Vec::with_capacity(RECENT_RUNS);
            runs_back(conn, id, i64::MAX, |r| {
                ticks.push(Tick(r.started_at, outcome_of(r.outcome.into()).as_str()));
                ticks.len() < RECENT_RUNS
            })?;
            ticks.reverse();
            map.recent.entry(s.name).or_default().runs = ticks.into();
        }
        let day_ago = chrono::Utc::now().timestamp_millis() - 86_400_000;
        conn.query_each(
            "SELECT probe, planned_at FROM skips WHERE planned_at >= ?1 ORDER BY planned_at LIMIT ?2",
            params![day_ago, SEED_SKIPS],
            |r| {
                if let Some(recent) = map.recent.get_mut(&r.get::<_, String>(0)?) {
                    recent.tick(Tick(r.get(1)?, SKIPPED));
                }
                Ok(())
            },
        )?;
        for r in latest {
            if r.outcome != "up" {
                map.recent.entry(r.probe.clone()).or_default().last_bad = Some(r.clone());
            }
            map.runs.insert(r.probe.clone(), r);
        }
        Ok(())
    }
}

/// Called once the batch holding the operation has committed (`Ok`) or failed (`Err`).
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A [`Store::write`]: run on the writer connection, or refused (`None`: the database is
/// unreachable; its reply is then called with the reason).
type ExecFn = Box<dyn FnOnce(Option<&Conn>) -> Reply + Send>;
type StepResult = anyhow::Result<(MaintainStats, Option<MaintainCursor>)>;

enum Op {
    Run(Box<RunResult>),
    Skip {
        probe: String,
        planned_at_ms: i64,
    },
    Exec(ExecFn),
    Maintain {
        cut: Cutoffs,
        cursor: MaintainCursor,
        reply: oneshot::Sender<StepResult>,
    },
    /// Answered once everything queued before it is applied: committed, or buffered while
    /// the database is unreachable.
    Ping(oneshot::Sender<Result<(), String>>),
    /// Taken out of its batch (applied or answered).
    Taken,
}

/// Handle to the single writer. Cheap to clone; the writer stops when every handle is gone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    target: Target,
    latest: Latest,
    /// A Postgres store's connection and outage buffer, as the writer last saw them.
    link: Option<Arc<RwLock<LinkStatus>>>,
}

/// A Postgres store's connection as the writer sees it, for `/health` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    /// Since when the database is unreachable (`None`: connected).
    pub down_since: Option<chrono::DateTime<chrono::Utc>>,
    /// The last connection error.
    pub error: String,
    /// Entries (runs, skip marks) waiting in the outage buffer.
    pub buffered: u64,
    /// Entries dropped since the agent started: the buffer was full (oldest first), could not
    /// be written, or is not configured.
    pub dropped: u64,
    /// The outage buffer's file and bound (none: runs are lost while unreachable).
    pub buffer: Option<buffer::Spec>,
}

impl LinkStatus {
    /// What is wrong, in a sentence naming the store (`None`: connected, nothing buffered).
    pub fn problem(&self) -> Option<String> {
        let kept = match &self.buffer {
            Some(b) => format!(
                "{} run(s) buffered on local disk ({}, at most {}), {} dropped",
                self.buffered,
                b.path.display(),
                b.max,
                self.dropped
            ),
            None => format!("no outage buffer: {} run(s) lost", self.dropped),
        };
        match self.down_since {
            Some(since) => Some(format!(
                "store: postgres unreachable since {} ({}); {kept}",
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                self.error
            )),
            None if self.buffered > 0 => Some(format!(
                "store: postgres answers again; flushing {} buffered run(s) from {}",
                self.buffered,
                self.buffer
                    .as_ref()
                    .map_or_else(String::new, |b| b.path.display().to_string())
            )),
            None => None,
        }
    }
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
    /// Open the SQLite database at `path` and start the writer thread.
    pub fn start(path: &Path) -> anyhow::Result<(Store, WriterHandle)> {
        Store::open(Target::Sqlite(path.to_path_buf()))
    }

    /// Open the database (SQLite or Postgres), migrate it and start the writer thread.
    /// A Postgres store with an outage buffer flushes what an earlier run left in it first.
    pub fn open(target: Target) -> anyhow::Result<(Store, WriterHandle)> {
        let conn = target.writer()?;
        let latest = Latest::default();
        latest.seed(&conn, latest_runs(&conn)?)?;
        let state = State::load(&conn)?;
        let (spill, link) = match &target {
            Target::Postgres(pg) => {
                let spill = match &pg.buffer {
                    Some(spec) => Some(Spill {
                        spec: spec.clone(),
                        buf: Buffer::open_existing(spec)?,
                    }),
                    None => None,
                };
                let buffered = spill.as_ref().map_or(0, Spill::len);
                if buffered > 0 {
                    tracing::info!(
                        runs = buffered,
                        "flushing runs an earlier run left in the outage buffer"
                    );
                }
                let status = LinkStatus {
                    buffered,
                    buffer: pg.buffer.clone(),
                    ..LinkStatus::default()
                };
                (spill, Some(Arc::new(RwLock::new(status))))
            }
            Target::Sqlite(_) => (None, None),
        };
        let (tx, rx) = mpsc::channel(8192);
        let w = Writer {
            target: target.clone(),
            link: Link::Up(conn),
            state,
            latest: latest.clone(),
            spill,
            status: link.clone(),
            dropped_in_outage: 0,
        };
        let handle = std::thread::Builder::new()
            .name("watchpost-writer".into())
            .spawn(move || writer_loop(w, rx))?;
        Ok((
            Store {
                tx,
                target,
                latest,
                link,
            },
            WriterHandle(handle),
        ))
    }

    /// A Postgres store's connection and outage buffer (`None` on SQLite).
    pub fn link(&self) -> Option<LinkStatus> {
        self.link
            .as_ref()
            .map(|l| l.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Wait until the writer has applied everything queued before this call (committed, or
    /// buffered while the database is unreachable): the writer is alive and keeping up.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let (otx, orx) = oneshot::channel();
        self.tx
            .send(Op::Ping(otx))
            .await
            .map_err(|_| anyhow::anyhow!("store writer has stopped"))?;
        orx.await
            .map_err(|_| anyhow::anyhow!("store writer dropped the operation"))?
            .map_err(|e| anyhow::anyhow!("store write failed: {e}"))
    }

    /// The database this store writes.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The in-memory newest run of each series (for `GET /api/runs/latest`).
    pub fn latest(&self) -> Latest {
        self.latest.clone()
    }

    /// Queue a run for writing.
    pub async fn record(&self, run: RunResult) {
        if self.tx.send(Op::Run(Box::new(run))).await.is_err() {
            tracing::error!("store writer has stopped; run dropped");
        }
    }

    /// Record that a probe's run was skipped because the previous one was still going (in
    /// its uptime strip at once, like a run whose database is away).
    pub async fn record_skip(&self, probe: &str, planned_at_ms: i64) {
        self.latest.skipped(probe, planned_at_ms);
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
        F: FnOnce(&Conn) -> db::Result<T> + Send + 'static,
    {
        let (otx, orx) = oneshot::channel::<anyhow::Result<T>>();
        let op = Op::Exec(Box::new(move |conn: Option<&Conn>| -> Reply {
            let r = conn.map(|c| savepoint(c, f));
            // Answer only after the batch commits, so callers never see uncommitted writes.
            Box::new(move |commit: Result<(), String>| {
                let r = match (commit, r) {
                    (Ok(()), Some(r)) => r.map_err(anyhow::Error::from),
                    (Err(e), _) => Err(anyhow::anyhow!("store write failed: {e}")),
                    (Ok(()), None) => Err(anyhow::anyhow!("store write refused")),
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

    /// One maintenance pass at `now_ms`: roll finished hours up into hourly histograms, then
    /// prune runs, hourly histograms and skips by `retention`. Done in chunks of at most
    /// [`CHUNK_BUDGET`] of work, each its own writer operation, so runs queued meanwhile are
    /// written between chunks.
    pub async fn maintain(
        &self,
        now_ms: i64,
        retention: &crate::config::Retention,
    ) -> anyhow::Result<MaintainStats> {
        let age = |d: &crate::config::Dur| now_ms - d.0.as_millis() as i64;
        let cut = Cutoffs {
            now: now_ms,
            minute: age(&retention.minute_histograms),
            runs: age(&retention.runs),
            hourly: age(&retention.hourly_histograms),
        };
        let mut total = MaintainStats::default();
        let mut cursor = MaintainCursor::default();
        loop {
            let (otx, orx) = oneshot::channel();
            self.tx
                .send(Op::Maintain {
                    cut,
                    cursor,
                    reply: otx,
                })
                .await
                .map_err(|_| anyhow::anyhow!("store writer has stopped"))?;
            let (stats, next) = orx
                .await
                .map_err(|_| anyhow::anyhow!("store writer dropped the operation"))??;
            total.add(&stats);
            match next {
                Some(c) => cursor = c,
                None => return Ok(total),
            }
        }
    }

    /// A fresh read connection.
    pub fn reader(&self) -> anyhow::Result<Conn> {
        self.target.reader()?.context("database disappeared")
    }
}

fn savepoint<T>(conn: &Conn, f: impl FnOnce(&Conn) -> db::Result<T>) -> db::Result<T> {
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
}

struct SeriesInfo {
    id: i64,
    kind: String,
    phases: Vec<String>,
}

/// What an up run's details are compared with.
struct LastDetails {
    /// The details last stored for an up run: the state the notes describe.
    details: Map<String, Value>,
    at: i64,
    /// A run that was not up came since (its note holds its own details): a change is new
    /// at once, the same details again are not.
    failed: bool,
}

/// What the writer keeps between batches; reloaded from the database when a batch fails.
struct State {
    series: HashMap<String, SeriesInfo>,
    /// The details last stored per series id, to store only what is new.
    details: HashMap<i64, LastDetails>,
    /// Hours before this are rolled up (a late run is merged into its hourly row).
    rolled_until: i64,
    /// Last series id rolled up within the hour `rolled_until`.
    roll_cursor: i64,
    buf: Vec<u8>,
}

impl State {
    fn load(conn: &Conn) -> db::Result<State> {
        let mut series = HashMap::new();
        let mut st =
            conn.prepare("SELECT id, name, kind, phases FROM series WHERE location = ?1")?;
        let rows = st.query_map([conn.location()], |r| {
            Ok((
                r.get::<_, String>(1)?,
                SeriesInfo {
                    id: r.get(0)?,
                    kind: r.get(2)?,
                    phases: hist::parse_phases(&r.get::<_, String>(3)?),
                },
            ))
        })?;
        for row in rows {
            let (name, info) = row?;
            series.insert(name, info);
        }
        Ok(State {
            series,
            details: HashMap::new(),
            rolled_until: hist::meta(conn, "rolled_until")?,
            roll_cursor: hist::meta(conn, "roll_cursor")?,
            buf: Vec::with_capacity(64),
        })
    }
}

/// Between two looks at the queue while the database is unreachable.
const OUTAGE_POLL: Duration = Duration::from_millis(50);
/// First and longest wait between two attempts to reach an unreachable database.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Buffered entries flushed per transaction once the database answers again.
pub const FLUSH_CHUNK: usize = 256;

/// The writer's database: connected, or (Postgres) unreachable and being retried.
enum Link {
    Up(Conn),
    Down(Reconnect),
}

struct Reconnect {
    next_try: Instant,
    backoff: Duration,
    /// An attempt under way on its own thread (connecting can take the connect timeout).
    attempt: Option<std::sync::mpsc::Receiver<anyhow::Result<Conn>>>,
}

/// The outage buffer of a Postgres store; its file is opened at the first outage.
struct Spill {
    spec: buffer::Spec,
    buf: Option<Buffer>,
}

impl Spill {
    fn len(&self) -> u64 {
        self.buf.as_ref().map_or(0, Buffer::len)
    }
}

/// The writer thread's state.
struct Writer {
    target: Target,
    link: Link,
    state: State,
    latest: Latest,
    spill: Option<Spill>,
    status: Option<Arc<RwLock<LinkStatus>>>,
    /// Entries dropped since the database was last reachable (logged once per outage).
    dropped_in_outage: u64,
}

fn writer_loop(mut w: Writer, mut rx: mpsc::Receiver<Op>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut open = true;
    while open {
        if w.settled() {
            match rx.blocking_recv() {
                Some(op) => batch.push(op),
                None => break,
            }
        } else if !w.can_flush() {
            // Unreachable: look at the queue and at the reconnection attempt in turn.
            std::thread::sleep(OUTAGE_POLL);
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            w.apply(&mut batch);
        }
        w.tend();
    }
    // What is still buffered stays in the file: the next start flushes it.
    if let Link::Up(c) = &w.link {
        if let Some(c) = c.as_sqlite() {
            let _ = c.pragma_update(None, "wal_checkpoint", "TRUNCATE");
        }
    }
}

impl Writer {
    /// Connected with nothing buffered: operations are applied as they come.
    fn settled(&self) -> bool {
        matches!(self.link, Link::Up(_)) && self.spill.as_ref().is_none_or(|s| s.len() == 0)
    }

    /// Connected with buffered entries to flush.
    fn can_flush(&self) -> bool {
        matches!(self.link, Link::Up(_)) && !self.settled()
    }

    fn apply(&mut self, batch: &mut Vec<Op>) {
        // While the database is unreachable, or buffered runs wait to be flushed, runs go to
        // the buffer, behind the ones already there.
        let mut spilled = Ok(());
        if !self.settled() {
            spilled = self.spill_runs(batch);
            if spilled.is_ok() && batch.iter().all(|op| matches!(op, Op::Taken)) {
                batch.clear();
                return;
            }
        }
        let failure = match &self.link {
            Link::Up(conn) => match apply_batch(conn, &mut self.state, &self.latest, batch) {
                Ok(()) => None,
                Err(e) if is_connection(&e) => {
                    let why = format!("{e:#}");
                    self.lost(&why);
                    // The transaction rolled back: every run of the batch goes to the buffer.
                    let r = self.spill_runs(batch);
                    Some((why, r))
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    tracing::error!(error = %why, "store write failed; batch lost");
                    Some((why.clone(), Err(why)))
                }
            },
            Link::Down(_) => Some((self.down_reason(), spilled)),
        };
        if let Some((why, ping)) = failure {
            refuse(batch, &why, &ping);
        }
        batch.clear();
    }

    fn down_reason(&self) -> String {
        let error = self
            .status
            .as_ref()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).error.clone())
            .unwrap_or_default();
        format!("the database is unreachable ({error})")
    }

    /// Move the batch's runs and skip marks to the outage buffer (or, without one, count
    /// them lost). `Err`: the buffer could not be written, and they are lost.
    fn spill_runs(&mut self, batch: &mut [Op]) -> Result<(), String> {
        let mut entries = Vec::new();
        let mut fresh = Vec::new();
        for op in batch.iter_mut() {
            match op {
                Op::Run(r) => {
                    let rows = rows_of(r);
                    fresh.extend(rows.iter().map(latest_of));
                    entries.push(Entry::Run(rows.iter().map(Kept::of).collect()));
                }
                Op::Skip {
                    probe,
                    planned_at_ms,
                } => entries.push(Entry::Skip {
                    probe: std::mem::take(probe),
                    planned_at_ms: *planned_at_ms,
                }),
                _ => continue,
            }
            *op = Op::Taken;
        }
        if entries.is_empty() {
            return Ok(());
        }
        // The dashboard shows the present even while the database is away.
        self.latest.update(fresh);
        let n = entries.len() as u64;
        let pushed = match &mut self.spill {
            None => Err("no outage buffer is configured".to_string()),
            Some(spill) => {
                let buf = match spill.buf.take() {
                    Some(b) => Ok(b),
                    None => Buffer::open(&spill.spec),
                };
                match buf {
                    Ok(mut b) => {
                        let r = b.push(&entries).map_err(|e| format!("{e:#}"));
                        spill.buf = Some(b);
                        r
                    }
                    Err(e) => Err(format!("{e:#}")),
                }
            }
        };
        let r = match pushed {
            Ok(dropped) => {
                if dropped > 0 {
                    self.dropped(dropped, "the outage buffer is full: oldest runs dropped");
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, runs = n, "cannot buffer runs while the database is unreachable; runs lost");
                self.dropped(n, "runs lost");
                Err(e)
            }
        };
        self.publish();
        r
    }

    fn dropped(&mut self, n: u64, what: &str) {
        if self.dropped_in_outage == 0 {
            let max = self.spill.as_ref().map(|s| s.spec.max);
            tracing::warn!(
                runs = n,
                max,
                "{what} (counted in /health; logged once per outage)"
            );
        }
        self.dropped_in_outage += n;
        if let Some(s) = &self.status {
            s.write().unwrap_or_else(|e| e.into_inner()).dropped += n;
        }
    }

    /// Show the buffer's length in the status.
    fn publish(&self) {
        if let Some(s) = &self.status {
            s.write().unwrap_or_else(|e| e.into_inner()).buffered =
                self.spill.as_ref().map_or(0, Spill::len);
        }
    }

    /// The database stopped answering: buffer from now on and try to reach it again.
    fn lost(&mut self, why: &str) {
        let path = self
            .spill
            .as_ref()
            .map(|s| s.spec.path.display().to_string());
        tracing::warn!(error = %why, buffer = path.as_deref().unwrap_or("none"), "postgres unreachable: buffering runs on local disk until it answers");
        self.link = Link::Down(Reconnect {
            next_try: Instant::now() + RECONNECT_MIN,
            backoff: RECONNECT_MIN,
            attempt: None,
        });
        if let Some(s) = &self.status {
            let mut s = s.write().unwrap_or_else(|e| e.into_inner());
            s.down_since = Some(chrono::Utc::now());
            s.error = why.to_string();
        }
    }

    /// Between batches: try to reach an unreachable database, or flush a chunk of the buffer.
    fn tend(&mut self) {
        if self.can_flush() {
            self.flush_chunk();
            return;
        }
        match &mut self.link {
            Link::Up(_) => {}
            Link::Down(rc) => {
                let got = match &rc.attempt {
                    Some(rx) => match rx.try_recv() {
                        Ok(r) => Some(r),
                        Err(std::sync::mpsc::TryRecvError::Empty) => return,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            Some(Err(anyhow::anyhow!("the reconnection attempt stopped")))
                        }
                    },
                    None => None,
                };
                match got {
                    Some(r) => {
                        rc.attempt = None;
                        let r = r.and_then(|conn| Ok((State::load(&conn)?, conn)));
                        match r {
                            Ok((state, conn)) => self.reconnected(state, conn),
                            Err(e) => {
                                rc.next_try = Instant::now() + rc.backoff;
                                rc.backoff = (rc.backoff * 2).min(RECONNECT_MAX);
                                if let Some(s) = &self.status {
                                    s.write().unwrap_or_else(|e| e.into_inner()).error =
                                        format!("{e:#}");
                                }
                            }
                        }
                    }
                    None if Instant::now() >= rc.next_try => {
                        let target = self.target.clone();
                        let (tx, rx) = std::sync::mpsc::channel();
                        let spawned = std::thread::Builder::new()
                            .name("watchpost-reconnect".into())
                            .spawn(move || {
                                let _ = tx.send(target.writer());
                            });
                        match spawned {
                            Ok(_) => rc.attempt = Some(rx),
                            Err(_) => rc.next_try = Instant::now() + rc.backoff,
                        }
                    }
                    None => {}
                }
            }
        }
    }

    fn reconnected(&mut self, state: State, conn: Conn) {
        let buffered = self.spill.as_ref().map_or(0, Spill::len);
        tracing::info!(
            buffered,
            dropped = self.dropped_in_outage,
            "postgres answers again; flushing the outage buffer"
        );
        self.state = state;
        self.link = Link::Up(conn);
        self.dropped_in_outage = 0;
        if let Some(s) = &self.status {
            s.write().unwrap_or_else(|e| e.into_inner()).down_since = None;
        }
    }

    /// Write the oldest buffered entries in one transaction, then forget them.
    fn flush_chunk(&mut self) {
        let (Link::Up(conn), Some(buf)) =
            (&self.link, self.spill.as_mut().and_then(|s| s.buf.as_mut()))
        else {
            return;
        };
        let chunk = match buf.oldest(FLUSH_CHUNK) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot read the outage buffer");
                std::thread::sleep(OUTAGE_POLL);
                return;
            }
        };
        let Some(last) = chunk.last().map(|c| c.0) else {
            return;
        };
        let state = &mut self.state;
        let r = (|| -> db::Result<()> {
            conn.begin()?;
            let r = (|| {
                for (_, e) in &chunk {
                    match e {
                        Some(Entry::Run(rows)) => {
                            for k in rows {
                                insert_row(conn, state, &k.row())?;
                            }
                        }
                        Some(Entry::Skip {
                            probe,
                            planned_at_ms,
                        }) => insert_skip(conn, probe, *planned_at_ms)?,
                        None => {}
                    }
                }
                conn.commit()
            })();
            if r.is_err() {
                let _ = conn.rollback();
            }
            r
        })();
        let unreadable = chunk.iter().filter(|c| c.1.is_none()).count() as u64;
        match r {
            Err(e) if e.is_connection() => {
                self.lost(&e.to_string());
                return;
            }
            Err(e) => {
                // A statement the database refuses would refuse every flush: log, drop.
                tracing::error!(error = %e, entries = chunk.len(), "cannot flush buffered runs; dropped");
                if let Ok(s) = State::load(conn) {
                    self.state = s;
                }
                self.dropped(chunk.len() as u64, "buffered runs dropped");
            }
            Ok(()) if unreadable > 0 => {
                self.dropped(unreadable, "unreadable buffered entries dropped")
            }
            Ok(()) => {}
        }
        if let Some(buf) = self.spill.as_mut().and_then(|s| s.buf.as_mut()) {
            if let Err(e) = buf.remove_through(last) {
                tracing::error!(error = %format!("{e:#}"), "cannot trim the outage buffer");
            } else if buf.is_empty() {
                tracing::info!("outage buffer flushed: every buffered run is in postgres");
            }
        }
        self.publish();
    }
}

/// Whether a failed batch failed because the database could not be reached.
fn is_connection(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<db::Error>()
            .is_some_and(db::Error::is_connection)
    })
}

/// Answer the operations of a failed batch that are still waiting: writes and maintenance
/// with `why`, pings with `ping` (the writer is alive if it kept the runs).
fn refuse(batch: &mut Vec<Op>, why: &str, ping: &Result<(), String>) {
    for op in batch.drain(..) {
        match op {
            Op::Exec(f) => f(None)(Err(why.to_string())),
            Op::Maintain { reply, .. } => {
                let _ = reply.send(Err(anyhow::anyhow!("store maintenance skipped: {why}")));
            }
            Op::Ping(reply) => {
                let _ = reply.send(ping.clone());
            }
            Op::Run(_) | Op::Skip { .. } | Op::Taken => {}
        }
    }
}

/// Apply a batch in one transaction. On failure the batch's runs and skip marks are left in
/// it (rolled back: the caller buffers them or counts them lost); every other operation has
/// been taken and will be answered with the result.
fn apply_batch(
    conn: &Conn,
    state: &mut State,
    latest: &Latest,
    batch: &mut [Op],
) -> anyhow::Result<()> {
    let mut replies: Vec<Reply> = Vec::new();
    let mut fresh: Vec<LatestRun> = Vec::new();
    let result = apply_ops(conn, state, batch, &mut replies, &mut fresh);
    match &result {
        Ok(()) => latest.update(fresh),
        Err(_) => {
            // The in-memory view may name series or rollup progress that were rolled back.
            if let Ok(s) = State::load(conn) {
                *state = s;
            }
        }
    }
    let outcome = result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}"));
    for reply in replies {
        reply(outcome.clone());
    }
    result
}

fn apply_ops(
    conn: &Conn,
    state: &mut State,
    batch: &mut [Op],
    replies: &mut Vec<Reply>,
    fresh: &mut Vec<LatestRun>,
) -> anyhow::Result<()> {
    conn.begin()?;
    let r = (|| {
        if conn.is_postgres() {
            // Another agent of this location may have rolled hours up since this writer
            // last looked (it learns only on the passes it wins): a late run of ours into
            // such an hour must be merged into it, not left in `runs` where no count reads.
            let rolled = hist::meta(conn, "rolled_until")?;
            state.rolled_until = state.rolled_until.max(rolled);
        }
        apply_each(conn, state, batch, replies, fresh)
    })()
    .and_then(|()| Ok(conn.commit()?));
    if r.is_err() {
        let _ = conn.rollback();
    }
    r
}

fn insert_skip(tx: &Conn, probe: &str, planned_at_ms: i64) -> db::Result<()> {
    tx.prepare_cached("INSERT INTO skips (probe, planned_at) VALUES (?1, ?2)")?
        .execute(params![probe, planned_at_ms])?;
    Ok(())
}

fn apply_each(
    tx: &Conn,
    state: &mut State,
    batch: &mut [Op],
    replies: &mut Vec<Reply>,
    fresh: &mut Vec<LatestRun>,
) -> anyhow::Result<()> {
    for op in batch.iter_mut() {
        match op {
            Op::Run(r) => {
                for row in rows_of(r) {
                    fresh.push(insert_row(tx, state, &row)?);
                }
                continue;
            }
            Op::Skip {
                probe,
                planned_at_ms,
            } => {
                insert_skip(tx, probe, *planned_at_ms)?;
                continue;
            }
            Op::Taken => continue,
            Op::Exec(_) | Op::Maintain { .. } | Op::Ping(_) => {}
        }
        match std::mem::replace(op, Op::Taken) {
            Op::Exec(f) => replies.push(f(Some(tx))),
            Op::Ping(reply) => replies.push(Box::new(move |commit: Result<(), String>| {
                let _ = reply.send(commit);
            })),
            Op::Maintain { cut, cursor, reply } => {
                let (t0, cpu0) = (Instant::now(), thread_cpu());
                let r = savepoint(tx, |c| maintain_step(c, state, &cut, cursor, CHUNK_BUDGET));
                let took = t0.elapsed();
                let cpu = thread_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
                if r.is_err() {
                    if let Ok(s) = State::load(tx) {
                        *state = s;
                    }
                }
                let r = r.map(|(mut s, next)| {
                    s.chunks = 1;
                    s.longest_chunk = took;
                    s.longest_chunk_cpu = cpu.unwrap_or(took);
                    (s, next)
                });
                replies.push(Box::new(move |commit: Result<(), String>| {
                    let r = match commit {
                        Ok(()) => r.map_err(anyhow::Error::from),
                        Err(e) => Err(anyhow::anyhow!("store write failed: {e}")),
                    };
                    let _ = reply.send(r);
                }));
            }
            Op::Run(_) | Op::Skip { .. } | Op::Taken => {}
        }
    }
    Ok(())
}

/// One row of `runs`, from a probe run, one of its sub-checks, a buffered run, or a
/// converted old row.
#[derive(Debug)]
struct Row<'a> {
    series: &'a str,
    kind: &'a str,
    started_ms: i64,
    outcome: Outcome,
    lag: Option<Duration>,
    duration: Duration,
    phases: Vec<(&'a str, Duration)>,
    error: Option<(&'a str, &'a str)>,
    details: Option<&'a Map<String, Value>>,
}

/// The rows a run is stored as: its own and one per sub-check.
fn rows_of(r: &RunResult) -> Vec<Row<'_>> {
    let started_ms = r.started_at.timestamp_millis();
    let mut rows = Vec::with_capacity(1 + r.subchecks.len());
    rows.push(Row {
        series: &r.probe,
        kind: r.kind,
        started_ms,
        outcome: r.outcome,
        lag: r.lag,
        duration: r.duration,
        phases: r.phases.iter().map(|(n, d)| (n.as_str(), *d)).collect(),
        error: r
            .error
            .as_ref()
            .map(|e| (e.class.as_str(), e.message.as_str())),
        details: Some(&r.details),
    });
    for s in &r.subchecks {
        rows.push(Row {
            series: &s.series,
            kind: "subcheck",
            started_ms,
            outcome: s.outcome,
            lag: None,
            duration: s.latency.unwrap_or_default(),
            phases: s.latency.map(|l| ("latency", l)).into_iter().collect(),
            error: s
                .error
                .as_ref()
                .map(|e| (e.class.as_str(), e.message.as_str())),
            details: None,
        });
    }
    rows
}

fn ensure_series<'s>(
    tx: &Conn,
    state: &'s mut State,
    name: &str,
    kind: &str,
) -> db::Result<&'s mut SeriesInfo> {
    if !state.series.contains_key(name) {
        let location = tx.location();
        tx.execute(
            "INSERT INTO series (name, kind, location) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            params![name, kind, location],
        )?;
        let info = tx
            .prepare_cached(
                "SELECT id, kind, phases FROM series WHERE location = ?1 AND name = ?2",
            )?
            .query_row([location.as_str(), name], |r| {
                Ok(SeriesInfo {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    phases: hist::parse_phases(&r.get::<_, String>(2)?),
                })
            })?;
        state.series.insert(name.to_string(), info);
    }
    match state.series.get_mut(name) {
        Some(info) => Ok(info),
        None => Err(db::Error::NoRows),
    }
}

/// Whether `now` holds exactly the details in `last`.
fn same_details<'a>(
    last: &Map<String, Value>,
    mut now: impl Iterator<Item = (&'a String, &'a Value)>,
) -> bool {
    let mut n = 0;
    now.all(|(k, v)| {
        n += 1;
        last.get(k) == Some(v)
    }) && n == last.len()
}

/// The index of each of `names` in the series' phase list (what runs and hourly rows name a
/// phase by), adding the new ones to the list and saving it.
fn phase_indexes<'n>(
    tx: &Conn,
    info: &mut SeriesInfo,
    names: impl Iterator<Item = &'n str>,
) -> db::Result<Vec<usize>> {
    let known = info.phases.len();
    let idx = names
        .map(|name| match info.phases.iter().position(|p| p == name) {
            Some(i) => i,
            None => {
                info.phases.push(name.to_string());
                info.phases.len() - 1
            }
        })
        .collect();
    if info.phases.len() > known {
        let json = serde_json::to_string(&info.phases).unwrap_or_else(|_| "[]".into());
        tx.prepare_cached("UPDATE series SET phases = ?2 WHERE id = ?1")?
            .execute(params![info.id, json])?;
    }
    Ok(idx)
}

fn insert_row(tx: &Conn, state: &mut State, row: &Row) -> db::Result<LatestRun> {
    let info = ensure_series(tx, state, row.series, row.kind)?;
    if info.kind != row.kind {
        tx.prepare_cached("UPDATE series SET kind = ?2 WHERE id = ?1")?
            .execute(params![info.id, row.kind])?;
        info.kind = row.kind.to_string();
    }
    let id = info.id;
    let idx: Vec<(usize, u64)> = phase_indexes(tx, info, row.phases.iter().map(|p| p.0))?
        .into_iter()
        .zip(&row.phases)
        .map(|(i, (_, d))| (i, d.as_micros() as u64))
        .collect();

    // An up run's routine details (a listen run's request id, …) are neither stored nor
    // compared: they would make every run's details new. Notable ones are stored with it.
    let up = row.outcome == Outcome::Up;
    let mut state_changed = None;
    let details = row.details.and_then(|d| {
        let last = state.details.get_mut(&id);
        if !up {
            if let Some(last) = last {
                last.failed = true;
            }
            return (!d.is_empty()).then(|| d.clone());
        }
        let of = |w| {
            d.iter()
                .filter(move |(k, _)| crate::probe::up_detail(row.kind, k, d) == w)
        };
        let new = match last {
            None => true,
            Some(last) => {
                let same = same_details(&last.details, of(UpDetail::State));
                if same {
                    last.failed = false;
                }
                !same && (last.failed || row.started_ms - last.at >= DETAILS_EVERY_MS)
            }
        };
        let clone = |(k, v): (&String, &Value)| (k.clone(), v.clone());
        let mut kept: Map<String, Value> = match new {
            true => of(UpDetail::State).map(clone).collect(),
            false => Map::new(),
        };
        if !kept.is_empty() {
            state_changed = Some(kept.clone());
        }
        kept.extend(of(UpDetail::Notable).map(clone));
        (!kept.is_empty()).then_some(kept)
    });
    let note = (row.error.is_some() || details.is_some()).then(|| {
        let mut m = Map::new();
        if let Some((class, message)) = row.error {
            m.insert("class".into(), class.into());
            m.insert("message".into(), message.into());
        }
        if let Some(d) = &details {
            m.insert("details".into(), Value::Object(d.clone()));
        }
        Value::Object(m).to_string()
    });
    if let Some(details) = state_changed {
        let last = LastDetails {
            details,
            at: row.started_ms,
            failed: false,
        };
        state.details.insert(id, last);
    }

    // A run already stored (flushed again from the outage buffer after a commit whose answer
    // was lost) must not be counted twice in an hour that is already rolled up: packed with
    // its hour, it is left there as it is.
    let late = row.started_ms < state.rolled_until
        && tx
            .prepare_cached("SELECT 1 FROM runs WHERE series = ?1 AND started_at = ?2")?
            .query_row(params![id, row.started_ms], |_| Ok(()))
            .optional()?
            .is_none();
    if late && packed::is_packed(tx, id, row.started_ms)? {
        return Ok(latest_of(row));
    }

    state.buf.clear();
    codec::encode(&mut state.buf, &idx, row.duration.as_micros() as u64);
    tx.prepare_cached(
        "INSERT INTO runs (series, started_at, outcome, lag_us, data, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (series, started_at) DO UPDATE SET outcome = excluded.outcome, lag_us = excluded.lag_us,
         data = excluded.data, note = excluded.note",
    )?
    .execute(params![
        id,
        row.started_ms,
        outcome_code(row.outcome),
        row.lag.map(|l| l.as_micros() as i64),
        &state.buf,
        note,
    ])?;

    if late {
        // Its hour is already rolled up: add it there too.
        let hour = hist::floor(row.started_ms, HOUR);
        let o = outcome_code(row.outcome);
        tx.prepare_cached(
            "INSERT INTO hourly_outcomes (bucket_start, series, up, degraded, down) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (bucket_start, series) DO UPDATE SET up = hourly_outcomes.up + excluded.up,
               degraded = hourly_outcomes.degraded + excluded.degraded,
               down = hourly_outcomes.down + excluded.down",
        )?
        .execute(params![hour, id, (o == 0) as i64, (o == 1) as i64, (o == 2) as i64])?;
        roll_day(tx, id, hour)?;
        outcome_rows_changed(tx)?;
        let mut add = hist::Hour::new();
        for &(i, us) in &idx {
            hist::record(add.entry(i).or_insert_with(hist::new_hist), us);
        }
        hist::add_hourly(tx, hour, id, &add)?;
    }

    Ok(latest_of(row))
}

/// A row as the in-memory newest run of its series.
fn latest_of(row: &Row) -> LatestRun {
    let phases: Map<String, Value> = row
        .phases
        .iter()
        .map(|(n, d)| (n.to_string(), Value::from(ms(*d))))
        .collect();
    LatestRun {
        probe: row.series.to_string(),
        kind: row.kind.to_string(),
        started_at: row.started_ms,
        outcome: row.outcome.as_str().to_string(),
        error_class: row.error.map(|e| e.0.to_string()),
        error_message: row.error.map(|e| e.1.to_string()),
        duration_ms: ms(row.duration),
        phases: Value::Object(phases),
        wer: row
            .details
            .and_then(|d| d.get("wer"))
            .and_then(Value::as_f64),
    }
}

/// Convert the rows of the version-1 tables (runs with text columns, per-minute and hourly
/// histograms keyed by name) and drop them. The old histograms become hourly rows (they hold
/// exactly the old runs' latencies), and `rolled_until`/`fine_from` start after them.
fn convert_v1(tx: &Conn) -> db::Result<usize> {
    let mut state = State::load(tx)?;
    let mut n = 0;
    {
        let mut st = tx.prepare(
            "SELECT probe, kind, started_at, outcome, error_class, error_message, duration_ms, lag_ms, phases, details
             FROM runs_v1 ORDER BY id",
        )?;
        let dur = |ms: f64| Duration::from_micros((ms.max(0.0) * 1000.0).round() as u64);
        st.query_each([], |r| {
            let probe: String = r.get(0)?;
            let kind: String = r.get(1)?;
            let class: Option<String> = r.get(4)?;
            let message: Option<String> = r.get(5)?;
            let phases: Map<String, Value> =
                serde_json::from_str(&r.get::<_, String>(8)?).unwrap_or_default();
            let details: Map<String, Value> =
                serde_json::from_str(&r.get::<_, String>(9)?).unwrap_or_default();
            let row = Row {
                series: &probe,
                kind: &kind,
                started_ms: r.get(2)?,
                outcome: Outcome::parse(&r.get::<_, String>(3)?).unwrap_or(Outcome::Down),
                lag: r.get::<_, Option<f64>>(7)?.map(dur),
                duration: dur(r.get(6)?),
                phases: phases
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str(), dur(v.as_f64()?))))
                    .collect(),
                error: class
                    .as_deref()
                    .map(|c| (c, message.as_deref().unwrap_or(""))),
                details: (kind != "subcheck").then_some(&details),
            };
            insert_row(tx, &mut state, &row)?;
            n += 1;
            Ok(())
        })?;
    }
    // Old histograms, merged per series, phase and hour (read in that order, so only one
    // hour is held at a time).
    {
        let mut st = tx.prepare(
            "SELECT series, phase, bucket_start, data FROM histograms_v1 ORDER BY series, phase, bucket_start",
        )?;
        let mut cur: Option<(String, String, i64, Hist)> = None;
        let flush = |state: &mut State, c: Option<(String, String, i64, Hist)>| -> db::Result<()> {
            if let Some((series, phase, hour, h)) = c {
                let kind = if series.contains('/') { "subcheck" } else { "" };
                let info = ensure_series(tx, state, &series, kind)?;
                let i = phase_indexes(tx, info, std::iter::once(phase.as_str()))?[0];
                hist::add_hourly(tx, hour, info.id, &hist::Hour::from([(i, h)]))?;
            }
            Ok(())
        };
        st.query_each([], |r| {
            let series: String = r.get(0)?;
            let phase: String = r.get(1)?;
            let hour = hist::floor(r.get(2)?, HOUR);
            let Some(h) = hist::decode(r.blob(3)) else {
                return Ok(());
            };
            match &mut cur {
                Some((s, p, hr, acc)) if *s == series && *p == phase && *hr == hour => {
                    let _ = acc.add(&h);
                }
                _ => {
                    flush(&mut state, cur.take())?;
                    cur = Some((series, phase, hour, h));
                }
            }
            Ok(())
        })?;
        flush(&mut state, cur.take())?;
    }
    let end: Option<i64> = tx.query_row(
        "SELECT max(bucket_start + resolution * 1000) FROM histograms_v1",
        [],
        |r| r.get(0),
    )?;
    if let Some(end) = end {
        let rolled = hist::floor(end + HOUR_MS - 1, HOUR);
        set_meta(tx, "rolled_until", rolled)?;
        set_meta(tx, "fine_from", rolled)?;
    }
    tx.execute_batch("DROP TABLE runs_v1; DROP TABLE histograms_v1;")?;
    Ok(n)
}

/// Convert the hourly rows of migrations 3–12 (one per series, phase and hour, V2 + deflate)
/// into one row per series and hour, and drop them. A phase known only from those rows joins
/// its series' phase list. Every location's series at once (their ids are unique).
fn convert_hourly(tx: &Conn) -> db::Result<usize> {
    let mut phases: HashMap<i64, Vec<String>> = HashMap::new();
    tx.prepare("SELECT id, phases FROM series")?
        .query_each([], |r| {
            phases.insert(r.get(0)?, hist::parse_phases(&r.get::<_, String>(1)?));
            Ok(())
        })?;
    let mut grown = std::collections::BTreeSet::new();
    let mut n = 0;
    let write = |row: Option<(i64, i64, hist::Hour)>| -> db::Result<()> {
        if let Some((hour, series, h)) = row {
            tx.prepare_cached(
                "INSERT INTO hourly (bucket_start, series, data) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![hour, series, hist::encode_hour(&h)])?;
        }
        Ok(())
    };
    let mut cur: Option<(i64, i64, hist::Hour)> = None;
    tx.prepare(
        "SELECT bucket_start, series, phase, data FROM hourly_v1 ORDER BY bucket_start, series",
    )?
    .query_each([], |r| {
        let (hour, series): (i64, i64) = (r.get(0)?, r.get(1)?);
        let phase: String = r.get(2)?;
        // Rows of a series that no longer exists were read by nobody.
        let (Some(names), Some(h)) = (phases.get_mut(&series), hist::decode(r.blob(3))) else {
            return Ok(());
        };
        let i = match names.iter().position(|p| *p == phase) {
            Some(i) => i,
            None => {
                names.push(phase);
                grown.insert(series);
                names.len() - 1
            }
        };
        match &mut cur {
            Some((h0, s0, acc)) if *h0 == hour && *s0 == series => {
                let _ = acc.entry(i).or_insert_with(hist::new_hist).add(&h);
            }
            _ => {
                write(cur.take())?;
                n += 1;
                cur = Some((hour, series, hist::Hour::from([(i, h)])));
            }
        }
        Ok(())
    })?;
    write(cur.take())?;
    for id in grown {
        let json = serde_json::to_string(&phases[&id]).unwrap_or_else(|_| "[]".into());
        tx.execute(
            "UPDATE series SET phases = ?2 WHERE id = ?1",
            params![id, json],
        )?;
    }
    tx.execute_batch("DROP TABLE hourly_v1;")?;
    Ok(n)
}

/// Count a change of outcome rows other than a new hour at the end (a late run merged into
/// a rolled hour, another agent's rollup, pruning): [`HourlySums`] drops its sums when the
/// count moves. One count for every location (they read each other's series).
fn outcome_rows_changed(tx: &Conn) -> db::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('outcome_rows', 1)
         ON CONFLICT (key) DO UPDATE SET value = meta.value + 1",
    )?
    .execute(params![])?;
    Ok(())
}

fn set_meta(conn: &Conn, key: &str, value: i64) -> db::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![hist::meta_key(conn, key), value],
    )?;
    Ok(())
}

/// The instants one maintenance pass works against.
#[derive(Debug, Clone, Copy)]
struct Cutoffs {
    now: i64,
    /// Before this, latency is read from hourly rows (`minute_histograms`).
    minute: i64,
    runs: i64,
    hourly: i64,
}

/// Where a maintenance pass continues.
#[derive(Debug, Clone, Copy, Default)]
pub struct MaintainCursor {
    stage: u8,
    after: i64,
}

/// What maintenance did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MaintainStats {
    /// Hours rolled up into hourly histograms.
    pub rolled_hours: usize,
    /// Hourly rows (one per series and hour) written by the rollup.
    pub hourly_rows: usize,
    pub pruned_runs: usize,
    pub pruned_hourly: usize,
    /// Writer operations the pass took, and the longest: wall-clock, and on-CPU time (what
    /// the chunk itself cost, without the time a busy machine kept the thread waiting;
    /// Linux only, elsewhere the wall-clock time).
    pub chunks: usize,
    pub longest_chunk: Duration,
    pub longest_chunk_cpu: Duration,
}

impl MaintainStats {
    fn add(&mut self, o: &MaintainStats) {
        self.rolled_hours += o.rolled_hours;
        self.hourly_rows += o.hourly_rows;
        self.pruned_runs += o.pruned_runs;
        self.pruned_hourly += o.pruned_hourly;
        self.chunks += o.chunks;
        self.longest_chunk = self.longest_chunk.max(o.longest_chunk);
        self.longest_chunk_cpu = self.longest_chunk_cpu.max(o.longest_chunk_cpu);
    }
}

/// Time the calling thread has spent on a CPU (`/proc/thread-self/schedstat`, ns).
fn thread_cpu() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Up to `budget` of maintenance work from `cur`; returns where to go on, `None` when done.
/// Stages: 0 roll up finished hours, 1 move the read boundaries, 2 prune runs series by
/// series, 3 prune hourly rows and skips.
fn maintain_step(
    tx: &Conn,
    state: &mut State,
    cut: &Cutoffs,
    mut cur: MaintainCursor,
    budget: Duration,
) -> db::Result<(MaintainStats, Option<MaintainCursor>)> {
    let t0 = Instant::now();
    let mut stats = MaintainStats::default();
    if tx.is_postgres() {
        // Agents of one location share its series: one rolls up and prunes at a time (the
        // others skip their pass), going on from the bookkeeping the last one committed. A
        // try-lock, never a wait: a writer waiting here while holding row locks another
        // writer needs would deadlock.
        let key = crate::schedule::stable_hash(&format!("maintain@{}", tx.location())) as i64;
        let got: bool =
            tx.query_row("SELECT pg_try_advisory_xact_lock(?1)", [key], |r| r.get(0))?;
        if !got {
            return Ok((stats, None));
        }
        state.rolled_until = hist::meta(tx, "rolled_until")?;
        state.roll_cursor = hist::meta(tx, "roll_cursor")?;
    }
    let more = |cur| Ok(Some(cur));
    // Outcome rows written or pruned in this step (cached window sums are then stale).
    let mut outcomes_changed = false;
    let r: db::Result<Option<MaintainCursor>> = (|| {
        if cur.stage == 0 {
            loop {
                if t0.elapsed() >= budget {
                    return more(cur);
                }
                let hour = state.rolled_until;
                if hour + HOUR_MS + ROLL_DELAY_MS > cut.now {
                    break;
                }
                if state.roll_cursor == 0 {
                    // Skip hours without runs (a new database, an agent that was stopped).
                    let first: Option<i64> = tx
                        .prepare_cached(
                            "SELECT min((SELECT started_at FROM runs WHERE series = s.id AND started_at >= ?1
                                         ORDER BY started_at LIMIT 1)) FROM series s WHERE s.location = ?2",
                        )?
                        .query_row(params![hour, tx.location()], |r| r.get(0))?;
                    let Some(first) = first else { break };
                    let first_hour = hist::floor(first, HOUR);
                    if first_hour > hour {
                        state.rolled_until = first_hour;
                        continue;
                    }
                }
                let next: Option<i64> = tx
                    .prepare_cached(NEXT_SERIES)?
                    .query_row(params![state.roll_cursor, tx.location()], |r| r.get(0))
                    .optional()?;
                match next {
                    Some(id) => {
                        stats.hourly_rows += roll_series(tx, id, hour)?;
                        state.roll_cursor = id;
                        outcomes_changed = true;
                    }
                    None => {
                        state.rolled_until = hour + HOUR_MS;
                        state.roll_cursor = 0;
                        stats.rolled_hours += 1;
                    }
                }
            }
            cur = MaintainCursor { stage: 1, after: 0 };
        }
        if cur.stage == 1 {
            // Latency is read from the runs from `fine_from` on and from hourly rows before
            // it: an hour boundary no earlier than the minute-level retention and the oldest
            // runs kept, and no later than what is rolled up.
            let runs_from = hist::meta(tx, "runs_from")?;
            let ceil_hour = |ms: i64| hist::floor(ms + HOUR_MS - 1, HOUR);
            let fine_from = hist::floor(cut.minute, HOUR)
                .max(ceil_hour(runs_from.max(cut.runs)))
                .min(state.rolled_until);
            let prune_before = cut.runs.min(fine_from);
            set_meta(tx, "fine_from", fine_from)?;
            set_meta(tx, "runs_from", runs_from.max(prune_before))?;
            cur = MaintainCursor { stage: 2, after: 0 };
        }
        if cur.stage == 2 {
            let before = hist::meta(tx, "runs_from")?;
            loop {
                if t0.elapsed() >= budget {
                    return more(cur);
                }
                let next: Option<i64> = tx
                    .prepare_cached(NEXT_SERIES)?
                    .query_row(params![cur.after, tx.location()], |r| r.get(0))
                    .optional()?;
                let Some(id) = next else { break };
                let n = tx
                    .prepare_cached(
                        "DELETE FROM runs WHERE series = ?1 AND started_at IN
                         (SELECT started_at FROM runs WHERE series = ?1 AND started_at < ?2 ORDER BY started_at LIMIT ?3)",
                    )?
                    .execute(params![id, before, PRUNE_ROWS])?;
                // A packed hour goes once all of it is past the runs retention.
                let (hours, runs) = packed::prune(tx, id, before, PRUNE_HOURS)?;
                stats.pruned_runs += n + runs;
                if (n as i64) < PRUNE_ROWS && hours < PRUNE_HOURS {
                    cur.after = id;
                }
            }
            cur = MaintainCursor { stage: 3, after: 0 };
        }
        let runs_from = hist::meta(tx, "runs_from")?;
        // Outcome rows go a whole UTC day at a time, hourly and daily together, so a day's
        // row always equals its hours (a window reads a whole day from it): an hour's outcome
        // row is kept up to a day past `retention.hourly_histograms`.
        let outcomes_before = hist::floor(cut.hourly, DAY);
        loop {
            if t0.elapsed() >= budget {
                return more(cur);
            }
            let n = tx
                .prepare_cached(
                    "DELETE FROM hourly WHERE (bucket_start, series) IN
                     (SELECT bucket_start, series FROM hourly WHERE bucket_start < ?1 LIMIT ?2)",
                )?
                .execute(params![cut.hourly, PRUNE_ROWS])?;
            stats.pruned_hourly += n;
            let o = tx
                .prepare_cached(
                    "DELETE FROM hourly_outcomes WHERE (bucket_start, series) IN
                     (SELECT bucket_start, series FROM hourly_outcomes WHERE bucket_start < ?1 LIMIT ?2)",
                )?
                .execute(params![outcomes_before, PRUNE_ROWS])?;
            let d = tx
                .prepare_cached(
                    "DELETE FROM daily_outcomes WHERE (bucket_start, series) IN
                     (SELECT bucket_start, series FROM daily_outcomes WHERE bucket_start < ?1 LIMIT ?2)",
                )?
                .execute(params![outcomes_before, PRUNE_ROWS])?;
            outcomes_changed |= o + d > 0;
            let s = tx
                .prepare_cached(
                    "DELETE FROM skips WHERE (probe, planned_at) IN (SELECT probe, planned_at FROM skips WHERE planned_at < ?1 LIMIT ?2)",
                )?
                .execute(params![runs_from, PRUNE_ROWS])?;
            if [n, o, d, s].iter().all(|k| (*k as i64) < PRUNE_ROWS) {
                return Ok(None);
            }
        }
    })();
    let next = r?;
    if outcomes_changed {
        outcome_rows_changed(tx)?;
    }
    set_meta(tx, "rolled_until", state.rolled_until)?;
    set_meta(tx, "roll_cursor", state.roll_cursor)?;
    Ok((stats, next))
}

/// The next series of this location after an id (maintenance walks them in id order).
const NEXT_SERIES: &str =
    "SELECT id FROM series WHERE id > ?1 AND location = ?2 ORDER BY id LIMIT 1";

/// Roll one series' runs of the hour starting at `hour` into its hourly rows and pack them
/// ([`packed::pack`]); returns how many hourly rows that wrote (0 or 1).
fn roll_series(tx: &Conn, id: i64, hour: i64) -> db::Result<usize> {
    let phases: String = tx
        .prepare_cached("SELECT phases FROM series WHERE id = ?1")?
        .query_row([id], |r| r.get(0))?;
    let names = hist::parse_phases(&phases);
    let runs = packed::pack(tx, id, hour)?;
    if runs.is_empty() {
        return Ok(0);
    }
    let mut per = hist::Hour::new();
    let mut counts = [0i64; 3];
    for r in &runs {
        counts[usize::from(r.outcome.min(2))] += 1;
        let _ = codec::decode(&r.phases, |i, us| {
            if i < names.len() {
                hist::record(per.entry(i).or_insert_with(hist::new_hist), us);
            }
        });
    }
    tx.prepare_cached(
        "INSERT INTO hourly_outcomes (bucket_start, series, up, degraded, down) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (bucket_start, series) DO UPDATE SET up = excluded.up, degraded = excluded.degraded,
           down = excluded.down",
    )?
    .execute(params![hour, id, counts[0], counts[1], counts[2]])?;
    roll_day(tx, id, hour)?;
    if per.is_empty() {
        return Ok(0);
    }
    hist::add_hourly(tx, hour, id, &per)?;
    Ok(1)
}

/// Sum the hourly outcome rows of the day holding `hour` into the series' daily row: done
/// whenever one of them changes, so a day's row always equals its hours.
fn roll_day(tx: &Conn, id: i64, hour: i64) -> db::Result<()> {
    let day = hist::floor(hour, DAY);
    tx.prepare_cached(
        "INSERT INTO daily_outcomes (bucket_start, series, up, degraded, down)
         SELECT CAST(?2 AS BIGINT), CAST(?1 AS BIGINT), CAST(sum(up) AS BIGINT),
           CAST(sum(degraded) AS BIGINT), CAST(sum(down) AS BIGINT)
         FROM hourly_outcomes WHERE series = ?1 AND bucket_start >= ?2 AND bucket_start < ?3
         HAVING count(*) > 0
         ON CONFLICT (bucket_start, series) DO UPDATE SET up = excluded.up,
           degraded = excluded.degraded, down = excluded.down",
    )?
    .execute(params![id, day, day + DAY_MS])?;
    Ok(())
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
pub fn counts_since(conn: &Conn, since_ms: i64) -> db::Result<HashMap<String, Counts>> {
    let mut st = conn.prepare_cached(
        "SELECT s.name, r.outcome, count(*) FROM series s JOIN runs r ON r.series = s.id AND r.started_at >= ?1
         WHERE s.location = ?2 GROUP BY s.id, s.name, r.outcome",
    )?;
    let mut out: HashMap<String, Counts> = HashMap::new();
    let rows = st.query_map(params![since_ms, conn.location()], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (series, outcome, n) = row?;
        out.entry(series).or_default()[outcome_of(outcome)] += n as u64;
    }
    let names: HashMap<i64, String> = series_ids(conn, None)?.into_iter().collect();
    let ids: Vec<i64> = names.keys().copied().collect();
    packed::packed_runs(conn, &ids, (since_ms, i64::MAX), |id, r| {
        if let Some(name) = names.get(&id) {
            out.entry(name.clone()).or_default()[outcome_of(r.outcome.into())] += 1;
        }
    })?;
    Ok(out)
}

impl std::ops::IndexMut<Outcome> for Counts {
    fn index_mut(&mut self, o: Outcome) -> &mut u64 {
        match o {
            Outcome::Up => &mut self.up,
            Outcome::Degraded => &mut self.degraded,
            Outcome::Down => &mut self.down,
        }
    }
}

impl std::ops::Index<Outcome> for Counts {
    type Output = u64;
    fn index(&self, o: Outcome) -> &u64 {
        match o {
            Outcome::Up => &self.up,
            Outcome::Degraded => &self.degraded,
            Outcome::Down => &self.down,
        }
    }
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.up += o.up;
        self.degraded += o.degraded;
        self.down += o.down;
    }
}

/// Outcome counts per series over `[since_ms, until_ms)` in buckets of `bucket_ms` (bucket
/// *i* starts at `since_ms + i × bucket_ms`), for the named series or all of them. Read from
/// the runs where they are kept and from the hourly outcome rows before that (an hour is
/// counted whole, in the bucket where it starts).
pub fn outcomes(
    conn: &Conn,
    series: Option<&[String]>,
    since_ms: i64,
    until_ms: i64,
    bucket_ms: i64,
) -> db::Result<HashMap<String, Vec<Counts>>> {
    outcomes_from(conn, series, since_ms, since_ms, until_ms, bucket_ms)
}

/// [`outcomes`] over `[since_ms, until_ms)` with buckets counted from `origin_ms` (at or
/// before `since_ms`): a part of a longer bucketed window.
pub fn outcomes_from(
    conn: &Conn,
    series: Option<&[String]>,
    origin_ms: i64,
    since_ms: i64,
    until_ms: i64,
    bucket_ms: i64,
) -> db::Result<HashMap<String, Vec<Counts>>> {
    outcomes_in(
        conn,
        series,
        origin_ms,
        since_ms,
        until_ms,
        bucket_ms,
        Hours::Read,
    )
}

/// Outcome counts per series over `[since_ms, until_ms)` in one bucket (an SLO window), the
/// hourly part of each series' sum kept in `cache` and slid by the hours that entered and
/// left the window since the last call.
pub fn window_outcomes(
    conn: &Conn,
    series: Option<&[String]>,
    since_ms: i64,
    until_ms: i64,
    cache: &HourlySums,
) -> db::Result<HashMap<String, Vec<Counts>>> {
    let span = until_ms - since_ms;
    outcomes_in(
        conn,
        series,
        since_ms,
        since_ms,
        until_ms,
        span,
        Hours::Cached(cache),
    )
}

/// [`outcomes`] counted from the runs alone (exact to the millisecond, for burn windows);
/// `None` when the runs kept do not reach back to `since_ms`.
pub fn run_outcomes(
    conn: &Conn,
    series: Option<&[String]>,
    since_ms: i64,
    until_ms: i64,
    bucket_ms: i64,
) -> db::Result<Option<HashMap<String, Vec<Counts>>>> {
    if since_ms < hist::meta(conn, "runs_from")? {
        return Ok(None);
    }
    outcomes_in(
        conn,
        series,
        since_ms,
        since_ms,
        until_ms,
        bucket_ms,
        Hours::Skip,
    )
    .map(Some)
}

/// How [`outcomes_in`] treats hourly outcome rows.
#[derive(Clone, Copy)]
enum Hours<'a> {
    Read,
    /// Runs only.
    Skip,
    /// Read, the sums kept between calls (one bucket only).
    Cached(&'a HourlySums),
}

/// (series id, window length) → the hours `[lo, hi)` last summed and their sum.
type SumMap = HashMap<(i64, i64), (i64, i64, Counts)>;

/// Per series and window length: the hours `[lo, hi)` last summed and their sum, valid while
/// the store's count of outcome-row changes (`outcome_rows` in `meta`) stays as it was.
#[derive(Default)]
pub struct HourlySums(std::sync::Mutex<(i64, SumMap)>);

impl HourlySums {
    /// The sums of `[lo, hi)` for each of `ids` (windows of length `span`): from the last
    /// one when the window only moved forward (minus the hours that left, plus those that
    /// came), else summed whole. `sum(ids, a, b)` sums `[a, b)` for several series at once;
    /// it is called once per distinct range (one call when all series move together).
    ///
    /// `changes` is the store's count of outcome-row changes: when it moved since the last
    /// call, every sum is dropped and read whole.
    fn get_many(
        &self,
        ids: &[i64],
        span: i64,
        (lo, hi): (i64, i64),
        changes: i64,
        mut sum: impl FnMut(&[i64], i64, i64) -> db::Result<HashMap<i64, Counts>>,
    ) -> db::Result<HashMap<i64, Counts>> {
        let last: Vec<Option<(i64, i64, Counts)>> = {
            let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let (seen, map) = &mut *guard;
            if *seen != changes {
                map.clear();
                *seen = changes;
            }
            ids.iter()
                .map(|id| map.get(&(*id, span)).copied())
                .collect()
        };
        let slides =
            |l: &Option<(i64, i64, Counts)>| l.filter(|(l, h, _)| *l <= lo && lo <= *h && *h <= hi);
        // The ranges to read, each with the series that need it.
        let mut need: HashMap<(i64, i64), Vec<i64>> = HashMap::new();
        for (id, l) in ids.iter().zip(&last) {
            match slides(l) {
                Some((l, h, _)) => {
                    for (a, b) in [(l, lo), (h, hi)] {
                        if a < b {
                            need.entry((a, b)).or_default().push(*id);
                        }
                    }
                }
                None => need.entry((lo, hi)).or_default().push(*id),
            }
        }
        let mut got = HashMap::new();
        for (range, members) in need {
            got.insert(range, sum(&members, range.0, range.1)?);
        }
        let read = |a: i64, b: i64, id: &i64| {
            got.get(&(a, b))
                .and_then(|m| m.get(id))
                .copied()
                .unwrap_or_default()
        };
        let mut out = HashMap::with_capacity(ids.len());
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Sums read before a change another call has seen since are not kept.
        let keep = guard.0 == changes;
        let map = &mut guard.1;
        for (id, l) in ids.iter().zip(&last) {
            let c = match slides(l) {
                Some((l, h, c)) => {
                    let (gone, came) = (read(l, lo, id), read(h, hi, id));
                    Counts {
                        up: (c.up + came.up).saturating_sub(gone.up),
                        degraded: (c.degraded + came.degraded).saturating_sub(gone.degraded),
                        down: (c.down + came.down).saturating_sub(gone.down),
                    }
                }
                None => read(lo, hi, id),
            };
            if keep {
                map.insert((*id, span), (lo, hi, c));
            }
            out.insert(*id, c);
        }
        Ok(out)
    }
}

/// Series ids bound per statement: an `IN` list of this many placeholders, padded by
/// repeating an id, so a query has one text (one prepared statement) for any number of
/// series and a component's members are read in one statement.
const IDS_PER_QUERY: usize = 64;

/// `series IN (?first, …)` with [`IDS_PER_QUERY`] placeholders.
fn series_in(column: &str, first: usize) -> String {
    let list: Vec<String> = (first..first + IDS_PER_QUERY)
        .map(|i| format!("?{i}"))
        .collect();
    format!("{column} IN ({})", list.join(", "))
}

/// Run `sql` (whose `IN` list is [`series_in`]) for `ids`, [`IDS_PER_QUERY`] at a time: each
/// statement binds `head`, then a chunk of ids padded with its first one; `f` sees every row.
fn query_ids<T: db::ToSql>(
    conn: &Conn,
    sql: &str,
    head: &[db::Value],
    ids: &[T],
    mut f: impl FnMut(&db::Row) -> db::Result<()>,
) -> db::Result<()> {
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let mut v = head.to_vec();
        v.extend(chunk.iter().map(db::ToSql::to_value));
        v.resize(v.len() + IDS_PER_QUERY - chunk.len(), chunk[0].to_value());
        conn.query_each(sql, v, &mut f)?;
    }
    Ok(())
}

/// Hourly outcome rows of `ids` starting in `[lo, hi)`, summed per series and bucket of
/// `bucket_ms` counted from `origin_ms` (an hour before `since_ms` counts in the bucket of
/// `since_ms`): `(series, bucket index, counts)`.
fn hour_sums(
    conn: &Conn,
    ids: &[i64],
    (lo, hi): (i64, i64),
    (origin_ms, since_ms, bucket_ms): (i64, i64, i64),
    mut f: impl FnMut(i64, i64, Counts),
) -> db::Result<()> {
    let (parts, bucket, extra, group) = if one_bucket(hi.max(since_ms + 1), origin_ms, bucket_ms) {
        (day_parts(lo, hi), "0", vec![], "series")
    } else {
        (
            vec![("hourly_outcomes", lo, hi)],
            "(CASE WHEN bucket_start < ?3 THEN ?3 ELSE bucket_start END - ?4) / ?5",
            vec![since_ms, origin_ms, bucket_ms],
            "1, 2",
        )
    };
    for (table, lo, hi) in parts {
        let sql = format!(
            "SELECT series, {bucket},
               CAST(sum(up) AS BIGINT), CAST(sum(degraded) AS BIGINT), CAST(sum(down) AS BIGINT)
             FROM {table} WHERE bucket_start >= ?1 AND bucket_start < ?2 AND {}
             GROUP BY {group}",
            series_in("series", 3 + extra.len()),
        );
        let head: Vec<db::Value> = [lo, hi]
            .iter()
            .chain(&extra)
            .map(|v| db::Value::Int(*v))
            .collect();
        query_ids(conn, &sql, &head, ids, |r| {
            let c = Counts {
                up: r.get::<_, i64>(2)? as u64,
                degraded: r.get::<_, i64>(3)? as u64,
                down: r.get::<_, i64>(4)? as u64,
            };
            f(r.get(0)?, r.get(1)?, c);
            Ok(())
        })?;
    }
    Ok(())
}

/// The hours `[lo, hi)` (hour-aligned) as the tables to sum them from: the whole UTC days
/// among them from `daily_outcomes`, the hours before and after from `hourly_outcomes`.
fn day_parts(lo: i64, hi: i64) -> Vec<(&'static str, i64, i64)> {
    let (first_day, last_day) = (hist::floor(lo + DAY_MS - 1, DAY), hist::floor(hi, DAY));
    if first_day >= last_day {
        return vec![("hourly_outcomes", lo, hi)];
    }
    [
        ("hourly_outcomes", lo, first_day),
        ("daily_outcomes", first_day, last_day),
        ("hourly_outcomes", last_day, hi),
    ]
    .into_iter()
    .filter(|(_, a, b)| a < b)
    .collect()
}

/// Whether every row before `end_ms` falls in the first bucket of `bucket_ms` from
/// `origin_ms`: then a query groups by series alone, in its index's order (a bucket
/// expression in `GROUP BY` makes SQLite sort every row first — two thirds of a cold SLO
/// window's read).
fn one_bucket(end_ms: i64, origin_ms: i64, bucket_ms: i64) -> bool {
    (end_ms - 1 - origin_ms) < bucket_ms
}

/// Runs of `ids` started in `[lo, hi)` counted per series and bucket of `bucket_ms` from
/// `origin_ms`: `(series, bucket index, counts)`.
fn run_counts(
    conn: &Conn,
    ids: &[i64],
    (lo, hi): (i64, i64),
    (origin_ms, bucket_ms): (i64, i64),
    mut f: impl FnMut(i64, i64, Counts),
) -> db::Result<()> {
    let (bucket, head, group) = if one_bucket(hi, origin_ms, bucket_ms) {
        ("0", vec![lo, hi], "series")
    } else {
        (
            "(started_at - ?3) / ?4",
            vec![lo, hi, origin_ms, bucket_ms],
            "1, 2",
        )
    };
    let sql = format!(
        "SELECT series, {bucket}, count(*),
           CAST(sum(CASE WHEN outcome = 0 THEN 1 ELSE 0 END) AS BIGINT),
           CAST(sum(CASE WHEN outcome = 1 THEN 1 ELSE 0 END) AS BIGINT)
         FROM runs WHERE started_at >= ?1 AND started_at < ?2 AND {} GROUP BY {group}",
        series_in("series", head.len() + 1),
    );
    let head: Vec<db::Value> = head.into_iter().map(db::Value::Int).collect();
    query_ids(conn, &sql, &head, ids, |r| {
        let (all, up, degraded) = (
            r.get::<_, i64>(2)? as u64,
            r.get::<_, i64>(3)? as u64,
            r.get::<_, i64>(4)? as u64,
        );
        let c = Counts {
            up,
            degraded,
            // Any other code reads as down (`outcome_of`).
            down: all.saturating_sub(up + degraded),
        };
        f(r.get(0)?, r.get(1)?, c);
        Ok(())
    })?;
    packed::packed_runs(conn, ids, (lo, hi), |id, r| {
        let mut c = Counts::default();
        c[outcome_of(r.outcome.into())] = 1;
        f(id, (r.started_at - origin_ms) / bucket_ms, c)
    })
}

/// Every query reads all the series asked for at once, [`IDS_PER_QUERY`] at a time: one
/// statement for the hourly rows and one per span of runs, not one per series.
fn outcomes_in(
    conn: &Conn,
    series: Option<&[String]>,
    origin_ms: i64,
    since_ms: i64,
    until_ms: i64,
    bucket_ms: i64,
    hours_mode: Hours<'_>,
) -> db::Result<HashMap<String, Vec<Counts>>> {
    let bucket_ms = bucket_ms.max(1);
    let origin_ms = origin_ms.min(since_ms);
    let n = ((until_ms - origin_ms).max(0) + bucket_ms - 1) / bucket_ms;
    let n = n.clamp(1, 10_000) as usize;
    let (h_lo, h_hi) = match hours_mode {
        Hours::Skip => (since_ms, since_ms),
        _ => hourly_span(conn, since_ms, until_ms, n == 1 || bucket_ms >= HOUR_MS)?,
    };
    // Runs before and after the hourly rows.
    let run_spans = if h_lo < h_hi {
        vec![
            (since_ms, h_lo.min(until_ms)),
            (h_hi.max(since_ms), until_ms),
        ]
    } else {
        vec![(since_ms, until_ms)]
    };
    let names: HashMap<i64, String> = series_ids(conn, series)?.into_iter().collect();
    let ids: Vec<i64> = names.keys().copied().collect();
    // Series with at least one row, and their buckets.
    let mut per: HashMap<i64, Vec<Counts>> = HashMap::new();
    let mut add = |id: i64, i: i64, c: Counts| {
        let v = per.entry(id).or_insert_with(|| vec![Counts::default(); n]);
        v[(i.max(0) as usize).min(n - 1)] += c;
    };
    if h_lo < h_hi {
        match hours_mode {
            Hours::Cached(cache) if n == 1 => {
                let span = until_ms - since_ms;
                let changes = hist::meta(conn, "outcome_rows")?;
                let sums = cache.get_many(&ids, span, (h_lo, h_hi), changes, |ids, lo, hi| {
                    let mut m: HashMap<i64, Counts> = HashMap::new();
                    hour_sums(
                        conn,
                        ids,
                        (lo, hi),
                        (lo, lo, (hi - lo).max(1)),
                        |id, _, c| *m.entry(id).or_default() += c,
                    )?;
                    Ok(m)
                })?;
                for (id, c) in sums.into_iter().filter(|(_, c)| c.total() > 0) {
                    add(id, 0, c);
                }
            }
            _ => hour_sums(
                conn,
                &ids,
                (h_lo, h_hi),
                (origin_ms, since_ms, bucket_ms),
                &mut add,
            )?,
        }
    }
    for span in run_spans.into_iter().filter(|(lo, hi)| lo < hi) {
        run_counts(conn, &ids, span, (origin_ms, bucket_ms), &mut add)?;
    }
    Ok(per
        .into_iter()
        .filter_map(|(id, v)| Some((names.get(&id)?.clone(), v)))
        .collect())
}

/// The hours `[lo, hi)` of a window `[since_ms, until_ms)` read from hourly outcome rows;
/// the rest of the window is read from the runs. While the runs reach back to the window's
/// start, only whole hours inside it that are rolled up and have outcome rows
/// (`outcomes_from`, migration 10: hours rolled by an older version have none) — so the
/// counts are exact and an SLO window does not count a month of runs. Before the runs
/// kept, hours are taken whole from the one holding `since_ms`. A window that ends inside
/// an hour whose runs are kept reads that hour from the runs: its hourly row would count
/// the runs after the end (a maintenance window starting mid-hour, and the rest of the
/// hour a second time after the maintenance).
///
/// `whole_hours` is false for buckets shorter than an hour: an hour's outcome row cannot be
/// split across them (it would count whole in one and leave the others empty), so the hours
/// whose runs are kept are read from the runs.
fn hourly_span(
    conn: &Conn,
    since_ms: i64,
    until_ms: i64,
    whole_hours: bool,
) -> db::Result<(i64, i64)> {
    let runs_from = hist::meta(conn, "runs_from")?;
    let until_hour = hist::floor(until_ms, HOUR);
    let end = if until_hour >= runs_from {
        until_hour
    } else {
        until_ms
    };
    let rolled = hist::meta(conn, "rolled_until")?.min(end);
    let outcomes_from = hist::meta(conn, "outcomes_from")?;
    let ceil_hour = |ms: i64| hist::floor(ms + HOUR_MS - 1, HOUR);
    Ok(if since_ms >= runs_from {
        let lo = ceil_hour(since_ms);
        (
            lo,
            if whole_hours && outcomes_from <= lo {
                rolled
            } else {
                lo
            },
        )
    } else {
        let runs_hour = ceil_hour(runs_from);
        let hi = if whole_hours && outcomes_from <= runs_hour {
            rolled
        } else {
            runs_hour.min(rolled)
        };
        (hist::floor(since_ms, HOUR), hi)
    })
}

/// Ids of the named series of this connection's location (all of them for `None`), by
/// the unique (location, name) index, [`IDS_PER_QUERY`] names a statement: a few members
/// never read the whole series table.
pub fn series_ids(conn: &Conn, series: Option<&[String]>) -> db::Result<Vec<(i64, String)>> {
    let Some(list) = series else {
        let mut st = conn.prepare_cached("SELECT id, name FROM series WHERE location = ?1")?;
        let rows = st.query_map([conn.location()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        return rows.collect();
    };
    let mut names: Vec<&String> = list.iter().collect();
    names.sort();
    names.dedup();
    let sql = format!(
        "SELECT id, name FROM series WHERE location = ?1 AND {}",
        series_in("name", 2)
    );
    let mut ids = Vec::with_capacity(names.len());
    let head = [db::Value::Text(conn.location())];
    query_ids(conn, &sql, &head, &names, |r| {
        ids.push((r.get(0)?, r.get(1)?));
        Ok(())
    })?;
    Ok(ids)
}

/// The locations that recorded series, sorted (`[""]` on a single machine's SQLite store,
/// or before anything is recorded: the connection's own).
pub fn locations(conn: &Conn) -> db::Result<Vec<String>> {
    let mut v: Vec<String> = conn.query_map(
        "SELECT DISTINCT location FROM series ORDER BY location",
        [],
        |r| r.get(0),
    )?;
    if v.is_empty() {
        v.push(conn.location());
    }
    Ok(v)
}

/// The locations a view covers: all of them (`None`: the fleet) or the one named, which must
/// have recorded something.
pub fn view_locations(conn: &Conn, only: Option<&str>) -> anyhow::Result<Vec<String>> {
    let all = locations(conn)?;
    match only {
        None => Ok(all),
        Some(l) if all.iter().any(|x| x == l) => Ok(vec![l.to_string()]),
        Some(l) => Err(UnknownLocation {
            name: l.to_string(),
            known: all.join(", "),
        }
        .into()),
    }
}

/// A view asked for a location that recorded nothing.
#[derive(Debug, thiserror::Error)]
#[error("no runs recorded from location {name:?} (locations: {known})")]
pub struct UnknownLocation {
    pub name: String,
    pub known: String,
}

/// `f(location)` once per location, the connection reading as each in turn (per-location
/// series and bookkeeping, see [`Conn::read_as`]); its own location is restored after.
pub fn each_location<T>(
    conn: &Conn,
    locations: &[String],
    mut f: impl FnMut(&str) -> db::Result<T>,
) -> db::Result<Vec<T>> {
    let own = conn.location();
    let mut out = Vec::with_capacity(locations.len());
    for l in locations {
        conn.read_as(l);
        let r = f(l);
        if r.is_err() {
            conn.read_as(&own);
        }
        out.push(r?);
    }
    conn.read_as(&own);
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
    /// A listen run's word error rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wer: Option<f64>,
}

/// The newest stored run of each series, from the database (the writer keeps the same in
/// memory: [`Store::latest`]).
pub fn latest_runs(conn: &Conn) -> db::Result<Vec<LatestRun>> {
    let series: Vec<(i64, String, String, String)> = conn.query_map(
        "SELECT id, name, kind, phases FROM series WHERE location = ?1 ORDER BY name",
        [conn.location()],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    let mut out = Vec::with_capacity(series.len());
    for (id, probe, kind, phases) in series {
        let names = hist::parse_phases(&phases);
        let mut newest = None;
        runs_back(conn, id, i64::MAX, |r| {
            let mut phases = Map::new();
            let duration_us = codec::decode(r.phases, |i, us| {
                if let Some(n) = names.get(i) {
                    phases.insert(n.clone(), Value::from(us as f64 / 1000.0));
                }
            })
            .unwrap_or(0);
            let note: Option<Value> = r.note.and_then(|n| serde_json::from_str(n).ok());
            let text = |k: &str| {
                note.as_ref()
                    .and_then(|n| n.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            newest = Some(LatestRun {
                probe: probe.clone(),
                kind: kind.clone(),
                started_at: r.started_at,
                outcome: outcome_of(r.outcome.into()).as_str().to_string(),
                error_class: text("class"),
                error_message: text("message"),
                duration_ms: duration_us as f64 / 1000.0,
                phases: Value::Object(phases),
                wer: None,
            });
            false
        })?;
        out.extend(newest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newest run of `probe` (also for the tests of [`super::view`]).
    pub(super) fn run(probe: &str, at: i64, outcome: &str) -> LatestRun {
        LatestRun {
            probe: probe.into(),
            kind: "http".into(),
            started_at: at,
            outcome: outcome.into(),
            error_class: None,
            error_message: None,
            duration_ms: 1.0,
            phases: Value::Object(Map::new()),
            wer: None,
        }
    }

    #[test]
    fn hourly_sums_slide_with_the_window() {
        // One down run per hour and series at hours 0..100; sums read from that. `reads`
        // counts hours read, `calls` the (grouped) reads.
        let (reads, calls) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let sum = |ids: &[i64], lo: i64, hi: i64| -> db::Result<HashMap<i64, Counts>> {
            reads.set(reads.get() + (hi - lo) * ids.len() as i64);
            calls.set(calls.get() + 1);
            Ok(ids
                .iter()
                .map(|id| {
                    let c = Counts {
                        up: 0,
                        degraded: 0,
                        down: (hi - lo) as u64,
                    };
                    (*id, c)
                })
                .collect())
        };
        let cache = HourlySums::default();
        let down = |m: HashMap<i64, Counts>| {
            let mut v: Vec<(i64, u64)> = m.into_iter().map(|(id, c)| (id, c.down)).collect();
            v.sort();
            v
        };
        let (ids, span) = ([7, 8], 30);
        assert_eq!(
            down(cache.get_many(&ids, span, (0, 30), 0, sum).unwrap()),
            vec![(7, 30), (8, 30)]
        );
        assert_eq!(
            (reads.get(), calls.get()),
            (60, 1),
            "both series in one read"
        );
        // The window moved by two hours: four hours read per series, not thirty, in two
        // reads (the hours that left, those that came) for both series.
        assert_eq!(
            down(cache.get_many(&ids, span, (2, 32), 0, sum).unwrap()),
            vec![(7, 30), (8, 30)]
        );
        assert_eq!((reads.get(), calls.get()), (68, 3));
        // Unchanged: nothing read.
        cache.get_many(&ids, span, (2, 32), 0, sum).unwrap();
        assert_eq!((reads.get(), calls.get()), (68, 3));
        // A series seen for the first time is read whole, the others slide.
        assert_eq!(
            down(cache.get_many(&[7, 9], span, (3, 33), 0, sum).unwrap()),
            vec![(7, 30), (9, 30)]
        );
        assert_eq!((reads.get(), calls.get()), (68 + 2 + 30, 6));
        // Backwards or jumped past the last one: read whole.
        cache.get_many(&[7], span, (1, 31), 0, sum).unwrap();
        assert_eq!(reads.get(), 130);
        cache.get_many(&[7], span, (50, 80), 0, sum).unwrap();
        assert_eq!(reads.get(), 160);
        // Another window length is its own entry.
        cache.get_many(&[7], 10, (70, 80), 0, sum).unwrap();
        assert_eq!(reads.get(), 170);
        // The store's outcome rows changed (a late run, pruning): everything is read whole.
        cache.get_many(&[7], 10, (70, 80), 1, sum).unwrap();
        assert_eq!(reads.get(), 180);
        cache.get_many(&[7], span, (50, 80), 1, sum).unwrap();
        assert_eq!(reads.get(), 210);
        cache.get_many(&[7], span, (50, 80), 1, sum).unwrap();
        assert_eq!(reads.get(), 210, "and kept again until the next change");
    }

    #[test]
    fn changes_since_a_cursor() {
        let l = Latest::default();
        l.update(vec![run("a", 1, "up"), run("b", 1, "up")]);
        let first = l.changed_since(None);
        assert!(first.full);
        assert_eq!(first.series.len(), 2);
        // Nothing new: an empty list, not a full one.
        let none = l.changed_since(Some(&first.cursor));
        assert!(!none.full);
        assert!(none.series.is_empty());
        assert_eq!(none.cursor, first.cursor);
        l.update(vec![run("b", 2, "down")]);
        let one = l.changed_since(Some(&first.cursor));
        assert!(!one.full);
        assert_eq!(one.series.len(), 1);
        assert_eq!(one.series[0].0.probe, "b");
        assert_eq!(one.series[0].1.runs.len(), 2, "the strip comes whole");
        // A cursor from another process, from the future, or garbage: everything.
        let (epoch, version) = one.cursor.split_once('.').unwrap();
        let other = format!(
            "{}.{version}",
            epoch.parse::<u32>().unwrap().wrapping_add(1)
        );
        let ahead = format!("{epoch}.{}", version.parse::<u64>().unwrap() + 5);
        for c in [other.as_str(), ahead.as_str(), "x", ""] {
            let all = l.changed_since(Some(c));
            assert!(all.full, "{c}");
            assert_eq!(all.series.len(), 2, "{c}");
        }
    }
}
