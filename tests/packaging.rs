//! What a package and an editor get from the binary: JSON Schemas of the configuration
//! (checked by a real draft-07 validator, python `jsonschema`, pinned in
//! tests/peers/requirements.txt), shell completions and a man page.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "common/daemon.rs"]
mod daemon;

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

/// `packaging/watchpost.service` passes `systemd-analyze verify` without a warning (with
/// the installed path replaced by the built binary, which verify checks is executable), and
/// its hardening keeps `systemd-analyze security` at an exposure of 2.0 or less.
#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(repo().join("packaging/watchpost.service")).unwrap();
    for needed in [
        "DynamicUser=yes",
        "StateDirectory=watchpost",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "Environment=WATCHPOST_DATA_DIR=%S/watchpost",
    ] {
        assert!(unit.contains(needed), "no {needed}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("watchpost.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/watchpost", env!("CARGO_BIN_EXE_watchpost")),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new("systemd-analyze")
            .args(args)
            .arg(&path)
            .output()
            .unwrap_or_else(|e| {
                panic!("systemd-analyze not found ({e}): install systemd (.ci/run does)")
            })
    };
    let o = run(&["verify", "--man=no"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.trim().is_empty(), "verify: {err}");

    let o = run(&["security", "--offline=yes", "--no-pager"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let level: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for watchpost.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{out}{}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
    assert!(level <= 2.0, "exposure {level}:\n{out}");
}

/// The Dockerfile builds the dependencies in their own layer before the sources, runs as a
/// non-root user, and keeps the repository's layout; the binary, run the way the image runs
/// it (its environment, the shipped config mounted, data in the volume), validates and
/// writes its database into the data volume, not next to the config.
#[test]
fn the_dockerfile_layout_works_the_way_the_image_runs() {
    let df = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let pos = |needle: &str| {
        df.find(needle)
            .unwrap_or_else(|| panic!("Dockerfile has no {needle:?}"))
    };
    // Dependencies (stub sources) before the real sources.
    assert!(pos("COPY Cargo.toml Cargo.lock ./") < pos("echo 'fn main() {}' > src/main.rs"));
    assert!(pos("echo 'fn main() {}' > src/main.rs") < pos("COPY src ./src"));
    assert!(pos("USER watchpost") > pos("FROM debian:bookworm-slim"));
    let dockerignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    assert!(dockerignore.lines().any(|l| l.trim() == "target/"));

    // The image's environment, read from the Dockerfile.
    let env_block = &df[pos("ENV WATCHPOST_CONFIG=")..];
    let env_block = &env_block[..env_block.find("\nVOLUME").expect("VOLUME after ENV")];
    let env: Vec<(String, String)> = env_block
        .trim_start_matches("ENV ")
        .split([' ', '\\', '\n'])
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no ENV {k}"))
    };
    assert!(df.contains(&format!("VOLUME [\"{}\"]", get("WATCHPOST_DATA_DIR"))));
    assert!(
        df.contains("COPY config /etc/watchpost/config")
            && df.contains("COPY probes /etc/watchpost/probes")
    );

    // A root standing in for `/`: config and probes copied as the image does.
    let root = tempfile::tempdir().unwrap();
    let at = |p: &str| root.path().join(p.trim_start_matches('/'));
    let copy = |from: &str, to: &str| {
        let o = Command::new("cp")
            .arg("-r")
            .arg(repo().join(from))
            .arg(at(to))
            .output()
            .unwrap();
        assert!(o.status.success());
    };
    std::fs::create_dir_all(at("/etc/watchpost")).unwrap();
    std::fs::create_dir_all(at(&get("WATCHPOST_DATA_DIR"))).unwrap();
    copy("config", "/etc/watchpost/config");
    copy("probes", "/etc/watchpost/probes");
    // The listen address the image sets must not collide here: a free loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_eq!(get("WATCHPOST_LISTEN"), "0.0.0.0:9464");
    // The image's environment (its listen address moved to a free loopback port).
    let image_cmd = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_watchpost"));
        c.args(args)
            .env("WATCHPOST_CONFIG", at(&get("WATCHPOST_CONFIG")))
            .env("WATCHPOST_DATA_DIR", at(&get("WATCHPOST_DATA_DIR")))
            .env("WATCHPOST_LISTEN", format!("127.0.0.1:{port}"))
            .current_dir(root.path());
        c
    };
    let o = image_cmd(&["validate"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // `run` keeps its database in the volume, not next to the config.
    daemon::run_until_db_then_term(
        image_cmd(&["run"]),
        &at(&get("WATCHPOST_DATA_DIR")).join("watchpost.db"),
    );
    assert!(!at("/etc/watchpost/data").exists());
}
