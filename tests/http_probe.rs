//! The HTTP probe against real servers on 127.0.0.1: every outcome with its error class and
//! a sentence a human can act on, the health shapes seen in the wild, assertions, budgets,
//! confirmation retries, the request the agent sends, redirects and TLS.
//!
//! Probes come from probe files read by the real loader and run through
//! `Probe::build` + `run_confirmed`, exactly as `watchpost check` runs them.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use common::http::{
    class, head, http_probe, message, refused_addr, run_loaded, run_probe, self_signed, HttpServer,
    Reply, TestConfig, TlsServer,
};
use watchpost::probe::{Outcome, RunResult};

fn assert_outcome(r: &RunResult, outcome: Outcome, class_: &str) {
    assert_eq!(
        (r.outcome, class(r)),
        (outcome, class_),
        "unexpected outcome/class; error: {:?}, details: {:?}",
        r.error,
        r.details
    );
}

fn assert_message_contains(r: &RunResult, parts: &[&str]) {
    let m = message(r);
    for p in parts {
        assert!(m.contains(p), "message {m:?} should contain {p:?}");
    }
}

fn phase(r: &RunResult, name: &str) -> Option<Duration> {
    r.phases.iter().find(|(n, _)| n == name).map(|(_, d)| *d)
}

// ---------------------------------------------------------------------------------------
// Outcomes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn status_ok_body_is_up_with_phases() {
    let srv = HttpServer::json(200, r#"{"status":"ok"}"#).await;
    let r = run_probe(&http_probe("ok", &srv.url("/health"), "")).await;
    assert_outcome(&r, Outcome::Up, "");
    assert_eq!(r.probe, "ok");
    assert_eq!(r.kind, "http");
    assert_eq!(r.details["status"], 200);
    let (ttfb, total) = (
        phase(&r, "ttfb").expect("ttfb"),
        phase(&r, "total").expect("total"),
    );
    assert!(ttfb <= total, "ttfb {ttfb:?} > total {total:?}");
    assert!(
        r.details.get("attempts").is_none(),
        "a single attempt keeps no attempt log"
    );
}

#[tokio::test]
async fn degraded_body_is_degraded() {
    let srv = HttpServer::json(200, r#"{"status":"degraded"}"#).await;
    let r = run_probe(&http_probe("degr", &srv.url("/health"), "")).await;
    assert_outcome(&r, Outcome::Degraded, "degraded");
    assert_message_contains(&r, &["degraded"]);
}

#[tokio::test]
async fn http_207_is_degraded() {
    let srv = HttpServer::json(207, r#"{"status":"ok"}"#).await;
    let r = run_probe(&http_probe("multi", &srv.url("/health"), "")).await;
    assert_outcome(&r, Outcome::Degraded, "degraded");
    assert_message_contains(&r, &["207"]);
}

#[tokio::test]
async fn http_503_with_down_body_carries_the_error_text() {
    let srv = HttpServer::json(503, r#"{"status":"down","error":"db timeout"}"#).await;
    let r = run_probe(&http_probe("down", &srv.url("/health"), "")).await;
    assert_outcome(&r, Outcome::Down, "http_status");
    assert_message_contains(&r, &["503", "db timeout"]);
    assert_eq!(r.details["status"], 503);
}

#[tokio::test]
async fn status_down_with_200_is_unhealthy() {
    let srv = HttpServer::json(200, r#"{"status":"down","error":"replica lag"}"#).await;
    let r = run_probe(&http_probe("down200", &srv.url("/health"), "")).await;
    assert_outcome(&r, Outcome::Down, "unhealthy");
    assert_message_contains(&r, &["\"down\"", "replica lag"]);
}

#[tokio::test]
async fn read_status_false_ignores_the_body_word() {
    let srv = HttpServer::json(200, r#"{"status":"down"}"#).await;
    let r = run_probe(&http_probe(
        "nostatus",
        &srv.url("/health"),
        "read_status = false",
    ))
    .await;
    assert_outcome(&r, Outcome::Up, "");
}

#[tokio::test]
async fn slow_server_times_out_close_to_the_timeout() {
    let srv = HttpServer::start(|_| {
        Reply::json(200, r#"{"status":"ok"}"#).delayed(Duration::from_secs(5))
    })
    .await;
    let t0 = Instant::now();
    let r = run_probe(&http_probe(
        "slow",
        &srv.url("/health"),
        "timeout = \"300ms\"",
    ))
    .await;
    let took = t0.elapsed();
    assert_outcome(&r, Outcome::Down, "timeout");
    assert_message_contains(&r, &["300ms"]);
    assert!(
        took < Duration::from_millis(1000),
        "a 300ms timeout took {took:?}"
    );
    assert!(
        took >= Duration::from_millis(290),
        "gave up early: {took:?}"
    );
}

#[tokio::test]
async fn connection_refused() {
    let addr = refused_addr();
    let r = run_probe(&http_probe("refused", &format!("http://{addr}/health"), "")).await;
    assert_outcome(&r, Outcome::Down, "connect_refused");
    assert_message_contains(&r, &["refused"]);
}

#[tokio::test]
async fn reset_mid_body() {
    let srv = HttpServer::start(|_| {
        Reply::raw(|mut s| async move {
            let h = head(
                200,
                &[
                    ("Content-Type", "application/json"),
                    ("Content-Length", "1000"),
                ],
            );
            let _ = s.write_all(h.as_bytes()).await;
            let _ = s.write_all(br#"{"status":"#).await;
            let _ = s.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = s.set_zero_linger(); // close with RST, not FIN
            drop(s);
        })
    })
    .await;
    let t0 = Instant::now();
    let r = run_probe(&http_probe("reset", &srv.url("/health"), "")).await;
    assert!(
        matches!(class(&r), "connection_reset" | "connection_closed"),
        "class {:?} ({})",
        class(&r),
        message(&r)
    );
    assert_eq!(r.outcome, Outcome::Down);
    assert_message_contains(&r, &["HTTP 200", "body"]);
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "a reset must not wait for the timeout"
    );
}

#[tokio::test]
async fn closed_mid_body_is_connection_closed() {
    let srv = HttpServer::start(|_| {
        Reply::raw(|mut s| async move {
            let h = head(
                200,
                &[
                    ("Content-Type", "application/json"),
                    ("Content-Length", "1000"),
                ],
            );
            let _ = s.write_all(h.as_bytes()).await;
            let _ = s.write_all(br#"{"status":"#).await;
            let _ = s.shutdown().await; // FIN after 10 of 1000 bytes
        })
    })
    .await;
    let r = run_probe(&http_probe("closed", &srv.url("/health"), "")).await;
    assert_outcome(&r, Outcome::Down, "connection_closed");
    assert_message_contains(&r, &["HTTP 200", "closed the connection"]);
}

#[tokio::test]
async fn invalid_json_with_json_content_type() {
    let srv = HttpServer::json(200, r#"{"status": "ok", "checks": "#).await;
    let r = run_probe(&http_probe("badjson", &srv.url("/health"), "")).await;
    assert_outcome(&r, Outcome::Down, "invalid_json");
    assert_message_contains(&r, &["not valid JSON", "{\"status\": \"ok\""]);
}

#[tokio::test]
async fn oversized_body_with_content_length() {
    let big = format!(r#"{{"status":"ok","pad":"{}"}}"#, "x".repeat(5000));
    let srv = HttpServer::start(move |_| Reply::json(200, &big)).await;
    let r = run_probe(&http_probe(
        "big",
        &srv.url("/health"),
        "max_body_bytes = 1000",
    ))
    .await;
    assert_outcome(&r, Outcome::Down, "body_too_large");
    assert_message_contains(&r, &["1000 byte cap"]);
}

#[tokio::test]
async fn oversized_chunked_body_without_length() {
    let srv = HttpServer::start(|_| {
        Reply::raw(|mut s| async move {
            let h = head(
                200,
                &[
                    ("Content-Type", "application/json"),
                    ("Transfer-Encoding", "chunked"),
                ],
            );
            if s.write_all(h.as_bytes()).await.is_err() {
                return;
            }
            let chunk = format!("400\r\n{}\r\n", "x".repeat(1024));
            for _ in 0..64 {
                if s.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
            }
            let _ = s.write_all(b"0\r\n\r\n").await;
        })
    })
    .await;
    let r = run_probe(&http_probe(
        "chunked",
        &srv.url("/health"),
        "max_body_bytes = 4096",
    ))
    .await;
    assert_outcome(&r, Outcome::Down, "body_too_large");
    assert_message_contains(&r, &["4096 byte cap"]);
}

#[tokio::test]
async fn trickling_body_times_out() {
    let srv = HttpServer::start(|_| {
        Reply::raw(|mut s| async move {
            let h = head(
                200,
                &[
                    ("Content-Type", "application/json"),
                    ("Content-Length", "100"),
                ],
            );
            if s.write_all(h.as_bytes()).await.is_err() {
                return;
            }
            for _ in 0..100 {
                if s.write_all(b" ").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    })
    .await;
    let t0 = Instant::now();
    let r = run_probe(&http_probe(
        "trickle",
        &srv.url("/health"),
        "timeout = \"500ms\"",
    ))
    .await;
    let took = t0.elapsed();
    assert_outcome(&r, Outcome::Down, "timeout");
    assert_message_contains(&r, &["500ms"]);
    assert!(
        phase(&r, "ttfb").is_some(),
        "headers arrived, so ttfb is known"
    );
    assert!(
        took < Duration::from_millis(1300),
        "a 500ms timeout took {took:?}"
    );
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn self_signed_tls_without_ca_file_is_tls_error() {
    let cert = self_signed(None);
    let srv = TlsServer::start(&cert, 200, r#"{"status":"ok"}"#);
    let r = run_probe(&http_probe("tls", &srv.url("/health"), "")).await;
    assert_outcome(&r, Outcome::Down, "tls");
    assert!(
        message(&r).to_ascii_lowercase().contains("certificate"),
        "message: {}",
        message(&r)
    );
}

#[tokio::test]
async fn self_signed_tls_with_ca_file_is_up_and_records_days_left() {
    let cert = self_signed(None);
    let srv = TlsServer::start(&cert, 200, r#"{"status":"ok"}"#);
    let t = TestConfig::with_probe(
        "p.toml",
        &http_probe("tls-ca", &srv.url("/health"), "ca_file = \"ca.pem\""),
    );
    t.write("probes/ca.pem", &cert.cert_pem);
    let r = run_loaded(&t).await;
    assert_outcome(&r, Outcome::Up, "");
    let days = r.details["cert_days_left"]
        .as_i64()
        .expect("cert_days_left");
    assert!(
        days > 365,
        "rcgen's default certificate lives for centuries, got {days}"
    );
}

#[tokio::test]
async fn certificate_expiring_soon_violates_cert_min_days() {
    let cert = self_signed(Some(10));
    let srv = TlsServer::start(&cert, 200, r#"{"status":"ok"}"#);
    let extra = "ca_file = \"ca.pem\"\n[expect]\ncert_min_days = 14";
    let t = TestConfig::with_probe("p.toml", &http_probe("tls-exp", &srv.url("/health"), extra));
    t.write("probes/ca.pem", &cert.cert_pem);
    let r = run_loaded(&t).await;
    assert_outcome(&r, Outcome::Down, "cert_expiry");
    let days = r.details["cert_days_left"]
        .as_i64()
        .expect("cert_days_left");
    assert!((9..=10).contains(&days), "days left {days}");
    assert_message_contains(&r, &[&format!("expires in {days} days"), "minimum 14"]);
}

// ---------------------------------------------------------------------------------------
// Health shapes seen in the wild
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn aggregate_shape_200_207_503() {
    let srv = HttpServer::start(|r| {
        let body = r#"[{"service":"api","healthy":true},{"service":"stt","healthy":false}]"#;
        match r.path.as_str() {
            "/200" => Reply::json(200, body),
            "/207" => Reply::json(207, body),
            _ => Reply::json(503, body),
        }
    })
    .await;
    let r = run_probe(&http_probe("agg", &srv.url("/200"), "")).await;
    assert_outcome(&r, Outcome::Up, "");
    let r = run_probe(&http_probe("agg", &srv.url("/207"), "")).await;
    assert_outcome(&r, Outcome::Degraded, "degraded");
    assert_message_contains(&r, &["207"]);
    let r = run_probe(&http_probe("agg", &srv.url("/503"), "")).await;
    assert_outcome(&r, Outcome::Down, "http_status");
    assert_message_contains(&r, &["503"]);
}

#[tokio::test]
async fn checks_object_shape_becomes_subcheck_series() {
    let srv = HttpServer::start(|r| match r.path.as_str() {
        "/ok" => Reply::json(
            200,
            r#"{"status":"ok","service":"api","checks":{"database":{"status":"ok","latency_ms":12},"transcription":{"status":"ok","latency_ms":35.5}}}"#,
        ),
        "/degraded" => Reply::json(
            200,
            r#"{"status":"degraded","checks":{"database":{"status":"ok","latency_ms":12},"transcription":{"status":"fail","error":"upstream 503"}}}"#,
        ),
        _ => Reply::json(
            503,
            r#"{"status":"fail","checks":{"database":{"status":"fail","error":"connection refused"},"transcription":{"status":"ok","latency_ms":40}}}"#,
        ),
    })
    .await;
    let extra = "subchecks = \"checks\"";

    let r = run_probe(&http_probe("api", &srv.url("/ok"), extra)).await;
    assert_outcome(&r, Outcome::Up, "");
    let subs: Vec<(&str, Outcome, Option<Duration>)> = r
        .subchecks
        .iter()
        .map(|s| (s.series.as_str(), s.outcome, s.latency))
        .collect();
    assert_eq!(
        subs,
        vec![
            (
                "api/checks.database",
                Outcome::Up,
                Some(Duration::from_millis(12))
            ),
            (
                "api/checks.transcription",
                Outcome::Up,
                Some(Duration::from_micros(35_500))
            ),
        ]
    );
    // The check --json line carries them too.
    let j = r.to_json();
    assert_eq!(
        j["details"]["subchecks"]["api/checks.database"]["latency"],
        12.0
    );

    let r = run_probe(&http_probe("api", &srv.url("/degraded"), extra)).await;
    assert_outcome(&r, Outcome::Degraded, "degraded");
    assert_message_contains(&r, &["api/checks.transcription"]);
    let tr = &r.subchecks[1];
    assert_eq!(
        (tr.series.as_str(), tr.outcome, tr.latency),
        ("api/checks.transcription", Outcome::Down, None)
    );
    let e = tr.error.as_ref().expect("sub-check error");
    assert!(e.message.contains("upstream 503"), "{e:?}");

    let r = run_probe(&http_probe("api", &srv.url("/fail"), extra)).await;
    assert_outcome(&r, Outcome::Down, "http_status");
    assert_message_contains(&r, &["503", "fail"]);
    assert_eq!(
        r.subchecks.len(),
        2,
        "sub-checks are recorded even when the run is down"
    );
    assert_eq!(r.subchecks[0].outcome, Outcome::Down);
    assert!(r.subchecks[0]
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("connection refused"));
    assert_eq!(r.subchecks[1].latency, Some(Duration::from_millis(40)));
}

#[tokio::test]
async fn string_valued_checks_shape() {
    let srv = HttpServer::json(
        200,
        r#"{"status":"healthy","checks":{"api":"ok","db":"ok","queue":"degraded"}}"#,
    )
    .await;
    let r = run_probe(&http_probe(
        "str",
        &srv.url("/health"),
        "subchecks = \"checks\"",
    ))
    .await;
    assert_outcome(&r, Outcome::Up, "");
    let subs: Vec<(&str, Outcome)> = r
        .subchecks
        .iter()
        .map(|s| (s.series.as_str(), s.outcome))
        .collect();
    assert_eq!(
        subs,
        vec![
            ("str/checks.api", Outcome::Up),
            ("str/checks.db", Outcome::Up),
            ("str/checks.queue", Outcome::Degraded)
        ]
    );
    assert!(r.subchecks.iter().all(|s| s.latency.is_none()));
    let q = r.subchecks[2].error.as_ref().expect("queue error");
    assert!(
        q.message.contains("queue") && q.message.contains("degraded"),
        "{q:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Assertions, degraded_when, budgets
// ---------------------------------------------------------------------------------------

const RICH: &str = r#"{"status":"ok","service":"web","version":"2.0.1","queue_depth":150,"checks":{"database":{"status":"ok","latency_ms":812}}}"#;

async fn run_against_rich(extra: &str) -> RunResult {
    let srv = HttpServer::json(200, RICH).await;
    run_probe(&http_probe("rich", &srv.url("/health"), extra)).await
}

#[tokio::test]
async fn json_assertions_fail_with_a_sentence() {
    let cases = [
        (
            r#"{ path = "checks.database.latency_ms", lt = 500 }"#,
            "checks.database.latency_ms is 812, expected < 500",
        ),
        (
            r#"{ path = "service", equals = "api" }"#,
            r#"service is "web", expected "api""#,
        ),
        (
            r#"{ path = "version", matches = '^1\.' }"#,
            r#"version is "2.0.1", expected to match /^1\./"#,
        ),
        (
            r#"{ path = "checks.cache", exists = true }"#,
            "checks.cache is missing",
        ),
        (
            r#"{ path = "service", in = ["api", "worker"] }"#,
            r#"service is "web", expected one of "api", "worker""#,
        ),
        (
            r#"{ path = "queue_depth", le = 100 }"#,
            "queue_depth is 150, expected <= 100",
        ),
    ];
    for (assertion, want) in cases {
        let r = run_against_rich(&format!("[expect]\njson = [ {assertion} ]")).await;
        assert_outcome(&r, Outcome::Down, "assertion");
        assert_eq!(message(&r), want, "for {assertion}");
    }
}

#[tokio::test]
async fn json_assertions_that_hold_are_up() {
    let extra = r#"[expect]
status = ["2xx"]
body_contains = "database"
body_matches = '"version":"2\.\d+'
json = [ { path = "service", equals = "web" },
         { path = "checks.database.latency_ms", lt = 1000 },
         { path = "checks.database.status", in = ["ok", "pass"] },
         { path = "version", matches = '^2\.' },
         { path = "checks.cache", exists = false } ]"#;
    let r = run_against_rich(extra).await;
    assert_outcome(&r, Outcome::Up, "");
}

#[tokio::test]
async fn body_assertions_fail_with_a_sentence() {
    let r = run_against_rich("[expect]\nbody_contains = \"transcription\"").await;
    assert_outcome(&r, Outcome::Down, "assertion");
    assert_eq!(message(&r), r#"body does not contain "transcription""#);
    let r = run_against_rich("[expect]\nbody_matches = 'version\":\"1'").await;
    assert_outcome(&r, Outcome::Down, "assertion");
    assert_message_contains(&r, &["does not match"]);
}

#[tokio::test]
async fn expect_status_rejects_other_codes() {
    let srv = HttpServer::start(|_| Reply::text(404, "no such page")).await;
    let r = run_probe(&http_probe("nf", &srv.url("/health"), "")).await;
    assert_outcome(&r, Outcome::Down, "http_status");
    assert_message_contains(&r, &["404", "no such page"]);
    let r = run_probe(&http_probe(
        "nf",
        &srv.url("/health"),
        "[expect]\nstatus = [\"2xx\", 404]",
    ))
    .await;
    assert_outcome(&r, Outcome::Up, "");
}

#[tokio::test]
async fn degraded_when_status() {
    let srv = HttpServer::start(|_| Reply::json(429, r#"{"status":"ok"}"#)).await;
    let r = run_probe(&http_probe("rl", &srv.url("/health"), "")).await;
    assert_outcome(&r, Outcome::Down, "http_status");
    let r = run_probe(&http_probe(
        "rl",
        &srv.url("/health"),
        "[degraded_when]\nstatus = [\"429\"]",
    ))
    .await;
    assert_outcome(&r, Outcome::Degraded, "degraded");
    assert_message_contains(&r, &["429"]);
}

#[tokio::test]
async fn degraded_when_json() {
    let r =
        run_against_rich("[degraded_when]\njson = [ { path = \"queue_depth\", gt = 100 } ]").await;
    assert_outcome(&r, Outcome::Degraded, "degraded");
    assert_eq!(message(&r), "queue_depth is 150");
    let r =
        run_against_rich("[degraded_when]\njson = [ { path = \"queue_depth\", gt = 1000 } ]").await;
    assert_outcome(&r, Outcome::Up, "");
}

#[tokio::test]
async fn run_budget_over_is_degraded() {
    let srv = HttpServer::start(|_| {
        Reply::json(200, r#"{"status":"ok"}"#).delayed(Duration::from_millis(200))
    })
    .await;
    let r = run_probe(&http_probe(
        "budget",
        &srv.url("/health"),
        "[budget]\ntotal = { run = \"100ms\" }",
    ))
    .await;
    assert_outcome(&r, Outcome::Degraded, "budget");
    assert_message_contains(&r, &["total took", "run budget 100ms"]);
    let r = run_probe(&http_probe(
        "budget",
        &srv.url("/health"),
        "[budget]\ntotal = { run = \"900ms\" }",
    ))
    .await;
    assert_outcome(&r, Outcome::Up, "");
}

// ---------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn retry_confirms_a_passing_second_attempt() {
    let srv = HttpServer::start(|r| {
        if r.index == 0 {
            Reply::json(503, r#"{"status":"down","error":"warming up"}"#)
        } else {
            Reply::json(200, r#"{"status":"ok"}"#)
        }
    })
    .await;
    let r = run_probe(&http_probe(
        "retry",
        &srv.url("/health"),
        "retries = 1\nretry_delay = \"50ms\"",
    ))
    .await;
    assert_outcome(&r, Outcome::Up, "");
    let attempts = r.details["attempts"]
        .as_array()
        .expect("attempts in details");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["outcome"], "down");
    assert_eq!(attempts[0]["class"], "http_status");
    assert_eq!(attempts[1]["outcome"], "up");
    assert_eq!(attempts[1]["class"], Value::Null);
    assert_eq!(srv.requests().len(), 2);
}

#[tokio::test]
async fn retries_exhausted_is_down_with_every_attempt_logged() {
    let srv = HttpServer::json(503, r#"{"status":"down","error":"db timeout"}"#).await;
    let r = run_probe(&http_probe(
        "retry2",
        &srv.url("/health"),
        "retries = 2\nretry_delay = \"20ms\"",
    ))
    .await;
    assert_outcome(&r, Outcome::Down, "http_status");
    assert_message_contains(&r, &["db timeout"]);
    assert_eq!(r.details["attempts"].as_array().map(Vec::len), Some(3));
    assert_eq!(srv.requests().len(), 3);
}

#[tokio::test]
async fn degraded_is_not_retried() {
    let srv = HttpServer::json(200, r#"{"status":"degraded"}"#).await;
    let r = run_probe(&http_probe(
        "noretry",
        &srv.url("/health"),
        "retries = 2\nretry_delay = \"20ms\"",
    ))
    .await;
    assert_outcome(&r, Outcome::Degraded, "degraded");
    assert_eq!(srv.requests().len(), 1);
}

// ---------------------------------------------------------------------------------------
// The request itself
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn request_carries_user_agent_cache_control_and_interpolated_headers() {
    std::env::set_var("WP_HTTP_PROBE_TEST_TOKEN", "s3cret-token");
    let srv = HttpServer::json(200, r#"{"status":"ok"}"#).await;
    let extra = r#"method = "POST"
body = '{"q":1}'
headers = { Authorization = "Bearer ${WP_HTTP_PROBE_TEST_TOKEN}", "X-Probe" = "watchpost" }"#;
    let r = run_probe(&http_probe("hdrs", &srv.url("/health?x=1"), extra)).await;
    assert_outcome(&r, Outcome::Up, "");
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 1);
    let q = &reqs[0];
    assert_eq!(q.method, "POST");
    assert_eq!(q.path, "/health?x=1");
    assert_eq!(q.body, br#"{"q":1}"#);
    assert_eq!(
        q.header("user-agent"),
        Some(concat!("watchpost/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(
        q.header("user-agent"),
        Some(watchpost::probe::http::USER_AGENT)
    );
    assert_eq!(q.header("cache-control"), Some("no-cache"));
    assert_eq!(q.header("authorization"), Some("Bearer s3cret-token"));
    assert_eq!(q.header("x-probe"), Some("watchpost"));
}

#[tokio::test]
async fn redirects_are_followed_up_to_max_redirects() {
    let srv = HttpServer::start(|r| match r.path.as_str() {
        "/r1" => Reply::redirect("/r2"),
        "/r2" => Reply::redirect("/ok"),
        _ => Reply::json(200, r#"{"status":"ok"}"#),
    })
    .await;
    let r = run_probe(&http_probe("redir", &srv.url("/r1"), "max_redirects = 2")).await;
    assert_outcome(&r, Outcome::Up, "");
    assert_eq!(r.details["final_url"], srv.url("/ok"));

    let r = run_probe(&http_probe("redir", &srv.url("/r1"), "max_redirects = 1")).await;
    assert_eq!(r.outcome, Outcome::Down);
    assert_eq!(class(&r), "too_many_redirects", "{}", message(&r));

    let r = run_probe(&http_probe("redir", &srv.url("/r1"), "max_redirects = 0")).await;
    assert_outcome(&r, Outcome::Down, "http_status");
    assert_message_contains(&r, &["302"]);
}

// ---------------------------------------------------------------------------------------
// Secrets from ${ENV} never reach Debug output, messages, logs or the database
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn header_secret_is_redacted_in_config_debug() {
    std::env::set_var("WP_HTTP_PROBE_HEADER_SECRET", "hunter2-header");
    let t = TestConfig::with_probe(
        "p.toml",
        &http_probe(
            "sec",
            "http://127.0.0.1:1/health",
            "headers = { Authorization = \"Bearer ${WP_HTTP_PROBE_HEADER_SECRET}\" }",
        ),
    );
    let cfg = t.load_ok();
    let debug = format!("{cfg:?}");
    assert!(!debug.contains("hunter2-header"), "secret in Debug output");
    assert!(
        debug.contains("${WP_HTTP_PROBE_HEADER_SECRET}"),
        "the template shows instead"
    );
}

fn url_secret_config(addr: std::net::SocketAddr) -> TestConfig {
    std::env::set_var("WP_HTTP_PROBE_URL_SECRET", "hunter2-url");
    TestConfig::with_probe(
        "p.toml",
        &http_probe(
            "sec",
            &format!("http://{addr}/health?key=${{WP_HTTP_PROBE_URL_SECRET}}"),
            "",
        ),
    )
}

#[tokio::test]
async fn url_secret_is_redacted_in_config_debug() {
    let cfg = url_secret_config(refused_addr()).load_ok();
    assert!(
        !format!("{cfg:?}").contains("hunter2-url"),
        "secret in Debug output"
    );
}

#[tokio::test]
async fn url_secret_never_reaches_the_error_message() {
    let r = run_loaded(&url_secret_config(refused_addr())).await;
    assert_outcome(&r, Outcome::Down, "connect_refused");
    assert!(
        !r.to_json().to_string().contains("hunter2-url"),
        "secret in the run: {}",
        r.to_json()
    );
}
