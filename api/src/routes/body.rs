//! Reading a request body whole: within a size limit, and within two timeouts against clients
//! that send their body slowly on purpose (a slow-body attack holds a connection and a task
//! for as long as the server waits):
//! - `SESSIONS_HTTP_BODY_IDLE_TIMEOUT_MS`: the longest silence between two pieces of the body;
//! - `SESSIONS_HTTP_BODY_READ_TIMEOUT_MS`: the longest time for the whole body, however
//!   steadily it trickles in.
//!
//! Every route that reads its body whole goes through [`read_whole_body`]; a timeout becomes
//! a 408 answered at once with `Connection: close` (the unread-body middleware does not wait
//! for the rest of such a body). The writer's append sessions (`s2s/proto`) are long-lived
//! bodies by design and have their own idle timeout (`SESSIONS_WRITER_IDLE_TIMEOUT_MS`).

use std::time::Duration;

use axum::body::{Body, Bytes};
use futures_util::StreamExt;

/// The bounds of one body read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyLimits {
    pub max_bytes: usize,
    pub idle_timeout: Duration,
    pub read_timeout: Duration,
}

impl BodyLimits {
    /// The configured timeouts with `max_bytes` as the size limit.
    pub(crate) fn from_settings(settings: &shared::config::Settings, max_bytes: usize) -> Self {
        Self {
            max_bytes,
            idle_timeout: settings.body_idle_timeout,
            read_timeout: settings.body_read_timeout,
        }
    }
}

/// Why a body could not be read whole.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyReadError {
    /// More than `max_bytes`.
    TooLarge,
    /// The client paused longer than the idle timeout, or took longer than the read timeout.
    TimedOut,
    /// The body failed (the client went away, or sent a malformed chunk).
    Broken,
}

impl BodyReadError {
    /// The answer of a route whose body could not be read (`too_large`: its 413 sentence).
    pub(crate) fn into_api_error(self, too_large: String) -> crate::error::ApiError {
        use crate::error::ApiError;
        match self {
            BodyReadError::TooLarge => ApiError::PayloadTooLarge(too_large),
            BodyReadError::TimedOut => ApiError::RequestTimeout(
                "The request body did not arrive in time; the connection is closed",
            ),
            BodyReadError::Broken => ApiError::BadRequest("Cannot read the request body".into()),
        }
    }
}

/// Reads `body` to its end within `limits`.
pub(crate) async fn read_whole_body(
    body: Body,
    limits: BodyLimits,
) -> Result<Bytes, BodyReadError> {
    let give_up_at = tokio::time::Instant::now() + limits.read_timeout;
    let mut stream = body.into_data_stream();
    let mut collected: Vec<u8> = Vec::new();
    loop {
        let next_piece_by = (tokio::time::Instant::now() + limits.idle_timeout).min(give_up_at);
        match tokio::time::timeout_at(next_piece_by, stream.next()).await {
            Err(_elapsed) => {
                crate::signals::connection_timed_out("body");
                return Err(BodyReadError::TimedOut);
            }
            Ok(None) => return Ok(Bytes::from(collected)),
            Ok(Some(Err(_))) => return Err(BodyReadError::Broken),
            Ok(Some(Ok(piece))) => {
                if collected.len() + piece.len() > limits.max_bytes {
                    return Err(BodyReadError::TooLarge);
                }
                collected.extend_from_slice(&piece);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_bytes: usize) -> BodyLimits {
        BodyLimits {
            max_bytes,
            idle_timeout: Duration::from_millis(100),
            read_timeout: Duration::from_millis(400),
        }
    }

    /// A body sending `pieces` pieces of one byte, `pause` apart.
    fn trickle(pieces: usize, pause: Duration) -> Body {
        let stream = futures_util::stream::unfold(0, move |sent| async move {
            if sent == pieces {
                return None;
            }
            if sent > 0 {
                tokio::time::sleep(pause).await;
            }
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), sent + 1))
        });
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn a_body_within_the_bounds_is_read_whole() {
        let read = read_whole_body(trickle(3, Duration::from_millis(10)), limits(10)).await;
        assert_eq!(read, Ok(Bytes::from_static(b"xxx")));
    }

    #[tokio::test]
    async fn a_body_larger_than_the_limit_is_refused() {
        let read = read_whole_body(trickle(11, Duration::ZERO), limits(10)).await;
        assert_eq!(read, Err(BodyReadError::TooLarge));
    }

    #[tokio::test]
    async fn a_pause_longer_than_the_idle_timeout_ends_the_read() {
        let read = read_whole_body(trickle(3, Duration::from_millis(150)), limits(10)).await;
        assert_eq!(read, Err(BodyReadError::TimedOut));
    }

    #[tokio::test]
    async fn a_steady_trickle_longer_than_the_read_timeout_ends_the_read() {
        // Each pause is within the idle timeout; the whole takes 9 × 60 ms > 400 ms.
        let started = tokio::time::Instant::now();
        let read = read_whole_body(trickle(10, Duration::from_millis(60)), limits(100)).await;
        assert_eq!(read, Err(BodyReadError::TimedOut));
        assert!(started.elapsed() >= Duration::from_millis(400));
    }
}
