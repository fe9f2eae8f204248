//! `/metrics` as Prometheus tooling sees it, from the real binary: `promtool check metrics`
//! on a real scrape passes with no warning; a real Prometheus (Debian `prometheus`) scrapes
//! the agent and answers a `histogram_quantile` query; the README's metric list is what the
//! agent declares and exposes, in both directions.

#[path = "common/agent.rs"]
mod agent;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent::{rich_config, start_json, Peers};

const PROMTOOL: &str = "/usr/bin/promtool";
const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A tool the suite needs: its absence fails the test with what to install.
fn tool(path: &str) -> &str {
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: apt-get install -y prometheus (or run .ci/run, which installs it)"
    );
    path
}

/// `# TYPE name kind` lines of a scrape.
fn types(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_string(), k.to_string()))
        .collect()
}

/// The value of the one series of `name` whose line contains every `labels` part.
fn value(scrape: &str, name: &str, labels: &[&str]) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The README's metric table: name → (type, labels).
fn readme_metrics() -> BTreeMap<String, (String, Vec<String>)> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("### Metrics (`GET /metrics`)")
        .expect("README has a \"### Metrics (`GET /metrics`)\" section");
    let section = &readme[start..];
    let section = &section[..section[4..].find("\n#").map_or(section.len(), |i| i + 4)];
    let mut out = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert!(cells.len() >= 4, "README metric row: {row}");
        let name = cells[0].trim_matches('`').to_string();
        let labels = cells[2]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_string())
            .filter(|l| !l.is_empty())
            .collect();
        let dup = out.insert(name.clone(), (cells[1].to_string(), labels));
        assert!(dup.is_none(), "{name} listed twice in the README");
    }
    assert!(out.len() > 10, "README metric table not found or too short");
    out
}

/// Both directions between the README and the families the agent declares (every family
/// goes through `Metrics::new`, which records it): name, type and labels.
#[test]
fn the_readme_metric_list_is_what_the_agent_declares() {
    let readme = readme_metrics();
    let declared: BTreeMap<String, (String, Vec<String>)> = watchpost::metrics::Metrics::new()
        .catalog()
        .into_iter()
        .map(|f| (f.name, (f.kind.to_string(), f.labels)))
        .collect();
    let missing: Vec<&String> = declared
        .keys()
        .filter(|n| !readme.contains_key(*n))
        .collect();
    let stale: Vec<&String> = readme
        .keys()
        .filter(|n| !declared.contains_key(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "exported but not in the README: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "in the README but not exported: {stale:?}"
    );
    for (name, want) in &declared {
        assert_eq!(&readme[name], want, "README row of {name} (type, labels)");
    }
}

/// A real scrape of a busy agent: promtool finds nothing to say; every family in it is in
/// the README with its type; the new families carry believable values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_scrape_passes_promtool_and_matches_the_readme() {
    let promtool = tool(PROMTOOL);
    let peers = Peers::start().await;
    let t = rich_config(&peers);
    let mut a = start_json(&t, &[]);
    let scrape = a
        .metrics_when(Duration::from_secs(20), |m| {
            [
                r#"watchpost_probe_cert_expiry_timestamp_seconds{probe="tls"}"#,
                r#"watchpost_notifications_total{notifier="hook",result="delivered"}"#,
                r#"watchpost_notifications_total{notifier="busy",result="retry"}"#,
                r#"watchpost_probe_duration_seconds_count{phase="total",probe="api"}"#,
            ]
            .iter()
            .all(|s| m.contains(s))
        })
        .await;

    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("write the scrape to promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics ({:?}):\n{said}\nscrape:\n{scrape}",
        out.status
    );

    let readme = readme_metrics();
    for (name, kind) in types(&scrape) {
        let row = readme
            .get(&name)
            .unwrap_or_else(|| panic!("{name} is exposed but not in the README"));
        assert_eq!(row.0, kind, "README type of {name}");
    }

    let now = chrono::Utc::now().timestamp() as f64;
    let v = |name, labels: &[&str]| {
        value(&scrape, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{scrape}"))
    };
    // The test certificate ends 30 days from today (at midnight UTC).
    let expiry = v(
        "watchpost_probe_cert_expiry_timestamp_seconds",
        &[r#"probe="tls""#],
    );
    let days = (expiry - now) / 86400.0;
    assert!((29.0..=30.0).contains(&days), "cert expires in {days} days");
    let last = v(
        "watchpost_probe_last_run_timestamp_seconds",
        &[r#"probe="api""#],
    );
    assert!(
        (now - 30.0..=now + 1.0).contains(&last),
        "last run {last} vs now {now}"
    );
    assert_eq!(v("watchpost_probe_up", &[r#"probe="broken""#]), 0.0);
    assert_eq!(v("watchpost_probe_up", &[r#"probe="api""#]), 1.0);
    assert_eq!(
        v(
            "watchpost_build_info",
            &[&format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(v("process_open_fds", &[]) > 3.0);
    assert!(v("process_resident_memory_bytes", &[]) > 1e6);
    let started = v("process_start_time_seconds", &[]);
    assert!(
        (now - 60.0..=now).contains(&started),
        "start {started} vs now {now}"
    );
    // The lag histogram resolves the millisecond range (no single first 5 ms bucket).
    assert!(
        scrape.contains(r#"watchpost_schedule_lag_seconds_bucket{le="0.001"}"#),
        "{scrape}"
    );
    let (status, _) = a.stop().await;
    assert!(status.success(), "exit {status:?}");
}

/// A Prometheus of its own (temp storage, a free port, 1 s scrapes) scrapes the agent; its
/// query API then answers the median probe duration from our histogram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_agent_and_answers_histogram_quantile() {
    let prometheus = tool(PROMETHEUS);
    let peers = Peers::start().await;
    let t = rich_config(&peers);
    let mut a = start_json(&t, &[]);
    let agent_addr = a.api().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: watchpost\n    static_configs:\n      - targets: ['{agent_addr}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let (bin, data) = (prometheus.to_string(), dir.path().to_path_buf());
    let (server, prom) = tokio::task::spawn_blocking(move || start_prometheus(&bin, &cfg, &data))
        .await
        .expect("start prometheus");
    let mut server = Reaped(server);
    let client = reqwest::Client::new();
    // Median total duration of the `api` probe (20 ms of server time per request).
    let query = "histogram_quantile(0.5, sum by (le) \
                 (rate(watchpost_probe_duration_seconds_bucket{probe=\"api\",phase=\"total\"}[5s])))";
    let deadline = Instant::now() + Duration::from_secs(20);
    let (median, up) = loop {
        if let Some(code) = server.0.try_wait().ok().flatten() {
            panic!("prometheus exited with {code}");
        }
        let median = instant_query(&client, &prom, query).await;
        let up = instant_query(&client, &prom, "up{job=\"watchpost\"}").await;
        if let (Some(m), Some(u)) = (median, up) {
            if m.is_finite() {
                break (m, u);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no quantile from Prometheus within 20 s (last: {median:?}, up {up:?})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    drop(server);
    assert_eq!(up, 1.0, "Prometheus scraped the agent without error");
    assert!(
        (0.01..=0.5).contains(&median),
        "median of a 20 ms endpoint: {median} s"
    );
    let (status, _) = a.stop().await;
    assert!(status.success(), "exit {status:?}");
}

/// A child process killed and reaped when dropped (also when the test fails).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The single value of an instant query's vector result, if it has exactly one.
async fn instant_query(client: &reqwest::Client, base: &str, q: &str) -> Option<f64> {
    let r = client
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q)])
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    let result = v["data"]["result"].as_array()?;
    match result.as_slice() {
        [one] => one["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

/// Start Prometheus on a free port (retrying when the port was taken meanwhile) and wait
/// until it is ready; returns the child and its base URL.
fn start_prometheus(
    bin: &str,
    cfg: &std::path::Path,
    dir: &std::path::Path,
) -> (std::process::Child, String) {
    for attempt in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let data = dir.join(format!("data{attempt}"));
        let mut child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if child.try_wait().ok().flatten().is_some() {
                break; // The port was taken: try another.
            }
            let ready = std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                    s.write_all(b"GET /-/ready HTTP/1.0\r\n\r\n").ok()?;
                    let mut buf = String::new();
                    std::io::Read::read_to_string(&mut s, &mut buf).ok()?;
                    Some(buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200"))
                })
                .unwrap_or(false);
            if ready {
                return (child, base);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("prometheus not ready within 15 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("prometheus could not bind a port in 3 attempts");
}

#[test]
fn the_scrape_helpers_read_what_they_should() {
    let s = "# TYPE a_total counter\na_total{x=\"1\"} 2\na_totally 9\n# TYPE b gauge\nb 3\n";
    assert_eq!(value(s, "a_total", &["x=\"1\""]), Some(2.0));
    assert_eq!(value(s, "b", &[]), Some(3.0));
    assert_eq!(value(s, "c", &[]), None);
    let t = types(s);
    assert_eq!(t["a_total"], "counter");
    assert_eq!(t.keys().collect::<BTreeSet<_>>().len(), 2);
}
