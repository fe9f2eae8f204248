//! Circuit breaker, one per notifier: after `threshold` consecutive failed attempts the
//! notifier is left alone for a cooldown (doubling on each failed probe, capped), then one
//! attempt probes it ("half-open"); a success closes the breaker. This keeps a dead endpoint
//! from being hammered by every queued notification while it is down. Pure: time is passed
//! in.

use std::time::{Duration, Instant};

/// Breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    /// No attempts until the instant; then one probe is allowed.
    Open {
        until: Instant,
    },
    /// One probe in flight.
    HalfOpen,
}

/// Per-notifier circuit breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    base_cooldown: Duration,
    max_cooldown: Duration,
    failures: u32,
    cooldown: Duration,
    state: State,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            base_cooldown: cooldown,
            max_cooldown: cooldown.saturating_mul(16).max(cooldown),
            failures: 0,
            cooldown,
            state: State::Closed,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed)
    }

    /// May an attempt start at `now`? `Err(until)` says when to ask again.
    pub fn allow(&mut self, now: Instant) -> Result<(), Instant> {
        match self.state {
            State::Closed | State::HalfOpen => Ok(()),
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen;
                Ok(())
            }
            State::Open { until } => Err(until),
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.cooldown = self.base_cooldown;
        self.state = State::Closed;
    }

    /// Record a failed attempt (only failures worth retrying count: a 400 says nothing
    /// about the endpoint's health). Returns true when this opened the breaker.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        match self.state {
            State::HalfOpen => {
                self.cooldown = self.cooldown.saturating_mul(2).min(self.max_cooldown);
                self.state = State::Open {
                    until: now + self.cooldown,
                };
                true
            }
            State::Closed if self.failures >= self.threshold => {
                self.state = State::Open {
                    until: now + self.cooldown,
                };
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_probes_and_closes() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Breaker::new(3, s(10));
        assert!(b.allow(t0).is_ok());
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert!(b.failure(t0), "third failure opens");
        assert_eq!(b.allow(t0 + s(5)), Err(t0 + s(10)));
        assert!(b.allow(t0 + s(10)).is_ok(), "half-open probe");
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.failure(t0 + s(10)), "failed probe reopens");
        assert_eq!(b.allow(t0 + s(29)), Err(t0 + s(30)), "cooldown doubled");
        assert!(b.allow(t0 + s(30)).is_ok());
        b.success();
        assert_eq!(b.state(), State::Closed);
        assert!(!b.failure(t0 + s(31)), "counter reset after success");
    }

    #[test]
    fn cooldown_is_capped() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(1));
        b.failure(t0);
        let mut now = t0;
        for _ in 0..10 {
            let until = match b.state() {
                State::Open { until } => until,
                s => panic!("{s:?}"),
            };
            now = until;
            assert!(b.allow(now).is_ok());
            b.failure(now);
        }
        match b.state() {
            State::Open { until } => assert_eq!(until - now, Duration::from_secs(16)),
            s => panic!("{s:?}"),
        }
    }
}
