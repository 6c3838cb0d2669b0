//! The writer workload: many agents appending the way the official SDK's `out` writer does, over
//! S2's protocol (`s2s/proto` append sessions on HTTP/2 with prior knowledge), generated here in
//! Rust so that the client does not eat the cores. The same generator drives this server's
//! `/s2/v1` endpoint and the s2-lite reference ([`super::s2_lite`]), so the two are compared on
//! one protocol.
//!
//! Each agent owns one stream and one append session. Its records are ~100-byte chunks wrapped
//! as the SDK wraps them (`{"data": <chunk>, "id": <id>}`), the chunk carrying its send time
//! (`{"t": µs, "n": …, "pad": …}`) so that SSE readers can measure visibility.
//! - **Closed loop** (`rate: None`): every agent keeps `in_flight` frames of `batch_records`
//!   records unacknowledged, sending the next as soon as an ack comes back: the most the server
//!   acknowledges (an ack here means the worker applied the batch: persisted).
//! - **Open loop** (`rate: Some(r)`): `r` records per second in total, spread over the agents;
//!   each agent sends what it produced once per `linger` (the SDK's batching), one frame each,
//!   agents at phases spread evenly over the linger (independent agents do not tick together).
//!
//! Latencies: `ack` is frame sent → its ack received. The records' own send time is the frame's
//! send time (the client's linger is the client's choice, not the server's latency).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api::s2_wire::{AppendInput, AppendRecord, ServerFrame, frame, take_server_frame};
use bytes::Bytes;
use prost::Message;
use tokio::sync::{Mutex, mpsc};

use super::load::append_body;
use super::report::{Latencies, ThroughputReport};

/// One agent's stream: where it appends and with what token.
#[derive(Clone, Debug)]
pub struct WriterStream {
    /// The stream name as it goes in the URL (before percent-encoding).
    pub name: String,
    pub token: String,
}

/// The shape of one writer window.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// `{endpoint}/streams/{stream}/records` is appended to (no trailing slash).
    pub endpoint: String,
    /// The `s2-basin` header.
    pub basin: String,
    pub streams: Vec<WriterStream>,
    /// `None`: closed loop. `Some(r)`: open loop at `r` records per second in total.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub record_bytes: usize,
    /// Open loop: how often an agent sends what it produced (the SDK's linger).
    pub linger: Duration,
    /// Closed loop: records per frame.
    pub batch_records: usize,
    /// Closed loop: unacknowledged frames per agent.
    pub in_flight: usize,
    /// Agents per HTTP/2 connection.
    pub agents_per_connection: usize,
}

/// What a writer window measured.
#[derive(Debug)]
pub struct WriterResult {
    /// Records whose ack came back (persisted) within the window.
    pub records_acked: u64,
    pub frames_acked: u64,
    /// Append sessions that ended with an error or failed to open.
    pub errors: u64,
    pub elapsed: Duration,
    /// Frame sent → its ack.
    pub ack: Latencies,
}

impl WriterResult {
    pub fn report(&self, system: &str, workload: &str) -> ThroughputReport {
        ThroughputReport::new(
            system,
            workload,
            self.records_acked,
            self.errors,
            self.elapsed,
            &self.ack,
        )
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A frame of `count` records, numbered from `first`, each carrying `sent_at`.
fn records_frame(
    agent: usize,
    first: u64,
    count: usize,
    record_bytes: usize,
    sent_at: u64,
) -> Bytes {
    let records = (0..count as u64)
        .map(|offset| {
            let sequence = first + offset;
            let chunk = append_body(sent_at, sequence, record_bytes);
            AppendRecord {
                timestamp: None,
                headers: Vec::new(),
                body: format!(r#"{{"data":{chunk},"id":"a{agent}-{sequence}"}}"#).into_bytes(),
            }
        })
        .collect();
    let input = AppendInput {
        records,
        match_seq_num: None,
        fencing_token: None,
    };
    frame(0, &input.encode_to_vec())
}

/// Splits an append session's answer into frames: an ack's record count, or an error.
struct AnswerFrames {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl AnswerFrames {
    /// The next ack (its record count) or `None` when the session ended or failed.
    async fn next_ack(&mut self) -> Option<u64> {
        loop {
            match take_server_frame(&mut self.buffer) {
                Ok(Some(ServerFrame::Ack(ack))) => {
                    let start = ack.start.map_or(0, |position| position.seq_num);
                    let end = ack.end.map_or(0, |position| position.seq_num);
                    return Some(end.saturating_sub(start));
                }
                Ok(Some(ServerFrame::Terminal(..))) | Err(_) => return None,
                Ok(None) => {}
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

struct Shared {
    records_acked: AtomicU64,
    frames_acked: AtomicU64,
    errors: AtomicU64,
    /// Set at the end of the window: agents stop sending and wait for their acks.
    stopping: AtomicBool,
    ack: Mutex<Latencies>,
}

/// Runs one writer window.
pub async fn run_writers(config: &WriterConfig) -> Result<WriterResult, String> {
    if config.streams.is_empty() {
        return Err("a writer window needs streams".into());
    }
    let shared = Arc::new(Shared {
        records_acked: AtomicU64::new(0),
        frames_acked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        ack: Mutex::new(Latencies::default()),
    });
    let per_connection = config.agents_per_connection.max(1);
    let clients: Vec<reqwest::Client> = (0..config.streams.len().div_ceil(per_connection))
        .map(|_| {
            reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .map_err(|error| format!("h2c client: {error}"))
        })
        .collect::<Result<_, _>>()?;
    let per_agent_rate = config.rate.map(|rate| rate / config.streams.len() as f64);
    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    for (agent, stream) in config.streams.iter().enumerate() {
        agents.spawn(run_agent(
            agent,
            clients[agent / per_connection].clone(),
            config.clone(),
            stream.clone(),
            per_agent_rate,
            shared.clone(),
        ));
    }
    let ticker = {
        let (acked, errors) = (shared.clone(), shared.clone());
        super::report::print_progress(
            started,
            "records/s",
            "acked",
            move || acked.records_acked.load(Ordering::Relaxed),
            move || format!("{:>5} errors", errors.errors.load(Ordering::Relaxed)),
        )
    };
    tokio::time::sleep(config.duration).await;
    ticker.abort();
    shared.stopping.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    // Acks of frames sent before the end still count; give them a bounded time.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while agents.join_next().await.is_some() {}
    })
    .await;
    agents.abort_all();
    let ack = shared.ack.lock().await.clone();
    Ok(WriterResult {
        records_acked: shared.records_acked.load(Ordering::Relaxed),
        frames_acked: shared.frames_acked.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        elapsed,
        ack,
    })
}

async fn run_agent(
    agent: usize,
    client: reqwest::Client,
    config: WriterConfig,
    stream: WriterStream,
    rate: Option<f64>,
    shared: Arc<Shared>,
) {
    let (frames, outgoing) = mpsc::channel::<Bytes>(config.in_flight.max(1) + 1);
    let body = futures_util::stream::unfold(outgoing, |mut outgoing| async move {
        outgoing
            .recv()
            .await
            .map(|frame| (Ok::<_, std::io::Error>(frame), outgoing))
    });
    let response = client
        .post(format!(
            "{}/streams/{}/records",
            config.endpoint,
            crate::encode_segment(&stream.name)
        ))
        .bearer_auth(&stream.token)
        .header("content-type", "s2s/proto")
        .header("accept", "application/protobuf")
        .header("s2-basin", &config.basin)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    let response = match response {
        Ok(response) if response.status().is_success() => response,
        _ => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let mut answers = AnswerFrames {
        response,
        buffer: Vec::new(),
    };
    // Send times (and record counts) of the frames awaiting their ack, in order.
    let (sent_times, mut awaiting) = mpsc::unbounded_channel::<(Instant, usize)>();
    // Closed loop: a frame may be sent while fewer than `in_flight` are unacknowledged.
    let window = Arc::new(tokio::sync::Semaphore::new(config.in_flight.max(1)));
    let sender = {
        let shared = shared.clone();
        let config = config.clone();
        let window = window.clone();
        tokio::spawn(async move {
            let mut next = 0_u64;
            let mut owed = 0.0_f64;
            // Open loop: agents send once per linger, each at its own phase (spread evenly
            // over the linger), as independent agents do. Started in lockstep, every agent's
            // frame arrived within the same few milliseconds: a burst of the whole linger's
            // records ten times a second rather than the offered rate.
            let phase = config
                .linger
                .mul_f64(agent as f64 / config.streams.len().max(1) as f64);
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + phase, config.linger);
            while !shared.stopping.load(Ordering::Relaxed) {
                let count = match rate {
                    None => {
                        let Ok(permit) = window.acquire().await else {
                            break;
                        };
                        permit.forget();
                        config.batch_records
                    }
                    Some(rate) => {
                        tick.tick().await;
                        owed += rate * config.linger.as_secs_f64();
                        let count = owed.floor();
                        owed -= count;
                        count as usize
                    }
                };
                if count == 0 || shared.stopping.load(Ordering::Relaxed) {
                    continue;
                }
                let bytes = records_frame(agent, next, count, config.record_bytes, unix_micros());
                next += count as u64;
                if sent_times.send((Instant::now(), count)).is_err()
                    || frames.send(bytes).await.is_err()
                {
                    break;
                }
            }
            // Dropping `frames` ends the request body: the server answers what is left, then
            // ends its answer.
        })
    };
    while let Some(records) = answers.next_ack().await {
        let Some((sent, count)) = awaiting.recv().await else {
            break;
        };
        if records as usize != count {
            break;
        }
        shared.ack.lock().await.record(sent.elapsed());
        shared.records_acked.fetch_add(records, Ordering::Relaxed);
        shared.frames_acked.fetch_add(1, Ordering::Relaxed);
        window.add_permits(1);
    }
    // The answer ended: cleanly once the window is over and every frame sent was acknowledged.
    if !(shared.stopping.load(Ordering::Relaxed) && awaiting.is_empty()) {
        shared.errors.fetch_add(1, Ordering::Relaxed);
    }
    sender.abort();
}

/// SSE readers on the `out` of `sessions` (external id, secret key), tailing from the current
/// end: every record they receive that carries a send time adds its send → delivered latency.
pub struct VisibilityReaders {
    tasks: tokio::task::JoinSet<()>,
    visible: Arc<std::sync::Mutex<Latencies>>,
}

impl VisibilityReaders {
    pub async fn open(api_url: &str, sessions: &[(String, String)]) -> Result<Self, String> {
        let client = reqwest::Client::new();
        let visible = Arc::new(std::sync::Mutex::new(Latencies::default()));
        let mut tasks = tokio::task::JoinSet::new();
        for (external_id, secret_key) in sessions {
            let response = client
                .get(format!("{api_url}/realtime/v1/sessions/{external_id}/out"))
                .bearer_auth(secret_key)
                .header("Accept", "text/event-stream")
                .header("Timeout-Seconds", "600")
                .header("X-Trigger-Stream-Start", "latest")
                .send()
                .await
                .map_err(|error| format!("SSE reader: {error}"))?;
            if !response.status().is_success() {
                return Err(format!("SSE reader: {}", response.status()));
            }
            let visible = visible.clone();
            tasks.spawn(async move {
                let mut reader = crate::sse::SseReader::new(response);
                while let Ok(Some(event)) = reader.next_event(Duration::from_secs(600)).await {
                    if event.event != "batch" {
                        continue;
                    }
                    let now = unix_micros();
                    let records = super::load::records_of_batch(&event.data);
                    let mut visible = visible
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    for (_, sent) in records {
                        if let Some(sent) = sent {
                            visible.record(Duration::from_micros(now.saturating_sub(sent)));
                        }
                    }
                }
            });
        }
        Ok(Self { tasks, visible })
    }

    /// Stops the readers and returns what they measured.
    pub fn finish(mut self) -> Latencies {
        self.tasks.abort_all();
        self.visible
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
