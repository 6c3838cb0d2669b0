//! The worker's batch transaction: load the state a batch of commands needs, let the caller
//! decide (pure code in the worker), write the decision, commit. One transaction per batch.

use std::collections::HashMap;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::sea_query::{CaseStatement, Expr};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, DatabaseTransaction, EntityTrait, IntoActiveModel,
    QueryFilter, TransactionTrait,
};
use uuid::Uuid;

use super::entities::{applied_commands, outbox_events, records, runs, sessions, waitpoints};
use super::{OutboxEventRow, RecordRow, RunRow, SessionRow, StorageError, Store, WaitpointRow};
use crate::commands::{Command, CommandBody, Outcome};
use crate::domain::Io;
use crate::domain::dedup::DedupKey;
use crate::domain::session::SessionItem;
use crate::domain::waitpoint::STATUS_WAITING;

/// Rows per multi-row INSERT or per IN list: keeps every statement far below Postgres' 65,535
/// bind parameters.
const CHUNK: usize = 1_000;

/// The record that owns a part id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartOwner {
    pub seq_num: i64,
    pub body_fingerprint: String,
    /// The stored body: a duplicate re-runs the drain with it, never with the retry's body.
    pub body: String,
}

/// What the database held for a batch, read inside its transaction.
#[derive(Debug, Default)]
pub struct LoadedState {
    /// When the transaction started; the apply time of every command of the batch.
    pub now: DateTime<Utc>,
    /// Sessions the commands target (by internal id).
    pub sessions: HashMap<Uuid, SessionRow>,
    /// Append commands that already produced a record (redelivery): command id → seqNum.
    pub recorded_appends: HashMap<Uuid, i64>,
    /// Stored outcomes of non-append commands applied before (redelivery).
    pub applied_outcomes: HashMap<Uuid, Outcome>,
    /// Part ids already used, with the record that owns each.
    pub parts: HashMap<DedupKey, PartOwner>,
    /// Friendly ids of the loaded sessions' current runs.
    pub run_friendly_ids: HashMap<Uuid, String>,
    /// Waiting waitpoints of the batch's sessions, per channel.
    pub waiting_waitpoints: HashMap<(Uuid, Io), Vec<WaitpointRow>>,
    /// Waitpoints whose idempotency key is still live, by `(environment, key)`.
    pub waitpoints_by_key: HashMap<(Uuid, String), WaitpointRow>,
    /// Bodies of records that registrations with `lastSeqNum` may complete with at once:
    /// `(session, io, seqNum)` → body.
    pub record_bodies: HashMap<(Uuid, Io, i64), String>,
}

/// A waitpoint completion (or time-out), applied only if the waitpoint is still waiting; its
/// event is written to the outbox only then.
#[derive(Clone, Debug, PartialEq)]
pub struct WaitpointCompletion {
    pub waitpoint_id: Uuid,
    pub status: &'static str,
    pub output: String,
    pub output_is_error: bool,
    pub completed_by_seq: Option<i64>,
    pub completed_at: DateTime<Utc>,
    pub event: NewOutboxEvent,
}

/// An event to publish after commit (outbox).
#[derive(Clone, Debug, PartialEq)]
pub struct NewOutboxEvent {
    pub routing_key: String,
    pub payload: serde_json::Value,
}

/// What a batch writes. Applied in one transaction.
#[derive(Debug, Default)]
pub struct BatchWrites {
    pub inserted_sessions: Vec<SessionRow>,
    /// Sessions whose counters, close state or run changed.
    pub updated_sessions: Vec<SessionRow>,
    pub runs: Vec<RunRow>,
    pub records: Vec<RecordRow>,
    /// Outcomes of non-append commands, replayed on redelivery.
    pub applied_outcomes: Vec<(Uuid, Outcome)>,
    pub outbox: Vec<NewOutboxEvent>,
    /// Waitpoints registered by this batch, as registered (WAITING).
    pub new_waitpoints: Vec<WaitpointRow>,
    /// Completions, applied after the inserts, each guarded by `status = 'WAITING'`.
    pub waitpoint_completions: Vec<WaitpointCompletion>,
}

/// The wire form of a stored session.
pub(crate) fn session_item(session: &SessionRow, run_friendly_id: Option<String>) -> SessionItem {
    SessionItem {
        id: session.friendly_id.clone(),
        external_id: session.external_id.clone(),
        session_type: session.session_type.clone(),
        task_identifier: session.task_identifier.clone(),
        trigger_config: session.trigger_config.clone(),
        current_run_id: run_friendly_id,
        tags: serde_json::from_value(session.tags.clone()).unwrap_or_default(),
        metadata: session.metadata.clone(),
        closed_at: session.closed_at,
        closed_reason: session.closed_reason.clone(),
        expires_at: session.expires_at,
        created_at: session.created_at,
        updated_at: session.updated_at,
    }
}

impl SessionRow {
    /// The wire form, given the friendly id of the current run.
    pub fn to_item(&self, run_friendly_id: Option<String>) -> SessionItem {
        session_item(self, run_friendly_id)
    }
}

impl Store {
    /// Applies a batch: loads what `commands` need, calls `decide`, writes its result and
    /// commits. Returns `decide`'s value and the outbox events to publish.
    pub async fn apply_batch<T>(
        &self,
        commands: &[Command],
        decide: impl FnOnce(LoadedState) -> (BatchWrites, T),
    ) -> Result<(T, Vec<OutboxEventRow>), StorageError> {
        let txn = self.connection().begin().await?;
        let state = load_state(&txn, commands).await?;
        let (writes, value) = decide(state);
        let outbox = write(&txn, writes).await?;
        txn.commit().await?;
        Ok((value, outbox))
    }
}

async fn load_state(
    txn: &DatabaseTransaction,
    commands: &[Command],
) -> Result<LoadedState, StorageError> {
    let mut state = LoadedState {
        // Postgres keeps microseconds: outcomes computed in memory must equal what a read returns.
        now: Utc::now().trunc_subsecs(6),
        ..LoadedState::default()
    };
    let mut session_ids: Vec<Uuid> = commands.iter().map(|c| c.session_id).collect();
    session_ids.sort_unstable();
    session_ids.dedup();
    for chunk in session_ids.chunks(CHUNK) {
        for session in sessions::Entity::find()
            .filter(sessions::Column::Id.is_in(chunk.iter().copied()))
            .all(txn)
            .await?
        {
            state.sessions.insert(session.id, session);
        }
    }

    let append_ids: Vec<Uuid> = commands
        .iter()
        .filter(|c| matches!(c.body, CommandBody::Append(_)))
        .map(|c| c.id)
        .collect();
    for chunk in append_ids.chunks(CHUNK) {
        for record in records::Entity::find()
            .filter(records::Column::CommandId.is_in(chunk.iter().copied()))
            .all(txn)
            .await?
        {
            state
                .recorded_appends
                .insert(record.command_id, record.seq_num);
        }
    }

    let other_ids: Vec<Uuid> = commands
        .iter()
        .filter(|c| !matches!(c.body, CommandBody::Append(_)))
        .map(|c| c.id)
        .collect();
    for chunk in other_ids.chunks(CHUNK) {
        for applied in applied_commands::Entity::find()
            .filter(applied_commands::Column::CommandId.is_in(chunk.iter().copied()))
            .all(txn)
            .await?
        {
            let outcome: Outcome = serde_json::from_value(applied.outcome).map_err(|error| {
                StorageError::Inconsistent(format!(
                    "stored outcome of command {} is unreadable: {error}",
                    applied.command_id
                ))
            })?;
            state.applied_outcomes.insert(applied.command_id, outcome);
        }
    }

    let part_keys: Vec<DedupKey> = commands
        .iter()
        .filter_map(|c| match &c.body {
            CommandBody::Append(append) => append.part_id.as_ref().map(|part_id| DedupKey {
                environment_id: c.environment_id,
                session_id: c.session_id,
                io: append.io,
                part_id: part_id.clone(),
            }),
            _ => None,
        })
        .collect();
    for chunk in part_keys.chunks(CHUNK / 4) {
        let mut any = Condition::any();
        for key in chunk {
            any = any.add(
                Condition::all()
                    .add(records::Column::EnvironmentId.eq(key.environment_id))
                    .add(records::Column::SessionId.eq(key.session_id))
                    .add(records::Column::Io.eq(key.io.as_str()))
                    .add(records::Column::PartId.eq(key.part_id.as_str())),
            );
        }
        for record in records::Entity::find().filter(any).all(txn).await? {
            let (Some(part_id), Ok(io)) = (record.part_id, record.io.parse()) else {
                continue;
            };
            state.parts.insert(
                DedupKey {
                    environment_id: record.environment_id,
                    session_id: record.session_id,
                    io,
                    part_id,
                },
                PartOwner {
                    seq_num: record.seq_num,
                    body_fingerprint: record.body_fingerprint,
                    body: record.body,
                },
            );
        }
    }

    for chunk in session_ids.chunks(CHUNK) {
        for waitpoint in waitpoints::Entity::find()
            .filter(waitpoints::Column::SessionId.is_in(chunk.iter().copied()))
            .filter(waitpoints::Column::Status.eq(STATUS_WAITING))
            .all(txn)
            .await?
        {
            let Ok(io) = waitpoint.io.parse::<Io>() else {
                continue;
            };
            state
                .waiting_waitpoints
                .entry((waitpoint.session_id, io))
                .or_default()
                .push(waitpoint);
        }
    }
    for waitpoints in state.waiting_waitpoints.values_mut() {
        waitpoints.sort_by_key(|waitpoint| waitpoint.created_at);
    }

    for command in commands {
        let CommandBody::RegisterWaitpoint(register) = &command.body else {
            continue;
        };
        if let Some(key) = &register.idempotency_key {
            let live = waitpoints::Entity::find()
                .filter(waitpoints::Column::EnvironmentId.eq(command.environment_id))
                .filter(waitpoints::Column::IdempotencyKey.eq(key.as_str()))
                .filter(waitpoints::Column::IdempotencyKeyExpiresAt.gt(command.accepted_at))
                .one(txn)
                .await?;
            if let Some(live) = live {
                state
                    .waitpoints_by_key
                    .insert((command.environment_id, key.clone()), live);
            }
        }
        if let Some(last_seq_num) = register.last_seq_num {
            let next = records::Entity::find()
                .filter(records::Column::EnvironmentId.eq(command.environment_id))
                .filter(records::Column::SessionId.eq(command.session_id))
                .filter(records::Column::Io.eq(register.io.as_str()))
                .filter(records::Column::SeqNum.eq(last_seq_num.saturating_add(1)))
                .one(txn)
                .await?;
            if let Some(record) = next {
                state.record_bodies.insert(
                    (record.session_id, register.io, record.seq_num),
                    record.body,
                );
            }
        }
    }

    let needs_runs = commands
        .iter()
        .any(|c| !matches!(c.body, CommandBody::Append(_)));
    if needs_runs {
        let run_ids: Vec<Uuid> = state
            .sessions
            .values()
            .filter_map(|s| s.current_run_id)
            .collect();
        for chunk in run_ids.chunks(CHUNK) {
            for run in runs::Entity::find()
                .filter(runs::Column::Id.is_in(chunk.iter().copied()))
                .all(txn)
                .await?
            {
                state.run_friendly_ids.insert(run.id, run.friendly_id);
            }
        }
    }
    Ok(state)
}

async fn write(
    txn: &DatabaseTransaction,
    writes: BatchWrites,
) -> Result<Vec<OutboxEventRow>, StorageError> {
    for chunk in writes.inserted_sessions.chunks(CHUNK / 4) {
        sessions::Entity::insert_many(chunk.iter().cloned().map(fresh_session))
            .exec_without_returning(txn)
            .await?;
    }
    // One UPDATE per chunk of sessions, not one per session: a batch touches many sessions and
    // each round trip costs more than the row (per-column CASE on the id; every row of the
    // chunk matches a branch, so no ELSE is needed and JSON values keep their own type).
    for chunk in writes.updated_sessions.chunks(SESSION_UPDATE_CHUNK) {
        let per_session = |value: &dyn Fn(&SessionRow) -> sea_orm::Value| {
            let mut case = CaseStatement::new();
            for session in chunk {
                case = case.case(
                    sessions::Column::Id.eq(session.id),
                    Expr::value(value(session)),
                );
            }
            let expression: Expr = case.into();
            expression
        };
        sessions::Entity::update_many()
            .col_expr(
                sessions::Column::NextSeqIn,
                per_session(&|session| session.next_seq_in.into()),
            )
            .col_expr(
                sessions::Column::NextSeqOut,
                per_session(&|session| session.next_seq_out.into()),
            )
            .col_expr(
                sessions::Column::ClosedAt,
                per_session(&|session| session.closed_at.into()),
            )
            .col_expr(
                sessions::Column::ClosedReason,
                per_session(&|session| session.closed_reason.clone().into()),
            )
            .col_expr(
                sessions::Column::CurrentRunId,
                per_session(&|session| session.current_run_id.into()),
            )
            .col_expr(
                sessions::Column::Tags,
                per_session(&|session| session.tags.clone().into()),
            )
            .col_expr(
                sessions::Column::Metadata,
                per_session(&|session| session.metadata.clone().into()),
            )
            .col_expr(
                sessions::Column::UpdatedAt,
                per_session(&|session| session.updated_at.into()),
            )
            .filter(sessions::Column::Id.is_in(chunk.iter().map(|session| session.id)))
            .exec(txn)
            .await?;
    }
    for chunk in writes.runs.chunks(CHUNK) {
        runs::Entity::insert_many(
            chunk
                .iter()
                .cloned()
                .map(|run| run.into_active_model().reset_all()),
        )
        .exec_without_returning(txn)
        .await?;
    }
    for chunk in writes.records.chunks(CHUNK) {
        records::Entity::insert_many(
            chunk
                .iter()
                .cloned()
                .map(|record| record.into_active_model().reset_all()),
        )
        .exec_without_returning(txn)
        .await?;
    }
    for chunk in writes.new_waitpoints.chunks(CHUNK / 4) {
        waitpoints::Entity::insert_many(
            chunk
                .iter()
                .cloned()
                .map(|waitpoint| waitpoint.into_active_model().reset_all()),
        )
        .exec_without_returning(txn)
        .await?;
    }
    let mut outbox_events = writes.outbox;
    outbox_events.extend(complete_waitpoints(txn, writes.waitpoint_completions).await?);
    let now = Utc::now();
    for chunk in writes.applied_outcomes.chunks(CHUNK) {
        applied_commands::Entity::insert_many(chunk.iter().map(|(command_id, outcome)| {
            applied_commands::ActiveModel {
                command_id: sea_orm::Set(*command_id),
                outcome: sea_orm::Set(serde_json::to_value(outcome).unwrap_or_default()),
                applied_at: sea_orm::Set(now),
            }
        }))
        .exec_without_returning(txn)
        .await?;
    }
    insert_outbox(txn, outbox_events).await
}

/// Sessions per batched UPDATE (8 columns × 2 parameters each, well within both backends'
/// parameter limits).
const SESSION_UPDATE_CHUNK: usize = 64;

fn fresh_session(session: SessionRow) -> sessions::ActiveModel {
    session.into_active_model().reset_all()
}

/// Applies completions guarded by `status = 'WAITING'` and returns the events of those that
/// took effect: a waitpoint completes (or times out) at most once, whoever tries.
pub(crate) async fn complete_waitpoints(
    txn: &DatabaseTransaction,
    completions: Vec<WaitpointCompletion>,
) -> Result<Vec<NewOutboxEvent>, StorageError> {
    let mut events = Vec::with_capacity(completions.len());
    for completion in completions {
        let result = waitpoints::Entity::update_many()
            .col_expr(waitpoints::Column::Status, Expr::value(completion.status))
            .col_expr(waitpoints::Column::Output, Expr::value(completion.output))
            .col_expr(
                waitpoints::Column::OutputIsError,
                Expr::value(completion.output_is_error),
            )
            .col_expr(
                waitpoints::Column::CompletedBySeq,
                Expr::value(completion.completed_by_seq),
            )
            .col_expr(
                waitpoints::Column::CompletedAt,
                Expr::value(completion.completed_at),
            )
            .filter(waitpoints::Column::Id.eq(completion.waitpoint_id))
            .filter(waitpoints::Column::Status.eq(STATUS_WAITING))
            .exec(txn)
            .await?;
        if result.rows_affected == 1 {
            events.push(completion.event);
        }
    }
    Ok(events)
}

/// Writes events to the outbox; they are published after commit.
pub(crate) async fn insert_outbox(
    txn: &DatabaseTransaction,
    events: Vec<NewOutboxEvent>,
) -> Result<Vec<OutboxEventRow>, StorageError> {
    let now = Utc::now();
    let outbox: Vec<OutboxEventRow> = events
        .into_iter()
        .map(|event| OutboxEventRow {
            id: Uuid::now_v7(),
            routing_key: event.routing_key,
            payload: event.payload,
            created_at: now,
        })
        .collect();
    for chunk in outbox.chunks(CHUNK) {
        outbox_events::Entity::insert_many(
            chunk
                .iter()
                .cloned()
                .map(|event| event.into_active_model().reset_all()),
        )
        .exec_without_returning(txn)
        .await?;
    }
    Ok(outbox)
}
