//! The real `watchpost` binary as a daemon: `run` on a config in a temp dir, its stderr kept
//! line by line, its API address read back from its own log (the config says
//! `listen = "127.0.0.1:0"`, so no port is guessed), stopped with SIGTERM. Used by the
//! tests of what an operator's tools see: logs and `/metrics`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::common::http::{http_probe, HttpServer, Reply, TestCert, TestConfig, TlsServer};

/// A running `watchpost … run`.
pub struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: JoinHandle<()>,
}

impl Agent {
    /// `watchpost <args…>` (e.g. `--log-format json -c FILE run`) with `env` added to a
    /// clean environment (no `WATCHPOST_*`, no `NO_COLOR`), stderr collected.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut c = Command::new(env!("CARGO_BIN_EXE_watchpost"));
        c.args(args)
            .env_remove("WATCHPOST_CONFIG")
            .env_remove("WATCHPOST_LOG")
            .env_remove("NO_COLOR")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = c.spawn().expect("spawn watchpost");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        let reader = tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = r.next_line().await {
                sink.lock().unwrap().push(l);
            }
        });
        Agent {
            child,
            lines,
            reader,
        }
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Wait (at most `within`) for a stderr line that satisfies `pred`; panics with the log
    /// when none comes or the agent exits first.
    pub async fn wait_line(&mut self, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "no such log line within {within:?} (exit: {exited:?}); log:\n{}",
                self.lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The API address, from the JSON log line that announces it (needs `--log-format json`).
    pub async fn api(&mut self) -> SocketAddr {
        let line = self
            .wait_line(Duration::from_secs(15), |l| {
                l.contains("serving API, /metrics and dashboard")
            })
            .await;
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
        v["fields"]["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no fields.addr in {line}"))
    }

    /// GET `http://<api><path>`: the body, or an error text when the API does not answer.
    pub async fn get(&mut self, path: &str) -> Result<String, String> {
        let url = format!("http://{}{path}", self.api().await);
        let r = reqwest::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        r.text().await.map_err(|e| format!("GET {url}: {e}"))
    }

    /// Scrape `/metrics` until `ok` holds (at most `within`); panics with the last scrape.
    pub async fn metrics_when(&mut self, within: Duration, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let last = self.get("/metrics").await;
            if let Ok(text) = &last {
                if ok(text) {
                    return text.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "/metrics did not get there within {within:?}; last scrape:\n{last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then wait (at most 10 s) for the exit and the rest of stderr.
    pub async fn stop(mut self) -> (ExitStatus, Vec<String>) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on the pid of a child we started and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("no exit within 10 s of SIGTERM"))
            .expect("wait");
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        let lines = self.lines();
        (status, lines)
    }
}

/// Peers of [`rich_config`]: a healthy target, an HTTPS target, a webhook receiver.
pub struct Peers {
    pub target: HttpServer,
    pub hook: HttpServer,
    pub tls: TlsServer,
    pub cert: TestCert,
}

impl Peers {
    pub async fn start() -> Peers {
        let cert = crate::common::http::self_signed(Some(30));
        Peers {
            // A few milliseconds of server time, so latency histograms have a body.
            target: HttpServer::start(|r| match r.path.as_str() {
                "/down" => Reply::json(503, r#"{"status":"down","error":"db timeout"}"#),
                _ => Reply::json(200, r#"{"status":"ok"}"#).delayed(Duration::from_millis(20)),
            })
            .await,
            // `/busy` answers 503, which a notifier retries.
            hook: HttpServer::start(|r| match r.path.as_str() {
                "/busy" => Reply::json(503, "{}"),
                _ => Reply::json(200, "{}"),
            })
            .await,
            tls: TlsServer::start(&cert, 200, r#"{"status":"ok"}"#),
            cert,
        }
    }
}

/// A config that makes the agent use most of what it logs and exports: probes `api` (up),
/// `tls` (up, HTTPS with a 30-day certificate), `broken` (down: 503); a component over
/// `broken` that opens an incident at once and notifies `hook` (delivers) and `busy`
/// (answers 503: retries); the API on 127.0.0.1:0. (No "refused" address: a port released
/// for it may be the next one the agent's own API binds.)
pub fn rich_config(p: &Peers) -> TestConfig {
    let t = TestConfig::empty();
    let main = crate::common::http::MAIN_TOML.replace("listen = \"\"", "listen = \"127.0.0.1:0\"");
    let delivery = r#"delivery = { retry_initial = "100ms", retry_max = "300ms", timeout = "1s", breaker_failures = 100 }"#;
    t.write(
        "watchpost.toml",
        &format!(
            "{main}\n[[component]]\nname = \"API\"\nprobes = [\"broken\"]\nfailure_threshold = 1\n\
             notify = [\"hook\", \"busy\"]\n\n\
             [notifier.hook]\nkind = \"webhook\"\nurl = \"{}\"\n{delivery}\n\n\
             [notifier.busy]\nkind = \"webhook\"\nurl = \"{}\"\n{delivery}\n",
            p.hook.url("/hook"),
            p.hook.url("/busy")
        ),
    );
    t.write(
        "probes/api.toml",
        &http_probe("api", &p.target.url("/health"), ""),
    );
    t.write("probes/ca.pem", &p.cert.cert_pem);
    t.write(
        "probes/tls.toml",
        &http_probe("tls", &p.tls.url("/health"), "ca_file = \"ca.pem\""),
    );
    t.write(
        "probes/broken.toml",
        &http_probe("broken", &p.target.url("/down"), ""),
    );
    t
}

/// `run` on `t` with JSON logs.
pub fn start_json(t: &TestConfig, env: &[(&str, &str)]) -> Agent {
    let main = t.main_path();
    Agent::start(
        &["--log-format", "json", "-c", &main.to_string_lossy(), "run"],
        env,
    )
}
