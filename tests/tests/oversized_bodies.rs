//! Bodies over the limit reach their 413 (README, "Refused request bodies"):
//!
//! - Node's own fetch (undici, what the official client uses) sends appends of 1 MiB + 1 byte and
//!   of 8 MiB, 50 times each, and oversized bodies to the JSON routes and the snapshot blob
//!   route (`tests/js/oversized.test.mjs`): every one is answered 413 with the JSON error and the
//!   CORS header, none ends in a network error.
//! - Over raw connections: a refused body within `SESSIONS_MAX_DISCARD_BYTES` is read before the
//!   answer and the connection stays usable; a sender that declares a large body and then sends
//!   nothing, or one byte per second, is answered within `SESSIONS_DISCARD_TIMEOUT_MS` and its
//!   connection closed; a body declared beyond the discard bound is answered at once and its
//!   connection closed within the time bound.

use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{SpawnOptions, TestApp};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1024 * 1024;

/// The discard time bound of the raw-connection tests (the default is 10 s).
const DISCARD_TIMEOUT: Duration = Duration::from_secs(2);

/// How much later than the bound an answer may come on a busy machine.
const MARGIN: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_fetch_receives_every_413_with_its_json_body_and_cors_headers() {
    let app = TestApp::spawn().await;
    let run = tests::node::run_suite("oversized.test.mjs", &app.address, &app.secret_key).await;
    app.cleanup().await;
    let stdout = run.stdout;
    assert!(
        stdout.contains("append: 100 of 100 answered 413"),
        "every oversized append was answered 413"
    );
    assert!(run.passed, "every oversized-body test passed");
}

/// One HTTP/1.1 response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.as_str())
    }

    /// A 413 as every refusal must look: JSON `{"error"}` and the CORS header.
    fn assert_is_413_with_json_and_cors(&self) {
        assert_eq!(self.status, 413, "{self:?}");
        assert_eq!(
            self.header("access-control-allow-origin"),
            Some("*"),
            "{self:?}"
        );
        assert!(
            self.header("content-type")
                .is_some_and(|value| value.starts_with("application/json")),
            "{self:?}"
        );
        let body: Value = serde_json::from_slice(&self.body).expect("a JSON body");
        assert!(
            body["error"].as_str().is_some_and(|text| !text.is_empty()),
            "{body}"
        );
    }
}

/// Reads one response (head and a `content-length` body) within `within`.
async fn read_response(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> RawResponse {
    tokio::time::timeout(within, async {
        let mut buffer = Vec::new();
        let mut chunk = [0_u8; 8192];
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                break end;
            }
            let read = stream.read(&mut chunk).await.expect("read the answer");
            assert!(read > 0, "the connection closed without an answer");
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0);
        let mut body = buffer[head_end + 4..].to_vec();
        while body.len() < length {
            let read = stream.read(&mut chunk).await.expect("read the body");
            assert!(read > 0, "the connection closed inside the body");
            body.extend_from_slice(&chunk[..read]);
        }
        body.truncate(length);
        RawResponse {
            status,
            headers,
            body,
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no answer within {within:?}"))
}

/// Waits until the server closed the connection (end of stream or a reset), within `within`.
async fn assert_closed_within(stream: &mut (impl AsyncRead + Unpin), within: Duration) {
    let closed = tokio::time::timeout(within, async {
        let mut chunk = [0_u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection is still open after {within:?}"
    );
}

/// A connection with the head of an append that declares `length` bytes already sent.
async fn append_head(app: &TestApp, session: &str, length: u64) -> TcpStream {
    let host = app.address.trim_start_matches("http://");
    let mut stream = TcpStream::connect(host).await.expect("connect");
    let head = format!(
        "POST /realtime/v1/sessions/{session}/in/append HTTP/1.1\r\nHost: {host}\r\n\
         Authorization: Bearer {}\r\nContent-Type: text/plain\r\n\
         Origin: http://app.example.test\r\nContent-Length: {length}\r\n\r\n",
        app.secret_key
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    stream
}

async fn spawn_with_short_discard_timeout() -> TestApp {
    let timeout = DISCARD_TIMEOUT.as_millis().to_string();
    TestApp::spawn_with(SpawnOptions {
        overrides: &[("SESSIONS_DISCARD_TIMEOUT_MS", &timeout)],
        ..SpawnOptions::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_body_within_the_bound_is_read_before_the_answer_and_the_connection_stays() {
    let app = spawn_with_short_discard_timeout().await;
    app.create_session("keeps").await;
    for length in [MIB + 1, 8 * MIB] {
        let mut stream = append_head(&app, "keeps", length).await;
        let body = vec![b'x'; usize::try_from(length).expect("fits")];
        // The whole body goes through: nothing resets the connection while it is sent.
        stream.write_all(&body).await.expect("send the whole body");
        let response = read_response(&mut stream, DISCARD_TIMEOUT + MARGIN).await;
        response.assert_is_413_with_json_and_cors();
        assert_eq!(response.header("connection"), None, "{response:?}");
        // The same connection serves the next request.
        let host = app.address.trim_start_matches("http://");
        stream
            .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .expect("send the next request");
        let next = read_response(&mut stream, MARGIN).await;
        assert_eq!(next.status, 200, "{next:?}");
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_declares_a_large_body_and_sends_nothing_is_answered_within_the_bound() {
    let app = spawn_with_short_discard_timeout().await;
    let started = Instant::now();
    let mut stream = append_head(&app, "silent", 8 * MIB).await;
    let response = read_response(&mut stream, DISCARD_TIMEOUT + MARGIN).await;
    let answered = started.elapsed();
    response.assert_is_413_with_json_and_cors();
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    assert_closed_within(&mut stream, MARGIN).await;
    println!("a silent sender was answered after {answered:?} and its connection closed");
    // It got the discard time to send, and not much more.
    assert!(answered >= DISCARD_TIMEOUT - Duration::from_millis(100));
    assert!(answered <= DISCARD_TIMEOUT + MARGIN);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_of_one_byte_per_second_is_answered_within_the_bound() {
    let app = spawn_with_short_discard_timeout().await;
    let started = Instant::now();
    let stream = append_head(&app, "trickle", 8 * MIB).await;
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        let mut sent = 0_u32;
        // Until the server closes the connection (a failed write), for 60 s at most.
        while sent < 60 && writer.write_all(b"x").await.is_ok() {
            sent += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        sent
    });
    let response = read_response(&mut reader, DISCARD_TIMEOUT + MARGIN).await;
    let answered = started.elapsed();
    response.assert_is_413_with_json_and_cors();
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    assert!(answered <= DISCARD_TIMEOUT + MARGIN, "{answered:?}");
    assert_closed_within(&mut reader, MARGIN).await;
    let sent = tokio::time::timeout(Duration::from_secs(10), trickle)
        .await
        .expect("the server stopped taking bytes")
        .expect("trickle task");
    println!("a trickling sender was answered after {answered:?}; it sent {sent} bytes");
    assert!(sent < 10, "the connection was held for {sent} s");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_declared_beyond_the_discard_bound_is_answered_at_once_and_closed_within_the_bound()
{
    let app = spawn_with_short_discard_timeout().await;
    // The default discard bound is 16 MiB.
    let started = Instant::now();
    let mut stream = append_head(&app, "huge", 100 * MIB).await;
    let response = read_response(&mut stream, MARGIN).await;
    let answered = started.elapsed();
    response.assert_is_413_with_json_and_cors();
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    assert!(answered < DISCARD_TIMEOUT, "answered after {answered:?}");
    assert_closed_within(&mut stream, DISCARD_TIMEOUT + MARGIN).await;
    println!(
        "a 100 MiB declaration was answered after {answered:?}, closed after {:?}",
        started.elapsed()
    );
    app.cleanup().await;
}
