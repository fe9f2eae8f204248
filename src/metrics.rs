//! In-process metrics rendered in the Prometheus text format at `/metrics`. A small registry
//! of counters, gauges and fixed-bucket histograms keyed by name and labels: the agent
//! exports a few dozen series, which does not justify a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

type Key = (&'static str, Vec<(String, String)>);

/// Bucket bounds (seconds) of exported duration histograms.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Inner {
    counters: BTreeMap<Key, f64>,
    gauges: BTreeMap<Key, f64>,
    histograms: BTreeMap<Key, (Vec<u64>, f64, u64)>,
    help: BTreeMap<&'static str, (&'static str, &'static str)>,
}

/// Shared metrics registry. Clone freely.
#[derive(Clone, Default)]
pub struct Metrics(Arc<Mutex<Inner>>);

fn key(name: &'static str, labels: &[(&str, &str)]) -> Key {
    (
        name,
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Declare the HELP text and type of a metric (optional, once).
    pub fn describe(&self, name: &'static str, kind: &'static str, help: &'static str) {
        self.with(|i| i.help.insert(name, (kind, help)));
    }

    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1.0);
    }

    pub fn add(&self, name: &'static str, labels: &[(&str, &str)], v: f64) {
        self.with(|i| *i.counters.entry(key(name, labels)).or_default() += v);
    }

    pub fn set(&self, name: &'static str, labels: &[(&str, &str)], v: f64) {
        self.with(|i| i.gauges.insert(key(name, labels), v));
    }

    pub fn observe(&self, name: &'static str, labels: &[(&str, &str)], secs: f64) {
        self.with(|i| {
            let e = i
                .histograms
                .entry(key(name, labels))
                .or_insert_with(|| (vec![0; BUCKETS.len()], 0.0, 0));
            for (b, bound) in e.0.iter_mut().zip(BUCKETS) {
                if secs <= *bound {
                    *b += 1;
                }
            }
            e.1 += secs;
            e.2 += 1;
        });
    }

    pub fn get(&self, name: &'static str, labels: &[(&str, &str)]) -> f64 {
        let k = key(name, labels);
        self.with(|i| {
            i.counters
                .get(&k)
                .or_else(|| i.gauges.get(&k))
                .copied()
                .unwrap_or(0.0)
        })
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        self.with(|i| {
            let mut out = String::new();
            let mut last = "";
            let mut header = |out: &mut String, name: &'static str, default_kind: &str| {
                if name != last {
                    let (kind, help) = i.help.get(name).copied().unwrap_or((default_kind, ""));
                    if !help.is_empty() {
                        let _ = writeln!(out, "# HELP {name} {help}");
                    }
                    let _ = writeln!(out, "# TYPE {name} {kind}");
                    last = name;
                }
            };
            for ((name, labels), v) in &i.counters {
                header(&mut out, name, "counter");
                let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels, None));
            }
            for ((name, labels), v) in &i.gauges {
                header(&mut out, name, "gauge");
                let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels, None));
            }
            for ((name, labels), (buckets, sum, count)) in &i.histograms {
                header(&mut out, name, "histogram");
                for (b, bound) in buckets.iter().zip(BUCKETS) {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {b}",
                        fmt_labels(labels, Some(&bound.to_string()))
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {count}",
                    fmt_labels(labels, Some("+Inf"))
                );
                let _ = writeln!(out, "{name}_sum{} {sum}", fmt_labels(labels, None));
                let _ = writeln!(out, "{name}_count{} {count}", fmt_labels(labels, None));
            }
            out
        })
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn fmt_labels(labels: &[(String, String)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.describe("watchpost_runs_total", "counter", "Runs by outcome.");
        m.inc(
            "watchpost_runs_total",
            &[("probe", "a\"b"), ("outcome", "up")],
        );
        m.inc(
            "watchpost_runs_total",
            &[("probe", "a\"b"), ("outcome", "up")],
        );
        m.set("watchpost_probe_up", &[("probe", "x")], 1.0);
        m.observe("watchpost_probe_duration_seconds", &[("probe", "x")], 0.02);
        let t = m.render();
        assert!(t.contains("# TYPE watchpost_runs_total counter"));
        assert!(t.contains("watchpost_runs_total{probe=\"a\\\"b\",outcome=\"up\"} 2"));
        assert!(t.contains("watchpost_probe_up{probe=\"x\"} 1"));
        assert!(t.contains("watchpost_probe_duration_seconds_bucket{probe=\"x\",le=\"0.025\"} 1"));
        assert!(t.contains("watchpost_probe_duration_seconds_bucket{probe=\"x\",le=\"0.01\"} 0"));
        assert!(t.contains("watchpost_probe_duration_seconds_count{probe=\"x\"} 1"));
    }
}
