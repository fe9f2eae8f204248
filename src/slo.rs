//! Availability objectives: a component's availability over a window (its members' runs,
//! up / degraded / down counted apart, maintenance left out), its error budget and how fast
//! it burns, and the multi-window, multi-burn-rate verdict (Google SRE workbook, ch. 5) that
//! `burn_alert` turns into an incident.
//!
//! A run is *bad* for the objective when it is down; degraded runs count as available but
//! are reported apart (an always-degraded probe is 100 % available and 0 % up).
//!
//! Not here: opening incidents (the evaluator does, through its usual transition + outbox
//! path) or rendering (see `report`).

use crate::store::db::{self, Conn};
use serde::Serialize;

use crate::config::{ComponentConfig, Objective};
use crate::store::{self, Counts, HourlySums};

/// One rule of the multi-window burn-rate alert: a burn of at least `rate` over both the
/// long and the short window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurnRule {
    pub long_ms: i64,
    pub short_ms: i64,
    pub rate: f64,
    pub level: BurnLevel,
}

/// How bad a fast burn is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BurnLevel {
    /// 6× over 6 h and 30 m: 5 % of a 30-day budget in 6 hours → degraded.
    Warn,
    /// 14.4× over 1 h and 5 m: 2 % of a 30-day budget in an hour → major outage.
    Page,
}

const MIN: i64 = 60_000;

/// The workbook's two rules, most severe first.
pub const BURN_RULES: [BurnRule; 2] = [
    BurnRule {
        long_ms: 60 * MIN,
        short_ms: 5 * MIN,
        rate: 14.4,
        level: BurnLevel::Page,
    },
    BurnRule {
        long_ms: 360 * MIN,
        short_ms: 30 * MIN,
        rate: 6.0,
        level: BurnLevel::Warn,
    },
];

/// Burn rate: the share of bad runs relative to the share the objective allows (1.0 spends
/// the budget exactly over the SLO window). `None` without runs.
pub fn burn_rate(c: &Counts, objective: Objective) -> Option<f64> {
    let t = c.total();
    (t > 0).then(|| (c.down as f64 / t as f64) / objective.budget())
}

/// The most severe rule whose long and short windows both burn at or above its rate.
/// `counts(window_ms)` gives the counts over the last `window_ms`.
pub fn burn_verdict(
    objective: Objective,
    mut counts: impl FnMut(i64) -> Counts,
) -> Option<(BurnLevel, String)> {
    for rule in BURN_RULES {
        let long = burn_rate(&counts(rule.long_ms), objective)?;
        if long < rule.rate {
            continue;
        }
        let Some(short) = burn_rate(&counts(rule.short_ms), objective) else {
            continue;
        };
        if short >= rule.rate {
            let h = |ms: i64| {
                crate::config::duration::human(std::time::Duration::from_millis(ms as u64))
            };
            return Some((
                rule.level,
                format!(
                    "error budget burning at {long:.1}× over {} and {short:.1}× over {} (objective {objective}; alert at {}×)",
                    h(rule.long_ms),
                    h(rule.short_ms),
                    rule.rate
                ),
            ));
        }
    }
    None
}

/// Maintenance spans `[start, end)` of a component that overlap `[since, until)`, from its
/// timeline (`maintenance_started` … `maintenance_ended`; one still open ends at `until`).
pub fn maintenance_spans(
    conn: &Conn,
    component: &str,
    since: i64,
    until: i64,
) -> db::Result<Vec<(i64, i64)>> {
    let mut st = conn.prepare_cached(
        "SELECT at, kind FROM incident_events WHERE component = ?1 AND at < ?2
           AND kind IN ('maintenance_started', 'maintenance_ended') ORDER BY at, id",
    )?;
    let mut spans = Vec::new();
    let mut open: Option<i64> = None;
    st.query_each(db::params![component, until], |r| {
        let at: i64 = r.get(0)?;
        match r.get::<_, String>(1)?.as_str() {
            "maintenance_started" => {
                open.get_or_insert(at);
            }
            _ => {
                if let Some(s) = open.take() {
                    spans.push((s, at));
                }
            }
        }
        Ok(())
    })?;
    if let Some(s) = open {
        spans.push((s, until));
    }
    spans.retain(|(s, e)| *e > since && *s < until);
    Ok(spans)
}

/// `[since, until)` without the spans.
pub fn outside(since: i64, until: i64, spans: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut at = since;
    let mut spans = spans.to_vec();
    spans.sort();
    for (s, e) in spans {
        if s > at {
            out.push((at, s.min(until)));
        }
        at = at.max(e);
        if at >= until {
            break;
        }
    }
    if at < until {
        out.push((at, until));
    }
    out.retain(|(a, b)| a < b);
    out
}

/// A component's members' runs over `[since, until)`, maintenance left out.
pub fn component_counts(
    conn: &Conn,
    comp: &ComponentConfig,
    since: i64,
    until: i64,
) -> db::Result<Counts> {
    counts_with(conn, comp, since, until, None)
}

/// [`component_counts`], the hourly sums kept in `cache` when one is given (without
/// maintenance in the window: with it, the parts between windows are read whole).
fn counts_with(
    conn: &Conn,
    comp: &ComponentConfig,
    since: i64,
    until: i64,
    cache: Option<&HourlySums>,
) -> db::Result<Counts> {
    let members: Vec<String> = comp.probes.iter().map(|p| p.get_ref().clone()).collect();
    let spans = maintenance_spans(conn, comp.name.get_ref(), since, until)?;
    let mut total = Counts::default();
    for (a, b) in outside(since, until, &spans) {
        let per = match cache.filter(|_| spans.is_empty()) {
            Some(c) => store::window_outcomes(conn, Some(&members), a, b, c)?,
            None => store::outcomes(conn, Some(&members), a, b, b - a)?,
        };
        for v in per.into_values() {
            for c in v {
                total += c;
            }
        }
    }
    Ok(total)
}

/// [`burn_verdict`] of a component's runs at `now`.
pub fn component_burn(
    conn: &Conn,
    comp: &ComponentConfig,
    objective: Objective,
    now: i64,
) -> db::Result<Option<(BurnLevel, String)>> {
    RecentCounts::read(conn, comp, now)?.verdict(conn, comp, objective)
}

/// The burn windows' step: every window of [`BURN_RULES`] is a whole number of them.
const STEP: i64 = 5 * MIN;
/// The longest burn window.
const LONGEST: i64 = 360 * MIN;

/// A component's counts over the last [`LONGEST`] in [`STEP`]s ending at `now`, from the
/// runs, read once for every burn window (one read per member instead of one per member
/// and window).
pub struct RecentCounts {
    now: i64,
    /// Oldest first; `None` when maintenance overlaps the span or the runs kept do not
    /// reach back that far (each window is then read on its own).
    steps: Option<Vec<Counts>>,
    /// The locations counted (empty: the connection's own).
    locations: Vec<String>,
}

impl RecentCounts {
    /// The runs of every location in `locations` together (a fleet's view).
    pub fn read_all(
        conn: &Conn,
        comp: &ComponentConfig,
        now: i64,
        locations: &[String],
    ) -> db::Result<RecentCounts> {
        let each = store::each_location(conn, locations, |_| Self::read(conn, comp, now))?;
        let mut steps = Some(vec![Counts::default(); (LONGEST / STEP) as usize]);
        for r in each {
            steps = steps.zip(r.steps).map(|(mut t, s)| {
                for (a, b) in t.iter_mut().zip(s) {
                    *a += b;
                }
                t
            });
        }
        Ok(RecentCounts {
            now,
            steps,
            locations: locations.to_vec(),
        })
    }

    pub fn read(conn: &Conn, comp: &ComponentConfig, now: i64) -> db::Result<RecentCounts> {
        let since = now - LONGEST;
        let none = RecentCounts {
            now,
            steps: None,
            locations: Vec::new(),
        };
        if !maintenance_spans(conn, comp.name.get_ref(), since, now)?.is_empty() {
            return Ok(none);
        }
        let members: Vec<String> = comp.probes.iter().map(|p| p.get_ref().clone()).collect();
        let Some(per) = store::run_outcomes(conn, Some(&members), since, now, STEP)? else {
            return Ok(none);
        };
        let mut steps = vec![Counts::default(); (LONGEST / STEP) as usize];
        for v in per.into_values() {
            for (s, c) in steps.iter_mut().zip(v) {
                *s += c;
            }
        }
        Ok(RecentCounts {
            now,
            steps: Some(steps),
            locations: Vec::new(),
        })
    }

    /// Counts over the last `window_ms` (read on its own when it is not a whole number of
    /// steps within the span, or there are no steps).
    pub fn last(&self, conn: &Conn, comp: &ComponentConfig, window_ms: i64) -> db::Result<Counts> {
        match &self.steps {
            Some(steps) if window_ms % STEP == 0 && window_ms <= LONGEST => {
                let k = (window_ms / STEP) as usize;
                let mut t = Counts::default();
                for c in &steps[steps.len() - k..] {
                    t += *c;
                }
                Ok(t)
            }
            _ if self.locations.is_empty() => {
                component_counts(conn, comp, self.now - window_ms, self.now)
            }
            _ => {
                let mut t = Counts::default();
                store::each_location(conn, &self.locations, |_| {
                    t += component_counts(conn, comp, self.now - window_ms, self.now)?;
                    Ok(())
                })?;
                Ok(t)
            }
        }
    }

    /// [`burn_verdict`] over these counts.
    pub fn verdict(
        &self,
        conn: &Conn,
        comp: &ComponentConfig,
        objective: Objective,
    ) -> db::Result<Option<(BurnLevel, String)>> {
        let mut err = None;
        let verdict = burn_verdict(objective, |w| {
            self.last(conn, comp, w).unwrap_or_else(|e| {
                err = Some(e);
                Counts::default()
            })
        });
        match err {
            Some(e) => Err(e),
            None => Ok(verdict),
        }
    }
}

/// Shares of a count in percent: (available = not down, up, degraded, down).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Shares {
    pub runs: u64,
    pub availability_pct: Option<f64>,
    pub up_pct: Option<f64>,
    pub degraded_pct: Option<f64>,
    pub down_pct: Option<f64>,
}

impl From<Counts> for Shares {
    fn from(c: Counts) -> Shares {
        let t = c.total();
        let pct = |n: u64| (t > 0).then(|| 100.0 * n as f64 / t as f64);
        Shares {
            runs: t,
            availability_pct: c.availability(),
            up_pct: pct(c.up),
            degraded_pct: pct(c.degraded),
            down_pct: pct(c.down),
        }
    }
}

/// A component against its objective.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentSlo {
    pub component: String,
    /// `"99.5%"`, or null without an objective.
    pub objective: Option<String>,
    pub slo_window: String,
    /// Over the SLO window.
    #[serde(flatten)]
    pub shares: Shares,
    /// Share of the error budget left over the SLO window, in percent (negative: overspent).
    pub error_budget_remaining_pct: Option<f64>,
    /// Burn rate over the last hour (1.0 spends the budget exactly over the SLO window).
    pub burn_rate_1h: Option<f64>,
    /// Burn rate over the SLO window so far.
    pub burn_rate: Option<f64>,
    /// A fast burn as the alert rules see it now.
    pub burning: Option<BurnLevel>,
}

/// Error budget left over a count, in percent of the budget.
pub fn budget_remaining(c: &Counts, objective: Objective) -> Option<f64> {
    burn_rate(c, objective).map(|r| 100.0 * (1.0 - r))
}

/// A component's objective figures at `now` (the runs of the connection's location); `cache`
/// keeps the hourly part of the SLO window's sums between calls (the dashboard's `/slo`).
pub fn component_slo(
    conn: &Conn,
    comp: &ComponentConfig,
    now: i64,
    cache: Option<&HourlySums>,
) -> db::Result<ComponentSlo> {
    component_slo_in(conn, comp, now, cache, &[conn.location()])
}

/// [`component_slo`] over the runs of every location in `locations` (a fleet's view).
pub fn component_slo_in(
    conn: &Conn,
    comp: &ComponentConfig,
    now: i64,
    cache: Option<&HourlySums>,
    locations: &[String],
) -> db::Result<ComponentSlo> {
    let window = comp.slo_window.0.as_millis() as i64;
    let mut c = Counts::default();
    store::each_location(conn, locations, |_| {
        c += counts_with(conn, comp, now - window, now, cache)?;
        Ok(())
    })?;
    let objective = comp.objective();
    let (remaining, rate, rate_1h, burning) = match objective {
        Some(o) => {
            let recent = RecentCounts::read_all(conn, comp, now, locations)?;
            let last_hour = recent.last(conn, comp, 60 * MIN)?;
            let verdict = recent.verdict(conn, comp, o)?;
            (
                budget_remaining(&c, o),
                burn_rate(&c, o),
                burn_rate(&last_hour, o),
                verdict.map(|v| v.0),
            )
        }
        None => (None, None, None, None),
    };
    Ok(ComponentSlo {
        component: comp.name.get_ref().clone(),
        objective: objective.map(|o| o.to_string()),
        slo_window: crate::config::duration::human(comp.slo_window.0),
        shares: c.into(),
        error_budget_remaining_pct: remaining,
        burn_rate_1h: rate_1h,
        burn_rate: rate,
        burning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(up: u64, down: u64) -> Counts {
        Counts {
            up,
            degraded: 0,
            down,
        }
    }

    #[test]
    fn burn_rates_and_budget() {
        let o = Objective::parse("99.5%").unwrap();
        // 1 down in 200 = 0.5 % = exactly the budget.
        assert!((burn_rate(&c(199, 1), o).unwrap() - 1.0).abs() < 1e-9);
        assert!((budget_remaining(&c(199, 1), o).unwrap()).abs() < 1e-9);
        assert!((budget_remaining(&c(400, 0), o).unwrap() - 100.0).abs() < 1e-9);
        assert!((budget_remaining(&c(398, 2), o).unwrap() - 0.0).abs() < 1e-9);
        assert!((budget_remaining(&c(399, 1), o).unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(burn_rate(&c(0, 0), o), None);
        // Degraded runs do not burn the budget.
        let d = Counts {
            up: 0,
            degraded: 10,
            down: 0,
        };
        assert_eq!(burn_rate(&d, o), Some(0.0));
    }

    #[test]
    fn multi_window_verdicts() {
        let o = Objective::parse("99%").unwrap();
        // (1h, 5m, 6h, 30m) down shares → verdict
        let cases: [([u64; 4], Option<BurnLevel>); 6] = [
            ([0, 0, 0, 0], None),
            // 15 % over 1 h and 5 m = 15× ≥ 14.4 → page.
            ([15, 15, 3, 3], Some(BurnLevel::Page)),
            // A short spike alone: 5 m burns, 1 h does not.
            ([2, 100, 1, 20], None),
            // An hour that burned but has stopped (5 m clean) → no page; 6 h/30 m at 7× → warn.
            ([20, 0, 7, 7], Some(BurnLevel::Warn)),
            // 6 h at 7× but the last 30 m clean → nothing.
            ([20, 0, 7, 0], None),
            ([14, 50, 5, 50], None),
        ];
        for (pct, want) in cases {
            let got = burn_verdict(o, |w| {
                let p = match w {
                    w if w == 60 * MIN => pct[0],
                    w if w == 5 * MIN => pct[1],
                    w if w == 360 * MIN => pct[2],
                    _ => pct[3],
                };
                c(100 - p, p)
            });
            assert_eq!(got.map(|g| g.0), want, "{pct:?}");
        }
    }

    #[test]
    fn windows_outside_maintenance() {
        assert_eq!(outside(0, 100, &[]), vec![(0, 100)]);
        assert_eq!(
            outside(0, 100, &[(10, 20), (50, 60)]),
            vec![(0, 10), (20, 50), (60, 100)]
        );
        assert_eq!(outside(0, 100, &[(-5, 200)]), vec![]);
        assert_eq!(outside(0, 100, &[(90, 200), (0, 10)]), vec![(10, 90)]);
    }

    #[test]
    fn objectives_parse() {
        assert_eq!(Objective::parse("99.5%").unwrap().to_string(), "99.5%");
        assert_eq!(Objective::parse("99.95").unwrap().to_string(), "99.95%");
        for bad in ["100%", "0%", "abc", "-1%", "", "101"] {
            assert!(Objective::parse(bad).is_err(), "{bad}");
        }
    }
}
