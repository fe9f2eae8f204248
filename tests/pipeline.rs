//! The daemon's pipeline as a whole: supervision (a task that dies stops the daemon with an
//! error naming it), `/health` per part (dead or wedged parts fail it), one shutdown
//! deadline that also cuts a notification delivery in flight, and retention of the outbox
//! and incident tables.

mod notify_harness;
#[path = "common/recorder.rs"]
mod recorder;

use std::sync::Arc;
use std::time::{Duration, Instant};

use notify_harness::*;
use recorder::{Recorder, Reply};
use serde_json::Value;
use watchpost::config::Config;
use watchpost::pipeline::{Options, Pipeline};
use watchpost::probe::Outcome::Down;

const T: Duration = Duration::from_secs(10);

/// The harness config (component API, a webhook notifier at `hook`) with extra `[agent]`
/// lines.
fn config(dir: &std::path::Path, hook: &str, delivery: &str, agent: &str) -> Arc<Config> {
    let t = Targets {
        webhook: Some(hook.to_string()),
        delivery: Some(delivery.to_string()),
        ..Default::default()
    };
    let (notifiers, names) = notifiers_toml(&t);
    let path = write_config_file(dir, &names, &notifiers, THRESHOLDS, "");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("listen = \"\"\n", &format!("listen = \"\"\n{agent}\n"));
    std::fs::write(&path, text).unwrap();
    match watchpost::config::load(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test config invalid:\n{e}"),
    }
}

async fn start_with_api(config: Arc<Config>) -> (Pipeline, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/health", l.local_addr().unwrap());
    let p = Pipeline::start(
        config,
        Options {
            listener: Some(l),
            ..Options::default()
        },
    )
    .unwrap();
    (p, url)
}

async fn health(url: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(T)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers().get("cache-control").unwrap().to_str().unwrap(),
        "no-store"
    );
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_reports_each_part_and_a_killed_task_fails_it_and_stops_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::start().await;
    let (mut p, url) = start_with_api(config(dir.path(), &hook.url(), FAST, "")).await;

    let (code, h) = health(&url).await;
    assert_eq!(code, 200, "{h:#}");
    assert_eq!(h["status"], "ok", "{h:#}");
    assert_eq!(h["service"], "watchpost");
    for k in ["version", "uptime_seconds", "timestamp"] {
        assert!(!h[k].is_null(), "{k} missing: {h:#}");
    }
    for part in ["scheduler", "writer", "evaluator", "dispatcher"] {
        assert_eq!(h["checks"][part]["status"], "ok", "{part}: {h:#}");
        assert!(h["checks"][part]["latency_ms"].is_number(), "{part}: {h:#}");
    }

    assert!(p.abort("evaluator"));
    let fault = p.fault().await;
    assert_eq!(fault.task, "evaluator");
    let (code, h) = health(&url).await;
    assert_eq!(code, 503, "{h:#}");
    assert_eq!(h["status"], "fail");
    assert_eq!(h["checks"]["evaluator"]["status"], "fail", "{h:#}");
    let why = h["checks"]["evaluator"]["error"].as_str().unwrap();
    assert!(why.contains("evaluator"), "{why}");
    assert_eq!(h["checks"]["writer"]["status"], "ok", "{h:#}");
    p.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_that_dies_makes_the_daemon_return_an_error_naming_it() {
    for task in ["dispatcher", "scheduler", "fan-out", "maintenance", "api"] {
        let dir = tempfile::tempdir().unwrap();
        let hook = Recorder::start().await;
        let (p, _) = start_with_api(config(dir.path(), &hook.url(), FAST, "")).await;
        assert!(p.abort(task), "{task}");
        // `wait` is what `watchpost::run` does after starting the pipeline.
        let r = tokio::time::timeout(T, p.wait(std::future::pending())).await;
        let err = match r {
            Ok(Err(e)) => format!("{e:#}"),
            other => panic!("{task}: expected an error, got {other:?}"),
        };
        assert!(err.contains(&format!("task {task} ")), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_shutdown_is_ok() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::start().await;
    let (p, _) = start_with_api(config(dir.path(), &hook.url(), FAST, "")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = p.wait(tokio::time::sleep(Duration::from_millis(100))).await;
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wedged_writer_fails_health_until_it_answers_again() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::start().await;
    let (p, url) = start_with_api(config(dir.path(), &hook.url(), FAST, "")).await;
    assert_eq!(health(&url).await.0, 200);
    // Hold the writer thread for longer than the health ping waits (5 s).
    let store = p.store.clone();
    let stuck = tokio::spawn(async move {
        store
            .write(|_| {
                std::thread::sleep(Duration::from_millis(6500));
                Ok(())
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, h) = health(&url).await;
    assert_eq!(code, 503, "{h:#}");
    assert_eq!(h["checks"]["writer"]["status"], "fail", "{h:#}");
    let why = h["checks"]["writer"]["error"].as_str().unwrap();
    assert!(why.contains("wedged"), "{why}");
    stuck.await.unwrap().unwrap();
    let (code, h) = health(&url).await;
    assert_eq!(code, 200, "{h:#}");
    p.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shutdown_deadline_cuts_a_delivery_in_flight_which_stays_pending() {
    let dir = tempfile::tempdir().unwrap();
    // The webhook answers after 60 s; its own delivery timeout is 30 s.
    let hook = Recorder::with_default(|_| Reply::status(200).delay(Duration::from_secs(60))).await;
    let delivery = r#"delivery = { retry_initial = "50ms", retry_max = "400ms", timeout = "30s", rate_limit = 50 }"#;
    let cfg = config(dir.path(), &hook.url(), delivery, "shutdown_grace = \"1s\"");
    let p = Pipeline::start(
        cfg,
        Options {
            scheduler: false,
            ..Options::default()
        },
    )
    .unwrap();
    for _ in 0..2 {
        p.send(run("api", Down)).await.unwrap();
        p.send(run("db", Down)).await.unwrap();
    }
    hook.wait_for("the delivery to start", T, |l| !l.is_empty())
        .await;
    let db = p.store.target().clone();
    let t0 = Instant::now();
    p.stop().await.unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "shutdown took {took:?} with a 1 s grace"
    );
    let conn = db.reader().unwrap().unwrap();
    let status: String = conn
        .query_row("SELECT status FROM outbox ORDER BY id LIMIT 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(
        status, "pending",
        "a cut delivery is retried after the next start"
    );
}

fn count(conn: &watchpost::store::Conn, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_prunes_the_outbox_resolved_timelines_and_notifier_refs() {
    use watchpost::probe::Outcome::Up;
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::start().await;
    let cfg = config(dir.path(), &hook.url(), FAST, "");
    let agent = Agent::start(cfg.clone(), true).await;
    // Incident 1: opened and resolved. Incident 2: opened and still open.
    agent.both(Down).await;
    agent.both(Down).await;
    hook.wait_for("opened", T, |l| !l.is_empty()).await;
    agent.both(Up).await;
    agent.both(Up).await;
    until("the first incident resolved", T, || {
        agent.incidents(true).is_empty() && agent.incidents(false).len() == 1
    })
    .await;
    agent.drained(T).await;
    agent.both(Down).await;
    agent.both(Down).await;
    until("the second incident opened", T, || {
        agent.incidents(true).len() == 1
    })
    .await;
    agent.drained(T).await;
    let (resolved, open) = {
        let all = agent.incidents(false);
        let id = |v: &Value| v["id"].as_i64().unwrap();
        let open = all.iter().find(|v| v["open"] == true).map(id).unwrap();
        let resolved = all.iter().find(|v| v["open"] == false).map(id).unwrap();
        (resolved, open)
    };
    // References: one of each incident, a delivery step of a finished row, and one old
    // reference of the open incident, which must stay.
    let now = chrono::Utc::now().timestamp_millis();
    agent
        .store
        .write(move |c| {
            for scope in [resolved, open, -1] {
                watchpost::notify::outbox::set_ref(c, "mitigate", scope, "k", "v", now)?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let conn = agent.store.reader().unwrap();
    let events_of = |id: i64| {
        count(
            &conn,
            &format!("SELECT count(*) FROM incident_events WHERE incident_id = {id}"),
        )
    };
    assert!(events_of(resolved) >= 2 && events_of(open) >= 1);
    assert!(count(&conn, "SELECT count(*) FROM outbox") >= 3);

    // A pass within retention removes nothing.
    let kept = watchpost::pipeline::maintain_once(&cfg, &agent.store, now + 1000)
        .await
        .unwrap();
    assert_eq!(kept, Default::default());

    // Eight days later (runs retention is 7 days).
    let later = now + 8 * 86_400_000;
    let pruned = watchpost::pipeline::maintain_once(&cfg, &agent.store, later)
        .await
        .unwrap();
    assert!(pruned.outbox >= 3, "{pruned:?}");
    assert_eq!(count(&conn, "SELECT count(*) FROM outbox"), 0);
    assert_eq!(
        events_of(resolved),
        0,
        "resolved incident's timeline pruned"
    );
    assert!(events_of(open) >= 1, "open incident keeps its timeline");
    let refs: Vec<i64> = {
        let mut st = conn
            .prepare("SELECT incident_id FROM notifier_refs ORDER BY incident_id")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(refs, [open], "only the open incident's reference is left");
    assert_eq!(
        count(&conn, "SELECT count(*) FROM incidents"),
        2,
        "incident rows stay"
    );
    drop(conn);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_heartbeat_pings_while_healthy_and_stops_while_the_writer_is_wedged() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::start().await;
    let switch = Recorder::start().await;
    let agent = format!(
        "heartbeat = {{ url = \"{}/ping/check-uuid\", method = \"POST\", interval = \"200ms\", timeout = \"1s\" }}",
        switch.url()
    );
    let p = Pipeline::start(
        config(dir.path(), &hook.url(), FAST, &agent),
        Options::default(),
    )
    .unwrap();
    let pings = switch.wait_for("three pings", T, |l| l.len() >= 3).await;
    assert!(
        pings
            .iter()
            .all(|r| r.method == "POST" && r.path == "/ping/check-uuid"),
        "{pings:?}"
    );
    // Hold the writer for longer than its ping may take (5 s): the switch must see a gap.
    let store = p.store.clone();
    let stuck = tokio::spawn(async move {
        store
            .write(|_| {
                std::thread::sleep(Duration::from_millis(6500));
                Ok(())
            })
            .await
    });
    // A ping whose checks passed just before the wedge may still land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = switch.requests().len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        switch.requests().len(),
        before,
        "no pings while the writer is wedged"
    );
    stuck.await.unwrap().unwrap();
    switch
        .wait_for("pings to resume", T, |l| l.len() >= before + 2)
        .await;
    p.stop().await.unwrap();
}
