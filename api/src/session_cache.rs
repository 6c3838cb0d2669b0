//! The api instance's cache of sessions for the append route: the append path does no database
//! read while a session is cached.
//!
//! What lives here: session rows by `(environment, address)`, each kept for at most
//! `SESSIONS_SESSION_CACHE_TTL_MS`, dropped as soon as a worker's notice says the session changed
//! (close, PATCH, end-and-continue, create of an existing session), and all of them dropped when
//! the notification consumer reconnects (notices may have been missed). Sessions that do not
//! exist are never cached (a create may follow at once).
//!
//! What a stale entry can do: an append accepted while this instance still believed the session
//! open. Such an append was answered 2xx, so it must not be dropped: the worker applies appends
//! accepted up to the cache TTL after the close (`domain::session::append_allowed`), and the
//! README says so. A close answered by this instance drops the entry at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::domain::SessionAddress;
use shared::storage::Session;
use uuid::Uuid;

/// More entries than this and the cache starts over (a bound on memory; 1,000 sessions per
/// environment are a few hundred KiB).
const MAX_ENTRIES: usize = 100_000;

type Key = (Uuid, SessionAddress);

/// Sessions by `(environment, address)`.
#[derive(Debug)]
pub struct SessionCache {
    ttl: Duration,
    entries: Mutex<HashMap<Key, (Arc<Session>, Instant)>>,
}

impl SessionCache {
    /// A cache whose entries live at most `ttl` (zero: nothing is cached).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (Arc<Session>, Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached session at `address` in `environment`, if fresh.
    pub fn get(&self, environment: Uuid, address: &SessionAddress) -> Option<Arc<Session>> {
        if self.ttl.is_zero() {
            return None;
        }
        let key = (environment, address.clone());
        let mut entries = self.entries();
        match entries.get(&key) {
            Some((row, at)) if at.elapsed() < self.ttl => Some(row.clone()),
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Remembers `row`, read from the database just now, under `address`.
    pub fn put(&self, environment: Uuid, address: &SessionAddress, row: Arc<Session>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert((environment, address.clone()), (row, Instant::now()));
    }

    /// Drops every entry of session `session_id` (under any of its addresses).
    pub fn invalidate(&self, session_ids: &[Uuid]) {
        if session_ids.is_empty() {
            return;
        }
        self.entries()
            .retain(|_, (row, _)| !session_ids.contains(&row.id));
    }

    /// Drops everything (notices may have been missed).
    pub fn clear(&self) {
        self.entries().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: Uuid, environment: Uuid) -> Arc<Session> {
        let now = chrono::Utc::now();
        Arc::new(Session {
            id,
            environment_id: environment,
            friendly_id: "session_x".into(),
            external_id: Some("x".into()),
            session_type: "chat.agent".into(),
            task_identifier: "t".into(),
            trigger_config: serde_json::json!({}),
            current_run_id: None,
            tags: Vec::new(),
            metadata: None,
            closed_at: None,
            closed_reason: None,
            expires_at: None,
            next_seq_in: 0,
            next_seq_out: 0,
            created_at: now,
            updated_at: now,
        })
    }

    #[test]
    fn entries_expire_are_invalidated_by_session_and_never_cached_with_a_zero_ttl() {
        let environment = Uuid::now_v7();
        let id = Uuid::now_v7();
        let by_external = SessionAddress::ExternalId("x".into());
        let by_friendly = SessionAddress::FriendlyId("session_x".into());
        let cache = SessionCache::new(Duration::from_secs(60));
        cache.put(environment, &by_external, row(id, environment));
        cache.put(environment, &by_friendly, row(id, environment));
        assert!(cache.get(environment, &by_external).is_some());
        assert!(
            cache.get(Uuid::now_v7(), &by_external).is_none(),
            "per environment"
        );
        cache.invalidate(&[Uuid::now_v7()]);
        assert!(cache.get(environment, &by_friendly).is_some());
        cache.invalidate(&[id]);
        assert!(cache.get(environment, &by_external).is_none());
        assert!(cache.get(environment, &by_friendly).is_none());

        let short = SessionCache::new(Duration::from_millis(1));
        short.put(environment, &by_external, row(id, environment));
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.get(environment, &by_external).is_none(), "expired");

        let off = SessionCache::new(Duration::ZERO);
        off.put(environment, &by_external, row(id, environment));
        assert!(off.get(environment, &by_external).is_none());
    }
}
