//! Configuration: `config/watchpost.toml` plus the probe files its `[agent].probes` globs
//! find. Parse (serde, unknown keys rejected) → validate (cross references, files) → the
//! typed [`Config`] the rest of the agent uses. Every problem becomes a [`Diagnostic`]
//! pointing at `file:line:col`; loading never stops at the first bad file.
//!
//! Not here: anything that touches the network.

pub mod duration;
pub mod interp;
pub mod schema;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub use duration::Dur;
pub use interp::{Interp, Secret};

use crate::notify::NotifierConfig;
use crate::probe::ProbeSpec;

/// One configuration problem, printed as `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    /// `file:line:col: message`, or `file: message` for a whole-file problem (line 0).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// All problems found while loading; `Display` prints one per line.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// An error found while building a typed value from a parsed file: a message and, where
/// known, the byte span it concerns.
#[derive(Debug, Clone)]
pub struct SpanError {
    pub span: Option<Range<usize>>,
    /// Where the span is not known to the code that found the problem: the path of the
    /// offending key inside the table being parsed; the loader turns it into a position.
    pub key: Vec<String>,
    pub message: String,
}

impl SpanError {
    pub fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        SpanError {
            span: Some(span),
            key: Vec::new(),
            message: message.into(),
        }
    }
    pub fn new(message: impl Into<String>) -> Self {
        SpanError {
            span: None,
            key: Vec::new(),
            message: message.into(),
        }
    }
    /// A problem with the value at `path` (e.g. `["headers", "X-Key"]`) of the table being
    /// parsed; positioned by the loader, which holds the parsed file.
    pub fn key(path: &[&str], message: impl Into<String>) -> Self {
        SpanError {
            span: None,
            key: path.iter().map(|k| k.to_string()).collect(),
            message: message.into(),
        }
    }
    /// [`SpanError::located`] for other modules that parse tables of their own.
    pub(crate) fn located_in(self, table: &DeTable<'_>) -> Self {
        self.located(table)
    }

    /// Fill in the span from `table` (the table the parsed keys came from) when only the
    /// key path is known.
    fn located(mut self, table: &DeTable<'_>) -> Self {
        if self.span.is_none() {
            self.span = locate(table, &self.key);
        }
        self
    }
}

/// The problems a builder found, collected rather than returned one at a time: each check
/// records its error and the builder goes on with the keys that do not depend on it, so one
/// `validate` lists every problem of a file.
#[derive(Debug, Default)]
pub struct Errors {
    errors: Vec<SpanError>,
    /// Keys dropped for a bad value or a misspelt name (the top-level key they sit under,
    /// and where): defaults stand in for them, so a check that depends on one is skipped
    /// rather than reported against the default.
    unread: Vec<(String, Option<Range<usize>>)>,
}

impl Errors {
    pub fn push(&mut self, e: SpanError) {
        self.errors.push(e);
    }
    /// The value of `r`, or `None` with its error recorded.
    pub fn check<T>(&mut self, r: Result<T, SpanError>) -> Option<T> {
        r.map_err(|e| self.push(e)).ok()
    }
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
    pub fn len(&self) -> usize {
        self.errors.len()
    }
    /// Whether the top-level `key` was read as written (false when a value in it was bad or
    /// a key in it misspelt).
    pub fn read(&self, key: &str) -> bool {
        !self.unread.iter().any(|(k, _)| k == key)
    }
    /// Whether every key under the top-level `key` that lies within `span` (one of its
    /// tables, say) was read as written.
    pub fn intact(&self, key: &str, span: &Range<usize>) -> bool {
        !self.unread.iter().any(|(k, at)| {
            k == key
                && at
                    .as_ref()
                    .is_some_and(|at| span.start <= at.start && at.end <= span.end)
        })
    }
    /// `value` when nothing was recorded, else every error.
    pub fn finish<T>(self, value: T) -> Result<T, Errors> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
    /// Rewrite each recorded message (e.g. serde's wording into ours).
    pub fn map(mut self, f: impl FnMut(SpanError) -> SpanError) -> Errors {
        self.errors = self.errors.into_iter().map(f).collect();
        self
    }
    pub fn iter(&self) -> std::slice::Iter<'_, SpanError> {
        self.errors.iter()
    }
    /// Take in the errors another check collected.
    pub fn extend(&mut self, other: Errors) {
        self.errors.extend(other.errors);
        self.unread.extend(other.unread);
    }
}

impl From<SpanError> for Errors {
    fn from(e: SpanError) -> Self {
        Errors {
            errors: vec![e],
            unread: Vec::new(),
        }
    }
}

impl IntoIterator for Errors {
    type Item = SpanError;
    type IntoIter = std::vec::IntoIter<SpanError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

/// Span of the value at `path` in `table`, or of the deepest part of the path that exists.
fn locate<S: AsRef<str>>(table: &DeTable<'_>, path: &[S]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let v = table.get(first.as_ref())?;
    match v.get_ref() {
        DeValue::Table(t) if !rest.is_empty() => locate(t, rest).or(Some(v.span())),
        _ => Some(v.span()),
    }
}

impl From<toml::de::Error> for SpanError {
    fn from(e: toml::de::Error) -> Self {
        SpanError {
            span: e.span(),
            key: Vec::new(),
            message: e.message().trim().to_string(),
        }
    }
}

/// A source file kept for turning spans into line/column.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    pub fn diag(&self, span: Option<Range<usize>>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = match span {
            Some(s) => line_col(&self.text, s.start),
            None => (1, 1),
        };
        // One diagnostic, one line: a message from a library may span several.
        let message: String = message.into();
        let message = message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Diagnostic {
            file: self.path.clone(),
            line,
            col,
            message,
        }
    }
    pub fn err(&self, e: SpanError) -> Diagnostic {
        self.diag(e.span, e.message)
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

// ---------------------------------------------------------------------------------------
// File shapes
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct MainFile {
    /// The agent itself: data directory, probe files, API address.
    #[serde(default)]
    agent: AgentFile,
    /// Inherited by every probe.
    #[serde(default)]
    defaults: Defaults,
    /// How long stored data lives.
    #[serde(default)]
    retention: Retention,
    /// Components shown on status pages.
    #[serde(default, rename = "component")]
    components: Vec<ComponentConfig>,
    /// Maintenance windows.
    #[serde(default, rename = "maintenance")]
    maintenance: Vec<crate::incident::MaintenanceConfig>,
    /// Rehearsals the daemon runs on a schedule.
    #[serde(default, rename = "rehearsal")]
    rehearsals: Vec<RehearsalEntry>,
    /// Reviews sent on a schedule.
    #[serde(default, rename = "review")]
    reviews: Vec<crate::review::ReviewConfig>,
    /// Notifiers, read separately (their shape depends on `kind`).
    #[serde(default, rename = "notifier")]
    #[schemars(with = "BTreeMap<String, crate::notify::NotifierTable>")]
    _notifiers: Option<serde::de::IgnoredAny>,
}

/// `[[rehearsal]]`: a rehearsal file the daemon runs on a cron schedule.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RehearsalEntry {
    /// The rehearsal file, relative to this config file (e.g. `rehearsals/http-outage.toml`).
    #[schemars(with = "String")]
    file: Spanned<String>,
    /// When to run it: cron in UTC, 5 fields (`"0 9 * * MON"`) or 6 with seconds first.
    #[schemars(with = "String")]
    schedule: Spanned<String>,
}

/// A `[[rehearsal]]`, validated: its file exists and loads against the config, its schedule
/// parses.
#[derive(Debug, Clone)]
pub struct ScheduledRehearsal {
    /// The file as written in the config.
    pub file: String,
    /// The file resolved against the config's directory.
    pub path: PathBuf,
    pub schedule: crate::cron::Schedule,
}

/// `[agent]`: the agent itself.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    /// Vantage point name shown in notifications (default: the host name).
    location: Option<Interp>,
    /// Data directory, relative to the config file; SQLite lives at `<data_dir>/watchpost.db`.
    #[serde(default = "default_data_dir")]
    data_dir: Interp,
    /// Globs of probe files, relative to the config file.
    #[serde(default = "default_probe_globs")]
    probes: Vec<String>,
    /// Address of the HTTP API, `/metrics` and dashboard; `""` turns it off.
    #[serde(default = "default_listen")]
    listen: Interp,
    /// Environment variable holding the bearer token required by mutating API calls.
    api_token_env: Option<String>,
    /// Environment variable holding a `postgres://` URL: fleet mode, runs and incidents in
    /// that shared Postgres instead of the embedded SQLite database.
    database_url_env: Option<String>,
    /// Fleet mode: runs kept on local disk (`<data_dir>/outage-buffer.db`) while Postgres is
    /// unreachable, flushed in order when it answers again; past this many the oldest are
    /// dropped (counted and logged).
    #[serde(default = "default_outage_buffer_runs")]
    outage_buffer_runs: u64,
    /// How long in-flight runs may take to finish after SIGTERM/SIGINT.
    #[serde(default = "default_shutdown_grace")]
    shutdown_grace: Dur,
    /// Most probe runs in flight at once.
    #[serde(default = "default_max_concurrency")]
    max_concurrency: usize,
    /// Requests per second allowed per target host (0 = unlimited).
    #[serde(default = "default_host_rate")]
    host_rate_limit: u32,
    /// A dead man's switch pinged every interval while the agent's parts are healthy.
    heartbeat: Option<HeartbeatFile>,
    /// Fleet mode timing: membership heartbeats and the leader lease.
    #[serde(default)]
    fleet: FleetFile,
}

/// `[agent] fleet`: how agents sharing one Postgres see each other (fleet mode only).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    /// How often the agent writes its membership heartbeat and renews (or tries to take)
    /// the leader lease; a member is live while its heartbeat is younger than twice this.
    #[serde(default = "default_fleet_heartbeat")]
    heartbeat: Dur,
    /// How long the leader lease lasts unrenewed: a leader that cannot renew it stops
    /// evaluating and notifying by then, and another agent takes over.
    #[serde(default = "default_fleet_lease")]
    lease: Dur,
    /// Confirmation across locations: when this agent sees a probe go bad it asks the other
    /// locations to re-run it at once, and it re-runs at once the probes other locations
    /// ask about (those it runs in its location). `false`: neither.
    #[serde(default = "yes")]
    confirm: bool,
}

impl Default for FleetFile {
    fn default() -> Self {
        FleetFile {
            heartbeat: default_fleet_heartbeat(),
            lease: default_fleet_lease(),
            confirm: true,
        }
    }
}

fn default_fleet_heartbeat() -> Dur {
    Dur::secs(2)
}
fn default_fleet_lease() -> Dur {
    Dur::secs(10)
}

/// Fleet mode timing, validated (see `crate::fleet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetTiming {
    pub heartbeat: Duration,
    pub lease: Duration,
    /// Ask for and answer confirmation re-runs across locations (`crate::fleet::confirm`).
    pub confirm: bool,
}

impl Default for FleetTiming {
    fn default() -> Self {
        FleetTiming {
            heartbeat: default_fleet_heartbeat().0,
            lease: default_fleet_lease().0,
            confirm: true,
        }
    }
}

/// Shortest fleet heartbeat, and how many heartbeats the lease must span at least.
pub const MIN_FLEET_HEARTBEAT: Duration = Duration::from_millis(100);
pub const LEASE_HEARTBEATS: u32 = 3;

/// `[agent] heartbeat`: an external dead man's switch (healthchecks.io, Better Stack, a
/// PagerDuty heartbeat, any URL).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct HeartbeatFile {
    /// The URL pinged (`${ENV}` allowed; it often holds a token).
    url: Interp,
    /// HTTP method of the ping.
    #[serde(default = "default_heartbeat_method")]
    method: String,
    /// Time between pings.
    #[serde(default = "default_heartbeat_interval")]
    interval: Dur,
    /// Deadline of one ping.
    #[serde(default = "default_heartbeat_timeout")]
    timeout: Dur,
}

fn default_heartbeat_method() -> String {
    "GET".into()
}
fn default_heartbeat_interval() -> Dur {
    Dur::secs(60)
}
fn default_heartbeat_timeout() -> Dur {
    Dur::secs(10)
}

/// Shortest heartbeat interval (tests scale it down; a real switch expects minutes).
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

/// The heartbeat, validated.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// The URL; a secret may be in it, so it is shown only through `redact_url`.
    pub url: String,
    pub method: reqwest::Method,
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for AgentFile {
    fn default() -> Self {
        AgentFile {
            location: None,
            data_dir: default_data_dir(),
            probes: default_probe_globs(),
            listen: default_listen(),
            api_token_env: None,
            database_url_env: None,
            outage_buffer_runs: default_outage_buffer_runs(),
            shutdown_grace: default_shutdown_grace(),
            max_concurrency: default_max_concurrency(),
            host_rate_limit: default_host_rate(),
            heartbeat: None,
            fleet: FleetFile::default(),
        }
    }
}

fn default_data_dir() -> Interp {
    Interp::literal("data")
}
fn default_probe_globs() -> Vec<String> {
    vec!["../probes/*.toml".into()]
}
fn default_listen() -> Interp {
    Interp::literal("127.0.0.1:9464")
}
fn default_shutdown_grace() -> Dur {
    Dur::secs(20)
}
fn default_outage_buffer_runs() -> u64 {
    100_000
}
fn default_max_concurrency() -> usize {
    256
}
fn default_host_rate() -> u32 {
    20
}

/// `[defaults]`: inherited by every probe.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Time between runs (floor 1 s).
    #[serde(default = "default_interval")]
    pub interval: Dur,
    /// Deadline of one attempt.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Quick confirmation runs before a run counts as down.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Pause between confirmation runs.
    #[serde(default = "default_retry_delay")]
    pub retry_delay: Dur,
    /// Up to this much random delay added to each planned start (0 = none).
    #[serde(default = "default_jitter")]
    pub jitter: Dur,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            interval: default_interval(),
            timeout: default_timeout(),
            retries: default_retries(),
            retry_delay: default_retry_delay(),
            jitter: default_jitter(),
        }
    }
}

fn default_interval() -> Dur {
    Dur::secs(60)
}
fn default_timeout() -> Dur {
    Dur::secs(5)
}
fn default_retries() -> u32 {
    1
}
fn default_retry_delay() -> Dur {
    Dur::secs(2)
}
fn default_jitter() -> Dur {
    Dur::millis(500)
}

/// `[retention]`: how long stored data lives.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Individual runs.
    #[serde(default = "default_ret_runs")]
    pub runs: Dur,
    /// How far back latency is read at minute precision (from the runs themselves); older
    /// windows use the hourly histograms. The key keeps its historic name.
    #[serde(default = "default_ret_minute")]
    pub minute_histograms: Dur,
    /// Hourly histograms.
    #[serde(default = "default_ret_hourly")]
    pub hourly_histograms: Dur,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            runs: default_ret_runs(),
            minute_histograms: default_ret_minute(),
            hourly_histograms: default_ret_hourly(),
        }
    }
}

fn default_ret_runs() -> Dur {
    Dur::secs(7 * 86400)
}
fn default_ret_minute() -> Dur {
    Dur::secs(48 * 3600)
}
fn default_ret_hourly() -> Dur {
    Dur::secs(400 * 86400)
}

/// Latency budget of one phase.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Median over the budget window.
    pub p50: Option<Dur>,
    /// 95th percentile over the budget window.
    pub p95: Option<Dur>,
    /// 99th percentile over the budget window.
    pub p99: Option<Dur>,
    /// A single run over this is degraded.
    pub run: Option<Dur>,
}

/// `[[component]]`: what a status page shows.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// Name shown on status pages and in notifications.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Member series: probe names or `probe/sub-check` (may be empty when `alert_labels`
    /// is set: the component is then driven by inbound alerts alone).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub probes: Vec<Spanned<String>>,
    /// Consecutive bad runs of a member before the component leaves operational.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Consecutive good runs needed (with `recovery`) to resolve.
    #[serde(default = "default_success_threshold")]
    pub success_threshold: u32,
    /// Time clear since the last bad run needed to resolve.
    #[serde(default = "default_recovery")]
    pub recovery: Dur,
    /// Window over which latency budgets (p50/p95/p99) are judged.
    #[serde(default = "default_budget_window")]
    pub budget_window: Dur,
    /// Fewest samples in the window before a budget can be judged.
    #[serde(default = "default_budget_min_samples")]
    pub budget_min_samples: u64,
    /// Beyond this many incidents in an hour, stay in one incident marked flapping.
    #[serde(default = "default_max_incidents_per_hour")]
    pub max_incidents_per_hour: u32,
    /// Notifier names.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub notify: Vec<Spanned<String>>,
    /// Inbound alerts whose labels include all of these belong here (besides those whose
    /// `component` label is this component's name).
    #[schemars(with = "Option<BTreeMap<String, String>>")]
    pub alert_labels: Option<Spanned<BTreeMap<String, String>>>,
    /// Component status a firing inbound alert asks for, by its `severity` label (replaces
    /// the default map; an alert with another or no severity counts as `degraded`).
    #[serde(default = "default_alert_severity")]
    pub alert_severity: BTreeMap<String, AlertLevel>,
    /// Availability objective (SLO) over `slo_window`, e.g. `"99.5%"`: the share of member
    /// runs (outside maintenance) that must not be down.
    #[schemars(with = "Option<Objective>")]
    pub objective: Option<Spanned<Objective>>,
    /// Window the objective and its error budget are measured over.
    #[serde(default = "default_slo_window")]
    pub slo_window: Dur,
    /// Open an incident when the error budget burns fast (multi-window burn rate).
    #[schemars(with = "Option<bool>")]
    pub burn_alert: Option<Spanned<bool>>,
    /// Fleet mode: how many locations must see a member bad for it to count as bad:
    /// `"majority"` of the locations that reported it in the last two intervals, or a number.
    #[serde(default)]
    pub quorum: Quorum,
}

/// `[[component]] quorum`: locations that must agree a member is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quorum {
    /// More than half of the locations that reported.
    #[default]
    Majority,
    /// This many locations (all that reported, when fewer did).
    Locations(u32),
}

impl Quorum {
    /// Locations that must see a member bad when `reporting` locations reported it.
    pub fn needed(self, reporting: usize) -> usize {
        match self {
            Quorum::Majority => reporting / 2 + 1,
            Quorum::Locations(n) => (n as usize).min(reporting).max(1),
        }
    }
}

impl<'de> Deserialize<'de> for Quorum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Count(i64),
        }
        let bad = |what: String| {
            serde::de::Error::custom(format!(
                "invalid quorum {what} (expected \"majority\" or a number of locations, at least 1)"
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "majority" => Ok(Quorum::Majority),
            Raw::Word(w) => Err(bad(format!("{w:?}"))),
            Raw::Count(n) if n >= 1 => Ok(Quorum::Locations(u32::try_from(n).unwrap_or(u32::MAX))),
            Raw::Count(n) => Err(bad(n.to_string())),
        }
    }
}

impl schemars::JsonSchema for Quorum {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Quorum".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Locations that must see a member bad: \"majority\" or a number.",
            "oneOf": [
                { "type": "string", "enum": ["majority"] },
                { "type": "integer", "minimum": 1 }
            ]
        })
    }
}

/// The component status a firing inbound alert asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertLevel {
    Degraded,
    PartialOutage,
    MajorOutage,
}

impl AlertLevel {
    pub fn status(self) -> crate::incident::Status {
        use crate::incident::Status;
        match self {
            AlertLevel::Degraded => Status::Degraded,
            AlertLevel::PartialOutage => Status::PartialOutage,
            AlertLevel::MajorOutage => Status::MajorOutage,
        }
    }
}

fn default_alert_severity() -> BTreeMap<String, AlertLevel> {
    BTreeMap::from([
        ("critical".to_string(), AlertLevel::MajorOutage),
        ("warning".to_string(), AlertLevel::Degraded),
    ])
}

/// An availability objective: a percentage strictly between 0 and 100.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective(f64);

impl Objective {
    /// `"99.5%"` (the `%` may be left out) → 0.995.
    pub fn parse(s: &str) -> Result<Objective, String> {
        let bad = || {
            format!(
                "invalid objective {s:?} (expected a percentage between 0 and 100, e.g. \"99.5%\")"
            )
        };
        let n: f64 = s
            .trim()
            .trim_end_matches('%')
            .trim()
            .parse()
            .map_err(|_| bad())?;
        if !(n > 0.0 && n < 100.0) {
            return Err(bad());
        }
        Ok(Objective(n / 100.0))
    }
    /// The objective as a fraction (0.995).
    pub fn fraction(self) -> f64 {
        self.0
    }
    /// The error budget: the share of runs allowed to be down (0.005).
    pub fn budget(self) -> f64 {
        1.0 - self.0
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // 0.995 → "99.5%" without float noise.
        let pct = (self.0 * 1e6).round() / 1e4;
        write!(f, "{pct}%")
    }
}

impl<'de> Deserialize<'de> for Objective {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Objective::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Objective {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Objective".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "An availability objective: a percentage strictly between 0 and 100.",
            "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*%?\\s*$",
            "examples": ["99.5%", "99.9%"]
        })
    }
}

impl ComponentConfig {
    /// The component's objective, if it has one.
    pub fn objective(&self) -> Option<Objective> {
        self.objective.as_ref().map(|o| *o.get_ref())
    }
    /// Whether a fast error-budget burn opens an incident.
    pub fn burn_alert(&self) -> bool {
        self.burn_alert.as_ref().is_some_and(|b| *b.get_ref())
    }
}

fn default_slo_window() -> Dur {
    Dur::secs(30 * 86400)
}

fn default_failure_threshold() -> u32 {
    2
}
fn default_success_threshold() -> u32 {
    2
}
fn default_recovery() -> Dur {
    Dur::secs(180)
}
fn default_budget_window() -> Dur {
    Dur::secs(600)
}
fn default_budget_min_samples() -> u64 {
    5
}
fn default_max_incidents_per_hour() -> u32 {
    4
}

/// Keys every probe file may carry, whatever its kind.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ProbeCommonFile {
    /// Unique probe name (also its series name).
    #[schemars(with = "String")]
    name: Spanned<String>,
    /// Probe kind: http, websocket or listen.
    #[schemars(with = "String")]
    kind: Spanned<String>,
    /// Disabled probes are validated but never run.
    #[serde(default = "yes")]
    enabled: bool,
    /// Free text shown in reports.
    #[serde(default)]
    description: String,
    /// Time between runs (default: `[defaults] interval`).
    #[schemars(with = "Option<Dur>")]
    interval: Option<Spanned<Dur>>,
    /// Deadline of one attempt (default: `[defaults] timeout`; listen: fits its audio).
    #[schemars(with = "Option<Dur>")]
    timeout: Option<Spanned<Dur>>,
    /// Quick confirmation runs before a run counts as down (default: `[defaults] retries`).
    #[schemars(with = "Option<u32>")]
    retries: Option<Spanned<u32>>,
    /// Pause between confirmation runs (default: `[defaults] retry_delay`).
    retry_delay: Option<Dur>,
    /// Random delay below this added to each planned start (default: `[defaults] jitter`).
    #[schemars(with = "Option<Dur>")]
    jitter: Option<Spanned<Dur>>,
    /// Fixed start within the interval (default: a stable hash of the name).
    #[schemars(with = "Option<Dur>")]
    offset: Option<Spanned<Dur>>,
    /// Per-phase latency budgets.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, Budget>")]
    budget: BTreeMap<Spanned<String>, Budget>,
}

const PROBE_COMMON_KEYS: &[&str] = &[
    "name",
    "kind",
    "enabled",
    "description",
    "interval",
    "timeout",
    "retries",
    "retry_delay",
    "jitter",
    "offset",
    "budget",
];

fn yes() -> bool {
    true
}

// ---------------------------------------------------------------------------------------
// Validated config
// ---------------------------------------------------------------------------------------

/// The agent section after validation.
#[derive(Debug, Clone)]
pub struct Agent {
    pub location: String,
    pub data_dir: PathBuf,
    pub listen: Option<String>,
    pub api_token: Option<Secret>,
    /// Fleet mode: the Postgres URL from `database_url_env`.
    pub database_url: Option<Secret>,
    /// Fleet mode: most runs buffered on local disk while Postgres is unreachable.
    pub outage_buffer_runs: u64,
    pub shutdown_grace: Duration,
    pub max_concurrency: usize,
    pub host_rate_limit: u32,
    /// `[agent] heartbeat`, if configured.
    pub heartbeat: Option<Heartbeat>,
    /// `[agent] fleet`: membership heartbeat and leader lease (used in fleet mode only).
    pub fleet: FleetTiming,
    /// Set only on the isolated agent of `watchpost rehearse`: the rehearsal's run id, which
    /// marks every notification it sends (never read from a file).
    pub rehearsal: Option<String>,
}

/// One probe, validated.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub name: String,
    pub file: PathBuf,
    pub dir: PathBuf,
    pub enabled: bool,
    pub description: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub retry_delay: Duration,
    pub jitter: Duration,
    /// Fixed start within the interval; `None` = stable hash of the name.
    pub offset: Option<Duration>,
    pub budget: BTreeMap<String, Budget>,
    pub spec: ProbeSpec,
}

impl ProbeConfig {
    pub fn kind(&self) -> &'static str {
        self.spec.kind()
    }
}

/// A named notifier.
#[derive(Debug, Clone)]
pub struct Notifier {
    pub name: String,
    pub config: NotifierConfig,
}

/// Everything the agent needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub dir: PathBuf,
    pub agent: Agent,
    pub defaults: Defaults,
    pub retention: Retention,
    pub probes: Vec<ProbeConfig>,
    pub components: Vec<ComponentConfig>,
    pub maintenance: Vec<crate::incident::MaintenanceConfig>,
    pub notifiers: Vec<Notifier>,
    /// `[[rehearsal]]`: rehearsals the daemon runs on a schedule.
    pub rehearsals: Vec<ScheduledRehearsal>,
    /// `[[review]]`: the review sent on a schedule.
    pub reviews: Vec<crate::review::ReviewConfig>,
}

impl Config {
    /// The probe named `name`. The loader keeps probes sorted by name, so this is a binary
    /// search (it runs per run in the evaluator); a hand-built unsorted list still works.
    pub fn probe(&self, name: &str) -> Option<&ProbeConfig> {
        match self.probes.binary_search_by(|p| p.name.as_str().cmp(name)) {
            Ok(i) => Some(&self.probes[i]),
            Err(_) => self.probes.iter().find(|p| p.name == name),
        }
    }
    pub fn db_path(&self) -> PathBuf {
        self.agent.data_dir.join("watchpost.db")
    }
}

/// Load and validate the whole configuration; no network is touched.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_as(path, true)
}

/// Load for commands that only read the database (`watchpost incidents`, `report`): a
/// notifier that does not load (its `*_env` secret is not in this shell's environment) is
/// left out instead of failing the command; `validate`, `run` and `check` use [`load`].
pub fn load_for_reading(path: &Path) -> Result<Config, ConfigErrors> {
    load_as(path, false)
}

fn load_as(path: &Path, need_notifiers: bool) -> Result<Config, ConfigErrors> {
    let mut diags = Vec::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            // A whole-file problem: no position (line 0), but where we looked and how to
            // look elsewhere.
            let cwd = std::env::current_dir()
                .map(|d| format!(" (relative to {})", d.display()))
                .unwrap_or_default();
            let hint = if path.is_relative() {
                cwd
            } else {
                String::new()
            };
            return Err(ConfigErrors(vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                col: 0,
                message: format!(
                    "cannot read config file{hint}: {e}; point at another one with -c FILE or WATCHPOST_CONFIG"
                ),
            }]));
        }
    };
    let src = Source {
        path: path.to_path_buf(),
        text,
    };
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };

    let (main, notifiers, salvaged) = parse_main(&src, &mut diags, need_notifiers);

    let agent = build_agent(&main.agent, &dir);

    // Probe files.
    let mut probes: Vec<ProbeConfig> = Vec::new();
    let mut seen: HashMap<String, (PathBuf, usize, usize)> = HashMap::new();
    // Names of every probe file read, valid or not: a component naming an invalid probe is
    // not told the probe is unknown (the probe file has its own errors).
    let mut declared: Vec<String> = Vec::new();
    for pattern in &main.agent.probes {
        let full = dir.join(pattern);
        let full_s = full.to_string_lossy().to_string();
        let paths = match glob::glob(&full_s) {
            Ok(p) => p,
            Err(e) => {
                diags.push(src.diag(
                    find_span(&src.text, pattern),
                    format!("invalid probe glob {pattern:?}: {e}"),
                ));
                continue;
            }
        };
        let mut matched = false;
        for entry in paths {
            matched = true;
            let p = match entry {
                Ok(p) => p,
                Err(e) => {
                    diags.push(src.diag(
                        find_span(&src.text, pattern),
                        format!("cannot read {}: {}", e.path().display(), e.error()),
                    ));
                    continue;
                }
            };
            if p.is_dir() {
                diags.push(src.diag(
                    find_span(&src.text, pattern),
                    format!(
                        "probe glob {pattern:?} matches the directory {}; probe files are matched by a glob like \"{}/*.toml\"",
                        p.display(),
                        pattern.trim_end_matches('/')
                    ),
                ));
                continue;
            }
            match load_probe(&p, &main.defaults, &mut declared) {
                Ok((probe, pos)) => {
                    if let Some((f, l, c)) = seen.get(&probe.name) {
                        diags.push(Diagnostic {
                            file: p.clone(),
                            line: pos.0,
                            col: pos.1,
                            message: format!(
                                "duplicate probe name {:?} (first defined at {}:{}:{})",
                                probe.name,
                                f.display(),
                                l,
                                c
                            ),
                        });
                    } else {
                        seen.insert(probe.name.clone(), (p.clone(), pos.0, pos.1));
                        probes.push(probe);
                    }
                }
                Err(mut d) => diags.append(&mut d),
            }
        }
        // A salvaged glob may be cut short by the syntax error already reported.
        if !matched && !salvaged {
            let span = find_span(&src.text, pattern).or_else(|| {
                DeTable::parse(&src.text)
                    .ok()
                    .and_then(|d| locate(d.get_ref(), &["agent", "probes"]))
            });
            let msg = if pattern.contains(['*', '?', '[']) {
                format!(
                    "probe glob {pattern:?} matches no file (looked for {})",
                    full.display()
                )
            } else {
                format!("probe file {} does not exist", full.display())
            };
            diags.push(src.diag(span, msg));
        }
    }
    probes.sort_by(|a, b| a.name.cmp(&b.name));

    // Components: members and notifiers must exist.
    let notifier_names: Vec<&str> = notifiers.iter().map(|n| n.name.as_str()).collect();
    // Notifiers present in the file but invalid already have their own error; do not
    // report them again as unknown.
    let declared_notifiers: Vec<String> = match DeTable::parse(&src.text)
        .ok()
        .and_then(|d| d.get_ref().get("notifier").cloned())
    {
        Some(v) => match v.get_ref() {
            DeValue::Table(t) => t.iter().map(|(k, _)| k.get_ref().to_string()).collect(),
            _ => Vec::new(),
        },
        None => Vec::new(),
    };
    let main_doc = DeTable::parse(&src.text).ok();
    let mut comp_names = HashMap::new();
    for c in &main.components {
        if comp_names.insert(c.name.get_ref().clone(), ()).is_some() {
            diags.push(src.diag(
                Some(c.name.span()),
                format!("duplicate component name {:?}", c.name.get_ref()),
            ));
        }
        let labels = c.alert_labels.as_ref();
        if c.probes.is_empty() && labels.is_none_or(|l| l.get_ref().is_empty()) {
            diags.push(src.diag(
                Some(c.name.span()),
                format!(
                    "component has no probes and no alert_labels: nothing can change its status \
                     (list probes, or let inbound alerts drive it with e.g. \
                     alert_labels = {{ component = {:?} }})",
                    c.name.get_ref()
                ),
            ));
        }
        if let Some(l) = labels.filter(|l| l.get_ref().is_empty()) {
            diags.push(src.diag(
                Some(l.span()),
                "alert_labels = {} would match every alert: name at least one label",
            ));
        }
        for m in &c.probes {
            let probe_name = m.get_ref().split('/').next().unwrap_or_default();
            if !probes.iter().any(|p| p.name == probe_name)
                && !seen.contains_key(probe_name)
                && !declared.iter().any(|d| d == probe_name)
            {
                diags.push(src.diag(
                    Some(m.span()),
                    format!(
                        "unknown probe {probe_name:?} in component {:?}",
                        c.name.get_ref()
                    ),
                ));
            }
        }
        for n in &c.notify {
            match notifiers.iter().find(|x| &x.name == n.get_ref()) {
                None if declared_notifiers.contains(n.get_ref()) => {}
                None => diags.push(src.diag(
                    Some(n.span()),
                    format!(
                        "unknown notifier {:?} (defined: {})",
                        n.get_ref(),
                        list_or_none(&notifier_names)
                    ),
                )),
                Some(x) => {
                    if let Err(m) = x.config.check_component(c.name.get_ref()) {
                        diags.push(
                            src.diag(Some(n.span()), format!("notifier {:?} {m}", n.get_ref())),
                        );
                    }
                }
            }
        }
        if let Some(b) = c
            .burn_alert
            .as_ref()
            .filter(|b| *b.get_ref() && c.objective.is_none())
        {
            diags.push(src.diag(
                Some(b.span()),
                "burn_alert needs an objective (e.g. objective = \"99.5%\") to measure the burn against",
            ));
        }
        // At the key, or at the component's name when the value is an inherited default.
        let at = |key: &str| {
            main_doc
                .as_ref()
                .and_then(|d| component_key_span(d.get_ref(), c.name.get_ref(), key))
                .or(Some(c.name.span()))
        };
        if c.slo_window.0 < Duration::from_secs(3600) {
            diags.push(src.diag(
                at("slo_window"),
                format!(
                    "slo_window {} is shorter than 1h",
                    duration::human(c.slo_window.0)
                ),
            ));
        }
        for (key, n) in [
            ("failure_threshold", c.failure_threshold),
            ("success_threshold", c.success_threshold),
        ] {
            if n == 0 {
                diags.push(src.diag(at(key), format!("{key} must be at least 1")));
            }
        }
    }
    for m in &main.maintenance {
        if let Err(errs) = m.validate(&main.components) {
            diags.extend(errs.into_iter().map(|e| src.err(e)));
        }
    }
    let mut rehearsals = Vec::new();
    for e in &main.rehearsals {
        let path = dir.join(e.file.get_ref());
        if !path.is_file() {
            diags.push(src.diag(
                Some(e.file.span()),
                format!("rehearsal file {} does not exist", path.display()),
            ));
        }
        match crate::cron::Schedule::parse_with_seconds(e.schedule.get_ref()) {
            Ok(schedule) => rehearsals.push(ScheduledRehearsal {
                file: e.file.get_ref().clone(),
                path,
                schedule,
            }),
            Err(m) => diags.push(src.diag(Some(e.schedule.span()), m)),
        }
    }
    let mut review_names = HashMap::new();
    for r in &main.reviews {
        if review_names.insert(r.name().to_string(), ()).is_some() {
            diags.push(src.diag(
                Some(r.name.span()),
                format!("duplicate review name {:?}", r.name()),
            ));
        }
        for e in r.validate(&main.components, &notifiers, &declared_notifiers) {
            diags.push(src.err(e));
        }
    }

    if !diags.is_empty() {
        diags.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
        // One problem per place, the first found: a value that could not be read is dropped
        // and its default checked instead, which must not add a second error at its key.
        diags.dedup_by(|b, a| (&a.file, a.line, a.col) == (&b.file, b.line, b.col));
        return Err(ConfigErrors(diags));
    }
    let config = Config {
        path: path.to_path_buf(),
        dir,
        agent,
        defaults: main.defaults,
        retention: main.retention,
        probes,
        components: main.components,
        maintenance: main.maintenance,
        notifiers,
        rehearsals,
        reviews: main.reviews,
    };
    // Scheduled rehearsal files are checked against the whole config (their probes,
    // components and notifiers), each error at its place in the rehearsal file.
    if need_notifiers {
        let diags: Vec<Diagnostic> = config
            .rehearsals
            .iter()
            .filter_map(|r| crate::chaos::file::load(&r.path, &config).err())
            .flat_map(|e| e.0)
            .collect();
        if !diags.is_empty() {
            return Err(ConfigErrors(diags));
        }
    }
    Ok(config)
}

/// Span of `key` in the `[[component]]` named `name`.
fn component_key_span(doc: &DeTable<'_>, name: &str, key: &str) -> Option<Range<usize>> {
    let DeValue::Array(list) = doc.get("component")?.get_ref() else {
        return None;
    };
    list.iter().find_map(|c| match c.get_ref() {
        DeValue::Table(t)
            if t.get("name")
                .is_some_and(|n| matches!(n.get_ref(), DeValue::String(s) if s == name)) =>
        {
            t.get(key).map(|v| v.span())
        }
        _ => None,
    })
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Most quick confirmation retries a probe may ask for: each one is a full attempt, so more
/// would only delay the verdict (and 4e9 of them never end).
pub const MAX_RETRIES: u32 = 10;

fn timeout_too_long(timeout: Duration, interval: Duration) -> String {
    format!(
        "timeout {} is longer than the interval {}: runs would overlap and be skipped",
        duration::human(timeout),
        duration::human(interval)
    )
}

fn jitter_too_long(jitter: Duration, interval: Duration) -> String {
    format!(
        "jitter {} must be shorter than the interval {}",
        duration::human(jitter),
        duration::human(interval)
    )
}

/// `[defaults]` checks: each reported once, at the key. Two keys are compared only when
/// both were read (`parsed`: the file's parse errors), not a default standing in for one.
fn check_defaults(
    d: &Defaults,
    doc: &DeTable<'_>,
    parsed: &Errors,
    src: &Source,
    diags: &mut Vec<Diagnostic>,
) {
    let at = |key: &str| locate(doc, &["defaults", key]);
    let read = |key: &str| at(key).is_none_or(|s| parsed.intact("defaults", &s));
    if d.interval.0 < Duration::from_secs(1) {
        diags.push(src.diag(
            at("interval"),
            format!(
                "interval {} is below the 1s floor",
                duration::human(d.interval.0)
            ),
        ));
    }
    if d.timeout.0.is_zero() {
        diags.push(src.diag(at("timeout"), "timeout must be longer than 0s"));
    } else if d.timeout.0 > d.interval.0 && read("timeout") && read("interval") {
        diags.push(src.diag(at("timeout"), timeout_too_long(d.timeout.0, d.interval.0)));
    }
    if d.jitter.0 >= d.interval.0 && read("jitter") && read("interval") {
        diags.push(src.diag(at("jitter"), jitter_too_long(d.jitter.0, d.interval.0)));
    }
    if d.retries > MAX_RETRIES {
        diags.push(src.diag(
            at("retries"),
            format!("retries = {} is more than {MAX_RETRIES}", d.retries),
        ));
    }
}

fn find_span(text: &str, needle: &str) -> Option<Range<usize>> {
    text.find(&format!("\"{needle}\""))
        .map(|i| i..i + needle.len() + 2)
}

/// Most lines [`salvage`] blanks out.
const MAX_SALVAGED_LINES: usize = 16;

/// A file with a TOML syntax error, made readable by blanking each line the parser stops
/// at until the rest parses. Only for what the rest of the load needs (probe globs, a
/// probe's name); nothing in it is reported.
fn salvage(text: &str) -> Option<String> {
    let mut text = text.to_string();
    for _ in 0..MAX_SALVAGED_LINES {
        let at = match DeTable::parse(&text) {
            Ok(_) => return Some(text),
            Err(e) => e.span()?.start.min(text.len()),
        };
        let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
        if start == end {
            return None;
        }
        text.replace_range(start..end, &" ".repeat(end - start));
    }
    None
}

/// What a main file with a syntax error still says: its probe globs and `[defaults]`, to
/// check the probe files. With no usable globs, no probe file is read.
fn salvage_main(text: &str) -> MainFile {
    let mut salvaged = MainFile::default();
    salvaged.agent.probes.clear();
    let Some(text) = salvage(text) else {
        return salvaged;
    };
    let Ok(doc) = DeTable::parse(&text) else {
        return salvaged;
    };
    if let (Some(m), _) = parse_lenient::<MainFile>(doc.get_ref().clone(), doc.span()) {
        // Only globs the file names: the default one is a guess here.
        if locate(doc.get_ref(), &["agent", "probes"]).is_some() {
            salvaged.agent.probes = m.agent.probes;
        }
        salvaged.defaults = m.defaults;
    }
    salvaged
}

/// The main file, its notifiers, and whether it had a syntax error (then only its probe
/// globs and defaults were salvaged).
fn parse_main(
    src: &Source,
    diags: &mut Vec<Diagnostic>,
    need_notifiers: bool,
) -> (MainFile, Vec<Notifier>, bool) {
    let doc = match DeTable::parse(&src.text) {
        Ok(d) => d,
        Err(e) => {
            // Unreadable TOML: only its first error is sure; what the rest says about the
            // probe files and their defaults is read from a salvaged copy, so the probe
            // files' own problems are reported in the same run.
            diags.push(src.err(e.into()));
            return (salvage_main(&src.text), Vec::new(), true);
        }
    };
    let (main, errors) = parse_lenient::<MainFile>(doc.get_ref().clone(), doc.span());
    diags.extend(errors.iter().map(|e| src.err(e.clone())));
    let main = main.unwrap_or_else(|| {
        let mut m = MainFile::default();
        m.agent.probes.clear();
        m
    });
    check_defaults(&main.defaults, doc.get_ref(), &errors, src, diags);
    check_agent(&main.agent, doc.get_ref(), src, diags);
    let mut notifiers = Vec::new();
    if let Some(v) = doc.get_ref().get("notifier") {
        if let DeValue::Table(t) = v.get_ref() {
            for (name, body) in t.iter() {
                let name = name.get_ref().to_string();
                let DeValue::Table(body_t) = body.get_ref() else {
                    diags.push(src.diag(
                        Some(body.span()),
                        format!("notifier.{name} must be a table"),
                    ));
                    continue;
                };
                let (kind, rest) = match take_kind(body_t, body.span()) {
                    Ok(v) => v,
                    Err(e) => {
                        diags.push(src.err(e));
                        continue;
                    }
                };
                match NotifierConfig::from_kind(kind.get_ref(), kind.span(), rest) {
                    Ok(config) => notifiers.push(Notifier { name, config }),
                    Err(errs) if need_notifiers => {
                        diags.extend(errs.into_iter().map(|e| src.err(e.located(body_t))))
                    }
                    Err(_) => {}
                }
            }
        }
    }
    (main, notifiers, false)
}

/// Split `kind` out of a table: returns it and a deserializer over the remaining keys.
pub(crate) fn take_kind<'a>(
    table: &DeTable<'a>,
    span: Range<usize>,
) -> Result<(Spanned<String>, Rest<'a>), SpanError> {
    let Some(kind) = table.get("kind") else {
        return Err(SpanError::at(span, "missing field `kind`"));
    };
    let DeValue::String(k) = kind.get_ref() else {
        return Err(SpanError::at(kind.span(), "`kind` must be a string"));
    };
    let kind = Spanned::new(kind.span(), k.to_string());
    let mut rest = table.clone();
    rest.remove("kind");
    Ok((kind, Rest::new(rest, span)))
}

/// The keys of a table left after the generic ones were taken; deserialize the kind-specific
/// struct from it (unknown keys are still reported with their position).
pub struct Rest<'a> {
    table: DeTable<'a>,
    span: Range<usize>,
}

impl<'a> Rest<'a> {
    fn new(table: DeTable<'a>, span: Range<usize>) -> Self {
        Rest { table, span }
    }
    /// Deserialize `T` without stopping at the first problem (see [`parse_lenient`]): the
    /// value read without the bad keys, when there is one, and every unknown key and bad
    /// value of the table. A builder goes on checking that value and adds its own errors.
    pub fn parse<T: DeserializeOwned>(self) -> (Option<T>, Errors) {
        let (value, errors) = parse_lenient(self.table, self.span);
        match value {
            None if errors.is_empty() => (None, SpanError::new("invalid table").into()),
            v => (v, errors),
        }
    }
    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }
}

/// Most keys [`parse_lenient`] drops from one table before it gives up.
const MAX_DROPPED_KEYS: usize = 64;

/// Deserialize `T` from `table` without stopping at the first problem: each error serde
/// reports is kept, the key it is about is dropped, and the rest is read again. Returns the
/// value read without the dropped keys (`None` when an error could not be tied to one key,
/// e.g. a missing required key) and every error, in the order found, with the keys whose
/// values were unreadable (see [`Errors::read`]).
fn parse_lenient<T: DeserializeOwned>(
    mut table: DeTable<'_>,
    span: Range<usize>,
) -> (Option<T>, Errors) {
    let mut errors = Errors::default();
    let mut dropped: Vec<String> = Vec::new();
    for _ in 0..=MAX_DROPPED_KEYS {
        let de = toml::de::Deserializer::from(Spanned::new(span.clone(), table.clone()));
        let e = match T::deserialize(de) {
            Ok(v) => return (Some(v), errors),
            Err(e) => SpanError::from(e),
        };
        let path = e.span.clone().and_then(|at| drop_key_at(&mut table, &at));
        // A required key dropped for its bad value: that it is now missing is no news.
        if !dropped
            .iter()
            .any(|k| e.message == format!("missing field `{k}`"))
        {
            if let Some(top) = path.as_ref().and_then(|p| p.first()) {
                errors.unread.push((top.clone(), e.span.clone()));
            }
            errors.push(e);
        }
        match path.and_then(|mut p| p.pop()) {
            Some(k) => dropped.push(k),
            None => break,
        }
    }
    (None, errors)
}

/// Remove the key whose `key = value` holds the whole span `at` (the innermost one, in
/// nested tables and arrays of tables); returns its path of key names, outermost first.
fn drop_key_at(table: &mut DeTable<'_>, at: &Range<usize>) -> Option<Vec<String>> {
    for (k, v) in table.iter_mut() {
        let inner = match v.get_mut() {
            DeValue::Table(t) => drop_key_at(t, at),
            DeValue::Array(items) => items.iter_mut().find_map(|item| match item.get_mut() {
                DeValue::Table(t) => drop_key_at(t, at),
                _ => None,
            }),
            _ => None,
        };
        if let Some(mut inner) = inner {
            inner.insert(0, k.get_ref().to_string());
            return Some(inner);
        }
    }
    let key = table
        .iter()
        .find(|(k, v)| {
            let (k, v) = (k.span(), v.span());
            k.start.min(v.start) <= at.start && at.end <= k.end.max(v.end)
        })
        .map(|(k, _)| k.get_ref().to_string())?;
    table.remove(key.as_str());
    Some(vec![key])
}

/// `[agent]` checks, each at its key.
fn check_agent(a: &AgentFile, doc: &DeTable<'_>, src: &Source, diags: &mut Vec<Diagnostic>) {
    let at = |key: &str| locate(doc, &["agent", key]);
    if a.outage_buffer_runs == 0 {
        diags.push(src.diag(
            at("outage_buffer_runs"),
            "outage_buffer_runs must be at least 1",
        ));
    }
    if a.max_concurrency == 0 {
        diags.push(src.diag(at("max_concurrency"), "max_concurrency must be at least 1"));
    }
    if let Some(h) = &a.heartbeat {
        let at = |key: &str| locate(doc, &["agent", "heartbeat", key]);
        if !matches!(
            url::Url::parse(h.url.as_str())
                .map(|u| u.scheme().to_string())
                .as_deref(),
            Ok("http" | "https")
        ) {
            diags.push(src.diag(
                at("url"),
                "heartbeat url must be an http:// or https:// URL",
            ));
        }
        if reqwest::Method::from_bytes(h.method.to_ascii_uppercase().as_bytes()).is_err() {
            diags.push(src.diag(at("method"), format!("invalid HTTP method {:?}", h.method)));
        }
        if h.interval.0 < MIN_HEARTBEAT_INTERVAL {
            diags.push(src.diag(
                at("interval"),
                format!(
                    "heartbeat interval {} is below the {} floor",
                    h.interval,
                    duration::human(MIN_HEARTBEAT_INTERVAL)
                ),
            ));
        }
        if h.timeout.0.is_zero() {
            diags.push(src.diag(at("timeout"), "heartbeat timeout must be longer than 0s"));
        }
    }
    if a.fleet.heartbeat.0 < MIN_FLEET_HEARTBEAT {
        diags.push(src.diag(
            locate(doc, &["agent", "fleet", "heartbeat"]),
            format!(
                "fleet heartbeat {} is below the {} floor",
                a.fleet.heartbeat,
                duration::human(MIN_FLEET_HEARTBEAT)
            ),
        ));
    } else if a.fleet.lease.0 < a.fleet.heartbeat.0 * LEASE_HEARTBEATS {
        diags.push(src.diag(
            locate(doc, &["agent", "fleet", "lease"]),
            format!(
                "fleet lease {} must span at least {LEASE_HEARTBEATS} heartbeats ({})",
                a.fleet.lease,
                duration::human(a.fleet.heartbeat.0 * LEASE_HEARTBEATS)
            ),
        ));
    }
    if !a.listen.is_empty() && a.listen.as_str().parse::<std::net::SocketAddr>().is_err() {
        diags.push(src.diag(
            at("listen"),
            format!(
                "listen = {:?} is not an address like \"127.0.0.1:9464\"",
                a.listen.as_str()
            ),
        ));
    }
    if let Some(var) = &a.api_token_env {
        if std::env::var(var).map_or(true, |v| v.is_empty()) {
            diags.push(src.diag(
                at("api_token_env"),
                format!(
                    "api_token_env names {var}, which is not set: export it, or remove the key \
                     (mutating API calls need the token)"
                ),
            ));
        }
    }
    if let Some(var) = &a.database_url_env {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => {
                if !(v.starts_with("postgres://") || v.starts_with("postgresql://")) {
                    diags.push(src.diag(
                        at("database_url_env"),
                        format!("{var} must hold a postgres:// URL (its value is not shown)"),
                    ));
                } else if let Err(e) = v.parse::<tokio_postgres::Config>() {
                    diags.push(src.diag(
                        at("database_url_env"),
                        format!("{var} is not a valid postgres:// URL: {e}"),
                    ));
                }
            }
            _ => diags.push(src.diag(
                at("database_url_env"),
                format!(
                    "database_url_env names {var}, which is not set: export it, or remove the \
                     key (without it the agent stores everything in SQLite)"
                ),
            )),
        }
    }
}

fn build_agent(a: &AgentFile, dir: &Path) -> Agent {
    let location = a
        .location
        .as_ref()
        .map(|l| l.to_string())
        .unwrap_or_else(hostname);
    let api_token = a
        .api_token_env
        .as_ref()
        .and_then(|var| match std::env::var(var) {
            Ok(v) if !v.is_empty() => Some(Secret::new(var.clone(), v)),
            _ => None,
        });
    let listen = (!a.listen.is_empty()).then(|| a.listen.to_string());
    let database_url = a
        .database_url_env
        .as_ref()
        .and_then(|var| match std::env::var(var) {
            Ok(v) if !v.is_empty() => Some(Secret::new(var.clone(), v)),
            _ => None,
        });
    Agent {
        location,
        data_dir: dir.join(a.data_dir.as_str()),
        listen,
        api_token,
        database_url,
        outage_buffer_runs: a.outage_buffer_runs.max(1),
        shutdown_grace: a.shutdown_grace.0,
        max_concurrency: a.max_concurrency.max(1),
        host_rate_limit: a.host_rate_limit,
        heartbeat: a.heartbeat.as_ref().and_then(|h| {
            Some(Heartbeat {
                url: h.url.to_string(),
                method: reqwest::Method::from_bytes(h.method.to_ascii_uppercase().as_bytes())
                    .ok()?,
                interval: h.interval.0,
                timeout: h.timeout.0,
            })
        }),
        fleet: FleetTiming {
            heartbeat: a.fleet.heartbeat.0,
            lease: a.fleet.lease.0,
            confirm: a.fleet.confirm,
        },
        rehearsal: None,
    }
}

/// The machine's host name, for the default location.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// A probe's own timing keys against its interval. Problems that come only from
/// `[defaults]` are reported there, once; here only what this file's keys cause. `timeout`
/// is the attempt deadline in force and whether it is the kind's own default (`None`: not
/// known, the spec did not build). A comparison with an unreadable key (its default stands
/// in, see [`Errors::read`]) or an interval that is itself in error is skipped.
fn check_probe_timing(
    common: &ProbeCommonFile,
    read: &Errors,
    interval: Duration,
    timeout: Option<(Duration, bool)>,
    defaults: &Defaults,
    src: &Source,
    diags: &mut Vec<Diagnostic>,
) {
    let own_interval = common.interval.as_ref().map(|i| i.span());
    if let Some(r) = common
        .retries
        .as_ref()
        .filter(|r| *r.get_ref() > MAX_RETRIES)
    {
        diags.push(src.diag(
            Some(r.span()),
            format!("retries = {} is more than {MAX_RETRIES}", r.get_ref()),
        ));
    }
    let zero_timeout = common.timeout.as_ref().filter(|t| t.get_ref().0.is_zero());
    if let Some(t) = zero_timeout {
        diags.push(src.diag(Some(t.span()), "timeout must be longer than 0s"));
    }
    // An inherited interval below the floor is reported once, at `[defaults]`.
    if let Some(own) = common
        .interval
        .as_ref()
        .filter(|i| i.get_ref().0 < Duration::from_secs(1))
    {
        diags.push(src.diag(
            Some(own.span()),
            format!(
                "interval {} is below the 1s floor",
                duration::human(own.get_ref().0)
            ),
        ));
        return;
    }
    if !read.read("interval") {
        return;
    }
    if let Some(off) = common.offset.as_ref().filter(|o| o.get_ref().0 >= interval) {
        diags.push(src.diag(
            Some(off.span()),
            format!(
                "offset {} must be shorter than the interval",
                duration::human(off.get_ref().0)
            ),
        ));
    }
    let timeout = timeout.filter(|(t, _)| *t > interval && read.read("timeout"));
    if let (Some((timeout, kind_default)), None) = (timeout, zero_timeout) {
        // At the key that makes it so: this file's timeout, else its interval, else (a
        // kind's own default timeout against the inherited interval) the kind.
        let span = common
            .timeout
            .as_ref()
            .map(|t| t.span())
            .or(own_interval.clone())
            .or_else(|| kind_default.then(|| common.kind.span()));
        if span.is_some() || timeout != defaults.timeout.0 {
            diags.push(src.diag(span, timeout_too_long(timeout, interval)));
        }
    }
    let jitter = common
        .jitter
        .as_ref()
        .map_or(defaults.jitter.0, |j| j.get_ref().0);
    if jitter >= interval && read.read("jitter") {
        if let Some(span) = common.jitter.as_ref().map(|j| j.span()).or(own_interval) {
            diags.push(src.diag(Some(span), jitter_too_long(jitter, interval)));
        }
    }
}

/// The sub-check a `[budget]` key names (`"checks.database"` with `subchecks = "checks"`).
pub fn subcheck_budget_key<'k>(subchecks: Option<&str>, key: &'k str) -> Option<&'k str> {
    let name = key.strip_prefix(subchecks?)?.strip_prefix('.')?;
    (!name.is_empty()).then_some(key)
}

impl ProbeConfig {
    /// The latency budget of one of this probe's series and phases: its own phases, or a
    /// sub-check series (`<probe>/<path>.<name>`, phase `latency`) named by a `[budget]` key.
    pub fn series_budget(&self, series: &str, phase: &str) -> Option<&Budget> {
        match series.strip_prefix(self.name.as_str()) {
            Some("") => self.budget.get(phase),
            Some(rest) if phase == "latency" => {
                let key = rest.strip_prefix('/')?;
                subcheck_budget_key(self.spec.subcheck_path(), key)?;
                self.budget.get(key)
            }
            _ => None,
        }
    }
}

/// Load one probe file; returns the probe and the position of its `name`. The name, when
/// the file has one, is added to `declared` even if the file has errors.
fn load_probe(
    path: &Path,
    defaults: &Defaults,
    declared: &mut Vec<String>,
) -> Result<(ProbeConfig, (usize, usize)), Vec<Diagnostic>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        // A whole-file problem: no position.
        vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            message: format!("cannot read probe file: {e}"),
        }]
    })?;
    let src = Source {
        path: path.to_path_buf(),
        text,
    };
    let doc = match DeTable::parse(&src.text) {
        Ok(doc) => doc,
        Err(e) => {
            // Its name, if the rest of the file has one, is still declared.
            if let Some(name) = salvage(&src.text).and_then(|t| {
                let doc = DeTable::parse(&t).ok()?;
                match doc.get_ref().get("name")?.get_ref() {
                    DeValue::String(n) => Some(n.to_string()),
                    _ => None,
                }
            }) {
                declared.push(name);
            }
            return Err(vec![src.err(e.into())]);
        }
    };
    let span = doc.span();
    let doc = doc.into_inner();
    let mut common_t = DeTable::new();
    let mut rest_t = DeTable::new();
    for (k, v) in doc.iter() {
        if PROBE_COMMON_KEYS.contains(&k.get_ref().as_ref()) {
            common_t.insert(k.clone(), v.clone());
        } else {
            rest_t.insert(k.clone(), v.clone());
        }
    }
    if let Some(DeValue::String(name)) = doc.get("name").map(|v| v.get_ref()) {
        declared.push(name.to_string());
    }
    let mut diags = Vec::new();
    let (common, common_errs) = parse_lenient::<ProbeCommonFile>(common_t, span.clone());
    diags.extend(common_errs.iter().map(|e| src.err(e.clone())));
    // The kind's own keys are checked even when the common ones are not all right.
    let kind = common.as_ref().map(|c| c.kind.clone()).or_else(|| {
        let v = doc.get("kind")?;
        match v.get_ref() {
            DeValue::String(k) => Some(Spanned::new(v.span(), k.to_string())),
            _ => None,
        }
    });
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    // `[budget]` keys are the kind's to judge (its phases), read from the file itself so
    // they are checked even when another common key is wrong.
    let budget_keys: Vec<Spanned<String>> = match doc.get("budget").map(|v| v.get_ref()) {
        Some(DeValue::Table(t)) => t
            .iter()
            .map(|(k, _)| Spanned::new(k.span(), k.get_ref().to_string()))
            .collect(),
        _ => Vec::new(),
    };
    let spec = kind.and_then(|kind| {
        let rest = Rest::new(rest_t, span);
        match ProbeSpec::from_kind(kind.get_ref(), kind.span(), rest, &dir, &budget_keys) {
            Ok(s) => Some(s),
            Err(errs) => {
                diags.extend(errs.into_iter().map(|e| src.err(e.located(&doc))));
                None
            }
        }
    });
    let Some(common) = common else {
        return Err(diags);
    };
    let name = common.name.get_ref().clone();
    let name_pos = line_col(&src.text, common.name.span().start);
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        diags.push(src.diag(
            Some(common.name.span()),
            format!("invalid probe name {name:?} (use letters, digits, '-', '_' and '.')"),
        ));
    }
    let interval = common
        .interval
        .as_ref()
        .map(|i| *i.get_ref())
        .unwrap_or(defaults.interval)
        .0;
    let own_timeout = common.timeout.as_ref().map(|t| t.get_ref().0);
    // A listen probe's own default deadline is known only from a spec that built.
    let kind_default = spec.as_ref().and_then(ProbeSpec::default_timeout);
    let timeout = match (own_timeout, kind_default) {
        (Some(t), _) => Some((t, false)),
        (None, Some(t)) => Some((t, true)),
        (None, None) => spec.is_some().then_some((defaults.timeout.0, false)),
    };
    check_probe_timing(
        &common,
        &common_errs,
        interval,
        timeout,
        defaults,
        &src,
        &mut diags,
    );
    if !diags.is_empty() {
        return Err(diags);
    }
    let (Some(spec), Some((timeout, _))) = (spec, timeout) else {
        return Err(diags);
    };
    Ok((
        ProbeConfig {
            name,
            file: path.to_path_buf(),
            dir,
            enabled: common.enabled,
            description: common.description,
            interval,
            timeout,
            retries: common
                .retries
                .map(|r| r.into_inner())
                .unwrap_or(defaults.retries),
            retry_delay: common.retry_delay.unwrap_or(defaults.retry_delay).0,
            jitter: common
                .jitter
                .map(|j| j.into_inner())
                .unwrap_or(defaults.jitter)
                .0,
            offset: common.offset.map(|o| o.into_inner().0),
            budget: common
                .budget
                .into_iter()
                .map(|(k, v)| (k.into_inner(), v))
                .collect(),
            spec,
        },
        name_pos,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_chars() {
        let t = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, t.find('=').unwrap()), (1, 3));
        let second_eq = t.rfind('=').unwrap();
        assert_eq!(line_col(t, second_eq), (2, 4));
    }
}
