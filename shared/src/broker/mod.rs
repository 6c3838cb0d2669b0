//! The RabbitMQ adapter: the only module that names `lapin`.
//!
//! - [`BrokerNames`]: every exchange and queue name of a deployment, from one prefix.
//! - [`BrokerLink`]: a connection that is rebuilt on demand, with a confirm-mode channel for
//!   publishing commands, events, replies and dead letters (each publish awaits its confirm
//!   under a timeout), and an optional reply queue whose messages are forwarded to a channel.
//! - [`PartitionConsumers`]: a worker's consumer connection: one channel per subscribed
//!   partition, prefetch 1, deliveries forwarded as [`Incoming`] values that the worker acks or
//!   dead-letters; partitions are subscribed and handed back one by one; the worker's presence
//!   queue tells other workers that its home partitions are covered.
//!
//! - [`BrokerAddresses`]: the node URLs (`AMQP_URL` may list the nodes of a cluster); every
//!   (re)connect tries them in turn, starting after the node last used.
//!
//! Topology (declared idempotently by every process at connect): a direct exchange
//! `<prefix>.commands` routing to `P` quorum queues `<prefix>.p<NNN>` (single active consumer,
//! delivery limit, dead-lettering to the quorum queue `<prefix>.dead`, leaders placed by the
//! broker's `balanced` locator, optionally `x-quorum-initial-group-size` replicas), and a topic
//! exchange `<prefix>.events` for runners.
//!
//! Every broker operation is bounded by a timeout (a half-dead connection to a node that is
//! going away must not hang a publisher or a consumer), and a link that saw a failure or a nack
//! publishes on a new channel: RabbitMQ 3.10 kept stalling publishes on a channel that was open
//! across a quorum leader election, while a fresh channel was confirmed within about a second.

use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Mutex, mpsc};

mod addresses;
mod in_process;
mod partition_consumers;
pub use addresses::BrokerAddresses;
pub use in_process::InProcessBroker;
pub use partition_consumers::{Incoming, PartitionConsumers, WorkerPresence};

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
    pub fn partition_queue(&self, partition: u16) -> String {
        format!("{}.p{partition:03}", self.prefix)
    }
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    pub fn reply_queue(&self, instance: &str) -> String {
        format!("{}.reply.{instance}", self.prefix)
    }
    /// Exclusive queue that exists while worker `index`'s consumer connection lives: how the
    /// other workers learn that its home partitions are covered.
    pub fn worker_presence_queue(&self, worker_index: u16) -> String {
        format!("{}.worker{worker_index}.present", self.prefix)
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

/// How to reach and shape the broker.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub addresses: BrokerAddresses,
    pub names: BrokerNames,
    /// `x-quorum-initial-group-size` of new partition queues (`None`: the broker's default).
    pub quorum_group_size: Option<u16>,
    pub signals: BrokerSignals,
    pub delivery_limit: u32,
    pub queue_expires: Option<Duration>,
    pub confirm_timeout: Duration,
    /// Shown in the broker's connection list.
    pub connection_name: String,
    /// The embedded default: route everything through this in-process broker instead of AMQP.
    pub in_process: Option<Arc<InProcessBroker>>,
}

impl BrokerConfig {
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
            quorum_group_size: settings.quorum_group_size,
            signals: BrokerSignals::default(),
            delivery_limit: settings.delivery_limit,
            queue_expires: settings.queue_expires,
            confirm_timeout: settings.confirm_timeout,
            connection_name,
            in_process,
        }
    }

    /// Reports connections and topology surprises to `signals` instead of plain logs.
    pub fn with_signals(mut self, signals: BrokerSignals) -> Self {
        self.signals = signals;
        self
    }
}

fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments
}

fn expires_argument(arguments: &mut FieldTable, expires: Option<Duration>) {
    if let Some(expires) = expires {
        let millis = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX);
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
    }
}

/// The arguments of partition queue declarations.
fn partition_arguments(config: &BrokerConfig) -> FieldTable {
    let names = &config.names;
    let mut arguments = quorum_arguments();
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(config.delivery_limit).unwrap_or(i32::MAX)),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(names.dead_letter_queue().as_str().into()),
    );
    // Leaders spread over the nodes when the queues are created (RabbitMQ ≥ 3.10); a node that
    // comes back after a failure leads nothing until `rabbitmq-queues rebalance quorum`.
    arguments.insert(
        "x-queue-leader-locator".into(),
        AMQPValue::LongString("balanced".into()),
    );
    if let Some(size) = config.quorum_group_size {
        arguments.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongInt(i32::from(size)),
        );
    }
    expires_argument(&mut arguments, config.queue_expires);
    arguments
}

/// Declares the whole topology on a channel of its own, which it closes. Idempotent; every
/// process calls it when it connects.
///
/// A partition queue that already exists with other arguments (declared by an older version,
/// or with another group size) makes the broker refuse the declaration with
/// PRECONDITION_FAILED and close the channel: the queue is then checked passively on a new
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
    let mut dead_arguments = quorum_arguments();
    expires_argument(&mut dead_arguments, config.queue_expires);
    bounded(
        "declaring the dead-letter queue",
        channel.queue_declare(names.dead_letter_queue().into(), durable, dead_arguments),
    )
    .await?;
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
    let arguments = partition_arguments(config);
    for partition in 0..names.partitions {
        let queue = names.partition_queue(partition);
        let declared = tokio::time::timeout(
            OPERATION_TIMEOUT,
            channel.queue_declare(queue.as_str().into(), durable, arguments.clone()),
        )
        .await
        .map_err(|_| BrokerError::Unavailable("declaring a partition queue timed out".into()))?;
        if let Err(error) = declared {
            if soft_error(&error) != Some(AMQPSoftError::PRECONDITIONFAILED) {
                return Err(error.into());
            }
            (config.signals.queue_arguments_differ)(&queue, &error.to_string());
            channel = bounded("opening a channel", connection.create_channel()).await?;
            bounded(
                "checking a partition queue",
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
            "binding a partition queue",
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

/// A connection to the broker that is rebuilt on demand, with a confirm-mode publishing channel.
pub struct BrokerLink {
    config: BrokerConfig,
    reply_queue: Option<(String, ReplySink)>,
    notifications: Option<NotificationSink>,
    live: Mutex<Option<Arc<Live>>>,
    /// Set by [`BrokerLink::close`]: no reconnects after a graceful shutdown.
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
        if let (Some(broker), Some((queue, sink))) = (&config.in_process, &reply_queue) {
            broker.register_reply_queue(queue, sink.clone());
        }
        Self {
            config,
            reply_queue,
            notifications: None,
            live: Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
            connected_once: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Also subscribe to the notification fanout on every (re)connect.
    pub fn with_notifications(mut self, sink: NotificationSink) -> Self {
        if let Some(broker) = &self.config.in_process {
            broker.register_notifications(sink.clone());
        }
        self.notifications = Some(sink);
        self
    }

    pub fn names(&self) -> &BrokerNames {
        &self.config.names
    }

    /// Connects now (declaring the topology) if not connected.
    pub async fn ensure_connected(&self) -> Result<(), BrokerError> {
        if self.config.in_process.is_some() {
            return Ok(());
        }
        self.live().await.map(|_| ())
    }

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
                start_reply_consumer(&connection, queue, sink.clone()).await?;
            }
            if let Some(sink) = &self.notifications {
                start_notification_consumer(&connection, &self.config.names, sink.clone()).await?;
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

    /// Publishes an encoded command envelope to `partition`.
    pub async fn publish_commands(
        &self,
        partition: u16,
        message_id: &str,
        reply_to: Option<&str>,
        payload: &[u8],
    ) -> Result<(), BrokerError> {
        if let Some(broker) = &self.config.in_process {
            return broker
                .publish_commands(
                    partition,
                    message_id,
                    reply_to,
                    payload,
                    self.config.confirm_timeout,
                )
                .await;
        }
        let mut properties = persistent(Some(message_id));
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        self.publish_confirmed(
            &self.config.names.commands_exchange(),
            &self.config.names.partition_queue(partition),
            true,
            payload,
            properties,
        )
        .await
    }

    /// Publishes an event (e.g. `run.requested`) on the events exchange. Unrouted events are
    /// dropped by the broker: runners bind their own queues.
    pub async fn publish_event(
        &self,
        routing_key: &str,
        payload: &[u8],
    ) -> Result<(), BrokerError> {
        if let Some(broker) = &self.config.in_process {
            broker.publish_event(routing_key, payload);
            return Ok(());
        }
        self.publish_confirmed(
            &self.config.names.events_exchange(),
            routing_key,
            false,
            payload,
            persistent(None),
        )
        .await
    }

    /// Tells every api instance which channels have new records. Not persistent: a lost
    /// notification only delays readers until their safety re-read.
    pub async fn publish_notification(&self, payload: &[u8]) -> Result<(), BrokerError> {
        if let Some(broker) = &self.config.in_process {
            broker.publish_notification(payload);
            return Ok(());
        }
        self.publish_confirmed(
            &self.config.names.notify_exchange(),
            "",
            false,
            payload,
            BasicProperties::default(),
        )
        .await
    }

    /// Sends a reply to an api instance's reply queue.
    pub async fn publish_reply(&self, reply_to: &str, payload: &[u8]) -> Result<(), BrokerError> {
        if let Some(broker) = &self.config.in_process {
            return broker.publish_reply(reply_to, payload);
        }
        let properties = BasicProperties::default().with_content_type("application/json".into());
        self.publish_confirmed("", reply_to, false, payload, properties)
            .await
    }

    /// Moves a command message to the dead-letter queue with the reason in a header.
    pub async fn publish_dead_letter(
        &self,
        payload: &[u8],
        message_id: Option<&str>,
        partition: u16,
        reason: &str,
    ) -> Result<(), BrokerError> {
        if let Some(broker) = &self.config.in_process {
            broker.publish_dead_letter(payload, reason);
            return Ok(());
        }
        let mut headers = FieldTable::default();
        headers.insert(
            "x-sessions-dead-letter-reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            "x-sessions-partition".into(),
            AMQPValue::LongInt(i32::from(partition)),
        );
        headers.insert(
            "x-sessions-dead-lettered-at".into(),
            AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis()),
        );
        let properties = persistent(message_id).with_headers(headers);
        self.publish_confirmed(
            "",
            &self.config.names.dead_letter_queue(),
            true,
            payload,
            properties,
        )
        .await
    }

    /// Whether the broker answers (connecting if needed).
    pub async fn ping(&self) -> Result<(), BrokerError> {
        self.ensure_connected().await
    }

    /// Deletes every queue and exchange of this deployment's prefix. For tests and teardown.
    pub async fn delete_topology(&self) -> Result<(), BrokerError> {
        if self.config.in_process.is_some() {
            return Ok(());
        }
        let live = self.live().await?;
        let names = &self.config.names;
        for partition in 0..names.partitions {
            live.channel
                .queue_delete(
                    names.partition_queue(partition).into(),
                    QueueDeleteOptions::default(),
                )
                .await?;
        }
        live.channel
            .queue_delete(
                names.dead_letter_queue().into(),
                QueueDeleteOptions::default(),
            )
            .await?;
        for exchange in [
            names.commands_exchange(),
            names.events_exchange(),
            names.notify_exchange(),
        ] {
            live.channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Closes the connection (graceful shutdown).
    pub async fn close(&self) {
        let mut guard = self.live.lock().await;
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(live) = guard.take() {
            let _ = bounded("closing", live.connection.close(200, "shutdown".into())).await;
        }
    }

    /// Every message in the dead-letter queue (they stay there). For operators.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BrokerError> {
        self.take_dead_letters(|_| false)
            .await
            .map(|(listed, _)| listed)
    }

    /// Re-publishes the dead letters whose message id is `id` (all of them with `None`) to their
    /// partition and removes them from the dead-letter queue. Returns how many.
    pub async fn replay_dead_letters(&self, id: Option<&str>) -> Result<usize, BrokerError> {
        self.take_dead_letters(|letter| {
            id.is_none_or(|id| letter.message_id.as_deref() == Some(id))
        })
        .await
        .map(|(_, replayed)| replayed)
    }

    /// Reads the whole dead-letter queue on one channel; `replay` picks the ones to re-publish
    /// and ack; closing the channel puts the others back.
    async fn take_dead_letters(
        &self,
        replay: impl Fn(&DeadLetter) -> bool,
    ) -> Result<(Vec<DeadLetter>, usize), BrokerError> {
        if self.config.in_process.is_some() {
            return Ok((Vec::new(), 0));
        }
        let live = self.live().await?;
        let channel = live.connection.create_channel().await?;
        let mut listed = Vec::new();
        let mut replayed = 0;
        while let Some(message) = channel
            .basic_get(
                self.config.names.dead_letter_queue().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await?
        {
            let delivery = message.delivery;
            let letter = DeadLetter::from_delivery(&delivery, self.config.names.partitions);
            if replay(&letter) {
                self.publish_commands(
                    letter.partition,
                    letter.message_id.as_deref().unwrap_or("replayed"),
                    None,
                    &delivery.data,
                )
                .await?;
                delivery.ack(BasicAckOptions::default()).await?;
                replayed += 1;
            }
            listed.push(letter);
        }
        let _ = channel.close(200, "dead letters read".into()).await;
        Ok((listed, replayed))
    }

    /// Counts messages ready in the dead-letter queue. For tests and operators.
    pub async fn dead_letter_count(&self) -> Result<u32, BrokerError> {
        if let Some(broker) = &self.config.in_process {
            return Ok(broker.dead_letter_count());
        }
        let live = self.live().await?;
        let queue = live
            .channel
            .queue_declare(
                self.config.names.dead_letter_queue().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(queue.message_count())
    }
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
    tokio::spawn(async move {
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
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            if sink.send(Notification::Message(delivery.data)).is_err() {
                break;
            }
        }
        drop(channel);
    });
    Ok(())
}

/// A message of the dead-letter queue, as operators see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    /// Our reason (`x-sessions-dead-letter-reason`) or the broker's (`x-first-death-reason`,
    /// e.g. `delivery_limit`).
    pub reason: String,
    pub partition: u16,
    /// Internal id of the first command's session, if the payload decodes.
    pub session_id: Option<String>,
    /// When it was dead-lettered (epoch ms), if known.
    pub dead_lettered_at_ms: Option<i64>,
}

impl DeadLetter {
    fn from_delivery(delivery: &lapin::message::Delivery, partitions: u16) -> Self {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let header = |name: &str| headers.inner().get(name).cloned();
        let text = |value: Option<AMQPValue>| match value {
            Some(AMQPValue::LongString(text)) => {
                Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
            }
            Some(AMQPValue::ShortString(text)) => Some(text.as_str().to_owned()),
            _ => None,
        };
        let number = |value: Option<AMQPValue>| match value {
            Some(AMQPValue::LongInt(n)) => Some(i64::from(n)),
            Some(AMQPValue::LongLongInt(n)) => Some(n),
            Some(AMQPValue::Timestamp(n)) => i64::try_from(n).ok().map(|seconds| seconds * 1000),
            _ => None,
        };
        let envelope = crate::commands::Envelope::decode(&delivery.data).ok();
        let session_id = envelope
            .as_ref()
            .and_then(|envelope| envelope.commands.first())
            .map(|command| command.session_id);
        let partition = number(header("x-sessions-partition"))
            .and_then(|n| u16::try_from(n).ok())
            .or_else(|| session_id.map(|id| crate::domain::partition::partition_of(id, partitions)))
            .unwrap_or(0);
        Self {
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned()),
            reason: text(header("x-sessions-dead-letter-reason"))
                .or_else(|| text(header("x-first-death-reason")))
                .unwrap_or_else(|| "unknown".into()),
            partition,
            session_id: session_id.map(|id| id.to_string()),
            dead_lettered_at_ms: number(header("x-sessions-dead-lettered-at")),
        }
    }
}
