//! Listen load benchmark: N concurrent listen sessions (default 200) streaming a shipped
//! utterance at real-time pace, through the real listen probe, against a Deepgram-dialect
//! server running in a child process (so CPU and RSS are the agent's alone).
//!
//!     cargo bench --bench listen_load -- --sessions 200 --rounds 3 [--server-threads N (1)]
//!
//! Reports, over every frame of every session:
//! - send lateness: when the frame's write returned minus its absolute deadline, p50/p99/max;
//! - agent overhead: how far the agent's `final` phase (last audio frame sent → final
//!   transcript at the agent's socket) is from the server's own gap (last audio frame at the
//!   server's socket → final result written), p50/p99/max of the difference's size —
//!   loopback transit both ways and the error of the agent's own time stamps. Both ends
//!   take a message's arrival from the kernel's receive stamp (`probe::stamp`), so neither
//!   process's wait to be scheduled is charged to the other; the stand-in's own read wait is
//!   printed beside it;
//! - CPU seconds (getrusage, user + system) and peak RSS (VmHWM) of the agent process.
//!
//! Targets: lateness p99 ≤ 5 ms, overhead p99 ≤ 2 ms. Sessions start spread over one second
//! (as the scheduler's phase offsets spread probes), then run on their absolute schedules.

mod common;

use common::{arg, cpu_seconds};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use watchpost::probe::stamp::Stamped;
use watchpost::probe::Probe;

#[repr(C)]
#[derive(Default)]
struct Timeval {
    sec: i64,
    usec: i64,
}

/// `struct rusage` on 64-bit Linux.
#[repr(C)]
#[derive(Default)]
struct Rusage {
    utime: Timeval,
    stime: Timeval,
    maxrss: i64,
    rest: [i64; 13],
}

extern "C" {
    fn getrusage(who: i32, usage: *mut Rusage) -> i32;
}

/// (CPU seconds, peak RSS in MiB) of this process.
fn rusage() -> (f64, f64) {
    let mut r = Rusage::default();
    // SAFETY: `r` is a properly sized, writable `struct rusage`; RUSAGE_SELF = 0.
    let rc = unsafe { getrusage(0, &mut r) };
    if rc != 0 {
        return (f64::NAN, f64::NAN);
    }
    let cpu = r.utime.sec as f64
        + r.utime.usec as f64 / 1e6
        + r.stime.sec as f64
        + r.stime.usec as f64 / 1e6;
    // ru_maxrss survives execve on Linux, so under `cargo bench` it would report cargo's own
    // peak; VmHWM in /proc is this image's high-water mark.
    let hwm_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        });
    (cpu, hwm_kib.unwrap_or(r.maxrss as f64) / 1024.0)
}

/// The 1-minute load average: how busy the machine was around the run.
fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// Seconds of CPU time the hypervisor gave to others while this machine's CPUs wanted it
/// (`steal` in /proc/stat, all CPUs): a virtual machine's noise no program on it can avoid.
fn stolen() -> f64 {
    let ticks = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu "))
                .and_then(|l| l.split_whitespace().nth(8))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// Wall-clock microseconds: both processes read the same system clock, so the server's and
/// the agent's instants can be put on one time line (µs precision, no NTP step in 10 s).
fn wall_us() -> i64 {
    micros(std::time::SystemTime::now())
}

fn micros(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

// ---- server (child process) -------------------------------------------------------------

const TRANSCRIPT: &str = "testing one two three four five";

// tungstenite's upgrade callback error type is not ours to box.
#[allow(clippy::result_large_err)]
async fn serve() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("LISTENING {}", listener.local_addr().expect("addr").port());
    let mut n = 0u64;
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        n += 1;
        let id = format!("bench-{n}");
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            // The server's gap starts when the last frame reached its socket, as the agent's
            // `final` phase ends when the final reached the agent's: neither process's own
            // run-queue wait is charged to the other.
            let sock = Stamped::new(sock);
            let rid = id.clone();
            let cb = move |_: &Request, mut resp: Response| {
                if let Ok(v) = HeaderValue::from_str(&rid) {
                    resp.headers_mut().insert("dg-request-id", v);
                }
                Ok(resp)
            };
            // tungstenite zeroes its whole read buffer (128 KiB by default) before every
            // read: a quarter of this server's CPU in a profile. Audio frames are 3.2 KiB.
            let cfg = WebSocketConfig::default().read_buffer_size(4 * 1024);
            let accept = tokio_tungstenite::accept_hdr_async_with_config(sock, cb, Some(cfg));
            let Ok(mut ws) = accept.await else {
                return;
            };
            let mut last_audio = Instant::now();
            let mut last_audio_wall = wall_us();
            // The stand-in's own wait to read the last frame (its arrival → read).
            let mut read_wait = Duration::ZERO;
            let mut frames = 0u32;
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Binary(_) => {
                        let arrived = ws.get_ref().arrived();
                        last_audio = arrived.map_or_else(Instant::now, |a| a.at.into_std());
                        read_wait = last_audio.elapsed();
                        last_audio_wall = arrived.map_or_else(wall_us, |a| micros(a.wall));
                        frames += 1;
                        if frames.is_multiple_of(10) {
                            let words: Vec<&str> =
                                TRANSCRIPT.split(' ').take((frames / 10) as usize).collect();
                            let _ = ws.send(results(&words.join(" "), false)).await;
                        }
                    }
                    Message::Text(t) if t.contains("CloseStream") => {
                        // A fixed "recognition" time, then the final.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        // The clock is read before the write, as the agent stamps its frames:
                        // the write wakes the agent, which may take this CPU as it returns.
                        let (written, written_wall) = (Instant::now(), wall_us());
                        let _ = ws.send(results(TRANSCRIPT, true)).await;
                        let gap = written.saturating_duration_since(last_audio);
                        println!(
                            "GAP {id} {} {last_audio_wall} {written_wall} {}",
                            gap.as_micros(),
                            read_wait.as_micros()
                        );
                        let _ = ws
                            .send(Message::text(r#"{"type":"Metadata","request_id":"x"}"#))
                            .await;
                        let _ = ws.close(None).await;
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        });
    }
}

fn results(text: &str, is_final: bool) -> Message {
    Message::text(
        serde_json::json!({
            "type": "Results", "is_final": is_final, "speech_final": is_final, "from_finalize": is_final,
            "channel": {"alternatives": [{"transcript": text, "confidence": 0.99}]}
        })
        .to_string(),
    )
}

// ---- agent ------------------------------------------------------------------------------

fn main() {
    if std::env::args().any(|a| a == "--serve") {
        // One runtime thread by default (0 = one per core): the stand-in shares the agent's
        // two cores, and a second thread of it costs the agent CPU time (frame lateness)
        // without making it any more faithful. Its own wait to read is not charged to the
        // agent: its gap starts at the last frame's arrival stamp.
        let threads = arg("--server-threads", 1) as usize;
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 0 {
            b.worker_threads(threads);
        }
        let rt = b.enable_all().build().expect("runtime");
        rt.block_on(serve());
        return;
    }
    let sessions = arg("--sessions", 200) as usize;
    let rounds = arg("--rounds", 3) as usize;

    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .arg("--serve")
        .args(["--server-threads", &arg("--server-threads", 1).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn server child");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("server line");
    let port: u16 = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .expect("LISTENING <port>");
    // request id → (server gap, last audio frame arrived (wall µs), final written (wall µs),
    // the server's wait to read the last frame).
    type Gap = (Duration, i64, i64, Duration);
    let gaps: Arc<Mutex<HashMap<String, Gap>>> = Arc::default();
    let g2 = gaps.clone();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [_, id, gap, arrived, written, wait] = f[..] else {
                continue;
            };
            if f[0] != "GAP" {
                continue;
            }
            if let (Ok(gap), Ok(arrived), Ok(written), Ok(wait)) = (
                gap.parse::<u64>(),
                arrived.parse::<i64>(),
                written.parse::<i64>(),
                wait.parse::<u64>(),
            ) {
                let us = Duration::from_micros;
                g2.lock()
                    .expect("gaps")
                    .insert(id.to_string(), (us(gap), arrived, written, us(wait)));
            }
        }
    });

    // The probe goes through the real config loader.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("probes")).expect("mkdir");
    let audio = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("probes/audio/testing-one-two-three.wav");
    let probe = format!(
        r#"name = "listen-bench"
kind = "listen"
dialect = "deepgram"
url = "ws://127.0.0.1:{port}/v1/listen?encoding=linear16&sample_rate=16000&channels=1&interim_results=true"
headers = {{ Authorization = "Token bench" }}
audio = "{}"
chunk = "100ms"
speed = 1.0
final_timeout = "10s"
connect_timeout = "10s"
retries = 0
"#,
        audio.display()
    );
    std::fs::write(dir.path().join("probes/bench.toml"), probe).expect("write probe");
    let cfg_path = dir.path().join("watchpost.toml");
    std::fs::write(
        &cfg_path,
        "[agent]\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n",
    )
    .expect("write config");
    let cfg = watchpost::config::load(&cfg_path).unwrap_or_else(|e| panic!("{e}"));
    let pc = cfg.probes[0].clone();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (cpu0, _) = rusage();
    let server_cpu0 = cpu_seconds(Some(child.id()));
    let load_before = load1();
    let stolen0 = stolen();
    let wall = Instant::now();
    let wall0 = wall_us();
    let on_wall = |i: Instant| wall0 + i.saturating_duration_since(wall).as_micros() as i64;
    let results = rt.block_on(async {
        let probe = Arc::new(Probe::build(&pc).expect("build"));
        let mut tasks = Vec::new();
        for i in 0..sessions {
            let probe = probe.clone();
            let stagger = Duration::from_micros((i as u64 * 1_000_000) / sessions.max(1) as u64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(stagger).await;
                let Probe::Listen(lp) = &*probe else {
                    unreachable!("listen probe")
                };
                let mut out = Vec::new();
                for _ in 0..rounds {
                    out.push(lp.run_with_stats().await);
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("session task"));
        }
        all
    });
    let elapsed = wall.elapsed();
    let (cpu1, rss) = rusage();
    let server_cpu = cpu_seconds(Some(child.id())) - server_cpu0;
    let load_after = load1();
    let stolen = stolen() - stolen0;
    // Let the last GAP lines arrive.
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();

    let mut late = Vec::new();
    let mut overhead = Vec::new();
    // The two halves of the overhead: agent's last frame sent → it reached the server's
    // socket, and server wrote the final → it reached the agent's socket (loopback, and the
    // time between a write and the clock read that stamps it).
    let mut inbound = Vec::new();
    let mut outbound = Vec::new();
    let mut server_wait = Vec::new();
    let mut understated = Vec::new();
    let us = |v: i64| Duration::from_micros(v.max(0) as u64);
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let gaps = gaps.lock().expect("gaps");
    let mut unmatched = 0;
    for (a, s) in &results {
        let key = match &a.error {
            None => a.outcome.as_str().to_string(),
            Some(e) => format!("{} ({})", a.outcome.as_str(), e.class),
        };
        *outcomes.entry(key).or_default() += 1;
        late.extend(s.lateness.iter().copied());
        match (
            s.last_frame_at,
            s.final_at,
            s.request_id.as_ref().and_then(|r| gaps.get(r)),
        ) {
            (Some(l), Some(f), Some((gap, arrived, written, wait))) => {
                // Signed: a `final` phase shorter than the server's own gap is an error too
                // (the agent stamped its last frame late), so the figure is its size.
                let err =
                    f.saturating_duration_since(l).as_micros() as i64 - gap.as_micros() as i64;
                if err < 0 {
                    understated.push(us(-err));
                }
                overhead.push(us(err.abs()));
                inbound.push(us(arrived - on_wall(l.into_std())));
                outbound.push(us(on_wall(f.into_std()) - written));
                server_wait.push(*wait);
            }
            _ => unmatched += 1,
        }
    }
    late.sort_unstable();
    overhead.sort_unstable();
    inbound.sort_unstable();
    outbound.sort_unstable();
    server_wait.sort_unstable();
    let runs = results.len();
    println!(
        "listen_load: {sessions} concurrent sessions × {rounds} rounds = {runs} runs, {} frames",
        late.len()
    );
    println!(
        "  audio: 2.25 s utterance, 100 ms chunks, speed 1.0 (real time); wall {:.1} s",
        elapsed.as_secs_f64()
    );
    let mut oc: Vec<_> = outcomes.into_iter().collect();
    oc.sort();
    println!("  outcomes: {oc:?}");
    println!(
        "  send lateness  p50 {}  p99 {}  max {}",
        ms(pct(&late, 50.0)),
        ms(pct(&late, 99.0)),
        ms(late.last().copied().unwrap_or_default())
    );
    println!(
        "  agent overhead p50 {}  p99 {}  max {}  ({} sessions, {unmatched} without a server timestamp)",
        ms(pct(&overhead, 50.0)),
        ms(pct(&overhead, 99.0)),
        ms(overhead.last().copied().unwrap_or_default()),
        overhead.len()
    );
    understated.sort_unstable();
    println!(
        "    understated (the `final` phase shorter than the server's gap): {} sessions, by at most {}",
        understated.len(),
        ms(understated.last().copied().unwrap_or_default())
    );
    println!(
        "    of which last frame sent → at the server p50 {}  p99 {};  final written → at the agent p50 {}  p99 {}",
        ms(pct(&inbound, 50.0)),
        ms(pct(&inbound, 99.0)),
        ms(pct(&outbound, 50.0)),
        ms(pct(&outbound, 99.0))
    );
    println!(
        "    not counted: the stand-in server's own wait to read the last frame p50 {}  p99 {}",
        ms(pct(&server_wait, 50.0)),
        ms(pct(&server_wait, 99.0))
    );
    let cpu = cpu1 - cpu0;
    println!(
        "  agent CPU {:.2} s ({:.1} ms per session, {:.0}% of one core); peak RSS {:.1} MiB",
        cpu,
        cpu * 1e3 / runs.max(1) as f64,
        cpu / elapsed.as_secs_f64() * 100.0,
        rss
    );
    println!(
        "  server child CPU {server_cpu:.2} s ({:.0}% of one core); load average 1 min {load_before} before, {load_after} after",
        server_cpu / elapsed.as_secs_f64() * 100.0
    );
    println!(
        "  CPU time stolen by the hypervisor during the run: {stolen:.2} s ({:.0}% of the machine's)",
        stolen / (elapsed.as_secs_f64() * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64) * 100.0
    );
    let ok_late = pct(&late, 99.0) <= Duration::from_millis(5);
    let ok_over = pct(&overhead, 99.0) <= Duration::from_millis(2);
    println!(
        "  targets: lateness p99 ≤ 5 ms {}; overhead p99 ≤ 2 ms {}",
        if ok_late { "met" } else { "MISSED" },
        if ok_over { "met" } else { "MISSED" }
    );
}
