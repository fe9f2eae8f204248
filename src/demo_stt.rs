//! An embedded realtime speech-to-text service for `watchpost demo`, speaking the Deepgram
//! live dialect, so the demo's listen probe has something real to stream to.
//!
//! It does not recognise speech: it recognises the *shipped utterances* (probes/audio, built
//! into the binary) by a fingerprint of the audio — the energy envelope in 20 ms windows with
//! silence trimmed — and answers with their manifest transcripts. Pacing is realistic:
//! interim results about every second of audio, the final within ~80–300 ms of
//! `Finalize`/`CloseStream`, then `Metadata` and close 1000; a `dg-request-id` header on
//! every upgrade; 1011 `NET-0001` after 10 s without any message. About one session in
//! fifteen gets a fault: a 1011 `NET-0001` close mid-stream, or a final that takes 2.5–4 s.
//!
//! Not for production or tests of recognition quality (tests use the PocketSphinx peer).

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use rand::Rng as _;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::probe::listen::audio::Audio;

const RATE: u32 = 16_000;
const WINDOW: usize = 320; // 20 ms at 16 kHz
/// Audio kept per session (60 s); more is refused rather than buffered without bound.
const MAX_SAMPLES: usize = RATE as usize * 60;
const IDLE_CLOSE: Duration = Duration::from_secs(10);

const MANIFEST: &str = include_str!("../probes/audio/manifest.toml");
const WAVS: &[(&str, &[u8])] = &[
    (
        "testing-one-two-three.wav",
        include_bytes!("../probes/audio/testing-one-two-three.wav"),
    ),
    (
        "check-system-status.wav",
        include_bytes!("../probes/audio/check-system-status.wav"),
    ),
    (
        "weather-is-nice-today.wav",
        include_bytes!("../probes/audio/weather-is-nice-today.wav"),
    ),
    (
        "speech-system-test.wav",
        include_bytes!("../probes/audio/speech-system-test.wav"),
    ),
];

/// Knobs for [`serve_with`].
#[derive(Debug, Clone, Copy)]
pub struct DemoSttOptions {
    /// One session in this many gets a fault (0 = never).
    pub fault_every: u32,
}

impl Default for DemoSttOptions {
    fn default() -> Self {
        DemoSttOptions { fault_every: 15 }
    }
}

/// A known utterance and its fingerprint.
struct Reference {
    transcript: String,
    envelope: Vec<f32>,
}

/// Energy per 20 ms window in dB, with leading and trailing silence trimmed.
fn envelope(samples: &[i16]) -> Vec<f32> {
    let db: Vec<f32> = samples
        .chunks(WINDOW)
        .map(|w| {
            let e =
                w.iter().map(|s| (*s as f64) * (*s as f64)).sum::<f64>() / w.len().max(1) as f64;
            (10.0 * (e + 1.0).log10()) as f32
        })
        .collect();
    let loud = |v: &f32| *v > 45.0; // ~ -45 dBFS: below is silence
    let start = db.iter().position(loud).unwrap_or(db.len());
    let end = db.iter().rposition(loud).map(|i| i + 1).unwrap_or(start);
    db[start..end].to_vec()
}

/// Mean absolute dB difference over the reference's first `n` windows (lower = closer).
fn distance(heard: &[f32], reference: &[f32]) -> f32 {
    let n = heard.len().min(reference.len());
    if n == 0 {
        return f32::MAX;
    }
    let d: f32 = heard[..n]
        .iter()
        .zip(&reference[..n])
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / n as f32;
    // A complete utterance must also be about as long as the reference.
    let extra = heard.len().saturating_sub(reference.len()) as f32 / reference.len() as f32;
    d + 30.0 * extra
}

fn load_references() -> Vec<Reference> {
    #[derive(serde::Deserialize)]
    struct M {
        utterance: Vec<crate::probe::listen::audio::Utterance>,
    }
    let Ok(m) = toml::from_str::<M>(MANIFEST) else {
        return Vec::new();
    };
    m.utterance
        .into_iter()
        .filter_map(|u| {
            let (_, bytes) = WAVS.iter().find(|(n, _)| *n == u.file)?;
            let audio = Audio::parse(std::path::Path::new(&u.file), bytes, Some(0)).ok()?;
            let samples: Vec<i16> = audio.samples().collect();
            Some(Reference {
                transcript: u.transcript,
                envelope: envelope(&samples),
            })
        })
        .collect()
}

/// Best match for what was heard; with `partial`, compare against prefixes and say how much
/// of the utterance has been heard (0–1).
fn recognise<'a>(
    refs: &'a [Reference],
    samples: &[i16],
    partial: bool,
) -> Option<(&'a Reference, f32)> {
    let env = envelope(samples);
    if env.len() < 5 {
        return None;
    }
    let (best, d) = refs
        .iter()
        .map(|r| (r, distance(&env, &r.envelope)))
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    let limit = if partial { 12.0 } else { 8.0 };
    if d > limit || (!partial && (env.len() as f32) < best.envelope.len() as f32 * 0.8) {
        return None;
    }
    Some((
        best,
        (env.len() as f32 / best.envelope.len() as f32).min(1.0),
    ))
}

/// "testing one two" → "Testing one two" (and a period when final), like smart_format.
fn styled(words: &[&str], final_: bool) -> String {
    let mut s = words.join(" ");
    if let Some(c) = s.get(..1) {
        let up = c.to_uppercase();
        s.replace_range(..1, &up);
    }
    if final_ && !s.is_empty() {
        s.push('.');
    }
    s
}

/// Serve the demo STT on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    serve_with(listener, shutdown, DemoSttOptions::default()).await
}

/// [`serve`] with options (tests turn faults off).
pub async fn serve_with(listener: TcpListener, shutdown: CancellationToken, opts: DemoSttOptions) {
    let refs = std::sync::Arc::new(load_references());
    loop {
        let sock = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "demo stt: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let refs = refs.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::time::timeout(Duration::from_secs(300), session(sock, &refs, opts)) => {}
            }
        });
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    DropMidStream,
    SlowFinal,
}

fn results(request_id: &str, text: &str, is_final: bool, start: f64, duration: f64) -> Message {
    Message::text(
        json!({
            "type": "Results", "channel_index": [0, 1], "duration": duration, "start": start,
            "is_final": is_final, "speech_final": is_final, "from_finalize": is_final,
            "channel": {"alternatives": [{"transcript": text, "confidence": if text.is_empty() { 0.0 } else { 0.97 }}]},
            "metadata": {"request_id": request_id, "model_info": {"name": "demo", "version": "1"}}
        })
        .to_string(),
    )
}

async fn close(ws: &mut WebSocketStream<TcpStream>, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    };
    let _ =
        tokio::time::timeout(Duration::from_secs(1), ws.send(Message::Close(Some(frame)))).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

// The upgrade callback's error type is tungstenite's, not ours to box.
#[allow(clippy::result_large_err)]
async fn session(sock: TcpStream, refs: &[Reference], opts: DemoSttOptions) {
    let (request_id, fault) = {
        let mut rng = rand::rng();
        let id = format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            rng.random::<u32>(),
            rng.random::<u16>(),
            rng.random::<u16>() & 0xfff,
            rng.random::<u16>() & 0xfff,
            rng.random::<u64>() & 0xffff_ffff_ffff
        );
        let fault = if opts.fault_every > 0 && rng.random_range(0..opts.fault_every) == 0 {
            if rng.random_bool(0.5) {
                Fault::DropMidStream
            } else {
                Fault::SlowFinal
            }
        } else {
            Fault::None
        };
        (id, fault)
    };
    let rid = request_id.clone();
    let cb = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !(auth.is_empty() || auth.starts_with("Token ") || auth.starts_with("Bearer ")) {
            let body = json!({"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.", "request_id": rid}).to_string();
            let mut r = ErrorResponse::new(Some(body));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            return Err(r);
        }
        if let Ok(v) = HeaderValue::from_str(&rid) {
            resp.headers_mut().insert("dg-request-id", v);
        }
        Ok(resp)
    };
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let accept = tokio_tungstenite::accept_hdr_async_with_config(sock, cb, Some(cfg));
    let Ok(Ok(mut ws)) = tokio::time::timeout(Duration::from_secs(10), accept).await else {
        return;
    };

    let mut samples: Vec<i16> = Vec::new();
    let mut carry: Option<u8> = None;
    let mut next_interim = RATE as usize; // every second of audio
    let mut finalized_upto = 0usize; // samples already covered by a final
    let drop_at = RATE as usize + rand::rng().random_range(0..RATE as usize);
    loop {
        let msg = match tokio::time::timeout(IDLE_CLOSE, ws.next()).await {
            Err(_) => {
                close(&mut ws, 1011, "NET-0001").await;
                return;
            }
            Ok(Some(Ok(m))) => m,
            Ok(_) => return,
        };
        match msg {
            Message::Binary(b) => {
                if b.is_empty() {
                    // Deepgram treats an empty binary frame as the end of the stream.
                    finish(
                        &mut ws,
                        refs,
                        &samples[finalized_upto..],
                        &request_id,
                        fault,
                        true,
                        samples.len(),
                    )
                    .await;
                    return;
                }
                let mut bytes = b.as_ref();
                if let Some(c) = carry.take() {
                    samples.push(i16::from_le_bytes([c, bytes[0]]));
                    bytes = &bytes[1..];
                }
                let pairs = bytes.chunks_exact(2);
                carry = pairs.remainder().first().copied();
                samples.extend(pairs.map(|p| i16::from_le_bytes([p[0], p[1]])));
                if samples.len() > MAX_SAMPLES {
                    close(&mut ws, 1009, "stream too long for the demo").await;
                    return;
                }
                if fault == Fault::DropMidStream && samples.len() >= drop_at {
                    close(&mut ws, 1011, "NET-0001").await;
                    return;
                }
                if samples.len() >= next_interim {
                    next_interim += RATE as usize;
                    let heard = &samples[finalized_upto..];
                    if let Some((r, frac)) = recognise(refs, heard, true) {
                        let words: Vec<&str> = r.transcript.split_whitespace().collect();
                        let k =
                            ((words.len() as f32 * frac).floor() as usize).clamp(1, words.len());
                        let start = finalized_upto as f64 / RATE as f64;
                        let dur = heard.len() as f64 / RATE as f64;
                        let _ = ws
                            .send(results(
                                &request_id,
                                &styled(&words[..k], false),
                                false,
                                start,
                                dur,
                            ))
                            .await;
                    }
                }
            }
            Message::Text(t) => {
                let kind = serde_json::from_str::<Value>(&t)
                    .ok()
                    .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_default();
                match kind.as_str() {
                    "KeepAlive" => {}
                    "Finalize" => {
                        let heard = samples[finalized_upto..].to_vec();
                        finish(
                            &mut ws,
                            refs,
                            &heard,
                            &request_id,
                            fault,
                            false,
                            finalized_upto,
                        )
                        .await;
                        finalized_upto = samples.len();
                    }
                    "CloseStream" => {
                        let heard = samples[finalized_upto..].to_vec();
                        finish(
                            &mut ws,
                            refs,
                            &heard,
                            &request_id,
                            fault,
                            true,
                            finalized_upto,
                        )
                        .await;
                        return;
                    }
                    _ => {
                        let err = json!({"type": "Error", "description": "unknown control message", "variant": "protocol"});
                        let _ = ws.send(Message::text(err.to_string())).await;
                    }
                }
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}

/// Final result for what was heard since the last final; with `close`, Metadata and 1000.
async fn finish(
    ws: &mut WebSocketStream<TcpStream>,
    refs: &[Reference],
    heard: &[i16],
    request_id: &str,
    fault: Fault,
    close_after: bool,
    offset: usize,
) {
    let delay = {
        let mut rng = rand::rng();
        match fault {
            Fault::SlowFinal => Duration::from_millis(rng.random_range(2500..4000)),
            _ => Duration::from_millis(rng.random_range(80..300)),
        }
    };
    tokio::time::sleep(delay).await;
    let text = match recognise(refs, heard, false) {
        Some((r, _)) => styled(&r.transcript.split_whitespace().collect::<Vec<_>>(), true),
        None => String::new(),
    };
    let start = offset as f64 / RATE as f64;
    let dur = heard.len() as f64 / RATE as f64;
    let _ = ws.send(results(request_id, &text, true, start, dur)).await;
    if close_after {
        let meta = json!({
            "type": "Metadata", "transaction_key": "deprecated", "request_id": request_id,
            "created": chrono::Utc::now().to_rfc3339(), "duration": start + dur, "channels": 1
        });
        let _ = ws.send(Message::text(meta.to_string())).await;
        close(ws, 1000, "").await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_every_shipped_utterance_and_nothing_else() {
        let refs = load_references();
        assert_eq!(refs.len(), WAVS.len());
        for (name, bytes) in WAVS {
            let a = Audio::parse(std::path::Path::new(name), bytes, Some(0)).unwrap();
            let mut s: Vec<i16> = vec![0; 4800]; // lead-in silence does not matter
            s.extend(a.samples());
            s.extend(vec![0i16; 3200]);
            let (r, frac) = recognise(&refs, &s, false).expect(name);
            let want = MANIFEST.split(name).nth(1).unwrap();
            assert!(
                want.contains(&r.transcript),
                "{name} recognised as {:?}",
                r.transcript
            );
            assert!((frac - 1.0).abs() < 1e-6);
            // Half of it: a partial match on the right utterance.
            let half = &s[..s.len() / 2];
            let (p, frac) = recognise(&refs, half, true).expect(name);
            assert_eq!(p.transcript, r.transcript);
            assert!(frac < 0.9);
        }
        // Noise is nobody.
        let noise: Vec<i16> = (0..32000)
            .map(|i| ((i * 7919) % 20000) as i16 - 10000)
            .collect();
        assert!(recognise(&refs, &noise, false).is_none());
    }
}
