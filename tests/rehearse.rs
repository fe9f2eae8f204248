//! `watchpost rehearse` end to end: the real binary, a real HTTP target on 127.0.0.1, the
//! recording PagerDuty and webhook servers, hooks to a recorder. Scaled settings (1 s
//! interval, thresholds of 1, 200 ms recovery) keep each drill to a few seconds; every
//! deadline is generous so a loaded CI machine does not decide the verdict.

mod common;
#[path = "common/recorder.rs"]
mod recorder;

use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

use common::http::{HttpServer, Reply as HttpReply, TestConfig};
use recorder::{Recorder, Reply};

const PD_KEY: &str = "pd-routing-key-rehearsal";
const HOOK_TOKEN: &str = "hook-token-42";

fn watchpost(t: &TestConfig, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_watchpost"));
    c.env_remove("WATCHPOST_CONFIG")
        .env_remove("WATCHPOST_LOG")
        .env("WPT_PD_KEY", PD_KEY)
        .env("WPT_HOOK_SECRET", "hook-secret")
        .env("WPT_HOOK_TOKEN", HOOK_TOKEN)
        .arg("-c")
        .arg(t.main_path())
        .args(args)
        .kill_on_drop(true);
    c
}

async fn rehearse(t: &TestConfig, args: &[&str]) -> Output {
    let mut c = watchpost(t, args);
    tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("rehearse finished within 60s")
        .expect("spawn watchpost")
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// A config with one HTTP probe `api` on `target` (a host name, as the fault proxy needs
/// none but users write them), component `API` and the pager + webhook notifiers.
fn setup(target: &HttpServer, pd: &str, hook: &str, component: &str) -> TestConfig {
    let t = TestConfig::empty();
    t.write(
        "watchpost.toml",
        &format!(
            r#"[agent]
data_dir = "data"
probes = ["probes/*.toml"]
listen = ""
shutdown_grace = "2s"

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
"#
        ),
    );
    t.write(
        "probes/api.toml",
        &format!(
            "name = \"api\"\nkind = \"http\"\nurl = \"http://localhost:{}/health\"\n",
            target.addr.port()
        ),
    );
    t
}

const FAST: &str = "failure_threshold = 1\nsuccess_threshold = 1\nrecovery = \"200ms\"";

fn drill(hooks: &str, extra_expect: &str) -> String {
    format!(
        r#"name = "API outage drill"
duration = "2500ms"
settle = "20s"

[[fault]]
probes = ["api"]
mode = "reset"
{hooks}
[[expect]]
event = "status"
component = "API"
status = "major_outage"
within = "10s"

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
{extra_expect}"#
    )
}

fn json_id(doc: &Value) -> String {
    doc["rehearsal_id"]
        .as_str()
        .expect("rehearsal_id")
        .to_string()
}

fn expectation<'a>(doc: &'a Value, event: &str, subject: &str) -> &'a Value {
    doc["expectations"]
        .as_array()
        .expect("expectations")
        .iter()
        .find(|e| e["event"] == event && (e["notifier"] == subject || e["component"] == subject))
        .unwrap_or_else(|| panic!("no {event} expectation for {subject}: {doc:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_where_everything_holds_exits_0_with_measured_times_and_marked_notifications() {
    let target = HttpServer::start(|_| HttpReply::json(200, r#"{"status":"ok"}"#)).await;
    let pd = Recorder::with_default(|_| Reply::json(202, serde_json::json!({"status": "success"})))
        .await;
    let hook = Recorder::start().await;
    let t = setup(&target, &pd.url(), &hook.url(), FAST);
    let file = t.write(
        "rehearsals/drill.toml",
        &drill(
            "",
            "\n[[expect]]\nevent = \"delivered\"\nnotifier = \"mitigate\"\nwithin = \"15s\"\n",
        ),
    );
    let html = t.path("report.html");
    let o = rehearse(
        &t,
        &[
            "rehearse",
            file.to_str().unwrap(),
            "--json",
            "-o",
            html.to_str().unwrap(),
        ],
    )
    .await;
    let doc = json(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{doc:#}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(doc["passed"], true);
    for e in doc["expectations"].as_array().unwrap() {
        assert_eq!(e["held"], true, "{e}");
        let m = e["measured_ms"]
            .as_i64()
            .unwrap_or_else(|| panic!("measured: {e}"));
        assert!(m >= 0 && m <= e["within_ms"].as_i64().unwrap(), "{e}");
    }
    // Detection needs a run (the 1 s interval), delivery comes after it.
    let detected = expectation(&doc, "status", "API")["measured_ms"]
        .as_i64()
        .unwrap();
    let paged = expectation(&doc, "delivered", "pager")["measured_ms"]
        .as_i64()
        .unwrap();
    assert!(paged >= detected, "{doc:#}");
    let events: Vec<&str> = doc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["event"].as_str().unwrap())
        .collect();
    for want in [
        "fault_started",
        "status",
        "opened",
        "delivered",
        "fault_ended",
        "resolved",
    ] {
        assert!(events.contains(&want), "{want} missing from {events:?}");
    }
    // The live timeline went to stderr as it happened.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("fault_started") && err.contains("reset on api"),
        "{err}"
    );

    // PagerDuty: a trigger and a resolve, marked, keyed apart from real incidents.
    let sent = pd.requests();
    let bodies: Vec<Value> = sent.iter().map(|r| r.json()).collect();
    let trigger = bodies
        .iter()
        .find(|b| b["event_action"] == "trigger")
        .expect("a trigger");
    let summary = trigger["payload"]["summary"].as_str().unwrap();
    assert!(summary.starts_with("[REHEARSAL] "), "{summary}");
    let key = trigger["dedup_key"].as_str().unwrap();
    // watchpost/<installation>/rehearsal/<run id>/<component>/<incident>
    let rehearsal_id = json_id(&doc);
    assert!(
        key.starts_with("watchpost/") && key.contains(&format!("/rehearsal/{rehearsal_id}/API/")),
        "{key}"
    );
    assert!(
        bodies
            .iter()
            .any(|b| b["event_action"] == "resolve" && b["dedup_key"] == key),
        "{bodies:?}"
    );
    // The webhook body says so.
    let hooked: Vec<Value> = hook.requests().iter().map(|r| r.json()).collect();
    assert!(!hooked.is_empty());
    assert!(hooked.iter().all(|b| b["rehearsal"] == true), "{hooked:?}");
    // The daemon's own store was never touched.
    assert!(!t.path("data/watchpost.db").exists());
    // The HTML report is self-contained and draws the timeline.
    let page = std::fs::read_to_string(&html).expect("report written");
    assert!(page.contains("<svg") && page.contains("PASSED"), "{page}");
    assert!(!page.contains("<script") && !page.contains("http-equiv"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pagerduty_400_fails_the_drill_naming_the_expectation_and_hooks_run_at_both_ends() {
    let target = HttpServer::start(|_| HttpReply::json(200, r#"{"status":"ok"}"#)).await;
    let pd = Recorder::with_default(|_| {
        Reply::json(
            400,
            serde_json::json!({"status": "invalid event", "errors": ["routing key"]}),
        )
    })
    .await;
    let hook = Recorder::start().await;
    let chaos = Recorder::start().await;
    let t = setup(&target, &pd.url(), &hook.url(), FAST);
    let hooks = format!(
        r#"
[[hook]]
at = "start"
url = "{u}/toxics/on"
method = "PUT"
headers = {{ Authorization = "Bearer ${{WPT_HOOK_TOKEN}}" }}
body = '{{"toxic":"reset"}}'
timeout = "2s"

[[hook]]
at = "end"
url = "{u}/toxics/off"
method = "DELETE"
"#,
        u = chaos.url()
    );
    let file = t.write("rehearsals/drill.toml", &drill(&hooks, ""));
    let o = rehearse(&t, &["rehearse", file.to_str().unwrap(), "--json"]).await;
    let doc = json(&o);
    assert_eq!(o.status.code(), Some(1), "{doc:#}");
    assert_eq!(doc["passed"], false);
    let d = expectation(&doc, "delivered", "pager");
    assert_eq!(d["held"], false, "{d}");
    assert!(d["measured_ms"].is_null(), "{d}");
    let detail = d["detail"].as_str().unwrap();
    assert!(
        detail.contains("pager") && detail.contains("400"),
        "{detail}"
    );
    // What did not depend on PagerDuty still held.
    assert_eq!(expectation(&doc, "opened", "API")["held"], true, "{doc:#}");
    // Both hooks ran, in order, as configured.
    let calls = chaos.requests();
    let paths: Vec<(&str, &str)> = calls
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    assert_eq!(
        paths,
        [("PUT", "/toxics/on"), ("DELETE", "/toxics/off")],
        "{calls:?}"
    );
    assert_eq!(
        calls[0].header("authorization"),
        Some("Bearer hook-token-42")
    );
    assert_eq!(calls[0].body, br#"{"toxic":"reset"}"#);
    // The table form names the failed expectation too.
    let o = rehearse(&t, &["rehearse", file.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(1));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("FAILED"), "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("delivered"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("pager") && line.contains("NO"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_hook_aborts_with_exit_1_and_still_runs_the_end_hooks() {
    let target = HttpServer::start(|_| HttpReply::json(200, r#"{"status":"ok"}"#)).await;
    let pd = Recorder::start().await;
    let hook = Recorder::start().await;
    let chaos = Recorder::with_default(|r| {
        if r.path.starts_with("/start") {
            Reply::status(500)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let t = setup(&target, &pd.url(), &hook.url(), FAST);
    let hooks = format!(
        "\n[[hook]]\nat = \"start\"\nurl = \"{u}/start\"\n\n[[hook]]\nat = \"end\"\nurl = \"{u}/end\"\n",
        u = chaos.url()
    );
    let file = t.write("rehearsals/drill.toml", &drill(&hooks, ""));
    let o = rehearse(&t, &["rehearse", file.to_str().unwrap(), "--json"]).await;
    let doc = json(&o);
    assert_eq!(o.status.code(), Some(1), "{doc:#}");
    let why = doc["aborted"].as_str().expect("aborted");
    assert!(
        why.contains("start hook POST") && why.contains("500"),
        "{why}"
    );
    let paths: Vec<String> = chaos.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/start", "/end"]);
    assert!(pd.requests().is_empty(), "no fault, no page");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_incident_fails_when_thresholds_are_too_tight_and_holds_when_they_are_not() {
    let target = HttpServer::start(|_| HttpReply::json(200, r#"{"status":"ok"}"#)).await;
    let pd = Recorder::start().await;
    let hook = Recorder::start().await;
    // Slow, not broken: 300 ms more on every read, against a 100 ms run budget.
    let slow = r#"name = "Slow API must degrade quietly"
duration = "2500ms"
settle = "1s"

[[fault]]
probes = ["api"]
mode = "latency"
delay = "300ms"

[[expect]]
event = "no_incident"
component = "API"
within = "3s"
"#;
    let budget = "[budget]\ntotal = { run = \"100ms\" }\n";
    for (component, code) in [
        (FAST, 1),
        (
            "failure_threshold = 10\nsuccess_threshold = 1\nrecovery = \"200ms\"",
            0,
        ),
    ] {
        let t = setup(&target, &pd.url(), &hook.url(), component);
        let probe = std::fs::read_to_string(t.path("probes/api.toml")).unwrap();
        t.write("probes/api.toml", &format!("{probe}{budget}"));
        let file = t.write("rehearsals/slow.toml", slow);
        let o = rehearse(&t, &["rehearse", file.to_str().unwrap(), "--json"]).await;
        let doc = json(&o);
        assert_eq!(o.status.code(), Some(code), "{component}: {doc:#}");
        let e = expectation(&doc, "no_incident", "API");
        if code == 1 {
            assert_eq!(e["held"], false);
            assert!(
                e["detail"].as_str().unwrap().contains("must not page"),
                "{e}"
            );
        } else {
            assert_eq!(e["held"], true, "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_lifts_the_fault_and_runs_the_end_hooks() {
    let target = HttpServer::start(|_| HttpReply::json(200, r#"{"status":"ok"}"#)).await;
    let pd = Recorder::start().await;
    let hook = Recorder::start().await;
    let chaos = Recorder::start().await;
    let t = setup(&target, &pd.url(), &hook.url(), FAST);
    let hooks = format!(
        "\n[[hook]]\nat = \"start\"\nurl = \"{u}/on\"\n\n[[hook]]\nat = \"end\"\nurl = \"{u}/off\"\n",
        u = chaos.url()
    );
    let long = drill(&hooks, "").replace("duration = \"2500ms\"", "duration = \"5m\"");
    let file = t.write("rehearsals/long.toml", &long);
    let mut child = watchpost(&t, &["rehearse", file.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until the fault is on (the live timeline says so on stderr).
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains("fault_started") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(started, Ok(true), "the fault never started");
    let pid = child.id().expect("pid") as i32;
    // SAFETY: kill(2) with a pid we spawned and still own; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let o = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("exits after SIGINT")
        .expect("wait");
    let doc = json(&o);
    assert_eq!(o.status.code(), Some(1), "{doc:#}");
    assert_eq!(doc["aborted"], "interrupted");
    let paths: Vec<String> = chaos.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        ["/on", "/off"],
        "the end hook undoes the external fault"
    );
    // The probe's target sees no fault after the rehearsal ended.
    let r = reqwest::get(format!("http://localhost:{}/health", target.addr.port()))
        .await
        .expect("target answers");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn rehearsal_file_errors_are_positioned_and_exit_3() {
    let target = HttpServer::start(|_| HttpReply::json(200, "{}")).await;
    let t = setup(&target, "http://127.0.0.1:9", "http://127.0.0.1:9", FAST);
    let file = t.write(
        "rehearsals/bad.toml",
        r#"name = "bad"
duration = "1m"

[[fault]]
probes = ["api", "nope"]
mode = "ws_close"

[[expect]]
event = "delivered"
notifier = "pagr"
within = "1m"
"#,
    );
    let o = rehearse(&t, &["rehearse", file.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    let f = file.display().to_string();
    assert!(
        err.contains(&format!(
            "{f}:5:11: mode ws_close applies to websocket and listen probes"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{f}:5:18: unknown probe \"nope\"")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{f}:10:12: unknown notifier \"pagr\"")),
        "{err}"
    );
    let file = t.write(
        "rehearsals/typo.toml",
        "name = \"x\"\nduration = \"1m\"\nsetle = \"1m\"\n",
    );
    let o = rehearse(&t, &["rehearse", file.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(":3:1: unknown field `setle`"), "{err}");
}

#[test]
fn shipped_rehearsals_validate_against_the_example_config_and_the_demo() {
    for (k, v) in [
        ("INSTATUS_PAGE_ID", "page"),
        ("INSTATUS_API_KEY", "key"),
        ("INSTATUS_COMPONENT_STT", "comp"),
        ("INSTATUS_WEBHOOK_API", "wh"),
        ("PAGERDUTY_ROUTING_KEY", "rk"),
        ("PAGERDUTY_TEST_ROUTING_KEY", "rk-test"),
        ("SMTP_USER", "u"),
        ("SMTP_PASSWORD", "p"),
        ("WATCHPOST_WEBHOOK_SECRET", "s"),
    ] {
        std::env::set_var(k, v);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = watchpost::config::load(&root.join("config/examples/notifiers.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    // The shipped probes are disabled until their secrets are set; a team enables them.
    for p in &mut c.probes {
        p.enabled = true;
    }
    let mut checked = 0;
    for name in ["http-outage", "transcription-1011", "slow-stt-degrades"] {
        let path = root.join(format!("config/rehearsals/{name}.toml"));
        let r = watchpost::chaos::file::load(&path, &c).unwrap_or_else(|e| panic!("{e}"));
        assert!(!r.expects.is_empty());
        checked += 1;
    }
    let slow =
        watchpost::chaos::file::load(&root.join("config/rehearsals/slow-stt-degrades.toml"), &c)
            .unwrap();
    assert_eq!(slow.notify.len(), 1, "the pager swap");

    let demo_dir = tempfile::tempdir().unwrap();
    let cfg = watchpost::demo::write_config(
        demo_dir.path(),
        "127.0.0.1:1",
        "127.0.0.1:2",
        "127.0.0.1:0",
        "10s",
    )
    .unwrap();
    let demo = watchpost::config::load(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let r = watchpost::chaos::file::load(&root.join("config/rehearsals/demo.toml"), &demo)
        .unwrap_or_else(|e| panic!("{e}"));
    // A newcomer's drill ends within two minutes.
    assert!(r.duration + r.settle <= Duration::from_secs(120));
    checked += 1;
    let all = std::fs::read_dir(root.join("config/rehearsals"))
        .unwrap()
        .count();
    assert_eq!(checked, all, "every shipped rehearsal is checked here");
}
