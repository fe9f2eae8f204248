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
#[path = "common/smtp.rs"]
mod smtp;

use std::time::Duration;

use chrono::{TimeZone, Utc};
use common::http::TestConfig;
use serde_json::Value;
use smtp::SmtpSink;
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

/// 200 runs a minute apart: 100 up at 60 ms (the previous window), then 100 at 120 ms
/// (`at(0..100)`), down for runs 40–44 and `second`, degraded for 60–62.
async fn record_200(s: &Store, at: impl Fn(i64) -> i64, second: std::ops::RangeInclusive<i64>) {
    for i in 0..100 {
        s.record(run_at(at(i) - 100 * MIN, 60, Outcome::Up)).await;
        let outcome = match i {
            40..=44 => Outcome::Down,
            _ if second.contains(&i) => Outcome::Down,
            60..=62 => Outcome::Degraded,
            _ => Outcome::Up,
        };
        s.record(run_at(at(i), 120, outcome)).await;
    }
}

/// Component API in maintenance over `[m0, m1)`, on its timeline.
fn maintenance(c: &watchpost::store::Conn, m0: i64, m1: i64) -> watchpost::store::db::Result<()> {
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
    record_200(&s, at, 90..=94).await;
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
        maintenance(c, m0, m1)?;
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
    // The trend as sparklines: the component's availability per 5 m (the outage's bucket at
    // the bottom, the maintenance bucket without runs), the row's flat p95.
    assert!(md.contains("availability per 5m"), "{md}");
    assert!(md.contains("`████████▁█████████·█`"), "{md}");
    assert!(md.contains(&format!("`{}`", "▄".repeat(20))), "{md}");
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
    // The component's availability bars: one per bucket with runs (not the maintenance
    // one), the outage's bucket bad, the degraded runs' bucket a warning.
    let bars = |class: &str| html.matches(&format!("<rect class=\"{class}\"")).count();
    assert_eq!(
        (bars("good"), bars("warn"), bars("bad")),
        (17, 1, 1),
        "{html}"
    );
    assert!(html.contains("@media print"));
    let table = report::render(&r, Format::Table).unwrap();
    assert!(table.contains("OVER: p95"), "{table}");
    // The terminal table has the trends too, as sparklines in aligned columns: the
    // component's availability per bucket last, each row's p95 before its verdict.
    let line = |start: &str, has: &str| {
        let l = table
            .lines()
            .find(|l| l.starts_with(start) && l.contains(has));
        l.unwrap_or_else(|| panic!("no line {start:?} with {has:?}: {table}"))
    };
    let col = |l: &str, word: &str| l.find(word).map(|b| l[..b].chars().count());
    let comp_header = line("component ", "availability per 5m");
    let comp_line = line("API ", "90%");
    assert!(comp_line.ends_with("  ████████▁█████████·█"), "{table}");
    assert_eq!(col(comp_header, "availability per"), col(comp_line, "█"));
    let header = line("series ", "p95 per 5m");
    let row_line = line("api ", " total ");
    assert!(
        row_line.contains(&format!("{}  OVER: p95", "▄".repeat(20))),
        "{table}"
    );
    assert_eq!(col(header, "p95 per 5m"), col(row_line, "▄"), "{table}");
    assert_eq!(col(header, "verdict"), col(row_line, "OVER"), "{table}");

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

/// `v` without its `trend` keys, at any depth.
fn without_trends(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("trend");
            m.values_mut().for_each(without_trends);
        }
        Value::Array(a) => a.iter_mut().for_each(without_trends),
        _ => {}
    }
}

/// The report over hours already rolled up, whose runs are packed into `run_hours`: every
/// figure is the one it gave from the runs before the rollup (all but the trend, where an
/// hour read from its outcome row counts whole in the bucket it starts in), and time to
/// detect walks back across the packed hours: one outage all inside a packed hour, one
/// whose first bad runs are packed and the rest still in `runs`. A maintenance window
/// inside a packed hour splits the component's window there.
#[tokio::test]
async fn report_reads_packed_hours_as_it_read_the_runs() {
    const HOUR: i64 = 60 * MIN;
    let t = config();
    let cfg = t.load_ok();
    let (s, writer) = Store::start(&cfg.db_path()).unwrap();
    // A run a minute from 90 minutes before an hour boundary `b` to 10 minutes after it
    // (`now`, in the past): at `now` the hours before `b` roll up and are packed, the last
    // 10 runs stay in `runs`.
    let b = Utc::now().timestamp_millis() / HOUR * HOUR - HOUR;
    let now = b + 10 * MIN;
    let at = move |i: i64| now - 100 * MIN + i * MIN;
    record_200(&s, at, 87..=92).await;
    let (m0, m1) = (at(70) - 1000, at(75) - 1000);
    s.write(move |c| {
        for (id, opened, resolved) in [(1, at(41) + 500, at(46)), (2, at(91) + 500, at(95))] {
            c.execute(
                "INSERT INTO incidents (id, component, status, worst_status, opened_at, resolved_at, cause_member, cause_class, cause_message)
                 VALUES (?1, 'API', 'resolved', 'major_outage', ?2, ?3, 'api', 'http_status', 'HTTP 503')",
                watchpost::store::db::params![id, opened, resolved],
            )?;
        }
        maintenance(c, m0, m1)?;
        Ok(())
    })
    .await
    .unwrap();
    s.flush().await.unwrap();
    let report = |s: &Store| {
        let c = s.reader().unwrap();
        let r = report::build(&cfg, &c, Duration::from_secs(100 * 60), now).unwrap();
        let mut j = serde_json::to_value(&r).unwrap();
        without_trends(&mut j);
        (r, j)
    };
    let (from_runs, before) = report(&s);
    let detect: Vec<(i64, Option<f64>)> = from_runs
        .incidents
        .iter()
        .map(|i| (i.id, i.time_to_detect_s))
        .collect();
    // From the first bad run of each streak: run 40, and run 87 (four minutes before 91).
    assert_eq!(detect, [(1, Some(60.5)), (2, Some(240.5))]);
    assert_eq!(
        from_runs.components[0].window.runs, 95,
        "maintenance left out"
    );

    let stats = s
        .maintain(now, &watchpost::config::Retention::default())
        .await
        .unwrap();
    assert!(stats.rolled_hours >= 2, "{stats:?}");
    let c = s.reader().unwrap();
    let rows = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        rows("SELECT count(*) FROM runs"),
        2 * 10,
        "runs 90-99, two series"
    );
    assert!(rows("SELECT count(*) FROM run_hours") >= 2 * 3);
    drop(c);
    let (packed, after) = report(&s);
    assert_eq!(after, before);
    // The trend's 5-minute buckets count the runs of a rolled-up hour one by one.
    let trends = |r: &report::Report| -> Vec<Vec<(u64, Option<f64>)>> {
        r.rows
            .iter()
            .map(|row| {
                row.trend
                    .iter()
                    .map(|p| (p.runs, p.availability_pct))
                    .collect()
            })
            .chain(r.components.iter().map(|c| {
                c.trend
                    .iter()
                    .map(|p| (p.runs, p.availability_pct))
                    .collect()
            }))
            .collect()
    };
    assert_eq!(trends(&packed), trends(&from_runs));
    assert_eq!(packed.rows.len(), 3, "api ttfb and total, api/checks.db");
    assert!(
        packed.rows.iter().all(|r| r.runs == 100),
        "{:?}",
        packed.rows
    );
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

/// A config with the `api` probe, an e-mail notifier (`team`, to `smtp`), a webhook
/// (`hook`, to `hook_url`), a PagerDuty notifier (`pager`) and the given `[[review]]` tables.
fn review_config(smtp: &str, hook_url: &str, reviews: &str) -> TestConfig {
    let t = config();
    t.write(
        "watchpost.toml",
        &format!(
            "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n\
             [[component]]\nname = \"API\"\nprobes = [\"api\"]\nobjective = \"90%\"\n\n\
             [notifier.team]\nkind = \"email\"\nsmtp_url = \"{smtp}\"\nfrom = \"watchpost <watchpost@example.com>\"\nto = [\"team@example.com\"]\n\n\
             [notifier.hook]\nkind = \"webhook\"\nurl = \"{hook_url}\"\n\
             delivery = {{ retry_initial = \"50ms\", retry_max = \"200ms\", timeout = \"5s\" }}\n\n\
             [notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"WPT_REVIEW_PD_KEY\"\n\n{reviews}"
        ),
    );
    std::env::set_var("WPT_REVIEW_PD_KEY", "pd-key-review");
    t
}

/// Runs of the `api` probe over the last hour, one a minute (runs 20–24 down).
async fn record_an_hour(cfg: &watchpost::config::Config) {
    let (s, writer) = Store::start(&cfg.db_path()).unwrap();
    let now = Utc::now().timestamp_millis() / MIN * MIN;
    for i in 0..60 {
        let outcome = if (20..25).contains(&i) {
            Outcome::Down
        } else {
            Outcome::Up
        };
        s.record(run_at(now - (60 - i) * MIN, 80, outcome)).await;
    }
    s.flush().await.unwrap();
    drop(s);
    writer.join().await;
}

/// The body of the MIME part of `mail` whose Content-Type starts with `ctype`, decoded.
fn part(mail: &str, ctype: &str) -> Option<String> {
    let at = mail.find(&format!("Content-Type: {ctype}"))?;
    let rest = &mail[at..];
    let head_end = rest.find("\r\n\r\n")?;
    let head = rest[..head_end].to_ascii_lowercase();
    let body = &rest[head_end + 4..];
    let body = &body[..body.find("\r\n--").unwrap_or(body.len())];
    if head.contains("base64") {
        use base64::Engine;
        let clean: String = body.split_whitespace().collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(clean)
            .ok()?;
        return String::from_utf8(bytes).ok();
    }
    if !head.contains("quoted-printable") {
        return Some(body.to_string());
    }
    // Quoted-printable: soft line breaks, then =XX bytes.
    let body = body.replace("=\r\n", "");
    let (b, mut bytes, mut i) = (body.as_bytes(), Vec::new(), 0);
    while i < b.len() {
        match (b[i], b.get(i + 1..i + 3)) {
            (b'=', Some(hex)) => {
                bytes.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            (c, _) => {
                bytes.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

/// `watchpost review --now NAME` (the real binary): the e-mail notifier's SMTP server (real
/// aiosmtpd) receives one multipart mail whose HTML part is the report and whose text part
/// is the summary; the webhook receives the JSON report, limited to the review's components.
#[tokio::test]
async fn a_review_is_mailed_as_html_with_a_text_summary_and_posted_as_json() {
    let smtp = SmtpSink::start(None, false);
    let hook = recorder::Recorder::start().await;
    let t = review_config(
        &smtp.url(),
        &format!("{}/review", hook.url()),
        "[[review]]\nname = \"weekly\"\nschedule = \"0 9 * * MON\"\nwindow = \"2h\"\n\
         notify = [\"team\", \"hook\"]\ncomponents = [\"API\"]\ntitle = \"Weekly API review\"\n",
    );
    let cfg = t.load_ok();
    record_an_hour(&cfg).await;

    let cli = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_watchpost"));
        c.arg("-c").arg(t.path("watchpost.toml")).args(args);
        // Off the runtime's thread: the recorder answers on it.
        tokio::task::spawn_blocking(move || c.output().unwrap())
    };
    let out = cli(&["review", "--now", "weekly"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("team: mailed the review to team@example.com"),
        "{stdout}"
    );
    assert!(stdout.contains("hook: posted the review"), "{stdout}");

    let mails = smtp.wait_mails(1, Duration::from_secs(10)).await;
    assert_eq!(mails.len(), 1);
    let m = &mails[0].raw;
    assert_eq!(
        mails[0].header("subject").as_deref(),
        Some("Weekly API review")
    );
    assert!(
        mails[0]
            .header("content-type")
            .is_some_and(|c| c.starts_with("multipart/alternative")),
        "{m}"
    );
    let html = part(m, "text/html").unwrap_or_else(|| panic!("no HTML part: {m}"));
    assert!(html.contains("<h1>Weekly API review</h1>"), "{html}");
    assert!(html.contains("Latency budget review"), "{html}");
    assert!(html.contains("<svg"), "charts inline: {html}");
    let text = part(m, "text/plain").unwrap_or_else(|| panic!("no text part: {m}"));
    assert!(text.contains("Weekly API review"), "{text}");
    // 55 of 60 runs up in the window: the component's availability in words.
    assert!(text.contains("- API: availability 91.667%"), "{text}");
    assert!(text.contains("error budget"), "{text}");

    let posted = hook.wait_ok("the review", 1, Duration::from_secs(10)).await;
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0].header("x-watchpost-event"), Some("review"));
    let j = posted[0].json();
    assert_eq!(j["review"], "weekly");
    assert_eq!(j["title"], "Weekly API review");
    assert_eq!(j["report"]["window"], "2h");
    assert_eq!(j["report"]["components"][0]["component"], "API");
    let series: Vec<&str> = j["report"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["series"].as_str().unwrap())
        .collect();
    assert!(series.contains(&"api"), "{series:?}");

    // Without --now: when it goes next.
    let out = cli(&["review", "weekly"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("weekly: 0 9 * * MON"), "{stdout}");
    assert!(stdout.contains("next at"), "{stdout}");
}

/// The daemon sends a review whose slot came while it was down (once, on start), arms a
/// new review without sending it, and after a restart sends neither again.
#[tokio::test]
async fn the_daemon_sends_a_missed_review_once_and_not_again_after_a_restart() {
    let smtp = SmtpSink::start(None, false);
    let hook = recorder::Recorder::start().await;
    // Daily at the minute an hour ago: its last slot has passed, the next is 23 h away.
    let slot = Utc::now() - chrono::Duration::hours(1);
    let schedule = format!(
        "{} {} * * *",
        chrono::Timelike::minute(&slot),
        chrono::Timelike::hour(&slot)
    );
    let t = review_config(
        &smtp.url(),
        &format!("{}/review", hook.url()),
        &format!(
            "[[review]]\nname = \"daily\"\nschedule = \"{schedule}\"\nnotify = [\"hook\"]\n\n\
             [[review]]\nname = \"fresh\"\nschedule = \"{schedule}\"\nnotify = [\"hook\"]\n"
        ),
    );
    let cfg = std::sync::Arc::new(t.load_ok());
    record_an_hour(&cfg).await;
    // "daily" was last sent two days ago; "fresh" never ran.
    {
        let (s, writer) = Store::start(&cfg.db_path()).unwrap();
        let two_days_ago = Utc::now().timestamp_millis() - 2 * 86_400_000;
        s.write(move |c| {
            c.execute(
                "INSERT INTO review_marks (review, notifier, slot, sent_at) VALUES ('daily', 'hook', ?1, ?1)",
                [two_days_ago],
            )?;
            Ok(())
        })
        .await
        .unwrap();
        drop(s);
        writer.join().await;
    }
    let marks = |cfg: &watchpost::config::Config| -> Vec<(String, i64)> {
        let c = watchpost::store::Target::of(cfg)
            .unwrap()
            .reader()
            .unwrap()
            .unwrap();
        let mut st = c
            .prepare("SELECT review, slot FROM review_marks ORDER BY review")
            .unwrap();
        st.query_map(watchpost::store::db::params![], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    };

    let agent = notify_harness::Agent::start(cfg.clone(), true).await;
    let posted = hook
        .wait_ok("the missed review", 1, Duration::from_secs(15))
        .await;
    let j = posted[0].json();
    assert_eq!(j["review"], "daily");
    let want_slot = watchpost::cron::Schedule::parse(&schedule)
        .unwrap()
        .last_at_or_before(Utc::now())
        .unwrap();
    assert_eq!(
        j["slot"],
        want_slot.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    // Marked as sent for that slot; "fresh" armed (now), not sent.
    let t0 = std::time::Instant::now();
    loop {
        let m = marks(&cfg);
        if m.len() == 2 && m[0].1 == want_slot.timestamp_millis() {
            assert!(m[1].1 > want_slot.timestamp_millis(), "{m:?}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "marks: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.stop().await;

    let agent = notify_harness::Agent::start(cfg.clone(), true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.stop().await;
    let all = hook.requests();
    assert_eq!(all.len(), 1, "sent again after a restart: {all:?}");
}

#[test]
fn review_keys_are_checked_at_their_position() {
    let t = review_config(
        "smtp://127.0.0.1:25",
        "http://127.0.0.1:9/review",
        "[[review]]\nname = \"weekly\"\nschedule = \"every monday\"\nnotify = [\"team\", \"pager\", \"nope\"]\ncomponents = [\"Billing\"]\nwindow = \"10s\"\n",
    );
    let e = errors(&t);
    let line = |key: &str| {
        std::fs::read_to_string(t.path("watchpost.toml"))
            .unwrap()
            .lines()
            .position(|l| l.starts_with(key))
            .map(|i| i + 1)
            .unwrap()
    };
    let (sched, notify, comps, window) = (
        line("schedule ="),
        line("notify = [\"team\""),
        line("components = [\"Billing\"]"),
        line("window = \"10s\""),
    );
    for want in [
        format!("watchpost.toml:{sched}:12: review: invalid cron schedule \"every monday\""),
        format!("watchpost.toml:{notify}:19: notifier \"pager\" is a pagerduty notifier: reviews go to email or webhook notifiers"),
        format!("watchpost.toml:{notify}:28: unknown notifier \"nope\" in review (defined: "),
        format!("watchpost.toml:{comps}:15: unknown component \"Billing\" in review"),
        format!("watchpost.toml:{window}:10: review: window must be at least 1m"),
    ] {
        assert!(e.contains(&want), "missing {want:?} in:\n{e}");
    }
}
