//! One listen session on an open socket: send the paced audio, read what comes back into
//! the [`Transcript`], decide when the wait for the final transcript is over, and hand what
//! was heard to the pure [`judge`]. Failures that end a session early (a close mid-stream,
//! `stt_failed`, a malformed message, the run's timeout) are decided here, where they
//! happen. Dialect differences come from [`Wire`](super::Wire); none are spelled out here.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};

use super::judge::{self, Ending, Heard, Rules, EXCERPT};
use super::transcript::Transcript;
use super::{Event, ListenSpec, SessionStats, Wire};
use crate::chaos::fault::{garble_frame, Mode};
use crate::config::duration::human;
use crate::probe::assert::excerpt;
use crate::probe::websocket::{self as wsock, close_text, secs, Failure, Ws};
use crate::probe::{Attempt, ErrorClass};

/// Longest transcript kept in a run's details, in bytes.
const DETAIL_TEXT: usize = 1000;

pub(super) struct Session<'a> {
    spec: &'a ListenSpec,
    wire: &'a dyn Wire,
    timeout: Duration,
    ws: &'a mut Ws,
    a: &'a mut Attempt,
    stats: &'a mut SessionStats,
    connected_at: Instant,
    deadline: Instant,
    heard: Transcript,
    /// Index of the next audio frame.
    next: usize,
    first_frame_at: Option<Instant>,
    last_sent: Instant,
    service_degraded: Option<String>,
    /// The service is in degraded batch mode: results arrive once per this interval.
    batch: Option<Duration>,
    /// When `stt_degraded` arrived (until `stt_recovered`).
    degraded_at: Option<Instant>,
    server_error: Option<String>,
    closed_by_server: bool,
    keepalives: u64,
    /// A rehearsal fault met inside the session (`ws_close`, `garble`, `stt_degraded`).
    fault: Option<&'a Mode>,
}

impl<'a> Session<'a> {
    pub(super) fn new(
        spec: &'a ListenSpec,
        timeout: Duration,
        ws: &'a mut Ws,
        deadline: Instant,
        a: &'a mut Attempt,
        stats: &'a mut SessionStats,
    ) -> Self {
        let now = Instant::now();
        Session {
            spec,
            wire: spec.dialect.wire(),
            timeout,
            ws,
            a,
            stats,
            connected_at: now,
            deadline,
            heard: Transcript::default(),
            next: 0,
            first_frame_at: None,
            last_sent: now,
            service_degraded: None,
            batch: None,
            degraded_at: None,
            server_error: None,
            closed_by_server: false,
            keepalives: 0,
            fault: None,
        }
    }

    /// Meet a rehearsal fault: `stt_degraded` arrives as the service's own event would, right
    /// away; `ws_close` arrives as the server's close frame `after` the connect; `garble`
    /// sends the utterance backwards.
    pub(super) fn with_fault(mut self, fault: Option<&'a Mode>) -> Self {
        self.fault = fault;
        self
    }

    /// When a rehearsal's `ws_close` is due.
    fn fault_close_at(&self) -> Option<Instant> {
        match self.fault {
            Some(Mode::WsClose { after, .. }) => Some(self.connected_at + *after),
            _ => None,
        }
    }

    /// Stream, wait, judge. `Ok(true)` when the server already closed the socket; the
    /// verdict is on the attempt.
    pub(super) async fn run(mut self) -> Result<bool, Failure> {
        if let Some(Mode::SttDegraded) = self.fault {
            let ev = Event::Status {
                status: "stt_degraded".into(),
                text: "rehearsal".into(),
                batch: None,
                degraded_for: None,
            };
            self.on_event(ev, Instant::now(), Duration::ZERO)?;
        }
        let ending = self.wait().await?;
        if let Ending::Complete(how) = ending {
            if let Some(wait) = self.wire.linger_after(how) {
                self.linger(wait).await;
            }
        }
        self.judge(ending);
        Ok(self.closed_by_server)
    }

    fn audio_done(&self) -> Option<Instant> {
        self.stats.last_frame_at
    }

    fn since_connect(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.connected_at)
    }

    /// When the next audio frame is due.
    fn send_at(&self) -> Option<Instant> {
        let per_frame = self.spec.chunk.div_f64(self.spec.speed);
        let start = self.connected_at + self.spec.idle_before;
        (self.next < self.spec.frames.len()).then(|| start + per_frame.mul_f64(self.next as f64))
    }

    /// A keepalive is due only when no audio frame is due first: before the stream starts
    /// (`idle_before`) and after it ends.
    fn keepalive_at(&self, send_at: Option<Instant>) -> Option<Instant> {
        self.wire.keepalive_message()?;
        let due = self.last_sent + self.spec.keepalive?;
        send_at.is_none_or(|t| t > due).then_some(due)
    }

    /// A transcript is waiting to settle: `final_timeout` no longer ends the wait. In batch
    /// mode only a batch that arrived after the last audio frame holds all of it; text from
    /// an earlier batch is a part, and the wait goes on for the next batch.
    fn settling(&self) -> bool {
        let Some(done) = self.audio_done() else {
            return false;
        };
        self.wire.settles()
            && !self.heard.is_empty()
            && (self.batch.is_none() || self.heard.last_change.is_some_and(|c| c >= done))
    }

    /// `final_timeout` after the last audio frame — plus one batch interval while the
    /// service transcribes in batches (still bounded by the run's timeout).
    fn final_deadline(&self) -> Option<Instant> {
        let done = self.audio_done()?;
        let batch = self.batch.unwrap_or(Duration::ZERO);
        (!self.settling()).then(|| done + self.spec.final_timeout + batch)
    }

    fn settle_at(&self) -> Option<Instant> {
        let done = self.audio_done()?;
        let changed = self.heard.last_change?;
        self.settling()
            .then(|| changed.max(done) + self.spec.settle)
    }

    async fn wait(&mut self) -> Result<Ending, Failure> {
        // Three timers for the whole session, moved only when their deadline changes: a
        // fresh timer per loop turn (per frame and per message) cost a timer-wheel
        // registration and removal each, thousands a second at 1,000 sessions.
        let send_sleep = tokio::time::sleep_until(self.deadline);
        let close_sleep = tokio::time::sleep_until(self.deadline);
        let timer_sleep = tokio::time::sleep_until(self.deadline);
        tokio::pin!(send_sleep, close_sleep, timer_sleep);
        loop {
            let send_at = self.send_at();
            let timer = [
                self.keepalive_at(send_at),
                self.final_deadline(),
                self.settle_at(),
            ]
            .into_iter()
            .flatten()
            .fold(self.deadline, Instant::min);
            let close_at = self.fault_close_at();
            for (sleep, at) in [
                (send_sleep.as_mut(), send_at),
                (close_sleep.as_mut(), close_at),
                (timer_sleep.as_mut(), Some(timer)),
            ] {
                if let Some(at) = at.filter(|&at| at != sleep.deadline() || sleep.is_elapsed()) {
                    sleep.reset(at);
                }
            }
            let ended = tokio::select! {
                biased;
                _ = &mut send_sleep, if send_at.is_some() => {
                    self.send_frame(send_at.unwrap_or(self.deadline)).await?;
                    None
                }
                msg = self.ws.next() => self.on_message(msg)?,
                _ = &mut close_sleep, if close_at.is_some() => {
                    let Some(Mode::WsClose { code, reason, .. }) = self.fault else { continue };
                    let frame = tungstenite::protocol::CloseFrame {
                        code: (*code).into(),
                        reason: reason.clone().into(),
                    };
                    let since = self.since_connect(Instant::now());
                    Some(self.on_close(Some(frame), since)?)
                }
                _ = &mut timer_sleep => self.on_timer(send_at).await?,
            };
            if let Some(e) = ended {
                return Ok(e);
            }
        }
    }

    async fn send_frame(&mut self, due: Instant) -> Result<(), Failure> {
        let spec = self.spec;
        let n = spec.frames.len();
        let frame = match self.fault {
            Some(Mode::Garble) => garble_frame(&spec.frames[n - 1 - self.next]).into(),
            _ => spec.frames[self.next].clone(),
        };
        let next = self.next;
        // The phases start when a frame is handed to the socket. Read the clock before the
        // write, not after: on loopback or a busy host the write wakes the reader, which may
        // take this CPU the moment the write returns, and a clock read after that wait would
        // shorten the phases (understate the service's latency).
        let sending = Instant::now();
        self.send(Message::Binary(frame), || {
            format!("audio frame {} of {n}", next + 1)
        })
        .await?;
        let sent = Instant::now();
        self.stats
            .lateness
            .push(sent.saturating_duration_since(due));
        self.last_sent = sent;
        self.first_frame_at.get_or_insert(sending);
        self.next += 1;
        if self.next == n {
            self.stats.last_frame_at = Some(sending);
            for m in self.wire.end_messages() {
                self.send(Message::text(m.to_string()), || {
                    "the end-of-stream message".into()
                })
                .await?;
            }
            self.last_sent = Instant::now();
        }
        Ok(())
    }

    async fn on_timer(&mut self, send_at: Option<Instant>) -> Result<Option<Ending>, Failure> {
        let now = Instant::now();
        if now >= self.deadline {
            if self.settling() {
                return Ok(Some(Ending::Unsettled));
            }
            let n = self.spec.frames.len();
            let phase = match self.audio_done() {
                None if self.first_frame_at.is_none() => "before the audio started".to_string(),
                None => format!("while streaming audio (frame {} of {n} sent)", self.next),
                Some(t) => format!(
                    "while waiting for the final transcript ({} after the last audio frame)",
                    secs(now.saturating_duration_since(t))
                ),
            };
            return Err(Failure::new(
                ErrorClass::Timeout,
                format!(
                    "the {} timeout hit {phase}{}{}",
                    human(self.timeout),
                    self.heard_suffix(),
                    self.degraded_suffix()
                ),
            ));
        }
        if self.settle_at().is_some_and(|t| now >= t) {
            return Ok(Some(Ending::Settled));
        }
        if self.final_deadline().is_some_and(|t| now >= t) {
            return Ok(Some(Ending::FinalTimeout));
        }
        if self.keepalive_at(send_at).is_some_and(|t| now >= t) {
            if let Some(m) = self.wire.keepalive_message() {
                self.send(Message::text(m.to_string()), || "a keepalive".into())
                    .await?;
                self.last_sent = Instant::now();
                self.keepalives += 1;
                self.a.detail("keepalives", self.keepalives);
            }
        }
        Ok(None)
    }

    fn on_message(
        &mut self,
        msg: Option<Result<Message, tungstenite::Error>>,
    ) -> Result<Option<Ending>, Failure> {
        // When the message reached the socket, not when this task got to read it: a busy
        // agent's own wait is not the service's latency.
        let at = wsock::arrived(self.ws).unwrap_or_else(Instant::now);
        let since = self.since_connect(at);
        let msg = match msg {
            None => {
                return Err(self.closed_failure(
                    None,
                    "the connection ended without a close frame",
                    since,
                ));
            }
            Some(Err(e)) => {
                let mut f = wsock::read_error(&e, self.spec.max_message_bytes, since);
                if f.class == ErrorClass::WsClosed {
                    f.message.push_str(&self.heard_suffix());
                }
                return Err(f);
            }
            Some(Ok(m)) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) if self.wire.ignores_binary() => return Ok(None),
            Message::Binary(b) => {
                return Err(Failure::new(
                    ErrorClass::Protocol,
                    format!(
                        "server sent an unexpected binary message ({} bytes) after {}",
                        b.len(),
                        secs(since)
                    ),
                ))
            }
            Message::Close(frame) => return self.on_close(frame, since).map(Some),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(None),
        };
        let ev = self.wire.parse(&text).map_err(|why| {
            Failure::new(
                ErrorClass::Protocol,
                format!(
                    "server sent a malformed message after {} ({}): {}",
                    secs(since),
                    excerpt(&why, EXCERPT),
                    excerpt(&text, 120)
                ),
            )
        })?;
        self.on_event(ev, at, since)
    }

    /// The server closed: remember that, keep its code and (an excerpt of) its reason.
    fn record_close(&mut self, frame: &Option<tungstenite::protocol::CloseFrame>) -> (u16, String) {
        self.closed_by_server = true;
        let (code, text) = close_text(frame);
        self.a.detail("close_code", code);
        self.a.detail(
            "close_reason",
            frame
                .as_ref()
                .map(|f| excerpt(&f.reason, 120))
                .unwrap_or_default(),
        );
        (code, text)
    }

    fn on_close(
        &mut self,
        frame: Option<tungstenite::protocol::CloseFrame>,
        since: Duration,
    ) -> Result<Ending, Failure> {
        let (code, reason_text) = self.record_close(&frame);
        if code == 1000 && self.audio_done().is_some() {
            return Ok(Ending::Complete("close 1000"));
        }
        let what = format!("server closed the socket with {reason_text}");
        let mut f = self.closed_failure(Some(code), &what, since);
        if let Some(e) = &self.server_error {
            f.message
                .push_str(&format!(" (server error: {})", excerpt(e, EXCERPT)));
        }
        if self.audio_done().is_none() {
            f.message.push_str(&format!(
                " while audio was streaming (frame {} of {} sent)",
                self.next,
                self.spec.frames.len()
            ));
        }
        Err(f)
    }

    fn on_event(
        &mut self,
        ev: Event,
        at: Instant,
        since: Duration,
    ) -> Result<Option<Ending>, Failure> {
        let completes = self.audio_done().and_then(|_| self.wire.completes(&ev));
        match ev {
            Event::Ignore => {}
            Event::Results {
                text,
                is_final,
                request_id,
                ..
            } => {
                if self.stats.request_id.is_none() {
                    self.stats.request_id = request_id;
                }
                if is_final {
                    self.heard.final_result(&text, self.wire.replaces(), at);
                } else {
                    self.heard.interim_result(&text, at);
                }
            }
            Event::Segments(segs) => self.heard.segments(segs, at),
            Event::SegmentsDeleted(ids) => self.heard.delete(&ids, at),
            Event::Status {
                status,
                text,
                batch,
                degraded_for,
            } => {
                let line = excerpt(
                    &if text.is_empty() {
                        status.clone()
                    } else {
                        format!("{status}: {text}")
                    },
                    EXCERPT,
                );
                self.a.detail("service_status", line.clone());
                let said = format!(
                    "server reported service_status {line} after {}",
                    secs(since)
                );
                match status.as_str() {
                    "stt_degraded" => {
                        self.service_degraded.get_or_insert(said);
                        self.degraded_at.get_or_insert(at);
                        if let Some(b) = batch {
                            self.batch = Some(b);
                            self.a.detail("batch_interval_ms", crate::probe::ms(b));
                        }
                    }
                    "stt_recovered" => {
                        // The degraded stretch is over: record how long it lasted (the
                        // server's figure when it gives one) and judge the rest as normal.
                        let measured = self
                            .degraded_at
                            .take()
                            .map(|d| at.saturating_duration_since(d));
                        if let Some(d) = degraded_for.or(measured) {
                            self.a.detail("service_degraded_ms", crate::probe::ms(d));
                        }
                        self.service_degraded = None;
                        self.batch = None;
                    }
                    "stt_failed" => {
                        return Err(Failure::new(
                            ErrorClass::SttFailed,
                            format!("{said}{}", self.heard_suffix()),
                        ))
                    }
                    _ => {}
                }
            }
            Event::Done { request_id } => {
                if self.stats.request_id.is_none() {
                    self.stats.request_id = request_id;
                }
                if self.audio_done().is_some() {
                    self.heard.last_final.get_or_insert(at);
                }
            }
            Event::Connected { request_id } => {
                if self.stats.request_id.is_none() {
                    self.stats.request_id = request_id;
                }
            }
            Event::ServerError(e) => {
                let e = excerpt(&e, EXCERPT);
                self.a.detail("server_error", e.clone());
                self.server_error = Some(e);
            }
        }
        Ok(completes.map(Ending::Complete))
    }

    /// Keep reading for up to `wait` to record the server's close frame.
    async fn linger(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(until, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => {
                    self.record_close(&frame);
                    return;
                }
                Ok(Some(Ok(_))) => continue,
                _ => return,
            }
        }
    }

    /// Hand what was heard to the judge and record its verdict.
    fn judge(&mut self, ending: Ending) {
        let s = self.spec;
        let now = Instant::now();
        let last_frame = self.audio_done().unwrap_or(self.connected_at);
        let since_last = |t: Instant| t.saturating_duration_since(last_frame);
        let text = self.heard.text();
        let final_at = if self.wire.settles() {
            self.heard.last_change
        } else {
            self.heard.last_final
        };
        let heard = Heard {
            text: &text,
            interim: self.heard.interim(),
            final_count: self.heard.final_count,
            truncated: self.heard.truncated(),
            final_at: final_at.map(since_last),
            ended_at: since_last(now),
            first_result: self
                .first_frame_at
                .zip(self.heard.first_result)
                .map(|(first, fr)| fr.saturating_duration_since(first)),
            service_degraded: self.service_degraded.as_deref(),
        };
        let rules = Rules {
            expect: &s.expect,
            final_timeout: s.final_timeout,
            settle: s.settle,
            timeout: self.timeout,
            unfinished: self.wire.unfinished(),
        };
        let v = judge::judge(&heard, &rules, ending);

        let a = &mut *self.a;
        a.detail("frames", s.frames.len() as u64);
        a.detail("audio_ms", crate::probe::ms(s.audio.duration()));
        a.detail("interim_results", self.heard.interim_count);
        a.detail("final_results", self.heard.final_count);
        if self.heard.truncated() {
            a.detail("transcript_truncated", true);
        }
        a.detail("text", excerpt(&v.judged, DETAIL_TEXT));
        if let Some(t) = &s.expect.transcript {
            a.detail("expected", excerpt(t, DETAIL_TEXT));
        }
        if let Some(w) = v.wer {
            a.detail("wer", w);
        }
        if let Some(how) = v.completed_by {
            a.detail("completed_by", how);
        }
        for (name, d) in &v.phases {
            a.phase(name, *d);
            if *name == "final" {
                self.stats.final_at = Some(last_frame + *d);
            }
        }
        match v.error {
            Some((class, msg)) if v.outcome == crate::probe::Outcome::Down => {
                let suffix = self.degraded_suffix();
                self.a.down(class, format!("{msg}{suffix}"));
            }
            Some((class, msg)) => {
                a.degrade(class, msg);
            }
            None => {}
        }
    }

    /// Send one message; `what` names it in an error (formatted only then).
    async fn send(&mut self, m: Message, what: impl FnOnce() -> String) -> Result<(), Failure> {
        match tokio::time::timeout_at(self.deadline, self.ws.send(m)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                // The peer may have closed with a reason we have not read yet: look briefly.
                let since = self.since_connect(Instant::now());
                if let Ok(Some(Ok(Message::Close(frame)))) =
                    tokio::time::timeout(Duration::from_millis(200), self.ws.next()).await
                {
                    let (code, text) = close_text(&frame);
                    let closed = format!("server closed the socket with {text}");
                    return Err(self.closed_failure(Some(code), &closed, since));
                }
                let f = wsock::read_error(&e, self.spec.max_message_bytes, since);
                Err(Failure::new(
                    f.class,
                    format!("cannot send {}: {}", what(), f.message),
                ))
            }
            Err(_) => Err(Failure::new(
                ErrorClass::Timeout,
                format!(
                    "the {} timeout hit while sending {} (is the server reading?)",
                    human(self.timeout),
                    what()
                ),
            )),
        }
    }

    /// `server closed the socket with 1011 NET-0001 after 10.2 s without a transcript`.
    fn closed_failure(&self, code: Option<u16>, what: &str, since: Duration) -> Failure {
        let mut f = Failure::new(
            ErrorClass::WsClosed,
            format!("{what} after {}{}", secs(since), self.heard_suffix()),
        );
        if let Some(c) = code {
            f.details.push(("close_code", Value::from(c)));
        }
        f
    }

    /// `; the service had reported service_status stt_degraded …` while it is degraded, so a
    /// failure in batch mode says so.
    fn degraded_suffix(&self) -> String {
        match &self.service_degraded {
            Some(d) => format!("; {d}"),
            None => String::new(),
        }
    }

    fn heard_suffix(&self) -> String {
        let so_far = self.heard.so_far();
        if so_far.is_empty() {
            " without a transcript".to_string()
        } else {
            format!(" (heard so far: {:?})", excerpt(&so_far, 120))
        }
    }
}
