//! A real SMTP server for tests: `tests/peers/smtp_sink.py` (aiosmtpd) on 127.0.0.1, storing
//! each message as a file we read back. Fails the test (never skips) when aiosmtpd is not
//! installed: `pip install -r tests/peers/requirements.txt`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SmtpSink {
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// `None` (plain), `Some("implicit")` or `Some("starttls")`.
    tls: Option<&'static str>,
    child: Child,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One stored message.
#[derive(Debug, Clone)]
pub struct Mail {
    pub raw: String,
}

impl Mail {
    /// First value of a header (unfolded), case-insensitive.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.raw.split("\r\n\r\n").next().unwrap_or("");
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
        unfolded.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

impl SmtpSink {
    /// Start the sink; `auth` = Some(("user", "pass")) requires AUTH.
    pub fn start(auth: Option<(&str, &str)>, reject: bool) -> SmtpSink {
        SmtpSink::start_with(auth, reject, None)
    }

    /// Start a TLS sink: `tls` is "implicit" (SMTPS) or "starttls" (required), serving the
    /// PEM certificate chain and key files `(cert, key)`.
    pub fn start_tls(
        auth: Option<(&str, &str)>,
        tls: &'static str,
        cert: &Path,
        key: &Path,
    ) -> SmtpSink {
        SmtpSink::start_with(auth, false, Some((tls, cert, key)))
    }

    fn start_with(
        auth: Option<(&str, &str)>,
        reject: bool,
        tls: Option<(&'static str, &Path, &Path)>,
    ) -> SmtpSink {
        let check = Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .output();
        match check {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "aiosmtpd is not installed for python3 (needed for the e-mail tests): pip install -r tests/peers/requirements.txt\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("python3 not found ({e}); the e-mail tests need python3 with aiosmtpd (tests/peers/requirements.txt)"),
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("python3");
        // aiosmtpd warns about AUTH without TLS: that is the point of a local test sink.
        cmd.args(["-W", "ignore"])
            .arg(peers_dir().join("smtp_sink.py"))
            .args(["--port", &port.to_string(), "--outdir"])
            .arg(dir.path());
        if let Some((u, p)) = auth {
            cmd.args(["--auth", &format!("{u}:{p}")]);
        }
        if reject {
            cmd.arg("--reject");
        }
        if let Some((mode, cert, key)) = tls {
            cmd.args(["--tls", mode, "--cert"])
                .arg(cert)
                .arg("--key")
                .arg(key);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting smtp_sink.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "smtp_sink.py did not start");
        SmtpSink {
            port,
            dir,
            tls: tls.map(|t| t.0),
            child,
        }
    }

    pub fn url(&self) -> String {
        match self.tls {
            None => format!("smtp://127.0.0.1:{}", self.port),
            Some("implicit") => format!("smtps://127.0.0.1:{}", self.port),
            Some(_) => format!("smtp://127.0.0.1:{}?tls=starttls", self.port),
        }
    }

    pub fn mails(&self) -> Vec<Mail> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| Mail {
                raw: std::fs::read_to_string(p).unwrap(),
            })
            .collect()
    }

    pub async fn wait_mails(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.mails();
            if m.len() >= n {
                return m;
            }
            if Instant::now() > deadline {
                let subjects: Vec<String> = m
                    .iter()
                    .map(|m| m.header("subject").unwrap_or_default())
                    .collect();
                panic!(
                    "timed out waiting for {n} mails; got {}: {subjects:?}",
                    m.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}
