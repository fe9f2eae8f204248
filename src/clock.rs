//! The wall clock the evaluator and the dispatcher read. In the daemon it is the system
//! clock (so it agrees with the runs' `started_at`, also after the host's clock is set).
//! Tests use [`Clock::tokio`]: the wall time at its creation plus the tokio time elapsed
//! since, so pausing tokio time (`tokio::time::pause()`, `advance()`) moves it too and
//! incident and notifier timing can be tested in virtual time.
//!
//! Not for probe measurements: runs time themselves with monotonic clocks.

use tokio::time::Instant;

/// Wall-clock milliseconds. Cheap to copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock(Option<(i64, Instant)>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that starts at the current wall time and follows tokio time.
    pub fn tokio() -> Clock {
        Clock(Some((
            chrono::Utc::now().timestamp_millis(),
            Instant::now(),
        )))
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match self.0 {
            None => chrono::Utc::now().timestamp_millis(),
            Some((wall0_ms, mono0)) => {
                let elapsed = Instant::now().saturating_duration_since(mono0);
                wall0_ms.saturating_add(i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
            }
        }
    }

    /// [`Clock::now_ms`] as a timestamp.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.now_ms()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_follows_paused_time() {
        let c = Clock::tokio();
        let t0 = c.now_ms();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(c.now_ms() - t0, 90_000);
        let s = Clock::system();
        assert!((s.now_ms() - chrono::Utc::now().timestamp_millis()).abs() < 1000);
    }
}
