//! Request bodies a handler did not read to their end: every answer given from the headers or
//! after part of the body (413 from `content-length` or from a limit, but also 401, 403, 404,
//! 411, 429 or 400 while the client is still sending).
//!
//! Why: when hyper answers such a request it stops reading and closes the connection. The
//! client is still sending; the bytes that arrive at a closed socket make the server's kernel
//! reset the connection, and the client (Node's fetch among others) then often reports EPIPE or
//! ECONNRESET instead of the answer, and retries a request that can only be refused again.
//!
//! What [`discard_unread_body`] does, per request, within two bounds (`SESSIONS_MAX_DISCARD_BYTES`,
//! 16 MiB by default, and `SESSIONS_DISCARD_TIMEOUT_MS`, 10 s):
//!
//! - The rest of the body (at most the byte bound) is read and thrown away **before** the answer
//!   is sent. The client finishes sending, then reads the answer; the connection stays usable.
//! - A body whose declared remainder exceeds the byte bound is answered **at once**, with
//!   `Connection: close`, and discarded in the background within the same two bounds: a client
//!   that reads while it sends (browsers, Node's fetch, curl) gets the answer, and the
//!   connection closes when the body ends or a bound is reached (a client still sending then
//!   sees a reset).
//! - A chunked body that goes past the byte bound, a sender slower than the time bound, and a
//!   body that fails are answered with `Connection: close`, and the connection closes.
//! - A request with `Expect: 100-continue` whose body was never asked for is answered with
//!   `Connection: close` without reading anything: its client has sent no body and waits.
//!
//! So one refused request costs at most the byte bound of reading and holds its connection for
//! at most the time bound beyond its handler. A handler that reads a body it accepts is not
//! bounded here (the limits of the routes bound its size).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;
use shared::shutdown::TaskTracker;

/// How much of an unread body the api reads and discards at most, and for how long.
#[derive(Clone, Debug)]
pub(crate) struct DiscardBounds {
    pub max_bytes: u64,
    pub timeout: Duration,
    /// Where a discard that outlives its answer runs (`AppState::tasks`).
    pub tasks: TaskTracker,
}

/// What a handler left of its request body, handed back when it dropped the body.
#[derive(Default)]
struct Leftover {
    /// The rest of the body (`None`: read to its end, failed, or still held somewhere).
    body: Option<Body>,
    /// Data bytes the handler read.
    read: u64,
    /// Whether the handler asked for the body at all (with `Expect: 100-continue`, asking is
    /// what makes hyper send `100 Continue`).
    polled: bool,
}

/// The request body as handlers see it: passes every frame through and, when dropped before
/// its end, hands the rest back to [`discard_unread_body`].
struct Tracked {
    inner: Option<Body>,
    read: u64,
    polled: bool,
    leftover: Arc<Mutex<Leftover>>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        this.polled = true;
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.read += data.len() as u64;
                }
            }
            // The end, or a broken body (hyper closes that connection itself): nothing to read.
            Poll::Ready(None | Some(Err(_))) => this.inner = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut leftover = self.leftover.lock().unwrap_or_else(PoisonError::into_inner);
        leftover.read = self.read;
        leftover.polled = self.polled;
        leftover.body = self.inner.take().filter(|body| !body.is_end_stream());
    }
}

/// How discarding a body ended.
enum Discarded {
    /// The body ended: the client sent all of it.
    End,
    /// More than the byte bound.
    TooLarge,
    /// The body failed (the client went away, or sent a malformed chunk).
    Failed,
}

async fn discard(body: Body, max_bytes: u64) -> Discarded {
    let mut stream = body.into_data_stream();
    let mut discarded: u64 = 0;
    while let Some(data) = stream.next().await {
        let Ok(data) = data else {
            return Discarded::Failed;
        };
        discarded += data.len() as u64;
        if discarded > max_bytes {
            return Discarded::TooLarge;
        }
    }
    Discarded::End
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The answer, on a connection that will not be reused.
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The middleware (see the module documentation). Requests without a body pass untouched.
pub(crate) async fn discard_unread_body(
    State(bounds): State<DiscardBounds>,
    request: Request,
    next: Next,
) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let declared = declared_length(request.headers());
    let expects_continue = expects_continue(request.headers());
    let leftover = Arc::new(Mutex::new(Leftover::default()));
    let tracked = leftover.clone();
    let request = request.map(|body| {
        Body::new(Tracked {
            inner: Some(body),
            read: 0,
            polled: false,
            leftover: tracked,
        })
    });
    let response = next.run(request).await;
    let Leftover { body, read, polled } =
        std::mem::take(&mut *leftover.lock().unwrap_or_else(PoisonError::into_inner));
    let Some(body) = body else {
        return response;
    };
    let started = Instant::now();
    if response.status() == axum::http::StatusCode::REQUEST_TIMEOUT {
        // The body came too slowly (`routes::body`): waiting for its rest is what an attacker
        // wants. Close instead.
        crate::signals::unread_body("timed_out", started.elapsed());
        return closing(response);
    }
    if expects_continue && !polled {
        crate::signals::unread_body("not_sent", started.elapsed());
        return closing(response);
    }
    let remaining = declared.map(|length| length.saturating_sub(read));
    if remaining.is_some_and(|remaining| remaining > bounds.max_bytes) {
        // Not worth reading before answering: answer now, keep reading in the background so
        // that the answer is not lost to a reset while the client still sends.
        crate::signals::unread_body("too_large", started.elapsed());
        bounds.tasks.spawn(tokio::time::timeout(
            bounds.timeout,
            discard(body, bounds.max_bytes),
        ));
        return closing(response);
    }
    let outcome = match tokio::time::timeout(bounds.timeout, discard(body, bounds.max_bytes)).await
    {
        Ok(Discarded::End) => {
            crate::signals::unread_body("discarded", started.elapsed());
            return response;
        }
        Ok(Discarded::TooLarge) => "too_large",
        Ok(Discarded::Failed) => "failed",
        Err(_elapsed) => "timed_out",
    };
    crate::signals::unread_body(outcome, started.elapsed());
    closing(response)
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::post;
    use tower::Service;

    use super::*;

    fn bounds() -> DiscardBounds {
        DiscardBounds {
            max_bytes: 1024,
            timeout: Duration::from_millis(200),
            tasks: TaskTracker::new(),
        }
    }

    /// Refuses without reading the body.
    async fn refuse() -> StatusCode {
        StatusCode::PAYLOAD_TOO_LARGE
    }

    /// Reads the whole body.
    async fn accept(body: Body) -> StatusCode {
        match axum::body::to_bytes(body, usize::MAX).await {
            Ok(_) => StatusCode::OK,
            Err(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn app() -> Router {
        Router::new()
            .route("/refuse", post(refuse))
            .route("/accept", post(accept))
            .layer(axum::middleware::from_fn_with_state(
                bounds(),
                discard_unread_body,
            ))
    }

    /// A body of `chunks` sent through a channel, so the test sees what was read of it.
    fn streamed(
        length: Option<usize>,
        chunks: Vec<Vec<u8>>,
        path: &str,
    ) -> (Request, Arc<std::sync::atomic::AtomicUsize>) {
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sent.clone();
        let stream = futures_util::stream::iter(chunks).map(move |chunk| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(chunk)
        });
        let mut request = axum::http::Request::post(path);
        if let Some(length) = length {
            request = request.header(header::CONTENT_LENGTH, length);
        }
        let request = request.body(Body::from_stream(stream)).expect("request");
        (request, sent)
    }

    #[tokio::test]
    async fn an_unread_body_within_the_bound_is_read_before_the_answer() {
        let (request, sent) = streamed(Some(1000), vec![vec![b'x'; 100]; 10], "/refuse");
        let response = app().call(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 10);
        assert!(response.headers().get(header::CONNECTION).is_none());
    }

    #[tokio::test]
    async fn a_body_declared_beyond_the_bound_is_answered_at_once_and_closes() {
        let (request, _sent) = streamed(Some(4096), vec![vec![b'x'; 1024]; 4], "/refuse");
        let response = app().call(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            response.headers().get(header::CONNECTION),
            Some(&HeaderValue::from_static("close"))
        );
    }

    #[tokio::test]
    async fn a_chunked_body_beyond_the_bound_closes() {
        let (request, sent) = streamed(None, vec![vec![b'x'; 100]; 100], "/refuse");
        let response = app().call(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            response.headers().get(header::CONNECTION),
            Some(&HeaderValue::from_static("close"))
        );
        // Read up to just past the bound, not the whole body.
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 11);
    }

    #[tokio::test]
    async fn a_silent_sender_is_answered_when_the_time_is_up() {
        let stream = futures_util::stream::pending::<Result<Vec<u8>, std::io::Error>>();
        let request = axum::http::Request::post("/refuse")
            .header(header::CONTENT_LENGTH, 100)
            .body(Body::from_stream(stream))
            .expect("request");
        let started = Instant::now();
        let response = app().call(request).await.expect("infallible");
        assert!(started.elapsed() >= bounds().timeout);
        assert!(started.elapsed() < bounds().timeout * 10);
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            response.headers().get(header::CONNECTION),
            Some(&HeaderValue::from_static("close"))
        );
    }

    #[tokio::test]
    async fn a_body_the_handler_read_is_left_alone() {
        let (request, sent) = streamed(Some(5000), vec![vec![b'x'; 1000]; 5], "/accept");
        let response = app().call(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 5);
        assert!(response.headers().get(header::CONNECTION).is_none());
    }

    #[tokio::test]
    async fn an_expect_continue_body_never_asked_for_is_not_read() {
        let (request, sent) = streamed(Some(1000), vec![vec![b'x'; 100]; 10], "/refuse");
        let (mut parts, body) = request.into_parts();
        parts
            .headers
            .insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        let response = app()
            .call(Request::from_parts(parts, body))
            .await
            .expect("infallible");
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(
            response.headers().get(header::CONNECTION),
            Some(&HeaderValue::from_static("close"))
        );
    }
}
