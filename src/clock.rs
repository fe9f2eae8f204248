//! The wall clock the evaluator and the dispatcher read. It is the wall time at start plus
//! the tokio time elapsed since, so a test that pauses tokio time (`tokio::time::pause()`,
//! `advance()`) moves it too: incident and notifier timing can be tested in virtual time.
//!
//! Not for probe measurements: runs time themselves with monotonic clocks.

use tokio::time::Instant;

/// Wall-clock milliseconds derived from tokio's monotonic clock. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall0_ms: i64,
    mono0: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// A clock that starts at the current wall time.
    pub fn new() -> Clock {
        Clock {
            wall0_ms: chrono::Utc::now().timestamp_millis(),
            mono0: Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        let elapsed = Instant::now().saturating_duration_since(self.mono0);
        self.wall0_ms
            .saturating_add(i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
    }

    /// The tokio instant at which the wall clock reads `at_ms` (now, if that has passed).
    pub fn instant_at(&self, at_ms: i64) -> Instant {
        let ahead = at_ms.saturating_sub(self.now_ms()).max(0) as u64;
        Instant::now() + std::time::Duration::from_millis(ahead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn follows_paused_tokio_time() {
        let c = Clock::new();
        let t0 = c.now_ms();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(c.now_ms() - t0, 90_000);
    }
}
