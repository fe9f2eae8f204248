//! Property-based fuzzing of the parts that read what outsiders write: the health-body reader
//! (status codes, content types and bodies a watched service sends) and the config loader
//! (files an operator typed). Whatever the input: no panic, a verdict that is consistent
//! (up ⇔ no error), bounded messages, and config errors that point into the files.
//!
//! Bounded for CI: `WATCHPOST_FUZZ_CASES` cases per property (default 400). Failing inputs
//! proptest finds are kept in `tests/fuzz.proptest-regressions` and replayed first on every
//! run; inputs found by hand are pinned below as ordinary tests.

mod common;

use proptest::prelude::*;
use serde_json::{Map, Value};

use common::http::TestConfig;
use watchpost::probe::http::judge_response;
use watchpost::probe::{Attempt, Outcome, ProbeSpec};

fn cases() -> u32 {
    std::env::var("WATCHPOST_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

/// A probe that uses every part of the health-body reader.
fn http_spec() -> watchpost::probe::http::HttpSpec {
    let t = TestConfig::with_probe(
        "p.toml",
        r#"name = "p"
kind = "http"
url = "http://127.0.0.1:1/health"
subchecks = "checks"
[expect]
status = ["2xx", "3xx"]
json = [ { path = "service", exists = true }, { path = "checks.db.latency_ms", lt = 500 } ]
[degraded_when]
status = ["429"]
body_contains = "slow"
json = [ { path = "mode", equals = "batch" } ]
"#,
    );
    let cfg = t.load_ok();
    match &cfg.probes[0].spec {
        ProbeSpec::Http(s) => s.clone(),
        _ => unreachable!("an http probe"),
    }
}

fn check_verdict(a: &Attempt) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.outcome == Outcome::Up, a.error.is_none(), "{:?}", a.error);
    if let Some(e) = &a.error {
        prop_assert!(!e.message.is_empty());
        prop_assert!(
            e.message.chars().count() <= 1000,
            "unbounded message: {}",
            e.message.len()
        );
    }
    for s in &a.subchecks {
        prop_assert!(s.series.starts_with("p/checks."));
        if let Some(l) = s.latency {
            prop_assert!(l <= std::time::Duration::from_secs(3600));
        }
    }
    Ok(())
}

/// JSON a health endpoint might send, weighted towards the keys the reader looks at and
/// towards hostile leaves (huge, negative, non-finite-looking numbers, odd strings).
fn health_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![
            Just(1e30),
            Just(-1e30),
            Just(1.7e308),
            Just(-0.0),
            Just(5e-324)
        ]
        .prop_map(Value::from),
        prop_oneof![
            Just("ok"),
            Just("degraded"),
            Just("fail"),
            Just("down"),
            Just("active"),
            Just("")
        ]
        .prop_map(|s| Value::String(s.into())),
        "\\PC{0,40}".prop_map(Value::String),
    ];
    let key = prop_oneof![
        Just("status".to_string()),
        Just("checks".to_string()),
        Just("latency_ms".to_string()),
        Just("error".to_string()),
        Just("message".to_string()),
        Just("service".to_string()),
        Just("db".to_string()),
        Just("mode".to_string()),
        "\\PC{0,12}",
    ];
    leaf.prop_recursive(5, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn content_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("application/json".to_string()),
        Just("application/health+json; charset=utf-8".to_string()),
        Just("text/html".to_string()),
        Just(String::new()),
        "\\PC{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn health_reader_survives_any_bytes(
        status in 100u16..1000,
        ct in content_type(),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let spec = http_spec();
        check_verdict(&judge_response(&spec, "p", status, &ct, &body))?;
    }

    #[test]
    fn health_reader_survives_any_json(
        status in prop_oneof![Just(200u16), Just(207), Just(429), Just(503), 100u16..600],
        ct in content_type(),
        doc in health_json(),
    ) {
        let spec = http_spec();
        let body = serde_json::to_vec(&doc).unwrap();
        let a = judge_response(&spec, "p", status, &ct, &body);
        check_verdict(&a)?;
        // Statuses outside expect and degraded_when are always http_status, whatever the body.
        if !(200..400).contains(&status) && status != 429 {
            prop_assert_eq!(a.error.as_ref().map(|e| e.class.as_str()), Some("http_status"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The config loader: mutations of a valid configuration
// ---------------------------------------------------------------------------------------

const MAIN: &str = r#"[agent]
location = "fuzz"
data_dir = "data"
probes = ["probes/*.toml"]
listen = ""
max_concurrency = 8

[defaults]
interval = "60s"
timeout = "5s"
retries = 1
jitter = "500ms"

[[component]]
name = "API"
probes = ["api", "api/checks.db"]
failure_threshold = 2
notify = ["hook"]

[notifier.hook]
kind = "webhook"
url = "http://127.0.0.1:9/hook"
"#;

const PROBE: &str = r#"name = "api"
kind = "http"
url = "http://127.0.0.1:1/health"
subchecks = "checks"
interval = "30s"
[expect]
status = ["2xx"]
json = [ { path = "status", in = ["ok", "degraded"] } ]
[budget]
total = { p95 = "800ms", run = "2s" }
"#;

/// Tokens that make TOML and our keys interesting when dropped in anywhere.
const TOKENS: &[&str] = &[
    "=",
    "\"",
    "'",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\n",
    ".",
    "0",
    "-1",
    "1e30",
    "4294967296",
    "\"0s\"",
    "\"1h\"",
    "\"-5s\"",
    "\"${UNSET_FUZZ_VAR}\"",
    "kind",
    "name",
    "probes",
    "[[component]]",
    "[budget]",
    "[notifier.x]",
    "timeout",
    "retries = 99",
    "\u{e9}",
    "\u{1F600}",
    "#",
    "\\",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, token: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..8).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, token)| Mutation::Insert { at, token }),
    ]
}

fn apply(text: &str, muts: &[Mutation]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for m in muts {
        match *m {
            Mutation::Delete { at, len } if !chars.is_empty() => {
                let at = at % chars.len();
                let end = (at + len).min(chars.len());
                chars.drain(at..end);
            }
            Mutation::Delete { .. } => {}
            Mutation::Insert { at, token } => {
                let at = at % (chars.len() + 1);
                for (i, c) in TOKENS[token].chars().enumerate() {
                    chars.insert(at + i, c);
                }
            }
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn config_loader_survives_mutations(
        main_muts in prop::collection::vec(mutation(), 0..4),
        probe_muts in prop::collection::vec(mutation(), 0..4),
    ) {
        let main = apply(MAIN, &main_muts);
        let probe = apply(PROBE, &probe_muts);
        let t = TestConfig::with_probe("api.toml", &probe);
        t.write("watchpost.toml", &main);
        if let Err(e) = t.load() {
            prop_assert!(!e.0.is_empty());
            for d in &e.0 {
                let text = if d.file.ends_with("watchpost.toml") { &main } else { &probe };
                prop_assert!(
                    d.file.ends_with("watchpost.toml") || d.file.ends_with("probes/api.toml"),
                    "{d}"
                );
                // A position, or none at all (0:0) for a whole-file problem.
                prop_assert!((d.line >= 1 && d.col >= 1) || (d.line, d.col) == (0, 0), "{d}");
                prop_assert!(d.line <= text.lines().count().max(1) + 1, "{d} past the end");
                prop_assert!(!d.message.is_empty());
            }
        }
    }
}

#[test]
fn the_unmutated_inputs_are_valid() {
    let t = TestConfig::with_probe("api.toml", PROBE);
    t.write("watchpost.toml", MAIN);
    t.load_ok();
    let a = judge_response(
        &http_spec(),
        "p",
        200,
        "application/json",
        br#"{"status":"ok","service":"api","checks":{"db":{"status":"ok","latency_ms":12}}}"#,
    );
    assert_eq!(a.outcome, Outcome::Up, "{:?}", a.error);
    assert_eq!(a.subchecks.len(), 1);
}
