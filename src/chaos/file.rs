//! Rehearsal files (`config/rehearsals/*.toml`, shape in CONFIG.md): parse (unknown keys
//! rejected) → validate against the loaded [`Config`] (probes, components and notifiers
//! exist; every mode fits its probes' kind and has its parameters) → the typed
//! [`Rehearsal`]. Every problem is a `file:line:col: message` [`Diagnostic`].
//!
//! Not here: running one (see `chaos::run`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::fault::Mode;
use crate::config::{
    duration::human, take_kind, Config, ConfigErrors, Diagnostic, Dur, Errors, Interp, Notifier,
    Source, SpanError,
};
use crate::incident::state::Status;
use crate::notify::NotifierConfig;

/// Longest a rehearsal's fault may last, and its settle time (a drill is not an outage).
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RehearsalFile {
    /// What the drill is called (shown in the report and the notifications).
    name: String,
    /// How long the fault lasts.
    duration: Spanned<Dur>,
    /// After the fault ends, how long to wait for the resolves.
    #[serde(default = "default_settle")]
    settle: Spanned<Dur>,
    /// The faults, each on a list of probes.
    #[serde(default, rename = "fault")]
    faults: Vec<FaultFile>,
    /// HTTP calls at the start and end (external chaos tools, the app's fault switch).
    #[serde(default, rename = "hook")]
    hooks: Vec<HookFile>,
    /// What must (or must not) happen, each with a deadline.
    #[serde(default, rename = "expect")]
    expects: Vec<ExpectFile>,
    /// Notifiers swapped for this rehearsal, read separately (same shape as `[notifier.X]`).
    #[serde(default, rename = "notify")]
    _notify: Option<serde::de::IgnoredAny>,
}

fn default_settle() -> Spanned<Dur> {
    Spanned::new(0..0, Dur::secs(300))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultFile {
    /// Probes that see the fault; the service itself is untouched.
    probes: Vec<Spanned<String>>,
    /// down | blackhole | latency | reset | http_status | ws_close | garble | stt_degraded.
    mode: Spanned<String>,
    /// `ws_close`: the close code (default 1011).
    code: Option<Spanned<u16>>,
    /// `ws_close`: the close reason.
    reason: Option<String>,
    /// `http_status`: the status that replaces the real one (default 503).
    status: Option<Spanned<u16>>,
    /// `http_status`: the body that replaces the real one.
    body: Option<String>,
    /// `latency`: added to every read.
    delay: Option<Spanned<Dur>>,
    /// `ws_close`: when in the session the server closes (default 1s).
    after: Option<Spanned<Dur>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HookFile {
    /// `start` or `end`.
    at: Spanned<String>,
    /// The URL called (`${ENV}` allowed).
    url: Spanned<Interp>,
    /// HTTP method (default POST).
    method: Option<Spanned<String>>,
    /// Request headers (`${ENV}` allowed in values).
    #[serde(default)]
    headers: BTreeMap<String, Interp>,
    /// Request body.
    body: Option<Interp>,
    /// Deadline for the whole call (default 10s).
    #[serde(default = "default_hook_timeout")]
    timeout: Spanned<Dur>,
}

fn default_hook_timeout() -> Spanned<Dur> {
    Spanned::new(0..0, Dur::secs(10))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectFile {
    /// status | opened | delivered | resolved | no_incident.
    event: Spanned<String>,
    /// The component the expectation is about.
    component: Option<Spanned<String>>,
    /// The notifier the expectation is about (`delivered`, `resolved`).
    notifier: Option<Spanned<String>>,
    /// `status`: the status the component must reach (or worse).
    status: Option<Spanned<String>>,
    /// Deadline from the fault's start (`resolved`: from its end).
    within: Option<Spanned<Dur>>,
}

/// One fault of a rehearsal, validated.
#[derive(Debug, Clone)]
pub struct Fault {
    pub probes: Vec<String>,
    pub mode: Mode,
}

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAt {
    Start,
    End,
}

/// One hook, validated.
#[derive(Debug, Clone)]
pub struct Hook {
    pub at: HookAt,
    pub url: String,
    pub method: Method,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    pub timeout: Duration,
}

/// What an expectation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Status,
    Opened,
    Delivered,
    Resolved,
    NoIncident,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Status => "status",
            Event::Opened => "opened",
            Event::Delivered => "delivered",
            Event::Resolved => "resolved",
            Event::NoIncident => "no_incident",
        }
    }
    fn parse(s: &str) -> Option<Event> {
        [
            Event::Status,
            Event::Opened,
            Event::Delivered,
            Event::Resolved,
            Event::NoIncident,
        ]
        .into_iter()
        .find(|e| e.as_str() == s)
    }
}

/// One expectation, validated.
#[derive(Debug, Clone)]
pub struct Expect {
    pub event: Event,
    pub component: Option<String>,
    pub notifier: Option<String>,
    pub status: Option<Status>,
    /// From the fault's start (`resolved`: from its end).
    pub within: Duration,
}

/// A validated rehearsal.
#[derive(Debug, Clone)]
pub struct Rehearsal {
    pub path: std::path::PathBuf,
    pub name: String,
    pub duration: Duration,
    pub settle: Duration,
    pub faults: Vec<Fault>,
    pub hooks: Vec<Hook>,
    pub expects: Vec<Expect>,
    /// Notifiers that replace the config's ones of the same name for this rehearsal.
    pub notify: Vec<Notifier>,
}

/// Read and validate a rehearsal file against `config`; no network is touched.
pub fn load(path: &Path, config: &Config) -> Result<Rehearsal, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            message: format!("cannot read rehearsal file: {e}"),
        }])
    })?;
    let src = Source {
        path: path.to_path_buf(),
        text,
    };
    parse(&src, config).map_err(|mut d| {
        d.sort_by_key(|a| (a.line, a.col));
        d.dedup();
        ConfigErrors(d)
    })
}

fn parse(src: &Source, config: &Config) -> Result<Rehearsal, Vec<Diagnostic>> {
    let doc = DeTable::parse(&src.text).map_err(|e| vec![src.err(e.into())])?;
    let f: RehearsalFile =
        toml::from_str(&src.text).map_err(|e| vec![src.err(SpanError::from(e))])?;
    let diags = std::cell::RefCell::new(Vec::new());
    let mut err = |span: std::ops::Range<usize>, msg: String| {
        diags.borrow_mut().push(src.diag(Some(span), msg))
    };
    let err_at = |e: SpanError| diags.borrow_mut().push(src.err(e));

    for (d, key) in [(&f.duration, "duration"), (&f.settle, "settle")] {
        if d.get_ref().0 > MAX_DURATION {
            err(
                d.span(),
                format!(
                    "{key} {} is longer than {}",
                    d.get_ref(),
                    human(MAX_DURATION)
                ),
            );
        }
    }
    if f.duration.get_ref().0.is_zero() {
        err(f.duration.span(), "duration must be longer than 0s".into());
    }

    // Notifier swaps first: expectations may name them.
    let mut notify = Vec::new();
    if let Some(v) = doc.get_ref().get("notify") {
        match v.get_ref() {
            DeValue::Table(t) => {
                for (name, body) in t.iter() {
                    let name = name.get_ref().to_string();
                    if !config.notifiers.iter().any(|n| n.name == name) {
                        err(
                            body.span(),
                            format!(
                                "notify.{name} swaps a notifier the config does not define (defined: {})",
                                names(config.notifiers.iter().map(|n| n.name.as_str()))
                            ),
                        );
                        continue;
                    }
                    let DeValue::Table(bt) = body.get_ref() else {
                        err(body.span(), format!("notify.{name} must be a table"));
                        continue;
                    };
                    let parsed = take_kind(bt, body.span()).map_err(Errors::from).and_then(
                        |(kind, rest)| NotifierConfig::from_kind(kind.get_ref(), kind.span(), rest),
                    );
                    match parsed {
                        Ok(config) => notify.push(Notifier { name, config }),
                        Err(errs) => errs.into_iter().for_each(|e| err_at(e.located_in(bt))),
                    }
                }
            }
            _ => err(v.span(), "notify must be a table of notifiers".into()),
        }
    }
    if f.faults.is_empty() && f.hooks.is_empty() {
        err(
            0..0,
            "a rehearsal needs at least one [[fault]] (or a [[hook]] that breaks something)".into(),
        );
    }
    let mut faults = Vec::new();
    for ff in &f.faults {
        let Some(mode) = fault_mode(ff, &mut err) else {
            continue;
        };
        if ff.probes.is_empty() {
            err(ff.mode.span(), "fault has no probes".into());
        }
        for p in &ff.probes {
            match config.probe(p.get_ref()) {
                None => err(
                    p.span(),
                    format!(
                        "unknown probe {:?} (not in the config's probe files)",
                        p.get_ref()
                    ),
                ),
                Some(pc) if !pc.enabled => err(
                    p.span(),
                    format!(
                        "probe {:?} is disabled: it never runs, so it cannot see a fault",
                        p.get_ref()
                    ),
                ),
                Some(pc) => {
                    if let Some(kinds) = mode.kinds().filter(|k| !k.contains(&pc.kind())) {
                        err(
                            p.span(),
                            format!(
                                "mode {} applies to {} probes; {:?} is a {} probe",
                                mode.name(),
                                kinds.join(" and "),
                                p.get_ref(),
                                pc.kind()
                            ),
                        );
                    }
                }
            }
        }
        faults.push(Fault {
            probes: ff.probes.iter().map(|p| p.get_ref().clone()).collect(),
            mode,
        });
    }

    let mut hooks = Vec::new();
    for h in &f.hooks {
        let at = match h.at.get_ref().as_str() {
            "start" => HookAt::Start,
            "end" => HookAt::End,
            other => {
                err(
                    h.at.span(),
                    format!("unknown hook time {other:?} (expected start or end)"),
                );
                continue;
            }
        };
        let url = h.url.get_ref().to_string();
        match url::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                err(
                    h.url.span(),
                    "hook url must be an http:// or https:// URL".into(),
                );
                continue;
            }
        }
        let method = match &h.method {
            None => Method::POST,
            Some(m) => match Method::from_bytes(m.get_ref().to_ascii_uppercase().as_bytes()) {
                Ok(m) => m,
                Err(_) => {
                    err(m.span(), format!("invalid HTTP method {:?}", m.get_ref()));
                    continue;
                }
            },
        };
        if h.timeout.get_ref().0.is_zero() {
            err(
                h.timeout.span(),
                "hook timeout must be longer than 0s".into(),
            );
        }
        hooks.push(Hook {
            at,
            url,
            method,
            headers: h
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            body: h.body.as_ref().map(|b| b.to_string()),
            timeout: h.timeout.get_ref().0,
        });
    }

    let default_within = f.duration.get_ref().0 + f.settle.get_ref().0;
    let mut expects = Vec::new();
    for e in &f.expects {
        let Some(event) = Event::parse(e.event.get_ref()) else {
            err(
                e.event.span(),
                format!(
                    "unknown event {:?} (expected status, opened, delivered, resolved, no_incident)",
                    e.event.get_ref()
                ),
            );
            continue;
        };
        let component = e.component.as_ref().and_then(|c| {
            if config
                .components
                .iter()
                .any(|k| k.name.get_ref() == c.get_ref())
            {
                Some(c.get_ref().clone())
            } else {
                err(
                    c.span(),
                    format!(
                        "unknown component {:?} (defined: {})",
                        c.get_ref(),
                        names(config.components.iter().map(|k| k.name.get_ref().as_str()))
                    ),
                );
                None
            }
        });
        let notifier = e.notifier.as_ref().and_then(|n| {
            if config.notifiers.iter().any(|k| &k.name == n.get_ref()) {
                Some(n.get_ref().clone())
            } else {
                err(
                    n.span(),
                    format!(
                        "unknown notifier {:?} (defined: {})",
                        n.get_ref(),
                        names(config.notifiers.iter().map(|k| k.name.as_str()))
                    ),
                );
                None
            }
        });
        let status = e.status.as_ref().and_then(|s| match Status::parse(s.get_ref()) {
            Some(Status::Operational) | Some(Status::Maintenance) | None => {
                err(
                    s.span(),
                    format!(
                        "status {:?} is not an incident status (expected degraded, partial_outage, major_outage)",
                        s.get_ref()
                    ),
                );
                None
            }
            st => st,
        });
        let missing = |what: &str| format!("a {} expectation needs `{what}`", event.as_str());
        let at = e.event.span();
        let ok = match event {
            Event::Status if e.component.is_none() => Err(missing("component")),
            Event::Status if e.status.is_none() => Err(missing("status")),
            Event::Opened | Event::NoIncident if e.component.is_none() => Err(missing("component")),
            Event::Delivered if e.notifier.is_none() => Err(missing("notifier")),
            Event::Resolved if e.notifier.is_none() && e.component.is_none() => {
                Err(missing("notifier or component"))
            }
            Event::Status | Event::Opened | Event::Delivered | Event::Resolved
                if e.within.is_none() =>
            {
                Err(missing("within"))
            }
            _ => Ok(()),
        };
        if let Err(m) = ok {
            err(at, m);
            continue;
        }
        if e.status.is_some() && event != Event::Status {
            err(
                at,
                format!(
                    "`status` only belongs to a status expectation, not {}",
                    event.as_str()
                ),
            );
        }
        let within = e.within.as_ref().map_or(default_within, |w| w.get_ref().0);
        if within > MAX_DURATION * 2 {
            if let Some(w) = &e.within {
                err(
                    w.span(),
                    format!(
                        "within {} is longer than {}",
                        human(within),
                        human(MAX_DURATION * 2)
                    ),
                );
            }
        }
        expects.push(Expect {
            event,
            component,
            notifier,
            status,
            within,
        });
    }
    if f.expects.is_empty() {
        err(
            0..0,
            "a rehearsal needs at least one [[expect]]: without one there is nothing to judge"
                .into(),
        );
    }

    let diags = diags.into_inner();
    if !diags.is_empty() {
        return Err(diags);
    }
    Ok(Rehearsal {
        path: src.path.clone(),
        name: f.name,
        duration: f.duration.get_ref().0,
        settle: f.settle.get_ref().0,
        faults,
        hooks,
        expects,
        notify,
    })
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = it.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// The mode and its parameters; parameters of another mode are errors.
fn fault_mode(
    ff: &FaultFile,
    err: &mut impl FnMut(std::ops::Range<usize>, String),
) -> Option<Mode> {
    let name = ff.mode.get_ref().as_str();
    let mode = match name {
        "down" => Mode::Down,
        "blackhole" => Mode::Blackhole,
        "reset" => Mode::Reset,
        "garble" => Mode::Garble,
        "stt_degraded" => Mode::SttDegraded,
        "latency" => match &ff.delay {
            Some(d) if !d.get_ref().0.is_zero() => Mode::Latency(d.get_ref().0),
            Some(d) => {
                err(d.span(), "delay must be longer than 0s".into());
                return None;
            }
            None => {
                err(
                    ff.mode.span(),
                    "mode latency needs `delay` (e.g. delay = \"2s\")".into(),
                );
                return None;
            }
        },
        "http_status" => {
            let status = ff.status.as_ref().map_or(503, |s| *s.get_ref());
            if !(100..=599).contains(&status) {
                if let Some(s) = &ff.status {
                    err(
                        s.span(),
                        format!("status {status} is not an HTTP status (100–599)"),
                    );
                }
                return None;
            }
            Mode::HttpStatus {
                status,
                body: ff.body.clone().unwrap_or_default(),
            }
        }
        "ws_close" => {
            let code = ff.code.as_ref().map_or(1011, |c| *c.get_ref());
            // Codes a server may put in a close frame (RFC 6455 §7.4).
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                if let Some(c) = &ff.code {
                    err(c.span(), format!("close code {code} may not be sent by a server (1000–1003, 1007–1014, 3000–4999)"));
                }
                return None;
            }
            Mode::WsClose {
                code,
                reason: ff.reason.clone().unwrap_or_default(),
                after: ff
                    .after
                    .as_ref()
                    .map_or(Duration::from_secs(1), |a| a.get_ref().0),
            }
        }
        other => {
            err(
                ff.mode.span(),
                format!("unknown fault mode {other:?} (expected {})", Mode::NAMES),
            );
            return None;
        }
    };
    let stray: Vec<(&str, Option<std::ops::Range<usize>>)> = vec![
        ("code", ff.code.as_ref().map(|c| c.span())),
        ("reason", ff.reason.as_ref().map(|_| ff.mode.span())),
        ("status", ff.status.as_ref().map(|c| c.span())),
        ("body", ff.body.as_ref().map(|_| ff.mode.span())),
        ("delay", ff.delay.as_ref().map(|c| c.span())),
        ("after", ff.after.as_ref().map(|c| c.span())),
    ];
    let allowed: &[&str] = match name {
        "ws_close" => &["code", "reason", "after"],
        "http_status" => &["status", "body"],
        "latency" => &["delay"],
        _ => &[],
    };
    for (key, span) in stray {
        if let (Some(span), false) = (span, allowed.contains(&key)) {
            err(span, format!("`{key}` is not a parameter of mode {name}"));
        }
    }
    Some(mode)
}
