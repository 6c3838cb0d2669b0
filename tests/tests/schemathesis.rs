//! schemathesis (property-based testing from the OpenAPI document) against the embedded server:
//! runs `tests/schemathesis/run.sh` (a pinned schemathesis in an ignored venv, installed from
//! PyPI on first use) and fails when it reports a server error or a response that does not match
//! `api/openapi.json`. About two minutes.

use std::path::Path;
use std::process::Stdio;

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_mismatch() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemathesis/run.sh");
    let output = tokio::process::Command::new("bash")
        .arg(&script)
        .env(
            "SESSIONS_API_BINARY",
            tests::workspace_binary("sessions-api"),
        )
        .stdin(Stdio::null())
        .output()
        .await
        .expect("bash runs the schemathesis script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        output.status.success(),
        "schemathesis reported failures (exit {:?}); see the output above",
        output.status.code()
    );
    // Not vacuous: both runs (secret key, session token) generated and passed cases.
    let summaries = stdout
        .lines()
        .filter(|line| line.contains(" generated, ") && line.contains(" passed"))
        .count();
    assert_eq!(summaries, 2, "both schemathesis runs reported their cases");
}
