//! The scheduler: every probe on its own absolute schedule.
//!
//! Run `k` of a probe is planned at `origin + offset + k × interval`, where `offset` is a
//! stable hash of the probe's name (so 1,000 probes spread over the interval and keep their
//! place across restarts of equal config). A random jitter below `jitter` is added to each
//! planned start but never carried into the next one, so nothing drifts. A probe never
//! overlaps itself: when its previous run is still going at the next planned start, that
//! start is skipped and counted. Runs pass a global concurrency cap and a per-host rate
//! limit before they start; the time spent waiting there shows up as schedule lag.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ProbeConfig};
use crate::metrics::Metrics;
use crate::probe::{run_confirmed, Probe, RunResult};
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

/// Drive one probe's schedule until `shutdown`. `run` starts a run for a slot (spawned on
/// `tracker`); `skip` is told about slots skipped because the previous run still goes, or
/// because the process fell more than a whole interval behind (e.g. a suspended host).
pub async fn probe_loop<R, Fut, S>(
    plan: Plan,
    origin: Instant,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    run: R,
    mut skip: S,
) where
    R: Fn(Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    S: FnMut(Slot),
{
    let running = Arc::new(AtomicBool::new(false));
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
        if running.load(Ordering::Acquire) {
            skip(slot);
        } else {
            running.store(true, Ordering::Release);
            let fut = run(slot);
            let flag = running.clone();
            tracker.spawn(async move {
                fut.await;
                flag.store(false, Ordering::Release);
            });
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

/// Runs every enabled probe of `config` on its schedule and sends results to `sink`.
pub struct Scheduler {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub store: Option<Store>,
    pub sink: mpsc::Sender<RunResult>,
}

impl Scheduler {
    /// Schedule until `shutdown`, then wait up to `grace` for in-flight runs; runs still going
    /// after that are abandoned (their results are not recorded).
    pub async fn run(self, shutdown: CancellationToken) {
        let origin = Instant::now();
        let wall_origin_ms = chrono::Utc::now().timestamp_millis();
        let tracker = TaskTracker::new();
        let loops = TaskTracker::new();
        let force = CancellationToken::new();
        let sem = Arc::new(Semaphore::new(self.config.agent.max_concurrency));
        let limiter: Option<Arc<DefaultKeyedRateLimiter<String>>> =
            NonZeroU32::new(self.config.agent.host_rate_limit)
                .map(|n| Arc::new(RateLimiter::keyed(Quota::per_second(n))));
        for cfg in self.config.probes.iter().filter(|p| p.enabled) {
            let probe = match Probe::build(cfg) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::error!(probe = %cfg.name, error = %format!("{e:#}"), "probe cannot be built; not scheduled");
                    continue;
                }
            };
            let cfg = Arc::new(cfg.clone());
            let plan = Plan::for_probe(&cfg);
            let host = cfg.spec.host().unwrap_or_default();
            let (sem, limiter, sink, metrics, force) = (
                sem.clone(),
                limiter.clone(),
                self.sink.clone(),
                self.metrics.clone(),
                force.clone(),
            );
            let skip_store = self.store.clone();
            let skip_metrics = self.metrics.clone();
            let skip_name = cfg.name.clone();
            let run = move |slot: Slot| {
                let (probe, cfg, sem, limiter, sink, metrics, host, force) = (
                    probe.clone(),
                    cfg.clone(),
                    sem.clone(),
                    limiter.clone(),
                    sink.clone(),
                    metrics.clone(),
                    host.clone(),
                    force.clone(),
                );
                async move {
                    let work = async {
                        let Ok(_permit) = sem.acquire().await else {
                            return;
                        };
                        if let Some(l) = &limiter {
                            l.until_key_ready(&host).await;
                        }
                        let lag = Instant::now().saturating_duration_since(slot.due);
                        metrics.observe("watchpost_schedule_lag_seconds", &[], lag.as_secs_f64());
                        let mut r = run_confirmed(&probe, &cfg).await;
                        r.lag = Some(lag);
                        let _ = sink.send(r).await;
                    };
                    tokio::select! {
                        _ = force.cancelled() => {}
                        _ = work => {}
                    }
                }
            };
            let skip = move |slot: Slot| {
                skip_metrics.inc("watchpost_runs_skipped_total", &[("probe", &skip_name)]);
                tracing::warn!(probe = %skip_name, run = slot.index, "previous run still going; this run is skipped");
                if let Some(store) = skip_store.clone() {
                    let planned_ms = wall_origin_ms + (slot.due - origin).as_millis() as i64;
                    let name = skip_name.clone();
                    tokio::spawn(async move { store.record_skip(&name, planned_ms).await });
                }
            };
            loops.spawn(probe_loop(
                plan,
                origin,
                shutdown.clone(),
                tracker.clone(),
                run,
                skip,
            ));
        }
        loops.close();
        loops.wait().await;
        tracker.close();
        let grace = self.config.agent.shutdown_grace;
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                in_flight = tracker.len(),
                "shutdown grace over; abandoning in-flight runs"
            );
            force.cancel();
            tracker.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
