//! Components and incidents: the [`Evaluator`] turns runs into component status and
//! incident transitions, and writes each transition, its timeline entry, the component's
//! state and its notification outbox rows in ONE transaction; the notifier dispatcher
//! delivers them afterwards. State survives restarts (it is read back from SQLite), so an
//! incident opened before a restart is updated and resolved after it.
//!
//! The rules themselves are pure functions in [`state`]; maintenance calendars are in
//! [`maintenance`]. Not here: delivering notifications (see `crate::notify`).

pub mod alerts;
pub mod maintenance;
pub mod read;
pub mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::store::db::{self, params, Conn};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Budget, Config, ProbeConfig};
use crate::control::{self, Command, CommandError, Origin, Window};
use crate::health::Beat;
use crate::metrics::Metrics;
use crate::notify::event::Event;
use crate::notify::{outbox, NotifierConfig};
use crate::pipeline::Shared;
use crate::probe::{ms, Outcome, RunResult};
use crate::store::Store;
pub use alerts::{Alert, AlertReport};
pub use maintenance::MaintenanceConfig;
pub use read::{list_incidents, render_incidents, IncidentView};
pub use state::{Cause, ComponentState, EventKind, Input, Rules, Status, Transition};

/// Schema of incidents, their timeline, component state, the notification outbox and
/// notifier references (migration 2 in `crate::store::MIGRATIONS`).
pub const MIGRATION: &str = "
CREATE TABLE incidents (
    id INTEGER PRIMARY KEY,
    component TEXT NOT NULL,
    status TEXT NOT NULL,
    worst_status TEXT NOT NULL,
    opened_at INTEGER NOT NULL,
    resolved_at INTEGER,
    flapping INTEGER NOT NULL DEFAULT 0,
    cause_member TEXT,
    cause_class TEXT,
    cause_message TEXT
);
CREATE INDEX incidents_component ON incidents(component, opened_at);
CREATE INDEX incidents_open ON incidents(resolved_at);
CREATE TABLE incident_events (
    id INTEGER PRIMARY KEY,
    component TEXT NOT NULL,
    incident_id INTEGER,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    from_status TEXT NOT NULL,
    to_status TEXT NOT NULL,
    member TEXT,
    error_class TEXT,
    message TEXT,
    note TEXT
);
CREATE INDEX incident_events_incident ON incident_events(incident_id, id);
CREATE TABLE component_state (
    component TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    incident_id INTEGER,
    state TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    notifier TEXT NOT NULL,
    component TEXT NOT NULL,
    incident_id INTEGER,
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error TEXT,
    finished_at INTEGER
);
CREATE INDEX outbox_pending ON outbox(notifier, status, id);
CREATE INDEX outbox_incident ON outbox(incident_id);
CREATE TABLE notifier_refs (
    notifier TEXT NOT NULL,
    incident_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (notifier, incident_id, key)
) WITHOUT ROWID;
";

/// Largest run detail blob kept for notifications (bytes of JSON).
const MAX_DETAILS: usize = 4096;

/// One component at run time.
struct Comp {
    name: String,
    rules: Rules,
    members: Vec<String>,
    /// Inbound alerts carrying all of these labels belong here.
    alert_labels: BTreeMap<String, String>,
    /// Status of a firing alert by its `severity` label.
    alert_severity: BTreeMap<String, Status>,
    state: ComponentState,
    notify: Vec<(String, NotifierConfig)>,
    budget_window_ms: i64,
    budget_min_samples: u64,
    /// The state as last written: a run that changes nothing writes nothing.
    saved: String,
    /// `burn_alert`: the objective, and when the burn was last judged.
    burn: Option<(crate::config::Objective, i64)>,
    /// Locations that must agree a member is bad (fleet mode).
    quorum: crate::config::Quorum,
}

/// A run and the location it was seen from (`None`: this agent's own).
#[derive(Debug)]
pub struct Located {
    pub run: RunResult,
    pub location: Option<String>,
}

/// The newest run of a member from one location.
#[derive(Debug, Clone)]
struct Sighting {
    outcome: Outcome,
    at: i64,
    error: Option<(String, String)>,
    /// A confirmation run (re-run at another location's request, fleet mode).
    confirmation: bool,
}

/// A timeline entry about locations that do not agree on a member.
struct LocationNote {
    component: String,
    /// The component's open incident, if any.
    incident: Option<i64>,
    status: &'static str,
    member: String,
    kind: &'static str,
    note: String,
}

/// The error-budget burn of a component is judged at most this often (its windows are
/// 5 minutes and longer).
const BURN_EVERY_MS: i64 = 5_000;

/// Consumes runs, keeps per-component state, opens/updates/resolves incidents.
pub struct Evaluator {
    config: Arc<Config>,
    store: Store,
    metrics: Metrics,
    comps: Vec<Comp>,
    /// Probe name → the components with a member of that probe (itself or a sub-check), so
    /// a run is matched against its components only, not against every member of every one.
    by_probe: HashMap<String, Vec<usize>>,
    next_id: i64,
    /// Maintenance windows started through the API that have not ended yet.
    windows: Vec<Window>,
    tick: Duration,
    reader: Option<Conn>,
    clock: Clock,
    bell: outbox::Bell,
    beat: Beat,
    /// A rehearsal on this agent: incidents opening on its components carry its run id.
    drill: crate::chaos::live::Drill,
    /// Per member, the newest run from each location that reported it recently.
    sightings: HashMap<String, BTreeMap<String, Sighting>>,
    /// Per (component, member), the disagreement of locations last put on the timeline
    /// (what each location sees), and whether a confirmation run was part of it.
    disagreements: HashMap<(usize, String), (String, bool)>,
}

/// Longest time the evaluator may go without progress before `/health` calls it wedged.
const STALE_AFTER: Duration = Duration::from_secs(30);

impl Evaluator {
    /// Build the evaluator and restore component state from the database.
    pub fn new(
        config: Arc<Config>,
        store: Store,
        metrics: Metrics,
        shared: &Shared,
    ) -> anyhow::Result<Self> {
        let reader = store.reader()?;
        let mut saved: HashMap<String, String> = HashMap::new();
        {
            let mut st = reader.prepare("SELECT component, state FROM component_state")?;
            let rows =
                st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (c, s) = row?;
                saved.insert(c, s);
            }
        }
        let max_id: i64 =
            reader.query_row("SELECT coalesce(max(id), 0) FROM incidents", [], |r| {
                r.get(0)
            })?;
        let windows = control::load_windows(&reader, shared.clock.now_ms())?;
        for w in &windows {
            tracing::info!(component = %w.component, window = w.id, ends_at = %crate::notify::event::iso(w.ends_at), "maintenance window started through the API still runs");
        }
        let mut comps = Vec::new();
        for c in &config.components {
            let name = c.name.get_ref().clone();
            let members: Vec<String> = c.probes.iter().map(|p| p.get_ref().clone()).collect();
            let stored = saved.remove(&name);
            let mut state = match stored
                .as_deref()
                .map(serde_json::from_str::<ComponentState>)
            {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    tracing::warn!(component = %name, error = %e, "stored component state unreadable; starting fresh");
                    ComponentState::new(&members)
                }
                None => ComponentState::new(&members),
            };
            state.sync_members(&members);
            if let Some(inc) = &state.incident {
                tracing::info!(component = %name, incident = inc.id, status = state.status.as_str(), "resuming open incident");
            }
            let notify = c
                .notify
                .iter()
                .filter_map(|n| config.notifiers.iter().find(|x| &x.name == n.get_ref()))
                .map(|n| (n.name.clone(), n.config.clone()))
                .collect();
            comps.push(Comp {
                name,
                rules: Rules {
                    failure_threshold: c.failure_threshold.max(1),
                    success_threshold: c.success_threshold.max(1),
                    recovery_ms: c.recovery.0.as_millis() as i64,
                    max_incidents_per_hour: c.max_incidents_per_hour,
                },
                members,
                alert_labels: c
                    .alert_labels
                    .as_ref()
                    .map(|l| l.get_ref().clone())
                    .unwrap_or_default(),
                alert_severity: c
                    .alert_severity
                    .iter()
                    .map(|(k, v)| (k.clone(), v.status()))
                    .collect(),
                state,
                notify,
                budget_window_ms: c.budget_window.0.as_millis() as i64,
                budget_min_samples: c.budget_min_samples,
                saved: stored.unwrap_or_default(),
                burn: c
                    .objective()
                    .filter(|_| c.burn_alert())
                    .map(|o| (o, i64::MIN)),
                quorum: c.quorum,
            });
        }
        for (name, s) in saved {
            if serde_json::from_str::<ComponentState>(&s)
                .map(|s| s.incident.is_some())
                .unwrap_or(false)
            {
                tracing::warn!(component = %name, "component removed from the config has an open incident; it stays open");
            }
        }
        // Recovery holds and maintenance windows are checked on a tick (runs are evaluated
        // as they arrive): at most 1 s late, finer for short holds, never busier than 20/s.
        let shortest = comps
            .iter()
            .map(|c| c.rules.recovery_ms)
            .min()
            .unwrap_or(100_000);
        let tick = Duration::from_millis((shortest / 100).clamp(50, 1000) as u64);
        let mut by_probe: HashMap<String, Vec<usize>> = HashMap::new();
        for (ci, c) in comps.iter().enumerate() {
            for m in &c.members {
                let probe = m.split('/').next().unwrap_or(m).to_string();
                let list = by_probe.entry(probe).or_default();
                if list.last() != Some(&ci) {
                    list.push(ci);
                }
            }
        }
        let ev = Evaluator {
            config,
            store,
            metrics,
            comps,
            by_probe,
            next_id: max_id + 1,
            windows,
            tick,
            reader: Some(reader),
            clock: shared.clock,
            bell: shared.bell.clone(),
            beat: shared.health.beat("evaluator", "evaluator", STALE_AFTER),
            drill: shared.drill.clone(),
            sightings: HashMap::new(),
            disagreements: HashMap::new(),
        };
        for i in 0..ev.comps.len() {
            ev.export(i);
        }
        Ok(ev)
    }

    /// Runs until `runs` closes (the scheduler has drained), or stops where it is when
    /// `force` is cancelled (the shutdown deadline passed). `commands` are the non-run
    /// inputs (the control API); each is answered once its effect is stored.
    pub async fn run(
        mut self,
        mut runs: mpsc::Receiver<Located>,
        commands: &mut mpsc::Receiver<Command>,
        force: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.beat.stamp();
            tokio::select! {
                biased;
                _ = force.cancelled() => {
                    tracing::warn!(pending = runs.len(), "shutdown deadline: evaluator stops with runs unevaluated");
                    return Ok(());
                }
                // Commands (API calls, inbound alerts) are few and a caller waits for each: they go
                // before a backlog of runs.
                Some(c) = commands.recv() => self.on_command(c).await,
                r = runs.recv() => match r {
                    Some(r) => self.on_run_from(&r.run, r.location.as_deref()).await,
                    None => break,
                },
                _ = tick.tick() => self.on_tick().await,
            }
        }
        if let Err(e) = self.store.flush().await {
            tracing::warn!(error = %format!("{e:#}"), "evaluator: final flush failed");
        }
        Ok(())
    }

    /// Feed one run of this agent (also usable directly, e.g. by rehearsals and tests).
    pub async fn on_run(&mut self, run: &RunResult) {
        self.on_run_from(run, None).await
    }

    /// Feed one run seen from `location` (`None`: this agent's). Each member input is judged
    /// by the component's location quorum first (see [`Evaluator::judge`]).
    pub async fn on_run_from(&mut self, run: &RunResult, location: Option<&str>) {
        let now = self.clock.now_ms();
        let at = run.started_at.timestamp_millis();
        let location = location.unwrap_or(&self.config.agent.location).to_string();
        // Locations that reported within two intervals count.
        let window = self
            .config
            .probe(&run.probe)
            .map_or(120_000, |p| 2 * p.interval.as_millis() as i64);
        let confirmation = crate::fleet::is_confirmation(run);
        let comps = self.by_probe.get(&run.probe).cloned().unwrap_or_default();
        let mut notes = Vec::new();
        for ci in comps {
            let inputs = member_inputs(&self.comps[ci].members, run, at);
            if inputs.is_empty() {
                continue;
            }
            let rules = self.comps[ci].rules;
            let first_note = notes.len();
            for i in inputs {
                let i = self.judge(ci, i, &location, confirmation, window, &mut notes);
                self.comps[ci].state.apply(&rules, i);
            }
            let budgeted: Vec<String> = match self.config.probe(&run.probe) {
                Some(p) => self.comps[ci]
                    .members
                    .iter()
                    .filter(|m| has_percentile_budget(p, m))
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            for member in budgeted {
                if let Some(input) = self.budget_input(ci, &run.probe, &member, now).await {
                    self.comps[ci].state.apply(&rules, input);
                }
            }
            if let Some(input) = self.burn_input(ci, now).await {
                self.comps[ci].state.apply(&rules, input);
            }
            let t = self.evaluate(ci, now);
            self.persist(ci, t, now).await;
            // The notes of this run go on the timeline of the incident as it is now (one a
            // confirmation across locations just opened, for one).
            let c = &self.comps[ci];
            for n in &mut notes[first_note..] {
                n.incident = c.state.incident.as_ref().map(|i| i.id);
                n.status = c.state.status.as_str();
            }
        }
        Self::write_notes(self.store.clone(), notes, now).await;
    }

    /// A member input judged by the locations that reported the member within `window`
    /// (fleet mode): bad only when the component's `quorum` of them see it bad (then as bad
    /// as the worst of them), else up. With one location this is the input itself. A bad
    /// judgement that counts a `confirmation` run seeing it bad (another location re-ran the
    /// probe at once when asked) is confirmed: the member is bad at once, without waiting for
    /// `failure_threshold`. When the locations disagree, agree again, or confirm a member
    /// bad, a note for the timeline is added to `notes`.
    fn judge(
        &mut self,
        ci: usize,
        input: Input,
        location: &str,
        confirmation: bool,
        window: i64,
        notes: &mut Vec<LocationNote>,
    ) -> Input {
        let Input::Run {
            member,
            outcome,
            at,
            error,
            details,
            ..
        } = input
        else {
            return input;
        };
        let seen = self.sightings.entry(member.clone()).or_default();
        seen.insert(
            location.to_string(),
            Sighting {
                outcome,
                at,
                error: error.clone(),
                confirmation,
            },
        );
        seen.retain(|_, s| s.at >= at - window);
        let reporting = seen.len();
        let worst = seen
            .iter()
            .filter(|(_, s)| s.outcome != Outcome::Up)
            .max_by_key(|(_, s)| s.outcome);
        let bad = seen.values().filter(|s| s.outcome != Outcome::Up).count();
        // What each location sees; `marked`: naming the confirmation runs.
        let views = |marked: bool| {
            let views: Vec<String> = seen
                .iter()
                .map(|(l, s)| {
                    let view = match &s.error {
                        Some((class, msg)) if s.outcome != Outcome::Up => format!(
                            "{l} sees it {} ({class}: {})",
                            s.outcome.as_str(),
                            crate::notify::event::truncate(msg, 120)
                        ),
                        _ => format!("{l} sees it {}", s.outcome.as_str()),
                    };
                    if marked && s.confirmation {
                        format!("{view} (confirmation re-run)")
                    } else {
                        view
                    }
                })
                .collect();
            views.join("; ")
        };
        // (the disagreement as noted, what it is): noted when what the locations see changes,
        // or when a confirmation run first takes part in it; not again when a scheduled run
        // sees the same afterwards.
        let disagreement = (bad > 0 && bad < reporting).then(|| {
            (
                format!("locations disagree on {member}: {}", views(true)),
                views(false),
            )
        });
        let quorum = bad >= self.comps[ci].quorum.needed(reporting);
        let confirmed = quorum
            && seen
                .values()
                .any(|s| s.confirmation && s.outcome != Outcome::Up);
        let confirm_note = (confirmed
            && self.comps[ci]
                .state
                .members
                .get(&member)
                .is_some_and(|m| m.level.is_none()))
        .then(|| {
            format!(
                "{member} confirmed bad across locations at once (failure_threshold not awaited): {}",
                views(true)
            )
        });
        let judged = match worst {
            Some((l, s)) if quorum => {
                if outcome != Outcome::Up {
                    Input::Run {
                        member: member.clone(),
                        outcome: s.outcome.max(outcome),
                        at,
                        error,
                        details,
                        confirmed,
                    }
                } else {
                    Input::Run {
                        member: member.clone(),
                        outcome: s.outcome,
                        at,
                        error: s
                            .error
                            .clone()
                            .map(|(c, m)| (c, format!("{m} (seen from {l})"))),
                        details: None,
                        confirmed,
                    }
                }
            }
            _ => Input::Run {
                member: member.clone(),
                outcome: Outcome::Up,
                at,
                error: None,
                details: None,
                confirmed: false,
            },
        };
        let key = (ci, member.clone());
        let note = match disagreement {
            Some((text, what))
                if self
                    .disagreements
                    .get(&key)
                    .is_none_or(|(w, re_run)| *w != what || (confirmation && !re_run)) =>
            {
                self.disagreements.insert(key, (what, confirmation));
                Some(("locations_disagree", text))
            }
            None if self.disagreements.remove(&key).is_some() => Some((
                "locations_agree",
                format!("locations agree again on {member}"),
            )),
            _ => None,
        };
        let confirm_note = confirm_note.map(|text| ("locations_confirm", text));
        for (kind, note) in note.into_iter().chain(confirm_note) {
            let c = &self.comps[ci];
            notes.push(LocationNote {
                component: c.name.clone(),
                incident: c.state.incident.as_ref().map(|i| i.id),
                status: c.state.status.as_str(),
                member: member.clone(),
                kind,
                note,
            });
        }
        judged
    }

    /// Put location notes on the timeline (of the component's open incident, if any).
    async fn write_notes(store: Store, notes: Vec<LocationNote>, now: i64) {
        if notes.is_empty() {
            return;
        }
        for n in &notes {
            tracing::info!(component = %n.component, member = %n.member, kind = n.kind, note = %n.note, "location view on the timeline");
        }
        let r = store
            .write(move |c| {
                for n in &notes {
                    c.execute(
                        "INSERT INTO incident_events (component, incident_id, at, kind, from_status, to_status, member, note)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
                        params![n.component, n.incident, now, n.kind, n.status, n.member, n.note],
                    )?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %format!("{e:#}"), "cannot store the locations' disagreement on the timeline");
        }
    }

    /// Apply inbound alerts to the components they belong to, evaluate each touched
    /// component once (a grouped payload makes at most one transition per component), and
    /// commit before answering.
    pub async fn on_alerts(&mut self, alerts: Vec<Alert>) -> Result<AlertReport, CommandError> {
        let now = self.clock.now_ms();
        let mut report = AlertReport {
            received: alerts.len(),
            ..AlertReport::default()
        };
        let mut touched = BTreeSet::new();
        let mut first_unmatched = None;
        for a in &alerts {
            let mut matched = false;
            for (ci, comp) in self.comps.iter_mut().enumerate() {
                if !a.belongs_to(&comp.name, &comp.alert_labels) {
                    continue;
                }
                matched = true;
                let status = a
                    .severity()
                    .and_then(|s| comp.alert_severity.get(s))
                    .copied()
                    .unwrap_or(Status::Degraded);
                let input = Input::Alert {
                    member: a.member(),
                    firing: a.firing,
                    status,
                    starts_at: a.starts_at.unwrap_or(now),
                    ends_at: a.ends_at.unwrap_or(now),
                    at: now,
                    cause: a.cause(),
                    details: Some(a.details()),
                };
                match comp.state.apply_alert(&comp.rules, input) {
                    state::AlertApplied::Applied => {
                        report.applied += 1;
                        touched.insert(ci);
                    }
                    state::AlertApplied::Stale => {
                        report.stale += 1;
                        tracing::info!(component = %comp.name, alert = %a.member(), firing = a.firing, "an older notification of an alert than one already seen; ignored");
                    }
                    state::AlertApplied::Full => {
                        report.dropped += 1;
                        tracing::warn!(component = %comp.name, alert = %a.member(), max = state::MAX_ALERT_MEMBERS, "the component tracks its maximum of firing alerts; this one is ignored");
                    }
                }
            }
            if !matched {
                if report.unmatched.is_empty() {
                    first_unmatched = Some(a);
                }
                report.unmatched.push(a.member());
            }
        }
        if let Some(a) = first_unmatched {
            // One line per payload, whatever the number of alerts in it.
            tracing::warn!(
                count = report.unmatched.len(), first = %a.member(), source = a.source.as_str(),
                labels = %crate::notify::event::truncate(&format!("{:?}", a.labels), 300),
                "inbound alerts match no component (no `component` label naming one, no component's alert_labels); ignored"
            );
        }
        for ci in touched {
            report.components.push(self.comps[ci].name.clone());
            let t = self.evaluate(ci, now);
            self.persist(ci, t, now).await;
        }
        self.store.flush().await.map_err(CommandError::Internal)?;
        Ok(report)
    }

    /// Judge a `burn_alert` component's error-budget burn over the multi-window rules (at
    /// most every [`BURN_EVERY_MS`]); blocking SQLite work on the evaluator's read connection.
    async fn burn_input(&mut self, ci: usize, now: i64) -> Option<Input> {
        let (objective, last) = self.comps[ci].burn?;
        if now.saturating_sub(last) < BURN_EVERY_MS {
            return None;
        }
        self.comps[ci].burn = Some((objective, now));
        let conn = match self.reader.take() {
            Some(c) => c,
            None => self.store.reader().ok()?,
        };
        let config = self.config.clone();
        let judged = tokio::task::spawn_blocking(move || {
            let r = match config.components.get(ci) {
                Some(comp) => burn_breach(&conn, comp, objective, now),
                None => Ok(None),
            };
            (conn, r)
        })
        .await;
        match judged {
            Ok((conn, Ok(breach))) => {
                self.reader = Some(conn);
                Some(Input::Burn { breach })
            }
            Ok((_, Err(e))) => {
                tracing::warn!(component = %self.comps[ci].name, error = %e, "cannot count runs for the error-budget burn");
                None
            }
            Err(e) => {
                tracing::warn!(component = %self.comps[ci].name, error = %e, "error-budget burn judgement failed");
                None
            }
        }
    }

    /// Time passing: recovery holds, maintenance windows, error-budget burns.
    pub async fn on_tick(&mut self) {
        let now = self.clock.now_ms();
        self.windows.retain(|w| w.ends_at > now);
        for ci in 0..self.comps.len() {
            // A burn also stops (or starts) as time passes, not only when a run arrives.
            if let Some(input) = self.burn_input(ci, now).await {
                let rules = self.comps[ci].rules;
                self.comps[ci].state.apply(&rules, input);
            }
            if let Some(t) = self.evaluate(ci, now) {
                self.persist(ci, Some(t), now).await;
            }
        }
    }

    /// The reason of a maintenance window (configured or started through the API) active
    /// for component `ci` at `now`.
    fn maintenance_reason(&self, ci: usize, now: i64) -> Option<String> {
        let name = &self.comps[ci].name;
        let now_dt = chrono::DateTime::from_timestamp_millis(now).unwrap_or_default();
        maintenance::active_reason(&self.config.maintenance, name, now_dt)
            .or_else(|| {
                self.windows
                    .iter()
                    .find(|w| &w.component == name && w.active(now))
                    .map(|w| w.reason.as_str())
            })
            .map(str::to_string)
    }

    fn evaluate(&mut self, ci: usize, now: i64) -> Option<Transition> {
        let reason = self.maintenance_reason(ci, now);
        let next_id = &mut self.next_id;
        let comp = &mut self.comps[ci];
        let mut t = comp
            .state
            .evaluate(&comp.rules, now, reason.as_deref(), &mut || {
                let id = *next_id;
                *next_id += 1;
                id
            })?;
        if t.kind == EventKind::Opened {
            if let Some(id) = self.drill.id_for(&comp.name) {
                for inc in [comp.state.incident.as_mut(), t.incident.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    inc.rehearsal = Some(id.clone());
                }
            }
        }
        Some(t)
    }

    /// Judge a probe's latency budgets (p50/p95/p99 of each phase over the component's
    /// budget window, with a minimum sample count). The histogram read is blocking SQLite
    /// work, so it runs on a blocking thread with the evaluator's read connection.
    async fn budget_input(
        &mut self,
        ci: usize,
        probe: &str,
        member: &str,
        now: i64,
    ) -> Option<Input> {
        let conn = match self.reader.take() {
            Some(c) => c,
            None => self.store.reader().ok()?,
        };
        let comp = &self.comps[ci];
        let (window, min) = (comp.budget_window_ms, comp.budget_min_samples);
        let (config, name, m) = (self.config.clone(), probe.to_string(), member.to_string());
        let judged = tokio::task::spawn_blocking(move || {
            let r = match config.probe(&name) {
                Some(p) => budget_breach(&conn, p, &m, window, min, now),
                None => Ok(None),
            };
            (conn, r)
        })
        .await;
        match judged {
            Ok((conn, Ok(breach))) => {
                self.reader = Some(conn);
                Some(Input::Budget {
                    member: member.to_string(),
                    at: now,
                    breach,
                })
            }
            Ok((_, Err(e))) => {
                tracing::warn!(probe, error = %e, "cannot read histograms for the latency budget");
                None
            }
            Err(e) => {
                tracing::warn!(probe, error = %e, "latency budget judgement failed");
                None
            }
        }
    }

    async fn persist(&mut self, ci: usize, t: Option<Transition>, now: i64) {
        let comp = &self.comps[ci];
        let state_json = match serde_json::to_string(&comp.state) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(component = %comp.name, error = %e, "cannot encode component state");
                return;
            }
        };
        if t.is_none() && state_json == comp.saved {
            return;
        }
        let name = comp.name.clone();
        let status = comp.state.status;
        let open_id = comp.state.incident.as_ref().map(|i| i.id);
        let mut rows: Vec<(String, Event)> = Vec::new();
        let tr = t.map(|t| {
            let details = t
                .cause
                .as_ref()
                .and_then(|c| comp.state.members.get(&c.member))
                .and_then(|m| m.last_details.clone());
            let ev = Event {
                kind: t.kind,
                component: name.clone(),
                status: t.to,
                previous: t.from,
                incident_id: t.incident.as_ref().map(|i| i.id),
                opened_at: t.incident.as_ref().map(|i| i.opened_at),
                at: now,
                flapping: t.incident.as_ref().is_some_and(|i| i.flapping),
                cause: t.cause.clone(),
                note: t.note.clone(),
                location: self.config.agent.location.clone(),
                details,
                test: false,
                installation: None,
                rehearsal: self
                    .config
                    .agent
                    .rehearsal
                    .clone()
                    .or_else(|| t.incident.as_ref().and_then(|i| i.rehearsal.clone())),
            };
            if t.notify {
                for (n, cfg) in &comp.notify {
                    if cfg.accepts(&ev) {
                        rows.push((n.clone(), ev.clone()));
                    }
                }
            }
            (t, ev)
        });
        if let Some((t, ev)) = &tr {
            tracing::info!(
                component = %name, event = t.kind.as_str(), from = t.from.as_str(), to = t.to.as_str(),
                incident = ev.incident_id, member = t.cause.as_ref().map(|c| c.member.as_str()),
                notifications = rows.len(), "component status changed"
            );
            if t.kind == EventKind::Opened {
                self.metrics.incidents_opened.with([&name]).inc();
            }
        }
        let has_transition = tr.is_some();
        let written = state_json.clone();
        let r = self
            .store
            .write(move |conn| {
                if let Some((t, ev)) = &tr {
                    write_transition(conn, &name, t, ev)?;
                    for (n, ev) in &rows {
                        outbox::enqueue(conn, n, ev, now)?;
                    }
                }
                conn.execute(
                    "INSERT INTO component_state (component, status, incident_id, state, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (component) DO UPDATE SET status = excluded.status, incident_id = excluded.incident_id,
                     state = excluded.state, updated_at = excluded.updated_at",
                    params![name, status.as_str(), open_id, state_json, now],
                )?;
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(component = %self.comps[ci].name, error = %format!("{e:#}"), "cannot store the component's state");
            return;
        }
        self.comps[ci].saved = written;
        if has_transition {
            // Make the rows visible to the dispatcher's readers before ringing.
            if let Err(e) = self.store.flush().await {
                tracing::error!(error = %format!("{e:#}"), "cannot commit the transition");
            }
            self.bell.ring();
            self.export(ci);
        }
    }

    /// One command of the control API (also usable directly by tests and rehearsals).
    pub async fn on_command(&mut self, c: Command) {
        match c {
            Command::StartMaintenance {
                component,
                duration,
                origin,
                reply,
            } => {
                let r = self.start_maintenance(&component, duration, &origin).await;
                let _ = reply.send(r);
            }
            Command::EndMaintenance { id, origin, reply } => {
                let r = self.end_maintenance(id, &origin).await;
                let _ = reply.send(r);
            }
            Command::Resolve {
                incident,
                origin,
                reply,
            } => {
                let r = self.resolve_by_hand(incident, &origin).await;
                let _ = reply.send(r);
            }
            Command::Alerts { alerts, reply } => {
                let r = self.on_alerts(alerts).await;
                let _ = reply.send(r);
            }
        }
    }

    fn component_index(&self, name: &str) -> Result<usize, CommandError> {
        self.comps
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.comps.iter().map(|c| c.name.as_str()).collect();
                CommandError::NotFound(format!(
                    "no component named {name:?} (defined: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })
    }

    async fn start_maintenance(
        &mut self,
        component: &str,
        duration: Duration,
        origin: &Origin,
    ) -> Result<Window, CommandError> {
        let ci = self.component_index(component)?;
        if duration.is_zero() || duration > control::MAX_MAINTENANCE {
            return Err(CommandError::Invalid(
                "duration must be between 1s and 7d".into(),
            ));
        }
        let now = self.clock.now_ms();
        let reason = if origin.reason.trim().is_empty() {
            "maintenance".to_string()
        } else {
            crate::notify::event::truncate(origin.reason.trim(), 500)
        };
        let mut w = Window {
            id: 0,
            component: component.to_string(),
            starts_at: now,
            ends_at: now.saturating_add(duration.as_millis() as i64),
            reason,
        };
        let row = w.clone();
        w.id = self
            .store
            .write(move |c| {
                c.query_row(
                    "INSERT INTO maintenance_windows (component, starts_at, ends_at, reason) VALUES (?1, ?2, ?3, ?4)
                     RETURNING id",
                    params![row.component, row.starts_at, row.ends_at, row.reason],
                    |r| r.get(0),
                )
            })
            .await
            .map_err(CommandError::Internal)?;
        tracing::info!(component, window = w.id, what = "maintenance start", until = %crate::notify::event::iso(w.ends_at), who = %origin.who, reason = %w.reason, "maintenance window started by the API");
        self.windows.push(w.clone());
        self.after_window_change(ci, EventKind::MaintenanceStarted, &w, now)
            .await;
        Ok(w)
    }

    async fn end_maintenance(&mut self, id: i64, origin: &Origin) -> Result<Window, CommandError> {
        let now = self.clock.now_ms();
        let Some(i) = self
            .windows
            .iter()
            .position(|w| w.id == id && w.ends_at > now)
        else {
            return Err(CommandError::NotFound(format!(
                "no running maintenance window {id}"
            )));
        };
        self.store
            .write(move |c| {
                c.execute(
                    "UPDATE maintenance_windows SET ends_at = ?2, ended_early = 1 WHERE id = ?1",
                    params![id, now],
                )
            })
            .await
            .map_err(CommandError::Internal)?;
        let mut w = self.windows.remove(i);
        w.ends_at = now;
        tracing::info!(component = %w.component, window = id, what = "maintenance end", who = %origin.who, "maintenance window ended by the API");
        if let Ok(ci) = self.component_index(&w.component) {
            self.after_window_change(ci, EventKind::MaintenanceEnded, &w, now)
                .await;
        }
        Ok(w)
    }

    /// After a window started or ended: evaluate the component now (its status follows at
    /// once); with an incident open, which maintenance does not touch, the change goes on
    /// the incident's timeline instead.
    async fn after_window_change(&mut self, ci: usize, kind: EventKind, w: &Window, now: i64) {
        if let Some(inc) = self.comps[ci].state.incident.clone() {
            let status = self.comps[ci].state.status;
            let note = match kind {
                EventKind::MaintenanceStarted => format!(
                    "maintenance window {} started until {}: {}",
                    w.id,
                    crate::notify::event::iso(w.ends_at),
                    w.reason
                ),
                _ => format!("maintenance window {} ended: {}", w.id, w.reason),
            };
            let component = w.component.clone();
            let r = self
                .store
                .write(move |c| {
                    c.execute(
                        "INSERT INTO incident_events (component, incident_id, at, kind, from_status, to_status, note)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
                        params![component, inc.id, now, kind.as_str(), status.as_str(), note],
                    )
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %format!("{e:#}"), "cannot store the maintenance timeline entry");
            }
        }
        let t = self.evaluate(ci, now);
        self.persist(ci, t, now).await;
    }

    async fn resolve_by_hand(&mut self, id: i64, origin: &Origin) -> Result<(), CommandError> {
        let Some(ci) = self
            .comps
            .iter()
            .position(|c| c.state.incident.as_ref().is_some_and(|i| i.id == id))
        else {
            return Err(CommandError::NotFound(format!(
                "no open incident {id} (resolved already, or not one of this agent's components)"
            )));
        };
        let reason = crate::notify::event::truncate(origin.reason.trim(), 500);
        let note = if reason.is_empty() {
            "resolved by hand".to_string()
        } else {
            format!("resolved by hand: {reason}")
        };
        let now = self.clock.now_ms();
        let t = self.comps[ci].state.resolve_by_hand(note);
        tracing::info!(component = %self.comps[ci].name, incident = id, what = "resolve", who = %origin.who, reason = %reason, "incident resolved by the API");
        self.persist(ci, t, now).await;
        // A maintenance window may be running: the status follows it at once.
        if let Some(t) = self.evaluate(ci, now) {
            self.persist(ci, Some(t), now).await;
        }
        Ok(())
    }

    fn export(&self, ci: usize) {
        let c = &self.comps[ci];
        for s in Status::ALL {
            let v = if c.state.status == s { 1.0 } else { 0.0 };
            self.metrics
                .component_status
                .with([&c.name, s.as_str()])
                .set(v);
        }
        let open = if c.state.incident.is_some() { 1.0 } else { 0.0 };
        self.metrics.incident_open.with([&c.name]).set(open);
    }

    /// Current status of each component (for the API and dashboard).
    pub fn statuses(&self) -> Vec<(String, Status)> {
        self.comps
            .iter()
            .map(|c| (c.name.clone(), c.state.status))
            .collect()
    }
}

/// The inputs a run gives to a component's members: the probe itself, and its sub-checks
/// (a sub-check missing from a failed run counts as failed with the run's error).
fn member_inputs(members: &[String], run: &RunResult, at: i64) -> Vec<Input> {
    let mut out = Vec::new();
    for m in members {
        if m == &run.probe {
            out.push(Input::Run {
                member: m.clone(),
                outcome: run.outcome,
                at,
                error: run
                    .error
                    .as_ref()
                    .map(|e| (e.class.to_string(), e.message.clone())),
                details: run_details(run),
                confirmed: false,
            });
        } else if m
            .strip_prefix(run.probe.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
        {
            match run.subchecks.iter().find(|s| &s.series == m) {
                Some(s) => out.push(Input::Run {
                    member: m.clone(),
                    outcome: s.outcome,
                    at,
                    error: s
                        .error
                        .as_ref()
                        .map(|e| (e.class.to_string(), e.message.clone())),
                    details: s.latency.map(|l| json!({"latency_ms": ms(l)})),
                    confirmed: false,
                }),
                None if run.outcome != Outcome::Up => out.push(Input::Run {
                    member: m.clone(),
                    outcome: run.outcome,
                    at,
                    error: run.error.as_ref().map(|e| {
                        (
                            e.class.to_string(),
                            format!("{} (sub-check not reported)", e.message),
                        )
                    }),
                    details: run_details(run),
                    confirmed: false,
                }),
                None => {}
            }
        }
    }
    out
}

/// Phases and details of a run, for notifications; bounded.
fn run_details(run: &RunResult) -> Option<Value> {
    if run.outcome == Outcome::Up {
        return None;
    }
    let phases: serde_json::Map<String, Value> = run
        .phases
        .iter()
        .map(|(n, d)| (n.clone(), json!(ms(*d))))
        .collect();
    let mut v = json!({"probe": run.probe, "duration_ms": ms(run.duration), "phases": phases, "details": run.details});
    if v.to_string().len() > MAX_DETAILS {
        v["details"] = json!("(omitted: too large)");
    }
    Some(v)
}

/// A fast burn of `comp`'s error budget at `now` (multi-window, multi-burn-rate), if any.
pub fn burn_breach(
    conn: &Conn,
    comp: &crate::config::ComponentConfig,
    objective: crate::config::Objective,
    now: i64,
) -> db::Result<Option<state::BurnBreach>> {
    let verdict = crate::slo::component_burn(conn, comp, objective, now)?;
    Ok(verdict.map(|(level, message)| state::BurnBreach {
        level: match level {
            crate::slo::BurnLevel::Page => state::Level::Down,
            crate::slo::BurnLevel::Warn => state::Level::Degraded,
        },
        cause: Cause {
            member: comp.name.get_ref().clone(),
            class: "error_budget_burn".into(),
            message,
        },
    }))
}

/// The percentile budgets of one series of `probe` (the probe itself, or a sub-check named
/// by a `[budget]` key): (phase, budget).
fn member_budgets<'p>(probe: &'p ProbeConfig, member: &str) -> Vec<(&'p str, &'p Budget)> {
    let percentiles = |b: &Budget| b.p50.is_some() || b.p95.is_some() || b.p99.is_some();
    if member == probe.name {
        return probe
            .budget
            .iter()
            .filter(|(phase, b)| percentiles(b) && probe.series_budget(member, phase).is_some())
            .map(|(phase, b)| (phase.as_str(), b))
            .collect();
    }
    probe
        .series_budget(member, "latency")
        .filter(|b| percentiles(b))
        .map(|b| vec![("latency", b)])
        .unwrap_or_default()
}

fn has_percentile_budget(probe: &ProbeConfig, member: &str) -> bool {
    (member == probe.name || member.starts_with(&format!("{}/", probe.name)))
        && !member_budgets(probe, member).is_empty()
}

/// A latency-budget breach of `member` (`probe` itself or one of its sub-checks) over
/// `[now - window, now]`, if any.
pub fn budget_breach(
    conn: &Conn,
    probe: &ProbeConfig,
    member: &str,
    window_ms: i64,
    min_samples: u64,
    now: i64,
) -> db::Result<Option<Cause>> {
    for (phase, b) in member_budgets(probe, member) {
        let limits = [
            ("p50", 50.0, b.p50),
            ("p95", 95.0, b.p95),
            ("p99", 99.0, b.p99),
        ];
        if limits.iter().all(|l| l.2.is_none()) {
            continue;
        }
        let h =
            crate::store::hist::series_window(conn, member, phase, now - window_ms, now + 60_000)?;
        if h.len() < min_samples.max(1) {
            continue;
        }
        for (label, q, limit) in limits {
            let Some(limit) = limit else { continue };
            let v_us = h.value_at_percentile(q);
            if v_us > limit.0.as_micros() as u64 {
                return Ok(Some(Cause {
                    member: member.to_string(),
                    class: "latency_budget".into(),
                    message: format!(
                        "{label} of {phase} is {} over its {} budget (last {}, {} runs)",
                        human_ms_us(v_us),
                        crate::config::duration::human(limit.0),
                        crate::config::duration::human(Duration::from_millis(
                            window_ms.max(0) as u64
                        )),
                        h.len()
                    ),
                }));
            }
        }
    }
    Ok(None)
}

fn human_ms_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{:.1}ms", us as f64 / 1000.0)
    }
}

fn write_transition(conn: &Conn, component: &str, t: &Transition, ev: &Event) -> db::Result<()> {
    let (member, class, message) = match &t.cause {
        Some(c) => (
            Some(c.member.as_str()),
            Some(c.class.as_str()),
            Some(c.message.as_str()),
        ),
        None => (None, None, None),
    };
    let inc = t.incident.as_ref();
    let flapping = inc.is_some_and(|i| i.flapping);
    match (t.kind, inc) {
        (EventKind::Opened, Some(i)) => {
            conn.execute(
                "INSERT INTO incidents (id, component, status, worst_status, opened_at, flapping, cause_member, cause_class, cause_message, rehearsal)
                 VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![i.id, component, t.to.as_str(), i.opened_at, flapping, member, class, message, ev.rehearsal],
            )?;
        }
        (EventKind::Escalated | EventKind::Deescalated, Some(i)) => {
            conn.execute(
                "UPDATE incidents SET status = ?2, flapping = ?4,
                   worst_status = CASE WHEN ?3 > (CASE worst_status WHEN 'major_outage' THEN 3 WHEN 'partial_outage' THEN 2
                                                  WHEN 'degraded' THEN 1 ELSE 0 END) THEN ?2 ELSE worst_status END
                 WHERE id = ?1",
                params![i.id, t.to.as_str(), t.to.severity(), flapping],
            )?;
        }
        (EventKind::Resolved, Some(i)) => {
            conn.execute(
                "UPDATE incidents SET status = 'resolved', resolved_at = ?2, flapping = ?3 WHERE id = ?1",
                params![i.id, ev.at, flapping],
            )?;
        }
        _ => {}
    }
    conn.execute(
        "INSERT INTO incident_events (component, incident_id, at, kind, from_status, to_status, member, error_class, message, note)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![component, inc.map(|i| i.id), ev.at, t.kind.as_str(), t.from.as_str(), t.to.as_str(), member, class, message, t.note],
    )?;
    Ok(())
}

/// What one retention pass of the incident tables removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneStats {
    pub outbox: usize,
    pub events: usize,
    pub refs: usize,
}

/// Retention of the incident tables: finished (delivered or dead) outbox rows, the timeline
/// of incidents resolved before `before_ms` (and component events not tied to an incident),
/// and notifier references nothing can need any more: those of incidents resolved before
/// the cutoff with no notification still pending, and the per-delivery steps of outbox rows
/// that are no longer pending. Open incidents keep everything; incident rows themselves are
/// kept (they are small and make the history).
pub fn prune(conn: &Conn, before_ms: i64) -> db::Result<PruneStats> {
    let outbox = outbox::prune(conn, before_ms)?;
    let events = conn.execute(
        "DELETE FROM incident_events WHERE at < ?1 AND (incident_id IS NULL OR incident_id IN
           (SELECT id FROM incidents WHERE resolved_at IS NOT NULL AND resolved_at < ?1))",
        [before_ms],
    )?;
    let refs = conn.execute(
        "DELETE FROM notifier_refs WHERE created_at < ?1 AND (
           (incident_id > 0
             AND incident_id IN (SELECT id FROM incidents WHERE resolved_at IS NOT NULL AND resolved_at < ?1)
             AND incident_id NOT IN (SELECT incident_id FROM outbox WHERE status = 'pending' AND incident_id IS NOT NULL))
           OR (incident_id < 0 AND -incident_id NOT IN (SELECT id FROM outbox WHERE status = 'pending')))",
        [before_ms],
    )?;
    Ok(PruneStats {
        outbox,
        events,
        refs,
    })
}
