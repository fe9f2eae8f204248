//! Running a rehearsal standalone: an isolated agent (the daemon's [`Pipeline`] with its
//! own temporary store, only the components the drill touches and their probes, every
//! notification marked with the run id), start hooks, the fault for `duration`, end hooks,
//! then up to `settle` for the resolves. What the agent did is read back from its store —
//! incident transitions, incidents, the outbox — as a timeline measured from the fault's
//! start, and every expectation is judged against it.
//!
//! Not here: the fault modes (`chaos::fault`) or the file (`chaos::file`); rendering is in
//! `chaos::report`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::store::db::{self, params, Conn};
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::fault::target_of;
use super::fault::Faults;
use super::file::{Event, Expect, Hook, HookAt, Rehearsal};
use crate::clock::Clock;
use crate::config::{duration::human, Config};
use crate::incident::state::Status;
use crate::pipeline::{Options, Pipeline, Shared};
use crate::probe::assert::excerpt;
use crate::store::Store;

/// How often the store is read back while the drill runs.
const POLL: Duration = Duration::from_millis(100);

/// One thing that happened, measured from the fault's start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// Milliseconds from the fault's start (negative: before it).
    pub at_ms: i64,
    /// `fault_started`, `status`, `opened`, `delivered`, `delivery_failed`, `fault_ended`,
    /// `resolved`, `hook`, `hook_failed`, `interrupted`.
    pub event: String,
    pub component: Option<String>,
    pub notifier: Option<String>,
    pub detail: String,
}

/// The verdict on one expectation (the `--json` contract in CONFIG.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notifier: Option<String>,
    pub within_ms: i64,
    pub measured_ms: Option<i64>,
    pub held: bool,
    pub detail: String,
}

/// What a rehearsal found (also what `rehearse --agent` reads back from the agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub name: String,
    pub file: String,
    /// The run id that marks its notifications.
    pub rehearsal_id: String,
    pub started_at: String,
    pub passed: bool,
    /// Why it stopped before judging normally (a failed hook, an interrupt).
    pub aborted: Option<String>,
    pub duration_ms: i64,
    pub settle_ms: i64,
    pub expectations: Vec<Verdict>,
    pub timeline: Vec<Mark>,
}

/// The components a drill touches: those its expectations name, and those with a faulted
/// probe among their members.
pub fn involved_components(config: &Config, r: &Rehearsal) -> Vec<String> {
    let faulted = faulted_probes(r);
    let named: Vec<&str> = r
        .expects
        .iter()
        .filter_map(|e| e.component.as_deref())
        .collect();
    config
        .components
        .iter()
        .filter(|comp| {
            named.contains(&comp.name.get_ref().as_str())
                || comp
                    .probes
                    .iter()
                    .any(|m| faulted.contains(&member_probe(m.get_ref())))
        })
        .map(|comp| comp.name.get_ref().clone())
        .collect()
}

fn faulted_probes(r: &Rehearsal) -> Vec<&str> {
    r.faults
        .iter()
        .flat_map(|f| f.probes.iter().map(String::as_str))
        .collect()
}

/// The isolated agent's config: a temporary data dir, no API, the run id on every
/// notification, the rehearsal's notifier swaps, no schedules of its own, and only the
/// components the drill touches (with their probes and maintenance windows), so nothing
/// else is probed or announced.
pub fn isolated_config(config: &Config, r: &Rehearsal, data_dir: PathBuf, id: &str) -> Config {
    let mut c = config.clone();
    c.agent.data_dir = data_dir;
    c.agent.listen = None;
    c.agent.rehearsal = Some(id.to_string());
    // A drill announces only its own incidents, never a scheduled review.
    c.reviews.clear();
    c.rehearsals.clear();
    for swap in &r.notify {
        if let Some(n) = c.notifiers.iter_mut().find(|n| n.name == swap.name) {
            n.config = swap.config.clone();
        }
    }
    let faulted = faulted_probes(r);
    let involved = involved_components(config, r);
    c.components
        .retain(|comp| involved.contains(comp.name.get_ref()));
    let keep: Vec<String> = c
        .components
        .iter()
        .flat_map(|comp| {
            comp.probes
                .iter()
                .map(|m| member_probe(m.get_ref()).to_string())
        })
        .chain(faulted.iter().map(|p| p.to_string()))
        .collect();
    c.probes.retain(|p| keep.contains(&p.name));
    for m in &mut c.maintenance {
        m.components.retain(|x| involved.contains(x.get_ref()));
    }
    c.maintenance.retain(|m| !m.components.is_empty());
    c
}

fn member_probe(member: &str) -> &str {
    member.split('/').next().unwrap_or(member)
}

/// A temporary directory removed when dropped (the rehearsal's store).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Call one hook; the error is a sentence naming it (its URL redacted).
pub async fn call_hook(client: &reqwest::Client, h: &Hook) -> Result<String, String> {
    let at = match h.at {
        HookAt::Start => "start",
        HookAt::End => "end",
    };
    let what = format!(
        "{at} hook {} {}",
        h.method,
        crate::redact::redact_url(&h.url)
    );
    let mut req = client.request(h.method.clone(), &h.url).timeout(h.timeout);
    for (k, v) in &h.headers {
        req = req.header(k, v);
    }
    if let Some(b) = &h.body {
        req = req.body(b.clone());
    }
    let resp = req.send().await.map_err(|e| {
        let e = e.without_url();
        if e.is_timeout() {
            format!("{what}: no answer within {}", human(h.timeout))
        } else {
            format!("{what}: {e}")
        }
    })?;
    let status = resp.status();
    // The answer is read under the same deadline, and only an excerpt is kept.
    let body = tokio::time::timeout(h.timeout, resp.bytes())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let text = excerpt(&String::from_utf8_lossy(&body[..body.len().min(4096)]), 200);
    if status.is_success() {
        Ok(format!("{what}: {}", status.as_u16()))
    } else {
        Err(format!("{what}: answered {} {text}", status.as_u16()))
    }
}

/// What the store showed so far.
#[derive(Default)]
struct Seen {
    /// (component, at, to_status) of every transition.
    transitions: Vec<(String, i64, String)>,
    /// (id, component, opened_at, resolved_at, status).
    incidents: Vec<(i64, String, i64, Option<i64>, String)>,
    /// (id, notifier, component, kind, status, finished_at, last_error).
    outbox: Vec<OutboxRow>,
}

#[derive(Clone)]
struct OutboxRow {
    id: i64,
    notifier: String,
    component: String,
    kind: String,
    status: String,
    finished_at: Option<i64>,
    last_error: Option<String>,
}

/// The newest row ids when the drill began: only what comes after is the drill's (on a
/// live agent the tables hold its whole history).
#[derive(Debug, Clone, Copy, Default)]
struct Floor {
    events: i64,
    incidents: i64,
    outbox: i64,
}

/// Most rows of each table one rehearsal reads back.
const MAX_ROWS: i64 = 10_000;

fn floor(conn: &Conn) -> db::Result<Floor> {
    let max = |table: &str| {
        conn.query_row(
            &format!("SELECT coalesce(max(id), 0) FROM {table}"),
            [],
            |r| r.get::<_, i64>(0),
        )
    };
    Ok(Floor {
        events: max("incident_events")?,
        incidents: max("incidents")?,
        outbox: max("outbox")?,
    })
}

fn read_seen(conn: &Conn, f: Floor) -> db::Result<Seen> {
    let mut s = Seen::default();
    let mut st = conn.prepare(
        "SELECT component, at, to_status FROM incident_events WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    s.transitions = st
        .query_map(params![f.events, MAX_ROWS], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut st = conn.prepare(
        "SELECT id, component, opened_at, resolved_at, worst_status FROM incidents WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    s.incidents = st
        .query_map(params![f.incidents, MAX_ROWS], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut st = conn.prepare(
        "SELECT id, notifier, component, kind, status, finished_at, last_error FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    s.outbox = st
        .query_map(params![f.outbox, MAX_ROWS], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                notifier: r.get(1)?,
                component: r.get(2)?,
                kind: r.get(3)?,
                status: r.get(4)?,
                finished_at: r.get(5)?,
                last_error: r.get(6)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(s)
}

/// Marks for what is new in `s` since the keys in `printed`.
fn new_marks(s: &Seen, t0: i64, printed: &mut std::collections::HashSet<String>) -> Vec<Mark> {
    let mut out = Vec::new();
    let mut push = |key: String, m: Mark| {
        if printed.insert(key) {
            out.push(m);
        }
    };
    for (i, (comp, at, to)) in s.transitions.iter().enumerate() {
        push(
            format!("t{i}"),
            Mark {
                at_ms: at - t0,
                event: "status".into(),
                component: Some(comp.clone()),
                notifier: None,
                detail: format!("{comp} is {to}"),
            },
        );
    }
    for (id, comp, opened, resolved, worst) in &s.incidents {
        push(
            format!("o{id}"),
            Mark {
                at_ms: opened - t0,
                event: "opened".into(),
                component: Some(comp.clone()),
                notifier: None,
                detail: format!("incident #{id} on {comp}"),
            },
        );
        if let Some(r) = resolved {
            push(
                format!("r{id}"),
                Mark {
                    at_ms: r - t0,
                    event: "resolved".into(),
                    component: Some(comp.clone()),
                    notifier: None,
                    detail: format!("incident #{id} on {comp} resolved (worst: {worst})"),
                },
            );
        }
    }
    for o in &s.outbox {
        let Some(done) = o.finished_at else { continue };
        let (event, detail) = match o.status.as_str() {
            "delivered" => (
                "delivered",
                format!("{} accepted the {} of {}", o.notifier, o.kind, o.component),
            ),
            _ => (
                "delivery_failed",
                format!(
                    "{} refused the {} of {}: {}",
                    o.notifier,
                    o.kind,
                    o.component,
                    o.last_error.as_deref().unwrap_or("?")
                ),
            ),
        };
        push(
            format!("d{}", o.id),
            Mark {
                at_ms: done - t0,
                event: event.into(),
                component: Some(o.component.clone()),
                notifier: Some(o.notifier.clone()),
                detail,
            },
        );
    }
    out
}

/// When `e` is decided (held or failed for good) given what was seen; `None` while open.
fn judge(e: &Expect, s: &Seen, t0: i64, t_end: Option<i64>, now: i64) -> Option<Verdict> {
    let within = e.within.as_millis() as i64;
    let v = |measured: Option<i64>, held: bool, detail: String| Verdict {
        event: e.event.as_str().to_string(),
        component: e.component.clone(),
        notifier: e.notifier.clone(),
        within_ms: within,
        measured_ms: measured,
        held,
        detail,
    };
    let comp_ok = |c: &str| e.component.as_deref().is_none_or(|w| w == c);
    let found = |measured: i64, what: String| {
        let held = measured <= within;
        let detail = if held {
            what
        } else {
            format!("{what}, later than {}", human(e.within))
        };
        v(Some(measured), held, detail)
    };
    let missed = |what: &str, from: i64| -> Option<Verdict> {
        (now >= from + within).then(|| v(None, false, format!("{what} within {}", human(e.within))))
    };
    match e.event {
        Event::Status => {
            let want = e.status.unwrap_or(Status::MajorOutage);
            let hit = s.transitions.iter().find(|(c, at, to)| {
                comp_ok(c)
                    && *at >= t0
                    && Status::parse(to).is_some_and(|x| {
                        x.severity() >= want.severity() && x != Status::Maintenance
                    })
            });
            match hit {
                Some((c, at, to)) => Some(found(at - t0, format!("{c} was {to}"))),
                None => missed(&format!("never {}", want.as_str()), t0),
            }
        }
        Event::Opened => match s.incidents.iter().find(|i| comp_ok(&i.1) && i.2 >= t0) {
            Some(i) => Some(found(i.2 - t0, format!("incident #{} opened", i.0))),
            None => missed("no incident opened", t0),
        },
        Event::Delivered => {
            let rows: Vec<&OutboxRow> = s
                .outbox
                .iter()
                .filter(|o| {
                    Some(&o.notifier) == e.notifier.as_ref()
                        && comp_ok(&o.component)
                        && matches!(o.kind.as_str(), "opened" | "escalated")
                })
                .collect();
            if let Some(o) = rows.iter().find(|o| o.status == "delivered") {
                let at = o.finished_at.unwrap_or(now);
                return Some(found(
                    at - t0,
                    format!("{} accepted the {} of {}", o.notifier, o.kind, o.component),
                ));
            }
            if let Some(o) = rows.iter().find(|o| o.status == "dead") {
                return Some(v(
                    None,
                    false,
                    format!(
                        "{} refused the {} of {}: {}",
                        o.notifier,
                        o.kind,
                        o.component,
                        o.last_error.as_deref().unwrap_or("?")
                    ),
                ));
            }
            let why = match rows.iter().find_map(|o| o.last_error.as_deref()) {
                Some(err) => format!("not delivered (still retrying: {err})"),
                None if rows.is_empty() => "nothing was sent".into(),
                None => "not delivered yet".into(),
            };
            missed(&why, t0)
        }
        Event::Resolved => {
            let t_end = t_end?;
            let hit = match &e.notifier {
                Some(n) => s
                    .outbox
                    .iter()
                    .find(|o| {
                        &o.notifier == n
                            && comp_ok(&o.component)
                            && o.kind == "resolved"
                            && o.status == "delivered"
                    })
                    .map(|o| {
                        (
                            o.finished_at.unwrap_or(now),
                            format!("{} accepted the resolve of {}", o.notifier, o.component),
                        )
                    }),
                None => s
                    .incidents
                    .iter()
                    .filter(|i| comp_ok(&i.1))
                    .find_map(|i| i.3.map(|r| (r, format!("incident #{} resolved", i.0)))),
            };
            match hit {
                // A resolve while the fault was still on counts from the fault's end (0).
                Some((at, what)) => Some(found((at - t_end).max(0), what)),
                None => {
                    let dead = e.notifier.as_ref().and_then(|n| {
                        s.outbox.iter().find(|o| {
                            &o.notifier == n && o.kind == "resolved" && o.status == "dead"
                        })
                    });
                    match dead {
                        Some(o) => Some(v(
                            None,
                            false,
                            format!(
                                "{} refused the resolve: {}",
                                o.notifier,
                                o.last_error.as_deref().unwrap_or("?")
                            ),
                        )),
                        None => missed("not resolved", t_end),
                    }
                }
            }
        }
        Event::NoIncident => match s
            .incidents
            .iter()
            .find(|i| comp_ok(&i.1) && i.2 >= t0 && i.2 - t0 <= within)
        {
            Some(i) => Some(v(
                Some(i.2 - t0),
                false,
                format!(
                    "incident #{} opened ({}): this fault must not page",
                    i.0, i.4
                ),
            )),
            None => (now >= t0 + within).then(|| v(None, true, "no incident opened".into())),
        },
    }
}

/// The final verdicts: decided ones, and the rest failed as never seen in the window.
fn verdicts(r: &Rehearsal, s: &Seen, t0: i64, t_end: Option<i64>, now: i64) -> Vec<Verdict> {
    r.expects
        .iter()
        .map(|e| {
            judge(e, s, t0, t_end, now).unwrap_or_else(|| {
                // Still open at the end: what held so far decides (no_incident holds when
                // nothing opened in the time the rehearsal ran).
                let held = e.event == Event::NoIncident;
                Verdict {
                    event: e.event.as_str().to_string(),
                    component: e.component.clone(),
                    notifier: e.notifier.clone(),
                    within_ms: e.within.as_millis() as i64,
                    measured_ms: None,
                    held,
                    detail: if held {
                        format!(
                            "no incident opened in the {} the rehearsal ran",
                            human(Duration::from_millis((now - t0).max(0) as u64))
                        )
                    } else {
                        "not seen before the rehearsal ended".into()
                    },
                }
            })
        })
        .collect()
}

/// Wait (bounded by each probe's interval and deadlines) until every faulted probe has
/// run once; one `baseline` mark per probe with its outcome, `at_ms` as wall time.
async fn baseline(
    a: &Agent,
    r: &Rehearsal,
    interrupt: &mut (impl Future<Output = ()> + Unpin),
) -> Option<Vec<Mark>> {
    let probes: Vec<&crate::config::ProbeConfig> = r
        .faults
        .iter()
        .flat_map(|f| f.probes.iter())
        .filter_map(|n| a.config.probe(n))
        .collect();
    let limit = probes
        .iter()
        .map(|pc| pc.interval + (pc.timeout + pc.retry_delay) * (pc.retries + 1))
        .max()
        .unwrap_or_default()
        + Duration::from_secs(5);
    let until = Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        let latest = a.store.latest().runs();
        let seen: Vec<_> = probes
            .iter()
            .map(|pc| latest.iter().find(|l| l.probe == pc.name))
            .collect();
        if seen.iter().all(Option::is_some) || Instant::now() >= until {
            return Some(
                probes
                    .iter()
                    .zip(seen)
                    .map(|(pc, l)| Mark {
                        at_ms: l.map_or_else(|| a.clock.now_ms(), |l| l.started_at),
                        event: "baseline".into(),
                        component: None,
                        notifier: None,
                        detail: match l {
                            Some(l) if l.outcome == "up" => {
                                format!("{} up before the fault", pc.name)
                            }
                            Some(l) => format!(
                                "{} was already {} before the fault: {}",
                                pc.name,
                                l.outcome,
                                l.error_message.as_deref().unwrap_or("")
                            ),
                            None => format!(
                                "{} did not run before the fault (waited {})",
                                pc.name,
                                human(limit)
                            ),
                        },
                    })
                    .collect(),
            );
        }
        tokio::select! {
            _ = &mut *interrupt => return None,
            _ = tick.tick() => {}
        }
    }
}

/// The parts of a running agent a rehearsal drives: its config, its store (read back for
/// the timeline), the fault registry its probes consult, and its clock.
#[derive(Clone)]
pub struct Agent {
    pub config: Arc<Config>,
    pub store: Store,
    pub faults: Faults,
    pub clock: Clock,
}

impl Report {
    /// The report of `r` (run id `id`, started at `started`, read from `file`) before
    /// anything happened.
    pub fn begin(
        r: &Rehearsal,
        file: &str,
        id: &str,
        started: chrono::DateTime<chrono::Utc>,
    ) -> Report {
        Report {
            name: r.name.clone(),
            file: file.to_string(),
            rehearsal_id: id.to_string(),
            started_at: started.to_rfc3339(),
            passed: false,
            aborted: None,
            duration_ms: r.duration.as_millis() as i64,
            settle_ms: r.settle.as_millis() as i64,
            expectations: Vec::new(),
            timeline: Vec::new(),
        }
    }
}

/// Run `r` standalone against `config`. `interrupt` ends it early (the fault is lifted and
/// the end hooks run); `live` sees every mark as it happens.
pub async fn rehearse(
    config: &Config,
    r: &Rehearsal,
    interrupt: impl Future<Output = ()>,
    live: &mut (dyn FnMut(&Mark) + Send),
) -> anyhow::Result<Report> {
    let started = chrono::Utc::now();
    let id = started.timestamp_millis().to_string();
    let dir = std::env::temp_dir().join(format!("watchpost-rehearsal-{}-{id}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = TempDir(dir.clone());
    let cfg = Arc::new(isolated_config(config, r, dir, &id));
    let shared = Shared::default();
    let (faults, clock) = (shared.faults.clone(), shared.clock);
    let pipeline = Pipeline::start_with(
        cfg.clone(),
        Options {
            scheduler: true,
            dispatcher: true,
            listener: None,
        },
        shared,
    )?;
    let agent = Agent {
        config: cfg,
        store: pipeline.store.clone(),
        faults,
        clock,
    };
    let begun = Report::begin(r, &r.path.display().to_string(), &id, started);
    let report = drive(&agent, r, begun, interrupt, live).await;
    // The store handle holds the writer open: the pipeline's stop waits for it.
    drop(agent);
    if let Err(e) = pipeline.stop().await {
        tracing::warn!(error = %format!("{e:#}"), "the rehearsal's agent did not stop cleanly");
    }
    report
}

/// Drive `r` on agent `a`: baseline, start hooks, the fault for `duration`, end hooks, up
/// to `settle` for the resolves, verdicts. `begun` is the report so far (name, id, start);
/// `interrupt` ends it early (the fault is lifted and the end hooks run); `live` sees every
/// mark as it happens. The fault is never left behind, also on an error.
pub async fn drive(
    a: &Agent,
    r: &Rehearsal,
    begun: Report,
    interrupt: impl Future<Output = ()>,
    live: &mut (dyn FnMut(&Mark) + Send),
) -> anyhow::Result<Report> {
    let (faults, clock) = (&a.faults, a.clock);
    let conn = a.store.reader()?;
    let floor = floor(&conn).context("reading the agent's store")?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    tokio::pin!(interrupt);

    let mut timeline = Vec::new();
    let mut mark = |m: Mark, timeline: &mut Vec<Mark>| {
        live(&m);
        timeline.push(m);
    };
    let hook_mark = |t0: i64, res: &Result<String, String>| Mark {
        at_ms: clock.now_ms() - t0,
        event: if res.is_ok() { "hook" } else { "hook_failed" }.into(),
        component: None,
        notifier: None,
        detail: match res {
            Ok(s) | Err(s) => s.clone(),
        },
    };
    let run_end_hooks = |t0: i64| {
        let client = client.clone();
        async move {
            let mut marks = Vec::new();
            for h in r.hooks.iter().filter(|h| h.at == HookAt::End) {
                marks.push(hook_mark(t0, &call_hook(&client, h).await));
            }
            marks
        }
    };

    // Baseline: every faulted probe runs once before the fault, so the drill starts from a
    // known state (and a service already down says so), and the fault starts just after a
    // run — the time to detect includes the wait for the next one, as after a real outage
    // that begins right after a good run.
    let mut aborted = None;
    let t_base = clock.now_ms();
    match baseline(a, r, &mut interrupt).await {
        Some(marks) => {
            for m in marks {
                mark(
                    Mark {
                        at_ms: m.at_ms - t_base,
                        ..m
                    },
                    &mut timeline,
                );
            }
        }
        None => aborted = Some("interrupted".to_string()),
    }

    let t0 = clock.now_ms();
    for h in r
        .hooks
        .iter()
        .filter(|h| h.at == HookAt::Start && aborted.is_none())
    {
        let res = call_hook(&client, h).await;
        mark(hook_mark(t0, &res), &mut timeline);
        if let Err(e) = res {
            aborted = Some(format!("a start hook failed: {e}"));
            break;
        }
    }
    if let Some(why) = aborted {
        for m in run_end_hooks(t0).await {
            mark(m, &mut timeline);
        }
        return Ok(Report {
            aborted: Some(why),
            timeline,
            ..begun
        });
    }

    // The fault.
    let t0 = clock.now_ms();
    let start = Instant::now();
    for f in &r.faults {
        for p in &f.probes {
            let target = a.config.probe(p).and_then(|pc| target_of(pc.spec.url()));
            if let Err(e) = faults.inject(p, f.mode.clone(), target).await {
                faults.clear_all();
                for m in run_end_hooks(t0).await {
                    mark(m, &mut timeline);
                }
                return Err(e.context(format!("injecting {} into {p}", f.mode.name())));
            }
        }
        mark(
            Mark {
                at_ms: clock.now_ms() - t0,
                event: "fault_started".into(),
                component: None,
                notifier: None,
                detail: format!("{} on {}", f.mode.name(), f.probes.join(", ")),
            },
            &mut timeline,
        );
    }
    let fault_until = start + r.duration;
    let settle_until = fault_until + r.settle;
    let mut t_end: Option<i64> = None;
    let mut printed = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(POLL);
    let seen = loop {
        let interrupted = tokio::select! {
            _ = &mut interrupt => true,
            _ = tick.tick() => false,
        };
        let now = clock.now_ms();
        let read = read_seen(&conn, floor);
        let s = match read {
            Ok(s) => s,
            Err(e) => {
                faults.clear_all();
                for m in run_end_hooks(t0).await {
                    mark(m, &mut timeline);
                }
                return Err(anyhow::Error::from(e).context("reading the agent's store"));
            }
        };
        let mut fresh = new_marks(&s, t0, &mut printed);
        fresh.sort_by_key(|m| m.at_ms);
        for m in fresh {
            mark(m, &mut timeline);
        }
        if interrupted {
            aborted = Some("interrupted".to_string());
        }
        if t_end.is_none() && (interrupted || Instant::now() >= fault_until) {
            faults.clear_all();
            t_end = Some(clock.now_ms());
            mark(
                Mark {
                    at_ms: clock.now_ms() - t0,
                    event: if interrupted {
                        "interrupted"
                    } else {
                        "fault_ended"
                    }
                    .into(),
                    component: None,
                    notifier: None,
                    detail: if interrupted {
                        "interrupted: the fault is lifted".into()
                    } else {
                        format!("after {}", human(r.duration))
                    },
                },
                &mut timeline,
            );
            for m in run_end_hooks(t0).await {
                mark(m, &mut timeline);
            }
        }
        if interrupted {
            break s;
        }
        let decided = t_end.is_some()
            && r.expects
                .iter()
                .all(|e| judge(e, &s, t0, t_end, now).is_some());
        if decided || Instant::now() >= settle_until {
            break s;
        }
    };
    faults.clear_all();
    let now = clock.now_ms();
    let expectations = verdicts(r, &seen, t0, t_end, now);
    let passed = aborted.is_none() && expectations.iter().all(|v| v.held);
    timeline.sort_by_key(|m| m.at_ms);
    Ok(Report {
        passed,
        aborted,
        expectations,
        timeline,
        ..begun
    })
}
