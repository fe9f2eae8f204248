//! The dashboard with N probes (default 1,000): one hour of runs per probe (one a minute,
//! written through the real store writer) on top of 30 days of hourly outcome counts (and
//! their daily sums) and 7 days of hourly latency histograms per probe (written as the
//! hourly rollup leaves them),
//! N/20 components with objectives, then the real API router on 127.0.0.1 answering what
//! one dashboard refresh asks for: the page, the overview (the page's `?since=` form: all
//! series on the first refresh, then those changed since, with new runs arriving between
//! refreshes at the pace of 1,000 probes a minute), components, the newest 20 incidents and
//! the SLO figures, plus the charts of the 12 probe cards a screen shows (1h, 24h and 7d).
//! Prints each request's time as the client sees it on loopback (server time plus a local
//! round trip), median and worst of `--rounds`, and the sum per refresh: the figure for
//! docs/BENCHMARKS.md (target: under 300 ms). The SLO figures computed cold (an empty cache,
//! as after a start) are also timed on the server side alone, five times.
//!
//! `cargo bench --bench dashboard -- --probes 1000 --rounds 10`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use common::arg;
use watchpost::probe::{Outcome, RunResult};
use watchpost::store::db::params;
use watchpost::store::Store;

/// Cold SLO computations timed on the server side.
const COLD_SLO_SAMPLES: usize = 5;

fn run(probe: &str, ms: i64, total_ms: u64, outcome: Outcome) -> RunResult {
    RunResult {
        probe: probe.into(),
        kind: "http",
        started_at: Utc.timestamp_millis_opt(ms).unwrap(),
        duration: Duration::from_millis(total_ms),
        lag: None,
        outcome,
        error: None,
        phases: vec![
            ("ttfb".into(), Duration::from_millis(total_ms / 2)),
            ("total".into(), Duration::from_millis(total_ms)),
        ],
        details: Default::default(),
        subchecks: vec![],
    }
}

#[tokio::main]
async fn main() {
    let probes = arg("--probes", 1000) as usize;
    let rounds = arg("--rounds", 10) as usize;
    let dir = tempfile::tempdir().unwrap();
    let pdir = dir.path().join("probes");
    std::fs::create_dir_all(&pdir).unwrap();
    let mut main =
        String::from("[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n");
    for i in 0..probes {
        std::fs::write(
            pdir.join(format!("p{i:04}.toml")),
            format!("name = \"p{i:04}\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/{i}\"\n[budget]\ntotal = {{ p95 = \"200ms\" }}\n"),
        )
        .unwrap();
    }
    for c in 0..probes.div_ceil(20) {
        let members: Vec<String> = (c * 20..((c + 1) * 20).min(probes))
            .map(|i| format!("\"p{i:04}\""))
            .collect();
        main += &format!(
            "\n[[component]]\nname = \"Component {c}\"\nprobes = [{}]\nobjective = \"99.5%\"\n",
            members.join(", ")
        );
    }
    let path = dir.path().join("watchpost.toml");
    std::fs::write(&path, main).unwrap();
    let cfg = Arc::new(watchpost::config::load(&path).unwrap());
    let (store, writer) = Store::start(&cfg.db_path()).unwrap();
    let now = Utc::now().timestamp_millis();
    let t = Instant::now();
    for m in 0..60i64 {
        for i in 0..probes {
            let outcome = if (i + m as usize).is_multiple_of(97) {
                Outcome::Down
            } else {
                Outcome::Up
            };
            let ms = 20 + ((i as u64 * 7 + m as u64 * 3) % 80);
            store
                .record(run(
                    &format!("p{i:04}"),
                    now - (60 - m) * 60_000,
                    ms,
                    outcome,
                ))
                .await;
        }
    }
    store.flush().await.unwrap();
    eprintln!("{} runs written in {:?}", probes * 60, t.elapsed());
    // History before the runs, as the hourly rollup leaves it: outcome counts for 30 days,
    // latency for 7 days; the rollup has reached the hour the runs start in.
    let t = Instant::now();
    let first_run_hour = watchpost::store::hist::floor_hour(now - 60 * 60_000);
    let rows = store
        .write(move |c| {
            use watchpost::store::hist;
            let mut n = 0;
            let series = hist::series_names(c)?;
            let ids: Vec<i64> = series.keys().copied().collect();
            // Each series' hour: the same five values in `ttfb` and `total`.
            let blobs: std::collections::HashMap<i64, Vec<u8>> = series
                .iter()
                .map(|(id, s)| {
                    let mut hour = hist::Hour::new();
                    for phase in ["ttfb", "total"] {
                        if let Some(i) = s.phases.iter().position(|p| p == phase) {
                            for us in [20_000u64, 35_000, 50_000, 80_000, 95_000] {
                                hist::record(hour.entry(i).or_insert_with(hist::new_hist), us);
                            }
                        }
                    }
                    (*id, hist::encode_hour(&hour))
                })
                .collect();
            let mut outcomes = c.prepare_cached(
                "INSERT INTO hourly_outcomes (bucket_start, series, up, degraded, down) VALUES (?1, ?2, ?3, 0, ?4)",
            )?;
            for k in 1..=30 * 24i64 {
                let hour = first_run_hour - k * 3_600_000;
                for id in &ids {
                    let down = i64::from((id + k) % 97 == 0);
                    outcomes.execute(params![hour, id, 60 - down, down])?;
                    n += 1;
                }
            }
            // The daily sums the rollup keeps beside them (`roll_day`).
            n += c.execute(
                "INSERT INTO daily_outcomes (bucket_start, series, up, degraded, down)
                 SELECT bucket_start - bucket_start % 86400000, series, sum(up), sum(degraded), sum(down)
                 FROM hourly_outcomes GROUP BY 1, 2",
                [],
            )?;
            let mut hourly = c.prepare_cached(
                "INSERT INTO hourly (bucket_start, series, data) VALUES (?1, ?2, ?3)",
            )?;
            for k in 1..=7 * 24i64 {
                let hour = first_run_hour - k * 3_600_000;
                for (id, blob) in &blobs {
                    hourly.execute(params![hour, id, blob])?;
                    n += 1;
                }
            }
            for key in ["rolled_until", "fine_from", "runs_from"] {
                c.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![key, first_run_hour],
                )?;
            }
            Ok(n)
        })
        .await
        .unwrap();
    eprintln!("{rows} hourly rows written in {:?}", t.elapsed());

    let state = watchpost::api::AppState::new(
        cfg.clone(),
        watchpost::metrics::Metrics::new(),
        store.clone(),
        watchpost::health::Health::default(),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(l, watchpost::api::router(state)).await });
    let client = reqwest::Client::new();
    let mut paths: Vec<String> = vec![
        "/".into(),
        "/api/v1/overview?since=".into(),
        "/api/v1/components".into(),
        "/api/v1/incidents?limit=20".into(),
        "/api/v1/slo".into(),
    ];
    for i in 0..12 {
        paths.push(format!("/api/v1/chart?series=p{i:04}&window=1h"));
    }
    for w in ["24h", "7d"] {
        for i in 0..12 {
            paths.push(format!("/api/v1/chart?series=p{i:04}&window={w}"));
        }
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
    let mut bytes = vec![0usize; paths.len()];
    let mut totals = Vec::new();
    let mut first_slo = Duration::ZERO;
    let mut first_overview = (Duration::ZERO, 0);
    let mut cursor = String::new();
    let mut next_run = 0usize;
    let longer = |p: &str| p.contains("24h") || p.contains("7d");
    for round in 0..rounds {
        let mut total = Duration::ZERO;
        for (k, p) in paths.iter().enumerate() {
            if longer(p) {
                continue; // the 24h and 7d charts are timed separately below
            }
            let url = if p.starts_with("/api/v1/overview") {
                format!("{base}{p}{cursor}")
            } else {
                format!("{base}{p}")
            };
            let t = Instant::now();
            let r = client.get(url).send().await.unwrap();
            assert!(r.status().is_success(), "{p}: {}", r.status());
            let b = r.bytes().await.unwrap();
            let d = t.elapsed();
            if p.starts_with("/api/v1/overview") {
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                cursor = v["cursor"].as_str().unwrap().to_string();
                if round == 0 {
                    first_overview = (d, b.len());
                    continue; // the first load is reported apart
                }
            }
            if round == 0 && p == "/api/v1/slo" {
                first_slo = d;
            }
            bytes[k] = b.len();
            times[k].push(d);
            total += d;
        }
        if round > 0 {
            totals.push(total);
        }
        // Runs keep arriving: 1,000 probes a minute is ~83 runs per 5 s refresh.
        let due = (probes * 5).div_ceil(60);
        for _ in 0..due {
            let i = next_run % probes;
            next_run += 1;
            store
                .record(run(
                    &format!("p{i:04}"),
                    Utc::now().timestamp_millis() + next_run as i64,
                    40,
                    Outcome::Up,
                ))
                .await;
        }
        store.flush().await.unwrap();
        // Past the SLO cache (5 s) every other round: half the refreshes recompute it.
        if round % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(5100)).await;
        }
    }
    for (k, p) in paths.iter().enumerate().filter(|(_, p)| longer(p)) {
        let t = Instant::now();
        let r = client.get(format!("{base}{p}")).send().await.unwrap();
        bytes[k] = r.bytes().await.unwrap().len();
        times[k].push(t.elapsed());
    }
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() - 1])
    };
    println!(
        "dashboard with {probes} probes, {} components, {rounds} refreshes",
        probes.div_ceil(20)
    );
    for (k, p) in paths.iter().enumerate() {
        let (m, w) = med(&mut times[k]);
        println!(
            "{p:<42} median {:>7.1} ms  worst {:>7.1} ms  {:>8} bytes",
            m.as_secs_f64() * 1e3,
            w.as_secs_f64() * 1e3,
            bytes[k]
        );
    }
    println!(
        "/api/v1/overview first load (every series): {:.1} ms, {} bytes",
        first_overview.0.as_secs_f64() * 1e3,
        first_overview.1
    );
    println!(
        "/api/v1/slo cold (first call, empty hourly-sum cache, over HTTP): {:.1} ms",
        first_slo.as_secs_f64() * 1e3
    );
    // The same cold computation on the server side alone (every component's figures on a
    // fresh reader with an empty cache, as the first `/api/v1/slo` after a start), several
    // times: one first call is a single sample on a shared machine.
    let mut cold = Vec::new();
    for _ in 0..COLD_SLO_SAMPLES {
        let c = store.reader().unwrap();
        let sums = watchpost::store::HourlySums::default();
        let now = Utc::now().timestamp_millis();
        let t = Instant::now();
        for comp in &cfg.components {
            watchpost::slo::component_slo(&c, comp, now, Some(&sums)).unwrap();
        }
        cold.push(t.elapsed());
    }
    let (m, w) = med(&mut cold);
    println!(
        "/api/v1/slo cold, server time ({COLD_SLO_SAMPLES} computations, {} components): median {:.1} ms, worst {:.1} ms (target: under 300 ms)",
        cfg.components.len(),
        m.as_secs_f64() * 1e3,
        w.as_secs_f64() * 1e3
    );
    let (m, w) = med(&mut totals);
    println!(
        "one refresh (page, overview since the last, components, incidents, slo, 12 charts 1h): median {:.1} ms, worst {:.1} ms",
        m.as_secs_f64() * 1e3,
        w.as_secs_f64() * 1e3
    );
    server.abort();
    drop(store);
    writer.join().await;
}
