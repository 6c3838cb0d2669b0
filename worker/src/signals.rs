//! Every instrumentation point of the worker, each defined once: a function per event that
//! writes its log line and records its metric together, so the two never drift apart and the
//! list of what the worker reports is this file. Labels are low-cardinality (never ids).
//!
//! What does not live here: the partition gauges (state, not events: `ownership`), and the
//! process gauges shared with the api (`shared::telemetry`).

use std::fmt::Display;
use std::time::Duration;

use shared::commands::{Command, Outcome};

/// The consumer connection is being rebuilt (`delay`: the backoff before the next attempt).
pub fn reconnecting(reason: &dyn Display, delay: Duration) {
    tracing::warn!(%reason, ?delay, "consumer connection lost or not available; reconnecting");
    metrics::counter!("sessions_worker_reconnects_total").increment(1);
}

/// A batch of partition log messages was taken for one transaction.
pub fn batch_taken(messages: usize) {
    tracing::trace!(messages, "applying a batch");
    metrics::histogram!("sessions_worker_batch_size").record(messages as f64);
}

/// A transient failure of the apply transaction; retried while the deliveries are held.
pub fn apply_retrying(error: &dyn Display, delay: Duration) {
    tracing::warn!(%error, ?delay, "apply failed; retrying while holding the deliveries");
    metrics::counter!("sessions_worker_apply_retries_total").increment(1);
}

/// The apply transaction of a batch committed after `elapsed`.
pub fn batch_committed(commands: &[Command], elapsed: Duration) {
    tracing::debug!(commands = commands.len(), ?elapsed, "batch committed");
    metrics::histogram!("sessions_worker_apply_seconds").record(elapsed.as_secs_f64());
    let applied_at = chrono::Utc::now();
    let mut oldest = 0.0_f64;
    for command in commands {
        let lag = (applied_at - command.accepted_at)
            .num_microseconds()
            .unwrap_or(0) as f64
            / 1e6;
        oldest = oldest.max(lag);
        metrics::histogram!("sessions_worker_command_lag_seconds", "kind" => command.body.kind_name())
            .record(lag.max(0.0));
    }
    if !commands.is_empty() {
        // How far behind the partition logs this worker applies: compared with the logs'
        // retention by the alert `SessionsLogLagNearRetention`.
        metrics::gauge!("sessions_worker_log_lag_seconds").set(oldest);
    }
}

/// The partition logs' retention by age, for the alert that compares it with the lag.
pub fn log_retention(max_age: &str) {
    let seconds = retention_seconds(max_age);
    tracing::info!(max_age, seconds, "partition log retention");
    metrics::gauge!("sessions_worker_log_retention_seconds").set(seconds);
}

/// `7D`, `24h`, ... in seconds (RabbitMQ counts a month as 30 days and a year as 365).
fn retention_seconds(max_age: &str) -> f64 {
    let (number, unit) = max_age.split_at(max_age.len().saturating_sub(1));
    let number: f64 = number.parse().unwrap_or(0.0);
    let unit = match unit {
        "Y" => 365.0 * 86_400.0,
        "M" => 30.0 * 86_400.0,
        "D" => 86_400.0,
        "h" => 3_600.0,
        "m" => 60.0,
        _ => 1.0,
    };
    number * unit
}

/// A partition log's first message after a reader resumed is not the last applied one:
/// messages between them may have been removed by retention (or the log was declared anew).
/// The partition stops; nothing is skipped silently.
pub fn log_gap(partition: u16, log: &str, expected: &str, found: &str) {
    tracing::error!(
        partition,
        log,
        expected,
        found,
        "partition log gap: messages that were never applied are no longer in the log; the \
         partition is stopped. See README, \"A partition stopped at a gap\" (sessions-worker \
         admin logs accept-gap)"
    );
    metrics::counter!("sessions_worker_log_gaps_total").increment(1);
}

/// A batch was refused by the offsets fence (another reader applied its messages first, or
/// an earlier batch failed); its partitions are re-read from the stored positions.
pub fn batch_fenced(reason: &str) {
    tracing::info!(%reason, "batch refused by the partition log fence; re-reading");
    metrics::counter!("sessions_worker_batches_fenced_total").increment(1);
}

/// The commands of one acknowledged message, by outcome (applied, duplicate, conflict, …).
pub fn commands_settled(commands: &[Command], outcomes: &[Outcome]) {
    for (command, outcome) in commands.iter().zip(outcomes) {
        let kind = command.body.kind_name();
        tracing::trace!(kind, outcome = outcome.name(), "command settled");
        metrics::counter!("sessions_worker_commands_total", "kind" => kind, "outcome" => outcome.name())
            .increment(1);
    }
}

/// A message that can never be applied was recorded in `dead_letters` with `reason`, in the
/// transaction that moved its partition past it.
pub fn dead_lettered(partition: u16, message_id: Option<&str>, reason: &str) {
    tracing::error!(
        partition,
        message_id = message_id.unwrap_or(""),
        %reason,
        "dead-lettered a command message"
    );
    metrics::counter!("sessions_worker_dead_letters_total").increment(1);
    // A poison message may not even decode, so its commands' kinds are unknown.
    metrics::counter!("sessions_worker_commands_total", "kind" => "unknown", "outcome" => "dead_lettered")
        .increment(1);
}

/// Waitpoints completed by appends of a batch.
pub fn waitpoints_completed(count: usize) {
    if count > 0 {
        tracing::debug!(count, "waitpoints completed");
        metrics::counter!("sessions_worker_waitpoints_completed_total").increment(count as u64);
    }
}

/// Waitpoints that reached their timeout.
pub fn waitpoints_timed_out(count: usize) {
    if count > 0 {
        tracing::info!(count, "waitpoints timed out");
        metrics::counter!("sessions_worker_waitpoints_timed_out_total").increment(count as u64);
    }
}

/// Redis claims held by another owner (failover overlap); the database fence decides.
pub fn claims_contended(count: usize) {
    if count > 0 {
        tracing::debug!(count, "dedup claims held by another worker");
        metrics::counter!("sessions_worker_claims_contended_total").increment(count as u64);
    }
}

/// This worker took the lease of `partition` and reads its log.
pub fn partition_taken(partition: u16, home: bool) {
    tracing::info!(partition, home, "reading a partition log");
    metrics::counter!("sessions_worker_partition_takeovers_total", "role" => if home { "home" } else { "foreign" })
        .increment(1);
}

/// This worker lost the lease of `partition` (its home worker took it back, or this worker
/// could not renew it in time) and stopped reading its log.
pub fn partition_released(partition: u16, home: bool) {
    tracing::info!(
        partition,
        home,
        "stopped reading a partition log (lease lost)"
    );
    metrics::counter!("sessions_worker_partition_hand_backs_total").increment(1);
}

/// A partition queue of the version before partition logs was drained (`applied` messages)
/// and deleted.
pub fn legacy_queue_drained(partition: u16, applied: usize) {
    tracing::info!(
        partition,
        applied,
        "legacy partition queue drained and deleted"
    );
}

/// How the broker adapter reports to the worker: which node each connection reached, and
/// partition queues that exist with other arguments. Consumer reconnects are counted by
/// [`reconnecting`].
pub const BROKER: shared::broker::BrokerSignals = shared::broker::BrokerSignals {
    connected: broker_connected,
    queue_arguments_differ,
};

/// A connection of this worker (consumer or publisher) reached `node` (`host:port`).
fn broker_connected(connection: &str, node: &str, reconnect: bool) {
    tracing::info!(connection, node, reconnect, "broker connected");
}

/// A partition log exists with other arguments than this version declares (other retention
/// or replica settings): used as it is.
fn queue_arguments_differ(queue: &str, error: &str) {
    tracing::warn!(
        queue,
        error,
        "partition log exists with other arguments; using it as it is (change a stream's \
         retention with a RabbitMQ policy)"
    );
}

/// Records below their stream's trim point were deleted.
pub fn trimmed_records_deleted(records: u64) {
    tracing::debug!(records, "deleted records below their trim point");
    metrics::counter!("sessions_trimmed_records_deleted_total").increment(records);
}

/// A retention purge round deleted `purged` (sessions past `SESSIONS_RETENTION_AFTER_CLOSE_SECONDS`).
pub fn purged(purged: &shared::storage::RowsPurged, took: Duration) {
    tracing::info!(
        sessions = purged.sessions,
        records = purged.records,
        ?took,
        "purged sessions past the retention"
    );
    metrics::counter!("sessions_purged_total").increment(purged.sessions);
    for (table, rows) in purged.by_table() {
        metrics::counter!("sessions_purged_rows_total", "table" => table).increment(rows);
    }
    metrics::histogram!("sessions_purge_round_seconds").record(took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    #[test]
    fn retention_ages_are_read_in_seconds() {
        assert_eq!(super::retention_seconds("7D"), 7.0 * 86_400.0);
        assert_eq!(super::retention_seconds("24h"), 86_400.0);
        assert_eq!(super::retention_seconds("90m"), 5_400.0);
        assert_eq!(super::retention_seconds("30s"), 30.0);
        assert_eq!(super::retention_seconds("1Y"), 365.0 * 86_400.0);
    }
}
