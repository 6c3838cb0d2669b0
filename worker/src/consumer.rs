//! Reading partition logs and applying them in batches.
//!
//! The worker reads every partition log it holds a lease on ([`crate::ownership`]) from the
//! position stored in the database, at depth (`SESSIONS_WORKER_PREFETCH` messages ahead). Its
//! partitions are dealt out over its apply lanes (`SESSIONS_WORKER_APPLY_LANES`); each lane
//! applies whatever has arrived for its partitions in one database transaction at a time
//! (while one Redis pipeline takes the batch's claims): the transaction first moves each log's
//! stored position forward with a compare-and-set (the offsets fence), then writes; after the
//! commit it publishes events, replies and the "new records" notification (while the claims
//! are released), and acknowledges (on a stream, an acknowledgement is only flow control). The
//! next batch is read while one commits, and applied while the one before finishes its work
//! after commit ([`AfterCommit`]): none of that work decides anything.
//!
//! Order and exactly-once application come from the fence alone: a batch commits only if every
//! log it read is still where the batch started, so a failover, a restart or two workers on one
//! partition can neither reorder nor double-apply; the loser drops its batch and re-reads from
//! the stored position. Per-session order holds because a session lives on one partition and a
//! message keeps its commands in acceptance order.
//!
//! Failures: a transient one (database or Redis down, serialization failure) is retried in
//! place with backoff; past `SESSIONS_RETRY_BUDGET_MS` the reader connection is rebuilt and
//! every partition re-read from its stored position. A message that can never be applied
//! (undecodable, or a deterministic database error, isolated by applying the batch's messages
//! one by one) is recorded in `dead_letters` in the transaction that moves past it. A reader
//! whose first message shows a gap (retention removed messages not yet applied) stops that
//! partition and says so ([`crate::signals::log_gap`]); it never skips silently.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use shared::broker::{BrokerConfig, BrokerLink, LegacyPartitionQueues, LogDelivery, PartitionLogs};
use shared::cache::Cache;
use shared::commands::{Command, CommandBody, Envelope, NewRecords, Outcome, Reply};
use shared::config::Settings;
use shared::domain::dedup::DedupKey;
use shared::domain::log::{FirstMessage, ResumePoint, judge_first_message};
use shared::domain::partition::apply_lane_of;
use shared::shutdown::CancellationToken;
use shared::storage::{LogAdvance, NewDeadLetter, OutboxEvent, StorageError, Store};
use tokio::sync::mpsc;

use crate::apply::plan_batch;
use crate::outcome::{BatchOutcome, settle};
use crate::ownership::Ownership;
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
    /// Names this worker in claims, leases and consumer tags.
    pub instance: String,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl WorkerContext {
    fn log_name(&self, partition: u16) -> String {
        self.link.names().partition_log(partition)
    }
}

/// How long a partition stopped at a gap waits before its reader is tried again (an operator
/// may have accepted the gap meanwhile).
const STALLED_RETRY: Duration = Duration::from_secs(30);

/// Runs until `shutdown` turns true: read, apply, acknowledge; rebuild on failure.
pub async fn run(context: Arc<WorkerContext>, shutdown: CancellationToken) {
    // The publisher's configuration (and so its adapter), under a name of its own.
    let config = BrokerConfig {
        connection_name: format!("{}-consumer", context.instance),
        ..context.link.config().clone()
    };
    let reconnect = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times();
    let mut delays = backon::BackoffBuilder::build(reconnect);
    let started = Instant::now();
    // Only a broker whose logs outlast a restart can hold a previous version's queues (the
    // embedded default's live in memory).
    let mut legacy_drained =
        !context.settings.drain_legacy_queues || config.lasting_partition_logs().is_none();
    while !shutdown.is_cancelled() {
        let (sink, deliveries) = mpsc::channel(
            usize::from(context.settings.worker_prefetch)
                .saturating_mul(2)
                .max(1024),
        );
        let connected = async {
            let logs = PartitionLogs::connect(
                &config,
                &context.instance,
                context.settings.worker_prefetch,
                sink,
            )
            .await
            .map_err(|error| error.to_string())?;
            let names = context.link.names().partition_logs();
            context
                .store
                .ensure_log_positions(&names)
                .await
                .map_err(|error| error.to_string())?;
            Ok::<_, String>(logs)
        }
        .await;
        let mut logs = match connected {
            Ok(logs) => logs,
            Err(error) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                signals::reconnecting(&error, delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
        };
        if !legacy_drained {
            match drain_legacy_queues(&context, &config).await {
                Ok(()) => legacy_drained = true,
                Err(error) => {
                    logs.close().await;
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    signals::reconnecting(&error, delay);
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
        }
        delays = backon::BackoffBuilder::build(reconnect);
        let mut ownership = Ownership::new(&context.settings, started);
        let end = consume_loop(&context, deliveries, &mut logs, &mut ownership, &shutdown).await;
        logs.close().await;
        Ownership::clear_gauges();
        match end {
            LoopEnd::Shutdown => break,
            LoopEnd::ConnectionBroken => {
                let delay = Duration::from_millis(200);
                signals::reconnecting(&"a partition log reader stopped", delay);
                tokio::time::sleep(delay).await;
            }
            LoopEnd::RetryBudgetExhausted => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }
    // Let the other workers take this worker's partitions at once.
    if let Err(error) = context
        .store
        .release_partition_leases(&context.instance)
        .await
    {
        tracing::warn!(%error, "could not release partition leases; they expire on their own");
    }
    tracing::info!("worker stopped reading");
}

/// Where a running reader of one partition is.
struct ReaderState {
    resume: ResumePoint,
    /// Whether the first message of the reader is still to be judged.
    awaiting_first: bool,
    /// The stored position once every batch taken from this reader has committed: the
    /// compare-and-set's expected value for the next batch.
    taken_through: Option<i64>,
}

/// The partitions being read and their readers' positions.
struct Readers {
    states: HashMap<u16, ReaderState>,
    stalled_at: HashMap<u16, Instant>,
}

impl Readers {
    /// Starts (or restarts) the readers of `partitions` from their stored positions.
    async fn start(
        &mut self,
        context: &WorkerContext,
        logs: &mut PartitionLogs,
        partitions: &[u16],
    ) -> Result<(), String> {
        if partitions.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = partitions.iter().map(|&p| context.log_name(p)).collect();
        let positions = context
            .store
            .log_positions(&names)
            .await
            .map_err(|error| error.to_string())?;
        for (&partition, name) in partitions.iter().zip(&names) {
            let resume = positions
                .get(name)
                .cloned()
                .unwrap_or(ResumePoint::Beginning);
            logs.read(partition, &resume)
                .await
                .map_err(|error| error.to_string())?;
            self.stalled_at.remove(&partition);
            self.states.insert(
                partition,
                ReaderState {
                    taken_through: resume.applied_offset(),
                    resume,
                    awaiting_first: true,
                },
            );
        }
        Ok(())
    }

    async fn stop(&mut self, logs: &mut PartitionLogs, partition: u16) {
        logs.stop(partition).await;
        self.states.remove(&partition);
    }

    /// Judges a delivery of a current reader: `Some` if it is to be applied.
    async fn admit(
        &mut self,
        context: &WorkerContext,
        logs: &mut PartitionLogs,
        ownership: &mut Ownership,
        delivery: LogDelivery,
    ) -> Option<LogDelivery> {
        if !logs.is_current(&delivery) {
            return None;
        }
        let partition = delivery.partition;
        let state = self.states.get_mut(&partition)?;
        if !state.awaiting_first {
            return Some(delivery);
        }
        match judge_first_message(
            &state.resume,
            delivery.offset,
            delivery.message_id.as_deref(),
        ) {
            FirstMessage::Apply => {
                state.awaiting_first = false;
                Some(delivery)
            }
            FirstMessage::AlreadyApplied => {
                state.awaiting_first = false;
                crate::outcome::settle(
                    std::slice::from_ref(&delivery),
                    crate::outcome::BatchOutcome::AlreadyApplied,
                )
                .await;
                None
            }
            FirstMessage::Gap { expected, found } => {
                signals::log_gap(partition, &context.log_name(partition), &expected, &found);
                self.stop(logs, partition).await;
                ownership.stall(partition);
                self.stalled_at.insert(partition, Instant::now());
                ownership.record_gauges();
                None
            }
        }
    }

    /// The log advances of `batch` (deliveries in per-partition offset order), moving each
    /// reader's expected position forward.
    fn advances(&mut self, context: &WorkerContext, batch: &[LogDelivery]) -> Vec<LogAdvance> {
        let mut advances: Vec<LogAdvance> = Vec::new();
        let mut slot_of: HashMap<u16, usize> = HashMap::new();
        for delivery in batch {
            let slot = *slot_of.entry(delivery.partition).or_insert_with(|| {
                let from = self
                    .states
                    .get(&delivery.partition)
                    .and_then(|state| state.taken_through);
                advances.push(LogAdvance {
                    log: context.log_name(delivery.partition),
                    from,
                    to: delivery.offset,
                    to_message_id: None,
                });
                advances.len() - 1
            });
            advances[slot].to = delivery.offset;
            advances[slot].to_message_id = delivery.message_id.clone();
            if let Some(state) = self.states.get_mut(&delivery.partition) {
                state.taken_through = Some(delivery.offset);
            }
        }
        advances
    }
}

async fn consume_loop(
    context: &WorkerContext,
    mut deliveries: mpsc::Receiver<LogDelivery>,
    logs: &mut PartitionLogs,
    ownership: &mut Ownership,
    shutdown: &CancellationToken,
) -> LoopEnd {
    let mut readers = Readers {
        states: HashMap::new(),
        stalled_at: HashMap::new(),
    };
    let mut lease_tick = tokio::time::interval(ownership.renew_every());
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lanes = context.settings.worker_apply_lanes.max(1);
    // Deliveries read but not yet taken into a batch, one queue per lane. A lane holds a fixed
    // share of the partitions (`apply_lane_of`) and applies one batch at a time, so two batches
    // applying at once never hold messages of one partition: neither waits on the other's row
    // locks, and a batch refused by the fence never drags another one down with it.
    let lane_of = |partition: u16| apply_lane_of(partition, context.settings.worker_count, lanes);
    let mut waiting: Vec<VecDeque<LogDelivery>> = (0..lanes).map(|_| VecDeque::new()).collect();
    let mut lane_applying = vec![false; lanes];
    // Stops reading ahead once this many deliveries wait (the broker's prefetch bounds a reader
    // too; the in-process log does not).
    let waiting_limit = context
        .settings
        .worker_batch_max
        .saturating_mul(lanes + 1)
        .max(usize::from(context.settings.worker_prefetch));
    // Batches being applied, at most one per lane.
    let mut in_flight = FuturesUnordered::new();
    // Batches whose transaction ended, still publishing and acknowledging ([`Finish`]): they
    // overlap the next batches' transactions.
    let mut finishing = FuturesUnordered::new();
    let mut ending: Option<LoopEnd> = None;
    // Partitions whose readers restart from the stored positions once no batch is in flight or
    // finishing (a restarted reader's channel no longer takes the old deliveries' acknowledgements).
    let mut restart_due: BTreeSet<u16> = BTreeSet::new();
    loop {
        if !restart_due.is_empty()
            && in_flight.is_empty()
            && finishing.is_empty()
            && ending.is_none()
        {
            let due: Vec<u16> = std::mem::take(&mut restart_due)
                .into_iter()
                .filter(|&partition| ownership.holds(partition))
                .collect();
            if let Err(error) = readers.start(context, logs, &due).await {
                tracing::warn!(%error, "restarting partition readers failed; reconnecting");
                ending = Some(LoopEnd::ConnectionBroken);
            }
        }
        if let Some(end) = ending.take() {
            // Let the batches already applying finish first, with their work after commit.
            while let Some((_, (_, finish))) = in_flight.next().await {
                finishing.push(Finish::run(finish, context));
            }
            while finishing.next().await.is_some() {}
            return end;
        }
        // Each idle lane takes a batch of what waits for it, while at most one batch per lane
        // is still finishing (bounded: publishing slower than applying holds the reader back).
        // None does while readers wait to restart: under steady load some batch would always be
        // in flight and the restart would wait for good, while every batch of a fenced
        // partition is fenced again.
        for lane in 0..lanes {
            if lane_applying[lane]
                || waiting[lane].is_empty()
                || finishing.len() > lanes
                || !restart_due.is_empty()
            {
                continue;
            }
            linger_for(context, &mut deliveries, &mut waiting, lane, lane_of).await;
            let take = waiting[lane].len().min(context.settings.worker_batch_max);
            let mut batch = Vec::with_capacity(take);
            for delivery in waiting[lane].drain(..take) {
                if let Some(admitted) = readers.admit(context, logs, ownership, delivery).await {
                    batch.push(admitted);
                }
            }
            if batch.is_empty() {
                continue;
            }
            let advances = readers.advances(context, &batch);
            lane_applying[lane] = true;
            in_flight.push(async move { (lane, process_batch(context, batch, advances).await) });
        }
        let read_more = waiting.iter().map(VecDeque::len).sum::<usize>() < waiting_limit;
        tokio::select! {
            _ = shutdown.cancelled() => { ending = Some(LoopEnd::Shutdown); }
            _ = logs.broken() => { ending = Some(LoopEnd::ConnectionBroken); }
            Some(()) = finishing.next(), if !finishing.is_empty() => {}
            Some((lane, (result, finish))) = in_flight.next(), if !in_flight.is_empty() => {
                lane_applying[lane] = false;
                finishing.push(Finish::run(finish, context));
                match result {
                    BatchEnd::Committed => {}
                    BatchEnd::Fenced(partitions) => restart_due.extend(partitions),
                    BatchEnd::BudgetExhausted => ending = Some(LoopEnd::RetryBudgetExhausted),
                }
                if ending.is_none() && shutdown.is_cancelled() {
                    ending = Some(LoopEnd::Shutdown);
                }
            }
            _ = lease_tick.tick() => {
                if let Err(error) = renew_leases(context, logs, ownership, &mut readers, &mut restart_due).await {
                    tracing::warn!(%error, "partition readers could not follow the leases; reconnecting");
                    ending = Some(LoopEnd::ConnectionBroken);
                }
            }
            received = deliveries.recv(), if read_more => match received {
                Some(first) => {
                    waiting[lane_of(first.partition)].push_back(first);
                    // And whatever else has arrived.
                    while let Ok(next) = deliveries.try_recv() {
                        waiting[lane_of(next.partition)].push_back(next);
                    }
                }
                None => { ending = Some(LoopEnd::ConnectionBroken); }
            },
        }
    }
}

/// `SESSIONS_WORKER_BATCH_LINGER_MS`: before `lane` takes its batch, waits up to the linger for
/// more deliveries (sorting them into their lanes' queues) unless a full batch already waits.
/// Under load a few milliseconds of waiting turn many small transactions (and notifications)
/// into one.
async fn linger_for(
    context: &WorkerContext,
    deliveries: &mut mpsc::Receiver<LogDelivery>,
    waiting: &mut [VecDeque<LogDelivery>],
    lane: usize,
    lane_of: impl Fn(u16) -> usize,
) {
    if context.settings.worker_batch_linger.is_zero() {
        return;
    }
    let linger_until = tokio::time::Instant::now() + context.settings.worker_batch_linger;
    while waiting[lane].len() < context.settings.worker_batch_max {
        match tokio::time::timeout_at(linger_until, deliveries.recv()).await {
            Ok(Some(next)) => waiting[lane_of(next.partition)].push_back(next),
            Ok(None) | Err(_) => break,
        }
    }
}

/// Claims and renews leases, starts readers of gained partitions, stops lost ones, and retries
/// partitions stopped at a gap after [`STALLED_RETRY`].
async fn renew_leases(
    context: &WorkerContext,
    logs: &mut PartitionLogs,
    ownership: &mut Ownership,
    readers: &mut Readers,
    restart_due: &mut BTreeSet<u16>,
) -> Result<(), String> {
    let now = Instant::now();
    let wanted = ownership.wanted(now);
    let claims: Vec<(String, bool)> = wanted
        .iter()
        .map(|&(partition, home)| (context.log_name(partition), home))
        .collect();
    let held = match context
        .store
        .claim_partition_leases(
            &context.instance,
            &claims,
            chrono::Utc::now(),
            ownership.lease(),
        )
        .await
    {
        Ok(held) => held,
        Err(error) => {
            // Keep reading what it reads: the fence keeps it correct if a lease lapses.
            tracing::warn!(%error, "could not renew partition leases");
            return Ok(());
        }
    };
    let held: BTreeSet<u16> = wanted
        .iter()
        .map(|&(partition, _)| partition)
        .filter(|&partition| held.contains(&context.log_name(partition)))
        .collect();
    let change = ownership.granted(held);
    for &partition in &change.lost {
        readers.stop(logs, partition).await;
        readers.stalled_at.remove(&partition);
        restart_due.remove(&partition);
        signals::partition_released(partition, ownership.is_home(partition));
    }
    for &partition in &change.gained {
        signals::partition_taken(partition, ownership.is_home(partition));
    }
    let retry: Vec<u16> = readers
        .stalled_at
        .iter()
        .filter(|(_, at)| at.elapsed() >= STALLED_RETRY)
        .map(|(&partition, _)| partition)
        .collect();
    for &partition in &retry {
        ownership.unstall(partition);
    }
    let mut start = change.gained.clone();
    start.extend(retry);
    readers.start(context, logs, &start).await?;
    ownership.record_gauges();
    Ok(())
}

/// How applying a batch ended.
enum BatchEnd {
    Committed,
    /// The fence refused it (or an earlier batch of its partitions failed): these partitions'
    /// readers must restart from the stored positions.
    Fenced(Vec<u16>),
    BudgetExhausted,
}

/// One message of a batch, decoded, with its commands' place in the batch's command list.
struct Decoded {
    commands: std::ops::Range<usize>,
    reply_to: Option<String>,
}

/// What follows a batch's transaction: the work after its commit (if it committed as one
/// transaction) and the acknowledgement (or not) of its deliveries.
struct Finish {
    after_commit: Option<AfterCommit>,
    batch: Vec<LogDelivery>,
    outcome: BatchOutcome,
}

impl Finish {
    async fn run(self, context: &WorkerContext) {
        if let Some(after_commit) = self.after_commit {
            after_commit.run(context).await;
        }
        settle(&self.batch, self.outcome).await;
    }
}

async fn process_batch(
    context: &WorkerContext,
    batch: Vec<LogDelivery>,
    advances: Vec<LogAdvance>,
) -> (BatchEnd, Finish) {
    signals::batch_taken(batch.len());
    let partitions: Vec<u16> = {
        let unique: BTreeSet<u16> = batch.iter().map(|delivery| delivery.partition).collect();
        unique.into_iter().collect()
    };
    let mut commands: Vec<Command> = Vec::new();
    let mut decoded: Vec<Decoded> = Vec::with_capacity(batch.len());
    let mut dead_letters: Vec<NewDeadLetter> = Vec::new();
    for delivery in &batch {
        match Envelope::decode(&delivery.payload) {
            Ok(envelope) => {
                let start = commands.len();
                commands.extend(envelope.commands);
                decoded.push(Decoded {
                    commands: start..commands.len(),
                    reply_to: delivery.reply_to.clone(),
                });
            }
            Err(error) => dead_letters.push(dead_letter(context, delivery, error.to_string())),
        }
    }
    let result = apply_messages(context, &advances, &dead_letters, &commands, &decoded).await;
    let mut after_commit = None;
    let end = match result {
        Ok(after) => {
            after_commit = Some(after);
            for letter in &dead_letters {
                signals::dead_lettered(
                    letter.partition,
                    letter.message_id.as_deref(),
                    &letter.reason,
                );
            }
            BatchEnd::Committed
        }
        Err(ApplyFailure::Fenced(reason)) => {
            signals::batch_fenced(&reason);
            BatchEnd::Fenced(partitions.clone())
        }
        Err(ApplyFailure::Transient) => BatchEnd::BudgetExhausted,
        Err(ApplyFailure::Permanent(reason)) => {
            tracing::warn!(%reason, "batch failed permanently; applying its messages one by one");
            apply_one_by_one(context, &batch, &advances).await
        }
    };
    let outcome = match &end {
        BatchEnd::Committed => BatchOutcome::Committed,
        BatchEnd::Fenced(_) => BatchOutcome::Fenced,
        BatchEnd::BudgetExhausted => BatchOutcome::Abandoned,
    };
    (
        end,
        Finish {
            after_commit,
            batch,
            outcome,
        },
    )
}

/// Isolates the message(s) that fail deterministically: each message alone, in order, each
/// moving its log one message forward; one that fails is recorded as a dead letter instead.
async fn apply_one_by_one(
    context: &WorkerContext,
    batch: &[LogDelivery],
    advances: &[LogAdvance],
) -> BatchEnd {
    let mut position: HashMap<&str, Option<i64>> = advances
        .iter()
        .map(|advance| (advance.log.as_str(), advance.from))
        .collect();
    let names: Vec<String> = batch
        .iter()
        .map(|delivery| context.log_name(delivery.partition))
        .collect();
    for (delivery, log) in batch.iter().zip(&names) {
        let advance = [LogAdvance {
            log: log.clone(),
            from: position.get(log.as_str()).copied().flatten(),
            to: delivery.offset,
            to_message_id: delivery.message_id.clone(),
        }];
        let failure = match decode_one(&delivery.payload, delivery.reply_to.as_deref()) {
            Err(reason) => Some(reason),
            Ok((commands, decoded)) => {
                match apply_messages(context, &advance, &[], &commands, &decoded).await {
                    Ok(after_commit) => {
                        after_commit.run(context).await;
                        None
                    }
                    Err(ApplyFailure::Permanent(reason)) => Some(reason),
                    Err(ApplyFailure::Fenced(reason)) => {
                        signals::batch_fenced(&reason);
                        return BatchEnd::Fenced(batch.iter().map(|d| d.partition).collect());
                    }
                    Err(ApplyFailure::Transient) => return BatchEnd::BudgetExhausted,
                }
            }
        };
        if let Some(reason) = failure {
            let letter = [dead_letter(context, delivery, reason)];
            match apply_messages(context, &advance, &letter, &[], &[]).await {
                Ok(after_commit) => {
                    after_commit.run(context).await;
                    signals::dead_lettered(
                        delivery.partition,
                        delivery.message_id.as_deref(),
                        &letter[0].reason,
                    );
                }
                Err(ApplyFailure::Transient) => return BatchEnd::BudgetExhausted,
                Err(ApplyFailure::Fenced(reason) | ApplyFailure::Permanent(reason)) => {
                    signals::batch_fenced(&reason);
                    return BatchEnd::Fenced(batch.iter().map(|d| d.partition).collect());
                }
            }
        }
        position.insert(log.as_str(), Some(delivery.offset));
    }
    BatchEnd::Committed
}

/// One message's commands as a batch of its own, or why it cannot be applied.
fn decode_one(
    payload: &[u8],
    reply_to: Option<&str>,
) -> Result<(Vec<Command>, Vec<Decoded>), String> {
    let envelope = Envelope::decode(payload).map_err(|error| error.to_string())?;
    let count = envelope.commands.len();
    Ok((
        envelope.commands,
        vec![Decoded {
            commands: 0..count,
            reply_to: reply_to.map(str::to_owned),
        }],
    ))
}

fn dead_letter(context: &WorkerContext, delivery: &LogDelivery, reason: String) -> NewDeadLetter {
    NewDeadLetter {
        log: context.log_name(delivery.partition),
        partition: delivery.partition,
        offset: Some(delivery.offset),
        message_id: delivery.message_id.clone(),
        payload: delivery.payload.clone(),
        reason,
    }
}

enum ApplyFailure {
    Transient,
    Permanent(String),
    Fenced(String),
}

/// Applies in one transaction (retrying transient failures) while the batch's Redis claims are
/// taken, and returns what is left to do after the commit ([`AfterCommit`]). The claims decide
/// nothing (the database fences do; a contended claim is only counted), so neither Redis round
/// trip waits for the other work: under load each round trip costs a millisecond or two of
/// scheduling, and a batch waits for the one before it.
async fn apply_messages(
    context: &WorkerContext,
    advances: &[LogAdvance],
    dead_letters: &[NewDeadLetter],
    commands: &[Command],
    messages: &[Decoded],
) -> Result<AfterCommit, ApplyFailure> {
    let close_grace =
        chrono::TimeDelta::from_std(context.settings.session_cache_ttl).unwrap_or_default();
    let started = Instant::now();
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .with_total_delay(Some(context.settings.retry_budget))
        .without_max_times();
    let apply = async {
        (|| async {
            context
                .store
                .apply_batch(advances, dead_letters, commands, |mut state| {
                    state.close_grace = close_grace;
                    plan_batch(commands, state)
                })
                .await
        })
        .retry(policy)
        .when(StorageError::is_transient)
        .notify(|error, delay| signals::apply_retrying(error, delay))
        .await
    };
    let (claims, applied) = tokio::join!(claim_parts(context, commands), apply);
    let (outcomes, outbox) = match applied {
        Ok(result) => result,
        Err(error) => {
            release_claims(context, &claims).await;
            return Err(match error {
                StorageError::Fenced(reason) => ApplyFailure::Fenced(reason),
                error if error.is_transient() => ApplyFailure::Transient,
                error => ApplyFailure::Permanent(error.to_string()),
            });
        }
    };
    signals::batch_committed(commands, started.elapsed());
    #[cfg(feature = "test-failpoints")]
    if outcomes
        .iter()
        .any(|outcome| matches!(outcome, Outcome::Appended { .. }))
    {
        // Test-only: die between persisting records and everything that follows (events,
        // replies, acknowledgements).
        crate::failpoint::abort_after_commit();
    }

    let completed = outbox
        .iter()
        .filter(|event| event.routing_key == shared::domain::waitpoint::WAITPOINT_COMPLETED)
        .count();
    signals::waitpoints_completed(completed);
    signals::commands_settled(commands, &outcomes);
    let replies: Vec<(String, Vec<u8>)> = messages
        .iter()
        .filter_map(|message| {
            let reply_to = message.reply_to.clone()?;
            let payload = reply_payload(
                &commands[message.commands.clone()],
                &outcomes[message.commands.clone()],
            )?;
            Some((reply_to, payload))
        })
        .collect();
    Ok(AfterCommit {
        outbox,
        replies,
        new_records: NewRecords::from_outcomes(commands, &outcomes),
        claims,
    })
}

/// What a committed batch still has to do: publish its outbox events and replies (together,
/// confirmed together) and its "new records" notification (not confirmed: best effort), and
/// release its Redis claims. None of it decides anything (the database holds the outcome, the
/// outbox sweeper re-publishes events a crash left behind, a lost reply makes the api answer
/// with a timeout), so it runs while the next batch applies.
struct AfterCommit {
    outbox: Vec<OutboxEvent>,
    replies: Vec<(String, Vec<u8>)>,
    new_records: NewRecords,
    claims: Vec<(String, String)>,
}

impl AfterCommit {
    async fn run(self, context: &WorkerContext) {
        let release = release_claims(context, &self.claims);
        let publish = async {
            publish_outbox_and_replies(context, self.outbox, &self.replies).await;
            if !self.new_records.is_empty() {
                let payload = serde_json::to_vec(&self.new_records).unwrap_or_default();
                if let Err(error) = context.link.publish_notification(&payload).await {
                    tracing::debug!(%error, "notification lost; readers catch up on their safety re-read");
                }
            }
        };
        tokio::join!(release, publish);
    }
}

/// After an upgrade from the version with quorum partition queues: applies what this worker's
/// home partitions' old queues still hold, in queue order, before any log is read, and deletes
/// each queue once it is empty. Only home partitions: two workers taking from one queue would
/// interleave its messages. (Old api instances must be stopped first: README, "Upgrading".)
async fn drain_legacy_queues(context: &WorkerContext, config: &BrokerConfig) -> Result<(), String> {
    let mut legacy = LegacyPartitionQueues::connect(config)
        .await
        .map_err(|error| error.to_string())?;
    let present = legacy.present().await.map_err(|error| error.to_string())?;
    if present.contains(&context.settings.partitions) {
        // Draining only the first queues would leave accepted appends in the others for good.
        return Err(format!(
            "the previous version's partition queues go beyond SESSIONS_PARTITIONS={} \
             (queue {} exists): set SESSIONS_PARTITIONS to the count that version ran with \
             (64 if it was not set) and start again",
            context.settings.partitions,
            context
                .link
                .names()
                .legacy_partition_queue(context.settings.partitions)
        ));
    }
    let ownership = Ownership::new(&context.settings, Instant::now());
    for partition in present.into_iter().filter(|&p| ownership.is_home(p)) {
        let mut applied = 0_usize;
        while let Some(message) = legacy
            .next(partition)
            .await
            .map_err(|error| error.to_string())?
        {
            let failure = match decode_one(&message.payload, message.reply_to.as_deref()) {
                Err(reason) => Some(reason),
                Ok((commands, decoded)) => {
                    match apply_messages(context, &[], &[], &commands, &decoded).await {
                        Ok(after_commit) => {
                            after_commit.run(context).await;
                            None
                        }
                        Err(ApplyFailure::Permanent(reason) | ApplyFailure::Fenced(reason)) => {
                            Some(reason)
                        }
                        Err(ApplyFailure::Transient) => {
                            return Err("legacy queue drain: the database is unavailable".into());
                        }
                    }
                }
            };
            if let Some(reason) = failure {
                let letter = [NewDeadLetter {
                    log: context.link.names().legacy_partition_queue(partition),
                    partition,
                    offset: None,
                    message_id: message.message_id.clone(),
                    payload: message.payload.clone(),
                    reason,
                }];
                apply_messages(context, &[], &letter, &[], &[])
                    .await
                    .map_err(|_| "legacy queue drain: could not record a dead letter".to_owned())?
                    .run(context)
                    .await;
                signals::dead_lettered(partition, message.message_id.as_deref(), &letter[0].reason);
            }
            crate::outcome::settle_legacy(&message).await?;
            applied += 1;
        }
        match legacy.delete_if_empty(partition).await {
            Ok(true) => signals::legacy_queue_drained(partition, applied),
            Ok(false) => tracing::warn!(
                partition,
                "legacy partition queue got new messages (is an old api still running?); \
                 drained again at the next start"
            ),
            Err(error) => {
                tracing::warn!(partition, %error, "legacy partition queue not deleted; drained again at the next start")
            }
        }
    }
    legacy.close().await;
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
                    stream: append.stream(),
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
pub async fn publish_outbox(context: &WorkerContext, events: Vec<OutboxEvent>) {
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
pub async fn sweep_outbox(context: Arc<WorkerContext>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.cancelled() => return,
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

/// The reply message of one broker message: the outcomes of its commands that asked for a
/// reply (`None`: none did).
fn reply_payload(commands: &[Command], outcomes: &[Outcome]) -> Option<Vec<u8>> {
    let replies: Vec<Reply> = commands
        .iter()
        .zip(outcomes)
        .filter(|(command, _)| command.wants_reply)
        .map(|(command, outcome)| Reply {
            command_id: command.id,
            outcome: outcome.clone(),
        })
        .collect();
    if replies.is_empty() {
        return None;
    }
    serde_json::to_vec(&replies).ok()
}

/// Publishes committed outbox events and the batch's replies together, then removes the
/// published events. Events that fail are left to the sweeper; a lost reply makes the api
/// answer its caller with a timeout.
async fn publish_outbox_and_replies(
    context: &WorkerContext,
    events: Vec<OutboxEvent>,
    replies: &[(String, Vec<u8>)],
) {
    let payloads: Vec<Vec<u8>> = events
        .iter()
        .map(|event| serde_json::to_vec(&event.payload).unwrap_or_default())
        .collect();
    let event_messages: Vec<(&str, &[u8])> = events
        .iter()
        .zip(&payloads)
        .map(|(event, payload)| (event.routing_key.as_str(), payload.as_slice()))
        .collect();
    let reply_messages: Vec<(&str, &[u8])> = replies
        .iter()
        .map(|(reply_to, payload)| (reply_to.as_str(), payload.as_slice()))
        .collect();
    let (event_results, reply_results) = context
        .link
        .publish_events_and_replies(&event_messages, &reply_messages)
        .await;
    for result in reply_results {
        if let Err(error) = result {
            tracing::warn!(%error, "reply lost; the api answers its caller with a timeout");
        }
    }
    let mut published = Vec::with_capacity(events.len());
    for (event, result) in events.iter().zip(event_results) {
        match result {
            Ok(()) => published.push(event.id),
            Err(error) => {
                tracing::warn!(%error, routing_key = %event.routing_key, "event publish failed; the outbox sweeper retries");
            }
        }
    }
    if let Err(error) = context.store.delete_outbox_events(&published).await {
        tracing::warn!(%error, "could not delete published outbox events; they may be published again");
    }
}
