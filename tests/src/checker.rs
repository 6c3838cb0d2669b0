//! The reliability checker (issue #9): compares what clients were told with what the system
//! holds afterwards.
//!
//! Input: the client [`History`] (every append attempt with its channel, part id, body hash,
//! send order and result; every waitpoint the clients registered) and a [`ReadBack`] (every
//! record of every session name read through every environment's key, and every waitpoint row
//! with the completion events runners received). Output: a [`Report`] that counts
//!
//! - `lost`: an acknowledged (2xx) append with no record;
//! - `duplicated`: a part id or a body recorded more than once in its channel;
//! - `reordered`: per channel, records of acknowledged appends out of send order (the number
//!   of records to remove to make the rest ordered: one adjacent swap counts 1);
//! - `corrupted`: a record whose part id is known but whose body matches no attempt with it;
//! - `failed_but_written`: an append refused with a definite 4xx that has a record anyway;
//! - `cross_env`: a record, a waitpoint completion or a waitpoint visible in an environment
//!   other than the one it belongs to;
//! - `unknown_records`: a record that matches no append of any environment;
//! - waitpoints completed more than once (distinct completion events), never (a record after
//!   their `after_seq` exists but they still wait, or a registered one is missing), or by the
//!   wrong record (not the first record after `after_seq` of their own channel), and completed
//!   waitpoints whose `waitpoint.completed` event never reached runners.
//!
//! The checker assumes every logical append has a body of its own (the reliability suite puts
//! environment, session, channel and number in each body); appends without a part id are
//! identified by their body.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::TestApp;
use crate::events::EventTap;

/// FNV-1a (64 bits) of a body: stable across processes and runs.
pub fn body_hash(body: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in body.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// What the client knows about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppendResult {
    /// 2xx: the service promised the record.
    Acknowledged,
    /// A definite refusal (4xx other than 408): nothing may be written.
    Failed,
    /// Timeout, connection error, 408 or 5xx: written or not, the client cannot know.
    Indeterminate,
}

impl AppendResult {
    /// Classifies an HTTP answer (`None`: no answer at all).
    pub fn of_status(status: Option<u16>) -> Self {
        match status {
            Some(200..=299) => Self::Acknowledged,
            Some(408) => Self::Indeterminate,
            Some(400..=499) => Self::Failed,
            _ => Self::Indeterminate,
        }
    }
}

/// One channel of one session as an environment sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel {
    /// The environment's public id (`env_…`).
    pub environment: String,
    /// The session's externalId.
    pub session: String,
    /// `in` or `out`.
    pub io: String,
}

impl Channel {
    pub fn new(environment: &str, session: &str, io: &str) -> Self {
        Self {
            environment: environment.to_owned(),
            session: session.to_owned(),
            io: io.to_owned(),
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.environment, self.session, self.io)
    }
}

/// One HTTP append attempt. Retries of one logical append share channel, part id and
/// `send_order`.
#[derive(Clone, Debug)]
pub struct AppendAttempt {
    pub channel: Channel,
    pub part_id: Option<String>,
    pub body_hash: u64,
    /// Position of the logical append among the channel's appends, as the client sent them.
    pub send_order: u64,
    pub result: AppendResult,
    /// The HTTP status, if an answer came.
    pub status: Option<u16>,
    pub sent_at: Instant,
    pub answered_at: Instant,
}

/// A waitpoint a client registered (200 from the wait route).
#[derive(Clone, Debug)]
pub struct RegisteredWaitpoint {
    pub id: String,
    pub channel: Channel,
}

/// Another request of a client (e.g. a waitpoint registration), for outage-window figures.
#[derive(Clone, Debug)]
pub struct RequestAttempt {
    pub kind: &'static str,
    pub status: Option<u16>,
    pub sent_at: Instant,
    pub answered_at: Instant,
}

/// Attempt counts of a history, for the printed figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub sent: usize,
    pub acknowledged: usize,
    pub failed: usize,
    pub indeterminate: usize,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} acknowledged={} failed={} indeterminate={}",
            self.sent, self.acknowledged, self.failed, self.indeterminate
        )
    }
}

/// The client history, filled concurrently by producers.
#[derive(Debug, Default)]
pub struct History {
    appends: Mutex<Vec<AppendAttempt>>,
    waitpoints: Mutex<Vec<RegisteredWaitpoint>>,
    requests: Mutex<Vec<RequestAttempt>>,
}

impl History {
    pub fn record_append(&self, attempt: AppendAttempt) {
        self.appends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(attempt);
    }

    pub fn record_waitpoint(&self, waitpoint: RegisteredWaitpoint) {
        self.waitpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(waitpoint);
    }

    pub fn record_request(&self, request: RequestAttempt) {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(request);
    }

    pub fn requests(&self) -> Vec<RequestAttempt> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn appends(&self) -> Vec<AppendAttempt> {
        self.appends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn waitpoints(&self) -> Vec<RegisteredWaitpoint> {
        self.waitpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Attempt counts (each HTTP request once).
    pub fn figures(&self) -> Figures {
        let appends = self.appends();
        let count = |result: AppendResult| appends.iter().filter(|a| a.result == result).count();
        Figures {
            sent: appends.len(),
            acknowledged: count(AppendResult::Acknowledged),
            failed: count(AppendResult::Failed),
            indeterminate: count(AppendResult::Indeterminate),
        }
    }

    /// How many append attempts were acknowledged so far.
    pub fn acknowledged_attempts(&self) -> usize {
        self.appends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|attempt| attempt.result == AppendResult::Acknowledged)
            .count()
    }

    /// How many logical appends were acknowledged (a lower bound of the records to expect).
    pub fn acknowledged_appends(&self) -> usize {
        logical_appends(&self.appends())
            .iter()
            .filter(|logical| logical.result == AppendResult::Acknowledged)
            .count()
    }
}

/// A record as read back. `channel.environment` is the environment it was read *through*.
#[derive(Clone, Debug)]
pub struct ReadRecord {
    pub channel: Channel,
    pub seq_num: i64,
    pub part_id: Option<String>,
    pub body_hash: u64,
    /// The message a close appends to `in` (no part id, `"trigger":"close"`): written by the
    /// service, not by a client, so no append accounts for it.
    pub close_message: bool,
}

/// Whether a record body is the message a session close appends to `in`.
pub fn is_close_message(body: &str) -> bool {
    serde_json::from_str::<Value>(body)
        .is_ok_and(|value| value["kind"] == "message" && value["payload"]["trigger"] == "close")
}

/// A waitpoint as read back (from its row, and from the events runners received).
#[derive(Clone, Debug)]
pub struct ReadWaitpoint {
    pub id: String,
    /// The channel it waits on, in the environment that owns it.
    pub channel: Channel,
    pub after_seq: i64,
    /// `WAITING`, `COMPLETED` or `TIMED_OUT`.
    pub status: String,
    pub completed_by_seq: Option<i64>,
    pub output_hash: Option<u64>,
    /// Distinct `waitpoint.completed` events for it: (output hash, completedAt). Redeliveries of
    /// one completion (the outbox is at-least-once) carry the same pair and collapse.
    pub completion_events: Vec<(u64, String)>,
    /// Other environments in which `GET /api/v1/waitpoints/tokens/{id}` found it.
    pub visible_in: Vec<String>,
}

/// Everything read back after a run.
#[derive(Clone, Debug, Default)]
pub struct ReadBack {
    pub records: Vec<ReadRecord>,
    pub waitpoints: Vec<ReadWaitpoint>,
}

/// The checker's verdict. [`Report::is_clean`] is true when every anomaly counter is zero.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Logical appends (retries of one part id count once) and how they ended for the client.
    pub appends: usize,
    pub acknowledged: usize,
    pub failed: usize,
    pub indeterminate: usize,
    /// Records read back (through every environment).
    pub records: usize,
    /// Waitpoints read back.
    pub waitpoints: usize,
    /// Waitpoints with no record after them yet (not an anomaly by itself).
    pub waitpoints_waiting: usize,
    /// Close messages found on `in` channels (not an anomaly by itself; a second one in one
    /// channel counts as duplicated).
    pub close_messages: usize,

    pub lost: usize,
    pub duplicated: usize,
    pub reordered: usize,
    pub corrupted: usize,
    pub failed_but_written: usize,
    pub cross_env: usize,
    pub unknown_records: usize,
    pub waitpoints_completed_twice: usize,
    pub waitpoints_never_completed: usize,
    pub waitpoints_wrong_record: usize,
    pub waitpoint_events_missing: usize,

    /// The first anomalies, described (for the failure message).
    pub details: Vec<String>,
}

const MAX_DETAILS: usize = 20;

impl Report {
    /// The non-zero anomaly counters by name.
    pub fn anomalies(&self) -> BTreeMap<&'static str, usize> {
        [
            ("lost", self.lost),
            ("duplicated", self.duplicated),
            ("reordered", self.reordered),
            ("corrupted", self.corrupted),
            ("failed_but_written", self.failed_but_written),
            ("cross_env", self.cross_env),
            ("unknown_records", self.unknown_records),
            (
                "waitpoints_completed_twice",
                self.waitpoints_completed_twice,
            ),
            (
                "waitpoints_never_completed",
                self.waitpoints_never_completed,
            ),
            ("waitpoints_wrong_record", self.waitpoints_wrong_record),
            ("waitpoint_events_missing", self.waitpoint_events_missing),
        ]
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .collect()
    }

    pub fn is_clean(&self) -> bool {
        self.anomalies().is_empty()
    }

    fn note(&mut self, detail: String) {
        if self.details.len() < MAX_DETAILS {
            self.details.push(detail);
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "appends={} (acknowledged={} failed={} indeterminate={}) records={} waitpoints={} \
             | lost={} duplicated={} reordered={} corrupted={} failed_but_written={} \
             cross_env={} unknown_records={} wp_completed_twice={} wp_never_completed={} \
             wp_wrong_record={} wp_events_missing={} wp_waiting={} | {}",
            self.appends,
            self.acknowledged,
            self.failed,
            self.indeterminate,
            self.records,
            self.waitpoints,
            self.lost,
            self.duplicated,
            self.reordered,
            self.corrupted,
            self.failed_but_written,
            self.cross_env,
            self.unknown_records,
            self.waitpoints_completed_twice,
            self.waitpoints_never_completed,
            self.waitpoints_wrong_record,
            self.waitpoint_events_missing,
            self.waitpoints_waiting,
            if self.is_clean() {
                "CLEAN"
            } else {
                "NOT CLEAN"
            },
        )
    }
}

/// Identity of a logical append within its channel: the part id, or the body without one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Identity {
    Part(String),
    Body(u64),
}

/// All attempts of one logical append, folded.
#[derive(Clone, Debug)]
struct LogicalAppend {
    channel: Channel,
    identity: Identity,
    bodies: HashSet<u64>,
    send_order: u64,
    result: AppendResult,
}

fn logical_appends(attempts: &[AppendAttempt]) -> Vec<LogicalAppend> {
    let mut index: HashMap<(Channel, Identity), usize> = HashMap::new();
    let mut logical: Vec<LogicalAppend> = Vec::new();
    for attempt in attempts {
        let identity = match &attempt.part_id {
            Some(part) => Identity::Part(part.clone()),
            None => Identity::Body(attempt.body_hash),
        };
        let key = (attempt.channel.clone(), identity.clone());
        match index.get(&key) {
            Some(&at) => {
                let entry = &mut logical[at];
                entry.bodies.insert(attempt.body_hash);
                entry.send_order = entry.send_order.min(attempt.send_order);
                entry.result = match (entry.result, attempt.result) {
                    (AppendResult::Acknowledged, _) | (_, AppendResult::Acknowledged) => {
                        AppendResult::Acknowledged
                    }
                    (AppendResult::Indeterminate, _) | (_, AppendResult::Indeterminate) => {
                        AppendResult::Indeterminate
                    }
                    _ => AppendResult::Failed,
                };
            }
            None => {
                index.insert(key, logical.len());
                logical.push(LogicalAppend {
                    channel: attempt.channel.clone(),
                    identity,
                    bodies: HashSet::from([attempt.body_hash]),
                    send_order: attempt.send_order,
                    result: attempt.result,
                });
            }
        }
    }
    logical
}

/// Length of the longest strictly increasing subsequence.
fn longest_increasing(values: &[u64]) -> usize {
    let mut tails: Vec<u64> = Vec::new();
    for &value in values {
        let at = tails.partition_point(|&tail| tail < value);
        if at == tails.len() {
            tails.push(value);
        } else {
            tails[at] = value;
        }
    }
    tails.len()
}

/// Checks a run: see the module documentation for what each counter means.
pub fn check(
    attempts: &[AppendAttempt],
    registered: &[RegisteredWaitpoint],
    read_back: &ReadBack,
) -> Report {
    let logical = logical_appends(attempts);
    let mut report = Report {
        appends: logical.len(),
        acknowledged: logical
            .iter()
            .filter(|l| l.result == AppendResult::Acknowledged)
            .count(),
        failed: logical
            .iter()
            .filter(|l| l.result == AppendResult::Failed)
            .count(),
        indeterminate: logical
            .iter()
            .filter(|l| l.result == AppendResult::Indeterminate)
            .count(),
        records: read_back.records.len(),
        waitpoints: read_back.waitpoints.len(),
        ..Report::default()
    };

    // Indexes of the history.
    let mut by_identity: HashMap<(&Channel, Identity), usize> = HashMap::new();
    let mut by_body_in_channel: HashMap<(&Channel, u64), usize> = HashMap::new();
    let mut environments_of_body: HashMap<u64, HashSet<&str>> = HashMap::new();
    for (at, append) in logical.iter().enumerate() {
        by_identity.insert((&append.channel, append.identity.clone()), at);
        for &body in &append.bodies {
            by_body_in_channel.insert((&append.channel, body), at);
            environments_of_body
                .entry(body)
                .or_default()
                .insert(append.channel.environment.as_str());
        }
    }
    let foreign_body = |environment: &str, body: u64| {
        environments_of_body
            .get(&body)
            .is_some_and(|owners| !owners.contains(environment))
    };

    // Records, channel by channel, in seqNum order.
    let mut channels: BTreeMap<&Channel, Vec<&ReadRecord>> = BTreeMap::new();
    for record in &read_back.records {
        channels.entry(&record.channel).or_default().push(record);
    }
    let mut recorded: HashSet<usize> = HashSet::new();
    let mut failed_written: HashSet<usize> = HashSet::new();
    for (channel, records) in &mut channels {
        records.sort_by_key(|record| record.seq_num);
        let mut seen_bodies: HashSet<u64> = HashSet::new();
        let mut seen_appends: HashSet<usize> = HashSet::new();
        let mut acknowledged_orders: Vec<u64> = Vec::new();
        let mut close_messages = 0;
        for record in records.iter() {
            if record.close_message && record.part_id.is_none() && channel.io == "in" {
                close_messages += 1;
                report.close_messages += 1;
                if close_messages > 1 {
                    report.duplicated += 1;
                    report.note(format!(
                        "duplicated: {channel} seq {} is a second close message",
                        record.seq_num
                    ));
                }
                continue;
            }
            let own = match &record.part_id {
                Some(part) => by_identity
                    .get(&(*channel, Identity::Part(part.clone())))
                    .copied(),
                None => by_body_in_channel
                    .get(&(*channel, record.body_hash))
                    .copied(),
            };
            let matches_own = own.filter(|&at| logical[at].bodies.contains(&record.body_hash));
            let duplicate_body = !seen_bodies.insert(record.body_hash);
            match matches_own {
                Some(at) => {
                    recorded.insert(at);
                    if !seen_appends.insert(at) || duplicate_body {
                        report.duplicated += 1;
                        report.note(format!(
                            "duplicated: {channel} seq {} ({:?})",
                            record.seq_num, record.part_id
                        ));
                        continue;
                    }
                    match logical[at].result {
                        AppendResult::Acknowledged => {
                            acknowledged_orders.push(logical[at].send_order);
                        }
                        AppendResult::Failed => {
                            if failed_written.insert(at) {
                                report.failed_but_written += 1;
                                report.note(format!(
                                    "failed_but_written: {channel} seq {} ({:?})",
                                    record.seq_num, record.part_id
                                ));
                            }
                        }
                        AppendResult::Indeterminate => {}
                    }
                }
                None if foreign_body(&channel.environment, record.body_hash) => {
                    report.cross_env += 1;
                    report.note(format!(
                        "cross_env: {channel} seq {} holds another environment's body",
                        record.seq_num
                    ));
                }
                None if duplicate_body => {
                    report.duplicated += 1;
                    report.note(format!(
                        "duplicated: {channel} seq {} repeats a body",
                        record.seq_num
                    ));
                }
                None => match own {
                    Some(at) => {
                        recorded.insert(at);
                        seen_appends.insert(at);
                        report.corrupted += 1;
                        report.note(format!(
                            "corrupted: {channel} seq {} ({:?}) body matches no attempt",
                            record.seq_num, record.part_id
                        ));
                    }
                    None => {
                        report.unknown_records += 1;
                        report.note(format!(
                            "unknown record: {channel} seq {} ({:?})",
                            record.seq_num, record.part_id
                        ));
                    }
                },
            }
        }
        let out_of_order = acknowledged_orders.len() - longest_increasing(&acknowledged_orders);
        if out_of_order > 0 {
            report.reordered += out_of_order;
            report.note(format!(
                "reordered: {channel}: {out_of_order} record(s) out of send order"
            ));
        }
    }
    for (at, append) in logical.iter().enumerate() {
        if append.result == AppendResult::Acknowledged && !recorded.contains(&at) {
            report.lost += 1;
            report.note(format!(
                "lost: {} {:?} (send order {})",
                append.channel, append.identity, append.send_order
            ));
        }
    }

    // Waitpoints.
    let found: HashSet<&str> = read_back
        .waitpoints
        .iter()
        .map(|waitpoint| waitpoint.id.as_str())
        .collect();
    for missing in registered
        .iter()
        .filter(|waitpoint| !found.contains(waitpoint.id.as_str()))
    {
        report.waitpoints_never_completed += 1;
        report.note(format!(
            "waitpoint {} on {} was registered but does not exist",
            missing.id, missing.channel
        ));
    }
    for waitpoint in &read_back.waitpoints {
        let due = channels.get(&waitpoint.channel).and_then(|records| {
            records
                .iter()
                .find(|record| record.seq_num > waitpoint.after_seq)
        });
        if !waitpoint.visible_in.is_empty() {
            report.cross_env += 1;
            report.note(format!(
                "cross_env: waitpoint {} of {} is visible in {:?}",
                waitpoint.id, waitpoint.channel.environment, waitpoint.visible_in
            ));
        }
        let distinct_events: HashSet<&(u64, String)> = waitpoint.completion_events.iter().collect();
        match waitpoint.status.as_str() {
            "COMPLETED" => {
                let output = waitpoint.output_hash.unwrap_or_default();
                if foreign_body(&waitpoint.channel.environment, output) {
                    report.cross_env += 1;
                    report.note(format!(
                        "cross_env: waitpoint {} completed with another environment's record",
                        waitpoint.id
                    ));
                } else if due.is_none_or(|due| {
                    Some(due.seq_num) != waitpoint.completed_by_seq || due.body_hash != output
                }) {
                    report.waitpoints_wrong_record += 1;
                    report.note(format!(
                        "waitpoint {} on {} (after seq {}) completed by seq {:?}, due {:?}",
                        waitpoint.id,
                        waitpoint.channel,
                        waitpoint.after_seq,
                        waitpoint.completed_by_seq,
                        due.map(|due| due.seq_num)
                    ));
                }
                let disagreeing = distinct_events
                    .iter()
                    .any(|(event_output, _)| *event_output != output);
                if distinct_events.len() > 1 || disagreeing {
                    report.waitpoints_completed_twice += 1;
                    report.note(format!(
                        "waitpoint {} completed {} times (events)",
                        waitpoint.id,
                        distinct_events.len()
                    ));
                } else if distinct_events.is_empty() {
                    report.waitpoint_events_missing += 1;
                    report.note(format!(
                        "waitpoint {} completed but no waitpoint.completed event arrived",
                        waitpoint.id
                    ));
                }
            }
            _ => {
                if !distinct_events.is_empty() {
                    report.waitpoints_completed_twice += 1;
                    report.note(format!(
                        "waitpoint {} is {} but {} completion event(s) arrived",
                        waitpoint.id,
                        waitpoint.status,
                        distinct_events.len()
                    ));
                }
                match due {
                    Some(due) => {
                        report.waitpoints_never_completed += 1;
                        report.note(format!(
                            "waitpoint {} on {} is {} although seq {} follows its after seq {}",
                            waitpoint.id,
                            waitpoint.channel,
                            waitpoint.status,
                            due.seq_num,
                            waitpoint.after_seq
                        ));
                    }
                    None => report.waitpoints_waiting += 1,
                }
            }
        }
    }
    report
}

// ------------------------------------------------------------------ reading back a deployment

/// An environment of the run: its public id and its secret key.
#[derive(Clone, Debug)]
pub struct EnvironmentKey {
    pub id: String,
    pub key: String,
}

impl EnvironmentKey {
    /// The environment of `key`, its public id asked from the api (`POST /api/v1/auth/jwt/claims`).
    pub async fn of(app: &TestApp, key: &str) -> Self {
        let claims: Value = app
            .client
            .post(app.url("/api/v1/auth/jwt/claims"))
            .bearer_auth(key)
            .send()
            .await
            .expect("claims request")
            .json()
            .await
            .expect("claims json");
        Self {
            id: claims["sub"].as_str().expect("sub").to_owned(),
            key: key.to_owned(),
        }
    }
}

async fn database(app: &TestApp) -> sea_orm::DatabaseConnection {
    sea_orm::Database::connect(&app.settings.database_url)
        .await
        .expect("checker connects to the test database")
}

async fn scalar(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
    use sea_orm::ConnectionTrait;
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            sql,
        ))
        .await
        .expect("checker query")
        .expect("one row");
    row.try_get::<i64>("", "n").expect("a count")
}

/// Waits until the workers have applied everything: at least `at_least` records exist, the
/// count did not move for a second and the outbox is empty (or `timeout` passes: then the
/// checker reports what is missing).
pub async fn wait_until_quiet(app: &TestApp, at_least: usize, timeout: Duration) {
    let db = database(app).await;
    let deadline = Instant::now() + timeout;
    let mut last = -1;
    let mut stable_since = Instant::now();
    loop {
        let records = scalar(&db, "SELECT count(*)::bigint AS n FROM records").await;
        let outbox = scalar(&db, "SELECT count(*)::bigint AS n FROM outbox_events").await;
        if records != last {
            last = records;
            stable_since = Instant::now();
        }
        let enough = usize::try_from(records).unwrap_or(0) >= at_least;
        if (enough && outbox == 0 && stable_since.elapsed() >= Duration::from_secs(1))
            || Instant::now() >= deadline
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every record of a channel through the records route, as `key`.
pub async fn read_channel(app: &TestApp, key: &str, session: &str, io: &str) -> Vec<crate::Record> {
    let mut all: Vec<crate::Record> = Vec::new();
    let mut failures = 0;
    loop {
        let mut url = app.url(&format!(
            "/realtime/v1/sessions/{}/{io}/records",
            crate::encode_segment(session)
        ));
        if let Some(last) = all.last() {
            url.push_str(&format!("?afterEventId={}", last.seq_num));
        }
        let response = app.client.get(url).bearer_auth(key).send().await;
        let page = match response {
            Ok(response) if response.status().is_success() => {
                response.json::<Value>().await.expect("records json")
            }
            other => {
                failures += 1;
                assert!(failures < 50, "records route keeps failing: {other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let records: Vec<crate::Record> =
            serde_json::from_value(page["records"].clone()).expect("records shape");
        if records.is_empty() {
            return all;
        }
        all.extend(records);
    }
}

/// Reads everything back: every session name through every environment (both channels), every
/// waitpoint row, the completion events `tap` collected since it was bound, and whether each
/// waitpoint is visible through another environment's key.
pub async fn read_back(
    app: &TestApp,
    environments: &[EnvironmentKey],
    sessions: &[String],
    tap: Option<&mut EventTap>,
) -> ReadBack {
    use sea_orm::ConnectionTrait;
    let mut read = ReadBack::default();
    for environment in environments {
        for session in sessions {
            for io in ["in", "out"] {
                for record in read_channel(app, &environment.key, session, io).await {
                    read.records.push(ReadRecord {
                        channel: Channel::new(&environment.id, session, io),
                        seq_num: record.seq_num,
                        part_id: (!record.id.is_empty()).then_some(record.id),
                        body_hash: body_hash(&record.data),
                        close_message: is_close_message(&record.data),
                    });
                }
            }
        }
    }

    let mut events: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    if let Some(tap) = tap {
        loop {
            let batch = tap
                .collect_until(Duration::from_millis(1500), |_| false)
                .await;
            if batch.is_empty() {
                break;
            }
            for event in batch {
                if event["type"] != "waitpoint.completed" {
                    continue;
                }
                let (Some(id), Some(output)) =
                    (event["waitpointId"].as_str(), event["output"].as_str())
                else {
                    continue;
                };
                let pair = (body_hash(output), event["completedAt"].to_string());
                let known = events.entry(id.to_owned()).or_default();
                if !known.contains(&pair) {
                    known.push(pair);
                }
            }
        }
    }

    let db = database(app).await;
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT w.friendly_id, w.environment_public_id, s.external_id, w.io, w.after_seq, \
             w.status, w.output, w.completed_by_seq \
             FROM waitpoints w JOIN sessions s ON s.id = w.session_id",
        ))
        .await
        .expect("waitpoints query");
    for row in rows {
        let id: String = row.try_get("", "friendly_id").expect("friendly_id");
        let environment: String = row
            .try_get("", "environment_public_id")
            .expect("environment_public_id");
        let session: Option<String> = row.try_get("", "external_id").expect("external_id");
        let io: String = row.try_get("", "io").expect("io");
        let output: Option<String> = row.try_get("", "output").expect("output");
        let mut visible_in = Vec::new();
        for other in environments.iter().filter(|other| other.id != environment) {
            let status = app
                .client
                .get(app.url(&format!(
                    "/api/v1/waitpoints/tokens/{}",
                    crate::encode_segment(&id)
                )))
                .bearer_auth(&other.key)
                .send()
                .await
                .expect("waitpoint request")
                .status();
            if status.is_success() {
                visible_in.push(other.id.clone());
            }
        }
        read.waitpoints.push(ReadWaitpoint {
            completion_events: events.remove(&id).unwrap_or_default(),
            id,
            channel: Channel::new(&environment, &session.unwrap_or_default(), &io),
            after_seq: row.try_get("", "after_seq").expect("after_seq"),
            status: row.try_get("", "status").expect("status"),
            completed_by_seq: row
                .try_get("", "completed_by_seq")
                .expect("completed_by_seq"),
            output_hash: output.as_deref().map(body_hash),
            visible_in,
        });
    }
    read
}
