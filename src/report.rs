//! `watchpost report`: the latency-budget review. Per series and phase over a window: runs,
//! availability (up / degraded / down), p50/p95/p99/max from the merged stored histograms,
//! the budget and a verdict, the same figures for the previous window of equal length and
//! the change, and a trend in buckets sized to the window. Per component: its objective,
//! availability, error budget and burn rate, and its incidents with time to detect, time to
//! page and duration. Rehearsals held in the window. The worst regressions come first.
//!
//! Rendered as a terminal table, JSON, Markdown, CSV or one self-contained HTML file with
//! inline SVG charts ([`render`]). Not here: scheduling the review (see `review`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::time::Duration;

use crate::store::db::{self, params, Conn};
use serde::Serialize;
use serde_json::Value;

use crate::config::{duration::human, Budget, Config};
use crate::notify::event::iso;
use crate::probe::human_ms;
use crate::slo::{self, Shares};
use crate::store::{self, hist, Counts};

/// Output formats of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Markdown,
    Csv,
    Html,
}

/// One line of the report: a series and phase.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub series: String,
    pub phase: String,
    pub runs: u64,
    /// Runs not down, in percent.
    pub availability_pct: Option<f64>,
    pub up_pct: Option<f64>,
    pub degraded_pct: Option<f64>,
    pub down_pct: Option<f64>,
    pub samples: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub budget: Option<BudgetView>,
    /// `ok`, `over` (some percentile over budget), `no_budget` or `no_data`.
    pub verdict: &'static str,
    /// Which percentiles are over, e.g. `p95 1.9s > 1.5s`.
    pub over: Vec<String>,
    /// The same figures over the previous window of equal length.
    pub previous: Figures,
    /// This window against the previous one.
    pub change: Change,
    /// Buckets across the window, oldest first.
    pub trend: Vec<TrendPoint>,
    /// Fleet-wide rows: the same figures per location (absent with one location).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub locations: Vec<LocationFigures>,
}

/// The figures of a series and phase as one location measured them.
#[derive(Debug, Clone, Serialize)]
pub struct LocationFigures {
    pub location: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// Figures of a series and phase over one window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub runs: u64,
    pub availability_pct: Option<f64>,
    pub samples: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub verdict: &'static str,
}

/// Differences to the previous window (this minus previous).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Change {
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// p95 change relative to the previous p95, in percent.
    pub p95_pct: Option<f64>,
    /// Availability change in percentage points.
    pub availability_pts: Option<f64>,
    /// `better`, `worse`, `same` or `new` (nothing to compare with).
    pub direction: &'static str,
}

/// One bucket of a trend.
#[derive(Debug, Clone, Serialize)]
pub struct TrendPoint {
    /// Start of the bucket (RFC 3339).
    pub at: String,
    pub at_ms: i64,
    pub runs: u64,
    pub availability_pct: Option<f64>,
    pub samples: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetView {
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub run_ms: Option<f64>,
}

/// A component over the window, and its error budget over its SLO window.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentRow {
    pub component: String,
    pub objective: Option<String>,
    /// Over the report window, maintenance left out.
    #[serde(flatten)]
    pub window: Shares,
    /// Burn rate over the report window (1.0 spends the budget exactly over the SLO window).
    pub burn_rate: Option<f64>,
    /// Over the SLO window ending with the report window.
    pub slo_window: String,
    pub slo_availability_pct: Option<f64>,
    pub error_budget_remaining_pct: Option<f64>,
    pub incidents: usize,
    /// Buckets across the window (same as the rows' trend).
    pub trend: Vec<AvailabilityPoint>,
}

impl ComponentRow {
    /// The burn rate as the tables show it (`2.50×`, `-` without an objective).
    fn burn_cell(&self) -> String {
        self.burn_rate
            .map(|b| format!("{b:.2}×"))
            .unwrap_or_else(|| "-".into())
    }

    /// The error budget left (`80.0% <window>`, `-` without an objective).
    fn budget_left_cell(&self, window: &str) -> String {
        self.error_budget_remaining_pct
            .map(|b| format!("{b:.1}% {window}"))
            .unwrap_or_else(|| "-".into())
    }
}

/// Availability of one bucket.
#[derive(Debug, Clone, Serialize)]
pub struct AvailabilityPoint {
    pub at_ms: i64,
    pub runs: u64,
    pub availability_pct: Option<f64>,
    pub down: u64,
    pub degraded: u64,
}

/// An incident that overlaps the window.
#[derive(Debug, Clone, Serialize)]
pub struct IncidentRow {
    pub id: i64,
    pub component: String,
    pub worst_status: String,
    pub opened_at: String,
    pub opened_at_ms: i64,
    pub resolved_at: Option<String>,
    pub resolved_at_ms: Option<i64>,
    /// Open incidents: until the end of the window.
    pub duration_s: f64,
    /// First bad run of the member that opened it → the incident.
    pub time_to_detect_s: Option<f64>,
    /// First bad run → first delivered notification of the opening.
    pub time_to_page_s: Option<f64>,
    pub cause: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The one location this report covers (`--location`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The locations whose histograms are merged in it (absent on a single machine).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub locations: Vec<String>,
    pub window: String,
    pub since: String,
    pub until: String,
    /// Size of a trend bucket.
    pub bucket: String,
    pub rows: Vec<Row>,
    pub components: Vec<ComponentRow>,
    pub incidents: Vec<IncidentRow>,
    /// Rehearsals held in the window (empty when none were recorded).
    pub rehearsals: Vec<Value>,
}

impl Report {
    /// The report of an agent that has no database yet.
    pub fn empty(window: Duration, now_ms: i64) -> Report {
        let since = now_ms - window.as_millis() as i64;
        Report {
            location: None,
            locations: vec![],
            window: human(window),
            since: secs(since),
            until: secs(now_ms),
            bucket: human(bucket_for(window)),
            rows: vec![],
            components: vec![],
            incidents: vec![],
            rehearsals: vec![],
        }
    }
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn secs(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Trend buckets: the smallest of a few round sizes that gives at most 30 buckets.
pub fn bucket_for(window: Duration) -> Duration {
    const SIZES: [u64; 11] = [
        60,
        300,
        900,
        1800,
        3600,
        3 * 3600,
        6 * 3600,
        12 * 3600,
        86400,
        7 * 86400,
        30 * 86400,
    ];
    let w = window.as_secs().max(1);
    let s = SIZES
        .into_iter()
        .find(|s| w.div_ceil(*s) <= 30)
        .unwrap_or(w.div_ceil(30));
    Duration::from_secs(s)
}

/// Latency of every series and phase over `[since, until)` in buckets of `bucket_ms`:
/// hourly rows where the runs are gone (an hour lands in the bucket where it starts), runs
/// after that.
/// Per (series, phase): one histogram per bucket (`None`: no sample in it).
type Buckets = BTreeMap<(String, String), Vec<Option<hist::Hist>>>;

fn latency_buckets(
    conn: &Conn,
    only: Option<&str>,
    since: i64,
    until: i64,
    bucket_ms: i64,
) -> db::Result<Buckets> {
    let n = ((until - since).max(1) + bucket_ms - 1) / bucket_ms;
    let n = n.clamp(1, 10_000) as usize;
    let slot = |t: i64| (((t - since).max(0) / bucket_ms) as usize).min(n - 1);
    let fine_from = hist::meta_value(conn, "fine_from")?;
    let mut out: Buckets = BTreeMap::new();
    let series = match only {
        Some(name) => hist::series_named(conn, name)?.into_iter().collect(),
        None => hist::series_names(conn)?,
    };
    let only_id = series.keys().next().copied().filter(|_| only.is_some());
    let mut add = |name: &str, phase: &str, i: usize, h: &hist::Hist| {
        let v = out
            .entry((name.to_string(), phase.to_string()))
            .or_insert_with(|| vec![None; n]);
        let _ = v[i].get_or_insert_with(hist::new_hist).add(h);
    };
    let hi = until.min(fine_from);
    if since < hi {
        // One series (a chart) by its index; all of them (a report) by time.
        let mut st = conn.prepare_cached(if only_id.is_some() {
            "SELECT series, bucket_start, data FROM hourly WHERE series = ?3
             AND bucket_start >= ?1 AND bucket_start < ?2"
        } else {
            "SELECT series, bucket_start, data FROM hourly WHERE bucket_start >= ?1 AND bucket_start < ?2
             AND CAST(?3 AS BIGINT) IS NULL"
        })?;
        st.query_each(params![hist::floor_hour(since), hi, only_id], |r| {
            let Some(s) = series.get(&r.get::<_, i64>(0)?) else {
                return Ok(());
            };
            let i = slot(r.get(1)?);
            for (p, h) in hist::decode_hour(r.blob(2)).unwrap_or_default() {
                if let Some(phase) = s.phases.get(p) {
                    add(&s.name, phase, i, &h);
                }
            }
            Ok(())
        })?;
    }
    let lo = since.max(fine_from);
    if lo < until {
        for (id, s) in &series {
            let mut per: Vec<Vec<Option<hist::Hist>>> = Vec::new();
            store::each_run(conn, &[*id], (lo, until), |_, r| {
                let i = slot(r.started_at);
                let _ = store::codec::decode(r.phases, |p, us| {
                    if per.len() <= p {
                        per.resize(p + 1, vec![None; n]);
                    }
                    hist::record(per[p][i].get_or_insert_with(hist::new_hist), us);
                });
            })?;
            for (p, buckets) in per.into_iter().enumerate() {
                let Some(phase) = s.phases.get(p) else {
                    continue;
                };
                for (i, h) in buckets.into_iter().enumerate() {
                    if let Some(h) = h {
                        add(&s.name, phase, i, &h);
                    }
                }
            }
        }
    }
    Ok(out)
}

fn merged(buckets: &[Option<hist::Hist>]) -> hist::Hist {
    let mut h = hist::new_hist();
    for b in buckets.iter().flatten() {
        let _ = h.add(b);
    }
    h
}

fn quantile(h: &hist::Hist, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| us_to_ms(h.value_at_quantile(q)))
}

fn figures(h: &hist::Hist, c: Counts, budget: Option<&Budget>) -> Figures {
    Figures {
        runs: c.total(),
        availability_pct: c.availability(),
        samples: h.len(),
        p50_ms: quantile(h, 0.50),
        p95_ms: quantile(h, 0.95),
        p99_ms: quantile(h, 0.99),
        max_ms: (!h.is_empty()).then(|| us_to_ms(h.max())),
        verdict: judge(h, budget).0,
    }
}

fn sum(v: &[Counts]) -> Counts {
    let mut t = Counts::default();
    for c in v {
        t += *c;
    }
    t
}

fn change(now: &Figures, prev: &Figures) -> Change {
    let d = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a - b);
    let p95_pct = now
        .p95_ms
        .zip(prev.p95_ms)
        .filter(|(_, b)| *b > 0.0)
        .map(|(a, b)| 100.0 * (a - b) / b);
    let availability_pts = d(now.availability_pct, prev.availability_pct);
    // Worse: p95 up by more than 10 %, or availability down by more than 0.1 points.
    let direction = match (p95_pct, availability_pts) {
        (None, None) => "new",
        (p, a) if p.is_some_and(|p| p > 10.0) || a.is_some_and(|a| a < -0.1) => "worse",
        (p, a) if p.is_some_and(|p| p < -10.0) || a.is_some_and(|a| a > 0.1) => "better",
        _ => "same",
    };
    Change {
        p50_ms: d(now.p50_ms, prev.p50_ms),
        p95_ms: d(now.p95_ms, prev.p95_ms),
        p99_ms: d(now.p99_ms, prev.p99_ms),
        p95_pct,
        availability_pts,
        direction,
    }
}

/// The budget of a series and phase: the probe's own phases, or a sub-check named by a
/// `[budget]` key.
fn budget_of<'c>(config: &'c Config, series: &str, phase: &str) -> Option<&'c Budget> {
    let probe = series.split('/').next().unwrap_or(series);
    config.probe(probe)?.series_budget(series, phase)
}

/// Outcome counts per series, in buckets.
type CountBuckets = HashMap<String, Vec<Counts>>;

/// What one location (or the fleet, merged) measured over the window and the one before.
#[derive(Default)]
struct Measured {
    lat: Buckets,
    prev_lat: Buckets,
    counts: CountBuckets,
    prev_counts: CountBuckets,
}

/// Add `from`'s histograms into `into`, bucket by bucket (HDR histograms merge exactly).
fn merge_buckets(into: &mut Buckets, from: &Buckets) {
    for (k, v) in from {
        let t = into.entry(k.clone()).or_insert_with(|| vec![None; v.len()]);
        for (slot, h) in t.iter_mut().zip(v) {
            if let Some(h) = h {
                let _ = slot.get_or_insert_with(hist::new_hist).add(h);
            }
        }
    }
}

/// Add `from`'s counts into `into`, bucket by bucket.
fn merge_counts(into: &mut CountBuckets, from: &CountBuckets) {
    for (k, v) in from {
        let t = into
            .entry(k.clone())
            .or_insert_with(|| vec![Counts::default(); v.len()]);
        for (slot, c) in t.iter_mut().zip(v) {
            *slot += *c;
        }
    }
}

impl Measured {
    /// Every location's measurements merged into one.
    fn merged(all: &[Measured]) -> Measured {
        let mut m = Measured::default();
        for x in all {
            merge_buckets(&mut m.lat, &x.lat);
            merge_buckets(&mut m.prev_lat, &x.prev_lat);
            merge_counts(&mut m.counts, &x.counts);
            merge_counts(&mut m.prev_counts, &x.prev_counts);
        }
        m
    }
}

/// Build the fleet-wide report for the window ending at `now_ms` (on a single machine: its
/// one location).
pub fn build(
    config: &Config,
    conn: &Conn,
    window: Duration,
    now_ms: i64,
) -> anyhow::Result<Report> {
    build_for(config, conn, window, now_ms, None)
}

/// Build the report of one location (`Some`), or of the fleet (`None`): per series and phase,
/// every location's histograms merged, and the same figures per location when there are
/// several.
pub fn build_for(
    config: &Config,
    conn: &Conn,
    window: Duration,
    now_ms: i64,
    location: Option<&str>,
) -> anyhow::Result<Report> {
    let w = (window.as_millis() as i64).max(1000);
    let since = now_ms - w;
    let prev_since = since - w;
    let bucket_ms = (bucket_for(window).as_millis() as i64).max(1000);
    let locs = store::view_locations(conn, location)?;
    let per = store::each_location(conn, &locs, |_| {
        Ok(Measured {
            lat: latency_buckets(conn, None, since, now_ms, bucket_ms)?,
            prev_lat: latency_buckets(conn, None, prev_since, since, w)?,
            counts: store::outcomes(conn, None, since, now_ms, bucket_ms)?,
            prev_counts: store::outcomes(conn, None, prev_since, since, w)?,
        })
    })?;
    let all;
    let fleet = match per.as_slice() {
        [one] => one,
        _ => {
            all = Measured::merged(&per);
            &all
        }
    };
    let Measured {
        lat,
        prev_lat,
        counts,
        prev_counts,
    } = fleet;
    let by_location: Vec<(&String, &Measured)> = if per.len() > 1 {
        locs.iter().zip(&per).collect()
    } else {
        Vec::new()
    };
    let mut series: BTreeSet<String> = counts.keys().cloned().collect();
    series.extend(lat.keys().map(|(s, _)| s.clone()));
    let starts: Vec<i64> = (0..)
        .map(|i| since + i * bucket_ms)
        .take_while(|t| *t < now_ms)
        .collect();
    let mut rows = Vec::new();
    for s in series {
        let cb = counts.get(&s).cloned().unwrap_or_default();
        let c = sum(&cb);
        let pc = prev_counts.get(&s).map(|v| sum(v)).unwrap_or_default();
        let shares = Shares::from(c);
        let phases: Vec<&(String, String)> = lat.keys().filter(|(x, _)| *x == s).collect();
        let phases: Vec<Option<&(String, String)>> = if phases.is_empty() {
            vec![None]
        } else {
            phases.into_iter().map(Some).collect()
        };
        for key in phases {
            let phase = key.map(|k| k.1.as_str()).unwrap_or("-");
            let empty = Vec::new();
            let buckets = key.and_then(|k| lat.get(k)).unwrap_or(&empty);
            let h = merged(buckets);
            let budget = budget_of(config, &s, phase).copied();
            let (verdict, over) = judge(&h, budget.as_ref());
            let now_f = figures(&h, c, budget.as_ref());
            let ph = key
                .and_then(|k| prev_lat.get(k))
                .map(|b| merged(b))
                .unwrap_or_else(hist::new_hist);
            let previous = figures(&ph, pc, budget.as_ref());
            let trend = starts
                .iter()
                .enumerate()
                .map(|(i, at)| {
                    let h = buckets.get(i).and_then(Option::as_ref);
                    let c = cb.get(i).copied().unwrap_or_default();
                    TrendPoint {
                        at: secs(*at),
                        at_ms: *at,
                        runs: c.total(),
                        availability_pct: c.availability(),
                        samples: h.map_or(0, |h| h.len()),
                        p50_ms: h.and_then(|h| quantile(h, 0.50)),
                        p95_ms: h.and_then(|h| quantile(h, 0.95)),
                        p99_ms: h.and_then(|h| quantile(h, 0.99)),
                    }
                })
                .collect();
            let locations = by_location
                .iter()
                .filter_map(|(l, m)| {
                    let c = m.counts.get(&s).map(|v| sum(v));
                    let h = key.and_then(|k| m.lat.get(k)).map(|b| merged(b));
                    if c.is_none() && h.is_none() {
                        return None;
                    }
                    Some(LocationFigures {
                        location: l.to_string(),
                        figures: figures(
                            &h.unwrap_or_else(hist::new_hist),
                            c.unwrap_or_default(),
                            budget.as_ref(),
                        ),
                    })
                })
                .collect();
            rows.push(Row {
                locations,
                series: s.clone(),
                phase: phase.to_string(),
                runs: c.total(),
                availability_pct: shares.availability_pct,
                up_pct: shares.up_pct,
                degraded_pct: shares.degraded_pct,
                down_pct: shares.down_pct,
                samples: h.len(),
                p50_ms: now_f.p50_ms,
                p95_ms: now_f.p95_ms,
                p99_ms: now_f.p99_ms,
                max_ms: now_f.max_ms,
                budget: budget.as_ref().map(budget_view),
                verdict: if key.is_none() { "no_data" } else { verdict },
                over,
                change: change(&now_f, &previous),
                previous,
                trend,
            });
        }
    }
    rows.sort_by(|a, b| {
        regression(b).total_cmp(&regression(a)).then_with(|| {
            (a.series.as_str(), a.phase.as_str()).cmp(&(b.series.as_str(), b.phase.as_str()))
        })
    });
    let incidents = incidents(conn, config, since, now_ms)?;
    let mut components = Vec::new();
    for comp in &config.components {
        let name = comp.name.get_ref();
        let members: Vec<String> = comp.probes.iter().map(|p| p.get_ref().clone()).collect();
        let spans = slo::maintenance_spans(conn, name, since, now_ms)?;
        let mut per = vec![Counts::default(); starts.len().max(1)];
        // Every location's runs count.
        let mut slo_c = Counts::default();
        store::each_location(conn, &locs, |_| {
            for (a, b) in slo::outside(since, now_ms, &spans) {
                // Buckets aligned with the trend: counted from `since`.
                let parts = store::outcomes_from(conn, Some(&members), since, a, b, bucket_ms)?;
                for v in parts.into_values() {
                    let last = per.len() - 1;
                    for (i, c) in v.into_iter().enumerate() {
                        per[i.min(last)] += c;
                    }
                }
            }
            slo_c += slo::component_counts(
                conn,
                comp,
                now_ms - comp.slo_window.0.as_millis() as i64,
                now_ms,
            )?;
            Ok(())
        })?;
        let c = sum(&per);
        let objective = comp.objective();
        components.push(ComponentRow {
            component: name.clone(),
            objective: objective.map(|o| o.to_string()),
            window: c.into(),
            burn_rate: objective.and_then(|o| slo::burn_rate(&c, o)),
            slo_window: human(comp.slo_window.0),
            slo_availability_pct: slo_c.availability(),
            error_budget_remaining_pct: objective.and_then(|o| slo::budget_remaining(&slo_c, o)),
            incidents: incidents.iter().filter(|i| &i.component == name).count(),
            trend: starts
                .iter()
                .zip(&per)
                .map(|(at, c)| AvailabilityPoint {
                    at_ms: *at,
                    runs: c.total(),
                    availability_pct: c.availability(),
                    down: c.down,
                    degraded: c.degraded,
                })
                .collect(),
        });
    }
    Ok(Report {
        location: location.map(str::to_string),
        locations: if locs.iter().all(String::is_empty) {
            vec![]
        } else {
            locs
        },
        window: human(window),
        since: secs(since),
        until: secs(now_ms),
        bucket: human(Duration::from_millis(bucket_ms as u64)),
        rows,
        components,
        incidents,
        rehearsals: rehearsals(conn, since, now_ms)?,
    })
}

/// One series' latency and availability over a window, for the dashboard's charts.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesChart {
    pub series: String,
    pub window: String,
    pub since_ms: i64,
    pub until_ms: i64,
    pub bucket_ms: i64,
    /// Phase → budget.
    pub budgets: BTreeMap<String, BudgetView>,
    pub points: Vec<ChartPoint>,
}

/// One bucket of a [`SeriesChart`].
#[derive(Debug, Clone, Serialize)]
pub struct ChartPoint {
    pub at_ms: i64,
    pub runs: u64,
    pub availability_pct: Option<f64>,
    pub down: u64,
    pub degraded: u64,
    /// Phase → [p50, p95, p99] in ms.
    pub phases: BTreeMap<String, [f64; 3]>,
}

/// Chart buckets: about 40 across the window, whole minutes.
pub fn chart_bucket(window: Duration) -> Duration {
    let secs = window.as_secs().div_ceil(40).max(60);
    Duration::from_secs(secs.div_ceil(60) * 60)
}

/// One series' chart over the window ending at `now_ms`: indexed reads of that series only,
/// in one location (`Some`) or every location merged (`None`).
pub fn series_chart(
    config: &Config,
    conn: &Conn,
    series: &str,
    window: Duration,
    now_ms: i64,
    location: Option<&str>,
) -> db::Result<SeriesChart> {
    let w = window.as_millis() as i64;
    let bucket_ms = chart_bucket(window).as_millis() as i64;
    // Buckets on whole multiples, so a refresh moves the chart by whole buckets.
    let until = (now_ms / bucket_ms + 1) * bucket_ms;
    let since = until - w.max(bucket_ms);
    let locs = match location {
        Some(l) => vec![l.to_string()],
        None => store::locations(conn)?,
    };
    let names = [series.to_string()];
    let mut lat = Buckets::new();
    let mut all = CountBuckets::new();
    store::each_location(conn, &locs, |_| {
        merge_buckets(
            &mut lat,
            &latency_buckets(conn, Some(series), since, until, bucket_ms)?,
        );
        merge_counts(
            &mut all,
            &store::outcomes(conn, Some(&names), since, until, bucket_ms)?,
        );
        Ok(())
    })?;
    let counts = all.remove(series).unwrap_or_default();
    let n = ((until - since) / bucket_ms) as usize;
    let points = (0..n)
        .map(|i| {
            let c = counts.get(i).copied().unwrap_or_default();
            let phases = lat
                .iter()
                .filter_map(|((_, phase), b)| {
                    let h = b.get(i)?.as_ref()?;
                    let q = |x| quantile(h, x).unwrap_or(0.0);
                    Some((phase.clone(), [q(0.50), q(0.95), q(0.99)]))
                })
                .collect();
            ChartPoint {
                at_ms: since + i as i64 * bucket_ms,
                runs: c.total(),
                availability_pct: c.availability(),
                down: c.down,
                degraded: c.degraded,
                phases,
            }
        })
        .collect();
    let budgets = lat
        .keys()
        .filter_map(|(_, phase)| {
            let b = budget_of(config, series, phase)?;
            Some((phase.clone(), budget_view(b)))
        })
        .collect();
    Ok(SeriesChart {
        series: series.to_string(),
        window: human(window),
        since_ms: since,
        until_ms: until,
        bucket_ms,
        budgets,
        points,
    })
}

fn budget_view(b: &Budget) -> BudgetView {
    BudgetView {
        p50_ms: b.p50.map(|d| d.0.as_secs_f64() * 1e3),
        p95_ms: b.p95.map(|d| d.0.as_secs_f64() * 1e3),
        p99_ms: b.p99.map(|d| d.0.as_secs_f64() * 1e3),
        run_ms: b.run.map(|d| d.0.as_secs_f64() * 1e3),
    }
}

/// How much worse a row got: over budget first, then by p95 growth and availability loss.
fn regression(r: &Row) -> f64 {
    let over = if r.verdict == "over" { 1e6 } else { 0.0 };
    let p95 = r.change.p95_pct.unwrap_or(0.0);
    let avail = -r.change.availability_pts.unwrap_or(0.0) * 100.0;
    over + p95.max(avail)
}

/// Incidents overlapping `[since, until)`, with time to detect and time to page.
fn incidents(conn: &Conn, config: &Config, since: i64, until: i64) -> db::Result<Vec<IncidentRow>> {
    if !conn.table_exists("incidents")? {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare(
        "SELECT id, component, worst_status, opened_at, resolved_at, cause_member, cause_class, cause_message
         FROM incidents WHERE opened_at < ?2 AND (resolved_at IS NULL OR resolved_at >= ?1)
         ORDER BY opened_at LIMIT 1000",
    )?;
    let rows: Vec<(IncidentRow, Option<String>)> = st
        .query_map(params![since, until], |r| {
            let opened: i64 = r.get(3)?;
            let resolved: Option<i64> = r.get(4)?;
            let member: Option<String> = r.get(5)?;
            let class: Option<String> = r.get(6)?;
            let message: Option<String> = r.get(7)?;
            let row = IncidentRow {
                id: r.get(0)?,
                component: r.get(1)?,
                worst_status: r.get(2)?,
                opened_at: iso(opened),
                opened_at_ms: opened,
                resolved_at: resolved.map(iso),
                resolved_at_ms: resolved,
                duration_s: (resolved.unwrap_or(until) - opened) as f64 / 1000.0,
                time_to_detect_s: None,
                time_to_page_s: None,
                cause: member.as_ref().map(|m| {
                    format!(
                        "{m} [{}] {}",
                        class.unwrap_or_default(),
                        message.unwrap_or_default()
                    )
                }),
            };
            Ok((row, member))
        })?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (mut row, member) in rows {
        let members: Vec<String> = match member {
            Some(m) => vec![m],
            None => config
                .components
                .iter()
                .find(|c| c.name.get_ref() == &row.component)
                .map(|c| c.probes.iter().map(|p| p.get_ref().clone()).collect())
                .unwrap_or_default(),
        };
        let opened = row.opened_at_ms;
        // A sub-check missing from a failed run has no run of its own: its probe's counts.
        let first_bad = members
            .iter()
            .map(|m| match first_bad_run(conn, m, opened)? {
                None if m.contains('/') => {
                    first_bad_run(conn, m.split('/').next().unwrap_or(m), opened)
                }
                found => Ok(found),
            })
            .collect::<db::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .min();
        let delivered: Option<i64> = conn
            .prepare_cached(
                "SELECT min(finished_at) FROM outbox WHERE incident_id = ?1 AND kind = 'opened' AND status = 'delivered'",
            )?
            .query_row([row.id], |r| r.get(0))?;
        let s = |ms: i64| ms as f64 / 1000.0;
        row.time_to_detect_s = first_bad.map(|b| s(opened - b));
        row.time_to_page_s = first_bad.zip(delivered).map(|(b, d)| s(d - b));
        out.push(row);
    }
    Ok(out)
}

/// Start of the first bad run of the streak of `series` that was going on at `at`: the
/// runs back from `at` to the last up run before it.
fn first_bad_run(conn: &Conn, series: &str, at: i64) -> db::Result<Option<i64>> {
    let ids: Vec<i64> = conn.query_map("SELECT id FROM series WHERE name = ?1", [series], |r| {
        r.get(0)
    })?;
    let mut first: Option<i64> = None;
    for id in ids {
        store::runs_back(conn, id, at, |r| {
            if r.outcome == 0 {
                return r.started_at >= at;
            }
            first = Some(first.map_or(r.started_at, |f| f.min(r.started_at)));
            true
        })?;
    }
    Ok(first)
}

/// Rows of the `rehearsals` table (when the agent records them) that fall in the window,
/// as JSON objects of their columns.
fn rehearsals(conn: &Conn, since: i64, until: i64) -> db::Result<Vec<Value>> {
    let names = conn.columns("rehearsals")?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let time_col = ["started_at", "start", "at", "created_at"]
        .into_iter()
        .find(|c| names.iter().any(|n| n == c));
    let mut out = Vec::new();
    // The window in SQL when the table has a time column (the newest 1000 rows otherwise).
    let sql = match time_col {
        Some(c) => format!(
            "SELECT * FROM rehearsals WHERE {c} >= {since} AND {c} < {until} ORDER BY {c} LIMIT 1000"
        ),
        None => "SELECT * FROM rehearsals ORDER BY 1 DESC LIMIT 1000".to_string(),
    };
    conn.query_each(&sql, [], |r| {
        let mut m = serde_json::Map::new();
        for (i, n) in names.iter().enumerate() {
            let v = match r.get::<_, db::Value>(i)? {
                db::Value::Null => Value::Null,
                db::Value::Int(x) => Value::from(x),
                db::Value::Real(x) => Value::from(x),
                db::Value::Text(t) => serde_json::from_str::<Value>(&t)
                    .ok()
                    .filter(|v| v.is_object() || v.is_array())
                    .unwrap_or(Value::from(t)),
                db::Value::Blob(_) => continue,
            };
            m.insert(n.clone(), v);
        }
        let inside = match time_col.and_then(|c| m.get(c)).and_then(Value::as_i64) {
            Some(t) => t >= since && t < until,
            None => true,
        };
        if inside {
            out.push(Value::Object(m));
        }
        Ok(())
    })?;
    Ok(out)
}

/// Compare percentiles with a budget.
pub fn judge(h: &hist::Hist, budget: Option<&Budget>) -> (&'static str, Vec<String>) {
    let Some(b) = budget.filter(|b| b.p50.is_some() || b.p95.is_some() || b.p99.is_some()) else {
        return (if h.is_empty() { "no_data" } else { "no_budget" }, vec![]);
    };
    if h.is_empty() {
        return ("no_data", vec![]);
    }
    let mut over = Vec::new();
    for (name, q, limit) in [
        ("p50", 0.50, b.p50),
        ("p95", 0.95, b.p95),
        ("p99", 0.99, b.p99),
    ] {
        if let Some(limit) = limit {
            let v = Duration::from_micros(h.value_at_quantile(q));
            if v > limit.0 {
                over.push(format!("{name} {} > {}", human_ms(v), human(limit.0)));
            }
        }
    }
    (if over.is_empty() { "ok" } else { "over" }, over)
}

fn cell(v: Option<f64>) -> String {
    v.map(|ms| human_ms(Duration::from_secs_f64(ms.max(0.0) / 1000.0)))
        .unwrap_or_else(|| "-".into())
}

fn pct(v: Option<f64>) -> String {
    v.map(|a| format!("{a:.2}%")).unwrap_or_else(|| "-".into())
}

fn signed_pct(v: Option<f64>) -> String {
    v.map(|a| format!("{a:+.0}%")).unwrap_or_else(|| "-".into())
}

fn secs_cell(v: Option<f64>) -> String {
    v.map(|s| {
        if s < 60.0 {
            format!("{s:.1}s")
        } else {
            crate::notify::event::human_span((s * 1000.0) as i64)
        }
    })
    .unwrap_or_else(|| "-".into())
}

fn budget_cell(b: &Option<BudgetView>) -> String {
    let Some(b) = b else { return "-".into() };
    let mut parts = Vec::new();
    for (n, v) in [("p50", b.p50_ms), ("p95", b.p95_ms), ("p99", b.p99_ms)] {
        if let Some(v) = v {
            parts.push(format!("{n}≤{}", cell(Some(v))));
        }
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn verdict_cell(row: &Row) -> String {
    if row.over.is_empty() {
        row.verdict.to_string()
    } else {
        format!("OVER: {}", row.over.join(", "))
    }
}

/// Which locations the figures cover (`None` on a single machine).
fn scope_line(r: &Report) -> Option<String> {
    match (&r.location, r.locations.as_slice()) {
        (Some(l), _) => Some(format!("location {l} only")),
        (None, []) => None,
        (None, [one]) => Some(format!("location {one}")),
        (None, all) => Some(format!(
            "fleet-wide: the histograms of {} locations merged ({}), each location's figures under its row",
            all.len(),
            all.join(", ")
        )),
    }
}

/// Rows with a per-location breakdown, each with its locations.
fn location_rows(r: &Report) -> impl Iterator<Item = (&Row, &LocationFigures)> {
    r.rows
        .iter()
        .flat_map(|row| row.locations.iter().map(move |l| (row, l)))
}

/// The cells of a per-location line (Markdown and HTML): series, phase, location, runs,
/// availability, p50, p95, p99, max, verdict.
fn location_cells(row: &Row, l: &LocationFigures) -> [String; 10] {
    let f = &l.figures;
    [
        row.series.clone(),
        row.phase.clone(),
        l.location.clone(),
        f.runs.to_string(),
        pct(f.availability_pct),
        cell(f.p50_ms),
        cell(f.p95_ms),
        cell(f.p99_ms),
        cell(f.max_ms),
        f.verdict.to_string(),
    ]
}

/// Render in `format`.
pub fn render(r: &Report, format: Format) -> anyhow::Result<String> {
    Ok(match format {
        Format::Table => render_table(r),
        Format::Json => serde_json::to_string_pretty(r)? + "\n",
        Format::Markdown => render_markdown(r),
        Format::Csv => render_csv(r),
        Format::Html => render_html(r),
    })
}

pub fn render_table(r: &Report) -> String {
    let mut out = format!(
        "latency budget review, last {} ({} → {}), previous window for comparison\n\n",
        r.window, r.since, r.until
    );
    if let Some(line) = scope_line(r) {
        let _ = writeln!(out, "{line}\n");
    }
    if r.rows.is_empty() {
        out.push_str("no runs recorded in this window\n");
    } else {
        let trend = format!("p95 per {}", r.bucket);
        // One character a bucket (the sparklines are as long as the trend).
        let tw = (r.rows.iter().map(|row| row.trend.len())).fold(trend.chars().count(), usize::max);
        let _ = writeln!(
            out,
            "{:<32} {:<13} {:>6} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7}  {:<22} {:<tw$}  verdict",
            "series",
            "phase",
            "runs",
            "avail",
            "degr",
            "p50",
            "p95",
            "p99",
            "max",
            "Δp95",
            "budget",
            trend
        );
        for row in &r.rows {
            let _ = writeln!(
                out,
                "{:<32} {:<13} {:>6} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7}  {:<22} {:<tw$}  {}",
                row.series,
                row.phase,
                row.runs,
                pct(row.availability_pct),
                pct(row.degraded_pct),
                cell(row.p50_ms),
                cell(row.p95_ms),
                cell(row.p99_ms),
                cell(row.max_ms),
                signed_pct(row.change.p95_pct),
                budget_cell(&row.budget),
                p95_trend(row),
                verdict_cell(row)
            );
            for l in &row.locations {
                let f = &l.figures;
                let _ = writeln!(
                    out,
                    "{:<32} {:<13} {:>6} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7}  {:<22} {}",
                    format!("  @ {}", l.location),
                    "",
                    f.runs,
                    pct(f.availability_pct),
                    "",
                    cell(f.p50_ms),
                    cell(f.p95_ms),
                    cell(f.p99_ms),
                    cell(f.max_ms),
                    "",
                    "",
                    f.verdict
                );
            }
        }
    }
    if !r.components.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<28} {:>9} {:>6} {:>9} {:>8} {:>8} {:>7} {:>16} {:>9}  availability per {}",
            "component",
            "objective",
            "runs",
            "avail",
            "degr",
            "down",
            "burn",
            "budget left",
            "incidents",
            r.bucket
        );
        for c in &r.components {
            let _ = writeln!(
                out,
                "{:<28} {:>9} {:>6} {:>9} {:>8} {:>8} {:>7} {:>16} {:>9}  {}",
                c.component,
                c.objective.as_deref().unwrap_or("-"),
                c.window.runs,
                pct(c.window.availability_pct),
                pct(c.window.degraded_pct),
                pct(c.window.down_pct),
                c.burn_cell(),
                c.budget_left_cell(&format!("of {}", c.slo_window)),
                c.incidents,
                availability_trend(c)
            );
        }
    }
    if !r.incidents.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<5} {:<28} {:<16} {:<25} {:>10} {:>10} {:>10}",
            "id", "component", "worst", "opened", "detect", "page", "duration"
        );
        for i in &r.incidents {
            let _ = writeln!(
                out,
                "{:<5} {:<28} {:<16} {:<25} {:>10} {:>10} {:>10}{}",
                i.id,
                i.component,
                i.worst_status,
                i.opened_at,
                secs_cell(i.time_to_detect_s),
                secs_cell(i.time_to_page_s),
                secs_cell(Some(i.duration_s)),
                if i.resolved_at.is_none() {
                    " (open)"
                } else {
                    ""
                }
            );
        }
    }
    let _ = writeln!(out, "\nrehearsals in the window: {}", r.rehearsals.len());
    for v in &r.rehearsals {
        let _ = writeln!(out, "  {}", rehearsal_line(v));
    }
    out
}

/// One line about a rehearsal row (the columns of the `rehearsals` table): when, verdict,
/// which drill, the measured times, why it was skipped or cut short.
fn rehearsal_line(v: &Value) -> String {
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let mut line = format!(
        "{} {} {:?} ({})",
        v.get("started_at")
            .and_then(Value::as_i64)
            .map(iso)
            .unwrap_or_default(),
        text("status"),
        text("name"),
        text("file")
    );
    for (label, key) in [
        ("detect", "detect_ms"),
        ("page", "page_ms"),
        ("resolve", "resolve_ms"),
    ] {
        if let Some(ms) = v.get(key).and_then(Value::as_i64) {
            let _ = write!(line, " {label} {:.1}s", ms as f64 / 1000.0);
        }
    }
    if !text("reason").is_empty() {
        let _ = write!(line, ": {}", text("reason"));
    }
    line
}

/// A sparkline of `values` (one character per bucket, `·` where there is no data), scaled
/// from the smallest to the largest value.
pub fn sparkline(values: impl IntoIterator<Item = Option<f64>>) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let v: Vec<Option<f64>> = values.into_iter().collect();
    let known = v.iter().flatten().copied();
    let (lo, hi) = known.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    v.iter()
        .map(|x| match x {
            None => '·',
            Some(_) if hi - lo <= f64::EPSILON * hi.abs().max(1.0) => BARS[3],
            Some(x) => BARS[(((x - lo) / (hi - lo)) * 7.0).round().clamp(0.0, 7.0) as usize],
        })
        .collect()
}

/// A row's p95 trend as a sparkline.
fn p95_trend(row: &Row) -> String {
    sparkline(row.trend.iter().map(|p| p.p95_ms))
}

/// A component's availability trend as a sparkline.
fn availability_trend(c: &ComponentRow) -> String {
    sparkline(c.trend.iter().map(|p| p.availability_pct))
}

fn md(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

pub fn render_markdown(r: &Report) -> String {
    let mut out = format!(
        "## Latency budget review: last {}\n\n{} → {} (compared with the {} before)\n\n",
        r.window, r.since, r.until, r.window
    );
    if let Some(line) = scope_line(r) {
        let _ = writeln!(out, "{}\n", md(&line));
    }
    if !r.components.is_empty() {
        let _ = write!(out, "### Components\n\n| component | objective | availability | degraded | down | burn rate | error budget left | incidents | availability per {} |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n", r.bucket);
        for c in &r.components {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | `{}` |",
                md(&c.component),
                c.objective.as_deref().unwrap_or("-"),
                pct(c.window.availability_pct),
                pct(c.window.degraded_pct),
                pct(c.window.down_pct),
                c.burn_cell(),
                c.budget_left_cell(&format!("({})", c.slo_window)),
                c.incidents,
                availability_trend(c)
            );
        }
        out.push('\n');
    }
    let _ = write!(out, "### Latency (worst regressions first)\n\n| series | phase | runs | availability | p50 | p95 | p99 | max | Δp95 | budget | verdict | p95 per {} |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|\n", r.bucket);
    for row in &r.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | `{}` |",
            md(&row.series),
            md(&row.phase),
            row.runs,
            pct(row.availability_pct),
            cell(row.p50_ms),
            cell(row.p95_ms),
            cell(row.p99_ms),
            cell(row.max_ms),
            signed_pct(row.change.p95_pct),
            budget_cell(&row.budget),
            md(&verdict_cell(row)),
            p95_trend(row)
        );
    }
    if location_rows(r).next().is_some() {
        out.push_str("\n### Per location\n\n| series | phase | location | runs | availability | p50 | p95 | p99 | max | verdict |\n|---|---|---|---:|---:|---:|---:|---:|---:|---|\n");
        for (row, l) in location_rows(r) {
            let cells = location_cells(row, l).map(|c| md(&c));
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
    }
    if !r.incidents.is_empty() {
        out.push_str("\n### Incidents\n\n| id | component | worst | opened | time to detect | time to page | duration | cause |\n|---:|---|---|---|---:|---:|---:|---|\n");
        for i in &r.incidents {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                i.id,
                md(&i.component),
                i.worst_status,
                i.opened_at,
                secs_cell(i.time_to_detect_s),
                secs_cell(i.time_to_page_s),
                secs_cell(Some(i.duration_s)),
                md(i.cause.as_deref().unwrap_or(""))
            );
        }
    }
    let _ = writeln!(out, "\nRehearsals in the window: {}", r.rehearsals.len());
    for v in &r.rehearsals {
        let _ = writeln!(out, "- {}", md(&rehearsal_line(v)));
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One line per row, raw numbers (ms, percent).
pub fn render_csv(r: &Report) -> String {
    // A fleet-wide report adds a `location` column: empty on the merged rows, then one
    // line per location (a single machine's CSV is unchanged).
    let by_location = location_rows(r).next().is_some();
    let mut out = String::from(
        "series,phase,runs,availability_pct,up_pct,degraded_pct,down_pct,samples,p50_ms,p95_ms,p99_ms,max_ms,budget_p50_ms,budget_p95_ms,budget_p99_ms,verdict,previous_runs,previous_p95_ms,change_p95_pct,change_availability_pts",
    );
    out.push_str(if by_location { ",location\n" } else { "\n" });
    let n = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_default();
    for row in &r.rows {
        let b = row.budget.as_ref();
        let _ = write!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            csv_field(&row.series),
            csv_field(&row.phase),
            row.runs,
            n(row.availability_pct),
            n(row.up_pct),
            n(row.degraded_pct),
            n(row.down_pct),
            row.samples,
            n(row.p50_ms),
            n(row.p95_ms),
            n(row.p99_ms),
            n(row.max_ms),
            n(b.and_then(|b| b.p50_ms)),
            n(b.and_then(|b| b.p95_ms)),
            n(b.and_then(|b| b.p99_ms)),
            row.verdict,
            row.previous.runs,
            n(row.previous.p95_ms),
            n(row.change.p95_pct),
            n(row.change.availability_pts),
        );
        out.push_str(if by_location { ",\n" } else { "\n" });
        for l in &row.locations {
            let f = &l.figures;
            let _ = writeln!(
                out,
                "{},{},{},{},,,,{},{},{},{},{},{},{},{},{},,,,,{}",
                csv_field(&row.series),
                csv_field(&row.phase),
                f.runs,
                n(f.availability_pct),
                f.samples,
                n(f.p50_ms),
                n(f.p95_ms),
                n(f.p99_ms),
                n(f.max_ms),
                n(b.and_then(|b| b.p50_ms)),
                n(b.and_then(|b| b.p95_ms)),
                n(b.and_then(|b| b.p99_ms)),
                f.verdict,
                csv_field(&l.location),
            );
        }
    }
    out
}

/// Text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const CHART_W: f64 = 560.0;
const CHART_H: f64 = 140.0;

/// p50/p95/p99 over the window against the budget line: an inline SVG.
pub fn latency_svg(row: &Row, since_ms: i64, until_ms: i64) -> String {
    let span = (until_ms - since_ms).max(1) as f64;
    let budget = row
        .budget
        .as_ref()
        .and_then(|b| b.p95_ms.or(b.p99_ms).or(b.p50_ms));
    let top = row
        .trend
        .iter()
        .filter_map(|p| p.p99_ms)
        .chain(budget)
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.1;
    let x = |t: i64| 40.0 + (t - since_ms) as f64 / span * (CHART_W - 50.0);
    let y = |ms: f64| 10.0 + (1.0 - ms / top) * (CHART_H - 30.0);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {CHART_W} {CHART_H}\" width=\"{CHART_W}\" height=\"{CHART_H}\" role=\"img\" aria-label=\"{} {} latency\">",
        html_escape(&row.series),
        html_escape(&row.phase)
    );
    let _ = write!(
        svg,
        "<line x1=\"40\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" class=\"axis\"/><text x=\"2\" y=\"14\" class=\"lbl\">{2}</text><text x=\"2\" y=\"{0}\" class=\"lbl\">0</text>",
        y(0.0),
        CHART_W - 10.0,
        html_escape(&cell(Some(top)))
    );
    if let Some(b) = budget {
        let _ = write!(
            svg,
            "<line x1=\"40\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" class=\"budget\"><title>budget {2}</title></line>",
            y(b),
            CHART_W - 10.0,
            html_escape(&cell(Some(b)))
        );
    }
    let half = row
        .trend
        .get(1)
        .map_or(0, |p| (p.at_ms - row.trend[0].at_ms) / 2);
    for (name, pick) in [
        (
            "p50",
            (|p: &TrendPoint| p.p50_ms) as fn(&TrendPoint) -> Option<f64>,
        ),
        ("p95", |p: &TrendPoint| p.p95_ms),
        ("p99", |p: &TrendPoint| p.p99_ms),
    ] {
        let pts: Vec<String> = row
            .trend
            .iter()
            .filter_map(|p| pick(p).map(|v| format!("{:.1},{:.1}", x(p.at_ms + half), y(v))))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let _ = write!(
            svg,
            "<polyline class=\"{name}\" data-points=\"{}\" points=\"{}\"><title>{name}</title></polyline>",
            pts.len(),
            pts.join(" ")
        );
        // Dots too: a bucket alone is still seen.
        for p in &pts {
            if let Some((cx, cy)) = p.split_once(',') {
                let _ = write!(
                    svg,
                    "<circle class=\"{name}\" cx=\"{cx}\" cy=\"{cy}\" r=\"2\"/>"
                );
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

/// Availability per bucket as bars, and incident spans under them: an inline SVG.
pub fn availability_svg(
    c: &ComponentRow,
    incidents: &[&IncidentRow],
    since_ms: i64,
    until_ms: i64,
) -> String {
    let span = (until_ms - since_ms).max(1) as f64;
    let x = |t: i64| 40.0 + ((t - since_ms).max(0) as f64 / span).min(1.0) * (CHART_W - 50.0);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {CHART_W} 90\" width=\"{CHART_W}\" height=\"90\" role=\"img\" aria-label=\"{} availability\">",
        html_escape(&c.component)
    );
    let n = c.trend.len().max(1) as f64;
    let bw = (CHART_W - 50.0) / n;
    for p in &c.trend {
        let Some(a) = p.availability_pct else {
            continue;
        };
        let h = (a / 100.0 * 50.0).max(1.0);
        let class = if p.down > 0 {
            "bad"
        } else if p.degraded > 0 {
            "warn"
        } else {
            "good"
        };
        let _ = write!(
            svg,
            "<rect class=\"{class}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\"><title>{} {a:.2}% of {} runs</title></rect>",
            x(p.at_ms) + 1.0,
            60.0 - h,
            (bw - 2.0).max(1.0),
            html_escape(&secs(p.at_ms)),
            p.runs
        );
    }
    for i in incidents {
        let a = x(i.opened_at_ms);
        let b = x(i.resolved_at_ms.unwrap_or(until_ms));
        let _ = write!(
            svg,
            "<rect class=\"incident\" x=\"{a:.1}\" y=\"68\" width=\"{:.1}\" height=\"10\"><title>incident {} ({})</title></rect>",
            (b - a).max(2.0),
            i.id,
            html_escape(&i.worst_status)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"2\" y=\"14\" class=\"lbl\">100%</text><text x=\"2\" y=\"78\" class=\"lbl\">inc.</text></svg>"
    );
    svg
}

fn ms_of(rfc: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc)
        .map(|t| t.timestamp_millis())
        .unwrap_or(0)
}

/// CSS of the HTML report: also the dashboard's charts.
pub const CHART_CSS: &str = ".chart{max-width:100%;height:auto;display:block}
.chart .axis{stroke:#999;stroke-width:1}.chart .lbl{font-size:10px;fill:#777}
.chart .budget{stroke:#cf222e;stroke-dasharray:4 3;stroke-width:1.5}
.chart polyline{fill:none;stroke-width:1.8}.chart circle{fill:#fff;stroke-width:1.5}.chart .p50{stroke:#2da44e}.chart .p95{stroke:#bf8700}.chart .p99{stroke:#8250df}
.chart .good{fill:#2da44e}.chart .warn{fill:#d4a72c}.chart .bad{fill:#cf222e}.chart .skip{fill:#8c959f}.chart .incident{fill:#cf222e;opacity:.6}";

pub fn render_html(r: &Report) -> String {
    let (since, until) = (ms_of(&r.since), ms_of(&r.until));
    let mut body = String::new();
    if !r.components.is_empty() {
        body.push_str("<h2>Components</h2><table><tr><th>component</th><th>objective</th><th>availability</th><th>degraded</th><th>down</th><th>burn rate</th><th>error budget left</th><th>incidents</th></tr>");
        for c in &r.components {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(&c.component),
                html_escape(c.objective.as_deref().unwrap_or("-")),
                pct(c.window.availability_pct),
                pct(c.window.degraded_pct),
                pct(c.window.down_pct),
                c.burn_cell(),
                c.budget_left_cell(&format!("({})", html_escape(&c.slo_window))),
                c.incidents
            );
        }
        body.push_str("</table>");
        for c in &r.components {
            let inc: Vec<&IncidentRow> = r
                .incidents
                .iter()
                .filter(|i| i.component == c.component)
                .collect();
            let _ = write!(
                body,
                "<figure><figcaption>{}: availability per {} and incidents</figcaption>{}</figure>",
                html_escape(&c.component),
                html_escape(&r.bucket),
                availability_svg(c, &inc, since, until)
            );
        }
    }
    body.push_str("<h2>Latency (worst regressions first)</h2><table><tr><th>series</th><th>phase</th><th>runs</th><th>availability</th><th>p50</th><th>p95</th><th>p99</th><th>max</th><th>Δp95</th><th>budget</th><th>verdict</th></tr>");
    for row in &r.rows {
        let class = match row.verdict {
            "over" => "over",
            "ok" => "ok",
            _ => "",
        };
        let _ = write!(
            body,
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&row.series),
            html_escape(&row.phase),
            row.runs,
            pct(row.availability_pct),
            cell(row.p50_ms),
            cell(row.p95_ms),
            cell(row.p99_ms),
            cell(row.max_ms),
            signed_pct(row.change.p95_pct),
            html_escape(&budget_cell(&row.budget)),
            html_escape(&verdict_cell(row)),
        );
    }
    body.push_str("</table>");
    if location_rows(r).next().is_some() {
        body.push_str("<h2>Per location</h2><table class=\"locations\"><tr><th>series</th><th>phase</th><th>location</th><th>runs</th><th>availability</th><th>p50</th><th>p95</th><th>p99</th><th>max</th><th>verdict</th></tr>");
        for (row, l) in location_rows(r) {
            let cells = location_cells(row, l).map(|c| html_escape(&c));
            let _ = write!(
                body,
                "<tr data-location=\"{}\"><td>{}</td></tr>",
                html_escape(&l.location),
                cells.join("</td><td>")
            );
        }
        body.push_str("</table>");
    }
    body.push_str("<h2>Latency over time</h2><p class=\"legend\"><span class=\"l50\">p50</span> <span class=\"l95\">p95</span> <span class=\"l99\">p99</span> <span class=\"lb\">budget</span></p>");
    for row in r.rows.iter().filter(|r| r.samples > 0) {
        let _ = write!(
            body,
            "<figure><figcaption>{} · {} — p95 {} (previous {})</figcaption>{}</figure>",
            html_escape(&row.series),
            html_escape(&row.phase),
            cell(row.p95_ms),
            cell(row.previous.p95_ms),
            latency_svg(row, since, until)
        );
    }
    if !r.incidents.is_empty() {
        body.push_str("<h2>Incidents</h2><table><tr><th>id</th><th>component</th><th>worst</th><th>opened</th><th>time to detect</th><th>time to page</th><th>duration</th><th>cause</th></tr>");
        for i in &r.incidents {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                i.id,
                html_escape(&i.component),
                html_escape(&i.worst_status),
                html_escape(&i.opened_at),
                secs_cell(i.time_to_detect_s),
                secs_cell(i.time_to_page_s),
                secs_cell(Some(i.duration_s)),
                html_escape(i.cause.as_deref().unwrap_or(""))
            );
        }
        body.push_str("</table>");
    }
    let _ = write!(
        body,
        "<h2>Rehearsals</h2><p>{}</p>",
        if r.rehearsals.is_empty() {
            "none in this window".to_string()
        } else {
            r.rehearsals
                .iter()
                .map(|v| html_escape(&rehearsal_line(v)))
                .collect::<Vec<_>>()
                .join("<br>")
        }
    );
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>watchpost latency budget review</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;color:#1f2328;background:#fff}}table{{border-collapse:collapse;margin-bottom:1.5em}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}}td:nth-child(-n+2),th:nth-child(-n+2){{text-align:left}}tr.over td{{background:#fde2e2}}tr.ok td:last-child{{color:#1a7f37}}figure{{margin:0 0 1em;break-inside:avoid}}figcaption{{font-size:12px;color:#555}}.legend span{{padding:0 6px;border-left:12px solid}}.l50{{border-color:#2da44e!important}}.l95{{border-color:#bf8700!important}}.l99{{border-color:#8250df!important}}.lb{{border-color:#cf222e!important}}
{CHART_CSS}
@media print{{body{{margin:1cm;font-size:11px}}h2{{break-after:avoid}}tr{{break-inside:avoid}}}}</style>
</head><body><h1>Latency budget review</h1><p>Last {} ({} → {}), trend per {}, compared with the {} before.{}</p>
{body}</body></html>\n",
        html_escape(&r.window),
        html_escape(&r.since),
        html_escape(&r.until),
        html_escape(&r.bucket),
        html_escape(&r.window),
        scope_line(r)
            .map(|l| format!(" {}.", html_escape(&l)))
            .unwrap_or_default(),
    )
}
