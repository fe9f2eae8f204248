//! Faults a rehearsal injects on the probe side: the closed set of modes, the registry the
//! scheduler consults before every attempt ([`Faults`]), and the transport proxy on
//! 127.0.0.1 that makes `blackhole`, `latency` and `reset` real at the TCP level — the
//! probe's connection to its target is redirected to the proxy (the host name, SNI and
//! certificate check stay those of the target), so the same code that meets a real outage
//! meets this one, through TLS too.
//!
//! Not here: what a probe kind does with a fault (see `probe::*`), or the rehearsal's
//! timeline (see `chaos::run`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long a blackholed connection is held open at most (the probe's own deadline ends
/// it much sooner).
const BLACKHOLE_HOLD: Duration = Duration::from_secs(600);
/// Deadline for the proxy's own connection to the real target.
const UPSTREAM_CONNECT: Duration = Duration::from_secs(10);
/// Most connections one proxy holds at once; more are refused (closed on accept).
const MAX_PROXY_CONNECTIONS: usize = 256;

/// A fault mode with its parameters (closed set; see CONFIG.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The run fails without touching the network (the alert path only).
    Down,
    /// Connect succeeds, nothing ever answers.
    Blackhole,
    /// Every read from the target arrives this much later.
    Latency(Duration),
    /// The connection is reset (RST) right after connect.
    Reset,
    /// The HTTP response is replaced by this status and body.
    HttpStatus { status: u16, body: String },
    /// The server closes the WebSocket with this code and reason `after` the connect.
    WsClose {
        code: u16,
        reason: String,
        after: Duration,
    },
    /// The listen probe streams noise (its own utterance played backwards) instead of speech.
    Garble,
    /// The listen session sees an Omi-style `service_status` `stt_degraded` event.
    SttDegraded,
}

impl Mode {
    /// The mode's word in rehearsal files.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Down => "down",
            Mode::Blackhole => "blackhole",
            Mode::Latency(_) => "latency",
            Mode::Reset => "reset",
            Mode::HttpStatus { .. } => "http_status",
            Mode::WsClose { .. } => "ws_close",
            Mode::Garble => "garble",
            Mode::SttDegraded => "stt_degraded",
        }
    }

    /// Every mode word, for error messages.
    pub const NAMES: &'static str =
        "down, blackhole, latency, reset, http_status, ws_close, garble, stt_degraded";

    /// The probe kinds this mode applies to (`None`: every kind).
    pub fn kinds(&self) -> Option<&'static [&'static str]> {
        match self {
            Mode::Down | Mode::Blackhole | Mode::Latency(_) | Mode::Reset => None,
            Mode::HttpStatus { .. } => Some(&["http"]),
            Mode::WsClose { .. } => Some(&["websocket", "listen"]),
            Mode::Garble | Mode::SttDegraded => Some(&["listen"]),
        }
    }

    /// Whether the mode works at the transport (through the fault proxy).
    pub fn is_transport(&self) -> bool {
        matches!(self, Mode::Blackhole | Mode::Latency(_) | Mode::Reset)
    }
}

/// What a probe attempt sees of an active fault.
#[derive(Debug, Clone)]
pub struct Injection {
    pub mode: Mode,
    /// Transport modes: connect here instead of the target (the fault proxy).
    pub via: Option<SocketAddr>,
}

struct Active {
    injection: Arc<Injection>,
    /// Stops the proxy when the fault is cleared.
    _proxy: Option<DropGuard>,
}

/// The faults active on this agent, by probe name. Cheap to clone; empty on a daemon that
/// is not rehearsing, where a lookup is one read lock on an empty map.
#[derive(Clone, Default)]
pub struct Faults(Arc<RwLock<HashMap<String, Active>>>);

impl Faults {
    /// The fault `probe` should see now, if any.
    pub fn get(&self, probe: &str) -> Option<Arc<Injection>> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        map.get(probe).map(|a| a.injection.clone())
    }

    /// Whether any fault is active.
    pub fn is_empty(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Start `mode` for `probe`, whose target is `target` (`host:port`, for the proxy).
    /// Transport modes start their proxy first; an error here leaves nothing behind.
    pub async fn inject(
        &self,
        probe: &str,
        mode: Mode,
        target: Option<(String, u16)>,
    ) -> anyhow::Result<()> {
        let (via, guard) = if mode.is_transport() {
            let Some(target) = target else {
                anyhow::bail!(
                    "probe {probe} has no host and port to put a {} fault in front of",
                    mode.name()
                );
            };
            let (addr, guard) = start_proxy(mode.clone(), target).await?;
            (Some(addr), Some(guard))
        } else {
            (None, None)
        };
        let active = Active {
            injection: Arc::new(Injection { mode, via }),
            _proxy: guard,
        };
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(probe.to_string(), active);
        Ok(())
    }

    /// End the fault of `probe` (its proxy stops; connections it holds are closed).
    pub fn clear(&self, probe: &str) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(probe);
    }

    /// End every fault.
    pub fn clear_all(&self) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Start the transport proxy for `mode` in front of `target`; it runs until the guard drops.
async fn start_proxy(mode: Mode, target: (String, u16)) -> anyhow::Result<(SocketAddr, DropGuard)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PROXY_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = l.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "fault proxy: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue; // over the cap: dropped, the client sees a close
            };
            let (mode, target, stop) = (mode.clone(), target.clone(), stop.clone());
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = serve(sock, &mode, &target) => {}
                }
            });
        }
    });
    Ok((addr, guard))
}

/// One proxied connection under `mode`.
async fn serve(sock: TcpStream, mode: &Mode, target: &(String, u16)) {
    match mode {
        Mode::Blackhole => {
            // Accepted, never read, never answered: the client's deadline decides.
            let _hold = sock;
            tokio::time::sleep(BLACKHOLE_HOLD).await;
        }
        Mode::Reset => {
            // SO_LINGER 0 turns the close into an RST, as a crashed or firewalled peer sends.
            // (Deprecated because a *non-zero* linger blocks on drop; zero never does.)
            #[allow(deprecated)]
            let _ = sock.set_linger(Some(Duration::ZERO));
            drop(sock);
        }
        Mode::Latency(delay) => {
            if let Err(e) = forward_delayed(sock, target, *delay).await {
                tracing::debug!(error = %e, "fault proxy: connection ended");
            }
        }
        _ => {}
    }
}

/// Longest request head the proxy reads to tell a `CONNECT` from a plain request.
const MAX_HEAD: usize = 16 * 1024;

/// Forward both ways; every read from the target is delivered `delay` later. HTTP probes
/// reach the proxy as an HTTP proxy (reqwest): `https` through `CONNECT` (answered here,
/// then the TLS bytes pass untouched), `http` as a plain request that is passed on as is.
async fn forward_delayed(
    mut client: TcpStream,
    target: &(String, u16),
    delay: Duration,
) -> std::io::Result<()> {
    // WebSocket probes start with their own bytes; HTTP probes with a proxy request.
    let mut head = Vec::new();
    let mut buf = vec![0u8; 4096];
    let connect = loop {
        let n = tokio::time::timeout(UPSTREAM_CONNECT, client.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if !b"CONNECT ".starts_with(&head[..head.len().min(8)]) {
            break false; // not a CONNECT: pass everything on
        }
        if head.len() >= 8 && head.windows(4).any(|w| w == b"\r\n\r\n") {
            break true;
        }
        if head.len() > MAX_HEAD {
            return Ok(());
        }
    };
    if connect {
        // Only the head is consumed; TLS starts after our answer.
        let end = head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(head.len(), |i| i + 4);
        head.drain(..end);
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
    }
    let upstream = tokio::time::timeout(
        UPSTREAM_CONNECT,
        TcpStream::connect((target.0.as_str(), target.1)),
    )
    .await
    .map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream connect timed out")
    })??;
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    uw.write_all(&head).await?;
    let up = async {
        let r = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
        r.map(|_| ())
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = ur.read(&mut buf).await?;
            tokio::time::sleep(delay).await;
            if n == 0 {
                let _ = cw.shutdown().await;
                return Ok::<(), std::io::Error>(());
            }
            cw.write_all(&buf[..n]).await?;
        }
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}

/// `host:port` of a URL (default ports by scheme), for the proxy's upstream.
pub fn target_of(url: &str) -> Option<(String, u16)> {
    let u = url::Url::parse(url).ok()?;
    let host = u
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = u.port_or_known_default()?;
    Some((host, port))
}

/// Deterministic speech-shaped noise for `garble`: the frame's 16-bit samples in reverse
/// order. The session sends the frames last to first, so the utterance plays backwards: it
/// keeps the loudness and spectrum of speech (a recognizer hears *words*, just not these)
/// and no energy envelope of the original.
pub fn garble_frame(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len());
    for s in frame.chunks_exact(2).rev() {
        out.extend_from_slice(s);
    }
    if frame.len() % 2 == 1 {
        out.push(frame[frame.len() - 1]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garble_reverses_samples_not_bytes() {
        assert_eq!(garble_frame(&[1, 2, 3, 4, 5, 6]), vec![5, 6, 3, 4, 1, 2]);
        assert_eq!(garble_frame(&[1, 2, 9]), vec![1, 2, 9]);
        assert!(garble_frame(&[]).is_empty());
    }

    #[test]
    fn targets_have_default_ports() {
        assert_eq!(
            target_of("https://a.example/x"),
            Some(("a.example".into(), 443))
        );
        assert_eq!(
            target_of("ws://127.0.0.1:81/"),
            Some(("127.0.0.1".into(), 81))
        );
        assert_eq!(target_of("wss://[::1]/"), Some(("::1".into(), 443)));
    }
}
