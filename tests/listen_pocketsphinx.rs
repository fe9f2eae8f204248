//! End to end with a real recognizer: `tests/peers/stt_pocketsphinx.py` (a Deepgram-style
//! server around PocketSphinx) transcribes every shipped utterance, streamed by a real listen
//! probe, and each must pass its `max_wer`.
//!
//! This test does not skip: without python3 and the pinned packages it FAILS and says how to
//! install them (`pip install -r tests/peers/requirements.txt`); CI installs them.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use watchpost::probe::listen::audio::read_manifest;
use watchpost::probe::{attempt_once, Outcome, Probe};

const INSTALL: &str = "install the test peers with: pip install -r tests/peers/requirements.txt (needs python3 ≥ 3.9)";

async fn start_peer(root: &Path) -> (Child, u16) {
    let script = root.join("tests/peers/stt_pocketsphinx.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start python3 ({e}); {INSTALL}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
    let port = match first {
        Ok(Ok(Some(line))) => line
            .strip_prefix("LISTENING ")
            .and_then(|p| p.trim().parse::<u16>().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the peer: {line:?}")),
        other => {
            let _ = child.start_kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err)).await;
            }
            panic!("the pocketsphinx peer did not start ({other:?}); {INSTALL}\nstderr:\n{err}");
        }
    };
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_utterances_pass_through_pocketsphinx() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (_child, port) = start_peer(root).await;
    let audio = root.join("probes/audio");
    let utterances = read_manifest(&audio.join("manifest.toml")).expect("manifest");
    assert!(utterances.len() >= 3);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("probes")).expect("mkdir");
    for (i, u) in utterances.iter().enumerate() {
        let probe = format!(
            r#"name = "sphinx-{i}"
kind = "listen"
dialect = "deepgram"
url = "ws://127.0.0.1:{port}/v1/listen?encoding=linear16&sample_rate=16000&channels=1&interim_results=true"
headers = {{ Authorization = "Token test" }}
audio = "{audio}"
max_wer = 0.2
speed = 2.0
tail = "300ms"
final_timeout = "30s"
# The peer decodes on one Python thread: on a loaded machine its handshake and results come
# late. Generous deadlines keep this a test of recognition, not of machine load.
connect_timeout = "20s"
timeout = "60s"
retries = 0
"#,
            audio = audio.join(&u.file).display()
        );
        std::fs::write(dir.path().join(format!("probes/p{i}.toml")), probe).expect("write probe");
    }
    let cfg_path = dir.path().join("watchpost.toml");
    std::fs::write(
        &cfg_path,
        "[agent]\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n",
    )
    .expect("write config");
    let cfg = watchpost::config::load(&cfg_path).unwrap_or_else(|e| panic!("{e}"));

    // All utterances at once: the peer decodes each session on its own.
    let mut tasks = Vec::new();
    for pc in cfg.probes.clone() {
        tasks.push(tokio::spawn(async move {
            let p = Probe::build(&pc).expect("build");
            let (a, _, _) = attempt_once(&p, &pc).await;
            (pc.name.clone(), a)
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        let (name, a) = t.await.expect("task");
        eprintln!(
            "{name}: {:?} wer={} heard={} final={:?}",
            a.outcome,
            a.details.get("wer").cloned().unwrap_or_default(),
            a.details.get("text").cloned().unwrap_or_default(),
            a.phases.iter().find(|(n, _)| n == "final").map(|(_, d)| *d)
        );
        if a.outcome != Outcome::Up {
            failures.push(format!("{name}: {:?} {:?}", a.outcome, a.error));
        }
        assert!(
            a.details.get("request_id").is_some(),
            "dg-request-id kept ({name}: {:?})",
            a.error
        );
    }
    assert!(
        failures.is_empty(),
        "utterances that did not pass:\n{}",
        failures.join("\n")
    );
}

/// A rehearsal's `garble` against a real recognizer: the utterance streamed backwards is
/// heard as other words, so the run is a `transcript_mismatch`, as when a real service
/// mishears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_audio_is_a_transcript_mismatch_for_a_real_recognizer() {
    use watchpost::chaos::fault::{Faults, Mode};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (_child, port) = start_peer(root).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("probes")).expect("mkdir");
    let probe = format!(
        r#"name = "sphinx"
kind = "listen"
dialect = "deepgram"
url = "ws://127.0.0.1:{port}/v1/listen?encoding=linear16&sample_rate=16000&channels=1&interim_results=true"
headers = {{ Authorization = "Token test" }}
audio = "{}"
max_wer = 0.2
speed = 2.0
tail = "300ms"
final_timeout = "30s"
connect_timeout = "20s"
timeout = "60s"
retries = 0
"#,
        root.join("probes/audio/testing-one-two-three.wav")
            .display()
    );
    std::fs::write(dir.path().join("probes/p.toml"), probe).expect("write probe");
    let cfg_path = dir.path().join("watchpost.toml");
    std::fs::write(
        &cfg_path,
        "[agent]\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n",
    )
    .expect("write config");
    let cfg = watchpost::config::load(&cfg_path).unwrap_or_else(|e| panic!("{e}"));
    let pc = cfg.probes[0].clone();
    let faults = Faults::default();
    faults
        .inject(&pc.name, Mode::Garble, None)
        .await
        .expect("inject");
    let p = Probe::build(&pc).expect("build");
    let f = faults.get(&pc.name);
    let (a, _, _) = watchpost::probe::attempt_once_with(&p, &pc, f.as_deref()).await;
    eprintln!(
        "garbled: {:?} heard={}",
        a.error,
        a.details.get("text").cloned().unwrap_or_default()
    );
    assert_eq!(a.outcome, Outcome::Down, "{a:?}");
    assert_eq!(
        a.error.as_ref().map(|e| e.class.as_str()),
        Some("transcript_mismatch"),
        "{a:?}"
    );
}
