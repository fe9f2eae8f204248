//! The demo's embedded Deepgram-dialect service answers every shipped utterance correctly
//! through a real listen probe, and its faults show up as the probe's error classes.

use std::path::Path;

use tokio_util::sync::CancellationToken;
use watchpost::demo_stt::{serve_with, DemoSttOptions};
use watchpost::probe::listen::audio::read_manifest;
use watchpost::probe::{attempt_once, Outcome, Probe};

async fn start(fault_every: u32) -> (u16, CancellationToken) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let token = CancellationToken::new();
    tokio::spawn(serve_with(l, token.clone(), DemoSttOptions { fault_every }));
    (port, token)
}

fn load_all(port: u16, extra: &str) -> (tempfile::TempDir, Vec<watchpost::config::ProbeConfig>) {
    let audio = Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/audio");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("probes")).unwrap();
    for (i, u) in read_manifest(&audio.join("manifest.toml"))
        .unwrap()
        .iter()
        .enumerate()
    {
        let probe = format!(
            r#"name = "demo-{i}"
kind = "listen"
dialect = "deepgram"
url = "ws://127.0.0.1:{port}/v1/listen?encoding=linear16&sample_rate=16000&channels=1&interim_results=true"
headers = {{ Authorization = "Token demo" }}
audio = "{audio}"
speed = 4.0
lead_in = "200ms"
tail = "200ms"
retries = 0
{extra}
"#,
            audio = audio.join(&u.file).display()
        );
        std::fs::write(dir.path().join(format!("probes/p{i}.toml")), probe).unwrap();
    }
    let cfg = dir.path().join("watchpost.toml");
    std::fs::write(
        &cfg,
        "[agent]\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n",
    )
    .unwrap();
    let c = watchpost::config::load(&cfg).unwrap_or_else(|e| panic!("{e}"));
    (dir, c.probes)
}

#[tokio::test]
async fn demo_stt_transcribes_every_shipped_utterance() {
    let (port, token) = start(0).await;
    let (_d, probes) = load_all(port, "");
    for pc in &probes {
        let p = Probe::build(pc).unwrap();
        let a = attempt_once(&p, pc).await.0;
        assert_eq!(a.outcome, Outcome::Up, "{}: {a:?}", pc.name);
        assert_eq!(a.details["wer"], serde_json::Value::from(0.0));
        assert!(a.details["request_id"].as_str().unwrap().len() >= 32);
        assert!(a.details["interim_results"].as_u64().unwrap() >= 1, "{a:?}");
        let fin = a.phases.iter().find(|(n, _)| n == "final").unwrap().1;
        assert!(
            fin.as_millis() >= 80 && fin.as_millis() < 600,
            "final {fin:?}"
        );
    }
    token.cancel();
}

#[tokio::test]
async fn demo_stt_faults_are_detected() {
    let (port, token) = start(1).await;
    let (_d, probes) = load_all(port, "final_timeout = \"1500ms\"");
    for pc in &probes {
        let p = Probe::build(pc).unwrap();
        let a = attempt_once(&p, pc).await.0;
        let class = a.error.as_ref().map(|e| e.class.as_str()).unwrap_or("");
        assert!(
            matches!(class, "ws_closed" | "no_transcript" | "interim_only"),
            "{}: {a:?}",
            pc.name
        );
        if class == "ws_closed" {
            assert!(
                a.error.as_ref().unwrap().message.contains("1011 NET-0001"),
                "{a:?}"
            );
        }
    }
    token.cancel();
}
