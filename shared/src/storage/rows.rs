//! Conversions between table rows (the sea-orm entities, private to storage) and the domain
//! structs the rest of the service works on. A row holding what no build writes (an unknown
//! stream key, status or tag list) is reported as [`StorageError::Inconsistent`], never guessed
//! at.

use sea_orm::Set;
use serde::Deserialize;

use super::StorageError;
use super::entities::{environments, outbox_events, records, runs, sessions, waitpoints};
use super::{Environment, OutboxEvent, Run, Session, StoredRecord, Waitpoint, WaitpointStatus};
use crate::domain::Stream;
use crate::domain::headers::RecordHeaders;

fn unreadable(table: &str, id: impl std::fmt::Display, column: &str, value: &str) -> StorageError {
    StorageError::Inconsistent(format!("{table} {id} has an unreadable {column} {value:?}"))
}

pub(crate) fn session_from_row(row: sessions::Model) -> Result<Session, StorageError> {
    // Read in place: every batch loads its sessions, so no copy of the JSON first.
    let tags = Vec::<String>::deserialize(&row.tags)
        .map_err(|_| unreadable("session", row.id, "tags", &row.tags.to_string()))?;
    Ok(Session {
        id: row.id,
        friendly_id: row.friendly_id,
        environment_id: row.environment_id,
        external_id: row.external_id,
        session_type: row.session_type,
        task_identifier: row.task_identifier,
        trigger_config: row.trigger_config,
        tags,
        metadata: row.metadata,
        expires_at: row.expires_at,
        closed_at: row.closed_at,
        closed_reason: row.closed_reason,
        current_run_id: row.current_run_id,
        next_seq_in: row.next_seq_in,
        next_seq_out: row.next_seq_out,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

/// The row a new session is inserted as.
pub(crate) fn session_row(session: Session) -> sessions::ActiveModel {
    sessions::ActiveModel {
        id: Set(session.id),
        friendly_id: Set(session.friendly_id),
        environment_id: Set(session.environment_id),
        external_id: Set(session.external_id),
        session_type: Set(session.session_type),
        task_identifier: Set(session.task_identifier),
        trigger_config: Set(session.trigger_config),
        tags: Set(serde_json::json!(session.tags)),
        metadata: Set(session.metadata),
        expires_at: Set(session.expires_at),
        closed_at: Set(session.closed_at),
        closed_reason: Set(session.closed_reason),
        current_run_id: Set(session.current_run_id),
        next_seq_in: Set(session.next_seq_in),
        next_seq_out: Set(session.next_seq_out),
        created_at: Set(session.created_at),
        updated_at: Set(session.updated_at),
    }
}

pub(crate) fn run_from_row(row: runs::Model) -> Run {
    Run {
        id: row.id,
        friendly_id: row.friendly_id,
        environment_id: row.environment_id,
        session_id: row.session_id,
        created_at: row.created_at,
    }
}

/// The row a new run is inserted as.
pub(crate) fn run_row(run: Run) -> runs::ActiveModel {
    runs::ActiveModel {
        id: Set(run.id),
        friendly_id: Set(run.friendly_id),
        environment_id: Set(run.environment_id),
        session_id: Set(run.session_id),
        created_at: Set(run.created_at),
    }
}

pub(crate) fn record_from_row(row: records::Model) -> Result<StoredRecord, StorageError> {
    let record = |column: &str, value: &str| {
        unreadable(
            "record",
            format_args!("{}/{}/{}", row.session_id, row.io, row.seq_num),
            column,
            value,
        )
    };
    let stream = Stream::from_key(&row.io).ok_or_else(|| record("stream", &row.io))?;
    let headers = match &row.headers {
        None => Vec::new(),
        Some(headers) => RecordHeaders::deserialize(headers)
            .map_err(|_| record("headers", &headers.to_string()))?,
    };
    Ok(StoredRecord {
        session_id: row.session_id,
        stream,
        seq_num: row.seq_num,
        environment_id: row.environment_id,
        part_id: row.part_id,
        body: row.body,
        body_fingerprint: row.body_fingerprint,
        command_id: row.command_id,
        created_at: row.created_at,
        headers,
        body_is_envelope: row.body_is_envelope,
    })
}

/// Rows read in bulk, converted; the first unreadable one fails the read.
pub(crate) fn records_from_rows(
    rows: Vec<records::Model>,
) -> Result<Vec<StoredRecord>, StorageError> {
    rows.into_iter().map(record_from_row).collect()
}

/// A record's headers as stored: a JSON array of `[name, value]` pairs, NULL when it has none.
pub(crate) fn stored_headers(record: &StoredRecord) -> Option<serde_json::Value> {
    (!record.headers.is_empty()).then(|| serde_json::json!(record.headers))
}

/// The row a new record is inserted as.
pub(crate) fn record_row(record: StoredRecord) -> records::ActiveModel {
    records::ActiveModel {
        headers: Set(stored_headers(&record)),
        session_id: Set(record.session_id),
        io: Set(record.stream.key()),
        seq_num: Set(record.seq_num),
        environment_id: Set(record.environment_id),
        part_id: Set(record.part_id),
        body: Set(record.body),
        body_fingerprint: Set(record.body_fingerprint),
        command_id: Set(record.command_id),
        created_at: Set(record.created_at),
        body_is_envelope: Set(record.body_is_envelope),
    }
}

pub(crate) fn environment_from_row(row: environments::Model) -> Environment {
    Environment {
        id: row.id,
        public_id: row.public_id,
        project_id: row.project_id,
        slug: row.slug,
        created_at: row.created_at,
    }
}

pub(crate) fn outbox_event_from_row(row: outbox_events::Model) -> OutboxEvent {
    OutboxEvent {
        id: row.id,
        routing_key: row.routing_key,
        payload: row.payload,
        created_at: row.created_at,
    }
}

/// The row an outbox event is inserted as.
pub(crate) fn outbox_event_row(event: OutboxEvent) -> outbox_events::ActiveModel {
    outbox_events::ActiveModel {
        id: Set(event.id),
        routing_key: Set(event.routing_key),
        payload: Set(event.payload),
        created_at: Set(event.created_at),
    }
}

/// A stored waitpoint as the domain sees it (typed channel and status). A row holding what no
/// build writes is reported, not guessed at.
pub(crate) fn waitpoint_from_row(row: waitpoints::Model) -> Result<Waitpoint, StorageError> {
    let io = row
        .io
        .parse()
        .map_err(|_| unreadable("waitpoint", row.id, "io", &row.io))?;
    let status = WaitpointStatus::parse(&row.status)
        .ok_or_else(|| unreadable("waitpoint", row.id, "status", &row.status))?;
    Ok(Waitpoint {
        id: row.id,
        friendly_id: row.friendly_id,
        environment_id: row.environment_id,
        environment_public_id: row.environment_public_id,
        run_id: row.run_id,
        run_friendly_id: row.run_friendly_id,
        session_id: row.session_id,
        session_friendly_id: row.session_friendly_id,
        io,
        after_seq: row.after_seq,
        status,
        output: row.output,
        output_is_error: row.output_is_error,
        completed_by_seq: row.completed_by_seq,
        completed_at: row.completed_at,
        timeout_at: row.timeout_at,
        tags: row.tags,
        idempotency_key: row.idempotency_key,
        idempotency_key_expires_at: row.idempotency_key_expires_at,
        created_at: row.created_at,
    })
}

/// The row a new waitpoint is inserted as.
pub(crate) fn waitpoint_row(waitpoint: Waitpoint) -> waitpoints::ActiveModel {
    waitpoints::ActiveModel {
        id: Set(waitpoint.id),
        friendly_id: Set(waitpoint.friendly_id),
        environment_id: Set(waitpoint.environment_id),
        environment_public_id: Set(waitpoint.environment_public_id),
        run_id: Set(waitpoint.run_id),
        run_friendly_id: Set(waitpoint.run_friendly_id),
        session_id: Set(waitpoint.session_id),
        session_friendly_id: Set(waitpoint.session_friendly_id),
        io: Set(waitpoint.io.as_str().to_owned()),
        after_seq: Set(waitpoint.after_seq),
        status: Set(waitpoint.status.as_str().to_owned()),
        output: Set(waitpoint.output),
        output_is_error: Set(waitpoint.output_is_error),
        completed_by_seq: Set(waitpoint.completed_by_seq),
        completed_at: Set(waitpoint.completed_at),
        timeout_at: Set(waitpoint.timeout_at),
        tags: Set(waitpoint.tags),
        idempotency_key: Set(waitpoint.idempotency_key),
        idempotency_key_expires_at: Set(waitpoint.idempotency_key_expires_at),
        created_at: Set(waitpoint.created_at),
    }
}
