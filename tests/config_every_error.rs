//! `watchpost validate` reports every problem of every probe file in one run: one file per
//! kind with several independent mistakes (unreadable values, unknown enum values, numbers
//! out of range, a `[budget]` key that names no phase, a missing file, a bad regex …), each
//! at its exact `line:col`, and nothing that only follows from another mistake. Driven
//! through the real binary, whose stderr is the contract (`file:line:col: message`, exit 3).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::http::TestConfig;

/// A main file with roomy defaults, so only the probe files' own mistakes show.
const MAIN: &str = r#"[agent]
data_dir = "data"
probes = ["probes/*.toml"]
listen = ""

[defaults]
interval = "60s"
timeout = "5s"
"#;

/// One expected diagnostic: the file, a unique `anchor` in it, the `needle` inside the
/// anchor whose first character the diagnostic must point at, and a part of the message.
struct Want<'a> {
    file: &'a Path,
    anchor: &'a str,
    needle: &'a str,
    says: &'a str,
}

fn want<'a>(file: &'a Path, anchor: &'a str, needle: &'a str, says: &'a str) -> Want<'a> {
    Want {
        file,
        anchor,
        needle,
        says,
    }
}

/// 1-based line and column of `needle` inside the one occurrence of `anchor` in `file`.
fn position(file: &Path, anchor: &str, needle: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(file).expect("read test file");
    let starts: Vec<usize> = text.match_indices(anchor).map(|(i, _)| i).collect();
    assert_eq!(
        starts.len(),
        1,
        "anchor {anchor:?} must occur once in {file:?}"
    );
    let inner = anchor
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} is not in anchor {anchor:?}"));
    let before = &text[..starts[0] + inner];
    let line = before.matches('\n').count() + 1;
    let col = before[before.rfind('\n').map_or(0, |i| i + 1)..]
        .chars()
        .count()
        + 1;
    (line, col)
}

/// Run `watchpost -c <main> validate`; it must exit 3 and print exactly `wants` (sorted by
/// file and position), then the count line.
fn validate_reports(t: &TestConfig, wants: &[Want<'_>]) {
    let o = Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .env_remove("WATCHPOST_CONFIG")
        .env_remove("WATCHPOST_LOG")
        .arg("-c")
        .arg(t.main_path())
        .arg("validate")
        .output()
        .expect("run watchpost validate");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "stderr:\n{err}");
    let mut expected: Vec<(PathBuf, usize, usize, &str)> = wants
        .iter()
        .map(|w| {
            let (line, col) = position(w.file, w.anchor, w.needle);
            (w.file.to_path_buf(), line, col, w.says)
        })
        .collect();
    expected.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        expected.len() + 1,
        "expected {} diagnostics, got:\n{err}",
        expected.len()
    );
    for (got, (file, line, col, says)) in lines.iter().zip(&expected) {
        let prefix = format!("{}:{line}:{col}: ", file.display());
        assert!(
            got.starts_with(&prefix) && got[prefix.len()..].contains(says),
            "expected `{prefix}…{says}…`, got `{got}`\nall:\n{err}"
        );
    }
    assert_eq!(
        lines[expected.len()],
        format!("{} configuration error(s)", expected.len())
    );
}

fn config(files: &[(&str, &str)]) -> (TestConfig, Vec<PathBuf>) {
    let t = TestConfig::empty();
    t.write("watchpost.toml", MAIN);
    let paths = files
        .iter()
        .map(|(name, text)| t.write(name, text))
        .collect();
    (t, paths)
}

#[test]
fn every_mistake_of_an_http_probe_in_one_run() {
    let (t, p) = config(&[(
        "probes/api.toml",
        r#"name = "api"
kind = "http"
url = "ftp://127.0.0.1/health"
method = "GE T"
timeout = "5 secs"
retries = 11
offset = "2h"
ca_file = "missing.pem"
details = ["status", 7]
headers = { "bad header" = "one", Good = "two\u0001" }

[expect]
status = ["2xx", "99x"]
body_matches = "(unclosed"

[budget]
totl = { p95 = "1s" }
ttfb = { p95 = "fast" }
"#,
    )]);
    let f = p[0].as_path();
    validate_reports(
        &t,
        &[
            want(
                f,
                "\"ftp://",
                "\"",
                "url scheme \"ftp\" is not http or https",
            ),
            want(f, "\"GE T\"", "\"", "invalid method \"GE T\""),
            want(f, "\"5 secs\"", "\"", "invalid duration \"5 secs\""),
            want(f, "retries = 11", "11", "retries = 11 is more than 10"),
            want(
                f,
                "\"2h\"",
                "\"",
                "offset 2h must be shorter than the interval",
            ),
            want(f, "\"missing.pem\"", "\"", "cannot read ca_file"),
            want(f, "7]", "7", "invalid type: integer `7`, expected a string"),
            want(f, "\"one\"", "\"", "invalid header name \"bad header\""),
            want(f, "\"two", "\"", "invalid value for header \"Good\""),
            // A bad element of a list of patterns: at the list (where the TOML parser puts it).
            want(f, "[\"2xx\", \"99x\"]", "[", "invalid status \"99x\""),
            want(
                f,
                "\"(unclosed\"",
                "\"",
                "invalid regex \"(unclosed\": unclosed group",
            ),
            want(
                f,
                "totl",
                "totl",
                "[budget] \"totl\" is not a phase of a http probe",
            ),
            want(f, "\"fast\"", "\"", "invalid duration \"fast\""),
        ],
    );
}

#[test]
fn every_mistake_of_a_websocket_probe_in_one_run() {
    let (t, p) = config(&[(
        "probes/ws.toml",
        r#"name = "ws"
kind = "websocket"
url = "http://127.0.0.1:1/ws"
subprotocols = ["chat", "a,b"]
max_message_bytes = 10
connect_timeout = "later"

[[step]]
name = "hello"
send = "hi"
wait = "1s"

[[step]]
name = "pause"
wait = "soon"

[[step]]
send_binary = "!!not base64"

[[step]]
name = "hello"
close = 1005

[budget]
helo = { p95 = "1s" }
"#,
    )]);
    let f = p[0].as_path();
    validate_reports(
        &t,
        &[
            want(f, "\"http://", "\"", "url scheme \"http\" is not ws or wss"),
            want(f, "[\"chat\"", "[", "invalid subprotocol name \"a,b\""),
            want(f, "max_message_bytes = 10", "10", "max_message_bytes must be at least 125"),
            want(f, "\"later\"", "\"", "invalid duration \"later\""),
            // Two actions in one step: at the step's `[[step]]` header.
            want(
                f,
                "[[step]]\nname = \"hello\"\nsend",
                "[[step]]",
                "step 1 needs exactly one of send, send_json, send_binary, expect, wait, close (found 2)",
            ),
            // An unreadable wait is its own error, not also "a step without an action".
            want(f, "\"soon\"", "\"", "invalid duration \"soon\""),
            want(f, "\"!!not", "\"", "send_binary is not valid base64"),
            want(f, "\"hello\"\nclose", "\"", "duplicate step name \"hello\""),
            want(f, "1005", "1005", "close code 1005 cannot be sent"),
            want(
                f,
                "helo",
                "helo",
                "[budget] \"helo\" is not a phase of a websocket probe",
            ),
        ],
    );
}

#[test]
fn every_mistake_of_a_listen_probe_in_one_run() {
    let (t, p) = config(&[
        (
            "probes/stt.toml",
            r#"name = "stt"
kind = "listen"
dialect = "deepgram"
end = "flush"
url = "ws://127.0.0.1:1/v1/listen?encoding=linear16&sample_rate=16000&channels=1"
audio = "audio/missing.wav"
transcript = "testing one two three"
max_wer = 1.5
chunk = "5ms"
speed = 50.0
final_timeout = "10 seconds"
transcript_path = "channel.alternatives.0.transcript"
headers = { "X Key" = "v1" }

[budget]
frist_result = { p95 = "1s" }
"#,
        ),
        (
            "probes/generic.toml",
            r#"name = "stt-generic"
kind = "listen"
dialect = "generic"
accumulate = "merge"
url = "ws://127.0.0.1:1/stream?sample_rate=8000"
audio = "audio/testing-one-two-three.wav"
channels = 2
contains = ["testing"]
"#,
        ),
        (
            "probes/typo.toml",
            r#"name = "stt-typo"
kind = "listen"
dialect = "deepgramm"
url = "ws://127.0.0.1:1/v1/listen?encoding=linear16&sample_rate=16000&channels=1"
audio = "audio/testing-one-two-three.wav"
transcript = "testing one two three four five"
speed = 0.0
chunk = "2s"
end = "finalize"
"#,
        ),
    ]);
    let wav = Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/audio/testing-one-two-three.wav");
    std::fs::create_dir_all(t.path("probes/audio")).expect("mkdir");
    std::fs::copy(&wav, t.path("probes/audio/testing-one-two-three.wav"))
        .expect("copy the shipped test utterance");
    let (stt, generic, typo) = (p[0].as_path(), p[1].as_path(), p[2].as_path());
    validate_reports(
        &t,
        &[
            want(
                stt,
                "\"flush\"",
                "\"",
                "unknown end \"flush\" (expected close_stream, finalize)",
            ),
            want(stt, "\"audio/missing.wav\"", "\"", "missing.wav"),
            want(stt, "1.5", "1.5", "max_wer 1.5 is not between 0.0 and 1.0"),
            want(stt, "\"5ms\"", "\"", "chunk 5ms is not between 10ms and 1s"),
            want(stt, "50.0", "50.0", "speed 50 is not between 0.1 and 20"),
            want(
                stt,
                "\"10 seconds\"",
                "\"",
                "invalid duration \"10 seconds\"",
            ),
            want(
                stt,
                "\"channel.alternatives",
                "\"",
                "transcript_path is only for dialect = \"generic\"",
            ),
            want(stt, "\"v1\"", "\"", "invalid header name \"X Key\""),
            want(
                stt,
                "frist_result",
                "frist_result",
                "[budget] \"frist_result\" is not a phase of a listen probe",
            ),
            want(
                generic,
                "\"generic\"",
                "\"",
                "dialect = \"generic\" needs transcript_path",
            ),
            want(
                generic,
                "\"merge\"",
                "\"",
                "unknown accumulate \"merge\" (expected append, replace)",
            ),
            want(
                generic,
                "\"ws://",
                "\"",
                "is 16000 Hz but the probe declares sample_rate=8000",
            ),
            want(
                generic,
                "channels = 2",
                "2",
                "but the probe declares channels=2",
            ),
            // A misspelt dialect hides none of the rest; what depends on the dialect (may
            // this file say `end`?) waits for it.
            want(
                typo,
                "\"deepgramm\"",
                "\"",
                "unknown dialect \"deepgramm\" (expected deepgram, flux, omi, generic)",
            ),
            want(
                typo,
                "speed = 0.0",
                "0.0",
                "speed 0 is not between 0.1 and 20",
            ),
            want(typo, "\"2s\"", "\"", "chunk 2s is not between 10ms and 1s"),
        ],
    );
}

/// A TOML syntax error in one probe file, semantic errors in another and in the main file:
/// all three files are reported in the same run, in file and position order.
#[test]
fn a_syntax_error_does_not_hide_other_files_semantic_errors() {
    let t = TestConfig::empty();
    let main = t.write(
        "watchpost.toml",
        &format!("{MAIN}\n[[component]]\nname = \"API\"\nprobes = [\"nosuch\"]\n"),
    );
    let broken = t.write(
        "probes/broken.toml",
        "name = \"broken\"\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\ninterval = \"1m\"\n",
    );
    let other = t.write(
        "probes/other.toml",
        "name = \"other\"\nkind = \"http\"\nurl = \"gopher://127.0.0.1:1/\"\nmethod = \"BAD METHOD\"\n[budget]\nttbf = { p95 = \"1s\" }\n",
    );
    validate_reports(
        &t,
        &[
            // A string left open: at the end of its line, where the parser gave up.
            want(&broken, "1:1/\ninterval", "\n", "invalid basic string"),
            want(&other, "\"gopher", "\"", "url scheme \"gopher\""),
            want(&other, "\"BAD METHOD\"", "\"", "invalid method"),
            want(&other, "ttbf", "ttbf", "[budget] \"ttbf\""),
            want(&main, "\"nosuch\"", "\"", "unknown probe \"nosuch\""),
        ],
    );
}

/// The main file: every problem of every notifier (its own keys and its delivery options),
/// of every component and of every maintenance window, each at its key.
#[test]
fn every_mistake_of_notifiers_and_components_in_one_run() {
    let t = TestConfig::empty();
    t.write(
        "probes/api.toml",
        "name = \"api\"\nkind = \"http\"\nurl = \"http://127.0.0.1:1/health\"\n",
    );
    let main = t.write(
        "watchpost.toml",
        &format!(
            r#"{MAIN}
[[component]]
name = "API"
probes = ["api"]
failure_threshold = 0
success_threshold = 0
slo_window = "10m"
notify = ["hook", "mail"]

[[maintenance]]
components = ["API", "Nope"]
at = "25:00"
duration = "1h"

[notifier.hook]
kind = "webhook"
url = "ftp://127.0.0.1/hook"
events = ["opened", "reopened"]
content_type = "text/plain\u0001"
delivery = {{ timeout = "0s", breaker_failures = 0 }}

[notifier.mail]
kind = "email"
smtp_url = "smtp://127.0.0.1:2525?tls=maybe"
from = "not an address"
to = []
"#
        ),
    );
    let m = main.as_path();
    validate_reports(
        &t,
        &[
            want(
                m,
                "failure_threshold = 0",
                "0",
                "failure_threshold must be at least 1",
            ),
            want(
                m,
                "success_threshold = 0",
                "0",
                "success_threshold must be at least 1",
            ),
            want(m, "\"10m\"", "\"", "slo_window 10m is shorter than 1h"),
            want(
                m,
                "\"ftp://",
                "\"",
                "url: URL \"ftp://127.0.0.1/hook\" must be http://",
            ),
            want(
                m,
                "[\"opened\"",
                "[",
                "unknown event \"reopened\" in events",
            ),
            want(m, "\"text/plain", "\"", "invalid content_type"),
            want(m, "\"0s\"", "\"", "delivery.timeout must be above zero"),
            want(
                m,
                "breaker_failures = 0",
                "0",
                "delivery.breaker_failures must be at least 1",
            ),
            want(m, "\"smtp://", "\"", "unknown tls=\"maybe\" in smtp_url"),
            want(m, "\"not an address\"", "\"", "from = \"not an address\""),
            want(m, "to = []", "[", "to is empty"),
            want(
                m,
                "\"Nope\"",
                "\"",
                "unknown component \"Nope\" in maintenance window",
            ),
            want(m, "\"25:00\"", "\"", "invalid time of day \"25:00\""),
        ],
    );
}

/// A check that compares with a value that could not be read is skipped, not reported
/// against the default standing in for it: one error per mistake.
#[test]
fn what_follows_from_an_unreadable_value_is_not_reported() {
    let t = TestConfig::empty();
    let main = t.write(
        "watchpost.toml",
        "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n\
         [defaults]\ninterval = \"5 minutes\"\ntimeout = \"90s\"\njitter = \"70s\"\n",
    );
    // Against the 60 s default interval, offset, timeout and jitter would all be too long.
    let api = t.write(
        "probes/api.toml",
        "name = \"api\"\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\n\
         interval = \"2 m\"\noffset = \"90s\"\ntimeout = \"80s\"\njitter = \"75s\"\n",
    );
    // A generic listen probe whose transcript_path is unreadable is not also told it has none.
    let stt = t.write(
        "probes/stt.toml",
        "name = \"stt\"\nkind = \"listen\"\ndialect = \"generic\"\ntranscript_path = 5\n\
         url = \"ws://127.0.0.1:1/?sample_rate=16000&channels=1\"\n\
         audio = \"audio/missing.wav\"\ntranscript = \"hello there\"\n",
    );
    validate_reports(
        &t,
        &[
            want(
                &main,
                "\"5 minutes\"",
                "\"",
                "invalid duration \"5 minutes\"",
            ),
            want(&api, "\"2 m\"", "\"", "invalid duration \"2 m\""),
            want(
                &stt,
                "= 5",
                "5",
                "invalid type: integer `5`, expected a string",
            ),
            want(&stt, "\"audio/missing.wav\"", "\"", "missing.wav"),
        ],
    );
}
