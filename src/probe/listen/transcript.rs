//! What a session has heard so far, assembled incrementally and capped: the watched service
//! does not decide our memory. Final results append (or replace), Omi segments replace each
//! other by id (a map, not a search) and can be deleted; the full text is joined only when it
//! is judged or quoted. Beyond [`MAX_TRANSCRIPT_BYTES`] or [`MAX_PIECES`] further text is
//! dropped and the transcript is marked truncated.

use std::collections::HashMap;

use tokio::time::Instant;

use super::Segment;

/// Largest transcript kept, in bytes. A test utterance is a sentence or two; a server that
/// sends more is misbehaving, and what it sent beyond this is not needed to say so.
pub const MAX_TRANSCRIPT_BYTES: usize = 64 * 1024;
/// Most final results / segments kept.
pub const MAX_PIECES: usize = 4096;

/// `s` cut to at most `max` bytes on a char boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = max;
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

/// What has been heard so far.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Final results or segments, in order; a deleted segment is left empty.
    pieces: Vec<String>,
    /// Each piece's start time (Omi segments), when it has one.
    starts: Vec<Option<f64>>,
    /// Segment id → index in `pieces`.
    ids: HashMap<String, usize>,
    /// Sum of the pieces' trimmed lengths.
    bytes: usize,
    /// The latest interim result.
    interim: String,
    truncated: bool,
    pub interim_count: u32,
    pub final_count: u32,
    /// First non-empty result (interim or final).
    pub first_result: Option<Instant>,
    /// Last time the final transcript changed.
    pub last_change: Option<Instant>,
    /// Last final result, even an empty one (Deepgram's flush answer may be empty).
    pub last_final: Option<Instant>,
}

impl Transcript {
    /// No final words yet.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Whether text was dropped at the cap.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    pub fn interim(&self) -> &str {
        self.interim.trim()
    }

    /// Room left for `old` being replaced by text of `new_len` bytes.
    fn fit<'a>(&mut self, old: usize, new: &'a str) -> &'a str {
        let room = MAX_TRANSCRIPT_BYTES.saturating_sub(self.bytes - old);
        let kept = cut(new.trim(), room);
        if kept.len() < new.trim().len() {
            self.truncated = true;
        }
        kept
    }

    fn push(&mut self, text: &str, start: Option<f64>) -> Option<usize> {
        if self.pieces.len() >= MAX_PIECES {
            self.truncated = true;
            return None;
        }
        let kept = self.fit(0, text);
        if kept.is_empty() {
            return None;
        }
        self.bytes += kept.len();
        self.pieces.push(kept.to_string());
        self.starts.push(start);
        Some(self.pieces.len() - 1)
    }

    fn noticed(&mut self, text: &str, at: Instant) {
        if !text.trim().is_empty() {
            self.first_result.get_or_insert(at);
        }
    }

    /// A final result; `replace`: it is the whole utterance so far.
    pub fn final_result(&mut self, text: &str, replace: bool, at: Instant) {
        self.noticed(text, at);
        self.final_count += 1;
        self.last_final = Some(at);
        self.interim.clear();
        if text.trim().is_empty() {
            return;
        }
        if replace {
            self.pieces.clear();
            self.starts.clear();
            self.ids.clear();
            self.bytes = 0;
        }
        if self.push(text, None).is_some() {
            self.last_change = Some(at);
        }
    }

    /// An interim result: replaces the previous interim.
    pub fn interim_result(&mut self, text: &str, at: Instant) {
        self.noticed(text, at);
        self.interim_count += 1;
        self.interim.clear();
        self.interim.push_str(cut(text, MAX_TRANSCRIPT_BYTES));
    }

    /// Omi segments: a known id replaces its segment, a new one appends.
    pub fn segments(&mut self, segs: Vec<Segment>, at: Instant) {
        let mut changed = false;
        for seg in segs {
            self.noticed(&seg.text, at);
            let known = seg.id.as_ref().and_then(|id| self.ids.get(id).copied());
            match known {
                Some(i) if self.pieces[i] == seg.text.trim() => {}
                Some(i) => {
                    let old = self.pieces[i].len();
                    let kept = self.fit(old, &seg.text).to_string();
                    self.bytes = self.bytes - old + kept.len();
                    self.pieces[i] = kept;
                    if seg.start.is_some() {
                        self.starts[i] = seg.start;
                    }
                    changed = true;
                }
                None => {
                    if let Some(i) = self.push(&seg.text, seg.start) {
                        if let Some(id) = seg.id {
                            self.ids.insert(id, i);
                        }
                        changed = true;
                    }
                }
            }
        }
        self.final_count += 1;
        if changed {
            self.last_change = Some(at);
            self.last_final = Some(at);
        }
    }

    /// Omi `segments_deleted`: segments merged into another one.
    pub fn delete(&mut self, ids: &[String], at: Instant) {
        let mut changed = false;
        for id in ids {
            if let Some(i) = self.ids.remove(id) {
                self.bytes -= self.pieces[i].len();
                changed |= !self.pieces[i].is_empty();
                self.pieces[i].clear();
            }
        }
        if changed {
            self.last_change = Some(at);
            self.last_final = Some(at);
        }
    }

    /// The final transcript: the pieces joined by spaces, in time order when every piece
    /// has a start time (Omi may merge segments into one under a new id, which arrives
    /// last but belongs where its audio was), else in arrival order.
    pub fn text(&self) -> String {
        let mut order: Vec<usize> = (0..self.pieces.len())
            .filter(|&i| !self.pieces[i].is_empty())
            .collect();
        if order.iter().all(|&i| self.starts[i].is_some()) {
            // Stable: equal starts keep arrival order.
            order.sort_by(|&a, &b| {
                let (x, y) = (self.starts[a].unwrap_or(0.0), self.starts[b].unwrap_or(0.0));
                x.total_cmp(&y)
            });
        }
        let mut out = String::with_capacity(self.bytes + self.pieces.len());
        for p in order.iter().map(|&i| &self.pieces[i]) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(p);
        }
        out
    }

    /// Everything heard, interim included (for messages).
    pub fn so_far(&self) -> String {
        let mut t = self.text();
        let interim = self.interim();
        if !interim.is_empty() {
            if !t.is_empty() {
                t.push(' ');
            }
            t.push_str(interim);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(id: &str, text: &str) -> Segment {
        Segment {
            id: Some(id.into()),
            text: text.into(),
            start: None,
        }
    }

    fn timed(id: &str, text: &str, start: f64) -> Segment {
        Segment {
            start: Some(start),
            ..seg(id, text)
        }
    }

    #[test]
    fn a_merge_under_a_new_id_takes_its_place_in_time() {
        let t0 = Instant::now();
        let mut t = Transcript::default();
        t.segments(
            vec![
                timed("w0", "check", 0.0),
                timed("w1", "the", 0.4),
                timed("w2", "system", 0.8),
                timed("w3", "status", 1.2),
            ],
            t0,
        );
        // Real Omi order: the deletion first, then the merged segment under a new id.
        t.delete(&["w0".into(), "w1".into(), "w2".into()], t0);
        t.segments(vec![timed("m0", "check the system", 0.0)], t0);
        assert_eq!(t.text(), "check the system status");
    }

    #[test]
    fn finals_append_or_replace() {
        let t0 = Instant::now();
        let mut t = Transcript::default();
        t.interim_result("testing", t0);
        assert!(t.is_empty());
        assert_eq!(t.so_far(), "testing");
        t.final_result(" testing one ", false, t0);
        t.final_result("", false, t0);
        t.final_result("two", false, t0);
        assert_eq!(t.text(), "testing one two");
        assert_eq!((t.final_count, t.interim_count), (3, 1));
        assert_eq!(t.interim(), "");
        t.final_result("testing one two three", true, t0);
        assert_eq!(t.text(), "testing one two three");
    }

    #[test]
    fn segments_replace_by_id_and_delete() {
        let t0 = Instant::now();
        let mut t = Transcript::default();
        t.segments(vec![seg("a", "check the"), seg("b", "system")], t0);
        t.segments(vec![seg("a", "check the system status")], t0);
        assert_eq!(t.text(), "check the system status system");
        let before = t.last_change;
        t.segments(
            vec![seg("a", "check the system status")],
            t0 + std::time::Duration::from_secs(1),
        );
        assert_eq!(t.last_change, before, "an unchanged segment is no change");
        t.delete(&["b".into(), "zzz".into()], t0);
        assert_eq!(t.text(), "check the system status");
        t.delete(&["a".into()], t0);
        assert!(t.is_empty());
        // Segments without an id append.
        t.segments(
            vec![Segment {
                id: None,
                text: "x".into(),
                start: None,
            }],
            t0,
        );
        assert_eq!(t.text(), "x");
    }

    #[test]
    fn capped_in_bytes_and_pieces() {
        let t0 = Instant::now();
        let mut t = Transcript::default();
        let big = "é".repeat(40_000); // 80,000 bytes
        t.final_result(&big, false, t0);
        t.final_result(&big, false, t0);
        assert!(t.truncated());
        assert!(t.text().len() <= MAX_TRANSCRIPT_BYTES);
        let mut t = Transcript::default();
        for i in 0..MAX_PIECES + 10 {
            t.segments(vec![seg(&i.to_string(), "w")], t0);
        }
        assert!(t.truncated());
        assert_eq!(t.text().split(' ').count(), MAX_PIECES);
        // A segment growing past the cap is cut, and the count stays right.
        let mut t = Transcript::default();
        t.segments(vec![seg("a", "short")], t0);
        t.segments(vec![seg("a", &"w ".repeat(MAX_TRANSCRIPT_BYTES))], t0);
        assert!(t.truncated() && t.text().len() <= MAX_TRANSCRIPT_BYTES);
        t.delete(&["a".into()], t0);
        assert!(t.is_empty());
        assert_eq!(cut("héllo", 2), "h");
    }
}
