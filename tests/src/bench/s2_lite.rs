//! The writer path's reference: s2-lite, the open-source S2 server that trigger.dev self-hosters
//! run next to the webapp (`s2 lite` of the `s2-cli` crate). It is built by [`ensure_installed`]
//! into an ignored folder (`target/bench-tools`), never vendored, started on a free loopback
//! port with a local data directory and a basin that creates streams on first append, and
//! driven by the same writer load generator ([`super::writer`]) over the same protocol.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::writer::{WriterConfig, WriterResult, WriterStream, run_writers};

pub const CRATE: &str = "s2-cli";
pub const VERSION: &str = "0.43.4";
pub const BINARY: &str = "s2";
/// The basin of the benchmark's streams.
pub const BASIN: &str = "bench-writers";
const READY_LIMIT: Duration = Duration::from_secs(30);

/// Returns `<root>/bin/s2`, running `cargo install --root <root> s2-cli --version 0.43.4
/// --locked` first if it is missing (many minutes on two cores: it is a large build).
pub fn ensure_installed(root: &Path) -> Result<PathBuf, String> {
    super::cargo_install(root, CRATE, VERSION, BINARY)
}

/// A running s2-lite, killed (and its directory removed) when dropped.
pub struct S2Lite {
    child: std::process::Child,
    directory: PathBuf,
    pub endpoint: String,
}

impl Drop for S2Lite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// Starts `s2 lite` on a free port with a fresh local root and the benchmark's basin.
pub async fn start(binary: &Path) -> Result<S2Lite, String> {
    let directory = std::env::temp_dir().join(format!("s2-lite-bench-{}", crate::unique_name()));
    let root = directory.join("data");
    std::fs::create_dir_all(&root)
        .map_err(|error| format!("creating {}: {error}", root.display()))?;
    let init = directory.join("init.json");
    let spec = serde_json::json!({
        "basins": [{ "name": BASIN, "config": { "create_stream_on_append": true } }]
    });
    std::fs::write(&init, spec.to_string())
        .map_err(|error| format!("writing {}: {error}", init.display()))?;
    let port = crate::free_port();
    let child = std::process::Command::new(binary)
        .arg("lite")
        .arg("--local-root")
        .arg(&root)
        .args(["--port", &port.to_string()])
        .arg("--init-file")
        .arg(&init)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|error| format!("starting s2 lite: {error}"))?;
    let server = S2Lite {
        child,
        directory,
        endpoint: format!("http://127.0.0.1:{port}/v1"),
    };
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let health = client
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await;
        if health.is_ok_and(|response| response.status().is_success()) {
            return Ok(server);
        }
        if started.elapsed() > READY_LIMIT {
            return Err("s2 lite did not become ready".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The writer workload `config` (its endpoint, basin and streams replaced) against s2-lite.
pub async fn run_writers_on_s2_lite(
    binary: &Path,
    config: &WriterConfig,
) -> Result<WriterResult, String> {
    let server = start(binary).await?;
    let mut config = config.clone();
    config.endpoint.clone_from(&server.endpoint);
    config.basin = BASIN.into();
    config.streams = (0..config.streams.len())
        .map(|agent| WriterStream {
            name: format!("sessions/bench-{agent}/out"),
            // s2-lite does not check tokens.
            token: "ignored".into(),
        })
        .collect();
    let result = run_writers(&config).await;
    drop(server);
    result
}
