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
    let (status, body) = shared::telemetry::readiness(&[
        ("database", database.is_ok()),
        ("broker", broker.is_ok()),
        ("cache", cache.is_ok()),
    ]);
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        Json(body),
    )
}

async fn metrics() -> impl IntoResponse {
    match shared::telemetry::render_metrics() {
        Some(text) => (StatusCode::OK, text),
        None => (StatusCode::SERVICE_UNAVAILABLE, String::new()),
    }
}
