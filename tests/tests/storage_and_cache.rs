//! Adapters against the real services: concurrent migrations, and claim ownership in Redis.

use std::time::Duration;

use shared::cache::Cache;
use shared::domain::log::ResumePoint;
use shared::storage::{
    BatchWrites, LogAdvance, NewDeadLetter, StatementPlans, StorageError, Store,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_migrate_once_and_all_succeed() {
    let name = tests::unique_name();
    let url = format!("{}/sessions_{name}", tests::POSTGRES_SERVER);
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let url = url.clone();
        starts.spawn(async move { Store::connect(&url, 2).await.map(|_| ()) });
    }
    while let Some(result) = starts.join_next().await {
        result
            .expect("task")
            .expect("every concurrent start succeeds");
    }
    // Each migration is recorded once, and the same ones as a lone start records.
    let alone = format!("{}/sessions_{name}_alone", tests::POSTGRES_SERVER);
    Store::connect(&alone, 2).await.expect("a lone start");
    let concurrent_migrations = applied_migrations(&url).await;
    assert_eq!(concurrent_migrations, applied_migrations(&alone).await);
    assert!(
        concurrent_migrations.len() >= 8,
        "{concurrent_migrations:?}"
    );
    tests::drop_database(&url).await;
    tests::drop_database(&alone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_pool_plans_each_execution_and_the_default_pool_caches_plans() {
    let url = format!(
        "{}/sessions_{}",
        tests::POSTGRES_SERVER,
        tests::unique_name()
    );
    let each = Store::connect_planning(&url, 2, StatementPlans::EachExecution)
        .await
        .expect("connect");
    let cached = Store::connect(&url, 2).await.expect("connect");
    // Twice each: the pool may hand out either of its connections; both have the setting.
    for _ in 0..2 {
        assert_eq!(
            each.statement_plan_mode().await.expect("read").as_deref(),
            Some("force_custom_plan")
        );
        assert_eq!(
            cached.statement_plan_mode().await.expect("read").as_deref(),
            Some("auto")
        );
    }
    tests::drop_database(&url).await;
}

/// The versions recorded in `seaql_migrations`, as many times as each is recorded.
async fn applied_migrations(url: &str) -> Vec<String> {
    use sea_orm::ConnectionTrait;
    let db = sea_orm::Database::connect(url).await.expect("connect");
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT version FROM seaql_migrations ORDER BY version",
        ))
        .await
        .expect("seaql_migrations");
    rows.iter()
        .map(|row| row.try_get::<String>("", "version").expect("version"))
        .collect()
}

#[tokio::test]
async fn an_expired_owners_late_release_keeps_the_new_claim() {
    let cache = Cache::new(tests::REDIS_URL, &tests::unique_name()).expect("cache");
    let key = format!("{}:claim:test", tests::unique_name());
    assert!(
        cache
            .claim(&key, "owner-a", Duration::from_millis(100))
            .await
            .expect("claim a")
    );
    assert!(
        !cache
            .claim(&key, "owner-b", Duration::from_secs(30))
            .await
            .expect("b waits")
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        cache
            .claim(&key, "owner-b", Duration::from_secs(30))
            .await
            .expect("claim b")
    );
    // A's late failure path releases "its" claim: it must not remove B's.
    assert!(!cache.release(&key, "owner-a").await.expect("release a"));
    assert_eq!(
        cache.claim_holder(&key).await.expect("get").as_deref(),
        Some("owner-b")
    );
    assert!(cache.release(&key, "owner-b").await.expect("release b"));
    assert_eq!(cache.claim_holder(&key).await.expect("get"), None);
}

/// A batch of `advances` whose only write is one dead letter per advance (at its `to` offset).
async fn apply_advances(store: &Store, advances: &[LogAdvance]) -> Result<(), StorageError> {
    let letters: Vec<NewDeadLetter> = advances
        .iter()
        .map(|advance| NewDeadLetter {
            log: advance.log.clone(),
            partition: 0,
            offset: Some(advance.to),
            message_id: advance.to_message_id.clone(),
            payload: b"poison".to_vec(),
            reason: "test".into(),
        })
        .collect();
    store
        .apply_batch(advances, &letters, &[], |_| (BatchWrites::default(), ()))
        .await
        .map(|_| ())
}

fn advance(log: &str, from: Option<i64>, to: i64) -> LogAdvance {
    LogAdvance {
        log: log.into(),
        from,
        to,
        to_message_id: Some(format!("m{to}")),
    }
}

/// The offsets fence: a batch is refused, and writes nothing, unless every log it read is
/// still where the batch started; a refused batch moves none of its logs.
async fn the_offsets_fence_refuses_a_batch_whose_log_moved(store: &Store) {
    let (first, second) = ("t.log.p000".to_owned(), "t.log.p001".to_owned());
    store
        .ensure_log_positions(&[first.clone(), second.clone()])
        .await
        .expect("positions");
    apply_advances(store, &[advance(&first, None, 5)])
        .await
        .expect("the first batch moves the log");
    // Another reader's batch from the same start: refused.
    let stale = apply_advances(store, &[advance(&first, None, 7)]).await;
    assert!(matches!(stale, Err(StorageError::Fenced(_))), "{stale:?}");
    // One stale log of two: refused as a whole; the other log stays where it was.
    let half_stale = apply_advances(
        store,
        &[advance(&first, Some(3), 8), advance(&second, None, 4)],
    )
    .await;
    assert!(
        matches!(half_stale, Err(StorageError::Fenced(_))),
        "{half_stale:?}"
    );
    apply_advances(
        store,
        &[advance(&first, Some(5), 9), advance(&second, None, 2)],
    )
    .await
    .expect("a batch from where the logs are");

    let offsets: Vec<Option<i64>> = store
        .dead_letters()
        .await
        .expect("dead letters")
        .iter()
        .map(|letter| letter.offset)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(offsets, vec![Some(2), Some(5), Some(9)]);
    let positions = store
        .log_positions(&[first.clone(), second.clone()])
        .await
        .expect("positions");
    assert_eq!(
        positions[&first],
        ResumePoint::AfterApplied {
            offset: 9,
            message_id: Some("m9".into())
        }
    );
    assert_eq!(
        positions[&second],
        ResumePoint::AfterApplied {
            offset: 2,
            message_id: Some("m2".into())
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offsets_fence_on_postgres_with_each_plan_mode() {
    for plans in [StatementPlans::EachExecution, StatementPlans::Cached] {
        let url = format!(
            "{}/sessions_{}",
            tests::POSTGRES_SERVER,
            tests::unique_name()
        );
        let store = Store::connect_planning(&url, 2, plans)
            .await
            .expect("connect");
        the_offsets_fence_refuses_a_batch_whose_log_moved(&store).await;
        drop(store);
        tests::drop_database(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offsets_fence_on_sqlite() {
    let directory = std::env::temp_dir().join(tests::unique_name());
    std::fs::create_dir_all(&directory).expect("directory");
    let url = format!("sqlite://{}?mode=rwc", directory.join("fence.db").display());
    let store = Store::connect(&url, 1).await.expect("connect");
    the_offsets_fence_refuses_a_batch_whose_log_moved(&store).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&directory);
}
