//! The worker's batch transaction: load the state a batch of commands needs, let the caller
//! decide (pure code in the worker), write the decision, commit. One transaction per batch.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::sea_query::extension::postgres::PgFunc;
use sea_orm::sea_query::{CaseStatement, Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    QueryFilter, Statement, TransactionTrait, Value,
};
use uuid::Uuid;

use super::entities::{
    applied_commands, outbox_events, record_part_ids, records, runs, sessions, waitpoints,
};
use super::rows;
use super::{Run, Session, StorageError, Store, StoredRecord, Waitpoint, WaitpointStatus};
use crate::commands::{Command, CommandBody, Outcome};
use crate::domain::dedup::DedupKey;
use crate::domain::{Io, Stream};

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
    pub sessions: HashMap<Uuid, Session>,
    /// Append commands that already produced a record (redelivery): command id → seqNum.
    pub recorded_appends: HashMap<Uuid, i64>,
    /// Stored outcomes of non-append commands applied before (redelivery), by
    /// [`Command::outcome_key`].
    pub applied_outcomes: HashMap<Uuid, Outcome>,
    /// Part ids already used, with the record that owns each.
    pub parts: HashMap<DedupKey, PartOwner>,
    /// Friendly ids of the loaded sessions' current runs.
    pub run_friendly_ids: HashMap<Uuid, String>,
    /// Waiting waitpoints of the batch's sessions, per channel.
    pub waiting_waitpoints: HashMap<(Uuid, Io), Vec<Waitpoint>>,
    /// Waitpoints whose idempotency key is still live, by `(environment, key)`.
    pub waitpoints_by_key: HashMap<(Uuid, String), Waitpoint>,
    /// Bodies of records that registrations with `lastSeqNum` may complete with at once:
    /// `(session, io, seqNum)` → body.
    pub record_bodies: HashMap<(Uuid, Io, i64), String>,
    /// The next seqNum of each named-channel stream the batch appends to, by `(session, stream
    /// key)` (reserved channels count on the session row instead).
    pub named_stream_heads: HashMap<(Uuid, String), i64>,
    /// How long after a close appends accepted by the api are still written (not loaded: the
    /// worker sets it from `SESSIONS_SESSION_CACHE_TTL_MS`; see `domain::session::append_state`).
    pub close_grace: chrono::TimeDelta,
}

/// A waitpoint completion (or time-out), applied only if the waitpoint is still waiting; its
/// event is written to the outbox only then.
#[derive(Clone, Debug, PartialEq)]
pub struct WaitpointCompletion {
    pub waitpoint_id: Uuid,
    pub status: WaitpointStatus,
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
    pub inserted_sessions: Vec<Session>,
    /// Sessions whose counters, close state or run changed.
    pub updated_sessions: Vec<Session>,
    pub runs: Vec<Run>,
    pub records: Vec<StoredRecord>,
    /// Outcomes of non-append commands, replayed on redelivery: `(outcome key, session id,
    /// outcome)` ([`Command::outcome_key`]).
    pub applied_outcomes: Vec<(Uuid, Uuid, Outcome)>,
    pub outbox: Vec<NewOutboxEvent>,
    /// Waitpoints registered by this batch, as registered (WAITING).
    pub new_waitpoints: Vec<Waitpoint>,
    /// Completions, applied after the inserts, each guarded by `status = 'WAITING'`.
    pub waitpoint_completions: Vec<WaitpointCompletion>,
    /// New trim points, one per `(session, stream key)`; a stored higher point wins.
    pub trims: Vec<StreamTrim>,
}

/// A stream's trim point: its records below `trim_seq` are no longer read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamTrim {
    pub session_id: Uuid,
    pub stream: String,
    pub trim_seq: i64,
}

/// An outbox event as written: published after commit, deleted once published.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEvent {
    pub id: Uuid,
    pub routing_key: String,
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Applies a batch: moves the partition logs it read forward (the offsets fence: fails
    /// with [`StorageError::Fenced`] if any log is no longer where the batch started), loads
    /// what `commands` need, calls `decide`, writes its result and the batch's dead letters,
    /// and commits. Returns `decide`'s value and the outbox events to publish.
    pub async fn apply_batch<T>(
        &self,
        advances: &[super::LogAdvance],
        dead_letters: &[super::NewDeadLetter],
        commands: &[Command],
        decide: impl FnOnce(LoadedState) -> (BatchWrites, T),
    ) -> Result<(T, Vec<OutboxEvent>), StorageError> {
        let txn = self.connection().begin().await?;
        if txn.get_database_backend() == DbBackend::Postgres
            && self.statement_plans == super::StatementPlans::Cached
        {
            // Plan the batch's statements for their actual arguments (the worker's pool does so
            // on every connection: `StatementPlans::EachExecution`, one round trip less per
            // batch). A generic plan cached on a long-lived connection while the tables were
            // small (e.g. part ids looked up through the records primary key, scanning whole
            // channels) stays in use until the tables are analyzed again; with autovacuum off
            // (as on the benchmark machine) that is never, and the worker slowed down as
            // channels grew (measured: 100+ ms lookups, drain rate falling from ~1,000 to ~300
            // records/s).
            txn.execute_unprepared("SET LOCAL plan_cache_mode = force_custom_plan")
                .await?;
        }
        // The offsets fence comes first (in the same statement as the reads on Postgres): its
        // row locks make a later batch of the same logs wait for this commit, and a batch that
        // lost the race writes nothing.
        let state = load_state(&txn, advances, commands).await?;
        super::logs::insert_dead_letters(&txn, dead_letters).await?;
        let (writes, value) = decide(state);
        let outbox = write(&txn, writes).await?;
        txn.commit().await?;
        Ok((value, outbox))
    }
}

/// `column IN (ids)`. On Postgres it is written `column = ANY($1)` with one array parameter:
/// the statement text is the same whatever the batch size, so it is prepared and planned once
/// per connection instead of once per distinct size (measured: statements with hundreds of
/// parameters cost tens of milliseconds each to parse and plan under load). SQLite (the
/// embedded default) keeps the IN list.
fn id_in(backend: DbBackend, column: impl ColumnTrait, ids: &[Uuid]) -> Expr {
    match backend {
        DbBackend::Postgres => ExprTrait::eq(
            column.into_expr(),
            PgFunc::any(Expr::val(Value::from(ids.to_vec()))),
        ),
        _ => column.is_in(ids.iter().copied()),
    }
}

/// The batch's first statement (Postgres): the offsets fence ([`super::logs::ADVANCE_LOGS_SQL`],
/// `$1`) and the three reads every batch needs, in one round trip instead of four: the
/// sessions the commands target (`$2`), the records its appends already produced (by command
/// id, `$3`) or whose part ids they reuse (the unnested keys `$4`–`$6` joined to
/// `record_part_ids` through its primary key, then each hit to its record; a row found both
/// ways comes twice), and the waiting waitpoints of its sessions. Each read comes back as one
/// `jsonb` array of rows. The text is the same whatever the batch's size, so it is parsed once
/// per connection.
///
/// One snapshot serves the whole statement. If the compare-and-set waits on another batch's
/// row lock, the reads may predate that batch's commit; but then that batch moved the log, this
/// compare-and-set finds it elsewhere, and the batch is fenced without writing anything. Outside
/// the partition's batches only two things write these rows, and neither is affected: waitpoint
/// time-outs (a completion is guarded by `status = 'WAITING'`, whoever comes second changes
/// nothing) and the retention purge (closed or expired sessions past retention, and records
/// below a trim point: rows no append writes or reads back). Separate statements had separate
/// snapshots (READ COMMITTED) and were no more consistent with those.
static FENCE_AND_READ_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        r#"WITH moved AS ({advance})
SELECT (SELECT count(*) FROM moved) AS moved,
  (SELECT coalesce(jsonb_agg(to_jsonb(s)), '[]'::jsonb)
     FROM sessions AS s WHERE s.id = ANY($2::uuid[])) AS sessions,
  (SELECT coalesce(jsonb_agg(to_jsonb(known)), '[]'::jsonb) FROM (
     SELECT r.* FROM records AS r WHERE r.command_id = ANY($3::uuid[])
     UNION ALL
     SELECT r.* FROM unnest($4::uuid[], $5::text[], $6::text[]) AS k(session_id, stream, part_id)
     JOIN record_part_ids AS p
       ON p.session_id = k.session_id AND p.stream = k.stream AND p.part_id = k.part_id
     JOIN records AS r ON r.session_id = p.session_id AND r.io = p.stream AND r.seq_num = p.seq_num
   ) AS known) AS known_records,
  (SELECT coalesce(jsonb_agg(to_jsonb(w)), '[]'::jsonb)
     FROM waitpoints AS w WHERE w.session_id = ANY($2::uuid[]) AND w.status = 'WAITING')
    AS waiting_waitpoints"#,
        advance = super::logs::ADVANCE_LOGS_SQL
    )
});

/// The rows every batch reads (see [`FENCE_AND_READ_SQL`]).
#[derive(Default)]
struct BatchRows {
    sessions: Vec<sessions::Model>,
    /// Records of the batch's appends (by command id) and owners of its part ids; a row may
    /// come for either reason, or both.
    known_records: Vec<records::Model>,
    waiting_waitpoints: Vec<waitpoints::Model>,
}

/// What the batch's commands name: the keys of [`BatchRows`].
struct BatchKeys {
    session_ids: Vec<Uuid>,
    append_ids: Vec<Uuid>,
    part_keys: Vec<DedupKey>,
}

/// Moves the logs and reads [`BatchRows`] in one statement (Postgres).
async fn fence_and_read_postgres(
    txn: &DatabaseTransaction,
    advances: &[super::LogAdvance],
    keys: &BatchKeys,
) -> Result<BatchRows, StorageError> {
    let values = [
        super::logs::advances_parameter(advances),
        Value::from(keys.session_ids.clone()),
        Value::from(keys.append_ids.clone()),
        Value::from(
            keys.part_keys
                .iter()
                .map(|k| k.session_id)
                .collect::<Vec<_>>(),
        ),
        Value::from(
            keys.part_keys
                .iter()
                .map(|k| k.stream.key())
                .collect::<Vec<_>>(),
        ),
        Value::from(
            keys.part_keys
                .iter()
                .map(|k| k.part_id.clone())
                .collect::<Vec<_>>(),
        ),
    ];
    let row = txn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            FENCE_AND_READ_SQL.as_str(),
            values,
        ))
        .await?
        .ok_or_else(|| {
            StorageError::Inconsistent("the batch's first statement returned no row".into())
        })?;
    let moved: i64 = row.try_get("", "moved")?;
    super::logs::fenced_unless_all_moved(u64::try_from(moved).unwrap_or(0), advances)?;
    Ok(BatchRows {
        sessions: rows_of_json(&row, "sessions")?,
        known_records: rows_of_json(&row, "known_records")?,
        waiting_waitpoints: rows_of_json(&row, "waiting_waitpoints")?,
    })
}

/// A `jsonb` array of table rows (`to_jsonb` of each) as entity models.
fn rows_of_json<M: serde::de::DeserializeOwned>(
    row: &sea_orm::QueryResult,
    column: &str,
) -> Result<Vec<M>, StorageError> {
    let value: serde_json::Value = row.try_get("", column)?;
    serde_json::from_value(value).map_err(|error| {
        StorageError::Inconsistent(format!("rows of `{column}` are unreadable: {error}"))
    })
}

/// Moves the logs, then reads [`BatchRows`] one query at a time (SQLite, the embedded default).
async fn fence_and_read_sqlite(
    txn: &DatabaseTransaction,
    advances: &[super::LogAdvance],
    keys: &BatchKeys,
) -> Result<BatchRows, StorageError> {
    super::logs::advance_logs_sqlite(txn, advances).await?;
    let backend = txn.get_database_backend();
    let mut rows = BatchRows::default();
    for chunk in keys.session_ids.chunks(CHUNK) {
        rows.sessions.extend(
            sessions::Entity::find()
                .filter(id_in(backend, sessions::Column::Id, chunk))
                .all(txn)
                .await?,
        );
    }
    for chunk in keys.append_ids.chunks(CHUNK) {
        rows.known_records.extend(
            records::Entity::find()
                .filter(id_in(backend, records::Column::CommandId, chunk))
                .all(txn)
                .await?,
        );
    }
    for chunk in keys.part_keys.chunks(CHUNK / 4) {
        rows.known_records
            .extend(part_owner_rows_sqlite(txn, chunk).await?);
    }
    for chunk in keys.session_ids.chunks(CHUNK) {
        rows.waiting_waitpoints.extend(
            waitpoints::Entity::find()
                .filter(id_in(backend, waitpoints::Column::SessionId, chunk))
                .filter(waitpoints::Column::Status.eq(WaitpointStatus::Waiting.as_str()))
                .all(txn)
                .await?,
        );
    }
    Ok(rows)
}

/// The records owning `keys` (SQLite, the embedded default): the part-id rows, then their records.
async fn part_owner_rows_sqlite(
    txn: &DatabaseTransaction,
    keys: &[DedupKey],
) -> Result<Vec<records::Model>, StorageError> {
    let mut used = Condition::any();
    for key in keys {
        used = used.add(
            Condition::all()
                .add(record_part_ids::Column::SessionId.eq(key.session_id))
                .add(record_part_ids::Column::Stream.eq(key.stream.key()))
                .add(record_part_ids::Column::PartId.eq(key.part_id.as_str())),
        );
    }
    let owners = record_part_ids::Entity::find()
        .filter(used)
        .all(txn)
        .await?;
    if owners.is_empty() {
        return Ok(Vec::new());
    }
    let mut records_of_owners = Condition::any();
    for owner in &owners {
        records_of_owners = records_of_owners.add(
            Condition::all()
                .add(records::Column::SessionId.eq(owner.session_id))
                .add(records::Column::Io.eq(owner.stream.as_str()))
                .add(records::Column::SeqNum.eq(owner.seq_num)),
        );
    }
    Ok(records::Entity::find()
        .filter(records_of_owners)
        .all(txn)
        .await?)
}

/// The next seqNum of every named-channel stream `commands` append to: one past the last
/// record's, found through the records primary key (session, stream, seqNum). Batches name few
/// such streams; each costs one index probe.
async fn load_named_stream_heads(
    txn: &DatabaseTransaction,
    commands: &[Command],
    state: &mut LoadedState,
) -> Result<(), StorageError> {
    let mut streams: Vec<(Uuid, Uuid, String)> = commands
        .iter()
        .filter_map(|command| match &command.body {
            CommandBody::Append(append) if append.channel.is_some() => Some((
                command.environment_id,
                command.session_id,
                append.stream().key(),
            )),
            CommandBody::AppendRecords(batch) if batch.channel.is_some() => Some((
                command.environment_id,
                command.session_id,
                batch.stream().key(),
            )),
            _ => None,
        })
        .collect();
    streams.sort_unstable();
    streams.dedup();
    for (environment_id, session_id, key) in streams {
        let next = super::next_seq_of_named_stream(txn, environment_id, session_id, &key).await?;
        state.named_stream_heads.insert((session_id, key), next);
    }
    Ok(())
}

/// Moves the batch's logs (the offsets fence) and loads what `commands` need.
async fn load_state(
    txn: &DatabaseTransaction,
    advances: &[super::LogAdvance],
    commands: &[Command],
) -> Result<LoadedState, StorageError> {
    let backend = txn.get_database_backend();
    let mut state = LoadedState {
        // Postgres keeps microseconds: outcomes computed in memory must equal what a read returns.
        now: Utc::now().trunc_subsecs(6),
        ..LoadedState::default()
    };
    let mut session_ids: Vec<Uuid> = commands.iter().map(|c| c.session_id).collect();
    session_ids.sort_unstable();
    session_ids.dedup();
    let keys = BatchKeys {
        session_ids,
        append_ids: commands
            .iter()
            .filter(|c| matches!(c.body, CommandBody::Append(_)))
            .map(|c| c.id)
            .collect(),
        part_keys: commands
            .iter()
            .filter_map(|c| match &c.body {
                CommandBody::Append(append) => append.part_id.as_ref().map(|part_id| DedupKey {
                    environment_id: c.environment_id,
                    session_id: c.session_id,
                    stream: append.stream(),
                    part_id: part_id.clone(),
                }),
                _ => None,
            })
            .collect(),
    };
    let batch_rows = if backend == DbBackend::Postgres {
        fence_and_read_postgres(txn, advances, &keys).await?
    } else {
        fence_and_read_sqlite(txn, advances, &keys).await?
    };
    for session in batch_rows.sessions {
        let session = rows::session_from_row(session)?;
        state.sessions.insert(session.id, session);
    }

    // A row may have come for either reason, or both; each fact below holds of any row found.
    let wanted_parts: HashSet<&DedupKey> = keys.part_keys.iter().collect();
    let appended: HashSet<Uuid> = keys.append_ids.iter().copied().collect();
    for record in batch_rows.known_records {
        if appended.contains(&record.command_id) {
            state
                .recorded_appends
                .insert(record.command_id, record.seq_num);
        }
        let (Some(part_id), Some(stream)) = (record.part_id, Stream::from_key(&record.io)) else {
            continue;
        };
        let key = DedupKey {
            environment_id: record.environment_id,
            session_id: record.session_id,
            stream,
            part_id,
        };
        if wanted_parts.contains(&key) {
            state.parts.insert(
                key,
                PartOwner {
                    seq_num: record.seq_num,
                    body_fingerprint: record.body_fingerprint,
                    body: record.body,
                },
            );
        }
    }

    let other_ids: Vec<Uuid> = commands
        .iter()
        .filter(|c| !matches!(c.body, CommandBody::Append(_)))
        .map(Command::outcome_key)
        .collect();
    for chunk in other_ids.chunks(CHUNK) {
        for applied in applied_commands::Entity::find()
            .filter(id_in(backend, applied_commands::Column::CommandId, chunk))
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

    load_named_stream_heads(txn, commands, &mut state).await?;

    for waitpoint in batch_rows.waiting_waitpoints {
        // A row no build writes cannot be waiting for anything this code knows.
        let Ok(waitpoint) = rows::waitpoint_from_row(waitpoint) else {
            continue;
        };
        state
            .waiting_waitpoints
            .entry((waitpoint.session_id, waitpoint.io))
            .or_default()
            .push(waitpoint);
    }
    for waitpoints in state.waiting_waitpoints.values_mut() {
        waitpoints.sort_by_key(|waitpoint| waitpoint.created_at);
    }

    load_registration_state(txn, commands, &mut state).await?;

    let needs_runs = commands.iter().any(|c| {
        !matches!(
            c.body,
            CommandBody::Append(_) | CommandBody::AppendRecords(_)
        )
    });
    if needs_runs {
        let run_ids: Vec<Uuid> = state
            .sessions
            .values()
            .filter_map(|s| s.current_run_id)
            .collect();
        for chunk in run_ids.chunks(CHUNK) {
            for run in runs::Entity::find()
                .filter(id_in(backend, runs::Column::Id, chunk))
                .all(txn)
                .await?
            {
                state.run_friendly_ids.insert(run.id, run.friendly_id);
            }
        }
    }
    Ok(state)
}

/// The records that registrations with `lastSeqNum` wait for (Postgres): one join against the
/// unnested `(session, io, seqNum)` triples.
const NEXT_RECORDS_SQL: &str = r#"SELECT r.* FROM records AS r
JOIN unnest($1::uuid[], $2::text[], $3::int8[]) AS k(session_id, io, seq_num)
  ON r.session_id = k.session_id AND r.io = k.io AND r.seq_num = k.seq_num"#;

/// What the batch's waitpoint registrations need, in two queries whatever their number: the
/// live waitpoints of their idempotency keys, and the record right after each `lastSeqNum`.
async fn load_registration_state(
    txn: &DatabaseTransaction,
    commands: &[Command],
    state: &mut LoadedState,
) -> Result<(), StorageError> {
    let registrations: Vec<(&Command, &crate::commands::RegisterWaitpointCommand)> = commands
        .iter()
        .filter_map(|command| match &command.body {
            CommandBody::RegisterWaitpoint(register) => Some((command, register.as_ref())),
            _ => None,
        })
        .collect();
    if registrations.is_empty() {
        return Ok(());
    }
    let backend = txn.get_database_backend();

    let keyed: Vec<(&Command, &String)> = registrations
        .iter()
        .filter_map(|(command, register)| {
            register.idempotency_key.as_ref().map(|key| (*command, key))
        })
        .collect();
    if !keyed.is_empty() {
        let mut environments: Vec<Uuid> = keyed.iter().map(|(c, _)| c.environment_id).collect();
        environments.sort_unstable();
        environments.dedup();
        let mut keys: Vec<String> = keyed.iter().map(|(_, key)| (*key).clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        let key_filter = match backend {
            DbBackend::Postgres => ExprTrait::eq(
                waitpoints::Column::IdempotencyKey.into_expr(),
                PgFunc::any(Expr::val(Value::from(keys))),
            ),
            _ => waitpoints::Column::IdempotencyKey.is_in(keys),
        };
        let candidates = waitpoints::Entity::find()
            .filter(id_in(
                backend,
                waitpoints::Column::EnvironmentId,
                &environments,
            ))
            .filter(key_filter)
            .all(txn)
            .await?;
        for (command, key) in keyed {
            let live = candidates.iter().find(|waitpoint| {
                waitpoint.environment_id == command.environment_id
                    && waitpoint.idempotency_key.as_ref() == Some(key)
                    && waitpoint
                        .idempotency_key_expires_at
                        .is_some_and(|expires| expires > command.accepted_at)
            });
            if let Some(live) = live.and_then(|live| rows::waitpoint_from_row(live.clone()).ok()) {
                state
                    .waitpoints_by_key
                    .insert((command.environment_id, key.clone()), live);
            }
        }
    }

    let wanted: Vec<(&Command, Io, i64)> = registrations
        .iter()
        .filter_map(|(command, register)| {
            register
                .last_seq_num
                .map(|last| (*command, register.io, last.saturating_add(1)))
        })
        .collect();
    if !wanted.is_empty() {
        let rows = if backend == DbBackend::Postgres {
            let values = [
                Value::from(
                    wanted
                        .iter()
                        .map(|(c, _, _)| c.session_id)
                        .collect::<Vec<_>>(),
                ),
                Value::from(
                    wanted
                        .iter()
                        .map(|(_, io, _)| io.as_str().to_owned())
                        .collect::<Vec<_>>(),
                ),
                Value::from(wanted.iter().map(|(_, _, seq)| *seq).collect::<Vec<_>>()),
            ];
            records::Entity::find()
                .from_raw_sql(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    NEXT_RECORDS_SQL,
                    values,
                ))
                .all(txn)
                .await?
        } else {
            let mut any = Condition::any();
            for (command, io, seq) in &wanted {
                any = any.add(
                    Condition::all()
                        .add(records::Column::SessionId.eq(command.session_id))
                        .add(records::Column::Io.eq(io.as_str()))
                        .add(records::Column::SeqNum.eq(*seq)),
                );
            }
            records::Entity::find().filter(any).all(txn).await?
        };
        for (command, io, seq) in wanted {
            let record = rows.iter().find(|record| {
                record.environment_id == command.environment_id
                    && record.session_id == command.session_id
                    && record.io == io.as_str()
                    && record.seq_num == seq
            });
            if let Some(record) = record {
                state
                    .record_bodies
                    .insert((record.session_id, io, record.seq_num), record.body.clone());
            }
        }
    }
    Ok(())
}

async fn write(
    txn: &DatabaseTransaction,
    writes: BatchWrites,
) -> Result<Vec<OutboxEvent>, StorageError> {
    for chunk in writes.inserted_sessions.chunks(CHUNK / 4) {
        sessions::Entity::insert_many(chunk.iter().cloned().map(rows::session_row))
            .exec_without_returning(txn)
            .await?;
    }
    if txn.get_database_backend() == DbBackend::Postgres {
        update_sessions_and_insert_records_postgres(txn, &writes.updated_sessions, writes.records)
            .await?;
    } else {
        update_sessions_generic(txn, &writes.updated_sessions).await?;
        for chunk in writes.records.chunks(CHUNK) {
            records::Entity::insert_many(chunk.iter().cloned().map(rows::record_row))
                .exec_without_returning(txn)
                .await?;
        }
        let part_ids: Vec<record_part_ids::ActiveModel> = writes
            .records
            .iter()
            .filter_map(|record| {
                Some(record_part_ids::ActiveModel {
                    session_id: sea_orm::Set(record.session_id),
                    stream: sea_orm::Set(record.stream.key()),
                    part_id: sea_orm::Set(record.part_id.clone()?),
                    seq_num: sea_orm::Set(record.seq_num),
                })
            })
            .collect();
        for chunk in part_ids.chunks(CHUNK) {
            record_part_ids::Entity::insert_many(chunk.iter().cloned())
                .exec_without_returning(txn)
                .await?;
        }
    }
    for chunk in writes.runs.chunks(CHUNK) {
        runs::Entity::insert_many(chunk.iter().cloned().map(rows::run_row))
            .exec_without_returning(txn)
            .await?;
    }
    for chunk in writes.new_waitpoints.chunks(CHUNK / 4) {
        waitpoints::Entity::insert_many(chunk.iter().cloned().map(rows::waitpoint_row))
            .exec_without_returning(txn)
            .await?;
    }
    write_trims(txn, &writes.trims).await?;
    let mut outbox_events = writes.outbox;
    outbox_events.extend(complete_waitpoints(txn, writes.waitpoint_completions).await?);
    let now = Utc::now();
    for chunk in writes.applied_outcomes.chunks(CHUNK) {
        applied_commands::Entity::insert_many(chunk.iter().map(
            |(command_id, session_id, outcome)| applied_commands::ActiveModel {
                command_id: sea_orm::Set(*command_id),
                outcome: sea_orm::Set(serde_json::to_value(outcome).unwrap_or_default()),
                applied_at: sea_orm::Set(now),
                session_id: sea_orm::Set(Some(*session_id)),
            },
        ))
        .exec_without_returning(txn)
        .await?;
    }
    insert_outbox(txn, outbox_events).await
}

/// The touched sessions' mutable columns (SQLite).
async fn update_sessions_generic(
    txn: &DatabaseTransaction,
    updated_sessions: &[Session],
) -> Result<(), StorageError> {
    // One UPDATE per chunk of sessions, not one per session: a batch touches many sessions and
    // each round trip costs more than the row (per-column CASE on the id; every row of the
    // chunk matches a branch, so no ELSE is needed and JSON values keep their own type).
    for chunk in updated_sessions.chunks(SESSION_UPDATE_CHUNK) {
        let per_session = |value: &dyn Fn(&Session) -> sea_orm::Value| {
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
                per_session(&|session| serde_json::json!(session.tags).into()),
            )
            .col_expr(
                sessions::Column::Metadata,
                per_session(&|session| session.metadata.clone().into()),
            )
            .col_expr(
                sessions::Column::TriggerConfig,
                per_session(&|session| session.trigger_config.clone().into()),
            )
            .col_expr(
                sessions::Column::UpdatedAt,
                per_session(&|session| session.updated_at.into()),
            )
            .filter(sessions::Column::Id.is_in(chunk.iter().map(|session| session.id)))
            .exec(txn)
            .await?;
    }
    Ok(())
}

/// The batch's writes of every append (Postgres), in one statement and one round trip: the
/// touched sessions' mutable columns (`UPDATE … FROM jsonb_to_recordset($12)`: one JSON
/// parameter rather than one array per column, because the driver binds arrays without NULL
/// elements only), the new records (`INSERT … SELECT FROM unnest($1…$11)`, one typed array per
/// column), and the part ids of the records that have one into `record_part_ids` (the fence; a
/// part id already taken fails the statement). The text is the same whatever the number of rows,
/// so it is prepared and planned once per connection. Typed arrays travel in the binary
/// protocol; a `jsonb` array of record objects (what the records were before) had to be built
/// as JSON here and parsed there: measured with 100-record statements (pgbench, arrays given as
/// text), the same insert from arrays cost Postgres 27–30 % less time. The driver cannot put NULL
/// inside an array, so a record without a part id sends `''` (part ids are never empty) and one
/// without headers sends JSON `null` (headers are always an array).
const UPDATE_SESSIONS_AND_INSERT_RECORDS_SQL: &str = r#"WITH updated_sessions AS (
UPDATE sessions AS s SET
  next_seq_in = u.next_seq_in, next_seq_out = u.next_seq_out, closed_at = u.closed_at,
  closed_reason = u.closed_reason, current_run_id = u.current_run_id, tags = u.tags,
  metadata = u.metadata, trigger_config = u.trigger_config, updated_at = u.updated_at
FROM jsonb_to_recordset($12::jsonb) AS u(id uuid, next_seq_in int8, next_seq_out int8,
  closed_at timestamptz, closed_reason text, current_run_id uuid, tags jsonb, metadata jsonb,
  trigger_config jsonb, updated_at timestamptz)
WHERE s.id = u.id),
inserted AS (
INSERT INTO records
  (session_id, io, seq_num, environment_id, part_id, body, body_fingerprint, command_id, created_at,
   headers, body_is_envelope)
SELECT session_id, io, seq_num, environment_id, NULLIF(part_id, ''), body, body_fingerprint,
       command_id, created_at, NULLIF(headers, 'null'::jsonb), body_is_envelope
FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::uuid[], $5::text[], $6::text[], $7::text[],
            $8::uuid[], $9::timestamptz[], $10::jsonb[], $11::bool[])
  AS r(session_id, io, seq_num, environment_id, part_id, body, body_fingerprint, command_id,
       created_at, headers, body_is_envelope)
RETURNING session_id, io, part_id, seq_num)
INSERT INTO record_part_ids (session_id, stream, part_id, seq_num)
SELECT session_id, io, part_id, seq_num FROM inserted WHERE part_id IS NOT NULL"#;

async fn update_sessions_and_insert_records_postgres(
    txn: &DatabaseTransaction,
    updated_sessions: &[Session],
    new_records: Vec<StoredRecord>,
) -> Result<(), StorageError> {
    if updated_sessions.is_empty() && new_records.is_empty() {
        return Ok(());
    }
    let sessions: Vec<serde_json::Value> = updated_sessions
        .iter()
        .map(|row| {
            serde_json::json!({
                "id": row.id,
                "next_seq_in": row.next_seq_in,
                "next_seq_out": row.next_seq_out,
                "closed_at": row.closed_at,
                "closed_reason": row.closed_reason,
                "current_run_id": row.current_run_id,
                "tags": row.tags,
                "metadata": row.metadata,
                "trigger_config": row.trigger_config,
                "updated_at": row.updated_at,
            })
        })
        .collect();
    let count = new_records.len();
    let mut session_ids = Vec::with_capacity(count);
    let mut streams = Vec::with_capacity(count);
    let mut seq_nums = Vec::with_capacity(count);
    let mut environment_ids = Vec::with_capacity(count);
    let mut part_ids = Vec::with_capacity(count);
    let mut bodies = Vec::with_capacity(count);
    let mut fingerprints = Vec::with_capacity(count);
    let mut command_ids = Vec::with_capacity(count);
    let mut created_ats = Vec::with_capacity(count);
    let mut headers = Vec::with_capacity(count);
    let mut envelopes = Vec::with_capacity(count);
    for row in new_records {
        headers.push(rows::stored_headers(&row).unwrap_or(serde_json::Value::Null));
        session_ids.push(row.session_id);
        streams.push(row.stream.key());
        seq_nums.push(row.seq_num);
        environment_ids.push(row.environment_id);
        part_ids.push(row.part_id.unwrap_or_default());
        bodies.push(row.body);
        fingerprints.push(row.body_fingerprint);
        command_ids.push(row.command_id);
        created_ats.push(row.created_at);
        envelopes.push(row.body_is_envelope);
    }
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        UPDATE_SESSIONS_AND_INSERT_RECORDS_SQL,
        [
            Value::from(session_ids),
            Value::from(streams),
            Value::from(seq_nums),
            Value::from(environment_ids),
            Value::from(part_ids),
            Value::from(bodies),
            Value::from(fingerprints),
            Value::from(command_ids),
            Value::from(created_ats),
            Value::from(headers),
            Value::from(envelopes),
            Value::from(serde_json::Value::Array(sessions)),
        ],
    ))
    .await?;
    Ok(())
}

/// Raises a stream's trim point, never lowers it.
const UPSERT_TRIM_SQL_POSTGRES: &str = "INSERT INTO stream_trims (session_id, stream, trim_seq) \
VALUES ($1, $2, $3) ON CONFLICT (session_id, stream) \
DO UPDATE SET trim_seq = GREATEST(stream_trims.trim_seq, EXCLUDED.trim_seq)";
const UPSERT_TRIM_SQL_SQLITE: &str = "INSERT INTO stream_trims (session_id, stream, trim_seq) \
VALUES (?, ?, ?) ON CONFLICT (session_id, stream) \
DO UPDATE SET trim_seq = max(stream_trims.trim_seq, excluded.trim_seq)";

/// One statement per trimmed stream: trims are rare (an agent trims once per turn).
async fn write_trims(txn: &DatabaseTransaction, trims: &[StreamTrim]) -> Result<(), StorageError> {
    let backend = txn.get_database_backend();
    let sql = if backend == DbBackend::Postgres {
        UPSERT_TRIM_SQL_POSTGRES
    } else {
        UPSERT_TRIM_SQL_SQLITE
    };
    for trim in trims {
        txn.execute_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [
                Value::from(trim.session_id),
                Value::from(trim.stream.clone()),
                Value::from(trim.trim_seq),
            ],
        ))
        .await?;
    }
    Ok(())
}

/// Sessions per batched UPDATE (8 columns × 2 parameters each, well within both backends'
/// parameter limits).
const SESSION_UPDATE_CHUNK: usize = 64;

/// The completions of a batch (Postgres): one guarded `UPDATE … FROM jsonb_to_recordset`,
/// returning the waitpoints it changed.
const COMPLETE_WAITPOINTS_SQL: &str = r#"UPDATE waitpoints AS w
SET status = u.status, output = u.output, output_is_error = u.output_is_error,
    completed_by_seq = u.completed_by_seq, completed_at = u.completed_at
FROM jsonb_to_recordset($1::jsonb) AS u(id uuid, status text, output text,
  output_is_error boolean, completed_by_seq int8, completed_at timestamptz)
WHERE w.id = u.id AND w.status = 'WAITING'
RETURNING w.id"#;

/// Applies completions guarded by `status = 'WAITING'` and returns the events of those that
/// took effect: a waitpoint completes (or times out) at most once, whoever tries. One statement
/// on Postgres whatever their number.
pub(crate) async fn complete_waitpoints(
    txn: &DatabaseTransaction,
    completions: Vec<WaitpointCompletion>,
) -> Result<Vec<NewOutboxEvent>, StorageError> {
    // A waitpoint listed twice changes once, with its first completion in batch order (an
    // `UPDATE … FROM` with two matching rows would pick one of them unpredictably).
    let mut seen = HashSet::new();
    let completions: Vec<WaitpointCompletion> = completions
        .into_iter()
        .filter(|completion| seen.insert(completion.waitpoint_id))
        .collect();
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    if txn.get_database_backend() == DbBackend::Postgres {
        let rows: Vec<serde_json::Value> = completions
            .iter()
            .map(|completion| {
                serde_json::json!({
                    "id": completion.waitpoint_id,
                    "status": completion.status,
                    "output": completion.output,
                    "output_is_error": completion.output_is_error,
                    "completed_by_seq": completion.completed_by_seq,
                    "completed_at": completion.completed_at,
                })
            })
            .collect();
        let changed: HashSet<Uuid> = txn
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                COMPLETE_WAITPOINTS_SQL,
                [Value::from(serde_json::Value::Array(rows))],
            ))
            .await?
            .iter()
            .filter_map(|row| row.try_get::<Uuid>("", "id").ok())
            .collect();
        return Ok(completions
            .into_iter()
            .filter(|completion| changed.contains(&completion.waitpoint_id))
            .map(|completion| completion.event)
            .collect());
    }
    let mut events = Vec::with_capacity(completions.len());
    for completion in completions {
        let result = waitpoints::Entity::update_many()
            .col_expr(
                waitpoints::Column::Status,
                Expr::value(completion.status.as_str()),
            )
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
            .filter(waitpoints::Column::Status.eq(WaitpointStatus::Waiting.as_str()))
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
) -> Result<Vec<OutboxEvent>, StorageError> {
    let now = Utc::now();
    let outbox: Vec<OutboxEvent> = events
        .into_iter()
        .map(|event| OutboxEvent {
            id: Uuid::now_v7(),
            routing_key: event.routing_key,
            payload: event.payload,
            created_at: now,
        })
        .collect();
    for chunk in outbox.chunks(CHUNK) {
        outbox_events::Entity::insert_many(chunk.iter().cloned().map(rows::outbox_event_row))
            .exec_without_returning(txn)
            .await?;
    }
    Ok(outbox)
}
