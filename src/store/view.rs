//! The fleet's newest runs, per location, for the dashboard of any agent (fleet mode): seeded
//! from the database once, then followed through the run feed every agent appends its runs
//! to (see `fleet`), so a refresh of the page reads one short indexed range of the feed and
//! answers from memory. The same [`Latest`] maps the writer keeps for a single machine, one
//! per location.
//!
//! Not here: a single machine's overview (the store's own [`Latest`]), judging anything.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{db, each_location, latest_of, latest_runs, locations, rows_of, Changes, Conn};
use super::{Latest, LatestRun, Recent, RECENT_RUNS};
use crate::config::Config;

/// The feed is read at most this often (every open page asks every few seconds).
const READ_EVERY: Duration = Duration::from_millis(500);
/// Unread for longer than this, the feed may have been pruned past the view's position
/// (it keeps ten minutes): the view is seeded again from the runs.
const RESEED_AFTER: Duration = Duration::from_secs(300);
/// Feed batches read per refresh at most (a burst is caught up over a few refreshes).
const MAX_BATCHES: usize = 20;

/// Every location's newest runs and uptime strips.
#[derive(Default)]
pub struct FleetView(Mutex<ViewState>);

#[derive(Default)]
struct ViewState {
    /// The feed position read up to (`None`: not seeded yet).
    pos: Option<(i64, i64)>,
    read_at: Option<Instant>,
    by_location: BTreeMap<String, Latest>,
}

/// One series in a fleet view: fleet-wide (every location's runs together) and per location.
pub struct SeriesView {
    pub latest: LatestRun,
    pub recent: Recent,
    /// (location, newest run, recent runs), by location.
    pub locations: Vec<(String, LatestRun, Recent)>,
}

/// What changed since a cursor, in a fleet view.
pub struct FleetChanges {
    pub cursor: String,
    pub full: bool,
    pub series: Vec<SeriesView>,
    /// Every location the view knows, sorted.
    pub locations: Vec<String>,
}

impl FleetView {
    /// Bring the view up to date from `conn` (a reader of the fleet's Postgres).
    pub fn refresh(&self, conn: &Conn, config: &Config) -> db::Result<()> {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if st.read_at.is_some_and(|t| now - t < READ_EVERY) {
            return Ok(());
        }
        let stale = st.read_at.is_none_or(|t| now - t > RESEED_AFTER);
        let mut pos = match st.pos {
            Some(p) if !stale => p,
            _ => {
                // Position first: a run stored meanwhile is read twice, never missed (a
                // strip takes a run it already has once).
                let head = crate::fleet::feed_head(conn)?;
                let locs = locations(conn)?;
                let mut by_location = BTreeMap::new();
                each_location(conn, &locs, |l| {
                    let latest = Latest::default();
                    latest.seed(conn, latest_runs(conn)?)?;
                    by_location.insert(l.to_string(), latest);
                    Ok(())
                })?;
                st.by_location = by_location;
                head
            }
        };
        for _ in 0..MAX_BATCHES {
            let batch = crate::fleet::feed_runs(conn, config, pos)?;
            for (location, run) in &batch.runs {
                let rows = rows_of(run).iter().map(latest_of).collect();
                st.by_location
                    .entry(location.clone())
                    .or_default()
                    .update(rows);
            }
            pos = batch.end;
            if !batch.full {
                break;
            }
        }
        st.pos = Some(pos);
        st.read_at = Some(now);
        Ok(())
    }

    /// The series changed since `cursor` (from an earlier answer of the same view): of one
    /// location, or (`None`) fleet-wide with each location's runs.
    pub fn changed_since(&self, location: Option<&str>, cursor: Option<&str>) -> FleetChanges {
        let st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let known: Vec<String> = st.by_location.keys().cloned().collect();
        let picked: Vec<(&String, &Latest)> = st
            .by_location
            .iter()
            .filter(|(l, _)| location.is_none_or(|x| x == l.as_str()))
            .collect();
        // The cursor holds one part per location, in order: `<n>~<c1>~<c2>…`.
        let parts: Vec<&str> = cursor
            .and_then(|c| c.split_once('~'))
            .filter(|(n, _)| n.parse::<usize>().ok() == Some(picked.len()))
            .map(|(_, rest)| rest.split('~').collect())
            .unwrap_or_default();
        let per: Vec<Changes> = picked
            .iter()
            .enumerate()
            .map(|(i, (_, l))| l.changed_since(parts.get(i).copied()))
            .collect();
        let full = per.iter().any(|c| c.full) || picked.is_empty();
        let cursor = format!(
            "{}~{}",
            picked.len(),
            per.iter()
                .map(|c| c.cursor.as_str())
                .collect::<Vec<_>>()
                .join("~")
        );
        // A series changed in any location comes whole, with every location's runs.
        let changed: std::collections::BTreeSet<String> = per
            .iter()
            .flat_map(|c| c.series.iter().map(|(r, _)| r.probe.clone()))
            .collect();
        let mut by_series: BTreeMap<String, Vec<(String, LatestRun, Recent)>> = BTreeMap::new();
        for (loc, latest) in &picked {
            let all = if full {
                latest.overview()
            } else {
                latest.some(&changed)
            };
            for (run, recent) in all {
                by_series.entry(run.probe.clone()).or_default().push((
                    loc.to_string(),
                    run,
                    recent,
                ));
            }
        }
        let series = by_series
            .into_values()
            .filter_map(|locations| {
                let (latest, recent) = merged(&locations)?;
                Some(SeriesView {
                    latest,
                    recent,
                    locations,
                })
            })
            .collect();
        FleetChanges {
            cursor,
            full,
            series,
            locations: known,
        }
    }
}

/// A series fleet-wide: the newest run of any location, and every location's recent runs
/// together in time order (the newest [`RECENT_RUNS`]).
fn merged(locations: &[(String, LatestRun, Recent)]) -> Option<(LatestRun, Recent)> {
    let latest = locations
        .iter()
        .map(|(_, r, _)| r)
        .max_by_key(|r| r.started_at)?
        .clone();
    let mut recent = Recent::default();
    let mut runs: Vec<_> = locations
        .iter()
        .flat_map(|(_, _, x)| x.runs.iter().cloned())
        .collect();
    runs.sort_by_key(|t| t.0);
    let skip = runs.len().saturating_sub(RECENT_RUNS);
    recent.runs = runs.into_iter().skip(skip).collect();
    let mut wer: Vec<(i64, f64)> = locations
        .iter()
        .flat_map(|(_, _, x)| x.wer.iter().copied())
        .collect();
    wer.sort_by_key(|w| w.0);
    let skip = wer.len().saturating_sub(RECENT_RUNS);
    recent.wer = wer.into_iter().skip(skip).collect();
    recent.last_bad = locations
        .iter()
        .filter_map(|(_, _, x)| x.last_bad.as_ref())
        .max_by_key(|r| r.started_at)
        .cloned();
    Some((latest, recent))
}

#[cfg(test)]
mod tests {
    use super::super::tests::run;
    use super::*;

    fn view(runs: &[(&str, LatestRun)]) -> FleetView {
        let v = FleetView::default();
        {
            let mut st = v.0.lock().unwrap();
            for (l, r) in runs {
                st.by_location
                    .entry(l.to_string())
                    .or_default()
                    .update(vec![r.clone()]);
            }
        }
        v
    }

    #[test]
    fn fleet_wide_series_carry_every_location_and_a_cursor_per_location() {
        let v = view(&[
            ("eu", run("a", 1_000, "down")),
            ("us", run("a", 2_000, "up")),
            ("us", run("b", 1_500, "up")),
        ]);
        let all = v.changed_since(None, None);
        assert!(all.full);
        assert_eq!(all.locations, ["eu", "us"]);
        let a = &all.series[0];
        assert_eq!(a.latest.probe, "a");
        assert_eq!(a.latest.started_at, 2_000, "the newest of any location");
        let strip: Vec<(i64, &str)> = a.recent.runs.iter().map(|t| (t.0, t.1)).collect();
        assert_eq!(
            strip,
            [(1_000, "down"), (2_000, "up")],
            "merged in time order"
        );
        assert_eq!(
            a.recent.last_bad.as_ref().map(|r| r.started_at),
            Some(1_000)
        );
        let locs: Vec<&str> = a.locations.iter().map(|l| l.0.as_str()).collect();
        assert_eq!(locs, ["eu", "us"]);
        assert_eq!(
            all.series[1].locations.len(),
            1,
            "b is measured from us only"
        );

        // Nothing new: nothing listed. A run in eu: its series comes whole.
        let none = v.changed_since(None, Some(&all.cursor));
        assert!(!none.full && none.series.is_empty(), "{}", none.cursor);
        v.0.lock().unwrap().by_location["eu"].update(vec![run("a", 3_000, "up")]);
        let one = v.changed_since(None, Some(&all.cursor));
        assert!(!one.full);
        assert_eq!(one.series.len(), 1);
        assert_eq!(one.series[0].locations.len(), 2);
        // A replayed run is not counted twice.
        v.0.lock().unwrap().by_location["eu"].update(vec![run("a", 3_000, "up")]);
        let again = v.changed_since(Some("eu"), None);
        assert_eq!(again.series[0].recent.runs.len(), 2);

        // One location: its series only; a fleet-wide cursor means nothing there.
        let eu = v.changed_since(Some("eu"), Some(&all.cursor));
        assert!(eu.full);
        assert_eq!(eu.series.len(), 1);
        assert_eq!(eu.series[0].latest.started_at, 3_000);
        for bad in ["", "x", "2~", "9~1.1~2.2"] {
            assert!(v.changed_since(None, Some(bad)).full, "{bad}");
        }
    }
}
