//! What a package and an editor get from the binary: JSON Schemas of the configuration
//! (checked by a real draft-07 validator, python `jsonschema`, pinned in
//! tests/peers/requirements.txt), shell completions and a man page.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn watchpost(args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .args(args)
        .env_remove("WATCHPOST_CONFIG")
        .output()
        .expect("spawn watchpost");
    assert!(
        o.status.success(),
        "watchpost {args:?}: {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `watchpost schema [WHICH]` written to `dir`.
fn schema_file(dir: &Path, which: &str) -> PathBuf {
    let o = watchpost(&["schema", which]);
    let path = dir.join(format!("{which}.schema.json"));
    std::fs::write(&path, &o.stdout).unwrap();
    path
}

/// Run the pinned validator over `files`; returns (exit code, one line per problem).
fn validate(schema: &Path, files: &[PathBuf]) -> (i32, String) {
    let o = Command::new("python3")
        .arg(repo().join("tests/peers/check_schema.py"))
        .arg(schema)
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("python3 not found ({e}); the schema tests need python3 with jsonschema (pip install -r tests/peers/requirements.txt)"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("No module named"),
        "python jsonschema is not installed (pip install -r tests/peers/requirements.txt):\n{err}"
    );
    assert!(o.status.code().is_some(), "validator killed: {err}");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &err,
    )
}

fn toml_files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no TOML files in {dir}");
    v
}

#[test]
fn the_schemas_accept_the_shipped_config_examples_and_probes() {
    let dir = tempfile::tempdir().unwrap();
    let main = schema_file(dir.path(), "config");
    let mut mains = vec![repo().join("config/watchpost.toml")];
    mains.extend(toml_files("config/examples"));
    let (code, out) = validate(&main, &mains);
    assert_eq!(code, 0, "{out}");

    let probe = schema_file(dir.path(), "probe");
    let (code, out) = validate(&probe, &toml_files("probes"));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn the_schemas_reject_a_typo_key_a_wrong_type_and_an_unknown_kind() {
    let dir = tempfile::tempdir().unwrap();
    let main = schema_file(dir.path(), "config");
    let probe = schema_file(dir.path(), "probe");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };

    let typo = write("typo.toml", "[agent]\nmax_concurent = 4\n");
    let (code, out) = validate(&main, &[typo]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("max_concurent"), "{out}");

    let notifier = write(
        "notifier.toml",
        "[notifier.pager]\nkind = \"pagerduty\"\nrouting_key_env = \"PD\"\nevent_url = \"http://x\"\n",
    );
    let (code, out) = validate(&main, &[notifier]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("event_url"), "{out}");

    let wrong_type = write("wrong.toml", "[defaults]\nretries = \"two\"\n");
    let (code, out) = validate(&main, &[wrong_type]);
    assert_eq!(code, 1, "{out}");

    let probe_typo = write(
        "p.toml",
        "name = \"p\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/\"\ntiemout = \"5s\"\n",
    );
    let (code, out) = validate(&probe, &[probe_typo]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tiemout"), "{out}");

    let kind = write("k.toml", "name = \"p\"\nkind = \"smtp\"\nurl = \"x\"\n");
    let (code, out) = validate(&probe, &[kind]);
    assert_eq!(code, 1, "{out}");

    // A key of another kind is not accepted either.
    let other = write(
        "o.toml",
        "name = \"p\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/\"\ndialect = \"omi\"\n",
    );
    let (code, out) = validate(&probe, &[other]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn completions_for_every_shell_and_a_man_page() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = watchpost(&["completions", shell]);
        let text = String::from_utf8_lossy(&o.stdout);
        for sub in ["validate", "check", "schema", "completions"] {
            assert!(text.contains(sub), "{shell}: no {sub}");
        }
    }
    let o = watchpost(&["man"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with(".ie") || text.contains(".TH watchpost"),
        "{text}"
    );
    assert!(
        text.contains("validate") && text.contains("WATCHPOST_CONFIG"),
        "{text}"
    );

    // bash accepts the script it is given.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("watchpost.bash");
    std::fs::write(&script, watchpost(&["completions", "bash"]).stdout).unwrap();
    let o = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
