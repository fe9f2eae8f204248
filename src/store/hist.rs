//! HDR latency histograms: 1 µs .. 1 h at 3 significant digits. Two sources, never both for
//! the same hour of a query:
//!
//! - the runs themselves (every run keeps its phase times, see [`super::codec`]): minute-level
//!   detail, used from `meta.fine_from` on — the hour at which `[retention]
//!   minute_histograms` (or the runs retention, if shorter) ends;
//! - `hourly` rows (V2 + deflate), rolled up from the runs once an hour has passed
//!   ([`super::Store::maintain`]), used before `fine_from` and kept `hourly_histograms`.
//!
//! Merging is exact: HDR histograms add, and a histogram built from a run's values equals the
//! merge of histograms built from its parts, so a report gives the same figures whichever
//! source it reads.

use std::collections::{BTreeMap, HashMap};

use super::db::{self, params, Conn, OptionalExtension};
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;

use super::{codec, HOUR, MINUTE};

/// Largest value tracked, in microseconds (1 hour); larger values are clamped.
pub const HIST_MAX_US: u64 = 3_600_000_000;

pub type Hist = Histogram<u64>;

/// An empty histogram. It starts small and grows to the largest value recorded (at most
/// [`HIST_MAX_US`]): a histogram sized for 1 h up front is a 190 KB counts array, allocated and
/// zeroed for every merge. Buckets and percentiles are the same either way.
pub fn new_hist() -> Hist {
    // Bounds are constants known to be valid.
    Histogram::new_with_bounds(1, 2, 3)
        .map(|mut h| {
            h.auto(true);
            h
        })
        .unwrap_or_else(|_| unreachable!("valid HDR bounds"))
}

pub fn record(h: &mut Hist, us: u64) {
    let _ = h.record(us.clamp(1, HIST_MAX_US));
}

pub fn encode(h: &Hist) -> Vec<u8> {
    let mut out = Vec::new();
    // Serializing into a Vec cannot fail for a histogram we built.
    let _ = V2DeflateSerializer::new().serialize(h, &mut out);
    out
}

pub fn decode(bytes: &[u8]) -> Option<Hist> {
    let h: Hist = Deserializer::new().deserialize(&mut &bytes[..]).ok()?;
    let mut out = new_hist();
    out.add(&h).ok()?;
    Some(out)
}

pub(crate) fn floor(ms: i64, res: i64) -> i64 {
    ms.div_euclid(res * 1000) * res * 1000
}

/// The start of the hour holding `ms`.
pub fn floor_hour(ms: i64) -> i64 {
    floor(ms, HOUR)
}

/// A bookkeeping value of the store (`fine_from`, `runs_from`, `rolled_until`; 0 if unset).
pub fn meta_value(conn: &Conn, key: &str) -> db::Result<i64> {
    meta(conn, key)
}

/// Bookkeeping kept per location: each location rolls up and prunes its own series.
const PER_LOCATION: &[&str] = &["rolled_until", "roll_cursor", "fine_from", "runs_from"];

/// The `meta` key of `key` for this connection (`key@location` for per-location ones).
pub(crate) fn meta_key(conn: &Conn, key: &str) -> String {
    match conn.location() {
        loc if !loc.is_empty() && PER_LOCATION.contains(&key) => format!("{key}@{loc}"),
        _ => key.to_string(),
    }
}

pub(crate) fn meta(conn: &Conn, key: &str) -> db::Result<i64> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([meta_key(conn, key)], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Merge `h` into the hourly row of `series`/`phase` at `hour`.
pub(crate) fn add_hourly(
    conn: &Conn,
    hour: i64,
    series: i64,
    phase: &str,
    h: &Hist,
) -> db::Result<()> {
    let old: Option<Vec<u8>> = conn
        .prepare_cached(
            "SELECT data FROM hourly WHERE bucket_start = ?1 AND series = ?2 AND phase = ?3",
        )?
        .query_row(params![hour, series, phase], |r| r.get(0))
        .optional()?;
    let merged = match old.as_deref().and_then(decode) {
        Some(mut m) => {
            let _ = m.add(h);
            m
        }
        None => h.clone(),
    };
    conn.prepare_cached(
        "INSERT INTO hourly (bucket_start, series, phase, count, data) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (bucket_start, series, phase) DO UPDATE SET count = excluded.count, data = excluded.data",
    )?
    .execute(params![hour, series, phase, merged.len() as i64, encode(&merged)])?;
    Ok(())
}

/// A series' name and phase names, by id.
pub struct SeriesNames {
    pub name: String,
    pub phases: Vec<String>,
}

pub(crate) fn parse_phases(json: &str) -> Vec<String> {
    serde_json::from_str(json).unwrap_or_default()
}

/// Every series' name and phase names, by id (of this connection's location).
pub fn series_names(conn: &Conn) -> db::Result<HashMap<i64, SeriesNames>> {
    all_series(conn)
}

/// One series' id, name and phase names (of this connection's location), by its name.
pub fn series_named(conn: &Conn, name: &str) -> db::Result<Option<(i64, SeriesNames)>> {
    conn.prepare_cached("SELECT id, phases FROM series WHERE location = ?1 AND name = ?2")?
        .query_row([conn.location().as_str(), name], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                SeriesNames {
                    name: name.to_string(),
                    phases: parse_phases(&r.get::<_, String>(1)?),
                },
            ))
        })
        .optional()
}

fn all_series(conn: &Conn) -> db::Result<HashMap<i64, SeriesNames>> {
    let mut st = conn.prepare_cached("SELECT id, name, phases FROM series WHERE location = ?1")?;
    let rows = st.query_map([conn.location()], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            SeriesNames {
                name: r.get(1)?,
                phases: parse_phases(&r.get::<_, String>(2)?),
            },
        ))
    })?;
    rows.collect()
}

/// Call `f(phase index, µs)` for every phase of every run of `series` in `[lo, hi)`.
pub(crate) fn fold_runs(
    conn: &Conn,
    series: i64,
    lo: i64,
    hi: i64,
    mut f: impl FnMut(usize, u64),
) -> db::Result<()> {
    let mut st = conn.prepare_cached(
        "SELECT data FROM runs WHERE series = ?1 AND started_at >= ?2 AND started_at < ?3",
    )?;
    st.query_each(params![series, lo, hi], |r| {
        let _ = codec::decode(r.blob(0), &mut f);
        Ok(())
    })
}

/// Where a window `[since, until)` reads hourly rows (`hours`) and where runs (`runs`).
struct Split {
    hours: (i64, i64),
    runs: (i64, i64),
}

fn split(conn: &Conn, since_ms: i64, until_ms: i64) -> db::Result<Split> {
    let fine_from = meta(conn, "fine_from")?;
    // A window takes whole minutes from the runs (as minute buckets did) and whole hours from
    // the hourly rows.
    let run_lo = floor(since_ms, MINUTE).max(fine_from);
    let run_hi = floor(until_ms - 1, MINUTE) + MINUTE * 1000;
    Ok(Split {
        hours: (floor(since_ms, HOUR), until_ms.min(fine_from)),
        runs: (run_lo, run_hi),
    })
}

/// Merge the latency of every series and phase over `[since_ms, until_ms)`: minutes from the
/// runs, whole hours from the hourly rows before `fine_from` (an hour overlapping the
/// window's start is taken whole).
pub fn window(
    conn: &Conn,
    since_ms: i64,
    until_ms: i64,
) -> db::Result<BTreeMap<(String, String), Hist>> {
    let sp = split(conn, since_ms, until_ms)?;
    let series = all_series(conn)?;
    let mut out: BTreeMap<(String, String), Hist> = BTreeMap::new();
    if sp.hours.0 < sp.hours.1 {
        let mut st = conn.prepare_cached(
            "SELECT series, phase, data FROM hourly WHERE bucket_start >= ?1 AND bucket_start < ?2",
        )?;
        st.query_each(params![sp.hours.0, sp.hours.1], |r| {
            let Some(s) = series.get(&r.get::<_, i64>(0)?) else {
                return Ok(());
            };
            if let Some(h) = decode(r.blob(2)) {
                let _ = out
                    .entry((s.name.clone(), r.get(1)?))
                    .or_insert_with(new_hist)
                    .add(&h);
            }
            Ok(())
        })?;
    }
    if sp.runs.0 < sp.runs.1 {
        for (id, s) in &series {
            let mut per_phase: Vec<Option<Hist>> = vec![None; s.phases.len()];
            fold_runs(conn, *id, sp.runs.0, sp.runs.1, |i, us| {
                if let Some(slot) = per_phase.get_mut(i) {
                    record(slot.get_or_insert_with(new_hist), us);
                }
            })?;
            for (i, h) in per_phase.into_iter().enumerate() {
                if let Some(h) = h {
                    let _ = out
                        .entry((s.name.clone(), s.phases[i].clone()))
                        .or_insert_with(new_hist)
                        .add(&h);
                }
            }
        }
    }
    Ok(out)
}

/// Merged histogram of one series and phase over a window (see [`window`]).
pub fn series_window(
    conn: &Conn,
    series: &str,
    phase: &str,
    since_ms: i64,
    until_ms: i64,
) -> db::Result<Hist> {
    let mut h = new_hist();
    let row: Option<(i64, String)> = conn
        .prepare_cached("SELECT id, phases FROM series WHERE location = ?1 AND name = ?2")?
        .query_row([conn.location().as_str(), series], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((id, phases)) = row else {
        return Ok(h);
    };
    let sp = split(conn, since_ms, until_ms)?;
    if sp.hours.0 < sp.hours.1 {
        let mut st = conn.prepare_cached(
            "SELECT data FROM hourly WHERE bucket_start >= ?1 AND bucket_start < ?2 AND series = ?3 AND phase = ?4",
        )?;
        st.query_each(params![sp.hours.0, sp.hours.1, id, phase], |r| {
            if let Some(x) = decode(r.blob(0)) {
                let _ = h.add(&x);
            }
            Ok(())
        })?;
    }
    if let Some(want) = parse_phases(&phases).iter().position(|p| p == phase) {
        if sp.runs.0 < sp.runs.1 {
            fold_runs(conn, id, sp.runs.0, sp.runs.1, |i, us| {
                if i == want {
                    record(&mut h, us);
                }
            })?;
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_precision() {
        let mut h = new_hist();
        for v in [1, 999, 1000, 123_456, 5_000_000, HIST_MAX_US * 2] {
            record(&mut h, v);
        }
        let back = decode(&encode(&h)).unwrap();
        assert_eq!(back.len(), 6);
        assert_eq!(back.max(), h.max());
        // 3 significant digits
        let q = back.value_at_quantile(0.5);
        assert!((999..=1001).contains(&q), "{q}");
    }

    #[test]
    fn growing_histogram_answers_like_a_full_size_one() {
        let mut full = Histogram::<u64>::new_with_bounds(1, HIST_MAX_US, 3).unwrap();
        let mut small = new_hist();
        for v in [
            3u64,
            1_999,
            2_048,
            20_000,
            20_011,
            987_654,
            3_599_999_999,
            HIST_MAX_US,
        ] {
            full.record(v).unwrap();
            record(&mut small, v);
        }
        for q in [0.0, 0.25, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(
                small.value_at_quantile(q),
                full.value_at_quantile(q),
                "q{q}"
            );
        }
        assert_eq!(small.max(), full.max());
        let mut merged = new_hist();
        merged.add(&full).unwrap();
        assert_eq!(merged.value_at_quantile(0.5), full.value_at_quantile(0.5));
    }
}
