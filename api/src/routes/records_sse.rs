//! `GET`/`HEAD /realtime/v1/sessions/{session}/{io}` and
//! `…/{session}/channels/{name}/{io}`: the SSE tail of a reserved or a side channel.
//!
//! Headers go out at once (`X-Stream-Version: v2`). Records arrive as `event: batch` with
//! `{"records":[{"seq_num","timestamp","body"}]}`, `body` being the JSON string
//! `{"data": <raw text>, "id": <partId or "">}`. `Last-Event-ID: N` resumes at N+1;
//! `X-Trigger-Stream-Start: latest` starts after the current end; otherwise from seq 0.
//! `Timeout-Seconds` (1–600, default 60) bounds the connection, which then ends cleanly.
//! `X-Peek-Settled: 1` on the reserved `out`: when its last record (command records aside) is a
//! `turn-complete` control record, the answer carries `X-Session-Settled: true` and ends as soon
//! as the records after the cursor are sent. Records with headers carry them (`headers`).
//! `event: ping` every 15 s keeps idle connections alive.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use shared::domain::headers::{is_command_record, is_turn_complete};
use shared::domain::ids::session_id_for_external_id;
use shared::domain::{Io, SessionAddress, Stream};
use shared::storage::StoredRecord;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use super::channels::{parse_channel_path, parse_path};
use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::live::{ChannelKey, FeedBatch, Hub, READ_PAGE, batch_event};
use shared::domain::scopes::{Action, Target};

const DEFAULT_TIMEOUT_SECONDS: u64 = 60;
const MAX_TIMEOUT_SECONDS: u64 = 600;
const PING_EVERY: Duration = Duration::from_secs(15);
/// Events buffered per connection; a reader slower than this holds its writer back, which
/// then catches up from the database instead of buffering more.
const CONNECTION_BUFFER: usize = 16;

fn timeout_seconds(headers: &HeaderMap) -> Result<u64, ApiError> {
    let Some(value) = headers.get("timeout-seconds") else {
        return Ok(DEFAULT_TIMEOUT_SECONDS);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|seconds| (1..=MAX_TIMEOUT_SECONDS).contains(seconds))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "Timeout-Seconds: must be an integer 1–{MAX_TIMEOUT_SECONDS}"
            ))
        })
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<i64>()
        .ok()
        .filter(|n| *n >= -1)
        .map(Some)
        .ok_or_else(|| ApiError::BadRequest("Last-Event-ID: must be an integer ≥ -1".into()))
}

/// The channel the path names, after the read checks (`in` needs a secret key; a token needs
/// `read` on the session or on this channel). An unknown friendly id is 404; an externalId
/// without a session yet is a channel that will exist once the session is created.
async fn channel_key(
    state: &AppState,
    caller: &Caller,
    address: &SessionAddress,
    stream: Stream,
) -> Result<ChannelKey, ApiError> {
    caller.require_secret_key_to_read(&stream)?;
    let environment_id = caller.environment.id;
    let session_id = match caller
        .find_session_on(state, Action::Read, address, Target::of_stream(&stream))
        .await?
    {
        Some(session) => session.id,
        None => match address {
            SessionAddress::FriendlyId(_) => return Err(ApiError::NotFound("Session not found")),
            SessionAddress::ExternalId(external_id) => {
                session_id_for_external_id(environment_id, external_id)
            }
        },
    };
    Ok(ChannelKey {
        environment_id,
        session_id,
        stream,
    })
}

fn stream_headers(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert("x-stream-version", HeaderValue::from_static("v2"));
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// `HEAD`: 200 with the stream headers, after the same checks as `GET`.
pub async fn head(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (address, stream) = parse_path(path)?;
    head_of(state, caller, address, stream).await
}

/// `HEAD …/channels/{name}/{io}`: as [`head`], of a side channel.
pub async fn head_of_channel(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (address, stream) = parse_channel_path(path)?;
    head_of(state, caller, address, stream).await
}

async fn head_of(
    state: AppState,
    caller: Caller,
    address: SessionAddress,
    stream: Stream,
) -> Result<Response, ApiError> {
    channel_key(&state, &caller, &address, stream).await?;
    let mut response = (StatusCode::OK, [("content-type", "text/event-stream")]).into_response();
    stream_headers(&mut response);
    Ok(response)
}

/// `GET`: the SSE tail.
pub async fn subscribe(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (address, stream) = parse_path(path)?;
    subscribe_to(state, caller, address, stream, headers).await
}

/// `GET …/channels/{name}/{io}`: as [`subscribe`], to a side channel.
pub async fn subscribe_to_channel(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (address, stream) = parse_channel_path(path)?;
    subscribe_to(state, caller, address, stream, headers).await
}

async fn subscribe_to(
    state: AppState,
    caller: Caller,
    address: SessionAddress,
    stream: Stream,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let timeout = Duration::from_secs(timeout_seconds(&headers)?);
    let resume = last_event_id(&headers)?;
    let peek_settled = headers
        .get("x-peek-settled")
        .is_some_and(|value| value.as_bytes() == b"1");
    let key = channel_key(&state, &caller, &address, stream).await?;
    // `X-Peek-Settled: 1` on the reserved `out`: if the agent's last record ended its turn,
    // answer what is there and end at once instead of waiting for more.
    let settled = peek_settled
        && key.stream == Stream::reserved(Io::Out)
        && turn_is_complete(&state, &key).await?;
    let start_latest = headers
        .get("x-trigger-stream-start")
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"latest"));
    let next_seq = match resume {
        Some(last) => last.saturating_add(1),
        None if start_latest => {
            state
                .store
                .channel_head(key.environment_id, key.session_id, &key.stream)
                .await?
        }
        None => 0,
    };
    // A live stream holds a slot of its environment (and token) until it ends.
    let slot = state
        .live_streams
        .acquire(caller.environment.id, caller.token_digest())?;
    // Subscribe before the first read, so nothing appended in between is missed.
    let feed = state.hub.subscribe(key.clone());
    let (events, receiver) = mpsc::channel::<Event>(CONNECTION_BUFFER);
    state.tasks.clone().spawn(async move {
        serve_reader(
            state.hub.clone(),
            key,
            feed,
            next_seq,
            Reading {
                deadline: Instant::now() + timeout,
                end_when_caught_up: settled,
            },
            events,
        )
        .await;
        drop(slot);
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|event| (Ok::<Event, Infallible>(event), receiver))
    });
    let mut response = Sse::new(stream).into_response();
    stream_headers(&mut response);
    if settled {
        response
            .headers_mut()
            .insert("x-session-settled", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// How many of the newest records `X-Peek-Settled` looks through for the last one that is not a
/// command record.
const PEEK_RECORDS: u64 = 8;

/// Whether the last record of the stream that is not a command record is a `turn-complete`
/// control record.
async fn turn_is_complete(state: &AppState, key: &ChannelKey) -> Result<bool, ApiError> {
    let newest = state
        .store
        .last_records(
            key.environment_id,
            key.session_id,
            &key.stream,
            PEEK_RECORDS,
        )
        .await?;
    Ok(newest
        .iter()
        .map(|record| &record.headers)
        .find(|headers| !is_command_record(headers))
        .is_some_and(|headers| is_turn_complete(headers)))
}

/// When a reader ends: at its deadline, or (settled) as soon as it has sent what exists.
#[derive(Clone, Copy, Debug)]
struct Reading {
    deadline: Instant,
    end_when_caught_up: bool,
}

/// Why a reader stopped.
enum Stop {
    ClientGone,
    Deadline,
}

/// Sends `rows` (in seqNum order) from `next_seq` on, dropping what was sent already; returns
/// the new position. `encoded` is the event of all of `rows` (a feed's batch, encoded once for
/// all its readers): sent as is when the reader is at its first row.
async fn send_rows(
    events: &mpsc::Sender<Event>,
    rows: &[StoredRecord],
    encoded: Option<&Event>,
    next_seq: i64,
) -> Result<i64, Stop> {
    let start = rows.partition_point(|row| row.seq_num < next_seq);
    let fresh = &rows[start..];
    let Some(last) = fresh.last() else {
        return Ok(next_seq);
    };
    let next = last.seq_num + 1;
    let event = match encoded {
        Some(event) if start == 0 => event.clone(),
        _ => batch_event(fresh),
    };
    events.send(event).await.map_err(|_| Stop::ClientGone)?;
    Ok(next)
}

/// Reads from the database from `next_seq` until caught up.
async fn catch_up(
    hub: &Hub,
    key: &ChannelKey,
    events: &mpsc::Sender<Event>,
    mut next_seq: i64,
    deadline: Instant,
) -> Result<i64, Stop> {
    loop {
        if Instant::now() >= deadline {
            return Err(Stop::Deadline);
        }
        let rows = match hub
            .store()
            .list_records(
                key.environment_id,
                key.session_id,
                &key.stream,
                Some(next_seq - 1),
                READ_PAGE,
            )
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                // The feed's next wake brings us back here; do not end the stream for it.
                tracing::warn!(%error, "reader catch-up failed");
                return Ok(next_seq);
            }
        };
        let full_page = rows.len() as u64 == READ_PAGE;
        next_seq = send_rows(events, &rows, None, next_seq).await?;
        if !full_page {
            return Ok(next_seq);
        }
    }
}

async fn serve_reader(
    hub: Arc<Hub>,
    key: ChannelKey,
    mut feed: broadcast::Receiver<Arc<FeedBatch>>,
    mut next_seq: i64,
    reading: Reading,
    events: mpsc::Sender<Event>,
) {
    crate::signals::sse_opened();
    let deadline = reading.deadline;
    let result: Result<(), Stop> = async {
        next_seq = catch_up(&hub, &key, &events, next_seq, deadline).await?;
        if reading.end_when_caught_up {
            return Err(Stop::Deadline);
        }
        let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Err(Stop::Deadline),
                _ = hub.readers_stopped() => return Err(Stop::Deadline),
                _ = events.closed() => return Err(Stop::ClientGone),
                _ = ping.tick() => {
                    events
                        .send(Event::default().event("ping").data("{}"))
                        .await
                        .map_err(|_| Stop::ClientGone)?;
                }
                received = feed.recv() => match received {
                    Ok(batch) => {
                        let gap = batch.rows.first().is_some_and(|first| first.seq_num > next_seq);
                        next_seq = if gap {
                            catch_up(&hub, &key, &events, next_seq, deadline).await?
                        } else {
                            send_rows(&events, &batch.rows, Some(&batch.event), next_seq).await?
                        };
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        next_seq = catch_up(&hub, &key, &events, next_seq, deadline).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        feed = hub.subscribe(key.clone());
                        next_seq = catch_up(&hub, &key, &events, next_seq, deadline).await?;
                    }
                },
            }
        }
    }
    .await;
    if let Err(Stop::Deadline | Stop::ClientGone) = result {
        // Dropping `events` ends the body cleanly.
    }
    crate::signals::sse_closed();
}
