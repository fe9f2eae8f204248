//! WebSocket servers that break the protocol on purpose, driven from raw sockets so every
//! byte is ours: close frames with codes no server may send (999, 1005, 5000) and close
//! frames with a one-byte payload. The probe must say what happened (the WebSocket library
//! replaces an illegal code by its own 1002 answer, so the sentence names the illegal code
//! kind rather than claiming the server sent 1002) — never a panic.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use watchpost::probe::{attempt_once, Attempt, Outcome, Probe};

/// Accept one WebSocket upgrade, then write `frame` raw and keep the socket open a while.
async fn raw_server(frame: Vec<u8>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let frame = frame.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let req = String::from_utf8_lossy(&got);
                let key = req
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| v.trim().to_string())
                    })
                    .unwrap_or_default();
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    derive_accept_key(key.as_bytes())
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.write_all(&frame).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            });
        }
    });
    format!("ws://{addr}/ws")
}

async fn run_against(frame: Vec<u8>) -> Attempt {
    let url = raw_server(frame).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("probes")).unwrap();
    std::fs::write(
        dir.path().join("probes/ws.toml"),
        format!(
            "name = \"ws\"\nkind = \"websocket\"\nurl = \"{url}\"\ntimeout = \"3s\"\nretries = 0\n\
             [[step]]\nname = \"hello\"\nexpect = {{ contains = \"x\", within = \"1s\" }}\n"
        ),
    )
    .unwrap();
    let cfg_path = dir.path().join("watchpost.toml");
    std::fs::write(
        &cfg_path,
        "[agent]\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n",
    )
    .unwrap();
    let cfg = watchpost::config::load(&cfg_path).unwrap_or_else(|e| panic!("{e}"));
    let pc = cfg.probes[0].clone();
    let p = Probe::build(&pc).unwrap();
    attempt_once(&p, &pc).await.0
}

fn close_frame(code: u16) -> Vec<u8> {
    let [hi, lo] = code.to_be_bytes();
    vec![0x88, 0x02, hi, lo]
}

fn class_and_message(a: &Attempt) -> (String, String) {
    let e = a.error.as_ref().expect("an error");
    (e.class.as_str().to_string(), e.message.clone())
}

#[tokio::test]
async fn illegal_close_codes_are_named_as_such() {
    for code in [999u16, 1005, 1006, 1015, 5000] {
        let a = run_against(close_frame(code)).await;
        assert_eq!(a.outcome, Outcome::Down);
        let (class, msg) = class_and_message(&a);
        assert_eq!(class, "ws_closed", "{code}: {msg}");
        assert!(msg.contains("not a valid close code"), "{code}: {msg}");
        assert!(!msg.contains("1002 Protocol violation"), "{code}: {msg}");
    }
}

#[tokio::test]
async fn legal_close_code_is_plain_ws_closed() {
    let mut f = vec![0x88, 2 + 8, 0x03, 0xf3]; // 1011 + "overload"
    f.extend_from_slice(b"overload");
    let a = run_against(f).await;
    let (class, msg) = class_and_message(&a);
    assert_eq!(class, "ws_closed", "{msg}");
    assert!(msg.contains("1011 overload"), "{msg}");
    assert!(!msg.contains("not a valid close code"), "{msg}");
}

#[tokio::test]
async fn one_byte_close_payload_is_a_protocol_error() {
    let a = run_against(vec![0x88, 0x01, 0x03]).await;
    let (class, msg) = class_and_message(&a);
    assert_eq!(a.outcome, Outcome::Down);
    assert!(
        class == "protocol" || class == "ws_closed",
        "{class}: {msg}"
    );
}
