//! `wss://` for the websocket and listen probes: a TLS front (tokio-rustls, certificate from
//! a private CA the test makes) before the in-process WebSocket/STT servers of
//! tests/common/stt.rs, trusted through the probe's `ca_file`; and hostile TLS servers — a
//! certificate from an unknown CA or for another host name, a handshake followed by silence,
//! a handshake followed by garbage instead of `HTTP/1.1 101`.

#[path = "common/ca.rs"]
mod ca;
#[path = "common/stt.rs"]
mod stt;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ca::{Leaf, TestCa};
use stt::{Behavior, Dg, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use watchpost::probe::{attempt_once, Attempt, Outcome, Probe};

/// What the TLS front does after the handshake.
#[derive(Clone, Copy)]
enum After {
    /// Relay bytes to the plain server on this port.
    Relay(u16),
    /// Say nothing, keep the connection open.
    Silence,
    /// Read the upgrade request, answer with bytes that are no HTTP response.
    Garbage,
}

/// A TLS server on 127.0.0.1 presenting `leaf`; returns its port.
async fn tls_front(leaf: &Leaf, after: After) -> u16 {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Ok(mut tls)) =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(sock)).await
                else {
                    return;
                };
                match after {
                    After::Relay(p) => {
                        let Ok(mut back) = TcpStream::connect(("127.0.0.1", p)).await else {
                            return;
                        };
                        let _ = tokio::time::timeout(
                            Duration::from_secs(30),
                            tokio::io::copy_bidirectional(&mut tls, &mut back),
                        )
                        .await;
                    }
                    After::Silence => {
                        let mut buf = [0u8; 4096];
                        let _ = tokio::time::timeout(Duration::from_secs(10), async {
                            while let Ok(n) = tls.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                            }
                        })
                        .await;
                    }
                    After::Garbage => {
                        let mut buf = [0u8; 4096];
                        let _ = tls.read(&mut buf).await;
                        let _ = tls
                            .write_all(b"\x16\x03garbage, not HTTP at all\r\n\r\n")
                            .await;
                        let _ = tls.flush().await;
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            });
        }
    });
    port
}

/// Write `probe` (and `ca.pem` = `ca` next to it, when given) and load it.
fn load(dir: &Path, probe: &str, ca: Option<&TestCa>) -> watchpost::config::ProbeConfig {
    std::fs::create_dir_all(dir.join("probes")).unwrap();
    if let Some(ca) = ca {
        ca.write(&dir.join("probes"), "ca.pem");
    }
    std::fs::write(dir.join("probes/p.toml"), probe).unwrap();
    let cfg = dir.join("watchpost.toml");
    std::fs::write(
        &cfg,
        "[agent]\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n",
    )
    .unwrap();
    match watchpost::config::load(&cfg) {
        Ok(c) => c.probes.into_iter().next().unwrap(),
        Err(e) => panic!("config did not load:\n{e}"),
    }
}

async fn run(probe: &str, ca: Option<&TestCa>) -> Attempt {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(dir.path(), probe, ca);
    let p = Probe::build(&cfg).unwrap();
    attempt_once(&p, &cfg).await.0
}

fn ws_probe(port: u16, trust: bool) -> String {
    format!(
        "name = \"wss\"\nkind = \"websocket\"\nurl = \"wss://127.0.0.1:{port}/ws\"\n{}timeout = \"3s\"\nconnect_timeout = \"1s\"\nretries = 0\n\n\
         [[step]]\nname = \"greeting\"\nexpect = {{ json = [ {{ path = \"hello\", equals = \"watchpost-test\" }} ], within = \"1s\" }}\n\n\
         [[step]]\nsend = \"over tls\"\n\n[[step]]\nexpect = {{ contains = \"over tls\" }}\n\n[[step]]\nclose = 1000\n",
        if trust { "ca_file = \"ca.pem\"\n" } else { "" }
    )
}

/// A Deepgram listen probe on `wss://127.0.0.1:{port}`, trusting `ca.pem`.
fn listen_probe(port: u16) -> String {
    let audio =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/audio/testing-one-two-three.wav");
    format!(
        "name = \"listen-wss\"\nkind = \"listen\"\ndialect = \"deepgram\"\n\
         url = \"wss://127.0.0.1:{port}/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000&channels=1&interim_results=true\"\n\
         headers = {{ Authorization = \"Token test-key\" }}\naudio = \"{}\"\nspeed = 4.0\nretries = 0\nfinal_timeout = \"2s\"\nca_file = \"ca.pem\"\n",
        audio.display()
    )
}

fn class(a: &Attempt) -> &str {
    a.error.as_ref().map(|e| e.class.as_str()).unwrap_or("")
}
fn message(a: &Attempt) -> &str {
    a.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_probe_over_wss_with_ca_file_is_up() {
    let ca = TestCa::new("watchpost test CA");
    let srv = Server::start(Behavior::Echo).await;
    let port = tls_front(&ca.leaf(&["127.0.0.1"]), After::Relay(srv.port)).await;
    let a = run(&ws_probe(port, true), Some(&ca)).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    assert_eq!(srv.connections(), 1);
    assert!(srv.log(0).texts.iter().any(|t| t == "over tls"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_without_the_ca_is_a_tls_failure() {
    let ca = TestCa::new("watchpost test CA");
    let srv = Server::start(Behavior::Echo).await;
    let port = tls_front(&ca.leaf(&["127.0.0.1"]), After::Relay(srv.port)).await;
    // No ca_file, and a ca_file holding somebody else's CA.
    let other = TestCa::new("another CA");
    for (trust, ca_used) in [(false, None), (true, Some(&other))] {
        let a = run(&ws_probe(port, trust), ca_used).await;
        assert_eq!(a.outcome, Outcome::Down, "{a:?}");
        assert_eq!(class(&a), "tls", "{a:?}");
        let m = message(&a);
        assert!(m.starts_with("TLS handshake failed: "), "{m}");
        assert!(m.contains("certificate"), "{m}");
    }
    assert_eq!(srv.connections(), 0, "nothing reached the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_certificate_for_another_host_is_a_tls_failure() {
    let ca = TestCa::new("watchpost test CA");
    let srv = Server::start(Behavior::Echo).await;
    let port = tls_front(&ca.leaf(&["other.example"]), After::Relay(srv.port)).await;
    let a = run(&ws_probe(port, true), Some(&ca)).await;
    assert_eq!(class(&a), "tls", "{a:?}");
    let m = message(&a);
    assert!(m.contains("certificate") && m.contains("127.0.0.1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_handshake_then_silence_is_a_timeout() {
    let ca = TestCa::new("watchpost test CA");
    let port = tls_front(&ca.leaf(&["127.0.0.1"]), After::Silence).await;
    let t0 = Instant::now();
    let a = run(&ws_probe(port, true), Some(&ca)).await;
    assert_eq!(class(&a), "timeout", "{a:?}");
    assert!(message(&a).contains("no WebSocket upgrade within"), "{a:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_handshake_then_garbage_is_a_protocol_failure() {
    let ca = TestCa::new("watchpost test CA");
    let port = tls_front(&ca.leaf(&["127.0.0.1"]), After::Garbage).await;
    let a = run(&ws_probe(port, true), Some(&ca)).await;
    assert_eq!(a.outcome, Outcome::Down, "{a:?}");
    assert!(matches!(class(&a), "protocol" | "ws_rejected"), "{a:?}");
    let m = message(&a);
    assert!(
        m.starts_with("WebSocket upgrade failed: the server answered with something that is not an HTTP response"),
        "a human sentence: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_probe_over_wss_with_ca_file_is_up() {
    let ca = TestCa::new("watchpost test CA");
    let srv = Server::start(Behavior::Deepgram(Dg::new("Testing, 1 2 3 4 5."))).await;
    let port = tls_front(&ca.leaf(&["127.0.0.1"]), After::Relay(srv.port)).await;
    let probe = listen_probe(port);
    let a = run(&probe, Some(&ca)).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    assert_eq!(a.details["wer"], serde_json::Value::from(0.0));
    assert_eq!(srv.log(0).authorization.as_deref(), Some("Token test-key"));
    // Without the CA: the same server is a TLS failure.
    let a = run(&probe.replace("ca_file = \"ca.pem\"\n", ""), None).await;
    assert_eq!(class(&a), "tls", "{a:?}");
}

/// Under TLS too, a final that arrives while the agent is busy is timed by its arrival at
/// the socket: the stamp is the TCP stream's, below rustls.
#[test]
fn a_final_read_late_over_wss_is_timed_by_its_arrival() {
    let server = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new("watchpost test CA");
    let cue = Arc::new(tokio::sync::Notify::new());
    let mut dg = Dg::new("Testing, 1 2 3 4 5.");
    dg.final_delay = Duration::from_millis(50);
    dg.hold_final = Some(cue.clone());
    let srv = server.block_on(Server::start(Behavior::Deepgram(dg)));
    let port = server.block_on(tls_front(&ca.leaf(&["127.0.0.1"]), After::Relay(srv.port)));
    let probe = listen_probe(port);
    let busy = Duration::from_millis(600);
    let a = stt::attempt_while_busy(srv, "CloseStream", cue, busy, run(&probe, Some(&ca)));
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    let fin = stt::phase(&a, "final").expect("final");
    assert!(
        fin >= Duration::from_millis(50) && fin < Duration::from_millis(300),
        "final {fin:?}: the agent was busy for {busy:?} from the server's cue"
    );
}
