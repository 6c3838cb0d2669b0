//! The RabbitMQ adapter: the only module that names `lapin`.
//!
//! - [`BrokerNames`]: every exchange and queue name of a deployment, from one prefix.
//! - [`BrokerLink`]: a connection that is rebuilt on demand, with a confirm-mode channel for
//!   publishing commands, events and replies (each publish awaits its confirm under a timeout),
//!   and an optional reply queue whose messages are forwarded to a channel.
//! - [`PartitionLogs`] (`log.rs`): a worker's reader connection: each owned partition log read
//!   from a given offset at depth, deliveries forwarded as [`LogDelivery`] values.
//! - [`InProcessBroker`] (`in_process.rs`): the embedded default's logs, replies and
//!   notifications inside one process, used through the same two types: each holds one adapter
//!   (`LinkAdapter`: `AmqpLink` or the in-process broker; `LogSource` in `log.rs`), chosen once
//!   from `BrokerConfig::in_process` and matched in each method, so neither adapter's code
//!   knows of the other.
//! - [`BrokerAddresses`]: the node URLs (`AMQP_URL` may list the nodes of a cluster); every
//!   (re)connect tries them in turn, starting after the node last used.
//!
//! Topology (declared idempotently by every process at connect): a direct exchange
//! `<prefix>.commands` routing to `P` partition logs `<prefix>.log.p<NNN>` (RabbitMQ streams:
//! retention by bytes and age, segment size, leaders placed by the broker's `balanced` locator,
//! optionally `x-initial-cluster-size` replicas), a topic exchange `<prefix>.events` for runners
//! and a fanout exchange `<prefix>.notify` for the api instances' live readers.
//!
//! Every broker operation is bounded by a timeout (a half-dead connection to a node that is
//! going away must not hang a publisher or a reader), and a link that saw a failure or a nack
//! publishes on a new channel: RabbitMQ 3.10 kept stalling publishes on a channel that was open
//! across a leader election, while a fresh channel was confirmed within about a second.

use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Mutex, mpsc};

use crate::shutdown::TaskTracker;

mod addresses;
mod in_process;
mod legacy;
mod log;
pub use addresses::BrokerAddresses;
pub use in_process::InProcessBroker;
pub use legacy::{LegacyMessage, LegacyPartitionQueues};
pub use log::{LogDelivery, PartitionLogs};

/// Names of everything a deployment declares on the broker.
#[derive(Clone, Debug)]
pub struct BrokerNames {
    pub prefix: String,
    pub partitions: u16,
}

impl BrokerNames {
    pub fn commands_exchange(&self) -> String {
        format!("{}.commands", self.prefix)
    }
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    /// The stream that is partition `partition`'s log.
    pub fn partition_log(&self, partition: u16) -> String {
        format!("{}.log.p{partition:03}", self.prefix)
    }
    /// The logs of every partition, in order.
    pub fn partition_logs(&self) -> Vec<String> {
        (0..self.partitions)
            .map(|partition| self.partition_log(partition))
            .collect()
    }
    /// The quorum queue that was partition `partition` before partitions became logs (read
    /// only to drain it after an upgrade).
    pub fn legacy_partition_queue(&self, partition: u16) -> String {
        format!("{}.p{partition:03}", self.prefix)
    }
    /// The dead-letter queue of versions before partition logs (deleted with the topology).
    pub fn legacy_dead_letter_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    pub fn reply_queue(&self, instance: &str) -> String {
        format!("{}.reply.{instance}", self.prefix)
    }
    /// Fanout exchange of "new records" notifications from workers to api instances.
    pub fn notify_exchange(&self) -> String {
        format!("{}.notify", self.prefix)
    }
}

/// What a broker operation can fail with. All of them mean "not durably queued".
#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("publisher confirm timed out")]
    ConfirmTimeout,
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("message was unroutable (returned)")]
    Unroutable,
}

impl From<lapin::Error> for BrokerError {
    fn from(error: lapin::Error) -> Self {
        BrokerError::Unavailable(error.to_string())
    }
}

impl BrokerError {
    /// A low-cardinality label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            BrokerError::Unavailable(_) => "unavailable",
            BrokerError::ConfirmTimeout => "confirm_timeout",
            BrokerError::Nacked => "nacked",
            BrokerError::Unroutable => "unroutable",
        }
    }
}

/// Where the broker adapter reports connections and topology surprises, so that each binary
/// logs and counts them in its own signals module (the adapter records no metrics).
#[derive(Clone, Copy, Debug)]
pub struct BrokerSignals {
    /// A connection was opened to `node` (`host:port`); `reconnect` is false for the first.
    pub connected: fn(connection: &str, node: &str, reconnect: bool),
    /// `queue` exists with other arguments than this version declares (e.g. made before the
    /// cluster settings): it is used as it is.
    pub queue_arguments_differ: fn(queue: &str, error: &str),
}

impl Default for BrokerSignals {
    fn default() -> Self {
        Self {
            connected: |connection, node, reconnect| {
                tracing::info!(connection, node, reconnect, "broker connected");
            },
            queue_arguments_differ: |queue, error| {
                tracing::warn!(
                    queue,
                    error,
                    "queue exists with other arguments; using it as it is"
                );
            },
        }
    }
}

/// The longest any single broker operation (connect, declare, open a channel, consume, close)
/// may take before the connection is treated as broken.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one broker operation under [`OPERATION_TIMEOUT`].
async fn bounded<T>(
    what: &'static str,
    operation: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
        Ok(result) => result.map_err(BrokerError::from),
        Err(_) => Err(BrokerError::Unavailable(format!("{what} timed out"))),
    }
}

/// Retention of the partition logs: a stream drops whole segments once it is over either limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRetention {
    /// `x-max-length-bytes` per partition log.
    pub max_bytes: u64,
    /// `x-max-age`, in RabbitMQ's notation (`7D`, `24h`, `30m`, `90s`).
    pub max_age: String,
    /// `x-stream-max-segment-size-bytes`: retention removes whole segments, so a log holds up to
    /// `max_bytes` plus one segment.
    pub segment_bytes: u64,
}

/// How to reach and shape the broker.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub addresses: BrokerAddresses,
    pub names: BrokerNames,
    /// `x-initial-cluster-size` of new partition logs (`None`: the broker's default, every
    /// cluster node).
    pub log_replicas: Option<u16>,
    pub retention: LogRetention,
    pub signals: BrokerSignals,
    pub confirm_timeout: Duration,
    /// Shown in the broker's connection list.
    pub connection_name: String,
    /// The embedded default: route everything through this in-process broker instead of AMQP.
    pub in_process: Option<Arc<InProcessBroker>>,
    /// Where the adapters spawn their consumer tasks (reply and notification listeners, log
    /// readers): the process's tracker (`with_tasks`), which it waits on when it stops. Each
    /// of those tasks ends on its own when its connection, channel or broker goes.
    pub tasks: TaskTracker,
}

impl BrokerConfig {
    /// The partition logs that outlive a restart, and so may still hold commands routed by the
    /// partition count they were written with: the broker's (`None` for the embedded default,
    /// whose logs live in memory).
    pub fn lasting_partition_logs(&self) -> Option<Vec<String>> {
        self.in_process
            .is_none()
            .then(|| self.names.partition_logs())
    }

    /// The broker configuration of a deployment; `in_process` selects the embedded broker.
    pub fn from_settings(
        settings: &crate::config::Settings,
        connection_name: String,
        in_process: Option<Arc<InProcessBroker>>,
    ) -> Self {
        Self {
            // Settings validated the list; a value set by hand that does not parse is kept as
            // one URL, and connecting to it reports the error.
            addresses: BrokerAddresses::parse(&settings.amqp_url)
                .unwrap_or_else(|_| BrokerAddresses::unchecked(&settings.amqp_url)),
            names: BrokerNames {
                prefix: settings.broker_prefix.clone(),
                partitions: settings.partitions,
            },
            log_replicas: settings.log_replicas,
            retention: LogRetention {
                max_bytes: settings.log_max_bytes,
                max_age: settings.log_max_age.clone(),
                segment_bytes: settings.log_segment_bytes,
            },
            signals: BrokerSignals::default(),
            confirm_timeout: settings.confirm_timeout,
            connection_name,
            in_process,
            tasks: TaskTracker::new(),
        }
    }

    /// Spawns the adapters' consumer tasks on `tasks` (see [`BrokerConfig::tasks`]).
    pub fn with_tasks(mut self, tasks: TaskTracker) -> Self {
        self.tasks = tasks;
        self
    }

    /// Reports connections and topology surprises to `signals` instead of plain logs.
    pub fn with_signals(mut self, signals: BrokerSignals) -> Self {
        self.signals = signals;
        self
    }
}

/// The arguments of partition log declarations.
fn partition_log_arguments(config: &BrokerConfig) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    let retention = &config.retention;
    arguments.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(retention.max_bytes).unwrap_or(i64::MAX)),
    );
    arguments.insert(
        "x-max-age".into(),
        AMQPValue::LongString(retention.max_age.as_str().into()),
    );
    arguments.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(retention.segment_bytes).unwrap_or(i64::MAX)),
    );
    // Leaders spread over the nodes when the logs are created (RabbitMQ ≥ 3.10).
    arguments.insert(
        "x-queue-leader-locator".into(),
        AMQPValue::LongString("balanced".into()),
    );
    if let Some(size) = config.log_replicas {
        arguments.insert(
            "x-initial-cluster-size".into(),
            AMQPValue::LongInt(i32::from(size)),
        );
    }
    arguments
}

/// Declares the whole topology on a channel of its own, which it closes. Idempotent; every
/// process calls it when it connects.
///
/// A partition log that already exists with other arguments (declared with other retention
/// settings or another replica count) makes the broker refuse the declaration with
/// PRECONDITION_FAILED and close the channel: the log is then checked passively on a new
/// channel and used as it is (reported through [`BrokerSignals::queue_arguments_differ`]).
async fn declare_topology(
    connection: &Connection,
    config: &BrokerConfig,
) -> Result<(), BrokerError> {
    let names = &config.names;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut channel = bounded("opening a channel", connection.create_channel()).await?;
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for (exchange, kind) in [
        (names.commands_exchange(), ExchangeKind::Direct),
        (names.events_exchange(), ExchangeKind::Topic),
        (names.notify_exchange(), ExchangeKind::Fanout),
    ] {
        bounded(
            "declaring an exchange",
            channel.exchange_declare(
                exchange.as_str().into(),
                kind,
                durable_exchange,
                FieldTable::default(),
            ),
        )
        .await?;
    }
    let arguments = partition_log_arguments(config);
    for partition in 0..names.partitions {
        let queue = names.partition_log(partition);
        let declared = tokio::time::timeout(
            OPERATION_TIMEOUT,
            channel.queue_declare(queue.as_str().into(), durable, arguments.clone()),
        )
        .await
        .map_err(|_| BrokerError::Unavailable("declaring a partition log timed out".into()))?;
        if let Err(error) = declared {
            if soft_error(&error) != Some(AMQPSoftError::PRECONDITIONFAILED) {
                return Err(error.into());
            }
            (config.signals.queue_arguments_differ)(&queue, &error.to_string());
            channel = bounded("opening a channel", connection.create_channel()).await?;
            bounded(
                "checking a partition log",
                channel.queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
        }
        bounded(
            "binding a partition log",
            channel.queue_bind(
                queue.as_str().into(),
                names.commands_exchange().into(),
                queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
    }
    let _ = bounded(
        "closing a channel",
        channel.close(200, "topology declared".into()),
    )
    .await;
    Ok(())
}

/// Connects to the first node of the rotation that answers (each attempt bounded), and moves
/// the rotation past it. `reconnect` only changes what is reported.
async fn connect(config: &BrokerConfig, reconnect: bool) -> Result<Connection, BrokerError> {
    let mut failures = Vec::new();
    for (index, url) in config.addresses.rotation() {
        let properties = ConnectionProperties::default()
            .with_connection_name(config.connection_name.as_str().into());
        match bounded("connecting", Connection::connect(url, properties)).await {
            Ok(connection) => {
                config.addresses.connected_to(index);
                (config.signals.connected)(
                    &config.connection_name,
                    &config.addresses.describe(index),
                    reconnect,
                );
                return Ok(connection);
            }
            Err(error) => failures.push(format!("{}: {error}", config.addresses.describe(index))),
        }
    }
    Err(BrokerError::Unavailable(failures.join("; ")))
}

/// Where the messages of a reply queue go.
type ReplySink = mpsc::UnboundedSender<Vec<u8>>;

/// What an api instance hears on its notification queue.
#[derive(Debug)]
pub enum Notification {
    /// A worker's payload.
    Message(Vec<u8>),
    /// The link (re)connected: notifications may have been missed meanwhile.
    Reconnected,
}

/// Where notifications go.
pub type NotificationSink = mpsc::UnboundedSender<Notification>;

struct Live {
    connection: Arc<Connection>,
    /// The confirm-mode publishing channel.
    channel: Channel,
    /// Set after a nack: the next publish opens a new channel on the same connection.
    stale: std::sync::atomic::AtomicBool,
}

/// What the api and the worker publish through: one interface, two adapters. `config`
/// chooses: RabbitMQ ([`AmqpLink`]), or the embedded default's [`InProcessBroker`]. Each
/// method dispatches once; neither adapter knows of the other.
pub struct BrokerLink {
    config: BrokerConfig,
    adapter: LinkAdapter,
}

#[expect(
    clippy::large_enum_variant,
    reason = "one per link, never in a collection"
)]
enum LinkAdapter {
    Amqp(AmqpLink),
    InProcess(InProcessLink),
}

/// The embedded default's side of [`BrokerLink`]: the process's broker and what this link
/// registered with it (taken back by [`BrokerLink::close`], so that the api's reply and
/// notification listeners end with it).
struct InProcessLink {
    broker: Arc<InProcessBroker>,
    reply_queue: Option<String>,
    notifications: Option<NotificationSink>,
}

/// A connection to RabbitMQ that is rebuilt on demand, with a confirm-mode publishing channel.
struct AmqpLink {
    config: BrokerConfig,
    reply_queue: Option<(String, ReplySink)>,
    notifications: Option<NotificationSink>,
    live: Mutex<Option<Arc<Live>>>,
    /// Set by [`AmqpLink::close`]: no reconnects after a graceful shutdown.
    closed: std::sync::atomic::AtomicBool,
    /// Whether a connection was ever made (later ones are reported as reconnects).
    connected_once: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for BrokerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLink")
            .field("names", &self.config.names)
            .finish_non_exhaustive()
    }
}

/// Properties of every persistent message.
fn persistent(message_id: Option<&str>) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    match message_id {
        Some(id) => properties.with_message_id(id.into()),
        None => properties,
    }
}

impl BrokerLink {
    /// A link that connects lazily. With `reply_queue`, every (re)connect declares that queue
    /// (classic, expiring when unused) and forwards its messages to the sink.
    pub fn new(config: BrokerConfig, reply_queue: Option<(String, ReplySink)>) -> Self {
        let adapter = match &config.in_process {
            Some(broker) => {
                if let Some((queue, sink)) = &reply_queue {
                    broker.register_reply_queue(queue, sink.clone());
                }
                LinkAdapter::InProcess(InProcessLink {
                    broker: broker.clone(),
                    reply_queue: reply_queue.map(|(queue, _)| queue),
                    notifications: None,
                })
            }
            None => LinkAdapter::Amqp(AmqpLink {
                config: config.clone(),
                reply_queue,
                notifications: None,
                live: Mutex::new(None),
                closed: std::sync::atomic::AtomicBool::new(false),
                connected_once: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        Self { config, adapter }
    }

    /// Also subscribe to the notification fanout on every (re)connect.
    pub fn with_notifications(mut self, sink: NotificationSink) -> Self {
        match &mut self.adapter {
            LinkAdapter::Amqp(link) => link.notifications = Some(sink),
            LinkAdapter::InProcess(link) => {
                link.broker.register_notifications(sink.clone());
                link.notifications = Some(sink);
            }
        }
        self
    }

    pub fn names(&self) -> &BrokerNames {
        &self.config.names
    }

    /// The configuration this link was made with (its adapter included): another link or a
    /// reader of the same deployment starts from it.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Connects now (declaring the topology) if not connected.
    pub async fn ensure_connected(&self) -> Result<(), BrokerError> {
        match &self.adapter {
            LinkAdapter::Amqp(link) => link.live().await.map(|_| ()),
            LinkAdapter::InProcess(_) => Ok(()),
        }
    }

    /// Publishes an encoded command envelope to `partition`.
    pub async fn publish_commands(
        &self,
        partition: u16,
        message_id: &str,
        reply_to: Option<&str>,
        payload: &[u8],
    ) -> Result<(), BrokerError> {
        match &self.adapter {
            LinkAdapter::Amqp(link) => {
                link.publish_commands(partition, message_id, reply_to, payload)
                    .await
            }
            LinkAdapter::InProcess(InProcessLink { broker, .. }) => {
                broker
                    .publish_commands(
                        partition,
                        message_id,
                        reply_to,
                        payload,
                        self.config.confirm_timeout,
                    )
                    .await
            }
        }
    }

    /// Publishes a batch's events (`(routing key, payload)`, on the events exchange) and replies
    /// (`(reply queue, payload)`) together: every message is sent, then every confirm is awaited
    /// (one round trip for the lot instead of one per message). A message whose confirm failed
    /// is published once more on its own. Returns the results in order: events, then replies.
    pub async fn publish_events_and_replies(
        &self,
        events: &[(&str, &[u8])],
        replies: &[(&str, &[u8])],
    ) -> (Vec<Result<(), BrokerError>>, Vec<Result<(), BrokerError>>) {
        match &self.adapter {
            LinkAdapter::Amqp(link) => link.publish_events_and_replies(events, replies).await,
            LinkAdapter::InProcess(InProcessLink { broker, .. }) => {
                for (routing_key, payload) in events {
                    broker.publish_event(routing_key, payload);
                }
                (
                    events.iter().map(|_| Ok(())).collect(),
                    replies
                        .iter()
                        .map(|(reply_to, payload)| broker.publish_reply(reply_to, payload))
                        .collect(),
                )
            }
        }
    }

    /// Publishes an event (e.g. `run.requested`) on the events exchange. Unrouted events are
    /// dropped by the broker: runners bind their own queues.
    pub async fn publish_event(
        &self,
        routing_key: &str,
        payload: &[u8],
    ) -> Result<(), BrokerError> {
        match &self.adapter {
            LinkAdapter::Amqp(link) => link.publish_event(routing_key, payload).await,
            LinkAdapter::InProcess(InProcessLink { broker, .. }) => {
                broker.publish_event(routing_key, payload);
                Ok(())
            }
        }
    }

    /// Tells every api instance which channels have new records. Not persistent and not
    /// confirmed (the confirm is not awaited): a lost notification only delays readers until
    /// their safety re-read, so the worker does not wait a broker round trip for it.
    pub async fn publish_notification(&self, payload: &[u8]) -> Result<(), BrokerError> {
        match &self.adapter {
            LinkAdapter::Amqp(link) => link.publish_notification(payload).await,
            LinkAdapter::InProcess(InProcessLink { broker, .. }) => {
                broker.publish_notification(payload);
                Ok(())
            }
        }
    }

    /// Sends a reply to an api instance's reply queue.
    pub async fn publish_reply(&self, reply_to: &str, payload: &[u8]) -> Result<(), BrokerError> {
        match &self.adapter {
            LinkAdapter::Amqp(link) => link.publish_reply(reply_to, payload).await,
            LinkAdapter::InProcess(InProcessLink { broker, .. }) => {
                broker.publish_reply(reply_to, payload)
            }
        }
    }

    /// Whether the broker answers (connecting if needed).
    pub async fn ping(&self) -> Result<(), BrokerError> {
        self.ensure_connected().await
    }

    /// Deletes every queue and exchange of this deployment's prefix (partition logs, and the
    /// queues of versions before them if they are still there). For tests and teardown. The
    /// in-process logs live and die with their process: nothing to delete.
    pub async fn delete_topology(&self) -> Result<(), BrokerError> {
        match &self.adapter {
            LinkAdapter::Amqp(link) => link.delete_topology().await,
            LinkAdapter::InProcess(_) => Ok(()),
        }
    }

    /// Closes the connection (graceful shutdown): the reply queue and the notifications stop
    /// coming.
    pub async fn close(&self) {
        match &self.adapter {
            LinkAdapter::Amqp(link) => link.close().await,
            LinkAdapter::InProcess(link) => link
                .broker
                .disconnect(link.reply_queue.as_deref(), link.notifications.as_ref()),
        }
    }
}

/// RabbitMQ's side of [`BrokerLink`]: each method does what the `BrokerLink` method of the same
/// name says.
impl AmqpLink {
    async fn live(&self) -> Result<Arc<Live>, BrokerError> {
        let mut guard = self.live.lock().await;
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(BrokerError::Unavailable("link closed".into()));
        }
        if let Some(live) = guard.as_ref()
            && live.connection.status().connected()
        {
            if live.channel.status().connected()
                && !live.stale.load(std::sync::atomic::Ordering::SeqCst)
            {
                return Ok(live.clone());
            }
            // The connection is fine but the channel saw a nack or was closed by the broker:
            // publish on a new channel (see the module documentation).
            let connection = live.connection.clone();
            let old = live.channel.clone();
            let channel = publishing_channel(&connection).await?;
            if old.status().connected() {
                let _ = bounded("closing a channel", old.close(200, "replaced".into())).await;
            }
            let live = Arc::new(Live {
                connection,
                channel,
                stale: false.into(),
            });
            *guard = Some(live.clone());
            return Ok(live);
        }
        let reconnect = if let Some(old) = guard.take() {
            // Best effort: the old connection is broken or half-open.
            let _ = bounded("closing", old.connection.close(320, "rebuilding".into())).await;
            true
        } else {
            self.connected_once
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        };
        let connection = Arc::new(connect(&self.config, reconnect).await?);
        let result = async {
            declare_topology(&connection, &self.config).await?;
            let channel = publishing_channel(&connection).await?;
            if let Some((queue, sink)) = &self.reply_queue {
                start_reply_consumer(&connection, queue, sink.clone(), &self.config.tasks).await?;
            }
            if let Some(sink) = &self.notifications {
                start_notification_consumer(
                    &connection,
                    &self.config.names,
                    sink.clone(),
                    &self.config.tasks,
                )
                .await?;
            }
            Ok::<_, BrokerError>(channel)
        }
        .await;
        let channel = match result {
            Ok(channel) => channel,
            Err(error) => {
                let _ = bounded("closing", connection.close(320, "setup failed".into())).await;
                return Err(error);
            }
        };
        self.connected_once
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let live = Arc::new(Live {
            connection,
            channel,
            stale: false.into(),
        });
        *guard = Some(live.clone());
        Ok(live)
    }

    async fn forget(&self, failed: &Arc<Live>) {
        let mut guard = self.live.lock().await;
        if guard.as_ref().is_some_and(|live| Arc::ptr_eq(live, failed)) {
            *guard = None;
        }
    }

    /// Publishes one message with `mandatory` and waits for its confirm (bounded by the
    /// configured timeout). Ok means the broker durably queued it.
    ///
    /// A publish that fails because the connection broke, the confirm did not come or the
    /// broker nacked (a quorum leader going away) is published once more, with the same
    /// message id and payload, on a new channel or a new connection (possibly to another node):
    /// the worker deduplicates by command id and part id, so a repeat is harmless, while an
    /// answer of 503 would make every client retry. The two attempts together take at most
    /// about twice the confirm timeout.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let first = self
            .publish_once(
                exchange,
                routing_key,
                mandatory,
                payload,
                properties.clone(),
            )
            .await;
        match first {
            Err(
                BrokerError::Unavailable(_) | BrokerError::ConfirmTimeout | BrokerError::Nacked,
            ) if !self.closed.load(std::sync::atomic::Ordering::SeqCst) => {
                self.publish_once(exchange, routing_key, mandatory, payload, properties)
                    .await
            }
            other => other,
        }
    }

    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        // Not cut short by the confirm timeout: a reconnect abandoned halfway would only be
        // started again by the next publish. Each step of it is bounded instead.
        let live = self.live().await?;
        let result = async {
            let pending = bounded(
                "publishing",
                live.channel.basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    properties,
                ),
            )
            .await?;
            let confirmation = tokio::time::timeout(self.config.confirm_timeout, pending)
                .await
                .map_err(|_| BrokerError::ConfirmTimeout)??;
            if !confirmation.is_ack() {
                return Err(BrokerError::Nacked);
            }
            if confirmation.take_message().is_some() {
                return Err(BrokerError::Unroutable);
            }
            Ok(())
        }
        .await;
        match result {
            Err(BrokerError::Unavailable(_) | BrokerError::ConfirmTimeout) => {
                self.forget(&live).await;
            }
            Err(BrokerError::Nacked) => {
                live.stale.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            _ => {}
        }
        result
    }

    async fn publish_commands(
        &self,
        partition: u16,
        message_id: &str,
        reply_to: Option<&str>,
        payload: &[u8],
    ) -> Result<(), BrokerError> {
        let mut properties = persistent(Some(message_id));
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        self.publish_confirmed(
            &self.config.names.commands_exchange(),
            &self.config.names.partition_log(partition),
            true,
            payload,
            properties,
        )
        .await
    }

    async fn publish_events_and_replies(
        &self,
        events: &[(&str, &[u8])],
        replies: &[(&str, &[u8])],
    ) -> (Vec<Result<(), BrokerError>>, Vec<Result<(), BrokerError>>) {
        let events_exchange = self.config.names.events_exchange();
        let reply_properties =
            BasicProperties::default().with_content_type("application/json".into());
        let messages: Vec<(&str, &str, &[u8], BasicProperties)> = events
            .iter()
            .map(|(routing_key, payload)| {
                (
                    events_exchange.as_str(),
                    *routing_key,
                    *payload,
                    persistent(None),
                )
            })
            .chain(
                replies
                    .iter()
                    .map(|(reply_to, payload)| ("", *reply_to, *payload, reply_properties.clone())),
            )
            .collect();
        let mut results = self.publish_together(&messages).await;
        for (result, (exchange, routing_key, payload, properties)) in
            results.iter_mut().zip(&messages)
        {
            if result.is_err() {
                *result = self
                    .publish_confirmed(exchange, routing_key, false, payload, properties.clone())
                    .await;
            }
        }
        let replies = results.split_off(events.len());
        (results, replies)
    }

    /// Sends every message on the publishing channel, then awaits their confirms (each bounded
    /// by the confirm timeout). Not retried here.
    async fn publish_together(
        &self,
        messages: &[(&str, &str, &[u8], BasicProperties)],
    ) -> Vec<Result<(), BrokerError>> {
        let live = match self.live().await {
            Ok(live) => live,
            Err(error) => return messages.iter().map(|_| Err(error.clone())).collect(),
        };
        let mut pending = Vec::with_capacity(messages.len());
        for (exchange, routing_key, payload, properties) in messages {
            pending.push(
                bounded(
                    "publishing",
                    live.channel.basic_publish(
                        (*exchange).into(),
                        (*routing_key).into(),
                        BasicPublishOptions::default(),
                        payload,
                        properties.clone(),
                    ),
                )
                .await,
            );
        }
        let mut results = Vec::with_capacity(messages.len());
        for sent in pending {
            let result = match sent {
                Err(error) => Err(error),
                Ok(confirm) => {
                    match tokio::time::timeout(self.config.confirm_timeout, confirm).await {
                        Err(_) => Err(BrokerError::ConfirmTimeout),
                        Ok(Err(error)) => Err(error.into()),
                        Ok(Ok(confirmation)) if confirmation.is_ack() => Ok(()),
                        Ok(Ok(_)) => Err(BrokerError::Nacked),
                    }
                }
            };
            results.push(result);
        }
        if results.iter().any(|result| {
            matches!(
                result,
                Err(BrokerError::Unavailable(_) | BrokerError::ConfirmTimeout)
            )
        }) {
            self.forget(&live).await;
        } else if results
            .iter()
            .any(|result| matches!(result, Err(BrokerError::Nacked)))
        {
            live.stale.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        results
    }

    async fn publish_event(&self, routing_key: &str, payload: &[u8]) -> Result<(), BrokerError> {
        self.publish_confirmed(
            &self.config.names.events_exchange(),
            routing_key,
            false,
            payload,
            persistent(None),
        )
        .await
    }

    async fn publish_notification(&self, payload: &[u8]) -> Result<(), BrokerError> {
        let live = self.live().await?;
        let published = bounded(
            "publishing a notification",
            live.channel.basic_publish(
                self.config.names.notify_exchange().as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                payload,
                BasicProperties::default(),
            ),
        )
        .await;
        if let Err(error) = &published
            && matches!(error, BrokerError::Unavailable(_))
        {
            self.forget(&live).await;
        }
        published.map(drop)
    }

    async fn publish_reply(&self, reply_to: &str, payload: &[u8]) -> Result<(), BrokerError> {
        let properties = BasicProperties::default().with_content_type("application/json".into());
        self.publish_confirmed("", reply_to, false, payload, properties)
            .await
    }

    async fn delete_topology(&self) -> Result<(), BrokerError> {
        let live = self.live().await?;
        let names = &self.config.names;
        let mut queues: Vec<String> = (0..names.partitions)
            .flat_map(|partition| {
                [
                    names.partition_log(partition),
                    names.legacy_partition_queue(partition),
                ]
            })
            .collect();
        queues.push(names.legacy_dead_letter_queue());
        // Deleting a queue that does not exist succeeds.
        for queue in queues {
            bounded(
                "deleting a queue",
                live.channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
            )
            .await?;
        }
        for exchange in [
            names.commands_exchange(),
            names.events_exchange(),
            names.notify_exchange(),
        ] {
            bounded(
                "deleting an exchange",
                live.channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()),
            )
            .await?;
        }
        Ok(())
    }

    async fn close(&self) {
        let mut guard = self.live.lock().await;
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(live) = guard.take() {
            let _ = bounded("closing", live.connection.close(200, "shutdown".into())).await;
        }
    }
}

/// The message id and reply queue of a delivered command message.
fn message_id_and_reply_to(properties: &BasicProperties) -> (Option<String>, Option<String>) {
    (
        properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned()),
        properties
            .reply_to()
            .as_ref()
            .map(|queue| queue.as_str().to_owned()),
    )
}

/// A new confirm-mode channel for publishing.
async fn publishing_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = bounded("opening a channel", connection.create_channel()).await?;
    bounded(
        "enabling confirms",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

/// The channel-level AMQP error code of `error`, if it is one.
pub(super) fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

async fn start_reply_consumer(
    connection: &Connection,
    queue: &str,
    sink: ReplySink,
    tasks: &TaskTracker,
) -> Result<(), BrokerError> {
    let channel = bounded("opening a channel", connection.create_channel()).await?;
    let mut arguments = FieldTable::default();
    // The queue outlives a short reconnect but disappears a while after its api instance died.
    arguments.insert("x-expires".into(), AMQPValue::LongLongInt(300_000));
    bounded(
        "declaring the reply queue",
        channel.queue_declare(queue.into(), QueueDeclareOptions::default(), arguments),
    )
    .await?;
    let mut consumer = bounded(
        "consuming the reply queue",
        channel.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    tasks.spawn(async move {
        // Ends with the connection; the next publish rebuilds both.
        while let Some(Ok(delivery)) = consumer.next().await {
            if sink.send(delivery.data).is_err() {
                break;
            }
        }
        drop(channel);
    });
    Ok(())
}

async fn start_notification_consumer(
    connection: &Connection,
    names: &BrokerNames,
    sink: NotificationSink,
    tasks: &TaskTracker,
) -> Result<(), BrokerError> {
    let channel = bounded("opening a channel", connection.create_channel()).await?;
    let queue = bounded(
        "declaring the notification queue",
        channel.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    bounded(
        "binding the notification queue",
        channel.queue_bind(
            queue.name().clone(),
            names.notify_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    let mut consumer = bounded(
        "consuming the notification queue",
        channel.basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    let _ = sink.send(Notification::Reconnected);
    tasks.spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            if sink.send(Notification::Message(delivery.data)).is_err() {
                break;
            }
        }
        drop(channel);
    });
    Ok(())
}
