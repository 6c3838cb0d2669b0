//! Partition log bookkeeping in the database: the position of the last message applied from
//! each log (advanced with a compare-and-set inside the batch transaction: the offsets fence),
//! the leases that say which worker reads which log, and the dead letters.
//!
//! The fence is what keeps per-session order and exactly-once application: a batch commits only
//! if every log it read from is still where the batch started. Leases only avoid wasted work.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    QueryFilter, QueryOrder, Statement, Value,
};
use uuid::Uuid;

use super::entities::{dead_letters, log_positions, partition_leases};
use super::{StorageError, Store};
use crate::domain::log::ResumePoint;

/// A batch read `log` from just after `from` (the stored applied offset; `None`: nothing
/// applied yet) up to and including `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogAdvance {
    pub log: String,
    pub from: Option<i64>,
    pub to: i64,
    pub to_message_id: Option<String>,
}

/// A message that can never be applied, recorded in the transaction that moves past it.
#[derive(Clone, Debug)]
pub struct NewDeadLetter {
    pub log: String,
    pub partition: u16,
    /// Its offset in the log (`None`: it came from a legacy partition queue).
    pub offset: Option<i64>,
    pub message_id: Option<String>,
    pub payload: Vec<u8>,
    pub reason: String,
}

/// A dead letter as operators see it.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub id: Uuid,
    pub log: String,
    pub partition: u16,
    pub offset: Option<i64>,
    pub message_id: Option<String>,
    pub payload: Vec<u8>,
    pub reason: String,
    pub created_at: DateTime<Utc>,
}

/// The compare-and-set of every log a batch read (Postgres): one statement, whatever the number
/// of logs, returning a row per log it moved. The batch transaction runs it as the first part of
/// its first statement (`apply.rs`); the caller compares the rows with the number of logs.
pub(super) const ADVANCE_LOGS_SQL: &str = r#"UPDATE log_positions AS p
SET applied_offset = u.to_offset, applied_message_id = u.message_id,
    resume_from_first = false, updated_at = now()
FROM jsonb_to_recordset($1::jsonb) AS u(log text, from_offset int8, to_offset int8, message_id text)
WHERE p.log = u.log AND p.applied_offset IS NOT DISTINCT FROM u.from_offset
RETURNING p.log"#;

/// The same for one log (SQLite, the embedded default).
const ADVANCE_LOG_SQLITE: &str = r#"UPDATE log_positions
SET applied_offset = ?, applied_message_id = ?, resume_from_first = 0, updated_at = ?
WHERE log = ? AND applied_offset IS ?"#;

/// `$1` of [`ADVANCE_LOGS_SQL`]: the batch's advances as one `jsonb` array.
pub(super) fn advances_parameter(advances: &[LogAdvance]) -> Value {
    let rows: Vec<serde_json::Value> = advances
        .iter()
        .map(|advance| {
            serde_json::json!({
                "log": advance.log,
                "from_offset": advance.from,
                "to_offset": advance.to,
                "message_id": advance.to_message_id,
            })
        })
        .collect();
    Value::from(serde_json::Value::Array(rows))
}

/// Fails with [`StorageError::Fenced`] unless the compare-and-set moved every log of
/// `advances` (`moved` of them did): any other outcome means another reader applied one of
/// them, or an earlier batch of this reader failed, and this batch must write nothing.
pub(super) fn fenced_unless_all_moved(
    moved: u64,
    advances: &[LogAdvance],
) -> Result<(), StorageError> {
    if moved != advances.len() as u64 {
        return Err(StorageError::Fenced(format!(
            "{} of {} partition logs were not where this batch started",
            (advances.len() as u64).saturating_sub(moved),
            advances.len()
        )));
    }
    Ok(())
}

/// Moves every log of `advances` forward (SQLite, the embedded default; Postgres does this in
/// the batch's first statement), or fails with [`StorageError::Fenced`]. Runs first in the
/// batch transaction: the row locks it takes make a later batch of the same log wait for this
/// one's commit.
pub(super) async fn advance_logs_sqlite(
    txn: &DatabaseTransaction,
    advances: &[LogAdvance],
) -> Result<(), StorageError> {
    let mut moved = 0;
    for advance in advances {
        moved += txn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                ADVANCE_LOG_SQLITE,
                [
                    Value::from(advance.to),
                    Value::from(advance.to_message_id.clone()),
                    Value::from(Utc::now()),
                    Value::from(advance.log.clone()),
                    Value::from(advance.from),
                ],
            ))
            .await?
            .rows_affected();
    }
    fenced_unless_all_moved(moved, advances)
}

pub(super) async fn insert_dead_letters(
    txn: &DatabaseTransaction,
    letters: &[NewDeadLetter],
) -> Result<(), StorageError> {
    if letters.is_empty() {
        return Ok(());
    }
    let now = Utc::now();
    dead_letters::Entity::insert_many(letters.iter().map(|letter| dead_letters::ActiveModel {
        id: ActiveValue::Set(Uuid::now_v7()),
        log: ActiveValue::Set(letter.log.clone()),
        partition: ActiveValue::Set(i32::from(letter.partition)),
        log_offset: ActiveValue::Set(letter.offset),
        message_id: ActiveValue::Set(letter.message_id.clone()),
        payload: ActiveValue::Set(letter.payload.clone()),
        reason: ActiveValue::Set(letter.reason.clone()),
        created_at: ActiveValue::Set(now),
        replayed_at: ActiveValue::Set(None),
    }))
    .exec_without_returning(txn)
    .await?;
    Ok(())
}

impl Store {
    /// Makes sure every log in `logs` has a position row (nothing applied yet for new ones), so
    /// that the fence is a plain compare-and-set. In one transaction: a process checking the
    /// partition count at start (`partition_count_mismatch`) sees all of them or none.
    pub async fn ensure_log_positions(&self, logs: &[String]) -> Result<(), StorageError> {
        use sea_orm::TransactionTrait;
        let now = Utc::now();
        let transaction = self.connection().begin().await?;
        for log in logs {
            let backend = self.connection().get_database_backend();
            let sql = match backend {
                DbBackend::Postgres => {
                    "INSERT INTO log_positions (log, applied_offset, applied_message_id, \
                     resume_from_first, updated_at) VALUES ($1, NULL, NULL, false, $2) \
                     ON CONFLICT (log) DO NOTHING"
                }
                _ => {
                    "INSERT INTO log_positions (log, applied_offset, applied_message_id, \
                     resume_from_first, updated_at) VALUES (?, NULL, NULL, 0, ?) \
                     ON CONFLICT (log) DO NOTHING"
                }
            };
            transaction
                .execute_raw(Statement::from_sql_and_values(
                    backend,
                    sql,
                    [Value::from(log.clone()), Value::from(now)],
                ))
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Why a process must not start with the partition logs `expected`, given the logs this
    /// database has positions of (`domain::partition::partition_count_mismatch`); `None`: it may.
    pub async fn partition_count_mismatch(
        &self,
        expected: &[String],
    ) -> Result<Option<String>, StorageError> {
        use sea_orm::QuerySelect;
        let recorded: Vec<String> = log_positions::Entity::find()
            .select_only()
            .column(log_positions::Column::Log)
            .into_tuple()
            .all(self.connection())
            .await?;
        Ok(crate::domain::partition::partition_count_mismatch(
            expected, &recorded,
        ))
    }

    /// Where a reader of each of `logs` resumes (a log without a row: from the beginning).
    pub async fn log_positions(
        &self,
        logs: &[String],
    ) -> Result<HashMap<String, ResumePoint>, StorageError> {
        let rows = log_positions::Entity::find()
            .filter(log_positions::Column::Log.is_in(logs.iter().cloned()))
            .all(self.connection())
            .await?;
        let mut positions: HashMap<String, ResumePoint> = logs
            .iter()
            .map(|log| (log.clone(), ResumePoint::Beginning))
            .collect();
        for row in rows {
            let resume = match (row.applied_offset, row.resume_from_first) {
                (Some(offset), _) => ResumePoint::AfterApplied {
                    offset,
                    message_id: row.applied_message_id,
                },
                (None, true) => ResumePoint::FirstAvailable,
                (None, false) => ResumePoint::Beginning,
            };
            positions.insert(row.log, resume);
        }
        Ok(positions)
    }

    /// An operator accepts that `log` lost messages (retention removed them before they were
    /// applied): its reader restarts at the first message the log still holds. Returns whether
    /// the log was known.
    pub async fn accept_log_gap(&self, log: &str) -> Result<bool, StorageError> {
        let updated = log_positions::Entity::update_many()
            .col_expr(
                log_positions::Column::AppliedOffset,
                sea_orm::sea_query::Expr::value(Value::BigInt(None)),
            )
            .col_expr(
                log_positions::Column::AppliedMessageId,
                sea_orm::sea_query::Expr::value(Value::String(None)),
            )
            .col_expr(
                log_positions::Column::ResumeFromFirst,
                sea_orm::sea_query::Expr::value(true),
            )
            .col_expr(
                log_positions::Column::UpdatedAt,
                sea_orm::sea_query::Expr::value(Utc::now()),
            )
            .filter(log_positions::Column::Log.eq(log))
            .exec(self.connection())
            .await?;
        Ok(updated.rows_affected > 0)
    }

    /// Claims or renews the leases of `claims` (`(log, is this worker's home partition)`) for
    /// `owner` until `now + ttl`. A lease is taken when it is free, expired or already ours;
    /// a home worker also takes its home partitions from a worker for which they are not home
    /// (that is the hand-back). Returns the logs `owner` holds now.
    pub async fn claim_partition_leases(
        &self,
        owner: &str,
        claims: &[(String, bool)],
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<HashSet<String>, StorageError> {
        let expires_at = now + chrono::TimeDelta::from_std(ttl).unwrap_or_default();
        let backend = self.connection().get_database_backend();
        let placeholder = |n: usize| match backend {
            DbBackend::Postgres => format!("${n}"),
            _ => "?".to_owned(),
        };
        let sql = format!(
            "INSERT INTO partition_leases (log, owner, owner_is_home, expires_at) \
             VALUES ({}, {}, {}, {}) \
             ON CONFLICT (log) DO UPDATE SET owner = excluded.owner, \
               owner_is_home = excluded.owner_is_home, expires_at = excluded.expires_at \
             WHERE partition_leases.owner = excluded.owner \
                OR partition_leases.expires_at < {} \
                OR (excluded.owner_is_home AND NOT partition_leases.owner_is_home) \
             RETURNING log",
            placeholder(1),
            placeholder(2),
            placeholder(3),
            placeholder(4),
            placeholder(5),
        );
        let mut held = HashSet::new();
        for (log, home) in claims {
            let returned = self
                .connection()
                .query_one_raw(Statement::from_sql_and_values(
                    backend,
                    sql.as_str(),
                    [
                        Value::from(log.clone()),
                        Value::from(owner.to_owned()),
                        Value::from(*home),
                        Value::from(expires_at),
                        Value::from(now),
                    ],
                ))
                .await?;
            if returned.is_some() {
                held.insert(log.clone());
            }
        }
        Ok(held)
    }

    /// Ends every lease of `owner` at once (a worker stopping gracefully), so that other workers
    /// take its partitions without waiting for the leases to expire.
    pub async fn release_partition_leases(&self, owner: &str) -> Result<(), StorageError> {
        partition_leases::Entity::update_many()
            .col_expr(
                partition_leases::Column::ExpiresAt,
                sea_orm::sea_query::Expr::value(DateTime::<Utc>::UNIX_EPOCH),
            )
            .filter(partition_leases::Column::Owner.eq(owner))
            .exec(self.connection())
            .await?;
        Ok(())
    }

    /// Dead letters not replayed yet, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StorageError> {
        Ok(dead_letters::Entity::find()
            .filter(dead_letters::Column::ReplayedAt.is_null())
            .order_by_asc(dead_letters::Column::CreatedAt)
            .all(self.connection())
            .await?
            .into_iter()
            .map(|row| DeadLetter {
                id: row.id,
                log: row.log,
                partition: u16::try_from(row.partition).unwrap_or(0),
                offset: row.log_offset,
                message_id: row.message_id,
                payload: row.payload,
                reason: row.reason,
                created_at: row.created_at,
            })
            .collect())
    }

    /// Marks a dead letter as replayed (it was published to its partition again).
    pub async fn mark_dead_letter_replayed(&self, id: Uuid) -> Result<(), StorageError> {
        dead_letters::Entity::update_many()
            .col_expr(
                dead_letters::Column::ReplayedAt,
                sea_orm::sea_query::Expr::value(Utc::now()),
            )
            .filter(dead_letters::Column::Id.eq(id))
            .exec(self.connection())
            .await?;
        Ok(())
    }
}
