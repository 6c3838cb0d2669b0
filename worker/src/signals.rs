//! Every instrumentation point of the worker, each defined once: a function per event that
//! writes its log line and records its metric together, so the two never drift apart and the
//! list of what the worker reports is this file. Labels are low-cardinality (never ids).
//!
//! What does not live here: the partition gauges (state, not events: `assignment`), and the
//! process gauges shared with the api (`shared::telemetry`).

use std::fmt::Display;
use std::time::Duration;

use shared::commands::{Command, Outcome};

/// The consumer connection is being rebuilt (`delay`: the backoff before the next attempt).
pub fn reconnecting(reason: &dyn Display, delay: Duration) {
    tracing::warn!(%reason, ?delay, "consumer connection lost or not available; reconnecting");
    metrics::counter!("sessions_worker_reconnects_total").increment(1);
}

/// A batch of broker messages was taken for one transaction.
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
    for command in commands {
        let lag = (applied_at - command.accepted_at)
            .num_microseconds()
            .unwrap_or(0) as f64
            / 1e6;
        metrics::histogram!("sessions_worker_command_lag_seconds", "kind" => command.body.kind_name())
            .record(lag.max(0.0));
    }
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

/// A message was moved to the dead-letter queue with `reason`.
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

/// This worker handed `partition` back to its home worker.
pub fn partition_handed_back(partition: u16, home_worker: u16) {
    tracing::info!(
        partition,
        home_worker,
        "handed a partition back to its home worker"
    );
    metrics::counter!("sessions_worker_partition_hand_backs_total").increment(1);
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

/// A partition queue exists with other arguments than this version declares: used as it is.
fn queue_arguments_differ(queue: &str, error: &str) {
    tracing::warn!(
        queue,
        error,
        "partition queue exists with other arguments; using it as it is (delete and re-declare \
         it when drained to apply the new ones)"
    );
}
