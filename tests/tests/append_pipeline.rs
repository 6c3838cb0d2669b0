//! The append pipeline end to end against real RabbitMQ, Postgres and Redis:
//! api → partition queues → worker → Postgres, with permanent X-Part-Id dedup.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{ChildWorker, SpawnOptions, TestApp, metric_sum, proxy::TcpProxy};
use tokio::task::JoinSet;

const WAIT: Duration = Duration::from_secs(60);

fn body_for(session: usize, n: usize) -> String {
    json!({ "session": session, "n": n, "text": "x".repeat(64) }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_sessions_many_appends_are_persisted_once_in_send_order() {
    appends_are_persisted_once_in_send_order(TestApp::spawn().await, 100, 100).await;
}

/// Several batches applied at once (each its own transaction) never share a partition, so the
/// same guarantees hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_apply_lanes_keep_send_order_and_write_once() {
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("SESSIONS_WORKER_APPLY_LANES", "4")],
        ..SpawnOptions::default()
    })
    .await;
    assert_eq!(app.settings.worker_apply_lanes, 4);
    appends_are_persisted_once_in_send_order(app, 64, 60).await;
}

async fn appends_are_persisted_once_in_send_order(app: TestApp, sessions: usize, appends: usize) {
    for s in 0..sessions {
        app.create_session(&format!("load-{s}")).await;
    }
    let app = std::sync::Arc::new(app);
    let mut producers = JoinSet::new();
    for s in 0..sessions {
        let app = app.clone();
        producers.spawn(async move {
            for n in 0..appends {
                let response = app
                    .append(
                        &format!("load-{s}"),
                        "in",
                        &body_for(s, n),
                        Some(&format!("part-{n}")),
                    )
                    .await;
                assert_eq!(response.status(), 200, "append {s}/{n}");
            }
        });
    }
    while let Some(result) = producers.join_next().await {
        result.expect("producer");
    }
    for s in 0..sessions {
        let records = app
            .wait_for_records(&format!("load-{s}"), "in", appends, WAIT)
            .await;
        assert_eq!(
            records.len(),
            appends,
            "session {s}: every record exactly once"
        );
        for (n, record) in records.iter().enumerate() {
            assert_eq!(record.seq_num, n as i64, "session {s}: gapless seqNum");
            assert_eq!(record.data, body_for(s, n), "session {s}: send order");
            assert_eq!(record.id, format!("part-{n}"));
        }
    }
    let app = std::sync::Arc::into_inner(app).expect("producers finished");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_part_id_concurrently_and_sequentially_yields_one_record() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    app.create_session("dedup").await;
    let mut retries = JoinSet::new();
    for _ in 0..8 {
        let app = app.clone();
        retries.spawn(async move {
            app.append("dedup", "in", "{\"v\":1}", Some("same"))
                .await
                .status()
        });
    }
    while let Some(status) = retries.join_next().await {
        assert_eq!(status.expect("request"), 200);
    }
    for _ in 0..3 {
        assert_eq!(
            app.append("dedup", "in", "{\"v\":1}", Some("same"))
                .await
                .status(),
            200
        );
    }
    // Same key, other body: refused by the fence (409: an `in` append answers after the worker
    // applied it), the first body stays.
    assert_eq!(
        app.append("dedup", "in", "{\"v\":2}", Some("same"))
            .await
            .status(),
        409
    );
    // A marker appended last tells us the worker applied everything before it.
    assert_eq!(
        app.append("dedup", "in", "marker", Some("marker"))
            .await
            .status(),
        200
    );
    let records = app.wait_for_records("dedup", "in", 2, WAIT).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0].data, "{\"v\":1}");
    assert_eq!(records[0].id, "same");
    assert_eq!(records[1].data, "marker");
    let app = std::sync::Arc::into_inner(app).expect("single owner");
    app.cleanup().await;
}

#[tokio::test]
async fn dedup_keys_of_different_tuples_never_collide() {
    let app = TestApp::spawn().await;
    // "chat:in:x" + "in" + "p" and "chat" + "in" + "x:in:p" join to the same text.
    app.create_session("chat:in:x").await;
    app.create_session("chat").await;
    assert_eq!(
        app.append("chat:in:x", "in", "a", Some("p")).await.status(),
        200
    );
    assert_eq!(
        app.append("chat", "in", "b", Some("x:in:p")).await.status(),
        200
    );
    // The same part id on the other channel of one session is another key too.
    assert_eq!(
        app.append("chat", "out", "c", Some("x:in:p"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.wait_for_records("chat:in:x", "in", 1, WAIT).await.len(),
        1
    );
    assert_eq!(app.wait_for_records("chat", "in", 1, WAIT).await.len(), 1);
    assert_eq!(app.wait_for_records("chat", "out", 1, WAIT).await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn create_is_idempotent_per_external_id_and_announces_one_run() {
    let app = TestApp::spawn().await;
    let first = app.create_session("idem").await;
    let second = app.create_session("idem").await;
    assert_eq!(first["isCached"], json!(false));
    assert_eq!(second["isCached"], json!(true));
    assert_eq!(first["id"], second["id"]);
    assert_eq!(first["runId"], second["runId"]);
    assert_eq!(first["currentRunId"], first["runId"]);
    for key in [
        "externalId",
        "metadata",
        "closedAt",
        "closedReason",
        "expiresAt",
        "tags",
        "createdAt",
        "updatedAt",
    ] {
        assert!(first.get(key).is_some(), "SessionItem key {key} present");
    }
    assert!(
        first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("session_"))
    );
    assert!(
        first["runId"]
            .as_str()
            .is_some_and(|id| id.starts_with("run_"))
    );
    assert_eq!(
        first["publicAccessToken"]
            .as_str()
            .map(|token| token.split('.').count()),
        Some(3)
    );
    // A session without externalId is always new.
    let anonymous = app
        .create_session_with(
            &app.secret_key,
            json!({"type": "chat", "taskIdentifier": "agent", "triggerConfig": {"basePayload": {}}}),
        )
        .await;
    assert_eq!(anonymous.status(), 201);
    assert_eq!(
        app.store
            .count_rows(shared::storage::CountedTable::Runs)
            .await
            .ok(),
        Some(2)
    );
    app.cleanup().await;
}

#[tokio::test]
async fn closed_and_expired_sessions_refuse_appends_and_creates() {
    let app = TestApp::spawn().await;
    app.create_session("to-close").await;
    assert_eq!(
        app.append("to-close", "in", "before", None).await.status(),
        200
    );
    let closed = app
        .client
        .post(app.url("/api/v1/sessions/to-close/close"))
        .bearer_auth(&app.secret_key)
        .json(&json!({"reason": "done"}))
        .send()
        .await
        .expect("close");
    assert_eq!(closed.status(), 200);
    let closed: Value = closed.json().await.expect("json");
    assert_eq!(closed["closedReason"], json!("done"));
    // Idempotent: a second close returns the row unchanged.
    let again: Value = app
        .client
        .post(app.url("/api/v1/sessions/to-close/close"))
        .bearer_auth(&app.secret_key)
        .json(&json!({}))
        .send()
        .await
        .expect("close again")
        .json()
        .await
        .expect("json");
    assert_eq!(again["closedAt"], closed["closedAt"]);
    // The refusal the official chat transport treats as terminal: 409, code session_closed.
    let refused = app.append("to-close", "in", "after", None).await;
    assert_eq!(refused.status(), 409);
    let refused: Value = refused.json().await.expect("json");
    assert_eq!(
        refused,
        json!({"ok": false, "error": "Cannot append to a closed session",
               "code": "session_closed", "closedReason": "done"})
    );
    let create_closed = app
        .create_session_with(
            &app.secret_key,
            json!({"type": "chat", "externalId": "to-close", "taskIdentifier": "agent", "triggerConfig": {"basePayload": {}}}),
        )
        .await;
    assert_eq!(create_closed.status(), 409);

    // Expiry: in the past at create → 409 and nothing written; reached later → appends refused.
    let sessions_before = app
        .store
        .count_rows(shared::storage::CountedTable::Sessions)
        .await
        .ok();
    let past = app
        .create_session_with(
            &app.secret_key,
            json!({"type": "chat", "externalId": "past", "taskIdentifier": "agent",
                   "triggerConfig": {"basePayload": {}}, "expiresAt": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(past.status(), 409);
    assert_eq!(
        app.store
            .count_rows(shared::storage::CountedTable::Sessions)
            .await
            .ok(),
        sessions_before
    );
    let soon = (chrono::Utc::now() + chrono::TimeDelta::milliseconds(1500)).to_rfc3339();
    let expiring = app
        .create_session_with(
            &app.secret_key,
            json!({"type": "chat", "externalId": "soon", "taskIdentifier": "agent",
                   "triggerConfig": {"basePayload": {}}, "expiresAt": soon}),
        )
        .await;
    assert_eq!(expiring.status(), 201);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let late = app.append("soon", "in", "late", None).await;
    assert_eq!(late.status(), 409);
    let late: Value = late.json().await.expect("json");
    assert_eq!(late["code"], json!("session_closed"));
    assert_eq!(late["closedReason"], json!("expired"));

    // The close appended its message to `in` after the last accepted record, and nothing else.
    let records = app.wait_for_records("to-close", "in", 2, WAIT).await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].data, "before");
    assert_eq!(
        serde_json::from_str::<Value>(&records[1].data).expect("close message"),
        json!({"kind": "message",
               "payload": {"chatId": "to-close", "trigger": "close", "closedReason": "done"}})
    );
    assert!(app.records("soon", "in").await.is_empty());
    app.cleanup().await;
}

/// Sends a raw HTTP/1.1 request and returns the status code.
async fn raw_status(address: &str, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buffer = vec![0_u8; 1024];
    let read = stream.read(&mut buffer).await.expect("read");
    let head = String::from_utf8_lossy(&buffer[..read]);
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let app = TestApp::spawn().await;
    app.create_session("bad").await;
    let count = |app: &TestApp| {
        let store = app.store.clone();
        async move {
            (
                store
                    .count_rows(shared::storage::CountedTable::Sessions)
                    .await
                    .ok(),
                store
                    .count_rows(shared::storage::CountedTable::Records)
                    .await
                    .ok(),
            )
        }
    };
    let before = count(&app).await;

    assert_eq!(app.append("bad", "sideways", "x", None).await.status(), 400);
    let oversized = "x".repeat((1 << 20) + 1);
    assert_eq!(
        app.append("bad", "in", &oversized, None).await.status(),
        413
    );
    assert_eq!(
        app.append("bad", "in", "x", Some(&"p".repeat(256)))
            .await
            .status(),
        400
    );
    assert_eq!(app.append("bad", "in", "x", Some("")).await.status(), 400);
    assert_eq!(
        app.append(&"e".repeat(300), "in", "x", None).await.status(),
        400
    );
    assert_eq!(app.append("missing", "in", "x", None).await.status(), 404);
    assert_eq!(
        app.append("session_missing", "in", "x", None)
            .await
            .status(),
        404
    );
    assert_eq!(
        app.append_as("tr_sk_wrong", "bad", "in", "x", None)
            .await
            .status(),
        401
    );
    let unauthenticated = app
        .client
        .post(app.url("/realtime/v1/sessions/bad/in/append"))
        .body("x")
        .send()
        .await
        .expect("request");
    assert_eq!(unauthenticated.status(), 401);
    let error: Value = unauthenticated.json().await.expect("json error body");
    assert!(error["error"].is_string());
    // Chunked, so no content-length.
    let chunked = format!(
        "POST /realtime/v1/sessions/bad/in/append HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1\r\nx\r\n0\r\n\r\n",
        app.secret_key
    );
    assert_eq!(raw_status(&app.address, &chunked).await, 411);
    // Invalid UTF-8 body.
    let invalid_utf8 = app
        .client
        .post(app.url("/realtime/v1/sessions/bad/in/append"))
        .bearer_auth(&app.secret_key)
        .body(vec![0xff_u8, 0xfe, 0x00])
        .send()
        .await
        .expect("request");
    assert_eq!(invalid_utf8.status(), 400);

    let create = |body: &'static str| {
        app.client
            .post(app.url("/api/v1/sessions"))
            .bearer_auth(&app.secret_key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(create("{not json").await.expect("request").status(), 400);
    assert_eq!(
        create("{\"type\":\"chat\"}")
            .await
            .expect("request")
            .status(),
        400
    );
    let long_external_id = json!({"type": "chat", "externalId": "e".repeat(257), "taskIdentifier": "a", "triggerConfig": {"basePayload": {}}});
    assert_eq!(
        app.create_session_with(&app.secret_key, long_external_id)
            .await
            .status(),
        400
    );
    let reserved = json!({"type": "chat", "externalId": "session_x", "taskIdentifier": "a", "triggerConfig": {"basePayload": {}}});
    assert_eq!(
        app.create_session_with(&app.secret_key, reserved)
            .await
            .status(),
        400
    );
    let eleven_tags = json!({"type": "chat", "externalId": "t", "taskIdentifier": "a", "triggerConfig": {"basePayload": {}}, "tags": vec!["t"; 11]});
    assert_eq!(
        app.create_session_with(&app.secret_key, eleven_tags)
            .await
            .status(),
        400
    );
    let no_payload =
        json!({"type": "chat", "externalId": "t", "taskIdentifier": "a", "triggerConfig": {}});
    assert_eq!(
        app.create_session_with(&app.secret_key, no_payload)
            .await
            .status(),
        400
    );
    assert_eq!(
        app.client
            .get(app.url("/realtime/v1/sessions/bad/in/records?afterEventId=abc"))
            .bearer_auth(&app.secret_key)
            .send()
            .await
            .expect("request")
            .status(),
        400
    );

    // One good append after all of that: once it is applied, nothing else was.
    assert_eq!(app.append("bad", "in", "good", None).await.status(), 200);
    let records = app.wait_for_records("bad", "in", 1, WAIT).await;
    assert_eq!(records.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = count(&app).await;
    assert_eq!(after.0, before.0, "no session row from refused input");
    assert_eq!(
        after.1.map(|n| n - 1),
        before.1,
        "exactly the one good record"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn environments_never_see_each_others_sessions() {
    let app = TestApp::spawn().await;
    let other_key = app.create_environment("prod").await;
    app.create_session("shared-name").await;
    assert_eq!(
        app.append("shared-name", "in", "from A", None)
            .await
            .status(),
        200
    );
    // Environment B addresses the same externalId: it does not exist there.
    assert_eq!(
        app.append_as(&other_key, "shared-name", "in", "from B", None)
            .await
            .status(),
        404
    );
    let b_records: Value = app
        .client
        .get(app.url("/realtime/v1/sessions/shared-name/in/records"))
        .bearer_auth(&other_key)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(b_records, json!({"records": []}));
    // B creates its own session with the same externalId: a different session.
    let b_session: Value = app
        .create_session_with(
            &other_key,
            json!({"type": "chat", "externalId": "shared-name", "taskIdentifier": "agent", "triggerConfig": {"basePayload": {}}}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(b_session["isCached"], json!(false));
    assert_eq!(
        app.append_as(&other_key, "shared-name", "in", "from B", None)
            .await
            .status(),
        200
    );
    let a_records = app.wait_for_records("shared-name", "in", 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.records("shared-name", "in").await, a_records);
    assert_eq!(a_records.len(), 1);
    assert_eq!(a_records[0].data, "from A");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_mid_load_loses_duplicates_and_reorders_nothing() {
    let app = std::sync::Arc::new(
        TestApp::spawn_with(SpawnOptions {
            without_worker: true,
            ..SpawnOptions::default()
        })
        .await,
    );
    let first_worker = ChildWorker::spawn(&app.settings);
    let sessions = 20;
    let appends = 100;
    for s in 0..sessions {
        app.create_session(&format!("kill-{s}")).await;
    }
    let mut producers = JoinSet::new();
    for s in 0..sessions {
        let app = app.clone();
        producers.spawn(async move {
            for n in 0..appends {
                let response = app
                    .append(
                        &format!("kill-{s}"),
                        "in",
                        &body_for(s, n),
                        Some(&format!("k{n}")),
                    )
                    .await;
                assert_eq!(response.status(), 200);
            }
        });
    }
    // Kill while the load runs, then start a replacement.
    tokio::time::sleep(Duration::from_millis(700)).await;
    first_worker.kill_9().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second_worker = ChildWorker::spawn(&app.settings);
    tokio::time::sleep(Duration::from_millis(700)).await;
    second_worker.kill_9().await;
    let third_worker = ChildWorker::spawn(&app.settings);
    while let Some(result) = producers.join_next().await {
        result.expect("producer");
    }
    for s in 0..sessions {
        let records = app
            .wait_for_records(&format!("kill-{s}"), "in", appends, WAIT)
            .await;
        assert_eq!(
            records.len(),
            appends,
            "session {s}: nothing lost or duplicated"
        );
        for (n, record) in records.iter().enumerate() {
            assert_eq!(record.seq_num, n as i64);
            assert_eq!(record.data, body_for(s, n), "session {s}: order kept");
        }
    }
    third_worker.kill_9().await;
    let app = std::sync::Arc::into_inner(app).expect("single owner");
    app.cleanup().await;
}

#[tokio::test]
async fn broker_outage_answers_503_never_2xx_and_recovers_without_restart() {
    let upstream: std::net::SocketAddr = "127.0.0.1:5672".parse().expect("address");
    let proxy = TcpProxy::start(upstream).await;
    let app = TestApp::spawn_with(SpawnOptions {
        api_amqp_url: Some(format!(
            "amqp://guest:guest@{}/%2f?heartbeat=5",
            proxy.address
        )),
        ..SpawnOptions::default()
    })
    .await;
    app.create_session("outage").await;
    assert_eq!(
        app.append("outage", "in", "before", None).await.status(),
        200
    );

    proxy.disable();
    for attempt in 0..5 {
        let status = app
            .append("outage", "in", &format!("during-{attempt}"), None)
            .await
            .status();
        assert_eq!(
            status, 503,
            "attempt {attempt} while the broker is unreachable"
        );
    }

    proxy.enable();
    let mut recovered = false;
    for _ in 0..50 {
        let status = app
            .append("outage", "in", "after", Some("after"))
            .await
            .status();
        if status == 200 {
            recovered = true;
            break;
        }
        assert_eq!(status, 503);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "appends flow again once the broker is back");
    let records = app.wait_for_records("outage", "in", 2, WAIT).await;
    let bodies: Vec<&str> = records.iter().map(|record| record.data.as_str()).collect();
    assert_eq!(bodies, ["before", "after"], "no 503 left a record");
    app.cleanup().await;
}

#[tokio::test]
async fn undecodable_command_is_dead_lettered_and_its_partition_keeps_flowing() {
    let app = TestApp::spawn().await;
    app.create_session("poison").await;
    let link = shared::broker::BrokerLink::new(
        shared::broker::BrokerConfig::from_settings(&app.settings, "poison-test".into(), None),
        None,
    );
    for partition in 0..app.settings.partitions {
        link.publish_commands(partition, "poison", None, b"not an envelope")
            .await
            .expect("published");
    }
    assert_eq!(
        app.append("poison", "in", "still flowing", None)
            .await
            .status(),
        200
    );
    assert_eq!(app.wait_for_records("poison", "in", 1, WAIT).await.len(), 1);
    let mut dead = Vec::new();
    for _ in 0..50 {
        dead = app.store.dead_letters().await.expect("dead letters");
        if dead.len() == usize::from(app.settings.partitions) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), usize::from(app.settings.partitions));
    // Each is recorded with where it was in its log, its payload and why.
    let mut partitions: Vec<u16> = dead.iter().map(|letter| letter.partition).collect();
    partitions.sort_unstable();
    assert_eq!(partitions, (0..app.settings.partitions).collect::<Vec<_>>());
    for letter in &dead {
        assert_eq!(letter.payload, b"not an envelope");
        assert!(letter.offset.is_some(), "{letter:?}");
        assert!(letter.reason.contains("envelope"), "{letter:?}");
    }
    link.close().await;
    app.cleanup().await;
}

/// An `in` append waits a bounded time for its `seq`: with no worker to apply it, it answers
/// `{ok: true}` without one once `SESSIONS_IN_APPEND_WAIT_MS` passed (it is durably queued), and
/// the record is written when a worker comes back.
#[tokio::test]
async fn an_in_append_answers_without_seq_when_no_worker_applies_it_in_time() {
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("SESSIONS_IN_APPEND_WAIT_MS", "300")],
        without_worker: true,
        ..SpawnOptions::default()
    })
    .await;
    let worker = ChildWorker::spawn(&app.settings);
    app.create_session("late").await;
    let applied: Value = app
        .append("late", "in", "first", Some("p1"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(applied["seq"], json!(0));
    worker.kill_9().await;
    let sent = std::time::Instant::now();
    let queued = app.append("late", "in", "second", Some("p2")).await;
    assert_eq!(queued.status(), 200);
    assert_eq!(
        queued.json::<Value>().await.expect("json"),
        json!({"ok": true})
    );
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "{:?}",
        sent.elapsed()
    );
    let _replacement = ChildWorker::spawn(&app.settings);
    let records = app.wait_for_records("late", "in", 2, WAIT).await;
    assert_eq!(
        records
            .iter()
            .map(|record| record.data.as_str())
            .collect::<Vec<_>>(),
        ["first", "second"]
    );
    // A retry of the part id, now applied, gets the record's seq.
    let retried: Value = app
        .append("late", "in", "second", Some("p2"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(retried["seq"], json!(1));
    assert_eq!(retried["duplicate"], json!(true));
    app.cleanup().await;
}

/// `sessions_api_publish_batch_size` as (messages published, commands they carried).
async fn published_batches(app: &TestApp) -> (f64, f64) {
    let metrics = app.metrics_text().await;
    (
        metric_sum(&metrics, "sessions_api_publish_batch_size_count"),
        metric_sum(&metrics, "sessions_api_publish_batch_size_sum"),
    )
}

/// With a linger (`SESSIONS_PUBLISH_LINGER_US`), appends that arrive while a partition's task
/// waits go out in one broker message, and every one of them is still persisted once. The
/// appends are sent 10 ms apart, so without the linger each would find the partition idle and go
/// alone (one message each); with 100 ms they all arrive within the first one's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_within_the_publish_linger_share_broker_messages() {
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("SESSIONS_PUBLISH_LINGER_US", "100000")],
        ..SpawnOptions::default()
    })
    .await;
    assert_eq!(app.settings.publish_linger, Duration::from_millis(100));
    app.create_session("linger").await;
    let (messages_before, commands_before) = published_batches(&app).await;
    let app = std::sync::Arc::new(app);
    let appends = 4;
    let mut producers = JoinSet::new();
    for n in 0..appends {
        let app = app.clone();
        producers.spawn(async move {
            let response = app
                .append("linger", "out", &body_for(0, n), Some(&format!("part-{n}")))
                .await;
            assert_eq!(response.status(), 200, "append {n}");
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while let Some(result) = producers.join_next().await {
        result.expect("producer");
    }
    let (messages_after, commands_after) = published_batches(&app).await;
    assert_eq!(
        commands_after - commands_before,
        appends as f64,
        "every append was published"
    );
    let messages = messages_after - messages_before;
    // One message; two leave room for a very slow machine delaying a send past the linger.
    assert!(
        messages <= 2.0,
        "{appends} appends sent 10 ms apart within a 100 ms linger took {messages} broker messages"
    );
    let mut records = app.wait_for_records("linger", "out", appends, WAIT).await;
    assert_eq!(
        records.len(),
        appends,
        "every append persisted exactly once"
    );
    records.sort_by_key(|record| record.id.clone());
    assert_eq!(
        records
            .iter()
            .map(|record| record.id.clone())
            .collect::<Vec<_>>(),
        (0..appends)
            .map(|n| format!("part-{n}"))
            .collect::<Vec<_>>()
    );
    let app = std::sync::Arc::into_inner(app).expect("producers finished");
    app.cleanup().await;
}

/// Admission control: an instance handles at most `SESSIONS_MAX_APPENDS_IN_FLIGHT` appends at
/// once; one more is answered 503 with `Retry-After` at once and writes nothing, and a slot is
/// free again as soon as an append is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_past_the_in_flight_bound_get_503_with_retry_after_and_write_nothing() {
    let app = std::sync::Arc::new(
        TestApp::spawn_with(SpawnOptions {
            overrides: &[
                ("SESSIONS_MAX_APPENDS_IN_FLIGHT", "2"),
                ("SESSIONS_IN_APPEND_WAIT_MS", "3000"),
            ],
            without_worker: true,
            ..SpawnOptions::default()
        })
        .await,
    );
    assert_eq!(app.settings.max_appends_in_flight, 2);
    let setup = ChildWorker::spawn(&app.settings);
    app.create_session("capacity").await;
    setup.kill_9().await;
    // Two `in` appends wait for a worker that is not there (up to the 3 s wait): both slots
    // are taken while they do.
    let mut held = JoinSet::new();
    for n in 0..2 {
        let app = app.clone();
        held.spawn(async move {
            app.append(
                "capacity",
                "in",
                &format!("held-{n}"),
                Some(&format!("h{n}")),
            )
            .await
            .status()
        });
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let refused = app
        .append("capacity", "out", "refused", Some("refused"))
        .await;
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok()),
        Some("1")
    );
    let body: Value = refused.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|error| error.contains("capacity")),
        "{body}"
    );
    while let Some(status) = held.join_next().await {
        assert_eq!(status.expect("held append"), 200);
    }
    // Answered appends give their slots back.
    let after = app.append("capacity", "out", "after", Some("after")).await;
    assert_eq!(after.status(), 200);
    let _worker = ChildWorker::spawn(&app.settings);
    let held_records = app.wait_for_records("capacity", "in", 2, WAIT).await;
    assert_eq!(held_records.len(), 2);
    // One partition holds the session in publish order: had the refused append been
    // published, it would be applied before `after`.
    let out = app.wait_for_records("capacity", "out", 1, WAIT).await;
    assert_eq!(
        out.iter()
            .map(|record| record.data.as_str())
            .collect::<Vec<_>>(),
        ["after"]
    );
    let app = std::sync::Arc::into_inner(app).expect("appends finished");
    app.cleanup().await;
}
