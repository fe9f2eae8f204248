//! The installation id in the keys other systems see (issue 11): two agents (or one whose
//! database was reset) number their incidents from 1 alike, and must never resolve each
//! other's PagerDuty alerts or look like each other's webhook deliveries. The id is made
//! once with the database and survives restarts; incidents already open when an older
//! database is upgraded keep the keys their alerts were opened with.

mod notify_harness;
#[path = "common/recorder.rs"]
mod recorder;

use std::time::Duration;

use notify_harness::*;
use recorder::{Recorder, Reply};

use serde_json::json;
use watchpost::probe::Outcome::{Down, Up};
use watchpost::store::Installation;

const T: Duration = Duration::from_secs(10);

async fn pd_ok() -> Recorder {
    Recorder::with_default(|_| Reply::json(202, json!({"status": "success"}))).await
}

fn keys(pd: &Recorder) -> Vec<(String, String)> {
    pd.requests()
        .iter()
        .filter(|r| r.status == 202)
        .map(|r| {
            let j = r.json();
            (
                j["event_action"].as_str().unwrap_or("?").to_string(),
                j["dedup_key"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

async fn outage(agent: &Agent) {
    agent.both(Down).await;
    agent.both(Down).await;
}

async fn recovery(agent: &Agent) {
    agent.both(Up).await;
    agent.both(Up).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    agent.both(Up).await;
}

fn installation(agent: &Agent) -> Installation {
    Installation::read(&agent.store.reader().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_databases_never_share_keys_and_a_restart_keeps_them() {
    let pd = pd_ok().await;
    let hook = Recorder::start().await;
    let t = Targets {
        pagerduty: Some(pd.url()),
        webhook: Some(hook.url()),
        ..Default::default()
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Agent::start(write_config(da.path(), &t, THRESHOLDS, ""), true).await;
    let b = Agent::start(write_config(db.path(), &t, THRESHOLDS, ""), true).await;
    let (ia, ib) = (installation(&a), installation(&b));
    assert_ne!(ia.id, ib.id, "two databases, two installation ids");
    assert_eq!(ia.id.len(), 16);

    // Both open their incident #1; then only A recovers.
    let (ka, kb) = (
        format!("watchpost/{}/API/1", ia.id),
        format!("watchpost/{}/API/1", ib.id),
    );
    outage(&a).await;
    outage(&b).await;
    let has = |k: &str, action: &str| {
        let (k, action) = (k.to_string(), action.to_string());
        move |l: &[recorder::Recorded]| {
            l.iter().any(|r| {
                r.status == 202 && r.json()["dedup_key"] == k && r.json()["event_action"] == action
            })
        }
    };
    pd.wait_for("A's trigger", T, has(&ka, "trigger")).await;
    pd.wait_for("B's trigger", T, has(&kb, "trigger")).await;
    recovery(&a).await;
    pd.wait_for("A's resolve", T, has(&ka, "resolve")).await;
    assert!(
        keys(&pd).iter().all(|(_, k)| *k == ka || *k == kb),
        "{:?}",
        keys(&pd)
    );
    assert!(!keys(&pd).contains(&("resolve".into(), kb.clone())));
    // Webhook deliveries and incident keys differ too.
    let hooks = hook
        .wait_for("both agents' webhooks", T, |l| {
            l.iter().any(|h| h.json()["installation"] == json!(ia.id))
                && l.iter().any(|h| h.json()["installation"] == json!(ib.id))
        })
        .await;
    for h in &hooks {
        let inst = h.json()["installation"].as_str().unwrap().to_string();
        let delivery = h.header("x-watchpost-delivery").unwrap();
        assert!(
            delivery.starts_with(&format!("{inst}-mitigate-")),
            "{delivery}"
        );
        let key = h.json()["incident"]["key"].as_str().unwrap().to_string();
        assert_eq!(key, format!("watchpost/{inst}/API/1"));
    }
    a.stop().await;

    // A restart keeps the id, and B's alert still resolves under B's key.
    let b_cfg = b.config.clone();
    b.stop().await;
    let b = Agent::start(b_cfg, true).await;
    assert_eq!(installation(&b), ib);
    recovery(&b).await;
    pd.wait_for("B's resolve", T, has(&kb, "resolve")).await;
    b.stop().await;
}

/// A database from before the installation id with incident #1 open: the upgrade keeps
/// `watchpost/API/1` for it (its PagerDuty alert was opened with that key), and the next
/// incident carries the new id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incident_open_across_the_upgrade_keeps_its_old_key() {
    let pd = pd_ok().await;
    let t = Targets {
        pagerduty: Some(pd.url()),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &t, THRESHOLDS, "");
    let a = Agent::start(cfg.clone(), false).await;
    outage(&a).await;
    a.stop().await;
    // Turn the database into one an older watchpost left: schema 4 (the migration before
    // the installation id; what later migrations created is dropped so they run again), no
    // installation id, and incident #1's trigger already delivered under the old key.
    {
        let conn = rusqlite::Connection::open(dir.path().join("data/watchpost.db")).unwrap();
        conn.execute_batch(
            "DELETE FROM meta WHERE key IN ('installation_id', 'installation_since');
             DROP TABLE hourly_outcomes;
             DROP TABLE daily_outcomes;
             DROP TABLE run_hours;
             DROP INDEX series_location_name;
             ALTER TABLE series DROP COLUMN location;
             DROP TABLE rehearsals;
             ALTER TABLE incidents DROP COLUMN rehearsal;
             DROP TABLE members;
             DROP TABLE leases;
             DROP TABLE run_feed;
             ALTER TABLE outbox DROP COLUMN claimed_by;
             ALTER TABLE outbox DROP COLUMN claim_until;
             UPDATE outbox SET status = 'delivered';
             DROP TABLE hourly;
             CREATE TABLE hourly (bucket_start INTEGER NOT NULL, series INTEGER NOT NULL,
                 phase TEXT NOT NULL, count INTEGER NOT NULL, data BLOB NOT NULL,
                 PRIMARY KEY (bucket_start, series, phase)) WITHOUT ROWID;
             PRAGMA user_version = 4;",
        )
        .unwrap();
    }
    let a = Agent::start(cfg, true).await;
    let inst = installation(&a);
    assert_eq!(inst.since_incident, 2);
    recovery(&a).await;
    pd.wait_ok("resolve of the old incident", 1, T).await;
    outage(&a).await;
    pd.wait_ok("trigger of a new one", 2, T).await;
    let k = keys(&pd);
    assert_eq!(k[0], ("resolve".into(), "watchpost/API/1".into()));
    assert_eq!(
        k[1],
        ("trigger".into(), format!("watchpost/{}/API/2", inst.id))
    );
    a.stop().await;
}
