//! THE mapping from failures to HTTP answers. Every error body is JSON `{"error": "..."}` (the
//! closed-session refusal adds `ok`, `code` and `closedReason`, as the official client expects);
//! 5xx bodies never carry internals (those go to the log).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use shared::broker::BrokerError;
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
    /// An append to a closed or expired session: 409 with the stable `code: "session_closed"`
    /// (and the close reason) that the official chat transport treats as terminal.
    #[error("{message}")]
    SessionClosed {
        message: &'static str,
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
    /// The refusal of an append to a session that no longer accepts writes.
    pub fn closed_session(closed_reason: Option<String>) -> Self {
        ApiError::SessionClosed {
            message: "Cannot append to a closed session",
            closed_reason,
        }
    }

    /// The refusal of an append to a session past its `expiresAt`.
    pub fn expired_session() -> Self {
        ApiError::SessionClosed {
            message: "Cannot append to an expired session",
            closed_reason: Some("expired".into()),
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
            ApiError::Broker(_) | ApiError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
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
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
        }
        response
    }
}
