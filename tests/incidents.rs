//! Incident scenarios end to end: synthetic runs → evaluator → SQLite outbox → dispatcher →
//! real HTTP recorders (Instatus, PagerDuty, webhook) and a real SMTP server (aiosmtpd).

mod notify_harness;
#[path = "common/recorder.rs"]
mod recorder;
#[path = "common/smtp.rs"]
mod smtp;

use std::time::Duration;

use notify_harness::*;
use recorder::{Recorded, Recorder, Reply};
use serde_json::json;
use watchpost::probe::Outcome::{Degraded, Down, Up};

const T: Duration = Duration::from_secs(10);

/// An Instatus stand-in: incident POSTs answer with an id.
async fn instatus() -> Recorder {
    let n = std::sync::atomic::AtomicUsize::new(0);
    Recorder::with_default(move |r: &Recorded| {
        if r.method == "POST" && r.path.ends_with("/incidents") {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Reply::json(200, json!({"id": format!("inst-{i}"), "name": "x"}))
        } else {
            Reply::status(200)
        }
    })
    .await
}

async fn pagerduty() -> Recorder {
    Recorder::with_default(|r: &Recorded| {
        let key = r.json()["dedup_key"].clone();
        Reply::json(
            202,
            json!({"status": "success", "message": "Event processed", "dedup_key": key}),
        )
    })
    .await
}

fn pd_events(log: &[Recorded]) -> Vec<(String, String)> {
    log.iter()
        .filter(|r| r.status == 202)
        .map(|r| {
            let j = r.json();
            (
                j["event_action"].as_str().unwrap().to_string(),
                j["dedup_key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_opens_one_incident_notifies_everyone_and_resolves_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (is, pd, hook) = (instatus().await, pagerduty().await, Recorder::start().await);
    let sink = smtp::SmtpSink::start(Some((SMTP_USER, SMTP_PASS)), false);
    let t = Targets {
        instatus: Some(is.url()),
        pagerduty: Some(pd.url()),
        webhook: Some(hook.url()),
        smtp: Some(sink.url()),
        delivery: None,
    };
    let cfg = write_config(dir.path(), &t, THRESHOLDS, "");
    let agent = Agent::start(cfg, true).await;

    // Both members down twice: one incident, major outage.
    agent.both(Down).await;
    agent.both(Down).await;
    let pd_log = pd.wait_ok("PagerDuty trigger", 1, T).await;
    let trig = pd_log[0].json();
    assert_eq!(pd_log[0].method, "POST");
    assert_eq!(pd_log[0].path, "/v2/enqueue");
    assert_eq!(trig["routing_key"], PD_KEY);
    assert_eq!(trig["event_action"], "trigger");
    let incidents = agent.incidents(true);
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    let id = incidents[0]["id"].as_i64().unwrap();
    assert_eq!(trig["dedup_key"], agent.key(id));
    // The first confirmed member makes it partial; the second one escalates to major.
    let sev: Vec<String> = pd
        .wait_ok("escalation trigger", 2, T)
        .await
        .iter()
        .map(|r| {
            r.json()["payload"]["severity"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(sev, ["error", "critical"]);
    let p = &pd.requests()[1].json()["payload"];
    assert_eq!(p["source"], "test-vantage");
    assert_eq!(p["component"], "API");
    assert_eq!(p["class"], "connect_refused");
    assert!(
        p["summary"].as_str().unwrap().starts_with("[DOWN] API: "),
        "{p}"
    );
    assert!(p["custom_details"]["last_error"]
        .as_str()
        .unwrap()
        .contains("connection refused"));
    assert!(p["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        pd.requests()[1].json()["links"][0]["href"],
        "http://dash.example/"
    );

    // Instatus: incident opened once with statuses, component set, then updated on escalation.
    let log = is
        .wait_for("Instatus open + escalation", T, |l| {
            l.iter().filter(|r| r.method == "PUT").count() >= 2
        })
        .await;
    for r in &log {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {INSTATUS_KEY}").as_str()),
            "{} {}",
            r.method,
            r.path
        );
    }
    let opens: Vec<&Recorded> = log
        .iter()
        .filter(|r| r.path == "/v1/page1/incidents")
        .collect();
    assert_eq!(opens.len(), 1);
    let o = opens[0].json();
    assert_eq!(o["status"], "INVESTIGATING");
    assert_eq!(o["components"], json!(["comp-api"]));
    assert_eq!(
        o["statuses"],
        json!([{"id": "comp-api", "status": "PARTIALOUTAGE"}])
    );
    assert_eq!(o["notify"], true);
    let puts: Vec<String> = log
        .iter()
        .filter(|r| r.method == "PUT")
        .map(|r| format!("{} {}", r.path, r.json()["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        puts,
        [
            "/v1/page1/components/comp-api PARTIALOUTAGE",
            "/v1/page1/components/comp-api MAJOROUTAGE"
        ]
    );
    let upd: Vec<&Recorded> = log
        .iter()
        .filter(|r| r.path == "/v1/page1/incidents/inst-1/incident-updates")
        .collect();
    assert_eq!(upd.len(), 1);
    assert_eq!(upd[0].json()["statuses"][0]["status"], "MAJOROUTAGE");

    // Webhook: signed watchpost events.
    let hooks = hook.wait_ok("webhook open + escalation", 2, T).await;
    let body = &hooks[0].body;
    assert_eq!(
        hooks[0].header("x-watchpost-signature").unwrap(),
        watchpost::notify::webhook::signature(HOOK_SECRET.as_bytes(), body)
    );
    assert_eq!(hooks[0].header("x-watchpost-event"), Some("opened"));
    let j = hooks[0].json();
    assert_eq!(j["event"], "incident.opened");
    assert_eq!(j["incident"]["id"], id);
    assert_eq!(j["incident"]["key"], agent.key(id));

    // Mail: open + escalation, threaded.
    let mails = sink.wait_mails(2, T).await;
    let subject = mails[0].header("subject").unwrap();
    assert!(subject.starts_with("[DOWN] API: "), "{subject}");
    let root = mails[0].header("message-id").unwrap();
    assert_eq!(mails[1].header("in-reply-to").unwrap(), root);

    // Recovery: two good runs each, then 300 ms clear.
    agent.both(Up).await;
    agent.both(Up).await;
    let pd_log = pd.wait_ok("PagerDuty resolve", 3, T).await;
    let events = pd_events(&pd_log);
    assert_eq!(events[2], ("resolve".to_string(), agent.key(id)));
    assert_eq!(
        pd_log[2].json(),
        json!({"routing_key": PD_KEY, "dedup_key": agent.key(id), "event_action": "resolve"})
    );
    let log = is
        .wait_for("Instatus resolve", T, |l| {
            l.iter()
                .any(|r| r.method == "PUT" && r.json()["status"] == "OPERATIONAL")
        })
        .await;
    let res: Vec<&Recorded> = log
        .iter()
        .filter(|r| r.path.ends_with("/incident-updates") && r.json()["status"] == "RESOLVED")
        .collect();
    assert_eq!(res.len(), 1);
    assert_eq!(res[0].path, "/v1/page1/incidents/inst-1/incident-updates");
    assert_eq!(
        res[0].json()["statuses"],
        json!([{"id": "comp-api", "status": "OPERATIONAL"}])
    );
    // api recovers first (de-escalation to partial), then db: resolved.
    let hooks = hook.wait_ok("webhook resolve", 4, T).await;
    let evs: Vec<String> = hooks
        .iter()
        .map(|h| h.json()["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        evs,
        [
            "incident.opened",
            "incident.escalated",
            "incident.deescalated",
            "incident.resolved"
        ]
    );
    assert!(hooks[3].json()["incident"]["resolved_at"].is_string());
    assert_eq!(hooks[3].json()["incident"]["key"], agent.key(id));
    let mails = sink.wait_mails(3, T).await;
    let subject = mails[2].header("subject").unwrap();
    assert!(subject.starts_with("[RESOLVED] API after "), "{subject}");
    assert_eq!(mails[2].header("in-reply-to").unwrap(), root);
    assert!(mails[2].raw.contains("multipart/alternative"));
    assert!(mails[2].raw.contains("text/plain") && mails[2].raw.contains("text/html"));
    assert_eq!(
        mails[2].header("x-sink-rcpt-to").unwrap(),
        "oncall@example.com"
    );

    agent.drained(T).await;
    assert!(agent.incidents(true).is_empty());
    let all = agent.incidents(false);
    assert_eq!(all.len(), 1);
    let kinds: Vec<&str> = all[0]["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["opened", "escalated", "deescalated", "resolved"]);
    assert_eq!(all[0]["worst_status"], "major_outage");
    assert_eq!(all[0]["status"], "resolved");
    let first = &all[0]["timeline"][0];
    assert_eq!(first["class"], "connect_refused");
    assert!(first["member"].is_string());
    let table = watchpost::incident::render_incidents(&agent.incident_views(false));
    assert!(table.contains("resolved (major_outage)"), "{table}");
    let m = agent.metrics.render();
    assert!(
        m.contains("watchpost_component_status{component=\"API\",status=\"operational\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("watchpost_notifications_total{notifier=\"pager\",result=\"delivered\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("watchpost_outbox_pending{notifier=\"pager\"} 0"),
        "{m}"
    );
    agent.stop().await;
    // Exactly once each.
    assert_eq!(pd_events(&pd.requests()).len(), 3);
    assert_eq!(hook.requests().len(), 4);
    assert_eq!(
        sink.mails().len(),
        3,
        "open, escalation, resolve (de-escalations are not mailed)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn degraded_escalates_to_major_in_the_same_incident() {
    let dir = tempfile::tempdir().unwrap();
    let (is, pd) = (instatus().await, pagerduty().await);
    let t = Targets {
        instatus: Some(is.url()),
        pagerduty: Some(pd.url()),
        ..Default::default()
    };
    let agent = Agent::start(write_config(dir.path(), &t, THRESHOLDS, ""), true).await;
    agent.send(run("api", Degraded)).await;
    agent.send(run("api", Degraded)).await;
    pd.wait_ok("degraded trigger", 1, T).await;
    agent.both(Down).await;
    agent.both(Down).await;
    let log = pd.wait_ok("escalations", 3, T).await;
    let sev: Vec<String> = log
        .iter()
        .map(|r| {
            r.json()["payload"]["severity"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(sev, ["warning", "error", "critical"]);
    let keys: std::collections::HashSet<String> =
        pd_events(&log).into_iter().map(|e| e.1).collect();
    assert_eq!(keys.len(), 1, "one dedup key for the whole incident");
    let is_log = is
        .wait_for("Instatus updates", T, |l| {
            l.iter().filter(|r| r.method == "PUT").count() >= 3
        })
        .await;
    assert_eq!(
        is_log
            .iter()
            .filter(|r| r.path == "/v1/page1/incidents")
            .count(),
        1,
        "one status-page incident"
    );
    let puts: Vec<String> = is_log
        .iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.json()["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        puts,
        ["DEGRADEDPERFORMANCE", "PARTIALOUTAGE", "MAJOROUTAGE"]
    );
    assert_eq!(
        is_log
            .iter()
            .filter(|r| r.path.ends_with("/incident-updates"))
            .count(),
        2
    );
    // De-escalation: db recovers → partial (an Instatus update, no page).
    agent.send(run("db", Up)).await;
    agent.send(run("db", Up)).await;
    is.wait_for("de-escalation", T, |l| {
        l.iter().any(|r| {
            r.method == "PUT"
                && r.json()["status"] == "PARTIALOUTAGE"
                && l.iter().filter(|x| x.method == "PUT").count() >= 4
        })
    })
    .await;
    let incidents = agent.incidents(false);
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0]["worst_status"], "major_outage");
    assert_eq!(incidents[0]["status"], "partial_outage");
    let kinds: Vec<&str> = incidents[0]["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["opened", "escalated", "escalated", "deescalated"]);
    agent.drained(T).await;
    assert_eq!(pd.requests().len(), 3, "de-escalation does not page");
    agent.stop().await;
}

// Virtual time: each recovery hold passes because the test advances past it.
#[tokio::test(start_paused = true)]
async fn flapping_target_stays_in_one_incident() {
    let dir = tempfile::tempdir().unwrap();
    let pd = pagerduty().await;
    let t = Targets {
        pagerduty: Some(pd.url()),
        ..Default::default()
    };
    let rules = "failure_threshold = 1\nsuccess_threshold = 1\nrecovery = \"100ms\"\nmax_incidents_per_hour = 2";
    let agent = Agent::start(write_config(dir.path(), &t, rules, ""), true).await;
    for _ in 0..5 {
        agent.send(run("api", Down)).await;
        tokio::time::advance(Duration::from_millis(50)).await;
        agent.send(run("api", Up)).await;
        tokio::time::advance(Duration::from_millis(300)).await;
        settle(Duration::from_millis(50)).await;
    }
    agent.drained(T).await;
    let incidents = agent.incidents(false);
    assert_eq!(
        incidents.len(),
        2,
        "max_incidents_per_hour = 2: {incidents:#?}"
    );
    let open = agent.incidents(true);
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["flapping"], true);
    let events = pd_events(&pd.requests());
    let triggers: std::collections::BTreeSet<&str> = events
        .iter()
        .filter(|e| e.0 == "trigger")
        .map(|e| e.1.as_str())
        .collect();
    assert_eq!(triggers.len(), 2, "paged once per incident: {events:?}");
    assert_eq!(
        events.iter().filter(|e| e.0 == "resolve").count(),
        1,
        "the held incident is not resolved: {events:?}"
    );
    agent.stop().await;
}

// Virtual time: the window ends only when the test advances past it, so "no incident
// during maintenance" cannot race a wall-clock window on a loaded machine.
#[tokio::test(start_paused = true)]
async fn maintenance_window_suppresses_incidents() {
    let dir = tempfile::tempdir().unwrap();
    let (is, pd) = (instatus().await, pagerduty().await);
    let t = Targets {
        instatus: Some(is.url()),
        pagerduty: Some(pd.url()),
        ..Default::default()
    };
    let now = chrono::Utc::now();
    let end = now + chrono::Duration::milliseconds(1500);
    let fmt =
        |d: chrono::DateTime<chrono::Utc>| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let extra = format!(
        "[[maintenance]]\ncomponents = [\"API\"]\nreason = \"database upgrade\"\nstart = \"{}\"\nend = \"{}\"\n",
        fmt(now - chrono::Duration::minutes(1)),
        fmt(end)
    );
    let agent = Agent::start(write_config(dir.path(), &t, THRESHOLDS, &extra), true).await;
    is.wait_for("UNDERMAINTENANCE", T, |l| {
        l.iter()
            .any(|r| r.method == "PUT" && r.json()["status"] == "UNDERMAINTENANCE")
    })
    .await;
    for _ in 0..3 {
        agent.both(Down).await;
    }
    settle(Duration::from_millis(300)).await;
    assert!(
        agent.incidents(false).is_empty(),
        "no incident during maintenance"
    );
    assert!(pd.requests().is_empty(), "no page during maintenance");
    // Still down when the window ends: a normal incident opens.
    tokio::time::advance(Duration::from_millis(1600)).await;
    pd.wait_ok("trigger after the window", 1, T).await;
    let opened = agent.incidents(true)[0]["opened_at"]
        .as_str()
        .unwrap()
        .parse::<chrono::DateTime<chrono::Utc>>()
        .unwrap();
    assert!(opened >= end, "opened at {opened}, window ends {end}");
    let inc = agent.incidents(true);
    assert_eq!(inc.len(), 1);
    assert_eq!(inc[0]["status"], "major_outage");
    agent.stop().await;
    let conn = watchpost::store::open_reader(&dir.path().join("data/watchpost.db"))
        .unwrap()
        .unwrap();
    let (kind, note): (String, String) = conn
        .query_row(
            "SELECT kind, note FROM incident_events WHERE incident_id IS NULL ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (kind.as_str(), note.as_str()),
        ("maintenance_started", "database upgrade")
    );
}

// Virtual time: no retry can fire while the test checks that nothing is sent twice.
#[tokio::test(start_paused = true)]
async fn killed_after_commit_before_delivery_delivers_exactly_once_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (is, pd, hook) = (instatus().await, pagerduty().await, Recorder::start().await);
    let sink = smtp::SmtpSink::start(Some((SMTP_USER, SMTP_PASS)), false);
    let t = Targets {
        instatus: Some(is.url()),
        pagerduty: Some(pd.url()),
        webhook: Some(hook.url()),
        smtp: Some(sink.url()),
        delivery: None,
    };
    let cfg = write_config(dir.path(), &t, THRESHOLDS, "");
    // First life: no dispatcher ran yet when the process dies.
    let agent = Agent::start(cfg.clone(), false).await;
    agent.both(Down).await;
    agent.both(Down).await;
    until("transition committed with its outbox rows", T, || {
        agent.outbox().len() == 8
    })
    .await;
    agent.kill().await;
    assert!(
        pd.requests().is_empty()
            && is.requests().is_empty()
            && hook.requests().is_empty()
            && sink.mails().is_empty()
    );

    // Second life on the same database.
    let agent = Agent::start(cfg.clone(), true).await;
    agent.drained(T).await;
    settle(Duration::from_millis(300)).await;
    let events = pd_events(&pd.requests());
    assert_eq!(events.len(), 2, "open + escalation, each once: {events:?}");
    assert_eq!(events[0].1, events[1].1, "same dedup key");
    assert_eq!(
        is.requests()
            .iter()
            .filter(|r| r.path == "/v1/page1/incidents")
            .count(),
        1
    );
    assert_eq!(hook.requests().len(), 2);
    assert_eq!(sink.mails().len(), 2);
    agent.stop().await;

    // A third life delivers nothing again.
    let agent = Agent::start(cfg, true).await;
    settle(Duration::from_millis(300)).await;
    assert_eq!(pd.requests().len(), 2);
    assert_eq!(hook.requests().len(), 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_mid_incident_resolves_the_same_instatus_incident() {
    let dir = tempfile::tempdir().unwrap();
    let (is, pd) = (instatus().await, pagerduty().await);
    let t = Targets {
        instatus: Some(is.url()),
        pagerduty: Some(pd.url()),
        ..Default::default()
    };
    let cfg = write_config(dir.path(), &t, THRESHOLDS, "");
    let agent = Agent::start(cfg.clone(), true).await;
    agent.both(Down).await;
    agent.both(Down).await;
    agent.drained(T).await;
    agent.stop().await;

    let agent = Agent::start(cfg, true).await;
    let open = agent.incidents(true);
    assert_eq!(open.len(), 1, "incident survives the restart");
    agent.both(Up).await;
    agent.both(Up).await;
    let log = is
        .wait_for("resolve", T, |l| {
            l.iter().any(|r| r.json()["status"] == "RESOLVED")
        })
        .await;
    let res: Vec<&Recorded> = log
        .iter()
        .filter(|r| r.json()["status"] == "RESOLVED")
        .collect();
    assert_eq!(res.len(), 1);
    assert_eq!(
        res[0].path, "/v1/page1/incidents/inst-1/incident-updates",
        "same Instatus incident"
    );
    assert_eq!(
        log.iter()
            .filter(|r| r.path == "/v1/page1/incidents")
            .count(),
        1,
        "no second status-page incident"
    );
    let events = pd_events(&pd.wait_ok("pd resolve", 3, T).await);
    assert_eq!(events.last().unwrap().0, "resolve");
    assert_eq!(
        events.last().unwrap().1,
        events[0].1,
        "resolve uses the trigger's dedup key"
    );
    agent.drained(T).await;
    assert!(agent.incidents(true).is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sub_check_members_and_missing_sub_checks() {
    use watchpost::probe::{ErrorInfo, SubCheck};
    let dir = tempfile::tempdir().unwrap();
    let pd = pagerduty().await;
    let t = Targets {
        pagerduty: Some(pd.url()),
        ..Default::default()
    };
    let cfg = write_config(dir.path(), &t, THRESHOLDS, "");
    // Rewrite the component to a sub-check member.
    let path = dir.path().join("watchpost.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "probes = [\"api\", \"db\"]",
        "probes = [\"api/checks.database\"]",
    );
    std::fs::write(&path, text).unwrap();
    drop(cfg);
    let cfg = std::sync::Arc::new(watchpost::config::load(&path).unwrap());
    let agent = Agent::start(cfg, true).await;
    let mut r = run("api", Up);
    r.subchecks.push(SubCheck {
        series: "api/checks.database".into(),
        outcome: Down,
        latency: None,
        error: Some(ErrorInfo {
            class: watchpost::probe::ErrorClass::Unhealthy,
            message: "database: connection pool exhausted".into(),
        }),
    });
    agent.send(r).await;
    // A failed run reports no sub-checks: the member counts as failed with the run's error.
    agent.send(run("api", Down)).await;
    let log = pd.wait_ok("trigger", 1, T).await;
    let p = &log[0].json()["payload"];
    assert_eq!(p["severity"], "critical");
    assert_eq!(p["custom_details"]["member"], "api/checks.database");
    assert_eq!(p["group"], "api");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latency_budget_breach_over_the_window_degrades() {
    let dir = tempfile::tempdir().unwrap();
    let pd = pagerduty().await;
    let t = Targets {
        pagerduty: Some(pd.url()),
        ..Default::default()
    };
    let rules = format!("{THRESHOLDS}\nbudget_window = \"10m\"\nbudget_min_samples = 5");
    let agent = Agent::start(write_config(dir.path(), &t, &rules, ""), true).await;
    // Up runs, but slow: total 300 ms against a p95 budget of 100 ms.
    for n in 0..8 {
        let mut r = run("api", Up);
        r.phases = vec![("total".into(), Duration::from_millis(300))];
        agent.send(r).await;
        agent.store.flush().await.unwrap();
        if n < 4 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert!(
                agent.incidents(false).is_empty(),
                "judged before budget_min_samples runs"
            );
        }
    }
    let log = pd.wait_ok("budget trigger", 1, T).await;
    let p = &log[0].json()["payload"];
    assert_eq!(p["severity"], "warning");
    assert_eq!(p["class"], "latency_budget");
    let msg = p["custom_details"]["last_error"].as_str().unwrap();
    assert!(
        msg.starts_with("p95 of total is 300ms over its 100ms budget"),
        "{msg}"
    );
    assert_eq!(agent.incidents(true)[0]["status"], "degraded");
    agent.stop().await;
}

/// The stored state of component API, if written yet.
fn stored_state(agent: &Agent) -> Option<serde_json::Value> {
    let conn = agent.store.reader().unwrap();
    let s: Option<String> = conn
        .query_row(
            "SELECT state FROM component_state WHERE component = 'API'",
            [],
            |r| r.get(0),
        )
        .ok();
    s.map(|s| serde_json::from_str(&s).unwrap())
}

// Component state is written when it changes, not on every run: a steady good component
// costs no write per run, and what a restart needs is still there. A trigger counts the
// writes the agent makes to the table.
#[tokio::test(start_paused = true)]
async fn component_state_is_written_on_change_not_on_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &Targets::default(), THRESHOLDS, "");
    let agent = Agent::start(cfg.clone(), false).await;
    let counter = rusqlite::Connection::open(cfg.db_path()).unwrap();
    counter
        .execute_batch(
            "CREATE TABLE t_writes (n INTEGER);
             CREATE TRIGGER t_ins AFTER INSERT ON component_state BEGIN INSERT INTO t_writes VALUES (1); END;
             CREATE TRIGGER t_upd AFTER UPDATE ON component_state BEGIN INSERT INTO t_writes VALUES (1); END;",
        )
        .unwrap();
    let writes = || -> i64 {
        counter
            .query_row("SELECT count(*) FROM t_writes", [], |r| r.get(0))
            .unwrap()
    };
    // 2 good runs per member reach success_threshold: 4 changes, 4 writes.
    for _ in 0..2 {
        agent.both(Up).await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    // 40 more good runs change nothing; the bad run that follows them (same queue, so they
    // were all evaluated before it) is the fifth write.
    for _ in 0..20 {
        agent.both(Up).await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    agent.send(run("api", Down)).await;
    until("the bad run's state is written", T, || {
        stored_state(&agent).is_some_and(|v| v["members"]["api"]["bad_streak"] == 1)
    })
    .await;
    assert_eq!(writes(), 5, "steady good runs rewrote the component state");
    let v = stored_state(&agent).unwrap();
    assert_eq!(v["members"]["db"]["good_streak"], 2, "{v}");

    // A restart picks the bad streak up: one more bad run confirms the member.
    agent.stop().await;
    let agent = Agent::start(cfg, false).await;
    agent.send(run("api", Down)).await;
    until("incident opened after restart", T, || {
        !agent.incidents(true).is_empty()
    })
    .await;
    agent.stop().await;
}
