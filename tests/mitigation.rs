//! Mitigation webhooks (issue 11): a `webhook` notifier shaped by a `body_template` and told
//! to send only `opened` and `resolved` drives an app's own endpoint that pauses outbound
//! calls while a component is down and resumes them when it recovers. The app checks the
//! signature and acts on the rule and reason it receives.

mod notify_harness;
#[path = "common/recorder.rs"]
mod recorder;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify_harness::*;
use recorder::{Recorded, Recorder, Reply};
use serde_json::{json, Value};
use watchpost::probe::Outcome::{Down, Up};

const T: Duration = Duration::from_secs(10);

/// The app's `/health/alert` template: pause on open, resume on resolve.
const TEMPLATE: &str = r#"body_template = '''
{"action": "{% if kind == "resolved" %}resume{% else %}pause{% endif %}",
 "rule": "outbound-calls/{{ component | lower | replace(" ", "-") }}",
 "reason": {{ reason | tojson }},
 "incident": {{ incident.id }},
 "status": {{ status | tojson }},
 "since": {{ incident.opened_at | tojson }},
 "rehearsal": {{ rehearsal | tojson }}}
'''
events = ["opened", "resolved"]
"#;

/// An app that keeps a set of paused rules, changed only by correctly signed requests.
async fn app(paused: Arc<Mutex<Vec<String>>>) -> Recorder {
    Recorder::with_default(move |r: &Recorded| {
        let sig = watchpost::notify::webhook::signature(HOOK_SECRET.as_bytes(), &r.body);
        if r.header("x-watchpost-signature") != Some(sig.as_str()) {
            return Reply::status(401);
        }
        let j: Value = match serde_json::from_slice(&r.body) {
            Ok(j) => j,
            Err(_) => return Reply::status(400),
        };
        let rule = j["rule"].as_str().unwrap_or_default().to_string();
        let mut p = paused.lock().unwrap();
        match j["action"].as_str() {
            Some("pause") => p.push(rule),
            Some("resume") => p.retain(|x| *x != rule),
            _ => return Reply::status(422),
        }
        Reply::json(200, json!({"ok": true}))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_pauses_on_open_and_resumes_on_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let paused = Arc::new(Mutex::new(Vec::new()));
    let hook = app(paused.clone()).await;
    let notifier = format!(
        "[notifier.mitigate]\nkind = \"webhook\"\nurl = \"{}/health/alert\"\nsecret_env = \"WPT_HOOK_SECRET\"\n{TEMPLATE}{FAST}\n",
        hook.url()
    );
    let cfg = write_config_raw(dir.path(), &["mitigate"], &notifier, THRESHOLDS, "");
    let agent = Agent::start(cfg, true).await;

    // api fails first (partial), then db too (escalation: not sent), both recover
    // (de-escalation: not sent), resolve.
    agent.send(run("api", Down)).await;
    agent.send(run("api", Down)).await;
    let log = hook.wait_ok("pause", 1, T).await;
    assert_eq!(*paused.lock().unwrap(), ["outbound-calls/api"]);
    let open = log[0].json();
    assert_eq!(log[0].header("content-type"), Some("application/json"));
    assert_eq!(open["action"], "pause");
    let reason = open["reason"].as_str().unwrap();
    assert!(reason.starts_with("api: "), "{reason}");
    assert_eq!(open["status"], "partial_outage");
    assert_eq!(open["rehearsal"], false);
    assert!(open["since"].as_str().unwrap().ends_with('Z'));
    agent.both(Down).await;
    agent.both(Down).await;
    agent.both(Up).await;
    agent.both(Up).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    agent.both(Up).await;
    let log = hook.wait_ok("resume", 2, T).await;
    assert!(paused.lock().unwrap().is_empty(), "resumed");
    assert_eq!(log.len(), 2, "only opened and resolved are sent");
    assert_eq!(log[1].json()["action"], "resume");
    assert_eq!(log[1].json()["incident"], open["incident"]);
    agent.drained(T).await;
    agent.stop().await;
}

#[test]
fn a_bad_template_is_a_config_error_at_its_key() {
    for (template, want) in [
        ("{{ component ", "body_template: syntax error"),
        (
            "{\"c\": {{ compnent | tojson }}}",
            "body_template: unknown variable compnent",
        ),
        ("not json {{ component }}", "renders to invalid JSON"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let notifier = format!(
            "[notifier.mitigate]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/x\"\nbody_template = '''{template}'''\n"
        );
        let path = write_config_file(dir.path(), &["mitigate"], &notifier, THRESHOLDS, "");
        let e = watchpost::config::load(&path).unwrap_err().to_string();
        assert!(e.contains(want), "{template}: {e}");
        assert!(e.contains("watchpost.toml:"), "{e}");
    }
    // Plain text is fine when the content type says so.
    let dir = tempfile::tempdir().unwrap();
    let notifier = "[notifier.mitigate]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/x\"\nbody_template = \"{{ title }}\"\ncontent_type = \"text/plain\"\n";
    let path = write_config_file(dir.path(), &["mitigate"], notifier, THRESHOLDS, "");
    watchpost::config::load(&path).unwrap();
}
