//! The gate every attempt passes (the concurrency cap and the per-host rate limit), as the
//! scheduler and `watchpost check` use it: a confirmation retry holds no permit while it
//! waits and passes the rate limit again; `check` honours the rate limit.

mod common;

use std::time::{Duration, Instant};

use common::http::{http_probe, refused_addr, HttpServer, TestConfig};
use watchpost::probe::Outcome;

fn config(agent: &str, probes: &[(&str, String)]) -> TestConfig {
    let t = TestConfig::empty();
    t.write(
        "watchpost.toml",
        &format!(
            "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n{agent}\n\n\
             [defaults]\ninterval = \"10s\"\ntimeout = \"1s\"\nretries = 0\nretry_delay = \"50ms\"\njitter = \"0s\"\n"
        ),
    );
    for (name, toml) in probes {
        t.write(&format!("probes/{name}.toml"), toml);
    }
    t
}

// current_thread: spawned runs start in order, so probe `a` takes the only permit first.
#[tokio::test]
async fn a_confirmation_retry_holds_no_permit_while_it_waits() {
    let srv = HttpServer::json(200, r#"{"status":"ok"}"#).await;
    let down = format!("http://{}/health", refused_addr());
    let t = config(
        "max_concurrency = 1\nhost_rate_limit = 0",
        &[
            (
                "a",
                http_probe("a", &down, "retries = 2\nretry_delay = \"1s\""),
            ),
            ("b", http_probe("b", &srv.url("/health"), "")),
        ],
    );
    let c = t.load_ok();
    let names = ["a".to_string(), "b".to_string()];
    let r = watchpost::check::run_probes(&c, &names).await.unwrap();
    assert_eq!(r[0].outcome, Outcome::Down);
    assert_eq!(r[1].outcome, Outcome::Up);
    let gap = (r[1].started_at - r[0].started_at).num_milliseconds();
    assert!(
        gap < 900,
        "b started {gap} ms after a: a's retries held the only permit"
    );
}

#[tokio::test]
async fn check_and_retries_pass_the_per_host_rate_limit() {
    let srv = HttpServer::json(200, r#"{"status":"ok"}"#).await;
    let probes: Vec<(&str, String)> = ["a", "b", "c"]
        .iter()
        .map(|n| (*n, http_probe(n, &srv.url("/health"), "")))
        .collect();
    let t = config("host_rate_limit = 1", &probes);
    let c = t.load_ok();
    let t0 = Instant::now();
    let r = watchpost::check::run_probes(&c, &[]).await.unwrap();
    assert!(r.iter().all(|r| r.outcome == Outcome::Up));
    assert!(
        t0.elapsed() >= Duration::from_millis(1900),
        "3 runs against one host at 1/s took {:?}",
        t0.elapsed()
    );

    // A run's confirmation retries (50 ms apart) wait for the host's turn too.
    let down = format!("http://{}/health", refused_addr());
    let t = config(
        "host_rate_limit = 1",
        &[("d", http_probe("d", &down, "retries = 2"))],
    );
    let c = t.load_ok();
    let t0 = Instant::now();
    let r = watchpost::check::run_probes(&c, &[]).await.unwrap();
    assert_eq!(r[0].outcome, Outcome::Down);
    assert_eq!(r[0].details["attempts"].as_array().map(Vec::len), Some(3));
    assert!(
        t0.elapsed() >= Duration::from_millis(1900),
        "3 attempts at 1/s took {:?}",
        t0.elapsed()
    );
}
