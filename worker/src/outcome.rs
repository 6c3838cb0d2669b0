//! THE place where the worker decides what happens to the messages it read: every
//! acknowledgement goes through [`settle`] (partition logs) or [`settle_legacy`] (the previous
//! version's queues, drained after an upgrade).
//!
//! On a partition log an acknowledgement is flow control only: the stored log position (moved
//! in the batch's own transaction) is what says a message was applied, so a message that is
//! not acknowledged is never lost, and one that is acknowledged too early is never skipped.
//! Acknowledging after the commit keeps the reader's prefetch window a bound on what is read
//! but not yet applied; on the embedded default's in-process log it is also what confirms the
//! publishers (there, a publish is answered only after its commit).

use std::collections::HashMap;

use shared::broker::{LegacyMessage, LogDelivery};

/// How the batch that holds some deliveries ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Its transaction committed (including dead letters recorded for poison messages).
    Committed,
    /// The first message a resumed reader got had been applied before (the stored position
    /// says so): acknowledged, not applied again.
    AlreadyApplied,
    /// The offsets fence refused it: another reader applied these messages, or an earlier
    /// batch failed. Its readers restart from the stored positions.
    Fenced,
    /// A transient failure outlasted the retry budget. The reader connection is rebuilt and
    /// every partition re-read from its stored position.
    Abandoned,
}

/// Acts on `outcome` for `deliveries` (in per-partition offset order). Errors are logged: an
/// acknowledgement that fails only costs the reader's credit, and the connection is rebuilt.
pub async fn settle(deliveries: &[LogDelivery], outcome: BatchOutcome) {
    match outcome {
        BatchOutcome::Committed | BatchOutcome::AlreadyApplied => {
            // One acknowledgement per partition: the last delivery, with `multiple`.
            let mut last: HashMap<u16, &LogDelivery> = HashMap::new();
            for delivery in deliveries {
                last.insert(delivery.partition, delivery);
            }
            for delivery in last.values() {
                if let Err(error) = delivery.ack_through().await {
                    tracing::warn!(partition = delivery.partition, %error, "acknowledgement failed; the reader is rebuilt and resumes from the stored position");
                }
            }
        }
        BatchOutcome::Fenced | BatchOutcome::Abandoned => {
            // Not acknowledged: their readers are restarted and read them again from the
            // stored positions; the fence decides what is applied.
        }
    }
}

/// Acknowledges a message of the previous version's quorum queue once it was applied or
/// dead-lettered (its transaction committed): that removes it from the queue. An error leaves
/// it there; the drain stops and reads it again (the fence makes a second apply harmless).
pub async fn settle_legacy(message: &LegacyMessage) -> Result<(), String> {
    message.ack().await.map_err(|error| error.to_string())
}
