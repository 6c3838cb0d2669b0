//! Waitpoints end to end: complete with the next record, exactly once, per
//! environment, across worker crashes; time-outs; events for runners. (Waitpoints never touch
//! Redis, so a cache flush is not tested here: such a test could not fail.)

use std::time::Duration;

use serde_json::{Value, json};
use tests::events::EventTap;
use tests::{ChildWorker, SpawnOptions, TestApp};

const WAIT: Duration = Duration::from_secs(30);

async fn session_with_run(app: &TestApp, external_id: &str) -> String {
    app.create_session(external_id).await["runId"]
        .as_str()
        .expect("runId")
        .to_owned()
}

#[tokio::test]
async fn the_next_append_completes_a_waitpoint_with_its_stored_body() {
    let app = TestApp::spawn().await;
    let run = session_with_run(&app, "wp").await;
    let id = app
        .wait_on(&run, json!({"session": "wp", "io": "in"}))
        .await;
    assert!(id.starts_with("waitpoint_"));
    let (status, waiting) = app.waitpoint_as(&app.secret_key, &id).await;
    assert_eq!(status, 200);
    assert_eq!(waiting["status"], json!("WAITING"));
    assert!(
        waiting.get("completedAt").is_none(),
        "optional keys are omitted, not null"
    );
    assert!(
        waiting["url"]
            .as_str()
            .is_some_and(|url| url.ends_with(&id))
    );
    // An append on the other channel does not count.
    app.append("wp", "out", "not this", None).await;
    app.append("wp", "in", "{\"text\":\"wake up\"}", Some("m1"))
        .await;
    let done = app.settled_waitpoint(&id, WAIT).await;
    assert_eq!(done["status"], json!("COMPLETED"));
    assert_eq!(done["output"], json!("{\"text\":\"wake up\"}"));
    assert_eq!(done["outputType"], json!("application/json"));
    assert_eq!(done["outputIsError"], json!(false));
    assert!(done["completedAt"].is_string());
    // Later appends change nothing.
    app.append("wp", "in", "later", None).await;
    app.wait_for_records("wp", "in", 2, WAIT).await;
    assert_eq!(app.settled_waitpoint(&id, WAIT).await, done);
    app.cleanup().await;
}

#[tokio::test]
async fn an_old_last_seq_num_completes_at_once_and_fifty_waiters_share_one_record() {
    let app = TestApp::spawn().await;
    let run = session_with_run(&app, "fifty").await;
    for n in 0..3 {
        app.append("fifty", "in", &format!("r{n}"), None).await;
    }
    app.wait_for_records("fifty", "in", 3, WAIT).await;
    let at_once = app
        .wait_on(
            &run,
            json!({"session": "fifty", "io": "in", "lastSeqNum": 0}),
        )
        .await;
    let done = app.settled_waitpoint(&at_once, WAIT).await;
    assert_eq!(done["status"], json!("COMPLETED"));
    assert_eq!(
        done["output"],
        json!("r1"),
        "the first record after lastSeqNum"
    );

    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(
            app.wait_on(&run, json!({"session": "fifty", "io": "in"}))
                .await,
        );
    }
    app.append("fifty", "in", "for everyone", None).await;
    for id in ids {
        let done = app.settled_waitpoint(&id, WAIT).await;
        assert_eq!(done["status"], json!("COMPLETED"));
        assert_eq!(done["output"], json!("for everyone"));
    }
    app.cleanup().await;
}

#[tokio::test]
async fn environments_sharing_an_external_id_never_complete_each_others_waitpoints() {
    let app = TestApp::spawn().await;
    let other_key = app.create_environment("prod").await;
    let run_a = session_with_run(&app, "same-chat").await;
    let created_b: Value = app
        .create_session_with(
            &other_key,
            json!({"type": "chat", "externalId": "same-chat", "taskIdentifier": "agent", "triggerConfig": {"basePayload": {}}}),
        )
        .await
        .json()
        .await
        .expect("json");
    let run_b = created_b["runId"].as_str().expect("run").to_owned();
    let waitpoint_a = app
        .wait_on(&run_a, json!({"session": "same-chat", "io": "in"}))
        .await;
    // B cannot use A's run, nor read A's waitpoint.
    assert_eq!(
        app.wait_as(
            &other_key,
            &run_a,
            json!({"session": "same-chat", "io": "in"})
        )
        .await
        .status(),
        404
    );
    assert_eq!(app.waitpoint_as(&other_key, &waitpoint_a).await.0, 404);
    let waitpoint_b = {
        let response = app
            .wait_as(
                &other_key,
                &run_b,
                json!({"session": "same-chat", "io": "in"}),
            )
            .await;
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.expect("json")["waitpointId"]
            .as_str()
            .expect("id")
            .to_owned()
    };
    assert_eq!(
        app.append_as(&other_key, "same-chat", "in", "from B", None)
            .await
            .status(),
        200
    );
    let (_, b_done) = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = app.waitpoint_as(&other_key, &waitpoint_b).await;
            if body["status"] != json!("WAITING") || tokio::time::Instant::now() > deadline {
                break (status, body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(b_done["output"], json!("from B"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, a_still) = app.waitpoint_as(&app.secret_key, &waitpoint_a).await;
    assert_eq!(
        a_still["status"],
        json!("WAITING"),
        "B's append never completes A's waitpoint"
    );
    app.append("same-chat", "in", "from A", None).await;
    let a_done = app.settled_waitpoint(&waitpoint_a, WAIT).await;
    assert_eq!(a_done["output"], json!("from A"));
    app.cleanup().await;
}

#[tokio::test]
async fn replaying_an_earlier_part_id_never_completes_a_later_waitpoint() {
    let app = TestApp::spawn().await;
    let run = session_with_run(&app, "replay").await;
    app.append("replay", "in", "original", Some("p1")).await;
    app.wait_for_records("replay", "in", 1, WAIT).await;
    let id = app
        .wait_on(&run, json!({"session": "replay", "io": "in"}))
        .await;
    app.append("replay", "in", "original", Some("p1")).await;
    app.append("replay", "in", "changed", Some("p1")).await;
    app.append("replay", "out", "marker", None).await;
    app.wait_for_records("replay", "out", 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, waiting) = app.waitpoint_as(&app.secret_key, &id).await;
    assert_eq!(waiting["status"], json!("WAITING"));
    assert_eq!(app.records("replay", "in").await.len(), 1);
    app.append("replay", "in", "new", Some("p2")).await;
    assert_eq!(
        app.settled_waitpoint(&id, WAIT).await["output"],
        json!("new")
    );
    app.cleanup().await;
}

#[tokio::test]
async fn idempotency_keys_return_the_same_waitpoint_and_bad_input_is_refused() {
    let app = TestApp::spawn().await;
    let run = session_with_run(&app, "idem-wp").await;
    let body = json!({"session": "idem-wp", "io": "in", "idempotencyKey": "turn-1", "idempotencyKeyTTL": "1h", "tags": "one"});
    let first: Value = app
        .wait_as(&app.secret_key, &run, body.clone())
        .await
        .json()
        .await
        .expect("json");
    let second: Value = app
        .wait_as(&app.secret_key, &run, body)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(first["isCached"], json!(false));
    assert_eq!(second["isCached"], json!(true));
    assert_eq!(first["waitpointId"], second["waitpointId"]);
    let (_, waitpoint) = app
        .waitpoint_as(&app.secret_key, first["waitpointId"].as_str().expect("id"))
        .await;
    assert_eq!(waitpoint["idempotencyKey"], json!("turn-1"));
    assert_eq!(waitpoint["tags"], json!(["one"]));

    for (body, status) in [
        (
            json!({"session": "idem-wp", "io": "in", "timeout": "soon"}),
            400,
        ),
        (
            json!({"session": "idem-wp", "io": "in", "timeout": "0s"}),
            400,
        ),
        (json!({"session": "idem-wp", "io": "sideways"}), 400),
        (
            json!({"session": "idem-wp", "io": "in", "lastSeqNum": 1.5}),
            400,
        ),
        (
            json!({"session": "idem-wp", "io": "in", "tags": vec!["t"; 11]}),
            400,
        ),
        (
            json!({"session": "idem-wp", "io": "in", "idempotencyKey": "k".repeat(2049)}),
            400,
        ),
        (json!({"session": "missing", "io": "in"}), 404),
    ] {
        assert_eq!(
            app.wait_as(&app.secret_key, &run, body.clone())
                .await
                .status(),
            status,
            "{body}"
        );
    }
    assert_eq!(
        app.wait_as(
            &app.secret_key,
            "run_missing",
            json!({"session": "idem-wp", "io": "in"})
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        app.wait_as(
            "tr_sk_nope",
            &run,
            json!({"session": "idem-wp", "io": "in"})
        )
        .await
        .status(),
        401
    );
    assert_eq!(
        app.waitpoint_as(&app.secret_key, "waitpoint_missing")
            .await
            .0,
        404
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_timeout_times_out_once_and_a_later_append_does_not_change_it() {
    let app = TestApp::spawn().await;
    let run = session_with_run(&app, "slow").await;
    let id = app
        .wait_on(
            &run,
            json!({"session": "slow", "io": "in", "timeout": "1s"}),
        )
        .await;
    let timed_out = app.settled_waitpoint(&id, WAIT).await;
    assert_eq!(timed_out["status"], json!("TIMED_OUT"));
    assert_eq!(timed_out["outputIsError"], json!(true));
    let output: Value =
        serde_json::from_str(timed_out["output"].as_str().unwrap_or("")).unwrap_or_default();
    assert_eq!(output["code"], json!("TRIGGER_WAITPOINT_TIMEOUT"));
    app.append("slow", "in", "too late", None).await;
    app.wait_for_records("slow", "in", 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.settled_waitpoint(&id, WAIT).await, timed_out);
    app.cleanup().await;
}

#[tokio::test]
async fn runners_receive_run_requested_and_waitpoint_events() {
    let app = TestApp::spawn().await;
    let mut tap = EventTap::bind(&app.name).await;
    let created = app.create_session("evented").await;
    let run = created["runId"].as_str().expect("run").to_owned();
    let id = app
        .wait_on(&run, json!({"session": "evented", "io": "in"}))
        .await;
    let timing_out = app
        .wait_on(
            &run,
            json!({"session": "evented", "io": "out", "timeout": "1s"}),
        )
        .await;
    app.append("evented", "in", "hello", None).await;
    let events = tap.collect_until(WAIT, |events| events.len() >= 3).await;
    let of_type = |kind: &str| {
        events
            .iter()
            .find(|event| event["type"] == json!(kind))
            .cloned()
    };
    let requested = of_type("run.requested").expect("run.requested");
    assert_eq!(requested["runId"], json!(run));
    assert_eq!(requested["sessionId"], created["id"]);
    assert_eq!(requested["externalId"], json!("evented"));
    assert_eq!(requested["taskIdentifier"], json!("agent"));
    assert_eq!(
        requested["triggerConfig"]["basePayload"]["chatId"],
        json!("evented")
    );
    let completed = of_type("waitpoint.completed").expect("waitpoint.completed");
    assert_eq!(completed["waitpointId"], json!(id));
    assert_eq!(completed["runId"], json!(run));
    assert_eq!(completed["output"], json!("hello"));
    assert_eq!(completed["status"], json!("COMPLETED"));
    let timed_out = of_type("waitpoint.timed_out").expect("waitpoint.timed_out");
    assert_eq!(timed_out["waitpointId"], json!(timing_out));
    assert_eq!(timed_out["outputIsError"], json!(true));
    app.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_between_persist_and_everything_after_still_completes_exactly_once() {
    let app = TestApp::spawn_with(SpawnOptions {
        without_worker: true,
        ..SpawnOptions::default()
    })
    .await;
    let mut tap = EventTap::bind(&app.name).await;
    let healthy = ChildWorker::spawn(&app.settings);
    let run = session_with_run(&app, "crash").await;
    let id = app
        .wait_on(&run, json!({"session": "crash", "io": "in"}))
        .await;
    healthy.kill_9().await;
    // A worker that dies right after committing the append's batch.
    let _crashing = ChildWorker::spawn_with(&app.settings, &[tests::ABORT_AFTER_COMMIT]);
    assert_eq!(
        app.append("crash", "in", "survives", Some("c1"))
            .await
            .status(),
        200
    );
    app.wait_for_records("crash", "in", 1, WAIT).await;
    // The commit happened: the waitpoint is completed even though the worker died before acking.
    let done = app.settled_waitpoint(&id, WAIT).await;
    assert_eq!(done["status"], json!("COMPLETED"));
    assert_eq!(done["output"], json!("survives"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A healthy worker takes over: the redelivered append is a no-op; the event is published
    // from the outbox.
    let replacement = ChildWorker::spawn(&app.settings);
    let events = tap
        .collect_until(WAIT, |events| {
            events
                .iter()
                .any(|event| event["type"] == json!("waitpoint.completed"))
        })
        .await;
    let completions: Vec<&Value> = events
        .iter()
        .filter(|event| event["type"] == json!("waitpoint.completed"))
        .collect();
    assert_eq!(completions.len(), 1);
    assert_eq!(completions[0]["output"], json!("survives"));
    assert_eq!(app.records("crash", "in").await.len(), 1);
    assert_eq!(
        app.settled_waitpoint(&id, WAIT).await,
        done,
        "completed exactly once"
    );
    replacement.kill_9().await;
    app.cleanup().await;
}
