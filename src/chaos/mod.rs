//! Chaos rehearsals: a scripted outage injected on the probe side, and a verdict on what
//! the alert path did about it (detected, opened, delivered, resolved — each within its
//! budget, or, for `no_incident`, nothing opened at all).
//!
//! - [`fault`]: the fault modes, the registry the scheduler consults, the transport proxy.
//! - [`file`]: rehearsal files, parsed and validated against the config.
//! - [`run`]: a rehearsal driven on an agent (an isolated one, standalone), its timeline
//!   and verdicts.
//! - [`live`]: rehearsals on the live daemon (API and `[[rehearsal]]` schedules), kept in
//!   its store.
//! - [`report`]: the terminal lines, the verdict table and the HTML page.
//!
//! Not here: detection, incidents and delivery themselves — a rehearsal runs the real ones.

pub mod fault;
pub mod file;
pub mod live;
pub mod report;
pub mod run;
