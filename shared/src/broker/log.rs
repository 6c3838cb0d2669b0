//! Reading partition logs: a worker's reader connection.
//!
//! What lives here: reading one partition log from a given offset at depth (a channel per
//! partition, a deep prefetch, RabbitMQ stream offsets), stopping a reader, and [`LogDelivery`]
//! with its acknowledgement. Both adapters are here behind one type: RabbitMQ streams, and the
//! embedded default's in-process log ([`super::InProcessBroker`]).
//!
//! What does not: *which* partitions to read and from where (the worker decides, from the
//! positions stored in the database), and whether the first message proves that nothing was
//! skipped (`domain::log`).
//!
//! On a stream an acknowledgement is only flow control (credit for the prefetch window): the
//! broker keeps no per-consumer position, the database does. Never nack or reject a stream
//! delivery: RabbitMQ 3.10 answers with a connection-level error (540 NOT_IMPLEMENTED) that
//! closes every channel of the connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio::sync::mpsc;

use super::{BrokerConfig, BrokerError, InProcessBroker, bounded, connect, declare_topology};
use crate::domain::log::ResumePoint;

/// How often [`PartitionLogs::broken`] looks at the connection's state, in case a dead
/// connection does not end the delivery streams (lapin#389).
const CONNECTION_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// One command message read from a partition log.
pub struct LogDelivery {
    pub partition: u16,
    /// Its offset in the partition log (increasing, not contiguous).
    pub offset: i64,
    pub payload: Vec<u8>,
    pub message_id: Option<String>,
    pub reply_to: Option<String>,
    /// Which reader of the partition delivered it (see [`PartitionLogs::is_current`]).
    pub subscription: u64,
    pub(super) acker: LogAcker,
}

/// How a [`LogDelivery`] is acknowledged.
pub(super) enum LogAcker {
    /// Credit on the reader's channel (`multiple`: everything up to this delivery), and the
    /// offset the reader's channel has acknowledged through so far (shared by all its
    /// deliveries).
    Amqp {
        acker: lapin::Acker,
        acknowledged_through: Arc<tokio::sync::Mutex<i64>>,
    },
    /// Tells the in-process log that everything up to this offset is committed (its publishers'
    /// confirms wait for that).
    InProcess(std::sync::Weak<InProcessBroker>),
}

impl std::fmt::Debug for LogDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogDelivery")
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

impl LogDelivery {
    /// Acknowledges this delivery and every earlier one of its reader. Call it once the batch
    /// that holds it has committed (the in-process log confirms its publishers then).
    ///
    /// Batches may finish out of order (more than one apply lane): a delivery already covered
    /// by a later one's acknowledgement is not acknowledged again, because RabbitMQ answers a
    /// second acknowledgement of a delivery tag by closing the channel (406 PRECONDITION_FAILED,
    /// unknown delivery tag), which stops the reader.
    pub async fn ack_through(&self) -> Result<(), BrokerError> {
        match &self.acker {
            LogAcker::Amqp {
                acker,
                acknowledged_through,
            } => {
                // Held across the send, so that two acknowledgements of one channel leave in
                // offset order.
                let mut through = acknowledged_through.lock().await;
                if self.offset <= *through {
                    return Ok(());
                }
                bounded(
                    "acknowledging",
                    acker.ack(BasicAckOptions { multiple: true }),
                )
                .await?;
                *through = self.offset;
            }
            LogAcker::InProcess(broker) => {
                if let Some(broker) = broker.upgrade() {
                    broker.committed(self.partition, self.offset);
                }
            }
        }
        Ok(())
    }
}

/// What a reader is, per adapter.
enum Reader {
    Amqp {
        channel: Channel,
        /// Set before an intentional close, so that the end of the delivery stream is not
        /// taken for a broken connection.
        stopped: Arc<AtomicBool>,
    },
    InProcess,
}

struct Subscription {
    id: u64,
    reader: Reader,
}

/// Where a worker's readers read from, per adapter: one RabbitMQ connection (a channel per
/// reader), or the embedded default's in-process logs.
#[expect(
    clippy::large_enum_variant,
    reason = "one per worker connection, never in a collection"
)]
enum LogSource {
    Amqp(Connection),
    InProcess(Arc<InProcessBroker>),
}

/// A worker's reader connection: one reader per partition it owns, deliveries forwarded to one
/// sink in per-partition log order.
pub struct PartitionLogs {
    config: BrokerConfig,
    consumer_name: String,
    prefetch: u16,
    source: LogSource,
    sink: mpsc::Sender<LogDelivery>,
    subscriptions: HashMap<u16, Subscription>,
    next_subscription: u64,
    broken_tx: mpsc::Sender<()>,
    broken_rx: mpsc::Receiver<()>,
}

impl std::fmt::Debug for PartitionLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionLogs")
            .field("consumer_name", &self.consumer_name)
            .field("reading", &self.subscriptions.len())
            .finish_non_exhaustive()
    }
}

impl PartitionLogs {
    /// Connects and declares the topology; no partition is read yet.
    pub async fn connect(
        config: &BrokerConfig,
        consumer_name: &str,
        prefetch: u16,
        sink: mpsc::Sender<LogDelivery>,
    ) -> Result<Self, BrokerError> {
        let (broken_tx, broken_rx) = mpsc::channel::<()>(1);
        let source = match &config.in_process {
            Some(broker) => LogSource::InProcess(broker.clone()),
            None => {
                let connection = connect(config, false).await?;
                if let Err(error) = declare_topology(&connection, config).await {
                    let _ = bounded("closing", connection.close(320, "setup failed".into())).await;
                    return Err(error);
                }
                LogSource::Amqp(connection)
            }
        };
        Ok(Self {
            config: config.clone(),
            consumer_name: consumer_name.to_owned(),
            prefetch: prefetch.max(1),
            source,
            sink,
            subscriptions: HashMap::new(),
            next_subscription: 1,
            broken_tx,
            broken_rx,
        })
    }

    /// Whether a reader of `partition` is running.
    pub fn is_reading(&self, partition: u16) -> bool {
        self.subscriptions.contains_key(&partition)
    }

    /// Starts reading `partition` at `resume` (see `domain::log`): from the last applied
    /// offset (which comes first again), from offset 0, or from the first message the log
    /// holds. A running reader of the partition is stopped first.
    pub async fn read(&mut self, partition: u16, resume: &ResumePoint) -> Result<(), BrokerError> {
        self.stop(partition).await;
        let id = self.next_subscription;
        self.next_subscription += 1;
        let reader = match &self.source {
            LogSource::InProcess(broker) => {
                broker.read(partition, resume, id, self.sink.clone(), &self.config.tasks);
                Reader::InProcess
            }
            LogSource::Amqp(connection) => {
                self.read_amqp(connection, partition, resume, id).await?
            }
        };
        self.subscriptions
            .insert(partition, Subscription { id, reader });
        Ok(())
    }

    /// A stream consumer of `partition`'s log on a channel of its own, forwarding deliveries
    /// to the sink until it is stopped or breaks.
    async fn read_amqp(
        &self,
        connection: &Connection,
        partition: u16,
        resume: &ResumePoint,
        id: u64,
    ) -> Result<Reader, BrokerError> {
        let channel = bounded("opening a channel", connection.create_channel()).await?;
        // A stream consumer needs a prefetch: it is the reader's depth.
        bounded(
            "setting prefetch",
            channel.basic_qos(self.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let mut arguments = FieldTable::default();
        let start = match resume {
            ResumePoint::Beginning => AMQPValue::LongLongInt(0),
            ResumePoint::AfterApplied { offset, .. } => AMQPValue::LongLongInt(*offset),
            ResumePoint::FirstAvailable => AMQPValue::LongString("first".into()),
        };
        arguments.insert("x-stream-offset".into(), start);
        let queue = self.config.names.partition_log(partition);
        let tag = ShortString::try_new(format!("{}.{queue}.{id}", self.consumer_name))
            .unwrap_or_else(|_| ShortString::from(""));
        let mut consumer = bounded(
            "reading a partition log",
            channel.basic_consume(
                queue.as_str().into(),
                tag,
                BasicConsumeOptions::default(),
                arguments,
            ),
        )
        .await?;
        let stopped = Arc::new(AtomicBool::new(false));
        let acknowledged_through = Arc::new(tokio::sync::Mutex::new(i64::MIN));
        let sink = self.sink.clone();
        let broken = self.broken_tx.clone();
        let intentional = stopped.clone();
        self.config.tasks.spawn(async move {
            loop {
                match consumer.next().await {
                    Some(Ok(delivery)) => {
                        let Some(offset) = stream_offset(&delivery) else {
                            tracing::error!(
                                partition,
                                "a partition log delivery has no x-stream-offset; is the \
                                 partition queue a stream?"
                            );
                            break;
                        };
                        let (message_id, reply_to) =
                            super::message_id_and_reply_to(&delivery.properties);
                        let delivery = LogDelivery {
                            partition,
                            offset,
                            message_id,
                            reply_to,
                            payload: delivery.data,
                            subscription: id,
                            acker: LogAcker::Amqp {
                                acker: delivery.acker,
                                acknowledged_through: acknowledged_through.clone(),
                            },
                        };
                        if sink.send(delivery).await.is_err() {
                            break;
                        }
                    }
                    Some(Err(error)) => {
                        if !intentional.load(Ordering::SeqCst) {
                            tracing::warn!(partition, %error, "partition log reader failed");
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
        Ok(Reader::Amqp { channel, stopped })
    }

    /// Stops reading `partition`. Deliveries of the stopped reader still in the sink are no
    /// longer [current](Self::is_current) and must be dropped unprocessed.
    pub async fn stop(&mut self, partition: u16) {
        let Some(subscription) = self.subscriptions.remove(&partition) else {
            return;
        };
        match (subscription.reader, &self.source) {
            (Reader::Amqp { channel, stopped }, _) => {
                stopped.store(true, Ordering::SeqCst);
                let _ = bounded(
                    "stopping a partition reader",
                    channel.close(200, "partition reader stopped".into()),
                )
                .await;
            }
            (Reader::InProcess, LogSource::InProcess(broker)) => {
                broker.stop_reading(partition, subscription.id);
            }
            (Reader::InProcess, LogSource::Amqp(_)) => {}
        }
    }

    /// Whether `delivery` came from the running reader of its partition.
    pub fn is_current(&self, delivery: &LogDelivery) -> bool {
        self.subscriptions
            .get(&delivery.partition)
            .is_some_and(|subscription| subscription.id == delivery.subscription)
    }

    /// Resolves when a reader stopped without being asked to (the connection or a channel
    /// broke), or when the connection is no longer connected even though no delivery stream
    /// ended (a node that went away without closing its sockets is detected by missed
    /// heartbeats: `heartbeat=` in `AMQP_URL`).
    pub async fn broken(&mut self) {
        let LogSource::Amqp(connection) = &self.source else {
            // In-process readers only end when they are stopped.
            return std::future::pending().await;
        };
        let mut check = tokio::time::interval(CONNECTION_CHECK);
        loop {
            tokio::select! {
                _ = self.broken_rx.recv() => return,
                _ = check.tick() => {
                    if !connection.status().connected() {
                        tracing::warn!("reader connection is no longer connected");
                        return;
                    }
                }
            }
        }
    }

    /// Stops every reader and closes the connection.
    pub async fn close(&mut self) {
        match &self.source {
            LogSource::InProcess(_) => {
                let partitions: Vec<u16> = self.subscriptions.keys().copied().collect();
                for partition in partitions {
                    self.stop(partition).await;
                }
            }
            LogSource::Amqp(connection) => {
                for subscription in self.subscriptions.values() {
                    if let Reader::Amqp { stopped, .. } = &subscription.reader {
                        stopped.store(true, Ordering::SeqCst);
                    }
                }
                self.subscriptions.clear();
                let _ = bounded("closing", connection.close(200, "worker closing".into())).await;
            }
        }
    }
}

/// The stream offset RabbitMQ puts in the headers of every stream delivery.
fn stream_offset(delivery: &lapin::message::Delivery) -> Option<i64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(offset) => Some(*offset),
        AMQPValue::LongInt(offset) => Some(i64::from(*offset)),
        AMQPValue::LongUInt(offset) => Some(i64::from(*offset)),
        AMQPValue::ShortInt(offset) => Some(i64::from(*offset)),
        _ => None,
    }
}
