//! The agent's own HTTP surface: `/health` (the same health contract it reads), `/metrics`
//! (Prometheus), a small JSON API and a one-page dashboard. Read-only: every handler opens
//! its own read connection; only the writer task writes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::Config;
use crate::health::{Check, Health};
use crate::metrics::Metrics;
use crate::store::{self, Store};

/// How long the store writer may take to answer a ping before `/health` calls it wedged.
const WRITER_PING: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct AppState {
    config: Arc<Config>,
    metrics: Metrics,
    /// The writer handle for `/health`'s ping; released at shutdown so that a connection
    /// still open does not keep the writer from finishing.
    store: Arc<Mutex<Option<Store>>>,
    db: PathBuf,
    health: Health,
}

impl AppState {
    pub fn new(config: Arc<Config>, metrics: Metrics, store: Store, health: Health) -> Self {
        AppState {
            config,
            metrics,
            db: store.path().to_path_buf(),
            store: Arc::new(Mutex::new(Some(store))),
            health,
        }
    }

    /// Drop the writer handle (the API is stopping).
    pub fn release_store(&self) {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/runs/latest", get(latest))
        .route("/api/incidents", get(incidents))
        .route("/api/report", get(report))
        .with_state(state)
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn internal(e: anyhow::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"error": format!("{e:#}")})),
    )
        .into_response()
}

/// Run a blocking read on its own connection off the async threads.
async fn read<T: Send + 'static>(
    db: PathBuf,
    f: impl FnOnce(&rusqlite::Connection) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<Option<T>> {
    tokio::task::spawn_blocking(move || match store::open_reader(&db)? {
        Some(c) => f(&c).map(Some),
        None => Ok(None),
    })
    .await?
}

/// Each part of the pipeline: the writer answers a ping through its queue (a round trip
/// of everything queued before it), the other parts by their progress stamps and faults.
async fn health(State(s): State<AppState>) -> Response {
    let t = Instant::now();
    let store = s.store.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let ping = async {
        match store {
            Some(store) => store.flush().await,
            None => Err(anyhow::anyhow!("the agent is stopping")),
        }
    };
    let writer = match tokio::time::timeout(WRITER_PING, ping).await {
        Ok(Ok(())) => Check::Ok {
            latency_ms: t.elapsed().as_secs_f64() * 1e3,
        },
        Ok(Err(e)) => Check::Fail {
            error: format!("{e:#}"),
        },
        Err(_) => Check::Fail {
            error: format!(
                "wedged: the store writer did not answer a ping within {} s",
                WRITER_PING.as_secs()
            ),
        },
    };
    let writer = match s.health.part("writer") {
        Some(dead @ Check::Fail { .. }) => dead,
        _ => writer,
    };
    let mut checks = vec![("writer".to_string(), writer)];
    checks.extend(s.health.checks());
    let status = if checks.iter().any(|(_, c)| c.status() == "fail") {
        "fail"
    } else if checks.iter().any(|(_, c)| c.status() == "degraded") {
        "degraded"
    } else {
        "ok"
    };
    let checks: serde_json::Map<String, Value> =
        checks.into_iter().map(|(n, c)| (n, c.to_json())).collect();
    let body = json!({
        "status": status,
        "service": "watchpost",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.health.uptime().as_secs(),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "checks": checks,
    });
    let code = if status == "fail" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    no_store((code, Json(body)).into_response())
}

async fn metrics(State(s): State<AppState>) -> Response {
    s.metrics.set(
        "watchpost_uptime_seconds",
        &[],
        s.health.uptime().as_secs_f64(),
    );
    no_store(
        (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            s.metrics.render(),
        )
            .into_response(),
    )
}

async fn latest(State(s): State<AppState>) -> Response {
    // From the store's memory; from the database once the API has released the store.
    let mem = s
        .store
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(Store::latest);
    if let Some(l) = mem {
        return no_store(Json(json!({"runs": l.runs()})).into_response());
    }
    match read(s.db.clone(), |c| Ok(store::latest_runs(c)?)).await {
        Ok(v) => no_store(Json(json!({"runs": v.unwrap_or_default()})).into_response()),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct IncidentQuery {
    #[serde(default)]
    open: bool,
}

async fn incidents(State(s): State<AppState>, Query(q): Query<IncidentQuery>) -> Response {
    match read(s.db.clone(), move |c| {
        crate::incident::list_incidents(c, q.open)
    })
    .await
    {
        Ok(v) => no_store(Json(json!({"incidents": v.unwrap_or_default()})).into_response()),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct ReportQuery {
    window: Option<String>,
}

async fn report(State(s): State<AppState>, Query(q): Query<ReportQuery>) -> Response {
    let window = match q
        .window
        .as_deref()
        .map(crate::config::duration::parse)
        .unwrap_or(Ok(Duration::from_secs(86400)))
    {
        Ok(w) => w,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    };
    let cfg = s.config.clone();
    let now = chrono::Utc::now().timestamp_millis();
    match read(s.db.clone(), move |c| {
        crate::report::build(&cfg, c, window, now)
    })
    .await
    {
        Ok(Some(r)) => no_store(Json(r).into_response()),
        Ok(None) => no_store(Json(Value::Null).into_response()),
        Err(e) => internal(e),
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

const DASHBOARD: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>watchpost</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:20px}table{border-collapse:collapse;margin-bottom:2em}
td,th{padding:4px 10px;border-bottom:1px solid #eee;text-align:left}
.up{color:#1a7f37}.degraded{color:#9a6700}.down{color:#cf222e;font-weight:bold}
small{color:#777}
</style></head><body>
<h1>watchpost</h1><small id="ts"></small>
<h2>Probes</h2><table id="runs"><tr><th>series</th><th>outcome</th><th>phases</th><th>error</th><th>at</th></tr></table>
<h2>Incidents</h2><table id="inc"></table>
<p><a href="/api/report?window=1h">report (1h, JSON)</a> · <a href="/metrics">metrics</a> · <a href="/health">health</a></p>
<script>
function esc(s){return String(s??'').replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
async function tick(){
  try{
    const r=await (await fetch('/api/runs/latest')).json();
    let h='<tr><th>series</th><th>outcome</th><th>phases</th><th>error</th><th>at</th></tr>';
    for(const x of r.runs){
      const ph=Object.entries(x.phases||{}).map(([k,v])=>k+' '+v.toFixed(1)+'ms').join(' · ');
      h+=`<tr><td>${esc(x.probe)}</td><td class="${esc(x.outcome)}">${esc(x.outcome)}</td><td>${esc(ph)}</td><td>${esc(x.error_class?'['+x.error_class+'] '+x.error_message:'')}</td><td>${new Date(x.started_at).toLocaleTimeString()}</td></tr>`;
    }
    document.getElementById('runs').innerHTML=h;
    const i=await (await fetch('/api/incidents')).json();
    let g='';
    for(const x of i.incidents.slice(0,20)){g+=`<tr><td><pre>${esc(JSON.stringify(x))}</pre></td></tr>`}
    document.getElementById('inc').innerHTML=g||'<tr><td>none</td></tr>';
    document.getElementById('ts').textContent='updated '+new Date().toLocaleTimeString();
  }catch(e){document.getElementById('ts').textContent='agent unreachable: '+e}
}
tick();setInterval(tick,3000);
</script></body></html>"#;
