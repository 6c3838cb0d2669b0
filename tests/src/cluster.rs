//! The local three-node RabbitMQ cluster of `deploy/rabbitmq-cluster.sh`, for the tests that
//! lose a node (`tests/tests/broker_cluster.rs`) and for the benchmark's `--amqp-url`.
//!
//! Every operation goes through the script (node names, ports, data folders and the rabbitmq
//! user live there only). The machine's default broker on 5672 is never touched. Tests that
//! stop nodes hold [`ClusterLock`], a file lock shared by every test process, so that two of
//! them never take two nodes down at once (which would cost the quorum).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The three nodes, by the script's short names.
pub const NODES: [&str; 3] = ["a", "b", "c"];

fn script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("rabbitmq-cluster.sh")
}

/// Runs the script with `arguments` and returns its standard output (panics on failure).
pub fn run_script(arguments: &[&str]) -> String {
    let output = Command::new("bash")
        .arg(script())
        .args(arguments)
        .output()
        .expect("deploy/rabbitmq-cluster.sh runs");
    assert!(
        output.status.success(),
        "rabbitmq-cluster.sh {arguments:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `sessions-<node>@localhost`.
pub fn node_name(node: &str) -> String {
    format!("sessions-{node}@localhost")
}

/// The AMQP port of a node (5701–5703).
pub fn amqp_port(node: &str) -> u16 {
    match node {
        "a" => 5701,
        "b" => 5702,
        "c" => 5703,
        other => panic!("unknown cluster node {other}"),
    }
}

/// The short name of the node listening on AMQP `port`.
pub fn node_of_port(port: u16) -> Option<&'static str> {
    NODES.into_iter().find(|node| amqp_port(node) == port)
}

/// `AMQP_URL` listing the three nodes (`heartbeat=5`).
pub fn urls() -> String {
    NODES
        .iter()
        .map(|node| {
            format!(
                "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=5",
                amqp_port(node)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Held while a test may stop nodes: one such test at a time on this machine.
pub struct ClusterLock {
    _file: std::fs::File,
}

impl ClusterLock {
    /// Waits for the machine-wide lock, then brings the cluster up (idempotent: a node left
    /// stopped or killed by an earlier run is started and rejoins).
    pub async fn acquire() -> Self {
        let path = std::env::temp_dir().join("sessions-rabbitmq-cluster.lock");
        let file = tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .expect("lock file");
            file.lock().expect("cluster lock");
            file
        })
        .await
        .expect("lock task");
        start().await;
        Self { _file: file }
    }
}

/// `rabbitmq-cluster.sh start`, off the async threads.
pub async fn start() {
    tokio::task::spawn_blocking(|| run_script(&["start"]))
        .await
        .expect("start task");
}

/// `rabbitmqctl -n <node> …` through the script.
pub async fn ctl(node: &str, arguments: &[&str]) -> String {
    let mut all = vec!["ctl".to_owned(), node.to_owned()];
    all.extend(arguments.iter().map(|argument| (*argument).to_owned()));
    tokio::task::spawn_blocking(move || {
        let borrowed: Vec<&str> = all.iter().map(String::as_str).collect();
        run_script(&borrowed)
    })
    .await
    .expect("ctl task")
}

/// Which node leads each of the queues whose name starts with `prefix.`, asked on `via`:
/// node short name → queues.
pub async fn leaders(via: &str, prefix: &str) -> BTreeMap<String, Vec<String>> {
    let listed = ctl(
        via,
        &["-q", "list_queues", "--no-table-headers", "name", "leader"],
    )
    .await;
    let mut leaders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in listed.lines() {
        let mut columns = line.split_whitespace();
        let (Some(queue), Some(leader)) = (columns.next(), columns.next()) else {
            continue;
        };
        if !queue.starts_with(&format!("{prefix}.")) {
            continue;
        }
        let node = NODES
            .into_iter()
            .find(|node| leader == node_name(node))
            .map_or_else(|| leader.to_owned(), str::to_owned);
        leaders.entry(node).or_default().push(queue.to_owned());
    }
    leaders
}

/// The nodes `via` sees running.
pub async fn running_nodes(via: &str) -> Vec<String> {
    let status = ctl(via, &["-q", "cluster_status", "--formatter", "json"]).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
    status["running_nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|node| node.as_str())
                .filter_map(|name| NODES.into_iter().find(|node| node_name(node) == name))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The nodes holding a client connection whose name ends with `suffix` (e.g. `-consumer` for
/// workers' consumer connections), asked on `via`.
pub async fn nodes_of_connections(via: &str, suffix: &str) -> Vec<String> {
    let listed = ctl(
        via,
        &[
            "-q",
            "list_connections",
            "--no-table-headers",
            "port",
            "client_properties",
        ],
    )
    .await;
    listed
        .lines()
        .filter(|line| line.contains(&format!("{suffix}\"}}")))
        .filter_map(|line| line.split_whitespace().next()?.parse::<u16>().ok())
        .filter_map(node_of_port)
        .map(str::to_owned)
        .collect()
}

/// `rabbitmqctl stop_app` on `node`: the node closes its client connections and leaves the
/// cluster's running set; its VM stays up.
pub async fn stop_app(node: &str) {
    ctl(node, &["-q", "stop_app"]).await;
}

/// `kill -9` of the node's Erlang VM: no goodbye to clients or peers.
pub async fn kill_9(node: &str) {
    let node = node.to_owned();
    tokio::task::spawn_blocking(move || {
        let pid = run_script(&["pid", &node]).trim().to_owned();
        let status = Command::new("kill")
            .args(["-9", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -9 {pid}");
    })
    .await
    .expect("kill task");
}

/// Brings `node` back (start_app after [`stop_app`], a new VM after [`kill_9`]) and waits until
/// `via` sees it running in the cluster. Returns how long it took.
pub async fn bring_back(node: &str, via: &str) -> Duration {
    let started = Instant::now();
    start().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !running_nodes(via)
        .await
        .iter()
        .any(|running| running == node)
    {
        assert!(
            Instant::now() < deadline,
            "{node} did not rejoin the cluster"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    started.elapsed()
}

/// `rabbitmq-queues rebalance quorum` on `via`: moves quorum queue leaders so that every running
/// node leads about as many (a node that came back leads none until then).
pub async fn rebalance(via: &str) {
    let via = via.to_owned();
    tokio::task::spawn_blocking(move || run_script(&["queues", &via, "-q", "rebalance", "quorum"]))
        .await
        .expect("rebalance task");
}
