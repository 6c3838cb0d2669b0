//! Runs a `node --test` file of `tests/js/` (the official client suites) against a running
//! service. Needs Node.js 20+ and npm; installs the locked packages on first use.

use std::path::PathBuf;
use std::process::Command;

/// What a suite printed, and whether every test passed.
#[derive(Debug)]
pub struct SuiteRun {
    pub stdout: String,
    pub passed: bool,
}

/// `tests/js`.
pub fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// `npm ci` in `tests/js` unless the official packages are installed already.
pub fn install_packages() {
    let dir = js_dir();
    let installed = ["core", "sdk"]
        .iter()
        .all(|package| dir.join("node_modules/@trigger.dev").join(package).exists());
    if !installed {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm must be installed (Node.js 20+)");
        assert!(status.success(), "npm ci failed");
    }
}

/// Runs `file` (one test at a time) with `SESSIONS_API_URL` and `SESSIONS_SECRET_KEY`, prints
/// its output, and says whether it exited 0 with no failed test.
pub async fn run_suite(file: &'static str, api_url: &str, secret_key: &str) -> SuiteRun {
    run_suite_with(file, api_url, secret_key, &[]).await
}

/// As [`run_suite`], with extra environment variables for node (e.g. `NODE_EXTRA_CA_CERTS`).
pub async fn run_suite_with(
    file: &'static str,
    api_url: &str,
    secret_key: &str,
    environment: &[(&str, &std::ffi::OsStr)],
) -> SuiteRun {
    let (api_url, secret_key) = (api_url.to_owned(), secret_key.to_owned());
    let environment: Vec<(String, std::ffi::OsString)> = environment
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    let output = tokio::task::spawn_blocking(move || {
        install_packages();
        Command::new("node")
            .args(["--test", "--test-concurrency=1", file])
            .current_dir(js_dir())
            .env("SESSIONS_API_URL", api_url)
            .env("SESSIONS_SECRET_KEY", secret_key)
            .envs(environment)
            .output()
            .expect("node must be installed (Node.js 20+)")
    })
    .await
    .expect("node run");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    let passed = output.status.success() && stdout.contains("# fail 0");
    SuiteRun { stdout, passed }
}
