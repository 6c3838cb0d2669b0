//! The `sessions-api` binary's operator contract: the admin CLI and start-up configuration
//! errors. (Also makes `cargo nextest run --workspace` build the binary.)

use serde_json::Value;

#[tokio::test]
async fn admin_cli_creates_an_environment_once_and_the_key_works() {
    let name = tests::unique_name();
    let settings = tests::test_settings(&name, &[]);
    let binary = env!("CARGO_BIN_EXE_sessions-api");
    let run = || {
        std::process::Command::new(binary)
            .args([
                "admin",
                "create-environment",
                "--project",
                "acme",
                "--environment",
                "dev",
            ])
            .envs(settings.to_env())
            .output()
            .expect("cli runs")
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let created: Value = serde_json::from_slice(&first.stdout).expect("one JSON line");
    assert!(
        created["environmentId"]
            .as_str()
            .is_some_and(|id| id.starts_with("env_"))
    );
    let key = created["secretKey"]
        .as_str()
        .expect("key shown once")
        .to_owned();
    let second: Value = serde_json::from_slice(&run().stdout).expect("json");
    assert_eq!(second["environmentId"], created["environmentId"]);
    assert_eq!(
        second["secretKey"],
        Value::Null,
        "the key is shown only once"
    );
    let bad = std::process::Command::new(binary)
        .args([
            "admin",
            "create-environment",
            "--project",
            "Bad Slug",
            "--environment",
            "dev",
        ])
        .envs(settings.to_env())
        .output()
        .expect("cli runs");
    assert!(!bad.status.success());

    let store = shared::storage::Store::connect(&settings.database_url, 1)
        .await
        .expect("store");
    let digest = shared::domain::tokens::secret_key_digest(&key);
    assert!(
        store
            .environment_for_key_digest(&digest)
            .await
            .expect("lookup")
            .is_some()
    );
    drop(store);
    tests::drop_database(&settings.database_url).await;
}

#[tokio::test]
async fn bad_configuration_fails_at_start_naming_the_variable() {
    let binary = env!("CARGO_BIN_EXE_sessions-api");
    let output = std::process::Command::new(binary)
        .env("SESSIONS_PARTITIONS", "lots")
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("SESSIONS_PARTITIONS"));
}

/// `--help` answers the usage on stdout and starts nothing; a mistyped admin command gets the
/// usage (exit 2) without opening the database.
#[tokio::test]
async fn usage_is_answered_without_serving_or_touching_the_database() {
    let run = |arguments: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sessions-api"))
            .args(arguments)
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/unreachable")
            .output()
            .expect("runs")
    };
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage:"));
    let mistyped = run(&[
        "admin",
        "create-enviroment",
        "--project",
        "p",
        "--environment",
        "e",
    ]);
    assert_eq!(mistyped.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&mistyped.stderr).contains("create-environment"));
}

#[tokio::test]
async fn keys_rotate_with_a_grace_period_and_revoke_at_once() {
    let name = tests::unique_name();
    let settings = tests::test_settings(&name, &[]);
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_sessions-api"));
    let admin = |arguments: &[&str]| {
        let mut all = vec!["admin"];
        all.extend_from_slice(arguments);
        all.extend_from_slice(&["--project", "acme", "--environment", "dev"]);
        tests::run_cli_json_lines(binary, &settings, &all)
    };
    let first = admin(&["create-environment"])[0]["secretKey"]
        .as_str()
        .expect("key")
        .to_owned();
    let rotated = admin(&["rotate-key", "--grace-seconds", "600"]);
    let second = rotated[0]["secretKey"]
        .as_str()
        .expect("new key")
        .to_owned();
    assert_ne!(first, second);
    let store = shared::storage::Store::connect(&settings.database_url, 1)
        .await
        .expect("store");
    let works = |key: String| {
        let store = store.clone();
        async move {
            store
                .environment_for_key_digest(&shared::domain::tokens::secret_key_digest(&key))
                .await
                .expect("lookup")
                .is_some()
        }
    };
    assert!(
        works(first.clone()).await,
        "the old key works during the grace period"
    );
    assert!(works(second.clone()).await);
    let keys = admin(&["list-keys"]);
    assert_eq!(keys.len(), 2);
    let old_id = keys[1]["keyId"].as_str().expect("id").to_owned();
    assert!(
        keys[1]["revokedAt"].is_string(),
        "the old key has its end date"
    );
    assert!(keys[0]["revokedAt"].is_null());
    admin(&["revoke-key", "--key-id", &old_id]);
    assert!(!works(first).await, "revoked now");
    assert!(works(second.clone()).await);
    // A rotation without grace ends the previous key at once.
    let third = admin(&["rotate-key", "--grace-seconds", "0"])[0]["secretKey"]
        .as_str()
        .expect("key")
        .to_owned();
    assert!(!works(second).await);
    assert!(works(third).await);
    drop(store);
    tests::drop_database(&settings.database_url).await;
}
