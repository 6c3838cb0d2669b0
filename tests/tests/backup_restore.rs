//! The backup-and-restore drill (README, "Backup and restore"): under load, `pg_dump` the
//! database, keep appending, stop the deployment, restore the dump into a fresh database and
//! point a new worker and api at it. Postgres is the system of record; the partition logs hold
//! what workers applied recently too. Two recoveries from the same dump:
//!
//! - the logs are gone as well (a new broker prefix): the restored sessions hold exactly a
//!   prefix of what was acknowledged: everything acknowledged before the dump started, nothing
//!   duplicated, nothing reordered; what is missing is acknowledged appends after the backup;
//! - the logs survived (same broker): the new worker resumes each log at the position stored in
//!   the dump and re-applies what came after it, so nothing acknowledged is missing.
//!
//! Appends use `Prefer: wait`, so an acknowledgement means committed in Postgres.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tests::{ChildApi, ChildWorker, POSTGRES_SERVER, TestApp};

const SESSIONS: usize = 4;

/// Appends acknowledged per session, in order, with when each was sent.
type Acknowledged = Vec<Vec<(String, Instant)>>;

async fn produce(app: Arc<TestApp>, stop: Arc<AtomicBool>) -> Acknowledged {
    let mut producers = Vec::new();
    for session in 0..SESSIONS {
        let (app, stop) = (app.clone(), stop.clone());
        producers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = format!("drill-{session}-{n}");
                let sent = Instant::now();
                let response = app
                    .client
                    .post(app.url(&format!("/realtime/v1/sessions/drill-{session}/out/append")))
                    .bearer_auth(&app.secret_key)
                    .header("X-Part-Id", format!("p{n}"))
                    .header("Prefer", "wait=20")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("append");
                assert!(
                    response.status().is_success(),
                    "append: {}",
                    response.status()
                );
                acknowledged.push((body, sent));
                n += 1;
            }
            acknowledged
        }));
    }
    let mut all = Vec::new();
    for producer in producers {
        all.push(producer.await.expect("producer"));
    }
    all
}

fn run(program: &str, arguments: &[&str]) {
    let output = std::process::Command::new(program)
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Restores `dump` into a new database and returns its URL.
fn restore(dump: &std::path::Path, database: &str) -> String {
    run("createdb", &["-h", "127.0.0.1", "-U", "postgres", database]);
    run(
        "pg_restore",
        &[
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            database,
            dump.to_str().expect("path"),
        ],
    );
    format!("{POSTGRES_SERVER}/{database}")
}

/// The bodies of every drill session read through the api at `base`, once they stop changing.
async fn settled_bodies(app: &TestApp, base: &str) -> Vec<Vec<String>> {
    let mut previous: Option<Vec<Vec<String>>> = None;
    let started = Instant::now();
    loop {
        let mut now = Vec::new();
        for session in 0..SESSIONS {
            let records = app
                .records_at(base, &format!("drill-{session}"), "out")
                .await;
            now.push(records.into_iter().map(|record| record.data).collect());
        }
        if previous.as_ref() == Some(&now) || started.elapsed() > Duration::from_secs(60) {
            return now;
        }
        previous = Some(now);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_backup_holds_every_append_acknowledged_before_it_and_the_logs_replay_the_rest()
{
    let app = Arc::new(TestApp::spawn_with(tests::without_worker()).await);
    let worker = ChildWorker::spawn(&app.settings);
    for session in 0..SESSIONS {
        app.create_session(&format!("drill-{session}")).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let producing = tokio::spawn(produce(app.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The backup, under load.
    let dump = std::env::temp_dir().join(format!("{}.dump", app.name));
    let dump_started = Instant::now();
    let database = app
        .settings
        .database_url
        .rsplit('/')
        .next()
        .expect("name")
        .to_owned();
    run(
        "pg_dump",
        &[
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-Fc",
            "-f",
            dump.to_str().expect("path"),
            &database,
        ],
    );
    let dump_ended = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let acknowledged = producing.await.expect("producers");
    // The disaster: the deployment stops (its database is left alone; the restores are new).
    worker.kill_9().await;

    let expected: Vec<Vec<String>> = acknowledged
        .iter()
        .map(|appends| appends.iter().map(|(body, _)| body.clone()).collect())
        .collect();
    let total: usize = expected.iter().map(Vec::len).sum();

    // 1. The logs are lost too: a new broker prefix.
    let mut fresh = app.settings.clone();
    fresh.database_url = restore(&dump, &format!("{database}_restored_fresh"));
    fresh.broker_prefix = format!("{}_restored", app.settings.broker_prefix);
    let fresh_worker = ChildWorker::spawn(&fresh);
    let fresh_api = ChildApi::spawn(&fresh).await;
    let restored = settled_bodies(&app, &fresh_api.url).await;
    let mut in_backup = 0;
    for (session, (restored, acknowledged)) in restored.iter().zip(&acknowledged).enumerate() {
        let expected = &expected[session];
        assert!(
            expected.starts_with(restored),
            "drill-{session}: the restored records are a prefix of what was acknowledged, in order, without duplicates"
        );
        let before_dump = acknowledged
            .iter()
            .filter(|(_, sent)| *sent < dump_started)
            .count();
        let started_before_dump_ended = acknowledged
            .iter()
            .filter(|(_, sent)| *sent < dump_ended)
            .count();
        assert!(
            restored.len() >= before_dump,
            "drill-{session}: every append acknowledged before the backup is restored ({} of {before_dump})",
            restored.len()
        );
        assert!(
            restored.len() <= started_before_dump_ended,
            "drill-{session}: nothing sent after the backup ended is in it"
        );
        in_backup += restored.len();
    }
    // The restored deployment takes new appends after the restored ones.
    let response = app
        .client
        .post(format!(
            "{}/realtime/v1/sessions/drill-0/out/append",
            fresh_api.url
        ))
        .bearer_auth(&app.secret_key)
        .header("Prefer", "wait=20")
        .body("after-restore")
        .send()
        .await
        .expect("append after restore");
    assert!(response.status().is_success());
    let after = app.records_at(&fresh_api.url, "drill-0", "out").await;
    assert_eq!(
        after.last().map(|record| record.data.as_str()),
        Some("after-restore")
    );
    assert_eq!(after.len(), restored[0].len() + 1);
    println!(
        "backup drill, logs lost: {total} appends acknowledged, {in_backup} restored from the dump, {} missing (all acknowledged after the backup started); 0 duplicated, 0 reordered",
        total - in_backup
    );
    fresh_api.kill().await;
    fresh_worker.kill_9().await;
    tests::delete_broker_topology(&fresh, &app.name).await;
    tests::drop_database(&fresh.database_url).await;

    // 2. The logs survived: same broker, the new worker replays them from the dump's positions.
    let mut kept = app.settings.clone();
    kept.database_url = restore(&dump, &format!("{database}_restored_kept"));
    let kept_worker = ChildWorker::spawn(&kept);
    let kept_api = ChildApi::spawn(&kept).await;
    let replayed = settled_bodies(&app, &kept_api.url).await;
    assert_eq!(
        replayed, expected,
        "with the logs, every acknowledged append is back, once, in order"
    );
    println!(
        "backup drill, logs kept: {total} appends acknowledged, all {total} present after the new worker replayed the logs from the dump's positions ({} beyond the dump); 0 duplicated, 0 reordered",
        total - in_backup
    );
    kept_api.kill().await;
    kept_worker.kill_9().await;
    tests::drop_database(&kept.database_url).await;
    let _ = std::fs::remove_file(&dump);
    let app = Arc::into_inner(app).expect("single owner");
    app.cleanup().await;
}
