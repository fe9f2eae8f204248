//! The control API on a running [`Pipeline`] on 127.0.0.1:0, with real HTTP targets and
//! recording PagerDuty and Instatus servers: the bearer token (401/403), pause → no runs,
//! kept across a restart, resume; run now; a manual resolve delivered through the outbox
//! with its reason on the timeline; maintenance on a component with an open incident.

#[path = "common/recorder.rs"]
mod recorder;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use recorder::{Recorded, Recorder, Reply};
use serde_json::{json, Value};
use watchpost::pipeline::{Options, Pipeline};

const T: Duration = Duration::from_secs(15);
const TOKEN: &str = "ctl-test-token-0123456789";
const TOKEN_ENV: &str = "WPCTL_API_TOKEN";

fn env() {
    std::env::set_var(TOKEN_ENV, TOKEN);
    std::env::set_var("WPCTL_PD_KEY", "ctl-routing-key");
    std::env::set_var("WPCTL_INSTATUS_KEY", "ctl-instatus-key");
}

/// A target whose `/health` answers 503 while `failing` is set; it counts its requests.
async fn target(failing: Arc<AtomicBool>) -> Recorder {
    Recorder::with_default(move |_| {
        if failing.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::status(200)
        }
    })
    .await
}

/// Config: probe `target` every `interval`, component `Target`; `agent` adds `[agent]`
/// lines; `notify` adds notifier tables (and the component's `notify`).
fn write_config(
    dir: &Path,
    target: &str,
    interval: &str,
    agent: &str,
    notify: Option<(&str, &str)>,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("probes")).unwrap();
    std::fs::write(
        dir.join("probes/target.toml"),
        format!("name = \"target\"\nkind = \"http\"\nurl = \"{target}/health\"\ninterval = \"{interval}\"\ntimeout = \"900ms\"\nretries = 0\njitter = \"0s\"\n"),
    )
    .unwrap();
    let (notify_line, notifiers) = match notify {
        Some((pd, is)) => {
            let d = r#"delivery = { retry_initial = "100ms", retry_max = "300ms", timeout = "2s", rate_limit = 50 }"#;
            (
                "notify = [\"pager\", \"page\"]\n".to_string(),
                format!(
                    "[notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"WPCTL_PD_KEY\"\nevents_url = \"{pd}/v2/enqueue\"\n{d}\n\n\
                     [notifier.page]\nkind = \"instatus\"\npage_id = \"pg\"\napi_key_env = \"WPCTL_INSTATUS_KEY\"\nbase_url = \"{is}\"\ncomponents = {{ \"Target\" = \"cmp\" }}\n{d}\n"
                ),
            )
        }
        None => (String::new(), String::new()),
    };
    let text = format!(
        "[agent]\nlocation = \"ctl-test\"\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n{agent}\n\n\
         [[component]]\nname = \"Target\"\nprobes = [\"target\"]\nfailure_threshold = 2\nsuccess_threshold = 2\nrecovery = \"1h\"\n{notify_line}\n{notifiers}"
    );
    let path = dir.join("watchpost.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn start(cfg: &Path) -> (Pipeline, String) {
    let config = match watchpost::config::load(cfg) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test config invalid:\n{e}"),
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let p = Pipeline::start(
        config,
        Options {
            listener: Some(l),
            ..Options::default()
        },
    )
    .unwrap();
    (p, base)
}

/// A request: (status, JSON body or Null).
async fn req(method: &str, url: &str, auth: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let c = reqwest::Client::new();
    let mut r = c.request(method.parse().unwrap(), url).timeout(T);
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("response");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

async fn post(base: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    req("POST", &format!("{base}{path}"), Some(&bearer()), body).await
}

async fn get(base: &str, path: &str) -> Value {
    let (status, v) = req("GET", &format!("{base}{path}"), None, None).await;
    assert_eq!(status, 200, "GET {path}: {v}");
    v
}

/// Wait (in real time) until `f` holds.
async fn until<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + T;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hits(r: &Recorder) -> usize {
    r.requests().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_routes_need_the_bearer_token_403_without_one_configured() {
    env();
    let t = target(Arc::new(AtomicBool::new(false))).await;

    // No token configured: the state-changing routes are off (403), reads are open.
    let open_dir = tempfile::tempdir().unwrap();
    let cfg = write_config(open_dir.path(), &t.url(), "1h", "", None);
    let (p, base) = start(&cfg).await;
    let routes = [
        ("POST", "/api/v1/probes/target/pause"),
        ("POST", "/api/v1/probes/target/resume"),
        ("POST", "/api/v1/probes/target/run"),
        ("POST", "/api/v1/maintenance"),
        ("DELETE", "/api/v1/maintenance/1"),
        ("POST", "/api/v1/incidents/1/resolve"),
    ];
    for (m, path) in routes {
        let (status, v) = req(m, &format!("{base}{path}"), Some(&bearer()), None).await;
        assert_eq!(status, 403, "{m} {path}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("api_token_env"),
            "{v}"
        );
    }
    for path in [
        "/api/v1/components",
        "/api/v1/incidents",
        "/api/v1/runs/latest",
        "/api/v1/report?window=1h",
        "/api/v1/maintenance",
        "/api/runs/latest",
        "/api/incidents",
    ] {
        get(&base, path).await;
    }
    p.stop().await.unwrap();

    // A token configured: missing, malformed or wrong → 401, and nothing changes.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &t.url(),
        "1h",
        &format!("api_token_env = \"{TOKEN_ENV}\""),
        None,
    );
    let (p, base) = start(&cfg).await;
    let url = format!("{base}/api/v1/probes/target/pause");
    let wrong = [
        None,
        Some("Bearer".to_string()),
        Some("Bearer nope".to_string()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_string()),
    ];
    for auth in &wrong {
        let c = reqwest::Client::new();
        let mut r = c.post(&url).timeout(T);
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{auth:?}");
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer")
        );
        let text = resp.text().await.unwrap();
        assert!(
            !text.contains(TOKEN),
            "the token must not be echoed: {text}"
        );
    }
    assert!(
        p.control.paused().names().is_empty(),
        "a refused call paused"
    );
    // The scheme is case-insensitive; the right token works.
    let (status, v) = req("POST", &url, Some(&format!("bearer {TOKEN}")), None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"probe": "target", "paused": true, "changed": true})
    );
    // Unknown probe: 404 (after auth).
    let (status, v) = post(&base, "/api/v1/probes/nope/pause", None).await;
    assert_eq!(status, 404, "{v}");
    // A bad body: 400.
    let (status, v) = req("POST", &url, Some(&bearer()), Some(json!({"why": 1}))).await;
    assert_eq!(status, 400, "{v}");
    p.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_probe_is_not_run_stays_paused_across_a_restart_and_resumes() {
    env();
    let t = target(Arc::new(AtomicBool::new(false))).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = format!("api_token_env = \"{TOKEN_ENV}\"");
    let cfg = write_config(dir.path(), &t.url(), "1s", &agent, None);
    let (p, base) = start(&cfg).await;
    until("scheduled runs", || async { hits(&t) >= 2 }).await;

    let (status, v) = post(
        &base,
        "/api/v1/probes/target/pause",
        Some(json!({"reason": "vendor outage"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // A run already in flight may still land; after that, nothing for several intervals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = hits(&t);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(hits(&t), before, "a paused probe was run");
    let latest = get(&base, "/api/v1/runs/latest").await;
    assert_eq!(latest["paused"], json!(["target"]), "{latest}");
    let comps = get(&base, "/api/v1/components").await;
    assert_eq!(
        comps["components"][0]["members"][0]["paused"],
        json!(true),
        "{comps}"
    );
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("watchpost_probe_paused{probe=\"target\"} 1"),
        "{text}"
    );
    p.stop().await.unwrap();

    // Restarted: still paused.
    let (p, base) = start(&cfg).await;
    let before = hits(&t);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(hits(&t), before, "paused before the restart, run after it");
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("watchpost_probe_paused{probe=\"target\"} 1"),
        "{text}"
    );

    let (status, v) = post(&base, "/api/v1/probes/target/resume", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["changed"], json!(true));
    until("runs after resume", || async { hits(&t) >= before + 2 }).await;
    let latest = get(&base, "/api/v1/runs/latest").await;
    assert_eq!(latest["paused"], json!([]), "{latest}");
    p.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_now_returns_the_run_and_records_it() {
    env();
    let failing = Arc::new(AtomicBool::new(true));
    let t = target(failing.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = format!("api_token_env = \"{TOKEN_ENV}\"");
    // Scheduled once an hour: the runs here are the ones asked for.
    let cfg = write_config(dir.path(), &t.url(), "1h", &agent, None);
    let (p, base) = start(&cfg).await;
    let before = hits(&t);
    let (status, run) = post(&base, "/api/v1/probes/target/run", None).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["probe"], "target");
    assert_eq!(run["kind"], "http");
    assert_eq!(run["outcome"], "down");
    assert_eq!(run["error"]["class"], "http_status", "{run}");
    assert!(run["phases"]["total"].as_f64().is_some(), "{run}");
    assert!(run["started_at"].as_str().is_some(), "{run}");
    assert_eq!(hits(&t), before + 1, "one request per run (retries = 0)");

    failing.store(false, Ordering::SeqCst);
    let (status, run) = post(&base, "/api/v1/probes/target/run", None).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["outcome"], "up", "{run}");
    assert_eq!(run["error"], Value::Null);
    // Stored and shown like a scheduled run.
    until("the run in runs/latest", || async {
        let l = get(&base, "/api/v1/runs/latest").await;
        l["runs"].as_array().is_some_and(|r| {
            r.iter()
                .any(|x| x["probe"] == "target" && x["outcome"] == "up")
        })
    })
    .await;
    let (status, v) = post(&base, "/api/v1/probes/nope/run", None).await;
    assert_eq!(status, 404, "{v}");
    p.stop().await.unwrap();
}

/// Two runs of one probe never overlap: a run-now asked while another run of the probe is in
/// flight waits for it to end (the target sees the second request only after answering the
/// first), and both are returned and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_now_waits_for_the_run_in_flight() {
    env();
    const SLOW: Duration = Duration::from_millis(500);
    let t = Recorder::with_default(|_| Reply::status(200).delay(SLOW)).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = format!("api_token_env = \"{TOKEN_ENV}\"");
    let cfg = write_config(dir.path(), &t.url(), "1h", &agent, None);
    let (p, base) = start(&cfg).await;
    let (a, b) = tokio::join!(
        post(&base, "/api/v1/probes/target/run", None),
        post(&base, "/api/v1/probes/target/run", None)
    );
    for (status, run) in [&a, &b] {
        assert_eq!(*status, 200, "{run}");
        assert_eq!(run["outcome"], "up", "{run}");
    }
    let at: Vec<Instant> = t.requests().iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 2, "one request per run");
    assert!(
        at[1].duration_since(at[0]) >= SLOW,
        "the second run started {:?} after the first, which was still waiting for its answer",
        at[1].duration_since(at[0])
    );
    assert_ne!(a.1["started_at"], b.1["started_at"]);
    p.stop().await.unwrap();
}

fn pd_events(log: &[Recorded], action: &str) -> usize {
    log.iter()
        .filter(|r| (200..300).contains(&r.status))
        .filter(|r| r.json()["event_action"] == action)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_resolve_reaches_pagerduty_and_instatus_with_its_reason_on_the_timeline() {
    env();
    let failing = Arc::new(AtomicBool::new(true));
    let t = target(failing.clone()).await;
    let pd = Recorder::with_default(|_| Reply::json(202, json!({"status": "success"}))).await;
    let is = Recorder::with_default(|r: &Recorded| {
        if r.method == "POST" && r.path.ends_with("/incidents") {
            Reply::json(200, json!({"id": "st-7"}))
        } else {
            Reply::status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = format!("api_token_env = \"{TOKEN_ENV}\"");
    let cfg = write_config(
        dir.path(),
        &t.url(),
        "1s",
        &agent,
        Some((&pd.url(), &is.url())),
    );
    let (p, base) = start(&cfg).await;
    pd.wait_for("the trigger", T, |l| pd_events(l, "trigger") == 1)
        .await;
    let comps = get(&base, "/api/v1/components").await;
    let c = &comps["components"][0];
    assert_eq!(c["name"], "Target");
    assert_eq!(c["status"], "major_outage", "{c}");
    assert_eq!(c["members"][0]["level"], "down", "{c}");
    let id = c["incident"]["id"].as_i64().expect("open incident id");

    // Maintenance starting on a component with an open incident: on its timeline.
    let (status, w) = post(
        &base,
        "/api/v1/maintenance",
        Some(json!({"component": "Target", "duration": "10m", "reason": "router swap"})),
    )
    .await;
    assert_eq!(status, 201, "{w}");
    assert_eq!(w["component"], "Target");
    assert_eq!(w["reason"], "router swap");
    // … and its end too; the incident is untouched by both.
    let (status, ended) = req(
        "DELETE",
        &format!("{base}/api/v1/maintenance/{}", w["id"]),
        Some(&bearer()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{ended}");
    let c = &get(&base, "/api/v1/components").await["components"][0];
    assert_eq!(c["status"], "major_outage", "{c}");
    assert_eq!(c["incident"]["id"], json!(id), "{c}");
    let (status, w) = post(
        &base,
        "/api/v1/maintenance",
        Some(json!({"component": "Target", "duration": "10m", "reason": "second window"})),
    )
    .await;
    assert_eq!(status, 201, "{w}");
    let wid = w["id"].as_i64().unwrap();
    for (body, code) in [
        (json!({"component": "Nope", "duration": "10m"}), 404),
        (json!({"component": "Target", "duration": "8d"}), 400),
        (json!({"component": "Target", "duration": "soon"}), 400),
        (json!({"component": "Target"}), 400),
    ] {
        let (status, v) = post(&base, "/api/v1/maintenance", Some(body.clone())).await;
        assert_eq!(status, code, "{body}: {v}");
    }

    // Refusals: no reason, not an open incident.
    let (status, v) = post(&base, &format!("/api/v1/incidents/{id}/resolve"), None).await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = post(
        &base,
        &format!("/api/v1/incidents/{}/resolve", id + 100),
        Some(json!({"reason": "x"})),
    )
    .await;
    assert_eq!(status, 404, "{v}");

    failing.store(false, Ordering::SeqCst);
    let (status, v) = post(
        &base,
        &format!("/api/v1/incidents/{id}/resolve"),
        Some(json!({"reason": "fixed the upstream router"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let log = pd
        .wait_for("the resolve", T, |l| pd_events(l, "resolve") == 1)
        .await;
    let trigger = log
        .iter()
        .find(|r| r.json()["event_action"] == "trigger")
        .unwrap();
    let resolve = log
        .iter()
        .find(|r| r.json()["event_action"] == "resolve")
        .unwrap();
    assert_eq!(trigger.json()["dedup_key"], resolve.json()["dedup_key"]);
    is.wait_for("the Instatus resolve", T, |l| {
        l.iter().any(|r| {
            r.path.contains("incident-updates")
                && String::from_utf8_lossy(&r.body).contains("RESOLVED")
        })
    })
    .await;
    // A second resolve of the same incident: 404.
    let (status, _) = post(
        &base,
        &format!("/api/v1/incidents/{id}/resolve"),
        Some(json!({"reason": "again"})),
    )
    .await;
    assert_eq!(status, 404);

    // The component follows the running window at once.
    let comps = get(&base, "/api/v1/components").await;
    let c = &comps["components"][0];
    assert_eq!(c["status"], "maintenance", "{c}");
    assert_eq!(c["incident"], Value::Null, "{c}");
    assert_eq!(c["maintenance"]["id"], json!(wid), "{c}");
    assert_eq!(c["maintenance"]["source"], "api", "{c}");

    // The timeline, through the API and the CLI.
    let incs = get(&base, "/api/v1/incidents").await;
    let inc = incs["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == json!(id))
        .unwrap()
        .clone();
    assert_eq!(inc["open"], json!(false), "{inc}");
    let notes: Vec<(String, String)> = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("").to_string(),
                e["note"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        notes
            .iter()
            .any(|(k, n)| k == "maintenance_started" && n.contains("router swap")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|(k, n)| k == "maintenance_ended" && n.contains("router swap")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|(k, n)| k == "resolved" && n == "resolved by hand: fixed the upstream router"),
        "{notes:?}"
    );
    p.stop().await.unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .args(["incidents", "--json", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("resolved by hand: fixed the upstream router"),
        "{text}"
    );
}
