//! The writer endpoint over the wire, driven by a client that speaks S2's protocol as the
//! official SDK does (HTTP/2 with prior knowledge, `s2s/proto` frames; REST over HTTP/1.1):
//! acks in order with contiguous seqNums, every kind of bad frame refused with a terminal error
//! and nothing written, REST limits, the idle cut, and a stopped worker answered with a
//! retryable error in time (the official client gives up on an ack after 5 s) and the batch it
//! then sends again applied once. The SDK itself drives the same endpoint in
//! `tests/js/writer.test.mjs`; tokens are in the authorization matrix.

use std::time::{Duration, Instant};

use api::s2_wire::{
    AppendAck, AppendInput, AppendRecord, Header, ServerFrame as WireFrame, frame,
    take_server_frame,
};
use bytes::Bytes;
use prost::Message;
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};
use tests::{InProcessWorker, SpawnOptions, TestApp, encode_segment, without_worker};
use tokio::sync::mpsc;

/// A stream of `session` initialized with the secret key: (writer token, stream name).
async fn initialize(app: &TestApp, session: &str, io: &str) -> (String, String) {
    let response = app
        .client
        .put(app.url(&format!(
            "/realtime/v1/sessions/{}/{io}",
            encode_segment(session)
        )))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("initialize");
    assert_eq!(response.status().as_u16(), 202);
    let header = |name: &str| {
        response.headers()[name]
            .to_str()
            .expect("ascii header")
            .to_owned()
    };
    assert_eq!(header("x-s2-endpoint"), format!("{}/s2/v1", app.address));
    (header("x-s2-access-token"), header("x-s2-stream-name"))
}

fn records_url(app: &TestApp, stream_name: &str) -> String {
    records_url_at(&app.address, stream_name)
}

/// The records URL of `stream_name` on the api at `address`.
fn records_url_at(address: &str, stream_name: &str) -> String {
    format!(
        "{address}/s2/v1/streams/{}/records",
        encode_segment(stream_name)
    )
}

fn data_record(text: &str) -> AppendRecord {
    AppendRecord {
        timestamp: None,
        headers: Vec::new(),
        body: json!({ "data": text, "id": text }).to_string().into_bytes(),
    }
}

fn input(records: Vec<AppendRecord>) -> AppendInput {
    AppendInput {
        records,
        match_seq_num: None,
        fencing_token: None,
    }
}

fn input_frame(records: Vec<AppendRecord>) -> Bytes {
    frame(0, &input(records).encode_to_vec())
}

/// An open append session: frames go in through `frames`, the answer's frames come out of
/// `answer`.
struct AppendSession {
    frames: Option<mpsc::Sender<Bytes>>,
    answer: reqwest::Response,
    buffer: Vec<u8>,
}

/// What the server sent: an ack, or a terminal error (status, JSON), or the end of the stream.
#[derive(Debug)]
enum ServerFrame {
    Ack(AppendAck),
    Terminal(u16, Value),
    End,
}

impl AppendSession {
    async fn open(app: &TestApp, token: &str, stream_name: &str) -> Self {
        Self::open_at(&records_url(app, stream_name), token).await
    }

    async fn open_at(url: &str, token: &str) -> Self {
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("h2c client");
        let (frames, outgoing) = mpsc::channel::<Bytes>(16);
        let body = futures_util::stream::unfold(outgoing, |mut outgoing| async move {
            outgoing
                .recv()
                .await
                .map(|frame| (Ok::<_, std::io::Error>(frame), outgoing))
        });
        let answer = client
            .post(url)
            .bearer_auth(token)
            .header("content-type", "s2s/proto")
            .header("accept", "application/protobuf")
            .header("s2-basin", "sessions")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .expect("append session");
        assert_eq!(answer.version(), reqwest::Version::HTTP_2);
        assert_eq!(answer.status().as_u16(), 200, "answered at once");
        Self {
            frames: Some(frames),
            answer,
            buffer: Vec::new(),
        }
    }

    async fn send(&self, bytes: Bytes) {
        if let Some(frames) = &self.frames {
            let _ = frames.send(bytes).await;
        }
    }

    /// The client's END_STREAM.
    fn finish(&mut self) {
        self.frames = None;
    }

    async fn next(&mut self, within: Duration) -> ServerFrame {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match take_server_frame(&mut self.buffer).expect("a well-formed frame") {
                Some(WireFrame::Ack(ack)) => return ServerFrame::Ack(ack),
                Some(WireFrame::Terminal(status, error)) => {
                    return ServerFrame::Terminal(status, error);
                }
                None => {}
            }
            match tokio::time::timeout_at(deadline, self.answer.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.extend_from_slice(&chunk),
                Ok(Ok(None)) | Ok(Err(_)) => return ServerFrame::End,
                Err(_) => panic!("no frame from the server within {within:?}"),
            }
        }
    }
}

fn positions(ack: &AppendAck) -> (u64, u64, u64) {
    let seq = |position: &Option<api::s2_wire::StreamPosition>| {
        position
            .as_ref()
            .expect("every position is present")
            .seq_num
    };
    (seq(&ack.start), seq(&ack.end), seq(&ack.tail))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_session_acknowledges_each_frame_in_order_with_contiguous_seq_nums() {
    let app = TestApp::spawn().await;
    app.create_session("writer-acks").await;
    let (token, stream_name) = initialize(&app, "writer-acks", "out").await;
    let mut session = AppendSession::open(&app, &token, &stream_name).await;
    session.send(input_frame(vec![data_record("a")])).await;
    session
        .send(input_frame(vec![
            data_record("b"),
            data_record("c"),
            data_record("d"),
        ]))
        .await;
    let control = AppendRecord {
        timestamp: None,
        headers: vec![Header {
            name: b"trigger-control".to_vec(),
            value: b"turn-complete".to_vec(),
        }],
        body: Vec::new(),
    };
    let trim = AppendRecord {
        timestamp: None,
        headers: vec![Header {
            name: Vec::new(),
            value: b"trim".to_vec(),
        }],
        body: 2_u64.to_be_bytes().to_vec(),
    };
    session.send(input_frame(vec![control, trim])).await;
    let mut acks = Vec::new();
    for _ in 0..3 {
        match session.next(Duration::from_secs(10)).await {
            ServerFrame::Ack(ack) => acks.push(positions(&ack)),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    assert_eq!(acks, vec![(0, 1, 1), (1, 4, 4), (4, 6, 6)]);
    session.finish();
    assert!(matches!(
        session.next(Duration::from_secs(10)).await,
        ServerFrame::End
    ));
    // Read back over HTTP/1.1 on the same listener: the trim hid seqNums 0 and 1; the command
    // record is not listed.
    let records = app.records("writer-acks", "out").await;
    let listed: Vec<(i64, String)> = records
        .iter()
        .map(|record| (record.seq_num, record.data.clone()))
        .collect();
    assert_eq!(
        listed,
        vec![(2, "c".to_owned()), (3, "d".to_owned()), (4, String::new())]
    );
    // Trim means delete: the worker removes the rows below the trim point (within its 10 s
    // tick), and only those.
    let session_id = app.session_row("writer-acks").await.id;
    let db = sea_orm::Database::connect(&app.settings.database_url)
        .await
        .expect("database");
    let started = Instant::now();
    let stored = loop {
        let rows = db
            .query_all_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT seq_num FROM records WHERE session_id = $1 AND io = 'out' ORDER BY seq_num",
                [session_id.into()],
            ))
            .await
            .expect("records");
        let stored: Vec<i64> = rows
            .iter()
            .map(|row| row.try_get::<i64>("", "seq_num").expect("seq_num"))
            .collect();
        if stored.first() != Some(&0) || started.elapsed() > Duration::from_secs(30) {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        stored,
        vec![2, 3, 4, 5],
        "rows below the trim point deleted, the rest kept"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_end_the_session_with_a_terminal_error_and_write_nothing() {
    let app = TestApp::spawn().await;
    app.create_session("writer-hostile").await;
    let (token, stream_name) = initialize(&app, "writer-hostile", "out").await;
    let too_many = input_frame((0..1_001).map(|n| data_record(&n.to_string())).collect());
    let too_big = input_frame(vec![AppendRecord {
        timestamp: None,
        headers: Vec::new(),
        body: vec![b'x'; 1 << 20],
    }]);
    let not_utf8 = input_frame(vec![AppendRecord {
        timestamp: None,
        headers: Vec::new(),
        body: vec![0xff, 0xfe],
    }]);
    let with_nul = input_frame(vec![AppendRecord {
        timestamp: None,
        headers: Vec::new(),
        body: b"a\0b".to_vec(),
    }]);
    let fence = input_frame(vec![AppendRecord {
        timestamp: None,
        headers: vec![Header {
            name: Vec::new(),
            value: b"fence".to_vec(),
        }],
        body: b"token".to_vec(),
    }]);
    let compressed = frame(0x20, &input(vec![data_record("z")]).encode_to_vec());
    let garbage = frame(0, &[0xff, 0xff, 0xff, 0x01]);
    // Declares 3 MiB: refused from the length prefix, before the body arrives.
    let oversized = Bytes::from_static(&[0x30, 0x00, 0x00, 0x00]);
    let cases: Vec<(&str, Bytes, u16)> = vec![
        ("1,001 records", too_many, 422),
        ("over 1 MiB metered", too_big, 413),
        ("a body that is not UTF-8", not_utf8, 422),
        ("a NUL in a body", with_nul, 422),
        ("an unsupported command record", fence, 422),
        ("a compressed frame", compressed, 422),
        ("a body that is not an AppendInput", garbage, 422),
        ("a frame over 2 MiB", oversized, 413),
    ];
    for (label, bytes, status) in cases {
        let mut session = AppendSession::open(&app, &token, &stream_name).await;
        session.send(bytes).await;
        match session.next(Duration::from_secs(10)).await {
            ServerFrame::Terminal(got, error) => {
                assert_eq!(got, status, "{label}: {error}");
                assert!(error["code"].is_string() && error["message"].is_string());
            }
            other => panic!("{label}: expected a terminal error, got {other:?}"),
        }
        assert!(matches!(
            session.next(Duration::from_secs(10)).await,
            ServerFrame::End
        ));
    }
    // A good frame afterwards is the stream's first record: nothing above was written.
    let mut session = AppendSession::open(&app, &token, &stream_name).await;
    session.send(input_frame(vec![data_record("ok")])).await;
    match session.next(Duration::from_secs(10)).await {
        ServerFrame::Ack(ack) => assert_eq!(positions(&ack), (0, 1, 1)),
        other => panic!("expected an ack, got {other:?}"),
    }
    session.finish();
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_session_that_sends_nothing_is_cut_after_the_idle_timeout() {
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("SESSIONS_WRITER_IDLE_TIMEOUT_MS", "1000")],
        ..SpawnOptions::default()
    })
    .await;
    app.create_session("writer-idle").await;
    let (token, stream_name) = initialize(&app, "writer-idle", "out").await;
    let started = Instant::now();
    let mut session = AppendSession::open(&app, &token, &stream_name).await;
    match session.next(Duration::from_secs(10)).await {
        // 408 is retryable for the official client: a live writer opens a new session.
        ServerFrame::Terminal(status, error) => assert_eq!(status, 408, "{error}"),
        other => panic!("expected a terminal error, got {other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "not before the timeout: {elapsed:?}"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_worker_stopped_a_batch_gets_a_retryable_error_in_time_is_kept_and_applied_once_when_sent_again()
 {
    let app = TestApp::spawn_with(without_worker()).await;
    // The session must exist before the worker stops: create it with a worker running.
    let worker = InProcessWorker::spawn(app.settings.clone()).await;
    app.create_session("writer-outage").await;
    worker.stop().await;
    let (token, stream_name) = initialize(&app, "writer-outage", "out").await;
    let started = Instant::now();
    let mut session = AppendSession::open(&app, &token, &stream_name).await;
    let batch = || input_frame(vec![data_record("kept"), data_record("kept too")]);
    session.send(batch()).await;
    match session.next(Duration::from_secs(10)).await {
        ServerFrame::Terminal(status, error) => {
            assert_eq!(status, 503, "retryable: {error}");
        }
        other => panic!("expected a terminal error, got {other:?}"),
    }
    let waited = started.elapsed();
    println!("retryable error after {waited:?}");
    assert!(
        waited < Duration::from_secs(5),
        "the client's ack timeout is 5 s: {waited:?}"
    );
    // The batch was durable in the partition log: a worker that starts applies it.
    let worker = InProcessWorker::spawn(app.settings.clone()).await;
    let records = app
        .wait_for_records("writer-outage", "out", 2, Duration::from_secs(30))
        .await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].data, "kept");
    // As the official client does after a retryable error: a new append session that sends
    // the batch again, unchanged. It is acknowledged with the seqNums it was written at, and
    // the next batch follows it.
    let mut session = AppendSession::open(&app, &token, &stream_name).await;
    session.send(batch()).await;
    session.send(input_frame(vec![data_record("next")])).await;
    session.finish();
    for expected in [(0, 2, 2), (2, 3, 3)] {
        match session.next(Duration::from_secs(10)).await {
            ServerFrame::Ack(ack) => assert_eq!(positions(&ack), expected),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    let records = app.records("writer-outage", "out").await;
    let data: Vec<_> = records.iter().map(|record| record.data.clone()).collect();
    assert_eq!(data, ["kept", "kept too", "next"]);
    worker.stop().await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_appends_answer_in_their_own_format_and_keep_the_limits() {
    let app = TestApp::spawn().await;
    app.create_session("writer-rest").await;
    let (token, stream_name) = initialize(&app, "writer-rest", "out").await;
    let url = records_url(&app, &stream_name);
    let json_ack: Value = app
        .client
        .post(&url)
        .bearer_auth(&token)
        .json(&json!({ "records": [
            { "body": "", "headers": [["trigger-control", "turn-complete"]] },
        ]}))
        .send()
        .await
        .expect("json append")
        .json()
        .await
        .expect("json ack");
    assert_eq!(json_ack["start"]["seq_num"], 0);
    assert_eq!(json_ack["end"]["seq_num"], 1);
    let response = app
        .client
        .post(&url)
        .bearer_auth(&token)
        .header("content-type", "application/protobuf")
        .body(input(vec![data_record("p")]).encode_to_vec())
        .send()
        .await
        .expect("protobuf append");
    assert_eq!(response.headers()["content-type"], "application/protobuf");
    let ack = AppendAck::decode(response.bytes().await.expect("body")).expect("ack");
    assert_eq!(positions(&ack), (1, 2, 2));
    for (label, content_type, body, status) in [
        (
            "too many records",
            "application/json",
            json!({ "records": (0..1_001).map(|_| json!({ "body": "x" })).collect::<Vec<_>>() })
                .to_string(),
            422,
        ),
        ("not JSON", "application/json", "{".to_owned(), 400),
        ("an unknown content type", "text/plain", "x".to_owned(), 415),
    ] {
        let response = app
            .client
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("append");
        assert_eq!(response.status().as_u16(), status, "{label}");
        let error: Value = response.json().await.expect("JSON error");
        assert!(error["code"].is_string(), "{label}: {error}");
    }
    assert_eq!(app.records("writer-rest", "out").await.len(), 2);
    app.cleanup().await;
}

/// A stopping api does not wait for a writer that keeps its append session open (the official
/// writer keeps it open between chunks for up to the idle timeout): it acknowledges what it took,
/// ends the session with a retryable 503 (the client sends the rest elsewhere), ends its live
/// readers, and every task it spawned (publisher partitions, reply and notification listeners,
/// feeds, SSE pumps, append sessions) has ended when it returns, without using its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_api_ends_open_append_sessions_with_a_retryable_error_and_leaves_no_task() {
    let app = TestApp::spawn().await;
    app.create_session("writer-stop").await;
    let (token, stream_name) = initialize(&app, "writer-stop", "out").await;
    let second = api::Application::build(app.settings.clone())
        .await
        .expect("second api");
    let second_address = format!("http://{}", second.local_addr());
    let tasks = second.state().tasks.clone();
    let stop = shared::shutdown::CancellationToken::new();
    let serving = tokio::spawn(second.run_until_stopped(stop.clone()));
    let reader = app
        .subscribe_at(&second_address, "writer-stop", "out", &[])
        .await;
    assert_eq!(reader.status().as_u16(), 200);
    let mut session =
        AppendSession::open_at(&records_url_at(&second_address, &stream_name), &token).await;
    session
        .send(input_frame(vec![data_record("before the stop")]))
        .await;
    match session.next(Duration::from_secs(10)).await {
        ServerFrame::Ack(ack) => assert_eq!(positions(&ack), (0, 1, 1)),
        other => panic!("expected an ack, got {other:?}"),
    }
    assert!(!tasks.is_empty(), "the api runs tasks while it serves");

    let stopped = Instant::now();
    stop.cancel();
    match session.next(Duration::from_secs(10)).await {
        ServerFrame::Terminal(status, error) => {
            assert_eq!(status, 503, "retryable: {error}");
        }
        other => panic!("expected a terminal error, got {other:?}"),
    }
    let ended = tokio::time::timeout(api::SHUTDOWN_GRACE * 3, serving)
        .await
        .expect("the api stops")
        .expect("join");
    assert!(ended.is_ok());
    let took = stopped.elapsed();
    println!("stopped in {took:?}");
    assert!(
        took < api::SHUTDOWN_GRACE,
        "nothing held the drain until its grace ran out: {took:?}"
    );
    assert_eq!(tasks.len(), 0, "every task the api spawned has ended");
    drop(reader);
    app.cleanup().await;
}
