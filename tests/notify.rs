//! Delivery behaviour against real local servers: retries (5xx, 429 + Retry-After), dead
//! letters (400, SMTP 550), ordering, circuit breaker, concurrency between notifiers, rate
//! limits, formats (webhook watchpost/grafana, Instatus integration webhooks), notify-test,
//! and notifier config validation.

mod notify_harness;
#[path = "common/recorder.rs"]
mod recorder;
#[path = "common/smtp.rs"]
mod smtp;

use std::time::Duration;

use notify_harness::*;
use recorder::{Recorded, Recorder, Reply};
use serde_json::json;
use watchpost::probe::Outcome::{Down, Up};

const T: Duration = Duration::from_secs(10);
const ONE_MEMBER_BREAKER: &str = r#"delivery = { retry_initial = "50ms", retry_max = "200ms", timeout = "2s", rate_limit = 50, breaker_failures = 20 }"#;

async fn pd_ok() -> Recorder {
    Recorder::with_default(|_| Reply::json(202, json!({"status": "success"}))).await
}

/// Outage of member `api` only (partial), then its recovery.
async fn outage_and_recovery(agent: &Agent) {
    agent.send(run("api", Down)).await;
    agent.send(run("api", Down)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent.send(run("api", Up)).await;
    agent.send(run("api", Up)).await;
}

fn actions(log: &[Recorded]) -> Vec<String> {
    log.iter()
        .map(|r| {
            format!(
                "{} {}",
                r.status,
                r.json()["event_action"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_errors_are_retried_and_delivery_stays_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let pd = pd_ok().await;
    pd.script(
        "/v2/enqueue",
        vec![
            Reply::status(500),
            Reply::status(502),
            Reply::status(503),
            Reply::status(500),
            Reply::status(500),
            Reply::status(500),
        ],
    );
    let t = Targets {
        pagerduty: Some(pd.url()),
        delivery: Some(ONE_MEMBER_BREAKER.into()),
        ..Default::default()
    };
    let agent = Agent::start(write_config(dir.path(), &t, THRESHOLDS, ""), true).await;
    outage_and_recovery(&agent).await;
    let log = pd.wait_ok("trigger and resolve", 2, T).await;
    // The resolve was queued while the trigger was still failing; it waited its turn.
    assert_eq!(
        actions(&log),
        [
            "500 trigger",
            "502 trigger",
            "503 trigger",
            "500 trigger",
            "500 trigger",
            "500 trigger",
            "202 trigger",
            "202 resolve"
        ]
    );
    // Exponential backoff: gaps grow.
    let gaps: Vec<u128> = log
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_millis())
        .collect();
    assert!(gaps[0] >= 20 && gaps[4] >= 90, "{gaps:?}");
    agent.drained(T).await;
    assert_eq!(
        agent.outbox(),
        [
            ("pager".into(), "opened".into(), "delivered".into(), 7),
            ("pager".into(), "resolved".into(), "delivered".into(), 1)
        ]
    );
    let m = agent.metrics.render();
    assert!(
        m.contains("watchpost_notifications_total{notifier=\"pager\",result=\"retry\"} 6"),
        "{m}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_many_requests_honours_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let pd = pd_ok().await;
    pd.script(
        "/v2/enqueue",
        vec![Reply::json(429, json!({"status": "throttled"})).header("Retry-After", "1")],
    );
    let t = Targets {
        pagerduty: Some(pd.url()),
        ..Default::default()
    };
    let agent = Agent::start(write_config(dir.path(), &t, THRESHOLDS, ""), true).await;
    agent.send(run("api", Down)).await;
    agent.send(run("api", Down)).await;
    let log = pd.wait_ok("trigger after 429", 1, T).await;
    assert_eq!(log[0].status, 429);
    let gap = log[1].at - log[0].at;
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After: 1 not honoured (retried after {gap:?}; backoff alone would be ~50ms)"
    );
    assert!(gap < Duration::from_millis(2500), "{gap:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_request_is_dead_lettered_while_others_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let pd = Recorder::with_default(|_| Reply::json(400, json!({"status": "invalid event", "message": "Event object is invalid", "errors": ["Length of 'routing_key' is incorrect"]}))).await;
    let hook = Recorder::start().await;
    let t = Targets {
        pagerduty: Some(pd.url()),
        webhook: Some(hook.url()),
        ..Default::default()
    };
    let agent = Agent::start(write_config(dir.path(), &t, THRESHOLDS, ""), true).await;
    outage_and_recovery(&agent).await;
    hook.wait_ok("webhook open + resolve", 2, T).await;
    agent.drained(T).await;
    assert_eq!(
        pd.requests().len(),
        2,
        "400 is never retried: one attempt for the trigger, one for the resolve"
    );
    let rows = agent.outbox();
    let pager: Vec<_> = rows
        .iter()
        .filter(|r| r.0 == "pager")
        .map(|r| (r.2.as_str(), r.3))
        .collect();
    assert_eq!(pager, [("dead", 1), ("dead", 1)]);
    assert!(rows
        .iter()
        .filter(|r| r.0 == "mitigate")
        .all(|r| r.2 == "delivered"));
    // The gauge is refreshed by the worker just after it commits the dead letter.
    until("dead-letter gauge at 2", T, || {
        agent
            .metrics
            .render()
            .contains("watchpost_outbox_dead_letters{notifier=\"pager\"} 2")
    })
    .await;
    let m = agent.metrics.render();
    assert!(
        m.contains("watchpost_notifications_total{notifier=\"pager\",result=\"dead_letter\"} 2"),
        "{m}"
    );
    let inc = agent.incidents(false);
    let n = &inc[0]["notifications"];
    let dead = n
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["notifier"] == "pager")
        .unwrap();
    assert_eq!(dead["status"], "dead");
    assert!(
        dead["last_error"].as_str().unwrap().contains("HTTP 400"),
        "{dead}"
    );
    let table = watchpost::incident::render_incidents(&agent.incident_views(false));
    assert!(
        table.contains("pager opened: dead after 1 attempt(s): HTTP 400"),
        "{table}"
    );
    agent.stop().await;
}

// Virtual time: the slow webhook answers only after 1.5 s of virtual time, which passes only
// when the test advances it, so "PagerDuty did not wait for it" is exact.
#[tokio::test(start_paused = true)]
async fn a_slow_or_dead_notifier_never_delays_another() {
    let dir = tempfile::tempdir().unwrap();
    let pd = pd_ok().await;
    let slow =
        Recorder::with_default(|_| Reply::status(200).delay(Duration::from_millis(1500))).await;
    // Instatus points at a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let t = Targets {
        pagerduty: Some(pd.url()),
        webhook: Some(slow.url()),
        instatus: Some(format!("http://{dead}")),
        ..Default::default()
    };
    let agent = Agent::start(write_config(dir.path(), &t, THRESHOLDS, ""), true).await;
    agent.send(run("api", Down)).await;
    agent.send(run("api", Down)).await;
    // Both deliveries start without any time passing; PagerDuty's completes while the
    // webhook's answer is still 1.5 s (virtual) away.
    slow.wait_for("slow webhook", T, |l| !l.is_empty()).await;
    pd.wait_ok("trigger", 1, T).await;
    let status = |n: &str| {
        agent
            .outbox()
            .iter()
            .find(|r| r.0 == n)
            .map(|r| r.2.clone())
    };
    until("PagerDuty's delivery committed", T, || {
        status("pager").as_deref() == Some("delivered")
    })
    .await;
    assert_eq!(status("mitigate").as_deref(), Some("pending"));
    // The dead endpoint keeps retrying as (virtual) time passes; the webhook completes.
    advance_until(
        "the dead endpoint retried",
        Duration::from_millis(50),
        || {
            agent
                .outbox()
                .iter()
                .any(|r| r.0 == "statuspage" && r.3 >= 2)
        },
    )
    .await;
    advance_until(
        "the slow webhook delivered",
        Duration::from_millis(100),
        || {
            agent
                .outbox()
                .iter()
                .any(|r| r.0 == "mitigate" && r.2 == "delivered")
        },
    )
    .await;
    let rows = agent.outbox();
    let is_row = rows.iter().find(|r| r.0 == "statuspage").unwrap();
    assert_eq!(is_row.2, "pending", "dead endpoint keeps retrying");
    agent.stop().await;
}

// Virtual time: retries and the breaker's cooldowns move only when the test advances, so
// "no attempt during the cooldown" is exact instead of a wall-clock window.
#[tokio::test(start_paused = true)]
async fn circuit_breaker_stops_hammering_a_dead_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::with_default(|_| Reply::status(503)).await;
    let d = r#"delivery = { retry_initial = "10ms", retry_max = "20ms", timeout = "2s", rate_limit = 100, breaker_failures = 3, breaker_cooldown = "700ms" }"#;
    let t = Targets {
        webhook: Some(hook.url()),
        delivery: Some(d.into()),
        ..Default::default()
    };
    let agent = Agent::start(write_config(dir.path(), &t, THRESHOLDS, ""), true).await;
    agent.send(run("api", Down)).await;
    agent.send(run("api", Down)).await;
    hook.wait_for("the first attempt", T, |l| !l.is_empty())
        .await;
    advance_until("three failures", Duration::from_millis(5), || {
        hook.requests().len() >= 3
    })
    .await;
    // The cooldown runs from the third failure, handled (and committed) at this virtual
    // instant.
    let attempts = |n: i64| agent.outbox().first().is_some_and(|r| r.3 == n);
    until("the third failure committed", T, || attempts(3)).await;
    tokio::time::advance(Duration::from_millis(690)).await;
    settle(Duration::from_millis(300)).await;
    assert_eq!(
        hook.requests().len(),
        3,
        "breaker open: no attempts during the cooldown"
    );
    assert!(agent
        .metrics
        .render()
        .contains("watchpost_notifier_circuit_open{notifier=\"mitigate\"} 1"));
    tokio::time::advance(Duration::from_millis(20)).await;
    hook.wait_for("half-open probe", T, |l| l.len() >= 4).await;
    until("the probe's failure committed", T, || attempts(4)).await;
    // The failed probe doubles the cooldown to 1.4 s.
    tokio::time::advance(Duration::from_millis(1390)).await;
    settle(Duration::from_millis(300)).await;
    assert_eq!(
        hook.requests().len(),
        4,
        "failed probe re-opens the breaker with a longer cooldown"
    );
    tokio::time::advance(Duration::from_millis(20)).await;
    hook.wait_for("second half-open probe", T, |l| l.len() >= 5)
        .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instatus_default_rate_limit_is_one_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let is = Recorder::with_default(|r: &Recorded| {
        if r.method == "POST" && r.path.ends_with("/incidents") {
            Reply::json(200, json!({"id": "inc-9"}))
        } else {
            Reply::status(200)
        }
    })
    .await;
    let t = Targets {
        instatus: Some(is.url()),
        delivery: Some(r#"delivery = { retry_initial = "50ms" }"#.into()),
        ..Default::default()
    };
    let agent = Agent::start(write_config(dir.path(), &t, THRESHOLDS, ""), true).await;
    agent.send(run("api", Down)).await;
    agent.send(run("api", Down)).await;
    let log = is.wait_ok("incident + component", 2, T).await;
    assert_eq!(log[0].path, "/v1/page1/incidents");
    assert_eq!(log[1].path, "/v1/page1/components/comp-api");
    let gap = log[1].at - log[0].at;
    assert!(
        gap >= Duration::from_millis(900),
        "Instatus requests {gap:?} apart; default limit is 1/s"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_grafana_format_pairs_firing_and_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::start().await;
    let notifiers = format!(
        "[notifier.grafana]\nkind = \"webhook\"\nurl = \"{}/api/v3/integrations/grafana/abc\"\nformat = \"grafana\"\nsecret_env = \"WPT_HOOK_SECRET\"\nsignature_header = \"X-Signature\"\nheaders = {{ Authorization = \"Bearer tok\" }}\nevents = [\"opened\", \"resolved\"]\n{FAST}\n",
        hook.url()
    );
    let agent = Agent::start(
        write_config_raw(dir.path(), &["grafana"], &notifiers, THRESHOLDS, ""),
        true,
    )
    .await;
    agent.both(Down).await;
    agent.both(Down).await; // escalation: filtered out by `events`
    agent.both(Up).await;
    agent.both(Up).await;
    let log = hook.wait_ok("firing + resolved", 2, T).await;
    agent.drained(T).await;
    assert_eq!(hook.requests().len(), 2);
    let (a, b) = (log[0].json(), log[1].json());
    assert_eq!(log[0].path, "/api/v3/integrations/grafana/abc");
    assert_eq!(log[0].header("authorization"), Some("Bearer tok"));
    assert_eq!(
        log[0].header("x-signature").unwrap(),
        watchpost::notify::webhook::signature(HOOK_SECRET.as_bytes(), &log[0].body)
    );
    assert_eq!(
        (a["status"].as_str(), b["status"].as_str()),
        (Some("firing"), Some("resolved"))
    );
    assert_eq!(a["groupKey"], b["groupKey"]);
    assert_eq!(a["alerts"][0]["fingerprint"], b["alerts"][0]["fingerprint"]);
    assert_eq!(a["alerts"][0]["labels"]["alertname"], "API");
    assert_eq!(a["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    assert_ne!(b["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    assert_eq!(a["version"], "1");
    assert_eq!(a["receiver"], "grafana");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instatus_integration_webhooks_trigger_down_and_up() {
    let dir = tempfile::tempdir().unwrap();
    let is = Recorder::start().await;
    let notifiers = format!("[notifier.page]\nkind = \"instatus\"\nbase_url = \"{}\"\nwebhooks = {{ \"API\" = \"wh-123\" }}\n{FAST}\n", is.url());
    let agent = Agent::start(
        write_config_raw(dir.path(), &["page"], &notifiers, THRESHOLDS, ""),
        true,
    )
    .await;
    agent.both(Down).await;
    agent.both(Down).await;
    agent.both(Up).await;
    agent.both(Up).await;
    let log = is.wait_ok("down + up", 2, T).await;
    agent.drained(T).await;
    let got: Vec<(String, serde_json::Value)> = is
        .requests()
        .iter()
        .map(|r| (r.path.clone(), r.json()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "/v3/integrations/webhook/wh-123".to_string(),
                json!({"trigger": "down"})
            ),
            (
                "/v3/integrations/webhook/wh-123".to_string(),
                json!({"trigger": "up"})
            ),
        ]
    );
    assert!(
        log.iter().all(|r| r.header("authorization").is_none()),
        "integration mode needs no API key"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtp_permanent_rejection_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let sink = smtp::SmtpSink::start(None, true);
    let notifiers = format!(
        "[notifier.oncall]\nkind = \"email\"\nsmtp_url = \"{}\"\nfrom = \"watchpost@example.com\"\nto = [\"a@example.com\", \"b@example.com\"]\n{FAST}\n",
        sink.url()
    );
    let agent = Agent::start(
        write_config_raw(dir.path(), &["oncall"], &notifiers, THRESHOLDS, ""),
        true,
    )
    .await;
    agent.send(run("api", Down)).await;
    agent.send(run("api", Down)).await;
    until("dead letter", T, || {
        agent.outbox().iter().any(|r| r.2 == "dead")
    })
    .await;
    assert_eq!(agent.outbox()[0].3, 1, "550 is not retried");
    assert!(sink.mails().is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notify_test_sends_one_marked_event_per_notifier() {
    let dir = tempfile::tempdir().unwrap();
    let pd = pd_ok().await;
    let hook = Recorder::start().await;
    let is = Recorder::with_default(|_| {
        Reply::json(
            200,
            json!([{"id": "comp-api", "name": "API", "status": "OPERATIONAL"}]),
        )
    })
    .await;
    let sink = smtp::SmtpSink::start(Some((SMTP_USER, SMTP_PASS)), false);
    let t = Targets {
        instatus: Some(is.url()),
        pagerduty: Some(pd.url()),
        webhook: Some(hook.url()),
        smtp: Some(sink.url()),
        delivery: None,
    };
    let cfg = write_config(dir.path(), &t, THRESHOLDS, "");

    watchpost::notify::notify_test(&cfg, "pager").await.unwrap();
    let log = pd.requests();
    assert_eq!(actions(&log), ["202 trigger", "202 resolve"]);
    let trig = log[0].json();
    assert!(trig["payload"]["summary"]
        .as_str()
        .unwrap()
        .starts_with("[TEST]"));
    assert_eq!(trig["payload"]["severity"], "info");
    assert!(trig["dedup_key"]
        .as_str()
        .unwrap()
        .starts_with("watchpost/test/"));
    assert_eq!(trig["dedup_key"], log[1].json()["dedup_key"]);

    watchpost::notify::notify_test(&cfg, "mitigate")
        .await
        .unwrap();
    let h = &hook.requests()[0];
    assert_eq!(h.json()["event"], "test");
    assert_eq!(h.json()["test"], true);
    assert_eq!(
        h.header("x-watchpost-signature").unwrap(),
        watchpost::notify::webhook::signature(HOOK_SECRET.as_bytes(), &h.body)
    );

    watchpost::notify::notify_test(&cfg, "oncall")
        .await
        .unwrap();
    let mails = sink.wait_mails(1, T).await;
    assert!(mails[0].header("subject").unwrap().starts_with("[TEST]"));

    // Instatus: read-only check of the key, page and component ids.
    watchpost::notify::notify_test(&cfg, "statuspage")
        .await
        .unwrap();
    let r = &is.requests()[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("GET", "/v1/page1/components")
    );
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {INSTATUS_KEY}").as_str())
    );

    let is_bad = Recorder::with_default(|_| Reply::json(200, json!([{"id": "other"}]))).await;
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = write_config(
        dir2.path(),
        &Targets {
            instatus: Some(is_bad.url()),
            ..Default::default()
        },
        THRESHOLDS,
        "",
    );
    let e = watchpost::notify::notify_test(&cfg2, "statuspage")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("component ids not found") && e.contains("comp-api"),
        "{e}"
    );

    let e = watchpost::notify::notify_test(&cfg, "nope")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown notifier \"nope\"") && e.contains("pager"),
        "{e}"
    );

    let pd_bad =
        Recorder::with_default(|_| Reply::json(400, json!({"status": "invalid event"}))).await;
    let dir3 = tempfile::tempdir().unwrap();
    let cfg3 = write_config(
        dir3.path(),
        &Targets {
            pagerduty: Some(pd_bad.url()),
            ..Default::default()
        },
        THRESHOLDS,
        "",
    );
    let e = watchpost::notify::notify_test(&cfg3, "pager")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP 400"), "{e}");
}

#[test]
fn notifier_config_errors_point_at_the_table() {
    env();
    let cases: &[(&[&str], &str, &str)] = &[
        (&["x"], "[notifier.x]\nkind = \"pagerdooty\"\n", "unknown notifier kind \"pagerdooty\" (expected instatus, pagerduty, email, webhook)"),
        (&["x"], "[notifier.x]\nkind = \"pagerduty\"\nrouting_key_env = \"WPT_UNSET_VAR_1\"\n", "environment variable WPT_UNSET_VAR_1 is not set"),
        (&["x"], "[notifier.x]\nkind = \"pagerduty\"\nrouting_key_env = \"WPT_PD_KEY\"\nurgency = \"high\"\n", "unknown field `urgency`"),
        (
            &["x"],
            "[notifier.x]\nkind = \"instatus\"\npage_id = \"p\"\napi_key_env = \"WPT_INSTATUS_KEY\"\ncomponents = { \"Other\" = \"c1\" }\n",
            "notifier \"x\" has no entry for component \"API\" in its components table",
        ),
        (&["x"], "[notifier.x]\nkind = \"instatus\"\npage_id = \"p\"\n", "API mode needs api_key_env"),
        (&["x"], "[notifier.x]\nkind = \"instatus\"\n", "needs page_id, api_key_env and components"),
        (
            &["x"],
            "[notifier.x]\nkind = \"email\"\nsmtp_url = \"smtp://mail.example.com\"\nusername_env = \"WPT_SMTP_USER\"\npassword_env = \"WPT_SMTP_PASS\"\nfrom = \"a@example.com\"\nto = [\"b@example.com\"]\n",
            "refusing to send SMTP credentials unencrypted to mail.example.com",
        ),
        (&["x"], "[notifier.x]\nkind = \"email\"\nsmtp_url = \"imap://x\"\nfrom = \"a@example.com\"\nto = [\"b@example.com\"]\n", "scheme must be smtp or smtps"),
        (&["x"], "[notifier.x]\nkind = \"email\"\nsmtp_url = \"smtp://localhost\"\nfrom = \"not an address\"\nto = [\"b@example.com\"]\n", "from = \"not an address\""),
        (&["x"], "[notifier.x]\nkind = \"webhook\"\nurl = \"ftp://x\"\n", "url: URL \"ftp://x\" must be http:// or https://"),
        (&["x"], "[notifier.x]\nkind = \"webhook\"\nurl = \"http://x\"\nformat = \"slack\"\n", "unknown variant `slack`"),
        (&["x"], "[notifier.x]\nkind = \"webhook\"\nurl = \"http://x\"\nevents = [\"open\"]\n", "unknown event \"open\""),
        (&["x"], "[notifier.x]\nkind = \"webhook\"\nurl = \"http://x\"\ndelivery = { rate_limit = 0 }\n", "delivery.rate_limit = 0 must be between"),
    ];
    for (notify, table, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config_file(dir.path(), notify, table, THRESHOLDS, "");
        let err = watchpost::config::load(&path).expect_err(table).to_string();
        assert!(err.contains(want), "{table}\nwant: {want}\ngot: {err}");
        let first = err.lines().next().unwrap();
        let pos = first
            .strip_prefix(&format!("{}:", path.display()))
            .unwrap_or_else(|| panic!("no file:line:col in {first}"));
        let mut it = pos.splitn(3, ':');
        let line: usize = it.next().unwrap().parse().unwrap();
        assert!(line > 1, "{first}");
    }
    // Maintenance windows are checked too.
    let dir = tempfile::tempdir().unwrap();
    let path = write_config_file(
        dir.path(),
        &[],
        "",
        THRESHOLDS,
        "[[maintenance]]\ncomponents = [\"API\"]\nat = \"25:00\"\nduration = \"1h\"\n",
    );
    let err = watchpost::config::load(&path).unwrap_err().to_string();
    assert!(err.contains("invalid time of day \"25:00\""), "{err}");
}

#[test]
fn documented_example_config_validates() {
    for (k, v) in [
        ("INSTATUS_PAGE_ID", "page"),
        ("INSTATUS_API_KEY", "key"),
        ("INSTATUS_COMPONENT_STT", "comp"),
        ("INSTATUS_WEBHOOK_API", "wh"),
        ("PAGERDUTY_ROUTING_KEY", "rk"),
        ("SMTP_USER", "u"),
        ("SMTP_PASSWORD", "p"),
        ("WATCHPOST_WEBHOOK_SECRET", "s"),
    ] {
        std::env::set_var(k, v);
    }
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/notifiers.toml");
    let c = watchpost::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let kinds: Vec<&str> = c.notifiers.iter().map(|n| n.config.kind()).collect();
    assert_eq!(c.notifiers.len(), 5, "{kinds:?}");
    assert_eq!(c.components.len(), 2);
    assert_eq!(c.maintenance.len(), 2);
}
