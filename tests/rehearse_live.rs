//! Rehearsals on the live daemon: the real `watchpost run` binary with its API on
//! 127.0.0.1:0, a real HTTP target, recording PagerDuty and webhook servers, and
//! `watchpost rehearse FILE --agent URL` (or the API itself) starting drills on it; and the
//! `[[rehearsal]]` schedules (a seconds cron). Scaled settings (1 s interval, thresholds of
//! 1, 200 ms recovery) keep each drill to a few seconds; every deadline is generous.

#[path = "common/agent.rs"]
mod agent;
mod common;
#[path = "common/recorder.rs"]
mod recorder;

use std::process::Output;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use agent::{start_json, Agent};
use common::http::{HttpServer, Reply as HttpReply, TestConfig};
use recorder::{Recorder, Reply};

const TOKEN: &str = "live-rehearsal-token-7";
const ENV: [(&str, &str); 3] = [
    ("WPT_API_TOKEN", TOKEN),
    ("WPT_PD_KEY", "pd-key-live"),
    ("WPT_HOOK_SECRET", "hook-secret"),
];

/// A daemon config: probe `api` on `target`, component `API` (`component` lines), pager +
/// webhook, the API on 127.0.0.1:0 with a token, plus `extra` (e.g. `[[rehearsal]]`).
fn setup(target: &HttpServer, pd: &str, hook: &str, component: &str, extra: &str) -> TestConfig {
    let t = TestConfig::empty();
    t.write(
        "watchpost.toml",
        &format!(
            r#"[agent]
data_dir = "data"
probes = ["probes/*.toml"]
listen = "127.0.0.1:0"
api_token_env = "WPT_API_TOKEN"
shutdown_grace = "3s"

[defaults]
interval = "1s"
timeout = "700ms"
retries = 0
jitter = "0s"

[[component]]
name = "API"
probes = ["api"]
{component}
notify = ["pager", "mitigate"]

[notifier.pager]
kind = "pagerduty"
routing_key_env = "WPT_PD_KEY"
events_url = "{pd}/v2/enqueue"
delivery = {{ retry_initial = "50ms", retry_max = "200ms", timeout = "2s" }}

[notifier.mitigate]
kind = "webhook"
url = "{hook}/hooks/watchpost"
secret_env = "WPT_HOOK_SECRET"
delivery = {{ retry_initial = "50ms", retry_max = "200ms", timeout = "2s" }}
{extra}"#
        ),
    );
    t.write(
        "probes/api.toml",
        &format!(
            "name = \"api\"\nkind = \"http\"\nurl = \"http://localhost:{}/health\"\n",
            target.addr.port()
        ),
    );
    t.write("rehearsals/drill.toml", &drill("2500ms", ""));
    t
}

const FAST: &str = "failure_threshold = 1\nsuccess_threshold = 1\nrecovery = \"200ms\"";

fn drill(duration: &str, hooks: &str) -> String {
    format!(
        r#"name = "API outage drill"
duration = "{duration}"
settle = "20s"

[[fault]]
probes = ["api"]
mode = "reset"
{hooks}
[[expect]]
event = "opened"
component = "API"
within = "10s"

[[expect]]
event = "delivered"
notifier = "pager"
within = "15s"

[[expect]]
event = "resolved"
notifier = "pager"
within = "15s"
"#
    )
}

async fn healthy() -> HttpServer {
    HttpServer::start(|_| HttpReply::json(200, r#"{"status":"ok"}"#)).await
}

/// PagerDuty answering `status` (changeable while the test runs).
async fn pagerduty(status: Arc<AtomicU16>) -> Recorder {
    Recorder::with_default(move |_| {
        let s = status.load(Ordering::SeqCst);
        Reply::json(
            s,
            json!({"status": if s < 300 { "success" } else { "invalid event" }}),
        )
    })
    .await
}

async fn cli(t: &TestConfig, args: &[&str]) -> Output {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_watchpost"));
    c.env_remove("WATCHPOST_CONFIG")
        .env_remove("WATCHPOST_LOG")
        .envs(ENV)
        .arg("-c")
        .arg(t.main_path())
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(90), c.output())
        .await
        .expect("the command finished within 90s")
        .expect("spawn watchpost")
}

fn json_out(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// One API call: status and JSON body.
async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, &url)
        .timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Poll `GET /api/v1/rehearsals` until one entry satisfies `pred` (at most `within`).
async fn wait_rehearsal(api: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (_, v) = call(
            reqwest::Method::GET,
            format!("{api}/api/v1/rehearsals"),
            None,
            None,
        )
        .await;
        if let Some(hit) = v["rehearsals"]
            .as_array()
            .and_then(|a| a.iter().find(|r| pred(r)))
        {
            return hit.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no such rehearsal within {within:?}; last list: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn expectation<'a>(doc: &'a Value, event: &str) -> &'a Value {
    doc["expectations"]
        .as_array()
        .expect("expectations")
        .iter()
        .find(|e| e["event"] == event)
        .unwrap_or_else(|| panic!("no {event} expectation: {doc:#}"))
}

async fn stop(d: Agent) {
    let (status, lines) = d.stop().await;
    assert_eq!(status.code(), Some(0), "{}", lines.join("\n"));
}

/// `watchpost report --format json` on the stopped daemon's store: its rehearsals.
async fn reported(t: &TestConfig) -> Vec<Value> {
    let o = cli(t, &["report", "--format", "json", "--window", "1h"]).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    json_out(&o)["rehearsals"]
        .as_array()
        .expect("rehearsals in the report")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_on_the_live_agent_holds_is_marked_stored_and_refuses_a_second_or_no_token() {
    let target = healthy().await;
    let pd = pagerduty(Arc::new(AtomicU16::new(202))).await;
    let hook = Recorder::start().await;
    let t = setup(&target, &pd.url(), &hook.url(), FAST, "");
    let mut d = start_json(&t, &ENV);
    let api = format!("http://{}", d.api().await);
    let file = t.path("rehearsals/drill.toml");
    let path = file.to_str().unwrap().to_string();

    let run = {
        let (t_main, api) = (t.main_path(), api.clone());
        tokio::spawn(async move {
            let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_watchpost"));
            c.env_remove("WATCHPOST_CONFIG")
                .envs(ENV)
                .arg("-c")
                .arg(t_main)
                .args(["rehearse", &path, "--agent", &api, "--json"])
                .kill_on_drop(true);
            tokio::time::timeout(Duration::from_secs(90), c.output())
                .await
                .expect("rehearse --agent finished within 90s")
                .expect("spawn")
        })
    };
    let running = wait_rehearsal(&api, Duration::from_secs(20), |r| r["status"] == "running").await;
    let id = running["rehearsal_id"].as_str().unwrap().to_string();
    // One at a time; the token is required.
    let start = |token: Option<&'static str>| {
        call(
            reqwest::Method::POST,
            format!("{api}/api/v1/rehearsals"),
            token,
            Some(json!({"file": "rehearsals/drill.toml"})),
        )
    };
    let (status, body) = start(Some(TOKEN)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&id), "{body}");
    assert_eq!(start(None).await.0, 401);
    assert_eq!(start(Some("wrong")).await.0, 401);
    let (status, body) = call(
        reqwest::Method::POST,
        format!("{api}/api/v1/rehearsals"),
        Some(TOKEN),
        Some(json!({"file": "../watchpost.toml"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let o = run.await.expect("the CLI task");
    let doc = json_out(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{doc:#}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(doc["passed"], true);
    assert_eq!(doc["rehearsal_id"], id.as_str());
    for e in doc["expectations"].as_array().unwrap() {
        assert_eq!(e["held"], true, "{e}");
        assert!(e["measured_ms"].as_i64().is_some(), "{e}");
    }
    // The CLI printed the agent's timeline as it went.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("fault_started") && err.contains("reset on api"),
        "{err}"
    );

    // The live agent's notifications are marked and keyed apart.
    let bodies: Vec<Value> = pd.requests().iter().map(|r| r.json()).collect();
    let trigger = bodies
        .iter()
        .find(|b| b["event_action"] == "trigger")
        .expect("a trigger");
    assert!(
        trigger["payload"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("[REHEARSAL] "),
        "{trigger}"
    );
    let key = trigger["dedup_key"].as_str().unwrap();
    assert!(key.contains(&format!("/rehearsal/{id}/API/")), "{key}");
    assert!(
        bodies
            .iter()
            .any(|b| b["event_action"] == "resolve" && b["dedup_key"] == key),
        "{bodies:?}"
    );
    let hooked: Vec<Value> = hook.requests().iter().map(|r| r.json()).collect();
    assert!(!hooked.is_empty() && hooked.iter().all(|b| b["rehearsal"] == true));

    // The agent keeps it: by id, in the list, and in the report after it stopped.
    let (status, stored) = call(
        reqwest::Method::GET,
        format!("{api}/api/v1/rehearsals/{id}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(stored["status"], "passed", "{stored:#}");
    assert_eq!(stored["expectations"], doc["expectations"]);
    let (_, incidents) = call(
        reqwest::Method::GET,
        format!("{api}/api/v1/incidents"),
        None,
        None,
    )
    .await;
    let list = incidents["incidents"].as_array().expect("incidents");
    assert!(
        !list.is_empty() && list.iter().all(|i| i["rehearsal"] == id.as_str()),
        "{incidents:#}"
    );
    stop(d).await;
    let rows = reported(&t).await;
    let row = rows
        .iter()
        .find(|r| r["rehearsal_id"] == id.as_str())
        .unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!(row["status"], "passed", "{row:#}");
    assert_eq!(row["file"], "rehearsals/drill.toml");
    assert!(row["origin"].as_str().unwrap().starts_with("api "), "{row}");
    assert!(row["page_ms"].as_i64().is_some(), "{row}");
    assert_eq!(row["report"]["passed"], true, "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_whose_pager_refuses_exits_1_naming_the_expectation() {
    let target = healthy().await;
    let pd = pagerduty(Arc::new(AtomicU16::new(400))).await;
    let hook = Recorder::start().await;
    let t = setup(&target, &pd.url(), &hook.url(), FAST, "");
    let mut d = start_json(&t, &ENV);
    let api = format!("http://{}", d.api().await);
    let file = t.path("rehearsals/drill.toml");
    let o = cli(&t, &["rehearse", file.to_str().unwrap(), "--agent", &api]).await;
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("FAILED"), "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("delivered"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains("pager") && line.contains("NO") && line.contains("400"),
        "{line}"
    );
    let last = wait_rehearsal(&api, Duration::from_secs(5), |r| r["status"] != "running").await;
    assert_eq!(last["status"], "failed", "{last:#}");
    assert_eq!(expectation(&last, "opened")["held"], true, "{last:#}");
    stop(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_the_daemon_mid_drill_lifts_the_fault_runs_the_end_hook_and_keeps_the_row() {
    let target = healthy().await;
    let pd = pagerduty(Arc::new(AtomicU16::new(202))).await;
    let hook = Recorder::start().await;
    let chaos = Recorder::start().await;
    let t = setup(&target, &pd.url(), &hook.url(), FAST, "");
    let hooks = format!(
        "\n[[hook]]\nat = \"start\"\nurl = \"{u}/on\"\n\n[[hook]]\nat = \"end\"\nurl = \"{u}/off\"\n",
        u = chaos.url()
    );
    t.write("rehearsals/long.toml", &drill("5m", &hooks));
    let mut d = start_json(&t, &ENV);
    let api = format!("http://{}", d.api().await);
    let (status, started) = call(
        reqwest::Method::POST,
        format!("{api}/api/v1/rehearsals"),
        Some(TOKEN),
        Some(json!({"file": "rehearsals/long.toml"})),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let id = started["rehearsal_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = call(
            reqwest::Method::GET,
            format!("{api}/api/v1/rehearsals/{id}"),
            None,
            None,
        )
        .await;
        let events: Vec<&str> = v["timeline"]
            .as_array()
            .map(|a| a.iter().filter_map(|m| m["event"].as_str()).collect())
            .unwrap_or_default();
        if events.contains(&"fault_started") {
            break;
        }
        assert!(Instant::now() < deadline, "the fault never started: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(d).await;
    let paths: Vec<String> = chaos.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        ["/on", "/off"],
        "the end hook undoes the external fault"
    );
    let rows = reported(&t).await;
    let row = rows
        .iter()
        .find(|r| r["rehearsal_id"] == id.as_str())
        .unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!(row["status"], "aborted", "{row:#}");
    assert_eq!(row["report"]["aborted"], "interrupted", "{row:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_rehearsal_fires_and_a_firing_during_one_is_kept_as_skipped() {
    let target = healthy().await;
    let pd = pagerduty(Arc::new(AtomicU16::new(202))).await;
    let hook = Recorder::start().await;
    let every_second =
        "[[rehearsal]]\nfile = \"rehearsals/drill.toml\"\nschedule = \"* * * * * *\"\n";
    let t = setup(&target, &pd.url(), &hook.url(), FAST, every_second);
    let mut d = start_json(&t, &ENV);
    let api = format!("http://{}", d.api().await);
    let done = wait_rehearsal(&api, Duration::from_secs(60), |r| {
        r["status"] == "passed" && r["origin"] == "schedule * * * * * *"
    })
    .await;
    let busy = wait_rehearsal(&api, Duration::from_secs(5), |r| r["status"] == "skipped").await;
    assert!(
        busy["reason"].as_str().unwrap().contains("one at a time"),
        "{busy:#}"
    );
    stop(d).await;
    assert!(reported(&t)
        .await
        .iter()
        .any(|r| r["rehearsal_id"] == done["rehearsal_id"] && r["status"] == "passed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_rehearsal_is_skipped_during_maintenance_and_during_a_real_incident() {
    let every_second =
        "[[rehearsal]]\nfile = \"rehearsals/drill.toml\"\nschedule = \"* * * * * *\"\n";
    let pd = pagerduty(Arc::new(AtomicU16::new(202))).await;
    let hook = Recorder::start().await;

    // A maintenance window covering now.
    let target = healthy().await;
    let now = chrono::Utc::now();
    let window = format!(
        "{every_second}\n[[maintenance]]\ncomponents = [\"API\"]\nreason = \"deploy freeze\"\nstart = \"{}\"\nend = \"{}\"\n",
        (now - chrono::Duration::hours(1)).to_rfc3339(),
        (now + chrono::Duration::hours(1)).to_rfc3339()
    );
    let t = setup(&target, &pd.url(), &hook.url(), FAST, &window);
    let mut d = start_json(&t, &ENV);
    let api = format!("http://{}", d.api().await);
    let skipped = wait_rehearsal(&api, Duration::from_secs(20), |r| r["status"] == "skipped").await;
    let why = skipped["reason"].as_str().unwrap();
    assert!(
        why.contains("maintenance") && why.contains("deploy freeze"),
        "{why}"
    );
    let list = wait_rehearsal(&api, Duration::from_secs(5), |_| true).await;
    assert_ne!(list["status"], "running");
    stop(d).await;
    assert!(pd.requests().is_empty(), "nothing paged");

    // A real incident open (from an earlier run of the daemon) when the schedule fires.
    let broken = HttpServer::start(|_| HttpReply::json(503, r#"{"status":"down"}"#)).await;
    let t = setup(&broken, &pd.url(), &hook.url(), FAST, "");
    let mut d = start_json(&t, &ENV);
    let api = format!("http://{}", d.api().await);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = call(
            reqwest::Method::GET,
            format!("{api}/api/v1/incidents?open=true"),
            None,
            None,
        )
        .await;
        if v["incidents"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "no incident opened: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(d).await;
    let main = std::fs::read_to_string(t.main_path()).unwrap();
    t.write("watchpost.toml", &format!("{main}\n{every_second}"));
    let mut d = start_json(&t, &ENV);
    let api = format!("http://{}", d.api().await);
    let skipped = wait_rehearsal(&api, Duration::from_secs(20), |r| r["status"] == "skipped").await;
    let why = skipped["reason"].as_str().unwrap();
    assert!(why.contains("incident #1 open"), "{why}");
    stop(d).await;
    let rows = reported(&t).await;
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["status"] == "skipped"),
        "{rows:#?}"
    );
    // The real incident was never marked as a drill's.
    let bodies: Vec<Value> = pd.requests().iter().map(|r| r.json()).collect();
    assert!(
        bodies.iter().all(|b| !b["payload"]["summary"]
            .as_str()
            .unwrap_or("")
            .contains("[REHEARSAL]")),
        "{bodies:?}"
    );
}

#[tokio::test]
async fn rehearsal_schedules_are_validated_at_their_place() {
    let target = healthy().await;
    let bad = "[[rehearsal]]\nfile = \"rehearsals/nope.toml\"\nschedule = \"0 9 * *\"\n\n\
               [[rehearsal]]\nfile = \"rehearsals/broken.toml\"\nschedule = \"@weekly\"\n";
    let t = setup(
        &target,
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        FAST,
        bad,
    );
    let broken = t.write(
        "rehearsals/broken.toml",
        "name = \"b\"\nduration = \"1m\"\n\n[[fault]]\nprobes = [\"ghost\"]\nmode = \"down\"\n\n[[expect]]\nevent = \"opened\"\ncomponent = \"API\"\nwithin = \"1m\"\n",
    );
    let o = cli(&t, &["validate"]).await;
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    let main = t.main_path().display().to_string();
    let text = std::fs::read_to_string(t.main_path()).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("file = \"rehearsals/nope.toml\""))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("{main}:{line}:8: rehearsal file"))
            && err.contains("nope.toml does not exist"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{main}:{}:12: invalid cron schedule \"0 9 * *\"",
            line + 1
        )),
        "{err}"
    );
    // Only once the config itself is valid are the files checked against it.
    let fixed = text.replace(
        "file = \"rehearsals/nope.toml\"\nschedule = \"0 9 * *\"",
        "file = \"rehearsals/drill.toml\"\nschedule = \"0 9 * * MON\"",
    );
    t.write("watchpost.toml", &fixed);
    let o = cli(&t, &["validate"]).await;
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "{}:5:11: unknown probe \"ghost\"",
            broken.display()
        )),
        "{err}"
    );
    t.write(
        "watchpost.toml",
        &fixed.replace("rehearsals/broken.toml", "rehearsals/drill.toml"),
    );
    let o = cli(&t, &["validate"]).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
