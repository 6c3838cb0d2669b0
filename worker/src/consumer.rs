//! Partition consumption and micro-batching.
//!
//! One connection carries a channel per partition with prefetch 1, so each partition has at
//! most one unacknowledged message. The ready messages of all partitions are applied together:
//! one Redis pipeline of claims, one database transaction, then replies, events and acks.
//! Up to `SESSIONS_WORKER_APPLY_LANES` such batches run at once (the worker is bound by round
//! trips, not CPU); they never share a partition, because a partition's next message is only
//! delivered after the previous one is acked. Per-session order holds because a session lives
//! on one partition and a message keeps its commands in acceptance order.
//!
//! Which partitions this worker subscribes, and when it hands one back, is decided in
//! [`crate::assignment`]; this loop acts on it between batches.
//!
//! A supervisor loop rebuilds the connection and consumers after any failure. Transient apply
//! failures are retried with backoff while the deliveries are held; past the retry budget the
//! connection is closed (the messages return to the head of their queues) and the worker pauses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use shared::broker::{
    BrokerConfig, BrokerLink, InProcessBroker, Incoming, PartitionConsumers, WorkerPresence,
};
use shared::cache::Cache;
use shared::commands::{Command, CommandBody, Envelope, NewRecords, Outcome, Reply};
use shared::config::Settings;
use shared::domain::dedup::DedupKey;
use shared::storage::{OutboxEventRow, StorageError, Store};
use tokio::sync::{mpsc, watch};

use crate::apply::plan_batch;
use crate::assignment::PartitionAssignment;
use crate::outcome::{MessageResult, settle};
use crate::signals;

/// Why the consume loop returned.
enum LoopEnd {
    Shutdown,
    ConnectionBroken,
    RetryBudgetExhausted,
}

/// Everything the worker needs, shared by its tasks.
pub struct WorkerContext {
    pub settings: Settings,
    pub store: Store,
    pub cache: Cache,
    pub link: BrokerLink,
    /// Names this worker in claims and consumer tags.
    pub instance: String,
    /// The embedded default's in-process broker (`None`: RabbitMQ).
    pub in_process: Option<Arc<InProcessBroker>>,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// Runs until `shutdown` turns true: consume, apply, ack; rebuild on failure.
pub async fn run(context: Arc<WorkerContext>, mut shutdown: watch::Receiver<bool>) {
    let config = BrokerConfig::from_settings(
        &context.settings,
        format!("{}-consumer", context.instance),
        context.in_process.clone(),
    )
    .with_signals(signals::BROKER);
    let reconnect = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times();
    let mut delays = backon::BackoffBuilder::build(reconnect);
    while !*shutdown.borrow() {
        let (sink, deliveries) = mpsc::channel(usize::from(context.settings.partitions) * 2);
        let mut assignment = PartitionAssignment::new(&context.settings, Instant::now());
        let mut consumers = match connect_home(&context, &config, sink, &mut assignment).await {
            Ok(consumers) => consumers,
            Err(error) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                signals::reconnecting(&error, delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        delays = backon::BackoffBuilder::build(reconnect);
        let end = consume_loop(
            &context,
            deliveries,
            &mut consumers,
            &mut assignment,
            &mut shutdown,
        )
        .await;
        consumers.close().await;
        PartitionAssignment::clear_gauges();
        match end {
            LoopEnd::Shutdown => break,
            LoopEnd::ConnectionBroken => {
                let delay = Duration::from_millis(200);
                signals::reconnecting(&"a partition consumer stopped", delay);
                tokio::time::sleep(delay).await;
            }
            LoopEnd::RetryBudgetExhausted => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
    tracing::info!("worker stopped consuming");
}

/// Connects, subscribes the home partitions, then announces this worker's presence (the other
/// workers hand its partitions back only once it is present).
async fn connect_home(
    context: &WorkerContext,
    config: &BrokerConfig,
    sink: mpsc::Sender<Incoming>,
    assignment: &mut PartitionAssignment,
) -> Result<PartitionConsumers, shared::broker::BrokerError> {
    let mut consumers = PartitionConsumers::connect(config, &context.instance, sink).await?;
    for partition in assignment.home_partitions() {
        consumers.subscribe(partition).await?;
        assignment.subscribed(partition);
    }
    if assignment.is_shared()
        && !consumers
            .announce_presence(assignment.worker_index())
            .await?
    {
        tracing::error!(
            worker_index = assignment.worker_index(),
            "another connected worker has the same WORKER_INDEX; partitions are still applied \
             correctly, but not balanced: give every worker its own index"
        );
    }
    tracing::info!(
        worker_index = assignment.worker_index(),
        home_partitions = assignment.home_partitions().len(),
        "consuming home partitions; the others follow as standby"
    );
    assignment.record_gauges();
    Ok(consumers)
}

/// How often the loop looks at standby subscriptions and hand-backs when no message arrives.
const ASSIGNMENT_TICK: Duration = Duration::from_millis(500);

async fn consume_loop(
    context: &WorkerContext,
    mut deliveries: mpsc::Receiver<Incoming>,
    consumers: &mut PartitionConsumers,
    assignment: &mut PartitionAssignment,
    shutdown: &mut watch::Receiver<bool>,
) -> LoopEnd {
    let mut tick = tokio::time::interval(ASSIGNMENT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lanes = context.settings.worker_apply_lanes;
    // Batches being applied. They never share a partition: a partition's next message is only
    // delivered once its previous one is acked (prefetch 1), so concurrent transactions touch
    // disjoint sessions and per-session order holds.
    let mut in_flight = FuturesUnordered::new();
    let mut ending: Option<LoopEnd> = None;
    // Standby subscriptions and hand-backs happen between batches only: when one is due, no new
    // batch starts until the lanes are empty.
    let mut rebalance_due = false;
    loop {
        if rebalance_due && in_flight.is_empty() && ending.is_none() {
            rebalance_due = false;
            if let Err(error) = rebalance(consumers, assignment).await {
                tracing::warn!(%error, "partition subscription failed; reconnecting");
                ending = Some(LoopEnd::ConnectionBroken);
            }
        }
        if let Some(end) = ending.take() {
            // Let the batches already applying finish (and settle their messages) first.
            while let Some(result) = in_flight.next().await {
                if let Err(BudgetExhausted) = result {
                    tracing::debug!("another batch also exhausted its retry budget");
                }
            }
            return end;
        }
        let take_more = in_flight.len() < lanes && !rebalance_due;
        let first = tokio::select! {
            _ = shutdown.changed() => { ending = Some(LoopEnd::Shutdown); continue; }
            _ = consumers.broken() => { ending = Some(LoopEnd::ConnectionBroken); continue; }
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(BudgetExhausted) = result {
                    ending = Some(LoopEnd::RetryBudgetExhausted);
                } else if *shutdown.borrow() {
                    ending = Some(LoopEnd::Shutdown);
                }
                continue;
            }
            _ = tick.tick() => {
                rebalance_due = assignment.is_shared();
                continue;
            }
            first = deliveries.recv(), if take_more => match first {
                Some(first) => first,
                None => { ending = Some(LoopEnd::ConnectionBroken); continue; }
            },
        };
        let mut batch = vec![first];
        while batch.len() < context.settings.worker_batch_max {
            match deliveries.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A delivery of a handed-back channel went back to its queue; its new consumer applies
        // it in order. Never apply or ack the stale copy.
        batch.retain(|incoming| consumers.is_current(incoming));
        if batch.is_empty() {
            continue;
        }
        let now = Instant::now();
        for incoming in &batch {
            assignment.delivered(incoming.partition, now);
        }
        in_flight.push(process_batch(context, batch));
    }
}

/// Subscribes due standby partitions and hands back other workers' partitions whose home worker
/// is present. Runs between batches only.
async fn rebalance(
    consumers: &mut PartitionConsumers,
    assignment: &mut PartitionAssignment,
) -> Result<(), shared::broker::BrokerError> {
    if !assignment.is_shared() {
        return Ok(());
    }
    let now = Instant::now();
    let mut presence: HashMap<u16, WorkerPresence> = HashMap::new();
    for partition in assignment.hand_back_candidates(now) {
        let home = assignment.home_of(partition);
        let present = match presence.get(&home) {
            Some(known) => *known,
            None => {
                let asked = consumers.presence_of(home).await;
                presence.insert(home, asked);
                asked
            }
        };
        if present == WorkerPresence::Present {
            consumers.hand_back(partition).await;
            assignment.handed_back(partition, now);
            signals::partition_handed_back(partition, home);
        }
    }
    let due = assignment.due_standby_subscriptions(now);
    for &partition in &due {
        consumers.subscribe(partition).await?;
        assignment.subscribed(partition);
    }
    if !due.is_empty() {
        tracing::debug!(partitions = due.len(), "subscribed standby partitions");
    }
    assignment.record_gauges();
    Ok(())
}

struct BudgetExhausted;

/// A decoded message and its commands.
struct Decoded {
    incoming: Incoming,
    commands: Vec<Command>,
}

async fn process_batch(
    context: &WorkerContext,
    batch: Vec<Incoming>,
) -> Result<(), BudgetExhausted> {
    signals::batch_taken(batch.len());
    let mut decoded = Vec::with_capacity(batch.len());
    for incoming in batch {
        match Envelope::decode(&incoming.payload) {
            Ok(envelope) => decoded.push(Decoded {
                incoming,
                commands: envelope.commands,
            }),
            Err(error) => {
                settle(
                    &context.link,
                    &incoming,
                    MessageResult::Poison(error.to_string()),
                )
                .await;
            }
        }
    }
    if decoded.is_empty() {
        return Ok(());
    }
    match apply_messages(context, &decoded).await {
        Ok(()) => Ok(()),
        Err(ApplyFailure::Transient) => {
            for message in &decoded {
                settle(&context.link, &message.incoming, MessageResult::Abandoned).await;
            }
            Err(BudgetExhausted)
        }
        Err(ApplyFailure::Permanent(reason)) if decoded.len() == 1 => {
            settle(
                &context.link,
                &decoded[0].incoming,
                MessageResult::Poison(reason),
            )
            .await;
            Ok(())
        }
        Err(ApplyFailure::Permanent(reason)) => {
            // Isolate the culprit: apply the messages one by one.
            tracing::warn!(%reason, "batch failed permanently; applying its messages one by one");
            for message in decoded {
                let single = [message];
                match apply_messages(context, &single).await {
                    Ok(()) => {}
                    Err(ApplyFailure::Transient) => {
                        settle(&context.link, &single[0].incoming, MessageResult::Abandoned).await;
                        return Err(BudgetExhausted);
                    }
                    Err(ApplyFailure::Permanent(reason)) => {
                        settle(
                            &context.link,
                            &single[0].incoming,
                            MessageResult::Poison(reason),
                        )
                        .await;
                    }
                }
            }
            Ok(())
        }
    }
}

enum ApplyFailure {
    Transient,
    Permanent(String),
}

/// Claims, applies in one transaction (retrying transient failures), then publishes events,
/// replies, releases claims and acks.
async fn apply_messages(context: &WorkerContext, messages: &[Decoded]) -> Result<(), ApplyFailure> {
    let commands: Vec<Command> = messages
        .iter()
        .flat_map(|message| message.commands.iter().cloned())
        .collect();
    let claims = claim_parts(context, &commands).await;

    let started = Instant::now();
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .with_total_delay(Some(context.settings.retry_budget))
        .without_max_times();
    let applied = (|| async {
        context
            .store
            .apply_batch(&commands, |state| plan_batch(&commands, state))
            .await
    })
    .retry(policy)
    .when(StorageError::is_transient)
    .notify(|error, delay| signals::apply_retrying(error, delay))
    .await;
    release_claims(context, &claims).await;
    let (outcomes, outbox) = match applied {
        Ok(result) => result,
        Err(error) if error.is_transient() => return Err(ApplyFailure::Transient),
        Err(error) => return Err(ApplyFailure::Permanent(error.to_string())),
    };
    signals::batch_committed(&commands, started.elapsed());
    let appended_records = outcomes
        .iter()
        .any(|outcome| matches!(outcome, Outcome::Appended { .. }));
    if appended_records && context.settings.test_failpoint.as_deref() == Some("abort_after_commit")
    {
        // Test-only: die between persisting records and everything that follows (events,
        // replies, acks).
        tracing::error!("SESSIONS_TEST_FAILPOINT=abort_after_commit: aborting");
        std::process::abort();
    }

    let completed = outbox
        .iter()
        .filter(|event| event.routing_key == shared::domain::waitpoint::WAITPOINT_COMPLETED)
        .count();
    signals::waitpoints_completed(completed);
    publish_outbox(context, outbox).await;

    let new_records = NewRecords::from_outcomes(&commands, &outcomes);
    let mut offset = 0;
    for message in messages {
        let outcomes_of_message = &outcomes[offset..offset + message.commands.len()];
        offset += message.commands.len();
        send_replies(context, message, outcomes_of_message).await;
        settle(
            &context.link,
            &message.incoming,
            MessageResult::Applied {
                commands: &message.commands,
                outcomes: outcomes_of_message,
            },
        )
        .await;
    }
    if !new_records.channels.is_empty() {
        let payload = serde_json::to_vec(&new_records).unwrap_or_default();
        if let Err(error) = context.link.publish_notification(&payload).await {
            tracing::debug!(%error, "notification lost; readers catch up on their safety re-read");
        }
    }
    Ok(())
}

/// Claims the part ids of the batch's appends in Redis (fast path). Failures only cost the fast
/// path: the database's unique constraint is the fence.
async fn claim_parts(context: &WorkerContext, commands: &[Command]) -> Vec<(String, String)> {
    let claims: Vec<(String, String)> = commands
        .iter()
        .filter_map(|command| match &command.body {
            CommandBody::Append(append) => append.part_id.as_ref().map(|part_id| {
                let key = DedupKey {
                    environment_id: command.environment_id,
                    session_id: command.session_id,
                    io: append.io,
                    part_id: part_id.clone(),
                };
                (
                    context.cache.claim_key(&key),
                    format!("{}:{}", context.instance, command.id),
                )
            }),
            _ => None,
        })
        .collect();
    match context
        .cache
        .claim_many(&claims, context.settings.claim_ttl)
        .await
    {
        Ok(results) => {
            let contended = results.iter().filter(|claimed| !**claimed).count();
            signals::claims_contended(contended);
            claims
                .into_iter()
                .zip(results)
                .filter_map(|(claim, claimed)| claimed.then_some(claim))
                .collect()
        }
        Err(error) => {
            tracing::warn!(%error, "dedup claims unavailable; relying on the database fence");
            Vec::new()
        }
    }
}

async fn release_claims(context: &WorkerContext, claims: &[(String, String)]) {
    if let Err(error) = context.cache.release_many(claims).await {
        tracing::warn!(%error, "could not release dedup claims; they expire on their own");
    }
}

/// Publishes committed outbox events and removes them. Failures leave them to the sweeper.
pub async fn publish_outbox(context: &WorkerContext, events: Vec<OutboxEventRow>) {
    let mut published = Vec::with_capacity(events.len());
    for event in events {
        let payload = serde_json::to_vec(&event.payload).unwrap_or_default();
        match context
            .link
            .publish_event(&event.routing_key, &payload)
            .await
        {
            Ok(()) => published.push(event.id),
            Err(error) => {
                tracing::warn!(%error, routing_key = %event.routing_key, "event publish failed; the outbox sweeper retries");
                break;
            }
        }
    }
    if let Err(error) = context.store.delete_outbox_events(&published).await {
        tracing::warn!(%error, "could not delete published outbox events; they may be published again");
    }
}

/// Re-publishes outbox events left behind by a crash between commit and publish.
pub async fn sweep_outbox(context: Arc<WorkerContext>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        // Younger events are still being published by the batch that wrote them.
        let older_than = chrono::Utc::now() - chrono::TimeDelta::seconds(5);
        match context.store.stale_outbox_events(older_than, 500).await {
            Ok(events) if !events.is_empty() => publish_outbox(&context, events).await,
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "outbox sweep failed"),
        }
    }
}

/// Sends the outcomes of the commands that asked for a reply, as one reply message.
async fn send_replies(context: &WorkerContext, message: &Decoded, outcomes: &[Outcome]) {
    let Some(reply_to) = message.incoming.reply_to.as_deref() else {
        return;
    };
    let replies: Vec<Reply> = message
        .commands
        .iter()
        .zip(outcomes)
        .filter(|(command, _)| command.wants_reply)
        .map(|(command, outcome)| Reply {
            command_id: command.id,
            outcome: outcome.clone(),
        })
        .collect();
    if replies.is_empty() {
        return;
    }
    let payload = serde_json::to_vec(&replies).unwrap_or_default();
    if let Err(error) = context.link.publish_reply(reply_to, &payload).await {
        tracing::warn!(%error, "reply lost; the api answers its caller with a timeout");
    }
}
