//! Runs the official `@trigger.dev/core` and `@trigger.dev/sdk` 4.8.3 clients' suites
//! (`tests/js/`) against a spawned service: the reader and session suite, and the writer suite
//! (the SDK's `out` writer over the S2 protocol) on the production path and on the embedded
//! default. Needs Node.js 20+ and npm; installs the locked packages on first run.

use tests::TestApp;
use tests::node::run_suite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_suite_passes() {
    let app = TestApp::spawn().await;
    let run = run_suite("sessions.test.mjs", &app.address, &app.secret_key).await;
    app.cleanup().await;
    assert!(run.passed, "every official client test passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_writer_suite_passes_on_the_production_path() {
    let app = TestApp::spawn().await;
    let run = run_suite("writer.test.mjs", &app.address, &app.secret_key).await;
    app.cleanup().await;
    assert!(run.passed, "every official writer test passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_writer_suite_passes_on_the_embedded_default() {
    let dir = std::env::temp_dir().join(format!("sessions-writer-{}", tests::unique_name()));
    std::fs::create_dir_all(&dir).expect("data dir");
    let app = TestApp::spawn_embedded(&dir).await;
    let run = run_suite("writer.test.mjs", &app.address, &app.secret_key).await;
    app.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        run.passed,
        "every official writer test passed on the embedded default"
    );
}

/// The SDK's writer keeps piping while the worker is stopped for longer than its ack timeout
/// (5 s): the server ends the append session with a retryable error after
/// `SESSIONS_WRITER_ACK_WAIT_MS` (4 s), the SDK re-sends the unacknowledged batches on a new
/// session, and once a worker runs again everything is there, in order, once: a re-sent batch
/// whose first copy was applied is answered with that copy's seqNums and written no second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_writer_rides_out_a_worker_outage() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    const CHUNKS: usize = 300;
    let app = TestApp::spawn_with(tests::without_worker()).await;
    let worker = tests::InProcessWorker::spawn(app.settings.clone()).await;
    app.create_session("sdk-outage").await;
    tests::node::install_packages();
    let mut child = tokio::process::Command::new("node")
        .args([
            "writer-child.mjs",
            "sdk-outage",
            "sdk",
            &CHUNKS.to_string(),
            "20",
        ])
        .current_dir(tests::node::js_dir())
        .env("SESSIONS_API_URL", &app.address)
        .env("SESSIONS_SECRET_KEY", &app.secret_key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node must be installed (Node.js 20+)");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next_line().await.expect("read").as_deref(),
        Some("ready")
    );
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").await.expect("go");
    drop(stdin);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    worker.stop().await;
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let worker = tests::InProcessWorker::spawn(app.settings.clone()).await;
    println!("worker stopped for {:?}", stopped.elapsed());
    let done = tokio::time::timeout(Duration::from_secs(90), lines.next_line())
        .await
        .expect("the writer finished within 90 s (no hang)")
        .expect("read");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the writer process ended by itself")
        .expect("wait");
    assert!(status.success(), "the SDK writer failed: {done:?}");
    assert!(done.is_some_and(|line| line.starts_with("done ")));
    // The chunks are JSON objects (`{writer, n}`): read the records route's `data` as JSON.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (records, first_seen, duplicates) = loop {
        let page: serde_json::Value = app
            .client
            .get(app.url("/realtime/v1/sessions/sdk-outage/out/records"))
            .bearer_auth(&app.secret_key)
            .send()
            .await
            .expect("records")
            .json()
            .await
            .expect("records json");
        let records = page["records"].as_array().cloned().unwrap_or_default();
        let mut first_seen: Vec<u64> = Vec::new();
        let mut duplicates = 0_usize;
        for record in &records {
            let n = record["data"]["n"].as_u64().expect("a chunk of the writer");
            if first_seen.contains(&n) {
                duplicates += 1;
            } else {
                first_seen.push(n);
            }
        }
        if first_seen.len() >= CHUNKS || Instant::now() > deadline {
            break (records, first_seen, duplicates);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("{} records for {CHUNKS} chunks", records.len());
    let expected: Vec<u64> = (0..CHUNKS as u64).collect();
    assert_eq!(first_seen, expected, "every chunk, in order");
    assert_eq!(duplicates, 0, "no re-sent batch is written twice");
    assert_eq!(records.len(), CHUNKS);
    worker.stop().await;
    app.cleanup().await;
}
