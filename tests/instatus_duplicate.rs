//! Instatus has no idempotency key: an incident POST that Instatus accepted but whose answer
//! never reached the agent (a timeout, or a crash before the id was stored) must not open a
//! second status-page incident when the delivery is retried. A stateful Instatus stand-in
//! (axum on 127.0.0.1) stores incidents, lists them (`GET /v1/{page}/incidents`, most recent
//! first) and can hold the answer of the first incident POST; the agent is the real
//! evaluator → SQLite outbox → dispatcher → Instatus notifier.

mod notify_harness;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::Json;
use notify_harness::*;
use serde_json::{json, Value};
use watchpost::probe::Outcome::{Down, Up};

const T: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Page {
    /// Stored incidents, oldest first: (id, name, status).
    incidents: Vec<(String, String, String)>,
    /// Incident POSTs received (accepted or not).
    posts: usize,
    /// GETs of the incident list.
    lists: usize,
    /// (incident id, status) of every incident update.
    updates: Vec<(String, String)>,
    /// How long the answer to the first incident POST is held back.
    first_post_delay: Duration,
    /// The first incident POST is refused with 503 and stores nothing.
    first_post_fails: bool,
    /// The incident list answers 403 (a key without read access).
    list_forbidden: bool,
}

type Shared = Arc<Mutex<Page>>;

async fn create(
    State(s): State<Shared>,
    Path(page): Path<String>,
    Json(b): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let (id, delay) = {
        let mut p = s.lock().unwrap();
        p.posts += 1;
        if p.posts == 1 && p.first_post_fails {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": {"code": "unavailable", "message": "try later"}})),
            );
        }
        let id = format!("inst-{}", p.incidents.len() + 1);
        let name = b["name"].as_str().unwrap_or_default().to_string();
        p.incidents.push((id.clone(), name, "INVESTIGATING".into()));
        let delay = if p.posts == 1 {
            p.first_post_delay
        } else {
            Duration::ZERO
        };
        (id, delay)
    };
    assert_eq!(page, "page1");
    // Stored already; only the answer is late.
    tokio::time::sleep(delay).await;
    (
        StatusCode::OK,
        Json(json!({"id": id, "name": b["name"], "status": "INVESTIGATING"})),
    )
}

async fn list(State(s): State<Shared>) -> (StatusCode, Json<Value>) {
    let mut p = s.lock().unwrap();
    p.lists += 1;
    if p.list_forbidden {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": {"code": "forbidden", "message": "no read access"}})),
        );
    }
    // Decoys: a resolved incident and another watchpost incident's marker.
    let mut v = vec![
        json!({"id": "old-resolved", "name": "API major outage (#1)", "status": "RESOLVED"}),
        json!({"id": "other", "name": "API major outage (#11)", "status": "INVESTIGATING"}),
    ];
    v.extend(
        p.incidents
            .iter()
            .map(|(id, name, status)| json!({"id": id, "name": name, "status": status})),
    );
    v.reverse();
    (StatusCode::OK, Json(Value::Array(v)))
}

async fn update(
    State(s): State<Shared>,
    Path((_page, id)): Path<(String, String)>,
    Json(b): Json<Value>,
) -> Json<Value> {
    let mut p = s.lock().unwrap();
    let status = b["status"].as_str().unwrap_or_default().to_string();
    if let Some(i) = p.incidents.iter_mut().find(|i| i.0 == id) {
        i.2 = status.clone();
    }
    p.updates.push((id, status));
    Json(json!({"id": "upd"}))
}

async fn instatus(first_post_delay: Duration, first_post_fails: bool) -> (String, Shared) {
    let s: Shared = Arc::new(Mutex::new(Page {
        first_post_delay,
        first_post_fails,
        list_forbidden: false,
        ..Default::default()
    }));
    let app = axum::Router::new()
        .route("/v1/{page}/incidents", post(create).get(list))
        .route("/v1/{page}/incidents/{id}/incident-updates", post(update))
        .route(
            "/v1/{page}/components/{id}",
            put(|| async { Json(json!({})) }),
        )
        .route("/", get(|| async { "instatus" }))
        .with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, s)
}

fn targets(url: &str, timeout: &str) -> Targets {
    Targets {
        instatus: Some(url.to_string()),
        delivery: Some(format!(
            "delivery = {{ retry_initial = \"50ms\", retry_max = \"200ms\", timeout = \"{timeout}\", rate_limit = 50 }}"
        )),
        ..Default::default()
    }
}

/// Wait for the open and the escalation (partial → major) to be delivered.
async fn opened(agent: &Agent, s: &Shared) {
    until("the escalation update", T, || {
        !s.lock().unwrap().updates.is_empty()
    })
    .await;
    agent.drained(T).await;
}

/// Recover, then check the whole story on the server: one incident, carrying the marker, and
/// every update (escalation, resolve) went to it.
async fn resolve_and_check(agent: Agent, s: &Shared) {
    let id = agent.incidents(true)[0]["id"].as_i64().unwrap();
    agent.both(Up).await;
    agent.both(Up).await;
    until("the resolve", T, || {
        s.lock().unwrap().updates.iter().any(|u| u.1 == "RESOLVED")
    })
    .await;
    agent.drained(T).await;
    {
        let p = s.lock().unwrap();
        assert_eq!(
            p.incidents.len(),
            1,
            "one status-page incident: {:?}",
            p.incidents
        );
        let (iid, name, status) = &p.incidents[0];
        assert!(name.ends_with(&format!(" (#{id})")), "marker in {name:?}");
        assert_eq!(status, "RESOLVED");
        assert!(!p.updates.is_empty());
        assert!(
            p.updates.iter().all(|u| &u.0 == iid),
            "every update reaches {iid}: {:?}",
            p.updates
        );
        assert_eq!(p.updates.last().unwrap().1, "RESOLVED");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timed_out_incident_post_is_adopted_not_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let (url, s) = instatus(Duration::from_millis(1500), false).await;
    let cfg = write_config(dir.path(), &targets(&url, "400ms"), THRESHOLDS, "");
    let agent = Agent::start(cfg, true).await;
    agent.both(Down).await;
    agent.both(Down).await;
    opened(&agent, &s).await;
    {
        let p = s.lock().unwrap();
        assert_eq!(
            p.posts, 1,
            "the retry looked the incident up instead of POSTing"
        );
        assert!(p.lists >= 1, "the retry listed the incidents");
        assert_eq!(p.incidents.len(), 1);
    }
    resolve_and_check(agent, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_after_the_incident_post_is_adopted_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    // The first answer never comes while the agent lives.
    let (url, s) = instatus(Duration::from_secs(60), false).await;
    let cfg = write_config(dir.path(), &targets(&url, "10s"), THRESHOLDS, "");
    let agent = Agent::start(cfg.clone(), true).await;
    agent.both(Down).await;
    agent.both(Down).await;
    until("the incident POST", T, || s.lock().unwrap().posts == 1).await;
    agent.kill().await;

    let agent = Agent::start(cfg, true).await;
    opened(&agent, &s).await;
    {
        let p = s.lock().unwrap();
        assert_eq!(p.posts, 1, "no second POST after the restart");
        assert_eq!(p.lists, 1, "one look-up, by the restarted agent");
    }
    resolve_and_check(agent, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_incident_post_is_sent_again_after_a_look_up() {
    // The first POST is refused (503, nothing stored): the retry's look-up finds no marked
    // incident and POSTs again. Exactly one incident.
    let dir = tempfile::tempdir().unwrap();
    let (url, s) = instatus(Duration::ZERO, true).await;
    let cfg = write_config(dir.path(), &targets(&url, "2s"), THRESHOLDS, "");
    let agent = Agent::start(cfg, true).await;
    agent.both(Down).await;
    agent.both(Down).await;
    opened(&agent, &s).await;
    {
        let p = s.lock().unwrap();
        assert_eq!(p.posts, 2, "refused, then sent again");
        assert!(p.lists >= 1);
    }
    resolve_and_check(agent, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_incident_list_does_not_block_the_open() {
    // Refused first POST, then the list answers 403 (not worth retrying): the incident is
    // opened anyway rather than dead-lettered.
    let dir = tempfile::tempdir().unwrap();
    let (url, s) = instatus(Duration::ZERO, true).await;
    s.lock().unwrap().list_forbidden = true;
    let cfg = write_config(dir.path(), &targets(&url, "2s"), THRESHOLDS, "");
    let agent = Agent::start(cfg, true).await;
    agent.both(Down).await;
    agent.both(Down).await;
    opened(&agent, &s).await;
    {
        let p = s.lock().unwrap();
        assert_eq!(p.posts, 2);
        assert_eq!(p.lists, 1);
    }
    assert!(
        agent.outbox().iter().all(|r| r.2 == "delivered"),
        "{:?}",
        agent.outbox()
    );
    resolve_and_check(agent, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_attempt_posts_without_a_look_up() {
    let dir = tempfile::tempdir().unwrap();
    let (url, s) = instatus(Duration::ZERO, false).await;
    let cfg = write_config(dir.path(), &targets(&url, "2s"), THRESHOLDS, "");
    let agent = Agent::start(cfg, true).await;
    agent.both(Down).await;
    agent.both(Down).await;
    opened(&agent, &s).await;
    {
        let p = s.lock().unwrap();
        assert_eq!(p.posts, 1);
        assert_eq!(p.lists, 0, "the guard costs nothing on a first attempt");
    }
    resolve_and_check(agent, &s).await;
}
