//! THE place where the worker decides what happens to a broker message: ack it, dead-letter it,
//! or leave it unacknowledged for redelivery. Every such decision goes through [`settle`].

use shared::broker::{BrokerLink, Incoming};
use shared::commands::{Command, Outcome};

use crate::signals;

/// What processing one broker message came to.
#[derive(Debug)]
pub enum MessageResult<'a> {
    /// Every command was applied (or deterministically rejected) and committed.
    Applied {
        commands: &'a [Command],
        outcomes: &'a [Outcome],
    },
    /// The message can never be processed: undecodable, or a permanent error. Dead-lettered
    /// with the reason.
    Poison(String),
    /// A transient failure outlasted the retry budget. Left unacknowledged: closing the channel
    /// puts it back at the head of its partition, order intact.
    Abandoned,
}

/// Acts on `result` for `incoming`. Errors are logged: an ack that fails means a redelivery,
/// which the idempotent apply absorbs.
pub async fn settle(link: &BrokerLink, incoming: &Incoming, result: MessageResult<'_>) {
    match result {
        MessageResult::Applied { commands, outcomes } => {
            signals::commands_settled(commands, outcomes);
            if let Err(error) = incoming.ack().await {
                tracing::warn!(partition = incoming.partition, %error, "ack failed; the message will be redelivered and deduplicated");
            }
        }
        MessageResult::Poison(reason) => {
            match link
                .publish_dead_letter(
                    &incoming.payload,
                    incoming.message_id.as_deref(),
                    incoming.partition,
                    &reason,
                )
                .await
            {
                Ok(()) => {
                    signals::dead_lettered(
                        incoming.partition,
                        incoming.message_id.as_deref(),
                        &reason,
                    );
                    if let Err(error) = incoming.ack().await {
                        tracing::warn!(%error, "ack after dead-lettering failed");
                    }
                }
                Err(error) => {
                    // Not acked: the broker redelivers it, and its delivery limit dead-letters
                    // it if this keeps failing.
                    tracing::error!(%error, %reason, "could not dead-letter; leaving the message for redelivery");
                }
            }
        }
        MessageResult::Abandoned => {
            tracing::warn!(
                partition = incoming.partition,
                "retry budget exhausted; handing the message back for redelivery"
            );
        }
    }
}
