//! `[budget]` keys must name a phase the probe's kind actually times: a typo would otherwise
//! be a budget that is never judged. Checked through the real loader with exact positions.

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
