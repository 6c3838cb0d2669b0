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

/// Usage is answered before anything is opened: with a database that cannot be reached, a
/// mistyped command still gets the usage (exit 2) and `--help` gets it on stdout (exit 0), not
/// a connection error (a mistyped command used to connect to, and migrate, the database first).
#[test]
fn usage_is_answered_without_touching_the_database() {
    let run = |arguments: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sessions-worker"))
            .args(arguments)
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/unreachable")
            .output()
            .expect("the binary runs")
    };
    let mistyped = run(&["admin", "dead-letter", "list"]);
    assert_eq!(mistyped.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&mistyped.stderr);
    assert!(
        stderr.contains("sessions-worker admin dead-letters list"),
        "{stderr}"
    );
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage:"));
}
