//! Fleet failover and probe rebalancing with the default fleet timing (`[agent] fleet =
//! { heartbeat = "2s", lease = "10s" }`): real `watchpost run` processes against a
//! throwaway Postgres cluster (tests/common/pg.rs), as tests/fleet.rs drives them. Figures
//! for docs/BENCHMARKS.md, per round:
//!
//! - **failover**: two agents, an incident open and notified; the leader is SIGKILLed and
//!   the target recovers at that moment. Measured: SIGKILL → another agent holds the lease
//!   (`leases.acquired_at`), and SIGKILL → that agent's PagerDuty resolve arrives (which also
//!   waits for the component's own rules: two good runs at a 1 s interval and `recovery =
//!   "1s"`).
//! - **rebalancing**: two agents of one location share `--probes` probes at `--interval`
//!   seconds; one is SIGKILLed. Measured: SIGKILL → the first run of each of its probes on
//!   the other agent (read from the run feed in Postgres); worst and mean.
//!
//! - **confirmation** (`--confirm`, only this): two agents in two locations probe one target
//!   at `--interval` seconds, the second location half an interval after the first; the
//!   target fails for both (tests/common/confirm.rs). Measured: the first failing run → the
//!   PagerDuty trigger, with `[agent] fleet.confirm` on and off (`failure_threshold = 2`).
//!
//! `cargo bench --bench fleet -- --rounds 3 --interval 10 --probes 8`
//! `cargo bench --bench fleet -- --confirm --rounds 3 --interval 20`

#[path = "../tests/common/confirm.rs"]
mod confirm;
#[path = "../tests/common/fleet.rs"]
mod fleet;
#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "../tests/common/recorder.rs"]
mod recorder;

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::arg;
use fleet::{agent_config, http_probe, logs, now_ms, wait_for, Db, Proc};
use recorder::{Recorded, Recorder, Reply};

const TIMING: &str = "heartbeat = \"2s\", lease = \"10s\"";

/// SIGKILL → lease taken, SIGKILL → resolve delivered (ms).
async fn failover() -> (i64, i64) {
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
    let dir = tempfile::tempdir().unwrap();
    http_probe(
        dir.path(),
        "target",
        &format!("{}/health", target.url()),
        "1s",
    );
    let extra = format!(
        "[[component]]\nname = \"Target\"\nprobes = [\"target\"]\nfailure_threshold = 2\nsuccess_threshold = 2\nrecovery = \"1s\"\nnotify = [\"pager\"]\n\n\
         [notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"{}\"\nevents_url = \"{}/v2/enqueue\"\n\
         delivery = {{ retry_initial = \"100ms\", retry_max = \"300ms\", timeout = \"1s\", rate_limit = 50 }}\n",
        fleet::PD_VAR,
        pd.url()
    );
    let mut agents: Vec<Proc> = ["a", "b"]
        .iter()
        .map(|n| Proc::start(n, &agent_config(dir.path(), n, "eu", TIMING, &extra), &url))
        .collect();
    let db = Db::open(&url);
    pd.wait_ok("the trigger", 1, Duration::from_secs(60)).await;
    wait_for(
        "the trigger marked delivered",
        Duration::from_secs(30),
        || db.outbox().iter().all(|r| r.2 == "delivered").then_some(()),
        || logs(&agents.iter().collect::<Vec<_>>()),
    )
    .await;
    let (old, _) = db.leader().expect("a leader");
    let pid = db
        .members()
        .into_iter()
        .find(|m| m.0 == old)
        .map(|m| m.2)
        .expect("the leader's member row");
    let i = agents.iter().position(|a| a.pid() == pid).expect("ours");
    let killed = now_ms();
    agents[i].sigkill();
    failing.store(false, Ordering::SeqCst);
    let (_, acquired) = wait_for(
        "a new leader",
        Duration::from_secs(60),
        || db.leader().filter(|l| l.0 != old),
        || logs(&agents.iter().collect::<Vec<_>>()),
    )
    .await;
    let is_ok = |l: &[Recorded]| l.iter().filter(|r| r.status == 202).count() >= 2;
    pd.wait_for("the resolve", Duration::from_secs(60), is_ok)
        .await;
    (acquired - killed, now_ms() - killed)
}

/// SIGKILL → first run elsewhere of each of the dead agent's probes (ms).
async fn rebalancing(probes: usize, interval_s: u64) -> Vec<i64> {
    let cluster = pg::PgCluster::start();
    let url = cluster.default_url();
    let target = Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..probes).map(|i| format!("p{i:02}")).collect();
    for p in &names {
        http_probe(
            dir.path(),
            p,
            &format!("{}/{p}", target.url()),
            &format!("{interval_s}s"),
        );
    }
    let mut agents: Vec<Proc> = ["a", "b"]
        .iter()
        .map(|n| Proc::start(n, &agent_config(dir.path(), n, "eu", TIMING, ""), &url))
        .collect();
    let db = Db::open(&url);
    let interval_ms = interval_s as i64 * 1000;
    // Steady: both agents run probes, every probe on one agent.
    let owners = wait_for(
        "a steady split",
        Duration::from_secs(120),
        || {
            let runs = db.runs_since(now_ms() - 2 * interval_ms);
            let mut by: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> =
                Default::default();
            for r in &runs {
                by.entry(r.probe.as_str())
                    .or_default()
                    .insert(r.agent.as_str());
            }
            let agents: std::collections::BTreeSet<&str> = by.values().flatten().copied().collect();
            (by.len() == names.len() && by.values().all(|a| a.len() == 1) && agents.len() == 2)
                .then(|| {
                    by.iter()
                        .map(|(p, a)| (p.to_string(), a.iter().next().unwrap().to_string()))
                        .collect::<Vec<_>>()
                })
        },
        || logs(&agents.iter().collect::<Vec<_>>()),
    )
    .await;
    let members = db.members();
    let victim = &agents[0];
    let dead = members
        .iter()
        .find(|m| m.2 == victim.pid())
        .map(|m| m.0.clone())
        .expect("member row");
    let orphans: Vec<String> = owners
        .iter()
        .filter(|o| o.1 == dead)
        .map(|o| o.0.clone())
        .collect();
    let killed = now_ms();
    agents[0].sigkill();
    wait_for(
        "the orphans running elsewhere",
        Duration::from_secs(120),
        || {
            let runs = db.runs_since(killed);
            let t: Vec<i64> = orphans
                .iter()
                .filter_map(|p| {
                    runs.iter()
                        .find(|r| &r.probe == p && r.agent != dead)
                        .map(|r| r.at - killed)
                })
                .collect();
            (t.len() == orphans.len()).then_some(t)
        },
        || logs(&agents.iter().collect::<Vec<_>>()),
    )
    .await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = arg("--rounds", 3);
    let interval = arg("--interval", 10);
    let probes = arg("--probes", 8) as usize;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    if std::env::args().any(|a| a == "--confirm") {
        println!("load average at start: {}", load.trim());
        for r in 1..=rounds {
            for on in [true, false] {
                let o = confirm::outage_everywhere(
                    interval,
                    on,
                    Duration::from_secs(4 * interval + 60),
                    Duration::ZERO,
                )
                .await;
                println!(
                    "round {r} confirmation {}: interval {interval} s, first failing run from {} → page {:.1} s (confirmation run after {})",
                    if on { "on " } else { "off" },
                    o.first_bad.location,
                    o.time_to_page() as f64 / 1000.0,
                    o.confirmation
                        .map_or("—".to_string(), |c| format!("{:.1} s", (c.at - o.first_bad.at) as f64 / 1000.0))
                );
            }
        }
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!("load average at the end: {}", load.trim());
        return;
    }
    println!(
        "fleet timing: {TIMING}; load average at start: {}",
        load.trim()
    );
    for r in 1..=rounds {
        let (lease, resolve) = failover().await;
        println!(
            "round {r} failover: lease taken {:.1} s after the SIGKILL, resolve delivered after {:.1} s",
            lease as f64 / 1000.0,
            resolve as f64 / 1000.0
        );
    }
    for r in 1..=rounds {
        let t = rebalancing(probes, interval).await;
        let worst = t.iter().copied().max().unwrap_or(0);
        let mean = t.iter().sum::<i64>() as f64 / t.len().max(1) as f64;
        println!(
            "round {r} rebalancing ({} of {probes} probes moved, interval {interval} s): worst {:.1} s, mean {:.1} s",
            t.len(),
            worst as f64 / 1000.0,
            mean / 1000.0
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at the end: {}", load.trim());
}
