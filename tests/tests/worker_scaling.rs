//! Three workers with `WORKER_COUNT=3`: home partitions spread evenly, a killed worker's
//! partitions are taken over by the others once its leases expire, a restarted worker takes
//! them back, and per-session order holds with no duplicates throughout.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shared::domain::ids::session_id_for_external_id;
use shared::domain::partition::partition_of;
use tests::{ChildWorker, SpawnOptions, TestApp};

const PARTITIONS: u16 = 12;
const WORKERS: u16 = 3;

use tests::free_port;

/// A worker process with its index and metrics address.
struct IndexedWorker {
    process: ChildWorker,
    metrics_url: String,
}

fn spawn_worker(app: &TestApp, index: u16) -> IndexedWorker {
    let mut settings = app.settings.clone();
    settings.worker_index = index;
    let port = free_port();
    settings.worker_http_addr = format!("127.0.0.1:{port}").parse().expect("address");
    IndexedWorker {
        process: ChildWorker::spawn(&settings),
        metrics_url: format!("http://127.0.0.1:{port}/metrics"),
    }
}

/// `(home active, foreign active, stalled)` from a worker's `/metrics`, or `None` while it does
/// not answer yet.
async fn partition_gauges(app: &TestApp, worker: &IndexedWorker) -> Option<(f64, f64, f64)> {
    let text = app
        .client
        .get(&worker.metrics_url)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let gauge = |name: &str, role: &str| -> f64 {
        let prefix = if role.is_empty() {
            format!("{name} ")
        } else {
            format!("{name}{{role=\"{role}\"}} ")
        };
        text.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Some((
        gauge("sessions_worker_partitions_active", "home"),
        gauge("sessions_worker_partitions_active", "foreign"),
        gauge("sessions_worker_partitions_stalled", ""),
    ))
}

/// One external id per partition.
fn one_session_per_partition(environment: uuid::Uuid) -> Vec<(u16, String)> {
    let mut found: HashMap<u16, String> = HashMap::new();
    for n in 0.. {
        let external_id = format!("scale-{n}");
        let partition = partition_of(
            session_id_for_external_id(environment, &external_id),
            PARTITIONS,
        );
        found.entry(partition).or_insert(external_id);
        if found.len() == usize::from(PARTITIONS) {
            break;
        }
    }
    let mut sessions: Vec<(u16, String)> = found.into_iter().collect();
    sessions.sort();
    sessions
}

/// Appends to every session until `stop`, each session sequentially with bodies 0, 1, 2, …
/// Returns how many each producer sent (all answered 200).
fn start_producers(
    app: &Arc<TestApp>,
    sessions: &[(u16, String)],
    stop: &Arc<AtomicBool>,
    sent: &Arc<Vec<std::sync::atomic::AtomicUsize>>,
) -> tokio::task::JoinSet<()> {
    let mut producers = tokio::task::JoinSet::new();
    for (slot, (_, external_id)) in sessions.iter().enumerate() {
        let (app, stop, sent, external_id) =
            (app.clone(), stop.clone(), sent.clone(), external_id.clone());
        producers.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let n = sent[slot].load(Ordering::SeqCst);
                let response = app
                    .append(&external_id, "in", &n.to_string(), Some(&format!("n{n}")))
                    .await;
                assert_eq!(response.status(), 200, "append {n} to {external_id}");
                sent[slot].store(n + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    producers
}

/// Waits until `check` holds for the gauges of every listed worker, or panics after `timeout`.
async fn wait_for_gauges(
    app: &TestApp,
    workers: &[&IndexedWorker],
    timeout: Duration,
    what: &str,
    check: impl Fn(usize, (f64, f64, f64)) -> bool,
) -> Duration {
    let started = Instant::now();
    let mut last = Vec::new();
    while started.elapsed() < timeout {
        last.clear();
        for worker in workers {
            last.push(partition_gauges(app, worker).await);
        }
        if last
            .iter()
            .enumerate()
            .all(|(slot, gauges)| gauges.is_some_and(|gauges| check(slot, gauges)))
        {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "{what}: not reached within {timeout:?}; gauges (home active, foreign active, stalled): {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_balance_fail_over_and_hand_back_keeping_order() {
    let app = Arc::new(
        TestApp::spawn_with(SpawnOptions {
            overrides: &[
                ("SESSIONS_PARTITIONS", "12"),
                ("WORKER_COUNT", "3"),
                ("SESSIONS_WORKER_STANDBY_DELAY_MS", "1500"),
                ("SESSIONS_PARTITION_LEASE_MS", "1500"),
            ],
            without_worker: true,
            ..SpawnOptions::default()
        })
        .await,
    );
    let environment = app
        .store
        .environment_by_public_id(&app.environment_id)
        .await
        .expect("lookup")
        .expect("environment")
        .id;
    let sessions = one_session_per_partition(environment);
    let home_count = f64::from(PARTITIONS / WORKERS);
    let mut workers: Vec<IndexedWorker> = (0..WORKERS).map(|i| spawn_worker(&app, i)).collect();
    for (_, external_id) in &sessions {
        app.create_session(external_id).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let sent: Arc<Vec<std::sync::atomic::AtomicUsize>> = Arc::new(
        (0..sessions.len())
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect(),
    );
    let mut producers = start_producers(&app, &sessions, &stop, &sent);

    // Balance: every worker is active on exactly its home partitions.
    let all: Vec<&IndexedWorker> = workers.iter().collect();
    wait_for_gauges(
        &app,
        &all,
        Duration::from_secs(60),
        "even spread",
        |_, (home_active, foreign_active, stalled)| {
            home_active == home_count && foreign_active == 0.0 && stalled == 0.0
        },
    )
    .await;

    // Kill worker 1: its partitions become active on workers 0 and 2.
    let killed = workers.remove(1);
    killed.process.kill_9().await;
    let killed_at = Instant::now();
    // Records sent after the kill to worker 1's partitions get applied.
    let mut orphaned_applied = Duration::ZERO;
    for (slot, (partition, external_id)) in sessions.iter().enumerate() {
        if partition % WORKERS != 1 {
            continue;
        }
        let wanted = sent[slot].load(Ordering::SeqCst) + 1;
        let records = app
            .wait_for_records(external_id, "in", wanted, Duration::from_secs(30))
            .await;
        assert!(
            records.len() >= wanted,
            "partition {partition} was not taken over: {} of {wanted} records",
            records.len()
        );
        orphaned_applied = orphaned_applied.max(killed_at.elapsed());
    }
    let mut foreign_total = 0.0;
    for _ in 0..50 {
        foreign_total = 0.0;
        for worker in &workers {
            foreign_total += partition_gauges(&app, worker).await.expect("gauges").1;
        }
        if foreign_total == home_count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        foreign_total, home_count,
        "the survivors are active on all of worker 1's partitions"
    );
    println!(
        "failover: appends to the killed worker's partitions applied within {orphaned_applied:?} of the kill"
    );

    // Restart worker 1: the others hand its partitions back.
    workers.insert(1, spawn_worker(&app, 1));
    let all: Vec<&IndexedWorker> = workers.iter().collect();
    let hand_back = wait_for_gauges(
        &app,
        &all,
        Duration::from_secs(60),
        "hand-back",
        |_, (home_active, foreign_active, stalled)| {
            home_active == home_count && foreign_active == 0.0 && stalled == 0.0
        },
    )
    .await;
    println!("hand-back: balanced again {hand_back:?} after the restart");

    // Order and uniqueness over everything that was accepted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    while let Some(result) = producers.join_next().await {
        result.expect("producer");
    }
    let mut total = 0;
    for (slot, (partition, external_id)) in sessions.iter().enumerate() {
        let count = sent[slot].load(Ordering::SeqCst);
        let records = app
            .wait_for_records(external_id, "in", count, Duration::from_secs(60))
            .await;
        let bodies: Vec<String> = records.iter().map(|record| record.data.clone()).collect();
        let expected: Vec<String> = (0..count).map(|n| n.to_string()).collect();
        assert_eq!(
            bodies, expected,
            "partition {partition}: every accepted append once, in order"
        );
        total += count;
    }
    println!("checked {total} records over {} sessions", sessions.len());
    for worker in workers {
        worker.process.kill_9().await;
    }
    let app = Arc::into_inner(app).expect("single owner");
    app.cleanup().await;
}
