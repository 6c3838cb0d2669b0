//! Deleting what is no longer wanted, every [`TICK`]: records below their stream's trim point
//! (always; a writer's trim command asks for it), and, with a retention set, sessions closed or
//! expired longer ago than `SESSIONS_RETENTION_AFTER_CLOSE_SECONDS` (0, the default: never) with
//! everything that belongs to them (`shared::storage` does the deleting, in bounded steps).
//!
//! Why in the worker rather than a separate command: every deployment already runs workers, so
//! retention needs no extra scheduler; each step is short and re-checked, so several workers
//! purging at once only share the work. One round does at most [`SESSIONS_PER_ROUND`] sessions
//! and deletes records and part ids [`RECORDS_PER_STATEMENT`] at a time, so a purge never holds a long
//! lock or starves the apply transactions; a round that found a full page starts the next one
//! at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::shutdown::CancellationToken;
use shared::storage::{RowsPurged, StorageError};

use crate::consumer::WorkerContext;

/// How often a worker looks for sessions past the retention when it found none.
pub const TICK: Duration = Duration::from_secs(10);
/// Sessions one round looks at.
pub const SESSIONS_PER_ROUND: u64 = 100;
/// Records one statement deletes at most.
pub const RECORDS_PER_STATEMENT: u64 = 5_000;

pub async fn run(context: Arc<WorkerContext>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(error) = delete_trimmed(&context, &shutdown).await {
            tracing::warn!(%error, "deleting trimmed records failed; retrying next tick");
        }
        let Some(retention) = context.settings.retention_after_close else {
            continue;
        };
        loop {
            match purge_round(&context, retention, &shutdown).await {
                Ok(sessions) if sessions == SESSIONS_PER_ROUND && !shutdown.is_cancelled() => {}
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "retention purge failed; retrying next tick");
                    break;
                }
            }
        }
    }
}

/// Deletes records below their stream's trim point, [`RECORDS_PER_STATEMENT`] at a time, until
/// none is left (always on: a trim is the writer asking for exactly that).
async fn delete_trimmed(
    context: &WorkerContext,
    shutdown: &CancellationToken,
) -> Result<(), StorageError> {
    loop {
        let deleted = context
            .store
            .delete_trimmed_records(RECORDS_PER_STATEMENT)
            .await?;
        if deleted > 0 {
            crate::signals::trimmed_records_deleted(deleted);
        }
        if deleted < RECORDS_PER_STATEMENT || shutdown.is_cancelled() {
            return Ok(());
        }
    }
}

/// One round: finds up to [`SESSIONS_PER_ROUND`] sessions past the retention and purges each.
/// Returns how many it found.
async fn purge_round(
    context: &WorkerContext,
    retention: Duration,
    shutdown: &CancellationToken,
) -> Result<u64, StorageError> {
    let started = Instant::now();
    let cutoff = chrono::Utc::now()
        - chrono::TimeDelta::from_std(retention).unwrap_or(chrono::TimeDelta::MAX);
    let sessions = context
        .store
        .sessions_past_retention(cutoff, SESSIONS_PER_ROUND)
        .await?;
    let mut purged = RowsPurged::default();
    for &session_id in &sessions {
        if shutdown.is_cancelled() {
            break;
        }
        loop {
            let deleted = context
                .store
                .purge_records_chunk(session_id, cutoff, RECORDS_PER_STATEMENT)
                .await?;
            purged.records += deleted;
            if deleted < RECORDS_PER_STATEMENT || shutdown.is_cancelled() {
                break;
            }
        }
        loop {
            let deleted = context
                .store
                .purge_part_ids_chunk(session_id, cutoff, RECORDS_PER_STATEMENT)
                .await?;
            purged.record_part_ids += deleted;
            if deleted < RECORDS_PER_STATEMENT || shutdown.is_cancelled() {
                break;
            }
        }
        purged.add(context.store.purge_session(session_id, cutoff).await?);
    }
    if !sessions.is_empty() {
        crate::signals::purged(&purged, started.elapsed());
    }
    Ok(sessions.len() as u64)
}
