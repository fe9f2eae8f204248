//! Time to page and time to resolve, measured through the whole daemon (`watchpost::run`:
//! scheduler → HTTP probe → store + evaluator → outbox → dispatcher → PagerDuty).
//!
//!     cargo run --release --example time_to_page -- --trials 5 --scale 60
//!
//! A local target answers 200 until the trial flips it to 503 at a random moment, then back.
//! A local PagerDuty stand-in records when the trigger and the resolve arrive.
//!
//! - time to page = PagerDuty trigger − first failing request at the target
//! - time to resolve = PagerDuty resolve − first good request at the target
//!
//! The production settings (interval 60 s, retries 1, retry_delay 2 s, failure_threshold 2,
//! success_threshold 2, recovery 3 m) are divided by `--scale` (the probe interval floor is
//! 1 s, so 60 is the largest scale). The schedule part of the result follows the formula
//! (printed with the scaled and the production parameters); what is left over is the
//! agent's own overhead (evaluation, SQLite commit, dispatch, the evaluator tick for the
//! recovery deadline), which does not scale and is reported in milliseconds.

#[path = "../tests/common/recorder.rs"]
mod recorder;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use recorder::{Recorder, Reply};
use serde_json::json;

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Production parameters (seconds).
const INTERVAL: f64 = 60.0;
const RETRY_DELAY: f64 = 2.0;
const RECOVERY: f64 = 180.0;
const RETRIES: f64 = 1.0;
const FAILURE_THRESHOLD: f64 = 2.0;
const SUCCESS_THRESHOLD: f64 = 2.0;

/// Schedule part of time to page: the F-th failing run (F−1 intervals after the first)
/// needs its r confirmation retries, each after retry_delay, before it counts as down.
/// `a` is the duration of one failing attempt.
fn page_formula(i: f64, d: f64, a: f64) -> f64 {
    (FAILURE_THRESHOLD - 1.0) * i + RETRIES * d + (RETRIES + 1.0) * a
}

/// Schedule part of time to resolve, from the first good request: S good runs (the S-th
/// completes (S−1)·I later) AND `recovery` clear since the last bad run, which started one
/// interval before the first good one.
fn resolve_formula(i: f64, r: f64, a: f64) -> f64 {
    ((SUCCESS_THRESHOLD - 1.0) * i + a).max(r - i)
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let trials = arg("--trials", 5.0) as usize;
    let scale = arg("--scale", 60.0).clamp(1.0, 60.0);
    let (i, d, r) = (INTERVAL / scale, RETRY_DELAY / scale, RECOVERY / scale);

    // Target: 200 or 503; log of (arrival, failing?).
    let failing = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let (f2, l2) = (failing.clone(), log.clone());
    let target = Recorder::with_default(move |_| {
        let bad = f2.load(Ordering::SeqCst);
        l2.lock().unwrap().push((Instant::now(), bad));
        if bad {
            Reply::json(503, json!({"status": "fail"}))
        } else {
            Reply::json(200, json!({"status": "ok"}))
        }
    })
    .await;
    let pd = Recorder::with_default(|_| Reply::json(202, json!({"status": "success"}))).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("probes")).unwrap();
    std::fs::write(
        dir.path().join("probes/target.toml"),
        format!(
            "name = \"target\"\nkind = \"http\"\nurl = \"{}/health\"\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nretries = 1\nretry_delay = \"{}ms\"\njitter = \"0s\"\n",
            target.url(),
            (i * 1000.0) as u64,
            ((i * 1000.0) as u64 / 2).max(200),
            (d * 1000.0) as u64
        ),
    )
    .unwrap();
    std::env::set_var("TTP_PD_KEY", "bench-routing-key");
    std::fs::write(
        dir.path().join("watchpost.toml"),
        format!(
            "[agent]\nlocation = \"bench\"\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n\
             [[component]]\nname = \"Target\"\nprobes = [\"target\"]\nfailure_threshold = 2\nsuccess_threshold = 2\nrecovery = \"{}ms\"\nmax_incidents_per_hour = 1000\nnotify = [\"pager\"]\n\n\
             [notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"TTP_PD_KEY\"\nevents_url = \"{}/v2/enqueue\"\n",
            (r * 1000.0) as u64,
            pd.url()
        ),
    )
    .unwrap();
    let config = Arc::new(
        watchpost::config::load(&dir.path().join("watchpost.toml"))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(watchpost::run(config, None, async move {
        let _ = stop_rx.await;
    }));

    let first_after = |since: Instant, bad: bool| -> Option<Instant> {
        log.lock()
            .unwrap()
            .iter()
            .find(|(t, b)| *t >= since && *b == bad)
            .map(|(t, _)| *t)
    };
    let mut attempt_ms = Vec::new();
    let (mut page, mut resolve) = (Vec::new(), Vec::new());
    tokio::time::sleep(Duration::from_secs_f64(i * 1.5)).await; // a few good runs first
    for n in 0..trials {
        tokio::time::sleep(Duration::from_secs_f64(i * rand::random::<f64>())).await;
        let flip = Instant::now();
        failing.store(true, Ordering::SeqCst);
        let before = pd.requests().len();
        let pd_log = pd
            .wait_for("trigger", Duration::from_secs_f64(i * 10.0 + 10.0), |l| {
                l.len() > before
            })
            .await;
        let trig = pd_log[before].clone();
        assert_eq!(trig.json()["event_action"], "trigger");
        let first_bad = first_after(flip, true).expect("a failing request");
        page.push((trig.at - first_bad).as_secs_f64());

        tokio::time::sleep(Duration::from_secs_f64(i * rand::random::<f64>())).await;
        let flip = Instant::now();
        failing.store(false, Ordering::SeqCst);
        let pd_log = pd
            .wait_for(
                "resolve",
                Duration::from_secs_f64(r * 3.0 + i * 10.0 + 10.0),
                |l| l.len() > before + 1,
            )
            .await;
        let res = pd_log[before + 1].clone();
        assert_eq!(res.json()["event_action"], "resolve");
        let first_good = first_after(flip, false).expect("a good request");
        resolve.push((res.at - first_good).as_secs_f64());
        // Duration of a failing attempt, from the target's view (request to retry request).
        let gap = log
            .lock()
            .unwrap()
            .windows(2)
            .find(|w| w[0].1 && w[1].1 && w[1].0 > first_bad)
            .map(|w| w[1].0 - w[0].0);
        if let Some(g) = gap {
            attempt_ms.push((g.as_secs_f64() - d).max(0.0) * 1000.0);
        }
        println!(
            "trial {}: page {:.3} s, resolve {:.3} s (scaled)",
            n + 1,
            page[n],
            resolve[n]
        );
        tokio::time::sleep(Duration::from_secs_f64(i)).await;
    }
    let _ = stop_tx.send(());
    let _ = agent.await;

    let a = if attempt_ms.is_empty() {
        0.0
    } else {
        pct(&mut attempt_ms.clone(), 0.5) / 1000.0
    };
    let pf = page_formula(i, d, a);
    let rf = resolve_formula(i, r, a);
    let mut page_over: Vec<f64> = page.iter().map(|p| (p - pf) * 1000.0).collect();
    let mut res_over: Vec<f64> = resolve.iter().map(|p| (p - rf) * 1000.0).collect();
    println!();
    println!("scale 1/{scale}: interval {i:.3} s, retry_delay {d:.3} s, recovery {r:.3} s, failing attempt ≈ {:.1} ms", a * 1000.0);
    println!(
        "time to page    (scaled): p50 {:.3} s, max {:.3} s; formula (F−1)·I + r·d + (r+1)·a = {pf:.3} s; overhead p50 {:.0} ms, max {:.0} ms",
        pct(&mut page.clone(), 0.5),
        pct(&mut page.clone(), 1.0),
        pct(&mut page_over, 0.5),
        pct(&mut page_over, 1.0)
    );
    println!(
        "time to resolve (scaled): p50 {:.3} s, max {:.3} s; formula max((S−1)·I + a, R − I) = {rf:.3} s; overhead p50 {:.0} ms, max {:.0} ms",
        pct(&mut resolve.clone(), 0.5),
        pct(&mut resolve.clone(), 1.0),
        pct(&mut res_over, 0.5),
        pct(&mut res_over, 1.0)
    );
    println!(
        "production (I = 60 s, retries 1, retry_delay 2 s, F = 2, S = 2, R = 3 m): page ≈ {:.1} s + overhead, resolve ≈ {:.1} s + overhead",
        page_formula(INTERVAL, RETRY_DELAY, a),
        resolve_formula(INTERVAL, RECOVERY, a)
    );
}
