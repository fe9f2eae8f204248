//! `watchpost check`: run probes once, now, and report like a Nagios plugin.

use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::probe::{run_confirmed_gated, Outcome, Probe, RunResult};
use crate::schedule::{guard_run, Gate};

/// Run the named probes (all enabled ones when `names` is empty; named ones even if
/// disabled) concurrently under the agent's concurrency cap and per-host rate limit.
/// Results keep config order.
pub async fn run_probes(config: &Config, names: &[String]) -> anyhow::Result<Vec<RunResult>> {
    let selected: Vec<_> = if names.is_empty() {
        config
            .probes
            .iter()
            .filter(|p| p.enabled)
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
