//! The channel routes: append (`POST …/{io}/append`) and records (`GET …/{io}/records`), for
//! the reserved channels (`/realtime/v1/sessions/{session}/{io}/…`) and the named side
//! channels (`/realtime/v1/sessions/{session}/channels/{name}/{io}/…`). Both shapes share one
//! implementation over a [`Stream`]; a side channel differs only in that it wakes no waitpoint.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use shared::commands::{AppendCommand, Command, CommandBody, Outcome};
use shared::domain::channel::InvalidChannelName;
use shared::domain::headers::is_command_record;
use shared::domain::session::SessionState;
use shared::domain::{ChannelName, Io, SessionAddress, Stream, validation};

use super::body::{BodyLimits, read_whole_body};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, Attempted};
use shared::domain::scopes::{Action, Target};

/// Most records one `records` response carries; callers page with `afterEventId`.
const MAX_RECORDS_PER_RESPONSE: u64 = 10_000;

/// The path of a reserved channel: `{session}/{io}`.
pub(crate) fn parse_path(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(SessionAddress, Stream), ApiError> {
    let Path((segment, io)) =
        path.map_err(|error| ApiError::BadRequest(format!("Invalid path: {error}")))?;
    let io = parse_io(&io)?;
    validation::session_segment(&segment)?;
    Ok((SessionAddress::parse(&segment), Stream::reserved(io)))
}

/// The path of a side channel: `{session}/channels/{name}/{io}`.
pub(crate) fn parse_channel_path(
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<(SessionAddress, Stream), ApiError> {
    let Path((segment, name, io)) =
        path.map_err(|error| ApiError::BadRequest(format!("Invalid path: {error}")))?;
    let io = parse_io(&io)?;
    let name: ChannelName = name
        .parse()
        .map_err(|error: InvalidChannelName| ApiError::BadRequest(error.to_string()))?;
    validation::session_segment(&segment)?;
    Ok((SessionAddress::parse(&segment), Stream::named(name, io)))
}

fn parse_io(io: &str) -> Result<Io, ApiError> {
    io.parse()
        .map_err(|error: shared::domain::channel::UnknownIo| {
            ApiError::BadRequest(error.to_string())
        })
}

/// The declared body length; appends must declare it (411) and stay within the limit (413).
fn declared_length(headers: &HeaderMap, limit: usize) -> Result<usize, ApiError> {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .ok_or(ApiError::LengthRequired(
            "content-length header is required",
        ))?
        .to_str()
        .ok()
        .and_then(|value| value.trim().parse::<usize>().ok())
        .ok_or_else(|| ApiError::BadRequest("content-length header is invalid".into()))?;
    if length > limit {
        return Err(ApiError::PayloadTooLarge(format!(
            "Request body is {length} bytes; the limit is {limit}"
        )));
    }
    Ok(length)
}

/// Most seconds `Prefer: wait=<s>` may ask for.
const MAX_PREFER_WAIT_SECONDS: u64 = 60;

/// `Prefer: wait=<seconds>` (RFC 7240): answer after the worker applied the append.
fn prefer_wait(headers: &HeaderMap) -> Result<Option<std::time::Duration>, ApiError> {
    let Some(value) = headers.get("prefer") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("Prefer: must be ASCII".into()))?;
    for preference in text.split(',') {
        let preference = preference.trim();
        if let Some(seconds) = preference.strip_prefix("wait=") {
            let seconds = seconds
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|seconds| (1..=MAX_PREFER_WAIT_SECONDS).contains(seconds))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "Prefer: wait must be 1–{MAX_PREFER_WAIT_SECONDS} seconds"
                    ))
                })?;
            return Ok(Some(std::time::Duration::from_secs(seconds)));
        }
    }
    Ok(None)
}

fn part_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("x-part-id") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("X-Part-Id: must be visible ASCII".into()))?;
    validation::part_id(value)?;
    Ok(Some(value.to_owned()))
}

/// Appends raw text to a channel.
///
/// An `out` append answers once the command is durably queued (`{ok: true}`), unless
/// `Prefer: wait` asks for the applied outcome. An `in` append (a user message) answers after
/// the worker applied it, with the record's sequence number (`{ok: true, seq}`): the official
/// chat transport reads `seq` to tell this turn's answers from earlier ones. If the worker has
/// not applied it within `SESSIONS_IN_APPEND_WAIT_MS` (a backlog, an outage) it answers
/// `{ok: true}` without `seq`, as the reference does when it cannot tell the seq: the append is
/// durable either way, and the client copes without it.
pub async fn append(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let (address, stream) = parse_path(path)?;
    append_to(state, caller, address, stream, headers, body).await
}

/// `POST …/channels/{name}/{io}/append`: as [`append`], on a side channel.
pub async fn append_to_channel(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let (address, stream) = parse_channel_path(path)?;
    append_to(state, caller, address, stream, headers, body).await
}

/// How long an append refused at capacity is told to wait.
const APPEND_RETRY_AFTER_SECONDS: u64 = 1;

async fn append_to(
    state: AppState,
    caller: Caller,
    address: SessionAddress,
    stream: Stream,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let io = stream.io;
    if io == Io::Out {
        caller.require_secret_key("Appending to the out channel")?;
    }
    let limit = state.settings.max_append_bytes;
    declared_length(&headers, limit)?;
    let part_id = part_id(&headers)?;
    let prefer_wait = prefer_wait(&headers)?;
    // Admission control: past the bound, answer at once instead of holding one more request
    // (and its connection) in memory while every request waits longer.
    let _slot = state
        .append_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            crate::signals::append_refused_at_capacity();
            ApiError::AtCapacity {
                retry_after_seconds: APPEND_RETRY_AFTER_SECONDS,
            }
        })?;
    let session = caller.session_for_append(&state, &address, &stream).await?;
    let bytes = read_whole_body(body, BodyLimits::from_settings(&state.settings, limit))
        .await
        .map_err(|error| {
            error.into_api_error(format!("Request body exceeds the limit of {limit} bytes"))
        })?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::BadRequest("Body must be UTF-8 text".into()))?;
    validation::no_nul("body", &text)?;
    let accepted_at = Utc::now();
    match session.state(accepted_at) {
        SessionState::Closed => {
            return Err(ApiError::closed_session(
                Attempted::Append,
                session.closed_reason.clone(),
            ));
        }
        SessionState::Expired => return Err(ApiError::expired_session(Attempted::Append)),
        SessionState::Open => {}
    }
    let command = Command::new(
        caller.environment.id,
        session.id,
        accepted_at,
        CommandBody::Append(AppendCommand {
            io,
            channel: stream.channel,
            part_id,
            body: text,
            headers: Vec::new(),
            body_is_envelope: false,
        }),
    );
    // An explicit `Prefer: wait` gets the outcome or 504; an `in` append without it waits a
    // bounded time for its `seq`, then answers like an `out` append: it is durable already.
    let (wait, seq_is_optional) = match (prefer_wait, io) {
        (Some(wait), _) => (wait, false),
        (None, Io::In) => (state.settings.in_append_wait, true),
        (None, Io::Out) => {
            state.publisher.submit(command).await?;
            crate::signals::append_accepted(io);
            return Ok(Json(json!({ "ok": true })));
        }
    };
    let outcome = match state.publisher.submit_and_wait_for(command, wait).await {
        Err(ApiError::ReplyTimeout) if seq_is_optional => {
            crate::signals::append_accepted(io);
            crate::signals::in_append_answered_without_seq();
            return Ok(Json(json!({ "ok": true })));
        }
        result => result?,
    };
    crate::signals::append_accepted(io);
    match outcome {
        Outcome::Appended { seq_num } => Ok(Json(
            json!({ "ok": true, "seq": seq_num, "seqNum": seq_num, "duplicate": false }),
        )),
        Outcome::Duplicate { seq_num } => Ok(Json(
            json!({ "ok": true, "seq": seq_num, "seqNum": seq_num, "duplicate": true }),
        )),
        refused => Err(ApiError::refusal(Attempted::Append, refused)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordsQuery {
    after_event_id: Option<String>,
}

/// Records of a channel after `afterEventId`, in order: `{data, id, seqNum, headers?}`, without
/// command records.
pub async fn records(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<RecordsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (address, stream) = parse_path(path)?;
    records_of(state, caller, address, stream, query).await
}

/// `GET …/channels/{name}/{io}/records`: as [`records`], of a side channel.
pub async fn channel_records(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String, String)>, PathRejection>,
    query: Result<Query<RecordsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (address, stream) = parse_channel_path(path)?;
    records_of(state, caller, address, stream, query).await
}

async fn records_of(
    state: AppState,
    caller: Caller,
    address: SessionAddress,
    stream: Stream,
    query: Result<Query<RecordsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) =
        query.map_err(|error| ApiError::BadRequest(format!("Invalid query: {error}")))?;
    let after =
        match query.after_event_id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(value) => Some(value.parse::<i64>().ok().filter(|n| *n >= -1).ok_or_else(
                || ApiError::BadRequest("afterEventId: must be an integer ≥ -1".into()),
            )?),
        };
    caller.require_secret_key_to_read(&stream)?;
    let session = caller
        .find_session_on(&state, Action::Read, &address, Target::of_stream(&stream))
        .await?;
    let Some(session) = session else {
        return match address {
            // A session known only by externalId with no row yet has no records.
            SessionAddress::ExternalId(_) => Ok(Json(json!({ "records": [] }))),
            SessionAddress::FriendlyId(_) => Err(ApiError::NotFound("Session not found")),
        };
    };
    let rows = state
        .store
        .list_records(
            caller.environment.id,
            session.id,
            &stream,
            after,
            MAX_RECORDS_PER_RESPONSE,
        )
        .await?;
    // Command records (first header name empty) are the stream's own directives: not data.
    let records: Vec<Value> = rows
        .into_iter()
        .filter_map(|row| {
            let headers = &row.headers;
            if is_command_record(headers) {
                return None;
            }
            let (data, id) = crate::live::listed_data_and_id(&row);
            let mut record = json!({ "data": data, "id": id, "seqNum": row.seq_num });
            if !headers.is_empty() {
                record["headers"] = json!(headers);
            }
            Some(record)
        })
        .collect();
    Ok(Json(json!({ "records": records })))
}
