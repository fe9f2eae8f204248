//! Scheduler load benchmark: N HTTP probes (default 10,000) at a 60 s interval against a
//! local HTTP server running in a child process, for a fixed duration (default 180 s).
//! Reports schedule lag (actual − planned start) p50/p99/max, CPU seconds per 1,000 runs,
//! average cores, peak RSS and SQLite bytes per 1,000 runs of the agent process only.
//!
//!     cargo bench --bench schedule_load -- --probes 10000 --seconds 180
//!
//! Bounded: the agent stops itself after `--seconds`; the server child is killed at the end.

mod common;

use common::{arg, cpu_seconds};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn serve() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", l.local_addr().unwrap().port());
        std::io::stdout().flush().unwrap();
        let app = axum::Router::new().route(
            "/health",
            axum::routing::get(|| async {
                axum::Json(serde_json::json!({"status":"ok","service":"bench"}))
            }),
        );
        axum::serve(l, app).await.unwrap();
    });
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Pages in use × page size, as a reader sees the database (WAL included).
fn logical_db_bytes(db: &std::path::Path) -> u64 {
    let Ok(c) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    let pages: i64 = c
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap_or(0);
    let size: i64 = c
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap_or(0);
    (pages * size) as u64
}

fn main() {
    if std::env::args().any(|a| a == "--serve") {
        return serve();
    }
    let probes = arg("--probes", 10_000);
    let seconds = arg("--seconds", 180);

    let mut server = Command::new(std::env::current_exe().unwrap())
        .arg("--serve")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start server child");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("LISTENING ")
        .unwrap()
        .parse()
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let pdir = dir.path().join("probes");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::write(
        dir.path().join("watchpost.toml"),
        "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\nhost_rate_limit = 0\nshutdown_grace = \"5s\"\n\
         [defaults]\ninterval = \"60s\"\ntimeout = \"5s\"\nretries = 0\njitter = \"0s\"\n",
    )
    .unwrap();
    for i in 0..probes {
        std::fs::write(
            pdir.join(format!("p{i}.toml")),
            format!("name = \"p{i}\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/health\"\n"),
        )
        .unwrap();
    }
    let config = watchpost::config::load(&dir.path().join("watchpost.toml")).expect("bench config");
    let db = config.db_path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // Database growth in steady state: the logical size (pages, WAL included) once every
    // series exists (after the first interval), and at the end.
    let sampler_db = db.clone();
    let sampler = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds.min(75)));
        let t = Instant::now();
        (t, logical_db_bytes(&sampler_db))
    });
    let cpu0 = cpu_seconds(None);
    let t0 = Instant::now();
    rt.block_on(async {
        watchpost::run(
            Arc::new(config),
            None,
            tokio::time::sleep(Duration::from_secs(seconds)),
        )
        .await
    })
    .unwrap();
    let wall = t0.elapsed().as_secs_f64();
    let t_end = Instant::now();
    let end_bytes = logical_db_bytes(&db);
    let (t_mid, mid_bytes) = sampler.join().unwrap();
    let cpu = cpu_seconds(None) - cpu0;
    let peak_rss_mb = status_kb("VmHWM:") as f64 / 1024.0;
    let _ = server.kill();
    let _ = server.wait();

    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut lags: Vec<f64> = conn
        .prepare("SELECT lag_us / 1000.0 FROM runs WHERE lag_us IS NOT NULL")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let runs = lags.len() as f64;
    let down: i64 = conn
        .query_row("SELECT count(*) FROM runs WHERE outcome != 0", [], |r| {
            r.get(0)
        })
        .unwrap();
    drop(conn);
    let db_bytes: u64 = ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", db.display())).ok())
        .map(|m| m.len())
        .sum();
    println!("probes={probes} interval=60s duration={seconds}s wall={wall:.1}s");
    println!("runs={runs} not_up={down}");
    println!(
        "schedule lag ms: p50={:.3} p99={:.3} max={:.3}",
        percentile(&lags, 0.50),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "cpu seconds={cpu:.2} per 1000 runs={:.3} average cores={:.3}",
        cpu / runs * 1000.0,
        cpu / wall
    );
    println!("peak RSS MB={peak_rss_mb:.1}");
    let span = t_end.duration_since(t_mid).as_secs_f64();
    if span > 10.0 {
        let per_day = (end_bytes as f64 - mid_bytes as f64) / span * 86_400.0;
        println!(
            "database growth per day={:.1} MB ({:.1} KB per probe per day; logical size {mid_bytes} → {end_bytes} bytes over {span:.0} s)",
            per_day / 1e6,
            per_day / probes as f64 / 1e3
        );
    }
    println!(
        "sqlite bytes per 1000 runs={:.0} (db+wal {db_bytes} bytes)",
        db_bytes as f64 / runs * 1000.0
    );
}
