//! The sessions load generator: appends of fixed-size JSON bodies with `X-Part-Id` to many
//! sessions over several environments, closed loop (each client sends its next append when the
//! previous one was answered) or open loop (a fixed schedule: each append leaves when it is due,
//! whether or not earlier ones were answered, and its latency counts from then, so a slow
//! server cannot hide its queueing), an optional share of retries of
//! earlier part ids, and SSE readers that measure the time from send to delivery and check
//! that each receives its session's records in order, without gap or repeat, and all of those
//! accepted during the window. A run may also stop after a number of appends (the drain
//! figure's backlog).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::json;

use super::report::{Latencies, ThroughputReport};
use crate::sse::SseReader;

/// One session of the workload and the secret key of its environment.
#[derive(Clone, Debug)]
pub struct LoadSession {
    pub secret_key: String,
    pub external_id: String,
}

/// The channel of a session that a load run appends to and its readers tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Client → agent; appended with any key.
    In,
    /// Agent → client; appended with the environment's secret key (what the sessions' keys are).
    Out,
}

impl Channel {
    /// The path segment: `in` or `out`.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::In => "in",
            Channel::Out => "out",
        }
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// The channel appended to and tailed (`out` with the secret key for the benchmark).
    pub channel: Channel,
    /// SSE readers in total, tailing `channel` of the first sessions: reader `r` tails session
    /// `r / readers_per_session`, so `sse_readers / readers_per_session` sessions are tailed.
    pub sse_readers: usize,
    /// Readers per tailed session (1 for one reader per session; 10 for the fan-out window).
    pub readers_per_session: usize,
    /// After the last answer, how long the readers may take at most to receive every append
    /// accepted during the window (they stop earlier once they all have).
    pub settle: Duration,
    /// Stop once this many new appends were sent (all clients together); `None`: at the end of
    /// `duration` only.
    pub max_appends: Option<u64>,
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
    /// Records delivered to SSE readers in the window (over all readers).
    pub records_read: u64,
    /// New appends (retries excluded) answered 2xx, by index into the run's sessions.
    pub accepted_per_session: Vec<u64>,
    /// What each SSE reader received, with the order and completeness checks.
    pub readers: Vec<ReaderReport>,
    /// Time from the last answer until the readers stopped (at most `settle`).
    pub settled_in: Duration,
}

/// What one SSE reader received in a window.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReaderReport {
    /// Index of its session in the run's sessions.
    pub session: usize,
    /// Records received.
    pub received: u64,
    /// New appends to its session answered 2xx during the window.
    pub expected: u64,
    /// seqNum of the first and the last record received (`None` when none arrived).
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    /// Records whose seqNum was more than one past the previous one.
    pub gaps: u64,
    /// Records whose seqNum was not past the previous one (a repeat or a step back).
    pub repeats: u64,
}

impl ReaderReport {
    /// Every record was one past the previous one.
    pub fn in_order(&self) -> bool {
        self.gaps == 0 && self.repeats == 0
    }

    /// It received at least as many records as were accepted for its session (more only if
    /// an append that failed on the client side was nevertheless written).
    pub fn complete(&self) -> bool {
        self.received >= self.expected
    }
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

    /// Readers that received every accepted record of their session.
    pub fn readers_complete(&self) -> usize {
        self.readers
            .iter()
            .filter(|reader| reader.complete())
            .count()
    }

    /// Readers that saw a gap or a repeat.
    pub fn readers_out_of_order(&self) -> usize {
        self.readers
            .iter()
            .filter(|reader| !reader.in_order())
            .count()
    }

    /// Readers both complete and in order.
    pub fn readers_complete_and_in_order(&self) -> usize {
        self.readers
            .iter()
            .filter(|reader| reader.complete() && reader.in_order())
            .count()
    }

    /// Accepted records that readers did not receive, summed over readers.
    pub fn records_missing(&self) -> u64 {
        self.readers
            .iter()
            .map(|reader| reader.expected.saturating_sub(reader.received))
            .sum()
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
    /// Only `t` is read: the rest of the body is skipped, not built.
    #[derive(Deserialize)]
    struct SentAt {
        t: u64,
    }
    serde_json::from_str::<SentAt>(body).ok().map(|body| body.t)
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

/// Counters shared by the clients and readers: the progress line, the append budget, the
/// accepted appends per session.
struct Progress {
    accepted: AtomicU64,
    errors: AtomicU64,
    read: AtomicU64,
    /// New appends started (for `max_appends`).
    started: AtomicU64,
    /// New appends answered 2xx, by session index.
    accepted_per_session: Vec<AtomicU64>,
}

impl Progress {
    fn new(sessions: usize) -> Self {
        Self {
            accepted: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            read: AtomicU64::new(0),
            started: AtomicU64::new(0),
            accepted_per_session: (0..sessions).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The running tally of one SSE reader: counters and the last seqNum only (a fan-out window
/// has 1,000 readers; none keeps the records). Written by its reader task only.
struct ReaderTally {
    session: usize,
    received: AtomicU64,
    /// `i64::MIN` until the first record.
    first_seq: AtomicI64,
    last_seq: AtomicI64,
    gaps: AtomicU64,
    repeats: AtomicU64,
}

impl ReaderTally {
    fn new(session: usize) -> Self {
        Self {
            session,
            received: AtomicU64::new(0),
            first_seq: AtomicI64::new(i64::MIN),
            last_seq: AtomicI64::new(i64::MIN),
            gaps: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
        }
    }

    /// Counts one record and checks it follows the previous one.
    fn saw(&self, seq_num: i64) {
        let last = self.last_seq.load(Ordering::Relaxed);
        if last == i64::MIN {
            self.first_seq.store(seq_num, Ordering::Relaxed);
        } else if seq_num <= last {
            self.repeats.fetch_add(1, Ordering::Relaxed);
        } else if seq_num != last + 1 {
            self.gaps.fetch_add(1, Ordering::Relaxed);
        }
        if seq_num > last {
            self.last_seq.store(seq_num, Ordering::Relaxed);
        }
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self, expected: u64) -> ReaderReport {
        let seq = |value: i64| (value != i64::MIN).then_some(value);
        ReaderReport {
            session: self.session,
            received: self.received.load(Ordering::Relaxed),
            expected,
            first_seq: seq(self.first_seq.load(Ordering::Relaxed)),
            last_seq: seq(self.last_seq.load(Ordering::Relaxed)),
            gaps: self.gaps.load(Ordering::Relaxed),
            repeats: self.repeats.load(Ordering::Relaxed),
        }
    }
}

struct ClientOutcome {
    accepted: u64,
    retries: u64,
    errors: u64,
    accept: Latencies,
}

/// Opens the SSE readers of `config` (tailing from the current end), one task each.
async fn open_readers(
    client: &reqwest::Client,
    config: &LoadConfig,
    sessions: &[LoadSession],
    progress: &Arc<Progress>,
    visible: &Arc<Mutex<Latencies>>,
) -> Result<(tokio::task::JoinSet<()>, Vec<Arc<ReaderTally>>), String> {
    let per_session = config.readers_per_session.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    let mut tallies = Vec::with_capacity(config.sse_readers);
    for reader in 0..config.sse_readers {
        let index = reader / per_session;
        let Some(session) = sessions.get(index) else {
            break;
        };
        let response = client
            .get(format!(
                "{}/realtime/v1/sessions/{}/{}",
                config.api_url, session.external_id, config.channel
            ))
            .bearer_auth(&session.secret_key)
            .header("Accept", "text/event-stream")
            .header("Timeout-Seconds", "600")
            .header("X-Trigger-Stream-Start", "latest")
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .map_err(|error| format!("SSE reader {reader}: {error}"))?;
        if !response.status().is_success() {
            return Err(format!("SSE reader {reader}: {}", response.status()));
        }
        let tally = Arc::new(ReaderTally::new(index));
        tallies.push(tally.clone());
        tasks.spawn(read_records(
            SseReader::new(response),
            tally,
            progress.clone(),
            visible.clone(),
        ));
    }
    Ok((tasks, tallies))
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
    let progress = Arc::new(Progress::new(sessions.len()));
    let visible = Arc::new(Mutex::new(Latencies::default()));
    let (mut readers, tallies) =
        open_readers(&client, config, sessions, &progress, &visible).await?;

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
        let mut owned: Vec<(usize, LoadSession)> = sessions
            .iter()
            .cloned()
            .enumerate()
            .skip(index)
            .step_by(config.clients)
            .collect();
        if owned.is_empty() {
            let shared = index % sessions.len();
            owned.push((shared, sessions[shared].clone()));
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
        let (accepted, tail) = (progress.clone(), progress.clone());
        super::report::print_progress(
            started,
            "appends/s",
            "accepted",
            move || accepted.accepted.load(Ordering::Relaxed),
            move || {
                format!(
                    "{:>5} errors  {:>8} read",
                    tail.errors.load(Ordering::Relaxed),
                    tail.read.load(Ordering::Relaxed)
                )
            },
        )
    });

    let mut result = LoadResult {
        accepted: 0,
        retries: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        accept: Latencies::default(),
        visible: Latencies::default(),
        records_read: 0,
        accepted_per_session: Vec::new(),
        readers: Vec::new(),
        settled_in: Duration::ZERO,
    };
    while let Some(outcome) = clients.join_next().await {
        let outcome = outcome.map_err(|error| format!("client task: {error}"))?;
        result.accepted += outcome.accepted;
        result.retries += outcome.retries;
        result.errors += outcome.errors;
        result.accept.merge(&outcome.accept);
    }
    result.elapsed = started.elapsed();
    result.accepted_per_session = progress
        .accepted_per_session
        .iter()
        .map(|count| count.load(Ordering::Relaxed))
        .collect();
    // Give the readers up to `settle` to receive what was accepted last.
    let settle_started = Instant::now();
    let all_received = || {
        tallies.iter().all(|tally| {
            tally.received.load(Ordering::Relaxed) >= result.accepted_per_session[tally.session]
        })
    };
    while !all_received() && settle_started.elapsed() < config.settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    result.settled_in = settle_started.elapsed();
    // Stops every reader (closing its connection) and waits until they are gone.
    readers.shutdown().await;
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    result.records_read = progress.read.load(Ordering::Relaxed);
    result.visible = visible
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    result.readers = tallies
        .iter()
        .map(|tally| tally.report(result.accepted_per_session[tally.session]))
        .collect();
    Ok(result)
}

async fn run_client(
    (run_tag, index): (u32, usize),
    client: reqwest::Client,
    config: LoadConfig,
    sessions: Vec<(usize, LoadSession)>,
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
    // Open loop: the appends sent and not answered yet.
    let mut in_flight = tokio::task::JoinSet::new();
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
            if let Some(budget) = config.max_appends
                && progress.started.fetch_add(1, Ordering::Relaxed) >= budget
            {
                break;
            }
            let slot = (sequence as usize) % sessions.len();
            let body = append_body(unix_micros(), sequence, config.body_bytes);
            let part_id = format!("{run_tag:x}-{index}-{sequence}");
            sequence += 1;
            (slot, part_id, body)
        };
        let (session_index, session) = &sessions[slot];
        let append = Append {
            session_index: *session_index,
            slot,
            part_id,
            body,
            retry,
            scheduled,
        };
        let request = client
            .post(format!(
                "{}/realtime/v1/sessions/{}/{}/append",
                config.api_url, session.external_id, config.channel
            ))
            .bearer_auth(&session.secret_key)
            .header("X-Part-Id", &append.part_id)
            .header("Content-Type", "application/json")
            .body(append.body.clone())
            .send();
        let answer = async move {
            let answered = matches!(request.await, Ok(response) if response.status().is_success());
            let latency = append.scheduled.elapsed();
            (append, answered.then_some(latency))
        };
        if interval.is_some() {
            // Open loop: the next append leaves on its schedule whether or not this one was
            // answered (a client that waited would stop offering the rate once an answer takes
            // longer than its interval, and the queue would form here instead of at the server).
            in_flight.spawn(answer);
            while let Some(finished) = in_flight.try_join_next() {
                outcome.finished(&progress, &mut sent, &mut rng, finished);
            }
        } else {
            let (append, answered) = answer.await;
            outcome.count(&progress, &mut sent, &mut rng, append, answered);
        }
    }
    while let Some(finished) = in_flight.join_next().await {
        outcome.finished(&progress, &mut sent, &mut rng, finished);
    }
    outcome
}

/// One append a client sent: what its answer is counted against.
struct Append {
    session_index: usize,
    slot: usize,
    part_id: String,
    body: String,
    retry: bool,
    /// When it was due (open loop) or sent (closed loop): its latency counts from here.
    scheduled: Instant,
}

impl ClientOutcome {
    /// Counts an open-loop append whose task ended (a task that failed counts as an error).
    fn finished(
        &mut self,
        progress: &Progress,
        sent: &mut Vec<(usize, String, String)>,
        rng: &mut rand::rngs::StdRng,
        finished: Result<(Append, Option<Duration>), tokio::task::JoinError>,
    ) {
        match finished {
            Ok((append, answered)) => self.count(progress, sent, rng, append, answered),
            Err(_) => self.failed(progress),
        }
    }

    fn failed(&mut self, progress: &Progress) {
        self.errors += 1;
        progress.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one append: answered with a 2xx after `latency` (from when it was due), or
    /// failed (`None`); keeps accepted ones for later retries.
    fn count(
        &mut self,
        progress: &Progress,
        sent: &mut Vec<(usize, String, String)>,
        rng: &mut rand::rngs::StdRng,
        append: Append,
        answered: Option<Duration>,
    ) {
        let Some(latency) = answered else {
            self.failed(progress);
            return;
        };
        self.accept.record(latency);
        self.accepted += 1;
        progress.accepted.fetch_add(1, Ordering::Relaxed);
        if append.retry {
            self.retries += 1;
            return;
        }
        progress.accepted_per_session[append.session_index].fetch_add(1, Ordering::Relaxed);
        let kept = (append.slot, append.part_id, append.body);
        if sent.len() < 1024 {
            sent.push(kept);
        } else {
            let victim = rng.random_range(0..sent.len());
            sent[victim] = kept;
        }
    }
}

/// `{"records":[{"seq_num","timestamp","body"}]}` of an SSE `batch` event.
#[derive(Deserialize)]
struct Batch {
    records: Vec<BatchRecord>,
}

#[derive(Deserialize)]
struct BatchRecord {
    seq_num: i64,
    #[serde(default)]
    body: String,
}

/// A record's `body`: `{"data": …, "id": …}` as a string.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    data: serde_json::Value,
}

/// The seqNum and the send time of each record of an SSE `batch` event (`None` for records
/// the load generator did not write). `data` is the appended JSON as text (or parsed).
pub fn records_of_batch(data: &str) -> Vec<(i64, Option<u64>)> {
    let Ok(batch) = serde_json::from_str::<Batch>(data) else {
        return Vec::new();
    };
    batch
        .records
        .iter()
        .map(|record| {
            let sent = serde_json::from_str::<Envelope>(&record.body)
                .ok()
                .and_then(|envelope| match &envelope.data {
                    serde_json::Value::String(text) => sent_at_micros(text),
                    value => value.get("t").and_then(serde_json::Value::as_u64),
                });
            (record.seq_num, sent)
        })
        .collect()
}

/// Reads until aborted: counts and checks every record, and records its visible latency.
async fn read_records(
    mut reader: SseReader,
    tally: Arc<ReaderTally>,
    progress: Arc<Progress>,
    visible: Arc<Mutex<Latencies>>,
) {
    loop {
        match reader.next_event(Duration::from_secs(60)).await {
            Ok(Some(event)) if event.event == "batch" => {
                let now = unix_micros();
                let records = records_of_batch(&event.data);
                progress
                    .read
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                let mut visible = visible.lock().unwrap_or_else(PoisonError::into_inner);
                for (seq_num, sent) in records {
                    tally.saw(seq_num);
                    if let Some(sent) = sent {
                        visible.record(Duration::from_micros(now.saturating_sub(sent)));
                    }
                }
            }
            Ok(Some(_)) | Err("no event in time") => {}
            Ok(None) | Err(_) => break,
        }
    }
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
        assert_eq!(
            records_of_batch(&batch),
            vec![(0, Some(7)), (1, Some(9)), (2, None)]
        );
    }

    #[test]
    fn readers_count_gaps_and_repeats_from_the_first_record_they_saw() {
        let tally = ReaderTally::new(3);
        for seq_num in [5, 6, 7] {
            tally.saw(seq_num);
        }
        let report = tally.report(3);
        assert!(report.in_order() && report.complete());
        assert_eq!((report.first_seq, report.last_seq), (Some(5), Some(7)));
        tally.saw(9);
        tally.saw(9);
        tally.saw(4);
        let report = tally.report(8);
        assert_eq!((report.gaps, report.repeats, report.received), (1, 2, 6));
        assert!(!report.in_order() && !report.complete());
        assert_eq!(report.last_seq, Some(9));
        assert_eq!(ReaderTally::new(0).report(0).first_seq, None);
    }
}
