//! Mutation fuzzing on stable Rust, with no extra dependency: the STT message parsers of
//! every dialect, the transcript assembly they feed, and the WER normaliser take arbitrary
//! input and must never panic. Seeds are real messages; mutations flip, insert, delete,
//! duplicate and splice bytes, with a dictionary of tokens that matter to these parsers.
//!
//! A run is bounded by the same knob as `tests/fuzz.rs`: `WATCHPOST_FUZZ_CASES` inputs per
//! target (default 3000 here: a mutation costs microseconds), from `WATCHPOST_FUZZ_SEED`
//! (default: a fixed seed, so a failure reproduces). A failing input is printed; it goes
//! into [`REGRESSIONS`].

use std::panic::{catch_unwind, AssertUnwindSafe};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::transcript::{Transcript, MAX_TRANSCRIPT_BYTES};
use super::{deepgram, generic, omi, wer, Event};

const SEEDS: &[&str] = &[
    r#"{"type":"Results","channel_index":[0,1],"start":0.0,"duration":1.0,"is_final":true,"speech_final":true,"from_finalize":true,"channel":{"alternatives":[{"transcript":"testing 1.2.3 at 10.0.0.1","confidence":0.98}]},"metadata":{"request_id":"r1"}}"#,
    r#"{"type":"Metadata","request_id":"x","duration":2.0}"#,
    r#"{"type":"Error","description":"bad","variant":"x"}"#,
    r#"{"type":"UtteranceEnd","last_word_end":1.2}"#,
    r#"[{"id":"seg-1","text":"check the 21st system","speaker":"SPEAKER_00","start":0.1,"end":0.5}]"#,
    r#"{"type":"segments","segments":[{"id":7,"text":"fifty % off"}]}"#,
    r#"{"type":"segments_deleted","segment_ids":["seg-1",2]}"#,
    r#"{"type":"service_status","status":"stt_degraded","metadata":{"batch_mode":true}}"#,
    r#"{"result":{"text":"one hundred and five","final":"yes"},"error":null}"#,
    "ping",
];

const TOKENS: &[&str] = &[
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "false",
    "1e309",
    "-0",
    "1.2.3",
    ".",
    "..",
    "0",
    "007",
    "99999999999999999999",
    "\\u0000",
    "\\ud800",
    "é",
    "İ",
    "ß",
    "١",
    "\u{301}",
    "%",
    "'",
    "’",
    "st",
    "nd",
    "rd",
    "th",
    "and",
    "hundred",
    "type",
    "Results",
    "Metadata",
    "channel",
    "alternatives",
    "transcript",
    "is_final",
    "segments",
    "segments_deleted",
    "segment_ids",
    "id",
    "text",
    "service_status",
    "result",
    "final",
    "error",
    " ",
];

fn iterations() -> usize {
    std::env::var("WATCHPOST_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn rng() -> StdRng {
    let seed = std::env::var("WATCHPOST_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5757_4154_4348);
    StdRng::seed_from_u64(seed)
}

fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..rng.random_range(1..8) {
        let at = rng.random_range(0..=b.len());
        match rng.random_range(0..6) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let t = TOKENS[rng.random_range(0..TOKENS.len())].as_bytes();
                b.splice(at..at, t.iter().copied());
            }
            2 if at < b.len() => {
                let end = rng.random_range(at..=b.len().min(at + 16));
                b.drain(at..end);
            }
            3 if at < b.len() => {
                let end = rng.random_range(at..=b.len().min(at + 32));
                let piece = b[at..end].to_vec();
                b.splice(at..at, piece);
            }
            4 => {
                let other = SEEDS[rng.random_range(0..SEEDS.len())].as_bytes();
                let from = rng.random_range(0..other.len());
                let to = rng.random_range(from..=other.len());
                b.splice(at..at, other[from..to].iter().copied());
            }
            _ => b.truncate(at),
        }
    }
    b
}

/// Run `f` on mutated inputs; a panic reports the input that caused it.
fn fuzz(name: &str, mut f: impl FnMut(&str)) {
    let mut rng = rng();
    for i in 0..iterations() {
        let seed = SEEDS[i % SEEDS.len()].as_bytes();
        let bytes = mutate(&mut rng, seed);
        let input = String::from_utf8_lossy(&bytes);
        if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
            panic!("{name} panicked on input {input:?} (add it to REGRESSIONS)");
        }
    }
}

/// Inputs a fuzz run once found (or that used to panic elsewhere); each is checked below.
const REGRESSIONS: &[&str] = &[
    "version 1.2.3",
    "10.0.0.1",
    "1..2.",
    "v1.2.3.4-rc1",
    "1.2.3rd",
];

fn layouts() -> Vec<generic::Layout> {
    vec![
        generic::Layout {
            transcript_path: "result.text".into(),
            final_path: Some("result.final".into()),
            error_path: Some("error".into()),
        },
        generic::Layout {
            transcript_path: "channel.alternatives.0.transcript".into(),
            final_path: None,
            error_path: None,
        },
        generic::Layout {
            transcript_path: "".into(),
            final_path: Some("0".into()),
            error_path: Some("..".into()),
        },
    ]
}

/// Feed a parsed event to a transcript the way a session does, and check the caps.
fn assemble(t: &mut Transcript, ev: Result<Event, String>) {
    let now = Instant::now();
    match ev {
        Ok(Event::Results { text, is_final, .. }) if is_final => t.final_result(&text, false, now),
        Ok(Event::Results { text, .. }) => t.interim_result(&text, now),
        Ok(Event::Segments(s)) => t.segments(s, now),
        Ok(Event::SegmentsDeleted(ids)) => t.delete(&ids, now),
        _ => {}
    }
    assert!(t.text().len() <= MAX_TRANSCRIPT_BYTES + super::transcript::MAX_PIECES);
    assert_eq!(t.is_empty(), t.text().is_empty());
}

#[test]
fn dialect_parsers_never_panic() {
    let layouts = layouts();
    let mut t = Transcript::default();
    fuzz("parsers", |input| {
        assemble(&mut t, deepgram::parse(input));
        assemble(&mut t, omi::parse(input));
        for l in &layouts {
            let _ = generic::parse(l, input);
        }
    });
}

#[test]
fn wer_normaliser_never_panics() {
    fuzz("wer", |input| {
        let words = wer::normalize(input);
        assert!(words.iter().all(|w| !w.is_empty()));
        let w = wer::wer(input, "testing one two three");
        assert!(w.is_finite() && w >= 0.0);
        let _ = wer::contains_phrase(input, "one two");
    });
    for r in REGRESSIONS {
        let _ = wer::normalize(r);
        let _ = deepgram::parse(r);
        let _ = omi::parse(r);
    }
}

#[test]
fn mutation_is_deterministic_for_a_seed() {
    let a = mutate(&mut StdRng::seed_from_u64(1), SEEDS[0].as_bytes());
    let b = mutate(&mut StdRng::seed_from_u64(1), SEEDS[0].as_bytes());
    assert_eq!(a, b);
}
