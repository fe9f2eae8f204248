//! The dashboard with N probes (default 1,000): one hour of runs per probe (one a minute,
//! written through the real store writer), N/20 components with objectives, then the real
//! API router on 127.0.0.1 answering what one dashboard refresh asks for: the page, the
//! overview, components, the newest 20 incidents and the SLO figures, plus the charts of the
//! 12 probe cards a screen shows (1h and 24h). Prints each request's time as the client sees
//! it on loopback (server time plus a local round trip), median and worst of `--rounds`, and
//! the sum per refresh: the figure for docs/BENCHMARKS.md (target: under 300 ms).
//!
//! `cargo bench --bench dashboard -- --probes 1000 --rounds 10`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use common::arg;
use watchpost::probe::{Outcome, RunResult};
use watchpost::store::Store;

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
        "/api/v1/overview".into(),
        "/api/v1/components".into(),
        "/api/v1/incidents?limit=20".into(),
        "/api/v1/slo".into(),
    ];
    for i in 0..12 {
        paths.push(format!("/api/v1/chart?series=p{i:04}&window=1h"));
    }
    for i in 0..12 {
        paths.push(format!("/api/v1/chart?series=p{i:04}&window=24h"));
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
    let mut bytes = vec![0usize; paths.len()];
    let mut totals = Vec::new();
    let mut first_slo = Duration::ZERO;
    for round in 0..rounds {
        let mut total = Duration::ZERO;
        for (k, p) in paths.iter().enumerate() {
            if p.contains("24h") {
                continue; // the 24h charts are timed separately below
            }
            let t = Instant::now();
            let r = client.get(format!("{base}{p}")).send().await.unwrap();
            assert!(r.status().is_success(), "{p}: {}", r.status());
            let b = r.bytes().await.unwrap();
            let d = t.elapsed();
            if round == 0 && p == "/api/v1/slo" {
                first_slo = d;
            }
            bytes[k] = b.len();
            times[k].push(d);
            total += d;
        }
        totals.push(total);
        // Past the SLO cache (5 s) every other round: half the refreshes recompute it.
        if round % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(5100)).await;
        }
    }
    for (k, p) in paths.iter().enumerate().filter(|(_, p)| p.contains("24h")) {
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
        "/api/v1/slo computed (first call): {:.1} ms",
        first_slo.as_secs_f64() * 1e3
    );
    let (m, w) = med(&mut totals);
    println!(
        "one refresh (page, overview, components, incidents, slo, 12 charts 1h): median {:.1} ms, worst {:.1} ms",
        m.as_secs_f64() * 1e3,
        w.as_secs_f64() * 1e3
    );
    server.abort();
    drop(store);
    writer.join().await;
}
