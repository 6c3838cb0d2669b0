//! Liveness, readiness and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use crate::AppState;

/// The process is up.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Database, broker and cache are reachable; 503 names the failing dependency.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (database, broker, cache) = tokio::join!(
        state.store.ping(),
        state.publisher.link().ping(),
        state.cache.ping()
    );
    let failing: Vec<&str> = [
        ("database", database.is_err()),
        ("broker", broker.is_err()),
        ("cache", cache.is_err()),
    ]
    .into_iter()
    .filter_map(|(name, failed)| failed.then_some(name))
    .collect();
    if failing.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "failing": failing })),
        )
    }
}

/// Prometheus text format.
pub async fn metrics() -> impl IntoResponse {
    match shared::telemetry::prometheus() {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (StatusCode::SERVICE_UNAVAILABLE, String::new()),
    }
}
