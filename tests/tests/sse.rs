//! The SSE tail against the real pipeline: framing, resume, deadline, push delivery to
//! many readers and across api instances.

use std::sync::Arc;
use std::time::Duration;

use tests::TestApp;
use tests::sse::{SseReader, StreamedRecord};

const WAIT: Duration = Duration::from_secs(30);

fn bodies(records: &[StreamedRecord]) -> Vec<&str> {
    records.iter().map(|record| record.data.as_str()).collect()
}

#[tokio::test]
async fn history_then_live_records_arrive_in_order_with_the_v2_framing() {
    let app = TestApp::spawn().await;
    app.create_session("live").await;
    for n in 0..3 {
        assert_eq!(
            app.append(
                "live",
                "out",
                &format!("before-{n}"),
                Some(&format!("b{n}"))
            )
            .await
            .status(),
            200
        );
    }
    app.wait_for_records("live", "out", 3, WAIT).await;
    let response = app.subscribe("live", "out", &[]).await;
    assert_eq!(response.status(), 200);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("x-stream-version").as_deref(), Some("v2"));
    assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(
        header("access-control-allow-origin").as_deref(),
        Some("*"),
        "browsers may read it"
    );
    let mut reader = SseReader::new(response);
    let history = reader.records(3, WAIT).await;
    assert_eq!(bodies(&history), ["before-0", "before-1", "before-2"]);
    for n in 0..3 {
        assert_eq!(
            app.append("live", "out", &format!("after-{n}"), None)
                .await
                .status(),
            200
        );
    }
    let live = reader.records(3, WAIT).await;
    assert_eq!(bodies(&live), ["after-0", "after-1", "after-2"]);
    let all: Vec<StreamedRecord> = history.into_iter().chain(live).collect();
    let seqs: Vec<i64> = all.iter().map(|record| record.seq_num).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4, 5]);
    assert_eq!(all[0].part_id, "b0");
    assert_eq!(all[3].part_id, "");
    assert!(
        all.iter()
            .all(|record| record.timestamp > 1_700_000_000_000)
    );
    // The SSE view equals the records route.
    let listed = app.records("live", "out").await;
    assert_eq!(listed.len(), all.len());
    for (streamed, listed) in all.iter().zip(&listed) {
        assert_eq!(
            (streamed.seq_num, streamed.data.as_str()),
            (listed.seq_num, listed.data.as_str())
        );
    }
    drop(reader);
    app.cleanup().await;
}

#[tokio::test]
async fn last_event_id_resumes_after_it_and_a_dropped_reader_misses_nothing() {
    let app = TestApp::spawn().await;
    app.create_session("resume").await;
    for n in 0..5 {
        app.append("resume", "in", &format!("r{n}"), None).await;
    }
    app.wait_for_records("resume", "in", 5, WAIT).await;
    let mut reader = SseReader::new(
        app.subscribe("resume", "in", &[("Last-Event-ID", "2")])
            .await,
    );
    let first = reader.records(2, WAIT).await;
    assert_eq!(bodies(&first), ["r3", "r4"]);
    // Disconnect, append while away, come back with the last id seen.
    drop(reader);
    for n in 5..8 {
        app.append("resume", "in", &format!("r{n}"), None).await;
    }
    let last = first
        .last()
        .map(|record| record.seq_num.to_string())
        .unwrap_or_default();
    let mut reader = SseReader::new(
        app.subscribe("resume", "in", &[("Last-Event-ID", &last)])
            .await,
    );
    let rest = reader.records(3, WAIT).await;
    assert_eq!(bodies(&rest), ["r5", "r6", "r7"]);
    assert!(
        reader.next_event(Duration::from_millis(500)).await.is_err(),
        "no duplicates follow"
    );
    drop(reader);
    app.cleanup().await;
}

#[tokio::test]
async fn the_deadline_ends_the_stream_cleanly_and_bad_headers_are_refused() {
    let app = TestApp::spawn().await;
    app.create_session("deadline").await;
    let started = std::time::Instant::now();
    let mut reader = SseReader::new(
        app.subscribe("deadline", "in", &[("Timeout-Seconds", "1")])
            .await,
    );
    let end = reader.next_event(Duration::from_secs(10)).await;
    assert_eq!(end, Ok(None), "the body ends at the deadline");
    assert!(started.elapsed() >= Duration::from_millis(900));
    for bad in ["0", "601", "soon"] {
        let response = app
            .subscribe("deadline", "in", &[("Timeout-Seconds", bad)])
            .await;
        assert_eq!(response.status(), 400, "Timeout-Seconds {bad}");
    }
    assert_eq!(
        app.subscribe("deadline", "in", &[("Last-Event-ID", "x")])
            .await
            .status(),
        400
    );
    assert_eq!(
        app.subscribe("session_unknown", "in", &[]).await.status(),
        404
    );
    assert_eq!(
        app.subscribe("deadline", "sideways", &[]).await.status(),
        400
    );
    let head = app
        .client
        .head(app.url("/realtime/v1/sessions/deadline/in"))
        .bearer_auth(&app.secret_key)
        .send()
        .await
        .expect("head");
    assert_eq!(head.status(), 200);
    let unauthenticated = app
        .client
        .get(app.url("/realtime/v1/sessions/deadline/in"))
        .send()
        .await
        .expect("get");
    assert_eq!(unauthenticated.status(), 401);
    app.cleanup().await;
}

#[tokio::test]
async fn a_reader_can_wait_on_an_external_id_before_the_session_exists() {
    let app = TestApp::spawn().await;
    let mut reader = SseReader::new(app.subscribe("not-yet", "out", &[]).await);
    app.create_session("not-yet").await;
    app.append("not-yet", "out", "first", None).await;
    let records = reader.records(1, WAIT).await;
    assert_eq!(bodies(&records), ["first"]);
    drop(reader);
    app.cleanup().await;
}

#[tokio::test]
async fn a_reader_on_another_api_instance_sees_the_records() {
    let app = TestApp::spawn().await;
    app.create_session("two-apis").await;
    let second = api::Application::build(app.settings.clone())
        .await
        .expect("second api");
    let second_address = format!("http://{}", second.local_addr());
    let stop = shared::shutdown::CancellationToken::new();
    let serving = tokio::spawn(second.run_until_stopped(stop.clone()));
    let mut reader = SseReader::new(
        app.subscribe_at(&second_address, "two-apis", "in", &[])
            .await,
    );
    for n in 0..3 {
        app.append("two-apis", "in", &format!("via-first-{n}"), None)
            .await;
    }
    let records = reader.records(3, WAIT).await;
    assert_eq!(
        bodies(&records),
        ["via-first-0", "via-first-1", "via-first-2"]
    );
    drop(reader);
    stop.cancel();
    let _ = serving.await;
    app.cleanup().await;
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| {
                    line.split_whitespace()
                        .nth(1)
                        .and_then(|kib| kib.parse().ok())
                })
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_readers_on_ten_channels_each_get_every_record_once_in_order() {
    let app = Arc::new(TestApp::spawn().await);
    let channels = 10;
    let readers_per_channel = 100;
    let records_per_channel = 30;
    for c in 0..channels {
        app.create_session(&format!("fan-{c}")).await;
    }
    let rss_before = peak_rss_kib();
    let mut readers = tokio::task::JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(channels * readers_per_channel);
    for c in 0..channels {
        for _ in 0..readers_per_channel {
            let app = app.clone();
            let ready = ready_tx.clone();
            readers.spawn(async move {
                let response = app
                    .subscribe(&format!("fan-{c}"), "out", &[("Timeout-Seconds", "120")])
                    .await;
                assert_eq!(response.status(), 200);
                let _ = ready.send(()).await;
                let mut reader = SseReader::new(response);
                let records = reader
                    .records(records_per_channel, Duration::from_secs(90))
                    .await;
                (c, records)
            });
        }
    }
    drop(ready_tx);
    for _ in 0..channels * readers_per_channel {
        ready_rx.recv().await.expect("reader connected");
    }
    // Appends run while the readers are connected.
    let mut producers = tokio::task::JoinSet::new();
    for c in 0..channels {
        let app = app.clone();
        producers.spawn(async move {
            for n in 0..records_per_channel {
                let status = app
                    .append(
                        &format!("fan-{c}"),
                        "out",
                        &format!("c{c}-n{n}"),
                        Some(&format!("p{n}")),
                    )
                    .await
                    .status();
                assert_eq!(status, 200);
            }
        });
    }
    while let Some(result) = producers.join_next().await {
        result.expect("producer");
    }
    let mut checked = 0;
    while let Some(result) = readers.join_next().await {
        let (c, records) = result.expect("reader");
        let expected: Vec<String> = (0..records_per_channel)
            .map(|n| format!("c{c}-n{n}"))
            .collect();
        assert_eq!(
            bodies(&records),
            expected,
            "channel {c}: every record once, in order"
        );
        let seqs: Vec<i64> = records.iter().map(|record| record.seq_num).collect();
        assert_eq!(seqs, (0..records_per_channel as i64).collect::<Vec<_>>());
        checked += 1;
    }
    assert_eq!(checked, channels * readers_per_channel);
    println!(
        "1000 readers: peak RSS of the test process (api + worker + readers) {} MiB (before readers: {} MiB)",
        peak_rss_kib() / 1024,
        rss_before / 1024
    );
    let app = Arc::into_inner(app).expect("readers done");
    app.cleanup().await;
}
