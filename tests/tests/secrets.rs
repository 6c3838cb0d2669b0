//! Secret keys never appear in plaintext: not in the database (a `pg_dump` of the test's
//! database), not in the logs (everything the api and the worker log at `debug`, SQL statements
//! included, captured in this process). The workload creates environments, rotates and revokes
//! a key through the Store API, makes authenticated requests (with keys, with a public token the
//! api minted, and failing ones with wrong keys) and appends.
//!
//! Not vacuous: the dump does contain each key's SHA-256 digest (how keys are looked up), and the
//! captured logs do contain the requests' log lines.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use shared::domain::tokens::secret_key_digest;
use tests::TestApp;

/// Everything the process logs, kept in memory.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

fn random_key() -> String {
    use rand::Rng;
    let suffix: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("tr_sk_{suffix}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secret_keys_never_reach_the_database_or_the_logs_in_plaintext() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("this test owns the process's log subscriber");

    let app = TestApp::spawn().await;
    let first_key = app.secret_key.clone();
    let second_environment_key = app.create_environment("second").await;
    let environment = app
        .store
        .find_environment("test-project", "dev")
        .await
        .expect("lookup")
        .expect("environment");

    // A session created with the first key: the api mints its public token with that key.
    let created = app.create_session("secret-chat").await;
    let token = created["publicAccessToken"]
        .as_str()
        .expect("token")
        .to_owned();

    // Rotation: a new key; the previous one keeps working during the grace period.
    let rotated_key = app
        .store
        .rotate_secret_key(
            environment.id,
            chrono::TimeDelta::hours(1),
            &app.settings.master_key,
        )
        .await
        .expect("rotate");
    for key in [&first_key, &rotated_key] {
        let appended = app.append_as(key, "secret-chat", "in", "hello", None).await;
        assert_eq!(appended.status(), 200);
    }
    let listed = app
        .client
        .get(app.url("/api/v1/sessions"))
        .bearer_auth(&second_environment_key)
        .send()
        .await
        .expect("list");
    assert_eq!(listed.status(), 200);
    let by_token = app
        .client
        .get(app.url("/realtime/v1/sessions/secret-chat/out/records"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("records");
    assert_eq!(by_token.status(), 200);
    let claims = app
        .client
        .post(app.url("/api/v1/auth/jwt/claims"))
        .bearer_auth(&rotated_key)
        .send()
        .await
        .expect("claims");
    assert_eq!(claims.status(), 200);

    // Failures: unknown keys, a real key with a typo, a token signed with a wrong key.
    let wrong_key = random_key();
    let typo_key = format!("{rotated_key}x");
    let forged = shared::domain::tokens::mint_public_token(
        &shared::domain::tokens::PublicTokenClaims {
            iss: app.settings.jwt_issuer.clone(),
            aud: app.settings.jwt_audience.clone(),
            sub: environment.public_id.clone(),
            public: true,
            scopes: vec!["read:sessions".into()],
            iat: None,
            exp: chrono::Utc::now().timestamp() + 60,
        },
        &wrong_key,
    )
    .expect("forged token");
    for credential in [&wrong_key, &typo_key, &forged] {
        let refused = app
            .client
            .get(app.url("/api/v1/sessions"))
            .bearer_auth(credential)
            .send()
            .await
            .expect("refused request");
        assert_eq!(refused.status(), 401);
    }
    let refused_create = app
        .create_session_with(&wrong_key, json!({ "type": "x" }))
        .await;
    assert_eq!(refused_create.status(), 401);

    let applied = app
        .wait_for_records("secret-chat", "in", 2, Duration::from_secs(30))
        .await;
    assert_eq!(applied.len(), 2, "both appends were applied");

    // Revocation of the first key (the harness's key): it stops once the api's lookup of it
    // has aged out (`SESSIONS_AUTH_CACHE_TTL_MS`).
    let keys = app
        .store
        .list_secret_keys(environment.id)
        .await
        .expect("keys");
    assert_eq!(keys.len(), 2, "the first key and the rotated one");
    let (first_key_id, _, _) = keys
        .iter()
        .min_by_key(|(_, created_at, _)| *created_at)
        .expect("first key");
    assert!(
        app.store
            .revoke_secret_key(environment.id, *first_key_id)
            .await
            .expect("revoke")
    );
    tokio::time::sleep(app.settings.auth_cache_ttl + Duration::from_millis(100)).await;
    let revoked = app
        .append_as(&first_key, "secret-chat", "in", "after revocation", None)
        .await;
    assert_eq!(revoked.status(), 401);

    // The database, as a dump.
    let database = app
        .settings
        .database_url
        .rsplit_once('/')
        .map(|(_, name)| name.to_owned())
        .expect("database name");
    let dump = tokio::process::Command::new("pg_dump")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "--no-password",
            &database,
        ])
        .output()
        .await
        .expect("pg_dump runs (PostgreSQL client tools, installed by deploy/services.sh)");
    assert!(
        dump.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    let logs = capture.text();

    let real_keys = [&first_key, &second_environment_key, &rotated_key];
    let all_secrets = [
        first_key.as_str(),
        second_environment_key.as_str(),
        rotated_key.as_str(),
        wrong_key.as_str(),
        typo_key.as_str(),
    ];
    println!(
        "checked {} keys against a {} byte dump and {} bytes of debug logs",
        all_secrets.len(),
        dump.len(),
        logs.len()
    );
    for secret in all_secrets {
        // The random part alone too, in case something strips the prefix.
        let random_part = secret.trim_start_matches("tr_sk_");
        assert!(random_part.len() >= 20, "a real key: {secret}");
        assert!(
            !dump.contains(random_part),
            "a secret key is in the database dump"
        );
        assert!(!logs.contains(random_part), "a secret key is in the logs");
    }
    // Not vacuous: the dump has the keys (as digests) and the logs have the requests.
    for key in real_keys {
        assert!(
            dump.contains(&secret_key_digest(key)),
            "the dump holds the key's digest"
        );
    }
    assert!(
        dump.contains("COPY public.secret_keys"),
        "the dump has the keys table"
    );
    assert!(dump.contains(&environment.public_id));
    assert!(
        logs.contains("request finished") && logs.contains("status=401"),
        "the logs hold the requests, failed ones included"
    );
    assert!(logs.contains("SELECT"), "the logs hold the SQL statements");
    app.cleanup().await;
}
