//! Upgrading from the version whose partitions were quorum queues: commands still in an old
//! partition queue are applied before anything of the new partition logs, in queue order, and
//! the old queue is deleted once empty (`SESSIONS_DRAIN_LEGACY_QUEUES=1`). And the schema
//! migration that moved the `X-Part-Id` fence out of `records`: part ids used before it stay
//! fenced after it.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use shared::commands::{AppendCommand, Command, CommandBody, Envelope};
use shared::domain::partition::partition_of;
use shared::storage::Store;
use tests::{InProcessWorker, SpawnOptions, TestApp};

/// The arguments the previous version declared its partition queues with.
fn legacy_queue_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    arguments.insert("x-delivery-limit".into(), AMQPValue::LongInt(20));
    arguments
}

/// Declares `queue` as the previous version declared its partition queues; returns how many
/// messages it holds.
async fn declare_legacy_queue(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            legacy_queue_arguments(),
        )
        .await
        .expect("the old partition queue")
        .message_count()
}

/// The queue the previous version used for `partition`, named as that version named it
/// (written out here rather than taken from the code under test: it is history).
fn legacy_queue(settings: &shared::config::Settings, partition: u16) -> String {
    format!("{}.p{partition:03}", settings.broker_prefix)
}

#[tokio::test]
async fn commands_left_in_legacy_partition_queues_are_applied_first_then_the_queues_go() {
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("SESSIONS_DRAIN_LEGACY_QUEUES", "1")],
        without_worker: true,
        ..SpawnOptions::default()
    })
    .await;
    // The session exists (created through the new path by a first worker).
    let first = InProcessWorker::spawn(app.settings.clone()).await;
    app.create_session("upgraded").await;
    assert_eq!(
        app.append("upgraded", "in", "1", Some("p1")).await.status(),
        200
    );
    app.wait_for_records("upgraded", "in", 1, Duration::from_secs(30))
        .await;
    first.stop().await;

    // What an old api instance left in the old queue of the session's partition.
    let session = app.session_row("upgraded").await;
    let partition = partition_of(session.id, app.settings.partitions);
    let legacy_queue = legacy_queue(&app.settings, partition);
    let connection = lapin::Connection::connect(tests::AMQP_URL, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    declare_legacy_queue(&channel, &legacy_queue).await;
    for body in ["2", "3"] {
        let command = Command::new(
            session.environment_id,
            session.id,
            chrono::Utc::now(),
            CommandBody::Append(AppendCommand {
                io: shared::domain::Io::In,
                channel: None,
                part_id: Some(format!("p{body}")),
                body: body.into(),
                headers: Vec::new(),
                body_is_envelope: false,
            }),
        );
        let confirm = channel
            .basic_publish(
                "".into(),
                legacy_queue.as_str().into(),
                BasicPublishOptions::default(),
                &Envelope::new(vec![command]).encode(),
                lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(format!("legacy-{body}").as_str().into()),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }
    // Accepted by the new api while no worker runs: it waits in the partition log.
    assert_eq!(
        app.append("upgraded", "in", "4", Some("p4")).await.status(),
        200
    );

    let upgraded = InProcessWorker::spawn(app.settings.clone()).await;
    let records = app
        .wait_for_records("upgraded", "in", 4, Duration::from_secs(30))
        .await;
    let bodies: Vec<&str> = records.iter().map(|record| record.data.as_str()).collect();
    assert_eq!(
        bodies,
        ["1", "2", "3", "4"],
        "old queue first, in order, once"
    );

    // The drained queue is gone: a passive declare is refused with NOT_FOUND.
    assert_eq!(
        tests::queue_message_count(&connection, &legacy_queue).await,
        None,
        "the drained legacy queue was deleted"
    );
    upgraded.stop().await;
    let _ = connection.close(200, "done".into()).await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_drain_refuses_when_the_old_version_had_more_partitions() {
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("SESSIONS_DRAIN_LEGACY_QUEUES", "1")],
        without_worker: true,
        ..SpawnOptions::default()
    })
    .await;
    // The previous version ran with more partitions than this one is configured with: its
    // queue just past the configured count still holds a command.
    let beyond = legacy_queue(&app.settings, app.settings.partitions);
    let connection = lapin::Connection::connect(tests::AMQP_URL, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    assert_eq!(declare_legacy_queue(&channel, &beyond).await, 0);
    channel
        .basic_publish(
            "".into(),
            beyond.as_str().into(),
            BasicPublishOptions::default(),
            b"an old command",
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish");
    // An append accepted by the new api meanwhile waits in its partition log.
    let created = app
        .client
        .post(app.url("/api/v1/sessions"))
        .bearer_auth(&app.secret_key)
        .json(&serde_json::json!({
            "type": "chat.agent", "externalId": "held", "taskIdentifier": "agent",
            "triggerConfig": {"basePayload": {}}
        }))
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    // The create waits for a worker that must not apply anything: it times out (504) or the
    // client gives up; either way nothing was created.
    assert!(created.map_or(true, |response| response.status() != 201
        && response.status() != 200));

    let worker = InProcessWorker::spawn(app.settings.clone()).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Nothing applied: the old queue keeps its message, and the session was not created.
    assert_eq!(
        tests::queue_message_count(&connection, &beyond).await,
        Some(1),
        "the old queue is still there and the drain did not take from it"
    );
    let listed = app
        .client
        .get(app.url("/api/v1/sessions/held"))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("retrieve");
    assert_eq!(
        listed.status(),
        404,
        "no command was applied from the new logs either"
    );
    worker.stop().await;
    let _ = channel
        .queue_delete(beyond.as_str().into(), Default::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
    app.cleanup().await;
}

/// Part ids taken before the migration that gave the `X-Part-Id` fence a table of its own
/// (`record_part_ids`) stay taken after it: the migration copies them from `records`. The test
/// puts the schema back as the previous version left it (no such table, the fence a unique
/// index of `records`), runs the migrations as a starting process does, and retries.
#[tokio::test]
async fn part_ids_used_before_the_fence_moved_to_its_own_table_stay_fenced() {
    let app = TestApp::spawn().await;
    app.create_session("upgraded").await;
    assert_eq!(
        app.append("upgraded", "in", "{\"v\":1}", Some("before"))
            .await
            .status(),
        200
    );
    app.wait_for_records("upgraded", "in", 1, Duration::from_secs(30))
        .await;
    let db = sea_orm::Database::connect(&app.settings.database_url)
        .await
        .expect("database");
    for sql in [
        "DROP TABLE record_part_ids",
        "CREATE UNIQUE INDEX records_part_id_fence \
         ON records (environment_id, session_id, io, part_id)",
        "DELETE FROM seaql_migrations WHERE version = 'm20261209_000009_record_part_ids'",
    ] {
        db.execute_unprepared(sql).await.expect(sql);
    }
    Store::connect(&app.settings.database_url, 1)
        .await
        .expect("the new version starts and migrates");
    let copied = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM record_part_ids WHERE part_id = 'before'",
        ))
        .await
        .expect("count")
        .expect("a row")
        .try_get::<i64>("", "n")
        .expect("n");
    assert_eq!(copied, 1);

    // A retry of the same part id and body is the same append; another body is refused.
    assert_eq!(
        app.append("upgraded", "in", "{\"v\":1}", Some("before"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.append("upgraded", "in", "{\"v\":2}", Some("before"))
            .await
            .status(),
        409
    );
    assert_eq!(
        app.append("upgraded", "in", "after", Some("after"))
            .await
            .status(),
        200
    );
    let records = app
        .wait_for_records("upgraded", "in", 2, Duration::from_secs(30))
        .await;
    let ids: Vec<(&str, &str)> = records
        .iter()
        .map(|record| (record.id.as_str(), record.data.as_str()))
        .collect();
    assert_eq!(ids, [("before", "{\"v\":1}"), ("after", "after")]);
    app.cleanup().await;
}
