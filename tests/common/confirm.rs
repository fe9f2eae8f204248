//! One outage seen from two locations, with real agents (`watchpost run`) against a test
//! Postgres cluster: `us1` in `us` and `eu1` in `eu` probe one target through their own
//! paths, `eu` half an interval after `us`. Once `us` has seen the target up, it fails for
//! every location; the scenario ends when the page arrives. tests/fleet_confirm.rs asserts
//! on it (confirmation on), benches/fleet.rs times it with and without confirmation.
//! Needs `mod fleet; mod pg; mod recorder;` (tests/common) at the including crate's root.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::fleet::{agent_config, http_probe_with, logs, now_ms, wait_for, Db, FleetRun, Proc};
use crate::pg::PgCluster;
use crate::recorder::{Recorder, Reply};

/// What one outage looked like.
#[derive(Debug)]
pub struct Outage {
    /// The first failing run (not a confirmation run).
    pub first_bad: FleetRun,
    /// The other location's confirmation run for the first failing one, if any.
    pub confirmation: Option<FleetRun>,
    /// When the first page reached PagerDuty (ms).
    pub paged_at: i64,
    /// Pages (PagerDuty triggers) and incidents `settle` after the first page.
    pub pages: usize,
    pub incidents: usize,
    /// Timeline kinds and notes.
    pub timeline: Vec<(String, Option<String>)>,
}

impl Outage {
    /// First failing run → page (ms).
    pub fn time_to_page(&self) -> i64 {
        self.paged_at - self.first_bad.at
    }
}

/// Run the scenario: probe interval `interval_s` seconds, the component's
/// `failure_threshold = 2`, `[agent] fleet.confirm = confirm`; wait at most `within` for
/// the page, then `settle` before counting pages and incidents.
pub async fn outage_everywhere(
    interval_s: u64,
    confirm: bool,
    within: Duration,
    settle: Duration,
) -> Outage {
    let cluster = PgCluster::start();
    let url = cluster.default_url();
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let target = Recorder::with_default(move |_| {
        Reply::status(if f.load(Ordering::SeqCst) { 503 } else { 200 })
    })
    .await;
    let paged = Arc::new(Mutex::new(Vec::new()));
    let p = paged.clone();
    let pd = Recorder::with_default(move |_| {
        p.lock().unwrap().push(now_ms());
        Reply::json(202, serde_json::json!({"status": "success"}))
    })
    .await;
    let root = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[component]]\nname = \"Target\"\nprobes = [\"target\"]\nfailure_threshold = 2\nsuccess_threshold = 2\nrecovery = \"1s\"\nnotify = [\"pager\"]\n\n\
         [notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"{}\"\nevents_url = \"{}/v2/enqueue\"\n\
         delivery = {{ retry_initial = \"100ms\", retry_max = \"300ms\", timeout = \"1s\", rate_limit = 50 }}\n",
        crate::fleet::PD_VAR,
        pd.url()
    );
    let timing = format!("heartbeat = \"500ms\", lease = \"2s\", confirm = {confirm}");
    let interval_ms = interval_s * 1000;
    let mut agents = Vec::new();
    for (name, location, offset_ms) in [("us1", "us", 1000), ("eu1", "eu", 1000 + interval_ms / 2)]
    {
        let dir = root.path().join(location);
        http_probe_with(
            &dir,
            "target",
            &format!("{}/{location}/health", target.url()),
            &format!("{interval_s}s"),
            &format!("offset = \"{offset_ms}ms\"\n"),
        );
        let cfg = agent_config(&dir, name, location, &timing, &extra);
        agents.push(Proc::start(name, &cfg, &url));
    }
    let db = Db::open(&url);
    let ctx = || logs(&agents.iter().collect::<Vec<_>>());
    // `us` sees the target up first: when the first failing run comes, a location that
    // sees it up is on record.
    wait_for(
        "the first run from us",
        within,
        || db.runs_since(0).into_iter().find(|r| r.location == "us"),
        ctx,
    )
    .await;
    let failing_from = now_ms();
    failing.store(true, Ordering::SeqCst);
    let first_bad = wait_for(
        "the first failing run",
        within,
        || {
            db.runs_since(failing_from)
                .into_iter()
                .find(|r| r.outcome == "down" && r.confirmation_for.is_none())
        },
        ctx,
    )
    .await;
    pd.wait_ok("the page", 1, within).await;
    let paged_at = paged.lock().unwrap()[0];
    tokio::time::sleep(settle).await;
    let confirmation = db.runs_since(first_bad.at).into_iter().find(|r| {
        r.location != first_bad.location
            && r.confirmation_for.as_deref() == Some(first_bad.location.as_str())
    });
    let pages = pd.requests().len();
    Outage {
        confirmation,
        paged_at,
        pages,
        incidents: db.incidents().len(),
        timeline: db.timeline().into_iter().map(|t| (t.0, t.2)).collect(),
        first_bad,
    }
}
