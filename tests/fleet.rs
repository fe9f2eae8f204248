//! Fleet mode against a real PostgreSQL cluster (`common/pg.rs`): with `[agent]
//! database_url_env` the agent keeps its runs (with its location), incidents, timeline and
//! outbox in Postgres and writes no SQLite file.

mod notify_harness;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/recorder.rs"]
mod recorder;

use std::sync::Arc;
use std::time::Duration;

use notify_harness::*;
use recorder::Recorder;
use watchpost::config::Config;
use watchpost::probe::Outcome::{Down, Up};

const T: Duration = Duration::from_secs(20);

/// The harness config (component API of `api` and `db`, a webhook at `hook`) in fleet mode:
/// the database URL in an environment variable of this test's own process.
fn fleet_config(dir: &std::path::Path, hook: &str, url: &str) -> Arc<Config> {
    let var = "WATCHPOST_TEST_DATABASE_URL";
    // Each test runs in its own process (nextest), so the variable is this test's alone.
    std::env::set_var(var, url);
    let t = Targets {
        webhook: Some(hook.to_string()),
        delivery: Some(FAST.to_string()),
        ..Default::default()
    };
    let (notifiers, names) = notifiers_toml(&t);
    let path = write_config_file(dir, &names, &notifiers, THRESHOLDS, "");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "listen = \"\"\n",
        &format!("listen = \"\"\ndatabase_url_env = \"{var}\"\n"),
    );
    std::fs::write(&path, text).unwrap();
    match watchpost::config::load(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test config invalid:\n{e}"),
    }
}

fn count(conn: &watchpost::store::Conn, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_agent_keeps_runs_incidents_and_outbox_in_postgres() {
    let cluster = pg::PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let hook = Recorder::start().await;
    let cfg = fleet_config(dir.path(), &hook.url(), &cluster.default_url());
    let agent = Agent::start(cfg.clone(), true).await;
    // Runs are keyed by start in ms: a little apart, so every one is its own row.
    let both = |o| {
        let agent = &agent;
        async move {
            agent.both(o).await;
            settle(Duration::from_millis(3)).await;
        }
    };
    both(Down).await;
    both(Down).await;
    hook.wait_for("the incident's webhook", T, |l| !l.is_empty())
        .await;
    until("the incident open in Postgres", T, || {
        agent.incidents(true).len() == 1
    })
    .await;
    agent.drained(T).await;
    both(Up).await;
    both(Up).await;
    until("the incident resolved", T, || {
        agent.incidents(true).is_empty()
    })
    .await;
    agent.drained(T).await;

    let conn = agent.store.reader().unwrap();
    assert!(conn.is_postgres());
    assert_eq!(count(&conn, "SELECT count(*) FROM runs"), 8);
    let locations: Vec<String> = conn
        .prepare("SELECT DISTINCT location FROM series")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        locations,
        ["test-vantage"],
        "every run carries the agent's location"
    );
    assert_eq!(count(&conn, "SELECT count(*) FROM incidents"), 1);
    let outbox = agent.outbox();
    assert!(
        outbox.iter().all(|r| r.2 == "delivered")
            && outbox.first().is_some_and(|r| r.1 == "opened")
            && outbox.last().is_some_and(|r| r.1 == "resolved"),
        "opened … resolved, all delivered: {outbox:?}"
    );
    assert_eq!(hook.requests().len(), outbox.len());
    let latest = watchpost::store::latest_runs(&conn).unwrap();
    assert_eq!(latest.len(), 2);
    assert!(latest.iter().all(|r| r.outcome == "up"), "{latest:?}");
    drop(conn);
    agent.stop().await;
    assert!(
        !cfg.db_path().exists(),
        "fleet mode writes no SQLite database"
    );
}

#[path = "common/fleet.rs"]
mod fleet;

use std::collections::{BTreeMap, BTreeSet};

use fleet::{agent_config, http_probe, logs, now_ms, wait_for, Db, FleetRun, Proc};
use recorder::{Recorded, Reply};

/// Per (location, probe): the agents that ran it among `runs`.
fn runners(runs: &[FleetRun]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut m: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for r in runs {
        m.entry((r.location.clone(), r.probe.clone()))
            .or_default()
            .insert(r.agent.clone());
    }
    m
}

/// Three real agents, two in `eu` and one in `us`, over twelve probes: in steady state each
/// probe runs on exactly one agent of each location, once per interval (no double runs),
/// and the two `eu` agents share them. One `eu` agent is SIGKILLed: each of its probes runs
/// on the other `eu` agent within two intervals (read back from the runs in Postgres), and
/// `us` goes on untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_of_a_location_split_the_probes_and_take_over_those_of_a_dead_agent() {
    const INTERVAL_MS: i64 = 4000;
    let cluster = pg::PgCluster::start();
    let url = cluster.default_url();
    let target = Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let probes: Vec<String> = (0..12).map(|i| format!("p{i:02}")).collect();
    for p in &probes {
        http_probe(dir.path(), p, &format!("{}/{p}", target.url()), "4s");
    }
    let timing = "heartbeat = \"1s\", lease = \"3s\"";
    let start = |name: &str, location: &str| {
        let cfg = agent_config(dir.path(), name, location, timing, "");
        Proc::start(name, &cfg, &url)
    };
    let mut eu1 = start("eu1", "eu");
    let mut eu2 = start("eu2", "eu");
    let us1 = start("us1", "us");
    let db = Db::open(&url);

    // Steady state: over the last two intervals every probe ran in both locations, each
    // on one agent only.
    let ctx = || logs(&[&eu1, &eu2, &us1]);
    let steady_from = wait_for(
        "every probe running on one agent per location",
        Duration::from_secs(40),
        || {
            let now = now_ms();
            let m = runners(&db.runs_since(now - 2 * INTERVAL_MS));
            let complete = m.len() == 2 * probes.len() && m.values().all(|a| a.len() == 1);
            complete.then_some(now)
        },
        ctx,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(3 * INTERVAL_MS as u64)).await;
    let window = db.runs_since(steady_from);
    let window: Vec<FleetRun> = window
        .into_iter()
        .filter(|r| r.at < steady_from + 3 * INTERVAL_MS)
        .collect();
    let by = runners(&window);
    assert_eq!(
        by.len(),
        2 * probes.len(),
        "every probe ran in both locations: {by:?}"
    );
    for ((loc, probe), agents) in &by {
        assert_eq!(agents.len(), 1, "{probe} in {loc} ran on {agents:?}");
        let n = window
            .iter()
            .filter(|r| &r.location == loc && &r.probe == probe)
            .count();
        // Three intervals: three runs, one more or less at the window's edges; a double run
        // would show as more.
        assert!(
            (2..=4).contains(&n),
            "{probe} in {loc} ran {n} times in three intervals"
        );
    }
    let eu_agents: BTreeSet<&String> = by
        .iter()
        .filter(|((loc, _), _)| loc == "eu")
        .flat_map(|(_, a)| a.iter())
        .collect();
    assert_eq!(eu_agents.len(), 2, "both eu agents run probes: {by:?}");

    // SIGKILL eu1: its probes move to eu2.
    let members = db.members();
    let id_of = |p: &Proc| {
        members
            .iter()
            .find(|m| m.2 == p.pid())
            .map(|m| m.0.clone())
            .unwrap_or_else(|| {
                panic!(
                    "no member row for {} (pid {}): {members:?}",
                    p.name,
                    p.pid()
                )
            })
    };
    let (dead, survivor) = (id_of(&eu1), id_of(&eu2));
    let orphans: Vec<String> = by
        .iter()
        .filter(|((loc, _), a)| loc == "eu" && a.contains(&dead))
        .map(|((_, p), _)| p.clone())
        .collect();
    assert!(!orphans.is_empty());
    let killed_at = now_ms();
    eu1.sigkill();
    let ctx = || logs(&[&eu2, &us1]);
    let moved = wait_for(
        "the dead agent's probes running on the other eu agent",
        Duration::from_secs(30),
        || {
            let runs = db.runs_since(killed_at);
            let firsts: Vec<(String, i64)> = orphans
                .iter()
                .filter_map(|p| {
                    runs.iter()
                        .find(|r| &r.probe == p && r.location == "eu" && r.agent == survivor)
                        .map(|r| (p.clone(), r.at - killed_at))
                })
                .collect();
            (firsts.len() == orphans.len()).then_some(firsts)
        },
        ctx,
    )
    .await;
    let worst = moved.iter().map(|m| m.1).max().unwrap_or(0);
    eprintln!(
        "rebalancing: {} probes of the SIGKILLed agent ran elsewhere after {:?} ms (worst {worst} ms; interval {INTERVAL_MS} ms, heartbeat 1 s)",
        moved.len(),
        moved.iter().map(|m| m.1).collect::<Vec<_>>()
    );
    // Detection takes up to three heartbeats (3 s), then the probe's next slot comes within
    // an interval: inside two intervals (8 s). A little slack for a loaded machine.
    assert!(
        worst <= 2 * INTERVAL_MS + 1000,
        "a probe took {worst} ms to move (two intervals: {} ms)\n{}",
        2 * INTERVAL_MS,
        logs(&[&eu2, &us1])
    );
    // Afterwards: no double runs, and us untouched.
    tokio::time::sleep(Duration::from_millis(2 * INTERVAL_MS as u64)).await;
    let after = runners(&db.runs_since(killed_at + worst));
    for ((loc, probe), agents) in &after {
        assert_eq!(
            agents.len(),
            1,
            "{probe} in {loc} ran on {agents:?} after the move"
        );
        assert!(!agents.contains(&dead));
    }
    assert_eq!(after.len(), 2 * probes.len(), "{after:?}");
    assert!(eu2.running(), "{}", eu2.log());
}

/// Two real agents, one incident: the leader delivers the trigger, is SIGKILLed while the
/// incident is open, the target recovers, and the other agent takes the lease and delivers
/// the resolve exactly once — PagerDuty under the same dedup key, Instatus to the incident
/// id the first leader stored — while nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_mid_incident_the_new_leader_delivers_the_resolve_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let cluster = pg::PgCluster::start();
    let url = cluster.default_url();
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let target = Recorder::with_default(move |_| {
        Reply::status(if f.load(Ordering::SeqCst) { 503 } else { 200 })
    })
    .await;
    let pd = Recorder::with_default(|_| Reply::json(202, serde_json::json!({"status": "success"})))
        .await;
    let is = Recorder::with_default(|r: &Recorded| {
        if r.method == "POST" && r.path.ends_with("/incidents") {
            Reply::json(200, serde_json::json!({"id": "st-42"}))
        } else {
            Reply::status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    http_probe(
        dir.path(),
        "target",
        &format!("{}/health", target.url()),
        "1s",
    );
    let d = r#"delivery = { retry_initial = "100ms", retry_max = "300ms", timeout = "1s", rate_limit = 50, breaker_failures = 100 }"#;
    let extra = format!(
        "[[component]]\nname = \"Target\"\nprobes = [\"target\"]\nfailure_threshold = 2\nsuccess_threshold = 2\nrecovery = \"1s\"\nnotify = [\"pager\", \"page\"]\n\n\
         [notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"{}\"\nevents_url = \"{}/v2/enqueue\"\n{d}\n\n\
         [notifier.page]\nkind = \"instatus\"\npage_id = \"pg\"\napi_key_env = \"{}\"\nbase_url = \"{}\"\ncomponents = {{ \"Target\" = \"cmp\" }}\n{d}\n",
        fleet::PD_VAR,
        pd.url(),
        fleet::IS_VAR,
        is.url()
    );
    let timing = "heartbeat = \"500ms\", lease = \"2s\"";
    let mut agents: Vec<Proc> = ["a", "b"]
        .iter()
        .map(|n| {
            let cfg = agent_config(dir.path(), n, "eu", timing, &extra);
            Proc::start(n, &cfg, &url)
        })
        .collect();
    let db = Db::open(&url);
    let ok = |log: &[Recorded]| {
        log.iter()
            .filter(|r| (200..300).contains(&r.status))
            .count()
    };

    // The incident opens and every notification of it is delivered.
    pd.wait_ok("the trigger", 1, Duration::from_secs(30)).await;
    wait_for(
        "the opening notifications delivered",
        Duration::from_secs(20),
        || {
            let rows = db.outbox();
            (rows.len() == 2 && rows.iter().all(|r| r.2 == "delivered")).then_some(())
        },
        || {
            format!(
                "outbox: {:?}\n{}",
                db.outbox(),
                logs(&agents.iter().collect::<Vec<_>>())
            )
        },
    )
    .await;
    let (old_leader, _) = db.leader().expect("a leader");
    let members = db.members();
    let pid = members
        .iter()
        .find(|m| m.0 == old_leader)
        .map(|m| m.2)
        .unwrap_or_else(|| panic!("leader {old_leader} not among {members:?}"));
    let i = agents
        .iter()
        .position(|a| a.pid() == pid)
        .expect("the leader is one of ours");
    let killed_at = now_ms();
    agents[i].sigkill();
    failing.store(false, Ordering::SeqCst);

    let (new_leader, acquired_at) = wait_for(
        "another agent leading",
        Duration::from_secs(15),
        || db.leader().filter(|l| l.0 != old_leader),
        || logs(&agents.iter().collect::<Vec<_>>()),
    )
    .await;
    pd.wait_ok("the resolve", 2, Duration::from_secs(20)).await;
    let resolved_at = now_ms();
    eprintln!(
        "failover: lease taken {} ms after the SIGKILL, resolve delivered after {} ms (heartbeat 500 ms, lease 2 s, recovery 1 s + 2 good runs)",
        acquired_at - killed_at,
        resolved_at - killed_at
    );
    assert!(
        acquired_at - killed_at <= 2000 + 1500,
        "the lease took {} ms to move",
        acquired_at - killed_at
    );
    is.wait_for("the Instatus resolve", Duration::from_secs(10), |l| {
        l.iter().any(|r| r.path.ends_with("/incident-updates"))
    })
    .await;
    wait_for(
        "every notification delivered",
        Duration::from_secs(10),
        || {
            let rows = db.outbox();
            (rows.len() == 4 && rows.iter().all(|r| r.2 == "delivered")).then_some(())
        },
        || format!("outbox: {:?}", db.outbox()),
    )
    .await;
    // Let a duplicate show if there were one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = pd
        .requests()
        .into_iter()
        .filter(|r| r.status == 202)
        .collect::<Vec<_>>();
    assert_eq!(
        log.len(),
        2,
        "one trigger, one resolve: {:?}",
        log.iter().map(|r| r.json()).collect::<Vec<_>>()
    );
    let key = format!("watchpost/{}/Target/1", db.installation());
    assert_eq!(log[0].json()["event_action"], "trigger");
    assert_eq!(log[0].json()["dedup_key"], key);
    assert_eq!(
        log[1].json(),
        serde_json::json!({"routing_key": "fleet-routing-key", "dedup_key": key, "event_action": "resolve"})
    );
    let is_log = is.requests();
    let posts = is_log
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/pg/incidents")
        .count();
    assert_eq!(posts, 1, "one status-page incident");
    let updates: Vec<&Recorded> = is_log
        .iter()
        .filter(|r| r.path.ends_with("/incident-updates"))
        .collect();
    assert_eq!(updates.len(), 1, "one resolve update");
    assert_eq!(updates[0].path, "/v1/pg/incidents/st-42/incident-updates");
    assert_eq!(updates[0].json()["status"], "RESOLVED");
    assert_eq!(ok(&is_log), is_log.len());
    let survivor = agents.iter_mut().find(|a| a.pid() != pid).unwrap();
    assert!(survivor.running(), "{}", survivor.log());
    assert!(
        db.members()
            .iter()
            .any(|m| m.0 == new_leader && m.2 == survivor.pid()),
        "the survivor leads"
    );
}

/// Quorum across locations: two agents in `eu`, one in `us`, each location probing the
/// target through its own path. When only `eu`'s path fails, the majority of the two
/// locations does not see the member bad: no incident, no page, and the disagreement is on
/// the timeline. When `us` fails too, exactly one incident opens and one page goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_locations_failure_is_not_an_incident_all_locations_failing_is_exactly_one() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let cluster = pg::PgCluster::start();
    let url = cluster.default_url();
    let eu_down = Arc::new(AtomicBool::new(false));
    let us_down = Arc::new(AtomicBool::new(false));
    let (e, u) = (eu_down.clone(), us_down.clone());
    let target = Recorder::with_default(move |r: &Recorded| {
        let down = if r.path.starts_with("/eu/") { &e } else { &u };
        Reply::status(if down.load(Ordering::SeqCst) {
            503
        } else {
            200
        })
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
    for (name, location) in [("eu1", "eu"), ("eu2", "eu"), ("us1", "us")] {
        let dir = root.path().join(location);
        http_probe(
            &dir,
            "target",
            &format!("{}/{location}/health", target.url()),
            "1s",
        );
        let cfg = agent_config(&dir, name, location, timing, &extra);
        agents.push(Proc::start(name, &cfg, &url));
    }
    let db = Db::open(&url);
    let ctx = || logs(&agents.iter().collect::<Vec<_>>());
    // Both locations report the target.
    wait_for(
        "runs from both locations",
        Duration::from_secs(30),
        || {
            let locs: BTreeSet<String> = db
                .runs_since(now_ms() - 1500)
                .into_iter()
                .map(|r| r.location)
                .collect();
            (locs.len() == 2).then_some(())
        },
        ctx,
    )
    .await;

    // eu's path fails: the locations disagree, the majority (two of two) does not see it.
    eu_down.store(true, Ordering::SeqCst);
    wait_for(
        "the disagreement on the timeline",
        Duration::from_secs(20),
        || {
            db.timeline()
                .into_iter()
                .find(|t| t.0 == "locations_disagree")
                .and_then(|t| t.2)
        },
        ctx,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let note = db
        .timeline()
        .into_iter()
        .find(|t| t.0 == "locations_disagree")
        .and_then(|t| t.2)
        .unwrap();
    assert!(
        note.contains("eu sees it down") && note.contains("us sees it up"),
        "{note}"
    );
    assert!(
        db.incidents().is_empty(),
        "one location failing opened {:?}",
        db.incidents()
    );
    assert!(pd.requests().is_empty(), "nothing paged");

    // Every location fails: one incident, one page.
    us_down.store(true, Ordering::SeqCst);
    pd.wait_ok("the page", 1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pages = pd.requests();
    assert_eq!(
        pages.len(),
        1,
        "one page: {:?}",
        pages.iter().map(|r| r.json()).collect::<Vec<_>>()
    );
    assert_eq!(pages[0].json()["event_action"], "trigger");
    let incidents = db.incidents();
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    assert_eq!(incidents[0].1, "Target");
}

/// The outbox claim on a real Postgres: only the lease holder claims, a live claim of
/// another agent is respected (also by a new lease holder) until it expires, the holder may
/// claim its own row again, and a delivered row is never claimed.
#[test]
fn an_outbox_row_is_claimed_by_the_lease_holder_only_and_once_at_a_time() {
    use watchpost::fleet::claim;
    use watchpost::store::db::Pg;
    let cluster = pg::PgCluster::start();
    let url = cluster.default_url();
    let (store, writer) = watchpost::store::Store::open(watchpost::store::Target::Postgres(
        Pg::new(&url, "eu").unwrap(),
    ))
    .unwrap();
    let c = store.reader().unwrap();
    let id: i64 = c
        .query_row(
            "INSERT INTO outbox (notifier, component, kind, event, created_at, next_attempt_at)
             VALUES ('pager', 'API', 'opened', '{}', 0, 0) RETURNING id",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let hold = |agent: &str| {
        c.execute(
            "INSERT INTO leases (name, holder, expires_at, acquired_at) VALUES ('leader', ?1, 9000000000000, 0)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder",
            [agent],
        )
        .unwrap();
    };
    let ttl = Duration::from_secs(30);
    hold("a");
    assert!(
        !claim(&c, id, "b", ttl).unwrap(),
        "b does not hold the lease"
    );
    assert!(claim(&c, id, "a", ttl).unwrap());
    assert!(
        claim(&c, id, "a", ttl).unwrap(),
        "the holder renews its own claim"
    );
    hold("b");
    assert!(!claim(&c, id, "a", ttl).unwrap(), "a lost the lease");
    assert!(!claim(&c, id, "b", ttl).unwrap(), "a's claim is still live");
    c.execute("UPDATE outbox SET claim_until = 0 WHERE id = ?1", [id])
        .unwrap();
    assert!(
        claim(&c, id, "b", ttl).unwrap(),
        "an expired claim is taken over"
    );
    c.execute("UPDATE outbox SET status = 'delivered' WHERE id = ?1", [id])
        .unwrap();
    assert!(!claim(&c, id, "b", ttl).unwrap(), "a delivered row");
    drop((c, store));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(writer.join());
}

/// A scheduled review goes out from the leader only: two agents share the database, the
/// review's last slot was missed, and the webhook receives it once — not once per agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_review_is_sent_once_by_the_leader_not_by_every_agent() {
    use watchpost::store::db::Pg;
    let cluster = pg::PgCluster::start();
    let url = cluster.default_url();
    let target = Recorder::with_default(|_| Reply::status(200)).await;
    let hook = Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    http_probe(dir.path(), "api", &format!("{}/health", target.url()), "1s");
    // Daily at the minute an hour ago: its last slot has passed, the next is 23 h away.
    let slot = chrono::Utc::now() - chrono::Duration::hours(1);
    let schedule = format!(
        "{} {} * * *",
        chrono::Timelike::minute(&slot),
        chrono::Timelike::hour(&slot)
    );
    let extra = format!(
        "[[component]]\nname = \"API\"\nprobes = [\"api\"]\n\n\
         [notifier.hook]\nkind = \"webhook\"\nurl = \"{}/review\"\n\
         delivery = {{ retry_initial = \"50ms\", retry_max = \"200ms\", timeout = \"5s\" }}\n\n\
         [[review]]\nname = \"daily\"\nschedule = \"{schedule}\"\nwindow = \"1h\"\nnotify = [\"hook\"]\n",
        hook.url()
    );
    // The schema first, with the review last sent two days ago: the missed slot is due.
    {
        let (store, writer) = watchpost::store::Store::open(watchpost::store::Target::Postgres(
            Pg::new(&url, "eu").unwrap(),
        ))
        .unwrap();
        let two_days_ago = now_ms() - 2 * 86_400_000;
        store
            .reader()
            .unwrap()
            .execute(
                "INSERT INTO review_marks (review, notifier, slot, sent_at) VALUES ('daily', 'hook', ?1, ?1)",
                [two_days_ago],
            )
            .unwrap();
        drop(store);
        writer.join().await;
    }
    let timing = "heartbeat = \"500ms\", lease = \"2s\"";
    let agents: Vec<Proc> = ["a", "b"]
        .iter()
        .map(|n| {
            let cfg = agent_config(dir.path(), n, "eu", timing, &extra);
            Proc::start(n, &cfg, &url)
        })
        .collect();
    let db = Db::open(&url);
    wait_for(
        "both agents are members",
        Duration::from_secs(20),
        || (db.members().len() == 2).then_some(()),
        || logs(&agents.iter().collect::<Vec<_>>()),
    )
    .await;
    let got = hook
        .wait_ok("the missed review", 1, Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), 1);
    // Both agents have been up for several heartbeats: a second sender would have sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let posts: Vec<_> = hook
        .requests()
        .into_iter()
        .filter(|r| r.path == "/review")
        .collect();
    assert_eq!(
        posts.len(),
        1,
        "the review went out once\n{}",
        logs(&agents.iter().collect::<Vec<_>>())
    );
}
