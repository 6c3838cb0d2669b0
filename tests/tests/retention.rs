//! The retention purge (`SESSIONS_RETENTION_AFTER_CLOSE_SECONDS`): a session closed or expired
//! longer ago than the retention disappears with everything that belongs to it (every table is
//! checked by name, and a table the test does not know fails it), as if it never existed; an
//! open session, and the appends made to it while the purge runs, are untouched. On the production path
//! (Postgres) and on the embedded default (SQLite): the purge's SQL differs per backend.

use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::json;
use tests::{SpawnOptions, TestApp};

/// The purge looks every 10 s; a session is due one retention (1 s) after its close.
const PURGED_WITHIN: Duration = Duration::from_secs(40);

/// Every table that holds rows of a session, with the column naming the session: the purge
/// must empty each of them.
const SESSION_TABLES: [(&str, &str); 8] = [
    ("sessions", "id"),
    ("records", "session_id"),
    ("record_part_ids", "session_id"),
    ("waitpoints", "session_id"),
    ("applied_commands", "session_id"),
    ("session_snapshots", "session_id"),
    ("stream_trims", "session_id"),
    ("runs", "session_id"),
];

/// Every other table, and why it holds nothing of a session: outbox rows are deleted once
/// published; the rest belong to environments, partitions or the migrator.
const OTHER_TABLES: [&str; 8] = [
    "projects",
    "environments",
    "secret_keys",
    "outbox_events",
    "log_positions",
    "partition_leases",
    "dead_letters",
    "seaql_migrations",
];

/// The tables the migrations created.
async fn tables(db: &sea_orm::DatabaseConnection) -> Vec<String> {
    let sql = if db.get_database_backend() == DbBackend::Postgres {
        "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'public'"
    } else {
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    };
    let rows = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("tables");
    let mut names: Vec<String> = rows
        .iter()
        .map(|row| row.try_get::<String>("", "name").expect("name"))
        .collect();
    names.sort();
    names
}

/// Rows of `session_id` in every table that holds something of a session; fails when a table
/// exists that neither list above names (a new table must say whether the purge empties it).
async fn rows_of(app: &TestApp, session_id: uuid::Uuid) -> Vec<(&'static str, i64)> {
    let db = sea_orm::Database::connect(&app.settings.database_url)
        .await
        .expect("database");
    let mut known: Vec<String> = SESSION_TABLES
        .iter()
        .map(|(table, _)| (*table).to_owned())
        .chain(OTHER_TABLES.iter().map(|table| (*table).to_owned()))
        .collect();
    known.sort();
    assert_eq!(
        tables(&db).await,
        known,
        "every table is either purged with its session or listed as holding nothing of one"
    );
    let backend = db.get_database_backend();
    let placeholder = if backend == DbBackend::Postgres {
        "$1"
    } else {
        "?"
    };
    let mut counts = Vec::new();
    for (table, column) in SESSION_TABLES {
        let row = db
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                format!("SELECT COUNT(*) AS n FROM {table} WHERE {column} = {placeholder}"),
                [session_id.into()],
            ))
            .await
            .expect("count")
            .expect("a row");
        counts.push((table, row.try_get::<i64>("", "n").expect("n")));
    }
    counts
}

async fn status_of(app: &TestApp, path: &str) -> u16 {
    app.client
        .get(app.url(path))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

async fn close(app: &TestApp, session: &str) {
    let response = app
        .client
        .post(app.url(&format!("/api/v1/sessions/{session}/close")))
        .bearer_auth(&app.secret_key)
        .json(&json!({}))
        .send()
        .await
        .expect("close");
    assert!(
        response.status().is_success(),
        "close: {}",
        response.status()
    );
}

/// The whole scenario, on whichever backend `app` runs.
async fn a_closed_session_past_the_retention_is_purged_with_everything(app: &TestApp) {
    // The doomed session: records on both channels, a waitpoint, a snapshot, then closed.
    let doomed = app.create_session("doomed").await;
    let run_id = doomed["runId"].as_str().expect("runId").to_owned();
    for n in 0..3 {
        assert!(
            app.append("doomed", "out", &format!("o{n}"), None)
                .await
                .status()
                .is_success()
        );
        assert!(
            app.append("doomed", "in", &format!("i{n}"), Some(&format!("p{n}")))
                .await
                .status()
                .is_success()
        );
    }
    app.wait_on(&run_id, json!({"session": "doomed", "io": "in"}))
        .await;
    let signed: serde_json::Value = app
        .client
        .put(app.url("/api/v1/sessions/doomed/snapshot-url"))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("snapshot url")
        .json()
        .await
        .expect("snapshot url JSON");
    let snapshot = app
        .client
        .put(signed["presignedUrl"].as_str().expect("presignedUrl"))
        .body("snapshot bytes")
        .send()
        .await
        .expect("snapshot");
    assert!(
        snapshot.status().is_success(),
        "snapshot PUT: {}",
        snapshot.status()
    );
    let doomed_row = app.session_row("doomed").await;
    let doomed_id = doomed_row.id;
    app.wait_for_records("doomed", "out", 3, Duration::from_secs(30))
        .await;
    // The kept session stays open.
    app.create_session("kept").await;
    assert!(
        app.append("kept", "out", "k0", None)
            .await
            .status()
            .is_success()
    );
    app.wait_for_records("kept", "out", 1, Duration::from_secs(30))
        .await;
    // A session that expires (never closed) goes the same way.
    let expires_at = (chrono::Utc::now() + chrono::TimeDelta::seconds(2)).to_rfc3339();
    let created = app
        .create_session_with(
            &app.secret_key,
            json!({
                "type": "chat.agent",
                "externalId": "expiring",
                "taskIdentifier": "agent",
                "triggerConfig": { "basePayload": {} },
                "expiresAt": expires_at,
            }),
        )
        .await;
    assert!(
        created.status().is_success(),
        "create: {}",
        created.status()
    );
    assert!(
        app.append("expiring", "out", "e0", None)
            .await
            .status()
            .is_success()
    );
    let expiring_id = app.session_row("expiring").await.id;
    close(app, "doomed").await;

    // Appends to the kept session go on while the purge runs; every one must be written, once,
    // in order.
    let mut acknowledged = vec!["k0".to_owned()];
    let started = Instant::now();
    while status_of(app, "/api/v1/sessions/doomed").await != 404
        || status_of(app, "/api/v1/sessions/expiring").await != 404
    {
        assert!(
            started.elapsed() < PURGED_WITHIN,
            "the closed and the expired session were purged within {PURGED_WITHIN:?}"
        );
        let body = format!("k{}", acknowledged.len());
        let appended = app.append("kept", "out", &body, Some(&body)).await;
        assert!(
            appended.status().is_success(),
            "append: {}",
            appended.status()
        );
        acknowledged.push(body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (table, rows) in rows_of(app, expiring_id).await {
        assert_eq!(rows, 0, "{table} rows of the purged expired session");
    }
    // Purged whole: no row of it left anywhere.
    for (table, rows) in rows_of(app, doomed_id).await {
        assert_eq!(rows, 0, "{table} rows of the purged session");
    }
    // Its records route answers as for an externalId that never existed.
    assert_eq!(
        status_of(app, "/realtime/v1/sessions/doomed/out/records").await,
        status_of(app, "/realtime/v1/sessions/never-existed/out/records").await
    );
    // The kept session is untouched, and every append made while the purge ran is there, once,
    // in order.
    let kept = app
        .wait_for_records("kept", "out", acknowledged.len(), Duration::from_secs(30))
        .await;
    let bodies: Vec<String> = kept.into_iter().map(|record| record.data).collect();
    assert_eq!(bodies, acknowledged);
    assert_eq!(status_of(app, "/api/v1/sessions/kept").await, 200);
    // The externalId is free again: create makes a new session, with no records.
    app.create_session("doomed").await;
    let again = app.session_row("doomed").await;
    // Ids derive from (environment, externalId), so the id is the same; the row is new.
    assert!(
        again.created_at > doomed_row.created_at && again.closed_at.is_none(),
        "a new session, not the purged one: {again:?}"
    );
    assert_eq!((again.next_seq_in, again.next_seq_out), (0, 0));
    assert!(app.records("doomed", "out").await.is_empty());
}

#[tokio::test]
async fn production_path_purges_a_session_past_the_retention() {
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("SESSIONS_RETENTION_AFTER_CLOSE_SECONDS", "1")],
        ..SpawnOptions::default()
    })
    .await;
    a_closed_session_past_the_retention_is_purged_with_everything(&app).await;
    app.cleanup().await;
}

#[tokio::test]
async fn embedded_default_purges_a_session_past_the_retention() {
    let data_dir = std::env::temp_dir().join(format!("sessions-embedded-{}", tests::unique_name()));
    let app = TestApp::spawn_embedded_with(
        &data_dir,
        &[("SESSIONS_RETENTION_AFTER_CLOSE_SECONDS", "1")],
    )
    .await;
    a_closed_session_past_the_retention_is_purged_with_everything(&app).await;
    app.cleanup().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}
