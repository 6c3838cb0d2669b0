//! sea-orm entities: one module per table, visible only inside `storage` (the compiler keeps
//! them there). Callers see the domain structs that `rows` converts them to and from.

pub(super) mod projects {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "projects")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub slug: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod environments {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "environments")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub public_id: String,
        pub project_id: Uuid,
        pub slug: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod secret_keys {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "secret_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub environment_id: Uuid,
        /// SHA-256 of the key; the plaintext is never stored.
        pub digest: String,
        pub created_at: DateTimeUtc,
        pub revoked_at: Option<DateTimeUtc>,
        /// The key encrypted under the master key (verifies public access tokens).
        pub encrypted_key: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::environments::Entity",
            from = "Column::EnvironmentId",
            to = "super::environments::Column::Id"
        )]
        Environment,
    }

    impl Related<super::environments::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Environment.def()
        }
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod sessions {
    use sea_orm::entity::prelude::*;

    /// Deserialize: the worker's batch reads these rows as `to_jsonb` (`apply.rs`).
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Deserialize)]
    #[sea_orm(table_name = "sessions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub friendly_id: String,
        pub environment_id: Uuid,
        pub external_id: Option<String>,
        pub session_type: String,
        pub task_identifier: String,
        pub trigger_config: Json,
        pub tags: Json,
        pub metadata: Option<Json>,
        pub expires_at: Option<DateTimeUtc>,
        pub closed_at: Option<DateTimeUtc>,
        pub closed_reason: Option<String>,
        pub current_run_id: Option<Uuid>,
        /// The seqNum the next `in` record gets.
        pub next_seq_in: i64,
        /// The seqNum the next `out` record gets.
        pub next_seq_out: i64,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod runs {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "runs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub friendly_id: String,
        pub environment_id: Uuid,
        pub session_id: Uuid,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod records {
    use sea_orm::entity::prelude::*;

    /// Deserialize: the worker's batch reads these rows as `to_jsonb` (`apply.rs`).
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Deserialize)]
    #[sea_orm(table_name = "records")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub session_id: Uuid,
        /// The stream key: `in`, `out` or `channels/{name}/{io}` (`domain::Stream::key`).
        #[sea_orm(primary_key, auto_increment = false)]
        pub io: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq_num: i64,
        pub environment_id: Uuid,
        pub part_id: Option<String>,
        pub body: String,
        pub body_fingerprint: String,
        pub command_id: Uuid,
        pub created_at: DateTimeUtc,
        /// `[[name, value], …]` when the record has headers (`domain::headers`), else NULL.
        pub headers: Option<Json>,
        /// `body` is a record envelope `{"data", "id"}` (written by the SDK's writer), not raw
        /// text from the append route.
        pub body_is_envelope: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod record_part_ids {
    use sea_orm::entity::prelude::*;

    /// The `X-Part-Id` fence: which record of a stream took a part id (written with it).
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "record_part_ids")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub session_id: Uuid,
        /// The stream key, as `records.io`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub stream: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub part_id: String,
        pub seq_num: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod applied_commands {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "applied_commands")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub command_id: Uuid,
        /// The serialized `Outcome`, replayed on redelivery.
        pub outcome: Json,
        pub applied_at: DateTimeUtc,
        /// The command's session (purged with it); NULL for rows written before the column
        /// existed.
        pub session_id: Option<Uuid>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod outbox_events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "outbox_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub routing_key: String,
        pub payload: Json,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod waitpoints {
    use sea_orm::entity::prelude::*;

    /// Deserialize: the worker's batch reads these rows as `to_jsonb` (`apply.rs`).
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Deserialize)]
    #[sea_orm(table_name = "waitpoints")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub friendly_id: String,
        pub environment_id: Uuid,
        pub environment_public_id: String,
        pub run_id: Uuid,
        pub run_friendly_id: String,
        pub session_id: Uuid,
        pub session_friendly_id: String,
        pub io: String,
        /// Completes with the first record whose seqNum is greater than this.
        pub after_seq: i64,
        pub status: String,
        pub output: Option<String>,
        pub output_is_error: bool,
        pub completed_by_seq: Option<i64>,
        pub completed_at: Option<DateTimeUtc>,
        pub timeout_at: Option<DateTimeUtc>,
        pub tags: Json,
        pub idempotency_key: Option<String>,
        pub idempotency_key_expires_at: Option<DateTimeUtc>,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod session_snapshots {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "session_snapshots")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub session_id: Uuid,
        pub environment_id: Uuid,
        pub body: Vec<u8>,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod log_positions {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "log_positions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub log: String,
        pub applied_offset: Option<i64>,
        pub applied_message_id: Option<String>,
        pub resume_from_first: bool,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod partition_leases {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "partition_leases")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub log: String,
        pub owner: String,
        pub owner_is_home: bool,
        pub expires_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub(super) mod dead_letters {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "dead_letters")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub log: String,
        pub partition: i32,
        pub log_offset: Option<i64>,
        pub message_id: Option<String>,
        pub payload: Vec<u8>,
        pub reason: String,
        pub created_at: DateTimeUtc,
        pub replayed_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
