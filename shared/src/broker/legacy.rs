//! The partition queues of versions before partition logs (quorum queues `<prefix>.pNNN`), read
//! once after an upgrade so that commands they still hold are applied before the logs.
//!
//! What lives here: finding such queues, taking their messages one at a time in queue order (a
//! consumer with prefetch 1: RabbitMQ refuses `basic.get` on quorum queues with single active
//! consumer), acknowledging them, and deleting a queue once it is empty. What does not: what to
//! do with a message (the worker applies it like any other).

use std::collections::HashMap;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use super::{BrokerConfig, BrokerError, bounded, connect, soft_error};

/// One message of a legacy partition queue, not yet acknowledged.
pub struct LegacyMessage {
    pub partition: u16,
    pub payload: Vec<u8>,
    pub message_id: Option<String>,
    pub reply_to: Option<String>,
    acker: lapin::Acker,
}

impl std::fmt::Debug for LegacyMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyMessage")
            .field("partition", &self.partition)
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

impl LegacyMessage {
    /// Removes the message from its queue (after its commands were applied and committed).
    pub async fn ack(&self) -> Result<(), BrokerError> {
        bounded("acknowledging", self.acker.ack(BasicAckOptions::default())).await?;
        Ok(())
    }
}

/// How long a legacy queue must stay silent before it counts as drained (deleting it is then
/// refused by the broker if a message arrived after all).
const QUIET: Duration = Duration::from_secs(2);

/// A connection for draining legacy partition queues.
pub struct LegacyPartitionQueues {
    config: BrokerConfig,
    connection: Connection,
    consumers: HashMap<u16, (Channel, Consumer)>,
}

impl std::fmt::Debug for LegacyPartitionQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyPartitionQueues")
            .finish_non_exhaustive()
    }
}

impl LegacyPartitionQueues {
    /// Connects to RabbitMQ (the only broker whose queues outlast a restart: the caller
    /// drains only where [`BrokerConfig::lasting_partition_logs`] says there are any).
    pub async fn connect(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let connection = connect(config, false).await?;
        Ok(Self {
            config: config.clone(),
            connection,
            consumers: HashMap::new(),
        })
    }

    /// The partitions whose legacy queue still exists, among `0..=partitions`: one past the
    /// configured count, so that a caller can tell that the previous version ran with more
    /// partitions. A passive declare of a missing queue closes its channel, so each check uses
    /// a channel of its own.
    pub async fn present(&self) -> Result<Vec<u16>, BrokerError> {
        let mut present = Vec::new();
        for partition in 0..=self.config.names.partitions {
            let channel = bounded("opening a channel", self.connection.create_channel()).await?;
            let queue = self.config.names.legacy_partition_queue(partition);
            let declared = tokio::time::timeout(
                super::OPERATION_TIMEOUT,
                channel.queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await
            .map_err(|_| {
                BrokerError::Unavailable("checking a legacy partition queue timed out".into())
            })?;
            match declared {
                Ok(_) => {
                    present.push(partition);
                    let _ =
                        bounded("closing a channel", channel.close(200, "checked".into())).await;
                }
                Err(error) if soft_error(&error) == Some(AMQPSoftError::NOTFOUND) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(present)
    }

    /// The next message of `partition`'s legacy queue, or `None` once it stayed silent for
    /// [`QUIET`].
    pub async fn next(&mut self, partition: u16) -> Result<Option<LegacyMessage>, BrokerError> {
        if !self.consumers.contains_key(&partition) {
            let channel = bounded("opening a channel", self.connection.create_channel()).await?;
            // One unacknowledged message at a time: queue order.
            bounded(
                "setting prefetch",
                channel.basic_qos(1, BasicQosOptions::default()),
            )
            .await?;
            let queue = self.config.names.legacy_partition_queue(partition);
            let consumer = bounded(
                "draining a legacy partition queue",
                channel.basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
            self.consumers.insert(partition, (channel, consumer));
        }
        let Some((_, consumer)) = self.consumers.get_mut(&partition) else {
            return Ok(None);
        };
        let delivery = match tokio::time::timeout(QUIET, consumer.next()).await {
            Err(_) | Ok(None) => return Ok(None),
            Ok(Some(delivery)) => delivery?,
        };
        let (message_id, reply_to) = super::message_id_and_reply_to(&delivery.properties);
        Ok(Some(LegacyMessage {
            partition,
            message_id,
            reply_to,
            payload: delivery.data,
            acker: delivery.acker,
        }))
    }

    /// Deletes `partition`'s legacy queue if it holds no message. Quorum queues refuse the
    /// `if-empty` flag, so this looks at the count first: a message published by an old api
    /// instance between the look and the delete would be lost, which is why old api instances
    /// must be stopped before the drain (README, "Upgrading from partition queues"). Returns
    /// whether the queue was deleted.
    pub async fn delete_if_empty(&mut self, partition: u16) -> Result<bool, BrokerError> {
        if let Some((consumer_channel, _)) = self.consumers.remove(&partition) {
            let _ = bounded(
                "closing a channel",
                consumer_channel.close(200, "drained".into()),
            )
            .await;
        }
        let channel = bounded("opening a channel", self.connection.create_channel()).await?;
        let queue = self.config.names.legacy_partition_queue(partition);
        let declared = bounded(
            "counting a legacy partition queue",
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
        if declared.message_count() > 0 {
            let _ = bounded("closing a channel", channel.close(200, "not empty".into())).await;
            return Ok(false);
        }
        bounded(
            "deleting a legacy partition queue",
            channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
        )
        .await?;
        let _ = bounded("closing a channel", channel.close(200, "deleted".into())).await;
        Ok(true)
    }

    pub async fn close(self) {
        let _ = bounded("closing", self.connection.close(200, "drained".into())).await;
    }
}
