//! The embedded default: the same HTTP behaviour on SQLite with the in-process
//! broker and in-memory claims; restarts keep data and key; no external service is contacted.

use std::time::Duration;

use serde_json::{Value, json};
use tests::TestApp;
use tests::sse::SseReader;

const WAIT: Duration = Duration::from_secs(30);

fn data_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sessions-embedded-{}", tests::unique_name()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_core_suite_runs_on_the_embedded_default() {
    let dir = data_dir();
    let app = std::sync::Arc::new(TestApp::spawn_embedded(&dir).await);
    let created = app.create_session("emb").await;
    assert_eq!(app.create_session("emb").await["isCached"], json!(true));

    // Ordered, gapless appends from concurrent producers, one per session.
    for s in 0..5 {
        app.create_session(&format!("emb-{s}")).await;
    }
    let mut producers = tokio::task::JoinSet::new();
    for s in 0..5 {
        let app = app.clone();
        producers.spawn(async move {
            for n in 0..20 {
                let status = app
                    .append(
                        &format!("emb-{s}"),
                        "in",
                        &format!("{s}-{n}"),
                        Some(&format!("p{n}")),
                    )
                    .await
                    .status();
                assert_eq!(status, 200);
            }
        });
    }
    while let Some(result) = producers.join_next().await {
        result.expect("producer");
    }
    for s in 0..5 {
        let records = app
            .wait_for_records(&format!("emb-{s}"), "in", 20, WAIT)
            .await;
        let bodies: Vec<String> = records.iter().map(|r| r.data.clone()).collect();
        assert_eq!(
            bodies,
            (0..20).map(|n| format!("{s}-{n}")).collect::<Vec<_>>()
        );
    }

    // Dedup: retries and a conflicting body make no second record (a conflict on `in`, which
    // answers after the apply, is a 409).
    for (body, status) in [("same", 200), ("same", 200), ("different", 409)] {
        assert_eq!(
            app.append("emb", "in", body, Some("dup")).await.status(),
            status
        );
    }
    let waited = app
        .client
        .post(app.url("/realtime/v1/sessions/emb/in/append"))
        .bearer_auth(&app.secret_key)
        .header("X-Part-Id", "dup")
        .header("Prefer", "wait=10")
        .body("different")
        .send()
        .await
        .expect("append");
    assert_eq!(waited.status(), 409);
    assert_eq!(app.records("emb", "in").await.len(), 1);

    // Auth: wrong key 401, the session token reads and writes `in` only.
    assert_eq!(
        app.append_as("tr_sk_wrong", "emb", "in", "x", None)
            .await
            .status(),
        401
    );
    let token = created["publicAccessToken"].as_str().expect("token");
    assert_eq!(
        app.append_as(token, "emb", "out", "x", None).await.status(),
        403
    );

    // SSE and a waitpoint.
    let mut reader = SseReader::new(app.subscribe("emb", "out", &[]).await);
    let run = created["runId"].as_str().expect("run");
    let waitpoint = app
        .wait_on(run, json!({"session": "emb", "io": "in"}))
        .await;
    app.append("emb", "out", "live", None).await;
    app.append("emb", "in", "wake", None).await;
    let live = reader.records(1, WAIT).await;
    assert_eq!(live.first().map(|r| r.data.as_str()), Some("live"));
    assert_eq!(
        app.settled_waitpoint(&waitpoint, WAIT).await["output"],
        json!("wake")
    );
    drop(reader);

    // The list filters work on SQLite too.
    let listed: Value = app
        .client
        .get(app.url("/api/v1/sessions?filter[externalId]=emb-1,emb-2"))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2));

    let app = std::sync::Arc::into_inner(app).expect("single owner");
    app.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_restart_keeps_sessions_records_and_the_key() {
    let dir = data_dir();
    let first = TestApp::spawn_embedded(&dir).await;
    first.create_session("kept").await;
    first.append("kept", "in", "before restart", None).await;
    first.wait_for_records("kept", "in", 1, WAIT).await;
    let key = first.secret_key.clone();
    let environment = first.environment_id.clone();
    first.cleanup().await;

    let second = TestApp::spawn_embedded(&dir).await;
    assert_eq!(
        second.secret_key, key,
        "the same development key after a restart"
    );
    assert_eq!(second.environment_id, environment);
    let records = second.records("kept", "in").await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].data, "before restart");
    assert_eq!(second.create_session("kept").await["isCached"], json!(true));
    assert_eq!(
        second
            .append("kept", "in", "after restart", None)
            .await
            .status(),
        200
    );
    assert_eq!(
        second.wait_for_records("kept", "in", 2, WAIT).await[1].seq_num,
        1
    );
    second.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_binary_runs_embedded_without_contacting_any_configured_service() {
    use std::io::{BufRead, BufReader};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // Listeners on the ports the "wrong" URLs point to: any contact would be counted.
    let contacts = Arc::new(AtomicUsize::new(0));
    let mut urls = Vec::new();
    for scheme in ["postgres://x@", "amqp://", "redis://"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        urls.push(format!("{scheme}127.0.0.1:{port}/x"));
        let contacts = contacts.clone();
        tokio::spawn(async move {
            while listener.accept().await.is_ok() {
                contacts.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let dir = data_dir();
    let mut child = std::process::Command::new(tests::workspace_binary("sessions-api"))
        .env("SESSIONS_MODE", "embedded")
        .env("SESSIONS_DATA_DIR", &dir)
        .env("SESSIONS_HTTP_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", &urls[0])
        .env("AMQP_URL", &urls[1])
        .env("REDIS_URL", &urls[2])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("binary starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut address = String::new();
    let mut key = String::new();
    for _ in 0..3 {
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        if let Some(rest) = line.split("listening on ").nth(1) {
            address = rest.trim().to_owned();
        }
        if let Some(rest) = line.strip_prefix("secret key:") {
            key = rest.trim().to_owned();
        }
    }
    assert!(
        address.starts_with("http://127.0.0.1:"),
        "printed its address"
    );
    assert!(key.starts_with("tr_sk_"), "printed a ready-to-use key");
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{address}/api/v1/sessions"))
        .bearer_auth(&key)
        .json(&json!({"type": "chat", "externalId": "bin", "taskIdentifier": "a", "triggerConfig": {"basePayload": {}}}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let appended = client
        .post(format!("{address}/realtime/v1/sessions/bin/in/append"))
        .bearer_auth(&key)
        .body("hello")
        .send()
        .await
        .expect("append");
    assert_eq!(appended.status(), 200);
    let records: Value = client
        .get(format!("{address}/realtime/v1/sessions/bin/in/records"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("records")
        .json()
        .await
        .expect("json");
    assert_eq!(records["records"][0]["data"], json!("hello"));
    let ready = client
        .get(format!("{address}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    // SIGTERM: the server stops on its own, every task of it ended, without using its grace
    // (the in-process broker lets go of the api's reply and notification listeners).
    let signalled = std::time::Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        if signalled.elapsed() > api::SHUTDOWN_GRACE * 3 {
            let _ = child.kill();
            panic!("the embedded server did not stop after SIGTERM");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let took = signalled.elapsed();
    println!("stopped {took:?} after SIGTERM");
    assert!(exit.success(), "exits 0 on SIGTERM, got {exit}");
    assert!(
        took < api::SHUTDOWN_GRACE,
        "nothing held the shutdown until its grace ran out: {took:?}"
    );
    assert_eq!(
        contacts.load(Ordering::SeqCst),
        0,
        "no configured service was contacted"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
