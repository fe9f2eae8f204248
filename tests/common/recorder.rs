//! A recording HTTP server on 127.0.0.1:0 standing in for Instatus, PagerDuty and webhook
//! receivers: it keeps every request (method, path, headers, body, arrival time) and answers
//! from a script (per path prefix, consumed in order: e.g. 500 then 200, 429 with
//! `Retry-After`, 400) or a default responder.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::Value;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// Status the recorder answered with.
    pub status: u16,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {}: body is not JSON ({e}): {}",
                self.method,
                self.path,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: "{}".into(),
            delay: Duration::ZERO,
        }
    }
    pub fn json(status: u16, v: Value) -> Reply {
        Reply {
            body: v.to_string(),
            ..Reply::status(status)
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

type Responder = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

struct Inner {
    log: Vec<Recorded>,
    scripts: Vec<(String, VecDeque<Reply>)>,
    default: Responder,
}

/// The server; stops when dropped.
pub struct Recorder {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut rec = Recorded {
        method: parts.method.to_string(),
        path,
        headers,
        body,
        at: Instant::now(),
        status: 0,
    };
    let reply = {
        let mut g = inner.lock().unwrap();
        let scripted = g
            .scripts
            .iter_mut()
            .find(|(p, q)| rec.path.starts_with(p.as_str()) && !q.is_empty())
            .and_then(|(_, q)| q.pop_front());
        let reply = scripted.unwrap_or_else(|| (g.default)(&rec));
        rec.status = reply.status;
        g.log.push(rec);
        reply
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut b = Response::builder()
        .status(reply.status)
        .header("content-type", "application/json");
    for (k, v) in &reply.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(Body::from(reply.body)).unwrap()
}

impl Recorder {
    /// Start with a default answer of 200 `{}`.
    pub async fn start() -> Recorder {
        Self::with_default(|_| Reply::status(200)).await
    }

    pub async fn with_default(f: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(Inner {
            log: vec![],
            scripts: vec![],
            default: Arc::new(f),
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Recorder { addr, inner, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answer the next requests whose path starts with `prefix` with `replies`, in order.
    pub fn script(&self, prefix: &str, replies: Vec<Reply>) {
        self.inner
            .lock()
            .unwrap()
            .scripts
            .push((prefix.to_string(), replies.into()));
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().log.clone()
    }

    /// Wait until `pred` holds for the log (or panic after `timeout`, listing what came).
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Recorded]) -> bool,
    ) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.requests();
            if pred(&log) {
                return log;
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = log
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {} -> {} {}",
                            r.method,
                            r.path,
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        )
                    })
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; received:\n{}",
                    seen.join("\n")
                );
            }
            // A real wait (not a tokio timer), so this also works under paused tokio time.
            let _ =
                tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(20))).await;
        }
    }

    /// Wait until at least `n` requests were answered with a 2xx.
    pub async fn wait_ok(&self, what: &str, n: usize, timeout: Duration) -> Vec<Recorded> {
        self.wait_for(what, timeout, |l| {
            l.iter().filter(|r| (200..300).contains(&r.status)).count() >= n
        })
        .await
    }
}
