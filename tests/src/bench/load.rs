//! The sessions load generator: appends of fixed-size JSON bodies with `X-Part-Id` to many
//! sessions over several environments, closed loop (each client sends its next append when the
//! previous one was answered) or open loop (a fixed schedule; latency counted from the
//! scheduled time, so a slow server cannot hide its queueing), an optional share of retries of
//! earlier part ids, and SSE readers that measure the time from send to delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::{Rng, SeedableRng};
use serde_json::json;

use super::report::{Latencies, ThroughputReport};
use crate::sse::SseReader;

/// One session of the workload and the secret key of its environment.
#[derive(Clone, Debug)]
pub struct LoadSession {
    pub secret_key: String,
    pub external_id: String,
}

/// The shape of one load run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub api_url: String,
    pub clients: usize,
    /// `None`: closed loop. `Some(rate)`: open loop at `rate` appends per second in total.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Share of requests (0.0–1.0) that resend an earlier append with the same `X-Part-Id`.
    pub retry_share: f64,
    pub body_bytes: usize,
    /// SSE readers, each tailing the `in` channel of one of the first sessions.
    pub sse_readers: usize,
    /// Print a progress line every second.
    pub progress: bool,
}

/// What a load run measured.
#[derive(Debug)]
pub struct LoadResult {
    /// Appends answered 2xx (after the publisher confirm).
    pub accepted: u64,
    /// Of those, resends of an earlier part id.
    pub retries: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub accept: Latencies,
    /// Send → delivered to an SSE reader, for the sessions with a reader.
    pub visible: Latencies,
    /// Records delivered to SSE readers in the window.
    pub records_read: u64,
}

impl LoadResult {
    pub fn report(&self, system: &str, workload: &str) -> ThroughputReport {
        ThroughputReport::new(
            system,
            workload,
            self.accepted,
            self.errors,
            self.elapsed,
            &self.accept,
        )
    }

    pub fn records_read_per_second(&self) -> f64 {
        self.records_read as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A JSON body of exactly `size` bytes (at least the fields need) carrying its send time.
pub fn append_body(sent_at_micros: u64, sequence: u64, size: usize) -> String {
    let head = json!({ "t": sent_at_micros, "n": sequence }).to_string();
    // `{"t":…,"n":…,"pad":"…"}`: the padding fills the rest.
    let fixed = head.len() - 1 + r#","pad":""}"#.len();
    let padding = size.saturating_sub(fixed);
    format!(
        r#"{},"pad":"{}"}}"#,
        &head[..head.len() - 1],
        "x".repeat(padding)
    )
}

/// The send time carried by a body made by [`append_body`].
pub fn sent_at_micros(body: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("t")?
        .as_u64()
}

/// Creates `count` sessions, spread round-robin over the environments of `secret_keys`.
pub async fn create_sessions(
    client: &reqwest::Client,
    api_url: &str,
    secret_keys: &[String],
    count: usize,
    prefix: &str,
) -> Result<Vec<LoadSession>, String> {
    let mut sessions = Vec::with_capacity(count);
    for n in 0..count {
        let secret_key = secret_keys[n % secret_keys.len()].clone();
        let external_id = format!("{prefix}-{n}");
        let response = client
            .post(format!("{api_url}/api/v1/sessions"))
            .bearer_auth(&secret_key)
            .json(&json!({
                "type": "chat.agent",
                "externalId": external_id,
                "taskIdentifier": "bench",
                "triggerConfig": { "basePayload": {} },
            }))
            .send()
            .await
            .map_err(|error| format!("create session: {error}"))?;
        if !response.status().is_success() {
            return Err(format!("create session: {}", response.status()));
        }
        sessions.push(LoadSession {
            secret_key,
            external_id,
        });
    }
    Ok(sessions)
}

/// Counters shared by the clients, for the progress line.
#[derive(Default)]
struct Progress {
    accepted: AtomicU64,
    errors: AtomicU64,
    read: AtomicU64,
}

struct ClientOutcome {
    accepted: u64,
    retries: u64,
    errors: u64,
    accept: Latencies,
}

/// Runs one load window against `sessions`.
pub async fn run_load(config: &LoadConfig, sessions: &[LoadSession]) -> Result<LoadResult, String> {
    if sessions.is_empty() || config.clients == 0 {
        return Err("a load run needs sessions and clients".into());
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.clients + config.sse_readers)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|error| error.to_string())?;
    let progress = Arc::new(Progress::default());
    let stop_readers = Arc::new(AtomicBool::new(false));

    let mut readers = tokio::task::JoinSet::new();
    for session in sessions.iter().take(config.sse_readers) {
        let response = client
            .get(format!(
                "{}/realtime/v1/sessions/{}/in",
                config.api_url, session.external_id
            ))
            .bearer_auth(&session.secret_key)
            .header("Accept", "text/event-stream")
            .header("Timeout-Seconds", "600")
            .header("X-Trigger-Stream-Start", "latest")
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .map_err(|error| format!("SSE reader: {error}"))?;
        if !response.status().is_success() {
            return Err(format!("SSE reader: {}", response.status()));
        }
        let (stop, progress) = (stop_readers.clone(), progress.clone());
        readers.spawn(read_until_stopped(SseReader::new(response), stop, progress));
    }

    // Part ids are unique per run: a part id reused with another body is a conflict, not a
    // new record.
    let run_tag: u32 = rand::random();
    let started = Instant::now();
    let deadline = started + config.duration;
    let mut clients = tokio::task::JoinSet::new();
    for index in 0..config.clients {
        let (client, config, progress) = (client.clone(), config.clone(), progress.clone());
        // Each client owns every `clients`-th session; with fewer sessions than clients,
        // clients share them.
        let mut owned: Vec<LoadSession> = sessions
            .iter()
            .skip(index)
            .step_by(config.clients)
            .cloned()
            .collect();
        if owned.is_empty() {
            owned.push(sessions[index % sessions.len()].clone());
        }
        clients.spawn(run_client(
            (run_tag, index),
            client,
            config,
            owned,
            (started, deadline),
            progress,
        ));
    }
    let ticker = config.progress.then(|| {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            interval.tick().await;
            loop {
                interval.tick().await;
                let accepted = progress.accepted.load(Ordering::Relaxed);
                eprintln!(
                    "  {:>5.1} s  {:>7} appends/s  {:>8} accepted  {:>5} errors  {:>8} read",
                    started.elapsed().as_secs_f64(),
                    accepted - last,
                    accepted,
                    progress.errors.load(Ordering::Relaxed),
                    progress.read.load(Ordering::Relaxed)
                );
                last = accepted;
            }
        })
    });

    let mut result = LoadResult {
        accepted: 0,
        retries: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        accept: Latencies::default(),
        visible: Latencies::default(),
        records_read: 0,
    };
    while let Some(outcome) = clients.join_next().await {
        let outcome = outcome.map_err(|error| format!("client task: {error}"))?;
        result.accepted += outcome.accepted;
        result.retries += outcome.retries;
        result.errors += outcome.errors;
        result.accept.merge(&outcome.accept);
    }
    result.elapsed = started.elapsed();
    // Give readers a moment to receive what was accepted last.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Readers notice the flag within a second (their read timeout) and return what they saw.
    stop_readers.store(true, Ordering::SeqCst);
    while let Ok(Some(read)) =
        tokio::time::timeout(Duration::from_secs(5), readers.join_next()).await
    {
        if let Ok(visible) = read {
            result.visible.merge(&visible);
        }
    }
    readers.abort_all();
    result.records_read = progress.read.load(Ordering::Relaxed);
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    Ok(result)
}

async fn run_client(
    (run_tag, index): (u32, usize),
    client: reqwest::Client,
    config: LoadConfig,
    sessions: Vec<LoadSession>,
    (started, deadline): (Instant, Instant),
    progress: Arc<Progress>,
) -> ClientOutcome {
    let mut outcome = ClientOutcome {
        accepted: 0,
        retries: 0,
        errors: 0,
        accept: Latencies::default(),
    };
    // Open loop: this client's share of the schedule, offset so that clients interleave.
    let interval = config
        .rate
        .map(|rate| Duration::from_secs_f64(config.clients as f64 / rate.max(1e-3)));
    let mut next_slot = started
        + interval.map_or(Duration::ZERO, |interval| {
            interval.mul_f64(index as f64 / config.clients as f64)
        });
    let mut sequence: u64 = 0;
    // Earlier appends of this client, for retries: (session slot, part id, body).
    let mut sent: Vec<(usize, String, String)> = Vec::new();
    let mut rng = rand::rngs::StdRng::from_os_rng();
    loop {
        let scheduled = match interval {
            Some(interval) => {
                let slot = next_slot;
                next_slot += interval;
                if slot >= deadline {
                    break;
                }
                tokio::time::sleep_until(slot.into()).await;
                slot
            }
            None => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                now
            }
        };
        let retry = !sent.is_empty() && rng.random_bool(config.retry_share.clamp(0.0, 1.0));
        let (slot, part_id, body) = if retry {
            sent[rng.random_range(0..sent.len())].clone()
        } else {
            let slot = (sequence as usize) % sessions.len();
            let body = append_body(unix_micros(), sequence, config.body_bytes);
            let part_id = format!("{run_tag:x}-{index}-{sequence}");
            sequence += 1;
            (slot, part_id, body)
        };
        let session = &sessions[slot];
        let response = client
            .post(format!(
                "{}/realtime/v1/sessions/{}/in/append",
                config.api_url, session.external_id
            ))
            .bearer_auth(&session.secret_key)
            .header("X-Part-Id", &part_id)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => {
                outcome.accept.record(scheduled.elapsed());
                outcome.accepted += 1;
                progress.accepted.fetch_add(1, Ordering::Relaxed);
                if retry {
                    outcome.retries += 1;
                } else if sent.len() < 1024 {
                    sent.push((slot, part_id, body));
                } else {
                    let victim = rng.random_range(0..sent.len());
                    sent[victim] = (slot, part_id, body);
                }
            }
            _ => {
                outcome.errors += 1;
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    outcome
}

/// The send time of each record of an SSE `batch` event (`None` for records the load
/// generator did not write). A record's `body` is `{"data": …, "id": …}` as a string, where
/// `data` is the appended JSON (parsed) or text.
fn sent_times_of_batch(data: &str) -> Vec<Option<u64>> {
    let batch: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
    let Some(records) = batch["records"].as_array() else {
        return Vec::new();
    };
    records
        .iter()
        .map(|record| {
            let body: serde_json::Value =
                serde_json::from_str(record["body"].as_str().unwrap_or("")).unwrap_or_default();
            match &body["data"] {
                serde_json::Value::String(text) => sent_at_micros(text),
                value => value.get("t").and_then(serde_json::Value::as_u64),
            }
        })
        .collect()
}

async fn read_until_stopped(
    mut reader: SseReader,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Latencies {
    let mut visible = Latencies::default();
    while !stop.load(Ordering::SeqCst) {
        match reader.next_event(Duration::from_secs(1)).await {
            Ok(Some(event)) if event.event == "batch" => {
                let now = unix_micros();
                for sent in sent_times_of_batch(&event.data) {
                    progress.read.fetch_add(1, Ordering::Relaxed);
                    if let Some(sent) = sent {
                        visible.record(Duration::from_micros(now.saturating_sub(sent)));
                    }
                }
            }
            Ok(Some(_)) | Err("no event in time") => {}
            Ok(None) | Err(_) => break,
        }
    }
    visible
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_requested_size_and_carry_their_send_time() {
        for size in [64, 256, 1000] {
            let body = append_body(1_700_000_000_000_000, 42, size);
            assert_eq!(body.len(), size, "{body}");
            assert_eq!(sent_at_micros(&body), Some(1_700_000_000_000_000));
        }
    }

    #[test]
    fn send_times_are_read_from_text_or_json_record_data() {
        let body = append_body(7, 1, 64);
        let as_text = serde_json::json!({ "data": body, "id": "p" }).to_string();
        let as_json = serde_json::json!({ "data": { "t": 9 }, "id": "q" }).to_string();
        let batch = serde_json::json!({ "records": [
            { "seq_num": 0, "body": as_text },
            { "seq_num": 1, "body": as_json },
            { "seq_num": 2, "body": "{}" },
        ]})
        .to_string();
        assert_eq!(sent_times_of_batch(&batch), vec![Some(7), Some(9), None]);
    }
}
