//! In-process metrics rendered in the Prometheus text format at `/metrics`. A small registry
//! of counters, gauges and fixed-bucket histograms keyed by name and labels: the agent
//! exports a few dozen series, which does not justify a metrics framework.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

/// Bucket bounds (seconds) of exported duration histograms, and the same bounds as they are
/// written in the `le` label.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BUCKET_LE: [&str; 12] = [
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30",
];

/// Series of one metric family, keyed by their label set as it is written in the exposition
/// format (`probe="api",outcome="up"`, escaped, no braces). Keying by the rendered text lets
/// an update find its series with a borrowed `&str` built in a reused buffer: a run's
/// observations allocate nothing once their series exist, and rendering copies the key.
type Family<V> = BTreeMap<&'static str, BTreeMap<String, V>>;

#[derive(Clone, Copy, Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct Inner {
    counters: Family<f64>,
    gauges: Family<f64>,
    histograms: Family<Histogram>,
    help: BTreeMap<&'static str, (&'static str, &'static str)>,
}

/// Shared metrics registry. Clone freely.
#[derive(Clone, Default)]
pub struct Metrics(Arc<Mutex<Inner>>);

thread_local! {
    /// Reused buffer for rendering a label set to look its series up.
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Write `k="v",…` with Prometheus escaping.
fn write_labels(out: &mut String, labels: &[(&str, &str)]) {
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Run `f` with the rendered label set of `labels`.
fn with_key<R>(labels: &[(&str, &str)], f: impl FnOnce(&str) -> R) -> R {
    KEY.with(|k| match k.try_borrow_mut() {
        Ok(mut k) => {
            k.clear();
            write_labels(&mut k, labels);
            f(&k)
        }
        // Only reachable if `f` re-entered; never the case, but do not panic over it.
        Err(_) => {
            let mut k = String::new();
            write_labels(&mut k, labels);
            f(&k)
        }
    })
}

/// The series `key` of family `name`, created with `V::default()` when new.
fn series<'a, V: Default>(fam: &'a mut Family<V>, name: &'static str, key: &str) -> &'a mut V {
    let m = fam.entry(name).or_default();
    if !m.contains_key(key) {
        m.insert(key.to_string(), V::default());
    }
    // Just inserted when missing.
    m.get_mut(key)
        .unwrap_or_else(|| unreachable!("series inserted above"))
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
        with_key(labels, |k| {
            self.with(|i| *series(&mut i.counters, name, k) += v)
        });
    }

    pub fn set(&self, name: &'static str, labels: &[(&str, &str)], v: f64) {
        with_key(labels, |k| {
            self.with(|i| *series(&mut i.gauges, name, k) = v)
        });
    }

    pub fn observe(&self, name: &'static str, labels: &[(&str, &str)], secs: f64) {
        with_key(labels, |k| {
            self.with(|i| {
                let h = series(&mut i.histograms, name, k);
                for (b, bound) in h.buckets.iter_mut().zip(BUCKETS) {
                    if secs <= *bound {
                        *b += 1;
                    }
                }
                h.sum += secs;
                h.count += 1;
            })
        });
    }

    pub fn get(&self, name: &'static str, labels: &[(&str, &str)]) -> f64 {
        with_key(labels, |k| {
            self.with(|i| {
                let find = |f: &Family<f64>| f.get(name).and_then(|m| m.get(k)).copied();
                find(&i.counters).or_else(|| find(&i.gauges)).unwrap_or(0.0)
            })
        })
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        self.with(|i| {
            let mut out = String::new();
            let header = |out: &mut String, name: &str, default_kind: &str| {
                let (kind, help) = i.help.get(name).copied().unwrap_or((default_kind, ""));
                if !help.is_empty() {
                    let _ = writeln!(out, "# HELP {name} {help}");
                }
                let _ = writeln!(out, "# TYPE {name} {kind}");
            };
            // `name{labels}` or `name{labels,extra}`; no braces when both are empty.
            let series = |out: &mut String, name: &str, suffix: &str, labels: &str, extra: &str| {
                out.push_str(name);
                out.push_str(suffix);
                if !labels.is_empty() || !extra.is_empty() {
                    out.push('{');
                    out.push_str(labels);
                    if !labels.is_empty() && !extra.is_empty() {
                        out.push(',');
                    }
                    out.push_str(extra);
                    out.push('}');
                }
                out.push(' ');
            };
            for (fam, kind) in [(&i.counters, "counter"), (&i.gauges, "gauge")] {
                for (name, m) in fam {
                    header(&mut out, name, kind);
                    for (labels, v) in m {
                        series(&mut out, name, "", labels, "");
                        let _ = writeln!(out, "{v}");
                    }
                }
            }
            let mut le = String::new();
            for (name, m) in &i.histograms {
                header(&mut out, name, "histogram");
                for (labels, h) in m {
                    for (b, bound) in h.buckets.iter().zip(BUCKET_LE) {
                        le.clear();
                        let _ = write!(le, "le=\"{bound}\"");
                        series(&mut out, name, "_bucket", labels, &le);
                        let _ = writeln!(out, "{b}");
                    }
                    series(&mut out, name, "_bucket", labels, "le=\"+Inf\"");
                    let _ = writeln!(out, "{}", h.count);
                    series(&mut out, name, "_sum", labels, "");
                    let _ = writeln!(out, "{}", h.sum);
                    series(&mut out, name, "_count", labels, "");
                    let _ = writeln!(out, "{}", h.count);
                }
            }
            out
        })
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
        assert!(t.contains("watchpost_probe_duration_seconds_bucket{probe=\"x\",le=\"+Inf\"} 1"));
        assert!(t.contains("watchpost_probe_duration_seconds_sum{probe=\"x\"} 0.02"));
        assert_eq!(t.matches("# TYPE watchpost_runs_total counter").count(), 1);
    }

    #[test]
    fn series_are_found_again_and_kept_apart() {
        let m = Metrics::new();
        m.add("c", &[("probe", "a"), ("outcome", "up")], 2.0);
        m.add("c", &[("probe", "a"), ("outcome", "up")], 3.0);
        m.inc("c", &[("probe", "a"), ("outcome", "down")]);
        m.inc("c", &[]);
        m.set("g", &[("probe", "a\nb\\")], 7.0);
        m.set("g", &[("probe", "a\nb\\")], 8.0);
        assert_eq!(m.get("c", &[("probe", "a"), ("outcome", "up")]), 5.0);
        assert_eq!(m.get("c", &[("probe", "a"), ("outcome", "down")]), 1.0);
        assert_eq!(m.get("c", &[]), 1.0);
        assert_eq!(m.get("g", &[("probe", "a\nb\\")]), 8.0);
        assert_eq!(m.get("g", &[("probe", "nope")]), 0.0);
        let t = m.render();
        assert!(t.contains("\nc 1\n"), "{t}");
        assert!(t.contains("g{probe=\"a\\nb\\\\\"} 8\n"), "{t}");
        m.observe("h", &[], 0.3);
        m.observe("h", &[], 40.0);
        let t = m.render();
        assert!(t.contains("h_bucket{le=\"0.25\"} 0\n"), "{t}");
        assert!(t.contains("h_bucket{le=\"0.5\"} 1\n"), "{t}");
        assert!(t.contains("h_bucket{le=\"30\"} 1\n"), "{t}");
        assert!(t.contains("h_bucket{le=\"+Inf\"} 2\n"), "{t}");
        assert!(t.contains("h_count 2\n"), "{t}");
    }
}
