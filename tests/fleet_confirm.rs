//! Confirmation across locations (fleet mode): when one location sees a probe go bad, the
//! other locations re-run it at once, and the leader opens the incident on a confirmed
//! outage without waiting for `failure_threshold` intervals — or opens nothing when the
//! other locations see it up. The leader's rule on synthetic runs (the evaluator over
//! SQLite), the requests on a real Postgres, and real agents against real HTTP targets.

#[path = "common/confirm.rs"]
mod confirm;
#[path = "common/fleet.rs"]
mod fleet;
mod notify_harness;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/recorder.rs"]
mod recorder;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet::{agent_config, http_probe, http_probe_with, logs, now_ms, wait_for, Db, Proc};
use notify_harness::{run, write_config, Targets};
use recorder::{Recorded, Recorder, Reply};
use watchpost::fleet::{ask, open_requests, Member, Request, CONFIRMATION};
use watchpost::incident::Evaluator;
use watchpost::probe::Outcome::{Down, Up};
use watchpost::probe::RunResult;

/// A run of `probe` at `at_ms`, optionally a confirmation run asked for by `asked_by`.
fn run_at(
    probe: &str,
    o: watchpost::probe::Outcome,
    at_ms: i64,
    asked_by: Option<&str>,
) -> RunResult {
    let mut r = run(probe, o);
    r.started_at = chrono::DateTime::from_timestamp_millis(at_ms).unwrap();
    if let Some(l) = asked_by {
        r.details.insert(CONFIRMATION.into(), l.into());
    }
    r
}

/// Timeline rows: (kind, incident id, note).
fn timeline(store: &watchpost::store::Store) -> Vec<(String, Option<i64>, Option<String>)> {
    store
        .reader()
        .unwrap()
        .query_map(
            "SELECT kind, incident_id, note FROM incident_events ORDER BY id",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
}

/// The leader's rule, run by run, with `failure_threshold = 3`: a bad run from one location
/// while the other sees the member up is judged up (the disagreement on the timeline); a
/// confirmation run that sees it up dismisses it; both locations bad on their own schedule
/// count towards `failure_threshold` as before; a confirmation run that sees it bad too
/// opens the incident at once, with a `locations_confirm` entry on its timeline.
#[tokio::test]
async fn the_leader_opens_at_once_on_a_confirmed_outage_and_not_on_a_dismissed_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &Targets::default(),
        "failure_threshold = 3\nsuccess_threshold = 2\nrecovery = \"300ms\"",
        "",
    );
    let (store, writer) =
        watchpost::store::Store::open(watchpost::store::Target::of(&cfg).unwrap()).unwrap();
    let shared = watchpost::pipeline::Shared::default();
    let mut ev = Evaluator::new(
        cfg.clone(),
        store.clone(),
        watchpost::metrics::Metrics::new(),
        &shared,
    )
    .unwrap();
    let status = |ev: &Evaluator| {
        ev.statuses()
            .into_iter()
            .find(|(c, _)| c == "API")
            .map(|(_, s)| s.as_str())
            .unwrap()
    };
    let t0 = chrono::Utc::now().timestamp_millis();
    for probe in ["api", "db"] {
        ev.on_run_from(&run_at(probe, Up, t0, None), Some("eu"))
            .await;
        ev.on_run_from(&run_at(probe, Up, t0 + 10, None), Some("us"))
            .await;
    }

    // eu sees it down; us re-runs it at once and sees it up: dismissed.
    ev.on_run_from(&run_at("api", Down, t0 + 1000, None), Some("eu"))
        .await;
    ev.on_run_from(&run_at("api", Up, t0 + 1500, Some("eu")), Some("us"))
        .await;
    assert_eq!(status(&ev), "operational");
    store.flush().await.unwrap();
    let notes = timeline(&store);
    let last = notes.last().cloned().unwrap();
    assert_eq!(last.0, "locations_disagree", "{notes:?}");
    let text = last.2.unwrap();
    assert!(
        text.contains("eu sees it down") && text.contains("us sees it up (confirmation re-run)"),
        "{text}"
    );
    assert!(!notes.iter().any(|n| n.0 == "opened"), "{notes:?}");

    // Both locations bad on their own schedule: counted towards failure_threshold (3).
    ev.on_run_from(&run_at("api", Down, t0 + 2000, None), Some("us"))
        .await;
    ev.on_run_from(&run_at("api", Down, t0 + 3000, None), Some("eu"))
        .await;
    assert_eq!(status(&ev), "operational", "two bad judgements of three");

    // eu sees the other member go bad; us's confirmation run sees it bad too: confirmed at
    // once.
    ev.on_run_from(&run_at("db", Down, t0 + 3100, None), Some("eu"))
        .await;
    assert_eq!(status(&ev), "operational");
    ev.on_run_from(&run_at("db", Down, t0 + 3500, Some("eu")), Some("us"))
        .await;
    assert_eq!(status(&ev), "partial_outage");
    store.flush().await.unwrap();
    let notes = timeline(&store);
    let opened = notes
        .iter()
        .find(|n| n.0 == "opened")
        .unwrap_or_else(|| panic!("{notes:?}"));
    let confirmed = notes
        .iter()
        .find(|n| n.0 == "locations_confirm")
        .unwrap_or_else(|| panic!("{notes:?}"));
    assert_eq!(confirmed.1, opened.1, "on the incident's timeline");
    let text = confirmed.2.clone().unwrap();
    assert!(
        text.starts_with("db confirmed bad across locations at once")
            && text.contains("eu sees it down")
            && text.contains("us sees it down (connect_refused: connection refused by 127.0.0.1:9) (confirmation re-run)"),
        "{text}"
    );
    drop((ev, store));
    writer.join().await;
}

/// The requests on a real Postgres: one open request per probe and asking location, each
/// location reads only the others' open requests, and a location asks again once its
/// request expired.
#[test]
fn a_location_has_one_open_request_per_probe_and_reads_the_others() {
    use watchpost::store::db::Pg;
    let cluster = pg::PgCluster::start();
    let url = cluster.default_url();
    let (store, writer) = watchpost::store::Store::open(watchpost::store::Target::Postgres(
        Pg::new(&url, "eu").unwrap(),
    ))
    .unwrap();
    let c = store.reader().unwrap();
    let member = |location: &str| Member {
        id: format!("{location}-00000001"),
        location: location.into(),
        heartbeat: Duration::from_secs(1),
        lease: Duration::from_secs(3),
        confirm: true,
    };
    let (eu, us) = (member("eu"), member("us"));
    let open = Duration::from_secs(30);
    assert!(ask(&c, "api", &eu, open).unwrap());
    assert!(
        !ask(&c, "api", &eu, open).unwrap(),
        "one open request per probe and location"
    );
    assert!(ask(&c, "api", &us, open).unwrap(), "us asks on its own");
    assert!(ask(&c, "db", &eu, open).unwrap());
    let probes = |rs: Vec<Request>| -> Vec<(String, String)> {
        rs.into_iter().map(|r| (r.probe, r.location)).collect()
    };
    let pair = |p: &str, l: &str| (p.to_string(), l.to_string());
    let mut seen_by_us = probes(open_requests(&c, "us").unwrap());
    seen_by_us.sort();
    assert_eq!(seen_by_us, [pair("api", "eu"), pair("db", "eu")]);
    assert_eq!(
        probes(open_requests(&c, "eu").unwrap()),
        [pair("api", "us")]
    );
    assert_eq!(open_requests(&c, "asia").unwrap().len(), 3);
    let first = open_requests(&c, "us").unwrap();
    // Expired: no longer open, and eu may ask again.
    c.execute(
        "UPDATE confirm_requests SET expires_at = 0 WHERE probe = 'api' AND location = 'eu'",
        [],
    )
    .unwrap();
    assert_eq!(probes(open_requests(&c, "us").unwrap()), [pair("db", "eu")]);
    std::thread::sleep(Duration::from_millis(5));
    assert!(ask(&c, "api", &eu, open).unwrap());
    let again = open_requests(&c, "us").unwrap();
    let at = |rs: &[Request]| rs.iter().find(|r| r.probe == "api").map(|r| r.asked_at);
    assert!(
        at(&again) > at(&first),
        "a new request: {first:?} {again:?}"
    );
    drop((c, store));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(writer.join());
}

/// Real agents, two locations, a 20 s interval and `failure_threshold = 2`: the target
/// fails for every location. The other location re-runs it at once, and exactly one
/// incident opens and one page goes out within seconds of the first failing run — where
/// without confirmation the page waits about one interval (benches/fleet.rs `--confirm`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_everywhere_pages_once_within_seconds_of_the_first_failing_run() {
    const INTERVAL_MS: i64 = 20_000;
    let o = confirm::outage_everywhere(
        (INTERVAL_MS / 1000) as u64,
        true,
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .await;
    eprintln!(
        "first failing run from {} at +0 ms, confirmation run {:?} ms later, page after {} ms",
        o.first_bad.location,
        o.confirmation.as_ref().map(|c| c.at - o.first_bad.at),
        o.time_to_page()
    );
    let c = o
        .confirmation
        .as_ref()
        .unwrap_or_else(|| panic!("no confirmation run: {o:#?}"));
    assert_eq!(c.outcome, "down");
    // The other location's next slot was about half an interval away or more.
    assert!(
        c.at - o.first_bad.at < 5_000,
        "the confirmation run came {} ms after the first failing run",
        c.at - o.first_bad.at
    );
    assert!(
        o.time_to_page() < 8_000,
        "paged {} ms after the first failing run (interval {INTERVAL_MS} ms): {o:#?}",
        o.time_to_page()
    );
    assert_eq!((o.pages, o.incidents), (1, 1), "{o:#?}");
    assert!(
        o.timeline.iter().any(|t| t.0 == "locations_confirm"),
        "{:?}",
        o.timeline
    );
}

/// Real agents: `eu1` in `eu`, `us1` and `us2` in `us`. The target fails for `eu` only: the
/// one `us` agent that runs it re-runs it at once (once, well before its next slot), sees
/// it up, and nothing opens; the disagreement is on the timeline naming the confirmation
/// re-run. Meanwhile a probe that stays up runs once per interval in each location, on one
/// agent, never as a confirmation: no double runs in steady state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_locations_failure_is_re_run_at_once_elsewhere_and_dismissed() {
    const INTERVAL_MS: i64 = 20_000;
    const STEADY_MS: i64 = 1_000;
    let cluster = pg::PgCluster::start();
    let url = cluster.default_url();
    let eu_down = Arc::new(AtomicBool::new(false));
    let e = eu_down.clone();
    let target = Recorder::with_default(move |r: &Recorded| {
        let down = r.path.starts_with("/eu/target") && e.load(Ordering::SeqCst);
        Reply::status(if down { 503 } else { 200 })
    })
    .await;
    let pd = Recorder::with_default(|_| Reply::json(202, serde_json::json!({"status": "success"})))
        .await;
    let root = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[component]]\nname = \"Target\"\nprobes = [\"target\"]\nfailure_threshold = 2\nsuccess_threshold = 2\nrecovery = \"1s\"\nnotify = [\"pager\"]\n\n\
         [notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"{}\"\nevents_url = \"{}/v2/enqueue\"\n\
         delivery = {{ retry_initial = \"100ms\", retry_max = \"300ms\", timeout = \"1s\", rate_limit = 50 }}\n",
        fleet::PD_VAR,
        pd.url()
    );
    let timing = "heartbeat = \"500ms\", lease = \"2s\"";
    let mut agents = Vec::new();
    for (name, location, offset) in [
        ("us1", "us", "1s"),
        ("us2", "us", "1s"),
        ("eu1", "eu", "10s"),
    ] {
        let dir = root.path().join(location);
        http_probe_with(
            &dir,
            "target",
            &format!("{}/{location}/target", target.url()),
            &format!("{}ms", INTERVAL_MS),
            &format!("offset = \"{offset}\"\n"),
        );
        http_probe(
            &dir,
            "steady",
            &format!("{}/{location}/steady", target.url()),
            &format!("{STEADY_MS}ms"),
        );
        let cfg = agent_config(&dir, name, location, timing, &extra);
        agents.push(Proc::start(name, &cfg, &url));
    }
    let db = Db::open(&url);
    let ctx = || logs(&agents.iter().collect::<Vec<_>>());
    wait_for(
        "the first run of the target from us",
        Duration::from_secs(60),
        || {
            db.runs_since(0)
                .into_iter()
                .find(|r| r.location == "us" && r.probe == "target")
        },
        ctx,
    )
    .await;
    let failing_from = now_ms();
    eu_down.store(true, Ordering::SeqCst);
    let first_bad = wait_for(
        "eu's first failing run",
        Duration::from_secs(60),
        || {
            db.runs_since(failing_from)
                .into_iter()
                .find(|r| r.probe == "target" && r.outcome == "down")
        },
        ctx,
    )
    .await;
    assert_eq!(first_bad.location, "eu");
    let confirmation = wait_for(
        "us's confirmation run",
        Duration::from_secs(15),
        || {
            db.runs_since(first_bad.at)
                .into_iter()
                .find(|r| r.probe == "target" && r.confirmation_for.as_deref() == Some("eu"))
        },
        ctx,
    )
    .await;
    eprintln!(
        "eu's failing run at +0 ms, us's confirmation run (up) after {} ms",
        confirmation.at - first_bad.at
    );
    assert_eq!(
        (
            confirmation.location.as_str(),
            confirmation.outcome.as_str()
        ),
        ("us", "up")
    );
    assert!(
        confirmation.at - first_bad.at < 5_000,
        "the confirmation came {} ms after the failing run (us's next slot: about {} ms)",
        confirmation.at - first_bad.at,
        INTERVAL_MS / 2
    );
    let note = wait_for(
        "the disagreement on the timeline",
        Duration::from_secs(15),
        || {
            db.timeline()
                .into_iter()
                .filter(|t| t.0 == "locations_disagree")
                .filter_map(|t| t.2)
                .find(|n| n.contains("(confirmation re-run)"))
        },
        ctx,
    )
    .await;
    assert!(
        note.contains("eu sees it down") && note.contains("us sees it up (confirmation re-run)"),
        "{note}"
    );
    // eu keeps failing (its next slot is an interval away): no incident, no page, and one
    // confirmation run only.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(db.incidents().is_empty(), "{:?}", db.incidents());
    assert!(pd.requests().is_empty(), "nothing paged");
    let runs = db.runs_since(first_bad.at);
    let confirmations: Vec<_> = runs
        .iter()
        .filter(|r| r.confirmation_for.is_some())
        .collect();
    assert_eq!(confirmations.len(), 1, "{confirmations:?}");

    // Steady state (the last 5 s of `steady`, well after the agents joined): once per
    // interval per location, on one agent, no confirmation runs.
    let until = now_ms() - 500;
    let from = until - 5 * STEADY_MS;
    let mut per: BTreeMap<String, (usize, std::collections::BTreeSet<String>)> = BTreeMap::new();
    for r in db
        .runs_since(from)
        .into_iter()
        .filter(|r| r.probe == "steady" && r.at < until)
    {
        assert!(r.confirmation_for.is_none(), "{r:?}");
        let e = per.entry(r.location).or_default();
        e.0 += 1;
        e.1.insert(r.agent);
    }
    assert_eq!(per.len(), 2, "{per:?}");
    for (location, (n, agents)) in &per {
        assert!(
            (4..=6).contains(n),
            "{location}: {n} runs of steady in 5 intervals"
        );
        assert_eq!(agents.len(), 1, "{location}: steady ran on {agents:?}");
    }
}
