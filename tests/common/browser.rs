//! A headless Chromium (Debian's `/usr/bin/chromium`) and one page, driven over its DevTools
//! protocol on 127.0.0.1: navigate, evaluate JavaScript, wait for a condition, screenshot;
//! console errors, uncaught exceptions and every requested URL are noted. A missing
//! Chromium fails the test with a clear message. Used by tests/dashboard.rs and
//! tests/locview.rs.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

const CHROMIUM: &str = "/usr/bin/chromium";
/// How long one DevTools step may take.
const STEP: Duration = Duration::from_secs(20);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium and one page, over the DevTools protocol.
pub struct Browser {
    child: tokio::process::Child,
    ws: Ws,
    session: String,
    next: u64,
    /// Console errors, uncaught exceptions and error log entries seen so far.
    pub errors: Vec<String>,
    /// Every URL the page requested.
    pub requests: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {CHROMIUM} ({e}): install Debian's chromium (.ci/run does)")
            });
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = tokio::time::timeout(STEP, async {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(u) = l.strip_prefix("DevTools listening on ") {
                    return u.trim().to_string();
                }
            }
            panic!("chromium exited without a DevTools address")
        })
        .await
        .expect("chromium's DevTools address within 20 s");
        // Keep draining its stderr so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url.as_str()))
            .await
            .expect("DevTools connect in time")
            .expect("DevTools websocket");
        let mut b = Browser {
            child,
            ws,
            session: String::new(),
            next: 0,
            errors: Vec::new(),
            requests: Vec::new(),
            _profile: profile,
        };
        let t = b
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target = t["targetId"].as_str().unwrap().to_string();
        let a = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        b.session = a["sessionId"].as_str().unwrap().to_string();
        for m in [
            "Runtime.enable",
            "Log.enable",
            "Page.enable",
            "Network.enable",
        ] {
            b.call(m, json!({})).await;
        }
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        b
    }

    fn note(&mut self, ev: &Value) {
        let p = &ev["params"];
        match ev["method"].as_str().unwrap_or("") {
            "Runtime.consoleAPICalled" if p["type"] == "error" || p["type"] == "assert" => self
                .errors
                .push(format!("console.{}: {}", p["type"], p["args"])),
            "Runtime.exceptionThrown" => self.errors.push(format!(
                "uncaught: {}",
                p["exceptionDetails"]["exception"]["description"]
            )),
            "Log.entryAdded" if p["entry"]["level"] == "error" => {
                self.errors.push(format!("log: {}", p["entry"]["text"]))
            }
            "Network.requestWillBeSent" => {
                self.requests
                    .push(p["request"]["url"].as_str().unwrap_or("").to_string());
            }
            _ => {}
        }
    }

    /// One DevTools command; events that arrive meanwhile are noted.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() && !method.starts_with("Target.") {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 20 s"))
                .expect("DevTools socket open")
                .expect("DevTools message");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
            self.note(&v);
        }
    }

    pub async fn eval(&mut self, js: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{js}: {e}");
        }
        r["result"]["value"].clone()
    }

    pub async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    /// Poll `js` until it is true; returns how long that took.
    pub async fn until(&mut self, what: &str, js: &str, within: Duration) -> Duration {
        let t = Instant::now();
        loop {
            if self.eval(js).await == json!(true) {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < within,
                "timed out after {within:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn screenshot(&mut self, name: &str) {
        let Some(dir) = std::env::var_os("WATCHPOST_SCREENSHOTS") else {
            return;
        };
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(std::path::Path::new(&dir).join(name), png).unwrap();
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = self.child.kill().await;
    }
}
