//! Logging, metrics and the operational HTTP probes shared by both binaries.
//!
//! Logs go to stderr through `tracing` (filter with `RUST_LOG`). Metrics use the `metrics`
//! facade with a Prometheus recorder; each process renders it at `GET /metrics`. The probe
//! handlers ([`healthz`], [`metrics`], [`readiness`]) are the same in the api and the worker;
//! each process only says which dependencies its readiness checks.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the log subscriber once (later calls are no-ops, which tests rely on).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle, with an upkeep
/// task. `None` only if another recorder was installed first.
pub fn prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let latency_buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Suffix("_size".into()),
                        &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
                    )
                })
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            metrics::gauge!("sessions_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            let upkeep = handle.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let mut interval = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        interval.tick().await;
                        record_process_metrics();
                        upkeep.run_upkeep();
                    }
                });
            }
            Some(handle)
        })
        .clone()
}

/// Resident memory and CPU time of this process, from `/proc` (Linux; elsewhere nothing).
fn record_process_metrics() {
    // statm: sizes in pages; the second field is the resident set.
    let page_size = 4096.0;
    if let Some(resident_pages) =
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|statm| {
                statm
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<f64>().ok())
            })
    {
        metrics::gauge!("process_resident_memory_bytes").set(resident_pages * page_size);
    }
    // stat: utime and stime (fields 14 and 15) in clock ticks, after the parenthesised name.
    if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let after_name = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some(user + system)
        })
    {
        metrics::gauge!("process_cpu_seconds_total").set(ticks / 100.0);
    }
}

/// `GET /readyz`: the answer of a process from its dependency checks (`name`, reachable): 200
/// `{"status": "ready"}`, or 503 naming every unreachable dependency.
pub fn readiness(
    checks: &[(&'static str, bool)],
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let failing: Vec<&str> = checks
        .iter()
        .filter(|(_, reachable)| !reachable)
        .map(|(name, _)| *name)
        .collect();
    if failing.is_empty() {
        (
            axum::http::StatusCode::OK,
            axum::Json(serde_json::json!({ "status": "ready" })),
        )
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "status": "unavailable", "failing": failing })),
        )
    }
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /metrics`: the Prometheus text of this process (503 if another recorder was installed
/// first).
pub async fn metrics() -> (axum::http::StatusCode, String) {
    match prometheus() {
        Some(handle) => (axum::http::StatusCode::OK, handle.render()),
        None => (axum::http::StatusCode::SERVICE_UNAVAILABLE, String::new()),
    }
}

/// Serves the probe `router` on `listener` in a task of its own until `stop` is cancelled (the
/// worker's health listener, the api's `SESSIONS_METRICS_ADDR` listener); `what` names it in
/// the log if it fails.
pub fn serve_probes(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: crate::shutdown::CancellationToken,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the {what} failed");
        }
    })
}
