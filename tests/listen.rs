//! Listen probes against real in-process WebSocket servers on 127.0.0.1: each dialect's
//! happy path and each fault the probe exists to catch. Probe files go through the real
//! config loader. Audio is streamed at 4× real time where pace is not the point.

#[path = "common/stt.rs"]
mod stt;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use stt::{phase, Behavior, Dg, Server};
use watchpost::probe::{attempt_once, Attempt, Outcome, Probe};

const UTTERANCE: &str = "testing one two three four five";

fn audio_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/audio")
}

fn wav(name: &str) -> String {
    audio_dir().join(name).display().to_string()
}

/// Write a probe file and a config that globs it into a temp dir and load them.
fn load(probe: &str) -> Result<(tempfile::TempDir, watchpost::config::ProbeConfig), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("probes")).expect("mkdir");
    std::fs::write(dir.path().join("probes/p.toml"), probe).expect("write probe");
    let cfg = dir.path().join("watchpost.toml");
    std::fs::write(
        &cfg,
        "[agent]\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n",
    )
    .expect("write config");
    match watchpost::config::load(&cfg) {
        Ok(c) => Ok((dir, c.probes.into_iter().next().expect("one probe"))),
        Err(e) => Err(e.to_string()),
    }
}

fn deepgram_probe(url: &str, extra: &str) -> String {
    format!(
        r#"name = "listen-test"
kind = "listen"
dialect = "deepgram"
url = "{url}"
headers = {{ Authorization = "Token test-key" }}
audio = "{audio}"
speed = 4.0
retries = 0
{final_timeout}
{extra}
"#,
        audio = wav("testing-one-two-three.wav"),
        final_timeout = if extra.contains("final_timeout") {
            ""
        } else {
            "final_timeout = \"2s\""
        },
    )
}

const DG_QUERY: &str =
    "/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000&channels=1&interim_results=true";

async fn run(probe: &str) -> Attempt {
    let (_dir, cfg) = load(probe).unwrap_or_else(|e| panic!("config did not load:\n{e}"));
    let p = Probe::build(&cfg).expect("build");
    attempt_once(&p, &cfg).await.0
}

fn class(a: &Attempt) -> &str {
    a.error.as_ref().map(|e| e.class.as_str()).unwrap_or("")
}

fn message(a: &Attempt) -> &str {
    a.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
}

#[tokio::test]
async fn deepgram_happy_path() {
    let srv = Server::start(Behavior::Deepgram(Dg::new("Testing, 1 2 3 4 5."))).await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "")).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    for p in ["connect", "first_result", "final", "total"] {
        assert!(phase(&a, p).is_some(), "phase {p} missing: {:?}", a.phases);
    }
    assert!(phase(&a, "final").unwrap() < Duration::from_millis(500));
    assert_eq!(a.details["wer"], Value::from(0.0));
    assert_eq!(a.details["text"], "Testing, 1 2 3 4 5.");
    assert_eq!(a.details["request_id"], "req-fake-0001");
    assert_eq!(a.details["close_code"], 1000);
    assert!(a.details["send_lateness_max_ms"].as_f64().unwrap() < 50.0);
    let log = srv.log(0);
    assert_eq!(log.authorization.as_deref(), Some("Token test-key"));
    assert_eq!(log.empty_frames, 0, "never an empty binary frame");
    // 2.25 s of audio in 100 ms chunks.
    assert_eq!(log.frames, a.details["frames"].as_u64().unwrap() as usize);
    assert!(log.texts.iter().any(|t| t.contains("CloseStream")));
    assert_eq!(log.bytes, 71_884 - 44);
}

#[tokio::test]
async fn frames_are_paced_on_absolute_deadlines() {
    // Real time, 50 ms chunks: frame n arrives close to n × 50 ms after frame 0.
    let srv = Server::start(Behavior::Deepgram(Dg::new(UTTERANCE))).await;
    let probe = deepgram_probe(&srv.url(DG_QUERY), "chunk = \"50ms\"")
        .replace("speed = 4.0", "speed = 1.0");
    let a = run(&probe).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    let log = srv.log(0);
    let t0 = log.frame_times[0];
    let mut worst = Duration::ZERO;
    for (i, t) in log.frame_times.iter().enumerate() {
        let due = Duration::from_millis(50 * i as u64);
        let off = t.duration_since(t0);
        worst = worst.max(off.abs_diff(due));
    }
    assert!(
        worst < Duration::from_millis(30),
        "frame arrival drifted {worst:?} from the schedule"
    );
    let total = log.frame_times.last().unwrap().duration_since(t0);
    assert!(
        total >= Duration::from_millis(2150),
        "sent too fast: {total:?}"
    );
}

#[tokio::test]
async fn deepgram_finalize_mode_and_lead_in_tail() {
    let srv = Server::start(Behavior::Deepgram(Dg::new(UTTERANCE))).await;
    let a = run(&deepgram_probe(
        &srv.url(DG_QUERY),
        "end = \"finalize\"\nlead_in = \"300ms\"\ntail = \"200ms\"",
    ))
    .await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    assert_eq!(a.details["completed_by"], "from_finalize result");
    let log = srv.log(0);
    assert!(log.texts.iter().any(|t| t.contains("Finalize")));
    assert_eq!(log.bytes, 71_884 - 44 + 9600 + 6400);
}

#[tokio::test]
async fn keepalive_while_idle() {
    let srv = Server::start(Behavior::Deepgram(Dg::new(UTTERANCE))).await;
    let a = run(&deepgram_probe(
        &srv.url(DG_QUERY),
        "idle_before = \"700ms\"\nkeepalive = \"200ms\"",
    ))
    .await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    let log = srv.log(0);
    assert!(log.keepalives >= 2, "keepalives: {}", log.keepalives);
    assert!(a.details["keepalives"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn deepgram_rejects_401_with_err_code() {
    let mut dg = Dg::new(UTTERANCE);
    dg.require_token = true;
    let srv = Server::start(Behavior::Deepgram(dg)).await;
    let probe = deepgram_probe(&srv.url(DG_QUERY), "").replace("Token test-key", "Bearer nope");
    let a = run(&probe).await;
    assert_eq!(a.outcome, Outcome::Down);
    assert_eq!(class(&a), "ws_rejected");
    assert_eq!(a.details["http_status"], 401);
    assert_eq!(a.details["err_code"], "INVALID_AUTH");
    assert_eq!(a.details["err_msg"], "Invalid credentials.");
    assert!(message(&a).contains("HTTP 401"), "{}", message(&a));
    assert!(
        message(&a).contains("INVALID_AUTH Invalid credentials."),
        "{}",
        message(&a)
    );
}

#[tokio::test]
async fn rejects_503_with_err_code() {
    let body = r#"{"err_code":"SERVICE_UNAVAILABLE","err_msg":"Capacity exceeded, try again.","request_id":"r-503"}"#;
    let srv = Server::start(Behavior::Reject {
        status: 503,
        body: body.into(),
    })
    .await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "")).await;
    assert_eq!(class(&a), "ws_rejected", "{a:?}");
    assert_eq!(a.details["http_status"], 503);
    assert_eq!(a.details["err_code"], "SERVICE_UNAVAILABLE");
    assert_eq!(a.details["request_id"], "r-503");
    assert!(message(&a).contains("Capacity exceeded"), "{}", message(&a));
}

#[tokio::test]
async fn closes_1011_mid_stream() {
    let mut dg = Dg::new(UTTERANCE);
    dg.interim = false;
    dg.close_after = Some((6, 1011, "NET-0001"));
    let srv = Server::start(Behavior::Deepgram(dg)).await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "")).await;
    assert_eq!(class(&a), "ws_closed", "{a:?}");
    let m = message(&a);
    assert!(
        m.starts_with("server closed the socket with 1011 NET-0001 after "),
        "{m}"
    );
    assert!(m.contains("without a transcript"), "{m}");
    assert!(m.contains("while audio was streaming"), "{m}");
    assert_eq!(a.details["close_code"], 1011);
    assert_eq!(a.details["close_reason"], "NET-0001");
}

#[tokio::test]
async fn closes_1011_after_partial_transcript() {
    let mut dg = Dg::new(UTTERANCE);
    dg.close_after = Some((10, 1011, "NET-0000"));
    let srv = Server::start(Behavior::Deepgram(dg)).await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "")).await;
    assert_eq!(class(&a), "ws_closed", "{a:?}");
    assert!(
        message(&a).contains("heard so far: \"testing"),
        "{}",
        message(&a)
    );
}

#[tokio::test]
async fn silent_server_is_no_transcript() {
    let srv = Server::start(Behavior::Silent).await;
    let a = run(&deepgram_probe(
        &srv.url(DG_QUERY),
        "final_timeout = \"1s\"",
    ))
    .await;
    assert_eq!(class(&a), "no_transcript", "{a:?}");
    assert_eq!(
        message(&a),
        "no transcript 1.0 s after the last audio frame (no results at all)"
    );
}

#[tokio::test]
async fn server_that_never_closes_is_judged_and_degraded() {
    let mut dg = Dg::new(UTTERANCE);
    dg.finish = false;
    let srv = Server::start(Behavior::Deepgram(dg)).await;
    let t = Instant::now();
    let a = run(&deepgram_probe(
        &srv.url(DG_QUERY),
        "final_timeout = \"1s\"",
    ))
    .await;
    assert!(t.elapsed() < Duration::from_secs(4), "must not hang");
    assert_eq!(a.outcome, Outcome::Degraded, "{a:?}");
    assert_eq!(class(&a), "timeout");
    assert!(
        message(&a).contains("did not finish the stream"),
        "{}",
        message(&a)
    );
    assert_eq!(a.details["wer"], Value::from(0.0));
    assert!(phase(&a, "final").is_some());
}

#[tokio::test]
async fn wrong_transcript_is_a_mismatch() {
    let srv = Server::start(Behavior::Deepgram(Dg::new("the weather is nice today"))).await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "")).await;
    assert_eq!(class(&a), "transcript_mismatch", "{a:?}");
    let m = message(&a);
    assert!(
        m.contains("expected \"testing one two three four five\""),
        "{m}"
    );
    assert!(m.contains("heard \"the weather is nice today\""), "{m}");
    assert!(m.contains("WER 1.00 > 0.20"), "{m}");
}

#[tokio::test]
async fn contains_expectation() {
    let srv = Server::start(Behavior::Deepgram(Dg::new(
        "testing one two three four five",
    )))
    .await;
    let probe = deepgram_probe(&srv.url(DG_QUERY), "contains = [\"two three\", \"six\"]");
    let a = run(&probe).await;
    assert_eq!(class(&a), "transcript_mismatch", "{a:?}");
    assert!(message(&a).contains("does not contain \"six\""));
    let ok = run(&deepgram_probe(&srv.url(DG_QUERY), "contains = [\"2 3\"]")).await;
    assert_eq!(ok.outcome, Outcome::Up, "{ok:?}");
}

#[tokio::test]
async fn slow_final_over_timeout_and_over_budget() {
    let mut dg = Dg::new(UTTERANCE);
    dg.interim = false;
    dg.final_delay = Duration::from_millis(1500);
    let srv = Server::start(Behavior::Deepgram(dg)).await;
    // Slower than final_timeout: nothing usable.
    let a = run(&deepgram_probe(
        &srv.url(DG_QUERY),
        "final_timeout = \"1s\"",
    ))
    .await;
    assert_eq!(class(&a), "no_transcript", "{a:?}");
    // Within final_timeout but over the per-run budget: degraded.
    let a = run(&deepgram_probe(
        &srv.url(DG_QUERY),
        "final_timeout = \"3s\"\n[budget]\nfinal = { run = \"1s\" }",
    ))
    .await;
    assert_eq!(a.outcome, Outcome::Degraded, "{a:?}");
    assert_eq!(class(&a), "budget");
    assert!(phase(&a, "final").unwrap() >= Duration::from_millis(1500));
}

/// The `final` phase is the service's time, not the agent's: a final that arrives while the
/// agent's only runtime thread is busy elsewhere is timed by when it reached the socket.
#[test]
fn a_final_read_late_is_timed_by_its_arrival() {
    let server = tokio::runtime::Runtime::new().expect("server runtime");
    let cue = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut dg = Dg::new(UTTERANCE);
    dg.final_delay = Duration::from_millis(50);
    dg.hold_final = Some(cue.clone());
    let srv = server.block_on(Server::start(Behavior::Deepgram(dg)));
    let probe = deepgram_probe(&srv.url(DG_QUERY), "");
    let busy = Duration::from_millis(600);
    let a = stt::attempt_while_busy(srv, "CloseStream", cue, busy, run(&probe));
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    let fin = phase(&a, "final").expect("final phase");
    assert!(
        fin >= Duration::from_millis(50) && fin < Duration::from_millis(300),
        "final {fin:?}: the agent was busy for {busy:?} from the server's cue"
    );
}

#[tokio::test]
async fn interim_only_is_degraded() {
    let mut dg = Dg::new(UTTERANCE);
    dg.only_interim = true;
    let srv = Server::start(Behavior::Deepgram(dg)).await;
    let a = run(&deepgram_probe(
        &srv.url(DG_QUERY),
        "final_timeout = \"800ms\"",
    ))
    .await;
    assert_eq!(a.outcome, Outcome::Degraded, "{a:?}");
    assert_eq!(class(&a), "interim_only");
}

#[tokio::test]
async fn partial_interim_that_never_finalises_is_no_transcript() {
    let mut dg = Dg::new("testing one two");
    dg.only_interim = true;
    let srv = Server::start(Behavior::Deepgram(dg)).await;
    let a = run(&deepgram_probe(
        &srv.url(DG_QUERY),
        "final_timeout = \"800ms\"",
    ))
    .await;
    assert_eq!(class(&a), "no_transcript", "{a:?}");
    assert!(
        message(&a).contains("interim results only (\"testing one two\", WER 0.50"),
        "{}",
        message(&a)
    );
}

#[tokio::test]
async fn ping_frames_are_answered_and_ignored() {
    let mut dg = Dg::new(UTTERANCE);
    dg.pings = true;
    let srv = Server::start(Behavior::Deepgram(dg)).await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "")).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
}

#[tokio::test]
async fn malformed_json_is_protocol() {
    let srv = Server::start(Behavior::Malformed).await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "")).await;
    assert_eq!(class(&a), "protocol", "{a:?}");
    assert!(message(&a).contains("malformed message"), "{}", message(&a));
}

#[tokio::test]
async fn binary_garbage_is_protocol() {
    let srv = Server::start(Behavior::Garbage).await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "")).await;
    assert_eq!(class(&a), "protocol", "{a:?}");
    let srv = Server::start(Behavior::BinaryMessage).await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "")).await;
    assert_eq!(class(&a), "protocol", "{a:?}");
    assert!(
        message(&a).contains("unexpected binary message (6 bytes)"),
        "{}",
        message(&a)
    );
}

#[tokio::test]
async fn hundred_megabyte_frame_is_refused_by_the_cap() {
    let srv = Server::start(Behavior::HugeFrame).await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "")).await;
    assert_eq!(class(&a), "frame_too_large", "{a:?}");
    assert!(message(&a).contains("104857600 byte"), "{}", message(&a));
    assert!(message(&a).contains("1048576 byte cap"), "{}", message(&a));
}

#[tokio::test]
async fn trickling_upgrade_times_out() {
    let srv = Server::start(Behavior::Trickle).await;
    let t = Instant::now();
    let a = run(&deepgram_probe(
        &srv.url(DG_QUERY),
        "connect_timeout = \"1s\"",
    ))
    .await;
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(class(&a), "timeout", "{a:?}");
    assert!(
        message(&a).contains("1s connect timeout"),
        "{}",
        message(&a)
    );
}

#[tokio::test]
async fn overall_timeout_names_the_phase() {
    let srv = Server::start(Behavior::Silent).await;
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "timeout = \"1s\"")
        .replace("speed = 4.0", "speed = 1.0"))
    .await;
    assert_eq!(class(&a), "timeout", "{a:?}");
    assert!(
        message(&a).starts_with("the 1s timeout hit while streaming audio (frame "),
        "{}",
        message(&a)
    );
}

#[tokio::test]
async fn connection_refused() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let a = run(&deepgram_probe(
        &format!("ws://127.0.0.1:{port}{DG_QUERY}"),
        "",
    ))
    .await;
    assert_eq!(class(&a), "connect_refused", "{a:?}");
}

fn omi_probe(url: &str, extra: &str) -> String {
    format!(
        r#"name = "listen-omi"
kind = "listen"
dialect = "omi"
url = "{url}"
headers = {{ Authorization = "Bearer test" }}
audio = "{audio}"
speed = 4.0
settle = "500ms"
final_timeout = "3s"
retries = 0
{extra}
"#,
        audio = wav("check-system-status.wav"),
    )
}

const OMI_QUERY: &str = "/v4/listen?language=en&sample_rate=16000&codec=pcm16&channels=1";

#[tokio::test]
async fn omi_happy_path_bare_and_wrapped_with_pings() {
    for wrapped in [false, true] {
        let srv = Server::start(Behavior::Omi {
            transcript: "Check the system status.".into(),
            status: None,
            pings: true,
            wrapped,
        })
        .await;
        let a = run(&omi_probe(&srv.url(OMI_QUERY), "")).await;
        assert_eq!(a.outcome, Outcome::Up, "wrapped={wrapped}: {a:?}");
        assert_eq!(a.details["completed_by"], "settled");
        assert_eq!(a.details["service_status"], "ready");
        assert!(phase(&a, "final").is_some() && phase(&a, "first_result").is_some());
        assert_eq!(srv.log(0).authorization.as_deref(), Some("Bearer test"));
    }
}

#[tokio::test]
async fn omi_stt_degraded() {
    let srv = Server::start(Behavior::Omi {
        transcript: "check the system status".into(),
        status: Some("stt_degraded"),
        pings: false,
        wrapped: false,
    })
    .await;
    let a = run(&omi_probe(&srv.url(OMI_QUERY), "")).await;
    assert_eq!(a.outcome, Outcome::Degraded, "{a:?}");
    assert_eq!(class(&a), "stt_degraded");
    assert!(
        message(&a).contains("falling back to batch mode"),
        "{}",
        message(&a)
    );
}

#[tokio::test]
async fn omi_stt_failed() {
    let srv = Server::start(Behavior::Omi {
        transcript: "check the system status".into(),
        status: Some("stt_failed"),
        pings: false,
        wrapped: false,
    })
    .await;
    let a = run(&omi_probe(&srv.url(OMI_QUERY), "")).await;
    assert_eq!(a.outcome, Outcome::Down, "{a:?}");
    assert_eq!(class(&a), "stt_failed");
    assert!(message(&a).contains("provider down"), "{}", message(&a));
}

#[tokio::test]
async fn generic_dialect_from_config() {
    let srv = Server::start(Behavior::Generic {
        transcript: "testing one two three four five".into(),
    })
    .await;
    let probe = format!(
        r#"name = "listen-generic"
kind = "listen"
dialect = "generic"
url = "{url}"
audio = "{audio}"
sample_rate = 16000
channels = 1
speed = 4.0
final_timeout = "2s"
retries = 0
transcript_path = "result.text"
final_path = "result.final"
end_messages = ['{{"op":"end"}}']
"#,
        url = srv.url("/stream"),
        audio = wav("testing-one-two-three.wav"),
    );
    let a = run(&probe).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    assert_eq!(a.details["completed_by"], "close 1000");
    assert!(a.details["interim_results"].as_u64().unwrap() > 0);
}

// ---- config errors with positions ------------------------------------------------------

fn config_error(probe: &str) -> String {
    match load(probe) {
        Ok(_) => panic!("expected a config error"),
        Err(e) => e,
    }
}

#[test]
fn bad_dialect_points_at_it() {
    let e = config_error(
        &deepgram_probe("ws://127.0.0.1:1/x?sample_rate=16000", "")
            .replace("\"deepgram\"", "\"deepgramm\""),
    );
    assert!(
        e.contains(
            "p.toml:3:11: unknown dialect \"deepgramm\" (expected deepgram, flux, omi, generic)"
        ),
        "{e}"
    );
}

#[test]
fn wrong_sample_rate_points_at_the_url() {
    let e = config_error(&deepgram_probe(
        "ws://127.0.0.1:1/v1/listen?encoding=linear16&sample_rate=8000&channels=1",
        "",
    ));
    assert!(e.contains("p.toml:4:7: "), "{e}");
    assert!(
        e.contains("testing-one-two-three.wav is 16000 Hz but the probe declares sample_rate=8000"),
        "{e}"
    );
}

#[test]
fn wrong_channels_and_encoding() {
    let e = config_error(&deepgram_probe(
        "ws://h/v1/listen?encoding=linear16&sample_rate=16000&channels=2",
        "",
    ));
    assert!(
        e.contains("has 1 channel but the probe declares channels=2"),
        "{e}"
    );
    let e = config_error(&deepgram_probe(
        "ws://h/v1/listen?encoding=opus&sample_rate=16000",
        "",
    ));
    assert!(e.contains("url has encoding=opus"), "{e}");
    let e = config_error(&deepgram_probe("ws://h/v1/listen", ""));
    assert!(
        e.contains("deepgram needs encoding=linear16&sample_rate=16000&channels=1"),
        "{e}"
    );
}

#[test]
fn other_config_errors() {
    let url = "ws://h/v1/listen?encoding=linear16&sample_rate=16000";
    let e = config_error(&deepgram_probe(url, "max_wer = 1.5"));
    assert!(e.contains("max_wer 1.5 is not between 0.0 and 1.0"), "{e}");
    let e = config_error(&deepgram_probe(url, "transcript_path = \"a.b\""));
    assert!(
        e.contains("transcript_path is only for dialect = \"generic\""),
        "{e}"
    );
    let e = config_error(&deepgram_probe(url, "chunk = \"5s\""));
    assert!(e.contains("chunk 5s is not between 10ms and 1s"), "{e}");
    let e = config_error(&deepgram_probe(url, "colour = \"blue\""));
    assert!(e.contains("colour"), "{e}");
    let e =
        config_error(&deepgram_probe(url, "").replace("testing-one-two-three.wav", "missing.wav"));
    assert!(
        e.contains("cannot read") && e.contains("missing.wav"),
        "{e}"
    );
    let e = config_error(&deepgram_probe("http://h/x?sample_rate=16000", ""));
    assert!(e.contains("url scheme \"http\" is not ws or wss"), "{e}");
    let e = config_error(&omi_probe(url, "").replace("dialect = \"omi\"", "dialect = \"generic\""));
    assert!(e.contains("needs transcript_path"), "{e}");
}

#[test]
fn transcript_defaults_to_the_manifest() {
    let (_d, cfg) = load(&deepgram_probe(
        "ws://h/v1/listen?encoding=linear16&sample_rate=16000",
        "",
    ))
    .unwrap();
    let watchpost::probe::ProbeSpec::Listen(spec) = &cfg.spec else {
        panic!("not listen")
    };
    assert_eq!(spec.expect.transcript.as_deref(), Some(UTTERANCE));
    assert!(
        cfg.timeout > spec.stream_duration() + spec.final_timeout,
        "default timeout leaves room"
    );
}

// ---- issue 14: settling dialects are judged on when the transcript arrived ----------------

fn timed(final_after_ms: u64, churn: Option<Duration>) -> stt::Timed {
    stt::Timed {
        partial: "check the".into(),
        transcript: "Check the system status.".into(),
        final_after: Duration::from_millis(final_after_ms),
        churn,
    }
}

fn generic_timed_probe(url: &str, extra: &str) -> String {
    format!(
        r#"name = "listen-generic"
kind = "listen"
dialect = "generic"
url = "{url}"
audio = "{audio}"
sample_rate = 16000
channels = 1
speed = 4.0
retries = 0
transcript_path = "result.text"
final_path = "result.final"
accumulate = "replace"
{extra}
"#,
        audio = wav("check-system-status.wav"),
    )
}

/// `final_timeout = 2s`, `settle = 3s`: the final transcript at 0.5×, 0.9× and 1.1×
/// `final_timeout` is up, up, degraded — the settle wait (longer than the margin left) does
/// not count against the server. Real time (a paused clock races real sockets); the rows run
/// side by side.
async fn settle_rows(start: impl Fn(stt::Timed) -> Behavior, probe: impl Fn(&str) -> String) {
    let rows = [
        (1000, Outcome::Up),
        (1800, Outcome::Up),
        (2200, Outcome::Degraded),
    ];
    let mut servers = Vec::new();
    for (after, _) in rows {
        servers.push(Server::start(start(timed(after, None))).await);
    }
    let runs = futures_util::future::join_all(
        servers
            .iter()
            .map(|srv| run_owned(probe(&srv.url(OMI_QUERY)))),
    )
    .await;
    for ((after, want), a) in rows.into_iter().zip(runs) {
        assert_eq!(a.outcome, want, "final after {after} ms: {a:?}");
        let fin = phase(&a, "final").expect("final phase");
        assert!(
            fin >= Duration::from_millis(after) && fin < Duration::from_millis(after + 150),
            "final after {after} ms measured as {fin:?}"
        );
        assert_eq!(a.details["completed_by"], "settled");
        assert_eq!(a.details["wer"], Value::from(0.0));
        if want == Outcome::Degraded {
            assert_eq!(class(&a), "timeout");
            assert!(
                message(&a).starts_with("the transcript last changed 2.")
                    && message(&a)
                        .ends_with(" s after the last audio frame, later than final_timeout 2s"),
                "{}",
                message(&a)
            );
        }
        assert!(!message(&a).contains("Metadata"), "{}", message(&a));
    }
}

async fn run_owned(probe: String) -> Attempt {
    run(&probe).await
}

const SETTLE_ROWS: &str = "settle = \"3s\"\nfinal_timeout = \"2s\"";

#[tokio::test]
async fn omi_final_is_judged_when_it_arrived_not_after_the_settle_wait() {
    settle_rows(Behavior::OmiTimed, |url| {
        omi_probe(url, "").replace("settle = \"500ms\"\nfinal_timeout = \"3s\"", SETTLE_ROWS)
    })
    .await;
}

#[tokio::test]
async fn generic_final_is_judged_when_it_arrived_not_after_the_settle_wait() {
    settle_rows(Behavior::GenericTimed, |url| {
        generic_timed_probe(url, SETTLE_ROWS)
    })
    .await;
}

#[tokio::test]
async fn omi_transcript_that_never_settles_says_what_it_saw() {
    let srv = Server::start(Behavior::OmiTimed(timed(
        300,
        Some(Duration::from_millis(400)),
    )))
    .await;
    let probe = omi_probe(&srv.url(OMI_QUERY), "timeout = \"5s\"")
        .replace("settle = \"500ms\"", "settle = \"1s\"");
    let a = run(&probe).await;
    assert_eq!(a.outcome, Outcome::Degraded, "{a:?}");
    assert_eq!(class(&a), "timeout");
    let m = message(&a);
    assert!(
        m.starts_with("the transcript never settled: it last changed ")
            && m.ends_with(
                "after the last audio frame and had not been stable for 1s when the 5s timeout hit"
            ),
        "{m}"
    );
    assert!(!m.contains("Metadata"), "{m}");
    assert_eq!(a.details["wer"], Value::from(0.0));
}

#[tokio::test]
async fn omi_with_no_transcript_at_final_timeout_is_no_transcript() {
    // Nothing at all before final_timeout: the settle wait never starts.
    let mut t = timed(1500, None);
    t.partial = String::new();
    let srv = Server::start(Behavior::OmiTimed(t)).await;
    let probe = omi_probe(&srv.url(OMI_QUERY), "")
        .replace("final_timeout = \"3s\"", "final_timeout = \"1s\"");
    let a = run(&probe).await;
    assert_eq!(class(&a), "no_transcript", "{a:?}");
    assert!(!message(&a).contains("Metadata"), "{}", message(&a));
}

// ---- issue 8: what the server sends must never blind, crash or bloat the probe ---------------

/// Peak resident memory of this process, in bytes (Linux).
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    kb.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_huge_finals_is_bounded_and_timely() {
    // 200 finals of 1 MB each (before the fix: 24 s against an 8 s timeout and 5.8 GB).
    let srv = Server::start(Behavior::Flood {
        count: 200,
        bytes: 1_000_000,
        transcript: UTTERANCE.into(),
    })
    .await;
    let t = Instant::now();
    let a = run(&deepgram_probe(&srv.url(DG_QUERY), "timeout = \"8s\"")).await;
    let took = t.elapsed();
    eprintln!("flood run took {took:?}, peak RSS {:?} bytes", peak_rss());
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert_eq!(class(&a), "transcript_mismatch", "{}", message(&a));
    let m = message(&a);
    assert!(m.len() < 700, "message of {} bytes", m.len());
    assert!(
        m.contains("passed its cap (64 KiB or 4096 results/segments) and was cut"),
        "{m}"
    );
    assert_eq!(a.details["transcript_truncated"], true);
    assert!(a.details["text"].as_str().unwrap().len() <= 1010);
    assert!(a.details["final_results"].as_u64().unwrap() > 0);
    if let Some(peak) = peak_rss() {
        assert!(peak < 1 << 30, "peak RSS {peak} bytes");
    }
}

#[tokio::test]
async fn dotted_numbers_in_a_transcript_are_judged_not_a_panic() {
    let srv = Server::start(Behavior::Deepgram(Dg::new(
        "Version 1.2.3 runs on 10.0.0.1",
    )))
    .await;
    let probe = deepgram_probe(
        &srv.url(DG_QUERY),
        "transcript = \"version one point two point three runs on ten point zero point zero point one\"",
    );
    let a = run(&probe).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    assert_eq!(a.details["wer"], Value::from(0.0));
    // And the other way round: dotted numbers in the expectation.
    let probe = deepgram_probe(
        &srv.url(DG_QUERY),
        "transcript = \"version 1.2.4 runs on 10.0.0.1\"\nmax_wer = 0.0",
    );
    let a = run(&probe).await;
    assert_eq!(class(&a), "transcript_mismatch", "{a:?}");
}

#[tokio::test]
async fn validate_accepts_a_dotted_number_in_the_transcript() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("probes")).unwrap();
    std::fs::write(
        dir.path().join("probes/p.toml"),
        deepgram_probe(
            "ws://127.0.0.1:1/v1/listen?encoding=linear16&sample_rate=16000&channels=1",
            "transcript = \"version 1.2.3 at 10.0.0.1\"",
        ),
    )
    .unwrap();
    let cfg = dir.path().join("watchpost.toml");
    std::fs::write(
        &cfg,
        "[agent]\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n",
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_watchpost"))
            .env_remove("WATCHPOST_CONFIG")
            .arg("-c")
            .arg(&cfg)
            .arg("validate")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("validate finished")
    .expect("spawn watchpost");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn audio_must_be_a_regular_file_under_the_cap() {
    let url = "ws://h/v1/listen?encoding=linear16&sample_rate=16000";
    let e = config_error(
        &deepgram_probe(url, "").replace(&wav("testing-one-two-three.wav"), "/dev/zero"),
    );
    assert!(
        e.contains("p.toml:6:9: /dev/zero is not a regular file"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.wav");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let e = config_error(&deepgram_probe(url, "").replace(
        &wav("testing-one-two-three.wav"),
        &big.display().to_string(),
    ));
    assert!(
        e.contains("p.toml:6:9: ") && e.contains("over the 33554432 byte cap"),
        "{e}"
    );
}

#[test]
fn closed_sets_name_their_key_and_values() {
    let url = "ws://h/v1/listen?encoding=linear16&sample_rate=16000";
    let e = config_error(&deepgram_probe(url, "end = \"flush\""));
    assert!(
        e.contains("p.toml:10:7: unknown end \"flush\" (expected close_stream, finalize)"),
        "{e}"
    );
    let e =
        config_error(&deepgram_probe(url, "end = \"finalize\"").replace("\"deepgram\"", "\"omi\""));
    assert!(e.contains("end is only for dialect = \"deepgram\""), "{e}");
    let e = config_error(
        &generic_timed_probe(url, "").replace("accumulate = \"replace\"", "accumulate = \"merge\""),
    );
    assert!(
        e.contains("p.toml:12:14: unknown accumulate \"merge\" (expected append, replace)"),
        "{e}"
    );
}

#[test]
fn an_expected_transcript_too_long_to_score_is_refused_at_its_key() {
    let url = "ws://h/v1/listen?encoding=linear16&sample_rate=16000";
    let long = "word ".repeat(2001);
    let e = config_error(&deepgram_probe(url, &format!("transcript = \"{long}\"")));
    assert!(
        e.contains("p.toml:10:14: transcript has 2001 words; at most 2000 are compared"),
        "{e}"
    );
}

#[tokio::test]
async fn omi_segment_merges_replace_and_delete() {
    for new_id in [false, true] {
        let srv = Server::start(Behavior::OmiMerge {
            transcript: "Check the system status.".into(),
            new_id,
        })
        .await;
        let a = run(&omi_probe(&srv.url(OMI_QUERY), "")).await;
        assert_eq!(a.outcome, Outcome::Up, "new_id={new_id}: {a:?}");
        assert_eq!(a.details["text"], "Check the system status.");
        assert_eq!(a.details["wer"], Value::from(0.0));
    }
}

/// Omi's degraded batch mode: `stt_degraded` with `batch_mode` and a batch interval (3 s
/// here, 30 s in production) — results only once per interval, the last batch well after
/// `final_timeout` (1 s). The run waits for it and is degraded with the interval in its
/// message; without that it was `no_transcript` (down) exactly when the fallback works.
#[tokio::test]
async fn omi_batch_mode_waits_for_the_batch_and_is_degraded() {
    let srv = Server::start(Behavior::OmiBatch {
        transcript: "check the system status".into(),
        interval: Duration::from_secs(3),
        recover_after: None,
    })
    .await;
    let probe = omi_probe(&srv.url(OMI_QUERY), "timeout = \"15s\"")
        .replace("final_timeout = \"3s\"", "final_timeout = \"1s\"");
    let a = run(&probe).await;
    assert_eq!(a.outcome, Outcome::Degraded, "{a:?}");
    assert_eq!(class(&a), "stt_degraded");
    let m = message(&a);
    assert!(m.contains("batch mode") && m.contains("3s"), "{m}");
    assert_eq!(a.details["text"], "check the system status");
    assert_eq!(a.details["batch_interval_ms"], Value::from(3000.0));
    // The transcript came in two batches; the last one after the audio.
    let fin = phase(&a, "final").expect("final phase");
    assert!(fin > Duration::from_secs(1), "final {fin:?}");

    // Bounded by the run's timeout: one shorter than the batch says so.
    let probe = omi_probe(&srv.url(OMI_QUERY), "timeout = \"2s\"")
        .replace("final_timeout = \"3s\"", "final_timeout = \"1s\"");
    let a = run(&probe).await;
    assert_eq!(a.outcome, Outcome::Down, "{a:?}");
    assert!(message(&a).contains("batch mode"), "{}", message(&a));
}

/// `stt_recovered` ends the degraded stretch: the run is judged as normal and the time the
/// service spent degraded is in its details.
#[tokio::test]
async fn omi_stt_recovered_ends_the_degraded_stretch() {
    let srv = Server::start(Behavior::OmiBatch {
        transcript: "check the system status".into(),
        interval: Duration::from_secs(30),
        recover_after: Some(Duration::from_millis(200)),
    })
    .await;
    let a = run(&omi_probe(&srv.url(OMI_QUERY), "")).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    assert_eq!(a.details["service_degraded_ms"], Value::from(200.0));
    assert_eq!(a.details["text"], "check the system status");
}

/// The shipped Omi probe waits out a 30 s batch: its timeout covers the audio, one batch
/// interval, `final_timeout`'s allowance for the batch's processing and the settle time.
#[test]
fn shipped_omi_probe_covers_a_30s_batch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(dir.join("probes/listen-omi.toml")).expect("read");
    let probe = text.replace(
        "audio = \"audio/",
        &format!("audio = \"{}/", audio_dir().display()),
    );
    let (_d, cfg) = load(&probe).unwrap_or_else(|e| panic!("{e}"));
    let watchpost::probe::ProbeSpec::Listen(spec) = &cfg.spec else {
        panic!("listen probe");
    };
    let need = spec.audio.duration().div_f64(spec.speed)
        + Duration::from_secs(30)
        + spec.settle
        + Duration::from_secs(3);
    assert!(
        cfg.timeout >= need,
        "timeout {:?} < {need:?} (audio + 30 s batch + settle + 3 s processing)",
        cfg.timeout
    );
    assert!(cfg.timeout < cfg.interval);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omi_flood_of_new_segments_is_capped_and_timely() {
    // 2,000 messages × 100 new segments: 200,000 segments. Assembly is incremental (a map of
    // ids, no rebuild per message) and capped, so the run ends on time with a short message.
    let srv = Server::start(Behavior::OmiFlood {
        messages: 2000,
        per_message: 100,
    })
    .await;
    let t = Instant::now();
    let a = run(&omi_probe(&srv.url(OMI_QUERY), "timeout = \"8s\"")).await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert_eq!(class(&a), "transcript_mismatch", "{a:?}");
    assert_eq!(a.details["transcript_truncated"], true);
    assert!(message(&a).len() < 700, "{}", message(&a));
    assert!(
        message(&a).contains("passed its cap (64 KiB or 4096 results/segments)"),
        "{}",
        message(&a)
    );
}

fn flux_probe(url: &str, extra: &str) -> String {
    deepgram_probe(url, extra).replace("dialect = \"deepgram\"", "dialect = \"flux\"")
}

const FLUX_QUERY: &str = "/v2/listen?model=flux-general-en&encoding=linear16&sample_rate=16000";

/// Deepgram Flux: the utterance is the `EndOfTurn` transcripts (two turns here; the eager
/// ends and updates are not final), the stream
/// ends with the server's close 1000 after `CloseStream` — which the probe answers.
#[tokio::test]
async fn flux_turns_make_the_utterance_and_the_close_is_answered() {
    let srv = Server::start(Behavior::Flux {
        transcript: UTTERANCE.into(),
        fatal: None,
    })
    .await;
    let a = run(&flux_probe(&srv.url(FLUX_QUERY), "")).await;
    assert_eq!(a.outcome, Outcome::Up, "{a:?}");
    assert_eq!(a.details["dialect"], "flux");
    assert_eq!(a.details["text"], UTTERANCE);
    assert_eq!(a.details["final_results"], Value::from(2));
    assert_eq!(a.details["completed_by"], "close 1000");
    // The upgrade's dg-request-id header (Connected repeats it).
    assert_eq!(a.details["request_id"], "req-fake-0001");
    assert!(phase(&a, "final").is_some() && phase(&a, "first_result").is_some());
    let log = srv.log(0);
    assert_eq!(log.authorization.as_deref(), Some("Token test-key"));
    assert_eq!(
        log.texts,
        [r#"{"type":"CloseStream"}"#],
        "no v1 KeepAlive or Finalize"
    );
    assert_eq!(log.empty_frames, 0);
    // The server looks for the answer after the probe has returned: wait for its verdict.
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.log(0).close_answered.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        srv.log(0).close_answered,
        Some(true),
        "the probe answers the server's close frame"
    );
}

#[tokio::test]
async fn flux_fatal_error_is_down_with_its_code() {
    let srv = Server::start(Behavior::Flux {
        transcript: UTTERANCE.into(),
        fatal: Some((3, "INTERNAL_SERVER_ERROR", "model unavailable")),
    })
    .await;
    let a = run(&flux_probe(&srv.url(FLUX_QUERY), "")).await;
    assert_eq!(
        (a.outcome, class(&a)),
        (Outcome::Down, "ws_closed"),
        "{a:?}"
    );
    let m = message(&a);
    assert!(
        m.contains("1011") && m.contains("FatalError INTERNAL_SERVER_ERROR: model unavailable"),
        "{m}"
    );
    assert_eq!(
        a.details["server_error"],
        "FatalError INTERNAL_SERVER_ERROR: model unavailable"
    );
}

#[test]
fn flux_needs_the_audio_format_in_the_url() {
    let e = config_error(&flux_probe(
        "ws://127.0.0.1:1/v2/listen?model=flux-general-en",
        "",
    ));
    assert!(
        e.contains("flux needs encoding=linear16&sample_rate=16000"),
        "{e}"
    );
}
