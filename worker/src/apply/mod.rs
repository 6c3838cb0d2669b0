//! THE apply logic: what each command kind does to a session, decided in one pure function over
//! the state the batch transaction loaded. No IO here; [`crate::consumer`] runs it inside
//! `Store::apply_batch`.
//!
//! Rules:
//! - commands are applied in the order given (one partition contributes one message, whose
//!   commands are in acceptance order), so each session's writes keep acceptance order;
//! - every stream of a session (`in`, `out`, each named channel's `in` and `out`) gets seqNums
//!   0, 1, 2… without gaps; only the reserved `in`/`out` complete waitpoints;
//! - a part id that already owns a record makes a retry a duplicate (same body) or a conflict
//!   (other body), permanently; neither writes anything;
//! - a redelivered command returns its first outcome and writes nothing again.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::json;
use shared::commands::{
    AppendCommand, AppendRecordsCommand, CloseSessionCommand, Command, CommandBody,
    CreateSessionCommand, EndAndContinueCommand, Outcome, PatchSessionCommand,
    RegisterWaitpointCommand, WrittenRecord,
};
use shared::domain::dedup::{DedupKey, body_fingerprint};
use shared::domain::ids::writer_record_id;
use shared::domain::session::{SessionItem, SessionState, append_state};
use shared::domain::waitpoint::{
    WAITPOINT_COMPLETED, WAITPOINT_TIMED_OUT, WaitpointEvent, timeout_output,
};
use shared::domain::{Io, Stream};
use shared::storage::{
    BatchWrites, LoadedState, NewOutboxEvent, PartOwner, Run, Session, StoredRecord, StreamTrim,
    Waitpoint, WaitpointCompletion, WaitpointStatus,
};
use uuid::Uuid;

/// The message a close appends to `in` (as the reference server does), which also wakes a run
/// waiting there: `{"kind":"message","payload":{"chatId":<key>,"trigger":"close","closedReason"?}}`.
fn close_message(session: &Session, reason: Option<&str>) -> String {
    let mut payload = json!({
        "chatId": session.external_id.as_deref().unwrap_or(&session.friendly_id),
        "trigger": "close",
    });
    if let Some(reason) = reason {
        payload["closedReason"] = json!(reason);
    }
    json!({ "kind": "message", "payload": payload }).to_string()
}

/// Routing key of the event that asks runners to start a run.
pub const RUN_REQUESTED: &str = "run.requested";

/// A record about to be written by [`Planner::write_record`].
struct NewRecord<'a> {
    stream: Stream,
    /// Each record needs its own id in `records.command_id` (unique): an append's command id,
    /// or one derived from a writer batch's command id and the record's index
    /// ([`writer_record_id`]).
    record_id: Uuid,
    /// Whether the record completes waiting waitpoints (reserved channels only).
    wakes_waitpoints: bool,
    part_id: Option<String>,
    headers: &'a [(String, String)],
    body_is_envelope: bool,
    body: &'a str,
    fingerprint: String,
}

struct Planner {
    state: LoadedState,
    writes: BatchWrites,
    inserted_sessions: Vec<Uuid>,
    updated_sessions: HashSet<Uuid>,
    outcomes_so_far: HashMap<Uuid, Outcome>,
}

/// Decides the writes and the outcome of every command, in order.
pub fn plan_batch(commands: &[Command], state: LoadedState) -> (BatchWrites, Vec<Outcome>) {
    let mut planner = Planner {
        state,
        writes: BatchWrites::default(),
        inserted_sessions: Vec::new(),
        updated_sessions: HashSet::new(),
        outcomes_so_far: HashMap::new(),
    };
    let mut outcomes = Vec::with_capacity(commands.len());
    for command in commands {
        // The same command twice in one batch (a redelivery racing its original, or a writer
        // batch sent again racing its first copy) applies once.
        let outcome = match planner.outcomes_so_far.get(&command.outcome_key()) {
            Some(earlier) => earlier.clone(),
            None => {
                let outcome = planner.apply(command);
                planner
                    .outcomes_so_far
                    .insert(command.outcome_key(), outcome.clone());
                outcome
            }
        };
        outcomes.push(outcome);
    }
    (planner.finish(), outcomes)
}

impl Planner {
    fn apply(&mut self, command: &Command) -> Outcome {
        match &command.body {
            CommandBody::Append(append) => self.append(command, append),
            CommandBody::AppendRecords(batch) => {
                self.once(command, |planner| planner.append_records(command, batch))
            }
            CommandBody::CreateSession(create) => {
                self.once(command, |planner| planner.create_session(command, create))
            }
            CommandBody::CloseSession(close) => {
                self.once(command, |planner| planner.close_session(command, close))
            }
            CommandBody::PatchSession(patch) => {
                self.once(command, |planner| planner.patch_session(command, patch))
            }
            CommandBody::EndAndContinue(end) => {
                self.once(command, |planner| planner.end_and_continue(command, end))
            }
            CommandBody::RegisterWaitpoint(register) => self.once(command, |planner| {
                planner.register_waitpoint(command, register)
            }),
        }
    }

    /// Applies a non-append command once: a redelivery (or a writer batch sent again: see
    /// [`Command::outcome_key`]) replays the stored outcome instead. (Appends need no stored
    /// outcome: their record is the proof.)
    fn once(&mut self, command: &Command, apply: impl FnOnce(&mut Self) -> Outcome) -> Outcome {
        let outcome = match self.state.applied_outcomes.get(&command.outcome_key()) {
            Some(stored) => stored.clone(),
            None => apply(self),
        };
        self.remember(command, &outcome);
        outcome
    }

    /// Stores a non-append outcome so that a redelivery replays it.
    fn remember(&mut self, command: &Command, outcome: &Outcome) {
        let key = command.outcome_key();
        if !self.state.applied_outcomes.contains_key(&key) {
            self.writes
                .applied_outcomes
                .push((key, command.session_id, outcome.clone()));
            self.state.applied_outcomes.insert(key, outcome.clone());
        }
    }

    /// The command's session, if it exists in the command's environment.
    fn session(&self, command: &Command) -> Option<&Session> {
        self.state
            .sessions
            .get(&command.session_id)
            .filter(|session| session.environment_id == command.environment_id)
    }

    /// The command's session if it accepts writes at the command's acceptance time, else the
    /// rejection. Expiry is judged by the time the command was accepted; a close refuses the
    /// appends accepted after it (past the api's session cache TTL: `append_state`), and every
    /// other command applied after it.
    fn open_session(&self, command: &Command) -> Result<&Session, Outcome> {
        let session = self.session(command).ok_or(Outcome::SessionNotFound)?;
        let state = if matches!(
            command.body,
            CommandBody::Append(_) | CommandBody::AppendRecords(_)
        ) {
            append_state(
                session.closed_at,
                session.expires_at,
                command.accepted_at,
                self.state.close_grace,
            )
        } else {
            session.state(command.accepted_at)
        };
        match state {
            SessionState::Closed => Err(Outcome::SessionClosed {
                closed_reason: session.closed_reason.clone(),
            }),
            SessionState::Expired => Err(Outcome::SessionExpired),
            SessionState::Open => Ok(session),
        }
    }

    fn session_mut(&mut self, command: &Command) -> Option<&mut Session> {
        self.state
            .sessions
            .get_mut(&command.session_id)
            .filter(|session| session.environment_id == command.environment_id)
    }

    fn append(&mut self, command: &Command, append: &AppendCommand) -> Outcome {
        if let Some(seq_num) = self.state.recorded_appends.get(&command.id) {
            return Outcome::Appended { seq_num: *seq_num };
        }
        if let Err(rejected) = self.open_session(command) {
            return rejected;
        }
        let fingerprint = body_fingerprint(&append.body);
        let stream = append.stream();
        let key = append.part_id.as_ref().map(|part_id| DedupKey {
            environment_id: command.environment_id,
            session_id: command.session_id,
            stream: stream.clone(),
            part_id: part_id.clone(),
        });
        if let Some(owner) = key.as_ref().and_then(|key| self.state.parts.get(key)) {
            let (seq_num, stored_body) = (owner.seq_num, owner.body.clone());
            if owner.body_fingerprint != fingerprint {
                // Nothing was appended: no waitpoint may complete.
                return Outcome::Conflict { seq_num };
            }
            // A retry re-runs the drain, with the STORED record: it completes only waitpoints
            // that were waiting for that record (e.g. left over by a crash), never later ones.
            if stream.is_reserved() {
                self.drain(command, append.io, seq_num, &stored_body);
            }
            return Outcome::Duplicate { seq_num };
        }
        let record = NewRecord {
            stream,
            record_id: command.id,
            wakes_waitpoints: true,
            part_id: append.part_id.clone(),
            headers: &append.headers,
            body_is_envelope: append.body_is_envelope,
            body: &append.body,
            fingerprint: fingerprint.clone(),
        };
        let Some(seq_num) = self.write_record(command, record) else {
            return Outcome::SessionNotFound;
        };
        if let Some(key) = key {
            self.state.parts.insert(
                key,
                PartOwner {
                    seq_num,
                    body_fingerprint: fingerprint,
                    body: append.body.clone(),
                },
            );
        }
        self.state.recorded_appends.insert(command.id, seq_num);
        Outcome::Appended { seq_num }
    }

    /// Writes a writer batch: every record (a trim too) takes the stream's next seqNum, so the
    /// batch gets contiguous seqNums. A trim raises the stream's trim point to
    /// `min(trim_to, tail)`, the tail being the seqNum after the trim record. Writer records
    /// complete no waitpoint: as on the reference server, only the append route wakes runs.
    fn append_records(&mut self, command: &Command, batch: &AppendRecordsCommand) -> Outcome {
        if let Err(rejected) = self.open_session(command) {
            return rejected;
        }
        let stream = batch.stream();
        let trim_header = [(String::new(), "trim".to_owned())];
        let mut start_seq = None;
        let mut end_seq = 0;
        for (index, written) in batch.records.iter().enumerate() {
            let (headers, body, trim_to): (&[(String, String)], &str, Option<u64>) = match written {
                WrittenRecord::Record { headers, body } => (headers, body, None),
                WrittenRecord::Trim { trim_to } => (&trim_header, "", Some(*trim_to)),
            };
            let record = NewRecord {
                stream: stream.clone(),
                record_id: writer_record_id(command.id, index as u64),
                wakes_waitpoints: false,
                part_id: None,
                headers,
                body_is_envelope: true,
                body,
                // Only a record with a part id is ever compared with a retry's body; a
                // writer record has none, so it stores no fingerprint (no SHA-256 per record).
                fingerprint: String::new(),
            };
            let Some(seq_num) = self.write_record(command, record) else {
                return Outcome::SessionNotFound;
            };
            start_seq.get_or_insert(seq_num);
            end_seq = seq_num + 1;
            if let Some(trim_to) = trim_to {
                let point = i64::try_from(trim_to).unwrap_or(i64::MAX).min(end_seq);
                self.raise_trim_point(command.session_id, stream.key(), point);
            }
        }
        Outcome::RecordsAppended {
            start_seq: start_seq.unwrap_or(end_seq),
            end_seq,
            timestamp_ms: self.state.now.timestamp_millis(),
        }
    }

    fn raise_trim_point(&mut self, session_id: Uuid, stream: String, point: i64) {
        match self
            .writes
            .trims
            .iter_mut()
            .find(|trim| trim.session_id == session_id && trim.stream == stream)
        {
            Some(trim) => trim.trim_seq = trim.trim_seq.max(point),
            None => self.writes.trims.push(StreamTrim {
                session_id,
                stream,
                trim_seq: point,
            }),
        }
    }

    /// Gives the record its stream's next seqNum, completes the waitpoints it wakes (reserved
    /// channels only: a named channel wakes no run) and writes it. `None` if the command's
    /// session does not exist.
    fn write_record(&mut self, command: &Command, record: NewRecord<'_>) -> Option<i64> {
        let NewRecord {
            stream,
            record_id,
            wakes_waitpoints,
            part_id,
            headers,
            body_is_envelope,
            body,
            fingerprint,
        } = record;
        let now = self.state.now;
        let session = self.session_mut(command)?;
        let session_id = session.id;
        let key = stream.key();
        let seq_num = if stream.is_reserved() {
            let counter = match stream.io {
                Io::In => &mut session.next_seq_in,
                Io::Out => &mut session.next_seq_out,
            };
            let seq_num = *counter;
            *counter += 1;
            session.updated_at = now;
            self.updated_sessions.insert(session_id);
            if wakes_waitpoints {
                self.drain(command, stream.io, seq_num, body);
            }
            seq_num
        } else {
            // Named channels count in the batch state (loaded from their last record).
            let next = self
                .state
                .named_stream_heads
                .entry((session_id, key.clone()))
                .or_insert(0);
            let seq_num = *next;
            *next += 1;
            seq_num
        };
        self.writes.records.push(StoredRecord {
            session_id,
            stream: stream.clone(),
            seq_num,
            environment_id: command.environment_id,
            part_id,
            body: body.to_owned(),
            body_fingerprint: fingerprint,
            command_id: record_id,
            created_at: now,
            headers: headers.to_vec(),
            body_is_envelope,
        });
        Some(seq_num)
    }

    /// Completes every waitpoint of the channel waiting for a record after one before `seq_num`
    /// with that record's body.
    fn drain(&mut self, command: &Command, io: Io, seq_num: i64, body: &str) {
        let now = self.state.now;
        let Some(waiting) = self
            .state
            .waiting_waitpoints
            .get_mut(&(command.session_id, io))
        else {
            return;
        };
        let (ready, still_waiting): (Vec<Waitpoint>, Vec<Waitpoint>) =
            waiting.drain(..).partition(|waitpoint| {
                waitpoint.after_seq < seq_num && waitpoint.environment_id == command.environment_id
            });
        *waiting = still_waiting;
        for waitpoint in ready {
            self.writes.waitpoint_completions.push(completion(
                &waitpoint,
                WaitpointStatus::Completed,
                body.to_owned(),
                Some(seq_num),
                now,
            ));
        }
    }

    fn register_waitpoint(
        &mut self,
        command: &Command,
        register: &RegisterWaitpointCommand,
    ) -> Outcome {
        let now = self.state.now;
        if let Some(key) = &register.idempotency_key
            && let Some(live) = self
                .state
                .waitpoints_by_key
                .get(&(command.environment_id, key.clone()))
        {
            return Outcome::WaitpointRegistered {
                friendly_id: live.friendly_id.clone(),
                cached: true,
            };
        }
        let Some(session) = self.session(command) else {
            return Outcome::SessionNotFound;
        };
        let next_seq = session.next_seq(register.io);
        let after_seq = register.last_seq_num.unwrap_or(next_seq - 1).max(-1);
        let waitpoint = Waitpoint {
            id: register.waitpoint_id,
            friendly_id: register.friendly_id.clone(),
            environment_id: command.environment_id,
            environment_public_id: register.environment_public_id.clone(),
            run_id: register.run_id,
            run_friendly_id: register.run_friendly_id.clone(),
            session_id: command.session_id,
            session_friendly_id: session.friendly_id.clone(),
            io: register.io,
            after_seq,
            status: WaitpointStatus::Waiting,
            output: None,
            output_is_error: false,
            completed_by_seq: None,
            completed_at: None,
            timeout_at: register.timeout_at,
            tags: json!(register.tags),
            idempotency_key: register.idempotency_key.clone(),
            idempotency_key_expires_at: register.idempotency_key_expires_at,
            created_at: now,
        };
        // Registration is ordered with the appends: a record already after `after_seq`
        // completes the waitpoint at once (no lost wake-up).
        let first_after = after_seq + 1;
        let existing_body = if first_after < next_seq {
            self.writes
                .records
                .iter()
                .find(|record| {
                    record.session_id == command.session_id
                        && record.stream == Stream::reserved(register.io)
                        && record.seq_num == first_after
                })
                .map(|record| record.body.clone())
                .or_else(|| {
                    self.state
                        .record_bodies
                        .get(&(command.session_id, register.io, first_after))
                        .cloned()
                })
        } else {
            None
        };
        match existing_body {
            Some(body) => self.writes.waitpoint_completions.push(completion(
                &waitpoint,
                WaitpointStatus::Completed,
                body,
                Some(first_after),
                now,
            )),
            None => self
                .state
                .waiting_waitpoints
                .entry((command.session_id, register.io))
                .or_default()
                .push(waitpoint.clone()),
        }
        if let Some(key) = &register.idempotency_key {
            self.state
                .waitpoints_by_key
                .insert((command.environment_id, key.clone()), waitpoint.clone());
        }
        let friendly_id = waitpoint.friendly_id.clone();
        self.writes.new_waitpoints.push(waitpoint);
        Outcome::WaitpointRegistered {
            friendly_id,
            cached: false,
        }
    }

    /// The wire form of the command's session as the batch has it now.
    fn current_item(&self, command: &Command) -> Option<Box<SessionItem>> {
        let session = self.state.sessions.get(&command.session_id)?;
        Some(Box::new(
            session.to_item(self.current_run_friendly_id(session)),
        ))
    }

    fn current_run_friendly_id(&self, session: &Session) -> Option<String> {
        session
            .current_run_id
            .and_then(|run_id| self.state.run_friendly_ids.get(&run_id).cloned())
    }

    fn create_session(&mut self, command: &Command, create: &CreateSessionCommand) -> Outcome {
        let now = self.state.now;
        if let Some(existing) = self.state.sessions.get(&command.session_id) {
            if existing.environment_id != command.environment_id {
                return Outcome::SessionNotFound;
            }
            if existing.closed_at.is_some() {
                return Outcome::SessionClosed {
                    closed_reason: existing.closed_reason.clone(),
                };
            }
            // The cached path refreshes the trigger config and nothing else (as the reference
            // server does): later runs use the caller's newest config.
            if existing.trigger_config != create.trigger_config
                && let Some(existing) = self.session_mut(command)
            {
                existing.trigger_config = create.trigger_config.clone();
                existing.updated_at = now;
                self.updated_sessions.insert(command.session_id);
            }
            let Some(existing) = self.session(command) else {
                return Outcome::SessionNotFound;
            };
            let run = self.current_run_friendly_id(existing);
            return Outcome::SessionCreated {
                session: Box::new(existing.to_item(run.clone())),
                run_friendly_id: run.unwrap_or_default(),
                cached: true,
            };
        }
        if create
            .expires_at
            .is_some_and(|expiry| expiry <= command.accepted_at)
        {
            return Outcome::SessionExpired;
        }
        let session = Session {
            id: command.session_id,
            friendly_id: create.friendly_id.clone(),
            environment_id: command.environment_id,
            external_id: create.external_id.clone(),
            session_type: create.session_type.clone(),
            task_identifier: create.task_identifier.clone(),
            trigger_config: create.trigger_config.clone(),
            tags: create.tags.clone(),
            metadata: create.metadata.clone(),
            expires_at: create.expires_at,
            closed_at: None,
            closed_reason: None,
            current_run_id: Some(create.run_id),
            next_seq_in: 0,
            next_seq_out: 0,
            created_at: now,
            updated_at: now,
        };
        self.writes.runs.push(Run {
            id: create.run_id,
            friendly_id: create.run_friendly_id.clone(),
            environment_id: command.environment_id,
            session_id: command.session_id,
            created_at: now,
        });
        self.writes.outbox.push(run_requested_event(
            &session,
            &create.run_friendly_id,
            &create.environment_public_id,
            "session_created",
            now,
        ));
        self.state
            .run_friendly_ids
            .insert(create.run_id, create.run_friendly_id.clone());
        let item = session.to_item(Some(create.run_friendly_id.clone()));
        self.state.sessions.insert(session.id, session);
        self.inserted_sessions.push(command.session_id);
        Outcome::SessionCreated {
            session: Box::new(item),
            run_friendly_id: create.run_friendly_id.clone(),
            cached: false,
        }
    }

    fn close_session(&mut self, command: &Command, close: &CloseSessionCommand) -> Outcome {
        let now = self.state.now;
        let Some(session) = self.session_mut(command) else {
            return Outcome::SessionNotFound;
        };
        if session.closed_at.is_none() {
            session.closed_at = Some(now);
            session.closed_reason = close.reason.clone();
            session.updated_at = now;
            let id = session.id;
            let closed_by_its_own_run =
                close.calling_run_id.is_some() && close.calling_run_id == session.current_run_id;
            let message = close_message(session, close.reason.as_deref());
            self.updated_sessions.insert(id);
            if !closed_by_its_own_run {
                let record = NewRecord {
                    stream: Stream::reserved(Io::In),
                    record_id: command.id,
                    wakes_waitpoints: true,
                    part_id: None,
                    headers: &[],
                    body_is_envelope: false,
                    fingerprint: body_fingerprint(&message),
                    body: &message,
                };
                self.write_record(command, record);
            }
        }
        match self.current_item(command) {
            Some(session) => Outcome::SessionClosedNow { session },
            None => Outcome::SessionNotFound,
        }
    }

    fn patch_session(&mut self, command: &Command, patch: &PatchSessionCommand) -> Outcome {
        let now = self.state.now;
        let Some(session) = self.session_mut(command) else {
            return Outcome::SessionNotFound;
        };
        let mut changed = false;
        if let Some(tags) = &patch.tags {
            changed |= session.tags != *tags;
            session.tags.clone_from(tags);
        }
        let new_metadata = if patch.clear_metadata {
            Some(None)
        } else {
            patch.metadata.clone().map(Some)
        };
        if let Some(metadata) = new_metadata {
            changed |= session.metadata != metadata;
            session.metadata = metadata;
        }
        if changed {
            session.updated_at = now;
            let id = session.id;
            self.updated_sessions.insert(id);
        }
        match self.current_item(command) {
            Some(session) => Outcome::SessionUpdated { session },
            None => Outcome::SessionNotFound,
        }
    }

    fn end_and_continue(&mut self, command: &Command, end: &EndAndContinueCommand) -> Outcome {
        let now = self.state.now;
        let session = match self.open_session(command) {
            Ok(session) => session,
            Err(rejected) => return rejected,
        };
        let is_current =
            end.calling_run_id.is_some() && end.calling_run_id == session.current_run_id;
        if !is_current {
            return Outcome::RunContinued {
                run_friendly_id: self.current_run_friendly_id(session).unwrap_or_default(),
                swapped: false,
            };
        }
        let event = run_requested_event(
            session,
            &end.new_run_friendly_id,
            &end.environment_public_id,
            &end.reason,
            now,
        );
        self.writes.outbox.push(event);
        self.writes.runs.push(Run {
            id: end.new_run_id,
            friendly_id: end.new_run_friendly_id.clone(),
            environment_id: command.environment_id,
            session_id: command.session_id,
            created_at: now,
        });
        self.state
            .run_friendly_ids
            .insert(end.new_run_id, end.new_run_friendly_id.clone());
        if let Some(session) = self.session_mut(command) {
            session.current_run_id = Some(end.new_run_id);
            session.updated_at = now;
        }
        self.updated_sessions.insert(command.session_id);
        Outcome::RunContinued {
            run_friendly_id: end.new_run_friendly_id.clone(),
            swapped: true,
        }
    }

    fn finish(mut self) -> BatchWrites {
        for id in &self.inserted_sessions {
            if let Some(session) = self.state.sessions.get(id) {
                self.writes.inserted_sessions.push(session.clone());
            }
        }
        let inserted: HashSet<Uuid> = self.inserted_sessions.iter().copied().collect();
        for id in &self.updated_sessions {
            if inserted.contains(id) {
                continue;
            }
            if let Some(session) = self.state.sessions.get(id) {
                self.writes.updated_sessions.push(session.clone());
            }
        }
        self.writes
    }
}

/// A completion (`COMPLETED` with a record body) or time-out (`TIMED_OUT` with the error
/// output) of `waitpoint`, with its event.
pub fn completion(
    waitpoint: &Waitpoint,
    status: WaitpointStatus,
    output: String,
    completed_by_seq: Option<i64>,
    at: DateTime<Utc>,
) -> WaitpointCompletion {
    let output_is_error = status == WaitpointStatus::TimedOut;
    let kind = if output_is_error {
        WAITPOINT_TIMED_OUT
    } else {
        WAITPOINT_COMPLETED
    };
    let payload = WaitpointEvent {
        kind,
        waitpoint_friendly_id: &waitpoint.friendly_id,
        run_friendly_id: &waitpoint.run_friendly_id,
        session_friendly_id: &waitpoint.session_friendly_id,
        environment_public_id: &waitpoint.environment_public_id,
        io: waitpoint.io.as_str(),
        output: &output,
        output_is_error,
        at,
    }
    .payload();
    WaitpointCompletion {
        waitpoint_id: waitpoint.id,
        status,
        output,
        output_is_error,
        completed_by_seq,
        completed_at: at,
        event: NewOutboxEvent {
            routing_key: kind.to_owned(),
            payload,
        },
    }
}

/// The time-out of an expired waitpoint.
pub fn time_out(waitpoint: &Waitpoint, now: DateTime<Utc>) -> WaitpointCompletion {
    let timeout_at = waitpoint.timeout_at.unwrap_or(now);
    completion(
        waitpoint,
        WaitpointStatus::TimedOut,
        timeout_output(timeout_at),
        None,
        now,
    )
}

/// The `run.requested` event that asks runners to start `run_friendly_id` for `session`.
fn run_requested_event(
    session: &Session,
    run_friendly_id: &str,
    environment_public_id: &str,
    reason: &str,
    at: DateTime<Utc>,
) -> NewOutboxEvent {
    NewOutboxEvent {
        routing_key: RUN_REQUESTED.to_owned(),
        payload: json!({
            "type": RUN_REQUESTED,
            "runId": run_friendly_id,
            "sessionId": session.friendly_id,
            "externalId": session.external_id,
            "environmentId": environment_public_id,
            "taskIdentifier": session.task_identifier,
            "triggerConfig": session.trigger_config,
            "reason": reason,
            "requestedAt": at,
        }),
    }
}

#[cfg(test)]
mod tests;
