//! The store against a real SQLite file: runs and histograms persist across reopen,
//! minute buckets merge exactly, old minutes roll up into hours, retention prunes.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use watchpost::config::{Dur, Retention};
use watchpost::probe::{Outcome, RunResult, SubCheck};
use watchpost::store::{self, hist, Store, HOUR, MINUTE};

fn run_at(probe: &str, ms: i64, total_ms: u64, outcome: Outcome) -> RunResult {
    RunResult {
        probe: probe.into(),
        kind: "http",
        started_at: Utc.timestamp_millis_opt(ms).unwrap(),
        duration: Duration::from_millis(total_ms),
        lag: Some(Duration::from_micros(150)),
        outcome,
        error: None,
        phases: vec![
            ("ttfb".into(), Duration::from_millis(total_ms / 2)),
            ("total".into(), Duration::from_millis(total_ms)),
        ],
        details: Default::default(),
        subchecks: vec![SubCheck {
            series: format!("{probe}/checks.db"),
            outcome: Outcome::Up,
            latency: Some(Duration::from_millis(3)),
            error: None,
        }],
    }
}

const T0: i64 = 1_800_000_000_000; // a fixed instant, minute- and hour-aligned below

fn aligned(ms: i64, res: i64) -> i64 {
    ms.div_euclid(res * 1000) * res * 1000
}

#[tokio::test]
async fn runs_and_histograms_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/watchpost.db");
    let base = aligned(T0, HOUR);
    {
        let (s, writer) = Store::start(&db).unwrap();
        // 100 runs in one minute: totals 1..=100 ms.
        for i in 1..=100u64 {
            s.record(run_at("api", base + i as i64 * 100, i, Outcome::Up))
                .await;
        }
        s.record(run_at("api", base + 61_000, 500, Outcome::Down))
            .await;
        s.flush().await.unwrap();
        drop(s);
        writer.join().await;
    }
    let (s, writer) = Store::start(&db).unwrap(); // reopen: migrations are idempotent
    let c = s.reader().unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM runs WHERE probe = 'api'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(n, 101);
    let sub: i64 = c
        .query_row(
            "SELECT count(*) FROM runs WHERE probe = 'api/checks.db'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(sub, 101);
    let rows: i64 = c
        .query_row("SELECT count(*) FROM histograms WHERE series = 'api' AND phase = 'total' AND resolution = ?1", [MINUTE], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 2, "one row per minute bucket");
    let w = hist::window(&c, base, base + 120_000).unwrap();
    let total = &w[&("api".to_string(), "total".to_string())];
    assert_eq!(total.len(), 101);
    // 3 significant digits: p50 of 1..=100 ms (plus one 500 ms) is 51 ms ± 0.1%.
    let p50 = total.value_at_quantile(0.5);
    assert!((50_900..=51_100).contains(&p50), "p50 {p50}µs");
    assert_eq!(total.max() / 1000, 500);
    let counts = store::counts_since(&c, base).unwrap();
    assert_eq!(counts["api"].up, 100);
    assert_eq!(counts["api"].down, 1);
    assert!((counts["api"].availability().unwrap() - 99.0099).abs() < 0.01);
    let lag: f64 = c
        .query_row("SELECT lag_ms FROM runs LIMIT 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(lag, 0.15);
    drop(c);
    drop(s);
    writer.join().await;
}

#[tokio::test]
async fn rollup_merges_minutes_into_hours_exactly_and_prunes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("watchpost.db");
    let (s, writer) = Store::start(&db).unwrap();
    let hour = aligned(T0, HOUR);
    // 3 hours of runs, one per minute, total = minute index ms (1..=180).
    for m in 0..180i64 {
        s.record(run_at(
            "api",
            hour + m * 60_000 + 5_000,
            (m + 1) as u64,
            Outcome::Up,
        ))
        .await;
    }
    s.flush().await.unwrap();
    let c = s.reader().unwrap();
    let before = hist::window(&c, hour, hour + 3 * 3_600_000).unwrap()
        [&("api".into(), "total".into())]
        .clone();
    drop(c);

    // "now" is 2 h after the last run; keep minute histograms 2 h 30 m: the first hour and a
    // half roll up (the first hour whole, half of the second), the rest stays per minute.
    let now = hour + 5 * 3_600_000;
    let retention = Retention {
        runs: Dur(Duration::from_secs(4 * 3600)),
        minute_histograms: Dur(Duration::from_secs(3 * 3600 + 1800)),
        hourly_histograms: Dur(Duration::from_secs(400 * 86400)),
    };
    let r2 = retention.clone();
    let stats = s
        .write(move |c| store::maintain(c, now, &r2))
        .await
        .unwrap();
    // cutoff = hour + 1.5 h: minutes 0..90 roll up (90 rows per phase, 3 phase series).
    assert_eq!(stats.rolled_minutes, 90 * 3, "{stats:?}");
    // runs older than now - 4 h = hour + 1 h: minutes 0..60 pruned (with their sub-check rows)
    assert_eq!(stats.pruned_runs, 60 * 2);

    let c = s.reader().unwrap();
    let hourly: Vec<(i64, i64)> = c
        .prepare("SELECT bucket_start, count FROM histograms WHERE series='api' AND phase='total' AND resolution=?1 ORDER BY bucket_start")
        .unwrap()
        .query_map([HOUR], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(hourly, vec![(hour, 60), (hour + 3_600_000, 30)]);
    let minutes: i64 = c
        .query_row("SELECT count(*) FROM histograms WHERE series='api' AND phase='total' AND resolution=?1", [MINUTE], |r| r.get(0))
        .unwrap();
    assert_eq!(minutes, 90);
    let after = hist::window(&c, hour, hour + 3 * 3_600_000).unwrap()
        [&("api".into(), "total".into())]
        .clone();
    assert_eq!(after.len(), before.len());
    for q in [0.5, 0.95, 0.99, 1.0] {
        assert_eq!(
            after.value_at_quantile(q),
            before.value_at_quantile(q),
            "q{q}"
        );
    }
    drop(c);

    // A pass an hour later merges the rest of hour 2 into the same hourly row, and half of hour 3.
    let later = now + 3_600_000;
    let stats = s
        .write(move |c| store::maintain(c, later, &retention))
        .await
        .unwrap();
    assert_eq!(stats.rolled_minutes, 60 * 3);
    let c = s.reader().unwrap();
    let counts: Vec<i64> = c
        .prepare("SELECT count FROM histograms WHERE series='api' AND phase='total' AND resolution=?1 ORDER BY bucket_start")
        .unwrap()
        .query_map([HOUR], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(counts, vec![60, 60, 30], "cutoff now at hour + 2.5 h");
    drop(c);
    drop(s);
    writer.join().await;
}

#[tokio::test]
async fn write_is_atomic_per_operation() {
    let dir = tempfile::tempdir().unwrap();
    let (s, writer) = Store::start(&dir.path().join("w.db")).unwrap();
    let r = s
        .write(|c| {
            c.execute("INSERT INTO skips (probe, planned_at) VALUES ('a', 1)", [])?;
            c.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            Ok(())
        })
        .await;
    assert!(r.is_err());
    s.record_skip("b", 2).await;
    s.flush().await.unwrap();
    let c = s.reader().unwrap();
    let probes: Vec<String> = c
        .prepare("SELECT probe FROM skips")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        probes,
        vec!["b".to_string()],
        "the failed operation left nothing behind"
    );
    drop(c);
    drop(s);
    writer.join().await;
}
