//! Live delivery of new records to SSE readers of this api instance.
//!
//! Workers publish a [`NewRecords`] notice on the broker's fanout after each commit; every api
//! instance hears it. For each channel with readers here, one *feed* task reads the new records
//! from the database once and broadcasts them to all of that channel's readers (one read serves
//! every reader at the same position). A feed also re-reads every few seconds on its own, so a
//! lost notice only delays delivery. Readers keep their own position and fill any gap (or a
//! broadcast they lagged behind on) from the database, so they never skip or repeat a record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::Event;
use serde_json::json;
use shared::broker::Notification;
use shared::commands::NewRecords;
use shared::domain::Stream;
use shared::shutdown::{CancellationToken, TaskTracker};
use shared::storage::{Store, StoredRecord};
use tokio::sync::{Notify, broadcast, mpsc};
use uuid::Uuid;

/// How often a feed re-reads the database without a notice.
const SAFETY_REREAD: Duration = Duration::from_secs(2);
/// Batches a slow reader may fall behind before it catches up from the database.
const FEED_CAPACITY: usize = 64;
/// Records per database read.
pub const READ_PAGE: u64 = 500;

/// A stream (reserved channel or side-channel direction) of one session in one environment.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    pub environment_id: Uuid,
    pub session_id: Uuid,
    pub stream: Stream,
}

struct Feed {
    wake: Notify,
    sender: broadcast::Sender<Arc<FeedBatch>>,
}

/// New records of one channel, read once and encoded once for every reader of the feed.
#[derive(Debug)]
pub struct FeedBatch {
    /// In seqNum order, without gaps.
    pub rows: Vec<StoredRecord>,
    /// The SSE `batch` event of all of `rows` (what a reader at the first row sends as is).
    pub event: Event,
}

/// A record's body as readers see it: the JSON string `{"data": …, "id": …}`. A body stored as
/// such an envelope (the SDK writer's records) is that string; raw text from the append route is
/// wrapped as `{"data": <text>, "id": <partId or "">}`, so a raw body that looks like an envelope
/// is still shown as the text it is.
pub fn envelope_of(row: &StoredRecord) -> String {
    if row.body_is_envelope {
        return row.body.clone();
    }
    json!({ "data": row.body, "id": row.part_id.as_deref().unwrap_or("") }).to_string()
}

/// A record as the records route lists it: `data` and `id` out of its envelope (the writer's
/// chunk is a JSON value; the append route's text stays a string).
pub fn listed_data_and_id(row: &StoredRecord) -> (serde_json::Value, String) {
    if row.body_is_envelope
        && let Ok(serde_json::Value::Object(mut envelope)) = serde_json::from_str(&row.body)
    {
        let data = envelope.remove("data").unwrap_or(serde_json::Value::Null);
        let id = match envelope.remove("id") {
            Some(serde_json::Value::String(id)) => id,
            _ => String::new(),
        };
        return (data, id);
    }
    (json!(row.body), row.part_id.clone().unwrap_or_default())
}

/// The SSE `batch` event of `rows` (the wire shape of the official client's stream reader):
/// `{seq_num, timestamp, headers?, body?}`. `headers` only when the record has some; `body` is
/// [`envelope_of`] the record, left out for a record with headers and no body (a control or
/// command record), as the reference stream store does.
pub fn batch_event(rows: &[StoredRecord]) -> Event {
    let records: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            let mut record = json!({
                "seq_num": row.seq_num,
                "timestamp": row.created_at.timestamp_millis(),
            });
            let headers = &row.headers;
            if headers.is_empty() || !row.body.is_empty() {
                record["body"] = json!(envelope_of(row));
            }
            if !headers.is_empty() {
                record["headers"] = json!(headers);
            }
            record
        })
        .collect();
    let last = rows.last().map_or(-1, |row| row.seq_num);
    Event::default()
        .event("batch")
        .id(last.to_string())
        .data(json!({ "records": records }).to_string())
}

/// The feeds of this instance.
pub struct Hub {
    store: Store,
    /// Told which sessions changed, and to forget everything after a reconnect.
    sessions: Arc<crate::session_cache::SessionCache>,
    feeds: Mutex<HashMap<ChannelKey, Arc<Feed>>>,
    /// Cancelled when the api shuts down (`AppState::stopping`): live readers end their streams
    /// (clients resume with `Last-Event-ID` on another instance), so the drain is not held by
    /// long polls, and feeds stop retrying.
    stopping: CancellationToken,
    /// Where the feeds' tasks are spawned (`AppState::tasks`).
    tasks: TaskTracker,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    /// Starts the hub; `notifications` come from the broker link.
    pub fn start(
        store: Store,
        notifications: mpsc::UnboundedReceiver<Notification>,
        sessions: Arc<crate::session_cache::SessionCache>,
        tasks: &TaskTracker,
        stopping: CancellationToken,
    ) -> Arc<Self> {
        let hub = Arc::new(Self {
            store,
            sessions,
            feeds: Mutex::new(HashMap::new()),
            stopping,
            tasks: tasks.clone(),
        });
        tasks.spawn(listen(Arc::downgrade(&hub), notifications));
        hub
    }

    /// Resolves once the api started to stop.
    pub async fn readers_stopped(&self) {
        self.stopping.cancelled().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelKey, Arc<Feed>>> {
        self.feeds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscribes to a channel's new records, starting its feed if needed.
    pub fn subscribe(self: &Arc<Self>, key: ChannelKey) -> broadcast::Receiver<Arc<FeedBatch>> {
        let mut feeds = self.lock();
        if let Some(feed) = feeds.get(&key) {
            return feed.sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(FEED_CAPACITY);
        let feed = Arc::new(Feed {
            wake: Notify::new(),
            sender,
        });
        feeds.insert(key.clone(), feed.clone());
        crate::signals::live_feeds(feeds.len());
        self.tasks.spawn(run_feed(self.clone(), key, feed));
        receiver
    }

    fn wake(&self, key: &ChannelKey) {
        if let Some(feed) = self.lock().get(key) {
            feed.wake.notify_one();
        }
    }

    fn wake_all(&self) {
        for feed in self.lock().values() {
            feed.wake.notify_one();
        }
    }

    /// Removes the feed if nobody listens any more. Returns whether it was removed.
    fn retire_if_unused(&self, key: &ChannelKey, feed: &Arc<Feed>) -> bool {
        let mut feeds = self.lock();
        if feed.sender.receiver_count() == 0 {
            feeds.remove(key);
            crate::signals::live_feeds(feeds.len());
            true
        } else {
            false
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

async fn listen(
    hub: std::sync::Weak<Hub>,
    mut notifications: mpsc::UnboundedReceiver<Notification>,
) {
    while let Some(notification) = notifications.recv().await {
        let Some(hub) = hub.upgrade() else { return };
        match notification {
            Notification::Reconnected => {
                hub.sessions.clear();
                hub.wake_all();
            }
            Notification::Message(payload) => {
                let Ok(notice) = serde_json::from_slice::<NewRecords>(&payload) else {
                    tracing::warn!("ignoring an unreadable notification");
                    continue;
                };
                hub.sessions.invalidate(&notice.sessions_changed);
                for head in notice.channels {
                    hub.wake(&ChannelKey {
                        environment_id: head.environment_id,
                        session_id: head.session_id,
                        stream: head.stream(),
                    });
                }
            }
        }
    }
}

async fn run_feed(hub: Arc<Hub>, key: ChannelKey, feed: Arc<Feed>) {
    // Broadcast only what is new from now on; readers catch up on history themselves.
    let mut last_sent = loop {
        match hub
            .store
            .channel_head(key.environment_id, key.session_id, &key.stream)
            .await
        {
            Ok(next) => break next - 1,
            Err(error) => {
                // A stopping api has no reader left to serve.
                if hub.stopping.is_cancelled() {
                    return;
                }
                tracing::warn!(%error, "feed cannot read the channel head yet");
                tokio::time::sleep(SAFETY_REREAD).await;
            }
        }
    };
    loop {
        tokio::select! {
            _ = feed.wake.notified() => {}
            _ = tokio::time::sleep(SAFETY_REREAD) => {}
        }
        if hub.retire_if_unused(&key, &feed) {
            return;
        }
        loop {
            let rows = match hub
                .store
                .list_records(
                    key.environment_id,
                    key.session_id,
                    &key.stream,
                    Some(last_sent),
                    READ_PAGE,
                )
                .await
            {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(%error, "feed read failed; retrying on the next wake");
                    break;
                }
            };
            let Some(last) = rows.last() else { break };
            last_sent = last.seq_num;
            let full_page = rows.len() as u64 == READ_PAGE;
            // No receivers is fine: the retire check above runs on the next wake.
            let event = batch_event(&rows);
            let _ = feed.sender.send(Arc::new(FeedBatch { rows, event }));
            if !full_page {
                break;
            }
        }
    }
}
