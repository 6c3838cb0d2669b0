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
use shared::storage::{StorageError, Store};
use tokio::sync::watch;

use consumer::WorkerContext;

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// A built worker, ready to run.
#[derive(Debug)]
pub struct Worker {
    context: Arc<WorkerContext>,
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
        let store = Store::connect(&settings.database_url, settings.db_max_connections).await?;
        let instance = format!("worker-{}", uuid::Uuid::now_v7().simple());
        let link = BrokerLink::new(
            BrokerConfig::from_settings(
                &settings,
                format!("{instance}-publisher"),
                in_process.clone(),
            )
            .with_signals(crate::signals::BROKER),
            None,
        );
        Ok(Self {
            context: Arc::new(WorkerContext {
                settings,
                store,
                cache,
                link,
                instance,
                in_process,
            }),
        })
    }

    /// The `/healthz`, `/readyz`, `/metrics` router of this worker.
    pub fn health_router(&self) -> axum::Router {
        health::router(self.context.clone())
    }

    /// Consumes until `shutdown` becomes true, then finishes the current batch and returns.
    pub async fn run_until_stopped(self, shutdown: watch::Receiver<bool>) {
        let sweeper = tokio::spawn(consumer::sweep_outbox(
            self.context.clone(),
            shutdown.clone(),
        ));
        let timer = tokio::spawn(timeouts::run(self.context.clone(), shutdown.clone()));
        let purge = tokio::spawn(purge::run(self.context.clone(), shutdown.clone()));
        signals::log_retention(&self.context.settings.log_max_age);
        consumer::run(self.context.clone(), shutdown).await;
        sweeper.abort();
        timer.abort();
        purge.abort();
        self.context.link.close().await;
    }
}
