//! A throwaway PostgreSQL cluster for a test: Debian's server binaries
//! (`/usr/lib/postgresql/<version>/bin`), a data directory in a temp dir, listening on
//! 127.0.0.1 at a free port with its socket in the temp dir, fsync off. `initdb` runs once
//! per machine into a template next to the temp dirs; each cluster starts from a copy (a
//! few hundred ms instead of seconds). Postgres refuses to run as root, so as root every
//! server command runs as the `postgres` user. The cluster is stopped and its directory
//! deleted when the value is dropped, also when the test panics.
//!
//! A missing PostgreSQL fails the test with a clear message (CI installs it, .ci/run).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

/// The newest installed server's bin directory.
fn bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = glob::glob("/usr/lib/postgresql/*/bin")
        .map(|g| g.flatten().collect())
        .unwrap_or_default();
    dirs.retain(|d| d.join("initdb").exists() && d.join("pg_ctl").exists());
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    match dirs.pop() {
        Some(d) => d,
        None => panic!(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: \
             install Debian's `postgresql` package (apt-get install postgresql); .ci/run does"
        ),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command run as the `postgres` user when we are root.
fn as_pg(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_pg(path: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "cannot chown {} to postgres", path.display());
    }
}

fn run(mut c: Command, what: &str) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The initdb'ed template for `bin`, made once per machine (atomically, by rename).
fn template(bin: &Path) -> PathBuf {
    let version = bin
        .parent()
        .and_then(|v| v.file_name())
        .and_then(|v| v.to_str())
        .unwrap_or("x")
        .to_string();
    let base = std::env::temp_dir().join(format!("watchpost-pg-template-{version}"));
    let data = base.join("data");
    if data.join("PG_VERSION").exists() {
        return data;
    }
    let tmp = tempfile::Builder::new()
        .prefix("watchpost-pg-init-")
        .tempdir()
        .expect("temp dir for initdb");
    chown_pg(tmp.path());
    let mut c = as_pg(&bin.join("initdb"));
    c.arg("-D").arg(tmp.path().join("data")).args([
        "--auth=trust",
        "--no-sync",
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--locale=C",
    ]);
    run(c, "initdb");
    let _ = std::fs::create_dir_all(&base);
    // A racing test may have won: then ours is dropped with its temp dir.
    let _ = std::fs::rename(tmp.path().join("data"), &data);
    assert!(
        data.join("PG_VERSION").exists(),
        "no PostgreSQL template at {}",
        data.display()
    );
    data
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl PgCluster {
    /// Start a fresh cluster (panics with a clear message when PostgreSQL is missing).
    pub fn start() -> PgCluster {
        let bin = bin_dir();
        let tpl = template(&bin);
        let dir = tempfile::Builder::new()
            .prefix("watchpost-pg-")
            .tempdir()
            .expect("temp dir");
        run(
            {
                let mut c = Command::new("cp");
                c.arg("-a").arg(&tpl).arg(dir.path().join("data"));
                c
            },
            "copying the PostgreSQL template",
        );
        chown_pg(dir.path());
        let c = PgCluster {
            dir,
            bin,
            port: free_port(),
        };
        c.up();
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Start the server (again, after [`PgCluster::stop`]) on the same port and data.
    pub fn up(&self) {
        let mut c = as_pg(&self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"));
        c.arg("-o").arg(format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=50",
            self.port,
            self.dir.path().display()
        ));
        c.args(["-w", "-t", "60", "start"]);
        run(c, "pg_ctl start");
    }

    /// Stop the server at once (connections are cut).
    pub fn stop(&self) {
        let mut c = as_pg(&self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-t", "60", "stop"]);
        run(c, "pg_ctl stop");
    }

    /// A URL for database `db` (create it first with [`PgCluster::create_db`]).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// URL of the default database.
    pub fn default_url(&self) -> String {
        self.url("postgres")
    }

    /// A client tool of this cluster's, pointed at it as `postgres`.
    fn client(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin.join(tool));
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        c
    }

    /// Create a database and return its URL.
    pub fn create_db(&self, db: &str) -> String {
        let mut c = self.client("createdb");
        c.arg(db);
        run(c, "createdb");
        self.url(db)
    }

    /// Make every commit durable across [`PgCluster::stop`], for sessions opened from now on
    /// (it stays so across restarts).
    /// The cluster runs with `synchronous_commit=off` for speed, so an immediate stop can
    /// lose commits the server has already acknowledged — which a real server (default on)
    /// does not; a test that stops the server and counts what was committed needs this.
    pub fn durable_commits(&self) {
        let mut c = self.client("psql");
        c.args([
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            // A role setting outranks the server's command line (`-c synchronous_commit=off`).
            "ALTER ROLE postgres SET synchronous_commit = on",
        ]);
        run(c, "psql: synchronous_commit = on");
    }

    /// The server log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut c = as_pg(&self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-t", "30", "stop"]);
        let _ = c.output();
    }
}
