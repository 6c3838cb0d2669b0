//! Chat snapshots: `GET`/`PUT /api/v1/sessions/{session}/snapshot-url` hand out a signed,
//! 300-second URL; `GET`/`PUT /api/v1/session-snapshots/{session}` serve it. The URL carries no
//! credential but its signature, which binds environment, session, method and expiry.
//!
//! Snapshot blobs are written straight to the database by the api, not through the session's
//! partition: nothing else is ordered against them, and multi-megabyte blobs do not belong in
//! broker messages.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use shared::domain::SessionAddress;
use shared::domain::scopes::Action;
use shared::domain::snapshots::{SNAPSHOT_URL_SECONDS, sign, verify};

use super::body::{BodyLimits, read_whole_body};
use super::public_base_url;
use super::sessions::session_address;
use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// `GET` (needs `read`) or `PUT` (needs `write`) `…/snapshot-url`: `{presignedUrl}`.
pub async fn snapshot_url(
    State(state): State<AppState>,
    method: Method,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let address = session_address(path)?;
    let action = if method == Method::PUT {
        Action::Write
    } else {
        Action::Read
    };
    let session = caller.session(&state, action, &address).await?;
    let blob_method = if method == Method::PUT { "PUT" } else { "GET" };
    let expires = Utc::now().timestamp() + SNAPSHOT_URL_SECONDS;
    let environment = &caller.environment.public_id;
    let signature = sign(
        &state.settings.master_key,
        environment,
        &session.friendly_id,
        blob_method,
        expires,
    );
    let url = format!(
        "{}/api/v1/session-snapshots/{}?environment={environment}&method={blob_method}&expires={expires}&signature={signature}",
        public_base_url(&state, &headers),
        session.friendly_id,
    );
    Ok(Json(json!({ "presignedUrl": url })))
}

#[derive(Debug, Deserialize)]
pub struct SignedQuery {
    environment: String,
    method: String,
    expires: i64,
    signature: String,
}

const REFUSED: &str = "This snapshot URL is invalid or has expired";

/// `GET`/`PUT /api/v1/session-snapshots/{session}?environment&method&expires&signature`.
pub async fn blob(
    State(state): State<AppState>,
    method: Method,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<SignedQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(session_id) =
        path.map_err(|error| ApiError::BadRequest(format!("Invalid path: {error}")))?;
    let Query(signed) = query.map_err(|_| ApiError::Forbidden(REFUSED.into()))?;
    let now = Utc::now().timestamp();
    let valid = signed.method == method.as_str()
        && signed.expires >= now
        && signed.expires <= now + SNAPSHOT_URL_SECONDS + 5
        && verify(
            &state.settings.master_key,
            &signed.environment,
            &session_id,
            &signed.method,
            signed.expires,
            &signed.signature,
        );
    if !valid {
        return Err(ApiError::Forbidden(REFUSED.into()));
    }
    let environment = state
        .store
        .environment_by_public_id(&signed.environment)
        .await?
        .ok_or(ApiError::NotFound("Session not found"))?;
    // The signature identified the environment: the request counts against its rate limit.
    state.rate_limits.check(environment.id)?;
    let session = state
        .store
        .find_session(environment.id, &SessionAddress::FriendlyId(session_id))
        .await?
        .ok_or(ApiError::NotFound("Session not found"))?;
    if method == Method::PUT {
        let limit = state.settings.max_snapshot_bytes;
        if let Some(length) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok())
            && length > limit
        {
            return Err(ApiError::PayloadTooLarge(format!(
                "Snapshot is {length} bytes; the limit is {limit}"
            )));
        }
        let bytes: Bytes = read_whole_body(body, BodyLimits::from_settings(&state.settings, limit))
            .await
            .map_err(|error| {
                error.into_api_error(format!("Snapshot exceeds the limit of {limit} bytes"))
            })?;
        state
            .store
            .put_snapshot(environment.id, session.id, bytes.to_vec())
            .await?;
        return Ok(Json(json!({ "ok": true })).into_response());
    }
    let snapshot = state
        .store
        .snapshot(environment.id, session.id)
        .await?
        .ok_or(ApiError::NotFound("No snapshot stored for this session"))?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        snapshot,
    )
        .into_response())
}
