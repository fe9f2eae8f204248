//! Scheduled reviews: `[[review]]` sends the latency-budget review ([`crate::report`]) on a
//! cron schedule ([`crate::cron`], UTC) through existing notifiers — an e-mail notifier mails
//! the HTML report as the HTML part with a plain-text summary part; a webhook notifier posts
//! the JSON report. `watchpost review --now NAME` sends one at once.
//!
//! Each (review, notifier) pair keeps the last slot it was sent for (`review_marks`), written
//! after the notifier accepted it: a restart neither sends a slot again nor loses one — a
//! slot missed while the agent was down is sent (once, the newest missed) when it starts. A
//! failed delivery is retried with backoff until it is accepted or the agent stops (then the
//! next start sends it); a permanent refusal (a 4xx, an SMTP 5xx) is logged and the slot is
//! given up for that notifier. A new review (no mark yet) is armed at start and first sent
//! at its next slot.
//!
//! Not here: the report's figures (see `report`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use toml::Spanned;

use crate::clock::Clock;
use crate::config::{duration::human, Config, Dur, Notifier, SpanError};
use crate::cron::Schedule;
use crate::notify::{Ctx, DeliveryError, Retry};
use crate::report::{self, Report};
use crate::store::db::{self, params, Conn};
use crate::store::{OptionalExtension, Store};

/// Migration: the last slot each (review, notifier) was sent for.
pub const MIGRATION: &str = "CREATE TABLE IF NOT EXISTS review_marks (
        review TEXT NOT NULL,
        notifier TEXT NOT NULL,
        slot INTEGER NOT NULL,
        sent_at INTEGER,
        PRIMARY KEY (review, notifier)
    );";

/// `[[review]]`: the latency-budget review, sent on a schedule.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewConfig {
    /// Name of the review (`watchpost review --now NAME`; keys its send history).
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// When to send: cron, five fields in UTC (`"0 9 * * MON"`: Mondays 09:00) or an
    /// alias (`@daily`).
    #[schemars(with = "String")]
    pub schedule: Spanned<String>,
    /// The window each review covers, ending at its slot (default 7d).
    #[schemars(with = "Option<Dur>")]
    pub window: Option<Spanned<Dur>>,
    /// Notifier names: e-mail (HTML report + plain-text summary) or webhook (JSON report).
    #[schemars(with = "Vec<String>")]
    pub notify: Vec<Spanned<String>>,
    /// Only these components (their rows, incidents and objectives); default: everything.
    #[schemars(with = "Option<Vec<String>>")]
    pub components: Option<Vec<Spanned<String>>>,
    /// Subject and heading (default: `watchpost review: <name>`).
    pub title: Option<String>,
}

/// `window` when not given.
const DEFAULT_WINDOW: Duration = Duration::from_secs(7 * 86400);

impl ReviewConfig {
    /// The window each review covers.
    pub fn window(&self) -> Duration {
        self.window
            .as_ref()
            .map_or(DEFAULT_WINDOW, |w| w.get_ref().0)
    }

    /// The name.
    pub fn name(&self) -> &str {
        self.name.get_ref()
    }

    /// The subject and heading.
    pub fn title(&self) -> String {
        self.title
            .clone()
            .filter(|t| !t.trim().is_empty())
            .unwrap_or_else(|| format!("watchpost review: {}", self.name()))
    }

    /// The parsed schedule (checked by [`ReviewConfig::validate`]).
    pub fn schedule(&self) -> Result<Schedule, String> {
        Schedule::parse(self.schedule.get_ref())
    }

    /// Check the schedule, the window, the notifiers (they must exist and carry reviews)
    /// and the components, each error at its key.
    pub fn validate(
        &self,
        components: &[crate::config::ComponentConfig],
        notifiers: &[Notifier],
        declared_notifiers: &[String],
    ) -> Vec<SpanError> {
        let mut errs = Vec::new();
        if let Err(e) = self.schedule() {
            errs.push(SpanError::at(self.schedule.span(), format!("review: {e}")));
        }
        if let Some(w) = self
            .window
            .as_ref()
            .filter(|w| w.get_ref().0 < Duration::from_secs(60))
        {
            errs.push(SpanError::at(
                w.span(),
                "review: window must be at least 1m",
            ));
        }
        if self.notify.is_empty() {
            errs.push(SpanError::at(
                self.name.span(),
                "review: notify is empty: name an e-mail or webhook notifier",
            ));
        }
        for n in &self.notify {
            match notifiers.iter().find(|x| &x.name == n.get_ref()) {
                // Present but invalid: it has its own error.
                None if declared_notifiers.contains(n.get_ref()) => {}
                None => {
                    let known: Vec<&str> = notifiers.iter().map(|n| n.name.as_str()).collect();
                    errs.push(SpanError::at(
                        n.span(),
                        format!(
                            "unknown notifier {:?} in review (defined: {})",
                            n.get_ref(),
                            if known.is_empty() {
                                "none".into()
                            } else {
                                known.join(", ")
                            }
                        ),
                    ))
                }
                Some(x) if !x.config.0.carries_reviews() => errs.push(SpanError::at(
                    n.span(),
                    format!(
                        "notifier {:?} is a {} notifier: reviews go to email or webhook notifiers",
                        n.get_ref(),
                        x.config.0.kind()
                    ),
                )),
                Some(_) => {}
            }
        }
        for c in self.components.iter().flatten() {
            if !components.iter().any(|k| k.name.get_ref() == c.get_ref()) {
                errs.push(SpanError::at(
                    c.span(),
                    format!("unknown component {:?} in review", c.get_ref()),
                ));
            }
        }
        errs
    }
}

/// One review, ready for any notifier that carries reviews.
#[derive(Debug, Clone)]
pub struct ReviewMessage {
    pub review: String,
    pub subject: String,
    /// The plain-text summary.
    pub text: String,
    /// The self-contained HTML report.
    pub html: String,
    /// `{"review", "title", "slot", "report"}`.
    pub json: Vec<u8>,
    /// The slot it is sent for (ms).
    pub slot_ms: i64,
}

/// The report for `review`, for the window ending at `slot_ms`, limited to its components.
pub fn build_report(
    config: &Config,
    conn: &Conn,
    review: &ReviewConfig,
    slot_ms: i64,
) -> anyhow::Result<Report> {
    let mut r = report::build(config, conn, review.window(), slot_ms)?;
    if let Some(only) = &review.components {
        let names: Vec<&str> = only.iter().map(|c| c.get_ref().as_str()).collect();
        let members: Vec<&str> = config
            .components
            .iter()
            .filter(|c| names.contains(&c.name.get_ref().as_str()))
            .flat_map(|c| c.probes.iter().map(|p| p.get_ref().as_str()))
            .collect();
        // A member probe brings its sub-checks; a member sub-check only itself.
        let keep = |series: &str| {
            members.contains(&series)
                || series
                    .split_once('/')
                    .is_some_and(|(probe, _)| members.contains(&probe))
        };
        r.rows.retain(|row| keep(&row.series));
        r.components
            .retain(|c| names.contains(&c.component.as_str()));
        r.incidents
            .retain(|i| names.contains(&i.component.as_str()));
    }
    Ok(r)
}

/// Render `r` as the message every notifier gets.
pub fn compose(review: &ReviewConfig, r: &Report, slot_ms: i64) -> anyhow::Result<ReviewMessage> {
    let title = review.title();
    let html = report::render_html(r).replacen(
        "<body>",
        &format!("<body><h1>{}</h1>", report::html_escape(&title)),
        1,
    );
    let json = serde_json::to_vec(&json!({
        "review": review.name(),
        "title": title,
        "slot": crate::notify::event::iso(slot_ms),
        "report": r,
    }))?;
    Ok(ReviewMessage {
        review: review.name().to_string(),
        subject: title.clone(),
        text: summary(&title, r),
        html,
        json,
        slot_ms,
    })
}

/// The plain-text part: what an SRE reads first, the whole review being in the HTML part.
pub fn summary(title: &str, r: &Report) -> String {
    use std::fmt::Write;
    let mut s = format!("{title}\nlast {} ({} → {})\n\n", r.window, r.since, r.until);
    if !r.components.is_empty() {
        s.push_str("Components\n");
        for c in &r.components {
            let avail = c
                .window
                .availability_pct
                .map_or("-".into(), |a| format!("{a:.3}%"));
            let budget = c
                .error_budget_remaining_pct
                .map(|b| {
                    format!(
                        ", error budget {b:.1}% left of {} over {}",
                        c.objective.as_deref().unwrap_or("-"),
                        c.slo_window
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "- {}: availability {avail}{budget}, {} incident(s)",
                c.component, c.incidents
            );
        }
        s.push('\n');
    }
    let over: Vec<_> = r.rows.iter().filter(|x| x.verdict == "over").collect();
    if over.is_empty() {
        s.push_str("Every latency budget held.\n");
    } else {
        s.push_str("Over budget\n");
        for x in over {
            let _ = writeln!(s, "- {} {}: {}", x.series, x.phase, x.over.join(", "));
        }
    }
    let worse: Vec<_> = r
        .rows
        .iter()
        .filter(|x| x.change.direction == "worse")
        .take(5)
        .collect();
    if !worse.is_empty() {
        s.push_str("\nWorse than the previous window\n");
        for x in worse {
            let p95 = x
                .change
                .p95_pct
                .map_or(String::new(), |p| format!(" p95 {p:+.0}%"));
            let avail = x
                .change
                .availability_pts
                .map_or(String::new(), |a| format!(" availability {a:+.2} pts"));
            let _ = writeln!(s, "- {} {}:{p95}{avail}", x.series, x.phase);
        }
    }
    let _ = writeln!(
        s,
        "\n{} series/phase rows, {} incident(s), {} rehearsal(s) in the window; the full review (tables and charts) is the HTML part of this mail.",
        r.rows.len(),
        r.incidents.len(),
        r.rehearsals.len()
    );
    s
}

/// Deliver `msg` to notifier `name` once (no retry); what was done, or why not.
pub async fn deliver_once(
    config: &Config,
    name: &str,
    msg: &ReviewMessage,
) -> Result<String, DeliveryError> {
    let n = config
        .notifiers
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| DeliveryError::Invalid(format!("unknown notifier {name:?}")))?;
    let spec = n.config.0.as_ref();
    let dest = spec
        .build()
        .map_err(|e| DeliveryError::Invalid(format!("notifier {name}: {e:#}")))?;
    let ctx = Ctx::new(name, spec, None, &config.agent.location)
        .map_err(|e| DeliveryError::Invalid(format!("{e:#}")))?;
    dest.review(&ctx, msg).await
}

/// `watchpost review --now NAME`: build the review for the window ending now and send it to
/// each of its notifiers once: per notifier, what was done or why not. An unknown review is
/// an error.
pub async fn send_now(
    config: &Config,
    name: &str,
) -> anyhow::Result<Vec<(String, Result<String, String>)>> {
    let review = find(config, name)?;
    let now = Utc::now().timestamp_millis();
    let r = match crate::store::Target::of(config)?.reader()? {
        Some(conn) => build_report(config, &conn, review, now)?,
        None => Report::empty(review.window(), now),
    };
    let msg = compose(review, &r, now)?;
    let mut out = Vec::new();
    for n in &review.notify {
        let r = deliver_once(config, n.get_ref(), &msg)
            .await
            .map_err(|e| e.to_string());
        out.push((n.get_ref().clone(), r));
    }
    Ok(out)
}

/// The review named `name`.
pub fn find<'c>(config: &'c Config, name: &str) -> anyhow::Result<&'c ReviewConfig> {
    config
        .reviews
        .iter()
        .find(|r| r.name() == name)
        .ok_or_else(|| {
            let known: Vec<&str> = config.reviews.iter().map(|r| r.name()).collect();
            anyhow::anyhow!(
                "unknown review {name:?} (configured: {})",
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )
        })
}

/// What a review owes at `now`, given each notifier's mark (the slot last sent, or the time
/// it was armed; `None`: never seen).
#[derive(Debug, Clone, PartialEq)]
pub enum Due {
    /// Store these marks (new notifiers) at `now`; nothing is owed to them yet.
    Arm(Vec<String>),
    /// Send the slot at this time to these notifiers.
    Send { slot_ms: i64, to: Vec<String> },
    /// Nothing to do before this time (`None`: the schedule never fires again).
    Wait(Option<i64>),
}

/// Decide what is due (pure: the schedule, the marks and the time).
pub fn due(schedule: &Schedule, marks: &[(String, Option<i64>)], now_ms: i64) -> Due {
    let new: Vec<String> = marks
        .iter()
        .filter(|(_, m)| m.is_none())
        .map(|(n, _)| n.clone())
        .collect();
    if !new.is_empty() {
        return Due::Arm(new);
    }
    let at = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
    // The newest slot at or before now: the one owed to a notifier marked before it (after
    // a long outage, only that one, not every slot missed).
    let slot = schedule
        .last_at_or_before(at(now_ms))
        .map(|t| t.timestamp_millis());
    if let Some(slot_ms) = slot {
        let to: Vec<String> = marks
            .iter()
            .filter(|(_, m)| m.is_some_and(|m| m < slot_ms))
            .map(|(n, _)| n.clone())
            .collect();
        if !to.is_empty() {
            return Due::Send { slot_ms, to };
        }
    }
    Due::Wait(
        schedule
            .next_after(at(now_ms))
            .map(|t| t.timestamp_millis()),
    )
}

/// Each notifier's mark for `review`.
fn read_marks(conn: &Conn, review: &ReviewConfig) -> db::Result<Vec<(String, Option<i64>)>> {
    let mut st =
        conn.prepare_cached("SELECT slot FROM review_marks WHERE review = ?1 AND notifier = ?2")?;
    let mut out = Vec::new();
    for n in &review.notify {
        let m: Option<i64> = st
            .query_row(params![review.name(), n.get_ref()], |r| r.get(0))
            .optional()?;
        out.push((n.get_ref().clone(), m));
    }
    Ok(out)
}

/// Store a mark (`sent`: the time it was delivered; `None` when only armed or given up).
async fn mark(
    store: &Store,
    review: &str,
    notifier: &str,
    slot_ms: i64,
    sent: Option<i64>,
) -> anyhow::Result<()> {
    let (r, n) = (review.to_string(), notifier.to_string());
    store
        .write(move |c| {
            c.execute(
                "INSERT INTO review_marks (review, notifier, slot, sent_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (review, notifier) DO UPDATE SET slot = excluded.slot, sent_at = excluded.sent_at",
                params![r, n, slot_ms, sent],
            )?;
            Ok(())
        })
        .await?;
    store.flush().await
}

/// The daemon's reviews: one task per `[[review]]`, until `stop`.
pub async fn run(
    config: Arc<Config>,
    store: Store,
    clock: Clock,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..config.reviews.len() {
        set.spawn(run_one(
            config.clone(),
            i,
            store.clone(),
            clock,
            stop.clone(),
        ));
    }
    while let Some(r) = set.join_next().await {
        r.context("a review task")??;
    }
    Ok(())
}

/// How long to wait when the store cannot be read (then look again).
const STORE_RETRY: Duration = Duration::from_secs(30);

async fn run_one(
    config: Arc<Config>,
    index: usize,
    store: Store,
    clock: Clock,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let review = &config.reviews[index];
    let schedule = review
        .schedule()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("review {}", review.name()))?;
    loop {
        let wait = match step(&config, index, &schedule, &store, &clock, &stop).await {
            Ok(Some(wait)) => wait,
            Ok(None) => return Ok(()),
            Err(e) => {
                // The store is unreachable (a Postgres blip): look again later.
                tracing::warn!(review = review.name(), error = %format!("{e:#}"), "review: cannot read or write its state; trying again");
                STORE_RETRY
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Do what is due now; how long to wait before looking again (`None`: stopped).
async fn step(
    config: &Arc<Config>,
    index: usize,
    schedule: &Schedule,
    store: &Store,
    clock: &Clock,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Duration>> {
    if stop.is_cancelled() {
        return Ok(None);
    }
    let review = &config.reviews[index];
    let now = clock.now_ms();
    let marks = read_marks(&store.reader()?, review)?;
    match due(schedule, &marks, now) {
        Due::Arm(list) => {
            for n in list {
                mark(store, review.name(), &n, now, None).await?;
            }
            tracing::info!(review = review.name(), schedule = %schedule, "review armed");
            Ok(Some(Duration::ZERO))
        }
        Due::Wait(next) => {
            let wait = next.map_or(Duration::from_secs(86_400), |t| {
                Duration::from_millis((t - now).max(0) as u64)
            });
            // Wake at least hourly: a host clock that was set is noticed.
            Ok(Some(wait.min(Duration::from_secs(3600))))
        }
        Due::Send { slot_ms, to } => {
            let (cfg, reader) = (config.clone(), store.clone());
            let msg = tokio::task::spawn_blocking(move || -> anyhow::Result<ReviewMessage> {
                let review = &cfg.reviews[index];
                let r = build_report(&cfg, &reader.reader()?, review, slot_ms)?;
                compose(review, &r, slot_ms)
            })
            .await??;
            for n in to {
                if !send_with_retry(config, store, clock, &n, &msg, stop).await? {
                    return Ok(None);
                }
            }
            Ok(Some(Duration::ZERO))
        }
    }
}

/// Deliver until accepted (then mark it sent), refused for good (mark it given up), or
/// stopped (`false`: not marked, the next start sends it).
async fn send_with_retry(
    config: &Config,
    store: &Store,
    clock: &Clock,
    notifier: &str,
    msg: &ReviewMessage,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let opts = config
        .notifiers
        .iter()
        .find(|n| n.name == notifier)
        .map(|n| n.config.0.delivery().clone())
        .unwrap_or_default();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let r = tokio::select! {
            _ = stop.cancelled() => return Ok(false),
            r = deliver_once(config, notifier, msg) => r,
        };
        match r {
            Ok(what) => {
                tracing::info!(review = %msg.review, notifier, slot = %crate::notify::event::iso(msg.slot_ms), attempt, "review sent: {what}");
                mark(
                    store,
                    &msg.review,
                    notifier,
                    msg.slot_ms,
                    Some(clock.now_ms()),
                )
                .await?;
                return Ok(true);
            }
            Err(e) => match e.retry() {
                Retry::Never => {
                    tracing::error!(review = %msg.review, notifier, error = %e, "review refused; giving up this one");
                    mark(store, &msg.review, notifier, msg.slot_ms, None).await?;
                    return Ok(true);
                }
                Retry::Later(after) => {
                    let d = crate::notify::retry::next_delay(
                        after,
                        attempt,
                        opts.retry_initial.0,
                        opts.retry_max.0,
                        rand::random::<f64>(),
                    );
                    tracing::warn!(review = %msg.review, notifier, error = %e, attempt, retry_in_ms = d.as_millis() as u64, "review not delivered; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(d) => {}
                    }
                }
            },
        }
    }
}

/// Human description of when a review goes next (for `watchpost review NAME`).
pub fn next_line(review: &ReviewConfig, now: DateTime<Utc>) -> String {
    match review.schedule() {
        Ok(s) => match s.next_after(now) {
            Some(t) => format!(
                "{}: {} ({}), last {}, to {}; next at {}",
                review.name(),
                s,
                "UTC",
                human(review.window()),
                review
                    .notify
                    .iter()
                    .map(|n| n.get_ref().as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            None => format!("{}: {s} never fires again", review.name()),
        },
        Err(e) => format!("{}: {e}", review.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn what_is_due() {
        let mondays = Schedule::parse("0 9 * * MON").unwrap();
        let m = |v: &[(&str, Option<&str>)]| -> Vec<(String, Option<i64>)> {
            v.iter().map(|(n, t)| (n.to_string(), t.map(ms))).collect()
        };
        let now = ms("2026-11-23T09:00:30Z"); // a Monday, just after 09:00
                                              // Never seen: armed, nothing sent.
        assert_eq!(
            due(
                &mondays,
                &m(&[("mail", None), ("hook", Some("2026-11-20T00:00:00Z"))]),
                now
            ),
            Due::Arm(vec!["mail".into()])
        );
        // Armed before the slot: the slot is owed.
        assert_eq!(
            due(&mondays, &m(&[("mail", Some("2026-11-20T00:00:00Z"))]), now),
            Due::Send {
                slot_ms: ms("2026-11-23T09:00:00Z"),
                to: vec!["mail".into()]
            }
        );
        // Sent already (a restart after sending): wait for next Monday.
        assert_eq!(
            due(&mondays, &m(&[("mail", Some("2026-11-23T09:00:00Z"))]), now),
            Due::Wait(Some(ms("2026-11-30T09:00:00Z")))
        );
        // One notifier sent, the other not yet: only the other.
        assert_eq!(
            due(
                &mondays,
                &m(&[
                    ("mail", Some("2026-11-23T09:00:00Z")),
                    ("hook", Some("2026-11-16T09:00:00Z"))
                ]),
                now
            ),
            Due::Send {
                slot_ms: ms("2026-11-23T09:00:00Z"),
                to: vec!["hook".into()]
            }
        );
        // Down for three weeks: one review, the newest slot, not three.
        assert_eq!(
            due(&mondays, &m(&[("mail", Some("2026-11-02T09:00:00Z"))]), now),
            Due::Send {
                slot_ms: ms("2026-11-23T09:00:00Z"),
                to: vec!["mail".into()]
            }
        );
        // Before the slot: wait until it.
        assert_eq!(
            due(
                &mondays,
                &m(&[("mail", Some("2026-11-16T09:00:00Z"))]),
                ms("2026-11-23T08:59:00Z")
            ),
            Due::Wait(Some(ms("2026-11-23T09:00:00Z")))
        );
    }
}
