//! The real `watchpost` binary: exit codes (Nagios convention for `check`), the
//! `file:line:col: message` lines of `validate`, the `check --json` line shape, the daemon's
//! clean SIGTERM drain into SQLite, `report --json`, and `demo`.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::Command;

use common::http::{http_probe, HttpServer, Reply, TestConfig, MAIN_TOML};

fn watchpost() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_watchpost"));
    c.env_remove("WATCHPOST_CONFIG")
        .env_remove("WATCHPOST_LOG")
        .kill_on_drop(true);
    c
}

/// Run `watchpost -c <config> args…` to completion (bounded, so a hang fails the test).
async fn wp(config: &Path, args: &[&str]) -> Output {
    let mut c = watchpost();
    c.arg("-c").arg(config).args(args);
    tokio::time::timeout(Duration::from_secs(20), c.output())
        .await
        .unwrap_or_else(|_| panic!("watchpost {args:?} did not finish within 20s"))
        .expect("spawn watchpost")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A server with `/up`, `/degraded` and `/down` health endpoints.
async fn health_server() -> HttpServer {
    HttpServer::start(|r| match r.path.as_str() {
        "/up" => Reply::json(200, r#"{"status":"ok"}"#),
        "/degraded" => Reply::json(200, r#"{"status":"degraded"}"#),
        _ => Reply::json(503, r#"{"status":"down","error":"db timeout"}"#),
    })
    .await
}

/// A config with probes `up`, `degraded` and `down` against `srv`.
fn three_probes(srv: &HttpServer) -> TestConfig {
    let t = TestConfig::with_probe("up.toml", &http_probe("up", &srv.url("/up"), ""));
    t.write(
        "probes/degraded.toml",
        &http_probe("degraded", &srv.url("/degraded"), ""),
    );
    t.write(
        "probes/down.toml",
        &http_probe("down", &srv.url("/down"), ""),
    );
    t
}

// ---------------------------------------------------------------------------------------
// validate
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn validate_good_config_exits_0() {
    let t = TestConfig::with_probe(
        "api.toml",
        &http_probe("api", "http://127.0.0.1:1/health", ""),
    );
    let o = wp(&t.main_path(), &["validate"]).await;
    assert_eq!(code(&o), 0, "stderr: {}", stderr(&o));
    assert!(
        stdout(&o).contains("ok (1 probes, 1 enabled"),
        "stdout: {}",
        stdout(&o)
    );
}

#[tokio::test]
async fn validate_bad_config_exits_3_with_file_line_col_lines() {
    let t = TestConfig::with_probe(
        "a.toml",
        &http_probe("a", "http://127.0.0.1:1/", "interval = \"500ms\""),
    );
    let b = t.write("probes/b.toml", "name = \"b\"\nkind = \"gopher\"\n");
    let a = t.path("probes/a.toml");
    let o = wp(&t.main_path(), &["validate"]).await;
    assert_eq!(code(&o), 3, "stderr: {}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("{}:4:12: interval 500ms is below the 1s floor", a.display()).as_str(),
            format!(
                "{}:2:8: unknown probe kind \"gopher\" (expected http, websocket, listen)",
                b.display()
            )
            .as_str(),
            "2 configuration error(s)",
        ]
    );
    assert_eq!(stdout(&o), "");
}

#[tokio::test]
async fn validate_missing_config_exits_3() {
    let t = TestConfig::empty();
    let o = wp(&t.main_path(), &["validate"]).await;
    assert_eq!(code(&o), 3);
    let want = format!("{}: cannot read config file", t.main_path().display());
    assert!(stderr(&o).starts_with(&want), "stderr: {}", stderr(&o));
    assert!(
        stderr(&o).contains("WATCHPOST_CONFIG"),
        "stderr: {}",
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exit_codes_follow_nagios() {
    let srv = health_server().await;
    let t = three_probes(&srv);
    let cfg = t.main_path();
    for (args, want) in [
        (vec!["check", "up"], 0),
        (vec!["check", "degraded"], 1),
        (vec!["check", "up", "degraded"], 1),
        (vec!["check", "down"], 2),
        (vec!["check"], 2),
    ] {
        let o = wp(&cfg, &args).await;
        assert_eq!(
            code(&o),
            want,
            "{args:?}\nstdout: {}\nstderr: {}",
            stdout(&o),
            stderr(&o)
        );
    }
    // The human lines name the probe, its outcome and, when bad, the class and sentence.
    let o = wp(&cfg, &["check", "down"]).await;
    let out = stdout(&o);
    assert!(
        out.starts_with("down ") && out.contains("[http_status]") && out.contains("db timeout"),
        "{out}"
    );

    // 3: an unknown probe name, a bad flag, a bad config.
    let o = wp(&cfg, &["check", "nope"]).await;
    assert_eq!(code(&o), 3);
    assert!(
        stderr(&o).contains("unknown probe \"nope\""),
        "stderr: {}",
        stderr(&o)
    );
    let o = wp(&cfg, &["check", "--bogus"]).await;
    assert_eq!(code(&o), 3, "stderr: {}", stderr(&o));
    t.write(
        "probes/broken.toml",
        "name = \"broken\"\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\ntimeout = \"x\"\n",
    );
    let o = wp(&cfg, &["check", "up"]).await;
    assert_eq!(code(&o), 3);
    assert!(
        stderr(&o).contains("broken.toml:4:11: invalid duration"),
        "stderr: {}",
        stderr(&o)
    );
    assert_eq!(
        srv.requests().iter().filter(|r| r.path == "/up").count(),
        3,
        "a bad config runs nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_json_prints_one_object_per_probe_per_line() {
    let srv = health_server().await;
    let t = three_probes(&srv);
    let o = wp(&t.main_path(), &["check", "--json"]).await;
    assert_eq!(code(&o), 2, "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    let keys = [
        "details",
        "duration_ms",
        "error",
        "kind",
        "outcome",
        "phases",
        "probe",
        "started_at",
    ];
    for l in &lines {
        let mut got: Vec<&str> = l
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        got.sort();
        assert_eq!(got, keys, "{l}");
        assert_eq!(l["kind"], "http");
        assert!(l["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{l}");
        assert!(
            l["phases"]["ttfb"].is_number() && l["phases"]["total"].is_number(),
            "{l}"
        );
        let at = l["started_at"].as_str().expect("started_at");
        chrono::DateTime::parse_from_rfc3339(at)
            .unwrap_or_else(|e| panic!("started_at {at:?}: {e}"));
        assert!(l["details"]["status"].as_u64().is_some(), "{l}");
    }
    let by_name = |n: &str| {
        lines
            .iter()
            .find(|l| l["probe"] == n)
            .unwrap_or_else(|| panic!("no line for {n}"))
    };
    assert_eq!(by_name("up")["outcome"], "up");
    assert_eq!(by_name("up")["error"], Value::Null);
    assert_eq!(by_name("degraded")["outcome"], "degraded");
    assert_eq!(by_name("degraded")["error"]["class"], "degraded");
    let down = by_name("down");
    assert_eq!(down["outcome"], "down");
    assert_eq!(down["error"]["class"], "http_status");
    assert!(
        down["error"]["message"]
            .as_str()
            .unwrap()
            .contains("db timeout"),
        "{down}"
    );
}

// ---------------------------------------------------------------------------------------
// run + report
// ---------------------------------------------------------------------------------------

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_drains_on_sigterm_and_report_shows_percentiles() {
    // A target with a fixed delay: the report's p50 is that delay.
    let delay = Duration::from_millis(150);
    let srv = HttpServer::start(move |_| {
        Reply::json(
            200,
            r#"{"status":"ok","checks":{"database":{"status":"ok","latency_ms":7},"cache":"ok"}}"#,
        )
        .delayed(delay)
    })
    .await;
    let api = format!("127.0.0.1:{}", free_port());
    let t = TestConfig::empty();
    t.write(
        "watchpost.toml",
        &MAIN_TOML.replace("listen = \"\"", &format!("listen = \"{api}\"")),
    );
    // "alpha" on a 1s interval starts 115ms into each second (stable phase offset).
    t.write(
        "probes/alpha.toml",
        &http_probe("alpha", &srv.url("/health"), "subchecks = \"checks\""),
    );

    let child = watchpost()
        .arg("-c")
        .arg(t.main_path())
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watchpost run");
    let pid = child.id().expect("pid");

    // Wait for a few runs, and for the API to say so.
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = reqwest::Client::new();
    let metrics = loop {
        assert!(
            Instant::now() < deadline,
            "no runs within 10s (server saw {})",
            srv.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        if srv.requests().len() < 3 {
            continue;
        }
        if let Ok(r) = client.get(format!("http://{api}/metrics")).send().await {
            let text = r.text().await.unwrap_or_default();
            if text.contains("watchpost_runs_total") {
                break text;
            }
        }
    };
    assert!(metrics.contains(r#"probe="alpha""#), "{metrics}");

    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let t0 = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("exits within the 2s grace (+ slack)")
        .expect("wait");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "log:\n{log}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "drain took {:?}",
        t0.elapsed()
    );
    assert!(log.contains("stopped cleanly"), "log:\n{log}");

    // Every run the server answered is in the database.
    let db = t.path("data/watchpost.db");
    let conn = rusqlite::Connection::open(&db).expect("open db");
    let (runs, up): (i64, i64) = conn
        .query_row(
            "SELECT count(*), sum(outcome = 0) FROM runs WHERE series = (SELECT id FROM series WHERE name = 'alpha')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("query runs");
    assert!(runs >= 3, "runs in db: {runs}");
    assert_eq!(runs, up);
    assert_eq!(
        runs as usize,
        srv.requests().len(),
        "every answered run was stored"
    );
    drop(conn);

    let o = wp(&t.main_path(), &["report", "--json", "--window", "1h"]).await;
    assert_eq!(code(&o), 0, "stderr: {}", stderr(&o));
    let report: Value = serde_json::from_str(&stdout(&o)).expect("report is JSON");
    let rows = report["rows"].as_array().expect("rows");
    let row = |series: &str, phase: &str| {
        rows.iter()
            .find(|r| r["series"] == series && r["phase"] == phase)
            .unwrap_or_else(|| panic!("no row {series}/{phase} in {report:#}"))
    };
    for phase in ["ttfb", "total"] {
        let r = row("alpha", phase);
        assert_eq!(r["runs"].as_i64(), Some(runs), "{r}");
        assert_eq!(r["availability_pct"].as_f64(), Some(100.0), "{r}");
        let (p50, p95) = (
            r["p50_ms"].as_f64().expect("p50"),
            r["p95_ms"].as_f64().expect("p95"),
        );
        assert!(p50 > 0.0 && p50 <= p95, "{r}");
        // The server waits 150 ms before its first byte; loopback adds little (the upper
        // bound leaves a loaded machine room).
        assert!((149.5..400.0).contains(&p50), "p50 of {phase}: {r}");
    }
    // The sub-check's own latency is its own series.
    let sub = rows
        .iter()
        .find(|r| r["series"] == "alpha/checks.database")
        .unwrap_or_else(|| panic!("no sub-check row in {report:#}"));
    let p50 = sub["p50_ms"].as_f64().expect("sub-check p50");
    assert!((6.9..=7.1).contains(&p50), "{sub}");
}

// ---------------------------------------------------------------------------------------
// demo
// ---------------------------------------------------------------------------------------

async fn demo(dir: &Path, for_: &str) -> (Output, Duration) {
    let t0 = Instant::now();
    let mut c = watchpost();
    c.args(["demo", "--for", for_, "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir);
    let o = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .expect("demo stops by itself")
        .expect("spawn demo");
    (o, t0.elapsed())
}

async fn demo_report_series(dir: &Path) -> Vec<String> {
    let o = wp(
        &dir.join("watchpost.toml"),
        &["report", "--json", "--window", "1h"],
    )
    .await;
    assert_eq!(code(&o), 0, "stderr: {}", stderr(&o));
    let report: Value = serde_json::from_str(&stdout(&o)).expect("report is JSON");
    let mut series: Vec<String> = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["series"].as_str())
        .filter(|s| !s.contains('/'))
        .map(str::to_string)
        .collect();
    // Rows come worst regression first; the series are compared as a set.
    series.sort();
    series.dedup();
    series
}

#[tokio::test]
async fn demo_for_3s_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let (o, took) = demo(dir.path(), "3s").await;
    assert_eq!(code(&o), 0, "stderr: {}", stderr(&o));
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(stdout(&o).contains("watchpost demo"), "{}", stdout(&o));
    assert!(dir.path().join("watchpost.toml").exists());
    assert!(dir.path().join("data/watchpost.db").exists());

    // The exit hint is a command that works as printed.
    let out = stdout(&o);
    let hint = out
        .split_once("(try: ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(cmd, _)| cmd.to_string())
        .unwrap_or_else(|| panic!("no hint in {out}"));
    let words: Vec<&str> = hint.split_whitespace().collect();
    let o = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(words[0])
            .args(&words[1..])
            .env_remove("WATCHPOST_CONFIG")
            .output(),
    )
    .await
    .expect("finishes")
    .expect("the hint's program exists");
    assert_eq!(code(&o), 0, "{hint}: {}", stderr(&o));
    assert!(stdout(&o).contains("steady"), "{hint}: {}", stdout(&o));
}

#[tokio::test]
async fn demo_for_3s_reports_the_three_demo_http_probes() {
    let dir = tempfile::tempdir().unwrap();
    let (o, _) = demo(dir.path(), "3s").await;
    assert_eq!(code(&o), 0, "stderr: {}", stderr(&o));
    let series = demo_report_series(dir.path()).await;
    for s in ["cycling", "slow", "steady"] {
        assert!(series.iter().any(|x| x == s), "{s} missing from {series:?}");
    }
}

#[tokio::test]
async fn demo_reports_the_three_demo_probes_after_their_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    // The listen probe streams 2.25 s of speech after a 600 ms offset.
    let (o, _) = demo(dir.path(), "7s").await;
    assert_eq!(code(&o), 0, "stderr: {}", stderr(&o));
    assert_eq!(
        demo_report_series(dir.path()).await,
        ["cycling", "listen-demo", "slow", "steady"]
    );
    let o = wp(
        &dir.path().join("watchpost.toml"),
        &["report", "--window", "1h"],
    )
    .await;
    let table = stdout(&o);
    for s in ["steady", "cycling", "slow", "steady/checks.database"] {
        assert!(table.contains(s), "table lacks {s}:\n{table}");
    }
}
