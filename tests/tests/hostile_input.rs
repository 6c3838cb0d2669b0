//! Hostile input against every route of the route table (with the methods `api/openapi.json`
//! documents), as a secret key and as a session's public token: oversized bodies and headers,
//! invalid UTF-8, NUL bytes in ids and bodies, deeply nested JSON, huge ids and part ids, wrong
//! content types, bad page sizes and cursors, percent-encoding garbage in path segments.
//!
//! Every answer is below 500, every answer ≥ 400 has a JSON `{"error"}` body (the writer
//! endpoint `/s2/v1/…`: S2's `{"code", "message"}`; HEAD answers have no body; URIs over 64 KiB and header sections over hyper's limit are refused
//! by the HTTP layer itself, 414/431 without a body), and no handler panicked
//! (`sessions_api_panics_total` stays 0). The environment stays usable afterwards.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};
use tests::TestApp;

/// One request of the corpus.
#[derive(Clone, Debug)]
struct Case {
    method: reqwest::Method,
    /// Path and query, already encoded as they go on the wire.
    target: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    label: String,
}

/// Placeholder values for a path template: the valid one first, then garbage.
fn segment_values(placeholder: &str) -> Vec<(&'static str, String)> {
    let valid = match placeholder {
        "{session}" => "hostile",
        "{io}" => "in",
        "{name}" => "hostile-channel",
        "{run}" => "run_hostile",
        "{waitpoint}" => "waitpoint_hostile",
        "{stream}" => "sessions%2Fsession_hostile%2Fout",
        other => panic!("unknown placeholder {other}: extend this test"),
    };
    vec![
        ("valid", valid.to_owned()),
        ("nul", "a%00b".to_owned()),
        ("nul only", "%00".to_owned()),
        ("invalid percent", "%ZZ%".to_owned()),
        ("truncated percent", "abc%2".to_owned()),
        ("invalid utf-8", "%C3%28%FF%FE".to_owned()),
        ("overlong utf-8", "%C0%AF".to_owned()),
        ("control characters", "%01%1B%7F".to_owned()),
        ("encoded slash", "..%2F..%2Fetc%2Fpasswd".to_owned()),
        ("emoji", "%F0%9F%92%A9".to_owned()),
        // (100 KB: no client sends a URI over 64 KiB; see `raw_request` below.)
        ("60 KB", "x".repeat(60_000)),
    ]
}

/// Every concrete target of a path template: the valid one, and each placeholder replaced by
/// each garbage value while the others stay valid.
fn targets(template: &str) -> Vec<(String, String)> {
    let placeholders: Vec<&str> = ["{session}", "{io}", "{name}", "{run}", "{waitpoint}"]
        .into_iter()
        .filter(|placeholder| template.contains(placeholder))
        .collect();
    let valid = |path: &str, except: &str| {
        let mut path = path.to_owned();
        for placeholder in &placeholders {
            if *placeholder != except {
                path = path.replace(placeholder, &segment_values(placeholder)[0].1);
            }
        }
        path
    };
    let mut targets = vec![("valid path".to_owned(), valid(template, ""))];
    for placeholder in &placeholders {
        for (label, value) in segment_values(placeholder).into_iter().skip(1) {
            targets.push((
                format!("{placeholder} {label}"),
                valid(template, placeholder).replace(placeholder, &value),
            ));
        }
    }
    targets
}

fn nested(depth: usize) -> Vec<u8> {
    let mut body = vec![b'['; depth];
    body.extend(std::iter::repeat_n(b']', depth));
    body
}

/// Bodies for methods that take one: (label, content type, bytes).
fn bodies() -> Vec<(&'static str, Option<&'static str>, Vec<u8>)> {
    let create = json!({
        "type": "chat.agent", "externalId": "hostile-created", "taskIdentifier": "agent",
        "triggerConfig": { "basePayload": {} },
    });
    vec![
        ("empty", None, Vec::new()),
        ("empty object", Some("application/json"), b"{}".to_vec()),
        ("plausible", Some("application/json"), create.to_string().into_bytes()),
        (
            "invalid utf-8",
            Some("application/json"),
            vec![b'{', b'"', 0xff, 0xfe, 0x80, b'"', b'}'],
        ),
        ("invalid utf-8 text", Some("text/plain"), vec![0xc3, 0x28, 0xff]),
        ("raw nul", Some("text/plain"), b"before\0after".to_vec()),
        (
            "escaped nul in every field",
            Some("application/json"),
            br#"{"type":"a\u0000","externalId":"b\u0000","taskIdentifier":"c\u0000","triggerConfig":{"basePayload":{"k\u0000":"\u0000"}},"tags":["\u0000"],"metadata":{"\u0000":1},"reason":"\u0000","callingRunId":"\u0000","session":"\u0000","io":"in","timeout":"\u0000","idempotencyKey":"\u0000"}"#.to_vec(),
        ),
        ("100k brackets", Some("application/json"), vec![b'['; 100_000]),
        ("deeply nested balanced", Some("application/json"), nested(5_000)),
        (
            "huge ids",
            Some("application/json"),
            json!({
                "type": "x".repeat(100_000), "externalId": "y".repeat(100_000),
                "taskIdentifier": "z".repeat(100_000), "triggerConfig": { "basePayload": {} },
                "session": "s".repeat(100_000), "io": "in", "callingRunId": "r".repeat(100_000),
                "reason": "q".repeat(100_000), "idempotencyKey": "é".repeat(2_000),
            })
            .to_string()
            .into_bytes(),
        ),
        (
            "wrong types",
            Some("application/json"),
            br#"{"type":1,"externalId":[],"taskIdentifier":{},"triggerConfig":"x","tags":"t","metadata":5,"expiresAt":-99999999999999999999,"lastSeqNum":9223372036854775807,"timeout":"99999999999w","idempotencyKeyTTL":"-1s"}"#.to_vec(),
        ),
        (
            "extreme dates",
            Some("application/json"),
            json!({
                "type": "chat.agent", "externalId": "dates", "taskIdentifier": "agent",
                "triggerConfig": { "basePayload": {} }, "expiresAt": 8_000_000_000_000_000_i64,
            })
            .to_string()
            .into_bytes(),
        ),
        (
            "extreme seq",
            Some("application/json"),
            json!({ "session": "hostile", "io": "in", "lastSeqNum": i64::MAX })
                .to_string()
                .into_bytes(),
        ),
        ("xml", Some("application/xml"), b"<a><b/></a>".to_vec()),
        (
            "form",
            Some("application/x-www-form-urlencoded"),
            b"a=%00&b=%ZZ".to_vec(),
        ),
        (
            "garbage multipart",
            Some("multipart/form-data; boundary=x"),
            b"--x\r\n\r\n\xff\xfe--".to_vec(),
        ),
        ("bogus content type", Some("garbage/;;;=="), b"{}".to_vec()),
        ("2 MB", Some("application/json"), vec![b' '; 2 << 20]),
        ("12 MB", Some("application/octet-stream"), vec![b'x'; 12 << 20]),
    ]
}

/// Header sets sent with a valid target (the credential is added per run).
fn header_cases() -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    vec![
        ("60 KB part id", vec![("X-Part-Id", "p".repeat(60_000))]),
        ("non-ascii part id", vec![("X-Part-Id", "\u{e9}".into())]),
        ("empty part id", vec![("X-Part-Id", String::new())]),
        ("60 KB header", vec![("X-Junk", "j".repeat(60_000))]),
        ("600 KB of headers", vec![("X-Junk", "j".repeat(600_000))]),
        (
            "huge last-event-id",
            vec![("Last-Event-ID", "9".repeat(40))],
        ),
        (
            "max last-event-id",
            vec![("Last-Event-ID", i64::MAX.to_string())],
        ),
        (
            "negative last-event-id",
            vec![("Last-Event-ID", "-5".into())],
        ),
        ("text last-event-id", vec![("Last-Event-ID", "abc".into())]),
        ("zero timeout", vec![("Timeout-Seconds", "0".into())]),
        ("huge timeout", vec![("Timeout-Seconds", "9".repeat(30))]),
        ("negative timeout", vec![("Timeout-Seconds", "-1".into())]),
        ("prefer garbage", vec![("Prefer", "wait=abc, wait=".into())]),
        (
            "prefer huge",
            vec![("Prefer", format!("wait={}", "9".repeat(30)))],
        ),
        (
            "stream start garbage",
            vec![("X-Trigger-Stream-Start", "\u{ff}".into())],
        ),
    ]
}

/// Query strings for the routes that read one.
fn queries(template: &str) -> Vec<&'static str> {
    let mut queries = vec!["?%ZZ=%", "?a=%00", "?=&&=&"];
    if template == "/api/v1/sessions" {
        queries.extend([
            "?page%5Bsize%5D=-1",
            "?page%5Bsize%5D=0",
            "?page%5Bsize%5D=101",
            "?page%5Bsize%5D=99999999999999999999999",
            "?page%5Bsize%5D=abc",
            "?page%5Bsize%5D=",
            "?page%5Bafter%5D=session_nope",
            "?page%5Bafter%5D=%00",
            "?page%5Bbefore%5D=%FF%FE",
            "?page%5Bafter%5D=a&page%5Bbefore%5D=b",
            "?filter%5BcreatedAt%5D%5Bfrom%5D=-99999999999999999",
            "?filter%5BcreatedAt%5D%5Bfrom%5D=-8000000000000000",
            "?filter%5BcreatedAt%5D%5Bto%5D=8000000000000000",
            "?filter%5BcreatedAt%5D%5Bto%5D=-1000000-01-01T00:00:00Z",
            "?filter%5BcreatedAt%5D%5Bperiod%5D=99999999999w",
            "?filter%5Bstatus%5D=NOPE",
            "?filter%5Btype%5D=a%00",
            "?filter%5Btags%5D=%C3%28",
            "?unknown=1",
        ]);
    }
    if template.ends_with("/records") {
        queries.extend([
            "?afterEventId=-5",
            "?afterEventId=9223372036854775807",
            "?afterEventId=99999999999999999999",
            "?afterEventId=abc",
            "?afterEventId=%00",
        ]);
    }
    if template.starts_with("/api/v1/session-snapshots/") {
        queries.extend([
            "?environment=x&method=GET&expires=abc&signature=x",
            "?environment=%00&method=PUT&expires=99999999999999999999&signature=%FF",
            "?environment=x&method=GET&expires=-9223372036854775808&signature=",
        ]);
    }
    queries
}

/// The corpus for one documented operation.
fn cases(template: &str, method: &str) -> Vec<Case> {
    let method: reqwest::Method = method.to_uppercase().parse().expect("method");
    let takes_body = matches!(method.as_str(), "POST" | "PUT" | "PATCH");
    let valid = targets(template)[0].1.clone();
    let mut cases = Vec::new();
    let case =
        |target: String, headers: Vec<(String, String)>, body: Option<Vec<u8>>, label| Case {
            method: method.clone(),
            target,
            headers,
            body,
            label,
        };
    for (label, target) in targets(template) {
        let body = takes_body.then(|| b"{}".to_vec());
        cases.push(case(target, Vec::new(), body, label));
    }
    if takes_body {
        for (label, content_type, body) in bodies() {
            let headers = content_type
                .map(|value| vec![("Content-Type".to_owned(), value.to_owned())])
                .unwrap_or_default();
            cases.push(case(
                valid.clone(),
                headers,
                Some(body),
                format!("body {label}"),
            ));
        }
    }
    for (label, headers) in header_cases() {
        let headers = headers
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        let body = takes_body.then(|| b"{}".to_vec());
        cases.push(case(
            valid.clone(),
            headers,
            body,
            format!("headers {label}"),
        ));
    }
    for query in queries(template) {
        let body = takes_body.then(|| b"{}".to_vec());
        cases.push(case(
            format!("{valid}{query}"),
            Vec::new(),
            body,
            format!("query {query}"),
        ));
    }
    cases
}

/// What was wrong with one answer (None: fine).
async fn judge(
    case: &Case,
    template: &str,
    result: Result<reqwest::Response, reqwest::Error>,
) -> (Option<u16>, Option<String>) {
    let response = match result {
        Ok(response) => response,
        // Header sections and ids over hyper's limits are refused by the HTTP layer itself,
        // which may answer and close before the client finished writing them; that is not an
        // answer to judge. Oversized bodies (2 and 12 MB) are always answered: the api reads
        // and discards what it refused (README, "Refused request bodies").
        Err(error) if case.label.contains("KB") => {
            return (
                None,
                (!error.is_request() && !error.is_body()).then(|| format!("{error}")),
            );
        }
        Err(error) => return (None, Some(format!("no answer: {error}"))),
    };
    let status = response.status().as_u16();
    if status >= 500 {
        let body = response.text().await.unwrap_or_default();
        return (Some(status), Some(format!("server error {status}: {body}")));
    }
    if status < 400 {
        return (Some(status), None); // an SSE stream stays open: never read a success body
    }
    // The HTTP layer (hyper) refuses oversized header sections itself.
    let transport_refusal =
        status == 431 && case.headers.iter().any(|(_, value)| value.len() > 100_000);
    if transport_refusal || case.method == reqwest::Method::HEAD {
        return (Some(status), None);
    }
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = response.bytes().await.unwrap_or_default();
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let text_of = |field: &str| {
        parsed
            .as_ref()
            .and_then(|value| value[field].as_str())
            .is_some_and(|text| !text.is_empty())
    };
    let has_error = if template.starts_with("/s2/") {
        text_of("code") && text_of("message")
    } else {
        text_of("error")
    };
    if !content_type.starts_with("application/json") || !has_error {
        return (
            Some(status),
            Some(format!(
                "{status} without a JSON error body ({content_type:?}): {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
        );
    }
    (Some(status), None)
}

/// Sends `GET <target>` over a raw connection and returns the status line.
async fn raw_request(address: &str, target: &str, key: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    // The server may answer and close before it read everything.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

fn panics_total(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with("sessions_api_panics_total "))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_get_4xx_json_errors_and_never_a_5xx_or_a_panic() {
    // Install this process's recorder before the router registers its counters.
    shared::telemetry::prometheus();
    let app = Arc::new(TestApp::spawn().await);
    let created = app.create_session("hostile").await;
    let token = created["publicAccessToken"]
        .as_str()
        .expect("token")
        .to_owned();

    let document: Value = serde_json::from_str(api::routes::OPENAPI_DOCUMENT).expect("document");
    let mut operations = Vec::new();
    for (template, _) in api::routes::route_table() {
        let methods = document["paths"][template]
            .as_object()
            .unwrap_or_else(|| panic!("{template} is not documented"));
        for method in methods.keys() {
            operations.push((template, method.clone()));
        }
    }
    assert!(
        operations.len() >= 20,
        "every route and method: {operations:?}"
    );

    // A fresh connection per request: a refused oversized request closes its connection, and a
    // pooled client could race that close with its next request.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut sent = 0;
    for (credential_label, credential) in [
        ("secret key", app.secret_key.clone()),
        ("session token", token),
    ] {
        for (template, method) in &operations {
            let cases = cases(template, method);
            // A few at a time: enough to be quick, not so many that 12 MB bodies pile up.
            for chunk in cases.chunks(8) {
                let mut running = tokio::task::JoinSet::new();
                for case in chunk.iter().cloned() {
                    let (app, client, credential, template) =
                        (app.clone(), client.clone(), credential.clone(), *template);
                    running.spawn(async move {
                        let mut request = client
                            .request(
                                case.method.clone(),
                                format!("{}{}", app.address, case.target),
                            )
                            .bearer_auth(&credential)
                            .timeout(std::time::Duration::from_secs(30));
                        for (name, value) in &case.headers {
                            request = request.header(name.as_str(), value.as_str());
                        }
                        if let Some(body) = &case.body {
                            request = request.body(body.clone());
                        }
                        let verdict = judge(&case, template, request.send().await).await;
                        (case, verdict)
                    });
                }
                while let Some(result) = running.join_next().await {
                    let (case, (status, problem)) = result.expect("request task");
                    sent += 1;
                    if let Some(status) = status {
                        *statuses.entry(status).or_default() += 1;
                    }
                    if let Some(problem) = problem {
                        let shown: String = case.target.chars().take(100).collect();
                        let problem: String = problem.chars().take(300).collect();
                        problems.push(format!(
                            "{credential_label}: {} {template} [{}] {shown}: {problem}",
                            case.method, case.label
                        ));
                    }
                }
            }
        }
    }
    // A 100 KB id makes a URI over 64 KiB: the HTTP layer answers 414 itself (no client library
    // sends one, so it goes over a raw connection).
    let long_uri = format!("/api/v1/sessions/{}", "x".repeat(100_000));
    let status_line = raw_request(&app.address, &long_uri, &app.secret_key).await;
    assert!(status_line.starts_with("HTTP/1.1 414"), "{status_line}");
    *statuses.entry(414).or_default() += 1;
    sent += 1;
    println!(
        "{sent} hostile requests over {} operations; statuses {statuses:?}",
        operations.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        statuses.keys().any(|status| *status == 400),
        "the corpus reached validation"
    );

    let metrics = app.metrics_text().await;
    assert_eq!(
        panics_total(&metrics),
        Some(0.0),
        "sessions_api_panics_total is exported and 0"
    );

    // Nothing hostile broke the environment: a plain append and read still work.
    let appended = app.append("hostile-after", "in", "x", None).await;
    assert!(appended.status() == 404 || appended.status() == 200);
    app.create_session("hostile-after").await;
    assert_eq!(
        app.append("hostile-after", "in", "still fine", Some("ok"))
            .await
            .status(),
        200
    );
    let records = app
        .wait_for_records("hostile-after", "in", 1, std::time::Duration::from_secs(30))
        .await;
    assert_eq!(
        records.last().map(|record| record.data.as_str()),
        Some("still fine")
    );
    let app = Arc::into_inner(app).expect("sole owner");
    app.cleanup().await;
}
