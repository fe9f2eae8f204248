//! The HTTP probe against servers that misbehave in ways a real service does: error pages
//! that are not JSON, bodies that are not UTF-8, absurd numbers in health bodies. Each must
//! give the class a human expects, never a panic and never a false `up`.

mod common;

use common::http::{class, http_probe, message, run_probe, HttpServer, Reply};
use watchpost::probe::{ErrorClass, Outcome};

#[tokio::test]
async fn non_2xx_with_html_body_is_http_status_even_when_json_is_expected() {
    let srv = HttpServer::start(|_| {
        Reply::new(
            503,
            "text/html",
            "<html><body><h1>503 Service Unavailable</h1></body></html>",
        )
    })
    .await;
    // `subchecks` needs JSON; the status still decides first.
    let r = run_probe(&http_probe(
        "p",
        &srv.url("/health"),
        "subchecks = \"checks\"",
    ))
    .await;
    assert_eq!((r.outcome, class(&r)), (Outcome::Down, "http_status"));
    assert!(message(&r).contains("503"), "{}", message(&r));
    assert!(
        message(&r).contains("Service Unavailable"),
        "{}",
        message(&r)
    );
}

#[tokio::test]
async fn non_2xx_with_empty_json_body_is_http_status() {
    let srv = HttpServer::start(|_| Reply::new(502, "application/json", "")).await;
    let r = run_probe(&http_probe("p", &srv.url("/health"), "")).await;
    assert_eq!((r.outcome, class(&r)), (Outcome::Down, "http_status"));
    assert_eq!(message(&r), "HTTP 502 Bad Gateway");
}

#[tokio::test]
async fn invalid_utf8_in_a_json_body_is_invalid_json_not_up() {
    let mut body = b"{\"status\":\"ok\",\"service\":\"api".to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(b"\"}");
    let srv = HttpServer::start(move |_| Reply::new(200, "application/json", body.clone())).await;
    let r = run_probe(&http_probe("p", &srv.url("/health"), "")).await;
    assert_eq!((r.outcome, class(&r)), (Outcome::Down, "invalid_json"));
    assert!(message(&r).contains("not valid UTF-8"), "{}", message(&r));
}

#[tokio::test]
async fn absurd_subcheck_latency_is_ignored_not_a_panic() {
    let srv = HttpServer::json(
        200,
        r#"{"status":"ok","checks":{"db":{"status":"ok","latency_ms":1e30},
            "cache":{"status":"ok","latency_ms":-5},"queue":{"status":"ok","latency_ms":12.5}}}"#,
    )
    .await;
    let r = run_probe(&http_probe(
        "p",
        &srv.url("/health"),
        "subchecks = \"checks\"",
    ))
    .await;
    assert_eq!(r.outcome, Outcome::Up, "{:?}", r.error);
    let lat: Vec<_> = r
        .subchecks
        .iter()
        .map(|s| (s.series.as_str(), s.latency))
        .collect();
    assert_eq!(
        lat,
        vec![
            ("p/checks.db", None),
            ("p/checks.cache", None),
            (
                "p/checks.queue",
                Some(std::time::Duration::from_micros(12_500))
            ),
        ]
    );
}

#[tokio::test]
async fn every_class_in_a_run_is_a_documented_one() {
    // A grab bag of failures; whatever they produce must parse back into the closed set.
    let srv = HttpServer::start(|req| match req.path.as_str() {
        "/a" => Reply::new(200, "application/json", "{not json"),
        "/b" => Reply::json(200, r#"{"status":"fail","error":"db down"}"#),
        _ => Reply::json(207, r#"{"status":"ok"}"#),
    })
    .await;
    for (path, want) in [
        ("/a", ErrorClass::InvalidJson),
        ("/b", ErrorClass::Unhealthy),
        ("/c", ErrorClass::Degraded),
    ] {
        let r = run_probe(&http_probe("p", &srv.url(path), "")).await;
        let got = r.error.as_ref().map(|e| e.class);
        assert_eq!(got, Some(want), "{path}: {:?}", r.error);
        assert_eq!(ErrorClass::parse(class(&r)), Some(want));
    }
}

#[tokio::test]
async fn cross_origin_redirect_drops_configured_headers_and_sends_no_referer() {
    let landing = HttpServer::start(|_| Reply::json(200, r#"{"status":"ok"}"#)).await;
    let land_url = landing.url("/land");
    let start = HttpServer::start(move |r| match r.path.split('?').next().unwrap_or("") {
        "/same" => Reply::redirect("/final?token=abc"),
        "/final" => Reply::redirect(&land_url),
        _ => Reply::json(404, "{}"),
    })
    .await;
    let extra = "headers = { \"X-Api-Key\" = \"k3y\", Authorization = \"Bearer t0k\" }";
    let r = run_probe(&http_probe("p", &start.url("/same?token=abc"), extra)).await;
    assert_eq!(r.outcome, Outcome::Up, "{:?}", r.error);
    // Same origin: the configured headers went along, and never a Referer.
    let first = start.requests();
    assert_eq!(first.len(), 2);
    for req in &first {
        assert_eq!(req.header("x-api-key"), Some("k3y"), "{}", req.path);
        assert_eq!(req.header("referer"), None);
    }
    // Another origin (another port): none of the configured headers, no Referer.
    let hit = &landing.requests()[0];
    assert_eq!(hit.path, "/land");
    assert_eq!(hit.header("x-api-key"), None);
    assert_eq!(hit.header("authorization"), None);
    assert_eq!(hit.header("referer"), None);
    assert!(hit
        .header("user-agent")
        .unwrap_or("")
        .starts_with("watchpost/"));
}

#[tokio::test]
async fn redirect_loop_is_too_many_redirects_without_the_query() {
    let srv = HttpServer::start(|_| Reply::redirect("/loop?token=s3cret")).await;
    let r = run_probe(&http_probe("p", &srv.url("/loop"), "max_redirects = 3")).await;
    assert_eq!(
        (r.outcome, class(&r)),
        (Outcome::Down, "too_many_redirects")
    );
    assert!(
        message(&r).contains("more than 3 redirects"),
        "{}",
        message(&r)
    );
    assert!(!message(&r).contains("s3cret"), "{}", message(&r));
    assert_eq!(srv.requests().len(), 4);
}

#[tokio::test]
async fn see_other_after_post_continues_as_get_without_body() {
    let srv = HttpServer::start(|r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", "/submit") => Reply::new(303, "text/plain", "").header("Location", "/result"),
        ("GET", "/result") if r.body.is_empty() => Reply::json(200, r#"{"status":"ok"}"#),
        _ => Reply::json(400, r#"{"error":"unexpected"}"#),
    })
    .await;
    let extra = "method = \"POST\"\nbody = \"{}\"";
    let r = run_probe(&http_probe("p", &srv.url("/submit"), extra)).await;
    assert_eq!(r.outcome, Outcome::Up, "{:?}", r.error);
}

#[tokio::test]
async fn changing_subcheck_names_are_capped_per_probe() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let srv = HttpServer::start(move |_| {
        // Every answer: 50 fresh names, one stable one, one absurdly long one.
        let round = n.fetch_add(1, Ordering::SeqCst);
        let mut checks: Vec<String> = (0..50)
            .map(|i| format!("\"svc-{round}-{i}\":{{\"status\":\"ok\"}}"))
            .collect();
        checks.push("\"db\":{\"status\":\"ok\",\"latency_ms\":3}".into());
        checks.push(format!("\"{}\":{{\"status\":\"ok\"}}", "x".repeat(500)));
        Reply::json(
            200,
            &format!("{{\"status\":\"ok\",\"checks\":{{{}}}}}", checks.join(",")),
        )
    })
    .await;
    let t = common::http::TestConfig::with_probe(
        "p.toml",
        &http_probe("p", &srv.url("/health"), "subchecks = \"checks\""),
    );
    let cfg = t.load_ok();
    let pc = cfg.probes[0].clone();
    let probe = watchpost::probe::Probe::build(&pc).unwrap();
    let mut series = std::collections::HashSet::new();
    for round in 0..4 {
        let r = watchpost::probe::run_confirmed(&probe, &pc).await;
        assert_eq!(r.outcome, Outcome::Up, "{:?}", r.error);
        for s in &r.subchecks {
            series.insert(s.series.clone());
        }
        if round > 0 {
            // Round 1 fills the cap (13 of 50 new names); after that only known series stay.
            let dropped = r.details["subchecks_dropped"].as_u64().unwrap();
            assert_eq!(dropped, if round == 1 { 38 } else { 51 }, "{:?}", r.details);
            assert!(r.subchecks.iter().any(|s| s.series == "p/checks.db"));
        }
    }
    assert_eq!(series.len(), watchpost::probe::http::MAX_SUBCHECKS);
    assert!(series.iter().all(|s| s.len() < 100), "long name recorded");
}
