//! Issue #10 without the cluster: `AMQP_URL` lists two addresses of one broker, each behind a
//! proxy of the harness's own ([`tests::proxy::TcpProxy`]), and the address the api and the
//! worker use vanishes silently under load (no RST, no FIN, no byte: a power cut or a network
//! partition, which `stop_app` and `kill -9` in `broker_cluster.rs` do not show, since there the
//! kernel or the node tells the peers at once).
//!
//! What has to notice it: the api's publisher confirm timeout (`SESSIONS_CONFIRM_TIMEOUT_MS`,
//! then the publish is sent once more on a new connection, to the next address) and the AMQP
//! heartbeat (`heartbeat=2` here: lapin closes a connection that received nothing for twice the
//! interval, and the worker's connection check moves on). The checker judges the whole history:
//! lost 0 (no 2xx for a command that was not confirmed), duplicated 0, reordered 0; appends
//! accepted after the vanish are in the database, so the worker reconnected too.

use std::time::{Duration, Instant};

use tests::load::{Plan, Run, accepted_since, assert_clean, join_all, pause_after};
use tests::proxy::TcpProxy;
use tests::{ChildWorker, SpawnOptions, TestApp, worker_settings};

const SESSIONS: usize = 8;
/// The load runs by time: appends per session are only a ceiling.
const APPENDS_CEILING: usize = 100_000;
const LOAD_BEFORE: Duration = Duration::from_secs(2);
const LOAD_AFTER_VANISH: Duration = Duration::from_secs(12);
/// Longest acceptable wait of one channel between two accepted appends (the test fails beyond):
/// a confirm timeout (5 s) plus a reconnect, with room for a loaded machine.
const PAUSE_LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_vanished_broker_address_is_left_for_the_next_one_under_load() {
    let broker = "127.0.0.1:5672".parse().expect("address");
    let first = TcpProxy::start(broker).await;
    let second = TcpProxy::start(broker).await;
    let url = |proxy: &TcpProxy| format!("amqp://guest:guest@{}/%2f?heartbeat=2", proxy.address);
    let urls = format!("{},{}", url(&first), url(&second));
    // Both processes start on `first`: `second` refuses connections until the vanish.
    second.disable();
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("AMQP_URL", urls.as_str())],
        without_worker: true,
        ..SpawnOptions::default()
    })
    .await;
    let worker = ChildWorker::spawn(&worker_settings(&app.settings, 0, 1));
    let run = Run::new(app, &[], SESSIONS, Plan::new(APPENDS_CEILING)).await;
    let producers = run.start();
    tokio::time::sleep(LOAD_BEFORE).await;
    let accepted_before = accepted_since(&run.history, None);
    assert!(accepted_before > 0, "the load runs before the vanish");
    let on_first = first.open_connections();
    assert!(
        on_first >= 2,
        "the api and the worker are connected through the first address ({on_first} connections)"
    );
    second.enable();
    let vanished_at = Instant::now();
    first.black_hole();
    tokio::time::sleep(LOAD_AFTER_VANISH).await;
    run.stop_producers();
    join_all(producers).await;
    let pause = pause_after(&run.history, vanished_at, Instant::now());
    let accepted_after_vanish = accepted_since(&run.history, Some(vanished_at));
    let on_second = second.open_connections();
    let report = run
        .finish(
            "broker_address_vanished",
            None,
            &format!(
                "pause_ms={} slowest_channel_pause_ms={} answered_503={} indeterminate={} \
                 accepted_after_vanish={accepted_after_vanish} connections_on_second={on_second}",
                pause.longest.as_millis(),
                pause.longest_per_channel.as_millis(),
                pause.answered_503,
                pause.indeterminate,
            ),
        )
        .await;
    assert_clean(&report);
    assert!(
        accepted_after_vanish > 0,
        "appends are accepted again through the second address"
    );
    assert!(
        on_second >= 2,
        "the api and the worker moved to the second address ({on_second} connections)"
    );
    assert!(
        pause.longest_per_channel < PAUSE_LIMIT,
        "a channel's appends paused for {:?} (limit {PAUSE_LIMIT:?})",
        pause.longest_per_channel
    );
    worker.kill_9().await;
    run.cleanup().await;
}
