//! The README as a new user reads it: the install step comes before the first `watchpost`
//! command, every `watchpost …` line in it parses, the quickstart commands work in the order
//! given against the shipped config, and the configuration tables name exactly the keys the
//! loader accepts (taken from `watchpost schema`, which is generated from the loader's types).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

#[path = "common/daemon.rs"]
mod daemon;
use watchpost::config::schema::{common_probe_keys, schema, Which};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).unwrap()
}

fn watchpost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .args(args)
        .current_dir(repo())
        .env_remove("WATCHPOST_CONFIG")
        .env_remove("WATCHPOST_DATA_DIR")
        .env_remove("WATCHPOST_LISTEN")
        .output()
        .expect("spawn watchpost")
}

/// The lines of the README's ```sh blocks, comments stripped.
fn sh_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        if in_sh {
            let cmd = line.split(" #").next().unwrap_or("").trim();
            if !cmd.is_empty() {
                out.push(cmd.to_string());
            }
        }
    }
    out
}

/// Split a command line as the shell does for plain words and double-quoted strings
/// (`watchpost maintenance start "Realtime Transcription"` is four words).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut any) = (false, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

#[test]
fn install_comes_first_and_every_watchpost_command_parses() {
    let text = readme();
    let lines = sh_lines(&text);
    let install = lines
        .iter()
        .position(|l| l == "cargo install --locked --path .")
        .expect("an install step `cargo install --locked --path .`");
    let first = lines
        .iter()
        .position(|l| l.starts_with("watchpost "))
        .expect("watchpost commands");
    assert!(
        install < first,
        "install must come before {:?}",
        lines[first]
    );
    let mut checked = 0;
    for l in lines.iter().filter(|l| l.starts_with("watchpost ")) {
        // Ask for help with the same arguments: clap rejects an unknown command or flag.
        let words = shell_words(l);
        let mut args: Vec<&str> = words.iter().skip(1).map(String::as_str).collect();
        args.retain(|a| *a != ">" && !a.ends_with(".1") && !a.ends_with(".json"));
        args.push("--help");
        let o = watchpost(&args);
        assert!(
            o.status.success(),
            "README command {l:?} does not parse: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} watchpost commands found");
}

/// `validate`, `check` and `run` of the quickstart, in that order, on the shipped config.
#[test]
fn the_quickstart_commands_work_in_order_on_the_shipped_config() {
    let text = readme();
    let start = text
        .find("Then, from the repository root")
        .expect("quickstart");
    let lines = sh_lines(&text[start..]);
    let cmds: Vec<&String> = lines
        .iter()
        .take_while(|l| l.starts_with("watchpost "))
        .collect();
    assert_eq!(
        cmds,
        ["watchpost validate", "watchpost check", "watchpost run"],
        "the quickstart changed: update this test"
    );
    // The shipped self-probe watches 127.0.0.1:9464; `check` leaves it out while nothing
    // listens there.
    assert!(
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:9464".parse().unwrap(),
            Duration::from_millis(500)
        )
        .is_err(),
        "something listens on 127.0.0.1:9464: this test needs the port free"
    );

    let o = watchpost(&["validate"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("config/watchpost.toml: ok"));

    let o = watchpost(&["check"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("watchpost-self not checked")
            && err.contains("watchpost run")
            && err.contains("watchpost check watchpost-self"),
        "{err}"
    );
    assert!(err.contains("enabled = true"), "{err}");

    // `run`: the daemon starts, stores runs, and stops cleanly on SIGTERM. Its data and
    // address are moved out of the way (the flags the README documents).
    let data = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_watchpost"));
    cmd.arg("run")
        .current_dir(repo())
        .env_remove("WATCHPOST_CONFIG")
        .env("WATCHPOST_DATA_DIR", data.path())
        .env("WATCHPOST_LISTEN", "127.0.0.1:0");
    daemon::run_until_db_then_term(cmd, &data.path().join("watchpost.db"));
}

// ---------------------------------------------------------------------------------------
// Configuration tables against the schema
// ---------------------------------------------------------------------------------------

/// The text under the heading `heading` up to the next heading (outside code blocks).
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no heading {heading:?}"))
        + heading.len()
        + 2;
    let mut fenced = false;
    let mut at = start;
    for line in text[start..].split_inclusive('\n') {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && line.starts_with('#') {
            break;
        }
        at += line.len();
    }
    &text[start..at]
}

/// Keys named in the first column of the section's tables: `` `[agent] location` `` →
/// `agent.location`; in `` `[expect] body_contains`, `body_matches` `` the table carries on.
fn table_keys(section: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cell = line[1..].split(" | ").next().unwrap_or("");
        let mut table = String::new();
        for tok in cell.split('`').skip(1).step_by(2) {
            let tok = match tok.strip_prefix('[') {
                Some(rest) => {
                    let (t, k) = rest.split_once("] ").unwrap_or((rest, ""));
                    // `[agent] x` and `[[rehearsal]] x` alike.
                    table = format!("{}.", t.trim_start_matches('[').trim_end_matches(']'));
                    k
                }
                None => tok,
            };
            let ident: String = tok
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `[budget] <phase> = { … }`: the table itself is the key.
            match (ident.is_empty(), table.is_empty()) {
                (false, _) => keys.insert(format!("{table}{ident}")),
                (true, false) => keys.insert(table.trim_end_matches('.').to_string()),
                (true, true) => false,
            };
        }
    }
    keys
}

/// Every word written in backticks in the section (`send = "text"` counts as `send`).
fn mentioned(section: &str) -> BTreeSet<String> {
    section
        .split('`')
        .skip(1)
        .step_by(2)
        .flat_map(|tok| tok.split([',', '{', '[', ']', ' ']))
        .map(|w| {
            w.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// The object schema at `v`, following `$ref`, `allOf` and `anyOf` wrappers.
fn object<'a>(root: &'a Value, v: &'a Value) -> &'a Value {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap();
        return object(root, &root["definitions"][name]);
    }
    for wrap in ["allOf", "anyOf"] {
        if let Some(parts) = v.get(wrap).and_then(Value::as_array) {
            if let Some(o) = parts
                .iter()
                .map(|p| object(root, p))
                .find(|o| o.get("properties").is_some())
            {
                return o;
            }
        }
    }
    if let Some(items) = v.get("items") {
        return object(root, items);
    }
    v
}

fn props(o: &Value) -> Vec<String> {
    o.get("properties")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// `prefix.key` for the keys of the object at `v`.
fn keys_of(root: &Value, v: &Value, prefix: &str) -> BTreeSet<String> {
    props(object(root, v))
        .into_iter()
        .map(|k| format!("{prefix}{k}"))
        .collect()
}

/// Check one README section: every key in its tables is a key of `known`, and every key of
/// `known` is in a table (`in_table`) or at least written in backticks in the section.
fn check(
    text: &str,
    heading: &str,
    known: &BTreeSet<String>,
    in_table: bool,
    bad: &mut Vec<String>,
) {
    let s = section(text, heading);
    let tables = table_keys(s);
    for k in tables.difference(known) {
        bad.push(format!("{heading}: documented but not a key: {k}"));
    }
    let words = mentioned(s);
    for k in known {
        let leaf = k.rsplit('.').next().unwrap();
        let ok = tables.contains(k) || (!in_table && words.contains(leaf));
        if !ok {
            bad.push(format!("{heading}: undocumented key: {k}"));
        }
    }
}

#[test]
fn the_configuration_tables_name_exactly_the_loaders_keys() {
    let text = readme();
    let main = schema(Which::Main);
    let probe = schema(Which::Probe);
    let variant = |kind: &str| -> &Value {
        probe["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["properties"]["kind"]["const"] == kind)
            .unwrap_or_else(|| panic!("no probe kind {kind}"))
    };
    let all = |kind: &str| keys_of(&probe, variant(kind), "");
    let common: BTreeSet<String> = common_probe_keys().into_iter().collect();
    let own = |kind: &str| -> BTreeSet<String> { all(kind).difference(&common).cloned().collect() };
    let nested = |kind: &str, key: &str| {
        keys_of(
            &probe,
            &variant(kind)["properties"][key],
            &format!("{key}."),
        )
    };
    let mut bad = Vec::new();

    let mut agent = BTreeSet::new();
    for t in ["agent", "defaults", "retention"] {
        agent.extend(keys_of(&main, &main["properties"][t], &format!("{t}.")));
    }
    check(&text, "### `config/watchpost.toml`", &agent, true, &mut bad);
    check(
        &text,
        "### Probe files: keys every kind has",
        &common,
        true,
        &mut bad,
    );

    let mut http = own("http");
    http.retain(|k| k != "expect" && k != "degraded_when");
    http.extend(nested("http", "expect"));
    http.extend(nested("http", "degraded_when"));
    check(&text, "### `kind = \"http\"`", &http, true, &mut bad);
    check(
        &text,
        "### `kind = \"listen\"` (realtime speech-to-text)",
        &own("listen"),
        true,
        &mut bad,
    );
    let mut ws = own("websocket");
    ws.extend(nested("websocket", "step"));
    check(
        &text,
        "### `kind = \"websocket\"` (scripted sessions)",
        &ws,
        false,
        &mut bad,
    );

    let mut incidents = keys_of(&main, &main["properties"]["component"], "");
    incidents.extend(keys_of(
        &main,
        &main["properties"]["maintenance"],
        "maintenance.",
    ));
    check(
        &text,
        "## Incidents and notifiers",
        &incidents,
        false,
        &mut bad,
    );

    check(
        &text,
        "### Scheduled rehearsals (`[[rehearsal]]`)",
        &keys_of(&main, &main["properties"]["rehearsal"], "rehearsal."),
        true,
        &mut bad,
    );
    check(
        &text,
        "### Scheduled reviews (`[[review]]`)",
        &keys_of(&main, &main["properties"]["review"], "review."),
        true,
        &mut bad,
    );

    let notifier = &main["definitions"]["Notifier"]["oneOf"];
    let mut notifiers = BTreeSet::new();
    for v in notifier.as_array().expect("notifier kinds") {
        let kind = v["properties"]["kind"]["const"].as_str().unwrap();
        for k in props(v)
            .into_iter()
            .filter(|k| k != "kind" && k != "delivery")
        {
            notifiers.insert(format!("{kind}.{k}"));
        }
        notifiers.extend(keys_of(&main, &v["properties"]["delivery"], ""));
    }
    check(
        &text,
        "### Notifiers (`[notifier.NAME]`, `kind = …`)",
        &notifiers,
        false,
        &mut bad,
    );

    assert!(
        bad.is_empty(),
        "README configuration tables vs the loader:\n{}",
        bad.join("\n")
    );
}
