//! The in-process broker of the embedded default: the same partitions as ordered logs, the same
//! offsets and the same resume rule as RabbitMQ streams, inside one process.
//!
//! A publish is "confirmed" only when the worker has acknowledged the message, that is after
//! the batch that applied it committed: in one process there is no broker to hold accepted
//! commands durably, so durability comes from waiting for the database commit. The log keeps
//! messages until they are committed, plus the last committed one (a reader resuming after it
//! must find it first, as on a stream). At start each partition log begins right after the
//! position stored in the database ([`InProcessBroker::start`]), so a restart resumes cleanly.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use super::log::{LogAcker, LogDelivery};
use super::{BrokerError, Notification, NotificationSink, ReplySink};
use crate::domain::log::ResumePoint;

struct Entry {
    offset: i64,
    payload: Arc<Vec<u8>>,
    message_id: Option<String>,
    reply_to: Option<String>,
}

/// One partition's log.
struct PartitionLog {
    /// Held messages, in offset order (offsets are contiguous here).
    entries: VecDeque<Entry>,
    next_offset: i64,
    /// Publishers waiting for the commit of their message, by offset.
    confirms: VecDeque<(i64, oneshot::Sender<()>)>,
    /// The running reader: its subscription id and the next offset it sends.
    reader: Option<(u64, i64)>,
    /// Wakes the running reader's task (a new message, or the reader changed).
    wake: Arc<Notify>,
}

/// Partitions, reply queues and notification fan-out of one process.
pub struct InProcessBroker {
    partitions: Vec<Mutex<PartitionLog>>,
    myself: Weak<InProcessBroker>,
    replies: Mutex<HashMap<String, ReplySink>>,
    notifications: Mutex<Vec<NotificationSink>>,
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
    /// One log per partition, each starting after its stored position (`positions[p]`, the
    /// last applied offset and message id; missing: an empty log from offset 0).
    pub fn start(partition_count: u16, positions: &HashMap<u16, ResumePoint>) -> Arc<Self> {
        Arc::new_cyclic(|myself| Self {
            partitions: (0..partition_count)
                .map(|partition| {
                    let mut log = PartitionLog {
                        entries: VecDeque::new(),
                        next_offset: 0,
                        confirms: VecDeque::new(),
                        reader: None,
                        wake: Arc::new(Notify::new()),
                    };
                    if let Some(ResumePoint::AfterApplied { offset, message_id }) =
                        positions.get(&partition)
                    {
                        // The last applied message, as a reader resuming after it expects.
                        log.entries.push_back(Entry {
                            offset: *offset,
                            payload: Arc::new(Vec::new()),
                            message_id: message_id.clone(),
                            reply_to: None,
                        });
                        log.next_offset = offset + 1;
                    }
                    Mutex::new(log)
                })
                .collect(),
            myself: myself.clone(),
            replies: Mutex::new(HashMap::new()),
            notifications: Mutex::new(Vec::new()),
        })
    }

    fn partition(&self, partition: u16) -> Result<&Mutex<PartitionLog>, BrokerError> {
        self.partitions
            .get(usize::from(partition))
            .ok_or(BrokerError::Unroutable)
    }

    pub(super) async fn publish_commands(
        &self,
        partition: u16,
        message_id: &str,
        reply_to: Option<&str>,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let (confirm, confirmed) = oneshot::channel();
        {
            let mut log = lock(self.partition(partition)?);
            let offset = log.next_offset;
            log.next_offset += 1;
            log.entries.push_back(Entry {
                offset,
                payload: Arc::new(payload.to_vec()),
                message_id: Some(message_id.to_owned()),
                reply_to: reply_to.map(str::to_owned),
            });
            log.confirms.push_back((offset, confirm));
            log.wake.notify_one();
        }
        match tokio::time::timeout(timeout, confirmed).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(BrokerError::Unavailable("in-process broker stopped".into())),
            // Still in the log: it will be applied, but the caller cannot know (as with a
            // confirm that times out on RabbitMQ).
            Err(_) => Err(BrokerError::ConfirmTimeout),
        }
    }

    /// Everything of `partition` up to `offset` is committed: confirm its publishers and forget
    /// the messages before it (the last committed one stays, for a reader resuming after it).
    pub(super) fn committed(&self, partition: u16, offset: i64) {
        let Ok(log) = self.partition(partition) else {
            return;
        };
        let mut log = lock(log);
        while log
            .entries
            .front()
            .is_some_and(|entry| entry.offset < offset)
        {
            log.entries.pop_front();
        }
        while log
            .confirms
            .front()
            .is_some_and(|(waiting, _)| *waiting <= offset)
        {
            if let Some((_, confirm)) = log.confirms.pop_front() {
                let _ = confirm.send(());
            }
        }
    }

    /// Starts a reader of `partition` at `resume` (replacing any other), delivering to `sink`.
    pub(super) fn read(
        &self,
        partition: u16,
        resume: &ResumePoint,
        subscription: u64,
        sink: mpsc::Sender<LogDelivery>,
        tasks: &crate::shutdown::TaskTracker,
    ) {
        let Ok(log_lock) = self.partition(partition) else {
            return;
        };
        let wake = {
            let mut log = lock(log_lock);
            let first_held = log
                .entries
                .front()
                .map_or(log.next_offset, |entry| entry.offset);
            let start = match resume {
                ResumePoint::AfterApplied { offset, .. } => (*offset).max(first_held),
                ResumePoint::Beginning | ResumePoint::FirstAvailable => first_held,
            };
            log.reader = Some((subscription, start));
            // A notifier per reader: the previous reader's task wakes up, sees that it is no
            // longer current and ends, without taking a wake-up meant for the new one.
            let previous = std::mem::replace(&mut log.wake, Arc::new(Notify::new()));
            previous.notify_one();
            log.wake.clone()
        };
        let broker = self.myself.clone();
        tasks.spawn(async move {
            loop {
                let next = {
                    let Some(broker) = broker.upgrade() else {
                        return;
                    };
                    let Ok(log_lock) = broker.partition(partition) else {
                        return;
                    };
                    let mut log = lock(log_lock);
                    let Some((current, position)) = log.reader else {
                        return;
                    };
                    if current != subscription {
                        return;
                    }
                    match log.entries.iter().find(|entry| entry.offset >= position) {
                        Some(entry) => {
                            let delivery = LogDelivery {
                                partition,
                                offset: entry.offset,
                                payload: entry.payload.as_ref().clone(),
                                message_id: entry.message_id.clone(),
                                reply_to: entry.reply_to.clone(),
                                subscription,
                                acker: LogAcker::InProcess(Arc::downgrade(&broker)),
                            };
                            log.reader = Some((subscription, entry.offset + 1));
                            Some(delivery)
                        }
                        None => None,
                    }
                };
                match next {
                    Some(delivery) => {
                        if sink.send(delivery).await.is_err() {
                            return;
                        }
                    }
                    None => wake.notified().await,
                }
            }
        });
    }

    /// Stops the reader `subscription` of `partition` (if it is still the running one).
    pub(super) fn stop_reading(&self, partition: u16, subscription: u64) {
        if let Ok(log) = self.partition(partition) {
            let mut log = lock(log);
            if log
                .reader
                .is_some_and(|(current, _)| current == subscription)
            {
                log.reader = None;
                log.wake.notify_one();
            }
        }
    }

    pub(super) fn register_reply_queue(&self, queue: &str, sink: ReplySink) {
        lock(&self.replies).insert(queue.to_owned(), sink);
    }

    pub(super) fn register_notifications(&self, sink: NotificationSink) {
        let _ = sink.send(Notification::Reconnected);
        lock(&self.notifications).push(sink);
    }

    /// Takes back what a closing link registered: its reply queue and its notification sink.
    pub(super) fn disconnect(
        &self,
        reply_queue: Option<&str>,
        notifications: Option<&NotificationSink>,
    ) {
        if let Some(queue) = reply_queue {
            lock(&self.replies).remove(queue);
        }
        if let Some(ours) = notifications {
            lock(&self.notifications).retain(|sink| !sink.same_channel(ours));
        }
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
}
