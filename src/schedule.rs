//! The scheduler: every probe on its own absolute schedule.
//!
//! Run `k` of a probe is planned at `origin + offset + k × interval`, where `offset` is a
//! stable hash of the probe's name (so 1,000 probes spread over the interval and keep their
//! place across restarts of equal config). A random jitter below `jitter` is added to each
//! planned start but never carried into the next one, so nothing drifts. A probe never
//! overlaps itself: when its previous run is still going at the next planned start, that
//! start is skipped and counted. Runs pass a global concurrency cap and a per-host rate
//! limit before they start; the time spent waiting there shows up as schedule lag.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ProbeConfig};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::pipeline::Shared;
use crate::probe::{run_confirmed_faulted, Attempt, ErrorClass, Probe, RunResult};
use crate::store::Store;

/// Stable 64-bit FNV-1a hash: the same name gives the same phase offset on every machine.
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// First-run offset of a probe within its interval.
pub fn phase_offset(name: &str, interval: Duration) -> Duration {
    let ms = interval.as_millis().max(1) as u64;
    Duration::from_millis(stable_hash(name) % ms)
}

/// One planned start.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// Index of the run on the schedule.
    pub index: u64,
    /// When the schedule says this run starts (jitter included).
    pub due: Instant,
}

/// A probe's schedule.
#[derive(Debug, Clone)]
pub struct Plan {
    pub interval: Duration,
    pub offset: Duration,
    pub jitter: Duration,
}

impl Plan {
    pub fn for_probe(p: &ProbeConfig) -> Plan {
        let offset = p
            .offset
            .unwrap_or_else(|| phase_offset(&p.name, p.interval));
        Plan {
            interval: p.interval,
            offset,
            jitter: p.jitter,
        }
    }
    fn planned(&self, origin: Instant, k: u64) -> Instant {
        origin + self.offset + self.interval.saturating_mul(k.min(u32::MAX as u64) as u32)
    }
}

/// One lock per probe, held by every run of it however it was started (its schedule,
/// run-now through the API, a confirmation another location asked for), so that two runs
/// of a probe never overlap: the schedule skips a slot whose probe is busy, run-now and
/// confirmations wait for the run in flight to end (it is bounded by the probe's timeouts).
#[derive(Clone, Default)]
pub struct Busy(Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

impl Busy {
    /// The lock of `probe`.
    pub fn of(&self, probe: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(probe.to_string()).or_default().clone()
    }
}

/// Drive one probe's schedule until `shutdown`. `run` starts a run for a slot (spawned on
/// `tracker`, holding the probe's `busy` lock); `skip` is told about slots skipped because
/// a run of the probe still goes, or because the process fell more than a whole interval
/// behind (e.g. a suspended host).
pub async fn probe_loop<R, Fut, S>(
    plan: Plan,
    origin: Instant,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    busy: Arc<tokio::sync::Mutex<()>>,
    run: R,
    mut skip: S,
) where
    R: Fn(Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    S: FnMut(Slot),
{
    let mut k: u64 = 0;
    loop {
        let planned = plan.planned(origin, k);
        // Whole milliseconds: the timer wheel fires on 1 ms ticks, so a sub-millisecond jitter
        // would be rounded up and could land past the configured bound.
        let jitter_ms = plan.jitter.as_millis() as u64;
        let jitter = if jitter_ms == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(rand::rng().random_range(0..jitter_ms))
        };
        let slot = Slot {
            index: k,
            due: planned + jitter,
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(slot.due) => {}
        }
        match busy.clone().try_lock_owned() {
            Err(_) => skip(slot),
            Ok(guard) => {
                let fut = run(slot);
                // The lock is released when the task ends, however it ends, so even a run
                // whose task dies leaves the probe on its schedule.
                tracker.spawn(async move {
                    let _guard = guard;
                    fut.await;
                });
            }
        }
        k += 1;
        // Fell behind by whole intervals (suspend, overload): skip those slots, don't burst.
        let now = Instant::now();
        while plan.planned(origin, k + 1) <= now {
            skip(Slot {
                index: k,
                due: plan.planned(origin, k),
            });
            k += 1;
        }
    }
}

/// Run one probe run, turning a panic inside it into a `down` run of class `internal` with
/// the panic message: the probe keeps its schedule, `watchpost_probe_panics_total{probe}`
/// counts it and `/health` shows it. `run` is what the scheduler runs
/// ([`crate::probe::run_confirmed_gated`]).
pub async fn guard_run<F>(
    name: &str,
    kind: &'static str,
    metrics: &Metrics,
    health: &Health,
    run: F,
) -> RunResult
where
    F: Future<Output = RunResult>,
{
    let started_at = chrono::Utc::now();
    let t0 = Instant::now();
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let msg = crate::pipeline::panic_message(panic.as_ref());
            metrics.probe_panics.with([name]).inc();
            health.probe_panicked(name, &msg);
            tracing::error!(probe = %name, panic = %msg, "probe run panicked; recorded as down (internal)");
            let mut a = Attempt::new();
            a.down(
                ErrorClass::Internal,
                format!("the probe run panicked (a watchpost bug, please report it): {msg}"),
            );
            RunResult {
                probe: name.to_string(),
                kind,
                started_at,
                duration: t0.elapsed(),
                lag: None,
                outcome: a.outcome,
                error: a.error,
                phases: a.phases,
                details: a.details,
                subchecks: a.subchecks,
            }
        }
    }
}

/// What a run passes before each attempt: the global concurrency cap and the per-host rate
/// limit. The permit is held only while an attempt runs.
#[derive(Clone)]
pub struct Gate {
    sem: Arc<Semaphore>,
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
}

impl Gate {
    /// The gate of `[agent] max_concurrency` and `host_rate_limit`.
    pub fn new(config: &Config) -> Gate {
        Gate {
            sem: Arc::new(Semaphore::new(config.agent.max_concurrency)),
            limiter: NonZeroU32::new(config.agent.host_rate_limit)
                .map(|n| Arc::new(RateLimiter::keyed(Quota::per_second(n)))),
        }
    }

    /// Wait for a concurrency permit and the host's turn.
    pub async fn pass(&self, host: &str) -> Option<OwnedSemaphorePermit> {
        let permit = self.sem.clone().acquire_owned().await.ok();
        if let Some(l) = &self.limiter {
            l.until_key_ready(&host.to_string()).await;
        }
        permit
    }
}

/// How often the scheduler stamps its beat, and how stale it may get.
const BEAT_EVERY: Duration = Duration::from_secs(1);
const STALE_AFTER: Duration = Duration::from_secs(10);

/// Runs every enabled probe of `config` on its schedule and sends results to `sink`.
pub struct Scheduler {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub store: Option<Store>,
    pub sink: mpsc::Sender<RunResult>,
    pub shared: Shared,
    /// The concurrency cap and per-host limit (shared with runs started through the API).
    pub gate: Gate,
}

impl Scheduler {
    /// Schedule until `shutdown`, then wait for in-flight runs until `force` (the shutdown
    /// deadline); runs still going then are abandoned (their results are not recorded).
    /// A probe loop that panics or ends before `shutdown` is an error naming the probe.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        force: CancellationToken,
    ) -> anyhow::Result<()> {
        let beat = self
            .shared
            .health
            .beat("scheduler", "scheduler", STALE_AFTER);
        let origin = Instant::now();
        let wall_origin_ms = chrono::Utc::now().timestamp_millis();
        let tracker = TaskTracker::new();
        let mut loops = JoinSet::new();
        let mut names = HashMap::new();
        let abandon = CancellationToken::new();
        let gate = self.gate.clone();
        for cfg in self.config.probes.iter().filter(|p| p.enabled) {
            let probe = match Probe::build_with(cfg, &self.shared.http) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::error!(probe = %cfg.name, error = %format!("{e:#}"), "probe cannot be built; not scheduled");
                    continue;
                }
            };
            let cfg = Arc::new(cfg.clone());
            let plan = Plan::for_probe(&cfg);
            let host = Arc::new(cfg.spec.host().unwrap_or_default());
            let (gate, sink, metrics, health, abandon, faults) = (
                gate.clone(),
                self.sink.clone(),
                self.metrics.clone(),
                self.shared.health.clone(),
                abandon.clone(),
                self.shared.faults.clone(),
            );
            let skip_store = self.store.clone();
            let skip_metrics = self.metrics.clone();
            let skip_name = cfg.name.clone();
            let loop_name = cfg.name.clone();
            let paused = self.shared.paused.clone();
            let ownership = self.shared.ownership.clone();
            let run = move |slot: Slot| {
                let owned = ownership.owns(&cfg.name);
                let (probe, cfg, gate, sink, metrics, health, host, abandon, paused, faults) = (
                    probe.clone(),
                    cfg.clone(),
                    gate.clone(),
                    sink.clone(),
                    metrics.clone(),
                    health.clone(),
                    host.clone(),
                    abandon.clone(),
                    paused.clone(),
                    faults.clone(),
                );
                async move {
                    // Paused through the API, or (fleet mode) another agent of this location
                    // runs the probe: the slot passes without a run (not a skip).
                    if !owned || paused.contains(&cfg.name) {
                        return;
                    }
                    let work = async {
                        let lag = OnceLock::new();
                        let (gate, host, metrics_ref, lag_ref) = (&gate, &host, &metrics, &lag);
                        let mut r = guard_run(&cfg.name, cfg.kind(), &metrics, &health, async {
                            run_confirmed_faulted(&probe, &cfg, Some(&faults), move || async move {
                                let permit = gate.pass(host).await;
                                // Lag is the wait before the first attempt only.
                                lag_ref.get_or_init(|| {
                                    let l = Instant::now().saturating_duration_since(slot.due);
                                    metrics_ref.schedule_lag.observe(l.as_secs_f64());
                                    l
                                });
                                permit
                            })
                            .await
                        })
                        .await;
                        r.lag = lag.get().copied();
                        let _ = sink.send(r).await;
                    };
                    tokio::select! {
                        _ = abandon.cancelled() => {}
                        _ = work => {}
                    }
                }
            };
            let skip = move |slot: Slot| {
                skip_metrics.runs_skipped.with([&skip_name]).inc();
                tracing::warn!(probe = %skip_name, run = slot.index, "a run of this probe is still going; this run is skipped");
                if let Some(store) = skip_store.clone() {
                    let planned_ms = wall_origin_ms + (slot.due - origin).as_millis() as i64;
                    let name = skip_name.clone();
                    tokio::spawn(async move { store.record_skip(&name, planned_ms).await });
                }
            };
            let h = loops.spawn(probe_loop(
                plan,
                origin,
                shutdown.clone(),
                tracker.clone(),
                self.shared.busy.of(&loop_name),
                run,
                skip,
            ));
            names.insert(h.id(), loop_name);
        }
        let mut tick = tokio::time::interval(BEAT_EVERY);
        // Stamp while scheduling; a probe loop that ends before shutdown is a fault. With no
        // probe at all the scheduler still runs (and stamps) until shutdown.
        let fault = loop {
            beat.stamp();
            let done = tokio::select! {
                _ = tick.tick() => continue,
                _ = shutdown.cancelled(), if loops.is_empty() => break None,
                Some(done) = loops.join_next_with_id() => done,
            };
            let (id, what) = match done {
                Ok((id, ())) => (id, "ended"),
                Err(e) if e.is_panic() => (e.id(), "panicked"),
                Err(e) => (e.id(), "was cancelled"),
            };
            if !shutdown.is_cancelled() || what != "ended" {
                let probe = names.get(&id).cloned().unwrap_or_default();
                break Some(format!("the schedule of probe {probe} {what}"));
            }
        };
        if fault.is_some() {
            loops.abort_all();
        }
        tracker.close();
        tokio::select! {
            _ = tracker.wait() => {}
            _ = force.cancelled() => {
                tracing::warn!(
                    in_flight = tracker.len(),
                    "shutdown deadline: abandoning in-flight runs"
                );
                abandon.cancel();
                tracker.wait().await;
            }
        }
        match fault {
            Some(f) => Err(anyhow::anyhow!(f)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    #[test]
    fn offsets_are_stable_and_spread() {
        let i = Duration::from_secs(60);
        assert_eq!(phase_offset("api-health", i), phase_offset("api-health", i));
        let mut buckets = [0u32; 10];
        for n in 0..1000 {
            let o = phase_offset(&format!("probe-{n}"), i);
            assert!(o < i);
            buckets[(o.as_millis() / 6000) as usize] += 1;
        }
        // 1,000 probes over 10 six-second buckets: each within ±40% of the mean.
        for b in buckets {
            assert!((60..=140).contains(&b), "{buckets:?}");
        }
    }

    fn plan(ms: u64) -> Plan {
        Plan {
            interval: Duration::from_millis(ms),
            offset: Duration::ZERO,
            jitter: Duration::ZERO,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_drift_over_many_runs() {
        let origin = Instant::now();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let s = starts.clone();
        let run = move |slot: Slot| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push((slot.index, Instant::now()));
                // Work that takes a while but less than the interval must not shift the schedule.
                tokio::time::sleep(Duration::from_millis(370)).await;
            }
        };
        let h = tokio::spawn(probe_loop(
            plan(1000),
            origin,
            token.clone(),
            tracker.clone(),
            Default::default(),
            run,
            |_| panic!("no skips expected"),
        ));
        tokio::time::sleep(Duration::from_millis(1000 * 1000 + 10)).await;
        token.cancel();
        h.await.unwrap();
        let starts = starts.lock().unwrap();
        assert_eq!(starts.len(), 1001);
        for (k, t) in starts.iter() {
            assert_eq!(
                *t - origin,
                Duration::from_millis(1000 * k),
                "run {k} drifted"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn never_overlaps_and_counts_skips() {
        let origin = Instant::now();
        let active = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(Mutex::new(0u32));
        let skips = Arc::new(Mutex::new(Vec::new()));
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let (a, r) = (active.clone(), runs.clone());
        let run = move |_slot: Slot| {
            let (a, r) = (a.clone(), r.clone());
            async move {
                assert!(!a.swap(true, Ordering::SeqCst), "overlapping runs");
                *r.lock().unwrap() += 1;
                tokio::time::sleep(Duration::from_millis(2500)).await; // 2.5 intervals
                a.store(false, Ordering::SeqCst);
            }
        };
        let sk = skips.clone();
        let h = tokio::spawn(probe_loop(
            plan(1000),
            origin,
            token.clone(),
            tracker.clone(),
            Default::default(),
            run,
            move |s| sk.lock().unwrap().push(s.index),
        ));
        tokio::time::sleep(Duration::from_millis(9_500)).await;
        token.cancel();
        h.await.unwrap();
        // Slots 0..=9: runs at 0, 3, 6, 9; skipped 1, 2, 4, 5, 7, 8.
        assert_eq!(*runs.lock().unwrap(), 4);
        assert_eq!(*skips.lock().unwrap(), vec![1, 2, 4, 5, 7, 8]);
    }

    /// A run started elsewhere (run-now, a confirmation) holds the probe: the slots it
    /// covers are skipped, the next ones run.
    #[tokio::test(start_paused = true)]
    async fn slots_are_skipped_while_another_run_holds_the_probe() {
        let origin = Instant::now();
        let busy = Busy::default();
        let held = busy.of("p");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _g = held.lock_owned().await;
            tokio::time::sleep(Duration::from_millis(2000)).await;
        });
        let (runs, skips) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(Mutex::new(Vec::new())),
        );
        let (r, sk) = (runs.clone(), skips.clone());
        let token = CancellationToken::new();
        let h = tokio::spawn(probe_loop(
            plan(1000),
            origin,
            token.clone(),
            TaskTracker::new(),
            busy.of("p"),
            move |slot: Slot| {
                let r = r.clone();
                async move { r.lock().unwrap().push(slot.index) }
            },
            move |s| sk.lock().unwrap().push(s.index),
        ));
        tokio::time::sleep(Duration::from_millis(4_500)).await;
        token.cancel();
        h.await.unwrap();
        assert_eq!(*runs.lock().unwrap(), vec![0, 3, 4]);
        assert_eq!(*skips.lock().unwrap(), vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_stays_within_bound_and_does_not_accumulate() {
        let origin = Instant::now();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let token = CancellationToken::new();
        let s = starts.clone();
        let run = move |slot: Slot| {
            let s = s.clone();
            async move { s.lock().unwrap().push((slot.index, Instant::now())) }
        };
        let p = Plan {
            interval: Duration::from_secs(10),
            offset: Duration::from_secs(3),
            jitter: Duration::from_millis(500),
        };
        let h = tokio::spawn(probe_loop(
            p,
            origin,
            token.clone(),
            TaskTracker::new(),
            Default::default(),
            run,
            |_| {},
        ));
        tokio::time::sleep(Duration::from_secs(10 * 200)).await;
        token.cancel();
        h.await.unwrap();
        let starts = starts.lock().unwrap();
        assert_eq!(starts.len(), 200);
        for (k, t) in starts.iter() {
            let planned = Duration::from_secs(3 + 10 * k);
            let d = *t - origin;
            assert!(
                d >= planned && d < planned + Duration::from_millis(500),
                "run {k} at {d:?}"
            );
        }
    }

    /// The wrapper the scheduler puts around every run, with a run that panics: each slot
    /// still runs (the probe keeps its schedule), each becomes a down run of class
    /// `internal` carrying the panic message, and the counter and `/health` show it.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_run_becomes_down_internal_and_the_probe_keeps_its_schedule() {
        let origin = Instant::now();
        let (metrics, health) = (Metrics::new(), Health::new());
        let results = Arc::new(Mutex::new(Vec::new()));
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (m, h, out) = (metrics.clone(), health.clone(), results.clone());
        let run = move |slot: Slot| {
            let (m, h, out) = (m.clone(), h.clone(), out.clone());
            async move {
                let r = guard_run("flaky", "http", &m, &h, async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if slot.index.is_multiple_of(2) {
                        panic!("dotted number in slot {}", slot.index);
                    }
                    let mut a = Attempt::new();
                    a.phase("total", Duration::from_millis(20));
                    RunResult {
                        probe: "flaky".into(),
                        kind: "http",
                        started_at: chrono::Utc::now(),
                        duration: Duration::from_millis(20),
                        lag: None,
                        outcome: a.outcome,
                        error: None,
                        phases: a.phases,
                        details: a.details,
                        subchecks: a.subchecks,
                    }
                })
                .await;
                out.lock().unwrap().push((slot.index, r));
            }
        };
        let skips = Arc::new(Mutex::new(0u32));
        let sk = skips.clone();
        let l = tokio::spawn(probe_loop(
            plan(1000),
            origin,
            token.clone(),
            tracker.clone(),
            Default::default(),
            run,
            move |_| *sk.lock().unwrap() += 1,
        ));
        tokio::time::sleep(Duration::from_millis(5_500)).await;
        token.cancel();
        l.await.unwrap();
        tracker.close();
        tracker.wait().await;
        assert_eq!(*skips.lock().unwrap(), 0, "no slot skipped after a panic");
        let results = results.lock().unwrap();
        let indices: Vec<u64> = results.iter().map(|r| r.0).collect();
        assert_eq!(indices, [0, 1, 2, 3, 4, 5], "every slot ran");
        for (k, r) in results.iter() {
            if k % 2 == 0 {
                assert_eq!(r.outcome, crate::probe::Outcome::Down, "slot {k}");
                let e = r.error.as_ref().unwrap();
                assert_eq!(e.class, ErrorClass::Internal);
                assert!(
                    e.message.contains(&format!("dotted number in slot {k}")),
                    "{}",
                    e.message
                );
                assert_eq!(r.probe, "flaky");
            } else {
                assert_eq!(r.outcome, crate::probe::Outcome::Up, "slot {k}");
            }
        }
        assert_eq!(metrics.probe_panics.with(["flaky"]).get(), 3);
        assert_eq!(health.probes().status(), "degraded");
    }
}
