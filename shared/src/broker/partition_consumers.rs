//! A worker's consumer connection to the partition queues.
//!
//! What lives here: subscribing partitions one at a time (a channel each, prefetch 1), handing a
//! partition back by closing its channel, the worker presence queue, and [`Incoming`] with its
//! ack. What does not: *which* partitions to subscribe and when (the worker's consumer decides,
//! with the rule in `domain::partition`).
//!
//! Why channels are closed and never cancelled: on a quorum queue with single active consumer,
//! `basic.cancel` as a hand-over breaks order, closing the channel with prefetch 1 keeps it
//! (DESIGN §2, measured on RabbitMQ 3.10.8).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio::sync::mpsc;

use super::{
    BrokerConfig, BrokerError, InProcessBroker, bounded, connect, declare_topology, soft_error,
};

/// How often [`PartitionConsumers::broken`] looks at the connection's state, in case a dead
/// connection does not end the delivery streams (lapin#389).
const CONNECTION_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// One command message taken from a partition queue, not yet acknowledged.
pub struct Incoming {
    pub partition: u16,
    pub payload: Vec<u8>,
    pub message_id: Option<String>,
    pub reply_to: Option<String>,
    pub redelivered: bool,
    /// Which subscription of the partition delivered it (see [`PartitionConsumers::is_current`]).
    pub(super) subscription: u64,
    pub(super) delivery: Acker,
}

/// How an [`Incoming`] is acknowledged.
pub(super) enum Acker {
    Amqp(Box<lapin::message::Delivery>),
    InProcess(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>),
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("partition", &self.partition)
            .field("message_id", &self.message_id)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// Acknowledges the message: it will not be delivered again.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        match &self.delivery {
            Acker::Amqp(delivery) => {
                bounded("acknowledging", delivery.ack(BasicAckOptions::default())).await?;
            }
            Acker::InProcess(ack) => {
                let sender = ack
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let Some(sender) = sender {
                    let _ = sender.send(());
                }
            }
        }
        Ok(())
    }
}

/// What the broker says about another worker's presence queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerPresence {
    /// Its consumer connection is open and has subscribed its home partitions.
    Present,
    /// No such worker is connected.
    Absent,
    /// The broker could not be asked.
    Unknown,
}

struct Subscription {
    id: u64,
    channel: Channel,
    /// Set before an intentional close, so that the end of the delivery stream is not taken
    /// for a broken connection.
    handed_back: Arc<AtomicBool>,
}

/// A worker's consumer connection: one channel per subscribed partition, prefetch 1, deliveries
/// forwarded to one sink.
pub struct PartitionConsumers {
    config: BrokerConfig,
    consumer_name: String,
    connection: Option<Connection>,
    in_process: Option<Arc<InProcessBroker>>,
    sink: mpsc::Sender<Incoming>,
    subscriptions: HashMap<u16, Subscription>,
    next_subscription: u64,
    broken_tx: mpsc::Sender<()>,
    broken_rx: mpsc::Receiver<()>,
}

impl std::fmt::Debug for PartitionConsumers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionConsumers")
            .field("consumer_name", &self.consumer_name)
            .field("subscribed", &self.subscriptions.len())
            .finish_non_exhaustive()
    }
}

impl PartitionConsumers {
    /// Connects and declares the topology; no partition is subscribed yet. The embedded
    /// broker has a single consumer that receives every partition at once.
    pub async fn connect(
        config: &BrokerConfig,
        consumer_name: &str,
        sink: mpsc::Sender<Incoming>,
    ) -> Result<Self, BrokerError> {
        let (broken_tx, broken_rx) = mpsc::channel::<()>(1);
        let mut consumers = Self {
            config: config.clone(),
            consumer_name: consumer_name.to_owned(),
            connection: None,
            in_process: config.in_process.clone(),
            sink,
            subscriptions: HashMap::new(),
            next_subscription: 1,
            broken_tx,
            broken_rx,
        };
        if let Some(broker) = &consumers.in_process {
            broker.attach_consumer(consumers.sink.clone());
            return Ok(consumers);
        }
        let connection = connect(config, false).await?;
        if let Err(error) = declare_topology(&connection, config).await {
            let _ = bounded("closing", connection.close(320, "setup failed".into())).await;
            return Err(error);
        }
        consumers.connection = Some(connection);
        Ok(consumers)
    }

    fn connection(&self) -> Result<&Connection, BrokerError> {
        self.connection
            .as_ref()
            .ok_or_else(|| BrokerError::Unavailable("no consumer connection".into()))
    }

    /// Subscribes `partition` on a channel of its own with prefetch 1. Under single active
    /// consumer the broker delivers only to the first live subscriber; the others wait.
    pub async fn subscribe(&mut self, partition: u16) -> Result<(), BrokerError> {
        if self.in_process.is_some() || self.subscriptions.contains_key(&partition) {
            return Ok(());
        }
        let channel = bounded("opening a channel", self.connection()?.create_channel()).await?;
        // Strict order on quorum queues needs prefetch 1 (DESIGN §2).
        bounded(
            "setting prefetch",
            channel.basic_qos(1, BasicQosOptions::default()),
        )
        .await?;
        let queue = self.config.names.partition_queue(partition);
        let tag = ShortString::try_new(format!("{}.{queue}", self.consumer_name))
            .unwrap_or_else(|_| ShortString::from(""));
        let mut consumer = bounded(
            "subscribing a partition",
            channel.basic_consume(
                queue.as_str().into(),
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let id = self.next_subscription;
        self.next_subscription += 1;
        let handed_back = Arc::new(AtomicBool::new(false));
        let sink = self.sink.clone();
        let broken = self.broken_tx.clone();
        let intentional = handed_back.clone();
        tokio::spawn(async move {
            loop {
                match consumer.next().await {
                    Some(Ok(delivery)) => {
                        let incoming = Incoming {
                            partition,
                            message_id: delivery
                                .properties
                                .message_id()
                                .as_ref()
                                .map(|id| id.as_str().to_owned()),
                            reply_to: delivery
                                .properties
                                .reply_to()
                                .as_ref()
                                .map(|queue| queue.as_str().to_owned()),
                            redelivered: delivery.redelivered,
                            payload: delivery.data.clone(),
                            subscription: id,
                            delivery: Acker::Amqp(Box::new(delivery)),
                        };
                        if sink.send(incoming).await.is_err() {
                            break;
                        }
                    }
                    Some(Err(error)) => {
                        if !intentional.load(Ordering::SeqCst) {
                            tracing::warn!(partition, %error, "partition consumer failed");
                        }
                        break;
                    }
                    None => break,
                }
            }
            if !intentional.load(Ordering::SeqCst) {
                let _ = broken.try_send(());
            }
        });
        self.subscriptions.insert(
            partition,
            Subscription {
                id,
                channel,
                handed_back,
            },
        );
        Ok(())
    }

    /// Gives `partition` back: closes its channel, so the broker puts the unacknowledged
    /// message (at most one) back at the head of the queue and makes the next waiting consumer
    /// active. Call it between batches only. Deliveries of the closed subscription still in
    /// the sink are no longer [current](Self::is_current) and must be dropped unprocessed.
    pub async fn hand_back(&mut self, partition: u16) {
        if let Some(subscription) = self.subscriptions.remove(&partition) {
            subscription.handed_back.store(true, Ordering::SeqCst);
            let _ = bounded(
                "handing a partition back",
                subscription
                    .channel
                    .close(200, "handing the partition back".into()),
            )
            .await;
        }
    }

    /// Whether `incoming` came from the live subscription of its partition (a delivery of a
    /// handed-back channel was returned to its queue by the broker).
    pub fn is_current(&self, incoming: &Incoming) -> bool {
        if self.in_process.is_some() {
            return true;
        }
        self.subscriptions
            .get(&incoming.partition)
            .is_some_and(|subscription| subscription.id == incoming.subscription)
    }

    /// Declares this worker's presence queue: exclusive to this connection, so it exists
    /// exactly as long as the connection that holds the home subscriptions. Returns `false`
    /// when another live connection already holds it (two workers with one `WORKER_INDEX`).
    pub async fn announce_presence(&self, worker_index: u16) -> Result<bool, BrokerError> {
        if self.in_process.is_some() {
            return Ok(true);
        }
        let channel = bounded("opening a channel", self.connection()?.create_channel()).await?;
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = self.config.names.worker_presence_queue(worker_index);
        let declared = tokio::time::timeout(
            super::OPERATION_TIMEOUT,
            channel.queue_declare(queue.as_str().into(), options, FieldTable::default()),
        )
        .await
        .map_err(|_| BrokerError::Unavailable("declaring the presence queue timed out".into()))?;
        match declared {
            Ok(_) => {
                let _ = bounded(
                    "closing a channel",
                    channel.close(200, "presence declared".into()),
                )
                .await;
                Ok(true)
            }
            Err(error) if soft_error(&error) == Some(AMQPSoftError::RESOURCELOCKED) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Whether worker `worker_index` is connected with its home partitions subscribed: a
    /// passive declare of its presence queue is refused as locked while its connection lives
    /// and answered "not found" once it is gone.
    pub async fn presence_of(&self, worker_index: u16) -> WorkerPresence {
        let Ok(connection) = self.connection() else {
            return WorkerPresence::Unknown;
        };
        let Ok(channel) = bounded("opening a channel", connection.create_channel()).await else {
            return WorkerPresence::Unknown;
        };
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let queue = self.config.names.worker_presence_queue(worker_index);
        let presence = match tokio::time::timeout(
            super::OPERATION_TIMEOUT,
            channel.queue_declare(queue.as_str().into(), options, FieldTable::default()),
        )
        .await
        {
            Err(_) => WorkerPresence::Unknown,
            Ok(Ok(_)) => WorkerPresence::Present,
            Ok(Err(error)) => match soft_error(&error) {
                Some(AMQPSoftError::RESOURCELOCKED) => WorkerPresence::Present,
                Some(AMQPSoftError::NOTFOUND) => WorkerPresence::Absent,
                _ => WorkerPresence::Unknown,
            },
        };
        if channel.status().connected() {
            let _ = bounded(
                "closing a channel",
                channel.close(200, "presence checked".into()),
            )
            .await;
        }
        presence
    }

    /// Resolves when a partition consumer stopped without being handed back (the connection
    /// or a channel broke), or when the connection is no longer connected even though no
    /// delivery stream ended (a node that went away without closing its sockets is detected by
    /// missed heartbeats: `heartbeat=` in `AMQP_URL`).
    pub async fn broken(&mut self) {
        if self.in_process.is_some() {
            // An in-process consumer only ends when it is closed.
            return std::future::pending().await;
        }
        let mut check = tokio::time::interval(CONNECTION_CHECK);
        loop {
            tokio::select! {
                _ = self.broken_rx.recv() => return,
                _ = check.tick() => {
                    let connected = self
                        .connection
                        .as_ref()
                        .is_some_and(|connection| connection.status().connected());
                    if !connected {
                        tracing::warn!("consumer connection is no longer connected");
                        return;
                    }
                }
            }
        }
    }

    /// Closes every channel; unacknowledged messages go back to their queues in order.
    pub async fn close(&mut self) {
        if let Some(broker) = &self.in_process {
            broker.detach_consumer();
        }
        for subscription in self.subscriptions.values() {
            subscription.handed_back.store(true, Ordering::SeqCst);
        }
        self.subscriptions.clear();
        if let Some(connection) = &self.connection {
            let _ = bounded("closing", connection.close(200, "worker closing".into())).await;
        }
    }
}
