//! The agent's own metrics, served at `/metrics` in the Prometheus text format 0.0.4 by the
//! `prometheus` crate. Every family is defined here, once, with its help text, labels and
//! buckets; the README's metric list is checked against [`Metrics::catalog`] and a real
//! scrape. Not for probe history (that is the store) and not for per-request API details.
//!
//! Why `prometheus` and not `prometheus-client`: the latter writes only OpenMetrics text,
//! whose counter `# TYPE` lines the text-format linter (`promtool check metrics`, which the
//! suite runs) reads as help-less untyped series; and here an existing series is found from
//! borrowed `&str` label values (a hash of them, no allocation), so a run's observations
//! allocate nothing once their series exist (the hot path of issue 7).

use std::sync::Arc;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::proto::MetricType;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry,
};

/// Schedule lag is ~1–2 ms on a healthy agent: sub-millisecond to 1 s.
const LAG_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];
/// Probe phases: a millisecond (a local connect) to the 30 s a slow transcript may take.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
];
/// Transition to delivered notification: a fraction of a second to the hours retries take.
const DELAY_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];

/// A family with `N` labels. [`Labeled::with`] takes exactly `N` values, in the order the
/// family declares its labels, so a wrong count does not compile.
pub struct Labeled<V, const N: usize>(V);

impl<B: MetricVecBuilder, const N: usize> Labeled<MetricVec<B>, N> {
    /// The series of these label values, created at first use.
    pub fn with(&self, values: [&str; N]) -> B::M {
        // The only error is a label count other than the family's, which `[&str; N]` and
        // the `[&str; N]` names it was built with rule out.
        self.0
            .get_metric_with_label_values(&values)
            .unwrap_or_else(|e| unreachable!("label count checked by the type: {e}"))
    }
}

/// One family as `/metrics` exposes it and the README lists it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FamilyInfo {
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    pub labels: Vec<String>,
    pub help: String,
}

/// Every family of the agent. Reached through [`Metrics`] (which derefs to it).
pub struct Families {
    registry: Registry,
    catalog: Vec<FamilyInfo>,
    /// `watchpost_probe_up{probe}`: also set for sub-check series.
    pub probe_up: Labeled<GaugeVec, 1>,
    /// `watchpost_probe_outcome{probe}`.
    pub probe_outcome: Labeled<GaugeVec, 1>,
    /// `watchpost_probe_duration_seconds{probe,phase}`.
    pub probe_duration: Labeled<HistogramVec, 2>,
    /// `watchpost_probe_last_run_timestamp_seconds{probe}`.
    pub probe_last_run: Labeled<GaugeVec, 1>,
    /// `watchpost_probe_cert_expiry_timestamp_seconds{probe}`.
    pub probe_cert_expiry: Labeled<GaugeVec, 1>,
    /// `watchpost_listen_wer{probe}`.
    pub listen_wer: Labeled<GaugeVec, 1>,
    /// `watchpost_probe_paused{probe}`.
    pub probe_paused: Labeled<GaugeVec, 1>,
    /// `watchpost_runs_total{probe,outcome}`.
    pub runs: Labeled<IntCounterVec, 2>,
    /// `watchpost_runs_skipped_total{probe}`.
    pub runs_skipped: Labeled<IntCounterVec, 1>,
    /// `watchpost_probe_panics_total{probe}`.
    pub probe_panics: Labeled<IntCounterVec, 1>,
    /// `watchpost_schedule_lag_seconds`.
    pub schedule_lag: Histogram,
    /// `watchpost_component_status{component,status}`.
    pub component_status: Labeled<GaugeVec, 2>,
    /// `watchpost_incidents_opened_total{component}`.
    pub incidents_opened: Labeled<IntCounterVec, 1>,
    /// `watchpost_incident_open{component}`.
    pub incident_open: Labeled<GaugeVec, 1>,
    /// `watchpost_outbox_pending{notifier}`.
    pub outbox_pending: Labeled<GaugeVec, 1>,
    /// `watchpost_outbox_dead_letters{notifier}`.
    pub outbox_dead_letters: Labeled<GaugeVec, 1>,
    /// `watchpost_notifications_total{notifier,result}`.
    pub notifications: Labeled<IntCounterVec, 2>,
    /// `watchpost_notifier_circuit_open{notifier}`.
    pub notifier_circuit_open: Labeled<GaugeVec, 1>,
    /// `watchpost_notification_delay_seconds{notifier}`.
    pub notification_delay: Labeled<HistogramVec, 1>,
    /// `watchpost_api_connections`.
    pub api_connections: Gauge,
    /// `watchpost_api_connections_refused_total`.
    pub api_connections_refused: IntCounter,
    /// `watchpost_uptime_seconds`, set when scraped.
    pub uptime: Gauge,
    /// `watchpost_store_buffered_runs`, set when scraped (fleet mode).
    pub store_buffered: Gauge,
    /// `watchpost_store_dropped_runs_total`, brought up to the writer's count when scraped.
    pub store_dropped: IntCounter,
}

/// Shared metrics registry. Clone freely; each `Metrics::new()` is its own registry (tests
/// run many agents in one process).
#[derive(Clone)]
pub struct Metrics(Arc<Families>);

impl std::ops::Deref for Metrics {
    type Target = Families;
    fn deref(&self) -> &Families {
        &self.0
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers families and records them in the catalog.
struct Builder {
    registry: Registry,
    catalog: Vec<FamilyInfo>,
}

impl Builder {
    /// Register `c`, described by (`name`, `kind`, `labels`, `help`). The definitions are
    /// constants of this file and `Metrics::new` runs in every test: an invalid or
    /// duplicate one fails there, never on outside input.
    fn add<C: Collector + Clone + 'static>(
        &mut self,
        c: C,
        (name, kind, labels, help): (&str, &'static str, &[&str], &str),
    ) -> C {
        self.registry
            .register(Box::new(c.clone()))
            .unwrap_or_else(|e| panic!("metric {name}: {e}"));
        self.catalog.push(FamilyInfo {
            name: name.into(),
            kind,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            help: help.into(),
        });
        c
    }

    fn counter<const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        labels: [&str; N],
    ) -> Labeled<IntCounterVec, N> {
        let v = IntCounterVec::new(Opts::new(name, help), &labels)
            .unwrap_or_else(|e| panic!("metric {name}: {e}"));
        Labeled(self.add(v, (name, "counter", &labels, help)))
    }

    fn gauge<const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        labels: [&str; N],
    ) -> Labeled<GaugeVec, N> {
        let v = GaugeVec::new(Opts::new(name, help), &labels)
            .unwrap_or_else(|e| panic!("metric {name}: {e}"));
        Labeled(self.add(v, (name, "gauge", &labels, help)))
    }

    fn histogram<const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        labels: [&str; N],
        buckets: &[f64],
    ) -> Labeled<HistogramVec, N> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let v = HistogramVec::new(opts, &labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
        Labeled(self.add(v, (name, "histogram", &labels, help)))
    }

    /// The families of a collector whose series always exist (no labels of its own), as
    /// its first collection shows them.
    fn collector<C: Collector + 'static>(&mut self, c: C) {
        for mf in c.collect() {
            let kind = match mf.get_field_type() {
                MetricType::COUNTER => "counter",
                MetricType::HISTOGRAM => "histogram",
                _ => "gauge",
            };
            self.catalog.push(FamilyInfo {
                name: mf.name().into(),
                kind,
                labels: Vec::new(),
                help: mf.help().into(),
            });
        }
        self.registry
            .register(Box::new(c))
            .unwrap_or_else(|e| panic!("collector: {e}"));
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut b = Builder {
            registry: Registry::new(),
            catalog: Vec::new(),
        };
        let target = format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS);
        b.gauge(
            "watchpost_build_info",
            "Always 1; the labels say which build is running.",
            ["version", "target"],
        )
        .with([env!("CARGO_PKG_VERSION"), &target])
        .set(1.0);
        b.collector(prometheus::process_collector::ProcessCollector::for_self());
        Metrics(Arc::new(Families {
            probe_up: b.gauge(
                "watchpost_probe_up",
                "1 when the probe's last run was up or degraded, 0 when down (also per sub-check series).",
                ["probe"],
            ),
            probe_outcome: b.gauge(
                "watchpost_probe_outcome",
                "Last outcome: 0 up, 1 degraded, 2 down.",
                ["probe"],
            ),
            probe_duration: b.histogram(
                "watchpost_probe_duration_seconds",
                "Phase latency of runs, by probe and phase.",
                ["probe", "phase"],
                DURATION_BUCKETS,
            ),
            probe_last_run: b.gauge(
                "watchpost_probe_last_run_timestamp_seconds",
                "Unix time the probe's last run ended (a stalled probe falls behind).",
                ["probe"],
            ),
            probe_cert_expiry: b.gauge(
                "watchpost_probe_cert_expiry_timestamp_seconds",
                "Unix time the TLS certificate the HTTP probe last saw expires (its notAfter).",
                ["probe"],
            ),
            listen_wer: b.gauge(
                "watchpost_listen_wer",
                "Word error rate of the listen probe's last transcript against its reference (0 = exact).",
                ["probe"],
            ),
            probe_paused: b.gauge(
                "watchpost_probe_paused",
                "1 while the probe is paused (control API), 0 otherwise.",
                ["probe"],
            ),
            runs: b.counter(
                "watchpost_runs_total",
                "Runs by probe and outcome.",
                ["probe", "outcome"],
            ),
            runs_skipped: b.counter(
                "watchpost_runs_skipped_total",
                "Planned runs skipped because the previous run was still going.",
                ["probe"],
            ),
            probe_panics: b.counter(
                "watchpost_probe_panics_total",
                "Probe runs that panicked (recorded as down, class internal), by probe.",
                ["probe"],
            ),
            schedule_lag: b
                .histogram(
                    "watchpost_schedule_lag_seconds",
                    "Actual start minus planned start of runs.",
                    [],
                    LAG_BUCKETS,
                )
                .with([]),
            component_status: b.gauge(
                "watchpost_component_status",
                "1 for the component's current status, 0 for the others.",
                ["component", "status"],
            ),
            incidents_opened: b.counter(
                "watchpost_incidents_opened_total",
                "Incidents opened, by component.",
                ["component"],
            ),
            incident_open: b.gauge(
                "watchpost_incident_open",
                "1 while the component has an open incident.",
                ["component"],
            ),
            outbox_pending: b.gauge(
                "watchpost_outbox_pending",
                "Notifications queued and not yet delivered, by notifier.",
                ["notifier"],
            ),
            outbox_dead_letters: b.gauge(
                "watchpost_outbox_dead_letters",
                "Notifications given up on (dead-lettered), by notifier.",
                ["notifier"],
            ),
            notifications: b.counter(
                "watchpost_notifications_total",
                "Delivery attempts by notifier and result (delivered, retry, dead_letter).",
                ["notifier", "result"],
            ),
            notifier_circuit_open: b.gauge(
                "watchpost_notifier_circuit_open",
                "1 while the notifier's circuit breaker is open.",
                ["notifier"],
            ),
            notification_delay: b.histogram(
                "watchpost_notification_delay_seconds",
                "Time from the transition to the delivered notification.",
                ["notifier"],
                DELAY_BUCKETS,
            ),
            api_connections: b
                .gauge(
                    "watchpost_api_connections",
                    "Connections the API is serving.",
                    [],
                )
                .with([]),
            api_connections_refused: b
                .counter(
                    "watchpost_api_connections_refused_total",
                    "Connections closed at once because the API served its maximum already.",
                    [],
                )
                .with([]),
            uptime: b
                .gauge(
                    "watchpost_uptime_seconds",
                    "Seconds since the agent started.",
                    [],
                )
                .with([]),
            store_buffered: b
                .gauge(
                    "watchpost_store_buffered_runs",
                    "Fleet mode: runs buffered on local disk while Postgres is unreachable.",
                    [],
                )
                .with([]),
            store_dropped: b
                .counter(
                    "watchpost_store_dropped_runs_total",
                    "Fleet mode: runs lost while Postgres was unreachable (the outage buffer was full or could not be written).",
                    [],
                )
                .with([]),
            // Last: every family is registered by now.
            registry: b.registry,
            catalog: b.catalog,
        }))
    }

    /// Every family the agent can expose, sorted by name (a labelled family shows in a
    /// scrape once it has a series).
    pub fn catalog(&self) -> Vec<FamilyInfo> {
        let mut c = self.catalog.clone();
        c.sort();
        c
    }

    /// Prometheus text exposition format 0.0.4 ([`TEXT_FORMAT`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Only fails on families the registry already refused, or on a write to a String.
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// The `Content-Type` of [`Metrics::render`].
pub const TEXT_FORMAT: &str = prometheus::TEXT_FORMAT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_help_escaping_and_buckets() {
        let m = Metrics::new();
        m.runs.with(["a\"b\\c\nd", "up"]).inc();
        m.runs.with(["a\"b\\c\nd", "up"]).inc();
        m.probe_up.with(["x"]).set(1.0);
        m.probe_duration.with(["x", "connect"]).observe(0.02);
        m.schedule_lag.observe(0.0012);
        let t = m.render();
        assert!(
            t.contains("# HELP watchpost_runs_total Runs by probe and outcome.\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE watchpost_runs_total counter\n"), "{t}");
        assert!(
            t.contains("watchpost_runs_total{outcome=\"up\",probe=\"a\\\"b\\\\c\\nd\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("watchpost_probe_up{probe=\"x\"} 1\n"), "{t}");
        let d = "watchpost_probe_duration_seconds";
        assert!(
            t.contains(&format!(
                "{d}_bucket{{phase=\"connect\",probe=\"x\",le=\"0.01\"}} 0\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "{d}_bucket{{phase=\"connect\",probe=\"x\",le=\"0.025\"}} 1\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "{d}_bucket{{phase=\"connect\",probe=\"x\",le=\"+Inf\"}} 1\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!("{d}_count{{phase=\"connect\",probe=\"x\"}} 1\n")),
            "{t}"
        );
        // A lag of 1.2 ms lands between the 1 ms and 1.5 ms bounds, not in a first 5 ms bucket.
        let l = "watchpost_schedule_lag_seconds_bucket";
        assert!(t.contains(&format!("{l}{{le=\"0.001\"}} 0\n")), "{t}");
        assert!(t.contains(&format!("{l}{{le=\"0.0015\"}} 1\n")), "{t}");
        assert!(t.contains("watchpost_build_info{target=\""), "{t}");
        assert!(
            t.contains(&format!("version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"))),
            "{t}"
        );
        assert!(
            t.contains("# TYPE process_resident_memory_bytes gauge\n"),
            "{t}"
        );
        assert_eq!(t.matches("# TYPE watchpost_runs_total counter").count(), 1);
    }

    #[test]
    fn series_are_found_again_and_kept_apart() {
        let m = Metrics::new();
        m.runs.with(["a", "up"]).inc_by(2);
        m.runs.with(["a", "up"]).inc_by(3);
        m.runs.with(["a", "down"]).inc();
        m.probe_up.with(["a\nb\\"]).set(7.0);
        m.probe_up.with(["a\nb\\"]).set(8.0);
        assert_eq!(m.runs.with(["a", "up"]).get(), 5);
        assert_eq!(m.runs.with(["a", "down"]).get(), 1);
        assert_eq!(m.probe_up.with(["a\nb\\"]).get(), 8.0);
        assert_eq!(m.probe_up.with(["nope"]).get(), 0.0);
        // Each registry is its own: agents in one process do not share series.
        assert_eq!(Metrics::new().runs.with(["a", "up"]).get(), 0);
    }

    #[test]
    fn the_catalog_names_every_family_once_with_help() {
        let c = Metrics::new().catalog();
        let names: std::collections::BTreeSet<&str> = c.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names.len(), c.len(), "a family is registered twice: {c:?}");
        for f in &c {
            assert!(!f.help.is_empty(), "{} has no help", f.name);
            assert_eq!(f.kind == "counter", f.name.ends_with("_total"), "{f:?}");
        }
        for want in [
            "watchpost_build_info",
            "watchpost_probe_last_run_timestamp_seconds",
            "watchpost_probe_cert_expiry_timestamp_seconds",
            "watchpost_listen_wer",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(names.contains(want), "{want} missing from {names:?}");
        }
    }
}
