//! The api's session cache on the append route: a close made through one api instance reaches
//! another instance's cache through the workers' notice, and no append answered 2xx is dropped,
//! even one accepted while the other instance still believed the session open.

use std::time::{Duration, Instant};

use tests::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_through_one_api_instance_reaches_the_others_and_no_answered_append_is_lost() {
    // A long TTL: only the notice can make the second instance forget the session.
    let app = TestApp::spawn_with(tests::SpawnOptions {
        overrides: &[("SESSIONS_SESSION_CACHE_TTL_MS", "60000")],
        ..tests::SpawnOptions::default()
    })
    .await;
    let second = api::Application::build(app.settings.clone())
        .await
        .expect("second api builds");
    let second_url = format!("http://{}", second.local_addr());
    let stop_second = shared::shutdown::CancellationToken::new();
    let second_handle = tokio::spawn(second.run_until_stopped(stop_second.clone()));
    app.create_session("cached").await;
    let append_to_second = |body: String| {
        let request = app
            .client
            .post(format!(
                "{second_url}/realtime/v1/sessions/cached/in/append"
            ))
            .bearer_auth(&app.secret_key)
            .header("X-Part-Id", format!("p{body}"))
            .body(body);
        async move { request.send().await.expect("append").status().as_u16() }
    };
    // The second instance caches the session.
    assert_eq!(append_to_second("0".into()).await, 200);

    // Close through the first instance (it waits for the worker).
    let closed = app
        .client
        .post(app.url("/api/v1/sessions/cached/close"))
        .bearer_auth(&app.secret_key)
        .json(&serde_json::json!({ "reason": "done" }))
        .send()
        .await
        .expect("close");
    assert_eq!(closed.status(), 200);

    // The second instance refuses appends once the notice arrived (well before its 60 s TTL);
    // whatever it answered 200 meanwhile must be written.
    let started = Instant::now();
    let mut answered = vec!["0".to_owned()];
    let mut refused = false;
    for n in 1..500 {
        match append_to_second(n.to_string()).await {
            200 => answered.push(n.to_string()),
            409 => {
                refused = true;
                break;
            }
            other => panic!("append {n} answered {other}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "the second instance still accepts appends to the closed session after {:?}",
        started.elapsed()
    );
    println!(
        "the second instance refused appends {:?} after the close; {} answered 200 in between",
        started.elapsed(),
        answered.len() - 1
    );
    let records = app
        .wait_for_records("cached", "in", answered.len() + 1, Duration::from_secs(30))
        .await;
    // The close message sits among them (after every append accepted before the close); the
    // appends answered 200 are all written, once, in order.
    let bodies: Vec<String> = records
        .iter()
        .filter(|record| !tests::checker::is_close_message(&record.data))
        .map(|record| record.data.clone())
        .collect();
    assert_eq!(
        bodies, answered,
        "every append answered 200 is written, once, in order"
    );
    assert_eq!(records.len(), answered.len() + 1, "one close message");

    stop_second.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), second_handle).await;
    app.cleanup().await;
}
