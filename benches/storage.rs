//! Storage per probe: N probes at a 60 s interval over simulated days, written through the
//! real store writer (`Store::record`) with maintenance every 10 simulated minutes under the
//! default `[retention]` (runs 7d, minute histograms 48h, hourly histograms 400d), as the
//! daemon does. Prints the database size per probe at the end of every day, and the figures
//! for docs/BENCHMARKS.md:
//!
//! - bytes per probe per day while filling: size at day 7 / probes / 7 (the size per probe at
//!   full runs retention, per day of runs kept);
//! - steady state: once runs retention is in force, daily growth per probe (what the hourly
//!   histograms add; runs freed by pruning are reused).
//!
//! `cargo bench --bench storage -- --probes 100 --days 10 [--profile http|listen] [--subchecks 0]`

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use serde_json::json;
use watchpost::config::Retention;
use watchpost::probe::{ErrorClass, ErrorInfo, Outcome, RunResult, SubCheck};
use watchpost::store::Store;

struct Args {
    probes: usize,
    days: i64,
    listen: bool,
    subchecks: usize,
}

fn args() -> Args {
    let mut a = Args {
        probes: 100,
        days: 10,
        listen: false,
        subchecks: 0,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--probes" => a.probes = next.parse().unwrap_or(a.probes),
            "--days" => a.days = next.parse().unwrap_or(a.days),
            "--profile" => a.listen = next == "listen",
            "--subchecks" => a.subchecks = next.parse().unwrap_or(0),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// xorshift: reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
    fn us(&mut self, lo: u64, spread: u64) -> Duration {
        Duration::from_micros(lo + self.below(spread))
    }
}

/// One run of probe `p` at `ms`: an HTTP health check (ttfb, total; status, bytes,
/// cert_days_left) or a listen session (connect, first_result, final, total; request id and
/// send lateness that change every run). One run in 200 is down after a confirmation retry.
fn run(a: &Args, rng: &mut Rng, p: usize, ms: i64, day: i64) -> RunResult {
    let down = rng.below(200) == 0;
    let mut details = serde_json::Map::new();
    let (kind, phases, duration) = if a.listen {
        let connect = rng.us(30_000, 50_000);
        let first = rng.us(250_000, 400_000);
        let fin = rng.us(120_000, 300_000);
        let total = Duration::from_millis(2_250) + connect + fin + rng.us(0, 20_000);
        details.insert("dialect".into(), json!("deepgram"));
        details.insert(
            "request_id".into(),
            json!(format!(
                "{:016x}-{:08x}",
                rng.below(u64::MAX),
                rng.below(1 << 32)
            )),
        );
        details.insert(
            "send_lateness_p50_ms".into(),
            json!(1.0 + rng.below(300) as f64 / 1000.0),
        );
        details.insert(
            "send_lateness_p99_ms".into(),
            json!(2.0 + rng.below(3000) as f64 / 1000.0),
        );
        details.insert("frames".into(), json!(23));
        details.insert("audio_ms".into(), json!(2250.0));
        details.insert("interim_results".into(), json!(3 + rng.below(3)));
        details.insert("final_results".into(), json!(1));
        details.insert("text".into(), json!("testing one two three"));
        details.insert("completed_by".into(), json!("speech_final"));
        details.insert("wer".into(), json!(0.0));
        (
            "listen",
            vec![
                ("connect".to_string(), connect),
                ("first_result".to_string(), first),
                ("final".to_string(), fin),
                ("total".to_string(), total),
            ],
            total + rng.us(20, 60),
        )
    } else {
        let ttfb = rng.us(15_000, 30_000);
        let total = ttfb + rng.us(150, 3_000);
        details.insert("status".into(), json!(if down { 503 } else { 200 }));
        details.insert("bytes".into(), json!(if down { 53 } else { 187 }));
        details.insert("cert_days_left".into(), json!(80 - day));
        (
            "http",
            vec![("ttfb".to_string(), ttfb), ("total".to_string(), total)],
            total + rng.us(20, 60),
        )
    };
    let error = down.then(|| ErrorInfo {
        class: ErrorClass::HttpStatus,
        message: "HTTP 503 Service Unavailable (after 1 retry)".into(),
    });
    if down {
        details.insert(
            "attempts".into(),
            json!([{"outcome": "down", "class": "http_status", "duration_ms": 21.4},
                   {"outcome": "down", "class": "http_status", "duration_ms": 19.8}]),
        );
    }
    let subchecks = (0..a.subchecks)
        .map(|i| SubCheck {
            series: format!("probe-{p:05}/checks.c{i}"),
            outcome: Outcome::Up,
            latency: Some(rng.us(500, 5_000)),
            error: None,
        })
        .collect();
    RunResult {
        probe: format!("probe-{p:05}"),
        kind,
        started_at: Utc
            .timestamp_millis_opt(ms)
            .single()
            .unwrap_or_else(Utc::now),
        duration,
        lag: Some(rng.us(300, 2_500)),
        outcome: if down { Outcome::Down } else { Outcome::Up },
        error,
        phases,
        details,
        subchecks,
    }
}

/// Bytes in use (pages not on the free list) and per table, from `dbstat`.
fn sizes(store: &Store) -> (u64, Vec<(String, u64)>) {
    let Ok(c) = store.reader() else {
        return (0, vec![]);
    };
    let q = |p: &str| -> u64 {
        c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0))
            .unwrap_or(0) as u64
    };
    let used = (q("page_count") - q("freelist_count")) * q("page_size");
    let mut per = Vec::new();
    if let Ok(mut st) = c.prepare(
        "SELECT name, sum(pgsize) FROM dbstat WHERE name IN ('runs', 'hourly', 'series')
         GROUP BY name ORDER BY name",
    ) {
        if let Ok(rows) = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))) {
            per = rows.flatten().collect();
        }
    }
    (used, per)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = args();
    let dir = tempfile::tempdir()?;
    let (store, writer) = Store::start(&dir.path().join("watchpost.db"))?;
    let retention = Retention::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // 2026-01-01T00:00:00Z; each probe keeps a stable offset within the minute.
    let t0: i64 = 1_767_225_600_000;
    let offsets: Vec<i64> = (0..a.probes).map(|_| rng.below(60_000) as i64).collect();
    println!(
        "{} {} probes{}, 60 s interval, {} simulated days, default retention",
        a.probes,
        if a.listen { "listen" } else { "HTTP" },
        if a.subchecks > 0 {
            format!(" with {} sub-checks each", a.subchecks)
        } else {
            String::new()
        },
        a.days
    );
    println!("| day | DB bytes per probe | growth per probe that day | runs | hourly |");
    println!("|---|---|---|---|---|");
    let wall = Instant::now();
    let mut per_day: Vec<u64> = Vec::new();
    let mut prev = 0u64;
    let (mut longest, mut longest_cpu, mut slow) = (Duration::ZERO, Duration::ZERO, 0);
    for day in 0..a.days {
        for m in 0..1440i64 {
            let minute = t0 + (day * 1440 + m) * 60_000;
            for (p, off) in offsets.iter().enumerate() {
                store.record(run(&a, &mut rng, p, minute + off, day)).await;
            }
            if m % 10 == 9 {
                let s = store.maintain(minute + 60_000, &retention).await?;
                longest = longest.max(s.longest_chunk);
                longest_cpu = longest_cpu.max(s.longest_chunk_cpu);
                slow += usize::from(s.longest_chunk > Duration::from_millis(50));
            }
        }
        store.flush().await?;
        let (used, per) = sizes(&store);
        let n = a.probes as u64;
        let table = |name: &str| {
            per.iter()
                .find(|(t, _)| t == name)
                .map(|(_, b)| format!("{:.1} KB", *b as f64 / n as f64 / 1024.0))
                .unwrap_or_default()
        };
        println!(
            "| {} | {:.1} KB | {:.1} KB | {} | {} |",
            day + 1,
            used as f64 / n as f64 / 1024.0,
            (used as f64 - prev as f64) / n as f64 / 1024.0,
            table("runs"),
            table("hourly"),
        );
        prev = used;
        per_day.push(used);
    }
    let n = a.probes as f64;
    let kb = |b: f64| b / 1024.0;
    println!();
    if let Some(&d7) = per_day.get(6) {
        println!(
            "size per probe at full runs retention (day 7): {:.1} KB = {:.1} KB per probe per day of runs kept",
            kb(d7 as f64 / n),
            kb(d7 as f64 / n / 7.0)
        );
    }
    if per_day.len() >= 10 {
        let last = per_day.len() - 1;
        let growth = (per_day[last] as f64 - per_day[8] as f64) / (last - 8) as f64 / n;
        println!(
            "steady state (days 9..{}): {:.1} KB per probe, growing {:.2} KB per probe per day (hourly histograms, kept 400 days)",
            last + 1,
            kb(per_day[last] as f64 / n),
            kb(growth)
        );
    }
    println!(
        "{} runs in {:.1} s wall; longest maintenance chunk {:?} ({:?} on CPU); passes with a chunk over 50 ms: {slow}",
        a.days * 1440 * a.probes as i64 * (1 + a.subchecks as i64),
        wall.elapsed().as_secs_f64(),
        longest,
        longest_cpu
    );
    drop(store);
    writer.join().await;
    Ok(())
}
