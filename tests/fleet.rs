//! Fleet mode against a real PostgreSQL cluster (`common/pg.rs`): with `[agent]
//! database_url_env` the agent keeps its runs (with its location), incidents, timeline and
//! outbox in Postgres and writes no SQLite file.

mod notify_harness;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/recorder.rs"]
mod recorder;

use std::sync::Arc;
use std::time::Duration;

use notify_harness::*;
use recorder::Recorder;
use watchpost::config::Config;
use watchpost::probe::Outcome::{Down, Up};

const T: Duration = Duration::from_secs(20);

/// The harness config (component API of `api` and `db`, a webhook at `hook`) in fleet mode:
/// the database URL in an environment variable of this test's own process.
fn fleet_config(dir: &std::path::Path, hook: &str, url: &str) -> Arc<Config> {
    let var = "WATCHPOST_TEST_DATABASE_URL";
    // Each test runs in its own process (nextest), so the variable is this test's alone.
    std::env::set_var(var, url);
    let t = Targets {
        webhook: Some(hook.to_string()),
        delivery: Some(FAST.to_string()),
        ..Default::default()
    };
    let (notifiers, names) = notifiers_toml(&t);
    let path = write_config_file(dir, &names, &notifiers, THRESHOLDS, "");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "listen = \"\"\n",
        &format!("listen = \"\"\ndatabase_url_env = \"{var}\"\n"),
    );
    std::fs::write(&path, text).unwrap();
    match watchpost::config::load(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test config invalid:\n{e}"),
    }
}

fn count(conn: &watchpost::store::Conn, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_agent_keeps_runs_incidents_and_outbox_in_postgres() {
    let cluster = pg::PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::start().await;
    let cfg = fleet_config(dir.path(), &hook.url(), &cluster.default_url());
    let agent = Agent::start(cfg.clone(), true).await;
    // Runs are keyed by start in ms: a little apart, so every one is its own row.
    let both = |o| {
        let agent = &agent;
        async move {
            agent.both(o).await;
            settle(Duration::from_millis(3)).await;
        }
    };
    both(Down).await;
    both(Down).await;
    hook.wait_for("the incident's webhook", T, |l| !l.is_empty())
        .await;
    until("the incident open in Postgres", T, || {
        agent.incidents(true).len() == 1
    })
    .await;
    agent.drained(T).await;
    both(Up).await;
    both(Up).await;
    until("the incident resolved", T, || {
        agent.incidents(true).is_empty()
    })
    .await;
    agent.drained(T).await;

    let conn = agent.store.reader().unwrap();
    assert!(conn.is_postgres());
    assert_eq!(count(&conn, "SELECT count(*) FROM runs"), 8);
    let locations: Vec<String> = conn
        .prepare("SELECT DISTINCT location FROM series")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        locations,
        ["test-vantage"],
        "every run carries the agent's location"
    );
    assert_eq!(count(&conn, "SELECT count(*) FROM incidents"), 1);
    let outbox = agent.outbox();
    assert!(
        outbox.iter().all(|r| r.2 == "delivered")
            && outbox.first().is_some_and(|r| r.1 == "opened")
            && outbox.last().is_some_and(|r| r.1 == "resolved"),
        "opened … resolved, all delivered: {outbox:?}"
    );
    assert_eq!(hook.requests().len(), outbox.len());
    let latest = watchpost::store::latest_runs(&conn).unwrap();
    assert_eq!(latest.len(), 2);
    assert!(latest.iter().all(|r| r.outcome == "up"), "{latest:?}");
    drop(conn);
    agent.stop().await;
    assert!(
        !cfg.db_path().exists(),
        "fleet mode writes no SQLite database"
    );
}
