//! Operations surface of the worker process: health, readiness naming the failing dependency,
//! and Prometheus metrics.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{ChildWorker, TestApp};

use tests::free_port;

async fn get_when_up(client: &reqwest::Client, url: &str) -> reqwest::Response {
    for _ in 0..100 {
        if let Ok(response) = client.get(url).send().await {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never answered");
}

#[tokio::test]
async fn the_worker_serves_health_readiness_and_metrics() {
    let app = TestApp::spawn_with(tests::SpawnOptions {
        without_worker: true,
        ..tests::SpawnOptions::default()
    })
    .await;
    let port = free_port();
    let mut settings = app.settings.clone();
    settings.worker_http_addr = format!("127.0.0.1:{port}").parse().expect("address");
    let worker = ChildWorker::spawn(&settings);
    let base = format!("http://127.0.0.1:{port}");
    let health = get_when_up(&app.client, &format!("{base}/healthz")).await;
    assert_eq!(health.status(), 200);
    // The worker applies commands, and its metrics say so.
    app.create_session("ops").await;
    app.append("ops", "in", "x", None).await;
    app.wait_for_records("ops", "in", 1, Duration::from_secs(30))
        .await;
    let ready = app
        .client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let metrics = app
        .client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("sessions_worker_commands_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sessions_worker_apply_seconds_bucket"),
        "histograms have buckets"
    );
    for expected in [
        "sessions_worker_command_lag_seconds_bucket",
        "sessions_worker_partitions_active",
        "sessions_build_info",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(expected), "{expected} missing");
    }
    worker.kill_9().await;

    // A worker whose broker is unreachable is alive but not ready, and says why.
    let port = free_port();
    let mut broken = app.settings.clone();
    broken.worker_http_addr = format!("127.0.0.1:{port}").parse().expect("address");
    broken.amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let worker = ChildWorker::spawn(&broken);
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        get_when_up(&app.client, &format!("{base}/healthz"))
            .await
            .status(),
        200
    );
    let not_ready = app
        .client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(not_ready.status(), 503);
    let body: Value = not_ready.json().await.expect("json");
    assert_eq!(body["failing"], json!(["broker"]));
    worker.kill_9().await;
    app.cleanup().await;
}

/// Writes a dead letter row directly (the harness may talk to the database).
async fn park_dead_letter(app: &TestApp, partition: u16, message_id: &str, payload: &[u8]) {
    use sea_orm::ConnectionTrait;
    let database = sea_orm::Database::connect(app.settings.database_url.as_str())
        .await
        .expect("database");
    database
        .execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "INSERT INTO dead_letters (id, log, partition, log_offset, message_id, payload, \
             reason, created_at) VALUES ($1, $2, $3, 0, $4, $5, 'parked by the test', now())",
            [
                uuid::Uuid::now_v7().into(),
                format!("{}.log.p{partition:03}", app.settings.broker_prefix).into(),
                i32::from(partition).into(),
                message_id.to_owned().into(),
                payload.to_vec().into(),
            ],
        ))
        .await
        .expect("dead letter parked");
    let _ = database.close().await;
}

#[tokio::test]
async fn dead_letters_are_listed_with_their_reason_and_replayed_to_their_partition() {
    let app = TestApp::spawn().await;
    app.create_session("dl").await;
    let link = shared::broker::BrokerLink::new(
        shared::broker::BrokerConfig::from_settings(&app.settings, "dl-test".into(), None),
        None,
    );
    // A poison message: dead-lettered by the worker with its reason.
    link.publish_commands(0, "poison-1", None, b"not an envelope")
        .await
        .expect("publish");
    // A valid command recorded as a dead letter (as an operator would find one after fixing
    // what made it fail): written straight into the table.
    let session_id = app.session_row("dl").await;
    let command = shared::commands::Command::new(
        session_id.environment_id,
        session_id.id,
        chrono::Utc::now(),
        shared::commands::CommandBody::Append(shared::commands::AppendCommand {
            io: shared::domain::Io::In,
            channel: None,
            part_id: Some("replayed".into()),
            body: "back from the dead".into(),
            headers: Vec::new(),
            body_is_envelope: false,
        }),
    );
    let partition = shared::domain::partition::partition_of(session_id.id, app.settings.partitions);
    park_dead_letter(
        &app,
        partition,
        "valid-1",
        &shared::commands::Envelope::new(vec![command]).encode(),
    )
    .await;
    let mut listed = Vec::new();
    for _ in 0..50 {
        listed = tests::worker_admin(&app.settings, &["admin", "dead-letters", "list"]);
        if listed.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed.len(), 2, "{listed:?}");
    let poison = listed
        .iter()
        .find(|letter| letter["messageId"] == json!("poison-1"))
        .expect("poison listed");
    assert!(
        poison["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("envelope")),
        "{poison}"
    );
    let valid = listed
        .iter()
        .find(|letter| letter["messageId"] == json!("valid-1"))
        .expect("valid listed");
    assert_eq!(valid["partition"], json!(partition));
    assert_eq!(valid["session"], json!(session_id.id.to_string()));
    assert!(valid["ageSeconds"].is_number());

    let replayed = tests::worker_admin(
        &app.settings,
        &["admin", "dead-letters", "replay", "valid-1"],
    );
    assert_eq!(replayed, vec![json!({"replayed": 1})]);
    let records = app
        .wait_for_records("dl", "in", 1, Duration::from_secs(30))
        .await;
    assert_eq!(
        records.first().map(|r| r.data.as_str()),
        Some("back from the dead")
    );
    let remaining = tests::worker_admin(&app.settings, &["admin", "dead-letters", "list"]);
    assert_eq!(remaining.len(), 1);
    assert_eq!(remaining[0]["messageId"], json!("poison-1"));
    link.close().await;
    app.cleanup().await;
}

#[tokio::test]
async fn api_metrics_use_route_templates_never_ids() {
    let app = TestApp::spawn().await;
    // The first scrape installs the recorder of this test process.
    app.client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    let created = app.create_session("metered").await;
    let friendly = created["id"].as_str().expect("id").to_owned();
    app.client
        .get(app.url(&format!("/api/v1/sessions/{friendly}")))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("retrieve");
    app.append("metered", "in", "x", None).await;
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("sessions_api_requests_total{route=\"/api/v1/sessions/{session}\",method=\"GET\",status=\"200\"}"), "{metrics}");
    assert!(metrics.contains("sessions_api_request_duration_seconds_bucket"));
    assert!(metrics.contains("sessions_api_appends_accepted_total{io=\"in\"}"));
    assert!(metrics.contains("sessions_api_publish_seconds_bucket"));
    assert!(!metrics.contains(&friendly), "no ids in labels");
    assert!(!metrics.contains("metered"), "no externalIds in labels");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_the_batch_and_exits_cleanly_losing_nothing() {
    let app = std::sync::Arc::new(
        TestApp::spawn_with(tests::SpawnOptions {
            without_worker: true,
            ..tests::SpawnOptions::default()
        })
        .await,
    );
    let mut settings = app.settings.clone();
    settings.worker_http_addr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let worker = ChildWorker::spawn(&settings);
    for s in 0..5 {
        app.create_session(&format!("term-{s}")).await;
    }
    let mut producers = tokio::task::JoinSet::new();
    for s in 0..5 {
        let app = app.clone();
        producers.spawn(async move {
            for n in 0..60 {
                let status = app
                    .append(
                        &format!("term-{s}"),
                        "in",
                        &format!("{n}"),
                        Some(&format!("p{n}")),
                    )
                    .await
                    .status();
                assert_eq!(status, 200);
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = worker.terminate().await;
    assert!(
        status.success(),
        "the worker exits 0 on SIGTERM, got {status}"
    );
    let mut settings = app.settings.clone();
    settings.worker_http_addr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let replacement = ChildWorker::spawn(&settings);
    while let Some(result) = producers.join_next().await {
        result.expect("producer");
    }
    for s in 0..5 {
        let records = app
            .wait_for_records(&format!("term-{s}"), "in", 60, Duration::from_secs(60))
            .await;
        let bodies: Vec<String> = records.iter().map(|r| r.data.clone()).collect();
        assert_eq!(bodies, (0..60).map(|n| n.to_string()).collect::<Vec<_>>());
    }
    replacement.kill_9().await;
    let app = std::sync::Arc::into_inner(app).expect("single owner");
    app.cleanup().await;
}

async fn readiness(app: &TestApp) -> (u16, Value) {
    let response = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn readiness_becomes(app: &TestApp, status: u16) -> Value {
    for _ in 0..100 {
        let (now, body) = readiness(app).await;
        if now == status {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered {status}");
}

/// The api does not use Redis, so a Redis outage must not make its instances unready (a load
/// balancer would take every one of them out).
#[tokio::test]
async fn api_readiness_does_not_depend_on_redis() {
    let app = TestApp::spawn_with(tests::SpawnOptions {
        // Nothing listens on port 1.
        overrides: &[("REDIS_URL", "redis://127.0.0.1:1/")],
        without_worker: true,
        ..tests::SpawnOptions::default()
    })
    .await;
    let (status, body) = readiness(&app).await;
    assert_eq!(status, 200, "ready without Redis: {body}");
    app.cleanup().await;
}

#[tokio::test]
async fn api_readiness_names_a_lost_database_or_broker_and_recovers() {
    let broker = tests::proxy::TcpProxy::start("127.0.0.1:5672".parse().expect("address")).await;
    let database = tests::proxy::TcpProxy::start("127.0.0.1:5432".parse().expect("address")).await;
    let app = TestApp::spawn_with(tests::SpawnOptions {
        api_amqp_url: Some(format!(
            "amqp://guest:guest@{}/%2f?heartbeat=5",
            broker.address
        )),
        api_postgres_server: Some(format!("postgres://postgres@{}", database.address)),
        ..tests::SpawnOptions::default()
    })
    .await;
    assert_eq!(readiness(&app).await.0, 200);

    broker.disable();
    let body = readiness_becomes(&app, 503).await;
    assert_eq!(body["failing"], json!(["broker"]));
    broker.enable();
    readiness_becomes(&app, 200).await;

    database.disable();
    let body = readiness_becomes(&app, 503).await;
    assert_eq!(body["failing"], json!(["database"]));
    database.enable();
    readiness_becomes(&app, 200).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_sigterm_ends_live_streams_finishes_appends_and_exits_cleanly() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    app.create_session("api-term").await;
    let port = free_port();
    let address = format!("http://127.0.0.1:{port}");
    let mut api = tokio::process::Command::new(tests::workspace_binary("sessions-api"))
        .envs(app.settings.to_env())
        .env("SESSIONS_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("SESSIONS_MODE", "production")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("api process starts");
    let health = get_when_up(&app.client, &format!("{address}/healthz")).await;
    assert_eq!(health.status(), 200);

    // A live reader with a long deadline, and a producer on the stopping instance.
    let reader = app
        .subscribe_at(&address, "api-term", "in", &[("Timeout-Seconds", "600")])
        .await;
    assert_eq!(reader.status(), 200);
    let mut reader = tests::sse::SseReader::new(reader);
    let producer = {
        let (app, address) = (app.clone(), address.clone());
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            for n in 0..400 {
                let response = app
                    .client
                    .post(format!("{address}/realtime/v1/sessions/api-term/in/append"))
                    .bearer_auth(&app.secret_key)
                    .header("X-Part-Id", format!("t{n}"))
                    .body(n.to_string())
                    .send()
                    .await;
                match response {
                    Ok(response) if response.status() == 200 => accepted.push(n.to_string()),
                    // Refused or cut off once the instance stops accepting: not acknowledged.
                    _ => break,
                }
            }
            accepted
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = api.id().expect("pid");
    let signalled = std::time::Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(api::SHUTDOWN_GRACE + Duration::from_secs(10), api.wait())
        .await
        .expect("the api exits within its shutdown grace")
        .expect("exit status");
    assert!(exit.success(), "the api exits 0 on SIGTERM, got {exit}");
    // The live stream ended instead of holding the shutdown for its 600 s deadline.
    let mut ended = false;
    for _ in 0..1000 {
        match reader.next_event(Duration::from_secs(5)).await {
            Ok(None) | Err("stream failed") => {
                ended = true;
                break;
            }
            Ok(Some(_)) => {}
            Err(other) => panic!("the stream neither ended nor delivered: {other}"),
        }
    }
    assert!(ended, "the SSE stream ended at shutdown");
    println!("api stopped {:?} after SIGTERM", signalled.elapsed());

    // Every acknowledged append is persisted exactly once, in order.
    let accepted = producer.await.expect("producer");
    assert!(
        !accepted.is_empty(),
        "some appends were accepted before the stop"
    );
    let records = app
        .wait_for_records("api-term", "in", accepted.len(), Duration::from_secs(30))
        .await;
    let bodies: Vec<String> = records.iter().map(|record| record.data.clone()).collect();
    assert_eq!(bodies[..accepted.len()], accepted[..]);
    assert!(
        bodies.len() <= accepted.len() + 1,
        "at most the one cut-off append may also have landed"
    );
    let app = std::sync::Arc::into_inner(app).expect("single owner");
    app.cleanup().await;
}

/// Partition logs are streams declared with the retention settings, the `balanced` leader
/// locator and the configured `x-initial-cluster-size`. A log that already exists with other
/// arguments (declared with other retention settings) makes the broker refuse the declaration
/// with PRECONDITION_FAILED and close the channel: the process still starts, uses the log as it
/// is, and reports it.
#[tokio::test]
async fn partition_logs_with_other_arguments_are_used_as_they_are() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static DIFFERING: AtomicUsize = AtomicUsize::new(0);
    let name = tests::unique_name();
    let settings = tests::test_settings(
        &name,
        &[("SESSIONS_PARTITIONS", "3"), ("SESSIONS_LOG_REPLICAS", "1")],
    );
    let old_log = format!("{name}.log.p001");
    let connection = lapin::Connection::connect(tests::AMQP_URL, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut old_arguments = FieldTable::default();
    old_arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    old_arguments.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(1 << 30));
    channel
        .queue_declare(
            old_log.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            old_arguments,
        )
        .await
        .expect("the old declaration");
    let signals = shared::broker::BrokerSignals {
        queue_arguments_differ: |_, _| {
            DIFFERING.fetch_add(1, Ordering::SeqCst);
        },
        ..shared::broker::BrokerSignals::default()
    };
    let link = shared::broker::BrokerLink::new(
        shared::broker::BrokerConfig::from_settings(&settings, "old-log".into(), None)
            .with_signals(signals),
        None,
    );
    link.ensure_connected()
        .await
        .expect("starts despite the old log");
    assert_eq!(DIFFERING.load(Ordering::SeqCst), 1, "reported once");
    // The old log is bound and takes commands like the others (mandatory publishes: an
    // unbound queue would make them unroutable).
    link.publish_commands(1, "m1", None, b"{}")
        .await
        .expect("published to the old log");
    link.publish_commands(2, "m2", None, b"{}")
        .await
        .expect("published to a new log");
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name", "type", "arguments"])
        .output()
        .expect("rabbitmqctl");
    let listed = String::from_utf8_lossy(&listed.stdout);
    let line_of = |queue: &str| {
        listed
            .lines()
            .find(|line| line.starts_with(&format!("{queue}\t")))
            .unwrap_or_else(|| panic!("{queue} listed in {listed}"))
            .to_owned()
    };
    let new_log = line_of(&format!("{name}.log.p002"));
    for expected in [
        "stream",
        "x-queue-leader-locator",
        "balanced",
        "x-initial-cluster-size",
        "x-max-age",
        "x-stream-max-segment-size-bytes",
    ] {
        assert!(new_log.contains(expected), "{expected} in {new_log}");
    }
    let old = line_of(&old_log);
    assert!(!old.contains("x-queue-leader-locator"), "{old}");
    link.delete_topology().await.expect("delete");
    link.close().await;
    let _ = connection.close(200, "done".into()).await;
}

/// Runs `binary` with `settings` (and production mode) and returns its exit success and
/// stderr; fails the test if it is still running after `within` (it should have refused).
async fn refused_start(
    binary: &str,
    settings: &shared::config::Settings,
    within: Duration,
) -> (bool, String) {
    let child = tokio::process::Command::new(tests::workspace_binary(binary))
        .envs(settings.to_env())
        .env("SESSIONS_MODE", "production")
        .env("SESSIONS_HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let output = tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{binary} did not refuse to start within {within:?}"))
        .expect("exit status");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_changed_partition_count_refuses_to_start_naming_the_variable() {
    let app = TestApp::spawn().await;
    // The worker has recorded its partition logs once it applied something.
    app.create_session("partitioned").await;
    let mut changed = app.settings.clone();
    changed.partitions = app.settings.partitions * 2;
    for binary in ["sessions-api", "sessions-worker"] {
        let (succeeded, stderr) = refused_start(binary, &changed, Duration::from_secs(30)).await;
        assert!(!succeeded, "{binary} started with another partition count");
        assert!(
            stderr.contains(&format!("SESSIONS_PARTITIONS={}", app.settings.partitions)),
            "{binary}: {stderr}"
        );
    }
    // Nothing was published with the other count: the session still answers on its own log.
    let response = app.append("partitioned", "in", "still here", None).await;
    assert_eq!(response.status(), 200);
    app.cleanup().await;
}
