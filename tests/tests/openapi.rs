//! The committed OpenAPI document (`api/openapi.json`, served at `/openapi.json`) and the router
//! describe the same routes: same paths, and every documented method answers while every
//! undocumented one is 405; every authenticated operation documents 429 (rate limits).

use std::collections::BTreeSet;

use serde_json::Value;
use tests::TestApp;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn concrete(path: &str) -> String {
    path.replace("{session}", "probe")
        .replace("{io}", "in")
        .replace("{run}", "run_probe")
        .replace("{waitpoint}", "waitpoint_probe")
}

#[tokio::test]
async fn the_router_and_the_openapi_document_agree() {
    let app = TestApp::spawn().await;
    let served: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let committed: Value = serde_json::from_str(api::routes::OPENAPI_DOCUMENT).expect("valid JSON");
    assert_eq!(
        served, committed,
        "the served document is the committed one"
    );
    assert_eq!(committed["openapi"], "3.1.0");

    let documented: BTreeSet<String> = committed["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    let routed: BTreeSet<String> = api::routes::route_table()
        .into_iter()
        .map(|(path, _)| path.to_owned())
        .collect();
    assert_eq!(
        documented, routed,
        "every routed path is documented and vice versa"
    );

    for (path, operations) in committed["paths"].as_object().expect("paths") {
        let url = app.url(&concrete(path));
        for method in METHODS {
            let response = app
                .client
                .request(method.to_uppercase().parse().expect("method"), &url)
                .send()
                .await
                .expect("probe");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if operations.get(method).is_some() {
                assert_ne!(status, 405, "{method} {path} is documented but not routed");
                assert_ne!(body["error"], "No such route", "{method} {path}");
                let documented_statuses: Vec<&String> = operations[method]["responses"]
                    .as_object()
                    .expect("responses")
                    .keys()
                    .collect();
                assert!(
                    documented_statuses
                        .iter()
                        .any(|code| code.as_str() == status.to_string()),
                    "{method} {path} answered {status}, not among {documented_statuses:?}"
                );
            } else {
                assert_eq!(status, 405, "{method} {path} is routed but not documented");
            }
        }
        // Every operation documents its responses and every error body is the Error schema.
        for (method, operation) in operations.as_object().expect("operations") {
            assert!(
                operation["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty()),
                "{method} {path}"
            );
            // Every authenticated operation (a bearer credential, or a signed URL: those
            // document 401 or 403) can be rate limited: 429 with Retry-After.
            let responses = &operation["responses"];
            let bearer = operation["security"]
                .as_array()
                .is_some_and(|schemes| schemes.iter().any(|scheme| scheme.get("bearer").is_some()));
            if bearer {
                assert!(responses.get("401").is_some(), "{method} {path}: 401");
            }
            if bearer || responses.get("401").is_some() || responses.get("403").is_some() {
                let limited = &responses["429"];
                assert!(
                    limited["headers"]["Retry-After"].is_object(),
                    "{method} {path} documents 429 with Retry-After"
                );
                if method != "head" {
                    // The writer endpoint answers in S2's error shape.
                    let schema = if path.starts_with("/s2/") {
                        "#/components/schemas/WriterError"
                    } else {
                        "#/components/schemas/Error"
                    };
                    assert_eq!(
                        limited["content"]["application/json"]["schema"]["$ref"], schema,
                        "{method} {path}: 429 body"
                    );
                }
            }
        }
    }
    app.cleanup().await;
}
