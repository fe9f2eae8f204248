//! Real HTTP(S) servers for the core tests, and a helper that writes a config plus probe
//! files into a temporary directory and loads them with the real loader.
//!
//! The HTTP server is hand-written HTTP/1.1 over a tokio `TcpListener` on 127.0.0.1:0 so a
//! test can script any answer, including the broken ones a framework would refuse to send
//! (a body shorter than its `Content-Length`, a reset mid-body, a trickle). Every request
//! is recorded so tests can check what the agent sent. The TLS server is rustls over std
//! sockets on a thread: only the answer matters there, not the fault injection.
#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use watchpost::config::{Config, ConfigErrors};
use watchpost::probe::{run_confirmed, Probe, RunResult};

// ---------------------------------------------------------------------------------------
// Scriptable HTTP/1.1 server
// ---------------------------------------------------------------------------------------

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Req {
    /// 0-based position among all requests this server received.
    pub index: usize,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Req {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type RawFn = Box<dyn FnOnce(TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What the server does with one request.
pub enum Reply {
    /// A complete response with `Content-Length`, optionally after a delay.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        delay: Duration,
    },
    /// Hand the socket (request already read) to a script.
    Raw(RawFn),
}

impl Reply {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Reply {
        Reply::Full {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }
    pub fn json(status: u16, body: &str) -> Reply {
        Reply::new(status, "application/json", body)
    }
    pub fn text(status: u16, body: &str) -> Reply {
        Reply::new(status, "text/plain", body)
    }
    pub fn redirect(location: &str) -> Reply {
        Reply::text(302, "moved").header("Location", location)
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Full { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }
    /// Wait this long before sending anything.
    pub fn delayed(mut self, d: Duration) -> Reply {
        if let Reply::Full { delay, .. } = &mut self {
            *delay = d;
        }
        self
    }
    pub fn raw<F, Fut>(f: F) -> Reply
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Reply::Raw(Box::new(move |s| Box::pin(f(s))))
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        207 => "Multi-Status",
        301 => "Moved Permanently",
        302 => "Found",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

/// A response head with `Connection: close`.
pub fn head(status: u16, headers: &[(&str, &str)]) -> String {
    let mut s = format!(
        "HTTP/1.1 {status} {}\r\nConnection: close\r\n",
        reason(status)
    );
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s
}

/// A scriptable HTTP/1.1 server on 127.0.0.1:0; stops accepting when dropped.
pub struct HttpServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Req>>>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Serve every request with `handler` (which sees the request, including its index).
    pub async fn start<H>(handler: H) -> HttpServer
    where
        H: Fn(&Req) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let requests: Arc<Mutex<Vec<Req>>> = Arc::default();
        let handler = Arc::new(handler);
        let log = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let (handler, log) = (handler.clone(), log.clone());
                tokio::spawn(async move { serve_conn(sock, handler, log).await });
            }
        });
        HttpServer {
            addr,
            requests,
            task,
        }
    }

    /// Always the same JSON answer.
    pub async fn json(status: u16, body: &'static str) -> HttpServer {
        HttpServer::start(move |_| Reply::json(status, body)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn requests(&self) -> Vec<Req> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_conn<H>(mut sock: TcpStream, handler: Arc<H>, log: Arc<Mutex<Vec<Req>>>)
where
    H: Fn(&Req) -> Reply + Send + Sync + 'static,
{
    let Some(mut req) = read_request(&mut sock).await else {
        return;
    };
    let reply = {
        let mut log = log.lock().unwrap();
        req.index = log.len();
        log.push(req.clone());
        handler(&req)
    };
    match reply {
        Reply::Full {
            status,
            headers,
            body,
            delay,
        } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let len = body.len().to_string();
            h.push(("Content-Length", &len));
            let mut out = head(status, &h).into_bytes();
            out.extend_from_slice(&body);
            let _ = sock.write_all(&out).await;
            let _ = sock.shutdown().await;
        }
        Reply::Raw(f) => f(sock).await,
    }
}

async fn read_request(sock: &mut TcpStream) -> Option<Req> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut req = parse_head(&buf[..end])?;
    let mut body = buf[end + 4..].to_vec();
    let len: usize = req
        .header("content-length")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while body.len() < len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    req.body = body;
    Some(req)
}

fn parse_head(head: &[u8]) -> Option<Req> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some(Req {
        index: 0,
        method,
        path,
        headers,
        body: Vec::new(),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An address nobody listens on (bound once, then released).
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

/// A self-signed certificate for 127.0.0.1 and localhost.
pub struct TestCert {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

/// Self-signed for 127.0.0.1/localhost; `valid_days` ends validity that many days from
/// today (default: rcgen's far-future end).
pub fn self_signed(valid_days: Option<u64>) -> TestCert {
    use chrono::Datelike;
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("params");
    if let Some(days) = valid_days {
        let end = chrono::Utc::now().date_naive() + chrono::Days::new(days);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(end.year(), end.month() as u8, end.day() as u8);
    }
    let cert = params.self_signed(&key).expect("self-signed");
    TestCert {
        cert_pem: cert.pem(),
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    }
}

/// An HTTPS server (rustls, on a thread) answering every request with one JSON body.
pub struct TlsServer {
    pub addr: SocketAddr,
}

impl TlsServer {
    pub fn start(cert: &TestCert, status: u16, body: &'static str) -> TlsServer {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone())),
            )
            .expect("server cert");
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { continue };
                let config = config.clone();
                std::thread::spawn(move || {
                    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, sock);
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while find(&buf, b"\r\n\r\n").is_none() {
                        match tls.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let len = body.len().to_string();
                    let out = head(
                        status,
                        &[
                            ("Content-Type", "application/json"),
                            ("Content-Length", &len),
                        ],
                    ) + body;
                    let _ = tls.write_all(out.as_bytes());
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        TlsServer { addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }
}

// ---------------------------------------------------------------------------------------
// Config on disk
// ---------------------------------------------------------------------------------------

/// The main file most tests use: probes from `probes/*.toml`, no API, short deadlines,
/// no retries, no jitter.
pub const MAIN_TOML: &str = r#"[agent]
data_dir = "data"
probes = ["probes/*.toml"]
listen = ""
shutdown_grace = "2s"

[defaults]
interval = "1s"
timeout = "1s"
retries = 0
retry_delay = "50ms"
jitter = "0s"
"#;

/// A config directory in a tempdir: `watchpost.toml` plus whatever files a test writes.
pub struct TestConfig {
    pub dir: tempfile::TempDir,
}

impl TestConfig {
    /// An empty directory.
    pub fn empty() -> TestConfig {
        TestConfig {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// [`MAIN_TOML`] plus one probe file `probes/<file>`.
    pub fn with_probe(file: &str, probe_toml: &str) -> TestConfig {
        let t = TestConfig::empty();
        t.write("watchpost.toml", MAIN_TOML);
        t.write(&format!("probes/{file}"), probe_toml);
        t
    }

    /// Write a file relative to the directory (creating parents); returns its path.
    pub fn write(&self, rel: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, contents).expect("write");
        p
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn main_path(&self) -> PathBuf {
        self.path("watchpost.toml")
    }

    pub fn load(&self) -> Result<Config, ConfigErrors> {
        watchpost::config::load(&self.main_path())
    }

    /// Load, panicking with every diagnostic when the config is invalid.
    pub fn load_ok(&self) -> Config {
        match self.load() {
            Ok(c) => c,
            Err(e) => panic!("config should load, got:\n{e}"),
        }
    }
}

/// The probe file of an HTTP probe named `name` against `url`, plus `extra` TOML lines.
pub fn http_probe(name: &str, url: &str, extra: &str) -> String {
    format!("name = \"{name}\"\nkind = \"http\"\nurl = \"{url}\"\n{extra}\n")
}

/// Load `probe_toml` (under [`MAIN_TOML`]) with the real loader and run its one probe once,
/// confirmation retries included, exactly as `watchpost check` does.
pub async fn run_probe(probe_toml: &str) -> RunResult {
    let t = TestConfig::with_probe("p.toml", probe_toml);
    run_loaded(&t).await
}

/// Run the first probe of an already written config.
pub async fn run_loaded(t: &TestConfig) -> RunResult {
    let cfg = t.load_ok();
    let p = cfg.probes.first().expect("one probe").clone();
    let probe = Probe::build(&p).expect("probe builds");
    run_confirmed(&probe, &p).await
}

/// Shorthand: the error class of a result, or "" when it has none.
pub fn class(r: &RunResult) -> &str {
    r.error.as_ref().map(|e| e.class.as_str()).unwrap_or("")
}

/// Shorthand: the error message of a result, or "" when it has none.
pub fn message(r: &RunResult) -> &str {
    r.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
}
