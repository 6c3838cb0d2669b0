//! Fault-injection suite (issue #9): every scenario drives appends (and most of them waitpoints)
//! through the real pipeline while a fault is injected, records the client history, reads
//! everything back and runs it through [`tests::checker`]. Each test prints one line of figures
//! (attempts sent, acknowledged, failed, indeterminate, and the checker's report) and saves it
//! under `target/tmp/reliability/<scenario>.txt`.
//!
//! Outages are simulated per test, never by stopping the machine's services (they are shared
//! with tests running in parallel): a [`TcpProxy`] between the processes and RabbitMQ or
//! Postgres is cut and restored; workers are child processes killed with SIGKILL, aborted by the
//! `abort_after_commit` failpoint, or paused with SIGSTOP; Redis loss uses a private
//! `redis-server` without persistence that is killed and restarted. See RELIABILITY.md.
//!
//! Sizes: CI-sized by default (≈ 10,000 appends over the file). `SESSIONS_SOAK=1` runs the same
//! tests with larger sizes (more appends, more kills, longer and more outages):
//! `SESSIONS_SOAK=1 cargo nextest run -p tests --test reliability`.
//!
//! Existing tests cover single cases of some of these faults (append_pipeline.rs: one worker
//! killed twice, a broker outage, poison messages; operations.rs: SIGTERM, dead letters;
//! waitpoints.rs: abort_after_commit with one waitpoint, a cache flush, two environments). This
//! suite repeats them under load and judges every run with the checker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::config::Settings;
use tests::checker::{
    self, AppendAttempt, AppendResult, Channel, ReadBack, ReadRecord, ReadWaitpoint,
    RegisteredWaitpoint,
};
use tests::events::EventTap;
use tests::load::{
    Plan, Run, append_settled, assert_clean, body_of, inside_outage, join_all, publish_figures,
    register, register_waitpoint, sized,
};
use tests::proxy::TcpProxy;
use tests::{ChildWorker, SpawnOptions, TestApp, without_worker, worker_settings};
use tokio::task::JoinSet;

// --------------------------------------------------------------------- processes and services

use tests::free_port;

/// A private `redis-server` without persistence: killing it loses every key.
struct PrivateRedis {
    port: u16,
    child: Option<tokio::process::Child>,
}

impl PrivateRedis {
    async fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            child: None,
        };
        redis.restart().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn restart(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("private redis-server did not start on {}", self.port);
    }

    /// SIGKILL: every claim is gone.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

// ---------------------------------------------------------------------- the checker, proven

/// The checker proves itself on a real run: clean first, then five faults seeded in the
/// database (one record deleted, one duplicated, two swapped, one altered, one row holding
/// another environment's record) must show up as exactly one count in each of lost,
/// duplicated, reordered, corrupted and cross_env, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_flags_exactly_the_five_seeded_faults() {
    let app = TestApp::spawn().await;
    let run = Run::new(app, &["prod"], 5, Plan::new(0)).await;
    let mut tap = EventTap::bind(&run.app.name).await;
    // Waitpoints on `out`, records on `in` and `out`: the seeded faults touch `in` only.
    let mut producers = JoinSet::new();
    for tenant in &run.tenants {
        for session in &run.sessions {
            let (app, history, tenant, session) = (
                run.app.clone(),
                run.history.clone(),
                tenant.clone(),
                session.clone(),
            );
            producers.spawn(async move {
                let key = tenant.environment.key.clone();
                register_waitpoint(
                    &app,
                    &history,
                    &tenant,
                    &session,
                    "out",
                    "0",
                    Duration::from_secs(30),
                )
                .await
                .expect("waitpoint");
                for (io, count) in [("in", 8), ("out", 2)] {
                    let channel = Channel::new(&tenant.environment.id, &session, io);
                    for n in 0..count {
                        let result = append_settled(
                            &app,
                            &history,
                            &key,
                            &channel,
                            Some(&format!("p{n}-{}", tenant.tag())),
                            &body_of(&channel, n),
                            n as u64,
                            Duration::from_secs(30),
                        )
                        .await;
                        assert_eq!(result, AppendResult::Acknowledged);
                    }
                }
            });
        }
    }
    join_all(producers).await;
    checker::wait_until_quiet(
        &run.app,
        run.history.acknowledged_appends(),
        Duration::from_secs(60),
    )
    .await;
    let environments = run.environments();
    let clean = checker::read_back(&run.app, &environments, &run.sessions, Some(&mut tap)).await;
    let report = checker::check(&run.history.appends(), &run.history.waitpoints(), &clean);
    publish_figures(
        "checker_self_test_clean",
        &run.history.figures().to_string(),
        "",
        &report,
    );
    assert_clean(&report);
    assert_eq!(report.waitpoints, 10);
    assert_eq!(report.records, 100);

    // Seed the five faults in environment A's `in` channels.
    let a = environments[0].id.as_str();
    let b = environments[1].id.as_str();
    let session_of = |environment: &str, session: &str| {
        format!(
            "(SELECT s.id FROM sessions s JOIN environments e ON e.id = s.environment_id \
             WHERE e.public_id = '{environment}' AND s.external_id = '{session}')"
        )
    };
    let record_of = |environment: &str, session: &str, seq: i64| {
        format!(
            "session_id = {} AND io = 'in' AND seq_num = {seq}",
            session_of(environment, session)
        )
    };
    let db = sea_orm::Database::connect(&run.app.settings.database_url)
        .await
        .expect("database");
    let columns = "session_id, io, seq_num, environment_id, part_id, body, body_fingerprint, \
                   command_id, created_at";
    let faults = [
        // Deleted.
        format!("DELETE FROM records WHERE {}", record_of(a, "chat-0", 2)),
        // Duplicated (without part id: the unique fence would refuse a copy with it).
        format!(
            "INSERT INTO records ({columns}) SELECT session_id, io, 100, environment_id, NULL, \
             body, body_fingerprint, gen_random_uuid(), created_at FROM records WHERE {}",
            record_of(a, "chat-1", 2)
        ),
        // Swapped: seq 3 and 4 exchange part id and body (in two statements: the part id
        // fence is checked row by row).
        format!(
            "UPDATE records SET part_id = part_id || '#' WHERE session_id = {} AND io = 'in' \
             AND seq_num IN (3, 4)",
            session_of(a, "chat-2")
        ),
        format!(
            "UPDATE records r SET part_id = rtrim(o.part_id, '#'), body = o.body FROM records o \
             WHERE r.session_id = o.session_id AND r.io = o.io AND r.io = 'in' \
             AND r.session_id = {} AND r.seq_num + o.seq_num = 7 AND r.seq_num IN (3, 4)",
            session_of(a, "chat-2")
        ),
        // Altered.
        format!(
            "UPDATE records SET body = body || ' ' WHERE {}",
            record_of(a, "chat-3", 2)
        ),
        // A row of environment B's in environment A's channel.
        format!(
            "INSERT INTO records ({columns}) SELECT {}, io, 100, (SELECT id FROM environments \
             WHERE public_id = '{a}'), part_id, body, body_fingerprint, gen_random_uuid(), \
             created_at FROM records WHERE {}",
            session_of(a, "chat-4"),
            record_of(b, "chat-4", 2)
        ),
    ];
    {
        use sea_orm::ConnectionTrait;
        for fault in &faults {
            let result = db.execute_unprepared(fault).await.expect(fault);
            assert!(result.rows_affected() >= 1, "{fault}");
        }
    }
    let mut seeded = checker::read_back(&run.app, &environments, &run.sessions, None).await;
    // The completion events were consumed by the first read-back; they did not change.
    for waitpoint in &mut seeded.waitpoints {
        waitpoint.completion_events = clean
            .waitpoints
            .iter()
            .find(|first| first.id == waitpoint.id)
            .map(|first| first.completion_events.clone())
            .unwrap_or_default();
    }
    let report = checker::check(&run.history.appends(), &run.history.waitpoints(), &seeded);
    publish_figures(
        "checker_self_test_seeded",
        &run.history.figures().to_string(),
        "seeded: deleted, duplicated, swapped, altered, foreign",
        &report,
    );
    assert_eq!(
        report.anomalies(),
        BTreeMap::from([
            ("corrupted", 1),
            ("cross_env", 1),
            ("duplicated", 1),
            ("lost", 1),
            ("reordered", 1),
        ]),
        "{report}\n{}",
        report.details.join("\n")
    );
    drop(db);
    run.cleanup().await;
}

/// The anomalies a healthy deployment cannot be made to show through its own routes, seeded in
/// a synthetic history and read-back: a refused append that was written, a record of nobody,
/// and every waitpoint failure.
#[test]
fn the_checker_counts_refused_writes_unknown_records_and_waitpoint_failures() {
    let now = Instant::now();
    let a = Channel::new("env_a", "chat", "in");
    let attempt = |n: u64, result: AppendResult| AppendAttempt {
        channel: a.clone(),
        part_id: Some(format!("p{n}")),
        body_hash: checker::body_hash(&format!("body {n}")),
        send_order: n,
        result,
        status: None,
        sent_at: now,
        answered_at: now,
    };
    let record = |seq: i64, n: u64| ReadRecord {
        channel: a.clone(),
        seq_num: seq,
        part_id: Some(format!("p{n}")),
        body_hash: checker::body_hash(&format!("body {n}")),
        close_message: false,
    };
    let history = vec![
        attempt(0, AppendResult::Acknowledged),
        attempt(1, AppendResult::Indeterminate),
        attempt(1, AppendResult::Acknowledged),
        attempt(2, AppendResult::Failed),
        attempt(3, AppendResult::Indeterminate),
    ];
    let waitpoint =
        |id: &str, after_seq: i64, status: &str, by: Option<i64>, n: u64| ReadWaitpoint {
            id: id.into(),
            channel: a.clone(),
            after_seq,
            status: status.into(),
            completed_by_seq: by,
            output_hash: by.map(|_| checker::body_hash(&format!("body {n}"))),
            completion_events: by
                .map(|_| vec![(checker::body_hash(&format!("body {n}")), "t".into())])
                .unwrap_or_default(),
            visible_in: Vec::new(),
        };
    let mut twice = waitpoint("wp-twice", -1, "COMPLETED", Some(0), 0);
    twice
        .completion_events
        .push((checker::body_hash("body 0"), "t2".into()));
    let mut silent = waitpoint("wp-silent", 0, "COMPLETED", Some(1), 1);
    silent.completion_events.clear();
    let read = ReadBack {
        records: vec![
            record(0, 0),
            record(1, 1),
            record(2, 2),
            ReadRecord {
                part_id: Some("p9".into()),
                body_hash: 9,
                ..record(3, 0)
            },
        ],
        waitpoints: vec![
            twice,
            waitpoint("wp-ok", 0, "COMPLETED", Some(1), 1),
            silent,
            waitpoint("wp-never", 1, "WAITING", None, 0),
            waitpoint("wp-wrong", 0, "COMPLETED", Some(2), 2),
            waitpoint("wp-waiting", 5, "WAITING", None, 0),
        ],
    };
    let registered = vec![RegisteredWaitpoint {
        id: "wp-vanished".into(),
        channel: a.clone(),
    }];
    let report = checker::check(&history, &registered, &read);
    assert_eq!(
        report.anomalies(),
        BTreeMap::from([
            ("failed_but_written", 1),
            ("unknown_records", 1),
            ("waitpoint_events_missing", 1),
            ("waitpoints_completed_twice", 1),
            ("waitpoints_never_completed", 2),
            ("waitpoints_wrong_record", 1),
        ]),
        "{report}\n{}",
        report.details.join("\n")
    );
    assert_eq!(report.waitpoints_waiting, 1);
    assert_eq!((report.acknowledged, report.indeterminate), (2, 1));
}

/// The close message a session close appends to `in` belongs to no client append: one per
/// channel is expected, a second one is a duplicate, and a client record with the same shape
/// but a part id is still checked like any other.
#[test]
fn the_checker_expects_one_close_message_per_in_channel() {
    let a = Channel::new("env_a", "chat", "in");
    let close = r#"{"kind":"message","payload":{"chatId":"chat","trigger":"close"}}"#;
    assert!(checker::is_close_message(close));
    assert!(!checker::is_close_message(
        r#"{"kind":"message","payload":{}}"#
    ));
    let close_record = |seq: i64, part_id: Option<&str>| ReadRecord {
        channel: a.clone(),
        seq_num: seq,
        part_id: part_id.map(str::to_owned),
        body_hash: checker::body_hash(close),
        close_message: true,
    };
    let once = ReadBack {
        records: vec![close_record(0, None)],
        waitpoints: Vec::new(),
    };
    let report = checker::check(&[], &[], &once);
    assert!(report.anomalies().is_empty(), "{report}");
    assert_eq!(report.close_messages, 1);
    let twice = ReadBack {
        records: vec![
            close_record(0, None),
            close_record(1, None),
            close_record(2, Some("p1")),
        ],
        waitpoints: Vec::new(),
    };
    let report = checker::check(&[], &[], &twice);
    assert_eq!(
        report.anomalies(),
        BTreeMap::from([("duplicated", 1), ("unknown_records", 1)]),
        "{report}"
    );
}

// ------------------------------------------------------------------------------- the scenarios

/// Two workers (`WORKER_COUNT=2`), one of them killed with SIGKILL and respawned at evenly
/// spread points of the load (3×, at 20/40/60 % of the appends; soak: 9×): lost 0, duplicated 0, reordered 0 (checker clean).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_kill_9_during_load() {
    let app = TestApp::spawn_with(without_worker()).await;
    let settings = [
        worker_settings(&app.settings, 0, 2),
        worker_settings(&app.settings, 1, 2),
    ];
    let mut workers = [
        Some(ChildWorker::spawn(&settings[0])),
        Some(ChildWorker::spawn(&settings[1])),
    ];
    let plan = Plan::new(sized(100, 300)).waitpoints_every(10);
    let run = Run::new(app, &[], sized(25, 40), plan).await;
    let mut tap = EventTap::bind(&run.app.name).await;
    let started = Instant::now();
    let load = tokio::spawn(join_all(run.start()));
    let kills = sized(3, 9);
    let mut kills_during_load = 0;
    for kill in 0..kills {
        run.progress((kill + 1) as f64 / (kills + 2) as f64).await;
        let index = kill % 2;
        if !load.is_finished() {
            kills_during_load += 1;
        }
        if let Some(worker) = workers[index].take() {
            worker.kill_9().await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        workers[index] = Some(ChildWorker::spawn(&settings[index]));
    }
    load.await.expect("load");
    let load_seconds = started.elapsed().as_secs_f32();
    let report = run
        .finish(
            "worker_kill_9",
            Some(&mut tap),
            &format!(
                "kills={kills} kills_during_load={kills_during_load} \
                 load_seconds={load_seconds:.1}"
            ),
        )
        .await;
    assert_clean(&report);
    assert_eq!(report.waitpoints_waiting, 0);
    for worker in workers.into_iter().flatten() {
        worker.kill_9().await;
    }
    run.cleanup().await;
}

/// The api and the worker reach RabbitMQ through one proxy, cut for 4 s at 33 % of the appends
/// (soak: three cuts of 6 s at 20/40/60 %): checker clean, and no append sent wholly inside an outage window
/// (sent after the cut, answered before the restore) was answered 2xx. An [`tests::load::AppendProbe`] makes
/// sure appends were sent and answered inside the window (the producers may all be waiting
/// on waitpoint registrations then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_during_load() {
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().expect("address")).await;
    let proxied = format!("amqp://guest:guest@{}/%2f?heartbeat=5", proxy.address);
    let app = TestApp::spawn_with(SpawnOptions {
        api_amqp_url: Some(proxied.clone()),
        without_worker: true,
        ..SpawnOptions::default()
    })
    .await;
    let mut settings = app.settings.clone();
    settings.amqp_url = proxied;
    let worker = ChildWorker::spawn(&settings);
    let plan = Plan::new(sized(75, 300)).waitpoints_every(15);
    let run = Run::new(app, &[], sized(20, 30), plan).await;
    let mut tap = EventTap::bind(&run.app.name).await;
    let producers = run.start();
    let probe = run.start_probe().await;
    let mut windows = Vec::new();
    let cuts = sized(1, 3);
    for cut in 0..cuts {
        run.progress((cut + 1) as f64 / (cuts + 2) as f64).await;
        proxy.disable();
        let cut_at = Instant::now();
        tokio::time::sleep(sized(Duration::from_secs(4), Duration::from_secs(6))).await;
        let restore_at = Instant::now();
        proxy.enable();
        windows.push((cut_at, restore_at));
    }
    join_all(producers).await;
    let probed = inside_outage(&probe.stop().await, &windows);
    let inside = inside_outage(&run.history, &windows);
    let report = run
        .finish(
            "broker_outage",
            Some(&mut tap),
            &format!(
                "outages={} producers: {} probe: {}",
                windows.len(),
                inside.summary,
                probed.summary
            ),
        )
        .await;
    assert_eq!(
        inside.appends_2xx + probed.appends_2xx,
        0,
        "a 2xx while the broker was unreachable"
    );
    assert!(
        probed.appends > 0,
        "appends were sent and answered during the outage"
    );
    assert_clean(&report);
    assert_eq!(report.waitpoints_waiting, 0);
    worker.kill_9().await;
    run.cleanup().await;
}

/// Two workers use a private redis-server without persistence; it is killed with SIGKILL mid
/// load (every claim lost) and restarted 2 s later (soak: three times), while producers re-send
/// every fourth append and register waitpoints: checker clean (duplicated 0, lost 0, every
/// waitpoint completed exactly once by its record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_loss_during_load() {
    let mut redis = PrivateRedis::start().await;
    let app = TestApp::spawn_with(without_worker()).await;
    let settings: Vec<Settings> = (0..2)
        .map(|index| {
            let mut settings = worker_settings(&app.settings, index, 2);
            settings.redis_url = redis.url();
            settings
        })
        .collect();
    let workers: Vec<ChildWorker> = settings.iter().map(ChildWorker::spawn).collect();
    let plan = Plan::new(sized(75, 300))
        .waitpoints_every(5)
        .resend_every(4);
    let run = Run::new(app, &[], sized(20, 30), plan).await;
    let mut tap = EventTap::bind(&run.app.name).await;
    let producers = run.start();
    let losses = sized(1, 3);
    for loss in 0..losses {
        run.progress((loss + 1) as f64 / (losses + 2) as f64).await;
        redis.kill().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        redis.restart().await;
    }
    join_all(producers).await;
    let report = run
        .finish(
            "redis_loss",
            Some(&mut tap),
            &format!("redis_kills={losses}"),
        )
        .await;
    assert_clean(&report);
    assert_eq!(report.waitpoints_waiting, 0);
    assert!(report.waitpoints > 0);
    for worker in workers {
        worker.kill_9().await;
    }
    redis.kill().await;
    run.cleanup().await;
}

/// The api and the worker reach Postgres through one proxy, cut for 12 s (soak: 25 s) at 20 % of
/// the appends (appends answered 5xx meanwhile are retried by the producers; a 2xx would be
/// acceptable here, the broker is up): checker clean, and no
/// healthy command was dead-lettered (`sessions-worker admin dead-letters list` is empty). An
/// [`tests::load::AppendProbe`] makes sure appends were sent and answered inside the outage (a waitpoint
/// registration holds its producer until the worker reaches Postgres again, so the producers
/// may send none then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_during_load() {
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().expect("address")).await;
    let proxied_server = format!("postgres://postgres@{}", proxy.address);
    let app = TestApp::spawn_with(SpawnOptions {
        api_postgres_server: Some(proxied_server.clone()),
        without_worker: true,
        ..SpawnOptions::default()
    })
    .await;
    let mut settings = app.settings.clone();
    let database = app
        .settings
        .database_url
        .rsplit_once('/')
        .map(|(_, name)| name.to_owned())
        .expect("database name");
    settings.database_url = format!("{proxied_server}/{database}");
    let worker = ChildWorker::spawn(&settings);
    let plan = Plan::new(sized(75, 300)).waitpoints_every(10);
    let run = Run::new(app, &[], sized(20, 30), plan).await;
    let mut tap = EventTap::bind(&run.app.name).await;
    let producers = run.start();
    let probe = run.start_probe().await;
    run.progress(0.2).await;
    proxy.disable();
    let cut_at = Instant::now();
    let outage = sized(Duration::from_secs(12), Duration::from_secs(25));
    tokio::time::sleep(outage).await;
    let restore_at = Instant::now();
    proxy.enable();
    join_all(producers).await;
    let probed = inside_outage(&probe.stop().await, &[(cut_at, restore_at)]);
    let inside = inside_outage(&run.history, &[(cut_at, restore_at)]);
    let dead_letters = tests::worker_admin(&run.app.settings, &["admin", "dead-letters", "list"]);
    let report = run
        .finish(
            "postgres_outage",
            Some(&mut tap),
            &format!(
                "outage_seconds={} dead_letters={} producers: {} probe: {}",
                outage.as_secs(),
                dead_letters.len(),
                inside.summary,
                probed.summary
            ),
        )
        .await;
    assert!(
        dead_letters.is_empty(),
        "healthy commands dead-lettered: {dead_letters:?}"
    );
    assert!(
        probed.appends > 0,
        "appends were sent and answered during the outage"
    );
    assert_clean(&report);
    assert_eq!(report.waitpoints_waiting, 0);
    worker.kill_9().await;
    run.cleanup().await;
}

/// The same X-Part-Id 8× concurrently and 3× sequentially (then, after a second waitpoint was
/// registered, 3 more retries and one with another body): exactly one record per session, and
/// no retry completes the later waitpoint with its own body (it completes with the next
/// record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_part_id_retried_concurrently_and_sequentially() {
    let app = TestApp::spawn().await;
    // Plan::new(2): the refusals at the end use numbers 2.. (0 and 1 are this test's own).
    let run = Run::new(app, &[], sized(10, 50), Plan::new(2)).await;
    let mut tap = EventTap::bind(&run.app.name).await;
    let tenant = run.tenants[0].clone();
    let mut sessions = JoinSet::new();
    for session in run.sessions.clone() {
        let (app, history, tenant) = (run.app.clone(), run.history.clone(), tenant.clone());
        sessions.spawn(async move {
            let give_up = Duration::from_secs(60);
            let key = tenant.environment.key.clone();
            let channel = Channel::new(&tenant.environment.id, &session, "in");
            let body = body_of(&channel, 0);
            let first =
                register_waitpoint(&app, &history, &tenant, &session, "in", "first", give_up)
                    .await
                    .expect("first waitpoint");
            let mut concurrent = JoinSet::new();
            for _ in 0..8 {
                let (app, history, key, channel, body) = (
                    app.clone(),
                    history.clone(),
                    key.clone(),
                    channel.clone(),
                    body.clone(),
                );
                concurrent.spawn(async move {
                    append_settled(
                        &app,
                        &history,
                        &key,
                        &channel,
                        Some("same"),
                        &body,
                        0,
                        give_up,
                    )
                    .await
                });
            }
            while let Some(result) = concurrent.join_next().await {
                assert_eq!(result.expect("retry"), AppendResult::Acknowledged);
            }
            for _ in 0..3 {
                let result = append_settled(
                    &app,
                    &history,
                    &key,
                    &channel,
                    Some("same"),
                    &body,
                    0,
                    give_up,
                )
                .await;
                assert_eq!(result, AppendResult::Acknowledged);
            }
            assert_eq!(
                settled_waitpoint_as(&app, &key, &first).await["output"],
                json!(body)
            );
            // Registered after the record exists: only the next record may complete it.
            let second =
                register_waitpoint(&app, &history, &tenant, &session, "in", "second", give_up)
                    .await
                    .expect("second waitpoint");
            for _ in 0..3 {
                append_settled(
                    &app,
                    &history,
                    &key,
                    &channel,
                    Some("same"),
                    &body,
                    0,
                    give_up,
                )
                .await;
            }
            let other_body = format!("{body} (another body, same part id)");
            append_settled(
                &app,
                &history,
                &key,
                &channel,
                Some("same"),
                &other_body,
                0,
                give_up,
            )
            .await;
            let next = body_of(&channel, 1);
            append_settled(
                &app,
                &history,
                &key,
                &channel,
                Some("next"),
                &next,
                1,
                give_up,
            )
            .await;
            assert_eq!(
                settled_waitpoint_as(&app, &key, &second).await["output"],
                json!(next)
            );
            let bodies: Vec<String> = app
                .wait_for_records(&session, "in", 2, Duration::from_secs(30))
                .await
                .into_iter()
                .map(|record| record.data)
                .collect();
            assert_eq!(bodies, [body, next], "exactly one record per part id");
        });
    }
    join_all(sessions).await;
    let report = run
        .finish(
            "same_part_id",
            Some(&mut tap),
            "per session: 8 concurrent + 3 sequential + 3 later + 1 conflicting",
        )
        .await;
    assert_clean(&report);
    assert_eq!(report.duplicated, 0);
    assert_eq!(report.waitpoints, 2 * run.sessions.len());
    assert_eq!(report.waitpoints_waiting, 0);
    run.cleanup().await;
}

/// Polls a waitpoint (as `key`) until it is no longer WAITING, for up to 30 s.
async fn settled_waitpoint_as(app: &TestApp, key: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, waitpoint) = app.waitpoint_as(key, id).await;
        if waitpoint["status"] != json!("WAITING") || Instant::now() >= deadline {
            return waitpoint;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fetches the `sessions_worker_*` counters a worker exposes on `/metrics`.
async fn worker_counters(client: &reqwest::Client, port: u16) -> String {
    let Ok(response) = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
    else {
        return "unreachable".into();
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| {
            line.starts_with("sessions_worker_commands_total")
                || line.starts_with("sessions_worker_claims_contended_total")
        })
        .map(|line| line.replace("sessions_worker_", ""))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Claim expiry. Two workers with a 300 ms claim TTL (`SESSIONS_CLAIM_TTL_MS`) and a 2 s AMQP heartbeat;
/// producers re-send every second append (client retries, same part id). Mid-load worker 0 is
/// paused with SIGSTOP for 6 s (soak: each worker in turn, 4 pauses): its claims expire, the
/// broker declares it dead after missed heartbeats and hands its unacknowledged message and its
/// partitions to worker 1, which applies them and the retries; then SIGCONT lets the paused
/// holder resume with its stale view (finish or retry its transaction, fail its ack, reconnect).
/// Checker clean: the database fences decide, not the claims.
///
/// What is not faithful: the pause is not synchronised with a claim being held or a transaction
/// being open at that instant. Under continuous load the worker spends most of its time inside a
/// batch, so the pause usually lands there, but a run where it did not is indistinguishable from
/// outside (the printed worker counters show the duplicates and contended claims each worker
/// saw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_expiry_of_a_paused_holder() {
    let app = TestApp::spawn_with(without_worker()).await;
    let ports = [free_port(), free_port()];
    let settings: Vec<Settings> = (0..2)
        .map(|index| {
            let mut settings = worker_settings(&app.settings, index, 2);
            settings.amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=2".into();
            settings.claim_ttl = Duration::from_millis(300);
            settings.worker_http_addr = format!("127.0.0.1:{}", ports[usize::from(index)])
                .parse()
                .expect("address");
            settings
        })
        .collect();
    let workers: Vec<ChildWorker> = settings.iter().map(ChildWorker::spawn).collect();
    let plan = Plan::new(sized(40, 200))
        .waitpoints_every(8)
        .resend_every(2);
    let run = Run::new(app, &[], sized(16, 24), plan).await;
    let mut tap = EventTap::bind(&run.app.name).await;
    let producers = run.start();
    let pauses = sized(1, 4);
    for pause in 0..pauses {
        run.progress((pause + 1) as f64 / (pauses + 2) as f64).await;
        let worker = &workers[pause % 2];
        worker.signal("STOP");
        tokio::time::sleep(Duration::from_secs(6)).await;
        worker.signal("CONT");
    }
    join_all(producers).await;
    let mut counters = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        counters.push(format!(
            "worker{index}: {}",
            worker_counters(&run.app.client, *port).await
        ));
    }
    let report = run
        .finish(
            "claim_expiry",
            Some(&mut tap),
            &format!(
                "pauses={pauses} pause_seconds=6 claim_ttl_ms=300 [{}]",
                counters.join("; ")
            ),
        )
        .await;
    assert_clean(&report);
    assert_eq!(report.waitpoints_waiting, 0);
    for worker in workers {
        worker.kill_9().await;
    }
    run.cleanup().await;
}

/// Two environments with the same externalIds, producers in both at once, a waitpoint before
/// every second append: cross_env 0 (no record, completion or waitpoint visible in the other
/// environment), each waitpoint completed exactly once by its own environment's next record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waitpoints_across_two_environments_sharing_external_ids() {
    let app = TestApp::spawn().await;
    let plan = Plan::new(sized(40, 150)).waitpoints_every(2);
    let run = Run::new(app, &["prod"], sized(10, 20), plan).await;
    let mut tap = EventTap::bind(&run.app.name).await;
    join_all(run.start()).await;
    let report = run
        .finish("waitpoints_two_environments", Some(&mut tap), "")
        .await;
    assert_clean(&report);
    assert_eq!(report.cross_env, 0);
    assert_eq!(report.waitpoints_waiting, 0);
    assert_eq!(report.waitpoints, run.history.waitpoints().len());
    run.cleanup().await;
}

/// Crash between persist and drain. With a healthy worker, every session gets waitpoints spread
/// over the coming records (`lastSeqNum` absent, 2, 5, 8, …: each waits for a different
/// record). Then, while producers append, 10 rounds (soak: 40) of: a worker with
/// `SESSIONS_TEST_FAILPOINT=abort_after_commit` applies one batch and aborts right after its
/// commit (before events, replies and acks); a healthy worker replays that batch, runs for
/// 150 ms and is killed with SIGKILL. A last healthy worker finishes. Every waitpoint is
/// completed exactly once, by the right record, and its event reaches runners (the outbox
/// sweeper publishes what the aborted workers committed).
///
/// The healthy rounds are needed because the failpoint also fires when a batch only *replays*
/// the outcome of an already recorded append (a redelivery), so aborting workers in a row would
/// keep dying on the same redelivered message without committing anything new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_persist_and_drain() {
    let app = TestApp::spawn_with(without_worker()).await;
    let settings = app.settings.clone();
    let plan = Plan::new(sized(60, 200));
    // Sessions and waitpoints are created with a healthy worker (both wait for its reply).
    let setup = ChildWorker::spawn(&app.settings);
    let run = Run::new(app, &[], sized(10, 20), plan).await;
    let mut tap = EventTap::bind(&run.app.name).await;
    // `in` receives the appends whose number is not 3 mod 4.
    let in_records = (0..plan.appends).filter(|n| n % 4 != 3).count();
    let tenant = run.tenants[0].clone();
    for session in &run.sessions {
        let mut last_seq_nums: Vec<Option<i64>> = vec![None];
        last_seq_nums.extend(
            (2..in_records.saturating_sub(1))
                .step_by(3)
                .map(|last| Some(i64::try_from(last).expect("small"))),
        );
        for last in last_seq_nums {
            let mut body = json!({"session": session, "io": "in"});
            if let Some(last) = last {
                body["lastSeqNum"] = json!(last);
            }
            register(
                &run.app,
                &run.history,
                &tenant,
                session,
                "in",
                &body,
                Duration::from_secs(30),
            )
            .await
            .expect("waitpoint");
        }
    }
    setup.kill_9().await;
    let db = sea_orm::Database::connect(&run.app.settings.database_url)
        .await
        .expect("database");
    let producers = run.start();
    let crashes = sized(10, 40);
    let mut aborted = 0;
    let (mut records_by_aborted, mut completions_by_aborted) = (0, 0);
    for _ in 0..crashes {
        let before = records_and_completions(&db).await;
        let mut worker = ChildWorker::spawn_with(&settings, &[tests::ABORT_AFTER_COMMIT]);
        let exited = worker.exited_within(Duration::from_secs(10)).await;
        let after = records_and_completions(&db).await;
        records_by_aborted += after.0 - before.0;
        completions_by_aborted += after.1 - before.1;
        if !exited {
            // Nothing left to apply: the load is over.
            worker.kill_9().await;
            break;
        }
        aborted += 1;
        // A healthy worker replays the aborted batch and moves on a little (the next aborting
        // worker then commits fresh commands), and is killed with SIGKILL at a random point.
        let healthy = ChildWorker::spawn(&run.app.settings);
        tokio::time::sleep(Duration::from_millis(150)).await;
        healthy.kill_9().await;
    }
    let committed = format!(
        "records_committed_by_aborting_workers={records_by_aborted} \
         waitpoints_completed_by_aborting_workers={completions_by_aborted}"
    );
    let healthy = ChildWorker::spawn(&run.app.settings);
    join_all(producers).await;
    let report = run
        .finish(
            "crash_between_persist_and_drain",
            Some(&mut tap),
            &format!("aborted_workers={aborted}/{crashes} {committed}"),
        )
        .await;
    assert_clean(&report);
    assert_eq!(report.waitpoints_waiting, 0);
    assert_eq!(report.waitpoints, run.history.waitpoints().len());
    assert!(aborted > 0, "the failpoint never fired");
    healthy.kill_9().await;
    run.cleanup().await;
}

/// Records and completed waitpoints in the deployment's database.
async fn records_and_completions(db: &sea_orm::DatabaseConnection) -> (i64, i64) {
    use sea_orm::ConnectionTrait;
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT (SELECT count(*) FROM records)::bigint AS records, \
             (SELECT count(*) FROM waitpoints WHERE status = 'COMPLETED')::bigint AS completed",
        ))
        .await
        .expect("counts")
        .expect("one row");
    (
        row.try_get("", "records").expect("records"),
        row.try_get("", "completed").expect("completed"),
    )
}

/// Poison commands: undecodable messages published straight to every partition queue
/// (twice each) in the middle of the load are dead-lettered with their reason; everything else
/// of their partitions keeps flowing (checker clean).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_commands_are_dead_lettered_and_partitions_keep_flowing() {
    let app = TestApp::spawn().await;
    let plan = Plan::new(sized(40, 200)).waitpoints_every(10);
    let run = Run::new(app, &[], sized(16, 24), plan).await;
    let mut tap = EventTap::bind(&run.app.name).await;
    let producers = run.start();
    let link = shared::broker::BrokerLink::new(
        shared::broker::BrokerConfig::from_settings(
            &run.app.settings,
            "reliability-poison".into(),
            None,
        ),
        None,
    );
    let mut published = 0_usize;
    for round in 0..2 {
        run.progress((round + 1) as f64 / 4.0).await;
        for partition in 0..run.app.settings.partitions {
            link.publish_commands(
                partition,
                &format!("poison-{round}-{partition}"),
                None,
                b"\x00 not an envelope",
            )
            .await
            .expect("published");
            published += 1;
        }
    }
    join_all(producers).await;
    let mut letters = Vec::new();
    for _ in 0..100 {
        letters = tests::worker_admin(&run.app.settings, &["admin", "dead-letters", "list"]);
        if letters.len() >= published {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let with_reason = letters
        .iter()
        .filter(|letter| {
            letter["messageId"]
                .as_str()
                .is_some_and(|id| id.starts_with("poison-"))
                && letter["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("envelope"))
        })
        .count();
    let report = run
        .finish(
            "poison_commands",
            Some(&mut tap),
            &format!(
                "poison_published={published} dead_lettered={} with_reason={with_reason}",
                letters.len()
            ),
        )
        .await;
    assert_eq!(letters.len(), published, "{letters:?}");
    assert_eq!(with_reason, published, "{letters:?}");
    assert_clean(&report);
    assert_eq!(report.waitpoints_waiting, 0);
    link.close().await;
    run.cleanup().await;
}
