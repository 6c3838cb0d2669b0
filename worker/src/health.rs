//! The worker's small HTTP listener (`SESSIONS_WORKER_HTTP_ADDR`): `/healthz` (the process is
//! up), `/readyz` (database, broker and cache reachable; 503 names the failing ones) and
//! `/metrics` (Prometheus). Only `sessions-worker` serves it; the embedded server's api answers
//! these for both.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::consumer::WorkerContext;

pub fn router(context: Arc<WorkerContext>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(context)
}

async fn readyz(State(context): State<Arc<WorkerContext>>) -> impl IntoResponse {
    let (database, broker, cache) = tokio::join!(
        context.store.ping(),
        context.link.ping(),
        context.cache.ping()
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

async fn metrics() -> impl IntoResponse {
    match shared::telemetry::prometheus() {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (StatusCode::SERVICE_UNAVAILABLE, String::new()),
    }
}
