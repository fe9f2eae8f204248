//! A fleet agent through a Postgres outage, against a real cluster (`common/pg.rs`) stopped
//! with `pg_ctl stop -m immediate` and started again: runs go to the bounded outage buffer on
//! local disk and are flushed in order when Postgres answers, `/health` says degraded naming
//! the store meanwhile and ok afterwards, and the buffer keeps the newest runs up to its
//! bound across an agent restart.

mod notify_harness;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/recorder.rs"]
mod recorder;

use std::sync::Arc;
use std::time::Duration;

use notify_harness::*;
use recorder::Recorder;
use serde_json::Value;
use watchpost::config::Config;
use watchpost::probe::Outcome::Up;
use watchpost::store::{buffer, Buffer, Store, Target};

const T: Duration = Duration::from_secs(30);

/// The harness config (component API of `api` and `db`, a webhook at `hook`) in fleet mode,
/// the database URL in an environment variable of this test's own process, with `agent`
/// lines added to `[agent]`.
fn fleet_config(dir: &std::path::Path, hook: &str, url: &str, agent: &str) -> Arc<Config> {
    let var = "WATCHPOST_TEST_DATABASE_URL";
    // Each test runs in its own process (nextest), so the variable is this test's alone.
    std::env::set_var(var, url);
    let t = Targets {
        webhook: Some(hook.to_string()),
        ..Default::default()
    };
    let (notifiers, names) = notifiers_toml(&t);
    let path = write_config_file(dir, &names, &notifiers, THRESHOLDS, "");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "listen = \"\"\n",
        &format!("listen = \"\"\ndatabase_url_env = \"{var}\"\n{agent}"),
    );
    std::fs::write(&path, text).unwrap();
    match watchpost::config::load(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test config invalid:\n{e}"),
    }
}

/// Start times of a series' runs in Postgres, oldest first.
fn starts(target: &Target, series: &str) -> Vec<i64> {
    let conn = target.reader().unwrap().unwrap();
    conn.prepare(
        "SELECT r.started_at FROM runs r JOIN series s ON s.id = r.series WHERE s.name = ?1
         ORDER BY r.started_at",
    )
    .unwrap()
    .query_map([series], |r| r.get(0))
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

async fn health(url: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Poll `/health` until `ok` holds; returns that answer.
async fn health_until(url: &str, what: &str, ok: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + T;
    loop {
        let (code, h) = health(url).await;
        if ok(code, &h) {
            return h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; last /health: {code} {h:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_loses_no_run_and_degrades_health_until_it_is_over() {
    let cluster = pg::PgCluster::start();
    cluster.durable_commits();
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::start().await;
    let cfg = fleet_config(dir.path(), &hook.url(), &cluster.default_url(), "");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/health", listener.local_addr().unwrap());
    let agent = Arc::new(Agent::start_serving(cfg.clone(), listener).await);

    // Runs of both probes every 20 ms (starts a millisecond apart at least: each its own
    // row), from before the outage to after it.
    let stop = tokio_util::sync::CancellationToken::new();
    let feeder = {
        let (agent, stop) = (agent.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0usize;
            while !stop.is_cancelled() {
                agent.both(Up).await;
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };
    let h = health_until(&url, "a healthy fleet agent", |code, h| {
        code == 200 && h["status"] == "ok"
    })
    .await;
    assert_eq!(h["checks"]["store"]["status"], "ok", "{h:#}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    cluster.stop();
    let h = health_until(&url, "degraded naming the store", |code, h| {
        code == 200 && h["status"] == "degraded" && h["checks"]["store"]["status"] == "degraded"
    })
    .await;
    let why = h["checks"]["store"]["error"].as_str().unwrap();
    assert!(
        why.starts_with("store: postgres unreachable since ")
            && why.contains("buffered on local disk")
            && why.contains(buffer::FILE),
        "{why}"
    );
    assert!(!why.contains("postgres://"), "no URL in /health: {why}");
    assert_eq!(h["checks"]["writer"]["status"], "ok", "{h:#}");
    // Runs keep coming for a while with Postgres gone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let link = agent.store.link().unwrap();
    assert!(
        link.down_since.is_some() && link.buffered > 10 && link.dropped == 0,
        "{link:?}"
    );
    assert!(cfg.agent.data_dir.join(buffer::FILE).exists());

    cluster.up();
    let h = health_until(&url, "healthy again", |code, h| {
        code == 200 && h["status"] == "ok"
    })
    .await;
    assert_eq!(h["checks"]["store"]["status"], "ok", "{h:#}");
    // A little more after the flush, then stop: every run sent is in Postgres, once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let sent = feeder.await.unwrap();
    let link = agent.store.link().unwrap();
    assert_eq!((link.buffered, link.dropped), (0, 0), "{link:?}");
    let target = agent.store.target().clone();
    let Ok(agent) = Arc::try_unwrap(agent) else {
        panic!("the feeder still holds the agent")
    };
    agent.stop().await;
    for series in ["api", "db"] {
        let got = starts(&target, series);
        assert_eq!(
            got.len(),
            sent,
            "{series}: runs sent {sent}, stored {}",
            got.len()
        );
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{series}: {got:?}");
    }
    let left = Buffer::open_existing(&buffer::Spec {
        path: cfg.agent.data_dir.join(buffer::FILE),
        max: 1,
    })
    .unwrap()
    .map_or(0, |b| b.len());
    assert_eq!(left, 0, "the buffer is empty after the flush");
    drop(cluster);
}

fn run_at(probe: &str, ms: i64) -> watchpost::probe::RunResult {
    let mut r = run(probe, Up);
    r.started_at = chrono::DateTime::from_timestamp_millis(ms).unwrap();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_keeps_the_newest_runs_up_to_its_bound_across_a_restart() {
    let cluster = pg::PgCluster::start();
    cluster.durable_commits();
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::start().await;
    let cfg = fleet_config(
        dir.path(),
        &hook.url(),
        &cluster.default_url(),
        "outage_buffer_runs = 5\n",
    );
    let t0 = 1_767_225_600_000i64;
    let (store, writer) = Store::open(Target::of(&cfg).unwrap()).unwrap();
    store.record(run_at("api", t0)).await;
    store.flush().await.unwrap();
    let target = Target::of(&cfg).unwrap();
    assert_eq!(starts(&target, "api"), [t0]);

    cluster.stop();
    for i in 1..=12 {
        store.record(run_at("api", t0 + i * 1000)).await;
    }
    until("12 runs buffered, the oldest 7 dropped", T, || {
        store
            .link()
            .is_some_and(|l| l.buffered == 5 && l.dropped == 7)
    })
    .await;
    let problem = store.link().unwrap().problem().unwrap();
    assert!(
        problem.contains("5 run(s) buffered on local disk")
            && problem.contains("at most 5")
            && problem.contains("7 dropped"),
        "{problem}"
    );
    // The agent stops while Postgres is away: the buffer stays on disk.
    drop(store);
    writer.join().await;
    let spec = buffer::Spec {
        path: cfg.agent.data_dir.join(buffer::FILE),
        max: 5,
    };
    assert_eq!(Buffer::open_existing(&spec).unwrap().unwrap().len(), 5);

    cluster.up();
    let (store, writer) = Store::open(target.clone()).unwrap();
    until("the buffer flushed after the restart", T, || {
        store.link().is_some_and(|l| l.buffered == 0)
    })
    .await;
    store.flush().await.unwrap();
    let expected: Vec<i64> = [0, 8, 9, 10, 11, 12]
        .iter()
        .map(|i| t0 + i * 1000)
        .collect();
    assert_eq!(
        starts(&target, "api"),
        expected,
        "the run from before the outage and the newest 5 of it"
    );
    drop(store);
    writer.join().await;
    drop(cluster);
}
