//! The process's file-descriptor budget: raise the soft limit to the hard one at start-up,
//! and split what there is so that the HTTP API can never take the descriptors the probes
//! need (an API flood once made every probe run fail with "Too many open files" while its
//! target was up).
//!
//! Not here: the API's listener itself (`api::serve`) — it only receives the cap computed
//! by [`api_connection_cap`].

use crate::config::Config;

/// Descriptors one run in flight may hold: its socket, a DNS lookup's socket and files,
/// an audio file.
pub const PER_RUN_FDS: u64 = 4;
/// Descriptors of the agent itself: stdio, the runtime's epoll and wakers, the store
/// writer's database, WAL and shared-memory files, signal handling, spare room.
pub const SLACK_FDS: u64 = 64;
/// The most connections the API serves at once, whatever the limit allows.
pub const MAX_API_CONNECTIONS: usize = 256;
/// The fewest it serves, even when the limit is too low for the reserve (then a warning).
pub const MIN_API_CONNECTIONS: usize = 4;

/// The soft and hard `RLIMIT_NOFILE` (`None` where the platform has no such limit).
pub fn limits() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
            // rlim_t is u64 on Linux, not on every unix.
            #[allow(clippy::unnecessary_cast)]
            return Some((r.rlim_cur as u64, r.rlim_max as u64));
        }
        None
    }
    #[cfg(not(unix))]
    None
}

/// Raise the soft limit to the hard limit; log both at info. Returns the limits in force
/// afterwards. A failure to raise is logged and the old limit stays (the API cap follows).
pub fn raise() -> Option<(u64, u64)> {
    let (soft, hard) = limits()?;
    #[cfg(unix)]
    if soft < hard {
        let r = libc::rlimit {
            rlim_cur: hard as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
        }
    }
    let now = limits()?;
    tracing::info!(soft = now.0, hard = now.1, was = soft, "open-files limit");
    Some(now)
}

/// Descriptors kept for the probes and notifiers: every run that can be in flight at once
/// (never more than the enabled probes, each runs alone) and every notifier delivering.
pub fn reserve(config: &Config) -> u64 {
    let enabled = config.probes.iter().filter(|p| p.enabled).count();
    let runs = enabled.min(config.agent.max_concurrency) + config.notifiers.len();
    runs as u64 * PER_RUN_FDS + SLACK_FDS
}

/// How many API connections may be open at once under the soft limit `soft`: half of what
/// the reserve leaves (the other half covers the API's own database reads), at most
/// [`MAX_API_CONNECTIONS`]. `None` (no limit known) gives the maximum.
pub fn api_connection_cap(soft: Option<u64>, reserve: u64) -> usize {
    let Some(soft) = soft else {
        return MAX_API_CONNECTIONS;
    };
    let half = (soft.saturating_sub(reserve) / 2).min(MAX_API_CONNECTIONS as u64) as usize;
    if half < MIN_API_CONNECTIONS {
        tracing::warn!(
            soft,
            reserve,
            "the open-files limit barely covers the probes' reserve; raise it (ulimit -n)"
        );
    }
    half.max(MIN_API_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_gets_half_of_what_the_reserve_leaves_within_bounds() {
        // (soft, reserve) → cap
        let cases = [
            (Some(1024), 80, 256),
            (Some(256), 80, 88),
            (Some(256), 72, 92),
            (Some(100), 90, 5),
            (Some(96), 90, MIN_API_CONNECTIONS),
            (Some(50), 90, MIN_API_CONNECTIONS),
            (None, 80, MAX_API_CONNECTIONS),
            (Some(1 << 20), 80, MAX_API_CONNECTIONS),
        ];
        for (soft, reserve, cap) in cases {
            assert_eq!(api_connection_cap(soft, reserve), cap, "{soft:?} {reserve}");
        }
    }

    #[test]
    fn the_limits_are_readable_and_raising_keeps_soft_at_most_hard() {
        let (soft, hard) = limits().expect("RLIMIT_NOFILE on unix");
        assert!(soft <= hard);
        let (soft2, hard2) = raise().expect("limits after raising");
        assert_eq!(hard2, hard);
        assert!(soft2 >= soft && soft2 <= hard2);
    }
}
