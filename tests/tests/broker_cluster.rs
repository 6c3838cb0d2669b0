//! Issue #10: the service on a three-node RabbitMQ cluster (`deploy/rabbitmq-cluster.sh`, brought
//! up by each test if needed) loses a node under load and loses nothing.
//!
//! Each test runs the api (in process) and workers (child processes) with `AMQP_URL` listing
//! the three nodes, drives sequential producers per session with `X-Part-Id` retries
//! ([`tests::load`]), takes one node away in the middle, brings it back, runs a second load
//! phase, and judges the whole history with the checker: lost 0, duplicated 0, reordered 0
//! (lost 0 is "every 2xx append is in the database": no 2xx for a command that was not
//! confirmed). Each prints the pause it measured (the longest time without an accepted append),
//! the 503s and the retries, and saves the line under `target/tmp/reliability/`.
//!
//! The tests hold a machine-wide lock ([`tests::cluster::ClusterLock`]): only one of them takes a
//! node down at a time. They leave the cluster running; `deploy/rabbitmq-cluster.sh stop` stops
//! it. The default broker on 5672 is not used here.

use std::time::{Duration, Instant};

use tests::cluster::{self, ClusterLock};
use tests::load::{Plan, Run, accepted_since, assert_clean, join_all, pause_after};
use tests::{ChildWorker, SpawnOptions, TestApp, worker_settings};

/// Sessions of a run (one sequential producer each).
const SESSIONS: usize = 16;
/// The load runs by time, not by count (so that the loss hits it in the middle on any machine):
/// appends per session are only a ceiling.
const APPENDS_CEILING: usize = 100_000;
/// Load before the loss, while the node is away, and after it rejoined.
const LOAD_BEFORE: Duration = Duration::from_secs(3);
const LOAD_WHILE_AWAY: Duration = Duration::from_secs(15);
const LOAD_AFTER: Duration = Duration::from_secs(5);

/// Longest acceptable pause of accepted appends when a node goes away (the test fails beyond).
const PAUSE_LIMIT: Duration = Duration::from_secs(30);

/// How a node is taken away.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// `rabbitmqctl stop_app`: the node closes its connections and tells its peers.
    StopApp,
    /// `kill -9` of the node's VM: nobody is told; sockets are reset by the kernel.
    Kill9,
}

impl Loss {
    async fn inflict(self, node: &str) {
        match self {
            Loss::StopApp => cluster::stop_app(node).await,
            Loss::Kill9 => cluster::kill_9(node).await,
        }
    }
}

/// The api and `workers` child workers on the cluster, with fresh sessions.
async fn deployment(workers: u16) -> (Run, Vec<ChildWorker>) {
    let urls = cluster::urls();
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("AMQP_URL", urls.as_str())],
        without_worker: true,
        ..SpawnOptions::default()
    })
    .await;
    let children = (0..workers)
        .map(|index| ChildWorker::spawn(&worker_settings(&app.settings, index, workers)))
        .collect();
    let run = Run::new(app, &[], SESSIONS, Plan::new(APPENDS_CEILING)).await;
    (run, children)
}

/// The node leading the most of this deployment's partition queues, asked on any node.
async fn busiest_leader(prefix: &str) -> (String, usize) {
    let leaders = cluster::leaders("a", prefix).await;
    println!("partition leaders before the loss: {leaders:?}");
    leaders
        .into_iter()
        .map(|(node, queues)| (node, queues.len()))
        .max_by_key(|(_, count)| *count)
        .expect("partition queues have leaders")
}

/// `a:3 b:3 c:2`: queues led per node.
fn leader_counts(leaders: &std::collections::BTreeMap<String, Vec<String>>) -> String {
    leaders
        .iter()
        .map(|(node, queues)| format!("{node}:{}", queues.len()))
        .collect::<Vec<_>>()
        .join(",")
}

/// A node other than `node`, to ask questions while `node` is away.
fn another(node: &str) -> &'static str {
    cluster::NODES
        .into_iter()
        .find(|other| *other != node)
        .expect("three nodes")
}

/// The scenario of the first test: under load, take away the node that leads the most
/// partitions; appends keep being accepted after a short pause; the node rejoins; a second
/// load phase runs; the checker is clean.
async fn lose_the_busiest_leader(loss: Loss, scenario: &str) {
    let _lock = ClusterLock::acquire().await;
    let (mut run, workers) = deployment(2).await;
    // Leaders move only when a node goes away: ask before the load, so that the loss comes
    // right on time.
    let (node, led) = busiest_leader(&run.app.name).await;
    let producers = run.start();
    tokio::time::sleep(LOAD_BEFORE).await;
    let lost_at = Instant::now();
    loss.inflict(&node).await;
    println!("{scenario}: {loss:?} {node} (leader of {led} partition queues)");
    tokio::time::sleep(LOAD_WHILE_AWAY.saturating_sub(lost_at.elapsed())).await;
    run.stop_producers();
    join_all(producers).await;
    let phase_one_done = Instant::now();
    let pause = pause_after(&run.history, lost_at, phase_one_done);
    let accepted_while_away = accepted_since(&run.history, Some(lost_at));
    let rejoin = cluster::bring_back(&node, another(&node)).await;
    let rejoined_at = Instant::now();
    // A node that comes back leads nothing until the operator rebalances (README).
    let leaders_after = cluster::leaders("a", &run.app.name).await;
    cluster::rebalance("a").await;
    let leaders_rebalanced = cluster::leaders("a", &run.app.name).await;
    run.plan = run.plan.then(APPENDS_CEILING);
    let producers = run.start();
    tokio::time::sleep(LOAD_AFTER).await;
    run.stop_producers();
    join_all(producers).await;
    let accepted_after_rejoin = accepted_since(&run.history, Some(rejoined_at));
    let report = run
        .finish(
            scenario,
            None,
            &format!(
                "lost_node={node} led={led} pause_ms={} slowest_channel_pause_ms={} \
                 answered_503={} indeterminate={} accepted_while_away={accepted_while_away} \
                 rejoin_ms={} accepted_after_rejoin={accepted_after_rejoin} \
                 leaders_after_rejoin={} leaders_after_rebalance={}",
                pause.longest.as_millis(),
                pause.longest_per_channel.as_millis(),
                pause.answered_503,
                pause.indeterminate,
                rejoin.as_millis(),
                leader_counts(&leaders_after),
                leader_counts(&leaders_rebalanced),
            ),
        )
        .await;
    assert_clean(&report);
    assert!(
        accepted_while_away > 0,
        "appends were accepted while {node} was away"
    );
    assert!(
        pause.longest_per_channel < PAUSE_LIMIT,
        "a channel's appends paused for {:?} (limit {PAUSE_LIMIT:?})",
        pause.longest_per_channel
    );
    assert!(
        accepted_after_rejoin >= SESSIONS,
        "the load continued after the rejoin ({accepted_after_rejoin} accepted)"
    );
    for worker in workers {
        worker.kill_9().await;
    }
    run.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_app_of_the_busiest_leader_under_load_loses_nothing() {
    lose_the_busiest_leader(Loss::StopApp, "cluster_stop_app").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_busiest_leader_under_load_loses_nothing() {
    lose_the_busiest_leader(Loss::Kill9, "cluster_kill_9").await;
}

/// The worker's Prometheus text, or an empty string while it does not answer.
async fn worker_metrics(client: &reqwest::Client, port: u16) -> String {
    match client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The second test: the node holding the (only) worker's consumer connection goes away
/// under load (`stop_app`); the worker notices, reconnects to another node, re-subscribes every
/// partition and applies the rest in order (checker clean), and counts the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_the_lost_node_reconnects_elsewhere_and_resumes_in_order() {
    let _lock = ClusterLock::acquire().await;
    let urls = cluster::urls();
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("AMQP_URL", urls.as_str())],
        without_worker: true,
        ..SpawnOptions::default()
    })
    .await;
    let port = tests::free_port();
    let mut settings = worker_settings(&app.settings, 0, 1);
    settings.worker_http_addr = format!("127.0.0.1:{port}").parse().expect("address");
    let worker = ChildWorker::spawn(&settings);
    let client = app.client.clone();
    let mut run = Run::new(app, &[], SESSIONS, Plan::new(APPENDS_CEILING)).await;
    let producers = run.start();
    tokio::time::sleep(LOAD_BEFORE).await;
    // The worker connects to a random node of the list: find out which one.
    let consumer_nodes = cluster::nodes_of_connections("a", "-consumer").await;
    assert_eq!(
        consumer_nodes.len(),
        1,
        "one worker consumer connection: {consumer_nodes:?}"
    );
    let node = consumer_nodes[0].clone();
    let reconnects_before = counter(
        &worker_metrics(&client, port).await,
        "sessions_worker_reconnects_total",
    );
    let lost_at = Instant::now();
    cluster::stop_app(&node).await;
    let witness = another(&node);
    let deadline = Instant::now() + Duration::from_secs(60);
    let moved_to = loop {
        let now_on = cluster::nodes_of_connections(witness, "-consumer").await;
        if let [other] = now_on.as_slice()
            && *other != node
        {
            break other.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not reconnect to another node within 60 s (connections on {now_on:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reconnected_after = lost_at.elapsed();
    let reconnects_after = counter(
        &worker_metrics(&client, port).await,
        "sessions_worker_reconnects_total",
    );
    tokio::time::sleep(LOAD_WHILE_AWAY.saturating_sub(lost_at.elapsed())).await;
    run.stop_producers();
    join_all(producers).await;
    let pause = pause_after(&run.history, lost_at, Instant::now());
    cluster::bring_back(&node, witness).await;
    run.plan = run.plan.then(APPENDS_CEILING);
    let producers = run.start();
    tokio::time::sleep(LOAD_AFTER).await;
    run.stop_producers();
    join_all(producers).await;
    let report = run
        .finish(
            "cluster_worker_reconnect",
            None,
            &format!(
                "worker_node={node} moved_to={moved_to} reconnected_ms={} pause_ms={} \
                 slowest_channel_pause_ms={} answered_503={} reconnects={}",
                reconnected_after.as_millis(),
                pause.longest.as_millis(),
                pause.longest_per_channel.as_millis(),
                pause.answered_503,
                reconnects_after - reconnects_before
            ),
        )
        .await;
    assert_clean(&report);
    assert!(
        pause.longest_per_channel < PAUSE_LIMIT,
        "a channel's appends paused for {:?} (limit {PAUSE_LIMIT:?})",
        pause.longest_per_channel
    );
    assert!(
        reconnects_after > reconnects_before,
        "sessions_worker_reconnects_total counted the reconnect"
    );
    worker.kill_9().await;
    run.cleanup().await;
}
