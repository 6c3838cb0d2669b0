//! The worker: reads partition logs and applies commands.
//!
//! - [`consumer`]: partition log readers, batching, the offsets fence, poison isolation, the
//!   supervisor that rebuilds connections, the drain of legacy partition queues.
//! - [`apply`]: THE apply logic, pure: command kind → writes and outcome.
//! - [`ownership`]: home partitions, takeover and hand-back through leases (bookkeeping, no IO).
//! - [`outcome`]: the one function that acknowledges what was read.
//! - [`signals`]: every instrumentation point (log line and metric together).
//! - [`timeouts`]: the waitpoint timer.
//! - [`health`]: the worker's `/healthz`, `/readyz` and `/metrics` listener.
//! - `failpoint`: test-only fault injection, present only with the `test-failpoints` feature.
//!
//! [`Worker::build`] connects (and migrates) the database; the broker and Redis connect lazily
//! and reconnect on their own. [`Worker::run_until_stopped`] runs until the shutdown signal and
//! then finishes its current batch before returning.

pub mod apply;
pub mod consumer;
#[cfg(feature = "test-failpoints")]
pub mod failpoint;
pub mod health;
pub mod outcome;
pub mod ownership;
pub mod purge;
pub mod signals;
pub mod timeouts;

use std::sync::Arc;

use shared::broker::{BrokerConfig, BrokerLink, InProcessBroker};
use shared::cache::{Cache, CacheError};
use shared::config::Settings;
use shared::shutdown::{CancellationToken, TaskTracker};
use shared::storage::{StatementPlans, StorageError, Store};

use consumer::WorkerContext;

/// How long a stopping worker waits for its background tasks to finish their current step
/// (one database statement or publish each; they are idempotent, so cutting one is safe).
const BACKGROUND_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// `SESSIONS_PARTITIONS` differs from the partition logs the deployment already uses.
    #[error("{0}")]
    PartitionCount(String),
}

/// A built worker, ready to run.
#[derive(Debug)]
pub struct Worker {
    context: Arc<WorkerContext>,
    /// Every task the worker spawns: the background loops and the broker adapters' log
    /// readers. Stopping waits for it.
    tasks: TaskTracker,
}

impl Worker {
    /// The production worker: RabbitMQ, and Redis for claims.
    pub async fn build(settings: Settings) -> Result<Self, WorkerError> {
        let cache = Cache::new(&settings.redis_url, &settings.redis_prefix)?;
        Self::build_with(settings, None, cache).await
    }

    /// A worker on the given adapters: `in_process` is the embedded default's broker (`None`:
    /// RabbitMQ). The apply code is the same either way.
    pub async fn build_with(
        settings: Settings,
        in_process: Option<Arc<InProcessBroker>>,
        cache: Cache,
    ) -> Result<Self, WorkerError> {
        // Batch transactions are almost all the worker's statements: each planned for its own
        // arguments, set once per connection rather than once per batch.
        let store = Store::connect_planning(
            &settings.database_url,
            settings.db_max_connections,
            StatementPlans::EachExecution,
        )
        .await?;
        let instance = format!("worker-{}", uuid::Uuid::now_v7().simple());
        let tasks = TaskTracker::new();
        let config =
            BrokerConfig::from_settings(&settings, format!("{instance}-publisher"), in_process)
                .with_signals(crate::signals::BROKER)
                .with_tasks(tasks.clone());
        if let Some(logs) = config.lasting_partition_logs()
            && let Some(refusal) = store.partition_count_mismatch(&logs).await?
        {
            return Err(WorkerError::PartitionCount(refusal));
        }
        let link = BrokerLink::new(config, None);
        Ok(Self {
            context: Arc::new(WorkerContext {
                settings,
                store,
                cache,
                link,
                instance,
            }),
            tasks,
        })
    }

    /// The `/healthz`, `/readyz`, `/metrics` router of this worker.
    pub fn health_router(&self) -> axum::Router {
        health::router(self.context.clone())
    }

    /// Consumes until `shutdown` is cancelled, then finishes the current batch, lets the
    /// background tasks (outbox sweep, waitpoint timer, purge) end their current step, waits
    /// for the log readers to end with their connection, and returns.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        let tasks = self.tasks;
        tasks.spawn(consumer::sweep_outbox(
            self.context.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(timeouts::run(self.context.clone(), shutdown.clone()));
        tasks.spawn(purge::run(self.context.clone(), shutdown.clone()));
        tasks.close();
        signals::log_retention(&self.context.settings.log_max_age);
        consumer::run(self.context.clone(), shutdown.clone()).await;
        // Consuming can also end on its own only when cancelled; make sure the rest stops too.
        shutdown.cancel();
        if tokio::time::timeout(BACKGROUND_STOP_GRACE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?BACKGROUND_STOP_GRACE,
                "a background task or log reader did not end in time; stopping anyway"
            );
        }
        self.context.link.close().await;
    }
}
