//! Sessions: the stored session and its runs as the rest of the service sees them, the wire
//! form (`SessionItem` of the trigger.dev API), and when a session accepts appends.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Io;

/// A stored session. Storage reads and writes it; the api and the worker's planner work on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    /// Internal id (never shown to clients).
    pub id: Uuid,
    /// `session_…`.
    pub friendly_id: String,
    pub environment_id: Uuid,
    pub external_id: Option<String>,
    pub session_type: String,
    pub task_identifier: String,
    pub trigger_config: serde_json::Value,
    pub tags: Vec<String>,
    pub metadata: Option<serde_json::Value>,
    pub expires_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub closed_reason: Option<String>,
    /// Internal id of the live run.
    pub current_run_id: Option<Uuid>,
    /// The seqNum the next `in` record gets.
    pub next_seq_in: i64,
    /// The seqNum the next `out` record gets.
    pub next_seq_out: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Session {
    /// Whether the session accepts appends at `at` ([`session_state`]).
    pub fn state(&self, at: DateTime<Utc>) -> SessionState {
        session_state(self.closed_at, self.expires_at, at)
    }

    /// The seqNum the next record of reserved channel `io` gets.
    pub fn next_seq(&self, io: Io) -> i64 {
        match io {
            Io::In => self.next_seq_in,
            Io::Out => self.next_seq_out,
        }
    }

    /// The wire form, given the friendly id of the current run.
    pub fn to_item(&self, run_friendly_id: Option<String>) -> SessionItem {
        SessionItem {
            id: self.friendly_id.clone(),
            external_id: self.external_id.clone(),
            session_type: self.session_type.clone(),
            task_identifier: self.task_identifier.clone(),
            trigger_config: self.trigger_config.clone(),
            current_run_id: run_friendly_id,
            tags: self.tags.clone(),
            metadata: self.metadata.clone(),
            closed_at: self.closed_at,
            closed_reason: self.closed_reason.clone(),
            expires_at: self.expires_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A run of a session's task (created with the session, or by a `run` command).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub id: Uuid,
    /// `run_…`.
    pub friendly_id: String,
    pub environment_id: Uuid,
    pub session_id: Uuid,
    pub created_at: DateTime<Utc>,
}

/// Every key of the client's `SessionItem` schema, `null` for empty values (the client rejects
/// missing keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionItem {
    /// Friendly id, `session_…`.
    pub id: String,
    pub external_id: Option<String>,
    #[serde(rename = "type")]
    pub session_type: String,
    pub task_identifier: String,
    pub trigger_config: serde_json::Value,
    /// Friendly id of the live run.
    pub current_run_id: Option<String>,
    pub tags: Vec<String>,
    pub metadata: Option<serde_json::Value>,
    pub closed_at: Option<DateTime<Utc>>,
    pub closed_reason: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl SessionItem {
    /// The key that session-scoped tokens name: `externalId` if set, else the friendly id.
    pub fn addressing_key(&self) -> &str {
        self.external_id.as_deref().unwrap_or(&self.id)
    }
}

/// Whether a session accepts appends at `at` (closed or expired sessions do not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    Open,
    Closed,
    Expired,
}

/// The state of a session at `at`: closed wins over expired.
pub fn session_state(
    closed_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
) -> SessionState {
    if closed_at.is_some() {
        SessionState::Closed
    } else if expires_at.is_some_and(|expiry| expiry <= at) {
        SessionState::Expired
    } else {
        SessionState::Open
    }
}

/// Whether an append accepted at `accepted_at` may still be written. Like [`session_state`],
/// except that a close only refuses appends accepted at least `close_grace` after it: an api
/// instance may have answered an append 2xx on a cached session state that the close had just
/// made stale (the grace is the api's session cache TTL), and an answered append is never
/// dropped. With no grace, appends accepted before the close are still written.
pub fn append_state(
    closed_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    accepted_at: DateTime<Utc>,
    close_grace: chrono::TimeDelta,
) -> SessionState {
    if closed_at.is_some_and(|closed| accepted_at >= closed + close_grace) {
        SessionState::Closed
    } else if expires_at.is_some_and(|expiry| expiry <= accepted_at) {
        SessionState::Expired
    } else {
        SessionState::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[test]
    fn state_prefers_closed_then_expiry() {
        let now = Utc::now();
        let past = now - TimeDelta::seconds(1);
        let future = now + TimeDelta::seconds(60);
        assert_eq!(session_state(None, None, now), SessionState::Open);
        assert_eq!(session_state(None, Some(future), now), SessionState::Open);
        assert_eq!(session_state(None, Some(past), now), SessionState::Expired);
        assert_eq!(
            session_state(Some(past), Some(past), now),
            SessionState::Closed
        );
    }
}
