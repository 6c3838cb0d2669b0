//! The documented proxy configuration works: Caddy (Debian's package, which `deploy/services.sh`
//! installs) runs `deploy/caddy/Caddyfile` with only the site address (a local certificate on
//! a free port), the upstream port and its own storage changed, in front of a production-path
//! api whose `SESSIONS_PUBLIC_URL` is the proxy's address; the official SDK's writer suite then
//! runs through it: HTTPS with ALPN h2 to Caddy, h2c from Caddy to the api, the append sessions'
//! full-duplex streams, the REST appends and every read.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tests::{SpawnOptions, TestApp, free_port};

const CADDY: &str = "/usr/bin/caddy";

/// Replaces `from` with `to` in the shipped file, failing if it is not there.
fn rewrite(config: &str, from: &str, to: &str) -> String {
    assert!(
        config.contains(from),
        "deploy/caddy/Caddyfile no longer contains {from:?}; update this test"
    );
    config.replace(from, to)
}

/// A `caddy` on free ports with its own storage directory (removed on drop).
struct Caddy {
    _child: tokio::process::Child,
    directory: PathBuf,
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

impl Caddy {
    fn start(name: &str, https_port: u16, api_port: u16) -> Self {
        assert!(
            Path::new(CADDY).exists(),
            "{CADDY} not found: install Debian's caddy package with `bash deploy/services.sh`"
        );
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/caddy/Caddyfile");
        let directory = std::env::temp_dir().join(format!("sessions-caddy-{name}"));
        std::fs::create_dir_all(&directory).expect("caddy directory");
        let config = std::fs::read_to_string(shipped).expect("Caddyfile");
        let config = rewrite(
            &config,
            "{\n\tservers {",
            &format!(
                "{{\n\tadmin off\n\tskip_install_trust\n\tstorage file_system {}\n\
                 \thttp_port {}\n\thttps_port {https_port}\n\tservers {{",
                directory.join("data").display(),
                free_port()
            ),
        );
        let config = rewrite(
            &config,
            "sessions.example.com {",
            &format!("https://localhost:{https_port} {{\n\ttls internal"),
        );
        let config = rewrite(
            &config,
            "h2c://127.0.0.1:3030",
            &format!("h2c://127.0.0.1:{api_port}"),
        );
        let path = directory.join("Caddyfile");
        std::fs::write(&path, config).expect("write Caddyfile");
        let log = std::fs::File::create(directory.join("caddy.log")).expect("log file");
        let child = tokio::process::Command::new(CADDY)
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&path)
            .env("XDG_DATA_HOME", directory.join("xdg-data"))
            .env("XDG_CONFIG_HOME", directory.join("xdg-config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("caddy starts");
        Self {
            _child: child,
            directory,
        }
    }

    /// The local CA that signed the site's certificate (once Caddy has made it).
    async fn root_certificate(&self) -> PathBuf {
        let root = self.directory.join("data/pki/authorities/local/root.crt");
        let started = Instant::now();
        while !root.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "caddy made no local CA: {}",
                std::fs::read_to_string(self.directory.join("caddy.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        root
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_writer_suite_passes_through_the_documented_caddy_configuration() {
    let https_port = free_port();
    let public_url = format!("https://localhost:{https_port}");
    let app = TestApp::spawn_with(SpawnOptions {
        overrides: &[("SESSIONS_PUBLIC_URL", public_url.as_str())],
        ..SpawnOptions::default()
    })
    .await;
    let api_port: u16 = app
        .address
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("api port");
    let caddy = Caddy::start(&app.name, https_port, api_port);
    let root = caddy.root_certificate().await;
    // Wait until the proxy answers through TLS (node checks the certificate against the CA).
    let started = Instant::now();
    loop {
        let probe = tokio::process::Command::new("node")
            .args([
                "-e",
                "fetch(process.argv[1]).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))",
            ])
            .arg(format!("{public_url}/healthz"))
            .env("NODE_EXTRA_CA_CERTS", &root)
            .status()
            .await
            .expect("node must be installed (Node.js 20+)");
        if probe.success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "caddy did not proxy /healthz"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let run = tests::node::run_suite_with(
        "writer.test.mjs",
        &public_url,
        &app.secret_key,
        &[("NODE_EXTRA_CA_CERTS", root.as_os_str())],
    )
    .await;
    drop(caddy);
    app.cleanup().await;
    assert!(
        run.passed,
        "every official writer test passed through the proxy"
    );
}
