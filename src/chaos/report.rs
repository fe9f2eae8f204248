//! How a rehearsal is shown: one terminal line per timeline mark as it happens, the verdict
//! table, and a self-contained HTML page with the timeline drawn as inline SVG (no scripts,
//! no external assets). The `--json` document is [`Report`] serialized.

use std::fmt::Write as _;

use super::run::{Mark, Report};
use crate::report::html_escape;

/// `+2.31s` / `-0.40s`.
fn secs(ms: i64) -> String {
    format!(
        "{}{:.2}s",
        if ms < 0 { "-" } else { "+" },
        ms.abs() as f64 / 1000.0
    )
}

fn opt_secs(ms: Option<i64>) -> String {
    ms.map_or("never".into(), |m| format!("{:.2}s", m as f64 / 1000.0))
}

/// One terminal line for a mark: `  +2.31s  opened            incident #1 on API`.
pub fn live_line(m: &Mark) -> String {
    format!("{:>9}  {:<16}  {}", secs(m.at_ms), m.event, m.detail)
}

/// The verdict table.
pub fn render_table(r: &Report) -> String {
    let mut s = String::new();
    let held = r.expectations.iter().filter(|v| v.held).count();
    let _ = writeln!(
        s,
        "rehearsal {:?}: {} ({held}/{} expectations held)",
        r.name,
        if r.passed { "PASSED" } else { "FAILED" },
        r.expectations.len()
    );
    if let Some(a) = &r.aborted {
        let _ = writeln!(s, "aborted: {a}");
    }
    let _ = writeln!(
        s,
        "{:<12} {:<26} {:>9} {:>9}  {:<4}  detail",
        "event", "subject", "within", "measured", "held"
    );
    for v in &r.expectations {
        let subject = v
            .notifier
            .as_deref()
            .or(v.component.as_deref())
            .unwrap_or("");
        let _ = writeln!(
            s,
            "{:<12} {:<26} {:>9} {:>9}  {:<4}  {}",
            v.event,
            subject,
            opt_secs(Some(v.within_ms)),
            opt_secs(v.measured_ms),
            if v.held { "yes" } else { "NO" },
            v.detail
        );
    }
    s
}

/// A self-contained page: verdict, the timeline drawn (fault window shaded, one tick per
/// mark), the expectations and the marks as tables.
pub fn render_html(r: &Report) -> String {
    let end = r
        .timeline
        .iter()
        .map(|m| m.at_ms)
        .chain([r.duration_ms])
        .max()
        .unwrap_or(1)
        .max(1);
    let start = r.timeline.iter().map(|m| m.at_ms).min().unwrap_or(0).min(0);
    let (w, left, right) = (960.0, 20.0, 20.0);
    let x = |ms: i64| left + (ms - start) as f64 / (end - start).max(1) as f64 * (w - left - right);
    let row_h = 18.0;
    let height = 60.0 + row_h * r.timeline.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" role=\"img\" aria-label=\"rehearsal timeline\">"
    );
    let _ = write!(
        svg,
        "<rect x=\"{:.1}\" y=\"10\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#fde2e2\"/><text x=\"{:.1}\" y=\"24\" font-size=\"12\">fault</text>",
        x(0),
        (x(r.duration_ms) - x(0)).max(1.0),
        height - 20.0,
        x(0) + 4.0
    );
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"40\" x2=\"{:.1}\" y2=\"40\" stroke=\"#333\"/>",
        w - right
    );
    for (i, m) in r.timeline.iter().enumerate() {
        let color = match m.event.as_str() {
            "delivery_failed" | "hook_failed" | "interrupted" => "#c0392b",
            "delivered" | "resolved" | "fault_ended" => "#27ae60",
            _ => "#2c3e50",
        };
        let (mx, y) = (x(m.at_ms), 56.0 + row_h * i as f64);
        let anchor = if mx > w / 2.0 { "end" } else { "start" };
        let tx = if anchor == "end" { mx - 6.0 } else { mx + 6.0 };
        let _ = write!(
            svg,
            "<line x1=\"{mx:.1}\" y1=\"40\" x2=\"{mx:.1}\" y2=\"{y:.1}\" stroke=\"{color}\" stroke-dasharray=\"2,2\"/><circle cx=\"{mx:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{color}\"/><text x=\"{tx:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"{anchor}\">{} {}</text>",
            y + 4.0,
            html_escape(&secs(m.at_ms)),
            html_escape(&m.detail)
        );
    }
    svg.push_str("</svg>");
    let mut rows = String::new();
    for v in &r.expectations {
        let _ = write!(
            rows,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if v.held { "ok" } else { "bad" },
            html_escape(&v.event),
            html_escape(v.notifier.as_deref().or(v.component.as_deref()).unwrap_or("")),
            opt_secs(Some(v.within_ms)),
            opt_secs(v.measured_ms),
            if v.held { "held" } else { "FAILED" },
            html_escape(&v.detail)
        );
    }
    let mut marks = String::new();
    for m in &r.timeline {
        let _ = write!(
            marks,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&secs(m.at_ms)),
            html_escape(&m.event),
            html_escape(&m.detail)
        );
    }
    let verdict = if r.passed { "PASSED" } else { "FAILED" };
    let aborted = r
        .aborted
        .as_deref()
        .map(|a| format!("<p class=\"bad\">Aborted: {}</p>", html_escape(a)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Rehearsal {name}: {verdict}</title>\
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}.ok{{color:#27ae60}}.bad{{color:#c0392b}}</style></head>\
<body><h1>Rehearsal {name}: <span class=\"{cls}\">{verdict}</span></h1><p>{file} · started {started} · fault {dur} · settle {settle} · run id {id}</p>{aborted}\
<h2>Timeline</h2>{svg}<h2>Expectations</h2><table><tr><th>event</th><th>subject</th><th>within</th><th>measured</th><th>verdict</th><th>detail</th></tr>{rows}</table>\
<h2>Marks</h2><table><tr><th>at</th><th>event</th><th>detail</th></tr>{marks}</table></body></html>\n",
        name = html_escape(&r.name),
        cls = if r.passed { "ok" } else { "bad" },
        file = html_escape(&r.file),
        started = html_escape(&r.started_at),
        dur = opt_secs(Some(r.duration_ms)),
        settle = opt_secs(Some(r.settle_ms)),
        id = html_escape(&r.rehearsal_id),
    )
}
