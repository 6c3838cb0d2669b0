//! Persistence: sea-orm entities, migrations and every query of the service.
//!
//! The rest of the workspace sees [`Store`], the domain structs it reads and writes
//! ([`Session`], [`StoredRecord`], [`Waitpoint`], …, defined in `crate::domain` with typed
//! fields) and [`StorageError`]. sea-orm's `Model`, `Entity`, `ActiveModel` and `Column` types
//! never leave this module: `entities` is private and `rows` converts between the two, so the
//! compiler, not a convention, keeps them here:
//!
//! ```
//! use shared::storage::{Session, StoredRecord};
//! ```
//!
//! ```compile_fail
//! use shared::storage::entities::sessions::Model;
//! ```
//!
//! Postgres is the production backend; SQLite (same entities, same migrations) serves the
//! embedded default.

mod apply;
mod entities;
mod listing;
mod logs;
mod migrations;
mod purge;
mod rows;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DbBackend, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, SqlErr,
    Statement, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use uuid::Uuid;

use crate::domain::ids::{self, ENVIRONMENT_PREFIX};
use crate::domain::session::SessionItem;
use crate::domain::{Io, SessionAddress, Stream};

pub use crate::domain::environment::Environment;
pub use crate::domain::record::StoredRecord;
pub use crate::domain::session::{Run, Session};
pub use apply::OutboxEvent;
pub use apply::{
    BatchWrites, LoadedState, NewOutboxEvent, PartOwner, StreamTrim, WaitpointCompletion,
};

/// The seqNum the next record of a named-channel stream gets: one past its last record (found
/// through the records primary key), 0 for a stream with none. Named streams keep no counter of
/// their own (reserved ones count on the session row).
pub(crate) async fn next_seq_of_named_stream(
    connection: &impl ConnectionTrait,
    environment_id: Uuid,
    session_id: Uuid,
    key: &str,
) -> Result<i64, StorageError> {
    let last: Option<Option<i64>> = records::Entity::find()
        .select_only()
        .column_as(records::Column::SeqNum.max(), "last_seq_num")
        .filter(records::Column::EnvironmentId.eq(environment_id))
        .filter(records::Column::SessionId.eq(session_id))
        .filter(records::Column::Io.eq(key))
        .into_tuple::<Option<i64>>()
        .one(connection)
        .await?;
    Ok(last.flatten().map_or(0, |last| last + 1))
}

/// The records of one stream of a session that readers may see: those at or above its trim
/// point.
fn readable_records(
    environment_id: Uuid,
    session_id: Uuid,
    stream: &Stream,
) -> sea_orm::Select<records::Entity> {
    let key = stream.key();
    records::Entity::find()
        .filter(records::Column::EnvironmentId.eq(environment_id))
        .filter(records::Column::SessionId.eq(session_id))
        .filter(above_trim_point(session_id, &key))
        .filter(records::Column::Io.eq(key))
}

/// Records at or above the stream's trim point (`stream_trims`; 0 when it was never trimmed).
fn above_trim_point(session_id: Uuid, key: &str) -> sea_orm::sea_query::Expr {
    use sea_orm::sea_query::{Alias, Expr, ExprTrait, Func, Query, SubQueryStatement};
    let table = Alias::new("stream_trims");
    let trim_point = Query::select()
        .column((table.clone(), Alias::new("trim_seq")))
        .from(table.clone())
        .and_where(Expr::col((table.clone(), Alias::new("session_id"))).eq(session_id))
        .and_where(Expr::col((table, Alias::new("stream"))).eq(key))
        .to_owned();
    let trim_point = Expr::SubQuery(
        None,
        Box::new(SubQueryStatement::SelectStatement(trim_point)),
    );
    Expr::col((records::Entity, records::Column::SeqNum))
        .gte(Expr::from(Func::coalesce([trim_point, Expr::val(0_i64)])))
}

pub use crate::domain::waitpoint::{Waitpoint, WaitpointStatus};
pub use listing::{ListError, PageCursor, SessionListQuery, SessionPage, StatusFilter};
pub use logs::{DeadLetter, LogAdvance, NewDeadLetter};
pub use purge::RowsPurged;

use entities::{
    environments, outbox_events, projects, records, runs, secret_keys, session_snapshots, sessions,
    waitpoints,
};

/// A storage failure. [`StorageError::is_transient`] tells the worker whether to retry. It
/// carries no database library type: a failure of the database is classified where it happens
/// (see the `From<DbErr>` impl) and leaves storage as its message and that classification.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database failed or refused a statement. `transient`: retrying the same transaction
    /// may succeed (see [`StorageError::is_transient`]).
    #[error("database error: {message}")]
    Database { message: String, transient: bool },
    #[error("DATABASE_URL {0}")]
    InvalidUrl(String),
    #[error("stored data is inconsistent: {0}")]
    Inconsistent(String),
    /// A batch's partition logs were no longer where it started: another reader applied them
    /// (or an earlier batch failed). Nothing was written; re-read from the stored positions.
    #[error("partition log fence: {0}")]
    Fenced(String),
}

impl StorageError {
    /// Whether retrying the same transaction may succeed: the database was unreachable, busy,
    /// shutting down, or aborted the transaction for a concurrency reason (serialization
    /// failure, deadlock, lock timeout). Deterministic errors (a constraint or a value the
    /// database refuses) are not transient: retrying them would only burn the retry budget
    /// while the partition stalls; the worker isolates the command instead.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Database { transient, .. } => *transient,
            StorageError::InvalidUrl(_)
            | StorageError::Inconsistent(_)
            | StorageError::Fenced(_) => false,
        }
    }
}

impl From<DbErr> for StorageError {
    fn from(error: DbErr) -> Self {
        StorageError::Database {
            transient: database_error_is_transient(&error),
            message: error.to_string(),
        }
    }
}

/// See [`StorageError::is_transient`].
fn database_error_is_transient(error: &DbErr) -> bool {
    use sea_orm::RuntimeErr;
    use sea_orm::sqlx::Error as SqlxError;
    let runtime = match error {
        DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => return true,
        DbErr::Exec(runtime) | DbErr::Query(runtime) => runtime,
        _ => return false,
    };
    let RuntimeErr::SqlxError(sqlx_error) = runtime else {
        return false;
    };
    match sqlx_error.as_ref() {
        SqlxError::Database(database) => {
            let code = database.code().unwrap_or_default();
            sqlstate_is_transient(&code)
        }
        SqlxError::Io(_)
        | SqlxError::Tls(_)
        | SqlxError::Protocol(_)
        | SqlxError::PoolTimedOut
        | SqlxError::PoolClosed
        | SqlxError::WorkerCrashed => true,
        _ => false,
    }
}

/// Postgres SQLSTATEs (and SQLite result codes) that say "try again".
fn sqlstate_is_transient(code: &str) -> bool {
    const POSTGRES_CLASSES: [&str; 4] = [
        "08", // connection exception
        "40", // transaction rollback: serialization failure, deadlock
        "53", // insufficient resources (too many connections, disk full, out of memory)
        "57", // operator intervention: admin shutdown, query canceled, cannot connect now
    ];
    const POSTGRES_CODES: [&str; 2] = [
        "55P03", // lock not available
        "55006", // object in use
    ];
    // SQLite: BUSY, LOCKED and their extended codes (BUSY_RECOVERY, BUSY_SNAPSHOT, ...).
    const SQLITE_CODES: [&str; 5] = ["5", "6", "261", "517", "262"];
    POSTGRES_CLASSES
        .iter()
        .any(|class| code.len() == 5 && code.starts_with(class))
        || POSTGRES_CODES.contains(&code)
        || SQLITE_CODES.contains(&code)
}

/// An environment that the admin CLI created or found.
#[derive(Clone, Debug)]
pub struct CreatedEnvironment {
    pub environment: Environment,
    /// The new secret key, shown once. `None` if the environment existed and kept its keys.
    pub secret_key: Option<String>,
}

/// The handle on the database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// How the pool's connections plan statements; with [`StatementPlans::Cached`], a batch
    /// transaction asks for plans of its own arguments itself ([`Store::apply_batch`]).
    statement_plans: StatementPlans,
}

/// How the pool's connections plan prepared statements (Postgres; SQLite ignores it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatementPlans {
    /// Postgres's default: after a few executions, a cached generic plan. Right for the api,
    /// whose reads are simple and frequent (measured: forcing custom plans there almost
    /// doubled Postgres's CPU per append).
    Cached,
    /// Every execution planned for its actual arguments, set once per connection. Right for a
    /// process whose statements are batch transactions (the worker): a generic plan cached
    /// while the tables were small goes wrong as they grow, and setting it per transaction
    /// would cost a round trip per batch.
    EachExecution,
}

/// Splits `postgres://…/name?opts` into the URL of the maintenance database and `name`.
fn postgres_database_name(url: &str) -> Result<(String, String), StorageError> {
    let (without_query, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let (server, name) = without_query
        .rsplit_once('/')
        .filter(|(server, _)| server.contains("://") && !server.ends_with('/'))
        .ok_or_else(|| StorageError::InvalidUrl("must name a database".into()))?;
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(StorageError::InvalidUrl(format!(
            "database name {name:?} must be 1–63 characters of [A-Za-z0-9_-]"
        )));
    }
    let maintenance = match query {
        Some(query) => format!("{server}/postgres?{query}"),
        None => format!("{server}/postgres"),
    };
    Ok((maintenance, name.to_owned()))
}

/// Postgres advisory lock key that serializes migrations of concurrently starting processes.
const MIGRATION_LOCK_KEY: i64 = 0x5e55_1035;

impl Store {
    /// Connects, creates the database if it does not exist (Postgres), and runs migrations.
    /// Statements get Postgres's default plans ([`StatementPlans::Cached`]).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StorageError> {
        Self::connect_planning(url, max_connections, StatementPlans::Cached).await
    }

    /// [`Store::connect`] with the given way of planning statements.
    pub async fn connect_planning(
        url: &str,
        max_connections: u32,
        plans: StatementPlans,
    ) -> Result<Self, StorageError> {
        if url.starts_with("postgres") {
            Self::create_postgres_database_if_missing(url).await?;
        }
        let mut options = ConnectOptions::new(url.to_owned());
        options
            .max_connections(max_connections)
            .min_connections(1)
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(Duration::from_secs(5))
            .sqlx_logging(false);
        if plans == StatementPlans::EachExecution {
            // A startup parameter: the connection has it before its first statement.
            options.map_sqlx_postgres_opts(|postgres| {
                postgres.options([("plan_cache_mode", "force_custom_plan")])
            });
        }
        let db = Database::connect(options).await?;
        let store = Self {
            db,
            statement_plans: plans,
        };
        store.migrate(url).await?;
        Ok(store)
    }

    async fn create_postgres_database_if_missing(url: &str) -> Result<(), StorageError> {
        let (maintenance_url, name) = postgres_database_name(url)?;
        let mut options = ConnectOptions::new(maintenance_url);
        options
            .max_connections(1)
            .connect_timeout(Duration::from_secs(5))
            .sqlx_logging(false);
        let maintenance = Database::connect(options).await?;
        let exists = maintenance
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT 1 FROM pg_database WHERE datname = $1",
                [name.clone().into()],
            ))
            .await?
            .is_some();
        if !exists {
            // The name was validated to [A-Za-z0-9_-]; quoting keeps its case.
            let created = maintenance
                .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                .await;
            if let Err(error) = created {
                // Another process may have created it at the same moment: 42P04, or 23505 on
                // pg_database when both inserts race.
                let raced = error.to_string().contains("already exists")
                    || matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)));
                if !raced {
                    return Err(error.into());
                }
            }
        }
        maintenance.close().await?;
        Ok(())
    }

    /// Runs pending migrations. On Postgres an advisory lock on a dedicated connection makes
    /// concurrent starts wait for each other instead of racing on DDL.
    async fn migrate(&self, url: &str) -> Result<(), StorageError> {
        if self.db.get_database_backend() != DbBackend::Postgres {
            migrations::Migrator::up(&self.db, None).await?;
            return Ok(());
        }
        let mut options = ConnectOptions::new(url.to_owned());
        options.max_connections(1).sqlx_logging(false);
        let locked = Database::connect(options).await?;
        locked
            .execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
            .await?;
        let result = migrations::Migrator::up(&locked, None).await;
        locked
            .execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
            .await?;
        locked.close().await?;
        result.map_err(StorageError::from)
    }

    /// The `plan_cache_mode` a connection of the pool runs with (Postgres; `None` on SQLite):
    /// `force_custom_plan` for [`StatementPlans::EachExecution`], the server's default otherwise.
    pub async fn statement_plan_mode(&self) -> Result<Option<String>, StorageError> {
        if self.db.get_database_backend() != DbBackend::Postgres {
            return Ok(None);
        }
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT current_setting('plan_cache_mode') AS mode",
            ))
            .await?;
        Ok(row.and_then(|row| row.try_get::<String>("", "mode").ok()))
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StorageError> {
        self.db.ping().await.map_err(StorageError::from)
    }

    pub fn is_postgres(&self) -> bool {
        self.db.get_database_backend() == DbBackend::Postgres
    }

    // ---------------------------------------------------------------- admin

    /// Creates the project and the environment if they do not exist. A new environment gets a
    /// new secret key (returned once); an existing one keeps its keys.
    pub async fn create_environment(
        &self,
        project_slug: &str,
        environment_slug: &str,
        master_key: &[u8; 32],
    ) -> Result<CreatedEnvironment, StorageError> {
        let txn = self.db.begin().await?;
        let now = Utc::now();
        let project = match projects::Entity::find()
            .filter(projects::Column::Slug.eq(project_slug))
            .one(&txn)
            .await?
        {
            Some(project) => project,
            None => {
                projects::ActiveModel {
                    id: sea_orm::Set(Uuid::now_v7()),
                    slug: sea_orm::Set(project_slug.to_owned()),
                    created_at: sea_orm::Set(now),
                }
                .insert(&txn)
                .await?
            }
        };
        if let Some(environment) = environments::Entity::find()
            .filter(environments::Column::ProjectId.eq(project.id))
            .filter(environments::Column::Slug.eq(environment_slug))
            .one(&txn)
            .await?
        {
            txn.commit().await?;
            return Ok(CreatedEnvironment {
                environment: rows::environment_from_row(environment),
                secret_key: None,
            });
        }
        let environment = environments::ActiveModel {
            id: sea_orm::Set(Uuid::now_v7()),
            public_id: sea_orm::Set(ids::new_friendly_id(ENVIRONMENT_PREFIX)),
            project_id: sea_orm::Set(project.id),
            slug: sea_orm::Set(environment_slug.to_owned()),
            created_at: sea_orm::Set(now),
        }
        .insert(&txn)
        .await?;
        let secret_key = ids::new_secret_key();
        secret_keys::ActiveModel {
            id: sea_orm::Set(Uuid::now_v7()),
            environment_id: sea_orm::Set(environment.id),
            digest: sea_orm::Set(crate::domain::tokens::secret_key_digest(&secret_key)),
            created_at: sea_orm::Set(now),
            revoked_at: sea_orm::Set(None),
            encrypted_key: sea_orm::Set(Some(crate::domain::tokens::encrypt_secret(
                master_key,
                &secret_key,
            ))),
        }
        .insert(&txn)
        .await?;
        txn.commit().await?;
        Ok(CreatedEnvironment {
            environment: rows::environment_from_row(environment),
            secret_key: Some(secret_key),
        })
    }

    /// The environment `project/environment`, if it exists.
    pub async fn find_environment(
        &self,
        project_slug: &str,
        environment_slug: &str,
    ) -> Result<Option<Environment>, StorageError> {
        let Some(project) = projects::Entity::find()
            .filter(projects::Column::Slug.eq(project_slug))
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        Ok(environments::Entity::find()
            .filter(environments::Column::ProjectId.eq(project.id))
            .filter(environments::Column::Slug.eq(environment_slug))
            .one(&self.db)
            .await?
            .map(rows::environment_from_row))
    }

    /// Rotates an environment's keys: a new key (returned once) and every live key set to stop
    /// working after `grace`.
    pub async fn rotate_secret_key(
        &self,
        environment_id: Uuid,
        grace: chrono::TimeDelta,
        master_key: &[u8; 32],
    ) -> Result<String, StorageError> {
        let txn = self.db.begin().await?;
        let now = Utc::now();
        secret_keys::Entity::update_many()
            .col_expr(
                secret_keys::Column::RevokedAt,
                sea_orm::sea_query::Expr::value(now + grace),
            )
            .filter(secret_keys::Column::EnvironmentId.eq(environment_id))
            .filter(key_is_live(now))
            .filter(
                sea_orm::Condition::any()
                    .add(secret_keys::Column::RevokedAt.is_null())
                    .add(secret_keys::Column::RevokedAt.gt(now + grace)),
            )
            .exec(&txn)
            .await?;
        let secret_key = ids::new_secret_key();
        secret_keys::ActiveModel {
            id: sea_orm::Set(Uuid::now_v7()),
            environment_id: sea_orm::Set(environment_id),
            digest: sea_orm::Set(crate::domain::tokens::secret_key_digest(&secret_key)),
            created_at: sea_orm::Set(now),
            revoked_at: sea_orm::Set(None),
            encrypted_key: sea_orm::Set(Some(crate::domain::tokens::encrypt_secret(
                master_key,
                &secret_key,
            ))),
        }
        .insert(&txn)
        .await?;
        txn.commit().await?;
        Ok(secret_key)
    }

    /// The keys of an environment: `(key id, created, revoked or revoking at)`, newest first.
    pub async fn list_secret_keys(
        &self,
        environment_id: Uuid,
    ) -> Result<Vec<(Uuid, DateTime<Utc>, Option<DateTime<Utc>>)>, StorageError> {
        Ok(secret_keys::Entity::find()
            .filter(secret_keys::Column::EnvironmentId.eq(environment_id))
            .order_by_desc(secret_keys::Column::CreatedAt)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|key| (key.id, key.created_at, key.revoked_at))
            .collect())
    }

    /// Revokes one key of an environment now. Returns whether a key was revoked.
    pub async fn revoke_secret_key(
        &self,
        environment_id: Uuid,
        key_id: Uuid,
    ) -> Result<bool, StorageError> {
        let now = Utc::now();
        let result = secret_keys::Entity::update_many()
            .col_expr(
                secret_keys::Column::RevokedAt,
                sea_orm::sea_query::Expr::value(now),
            )
            .filter(secret_keys::Column::EnvironmentId.eq(environment_id))
            .filter(secret_keys::Column::Id.eq(key_id))
            .filter(key_is_live(now))
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected == 1)
    }

    // ---------------------------------------------------------------- auth

    /// The environment that owns the unrevoked key with this digest.
    pub async fn environment_for_key_digest(
        &self,
        digest: &str,
    ) -> Result<Option<Environment>, StorageError> {
        Ok(self
            .live_key(digest)
            .await?
            .map(|live_key| live_key.environment))
    }

    /// The live secret key with this digest and its environment, in one query (every append
    /// authenticated by a secret key runs it).
    pub async fn live_key(&self, digest: &str) -> Result<Option<LiveKey>, StorageError> {
        let found = secret_keys::Entity::find()
            .filter(secret_keys::Column::Digest.eq(digest))
            .filter(key_is_live(Utc::now()))
            .find_also_related(environments::Entity)
            .one(&self.db)
            .await?;
        Ok(found.and_then(|(key, environment)| {
            environment.map(|environment| LiveKey {
                environment: rows::environment_from_row(environment),
                revoked_at: key.revoked_at,
            })
        }))
    }

    /// The environment with this public id (`env_…`).
    pub async fn environment_by_public_id(
        &self,
        public_id: &str,
    ) -> Result<Option<Environment>, StorageError> {
        Ok(environments::Entity::find()
            .filter(environments::Column::PublicId.eq(public_id))
            .one(&self.db)
            .await?
            .map(rows::environment_from_row))
    }

    /// The encrypted copies of an environment's unrevoked secret keys (newest first): the only
    /// keys that may verify its public access tokens.
    pub async fn encrypted_verification_keys(
        &self,
        environment_id: Uuid,
    ) -> Result<Vec<String>, StorageError> {
        Ok(secret_keys::Entity::find()
            .filter(secret_keys::Column::EnvironmentId.eq(environment_id))
            .filter(key_is_live(Utc::now()))
            .order_by_desc(secret_keys::Column::CreatedAt)
            .all(&self.db)
            .await?
            .into_iter()
            .filter_map(|key| key.encrypted_key)
            .collect())
    }

    // ---------------------------------------------------------------- reads

    /// The session `address` names in `environment_id`, if any.
    pub async fn find_session(
        &self,
        environment_id: Uuid,
        address: &SessionAddress,
    ) -> Result<Option<Session>, StorageError> {
        let query =
            sessions::Entity::find().filter(sessions::Column::EnvironmentId.eq(environment_id));
        let query = match address {
            SessionAddress::FriendlyId(id) => {
                query.filter(sessions::Column::FriendlyId.eq(id.as_str()))
            }
            SessionAddress::ExternalId(id) => {
                query.filter(sessions::Column::ExternalId.eq(id.as_str()))
            }
        };
        query
            .one(&self.db)
            .await?
            .map(rows::session_from_row)
            .transpose()
    }

    /// The wire form of a session, with its current run's friendly id resolved in the same
    /// environment (a pointer to another environment's run resolves to `null`).
    pub async fn session_item(&self, session: &Session) -> Result<SessionItem, StorageError> {
        let run_friendly_id = match session.current_run_id {
            None => None,
            Some(run_id) => runs::Entity::find_by_id(run_id)
                .filter(runs::Column::EnvironmentId.eq(session.environment_id))
                .one(&self.db)
                .await?
                .map(|run| run.friendly_id),
        };
        Ok(session.to_item(run_friendly_id))
    }

    /// Records of one channel with `seq_num > after` (all if `None`), in order, at most `limit`;
    /// never records below the stream's trim point.
    pub async fn list_records(
        &self,
        environment_id: Uuid,
        session_id: Uuid,
        stream: &Stream,
        after: Option<i64>,
        limit: u64,
    ) -> Result<Vec<StoredRecord>, StorageError> {
        let mut query = readable_records(environment_id, session_id, stream);
        if let Some(after) = after {
            query = query.filter(records::Column::SeqNum.gt(after));
        }
        rows::records_from_rows(
            query
                .order_by_asc(records::Column::SeqNum)
                .limit(limit)
                .all(&self.db)
                .await?,
        )
    }

    /// The last `limit` records of a stream above its trim point, newest first.
    pub async fn last_records(
        &self,
        environment_id: Uuid,
        session_id: Uuid,
        stream: &Stream,
        limit: u64,
    ) -> Result<Vec<StoredRecord>, StorageError> {
        rows::records_from_rows(
            readable_records(environment_id, session_id, stream)
                .order_by_desc(records::Column::SeqNum)
                .limit(limit)
                .all(&self.db)
                .await?,
        )
    }

    /// The seqNum the next record of a stream will get (0 when the session does not exist):
    /// the session's counter for a reserved channel, one past the last record for a named one.
    pub async fn channel_head(
        &self,
        environment_id: Uuid,
        session_id: Uuid,
        stream: &Stream,
    ) -> Result<i64, StorageError> {
        if stream.is_reserved() {
            let session = sessions::Entity::find_by_id(session_id)
                .filter(sessions::Column::EnvironmentId.eq(environment_id))
                .one(&self.db)
                .await?;
            return Ok(session.map_or(0, |session| match stream.io {
                Io::In => session.next_seq_in,
                Io::Out => session.next_seq_out,
            }));
        }
        next_seq_of_named_stream(&self.db, environment_id, session_id, &stream.key()).await
    }

    /// The run with this friendly id in this environment.
    pub async fn find_run(
        &self,
        environment_id: Uuid,
        friendly_id: &str,
    ) -> Result<Option<Run>, StorageError> {
        Ok(runs::Entity::find()
            .filter(runs::Column::EnvironmentId.eq(environment_id))
            .filter(runs::Column::FriendlyId.eq(friendly_id))
            .one(&self.db)
            .await?
            .map(rows::run_from_row))
    }

    /// The waitpoint with this friendly id in this environment.
    pub async fn find_waitpoint(
        &self,
        environment_id: Uuid,
        friendly_id: &str,
    ) -> Result<Option<Waitpoint>, StorageError> {
        waitpoints::Entity::find()
            .filter(waitpoints::Column::EnvironmentId.eq(environment_id))
            .filter(waitpoints::Column::FriendlyId.eq(friendly_id))
            .one(&self.db)
            .await?
            .map(rows::waitpoint_from_row)
            .transpose()
    }

    /// Times out up to `limit` waiting waitpoints whose `timeout_at` has passed, in one
    /// transaction with their events (outbox). `completion` builds each time-out. Returns the
    /// events to publish.
    pub async fn time_out_waitpoints(
        &self,
        now: DateTime<Utc>,
        limit: u64,
        completion: impl Fn(&Waitpoint) -> WaitpointCompletion,
    ) -> Result<Vec<OutboxEvent>, StorageError> {
        let txn = self.db.begin().await?;
        let expired = waitpoints::Entity::find()
            .filter(waitpoints::Column::Status.eq(WaitpointStatus::Waiting.as_str()))
            .filter(waitpoints::Column::TimeoutAt.lte(now))
            .order_by_asc(waitpoints::Column::TimeoutAt)
            .limit(limit)
            .all(&txn)
            .await?;
        if expired.is_empty() {
            txn.commit().await?;
            return Ok(Vec::new());
        }
        // A row no build writes is left alone rather than stopping every later time-out.
        let expired: Vec<Waitpoint> = expired
            .into_iter()
            .filter_map(|row| rows::waitpoint_from_row(row).ok())
            .collect();
        let completions = expired.iter().map(completion).collect();
        let events = apply::complete_waitpoints(&txn, completions).await?;
        let rows = apply::insert_outbox(&txn, events).await?;
        txn.commit().await?;
        Ok(rows)
    }

    /// A session's snapshot blob, if one was stored.
    pub async fn snapshot(
        &self,
        environment_id: Uuid,
        session_id: Uuid,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(session_snapshots::Entity::find_by_id(session_id)
            .filter(session_snapshots::Column::EnvironmentId.eq(environment_id))
            .one(&self.db)
            .await?
            .map(|snapshot| snapshot.body))
    }

    /// Stores (replaces) a session's snapshot blob.
    pub async fn put_snapshot(
        &self,
        environment_id: Uuid,
        session_id: Uuid,
        body: Vec<u8>,
    ) -> Result<(), StorageError> {
        let model = session_snapshots::ActiveModel {
            session_id: sea_orm::Set(session_id),
            environment_id: sea_orm::Set(environment_id),
            body: sea_orm::Set(body),
            updated_at: sea_orm::Set(Utc::now()),
        };
        session_snapshots::Entity::insert(model)
            .on_conflict(
                sea_orm::sea_query::OnConflict::column(session_snapshots::Column::SessionId)
                    .update_columns([
                        session_snapshots::Column::Body,
                        session_snapshots::Column::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- outbox

    /// Outbox events older than `older_than` (left behind by a crash between commit and
    /// publish), oldest first.
    pub async fn stale_outbox_events(
        &self,
        older_than: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<OutboxEvent>, StorageError> {
        Ok(outbox_events::Entity::find()
            .filter(outbox_events::Column::CreatedAt.lt(older_than))
            .order_by_asc(outbox_events::Column::CreatedAt)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(rows::outbox_event_from_row)
            .collect())
    }

    /// Removes published outbox events.
    pub async fn delete_outbox_events(&self, ids: &[Uuid]) -> Result<(), StorageError> {
        if ids.is_empty() {
            return Ok(());
        }
        outbox_events::Entity::delete_many()
            .filter(outbox_events::Column::Id.is_in(ids.iter().copied()))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Counts rows of a table; used by tests and operators to check that refused input wrote
    /// nothing.
    pub async fn count_rows(&self, table: CountedTable) -> Result<u64, StorageError> {
        let count = match table {
            CountedTable::Sessions => sessions::Entity::find().count(&self.db).await?,
            CountedTable::Runs => runs::Entity::find().count(&self.db).await?,
            CountedTable::Records => records::Entity::find().count(&self.db).await?,
        };
        Ok(count)
    }

    pub(crate) fn connection(&self) -> &DatabaseConnection {
        &self.db
    }
}

/// A key works until its `revoked_at` (none = forever; a future time = a rotation's grace).
/// A live secret key's environment, and when the key stops working (a rotation's grace period
/// ends, or a future revocation); `None`: until it is revoked.
#[derive(Clone, Debug)]
pub struct LiveKey {
    pub environment: Environment,
    pub revoked_at: Option<DateTime<Utc>>,
}

fn key_is_live(now: DateTime<Utc>) -> sea_orm::Condition {
    sea_orm::Condition::any()
        .add(secret_keys::Column::RevokedAt.is_null())
        .add(secret_keys::Column::RevokedAt.gt(now))
}

/// Tables whose size [`Store::count_rows`] reports.
#[derive(Clone, Copy, Debug)]
pub enum CountedTable {
    Sessions,
    Runs,
    Records,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        for transient in [
            "08006", "40001", "40P01", "53300", "57P01", "57014", "55P03", "5",
        ] {
            assert!(sqlstate_is_transient(transient), "{transient}");
        }
        for permanent in [
            "23505", "23502", "22P02", "22021", "42P01", "42703", "", "1",
        ] {
            assert!(!sqlstate_is_transient(permanent), "{permanent}");
        }
    }

    #[test]
    fn a_database_failure_leaves_storage_classified_and_as_text() {
        let lost = StorageError::from(DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout));
        assert!(lost.is_transient());
        let refused = StorageError::from(DbErr::Custom("value too long".into()));
        assert!(!refused.is_transient());
        let StorageError::Database { message, .. } = refused else {
            panic!("a database failure: {refused:?}");
        };
        assert!(message.contains("value too long"), "{message}");
    }

    #[test]
    fn splits_postgres_urls() {
        let (maintenance, name) =
            postgres_database_name("postgres://u@127.0.0.1:5432/sessions_t1?sslmode=disable")
                .expect("split");
        assert_eq!(
            maintenance,
            "postgres://u@127.0.0.1:5432/postgres?sslmode=disable"
        );
        assert_eq!(name, "sessions_t1");
        assert!(postgres_database_name("postgres://127.0.0.1:5432").is_err());
        assert!(postgres_database_name("postgres://h/bad;name").is_err());
    }
}
