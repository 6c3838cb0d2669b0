//! Operations surface of the worker process: health, readiness naming the failing dependency,
//! and Prometheus metrics.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{ChildWorker, TestApp};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

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
