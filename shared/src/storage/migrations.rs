//! Schema migrations, portable across Postgres and SQLite. Each migration is frozen once
//! published: later changes are new migrations.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(InitialSchema),
            Box::new(Waitpoints),
            Box::new(EncryptedSecretKeys),
            Box::new(SessionSnapshots),
            Box::new(PartitionLogs),
            Box::new(NamedChannels),
            Box::new(StreamTrims),
            Box::new(DataLifecycle),
            Box::new(RecordPartIds),
        ]
    }
}

struct InitialSchema;

impl MigrationName for InitialSchema {
    fn name(&self) -> &str {
        "m20261127_000001_initial_schema"
    }
}

fn unique_index(
    name: &'static str,
    table: &'static str,
    columns: &[&'static str],
) -> IndexCreateStatement {
    let mut index = Index::create();
    index.name(name).table(table).unique().if_not_exists();
    for column in columns {
        index.col(*column);
    }
    index.to_owned()
}

fn plain_index(
    name: &'static str,
    table: &'static str,
    columns: &[&'static str],
) -> IndexCreateStatement {
    let mut index = Index::create();
    index.name(name).table(table).if_not_exists();
    for column in columns {
        index.col(*column);
    }
    index.to_owned()
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for InitialSchema {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("projects")
                    .if_not_exists()
                    .col(pk_uuid("id"))
                    .col(string_uniq("slug"))
                    .col(timestamp_with_time_zone("created_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("environments")
                    .if_not_exists()
                    .col(pk_uuid("id"))
                    .col(string_uniq("public_id"))
                    .col(uuid("project_id"))
                    .col(string("slug"))
                    .col(timestamp_with_time_zone("created_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(unique_index(
                "environments_project_slug",
                "environments",
                &["project_id", "slug"],
            ))
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("secret_keys")
                    .if_not_exists()
                    .col(pk_uuid("id"))
                    .col(uuid("environment_id"))
                    .col(string_uniq("digest"))
                    .col(timestamp_with_time_zone("created_at"))
                    .col(timestamp_with_time_zone_null("revoked_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("sessions")
                    .if_not_exists()
                    .col(pk_uuid("id"))
                    .col(string_uniq("friendly_id"))
                    .col(uuid("environment_id"))
                    .col(text_null("external_id"))
                    .col(string("session_type"))
                    .col(string("task_identifier"))
                    .col(json_binary("trigger_config"))
                    .col(json_binary("tags"))
                    .col(json_binary_null("metadata"))
                    .col(timestamp_with_time_zone_null("expires_at"))
                    .col(timestamp_with_time_zone_null("closed_at"))
                    .col(text_null("closed_reason"))
                    .col(uuid_null("current_run_id"))
                    .col(big_integer("next_seq_in"))
                    .col(big_integer("next_seq_out"))
                    .col(timestamp_with_time_zone("created_at"))
                    .col(timestamp_with_time_zone("updated_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(unique_index(
                "sessions_environment_external_id",
                "sessions",
                &["environment_id", "external_id"],
            ))
            .await?;
        manager
            .create_index(plain_index(
                "sessions_environment_created_at",
                "sessions",
                &["environment_id", "created_at"],
            ))
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("runs")
                    .if_not_exists()
                    .col(pk_uuid("id"))
                    .col(string_uniq("friendly_id"))
                    .col(uuid("environment_id"))
                    .col(uuid("session_id"))
                    .col(timestamp_with_time_zone("created_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("records")
                    .if_not_exists()
                    .col(uuid("session_id"))
                    .col(string_len("io", 8))
                    .col(big_integer("seq_num"))
                    .col(uuid("environment_id"))
                    .col(text_null("part_id"))
                    .col(text("body"))
                    .col(string_len("body_fingerprint", 64))
                    .col(uuid_uniq("command_id"))
                    .col(timestamp_with_time_zone("created_at"))
                    .primary_key(Index::create().col("session_id").col("io").col("seq_num"))
                    .to_owned(),
            )
            .await?;
        // The permanent X-Part-Id fence. NULL part ids never collide.
        manager
            .create_index(unique_index(
                "records_part_id_fence",
                "records",
                &["environment_id", "session_id", "io", "part_id"],
            ))
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("applied_commands")
                    .if_not_exists()
                    .col(pk_uuid("command_id"))
                    .col(json_binary("outcome"))
                    .col(timestamp_with_time_zone("applied_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("outbox_events")
                    .if_not_exists()
                    .col(pk_uuid("id"))
                    .col(string("routing_key"))
                    .col(json_binary("payload"))
                    .col(timestamp_with_time_zone("created_at"))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

struct Waitpoints;

impl MigrationName for Waitpoints {
    fn name(&self) -> &str {
        "m20261127_000002_waitpoints"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Waitpoints {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("waitpoints")
                    .if_not_exists()
                    .col(pk_uuid("id"))
                    .col(string_uniq("friendly_id"))
                    .col(uuid("environment_id"))
                    .col(string("environment_public_id"))
                    .col(uuid("run_id"))
                    .col(string("run_friendly_id"))
                    .col(uuid("session_id"))
                    .col(string("session_friendly_id"))
                    .col(string_len("io", 8))
                    .col(big_integer("after_seq"))
                    .col(string_len("status", 16))
                    .col(text_null("output"))
                    .col(boolean("output_is_error"))
                    .col(big_integer_null("completed_by_seq"))
                    .col(timestamp_with_time_zone_null("completed_at"))
                    .col(timestamp_with_time_zone_null("timeout_at"))
                    .col(json_binary("tags"))
                    .col(text_null("idempotency_key"))
                    .col(timestamp_with_time_zone_null("idempotency_key_expires_at"))
                    .col(timestamp_with_time_zone("created_at"))
                    .to_owned(),
            )
            .await?;
        // The drain looks up the waiting waitpoints of a batch's sessions.
        manager
            .create_index(plain_index(
                "waitpoints_waiting_by_session",
                "waitpoints",
                &["session_id", "status"],
            ))
            .await?;
        // The timer looks up expired waiting waitpoints.
        manager
            .create_index(plain_index(
                "waitpoints_by_status_timeout",
                "waitpoints",
                &["status", "timeout_at"],
            ))
            .await?;
        manager
            .create_index(plain_index(
                "waitpoints_by_idempotency_key",
                "waitpoints",
                &["environment_id", "idempotency_key"],
            ))
            .await?;
        Ok(())
    }
}

struct EncryptedSecretKeys;

impl MigrationName for EncryptedSecretKeys {
    fn name(&self) -> &str {
        "m20261127_000003_encrypted_secret_keys"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for EncryptedSecretKeys {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The copy of the key that verifies public access tokens, encrypted under the master key.
        manager
            .alter_table(
                Table::alter()
                    .table("secret_keys")
                    .add_column(text_null("encrypted_key"))
                    .to_owned(),
            )
            .await
    }
}

struct SessionSnapshots;

impl MigrationName for SessionSnapshots {
    fn name(&self) -> &str {
        "m20261127_000004_session_snapshots"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for SessionSnapshots {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("session_snapshots")
                    .if_not_exists()
                    .col(pk_uuid("session_id"))
                    .col(uuid("environment_id"))
                    .col(blob("body"))
                    .col(timestamp_with_time_zone("updated_at"))
                    .to_owned(),
            )
            .await
    }
}

struct PartitionLogs;

impl MigrationName for PartitionLogs {
    fn name(&self) -> &str {
        "m20261206_000005_partition_logs"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for PartitionLogs {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The last message applied from each partition log: advanced with a compare-and-set in
        // the transaction that writes the batch (the offsets fence).
        manager
            .create_table(
                Table::create()
                    .table("log_positions")
                    .if_not_exists()
                    .col(text("log").primary_key())
                    .col(big_integer_null("applied_offset"))
                    .col(text_null("applied_message_id"))
                    .col(boolean("resume_from_first").default(false))
                    .col(timestamp_with_time_zone("updated_at"))
                    .to_owned(),
            )
            .await?;
        // Which worker reads which partition log (efficiency only; the fence decides).
        manager
            .create_table(
                Table::create()
                    .table("partition_leases")
                    .if_not_exists()
                    .col(text("log").primary_key())
                    .col(text("owner"))
                    .col(boolean("owner_is_home"))
                    .col(timestamp_with_time_zone("expires_at"))
                    .to_owned(),
            )
            .await?;
        // Commands that can never be applied, written in the transaction that moves past them.
        manager
            .create_table(
                Table::create()
                    .table("dead_letters")
                    .if_not_exists()
                    .col(pk_uuid("id"))
                    .col(text("log"))
                    .col(integer("partition"))
                    .col(big_integer_null("log_offset"))
                    .col(text_null("message_id"))
                    .col(blob("payload"))
                    .col(text("reason"))
                    .col(timestamp_with_time_zone("created_at"))
                    .col(timestamp_with_time_zone_null("replayed_at"))
                    .to_owned(),
            )
            .await
    }
}

/// Side channels (a wider stream key), record headers and enveloped bodies.
struct NamedChannels;

impl MigrationName for NamedChannels {
    fn name(&self) -> &str {
        "m20261206_000006_named_channels_and_record_headers"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for NamedChannels {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // `records.io` now holds the stream key: `in`, `out` or `channels/{name}/{io}` (up to
        // 141 characters). Postgres enforces the old varchar(8); widening to text rewrites
        // nothing. SQLite never enforced the length.
        if manager.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
            manager
                .alter_table(
                    Table::alter()
                        .table("records")
                        .modify_column(ColumnDef::new("io").text().not_null())
                        .to_owned(),
                )
                .await?;
        }
        // Record headers (`[[name, value], …]`), NULL for the records that have none (all
        // records written before). Adding a nullable column rewrites nothing.
        manager
            .alter_table(
                Table::alter()
                    .table("records")
                    .add_column(json_binary_null("headers"))
                    .to_owned(),
            )
            .await?;
        // Whether the body is the writer's record envelope (readers unwrap it) or raw text.
        manager
            .alter_table(
                Table::alter()
                    .table("records")
                    .add_column(boolean("body_is_envelope").default(false))
                    .to_owned(),
            )
            .await
    }
}

/// The trim point of each stream a writer trimmed: records below it are no longer read.
struct StreamTrims;

impl MigrationName for StreamTrims {
    fn name(&self) -> &str {
        "m20261207_000007_stream_trims"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for StreamTrims {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("stream_trims")
                    .if_not_exists()
                    .col(uuid("session_id"))
                    .col(text("stream"))
                    .col(big_integer("trim_seq"))
                    .primary_key(Index::create().col("session_id").col("stream"))
                    .to_owned(),
            )
            .await
    }
}

/// What the retention purge needs: the session of each applied-command row (to delete it with
/// its session), and indexes to find sessions closed or expired before a cutoff.
struct DataLifecycle;

impl MigrationName for DataLifecycle {
    fn name(&self) -> &str {
        "m20261208_000008_data_lifecycle"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for DataLifecycle {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("applied_commands")
                    .add_column(uuid_null("session_id"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(plain_index(
                "applied_commands_session",
                "applied_commands",
                &["session_id"],
            ))
            .await?;
        manager
            .create_index(plain_index(
                "sessions_closed_at",
                "sessions",
                &["closed_at"],
            ))
            .await?;
        manager
            .create_index(plain_index(
                "sessions_expires_at",
                "sessions",
                &["expires_at"],
            ))
            .await
    }
}

/// The `X-Part-Id` fence moves out of `records` into a table of its own, keyed by exactly what
/// a duplicate is looked up by. On `records` it was a fourth column set beside the primary key
/// `(session_id, io, seq_num)`, and a planner without statistics for the table (young tables,
/// or autovacuum off) chose the primary key for the lookup and filtered every record of the
/// stream: the batch's most expensive statement though it finds nothing. A table whose only
/// index is the key leaves no such choice.
struct RecordPartIds;

impl MigrationName for RecordPartIds {
    fn name(&self) -> &str {
        "m20261209_000009_record_part_ids"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for RecordPartIds {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("record_part_ids")
                    .if_not_exists()
                    .col(uuid("session_id"))
                    .col(text("stream"))
                    .col(text("part_id"))
                    .col(big_integer("seq_num"))
                    .primary_key(
                        Index::create()
                            .col("session_id")
                            .col("stream")
                            .col("part_id"),
                    )
                    .to_owned(),
            )
            .await?;
        // Every part id already used stays fenced. (A session id belongs to one environment,
        // so the old key's environment column adds nothing to uniqueness.)
        manager
            .get_connection()
            .execute_unprepared(
                "INSERT INTO record_part_ids (session_id, stream, part_id, seq_num) \
                 SELECT session_id, io, part_id, seq_num FROM records WHERE part_id IS NOT NULL",
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("records_part_id_fence")
                    .table("records")
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
