//! The store's write throughput, SQLite against Postgres, and the outage buffer's rates:
//! N HTTP-shaped runs (ttfb and total, status and bytes details) of P probes recorded through
//! the real store writer (`Store::record`, batched transactions) until `Store::flush`
//! returns — into a SQLite file, then into a throwaway Postgres cluster on 127.0.0.1 (Debian's
//! server, `tests/common/pg.rs`: fsync off, synchronous_commit on). Then the cluster is
//! stopped (`pg_ctl stop -m immediate`), N more runs are recorded (they go to the outage
//! buffer on local disk: the buffering rate, and bytes per buffered run), the cluster is
//! started again, and the time from the writer's reconnection to an empty buffer gives the
//! flush rate. Every run is checked to be in Postgres at the end.
//!
//! `cargo bench --bench store_throughput -- --runs 20000 --probes 100`

#[path = "../tests/common/pg.rs"]
mod pg;

mod common;

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use serde_json::json;
use watchpost::probe::{Outcome, RunResult};
use watchpost::store::{buffer, db::Pg, Store, Target};

/// Run `i` of the bench: probe `i % probes`, starts 1 ms apart (each its own row).
fn run(i: u64, probes: u64, t0: i64) -> RunResult {
    let ttfb = Duration::from_micros(15_000 + (i * 7919) % 30_000);
    let total = ttfb + Duration::from_micros(150 + (i * 104_729) % 3_000);
    let mut details = serde_json::Map::new();
    details.insert("status".into(), json!(200));
    details.insert("bytes".into(), json!(187));
    RunResult {
        probe: format!("probe-{:05}", i % probes),
        kind: "http",
        started_at: Utc
            .timestamp_millis_opt(t0 + i as i64)
            .single()
            .unwrap_or_else(Utc::now),
        duration: total + Duration::from_micros(40),
        lag: Some(Duration::from_micros(300 + i % 2_000)),
        outcome: Outcome::Up,
        error: None,
        phases: vec![("ttfb".into(), ttfb), ("total".into(), total)],
        details,
        subchecks: Vec::new(),
    }
}

/// Record runs `from..from + n` and wait until they are committed; returns the time taken.
async fn write(store: &Store, from: u64, n: u64, probes: u64, t0: i64) -> anyhow::Result<f64> {
    let t = Instant::now();
    for i in from..from + n {
        store.record(run(i, probes, t0)).await;
    }
    store.flush().await?;
    Ok(t.elapsed().as_secs_f64())
}

/// Wait (polling every 2 ms, at most `limit`) until `f` holds; the time it took.
async fn until(limit: Duration, what: &str, f: impl Fn() -> bool) -> anyhow::Result<f64> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > limit {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n = common::arg("--runs", 20_000);
    let probes = common::arg("--probes", 100).max(1);
    let t0: i64 = 1_767_225_600_000;
    println!(
        "{n} runs of {probes} HTTP probes per phase; load average at start {}",
        load()
    );
    println!("| store | phase | runs | seconds | runs/s |");
    println!("|---|---|---|---|---|");
    let row = |store: &str, phase: &str, runs: u64, s: f64| {
        println!(
            "| {store} | {phase} | {runs} | {s:.2} | {:.0} |",
            runs as f64 / s.max(1e-9)
        );
    };

    let dir = tempfile::tempdir()?;
    {
        let (store, writer) = Store::start(&dir.path().join("watchpost.db"))?;
        let s = write(&store, 0, n, probes, t0).await?;
        row("SQLite (WAL, synchronous=NORMAL)", "write", n, s);
        drop(store);
        writer.join().await;
    }

    let cluster = pg::PgCluster::start();
    cluster.durable_commits();
    let spec = buffer::Spec {
        path: dir.path().join(buffer::FILE),
        max: 2 * n,
    };
    let pg = Pg::new(&cluster.default_url(), "bench")?.with_buffer(spec.clone());
    let target = Target::Postgres(pg);
    let (store, writer) = Store::open(target.clone())?;
    let s = write(&store, 0, n, probes, t0).await?;
    row("Postgres (127.0.0.1, fsync off)", "write", n, s);

    cluster.stop();
    let t = Instant::now();
    for i in n..2 * n {
        store.record(run(i, probes, t0)).await;
    }
    until(Duration::from_secs(600), "the runs buffered", || {
        store.link().is_some_and(|l| l.buffered == n)
    })
    .await?;
    let s = t.elapsed().as_secs_f64();
    row(
        "outage buffer (SQLite file)",
        "buffer while Postgres is down",
        n,
        s,
    );
    let bytes = std::fs::metadata(&spec.path)?.len()
        + std::fs::metadata(spec.path.with_extension("db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    println!(
        "buffer file: {:.0} bytes per buffered run (db + WAL)",
        bytes as f64 / n as f64
    );

    cluster.up();
    until(Duration::from_secs(60), "the reconnection", || {
        store.link().is_some_and(|l| l.down_since.is_none())
    })
    .await?;
    let s = until(Duration::from_secs(600), "the buffer flushed", || {
        store.link().is_some_and(|l| l.buffered == 0)
    })
    .await?;
    row("Postgres (127.0.0.1, fsync off)", "flush the buffer", n, s);
    store.flush().await?;
    let stored: i64 = store
        .reader()?
        .query_row("SELECT count(*) FROM runs", [], |r| r.get(0))?;
    anyhow::ensure!(
        stored as u64 == 2 * n,
        "{stored} runs in Postgres, expected {}",
        2 * n
    );
    println!(
        "all {} runs in Postgres; load average at end {}",
        2 * n,
        load()
    );
    drop(store);
    writer.join().await;
    Ok(())
}
