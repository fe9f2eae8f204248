//! The per-component state machine, as pure functions of (state, input, `now`): member
//! streaks, the component status they add up to, and the incident transitions that follow
//! (open, escalate, de-escalate, hold while flapping, resolve, maintenance). No I/O and no
//! clock here, so every rule is tested table-driven without sleeping.
//!
//! Not here: storage and notification (see the parent module) or maintenance calendars
//! (see `maintenance`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::probe::Outcome;

/// Milliseconds in an hour: the flap-damping window.
pub const HOUR_MS: i64 = 3_600_000;

/// What a status page shows for a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Operational,
    Maintenance,
    Degraded,
    PartialOutage,
    MajorOutage,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Operational,
        Status::Maintenance,
        Status::Degraded,
        Status::PartialOutage,
        Status::MajorOutage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Operational => "operational",
            Status::Maintenance => "maintenance",
            Status::Degraded => "degraded",
            Status::PartialOutage => "partial_outage",
            Status::MajorOutage => "major_outage",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// How bad it is: 0 operational/maintenance · 1 degraded · 2 partial · 3 major.
    pub fn severity(self) -> u8 {
        match self {
            Status::Operational | Status::Maintenance => 0,
            Status::Degraded => 1,
            Status::PartialOutage => 2,
            Status::MajorOutage => 3,
        }
    }

    /// Words for people: "major outage".
    pub fn human(self) -> &'static str {
        match self {
            Status::Operational => "operational",
            Status::Maintenance => "under maintenance",
            Status::Degraded => "degraded",
            Status::PartialOutage => "partial outage",
            Status::MajorOutage => "major outage",
        }
    }
}

/// What a transition is, as notifiers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Opened,
    Escalated,
    Deescalated,
    Resolved,
    MaintenanceStarted,
    MaintenanceEnded,
    /// `watchpost notify-test`.
    Test,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Opened => "opened",
            EventKind::Escalated => "escalated",
            EventKind::Deescalated => "deescalated",
            EventKind::Resolved => "resolved",
            EventKind::MaintenanceStarted => "maintenance_started",
            EventKind::MaintenanceEnded => "maintenance_ended",
            EventKind::Test => "test",
        }
    }
}

/// The member and error behind a status: `listen-deepgram`, `ws_closed`, a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    pub member: String,
    pub class: String,
    pub message: String,
}

/// A confirmed bad member's level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Degraded,
    Down,
}

/// Streaks and last error of one member series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberState {
    /// Consecutive bad (degraded or down) runs.
    pub bad_streak: u32,
    /// Consecutive up runs.
    pub good_streak: u32,
    /// Set once `bad_streak` reached the failure threshold; cleared after `success_threshold`
    /// good runs.
    pub level: Option<Level>,
    /// Start of the newest bad run (ms since the epoch).
    pub last_bad_at: Option<i64>,
    /// Error of the newest bad run.
    pub last_error: Option<Cause>,
    /// Phases and details of the newest bad run (for notifications).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_details: Option<Value>,
    /// An active latency-budget breach.
    pub budget: Option<Cause>,
    /// Set for a member that is an inbound alert (`alert:<alertname>/<fingerprint>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertMember>,
}

/// Prefix of the members that are inbound alerts (probe names cannot contain `:`).
pub const ALERT_PREFIX: &str = "alert:";

/// What an inbound-alert member remembers between notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertMember {
    /// The component status this alert asks for while it fires (from its severity).
    pub status: Status,
    /// `startsAt` of the newest firing seen (ms since the epoch).
    pub starts_at: i64,
    /// When it ended, once a resolve came (ms): a firing that started before this is an
    /// old notification arriving late, and is ignored.
    pub ended_at: Option<i64>,
}

/// The incident a component is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenIncident {
    pub id: i64,
    pub opened_at: i64,
    /// The component opened too often within an hour: it stays in this incident.
    pub flapping: bool,
    /// Clear, but held open because of flapping.
    pub held: bool,
    /// Opened during a rehearsal on the live agent: its run id, which marks every
    /// notification of this incident (`[REHEARSAL]`, dedup keys apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rehearsal: Option<String>,
}

/// Thresholds of one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub recovery_ms: i64,
    pub max_incidents_per_hour: u32,
}

/// One input to a component.
#[derive(Debug, Clone)]
pub enum Input {
    /// A run of a member series.
    Run {
        member: String,
        outcome: Outcome,
        at: i64,
        error: Option<(String, String)>,
        details: Option<Value>,
        /// Confirmed across locations (fleet mode): a bad run counted by the location quorum
        /// together with another location's confirmation run that sees it bad too. The member
        /// is confirmed bad at once, without waiting for `failure_threshold` runs.
        confirmed: bool,
    },
    /// A latency-budget verdict for a member (`None`: within budget or too few samples).
    Budget {
        member: String,
        at: i64,
        breach: Option<Cause>,
    },
    /// An inbound alert (member `alert:<alertname>/<fingerprint>`, created on first sight):
    /// firing makes the member bad at once at `status`, resolved makes it good. The source
    /// (Alertmanager, Grafana) already confirmed it, so no failure/success threshold applies.
    Alert {
        member: String,
        /// Firing (`true`) or resolved.
        firing: bool,
        /// The component status it asks for while firing.
        status: Status,
        /// The alert's `startsAt` (ms).
        starts_at: i64,
        /// When it ended (resolves; ms, at most `at`).
        ends_at: i64,
        /// When it arrived (ms).
        at: i64,
        cause: Cause,
        details: Option<Value>,
    },
    /// The error-budget burn verdict of the component (`None`: not burning fast).
    Burn { breach: Option<BurnBreach> },
}

/// A fast error-budget burn: `Down` pages (major outage), `Degraded` warns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurnBreach {
    pub level: Level,
    pub cause: Cause,
}

/// What applying an [`Input::Alert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertApplied {
    /// The member changed (or was refreshed by a repeat of the same firing).
    Applied,
    /// An older notification than the one already seen (a firing that started before the
    /// member's last resolve, or a resolve of an earlier firing): ignored.
    Stale,
    /// The component already tracks [`MAX_ALERT_MEMBERS`] firing alerts: ignored.
    Full,
}

/// Most alert members one component keeps (resolved ones are forgotten first).
pub const MAX_ALERT_MEMBERS: usize = 256;

/// A resolved alert member is kept this long (at least the recovery hold), so that a late,
/// out-of-order firing of the same alert is recognised as old.
pub const ALERT_MEMORY_MS: i64 = 6 * HOUR_MS;

/// A status change the evaluator stores and (when `notify`) sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub kind: EventKind,
    pub from: Status,
    pub to: Status,
    /// The incident this belongs to (the resolved one for `Resolved`).
    pub incident: Option<OpenIncident>,
    pub cause: Option<Cause>,
    pub note: Option<String>,
    /// False for timeline-only entries (e.g. a flapping component failing again at the same
    /// status).
    pub notify: bool,
}

/// Everything the evaluator knows about one component; persisted as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ComponentState {
    /// The published status.
    pub status: Status,
    pub incident: Option<OpenIncident>,
    pub members: BTreeMap<String, MemberState>,
    /// When incidents opened (or a flapping incident failed again) in the last hour.
    pub opens: Vec<i64>,
    /// A fast burn of the error budget (`burn_alert`), while it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burn: Option<BurnBreach>,
}

impl ComponentState {
    pub fn new(members: &[String]) -> Self {
        let mut s = ComponentState::default();
        s.sync_members(members);
        s
    }

    /// Keep exactly the configured members (config may have changed since the state was saved).
    pub fn sync_members(&mut self, members: &[String]) {
        self.members
            .retain(|k, _| members.contains(k) || k.starts_with(ALERT_PREFIX));
        for m in members {
            self.members.entry(m.clone()).or_default();
        }
    }

    /// Newest bad run of any member.
    pub fn last_bad_at(&self) -> Option<i64> {
        self.members.values().filter_map(|m| m.last_bad_at).max()
    }

    /// Update member streaks; evaluate afterwards.
    pub fn apply(&mut self, rules: &Rules, input: Input) {
        match input {
            Input::Run {
                member,
                outcome,
                at,
                error,
                details,
                confirmed,
            } => {
                let Some(m) = self.members.get_mut(&member) else {
                    return;
                };
                if outcome == Outcome::Up {
                    // Counted only up to the threshold it is compared with, so that a steady
                    // good member's state stops changing (and stops being written) once clear.
                    m.good_streak = m.good_streak.saturating_add(1).min(rules.success_threshold);
                    m.bad_streak = 0;
                    if m.good_streak >= rules.success_threshold {
                        m.level = None;
                    }
                } else {
                    m.bad_streak = m.bad_streak.saturating_add(1);
                    m.good_streak = 0;
                    m.last_bad_at = Some(m.last_bad_at.map_or(at, |t| t.max(at)));
                    let (class, message) = error.unwrap_or_else(|| {
                        (
                            outcome.as_str().into(),
                            format!("{member} is {}", outcome.as_str()),
                        )
                    });
                    m.last_error = Some(Cause {
                        member: member.clone(),
                        class,
                        message,
                    });
                    m.last_details = details;
                    let level = if outcome == Outcome::Down {
                        Level::Down
                    } else {
                        Level::Degraded
                    };
                    // Once confirmed, the level follows the newest run (escalation and
                    // de-escalation need no second confirmation).
                    if m.level.is_some() || m.bad_streak >= rules.failure_threshold || confirmed {
                        m.level = Some(level);
                    }
                }
            }
            Input::Budget { member, at, breach } => {
                let Some(m) = self.members.get_mut(&member) else {
                    return;
                };
                if breach.is_some() {
                    m.last_bad_at = Some(m.last_bad_at.map_or(at, |t| t.max(at)));
                }
                m.budget = breach;
            }
            Input::Alert { .. } => {
                self.apply_alert(rules, input);
            }
            Input::Burn { breach } => self.burn = breach,
        }
    }

    /// Apply an inbound alert; see [`Input::Alert`] and [`AlertApplied`].
    pub fn apply_alert(&mut self, rules: &Rules, input: Input) -> AlertApplied {
        let Input::Alert {
            member,
            firing,
            status,
            starts_at,
            ends_at,
            at,
            cause,
            details,
        } = input
        else {
            self.apply(rules, input);
            return AlertApplied::Applied;
        };
        if !self.members.contains_key(&member) && !self.make_room_for_alert(at, rules) {
            return AlertApplied::Full;
        }
        let m = self.members.entry(member).or_default();
        let known = m.alert.get_or_insert(AlertMember {
            status,
            starts_at,
            ended_at: None,
        });
        if firing {
            if known.ended_at.is_some_and(|e| e >= starts_at) {
                return AlertApplied::Stale;
            }
            *known = AlertMember {
                status,
                starts_at: known.starts_at.max(starts_at),
                ended_at: None,
            };
            m.level = Some(if status == Status::Degraded {
                Level::Degraded
            } else {
                Level::Down
            });
            m.bad_streak = m.bad_streak.saturating_add(1);
            m.good_streak = 0;
            m.last_bad_at = Some(m.last_bad_at.map_or(at, |t| t.max(at)));
            m.last_error = Some(cause);
            m.last_details = details;
        } else {
            // A resolve of an earlier firing than the one now known.
            if known.ended_at.is_none() && known.starts_at > starts_at {
                return AlertApplied::Stale;
            }
            let ended = ends_at.min(at);
            known.ended_at = Some(known.ended_at.map_or(ended, |e| e.max(ended)));
            let was_bad = m.level.is_some();
            m.level = None;
            m.bad_streak = 0;
            m.good_streak = rules.success_threshold;
            if was_bad {
                // The alert was bad until it ended: the recovery hold counts from there.
                m.last_bad_at = Some(m.last_bad_at.map_or(ended, |t| t.max(ended)));
            }
            if m.last_error.is_none() {
                m.last_error = Some(cause);
                m.last_details = details;
            }
        }
        AlertApplied::Applied
    }

    /// Forget resolved alert members older than [`ALERT_MEMORY_MS`] (and the recovery
    /// hold); if the component is still at [`MAX_ALERT_MEMBERS`], the oldest resolved one.
    /// False when every slot holds a firing alert.
    fn make_room_for_alert(&mut self, now: i64, rules: &Rules) -> bool {
        let keep = ALERT_MEMORY_MS.max(rules.recovery_ms);
        self.members.retain(|_, m| {
            !matches!(m.alert, Some(AlertMember { ended_at: Some(e), .. }) if now - e > keep)
        });
        let alerts = self.members.values().filter(|m| m.alert.is_some()).count();
        if alerts < MAX_ALERT_MEMBERS {
            return true;
        }
        let oldest = self
            .members
            .iter()
            .filter_map(|(k, m)| Some((m.alert?.ended_at?, k)))
            .min()
            .map(|(_, k)| k.clone());
        match oldest {
            Some(k) => {
                self.members.remove(&k);
                true
            }
            None => false,
        }
    }

    /// The status the members and a fast error-budget burn add up to, ignoring incidents
    /// and maintenance, and the member (or burn) behind it.
    pub fn target(&self) -> (Status, Option<Cause>) {
        let (status, cause) = self.members_target();
        match &self.burn {
            Some(b) => {
                let burn = match b.level {
                    Level::Down => Status::MajorOutage,
                    Level::Degraded => Status::Degraded,
                };
                if burn.severity() > status.severity() {
                    (burn, Some(b.cause.clone()))
                } else {
                    (status, cause)
                }
            }
            None => (status, cause),
        }
    }

    /// The status the members add up to, ignoring incidents and maintenance, and the
    /// member behind it.
    /// A firing alert asks for its own status (from its severity); the probe members add up
    /// as usual (partial when some are down, major when all are); the worse of the two wins.
    fn members_target(&self) -> (Status, Option<Cause>) {
        let from_probes = self.probe_target();
        let from_alerts = self
            .members
            .values()
            .filter_map(|m| Some((m.alert?.status, m)))
            .filter(|(_, m)| m.level.is_some())
            .max_by_key(|(s, _)| s.severity())
            .map(|(s, m)| (s, m.last_error.clone()));
        match from_alerts {
            Some(a) if a.0.severity() > from_probes.0.severity() => a,
            _ => from_probes,
        }
    }

    fn probe_target(&self) -> (Status, Option<Cause>) {
        let probes = || self.members.values().filter(|m| m.alert.is_none());
        let n = probes().count();
        let down: Vec<&MemberState> = probes().filter(|m| m.level == Some(Level::Down)).collect();
        if !down.is_empty() {
            let status = if down.len() == n {
                Status::MajorOutage
            } else {
                Status::PartialOutage
            };
            return (status, down[0].last_error.clone());
        }
        if let Some(m) = probes().find(|m| m.level == Some(Level::Degraded)) {
            return (Status::Degraded, m.last_error.clone());
        }
        if let Some(m) = probes().find(|m| m.budget.is_some()) {
            return (Status::Degraded, m.budget.clone());
        }
        (Status::Operational, None)
    }

    /// The newest error of any member (for resolve notes and timeline entries).
    fn latest_cause(&self) -> Option<Cause> {
        self.members
            .values()
            .filter(|m| m.last_error.is_some())
            .max_by_key(|m| m.last_bad_at)
            .and_then(|m| m.last_error.clone())
    }

    /// Resolve the open incident by hand (`watchpost` API): the members start over (a new
    /// incident needs `failure_threshold` fresh bad runs, or a new firing of an alert) and the component is operational
    /// until the next evaluation says otherwise (e.g. a maintenance window). `None` when
    /// there is no open incident.
    pub fn resolve_by_hand(&mut self, note: String) -> Option<Transition> {
        let inc = self.incident.take()?;
        let cause = self.latest_cause();
        for m in self.members.values_mut() {
            // An inbound alert that fired is over as far as this incident goes: its repeats
            // (same `startsAt`) are old news; only a new firing of it opens a new incident.
            let alert = m.alert.map(|a| AlertMember {
                ended_at: Some(a.ended_at.unwrap_or(a.starts_at).max(a.starts_at)),
                ..a
            });
            *m = MemberState {
                alert,
                ..MemberState::default()
            };
        }
        let from = self.status;
        self.status = Status::Operational;
        Some(Transition {
            kind: EventKind::Resolved,
            from,
            to: Status::Operational,
            incident: Some(inc),
            cause,
            note: Some(note),
            notify: true,
        })
    }

    /// Decide what changes at `now`. `maintenance` is the reason of an active window for
    /// this component; `next_id` allocates an incident id when one opens.
    pub fn evaluate(
        &mut self,
        rules: &Rules,
        now: i64,
        maintenance: Option<&str>,
        next_id: &mut dyn FnMut() -> i64,
    ) -> Option<Transition> {
        let (target, cause) = self.target();
        let from = self.status;
        let Some(mut inc) = self.incident.clone() else {
            if let Some(reason) = maintenance {
                if from == Status::Maintenance {
                    return None;
                }
                self.status = Status::Maintenance;
                return Some(Transition {
                    kind: EventKind::MaintenanceStarted,
                    from,
                    to: Status::Maintenance,
                    incident: None,
                    cause: None,
                    note: Some(reason.to_string()),
                    notify: true,
                });
            }
            if target == Status::Operational {
                if from == Status::Operational {
                    return None;
                }
                self.status = Status::Operational;
                return Some(Transition {
                    kind: EventKind::MaintenanceEnded,
                    from,
                    to: Status::Operational,
                    incident: None,
                    cause: None,
                    note: None,
                    notify: true,
                });
            }
            self.opens.retain(|t| now - t < HOUR_MS);
            self.opens.push(now);
            let inc = OpenIncident {
                id: next_id(),
                opened_at: now,
                flapping: false,
                held: false,
                rehearsal: None,
            };
            self.incident = Some(inc.clone());
            self.status = target;
            return Some(Transition {
                kind: EventKind::Opened,
                from,
                to: target,
                incident: Some(inc),
                cause,
                note: None,
                notify: true,
            });
        };

        if target != Status::Operational {
            let refailed = inc.held;
            if refailed {
                inc.held = false;
                self.opens.retain(|t| now - t < HOUR_MS);
                self.opens.push(now);
            }
            let note = refailed.then(|| "failed again while held open for flapping".to_string());
            let kind = match target.severity().cmp(&from.severity()) {
                std::cmp::Ordering::Greater => EventKind::Escalated,
                std::cmp::Ordering::Less => EventKind::Deescalated,
                std::cmp::Ordering::Equal if refailed => {
                    self.incident = Some(inc.clone());
                    return Some(Transition {
                        kind: EventKind::Escalated,
                        from,
                        to: from,
                        incident: Some(inc),
                        cause,
                        note,
                        notify: false,
                    });
                }
                std::cmp::Ordering::Equal => return None,
            };
            // A held (flapping) incident only shows degraded while clear; a member still
            // confirmed bad may keep it below its worst without a de-escalation notice.
            self.status = target;
            self.incident = Some(inc.clone());
            return Some(Transition {
                kind,
                from,
                to: target,
                incident: Some(inc),
                cause,
                note,
                notify: true,
            });
        }

        // Every member is at least unconfirmed-good: resolve only when each member that was
        // bad during the incident has `success_threshold` good runs and the component has
        // been clear for `recovery` since its last bad run (clear-since, not time-since-open).
        let members_clear = self.burn.is_none()
            && self.members.values().all(|m| {
                m.level.is_none()
                    && m.budget.is_none()
                    && m.bad_streak == 0
                    && (m.good_streak >= rules.success_threshold
                        || m.last_bad_at.is_none_or(|t| t < inc.opened_at))
            });
        let clear_since_ok = self
            .last_bad_at()
            .is_none_or(|t| now - t >= rules.recovery_ms);
        if !(members_clear && clear_since_ok) {
            return None;
        }
        self.opens.retain(|t| now - t < HOUR_MS);
        if rules.max_incidents_per_hour > 0
            && self.opens.len() as u32 >= rules.max_incidents_per_hour
        {
            if inc.held {
                return None;
            }
            inc.held = true;
            let newly_flapping = !inc.flapping;
            inc.flapping = true;
            self.incident = Some(inc.clone());
            let note = Some(format!(
                "flapping: {} incidents in the last hour (max_incidents_per_hour = {}); held open until it settles",
                self.opens.len(),
                rules.max_incidents_per_hour
            ));
            if from != Status::Degraded {
                self.status = Status::Degraded;
                return Some(Transition {
                    kind: EventKind::Deescalated,
                    from,
                    to: Status::Degraded,
                    incident: Some(inc),
                    cause: self.latest_cause(),
                    note,
                    notify: true,
                });
            }
            return Some(Transition {
                kind: EventKind::Deescalated,
                from,
                to: from,
                incident: Some(inc),
                cause: self.latest_cause(),
                note,
                notify: newly_flapping,
            });
        }
        // Entering maintenance right after a resolve is reported by the next evaluation.
        self.incident = None;
        self.status = Status::Operational;
        Some(Transition {
            kind: EventKind::Resolved,
            from,
            to: Status::Operational,
            incident: Some(inc),
            cause: self.latest_cause(),
            note: None,
            notify: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        failure_threshold: 2,
        success_threshold: 2,
        recovery_ms: 180_000,
        max_incidents_per_hour: 4,
    };

    fn run(member: &str, o: Outcome, at: i64) -> Input {
        let error = (o != Outcome::Up)
            .then(|| ("connect_refused".to_string(), format!("{member} refused")));
        Input::Run {
            member: member.into(),
            outcome: o,
            at,
            error,
            details: None,
            confirmed: false,
        }
    }

    struct Sim {
        s: ComponentState,
        rules: Rules,
        ids: i64,
        log: Vec<(i64, EventKind, Status, Status, bool)>,
    }

    impl Sim {
        fn new(members: &[&str], rules: Rules) -> Self {
            let members: Vec<String> = members.iter().map(|s| s.to_string()).collect();
            Sim {
                s: ComponentState::new(&members),
                rules,
                ids: 0,
                log: Vec::new(),
            }
        }
        fn step(
            &mut self,
            input: Option<Input>,
            now: i64,
            maint: Option<&str>,
        ) -> Option<Transition> {
            if let Some(i) = input {
                self.s.apply(&self.rules, i);
            }
            let ids = &mut self.ids;
            let t = self.s.evaluate(&self.rules, now, maint, &mut || {
                *ids += 1;
                *ids
            });
            if let Some(t) = &t {
                self.log.push((now, t.kind, t.from, t.to, t.notify));
            }
            t
        }
        fn feed(&mut self, member: &str, o: Outcome, at: i64) -> Option<Transition> {
            self.step(Some(run(member, o, at)), at, None)
        }
    }

    use EventKind::*;
    use Outcome::{Degraded as D, Down as X, Up as U};
    use Status::*;

    #[test]
    fn status_severity_and_names() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert!(MajorOutage.severity() > PartialOutage.severity());
        assert!(PartialOutage.severity() > Degraded.severity());
        assert_eq!(Maintenance.severity(), Operational.severity());
    }

    /// Table: (member, outcome) sequence at 60 s intervals → expected transitions.
    #[test]
    fn thresholds_table() {
        type Case = (
            &'static str,
            Vec<(&'static str, Outcome)>,
            Vec<(EventKind, Status)>,
        );
        let cases: Vec<Case> = vec![
            (
                "one bad run is not an incident",
                vec![("a", X), ("a", U), ("a", X), ("a", U)],
                vec![],
            ),
            (
                "two down on one of two members: partial",
                vec![("a", X), ("a", X)],
                vec![(Opened, PartialOutage)],
            ),
            (
                "all members down: major",
                vec![("a", X), ("b", X), ("a", X), ("b", X)],
                vec![(Opened, PartialOutage), (Escalated, MajorOutage)],
            ),
            (
                "degraded runs: degraded",
                vec![("a", D), ("a", D)],
                vec![(Opened, Degraded)],
            ),
            (
                "degraded then down escalates",
                vec![("a", D), ("a", D), ("a", X)],
                vec![(Opened, Degraded), (Escalated, PartialOutage)],
            ),
            (
                "mixed bad runs count together",
                vec![("a", D), ("a", X)],
                vec![(Opened, PartialOutage)],
            ),
            (
                "major de-escalates to partial when one member recovers",
                vec![("a", X), ("b", X), ("a", X), ("b", X), ("a", U), ("a", U)],
                vec![
                    (Opened, PartialOutage),
                    (Escalated, MajorOutage),
                    (Deescalated, PartialOutage),
                ],
            ),
        ];
        for (name, seq, want) in cases {
            let mut sim = Sim::new(&["a", "b"], RULES);
            let mut got = Vec::new();
            for (i, (m, o)) in seq.iter().enumerate() {
                if let Some(t) = sim.feed(m, *o, i as i64 * 60_000) {
                    got.push((t.kind, t.to));
                }
            }
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_bad_run_confirmed_across_locations_opens_at_once() {
        let confirmed = |member: &str, o: Outcome, at: i64| match run(member, o, at) {
            Input::Run {
                member,
                outcome,
                at,
                error,
                details,
                ..
            } => Input::Run {
                member,
                outcome,
                at,
                error,
                details,
                confirmed: true,
            },
            other => other,
        };
        // failure_threshold 2: one confirmed bad run is enough.
        let mut sim = Sim::new(&["a", "b"], RULES);
        let t = sim.step(Some(confirmed("a", X, 0)), 0, None);
        assert_eq!(t.map(|t| (t.kind, t.to)), Some((Opened, PartialOutage)));
        // It resolves by the usual rules: success_threshold good runs and recovery.
        assert_eq!(sim.feed("a", U, 1_000), None);
        assert_eq!(sim.feed("a", U, 2_000), None);
        let t = sim.step(None, 181_000, None);
        assert_eq!(t.map(|t| t.kind), Some(Resolved));
        // An up run is never made bad by the flag alone.
        let mut sim = Sim::new(&["a", "b"], RULES);
        assert_eq!(sim.step(Some(confirmed("a", U, 0)), 0, None), None);
        assert_eq!(sim.s.members["a"].level, None);
    }

    #[test]
    fn resolves_only_after_successes_and_clear_since() {
        let mut sim = Sim::new(&["a"], RULES);
        assert!(sim.feed("a", X, 0).is_none());
        let t = sim.feed("a", X, 60_000).unwrap();
        assert_eq!(
            (t.kind, t.to, t.incident.as_ref().unwrap().id),
            (Opened, MajorOutage, 1)
        );
        // Long outage: time since open is irrelevant, clear-since counts.
        for i in 2..10 {
            assert!(sim.feed("a", X, i * 60_000).is_none());
        }
        let last_bad = 9 * 60_000;
        // Two good runs quickly: success threshold met, recovery (3 min) not yet.
        assert!(sim.feed("a", U, last_bad + 10_000).is_none());
        assert!(sim.feed("a", U, last_bad + 20_000).is_none());
        assert!(sim.step(None, last_bad + 179_999, None).is_none());
        let t = sim.step(None, last_bad + 180_000, None).unwrap();
        assert_eq!((t.kind, t.from, t.to), (Resolved, MajorOutage, Operational));
        assert_eq!(t.incident.unwrap().id, 1);
        assert!(sim.s.incident.is_none());
    }

    #[test]
    fn resolved_by_hand_starts_the_members_over() {
        let mut sim = Sim::new(&["a"], RULES);
        assert!(sim.s.resolve_by_hand("nothing open".into()).is_none());
        sim.feed("a", X, 0);
        let opened = sim.feed("a", X, 1000).unwrap();
        let t = sim.s.resolve_by_hand("fixed by hand".into()).unwrap();
        assert_eq!((t.kind, t.from, t.to), (Resolved, MajorOutage, Operational));
        assert_eq!(t.incident, opened.incident);
        assert_eq!(t.note.as_deref(), Some("fixed by hand"));
        assert!(t.notify);
        assert!(sim.s.incident.is_none());
        // Still failing: a new incident only after failure_threshold fresh bad runs.
        assert!(sim.step(None, 2000, None).is_none());
        assert!(sim.feed("a", X, 3000).is_none());
        assert_eq!(sim.feed("a", X, 4000).map(|t| t.kind), Some(Opened));
    }

    #[test]
    fn recovery_time_alone_is_not_enough() {
        let mut sim = Sim::new(&["a"], RULES);
        sim.feed("a", X, 0);
        sim.feed("a", X, 1000);
        sim.feed("a", U, 2000);
        // One good run, recovery long past: still open (success_threshold 2).
        assert!(sim.step(None, 1_000_000, None).is_none());
        assert_eq!(sim.feed("a", U, 1_000_001).unwrap().kind, Resolved);
    }

    #[test]
    fn bad_run_during_recovery_restarts_the_clock() {
        let mut sim = Sim::new(&["a"], RULES);
        sim.feed("a", X, 0);
        sim.feed("a", X, 60_000);
        sim.feed("a", U, 120_000);
        sim.feed("a", U, 180_000);
        // An unconfirmed bad run (below failure_threshold) still resets clear-since.
        assert!(sim.feed("a", X, 200_000).is_none());
        sim.feed("a", U, 260_000);
        sim.feed("a", U, 320_000);
        assert!(sim.step(None, 200_000 + 179_999, None).is_none());
        assert_eq!(
            sim.step(None, 200_000 + 180_000, None).map(|t| t.kind),
            Some(Resolved)
        );
    }

    #[test]
    fn budget_breach_degrades_and_clears() {
        let mut sim = Sim::new(
            &["a"],
            Rules {
                recovery_ms: 0,
                ..RULES
            },
        );
        let breach = Cause {
            member: "a".into(),
            class: "latency_budget".into(),
            message: "p95 over".into(),
        };
        let t = sim
            .step(
                Some(Input::Budget {
                    member: "a".into(),
                    at: 0,
                    breach: Some(breach.clone()),
                }),
                0,
                None,
            )
            .unwrap();
        assert_eq!((t.kind, t.to), (Opened, Degraded));
        assert_eq!(t.cause, Some(breach));
        // Down runs escalate over a budget breach.
        sim.feed("a", X, 1);
        assert_eq!(sim.feed("a", X, 2).unwrap().to, MajorOutage);
        assert!(sim.feed("a", U, 3).is_none());
        // Member recovered, budget still breached: back to degraded, not resolved.
        let t = sim.feed("a", U, 4).unwrap();
        assert_eq!((t.kind, t.to), (Deescalated, Degraded));
        assert!(sim.step(None, 5, None).is_none());
        let t = sim
            .step(
                Some(Input::Budget {
                    member: "a".into(),
                    at: 6,
                    breach: None,
                }),
                6,
                None,
            )
            .unwrap();
        assert_eq!(t.kind, Resolved);
    }

    #[test]
    fn flapping_holds_one_incident() {
        let rules = Rules {
            failure_threshold: 1,
            success_threshold: 1,
            recovery_ms: 0,
            max_incidents_per_hour: 2,
        };
        let mut sim = Sim::new(&["a"], rules);
        let mut t = 0;
        let mut cycle = |sim: &mut Sim| {
            t += 60_000;
            sim.feed("a", X, t);
            t += 60_000;
            sim.feed("a", U, t);
        };
        cycle(&mut sim); // incident 1 opens and resolves
        cycle(&mut sim); // incident 2 opens, then is held (2 opens in the hour)
        cycle(&mut sim); // fails again inside incident 2
        cycle(&mut sim);
        let kinds: Vec<(EventKind, Status, bool)> =
            sim.log.iter().map(|l| (l.1, l.3, l.4)).collect();
        assert_eq!(
            kinds,
            vec![
                (Opened, MajorOutage, true),
                (Resolved, Operational, true),
                (Opened, MajorOutage, true),
                (Deescalated, Degraded, true),
                (Escalated, MajorOutage, true),
                (Deescalated, Degraded, true),
                (Escalated, MajorOutage, true),
                (Deescalated, Degraded, true),
            ]
        );
        assert_eq!(sim.ids, 2, "only two incidents in the hour");
        assert!(sim.s.incident.as_ref().unwrap().flapping);
        // Quiet for an hour: the opens age out and the held incident resolves.
        let tr = sim.step(None, t + HOUR_MS, None).unwrap();
        assert_eq!(tr.kind, Resolved);
        assert_eq!(tr.incident.unwrap().id, 2);
    }

    #[test]
    fn maintenance_suppresses_and_ends() {
        let mut sim = Sim::new(&["a"], RULES);
        let t = sim.step(None, 0, Some("db upgrade")).unwrap();
        assert_eq!(
            (t.kind, t.to, t.note.as_deref()),
            (MaintenanceStarted, Maintenance, Some("db upgrade"))
        );
        assert!(sim
            .step(Some(run("a", X, 1)), 1, Some("db upgrade"))
            .is_none());
        assert!(sim
            .step(Some(run("a", X, 2)), 2, Some("db upgrade"))
            .is_none());
        assert!(sim.s.incident.is_none());
        // Window over while still down: a normal incident opens.
        let t = sim.step(None, 3, None).unwrap();
        assert_eq!((t.kind, t.from, t.to), (Opened, Maintenance, MajorOutage));

        let mut sim = Sim::new(&["a"], RULES);
        sim.step(None, 0, Some("x"));
        let t = sim.step(None, 1, None).unwrap();
        assert_eq!((t.kind, t.to), (MaintenanceEnded, Operational));
        assert!(sim.step(None, 2, None).is_none());
    }

    #[test]
    fn maintenance_waits_for_open_incident() {
        let mut sim = Sim::new(
            &["a"],
            Rules {
                recovery_ms: 0,
                ..RULES
            },
        );
        sim.feed("a", X, 0);
        sim.feed("a", X, 1);
        assert!(
            sim.step(None, 2, Some("m")).is_none(),
            "open incident continues through maintenance"
        );
        sim.step(Some(run("a", U, 3)), 3, Some("m"));
        let t = sim.step(Some(run("a", U, 4)), 4, Some("m")).unwrap();
        assert_eq!(t.kind, Resolved);
        assert_eq!(
            sim.step(None, 5, Some("m")).unwrap().kind,
            MaintenanceStarted
        );
    }

    fn alert(member: &str, firing: bool, status: Status, starts: i64, ends: i64, at: i64) -> Input {
        Input::Alert {
            member: format!("alert:{member}"),
            firing,
            status,
            starts_at: starts,
            ends_at: ends,
            at,
            cause: Cause {
                member: format!("alert:{member}"),
                class: "alert".into(),
                message: format!("{member} summary"),
            },
            details: None,
        }
    }

    /// Alerts on a component with no probes, and on one with probes.
    #[test]
    fn alerts_drive_components_without_duplicate_incidents() {
        type Step = (Option<Input>, i64, Option<(EventKind, Status)>);
        let fire = |m: &str, s, starts, at| Some(alert(m, true, s, starts, 0, at));
        let resolve = |m: &str, starts, ends, at| Some(alert(m, false, Degraded, starts, ends, at));
        let cases: Vec<(&str, Vec<&str>, Vec<Step>)> = vec![
            (
                "firing opens at once at its severity's status; repeats change nothing; resolve waits for the recovery hold",
                vec![],
                vec![
                    (fire("a/1", MajorOutage, 0, 10), 10, Some((Opened, MajorOutage))),
                    (fire("a/1", MajorOutage, 0, 20), 20, None),
                    (fire("a/1", MajorOutage, 0, 30), 30, None),
                    (resolve("a/1", 0, 40, 50), 50, None),
                    (None, 40 + 179_999, None),
                    (None, 40 + 180_000, Some((Resolved, Operational))),
                ],
            ),
            (
                "a resolve before its firing: the late firing is old news",
                vec![],
                vec![
                    (resolve("a/1", 100, 200, 300), 300, None),
                    (fire("a/1", MajorOutage, 100, 310), 310, None),
                    // The same alert firing anew (started after that end) counts.
                    (fire("a/1", MajorOutage, 250, 400), 400, Some((Opened, MajorOutage))),
                ],
            ),
            (
                "a resolve of an earlier firing does not end the current one",
                vec![],
                vec![
                    (fire("a/1", Degraded, 500, 510), 510, Some((Opened, Degraded))),
                    (resolve("a/1", 100, 200, 520), 520, None),
                    (None, 1_000_000, None),
                ],
            ),
            (
                "two alerts: the worse one decides, one incident",
                vec![],
                vec![
                    (fire("w/1", Degraded, 0, 10), 10, Some((Opened, Degraded))),
                    (fire("c/2", MajorOutage, 0, 20), 20, Some((Escalated, MajorOutage))),
                    // De-escalation needs no hold, as for probes; resolving does.
                    (resolve("c/2", 0, 30, 30), 30, Some((Deescalated, Degraded))),
                    (None, 30 + 180_000, None),
                    (resolve("w/1", 0, 200_000, 200_000), 200_000, None),
                    (None, 380_000, Some((Resolved, Operational))),
                ],
            ),
            (
                "with probes: a critical alert is a major outage even when one probe of two is down",
                vec!["p", "q"],
                vec![
                    (Some(run("p", X, 0)), 0, None),
                    (Some(run("p", X, 1)), 1, Some((Opened, PartialOutage))),
                    (fire("c/1", MajorOutage, 0, 2), 2, Some((Escalated, MajorOutage))),
                    (resolve("c/1", 0, 3, 3), 3, Some((Deescalated, PartialOutage))),
                ],
            ),
            (
                "with probes: a warning alert does not hide a probe outage",
                vec!["p"],
                vec![
                    (fire("w/1", Degraded, 0, 0), 0, Some((Opened, Degraded))),
                    (Some(run("p", X, 1)), 1, None),
                    (Some(run("p", X, 2)), 2, Some((Escalated, MajorOutage))),
                ],
            ),
        ];
        for (name, members, steps) in cases {
            let mut sim = Sim::new(&members, RULES);
            for (i, (input, now, want)) in steps.into_iter().enumerate() {
                let got = sim.step(input, now, None).map(|t| (t.kind, t.to));
                assert_eq!(got, want, "{name}: step {i}");
            }
            assert!(sim.ids <= 1, "{name}: {} incidents", sim.ids);
        }
    }

    #[test]
    fn alerts_obey_maintenance_and_flap_damping() {
        // A firing alert inside a maintenance window opens nothing until the window ends.
        let mut sim = Sim::new(&[], RULES);
        let t = sim.step(None, 0, Some("deploy")).unwrap();
        assert_eq!(t.kind, MaintenanceStarted);
        let fire = alert("a/1", true, MajorOutage, 1, 0, 1);
        assert!(sim.step(Some(fire), 1, Some("deploy")).is_none());
        let t = sim.step(None, 2, None).unwrap();
        assert_eq!((t.kind, t.to), (Opened, MajorOutage));

        // An alert that keeps firing and resolving is held in one incident, as probes are.
        let rules = Rules {
            recovery_ms: 0,
            max_incidents_per_hour: 2,
            ..RULES
        };
        let mut sim = Sim::new(&[], rules);
        for i in 0..4 {
            let at = i * 60_000;
            sim.step(Some(alert("a/1", true, MajorOutage, at, 0, at)), at, None);
            let end = at + 30_000;
            sim.step(
                Some(alert("a/1", false, MajorOutage, at, end, end)),
                end,
                None,
            );
        }
        assert_eq!(sim.ids, 2, "{:?}", sim.log);
        assert!(sim.s.incident.as_ref().is_some_and(|i| i.flapping));
    }

    #[test]
    fn an_alert_resolved_by_hand_reopens_only_on_a_new_firing() {
        let mut sim = Sim::new(&[], RULES);
        let t = sim.step(
            Some(alert("a/1", true, MajorOutage, 100, 0, 110)),
            110,
            None,
        );
        assert_eq!(t.map(|t| t.kind), Some(Opened));
        assert!(sim.s.resolve_by_hand("fixed".into()).is_some());
        assert!(
            sim.s.members["alert:a/1"].alert.is_some(),
            "still known as an alert"
        );
        // Alertmanager repeats the same firing: nothing reopens.
        let repeat = alert("a/1", true, MajorOutage, 100, 0, 120);
        assert_eq!(sim.s.apply_alert(&RULES, repeat), AlertApplied::Stale);
        assert!(sim.step(None, 120, None).is_none());
        // It fires anew later: a new incident.
        let t = sim.step(
            Some(alert("a/1", true, MajorOutage, 500, 0, 510)),
            510,
            None,
        );
        assert_eq!(t.map(|t| (t.kind, t.to)), Some((Opened, MajorOutage)));
    }

    #[test]
    fn alert_application_reports_stale_and_full_and_members_survive_sync() {
        let mut s = ComponentState::new(&["p".to_string()]);
        let a = |m: &str, firing, starts, at| alert(m, firing, MajorOutage, starts, at, at);
        assert_eq!(
            s.apply_alert(&RULES, a("x/1", false, 10, 20)),
            AlertApplied::Applied
        );
        assert_eq!(
            s.apply_alert(&RULES, a("x/1", true, 10, 30)),
            AlertApplied::Stale
        );
        for i in 0..MAX_ALERT_MEMBERS {
            assert_eq!(
                s.apply_alert(&RULES, a(&format!("f/{i}"), true, 0, 40)),
                AlertApplied::Applied
            );
        }
        // Full of firing alerts once the resolved one made room: the next one is dropped.
        assert!(!s.members.contains_key("alert:x/1"));
        assert_eq!(
            s.apply_alert(&RULES, a("y/1", true, 0, 50)),
            AlertApplied::Full
        );
        // A known alert is still updated.
        assert_eq!(
            s.apply_alert(&RULES, a("f/0", false, 0, 60)),
            AlertApplied::Applied
        );
        // Resolved ones are forgotten once old.
        assert_eq!(
            s.apply_alert(&RULES, a("y/1", true, 0, 60 + ALERT_MEMORY_MS + 1)),
            AlertApplied::Applied
        );
        assert!(!s.members.contains_key("alert:f/0"));
        let json = serde_json::to_string(&s).unwrap();
        let mut back: ComponentState = serde_json::from_str(&json).unwrap();
        back.sync_members(&["p".to_string()]);
        assert_eq!(back, s, "alert members survive a restart");
    }

    #[test]
    fn unknown_member_is_ignored_and_state_roundtrips() {
        let mut sim = Sim::new(&["a"], RULES);
        assert!(sim.feed("zzz", X, 0).is_none());
        sim.feed("a", X, 0);
        sim.feed("a", X, 1);
        let json = serde_json::to_string(&sim.s).unwrap();
        let back: ComponentState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sim.s);
        let mut back = back;
        back.sync_members(&["b".to_string()]);
        assert_eq!(back.members.keys().collect::<Vec<_>>(), vec!["b"]);
    }
}
