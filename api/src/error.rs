//! THE mapping from failures to HTTP answers: [`ApiError`] to status and body, and every worker
//! refusal ([`Outcome`]) to an [`ApiError`] ([`ApiError::refusal`]), the same on every route.
//! Every error body is JSON `{"error": "..."}` (the closed-session refusal adds `ok`, `code` and
//! `closedReason`, as the official client expects); 5xx bodies never carry internals (those go
//! to the log).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use shared::broker::BrokerError;
use shared::commands::Outcome;
use shared::domain::ValidationError;
use shared::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("{0}")]
    Conflict(String),
    /// A write to a closed or expired session (an append, a create that finds a closed
    /// session, an end-and-continue): 409 with the stable `code: "session_closed"` (and the
    /// close reason) that the official chat transport treats as terminal.
    #[error("{message}")]
    SessionClosed {
        message: String,
        closed_reason: Option<String>,
    },
    #[error("{0}")]
    Unprocessable(String),
    #[error("Method not allowed on this route")]
    MethodNotAllowed,
    #[error("{0}")]
    LengthRequired(&'static str),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request body came too slowly (`routes::body`); the connection is closed after it.
    #[error("{0}")]
    RequestTimeout(&'static str),
    #[error("{0}")]
    NotImplemented(&'static str),
    /// The environment's rate limit is exhausted; answered with `Retry-After`.
    #[error(
        "Rate limit exceeded for this environment; retry after {retry_after_seconds} second(s)"
    )]
    TooManyRequests { retry_after_seconds: u64 },
    /// The instance already handles `SESSIONS_MAX_APPENDS_IN_FLIGHT` appends; answered with
    /// `Retry-After` before anything was read or written.
    #[error("The service is at capacity; retry after {retry_after_seconds} second(s)")]
    AtCapacity { retry_after_seconds: u64 },
    /// The broker did not durably queue the command.
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("database: {0}")]
    Storage(#[from] StorageError),
    /// The worker did not answer in time.
    #[error("the worker did not answer in time")]
    ReplyTimeout,
    #[error("internal: {0}")]
    Internal(String),
}

impl ApiError {
    /// The refusal of a write to a session that no longer accepts writes; `attempted` names
    /// the write ("append to" gives the reference's "Cannot append to a closed session").
    pub fn closed_session(attempted: Attempted, closed_reason: Option<String>) -> Self {
        ApiError::SessionClosed {
            message: format!("Cannot {} a closed session", attempted.verb()),
            closed_reason,
        }
    }

    /// The refusal of a write to a session past its `expiresAt`.
    pub fn expired_session(attempted: Attempted) -> Self {
        ApiError::SessionClosed {
            message: format!("Cannot {} an expired session", attempted.verb()),
            closed_reason: Some("expired".into()),
        }
    }

    /// THE answer to a worker outcome that is not the success the route waited for. Every
    /// refusal the worker decides maps here, so a closed session gets the same 409 on every
    /// route; a success outcome reaching this is a bug between the route and the worker (500,
    /// logged). The match has no catch-all: a new `Outcome` variant must be decided here.
    pub fn refusal(attempted: Attempted, outcome: Outcome) -> Self {
        match outcome {
            Outcome::Conflict { .. } => ApiError::Conflict(
                "X-Part-Id was already used with a different body; nothing was appended".into(),
            ),
            Outcome::SessionClosed { closed_reason } => {
                ApiError::closed_session(attempted, closed_reason)
            }
            Outcome::SessionExpired => ApiError::expired_session(attempted),
            Outcome::SessionNotFound => ApiError::NotFound("Session not found"),
            success @ (Outcome::Appended { .. }
            | Outcome::Duplicate { .. }
            | Outcome::RecordsAppended { .. }
            | Outcome::SessionCreated { .. }
            | Outcome::SessionClosedNow { .. }
            | Outcome::SessionUpdated { .. }
            | Outcome::RunContinued { .. }
            | Outcome::WaitpointRegistered { .. }) => ApiError::Internal(format!(
                "the worker answered {} to a route that cannot {} with it",
                success.name(),
                attempted.verb()
            )),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) | ApiError::Validation(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) | ApiError::SessionClosed { .. } => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::LengthRequired(_) => StatusCode::LENGTH_REQUIRED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::AtCapacity { .. } | ApiError::Broker(_) | ApiError::Storage(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::ReplyTimeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the client may read. Server-side failures get a fixed sentence.
    fn public_message(&self) -> String {
        match self {
            ApiError::Broker(_) => {
                "The service cannot queue commands right now; retry later".into()
            }
            ApiError::Storage(_) => {
                "The service cannot reach its database right now; retry later".into()
            }
            ApiError::ReplyTimeout => {
                "The command was queued but not applied in time; retry with the same request".into()
            }
            ApiError::Internal(_) => "Internal error".into(),
            other => other.to_string(),
        }
    }
}

/// The write a route asked the worker for, as the refusal's message names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempted {
    Append,
    Create,
    Close,
    Update,
    EndAndContinue,
    Wait,
}

impl Attempted {
    fn verb(self) -> &'static str {
        match self {
            Attempted::Append => "append to",
            Attempted::Create => "create or reuse",
            Attempted::Close => "close",
            Attempted::Update => "update",
            Attempted::EndAndContinue => "end and continue the run of",
            Attempted::Wait => "wait on",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // A refusal at capacity is counted, not logged: under overload a line per refusal
        // would cost what the refusal saves.
        if status.is_server_error() && !matches!(self, ApiError::AtCapacity { .. }) {
            let publish_failure = match &self {
                ApiError::Broker(error) => Some(error.reason()),
                _ => None,
            };
            crate::signals::request_failed(&self, status.as_u16(), publish_failure);
        }
        let body = match &self {
            ApiError::SessionClosed {
                message,
                closed_reason,
            } => json!({
                "ok": false,
                "error": message,
                "code": "session_closed",
                "closedReason": closed_reason,
            }),
            _ => json!({ "error": self.public_message() }),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if matches!(self, ApiError::SessionClosed { .. } | ApiError::Conflict(_)) {
            // Both refusals are final; the official client retries a 409 unless told not to.
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if matches!(self, ApiError::RequestTimeout(_)) {
            // The rest of a body that came too slowly is not worth waiting for.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ApiError::TooManyRequests {
            retry_after_seconds,
        }
        | ApiError::AtCapacity {
            retry_after_seconds,
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::domain::session::SessionItem;

    fn session() -> Box<SessionItem> {
        Box::new(SessionItem {
            id: "session_1".into(),
            external_id: None,
            session_type: "chat.agent".into(),
            task_identifier: "agent".into(),
            trigger_config: json!({}),
            current_run_id: None,
            tags: Vec::new(),
            metadata: None,
            closed_at: None,
            closed_reason: None,
            expires_at: None,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        })
    }

    /// One value of every `Outcome` variant, with the status a route answers when that
    /// outcome is not the success it waited for. The exhaustive match makes a new variant a
    /// compile error here until it has a row.
    fn every_outcome() -> Vec<(Outcome, StatusCode)> {
        let all = vec![
            (
                Outcome::Appended { seq_num: 1 },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                Outcome::Duplicate { seq_num: 1 },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (Outcome::Conflict { seq_num: 1 }, StatusCode::CONFLICT),
            (
                Outcome::RecordsAppended {
                    start_seq: 0,
                    end_seq: 1,
                    timestamp_ms: 0,
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                Outcome::SessionClosed {
                    closed_reason: Some("done".into()),
                },
                StatusCode::CONFLICT,
            ),
            (Outcome::SessionExpired, StatusCode::CONFLICT),
            (Outcome::SessionNotFound, StatusCode::NOT_FOUND),
            (
                Outcome::SessionCreated {
                    session: session(),
                    run_friendly_id: "run_1".into(),
                    cached: false,
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                Outcome::SessionClosedNow { session: session() },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                Outcome::SessionUpdated { session: session() },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                Outcome::RunContinued {
                    run_friendly_id: "run_2".into(),
                    swapped: true,
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                Outcome::WaitpointRegistered {
                    friendly_id: "waitpoint_1".into(),
                    cached: false,
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (outcome, _) in &all {
            match outcome {
                Outcome::Appended { .. }
                | Outcome::Duplicate { .. }
                | Outcome::Conflict { .. }
                | Outcome::RecordsAppended { .. }
                | Outcome::SessionClosed { .. }
                | Outcome::SessionExpired
                | Outcome::SessionNotFound
                | Outcome::SessionCreated { .. }
                | Outcome::SessionClosedNow { .. }
                | Outcome::SessionUpdated { .. }
                | Outcome::RunContinued { .. }
                | Outcome::WaitpointRegistered { .. } => {}
            }
        }
        all
    }

    async fn body_of(error: ApiError) -> (StatusCode, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        (status, serde_json::from_slice(&bytes).expect("JSON body"))
    }

    #[tokio::test]
    async fn every_outcome_maps_to_one_answer_whatever_the_route() {
        let routes = [
            Attempted::Append,
            Attempted::Create,
            Attempted::Close,
            Attempted::Update,
            Attempted::EndAndContinue,
            Attempted::Wait,
        ];
        for (outcome, status) in every_outcome() {
            for attempted in routes {
                let (answered, body) = body_of(ApiError::refusal(attempted, outcome.clone())).await;
                assert_eq!(answered, status, "{attempted:?} refused with {outcome:?}");
                assert!(body["error"].is_string(), "{body}");
                if status.is_server_error() {
                    // No internals (the outcome's content) in a 5xx body.
                    assert_eq!(body, json!({"error": "Internal error"}));
                }
            }
        }
    }

    #[tokio::test]
    async fn a_closed_session_is_the_same_409_on_every_route() {
        for attempted in [
            Attempted::Append,
            Attempted::Create,
            Attempted::EndAndContinue,
        ] {
            let closed = ApiError::refusal(
                attempted,
                Outcome::SessionClosed {
                    closed_reason: Some("done".into()),
                },
            );
            let response = closed.into_response();
            assert_eq!(response.headers()["x-should-retry"], "false");
            let (status, body) = body_of(ApiError::refusal(
                attempted,
                Outcome::SessionClosed {
                    closed_reason: Some("done".into()),
                },
            ))
            .await;
            assert_eq!(status, StatusCode::CONFLICT);
            assert_eq!(body["code"], "session_closed");
            assert_eq!(body["closedReason"], "done");
            assert_eq!(body["ok"], false);
            let (_, expired) = body_of(ApiError::refusal(attempted, Outcome::SessionExpired)).await;
            assert_eq!(expired["code"], "session_closed");
            assert_eq!(expired["closedReason"], "expired");
        }
        let (_, append) = body_of(ApiError::refusal(
            Attempted::Append,
            Outcome::SessionClosed {
                closed_reason: None,
            },
        ))
        .await;
        // The reference's wording for appends.
        assert_eq!(append["error"], "Cannot append to a closed session");
    }
}
