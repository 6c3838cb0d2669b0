//! The authorization matrix (issue #9): every cell of `tests/policy/authorization.csv` (route ×
//! credential kind × target, with the expected outcome class) executed against a real deployment
//! (Postgres, RabbitMQ, Redis, an in-process api and worker).
//!
//! Besides the status class of every cell it checks:
//! - canaries: each session's records, metadata, tags, payload, snapshot and waitpoint output
//!   carry a unique canary; no answer contains a canary, friendly id or environment id that its
//!   credential may not see or the cell does not reach, nor any secret key; allowed reads do
//!   contain the canary of the session they reach (so the check is not vacuous);
//! - no side effects of denied cells: per cell the api's publish and append counters; per route
//!   (a batch of its denied cells, after a short settle) a fingerprint of every table, new outbox
//!   events, the worker's applied commands and waitpoint completions (every session keeps a
//!   waiting waitpoint on both channels during each batch, so a drain would show);
//! - inventory: the router's `route_table`, the OpenAPI document and the policy's route rows are
//!   the same set of (method, path), and each route has exactly one row per credential × target
//!   (× io).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde_json::{Value, json};
use shared::domain::tokens::{
    PublicTokenClaims, WRITER_TOKEN_AUDIENCE, WriterTokenClaims, mint_public_token,
    mint_writer_token,
};
use tests::{TestApp, encode_segment, metric_sum};

const POLICY: &str = include_str!("../policy/authorization.csv");
/// The side channel every session of the matrix has records on (`{name}` in the paths).
const MATRIX_CHANNEL: &str = "matrix";
const HEADER: &str = "method,path,io,credential,target,expected,reaches";

/// Bearer credential kinds: every route has a row for each.
const BEARER_KINDS: [&str; 23] = [
    "none",
    "malformed",
    "secret_key_a",
    "secret_key_b",
    "revoked_secret_key_a",
    "token_own",
    "token_other_session",
    "token_other_env_same_external_id",
    "token_expired",
    "token_just_expired",
    "token_within_leeway",
    "token_alg_none",
    "token_wrong_key",
    "token_wrong_aud",
    "token_wrong_iss",
    "token_not_public",
    "token_env_b_key_claiming_env_a",
    "token_revoked_key_a",
    "token_read_only",
    "token_admin_own",
    "token_out_reader",
    "token_creator",
    "token_channel_writer",
];

/// Signed-URL kinds: only the snapshot blob routes (which take no bearer credential) have them.
const URL_KINDS: [&str; 6] = [
    "signed_url_a",
    "signed_url_b",
    "signed_url_a_wrong_method",
    "signed_url_a_expired",
    "signed_url_a_tampered",
    "signed_url_a_env_b",
];

/// Writer tokens (`x-s2-access-token`), for the writer endpoint only: handed out by PUT (own:
/// A1's `out`; other_session: A2's `out`; env_b: B1's `out`; own_in: A1's `in`) or minted by the
/// test (expired; signed with the revoked key), each for A1's `out` unless stated.
const WRITER_KINDS: [&str; 6] = [
    "writer_token_own",
    "writer_token_other_session",
    "writer_token_env_b",
    "writer_token_own_in",
    "writer_token_expired",
    "writer_token_revoked_key_a",
];

const BLOB_PATH: &str = "/api/v1/session-snapshots/{session}";
const WRITER_PATH: &str = "/s2/v1/streams/{stream}/records";
const SESSION_EXTERNAL_IDS: [(&str, &str); 3] =
    [("A1", "twin"), ("A2", "other-chat"), ("B1", "twin")];
/// Tables whose content a denied request must not change (fingerprinted; `outbox_events` is
/// checked for new rows instead, because the worker deletes published events on its own).
const FINGERPRINTED_TABLES: [&str; 9] = [
    "projects",
    "environments",
    "secret_keys",
    "sessions",
    "runs",
    "records",
    "applied_commands",
    "waitpoints",
    "session_snapshots",
];

/// One row of the policy table.
#[derive(Clone, Debug)]
struct Cell {
    line: usize,
    method: String,
    path: String,
    io: String,
    credential: String,
    target: String,
    expected: String,
    reaches: String,
}

impl Cell {
    fn key(&self) -> (String, String, String, String, String) {
        (
            self.method.clone(),
            self.path.clone(),
            self.io.clone(),
            self.credential.clone(),
            self.target.clone(),
        )
    }

    fn describe(&self) -> String {
        format!(
            "line {}: {} {} io={} credential={} target={}",
            self.line, self.method, self.path, self.io, self.credential, self.target
        )
    }
}

fn parse_policy() -> Vec<Cell> {
    let mut lines = POLICY
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.starts_with('#'));
    let (_, header) = lines.next().expect("policy header");
    assert_eq!(header.trim(), HEADER, "policy columns");
    lines
        .map(|(index, line)| {
            let fields: Vec<&str> = line.trim().split(',').collect();
            assert_eq!(fields.len(), 7, "line {}: {line}", index + 1);
            assert!(
                matches!(fields[5], "allow" | "401" | "403" | "404" | "501"),
                "line {}: unknown outcome class {}",
                index + 1,
                fields[5]
            );
            Cell {
                line: index + 1,
                method: fields[0].to_owned(),
                path: fields[1].to_owned(),
                io: fields[2].to_owned(),
                credential: fields[3].to_owned(),
                target: fields[4].to_owned(),
                expected: fields[5].to_owned(),
                reaches: fields[6].to_owned(),
            }
        })
        .collect()
}

/// The io variants, credential kinds and targets a route must have rows for.
fn dimensions(path: &str) -> (Vec<&'static str>, Vec<&'static str>, Vec<&'static str>) {
    let ios = if path.contains("{io}") {
        vec!["in", "out"]
    } else {
        vec!["-"]
    };
    let mut credentials = BEARER_KINDS.to_vec();
    if path == BLOB_PATH {
        credentials.extend(URL_KINDS);
    }
    if path == WRITER_PATH {
        credentials.extend(WRITER_KINDS);
    }
    let targets = if path.contains("{session}") {
        vec!["own", "own_by_id", "other", "foreign"]
    } else if path.contains("{run}") || path.contains("{waitpoint}") || path == WRITER_PATH {
        vec!["own", "other", "foreign"]
    } else {
        vec!["-"]
    };
    (ios, credentials, targets)
}

/// (METHOD, path) of every explicit method of every `route_table` entry. axum's `MethodRouter`
/// has no accessor for its methods; its `Debug` lists each method's endpoint (`None` if unset).
/// Implicit answers (HEAD on GET routes, CORS OPTIONS) are not explicit routes.
fn routed_operations() -> BTreeSet<(String, String)> {
    const METHODS: [&str; 9] = [
        "get", "head", "delete", "options", "patch", "post", "put", "trace", "connect",
    ];
    let mut operations = BTreeSet::new();
    for (path, router) in api::routes::route_table() {
        let debug = format!("{router:?}");
        assert!(
            debug.starts_with("MethodRouter {"),
            "unexpected MethodRouter debug output: {debug}"
        );
        for method in METHODS {
            let needle = format!(" {method}: ");
            let at = debug
                .find(&needle)
                .unwrap_or_else(|| panic!("{method} missing from {debug}"));
            if !debug[at + needle.len()..].starts_with("None") {
                operations.insert((method.to_uppercase(), path.to_owned()));
            }
        }
    }
    operations
}

fn documented_operations() -> BTreeSet<(String, String)> {
    let document: Value = serde_json::from_str(api::routes::OPENAPI_DOCUMENT).expect("openapi");
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if matches!(
                method.as_str(),
                "get" | "head" | "delete" | "options" | "patch" | "post" | "put" | "trace"
            ) {
                operations.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    operations
}

/// A session of the fixture.
#[derive(Clone, Debug)]
struct Session {
    name: &'static str,
    environment: &'static str,
    friendly_id: String,
    external_id: String,
    run_id: String,
    /// A completed waitpoint whose output is this session's `in` canary record.
    waitpoint_id: String,
    /// The publicAccessToken create returned.
    token: String,
}

impl Session {
    fn canary(&self) -> String {
        format!("CANARY_{}", self.name)
    }
}

/// How a cell presents its credential.
enum Auth {
    None,
    Bearer(String),
    /// A signed query string for the snapshot blob routes.
    Query(String),
}

struct Fixture {
    app: TestApp,
    db: DatabaseConnection,
    env_a: String,
    env_b: String,
    key_b: String,
    revoked_key_a: String,
    sessions: BTreeMap<&'static str, Session>,
    /// Signed snapshot query strings: (session name, method) → query.
    signed: HashMap<(&'static str, &'static str), String>,
    /// Writer tokens handed out by PUT initialize: kind → token.
    writer_tokens: HashMap<&'static str, String>,
}

/// Side-effect counters of the api, read from `/metrics` (recorded before a request answers).
#[derive(Clone, Debug, PartialEq)]
struct ApiCounters {
    appends_accepted: f64,
    published_messages: f64,
    published_commands: f64,
    publish_failures: f64,
}

/// Everything a denied batch must leave unchanged.
#[derive(Clone, Debug, PartialEq)]
struct World {
    tables: BTreeMap<String, (i64, String)>,
    worker_commands: f64,
    waitpoints_completed: f64,
    waiting_waitpoints: i64,
}

/// The body of an SSE answer up to its first complete `batch` event (or 3 s, or its end).
async fn read_sse(mut response: reqwest::Response) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut body = String::new();
    loop {
        if body
            .find("batch")
            .is_some_and(|at| body[at..].contains("\n\n"))
        {
            return body;
        }
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => body.push_str(&String::from_utf8_lossy(&chunk)),
            _ => return body,
        }
    }
}

fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

fn join_pairs(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

impl Fixture {
    async fn build() -> Self {
        let app = TestApp::spawn().await;
        let db = sea_orm::Database::connect(app.settings.database_url.as_str())
            .await
            .expect("database");
        let key_b = app.create_environment("matrix-b").await;
        let env_a_row = app
            .store
            .find_environment("test-project", "dev")
            .await
            .expect("find env A")
            .expect("env A");
        let env_b = app
            .store
            .find_environment("test-project", "matrix-b")
            .await
            .expect("find env B")
            .expect("env B")
            .public_id;
        // A second key of env A, revoked before any token is verified (so no instance has it in
        // its verification-key cache); the original key stays live (grace of a day).
        let revoked_key_a = app
            .store
            .rotate_secret_key(
                env_a_row.id,
                chrono::TimeDelta::days(1),
                &app.settings.master_key,
            )
            .await
            .expect("rotate");
        let newest = app
            .store
            .list_secret_keys(env_a_row.id)
            .await
            .expect("keys")
            .first()
            .map(|(id, _, _)| *id)
            .expect("a key");
        assert!(
            app.store
                .revoke_secret_key(env_a_row.id, newest)
                .await
                .expect("revoke"),
            "the new key is revoked"
        );
        let mut fixture = Self {
            env_a: env_a_row.public_id,
            env_b,
            key_b,
            revoked_key_a,
            sessions: BTreeMap::new(),
            signed: HashMap::new(),
            writer_tokens: HashMap::new(),
            db,
            app,
        };
        for (name, external_id) in SESSION_EXTERNAL_IDS {
            let session = fixture.create_session(name, external_id).await;
            fixture.sessions.insert(name, session);
        }
        for (kind, session, io) in [
            ("writer_token_own", "A1", "out"),
            ("writer_token_other_session", "A2", "out"),
            ("writer_token_env_b", "B1", "out"),
            ("writer_token_own_in", "A1", "in"),
        ] {
            let token = fixture.initialize_writer(session, io).await;
            fixture.writer_tokens.insert(kind, token);
        }
        for name in ["A1", "B1"] {
            for method in ["GET", "PUT"] {
                let url = fixture.snapshot_url(name, method).await;
                let (_, query) = url.split_once('?').expect("signed query");
                fixture.signed.insert((name, method), query.to_owned());
            }
        }
        fixture
    }

    /// PUT initialize of a session's stream by its environment's secret key: the writer token.
    async fn initialize_writer(&self, name: &str, io: &str) -> String {
        let session = self.session(name);
        let response = self
            .app
            .client
            .put(self.app.url(&format!(
                "/realtime/v1/sessions/{}/{io}",
                session.friendly_id
            )))
            .bearer_auth(self.environment_key(session.environment))
            .send()
            .await
            .expect("initialize");
        assert_eq!(response.status().as_u16(), 202, "PUT initialize");
        response.headers()["x-s2-access-token"]
            .to_str()
            .expect("token")
            .to_owned()
    }

    /// The stream name of a session's `out`, as PUT hands it out.
    fn writer_stream(&self, name: &str) -> String {
        format!("sessions/{}/out", self.session(name).friendly_id)
    }

    fn mint_writer(&self, key: &str, exp_offset: i64) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = WriterTokenClaims {
            iss: self.app.settings.jwt_issuer.clone(),
            aud: WRITER_TOKEN_AUDIENCE.into(),
            sub: self.env_a.clone(),
            stream: self.writer_stream("A1"),
            iat: now,
            exp: now + exp_offset,
        };
        mint_writer_token(&claims, key).expect("mint")
    }

    fn environment_key(&self, environment: &str) -> &str {
        if environment == "A" {
            &self.app.secret_key
        } else {
            &self.key_b
        }
    }

    fn session(&self, name: &str) -> &Session {
        &self.sessions[name]
    }

    /// Creates a session with canaries everywhere: payload, tags, metadata, both channels, a
    /// completed waitpoint and a snapshot.
    async fn create_session(&self, name: &'static str, external_id: &str) -> Session {
        let environment = if name.starts_with('A') { "A" } else { "B" };
        let key = self.environment_key(environment).to_owned();
        let canary = format!("CANARY_{name}");
        let response = self
            .app
            .create_session_with(
                &key,
                json!({
                    "type": "chat.agent",
                    "externalId": external_id,
                    "taskIdentifier": "agent",
                    "triggerConfig": { "basePayload": { "canary": format!("{canary}_PAYLOAD") } },
                    "tags": [format!("{canary}_TAG")],
                    "metadata": { "canary": format!("{canary}_META") },
                }),
            )
            .await;
        assert_eq!(response.status(), 201, "create {name}");
        let created: Value = response.json().await.expect("json");
        let friendly_id = created["id"].as_str().expect("id").to_owned();
        let run_id = created["runId"].as_str().expect("runId").to_owned();
        let registered = self
            .app
            .wait_as(&key, &run_id, json!({"session": friendly_id, "io": "in"}))
            .await;
        assert_eq!(registered.status(), 200, "waitpoint of {name}");
        let registered: Value = registered.json().await.expect("json");
        let waitpoint_id = registered["waitpointId"]
            .as_str()
            .expect("waitpointId")
            .to_owned();
        for (stream, text) in [
            ("in", "IN"),
            ("out", "OUT"),
            ("channels/matrix/in", "CHANNEL_IN"),
            ("channels/matrix/out", "CHANNEL_OUT"),
        ] {
            let (status, body) = self
                .append_applied(&key, &friendly_id, stream, &format!("{canary}_{text}"))
                .await;
            assert_eq!(status, 200, "append {name}/{stream}: {body}");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, waitpoint) = self.app.waitpoint_as(&key, &waitpoint_id).await;
            if waitpoint["status"] == "COMPLETED" {
                assert!(
                    waitpoint["output"]
                        .as_str()
                        .is_some_and(|output| output.contains(&canary)),
                    "{waitpoint}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "waitpoint of {name}: {waitpoint}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let put_url = self
            .presigned(&key, &friendly_id, reqwest::Method::PUT)
            .await;
        let stored = self
            .app
            .client
            .put(put_url)
            .body(format!("{canary}_SNAPSHOT"))
            .send()
            .await
            .expect("snapshot put");
        assert_eq!(stored.status(), 200, "snapshot of {name}");
        Session {
            name,
            environment,
            friendly_id,
            external_id: external_id.to_owned(),
            run_id,
            waitpoint_id,
            token: created["publicAccessToken"]
                .as_str()
                .expect("publicAccessToken")
                .to_owned(),
        }
    }

    async fn presigned(&self, key: &str, session: &str, method: reqwest::Method) -> String {
        let response = self
            .app
            .client
            .request(
                method,
                self.app
                    .url(&format!("/api/v1/sessions/{session}/snapshot-url")),
            )
            .bearer_auth(key)
            .send()
            .await
            .expect("snapshot-url");
        assert_eq!(response.status(), 200, "snapshot-url");
        let body: Value = response.json().await.expect("json");
        body["presignedUrl"]
            .as_str()
            .expect("presignedUrl")
            .to_owned()
    }

    async fn snapshot_url(&self, name: &str, method: &str) -> String {
        let session = self.session(name);
        let method = if method == "PUT" {
            reqwest::Method::PUT
        } else {
            reqwest::Method::GET
        };
        self.presigned(
            self.environment_key(session.environment),
            &session.friendly_id,
            method,
        )
        .await
    }

    /// An append answered after the worker applied it (`Prefer: wait`). `stream` is `in`,
    /// `out` or `channels/{name}/{io}`.
    async fn append_applied(
        &self,
        key: &str,
        session: &str,
        stream: &str,
        body: &str,
    ) -> (u16, String) {
        let response = self
            .app
            .client
            .post(self.app.url(&format!(
                "/realtime/v1/sessions/{}/{stream}/append",
                encode_segment(session)
            )))
            .bearer_auth(key)
            .header("Prefer", "wait=10")
            .body(body.to_owned())
            .send()
            .await
            .expect("append");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    fn mint(&self, key: &str, tweak: impl Fn(&mut PublicTokenClaims)) -> String {
        let now = chrono::Utc::now().timestamp();
        let mut claims = PublicTokenClaims {
            iss: self.app.settings.jwt_issuer.clone(),
            aud: self.app.settings.jwt_audience.clone(),
            sub: self.env_a.clone(),
            public: true,
            scopes: vec![
                "read:sessions:twin".to_owned(),
                "write:sessions:twin".to_owned(),
            ],
            iat: Some(now),
            exp: now + 600,
        };
        tweak(&mut claims);
        mint_public_token(&claims, key).expect("mint")
    }

    /// The credential of a cell, minted at request time (so expiry offsets are exact).
    fn auth(&self, kind: &str, method: &str) -> Auth {
        let key_a = self.app.secret_key.as_str();
        let now = chrono::Utc::now().timestamp();
        let bearer = |token: String| Auth::Bearer(token);
        match kind {
            "none" => Auth::None,
            "malformed" => bearer("this-is-not-a-credential".to_owned()),
            "secret_key_a" => bearer(key_a.to_owned()),
            "secret_key_b" => bearer(self.key_b.clone()),
            "revoked_secret_key_a" => bearer(self.revoked_key_a.clone()),
            "token_own" => bearer(self.session("A1").token.clone()),
            "token_other_session" => bearer(self.session("A2").token.clone()),
            "token_other_env_same_external_id" => bearer(self.session("B1").token.clone()),
            "token_expired" => bearer(self.mint(key_a, |claims| claims.exp = now - 3600)),
            "token_just_expired" => bearer(self.mint(key_a, |claims| claims.exp = now - 6)),
            "token_within_leeway" => bearer(self.mint(key_a, |claims| claims.exp = now - 2)),
            "token_alg_none" => {
                let valid = self.mint(key_a, |_| {});
                let payload = valid.split('.').nth(1).expect("payload");
                // {"alg":"none","typ":"JWT"}
                bearer(format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}."))
            }
            "token_wrong_key" => {
                bearer(self.mint("tr_sk_NotAKeyOfAnyEnvironment0000000000000", |_| {}))
            }
            "token_wrong_aud" => bearer(self.mint(key_a, |claims| {
                claims.aud = "https://evil.example".into();
            })),
            "token_wrong_iss" => bearer(self.mint(key_a, |claims| {
                claims.iss = "https://evil.example".into();
            })),
            "token_not_public" => bearer(self.mint(key_a, |claims| claims.public = false)),
            "token_env_b_key_claiming_env_a" => bearer(self.mint(&self.key_b, |_| {})),
            "token_revoked_key_a" => bearer(self.mint(&self.revoked_key_a, |_| {})),
            "token_read_only" => bearer(self.mint(key_a, |claims| {
                claims.scopes = vec!["read:sessions:twin".into()];
            })),
            "token_admin_own" => bearer(self.mint(key_a, |claims| {
                claims.scopes = vec!["admin:sessions:twin".into()];
            })),
            "token_out_reader" => bearer(self.mint(key_a, |claims| {
                claims.scopes = vec!["read:sessions:twin:out".into()];
            })),
            "token_channel_writer" => bearer(self.mint(key_a, |claims| {
                claims.scopes = vec!["write:sessions:twin:channels:matrix:in".into()];
            })),
            "token_creator" => bearer(self.mint(key_a, |claims| {
                claims.scopes = vec!["write:sessions:twin".into(), "trigger:tasks:agent".into()];
            })),
            "writer_token_own"
            | "writer_token_other_session"
            | "writer_token_env_b"
            | "writer_token_own_in" => bearer(self.writer_tokens[kind].clone()),
            "writer_token_expired" => bearer(self.mint_writer(key_a, -3600)),
            "writer_token_revoked_key_a" => bearer(self.mint_writer(&self.revoked_key_a, 600)),
            "signed_url_a" => Auth::Query(self.signed[&("A1", self.blob_method(method))].clone()),
            "signed_url_b" => Auth::Query(self.signed[&("B1", self.blob_method(method))].clone()),
            "signed_url_a_wrong_method" => {
                let other = if method == "PUT" { "GET" } else { "PUT" };
                Auth::Query(self.signed[&("A1", other)].clone())
            }
            "signed_url_a_expired" => {
                let expires = now - 10;
                let signature = shared::domain::snapshots::sign(
                    &self.app.settings.master_key,
                    &self.env_a,
                    &self.session("A1").friendly_id,
                    method,
                    expires,
                );
                Auth::Query(format!(
                    "environment={}&method={method}&expires={expires}&signature={signature}",
                    self.env_a
                ))
            }
            "signed_url_a_tampered" => {
                let mut pairs = query_pairs(&self.signed[&("A1", self.blob_method(method))]);
                for (key, value) in &mut pairs {
                    if key == "signature" {
                        let last = if value.ends_with('0') { "1" } else { "0" };
                        value.pop();
                        value.push_str(last);
                    }
                }
                Auth::Query(join_pairs(&pairs))
            }
            "signed_url_a_env_b" => {
                let mut pairs = query_pairs(&self.signed[&("A1", self.blob_method(method))]);
                for (key, value) in &mut pairs {
                    if key == "environment" {
                        value.clone_from(&self.env_b);
                    }
                }
                Auth::Query(join_pairs(&pairs))
            }
            other => panic!("unknown credential kind {other}"),
        }
    }

    fn blob_method(&self, method: &str) -> &'static str {
        if method == "PUT" { "PUT" } else { "GET" }
    }

    /// The session a target names, and the path segment naming it.
    fn target(&self, target: &str) -> (&Session, String) {
        match target {
            "own" => (self.session("A1"), self.session("A1").external_id.clone()),
            "own_by_id" => (self.session("A1"), self.session("A1").friendly_id.clone()),
            "other" => (self.session("A2"), self.session("A2").external_id.clone()),
            "foreign" => (self.session("B1"), self.session("B1").friendly_id.clone()),
            other => panic!("unknown target {other}"),
        }
    }

    /// Sends one cell's request: (status, body).
    async fn execute(&self, cell: &Cell) -> (u16, String) {
        let mut path = cell
            .path
            .replace("{io}", &cell.io)
            .replace("{name}", MATRIX_CHANNEL);
        let named = (cell.target != "-").then(|| self.target(&cell.target));
        if let Some((session, segment)) = &named {
            path = path
                .replace("{session}", &encode_segment(segment))
                .replace(
                    "{stream}",
                    &encode_segment(&self.writer_stream(session.name)),
                )
                .replace("{run}", &encode_segment(&session.run_id))
                .replace("{waitpoint}", &encode_segment(&session.waitpoint_id));
        }
        let auth = self.auth(&cell.credential, &cell.method);
        if let Auth::Query(query) = &auth {
            path = format!("{path}?{query}");
        }
        let method: reqwest::Method = cell.method.parse().expect("method");
        let mut request = self.app.client.request(method, self.app.url(&path));
        if let Auth::Bearer(token) = &auth {
            request = request.bearer_auth(token);
        }
        request = match (cell.method.as_str(), cell.path.as_str()) {
            ("POST", "/api/v1/sessions") => request.json(&json!({
                "type": "chat.agent",
                "externalId": "twin",
                "taskIdentifier": "agent",
                "triggerConfig": { "basePayload": {} },
            })),
            ("PATCH", _) => request.json(&json!({})),
            ("POST", "/api/v1/sessions/{session}/close") => {
                request.json(&json!({ "reason": "matrix" }))
            }
            ("POST", "/api/v1/sessions/{session}/end-and-continue") => request
                .json(&json!({ "callingRunId": "run_matrix_not_current", "reason": "matrix" })),
            ("POST", "/realtime/v1/sessions/{session}/{io}/append")
            | ("POST", "/realtime/v1/sessions/{session}/channels/{name}/{io}/append") => request
                .header("Prefer", "wait=10")
                .body(format!("matrix cell on line {}", cell.line)),
            ("POST", WRITER_PATH) => request.json(&json!({
                "records": [{ "body": format!("matrix cell on line {}", cell.line) }],
            })),
            ("POST", "/api/v1/runs/{run}/session-streams/wait") => {
                let (_, segment) = named.as_ref().expect("a target");
                request.json(&json!({ "session": segment, "io": "in" }))
            }
            ("PUT", BLOB_PATH) => {
                // The target's own snapshot content: an allowed write changes nothing visible.
                let (session, _) = named.as_ref().expect("a target");
                request
                    .header("Content-Type", "application/octet-stream")
                    .body(format!("{}_SNAPSHOT", session.canary()))
            }
            ("GET", "/realtime/v1/sessions/{session}/{io}")
            | ("GET", "/realtime/v1/sessions/{session}/channels/{name}/{io}") => request
                .header("Accept", "text/event-stream")
                .header("Timeout-Seconds", "1"),
            _ => request,
        };
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let body = if cell.method == "GET"
            && (cell.path == "/realtime/v1/sessions/{session}/{io}"
                || cell.path == "/realtime/v1/sessions/{session}/channels/{name}/{io}")
        {
            read_sse(response).await
        } else {
            response.text().await.unwrap_or_default()
        };
        (status, body)
    }

    /// Subjects (sessions `A1`, `A2`, `B1`; environments `A`, `B`) a credential may see.
    fn visible(credential: &str) -> &'static [&'static str] {
        match credential {
            "secret_key_a" => &["A1", "A2", "A"],
            "secret_key_b" | "token_other_env_same_external_id" | "signed_url_b" => &["B1", "B"],
            "token_own"
            | "token_within_leeway"
            | "token_read_only"
            | "token_admin_own"
            | "token_out_reader"
            | "token_creator"
            | "token_channel_writer"
            | "signed_url_a"
            | "writer_token_own" => &["A1", "A"],
            "token_other_session" | "writer_token_other_session" => &["A2", "A"],
            "writer_token_env_b" => &["B1", "B"],
            _ => &[],
        }
    }

    /// Subjects an allowed cell's answer may carry.
    fn reach(reaches: &str) -> &'static [&'static str] {
        match reaches {
            "A1" => &["A1", "A"],
            "A2" => &["A2", "A"],
            "B1" => &["B1", "B"],
            "A" => &["A1", "A2", "A"],
            "B" => &["B1", "B"],
            "-" => &[],
            other => panic!("unknown reaches {other}"),
        }
    }

    /// The strings that identify a subject.
    fn marks(&self, subject: &str) -> Vec<String> {
        match subject {
            "A" => vec![self.env_a.clone()],
            "B" => vec![self.env_b.clone()],
            name => {
                let session = self.session(name);
                vec![
                    session.canary(),
                    session.friendly_id.clone(),
                    session.run_id.clone(),
                    session.waitpoint_id.clone(),
                ]
            }
        }
    }

    /// Leaks in a cell's answer: marks it may not carry, and secret keys.
    fn leaks(&self, cell: &Cell, body: &str) -> Vec<String> {
        let reach = if cell.expected == "allow" {
            Self::reach(&cell.reaches)
        } else {
            &[]
        };
        let permitted: Vec<&str> = Self::visible(&cell.credential)
            .iter()
            .copied()
            .filter(|subject| reach.contains(subject))
            .collect();
        let mut leaks = Vec::new();
        for subject in ["A1", "A2", "B1", "A", "B"] {
            if permitted.contains(&subject) {
                continue;
            }
            for mark in self.marks(subject) {
                if body.contains(&mark) {
                    leaks.push(format!("{subject}: {mark}"));
                }
            }
        }
        for key in [&self.app.secret_key, &self.key_b, &self.revoked_key_a] {
            let random = key.trim_start_matches("tr_sk_");
            if body.contains(random) {
                leaks.push("a secret key".to_owned());
            }
        }
        leaks
    }

    /// What an allowed answer must contain (a canary of what it reaches), if anything.
    fn must_contain(&self, cell: &Cell) -> Vec<String> {
        let revealing = matches!(
            (cell.method.as_str(), cell.path.as_str()),
            ("GET", "/api/v1/sessions/{session}")
                | ("PATCH", "/api/v1/sessions/{session}")
                | ("POST", "/api/v1/sessions/{session}/close")
                | ("POST", "/api/v1/sessions")
                | ("GET", "/api/v1/sessions")
                | ("GET", "/realtime/v1/sessions/{session}/{io}/records")
                | ("GET", "/realtime/v1/sessions/{session}/{io}")
                | (
                    "GET",
                    "/realtime/v1/sessions/{session}/channels/{name}/{io}/records"
                )
                | (
                    "GET",
                    "/realtime/v1/sessions/{session}/channels/{name}/{io}"
                )
                | ("GET", BLOB_PATH)
                | ("GET", "/api/v1/waitpoints/tokens/{waitpoint}")
        );
        if cell.path == "/api/v1/auth/jwt/claims" {
            return self.marks(&cell.reaches);
        }
        if !revealing {
            return Vec::new();
        }
        Self::reach(&cell.reaches)
            .iter()
            .filter(|subject| subject.len() == 2)
            .map(|subject| self.session(subject).canary())
            .collect()
    }

    async fn api_counters(&self) -> ApiCounters {
        let text = self.app.metrics_text().await;
        ApiCounters {
            appends_accepted: metric_sum(&text, "sessions_api_appends_accepted_total"),
            published_messages: metric_sum(&text, "sessions_api_publish_batch_size_count"),
            published_commands: metric_sum(&text, "sessions_api_publish_batch_size_sum"),
            publish_failures: metric_sum(&text, "sessions_api_publish_failures_total"),
        }
    }

    async fn world(&self) -> World {
        let mut tables = BTreeMap::new();
        for table in FINGERPRINTED_TABLES {
            let row = self
                .db
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!(
                        "SELECT count(*)::bigint AS n, \
                         coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') AS h \
                         FROM {table} t"
                    ),
                ))
                .await
                .expect("fingerprint")
                .expect("a row");
            tables.insert(
                table.to_owned(),
                (
                    row.try_get::<i64>("", "n").expect("n"),
                    row.try_get::<String>("", "h").expect("h"),
                ),
            );
        }
        let waiting = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT count(*)::bigint AS n FROM waitpoints WHERE status = 'WAITING'",
            ))
            .await
            .expect("waiting")
            .expect("a row")
            .try_get::<i64>("", "n")
            .expect("n");
        let text = self.app.metrics_text().await;
        World {
            tables,
            worker_commands: metric_sum(&text, "sessions_worker_commands_total"),
            waitpoints_completed: metric_sum(&text, "sessions_worker_waitpoints_completed_total"),
            waiting_waitpoints: waiting,
        }
    }

    async fn outbox_events_since(&self, since: chrono::DateTime<chrono::Utc>) -> i64 {
        self.db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!(
                    "SELECT count(*)::bigint AS n FROM outbox_events WHERE created_at >= '{}'::timestamptz",
                    since.to_rfc3339()
                ),
            ))
            .await
            .expect("outbox")
            .expect("a row")
            .try_get::<i64>("", "n")
            .expect("n")
    }

    /// Every session keeps a waiting waitpoint on both channels, so a denied request that
    /// appended anything would complete (drain) one.
    async fn arm_waitpoints(&self) {
        let rows = self
            .db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT session_friendly_id AS s, io FROM waitpoints WHERE status = 'WAITING'",
            ))
            .await
            .expect("waiting waitpoints");
        let armed: BTreeSet<(String, String)> = rows
            .iter()
            .map(|row| {
                (
                    row.try_get::<String>("", "s").expect("s"),
                    row.try_get::<String>("", "io").expect("io"),
                )
            })
            .collect();
        for session in self.sessions.values() {
            for io in ["in", "out"] {
                if armed.contains(&(session.friendly_id.clone(), io.to_owned())) {
                    continue;
                }
                let response = self
                    .app
                    .wait_as(
                        self.environment_key(session.environment),
                        &session.run_id,
                        json!({ "session": session.friendly_id, "io": io }),
                    )
                    .await;
                assert_eq!(response.status(), 200, "arming {}/{io}", session.name);
            }
        }
    }
}

impl Fixture {
    /// The checks are not vacuous: an append by an allowed credential inside a measured window
    /// moves the api counters, the tables and the waitpoints; a body carrying another session's
    /// canary and a secret key is reported twice.
    async fn detectors_catch_a_seeded_side_effect_and_leak(&self) {
        self.arm_waitpoints().await;
        let before = self.world().await;
        let counters = self.api_counters().await;
        let a1 = self.session("A1");
        let (status, _) = self
            .append_applied(
                &self.app.secret_key,
                &a1.friendly_id,
                "in",
                "seeded side effect",
            )
            .await;
        assert_eq!(status, 200, "seeded append");
        let moved = self.api_counters().await;
        assert!(
            moved.appends_accepted > counters.appends_accepted
                && moved.published_commands > counters.published_commands,
            "the api counters see an append: {counters:?} → {moved:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let after = self.world().await;
        assert_ne!(after.tables["records"], before.tables["records"]);
        assert!(after.worker_commands > before.worker_commands);
        assert!(after.waitpoints_completed > before.waitpoints_completed);
        assert!(after.waiting_waitpoints < before.waiting_waitpoints);
        let cell = Cell {
            line: 0,
            method: "GET".into(),
            path: "/realtime/v1/sessions/{session}/{io}/records".into(),
            io: "in".into(),
            credential: "token_own".into(),
            target: "own".into(),
            expected: "allow".into(),
            reaches: "A1".into(),
        };
        let body = format!(
            "{} {} {}",
            a1.canary(),
            self.session("A2").canary(),
            self.key_b
        );
        assert_eq!(self.leaks(&cell, &body).len(), 2, "seeded leaks are found");
        assert!(self.leaks(&cell, &a1.canary()).is_empty());
    }
}

fn outcome_class(status: u16) -> String {
    if (200..300).contains(&status) {
        "allow".to_owned()
    } else {
        status.to_string()
    }
}

#[tokio::test]
async fn every_route_credential_and_target_behaves_as_the_policy_says() {
    let started = Instant::now();
    let cells = parse_policy();
    let mut problems: Vec<String> = Vec::new();

    // Inventory: router, OpenAPI and policy list the same operations.
    let routed = routed_operations();
    let documented = documented_operations();
    let in_policy: BTreeSet<(String, String)> = cells
        .iter()
        .map(|cell| (cell.method.clone(), cell.path.clone()))
        .collect();
    for (name, set) in [("OpenAPI", &documented), ("policy", &in_policy)] {
        for missing in routed.difference(set) {
            problems.push(format!(
                "inventory: {missing:?} is routed but not in the {name}"
            ));
        }
        for extra in set.difference(&routed) {
            problems.push(format!(
                "inventory: {extra:?} is in the {name} but not routed"
            ));
        }
    }
    // Completeness: exactly one row per route × credential × target (× io).
    let mut seen = BTreeSet::new();
    for cell in &cells {
        if !seen.insert(cell.key()) {
            problems.push(format!("duplicate row: {}", cell.describe()));
        }
    }
    let mut wanted = BTreeSet::new();
    for (method, path) in &routed {
        let (ios, credentials, targets) = dimensions(path);
        for io in &ios {
            for credential in &credentials {
                for target in &targets {
                    wanted.insert((
                        method.clone(),
                        path.clone(),
                        (*io).to_owned(),
                        (*credential).to_owned(),
                        (*target).to_owned(),
                    ));
                }
            }
        }
    }
    for missing in wanted.difference(&seen) {
        problems.push(format!("policy has no row for {missing:?}"));
    }
    for extra in seen.difference(&wanted) {
        problems.push(format!("policy row for an unknown combination {extra:?}"));
    }

    let fixture = Fixture::build().await;
    let setup = started.elapsed();
    fixture
        .detectors_catch_a_seeded_side_effect_and_leak()
        .await;

    // Route by route, in file order; `close` last (its allowed cells close the sessions).
    let mut routes: Vec<(String, String)> = Vec::new();
    for cell in &cells {
        let route = (cell.method.clone(), cell.path.clone());
        if !routes.contains(&route) {
            routes.push(route);
        }
    }
    routes.sort_by_key(|(_, path)| path.ends_with("/close"));

    let mut matching = 0_usize;
    let mut mismatches: Vec<String> = Vec::new();
    let mut leaks: Vec<String> = Vec::new();
    let mut side_effects: Vec<String> = Vec::new();
    let mut positives: Vec<String> = Vec::new();
    let mut denied_batches = 0_usize;
    let mut record = |cell: &Cell, status: u16, body: &str, fixture: &Fixture| {
        let actual = outcome_class(status);
        if actual == cell.expected {
            matching += 1;
        } else {
            let mut excerpt: String = body.chars().take(160).collect();
            excerpt = excerpt.replace('\n', "\\n");
            mismatches.push(format!(
                "{}: expected {}, got {status} {excerpt}",
                cell.describe(),
                cell.expected
            ));
        }
        let found = fixture.leaks(cell, body);
        if !found.is_empty() {
            leaks.push(format!("{}: {}", cell.describe(), found.join(", ")));
        }
        if cell.expected == "allow" && actual == "allow" {
            for mark in fixture.must_contain(cell) {
                if !body.contains(&mark) {
                    positives.push(format!("{}: answer lacks {mark}", cell.describe()));
                }
            }
        }
        if actual != "allow" && cell.method != "HEAD" {
            // The writer endpoint answers in S2's shape, `{code, message}`.
            let is_json_error = serde_json::from_str::<Value>(body)
                .ok()
                .is_some_and(|value| {
                    if cell.path == WRITER_PATH {
                        value["code"].is_string() && value["message"].is_string()
                    } else {
                        value["error"].is_string()
                    }
                });
            if !is_json_error {
                positives.push(format!(
                    "{}: a denial without a JSON error body: {body}",
                    cell.describe()
                ));
            }
        }
    };

    for (method, path) in &routes {
        let route_cells: Vec<&Cell> = cells
            .iter()
            .filter(|cell| &cell.method == method && &cell.path == path)
            .collect();
        let (denied, allowed): (Vec<&Cell>, Vec<&Cell>) = route_cells
            .into_iter()
            .partition(|cell| cell.expected != "allow");
        if !denied.is_empty() {
            denied_batches += 1;
            fixture.arm_waitpoints().await;
            // Whatever the previous allowed cells did has been applied (they wait for the
            // worker); let its metrics and events land before the baseline.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let since = chrono::Utc::now();
            let before = fixture.world().await;
            let mut counters = fixture.api_counters().await;
            for cell in denied {
                let (status, body) = fixture.execute(cell).await;
                record(cell, status, &body, &fixture);
                let now = fixture.api_counters().await;
                if now != counters {
                    side_effects.push(format!(
                        "{}: api counters moved {counters:?} → {now:?}",
                        cell.describe()
                    ));
                }
                counters = now;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let after = fixture.world().await;
            if after != before {
                let mut diff = String::new();
                for (table, value) in &after.tables {
                    if before.tables.get(table) != Some(value) {
                        let _ = write!(diff, " {table} {:?}→{:?};", before.tables[table], value);
                    }
                }
                side_effects.push(format!(
                    "denied cells of {method} {path}: {diff} worker commands {}→{}, waitpoints completed {}→{}, waiting {}→{}",
                    before.worker_commands,
                    after.worker_commands,
                    before.waitpoints_completed,
                    after.waitpoints_completed,
                    before.waiting_waitpoints,
                    after.waiting_waitpoints
                ));
            }
            let new_events = fixture.outbox_events_since(since).await;
            if new_events != 0 {
                side_effects.push(format!(
                    "denied cells of {method} {path}: {new_events} new outbox events"
                ));
            }
        }
        for cell in allowed {
            let (status, body) = fixture.execute(cell).await;
            record(cell, status, &body, &fixture);
        }
    }

    let total = cells.len();
    println!(
        "authorization matrix: {total} cells over {} operations (router = OpenAPI = policy: {}), {denied_batches} denied batches, setup {setup:.1?}, total {:.1?}",
        routed.len(),
        routed == documented && routed == in_policy,
        started.elapsed()
    );
    println!(
        "  matching {matching}, mismatches {}, leaks {}, side effects {}, answer checks {}, inventory/completeness {}",
        mismatches.len(),
        leaks.len(),
        side_effects.len(),
        positives.len(),
        problems.len()
    );
    for (title, list) in [
        ("mismatch", &mismatches),
        ("leak", &leaks),
        ("side effect", &side_effects),
        ("answer", &positives),
        ("inventory", &problems),
    ] {
        for item in list {
            println!("  {title}: {item}");
        }
    }
    let failed = !(mismatches.is_empty()
        && leaks.is_empty()
        && side_effects.is_empty()
        && positives.is_empty()
        && problems.is_empty());
    fixture.app.cleanup().await;
    assert!(
        !failed,
        "the authorization matrix found problems (see above)"
    );
}
