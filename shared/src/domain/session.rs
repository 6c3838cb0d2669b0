//! The session as the wire shows it (`SessionItem` of the trigger.dev API).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
