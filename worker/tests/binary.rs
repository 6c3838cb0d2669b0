//! The `sessions-worker` binary's start-up contract. (Also makes `cargo nextest run --workspace`
//! build the binary, which the end-to-end suites run as a child process to `kill -9` it.)

#[test]
fn bad_configuration_fails_at_start_naming_the_variable() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sessions-worker"))
        .env("SESSIONS_WORKER_PREFETCH", "-3")
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("SESSIONS_WORKER_PREFETCH"));
}
