//! In-process fake realtime STT servers for the listen and websocket tests: real
//! WebSocket servers (tokio-tungstenite) on 127.0.0.1:0, each scripted with one behaviour —
//! a well-behaved dialect server or one specific fault. Each connection's observations (frames,
//! control messages, headers) are logged so tests can check what the agent sent.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

/// A Deepgram-style server's script.
#[derive(Clone, Debug)]
pub struct Dg {
    /// What it "recognises".
    pub transcript: String,
    /// Send interim results while audio flows.
    pub interim: bool,
    /// Delay between CloseStream/Finalize and the final result.
    pub final_delay: Duration,
    /// After the final: Metadata and close 1000 (CloseStream). False = never closes.
    pub finish: bool,
    /// Never send a final result, only interims.
    pub only_interim: bool,
    /// Send WebSocket Ping frames before every result.
    pub pings: bool,
    /// Close with this code and reason after this many audio frames.
    pub close_after: Option<(usize, u16, &'static str)>,
    /// Require `Authorization: Token …`; otherwise answer 401.
    pub require_token: bool,
    /// Before the final's delay starts, wait for this cue from the test.
    pub hold_final: Option<Arc<tokio::sync::Notify>>,
}

impl Dg {
    pub fn new(transcript: &str) -> Self {
        Dg {
            transcript: transcript.into(),
            interim: true,
            final_delay: Duration::from_millis(20),
            finish: true,
            only_interim: false,
            pings: false,
            close_after: None,
            require_token: false,
            hold_final: None,
        }
    }
}

/// A settling server's script (Omi or generic wire): `partial` on the first audio frame, the
/// whole `transcript` `final_after` after the last audio frame, then silence — or, with
/// `churn`, the transcript keeps changing (with and without a trailing ".") at that interval.
#[derive(Clone, Debug)]
pub struct Timed {
    pub partial: String,
    pub transcript: String,
    pub final_after: Duration,
    pub churn: Option<Duration>,
}

/// What a server does with each connection.
#[derive(Clone, Debug)]
pub enum Behavior {
    Deepgram(Dg),
    /// Refuse the upgrade with this status and JSON body.
    Reject {
        status: u16,
        body: String,
    },
    /// Accept, read everything, never answer, never close.
    Silent,
    /// Omi: growing segments while audio flows, the full text once audio stops; optional
    /// `stt_degraded` / `stt_failed` status and `ping` text frames.
    Omi {
        transcript: String,
        status: Option<&'static str>,
        pings: bool,
        wrapped: bool,
    },
    /// Omi segments on a [`Timed`] script (segment id `seg-1` throughout).
    OmiTimed(Timed),
    /// Omi segment merges: one segment per word (ids `w0`, `w1`, …) while audio flows; once
    /// the audio is over, `w0` updated to the whole utterance and the others deleted with
    /// `segments_deleted`. With `new_id`, as Omi's backend does it: segments carry `start`
    /// times, `segments_deleted` comes first, and all words but the last are merged into a
    /// new segment `m0` (start 0.0) that arrives after the last word's segment.
    OmiMerge {
        transcript: String,
        new_id: bool,
    },
    /// Deepgram Flux (`/v2/listen`), per the AsyncAPI spec: `Connected`, then `TurnInfo`
    /// (`StartOfTurn`, an `Update` every 4 frames) while audio flows; after `CloseStream`
    /// the utterance in two turns (`EagerEndOfTurn` + `EndOfTurn` each), then close 1000
    /// and wait for the client's close. With `fatal`, after that many frames a `FatalError`
    /// (`code`, `description`) and close 1011.
    Flux {
        transcript: String,
        fatal: Option<(usize, &'static str, &'static str)>,
    },
    /// Omi degraded batch mode (PR #6059): on the first audio frame `stt_degraded` with
    /// `{"batch_mode":true,"batch_interval_seconds":…}`; from then on segments only once per
    /// `interval` — the words so far while audio flows (segment `b1`), the rest once it is
    /// over (segment `b2`). With `recover_after`, `stt_recovered` (with
    /// `degraded_duration_s`) that long after the degradation, then the whole utterance
    /// promptly once the audio is over, as a healthy Omi does.
    OmiBatch {
        transcript: String,
        interval: Duration,
        recover_after: Option<Duration>,
    },
    /// Omi flood: on the first audio frame, `messages` segment arrays of `per_message`
    /// segments each, every segment with a new id; then silence.
    OmiFlood {
        messages: usize,
        per_message: usize,
    },
    /// Generic finals `{"result":{"text","final":true}}` on a [`Timed`] script (for
    /// `accumulate = "replace"`); end messages are ignored, the socket is never closed.
    GenericTimed(Timed),
    /// Deepgram finals: `count` final results of `bytes` each as soon as the audio starts,
    /// then the usual Metadata and close after CloseStream.
    Flood {
        count: usize,
        bytes: usize,
        transcript: String,
    },
    /// Generic JSON: `{"result":{"text","final"}}`; `{"op":"end"}` → final + close 1000.
    Generic {
        transcript: String,
    },
    /// After the first audio frame, a text message that is not JSON.
    Malformed,
    /// After the first audio frame, raw bytes that are no WebSocket frame at all.
    Garbage,
    /// After the first audio frame, a well-formed binary message.
    BinaryMessage,
    /// After the first audio frame, a frame header declaring 100 MB, then a trickle of it.
    HugeFrame,
    /// Answer the upgrade one byte every 100 ms.
    Trickle,
    /// WebSocket echo: greets with `{"hello":"watchpost-test"}`, echoes text and binary.
    Echo,
    /// [`Behavior::Echo`], each text echoed only once the test's cue comes.
    EchoHeld(Arc<tokio::sync::Notify>),
}

/// The duration of an attempt's phase `name`.
pub fn phase(a: &watchpost::probe::Attempt, name: &str) -> Option<Duration> {
    a.phases.iter().find(|(n, _)| n == name).map(|(_, d)| *d)
}

/// Run `attempt` on a runtime of one thread that is kept busy as a loaded agent's would be:
/// once `srv`'s first connection has received a text containing `mark`, `cue` (which the
/// server waits for before it answers) is given and the thread blocks for `busy`. So the
/// answer reaches the agent's socket while the agent cannot read it. `srv` must run on
/// another runtime.
pub fn attempt_while_busy<F: std::future::Future>(
    srv: Server,
    mark: &'static str,
    cue: Arc<tokio::sync::Notify>,
    busy: Duration,
    attempt: F,
) -> F::Output {
    let agent = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("agent runtime");
    agent.block_on(async {
        let hog = tokio::spawn(async move {
            while !(srv.connections() > 0 && srv.log(0).texts.iter().any(|t| t.contains(mark))) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            cue.notify_one();
            std::thread::sleep(busy);
            srv
        });
        let out = attempt.await;
        drop(hog.await.expect("hog"));
        out
    })
}

/// What one connection saw.
#[derive(Debug, Default, Clone)]
pub struct Log {
    pub authorization: Option<String>,
    pub path: String,
    pub subprotocol: Option<String>,
    pub frames: usize,
    pub bytes: usize,
    pub empty_frames: usize,
    pub keepalives: usize,
    pub texts: Vec<String>,
    /// Arrival time of every binary frame.
    pub frame_times: Vec<Instant>,
    /// Whether the client answered the server's close frame with its own (`None` until
    /// the server has looked).
    pub close_answered: Option<bool>,
}

pub struct Server {
    pub port: u16,
    pub logs: Arc<Mutex<Vec<Arc<Mutex<Log>>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start(b: Behavior) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let logs: Arc<Mutex<Vec<Arc<Mutex<Log>>>>> = Arc::default();
        let l2 = logs.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let log = Arc::new(Mutex::new(Log::default()));
                l2.lock().unwrap().push(log.clone());
                let b = b.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(60), handle(sock, b, log)).await;
                });
            }
        });
        Server { port, logs, task }
    }

    /// `ws://127.0.0.1:<port><path_and_query>`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://127.0.0.1:{}{}", self.port, path_and_query)
    }

    /// The log of the `i`th connection.
    pub fn log(&self, i: usize) -> Log {
        self.logs.lock().unwrap()[i].lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.logs.lock().unwrap().len()
    }
}

async fn read_request(sock: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
    buf
}

fn status_text(code: u16) -> &'static str {
    match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

// tungstenite's upgrade callback error type is not ours to box.
#[allow(clippy::result_large_err)]
async fn accept(
    sock: TcpStream,
    log: &Arc<Mutex<Log>>,
    require_token: bool,
) -> Option<WebSocketStream<TcpStream>> {
    let log2 = log.clone();
    let cb = move |req: &Request, mut resp: Response| {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let proto = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        {
            let mut l = log2.lock().unwrap();
            l.authorization = auth.clone();
            l.path = req.uri().to_string();
            l.subprotocol = proto.clone();
        }
        if require_token
            && !auth
                .as_deref()
                .is_some_and(|a| a.starts_with("Token ") && a.len() > 6)
        {
            let body = r#"{"err_code":"INVALID_AUTH","err_msg":"Invalid credentials.","request_id":"req-401"}"#;
            let mut r = tokio_tungstenite::tungstenite::http::Response::new(Some(body.to_string()));
            *r.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
            return Err(r);
        }
        resp.headers_mut()
            .insert("dg-request-id", HeaderValue::from_static("req-fake-0001"));
        if let Some(p) = proto {
            if let Some(first) = p.split(',').next() {
                if let Ok(v) = HeaderValue::from_str(first.trim()) {
                    resp.headers_mut().insert("sec-websocket-protocol", v);
                }
            }
        }
        Ok(resp)
    };
    tokio_tungstenite::accept_hdr_async(sock, cb).await.ok()
}

fn results(text: &str, is_final: bool) -> Message {
    Message::text(
        json!({
            "type": "Results", "channel_index": [0, 1], "start": 0.0, "duration": 1.0,
            "is_final": is_final, "speech_final": is_final, "from_finalize": is_final,
            "channel": {"alternatives": [{"transcript": text, "confidence": 0.98}]},
            "metadata": {"request_id": "req-fake-0001"}
        })
        .to_string(),
    )
}

fn prefix(text: &str, frames: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let k = (frames / 4).clamp(1, words.len().max(1));
    words[..k.min(words.len())].join(" ")
}

fn record_frame(log: &Arc<Mutex<Log>>, b: &Bytes) {
    let mut l = log.lock().unwrap();
    l.frames += 1;
    l.bytes += b.len();
    l.frame_times.push(Instant::now());
    if b.is_empty() {
        l.empty_frames += 1;
    }
}

async fn close(ws: &mut WebSocketStream<TcpStream>, code: u16, reason: &str) {
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        })))
        .await;
}

async fn handle(mut sock: TcpStream, b: Behavior, log: Arc<Mutex<Log>>) {
    match b {
        Behavior::Reject { status, body } => {
            read_request(&mut sock).await;
            let resp = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                status_text(status),
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
        Behavior::Trickle => {
            read_request(&mut sock).await;
            let resp = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: xxxxxxxxxxxxxxxxxxxxxxxxxxx=\r\n\r\n";
            for byte in resp {
                if sock.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Behavior::Deepgram(dg) => {
            let Some(mut ws) = accept(sock, &log, dg.require_token).await else {
                return;
            };
            deepgram(&mut ws, &dg, &log).await;
        }
        Behavior::Silent => {
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Binary(b) = &m {
                    record_frame(&log, b);
                }
            }
        }
        Behavior::Omi {
            transcript,
            status,
            pings,
            wrapped,
        } => {
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            omi(&mut ws, &transcript, status, pings, wrapped, &log).await;
        }
        Behavior::Generic { transcript } => {
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            generic(&mut ws, &transcript, &log).await;
        }
        Behavior::OmiTimed(t) => {
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            let msg = |text: &str| {
                Message::text(
                    json!([{"id": "seg-1", "text": text, "speaker": "SPEAKER_00"}]).to_string(),
                )
            };
            timed(&mut ws, &t, &log, msg).await;
        }
        Behavior::OmiMerge { transcript, new_id } => {
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            let words: Vec<&str> = transcript.split_whitespace().collect();
            let mut frames = 0usize;
            loop {
                match tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
                    Err(_) if frames > 0 && new_id => {
                        let n = words.len().saturating_sub(1);
                        let gone: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
                        let del = json!({"type": "segments_deleted", "segment_ids": gone});
                        let _ = ws.send(Message::text(del.to_string())).await;
                        let merged = json!([{"id": "m0", "text": words[..n].join(" "), "start": 0.0, "end": 1.0}]);
                        let _ = ws.send(Message::text(merged.to_string())).await;
                        while let Some(Ok(m)) = ws.next().await {
                            if let Message::Close(_) = m {
                                return;
                            }
                        }
                        return;
                    }
                    Err(_) if frames > 0 => {
                        let merged = json!([{"id": "w0", "text": transcript}]);
                        let _ = ws.send(Message::text(merged.to_string())).await;
                        let gone: Vec<String> = (1..words.len()).map(|i| format!("w{i}")).collect();
                        let del = json!({"type": "segments_deleted", "segment_ids": gone});
                        let _ = ws.send(Message::text(del.to_string())).await;
                        // Stay quiet until the probe has settled and closes.
                        while let Some(Ok(m)) = ws.next().await {
                            if let Message::Close(_) = m {
                                return;
                            }
                        }
                        return;
                    }
                    Err(_) => continue,
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        record_frame(&log, &b);
                        if let Some(w) = words.get(frames) {
                            let start = frames as f64 * 0.4;
                            let seg = json!([{"id": format!("w{frames}"), "text": w, "start": start, "end": start + 0.4}]);
                            let _ = ws.send(Message::text(seg.to_string())).await;
                        }
                        frames += 1;
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(_) => return,
                }
            }
        }
        Behavior::Flux { transcript, fatal } => {
            let Some(mut ws) = accept(sock, &log, true).await else {
                return;
            };
            flux(&mut ws, &transcript, fatal, &log).await;
        }
        Behavior::OmiBatch {
            transcript,
            interval,
            recover_after,
        } => {
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            omi_batch(&mut ws, &transcript, interval, recover_after, &log).await;
        }
        Behavior::OmiFlood {
            messages,
            per_message,
        } => {
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            let mut sent = false;
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Binary(b) => {
                        record_frame(&log, &b);
                        if sent {
                            continue;
                        }
                        sent = true;
                        for i in 0..messages {
                            let segs: Vec<Value> = (0..per_message)
                                .map(|j| json!({"id": format!("s{i}-{j}"), "text": "word"}))
                                .collect();
                            let m = Message::text(Value::Array(segs).to_string());
                            if ws.send(m).await.is_err() {
                                return;
                            }
                        }
                    }
                    Message::Close(_) => return,
                    _ => {}
                }
            }
        }
        Behavior::GenericTimed(t) => {
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            let msg = |text: &str| {
                Message::text(json!({"result": {"text": text, "final": true}}).to_string())
            };
            timed(&mut ws, &t, &log, msg).await;
        }
        Behavior::Flood {
            count,
            bytes,
            transcript,
        } => {
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            let mut sent = false;
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Binary(b) => {
                        record_frame(&log, &b);
                        if !sent {
                            sent = true;
                            // Serialised once: the test measures the probe, not this server.
                            let one = results(&"flood ".repeat(bytes / 6), true);
                            for _ in 0..count {
                                if ws.send(one.clone()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Message::Text(t) if t.contains("CloseStream") => {
                        let _ = ws.send(results(&transcript, true)).await;
                        let meta = json!({"type": "Metadata", "request_id": "req-fake-0001"});
                        let _ = ws.send(Message::text(meta.to_string())).await;
                        close(&mut ws, 1000, "").await;
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        }
        Behavior::Echo | Behavior::EchoHeld(_) => {
            let held = match b {
                Behavior::EchoHeld(cue) => Some(cue),
                _ => None,
            };
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            let _ = ws
                .send(Message::text(r#"{"hello":"watchpost-test"}"#))
                .await;
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Text(t) => {
                        log.lock().unwrap().texts.push(t.to_string());
                        if t.as_str() == "close-me" {
                            close(&mut ws, 4000, "asked to").await;
                            continue;
                        }
                        if let Some(cue) = &held {
                            cue.notified().await;
                        }
                        let _ = ws
                            .send(Message::text(format!(
                                r#"{{"echo":{}}}"#,
                                Value::from(t.as_str())
                            )))
                            .await;
                    }
                    Message::Binary(b) => {
                        record_frame(&log, &b);
                        let _ = ws.send(Message::Binary(b)).await;
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        }
        Behavior::Malformed | Behavior::Garbage | Behavior::BinaryMessage | Behavior::HugeFrame => {
            let Some(mut ws) = accept(sock, &log, false).await else {
                return;
            };
            // Wait for the first audio frame.
            loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(bytes))) => {
                        record_frame(&log, &bytes);
                        break;
                    }
                    Some(Ok(_)) => continue,
                    _ => return,
                }
            }
            match b {
                Behavior::Malformed => {
                    let _ = ws
                        .send(Message::text(
                            r#"{"type":"Results","channel":{"alternatives":[{"transcript":"#,
                        ))
                        .await;
                }
                Behavior::BinaryMessage => {
                    let _ = ws
                        .send(Message::Binary(Bytes::from_static(&[
                            0xde, 0xad, 0xbe, 0xef, 0x00, 0x01,
                        ])))
                        .await;
                }
                Behavior::Garbage => {
                    // RSV bits set, bogus opcode: not a WebSocket frame.
                    let _ = ws
                        .get_mut()
                        .write_all(&[0xff, 0xfe, 0x13, 0x37, 0x42, 0x00, 0x99, 0x10])
                        .await;
                }
                _ => {
                    // A binary frame header declaring 100 MiB (64-bit length), then a
                    // trickle of payload: the test never allocates the 100 MB.
                    let mut header = vec![0x82u8, 127];
                    header.extend_from_slice(&(100u64 * 1024 * 1024).to_be_bytes());
                    let s = ws.get_mut();
                    let _ = s.write_all(&header).await;
                    let chunk = vec![0u8; 64 * 1024];
                    for _ in 0..16 {
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                }
            }
            // Keep the socket open and drain whatever comes.
            let s = ws.get_mut();
            let mut buf = [0u8; 4096];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
            }
        }
    }
}

async fn deepgram(ws: &mut WebSocketStream<TcpStream>, dg: &Dg, log: &Arc<Mutex<Log>>) {
    let mut frames = 0usize;
    while let Some(Ok(m)) = ws.next().await {
        match m {
            Message::Binary(b) => {
                record_frame(log, &b);
                frames += 1;
                if let Some((after, code, reason)) = dg.close_after {
                    if frames >= after {
                        close(ws, code, reason).await;
                        // Drain until the client answers the close.
                        while let Some(Ok(_)) = ws.next().await {}
                        return;
                    }
                }
                if dg.interim && frames.is_multiple_of(4) {
                    if dg.pings {
                        let _ = ws.send(Message::Ping(Bytes::from_static(b"hi"))).await;
                    }
                    let _ = ws
                        .send(results(&prefix(&dg.transcript, frames), false))
                        .await;
                }
            }
            Message::Text(t) => {
                let kind = serde_json::from_str::<Value>(&t)
                    .ok()
                    .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_default();
                log.lock().unwrap().texts.push(t.to_string());
                match kind.as_str() {
                    "KeepAlive" => log.lock().unwrap().keepalives += 1,
                    "Finalize" | "CloseStream" => {
                        if dg.only_interim {
                            let _ = ws.send(results(&dg.transcript, false)).await;
                            continue;
                        }
                        if let Some(cue) = &dg.hold_final {
                            cue.notified().await;
                        }
                        tokio::time::sleep(dg.final_delay).await;
                        if dg.pings {
                            let _ = ws.send(Message::Ping(Bytes::from_static(b"hi"))).await;
                        }
                        let _ = ws.send(results(&dg.transcript, true)).await;
                        if kind == "CloseStream" && dg.finish {
                            let meta = json!({"type": "Metadata", "request_id": "req-fake-0001", "duration": 2.0, "channels": 1});
                            let _ = ws.send(Message::text(meta.to_string())).await;
                            close(ws, 1000, "").await;
                        }
                    }
                    _ => {}
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
}

async fn omi(
    ws: &mut WebSocketStream<TcpStream>,
    transcript: &str,
    status: Option<&'static str>,
    pings: bool,
    wrapped: bool,
    log: &Arc<Mutex<Log>>,
) {
    let seg = |text: &str| {
        let segs = json!([{"id": "seg-1", "text": text, "speaker": "SPEAKER_00", "speaker_id": 0, "is_user": false, "start": 0.0, "end": 1.0}]);
        let v = if wrapped {
            json!({"type": "segments", "segments": segs})
        } else {
            segs
        };
        Message::text(v.to_string())
    };
    let _ = ws
        .send(Message::text(
            r#"{"type":"service_status","status":"ready"}"#,
        ))
        .await;
    let mut frames = 0usize;
    let mut sent_full = false;
    loop {
        let m = match tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
            Err(_) => {
                // Quiet for 300 ms: the audio is over; send the whole utterance once.
                if frames > 0 && !sent_full {
                    sent_full = true;
                    if status == Some("stt_failed") {
                        let _ = ws
                            .send(Message::text(r#"{"type":"service_status","status":"stt_failed","status_text":"provider down"}"#))
                            .await;
                        close(ws, 1011, "transcription_service_unavailable").await;
                        continue;
                    }
                    let _ = ws.send(seg(transcript)).await;
                }
                continue;
            }
            Ok(Some(Ok(m))) => m,
            Ok(_) => return,
        };
        match m {
            Message::Binary(b) => {
                record_frame(log, &b);
                frames += 1;
                if frames == 1 && status == Some("stt_degraded") {
                    let _ = ws
                        .send(Message::text(
                            r#"{"type":"service_status","status":"stt_degraded","status_text":"falling back to batch mode"}"#,
                        ))
                        .await;
                }
                if pings && frames.is_multiple_of(3) {
                    let _ = ws.send(Message::text("ping")).await;
                }
                if frames.is_multiple_of(5) {
                    let _ = ws.send(seg(&prefix(transcript, frames))).await;
                }
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}

async fn timed(
    ws: &mut WebSocketStream<TcpStream>,
    t: &Timed,
    log: &Arc<Mutex<Log>>,
    msg: impl Fn(&str) -> Message,
) {
    let mut frames = 0usize;
    let mut sent_full = false;
    let mut churned = 0u64;
    loop {
        // Until the whole transcript is out, the clock restarts with every audio frame.
        let wait = match (frames, sent_full, t.churn) {
            (0, _, _) => Duration::from_secs(3600),
            (_, false, _) => t.final_after,
            (_, true, Some(c)) => c,
            (_, true, None) => Duration::from_secs(3600),
        };
        let m = match tokio::time::timeout(wait, ws.next()).await {
            Err(_) if !sent_full => {
                sent_full = true;
                let _ = ws.send(msg(&t.transcript)).await;
                continue;
            }
            Err(_) => {
                // Churning: a hostile server that also stops reading, so it never answers
                // the probe's close frame either.
                loop {
                    churned += 1;
                    let text = if churned % 2 == 1 {
                        format!("{}.", t.transcript)
                    } else {
                        t.transcript.clone()
                    };
                    if ws.send(msg(&text)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(wait).await;
                }
            }
            Ok(Some(Ok(m))) => m,
            Ok(_) => return,
        };
        match m {
            Message::Binary(b) => {
                record_frame(log, &b);
                frames += 1;
                if frames == 1 {
                    let _ = ws.send(msg(&t.partial)).await;
                }
            }
            Message::Text(x) => log.lock().unwrap().texts.push(x.to_string()),
            Message::Close(_) => return,
            _ => {}
        }
    }
}

async fn generic(ws: &mut WebSocketStream<TcpStream>, transcript: &str, log: &Arc<Mutex<Log>>) {
    let mut frames = 0usize;
    while let Some(Ok(m)) = ws.next().await {
        match m {
            Message::Binary(b) => {
                record_frame(log, &b);
                frames += 1;
                if frames.is_multiple_of(4) {
                    let v = json!({"result": {"text": prefix(transcript, frames), "final": false}});
                    let _ = ws.send(Message::text(v.to_string())).await;
                }
            }
            Message::Text(t) => {
                log.lock().unwrap().texts.push(t.to_string());
                if t.contains("\"end\"") {
                    let v = json!({"result": {"text": transcript, "final": true}});
                    let _ = ws.send(Message::text(v.to_string())).await;
                    close(ws, 1000, "bye").await;
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
}

async fn omi_batch(
    ws: &mut WebSocketStream<TcpStream>,
    transcript: &str,
    interval: Duration,
    recover_after: Option<Duration>,
    log: &Arc<Mutex<Log>>,
) {
    let words: Vec<&str> = transcript.split_whitespace().collect();
    let seg = |id: &str, text: &str| {
        Message::text(json!([{"id": id, "text": text, "speaker": "SPEAKER_00", "is_user": false, "start": 0.0, "end": 1.0}]).to_string())
    };
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let mut degraded_at: Option<tokio::time::Instant> = None;
    let mut last_frame = far;
    let mut recovered = false;
    let mut sent_words = 0usize;
    let mut batches = 0usize;
    loop {
        // Next thing due: the recovery, the next batch, or (recovered) the prompt result.
        let due = match (degraded_at, recover_after, recovered) {
            (None, _, _) => far,
            (Some(_), _, true) if sent_words == words.len() => far,
            (Some(_), _, true) => last_frame + Duration::from_millis(300),
            (Some(d), Some(r), false) => d + r,
            (Some(d), None, false) => d + interval * (batches as u32 + 1),
        };
        let m = tokio::select! {
            m = ws.next() => m,
            _ = tokio::time::sleep_until(due) => {
                match (recover_after, recovered) {
                    (Some(r), false) => {
                        recovered = true;
                        let ev = json!({"type": "service_status", "status": "stt_recovered",
                            "status_text": "transcription restored",
                            "metadata": {"degraded_duration_s": r.as_secs_f64()}});
                        let _ = ws.send(Message::text(ev.to_string())).await;
                    }
                    (Some(_), true) => {
                        if sent_words < words.len() {
                            sent_words = words.len();
                            let _ = ws.send(seg("seg-1", transcript)).await;
                        }
                    }
                    (None, _) => {
                        batches += 1;
                        // A batch holds what was said so far: half the words while audio
                        // still flows, all of them once it has stopped.
                        let over = tokio::time::Instant::now().saturating_duration_since(last_frame)
                            > Duration::from_millis(250);
                        let upto = if over { words.len() } else { words.len() / 2 };
                        if upto > sent_words {
                            let text = words[sent_words..upto].join(" ");
                            let _ = ws.send(seg(&format!("b{batches}"), &text)).await;
                            sent_words = upto;
                        }
                    }
                }
                continue;
            }
        };
        match m {
            Some(Ok(Message::Binary(b))) => {
                record_frame(log, &b);
                last_frame = tokio::time::Instant::now();
                if degraded_at.is_none() {
                    degraded_at = Some(last_frame);
                    let secs = interval.as_secs_f64();
                    let ev = json!({"type": "service_status", "status": "stt_degraded",
                        "status_text": "STT provider degraded",
                        "metadata": {"batch_mode": true, "batch_interval_seconds": secs}});
                    let _ = ws.send(Message::text(ev.to_string())).await;
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
            Some(Ok(_)) => {}
        }
    }
}

async fn flux(
    ws: &mut WebSocketStream<TcpStream>,
    transcript: &str,
    fatal: Option<(usize, &'static str, &'static str)>,
    log: &Arc<Mutex<Log>>,
) {
    let mut seq = 0u64;
    let mut next = |v: Value| {
        let mut v = v;
        v["sequence_id"] = json!(seq);
        seq += 1;
        Message::text(v.to_string())
    };
    let turn = |event: &str, index: usize, text: &str| {
        let words: Vec<Value> = text
            .split_whitespace()
            .map(|w| json!({"word": w, "confidence": 0.97}))
            .collect();
        json!({"type": "TurnInfo", "request_id": "flux-req-0001", "event": event,
            "turn_index": index, "audio_window_start": 0.0, "audio_window_end": 1.0,
            "transcript": text, "words": words, "end_of_turn_confidence": 0.9})
    };
    let connected = json!({"type": "Connected", "request_id": "flux-req-0001"});
    if ws.send(next(connected)).await.is_err() {
        return;
    }
    let words: Vec<&str> = transcript.split_whitespace().collect();
    let half = words.len() / 2;
    let mut frames = 0usize;
    while let Some(Ok(m)) = ws.next().await {
        match m {
            Message::Binary(b) => {
                record_frame(log, &b);
                frames += 1;
                if let Some((after, code, description)) = fatal {
                    if frames >= after {
                        let e =
                            json!({"type": "FatalError", "code": code, "description": description});
                        let _ = ws.send(next(e)).await;
                        close(ws, 1011, code).await;
                        while let Some(Ok(_)) = ws.next().await {}
                        return;
                    }
                }
                if frames == 1 {
                    let _ = ws.send(next(turn("StartOfTurn", 0, ""))).await;
                } else if frames.is_multiple_of(4) {
                    let _ = ws
                        .send(next(turn(
                            "Update",
                            0,
                            &prefix(&words[..half].join(" "), frames),
                        )))
                        .await;
                }
            }
            Message::Text(t) => {
                log.lock().unwrap().texts.push(t.to_string());
                let kind = serde_json::from_str::<Value>(&t)
                    .ok()
                    .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_default();
                match kind.as_str() {
                    "Configure" => {
                        let _ = ws.send(next(json!({"type": "ConfigureSuccess"}))).await;
                    }
                    "CloseStream" => {
                        for (i, part) in [&words[..half], &words[half..]].iter().enumerate() {
                            let text = part.join(" ");
                            let _ = ws.send(next(turn("EagerEndOfTurn", i, &text))).await;
                            let _ = ws.send(next(turn("EndOfTurn", i, &text))).await;
                        }
                        close(ws, 1000, "").await;
                        // The client must answer the close frame with its own.
                        let answered = tokio::time::timeout(Duration::from_secs(3), async {
                            loop {
                                match ws.next().await {
                                    Some(Ok(Message::Close(_))) => return true,
                                    Some(Ok(_)) => continue,
                                    _ => return false,
                                }
                            }
                        })
                        .await
                        .unwrap_or(false);
                        log.lock().unwrap().close_answered = Some(answered);
                        return;
                    }
                    _ => {}
                }
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}
