//! The real binary: `watchpost run` with its API on 127.0.0.1, and `watchpost maintenance
//! start|list|end` calling it. A window started from the CLI holds an incident back while
//! the target fails, keeps its end across a SIGKILL and restart, and ending it lets the
//! incident open. Refusals and usage errors have their exit codes (1 and 3).

#[path = "common/recorder.rs"]
mod recorder;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use recorder::{Recorder, Reply};
use serde_json::Value;

const TOKEN: &str = "cli-test-token-abcdef";

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_watchpost"));
    c.env("WPCLI_API_TOKEN", TOKEN);
    c
}

fn start(cfg: &Path) -> Agent {
    let child = bin()
        .args(["run", "-c"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting watchpost run");
    Agent(child)
}

fn cli(cfg: &Path, args: &[&str], token: &str) -> Output {
    bin()
        .env("WPCLI_API_TOKEN", token)
        .args(["-c"])
        .arg(cfg)
        .args(args)
        .output()
        .expect("running watchpost")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(url: &str) -> Option<Value> {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

async fn wait_up(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&format!("{base}/health")).await.is_none() {
        assert!(Instant::now() < deadline, "the agent did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn component(base: &str) -> Value {
    let v = get(&format!("{base}/api/v1/components"))
        .await
        .expect("components");
    v["components"][0].clone()
}

fn open_incidents(cfg: &Path) -> usize {
    let out = cli(cfg, &["incidents", "--open", "--json"], TOKEN);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_from_the_cli_holds_the_incident_back_survives_a_restart_and_ends() {
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let target = Recorder::with_default(move |_| {
        if f.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("probes")).unwrap();
    std::fs::write(
        dir.path().join("probes/target.toml"),
        format!("name = \"target\"\nkind = \"http\"\nurl = \"{}/health\"\ninterval = \"1s\"\ntimeout = \"900ms\"\nretries = 0\njitter = \"0s\"\n", target.url()),
    )
    .unwrap();
    let port = free_port();
    let cfg = dir.path().join("watchpost.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"127.0.0.1:{port}\"\napi_token_env = \"WPCLI_API_TOKEN\"\n\n\
             [[component]]\nname = \"Target\"\nprobes = [\"target\"]\nfailure_threshold = 2\nsuccess_threshold = 2\nrecovery = \"1s\"\n"
        ),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let agent = start(&cfg);
    wait_up(&base).await;

    // Usage errors: 3, before anything is sent.
    let out = cli(
        &cfg,
        &["maintenance", "start", "Target", "--for", "soon"],
        TOKEN,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let out = cli(&cfg, &["maintenance", "start", "Target"], TOKEN);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    // Refusals: 1, with the agent's reason.
    let out = cli(
        &cfg,
        &["maintenance", "start", "Nope", "--for", "10m"],
        TOKEN,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no component named \"Nope\""),
        "{}",
        text(&out)
    );
    let out = cli(
        &cfg,
        &["maintenance", "start", "Target", "--for", "10m"],
        "not-the-token",
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("401"), "{}", text(&out));
    assert!(!text(&out).contains("not-the-token"), "{}", text(&out));
    let closed = format!("127.0.0.1:{}", free_port());
    let out = cli(&cfg, &["maintenance", "list", "--agent", &closed], TOKEN);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cannot reach the agent"),
        "{}",
        text(&out)
    );

    let out = cli(
        &cfg,
        &[
            "maintenance",
            "start",
            "Target",
            "--for",
            "10m",
            "--reason",
            "deploy",
            "--json",
        ],
        TOKEN,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let w: Value = serde_json::from_slice(&out.stdout).expect("window JSON");
    let id = w["id"].as_i64().expect("window id");
    let ends_at = w["ends_at"].as_str().unwrap().to_string();
    assert_eq!(w["reason"], "deploy");

    // The target fails for several intervals: no incident while the window runs.
    failing.store(true, Ordering::SeqCst);
    let n = target.requests().len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while target.requests().len() < n + 3 {
        assert!(Instant::now() < deadline, "no runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = component(&base).await;
    assert_eq!(c["status"], "maintenance", "{c}");
    assert_eq!(c["members"][0]["level"], "down", "failing, confirmed: {c}");
    assert_eq!(open_incidents(&cfg), 0);

    // SIGKILL and restart: the window keeps its end.
    drop(agent);
    let agent = start(&cfg);
    wait_up(&base).await;
    let n = target.requests().len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while target.requests().len() < n + 3 {
        assert!(Instant::now() < deadline, "no runs after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = component(&base).await;
    assert_eq!(c["status"], "maintenance", "{c}");
    assert_eq!(c["maintenance"]["id"], id, "{c}");
    assert_eq!(c["maintenance"]["ends_at"], ends_at.as_str(), "{c}");
    assert_eq!(open_incidents(&cfg), 0);
    let out = cli(&cfg, &["maintenance", "list"], TOKEN);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains(&format!("maintenance window {id} on \"Target\""))
            && listed.contains("deploy"),
        "{listed}"
    );

    // Ended: the failing target opens its incident.
    let out = cli(&cfg, &["maintenance", "end", &id.to_string()], TOKEN);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("maintenance window {id}")),
        "{}",
        text(&out)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_incidents(&cfg) != 1 {
        assert!(
            Instant::now() < deadline,
            "no incident after the window ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = cli(&cfg, &["maintenance", "end", &id.to_string()], TOKEN);
    assert_eq!(out.status.code(), Some(1), "ended twice: {}", text(&out));
    let out = cli(&cfg, &["maintenance", "list"], TOKEN);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no maintenance windows running"),
        "{}",
        text(&out)
    );
    drop(agent);
}
