//! Records with headers, control records and `X-Peek-Settled`, end to end: the commands are
//! submitted to the session's partition log exactly as an api instance publishes them (the
//! writer endpoint that will produce them from HTTP is not built yet), applied by the worker,
//! and read back through the records route and SSE.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::broker::{BrokerConfig, BrokerLink};
use shared::commands::{AppendCommand, Command, CommandBody, Envelope};
use shared::domain::Io;
use shared::domain::partition::partition_of;
use tests::TestApp;
use tests::sse::{SseEvent, SseReader};

const WAIT: Duration = Duration::from_secs(20);

fn header(name: &str, value: &str) -> (String, String) {
    (name.to_owned(), value.to_owned())
}

/// Every event of an SSE answer until it ends (`true`) or `wait` passes without one (`false`).
async fn events_until_end(response: reqwest::Response, wait: Duration) -> (Vec<SseEvent>, bool) {
    let mut reader = SseReader::new(response);
    let mut events = Vec::new();
    loop {
        match reader.next_event(wait).await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => return (events, true),
            Err(_) => return (events, false),
        }
    }
}

/// The records route's answer for `out` of `session` once it lists `count` records (or after
/// [`WAIT`]). (Raw JSON: the harness's typed reader expects string data only.)
async fn listed_when(app: &TestApp, session: &str, count: usize) -> Value {
    let url = app.url(&format!("/realtime/v1/sessions/{session}/out/records"));
    let deadline = Instant::now() + WAIT;
    loop {
        let answer: Value = app
            .client
            .get(&url)
            .bearer_auth(&app.secret_key)
            .send()
            .await
            .expect("records")
            .json()
            .await
            .expect("json");
        let complete = answer["records"]
            .as_array()
            .is_some_and(|r| r.len() >= count);
        if complete || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn batch_records(events: &[SseEvent]) -> Vec<Value> {
    events
        .iter()
        .filter(|event| event.event == "batch")
        .flat_map(|event| {
            serde_json::from_str::<Value>(&event.data).expect("batch JSON")["records"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn headers_control_records_and_peek_settled_reach_readers_as_the_client_expects() {
    let app = TestApp::spawn().await;
    app.create_session("agent-turn").await;
    let session = app.session_row("agent-turn").await;
    let append = |part_id: Option<&str>, body: &str, headers: Vec<(String, String)>| {
        Command::new(
            session.environment_id,
            session.id,
            chrono::Utc::now(),
            CommandBody::Append(AppendCommand {
                io: Io::Out,
                channel: None,
                part_id: part_id.map(str::to_owned),
                body: body.to_owned(),
                headers,
                body_is_envelope: false,
            }),
        )
    };
    let commands = vec![
        append(Some("chunk-1"), "hello", vec![header("x-kind", "text")]),
        append(None, "", vec![header("trigger-control", "turn-complete")]),
        append(None, "", vec![header("", "trim")]),
    ];
    let envelope = Envelope::new(commands);
    assert_eq!(envelope.version, 2, "headers need a worker that keeps them");
    let link = BrokerLink::new(
        BrokerConfig::from_settings(&app.settings, "headers-test".into(), None),
        None,
    );
    link.publish_commands(
        partition_of(session.id, app.settings.partitions),
        "headers-1",
        None,
        &envelope.encode(),
    )
    .await
    .expect("publish");

    // The records route: headers where there are any, the control record as data "" / id "",
    // the command record skipped.
    let records = listed_when(&app, "agent-turn", 2).await;
    assert_eq!(
        records,
        json!({"records": [
            {"data": "hello", "id": "chunk-1", "seqNum": 0, "headers": [["x-kind", "text"]]},
            {"data": "", "id": "", "seqNum": 1, "headers": [["trigger-control", "turn-complete"]]},
        ]})
    );

    // SSE passes all three through, each with its headers; the bodiless ones have no body.
    let (events, _) = events_until_end(
        app.subscribe("agent-turn", "out", &[("Timeout-Seconds", "1")])
            .await,
        Duration::from_secs(5),
    )
    .await;
    let streamed = batch_records(&events);
    assert_eq!(streamed.len(), 3, "{streamed:?}");
    assert_eq!(
        streamed[0]["body"],
        json!(r#"{"data":"hello","id":"chunk-1"}"#)
    );
    assert_eq!(streamed[0]["headers"], json!([["x-kind", "text"]]));
    assert_eq!(streamed[1].get("body"), None);
    assert_eq!(
        streamed[1]["headers"],
        json!([["trigger-control", "turn-complete"]])
    );
    assert_eq!(streamed[2]["headers"], json!([["", "trim"]]));
    assert_eq!(streamed[2]["seq_num"], json!(2));

    // X-Peek-Settled: the last record that is not a command record ends the turn, so the answer
    // says so and ends at once (Timeout-Seconds would hold it for 60 s), after sending what is
    // past the cursor.
    let started = Instant::now();
    let peek = app
        .subscribe(
            "agent-turn",
            "out",
            &[
                ("X-Peek-Settled", "1"),
                ("Last-Event-ID", "0"),
                ("Timeout-Seconds", "60"),
            ],
        )
        .await;
    assert_eq!(peek.status(), 200);
    assert_eq!(
        peek.headers()
            .get("x-session-settled")
            .and_then(|value| value.to_str().ok()),
        Some("true")
    );
    let (events, ended) = events_until_end(peek, Duration::from_secs(10)).await;
    assert!(ended, "a settled answer ends by itself");
    assert!(started.elapsed() < Duration::from_secs(10));
    let seqs: Vec<Value> = batch_records(&events)
        .iter()
        .map(|record| record["seq_num"].clone())
        .collect();
    assert_eq!(seqs, [json!(1), json!(2)]);

    // A record after the turn: no longer settled; the stream waits as usual.
    assert_eq!(
        app.append("agent-turn", "out", "next turn", None)
            .await
            .status(),
        200
    );
    let deadline = Instant::now() + WAIT;
    while app.records("agent-turn", "out").await.len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let open = app
        .subscribe(
            "agent-turn",
            "out",
            &[("X-Peek-Settled", "1"), ("Timeout-Seconds", "1")],
        )
        .await;
    assert_eq!(open.headers().get("x-session-settled"), None);
    let (_, ended) = events_until_end(open, Duration::from_secs(10)).await;
    assert!(ended);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "an unsettled peek waits until its deadline"
    );
    // Only `out` is peeked.
    let on_in = app
        .subscribe(
            "agent-turn",
            "in",
            &[("X-Peek-Settled", "1"), ("Timeout-Seconds", "1")],
        )
        .await;
    assert_eq!(on_in.headers().get("x-session-settled"), None);
    app.cleanup().await;
}

/// A record whose body is the writer's envelope `{"data": <chunk>, "id": <id>}` is unwrapped by
/// the records route (the chunk as a JSON value) and streamed as it is; a raw append whose text
/// merely looks like an envelope stays the string it is, with its own part id.
#[tokio::test]
async fn enveloped_bodies_are_unwrapped_and_raw_text_never_is() {
    let app = TestApp::spawn().await;
    app.create_session("writer").await;
    let session = app.session_row("writer").await;
    let envelope = r#"{"data":{"type":"text-delta","delta":"Hi"},"id":"Xk3d9Qa"}"#;
    let command = Command::new(
        session.environment_id,
        session.id,
        chrono::Utc::now(),
        CommandBody::Append(AppendCommand {
            io: Io::Out,
            channel: None,
            part_id: Some("Xk3d9Qa".into()),
            body: envelope.into(),
            headers: Vec::new(),
            body_is_envelope: true,
        }),
    );
    let message = Envelope::new(vec![command]);
    assert_eq!(
        message.version, 2,
        "an enveloped body needs a worker that knows it"
    );
    BrokerLink::new(
        BrokerConfig::from_settings(&app.settings, "envelope-test".into(), None),
        None,
    )
    .publish_commands(
        partition_of(session.id, app.settings.partitions),
        "envelope-1",
        None,
        &message.encode(),
    )
    .await
    .expect("publish");
    let lookalike = r#"{"data":"not a chunk","id":"forged"}"#;
    listed_when(&app, "writer", 1).await;
    assert_eq!(
        app.append("writer", "out", lookalike, Some("raw-1"))
            .await
            .status(),
        200
    );
    let listed = listed_when(&app, "writer", 2).await;
    assert_eq!(
        listed,
        json!({"records": [
            {"data": {"type": "text-delta", "delta": "Hi"}, "id": "Xk3d9Qa", "seqNum": 0},
            {"data": lookalike, "id": "raw-1", "seqNum": 1},
        ]})
    );
    let (events, _) = events_until_end(
        app.subscribe("writer", "out", &[("Timeout-Seconds", "1")])
            .await,
        Duration::from_secs(5),
    )
    .await;
    let bodies: Vec<Value> = batch_records(&events)
        .iter()
        .map(|record| record["body"].clone())
        .collect();
    assert_eq!(
        bodies,
        [
            json!(envelope),
            json!(json!({"data": lookalike, "id": "raw-1"}).to_string()),
        ]
    );
    app.cleanup().await;
}
