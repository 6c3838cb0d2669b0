//! The shared test harness: spawn the api (in process) and workers (in process or as child
//! processes) against the real RabbitMQ, Postgres and Redis on 127.0.0.1, each test isolated by
//! its own database, broker name prefix and Redis key prefix.
//!
//! Shape after zero-to-production's `spawn_app`: [`TestApp::spawn`] returns typed helpers.
//! Call [`TestApp::cleanup`] at the end of a test: it stops the processes, deletes the broker
//! topology and drops the database. Leftovers of crashed runs are swept at the next start:
//! databases and partition logs (streams cannot expire on their own) older than two hours.

pub mod bench;
pub mod checker;
pub mod cluster;
pub mod events;
pub mod load;
pub mod node;
pub mod proxy;
pub mod sse;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};
use shared::config::Settings;
use shared::shutdown::CancellationToken;
use shared::storage::Store;

pub const POSTGRES_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=5";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// A unique, sortable name for one test's resources: `t<unix seconds>_<random>`.
pub fn unique_name() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let random: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(8)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect();
    format!("t{seconds}_{random}")
}

/// A memory field of `/proc/<pid>/status` (e.g. `VmRSS`, `VmHWM`) in MiB; 0 if unreadable.
pub fn process_memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The sum of every series of metric `name` (any labels) in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .fold(0.0, |total, value| total + value)
}

/// A loopback port that was free a moment ago (for child processes' listeners).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// Settings for an isolated test deployment named `name`.
pub fn test_settings(name: &str, overrides: &[(&str, &str)]) -> Settings {
    let mut variables: HashMap<String, String> = HashMap::from([
        (
            "DATABASE_URL".into(),
            format!("{POSTGRES_SERVER}/sessions_{name}"),
        ),
        ("AMQP_URL".into(), AMQP_URL.into()),
        ("REDIS_URL".into(), REDIS_URL.into()),
        ("SESSIONS_HTTP_ADDR".into(), "127.0.0.1:0".into()),
        ("SESSIONS_WORKER_HTTP_ADDR".into(), "127.0.0.1:0".into()),
        ("SESSIONS_PARTITIONS".into(), "8".into()),
        ("SESSIONS_BROKER_PREFIX".into(), name.into()),
        ("SESSIONS_REDIS_PREFIX".into(), name.into()),
        // Small partition logs: a test writes a few MB at most.
        ("SESSIONS_LOG_MAX_BYTES".into(), "67108864".into()),
        ("SESSIONS_LOG_SEGMENT_BYTES".into(), "4194304".into()),
        ("SESSIONS_CONFIRM_TIMEOUT_MS".into(), "3000".into()),
        ("SESSIONS_DB_MAX_CONNECTIONS".into(), "5".into()),
        // Suites not about rate limits must not depend on how fast this machine is;
        // tests/tests/rate_limits.rs sets its own limits.
        ("SESSIONS_RATE_LIMIT_PER_SECOND".into(), "0".into()),
    ]);
    for (key, value) in overrides {
        variables.insert((*key).into(), (*value).into());
    }
    // Invalid test settings are a bug in the test itself.
    Settings::from_lookup(|name| variables.get(name).cloned())
        .unwrap_or_else(|error| panic!("test settings: {error}"))
}

/// Settings of worker `index` of `count`, with a short standby delay and short leases.
pub fn worker_settings(base: &Settings, index: u16, count: u16) -> Settings {
    let mut settings = base.clone();
    settings.worker_index = index;
    settings.worker_count = count;
    settings.worker_standby_delay = Duration::from_millis(300);
    settings.partition_lease = Duration::from_millis(1500);
    settings
}

/// Runs `binary` (an admin command line) with `settings`, asserts it succeeded, and returns its
/// standard output as JSON lines (the admin commands print one JSON object per line).
pub fn run_cli_json_lines(
    binary: &std::path::Path,
    settings: &Settings,
    arguments: &[&str],
) -> Vec<serde_json::Value> {
    let output = std::process::Command::new(binary)
        .args(arguments)
        .envs(settings.to_env())
        .env("RUST_LOG", "warn")
        .output()
        .expect("the command line runs");
    assert!(
        output.status.success(),
        "{} {arguments:?} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// `sessions-worker admin …` with `settings`: its JSON lines.
pub fn worker_admin(settings: &Settings, arguments: &[&str]) -> Vec<serde_json::Value> {
    run_cli_json_lines(&workspace_binary("sessions-worker"), settings, arguments)
}

/// Messages ready (not delivered to a consumer) in `queue`, or `None` when it does not exist or
/// cannot be read. A passive declare of a missing queue closes its channel, so each read uses a
/// channel of its own.
pub async fn queue_message_count(connection: &lapin::Connection, queue: &str) -> Option<u32> {
    let channel = connection.create_channel().await.ok()?;
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = channel.close(200, "depth read".into()).await;
    Some(declared.message_count())
}

pub fn init_test_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            shared::telemetry::init_logging();
        }
    });
}

/// Drops test databases older than two hours (left by crashed runs).
async fn sweep_stale_databases() {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let Ok(maintenance) =
                sea_orm::Database::connect(format!("{POSTGRES_SERVER}/postgres")).await
            else {
                return;
            };
            use sea_orm::ConnectionTrait;
            let Ok(rows) = maintenance
                .query_all_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT datname FROM pg_database WHERE datname LIKE 'sessions\\_t%'",
                ))
                .await
            else {
                return;
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or(0);
            for row in rows {
                let Ok(name) = row.try_get::<String>("", "datname") else {
                    continue;
                };
                let created = name
                    .trim_start_matches("sessions_t")
                    .split('_')
                    .next()
                    .and_then(|seconds| seconds.parse::<u64>().ok());
                if created.is_some_and(|created| now.saturating_sub(created) > 7200) {
                    let _ = maintenance
                        .execute_unprepared(&format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        ))
                        .await;
                }
            }
        })
        .await;
}

/// Deletes partition logs of test prefixes older than two hours (left by crashed or failed
/// runs: streams cannot expire on their own). Lists queues with `rabbitmqctl`, at most once per
/// half hour on this machine (a marker file), since every test binary starts here.
async fn sweep_stale_streams() {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let marker = std::env::temp_dir().join("sessions-tests-stream-sweep");
            let recent = std::fs::metadata(&marker)
                .and_then(|meta| meta.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age < Duration::from_secs(1800));
            if recent {
                return;
            }
            let _ = std::fs::write(&marker, b"");
            let Ok(output) = tokio::process::Command::new("rabbitmqctl")
                .args(["list_queues", "name", "-q", "--no-table-headers"])
                .stdin(Stdio::null())
                .output()
                .await
            else {
                return;
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or(0);
            let stale: Vec<String> = String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(str::trim)
                .filter(|name| {
                    // Tests' names, and the benchmark's (`bench_t…`).
                    let name = name.strip_prefix("bench_").unwrap_or(name);
                    name.strip_prefix('t')
                        .and_then(|rest| rest.split('_').next())
                        .and_then(|seconds| seconds.parse::<u64>().ok())
                        .is_some_and(|created| now.saturating_sub(created) > 7200)
                })
                .map(str::to_owned)
                .collect();
            if stale.is_empty() {
                return;
            }
            let Ok(connection) =
                lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await
            else {
                return;
            };
            if let Ok(channel) = connection.create_channel().await {
                for queue in stale {
                    let _ = channel
                        .queue_delete(
                            queue.as_str().into(),
                            lapin::options::QueueDeleteOptions::default(),
                        )
                        .await;
                }
            }
            let _ = connection.close(200, "swept".into()).await;
        })
        .await;
}

/// Drops a test database.
pub async fn drop_database(database_url: &str) {
    let Some((_, name)) = database_url.rsplit_once('/') else {
        return;
    };
    if let Ok(maintenance) = sea_orm::Database::connect(format!("{POSTGRES_SERVER}/postgres")).await
    {
        use sea_orm::ConnectionTrait;
        let _ = maintenance
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
}

/// An in-process worker.
pub struct InProcessWorker {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl InProcessWorker {
    pub async fn spawn(settings: Settings) -> Self {
        let worker = worker::Worker::build(settings)
            .await
            .expect("worker builds");
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until_stopped(stop.clone()));
        Self { stop, handle }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.handle).await;
    }
}

/// Path of a workspace binary next to the test executable. `cargo nextest run --workspace`
/// builds `sessions-api` and `sessions-worker` there, because their packages have integration
/// tests (`api/tests/cli.rs`, `worker/tests/binary.rs`).
pub fn workspace_binary(binary: &str) -> PathBuf {
    let executable = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<binary>
    let path = executable
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile directory")
        .join(binary);
    assert!(
        path.exists(),
        "{} not found: run the suite with `cargo nextest run --workspace`",
        path.display()
    );
    path
}

/// An api running as a child process on its own loopback port, with `settings`.
pub struct ChildApi {
    child: tokio::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// What the process wrote to stderr (its warnings and errors), collected as it runs.
    stderr: Arc<Mutex<String>>,
}

impl ChildApi {
    /// Starts `sessions-api` with `settings` and waits until it answers `/healthz`.
    pub async fn spawn(settings: &Settings) -> Self {
        Self::spawn_with(settings, &[]).await
    }

    /// Same, with extra or replaced configuration variables.
    pub async fn spawn_with(settings: &Settings, overrides: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncReadExt;
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let mut child = tokio::process::Command::new(workspace_binary("sessions-api"))
            .envs(settings.to_env())
            .envs(overrides.iter().copied())
            .env("SESSIONS_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("SESSIONS_MODE", "production")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("api process starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr pipe");
        let collected = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = [0_u8; 4096];
            while let Ok(read) = pipe.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
                collected
                    .lock()
                    .expect("stderr buffer")
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
        let client = reqwest::Client::new();
        // Generous: a start migrates the database, and the suite runs many tests at once on a
        // small machine.
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if client.get(format!("{url}/healthz")).send().await.is_ok() {
                return Self { child, url, stderr };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the api process exited ({status}) before answering /healthz: {}",
                    stderr.lock().expect("stderr buffer")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the api process never answered /healthz within 60 s: {}",
            stderr.lock().expect("stderr buffer")
        );
    }

    /// The process id (for reading what it spends from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the api process runs")
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The failpoint that makes a worker abort right after committing a batch that appended
/// records (before its events, replies and acknowledgements): pass it to
/// [`ChildWorker::spawn_with`]. The worker binary has it only when built with its
/// `test-failpoints` feature, which this harness's dependency turns on.
pub const ABORT_AFTER_COMMIT: (&str, &str) = ("SESSIONS_TEST_FAILPOINT", "abort_after_commit");

/// A worker running as a child process (so that tests can `kill -9` it, pause it, or watch it
/// exit).
pub struct ChildWorker {
    child: tokio::process::Child,
}

impl ChildWorker {
    pub fn spawn(settings: &Settings) -> Self {
        Self::spawn_with(settings, &[])
    }

    /// Same, with extra or replaced environment variables (e.g. [`ABORT_AFTER_COMMIT`]).
    pub fn spawn_with(settings: &Settings, extra: &[(&str, &str)]) -> Self {
        let binary = workspace_binary("sessions-worker");
        let mut command = tokio::process::Command::new(binary);
        command
            .envs(settings.to_env())
            .envs(extra.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        Self {
            child: command.spawn().expect("worker process starts"),
        }
    }

    /// SIGKILL: no chance to finish, ack or clean up (a paused worker is killed too).
    pub async fn kill_9(mut self) {
        self.signal("CONT");
        let _ = self.child.kill().await;
    }

    /// Sends a signal (`STOP`, `CONT`, …) with kill(1).
    pub fn signal(&self, name: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args([format!("-{name}"), pid.to_string()])
                .status();
        }
    }

    /// Whether the process exited within `timeout`.
    pub async fn exited_within(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_ok_and(|status| status.is_ok())
    }

    /// SIGTERM, then waits for the exit status (graceful shutdown).
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.child.wait().await.expect("worker exit status")
    }
}

/// One record as the records route returns it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub data: String,
    pub id: String,
    pub seq_num: i64,
}

/// A running api (in process) with a worker, a fresh environment and typed request helpers.
pub struct TestApp {
    pub name: String,
    pub settings: Settings,
    pub address: String,
    pub client: reqwest::Client,
    pub secret_key: String,
    pub environment_id: String,
    pub store: Store,
    api_stop: CancellationToken,
    api_handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    pub worker: Option<InProcessWorker>,
    /// The data directory of an embedded server (`None`: the production path).
    pub embedded_data_dir: Option<PathBuf>,
}

/// How [`TestApp::spawn_with`] sets things up.
#[derive(Default)]
pub struct SpawnOptions<'a> {
    /// Extra or replaced configuration variables for both api and worker.
    pub overrides: &'a [(&'a str, &'a str)],
    /// AMQP URL of the api only (e.g. through a [`proxy::TcpProxy`]).
    pub api_amqp_url: Option<String>,
    /// Postgres server URL of the api only, without the database name (e.g. through a
    /// [`proxy::TcpProxy`]); the database name stays the test's own.
    pub api_postgres_server: Option<String>,
    /// Do not start an in-process worker.
    pub without_worker: bool,
}

/// Spawn options for a test that starts its workers itself (child processes).
pub fn without_worker() -> SpawnOptions<'static> {
    SpawnOptions {
        without_worker: true,
        ..SpawnOptions::default()
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(SpawnOptions::default()).await
    }

    pub async fn spawn_with(options: SpawnOptions<'_>) -> Self {
        init_test_logging();
        sweep_stale_databases().await;
        sweep_stale_streams().await;
        let name = unique_name();
        let settings = test_settings(&name, options.overrides);
        let mut api_settings = settings.clone();
        if let Some(url) = options.api_amqp_url {
            api_settings.amqp_url = url;
        }
        if let Some(server) = options.api_postgres_server {
            api_settings.database_url = format!("{server}/sessions_{name}");
        }
        let application = api::Application::build(api_settings)
            .await
            .expect("api builds");
        let address = format!("http://{}", application.local_addr());
        let store = application.state().store.clone();
        let created = store
            .create_environment("test-project", "dev", &settings.master_key)
            .await
            .expect("environment");
        let api_stop = CancellationToken::new();
        let api_handle = tokio::spawn(application.run_until_stopped(api_stop.clone()));
        let worker = if options.without_worker {
            None
        } else {
            Some(InProcessWorker::spawn(settings.clone()).await)
        };
        Self {
            name,
            settings,
            address,
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
            secret_key: created.secret_key.expect("a new environment has a key"),
            environment_id: created.environment.public_id,
            store,
            api_stop,
            api_handle: Some(api_handle),
            worker,
            embedded_data_dir: None,
        }
    }

    /// The embedded default (one process, SQLite in `data_dir`, in-process broker, in-memory
    /// claims), with the same request helpers. Restarting on the same directory keeps the data
    /// and the development key.
    pub async fn spawn_embedded(data_dir: &std::path::Path) -> Self {
        Self::spawn_embedded_with(data_dir, &[]).await
    }

    /// The embedded default with extra or replaced configuration variables.
    pub async fn spawn_embedded_with(
        data_dir: &std::path::Path,
        overrides: &[(&str, &str)],
    ) -> Self {
        init_test_logging();
        let name = unique_name();
        let settings = test_settings(&name, overrides);
        let embedded = api::embedded::Embedded::build(settings, data_dir)
            .await
            .expect("embedded server builds");
        let settings = embedded.settings().clone();
        let address = format!("http://{}", embedded.local_addr());
        let secret_key = embedded.secret_key().to_owned();
        let environment_id = embedded.environment_id().to_owned();
        let store = Store::connect(&settings.database_url, 1)
            .await
            .expect("store");
        let api_stop = CancellationToken::new();
        let api_handle = tokio::spawn(embedded.run_until_stopped(api_stop.clone()));
        Self {
            name,
            settings,
            address,
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
            secret_key,
            environment_id,
            store,
            api_stop,
            api_handle: Some(api_handle),
            worker: None,
            embedded_data_dir: Some(data_dir.to_path_buf()),
        }
    }

    /// A second environment in the same deployment: its secret key.
    pub async fn create_environment(&self, slug: &str) -> String {
        self.store
            .create_environment("test-project", slug, &self.settings.master_key)
            .await
            .expect("environment")
            .secret_key
            .expect("new environment key")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// The api's `/metrics` text (in-process worker series included).
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn create_session_with(&self, key: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/sessions"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("create request")
    }

    /// Creates a session with this externalId and returns the response body (asserting 2xx).
    pub async fn create_session(&self, external_id: &str) -> Value {
        self.create_session_as(&self.secret_key, external_id).await
    }

    /// Creates (or returns) the session `external_id` with `key`; panics unless 2xx.
    pub async fn create_session_as(&self, key: &str, external_id: &str) -> Value {
        let response = self
            .create_session_with(
                key,
                json!({
                    "type": "chat.agent",
                    "externalId": external_id,
                    "taskIdentifier": "agent",
                    "triggerConfig": { "basePayload": { "chatId": external_id } },
                }),
            )
            .await;
        let status = response.status();
        let body: Value = response.json().await.expect("json body");
        assert!(status.is_success(), "create failed: {status} {body}");
        body
    }

    pub async fn append_as(
        &self,
        key: &str,
        session: &str,
        io: &str,
        body: &str,
        part_id: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url(&format!(
                "/realtime/v1/sessions/{}/{io}/append",
                encode_segment(session)
            )))
            .bearer_auth(key)
            .body(body.to_owned());
        if let Some(part_id) = part_id {
            request = request.header("X-Part-Id", part_id);
        }
        request.send().await.expect("append request")
    }

    pub async fn append(
        &self,
        session: &str,
        io: &str,
        body: &str,
        part_id: Option<&str>,
    ) -> reqwest::Response {
        self.append_as(&self.secret_key, session, io, body, part_id)
            .await
    }

    /// Every record of a channel, paging through the records route.
    pub async fn records(&self, session: &str, io: &str) -> Vec<Record> {
        self.records_at(&self.address, session, io).await
    }

    /// Every record of a channel read through the api at `base` (another instance of this
    /// app's deployment) with this app's secret key.
    pub async fn records_at(&self, base: &str, session: &str, io: &str) -> Vec<Record> {
        let mut all: Vec<Record> = Vec::new();
        loop {
            let mut url = format!(
                "{base}/realtime/v1/sessions/{}/{io}/records",
                encode_segment(session)
            );
            if let Some(last) = all.last() {
                url.push_str(&format!("?afterEventId={}", last.seq_num));
            }
            let response = self
                .client
                .get(url)
                .bearer_auth(&self.secret_key)
                .send()
                .await
                .expect("records request");
            assert!(
                response.status().is_success(),
                "records: {}",
                response.status()
            );
            let page: Value = response.json().await.expect("records json");
            let records: Vec<Record> =
                serde_json::from_value(page["records"].clone()).expect("records shape");
            if records.is_empty() {
                return all;
            }
            all.extend(records);
        }
    }

    /// Waits until a channel holds at least `count` records (or the timeout passes).
    pub async fn wait_for_records(
        &self,
        session: &str,
        io: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<Record> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.records(session, io).await;
            if records.len() >= count || Instant::now() >= deadline {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `POST /api/v1/runs/{run}/session-streams/wait` with `body`, as `key`.
    pub async fn wait_as(&self, key: &str, run: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(&format!(
                "/api/v1/runs/{}/session-streams/wait",
                encode_segment(run)
            )))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("wait request")
    }

    /// Registers a waitpoint and returns its id (asserting 200).
    pub async fn wait_on(&self, run: &str, body: Value) -> String {
        let response = self.wait_as(&self.secret_key, run, body).await;
        let status = response.status();
        let body: Value = response.json().await.expect("json");
        assert_eq!(status, 200, "wait failed: {body}");
        body["waitpointId"]
            .as_str()
            .expect("waitpointId")
            .to_owned()
    }

    /// `GET /api/v1/waitpoints/tokens/{id}` as `key`: (status, body).
    pub async fn waitpoint_as(&self, key: &str, id: &str) -> (u16, Value) {
        let response = self
            .client
            .get(self.url(&format!("/api/v1/waitpoints/tokens/{}", encode_segment(id))))
            .bearer_auth(key)
            .send()
            .await
            .expect("waitpoint request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Polls a waitpoint until its status is not WAITING (or the timeout passes).
    pub async fn settled_waitpoint(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, waitpoint) = self.waitpoint_as(&self.secret_key, id).await;
            if waitpoint["status"] != json!("WAITING") || Instant::now() >= deadline {
                return waitpoint;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The stored row of the session `external_id` of the test's environment (for tests that
    /// publish commands themselves, which need its internal id and partition).
    pub async fn session_row(&self, external_id: &str) -> shared::storage::Session {
        let environment = self
            .store
            .environment_by_public_id(&self.environment_id)
            .await
            .expect("environment lookup")
            .expect("the test's environment");
        self.store
            .find_session(
                environment.id,
                &shared::domain::SessionAddress::ExternalId(external_id.into()),
            )
            .await
            .expect("session lookup")
            .expect("session")
    }

    /// Opens an SSE tail with extra headers (e.g. `Last-Event-ID`, `Timeout-Seconds`).
    pub async fn subscribe(
        &self,
        session: &str,
        io: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        self.subscribe_at(&self.address, session, io, headers).await
    }

    /// Opens an SSE tail on the api at `address` (another instance of the same deployment).
    pub async fn subscribe_at(
        &self,
        address: &str,
        session: &str,
        io: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .client
            .get(format!(
                "{address}/realtime/v1/sessions/{}/{io}",
                encode_segment(session)
            ))
            .bearer_auth(&self.secret_key)
            .header("Accept", "text/event-stream");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("subscribe request")
    }

    /// Stops the api and worker, deletes the broker topology and drops the database.
    pub async fn cleanup(mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop().await;
        }
        self.api_stop.cancel();
        if let Some(handle) = self.api_handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
        }
        if self.embedded_data_dir.is_some() {
            // Nothing outside the data directory; the caller owns (and removes) it.
            return;
        }
        delete_broker_topology(&self.settings, &self.name).await;
        drop(self.store);
        drop_database(&self.settings.database_url).await;
    }
}

/// Deletes the exchanges and the partition logs of `settings`' broker prefix (best effort: a
/// broker that is away keeps them until the sweep of a later run).
pub async fn delete_broker_topology(settings: &Settings, name: &str) {
    let link = shared::broker::BrokerLink::new(
        shared::broker::BrokerConfig::from_settings(settings, format!("{name}-cleanup"), None),
        None,
    );
    let _ = link.delete_topology().await;
    link.close().await;
}

/// Percent-encodes a path segment (the client does `encodeURIComponent`).
pub fn encode_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                encoded.push(char::from(byte));
            }
            other => encoded.push_str(&format!("%{other:02X}")),
        }
    }
    encoded
}
