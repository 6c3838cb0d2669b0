//! The in-process broker of the embedded default (DESIGN §6): the same partitions, the same
//! prefetch-1 order and the same ack protocol as RabbitMQ, inside one process.
//!
//! A publish is "confirmed" only when the worker has acknowledged the message, that is after
//! the batch that applied it committed: in one process there is no broker to hold accepted
//! commands durably, so durability comes from waiting for the database commit. A message that
//! the worker does not acknowledge (abandoned after a failure, or its consumer went away) is
//! delivered again, first in its partition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::{BrokerError, Incoming, Notification, NotificationSink, ReplySink};

struct Queued {
    payload: Vec<u8>,
    message_id: Option<String>,
    reply_to: Option<String>,
    confirm: oneshot::Sender<Result<(), BrokerError>>,
}

/// Partitions, reply queues and notification fan-out of one process.
pub struct InProcessBroker {
    partitions: Vec<mpsc::UnboundedSender<Queued>>,
    consumer: watch::Sender<Option<mpsc::Sender<Incoming>>>,
    replies: Mutex<HashMap<String, ReplySink>>,
    notifications: Mutex<Vec<NotificationSink>>,
    dead_letters: Mutex<Vec<(String, Vec<u8>)>>,
}

impl std::fmt::Debug for InProcessBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessBroker")
            .field("partitions", &self.partitions.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl InProcessBroker {
    /// Starts one dispatcher task per partition.
    pub fn start(partition_count: u16) -> Arc<Self> {
        let (consumer, _) = watch::channel(None);
        let mut partitions = Vec::with_capacity(usize::from(partition_count));
        let mut receivers = Vec::with_capacity(usize::from(partition_count));
        for _ in 0..partition_count {
            let (sender, receiver) = mpsc::unbounded_channel();
            partitions.push(sender);
            receivers.push(receiver);
        }
        let broker = Arc::new(Self {
            partitions,
            consumer,
            replies: Mutex::new(HashMap::new()),
            notifications: Mutex::new(Vec::new()),
            dead_letters: Mutex::new(Vec::new()),
        });
        for (partition, receiver) in receivers.into_iter().enumerate() {
            let partition = u16::try_from(partition).unwrap_or(u16::MAX);
            tokio::spawn(dispatch(
                Arc::downgrade(&broker),
                partition,
                receiver,
                broker.consumer.subscribe(),
            ));
        }
        broker
    }

    pub(super) async fn publish_commands(
        &self,
        partition: u16,
        message_id: &str,
        reply_to: Option<&str>,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let sender = self
            .partitions
            .get(usize::from(partition))
            .ok_or(BrokerError::Unroutable)?;
        let (confirm, confirmed) = oneshot::channel();
        sender
            .send(Queued {
                payload: payload.to_vec(),
                message_id: Some(message_id.to_owned()),
                reply_to: reply_to.map(str::to_owned),
                confirm,
            })
            .map_err(|_| BrokerError::Unavailable("in-process broker stopped".into()))?;
        match tokio::time::timeout(timeout, confirmed).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BrokerError::Unavailable("in-process broker stopped".into())),
            Err(_) => Err(BrokerError::ConfirmTimeout),
        }
    }

    pub(super) fn register_reply_queue(&self, queue: &str, sink: ReplySink) {
        lock(&self.replies).insert(queue.to_owned(), sink);
    }

    pub(super) fn register_notifications(&self, sink: NotificationSink) {
        let _ = sink.send(Notification::Reconnected);
        lock(&self.notifications).push(sink);
    }

    pub(super) fn publish_reply(&self, reply_to: &str, payload: &[u8]) -> Result<(), BrokerError> {
        match lock(&self.replies).get(reply_to) {
            Some(sink) => sink
                .send(payload.to_vec())
                .map_err(|_| BrokerError::Unroutable),
            None => Err(BrokerError::Unroutable),
        }
    }

    pub(super) fn publish_notification(&self, payload: &[u8]) {
        lock(&self.notifications)
            .retain(|sink| sink.send(Notification::Message(payload.to_vec())).is_ok());
    }

    /// Events have no runner to go to in one process: they are logged.
    pub(super) fn publish_event(&self, routing_key: &str, payload: &[u8]) {
        tracing::info!(
            routing_key,
            payload = %String::from_utf8_lossy(payload),
            "event (embedded mode: no events exchange; runners use the production path)"
        );
    }

    pub(super) fn publish_dead_letter(&self, payload: &[u8], reason: &str) {
        lock(&self.dead_letters).push((reason.to_owned(), payload.to_vec()));
    }

    pub(super) fn dead_letter_count(&self) -> u32 {
        u32::try_from(lock(&self.dead_letters).len()).unwrap_or(u32::MAX)
    }

    /// Makes `sink` the consumer of every partition (replacing any previous one).
    pub(super) fn attach_consumer(&self, sink: mpsc::Sender<Incoming>) {
        self.consumer.send_replace(Some(sink));
    }

    pub(super) fn detach_consumer(&self) {
        self.consumer.send_replace(None);
    }
}

/// One partition: deliver the head message, wait for its ack, confirm its publisher, repeat.
async fn dispatch(
    broker: std::sync::Weak<InProcessBroker>,
    partition: u16,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    mut consumer: watch::Receiver<Option<mpsc::Sender<Incoming>>>,
) {
    while let Some(message) = queue.recv().await {
        let mut redelivered = false;
        loop {
            if broker.upgrade().is_none() {
                return;
            }
            let sink = loop {
                if let Some(sink) = consumer.borrow_and_update().clone() {
                    break sink;
                }
                if consumer.changed().await.is_err() {
                    return;
                }
            };
            let (ack, acked) = oneshot::channel();
            let incoming = Incoming {
                partition,
                payload: message.payload.clone(),
                message_id: message.message_id.clone(),
                reply_to: message.reply_to.clone(),
                redelivered,
                subscription: 0,
                delivery: super::partition_consumers::Acker::InProcess(Mutex::new(Some(ack))),
            };
            if sink.send(incoming).await.is_ok() && acked.await.is_ok() {
                let _ = message.confirm.send(Ok(()));
                break;
            }
            // Not acknowledged: deliver it again, still first in its partition.
            redelivered = true;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
