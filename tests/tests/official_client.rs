//! Runs the official `@trigger.dev/core` and `@trigger.dev/sdk` 4.8.3 clients' suite
//! (`tests/js/`) against a spawned service. Needs Node.js 20+ and npm; installs the locked packages on first run.

use std::path::PathBuf;
use std::process::Command;

use tests::TestApp;

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_suite_passes() {
    let dir = js_dir();
    let installed = ["core", "sdk"]
        .iter()
        .all(|package| dir.join("node_modules/@trigger.dev").join(package).exists());
    if !installed {
        let installed = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm must be installed (Node.js 20+)");
        assert!(installed.success(), "npm ci failed");
    }
    let app = TestApp::spawn().await;
    let address = app.address.clone();
    let key = app.secret_key.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .args(["--test", "--test-concurrency=1", "sessions.test.mjs"])
            .current_dir(js_dir())
            .env("SESSIONS_API_URL", address)
            .env("SESSIONS_SECRET_KEY", key)
            .output()
            .expect("node must be installed")
    })
    .await
    .expect("node run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    app.cleanup().await;
    assert!(output.status.success(), "the official client suite failed");
    assert!(
        stdout.contains("# fail 0"),
        "every official client test passed"
    );
}
