//! Judging a listen run: what was heard, when, and how the wait ended → outcome, error class,
//! message and the `final`/`first_result` phases. A pure function of its inputs (times are
//! offsets, no clock is read), so every rule has a row in the tables below.
//!
//! Not here: failures that end a session early (a close mid-stream, `stt_failed`, a
//! malformed message) — those are decided where they happen, in the session.

use std::time::Duration;

use super::config::Expectation;
use super::transcript::{MAX_PIECES, MAX_TRANSCRIPT_BYTES};
use super::wer;
use crate::config::duration::human;
use crate::probe::assert::excerpt;
use crate::probe::websocket::secs;
use crate::probe::{ErrorClass, Outcome};

/// An error class.
pub type Class = ErrorClass;

/// Longest quote of a transcript in a message, in bytes.
pub const EXCERPT: usize = 200;

/// How the wait for the final transcript ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The server said the stream was complete (`Metadata`, close 1000, a `from_finalize`
    /// result).
    Complete(&'static str),
    /// The transcript was unchanged for `settle` after the audio (omi, generic).
    Settled,
    /// `final_timeout` passed after the audio without the stream completing.
    FinalTimeout,
    /// The run's timeout hit while a transcript was still waiting to settle.
    Unsettled,
}

/// What a session saw. Times count from the last audio frame.
#[derive(Debug, Clone, Default)]
pub struct Heard<'a> {
    /// The final transcript (capped).
    pub text: &'a str,
    /// The latest interim result.
    pub interim: &'a str,
    /// Final results (or segment messages) received, empty ones included.
    pub final_count: u32,
    /// Text was dropped at the transcript cap.
    pub truncated: bool,
    /// When the final transcript last changed (settling dialects) or the last final result
    /// arrived (others).
    pub final_at: Option<Duration>,
    /// When the wait ended.
    pub ended_at: Duration,
    /// First audio frame → first non-empty result.
    pub first_result: Option<Duration>,
    /// The server said it is degraded (`stt_degraded`): the sentence to report.
    pub service_degraded: Option<&'a str>,
}

/// What the probe demands.
#[derive(Debug, Clone)]
pub struct Rules<'a> {
    pub expect: &'a Expectation,
    pub final_timeout: Duration,
    pub settle: Duration,
    pub timeout: Duration,
    /// The dialect's words for a stream that never finished, e.g. "the server did not finish
    /// the stream (no Metadata or close)".
    pub unfinished: &'a str,
}

/// The judgement.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub error: Option<(Class, String)>,
    pub phases: Vec<(&'static str, Duration)>,
    /// What ended the stream, when it completed.
    pub completed_by: Option<&'static str>,
    /// The text that was judged (the interim result when no final came).
    pub judged: String,
    /// Word error rate against the expected transcript, rounded to 0.001.
    pub wer: Option<f64>,
}

impl Verdict {
    fn down(mut self, class: Class, message: String) -> Verdict {
        self.outcome = Outcome::Down;
        self.error = Some((class, message));
        self
    }
    fn degrade(mut self, class: Class, message: String) -> Verdict {
        self.outcome = Outcome::Degraded;
        self.error = Some((class, message));
        self
    }
}

fn quote(s: &str) -> String {
    format!("{:?}", excerpt(s, EXCERPT))
}

/// Judge one run.
pub fn judge(h: &Heard<'_>, r: &Rules<'_>, ending: Ending) -> Verdict {
    let mut v = Verdict {
        outcome: Outcome::Up,
        error: None,
        phases: h
            .first_result
            .map(|d| ("first_result", d))
            .into_iter()
            .collect(),
        completed_by: None,
        judged: h.text.to_string(),
        wer: None,
    };
    let after = secs(r.final_timeout);
    let interim = h.interim.trim();
    let has_text = !h.text.trim().is_empty();
    // A timing problem that makes an otherwise good run degraded.
    let mut late: Option<String> = None;
    let mut interim_only = false;
    match ending {
        Ending::Complete(_) | Ending::Settled if !has_text => {
            let how = match ending {
                Ending::Complete(how) => how,
                _ => "settled",
            };
            let msg = if interim.is_empty() {
                format!(
                    "no transcript: the stream ended ({how}) {} after the last audio frame with nothing heard",
                    secs(h.ended_at)
                )
            } else {
                format!(
                    "no final transcript ({how}); only interim results: {}",
                    quote(interim)
                )
            };
            return v.down(ErrorClass::NoTranscript, msg);
        }
        Ending::Complete(_) | Ending::Settled | Ending::Unsettled if has_text => {
            let fin = h.final_at.unwrap_or(h.ended_at);
            v.phases.push(("final", fin));
            v.completed_by = match ending {
                Ending::Complete(how) => Some(how),
                Ending::Settled => Some("settled"),
                _ => None,
            };
            if ending == Ending::Unsettled {
                late = Some(format!(
                    "the transcript never settled: it last changed {} after the last audio frame and had not been stable for {} when the {} timeout hit",
                    secs(fin),
                    human(r.settle),
                    human(r.timeout)
                ));
            } else if fin > r.final_timeout {
                late = Some(format!(
                    "the transcript last changed {} after the last audio frame, later than final_timeout {}",
                    secs(fin),
                    human(r.final_timeout)
                ));
            }
        }
        _ if has_text => {
            // Finals arrived but the server never said it was done: the transcript is
            // judged, the run is at best degraded.
            v.phases
                .push(("final", h.final_at.unwrap_or(Duration::ZERO)));
            late = Some(format!(
                "{} {after} after the last audio frame",
                r.unfinished
            ));
        }
        _ if !interim.is_empty() => {
            interim_only = true;
            v.judged = interim.to_string();
        }
        _ => {
            let what = if h.final_count > 0 {
                "only empty results"
            } else {
                "no results at all"
            };
            return v.down(
                ErrorClass::NoTranscript,
                format!("no transcript {after} after the last audio frame ({what})"),
            );
        }
    }

    let truncated = if h.truncated {
        format!(
            "; the transcript passed its cap ({} KiB or {MAX_PIECES} results/segments) and was cut",
            MAX_TRANSCRIPT_BYTES / 1024
        )
    } else {
        String::new()
    };
    if let Some(expected) = &r.expect.transcript {
        let (w, exact) = wer::wer_bounded(expected, &v.judged, r.expect.max_wer + 1e-9);
        v.wer = Some((w * 1000.0).round() / 1000.0);
        let at_least = if exact { "" } else { "at least " };
        if w > r.expect.max_wer + 1e-9 {
            // Partial interim text that never finalised is a missing transcript, not a
            // misheard one.
            let (class, msg) = if interim_only {
                (
                    ErrorClass::NoTranscript,
                    format!(
                        "no final transcript {after} after the last audio frame; interim results only ({}, WER {at_least}{w:.2} against {})",
                        quote(&v.judged),
                        quote(expected)
                    ),
                )
            } else {
                (
                    ErrorClass::TranscriptMismatch,
                    format!(
                        "expected {} but heard {} (WER {at_least}{w:.2} > {:.2}){truncated}",
                        quote(expected),
                        quote(&v.judged),
                        r.expect.max_wer
                    ),
                )
            };
            return v.down(class, msg);
        }
    }
    for phrase in &r.expect.contains {
        if !wer::contains_phrase(&v.judged, phrase) {
            let msg = format!(
                "heard {}, which does not contain {}{truncated}",
                quote(&v.judged),
                quote(phrase)
            );
            return v.down(ErrorClass::TranscriptMismatch, msg);
        }
    }
    if interim_only {
        let msg = format!(
            "only interim results; no final transcript {after} after the last audio frame (heard {})",
            quote(&v.judged)
        );
        return v.degrade(ErrorClass::InterimOnly, msg);
    }
    if let Some(d) = h.service_degraded {
        return v.degrade(ErrorClass::SttDegraded, d.to_string());
    }
    if let Some(d) = late {
        return v.degrade(ErrorClass::Timeout, d);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn rules(expect: &Expectation) -> Rules<'_> {
        Rules {
            expect,
            final_timeout: MS(4000),
            settle: MS(2000),
            timeout: MS(30_000),
            unfinished: "the server did not finish the stream (no Metadata or close)",
        }
    }

    fn expect(t: &str) -> Expectation {
        Expectation {
            transcript: Some(t.into()),
            max_wer: 0.2,
            contains: vec![],
        }
    }

    fn heard(text: &'static str, final_at: Option<u64>, ended_at: u64) -> Heard<'static> {
        Heard {
            text,
            final_at: final_at.map(MS),
            ended_at: MS(ended_at),
            final_count: u32::from(!text.is_empty()),
            ..Heard::default()
        }
    }

    #[test]
    fn outcome_table() {
        use Ending::*;
        let e = expect("testing one two three");
        let r = rules(&e);
        let u = "testing 1 2 3";
        // (what was heard, how it ended) → (outcome, class, message fragment, final phase)
        type Row = (
            Heard<'static>,
            Ending,
            Outcome,
            Option<Class>,
            &'static str,
            Option<u64>,
        );
        let rows: Vec<Row> = vec![
            // Issue 14: settling dialects are judged on when the transcript last changed,
            // however long the settle wait that confirmed it took.
            (heard(u, Some(2000), 4030), Settled, Outcome::Up, None, "", Some(2000)),
            (heard(u, Some(3600), 5600), Settled, Outcome::Up, None, "", Some(3600)),
            (heard(u, Some(4000), 6000), Settled, Outcome::Up, None, "", Some(4000)),
            (heard(u, Some(4400), 6400), Settled, Outcome::Degraded, Some(ErrorClass::Timeout),
                "the transcript last changed 4.4 s after the last audio frame, later than final_timeout 4s", Some(4400)),
            (heard(u, Some(3000), 29_000), Unsettled, Outcome::Degraded, Some(ErrorClass::Timeout),
                "the transcript never settled: it last changed 3.0 s after the last audio frame and had not been stable for 2s when the 30s timeout hit", Some(3000)),
            // A transcript that was complete before the audio ended.
            (heard(u, Some(0), 2000), Settled, Outcome::Up, None, "", Some(0)),
            (heard(u, Some(150), 300), Complete("Metadata"), Outcome::Up, None, "", Some(150)),
            (heard(u, Some(150), 4000), FinalTimeout, Outcome::Degraded, Some(ErrorClass::Timeout),
                "the server did not finish the stream (no Metadata or close) 4.0 s after the last audio frame", Some(150)),
            (heard("", None, 4000), FinalTimeout, Outcome::Down, Some(ErrorClass::NoTranscript),
                "no transcript 4.0 s after the last audio frame (no results at all)", None),
            (Heard { final_count: 2, ..heard("", None, 4000) }, FinalTimeout, Outcome::Down, Some(ErrorClass::NoTranscript),
                "no transcript 4.0 s after the last audio frame (only empty results)", None),
            (heard("", None, 100), Complete("close 1000"), Outcome::Down, Some(ErrorClass::NoTranscript),
                "no transcript: the stream ended (close 1000) 0.1 s after the last audio frame with nothing heard", None),
            (Heard { interim: "testing one", ..heard("", None, 100) }, Complete("Metadata"), Outcome::Down, Some(ErrorClass::NoTranscript),
                "no final transcript (Metadata); only interim results: \"testing one\"", None),
            (Heard { interim: u, ..heard("", None, 4000) }, FinalTimeout, Outcome::Degraded, Some(ErrorClass::InterimOnly),
                "only interim results; no final transcript 4.0 s after the last audio frame (heard \"testing 1 2 3\")", None),
            (Heard { interim: "testing", ..heard("", None, 4000) }, FinalTimeout, Outcome::Down, Some(ErrorClass::NoTranscript),
                "interim results only (\"testing\", WER 0.75 against \"testing one two three\")", None),
            (heard("the weather is nice", Some(100), 200), Complete("Metadata"), Outcome::Down, Some(ErrorClass::TranscriptMismatch),
                "expected \"testing one two three\" but heard \"the weather is nice\" (WER 1.00 > 0.20)", Some(100)),
            (Heard { truncated: true, ..heard("the weather", Some(100), 200) }, Complete("Metadata"), Outcome::Down,
                Some(ErrorClass::TranscriptMismatch), "the transcript passed its cap (64 KiB or 4096 results/segments) and was cut", Some(100)),
            (Heard { service_degraded: Some("server reported service_status stt_degraded"), ..heard(u, Some(5000), 7000) },
                Settled, Outcome::Degraded, Some(ErrorClass::SttDegraded), "server reported service_status stt_degraded", Some(5000)),
        ];
        for (i, (h, ending, outcome, class, msg, fin)) in rows.into_iter().enumerate() {
            let v = judge(&h, &r, ending);
            assert_eq!(v.outcome, outcome, "row {i}: {v:?}");
            let c = v.error.as_ref().map(|e| e.0);
            let m = v.error.clone().map(|e| e.1).unwrap_or_default();
            assert_eq!(c, class, "row {i}: {v:?}");
            assert!(m.contains(msg), "row {i}: {m:?} lacks {msg:?}");
            let got = v
                .phases
                .iter()
                .find(|(n, _)| *n == "final")
                .map(|(_, d)| *d);
            assert_eq!(got, fin.map(MS), "row {i}");
        }
    }

    #[test]
    fn contains_and_wer_and_phases() {
        let e = Expectation {
            transcript: None,
            max_wer: 0.2,
            contains: vec!["two three".into(), "six".into()],
        };
        let r = rules(&e);
        let v = judge(&heard("one two three", Some(10), 20), &r, Ending::Settled);
        assert_eq!(
            v.error.unwrap().1,
            "heard \"one two three\", which does not contain \"six\""
        );
        let e = expect("Testing, 1 2 3.");
        let r = rules(&e);
        let h = Heard {
            first_result: Some(MS(700)),
            ..heard("testing one two three", Some(10), 20)
        };
        let v = judge(&h, &r, Ending::Complete("close 1000"));
        assert_eq!(v.wer, Some(0.0));
        assert_eq!(v.completed_by, Some("close 1000"));
        assert_eq!(v.phases, vec![("first_result", MS(700)), ("final", MS(10))]);
    }

    #[test]
    fn a_flood_against_a_long_expectation_is_scored_by_its_bound() {
        let heard: &'static str = Box::leak("word ".repeat(30_000).into_boxed_str());
        let e = expect(&"said ".repeat(2000));
        let v = judge(&heard_with(heard), &rules(&e), Ending::Complete("Metadata"));
        let (class, m) = v.error.unwrap();
        assert_eq!(class, ErrorClass::TranscriptMismatch);
        assert!(m.contains("(WER at least 14.00 > 0.20)"), "{m}");
        assert_eq!(v.wer, Some(14.0));
    }

    fn heard_with(text: &'static str) -> Heard<'static> {
        heard(text, Some(1), 2)
    }

    #[test]
    fn messages_quote_a_bounded_excerpt() {
        let long: &'static str = Box::leak("é".repeat(100_000).into_boxed_str());
        let e = expect("testing one two three");
        let v = judge(&heard(long, Some(1), 2), &rules(&e), Ending::Settled);
        let (class, m) = v.error.unwrap();
        assert_eq!(class, ErrorClass::TranscriptMismatch);
        assert!(m.len() < 3 * EXCERPT + 200, "{} bytes", m.len());
    }
}
