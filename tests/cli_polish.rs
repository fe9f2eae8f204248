//! The command line as a person meets it: a closed pipe is a quiet end, usage errors exit 3
//! and say what to do, a missing config says where it looked.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::http::{http_probe, TestConfig};
use tokio::process::Command;

fn watchpost() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_watchpost"));
    c.env_remove("WATCHPOST_CONFIG").kill_on_drop(true);
    c
}

async fn output(mut c: Command) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(20), c.output())
        .await
        .expect("finishes")
        .expect("spawn")
}

fn good_config() -> TestConfig {
    TestConfig::with_probe("p.toml", &http_probe("p", "http://127.0.0.1:9/health", ""))
}

#[tokio::test]
async fn a_closed_stdout_is_a_quiet_exit_0() {
    let t = good_config();
    for args in [
        &["validate"][..],
        &["incidents"][..],
        &["check", "--json"][..],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader); // nobody will ever read: every write is EPIPE
        let mut c = watchpost();
        c.arg("-c").arg(t.main_path()).args(args);
        c.stdout(Stdio::from(writer)).stderr(Stdio::piped());
        let o = output(c).await;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        // `check` keeps its own exit code (the probe is down), the others end with 0.
        let want = if args[0] == "check" { 2 } else { 0 };
        assert_eq!(o.status.code(), Some(want), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn notify_test_of_an_unknown_notifier_is_a_usage_error() {
    let t = good_config();
    let mut c = watchpost();
    c.arg("-c")
        .arg(t.main_path())
        .args(["notify-test", "nosuch"]);
    let o = output(c).await;
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unknown notifier \"nosuch\" (configured: none)"),
        "{err}"
    );
}

#[tokio::test]
async fn demo_refuses_a_config_it_would_ignore() {
    let mut c = watchpost();
    c.args(["-c", "my.toml", "demo", "--for", "1s"]);
    let o = output(c).await;
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("demo runs its own embedded config"), "{err}");
}

#[tokio::test]
async fn a_missing_config_says_where_it_looked_and_how_to_point_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = watchpost();
    c.current_dir(dir.path()).arg("validate");
    let o = output(c).await;
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("config/watchpost.toml: cannot read config file (relative to "),
        "{err}"
    );
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(err.contains("-c FILE or WATCHPOST_CONFIG"), "{err}");
    assert!(!err.contains(":1:1:"), "{err}");
}
