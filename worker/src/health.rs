//! The worker's small HTTP listener (`SESSIONS_WORKER_HTTP_ADDR`): `/healthz` (the process is
//! up), `/readyz` (database, broker and cache reachable; 503 names the failing ones) and
//! `/metrics` (Prometheus). The handlers are `shared::telemetry`'s, as in the api; this module
//! says which dependencies the worker's readiness checks. Only `sessions-worker` serves it; the
//! embedded server's api answers these for both.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::consumer::WorkerContext;

pub fn router(context: Arc<WorkerContext>) -> Router {
    Router::new()
        .route("/healthz", get(shared::telemetry::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(shared::telemetry::metrics))
        .with_state(context)
}

async fn readyz(State(context): State<Arc<WorkerContext>>) -> impl IntoResponse {
    let (database, broker, cache) = tokio::join!(
        context.store.ping(),
        context.link.ping(),
        context.cache.ping()
    );
    shared::telemetry::readiness(&[
        ("database", database.is_ok()),
        ("broker", broker.is_ok()),
        ("cache", cache.is_ok()),
    ])
}
