//! Who watches the watcher: `[agent] heartbeat` pings an external dead man's switch
//! (healthchecks.io, Better Stack, a PagerDuty heartbeat, any URL) every interval, but only
//! while the store writer answers a ping and the scheduler, evaluator and dispatcher are
//! alive and making progress — the same checks `/health` makes. A dead or wedged agent
//! stops pinging, so the switch pages someone.
//!
//! Not here: the checks themselves (`api::all_checks`, `health`).

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::Heartbeat;
use crate::health::Health;
use crate::redact::redact_url;
use crate::store::Store;

/// Ping `hb` on its absolute schedule until `stop`, while every part is healthy.
pub async fn run(
    hb: Heartbeat,
    store: Store,
    health: Health,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .user_agent(crate::probe::http::USER_AGENT)
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()?;
    let shown = redact_url(&hb.url);
    let mut tick = tokio::time::interval(hb.interval);
    // A check that took longer than the interval (a wedged writer) does not make up for the
    // pings it missed: the switch must see the gap.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut was_healthy = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let checks = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            c = crate::api::all_checks(Some(store.clone()), &health) => c,
        };
        let failing: Vec<String> = checks
            .iter()
            .filter(|(_, c)| c.status() == "fail")
            .map(|(n, c)| format!("{n}: {}", c.to_json()["error"].as_str().unwrap_or("")))
            .collect();
        if !failing.is_empty() {
            if was_healthy {
                tracing::warn!(url = %shown, failing = %failing.join("; "), "heartbeat paused: the agent is not healthy");
            }
            was_healthy = false;
            continue;
        }
        if !was_healthy {
            tracing::info!(url = %shown, "heartbeat resumed");
            was_healthy = true;
        }
        ping(&client, &hb, &shown).await;
    }
}

async fn ping(client: &reqwest::Client, hb: &Heartbeat, shown: &str) {
    let r = client
        .request(hb.method.clone(), &hb.url)
        .timeout(hb.timeout)
        .send()
        .await;
    match r {
        Ok(resp) if resp.status().is_success() => {
            tracing::debug!(url = %shown, "heartbeat sent");
        }
        Ok(resp) => {
            tracing::warn!(url = %shown, status = resp.status().as_u16(), "heartbeat refused");
        }
        Err(e) => {
            // Never the URL itself: it often carries the check's token.
            tracing::warn!(url = %shown, error = %e.without_url(), "heartbeat failed");
        }
    }
}
