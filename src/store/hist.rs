//! HDR latency histograms: 1 µs .. 1 h at 3 significant digits. Two sources, never both for
//! the same hour of a query:
//!
//! - the runs themselves (every run keeps its phase times, see [`super::codec`]; a rolled-up
//!   hour's runs are packed, [`super::packed`]): minute-level
//!   detail, used from `meta.fine_from` on — the hour at which `[retention]
//!   minute_histograms` (or the runs retention, if shorter) ends;
//! - `hourly` rows, one per series and hour holding every phase's histogram in one compact
//!   blob ([`encode_hour`]), rolled up from the runs once an hour has passed
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

/// V2 + deflate: how earlier versions stored a histogram (one per phase), read when their
/// rows are converted.
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

/// The histograms of one series' hour, by phase index (`series.phases`, as in runs).
pub type Hour = BTreeMap<usize, Hist>;

/// Sub-buckets per HDR bucket half (our histograms: lowest 1, 3 significant digits, so 2048
/// sub-buckets and a unit magnitude of 0), as a power of two.
const HALF_MAG: u32 = 10;

/// The HDR counts index of `v` in our histograms (the crate keeps its own private).
fn bucket_index(v: u64) -> u64 {
    let mask = (2u64 << HALF_MAG) - 1;
    let bucket = u64::from(64 - (v | mask).leading_zeros() - (HALF_MAG + 1));
    ((bucket + 1) << HALF_MAG) + (v >> bucket) - (1 << HALF_MAG)
}

/// The lowest value of counts index `i` (the inverse of [`bucket_index`]).
fn bucket_value(i: u64) -> u64 {
    let half = 1u64 << HALF_MAG;
    match (i >> HALF_MAG).checked_sub(1) {
        None | Some(0) => i,
        Some(bucket) => ((i & (half - 1)) + half) << bucket,
    }
}

/// Encode one series' hour: for each phase in index order, its index and bucket count, then
/// per non-empty bucket the distance from the previous one (doubled, plus 1 when the count is
/// not 1, the count minus 2 following), all LEB128 varints. About one byte per distinct value:
/// half of what a V2 + deflate histogram per phase takes, with the same buckets.
pub fn encode_hour(hour: &Hour) -> Vec<u8> {
    let mut out = Vec::new();
    for (&phase, h) in hour {
        let buckets: Vec<(u64, u64)> = h
            .iter_recorded()
            .map(|v| (bucket_index(v.value_iterated_to()), v.count_at_value()))
            .collect();
        if buckets.is_empty() {
            continue;
        }
        codec::put_varint(&mut out, phase as u64);
        codec::put_varint(&mut out, buckets.len() as u64);
        let mut last = 0;
        for (i, n) in buckets {
            codec::put_varint(&mut out, ((i - last) << 1) | u64::from(n != 1));
            if n != 1 {
                codec::put_varint(&mut out, n - 2);
            }
            last = i;
        }
    }
    out
}

/// Decode a blob written by [`encode_hour`]; `None` when it is malformed.
pub fn decode_hour(mut buf: &[u8]) -> Option<Hour> {
    let top = bucket_index(HIST_MAX_US);
    let mut out = Hour::new();
    while !buf.is_empty() {
        let phase = usize::try_from(codec::get_varint(&mut buf)?).ok()?;
        let n = codec::get_varint(&mut buf)?;
        // Every bucket takes at least a byte: a count beyond the blob is not believed.
        if n > buf.len() as u64 {
            return None;
        }
        let mut h = new_hist();
        let mut i = 0u64;
        for _ in 0..n {
            let v = codec::get_varint(&mut buf)?;
            i = i.checked_add(v >> 1).filter(|i| *i <= top)?;
            let count = match v & 1 {
                0 => 1,
                _ => codec::get_varint(&mut buf)?.checked_add(2)?,
            };
            h.record_n(bucket_value(i), count).ok()?;
        }
        out.entry(phase).or_insert_with(new_hist).add(&h).ok()?;
    }
    Some(out)
}

/// Merge `add` into the hourly row of `series` at `hour`.
pub(crate) fn add_hourly(conn: &Conn, hour: i64, series: i64, add: &Hour) -> db::Result<()> {
    let old: Option<Vec<u8>> = conn
        .prepare_cached("SELECT data FROM hourly WHERE bucket_start = ?1 AND series = ?2")?
        .query_row(params![hour, series], |r| r.get(0))
        .optional()?;
    let mut merged = old.as_deref().and_then(decode_hour).unwrap_or_default();
    for (phase, h) in add {
        let _ = merged.entry(*phase).or_insert_with(new_hist).add(h);
    }
    conn.prepare_cached(
        "INSERT INTO hourly (bucket_start, series, data) VALUES (?1, ?2, ?3)
         ON CONFLICT (bucket_start, series) DO UPDATE SET data = excluded.data",
    )?
    .execute(params![hour, series, encode_hour(&merged)])?;
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

/// Call `f(phase index, µs)` for every phase of every run of `series` in `[lo, hi)` (from
/// `runs` and the packed hours).
pub(crate) fn fold_runs(
    conn: &Conn,
    series: i64,
    lo: i64,
    hi: i64,
    mut f: impl FnMut(usize, u64),
) -> db::Result<()> {
    super::each_run(conn, &[series], (lo, hi), |_, r| {
        let _ = codec::decode(r.phases, &mut f);
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
            "SELECT series, data FROM hourly WHERE bucket_start >= ?1 AND bucket_start < ?2",
        )?;
        st.query_each(params![sp.hours.0, sp.hours.1], |r| {
            let Some(s) = series.get(&r.get::<_, i64>(0)?) else {
                return Ok(());
            };
            for (i, h) in decode_hour(r.blob(1)).unwrap_or_default() {
                if let Some(phase) = s.phases.get(i) {
                    let _ = out
                        .entry((s.name.clone(), phase.clone()))
                        .or_insert_with(new_hist)
                        .add(&h);
                }
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
    let Some(want) = parse_phases(&phases).iter().position(|p| p == phase) else {
        return Ok(h);
    };
    let sp = split(conn, since_ms, until_ms)?;
    if sp.hours.0 < sp.hours.1 {
        let mut st = conn.prepare_cached(
            "SELECT data FROM hourly WHERE bucket_start >= ?1 AND bucket_start < ?2 AND series = ?3",
        )?;
        st.query_each(params![sp.hours.0, sp.hours.1, id], |r| {
            if let Some(x) = decode_hour(r.blob(0)).and_then(|mut d| d.remove(&want)) {
                let _ = h.add(&x);
            }
            Ok(())
        })?;
    }
    if sp.runs.0 < sp.runs.1 {
        fold_runs(conn, id, sp.runs.0, sp.runs.1, |i, us| {
            if i == want {
                record(&mut h, us);
            }
        })?;
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_indexes_match_the_crate() {
        let h = new_hist();
        let mut last = None;
        for v in (0..5000u64)
            .chain([
                8191,
                8192,
                65_535,
                1_000_003,
                2_097_151,
                2_097_152,
                123_456_789,
            ])
            .chain([HIST_MAX_US - 1, HIST_MAX_US])
        {
            let i = bucket_index(v);
            assert_eq!(bucket_value(i), h.lowest_equivalent(v), "{v}");
            assert_eq!(bucket_index(h.highest_equivalent(v)), i, "{v}");
            if let Some((lv, li)) = last {
                let same = h.lowest_equivalent(lv) == h.lowest_equivalent(v);
                assert_eq!(i == li, same, "{lv} {v}");
            }
            last = Some((v, i));
        }
        assert!(
            bucket_index(HIST_MAX_US) < 1 << 15,
            "3 varint bytes at most"
        );
    }

    /// (values per phase index, encoded length)
    type HourCase<'a> = (&'a [(usize, &'a [u64])], usize);

    #[test]
    fn hour_roundtrip_table() {
        let cases: &[HourCase] = &[
            (&[], 0),
            // one value: phase, bucket count, bucket 5346 (2 bytes)
            (&[(0, &[20_000])], 1 + 1 + 2),
            // a repeated value: + its count
            (&[(0, &[20_000, 20_000, 20_000])], 1 + 1 + 2 + 1),
            // phases keep their indexes; values of one bucket count there
            (
                &[(1, &[5, 5, 7]), (9, &[HIST_MAX_US, 1])],
                (1 + 1 + 1 + 1 + 1) + (1 + 1 + 1 + 3),
            ),
            // 2,000,000 and 2,000,100 µs share a bucket 1,024 µs wide
            (
                &[(3, &[1_000, 1_001, 1_002, 2_000_000, 2_000_100])],
                1 + 1 + 2 + 1 + 1 + 3 + 1,
            ),
        ];
        for (phases, len) in cases {
            let mut hour = Hour::new();
            for (i, vs) in *phases {
                for v in *vs {
                    record(hour.entry(*i).or_insert_with(new_hist), *v);
                }
            }
            let blob = encode_hour(&hour);
            assert_eq!(blob.len(), *len, "{phases:?}");
            let back = decode_hour(&blob).unwrap();
            assert_eq!(
                back.keys().collect::<Vec<_>>(),
                hour.keys().collect::<Vec<_>>()
            );
            for (i, h) in &hour {
                let b = &back[i];
                assert_eq!(b.len(), h.len());
                for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
                    assert_eq!(b.value_at_quantile(q), h.value_at_quantile(q), "{i} q{q}");
                }
                assert_eq!(b.max(), h.max());
            }
        }
    }

    #[test]
    fn an_hour_of_60_values_is_small() {
        // 60 runs of a phase spread over 250..650 ms: about a byte a value, where V2 +
        // deflate took about twice that.
        let mut hour = Hour::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..60 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            record(
                hour.entry(0).or_insert_with(new_hist),
                250_000 + x % 400_000,
            );
        }
        let compact = encode_hour(&hour).len();
        let v2 = encode(&hour[&0]).len();
        assert!(compact <= 80, "{compact} bytes (V2 + deflate: {v2})");
        assert!(compact * 3 / 2 <= v2, "{compact} bytes, V2 + deflate {v2}");
    }

    #[test]
    fn malformed_hours_are_none() {
        let ok = {
            let mut hour = Hour::new();
            record(hour.entry(2).or_insert_with(new_hist), 300);
            record(hour.entry(2).or_insert_with(new_hist), 301);
            encode_hour(&hour)
        };
        assert!(decode_hour(&ok).is_some());
        for cut in 1..ok.len() {
            assert!(decode_hour(&ok[..cut]).is_none(), "cut at {cut}");
        }
        // a bucket count larger than the blob; a bucket beyond 1 h; a varint too long
        assert!(decode_hour(&[0, 200, 1]).is_none());
        let mut far = vec![0, 1];
        codec::put_varint(&mut far, (bucket_index(HIST_MAX_US) + 1) << 1);
        assert!(decode_hour(&far).is_none());
        assert!(decode_hour(&[0xff; 11]).is_none());
    }

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
