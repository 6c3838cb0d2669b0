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
