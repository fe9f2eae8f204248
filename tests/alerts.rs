//! Inbound alerts end to end: a real Alertmanager (Debian `prometheus-alertmanager`) and
//! direct Grafana/Alertmanager payloads POSTed to the agent's API → component incidents on
//! recording Instatus, PagerDuty and webhook servers and a real SMTP server (aiosmtpd);
//! the refusals (token, size, JSON) store nothing; alert members survive a restart.

mod notify_harness;
#[path = "common/recorder.rs"]
mod recorder;
#[path = "common/smtp.rs"]
mod smtp;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use notify_harness::*;
use recorder::{Recorded, Recorder, Reply};
use serde_json::{json, Value};
use watchpost::config::{self, Config};

const T: Duration = Duration::from_secs(20);
const TOKEN: &str = "alert-token-5f1c";
const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

fn token_env() {
    env();
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("WPT_API_TOKEN", TOKEN));
}

/// The config: component "API" (Instatus id `comp-api`) with no probes, driven by alerts
/// labelled `service = "api"` (or `component = "API"`), and the notifiers of `t`.
fn alert_config(dir: &Path, t: &Targets, extra_component: &str) -> Arc<Config> {
    token_env();
    let (notifiers, names) = notifiers_toml(t);
    let notify: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let text = format!(
        "[agent]\nlocation = \"test-vantage\"\ndata_dir = \"data\"\nprobes = []\nlisten = \"\"\n\
         api_token_env = \"WPT_API_TOKEN\"\n\n\
         [[component]]\nname = \"API\"\nalert_labels = {{ service = \"api\" }}\nrecovery = \"300ms\"\n\
         {extra_component}\nnotify = [{}]\n\n{notifiers}",
        notify.join(", ")
    );
    let path = dir.join("watchpost.toml");
    std::fs::write(&path, text).unwrap();
    match config::load(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test config invalid:\n{e}"),
    }
}

async fn serve(config: Arc<Config>) -> (Agent, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (Agent::start_serving(config, l).await, addr)
}

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
        Reply::json(202, json!({"status": "success", "dedup_key": key}))
    })
    .await
}

fn pd_actions(log: &[Recorded]) -> Vec<String> {
    log.iter()
        .filter(|r| r.status == 202)
        .map(|r| r.json()["event_action"].as_str().unwrap().to_string())
        .collect()
}

/// POST `body` to an alert route; (status, JSON answer).
async fn post(
    addr: SocketAddr,
    route: &str,
    token: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/alerts/{route}"))
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(20))
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("response");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
    )
}

/// One alert in the shape both senders use.
fn alert(status: &str, labels: Value, fingerprint: &str, starts: &str, ends: &str) -> Value {
    json!({
        "status": status,
        "labels": labels,
        "annotations": {
            "summary": "Listen p95 over 2s",
            "description": "The listen p95 has been above its 2s objective for 5 minutes",
            "runbook_url": "http://runbooks.test/listen"
        },
        "startsAt": starts,
        "endsAt": ends,
        "generatorURL": "http://grafana.test/alerting/grafana/abc123/view",
        "fingerprint": fingerprint,
        "silenceURL": "http://grafana.test/alerting/silence/new",
        "values": {"B": 2.31, "C": 1}
    })
}

fn grafana(alerts: Vec<Value>) -> Value {
    let status = if alerts.iter().any(|a| a["status"] == "firing") {
        "firing"
    } else {
        "resolved"
    };
    json!({
        "receiver": "watchpost", "status": status, "orgId": 1, "alerts": alerts,
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://grafana.test/", "version": "1", "groupKey": "{}:{}",
        "truncatedAlerts": 0, "title": "[FIRING:1]", "state": "alerting", "message": "x"
    })
}

const ZERO: &str = "0001-01-01T00:00:00Z";

fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What the refused payloads must not have left: incidents, outbox rows, alert members.
fn assert_nothing_stored(agent: &Agent) {
    assert!(
        agent.incidents(false).is_empty(),
        "{:?}",
        agent.incidents(false)
    );
    assert!(agent.outbox().is_empty(), "{:?}", agent.outbox());
    let conn = agent.store.reader().unwrap();
    let states: Vec<String> = conn
        .prepare("SELECT state FROM component_state")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        states.iter().all(|s| !s.contains("alert:")),
        "alert members stored: {states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_payloads_store_nothing_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr) = serve(alert_config(dir.path(), &Targets::default(), "")).await;
    let good = grafana(vec![alert(
        "firing",
        json!({"alertname": "Latency", "service": "api", "severity": "critical"}),
        "f00d",
        "2026-11-22T10:00:00Z",
        ZERO,
    )])
    .to_string();

    let (s, v) = post(addr, "grafana", None, good.clone()).await;
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("missing or wrong bearer token"),
        "{v}"
    );
    let (s, v) = post(addr, "alertmanager", Some("alert-token-5f1d"), good.clone()).await;
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("missing or wrong bearer token"),
        "{v}"
    );
    assert!(!v.to_string().contains(TOKEN), "the token is never echoed");

    let (s, v) = post(addr, "grafana", Some(TOKEN), "{\"alerts\": [").await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid Grafana webhook payload: EOF while parsing"),
        "{v}"
    );
    let (s, v) = post(addr, "alertmanager", Some(TOKEN), good.clone()).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("version \"1\" (expected \"4\")"),
        "{v}"
    );

    // Over 1 MiB: refused from its Content-Length, and when streamed without one.
    let big = format!(
        "{{\"alerts\": [], \"pad\": \"{}\"}}",
        "x".repeat(watchpost::api::MAX_ALERT_BODY)
    );
    let (s, v) = post(addr, "grafana", Some(TOKEN), big.clone()).await;
    assert_eq!(s, 413, "{v}");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .into_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let stream = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let (s, v) = post(addr, "grafana", Some(TOKEN), stream).await;
    assert_eq!(s, 413, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("payload over 1048576 bytes"),
        "{v}"
    );

    settle(Duration::from_millis(200)).await;
    assert_nothing_stored(&agent);

    // The same payload with the token is taken.
    let (s, v) = post(addr, "grafana", Some(TOKEN), good).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["applied"], 1);
    until("the incident", T, || agent.incidents(true).len() == 1).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_component_without_a_token_refuses_alerts_with_403() {
    let dir = tempfile::tempdir().unwrap();
    env();
    std::fs::write(
        dir.path().join("watchpost.toml"),
        "[agent]\ndata_dir = \"data\"\nprobes = []\nlisten = \"\"\n\n\
         [[component]]\nname = \"API\"\nalert_labels = { service = \"api\" }\n",
    )
    .unwrap();
    let cfg = Arc::new(config::load(&dir.path().join("watchpost.toml")).unwrap());
    let (agent, addr) = serve(cfg).await;
    let (s, v) = post(addr, "grafana", Some(TOKEN), grafana(vec![]).to_string()).await;
    assert_eq!(s, 403, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("api_token_env"),
        "{v}"
    );
    assert_nothing_stored(&agent);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grafana_alerts_reach_every_notifier_once_and_resolve_everywhere() {
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
    let (agent, addr) = serve(alert_config(dir.path(), &t, "")).await;
    let start = iso(chrono::Utc::now() - chrono::Duration::seconds(60));
    let crit = || json!({"alertname": "ListenLatency", "service": "api", "severity": "critical"});
    let warn = || json!({"alertname": "ListenErrors", "component": "API", "severity": "warning"});
    let firing = grafana(vec![
        alert("firing", warn(), "aaaa000000000001", &start, ZERO),
        alert("firing", crit(), "aaaa000000000002", &start, ZERO),
        alert(
            "firing",
            json!({"alertname": "DiskFull", "service": "db"}),
            "aaaa000000000003",
            &start,
            ZERO,
        ),
    ])
    .to_string();
    let (s, v) = post(addr, "grafana", Some(TOKEN), firing.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({"received": 3, "applied": 2, "stale": 0, "dropped": 0, "components": ["API"],
               "unmatched": ["alert:DiskFull/aaaa000000000003"]})
    );

    // One incident, at the worst alert's status (critical → major outage), on every notifier.
    let pd_log = pd.wait_ok("PagerDuty trigger", 1, T).await;
    let trig = pd_log[0].json();
    assert_eq!(trig["event_action"], "trigger");
    assert_eq!(trig["payload"]["severity"], "critical");
    assert_eq!(trig["payload"]["class"], "alert");
    assert_eq!(
        trig["payload"]["summary"],
        "[DOWN] API: alert:ListenLatency/aaaa000000000002: Listen p95 over 2s"
    );
    let a = &trig["payload"]["custom_details"]["alert"];
    assert_eq!(a["source"], "grafana");
    assert_eq!(a["severity"], "critical");
    assert_eq!(
        a["description"],
        "The listen p95 has been above its 2s objective for 5 minutes"
    );
    assert_eq!(a["labels"]["service"], "api");
    assert!(trig["links"].as_array().unwrap().iter().any(|l| l["href"]
        == "http://grafana.test/alerting/grafana/abc123/view"
        && l["text"] == "alert source"));
    let log = is
        .wait_for("Instatus incident", T, |l| {
            l.iter().any(|r| r.path == "/v1/page1/incidents")
        })
        .await;
    let open = log
        .iter()
        .find(|r| r.path == "/v1/page1/incidents")
        .unwrap()
        .json();
    assert_eq!(
        open["statuses"],
        json!([{"id": "comp-api", "status": "MAJOROUTAGE"}])
    );
    let msg = open["message"].as_str().unwrap();
    for want in [
        "Listen p95 over 2s",
        "Description: The listen p95 has been above its 2s objective for 5 minutes",
        "Alert source: http://grafana.test/alerting/grafana/abc123/view",
        "Alert: ListenLatency (grafana, severity critical)",
    ] {
        assert!(
            msg.contains(want),
            "Instatus message lacks {want:?}:\n{msg}"
        );
    }
    let hooks = hook.wait_ok("webhook opened", 1, T).await;
    let h = hooks[0].json();
    assert_eq!(h["event"], "incident.opened");
    assert_eq!(
        h["details"]["alert"]["generator_url"],
        "http://grafana.test/alerting/grafana/abc123/view"
    );
    assert!(h["text"]
        .as_str()
        .unwrap()
        .contains("Description: The listen p95"));
    let mails = sink.wait_mails(1, T).await;
    let body = mails[0].raw.replace("=\r\n", "").replace("=3D", "=");
    assert!(body.contains("Listen p95 over 2s"), "{body}");
    assert!(
        body.contains("http://grafana.test/alerting/grafana/abc123/view"),
        "{body}"
    );

    // Grafana repeats the same firing alerts: nothing new opens or pages.
    for _ in 0..3 {
        let (s, v) = post(addr, "grafana", Some(TOKEN), firing.clone()).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["applied"], 2);
    }
    agent.drained(T).await;
    assert_eq!(pd_actions(&pd.requests()), ["trigger"]);
    assert_eq!(agent.incidents(false).len(), 1);

    // The critical one resolves: down to degraded (the warning still fires), still open.
    let now = iso(chrono::Utc::now());
    let (s, v) = post(
        addr,
        "grafana",
        Some(TOKEN),
        grafana(vec![alert(
            "resolved",
            crit(),
            "aaaa000000000002",
            &start,
            &now,
        )])
        .to_string(),
    )
    .await;
    assert_eq!((s, v["applied"].clone()), (200, json!(1)), "{v}");
    hook.wait_for("de-escalation", T, |l| {
        l.iter()
            .any(|r| r.json()["event"] == "incident.deescalated")
    })
    .await;
    assert_eq!(agent.incidents(true).len(), 1);
    // Then the warning: resolved everywhere after the recovery hold.
    let now = iso(chrono::Utc::now());
    let (s, _) = post(
        addr,
        "grafana",
        Some(TOKEN),
        grafana(vec![alert(
            "resolved",
            warn(),
            "aaaa000000000001",
            &start,
            &now,
        )])
        .to_string(),
    )
    .await;
    assert_eq!(s, 200);
    let pd_log = pd.wait_ok("PagerDuty resolve", 2, T).await;
    assert_eq!(pd_actions(&pd_log), ["trigger", "resolve"]);
    assert_eq!(pd_log[1].json()["dedup_key"], trig["dedup_key"]);
    is.wait_for("Instatus resolve", T, |l| {
        l.iter()
            .any(|r| r.path.ends_with("/incident-updates") && r.json()["status"] == "RESOLVED")
    })
    .await;
    hook.wait_for("webhook resolved", T, |l| {
        l.iter().any(|r| r.json()["event"] == "incident.resolved")
    })
    .await;
    let mails = sink.wait_mails(2, T).await;
    assert!(mails[1]
        .header("subject")
        .unwrap()
        .starts_with("[RESOLVED] API"));
    let incidents = agent.incidents(false);
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    assert!(agent.incidents(true).is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alert_members_survive_a_restart_and_late_notifications_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = alert_config(dir.path(), &Targets::default(), "");
    let labels = json!({"alertname": "Down", "service": "api", "severity": "critical"});
    let start = iso(chrono::Utc::now() - chrono::Duration::seconds(30));
    let firing = grafana(vec![alert(
        "firing",
        labels.clone(),
        "bbbb000000000001",
        &start,
        ZERO,
    )]);

    let (agent, addr) = serve(cfg.clone()).await;
    let (s, v) = post(addr, "grafana", Some(TOKEN), firing.to_string()).await;
    assert_eq!(s, 200, "{v}");
    let open = agent.incidents(true);
    assert_eq!(open.len(), 1, "committed before the answer");
    agent.stop().await;

    // After a restart the member is still firing: a repeat opens nothing new, the
    // resolve ends the same incident.
    let (agent, addr) = serve(cfg.clone()).await;
    let (s, v) = post(addr, "grafana", Some(TOKEN), firing.to_string()).await;
    assert_eq!((s, v["applied"].clone()), (200, json!(1)), "{v}");
    assert_eq!(agent.incidents(false).len(), 1);
    let end = iso(chrono::Utc::now() - chrono::Duration::seconds(1));
    let resolved = grafana(vec![alert(
        "resolved",
        labels.clone(),
        "bbbb000000000001",
        &start,
        &end,
    )]);
    let (s, _) = post(addr, "grafana", Some(TOKEN), resolved.to_string()).await;
    assert_eq!(s, 200);
    until("the resolve", T, || agent.incidents(true).is_empty()).await;
    assert_eq!(agent.incidents(false)[0]["id"], open[0]["id"]);

    // `/api/v1/components` lists the alert member after the configured ones.
    let comps: Value = reqwest::get(format!("http://{addr}/api/v1/components"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let m = &comps["components"][0]["members"][0];
    assert_eq!(m["name"], "alert:Down/bbbb000000000001", "{comps}");
    assert_eq!(m["alert"]["status"], "major_outage");
    assert_eq!(m["alert"]["firing"], false);

    // The firing notification arriving again late (a retry of an old delivery) is old news.
    let (s, v) = post(addr, "grafana", Some(TOKEN), firing.to_string()).await;
    assert_eq!(
        (s, v["stale"].clone(), v["applied"].clone()),
        (200, json!(1), json!(0)),
        "{v}"
    );

    // A resolve that overtakes its own firing: the firing that follows is ignored too.
    let other = json!({"alertname": "Errors", "component": "API", "severity": "critical"});
    let (s, v) = post(
        addr,
        "alertmanager",
        Some(TOKEN),
        json!({"version": "4", "status": "resolved", "receiver": "w", "groupKey": "g",
               "truncatedAlerts": 0, "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
               "externalURL": "http://am", "alerts": [alert("resolved", other.clone(), "cccc000000000001", &start, &end)]})
        .to_string(),
    )
    .await;
    assert_eq!((s, v["applied"].clone()), (200, json!(1)), "{v}");
    let (s, v) = post(
        addr,
        "alertmanager",
        Some(TOKEN),
        json!({"version": "4", "status": "firing", "receiver": "w", "groupKey": "g",
               "truncatedAlerts": 0, "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
               "externalURL": "http://am", "alerts": [alert("firing", other, "cccc000000000001", &start, ZERO)]})
        .to_string(),
    )
    .await;
    assert_eq!((s, v["stale"].clone()), (200, json!(1)), "{v}");
    settle(Duration::from_millis(300)).await;
    assert_eq!(
        agent.incidents(false).len(),
        1,
        "{:#?}",
        agent.incidents(false)
    );
    assert!(agent.incidents(true).is_empty());
    agent.stop().await;
}

#[test]
fn config_allows_alert_only_components_and_points_at_bad_alert_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("watchpost.toml");
    let cases = [
        (
            "[[component]]\nname = \"Lonely\"\nprobes = []\n",
            "watchpost.toml:5:8: component has no probes and no alert_labels: nothing can change its status",
        ),
        (
            "[[component]]\nname = \"X\"\nalert_labels = {}\n",
            "watchpost.toml:6:16: alert_labels = {} would match every alert",
        ),
        (
            "[[component]]\nname = \"X\"\nalert_labels = { a = \"b\" }\nalert_severity = { critical = \"down\" }\n",
            "watchpost.toml:7:31: unknown variant `down`, expected one of `degraded`, `partial_outage`, `major_outage`",
        ),
    ];
    for (component, want) in cases {
        std::fs::write(
            &path,
            format!("[agent]\nprobes = []\nlisten = \"\"\n{component}"),
        )
        .unwrap();
        let e = config::load(&path).expect_err(component).to_string();
        let e = e.replace(&format!("{}/", dir.path().display()), "");
        assert!(e.contains(want), "{component}\n got: {e}\nwant: {want}");
    }
    std::fs::write(
        &path,
        "[agent]\nprobes = []\nlisten = \"\"\n[[component]]\nname = \"X\"\n\
         alert_labels = { service = \"x\" }\nalert_severity = { page = \"major_outage\", ticket = \"degraded\" }\n",
    )
    .unwrap();
    let c = config::load(&path).expect("an alert-only component is valid");
    assert!(c.components[0].probes.is_empty());
}

#[test]
fn the_shipped_alerts_example_loads() {
    std::env::set_var("WATCHPOST_API_TOKEN", "t");
    std::env::set_var("PAGERDUTY_ROUTING_KEY", "rk");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/alerts.toml");
    let c = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.components[0].probes.is_empty());
    assert_eq!(c.components[1].alert_severity.len(), 2, "the default map");
    assert!(c.agent.api_token.is_some());
}

// ---------------------------------------------------------------------------------------
// A real Alertmanager
// ---------------------------------------------------------------------------------------

/// `prometheus-alertmanager` on 127.0.0.1 with a temp storage path and no clustering;
/// killed when dropped.
struct Alertmanager {
    url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Alertmanager {
    /// Start it with one webhook receiver pointing at `agent` with the token; fails the test
    /// (never skips) when the binary is missing.
    async fn start(agent: SocketAddr) -> Alertmanager {
        assert!(
            Path::new(ALERTMANAGER).exists(),
            "{ALERTMANAGER} is missing: install Debian's prometheus-alertmanager (apt-get install prometheus-alertmanager, or .ci/run)"
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("alertmanager.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  resolve_timeout: 5m\n\
                 route:\n  receiver: watchpost\n  group_by: ['alertname']\n  group_wait: 200ms\n  group_interval: 1s\n  repeat_interval: 2s\n\
                 receivers:\n- name: watchpost\n  webhook_configs:\n  - url: http://{agent}/api/v1/alerts/alertmanager\n    send_resolved: true\n    \
                 http_config:\n      authorization:\n        type: Bearer\n        credentials: {TOKEN}\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(ALERTMANAGER)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {ALERTMANAGER}: {e}"));
        let mut am = Alertmanager {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + T;
        let c = reqwest::Client::new();
        loop {
            let ready = c
                .get(format!("{}/-/ready", am.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return am;
            }
            if let Ok(Some(status)) = am.child.try_wait() {
                panic!("alertmanager exited before it was ready: {status}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "alertmanager not ready within {T:?}"
            );
            settle(Duration::from_millis(100)).await;
        }
    }

    async fn post_alerts(&self, alerts: Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/api/v2/alerts", self.url))
            .json(&alerts)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("alertmanager answers");
        let status = r.status();
        assert!(
            status.is_success(),
            "{status}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// Webhook notifications it sent successfully (its own counter).
    async fn webhooks_sent(&self) -> f64 {
        let text = reqwest::Client::new()
            .get(format!("{}/metrics", self.url))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default();
        let total = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name) && l.contains("integration=\"webhook\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        total("alertmanager_notifications_total") - total("alertmanager_notifications_failed_total")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_alertmanager_opens_and_resolves_the_incident() {
    let dir = tempfile::tempdir().unwrap();
    let (is, pd) = (instatus().await, pagerduty().await);
    let t = Targets {
        instatus: Some(is.url()),
        pagerduty: Some(pd.url()),
        ..Targets::default()
    };
    let (agent, addr) = serve(alert_config(dir.path(), &t, "")).await;
    let am = Alertmanager::start(addr).await;

    let starts = iso(chrono::Utc::now() - chrono::Duration::seconds(5));
    let one = |ends: Option<String>| {
        let mut a = json!({
            "labels": {"alertname": "ListenLatency", "service": "api", "severity": "critical", "instance": "stt-1"},
            "annotations": {"summary": "Listen p95 over 2s", "description": "p95 is 3.1s on stt-1"},
            "generatorURL": "http://prometheus.test/graph/listen_p95",
            "startsAt": starts,
        });
        if let Some(e) = ends {
            a["endsAt"] = json!(e);
        }
        json!([a])
    };
    am.post_alerts(one(None)).await;

    let pd_log = pd.wait_ok("PagerDuty trigger via Alertmanager", 1, T).await;
    let trig = pd_log[0].json();
    assert_eq!(trig["event_action"], "trigger");
    assert_eq!(trig["payload"]["severity"], "critical");
    let a = &trig["payload"]["custom_details"]["alert"];
    assert_eq!(a["source"], "alertmanager");
    assert_eq!(a["summary"], "Listen p95 over 2s");
    assert_eq!(a["description"], "p95 is 3.1s on stt-1");
    assert_eq!(a["labels"]["instance"], "stt-1");
    assert_eq!(a["fingerprint"].as_str().unwrap().len(), 16);
    assert!(trig["links"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["href"] == "http://prometheus.test/graph/listen_p95"));
    let log = is
        .wait_for("Instatus incident via Alertmanager", T, |l| {
            l.iter().any(|r| r.path == "/v1/page1/incidents")
        })
        .await;
    let open = log
        .iter()
        .find(|r| r.path == "/v1/page1/incidents")
        .unwrap()
        .json();
    assert_eq!(
        open["statuses"],
        json!([{"id": "comp-api", "status": "MAJOROUTAGE"}])
    );
    assert!(open["message"]
        .as_str()
        .unwrap()
        .contains("Listen p95 over 2s"));

    // Alertmanager repeats the firing notification (repeat_interval 2s): still one incident.
    let deadline = std::time::Instant::now() + T;
    while am.webhooks_sent().await < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "Alertmanager did not repeat the notification"
        );
        settle(Duration::from_millis(200)).await;
    }

    // Resolved at Alertmanager (endsAt in the past): it sends the resolve, the agent resolves.
    am.post_alerts(one(Some(iso(
        chrono::Utc::now() - chrono::Duration::seconds(1)
    ))))
    .await;
    let pd_log = pd.wait_ok("PagerDuty resolve via Alertmanager", 2, T).await;
    assert_eq!(pd_actions(&pd_log), ["trigger", "resolve"]);
    assert_eq!(pd_log[1].json()["dedup_key"], trig["dedup_key"]);
    is.wait_for("Instatus resolve via Alertmanager", T, |l| {
        l.iter()
            .any(|r| r.path.ends_with("/incident-updates") && r.json()["status"] == "RESOLVED")
    })
    .await;
    assert_eq!(
        agent.incidents(false).len(),
        1,
        "{:#?}",
        agent.incidents(false)
    );
    assert!(agent.incidents(true).is_empty());
    drop(am);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incident_resolved_by_hand_stays_resolved_while_its_alert_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr) = serve(alert_config(dir.path(), &Targets::default(), "")).await;
    let start = iso(chrono::Utc::now() - chrono::Duration::seconds(30));
    let labels = json!({"alertname": "Stuck", "component": "API", "severity": "warning"});
    let firing = grafana(vec![alert(
        "firing",
        labels.clone(),
        "dddd000000000001",
        &start,
        ZERO,
    )]);
    let (s, _) = post(addr, "grafana", Some(TOKEN), firing.to_string()).await;
    assert_eq!(s, 200);
    let open = agent.incidents(true);
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["status"], "degraded", "warning → degraded");
    let id = open[0]["id"].as_i64().unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/incidents/{id}/resolve"))
        .bearer_auth(TOKEN)
        .json(&json!({"reason": "the alert rule is wrong"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    // Grafana repeats the firing alert: old news, nothing reopens.
    let (s, v) = post(addr, "grafana", Some(TOKEN), firing.to_string()).await;
    assert_eq!((s, v["stale"].clone()), (200, json!(1)), "{v}");
    assert!(agent.incidents(true).is_empty());
    // The rule fires anew (a later startsAt): a new incident.
    let again = iso(chrono::Utc::now());
    let firing = grafana(vec![alert(
        "firing",
        labels,
        "dddd000000000001",
        &again,
        ZERO,
    )]);
    let (s, v) = post(addr, "grafana", Some(TOKEN), firing.to_string()).await;
    assert_eq!((s, v["applied"].clone()), (200, json!(1)), "{v}");
    assert_eq!(agent.incidents(false).len(), 2);
    assert_eq!(agent.incidents(true).len(), 1);
    agent.stop().await;
}
