//! Command → partition → broker, with group commit, confirms and replies.
//!
//! Each partition has one task and one queue of pending commands. The task takes everything
//! that is waiting (up to `SESSIONS_PUBLISH_BATCH_MAX` commands or 4 MiB), publishes it as ONE
//! broker message, waits for the publisher confirm, and only then answers every request in the
//! batch. While a publish is in flight new commands accumulate, so batches grow with load.
//! `SESSIONS_PUBLISH_LINGER_US` adds a wait after a batch's first command for more to arrive:
//! the broker's cost is mostly per message, so under load fewer, larger messages leave more
//! CPU for everything else. Order within a partition is the order commands were queued.
//!
//! Commands that need the worker's result register a waiter under their command id before they
//! are published; the reply listener completes it when the worker's reply arrives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::broker::{BrokerError, BrokerLink};
use shared::commands::{Command, Envelope, Outcome, Reply};
use shared::domain::partition::partition_of;
use shared::shutdown::TaskTracker;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::error::ApiError;

/// Largest payload of one batched broker message (a single larger command still goes alone).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Commands waiting per partition before submitters wait (backpressure).
const PARTITION_QUEUE_CAPACITY: usize = 4_096;

struct Pending {
    command: Command,
    /// The batch's result, shared by every request in it (a failure keeps its reason).
    done: oneshot::Sender<Result<(), BrokerError>>,
}

type Waiters = Arc<Mutex<HashMap<Uuid, oneshot::Sender<Outcome>>>>;

/// How a partition's task groups commands into one broker message.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommit {
    /// Most commands in one message.
    pub max_commands: usize,
    /// After the first command, how long to wait for more (zero: take only what is waiting).
    pub linger: Duration,
}

/// Publishes commands to their session's partition.
pub struct Publisher {
    partitions: Vec<mpsc::Sender<Pending>>,
    waiters: Waiters,
    reply_timeout: Duration,
    link: Arc<BrokerLink>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("partitions", &self.partitions.len())
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Starts one task per partition and the reply listener. `replies` receives the payloads of
    /// this instance's reply queue (named `reply_queue`).
    pub fn start(
        link: Arc<BrokerLink>,
        reply_queue: String,
        replies: mpsc::UnboundedReceiver<Vec<u8>>,
        group_commit: GroupCommit,
        reply_timeout: Duration,
        tasks: &TaskTracker,
    ) -> Self {
        let partition_count = link.names().partitions;
        let mut partitions = Vec::with_capacity(usize::from(partition_count));
        for partition in 0..partition_count {
            let (sender, receiver) = mpsc::channel(PARTITION_QUEUE_CAPACITY);
            partitions.push(sender);
            tasks.spawn(publish_partition(
                link.clone(),
                partition,
                receiver,
                group_commit,
                reply_queue.clone(),
            ));
        }
        let waiters: Waiters = Arc::default();
        tasks.spawn(listen_for_replies(replies, waiters.clone()));
        Self {
            partitions,
            waiters,
            reply_timeout,
            link,
        }
    }

    pub fn link(&self) -> &BrokerLink {
        &self.link
    }

    /// Publishes `command` and returns once the broker confirmed the message that carries it.
    pub async fn submit(&self, command: Command) -> Result<(), ApiError> {
        let partition = partition_of(command.session_id, self.link.names().partitions);
        let sender = self
            .partitions
            .get(usize::from(partition))
            .ok_or_else(|| ApiError::Internal(format!("no publisher for partition {partition}")))?;
        let (done, confirmed) = oneshot::channel();
        sender
            .send(Pending { command, done })
            .await
            .map_err(|_| ApiError::Internal("publisher stopped".into()))?;
        match confirmed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failure)) => Err(ApiError::Broker(failure)),
            Err(_) => Err(ApiError::Internal("publisher dropped a command".into())),
        }
    }

    /// Publishes `command` (marked as wanting a reply) and waits for the worker's outcome.
    pub async fn submit_and_wait(self: &Arc<Self>, command: Command) -> Result<Outcome, ApiError> {
        self.submit_and_wait_for(command, self.reply_timeout).await
    }

    /// As [`Publisher::submit_and_wait`], waiting at most `timeout` for the reply.
    pub async fn submit_and_wait_for(
        self: &Arc<Self>,
        command: Command,
        timeout: Duration,
    ) -> Result<Outcome, ApiError> {
        self.submit_then_reply(command, timeout).await?.await
    }

    /// Publishes `command` (marked as wanting a reply) and returns once the broker confirmed it,
    /// with a future of the worker's outcome (at most `timeout` from now; dropping it forgets
    /// the reply). A caller that submits this way one command after another gets them into
    /// the partition log in that order, and none after one that failed to publish.
    pub async fn submit_then_reply(
        self: &Arc<Self>,
        mut command: Command,
        timeout: Duration,
    ) -> Result<impl Future<Output = Result<Outcome, ApiError>> + Send + 'static, ApiError> {
        command.wants_reply = true;
        let command_id = command.id;
        let (reply_sender, reply) = oneshot::channel();
        self.lock_waiters().insert(command_id, reply_sender);
        let forget = ForgetReply {
            publisher: self.clone(),
            command_id,
        };
        self.submit(command).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        Ok(async move {
            let outcome = match tokio::time::timeout_at(deadline, reply).await {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(_)) | Err(_) => Err(ApiError::ReplyTimeout),
            };
            drop(forget);
            outcome
        })
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, oneshot::Sender<Outcome>>> {
        // A poisoned lock only means another request panicked mid-insert; the map is still valid.
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes a reply waiter however its wait ends (answered, timed out, or abandoned).
struct ForgetReply {
    publisher: Arc<Publisher>,
    command_id: Uuid,
}

impl Drop for ForgetReply {
    fn drop(&mut self) {
        self.publisher.lock_waiters().remove(&self.command_id);
    }
}

async fn publish_partition(
    link: Arc<BrokerLink>,
    partition: u16,
    mut receiver: mpsc::Receiver<Pending>,
    group_commit: GroupCommit,
    reply_queue: String,
) {
    while let Some(first) = receiver.recv().await {
        let linger_until = tokio::time::Instant::now() + group_commit.linger;
        let mut bytes = first.command_size();
        let mut batch = vec![first];
        while batch.len() < group_commit.max_commands && bytes < MAX_BATCH_BYTES {
            let next = match receiver.try_recv() {
                Ok(next) => next,
                Err(mpsc::error::TryRecvError::Empty) if !group_commit.linger.is_zero() => {
                    match tokio::time::timeout_at(linger_until, receiver.recv()).await {
                        Ok(Some(next)) => next,
                        Ok(None) | Err(_) => break,
                    }
                }
                Err(_) => break,
            };
            bytes += next.command_size();
            batch.push(next);
        }
        let wants_reply = batch.iter().any(|pending| pending.command.wants_reply);
        let (commands, done): (Vec<Command>, Vec<_>) = batch
            .into_iter()
            .map(|pending| (pending.command, pending.done))
            .unzip();
        let count = commands.len();
        let payload = Envelope::new(commands).encode();
        let started = Instant::now();
        let result = link
            .publish_commands(
                partition,
                &Uuid::now_v7().to_string(),
                wants_reply.then_some(reply_queue.as_str()),
                &payload,
            )
            .await;
        crate::signals::batch_published(
            count,
            started.elapsed(),
            result.as_ref().err().map(BrokerError::reason),
        );
        for done in done {
            let _ = done.send(result.clone());
        }
    }
}

impl Pending {
    fn command_size(&self) -> usize {
        match &self.command.body {
            shared::commands::CommandBody::Append(append) => append.body.len() + 256,
            shared::commands::CommandBody::AppendRecords(batch) => batch.size() + 256,
            _ => 1024,
        }
    }
}

async fn listen_for_replies(mut replies: mpsc::UnboundedReceiver<Vec<u8>>, waiters: Waiters) {
    while let Some(payload) = replies.recv().await {
        let Ok(replies) = serde_json::from_slice::<Vec<Reply>>(&payload) else {
            tracing::warn!("ignoring an unreadable reply message");
            continue;
        };
        let mut waiters = waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for reply in replies {
            if let Some(waiter) = waiters.remove(&reply.command_id) {
                let _ = waiter.send(reply.outcome);
            }
        }
    }
}
