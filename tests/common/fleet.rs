//! Fleet agents as real processes: `watchpost run` with `database_url_env` against a test
//! Postgres cluster, each with its own config (location, fleet timing) over one shared
//! probes directory, its stderr in a log file; SIGKILL or SIGTERM by pid. And what the
//! tests read back from the shared database: runs per probe per agent (the run feed), the
//! members, the leader, the outbox. Used by tests/fleet.rs and benches/fleet.rs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use watchpost::store::db::{Conn, Pg};

/// The environment variable the agents read their database URL from.
pub const DB_VAR: &str = "WPF_DATABASE_URL";
pub const PD_VAR: &str = "WPF_PD_KEY";
pub const IS_VAR: &str = "WPF_INSTATUS_KEY";

/// One `watchpost run` process.
pub struct Proc {
    child: Child,
    pub name: String,
    log: PathBuf,
}

impl Proc {
    /// Start `watchpost run -c cfg` with the database URL in [`DB_VAR`].
    pub fn start(name: &str, cfg: &Path, url: &str) -> Proc {
        let log = cfg.with_extension("log");
        let err = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_watchpost"))
            .args(["run", "-c"])
            .arg(cfg)
            .env(DB_VAR, url)
            .env(PD_VAR, "fleet-routing-key")
            .env(IS_VAR, "fleet-instatus-key")
            .env_remove("WATCHPOST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("starting watchpost run");
        Proc {
            child,
            name: name.to_string(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain, no leaving the fleet.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every agent's log, for a failing test's message.
pub fn logs(procs: &[&Proc]) -> String {
    procs
        .iter()
        .map(|p| {
            let log = p.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("--- {} (last lines) ---\n{}", p.name, tail.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Write `<dir>/<name>.toml`: an agent in `location` with fleet `timing` (an inline table
/// body such as `heartbeat = "1s", lease = "3s"`), the probes in `<dir>/probes`, and
/// `extra` (components, notifiers) after the `[agent]` table.
pub fn agent_config(dir: &Path, name: &str, location: &str, timing: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("probes")).unwrap();
    let text = format!(
        "[agent]\nlocation = \"{location}\"\ndata_dir = \"data-{name}\"\nprobes = [\"probes/*.toml\"]\n\
         listen = \"\"\ndatabase_url_env = \"{DB_VAR}\"\nfleet = {{ {timing} }}\nshutdown_grace = \"3s\"\n\n{extra}"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// An HTTP probe file `<dir>/probes/<name>.toml` against `url`.
pub fn http_probe(dir: &Path, name: &str, url: &str, interval: &str) {
    http_probe_with(dir, name, url, interval, "");
}

/// [`http_probe`] with `extra` lines (e.g. `offset = "4s"`).
pub fn http_probe_with(dir: &Path, name: &str, url: &str, interval: &str, extra: &str) {
    std::fs::create_dir_all(dir.join("probes")).unwrap();
    std::fs::write(
        dir.join(format!("probes/{name}.toml")),
        format!(
            "name = \"{name}\"\nkind = \"http\"\nurl = \"{url}\"\ninterval = \"{interval}\"\n\
             timeout = \"1s\"\nretries = 0\njitter = \"0s\"\n{extra}"
        ),
    )
    .unwrap();
}

/// A run as the fleet recorded it: location, probe, agent, start (ms), outcome, and for a
/// confirmation run the location that asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetRun {
    pub location: String,
    pub probe: String,
    pub agent: String,
    pub at: i64,
    pub outcome: String,
    pub confirmation_for: Option<String>,
}

/// A reading connection to the fleet's database.
pub struct Db(Conn);

impl Db {
    pub fn open(url: &str) -> Db {
        let pg = Pg::new(url, "").expect("database URL");
        Db(pg.conn().expect("connecting to the test cluster"))
    }

    /// Runs started at or after `since_ms`, oldest first (empty before the schema exists).
    pub fn runs_since(&self, since_ms: i64) -> Vec<FleetRun> {
        self.0
            .query_map(
                "SELECT location, probe, agent, started_at, outcome, run FROM run_feed
                 WHERE started_at >= ?1 ORDER BY started_at",
                [since_ms],
                |r| {
                    let run: String = r.get(5)?;
                    let run: serde_json::Value = serde_json::from_str(&run).unwrap_or_default();
                    Ok(FleetRun {
                        location: r.get(0)?,
                        probe: r.get(1)?,
                        agent: r.get(2)?,
                        at: r.get(3)?,
                        outcome: r.get(4)?,
                        confirmation_for: run["details"][watchpost::fleet::CONFIRMATION]
                            .as_str()
                            .map(str::to_string),
                    })
                },
            )
            .unwrap_or_default()
    }

    /// Members: (agent, location, pid).
    pub fn members(&self) -> Vec<(String, String, u32)> {
        self.0
            .query_map(
                "SELECT agent, location, pid FROM members ORDER BY agent",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap_or_default()
    }

    /// The lease holder and when it took the lease (database ms).
    pub fn leader(&self) -> Option<(String, i64)> {
        self.0
            .query_row(
                "SELECT holder, acquired_at FROM leases WHERE name = 'leader'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ok()
    }

    /// Outbox rows: (notifier, kind, status), in id order.
    pub fn outbox(&self) -> Vec<(String, String, String)> {
        self.0
            .query_map(
                "SELECT notifier, kind, status FROM outbox ORDER BY id",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap_or_default()
    }

    /// Timeline entries: (kind, incident id, note).
    pub fn timeline(&self) -> Vec<(String, Option<i64>, Option<String>)> {
        self.0
            .query_map(
                "SELECT kind, incident_id, note FROM incident_events ORDER BY id",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap_or_default()
    }

    /// Incidents: (id, component, status).
    pub fn incidents(&self) -> Vec<(i64, String, String)> {
        self.0
            .query_map(
                "SELECT id, component, status FROM incidents ORDER BY id",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap_or_default()
    }

    /// The installation id the PagerDuty dedup keys carry.
    pub fn installation(&self) -> String {
        watchpost::store::Installation::read(&self.0)
            .expect("installation id")
            .id
    }
}

/// Wall-clock ms (the agents stamp runs with the same machine's clock).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Poll `f` every 100 ms until it gives `Some` (or panic after `within` with `what` and
/// the `context` text).
pub async fn wait_for<T>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
