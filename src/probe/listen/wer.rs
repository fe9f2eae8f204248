//! Word error rate between the expected and the heard transcript, after normalisation.
//!
//! Recognisers differ in surface form, not in what they heard: "Testing, 1 2 3." and
//! "testing one two three" are the same utterance. Normalisation lowercases, drops
//! punctuation (apostrophes too: "don't" = "dont"), splits hyphenated words, spells numbers
//! as words ("25" = "twenty five", "3.5" = "three point five", "1st" = "first", "50%" =
//! "fifty percent") and drops the "and" inside spelled numbers ("one hundred and five" =
//! "105"). It is not a general text normaliser (no dates, currencies or abbreviations).

const ONES: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: [&str; 10] = [
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
];
const SCALES: [&str; 5] = ["", "thousand", "million", "billion", "trillion"];

fn is_number_word(w: &str) -> bool {
    ONES.contains(&w) || TENS[2..].contains(&w) || SCALES[1..].contains(&w) || w == "hundred"
}

fn below_thousand(n: u64, out: &mut Vec<String>) {
    let (h, rest) = (n / 100, n % 100);
    if h > 0 {
        out.push(ONES[h as usize].into());
        out.push("hundred".into());
    }
    if rest >= 20 {
        out.push(TENS[(rest / 10) as usize].into());
        if rest % 10 > 0 {
            out.push(ONES[(rest % 10) as usize].into());
        }
    } else if rest > 0 || h == 0 {
        out.push(ONES[rest as usize].into());
    }
}

/// Spell an integer written in digits. Anything but ASCII digits is skipped.
fn spell_digits(digits: &str, out: &mut Vec<String>) {
    // Leading zeros and very long runs are read digit by digit ("007", card numbers).
    let n = match digits.parse::<u64>() {
        Ok(n) if !(digits.len() > 1 && digits.starts_with('0')) && digits.len() <= 15 => n,
        _ => {
            out.extend(
                digits
                    .bytes()
                    .filter(u8::is_ascii_digit)
                    .map(|d| ONES[usize::from(d - b'0')].to_string()),
            );
            return;
        }
    };
    if n == 0 {
        out.push("zero".into());
        return;
    }
    let mut groups = Vec::new();
    let mut m = n;
    while m > 0 {
        groups.push(m % 1000);
        m /= 1000;
    }
    for (i, g) in groups.iter().enumerate().rev() {
        if *g == 0 {
            continue;
        }
        below_thousand(*g, out);
        if i > 0 {
            out.push(SCALES[i].into());
        }
    }
}

fn ordinal(word: &str) -> String {
    match word {
        "one" => "first".into(),
        "two" => "second".into(),
        "three" => "third".into(),
        "five" => "fifth".into(),
        "eight" => "eighth".into(),
        "nine" => "ninth".into(),
        "twelve" => "twelfth".into(),
        w if w.ends_with('y') => format!("{}ieth", &w[..w.len() - 1]),
        w => format!("{w}th"),
    }
}

fn spell_digits_one_by_one(digits: &str, out: &mut Vec<String>) {
    out.extend(
        digits
            .bytes()
            .filter(u8::is_ascii_digit)
            .map(|d| ONES[usize::from(d - b'0')].to_string()),
    );
}

/// Normalise a transcript into comparable words.
pub fn normalize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    // Tokenise: keep letters, digits, apostrophes; '.' and ',' only between digits; '%' as
    // a word of its own; everything else separates words.
    let chars: Vec<char> = lower.chars().collect();
    let mut tokens: Vec<String> = Vec::new();
    let mut cur = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let between_digits = |_: ()| {
            i > 0
                && chars[i - 1].is_ascii_digit()
                && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit())
        };
        if c.is_alphanumeric() {
            cur.push(c);
        } else if c == '\'' || c == '’' {
            // dropped, word continues
        } else if (c == '.' || c == ',')
            && between_digits(())
            && cur
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b',')
        {
            cur.push(c);
        } else {
            if !cur.is_empty() {
                tokens.push(std::mem::take(&mut cur));
            }
            if c == '%' {
                tokens.push("percent".into());
            }
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }

    let mut words: Vec<String> = Vec::new();
    for t in tokens {
        if !t.starts_with(|c: char| c.is_ascii_digit()) {
            words.push(t);
            continue;
        }
        // "1,000" → 1000; "3.5" → three point five; "1st" → first; "4k" stays split.
        let t = t.replace(',', "");
        let digits_end = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, suffix) = t.split_at(digits_end);
        let mut spelled = Vec::new();
        match num.split('.').filter(|p| !p.is_empty()).collect::<Vec<_>>()[..] {
            [] => {}
            [int] => spell_digits(int, &mut spelled),
            // "3.5" → three point five: digits after the point one by one.
            [int, frac] => {
                spell_digits(int, &mut spelled);
                spelled.push("point".into());
                spell_digits_one_by_one(frac, &mut spelled);
            }
            // "1.2.3", "10.0.0.1": versions and addresses are said group by group,
            // "one point two point three", "ten point zero point zero point one".
            ref groups => {
                for (i, g) in groups.iter().enumerate() {
                    if i > 0 {
                        spelled.push("point".into());
                    }
                    spell_digits(g, &mut spelled);
                }
            }
        }
        match suffix {
            "st" | "nd" | "rd" | "th" => {
                if let Some(last) = spelled.pop() {
                    spelled.push(ordinal(&last));
                }
            }
            "" => {}
            other => spelled.push(other.to_string()),
        }
        words.extend(spelled);
    }
    // "one hundred and five" → "one hundred five".
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    for (i, w) in words.iter().enumerate() {
        if w == "and"
            && out.last().is_some_and(|p| is_number_word(p))
            && words.get(i + 1).is_some_and(|n| is_number_word(n))
        {
            continue;
        }
        out.push(w.clone());
    }
    out
}

/// Word-level edit distance (substitutions + deletions + insertions).
pub fn edit_distance(reference: &[String], hypothesis: &[String]) -> usize {
    let mut prev: Vec<usize> = (0..=hypothesis.len()).collect();
    let mut cur = vec![0; hypothesis.len() + 1];
    for (i, r) in reference.iter().enumerate() {
        cur[0] = i + 1;
        for (j, h) in hypothesis.iter().enumerate() {
            let sub = prev[j] + usize::from(r != h);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[hypothesis.len()]
}

/// Word error rate of `heard` against `expected`, both normalised. An empty expectation
/// gives 0 for an empty answer and 1 otherwise.
pub fn wer(expected: &str, heard: &str) -> f64 {
    let r = normalize(expected);
    let h = normalize(heard);
    if r.is_empty() {
        return if h.is_empty() { 0.0 } else { 1.0 };
    }
    edit_distance(&r, &h) as f64 / r.len() as f64
}

/// Edit-distance tables up to this many cells are always computed exactly.
const EXACT_CELLS: usize = 1_000_000;

/// Word error rate, with the work bounded: when the table would be large and the word counts
/// alone already put the rate above `limit` (a server that sent far more, or far less, than
/// the utterance), the edit distance is not computed and the lower bound
/// `|heard − expected| / expected` comes back with `false`. Otherwise the exact rate and
/// `true`; a large table then has at most expected × expected × (1 + limit) cells.
pub fn wer_bounded(expected: &str, heard: &str, limit: f64) -> (f64, bool) {
    let r = normalize(expected);
    let h = normalize(heard);
    if r.is_empty() {
        return (if h.is_empty() { 0.0 } else { 1.0 }, true);
    }
    let lower = r.len().abs_diff(h.len()) as f64 / r.len() as f64;
    if lower > limit && r.len().saturating_mul(h.len()) > EXACT_CELLS {
        return (lower, false);
    }
    (edit_distance(&r, &h) as f64 / r.len() as f64, true)
}

/// Whether the normalised `phrase` occurs as whole words in the normalised `heard`.
pub fn contains_phrase(heard: &str, phrase: &str) -> bool {
    let h = normalize(heard);
    let p = normalize(phrase);
    if p.is_empty() {
        return true;
    }
    h.windows(p.len()).any(|w| w == p.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_table() {
        for (input, want) in [
            ("Testing, 1 2 3.", "testing one two three"),
            ("testing one two three", "testing one two three"),
            ("It's 25 degrees", "its twenty five degrees"),
            ("twenty-five", "twenty five"),
            ("3.5 stars", "three point five stars"),
            ("1,000 users", "one thousand users"),
            ("one hundred and five", "one hundred five"),
            ("105", "one hundred five"),
            ("rock and roll", "rock and roll"),
            ("the 1st and 2nd", "the first and second"),
            ("the 21st time", "the twenty first time"),
            ("50% off", "fifty percent off"),
            ("call 007", "call zero zero seven"),
            ("0", "zero"),
            ("2,500,017", "two million five hundred thousand seventeen"),
            ("  CHECK   the SYSTEM—status!  ", "check the system status"),
            ("don’t stop", "dont stop"),
            // Dotted numbers used to panic (issue 8).
            ("version 1.2.3", "version one point two point three"),
            ("10.0.0.1", "ten point zero point zero point one"),
            ("v1.2.3.4-rc1", "v1 two point three point four rc1"),
            ("1..2", "one two"),
            ("0.5", "zero point five"),
            ("3.05", "three point zero five"),
            ("1.2.3rd", "one point two point third"),
            ("99999999999999999999.1.1", "nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine point one point one"),
            ("", ""),
        ] {
            assert_eq!(normalize(input).join(" "), want, "{input:?}");
        }
    }

    #[test]
    fn wer_table() {
        for (expected, heard, want) in [
            ("testing one two three four five", "Testing 1 2 3 4 5.", 0.0),
            (
                "testing one two three four five",
                "testing one two three four",
                1.0 / 6.0,
            ),
            (
                "the weather is nice today",
                "the weather is not nice today",
                0.2,
            ),
            ("the weather is nice today", "", 1.0),
            ("check the system status", "check this system status", 0.25),
            ("a b", "c d e f", 2.0),
            ("", "", 0.0),
            ("", "hello", 1.0),
        ] {
            let got = wer(expected, heard);
            assert!(
                (got - want).abs() < 1e-9,
                "{expected:?} vs {heard:?}: {got} != {want}"
            );
        }
    }

    #[test]
    fn bounded_wer_table() {
        let many = "word ".repeat(30_000);
        let long = "word ".repeat(2000);
        let longer = "word ".repeat(2300);
        for (expected, heard, limit, want, exact) in [
            ("a b c d", "a b c d", 0.2, 0.0, true),
            ("a b c d", "a x c d", 0.2, 0.25, true),
            // Small tables are always exact.
            ("a b c d", "a b c d e f", 0.2, 0.5, true),
            ("a b c d", "a", 0.5, 0.75, true),
            // Large ones only when the counts leave the rate in doubt.
            ("a b c d", many.as_str(), 1.0, 7500.0, true),
            (long.as_str(), many.as_str(), 1.0, 14.0, false),
            (long.as_str(), longer.as_str(), 0.2, 0.15, true),
            ("", "x", 0.2, 1.0, true),
        ] {
            let (got, ex) = wer_bounded(expected, heard, limit);
            assert!(
                (got - want).abs() < 1e-9 && ex == exact,
                "{expected:?} vs {heard:.20}: {got} {ex}"
            );
        }
    }

    #[test]
    fn contains_table() {
        assert!(contains_phrase("Testing 1, 2, 3", "one two"));
        assert!(contains_phrase(
            "the system status is fine",
            "System Status"
        ));
        assert!(!contains_phrase("the systems status", "system status"));
        assert!(!contains_phrase("", "x"));
        assert!(contains_phrase("anything", ""));
    }
}
