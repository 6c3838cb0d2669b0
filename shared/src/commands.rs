//! The command envelope: what the api publishes and the worker applies.
//!
//! One broker message carries an [`Envelope`]: a batch of commands of one partition, in
//! acceptance order (group commit). The envelope carries a version so that old and new processes
//! can run side by side during a deploy: new fields are optional, and the worker decodes every
//! version still in flight. Version 1 is the first published version; version 2 marks an
//! envelope that carries an append to a named channel, or with record headers, or with a body
//! that is already a record envelope (a worker that knows only version 1 would write the first
//! to the reserved channel and lose what marks the others, so it refuses the envelope instead,
//! and it is dead-lettered for replay after the upgrade). Envelopes without such appends stay version 1.
//! Version 3 marks an envelope that carries a writer batch ([`AppendRecordsCommand`], the S2
//! writer's records), which a version-2 worker cannot read.
//!
//! Replies ([`Reply`]) travel back to the api instance that asked (its reply queue), correlated by
//! command id.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::headers::RecordHeaders;
use crate::domain::session::SessionItem;
use crate::domain::{ChannelName, Io, Stream};

/// The newest envelope version this build reads and writes.
pub const ENVELOPE_VERSION: u16 = 3;
/// The version of envelopes with named channels, headers or enveloped bodies but no writer batch.
const SECOND_ENVELOPE_VERSION: u16 = 2;
/// The version of envelopes with no append to a named channel.
const FIRST_ENVELOPE_VERSION: u16 = 1;

/// One broker message: commands of one partition, in acceptance order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    pub commands: Vec<Command>,
}

/// Why an envelope could not be decoded. Such messages are dead-lettered with this reason.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not valid JSON of a known shape: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("envelope version {0} is newer than this worker understands ({ENVELOPE_VERSION})")]
    UnsupportedVersion(u16),
    #[error("envelope carries no commands")]
    Empty,
}

impl Envelope {
    /// The oldest version that can carry `commands` (see the module documentation).
    pub fn new(commands: Vec<Command>) -> Self {
        let needs_version_3 = commands
            .iter()
            .any(|command| matches!(&command.body, CommandBody::AppendRecords(_)));
        let needs_version_2 = commands.iter().any(|command| {
            matches!(
                &command.body,
                CommandBody::Append(append)
                    if append.channel.is_some()
                        || !append.headers.is_empty()
                        || append.body_is_envelope
            )
        });
        let version = if needs_version_3 {
            ENVELOPE_VERSION
        } else if needs_version_2 {
            SECOND_ENVELOPE_VERSION
        } else {
            FIRST_ENVELOPE_VERSION
        };
        Self { version, commands }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope: Envelope = serde_json::from_slice(bytes)?;
        if envelope.version > ENVELOPE_VERSION || envelope.version == 0 {
            return Err(EnvelopeError::UnsupportedVersion(envelope.version));
        }
        if envelope.commands.is_empty() {
            return Err(EnvelopeError::Empty);
        }
        Ok(envelope)
    }
}

/// One write to one session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Unique per command; the worker's redelivery fence.
    pub id: Uuid,
    pub environment_id: Uuid,
    /// Internal id of the target session (also decides the partition).
    pub session_id: Uuid,
    /// When the api accepted the command; expiry is judged by this time.
    pub accepted_at: DateTime<Utc>,
    /// Whether the api waits for a [`Reply`].
    #[serde(default)]
    pub wants_reply: bool,
    pub body: CommandBody,
}

impl Command {
    /// A new command (fresh id) accepted at `accepted_at`. The publisher sets `wants_reply`
    /// when the caller waits for the outcome.
    pub fn new(
        environment_id: Uuid,
        session_id: Uuid,
        accepted_at: DateTime<Utc>,
        body: CommandBody,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            environment_id,
            session_id,
            accepted_at,
            wants_reply: false,
            body,
        }
    }

    /// The id the command's outcome is stored and looked up under, so that applying it again
    /// replays that outcome: the command's own id, or, for a writer batch the official client
    /// sent again, the batch's [`AppendRecordsCommand::resend_key`] (shared by every copy).
    pub fn outcome_key(&self) -> Uuid {
        match &self.body {
            CommandBody::AppendRecords(AppendRecordsCommand {
                resend_key: Some(key),
                ..
            }) => *key,
            _ => self.id,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandBody {
    Append(AppendCommand),
    AppendRecords(AppendRecordsCommand),
    CreateSession(Box<CreateSessionCommand>),
    CloseSession(CloseSessionCommand),
    RegisterWaitpoint(Box<RegisterWaitpointCommand>),
    PatchSession(PatchSessionCommand),
    EndAndContinue(EndAndContinueCommand),
}

impl CommandBody {
    /// A low-cardinality name for logs and metrics.
    pub fn kind_name(&self) -> &'static str {
        match self {
            CommandBody::Append(_) => "append",
            CommandBody::AppendRecords(_) => "append_records",
            CommandBody::CreateSession(_) => "create_session",
            CommandBody::CloseSession(_) => "close_session",
            CommandBody::RegisterWaitpoint(_) => "register_waitpoint",
            CommandBody::PatchSession(_) => "patch_session",
            CommandBody::EndAndContinue(_) => "end_and_continue",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppendCommand {
    pub io: Io,
    /// A named side channel (`None`: the reserved channel `io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelName>,
    pub part_id: Option<String>,
    /// The raw appended text.
    pub body: String,
    /// The record's headers (none for appends through the append route).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: RecordHeaders,
    /// `body` is already a record envelope `{"data": <chunk>, "id": <id>}`, as the SDK's `out`
    /// writer sends its records; readers unwrap it. The append route's bodies are raw text
    /// (`false`): readers show them as the string they are, whatever they look like.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub body_is_envelope: bool,
}

impl AppendCommand {
    /// The stream the record goes to.
    pub fn stream(&self) -> Stream {
        Stream {
            channel: self.channel.clone(),
            io: self.io,
        }
    }
}

/// A batch of records from the S2-protocol writer (one append-session frame or one REST
/// append) to one stream: written together, with contiguous seqNums, or not at all.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppendRecordsCommand {
    pub io: Io,
    /// A named side channel (`None`: the reserved channel `io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelName>,
    pub records: Vec<WrittenRecord>,
    /// Set when the batch can be told apart from every other batch by what it carries (see
    /// [`AppendRecordsCommand::new`]): every copy of it has the same key, and the worker
    /// applies the batch once under that key. Absent in envelopes from builds before it; a
    /// worker from before it ignores it (and applies every copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resend_key: Option<Uuid>,
}

impl AppendRecordsCommand {
    /// A writer batch for `stream` of a session, with its resend key.
    ///
    /// After a lost or late ack the official writer opens a new append session and sends the
    /// batches it had in flight again, unchanged; S2 itself would store them twice. Every data
    /// record it writes carries a unique `id` in its JSON body (its readers drop repeats by
    /// it), so a batch holding such a record is a resend exactly when everything it carries is
    /// the same: the key is a hash of the environment, session, stream and records. A batch of
    /// control or trim records only (no `id`) gets no key: two identical ones may both be
    /// meant, so each is applied, as on S2.
    pub fn new(
        environment_id: Uuid,
        session_id: Uuid,
        stream: Stream,
        records: Vec<WrittenRecord>,
    ) -> Self {
        let resend_key = records
            .iter()
            .any(WrittenRecord::carries_an_id)
            .then(|| batch_content_key(environment_id, session_id, &stream, &records));
        Self {
            io: stream.io,
            channel: stream.channel,
            records,
            resend_key,
        }
    }

    /// The stream the records go to.
    pub fn stream(&self) -> Stream {
        Stream {
            channel: self.channel.clone(),
            io: self.io,
        }
    }

    /// Bytes the command's records carry (for the publisher's batch budget).
    pub fn size(&self) -> usize {
        self.records
            .iter()
            .map(|record| match record {
                WrittenRecord::Record { headers, body } => {
                    body.len()
                        + headers
                            .iter()
                            .map(|(name, value)| name.len() + value.len() + 8)
                            .sum::<usize>()
                        + 32
                }
                WrittenRecord::Trim { .. } => 32,
            })
            .sum()
    }
}

/// One record of a writer batch. Every record takes the stream's next seqNum, a trim too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WrittenRecord {
    /// A data or control record, stored as it came (the body verbatim: readers see it as is).
    Record {
        headers: RecordHeaders,
        body: String,
    },
    /// The S2 trim command record: records below `min(trim_to, tail)` are no longer read.
    Trim { trim_to: u64 },
}

impl WrittenRecord {
    /// Whether the record's body is a JSON object with a string `id`, as every data record of
    /// the official writer is (`{"data":…,"id":"<nanoid>"}`).
    fn carries_an_id(&self) -> bool {
        #[derive(Deserialize)]
        struct WithId<'a> {
            #[serde(borrow)]
            id: Option<std::borrow::Cow<'a, str>>,
        }
        match self {
            WrittenRecord::Record { body, .. } => {
                body.starts_with('{')
                    && serde_json::from_str::<WithId<'_>>(body)
                        .is_ok_and(|record| record.id.is_some())
            }
            WrittenRecord::Trim { .. } => false,
        }
    }
}

/// A SHA-256 of everything a writer batch carries and where it goes, as a UUID. Each field is
/// length-prefixed, so two different batches never feed the hash the same bytes.
fn batch_content_key(
    environment_id: Uuid,
    session_id: Uuid,
    stream: &Stream,
    records: &[WrittenRecord],
) -> Uuid {
    use sha2::{Digest, Sha256};
    fn field(hash: &mut Sha256, bytes: &[u8]) {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    }
    let mut hash = Sha256::new();
    hash.update(environment_id.as_bytes());
    hash.update(session_id.as_bytes());
    field(&mut hash, stream.key().as_bytes());
    for record in records {
        match record {
            WrittenRecord::Record { headers, body } => {
                hash.update([0]);
                hash.update((headers.len() as u64).to_be_bytes());
                for (name, value) in headers {
                    field(&mut hash, name.as_bytes());
                    field(&mut hash, value.as_bytes());
                }
                field(&mut hash, body.as_bytes());
            }
            WrittenRecord::Trim { trim_to } => {
                hash.update([1]);
                hash.update(trim_to.to_be_bytes());
            }
        }
    }
    let digest = hash.finalize();
    let mut bytes = [0_u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateSessionCommand {
    /// Used only if the session is new.
    pub friendly_id: String,
    /// The environment's public id, for the `run.requested` event.
    pub environment_public_id: String,
    pub external_id: Option<String>,
    pub session_type: String,
    pub task_identifier: String,
    pub trigger_config: serde_json::Value,
    pub tags: Vec<String>,
    pub metadata: Option<serde_json::Value>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The first run, used only if the session is new.
    pub run_id: Uuid,
    pub run_friendly_id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloseSessionCommand {
    pub reason: Option<String>,
    /// The run that asked for the close, resolved in the caller's environment. When it is the
    /// session's current run no close message is appended to `in` (that run is exiting).
    #[serde(default)]
    pub calling_run_id: Option<Uuid>,
}

/// Changes a session's tags and/or metadata (`None` = leave as is).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PatchSessionCommand {
    pub tags: Option<Vec<String>>,
    /// New metadata (`None` = leave as is, unless `clear_metadata`).
    pub metadata: Option<serde_json::Value>,
    /// Set metadata to null. (A separate flag: `Option<Option<_>>` does not survive JSON.)
    #[serde(default)]
    pub clear_metadata: bool,
}

/// Swaps the session's current run for a new one if `calling_run_id` is the current run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndAndContinueCommand {
    /// The caller's run, resolved in the caller's environment (`None`: no such run there).
    pub calling_run_id: Option<Uuid>,
    pub reason: String,
    pub environment_public_id: String,
    /// The new run, used only if the swap happens.
    pub new_run_id: Uuid,
    pub new_run_friendly_id: String,
}

/// Registers a waitpoint on `(environment, session, io)`, ordered with the session's appends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegisterWaitpointCommand {
    /// Used only if no waitpoint with the same idempotency key is live.
    pub waitpoint_id: Uuid,
    pub friendly_id: String,
    pub environment_public_id: String,
    pub run_id: Uuid,
    pub run_friendly_id: String,
    pub session_friendly_id: String,
    pub io: Io,
    /// Complete with the first record after this seqNum; `None` = the first record appended
    /// after registration.
    pub last_seq_num: Option<i64>,
    pub timeout_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    pub idempotency_key_expires_at: Option<DateTime<Utc>>,
}

/// The worker's answer to one command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub command_id: Uuid,
    pub outcome: Outcome,
}

/// What applying a command did. Deterministic rejections are outcomes, not errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A new record was persisted.
    Appended {
        seq_num: i64,
    },
    /// The part id was already used with the same body; nothing was written.
    Duplicate {
        seq_num: i64,
    },
    /// The part id was already used with another body; nothing was written.
    Conflict {
        seq_num: i64,
    },
    /// A writer batch was persisted: seqNums `start_seq..end_seq`, at `timestamp_ms`.
    RecordsAppended {
        start_seq: i64,
        end_seq: i64,
        timestamp_ms: i64,
    },
    /// The session is closed; `closed_reason` is the reason it was closed with, if any.
    SessionClosed {
        #[serde(default)]
        closed_reason: Option<String>,
    },
    SessionExpired,
    SessionNotFound,
    /// Create: the session (new or existing) and its current run.
    SessionCreated {
        session: Box<SessionItem>,
        run_friendly_id: String,
        cached: bool,
    },
    /// Close: the session after the command (unchanged if it was closed already).
    SessionClosedNow {
        session: Box<SessionItem>,
    },
    /// Patch: the session after the change.
    SessionUpdated {
        session: Box<SessionItem>,
    },
    /// End-and-continue: the current run after the command.
    RunContinued {
        run_friendly_id: String,
        swapped: bool,
    },
    /// Wait: the waitpoint (new, or the live one with the same idempotency key).
    WaitpointRegistered {
        friendly_id: String,
        cached: bool,
    },
}

impl Outcome {
    /// A low-cardinality name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Appended { .. } => "applied",
            Outcome::RecordsAppended { .. } => "applied",
            Outcome::Duplicate { .. } => "duplicate",
            Outcome::Conflict { .. } => "conflict",
            Outcome::SessionClosed { .. } => "rejected_closed",
            Outcome::SessionExpired => "rejected_expired",
            Outcome::SessionNotFound => "rejected_not_found",
            Outcome::SessionCreated { cached: false, .. } => "applied",
            Outcome::SessionCreated { cached: true, .. } => "cached",
            Outcome::SessionClosedNow { .. } => "applied",
            Outcome::SessionUpdated { .. } => "applied",
            Outcome::RunContinued { swapped: true, .. } => "applied",
            Outcome::RunContinued { swapped: false, .. } => "not_current",
            Outcome::WaitpointRegistered { cached: false, .. } => "applied",
            Outcome::WaitpointRegistered { cached: true, .. } => "cached",
        }
    }
}

/// A worker's notice to every api instance: these channels have records up to `last_seq_num`.
/// Readers then read the new records from the database; the notice carries no record data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewRecords {
    pub channels: Vec<ChannelHead>,
    /// Sessions whose row changed (closed, patched, a new run, re-created): api instances drop
    /// them from their session caches. Absent in notices of older workers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions_changed: Vec<Uuid>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelHead {
    pub environment_id: Uuid,
    pub session_id: Uuid,
    pub io: Io,
    /// A named side channel (`None`: the reserved channel `io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelName>,
    pub last_seq_num: i64,
}

impl ChannelHead {
    pub fn stream(&self) -> Stream {
        Stream {
            channel: self.channel.clone(),
            io: self.io,
        }
    }
}

impl NewRecords {
    /// The highest new seqNum per channel among `commands` and their `outcomes`, and the
    /// sessions that commands other than appends and waitpoint registrations may have changed.
    pub fn from_outcomes(commands: &[Command], outcomes: &[Outcome]) -> Self {
        let mut channels: Vec<ChannelHead> = Vec::new();
        let mut sessions_changed: Vec<Uuid> = Vec::new();
        for (command, outcome) in commands.iter().zip(outcomes) {
            if !matches!(
                command.body,
                CommandBody::Append(_)
                    | CommandBody::AppendRecords(_)
                    | CommandBody::RegisterWaitpoint(_)
            ) && !sessions_changed.contains(&command.session_id)
            {
                sessions_changed.push(command.session_id);
            }
            let (stream, seq_num) = match (&command.body, outcome) {
                (CommandBody::Append(append), Outcome::Appended { seq_num }) => {
                    (append.stream(), *seq_num)
                }
                (CommandBody::AppendRecords(batch), Outcome::RecordsAppended { end_seq, .. }) => {
                    (batch.stream(), end_seq - 1)
                }
                _ => continue,
            };
            match channels.iter_mut().find(|head| {
                head.session_id == command.session_id
                    && head.io == stream.io
                    && head.channel == stream.channel
            }) {
                Some(head) => head.last_seq_num = head.last_seq_num.max(seq_num),
                None => channels.push(ChannelHead {
                    environment_id: command.environment_id,
                    session_id: command.session_id,
                    io: stream.io,
                    channel: stream.channel,
                    last_seq_num: seq_num,
                }),
            }
        }
        Self {
            channels,
            sessions_changed,
        }
    }

    /// Whether there is anything to tell the api instances.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty() && self.sessions_changed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(part_id: Option<&str>) -> Command {
        Command {
            id: Uuid::from_u128(7),
            environment_id: Uuid::from_u128(1),
            session_id: Uuid::from_u128(2),
            accepted_at: DateTime::from_timestamp(1_900_000_000, 0).unwrap_or_default(),
            wants_reply: false,
            body: CommandBody::Append(AppendCommand {
                io: Io::In,
                channel: None,
                part_id: part_id.map(str::to_owned),
                body: "{\"text\":\"hi\"}".into(),
                headers: Vec::new(),
                body_is_envelope: false,
            }),
        }
    }

    #[test]
    fn a_writer_batch_is_keyed_by_all_it_carries_when_it_holds_a_record_with_an_id() {
        let (environment, session) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let record = |body: &str, headers: &[(&str, &str)]| WrittenRecord::Record {
            headers: headers
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            body: body.to_owned(),
        };
        let data = || {
            vec![
                record(r#"{"data":{"id":"inner"},"id":"Ab3_x9Q"}"#, &[]),
                WrittenRecord::Trim { trim_to: 4 },
            ]
        };
        let key = |environment, session, stream: Stream, records| {
            AppendRecordsCommand::new(environment, session, stream, records).resend_key
        };
        let out = || Stream::reserved(Io::Out);
        let first = key(environment, session, out(), data()).expect("a data record has an id");
        assert_eq!(key(environment, session, out(), data()), Some(first));
        let mut changed_body = data();
        changed_body[0] = record(r#"{"data":{"id":"inner"},"id":"Ab3_x9R"}"#, &[]);
        let mut changed_header = data();
        changed_header[0] = record(r#"{"data":{"id":"inner"},"id":"Ab3_x9Q"}"#, &[("a", "")]);
        let mut changed_trim = data();
        changed_trim[1] = WrittenRecord::Trim { trim_to: 5 };
        for (label, other) in [
            ("body", key(environment, session, out(), changed_body)),
            ("header", key(environment, session, out(), changed_header)),
            ("trim", key(environment, session, out(), changed_trim)),
            (
                "stream",
                key(environment, session, Stream::reserved(Io::In), data()),
            ),
            (
                "session",
                key(environment, Uuid::from_u128(3), out(), data()),
            ),
            (
                "environment",
                key(Uuid::from_u128(3), session, out(), data()),
            ),
        ] {
            assert!(other.is_some_and(|other| other != first), "{label}");
        }
        // No record with a top-level string `id`: every copy is a batch of its own.
        for records in [
            vec![record("", &[("trigger-control", "turn-complete")])],
            vec![WrittenRecord::Trim { trim_to: 1 }],
            vec![record(r#"{"data":{"id":"inner"}}"#, &[])],
            vec![record(r#"{"id":7}"#, &[]), record("not json", &[])],
        ] {
            assert_eq!(key(environment, session, out(), records), None);
        }

        let mut command = append(None);
        assert_eq!(command.outcome_key(), command.id);
        command.body = CommandBody::AppendRecords(AppendRecordsCommand::new(
            environment,
            session,
            out(),
            data(),
        ));
        assert_eq!(command.outcome_key(), first);
    }

    #[test]
    fn only_envelopes_with_a_named_channel_are_version_2() {
        let reserved = Envelope::new(vec![append(Some("p1"))]);
        assert_eq!(reserved.version, 1);
        // Byte for byte what a version-1 build writes: no `channel` key at all.
        assert!(!String::from_utf8_lossy(&reserved.encode()).contains("channel"));
        let mut side = append(Some("p2"));
        if let CommandBody::Append(append) = &mut side.body {
            append.channel = Some("notes".parse().expect("name"));
        }
        let envelope = Envelope::new(vec![append(None), side]);
        assert_eq!(envelope.version, 2);
        let mut writer = append(None);
        writer.body = CommandBody::AppendRecords(AppendRecordsCommand::new(
            writer.environment_id,
            writer.session_id,
            Stream::reserved(Io::Out),
            vec![WrittenRecord::Trim { trim_to: 3 }],
        ));
        assert_eq!(Envelope::new(vec![append(None), writer]).version, 3);
        let mut control = append(None);
        if let CommandBody::Append(append) = &mut control.body {
            append.headers = vec![("trigger-control".into(), "turn-complete".into())];
        }
        assert_eq!(Envelope::new(vec![control]).version, 2);
        let decoded = Envelope::decode(&envelope.encode()).expect("decode");
        let CommandBody::Append(append) = &decoded.commands[1].body else {
            panic!("an append");
        };
        assert_eq!(append.stream().key(), "channels/notes/in");
    }

    #[test]
    fn envelope_round_trips() {
        let envelope = Envelope::new(vec![append(Some("p1")), append(None)]);
        let decoded = Envelope::decode(&envelope.encode()).expect("decode");
        assert_eq!(decoded, envelope);
    }

    /// The first published envelope version: workers must keep decoding it.
    #[test]
    fn decodes_the_version_1_fixture() {
        let fixture = include_str!("../fixtures/envelope_v1.json");
        let decoded = Envelope::decode(fixture.as_bytes()).expect("decode v1 fixture");
        assert_eq!(decoded.version, 1);
        assert_eq!(decoded.commands.len(), 3);
        assert!(matches!(decoded.commands[0].body, CommandBody::Append(_)));
        assert!(matches!(
            decoded.commands[1].body,
            CommandBody::CreateSession(_)
        ));
        assert!(matches!(
            decoded.commands[2].body,
            CommandBody::CloseSession(_)
        ));
    }

    #[test]
    fn rejects_unknown_versions_and_empty_batches() {
        let mut envelope = Envelope::new(vec![append(None)]);
        envelope.version = 99;
        assert!(matches!(
            Envelope::decode(&envelope.encode()),
            Err(EnvelopeError::UnsupportedVersion(99))
        ));
        assert!(matches!(
            Envelope::decode(&Envelope::new(vec![]).encode()),
            Err(EnvelopeError::Empty)
        ));
        assert!(matches!(
            Envelope::decode(b"not json"),
            Err(EnvelopeError::Malformed(_))
        ));
    }
}
