//! HDR latency histograms: 1 µs .. 1 h at 3 significant digits, stored V2 + deflate, one row
//! per series, phase and bucket (minute or hour). Merging is exact: HDR histograms add.

use std::collections::{BTreeMap, HashMap};

use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use rusqlite::{params, Connection, OptionalExtension};

use super::{HOUR, MINUTE};

/// Largest value tracked, in microseconds (1 hour); larger values are clamped.
pub const HIST_MAX_US: u64 = 3_600_000_000;

pub type Hist = Histogram<u64>;

pub fn new_hist() -> Hist {
    // Bounds are constants known to be valid.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3)
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

fn load(
    conn: &Connection,
    series: &str,
    phase: &str,
    res: i64,
    bucket: i64,
) -> rusqlite::Result<Option<Hist>> {
    let blob: Option<Vec<u8>> = conn
        .query_row(
            "SELECT data FROM histograms WHERE series = ?1 AND phase = ?2 AND resolution = ?3 AND bucket_start = ?4",
            params![series, phase, res, bucket],
            |r| r.get(0),
        )
        .optional()?;
    Ok(blob.and_then(|b| decode(&b)))
}

fn save(
    conn: &Connection,
    series: &str,
    phase: &str,
    res: i64,
    bucket: i64,
    h: &Hist,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO histograms (series, phase, resolution, bucket_start, count, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (series, phase, resolution, bucket_start) DO UPDATE SET count = excluded.count, data = excluded.data",
        params![series, phase, res, bucket, h.len() as i64, encode(h)],
    )?;
    Ok(())
}

/// Add raw values (µs) to one bucket.
pub fn add_values(
    conn: &Connection,
    series: &str,
    phase: &str,
    res: i64,
    bucket: i64,
    values: &[u64],
) -> rusqlite::Result<()> {
    let mut h = load(conn, series, phase, res, bucket)?.unwrap_or_else(new_hist);
    for v in values {
        record(&mut h, *v);
    }
    save(conn, series, phase, res, bucket, &h)
}

/// Merge minute buckets that start before `cutoff_ms` into hourly buckets; returns how many
/// minute rows were rolled.
pub fn rollup(conn: &Connection, cutoff_ms: i64) -> rusqlite::Result<usize> {
    let mut groups: HashMap<(String, String, i64), Hist> = HashMap::new();
    let mut n = 0;
    {
        let mut st = conn.prepare(
            "SELECT series, phase, bucket_start, data FROM histograms WHERE resolution = ?1 AND bucket_start < ?2",
        )?;
        let rows = st.query_map(params![MINUTE, cutoff_ms], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        for row in rows {
            let (series, phase, start, data) = row?;
            n += 1;
            let hour = start.div_euclid(HOUR * 1000) * HOUR * 1000;
            if let Some(h) = decode(&data) {
                let g = groups.entry((series, phase, hour)).or_insert_with(new_hist);
                let _ = g.add(&h);
            }
        }
    }
    for ((series, phase, hour), h) in groups {
        let mut merged = load(conn, &series, &phase, HOUR, hour)?.unwrap_or_else(new_hist);
        let _ = merged.add(&h);
        save(conn, &series, &phase, HOUR, hour, &merged)?;
    }
    conn.execute(
        "DELETE FROM histograms WHERE resolution = ?1 AND bucket_start < ?2",
        params![MINUTE, cutoff_ms],
    )?;
    Ok(n)
}

/// Merge every bucket of every series and phase overlapping `[since_ms, until_ms)`. Hourly
/// buckets are taken whole when they overlap the window's start.
pub fn window(
    conn: &Connection,
    since_ms: i64,
    until_ms: i64,
) -> rusqlite::Result<BTreeMap<(String, String), Hist>> {
    let mut out: BTreeMap<(String, String), Hist> = BTreeMap::new();
    let hour_since = since_ms.div_euclid(HOUR * 1000) * HOUR * 1000;
    let mut st = conn.prepare(
        "SELECT series, phase, data FROM histograms
         WHERE (resolution = ?1 AND bucket_start >= ?2 AND bucket_start < ?4)
            OR (resolution = ?3 AND bucket_start >= ?5 AND bucket_start < ?4)",
    )?;
    let rows = st.query_map(
        params![
            MINUTE,
            since_ms.div_euclid(MINUTE * 1000) * MINUTE * 1000,
            HOUR,
            until_ms,
            hour_since
        ],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        },
    )?;
    for row in rows {
        let (series, phase, data) = row?;
        if let Some(h) = decode(&data) {
            let _ = out.entry((series, phase)).or_insert_with(new_hist).add(&h);
        }
    }
    Ok(out)
}

/// Merged histogram of one series and phase over a window.
pub fn series_window(
    conn: &Connection,
    series: &str,
    phase: &str,
    since_ms: i64,
    until_ms: i64,
) -> rusqlite::Result<Hist> {
    let mut h = new_hist();
    let mut st = conn.prepare(
        "SELECT data FROM histograms WHERE series = ?1 AND phase = ?2 AND bucket_start >= ?3 AND bucket_start < ?4
         AND (resolution = ?5 OR resolution = ?6)",
    )?;
    let since = since_ms.div_euclid(MINUTE * 1000) * MINUTE * 1000;
    let rows = st.query_map(params![series, phase, since, until_ms, MINUTE, HOUR], |r| {
        r.get::<_, Vec<u8>>(0)
    })?;
    for row in rows {
        if let Some(x) = decode(&row?) {
            let _ = h.add(&x);
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
}
