//! `watchpost report`: the latency-budget review. Per series and phase over a window: runs,
//! availability, p50/p95/p99/max from the merged stored histograms, the budget and a verdict.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::time::Duration;

use rusqlite::Connection;
use serde::Serialize;

use crate::config::{duration::human, Budget, Config};
use crate::probe::human_ms;
use crate::store::{self, hist};

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub series: String,
    pub phase: String,
    pub runs: u64,
    pub availability_pct: Option<f64>,
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
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetView {
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub run_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub window: String,
    pub since: String,
    pub until: String,
    pub rows: Vec<Row>,
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Build the report for the window ending at `now_ms`.
pub fn build(
    config: &Config,
    conn: &Connection,
    window: Duration,
    now_ms: i64,
) -> anyhow::Result<Report> {
    let since = now_ms - window.as_millis() as i64;
    let hists = hist::window(conn, since, now_ms + 1)?;
    let counts = store::counts_since(conn, since)?;
    let mut series: BTreeSet<String> = counts.keys().cloned().collect();
    series.extend(hists.keys().map(|(s, _)| s.clone()));
    let mut rows = Vec::new();
    for s in series {
        let c = counts.get(&s).copied().unwrap_or_default();
        let probe_name = s.split('/').next().unwrap_or(&s);
        let budgets = config
            .probe(probe_name)
            .filter(|_| !s.contains('/'))
            .map(|p| &p.budget);
        let phases: Vec<&(String, String)> = hists.keys().filter(|(x, _)| *x == s).collect();
        if phases.is_empty() {
            rows.push(Row {
                series: s.clone(),
                phase: "-".into(),
                runs: c.total(),
                availability_pct: c.availability(),
                samples: 0,
                p50_ms: None,
                p95_ms: None,
                p99_ms: None,
                max_ms: None,
                budget: None,
                verdict: "no_data",
                over: vec![],
            });
            continue;
        }
        for key in phases {
            let h = &hists[key];
            let budget = budgets.and_then(|b| b.get(&key.1)).copied();
            let (verdict, over) = judge(h, budget.as_ref());
            let q = |x: f64| (!h.is_empty()).then(|| us_to_ms(h.value_at_quantile(x)));
            rows.push(Row {
                series: s.clone(),
                phase: key.1.clone(),
                runs: c.total(),
                availability_pct: c.availability(),
                samples: h.len(),
                p50_ms: q(0.50),
                p95_ms: q(0.95),
                p99_ms: q(0.99),
                max_ms: (!h.is_empty()).then(|| us_to_ms(h.max())),
                budget: budget.map(|b| BudgetView {
                    p50_ms: b.p50.map(|d| d.0.as_secs_f64() * 1e3),
                    p95_ms: b.p95.map(|d| d.0.as_secs_f64() * 1e3),
                    p99_ms: b.p99.map(|d| d.0.as_secs_f64() * 1e3),
                    run_ms: b.run.map(|d| d.0.as_secs_f64() * 1e3),
                }),
                verdict,
                over,
            });
        }
    }
    let fmt = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default()
    };
    Ok(Report {
        window: human(window),
        since: fmt(since),
        until: fmt(now_ms),
        rows,
    })
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
    v.map(|ms| human_ms(Duration::from_secs_f64(ms / 1000.0)))
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

pub fn render_table(r: &Report) -> String {
    let mut out = format!(
        "latency budget review, last {} ({} → {})\n\n",
        r.window, r.since, r.until
    );
    if r.rows.is_empty() {
        out.push_str("no runs recorded in this window\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<32} {:<13} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9}  {:<22} verdict",
        "series", "phase", "runs", "avail", "p50", "p95", "p99", "max", "budget"
    );
    for row in &r.rows {
        let avail = row
            .availability_pct
            .map(|a| format!("{a:.2}%"))
            .unwrap_or_else(|| "-".into());
        let verdict = if row.over.is_empty() {
            row.verdict.to_string()
        } else {
            format!("OVER: {}", row.over.join(", "))
        };
        let _ = writeln!(
            out,
            "{:<32} {:<13} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9}  {:<22} {}",
            row.series,
            row.phase,
            row.runs,
            avail,
            cell(row.p50_ms),
            cell(row.p95_ms),
            cell(row.p99_ms),
            cell(row.max_ms),
            budget_cell(&row.budget),
            verdict
        );
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

pub fn render_html(r: &Report) -> String {
    let mut rows = String::new();
    for row in &r.rows {
        let class = match row.verdict {
            "over" => "over",
            "ok" => "ok",
            _ => "",
        };
        let _ = write!(
            rows,
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&row.series),
            html_escape(&row.phase),
            row.runs,
            row.availability_pct.map(|a| format!("{a:.2}%")).unwrap_or_else(|| "-".into()),
            cell(row.p50_ms),
            cell(row.p95_ms),
            cell(row.p99_ms),
            cell(row.max_ms),
            html_escape(&budget_cell(&row.budget)),
            html_escape(&if row.over.is_empty() { row.verdict.to_string() } else { row.over.join(", ") }),
        );
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>watchpost latency budget review</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}}td:nth-child(-n+2),th:nth-child(-n+2){{text-align:left}}tr.over td{{background:#fde2e2}}tr.ok td:last-child{{color:#1a7f37}}</style>
</head><body><h1>Latency budget review</h1><p>Last {} ({} → {})</p>
<table><tr><th>series</th><th>phase</th><th>runs</th><th>availability</th><th>p50</th><th>p95</th><th>p99</th><th>max</th><th>budget</th><th>verdict</th></tr>{rows}</table></body></html>\n",
        html_escape(&r.window),
        html_escape(&r.since),
        html_escape(&r.until)
    )
}
