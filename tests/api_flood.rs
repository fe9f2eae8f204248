//! The real binary under a small open-files limit (`ulimit -n 256`, soft = hard, so the
//! agent cannot raise it), flooded with more idle half-sent requests than it has
//! descriptors: the API keeps answering once the header timeout has cut the flood (the
//! cap closed the extras at once), and the probe it runs against a live local target
//! stays `up` throughout — the API can never take the probes' descriptors.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::http::HttpServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

const FD_LIMIT: u32 = 256;
const FLOOD: usize = 300;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `watchpost run` with RLIMIT_NOFILE = `FD_LIMIT` (soft and hard), stderr to `log`.
fn start(cfg: &Path, log: &Path) -> Agent {
    let log = std::fs::File::create(log).expect("log file");
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {FD_LIMIT} && exec \"$0\" run -c \"$1\""))
        .arg(env!("CARGO_BIN_EXE_watchpost"))
        .arg(cfg)
        .env("WATCHPOST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting watchpost run under ulimit");
    Agent(child)
}

/// One GET on a fresh connection, bounded: (status, body), or None.
async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let go = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    };
    timeout(Duration::from_secs(3), go).await.ok().flatten()
}

/// The value of the first series of `name` whose line contains every label in `labels`.
fn series(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Open `n` connections that each send half a request and then nothing.
async fn flood(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(Ok(mut s)) = timeout(Duration::from_secs(2), TcpStream::connect(addr)).await else {
            continue;
        };
        let _ = s
            .write_all(b"GET /api/runs/latest HTTP/1.1\r\nHost: x\r\n")
            .await;
        held.push(s);
    }
    held
}

/// How many of `held` the server closed within `within`.
async fn closed(held: &mut [TcpStream], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut n = 0;
    for s in held.iter_mut() {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    n += 1;
                    break;
                }
                Ok(Ok(_)) => continue,
                Err(_) => break,
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_sent_requests_neither_blinds_the_api_nor_the_probes() {
    // This process holds the flood: give it room.
    watchpost::fdlimit::raise();
    let target = HttpServer::json(200, r#"{"status":"ok"}"#).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("probes")).expect("mkdir");
    std::fs::write(
        dir.path().join("probes/target.toml"),
        format!(
            "name = \"target\"\nkind = \"http\"\nurl = \"{}\"\ninterval = \"1s\"\ntimeout = \"1s\"\nretries = 0\njitter = \"0s\"\n",
            target.url("/health")
        ),
    )
    .expect("probe file");
    let cfg = dir.path().join("watchpost.toml");
    std::fs::write(
        &cfg,
        format!("[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"{addr}\"\nmax_concurrency = 4\nshutdown_grace = \"2s\"\n"),
    )
    .expect("config");
    let log = dir.path().join("agent.log");
    let mut agent = start(&cfg, &log);

    let t = Instant::now();
    while get(&addr, "/health").await.map(|r| r.0) != Some(200) {
        if let Ok(Some(st)) = agent.0.try_wait() {
            panic!(
                "the agent exited ({st}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the agent never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A first run or two before the flood.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = get(&addr, "/metrics").await.expect("metrics").1;
    let up_before = series(
        &before,
        "watchpost_runs_total",
        &["probe=\"target\"", "outcome=\"up\""],
    );

    // Two waves, each more connections than the agent has descriptors.
    for wave in 0..2 {
        let t = Instant::now();
        let mut held = flood(&addr, FLOOD).await;
        assert!(
            held.len() > FD_LIMIT as usize,
            "wave {wave}: {}",
            held.len()
        );
        // A fresh client gets through once the header timeout has cut the flood.
        let answered = loop {
            if let Some((200, _)) = get(&addr, "/health").await {
                break t.elapsed();
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "wave {wave}: /health unreachable for 15 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            answered < watchpost::api::HEADER_TIMEOUT + Duration::from_secs(4),
            "wave {wave}: /health answered only after {answered:?}"
        );
        let n = closed(&mut held, Duration::from_secs(10)).await;
        assert_eq!(
            n,
            held.len(),
            "wave {wave}: the agent closed every idle connection"
        );
        eprintln!("wave {wave}: {FLOOD} half-sent requests; /health answered after {answered:?}");
    }

    let after = get(&addr, "/metrics").await.expect("metrics").1;
    let up = series(
        &after,
        "watchpost_runs_total",
        &["probe=\"target\"", "outcome=\"up\""],
    );
    let down = series(
        &after,
        "watchpost_runs_total",
        &["probe=\"target\"", "outcome=\"down\""],
    );
    let refused = series(&after, "watchpost_api_connections_refused_total", &[]);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(down, 0.0, "no run may fail during the flood:\n{text}");
    assert!(
        up >= up_before + 8.0,
        "the probe kept running: {up_before} → {up}\n{text}"
    );
    assert!(refused > 0.0, "the cap refused the extras");
    assert!(!text.contains("Too many open files"), "{text}");
    assert!(text.contains("open-files limit"), "{text}");
}
