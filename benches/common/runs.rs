//! Runs shaped like the ones the real probes record, for the storage figures: the storage
//! benchmark (`benches/storage.rs`) writes days of them, and the size tests in
//! `tests/store.rs` one day of one probe (included there with `#[path]`).
//!
//! - HTTP (`src/probe/http.rs`): phases `ttfb`, `total`; details `status`, `bytes`,
//!   `cert_days_left` (changes daily).
//! - listen (`src/probe/listen`, a Deepgram session of the 2.25 s test utterance): phases
//!   `connect`, `first_result`, `final`, `total`; details `dialect`, `frames`, `audio_ms`,
//!   `interim_results`, `final_results`, `text`, `expected`, `wer`, `completed_by`, the
//!   server's `request_id` and `send_lateness_{p50,p99,max}_ms` (the last three, and the
//!   interim count, change on every run).
//!
//! One run in 200 is down after a confirmation retry (an `attempts` log in its details): an
//! HTTP 503, or a listen session the server closed with 1011 mid-stream.
#![allow(dead_code)]

use std::time::Duration;

use chrono::{TimeZone, Utc};
use serde_json::{json, Map};
use watchpost::probe::{ErrorClass, ErrorInfo, Outcome, RunResult, SubCheck};

/// xorshift: reproducible, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
    pub fn us(&mut self, lo: u64, spread: u64) -> Duration {
        Duration::from_micros(lo + self.below(spread))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Http,
    Listen,
}

impl Profile {
    pub fn parse(s: &str) -> Option<Profile> {
        match s {
            "http" => Some(Profile::Http),
            "listen" => Some(Profile::Listen),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Profile::Http => "HTTP",
            Profile::Listen => "listen",
        }
    }
}

/// One run of `probe` at `ms` on day `day` of a simulation, with `subchecks` sub-checks
/// (`<probe>/checks.c<i>`, up, a latency each).
pub fn run(
    profile: Profile,
    rng: &mut Rng,
    probe: &str,
    ms: i64,
    day: i64,
    subchecks: usize,
) -> RunResult {
    let down = rng.below(200) == 0;
    let mut details = Map::new();
    let (kind, phases, duration, error) = match profile {
        Profile::Listen => {
            let connect = rng.us(30_000, 50_000);
            let first = rng.us(250_000, 400_000);
            let fin = rng.us(120_000, 300_000);
            details.insert("dialect".into(), json!("deepgram"));
            details.insert("frames".into(), json!(23));
            details.insert("audio_ms".into(), json!(2250.0));
            details.insert(
                "request_id".into(),
                json!(format!(
                    "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                    rng.below(1 << 32),
                    rng.below(1 << 16),
                    rng.below(1 << 12),
                    rng.below(1 << 12),
                    rng.below(1 << 48)
                )),
            );
            // One run in 250 sends a frame 5 ms late or more (a busy agent).
            let p99 = if rng.below(250) == 0 {
                5.0 + rng.below(20_000) as f64 / 1000.0
            } else {
                0.4 + rng.below(2_500) as f64 / 1000.0
            };
            details.insert(
                "send_lateness_p50_ms".into(),
                json!(0.05 + rng.below(300) as f64 / 1000.0),
            );
            details.insert("send_lateness_p99_ms".into(), json!(p99));
            details.insert("send_lateness_max_ms".into(), json!(p99));
            if down {
                let at = Duration::from_millis(1_400) + rng.us(0, 200_000);
                let total = connect + at;
                details.insert("close_code".into(), json!(1011));
                let error = ErrorInfo {
                    class: ErrorClass::WsClosed,
                    message: format!(
                        "server closed the socket with 1011 NET-0001 after {:.1} s (heard so far: \"testing one\") (after 1 retry)",
                        at.as_secs_f64()
                    ),
                };
                (
                    "listen",
                    vec![
                        ("connect".to_string(), connect),
                        ("total".to_string(), total),
                    ],
                    total + rng.us(20, 60),
                    Some(error),
                )
            } else {
                let total = Duration::from_millis(2_250) + connect + fin + rng.us(0, 20_000);
                details.insert("interim_results".into(), json!(3 + rng.below(3)));
                details.insert("final_results".into(), json!(1));
                details.insert("text".into(), json!("testing one two three"));
                details.insert("expected".into(), json!("testing one two three"));
                details.insert("wer".into(), json!(0.0));
                details.insert("completed_by".into(), json!("Metadata"));
                (
                    "listen",
                    vec![
                        ("connect".to_string(), connect),
                        ("first_result".to_string(), first),
                        ("final".to_string(), fin),
                        ("total".to_string(), total),
                    ],
                    total + rng.us(20, 60),
                    None,
                )
            }
        }
        Profile::Http => {
            let ttfb = rng.us(15_000, 30_000);
            let total = ttfb + rng.us(150, 3_000);
            details.insert("status".into(), json!(if down { 503 } else { 200 }));
            details.insert("bytes".into(), json!(if down { 53 } else { 187 }));
            details.insert("cert_days_left".into(), json!(80 - day));
            let error = down.then(|| ErrorInfo {
                class: ErrorClass::HttpStatus,
                message: "HTTP 503 Service Unavailable (after 1 retry)".into(),
            });
            (
                "http",
                vec![("ttfb".to_string(), ttfb), ("total".to_string(), total)],
                total + rng.us(20, 60),
                error,
            )
        }
    };
    if down {
        let class = error.as_ref().map(|e| e.class.as_str());
        details.insert(
            "attempts".into(),
            json!([{"outcome": "down", "class": class, "duration_ms": 21.4},
                   {"outcome": "down", "class": class, "duration_ms": 19.8}]),
        );
    }
    let subchecks = (0..subchecks)
        .map(|i| SubCheck {
            series: format!("{probe}/checks.c{i}"),
            outcome: Outcome::Up,
            latency: Some(rng.us(500, 5_000)),
            error: None,
        })
        .collect();
    RunResult {
        probe: probe.to_string(),
        kind,
        started_at: Utc
            .timestamp_millis_opt(ms)
            .single()
            .unwrap_or_else(Utc::now),
        duration,
        lag: Some(rng.us(300, 2_500)),
        outcome: if down { Outcome::Down } else { Outcome::Up },
        error,
        phases,
        details,
        subchecks,
    }
}

/// Bytes in use in a SQLite database: pages not on the free list.
pub fn used_bytes(c: &watchpost::store::Conn) -> u64 {
    let q = |p: &str| -> u64 {
        c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0))
            .unwrap_or(0) as u64
    };
    (q("page_count") - q("freelist_count")) * q("page_size")
}
