//! The compact encoding of one run's timings in the `runs.data` blob: a phase mask, the
//! phase times in microseconds as LEB128 varints, and the run's duration as its (zigzag)
//! difference from the largest phase — for most probes the `total` phase, so one byte.
//!
//! The mask's bit `i` names the `i`-th phase of the series (`series.phases`, in the order
//! first seen), so a run stores no names. A series has at most [`MAX_PHASES`] phases in runs.
//!
//! A rolled-up hour of a series' runs is packed into one blob ([`encode_hour`]): per run, in
//! time order, its start as a varint delta in ms (the first from the hour's start), a flags
//! byte (outcome, has lag, has note), the lag in µs if present, the phase blob above, and the
//! note as length-prefixed UTF-8 if present. Packing takes the per-row key, record header and
//! cell overhead (about half of a run's bytes) out of the database.
//!
//! Not here: SQL. The store decides where the bytes go.

/// Phases a series can record per run (bits of the mask).
pub const MAX_PHASES: usize = 64;

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Encode `phases` (series phase index, µs; indexes below [`MAX_PHASES`], each at most once)
/// and the run's duration into `out`.
pub fn encode(out: &mut Vec<u8>, phases: &[(usize, u64)], duration_us: u64) {
    let mut vals = [None::<u64>; MAX_PHASES];
    let mut mask: u64 = 0;
    for &(i, us) in phases {
        if i < MAX_PHASES {
            mask |= 1 << i;
            vals[i] = Some(us);
        }
    }
    put_varint(out, mask);
    let mut largest = 0u64;
    for us in vals.iter().flatten() {
        put_varint(out, *us);
        largest = largest.max(*us);
    }
    put_varint(out, zigzag(duration_us as i64 - largest as i64));
}

/// Decode a blob written by [`encode`]: calls `phase(index, µs)` in index order and returns
/// the duration in µs; `None` when the blob is malformed.
pub fn decode(mut buf: &[u8], phase: impl FnMut(usize, u64)) -> Option<u64> {
    decode_from(&mut buf, phase)
}

/// Whether `buf` is exactly one blob written by [`encode`].
pub fn is_whole(mut buf: &[u8]) -> bool {
    decode_from(&mut buf, |_, _| {}).is_some() && buf.is_empty()
}

/// [`decode`] from the start of `buf`, advancing it past the blob (it is self-delimiting).
fn decode_from(buf: &mut &[u8], mut phase: impl FnMut(usize, u64)) -> Option<u64> {
    let mask = get_varint(buf)?;
    let mut largest = 0u64;
    for i in 0..MAX_PHASES {
        if mask & (1 << i) != 0 {
            let us = get_varint(buf)?;
            largest = largest.max(us);
            phase(i, us);
        }
    }
    let d = (largest as i64).saturating_add(unzigzag(get_varint(buf)?));
    Some(d.max(0) as u64)
}

/// One run of a packed hour ([`encode_hour`]), or a `runs` row read the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedRun<'a> {
    /// Start, ms since the epoch.
    pub started_at: i64,
    /// 0 up, 1 degraded, 2 down.
    pub outcome: u8,
    pub lag_us: Option<u64>,
    /// The phases and duration as [`encode`] wrote them.
    pub phases: &'a [u8],
    /// The run's note (error, details) as JSON text.
    pub note: Option<&'a str>,
}

const OUTCOME: u8 = 0b11;
const HAS_LAG: u8 = 0b100;
const HAS_NOTE: u8 = 0b1000;

/// Pack `runs` (in time order, none before `hour_start`) into `out`; `None` (and `out`
/// unchanged) when they are not, or a run's outcome or phase blob is not one of ours.
pub fn encode_hour(out: &mut Vec<u8>, hour_start: i64, runs: &[PackedRun]) -> Option<()> {
    let len = out.len();
    let r = (|| {
        let mut prev = hour_start;
        for r in runs {
            let delta = u64::try_from(r.started_at.checked_sub(prev)?).ok()?;
            if r.outcome > 2 || !is_whole(r.phases) {
                return None;
            }
            put_varint(out, delta);
            let flags = r.outcome
                | if r.lag_us.is_some() { HAS_LAG } else { 0 }
                | if r.note.is_some() { HAS_NOTE } else { 0 };
            out.push(flags);
            if let Some(lag) = r.lag_us {
                put_varint(out, lag);
            }
            out.extend_from_slice(r.phases);
            if let Some(note) = r.note {
                put_varint(out, note.len() as u64);
                out.extend_from_slice(note.as_bytes());
            }
            prev = r.started_at;
        }
        Some(())
    })();
    if r.is_none() {
        out.truncate(len);
    }
    r
}

/// The runs of a blob written by [`encode_hour`] for the hour starting at `hour_start`, in
/// time order; `None` when it is malformed (the blob comes from a file a user can edit).
pub fn decode_hour(mut buf: &[u8], hour_start: i64) -> Option<Vec<PackedRun<'_>>> {
    let mut out = Vec::new();
    let mut at = hour_start;
    while !buf.is_empty() {
        at = at.checked_add(i64::try_from(get_varint(&mut buf)?).ok()?)?;
        let (&flags, rest) = buf.split_first()?;
        buf = rest;
        if flags & !(OUTCOME | HAS_LAG | HAS_NOTE) != 0 || flags & OUTCOME > 2 {
            return None;
        }
        let lag_us = match flags & HAS_LAG {
            0 => None,
            _ => Some(get_varint(&mut buf)?),
        };
        let start = buf;
        decode_from(&mut buf, |_, _| {})?;
        let phases = &start[..start.len() - buf.len()];
        let note = match flags & HAS_NOTE {
            0 => None,
            _ => {
                let n = usize::try_from(get_varint(&mut buf)?).ok()?;
                let text = buf.get(..n)?;
                buf = &buf[n..];
                Some(std::str::from_utf8(text).ok()?)
            }
        };
        out.push(PackedRun {
            started_at: at,
            outcome: flags & OUTCOME,
            lag_us,
            phases,
            note,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (phases, duration µs, encoded length)
    type Case<'a> = (&'a [(usize, u64)], u64, usize);

    #[test]
    fn roundtrip_table() {
        let cases: &[Case] = &[
            (&[], 0, 2),
            (&[], 1_500, 3),
            (&[(0, 20_000), (1, 25_000)], 25_010, 1 + 3 + 3 + 1),
            (&[(1, 25_000), (0, 20_000)], 24_990, 8),
            (&[(63, u64::from(u32::MAX))], 7, 10 + 5 + 5),
            (&[(2, 1), (5, 300)], 300, 1 + 1 + 2 + 1),
        ];
        for (phases, d, len) in cases {
            let mut out = Vec::new();
            encode(&mut out, phases, *d);
            assert_eq!(out.len(), *len, "{phases:?} {d}");
            let mut back = Vec::new();
            let dd = decode(&out, |i, us| back.push((i, us)));
            assert_eq!(dd, Some(*d));
            let mut want = phases.to_vec();
            want.sort();
            assert_eq!(back, want);
        }
    }

    #[test]
    fn malformed_is_none() {
        assert_eq!(decode(&[], |_, _| {}), None);
        assert_eq!(
            decode(&[0b11], |_, _| {}),
            None,
            "mask names phases that are missing"
        );
        assert_eq!(decode(&[0xff; 11], |_, _| {}), None, "varint too long");
    }

    fn phases(list: &[(usize, u64)], d: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, list, d);
        out
    }

    fn run<'a>(
        started_at: i64,
        outcome: u8,
        lag_us: Option<u64>,
        phases: &'a [u8],
        note: Option<&'a str>,
    ) -> PackedRun<'a> {
        PackedRun {
            started_at,
            outcome,
            lag_us,
            phases,
            note,
        }
    }

    #[test]
    fn hours_roundtrip() {
        const H: i64 = 1_800_000_000_000;
        let (a, b) = (phases(&[(0, 20_000), (1, 25_000)], 25_010), phases(&[], 0));
        // (runs, encoded length)
        let cases: Vec<(Vec<PackedRun>, usize)> = vec![
            (vec![], 0),
            (vec![run(H, 0, None, &a, None)], 1 + 1 + a.len()),
            (
                vec![
                    run(H + 17_123, 0, Some(150), &a, None),
                    run(H + 77_123, 1, Some(0), &b, None),
                    run(
                        H + 137_000,
                        2,
                        None,
                        &a,
                        Some(r#"{"class":"timeout","message":"no answer in 5 s — ü"}"#),
                    ),
                    run(H + 137_000, 0, Some(u64::MAX), &b, Some("")),
                ],
                (3 + 1 + 2 + a.len())
                    + (3 + 1 + 1 + b.len())
                    + (3 + 1 + a.len() + 1 + 55)
                    + (1 + 1 + 10 + b.len() + 1),
            ),
        ];
        for (runs, len) in cases {
            let mut out = vec![0xaa];
            assert_eq!(encode_hour(&mut out, H, &runs), Some(()));
            assert_eq!(out.len(), 1 + len, "{runs:?}");
            assert_eq!(decode_hour(&out[1..], H), Some(runs));
        }
    }

    #[test]
    fn hours_refuse_what_they_cannot_hold() {
        const H: i64 = 3_600_000;
        let p = phases(&[(0, 5)], 5);
        let mut out = vec![7];
        for bad in [
            vec![run(H - 1, 0, None, &p, None)], // before the hour
            vec![run(H + 2, 0, None, &p, None), run(H + 1, 0, None, &p, None)], // out of order
            vec![run(H, 3, None, &p, None)],     // no such outcome
            vec![run(H, 0, None, &p[..1], None)], // a cut phase blob
            vec![run(H, 0, None, &[0, 0, 0], None)], // trailing bytes after the blob
        ] {
            assert_eq!(encode_hour(&mut out, H, &bad), None, "{bad:?}");
            assert_eq!(out, vec![7], "left unchanged");
        }
    }

    #[test]
    fn malformed_hours_are_none() {
        const H: i64 = 0;
        let p = phases(&[(1, 300)], 300);
        let mut good = Vec::new();
        let runs = [PackedRun {
            started_at: 60_000,
            outcome: 2,
            lag_us: Some(900),
            phases: &p,
            note: Some("{\"class\":\"timeout\"}"),
        }];
        encode_hour(&mut good, H, &runs).unwrap();
        // Every cut of a one-run hour is malformed (never a panic).
        for n in 1..good.len() {
            assert_eq!(decode_hour(&good[..n], H), None, "cut at {n}");
        }
        let mut flag = good.clone();
        flag[3] |= 0x10; // an unknown flag (delta 60000 is 3 bytes)
        assert_eq!(decode_hour(&flag, H), None);
        let mut outcome = good.clone();
        outcome[3] |= 0b11;
        assert_eq!(decode_hour(&outcome, H), None, "outcome 3");
        let mut utf8 = good.clone();
        let last = utf8.len() - 1;
        utf8[last] = 0xff;
        assert_eq!(decode_hour(&utf8, H), None, "a note that is not UTF-8");
        let mut long = good.clone();
        long.extend_from_slice(&[0, 0x08, 0, 0, 0x7f]); // a note of 127 bytes, 0 there
        assert_eq!(decode_hour(&long, H), None);
        // A start past the end of time.
        let mut far = Vec::new();
        put_varint(&mut far, i64::MAX as u64);
        far.extend_from_slice(&[0, 0, 0]);
        assert_eq!(decode_hour(&far, 1), None);
        assert_eq!(decode_hour(&[0xff; 11], H), None, "varint too long");
        assert_eq!(decode_hour(&[], H), Some(vec![]));
    }

    #[test]
    fn varints() {
        for v in [0, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(get_varint(&mut &out[..]), Some(v));
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
