//! The session routes beyond create/close: PATCH, end-and-continue, and appends with
//! `Prefer: wait`.

use serde_json::{Value, json};
use tests::TestApp;
use tests::events::EventTap;

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Value,
) -> (u16, Value) {
    let response = app
        .client
        .request(method, app.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn patch_changes_tags_and_metadata_and_never_the_external_id() {
    let app = TestApp::spawn().await;
    let created = app.create_session("patchy").await;
    let path = "/api/v1/sessions/patchy";
    let (status, patched) = send(
        &app,
        reqwest::Method::PATCH,
        path,
        &app.secret_key,
        json!({"tags": ["a", "b"], "metadata": {"k": 1}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(patched["tags"], json!(["a", "b"]));
    assert_eq!(patched["metadata"], json!({"k": 1}));
    assert_eq!(patched["id"], created["id"]);
    // The same externalId is a no-op; null metadata clears.
    let (status, cleared) = send(
        &app,
        reqwest::Method::PATCH,
        path,
        &app.secret_key,
        json!({"externalId": "patchy", "metadata": null}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(cleared["metadata"], Value::Null);
    assert_eq!(cleared["tags"], json!(["a", "b"]));
    // Refused, and nothing written.
    for (body, expected) in [
        (json!({"externalId": "renamed"}), 422),
        (json!({"externalId": null}), 422),
        (json!({"tags": ["x"], "externalId": "renamed"}), 422),
        (json!({"colour": "blue"}), 400),
        (json!({"tags": "not-a-list"}), 400),
        (json!({"metadata": 5}), 400),
        (json!({"tags": vec!["t"; 11]}), 400),
    ] {
        let (status, error) = send(
            &app,
            reqwest::Method::PATCH,
            path,
            &app.secret_key,
            body.clone(),
        )
        .await;
        assert_eq!(status, expected, "{body}");
        assert!(error["error"].is_string());
    }
    let (_, now) = send(
        &app,
        reqwest::Method::GET,
        path,
        &app.secret_key,
        Value::Null,
    )
    .await;
    assert_eq!(now["tags"], json!(["a", "b"]));
    assert_eq!(now["externalId"], json!("patchy"));
    // A session token has no admin scope.
    let token = created["publicAccessToken"].as_str().expect("token");
    assert_eq!(
        send(
            &app,
            reqwest::Method::PATCH,
            path,
            token,
            json!({"tags": []})
        )
        .await
        .0,
        403
    );
    app.cleanup().await;
}

#[tokio::test]
async fn end_and_continue_swaps_only_for_the_current_run_of_this_environment() {
    let app = TestApp::spawn().await;
    let mut tap = EventTap::bind(&app.name).await;
    let created = app.create_session("handoff").await;
    let first_run = created["runId"].as_str().expect("run").to_owned();
    let path = "/api/v1/sessions/handoff/end-and-continue";
    let token = created["publicAccessToken"]
        .as_str()
        .expect("token")
        .to_owned();
    // The session token (write scope) may do it.
    let (status, swapped) = send(
        &app,
        reqwest::Method::POST,
        path,
        &token,
        json!({"callingRunId": first_run, "reason": "upgrade"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(swapped["swapped"], json!(true));
    let second_run = swapped["runId"].as_str().expect("run").to_owned();
    assert_ne!(second_run, first_run);
    // The old run is no longer current: no swap, the current run is returned.
    let (_, stale) = send(
        &app,
        reqwest::Method::POST,
        path,
        &app.secret_key,
        json!({"callingRunId": first_run, "reason": "upgrade"}),
    )
    .await;
    assert_eq!(
        stale,
        json!({"runId": second_run, "swapped": false, "pendingVersion": false})
    );
    // Another environment's run id never matches.
    let other_key = app.create_environment("prod").await;
    let other: Value = app
        .create_session_with(&other_key, json!({"type": "chat", "externalId": "handoff", "taskIdentifier": "a", "triggerConfig": {"basePayload": {}}}))
        .await
        .json()
        .await
        .expect("json");
    let other_run = other["runId"].as_str().expect("run");
    let (_, foreign) = send(
        &app,
        reqwest::Method::POST,
        path,
        &app.secret_key,
        json!({"callingRunId": other_run, "reason": "x"}),
    )
    .await;
    assert_eq!(foreign["swapped"], json!(false));
    let (_, item) = send(
        &app,
        reqwest::Method::GET,
        "/api/v1/sessions/handoff",
        &app.secret_key,
        Value::Null,
    )
    .await;
    assert_eq!(item["currentRunId"], json!(second_run));
    // run.requested for the new run, with the reason.
    let events = tap
        .collect_until(std::time::Duration::from_secs(20), |events| {
            events
                .iter()
                .any(|event| event["runId"] == json!(second_run))
        })
        .await;
    let requested = events
        .iter()
        .find(|event| event["runId"] == json!(second_run))
        .expect("run.requested for the new run");
    assert_eq!(requested["reason"], json!("upgrade"));
    // Closed → 409 `session_closed` (the same refusal as an append's); bad bodies → 400.
    send(
        &app,
        reqwest::Method::POST,
        "/api/v1/sessions/handoff/close",
        &app.secret_key,
        json!({}),
    )
    .await;
    let (status, closed) = send(
        &app,
        reqwest::Method::POST,
        path,
        &app.secret_key,
        json!({"callingRunId": second_run, "reason": "x"}),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(closed["code"], "session_closed");
    assert_eq!(
        send(
            &app,
            reqwest::Method::POST,
            path,
            &app.secret_key,
            json!({"reason": "x"})
        )
        .await
        .0,
        400
    );
    assert_eq!(
        send(
            &app,
            reqwest::Method::POST,
            path,
            &app.secret_key,
            json!({"callingRunId": "r", "reason": "x".repeat(65)})
        )
        .await
        .0,
        400
    );
    app.cleanup().await;
}

async fn append_waiting(app: &TestApp, session: &str, body: &str, part_id: &str) -> (u16, Value) {
    let response = app
        .client
        .post(app.url(&format!("/realtime/v1/sessions/{session}/in/append")))
        .bearer_auth(&app.secret_key)
        .header("X-Part-Id", part_id)
        .header("Prefer", "wait=10")
        .body(body.to_owned())
        .send()
        .await
        .expect("append");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn prefer_wait_answers_with_the_applied_outcome() {
    let app = TestApp::spawn().await;
    app.create_session("waiting").await;
    assert_eq!(
        append_waiting(&app, "waiting", "one", "p1").await,
        (
            200,
            json!({"ok": true, "seq": 0, "seqNum": 0, "duplicate": false})
        )
    );
    assert_eq!(
        append_waiting(&app, "waiting", "two", "p2").await,
        (
            200,
            json!({"ok": true, "seq": 1, "seqNum": 1, "duplicate": false})
        )
    );
    assert_eq!(
        append_waiting(&app, "waiting", "one", "p1").await,
        (
            200,
            json!({"ok": true, "seq": 0, "seqNum": 0, "duplicate": true})
        )
    );
    let (status, conflict) = append_waiting(&app, "waiting", "other body", "p1").await;
    assert_eq!(status, 409);
    assert!(conflict["error"].is_string());
    let bad = app
        .client
        .post(app.url("/realtime/v1/sessions/waiting/in/append"))
        .bearer_auth(&app.secret_key)
        .header("Prefer", "wait=999")
        .body("x")
        .send()
        .await
        .expect("append");
    assert_eq!(bad.status(), 400);
    assert_eq!(app.records("waiting", "in").await.len(), 2);
    app.cleanup().await;
}

async fn list(app: &TestApp, query: &str) -> (u16, Value) {
    let response = app
        .client
        .get(app.url(&format!("/api/v1/sessions{query}")))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("list");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn external_ids(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| item["externalId"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn list_pages_newest_first_and_filters_with_comma_lists() {
    let app = TestApp::spawn().await;
    for n in 0..25 {
        let body = json!({
            "type": if n % 2 == 0 { "chat" } else { "agent" },
            "externalId": format!("s{n:02}"),
            "taskIdentifier": if n % 5 == 0 { "special" } else { "normal" },
            "triggerConfig": {"basePayload": {}},
            "tags": if n % 3 == 0 { vec!["three"] } else { vec!["other"] },
        });
        assert_eq!(
            app.create_session_with(&app.secret_key, body)
                .await
                .status(),
            201
        );
    }
    send(
        &app,
        reqwest::Method::POST,
        "/api/v1/sessions/s24/close",
        &app.secret_key,
        json!({}),
    )
    .await;
    send(
        &app,
        reqwest::Method::POST,
        "/api/v1/sessions/s23/close",
        &app.secret_key,
        json!({}),
    )
    .await;

    let (status, first) = list(&app, "").await;
    assert_eq!(status, 200);
    let expected_first: Vec<String> = (5..25).rev().map(|n| format!("s{n:02}")).collect();
    assert_eq!(
        external_ids(&first),
        expected_first,
        "newest first, 20 by default"
    );
    assert!(
        first["data"][0]["currentRunId"]
            .as_str()
            .is_some_and(|id| id.starts_with("run_"))
    );
    let next = first["pagination"]["next"]
        .as_str()
        .expect("next")
        .to_owned();
    assert!(first["pagination"].get("previous").is_none());
    let (_, second) = list(&app, &format!("?page[after]={next}")).await;
    assert_eq!(external_ids(&second), ["s04", "s03", "s02", "s01", "s00"]);
    assert!(second["pagination"].get("next").is_none());
    let previous = second["pagination"]["previous"]
        .as_str()
        .expect("previous")
        .to_owned();
    let (_, back) = list(&app, &format!("?page[before]={previous}&page[size]=3")).await;
    assert_eq!(external_ids(&back), ["s07", "s06", "s05"]);

    let (_, chats) = list(&app, "?filter[type]=chat&page[size]=100").await;
    assert_eq!(external_ids(&chats).len(), 13);
    let (_, both) = list(&app, "?filter[type]=chat,agent&page[size]=100").await;
    assert_eq!(external_ids(&both).len(), 25, "comma lists are split");
    let (_, tagged) = list(&app, "?filter[tags]=three&page[size]=100").await;
    assert_eq!(external_ids(&tagged).len(), 9);
    let (_, special) = list(&app, "?filter[taskIdentifier]=special").await;
    assert_eq!(external_ids(&special), ["s20", "s15", "s10", "s05", "s00"]);
    let (_, closed) = list(&app, "?filter[status]=CLOSED").await;
    assert_eq!(external_ids(&closed), ["s24", "s23"]);
    let (_, active) = list(&app, "?filter[status]=ACTIVE&page[size]=100").await;
    assert_eq!(external_ids(&active).len(), 23);
    let (_, picked) = list(&app, "?filter[externalId]=s01,s02").await;
    assert_eq!(external_ids(&picked), ["s02", "s01"]);
    let (_, none) = list(&app, "?filter[createdAt][to]=0").await;
    assert_eq!(external_ids(&none).len(), 0);

    for bad in [
        "?page[size]=0",
        "?page[size]=101",
        "?page[size]=x",
        "?page[after]=a&page[before]=b",
        "?page[after]=session_unknown",
        "?filter[status]=SLEEPING",
        "?filter[createdAt][from]=yesterday",
        "?colour=blue",
    ] {
        let (status, body) = list(&app, bad).await;
        assert_eq!(status, 400, "{bad}");
        assert!(body["error"].is_string());
    }
    // Another environment sees none of them.
    let other_key = app.create_environment("prod").await;
    let others: Value = app
        .client
        .get(app.url("/api/v1/sessions"))
        .bearer_auth(&other_key)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(others["data"], json!([]));
    app.cleanup().await;
}

#[tokio::test]
async fn snapshot_urls_are_signed_per_session_method_and_expiry() {
    let app = TestApp::spawn_with(tests::SpawnOptions {
        overrides: &[("SESSIONS_MAX_SNAPSHOT_BYTES", "1024")],
        ..tests::SpawnOptions::default()
    })
    .await;
    let created = app.create_session("snap").await;
    app.create_session("other-snap").await;
    let url_for = |method: reqwest::Method, key: String| {
        let app = &app;
        async move {
            let response = app
                .client
                .request(method, app.url("/api/v1/sessions/snap/snapshot-url"))
                .bearer_auth(key)
                .send()
                .await
                .expect("snapshot-url");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (
                status,
                body["presignedUrl"].as_str().unwrap_or("").to_owned(),
            )
        }
    };
    let (status, put_url) = url_for(reqwest::Method::PUT, app.secret_key.clone()).await;
    assert_eq!(status, 200);
    let blob = vec![0_u8, 1, 2, 255];
    let stored = app
        .client
        .put(&put_url)
        .body(blob.clone())
        .send()
        .await
        .expect("put");
    assert_eq!(stored.status(), 200);
    let (_, get_url) = url_for(reqwest::Method::GET, app.secret_key.clone()).await;
    let fetched = app.client.get(&get_url).send().await.expect("get");
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.expect("bytes").to_vec(), blob);

    // The method, the session, the expiry and the signature are all bound.
    assert_eq!(
        app.client.get(&put_url).send().await.expect("get").status(),
        403
    );
    assert_eq!(
        app.client
            .put(&get_url)
            .body("x")
            .send()
            .await
            .expect("put")
            .status(),
        403
    );
    let other_session = get_url.replace(created["id"].as_str().expect("id"), "session_other");
    assert_eq!(
        app.client
            .get(&other_session)
            .send()
            .await
            .expect("get")
            .status(),
        403
    );
    let later = get_url.replace("expires=", "expires=9");
    assert_eq!(
        app.client.get(&later).send().await.expect("get").status(),
        403
    );
    // Change the signature's last hex digit (to a digit it is not: the test must never send the
    // original URL back).
    let last = if get_url.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &get_url[..get_url.len() - 1]);
    assert_eq!(
        app.client.get(&forged).send().await.expect("get").status(),
        403
    );
    let unsigned = get_url.split('?').next().expect("path").to_owned();
    assert_eq!(
        app.client
            .get(&unsigned)
            .send()
            .await
            .expect("get")
            .status(),
        403
    );
    // Size limit.
    let too_big = app
        .client
        .put(&put_url)
        .body(vec![7_u8; 2048])
        .send()
        .await
        .expect("put");
    assert_eq!(too_big.status(), 413);
    assert_eq!(
        app.client
            .get(&get_url)
            .send()
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes")
            .to_vec(),
        blob
    );
    // The session token may read (GET url) and write (PUT url); not for another session.
    let token = created["publicAccessToken"]
        .as_str()
        .expect("token")
        .to_owned();
    assert_eq!(url_for(reqwest::Method::GET, token.clone()).await.0, 200);
    assert_eq!(url_for(reqwest::Method::PUT, token.clone()).await.0, 200);
    let other = app
        .client
        .get(app.url("/api/v1/sessions/other-snap/snapshot-url"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("other");
    assert_eq!(other.status(), 403);
    app.cleanup().await;
}

#[tokio::test]
async fn oversized_json_is_413_and_an_unapplied_command_is_504() {
    let app = TestApp::spawn_with(tests::SpawnOptions {
        overrides: &[("SESSIONS_REPLY_TIMEOUT_MS", "700")],
        without_worker: true,
        ..tests::SpawnOptions::default()
    })
    .await;
    // Bodies over SESSIONS_MAX_JSON_BYTES (256 KiB by default) are refused before parsing.
    let huge = json!({"type": "chat", "taskIdentifier": "a", "triggerConfig": {"basePayload": {"blob": "x".repeat(300 * 1024)}}});
    let response = app.create_session_with(&app.secret_key, huge).await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.expect("a JSON error body");
    assert!(body["error"].is_string());
    // No worker: the command is queued but never applied, so the create times out with 504.
    let response = app
        .create_session_with(&app.secret_key, json!({"type": "chat", "externalId": "late", "taskIdentifier": "a", "triggerConfig": {"basePayload": {}}}))
        .await;
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|message| message.contains("retry"))
    );
    // A worker arrives: the queued create is applied; the retry is answered from it.
    let worker = tests::InProcessWorker::spawn(app.settings.clone()).await;
    let retried = app.create_session("late").await;
    assert_eq!(retried["externalId"], json!("late"));
    worker.stop().await;
    app.cleanup().await;
}
