//! Waitpoints: `POST /api/v1/runs/{run}/session-streams/wait` registers one on a
//! session channel (a command on the session's partition, so it is ordered with the appends);
//! `GET /api/v1/waitpoints/tokens/{waitpoint}` reads one.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use chrono::{TimeDelta, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use shared::commands::{Command, CommandBody, Outcome, RegisterWaitpointCommand};
use shared::domain::ids::new_friendly_id;
use shared::domain::waitpoint::{
    MAX_IDEMPOTENCY_KEY_CHARS, OUTPUT_TYPE, WAITPOINT_PREFIX, parse_duration,
};
use shared::domain::{Io, SessionAddress, validation};
use uuid::Uuid;

use super::LimitedBody;
use super::sessions::parse_json;
use crate::AppState;
use crate::auth::SecretKeyCaller;
use crate::error::{ApiError, Attempted};

/// Lifetime of an idempotency key when the request names none.
const DEFAULT_IDEMPOTENCY_TTL: TimeDelta = TimeDelta::days(30);

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Tags {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WaitBody {
    session: String,
    io: String,
    timeout: Option<String>,
    idempotency_key: Option<String>,
    #[serde(rename = "idempotencyKeyTTL")]
    idempotency_key_ttl: Option<String>,
    tags: Option<Tags>,
    last_seq_num: Option<Value>,
}

fn last_seq_num(value: Option<&Value>) -> Result<Option<i64>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_i64()
            .filter(|n| (-1..i64::MAX).contains(n))
            .map(Some)
            .ok_or_else(|| {
                ApiError::BadRequest("lastSeqNum: must be an integer from -1 to 2^63 - 2".into())
            }),
    }
}

/// Registers a waitpoint that completes with the first record after `lastSeqNum` (or the first
/// record appended after registration).
pub async fn wait(
    State(state): State<AppState>,
    caller: SecretKeyCaller,
    path: Result<Path<String>, PathRejection>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Value>, ApiError> {
    let Path(run_id) =
        path.map_err(|error| ApiError::BadRequest(format!("Invalid path: {error}")))?;
    let body: WaitBody = parse_json(&body)?;
    let io: Io = body
        .io
        .parse()
        .map_err(|error: shared::domain::channel::UnknownIo| {
            ApiError::BadRequest(error.to_string())
        })?;
    validation::session_segment(&body.session)?;
    let accepted_at = Utc::now();
    let timeout_at = body
        .timeout
        .as_deref()
        .map(|text| parse_duration("timeout", text))
        .transpose()?
        .map(|duration| accepted_at + duration);
    if let Some(key) = &body.idempotency_key {
        let length = key.chars().count();
        // Bytes bound it too: the key is indexed, and an index entry must stay small.
        if length == 0
            || length > MAX_IDEMPOTENCY_KEY_CHARS
            || key.len() > MAX_IDEMPOTENCY_KEY_CHARS
        {
            return Err(ApiError::BadRequest(format!(
                "idempotencyKey: must be 1–{MAX_IDEMPOTENCY_KEY_CHARS} characters and at most {MAX_IDEMPOTENCY_KEY_CHARS} bytes"
            )));
        }
    }
    let ttl = body
        .idempotency_key_ttl
        .as_deref()
        .map(|text| parse_duration("idempotencyKeyTTL", text))
        .transpose()?
        .unwrap_or(DEFAULT_IDEMPOTENCY_TTL);
    let tags = match body.tags {
        None => Vec::new(),
        Some(Tags::One(tag)) => vec![tag],
        Some(Tags::Many(tags)) => tags,
    };
    validation::tags(&tags)?;
    let last_seq_num = last_seq_num(body.last_seq_num.as_ref())?;
    if run_id.len() > 256 {
        return Err(ApiError::NotFound("Run not found"));
    }
    let environment_id = caller.environment.id;
    let run = state
        .store
        .find_run(environment_id, &run_id)
        .await?
        .ok_or(ApiError::NotFound("Run not found"))?;
    let session = state
        .store
        .find_session(environment_id, &SessionAddress::parse(&body.session))
        .await?
        .ok_or(ApiError::NotFound("Session not found"))?;
    let command = Command::new(
        environment_id,
        session.id,
        accepted_at,
        CommandBody::RegisterWaitpoint(Box::new(RegisterWaitpointCommand {
            waitpoint_id: Uuid::now_v7(),
            friendly_id: new_friendly_id(WAITPOINT_PREFIX),
            environment_public_id: caller.environment.public_id.clone(),
            run_id: run.id,
            run_friendly_id: run.friendly_id,
            session_friendly_id: session.friendly_id,
            io,
            last_seq_num,
            timeout_at,
            tags,
            idempotency_key_expires_at: body.idempotency_key.as_ref().map(|_| accepted_at + ttl),
            idempotency_key: body.idempotency_key,
        })),
    );
    match state.publisher.submit_and_wait(command).await? {
        Outcome::WaitpointRegistered {
            friendly_id,
            cached,
        } => Ok(Json(
            json!({ "waitpointId": friendly_id, "isCached": cached }),
        )),
        refused => Err(ApiError::refusal(Attempted::Wait, refused)),
    }
}

/// Reads a waitpoint of the caller's environment.
pub async fn retrieve(
    State(state): State<AppState>,
    caller: SecretKeyCaller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let Path(friendly_id) =
        path.map_err(|error| ApiError::BadRequest(format!("Invalid path: {error}")))?;
    if friendly_id.len() > 256 {
        return Err(ApiError::NotFound("Waitpoint not found"));
    }
    let waitpoint = state
        .store
        .find_waitpoint(caller.environment.id, &friendly_id)
        .await?
        .ok_or(ApiError::NotFound("Waitpoint not found"))?;
    let base = super::public_base_url(&state, &headers);
    // Optional keys are omitted, not null: the client's schema has them `.optional()`.
    let mut item = Map::new();
    item.insert("id".into(), json!(waitpoint.friendly_id));
    item.insert(
        "url".into(),
        json!(format!(
            "{base}/api/v1/waitpoints/tokens/{}",
            waitpoint.friendly_id
        )),
    );
    item.insert("status".into(), json!(waitpoint.status));
    if let Some(output) = waitpoint.output {
        item.insert("output".into(), json!(output));
    }
    item.insert("outputType".into(), json!(OUTPUT_TYPE));
    item.insert("outputIsError".into(), json!(waitpoint.output_is_error));
    if let Some(completed_at) = waitpoint.completed_at {
        item.insert("completedAt".into(), json!(completed_at));
    }
    if let Some(timeout_at) = waitpoint.timeout_at {
        item.insert("timeoutAt".into(), json!(timeout_at));
    }
    item.insert("tags".into(), waitpoint.tags);
    item.insert("createdAt".into(), json!(waitpoint.created_at));
    if let Some(key) = waitpoint.idempotency_key {
        item.insert("idempotencyKey".into(), json!(key));
    }
    if let Some(expires_at) = waitpoint.idempotency_key_expires_at {
        item.insert("idempotencyKeyExpiresAt".into(), json!(expires_at));
    }
    Ok(Json(Value::Object(item)))
}
