//! The real binary: `watchpost run` probing a failing local target, SIGKILLed while its
//! notifications are still pending (PagerDuty and Instatus unreachable), restarted with the
//! endpoints reachable → every notification delivered exactly once; then the target
//! recovers and the resolve reaches the same Instatus incident and PagerDuty alert.

#[path = "common/recorder.rs"]
mod recorder;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use recorder::{Recorded, Recorder, Reply};
use serde_json::json;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(cfg: &Path) -> Agent {
    let child = Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .args(["run", "-c"])
        .arg(cfg)
        .env("WPB_PD_KEY", "bin-routing-key")
        .env("WPB_INSTATUS_KEY", "bin-instatus-key")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting watchpost run");
    Agent(child)
}

fn write_config(dir: &Path, target: &str, pd: &str, instatus: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("probes")).unwrap();
    std::fs::write(
        dir.join("probes/target.toml"),
        format!("name = \"target\"\nkind = \"http\"\nurl = \"{target}/health\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 0\njitter = \"0s\"\n"),
    )
    .unwrap();
    let d = r#"delivery = { retry_initial = "100ms", retry_max = "300ms", timeout = "1s", rate_limit = 50, breaker_failures = 100 }"#;
    let text = format!(
        "[agent]\nlocation = \"bin-test\"\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n\
         [[component]]\nname = \"Target\"\nprobes = [\"target\"]\nfailure_threshold = 2\nsuccess_threshold = 2\nrecovery = \"1s\"\nnotify = [\"pager\", \"page\"]\n\n\
         [notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"WPB_PD_KEY\"\nevents_url = \"{pd}/v2/enqueue\"\n{d}\n\n\
         [notifier.page]\nkind = \"instatus\"\npage_id = \"pg\"\napi_key_env = \"WPB_INSTATUS_KEY\"\nbase_url = \"{instatus}\"\ncomponents = {{ \"Target\" = \"cmp\" }}\n{d}\n"
    );
    let path = dir.join("watchpost.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Outbox rows (notifier, kind, status, attempts), read from the agent's database.
fn outbox(db: &Path) -> Vec<(String, String, String, i64)> {
    let Ok(Some(conn)) = watchpost::store::open_reader(db) else {
        return vec![];
    };
    let Ok(mut st) =
        conn.prepare("SELECT notifier, kind, status, attempts FROM outbox ORDER BY id")
    else {
        return vec![];
    };
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

fn ok_count(log: &[Recorded]) -> usize {
    log.iter()
        .filter(|r| (200..300).contains(&r.status))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_pending_notifications_then_restart_delivers_once_and_resolves_the_same_incident(
) {
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let target = Recorder::with_default(move |_| {
        if f.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let pd = Recorder::with_default(|_| Reply::json(202, json!({"status": "success"}))).await;
    let is = Recorder::with_default(|r: &Recorded| {
        if r.method == "POST" && r.path.ends_with("/incidents") {
            Reply::json(200, json!({"id": "st-42"}))
        } else {
            Reply::status(200)
        }
    })
    .await;
    let closed = format!(
        "http://{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/watchpost.db");

    // First life: notifiers unreachable; the incident and its outbox rows are committed.
    let cfg = write_config(dir.path(), &target.url(), &closed, &closed);
    let mut agent = start(&cfg);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = outbox(&db);
        if rows.len() == 2 && rows.iter().all(|r| r.2 == "pending" && r.3 >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no pending notifications: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.0.kill().unwrap(); // SIGKILL: no drain, no flush
    agent.0.wait().unwrap();
    drop(agent);

    // Second life: endpoints reachable, the target still down.
    let cfg = write_config(dir.path(), &target.url(), &pd.url(), &is.url());
    let agent = start(&cfg);
    let log = pd
        .wait_ok("trigger after restart", 1, Duration::from_secs(20))
        .await;
    // Keyed by the installation id the database was created with: the same after a restart.
    let key = {
        let db = dir.path().join("data/watchpost.db");
        let conn = watchpost::store::open_reader(&db)
            .unwrap()
            .expect("database");
        let inst = watchpost::store::Installation::read(&conn).unwrap();
        format!("watchpost/{}/Target/1", inst.id)
    };
    assert_eq!(log[0].json()["dedup_key"], key);
    is.wait_ok("Instatus open", 2, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // more failing runs: nothing new
    assert_eq!(
        ok_count(&pd.requests()),
        1,
        "trigger delivered exactly once"
    );
    assert_eq!(
        is.requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/v1/pg/incidents")
            .count(),
        1,
        "one status-page incident"
    );

    // Recovery: resolve with the same keys.
    failing.store(false, Ordering::SeqCst);
    let log = pd.wait_ok("resolve", 2, Duration::from_secs(20)).await;
    assert_eq!(
        log[1].json(),
        json!({"routing_key": "bin-routing-key", "dedup_key": key, "event_action": "resolve"})
    );
    let log = is
        .wait_for("Instatus resolve", Duration::from_secs(10), |l| {
            l.iter().any(|r| r.path.ends_with("/incident-updates"))
        })
        .await;
    let upd = log
        .iter()
        .find(|r| r.path.ends_with("/incident-updates"))
        .unwrap();
    assert_eq!(upd.path, "/v1/pg/incidents/st-42/incident-updates");
    assert_eq!(upd.json()["status"], "RESOLVED");
    drop(agent);

    // `watchpost incidents --json` shows the history.
    let out = Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .args(["incidents", "--json", "-c"])
        .arg(&cfg)
        .env("WPB_PD_KEY", "x")
        .env("WPB_INSTATUS_KEY", "x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"component\":\"Target\"") || text.contains("\"component\": \"Target\""),
        "{text}"
    );
    assert!(text.contains("resolved"), "{text}");
}
