//! Per-location views of a fleet (issue 12): two agents in two locations on a real Postgres
//! cluster, probing one real HTTP target whose answers take 40 ms from `eu` and 200 ms from
//! `us`. `eu` starts first, so it has recorded several times as many runs as `us` when the
//! report is taken: the merged histogram's p50 is an `eu` latency, its p95/p99 are `us`
//! latencies. The report's figures are those of the merged histograms — checked against an
//! HDR histogram built here from the stored runs — with each location's own under its row;
//! `--location` gives one location's. The dashboard of the `eu` agent, in a real headless
//! Chromium, shows both locations' strips, a location selector, and the leader's
//! `locations_disagree` note once `eu`'s path fails. With `WATCHPOST_SCREENSHOTS=<dir>` it
//! saves `dashboard-locations.png` there (docs/dashboard-locations.png).

#[path = "common/browser.rs"]
mod browser;
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/recorder.rs"]
mod recorder;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use browser::Browser;
use fleet::{agent_config, http_probe, logs, now_ms, wait_for, Db, Proc, DB_VAR};
use recorder::{Recorded, Recorder, Reply};
use serde_json::{json, Value};
use watchpost::pipeline::{Options, Pipeline};
use watchpost::store::{codec, db::Pg, hist};

const EU_DELAY: Duration = Duration::from_millis(40);
const US_DELAY: Duration = Duration::from_millis(200);
const STEP: Duration = Duration::from_secs(30);

/// `watchpost report --json` over the fleet's database, with `args`; (exit code, stdout JSON
/// or stderr text).
fn report(cfg: &std::path::Path, url: &str, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .args(["report", "--json", "--window", "1h", "-c"])
        .arg(cfg)
        .args(args)
        .env(DB_VAR, url)
        .env_remove("WATCHPOST_LOG")
        .output()
        .expect("running watchpost report");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(&text).unwrap_or(Value::Null),
        err,
    )
}

/// The stored `total` latencies of series `target` of runs started before `until_ms`, per
/// location, as HDR histograms (µs).
fn stored_totals(url: &str, until_ms: i64) -> BTreeMap<String, hist::Hist> {
    let conn = Pg::new(url, "").unwrap().conn().unwrap();
    let mut out: BTreeMap<String, hist::Hist> = BTreeMap::new();
    conn.query_each(
        "SELECT s.location, s.phases, r.data FROM runs r JOIN series s ON s.id = r.series
         WHERE s.name = 'target' AND r.started_at < ?1",
        [until_ms],
        |r| {
            let phases: Vec<String> = serde_json::from_str(&r.get::<_, String>(1)?).unwrap();
            let total = phases.iter().position(|p| p == "total").unwrap();
            let h = out
                .entry(r.get::<_, String>(0)?)
                .or_insert_with(hist::new_hist);
            codec::decode(r.blob(2), |i, us| {
                if i == total {
                    hist::record(h, us);
                }
            });
            Ok(())
        },
    )
    .unwrap();
    out
}

fn ms(h: &hist::Hist, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Every location's histogram merged.
fn merged(per: &BTreeMap<String, hist::Hist>) -> hist::Hist {
    let mut all = hist::new_hist();
    for h in per.values() {
        all.add(h).unwrap();
    }
    all
}

/// A report row's figures are those of the merged histogram `all`, and each location's
/// under it those of its own (`per`).
fn assert_figures(row: &Value, all: &hist::Hist, per: &BTreeMap<String, hist::Hist>) {
    assert_eq!(row["samples"], json!(all.len()), "{row:#}");
    for (k, q) in [("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)] {
        assert_eq!(row[k].as_f64(), Some(ms(all, q)), "{k}: {row:#}");
    }
    let locs = row["locations"].as_array().unwrap();
    assert_eq!(locs.len(), per.len(), "{row:#}");
    for (l, h) in per {
        let x = locs.iter().find(|x| x["location"] == l.as_str()).unwrap();
        assert_eq!(x["samples"], json!(h.len()), "{x:#}");
        for (k, q) in [("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)] {
            assert_eq!(x[k].as_f64(), Some(ms(h, q)), "{l} {k}: {x:#}");
        }
    }
}

/// The row of `target`/`total` in a report.
fn total_row(r: &Value) -> &Value {
    total_row_of(r, "target")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_wide_figures_merge_locations_and_each_location_has_its_view() {
    let cluster = pg::PgCluster::start();
    let url = cluster.default_url();
    // This test's own process (nextest): the in-process agent reads the URL from here.
    std::env::set_var(DB_VAR, &url);
    let eu_down = Arc::new(AtomicBool::new(false));
    let d = eu_down.clone();
    let target = Recorder::with_default(move |r: &Recorded| {
        if r.path.starts_with("/eu/") {
            let status = if d.load(Ordering::SeqCst) { 503 } else { 200 };
            Reply::status(status).delay(EU_DELAY)
        } else {
            Reply::status(200).delay(US_DELAY)
        }
    })
    .await;
    let root = tempfile::tempdir().unwrap();
    let extra = "[[component]]\nname = \"Target\"\nprobes = [\"target\"]\nfailure_threshold = 2\n";
    let timing = "heartbeat = \"500ms\", lease = \"2s\"";
    let (eu_dir, us_dir) = (root.path().join("eu"), root.path().join("us"));
    // One interval everywhere: the leader judges a location by two of its intervals.
    for (dir, l) in [(&eu_dir, "eu"), (&us_dir, "us")] {
        http_probe(dir, "target", &format!("{}/{l}/health", target.url()), "1s");
    }
    let eu_cfg = agent_config(&eu_dir, "eu1", "eu", timing, extra);
    let us_cfg = agent_config(&us_dir, "us1", "us", timing, extra);
    // eu runs here, serving the dashboard.
    let cfg = match watchpost::config::load(&eu_cfg) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("eu config: {e}"),
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let t0 = now_ms();
    let eu = Pipeline::start(
        cfg.clone(),
        Options {
            listener: Some(l),
            ..Options::default()
        },
    )
    .unwrap();
    let db = Db::open(&url);
    let count = |l: &str| db.runs_since(t0).iter().filter(|r| r.location == l).count();
    wait_for(
        "12 runs from eu",
        Duration::from_secs(60),
        || (count("eu") >= 12).then_some(()),
        String::new,
    )
    .await;
    let mut us = Proc::start("us1", &us_cfg, &url);
    let ctx = || logs(&[&us]);
    wait_for(
        "3 runs from us",
        Duration::from_secs(60),
        || (count("us") >= 3).then_some(()),
        ctx,
    )
    .await;

    // The fleet-wide report of the runs started so far (read once they are all stored).
    let until = now_ms();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let stored = stored_totals(&url, until);
    let all = merged(&stored);
    let (eu_h, us_h) = (&stored["eu"], &stored["us"]);
    // eu holds most of the samples, us more than one in ten.
    assert!(
        eu_h.len() * 10 >= all.len() * 6 && us_h.len() * 10 >= all.len(),
        "eu {} us {}",
        eu_h.len(),
        us_h.len()
    );
    let conn = Pg::new(&url, "").unwrap().conn().unwrap();
    let window = Duration::from_millis((until - t0 + 60_000) as u64);
    let r = watchpost::report::build(&cfg, &conn, window, until).unwrap();
    let r = serde_json::to_value(&r).unwrap();
    assert_eq!(r["locations"], json!(["eu", "us"]));
    let row = total_row(&r);
    assert_figures(row, &all, &stored);
    // p50 is one of eu's answers, p95 and p99 are us's.
    let range = |h: &hist::Hist, lo: f64| lo..ms(h, 1.0) + 0.1;
    let p = |k: &str| row[k].as_f64().unwrap();
    assert!(
        range(eu_h, 40.0).contains(&p("p50_ms")),
        "p50 in eu's range: {row:#}"
    );
    assert!(
        range(us_h, 200.0).contains(&p("p95_ms")) && range(us_h, 200.0).contains(&p("p99_ms")),
        "p95/p99 in us's range: {row:#}"
    );
    let runs = |l: &str| {
        row["locations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["location"] == l)
            .unwrap()["runs"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(row["runs"].as_u64().unwrap(), runs("eu") + runs("us"));
    let one = watchpost::report::build_for(&cfg, &conn, window, until, Some("us")).unwrap();
    let one = serde_json::to_value(&one).unwrap();
    let row = total_row(&one);
    assert_eq!(one["location"], "us");
    assert_eq!(row["p50_ms"].as_f64(), Some(ms(us_h, 0.5)), "{row:#}");
    assert_eq!(row["samples"], json!(us_h.len()));
    assert!(row.get("locations").is_none(), "{row:#}");
    drop(conn);

    // The dashboard of eu: both locations under the probe, and a selector.
    let mut b = Browser::launch().await;
    b.goto(&format!("{base}/")).await;
    b.until(
        "both locations' strips",
        "[...document.querySelectorAll('[data-probe=\"target\"] .locrow')].map(e => e.dataset.location).join() === 'eu,us' \
         && [...document.querySelectorAll('[data-probe=\"target\"] .locrow')].every(e => e.querySelectorAll('.strip rect[data-outcome=\"up\"]').length >= 3)",
        STEP,
    )
    .await;
    let buttons = b
        .eval("[...document.querySelectorAll('#loc button')].map(e => e.textContent)")
        .await;
    assert_eq!(buttons, json!(["all locations", "eu", "us"]));
    b.until(
        "the fleet-wide chart's points",
        "[...document.querySelectorAll('[data-chart=\"target\"] polyline')].some(p => +p.dataset.points > 0)",
        STEP,
    )
    .await;

    // eu's path fails: the leader notes the disagreement (no incident: one location of
    // two is not a majority); the page flags the component and the probe.
    eu_down.store(true, Ordering::SeqCst);
    b.until(
        "the disagreement on the page",
        "document.querySelector('[data-component=\"Target\"]').dataset.disagree === '1' \
         && document.querySelector('[data-probe=\"target\"]').dataset.disagree === '1'",
        STEP,
    )
    .await;
    let note = b
        .eval("document.querySelector('[data-component=\"Target\"] .disagree').textContent")
        .await;
    let note = note.as_str().unwrap();
    assert!(
        note.contains("eu sees it down") && note.contains("us sees it up"),
        "{note}"
    );
    b.until(
        "eu's strip shows the failure",
        "document.querySelector('[data-probe=\"target\"] .locrow[data-location=\"eu\"]').dataset.outcome === 'down'",
        STEP,
    )
    .await;
    b.screenshot("dashboard-locations.png").await;

    // One location's view.
    b.eval("document.querySelector('#loc button[data-l=\"us\"]').click()")
        .await;
    b.until(
        "us alone",
        "[...document.querySelectorAll('[data-probe=\"target\"] .locrow')].map(e => e.dataset.location).join() === 'us' \
         && document.querySelector('[data-probe=\"target\"]').dataset.outcome === 'up'",
        STEP,
    )
    .await;
    let api: Value = reqwest::get(format!(
        "{base}/api/v1/chart?series=target&window=1h&location=us"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let p50s: Vec<f64> = api["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["phases"]["total"][0].as_f64())
        .collect();
    assert!(!p50s.is_empty(), "{api:#}");
    assert!(p50s.iter().all(|v| *v >= 200.0), "us chart: {p50s:?}");
    // The report route: one location's, and 404 for one that recorded nothing.
    let one: Value = reqwest::get(format!("{base}/api/v1/report?window=1h&location=us"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["location"], "us", "{one:#}");
    let none = reqwest::get(format!("{base}/api/v1/report?window=1h&location=mars"))
        .await
        .unwrap();
    assert_eq!(none.status(), 404);
    assert!(b.errors.is_empty(), "console errors: {:#?}", b.errors);
    b.close().await;
    eu.stop().await.unwrap();
    us.sigkill();

    // The command, on everything stored: the merged figures with each location's.
    let stored = stored_totals(&url, i64::MAX);
    let (code, r, err) = report(&eu_cfg, &url, &[]);
    assert_eq!(code, 0, "{err}");
    let row = total_row(&r);
    assert_figures(row, &merged(&stored), &stored);
    let locs = row["locations"].as_array().unwrap();
    let (eu_row, us_row) = (&locs[0], &locs[1]);
    assert_eq!(
        (&eu_row["location"], &us_row["location"]),
        (&json!("eu"), &json!("us"))
    );
    assert!(eu_row["p50_ms"].as_f64().unwrap() < 200.0, "{eu_row:#}");
    assert!(us_row["p50_ms"].as_f64().unwrap() >= 200.0, "{us_row:#}");
    assert!(
        eu_row["availability_pct"].as_f64().unwrap() < 100.0,
        "eu saw the failure: {eu_row:#}"
    );
    assert_eq!(us_row["availability_pct"].as_f64(), Some(100.0));
    // One location's view: its figures alone, no breakdown.
    let (code, r, err) = report(&eu_cfg, &url, &["--location", "us"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["location"], "us");
    let row = total_row(&r);
    assert_eq!(
        row["p50_ms"].as_f64(),
        Some(ms(&stored["us"], 0.5)),
        "{row:#}"
    );
    assert!(row.get("locations").is_none(), "{row:#}");
    // The table: the merged row, a line per location under it.
    let out = Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .args(["report", "--window", "1h", "-c"])
        .arg(&eu_cfg)
        .env(DB_VAR, &url)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("fleet-wide: the histograms of 2 locations merged (eu, us)")
            && table.contains("  @ eu")
            && table.contains("  @ us"),
        "{table}"
    );
    // A location that recorded nothing is a usage error.
    let (code, _, err) = report(&eu_cfg, &url, &["--location", "mars"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("no runs recorded from location \"mars\" (locations: eu, us)"),
        "{err}"
    );
}

/// A run of `api` at `ms` whose `total` took `total_ms`.
fn api_run(ms: i64, total_ms: u64) -> watchpost::probe::RunResult {
    use chrono::TimeZone;
    watchpost::probe::RunResult {
        probe: "api".into(),
        kind: "http",
        started_at: chrono::Utc.timestamp_millis_opt(ms).unwrap(),
        duration: Duration::from_millis(total_ms),
        lag: None,
        outcome: watchpost::probe::Outcome::Up,
        error: None,
        phases: vec![("total".into(), Duration::from_millis(total_ms))],
        details: Default::default(),
        subchecks: vec![],
    }
}

/// Known data, each location's read its own way: `eu`'s three hours of runs are rolled up
/// into hourly rows and partly pruned (its bookkeeping says so), `us` has only fresh runs.
/// The fleet-wide row is exactly the merge of every value recorded, each location's row
/// exactly its own values, and one location's report reads only its own series.
#[tokio::test]
async fn fleet_report_merges_each_locations_histograms_exactly() {
    use watchpost::config::{Dur, Retention};
    use watchpost::store::{Store, Target};
    let cluster = pg::PgCluster::start();
    let url = cluster.default_url();
    let open = |l: &str| Store::open(Target::Postgres(Pg::new(&url, l).unwrap())).unwrap();
    let (eu, eu_w) = open("eu");
    let (us, us_w) = open("us");
    let hour = 1_800_000_000_000 / 3_600_000 * 3_600_000;
    let (mut eu_h, mut us_h) = (hist::new_hist(), hist::new_hist());
    for m in 0..180i64 {
        let v = 40 + (m % 10) as u64;
        eu.record(api_run(hour + m * 60_000 + 5_000, v)).await;
        hist::record(&mut eu_h, v * 1000);
    }
    for k in 0..20i64 {
        let v = 200 + k as u64;
        us.record(api_run(hour + 4 * 3_600_000 + k * 60_000, v))
            .await;
        hist::record(&mut us_h, v * 1000);
    }
    eu.flush().await.unwrap();
    us.flush().await.unwrap();
    let now = hour + 5 * 3_600_000;
    // eu: every finished hour rolled up, its first hour of runs pruned, latency older than
    // 3.5 h read from hourly rows.
    let keep = Retention {
        runs: Dur(Duration::from_secs(4 * 3600)),
        minute_histograms: Dur(Duration::from_secs(3 * 3600 + 1800)),
        hourly_histograms: Dur(Duration::from_secs(400 * 86400)),
    };
    let stats = eu.maintain(now, &keep).await.unwrap();
    assert_eq!(
        (stats.rolled_hours, stats.pruned_runs),
        (3, 60),
        "{stats:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("probes")).unwrap();
    std::fs::write(
        dir.path().join("probes/api.toml"),
        "name = \"api\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/\"\n[budget]\ntotal = { p95 = \"100ms\" }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("watchpost.toml"),
        "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n\
         [[component]]\nname = \"API\"\nprobes = [\"api\"]\nobjective = \"99%\"\n",
    )
    .unwrap();
    let cfg = watchpost::config::load(&dir.path().join("watchpost.toml")).unwrap();
    let conn = eu.reader().unwrap();
    let window = Duration::from_secs(5 * 3600);
    let r =
        serde_json::to_value(watchpost::report::build(&cfg, &conn, window, now).unwrap()).unwrap();
    let mut all = eu_h.clone();
    all.add(&us_h).unwrap();
    let per = BTreeMap::from([
        ("eu".to_string(), eu_h.clone()),
        ("us".to_string(), us_h.clone()),
    ]);
    let row = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["series"] == "api" && x["phase"] == "total")
        .unwrap();
    assert_figures(row, &all, &per);
    assert_eq!(row["runs"], 200);
    assert_eq!(row["max_ms"].as_f64(), Some(ms(&all, 1.0)));
    // 180 of 200 answers are eu's: p50 is one of them, p95 and p99 are us's.
    assert!(
        (40.0..50.0).contains(&row["p50_ms"].as_f64().unwrap()),
        "{row:#}"
    );
    assert!(row["p95_ms"].as_f64().unwrap() >= 200.0, "{row:#}");
    // Judged against the budget as merged (us's p95 is over, eu's is not).
    assert_eq!(row["verdict"], "over");
    let verdicts: Vec<&Value> = row["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| &x["verdict"])
        .collect();
    assert_eq!(verdicts, [&json!("ok"), &json!("over")]);
    assert_eq!(
        r["components"][0]["runs"], 200,
        "every location's runs count"
    );
    // The dashboard's SLO figures count every location's runs too (or the ones given).
    let comp = &cfg.components[0];
    let locations = watchpost::store::locations(&conn).unwrap();
    let slo = watchpost::slo::component_slo_in(&conn, comp, now, None, &locations).unwrap();
    assert_eq!(slo.shares.runs, 200);
    let eu_only = ["eu".to_string()];
    let slo = watchpost::slo::component_slo_in(&conn, comp, now, None, &eu_only).unwrap();
    assert_eq!(slo.shares.runs, 180);
    // Reading as each location left the connection reading its own.
    assert_eq!(conn.location(), "eu");

    // One location: its values alone, from the runs and hourly rows of its series only.
    for (l, h) in &per {
        let one = watchpost::report::build_for(&cfg, &conn, window, now, Some(l)).unwrap();
        let one = serde_json::to_value(one).unwrap();
        let row = total_row_of(&one, "api");
        assert_eq!(row["samples"], json!(h.len()), "{l}: {row:#}");
        for (k, q) in [("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)] {
            assert_eq!(row[k].as_f64(), Some(ms(h, q)), "{l} {k}: {row:#}");
        }
        assert!(row.get("locations").is_none());
    }
    // Every output format shows the view.
    let r = watchpost::report::build(&cfg, &conn, window, now).unwrap();
    let md = watchpost::report::render_markdown(&r);
    assert!(
        md.contains("### Per location") && md.contains("| api | total | us | 20 |"),
        "{md}"
    );
    let html = watchpost::report::render_html(&r);
    assert!(html.contains("<h2>Per location</h2>") && html.contains("data-location=\"eu\""));
    let csv = watchpost::report::render_csv(&r);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].ends_with(",location"), "{csv}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("api,total,20,") && l.ends_with(",us")),
        "{csv}"
    );
    drop(conn);
    drop((eu, us));
    eu_w.join().await;
    us_w.join().await;
}

/// The row of `series`/`total` in a report.
fn total_row_of<'r>(r: &'r Value, series: &str) -> &'r Value {
    r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["series"] == series && x["phase"] == "total")
        .unwrap_or_else(|| panic!("no {series}/total row: {r:#}"))
}
