//! What log tooling sees from the real binary: `--log-format json` is one JSON object per
//! line with a fixed key set and no duplicate keys (checked with a parser that rejects
//! them: serde_json keeps the last silently), no `Some(…)`/`None` Debug strings; text logs
//! carry colour codes only on a terminal, never with `NO_COLOR`, never into a pipe.

#[path = "common/agent.rs"]
mod agent;
mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use agent::{rich_config, start_json, Agent, Peers};
use common::http::{http_probe, refused_addr, TestConfig, MAIN_TOML};

/// A JSON value parsed with duplicate object keys as an error.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = m.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(A::Error::custom(format!("duplicate key {k:?}")));
            }
            let Strict(v) = m.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parse one log line strictly: one object, no duplicate key anywhere in it.
fn strict(line: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Strict>(line) {
        Ok(Strict(Value::Object(m))) => Ok(m),
        Ok(Strict(v)) => Err(format!("not an object: {v}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Every string in `v` that is a Rust `Debug` rendering of an `Option`.
fn debug_options(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s == "None" || (s.starts_with("Some(") && s.ends_with(')')) => {
            out.push(s.clone())
        }
        Value::Array(a) => a.iter().for_each(|v| debug_options(v, out)),
        Value::Object(m) => m.values().for_each(|v| debug_options(v, out)),
        _ => {}
    }
}

/// Check every line of a JSON log; returns the parsed lines.
fn check_json_log(lines: &[String]) -> Vec<Map<String, Value>> {
    let mut parsed = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let m = strict(line).unwrap_or_else(|e| panic!("line {}: {e}: {line}", i + 1));
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["timestamp", "level", "fields", "target"],
            "line {}: {line}",
            i + 1
        );
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
                .contains(&m["level"].as_str().unwrap_or("")),
            "line {}: {line}",
            i + 1
        );
        let ts = m["timestamp"].as_str().unwrap_or("");
        assert!(
            chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
            "line {}: timestamp {ts:?}",
            i + 1
        );
        assert!(m["fields"].is_object(), "line {}: {line}", i + 1);
        assert!(m["target"].is_string(), "line {}: {line}", i + 1);
        let mut bad = Vec::new();
        debug_options(&m["fields"], &mut bad);
        assert!(
            bad.is_empty(),
            "line {}: Option Debug text {bad:?}: {line}",
            i + 1
        );
        parsed.push(m);
    }
    parsed
}

fn message(m: &Map<String, Value>) -> &str {
    m["fields"]["message"].as_str().unwrap_or("")
}

#[test]
fn the_strict_parser_rejects_duplicate_keys_at_any_depth() {
    assert!(strict(r#"{"a":1,"b":{"c":[1,{"d":null}]}}"#).is_ok());
    assert!(strict(r#"{"a":1,"a":2}"#).is_err());
    assert!(strict(r#"{"fields":{"message":"x","message":"y"}}"#).is_err());
    assert!(strict(r#"{"a":[{"b":1,"b":1}]}"#).is_err());
    assert!(strict(r#"{"a":1} {"b":2}"#).is_err(), "one object per line");
    let mut bad = Vec::new();
    debug_options(
        &serde_json::json!({"x": ["Some(1)", "None", "Someone"]}),
        &mut bad,
    );
    assert_eq!(bad, ["Some(1)", "None"]);
}

/// The daemon through runs up and down, an incident, a delivered and a retried
/// notification, and a SIGTERM drain: every stderr line passes the strict check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_json_log_lines_are_strict_json_with_stable_keys() {
    let peers = Peers::start().await;
    let t = rich_config(&peers);
    // Runs that are up are debug lines: ask for them from the pipeline only.
    let mut a = start_json(&t, &[("WATCHPOST_LOG", "info,watchpost::pipeline=debug")]);
    a.api().await;
    // The incident opened, one notifier delivered, the other is retrying.
    a.wait_line(Duration::from_secs(15), |l| {
        l.contains("notification delivered")
    })
    .await;
    a.wait_line(Duration::from_secs(15), |l| l.contains("will retry"))
        .await;
    a.wait_line(Duration::from_secs(15), |l| l.contains(r#""probe":"tls""#))
        .await;
    let (status, lines) = a.stop().await;
    assert!(status.success(), "exit {status:?}");
    let parsed = check_json_log(&lines);
    let find = |msg: &str| {
        parsed
            .iter()
            .find(|m| message(m) == msg)
            .unwrap_or_else(|| panic!("no {msg:?} line in:\n{}", lines.join("\n")))
    };
    // The run line of a down run: its error text is `error`, a field of its own.
    let down = parsed
        .iter()
        .find(|m| message(m) == "run" && m["fields"]["outcome"] == "down")
        .unwrap_or_else(|| panic!("no down run line in:\n{}", lines.join("\n")));
    assert_eq!(down["fields"]["probe"], "broken");
    assert!(
        down["fields"]["class"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{down:?}"
    );
    assert!(down["fields"]["error"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    assert!(down["fields"]["duration_ms"].is_number());
    assert_eq!(down["level"], "INFO", "{down:?}");
    let up = parsed
        .iter()
        .find(|m| message(m) == "run" && m["fields"]["outcome"] == "up")
        .unwrap_or_else(|| panic!("no up run line in:\n{}", lines.join("\n")));
    assert_eq!(up["level"], "DEBUG", "{up:?}");
    // Optional values are plain numbers and strings when present.
    let changed = find("component status changed");
    assert!(changed["fields"]["incident"].is_u64(), "{changed:?}");
    assert!(changed["fields"]["member"].is_string(), "{changed:?}");
    let retry = find("notification failed; will retry");
    assert!(retry["fields"]["retry_in_ms"].is_u64(), "{retry:?}");
    find("stopped cleanly");
}

/// One-shot commands log the same way, dependencies' lines included (debug level).
#[tokio::test]
async fn check_json_log_lines_are_strict_json() {
    let t = TestConfig::with_probe(
        "down.toml",
        &http_probe("down", &format!("http://{}/", refused_addr()), ""),
    );
    let main = t.main_path();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_watchpost"))
            .args(["--log-format", "json", "-c"])
            .arg(&main)
            .arg("check")
            .env("WATCHPOST_LOG", "debug")
            .env_remove("NO_COLOR")
            .output(),
    )
    .await
    .expect("check within 20 s")
    .expect("spawn");
    assert_eq!(out.status.code(), Some(2), "down probe");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect();
    assert!(!lines.is_empty(), "debug logging wrote nothing");
    check_json_log(&lines);
}

/// Text logs into a pipe: no escape sequences at all, NO_COLOR or not.
#[tokio::test]
async fn text_logs_into_a_pipe_carry_no_colour_codes() {
    let peers = Peers::start().await;
    let t = rich_config(&peers);
    let main = t.main_path().to_string_lossy().into_owned();
    let mut a = Agent::start(&["-c", &main, "run"], &[]);
    a.wait_line(Duration::from_secs(15), |l| l.contains("outcome=down"))
        .await;
    let (status, lines) = a.stop().await;
    assert!(status.success(), "exit {status:?}");
    let log = lines.join("\n");
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "escape codes in a piped log:\n{log:?}"
    );
}

/// stderr on a pseudo-terminal: coloured, unless NO_COLOR is set to anything non-empty.
#[test]
fn text_logs_on_a_terminal_are_coloured_unless_no_color() {
    let t = TestConfig::with_probe(
        "down.toml",
        &http_probe("down", &format!("http://{}/", refused_addr()), ""),
    );
    t.write("watchpost.toml", MAIN_TOML);
    for (no_color, want_colour) in [(None, true), (Some(""), true), (Some("1"), false)] {
        let log = on_a_pty(&t, no_color);
        assert_eq!(
            log.contains("\x1b["),
            want_colour,
            "NO_COLOR={no_color:?}; log:\n{log:?}"
        );
    }
}

/// Run `watchpost run` with stderr on a fresh pty until it has logged a run, then stop it;
/// returns what it wrote there.
fn on_a_pty(t: &TestConfig, no_color: Option<&str>) -> String {
    let (mut master, slave) = openpty();
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_watchpost"));
    c.arg("-c")
        .arg(t.main_path())
        .arg("run")
        .env_remove("WATCHPOST_CONFIG")
        .env_remove("WATCHPOST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave));
    if let Some(v) = no_color {
        c.env("NO_COLOR", v);
    }
    let mut child = c.spawn().expect("spawn watchpost");
    // Drop our copy of the slave (moved into the Command): reads end when the child exits.
    drop(c);
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // EIO once no process holds the slave any more.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !text().contains("down") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = reader.join();
    let log = text();
    assert!(log.contains("down"), "no run logged within 15 s:\n{log:?}");
    log
}

/// A pseudo-terminal pair (master as a readable file, slave for a child's stderr).
fn openpty() -> (std::fs::File, OwnedFd) {
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two fds into the ints we pass; the null name, termios and
    // winsize pointers are allowed.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened for us and are owned by nothing else.
    unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}
