//! Every instrumentation point of the api, each defined once: a function per event that writes
//! its log line and records its metric together, so the two never drift apart and the list of
//! what the api reports is this file. Labels are low-cardinality: route templates, never ids.
//!
//! What does not live here: the process gauges shared with the worker (`shared::telemetry`).

use std::time::Duration;

use shared::domain::channel::Io;

/// A request arrived with a declared body of `bytes`.
pub fn request_body(route: &str, bytes: f64) {
    metrics::histogram!("sessions_api_request_body_bytes", "route" => route.to_owned())
        .record(bytes);
}

/// A request was answered (its route template, not its path).
pub fn request_finished(route: &str, method: &str, status: u16, elapsed: Duration) {
    tracing::debug!(route, method, status, ?elapsed, "request finished");
    metrics::counter!(
        "sessions_api_requests_total",
        "route" => route.to_owned(),
        "method" => method.to_owned(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("sessions_api_request_duration_seconds", "route" => route.to_owned())
        .record(elapsed.as_secs_f64());
}

/// A request failed with a server error. `publish_failure` is the broker reason when the
/// command could not be durably queued.
pub fn request_failed(
    error: &dyn std::fmt::Display,
    status: u16,
    publish_failure: Option<&'static str>,
) {
    tracing::warn!(%error, status, "request failed");
    if let Some(reason) = publish_failure {
        metrics::counter!("sessions_api_publish_failures_total", "reason" => reason).increment(1);
    }
}

/// An append was durably queued (confirmed by the broker).
pub fn append_accepted(io: Io) {
    tracing::trace!(io = io.as_str(), "append accepted");
    metrics::counter!("sessions_api_appends_accepted_total", "io" => io.as_str()).increment(1);
}

/// An `in` append was durably queued but not applied within `SESSIONS_IN_APPEND_WAIT_MS`: it was
/// answered `{ok: true}` without its `seq`.
pub fn in_append_answered_without_seq() {
    tracing::debug!("in append answered before the worker applied it");
    metrics::counter!("sessions_api_in_appends_without_seq_total").increment(1);
}

/// One broker message of `commands` commands was published and its confirm (or failure) came
/// back after `elapsed`.
pub fn batch_published(commands: usize, elapsed: Duration, failure: Option<&'static str>) {
    match failure {
        None => tracing::trace!(commands, ?elapsed, "command batch confirmed"),
        Some(reason) => tracing::warn!(commands, ?elapsed, reason, "command batch not confirmed"),
    }
    metrics::histogram!("sessions_api_publish_seconds").record(elapsed.as_secs_f64());
    metrics::histogram!("sessions_api_publish_batch_size").record(commands as f64);
}

/// An SSE reader connected.
pub fn sse_opened() {
    tracing::debug!("SSE reader connected");
    metrics::gauge!("sessions_api_sse_connections").increment(1);
}

/// An SSE reader left (or its deadline passed).
pub fn sse_closed() {
    tracing::debug!("SSE reader disconnected");
    metrics::gauge!("sessions_api_sse_connections").decrement(1);
}

/// The number of live channel feeds of this instance changed.
pub fn live_feeds(count: usize) {
    tracing::trace!(count, "live feeds");
    metrics::gauge!("sessions_api_live_feeds").set(count as f64);
}

/// A request was refused because its environment exhausted its rate limit.
pub fn rate_limited(retry_after_seconds: u64) {
    tracing::debug!(retry_after_seconds, "rate limit exceeded");
    metrics::counter!("sessions_api_rate_limited_total").increment(1);
}

/// A request body its handler did not read to the end (the answer came first). `outcome`:
/// `discarded` (read and thrown away before the answer; the connection stays usable),
/// `too_large` (beyond `SESSIONS_MAX_DISCARD_BYTES`), `timed_out` (slower than
/// `SESSIONS_DISCARD_TIMEOUT_MS`), `failed` (the body broke off), `not_sent` (`Expect:
/// 100-continue`, never asked for); all but `discarded` are answered with `Connection: close`.
pub fn unread_body(outcome: &'static str, elapsed: Duration) {
    tracing::debug!(outcome, ?elapsed, "unread request body");
    metrics::counter!("sessions_api_unread_bodies_total", "outcome" => outcome).increment(1);
}

/// Makes the panic counter visible at 0 before the first panic (so a scrape can tell "no
/// panics" from "not instrumented").
pub fn register_panic_counter() {
    metrics::counter!("sessions_api_panics_total").increment(0);
}

/// A handler panicked; the request was answered 500.
pub fn handler_panicked(message: &str) {
    tracing::error!(panic = message, "request handler panicked");
    metrics::counter!("sessions_api_panics_total").increment(1);
}

/// How the broker adapter reports to the api: connections (counted when they replace a lost
/// one) and partition queues that exist with other arguments.
pub const BROKER: shared::broker::BrokerSignals = shared::broker::BrokerSignals {
    connected: broker_connected,
    queue_arguments_differ,
};

/// The api's broker link connected to `node` (`host:port`); `reconnect`: it replaced a lost
/// connection (the node went away, or a publish failed and the link was rebuilt).
fn broker_connected(connection: &str, node: &str, reconnect: bool) {
    if reconnect {
        tracing::warn!(connection, node, "broker link reconnected");
        metrics::counter!("sessions_api_broker_reconnects_total").increment(1);
    } else {
        tracing::info!(connection, node, "broker connected");
        metrics::counter!("sessions_api_broker_reconnects_total").increment(0);
    }
}

/// A partition queue exists with other arguments than this version declares (e.g. created
/// before `SESSIONS_QUORUM_GROUP_SIZE` or the leader locator): it is used as it is.
fn queue_arguments_differ(queue: &str, error: &str) {
    tracing::warn!(
        queue,
        error,
        "partition queue exists with other arguments; using it as it is (delete and re-declare \
         it when drained to apply the new ones)"
    );
}

/// A writer batch of `records` records was applied and acknowledged.
pub fn writer_batch_acknowledged(records: i64) {
    tracing::trace!(records, "writer batch acknowledged");
    metrics::counter!("sessions_api_writer_batches_total").increment(1);
    metrics::counter!("sessions_api_writer_records_total")
        .increment(u64::try_from(records).unwrap_or_default());
}

/// An `s2s` append session started.
pub fn writer_session_opened() {
    tracing::debug!("writer append session opened");
    metrics::gauge!("sessions_api_writer_sessions").increment(1);
}

/// An `s2s` append session ended with a terminal error (`code`: S2's error code).
pub fn writer_session_failed(code: &'static str) {
    tracing::info!(code, "writer append session ended with an error");
    metrics::counter!("sessions_api_writer_session_errors_total", "code" => code).increment(1);
}

/// An `s2s` append session ended.
pub fn writer_session_closed() {
    tracing::debug!("writer append session closed");
    metrics::gauge!("sessions_api_writer_sessions").decrement(1);
}

/// An HTTP/2 connection idle for `SESSIONS_HTTP2_IDLE_TIMEOUT_MS` was sent a GOAWAY.
pub fn idle_connection_closed() {
    tracing::debug!("idle HTTP/2 connection sent GOAWAY");
    metrics::counter!("sessions_api_idle_connections_closed_total").increment(1);
}

/// A client connection was accepted (within the budget).
pub fn connection_opened() {
    metrics::gauge!("sessions_api_connections").increment(1);
}

/// A client connection ended.
pub fn connection_closed() {
    metrics::gauge!("sessions_api_connections").decrement(1);
}

/// A new connection was closed at once: the api holds `SESSIONS_MAX_CONNECTIONS`.
pub fn connection_refused() {
    tracing::debug!("connection budget full: a new connection was closed");
    metrics::counter!("sessions_api_connections_refused_total").increment(1);
}

/// A connection was closed for taking too long: `header` (request headers not complete within
/// `SESSIONS_HTTP_HEADER_READ_TIMEOUT_MS`, or an idle keep-alive connection) or `no_request` (no
/// request at all, within that time or within a second under connection pressure).
pub fn connection_timed_out(phase: &'static str) {
    tracing::debug!(phase, "connection closed by a timeout");
    metrics::counter!("sessions_api_connection_timeouts_total", "phase" => phase).increment(1);
}

/// The connection budget, once at start (for the dashboard and the alert rule).
pub fn connection_budget(max_connections: usize) {
    metrics::gauge!("sessions_api_connection_budget").set(max_connections as f64);
}

/// A live (SSE) stream was refused: its environment's or its token's cap is reached.
pub fn live_stream_refused(scope: &'static str) {
    tracing::debug!(scope, "live stream refused: cap reached");
    metrics::counter!("sessions_api_sse_refused_total", "scope" => scope).increment(1);
}

/// An append was refused because the instance already handles `SESSIONS_MAX_APPENDS_IN_FLIGHT`.
pub fn append_refused_at_capacity() {
    metrics::counter!("sessions_api_appends_refused_at_capacity_total").increment(1);
}
