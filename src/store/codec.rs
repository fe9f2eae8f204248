//! The compact encoding of one run's timings in the `runs.data` blob: a phase mask, the
//! phase times in microseconds as LEB128 varints, and the run's duration as its (zigzag)
//! difference from the largest phase — for most probes the `total` phase, so one byte.
//!
//! The mask's bit `i` names the `i`-th phase of the series (`series.phases`, in the order
//! first seen), so a run stores no names. A series has at most [`MAX_PHASES`] phases in runs.
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
pub fn decode(mut buf: &[u8], mut phase: impl FnMut(usize, u64)) -> Option<u64> {
    let mask = get_varint(&mut buf)?;
    let mut largest = 0u64;
    for i in 0..MAX_PHASES {
        if mask & (1 << i) != 0 {
            let us = get_varint(&mut buf)?;
            largest = largest.max(us);
            phase(i, us);
        }
    }
    let d = largest as i64 + unzigzag(get_varint(&mut buf)?);
    Some(d.max(0) as u64)
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
