//! `watchpost check`: run probes once, now, and report like a Nagios plugin.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::config::Config;
use crate::probe::{run_confirmed, Outcome, Probe, RunResult};

/// Run the named probes (all enabled ones when `names` is empty; named ones even if
/// disabled) concurrently under the agent's concurrency cap. Results keep config order.
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
    let sem = Arc::new(Semaphore::new(config.agent.max_concurrency));
    let mut handles = Vec::new();
    for cfg in selected {
        let probe = Probe::build(&cfg)?;
        let sem = sem.clone();
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            run_confirmed(&probe, &cfg).await
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
