//! The dashboard and the HTML report as a person sees them: a real headless Chromium
//! (Debian's `/usr/bin/chromium`, driven over its DevTools protocol on 127.0.0.1) opens the
//! page of a real agent probing a real HTTP target. Every component and probe is shown, the
//! charts have data points, an outage started in the test appears within one refresh, and the
//! page logs no console error. The HTML report is opened the same way and makes no request.
//!
//! With `WATCHPOST_SCREENSHOTS=<dir>` the test also saves `dashboard.png` and `report.png`
//! there (how the screenshots in docs/ are made).

mod common;
#[path = "common/recorder.rs"]
mod recorder;
#[path = "common/stt.rs"]
mod stt;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{HttpServer, Reply, TestConfig};
use serde_json::{json, Value};
use watchpost::pipeline::{Options, Pipeline};

#[path = "common/browser.rs"]
mod browser;

use browser::Browser;

const STEP: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_report_in_a_real_browser() {
    let outage = Arc::new(AtomicBool::new(false));
    let o = outage.clone();
    let target = HttpServer::start(move |_| {
        if o.load(Ordering::SeqCst) {
            Reply::json(503, r#"{"status":"down"}"#)
        } else {
            Reply::json(
                200,
                r#"{"status":"ok","checks":{"db":{"status":"ok","latency_ms":3}}}"#,
            )
            .delayed(Duration::from_millis(20))
        }
    })
    .await;
    let hook = recorder::Recorder::start().await;
    let t = TestConfig::empty();
    t.write(
        "watchpost.toml",
        &format!("[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n\
         [defaults]\ninterval = \"1s\"\ntimeout = \"900ms\"\nretries = 0\njitter = \"0s\"\n\n\
         [notifier.hook]\nkind = \"webhook\"\nurl = \"{}/hook\"\n\n\
         [[component]]\nname = \"Public API\"\nprobes = [\"api\"]\nfailure_threshold = 1\nobjective = \"99.5%\"\nnotify = [\"hook\"]\n\n\
         [[component]]\nname = \"Database\"\nprobes = [\"api/checks.db\"]\n", hook.url()),
    );
    t.write(
        "probes/api.toml",
        &format!(
            "name = \"api\"\nkind = \"http\"\nurl = \"{}\"\nsubchecks = \"checks\"\n\n[budget]\ntotal = {{ p95 = \"500ms\" }}\n",
            target.url("/health")
        ),
    );
    // A listen probe against a real (in-process) Deepgram-style WebSocket server.
    let stt =
        stt::Server::start(stt::Behavior::Deepgram(stt::Dg::new("Testing, 1 2 3 4 5."))).await;
    let audio = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("probes/audio/testing-one-two-three.wav");
    t.write(
        "probes/listen.toml",
        &format!(
            "name = \"listen\"\nkind = \"listen\"\ndialect = \"deepgram\"\nurl = \"{}\"\n\
             headers = {{ Authorization = \"Token test-key\" }}\naudio = \"{}\"\n\
             interval = \"2s\"\ntimeout = \"1500ms\"\nspeed = 8.0\nfinal_timeout = \"1s\"\n",
            stt.url("/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000&channels=1&interim_results=true"),
            audio.display()
        ),
    );
    let cfg = Arc::new(t.load_ok());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let agent = Pipeline::start(
        cfg.clone(),
        Options {
            listener: Some(l),
            ..Options::default()
        },
    )
    .unwrap();
    let client = reqwest::Client::new();
    let overview = |c: reqwest::Client, base: String| async move {
        c.get(format!("{base}/api/v1/overview"))
            .timeout(STEP)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    // A few runs before the page opens.
    let t0 = Instant::now();
    while overview(client.clone(), base.clone()).await["series"]
        .as_array()
        .is_none_or(|s| s.len() < 2 || s[0]["recent"].as_array().unwrap().len() < 3)
    {
        assert!(t0.elapsed() < STEP, "the agent recorded no runs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut b = Browser::launch().await;
    b.goto(&format!("{base}/")).await;
    b.until(
        "both components",
        "document.querySelectorAll('.component').length === 2",
        STEP,
    )
    .await;
    let names = b
        .eval("[...document.querySelectorAll('.component h3 span:first-child')].map(e => e.textContent)")
        .await;
    assert_eq!(names, json!(["Public API", "Database"]));
    let probes = b
        .eval("[...document.querySelectorAll('.probe')].map(e => e.dataset.probe)")
        .await;
    assert_eq!(probes, json!(["api", "api/checks.db", "listen"]));
    b.until(
        "the latency charts' points",
        "[...document.querySelectorAll('[data-chart] polyline')].filter(p => +p.dataset.points > 0).length >= 2",
        STEP,
    )
    .await;
    let strip = b
        .eval("document.querySelectorAll('[data-probe=\"api\"] .strip rect[data-outcome=\"up\"]').length")
        .await;
    assert!(strip.as_u64().unwrap() >= 3, "uptime strip: {strip}");
    let budget = b
        .eval("document.querySelector('.component').textContent")
        .await;
    assert!(
        budget
            .as_str()
            .unwrap()
            .contains("error budget 100.0% left of 99.5% over 30d"),
        "{budget}"
    );
    // The listen probe's card: its WER, and its phases (connect, first result, final) over
    // time instead of a single latency.
    b.until(
        "the listen probe's WER and phase chart",
        "document.querySelector('[data-probe=\"listen\"]')?.textContent.includes('WER 0.0%') \
         && [...document.querySelectorAll('[data-chart=\"listen\"] polyline')].map(p => p.getAttribute('class')).join() === 'p50 line,p95 line,p99 line' \
         && document.querySelector('[data-chart=\"listen\"]').textContent.includes('first_result p50')",
        STEP,
    )
    .await;
    b.screenshot("dashboard.png").await;

    // The chart window: 24h asks the API for a day of the series and draws it.
    b.eval("document.querySelector('#win [data-w=\"24h\"]').click()")
        .await;
    b.until(
        "the 24h chart",
        "charts['api']?.until_ms - charts['api']?.since_ms === 86400000 \
         && +document.querySelector('[data-chart=\"api\"] polyline')?.dataset.points > 0",
        STEP,
    )
    .await;
    assert!(
        b.requests
            .iter()
            .any(|u| u.contains("/api/v1/chart?series=api&window=24h")),
        "{:?}",
        b.requests
    );

    // The outage: once the agent has recorded a down run, the page shows it within one
    // refresh (5 s), without a reload.
    outage.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    loop {
        let o = overview(client.clone(), base.clone()).await;
        if o["series"][0]["latest"]["outcome"] == "down" {
            break;
        }
        assert!(t0.elapsed() < STEP, "the agent never saw the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = b
        .until(
            "the outage on the page",
            "document.querySelector('[data-probe=\"api\"]').dataset.outcome === 'down' \
             && document.querySelector('[data-probe=\"api\"] .lasterr')?.textContent.includes('http_status')",
            Duration::from_secs(8),
        )
        .await;
    eprintln!("outage shown {took:?} after the agent recorded it");
    b.until(
        "the component's incident",
        "document.querySelector('[data-component=\"Public API\"]').dataset.status === 'major_outage' \
         && [...document.querySelectorAll('.incident h3')].some(h => h.textContent.includes('Public API'))",
        STEP,
    )
    .await;
    // The incident's timeline: its transition, and the webhook's delivery of it.
    b.until(
        "the incident's transition and delivery",
        "[...document.querySelectorAll('.incident .tl b')].some(b => b.textContent.length > 0) \
         && [...document.querySelectorAll('.incident .tl .mute')].some(d => d.textContent.includes('hook') && d.textContent.includes('delivered'))",
        STEP,
    )
    .await;
    b.screenshot("dashboard-outage.png").await;
    let reloads = b
        .eval("performance.getEntriesByType('navigation').length")
        .await;
    assert_eq!(reloads, json!(1), "the page was never reloaded");
    // Dark when the system is, and usable on a phone: nothing wider than its screen.
    let background = "getComputedStyle(document.body).backgroundColor";
    assert_eq!(b.eval(background).await, json!("rgb(255, 255, 255)"));
    let dark = json!({"features": [{"name": "prefers-color-scheme", "value": "dark"}]});
    b.call("Emulation.setEmulatedMedia", dark).await;
    assert_eq!(b.eval(background).await, json!("rgb(13, 17, 23)"));
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
    )
    .await;
    b.until(
        "the page to fit a 390 px screen",
        "window.innerWidth === 390 && document.documentElement.scrollWidth <= 390",
        STEP,
    )
    .await;
    let cards = b
        .eval("[...document.querySelectorAll('.card')].every(c => c.getBoundingClientRect().right <= 390)")
        .await;
    assert_eq!(cards, json!(true), "a card wider than the phone's screen");
    b.screenshot("dashboard-phone-dark.png").await;
    b.call("Emulation.setEmulatedMedia", json!({"features": []}))
        .await;
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
    assert!(b.errors.is_empty(), "console errors: {:#?}", b.errors);

    // The HTML report of the same runs, opened from a file: charts, and no request at all.
    let conn = agent.store.reader().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let r = watchpost::report::build(&cfg, &conn, Duration::from_secs(600), now).unwrap();
    let html = t.write("report.html", &watchpost::report::render_html(&r));
    // Leave the dashboard first: a chart refresh it started just before must not be
    // counted as the report's (the DevTools events come in order, so once the blank page is
    // there every request of the dashboard has been noted).
    b.goto("about:blank").await;
    b.until("the blank page", "location.href === 'about:blank'", STEP)
        .await;
    b.requests.clear();
    b.goto(&format!("file://{}", html.display())).await;
    b.until(
        "the report's charts",
        "document.querySelectorAll('svg polyline').length >= 3 && document.querySelectorAll('svg rect.incident').length >= 1",
        STEP,
    )
    .await;
    b.screenshot("report.png").await;
    let outside: Vec<&String> = b
        .requests
        .iter()
        .filter(|u| !u.starts_with("file://"))
        .collect();
    assert!(outside.is_empty(), "the report requested {outside:?}");
    assert!(b.errors.is_empty(), "console errors: {:#?}", b.errors);
    b.close().await;
    agent.stop().await.unwrap();
}
