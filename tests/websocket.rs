//! Scripted WebSocket probes against a real in-process echo server on 127.0.0.1.

#[path = "common/stt.rs"]
mod stt;

use std::time::{Duration, Instant};

use stt::{Behavior, Server};
use watchpost::probe::{attempt_once, run_confirmed, Attempt, Outcome, Probe};

fn load(probe: &str) -> Result<(tempfile::TempDir, watchpost::config::ProbeConfig), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("probes")).expect("mkdir");
    std::fs::write(dir.path().join("probes/ws.toml"), probe).expect("write probe");
    let cfg = dir.path().join("watchpost.toml");
    std::fs::write(
        &cfg,
        "[agent]\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n",
    )
    .expect("write config");
    match watchpost::config::load(&cfg) {
        Ok(c) => Ok((dir, c.probes.into_iter().next().expect("one probe"))),
        Err(e) => Err(e.to_string()),
    }
}

async fn run(probe: &str) -> Attempt {
    let (_dir, cfg) = load(probe).unwrap_or_else(|e| panic!("config did not load:\n{e}"));
    let p = Probe::build(&cfg).expect("build");
    attempt_once(&p, &cfg).await.0
}

fn head(url: &str) -> String {
    format!(
        r#"name = "ws-test"
kind = "websocket"
url = "{url}"
headers = {{ X-Test = "yes" }}
subprotocols = ["chat.v2", "chat.v1"]
timeout = "3s"
retries = 0
"#
    )
}

fn class(a: &Attempt) -> &str {
    a.error.as_ref().map(|e| e.class.as_str()).unwrap_or("")
}
fn message(a: &Attempt) -> &str {
    a.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
}

#[tokio::test]
async fn multi_step_script_passes_with_phases() {
    let srv = Server::start(Behavior::Echo).await;
    let probe = head(&srv.url("/ws"))
        + r#"
[[step]]
name = "greeting"
expect = { json = [ { path = "hello", equals = "watchpost-test" } ], within = "1s" }

[[step]]
send_json = { op = "subscribe", channel = "status" }

[[step]]
name = "ack"
expect = { json = [ { path = "echo", matches = "subscribe" } ] }

[[step]]
send_binary = "AAECAw=="

[[step]]
expect = { contains = "\u0000\u0001", skip_others = false }

[[step]]
wait = "50ms"

[[step]]
send = "plain text"

[[step]]
expect = { matches = "^\\{\"echo\":\"plain" }

[[step]]
close = 1000
"#;
    let a = run(&probe).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    let names: Vec<&str> = a.phases.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "connect", "greeting", "step2", "ack", "step4", "step5", "step6", "step7", "step8",
            "step9", "total"
        ]
    );
    assert!(a.phases.iter().find(|(n, _)| n == "step6").unwrap().1 >= Duration::from_millis(50));
    assert_eq!(a.details["subprotocol"], "chat.v2");
    let log = srv.log(0);
    assert_eq!(log.subprotocol.as_deref(), Some("chat.v2, chat.v1"));
    assert_eq!(log.bytes, 4);
    let sent: serde_json::Value = serde_json::from_str(&log.texts[0]).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({"op": "subscribe", "channel": "status"})
    );
}

#[tokio::test]
async fn expect_mismatch_reports_the_last_message() {
    let srv = Server::start(Behavior::Echo).await;
    let probe = head(&srv.url("/ws"))
        + r#"
[[step]]
send = "hi"
[[step]]
expect = { json = [ { path = "echo", equals = "bye" } ], within = "300ms" }
"#;
    let a = run(&probe).await;
    assert_eq!(class(&a), "assertion", "{a:?}");
    assert!(
        message(&a).contains("step 2 (step2): no matching message within 300ms"),
        "{}",
        message(&a)
    );
    assert!(
        message(&a).contains("echo is \"hi\", expected \"bye\""),
        "{}",
        message(&a)
    );
    assert_eq!(a.details["failed_step"], "step2");
}

#[tokio::test]
async fn strict_expect_fails_on_first_other_message() {
    let srv = Server::start(Behavior::Echo).await;
    let probe = head(&srv.url("/ws"))
        + r#"
[[step]]
expect = { matches = "nope", skip_others = false }
"#;
    let a = run(&probe).await;
    assert_eq!(class(&a), "assertion", "{a:?}");
    assert!(
        message(&a).contains("does not match /nope/"),
        "{}",
        message(&a)
    );
}

#[tokio::test]
async fn nothing_arrives_is_timeout() {
    let srv = Server::start(Behavior::Silent).await;
    let probe = head(&srv.url("/ws"))
        + r#"
[[step]]
expect = { contains = "x", within = "200ms" }
"#;
    let t = Instant::now();
    let a = run(&probe).await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(class(&a), "timeout", "{a:?}");
    assert_eq!(message(&a), "step 1 (step1): no message within 200ms");
}

#[tokio::test]
async fn server_close_during_expect_is_ws_closed() {
    let srv = Server::start(Behavior::Echo).await;
    let probe = head(&srv.url("/ws"))
        + r#"
[[step]]
send = "close-me"
[[step]]
name = "never"
expect = { contains = "nothing", within = "2s" }
"#;
    let a = run(&probe).await;
    assert_eq!(class(&a), "ws_closed", "{a:?}");
    assert!(
        message(&a).contains("server closed the socket with 4000 asked to"),
        "{}",
        message(&a)
    );
}

#[tokio::test]
async fn rejected_upgrade_and_retries() {
    let body = r#"{"error":{"code":"forbidden","message":"no access"}}"#;
    let srv = Server::start(Behavior::Reject {
        status: 403,
        body: body.into(),
    })
    .await;
    let probe = head(&srv.url("/ws")).replace("retries = 0", "retries = 1\nretry_delay = \"10ms\"");
    let (_d, cfg) = load(&probe).unwrap();
    let p = Probe::build(&cfg).unwrap();
    let r = run_confirmed(&p, &cfg).await;
    assert_eq!(r.outcome, Outcome::Down);
    let e = r.error.unwrap();
    assert_eq!(e.class.as_str(), "ws_rejected");
    assert!(
        e.message
            .contains("HTTP 403 Forbidden: forbidden no access"),
        "{}",
        e.message
    );
    assert_eq!(srv.connections(), 2, "one confirmation retry");
}

#[tokio::test]
async fn oversized_message_is_refused() {
    let srv = Server::start(Behavior::HugeFrame).await;
    let probe = head(&srv.url("/ws")).replace(
        "timeout = \"3s\"",
        "timeout = \"3s\"\nmax_message_bytes = 65536",
    ) + r#"
[[step]]
send_binary = "AQID"
[[step]]
expect = { contains = "x" }
"#;
    let a = run(&probe).await;
    assert_eq!(class(&a), "frame_too_large", "{a:?}");
    assert!(message(&a).contains("65536 byte cap"), "{}", message(&a));
}

#[test]
fn step_config_errors() {
    let e = load(&(head("ws://h/x") + "[[step]]\nsend = \"a\"\nwait = \"1s\"\n")).unwrap_err();
    assert!(
        e.contains("ws.toml:8:1: step 1 needs exactly one of send"),
        "{e}"
    );
    let e = load(&(head("ws://h/x") + "[[step]]\nsend_binary = \"***\"\n")).unwrap_err();
    assert!(e.contains("send_binary is not valid base64"), "{e}");
    let e = load(&(head("ws://h/x") + "[[step]]\nexpect = { matches = \"(\" }\n")).unwrap_err();
    assert!(e.contains("invalid regex"), "{e}");
    let e = load(&(head("ws://h/x") + "[[step]]\nclose = 1006\n")).unwrap_err();
    assert!(e.contains("close code 1006 cannot be sent"), "{e}");
    let e = load(&head("https://h/x")).unwrap_err();
    assert!(e.contains("url scheme \"https\" is not ws or wss"), "{e}");
}

/// An `expect` step ends when its message reached the socket: a reply that arrives while
/// the agent's one thread is busy is not timed by the agent's wait.
#[test]
fn an_expect_step_is_timed_by_the_reply_s_arrival() {
    let server = tokio::runtime::Runtime::new().unwrap();
    let cue = std::sync::Arc::new(tokio::sync::Notify::new());
    let srv = server.block_on(Server::start(Behavior::EchoHeld(cue.clone())));
    let probe = head(&srv.url("/ws"))
        + "[[step]]\nexpect = { contains = \"hello\" }\n\n\
           [[step]]\nwait = \"100ms\"\n\n\
           [[step]]\nsend = \"ping\"\n\n\
           [[step]]\nname = \"reply\"\nexpect = { contains = \"ping\" }\n";
    // (The wait gives the kernel time to turn receive stamps on, see `Arrival::kernel`.)
    let busy = Duration::from_millis(600);
    let t0 = std::time::Instant::now();
    let a = stt::attempt_while_busy(srv, "ping", cue, busy, run(&probe));
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    assert!(t0.elapsed() >= busy, "the agent was kept busy");
    let reply = stt::phase(&a, "reply").expect("reply");
    assert!(
        reply < Duration::from_millis(250),
        "reply {reply:?}: the agent was busy for {busy:?} from the server's cue"
    );
}

/// A URL naming the host by an IPv6 literal (`ws://[::1]:port`) connects there: the agent
/// opens the TCP connection itself (to stamp its reads) and strips the brackets.
#[tokio::test]
async fn an_ipv6_literal_host_connects() {
    use futures_util::SinkExt as _;
    let l = tokio::net::TcpListener::bind("[::1]:0")
        .await
        .expect("bind ::1");
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (sock, _) = l.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(sock).await.unwrap();
        ws.send(tokio_tungstenite::tungstenite::Message::text("hello"))
            .await
            .unwrap();
        ws.close(None).await.ok();
    });
    let probe = format!(
        "name = \"v6\"\nkind = \"websocket\"\nurl = \"ws://[::1]:{port}/\"\ntimeout = \"3s\"\nretries = 0\n\n\
         [[step]]\nexpect = {{ contains = \"hello\" }}\n"
    );
    let a = run(&probe).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
}
