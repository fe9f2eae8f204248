//! E-mail over TLS: a real aiosmtpd sink (tests/peers/smtp_sink.py) serving SMTPS (implicit
//! TLS) or STARTTLS (required before AUTH and MAIL) with a certificate from a private CA the
//! test makes; the notifier trusts it through `ca_file`. Without that CA the handshake fails
//! with a TLS-worded error that never carries the password.

#[path = "common/ca.rs"]
mod ca;
mod notify_harness;
#[path = "common/smtp.rs"]
mod smtp;

use std::path::Path;
use std::time::Duration;

use ca::TestCa;
use notify_harness::*;
use smtp::SmtpSink;
use watchpost::probe::Outcome::{Down, Up};

const T: Duration = Duration::from_secs(15);

/// The e-mail notifier table for `sink`, trusting `ca_file` when given.
fn mail_notifier(sink: &SmtpSink, ca_file: Option<&Path>) -> String {
    let ca = ca_file
        .map(|p| format!("ca_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        "[notifier.oncall]\nkind = \"email\"\nsmtp_url = \"{}\"\nusername_env = \"WPT_SMTP_USER\"\npassword_env = \"WPT_SMTP_PASS\"\nfrom = \"watchpost <watchpost@example.com>\"\nto = [\"oncall@example.com\"]\n{ca}{FAST}\n",
        sink.url()
    )
}

/// A TLS sink in `mode` ("implicit" or "starttls") with a certificate for 127.0.0.1 from
/// `ca`; AUTH required.
fn tls_sink(dir: &Path, ca: &TestCa, mode: &'static str) -> SmtpSink {
    let (cert, key) = ca.leaf(&["127.0.0.1"]).write(dir, "smtp");
    SmtpSink::start_tls(Some((SMTP_USER, SMTP_PASS)), mode, &cert, &key)
}

async fn delivers_with_auth(mode: &'static str) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("watchpost test mail CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let sink = tls_sink(dir.path(), &ca, mode);
    let cfg = write_config_raw(
        dir.path(),
        &["oncall"],
        &mail_notifier(&sink, Some(&ca_file)),
        THRESHOLDS,
        "",
    );
    // notify-test, then a whole incident (open, escalation, resolve) through the outbox.
    watchpost::notify::notify_test(&cfg, "oncall")
        .await
        .unwrap_or_else(|e| panic!("{mode}: {e:#}"));
    let agent = Agent::start(cfg, true).await;
    agent.both(Down).await;
    agent.both(Down).await;
    agent.both(Up).await;
    agent.both(Up).await;
    let mails = sink.wait_mails(4, T).await;
    agent.drained(T).await;
    agent.stop().await;
    let subjects: Vec<String> = mails
        .iter()
        .map(|m| m.header("subject").unwrap_or_default())
        .collect();
    assert!(subjects[0].contains("TEST"), "{subjects:?}");
    assert!(subjects[3].contains("RESOLVED"), "{subjects:?}");
    for m in &mails {
        assert_eq!(m.header("x-sink-tls").as_deref(), Some("yes"), "{mode}");
        assert_eq!(m.header("x-sink-auth").as_deref(), Some("yes"), "{mode}");
        assert_eq!(
            m.header("x-sink-rcpt-to").as_deref(),
            Some("oncall@example.com")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn starttls_with_a_private_ca_delivers_with_auth() {
    delivers_with_auth("starttls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtps_with_a_private_ca_delivers_with_auth() {
    delivers_with_auth("implicit").await;
}

/// The server's certificate is not trusted (no `ca_file`, or another CA's): a TLS-worded
/// error naming the certificate problem, without the password, and no mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untrusted_server_certificate_is_a_tls_error_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("watchpost test mail CA");
    let other = TestCa::new("somebody else's CA");
    let other_file = other.write(dir.path(), "other.pem");
    for mode in ["starttls", "implicit"] {
        let sink = tls_sink(dir.path(), &ca, mode);
        for trust in [None, Some(other_file.as_path())] {
            let cfg = write_config_raw(
                dir.path(),
                &["oncall"],
                &mail_notifier(&sink, trust),
                THRESHOLDS,
                "",
            );
            let e = match watchpost::notify::notify_test(&cfg, "oncall").await {
                Ok(()) => panic!("{mode}/{trust:?}: an untrusted certificate was accepted"),
                Err(e) => format!("{e:#}"),
            };
            eprintln!("{mode}/{}: {e}", trust.is_some());
            let lower = e.to_lowercase();
            assert!(lower.contains("tls"), "{mode}/{trust:?}: {e}");
            assert!(lower.contains("certificate"), "{mode}/{trust:?}: {e}");
            assert!(!e.contains(SMTP_PASS), "password leaked: {e}");
            assert!(sink.mails().is_empty());
        }
    }
}

/// `ca_file` is checked at load time, at its own position.
#[test]
fn ca_file_errors_point_at_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let cases = [
        (
            "smtps://127.0.0.1:4650".to_string(),
            "ca.pem".to_string(),
            "ca_file \"ca.pem\" must be an absolute path",
        ),
        (
            "smtp://127.0.0.1:2525".to_string(),
            not_pem.display().to_string(),
            "ca_file needs TLS",
        ),
        (
            "smtp://127.0.0.1:2525?tls=starttls".to_string(),
            dir.path().join("missing.pem").display().to_string(),
            "cannot read ca_file",
        ),
        (
            "smtps://127.0.0.1:4650".to_string(),
            not_pem.display().to_string(),
            "holds no PEM certificate",
        ),
    ];
    for (url, ca_file, want) in cases {
        let table = format!(
            "[notifier.oncall]\nkind = \"email\"\nsmtp_url = \"{url}\"\nfrom = \"watchpost@example.com\"\nto = [\"oncall@example.com\"]\nca_file = \"{ca_file}\"\n"
        );
        let path = write_config_file(dir.path(), &["oncall"], &table, THRESHOLDS, "");
        let text = std::fs::read_to_string(&path).unwrap();
        let e = match watchpost::config::load(&path) {
            Ok(_) => panic!("{url} {ca_file}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{e}");
        // Line and column of the ca_file value.
        let line = text.lines().position(|l| l.starts_with("ca_file")).unwrap() + 1;
        assert!(
            e.contains(&format!(":{line}:11: ")),
            "position of ca_file's value (line {line}, column 11): {e}"
        );
    }
}

/// `?tls=starttls` against a server that does not offer STARTTLS: no mail and no AUTH in
/// clear text; the error says STARTTLS is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn starttls_required_but_not_offered_fails_without_sending_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start(Some((SMTP_USER, SMTP_PASS)), false);
    let table =
        mail_notifier(&sink, None).replace(&sink.url(), &format!("{}?tls=starttls", sink.url()));
    let cfg = write_config_raw(dir.path(), &["oncall"], &table, THRESHOLDS, "");
    let e = match watchpost::notify::notify_test(&cfg, "oncall").await {
        Ok(()) => panic!("sent without STARTTLS"),
        Err(e) => format!("{e:#}"),
    };
    eprintln!("{e}");
    assert!(e.to_lowercase().contains("starttls"), "{e}");
    assert!(!e.contains(SMTP_PASS), "password leaked: {e}");
    assert!(sink.mails().is_empty());
}
