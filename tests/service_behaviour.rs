//! The watched services' real behaviour (issue 11), each against a server on 127.0.0.1 that
//! behaves like the real one: health bodies whose `status` is not a health word, a capacity
//! gate's 429, and the read-only commands on a machine without the notifiers' secrets.

mod common;

use std::time::Duration;

use common::http::{class, http_probe, message, run_probe, HttpServer, Reply, TestConfig};
use watchpost::probe::Outcome;

// ---------------------------------------------------------------------------------------
// The health-contract reader decides only on words it knows
// ---------------------------------------------------------------------------------------

/// A call-spawn route answers `{"status":"active", …}`: the application's own field, not a
/// health word — the run is up (it was "down" before).
#[tokio::test]
async fn an_unknown_status_word_does_not_decide() {
    let srv = HttpServer::start(|r| match r.path.as_str() {
        "/calls" => Reply::json(201, r#"{"status":"active","call_id":"c-1"}"#),
        "/critical" => Reply::json(200, r#"{"status":"critical","error":"db pool exhausted"}"#),
        _ => Reply::json(200, r#"{"status":"warn"}"#),
    })
    .await;
    let r = run_probe(&http_probe("spawn", &srv.url("/calls"), "")).await;
    assert_eq!(r.outcome, Outcome::Up, "{:?}", r.error);

    // The words it knows still decide, `critical` included.
    let r = run_probe(&http_probe("crit", &srv.url("/critical"), "")).await;
    assert_eq!((r.outcome, class(&r)), (Outcome::Down, "unhealthy"));
    assert!(message(&r).contains("db pool exhausted"), "{}", message(&r));
    let r = run_probe(&http_probe("warn", &srv.url("/warn"), "")).await;
    assert_eq!((r.outcome, class(&r)), (Outcome::Degraded, "degraded"));

    // An unknown word is still checkable with an explicit assertion.
    let extra = "[expect]\njson = [ { path = \"status\", equals = \"active\" } ]";
    let r = run_probe(&http_probe("spawn2", &srv.url("/calls"), extra)).await;
    assert_eq!(r.outcome, Outcome::Up, "{:?}", r.error);
}

// ---------------------------------------------------------------------------------------
// HTTP 429 from a capacity gate
// ---------------------------------------------------------------------------------------

/// osmTalk's capacity gate: 429 with `error`, `code` and `scope` (and a `Retry-After`).
fn capacity_gate() -> Reply {
    Reply::json(
        429,
        r#"{"error":"concurrent call limit reached","code":"capacity_exceeded","scope":"tenant","limit":20,"active_connections":20}"#,
    )
    .header("Retry-After", "5")
}

#[tokio::test]
async fn a_429_says_which_limit_was_hit() {
    let srv = HttpServer::start(|_| capacity_gate()).await;
    let r = run_probe(&http_probe("spawn", &srv.url("/calls"), "")).await;
    assert_eq!((r.outcome, class(&r)), (Outcome::Down, "http_status"));
    let m = message(&r);
    for part in [
        "429",
        "concurrent call limit reached",
        "code \"capacity_exceeded\"",
        "scope \"tenant\"",
    ] {
        assert!(m.contains(part), "message {m:?} should contain {part:?}");
    }
}

/// The documented one-liner: `[degraded_when] status = ["429"]` makes the gate's refusal
/// degraded capacity, with the same words in the message.
#[tokio::test]
async fn a_429_means_degraded_capacity_with_one_line() {
    let srv = HttpServer::start(|_| capacity_gate()).await;
    let extra = "[degraded_when]\nstatus = [\"429\"]";
    let r = run_probe(&http_probe("spawn", &srv.url("/calls"), extra)).await;
    assert_eq!((r.outcome, class(&r)), (Outcome::Degraded, "degraded"));
    let m = message(&r);
    assert!(
        m.contains("429") && m.contains("capacity_exceeded") && m.contains("tenant"),
        "{m}"
    );
    // A gate that words its refusal as `status: "fail"` is still degraded: the probe said
    // what 429 means.
    let srv = HttpServer::start(|_| {
        Reply::json(
            429,
            r#"{"status":"fail","error":"busy","code":"rate_limited"}"#,
        )
    })
    .await;
    let r = run_probe(&http_probe("spawn", &srv.url("/calls"), extra)).await;
    assert_eq!(
        (r.outcome, class(&r)),
        (Outcome::Degraded, "degraded"),
        "{:?}",
        r.error
    );
    assert!(message(&r).contains("rate_limited"), "{}", message(&r));
}

// ---------------------------------------------------------------------------------------
// Read-only commands without the notifiers' secrets
// ---------------------------------------------------------------------------------------

/// A config with a PagerDuty and a webhook notifier whose secrets live in variables this
/// shell does not have (an operator's laptop, a cron job that only reads).
fn config_with_secret_notifiers() -> TestConfig {
    let t = TestConfig::with_probe(
        "p.toml",
        &http_probe("api", "http://127.0.0.1:9/health", ""),
    );
    let main = format!(
        "{}\n{}",
        common::http::MAIN_TOML,
        r#"
[[component]]
name = "API"
probes = ["api"]
notify = ["pager", "hook"]

[notifier.pager]
kind = "pagerduty"
routing_key_env = "WP_TEST_UNSET_ROUTING_KEY"

[notifier.hook]
kind = "webhook"
url = "http://127.0.0.1:9/hook"
secret_env = "WP_TEST_UNSET_HOOK_SECRET"
"#
    );
    t.write("watchpost.toml", &main);
    t
}

async fn wp(t: &TestConfig, args: &[&str]) -> std::process::Output {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_watchpost"));
    c.env_remove("WATCHPOST_CONFIG")
        .env_remove("WP_TEST_UNSET_ROUTING_KEY")
        .env_remove("WP_TEST_UNSET_HOOK_SECRET")
        .arg("-c")
        .arg(t.main_path())
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(20), c.output())
        .await
        .unwrap_or_else(|_| panic!("watchpost {args:?} did not finish within 20s"))
        .expect("spawn watchpost")
}

#[tokio::test]
async fn incidents_and_report_need_no_notifier_secrets() {
    let t = config_with_secret_notifiers();
    for args in [
        &["incidents"][..],
        &["incidents", "--json"],
        &["report", "--window", "1h"],
        &["report", "--json"],
    ] {
        let o = wp(&t, args).await;
        assert_eq!(
            o.status.code(),
            Some(0),
            "watchpost {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // validate (and so run) still require them, at the key.
    let o = wp(&t, &["validate"]).await;
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("WP_TEST_UNSET_ROUTING_KEY") && err.contains("WP_TEST_UNSET_HOOK_SECRET"),
        "{err}"
    );
    let o = wp(&t, &["run"]).await;
    assert_eq!(o.status.code(), Some(3));
}

// ---------------------------------------------------------------------------------------
// Health details named in the probe reach the notifications
// ---------------------------------------------------------------------------------------

#[path = "notify_harness/mod.rs"]
mod notify_harness;
#[path = "common/recorder.rs"]
mod recorder;

/// An osmTalk-style health route that is down, with the figures a responder wants.
async fn failing_health() -> HttpServer {
    HttpServer::start(|_| {
        Reply::json(
            503,
            r#"{"status":"down","error":"db pool exhausted","active_connections":20,
                "checks":{"database":{"status":"fail","failures":3,"error":"timeout"}},
                "build":{"sha":"abc"}}"#,
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn named_health_details_reach_pagerduty_and_the_webhook() {
    use notify_harness::{write_config, Agent, Targets, THRESHOLDS};
    let srv = failing_health().await;
    let extra =
        r#"details = ["active_connections", "checks.database.failures", "build", "not.there"]"#;
    let r = run_probe(&http_probe("api", &srv.url("/health"), extra)).await;
    assert_eq!(r.outcome, Outcome::Down);
    assert_eq!(
        r.details["health"],
        serde_json::json!({"active_connections": 20, "checks.database.failures": 3, "build": "{\"sha\":\"abc\"}"})
    );

    let pd =
        recorder::Recorder::with_default(|_| recorder::Reply::json(202, serde_json::json!({})))
            .await;
    let hook = recorder::Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let t = Targets {
        pagerduty: Some(pd.url()),
        webhook: Some(hook.url()),
        ..Default::default()
    };
    let agent = Agent::start(write_config(dir.path(), &t, THRESHOLDS, ""), true).await;
    agent.send(r.clone()).await;
    agent.send(r).await;
    let trig = pd
        .wait_ok("PagerDuty trigger", 1, Duration::from_secs(10))
        .await[0]
        .json();
    let health = &trig["payload"]["custom_details"]["health"];
    assert_eq!(health["active_connections"], 20, "{trig}");
    assert_eq!(health["checks.database.failures"], 3);
    let body = hook.wait_ok("webhook", 1, Duration::from_secs(10)).await[0].json();
    assert_eq!(
        body["details"]["details"]["health"]["active_connections"],
        20
    );
    // The text every person-facing notifier sends (e-mail body, Instatus message).
    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains("Health: active_connections=20, checks.database.failures=3"),
        "{text}"
    );
    agent.stop().await;
}

#[test]
fn too_many_detail_paths_is_a_config_error_at_the_key() {
    let paths: Vec<String> = (0..17).map(|i| format!("\"p{i}\"")).collect();
    let t = TestConfig::with_probe(
        "p.toml",
        &http_probe(
            "api",
            "http://127.0.0.1:9/h",
            &format!("details = [{}]", paths.join(", ")),
        ),
    );
    let e = t.load().unwrap_err().to_string();
    assert!(e.contains("p.toml:4:") && e.contains("at most 16"), "{e}");
}
