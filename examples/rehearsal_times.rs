//! Time to detect, to page and to resolve for every rehearsal fault mode, measured by
//! `watchpost::chaos::run::rehearse` itself (the isolated agent: scheduler → probe under
//! the fault → store + evaluator → outbox → dispatcher → a local PagerDuty stand-in).
//!
//!     cargo run --release --example rehearsal_times -- --trials 3
//!
//! The shipped defaults (interval 60 s, retries 1, retry_delay 2 s, failure_threshold 2,
//! success_threshold 2, recovery 3 m) are scaled by 1/60, as in `examples/time_to_page.rs`
//! (the interval floor is 1 s), the HTTP timeout too (5 s → 100 ms). HTTP modes run against
//! a local target, listen modes against the embedded demo STT service (speed 4, 1 s
//! timeout: a session's length does not scale).
//! Times count from the fault's start (detect, page) and from its end (resolve), as the
//! rehearsal report does — so they include where the fault falls in the probe's interval.
//!
//!     cargo run --release --example rehearsal_times -- --trials 3 --live
//!
//! `--live` runs every drill on a running daemon instead (`watchpost::pipeline::Pipeline`,
//! drills started as `POST /api/v1/rehearsals` starts them, from files in its config
//! directory): no baseline run aligns the fault with the schedule, so it falls anywhere in
//! the probe's interval, as a real outage does.

#[path = "../tests/common/recorder.rs"]
mod recorder;

use std::path::Path;
use std::time::Duration;

use recorder::{Recorder, Reply};
use serde_json::json;
use watchpost::chaos::fault::Mode;
use watchpost::chaos::file::{Event, Expect, Fault, Rehearsal};
use watchpost::incident::state::Status;

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const I: f64 = 1.0; // 60 s / 60
const D: f64 = 0.033; // 2 s / 60
const R: f64 = 3.0; // 3 m / 60

fn p50_max(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[(v.len() - 1) / 2], v[v.len() - 1])
}

fn config(dir: &Path, target: &str, stt: u16, pd: &str) -> watchpost::config::Config {
    let audio =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/audio/testing-one-two-three.wav");
    std::fs::create_dir_all(dir.join("probes")).unwrap();
    std::fs::write(
        dir.join("probes/api.toml"),
        format!(
            "name = \"api\"\nkind = \"http\"\nurl = \"{target}/health\"\ntimeout = \"100ms\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("probes/stt.toml"),
        format!(
            "name = \"stt\"\nkind = \"listen\"\ndialect = \"deepgram\"\n\
             url = \"ws://127.0.0.1:{stt}/v1/listen?encoding=linear16&sample_rate=16000&channels=1&interim_results=true\"\n\
             headers = {{ Authorization = \"Token demo\" }}\naudio = \"{}\"\nspeed = 4.0\nlead_in = \"100ms\"\ntail = \"100ms\"\n\
             final_timeout = \"400ms\"\ntimeout = \"1s\"\n",
            audio.display()
        ),
    )
    .unwrap();
    std::env::set_var("RT_PD_KEY", "bench-routing-key");
    let comp = |name: &str, probe: &str| {
        format!(
            "[[component]]\nname = \"{name}\"\nprobes = [\"{probe}\"]\nfailure_threshold = 2\nsuccess_threshold = 2\n\
             recovery = \"{}ms\"\nmax_incidents_per_hour = 1000\nnotify = [\"pager\"]\n\n",
            (R * 1000.0) as u64
        )
    };
    std::fs::write(
        dir.join("watchpost.toml"),
        format!(
            "[agent]\nlocation = \"bench\"\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\nshutdown_grace = \"2s\"\n\n\
             [defaults]\ninterval = \"{}ms\"\ntimeout = \"1s\"\nretries = 1\nretry_delay = \"{}ms\"\njitter = \"0s\"\n\n{}{}\
             [notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"RT_PD_KEY\"\nevents_url = \"{pd}/v2/enqueue\"\n",
            (I * 1000.0) as u64,
            (D * 1000.0) as u64,
            comp("API", "api"),
            comp("Transcription", "stt"),
        ),
    )
    .unwrap();
    watchpost::config::load(&dir.join("watchpost.toml")).unwrap_or_else(|e| panic!("{e}"))
}

fn drill(probe: &str, component: &str, mode: Mode, status: Status) -> Rehearsal {
    let expect = |event, notifier: Option<&str>, status| Expect {
        event,
        component: Some(component.to_string()),
        notifier: notifier.map(str::to_string),
        status,
        within: Duration::from_secs(20),
    };
    Rehearsal {
        path: "bench".into(),
        name: format!("{} on {probe}", mode.name()),
        duration: Duration::from_secs(6),
        settle: Duration::from_secs(20),
        faults: vec![Fault {
            probes: vec![probe.to_string()],
            mode,
        }],
        hooks: vec![],
        expects: vec![
            expect(Event::Status, None, Some(status)),
            expect(Event::Delivered, Some("pager"), None),
            expect(Event::Resolved, Some("pager"), None),
        ],
        notify: vec![],
    }
}

/// The rehearsal file of [`drill`] (what a team writes in `config/rehearsals/`).
fn drill_toml(probe: &str, component: &str, mode: &Mode, status: Status) -> String {
    let params = match mode {
        Mode::Latency(d) => format!("delay = \"{}ms\"\n", d.as_millis()),
        Mode::HttpStatus { status, .. } => format!("status = {status}\n"),
        Mode::WsClose {
            code,
            reason,
            after,
        } => format!(
            "code = {code}\nreason = \"{reason}\"\nafter = \"{}ms\"\n",
            after.as_millis()
        ),
        _ => String::new(),
    };
    format!(
        "name = \"{} on {probe}\"\nduration = \"6s\"\nsettle = \"20s\"\n\n\
         [[fault]]\nprobes = [\"{probe}\"]\nmode = \"{}\"\n{params}\n\
         [[expect]]\nevent = \"status\"\ncomponent = \"{component}\"\nstatus = \"{}\"\nwithin = \"20s\"\n\n\
         [[expect]]\nevent = \"delivered\"\ncomponent = \"{component}\"\nnotifier = \"pager\"\nwithin = \"20s\"\n\n\
         [[expect]]\nevent = \"resolved\"\ncomponent = \"{component}\"\nnotifier = \"pager\"\nwithin = \"20s\"\n",
        mode.name(),
        mode.name(),
        status.as_str()
    )
}

/// One drill on the running daemon `p`, as the API starts it; its final report.
async fn on_daemon(
    p: &watchpost::pipeline::Pipeline,
    dir: &Path,
    text: &str,
    name: &str,
) -> watchpost::chaos::run::Report {
    let file = format!("rehearsals/{name}.toml");
    std::fs::create_dir_all(dir.join("rehearsals")).unwrap();
    std::fs::write(dir.join(&file), text).unwrap();
    let r = p.control.rehearsals();
    let started = r
        .start(&file, "bench")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let id = started["rehearsal_id"].as_str().unwrap().to_string();
    while r.current(Some(&id)).is_some() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conn = p.store.reader().unwrap();
    let doc = watchpost::chaos::live::stored(&conn, &id).unwrap().unwrap();
    serde_json::from_value(doc).unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let trials = arg("--trials", 3.0) as usize;
    let target = Recorder::with_default(|_| Reply::json(200, json!({"status": "ok"}))).await;
    let pd = Recorder::with_default(|_| Reply::json(202, json!({"status": "success"}))).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stt = l.local_addr().unwrap().port();
    let token = tokio_util::sync::CancellationToken::new();
    tokio::spawn(watchpost::demo_stt::serve_with(
        l,
        token.clone(),
        watchpost::demo_stt::DemoSttOptions { fault_every: 0 },
    ));
    let dir = tempfile::tempdir().unwrap();
    // The target by name: the fault proxy needs none, but this is how users write URLs.
    let target_url = format!("http://localhost:{}", target.addr.port());
    let cfg = config(dir.path(), &target_url, stt, &pd.url());
    let live = std::env::args().any(|a| a == "--live");
    let daemon = live.then(|| {
        watchpost::pipeline::Pipeline::start(std::sync::Arc::new(cfg.clone()), Default::default())
            .unwrap()
    });
    if live {
        println!("On the live daemon (drills started as the API starts them):\n");
    }

    let modes: Vec<(&str, &str, Mode, Status)> = vec![
        ("api", "API", Mode::Down, Status::MajorOutage),
        ("api", "API", Mode::Blackhole, Status::MajorOutage),
        (
            "api",
            "API",
            Mode::Latency(Duration::from_millis(150)),
            Status::MajorOutage,
        ),
        ("api", "API", Mode::Reset, Status::MajorOutage),
        (
            "api",
            "API",
            Mode::HttpStatus {
                status: 503,
                body: String::new(),
            },
            Status::MajorOutage,
        ),
        (
            "stt",
            "Transcription",
            Mode::WsClose {
                code: 1011,
                reason: "NET-0001".into(),
                after: Duration::from_millis(300),
            },
            Status::MajorOutage,
        ),
        ("stt", "Transcription", Mode::Garble, Status::MajorOutage),
        ("stt", "Transcription", Mode::SttDegraded, Status::Degraded),
    ];
    println!(
        "| mode | status reached | detect p50 / max | page p50 / max | resolve p50 / max | held |"
    );
    println!("|---|---|---|---|---|---|");
    for (probe, comp, mode, status) in modes {
        let (mut det, mut page, mut res) = (Vec::new(), Vec::new(), Vec::new());
        let mut held = 0;
        for _ in 0..trials {
            // Start anywhere in the interval, as a real outage does.
            tokio::time::sleep(Duration::from_secs_f64(I * rand::random::<f64>())).await;
            let r = drill(probe, comp, mode.clone(), status);
            let report = match &daemon {
                Some(p) => {
                    let text = drill_toml(probe, comp, &mode, status);
                    on_daemon(p, dir.path(), &text, mode.name()).await
                }
                None => {
                    watchpost::chaos::run::rehearse(&cfg, &r, std::future::pending(), &mut |_| {})
                        .await
                        .expect("rehearsal runs")
                }
            };
            if report.passed {
                held += 1;
            }
            let m = |i: usize| {
                report.expectations[i]
                    .measured_ms
                    .map(|v| v as f64 / 1000.0)
            };
            det.extend(m(0));
            page.extend(m(1));
            res.extend(m(2));
        }
        let fmt = |v: &mut Vec<f64>| {
            if v.is_empty() {
                "—".to_string()
            } else {
                let (a, b) = p50_max(v);
                format!("{a:.2} s / {b:.2} s")
            }
        };
        println!(
            "| `{}` | {} | {} | {} | {} | {held}/{trials} |",
            mode.name(),
            status.as_str(),
            fmt(&mut det),
            fmt(&mut page),
            fmt(&mut res)
        );
    }
    if let Some(p) = daemon {
        p.stop().await.unwrap();
    }
    token.cancel();
}
