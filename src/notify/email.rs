//! E-mail over SMTP (lettre, async): `smtp://host:port` (plain, for a local relay),
//! `smtp://host:port?tls=starttls` (STARTTLS required) or `smtps://host:465` (implicit TLS);
//! credentials from the environment. Each mail has a plain-text and an HTML part. Mails of
//! one incident form a thread: the opening mail's `Message-ID` is derived from the incident
//! (so it is the same after a restart) and later mails carry it in `In-Reply-To` and
//! `References`.
//!
//! SMTP 5xx answers are permanent (dead-lettered); 4xx, connection errors and timeouts are
//! retried.

use std::sync::Arc;

use anyhow::Context;
use lettre::message::{header::ContentType, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;

use super::event::{iso, Event, EventKind};
use super::{BoxFuture, Ctx, DeliveryError, DeliveryOptions, Destination, Spec};
use crate::config::{Errors, Interp, Rest, Secret, SpanError};
use crate::report::html_escape;
use crate::review::ReviewMessage;

/// `[notifier.NAME]` with `kind = "email"`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `smtp://host:port` (no TLS: localhost relays only), `smtp://host:port?tls=starttls`
    /// or `smtps://host:465`. Default ports: 25 (smtp), 587 (starttls), 465 (smtps).
    pub smtp_url: Interp,
    /// Environment variable holding the SMTP user name (with `password_env`).
    pub username_env: Option<Secret>,
    /// Environment variable holding the SMTP password.
    pub password_env: Option<Secret>,
    /// Sender, e.g. `watchpost <watchpost@example.com>`.
    pub from: Interp,
    /// Recipients.
    pub to: Vec<Interp>,
    /// Put before every subject, e.g. `[prod]`.
    #[serde(default)]
    pub subject_prefix: String,
    /// Also mail de-escalations and maintenance windows (default: open, escalation, resolve).
    #[serde(default)]
    pub all_events: bool,
    /// Absolute path of a PEM file with CA certificates to trust for the server's certificate
    /// (e.g. a private CA), in addition to the public roots. Needs smtps:// or ?tls=starttls.
    #[schemars(with = "Option<String>")]
    pub ca_file: Option<toml::Spanned<String>>,
    /// Retry, rate limit and timeout settings.
    #[serde(default)]
    pub delivery: DeliveryOptions,
}

/// How to talk to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpTarget {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    None,
    StartTls,
    Implicit,
}

/// Parse an `smtp_url`.
pub fn parse_smtp_url(s: &str) -> Result<SmtpTarget, String> {
    let u = url::Url::parse(s).map_err(|e| format!("invalid smtp_url {s:?}: {e}"))?;
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("smtp_url {s:?} has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if !u.username().is_empty() || u.password().is_some() {
        return Err("put SMTP credentials in username_env/password_env, not in smtp_url".into());
    }
    let tls_q = u
        .query_pairs()
        .find(|(k, _)| k == "tls")
        .map(|(_, v)| v.to_string());
    if let Some((k, _)) = u.query_pairs().find(|(k, _)| k != "tls") {
        return Err(format!(
            "unknown smtp_url parameter {k:?} (only tls=starttls|none)"
        ));
    }
    let tls = match (u.scheme(), tls_q.as_deref()) {
        ("smtps", None) => SmtpTls::Implicit,
        ("smtp", None | Some("none")) => SmtpTls::None,
        ("smtp", Some("starttls" | "required")) => SmtpTls::StartTls,
        ("smtp" | "smtps", Some(other)) => {
            return Err(format!(
                "unknown tls={other:?} in smtp_url (expected starttls or none)"
            ))
        }
        (scheme, _) => {
            return Err(format!(
                "smtp_url scheme must be smtp or smtps, not {scheme:?}"
            ))
        }
    };
    let default_port = match tls {
        SmtpTls::None => 25,
        SmtpTls::StartTls => 587,
        SmtpTls::Implicit => 465,
    };
    Ok(SmtpTarget {
        host,
        port: u.port().unwrap_or(default_port),
        tls,
    })
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

pub fn parse(rest: Rest<'_>) -> Result<Arc<dyn Spec>, Errors> {
    super::parse_with::<EmailConfig, _>(rest, |c, span, errs| {
        if c.username_env.is_some() != c.password_env.is_some() {
            errs.push(SpanError::at(
                span.clone(),
                "set both username_env and password_env, or neither",
            ));
        }
        // What depends on the URL's TLS mode waits for a URL that parses.
        match parse_smtp_url(&c.smtp_url) {
            Err(m) => errs.push(SpanError::key(&["smtp_url"], m)),
            Ok(target) => {
                if c.username_env.is_some()
                    && target.tls == SmtpTls::None
                    && !is_loopback(&target.host)
                {
                    errs.push(SpanError::at(
                        span,
                        format!(
                            "refusing to send SMTP credentials unencrypted to {}: use smtps:// or ?tls=starttls",
                            target.host
                        ),
                    ));
                }
                if let Some(ca) = c.ca_file.as_ref().filter(|_| target.tls == SmtpTls::None) {
                    errs.push(SpanError::at(
                        ca.span(),
                        "ca_file needs TLS: use smtps:// or ?tls=starttls in smtp_url",
                    ));
                }
            }
        }
        if let Some(ca) = &c.ca_file {
            if !std::path::Path::new(ca.get_ref()).is_absolute() {
                errs.push(SpanError::at(
                    ca.span(),
                    format!("ca_file {:?} must be an absolute path", ca.get_ref()),
                ));
            } else {
                errs.check(crate::probe::websocket::read_ca_file(
                    std::path::Path::new("/"),
                    &c.ca_file,
                ));
            }
        }
        if let Err(e) = c.from.parse::<Mailbox>() {
            errs.push(SpanError::key(
                &["from"],
                format!("from = {:?}: {e}", c.from.as_str()),
            ));
        }
        if c.to.is_empty() {
            errs.push(SpanError::key(
                &["to"],
                "to is empty: list at least one recipient",
            ));
        }
        for t in &c.to {
            if let Err(e) = t.parse::<Mailbox>() {
                errs.push(SpanError::key(
                    &["to"],
                    format!("to: {:?}: {e}", t.as_str()),
                ));
            }
        }
    })
}

impl Spec for EmailConfig {
    fn kind(&self) -> &'static str {
        "email"
    }
    fn delivery(&self) -> &DeliveryOptions {
        &self.delivery
    }
    fn accepts(&self, ev: &Event) -> bool {
        self.all_events
            || matches!(
                ev.kind,
                EventKind::Opened | EventKind::Escalated | EventKind::Resolved | EventKind::Test
            )
    }
    fn carries_reviews(&self) -> bool {
        true
    }
    fn build(&self) -> anyhow::Result<Arc<dyn Destination>> {
        let target = parse_smtp_url(&self.smtp_url).map_err(anyhow::Error::msg)?;
        let mut params = TlsParameters::builder(target.host.clone());
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca.get_ref())
                .with_context(|| format!("reading ca_file {}", ca.get_ref()))?;
            let cert =
                Certificate::from_pem(&pem).with_context(|| format!("ca_file {}", ca.get_ref()))?;
            params = params.add_root_certificate(cert);
        }
        let tls = match target.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::StartTls => Tls::Required(params.build_rustls()?),
            SmtpTls::Implicit => Tls::Wrapper(params.build_rustls()?),
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(target.host.clone())
            .port(target.port)
            .tls(tls)
            .timeout(Some(self.delivery.timeout.0));
        if let (Some(u), Some(p)) = (&self.username_env, &self.password_env) {
            b = b.credentials(Credentials::new(
                u.expose().to_string(),
                p.expose().to_string(),
            ));
        }
        let from: Mailbox = self
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("from: {e}"))?;
        let to = self
            .to
            .iter()
            .map(|t| {
                t.parse::<Mailbox>()
                    .map_err(|e| anyhow::anyhow!("to {:?}: {e}", t.as_str()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Arc::new(Mailer {
            transport: b.build(),
            from,
            to,
            prefix: self.subject_prefix.clone(),
        }))
    }
}

struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    prefix: String,
}

/// Keep only characters safe in a Message-ID local part.
fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// The thread root of an incident: stable across restarts (no stored state needed).
pub fn thread_id(ev: &Event, domain: &str) -> String {
    format!(
        "<watchpost.{}.{}.{}@{}>",
        slug(&ev.component),
        ev.incident_id.unwrap_or(0),
        ev.opened_at.unwrap_or(ev.at),
        domain
    )
}

/// The HTML part: the same facts as the text part, as a small table.
pub fn html_body(ev: &Event) -> String {
    let color = match ev.tag() {
        "DOWN" => "#c0392b",
        "DEGRADED" => "#d68910",
        "RESOLVED" | "OPERATIONAL" => "#1e8449",
        _ => "#2e4053",
    };
    let mut rows = vec![
        ("Component", ev.component.clone()),
        ("Status", ev.status.human().to_string()),
    ];
    if let Some(c) = &ev.cause {
        let label = if ev.is_resolve() {
            "Last error"
        } else {
            "Cause"
        };
        rows.push((label, format!("{} [{}] {}", c.member, c.class, c.message)));
    }
    rows.extend(ev.alert_lines());
    if let Some(o) = ev.opened_at.filter(|_| !ev.test) {
        rows.push(("Opened", iso(o)));
    }
    if ev.is_resolve() {
        rows.push((
            "Duration",
            super::event::human_span(ev.duration_ms().unwrap_or(0)),
        ));
    }
    if let Some(n) = ev.note.as_ref().filter(|_| !ev.test) {
        rows.push(("Note", n.clone()));
    }
    if ev.flapping {
        rows.push((
            "Flapping",
            "yes: held in one incident until it settles".into(),
        ));
    }
    rows.push(("Seen from", format!("{} at {}", ev.location, iso(ev.at))));
    let table: String = rows
        .iter()
        .map(|(k, v)| {
            format!(
                "<tr><th align=\"left\" style=\"padding:2px 12px 2px 0\">{k}</th><td>{}</td></tr>",
                html_escape(v)
            )
        })
        .collect();
    format!(
        "<!doctype html><html><body style=\"font-family:sans-serif\"><h2 style=\"color:{color}\">{}</h2><table>{table}</table><p style=\"color:#777\">Sent by watchpost.</p></body></html>",
        html_escape(&ev.title())
    )
}

impl Mailer {
    fn message(&self, ev: &Event) -> Result<Message, DeliveryError> {
        let domain = self.from.email.domain().to_string();
        let root = thread_id(ev, &domain);
        let subject = if self.prefix.is_empty() {
            ev.title()
        } else {
            format!("{} {}", self.prefix, ev.title())
        };
        let mut b = Message::builder().from(self.from.clone()).subject(subject);
        for t in &self.to {
            b = b.to(t.clone());
        }
        b = if ev.kind == EventKind::Opened || ev.test {
            b.message_id(Some(root))
        } else {
            let own = format!(
                "<watchpost.{}.{}.{}.{}@{}>",
                slug(&ev.component),
                ev.incident_id.unwrap_or(0),
                ev.kind.as_str(),
                ev.at,
                domain
            );
            b.message_id(Some(own))
                .in_reply_to(root.clone())
                .references(root)
        };
        let body = MultiPart::alternative()
            .singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_PLAIN)
                    .body(ev.body_text()),
            )
            .singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_HTML)
                    .body(html_body(ev)),
            );
        b.multipart(body)
            .map_err(|e| DeliveryError::Invalid(format!("building the mail: {e}")))
    }

    /// A review: the HTML report as the HTML part, the summary as the text part.
    fn review_message(&self, r: &ReviewMessage) -> Result<Message, DeliveryError> {
        let subject = if self.prefix.is_empty() {
            r.subject.clone()
        } else {
            format!("{} {}", self.prefix, r.subject)
        };
        let id = format!(
            "<watchpost.review.{}.{}@{}>",
            slug(&r.review),
            r.slot_ms,
            self.from.email.domain()
        );
        let mut b = Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .message_id(Some(id));
        for t in &self.to {
            b = b.to(t.clone());
        }
        let body = MultiPart::alternative()
            .singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_PLAIN)
                    .body(r.text.clone()),
            )
            .singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_HTML)
                    .body(r.html.clone()),
            );
        b.multipart(body)
            .map_err(|e| DeliveryError::Invalid(format!("building the mail: {e}")))
    }

    async fn send(&self, ctx: &Ctx, ev: &Event) -> Result<(), DeliveryError> {
        self.transmit(ctx, self.message(ev)?).await
    }

    async fn transmit(&self, ctx: &Ctx, msg: Message) -> Result<(), DeliveryError> {
        ctx.turn().await;
        let t = ctx.timeout;
        match tokio::time::timeout(t, self.transport.send(msg)).await {
            Err(_) => Err(DeliveryError::Timeout(t)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.is_permanent() => Err(DeliveryError::Rejected(super::error_chain(&e))),
            Ok(Err(e)) if e.is_transient() => Err(DeliveryError::Transient(super::error_chain(&e))),
            Ok(Err(e)) if e.is_timeout() => Err(DeliveryError::Timeout(t)),
            Ok(Err(e)) => Err(DeliveryError::Network(match tls_failure(&e) {
                Some(t) => t,
                None => super::error_chain(&e),
            })),
        }
    }
}

/// A TLS failure inside a lettre error, as a sentence. lettre reports a failed handshake as a
/// "connection error" wrapping an I/O error wrapping the rustls error; find the latter.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(x) = cur {
        let inner = x
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        if let Some(t) = x
            .downcast_ref::<rustls::Error>()
            .or_else(|| inner.and_then(|i| i.downcast_ref::<rustls::Error>()))
        {
            let hint = match t {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                    " (the server's certificate is not signed by a trusted CA; set ca_file to trust a private one)"
                }
                _ => "",
            };
            return Some(format!(
                "TLS handshake with the SMTP server failed: {t}{hint}"
            ));
        }
        cur = inner.or_else(|| x.source());
    }
    None
}

impl Destination for Mailer {
    fn deliver<'a>(
        &'a self,
        ctx: &'a Ctx,
        ev: &'a Event,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(self.send(ctx, ev))
    }

    fn test<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let ev = Event::test(&ctx.location, chrono::Utc::now().timestamp_millis());
            self.send(ctx, &ev).await?;
            let to: Vec<String> = self.to.iter().map(|t| t.email.to_string()).collect();
            Ok(format!("sent a test mail to {}", to.join(", ")))
        })
    }

    fn review<'a>(
        &'a self,
        ctx: &'a Ctx,
        msg: &'a ReviewMessage,
    ) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            self.transmit(ctx, self.review_message(msg)?).await?;
            let to: Vec<String> = self.to.iter().map(|t| t.email.to_string()).collect();
            Ok(format!("mailed the review to {}", to.join(", ")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls() {
        let t = |h: &str, p, tls| {
            Ok(SmtpTarget {
                host: h.into(),
                port: p,
                tls,
            })
        };
        let table = [
            ("smtp://127.0.0.1:2525", t("127.0.0.1", 2525, SmtpTls::None)),
            (
                "smtp://mail.example.com",
                t("mail.example.com", 25, SmtpTls::None),
            ),
            (
                "smtp://mail.example.com?tls=starttls",
                t("mail.example.com", 587, SmtpTls::StartTls),
            ),
            (
                "smtps://smtp.example.com:465",
                t("smtp.example.com", 465, SmtpTls::Implicit),
            ),
            (
                "smtps://smtp.example.com",
                t("smtp.example.com", 465, SmtpTls::Implicit),
            ),
        ];
        for (u, want) in table {
            assert_eq!(parse_smtp_url(u), want, "{u}");
        }
        for bad in [
            "http://x",
            "smtp://",
            "smtp://u:p@h",
            "smtp://h?tls=maybe",
            "smtp://h?foo=1",
        ] {
            assert!(parse_smtp_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn thread_ids_are_stable() {
        let mut ev = Event::test("x", 5);
        ev.test = false;
        ev.component = "Realtime Transcription".into();
        ev.incident_id = Some(9);
        ev.opened_at = Some(1000);
        assert_eq!(
            thread_id(&ev, "example.com"),
            "<watchpost.realtime-transcription.9.1000@example.com>"
        );
        assert!(html_body(&ev).contains("Realtime Transcription"));
        ev.component = "<b>".into();
        assert!(!html_body(&ev).contains("<b>"));
    }
}
