//! Rate limits per environment (`SESSIONS_RATE_LIMIT_PER_SECOND`, `SESSIONS_RATE_LIMIT_BURST`):
//! an environment that floods gets 429 with `Retry-After` while its neighbour is served; a 429'd
//! append leaves no record; secret keys and public tokens count toward the same environment;
//! failed authentications count toward none; the embedded server limits the same way.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{SpawnOptions, TestApp};

const RATE: u32 = 40;
const BURST: u32 = 40;
const FLOOD_FOR: Duration = Duration::from_secs(4);

/// One answered request: status, `Retry-After` (if any), body.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        retry_after,
        body,
    }
}

/// A 429 carries `Retry-After` in whole seconds (≥ 1) and a JSON error body.
fn assert_well_formed_429(answer: &Answer) {
    assert_eq!(answer.status, 429);
    let seconds: u64 = answer
        .retry_after
        .as_deref()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "429 without a whole-seconds Retry-After: {:?}",
                answer.retry_after
            )
        });
    assert!(seconds >= 1, "Retry-After {seconds}");
    assert!(
        answer.body["error"]
            .as_str()
            .is_some_and(|text| !text.is_empty()),
        "429 body {}",
        answer.body
    );
}

/// Sends `request(n)` every `1 / per_second` for `duration`, each on its own task (so a slow
/// answer does not slow the pace); returns `(n, answer)` for every request.
async fn paced<F, Fut>(per_second: u32, duration: Duration, request: F) -> Vec<(u32, Answer)>
where
    F: Fn(u32) -> Fut,
    Fut: std::future::Future<Output = Answer> + Send + 'static,
{
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / per_second);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < duration {
        ticks.tick().await;
        let sent = request(n);
        tasks.spawn(async move { (n, sent.await) });
        n += 1;
    }
    let mut answers = Vec::new();
    while let Some(result) = tasks.join_next().await {
        answers.push(result.expect("request task"));
    }
    answers.sort_by_key(|(n, _)| *n);
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_environment_is_limited_and_its_neighbour_is_not() {
    let (rate, burst) = (RATE.to_string(), BURST.to_string());
    let app = Arc::new(
        TestApp::spawn_with(SpawnOptions {
            overrides: &[
                ("SESSIONS_RATE_LIMIT_PER_SECOND", &rate),
                ("SESSIONS_RATE_LIMIT_BURST", &burst),
            ],
            ..SpawnOptions::default()
        })
        .await,
    );
    app.create_session("flood").await;
    let neighbour_key = Arc::new(app.create_environment("neighbour").await);
    let created = app
        .create_session_with(
            &neighbour_key,
            json!({
                "type": "chat.agent",
                "externalId": "calm",
                "taskIdentifier": "agent",
                "triggerConfig": { "basePayload": {} },
            }),
        )
        .await;
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.expect("json");
    let neighbour_token = Arc::new(
        created["publicAccessToken"]
            .as_str()
            .expect("token")
            .to_owned(),
    );

    // The flood: appends at twice the rate; the neighbour: half its rate, half of it with the
    // session's public token.
    let flood = {
        let app = app.clone();
        paced(2 * RATE, FLOOD_FOR, move |n| {
            let app = app.clone();
            async move {
                answer(
                    app.append("flood", "in", &format!("flood {n}"), Some(&format!("f{n}")))
                        .await,
                )
                .await
            }
        })
    };
    let neighbour = {
        let app = app.clone();
        paced(RATE / 2, FLOOD_FOR, move |n| {
            let (app, key, token) = (app.clone(), neighbour_key.clone(), neighbour_token.clone());
            async move {
                if n % 2 == 0 {
                    answer(
                        app.append_as(
                            &key,
                            "calm",
                            "in",
                            &format!("calm {n}"),
                            Some(&format!("c{n}")),
                        )
                        .await,
                    )
                    .await
                } else {
                    answer(
                        app.client
                            .get(app.url("/realtime/v1/sessions/calm/out/records"))
                            .bearer_auth(token.as_str())
                            .send()
                            .await
                            .expect("records request"),
                    )
                    .await
                }
            }
        })
    };
    let started = Instant::now();
    let (flood, neighbour) = tokio::join!(flood, neighbour);
    let elapsed = started.elapsed();

    let accepted: BTreeSet<String> = flood
        .iter()
        .filter(|(_, answer)| answer.status == 200)
        .map(|(n, _)| format!("f{n}"))
        .collect();
    let limited: Vec<&Answer> = flood
        .iter()
        .map(|(_, answer)| answer)
        .filter(|answer| answer.status == 429)
        .collect();
    let neighbour_ok = neighbour
        .iter()
        .filter(|(_, answer)| (200..300).contains(&answer.status))
        .count();
    let neighbour_rate = neighbour_ok as f64 / neighbour.len() as f64;
    println!(
        "rate limit {RATE}/s, burst {BURST}; flood: {} requests in {elapsed:.1?}, {} 2xx, {} 429; \
         neighbour: {} requests, {} 2xx, success rate {:.2}%",
        flood.len(),
        accepted.len(),
        limited.len(),
        neighbour.len(),
        neighbour_ok,
        neighbour_rate * 100.0
    );

    assert_eq!(
        accepted.len() + limited.len(),
        flood.len(),
        "every flood request is either accepted or limited: {:?}",
        flood
            .iter()
            .filter(|(_, a)| a.status != 200 && a.status != 429)
            .map(|(n, a)| (n, a.status, a.body.clone()))
            .collect::<Vec<_>>()
    );
    assert!(!limited.is_empty(), "twice the rate is limited");
    assert!(!accepted.is_empty(), "the flood is not shut out entirely");
    for answer in &limited {
        assert_well_formed_429(answer);
    }
    // GCRA: no more than the burst plus the rate over the time the flood lasted.
    let ceiling = f64::from(BURST) + f64::from(RATE) * (elapsed.as_secs_f64() + 1.0);
    assert!(
        (accepted.len() as f64) <= ceiling,
        "{} accepted, more than {ceiling}",
        accepted.len()
    );
    assert!(
        neighbour_rate >= 0.99,
        "the neighbour's success rate is {neighbour_rate}: {:?}",
        neighbour
            .iter()
            .filter(|(_, a)| !(200..300).contains(&a.status))
            .map(|(n, a)| (n, a.status))
            .collect::<Vec<_>>()
    );

    // A 429'd append left nothing: the records are exactly the accepted appends.
    tokio::time::sleep(Duration::from_secs(2)).await; // the flood's bucket refills
    let records = app
        .wait_for_records("flood", "in", accepted.len(), Duration::from_secs(30))
        .await;
    let stored: BTreeSet<String> = records.iter().map(|record| record.id.clone()).collect();
    assert_eq!(records.len(), accepted.len(), "one record per 2xx append");
    assert_eq!(
        stored, accepted,
        "the stored part ids are the accepted ones"
    );

    let app = Arc::into_inner(app).expect("no other owner");
    app.cleanup().await;
}

#[tokio::test]
async fn keys_and_tokens_share_the_environments_bucket_and_bad_credentials_count_nowhere() {
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[
            ("SESSIONS_RATE_LIMIT_PER_SECOND", "1"),
            ("SESSIONS_RATE_LIMIT_BURST", "5"),
        ],
        ..SpawnOptions::default()
    })
    .await;
    let created = app.create_session("shared-bucket").await;
    let token = created["publicAccessToken"].as_str().expect("token");
    let records = app.url("/realtime/v1/sessions/shared-bucket/out/records");

    // Failed authentications first: they must not spend the environment's budget.
    for _ in 0..20 {
        let refused = app
            .client
            .get(&records)
            .bearer_auth("tr_sk_not_a_real_key")
            .send()
            .await
            .expect("request");
        assert_eq!(refused.status(), 401);
        let anonymous = app.client.get(&records).send().await.expect("request");
        assert_eq!(anonymous.status(), 401);
    }

    // Empty the bucket with the secret key, then use the session's public token at once: the
    // same environment, so limited too, on reads and appends. (Retried should the bucket refill
    // in between on a stalled machine.)
    let mut appended = BTreeSet::new();
    let mut limited_append = None;
    for attempt in 0..5 {
        let mut spent = 0;
        loop {
            let answered = answer(
                app.client
                    .get(&records)
                    .bearer_auth(&app.secret_key)
                    .send()
                    .await
                    .expect("request"),
            )
            .await;
            if answered.status == 429 {
                assert_well_formed_429(&answered);
                break;
            }
            assert_eq!(answered.status, 200);
            spent += 1;
            assert!(spent < 100, "a burst of 5 at 1/s runs out");
        }
        println!("attempt {attempt}: bucket emptied after {spent} requests with the secret key");
        let by_token = answer(
            app.client
                .get(&records)
                .bearer_auth(token)
                .send()
                .await
                .expect("request"),
        )
        .await;
        let part = format!("p{attempt}");
        let append = answer(
            app.append_as(token, "shared-bucket", "in", "x", Some(&part))
                .await,
        )
        .await;
        if append.status == 200 {
            appended.insert(part);
        }
        if by_token.status == 429 && append.status == 429 {
            assert_well_formed_429(&by_token);
            assert_well_formed_429(&append);
            limited_append = Some(append);
            break;
        }
    }
    let append = limited_append.expect("the public token was limited with the secret key's bucket");
    // A bad credential is still 401 (authentication comes first), and health stays public.
    let refused = app
        .client
        .get(&records)
        .bearer_auth("tr_sk_not_a_real_key")
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 401);
    let health = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    // Another environment is unaffected.
    let other = app.create_environment("other").await;
    let listed = app
        .client
        .get(app.url("/api/v1/sessions"))
        .bearer_auth(&other)
        .send()
        .await
        .expect("request");
    assert_eq!(listed.status(), 200);

    // After Retry-After the environment is served again, and the 429'd append wrote nothing.
    let wait: u64 = append
        .retry_after
        .as_deref()
        .and_then(|value| value.parse().ok())
        .expect("Retry-After");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let records = app
        .wait_for_records(
            "shared-bucket",
            "in",
            appended.len(),
            Duration::from_secs(30),
        )
        .await;
    let stored: BTreeSet<String> = records.iter().map(|record| record.id.clone()).collect();
    assert_eq!(stored, appended, "limited appends left no record");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_server_limits_the_same_way() {
    let dir = std::env::temp_dir().join(format!("sessions-rate-{}", tests::unique_name()));
    let settings = tests::test_settings(
        &tests::unique_name(),
        &[
            ("SESSIONS_RATE_LIMIT_PER_SECOND", "1"),
            ("SESSIONS_RATE_LIMIT_BURST", "3"),
        ],
    );
    let embedded = api::embedded::Embedded::build(settings, &dir)
        .await
        .expect("embedded server builds");
    let url = format!("http://{}/api/v1/sessions", embedded.local_addr());
    let key = embedded.secret_key().to_owned();
    let stop = shared::shutdown::CancellationToken::new();
    let server = tokio::spawn(embedded.run_until_stopped(stop.clone()));
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(
            answer(
                client
                    .get(&url)
                    .bearer_auth(&key)
                    .send()
                    .await
                    .expect("list"),
            )
            .await,
        );
    }
    let statuses: Vec<u16> = answers.iter().map(|answer| answer.status).collect();
    println!("embedded, 1/s with a burst of 3: {statuses:?}");
    assert_eq!(&statuses[..3], &[200, 200, 200], "the burst is served");
    let limited = answers
        .iter()
        .find(|answer| answer.status == 429)
        .unwrap_or_else(|| panic!("beyond the burst: {statuses:?}"));
    assert_well_formed_429(limited);
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let _ = std::fs::remove_dir_all(&dir);
}
