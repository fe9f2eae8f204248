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
//! The runs are shaped like the real probes' (`benches/common/runs.rs`).
//!
//! `cargo bench --bench storage -- --probes 100 --days 10 [--profile http|listen] [--subchecks 0]`

use std::time::{Duration, Instant};

use watchpost::config::Retention;
use watchpost::store::Store;

#[path = "common/runs.rs"]
mod runs;
use runs::{Profile, Rng};

struct Args {
    probes: usize,
    days: i64,
    profile: Profile,
    subchecks: usize,
}

fn args() -> Args {
    let mut a = Args {
        probes: 100,
        days: 10,
        profile: Profile::Http,
        subchecks: 0,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--probes" => a.probes = next.parse().unwrap_or(a.probes),
            "--days" => a.days = next.parse().unwrap_or(a.days),
            "--profile" => a.profile = Profile::parse(&next).unwrap_or(a.profile),
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

/// Bytes in use (pages not on the free list) and per table, from `dbstat`.
fn sizes(store: &Store) -> (u64, Vec<(String, u64)>) {
    let Ok(c) = store.reader() else {
        return (0, vec![]);
    };
    let used = runs::used_bytes(&c);
    let mut per = Vec::new();
    if let Ok(mut st) = c.prepare(
        "SELECT CASE name WHEN 'hourly_by_series' THEN 'hourly' WHEN 'run_hours' THEN 'runs'
           WHEN 'run_hours_by_series' THEN 'runs' ELSE name END, sum(pgsize)
         FROM dbstat WHERE name IN ('runs', 'run_hours', 'run_hours_by_series', 'hourly',
           'hourly_by_series', 'series') GROUP BY 1",
    ) {
        if let Ok(rows) = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))) {
            per = rows.flatten().collect();
        }
    }
    (used, per)
}

/// Where the bytes of each table and index go, from `dbstat`: payload, unused bytes in its
/// pages, page bytes, cells.
fn detail(store: &Store) -> Vec<String> {
    let Ok(c) = store.reader() else {
        return vec![];
    };
    let Ok(mut st) = c.prepare(
        "SELECT name, sum(payload), sum(unused), sum(pgsize), sum(ncell) FROM dbstat
         WHERE name IN ('runs', 'run_hours', 'run_hours_by_series', 'hourly', 'hourly_by_series',
           'hourly_outcomes', 'hourly_outcomes_by_series')
         GROUP BY name ORDER BY sum(pgsize) DESC",
    ) else {
        return vec![];
    };
    let Ok(rows) = st.query_map([], |r| {
        let n = |i| r.get::<_, i64>(i);
        let (payload, unused, pages, cells) = (n(1)?, n(2)?, n(3)?, n(4)?);
        Ok(format!(
            "| {} | {pages} | {payload} | {unused} ({:.0} %) | {cells} | {:.1} |",
            r.get::<_, String>(0)?,
            100.0 * unused as f64 / pages.max(1) as f64,
            pages as f64 / cells.max(1) as f64,
        ))
    }) else {
        return vec![];
    };
    rows.flatten().collect()
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
        a.profile.name(),
        if a.subchecks > 0 {
            format!(" with {} sub-checks each", a.subchecks)
        } else {
            String::new()
        },
        a.days
    );
    println!(
        "| day | DB bytes per probe | growth per probe that day | runs (with packed hours) | hourly (with its index) |"
    );
    println!("|---|---|---|---|---|");
    let wall = Instant::now();
    let mut per_day: Vec<u64> = Vec::new();
    let mut prev = 0u64;
    let (mut longest, mut longest_cpu, mut slow) = (Duration::ZERO, Duration::ZERO, 0);
    for day in 0..a.days {
        for m in 0..1440i64 {
            let minute = t0 + (day * 1440 + m) * 60_000;
            for (p, off) in offsets.iter().enumerate() {
                let probe = format!("probe-{p:05}");
                let r = runs::run(a.profile, &mut rng, &probe, minute + off, day, a.subchecks);
                store.record(r).await;
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
        if a.subchecks > 0 {
            println!(
                "per series (the probe and its {} sub-checks): {:.1} KB per day",
                a.subchecks,
                kb(d7 as f64 / n / 7.0 / (1 + a.subchecks) as f64)
            );
        }
    }
    if let Ok(c) = store.reader() {
        let ids: Vec<i64> = watchpost::store::series_ids(&c, None)?
            .into_iter()
            .map(|s| s.0)
            .collect();
        let (mut notes, mut all) = (0u64, 0u64);
        watchpost::store::each_run(&c, &ids, (0, i64::MAX), |_, r| {
            all += 1;
            notes += u64::from(r.note.is_some());
        })?;
        println!("runs kept with a note (error or details): {notes} of {all}");
    }
    println!("\n| table or index | page bytes | payload | unused | cells | page bytes per cell |");
    println!("|---|---|---|---|---|---|");
    for line in detail(&store) {
        println!("{line}");
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
