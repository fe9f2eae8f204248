//! Secrets in configured URLs (webhook path tokens, query tokens) never reach what the agent
//! prints: the real binary's `notify-test` output, success or failure, and probe messages.

mod common;

use std::time::Duration;

use tokio::process::Command;

use common::http::{
    http_probe, message, refused_addr, run_probe, HttpServer, Reply, TestConfig, MAIN_TOML,
};

const TOKEN: &str = "T0KEN9f8e7d6c5b4a3s3cr3t";

async fn notify_test(t: &TestConfig, notifier: &str) -> (i32, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(env!("CARGO_BIN_EXE_watchpost"))
            .arg("-c")
            .arg(t.main_path())
            .args(["notify-test", notifier])
            .env_remove("WATCHPOST_CONFIG")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("notify-test finishes")
    .expect("spawn watchpost");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn config_with_webhook(url: &str) -> TestConfig {
    let srv_probe = http_probe("p", "http://127.0.0.1:9/health", "enabled = false");
    let t = TestConfig::with_probe("p.toml", &srv_probe);
    t.write(
        "watchpost.toml",
        &format!("{MAIN_TOML}\n[notifier.hook]\nkind = \"webhook\"\nurl = \"{url}\"\n"),
    );
    t
}

#[tokio::test]
async fn webhook_token_is_not_printed_when_delivery_fails() {
    let url = format!("http://{}/hooks/{TOKEN}?token={TOKEN}", refused_addr());
    let t = config_with_webhook(&url);
    let (code, text) = notify_test(&t, "hook").await;
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("test notification failed"), "{text}");
    assert!(!text.contains(TOKEN), "secret leaked: {text}");
}

#[tokio::test]
async fn webhook_token_is_not_printed_when_delivery_succeeds() {
    let srv = HttpServer::start(|_| Reply::json(200, "{}")).await;
    let t = config_with_webhook(&srv.url(&format!("/hooks/{TOKEN}?token={TOKEN}")));
    let (code, text) = notify_test(&t, "hook").await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("posted a test event to http://127.0.0.1:"),
        "{text}"
    );
    assert!(text.contains("/hooks/***?token=***"), "{text}");
    assert!(!text.contains(TOKEN), "secret leaked: {text}");
    // The request itself did go to the real URL.
    assert!(srv.requests()[0].path.contains(TOKEN));
}

#[tokio::test]
async fn probe_messages_never_carry_the_url() {
    let url = format!("http://{}/health?token={TOKEN}", refused_addr());
    let r = run_probe(&http_probe("p", &url, "")).await;
    assert!(!message(&r).contains(TOKEN), "{}", message(&r));
    assert!(!format!("{:?}", r.details).contains(TOKEN));
}
