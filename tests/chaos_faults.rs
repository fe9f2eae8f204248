//! Every rehearsal fault mode, injected into a real probe against a real server on
//! 127.0.0.1, gives the error class a real outage of that kind gives: transport faults
//! (`blackhole`, `latency`, `reset`) through the fault proxy, also through TLS; `down`
//! without touching the network; `http_status`, `ws_close`, `garble`, `stt_degraded` inside
//! the probe's own code.

mod common;

use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use watchpost::chaos::fault::{target_of, Faults, Mode};
use watchpost::config::ProbeConfig;
use watchpost::demo_stt::{serve_with, DemoSttOptions};
use watchpost::probe::{attempt_once_with, Attempt, Outcome, Probe};

use common::http::{http_probe, self_signed, HttpServer, Reply, TestConfig, TlsServer};

/// Run one attempt of the config's only probe under `mode` (proxy started as a rehearsal
/// would), then lift the fault.
async fn under(pc: &ProbeConfig, mode: Mode) -> Attempt {
    let faults = Faults::default();
    faults
        .inject(&pc.name, mode, target_of(pc.spec.url()))
        .await
        .expect("inject");
    let p = Probe::build(pc).expect("probe builds");
    let f = faults.get(&pc.name).expect("fault active");
    let a = attempt_once_with(&p, pc, Some(&f)).await.0;
    faults.clear(&pc.name);
    assert!(faults.get(&pc.name).is_none());
    a
}

fn class(a: &Attempt) -> &str {
    a.error.as_ref().map(|e| e.class.as_str()).unwrap_or("")
}

fn http_cfg(url: &str, extra: &str) -> (TestConfig, ProbeConfig) {
    let t = TestConfig::with_probe("p.toml", &http_probe("api", url, extra));
    let pc = t.load_ok().probes[0].clone();
    (t, pc)
}

#[tokio::test]
async fn http_transport_and_status_faults_give_the_classes_of_real_outages() {
    let srv = HttpServer::start(|_| Reply::json(200, r#"{"status":"ok"}"#)).await;
    let url = format!("http://localhost:{}/health", srv.addr.port());
    let (_t, pc) = http_cfg(&url, "");

    let a = under(&pc, Mode::Down).await;
    assert_eq!(
        (a.outcome, class(&a)),
        (Outcome::Down, "unreachable"),
        "{a:?}"
    );
    assert_eq!(a.details["rehearsal_fault"], "down");
    assert!(srv.requests().is_empty(), "down must not touch the network");

    let a = under(&pc, Mode::Blackhole).await;
    assert_eq!((a.outcome, class(&a)), (Outcome::Down, "timeout"), "{a:?}");
    assert!(srv.requests().is_empty(), "a blackhole answers nothing");

    let a = under(&pc, Mode::Reset).await;
    assert_eq!(
        (a.outcome, class(&a)),
        (Outcome::Down, "connection_reset"),
        "{a:?}"
    );

    // Latency: the real server answers, later. Over the 1 s timeout it is a timeout …
    let a = under(&pc, Mode::Latency(Duration::from_millis(1500))).await;
    assert_eq!((a.outcome, class(&a)), (Outcome::Down, "timeout"), "{a:?}");
    // … under it, an up run whose time to first byte carries the delay.
    let a = under(&pc, Mode::Latency(Duration::from_millis(300))).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    let ttfb = a.phases.iter().find(|(n, _)| n == "ttfb").expect("ttfb").1;
    assert!(ttfb >= Duration::from_millis(300), "ttfb {ttfb:?}");

    let before = srv.requests().len();
    let a = under(
        &pc,
        Mode::HttpStatus {
            status: 503,
            body: "upstream down".into(),
        },
    )
    .await;
    assert_eq!(
        (a.outcome, class(&a)),
        (Outcome::Down, "http_status"),
        "{a:?}"
    );
    assert_eq!(a.details["status"], 503);
    assert_eq!(
        srv.requests().len(),
        before + 1,
        "the real request still went out"
    );

    // No fault: the same probe is up again (nothing left behind).
    let p = Probe::build(&pc).unwrap();
    let a = attempt_once_with(&p, &pc, None).await.0;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    assert!(!a.details.contains_key("rehearsal_fault"));
}

#[tokio::test]
async fn transport_faults_work_through_tls() {
    let cert = self_signed(None);
    let srv = TlsServer::start(&cert, 200, r#"{"status":"ok"}"#);
    let url = format!("https://localhost:{}/health", srv.addr.port());
    let t = TestConfig::with_probe("p.toml", &http_probe("tls", &url, "ca_file = \"ca.pem\""));
    t.write("probes/ca.pem", &cert.cert_pem);
    let pc = t.load_ok().probes[0].clone();

    let a = under(&pc, Mode::Latency(Duration::from_millis(200))).await;
    // Up means the handshake went end to end through the tunnel: the certificate was
    // checked against ca.pem and the name localhost.
    assert_eq!(a.outcome, Outcome::Up, "TLS through the proxy: {a:?}");
    let a = under(&pc, Mode::Blackhole).await;
    assert_eq!(class(&a), "timeout", "{a:?}");
    let a = under(&pc, Mode::Reset).await;
    assert_eq!(class(&a), "connection_reset", "{a:?}");
}

async fn demo_stt() -> (u16, CancellationToken) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let token = CancellationToken::new();
    tokio::spawn(serve_with(
        l,
        token.clone(),
        DemoSttOptions { fault_every: 0 },
    ));
    (port, token)
}

fn listen_cfg(port: u16) -> (TestConfig, ProbeConfig) {
    let audio =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/audio/testing-one-two-three.wav");
    let probe = format!(
        r#"name = "stt"
kind = "listen"
dialect = "deepgram"
url = "ws://127.0.0.1:{port}/v1/listen?encoding=linear16&sample_rate=16000&channels=1&interim_results=true"
headers = {{ Authorization = "Token demo" }}
audio = "{}"
speed = 4.0
lead_in = "200ms"
tail = "200ms"
final_timeout = "2s"
timeout = "10s"
interval = "15s"
"#,
        audio.display()
    );
    let t = TestConfig::with_probe("stt.toml", &probe);
    let pc = t.load_ok().probes[0].clone();
    (t, pc)
}

#[tokio::test]
async fn listen_faults_give_ws_closed_stt_degraded_and_a_mismatch() {
    let (port, token) = demo_stt().await;
    let (_t, pc) = listen_cfg(port);

    let p = Probe::build(&pc).unwrap();
    let a = attempt_once_with(&p, &pc, None).await.0;
    assert_eq!(a.outcome, Outcome::Up, "baseline: {a:?}");

    let a = under(
        &pc,
        Mode::WsClose {
            code: 1011,
            reason: "NET-0001".into(),
            after: Duration::from_millis(300),
        },
    )
    .await;
    assert_eq!(
        (a.outcome, class(&a)),
        (Outcome::Down, "ws_closed"),
        "{a:?}"
    );
    let msg = &a.error.as_ref().unwrap().message;
    assert!(msg.contains("1011 NET-0001"), "{msg}");
    assert_eq!(a.details["close_code"], 1011);

    let a = under(&pc, Mode::SttDegraded).await;
    assert_eq!(
        (a.outcome, class(&a)),
        (Outcome::Degraded, "stt_degraded"),
        "{a:?}"
    );

    // The utterance backwards: the service hears something else (or nothing it knows).
    let a = under(&pc, Mode::Garble).await;
    eprintln!("garble: {a:?}");
    assert_eq!(a.outcome, Outcome::Down, "{a:?}");
    assert!(
        matches!(class(&a), "transcript_mismatch" | "no_transcript"),
        "{a:?}"
    );

    // Transport faults meet the WebSocket connect too (IP literal hosts work here).
    let a = under(&pc, Mode::Reset).await;
    assert_eq!(class(&a), "connection_reset", "{a:?}");
    token.cancel();
}

#[tokio::test]
async fn websocket_ws_close_ends_the_script_as_a_server_close() {
    let (port, token) = demo_stt().await;
    let probe = format!(
        r#"name = "ws"
kind = "websocket"
url = "ws://127.0.0.1:{port}/v1/listen?encoding=linear16&sample_rate=16000"
headers = {{ Authorization = "Token demo" }}
timeout = "5s"
interval = "10s"

[[step]]
wait = "3s"
"#
    );
    let t = TestConfig::with_probe("ws.toml", &probe);
    let pc = t.load_ok().probes[0].clone();
    let a = under(
        &pc,
        Mode::WsClose {
            code: 1001,
            reason: "going away".into(),
            after: Duration::from_millis(200),
        },
    )
    .await;
    assert_eq!(
        (a.outcome, class(&a)),
        (Outcome::Down, "ws_closed"),
        "{a:?}"
    );
    assert!(a.error.as_ref().unwrap().message.contains("1001"), "{a:?}");
    token.cancel();
}
