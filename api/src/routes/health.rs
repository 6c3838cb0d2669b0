//! The api's readiness: database and broker (the probe handlers themselves are
//! `shared::telemetry`'s, the same in the worker).

use axum::extract::State;
use axum::response::IntoResponse;

use crate::AppState;

/// Database and broker are reachable; 503 names the failing dependency. (The api does not use
/// Redis, so a Redis outage does not take api instances out of a load balancer.)
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (database, broker) = tokio::join!(state.store.ping(), state.publisher.link().ping());
    shared::telemetry::readiness(&[("database", database.is_ok()), ("broker", broker.is_ok())])
}
