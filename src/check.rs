//! `watchpost check`: run probes once, now, and report like a Nagios plugin.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::config::{Config, ProbeConfig};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::probe::{run_confirmed_gated, Outcome, Probe, RunResult};
use crate::schedule::{guard_run, Gate};

/// Run the named probes (when `names` is empty: every enabled one but those in
/// [`own_api_probes`]; named ones even if disabled) concurrently under the agent's concurrency cap and per-host rate limit.
/// Results keep config order.
pub async fn run_probes(config: &Config, names: &[String]) -> anyhow::Result<Vec<RunResult>> {
    let selected: Vec<_> = if names.is_empty() {
        let skip = not_running_own_api_probes(config).await;
        config
            .probes
            .iter()
            .filter(|p| p.enabled && !skip.iter().any(|s| s.name == p.name))
            .cloned()
            .collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            match config.probe(n) {
                Some(p) => v.push(p.clone()),
                None => {
                    let known: Vec<&str> = config.probes.iter().map(|p| p.name.as_str()).collect();
                    anyhow::bail!("unknown probe {n:?} (known: {})", known.join(", "));
                }
            }
        }
        v
    };
    // The daemon's own gate: the concurrency cap and the per-host rate limit, passed before
    // every attempt (confirmation retries included); a panicking run becomes down/internal.
    let gate = Gate::new(config);
    let clients = crate::probe::http::Clients::default();
    let (metrics, health) = (Metrics::new(), Health::new());
    let mut handles = Vec::new();
    for cfg in selected {
        let probe = Probe::build_with(&cfg, &clients)?;
        let (gate, metrics, health) = (gate.clone(), metrics.clone(), health.clone());
        handles.push(tokio::spawn(async move {
            let host = cfg.spec.host().unwrap_or_default();
            let (gate, host) = (&gate, &host);
            guard_run(&cfg.name, cfg.kind(), &metrics, &health, async {
                run_confirmed_gated(&probe, &cfg, move || async move { gate.pass(host).await })
                    .await
            })
            .await
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await?);
    }
    Ok(out)
}

/// The enabled probes a plain `check` leaves out: those that watch this agent's own API
/// (`[agent] listen`) while nothing listens there — only `watchpost run` serves it, and a
/// first `check` must not report the agent it has not started as down. Named, they run.
pub async fn not_running_own_api_probes(config: &Config) -> Vec<&ProbeConfig> {
    let own: Vec<&ProbeConfig> = config
        .probes
        .iter()
        .filter(|p| p.enabled && watches_own_api(config, p))
        .collect();
    let Some(addr) = own.first().and_then(|_| listen_addr(config)) else {
        return Vec::new();
    };
    let addr = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    };
    let connect = tokio::net::TcpStream::connect(addr);
    match tokio::time::timeout(Duration::from_secs(1), connect).await {
        Ok(Ok(_)) => Vec::new(),
        _ => own,
    }
}

fn listen_addr(config: &Config) -> Option<SocketAddr> {
    config.agent.listen.as_deref()?.parse().ok()
}

/// Whether `p` targets the agent's own listen address (a loopback or the listen host, on
/// the listen port).
fn watches_own_api(config: &Config, p: &ProbeConfig) -> bool {
    let Some(listen) = listen_addr(config) else {
        return false;
    };
    let Ok(url) = url::Url::parse(p.spec.url()) else {
        return false;
    };
    if url.port_or_known_default() != Some(listen.port()) {
        return false;
    }
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => {
            IpAddr::V4(ip) == listen.ip()
                || ip.is_loopback() && (listen.ip().is_loopback() || listen.ip().is_unspecified())
        }
        Some(url::Host::Ipv6(ip)) => {
            IpAddr::V6(ip) == listen.ip()
                || ip.is_loopback() && (listen.ip().is_loopback() || listen.ip().is_unspecified())
        }
        None => false,
    }
}

/// Nagios convention: 0 all up · 1 any degraded · 2 any down.
pub fn exit_code(results: &[RunResult]) -> u8 {
    let worst = results
        .iter()
        .flat_map(|r| std::iter::once(r.outcome).chain(r.subchecks.iter().map(|s| s.outcome)))
        .max()
        .unwrap_or(Outcome::Up);
    match worst {
        Outcome::Up => 0,
        Outcome::Degraded => 1,
        Outcome::Down => 2,
    }
}
