//! The Durable Streams reference: the `durable-streams` 0.1.5 server (crate `durable-streams`,
//! binary `durable-streams-server`) with `--durability wal` (an append is answered after a
//! group-commit `fdatasync` of its WAL record), driven by closed-loop HTTP appends.
//!
//! Protocol, from the crate's README and `src/handlers.rs`: every path but `/health` names a
//! stream; `PUT /<stream>` with a `Content-Type` creates it (201); `POST /<stream>` with the same
//! `Content-Type` and a non-empty body appends. An idempotent producer sends `Producer-Id`,
//! `Producer-Epoch` and `Producer-Seq` (per stream: the first seq is 0, then +1 each append; a
//! repeat is answered 204 without appending), answered 200 when accepted. Each client here is
//! one producer (`bench-<client>`, epoch 0) with its own sequence per stream, so every append
//! carries dedup headers as our `X-Part-Id` appends do.
//!
//! The binary is built by [`ensure_installed`] into an ignored folder (`target/bench-tools`),
//! never vendored. Its flags (`--host`, `--port`, `--data-dir`, `--durability wal|memory`) are
//! parsed by hand in its `src/main.rs`; it has no `--help`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::RngCore;

use super::report::{Latencies, ThroughputReport};

pub const CRATE: &str = "durable-streams";
pub const VERSION: &str = "0.1.5";
pub const BINARY: &str = "durable-streams-server";
const CONTENT_TYPE: &str = "application/octet-stream";
const READY_LIMIT: Duration = Duration::from_secs(15);

/// Returns `<root>/bin/durable-streams-server`, running
/// `cargo install --root <root> durable-streams --version 0.1.5 --locked` first if it is
/// missing (minutes: it builds with LTO in its own target directory).
pub fn ensure_installed(root: &Path) -> Result<PathBuf, String> {
    super::cargo_install(root, CRATE, VERSION, BINARY)
}

/// Starts `binary --durability wal` on a free loopback port with a fresh data directory,
/// creates `streams` streams, drives appends of `body_bytes` bytes with `connections`
/// closed-loop clients (client `c` appends to streams `c, c + 1, …` round robin) for
/// `duration`, then kills the server and removes its directory.
pub async fn run_durable_streams(
    binary: &Path,
    duration: Duration,
    connections: usize,
    streams: usize,
    body_bytes: usize,
) -> Result<ThroughputReport, String> {
    if connections == 0 || streams == 0 || body_bytes == 0 {
        return Err("durable-streams needs connections, streams and a body".into());
    }
    let directory = std::env::temp_dir().join(format!("ds-bench-{}", crate::unique_name()));
    let data = directory.join("data");
    std::fs::create_dir_all(&data)
        .map_err(|error| format!("creating {}: {error}", data.display()))?;
    let result = async {
        let mut server = Server::start(binary, &directory, &data).await?;
        let measured = measure(&server.url, duration, connections, streams, body_bytes).await;
        server.stop().await;
        measured
    }
    .await;
    let _ = std::fs::remove_dir_all(&directory);
    result
}

struct Server {
    child: tokio::process::Child,
    url: String,
}

impl Server {
    async fn start(binary: &Path, directory: &Path, data: &Path) -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| format!("finding a free port: {error}"))?
            .port();
        let log_path = directory.join("server.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|error| format!("creating {}: {error}", log_path.display()))?;
        let stderr = log
            .try_clone()
            .map_err(|error| format!("cloning the log handle: {error}"))?;
        let child = tokio::process::Command::new(binary)
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(data)
            .args(["--durability", "wal"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("starting {}: {error}", binary.display()))?;
        let mut server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let healthy = client
                .get(format!("{}/health", server.url))
                .send()
                .await
                .is_ok_and(|response| response.status().is_success());
            if healthy {
                return Ok(server);
            }
            let exited = server.child.try_wait().ok().flatten();
            if exited.is_some() || started.elapsed() > READY_LIMIT {
                server.stop().await;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "{BINARY} did not become ready ({exited:?}): {}",
                    log.trim()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

fn stream_path(stream: usize) -> String {
    format!("/bench-{stream}")
}

async fn measure(
    url: &str,
    duration: Duration,
    connections: usize,
    streams: usize,
    body_bytes: usize,
) -> Result<ThroughputReport, String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|error| format!("http client: {error}"))?;
    for stream in 0..streams {
        let response = client
            .put(format!("{url}{}", stream_path(stream)))
            .header("content-type", CONTENT_TYPE)
            .send()
            .await
            .map_err(|error| format!("creating stream {stream}: {error}"))?;
        if !response.status().is_success() {
            return Err(format!("creating stream {stream}: {}", response.status()));
        }
    }

    let mut body = vec![0_u8; body_bytes];
    rand::rng().fill_bytes(&mut body);
    let body: Arc<[u8]> = body.into();
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(connections);
    for connection in 0..connections {
        let client = client.clone();
        let url = url.to_owned();
        let body = body.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::default();
            let mut operations: u64 = 0;
            // This client's next Producer-Seq on each stream it writes.
            let mut sequences: Vec<u64> = vec![0; streams];
            let producer = format!("bench-{connection}");
            let mut stream = connection % streams;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let response = client
                    .post(format!("{url}{}", stream_path(stream)))
                    .header("content-type", CONTENT_TYPE)
                    .header("producer-id", producer.as_str())
                    .header("producer-epoch", "0")
                    .header("producer-seq", sequences[stream].to_string())
                    .body(body.to_vec())
                    .send()
                    .await;
                match response {
                    Ok(response) if response.status().is_success() => {
                        latencies.record(sent.elapsed());
                        operations += 1;
                        sequences[stream] += 1;
                    }
                    Ok(response) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(status = %response.status(), "durable-streams append failed");
                    }
                    Err(error) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%error, "durable-streams append failed");
                    }
                }
                stream = (stream + 1) % streams;
            }
            (operations, latencies)
        }));
    }
    let mut operations = 0;
    let mut latencies = Latencies::default();
    for task in tasks {
        let (client_operations, client_latencies) = task
            .await
            .map_err(|error| format!("a durable-streams client panicked: {error}"))?;
        operations += client_operations;
        latencies.merge(&client_latencies);
    }
    let elapsed = started.elapsed();
    let workload =
        format!("closed loop, {connections} clients, {streams} streams, {body_bytes} B, wal");
    Ok(ThroughputReport::new(
        "durable-streams",
        &workload,
        operations,
        errors.load(Ordering::Relaxed),
        elapsed,
        &latencies,
    ))
}
