//! `POST /api/v1/sessions` (create or return) and `POST /api/v1/sessions/{session}/close`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::commands::{
    CloseSessionCommand, Command, CommandBody, CreateSessionCommand, EndAndContinueCommand,
    Outcome, PatchSessionCommand,
};
use shared::domain::ids::{self, RUN_PREFIX, SESSION_PREFIX};
use shared::domain::session::SessionItem;
use shared::domain::tokens::{PublicTokenClaims, mint_public_token, session_token_scopes};
use shared::domain::{SessionAddress, validation};
use shared::storage::{ListError, PageCursor, SessionListQuery, StatusFilter};
use uuid::Uuid;

use super::LimitedBody;
use crate::AppState;
use crate::auth::{Caller, Credential, SecretKeyCaller};
use crate::error::{ApiError, Attempted};
use shared::domain::scopes::{Action, allows_session_create, allows_trigger};

/// Lifetime of the token returned by create.
const SESSION_TOKEN_SECONDS: i64 = 3600;

/// `expiresAt` as the client sends it: an ISO date string or epoch milliseconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DateInput {
    Text(String),
    Millis(i64),
}

impl DateInput {
    fn parse(&self) -> Result<DateTime<Utc>, ApiError> {
        let parsed = match self {
            DateInput::Text(text) => DateTime::parse_from_rfc3339(text)
                .map(|date| date.with_timezone(&Utc))
                .ok(),
            DateInput::Millis(millis) => DateTime::from_timestamp_millis(*millis),
        };
        let parsed = parsed.ok_or_else(|| {
            ApiError::BadRequest("expiresAt: must be an ISO 8601 date or epoch milliseconds".into())
        })?;
        Ok(validation::storable_date("expiresAt", parsed)?)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateSessionBody {
    #[serde(rename = "type")]
    session_type: String,
    external_id: Option<String>,
    task_identifier: String,
    trigger_config: serde_json::Map<String, Value>,
    tags: Option<Vec<String>>,
    metadata: Option<serde_json::Map<String, Value>>,
    expires_at: Option<DateInput>,
}

/// Parses a JSON body with a 400 that says what is wrong. No string in it may hold U+0000
/// (nothing could store it).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let invalid =
        |error: serde_json::Error| ApiError::BadRequest(format!("Invalid JSON body: {error}"));
    let value: Value = serde_json::from_slice(body).map_err(invalid)?;
    validation::json_without_nul("body", &value)?;
    serde_json::from_value(value).map_err(invalid)
}

/// Validates the `:session` segment and classifies it.
pub(crate) fn session_address(
    path: Result<Path<String>, PathRejection>,
) -> Result<SessionAddress, ApiError> {
    let Path(segment) =
        path.map_err(|error| ApiError::BadRequest(format!("Invalid path: {error}")))?;
    validation::session_segment(&segment)?;
    Ok(SessionAddress::parse(&segment))
}

async fn created_response(
    state: &AppState,
    caller: &Caller,
    session: &SessionItem,
    run_friendly_id: &str,
    cached: bool,
) -> Result<Response, ApiError> {
    let signing_key = caller.signing_key(state).await?;
    let now = Utc::now().timestamp();
    let claims = PublicTokenClaims {
        iss: state.settings.jwt_issuer.clone(),
        aud: state.settings.jwt_audience.clone(),
        sub: caller.environment.public_id.clone(),
        public: true,
        scopes: session_token_scopes(session.addressing_key()),
        iat: Some(now),
        exp: now + SESSION_TOKEN_SECONDS,
    };
    let token = mint_public_token(&claims, &signing_key)
        .map_err(|error| ApiError::Internal(format!("token minting failed: {error}")))?;
    let mut body =
        serde_json::to_value(session).map_err(|error| ApiError::Internal(error.to_string()))?;
    if let Value::Object(fields) = &mut body {
        fields.insert("runId".into(), json!(run_friendly_id));
        fields.insert("publicAccessToken".into(), json!(token));
        fields.insert("isCached".into(), json!(cached));
        // Runs are never parked waiting for a deployment here.
        fields.insert("pendingVersion".into(), json!(false));
    }
    let status = if cached {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(body)).into_response())
}

/// Create-or-return by `(environment, externalId)`. A secret key may; a public access token
/// needs both session write (`write:sessions` or `write:sessions:{externalId}`) and permission
/// to trigger the task (`trigger:tasks:{taskIdentifier}`), as the reference server requires
/// since 4.7. On the cached path only `triggerConfig` is refreshed (by the worker).
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let body: CreateSessionBody = parse_json(&body)?;
    validation::session_type(&body.session_type)?;
    validation::task_identifier(&body.task_identifier)?;
    let tags = body.tags.unwrap_or_default();
    validation::tags(&tags)?;
    validation::trigger_config_tags(body.trigger_config.get("tags"))?;
    if !body
        .trigger_config
        .get("basePayload")
        .is_some_and(Value::is_object)
    {
        return Err(ApiError::BadRequest(
            "triggerConfig.basePayload: must be an object".into(),
        ));
    }
    let external_id = body
        .external_id
        .as_deref()
        .map(validation::external_id)
        .transpose()?;
    if let Credential::PublicToken { scopes, .. } = &caller.credential
        && !(allows_session_create(scopes, external_id.as_deref())
            && allows_trigger(scopes, &body.task_identifier))
    {
        return Err(ApiError::Forbidden(
            "Creating a session with a public access token needs write:sessions (or \
             write:sessions:{externalId}) and trigger:tasks:{taskIdentifier}"
                .into(),
        ));
    }
    if let Some(external_id) = &external_id
        && !validation::is_unambiguous_external_id(external_id)
    {
        return Err(ApiError::Unprocessable(
            "externalId must not contain ':channels:' or end in ':in' or ':out'".into(),
        ));
    }
    let accepted_at = Utc::now();
    let expires_at = body.expires_at.as_ref().map(DateInput::parse).transpose()?;
    if expires_at.is_some_and(|expiry| expiry <= accepted_at) {
        return Err(ApiError::Conflict("expiresAt is in the past".into()));
    }
    let environment_id = caller.environment.id;
    let session_id = match &external_id {
        Some(external_id) => ids::session_id_for_external_id(environment_id, external_id),
        None => Uuid::now_v7(),
    };
    let command = Command::new(
        environment_id,
        session_id,
        accepted_at,
        CommandBody::CreateSession(Box::new(CreateSessionCommand {
            friendly_id: ids::new_friendly_id(SESSION_PREFIX),
            environment_public_id: caller.environment.public_id.clone(),
            external_id,
            session_type: body.session_type,
            task_identifier: body.task_identifier,
            trigger_config: Value::Object(body.trigger_config),
            tags,
            metadata: body.metadata.map(Value::Object),
            expires_at,
            run_id: Uuid::now_v7(),
            run_friendly_id: ids::new_friendly_id(RUN_PREFIX),
        })),
    );
    let changed = command.session_id;
    let outcome = state.publisher.submit_and_wait(command).await;
    // This instance learns of its own change at once; the others from the worker's notice.
    state.sessions.invalidate(&[changed]);
    match outcome? {
        Outcome::SessionCreated {
            session,
            run_friendly_id,
            cached,
        } => created_response(&state, &caller, &session, &run_friendly_id, cached).await,
        refused => Err(ApiError::refusal(Attempted::Create, refused)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CloseSessionBody {
    reason: Option<String>,
    /// Sent by a run closing its own session: that run is exiting, so no close message is
    /// appended to `in` for it.
    calling_run_id: Option<String>,
}

/// Closes a session. Idempotent: closing a closed session returns it unchanged.
pub async fn close(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let address = session_address(path)?;
    let body: CloseSessionBody = if body.is_empty() {
        CloseSessionBody::default()
    } else {
        parse_json(&body)?
    };
    if let Some(reason) = &body.reason {
        validation::close_reason(reason)?;
    }
    let session = caller.session(&state, Action::Admin, &address).await?;
    let calling_run_id = match &body.calling_run_id {
        Some(run) => calling_run(&state, &caller, run).await?,
        None => None,
    };
    let command = Command::new(
        caller.environment.id,
        session.id,
        Utc::now(),
        CommandBody::CloseSession(CloseSessionCommand {
            reason: body.reason,
            calling_run_id,
        }),
    );
    let changed = command.session_id;
    let outcome = state.publisher.submit_and_wait(command).await;
    // This instance learns of its own change at once; the others from the worker's notice.
    state.sessions.invalidate(&[changed]);
    match outcome? {
        Outcome::SessionClosedNow { session } => Ok(Json(session).into_response()),
        refused => Err(ApiError::refusal(Attempted::Close, refused)),
    }
}

/// The internal id of the run a `callingRunId` names, looked up in the caller's environment only
/// (another environment's run never matches); `None` if there is no such run.
async fn calling_run(
    state: &AppState,
    caller: &Caller,
    friendly_id: &str,
) -> Result<Option<Uuid>, ApiError> {
    if friendly_id.len() > 256 {
        return Ok(None);
    }
    Ok(state
        .store
        .find_run(caller.environment.id, friendly_id)
        .await?
        .map(|run| run.id))
}

/// `GET /api/v1/sessions/{session}`: secret key or `read` on it.
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let address = session_address(path)?;
    let session = caller.session(&state, Action::Read, &address).await?;
    Ok(Json(state.store.session_item(&session).await?).into_response())
}

/// `POST /api/v1/auth/jwt/claims`: the claims the SDK puts in tokens it mints locally.
pub async fn jwt_claims(caller: SecretKeyCaller) -> Json<Value> {
    Json(json!({ "sub": caller.environment.public_id, "pub": true }))
}

/// `PATCH /api/v1/sessions/{session}`: `tags`, `metadata` (null clears); `externalId` is
/// immutable (a different value → 422, the same value is a no-op); unknown fields → 400.
pub async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let address = session_address(path)?;
    let fields: serde_json::Map<String, Value> = parse_json(&body)?;
    if let Some(unknown) = fields
        .keys()
        .find(|key| !matches!(key.as_str(), "tags" | "metadata" | "externalId"))
    {
        return Err(ApiError::BadRequest(format!("Unknown field {unknown:?}")));
    }
    let tags = match fields.get("tags") {
        None => None,
        Some(value) => {
            let tags: Vec<String> = serde_json::from_value(value.clone())
                .map_err(|_| ApiError::BadRequest("tags: must be an array of strings".into()))?;
            validation::tags(&tags)?;
            Some(tags)
        }
    };
    let (metadata, clear_metadata) = match fields.get("metadata") {
        None => (None, false),
        Some(Value::Null) => (None, true),
        Some(value @ Value::Object(_)) => (Some(value.clone()), false),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "metadata: must be an object or null".into(),
            ));
        }
    };
    let session = caller.session(&state, Action::Admin, &address).await?;
    if let Some(requested) = fields.get("externalId") {
        let requested = match requested {
            Value::Null => None,
            Value::String(text) => Some(text.trim()),
            _ => {
                return Err(ApiError::BadRequest(
                    "externalId: must be a string or null".into(),
                ));
            }
        };
        if requested != session.external_id.as_deref() {
            return Err(ApiError::Unprocessable(
                "externalId is immutable after creation".into(),
            ));
        }
    }
    let command = Command::new(
        caller.environment.id,
        session.id,
        Utc::now(),
        CommandBody::PatchSession(PatchSessionCommand {
            tags,
            metadata,
            clear_metadata,
        }),
    );
    let changed = command.session_id;
    let outcome = state.publisher.submit_and_wait(command).await;
    // This instance learns of its own change at once; the others from the worker's notice.
    state.sessions.invalidate(&[changed]);
    match outcome? {
        Outcome::SessionUpdated { session } => Ok(Json(session).into_response()),
        refused => Err(ApiError::refusal(Attempted::Update, refused)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EndAndContinueBody {
    calling_run_id: String,
    reason: String,
    /// Deployment pinning is not part of this service; accepted for wire compatibility.
    #[expect(
        dead_code,
        reason = "accepted for wire compatibility; runs are not deployed here"
    )]
    external_deployment_id: Option<Value>,
}

/// `POST /api/v1/sessions/{session}/end-and-continue`: secret key or `write`.
pub async fn end_and_continue(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let address = session_address(path)?;
    let body: EndAndContinueBody = parse_json(&body)?;
    if body.reason.chars().count() > 64 {
        return Err(ApiError::BadRequest("reason: at most 64 characters".into()));
    }
    let session = caller.session(&state, Action::Write, &address).await?;
    let calling_run_id = calling_run(&state, &caller, &body.calling_run_id).await?;
    let command = Command::new(
        caller.environment.id,
        session.id,
        Utc::now(),
        CommandBody::EndAndContinue(EndAndContinueCommand {
            calling_run_id,
            reason: body.reason,
            environment_public_id: caller.environment.public_id.clone(),
            new_run_id: Uuid::now_v7(),
            new_run_friendly_id: ids::new_friendly_id(RUN_PREFIX),
        }),
    );
    let changed = command.session_id;
    let outcome = state.publisher.submit_and_wait(command).await;
    // This instance learns of its own change at once; the others from the worker's notice.
    state.sessions.invalidate(&[changed]);
    match outcome? {
        Outcome::RunContinued {
            run_friendly_id,
            swapped,
        } => Ok(Json(json!({
            "runId": run_friendly_id,
            "swapped": swapped,
            "pendingVersion": false,
        }))
        .into_response()),
        refused => Err(ApiError::refusal(Attempted::EndAndContinue, refused)),
    }
}

/// Splits a comma-separated filter value (repeated parameters add up).
fn comma_list(pairs: &[(String, String)], name: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(key, _)| key == name)
        .flat_map(|(_, value)| value.split(','))
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
        .collect()
}

fn single<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// `filter[createdAt][from|to]`: epoch milliseconds or an ISO 8601 date.
fn date_filter(name: &'static str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    let parsed = match value.trim().parse::<i64>() {
        Ok(millis) => DateTime::from_timestamp_millis(millis),
        Err(_) => DateTime::parse_from_rfc3339(value.trim())
            .ok()
            .map(|date| date.with_timezone(&Utc)),
    };
    let parsed = parsed.ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{name}: must be epoch milliseconds or an ISO 8601 date"
        ))
    })?;
    Ok(Some(validation::storable_date(name, parsed)?))
}

const KNOWN_LIST_PARAMETERS: [&str; 10] = [
    "page[size]",
    "page[after]",
    "page[before]",
    "filter[type]",
    "filter[tags]",
    "filter[taskIdentifier]",
    "filter[externalId]",
    "filter[status]",
    "filter[createdAt][from]",
    "filter[createdAt][to]",
];

/// `GET /api/v1/sessions`: secret key; newest first; cursor pagination; filters.
pub async fn list(
    State(state): State<AppState>,
    caller: SecretKeyCaller,
    query: Result<
        axum::extract::Query<Vec<(String, String)>>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Response, ApiError> {
    let axum::extract::Query(pairs) =
        query.map_err(|error| ApiError::BadRequest(format!("Invalid query: {error}")))?;
    if let Some((unknown, _)) = pairs.iter().find(|(key, _)| {
        !KNOWN_LIST_PARAMETERS.contains(&key.as_str()) && key != "filter[createdAt][period]"
    }) {
        return Err(ApiError::BadRequest(format!(
            "Unknown query parameter {unknown:?}"
        )));
    }
    let size = match single(&pairs, "page[size]") {
        None => 20,
        Some(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|size| (1..=100).contains(size))
            .ok_or_else(|| ApiError::BadRequest("page[size]: must be an integer 1–100".into()))?,
    };
    let cursor = match (
        single(&pairs, "page[after]"),
        single(&pairs, "page[before]"),
    ) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "page[after] and page[before] cannot be combined".into(),
            ));
        }
        (Some(after), None) => Some(PageCursor::After(after.to_owned())),
        (None, Some(before)) => Some(PageCursor::Before(before.to_owned())),
        (None, None) => None,
    };
    let statuses = comma_list(&pairs, "filter[status]")
        .iter()
        .map(|status| match status.as_str() {
            "ACTIVE" => Ok(StatusFilter::Active),
            "CLOSED" => Ok(StatusFilter::Closed),
            "EXPIRED" => Ok(StatusFilter::Expired),
            other => Err(ApiError::BadRequest(format!(
                "filter[status]: {other:?} is not ACTIVE, CLOSED or EXPIRED"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut created_from = date_filter(
        "filter[createdAt][from]",
        single(&pairs, "filter[createdAt][from]"),
    )?;
    if let Some(period) = single(&pairs, "filter[createdAt][period]") {
        let period =
            shared::domain::waitpoint::parse_duration("filter[createdAt][period]", period)?;
        let since = Utc::now() - period;
        created_from = Some(created_from.map_or(since, |from| from.max(since)));
    }
    let list_query = SessionListQuery {
        environment_id: caller.environment.id,
        types: comma_list(&pairs, "filter[type]"),
        tags: comma_list(&pairs, "filter[tags]"),
        task_identifiers: comma_list(&pairs, "filter[taskIdentifier]"),
        external_ids: comma_list(&pairs, "filter[externalId]"),
        statuses,
        created_from,
        created_to: date_filter(
            "filter[createdAt][to]",
            single(&pairs, "filter[createdAt][to]"),
        )?,
        cursor,
        size,
    };
    let page = state
        .store
        .list_sessions(&list_query)
        .await
        .map_err(|error| match error {
            ListError::UnknownCursor => ApiError::BadRequest(error.to_string()),
            ListError::Storage(error) => ApiError::Storage(error),
        })?;
    let mut pagination = serde_json::Map::new();
    if let Some(next) = page.next {
        pagination.insert("next".into(), json!(next));
    }
    if let Some(previous) = page.previous {
        pagination.insert("previous".into(), json!(previous));
    }
    Ok(Json(json!({ "data": page.items, "pagination": pagination })).into_response())
}
