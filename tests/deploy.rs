//! The deployment files under `deploy/`: `compose.yaml` (Postgres and two agents in two
//! locations) and the Kubernetes manifests in `deploy/k8s/` (a Deployment per location, a
//! ConfigMap, the Secret they read) parse, say what a fleet needs (the image, `watchpost run`,
//! the database URL from an env file or a Secret, the config mounted where `WATCHPOST_CONFIG`
//! points, distinct locations, health probes, non-root, resources), and the config they
//! mount passes `watchpost validate`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn read(p: &str) -> String {
    std::fs::read_to_string(repo(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Every document of a YAML file as JSON (merge keys `<<` applied).
fn yaml_docs(p: &str) -> Vec<Value> {
    let text = read(p);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut v = <serde_norway::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{p}: {e}"));
            v.apply_merge().unwrap_or_else(|e| panic!("{p}: {e}"));
            serde_json::to_value(v).unwrap_or_else(|e| panic!("{p}: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// `KEY=value` lines of an env file (comments and blank lines skipped).
fn env_file(p: &str) -> BTreeMap<String, String> {
    read(p)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{p}: not KEY=value: {l}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// `watchpost validate -c config` with exactly `env` (plus PATH): exit 0, or the output.
fn validate(config: &Path, env: &BTreeMap<String, String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_watchpost"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .arg("-c")
        .arg(config)
        .arg("validate")
        .output()
        .expect("run watchpost validate");
    assert!(
        out.status.success(),
        "watchpost validate -c {} failed:\n{}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn compose_runs_postgres_and_two_agents_in_two_locations() {
    let docs = yaml_docs("deploy/compose.yaml");
    assert_eq!(docs.len(), 1);
    let services = docs[0]["services"].as_object().expect("services");
    let pg = &services["postgres"];
    assert!(
        pg["image"].as_str().unwrap_or("").starts_with("postgres:"),
        "{pg}"
    );
    assert!(pg["healthcheck"]["test"].is_array(), "{pg}");
    let env = env_file("deploy/watchpost.env.example");
    let agents: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(n, _)| n.starts_with("agent-"))
        .collect();
    assert_eq!(agents.len(), 2, "two agents: {:?}", services.keys());
    let mut locations = Vec::new();
    let mut images = Vec::new();
    for (name, a) in &agents {
        images.push(a["image"].as_str().unwrap_or_default().to_string());
        let cmd: Vec<&str> = strs(&a["entrypoint"])
            .into_iter()
            .chain(strs(&a["command"]))
            .collect();
        assert_eq!(cmd, ["watchpost", "run"], "{name}");
        // The database URL comes from the env file, never from the compose file itself.
        assert_eq!(strs(&a["env_file"]), ["watchpost.env"], "{name}");
        let environment = a["environment"].as_object().expect("environment");
        assert!(
            !environment.contains_key("WATCHPOST_DATABASE_URL"),
            "{name}: the database URL belongs in the env file"
        );
        assert_eq!(
            pg["env_file"], a["env_file"],
            "postgres and {name} read the same env file"
        );
        assert_eq!(
            a["depends_on"]["postgres"]["condition"], "service_healthy",
            "{name}"
        );
        locations.push(
            environment["WATCHPOST_LOCATION"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        // The config is mounted (read-only) at the directory WATCHPOST_CONFIG points into.
        let config = environment["WATCHPOST_CONFIG"].as_str().unwrap();
        let (dir, file) = config.rsplit_once('/').unwrap();
        let mount = strs(&a["volumes"])
            .into_iter()
            .find_map(|v| {
                let parts: Vec<&str> = v.split(':').collect();
                (parts.get(1) == Some(&dir)).then_some(parts)
            })
            .unwrap_or_else(|| panic!("{name}: nothing mounted at {dir}"));
        assert_eq!(mount.get(2), Some(&"ro"), "{name}: {mount:?}");
        let local = repo("deploy").join(mount[0]).join(file);
        assert!(local.exists(), "{name}: {} missing", local.display());
        assert!(
            strs(&a["volumes"])
                .iter()
                .any(|v| v.ends_with(":/var/lib/watchpost")),
            "{name}: a volume for the data directory (the outage buffer)"
        );
        // What the agent sees: the env file and its own environment.
        let mut seen = env.clone();
        for (k, v) in environment {
            seen.insert(k.clone(), v.as_str().unwrap().to_string());
        }
        validate(&local, &seen);
    }
    assert!(
        images.iter().all(|i| !i.is_empty() && *i == images[0]),
        "{images:?}"
    );
    locations.sort();
    locations.dedup();
    assert_eq!(locations.len(), 2, "the locations differ: {locations:?}");
    // The URL in the example env file points at the compose service with its password.
    let url = &env["WATCHPOST_DATABASE_URL"];
    assert!(url.starts_with("postgres://watchpost:"), "{url}");
    assert!(url.contains("@postgres:5432/watchpost"), "{url}");
    assert!(
        url.contains(&format!(":{}@", env["POSTGRES_PASSWORD"])),
        "{url}"
    );
    assert!(
        read(".gitignore")
            .lines()
            .any(|l| l.trim() == "/deploy/watchpost.env"),
        "the real env file is never committed"
    );
}

#[test]
fn kubernetes_runs_a_deployment_per_location_from_a_configmap_and_a_secret() {
    let mut all = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files {
        let rel = f
            .strip_prefix(repo(""))
            .unwrap()
            .to_string_lossy()
            .to_string();
        all.extend(yaml_docs(&rel));
    }
    let of_kind = |k: &str| -> Vec<&Value> { all.iter().filter(|d| d["kind"] == k).collect() };
    let secrets = of_kind("Secret");
    assert_eq!(secrets.len(), 1, "secret.yaml.example");
    let secret = secrets[0];
    let configmaps = of_kind("ConfigMap");
    assert_eq!(configmaps.len(), 1);
    let cm = configmaps[0];
    assert_eq!(
        cm["data"]["watchpost.toml"].as_str(),
        Some(read("deploy/config/watchpost.toml").as_str()),
        "the ConfigMap holds deploy/config/watchpost.toml as it is"
    );
    assert_eq!(
        cm["data"]["site.toml"].as_str(),
        Some(read("deploy/config/probes/site.toml").as_str())
    );

    let deployments = of_kind("Deployment");
    assert_eq!(deployments.len(), 2, "one Deployment per location");
    let mut locations = Vec::new();
    let mut images = Vec::new();
    for d in &deployments {
        let name = d["metadata"]["name"].as_str().unwrap();
        let spec = &d["spec"];
        let labels = &spec["template"]["metadata"]["labels"];
        for (k, v) in spec["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&labels[k], v, "{name}: the selector matches the pod labels");
        }
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert!(
            pod["securityContext"]["runAsUser"].as_u64().unwrap_or(0) > 0,
            "{name}"
        );
        let c = &pod["containers"][0];
        images.push(c["image"].as_str().unwrap_or_default().to_string());
        let cmd: Vec<&str> = strs(&c["command"])
            .into_iter()
            .chain(strs(&c["args"]))
            .collect();
        assert_eq!(cmd, ["watchpost", "run"], "{name}");
        let env: BTreeMap<&str, &Value> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e))
            .collect();
        // The database URL and the API token from the Secret, by names it has.
        let mut seen = BTreeMap::new();
        for var in ["WATCHPOST_DATABASE_URL", "WATCHPOST_API_TOKEN"] {
            let r = &env[var]["valueFrom"]["secretKeyRef"];
            assert_eq!(r["name"], secret["metadata"]["name"], "{name} {var}");
            let key = r["key"].as_str().unwrap();
            let value = secret["stringData"][key]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: the Secret has no {key}"));
            seen.insert(var.to_string(), value.to_string());
        }
        assert!(seen["WATCHPOST_DATABASE_URL"].starts_with("postgres://"));
        for (k, e) in &env {
            if let Some(v) = e["value"].as_str() {
                seen.insert(k.to_string(), v.to_string());
            }
        }
        locations.push(seen["WATCHPOST_LOCATION"].clone());
        for probe in ["livenessProbe", "readinessProbe"] {
            let p = &c[probe]["httpGet"];
            assert_eq!(p["path"], "/health", "{name} {probe}");
            let port = &c["ports"][0];
            assert!(
                p["port"] == port["name"] || p["port"] == port["containerPort"],
                "{name} {probe}"
            );
        }
        assert_eq!(c["ports"][0]["containerPort"], 9464, "{name}");
        assert!(seen["WATCHPOST_LISTEN"].ends_with(":9464"), "{name}");
        for r in ["requests", "limits"] {
            for what in ["cpu", "memory"] {
                assert!(c["resources"][r][what].is_string(), "{name}: {r}.{what}");
            }
        }
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        // The ConfigMap mounted (read-only) where WATCHPOST_CONFIG points, its files laid out
        // as the volume's items say; what the agent sees there must validate.
        let config = seen["WATCHPOST_CONFIG"].clone();
        let (dir, file) = config.rsplit_once('/').unwrap();
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{name}: nothing mounted at {dir}"));
        assert_eq!(mount["readOnly"], true, "{name}");
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert_eq!(
            volume["configMap"]["name"], cm["metadata"]["name"],
            "{name}"
        );
        let tree = tempfile::tempdir().unwrap();
        for item in volume["configMap"]["items"].as_array().unwrap() {
            let key = item["key"].as_str().unwrap();
            let path = tree.path().join(item["path"].as_str().unwrap());
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, cm["data"][key].as_str().unwrap()).unwrap();
        }
        assert!(
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["mountPath"] == seen["WATCHPOST_DATA_DIR"].as_str()),
            "{name}: a writable volume at the data directory"
        );
        validate(&tree.path().join(file), &seen);
    }
    assert!(
        images.iter().all(|i| !i.is_empty() && *i == images[0]),
        "{images:?}"
    );
    locations.sort();
    locations.dedup();
    assert_eq!(locations.len(), 2, "the locations differ: {locations:?}");
}
