//! Authentication and authorization: secret keys, public access tokens and their
//! scopes, on every route built so far. Denied requests change nothing.

use std::time::Duration;

use serde_json::{Value, json};
use shared::domain::tokens::{PublicTokenClaims, mint_public_token};
use tests::TestApp;

const WAIT: Duration = Duration::from_secs(30);

fn token(
    app: &TestApp,
    key: &str,
    scopes: &[&str],
    exp_offset: i64,
    tweak: impl Fn(&mut PublicTokenClaims),
) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = PublicTokenClaims {
        iss: "https://id.trigger.dev".into(),
        aud: "https://api.trigger.dev".into(),
        sub: app.environment_id.clone(),
        public: true,
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        iat: Some(now),
        exp: now + exp_offset,
    };
    tweak(&mut claims);
    mint_public_token(&claims, key).expect("mint")
}

async fn get_status(app: &TestApp, path: &str, bearer: &str) -> u16 {
    app.client
        .get(app.url(path))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

#[tokio::test]
async fn the_session_token_from_create_reads_and_writes_only_its_own_session() {
    let app = TestApp::spawn().await;
    let created = app.create_session("mine").await;
    let other = app.create_session("theirs").await;
    let session_token = created["publicAccessToken"]
        .as_str()
        .expect("token")
        .to_owned();

    // Write on `in` and read, by externalId and by friendly id.
    assert_eq!(
        app.append_as(&session_token, "mine", "in", "from browser", Some("b1"))
            .await
            .status(),
        200
    );
    let friendly = created["id"].as_str().expect("id");
    assert_eq!(
        app.append_as(&session_token, friendly, "in", "by friendly id", None)
            .await
            .status(),
        200
    );
    app.wait_for_records("mine", "in", 2, WAIT).await;
    // Reading `in` (user messages) needs the secret key; the token reads `out`.
    for path in [
        "/realtime/v1/sessions/mine/in/records",
        "/realtime/v1/sessions/mine/in",
    ] {
        assert_eq!(get_status(&app, path, &session_token).await, 403, "{path}");
    }
    assert_eq!(
        get_status(
            &app,
            "/realtime/v1/sessions/mine/out/records",
            &session_token
        )
        .await,
        200
    );
    assert_eq!(
        get_status(
            &app,
            &format!("/api/v1/sessions/{friendly}"),
            &session_token
        )
        .await,
        200
    );
    assert_eq!(
        get_status(&app, "/realtime/v1/sessions/mine/out?x=1", &session_token).await,
        200
    );

    // `out` is secret-key only; other sessions are forbidden, existing or not.
    assert_eq!(
        app.append_as(&session_token, "mine", "out", "nope", None)
            .await
            .status(),
        403
    );
    assert_eq!(
        app.append_as(&session_token, "theirs", "in", "nope", None)
            .await
            .status(),
        403
    );
    assert_eq!(
        app.append_as(&session_token, "nobody", "in", "nope", None)
            .await
            .status(),
        403
    );
    let other_friendly = other["id"].as_str().expect("id");
    assert_eq!(
        get_status(
            &app,
            &format!("/api/v1/sessions/{other_friendly}"),
            &session_token
        )
        .await,
        403
    );
    assert_eq!(
        get_status(
            &app,
            "/realtime/v1/sessions/theirs/in/records",
            &session_token
        )
        .await,
        403
    );
    assert_eq!(
        get_status(&app, "/realtime/v1/sessions/theirs/in", &session_token).await,
        403
    );
    // Secret-key-only routes.
    let create = app
        .create_session_with(
            &session_token,
            json!({"type": "chat", "taskIdentifier": "a", "triggerConfig": {"basePayload": {}}}),
        )
        .await;
    assert_eq!(create.status(), 403);
    let body: Value = create.json().await.expect("json");
    assert!(body["error"].is_string());
    let run = created["runId"].as_str().expect("run");
    assert_eq!(
        app.wait_as(&session_token, run, json!({"session": "mine", "io": "in"}))
            .await
            .status(),
        403
    );
    let claims = app
        .client
        .post(app.url("/api/v1/auth/jwt/claims"))
        .bearer_auth(&session_token)
        .send()
        .await
        .expect("claims");
    assert_eq!(claims.status(), 403);
    // Close needs admin.
    let close = app
        .client
        .post(app.url("/api/v1/sessions/mine/close"))
        .bearer_auth(&session_token)
        .json(&json!({}))
        .send()
        .await
        .expect("close");
    assert_eq!(close.status(), 403);

    // Nothing the denied requests tried was written.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.records("mine", "in").await.len(), 2);
    assert!(app.records("mine", "out").await.is_empty());
    assert!(app.records("theirs", "in").await.is_empty());
    assert_eq!(
        app.store
            .count_rows(shared::storage::CountedTable::Sessions)
            .await
            .ok(),
        Some(2)
    );
    app.cleanup().await;
}

#[tokio::test]
async fn tokens_are_verified_strictly() {
    let app = TestApp::spawn().await;
    app.create_session("strict").await;
    let key = app.secret_key.clone();
    let path = "/realtime/v1/sessions/strict/out/records";
    let read = ["read:sessions:strict"];
    assert_eq!(
        get_status(&app, path, &token(&app, &key, &read, 60, |_| {})).await,
        200
    );
    assert_eq!(
        get_status(
            &app,
            path,
            &token(&app, &key, &["read:sessions"], 60, |_| {})
        )
        .await,
        200
    );
    assert_eq!(
        get_status(&app, path, &token(&app, &key, &["admin"], 60, |_| {})).await,
        200
    );
    // Read-only scope on a write route.
    assert_eq!(
        app.append_as(
            &token(&app, &key, &read, 60, |_| {}),
            "strict",
            "in",
            "x",
            None
        )
        .await
        .status(),
        403
    );
    // Expired (past the few seconds of leeway), wrong key, wrong iss/aud, not public, alg none.
    assert_eq!(
        get_status(&app, path, &token(&app, &key, &read, -30, |_| {})).await,
        401
    );
    assert_eq!(
        get_status(&app, path, &token(&app, "tr_sk_wrong", &read, 60, |_| {})).await,
        401
    );
    assert_eq!(
        get_status(
            &app,
            path,
            &token(&app, &key, &read, 60, |c| c.iss = "https://evil".into())
        )
        .await,
        401
    );
    assert_eq!(
        get_status(
            &app,
            path,
            &token(&app, &key, &read, 60, |c| c.aud = "https://evil".into())
        )
        .await,
        401
    );
    assert_eq!(
        get_status(
            &app,
            path,
            &token(&app, &key, &read, 60, |c| c.public = false)
        )
        .await,
        401
    );
    let good = token(&app, &key, &read, 60, |_| {});
    let payload = good.split('.').nth(1).expect("payload");
    let alg_none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    assert_eq!(get_status(&app, path, &alg_none).await, 401);
    assert_eq!(get_status(&app, path, "not.a.jwt").await, 401);
    assert_eq!(get_status(&app, path, "").await, 401);

    // A token signed by environment B's key but claiming environment A.
    let other_key = app.create_environment("prod").await;
    assert_eq!(
        get_status(&app, path, &token(&app, &other_key, &read, 60, |_| {})).await,
        401
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_token_never_reaches_another_environments_session_with_the_same_external_id() {
    let app = TestApp::spawn().await;
    let other_key = app.create_environment("prod").await;
    app.create_session("twin").await;
    let created_b: Value = app
        .create_session_with(&other_key, json!({"type": "chat", "externalId": "twin", "taskIdentifier": "a", "triggerConfig": {"basePayload": {}}}))
        .await
        .json()
        .await
        .expect("json");
    let token_b = created_b["publicAccessToken"]
        .as_str()
        .expect("token")
        .to_owned();
    app.append("twin", "out", "canary-of-A", None).await;
    app.wait_for_records("twin", "out", 1, WAIT).await;
    // B's token addresses "twin": it resolves in B only (and reads B's empty `out`).
    let body = app
        .client
        .get(app.url("/realtime/v1/sessions/twin/out/records"))
        .bearer_auth(&token_b)
        .send()
        .await
        .expect("records")
        .text()
        .await
        .expect("body");
    assert_eq!(body, r#"{"records":[]}"#);
    assert_eq!(
        app.append_as(&token_b, "twin", "in", "from B", None)
            .await
            .status(),
        200
    );
    // The `in` append answered after its apply: anything it wrote in A would be there now.
    assert!(
        app.records("twin", "in").await.is_empty(),
        "A's channel untouched"
    );
    assert_eq!(app.records("twin", "out").await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn claims_retrieve_and_the_unsupported_put() {
    let app = TestApp::spawn().await;
    let created = app.create_session("misc").await;
    let claims: Value = app
        .client
        .post(app.url("/api/v1/auth/jwt/claims"))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("claims")
        .json()
        .await
        .expect("json");
    assert_eq!(claims, json!({"sub": app.environment_id, "pub": true}));
    let item: Value = app
        .client
        .get(app.url("/api/v1/sessions/misc"))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("retrieve")
        .json()
        .await
        .expect("json");
    assert_eq!(item["id"], created["id"]);
    assert_eq!(item["currentRunId"], created["runId"]);
    assert_eq!(
        get_status(&app, "/api/v1/sessions/session_missing", &app.secret_key).await,
        404
    );
    let put = app
        .client
        .put(app.url("/realtime/v1/sessions/misc/in"))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("put");
    // Initializing a stream hands out the writer endpoint and a token for that one stream.
    assert_eq!(put.status(), 202);
    let endpoint = put.headers()["x-s2-endpoint"].to_str().expect("endpoint");
    assert_eq!(endpoint, format!("{}/s2/v1", app.address));
    let stream_name = put.headers()["x-s2-stream-name"].to_str().expect("stream");
    assert!(stream_name.starts_with("sessions/session_") && stream_name.ends_with("/in"));
    let body: Value = put.json().await.expect("json");
    assert_eq!(body, serde_json::json!({ "version": "v2" }));
    // CORS preflight.
    let preflight = app
        .client
        .request(
            reqwest::Method::OPTIONS,
            app.url("/realtime/v1/sessions/misc/in/append"),
        )
        .header("Origin", "https://chat.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,x-part-id,content-type",
        )
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success());
    assert_eq!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("*")
    );
    app.cleanup().await;
}

#[tokio::test]
async fn another_environment_never_sees_a_canary_through_any_route() {
    let app = TestApp::spawn().await;
    let a = app
        .create_session_with(
            &app.secret_key,
            json!({"type": "chat", "externalId": "shared-ext", "taskIdentifier": "CANARY_A_TASK",
                   "triggerConfig": {"basePayload": {"secret": "CANARY_A_PAYLOAD"}},
                   "tags": ["CANARY_A_TAG"], "metadata": {"m": "CANARY_A_META"}}),
        )
        .await
        .json::<Value>()
        .await
        .expect("json");
    let a_id = a["id"].as_str().expect("id").to_owned();
    let a_run = a["runId"].as_str().expect("run").to_owned();
    app.append("shared-ext", "in", "CANARY_A_RECORD", Some("canary"))
        .await;
    app.append("shared-ext", "out", "CANARY_A_OUT", None).await;
    let a_waitpoint = app
        .wait_on(&a_run, json!({"session": "shared-ext", "io": "in"}))
        .await;
    app.wait_for_records("shared-ext", "out", 1, WAIT).await;

    let b_key = app.create_environment("prod").await;
    let b_session: Value = app
        .create_session_with(&b_key, json!({"type": "chat", "externalId": "shared-ext", "taskIdentifier": "b", "triggerConfig": {"basePayload": {}}}))
        .await
        .json()
        .await
        .expect("json");
    let b_token = b_session["publicAccessToken"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut bodies = Vec::new();
    for bearer in [b_key.as_str(), b_token.as_str()] {
        for (method, path, body) in [
            ("GET", "/api/v1/sessions".to_owned(), Value::Null),
            (
                "GET",
                "/api/v1/sessions?filter[externalId]=shared-ext".to_owned(),
                Value::Null,
            ),
            ("GET", "/api/v1/sessions/shared-ext".to_owned(), Value::Null),
            ("GET", format!("/api/v1/sessions/{a_id}"), Value::Null),
            (
                "PATCH",
                format!("/api/v1/sessions/{a_id}"),
                json!({"tags": []}),
            ),
            (
                "GET",
                "/realtime/v1/sessions/shared-ext/in/records".to_owned(),
                Value::Null,
            ),
            (
                "GET",
                "/realtime/v1/sessions/shared-ext/out/records".to_owned(),
                Value::Null,
            ),
            (
                "GET",
                format!("/realtime/v1/sessions/{a_id}/in/records"),
                Value::Null,
            ),
            (
                "GET",
                "/api/v1/sessions/shared-ext/snapshot-url".to_owned(),
                Value::Null,
            ),
            (
                "GET",
                format!("/api/v1/waitpoints/tokens/{a_waitpoint}"),
                Value::Null,
            ),
            (
                "POST",
                format!("/api/v1/runs/{a_run}/session-streams/wait"),
                json!({"session": "shared-ext", "io": "in"}),
            ),
            (
                "POST",
                format!("/api/v1/sessions/{a_id}/end-and-continue"),
                json!({"callingRunId": a_run, "reason": "x"}),
            ),
            ("POST", format!("/api/v1/sessions/{a_id}/close"), json!({})),
        ] {
            let mut request = app
                .client
                .request(method.parse().expect("method"), app.url(&path))
                .bearer_auth(bearer);
            if !body.is_null() {
                request = request.json(&body);
            }
            let response = request.send().await.expect("request");
            let status = response.status();
            let text = response.text().await.expect("body");
            assert!(status.as_u16() < 500, "{method} {path}: {status}");
            bodies.push((format!("{method} {path}"), text));
        }
        // SSE: read whatever arrives in a moment.
        let sse = app
            .client
            .get(app.url("/realtime/v1/sessions/shared-ext/out"))
            .bearer_auth(bearer)
            .header("Timeout-Seconds", "1")
            .send()
            .await
            .expect("sse");
        bodies.push(("SSE".into(), sse.text().await.unwrap_or_default()));
    }
    for (what, body) in &bodies {
        assert!(!body.contains("CANARY_A"), "{what} leaked: {body}");
    }
    // A's session is untouched by B's attempts.
    let (_, waitpoint) = app.waitpoint_as(&app.secret_key, &a_waitpoint).await;
    assert_eq!(waitpoint["status"], json!("WAITING"));
    let a_now: Value = app
        .client
        .get(app.url("/api/v1/sessions/shared-ext"))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(a_now["closedAt"], Value::Null);
    assert_eq!(a_now["tags"], json!(["CANARY_A_TAG"]));
    assert_eq!(a_now["currentRunId"], json!(a_run));
    app.cleanup().await;
}
