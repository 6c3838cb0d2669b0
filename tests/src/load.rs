//! The load driver of the fault-injection suites (`tests/tests/reliability.rs`,
//! `tests/tests/broker_cluster.rs`): sequential producers per session that append with
//! `X-Part-Id` and retry indeterminate answers with the same part id and body (as a client
//! would), optional waitpoints and client re-sends, the client [`History`] they record, and
//! [`Run::finish`], which reads everything back and runs the [`checker`](crate::checker).
//!
//! Sizes: CI-sized by default; `SESSIONS_SOAK=1` selects the soak sizes ([`sized`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::TestApp;
use crate::checker::{
    self, AppendAttempt, AppendResult, Channel, EnvironmentKey, History, RegisteredWaitpoint,
    Report, RequestAttempt,
};
use crate::events::EventTap;

/// `target/tmp` (what `CARGO_TARGET_TMPDIR` names for integration tests): the test executable
/// lives in `target/<profile>/deps/`.
pub fn target_tmp_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|executable| Some(executable.parent()?.parent()?.parent()?.join("tmp")))
        .unwrap_or_else(std::env::temp_dir)
}

// ------------------------------------------------------------------------------------- sizes

/// `SESSIONS_SOAK=1` (any value but empty or `0`) selects the soak sizes.
pub fn soak() -> bool {
    std::env::var("SESSIONS_SOAK").is_ok_and(|value| !value.is_empty() && value != "0")
}

/// `ci` normally, `soak` under `SESSIONS_SOAK=1`.
pub fn sized<T>(ci: T, soak_size: T) -> T {
    if soak() { soak_size } else { ci }
}

pub fn size_label() -> &'static str {
    if soak() { "soak" } else { "ci" }
}

// ----------------------------------------------------------------------------- the load driver

/// One environment of a run: its key, and the first run of each of its sessions.
pub struct Tenant {
    pub environment: EnvironmentKey,
    pub runs: HashMap<String, String>,
}

impl Tenant {
    /// A short tag of the environment, used in part ids.
    pub fn tag(&self) -> &str {
        let id = self.environment.id.as_str();
        &id[id.len().saturating_sub(6)..]
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Number of the first append of each session (a later phase of the same run continues
    /// where the previous one stopped: part ids and bodies stay unique).
    pub first: usize,
    /// Appends per session (every fourth goes to `out`, the others to `in`).
    pub appends: usize,
    /// Register a waitpoint on `in` before every n-th append (0: none).
    pub waitpoint_every: usize,
    /// Re-send every n-th acknowledged append once more with the same part id and body, as a
    /// client retry would (0: never).
    pub resend_every: usize,
    /// How long a producer retries an indeterminate append or registration.
    pub give_up_after: Duration,
}

impl Plan {
    pub fn new(appends: usize) -> Self {
        Self {
            first: 0,
            appends,
            waitpoint_every: 0,
            resend_every: 0,
            give_up_after: Duration::from_secs(90),
        }
    }

    pub fn waitpoints_every(mut self, every: usize) -> Self {
        self.waitpoint_every = every;
        self
    }

    pub fn resend_every(mut self, every: usize) -> Self {
        self.resend_every = every;
        self
    }

    /// The next phase: `appends` more per session, numbered after this plan's.
    pub fn then(self, appends: usize) -> Self {
        Self {
            first: self.first + self.appends,
            appends,
            ..self
        }
    }
}

/// A run: the deployment, its environments and sessions, and the client history.
pub struct Run {
    pub app: Arc<TestApp>,
    pub history: Arc<History>,
    pub tenants: Vec<Arc<Tenant>>,
    pub sessions: Vec<String>,
    pub plan: Plan,
    /// Set by [`Run::stop_producers`]: producers stop before their next append.
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Run {
    /// Creates `sessions` sessions (the same externalIds in every environment: the app's own
    /// and one per `more_environments` slug).
    pub async fn new(
        app: TestApp,
        more_environments: &[&str],
        sessions: usize,
        plan: Plan,
    ) -> Self {
        let mut keys = vec![app.secret_key.clone()];
        for slug in more_environments {
            keys.push(app.create_environment(slug).await);
        }
        let names: Vec<String> = (0..sessions).map(|s| format!("chat-{s}")).collect();
        let mut tenants = Vec::new();
        for key in keys {
            let environment = EnvironmentKey::of(&app, &key).await;
            let mut runs = HashMap::new();
            for name in &names {
                runs.insert(name.clone(), create_session(&app, &key, name).await);
            }
            tenants.push(Arc::new(Tenant { environment, runs }));
        }
        Self {
            app: Arc::new(app),
            history: Arc::new(History::default()),
            tenants,
            sessions: names,
            plan,
            stop: Arc::default(),
        }
    }

    pub fn environments(&self) -> Vec<EnvironmentKey> {
        self.tenants
            .iter()
            .map(|tenant| tenant.environment.clone())
            .collect()
    }

    /// Starts one sequential producer per session and environment.
    pub fn start(&self) -> JoinSet<()> {
        self.stop.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut producers = JoinSet::new();
        for tenant in &self.tenants {
            for session in &self.sessions {
                producers.spawn(produce(
                    self.app.clone(),
                    self.history.clone(),
                    tenant.clone(),
                    session.clone(),
                    self.plan,
                    self.stop.clone(),
                ));
            }
        }
        producers
    }

    /// Makes the producers stop after their current append (a load that lasts a given time
    /// rather than a given count). The history holds what was sent.
    pub fn stop_producers(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until `fraction` of the planned appends were acknowledged (so that a fault hits
    /// the load in the middle, however fast this machine is), or 120 s passed.
    pub async fn progress(&self, fraction: f64) {
        let planned = self.tenants.len() * self.sessions.len() * self.plan.appends;
        let target = (planned as f64 * fraction).ceil() as usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.history.acknowledged_attempts() < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Definite refusals (so that `failed_but_written` is exercised), then waits for the
    /// workers, reads everything back, checks, prints and saves the figures.
    pub async fn finish(&self, scenario: &str, tap: Option<&mut EventTap>, notes: &str) -> Report {
        for tenant in &self.tenants {
            let session = &self.sessions[0];
            close_session(&self.app, &tenant.environment.key, session).await;
            let channel = Channel::new(&tenant.environment.id, session, "in");
            for k in 0..3 {
                let n = self.plan.first + self.plan.appends + k;
                append_settled(
                    &self.app,
                    &self.history,
                    &tenant.environment.key,
                    &channel,
                    Some(&format!("p{n}-{}", tenant.tag())),
                    &body_of(&channel, n),
                    n as u64,
                    self.plan.give_up_after,
                )
                .await;
            }
        }
        checker::wait_until_quiet(
            &self.app,
            self.history.acknowledged_appends(),
            Duration::from_secs(120),
        )
        .await;
        let read = checker::read_back(&self.app, &self.environments(), &self.sessions, tap).await;
        let report = checker::check(&self.history.appends(), &self.history.waitpoints(), &read);
        publish_figures(
            scenario,
            &self.history.figures().to_string(),
            notes,
            &report,
        );
        report
    }

    /// Starts an [`AppendProbe`] on a session of its own in the first environment.
    pub async fn start_probe(&self) -> AppendProbe {
        let tenant = self.tenants[0].clone();
        create_session(&self.app, &tenant.environment.key, AppendProbe::SESSION).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let history = Arc::new(History::default());
        let task = tokio::spawn({
            let (app, history, stop) = (self.app.clone(), history.clone(), stop.clone());
            async move {
                let channel = Channel::new(&tenant.environment.id, AppendProbe::SESSION, "in");
                let mut n = 0_u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let body = json!({ "probe": n }).to_string();
                    let part_id = format!("probe-{n}");
                    let key = &tenant.environment.key;
                    append_once(&app, &history, key, &channel, Some(&part_id), &body, n).await;
                    n += 1;
                    tokio::time::sleep(AppendProbe::PERIOD).await;
                }
            }
        });
        AppendProbe {
            history,
            stop,
            task,
        }
    }

    pub async fn cleanup(self) {
        let app = Arc::into_inner(self.app).expect("producers finished");
        app.cleanup().await;
    }
}

/// Appends to a session of its own, one at a time, every [`AppendProbe::PERIOD`], until
/// stopped, into a history of its own (the checker does not read that session back).
///
/// Why: a fault test must know that appends were sent while the fault lasted, whatever phase
/// the producers are in. A waitpoint registration can hold every producer through a whole
/// outage (it waits for the worker), so the producers' own history cannot promise that.
pub struct AppendProbe {
    history: Arc<History>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl AppendProbe {
    pub const SESSION: &str = "append-probe";
    const PERIOD: Duration = Duration::from_millis(100);

    /// Stops after the append in flight and returns what was sent.
    pub async fn stop(self) -> History {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("append probe");
        Arc::into_inner(self.history).expect("the probe task has ended")
    }
}

/// Prints the figures of a scenario and saves them under `target/tmp/reliability/`.
pub fn publish_figures(scenario: &str, figures: &str, notes: &str, report: &Report) {
    let line = format!(
        "{scenario} [{}]: {figures}{}{notes} | {report}",
        size_label(),
        if notes.is_empty() { "" } else { " " }
    );
    println!("{line}");
    for detail in &report.details {
        println!("  {detail}");
    }
    let directory = target_tmp_dir().join("reliability");
    if std::fs::create_dir_all(&directory).is_ok() {
        let _ = std::fs::write(
            directory.join(format!("{scenario}.txt")),
            format!("{line}\n"),
        );
    }
}

/// What the clients sent wholly inside outage windows (sent after a cut, answered before the
/// restore): append attempts, how many were 2xx, and the statuses of appends and waitpoint
/// registrations.
pub struct InsideOutage {
    pub appends: usize,
    pub appends_2xx: usize,
    pub summary: String,
}

pub fn inside_outage(history: &History, windows: &[(Instant, Instant)]) -> InsideOutage {
    let inside = |sent_at: Instant, answered_at: Instant| {
        windows
            .iter()
            .any(|(cut_at, restore_at)| sent_at >= *cut_at && answered_at <= *restore_at)
    };
    let label = |status: Option<u16>| status.map_or_else(|| "none".to_owned(), |s| s.to_string());
    let mut appends: BTreeMap<String, usize> = BTreeMap::new();
    let mut appends_2xx = 0;
    for attempt in history.appends() {
        if inside(attempt.sent_at, attempt.answered_at) {
            *appends.entry(label(attempt.status)).or_insert(0) += 1;
            if attempt.result == AppendResult::Acknowledged {
                appends_2xx += 1;
            }
        }
    }
    let mut waits: BTreeMap<String, usize> = BTreeMap::new();
    for request in history.requests() {
        if inside(request.sent_at, request.answered_at) {
            *waits.entry(label(request.status)).or_insert(0) += 1;
        }
    }
    let count = appends.values().sum();
    InsideOutage {
        appends: count,
        appends_2xx,
        summary: format!(
            "appends_inside_outage={count} inside_2xx={appends_2xx} \
             inside_append_statuses={appends:?} inside_wait_statuses={waits:?}"
        ),
    }
}

/// What the history says about the time around a loss (of a broker node, an address).
pub struct Pause {
    /// The longest time between two consecutive accepted appends (of any session) after the
    /// loss began: how long the service as a whole accepted nothing.
    pub longest: Duration,
    /// The longest time one channel waited between two accepted appends after the loss began
    /// (its partition's leader was on the lost node, or its request was in flight there): what
    /// the slowest client saw.
    pub longest_per_channel: Duration,
    /// Attempts answered 503 (not durably queued: the client retries with the same part id).
    pub answered_503: usize,
    /// Attempts with no usable answer (timeout, connection error, other 5xx).
    pub indeterminate: usize,
}

pub fn pause_after(history: &History, lost_at: Instant, until: Instant) -> Pause {
    let attempts = history.appends();
    let mut accepted: Vec<Instant> = attempts
        .iter()
        .filter(|attempt| attempt.result == AppendResult::Acknowledged)
        .map(|attempt| attempt.answered_at)
        .filter(|answered| *answered <= until)
        .collect();
    accepted.sort_unstable();
    // The last acceptance before the loss opens the window.
    let before = accepted
        .iter()
        .rev()
        .find(|answered| **answered <= lost_at)
        .copied()
        .unwrap_or(lost_at);
    let mut longest = Duration::ZERO;
    let mut previous = before;
    for answered in accepted.into_iter().filter(|answered| *answered > lost_at) {
        longest = longest.max(answered - previous);
        previous = answered;
    }
    longest = longest.max(until.saturating_duration_since(previous));
    let mut per_channel: std::collections::HashMap<String, Vec<Instant>> = Default::default();
    for attempt in &attempts {
        if attempt.result == AppendResult::Acknowledged && attempt.answered_at <= until {
            per_channel
                .entry(attempt.channel.to_string())
                .or_default()
                .push(attempt.answered_at);
        }
    }
    let mut longest_per_channel = Duration::ZERO;
    for mut answers in per_channel.into_values() {
        answers.sort_unstable();
        for pair in answers.windows(2) {
            if pair[1] > lost_at {
                longest_per_channel = longest_per_channel.max(pair[1] - pair[0].max(lost_at));
            }
        }
        // A channel that got nothing accepted after its last answer stalled until `until`.
        if let Some(last) = answers.last() {
            longest_per_channel =
                longest_per_channel.max(until.saturating_duration_since((*last).max(lost_at)));
        }
    }
    let answered_503 = attempts
        .iter()
        .filter(|attempt| attempt.status == Some(503))
        .count();
    let indeterminate = attempts
        .iter()
        .filter(|attempt| attempt.result == AppendResult::Indeterminate)
        .count();
    Pause {
        longest,
        longest_per_channel,
        answered_503,
        indeterminate,
    }
}

/// Appends sent after `since` (or at any time: `None`) that were answered 2xx.
pub fn accepted_since(history: &History, since: Option<Instant>) -> usize {
    history
        .appends()
        .iter()
        .filter(|attempt| attempt.result == AppendResult::Acknowledged)
        .filter(|attempt| since.is_none_or(|since| attempt.sent_at > since))
        .count()
}

pub fn assert_clean(report: &Report) {
    assert!(
        report.is_clean(),
        "checker: {report}\n{}",
        report.details.join("\n")
    );
}

/// The body of append `n` of a channel: unique across the run.
pub fn body_of(channel: &Channel, n: usize) -> String {
    json!({
        "env": channel.environment,
        "session": channel.session,
        "io": channel.io,
        "n": n,
        "text": "x".repeat(48),
    })
    .to_string()
}

pub async fn create_session(app: &TestApp, key: &str, external_id: &str) -> String {
    app.create_session_as(key, external_id).await["runId"]
        .as_str()
        .expect("runId")
        .to_owned()
}

/// Closes a session (retrying through faults).
pub async fn close_session(app: &TestApp, key: &str, session: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = app
            .client
            .post(app.url(&format!(
                "/api/v1/sessions/{}/close",
                crate::encode_segment(session)
            )))
            .bearer_auth(key)
            .json(&json!({"reason": "reliability"}))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map(|response| response.status().as_u16())
            .ok();
        if status == Some(200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "close never succeeded: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One append attempt, recorded in the history.
pub async fn append_once(
    app: &TestApp,
    history: &History,
    key: &str,
    channel: &Channel,
    part_id: Option<&str>,
    body: &str,
    send_order: u64,
) -> AppendResult {
    let mut request = app
        .client
        .post(app.url(&format!(
            "/realtime/v1/sessions/{}/{}/append",
            crate::encode_segment(&channel.session),
            channel.io
        )))
        .bearer_auth(key)
        .timeout(Duration::from_secs(20))
        .body(body.to_owned());
    if let Some(part_id) = part_id {
        request = request.header("X-Part-Id", part_id);
    }
    let sent_at = Instant::now();
    let status = request
        .send()
        .await
        .ok()
        .map(|response| response.status().as_u16());
    let result = AppendResult::of_status(status);
    history.record_append(AppendAttempt {
        channel: channel.clone(),
        part_id: part_id.map(str::to_owned),
        body_hash: checker::body_hash(body),
        send_order,
        result,
        status,
        sent_at,
        answered_at: Instant::now(),
    });
    result
}

/// Retries an append (same part id, same body) while its result is indeterminate.
#[expect(clippy::too_many_arguments, reason = "one append's full description")]
pub async fn append_settled(
    app: &TestApp,
    history: &History,
    key: &str,
    channel: &Channel,
    part_id: Option<&str>,
    body: &str,
    send_order: u64,
    give_up_after: Duration,
) -> AppendResult {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let result = append_once(app, history, key, channel, part_id, body, send_order).await;
        if result != AppendResult::Indeterminate || started.elapsed() >= give_up_after {
            return result;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Registers a waitpoint on `io` (idempotency key `key_suffix`, so that retries through faults
/// return the same waitpoint), retrying while the answer is indeterminate.
pub async fn register_waitpoint(
    app: &TestApp,
    history: &History,
    tenant: &Tenant,
    session: &str,
    io: &str,
    key_suffix: &str,
    give_up_after: Duration,
) -> Option<String> {
    let body = json!({
        "session": session,
        "io": io,
        "idempotencyKey": format!("{session}-{io}-{key_suffix}"),
    });
    register(app, history, tenant, session, io, &body, give_up_after).await
}

/// Registers a waitpoint with `body`, retrying while the answer is indeterminate.
pub async fn register(
    app: &TestApp,
    history: &History,
    tenant: &Tenant,
    session: &str,
    io: &str,
    body: &Value,
    give_up_after: Duration,
) -> Option<String> {
    let run = &tenant.runs[session];
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let sent_at = Instant::now();
        let response = app
            .client
            .post(app.url(&format!(
                "/api/v1/runs/{}/session-streams/wait",
                crate::encode_segment(run)
            )))
            .bearer_auth(&tenant.environment.key)
            .timeout(Duration::from_secs(30))
            .json(body)
            .send()
            .await;
        history.record_request(RequestAttempt {
            kind: "wait",
            status: response
                .as_ref()
                .ok()
                .map(|response| response.status().as_u16()),
            sent_at,
            answered_at: Instant::now(),
        });
        if let Ok(response) = response {
            let status = response.status().as_u16();
            if status == 200 {
                let answer: Value = response.json().await.unwrap_or_default();
                let id = answer["waitpointId"].as_str()?.to_owned();
                history.record_waitpoint(RegisteredWaitpoint {
                    id: id.clone(),
                    channel: Channel::new(&tenant.environment.id, session, io),
                });
                return Some(id);
            }
            assert!(
                !(400..500).contains(&status) || status == 408,
                "waitpoint registration refused: {status}"
            );
        }
        if started.elapsed() >= give_up_after {
            return None;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// One session's producer: sequential appends (every fourth on `out`), waitpoints on `in`,
/// client re-sends.
pub async fn produce(
    app: Arc<TestApp>,
    history: Arc<History>,
    tenant: Arc<Tenant>,
    session: String,
    plan: Plan,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    for n in plan.first..plan.first + plan.appends {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if plan.waitpoint_every > 0 && n % plan.waitpoint_every == 0 {
            register_waitpoint(
                &app,
                &history,
                &tenant,
                &session,
                "in",
                &n.to_string(),
                plan.give_up_after,
            )
            .await;
        }
        let io = if n % 4 == 3 { "out" } else { "in" };
        let channel = Channel::new(&tenant.environment.id, &session, io);
        let part_id = format!("p{n}-{}", tenant.tag());
        let body = body_of(&channel, n);
        let send = || {
            append_settled(
                &app,
                &history,
                &tenant.environment.key,
                &channel,
                Some(&part_id),
                &body,
                n as u64,
                plan.give_up_after,
            )
        };
        let result = send().await;
        if plan.resend_every > 0
            && n % plan.resend_every == plan.resend_every - 1
            && result == AppendResult::Acknowledged
        {
            send().await;
        }
    }
}

pub async fn join_all(mut producers: JoinSet<()>) {
    while let Some(result) = producers.join_next().await {
        result.expect("producer");
    }
}
