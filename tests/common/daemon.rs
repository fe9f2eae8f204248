//! Drive `watchpost run` as a service manager would: start it, wait until it has opened its
//! database, stop it with SIGTERM, and require the clean exit 0.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Spawn `cmd` (a `watchpost … run`), wait up to 20 s for `db` to exist, SIGTERM it, and
/// assert it exits 0 within 30 s.
pub fn run_until_db_then_term(mut cmd: Command, db: &Path) {
    let mut child = cmd
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watchpost run");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !db.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let created = db.exists();
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("run did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(created, "run did not create {}", db.display());
    assert_eq!(status.code(), Some(0), "run after SIGTERM: {status:?}");
}
