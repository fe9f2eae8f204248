//! Where and how the agent logs: always to stderr (stdout carries command output: `check`
//! results, reports, `validate`), as text or as JSON lines. Not for what is logged — call
//! sites use `tracing` fields, never a field named `message` (the event's sentence is) and
//! never `?` on an `Option` (an `Option` field is recorded only when it is `Some`).
//!
//! JSON lines have exactly these keys, in this order:
//! `{"timestamp":"…Z","level":"INFO","fields":{"message":"…",…},"target":"watchpost::…"}`.
//! The event's own fields stay under `fields`, so they can never collide with the
//! top-level keys, whatever an event carries; span keys are left out (the agent names the
//! probe, component or notifier in each event's fields instead).

use std::io::IsTerminal;

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only on a terminal without `NO_COLOR`.
    Text,
    /// One JSON object per line (see the module docs for its keys).
    Json,
}

/// Colour codes only when stderr is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>): a file, pipe or journal gets plain text.
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Install the global subscriber: `WATCHPOST_LOG` filters (default `info` for the daemon,
/// `warn` for one-shot commands).
pub fn init(format: LogFormat, daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WATCHPOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        LogFormat::Text => b
            .with_ansi(use_colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_and_without_no_color() {
        use std::ffi::OsStr;
        let cases = [
            (true, None, true),
            (true, Some(""), true),
            (true, Some("1"), false),
            (true, Some("0"), false),
            (false, None, false),
            (false, Some(""), false),
        ];
        for (tty, no_color, want) in cases {
            assert_eq!(
                use_colour(tty, no_color.map(OsStr::new)),
                want,
                "tty={tty} NO_COLOR={no_color:?}"
            );
        }
    }
}
