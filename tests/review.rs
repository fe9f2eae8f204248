//! The latency-budget review against known data: runs written through the real store (synthetic
//! where real time would take hours), then `report::build` and its renderings checked figure by
//! figure: percentiles of a fixed delay, availability with degraded and down runs and a
//! maintenance window, the error budget and burn rate of an objective, time to detect and to
//! page of an incident, the previous window and the trend. Plus the config keys of objectives
//! and sub-check budgets, with their errors at the key.

mod common;
mod notify_harness;
#[path = "common/recorder.rs"]
mod recorder;

use std::time::Duration;

use chrono::{TimeZone, Utc};
use common::http::TestConfig;
use serde_json::Value;
use watchpost::probe::{ErrorClass, ErrorInfo, Outcome, RunResult, SubCheck};
use watchpost::report::{self, Format};
use watchpost::store::Store;

const MIN: i64 = 60_000;

fn run_at(ms: i64, total_ms: u64, outcome: Outcome) -> RunResult {
    RunResult {
        probe: "api".into(),
        kind: "http",
        started_at: Utc.timestamp_millis_opt(ms).unwrap(),
        duration: Duration::from_millis(total_ms),
        lag: None,
        outcome,
        error: (outcome == Outcome::Down).then(|| ErrorInfo {
            class: ErrorClass::HttpStatus,
            message: "HTTP 503".into(),
        }),
        phases: vec![
            ("ttfb".into(), Duration::from_millis(total_ms / 2)),
            ("total".into(), Duration::from_millis(total_ms)),
        ],
        details: Default::default(),
        subchecks: vec![SubCheck {
            series: "api/checks.db".into(),
            outcome: Outcome::Up,
            latency: Some(Duration::from_millis(3)),
            error: None,
        }],
    }
}

fn config() -> TestConfig {
    let t = TestConfig::empty();
    t.write(
        "watchpost.toml",
        "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n\
         [[component]]\nname = \"API\"\nprobes = [\"api\"]\nobjective = \"90%\"\n",
    );
    t.write(
        "probes/api.toml",
        "name = \"api\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/health\"\nsubchecks = \"checks\"\n\n\
         [budget]\ntotal = { p95 = \"100ms\" }\n\"checks.db\" = { p95 = \"2ms\" }\n",
    );
    t
}

fn close(a: Option<f64>, b: f64, tol: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() <= tol)
}

/// 100 minutes of one run a minute: 120 ms each, runs 40–44 down (an outage), 60–62 degraded,
/// 90–94 down inside a maintenance window; the 100 minutes before that at 60 ms, all up.
#[tokio::test]
async fn report_figures_match_the_known_runs() {
    let t = config();
    let cfg = t.load_ok();
    let (s, writer) = Store::start(&cfg.db_path()).unwrap();
    let now = Utc::now().timestamp_millis() / MIN * MIN;
    let start = now - 100 * MIN;
    let at = |i: i64| start + i * MIN;
    for i in 0..100 {
        s.record(run_at(at(i) - 100 * MIN, 60, Outcome::Up)).await;
        let outcome = match i {
            40..=44 | 90..=94 => Outcome::Down,
            60..=62 => Outcome::Degraded,
            _ => Outcome::Up,
        };
        s.record(run_at(at(i), 120, outcome)).await;
    }
    // The incident the outage opened (second bad run + 0.5 s), paged 2 s later, resolved
    // after two good runs; the maintenance window around runs 90–94.
    let (opened, paged, resolved) = (at(41) + 500, at(41) + 2500, at(46) + 1000);
    let (m0, m1) = (at(90) - 1000, at(95) - 1000);
    s.write(move |c| {
        c.execute(
            "INSERT INTO incidents (id, component, status, worst_status, opened_at, resolved_at, cause_member, cause_class, cause_message)
             VALUES (1, 'API', 'resolved', 'major_outage', ?1, ?2, 'api', 'http_status', 'HTTP 503')",
            [opened, resolved],
        )?;
        c.execute(
            "INSERT INTO outbox (notifier, component, incident_id, kind, event, created_at, status, attempts, next_attempt_at, finished_at)
             VALUES ('pager', 'API', 1, 'opened', '{}', ?1, 'delivered', 1, ?1, ?2)",
            [opened, paged],
        )?;
        for (at, kind, from, to) in [
            (m0, "maintenance_started", "operational", "maintenance"),
            (m1, "maintenance_ended", "maintenance", "operational"),
        ] {
            c.execute(
                "INSERT INTO incident_events (component, at, kind, from_status, to_status) VALUES ('API', ?1, ?2, ?3, ?4)",
                watchpost::store::db::params![at, kind, from, to],
            )?;
        }
        Ok(())
    })
    .await
    .unwrap();
    s.flush().await.unwrap();
    let c = s.reader().unwrap();
    let r = report::build(&cfg, &c, Duration::from_secs(100 * 60), now).unwrap();

    let row = r
        .rows
        .iter()
        .find(|r| r.series == "api" && r.phase == "total")
        .unwrap_or_else(|| panic!("no api/total row: {:#?}", r.rows));
    assert_eq!(row.runs, 100);
    assert!(close(row.p50_ms, 120.0, 0.1), "{row:?}");
    assert!(close(row.p99_ms, 120.0, 0.1), "{row:?}");
    assert!(close(row.availability_pct, 90.0, 1e-9), "{row:?}");
    assert!(close(row.up_pct, 87.0, 1e-9), "{row:?}");
    assert!(close(row.degraded_pct, 3.0, 1e-9), "{row:?}");
    assert!(close(row.down_pct, 10.0, 1e-9), "{row:?}");
    assert_eq!(row.verdict, "over", "120 ms against a 100 ms p95 budget");
    // The previous window: 60 ms, all up; p95 doubled.
    assert_eq!(row.previous.runs, 100);
    assert!(close(row.previous.p50_ms, 60.0, 0.1), "{:?}", row.previous);
    assert!(close(row.previous.availability_pct, 100.0, 1e-9));
    assert_eq!(row.previous.verdict, "ok");
    assert!(close(row.change.p95_pct, 100.0, 0.5), "{:?}", row.change);
    assert_eq!(row.change.direction, "worse");
    // 100 minutes in 5-minute buckets; the outage's bucket (runs 40–44) is all down.
    assert_eq!(r.bucket, "5m");
    assert_eq!(row.trend.len(), 20);
    assert!(row.trend.iter().all(|p| p.runs == 5), "{:?}", row.trend);
    assert_eq!(row.trend[8].availability_pct, Some(0.0));
    assert_eq!(row.trend[0].availability_pct, Some(100.0));
    assert!(close(row.trend[3].p50_ms, 120.0, 0.1));
    // The worst regression comes first.
    assert_eq!(r.rows[0].verdict, "over");

    // The sub-check has its own budget, from the `[budget] "checks.db"` key: 3 ms > 2 ms.
    let sub = r.rows.iter().find(|r| r.series == "api/checks.db").unwrap();
    assert_eq!(sub.phase, "latency");
    assert_eq!(sub.verdict, "over", "{sub:?}");
    assert!(close(sub.budget.as_ref().unwrap().p95_ms, 2.0, 1e-9));

    // The component leaves the maintenance window out: 95 runs, 5 down, 3 degraded.
    let comp = &r.components[0];
    assert_eq!(comp.component, "API");
    assert_eq!(comp.objective.as_deref(), Some("90%"));
    assert_eq!(comp.window.runs, 95);
    assert!(
        close(comp.window.availability_pct, 90.0 / 0.95, 1e-9),
        "{comp:?}"
    );
    assert!(close(comp.window.degraded_pct, 300.0 / 95.0, 1e-9));
    // Burn: 5/95 down against a 10 % budget.
    assert!(close(comp.burn_rate, (5.0 / 95.0) / 0.1, 1e-9), "{comp:?}");
    // Over the 30-day SLO window: 195 runs, 5 down → 1 − (5/195)/0.1 of the budget left.
    assert!(
        close(
            comp.error_budget_remaining_pct,
            100.0 * (1.0 - (5.0 / 195.0) / 0.1),
            1e-6
        ),
        "{comp:?}"
    );
    assert_eq!(comp.incidents, 1);
    assert_eq!(comp.trend.len(), 20);
    assert_eq!(comp.trend[18].runs, 0, "maintenance bucket left out");

    // The incident: detected 60.5 s after its first bad run, paged 62.5 s after it.
    let inc = &r.incidents[0];
    assert_eq!(inc.time_to_detect_s, Some(60.5));
    assert_eq!(inc.time_to_page_s, Some(62.5));
    assert_eq!(inc.duration_s, (resolved - opened) as f64 / 1000.0);
    assert!(r.rehearsals.is_empty());

    // JSON: today's row keys stay, trend and previous join them; the top level gains
    // components, incidents and rehearsals.
    let j: Value = serde_json::from_str(&report::render(&r, Format::Json).unwrap()).unwrap();
    for k in [
        "window",
        "since",
        "until",
        "rows",
        "components",
        "incidents",
        "rehearsals",
    ] {
        assert!(j.get(k).is_some(), "missing {k}");
    }
    let row0 = &j["rows"][0];
    for k in [
        "series",
        "phase",
        "runs",
        "availability_pct",
        "samples",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "budget",
        "verdict",
        "over",
        "trend",
        "previous",
    ] {
        assert!(row0.get(k).is_some(), "row lacks {k}: {row0}");
    }
    assert_eq!(j["rehearsals"], Value::Array(vec![]));

    // CSV: a header and one line per row.
    let csv = report::render(&r, Format::Csv).unwrap();
    assert_eq!(csv.lines().count(), r.rows.len() + 1);
    assert!(csv.starts_with("series,phase,runs,availability_pct"));
    assert!(
        csv.contains("api,total,100,90.000,87.000,3.000,10.000,"),
        "{csv}"
    );
    // Markdown: tables to paste.
    let md = report::render(&r, Format::Markdown).unwrap();
    assert!(md.contains("| API | 90% | 94.74% |"), "{md}");
    assert!(md.contains("| 1 | API | major_outage |"), "{md}");
    // HTML: self-contained, charts with their points, the budget line, incident spans.
    let html = report::render(&r, Format::Html).unwrap();
    assert!(
        !html.contains("src=") && !html.contains("href=\"http"),
        "external reference"
    );
    assert!(
        html.contains("class=\"p95\" data-points=\"20\""),
        "p95 line with 20 points"
    );
    assert!(html.contains("class=\"budget\""));
    assert!(html.contains("class=\"incident\""));
    assert!(html.contains("@media print"));
    let table = report::render(&r, Format::Table).unwrap();
    assert!(table.contains("OVER: p95"), "{table}");

    // Rehearsals the agent recorded in the window appear.
    s.write(move |c| {
        c.execute_batch(&format!(
            "INSERT INTO rehearsals (rehearsal_id, name, file, origin, started_at, status, passed)
             VALUES ('1', 'drill', 'rehearsals/d.toml', 'api', {}, 'passed', 1),
                    ('2', 'old', 'rehearsals/o.toml', 'api', {}, 'failed', 0);",
            now - 10 * MIN,
            now - 300 * MIN
        ))
    })
    .await
    .unwrap();
    let c = s.reader().unwrap();
    let r = report::build(&cfg, &c, Duration::from_secs(100 * 60), now).unwrap();
    assert_eq!(r.rehearsals.len(), 1, "{:?}", r.rehearsals);
    assert_eq!(r.rehearsals[0]["name"], "drill");
    drop(c);
    drop(s);
    writer.join().await;
}

fn errors(t: &TestConfig) -> String {
    match t.load() {
        Ok(_) => panic!("config should be rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn objective_and_budget_keys_are_checked_at_their_position() {
    let t = config();
    let c = t.load_ok();
    let comp = &c.components[0];
    assert_eq!(comp.objective().unwrap().to_string(), "90%");
    assert_eq!(comp.slo_window.0, Duration::from_secs(30 * 86400));
    assert!(!comp.burn_alert());

    t.write(
        "watchpost.toml",
        "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n\
         [[component]]\nname = \"API\"\nprobes = [\"api\"]\nobjective = \"100.5%\"\n",
    );
    let e = errors(&t);
    assert!(
        e.contains("watchpost.toml:9:13: invalid objective \"100.5%\""),
        "{e}"
    );

    t.write(
        "watchpost.toml",
        "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n\
         [[component]]\nname = \"API\"\nprobes = [\"api\"]\nburn_alert = true\nslo_window = \"10m\"\n",
    );
    let e = errors(&t);
    assert!(
        e.contains("watchpost.toml:9:14: burn_alert needs an objective"),
        "{e}"
    );
    assert!(
        e.contains("watchpost.toml:10:14: slo_window 10m is shorter than 1h"),
        "{e}"
    );

    // A sub-check key must sit under the probe's `subchecks` path.
    let t = config();
    t.write(
        "probes/api.toml",
        "name = \"api\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/health\"\nsubchecks = \"checks\"\n\n\
         [budget]\n\"other.db\" = { p95 = \"2ms\" }\n",
    );
    let e = errors(&t);
    assert!(
        e.contains("api.toml:7:1: [budget] \"other.db\" is not a phase of a http probe or one of its sub-checks (expected one of: ttfb, total, or a sub-check as \"checks.<name>\")"),
        "{e}"
    );
    // Without `subchecks`, no sub-check key is known.
    t.write(
        "probes/api.toml",
        "name = \"api\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/health\"\n\n[budget]\n\"checks.db\" = { p95 = \"2ms\" }\n",
    );
    let e = errors(&t);
    assert!(
        e.contains("api.toml:6:1: [budget] \"checks.db\" is not a phase of a http probe (expected one of: ttfb, total)"),
        "{e}"
    );
}

/// `burn_alert`: a fast burn pages (major outage) through the evaluator and the outbox like
/// any incident, steps down to a warning (degraded) once the 5-minute window is clean, and
/// resolves when the 30-minute window is clean too. Member streaks alone would never open
/// an incident here (failure_threshold = 1000). Virtual time: an hour and a half of runs.
#[tokio::test(start_paused = true)]
async fn a_fast_error_budget_burn_pages_warns_and_resolves() {
    use notify_harness::*;
    use watchpost::probe::Outcome::{Down, Up};
    let dir = tempfile::tempdir().unwrap();
    let hook = recorder::Recorder::start().await;
    let t = Targets {
        webhook: Some(hook.url()),
        ..Default::default()
    };
    let rules = "failure_threshold = 1000\nsuccess_threshold = 1\nrecovery = \"1s\"\n\
                 objective = \"99%\"\nburn_alert = true";
    let agent = Agent::start(write_config(dir.path(), &t, rules, ""), true).await;
    let step = Duration::from_secs(10);
    let statuses = || -> Vec<(String, String)> {
        let c = agent.store.reader().unwrap();
        let mut st = c
            .prepare(
                "SELECT kind, to_status FROM incident_events WHERE component = 'API' ORDER BY id",
            )
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    // 50 minutes of good runs, then 12 minutes of an outage.
    for _ in 0..300 {
        agent.both(Up).await;
        tokio::time::advance(step).await;
    }
    assert!(statuses().is_empty(), "{:?}", statuses());
    for _ in 0..72 {
        agent.both(Down).await;
        tokio::time::advance(step).await;
    }
    // Under load the evaluator may still be catching up: keep the outage going in 6 s
    // steps (past the burn judgement's 5 s throttle) until it pages.
    let paged = || statuses().iter().any(|s| s.1 == "major_outage");
    let t0 = std::time::Instant::now();
    while !paged() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no page: {:?}",
            statuses()
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        agent.both(Down).await;
        settle(Duration::from_millis(100)).await;
    }
    // 6× over 6 h and 30 m warns first (about 3½ minutes in); 14.4× over 1 h and 5 m pages
    // once the outage has taken 14.4 % of the hour. (Under load the evaluator may judge a run
    // later than it was sent, so only the warning's order before the page is not asserted.)
    let inc = &agent.incident_views(true)[0];
    let cause = inc.cause.as_ref().unwrap();
    assert_eq!(cause.class.as_deref(), Some("error_budget_burn"));
    let page = inc
        .timeline
        .iter()
        .find(|e| e.to == "major_outage")
        .unwrap();
    assert!(
        page.message.as_deref().unwrap().contains("over 1h and")
            && page.message.as_deref().unwrap().contains("over 5m"),
        "{page:?}"
    );
    // The transitions go out through the outbox like any other.
    agent.drained(Duration::from_secs(30)).await;
    assert!(
        agent
            .outbox()
            .iter()
            .any(|r| r.0 == "mitigate" && r.2 == "delivered"),
        "{:?}",
        agent.outbox()
    );
    // Recovery: the 5-minute window clears first (warn: 6 h and 30 m still burn), then the
    // 30-minute one (33 minutes of good runs). Each step lets the writer and evaluator keep
    // pace with virtual time (a loaded machine otherwise judges several steps at once, late,
    // and can pass the warning's whole stretch in one judgement).
    for _ in 0..200 {
        agent.both(Up).await;
        tokio::time::advance(step).await;
        settle(Duration::from_millis(10)).await;
    }
    let resolved = || statuses().iter().any(|s| s.0 == "resolved");
    let t0 = std::time::Instant::now();
    while !resolved() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no resolve: {:?}",
            statuses()
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        agent.both(Up).await;
        settle(Duration::from_millis(100)).await;
    }
    let kinds = statuses();
    let at = |k: &str, to: &str| kinds.iter().position(|s| s.0 == k && s.1 == to);
    let page = kinds.iter().position(|s| s.1 == "major_outage").unwrap();
    let warn = at("deescalated", "degraded").unwrap_or_else(|| panic!("no warning: {kinds:?}"));
    let done = at("resolved", "operational").unwrap();
    assert!(page < warn && warn < done, "{kinds:?}");
    assert_eq!(kinds[0].0, "opened", "{kinds:?}");
    assert_eq!(done, kinds.len() - 1, "{kinds:?}");
    agent.stop().await;
}
