//! Hostile connections against the real api (loopback only, bounded in count and time): a
//! slowloris (many requests whose headers never finish), slow bodies, a flood of idle
//! connections past the connection budget, SSE streams past their caps and an HTTP/2
//! rapid-reset flood. Each checks that the server ends the attacker's connections by itself,
//! within the bound the settings give, and that a legitimate client keeps being served
//! throughout; what that client saw (success rate, p99) and what the api spent (peak file
//! descriptors, peak memory, CPU time) are printed for RELIABILITY.md, not asserted as speeds.
//!
//! The attacked api runs as its own process (`sessions-api`), so that the descriptors, memory
//! and CPU measured are its own; the in-process app beside it provides the database, the
//! worker and the helpers that create sessions.

use std::time::{Duration, Instant};

use tests::{ChildApi, SpawnOptions, TestApp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How many attacking connections a test may open (each is one of this process's file
/// descriptors; the attacked api's are its own).
fn attack_size(wanted: usize) -> usize {
    let soft_limit = shared::config::open_files_soft_limit().unwrap_or(1024);
    wanted.min(soft_limit.saturating_sub(200)).max(50)
}

/// An api process under attack, beside the in-process app whose database and worker it uses.
struct ApiUnderAttack {
    app: TestApp,
    api: ChildApi,
    /// `http://127.0.0.1:<port>`.
    url: String,
}

impl ApiUnderAttack {
    /// Starts the app (with `overrides`) and a `sessions-api` process with the same settings
    /// and `overrides`.
    async fn spawn(overrides: &[(&str, &str)]) -> Self {
        let app = TestApp::spawn_with(SpawnOptions {
            overrides,
            ..SpawnOptions::default()
        })
        .await;
        let api = ChildApi::spawn_with(&app.settings, overrides).await;
        let url = api.url.clone();
        Self { app, api, url }
    }

    fn address(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    /// Panics if the api logged that it ran out of file descriptors.
    fn assert_no_emfile(&self) {
        let logs = self.api.stderr();
        assert!(
            !logs.contains("Too many open files") && !logs.contains("EMFILE"),
            "the api ran out of file descriptors: {logs}"
        );
    }

    fn pid(&self) -> u32 {
        self.api.pid()
    }

    async fn cleanup(self) {
        self.api.kill().await;
        self.app.cleanup().await;
    }
}

/// What the api process spent while an attack ran: sampled from `/proc` every 50 ms.
#[derive(Debug, Default, Clone, Copy)]
struct ServerSpent {
    peak_file_descriptors: usize,
    peak_rss_mib: f64,
    /// User + system CPU time over the watch.
    cpu: Duration,
}

impl std::fmt::Display for ServerSpent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "api process: peak {} file descriptors, peak RSS {:.0} MiB, CPU {:.2} s",
            self.peak_file_descriptors,
            self.peak_rss_mib,
            self.cpu.as_secs_f64()
        )
    }
}

/// Samples a process's descriptors and memory until stopped; its CPU time is read at both ends.
struct ResourceWatch {
    stop: tokio::sync::watch::Sender<bool>,
    sampler: tokio::task::JoinHandle<ServerSpent>,
}

/// CPU ticks (user + system) of `pid`: fields 14 and 15 of `/proc/<pid>/stat`, after the
/// command name in parentheses.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |index: usize| -> u64 {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    field(11) + field(12)
}

fn open_file_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

impl ResourceWatch {
    fn start(pid: u32) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let sampler = tokio::spawn(async move {
            let ticks_before = cpu_ticks(pid);
            let mut spent = ServerSpent::default();
            loop {
                spent.peak_file_descriptors =
                    spent.peak_file_descriptors.max(open_file_descriptors(pid));
                spent.peak_rss_mib = spent
                    .peak_rss_mib
                    .max(tests::process_memory_mib(pid, "VmRSS"));
                tokio::select! {
                    _ = stopped.changed() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            // Linux reports CPU time in USER_HZ, 100 ticks per second on every architecture.
            spent.cpu = Duration::from_millis((cpu_ticks(pid) - ticks_before) * 10);
            spent
        });
        Self { stop, sampler }
    }

    async fn finish(self) -> ServerSpent {
        let _ = self.stop.send(true);
        self.sampler.await.expect("resource sampler")
    }
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

/// Waits, for each of `attackers` at once, until the server closes it (at most `within`):
/// when each was closed, and how long until every one was.
async fn all_closed_by_server(
    attackers: Vec<TcpStream>,
    within: Duration,
) -> (Vec<Option<Duration>>, Duration) {
    let opened = Instant::now();
    let waits: Vec<_> = attackers
        .into_iter()
        .map(|stream| tokio::spawn(closed_by_server(stream, within)))
        .collect();
    let mut closed = Vec::with_capacity(waits.len());
    for wait in waits {
        closed.push(wait.await.expect("wait"));
    }
    (closed, opened.elapsed())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slowloris_is_closed_within_the_header_timeout_while_others_are_served() {
    const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
    let api = ApiUnderAttack::spawn(&[("SESSIONS_HTTP_HEADER_READ_TIMEOUT_MS", "2000")]).await;
    let size = attack_size(1_000);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let legitimate = tokio::spawn(legitimate_client(api.url.clone(), stopped));
    let watch = ResourceWatch::start(api.pid());
    let mut attackers = Vec::with_capacity(size);
    for _ in 0..size {
        let mut stream = TcpStream::connect(api.address()).await.expect("connect");
        // A request head that never ends.
        stream
            .write_all(b"POST /realtime/v1/sessions/x/in/append HTTP/1.1\r\nHost: a\r\n")
            .await
            .expect("write");
        attackers.push(stream);
    }
    let (closed, all_closed_after) = all_closed_by_server(attackers, HEADER_TIMEOUT * 5).await;
    let _ = stop.send(true);
    let spent = watch.finish().await;
    let (ok, failed, p99) = legitimate.await.expect("legitimate client");
    let still_open = closed.iter().filter(|closed| closed.is_none()).count();
    let slowest = closed.iter().flatten().max().copied().unwrap_or_default();
    println!(
        "slowloris: {size} half-open requests; all closed by the server after {all_closed_after:?} (slowest {slowest:?}, header timeout {HEADER_TIMEOUT:?}); \
         legitimate client: {ok} ok, {failed} failed, p99 {p99:?}; {spent}"
    );
    assert_eq!(still_open, 0, "the server closed every half-open request");
    assert!(
        slowest >= HEADER_TIMEOUT.mul_f64(0.9),
        "not before the header timeout: {slowest:?}"
    );
    assert_eq!(failed, 0, "the legitimate client was served throughout");
    assert!(ok > 0);
    api.assert_no_emfile();
    api.cleanup().await;
}

/// The first line of what the server answered.
fn status_line(received: &[u8]) -> String {
    String::from_utf8_lossy(received)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Opens a connection and sends the head of an authenticated append whose body declares
/// 100 bytes.
async fn slow_body_head(address: &str, key: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let head = format!(
        "POST /realtime/v1/sessions/slow-body/in/append HTTP/1.1\r\nHost: a\r\n\
         Authorization: Bearer {key}\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream
}

/// Sends the body of [`slow_body_head`] one byte every `pause` until the server answers or
/// closes the connection. Returns the answer's first line and how long after the first body
/// byte (sent at once) the server closed the connection (`None`: not within `within`).
async fn trickle_body(
    stream: TcpStream,
    pause: Duration,
    within: Duration,
) -> (String, Option<Duration>) {
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..99 {
            if writer.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    });
    let mut received = Vec::new();
    let mut buffer = [0_u8; 1024];
    let closed = loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + within),
            reader.read(&mut buffer),
        )
        .await
        {
            Err(_) => break None,
            Ok(Ok(0) | Err(_)) => break Some(started.elapsed()),
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
        }
    };
    trickle.abort();
    (status_line(&received), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_bodies_get_408_within_the_body_timeouts_while_others_are_served() {
    const IDLE: Duration = Duration::from_secs(1);
    const WHOLE: Duration = Duration::from_secs(3);
    let api = ApiUnderAttack::spawn(&[
        ("SESSIONS_HTTP_BODY_IDLE_TIMEOUT_MS", "1000"),
        ("SESSIONS_HTTP_BODY_READ_TIMEOUT_MS", "3000"),
    ])
    .await;
    api.app.create_session("slow-body").await;
    let key = api.app.secret_key.clone();

    // A body that stops: 408 about one idle timeout after its last byte.
    let (answer, closed) = trickle_body(
        slow_body_head(&api.address(), &key).await,
        Duration::from_secs(30),
        WHOLE * 3,
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a stalled body: {answer:?}"
    );
    let closed = closed.expect("the server closed the stalled request's connection");
    assert!(
        closed >= IDLE.mul_f64(0.9) && closed < WHOLE,
        "closed one idle timeout after the last byte: {closed:?}"
    );

    // The attack: many bodies that trickle steadily, each byte within the idle timeout, so
    // only the whole-body timeout ends them.
    let size = attack_size(1_000);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let legitimate = tokio::spawn(legitimate_client(api.url.clone(), stopped));
    let watch = ResourceWatch::start(api.pid());
    // Connected one after the other (as the slowloris does: a thousand connects at once would
    // overflow the listen backlog, which is the kernel's business, not the api's), each body
    // trickling from the moment its head is sent.
    let started = Instant::now();
    let mut attackers = Vec::with_capacity(size);
    for _ in 0..size {
        let stream = slow_body_head(&api.address(), &key).await;
        attackers.push(tokio::spawn(trickle_body(
            stream,
            Duration::from_millis(400),
            WHOLE * 4,
        )));
    }
    let mut answers = Vec::with_capacity(size);
    for attacker in attackers {
        answers.push(attacker.await.expect("attacker"));
    }
    let all_closed_after = started.elapsed();
    let _ = stop.send(true);
    let spent = watch.finish().await;
    let (ok, failed, p99) = legitimate.await.expect("legitimate client");
    let timed_out = answers
        .iter()
        .filter(|(answer, _)| answer.starts_with("HTTP/1.1 408"))
        .count();
    let still_open = answers
        .iter()
        .filter(|(_, closed)| closed.is_none())
        .count();
    let fastest = answers
        .iter()
        .filter_map(|(_, closed)| *closed)
        .min()
        .unwrap_or_default();
    let slowest = answers
        .iter()
        .filter_map(|(_, closed)| *closed)
        .max()
        .unwrap_or_default();
    println!(
        "slow bodies: {size} appends trickling one byte every 400 ms; {timed_out} answered 408, all closed after {all_closed_after:?} \
         (fastest {fastest:?}, slowest {slowest:?}; body read timeout {WHOLE:?}); legitimate client: {ok} ok, {failed} failed, p99 {p99:?}; {spent}"
    );
    assert_eq!(
        still_open, 0,
        "the server closed every slow body's connection"
    );
    let mut other_answers: Vec<&str> = answers
        .iter()
        .map(|(answer, _)| answer.as_str())
        .filter(|answer| !answer.starts_with("HTTP/1.1 408"))
        .collect();
    other_answers.dedup();
    assert_eq!(
        timed_out, size,
        "every slow body was answered 408; others: {other_answers:?}"
    );
    assert!(
        fastest >= WHOLE.mul_f64(0.9),
        "a steady trickle runs until the whole-body timeout: {fastest:?}"
    );
    assert_eq!(failed, 0, "the legitimate client was served throughout");
    assert!(ok > 0);
    assert!(
        api.app.records("slow-body", "in").await.is_empty(),
        "a body that timed out appends nothing"
    );
    api.assert_no_emfile();
    api.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_the_budget_are_closed_at_once_and_idle_ones_evicted_under_pressure() {
    const BUDGET: usize = 100;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
    let api = ApiUnderAttack::spawn(&[
        ("SESSIONS_MAX_CONNECTIONS", "100"),
        ("SESSIONS_HTTP_HEADER_READ_TIMEOUT_MS", "5000"),
    ])
    .await;
    let size = attack_size(3 * BUDGET);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // The legitimate client's keep-alive connection exists before the flood.
    let legitimate = tokio::spawn(legitimate_client(api.url.clone(), stopped));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let watch = ResourceWatch::start(api.pid());
    let mut attackers = Vec::with_capacity(size);
    for _ in 0..size {
        // Connections that send nothing at all.
        attackers.push(TcpStream::connect(api.address()).await.expect("connect"));
    }
    let (closed, all_closed_after) = all_closed_by_server(attackers, HEADER_TIMEOUT * 4).await;
    // Once the flood is gone, a new client is served at once.
    let fresh = reqwest::Client::new()
        .get(format!("{}/healthz", api.url))
        .send()
        .await
        .expect("a new connection after the flood");
    assert!(fresh.status().is_success());
    let _ = stop.send(true);
    let spent = watch.finish().await;
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
         all closed after {all_closed_after:?} (slowest {slowest:?}); legitimate client: {ok} ok, {failed} failed, p99 {p99:?}; {spent}"
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
    api.assert_no_emfile();
    api.cleanup().await;
}

/// Opens an SSE stream on `out` of `session` at the api `url` with `credential`: the response
/// (headers only).
async fn open_stream(url: &str, session: &str, credential: &str) -> reqwest::Response {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(reqwest::Client::new)
        .get(format!("{url}/realtime/v1/sessions/{session}/out"))
        .bearer_auth(credential)
        .header("Accept", "text/event-stream")
        .header("Timeout-Seconds", "60")
        .send()
        .await
        .expect("SSE request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_past_a_tokens_or_an_environments_cap_get_429_and_others_are_unaffected() {
    const FLOOD: usize = 2_000;
    let api = ApiUnderAttack::spawn(&[
        ("SESSIONS_MAX_SSE_PER_TOKEN", "3"),
        ("SESSIONS_MAX_SSE_PER_ENVIRONMENT", "5"),
    ])
    .await;
    let (app, url) = (&api.app, api.url.as_str());
    let created = app.create_session("sse-cap").await;
    let token = created["publicAccessToken"]
        .as_str()
        .expect("a session token")
        .to_owned();
    let mut held = Vec::new();
    for _ in 0..3 {
        let stream = open_stream(url, "sse-cap", &token).await;
        assert_eq!(stream.status().as_u16(), 200);
        held.push(stream);
    }
    let refused = open_stream(url, "sse-cap", &token).await;
    assert_eq!(refused.status().as_u16(), 429, "the token's fourth stream");
    assert!(refused.headers().contains_key("retry-after"));
    let error: serde_json::Value = refused.json().await.expect("JSON error");
    assert!(error["error"].is_string());

    // The flood: the same token asks for many more streams at once, 64 at a time.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let legitimate = tokio::spawn(legitimate_client(api.url.clone(), stopped));
    let watch = ResourceWatch::start(api.pid());
    let started = Instant::now();
    let statuses: Vec<u16> =
        futures_util::StreamExt::collect(futures_util::StreamExt::buffer_unordered(
            futures_util::stream::iter((0..FLOOD).map(|_| {
                let token = token.clone();
                async move { open_stream(url, "sse-cap", &token).await.status().as_u16() }
            })),
            64,
        ))
        .await;
    let flood_took = started.elapsed();
    let _ = stop.send(true);
    let spent = watch.finish().await;
    let (ok, failed, p99) = legitimate.await.expect("legitimate client");
    let refused = statuses.iter().filter(|status| **status == 429).count();
    println!(
        "SSE flood: {FLOOD} stream requests from one public token holding its cap of 3: {refused} answered 429 in {flood_took:?}; \
         legitimate client: {ok} ok, {failed} failed, p99 {p99:?}; {spent}"
    );
    assert_eq!(
        refused, FLOOD,
        "every stream past the token's cap is refused"
    );
    assert_eq!(failed, 0, "the legitimate client was served throughout");

    // The secret key counts against the environment only: two more fill it (3 + 2 = 5).
    for _ in 0..2 {
        let stream = open_stream(url, "sse-cap", &app.secret_key).await;
        assert_eq!(stream.status().as_u16(), 200);
        held.push(stream);
    }
    assert_eq!(
        open_stream(url, "sse-cap", &app.secret_key)
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
        open_stream(url, "sse-cap", &other_key)
            .await
            .status()
            .as_u16(),
        200
    );
    // A stream that ends gives its slot back.
    drop(held.remove(0));
    let started = Instant::now();
    loop {
        let stream = open_stream(url, "sse-cap", &token).await;
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
    api.assert_no_emfile();
    api.cleanup().await;
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
    let api = ApiUnderAttack::spawn(&[]).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let legitimate = tokio::spawn(legitimate_client(api.url.clone(), stopped));
    let watch = ResourceWatch::start(api.pid());
    let uri = format!("{}/healthz", api.url);
    let started = Instant::now();
    let (mut resets, mut connections, mut closed_by_server) = (0_usize, 0_usize, 0_usize);
    while started.elapsed() < FLOOD {
        let tcp = TcpStream::connect(api.address()).await.expect("connect");
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
        .get(format!("{}/healthz", api.url))
        .send()
        .await
        .expect("a new connection after the flood");
    assert!(after.status().is_success());
    let _ = stop.send(true);
    let spent = watch.finish().await;
    let (ok, failed, p99) = legitimate.await.expect("legitimate client");
    println!(
        "rapid reset: {resets} streams opened and reset over {connections} h2c connections in {FLOOD:?}, \
         {closed_by_server} of them closed by the server; legitimate client: {ok} ok, {failed} failed, p99 {p99:?}; {spent}"
    );
    assert!(
        closed_by_server > 0,
        "the server cuts off a connection that keeps resetting streams"
    );
    assert_eq!(failed, 0, "the legitimate client was served throughout");
    assert!(ok > 0);
    api.assert_no_emfile();
    api.cleanup().await;
}
