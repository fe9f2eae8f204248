//! The config loader on real files: every problem is a `Diagnostic` pointing at the exact
//! `file:line:col`, and all problems of all files come back at once.

mod common;

use std::path::{Path, PathBuf};

use common::http::{TestConfig, MAIN_TOML};
use watchpost::config::Diagnostic;

/// Load and return the diagnostics, panicking if the config loads.
fn errors(t: &TestConfig) -> Vec<Diagnostic> {
    match t.load() {
        Ok(_) => panic!("config should not load"),
        Err(e) => e.0,
    }
}

/// Exactly one diagnostic; returns it.
fn single(t: &TestConfig) -> Diagnostic {
    let d = errors(t);
    assert_eq!(d.len(), 1, "expected one diagnostic, got:\n{}", show(&d));
    d.into_iter().next().unwrap()
}

fn show(d: &[Diagnostic]) -> String {
    d.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_at(d: &Diagnostic, file: &Path, line: usize, col: usize, msg_parts: &[&str]) {
    assert_eq!(
        (d.file.as_path(), d.line, d.col),
        (file, line, col),
        "diagnostic: {d}"
    );
    for p in msg_parts {
        assert!(
            d.message.contains(p),
            "message {:?} should contain {p:?}",
            d.message
        );
    }
}

const GOOD_PROBE: &str = "name = \"api\"\nkind = \"http\"\nurl = \"http://127.0.0.1:1/health\"\n";

fn with_probe(probe: &str) -> (TestConfig, PathBuf) {
    let t = TestConfig::with_probe("api.toml", probe);
    let p = t.path("probes/api.toml");
    (t, p)
}

#[test]
fn a_good_config_loads() {
    let (t, _) = with_probe(GOOD_PROBE);
    let c = t.load_ok();
    assert_eq!(c.probes.len(), 1);
    let p = &c.probes[0];
    assert_eq!((p.name.as_str(), p.kind()), ("api", "http"));
    assert_eq!(
        p.timeout,
        std::time::Duration::from_secs(1),
        "inherits [defaults].timeout"
    );
    assert_eq!(c.db_path(), t.path("data/watchpost.db"));
}

#[test]
fn unknown_key_in_main_file() {
    let t = TestConfig::with_probe("api.toml", GOOD_PROBE);
    let main = t.write(
        "watchpost.toml",
        "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\nlocaton = \"eu-west-1\"\n",
    );
    let d = single(&t);
    assert_at(&d, &main, 5, 1, &["unknown field `locaton`"]);
}

#[test]
fn unknown_key_in_probe_file() {
    let (t, p) = with_probe(&format!("{GOOD_PROBE}timeout = \"1s\"\nurll = \"x\"\n"));
    let d = single(&t);
    assert_at(&d, &p, 5, 1, &["unknown field `urll`"]);
}

#[test]
fn unknown_key_in_probe_subtable() {
    let (t, p) = with_probe(&format!(
        "{GOOD_PROBE}\n[expect]\nstatus = [\"2xx\"]\ncert_min_dayz = 3\n"
    ));
    let d = single(&t);
    assert_at(&d, &p, 7, 1, &["unknown field `cert_min_dayz`"]);
}

#[test]
fn bad_duration_in_probe_file() {
    let (t, p) = with_probe(&format!("{GOOD_PROBE}timeout = \"5 seconds\"\n"));
    let d = single(&t);
    assert_at(&d, &p, 4, 11, &[r#"invalid duration "5 seconds""#]);
}

#[test]
fn bad_duration_in_main_file() {
    let t = TestConfig::with_probe("api.toml", GOOD_PROBE);
    let main = t.write(
        "watchpost.toml",
        &MAIN_TOML.replace("timeout = \"1s\"", "timeout = \"soon\""),
    );
    let d = single(&t);
    // MAIN_TOML: line 9 is `timeout = "1s"` under [defaults].
    assert_at(&d, &main, 9, 11, &[r#"invalid duration "soon""#]);
}

#[test]
fn duplicate_probe_names_across_files() {
    let t = TestConfig::with_probe("a.toml", GOOD_PROBE);
    let b = t.write(
        "probes/b.toml",
        &format!("# the same name again\n{GOOD_PROBE}"),
    );
    let a = t.path("probes/a.toml");
    let d = single(&t);
    let first = format!("first defined at {}:1:8", a.display());
    assert_at(&d, &b, 2, 8, &[r#"duplicate probe name "api""#, &first]);
}

#[test]
fn missing_env_var_in_interpolated_string() {
    let (t, p) = with_probe(
        "name = \"api\"\nkind = \"http\"\nurl = \"http://${WP_CFG_TEST_MISSING_HOST}/health\"\n",
    );
    let d = single(&t);
    assert_at(
        &d,
        &p,
        3,
        7,
        &["environment variable WP_CFG_TEST_MISSING_HOST is not set"],
    );

    let (t, p) = with_probe(&format!(
        "{GOOD_PROBE}headers = {{ Authorization = \"Bearer ${{WP_CFG_TEST_MISSING_TOKEN}}\" }}\n"
    ));
    let d = single(&t);
    assert_at(
        &d,
        &p,
        4,
        29,
        &["environment variable WP_CFG_TEST_MISSING_TOKEN is not set"],
    );
}

#[test]
fn missing_env_var_in_main_file() {
    let t = TestConfig::with_probe("api.toml", GOOD_PROBE);
    let main = t.write(
        "watchpost.toml",
        &MAIN_TOML.replace(
            "[agent]\n",
            "[agent]\nlocation = \"${WP_CFG_TEST_MISSING_LOC}\"\n",
        ),
    );
    let d = single(&t);
    assert_at(
        &d,
        &main,
        2,
        12,
        &["environment variable WP_CFG_TEST_MISSING_LOC is not set"],
    );
}

#[test]
fn missing_env_var_named_by_an_env_key() {
    let t = TestConfig::with_probe("api.toml", GOOD_PROBE);
    let main = t.write(
        "watchpost.toml",
        &format!("{MAIN_TOML}\n[notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"WP_CFG_TEST_MISSING_ROUTING_KEY\"\n"),
    );
    let d = single(&t);
    // MAIN_TOML has 12 lines; then a blank line, the table header, kind, routing_key_env.
    assert_at(
        &d,
        &main,
        16,
        19,
        &["WP_CFG_TEST_MISSING_ROUTING_KEY is not set"],
    );
}

#[test]
fn unknown_probe_kind() {
    let (t, p) = with_probe("name = \"api\"\nkind = \"ftp\"\nurl = \"ftp://127.0.0.1/\"\n");
    let d = single(&t);
    assert_at(
        &d,
        &p,
        2,
        8,
        &[r#"unknown probe kind "ftp" (expected http, websocket, listen)"#],
    );
}

#[test]
fn unknown_component_member_and_notifier() {
    let (t, _) = with_probe(GOOD_PROBE);
    let main = t.write(
        "watchpost.toml",
        &format!(
            "{MAIN_TOML}\n[[component]]\nname = \"API\"\nprobes = [\"api\", \"nope/checks.db\"]\nnotify = [\"pager\"]\n"
        ),
    );
    let d = errors(&t);
    assert_eq!(d.len(), 2, "{}", show(&d));
    assert_at(
        &d[0],
        &main,
        16,
        18,
        &[r#"unknown probe "nope" in component "API""#],
    );
    assert_at(&d[1], &main, 17, 11, &[r#"unknown notifier "pager""#]);
}

#[test]
fn component_members_may_name_subchecks_of_known_probes() {
    let (t, _) = with_probe(GOOD_PROBE);
    t.write(
        "watchpost.toml",
        &format!(
            "{MAIN_TOML}\n[[component]]\nname = \"API\"\nprobes = [\"api\", \"api/checks.db\"]\n"
        ),
    );
    let c = t.load_ok();
    assert_eq!(c.components.len(), 1);
}

#[test]
fn missing_main_file() {
    let t = TestConfig::empty();
    let d = single(&t);
    // A whole-file problem has no position: `file: message`, never a fake 1:1.
    assert_eq!((d.line, d.col), (0, 0), "{d}");
    assert!(
        d.to_string().starts_with(&format!(
            "{}: cannot read config file",
            t.main_path().display()
        )),
        "{d}"
    );
    assert!(d.message.contains("-c FILE or WATCHPOST_CONFIG"), "{d}");
}

#[test]
fn missing_probe_file_named_without_a_glob() {
    let t = TestConfig::empty();
    let main = t.write(
        "watchpost.toml",
        &MAIN_TOML.replace("probes/*.toml", "probes/gone.toml"),
    );
    let d = single(&t);
    assert_at(&d, &main, 3, 11, &["does not exist", "gone.toml"]);
}

#[test]
fn unreadable_probe_files() {
    let (t, _) = with_probe(GOOD_PROBE);
    let bin = t.path("probes/binary.toml");
    std::fs::write(&bin, b"name = \"\xff\xfe\"\n").unwrap();
    let dir = t.path("probes/dir.toml");
    std::fs::create_dir_all(&dir).unwrap();
    let d = errors(&t);
    assert_eq!(d.len(), 2, "{}", show(&d));
    // A whole-file problem has no position (line 0); a directory the glob matched is the
    // glob's problem, reported at the glob.
    assert_at(&d[0], &bin, 0, 0, &["cannot read probe file", "UTF-8"]);
    assert_at(
        &d[1],
        &t.main_path(),
        3,
        11,
        &["matches the directory", &dir.display().to_string()],
    );
}

#[test]
fn invalid_toml_syntax_in_probe_file() {
    let (t, p) = with_probe("name = \"api\"\nkind = \"http\nurl = \"http://127.0.0.1:1/\"\n");
    let d = single(&t);
    // The string opened at 2:8 runs to the end of the line, where the closing quote is missing.
    assert_at(&d, &p, 2, 13, &["invalid basic string"]);
}

#[test]
fn invalid_toml_syntax_in_main_file() {
    let t = TestConfig::empty();
    let main = t.write(
        "watchpost.toml",
        "[agent]\ndata_dir = \"data\"\n[defaults\ninterval = \"1s\"\n",
    );
    let d = single(&t);
    assert_eq!((d.file.as_path(), d.line), (main.as_path(), 3), "{d}");
}

#[test]
fn interval_below_the_floor() {
    let (t, p) = with_probe(&format!("{GOOD_PROBE}interval = \"500ms\"\n"));
    let d = single(&t);
    assert_at(&d, &p, 4, 12, &["interval 500ms is below the 1s floor"]);
}

#[test]
fn inherited_interval_below_the_floor_points_at_defaults() {
    let (t, _) = with_probe(GOOD_PROBE);
    let main = t.write(
        "watchpost.toml",
        &MAIN_TOML.replace("interval = \"1s\"", "interval = \"500ms\""),
    );
    let d = errors(&t);
    assert!(!d.is_empty());
    // MAIN_TOML: line 8 is `interval = "1s"` under [defaults]; the probe file does not
    // mention an interval at all, so pointing at it (1:1) sends the reader to the wrong file.
    assert_at(&d[0], &main, 8, 12, &["below the 1s floor"]);
}

#[test]
fn errors_in_several_files_are_reported_at_once() {
    let t = TestConfig::with_probe("a.toml", &format!("{GOOD_PROBE}timeout = \"5 parsecs\"\n"));
    let b = t.write("probes/b.toml", "name = \"b\"\nkind = \"gopher\"\n");
    let c = t.write(
        "probes/c.toml",
        "name = \"c\"\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\ninterval = \"10ms\"\n",
    );
    let main = t.write(
        "watchpost.toml",
        &format!("{MAIN_TOML}\n[[component]]\nname = \"X\"\nprobes = [\"ghost\"]\n"),
    );
    let a = t.path("probes/a.toml");
    let d = errors(&t);
    assert_eq!(d.len(), 4, "{}", show(&d));
    assert_at(&d[0], &a, 4, 11, &["invalid duration"]);
    assert_at(&d[1], &b, 2, 8, &["unknown probe kind \"gopher\""]);
    assert_at(&d[2], &c, 4, 12, &["below the 1s floor"]);
    assert_at(&d[3], &main, 16, 11, &["unknown probe \"ghost\""]);
}

#[test]
fn an_error_in_the_main_file_does_not_hide_probe_file_errors() {
    let t = TestConfig::with_probe("a.toml", &format!("{GOOD_PROBE}timeout = \"5 parsecs\"\n"));
    let main = t.write(
        "watchpost.toml",
        &format!("{MAIN_TOML}\n[retention]\nrunz = \"7d\"\n"),
    );
    let a = t.path("probes/a.toml");
    let d = errors(&t);
    assert_eq!(d.len(), 2, "{}", show(&d));
    assert_at(&d[0], &a, 4, 11, &["invalid duration"]);
    assert_at(&d[1], &main, 15, 1, &["unknown field `runz`"]);
}

#[test]
fn display_is_file_line_col_message() {
    let (t, p) = with_probe(&format!("{GOOD_PROBE}interval = \"500ms\"\n"));
    let e = t.load().unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}:4:12: interval 500ms is below the 1s floor", p.display())
    );
}

#[test]
fn heartbeat_errors_point_at_their_key() {
    let t = TestConfig::empty();
    let main = t.write(
        "watchpost.toml",
        "[agent]\nprobes = []\nlisten = \"\"\nheartbeat = { url = \"ftp://x\", method = \"G T\", interval = \"10ms\" }\n",
    );
    let d = errors(&t);
    assert_eq!(d.len(), 3, "{}", show(&d));
    assert_at(
        &d[0],
        &main,
        4,
        21,
        &["heartbeat url must be an http:// or https:// URL"],
    );
    assert_at(&d[1], &main, 4, 41, &["invalid HTTP method \"G T\""]);
    assert_at(
        &d[2],
        &main,
        4,
        59,
        &["heartbeat interval 10ms is below the 100ms floor"],
    );
    let t = TestConfig::empty();
    t.write(
        "watchpost.toml",
        "[agent]\nprobes = []\nlisten = \"\"\nheartbeat = { url = \"https://hc-ping.com/${HB_UUID:-x}\", interval = \"1m\" }\n",
    );
    let c = t.load_ok();
    let hb = c.agent.heartbeat.expect("heartbeat");
    assert_eq!(
        (
            hb.method.as_str(),
            hb.interval.as_secs(),
            hb.timeout.as_secs()
        ),
        ("GET", 60, 10)
    );
}

/// Seven mistakes in three files (typos, a wrong type, a zero, a dangling reference, a TOML
/// syntax error): one `validate` run reports every one, each at its key or value, and
/// nothing else.
#[test]
fn seven_typos_in_three_files_are_reported_in_one_run() {
    let t = TestConfig::empty();
    let main = t.write(
        "watchpost.toml",
        r#"[agent]
data_dir = "data"
probes = ["probes/*.toml"]
max_concurency = 8
max_concurrency = 0
listen = ""

[defaults]
intervall = "30s"

[[component]]
name = "API"
probes = ["api", "ws"]
notify = ["pager"]
"#,
    );
    let api = t.write(
        "probes/api.toml",
        r#"name = "api"
kind = "http"
url = "http://127.0.0.1:1/health"
tiemout = "5s"
method = 5

[expect]
staus = ["2xx"]
"#,
    );
    let ws = t.write(
        "probes/ws.toml",
        "name = \"ws\"\nkind = \"websocket\"\nurl = \"ws://127.0.0.1:1/\ninterval = \"1m\"\n",
    );
    let d = errors(&t);
    let want: &[(&Path, usize, usize, &str)] = &[
        (&api, 4, 1, "unknown field `tiemout`"),
        (&api, 5, 10, "invalid type: integer `5`, expected a string"),
        (&api, 8, 1, "unknown field `staus`"),
        (&ws, 3, 25, "invalid basic string"),
        (&main, 4, 1, "unknown field `max_concurency`"),
        (&main, 5, 19, "max_concurrency must be at least 1"),
        (&main, 9, 1, "unknown field `intervall`"),
        (&main, 14, 11, "unknown notifier \"pager\""),
    ];
    assert_eq!(d.len(), want.len(), "got:\n{}", show(&d));
    for (d, (file, line, col, msg)) in d.iter().zip(want) {
        assert_at(d, file, *line, *col, &[msg]);
    }

    // The binary prints the same list, one `file:line:col: message` per line, and exits 3.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .arg("-c")
        .arg(&main)
        .arg("validate")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), want.len() + 1, "{err}");
    assert_eq!(lines[want.len()], "8 configuration error(s)");
    assert!(
        lines[0].starts_with(&format!("{}:4:1: ", api.display())),
        "{err}"
    );
}

/// A syntax error in the main file does not hide the probe files' problems: the probe globs
/// are read from the rest of the file.
#[test]
fn a_syntax_error_in_the_main_file_still_checks_the_probe_files() {
    let t = TestConfig::empty();
    let main = t.write(
        "watchpost.toml",
        "[agent]\ndata_dir = \"data\"\nprobes = [\"probes/*.toml\"]\nlisten = \"\"\n\n[defaults\ninterval = \"1s\"\n",
    );
    let p = t.write("probes/p.toml", &format!("{GOOD_PROBE}retires = 2\n"));
    let d = errors(&t);
    assert_eq!(d.len(), 2, "got:\n{}", show(&d));
    assert_at(&d[0], &p, 4, 1, &["unknown field `retires`"]);
    assert_at(&d[1], &main, 6, 10, &["unclosed table"]);
}

/// Two bad keys of one notifier and two of another: all four, at their keys.
#[test]
fn every_bad_key_of_every_notifier() {
    let t = TestConfig::with_probe("api.toml", GOOD_PROBE);
    let main = t.write(
        "watchpost.toml",
        &format!(
            "{MAIN_TOML}\n[notifier.hook]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\nfromat = \"grafana\"\nevnts = [\"opened\"]\n\n[notifier.mail]\nkind = \"email\"\nsmtp_url = \"smtp://127.0.0.1:1\"\nfrom = \"a@example.com\"\nto = \"b@example.com\"\nsubject = \"x\"\n"
        ),
    );
    let d = errors(&t);
    let base = MAIN_TOML.lines().count() + 1;
    let want = [
        (base + 4, 1, "unknown field `fromat`"),
        (base + 5, 1, "unknown field `evnts`"),
        (
            base + 11,
            6,
            "invalid type: string \"b@example.com\", expected a sequence",
        ),
        (base + 12, 1, "unknown field `subject`"),
    ];
    assert_eq!(d.len(), want.len(), "got:\n{}", show(&d));
    for (d, (line, col, msg)) in d.iter().zip(want) {
        assert_at(d, &main, line, col, &[msg]);
    }
}

#[test]
fn fleet_timing_and_quorum_errors_point_at_their_key() {
    let t = TestConfig::empty();
    let main = t.write(
        "watchpost.toml",
        "[agent]\nprobes = []\nlisten = \"\"\nfleet = { heartbeat = \"50ms\" }\n",
    );
    let d = errors(&t);
    assert_eq!(d.len(), 1, "{}", show(&d));
    assert_at(
        &d[0],
        &main,
        4,
        23,
        &["fleet heartbeat 50ms is below the 100ms floor"],
    );
    let t = TestConfig::empty();
    let main = t.write(
        "watchpost.toml",
        "[agent]\nprobes = []\nlisten = \"\"\nfleet = { heartbeat = \"2s\", lease = \"5s\" }\n",
    );
    let d = errors(&t);
    assert_eq!(d.len(), 1, "{}", show(&d));
    assert_at(
        &d[0],
        &main,
        4,
        37,
        &["fleet lease 5s must span at least 3 heartbeats (6s)"],
    );
    for (value, col) in [("0", 10), ("\"most\"", 10)] {
        let t = TestConfig::empty();
        let main = t.write(
            "watchpost.toml",
            &format!("[agent]\nprobes = []\nlisten = \"\"\n\n[[component]]\nname = \"X\"\nalert_labels = {{ component = \"X\" }}\nquorum = {value}\n"),
        );
        let d = errors(&t);
        assert_eq!(d.len(), 1, "{}", show(&d));
        assert_at(
            &d[0],
            &main,
            8,
            col,
            &["invalid quorum", "\"majority\" or a number"],
        );
    }
    let t = TestConfig::empty();
    t.write(
        "watchpost.toml",
        "[agent]\nprobes = []\nlisten = \"\"\n\n[[component]]\nname = \"X\"\nalert_labels = { a = \"x\" }\nquorum = 2\n\n[[component]]\nname = \"Y\"\nalert_labels = { a = \"y\" }\n",
    );
    let c = t.load_ok();
    use watchpost::config::Quorum;
    assert_eq!(c.components[0].quorum, Quorum::Locations(2));
    assert_eq!(c.components[1].quorum, Quorum::Majority);
    assert_eq!(c.agent.fleet, watchpost::config::FleetTiming::default());
    // Majority of the locations that reported; a number, capped by those that reported.
    assert_eq!(
        [1, 2, 3, 4].map(|n| Quorum::Majority.needed(n)),
        [1, 2, 2, 3]
    );
    assert_eq!([1, 2, 3].map(|n| Quorum::Locations(2).needed(n)), [1, 2, 2]);
}
