//! The shipped Prometheus configuration works against real processes: a real `prometheus`
//! (Debian's package, which `deploy/services.sh` installs) loads `deploy/prometheus/prometheus.yml`
//! and `alerts.yml` with only the targets and the scrape interval changed, scrapes the api (in
//! this process) and a worker (a child process with its own metrics listener), and reports the
//! counts the test produced.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{ChildWorker, TestApp};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const APPENDS: u64 = 25;

use tests::free_port;

async fn get_when_up(client: &reqwest::Client, url: &str) -> reqwest::Response {
    for _ in 0..100 {
        if let Ok(response) = client.get(url).send().await {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never answered");
}

/// The sum of every sample of `metric` (any labels) in a Prometheus text exposition.
fn sum_of(exposition: &str, metric: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| {
            line.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Replaces `from` with `to` in the shipped configuration, failing if it is not there (the
/// test and deploy/compose.yaml rewrite the same strings).
fn rewrite(config: &str, from: &str, to: &str) -> String {
    assert!(
        config.contains(from),
        "deploy/prometheus/prometheus.yml no longer contains {from:?}; update this test"
    );
    config.replace(from, to)
}

/// A `prometheus` server on a free loopback port, with its configuration, data and log in a
/// directory of its own (removed on drop; the process is killed on drop).
struct Prometheus {
    child: tokio::process::Child,
    directory: PathBuf,
    base: String,
}

impl Prometheus {
    /// Fails (never skips) when the server is not installed.
    fn require_installed() {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} not found: install Debian's prometheus package with \
             `bash deploy/services.sh` (or `bash deploy/check.sh`)"
        );
    }

    fn start(name: &str, api: &str, worker: &str) -> Self {
        Self::require_installed();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
        let directory = std::env::temp_dir().join(format!("sessions-prometheus-{name}"));
        std::fs::create_dir_all(&directory).expect("prometheus directory");
        let config =
            std::fs::read_to_string(shipped.join("prometheus.yml")).expect("prometheus.yml");
        let config = rewrite(&config, "\"127.0.0.1:3032\"", &format!("\"{api}\""));
        let config = rewrite(&config, "\"127.0.0.1:3031\"", &format!("\"{worker}\""));
        let config = rewrite(&config, "scrape_interval: 15s", "scrape_interval: 1s");
        std::fs::write(directory.join("prometheus.yml"), config).expect("write config");
        // rule_files are relative to the configuration file: the shipped rules, unchanged.
        std::fs::copy(shipped.join("alerts.yml"), directory.join("alerts.yml")).expect("rules");
        let log = std::fs::File::create(directory.join("prometheus.log")).expect("log file");
        let port = free_port();
        let child = tokio::process::Command::new(PROMETHEUS)
            .arg(format!(
                "--config.file={}",
                directory.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                directory.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus starts");
        Self {
            child,
            directory,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.directory.join("prometheus.log")).unwrap_or_default()
    }

    /// The `data` of an HTTP API answer (`None` while the server is not up yet).
    async fn api(&self, client: &reqwest::Client, path: &str) -> Option<Value> {
        let response = client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    /// An instant query: its result vector as (labels, value) pairs.
    async fn query(&self, client: &reqwest::Client, promql: &str) -> Option<Vec<(Value, f64)>> {
        let data = self
            .api(
                client,
                &format!("/api/v1/query?query={}", tests::encode_segment(promql)),
            )
            .await?;
        data["result"].as_array().map(|samples| {
            samples
                .iter()
                .filter_map(|sample| {
                    let value = sample["value"][1].as_str()?.parse::<f64>().ok()?;
                    Some((sample["metric"].clone(), value))
                })
                .collect()
        })
    }

    /// Polls `promql` until `accept` holds for its result; panics with the last result and the
    /// server's log after `timeout`.
    async fn wait_for(
        &mut self,
        client: &reqwest::Client,
        promql: &str,
        timeout: Duration,
        accept: impl Fn(&[(Value, f64)]) -> bool,
    ) -> Vec<(Value, f64)> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            last = self.query(client, promql).await;
            if let Some(result) = &last
                && accept(result)
            {
                return result.clone();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "{promql} never gave the expected result; last: {last:?}\nprometheus log:\n{}",
            self.log()
        );
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

fn single_value(result: &[(Value, f64)]) -> Option<f64> {
    match result {
        [(_, value)] => Some(*value),
        _ => None,
    }
}

#[tokio::test]
async fn prometheus_with_the_shipped_config_scrapes_the_api_and_the_worker() {
    Prometheus::require_installed();
    // The api serves /metrics on a listener of its own, as the shipped configuration expects.
    let api_metrics_address = format!("127.0.0.1:{}", free_port());
    let app = TestApp::spawn_with(tests::SpawnOptions {
        without_worker: true,
        overrides: &[("SESSIONS_METRICS_ADDR", &api_metrics_address)],
        ..tests::SpawnOptions::default()
    })
    .await;
    let public_metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("public listener");
    assert_eq!(
        public_metrics.status(),
        404,
        "with SESSIONS_METRICS_ADDR, /metrics is not on the api listener"
    );
    let worker_address = format!("127.0.0.1:{}", free_port());
    let mut settings = app.settings.clone();
    settings.worker_http_addr = worker_address.parse().expect("address");
    let worker = ChildWorker::spawn(&settings);
    get_when_up(&app.client, &format!("http://{worker_address}/healthz")).await;

    // The first scrape installs this process's recorder; what the api counted before (other
    // tests, when several share the process) is the baseline.
    let metrics_before = app
        .client
        .get(format!("http://{api_metrics_address}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let accepted_before = sum_of(&metrics_before, "sessions_api_appends_accepted_total");

    app.create_session("scraped").await;
    for n in 0..APPENDS {
        let response = app
            .append("scraped", "in", &n.to_string(), Some(&format!("p{n}")))
            .await;
        assert_eq!(response.status(), 200, "append {n}");
    }
    let records = app
        .wait_for_records("scraped", "in", APPENDS as usize, Duration::from_secs(30))
        .await;
    assert_eq!(records.len() as u64, APPENDS);

    let mut prometheus = Prometheus::start(&app.name, &api_metrics_address, &worker_address);
    let client = &app.client;

    // Both jobs of the shipped configuration are up.
    prometheus
        .wait_for(client, "up", Duration::from_secs(60), |result| {
            ["sessions-api", "sessions-worker"].iter().all(|job| {
                result
                    .iter()
                    .any(|(labels, value)| labels["job"] == *job && *value == 1.0)
            })
        })
        .await;

    // The shipped rules loaded.
    let rules = prometheus
        .api(client, "/api/v1/rules")
        .await
        .expect("rules API");
    let names: Vec<&str> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .filter_map(|rule| rule["name"].as_str())
        .collect();
    for expected in [
        "SessionsWorkerDown",
        "SessionsDeadLetters",
        "SessionsPartitionsWithoutConsumer",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} not loaded: {names:?}"
        );
    }

    // Exactly the appends of this test (the api's count, scraped from the api).
    let expected = accepted_before + APPENDS as f64;
    let accepted = prometheus
        .wait_for(
            client,
            "sum(sessions_api_appends_accepted_total)",
            Duration::from_secs(30),
            |result| single_value(result) == Some(expected),
        )
        .await;
    assert_eq!(single_value(&accepted), Some(expected));

    // The worker applied them (and the create), counted by the worker process itself.
    let applied = prometheus
        .wait_for(
            client,
            r#"sum(sessions_worker_commands_total{job="sessions-worker", outcome="applied"})"#,
            Duration::from_secs(30),
            |result| single_value(result).is_some_and(|value| value >= APPENDS as f64),
        )
        .await;
    assert!(single_value(&applied).is_some_and(|value| value >= APPENDS as f64));

    // The worker's partition gauges, as the partitions alert reads them: one worker subscribes
    // to every partition, so the alert's condition is false.
    let partitions = f64::from(app.settings.partitions);
    prometheus
        .wait_for(
            client,
            "sum(sessions_worker_partitions_active)",
            Duration::from_secs(30),
            |result| single_value(result) == Some(partitions),
        )
        .await;
    let uncovered = prometheus
        .query(
            client,
            "sum(sessions_worker_partitions_active) < max(sessions_worker_partitions_total)",
        )
        .await
        .expect("query");
    assert!(uncovered.is_empty(), "{uncovered:?}");

    prometheus.stop().await;
    worker.kill_9().await;
    app.cleanup().await;
}
