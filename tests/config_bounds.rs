//! Values that would make a probe never finish, never run or never be judged are refused at
//! their position: `[budget]` keys that name no phase, absurd retries, zero or over-long
//! timeouts and jitter, an API token variable that is not set, a probe glob that matches
//! nothing. Checked through the real loader.

mod common;

use common::http::TestConfig;
use watchpost::config::Diagnostic;

fn load(probe: &str) -> Result<watchpost::config::Config, Vec<Diagnostic>> {
    let t = TestConfig::with_probe("p.toml", probe);
    let r = t.load().map_err(|e| e.0);
    drop(t);
    r
}

const HTTP: &str = "name = \"api\"\nkind = \"http\"\nurl = \"http://127.0.0.1:1/health\"\n";

#[test]
fn known_phases_of_each_kind_load() {
    let c = load(&format!(
        "{HTTP}[budget]\nttfb = {{ p95 = \"300ms\" }}\ntotal = {{ p95 = \"800ms\", run = \"2s\" }}\n"
    ))
    .expect("http phases are valid budget keys");
    let b = &c.probes[0].budget;
    assert_eq!(b.keys().collect::<Vec<_>>(), ["total", "ttfb"]);
    assert_eq!(
        b["total"].run.map(|d| d.0),
        Some(std::time::Duration::from_secs(2))
    );

    let ws = "name = \"ws\"\nkind = \"websocket\"\nurl = \"ws://127.0.0.1:1/ws\"\n\
              [[step]]\nname = \"hello\"\nsend = \"hi\"\n\
              [budget]\nconnect = { p95 = \"1s\" }\nhello = { p95 = \"1s\" }\ntotal = { p95 = \"2s\" }\n";
    load(ws).expect("websocket step names are phases");
}

#[test]
fn unknown_phase_is_an_error_at_the_key_listing_the_phases() {
    let probe =
        format!("{HTTP}[budget]\ntotal = {{ p95 = \"1s\" }}\nconect = {{ p95 = \"1s\" }}\n");
    let d = load(&probe).expect_err("typo must not load");
    assert_eq!(d.len(), 1, "{d:?}");
    let d = &d[0];
    assert!(d.file.ends_with("probes/p.toml"), "{d}");
    // Line 6 is `conect = …`, column 1 is the key.
    assert_eq!((d.line, d.col), (6, 1), "{d}");
    assert!(d.message.contains("\"conect\""), "{d}");
    assert!(d.message.contains("ttfb, total"), "{d}");
}

#[test]
fn a_websocket_phase_is_not_an_http_phase() {
    let d = load(&format!("{HTTP}[budget]\nconnect = {{ p95 = \"1s\" }}\n")).unwrap_err();
    assert_eq!(d.len(), 1);
    assert!(
        d[0].message.contains("not a phase of a http probe"),
        "{}",
        d[0]
    );
}

#[test]
fn every_bad_key_is_reported_in_one_pass() {
    let d = load(&format!(
        "{HTTP}[budget]\nfirst_result = {{ p95 = \"1s\" }}\nfinal = {{ p95 = \"1s\" }}\n"
    ))
    .unwrap_err();
    assert_eq!(d.len(), 2, "{d:?}");
}

const MAIN: &str = "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n";

/// Load with a given main file and one good probe; the diagnostics as `line:col: message`.
fn main_errors(main: &str, probe: &str) -> Vec<String> {
    let t = TestConfig::with_probe("p.toml", probe);
    t.write("watchpost.toml", main);
    match t.load() {
        Ok(_) => Vec::new(),
        Err(e) => {
            e.0.iter()
                .map(|d| {
                    let f = d.file.file_name().unwrap().to_string_lossy().to_string();
                    format!("{f}:{}:{}: {}", d.line, d.col, d.message)
                })
                .collect()
        }
    }
}

#[test]
fn probe_timing_bounds_are_reported_at_the_key() {
    let e = main_errors(
        MAIN,
        &format!(
            "{HTTP}interval = \"10s\"\ntimeout = \"0s\"\nretries = 4000000000\njitter = \"10s\"\n"
        ),
    );
    assert_eq!(
        e,
        [
            "p.toml:5:11: timeout must be longer than 0s",
            "p.toml:6:11: retries = 4000000000 is more than 10",
            "p.toml:7:10: jitter 10s must be shorter than the interval 10s",
        ],
        "{e:#?}"
    );
    let e = main_errors(
        MAIN,
        &format!("{HTTP}interval = \"2s\"\ntimeout = \"3s\"\n"),
    );
    assert_eq!(
        e,
        ["p.toml:5:11: timeout 3s is longer than the interval 2s: runs would overlap and be skipped"]
    );
    // The probe's own short interval against the inherited 5 s timeout: at the interval.
    let e = main_errors(MAIN, &format!("{HTTP}interval = \"2s\"\njitter = \"0s\"\n"));
    assert_eq!(
        e,
        ["p.toml:4:12: timeout 5s is longer than the interval 2s: runs would overlap and be skipped"]
    );
}

#[test]
fn defaults_bounds_are_reported_once_at_defaults() {
    let main = format!(
        "{MAIN}[defaults]\ninterval = \"2s\"\ntimeout = \"3s\"\nretries = 11\njitter = \"5s\"\n"
    );
    // Two probes inherit the same problems: still one report each, in the main file.
    let t = TestConfig::with_probe("p.toml", HTTP);
    t.write("watchpost.toml", &main);
    t.write("probes/q.toml", &HTTP.replace("\"api\"", "\"api2\""));
    let d = t.load().unwrap_err().0;
    let got: Vec<String> = d
        .iter()
        .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
        .collect();
    assert_eq!(
        got,
        [
            "7:11: timeout 3s is longer than the interval 2s: runs would overlap and be skipped",
            "8:11: retries = 11 is more than 10",
            "9:10: jitter 5s must be shorter than the interval 2s",
        ]
    );
}

#[test]
fn an_unset_api_token_variable_is_an_error_at_the_key() {
    let var = "WATCHPOST_TEST_TOKEN_THAT_IS_NOT_SET";
    assert!(std::env::var(var).is_err());
    let e = main_errors(&format!("{MAIN}api_token_env = \"{var}\"\n"), HTTP);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("watchpost.toml:5:17: api_token_env names WATCHPOST_TEST_TOKEN_THAT_IS_NOT_SET, which is not set"), "{e:?}");
}

#[test]
fn a_probe_glob_that_matches_nothing_is_an_error() {
    let main = "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\", \"more/*.toml\"]\nlisten = \"\"\n";
    let e = main_errors(main, HTTP);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("watchpost.toml:3:28: probe glob \"more/*.toml\" matches no file"),
        "{e:?}"
    );
}

#[test]
fn max_concurrency_zero_points_at_its_value() {
    let e = main_errors(&format!("{MAIN}max_concurrency = 0\n"), HTTP);
    assert_eq!(
        e,
        ["watchpost.toml:5:19: max_concurrency must be at least 1"]
    );
}

#[test]
fn notifier_and_probe_value_errors_point_at_the_key_not_the_table() {
    let main = format!(
        "{MAIN}\n[notifier.hook]\nkind = \"webhook\"\nurl = \"ftp://example.com/x\"\n\n\
         [notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"HOME\"\n\
         [notifier.pager.delivery]\ntimeout = \"0s\"\n"
    );
    let probe = format!("{HTTP}headers = {{ \"Bad Name\" = \"x\" }}\n");
    let e = main_errors(&main, &probe);
    assert_eq!(e.len(), 3, "{e:#?}");
    // Each at the line of the offending key, never at 1:1 or the [notifier.x] header.
    assert!(e.iter().any(|d| d.starts_with("p.toml:4:")), "{e:#?}");
    assert!(
        e.iter().any(|d| d.starts_with("watchpost.toml:8:7: url")),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|d| d.starts_with("watchpost.toml:14:11: delivery.timeout")),
        "{e:#?}"
    );
}
