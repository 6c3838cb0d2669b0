//! `sessions-bench`: the project's benchmark (BENCHMARKS.md), with both references measured in
//! the same run. Start it through `tests/bench/run.sh` (services, release build, reference install,
//! plot); it expects `sessions-api` and `sessions-worker` next to its own executable.
//!
//! Every append goes to the `out` channel with the environment's secret key, and the SSE
//! readers tail `out`, except in one window. Per run: the maximum sustained append rate (closed
//! loop) with SSE readers, the latency at half that rate (open loop), the same on `in` (whose
//! appends answer after the worker applied them), the SSE fan-out at half rate (1,000
//! readers on 100 sessions, each checked for order and completeness), the duplicate cost (20 %
//! retries), the pipeline floor and the Durable Streams server, the writer workload (agents
//! appending over S2's protocol the way the official SDK's `out` writer does: max, half rate
//! with SSE readers, and the same max against s2-lite); the first run also sweeps the
//! offered rate for the curve. After the runs, once: the drain (the worker stopped while 200,000
//! appends are accepted, then restarted and timed until all are persisted). The summary is the
//! median over runs, with ratios to the references of the same run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::storage::{CountedTable, Store};
use tests::bench::durable_streams;
use tests::bench::floor::{FloorConfig, run_pipeline_floor};
use tests::bench::load::{Channel, LoadConfig, LoadResult, LoadSession, create_sessions, run_load};
use tests::bench::report::ThroughputReport;
use tests::bench::s2_lite;
use tests::bench::writer::{VisibilityReaders, WriterConfig, WriterStream, run_writers};

const USAGE: &str = "usage: sessions-bench [--runs N (3)] [--duration SECONDS (20)] \
[--sessions N (1000)] [--clients N (64)] [--readers N (100)] [--partitions N (8, the server's default)] \
[--fanout-readers N (1000; 0 skips the fan-out window)] [--fanout-sessions N (100)] \
[--purge-backlog N (0): sessions of 1,000 records the retention purge deletes in purge windows] \
[--purge-pairs N (3): control and purge max windows, alternating, with --purge-backlog] \
[--drain-records N (200000; 0 skips the drain)] [--tools DIR (target/bench-tools)] \
[--half-rate APPENDS_PER_SECOND (half the run's max): the offered rate of the append half-rate \
windows (`out`, `in`, fan-out; not the writer's), fixed so that two builds meet the same load] \
[--writers N (64; 0 skips the writer windows)] [--writer-batch N (100 records per frame)] \
[--json PATH (target/bench/latest.json)] [--markdown PATH] [--skip-references] \
[--amqp-url URL[,URL…] (the default broker; e.g. `deploy/rabbitmq-cluster.sh urls`)]";

#[derive(Debug)]
struct Options {
    runs: usize,
    duration: Duration,
    sessions: usize,
    clients: usize,
    readers: usize,
    partitions: usize,
    /// SSE readers of the fan-out window (0: no fan-out window).
    fanout_readers: usize,
    /// Sessions they tail (the first ones), as many readers on each.
    fanout_sessions: usize,
    /// Appends of the drain figure (0: no drain).
    drain_records: u64,
    /// Agents of the writer windows, one session each (0: no writer windows).
    writers: usize,
    /// Records per frame of the writer's closed loop.
    writer_batch: usize,
    /// The offered rate of the append half-rate windows (`None`: half of each run's max).
    half_rate: Option<f64>,
    tools: PathBuf,
    json: PathBuf,
    markdown: Option<PathBuf>,
    skip_references: bool,
    /// `AMQP_URL` of the api and worker (a list: a cluster).
    amqp_url: String,
    /// Sessions (1,000 records each) the retention purge deletes during the purge windows of
    /// the first run (0: no such windows, and no retention).
    purge_backlog: usize,
    /// Pairs of control and purge windows.
    purge_pairs: usize,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        runs: 3,
        duration: Duration::from_secs(20),
        sessions: 1000,
        clients: 64,
        readers: 100,
        partitions: 8,
        fanout_readers: 1000,
        fanout_sessions: 100,
        drain_records: 200_000,
        writers: 64,
        writer_batch: 100,
        half_rate: None,
        tools: PathBuf::from("target/bench-tools"),
        json: PathBuf::from("target/bench/latest.json"),
        markdown: None,
        skip_references: false,
        purge_backlog: 0,
        purge_pairs: 3,
        amqp_url: tests::AMQP_URL.into(),
    };
    let mut arguments = std::env::args().skip(1);
    while let Some(flag) = arguments.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        if flag == "--skip-references" {
            options.skip_references = true;
            continue;
        }
        let value = arguments
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag}: {value:?} is not a number"))
        };
        match flag.as_str() {
            "--runs" => options.runs = number()?.max(1),
            "--duration" => options.duration = Duration::from_secs(number()?.max(1) as u64),
            "--sessions" => options.sessions = number()?.max(1),
            "--clients" => options.clients = number()?.max(1),
            "--readers" => options.readers = number()?,
            "--partitions" => options.partitions = number()?.clamp(1, 1024),
            "--fanout-readers" => options.fanout_readers = number()?,
            "--fanout-sessions" => options.fanout_sessions = number()?.max(1),
            "--drain-records" => options.drain_records = number()? as u64,
            "--purge-backlog" => options.purge_backlog = number()?,
            "--purge-pairs" => options.purge_pairs = number()?.max(1),
            "--writers" => options.writers = number()?,
            "--writer-batch" => options.writer_batch = number()?.clamp(1, 1000),
            "--half-rate" => options.half_rate = Some(number()?.max(1) as f64),
            "--tools" => options.tools = PathBuf::from(value),
            "--json" => options.json = PathBuf::from(value),
            "--markdown" => options.markdown = Some(PathBuf::from(value)),
            "--amqp-url" => options.amqp_url = value,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(options)
}

/// A child process of the benchmark (api or worker), killed when dropped.
struct Service {
    child: std::process::Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// Peak resident memory (VmHWM) in MiB.
    fn peak_rss_mib(&self) -> f64 {
        tests::process_memory_mib(self.child.id(), "VmHWM")
    }
}

fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|error| error.to_string())?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it with `cargo build --release --workspace` (tests/bench/run.sh does)",
            path.display()
        ))
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|error| error.to_string())
}

fn start(binary: &Path, env: &[(String, String)]) -> Result<Service, String> {
    let child = std::process::Command::new(binary)
        .envs(
            env.iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )
        .env("RUST_LOG", "warn")
        .env("SESSIONS_MODE", "production")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|error| format!("start {}: {error}", binary.display()))?;
    Ok(Service { child })
}

async fn wait_ready(client: &reqwest::Client, url: &str) -> Result<(), String> {
    for _ in 0..300 {
        if let Ok(response) = client.get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{url} never became ready"))
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Keeps at least [`PURGE_WORK_READY`] backlog sessions closed and not yet purged, so that every
/// purge round finds a full page and starts the next one at once; returns whether the open
/// backlog ran out before `stop`.
async fn keep_purge_work_ready(
    db: sea_orm::DatabaseConnection,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<bool, String> {
    use sea_orm::ConnectionTrait;
    loop {
        let (closed, left) = Bench::purge_backlog_counts(&db).await?;
        if closed == left && closed < PURGE_WORK_READY {
            return Ok(true);
        }
        if closed < PURGE_WORK_READY {
            db.execute_unprepared(&format!(
                "UPDATE sessions SET closed_at = now() - interval '1 day', closed_reason = 'bench' \
                 WHERE id IN (SELECT id FROM sessions WHERE external_id LIKE 'purge-backlog-%' \
                 AND closed_at IS NULL LIMIT {})",
                PURGE_WORK_READY * 2 - closed
            ))
            .await
            .map_err(|error| format!("closing purge backlog sessions: {error}"))?;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => return Ok(false),
        }
    }
}

/// Closed, not yet purged backlog sessions the purge windows keep ready (three purge rounds).
const PURGE_WORK_READY: u64 = 300;

/// Everything one run measured.
#[derive(Debug, serde::Serialize)]
struct RunFigures {
    max: ThroughputReport,
    max_visible_p50_ms: f64,
    max_visible_p99_ms: f64,
    read_records_per_second: f64,
    backlog_at_end: i64,
    drain_seconds: f64,
    half: ThroughputReport,
    half_visible_p50_ms: f64,
    half_visible_p99_ms: f64,
    /// The half-rate window again on `in` (secret key): those appends answer after the worker
    /// applied them, with their `seq`, so their accept latency includes the apply.
    half_in: ThroughputReport,
    /// The SSE fan-out window (absent with `--fanout-readers 0`).
    fanout: Option<FanoutFigures>,
    duplicates: ThroughputReport,
    floor: Option<ThroughputReport>,
    durable_streams: Option<ThroughputReport>,
    /// The writer windows (absent with `--writers 0`).
    writer: Option<WriterFigures>,
    /// Max windows alternating without and with the retention purge deleting a backlog (first
    /// run, with `--purge-backlog`).
    while_purging: Option<PurgeFigures>,
    api_peak_rss_mib: f64,
    worker_peak_rss_mib: f64,
}

/// The purge A/B: control and purge windows, alternating.
#[derive(Debug, serde::Serialize)]
struct PurgeFigures {
    backlog_sessions: usize,
    windows: Vec<PurgeWindow>,
}

/// One max window of the purge A/B.
#[derive(Debug, serde::Serialize)]
struct PurgeWindow {
    /// Whether the retention purge was deleting backlog sessions during the window.
    purging: bool,
    max: ThroughputReport,
    /// Backlog sessions purged per second during the window (1,000 records each).
    sessions_purged_per_second: f64,
    /// The purge had work left at the end of the window (it ran throughout).
    purge_ran_throughout: bool,
}

impl PurgeFigures {
    /// Median appends/s of the purge windows over the median of the control windows.
    fn ratio(&self) -> Option<f64> {
        let rates = |purging: bool| {
            self.windows
                .iter()
                .filter(|window| window.purging == purging)
                .map(|window| window.max.per_second)
                .collect::<Vec<_>>()
        };
        let (purging, control) = (rates(true), rates(false));
        (!purging.is_empty() && !control.is_empty()).then(|| median(purging) / median(control))
    }
}

/// The writer windows of one run: records/s are records acknowledged (applied by the worker:
/// persisted), latencies are frame sent → ack, and send → SSE delivery for `visible`.
#[derive(Debug, serde::Serialize)]
struct WriterFigures {
    agents: usize,
    max: ThroughputReport,
    half: ThroughputReport,
    half_visible_p50_ms: f64,
    half_visible_p99_ms: f64,
    s2_lite: Option<ThroughputReport>,
}

/// The SSE fan-out window: open loop at half the max rate, appends to every session, readers
/// on the first sessions, each checked for order and completeness.
#[derive(Debug, serde::Serialize)]
struct FanoutFigures {
    readers: usize,
    sessions: usize,
    readers_per_session: usize,
    offered_per_second: f64,
    appends: ThroughputReport,
    /// Records delivered over all readers (window and settle), and per second of the window.
    records_delivered: u64,
    records_per_second: f64,
    visible_p50_ms: f64,
    visible_p99_ms: f64,
    readers_complete: usize,
    readers_out_of_order: usize,
    readers_complete_and_in_order: usize,
    /// Accepted records the readers did not receive, summed over readers.
    records_missing: u64,
    /// Time after the last answer until every reader had everything (or the settle limit).
    settle_seconds: f64,
}

impl std::fmt::Display for FanoutFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SSE fan-out: {} readers on {} sessions, {:.0} records/s delivered, visible p50 {:.2} ms p99 {:.2} ms, {} complete, {} out of order, {} records missing (settled in {:.2} s)",
            self.readers,
            self.sessions,
            self.records_per_second,
            self.visible_p50_ms,
            self.visible_p99_ms,
            self.readers_complete,
            self.readers_out_of_order,
            self.records_missing,
            self.settle_seconds
        )
    }
}

/// The drain figure: appends accepted while the worker was stopped, then the time from the
/// worker's start until every one is in the database.
#[derive(Debug, serde::Serialize)]
struct DrainFigures {
    /// `--drain-records`: the appends sent.
    offered: u64,
    /// The appends, answered by the api while the worker was stopped.
    appends: ThroughputReport,
    /// New appends accepted: the backlog the restarted worker persisted.
    records: u64,
    /// Worker start (process spawn) → first record of the backlog persisted.
    startup_seconds: f64,
    /// Worker start → every accepted record persisted.
    seconds: f64,
    /// `records / seconds` (start-up included).
    records_per_second: f64,
    /// `records / (seconds - startup_seconds)`.
    records_per_second_after_startup: f64,
    /// Peak RSS of the restarted worker.
    worker_peak_rss_mib: f64,
}

impl std::fmt::Display for DrainFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drain: {} records accepted with the worker stopped ({:.0}/s); restarted worker: first persisted after {:.2} s, all after {:.2} s ({:.0}/s, {:.0}/s after start-up)",
            self.records,
            self.appends.per_second,
            self.startup_seconds,
            self.seconds,
            self.records_per_second,
            self.records_per_second_after_startup
        )
    }
}

/// Appends the worker settled (committed) since it started, from its `/metrics`
/// (`sessions_worker_commands_total{kind="append",…}`, all outcomes); `None` while it does not
/// answer.
async fn appends_settled(client: &reqwest::Client, metrics_url: &str) -> Option<u64> {
    let response = client
        .get(metrics_url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let text = response.text().await.ok()?;
    let total: f64 = text
        .lines()
        .filter(|line| {
            line.starts_with("sessions_worker_commands_total{") && line.contains(r#"kind="append""#)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(total as u64)
}

struct Bench {
    options: Options,
    api_url: String,
    store: Store,
    sessions: Vec<LoadSession>,
    durable_streams_binary: Option<PathBuf>,
    s2_lite_binary: Option<PathBuf>,
    /// The writer agents' streams (initialized on first use) and this api's writer endpoint.
    writer_streams: Vec<WriterStream>,
    writer_endpoint: String,
    /// Unique appends (retries excluded) accepted so far: what the database must hold.
    expected_records: u64,
    database_url: String,
}

impl Bench {
    fn load(&self, rate: Option<f64>, retry_share: f64, duration: Duration) -> LoadConfig {
        self.load_on(Channel::Out, rate, retry_share, duration)
    }

    fn load_on(
        &self,
        channel: Channel,
        rate: Option<f64>,
        retry_share: f64,
        duration: Duration,
    ) -> LoadConfig {
        LoadConfig {
            api_url: self.api_url.clone(),
            clients: self.options.clients,
            rate,
            duration,
            retry_share,
            body_bytes: 256,
            channel,
            sse_readers: self.options.readers,
            readers_per_session: 1,
            settle: Duration::from_millis(500),
            max_appends: None,
            progress: true,
        }
    }

    /// The fan-out window at `rate`: every session appended to, readers on the first ones.
    async fn fanout(&mut self, rate: f64) -> Result<FanoutFigures, String> {
        let sessions = self.options.fanout_sessions.min(self.sessions.len());
        let per_session = (self.options.fanout_readers / sessions).max(1);
        let mut config = self.load(Some(rate), 0.0, self.options.duration);
        config.sse_readers = sessions * per_session;
        config.readers_per_session = per_session;
        config.settle = Duration::from_secs(5);
        let (result, _, _) = self
            .measure(
                &format!(
                    "fan-out: open loop at {rate:.0}/s to all {} sessions, {} SSE readers on {sessions} of them",
                    self.sessions.len(),
                    config.sse_readers
                ),
                &config,
            )
            .await?;
        let figures = FanoutFigures {
            readers: result.readers.len(),
            sessions,
            readers_per_session: per_session,
            offered_per_second: rate,
            appends: result.report("sessions", "fan-out: open loop at half rate"),
            records_delivered: result.records_read,
            records_per_second: result.records_read_per_second(),
            visible_p50_ms: result.visible.quantile_ms(0.5),
            visible_p99_ms: result.visible.quantile_ms(0.99),
            readers_complete: result.readers_complete(),
            readers_out_of_order: result.readers_out_of_order(),
            readers_complete_and_in_order: result.readers_complete_and_in_order(),
            records_missing: result.records_missing(),
            settle_seconds: result.settled_in.as_secs_f64(),
        };
        eprintln!("   {figures}");
        Ok(figures)
    }

    /// The drain figure: kills `worker`, appends `--drain-records` through the api (closed
    /// loop, every client), starts the worker again (same binary and environment) and times
    /// it until the database holds every accepted append. `worker` is the new one after.
    async fn drain(
        &mut self,
        worker: &mut Option<Service>,
        binary: &Path,
        env: &[(String, String)],
        metrics_url: &str,
    ) -> Result<DrainFigures, String> {
        let offered = self.options.drain_records;
        eprintln!(
            "== drain: worker stopped; {offered} appends, closed loop, {} clients",
            self.options.clients
        );
        // Killed (SIGKILL) and waited for.
        drop(worker.take());
        let mut config = self.load(None, 0.0, Duration::from_secs(900));
        config.sse_readers = 0;
        config.settle = Duration::ZERO;
        config.max_appends = Some(offered);
        let result = run_load(&config, &self.sessions).await?;
        let records = result.accepted - result.retries;
        let appends = result.report("sessions", "drain: appends, worker stopped");
        eprintln!("{appends}");
        let persisted_before = self.records_in_database().await?;
        self.expected_records += records;
        eprintln!("== drain: worker started; waiting for {records} records to be persisted");
        let client = reqwest::Client::new();
        let started = Instant::now();
        let restarted = worker.insert(start(binary, env)?);
        // The worker's settled-appends counter (incremented after each commit) is cheap to
        // poll often; the database (a count over every record) is asked once a second, and
        // decides when it is complete.
        let mut first = None;
        let mut database_asked: Option<Instant> = None;
        let mut printed = Instant::now();
        let seconds = loop {
            if started.elapsed() > Duration::from_secs(900) {
                return Err("the restarted worker did not drain the backlog within 900 s".into());
            }
            let settled = appends_settled(&client, metrics_url).await;
            if first.is_none() && settled.is_some_and(|settled| settled > 0) {
                first = Some(started.elapsed());
            }
            let metrics_done = settled.is_some_and(|settled| settled >= records);
            if metrics_done
                || database_asked.is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
            {
                let at = started.elapsed();
                database_asked = Some(Instant::now());
                let count = self.records_in_database().await?;
                if first.is_none() && count > persisted_before {
                    first = Some(at);
                }
                if count >= self.expected_records {
                    break at;
                }
            }
            if printed.elapsed() >= Duration::from_secs(1) {
                printed = Instant::now();
                eprintln!(
                    "  {:>5.1} s  {:>8} of {records} appends settled by the worker",
                    started.elapsed().as_secs_f64(),
                    settled.map_or("-".to_owned(), |settled| settled.to_string())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let seconds = seconds.as_secs_f64();
        let startup = first.map_or(seconds, |first| first.as_secs_f64());
        let figures = DrainFigures {
            offered,
            appends,
            records,
            startup_seconds: startup,
            seconds,
            records_per_second: records as f64 / seconds.max(1e-9),
            records_per_second_after_startup: records as f64 / (seconds - startup).max(1e-9),
            worker_peak_rss_mib: restarted.peak_rss_mib(),
        };
        eprintln!("{figures}");
        Ok(figures)
    }

    fn writer_config(&self, rate: Option<f64>) -> WriterConfig {
        WriterConfig {
            endpoint: self.writer_endpoint.clone(),
            basin: "sessions".into(),
            streams: self.writer_streams.clone(),
            rate,
            duration: self.options.duration,
            record_bytes: 100,
            linger: Duration::from_millis(100),
            batch_records: self.options.writer_batch,
            in_flight: 2,
            agents_per_connection: 8,
        }
    }

    /// PUT initialize of the first `--writers` sessions' `out`: their streams and tokens.
    async fn initialize_writers(&mut self) -> Result<(), String> {
        if !self.writer_streams.is_empty() {
            return Ok(());
        }
        let client = reqwest::Client::new();
        for session in self.sessions.iter().take(self.options.writers) {
            let response = client
                .put(format!(
                    "{}/realtime/v1/sessions/{}/out",
                    self.api_url, session.external_id
                ))
                .bearer_auth(&session.secret_key)
                .send()
                .await
                .map_err(|error| format!("initialize a writer: {error}"))?;
            if response.status().as_u16() != 202 {
                return Err(format!("initialize a writer: {}", response.status()));
            }
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_owned)
                    .ok_or_else(|| format!("initialize a writer: no {name}"))
            };
            self.writer_endpoint = header("x-s2-endpoint")?;
            self.writer_streams.push(WriterStream {
                name: header("x-s2-stream-name")?,
                token: header("x-s2-access-token")?,
            });
        }
        Ok(())
    }

    /// The writer windows: max (closed loop), half that rate (open loop, with SSE readers on
    /// a quarter of the agents' sessions), and the max workload against s2-lite.
    async fn writer_windows(&mut self) -> Result<WriterFigures, String> {
        self.initialize_writers().await?;
        let agents = self.writer_streams.len();
        let batch = self.options.writer_batch;
        let what = format!(
            "writer max: {agents} agents, closed loop, {batch} records of 100 B per frame, 2 frames in flight"
        );
        eprintln!("== {what}");
        let max = run_writers(&self.writer_config(None)).await?;
        let max_report = max.report("sessions", &what);
        eprintln!("{max_report}");
        let rate = max_report.per_second / 2.0;
        let what = format!(
            "writer half: open loop at {rate:.0} records/s, 100 ms linger, {agents} agents"
        );
        eprintln!("== {what}");
        let tailed: Vec<(String, String)> = self
            .sessions
            .iter()
            .take(agents.div_ceil(4))
            .map(|session| (session.external_id.clone(), session.secret_key.clone()))
            .collect();
        let readers = VisibilityReaders::open(&self.api_url, &tailed).await?;
        let half = run_writers(&self.writer_config(Some(rate))).await?;
        // Records acknowledged at the end of the window reach the readers within moments.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let visible = readers.finish();
        let half_report = half.report("sessions", &what);
        eprintln!(
            "{half_report}\n   visible p50 {:.2} ms p99 {:.2} ms over {} readers",
            visible.quantile_ms(0.5),
            visible.quantile_ms(0.99),
            tailed.len()
        );
        // Writer records are in the database now (acks come after the apply), also any whose
        // ack was lost at the end of a window: count from what is there.
        self.expected_records = self.records_in_database().await?;
        let s2_lite = match &self.s2_lite_binary {
            Some(binary) => {
                eprintln!("== s2-lite: the writer max workload");
                let result =
                    s2_lite::run_writers_on_s2_lite(binary, &self.writer_config(None)).await?;
                let report = result.report("s2-lite", "writer max: the same workload");
                eprintln!("{report}");
                Some(report)
            }
            None => None,
        };
        Ok(WriterFigures {
            agents,
            max: max_report,
            half: half_report,
            half_visible_p50_ms: visible.quantile_ms(0.5),
            half_visible_p99_ms: visible.quantile_ms(0.99),
            s2_lite,
        })
    }

    /// The purge backlog's sessions: (closed ones the purge has not deleted yet, all left).
    async fn purge_backlog_counts(db: &sea_orm::DatabaseConnection) -> Result<(u64, u64), String> {
        use sea_orm::ConnectionTrait;
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) FILTER (WHERE closed_at IS NOT NULL) AS closed, count(*) AS left \
                 FROM sessions WHERE external_id LIKE 'purge-backlog-%'",
            ))
            .await
            .map_err(|error| error.to_string())?
            .ok_or("no count")?;
        let count = |column: &str| {
            row.try_get::<i64>("", column)
                .map(|n| n as u64)
                .map_err(|error| error.to_string())
        };
        Ok((count("closed")?, count("left")?))
    }

    /// Waits until the worker has persisted every record the bench expects.
    async fn wait_until_persisted(&self) -> Result<(), String> {
        let started = Instant::now();
        while self.records_in_database().await? < self.expected_records {
            if started.elapsed() > Duration::from_secs(300) {
                return Err("the worker did not catch up within 300 s".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// What a running retention purge costs the closed loop, measured side by side: inserts
    /// `--purge-backlog` open sessions of 1,000 records each (the shape the append route
    /// writes), then alternates `--purge-pairs` pairs of max windows: a control window (the
    /// backlog sits there, nothing to purge) and a purge window (backlog sessions are closed a
    /// day ago, topped up so that the purge always has a full round of work, and deleted by the
    /// worker's purge while the load runs). Between windows the worker catches up and the purge
    /// finishes, so every window starts from the same state.
    async fn purge_alternation(&mut self) -> Result<PurgeFigures, String> {
        use sea_orm::ConnectionTrait;
        let backlog = self.options.purge_backlog;
        eprintln!("== inserting a purge backlog: {backlog} open sessions of 1,000 records");
        let db = sea_orm::Database::connect(&self.database_url)
            .await
            .map_err(|error| error.to_string())?;
        let statements = [
            format!(
                "INSERT INTO records (session_id, io, seq_num, environment_id, part_id, body, \
                 body_fingerprint, command_id, created_at, headers, body_is_envelope) \
                 SELECT md5('purge' || n)::uuid, 'out', g, md5('purge-env')::uuid, NULL, \
                 repeat('x', 100), encode(sha256(('b' || n || '-' || g)::bytea), 'hex'), \
                 gen_random_uuid(), now() - interval '2 days', NULL, false \
                 FROM generate_series(1, {backlog}) AS n, generate_series(0, 999) AS g"
            ),
            format!(
                "INSERT INTO sessions (id, friendly_id, environment_id, external_id, session_type, \
                 task_identifier, trigger_config, tags, created_at, updated_at, closed_at, \
                 closed_reason, next_seq_in, next_seq_out) \
                 SELECT md5('purge' || n)::uuid, 'session_purge' || n, md5('purge-env')::uuid, \
                 'purge-backlog-' || n, 'chat.agent', 'agent', '{{\"basePayload\": {{}}}}'::jsonb, \
                 '[]'::jsonb, now() - interval '2 days', now() - interval '2 days', \
                 NULL, NULL, 0, 1000 FROM generate_series(1, {backlog}) AS n"
            ),
            // A fresh planner view of the larger table for both kinds of window.
            "ANALYZE records, sessions".to_owned(),
        ];
        for statement in statements {
            db.execute_unprepared(&statement)
                .await
                .map_err(|error| format!("inserting the purge backlog: {error}"))?;
        }
        self.expected_records += backlog as u64 * 1_000;
        let clients = self.options.clients;
        let mut windows = Vec::new();
        for pair in 0..self.options.purge_pairs {
            let what = format!(
                "purge pair {}: control, closed loop, {clients} clients",
                pair + 1
            );
            eprintln!("== {what}");
            let result =
                run_load(&self.load(None, 0.0, self.options.duration), &self.sessions).await?;
            self.expected_records += result.accepted - result.retries;
            windows.push(PurgeWindow {
                purging: false,
                max: result.report("sessions", &what),
                sessions_purged_per_second: 0.0,
                purge_ran_throughout: false,
            });
            eprintln!("{}", windows.last().map(|w| &w.max).expect("pushed"));
            self.wait_until_persisted().await?;

            let what = format!(
                "purge pair {}: purging, closed loop, {clients} clients",
                pair + 1
            );
            eprintln!("== {what}");
            let (_, left_before) = Self::purge_backlog_counts(&db).await?;
            let (stop_topping_up, stopped) = tokio::sync::watch::channel(false);
            let top_up = tokio::spawn(keep_purge_work_ready(db.clone(), stopped));
            // The worker looks every 10 s when it found nothing the last time.
            let waited = Instant::now();
            while Self::purge_backlog_counts(&db).await?.1 == left_before {
                if waited.elapsed() > Duration::from_secs(30) {
                    return Err("the retention purge did not start within 30 s".into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (_, left_at_start) = Self::purge_backlog_counts(&db).await?;
            let result =
                run_load(&self.load(None, 0.0, self.options.duration), &self.sessions).await?;
            let (closed_at_end, left_at_end) = Self::purge_backlog_counts(&db).await?;
            let _ = stop_topping_up.send(true);
            let ran_out = top_up.await.map_err(|error| error.to_string())??;
            self.expected_records += result.accepted - result.retries;
            let purged_per_second =
                (left_at_start - left_at_end) as f64 / result.elapsed.as_secs_f64();
            let window = PurgeWindow {
                purging: true,
                max: result.report("sessions", &what),
                sessions_purged_per_second: purged_per_second,
                purge_ran_throughout: closed_at_end > 0 && !ran_out,
            };
            eprintln!(
                "{}\n   purge: {purged_per_second:.0} sessions/s ({:.0} records/s), work left at the end: {closed_at_end} sessions{}",
                window.max,
                purged_per_second * 1_000.0,
                if ran_out {
                    "; the backlog ran out during the window"
                } else {
                    ""
                }
            );
            windows.push(window);
            // Let the purge finish what was closed, then the worker catch up.
            let waited = Instant::now();
            while Self::purge_backlog_counts(&db).await?.0 > 0 {
                if waited.elapsed() > Duration::from_secs(600) {
                    return Err("the retention purge did not finish within 600 s".into());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let (_, left_after) = Self::purge_backlog_counts(&db).await?;
            self.expected_records -= (left_before - left_after) * 1_000;
            self.wait_until_persisted().await?;
        }
        Ok(PurgeFigures {
            backlog_sessions: backlog,
            windows,
        })
    }

    async fn records_in_database(&self) -> Result<u64, String> {
        self.store
            .count_rows(CountedTable::Records)
            .await
            .map_err(|error| error.to_string())
    }

    async fn measure(
        &mut self,
        what: &str,
        config: &LoadConfig,
    ) -> Result<(LoadResult, i64, f64), String> {
        eprintln!("== {what}");
        let result = run_load(config, &self.sessions).await?;
        self.expected_records += result.accepted - result.retries;
        let persisted = self.records_in_database().await?;
        let backlog = self.expected_records as i64 - persisted as i64;
        let drain_started = Instant::now();
        while self.records_in_database().await? < self.expected_records {
            if drain_started.elapsed() > Duration::from_secs(300) {
                return Err("the worker did not catch up within 300 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drain = drain_started.elapsed().as_secs_f64();
        let report = result.report("sessions", what);
        eprintln!("{report}");
        eprintln!(
            "   visible p50 {:.2} ms p99 {:.2} ms, SSE {:.0} records/s, backlog at end {backlog}, drained in {drain:.2} s",
            result.visible.quantile_ms(0.5),
            result.visible.quantile_ms(0.99),
            result.records_read_per_second()
        );
        Ok((result, backlog, drain))
    }

    async fn run_once(
        &mut self,
        run: usize,
        api: &Service,
        worker: &Service,
        sweep: &mut Vec<Value>,
    ) -> Result<RunFigures, String> {
        let duration = self.options.duration;
        let clients = self.options.clients;
        let (max, backlog, drain) = self
            .measure(
                &format!("max: closed loop, {clients} clients"),
                &self.load(None, 0.0, duration),
            )
            .await?;
        let max_rate = max.accepted as f64 / max.elapsed.as_secs_f64();
        let half_rate = self.options.half_rate.unwrap_or(max_rate / 2.0);
        let while_purging = if run == 0 && self.options.purge_backlog > 0 {
            Some(self.purge_alternation().await?)
        } else {
            None
        };
        let (half, _, _) = self
            .measure(
                &format!("half: open loop at {:.0}/s", half_rate),
                &self.load(Some(half_rate), 0.0, duration),
            )
            .await?;
        let (half_in, _, _) = self
            .measure(
                &format!("half on `in`: open loop at {:.0}/s", half_rate),
                &self.load_on(Channel::In, Some(half_rate), 0.0, duration),
            )
            .await?;
        let fanout = if self.options.fanout_readers > 0 {
            Some(self.fanout(half_rate).await?)
        } else {
            None
        };
        let (duplicates, _, _) = self
            .measure(
                &format!("20% retries: closed loop, {clients} clients"),
                &self.load(None, 0.2, duration),
            )
            .await?;
        let writer = if self.options.writers > 0 {
            Some(self.writer_windows().await?)
        } else {
            None
        };
        if run == 0 {
            for share in [0.2, 0.4, 0.6, 0.8, 1.0, 1.2] {
                let offered = max_rate * share;
                let (point, _, _) = self
                    .measure(
                        &format!("sweep: open loop at {offered:.0}/s"),
                        &self.load(Some(offered), 0.0, duration / 2),
                    )
                    .await?;
                sweep.push(json!({
                    "offered_per_second": offered,
                    "accepted_per_second": point.accepted as f64 / point.elapsed.as_secs_f64(),
                    "p50_ms": point.accept.quantile_ms(0.5),
                    "p99_ms": point.accept.quantile_ms(0.99),
                }));
            }
        }
        let floor = if self.options.skip_references {
            None
        } else {
            eprintln!("== pipeline floor");
            let report = run_pipeline_floor(&FloorConfig {
                // The floor opens plain connections: the first node of a list.
                amqp_url: self
                    .options
                    .amqp_url
                    .split(',')
                    .next()
                    .unwrap_or(tests::AMQP_URL)
                    .into(),
                redis_url: tests::REDIS_URL.into(),
                postgres_server: tests::POSTGRES_SERVER.into(),
                duration,
                publishers: clients,
                message_bytes: 256,
            })
            .await?;
            eprintln!("{report}");
            Some(report)
        };
        let durable = match &self.durable_streams_binary {
            Some(binary) => {
                eprintln!("== durable-streams --durability wal");
                let report =
                    durable_streams::run_durable_streams(binary, duration, clients, 100, 256)
                        .await?;
                eprintln!("{report}");
                Some(report)
            }
            None => None,
        };
        Ok(RunFigures {
            max_visible_p50_ms: max.visible.quantile_ms(0.5),
            max_visible_p99_ms: max.visible.quantile_ms(0.99),
            read_records_per_second: max.records_read_per_second(),
            backlog_at_end: backlog,
            drain_seconds: drain,
            max: max.report("sessions", "max: closed loop"),
            half_visible_p50_ms: half.visible.quantile_ms(0.5),
            half_visible_p99_ms: half.visible.quantile_ms(0.99),
            half: half.report("sessions", "half rate: open loop"),
            half_in: half_in.report("sessions", "half rate on `in`: open loop"),
            fanout,
            duplicates: duplicates.report("sessions", "20% retries"),
            floor,
            durable_streams: durable,
            writer,
            while_purging,
            api_peak_rss_mib: api.peak_rss_mib(),
            worker_peak_rss_mib: worker.peak_rss_mib(),
        })
    }
}

fn summarize(runs: &[RunFigures], drain: Option<&DrainFigures>) -> Value {
    let m = |pick: &dyn Fn(&RunFigures) -> f64| median(runs.iter().map(pick).collect());
    let floor = m(&|run| run.floor.as_ref().map_or(0.0, |report| report.per_second));
    let durable = m(&|run| {
        run.durable_streams
            .as_ref()
            .map_or(0.0, |report| report.per_second)
    });
    let max = m(&|run| run.max.per_second);
    let ratio = |reference: f64| (reference > 0.0).then(|| max / reference);
    let mut summary = json!({
        "runs": runs.len(),
        "appends_per_second": max,
        "accept_p50_ms_at_max": m(&|run| run.max.p50_ms),
        "accept_p99_ms_at_max": m(&|run| run.max.p99_ms),
        "accept_p50_ms_at_half": m(&|run| run.half.p50_ms),
        "accept_p99_ms_at_half": m(&|run| run.half.p99_ms),
        "accept_p50_ms_at_half_in": m(&|run| run.half_in.p50_ms),
        "accept_p99_ms_at_half_in": m(&|run| run.half_in.p99_ms),
        "visible_p50_ms_at_max": m(&|run| run.max_visible_p50_ms),
        "visible_p99_ms_at_max": m(&|run| run.max_visible_p99_ms),
        "visible_p50_ms_at_half": m(&|run| run.half_visible_p50_ms),
        "visible_p99_ms_at_half": m(&|run| run.half_visible_p99_ms),
        "appends_per_second_with_20pct_retries": m(&|run| run.duplicates.per_second),
        "sse_records_per_second": m(&|run| run.read_records_per_second),
        "backlog_at_end_of_max_window": m(&|run| run.backlog_at_end as f64),
        "drain_seconds_after_max_window": m(&|run| run.drain_seconds),
        "api_peak_rss_mib": runs.iter().map(|run| run.api_peak_rss_mib).fold(0.0, f64::max),
        "worker_peak_rss_mib": runs.iter().map(|run| run.worker_peak_rss_mib).fold(0.0, f64::max),
        "pipeline_floor_per_second": floor,
        "durable_streams_per_second": durable,
        "ratio_to_pipeline_floor": ratio(floor),
        "ratio_to_durable_streams": ratio(durable),
    });
    // Fan-out: rates and latencies are medians over runs; the reader checks are the worst run.
    let fanouts: Vec<&FanoutFigures> = runs.iter().filter_map(|run| run.fanout.as_ref()).collect();
    let fan = |pick: &dyn Fn(&FanoutFigures) -> f64| {
        (!fanouts.is_empty()).then(|| median(fanouts.iter().map(|fanout| pick(fanout)).collect()))
    };
    let fan_min = |pick: &dyn Fn(&FanoutFigures) -> usize| fanouts.iter().map(|f| pick(f)).min();
    let fan_max = |pick: &dyn Fn(&FanoutFigures) -> u64| fanouts.iter().map(|f| pick(f)).max();
    // The purge A/B (first run only).
    let purging = runs.first().and_then(|run| run.while_purging.as_ref());
    let extra = json!({
        "purge_backlog_sessions": purging.map(|purge| purge.backlog_sessions),
        "purge_windows": purging.map(|purge| &purge.windows),
        "appends_while_purging_ratio_to_control": purging.and_then(PurgeFigures::ratio),
        "fanout_readers": fanouts.first().map(|fanout| fanout.readers),
        "fanout_sessions": fanouts.first().map(|fanout| fanout.sessions),
        "fanout_appends_per_second": fan(&|fanout| fanout.appends.per_second),
        "fanout_records_per_second": fan(&|fanout| fanout.records_per_second),
        "fanout_visible_p50_ms": fan(&|fanout| fanout.visible_p50_ms),
        "fanout_visible_p99_ms": fan(&|fanout| fanout.visible_p99_ms),
        "fanout_readers_complete": fan_min(&|fanout| fanout.readers_complete),
        "fanout_readers_out_of_order": fan_max(&|fanout| fanout.readers_out_of_order as u64),
        "fanout_readers_complete_and_in_order":
            fan_min(&|fanout| fanout.readers_complete_and_in_order),
        "fanout_records_missing": fan_max(&|fanout| fanout.records_missing),
        "drain_records": drain.map(|drain| drain.records),
        "drain_appends_per_second_worker_stopped": drain.map(|drain| drain.appends.per_second),
        "drain_startup_seconds": drain.map(|drain| drain.startup_seconds),
        "drain_seconds": drain.map(|drain| drain.seconds),
        "drain_records_per_second": drain.map(|drain| drain.records_per_second),
        "drain_records_per_second_after_startup":
            drain.map(|drain| drain.records_per_second_after_startup),
        "drain_worker_peak_rss_mib": drain.map(|drain| drain.worker_peak_rss_mib),
    });
    if let (Value::Object(summary), Value::Object(extra)) = (&mut summary, extra) {
        summary.extend(extra);
    }
    let writers: Vec<&WriterFigures> = runs.iter().filter_map(|run| run.writer.as_ref()).collect();
    let wm = |pick: &dyn Fn(&WriterFigures) -> f64| {
        (!writers.is_empty()).then(|| median(writers.iter().map(|writer| pick(writer)).collect()))
    };
    let writer_max = wm(&|writer| writer.max.per_second);
    let s2_lite = wm(&|writer| {
        writer
            .s2_lite
            .as_ref()
            .map_or(0.0, |report| report.per_second)
    })
    .filter(|rate| *rate > 0.0);
    let extra = json!({
        "writer_agents": writers.first().map(|writer| writer.agents),
        "writer_records_per_second": writer_max,
        "writer_ack_p50_ms_at_max": wm(&|writer| writer.max.p50_ms),
        "writer_ack_p99_ms_at_max": wm(&|writer| writer.max.p99_ms),
        "writer_records_per_second_at_half": wm(&|writer| writer.half.per_second),
        "writer_ack_p99_ms_at_half": wm(&|writer| writer.half.p99_ms),
        "writer_visible_p50_ms_at_half": wm(&|writer| writer.half_visible_p50_ms),
        "writer_visible_p99_ms_at_half": wm(&|writer| writer.half_visible_p99_ms),
        "s2_lite_records_per_second": s2_lite,
        "s2_lite_ack_p99_ms_at_max":
            wm(&|writer| writer.s2_lite.as_ref().map_or(0.0, |report| report.p99_ms)),
        "writer_ratio_to_s2_lite": writer_max.zip(s2_lite).map(|(ours, theirs)| ours / theirs),
    });
    if let (Value::Object(summary), Value::Object(extra)) = (&mut summary, extra) {
        summary.extend(extra);
    }
    summary
}

fn markdown(
    options: &Options,
    summary: &Value,
    runs: &[RunFigures],
    drain: Option<&DrainFigures>,
    command: &str,
) -> String {
    let number = |key: &str| summary[key].as_f64().unwrap_or(0.0);
    let ratio = |key: &str| {
        summary[key]
            .as_f64()
            .map_or("not measured".to_owned(), |value| format!("{value:.2}×"))
    };
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|name| name.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mut text = format!(
        "## Latest run (generated by sessions-bench)\n\n\
         - Date: {date}\n- Machine: {machine}, {cores} cores (shared, noisy); everything (RabbitMQ, \
         Postgres, Redis, api, worker, load generator, references) on the same cores\n\
         - Command: `{command}`\n\
         - Workload: {sessions} sessions over 2 environments, 256-byte JSON appends with \
         `X-Part-Id` to the `out` channel with the environment's secret key, {clients} clients, \
         {readers} SSE readers tailing `out`, {partitions} partitions, {secs} s windows, medians of {runs} runs\n\n\
         | figure | value |\n|---|---|\n\
         | appends/s (closed loop, max) | {max:.0} |\n\
         | ratio to the pipeline floor (same run) | {floor_ratio} (floor {floor:.0}/s) |\n\
         | ratio to Durable Streams `--durability wal` (same run) | {ds_ratio} ({ds:.0}/s) |\n\
         | backlog at the end of the max window → drained in | {backlog:.0} records → {drain:.2} s |\n\
         | accept latency p50 / p99 at max | {a50:.2} / {a99:.2} ms |\n\
         | accept latency p50 / p99 at half rate | {h50:.2} / {h99:.2} ms |\n\
         | accept latency p50 / p99 at half rate on `in` (answered after the apply, with `seq`) | {i50:.2} / {i99:.2} ms |\n\
         | visible latency p50 / p99 at max | {v50:.2} / {v99:.2} ms |\n\
         | visible latency p50 / p99 at half rate | {vh50:.2} / {vh99:.2} ms |\n\
         | appends/s with 20 % retries | {dup:.0} |\n\
         | SSE records/s delivered to {readers} readers during the max window | {sse:.0} |\n\
         | peak RSS api / worker | {api_rss:.0} / {worker_rss:.0} MiB |\n",
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        sessions = options.sessions,
        clients = options.clients,
        readers = options.readers,
        partitions = options.partitions,
        secs = options.duration.as_secs(),
        runs = runs.len(),
        max = number("appends_per_second"),
        floor_ratio = ratio("ratio_to_pipeline_floor"),
        floor = number("pipeline_floor_per_second"),
        ds_ratio = ratio("ratio_to_durable_streams"),
        ds = number("durable_streams_per_second"),
        backlog = number("backlog_at_end_of_max_window"),
        drain = number("drain_seconds_after_max_window"),
        a50 = number("accept_p50_ms_at_max"),
        a99 = number("accept_p99_ms_at_max"),
        h50 = number("accept_p50_ms_at_half"),
        h99 = number("accept_p99_ms_at_half"),
        i50 = number("accept_p50_ms_at_half_in"),
        i99 = number("accept_p99_ms_at_half_in"),
        v50 = number("visible_p50_ms_at_max"),
        v99 = number("visible_p99_ms_at_max"),
        vh50 = number("visible_p50_ms_at_half"),
        vh99 = number("visible_p99_ms_at_half"),
        dup = number("appends_per_second_with_20pct_retries"),
        sse = number("sse_records_per_second"),
        api_rss = number("api_peak_rss_mib"),
        worker_rss = number("worker_peak_rss_mib"),
    );
    let (writer_rows, writer_workload) = writer_lines(options, summary);
    text.push_str(&writer_rows);
    text.push_str(fanout_and_drain_lines(options, summary, drain).trim_end());
    text.push_str(&format!("\n{writer_workload}\n"));
    text.push_str("### Every run\n\n```\n");
    for (index, run) in runs.iter().enumerate() {
        text.push_str(&format!(
            "run {}\n  {}\n  {}\n  {}\n  {}\n",
            index + 1,
            run.max,
            run.half,
            run.half_in,
            run.duplicates
        ));
        if let Some(fanout) = &run.fanout {
            text.push_str(&format!("  {}\n  {fanout}\n", fanout.appends));
        }
        if let Some(floor) = &run.floor {
            text.push_str(&format!("  {floor}\n"));
        }
        if let Some(durable) = &run.durable_streams {
            text.push_str(&format!("  {durable}\n"));
        }
        if let Some(writer) = &run.writer {
            text.push_str(&format!("  {}\n  {}\n", writer.max, writer.half));
            if let Some(s2_lite) = &writer.s2_lite {
                text.push_str(&format!("  {s2_lite}\n"));
            }
        }
    }
    if let Some(drain) = drain {
        text.push_str(&format!("after the runs\n  {}\n  {drain}\n", drain.appends));
    }
    text.push_str("```\n");
    text
}

/// The rows of the writer windows, and their workload line (which follows the table).
fn writer_lines(options: &Options, summary: &Value) -> (String, String) {
    if summary["writer_agents"].is_null() {
        return (
            "| writer (S2 protocol) | not measured |\n".into(),
            String::new(),
        );
    }
    let number = |key: &str| summary[key].as_f64().unwrap_or(0.0);
    let s2_lite = if summary["s2_lite_records_per_second"].is_null() {
        "not measured".to_owned()
    } else {
        format!(
            "{:.2}× (s2-lite {:.0} records/s, ack p99 {:.2} ms)",
            number("writer_ratio_to_s2_lite"),
            number("s2_lite_records_per_second"),
            number("s2_lite_ack_p99_ms_at_max")
        )
    };
    let rows = format!(
        "| writer records/s persisted (S2 protocol, closed loop, max) | {max:.0} |\n\
         | writer ack latency p50 / p99 at max | {a50:.2} / {a99:.2} ms |\n\
         | writer ratio to s2-lite (same workload, same run) | {s2_lite} |\n\
         | writer at half rate: records/s, ack p99, visible p50 / p99 | {half:.0}, {h99:.2} ms, {v50:.2} / {v99:.2} ms |\n",
        max = number("writer_records_per_second"),
        a50 = number("writer_ack_p50_ms_at_max"),
        a99 = number("writer_ack_p99_ms_at_max"),
        half = number("writer_records_per_second_at_half"),
        h99 = number("writer_ack_p99_ms_at_half"),
        v50 = number("writer_visible_p50_ms_at_half"),
        v99 = number("writer_visible_p99_ms_at_half"),
    );
    let workload = format!(
        "- Writer (per run, after the 20 % retries window): {agents} agents, one session's `out` \
         each (initialized with `PUT …/out`), appending over S2's protocol (`s2s/proto` append \
         sessions on HTTP/2, 8 agents per connection) as the SDK's writer does: records of 100 B \
         wrapped as `{{\"data\", \"id\"}}`; max: {batch} records per frame, 2 frames in flight per \
         agent; half: open loop at half that rate, each agent sending what it produced every \
         100 ms (the SDK's linger) at its own phase (agents spread over the linger, not in \
         lockstep), SSE readers on a quarter of the sessions. An ack means \
         applied (persisted); ack latency is frame sent → ack; visible is frame sent → SSE \
         delivery. s2-lite ({version}, `s2 lite --local-root`) gets the same max workload.\n",
        agents = number("writer_agents"),
        batch = options.writer_batch,
        version = s2_lite::VERSION,
    );
    (rows, workload)
}

/// The workload lines of the fan-out window and the drain, then their rows of the table
/// (which the caller's rows precede).
fn fanout_and_drain_lines(
    options: &Options,
    summary: &Value,
    drain: Option<&DrainFigures>,
) -> String {
    let number = |key: &str| summary[key].as_f64().unwrap_or(0.0);
    let mut rows = String::new();
    if summary["fanout_readers"].is_null() {
        rows.push_str("| SSE fan-out at half rate | not measured |\n");
    } else {
        rows.push_str(&format!(
            "| SSE fan-out at half rate: {readers} readers on {sessions} sessions, records/s delivered over all readers | {rate:.0} |\n\
             | fan-out visible latency p50 / p99 | {p50:.2} / {p99:.2} ms |\n\
             | fan-out readers complete / out of order (worst run) | {complete:.0} / {disorder:.0} of {readers} ({missing:.0} records missing) |\n",
            readers = number("fanout_readers"),
            sessions = number("fanout_sessions"),
            rate = number("fanout_records_per_second"),
            p50 = number("fanout_visible_p50_ms"),
            p99 = number("fanout_visible_p99_ms"),
            complete = number("fanout_readers_complete"),
            disorder = number("fanout_readers_out_of_order"),
            missing = number("fanout_records_missing"),
        ));
    }
    match drain {
        Some(drain) => rows.push_str(&format!(
            "| drain: {records} appends accepted with the worker stopped ({appends:.0}/s), worker restarted: first persisted / all persisted | {startup:.2} s / {seconds:.2} s |\n\
             | drain rate (from worker start / after start-up) | {rate:.0} / {after:.0} records/s |\n",
            records = drain.records,
            appends = drain.appends.per_second,
            startup = drain.startup_seconds,
            seconds = drain.seconds,
            rate = drain.records_per_second,
            after = drain.records_per_second_after_startup,
        )),
        None => rows.push_str("| drain after the worker was stopped | not measured |\n"),
    }
    let fanout_sessions = options.fanout_sessions.min(options.sessions);
    let per_session = (options.fanout_readers / fanout_sessions.max(1)).max(1);
    format!(
        "{rows}\n\
         - SSE fan-out (per run, after the half-rate window): open loop at half the max rate for \
         {secs} s, appends to all {sessions} sessions as in the other windows, \
         {per_session} SSE readers on each of the first {fanout_sessions} sessions; each reader \
         checks that seqNums rise by exactly 1 from the first record it saw and, after a settle \
         of up to 5 s, that it received every append accepted for its session in the window; \
         visible latency is send → delivered over all readers\n\
         - Drain (once, after the runs): the worker killed, {drain_records} appends through the \
         api (closed loop, {clients} clients, `out`, the same sessions), then the worker started \
         again (same binary and environment) and timed from its start until the database holds \
         every accepted append (first persisted record: start-up)\n\n",
        secs = options.duration.as_secs(),
        sessions = options.sessions,
        drain_records = options.drain_records,
        clients = options.clients,
    )
}

const SECTION_START: &str = "<!-- sessions-bench:start -->";
const SECTION_END: &str = "<!-- sessions-bench:end -->";

/// `document` with the text between the generated-section markers replaced by `section` (the
/// section is appended, with markers, when they are missing). The rest is written by people.
fn replace_generated_section(document: &str, section: &str) -> String {
    let generated = format!("{SECTION_START}\n{section}{SECTION_END}");
    match (document.find(SECTION_START), document.find(SECTION_END)) {
        (Some(start), Some(end)) if end > start => format!(
            "{}{generated}{}",
            &document[..start],
            &document[end + SECTION_END.len()..]
        ),
        _ => format!("{document}\n{generated}\n"),
    }
}

async fn bench(options: Options) -> Result<(), String> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let api_binary = sibling_binary("sessions-api")?;
    let worker_binary = sibling_binary("sessions-worker")?;
    let durable_streams_binary = if options.skip_references {
        None
    } else {
        Some(durable_streams::ensure_installed(&options.tools)?)
    };
    let s2_lite_binary = if options.skip_references || options.writers == 0 {
        None
    } else {
        Some(s2_lite::ensure_installed(&options.tools.join("s2"))?)
    };
    let name = tests::unique_name();
    let database_url = format!("{}/sessions_bench_{name}", tests::POSTGRES_SERVER);
    let store = Store::connect(&database_url, 2)
        .await
        .map_err(|error| format!("database: {error}"))?;
    let mut settings = tests::test_settings(&name, &[]);
    // What the api and the worker below use (the cleanup at the end declares the same topology
    // before it deletes it: any other queue argument would be refused, and nothing deleted).
    settings.amqp_url = options.amqp_url.clone();
    settings.broker_prefix = format!("bench_{name}");
    settings.partitions =
        u16::try_from(options.partitions).map_err(|_| "--partitions: at most 1024")?;
    let mut secret_keys = Vec::new();
    for environment in ["a", "b"] {
        let created = store
            .create_environment("bench", environment, &settings.master_key)
            .await
            .map_err(|error| format!("environment: {error}"))?;
        secret_keys.push(created.secret_key.ok_or("a new environment has a key")?);
    }
    let api_port = free_port()?;
    let worker_port = free_port()?;
    let env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), database_url.clone()),
        ("AMQP_URL".into(), settings.amqp_url.clone()),
        ("REDIS_URL".into(), tests::REDIS_URL.into()),
        (
            "SESSIONS_BROKER_PREFIX".into(),
            settings.broker_prefix.clone(),
        ),
        (
            "SESSIONS_REDIS_PREFIX".into(),
            settings.broker_prefix.clone(),
        ),
        (
            "SESSIONS_PARTITIONS".into(),
            settings.partitions.to_string(),
        ),
        (
            "SESSIONS_LOG_MAX_BYTES".into(),
            settings.log_max_bytes.to_string(),
        ),
        (
            "SESSIONS_LOG_SEGMENT_BYTES".into(),
            settings.log_segment_bytes.to_string(),
        ),
        // Rate limits are a policy cap per environment, not capacity: off while measuring it.
        ("SESSIONS_RATE_LIMIT_PER_SECOND".into(), "0".into()),
        // The purge windows close backlog sessions a day back; the bench's own stay open.
        (
            "SESSIONS_RETENTION_AFTER_CLOSE_SECONDS".into(),
            if options.purge_backlog > 0 {
                "3600"
            } else {
                "0"
            }
            .into(),
        ),
        ("SESSIONS_HTTP_ADDR".into(), format!("127.0.0.1:{api_port}")),
        (
            "SESSIONS_WORKER_HTTP_ADDR".into(),
            format!("127.0.0.1:{worker_port}"),
        ),
    ];
    let connections = options.fanout_readers + options.readers + options.clients;
    // The soft limit of open files of this process is inherited by the api and the worker.
    if let Some(limit) = shared::config::open_files_soft_limit()
        && limit < connections + 256
    {
        eprintln!(
            "sessions-bench: warning: the open files limit ({limit}) is low for {connections} connections (api and load generator each hold one per connection): raise it with `ulimit -n`"
        );
    }
    // `None` only between the drain's kill and restart.
    let mut worker = Some(start(&worker_binary, &env)?);
    let api = start(&api_binary, &env)?;
    let client = reqwest::Client::new();
    let api_url = format!("http://127.0.0.1:{api_port}");
    wait_ready(&client, &format!("{api_url}/readyz")).await?;
    wait_ready(&client, &format!("http://127.0.0.1:{worker_port}/readyz")).await?;
    eprintln!("== creating {} sessions", options.sessions);
    let sessions =
        create_sessions(&client, &api_url, &secret_keys, options.sessions, "bench").await?;
    let mut bench = Bench {
        options,
        api_url,
        store,
        sessions,
        durable_streams_binary,
        s2_lite_binary,
        writer_streams: Vec::new(),
        writer_endpoint: String::new(),
        expected_records: 0,
        database_url: database_url.clone(),
    };
    let mut runs = Vec::new();
    let mut sweep = Vec::new();
    let mut failure = None;
    for run in 0..bench.options.runs {
        eprintln!("==== run {} of {}", run + 1, bench.options.runs);
        let Some(current) = worker.as_ref() else {
            break;
        };
        match bench.run_once(run, &api, current, &mut sweep).await {
            Ok(figures) => runs.push(figures),
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    let mut drain = None;
    if failure.is_none() && bench.options.drain_records > 0 {
        let metrics_url = format!("http://127.0.0.1:{worker_port}/metrics");
        match bench
            .drain(&mut worker, &worker_binary, &env, &metrics_url)
            .await
        {
            Ok(figures) => drain = Some(figures),
            Err(error) => failure = Some(error),
        }
    }
    drop(api);
    drop(worker);
    // Every invocation removes its database, partition queues and exchanges, whether its runs
    // succeeded or not: quorum queues left on the broker would cost it CPU in the next
    // invocations (and skew an A/B comparison made of several). The api's reply queue (a
    // classic queue) expires by itself 5 min after the api is gone.
    tests::delete_broker_topology(&settings, &name).await;
    tests::drop_database(&database_url).await;
    if let Some(error) = failure {
        return Err(error);
    }
    let summary = summarize(&runs, drain.as_ref());
    let document = json!({
        "date": chrono::Utc::now().to_rfc3339(),
        "command": command,
        "summary": summary,
        "sweep": sweep,
        "runs": runs,
        "drain": drain,
    });
    if let Some(folder) = bench.options.json.parent() {
        std::fs::create_dir_all(folder).map_err(|error| error.to_string())?;
    }
    let pretty = serde_json::to_string_pretty(&document).map_err(|error| error.to_string())?;
    std::fs::write(&bench.options.json, pretty).map_err(|error| error.to_string())?;
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).unwrap_or_default()
    );
    if let Some(path) = &bench.options.markdown {
        let section = markdown(&bench.options, &summary, &runs, drain.as_ref(), &command);
        let existing = std::fs::read_to_string(path).unwrap_or_default();
        std::fs::write(path, replace_generated_section(&existing, &section))
            .map_err(|error| error.to_string())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(error) if error.is_empty() => {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("sessions-bench: {error}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match bench(options).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sessions-bench: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod checks {
    use super::*;

    #[test]
    fn the_generated_section_is_replaced_and_the_rest_kept() {
        let first = replace_generated_section("# Benchmarks\n\nnotes\n", "run 1\n");
        assert!(first.starts_with("# Benchmarks\n\nnotes\n"));
        assert!(first.contains(&format!("{SECTION_START}\nrun 1\n{SECTION_END}")));
        let second = replace_generated_section(&first, "run 2\n");
        assert!(second.contains("run 2\n") && !second.contains("run 1\n"));
        assert!(second.starts_with("# Benchmarks\n\nnotes\n"));
        assert_eq!(second.matches(SECTION_START).count(), 1);
    }

    fn options() -> Options {
        Options {
            runs: 1,
            duration: Duration::from_secs(20),
            sessions: 1000,
            clients: 64,
            readers: 100,
            partitions: 64,
            fanout_readers: 1000,
            fanout_sessions: 100,
            drain_records: 200_000,
            writers: 64,
            writer_batch: 100,
            half_rate: None,
            tools: PathBuf::new(),
            json: PathBuf::new(),
            markdown: None,
            skip_references: true,
            amqp_url: String::new(),
            purge_backlog: 0,
            purge_pairs: 3,
        }
    }

    fn report(workload: &str, per_second: f64) -> ThroughputReport {
        ThroughputReport {
            system: "sessions".into(),
            workload: workload.into(),
            operations: (per_second * 20.0) as u64,
            errors: 0,
            seconds: 20.0,
            per_second,
            p50_ms: 1.0,
            p99_ms: 2.0,
        }
    }

    #[test]
    fn the_summary_and_the_section_carry_the_fanout_and_drain_figures() {
        let run = RunFigures {
            max: report("max", 2000.0),
            max_visible_p50_ms: 1.0,
            max_visible_p99_ms: 2.0,
            read_records_per_second: 200.0,
            backlog_at_end: 0,
            drain_seconds: 0.0,
            half: report("half", 1000.0),
            half_visible_p50_ms: 1.0,
            half_visible_p99_ms: 2.0,
            half_in: report("half on in", 1000.0),
            fanout: Some(FanoutFigures {
                readers: 1000,
                sessions: 100,
                readers_per_session: 10,
                offered_per_second: 1000.0,
                appends: report("fan-out", 1000.0),
                records_delivered: 20_000,
                records_per_second: 1000.0,
                visible_p50_ms: 3.5,
                visible_p99_ms: 12.25,
                readers_complete: 1000,
                readers_out_of_order: 0,
                readers_complete_and_in_order: 1000,
                records_missing: 0,
                settle_seconds: 0.1,
            }),
            duplicates: report("retries", 1800.0),
            floor: None,
            durable_streams: None,
            writer: Some(WriterFigures {
                agents: 64,
                max: report("writer max", 30_000.0),
                half: report("writer half", 15_000.0),
                half_visible_p50_ms: 20.0,
                half_visible_p99_ms: 80.5,
                s2_lite: Some(report("s2-lite", 60_000.0)),
            }),
            while_purging: None,
            api_peak_rss_mib: 50.0,
            worker_peak_rss_mib: 40.0,
        };
        let drain = DrainFigures {
            offered: 200_000,
            appends: report("drain", 2500.0),
            records: 200_000,
            startup_seconds: 0.75,
            seconds: 40.0,
            records_per_second: 5000.0,
            records_per_second_after_startup: 5095.5,
            worker_peak_rss_mib: 60.0,
        };
        let summary = summarize(std::slice::from_ref(&run), Some(&drain));
        assert_eq!(summary["appends_per_second"], 2000.0);
        assert_eq!(summary["fanout_readers"], 1000);
        assert_eq!(summary["fanout_readers_complete"], 1000);
        assert_eq!(summary["fanout_readers_out_of_order"], 0);
        assert_eq!(summary["fanout_visible_p99_ms"], 12.25);
        assert_eq!(summary["drain_records"], 200_000);
        assert_eq!(summary["drain_seconds"], 40.0);
        assert_eq!(summary["drain_startup_seconds"], 0.75);
        assert_eq!(summary["writer_records_per_second"], 30_000.0);
        assert_eq!(summary["writer_ratio_to_s2_lite"], 0.5);
        assert_eq!(summary["writer_visible_p99_ms_at_half"], 80.5);
        let text = markdown(&options(), &summary, &[run], Some(&drain), "sessions-bench");
        assert!(text.contains("to the `out` channel with the environment's secret key"));
        assert!(text.contains("| fan-out visible latency p50 / p99 | 3.50 / 12.25 ms |"));
        assert!(text.contains("| 0.75 s / 40.00 s |"));
        assert!(text.contains("SSE fan-out: 1000 readers on 100 sessions"));
        assert!(text.contains(
            "| writer ratio to s2-lite (same workload, same run) | 0.50× (s2-lite 60000 records/s"
        ));
        if std::env::var_os("SHOW_SECTION").is_some() {
            eprintln!("{text}");
        }
        let skipped = summarize(&[], None);
        assert!(skipped["fanout_readers"].is_null() && skipped["drain_seconds"].is_null());
        let text = markdown(&options(), &skipped, &[], None, "sessions-bench");
        assert!(text.contains("| SSE fan-out at half rate | not measured |"));
        assert!(text.contains("| writer (S2 protocol) | not measured |"));
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert!((median(vec![3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!((median(vec![4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-9);
        assert!(median(Vec::new()).abs() < 1e-9);
    }
}
