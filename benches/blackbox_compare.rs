//! Side-by-side CPU cost of an HTTP probe: watchpost against Prometheus blackbox_exporter,
//! the same load for both in one run.
//!
//!     cargo bench --bench blackbox_compare -- --probes 3000 --interval 10 --seconds 60
//!
//! The harness starts, each with its own temporary config on 127.0.0.1:
//! - nginx (Debian `nginx`) serving a small static health JSON;
//! - blackbox_exporter (Debian `prometheus-blackbox-exporter`) with an `http_2xx` module,
//!   driven by this process: `GET /probe?target=…&module=http_2xx` at probes/interval per
//!   second on an absolute schedule (the driver's CPU is not counted);
//! - the real `watchpost run` binary with `--probes` HTTP probes at `--interval` seconds
//!   (the same rate), grouped into components of `--per-component` probes (default 10; store
//!   and evaluator on), retries 0, no per-host rate limit, default logging to stderr
//!   (discarded).
//!
//! Both probers open a fresh connection to nginx per probe and run at the same time, so they
//! share whatever else the machine is doing. After `--warmup` seconds (at least one interval,
//! so every watchpost probe is on its schedule), the harness reads utime+stime from
//! /proc/PID/stat of each measured process, waits `--seconds`, reads them again and counts
//! the probes of the window (watchpost: runs stored with a start inside it, read from its
//! database after it stopped; blackbox: the driver's `/probe` answers with `probe_success
//! 1`), then prints CPU-seconds per 1,000 probes and the ratio.
//!
//! Bounded: fixed duration, every request has a timeout, children are stopped at the end.
//! Needs `apt-get install -y nginx prometheus-blackbox-exporter` (see docs/BENCHMARKS.md).

mod common;

use common::{arg, cpu_seconds};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

const SIGTERM: i32 = 15;

/// Resident set size of one process in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A port that was free a moment ago (nginx cannot bind port 0 and report it).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Stop a child with SIGTERM, then SIGKILL after 10 s.
fn stop(name: &str, child: &mut Child) {
    // SAFETY: plain kill(2) on the pid of a child we started and have not reaped.
    unsafe { kill(child.id() as i32, SIGTERM) };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{name} did not stop after SIGTERM; killing");
    let _ = child.kill();
    let _ = child.wait();
}

async fn wait_http(client: &reqwest::Client, url: &str, what: &str) {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what} did not answer {url} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs (all, up — outcome 0 in the compact schema) the agent stored with a start in `[from_ms, to_ms)`. Read from its
/// database by this process, so counting costs the agent nothing (a /metrics scrape of
/// thousands of series would land in the measured window).
fn watchpost_runs(db: &std::path::Path, from_ms: i64, to_ms: i64) -> (f64, f64) {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open watchpost db");
    conn.query_row(
        "SELECT count(*), coalesce(sum(r.outcome = 0), 0) FROM runs r JOIN series s ON s.id = r.series
         WHERE s.kind != 'subcheck' AND r.started_at >= ?1 AND r.started_at < ?2",
        [from_ms, to_ms],
        |r| Ok((r.get::<_, i64>(0)? as f64, r.get::<_, i64>(1)? as f64)),
    )
    .expect("count runs")
}

fn main() {
    let probes = arg("--probes", 3000);
    let interval = arg("--interval", 10).max(1);
    let seconds = arg("--seconds", 60).max(1);
    let warmup = arg("--warmup", interval + 5).max(interval);
    let per_component = arg("--per-component", 10).max(1);
    let rate = probes as f64 / interval as f64;

    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    // nginx workers run as `nobody` when started by root: let them read the document root.
    let _ = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&root)
        .status();
    let www = root.join("www");
    std::fs::create_dir_all(&www).expect("mkdir www");
    std::fs::write(
        www.join("health.json"),
        r#"{"status":"ok","service":"bench","checks":{}}"#,
    )
    .expect("write health.json");
    let _ = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&www)
        .status();

    // --- nginx ---------------------------------------------------------------------------
    let nginx_port = free_port();
    std::fs::write(
        root.join("nginx.conf"),
        format!(
            "daemon off;\nworker_processes 1;\npid {r}/nginx.pid;\nerror_log {r}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {r}/tmp-body;\n  proxy_temp_path {r}/tmp-proxy;\n  \
             fastcgi_temp_path {r}/tmp-fcgi;\n  uwsgi_temp_path {r}/tmp-uwsgi;\n  scgi_temp_path {r}/tmp-scgi;\n  \
             types {{ application/json json; }}\n  \
             server {{\n    listen 127.0.0.1:{nginx_port} backlog=4096;\n    root {w};\n  }}\n}}\n",
            r = root.display(),
            w = www.display()
        ),
    )
    .expect("write nginx.conf");
    let mut nginx = Command::new("nginx")
        .arg("-p")
        .arg(&root)
        .arg("-c")
        .arg(root.join("nginx.conf"))
        .arg("-e")
        .arg(root.join("nginx-error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx (apt-get install -y nginx)");

    // --- blackbox_exporter ---------------------------------------------------------------
    let bb_port = free_port();
    std::fs::write(
        root.join("blackbox.yml"),
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n    http:\n      preferred_ip_protocol: ip4\n",
    )
    .expect("write blackbox.yml");
    let mut blackbox = Command::new("prometheus-blackbox-exporter")
        .arg(format!(
            "--config.file={}",
            root.join("blackbox.yml").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{bb_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start blackbox_exporter (apt-get install -y prometheus-blackbox-exporter)");

    // --- watchpost -----------------------------------------------------------------------
    let wp_port = free_port();
    let pdir = root.join("probes");
    std::fs::create_dir_all(&pdir).expect("mkdir probes");
    let mut components = String::new();
    let mut members = Vec::new();
    for i in 0..probes {
        std::fs::write(
            pdir.join(format!("p{i}.toml")),
            format!(
                "name = \"p{i}\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{nginx_port}/health.json\"\n"
            ),
        )
        .expect("write probe");
        members.push(format!("\"p{i}\""));
        if members.len() as u64 == per_component || i + 1 == probes {
            components.push_str(&format!(
                "[[component]]\nname = \"c{i}\"\nprobes = [{}]\n",
                members.join(", ")
            ));
            members.clear();
        }
    }
    std::fs::write(
        root.join("watchpost.toml"),
        format!(
            "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"127.0.0.1:{wp_port}\"\n\
             host_rate_limit = 0\nshutdown_grace = \"5s\"\n\
             [defaults]\ninterval = \"{interval}s\"\ntimeout = \"5s\"\nretries = 0\n{components}",
        ),
    )
    .expect("write watchpost.toml");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .arg("-c")
        .arg(root.join("watchpost.toml"))
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start watchpost");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let target = format!("http://127.0.0.1:{nginx_port}/health.json");
        wait_http(&client, &target, "nginx").await;
        let bb_url = format!("http://127.0.0.1:{bb_port}/probe?target={target}&module=http_2xx");
        wait_http(&client, &bb_url, "blackbox_exporter").await;
        let metrics_url = format!("http://127.0.0.1:{wp_port}/metrics");
        wait_http(&client, &metrics_url, "watchpost").await;

        // The driver: blackbox probes on an absolute schedule, counted when answered.
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let total = warmup + seconds + 2;
        let n = (rate * total as f64) as u64;
        let period = Duration::from_secs_f64(1.0 / rate);
        let (d2, f2, c2, u2) = (done.clone(), failed.clone(), client.clone(), bb_url.clone());
        let driver = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for k in 0..n {
                tokio::time::sleep_until(start + period.mul_f64(k as f64)).await;
                let (d, f, c, u) = (d2.clone(), f2.clone(), c2.clone(), u2.clone());
                tokio::spawn(async move {
                    let ok = match c.get(&u).send().await {
                        Ok(r) => r
                            .text()
                            .await
                            .map(|t| t.contains("\nprobe_success 1"))
                            .unwrap_or(false),
                        Err(_) => false,
                    };
                    if ok { d } else { f }.fetch_add(1, Ordering::Relaxed);
                });
            }
        });

        tokio::time::sleep(Duration::from_secs(warmup)).await;
        let (wp_cpu0, bb_cpu0) = (
            cpu_seconds(Some(agent.id())),
            cpu_seconds(Some(blackbox.id())),
        );
        let from_ms = now_ms();
        let (bb0, bbf0) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let (wp_cpu1, bb_cpu1) = (
            cpu_seconds(Some(agent.id())),
            cpu_seconds(Some(blackbox.id())),
        );
        let to_ms = now_ms();
        let (bb1, bbf1) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        let wall = t0.elapsed().as_secs_f64();
        let rss = (rss_mib(agent.id()), rss_mib(blackbox.id()));
        driver.abort();
        (
            (wp_cpu1 - wp_cpu0, from_ms, to_ms),
            (bb_cpu1 - bb_cpu0, (bb1 - bb0) as f64, (bbf1 - bbf0) as f64),
            wall,
            rss,
        )
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    stop("watchpost", &mut agent);
    stop("blackbox_exporter", &mut blackbox);
    stop("nginx", &mut nginx);
    let ((wp_cpu, from_ms, to_ms), (bb_cpu, bb_ok, bb_failed), wall, (wp_rss, bb_rss)) = result;
    let (wp_runs, wp_up) = watchpost_runs(&root.join("data/watchpost.db"), from_ms, to_ms);
    let db_bytes: u64 = ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(root.join(format!("data/watchpost.db{s}"))).ok())
        .map(|m| m.len())
        .sum();

    let wp_per_k = wp_cpu / wp_runs * 1000.0;
    let bb_per_k = bb_cpu / bb_ok * 1000.0;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "blackbox_compare: {rate:.0} HTTP probes/s each against nginx, fresh connection per probe; \
         measured {wall:.1} s after {warmup} s warm-up"
    );
    println!(
        "  watchpost: {probes} probes every {interval} s in components of {per_component}, store + evaluator on"
    );
    println!(
        "  watchpost         runs {wp_runs:.0} (up {wp_up:.0})  CPU {wp_cpu:.2} s  = {wp_per_k:.3} CPU-s per 1,000 probes  RSS {wp_rss:.1} MiB"
    );
    println!(
        "  blackbox_exporter probes {bb_ok:.0} (failed {bb_failed:.0})  CPU {bb_cpu:.2} s  = {bb_per_k:.3} CPU-s per 1,000 probes  RSS {bb_rss:.1} MiB"
    );
    println!(
        "  ratio watchpost / blackbox_exporter = {:.3} (target ≤ 0.35)",
        wp_per_k / bb_per_k
    );
    println!(
        "  watchpost db+wal {:.1} MB; load average {}",
        db_bytes as f64 / 1e6,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
