//! Fleet mode (`[agent] database_url_env`): several agents sharing one Postgres. This module
//! is who does what among them:
//!
//! - **Membership.** Every agent writes a heartbeat row in `members` every
//!   `[agent] fleet.heartbeat`; a member is live while its heartbeat is younger than two
//!   heartbeats. All times are the database's clock, so agents' clocks need not agree.
//! - **Probe ownership.** The live members of one location split its probes by rendezvous
//!   (highest random weight) hashing of (probe, agent id): each probe has exactly one owner
//!   among them, and when a member joins or dies only the probes it gains or loses move.
//!   The scheduler skips the slots of probes this agent does not own ([`Ownership`]),
//!   re-evaluated on every heartbeat.
//! - **Leader lease.** One row in `leases`, taken when expired and renewed by its holder on
//!   every heartbeat. The holder acts as leader until its *local* deadline (start of the
//!   renewing statement + lease − one heartbeat), which is never later than the expiry the
//!   others judge by: a leader cut off from Postgres stops acting before anyone can take
//!   over. Only the leader runs the incident evaluator, the notifier workers and the scheduled
//!   reviews ([`Leader`]).
//! - **Run feed.** Every agent appends its runs to `run_feed` ([`feed`]); the leader reads
//!   them in commit order and feeds its evaluator, so it judges every agent's runs. Rows are
//!   read up to the oldest transaction still running (`pg_snapshot_xmin`), so a row whose
//!   transaction commits late is never skipped. The leader keeps its read position in the
//!   lease row, so the next leader goes on from there.
//! - **Outbox claims.** Before delivering a row the leader claims it (`FOR UPDATE SKIP
//!   LOCKED`, a claim that expires after the delivery deadline, and only while it holds the
//!   lease): two leaders never deliver one row ([`claim`]).
//! - **Confirmation across locations.** An agent that sees a probe go bad (a run not up
//!   after one that was) asks the other locations to confirm: a row in `confirm_requests`,
//!   written with the run's feed row ([`ask`]). Every agent polls the open requests of other
//!   locations once a second ([`confirmations`]) and the owner of the probe in its location
//!   re-runs it at once through the usual path, marked [`CONFIRMATION`]; the leader then
//!   opens the incident without waiting for `failure_threshold` (see `incident::Evaluator`).
//!
//! Not here: storing runs (`store`), judging components (`incident`), delivering (`notify`).
//! Nothing here runs on the single-machine SQLite store.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{Command, CommandError};
use crate::incident::Located;
use crate::metrics::Metrics;
use crate::pipeline::Shared;
use crate::probe::{ErrorClass, ErrorInfo, Outcome, RunResult, SubCheck};
use crate::store::db::{self, params, Conn, OptionalExtension};
use crate::store::Store;

/// Tables of fleet mode, and the outbox claim columns. SQLite creates them too (unused
/// there); the feed's commit-order column only means something on Postgres.
pub const MIGRATION: &str = "
CREATE TABLE members (
    agent TEXT PRIMARY KEY,
    location TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    acquired_at INTEGER NOT NULL,
    feed_txid INTEGER,
    feed_id INTEGER
);
CREATE TABLE run_feed (
    id INTEGER PRIMARY KEY,
    txid INTEGER NOT NULL DEFAULT 0,
    agent TEXT NOT NULL,
    location TEXT NOT NULL,
    probe TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    run TEXT NOT NULL
);
-- postgres: ALTER TABLE run_feed ALTER COLUMN txid SET DEFAULT CAST(pg_current_xact_id()::text AS BIGINT);
CREATE INDEX run_feed_order ON run_feed (txid, id);
CREATE INDEX run_feed_time ON run_feed (started_at);
ALTER TABLE outbox ADD COLUMN claimed_by TEXT;
ALTER TABLE outbox ADD COLUMN claim_until INTEGER;
";

/// Migration 12: confirmation requests across locations, at most one open per probe and
/// asking location. SQLite creates the table too (unused there).
pub const CONFIRM_MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS confirm_requests (
    probe TEXT NOT NULL,
    location TEXT NOT NULL,
    agent TEXT NOT NULL,
    asked_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (probe, location)
);
CREATE INDEX IF NOT EXISTS confirm_requests_open ON confirm_requests (expires_at);
";

/// The database's clock in ms (Postgres): every fleet time is judged by it.
macro_rules! now_ms {
    () => {
        "CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)"
    };
}

/// The name of the one lease.
const LEADER: &str = "leader";
/// How long the feed keeps runs (the leader reads them within seconds).
const FEED_KEEP: Duration = Duration::from_secs(600);
/// How often the leader reads the feed.
const FEED_POLL: Duration = Duration::from_millis(200);
/// Feed rows read at once.
const FEED_BATCH: i64 = 500;
/// Members whose heartbeat is older than this are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// How often an agent looks for confirmation requests of other locations.
const CONFIRM_POLL: Duration = Duration::from_secs(1);
/// A confirmation request stays open one probe interval, and at least this long (several
/// polls), so that every location sees it.
const CONFIRM_OPEN_MIN: Duration = Duration::from_secs(3);
/// The run detail that marks a confirmation run; its value is the location that asked.
pub const CONFIRMATION: &str = "confirmation_for";

/// This agent as a member of the fleet.
#[derive(Debug, Clone)]
pub struct Member {
    /// `<host>-<8 hex digits>`, new at every start.
    pub id: String,
    pub location: String,
    pub heartbeat: Duration,
    pub lease: Duration,
    /// Ask for and answer confirmation re-runs (`[agent] fleet.confirm`).
    pub confirm: bool,
}

impl Member {
    /// A new identity for this process (`None` without `database_url_env`).
    pub fn of(config: &Config) -> Option<Member> {
        config.agent.database_url.as_ref()?;
        Some(Member {
            id: format!(
                "{}-{:08x}",
                crate::config::hostname(),
                rand::random::<u32>()
            ),
            location: config.agent.location.clone(),
            heartbeat: config.agent.fleet.heartbeat,
            lease: config.agent.fleet.lease,
            confirm: config.agent.fleet.confirm,
        })
    }

    /// A member is live while its heartbeat is younger than this.
    pub fn live_window(&self) -> Duration {
        self.heartbeat * 2
    }

    /// The local deadline of a lease renewed by a statement started at `t0`.
    fn lease_deadline(&self, t0: Instant) -> Instant {
        t0 + self.lease.saturating_sub(self.heartbeat)
    }
}

/// Mix a 64-bit value (the MurmurHash3 finaliser): FNV alone spreads similar names poorly.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The rendezvous weight of `member` for `probe`.
fn weight(probe: &str, member: &str) -> u64 {
    let key = format!("{probe}\u{0}{member}");
    mix(crate::schedule::stable_hash(&key))
}

/// The owner of `probe` among `members`: the highest weight (ties: the greater id).
pub fn owner<'m>(probe: &str, members: &'m [String]) -> Option<&'m str> {
    members
        .iter()
        .max_by(|a, b| {
            weight(probe, a)
                .cmp(&weight(probe, b))
                .then_with(|| a.cmp(b))
        })
        .map(String::as_str)
}

/// Which probes this agent runs. The default (single machine) owns every probe; in fleet
/// mode it owns those [`owner`] gives it among the live members of its location, and
/// nothing before its first heartbeat.
#[derive(Clone, Default)]
pub struct Ownership(Arc<RwLock<Option<View>>>);

#[derive(Debug, Clone, PartialEq)]
struct View {
    me: String,
    live: Vec<String>,
}

impl Ownership {
    /// Fleet mode for member `me` (owns nothing until [`Ownership::set_live`]).
    pub fn fleet(me: &str) -> Ownership {
        Ownership(Arc::new(RwLock::new(Some(View {
            me: me.to_string(),
            live: Vec::new(),
        }))))
    }

    /// Whether this agent runs `probe` now.
    pub fn owns(&self, probe: &str) -> bool {
        match &*self.0.read().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(v) => owner(probe, &v.live) == Some(v.me.as_str()),
        }
    }

    /// The live members of this agent's location (sorted); `true` when they changed.
    pub fn set_live(&self, mut live: Vec<String>) -> bool {
        live.sort();
        let mut g = self.0.write().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(v) if v.live != live => {
                v.live = live;
                true
            }
            _ => false,
        }
    }

    /// The live members as last seen (empty on a single machine).
    pub fn live(&self) -> Vec<String> {
        let g = self.0.read().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|v| v.live.clone()).unwrap_or_default()
    }
}

/// The leader's read position in the feed: (transaction id, row id) of the last row read.
#[derive(Clone, Default)]
pub struct Cursor(Arc<Mutex<Option<(i64, i64)>>>);

impl Cursor {
    fn get(&self) -> Option<(i64, i64)> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set(&self, v: Option<(i64, i64)>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
}

/// What one heartbeat saw.
#[derive(Debug)]
struct Seen {
    live: Vec<String>,
    leader: bool,
}

/// One heartbeat: stamp the member row, read the live members of the location, take or
/// renew the lease (saving the feed position while leading), forget long-dead members.
fn heartbeat_once(
    conn: &Conn,
    me: &Member,
    started_ms: i64,
    cursor: Option<(i64, i64)>,
) -> db::Result<Seen> {
    conn.execute(
        concat!(
            "INSERT INTO members (agent, location, host, pid, started_at, heartbeat_at) VALUES (?1, ?2, ?3, ?4, ?5, ",
            now_ms!(),
            ") ON CONFLICT (agent) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, location = excluded.location"
        ),
        params![
            me.id,
            me.location,
            crate::config::hostname(),
            std::process::id(),
            started_ms
        ],
    )?;
    let live = conn.query_map(
        concat!(
            "SELECT agent FROM members WHERE location = ?1 AND heartbeat_at > ",
            now_ms!(),
            " - ?2 ORDER BY agent"
        ),
        params![me.location, me.live_window().as_millis() as i64],
        |r| r.get(0),
    )?;
    let held: Option<String> = conn
        .query_row(
            concat!(
                "INSERT INTO leases (name, holder, expires_at, acquired_at) VALUES (?1, ?2, ",
                now_ms!(),
                " + ?3, ",
                now_ms!(),
                ") ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at,
                 acquired_at = CASE WHEN leases.holder = excluded.holder THEN leases.acquired_at ELSE excluded.acquired_at END
                 WHERE leases.holder = excluded.holder OR leases.expires_at < ",
                now_ms!(),
                " RETURNING holder"
            ),
            params![LEADER, me.id, me.lease.as_millis() as i64],
            |r| r.get(0),
        )
        .optional()?;
    let leader = held.is_some();
    if let (true, Some(pos)) = (leader, cursor) {
        save_position(conn, me, pos)?;
    }
    conn.execute(
        concat!(
            "DELETE FROM members WHERE heartbeat_at < ",
            now_ms!(),
            " - ?1"
        ),
        [FORGET_AFTER.as_millis() as i64],
    )?;
    Ok(Seen { live, leader })
}

/// Keep the leader's feed position in the lease row (while `me` holds it).
fn save_position(conn: &Conn, me: &Member, (txid, id): (i64, i64)) -> db::Result<()> {
    conn.execute(
        "UPDATE leases SET feed_txid = ?3, feed_id = ?4 WHERE name = ?1 AND holder = ?2",
        params![LEADER, me.id, txid, id],
    )?;
    Ok(())
}

/// Leave the fleet: the member row goes, the lease (if held) expires now.
fn leave(conn: &Conn, me: &Member) -> db::Result<()> {
    conn.execute(
        "UPDATE leases SET expires_at = 0 WHERE name = ?1 AND holder = ?2",
        params![LEADER, me.id],
    )?;
    conn.execute("DELETE FROM members WHERE agent = ?1", [&me.id])?;
    Ok(())
}

/// Run blocking database work on a reused pooled connection, off the async threads; the
/// connection is dropped after an error (the next call takes a fresh one).
async fn off_thread<T: Send + 'static>(
    store: &Store,
    conn: &mut Option<Conn>,
    f: impl FnOnce(&Conn) -> db::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let c = conn.take();
    let store = store.clone();
    let (c, r) = tokio::task::spawn_blocking(move || {
        let c = match c {
            Some(c) => c,
            None => match store.reader() {
                Ok(c) => c,
                Err(e) => return (None, Err(e)),
            },
        };
        let r = f(&c).map_err(anyhow::Error::from);
        (Some(c), r)
    })
    .await?;
    if r.is_ok() {
        *conn = c;
    }
    r
}

/// The membership loop: a heartbeat every `member.heartbeat` until `stop`, updating
/// `ownership` and `role` (the local deadline of the lease while this agent holds it).
/// On a clean stop the agent leaves (its probes and the lease move at once).
pub async fn membership(
    member: Arc<Member>,
    store: Store,
    shared: Shared,
    role: watch::Sender<Option<Instant>>,
    cursor: Cursor,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let started_ms = chrono::Utc::now().timestamp_millis();
    let mut tick = tokio::time::interval(member.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let t0 = Instant::now();
        let (m, at, paused) = (member.clone(), cursor.get(), shared.paused.clone());
        let seen = off_thread(&store, &mut conn, move |c| {
            let seen = heartbeat_once(c, &m, started_ms, at)?;
            // A pause or resume made through another agent's API reaches this one here.
            paused.load(c)?;
            Ok(seen)
        })
        .await;
        let seen = match seen {
            Ok(s) => s,
            Err(e) => {
                // Keep the last view: probes keep running (other members may take them
                // over, which is a double run, not a gap); the lease runs out on its own.
                if !failing {
                    tracing::warn!(agent = %member.id, error = %format!("{e:#}"), "fleet heartbeat failed; keeping the last view of the fleet");
                }
                failing = true;
                continue;
            }
        };
        if failing {
            tracing::info!(agent = %member.id, "fleet heartbeat works again");
            failing = false;
        }
        if shared.ownership.set_live(seen.live.clone()) {
            tracing::info!(agent = %member.id, location = %member.location, live = %seen.live.join(","), "members of this location changed; probes re-split");
        }
        let was = role.borrow().is_some();
        if seen.leader {
            role.send_replace(Some(member.lease_deadline(t0)));
        } else {
            role.send_replace(None);
        }
        if seen.leader != was {
            tracing::info!(agent = %member.id, leader = seen.leader, "fleet leadership changed");
        }
    }
    role.send_replace(None);
    let m = member.clone();
    if let Err(e) = off_thread(&store, &mut conn, move |c| leave(c, &m)).await {
        tracing::warn!(agent = %member.id, error = %format!("{e:#}"), "could not leave the fleet cleanly; the lease expires on its own");
    }
    Ok(())
}

/// A run as the feed carries it (what the evaluator reads of a run).
#[derive(Debug, Serialize, Deserialize)]
struct FeedRun {
    probe: String,
    started_at: i64,
    duration_us: u64,
    outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<(ErrorClass, String)>,
    #[serde(default)]
    phases: Vec<(String, u64)>,
    #[serde(default)]
    details: Map<String, Value>,
    #[serde(default)]
    subchecks: Vec<FeedSub>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FeedSub {
    series: String,
    outcome: String,
    latency_us: Option<u64>,
    error: Option<(ErrorClass, String)>,
}

fn error_of(e: &Option<ErrorInfo>) -> Option<(ErrorClass, String)> {
    e.as_ref().map(|e| (e.class, e.message.clone()))
}

fn info_of(e: Option<(ErrorClass, String)>) -> Option<ErrorInfo> {
    e.map(|(class, message)| ErrorInfo { class, message })
}

impl FeedRun {
    fn of(r: &RunResult) -> FeedRun {
        FeedRun {
            probe: r.probe.clone(),
            started_at: r.started_at.timestamp_millis(),
            duration_us: r.duration.as_micros() as u64,
            outcome: r.outcome.as_str().to_string(),
            error: error_of(&r.error),
            phases: r
                .phases
                .iter()
                .map(|(n, d)| (n.clone(), d.as_micros() as u64))
                .collect(),
            details: r.details.clone(),
            subchecks: r
                .subchecks
                .iter()
                .map(|s| FeedSub {
                    series: s.series.clone(),
                    outcome: s.outcome.as_str().to_string(),
                    latency_us: s.latency.map(|l| l.as_micros() as u64),
                    error: error_of(&s.error),
                })
                .collect(),
        }
    }

    /// Back to a run of `kind` (from this agent's config: fleet agents share it).
    fn into_run(self, kind: &'static str) -> RunResult {
        let outcome = |s: &str| Outcome::parse(s).unwrap_or(Outcome::Down);
        RunResult {
            kind,
            started_at: chrono::DateTime::from_timestamp_millis(self.started_at)
                .unwrap_or_default(),
            duration: Duration::from_micros(self.duration_us),
            lag: None,
            outcome: outcome(&self.outcome),
            error: info_of(self.error),
            phases: self
                .phases
                .into_iter()
                .map(|(n, us)| (n, Duration::from_micros(us)))
                .collect(),
            details: self.details,
            subchecks: self
                .subchecks
                .into_iter()
                .map(|s| SubCheck {
                    outcome: outcome(&s.outcome),
                    series: s.series,
                    latency: s.latency_us.map(Duration::from_micros),
                    error: info_of(s.error),
                })
                .collect(),
            probe: self.probe,
        }
    }
}

/// Runs appended to the feed at most per write.
const FEED_WRITE_BATCH: usize = 256;

/// Every run of this agent (after the store has it) into the feed, batched, until the
/// fan-out closes `runs`; a run that sees a probe go bad also asks the other locations to
/// confirm ([`ask`], in the same write). A batch that cannot be written is logged and
/// dropped (the runs themselves are in the store; only the leader's evaluation misses them).
pub async fn feed(
    mut runs: mpsc::Receiver<Located>,
    store: Store,
    member: Arc<Member>,
    config: Arc<Config>,
) -> anyhow::Result<()> {
    let mut asker = Asker::default();
    while let Some(r) = runs.recv().await {
        let mut batch = vec![r.run];
        while batch.len() < FEED_WRITE_BATCH {
            match runs.try_recv() {
                Ok(r) => batch.push(r.run),
                Err(_) => break,
            }
        }
        let rows: Vec<(String, i64, &'static str, String)> = batch
            .iter()
            .filter_map(|r| {
                let json = serde_json::to_string(&FeedRun::of(r)).ok()?;
                Some((
                    r.probe.clone(),
                    r.started_at.timestamp_millis(),
                    r.outcome.as_str(),
                    json,
                ))
            })
            .collect();
        let asks: Vec<(String, Duration)> = batch
            .iter()
            .filter(|r| asker.wants(r) && member.confirm)
            .map(|r| {
                let interval = config
                    .probe(&r.probe)
                    .map_or(Duration::ZERO, |p| p.interval);
                (r.probe.clone(), interval.max(CONFIRM_OPEN_MIN))
            })
            .collect();
        let m = member.clone();
        let n = rows.len();
        let written = store
            .write(move |c| {
                for (probe, at, outcome, json) in &rows {
                    c.execute(
                        "INSERT INTO run_feed (agent, location, probe, started_at, outcome, run) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![m.id, m.location, probe, at, outcome, json],
                    )?;
                }
                let mut asked = Vec::new();
                for (probe, open) in &asks {
                    if ask(c, probe, &m, *open)? {
                        asked.push(probe.clone());
                    }
                }
                Ok(asked)
            })
            .await;
        match written {
            Ok(asked) => {
                for probe in asked {
                    tracing::info!(probe = %probe, location = %member.location, "probe went bad here: the other locations are asked to confirm it now");
                }
            }
            Err(e) => {
                tracing::warn!(runs = n, error = %format!("{e:#}"), "runs not passed to the fleet leader")
            }
        }
    }
    Ok(())
}

/// Whether a run is a confirmation run (made because another location asked).
pub fn is_confirmation(r: &RunResult) -> bool {
    r.details.contains_key(CONFIRMATION)
}

/// Which runs of this agent ask the other locations to confirm: a run that is not up after
/// one of the same probe that was up (or the first this agent saw), and that is not itself
/// a confirmation run. A probe that stays bad asks once, not at every run.
#[derive(Default)]
struct Asker(std::collections::HashMap<String, Outcome>);

impl Asker {
    fn wants(&mut self, r: &RunResult) -> bool {
        let was = self.0.insert(r.probe.clone(), r.outcome);
        r.outcome != Outcome::Up && !is_confirmation(r) && was.is_none_or(|o| o == Outcome::Up)
    }
}

/// Ask the other locations to re-run `probe` now, on behalf of `me`'s location; the request
/// stays open for `open`. `false` (nothing written) while this location's previous request
/// for the probe is still open: at most one open request per probe and location. Postgres
/// only.
pub fn ask(conn: &Conn, probe: &str, me: &Member, open: Duration) -> db::Result<bool> {
    let n = conn.execute(
        concat!(
            "INSERT INTO confirm_requests (probe, location, agent, asked_at, expires_at) VALUES (?1, ?2, ?3, ",
            now_ms!(),
            ", ",
            now_ms!(),
            " + ?4) ON CONFLICT (probe, location) DO UPDATE SET agent = excluded.agent,
               asked_at = excluded.asked_at, expires_at = excluded.expires_at
             WHERE confirm_requests.expires_at <= ",
            now_ms!()
        ),
        params![probe, me.location, me.id, open.as_millis() as i64],
    )?;
    Ok(n == 1)
}

/// An open confirmation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub probe: String,
    /// The location that asked.
    pub location: String,
    /// When it asked (database ms).
    pub asked_at: i64,
}

/// The open confirmation requests of locations other than `location`, oldest first (at most
/// one per probe and location). Postgres only.
pub fn open_requests(conn: &Conn, location: &str) -> db::Result<Vec<Request>> {
    conn.query_map(
        concat!(
            "SELECT probe, location, asked_at FROM confirm_requests WHERE expires_at > ",
            now_ms!(),
            " AND location <> ?1 ORDER BY asked_at"
        ),
        [location],
        |r| {
            Ok(Request {
                probe: r.get(0)?,
                location: r.get(1)?,
                asked_at: r.get(2)?,
            })
        },
    )
}

/// Answer the confirmation requests of other locations until `stop`: every
/// [`CONFIRM_POLL`], each open request not answered yet for a probe this agent runs in its
/// location (owned, enabled, not paused) is re-run at once through `control` (concurrency
/// cap, per-host limit, store, feed), marked [`CONFIRMATION`]. Runs still going at `stop`
/// finish until `force`.
pub async fn confirmations(
    member: Arc<Member>,
    store: Store,
    control: crate::control::Control,
    ownership: Ownership,
    stop: CancellationToken,
    force: CancellationToken,
) -> anyhow::Result<()> {
    let runs = tokio_util::task::TaskTracker::new();
    // (probe, asking location) → the request answered.
    let mut answered: std::collections::HashMap<(String, String), i64> = Default::default();
    let mut tick = tokio::time::interval(CONFIRM_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let location = member.location.clone();
        let open = match off_thread(&store, &mut conn, move |c| open_requests(c, &location)).await {
            Ok(o) => {
                failing = false;
                o
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(agent = %member.id, error = %format!("{e:#}"), "cannot read the confirmation requests of other locations");
                }
                failing = true;
                continue;
            }
        };
        answered.retain(|(p, l), at| {
            open.iter()
                .any(|r| &r.probe == p && &r.location == l && r.asked_at == *at)
        });
        for r in open {
            let key = (r.probe.clone(), r.location.clone());
            if answered.get(&key) == Some(&r.asked_at)
                || !ownership.owns(&r.probe)
                || control.paused().contains(&r.probe)
            {
                continue;
            }
            answered.insert(key, r.asked_at);
            let (control, force) = (control.clone(), force.clone());
            runs.spawn(async move {
                tokio::select! {
                    _ = force.cancelled() => {}
                    done = control.confirm(&r.probe, &r.location) => if let Err(e) = done {
                        tracing::warn!(probe = %r.probe, asked_by = %r.location, error = %e, "confirmation run not made");
                    }
                }
            });
        }
    }
    runs.close();
    runs.wait().await;
    Ok(())
}

/// Feed rows after `after`, in commit order, up to the oldest transaction still running:
/// (txid, id, location, run JSON).
fn read_feed(conn: &Conn, after: (i64, i64)) -> db::Result<Vec<(i64, i64, String, String)>> {
    conn.query_map(
        "SELECT txid, id, location, run FROM run_feed
         WHERE (txid > ?1 OR (txid = ?1 AND id > ?2))
           AND txid < CAST(pg_snapshot_xmin(pg_current_snapshot())::text AS BIGINT)
         ORDER BY txid, id LIMIT ?3",
        params![after.0, after.1, FEED_BATCH],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )
}

/// A feed row's run (its kind from this agent's config: fleet agents share it); `None`,
/// logged, when the row cannot be read.
fn run_of(config: &Config, id: i64, json: &str) -> Option<RunResult> {
    match serde_json::from_str::<FeedRun>(json) {
        Ok(f) => {
            let kind = config.probe(&f.probe).map_or("unknown", |p| p.kind());
            Some(f.into_run(kind))
        }
        Err(e) => {
            tracing::warn!(row = id, error = %e, "unreadable run in the fleet feed; skipped");
            None
        }
    }
}

/// A batch of the feed for a reader other than the leader (the dashboards' fleet view).
pub(crate) struct FeedBatch {
    /// (location, run), in commit order.
    pub runs: Vec<(String, RunResult)>,
    /// The position after the batch (unchanged when it is empty).
    pub end: (i64, i64),
    /// The batch was as long as a read gives: read again at once.
    pub full: bool,
}

/// The feed after `after` (see [`read_feed`]) as runs.
pub(crate) fn feed_runs(conn: &Conn, config: &Config, after: (i64, i64)) -> db::Result<FeedBatch> {
    let rows = read_feed(conn, after)?;
    let full = rows.len() as i64 >= FEED_BATCH;
    let end = rows.last().map_or(after, |r| (r.0, r.1));
    let runs = rows
        .into_iter()
        .filter_map(|(_, id, location, json)| Some((location, run_of(config, id, &json)?)))
        .collect();
    Ok(FeedBatch { runs, end, full })
}

/// The position of the newest feed row readable now: a reader that has everything stored so
/// far (from the runs themselves) follows the feed from here.
pub(crate) fn feed_head(conn: &Conn) -> db::Result<(i64, i64)> {
    Ok(conn
        .query_row(
            "SELECT txid, id FROM run_feed
             WHERE txid < CAST(pg_snapshot_xmin(pg_current_snapshot())::text AS BIGINT)
             ORDER BY txid DESC, id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, 0)))
}

/// Where a new leader starts reading: where the last one stopped, or (the first leader of
/// this database) the start of the feed.
fn start_of_term(conn: &Conn) -> db::Result<(i64, i64)> {
    let saved: Option<(Option<i64>, Option<i64>)> = conn
        .query_row(
            "SELECT feed_txid, feed_id FROM leases WHERE name = ?1",
            [LEADER],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match saved {
        Some((Some(txid), Some(id))) => (txid, id),
        _ => (0, 0),
    })
}

/// Read the feed into `runs` until `stop`, pruning old rows now and then.
async fn poll_feed(
    config: Arc<Config>,
    store: Store,
    cursor: Cursor,
    runs: mpsc::Sender<Located>,
    stop: CancellationToken,
) {
    let mut conn = None;
    let mut pos = match cursor.get() {
        Some(p) => p,
        None => return,
    };
    let mut pruned = Instant::now();
    let mut failing = false;
    loop {
        let rows = off_thread(&store, &mut conn, move |c| read_feed(c, pos)).await;
        let rows = match rows {
            Ok(r) => {
                failing = false;
                r
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the fleet's runs");
                }
                failing = true;
                Vec::new()
            }
        };
        let full = rows.len() as i64 >= FEED_BATCH;
        for (txid, id, location, json) in rows {
            pos = (txid, id);
            if let Some(run) = run_of(&config, id, &json) {
                let run = Located {
                    run,
                    location: Some(location),
                };
                let sent = tokio::select! {
                    s = runs.send(run) => s.is_ok(),
                    _ = stop.cancelled() => false,
                };
                if !sent {
                    return;
                }
            }
            cursor.set(Some(pos));
        }
        if pruned.elapsed() >= Duration::from_secs(60) {
            pruned = Instant::now();
            let before = chrono::Utc::now().timestamp_millis() - FEED_KEEP.as_millis() as i64;
            let r = store
                .write(move |c| c.execute("DELETE FROM run_feed WHERE started_at < ?1", [before]))
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %format!("{e:#}"), "cannot prune the fleet feed");
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(FEED_POLL) => {}
        }
    }
}

/// Completes when this agent no longer holds the lease (by its local deadline).
async fn lost(role: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let d = *role.borrow_and_update();
        match d {
            Some(d) if d > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(d) => {}
                    r = role.changed() => if r.is_err() { return },
                }
            }
            _ => return,
        }
    }
}

/// What the leader runs.
pub struct Leader {
    pub config: Arc<Config>,
    pub store: Store,
    pub metrics: Metrics,
    pub shared: Shared,
    pub member: Arc<Member>,
    /// Deliver notifications (off in some tests).
    pub dispatcher: bool,
}

impl Leader {
    /// Follow or lead until `stop`. While another agent leads, commands of the control API
    /// are refused (503); while this one holds the lease it runs the evaluator, fed from
    /// the run feed, and the notifier workers. Losing the lease stops both at once (a
    /// delivery in flight is cut and stays pending, claimed until its deadline).
    pub async fn run(
        self,
        mut commands: mpsc::Receiver<Command>,
        mut role: watch::Receiver<Option<Instant>>,
        cursor: Cursor,
        stop: CancellationToken,
        force: CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            // Follow.
            loop {
                let lease = *role.borrow_and_update();
                if lease.is_some_and(|d| d > Instant::now()) {
                    break;
                }
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    Some(c) = commands.recv() => c.refuse(CommandError::Unavailable(format!(
                        "this agent ({}) is not the fleet leader: only the leader evaluates components; \
                         send the request to another agent", self.member.id
                    ))),
                    r = role.changed() => if r.is_err() { return Ok(()) },
                }
            }
            // Lead.
            let term = self
                .term(&mut commands, &mut role, &cursor, &stop, &force)
                .await;
            let last = cursor.get();
            cursor.set(None);
            match term {
                Ok(()) if stop.is_cancelled() => {
                    // A clean stop hands over the exact position: the next leader evaluates
                    // no run twice.
                    if let Some(pos) = last {
                        let m = self.member.clone();
                        let saved =
                            off_thread(&self.store, &mut None, move |c| save_position(c, &m, pos))
                                .await;
                        if let Err(e) = saved {
                            tracing::warn!(agent = %self.member.id, error = %format!("{e:#}"), "cannot hand over the feed position");
                        }
                    }
                    return Ok(());
                }
                Ok(()) => {
                    tracing::warn!(agent = %self.member.id, "lost the fleet leader lease: stopped evaluating and notifying")
                }
                Err(e) if e.is::<Setup>() => {
                    tracing::warn!(agent = %self.member.id, error = %format!("{e:#}"), "cannot start leading; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.member.heartbeat) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One term as leader: until the lease is lost, `stop`, or a part fails.
    async fn term(
        &self,
        commands: &mut mpsc::Receiver<Command>,
        role: &mut watch::Receiver<Option<Instant>>,
        cursor: &Cursor,
        stop: &CancellationToken,
        force: &CancellationToken,
    ) -> anyhow::Result<()> {
        let (config, store, metrics, shared) = (
            self.config.clone(),
            self.store.clone(),
            self.metrics.clone(),
            self.shared.clone(),
        );
        let dispatch = self.dispatcher;
        let built = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let start = start_of_term(&store.reader()?)?;
            let ev = crate::incident::Evaluator::new(
                config.clone(),
                store.clone(),
                metrics.clone(),
                &shared,
            )?;
            let d = dispatch
                .then(|| crate::notify::Dispatcher::new(config, store, metrics, &shared))
                .transpose()?;
            Ok((start, ev, d))
        })
        .await?;
        let (start, evaluator, dispatcher) = built.map_err(|e| anyhow::Error::new(Setup(e)))?;
        tracing::info!(agent = %self.member.id, feed_txid = start.0, feed_id = start.1, "leading the fleet: evaluating components and delivering notifications");
        cursor.set(Some(start));
        let halt = force.child_token();
        let wind_down = stop.child_token();
        let (tx, rx) = mpsc::channel(1024);
        let poll = async {
            poll_feed(
                self.config.clone(),
                self.store.clone(),
                cursor.clone(),
                tx,
                wind_down.clone(),
            )
            .await;
            Ok::<(), anyhow::Error>(())
        };
        let eval = async {
            let r = evaluator.run(rx, commands, halt.clone()).await;
            wind_down.cancel();
            r
        };
        let disp = async {
            let r = match dispatcher {
                Some(d) if self.config.reviews.is_empty() => {
                    d.run(wind_down.clone(), halt.clone()).await
                }
                // Scheduled reviews go out from the leader only, once per slot.
                Some(d) => {
                    let reviews = async {
                        let r = crate::review::run(
                            self.config.clone(),
                            self.store.clone(),
                            self.shared.clock,
                            wind_down.clone(),
                        )
                        .await;
                        if r.is_err() {
                            wind_down.cancel();
                        }
                        r
                    };
                    let (d, r) = tokio::join!(d.run(wind_down.clone(), halt.clone()), reviews);
                    d.and(r)
                }
                None => {
                    wind_down.cancelled().await;
                    Ok(())
                }
            };
            wind_down.cancel();
            r
        };
        let watch = async {
            tokio::select! {
                _ = lost(role) => {
                    halt.cancel();
                    wind_down.cancel();
                }
                _ = wind_down.cancelled() => {}
            }
            Ok::<(), anyhow::Error>(())
        };
        let (w, p, e, d) = tokio::join!(watch, poll, eval, disp);
        w.and(p).and(e).and(d)
    }
}

/// Setting up a term failed (the database unreachable): retried, not a fault.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct Setup(anyhow::Error);

/// Claim outbox row `id` for delivery by `agent` (the lease holder) until its deadline
/// (`ttl`): `false` when another agent holds a live claim, the row is no longer pending, or
/// `agent` does not hold the lease. Postgres only.
pub fn claim(conn: &Conn, id: i64, agent: &str, ttl: Duration) -> db::Result<bool> {
    let n = conn.execute(
        concat!(
            "UPDATE outbox SET claimed_by = ?2, claim_until = ",
            now_ms!(),
            " + ?3 WHERE id IN (
               SELECT id FROM outbox WHERE id = ?1 AND status = 'pending'
                 AND (claimed_by IS NULL OR claimed_by = ?2 OR claim_until < ",
            now_ms!(),
            ") FOR UPDATE SKIP LOCKED)
             AND EXISTS (SELECT 1 FROM leases WHERE name = ?4 AND holder = ?2 AND expires_at > ",
            now_ms!(),
            ")"
        ),
        params![id, agent, ttl.as_millis() as i64, LEADER],
    )?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("host-{i:08x}")).collect()
    }

    #[test]
    fn every_probe_has_one_owner_and_the_split_is_even() {
        let members = ids(3);
        let mut per = [0u32; 3];
        for p in 0..3000 {
            let o = owner(&format!("probe-{p}"), &members).unwrap();
            per[members.iter().position(|m| m == o).unwrap()] += 1;
        }
        // 3,000 probes over 3 members: each within ±10% of 1,000.
        for n in per {
            assert!((900..=1100).contains(&n), "{per:?}");
        }
        assert_eq!(owner("x", &[]), None);
    }

    #[test]
    fn only_the_probes_of_a_member_that_leaves_move() {
        let all = ids(4);
        let without: Vec<String> = all.iter().filter(|m| *m != &all[2]).cloned().collect();
        let mut moved = 0;
        for p in 0..2000 {
            let name = format!("probe-{p}");
            let before = owner(&name, &all).unwrap();
            let after = owner(&name, &without).unwrap();
            if before == all[2] {
                moved += 1;
                assert_ne!(after, all[2]);
            } else {
                assert_eq!(before, after, "{name} moved though its owner stayed");
            }
        }
        assert!((400..=600).contains(&moved), "{moved}");
        // The order members are listed in does not matter.
        let mut rev = all.clone();
        rev.reverse();
        assert_eq!(owner("api", &all), owner("api", &rev));
    }

    #[test]
    fn ownership_follows_the_live_members() {
        let single = Ownership::default();
        assert!(single.owns("anything"), "a single machine runs every probe");
        let o = Ownership::fleet("b");
        assert!(!o.owns("api"), "nothing before the first heartbeat");
        assert!(o.set_live(vec!["b".into()]));
        assert!(o.owns("api") && o.owns("db"));
        assert!(!o.set_live(vec!["b".into()]), "unchanged");
        assert!(o.set_live(vec!["b".into(), "a".into()]));
        assert_eq!(o.live(), ["a", "b"]);
        let names: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
        let mine = names.iter().filter(|n| o.owns(n)).count();
        assert!((10..=40).contains(&mine), "{mine} of 50");
        for n in &names {
            assert_eq!(o.owns(n), owner(n, &o.live()) == Some("b"));
        }
    }

    #[test]
    fn a_run_goes_through_the_feed_unchanged() {
        use crate::probe::Attempt;
        let mut a = Attempt::new();
        a.phase("total", Duration::from_micros(1234));
        let mut details = Map::new();
        details.insert("status".into(), 503.into());
        let run = RunResult {
            probe: "api".into(),
            kind: "http",
            started_at: chrono::DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
            duration: Duration::from_micros(1500),
            lag: Some(Duration::from_millis(3)),
            outcome: Outcome::Down,
            error: Some(ErrorInfo {
                class: ErrorClass::HttpStatus,
                message: "HTTP 503".into(),
            }),
            phases: a.phases,
            details,
            subchecks: vec![SubCheck {
                series: "api/checks.db".into(),
                outcome: Outcome::Degraded,
                latency: Some(Duration::from_millis(7)),
                error: None,
            }],
        };
        let json = serde_json::to_string(&FeedRun::of(&run)).unwrap();
        let back = serde_json::from_str::<FeedRun>(&json)
            .unwrap()
            .into_run("http");
        assert_eq!(back.probe, run.probe);
        assert_eq!(back.started_at, run.started_at);
        assert_eq!(back.duration, run.duration);
        assert_eq!(back.outcome, run.outcome);
        assert_eq!(back.error, run.error);
        assert_eq!(back.phases, run.phases);
        assert_eq!(back.details, run.details);
        assert_eq!(back.subchecks, run.subchecks);
    }
}
