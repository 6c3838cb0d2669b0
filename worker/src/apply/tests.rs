use super::*;
use chrono::TimeDelta;
use shared::commands::{AppendCommand, RegisterWaitpointCommand};

const ENV: Uuid = Uuid::from_u128(1);
const SESSION: Uuid = Uuid::from_u128(2);

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_900_000_000, 0).unwrap_or_default()
}

fn stored_session() -> Session {
    Session {
        id: SESSION,
        friendly_id: "session_a".into(),
        environment_id: ENV,
        external_id: Some("chat".into()),
        session_type: "chat.agent".into(),
        task_identifier: "agent".into(),
        trigger_config: json!({"basePayload": {}}),
        tags: Vec::new(),
        metadata: None,
        expires_at: None,
        closed_at: None,
        closed_reason: None,
        current_run_id: None,
        next_seq_in: 0,
        next_seq_out: 0,
        created_at: now(),
        updated_at: now(),
    }
}

fn state_with(session: Option<Session>) -> LoadedState {
    let mut state = LoadedState {
        now: now(),
        ..LoadedState::default()
    };
    if let Some(session) = session {
        state.sessions.insert(session.id, session);
    }
    state
}

fn append(id: u128, io: Io, part_id: Option<&str>, body: &str) -> Command {
    Command {
        id: Uuid::from_u128(id),
        environment_id: ENV,
        session_id: SESSION,
        accepted_at: now(),
        wants_reply: false,
        body: CommandBody::Append(AppendCommand {
            io,
            channel: None,
            part_id: part_id.map(str::to_owned),
            body: body.into(),
            headers: Vec::new(),
            body_is_envelope: false,
        }),
    }
}

fn append_to_channel(
    id: u128,
    channel: &str,
    io: Io,
    part_id: Option<&str>,
    body: &str,
) -> Command {
    let mut command = append(id, io, part_id, body);
    if let CommandBody::Append(append) = &mut command.body {
        append.channel = Some(channel.parse().expect("channel name"));
    }
    command
}

#[test]
fn side_channels_count_on_their_own_and_wake_no_waitpoint() {
    let mut state = state_with(Some(stored_session()));
    // The batch state says notes/in already holds records 0..=4.
    state
        .named_stream_heads
        .insert((SESSION, "channels/notes/in".into()), 5);
    let commands = vec![
        register(20, None),
        append_to_channel(10, "notes", Io::In, Some("n1"), "a"),
        append_to_channel(11, "notes", Io::In, Some("n1"), "a"),
        append_to_channel(12, "notes", Io::Out, None, "b"),
        append_to_channel(13, "other", Io::In, Some("n1"), "c"),
        append(14, Io::In, Some("n1"), "reserved"),
    ];
    let (writes, outcomes) = plan_batch(&commands, state);
    assert_eq!(
        outcomes[1..],
        [
            Outcome::Appended { seq_num: 5 },
            Outcome::Duplicate { seq_num: 5 },
            Outcome::Appended { seq_num: 0 },
            Outcome::Appended { seq_num: 0 },
            Outcome::Appended { seq_num: 0 },
        ]
    );
    let keys: Vec<String> = writes
        .records
        .iter()
        .map(|record| record.stream.key())
        .collect();
    assert_eq!(
        keys,
        [
            "channels/notes/in",
            "channels/notes/out",
            "channels/other/in",
            "in"
        ]
    );
    // Only the reserved `in` record completes the run's waitpoint; only it moves the counters.
    assert_eq!(writes.waitpoint_completions.len(), 1);
    assert_eq!(writes.waitpoint_completions[0].output, "reserved");
    assert_eq!(writes.updated_sessions.len(), 1);
    assert_eq!(writes.updated_sessions[0].next_seq_in, 1);
    assert_eq!(writes.updated_sessions[0].next_seq_out, 0);
}

#[test]
fn seq_nums_are_gapless_per_channel_in_order() {
    let commands = vec![
        append(10, Io::In, None, "a"),
        append(11, Io::Out, None, "b"),
        append(12, Io::In, None, "c"),
    ];
    let (writes, outcomes) = plan_batch(&commands, state_with(Some(stored_session())));
    assert_eq!(
        outcomes,
        vec![
            Outcome::Appended { seq_num: 0 },
            Outcome::Appended { seq_num: 0 },
            Outcome::Appended { seq_num: 1 },
        ]
    );
    assert_eq!(writes.records.len(), 3);
    assert_eq!(writes.updated_sessions.len(), 1);
    assert_eq!(writes.updated_sessions[0].next_seq_in, 2);
    assert_eq!(writes.updated_sessions[0].next_seq_out, 1);
}

#[test]
fn part_id_retries_are_duplicates_or_conflicts_and_write_nothing() {
    let commands = vec![
        append(10, Io::In, Some("p"), "first"),
        append(11, Io::In, Some("p"), "first"),
        append(12, Io::In, Some("p"), "other"),
        append(13, Io::Out, Some("p"), "first"),
    ];
    let (writes, outcomes) = plan_batch(&commands, state_with(Some(stored_session())));
    assert_eq!(
        outcomes,
        vec![
            Outcome::Appended { seq_num: 0 },
            Outcome::Duplicate { seq_num: 0 },
            Outcome::Conflict { seq_num: 0 },
            Outcome::Appended { seq_num: 0 },
        ]
    );
    assert_eq!(writes.records.len(), 2);
}

#[test]
fn stored_part_owner_decides_across_batches() {
    let mut state = state_with(Some(stored_session()));
    state.parts.insert(
        DedupKey {
            environment_id: ENV,
            session_id: SESSION,
            stream: Stream::reserved(Io::In),
            part_id: "p".into(),
        },
        PartOwner {
            seq_num: 4,
            body_fingerprint: body_fingerprint("first"),
            body: "first".into(),
        },
    );
    let commands = vec![
        append(10, Io::In, Some("p"), "first"),
        append(11, Io::In, Some("p"), "second"),
    ];
    let (writes, outcomes) = plan_batch(&commands, state);
    assert_eq!(
        outcomes,
        vec![
            Outcome::Duplicate { seq_num: 4 },
            Outcome::Conflict { seq_num: 4 }
        ]
    );
    assert!(writes.records.is_empty());
    assert!(writes.updated_sessions.is_empty());
}

#[test]
fn redelivered_and_repeated_commands_apply_once() {
    let mut state = state_with(Some(stored_session()));
    state.recorded_appends.insert(Uuid::from_u128(10), 7);
    let commands = vec![
        append(10, Io::In, None, "a"),
        append(11, Io::In, None, "b"),
        append(11, Io::In, None, "b"),
    ];
    let (writes, outcomes) = plan_batch(&commands, state);
    assert_eq!(
        outcomes,
        vec![
            Outcome::Appended { seq_num: 7 },
            Outcome::Appended { seq_num: 0 },
            Outcome::Appended { seq_num: 0 },
        ]
    );
    assert_eq!(writes.records.len(), 1);
}

fn writer_batch(id: u128, bodies: &[&str]) -> Command {
    let records = bodies
        .iter()
        .map(|body| WrittenRecord::Record {
            headers: Vec::new(),
            body: (*body).to_owned(),
        })
        .collect();
    Command {
        id: Uuid::from_u128(id),
        environment_id: ENV,
        session_id: SESSION,
        accepted_at: now(),
        wants_reply: false,
        body: CommandBody::AppendRecords(AppendRecordsCommand::new(
            ENV,
            SESSION,
            Stream::reserved(Io::Out),
            records,
        )),
    }
}

#[test]
fn a_writer_batch_sent_again_replays_its_first_outcome_in_a_batch_and_across_batches() {
    let first = writer_batch(
        20,
        &[r#"{"data":"a","id":"x1"}"#, r#"{"data":"b","id":"x2"}"#],
    );
    let resent = writer_batch(
        21,
        &[r#"{"data":"a","id":"x1"}"#, r#"{"data":"b","id":"x2"}"#],
    );
    let next = writer_batch(22, &[r#"{"data":"c","id":"x3"}"#]);
    let (writes, outcomes) = plan_batch(
        &[first.clone(), resent.clone(), next],
        state_with(Some(stored_session())),
    );
    let appended = |start_seq, end_seq| Outcome::RecordsAppended {
        start_seq,
        end_seq,
        timestamp_ms: now().timestamp_millis(),
    };
    assert_eq!(
        outcomes,
        vec![appended(0, 2), appended(0, 2), appended(2, 3)]
    );
    assert_eq!(writes.records.len(), 3);

    // The copy arrives after the first was committed: the stored outcome answers it.
    let mut state = state_with(Some(stored_session()));
    for (key, _, outcome) in writes.applied_outcomes {
        state.applied_outcomes.insert(key, outcome);
    }
    let (writes, outcomes) = plan_batch(&[resent], state);
    assert_eq!(outcomes, vec![appended(0, 2)]);
    assert!(writes.records.is_empty());

    // Control records carry no id: two identical batches of them are both written.
    let control = |id| {
        let mut command = writer_batch(id, &[]);
        if let CommandBody::AppendRecords(batch) = &mut command.body {
            *batch = AppendRecordsCommand::new(
                ENV,
                SESSION,
                Stream::reserved(Io::Out),
                vec![WrittenRecord::Record {
                    headers: vec![("trigger-control".into(), "turn-complete".into())],
                    body: String::new(),
                }],
            );
        }
        command
    };
    let (writes, outcomes) = plan_batch(
        &[control(30), control(31)],
        state_with(Some(stored_session())),
    );
    assert_eq!(outcomes, vec![appended(0, 1), appended(1, 2)]);
    assert_eq!(writes.records.len(), 2);
}

#[test]
fn closed_expired_and_missing_sessions_reject_appends() {
    let mut closed = stored_session();
    closed.closed_at = Some(now());
    closed.closed_reason = Some("done".into());
    let (writes, outcomes) = plan_batch(&[append(10, Io::In, None, "a")], state_with(Some(closed)));
    assert_eq!(
        outcomes,
        vec![Outcome::SessionClosed {
            closed_reason: Some("done".into())
        }]
    );
    assert!(writes.records.is_empty());

    let mut expired = stored_session();
    expired.expires_at = Some(now() - TimeDelta::seconds(1));
    let (_, outcomes) = plan_batch(&[append(10, Io::In, None, "a")], state_with(Some(expired)));
    assert_eq!(outcomes, vec![Outcome::SessionExpired]);

    // Accepted before the expiry: applied even if the worker runs later.
    let mut expires_later = stored_session();
    expires_later.expires_at = Some(now() + TimeDelta::seconds(1));
    let mut state = state_with(Some(expires_later));
    state.now = now() + TimeDelta::seconds(60);
    let (_, outcomes) = plan_batch(&[append(10, Io::In, None, "a")], state);
    assert_eq!(outcomes, vec![Outcome::Appended { seq_num: 0 }]);

    let (_, outcomes) = plan_batch(&[append(10, Io::In, None, "a")], state_with(None));
    assert_eq!(outcomes, vec![Outcome::SessionNotFound]);
}

#[test]
fn another_environment_cannot_touch_the_session() {
    let mut command = append(10, Io::In, None, "a");
    command.environment_id = Uuid::from_u128(99);
    let (writes, outcomes) = plan_batch(&[command], state_with(Some(stored_session())));
    assert_eq!(outcomes, vec![Outcome::SessionNotFound]);
    assert!(writes.records.is_empty());
}

fn create(id: u128) -> Command {
    Command {
        id: Uuid::from_u128(id),
        environment_id: ENV,
        session_id: SESSION,
        accepted_at: now(),
        wants_reply: true,
        body: CommandBody::CreateSession(Box::new(CreateSessionCommand {
            friendly_id: "session_new".into(),
            environment_public_id: "env_x".into(),
            external_id: Some("chat".into()),
            session_type: "chat.agent".into(),
            task_identifier: "agent".into(),
            trigger_config: json!({"basePayload": {}}),
            tags: vec!["t".into()],
            metadata: None,
            expires_at: None,
            run_id: Uuid::from_u128(500),
            run_friendly_id: "run_first".into(),
        })),
    }
}

#[test]
fn create_then_append_in_one_batch_inserts_the_final_row() {
    let commands = vec![create(1), append(10, Io::In, None, "a"), create(2)];
    let (writes, outcomes) = plan_batch(&commands, state_with(None));
    assert!(matches!(
        &outcomes[0],
        Outcome::SessionCreated { cached: false, run_friendly_id, .. } if run_friendly_id == "run_first"
    ));
    assert_eq!(outcomes[1], Outcome::Appended { seq_num: 0 });
    assert!(matches!(
        &outcomes[2],
        Outcome::SessionCreated { cached: true, .. }
    ));
    assert_eq!(writes.inserted_sessions.len(), 1);
    assert_eq!(writes.inserted_sessions[0].next_seq_in, 1);
    assert!(writes.updated_sessions.is_empty());
    assert_eq!(writes.runs.len(), 1);
    assert_eq!(writes.outbox.len(), 1);
    assert_eq!(writes.outbox[0].routing_key, RUN_REQUESTED);
    assert_eq!(writes.applied_outcomes.len(), 2);
}

#[test]
fn close_is_idempotent_and_blocks_later_appends() {
    let close = Command {
        id: Uuid::from_u128(20),
        environment_id: ENV,
        session_id: SESSION,
        accepted_at: now(),
        wants_reply: true,
        body: CommandBody::CloseSession(CloseSessionCommand {
            reason: Some("done".into()),
            calling_run_id: None,
        }),
    };
    let mut second_close = close.clone();
    second_close.id = Uuid::from_u128(21);
    let commands = vec![
        append(10, Io::In, None, "before"),
        close,
        append(11, Io::In, None, "after"),
        second_close,
    ];
    let (writes, outcomes) = plan_batch(&commands, state_with(Some(stored_session())));
    assert_eq!(outcomes[0], Outcome::Appended { seq_num: 0 });
    let Outcome::SessionClosedNow { session } = &outcomes[1] else {
        panic!("expected a close outcome, got {:?}", outcomes[1]);
    };
    assert_eq!(session.closed_reason.as_deref(), Some("done"));
    assert_eq!(
        outcomes[2],
        Outcome::SessionClosed {
            closed_reason: Some("done".into())
        }
    );
    assert_eq!(outcomes[3], outcomes[1]);
    // "before", then the one close message (the second close changes nothing).
    assert_eq!(writes.records.len(), 2);
    assert_eq!(writes.records[1].seq_num, 1);
    assert_eq!(writes.records[1].part_id, None);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&writes.records[1].body).expect("JSON"),
        json!({"kind": "message",
               "payload": {"chatId": "chat", "trigger": "close", "closedReason": "done"}})
    );
}

fn close_by(id: u128, calling_run_id: Option<Uuid>) -> Command {
    Command {
        id: Uuid::from_u128(id),
        environment_id: ENV,
        session_id: SESSION,
        accepted_at: now(),
        wants_reply: true,
        body: CommandBody::CloseSession(CloseSessionCommand {
            reason: None,
            calling_run_id,
        }),
    }
}

#[test]
fn the_close_message_wakes_a_waiting_run_unless_that_run_closed_the_session() {
    let current_run = Uuid::from_u128(500);
    let session = Session {
        current_run_id: Some(current_run),
        ..stored_session()
    };
    let (writes, _) = plan_batch(
        &[register(20, None), close_by(30, Some(Uuid::from_u128(999)))],
        state_with(Some(session.clone())),
    );
    assert_eq!(
        writes.records.len(),
        1,
        "another run's close appends the message"
    );
    assert_eq!(writes.waitpoint_completions.len(), 1);
    assert_eq!(
        writes.waitpoint_completions[0].output,
        writes.records[0].body
    );
    assert_eq!(writes.waitpoint_completions[0].completed_by_seq, Some(0));
    assert!(writes.records[0].body.contains(r#""chatId":"chat""#));
    assert!(!writes.records[0].body.contains("closedReason"));

    let (writes, _) = plan_batch(
        &[register(20, None), close_by(30, Some(current_run))],
        state_with(Some(session)),
    );
    assert!(writes.records.is_empty(), "the closing run gets no message");
    assert!(writes.waitpoint_completions.is_empty());
}

#[test]
fn a_cached_create_refreshes_the_trigger_config_only() {
    let mut again = create(2);
    if let CommandBody::CreateSession(create) = &mut again.body {
        create.trigger_config = json!({"basePayload": {"v": 2}});
        create.tags = vec!["ignored".into()];
    }
    let (writes, outcomes) = plan_batch(&[again], state_with(Some(stored_session())));
    let Outcome::SessionCreated {
        session, cached, ..
    } = &outcomes[0]
    else {
        panic!("expected a create outcome, got {:?}", outcomes[0]);
    };
    assert!(cached);
    assert_eq!(session.trigger_config, json!({"basePayload": {"v": 2}}));
    assert!(session.tags.is_empty(), "tags are not written through");
    assert_eq!(writes.updated_sessions.len(), 1);
    assert_eq!(
        writes.updated_sessions[0].trigger_config,
        json!({"basePayload": {"v": 2}})
    );
    assert!(writes.runs.is_empty() && writes.outbox.is_empty());
}

fn register(id: u128, last_seq_num: Option<i64>) -> Command {
    Command {
        id: Uuid::from_u128(id),
        environment_id: ENV,
        session_id: SESSION,
        accepted_at: now(),
        wants_reply: true,
        body: CommandBody::RegisterWaitpoint(Box::new(RegisterWaitpointCommand {
            waitpoint_id: Uuid::from_u128(id + 1000),
            friendly_id: format!("waitpoint_{id}"),
            environment_public_id: "env_x".into(),
            run_id: Uuid::from_u128(500),
            run_friendly_id: "run_x".into(),
            session_friendly_id: "session_a".into(),
            io: Io::In,
            last_seq_num,
            timeout_at: None,
            tags: vec![],
            idempotency_key: None,
            idempotency_key_expires_at: None,
        })),
    }
}

#[test]
fn a_waitpoint_completes_with_the_next_record_and_only_once() {
    let commands = vec![
        append(10, Io::In, None, "before"),
        register(20, None),
        append(11, Io::Out, None, "other channel"),
        append(12, Io::In, None, "next"),
        append(13, Io::In, None, "later"),
    ];
    let (writes, outcomes) = plan_batch(&commands, state_with(Some(stored_session())));
    assert!(matches!(
        &outcomes[1],
        Outcome::WaitpointRegistered { cached: false, .. }
    ));
    assert_eq!(writes.new_waitpoints.len(), 1);
    assert_eq!(writes.new_waitpoints[0].after_seq, 0);
    assert_eq!(writes.waitpoint_completions.len(), 1);
    let completion = &writes.waitpoint_completions[0];
    assert_eq!(completion.output, "next");
    assert_eq!(completion.completed_by_seq, Some(1));
    assert_eq!(completion.status, WaitpointStatus::Completed);
    assert_eq!(completion.event.routing_key, WAITPOINT_COMPLETED);
}

#[test]
fn registering_after_the_record_completes_at_once_with_it() {
    let commands = vec![
        append(10, Io::In, None, "r0"),
        append(11, Io::In, None, "r1"),
        register(20, Some(0)),
    ];
    let (writes, _) = plan_batch(&commands, state_with(Some(stored_session())));
    assert_eq!(writes.waitpoint_completions.len(), 1);
    assert_eq!(writes.waitpoint_completions[0].output, "r1");
    // From the database when the record is older than the batch.
    let mut session = stored_session();
    session.next_seq_in = 3;
    let mut state = state_with(Some(session));
    state
        .record_bodies
        .insert((SESSION, Io::In, 2), "stored r2".into());
    let (writes, _) = plan_batch(&[register(20, Some(1))], state);
    assert_eq!(writes.waitpoint_completions[0].output, "stored r2");
}

#[test]
fn replays_never_complete_later_waitpoints_and_conflicts_complete_nothing() {
    let commands = vec![
        append(10, Io::In, Some("p"), "original"),
        register(20, None),
        append(11, Io::In, Some("p"), "original"),
        append(12, Io::In, Some("p"), "different"),
    ];
    let (writes, outcomes) = plan_batch(&commands, state_with(Some(stored_session())));
    assert_eq!(outcomes[2], Outcome::Duplicate { seq_num: 0 });
    assert_eq!(outcomes[3], Outcome::Conflict { seq_num: 0 });
    assert!(writes.waitpoint_completions.is_empty());
}

#[test]
fn a_duplicate_drains_waitpoints_left_waiting_with_the_stored_body() {
    // A crash left a waitpoint waiting although its record (seq 0) was persisted.
    let mut session = stored_session();
    session.next_seq_in = 1;
    let mut state = state_with(Some(session));
    state.parts.insert(
        DedupKey {
            environment_id: ENV,
            session_id: SESSION,
            stream: Stream::reserved(Io::In),
            part_id: "p".into(),
        },
        PartOwner {
            seq_num: 0,
            body_fingerprint: body_fingerprint("stored"),
            body: "stored".into(),
        },
    );
    let (mut writes, _) = plan_batch(
        &[register(20, Some(-1))],
        state_with(Some(stored_session())),
    );
    let mut waiting = writes.new_waitpoints.remove(0);
    waiting.after_seq = -1;
    state
        .waiting_waitpoints
        .insert((SESSION, Io::In), vec![waiting]);
    let (writes, outcomes) = plan_batch(&[append(11, Io::In, Some("p"), "stored")], state);
    assert_eq!(outcomes, vec![Outcome::Duplicate { seq_num: 0 }]);
    assert_eq!(writes.waitpoint_completions.len(), 1);
    assert_eq!(writes.waitpoint_completions[0].output, "stored");
}

#[test]
fn appends_answered_before_the_api_could_know_of_a_close_are_written() {
    let closed_at = now();
    let mut closed = stored_session();
    closed.closed_at = Some(closed_at);
    let accepted = |offset_ms: i64| {
        let mut command = append(10, Io::In, None, "late");
        command.accepted_at = closed_at + TimeDelta::milliseconds(offset_ms);
        command
    };
    // Accepted before the close was applied: written, whatever the grace.
    let (_, outcomes) = plan_batch(&[accepted(-1)], state_with(Some(closed.clone())));
    assert_eq!(outcomes, vec![Outcome::Appended { seq_num: 0 }]);
    // Within the api's session cache TTL after the close: written.
    let mut state = state_with(Some(closed.clone()));
    state.close_grace = TimeDelta::seconds(1);
    let (writes, outcomes) = plan_batch(&[accepted(500)], state);
    assert_eq!(outcomes, vec![Outcome::Appended { seq_num: 0 }]);
    assert_eq!(writes.records.len(), 1);
    // Past it: no api instance could still believe the session open.
    let mut state = state_with(Some(closed));
    state.close_grace = TimeDelta::seconds(1);
    let (writes, outcomes) = plan_batch(&[accepted(1_000)], state);
    assert!(matches!(outcomes[..], [Outcome::SessionClosed { .. }]));
    assert!(writes.records.is_empty());
}
