//! The agent's own health: each part of the pipeline (scheduler, evaluator, dispatcher and
//! its notifier workers) stamps a [`Beat`] as it makes progress, the supervisor records the
//! part that died, and probe runs that panicked are counted. `/health` turns this into the
//! health contract: a part is failing when it died or its last stamp is older than its
//! limit (wedged). The store writer is checked by a ping through its queue (see `api`).
//!
//! Not here: deciding to stop the daemon (that is the supervisor in `crate::pipeline`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The parts `/health` reports besides the writer, in order.
pub const PARTS: &[&str] = &["scheduler", "evaluator", "dispatcher"];

struct BeatInner {
    part: &'static str,
    name: String,
    stale_after: Duration,
    /// Milliseconds since the registry's start at the last stamp.
    last_ms: AtomicU64,
}

/// A progress stamp of one loop. Cheap to clone.
#[derive(Clone)]
pub struct Beat {
    inner: Arc<BeatInner>,
    origin: Instant,
}

impl Beat {
    /// Record progress now.
    pub fn stamp(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.inner.last_ms.store(ms, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct State {
    /// A loop's beat counts while the loop keeps it: a part that stopped on purpose (a
    /// fleet agent that no longer leads drops its evaluator) is not reported as wedged.
    beats: Vec<Weak<BeatInner>>,
    faults: BTreeMap<String, String>,
    /// Per probe: panicked runs and the last panic message.
    panics: BTreeMap<String, (u64, String)>,
}

/// Shared health registry. Clone freely.
#[derive(Clone)]
pub struct Health {
    origin: Instant,
    state: Arc<Mutex<State>>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

/// One entry of `checks` in the health contract.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    Ok { latency_ms: f64 },
    Degraded { error: String },
    Fail { error: String },
}

impl Check {
    pub fn status(&self) -> &'static str {
        match self {
            Check::Ok { .. } => "ok",
            Check::Degraded { .. } => "degraded",
            Check::Fail { .. } => "fail",
        }
    }
    pub fn to_json(&self) -> Value {
        match self {
            Check::Ok { latency_ms } => {
                json!({"status": "ok", "latency_ms": (latency_ms * 100.0).round() / 100.0})
            }
            Check::Degraded { error } | Check::Fail { error } => {
                json!({"status": self.status(), "error": error})
            }
        }
    }
}

impl Health {
    pub fn new() -> Health {
        Health {
            origin: Instant::now(),
            state: Arc::default(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Register a loop of `part` that must stamp at least every `stale_after`; it starts
    /// stamped now.
    pub fn beat(&self, part: &'static str, name: &str, stale_after: Duration) -> Beat {
        let inner = Arc::new(BeatInner {
            part,
            name: name.to_string(),
            stale_after,
            last_ms: AtomicU64::new(self.origin.elapsed().as_millis() as u64),
        });
        self.with(|s| {
            s.beats.retain(|b| b.strong_count() > 0);
            s.beats.push(Arc::downgrade(&inner));
        });
        Beat {
            inner,
            origin: self.origin,
        }
    }

    /// Record that a part died (panicked, failed or returned before shutdown).
    pub fn fail(&self, part: &str, why: &str) {
        self.with(|s| s.faults.insert(part.to_string(), why.to_string()));
    }

    /// Record a probe run that panicked.
    pub fn probe_panicked(&self, probe: &str, message: &str) {
        self.with(|s| {
            let e = s.panics.entry(probe.to_string()).or_default();
            e.0 += 1;
            e.1 = message.to_string();
        });
    }

    /// Seconds since the registry was made (the agent's uptime).
    pub fn uptime(&self) -> Duration {
        self.origin.elapsed()
    }

    /// The check of one part: dead, wedged (a beat older than its limit) or ok with the age
    /// of its oldest beat. `None` when the part was never registered (not running here).
    pub fn part(&self, part: &str) -> Option<Check> {
        let now = self.origin.elapsed().as_millis() as u64;
        self.with(|s| {
            if let Some(why) = s.faults.get(part) {
                return Some(Check::Fail { error: why.clone() });
            }
            let mut oldest: Option<u64> = None;
            for b in s
                .beats
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|b| b.part == part)
            {
                let age = now.saturating_sub(b.last_ms.load(Ordering::Relaxed));
                if age > b.stale_after.as_millis() as u64 {
                    return Some(Check::Fail {
                        error: format!(
                            "wedged: {} made no progress for {:.1} s (limit {:.1} s)",
                            b.name,
                            age as f64 / 1000.0,
                            b.stale_after.as_secs_f64()
                        ),
                    });
                }
                oldest = Some(oldest.map_or(age, |o| o.max(age)));
            }
            let known = oldest.is_some() || s.faults.contains_key(part);
            known.then(|| Check::Ok {
                latency_ms: oldest.unwrap_or(0) as f64,
            })
        })
    }

    /// Probe runs that panicked: degraded (the probes keep running, but watchpost has a bug
    /// that needs a look), with the count and the last message.
    pub fn probes(&self) -> Check {
        self.with(|s| {
            if s.panics.is_empty() {
                return Check::Ok { latency_ms: 0.0 };
            }
            let total: u64 = s.panics.values().map(|p| p.0).sum();
            let list: Vec<String> = s
                .panics
                .iter()
                .map(|(probe, (n, msg))| format!("{probe} ×{n} (last: {msg})"))
                .collect();
            Check::Degraded {
                error: format!(
                    "{total} probe run(s) panicked and were recorded as down/internal: {}",
                    list.join("; ")
                ),
            }
        })
    }

    /// Every non-writer check that applies, in contract order.
    pub fn checks(&self) -> Vec<(String, Check)> {
        let mut out: Vec<(String, Check)> = PARTS
            .iter()
            .filter_map(|p| self.part(p).map(|c| (p.to_string(), c)))
            .collect();
        out.push(("probes".into(), self.probes()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_older_than_its_limit_fails_its_part() {
        let h = Health::new();
        let b = h.beat("evaluator", "evaluator", Duration::from_millis(30));
        assert_eq!(h.part("evaluator").map(|c| c.status()), Some("ok"));
        assert_eq!(h.part("scheduler"), None);
        std::thread::sleep(Duration::from_millis(60));
        match h.part("evaluator") {
            Some(Check::Fail { error }) => assert!(error.contains("wedged"), "{error}"),
            other => panic!("{other:?}"),
        }
        b.stamp();
        assert_eq!(h.part("evaluator").map(|c| c.status()), Some("ok"));
        h.fail("evaluator", "panicked: boom");
        assert_eq!(
            h.part("evaluator"),
            Some(Check::Fail {
                error: "panicked: boom".into()
            })
        );
    }

    #[test]
    fn probe_panics_degrade() {
        let h = Health::new();
        assert_eq!(h.probes().status(), "ok");
        h.probe_panicked("api", "boom");
        h.probe_panicked("api", "bang");
        match h.probes() {
            Check::Degraded { error } => assert!(error.contains("api ×2 (last: bang)"), "{error}"),
            other => panic!("{other:?}"),
        }
    }
}
