//! The api's accept loop: every connection is served by hyper's automatic builder, which speaks
//! HTTP/1.1 and cleartext HTTP/2 with prior knowledge (h2c) on the same port, so the official
//! writer (HTTP/2 append sessions) and every other client (HTTP/1.1) share one listener.
//!
//! Why not `axum::serve`: an HTTP/2 connection must get a GOAWAY once it has had no open stream
//! for `SESSIONS_HTTP2_IDLE_TIMEOUT_MS` (the official writer never closes its connection, which
//! keeps a Node process alive), and that needs a per-connection count of requests in flight,
//! their response bodies included.
//!
//! Hostile connections are bounded here (each bound a setting, see [`ConnectionLimits`]):
//! - at most `SESSIONS_MAX_CONNECTIONS` open connections: past it a new connection is closed at
//!   once (never left to time out in the backlog), so the api keeps file descriptors for its own
//!   work;
//! - HTTP/1.1 request headers must arrive within `SESSIONS_HTTP_HEADER_READ_TIMEOUT_MS`, which
//!   also bounds how long a keep-alive connection may wait for its next request (hyper's
//!   timer); a connection that sends no request at all (either protocol) is closed after the
//!   same time, or after [`PRESSURE_TIMEOUT`] while the api holds 90 % of its budget;
//! - HTTP/2: at most `SESSIONS_HTTP2_MAX_CONCURRENT_STREAMS` streams per connection, a bound on
//!   streams reset before they were accepted (rapid reset), a header list limit, and keep-alive
//!   pings that drop a peer that stopped answering.
//!
//! What does not live here: routes (`routes`), the shutdown grace (`Application`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use shared::shutdown::CancellationToken;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::Service;

/// How long the loop waits after a failed `accept` (e.g. out of file descriptors) before it
/// accepts again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How long a connection may stay without a request while the api holds 90 % of its
/// connection budget.
pub const PRESSURE_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 streams a client may reset before the server accepted them (h2's rapid-reset bound;
/// past it the connection is closed).
const HTTP2_MAX_PENDING_RESETS: usize = 20;
/// Largest HTTP/2 header list (decoded).
const HTTP2_MAX_HEADER_LIST_BYTES: u32 = 64 << 10;

/// The bounds on client connections (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub http2_idle_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 keep-alive: a ping after this much silence, and the connection is closed when its
    /// answer does not come within the same time.
    pub http2_keep_alive: Duration,
}

impl ConnectionLimits {
    pub fn from_settings(settings: &shared::config::Settings) -> Self {
        Self {
            max_connections: settings.max_connections,
            header_read_timeout: settings.header_read_timeout,
            http2_idle_timeout: settings.http2_idle_timeout,
            http2_max_concurrent_streams: settings.http2_max_concurrent_streams,
            http2_keep_alive: settings.http2_keep_alive,
        }
    }
}

/// Open connections, counted out when their task ends.
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        crate::signals::connection_closed();
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and lets every
/// connection finish its requests (HTTP/2 connections get a GOAWAY at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let stopping = CancellationToken::new();
    let mut connections = JoinSet::new();
    let open = Arc::new(AtomicUsize::new(0));
    crate::signals::connection_budget(limits.max_connections);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    if open.load(Ordering::Relaxed) >= limits.max_connections {
                        // Closed at once: the client sees the connection end, not a timeout.
                        drop(stream);
                        crate::signals::connection_refused();
                        continue;
                    }
                    open.fetch_add(1, Ordering::Relaxed);
                    crate::signals::connection_opened();
                    connections.spawn(serve_connection(
                        stream,
                        router.clone(),
                        limits,
                        Pressure { open: open.clone(), budget: limits.max_connections },
                        OpenConnection(open.clone()),
                        stopping.clone(),
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
    stopping.cancel();
    while connections.join_next().await.is_some() {}
}

/// Whether the api holds 90 % of its connection budget.
#[derive(Clone)]
struct Pressure {
    open: Arc<AtomicUsize>,
    budget: usize,
}

impl Pressure {
    fn is_high(&self) -> bool {
        self.open.load(Ordering::Relaxed) * 10 >= self.budget * 9
    }
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: ConnectionLimits,
    pressure: Pressure,
    _open: OpenConnection,
    stop: CancellationToken,
) {
    // Small frames (acks, SSE events) must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let (in_flight, mut in_flight_changes) = watch::channel(InFlight::default());
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let is_http2 = request.version() == hyper::Version::HTTP_2;
        in_flight.send_modify(|count| {
            count.requests += 1;
            count.started += 1;
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
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_RESETS)
        .max_header_list_size(HTTP2_MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(limits.http2_keep_alive)
        .keep_alive_timeout(limits.http2_keep_alive);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let mut shutting_down = false;
    let mut never_requested = std::pin::pin!(without_a_request(
        in_flight_changes.clone(),
        limits.header_read_timeout,
        pressure,
    ));
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                let timed_out = served.as_ref().err().and_then(|error| error.downcast_ref::<hyper::Error>()).is_some_and(hyper::Error::is_timeout);
                if timed_out {
                    crate::signals::connection_timed_out("header");
                }
                return;
            }
            () = &mut never_requested, if !shutting_down => {
                // Dropping the connection closes it: there is no request to finish.
                crate::signals::connection_timed_out("no_request");
                return;
            }
            () = stop.cancelled(), if !shutting_down => {
                shutting_down = true;
                connection.as_mut().graceful_shutdown();
            }
            () = idle_http2(&mut in_flight_changes, limits.http2_idle_timeout), if !shutting_down => {
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
    /// Requests the connection has sent so far.
    started: u64,
    /// The connection speaks HTTP/2 (seen on its first request).
    http2: bool,
}

/// Resolves if the connection sends no request within `timeout`, or within
/// [`PRESSURE_TIMEOUT`] while the api is under connection pressure; never once it sent one.
async fn without_a_request(
    mut changes: watch::Receiver<InFlight>,
    timeout: Duration,
    pressure: Pressure,
) {
    let accepted = tokio::time::Instant::now();
    loop {
        // `Ok(_)`: a request came, or the connection is gone; either way never resolve.
        let waited_out = tokio::time::timeout(
            PRESSURE_TIMEOUT.min(timeout),
            changes.wait_for(|count| count.started > 0),
        )
        .await
        .is_err();
        if !waited_out {
            return std::future::pending().await;
        }
        let waited = accepted.elapsed();
        if waited >= timeout || (waited >= PRESSURE_TIMEOUT && pressure.is_high()) {
            return;
        }
    }
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
