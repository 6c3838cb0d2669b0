//! Hostile connections against the real api (loopback only, bounded in count and time): a
//! slowloris (many requests whose headers never finish), and a flood of idle connections past
//! the connection budget. Each checks that the server closes the attacker's connections by
//! itself, within the bound the settings give, and that a legitimate client keeps being served
//! throughout; what that client saw (success rate, p99) is printed for RELIABILITY.md, not
//! asserted as a speed.

use std::time::{Duration, Instant};

use tests::{SpawnOptions, TestApp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How many attacking connections a test may open: its own and the in-process api's file
/// descriptors both count against this process's limit.
fn attack_size(wanted: usize) -> usize {
    let soft_limit = shared::config::open_files_soft_limit().unwrap_or(1024);
    wanted.min(soft_limit.saturating_sub(400) / 2).max(50)
}

/// A legitimate client asking `/healthz` every 20 ms until told to stop: (successes, failures,
/// p99 latency).
async fn legitimate_client(
    app_url: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (usize, usize, Duration) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let (mut ok, mut failed) = (0, 0);
    let mut latencies = Vec::new();
    while !*stop.borrow() {
        let started = Instant::now();
        match client.get(format!("{app_url}/healthz")).send().await {
            Ok(response) if response.status().is_success() => {
                ok += 1;
                latencies.push(started.elapsed());
            }
            _ => failed += 1,
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    latencies.sort();
    let p99 = latencies
        .get(latencies.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or_default();
    (ok, failed, p99)
}

/// Waits until the server closes `stream` (EOF or reset), at most `within`: how long it took.
async fn closed_by_server(mut stream: TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0_u8; 1024];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + within),
            stream.read(&mut buffer),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            // Whatever the server answered (e.g. a 408), keep reading until it closes.
            Ok(Ok(_)) => {}
        }
    }
}

fn address(app: &TestApp) -> String {
    app.address.trim_start_matches("http://").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slowloris_is_closed_within_the_header_timeout_while_others_are_served() {
    const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("SESSIONS_HTTP_HEADER_READ_TIMEOUT_MS", "2000")],
        ..SpawnOptions::default()
    })
    .await;
    let size = attack_size(1_000);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let legitimate = tokio::spawn(legitimate_client(app.address.clone(), stopped));
    let mut attackers = Vec::with_capacity(size);
    for _ in 0..size {
        let mut stream = TcpStream::connect(address(&app)).await.expect("connect");
        // A request head that never ends.
        stream
            .write_all(b"POST /realtime/v1/sessions/x/in/append HTTP/1.1\r\nHost: a\r\n")
            .await
            .expect("write");
        attackers.push(stream);
    }
    let opened = Instant::now();
    let waits: Vec<_> = attackers
        .into_iter()
        .map(|stream| tokio::spawn(closed_by_server(stream, HEADER_TIMEOUT * 5)))
        .collect();
    let mut closed = Vec::with_capacity(size);
    for wait in waits {
        closed.push(wait.await.expect("wait"));
    }
    let all_closed_after = opened.elapsed();
    let _ = stop.send(true);
    let (ok, failed, p99) = legitimate.await.expect("legitimate client");
    let still_open = closed.iter().filter(|closed| closed.is_none()).count();
    let slowest = closed.iter().flatten().max().copied().unwrap_or_default();
    println!(
        "slowloris: {size} half-open requests; all closed by the server after {all_closed_after:?} (slowest {slowest:?}, header timeout {HEADER_TIMEOUT:?}); \
         legitimate client: {ok} ok, {failed} failed, p99 {p99:?}"
    );
    assert_eq!(still_open, 0, "the server closed every half-open request");
    assert!(
        slowest >= HEADER_TIMEOUT.mul_f64(0.9),
        "not before the header timeout: {slowest:?}"
    );
    assert_eq!(failed, 0, "the legitimate client was served throughout");
    assert!(ok > 0);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_the_budget_are_closed_at_once_and_idle_ones_evicted_under_pressure() {
    const BUDGET: usize = 100;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[
            ("SESSIONS_MAX_CONNECTIONS", "100"),
            ("SESSIONS_HTTP_HEADER_READ_TIMEOUT_MS", "5000"),
        ],
        ..SpawnOptions::default()
    })
    .await;
    let size = attack_size(3 * BUDGET);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // The legitimate client's keep-alive connection exists before the flood.
    let legitimate = tokio::spawn(legitimate_client(app.address.clone(), stopped));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut attackers = Vec::with_capacity(size);
    for _ in 0..size {
        // Connections that send nothing at all.
        attackers.push(TcpStream::connect(address(&app)).await.expect("connect"));
    }
    let opened = Instant::now();
    let waits: Vec<_> = attackers
        .into_iter()
        .map(|stream| tokio::spawn(closed_by_server(stream, HEADER_TIMEOUT * 4)))
        .collect();
    let mut closed = Vec::with_capacity(size);
    for wait in waits {
        closed.push(wait.await.expect("wait"));
    }
    let all_closed_after = opened.elapsed();
    // Once the flood is gone, a new client is served at once.
    let fresh = reqwest::Client::new()
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("a new connection after the flood");
    assert!(fresh.status().is_success());
    let _ = stop.send(true);
    let (ok, failed, p99) = legitimate.await.expect("legitimate client");
    let at_once = closed
        .iter()
        .flatten()
        .filter(|after| **after < Duration::from_millis(500))
        .count();
    let under_pressure = closed
        .iter()
        .flatten()
        .filter(|after| **after >= Duration::from_millis(500) && **after < Duration::from_secs(2))
        .count();
    let still_open = closed.iter().filter(|closed| closed.is_none()).count();
    let slowest = closed.iter().flatten().max().copied().unwrap_or_default();
    println!(
        "connection flood: {size} idle connections against a budget of {BUDGET}: {at_once} closed at once, \
         {under_pressure} evicted under pressure (after ~1 s), the rest at the header timeout ({HEADER_TIMEOUT:?}); \
         all closed after {all_closed_after:?} (slowest {slowest:?}); legitimate client: {ok} ok, {failed} failed, p99 {p99:?}"
    );
    assert_eq!(still_open, 0, "the server closed every idle connection");
    assert!(
        at_once >= size - BUDGET,
        "connections past the budget are closed at once ({at_once} of {size})"
    );
    assert!(
        under_pressure > 0,
        "admitted idle connections are evicted under pressure before the header timeout"
    );
    assert!(
        slowest < HEADER_TIMEOUT + Duration::from_secs(3),
        "every idle connection is closed by the header timeout at the latest: {slowest:?}"
    );
    assert_eq!(failed, 0, "the legitimate client was served throughout");
    app.cleanup().await;
}

/// Opens an SSE stream on `out` of `session` with `credential`: the response (headers only).
async fn open_stream(app: &TestApp, session: &str, credential: &str) -> reqwest::Response {
    app.client
        .get(app.url(&format!("/realtime/v1/sessions/{session}/out")))
        .bearer_auth(credential)
        .header("Accept", "text/event-stream")
        .header("Timeout-Seconds", "60")
        .send()
        .await
        .expect("SSE request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_past_a_tokens_or_an_environments_cap_get_429_and_others_are_unaffected() {
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[
            ("SESSIONS_MAX_SSE_PER_TOKEN", "3"),
            ("SESSIONS_MAX_SSE_PER_ENVIRONMENT", "5"),
        ],
        ..SpawnOptions::default()
    })
    .await;
    let created = app.create_session("sse-cap").await;
    let token = created["publicAccessToken"]
        .as_str()
        .expect("a session token")
        .to_owned();
    let mut held = Vec::new();
    for _ in 0..3 {
        let stream = open_stream(&app, "sse-cap", &token).await;
        assert_eq!(stream.status().as_u16(), 200);
        held.push(stream);
    }
    let refused = open_stream(&app, "sse-cap", &token).await;
    assert_eq!(refused.status().as_u16(), 429, "the token's fourth stream");
    assert!(refused.headers().contains_key("retry-after"));
    let error: serde_json::Value = refused.json().await.expect("JSON error");
    assert!(error["error"].is_string());
    // The secret key counts against the environment only: two more fill it (3 + 2 = 5).
    for _ in 0..2 {
        let stream = open_stream(&app, "sse-cap", &app.secret_key).await;
        assert_eq!(stream.status().as_u16(), 200);
        held.push(stream);
    }
    assert_eq!(
        open_stream(&app, "sse-cap", &app.secret_key)
            .await
            .status()
            .as_u16(),
        429,
        "the environment's sixth stream"
    );
    // Another environment is not affected.
    let other_key = app.create_environment("sse-cap-other").await;
    app.create_session_as(&other_key, "sse-cap").await;
    assert_eq!(
        open_stream(&app, "sse-cap", &other_key)
            .await
            .status()
            .as_u16(),
        200
    );
    // A stream that ends gives its slot back.
    drop(held.remove(0));
    let started = Instant::now();
    loop {
        let stream = open_stream(&app, "sse-cap", &token).await;
        if stream.status().is_success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the slot of a closed stream came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
    app.cleanup().await;
}

/// The HTTP/2 rapid-reset attack (CVE-2023-44487): a client opens streams and resets each at
/// once, as fast as it can, on h2c connections, for a few seconds, reconnecting whenever the
/// server closes one. The api bounds the streams a client resets (h2's limits; past them the
/// connection is closed) and the streams open at once; the test checks that the server closes
/// the flooding connections, stays up and serves a legitimate client throughout, and prints
/// what the attacker achieved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http2_rapid_reset_flood_is_cut_off_and_others_are_served() {
    const FLOOD: Duration = Duration::from_secs(3);
    let app = TestApp::spawn().await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let legitimate = tokio::spawn(legitimate_client(app.address.clone(), stopped));
    let uri = format!("{}/healthz", app.address);
    let started = Instant::now();
    let (mut resets, mut connections, mut closed_by_server) = (0_usize, 0_usize, 0_usize);
    while started.elapsed() < FLOOD {
        let tcp = TcpStream::connect(address(&app)).await.expect("connect");
        let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
        let connection = tokio::spawn(connection);
        connections += 1;
        let mut cut_off = false;
        while started.elapsed() < FLOOD {
            let Ok(ready) = client.clone().ready().await else {
                cut_off = true;
                break;
            };
            client = ready;
            let request = http::Request::get(&uri).body(()).expect("request");
            let Ok((_response, mut stream)) = client.send_request(request, false) else {
                cut_off = true;
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            resets += 1;
            if resets % 100 == 0 {
                // Let the legitimate client and the server's other tasks run.
                tokio::task::yield_now().await;
            }
        }
        closed_by_server += usize::from(cut_off);
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    }
    // The api still answers new connections after the flood.
    let after = reqwest::Client::new()
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("a new connection after the flood");
    assert!(after.status().is_success());
    let _ = stop.send(true);
    let (ok, failed, p99) = legitimate.await.expect("legitimate client");
    println!(
        "rapid reset: {resets} streams opened and reset over {connections} h2c connections in {FLOOD:?}, \
         {closed_by_server} of them closed by the server; legitimate client: {ok} ok, {failed} failed, p99 {p99:?}"
    );
    assert!(
        closed_by_server > 0,
        "the server cuts off a connection that keeps resetting streams"
    );
    assert_eq!(failed, 0, "the legitimate client was served throughout");
    assert!(ok > 0);
    app.cleanup().await;
}
