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

/// Database and broker are reachable; 503 names the failing dependency. (The api does not use
/// Redis, so a Redis outage does not take api instances out of a load balancer.)
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (database, broker) = tokio::join!(state.store.ping(), state.publisher.link().ping());
    let (status, body) =
        shared::telemetry::readiness(&[("database", database.is_ok()), ("broker", broker.is_ok())]);
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        Json(body),
    )
}

/// Prometheus text format.
pub async fn metrics() -> impl IntoResponse {
    match shared::telemetry::render_metrics() {
        Some(text) => (StatusCode::OK, text),
        None => (StatusCode::SERVICE_UNAVAILABLE, String::new()),
    }
}
