//! The embedded default: the api and a worker in one process, on SQLite (same
//! entities and migrations), the in-process broker (same partitions, same apply code, same
//! per-session order) and in-memory claims. For newcomers and local development; the
//! production path is RabbitMQ + Postgres + Redis.
//!
//! Everything lives in a data directory: `sessions.db`, and `master.key` (a random master key
//! made on first start, which encrypts the stored copy of the development key so that a restart
//! can print the same key again).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rand::RngCore;
use shared::broker::InProcessBroker;
use shared::cache::Cache;
use shared::config::Settings;
use shared::domain::tokens::decrypt_secret;
use shared::shutdown::CancellationToken;
use shared::storage::Store;

use crate::{Application, StartError};

/// Project and environment of the development environment the embedded server makes.
pub const DEFAULT_PROJECT: &str = "default";
pub const DEFAULT_ENVIRONMENT: &str = "dev";

/// Why the embedded server could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("data directory {0}: {1}")]
    DataDirectory(PathBuf, std::io::Error),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Worker(#[from] worker::WorkerError),
    #[error("the development key in {0} cannot be decrypted with its master.key")]
    KeyUnreadable(PathBuf),
}

/// A built embedded server.
#[derive(Debug)]
pub struct Embedded {
    settings: Settings,
    application: Application,
    worker: worker::Worker,
    secret_key: String,
    environment_id: String,
}

fn master_key(data_dir: &Path) -> Result<[u8; 32], EmbeddedError> {
    let path = data_dir.join("master.key");
    let failed = |error| EmbeddedError::DataDirectory(path.clone(), error);
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Some(key) = hex::decode(text.trim())
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
    {
        return Ok(key);
    }
    let mut key = [0_u8; 32];
    rand::rng().fill_bytes(&mut key);
    std::fs::write(&path, hex::encode(key)).map_err(failed)?;
    Ok(key)
}

impl Embedded {
    /// Prepares the data directory, the database, the development environment, the worker and
    /// the api. `settings` supplies the listen address and limits; its URLs are not used.
    pub async fn build(mut settings: Settings, data_dir: &Path) -> Result<Self, EmbeddedError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|error| EmbeddedError::DataDirectory(data_dir.to_path_buf(), error))?;
        let database = data_dir.join("sessions.db");
        settings.database_url = format!("sqlite://{}?mode=rwc", database.display());
        settings.master_key = master_key(data_dir)?;
        settings.master_key_is_default = false;
        // A publish is confirmed only once applied (there is no broker to hold it), so give the
        // confirm the time an apply may take.
        settings.confirm_timeout = settings
            .confirm_timeout
            .max(std::time::Duration::from_secs(30));
        settings.db_max_connections = settings.db_max_connections.min(4);

        let store = Store::connect(&settings.database_url, 1)
            .await
            .map_err(StartError::from)?;
        let created = store
            .create_environment(DEFAULT_PROJECT, DEFAULT_ENVIRONMENT, &settings.master_key)
            .await
            .map_err(StartError::from)?;
        let secret_key = match created.secret_key {
            Some(key) => key,
            None => store
                .encrypted_verification_keys(created.environment.id)
                .await
                .map_err(StartError::from)?
                .first()
                .and_then(|sealed| decrypt_secret(&settings.master_key, sealed))
                .ok_or_else(|| EmbeddedError::KeyUnreadable(data_dir.to_path_buf()))?,
        };
        // The in-process logs start right after what the worker applied before the restart
        // (their messages lived in memory; everything confirmed was committed).
        let names = shared::broker::BrokerNames {
            prefix: settings.broker_prefix.clone(),
            partitions: settings.partitions,
        };
        let logs: Vec<String> = (0..settings.partitions)
            .map(|partition| names.partition_log(partition))
            .collect();
        let stored = store.log_positions(&logs).await.map_err(StartError::from)?;
        let positions = (0..settings.partitions)
            .zip(&logs)
            .filter_map(|(partition, log)| {
                stored.get(log).map(|resume| (partition, resume.clone()))
            })
            .collect();
        drop(store);

        let broker = InProcessBroker::start(settings.partitions, &positions);
        let worker = worker::Worker::build_with(
            settings.clone(),
            Some(broker.clone()),
            Cache::in_memory(&settings.redis_prefix),
        )
        .await?;
        let application = Application::build_with(settings.clone(), Some(broker)).await?;
        Ok(Self {
            settings,
            application,
            worker,
            secret_key,
            environment_id: created.environment.public_id,
        })
    }

    /// The settings in effect (SQLite URL, the data directory's master key).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.application.local_addr()
    }

    /// The development environment's secret key (the same after every restart).
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn environment_id(&self) -> &str {
        &self.environment_id
    }

    /// Serves until `shutdown` is cancelled; then the api stops accepting and finishes its
    /// requests (which may wait for the worker), and only then the worker finishes its batch.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let stop_worker = CancellationToken::new();
        let worker = tokio::spawn(self.worker.run_until_stopped(stop_worker.clone()));
        let served = self.application.run_until_stopped(shutdown).await;
        stop_worker.cancel();
        let _ = worker.await;
        served
    }
}
