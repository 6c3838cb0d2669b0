//! A stored record of a session stream, as the readers (records route, SSE, live feeds) and the
//! worker's planner see it.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Stream;
use super::headers::RecordHeaders;

/// One record: its stream, its place in it, and what was appended.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRecord {
    pub session_id: Uuid,
    pub stream: Stream,
    pub seq_num: i64,
    pub environment_id: Uuid,
    pub part_id: Option<String>,
    pub body: String,
    pub body_fingerprint: String,
    /// The command that wrote it.
    pub command_id: Uuid,
    pub created_at: DateTime<Utc>,
    /// In order; empty when the record has none.
    pub headers: RecordHeaders,
    /// `body` is a record envelope `{"data", "id"}` (written by the SDK's writer), not raw text
    /// from the append route.
    pub body_is_envelope: bool,
}
