//! The api: speaks HTTP, authenticates, validates, turns requests into commands and publishes
//! them; serves reads straight from the database. It never writes stream state itself.
//!
//! - [`routes`]: THE list of routes and their handlers.
//! - [`auth`]: who is calling.
//! - [`error`]: THE mapping from failures to statuses and JSON bodies.
//! - [`publisher`]: group commit to the partition queues, confirms, replies.
//! - [`rate_limit`]: requests per second per environment (429).
//! - [`serve`]: the accept loop (HTTP/1.1 and h2c on one listener, idle GOAWAY).
//! - [`s2_wire`]: the S2 writer protocol's wire format (`routes::writer` serves it).
//! - [`embedded`]: the single-process default (api + worker, SQLite, in-process broker).
//! - [`signals`]: every instrumentation point (log line and metric together).
//!
//! [`Application::build`] binds the listener (port 0 works, for tests) and connects the
//! database; the broker connects lazily and reconnects on demand, so the api starts (and
//! answers 503 on writes) while the broker is down.

pub mod auth;
pub mod embedded;
pub mod error;
pub mod live;
pub mod publisher;
pub mod rate_limit;
pub mod routes;
pub mod s2_wire;
pub mod serve;
pub mod session_cache;
pub mod signals;

use std::net::SocketAddr;
use std::sync::Arc;

use shared::broker::{BrokerConfig, BrokerLink, InProcessBroker};
use shared::config::Settings;
use shared::shutdown::{CancellationToken, TaskTracker};
use shared::storage::Store;
use tokio::net::TcpListener;

use publisher::Publisher;

/// How long a stopping api waits for in-flight requests after it stopped accepting. Appends
/// wait for at most the confirm timeout (5 s by default) and live streams end at once.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// What every handler can reach.
#[derive(Clone, Debug)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub publisher: Arc<Publisher>,
    pub hub: Arc<live::Hub>,
    /// Sessions read by the append route (see `session_cache`).
    pub sessions: Arc<session_cache::SessionCache>,
    pub verification_keys: Arc<auth::VerificationKeys>,
    pub secret_keys: Arc<auth::SecretKeyLookups>,
    pub rate_limits: Arc<rate_limit::RateLimits>,
    /// Live SSE streams per environment and per token.
    pub live_streams: Arc<rate_limit::LiveStreamSlots>,
    /// Appends being handled, at most `SESSIONS_MAX_APPENDS_IN_FLIGHT` (admission control).
    pub append_slots: Arc<tokio::sync::Semaphore>,
    /// Every task the api spawns (publisher partitions, the reply and notification listeners,
    /// live feeds, SSE pumps, writer append sessions): a stopping api waits for them to end.
    pub tasks: TaskTracker,
    /// Cancelled when the api starts to stop: live readers end their streams and writer append
    /// sessions stop reading frames, so that the drain is not held by long-lived requests.
    pub stopping: CancellationToken,
}

/// Why the api could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind SESSIONS_HTTP_ADDR: {0}")]
    Bind(std::io::Error),
    #[error("cannot bind SESSIONS_METRICS_ADDR: {0}")]
    BindMetrics(std::io::Error),
    #[error(transparent)]
    Storage(#[from] shared::storage::StorageError),
    /// `SESSIONS_PARTITIONS` differs from the partition logs the deployment already uses.
    #[error("{0}")]
    PartitionCount(String),
}

async fn keep_connected(link: std::sync::Weak<BrokerLink>) {
    let mut interval = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        interval.tick().await;
        let Some(link) = link.upgrade() else { return };
        if let Err(error) = link.ensure_connected().await {
            tracing::debug!(%error, "broker still unreachable");
        }
    }
}

/// A built api: bound, connected, not yet serving.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    /// `SESSIONS_METRICS_ADDR`'s listener, when `/metrics` is served apart.
    metrics_listener: Option<TcpListener>,
    state: AppState,
}

impl Application {
    /// The production api: RabbitMQ and Postgres (Redis is the workers' business only).
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        Self::build_with(settings, None).await
    }

    /// An api on the given adapters: `in_process` is the embedded default's broker (`None`:
    /// RabbitMQ). Handlers are the same either way.
    pub async fn build_with(
        settings: Settings,
        in_process: Option<Arc<InProcessBroker>>,
    ) -> Result<Self, StartError> {
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .map_err(StartError::Bind)?;
        let metrics_listener = match settings.metrics_addr {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .map_err(StartError::BindMetrics)?,
            ),
            None => None,
        };
        let store = Store::connect(&settings.database_url, settings.db_max_connections).await?;
        let instance = uuid::Uuid::now_v7().simple().to_string();
        let tasks = TaskTracker::new();
        let config = BrokerConfig::from_settings(&settings, format!("api-{instance}"), in_process)
            .with_signals(signals::BROKER)
            .with_tasks(tasks.clone());
        if let Some(logs) = config.lasting_partition_logs()
            && let Some(refusal) = store.partition_count_mismatch(&logs).await?
        {
            return Err(StartError::PartitionCount(refusal));
        }
        let reply_queue = config.names.reply_queue(&instance);
        let (reply_sink, replies) = tokio::sync::mpsc::unbounded_channel();
        let (notification_sink, notifications) = tokio::sync::mpsc::unbounded_channel();
        let link = Arc::new(
            BrokerLink::new(config, Some((reply_queue.clone(), reply_sink)))
                .with_notifications(notification_sink),
        );
        if let Err(error) = link.ensure_connected().await {
            tracing::warn!(%error, "broker not reachable yet; writes answer 503 until it is");
        }
        let stopping = CancellationToken::new();
        // Keeps the link (and with it the reply and notification consumers) up even when no
        // request publishes, so live readers hear about new records.
        tasks.spawn(keep_connected(Arc::downgrade(&link)));
        let sessions = Arc::new(session_cache::SessionCache::new(settings.session_cache_ttl));
        let hub = live::Hub::start(
            store.clone(),
            notifications,
            sessions.clone(),
            &tasks,
            stopping.clone(),
        );
        let publisher = Arc::new(Publisher::start(
            link,
            reply_queue,
            replies,
            publisher::GroupCommit {
                max_commands: settings.publish_batch_max,
                linger: settings.publish_linger,
            },
            settings.reply_timeout,
            &tasks,
        ));
        let rate_limits = Arc::new(rate_limit::RateLimits::from_settings(&settings));
        let live_streams = Arc::new(rate_limit::LiveStreamSlots::from_settings(&settings));
        let append_slots = Arc::new(tokio::sync::Semaphore::new(settings.max_appends_in_flight));
        Ok(Self {
            listener,
            metrics_listener,
            state: AppState {
                settings: Arc::new(settings),
                store,
                publisher,
                hub,
                sessions,
                verification_keys: Arc::default(),
                secret_keys: Arc::default(),
                rate_limits,
                live_streams,
                append_slots,
                tasks,
                stopping,
            },
        })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The bound address of the `/metrics` listener, when `SESSIONS_METRICS_ADDR` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting, ends live (SSE) streams and lets
    /// in-flight requests finish for at most [`SHUTDOWN_GRACE`].
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let link = self.state.publisher.clone();
        let tasks = self.state.tasks.clone();
        let stopping = self.state.stopping.clone();
        let limits = serve::ConnectionLimits::from_settings(&self.state.settings);
        let router = routes::router(self.state);
        tracing::info!(addr = %self.listener.local_addr()?, "api listening");
        // The metrics listener answers until the api has stopped serving.
        let stop_metrics = CancellationToken::new();
        let metrics = self.metrics_listener.map(|listener| {
            shared::telemetry::serve_probes(
                listener,
                routes::metrics_router(),
                stop_metrics.clone(),
                "metrics listener",
            )
        });
        let signal = {
            let stopping = stopping.clone();
            async move {
                shutdown.cancelled().await;
                stopping.cancel();
            }
        };
        let serving = serve::serve(self.listener, router, limits, signal);
        // The grace runs from the moment the api starts to stop.
        let grace = async move {
            stopping.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            () = serving => {}
            () = grace => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "in-flight requests did not finish in time; stopping anyway");
            }
        }
        stop_metrics.cancel();
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        // The broker link closes (its consumers end the reply and notification listeners) and
        // the last handle on the publisher goes (its partition tasks end once their queues are
        // empty); live feeds retire once their readers are gone.
        link.link().close().await;
        drop(link);
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = tasks.len(),
                "background tasks did not end in time; stopping anyway"
            );
        }
        Ok(())
    }
}
