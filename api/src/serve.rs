//! The api's accept loop: every connection is served by hyper's automatic builder, which speaks
//! HTTP/1.1 and cleartext HTTP/2 with prior knowledge (h2c) on the same port, so the official
//! writer (HTTP/2 append sessions) and every other client (HTTP/1.1) share one listener.
//!
//! Why not `axum::serve`: an HTTP/2 connection must get a GOAWAY once it has had no open stream
//! for `SESSIONS_HTTP2_IDLE_TIMEOUT_MS` (the official writer never closes its connection, which
//! keeps a Node process alive), and that needs a per-connection count of requests in flight,
//! their response bodies included. HTTP/1.1 connections are left to the client: closing an idle
//! keep-alive connection races with a request the client is sending on it.
//!
//! What does not live here: routes (`routes`), the shutdown grace (`Application`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::Service;

/// How long the loop waits after a failed `accept` (e.g. out of file descriptors) before it
/// accepts again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and lets every
/// connection finish its requests (HTTP/2 connections get a GOAWAY at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    http2_idle_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stopping, stop) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(
                        stream,
                        router.clone(),
                        http2_idle_timeout,
                        stop.clone(),
                    ));
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    let _ = stopping.send(true);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    http2_idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // Small frames (acks, SSE events) must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let (in_flight, mut in_flight_changes) = watch::channel(InFlight::default());
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let is_http2 = request.version() == hyper::Version::HTTP_2;
        in_flight.send_modify(|count| {
            count.requests += 1;
            count.http2 |= is_http2;
        });
        let guard = RequestGuard(in_flight.clone());
        let mut router = router.clone();
        async move {
            let response = router.call(request.map(Body::new)).await;
            Ok::<_, Infallible>(match response {
                Ok(response) => response.map(|body| Body::new(TrackedBody { body, guard })),
                Err(never) => match never {},
            })
        }
    });
    let builder = Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = stop.wait_for(|stop| *stop), if !shutting_down => {
                shutting_down = true;
                connection.as_mut().graceful_shutdown();
            }
            () = idle_http2(&mut in_flight_changes, http2_idle_timeout), if !shutting_down => {
                shutting_down = true;
                crate::signals::idle_connection_closed();
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Requests of one connection whose response has not ended yet.
#[derive(Clone, Copy, Debug, Default)]
struct InFlight {
    requests: usize,
    /// The connection speaks HTTP/2 (seen on its first request).
    http2: bool,
}

/// Resolves once the connection is HTTP/2 and has had no request in flight for `idle`.
async fn idle_http2(changes: &mut watch::Receiver<InFlight>, idle: Duration) {
    loop {
        if changes
            .wait_for(|count| count.http2 && count.requests == 0)
            .await
            .is_err()
        {
            return std::future::pending().await;
        }
        let busy_again = changes.wait_for(|count| count.requests > 0);
        if tokio::time::timeout(idle, busy_again).await.is_err() {
            return;
        }
    }
}

/// Counts a request out when its response body is done (or dropped).
struct RequestGuard(watch::Sender<InFlight>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0
            .send_modify(|count| count.requests = count.requests.saturating_sub(1));
    }
}

/// A response body that holds its request's [`RequestGuard`] until it is dropped.
struct TrackedBody {
    body: Body,
    #[expect(
        dead_code,
        reason = "held for its Drop: the request counts until the body ends"
    )]
    guard: RequestGuard,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
