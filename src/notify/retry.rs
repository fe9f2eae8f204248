//! Retry policy, as its own small piece: which delivery errors are worth retrying, how long
//! to wait (exponential backoff with jitter, or the server's `Retry-After`), and how a
//! `Retry-After` header reads. Network errors, timeouts, 408, 429 and 5xx retry; other 4xx
//! and permanent SMTP rejections do not (they are dead-lettered).

use std::time::Duration;

use chrono::{DateTime, Utc};

/// Why one delivery attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Connecting or talking to the endpoint failed.
    #[error("network error: {0}")]
    Network(String),
    /// No complete answer within the deadline.
    #[error("no answer within {}", crate::config::duration::human(*.0))]
    Timeout(Duration),
    /// The endpoint answered with a non-success HTTP status.
    #[error("HTTP {status}: {body}")]
    Status {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    /// The endpoint refused the notification for good (e.g. SMTP 5xx).
    #[error("rejected: {0}")]
    Rejected(String),
    /// A temporary refusal that is worth retrying (e.g. SMTP 4xx).
    #[error("temporarily refused: {0}")]
    Transient(String),
    /// The notification cannot be built (bad address, missing mapping…).
    #[error("{0}")]
    Invalid(String),
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again; the server asked for this delay (`Retry-After`), if any.
    Later(Option<Duration>),
    /// Give up: dead-letter the notification.
    Never,
}

impl DeliveryError {
    /// The retry decision for this error.
    pub fn retry(&self) -> Retry {
        match self {
            DeliveryError::Network(_) | DeliveryError::Timeout(_) | DeliveryError::Transient(_) => {
                Retry::Later(None)
            }
            DeliveryError::Status {
                status,
                retry_after,
                ..
            } => match *status {
                408 | 425 | 429 | 500..=599 => Retry::Later(*retry_after),
                _ => Retry::Never,
            },
            DeliveryError::Rejected(_) | DeliveryError::Invalid(_) => Retry::Never,
        }
    }

    /// Short stable word for logs and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            DeliveryError::Network(_) => "network",
            DeliveryError::Timeout(_) => "timeout",
            DeliveryError::Status { .. } => "http_status",
            DeliveryError::Rejected(_) => "rejected",
            DeliveryError::Transient(_) => "transient",
            DeliveryError::Invalid(_) => "invalid",
        }
    }
}

/// Longest `Retry-After` honoured; anything longer is capped (a resolve must not wait a day).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Backoff before attempt `attempt + 1` (`attempt` = failed attempts so far, ≥ 1):
/// `min(max, initial · 2^(attempt-1))`, then "equal jitter": a uniform pick in
/// `[d/2, d]`, so retries from many agents spread out but never come sooner than half the
/// nominal delay. `unit` is a random number in `[0, 1)`.
pub fn backoff(attempt: u32, initial: Duration, max: Duration, unit: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let nominal = initial.saturating_mul(1u32 << exp).min(max);
    let half = nominal / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

/// The delay before the next attempt: the server's `Retry-After` when it gave one (capped
/// at [`MAX_RETRY_AFTER`]), otherwise [`backoff`].
pub fn next_delay(
    retry_after: Option<Duration>,
    attempt: u32,
    initial: Duration,
    max: Duration,
    unit: f64,
) -> Duration {
    match retry_after {
        Some(d) => d.min(MAX_RETRY_AFTER),
        None => backoff(attempt, initial, max, unit),
    }
}

/// Parse a `Retry-After` value: delta-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(v: &str, now: DateTime<Utc>) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    }
    let when = DateTime::parse_from_rfc2822(v).ok()?.with_timezone(&Utc);
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_decisions() {
        let st = |status| DeliveryError::Status {
            status,
            body: String::new(),
            retry_after: None,
        };
        let table = [
            (DeliveryError::Network("refused".into()), true),
            (DeliveryError::Timeout(Duration::from_secs(1)), true),
            (DeliveryError::Transient("451".into()), true),
            (st(500), true),
            (st(503), true),
            (st(429), true),
            (st(408), true),
            (st(400), false),
            (st(401), false),
            (st(403), false),
            (st(404), false),
            (st(422), false),
            (DeliveryError::Rejected("550".into()), false),
            (DeliveryError::Invalid("bad".into()), false),
        ];
        for (e, want) in table {
            assert_eq!(matches!(e.retry(), Retry::Later(_)), want, "{e}");
        }
        let e = DeliveryError::Status {
            status: 429,
            body: String::new(),
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(e.retry(), Retry::Later(Some(Duration::from_secs(3))));
    }

    #[test]
    fn backoff_table() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // (attempt, unit) → delay with initial 1s, max 60s
        let table = [
            (1, 0.0, ms(500)),
            (1, 0.999_999, ms(999)),
            (2, 0.0, s(1)),
            (3, 0.5, s(3)),
            (4, 1.0, s(8)),
            (7, 1.0, s(60)), // 64s capped at 60s
            (40, 0.0, s(30)),
        ];
        for (attempt, unit, want) in table {
            let got = backoff(attempt, s(1), s(60), unit);
            assert!(
                got.abs_diff(want) < ms(2),
                "attempt {attempt} unit {unit}: {got:?} != {want:?}"
            );
        }
        assert_eq!(next_delay(Some(s(7)), 9, s(1), s(60), 0.3), s(7));
        assert_eq!(
            next_delay(Some(s(99_999)), 1, s(1), s(60), 0.3),
            MAX_RETRY_AFTER
        );
    }

    #[test]
    fn retry_after_forms() {
        let now = DateTime::parse_from_rfc3339("2026-05-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let table = [
            ("5", Some(Duration::from_secs(5))),
            (" 0 ", Some(Duration::ZERO)),
            ("1.5", Some(Duration::from_millis(1500))),
            (
                "Fri, 01 May 2026 10:00:30 GMT",
                Some(Duration::from_secs(30)),
            ),
            ("Fri, 01 May 2026 09:00:00 GMT", Some(Duration::ZERO)),
            ("soon", None),
            ("-3", None),
        ];
        for (v, want) in table {
            assert_eq!(parse_retry_after(v, now), want, "{v}");
        }
    }
}
