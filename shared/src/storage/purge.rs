//! Data lifecycle in the database: deleting sessions that were closed or expired longer ago than
//! the retention (`SESSIONS_RETENTION_AFTER_CLOSE_SECONDS`), with everything that belongs to
//! them.
//!
//! Bounded and interruptible by construction: a session's records go first, in chunks of at most
//! `chunk` rows per statement (each its own short transaction, no long lock), then everything
//! else of the session and the session row in one small transaction. Every statement re-checks
//! that the session is still past the retention, so stopping at any point (or two workers
//! purging the same session) leaves nothing inconsistent: a session whose row still exists is
//! simply purged further on the next round.
//!
//! Also here: deleting records below their stream's trim point (a writer's trim command), see
//! [`Store::delete_trimmed_records`].
//!
//! What is not here: when purges run and their metrics (the worker's `purge` module).

use chrono::{DateTime, Utc};
use sea_orm::sea_query::ExprTrait;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Statement, TransactionTrait, Value,
};
use uuid::Uuid;

use super::entities::sessions;
use super::{StorageError, Store};

/// Rows one purge deleted, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowsPurged {
    pub records: u64,
    pub record_part_ids: u64,
    pub waitpoints: u64,
    pub applied_commands: u64,
    pub snapshots: u64,
    pub stream_trims: u64,
    pub runs: u64,
    pub sessions: u64,
}

impl RowsPurged {
    /// `(table, rows)` for metrics.
    pub fn by_table(&self) -> [(&'static str, u64); 8] {
        [
            ("records", self.records),
            ("record_part_ids", self.record_part_ids),
            ("waitpoints", self.waitpoints),
            ("applied_commands", self.applied_commands),
            ("session_snapshots", self.snapshots),
            ("stream_trims", self.stream_trims),
            ("runs", self.runs),
            ("sessions", self.sessions),
        ]
    }

    pub fn add(&mut self, other: RowsPurged) {
        self.records += other.records;
        self.record_part_ids += other.record_part_ids;
        self.waitpoints += other.waitpoints;
        self.applied_commands += other.applied_commands;
        self.snapshots += other.snapshots;
        self.stream_trims += other.stream_trims;
        self.runs += other.runs;
        self.sessions += other.sessions;
    }
}

/// Records of session `$1`, which must still be closed or expired before `$2`, at most `$3`.
/// `{row}` is the physical row id (see [`Store::delete_records_by_row`]).
const RECORDS_OF_PURGEABLE_SESSION: &str = "SELECT r.{row} FROM records r WHERE r.session_id = $1 \
AND EXISTS (SELECT 1 FROM sessions s WHERE s.id = $1 AND (s.closed_at < $2 OR s.expires_at < $2)) \
LIMIT $3";

/// Part ids of session `$1` (see [`RECORDS_OF_PURGEABLE_SESSION`]), at most `$3`.
const PART_IDS_OF_PURGEABLE_SESSION: &str = "SELECT p.{row} FROM record_part_ids p \
WHERE p.session_id = $1 \
AND EXISTS (SELECT 1 FROM sessions s WHERE s.id = $1 AND (s.closed_at < $2 OR s.expires_at < $2)) \
LIMIT $3";

/// Records below their stream's trim point, except those with a part id and each stream's last
/// record (see [`Store::delete_trimmed_records`]), at most `$1`.
const TRIMMED_RECORDS: &str = "SELECT r.{row} FROM stream_trims t \
JOIN records r ON r.session_id = t.session_id AND r.io = t.stream AND r.seq_num < t.trim_seq \
WHERE r.part_id IS NULL AND r.seq_num < (SELECT max(m.seq_num) FROM records m \
WHERE m.session_id = t.session_id AND m.io = t.stream) LIMIT $1";

fn chunk_value(chunk: u64) -> Value {
    Value::from(i64::try_from(chunk).unwrap_or(i64::MAX))
}

/// The parameters of the `…_OF_PURGEABLE_SESSION` selects: `$1` session, `$2` cutoff, `$3` chunk.
fn purgeable_session_values(session_id: Uuid, cutoff: DateTime<Utc>, chunk: u64) -> Vec<Value> {
    vec![
        Value::from(session_id),
        Value::from(cutoff),
        chunk_value(chunk),
    ]
}

impl Store {
    /// Deletes at most `chunk` records that lie below their stream's trim point; returns how
    /// many. Kept: records with a part id (hidden from every read, they stay as the dedup fence
    /// of their part id for as long as the session exists) and each stream's last record (a
    /// side channel's next sequence number is read from it).
    pub async fn delete_trimmed_records(&self, chunk: u64) -> Result<u64, StorageError> {
        self.delete_rows("records", TRIMMED_RECORDS, vec![chunk_value(chunk)])
            .await
    }

    /// Deletes the rows of `table` whose physical row id (`ctid` on Postgres, `rowid` on
    /// SQLite) `select` returns; `select` names that column `{row}` and numbers its parameters
    /// `$n`. One statement: a bounded chunk, no long lock.
    async fn delete_rows(
        &self,
        table: &str,
        select: &str,
        values: Vec<Value>,
    ) -> Result<u64, StorageError> {
        let backend = self.db.get_database_backend();
        let sql = if backend == DbBackend::Postgres {
            format!(
                "DELETE FROM {table} WHERE ctid = ANY(ARRAY({}))",
                select.replace("{row}", "ctid")
            )
        } else {
            // SQLite numbers its parameters `?n`.
            format!(
                "DELETE FROM {table} WHERE rowid IN ({})",
                select.replace("{row}", "rowid").replace('$', "?")
            )
        };
        let result = self
            .db
            .execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
        Ok(result.rows_affected())
    }

    /// Sessions closed or expired before `cutoff`, at most `limit`, longest gone first.
    pub async fn sessions_past_retention(
        &self,
        cutoff: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<Uuid>, StorageError> {
        let closed = sessions::Entity::find()
            .select_only()
            .column(sessions::Column::Id)
            .filter(sessions::Column::ClosedAt.lt(cutoff))
            .order_by_asc(sessions::Column::ClosedAt)
            .limit(limit)
            .into_tuple::<Uuid>()
            .all(&self.db)
            .await?;
        let expired = sessions::Entity::find()
            .select_only()
            .column(sessions::Column::Id)
            .filter(sessions::Column::ExpiresAt.lt(cutoff))
            .filter(sessions::Column::ClosedAt.is_null())
            .order_by_asc(sessions::Column::ExpiresAt)
            .limit(limit)
            .into_tuple::<Uuid>()
            .all(&self.db)
            .await?;
        let mut ids = closed;
        ids.extend(expired);
        ids.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(ids)
    }

    /// Deletes at most `chunk` records of `session_id` if the session is still past the
    /// retention at `cutoff`; returns how many it deleted (0: none left, or not purgeable).
    pub async fn purge_records_chunk(
        &self,
        session_id: Uuid,
        cutoff: DateTime<Utc>,
        chunk: u64,
    ) -> Result<u64, StorageError> {
        self.delete_rows(
            "records",
            RECORDS_OF_PURGEABLE_SESSION,
            purgeable_session_values(session_id, cutoff, chunk),
        )
        .await
    }

    /// Deletes at most `chunk` part ids of `session_id` (its `X-Part-Id` fence) if the session
    /// is still past the retention at `cutoff`; returns how many (0: none left, or not
    /// purgeable).
    pub async fn purge_part_ids_chunk(
        &self,
        session_id: Uuid,
        cutoff: DateTime<Utc>,
        chunk: u64,
    ) -> Result<u64, StorageError> {
        self.delete_rows(
            "record_part_ids",
            PART_IDS_OF_PURGEABLE_SESSION,
            purgeable_session_values(session_id, cutoff, chunk),
        )
        .await
    }

    /// Deletes everything else of `session_id` and the session itself, in one transaction, if
    /// the session is still past the retention at `cutoff` (call it once its records and part
    /// ids are gone: any left over are deleted too, in the same transaction).
    pub async fn purge_session(
        &self,
        session_id: Uuid,
        cutoff: DateTime<Utc>,
    ) -> Result<RowsPurged, StorageError> {
        let txn = self.db.begin().await?;
        // Lock the row (Postgres): a concurrent purge of the same session waits, then finds
        // nothing to delete.
        let backend = txn.get_database_backend();
        let mut find = sessions::Entity::find_by_id(session_id).filter(
            sessions::Column::ClosedAt
                .lt(cutoff)
                .or(sessions::Column::ExpiresAt.lt(cutoff)),
        );
        if backend == DbBackend::Postgres {
            // SQLite has no row locks (its writers are serialized anyway).
            find = find.lock_exclusive();
        }
        let still_purgeable = find.one(&txn).await?.is_some();
        if !still_purgeable {
            txn.commit().await?;
            return Ok(RowsPurged::default());
        }
        let placeholder = if backend == DbBackend::Postgres {
            "$1"
        } else {
            "?"
        };
        let delete = async |table: &str, column: &str| -> Result<u64, StorageError> {
            let statement = Statement::from_sql_and_values(
                backend,
                format!("DELETE FROM {table} WHERE {column} = {placeholder}"),
                [Value::from(session_id)],
            );
            Ok(txn.execute_raw(statement).await?.rows_affected())
        };
        let purged = RowsPurged {
            records: delete("records", "session_id").await?,
            record_part_ids: delete("record_part_ids", "session_id").await?,
            stream_trims: delete("stream_trims", "session_id").await?,
            waitpoints: delete("waitpoints", "session_id").await?,
            applied_commands: delete("applied_commands", "session_id").await?,
            snapshots: delete("session_snapshots", "session_id").await?,
            runs: delete("runs", "session_id").await?,
            // Last: while the row exists, the session can be found and purged again.
            sessions: delete("sessions", "id").await?,
        };
        txn.commit().await?;
        Ok(purged)
    }
}
