//! The writer endpoint: what the official SDK's `out` writer needs, served by this api on its
//! own listener (no second service).
//!
//! - `PUT /realtime/v1/sessions/{session}/{io}` (and `…/channels/{name}/{io}`) initializes a
//!   stream: `202 {"version":"v2"}` with `x-s2-*` headers that point the client at this server
//!   (`{public url}/s2/v1`) with a writer access token for exactly that stream.
//! - `POST /s2/v1/streams/{stream}/records` takes the client's batches in S2's protocol: an
//!   `s2s/proto` append session over HTTP/2 (full duplex: one ack frame per input frame, in
//!   order), or one REST append (`application/json` or `application/protobuf`) over either
//!   HTTP version.
//!
//! Each batch is one `AppendRecords` command on the session's partition, published after the
//! previous batch of the same append session was confirmed by the broker (so the log holds the
//! batches in frame order, and nothing after a batch that failed), and acknowledged once the
//! worker applied it, with the seqNums the records have when they are read back. The wire format
//! is `crate::s2_wire`; errors on this endpoint are S2's `{code, message}`, not the api's.

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use serde_json::json;
use shared::commands::{AppendRecordsCommand, Command, CommandBody, Outcome, WrittenRecord};
use shared::domain::scopes::{Action, Target};
use shared::domain::session::SessionState;
use shared::domain::tokens::{WRITER_TOKEN_AUDIENCE, WriterTokenClaims, mint_writer_token};
use shared::domain::{Io, SessionAddress, Stream};
use shared::storage::Session;
use tokio::sync::mpsc;

use super::body::{BodyLimits, BodyReadError, read_whole_body};
use crate::AppState;
use crate::auth::{Caller, WriterAuthError, WriterCaller, authenticate_writer, cached_session};
use crate::error::{ApiError, Attempted};
use crate::s2_wire::{
    self, AppendInput, FrameDecoder, JsonAppendInput, WireError, ack, ack_frame, ack_json,
};

/// Where the writer endpoint lives under the public URL (the `x-s2-endpoint` path).
pub const WRITER_PATH_PREFIX: &str = "/s2/v1";
/// The basin named in `x-s2-basin`: one for the whole server (the token names the environment).
pub const WRITER_BASIN: &str = "sessions";
/// The client's linger before it sends a batch (`x-s2-flush-interval-ms`; the reference's value).
const FLUSH_INTERVAL_MS: &str = "100";
/// Batches of one append session waiting for their ack at most; past it the session stops
/// reading frames until acks go out (HTTP/2 flow control then holds the client back).
const MAX_UNACKED_BATCHES: usize = 256;
/// Largest REST append body (a 1 MiB metered batch, as JSON with escapes).
const MAX_REST_BODY_BYTES: usize = 4 << 20;

/// `PUT /realtime/v1/sessions/{session}/{io}`.
pub async fn initialize_stream(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (address, stream) = super::channels::parse_path(path)?;
    initialize(state, caller, address, stream, &headers).await
}

/// `PUT /realtime/v1/sessions/{session}/channels/{name}/{io}`.
pub async fn initialize_channel_stream(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (address, stream) = super::channels::parse_channel_path(path)?;
    initialize(state, caller, address, stream, &headers).await
}

/// The reference's checks, in its order: `out` needs a secret key; the caller may write the
/// stream; the session exists (404, also for an externalId with no session: records need one
/// here); it is open (400).
async fn initialize(
    state: AppState,
    caller: Caller,
    address: SessionAddress,
    stream: Stream,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if stream.io == Io::Out {
        caller.require_secret_key("Initializing the out channel")?;
    }
    let session = caller
        .find_session_on(&state, Action::Write, &address, Target::of_stream(&stream))
        .await?
        .ok_or(ApiError::NotFound("Session not found"))?;
    if session.state(Utc::now()) != SessionState::Open {
        return Err(ApiError::BadRequest(
            "Cannot initialize a channel on a closed session".into(),
        ));
    }
    let stream_name = format!("sessions/{}/{}", session.friendly_id, stream.key());
    let now = Utc::now().timestamp();
    let lifetime = i64::try_from(state.settings.writer_token_ttl.as_secs()).unwrap_or(86_400);
    let claims = WriterTokenClaims {
        iss: state.settings.jwt_issuer.clone(),
        aud: WRITER_TOKEN_AUDIENCE.into(),
        sub: caller.environment.public_id.clone(),
        stream: stream_name.clone(),
        iat: now,
        exp: now + lifetime,
    };
    let token = mint_writer_token(&claims, &caller.signing_key(&state).await?)
        .map_err(|error| ApiError::Internal(format!("cannot sign a writer token: {error}")))?;
    let endpoint = format!(
        "{}{WRITER_PATH_PREFIX}",
        super::public_base_url(&state, headers)
    );
    let header_value = |value: &str| {
        HeaderValue::from_str(value)
            .map_err(|_| ApiError::Internal("a writer header is not a valid header value".into()))
    };
    let mut response = (StatusCode::ACCEPTED, Json(json!({ "version": "v2" }))).into_response();
    let answer = response.headers_mut();
    answer.insert("x-s2-access-token", header_value(&token)?);
    answer.insert("x-s2-basin", HeaderValue::from_static(WRITER_BASIN));
    answer.insert("x-s2-stream-name", header_value(&stream_name)?);
    answer.insert("x-s2-endpoint", header_value(&endpoint)?);
    answer.insert(
        "x-s2-flush-interval-ms",
        HeaderValue::from_static(FLUSH_INTERVAL_MS),
    );
    Ok(response)
}

impl IntoResponse for WireError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            self.json(),
        )
            .into_response();
        if let Some(seconds) = self.retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// What the writer endpoint answers to failures of the rest of the api.
fn wire_error(error: ApiError) -> WireError {
    match error {
        ApiError::TooManyRequests { .. } => WireError::new(
            429,
            "rate_limited",
            "too many requests for this environment",
        ),
        ApiError::Broker(_) | ApiError::Storage(_) => WireError::new(
            503,
            "unavailable",
            "the service cannot accept writes right now; retry",
        ),
        ApiError::ReplyTimeout => WireError::new(
            503,
            "unavailable",
            "the batch was not applied in time; it is durable and may still appear, retry",
        ),
        ApiError::SessionClosed { .. } => {
            WireError::new(409, "session_closed", "the session is closed")
        }
        ApiError::NotFound(_) => WireError::new(404, "stream_not_found", "the session is gone"),
        other => {
            tracing::error!(error = %other, "writer request failed");
            WireError::new(500, "internal", "internal error")
        }
    }
}

/// The session and stream a writer token's stream name names: `sessions/{friendly id}/{key}`.
fn parse_stream_name(name: &str) -> Option<(SessionAddress, Stream)> {
    let rest = name.strip_prefix("sessions/")?;
    let (friendly_id, key) = rest.split_once('/')?;
    let address = SessionAddress::parse(friendly_id);
    matches!(address, SessionAddress::FriendlyId(_))
        .then_some(())
        .and(Stream::from_key(key).map(|stream| (address, stream)))
}

/// Who writes where, checked once per request.
struct WriterTarget {
    caller: WriterCaller,
    session: std::sync::Arc<Session>,
    stream: Stream,
}

async fn writer_target(
    state: &AppState,
    parts: &axum::http::request::Parts,
    path: Result<Path<String>, PathRejection>,
) -> Result<WriterTarget, WireError> {
    let caller = authenticate_writer(parts, state)
        .await
        .map_err(|error| match error {
            WriterAuthError::Unauthenticated => WireError::new(
                401,
                "unauthorized",
                "missing, invalid, expired or revoked access token",
            ),
            WriterAuthError::Unavailable => {
                WireError::new(503, "unavailable", "cannot verify the token right now")
            }
        })?;
    state
        .rate_limits
        .check(caller.environment.id)
        .map_err(wire_error)?;
    let Path(stream_name) =
        path.map_err(|_| WireError::new(400, "invalid", "the stream name is not valid"))?;
    if stream_name != caller.stream_name {
        return Err(WireError::new(
            403,
            "permission_denied",
            "the access token does not allow writing this stream",
        ));
    }
    let (address, stream) = parse_stream_name(&stream_name)
        .ok_or_else(|| WireError::new(404, "stream_not_found", "no such stream on this server"))?;
    let session = cached_session(state, caller.environment.id, &address)
        .await
        .map_err(wire_error)?
        .ok_or_else(|| WireError::new(404, "stream_not_found", "the session is gone"))?;
    Ok(WriterTarget {
        caller,
        session,
        stream,
    })
}

/// `POST /s2/v1/streams/{stream}/records`: an append session (`s2s/proto`) or a REST append.
pub async fn append_records(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let target = match writer_target(&state, &parts, path).await {
        Ok(target) => target,
        Err(error) => return error.into_response(),
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match content_type.as_str() {
        "s2s/proto" => append_session(state, target, body),
        "application/json" | "application/protobuf" | "application/x-protobuf" => {
            let json = content_type == "application/json";
            match rest_append(&state, &target, body, json).await {
                Ok(response) => response,
                Err(error) => error.into_response(),
            }
        }
        _ => WireError::new(
            415,
            "invalid",
            "content-type must be s2s/proto, application/json or application/protobuf",
        )
        .into_response(),
    }
}

/// Publishes one batch (after the session's state allows it) and returns once the broker
/// confirmed it, with the future of its ack.
async fn submit_batch(
    state: &AppState,
    target: &WriterTarget,
    records: Vec<WrittenRecord>,
    ack_wait: Duration,
) -> Result<impl Future<Output = Result<s2_wire::AppendAck, WireError>> + Send + 'static, WireError>
{
    let accepted_at = Utc::now();
    let session = &target.session;
    if session.state(accepted_at) != SessionState::Open {
        return Err(WireError::new(
            409,
            "session_closed",
            "the session is closed",
        ));
    }
    let command = Command::new(
        target.caller.environment.id,
        session.id,
        accepted_at,
        CommandBody::AppendRecords(AppendRecordsCommand::new(
            target.caller.environment.id,
            session.id,
            target.stream.clone(),
            records,
        )),
    );
    let reply = state
        .publisher
        .submit_then_reply(command, ack_wait)
        .await
        .map_err(wire_error)?;
    Ok(async move {
        match reply.await.map_err(wire_error)? {
            Outcome::RecordsAppended {
                start_seq,
                end_seq,
                timestamp_ms,
            } => {
                crate::signals::writer_batch_acknowledged(end_seq - start_seq);
                Ok(ack(start_seq, end_seq, timestamp_ms))
            }
            refused => Err(wire_error(ApiError::refusal(Attempted::Append, refused))),
        }
    })
}

async fn rest_append(
    state: &AppState,
    target: &WriterTarget,
    body: Body,
    json: bool,
) -> Result<Response, WireError> {
    let limits = BodyLimits::from_settings(&state.settings, MAX_REST_BODY_BYTES);
    let bytes = read_whole_body(body, limits)
        .await
        .map_err(|error| match error {
            BodyReadError::TooLarge => WireError::new(
                413,
                "batch_too_large",
                format!("a REST append body may be at most {MAX_REST_BODY_BYTES} bytes"),
            ),
            BodyReadError::TimedOut => WireError::new(
                408,
                "request_timeout",
                "the request body did not arrive in time",
            ),
            BodyReadError::Broken => {
                WireError::new(400, "bad_body", "cannot read the request body")
            }
        })?;
    let input: AppendInput = if json {
        serde_json::from_slice::<JsonAppendInput>(&bytes)
            .map_err(|error| WireError::new(400, "bad_json", error.to_string()))?
            .into()
    } else {
        prost::Message::decode(bytes).map_err(|error| {
            WireError::new(400, "invalid", format!("not an AppendInput: {error}"))
        })?
    };
    let records = s2_wire::written_records(input)?;
    let pending = submit_batch(state, target, records, state.settings.reply_timeout).await?;
    let acknowledged = pending.await?;
    Ok(if json {
        Json(ack_json(&acknowledged)).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/protobuf")],
            prost::Message::encode_to_vec(&acknowledged),
        )
            .into_response()
    })
}

/// Answers `200` at once and runs the session in its own task: frames in, acks out.
fn append_session(state: AppState, target: WriterTarget, body: Body) -> Response {
    let (frames, outgoing) = mpsc::channel::<Bytes>(64);
    state
        .tasks
        .clone()
        .spawn(run_append_session(state, target, body, frames));
    let stream = futures_util::stream::unfold(outgoing, |mut outgoing| async move {
        outgoing
            .recv()
            .await
            .map(|frame| (Ok::<_, std::convert::Infallible>(frame), outgoing))
    });
    (
        [(header::CONTENT_TYPE, "s2s/proto")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Reads frames and submits each as a batch while it sends the acks of earlier ones, in order.
/// Ends after the client's end of stream once every batch is acknowledged, or at the first
/// failure with a terminal frame (retryable ones make the client retry on a new session), or
/// when the client sends no frame for `SESSIONS_WRITER_IDLE_TIMEOUT_MS`, or when the api stops:
/// then it reads no more frames, sends the acks of the batches it took, and ends with a
/// retryable 503 (the client sends the rest to another instance).
async fn run_append_session(
    state: AppState,
    target: WriterTarget,
    body: Body,
    frames: mpsc::Sender<Bytes>,
) {
    crate::signals::writer_session_opened();
    let idle_timeout = state.settings.writer_idle_timeout;
    let ack_wait = state.settings.writer_ack_wait;
    let mut incoming = body.into_data_stream();
    let mut decoder = FrameDecoder::default();
    let mut acks = FuturesOrdered::new();
    let mut input_ended = false;
    let mut api_stopping = false;
    let ending: Option<WireError> = loop {
        if acks.is_empty() {
            if api_stopping {
                break Some(WireError::new(
                    503,
                    "unavailable",
                    "the server is shutting down; retry",
                ));
            }
            if input_ended {
                break None;
            }
        }
        tokio::select! {
            () = state.stopping.cancelled(), if !api_stopping && !input_ended => {
                api_stopping = true;
            }
            acknowledged = acks.next(), if !acks.is_empty() => match acknowledged {
                // The client went away: nobody is left to answer.
                Some(Ok(acknowledged)) if frames.send(ack_frame(&acknowledged)).await.is_err() => {
                    break None;
                }
                Some(Ok(_)) | None => {}
                Some(Err(error)) => break Some(error),
            },
            chunk = tokio::time::timeout(idle_timeout, incoming.next()),
                if !input_ended && !api_stopping && acks.len() < MAX_UNACKED_BATCHES =>
            {
                let bytes = match chunk {
                    Err(_) => break Some(WireError::new(
                        408,
                        "idle_timeout",
                        "no frame for too long; open a new append session",
                    )),
                    Ok(None) => {
                        input_ended = true;
                        if decoder.has_partial_frame() {
                            break Some(WireError::new(400, "invalid", "the stream ended inside a frame"));
                        }
                        continue;
                    }
                    // The client reset the stream: nobody is left to answer.
                    Ok(Some(Err(_))) => break None,
                    Ok(Some(Ok(bytes))) => bytes,
                };
                decoder.push(&bytes);
                let submitted: Result<(), WireError> = async {
                    while let Some(input) = decoder.next_input()? {
                        // Each frame counts against the environment's rate limit, as a
                        // request of its own would.
                        state
                            .rate_limits
                            .check(target.caller.environment.id)
                            .map_err(wire_error)?;
                        let records = s2_wire::written_records(input)?;
                        acks.push_back(submit_batch(&state, &target, records, ack_wait).await?);
                    }
                    Ok(())
                }
                .await;
                if let Err(error) = submitted {
                    break Some(error);
                }
            }
        }
    };
    if let Some(error) = ending {
        crate::signals::writer_session_failed(error.code);
        let _ = frames.send(error.terminal_frame()).await;
    }
    crate::signals::writer_session_closed();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_name_a_session_by_friendly_id_and_a_stream() {
        let (address, stream) = parse_stream_name("sessions/session_abc/out").expect("reserved");
        assert_eq!(address, SessionAddress::parse("session_abc"));
        assert_eq!(stream, Stream::reserved(Io::Out));
        let (_, named) =
            parse_stream_name("sessions/session_abc/channels/notes/in").expect("named");
        assert_eq!(named.key(), "channels/notes/in");
        assert!(parse_stream_name("sessions/chat-1/out").is_none());
        assert!(parse_stream_name("sessions/session_abc/sideways").is_none());
        assert!(parse_stream_name("other/session_abc/out").is_none());
    }
}
