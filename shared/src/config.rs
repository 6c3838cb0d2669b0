//! Typed configuration from environment variables, with loopback defaults.
//!
//! Every variable is listed in the README. A bad value fails at start with a message that names
//! the variable. Tests build [`Settings`] from a map through [`Settings::from_lookup`].

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// A configuration variable that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration variable {variable} is invalid: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

/// Settings shared by the api and the worker. `Debug` redacts the secrets (see the impl below).
#[derive(Clone)]
pub struct Settings {
    /// `DATABASE_URL`: Postgres (`postgres://…`) or SQLite (`sqlite://…`).
    pub database_url: String,
    /// `AMQP_URL`: one AMQP URL, or the nodes of a RabbitMQ cluster as a comma-separated list
    /// (validated here; parsed into [`crate::broker::BrokerAddresses`] by the broker adapter).
    pub amqp_url: String,
    /// `SESSIONS_LOG_REPLICAS` (formerly `SESSIONS_QUORUM_GROUP_SIZE`, still read): replicas of
    /// each partition log when it is first declared (`x-initial-cluster-size`); `None`: the
    /// broker's default (every cluster node).
    pub log_replicas: Option<u16>,
    /// `SESSIONS_LOG_MAX_BYTES`: retention of each partition log by size (`x-max-length-bytes`).
    pub log_max_bytes: u64,
    /// `SESSIONS_LOG_MAX_AGE`: retention of each partition log by age (`x-max-age`, e.g. `7D`,
    /// `24h`, `90m`, `3600s`).
    pub log_max_age: String,
    /// `SESSIONS_LOG_SEGMENT_BYTES`: segment size of the partition logs
    /// (`x-stream-max-segment-size-bytes`); retention removes whole segments.
    pub log_segment_bytes: u64,
    /// `REDIS_URL`.
    pub redis_url: String,
    /// `SESSIONS_HTTP_ADDR`: where the api listens.
    pub http_addr: SocketAddr,
    /// `SESSIONS_METRICS_ADDR`: where the api serves `/metrics` (and `/healthz`) on a listener
    /// of its own, and not on `SESSIONS_HTTP_ADDR`; unset: `/metrics` is on the api listener.
    pub metrics_addr: Option<SocketAddr>,
    /// `SESSIONS_WORKER_HTTP_ADDR`: where `sessions-worker` serves `/healthz`, `/readyz` and
    /// `/metrics`.
    pub worker_http_addr: SocketAddr,
    /// `SESSIONS_PARTITIONS`: number of partition logs (default 8); fixed per deployment: the
    /// api and the worker refuse to start with another count than the deployment's logs.
    pub partitions: u16,
    /// `SESSIONS_BROKER_PREFIX`: prefix of every exchange and queue name.
    pub broker_prefix: String,
    /// `SESSIONS_REDIS_PREFIX`: prefix of every Redis key.
    pub redis_prefix: String,
    /// `SESSIONS_CONFIRM_TIMEOUT_MS`: how long the api waits for a publisher confirm.
    pub confirm_timeout: Duration,
    /// `SESSIONS_REPLY_TIMEOUT_MS`: how long the api waits for the worker's reply.
    pub reply_timeout: Duration,
    /// `SESSIONS_IN_APPEND_WAIT_MS`: how long an `in` append waits for the worker to apply it
    /// (to answer with its `seq`) before it answers `{ok: true}` without one.
    pub in_append_wait: Duration,
    /// `SESSIONS_WRITER_TOKEN_TTL_SECONDS`: how long a writer access token (`x-s2-access-token`)
    /// lives.
    pub writer_token_ttl: Duration,
    /// `SESSIONS_WRITER_ACK_WAIT_MS`: how long a writer batch waits for the worker before its
    /// append session ends with a retryable error (the official client gives up on an ack after
    /// 5 s).
    pub writer_ack_wait: Duration,
    /// `SESSIONS_WRITER_IDLE_TIMEOUT_MS`: an append session that sends no frame for this long is
    /// ended (with a retryable error, so a live client opens a new one).
    pub writer_idle_timeout: Duration,
    /// `SESSIONS_HTTP2_IDLE_TIMEOUT_MS`: an HTTP/2 connection with no open stream for this long
    /// gets a GOAWAY (the official writer never closes its connection itself).
    pub http2_idle_timeout: Duration,
    /// `SESSIONS_HTTP_HEADER_READ_TIMEOUT_MS`: how long a client may take to send a request's
    /// headers (HTTP/1.1; also how long a keep-alive connection may stay idle), and how long a
    /// connection may stay open without sending any request (both protocols).
    pub header_read_timeout: Duration,
    /// `SESSIONS_HTTP_BODY_IDLE_TIMEOUT_MS`: longest silence between two pieces of a request
    /// body the api reads whole (then 408 and the connection is closed).
    pub body_idle_timeout: Duration,
    /// `SESSIONS_HTTP_BODY_READ_TIMEOUT_MS`: longest time to receive a whole request body the
    /// api reads whole, however steadily it trickles in (then 408).
    pub body_read_timeout: Duration,
    /// `SESSIONS_MAX_CONNECTIONS`: open client connections per api instance; past it new ones
    /// are closed at once. Default: the open-files limit minus 256 (for the database pool, the
    /// broker and the api's own files), at least 64.
    pub max_connections: usize,
    /// `SESSIONS_HTTP2_MAX_CONCURRENT_STREAMS`: streams one HTTP/2 connection may have open.
    pub http2_max_concurrent_streams: u32,
    /// `SESSIONS_HTTP2_KEEPALIVE_MS`: an HTTP/2 connection silent this long gets a ping, and is
    /// closed when the answer does not come within the same time.
    pub http2_keep_alive: Duration,
    /// `SESSIONS_MAX_SSE_PER_ENVIRONMENT`: live SSE streams one environment may hold open on one
    /// api instance (past it: 429).
    pub max_sse_per_environment: usize,
    /// `SESSIONS_MAX_SSE_PER_TOKEN`: live SSE streams one public access token may hold open on
    /// one api instance (past it: 429).
    pub max_sse_per_token: usize,
    /// `SESSIONS_MAX_APPENDS_IN_FLIGHT`: appends one api instance handles at once (past it: 503
    /// with `Retry-After`, nothing read or written).
    pub max_appends_in_flight: usize,
    /// `SESSIONS_MAX_APPEND_BYTES`: largest append body.
    pub max_append_bytes: usize,
    /// `SESSIONS_MAX_JSON_BYTES`: largest JSON request body of the other routes.
    pub max_json_bytes: usize,
    /// `SESSIONS_MAX_SNAPSHOT_BYTES`: largest chat snapshot blob.
    pub max_snapshot_bytes: usize,
    /// `SESSIONS_MAX_DISCARD_BYTES`: how much of a request body the api did not read (a refusal
    /// such as 413, answered from the headers or after part of the body) it reads and throws
    /// away, so that a client still sending receives the answer instead of a connection reset.
    /// `0`: never read them (the answer closes the connection).
    pub max_discard_bytes: u64,
    /// `SESSIONS_DISCARD_TIMEOUT_MS`: how long the api spends discarding such a body at most
    /// (a sender slower than that gets the answer with `Connection: close` when the time is up).
    pub discard_timeout: Duration,
    /// `SESSIONS_PUBLISH_BATCH_MAX`: most commands in one broker message.
    pub publish_batch_max: usize,
    /// `SESSIONS_PUBLISH_LINGER_US`: after a partition's first pending command, how long the
    /// api waits for more before it publishes them as one broker message.
    pub publish_linger: Duration,
    /// `SESSIONS_WORKER_BATCH_MAX`: most broker messages applied in one transaction.
    pub worker_batch_max: usize,
    /// `SESSIONS_WORKER_BATCH_LINGER_MS`: after a batch's first message, how long the worker
    /// waits for more before it applies the batch (fewer, larger transactions under load).
    pub worker_batch_linger: Duration,
    /// `SESSIONS_RETENTION_AFTER_CLOSE_SECONDS`: sessions closed or expired longer ago than
    /// this are purged with everything that belongs to them; `None` (0, the default): never.
    pub retention_after_close: Option<Duration>,
    /// `SESSIONS_WORKER_PREFETCH`: how many messages of each partition log a worker reads
    /// ahead of what it has applied (the stream consumer's prefetch).
    pub worker_prefetch: u16,
    /// `SESSIONS_WORKER_APPLY_LANES`: batches a worker applies at once, each its own
    /// transaction over its own share of the partitions (`domain::partition::apply_lane_of`).
    pub worker_apply_lanes: usize,
    /// `SESSIONS_CLAIM_TTL_MS`: lifetime of a dedup claim in Redis.
    pub claim_ttl: Duration,
    /// `SESSIONS_RETRY_BUDGET_MS`: how long the worker retries a transient failure while holding
    /// a delivery, before it gives the partition back.
    pub retry_budget: Duration,
    /// `WORKER_INDEX`: this worker's place among `WORKER_COUNT` workers; its home partitions
    /// are those with `p % WORKER_COUNT == WORKER_INDEX`.
    pub worker_index: u16,
    /// `WORKER_COUNT`: how many workers share the partitions (1: every partition is home).
    pub worker_count: u16,
    /// `SESSIONS_WORKER_STANDBY_DELAY_MS`: how long after starting a worker begins to take
    /// over other workers' partitions whose lease expired (so that workers starting together
    /// each get their home partitions first).
    pub worker_standby_delay: Duration,
    /// `SESSIONS_PARTITION_LEASE_MS`: how long a worker's claim on a partition lasts without
    /// renewal (renewed every third of it): a silent worker's partitions are taken over after
    /// at most this long.
    pub partition_lease: Duration,
    /// `SESSIONS_DRAIN_LEGACY_QUEUES`: `1` during an upgrade from the version with quorum
    /// partition queues: each worker first applies what its home partitions' old queues still
    /// hold, then deletes them (README, "Upgrading from partition queues"). Default off.
    pub drain_legacy_queues: bool,
    /// `SESSIONS_AUTH_CACHE_TTL_MS`: how long an api instance reuses a secret-key lookup (so
    /// also how long a revocation can take to reach it); zero disables the cache.
    pub auth_cache_ttl: Duration,
    /// `SESSIONS_SESSION_CACHE_TTL_MS`: how long an api instance reuses a session it read for
    /// the append route (invalidated at once by the workers' notices; zero disables the
    /// cache). Workers also read it: an append accepted up to this long after its session was
    /// closed is still applied (the api answered it 2xx on a state it could not know was stale).
    pub session_cache_ttl: Duration,
    /// `SESSIONS_DB_MAX_CONNECTIONS`.
    pub db_max_connections: u32,
    /// `SESSIONS_JWT_ISSUER`.
    pub jwt_issuer: String,
    /// `SESSIONS_JWT_AUDIENCE`.
    pub jwt_audience: String,
    /// `SESSIONS_PUBLIC_URL`: the api's external base URL (scheme, host, port, optional path
    /// prefix), for URLs in responses: snapshot URLs and the writer endpoint (`x-s2-endpoint`).
    /// Default: `http://` and the request's `Host`.
    pub public_url: Option<String>,
    /// `SESSIONS_MASTER_KEY`: 64 hex characters (32 bytes) that encrypt the stored copies of
    /// secret keys (needed to verify public access tokens). Unset: a built-in development key,
    /// announced by a warning at start; never run production on it.
    pub master_key: [u8; 32],
    /// Whether [`Settings::master_key`] is the built-in development key.
    pub master_key_is_default: bool,
    /// `SESSIONS_RATE_LIMIT_PER_SECOND`: authenticated requests per second per environment
    /// (per api instance); `0` disables rate limiting.
    pub rate_limit_per_second: u32,
    /// `SESSIONS_RATE_LIMIT_BURST`: how many requests an environment may send at once above its
    /// rate (the bucket size); default twice the rate.
    pub rate_limit_burst: u32,
}

/// Credentials never reach a log line through `{:?}`: the URLs lose their user information and
/// the master key is not shown.
impl std::fmt::Debug for Settings {
    /// The variables that give these settings ([`Settings::to_env`]), with the secrets
    /// redacted: credentials in URLs, and the master key (absent: the development key).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = f.debug_map();
        for (variable, value) in self.to_env() {
            let value = match variable {
                "DATABASE_URL" | "AMQP_URL" | "REDIS_URL" | "SESSIONS_PUBLIC_URL" => {
                    without_credentials(&value)
                }
                "SESSIONS_MASTER_KEY" => "[redacted]".to_owned(),
                _ => value,
            };
            shown.entry(&variable, &value);
        }
        shown.finish()
    }
}

/// `url` (or a comma-separated list of URLs) with any `user:password@` replaced by `***@`.
fn without_credentials(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let Some(scheme_end) = one.find("://").map(|at| at + 3) else {
                return one.to_owned();
            };
            // The user information ends at the last `@` of the authority (before any path,
            // query or fragment); an `@` further on is not a credential.
            let rest = &one[scheme_end..];
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{}***{}", &one[..scheme_end], &rest[at..]),
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The master key used when `SESSIONS_MASTER_KEY` is unset: fine for a laptop, never for
/// production (anyone can read it here).
const DEVELOPMENT_MASTER_KEY: [u8; 32] = *b"sessions-development-master-key!";

fn parse_master_key(text: &str) -> Result<[u8; 32], ConfigError> {
    hex::decode(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| ConfigError {
            variable: "SESSIONS_MASTER_KEY",
            message: "must be 64 hex characters (32 bytes); e.g. `openssl rand -hex 32`".into(),
        })
}

fn parse<T: FromStr>(
    variable: &'static str,
    raw: Option<String>,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match raw {
        None => Ok(default),
        Some(value) => value.trim().parse().map_err(|error: T::Err| ConfigError {
            variable,
            message: format!("{value:?}: {error}"),
        }),
    }
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    variable: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if value < min || value > max {
        return Err(ConfigError {
            variable,
            message: format!("{value} is outside {min}..={max}"),
        });
    }
    Ok(value)
}

fn url_with_scheme(
    variable: &'static str,
    value: String,
    schemes: &[&str],
) -> Result<String, ConfigError> {
    if schemes.iter().any(|scheme| value.starts_with(scheme)) {
        Ok(value)
    } else {
        Err(ConfigError {
            variable,
            message: format!("must start with one of {schemes:?}"),
        })
    }
}

/// `AMQP_URL`: one or more `amqp://`/`amqps://` URLs separated by commas.
fn amqp_urls(value: String) -> Result<String, ConfigError> {
    crate::broker::BrokerAddresses::parse(&value)
        .map(|_| value)
        .map_err(|message| ConfigError {
            variable: "AMQP_URL",
            message,
        })
}

fn name_prefix(variable: &'static str, value: String) -> Result<String, ConfigError> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if valid {
        Ok(value)
    } else {
        Err(ConfigError {
            variable,
            message: "must be 1–64 characters of [A-Za-z0-9_.-]".into(),
        })
    }
}

fn millis(
    variable: &'static str,
    raw: Option<String>,
    default_ms: u64,
) -> Result<Duration, ConfigError> {
    let ms = in_range(
        variable,
        parse(variable, raw, default_ms)?,
        1,
        24 * 3600 * 1000,
    )?;
    Ok(Duration::from_millis(ms))
}

/// `SESSIONS_RATE_LIMIT_PER_SECOND` and `SESSIONS_RATE_LIMIT_BURST`.
fn rate_limit(get: impl Fn(&str) -> Option<String>) -> Result<(u32, u32), ConfigError> {
    let per_second = in_range(
        "SESSIONS_RATE_LIMIT_PER_SECOND",
        parse(
            "SESSIONS_RATE_LIMIT_PER_SECOND",
            get("SESSIONS_RATE_LIMIT_PER_SECOND"),
            1000_u32,
        )?,
        0,
        1_000_000,
    )?;
    let burst = in_range(
        "SESSIONS_RATE_LIMIT_BURST",
        parse(
            "SESSIONS_RATE_LIMIT_BURST",
            get("SESSIONS_RATE_LIMIT_BURST"),
            per_second.saturating_mul(2).max(1),
        )?,
        1,
        10_000_000,
    )?;
    Ok((per_second, burst))
}

/// `SESSIONS_LOG_REPLICAS`, or the variable it replaced, `SESSIONS_QUORUM_GROUP_SIZE`.
fn log_replicas(get: impl Fn(&str) -> Option<String>) -> Result<Option<u16>, ConfigError> {
    for variable in ["SESSIONS_LOG_REPLICAS", "SESSIONS_QUORUM_GROUP_SIZE"] {
        if let Some(raw) = get(variable) {
            return Ok(Some(in_range(
                variable,
                parse(variable, Some(raw), 0_u16)?,
                1,
                99,
            )?));
        }
    }
    Ok(None)
}

/// `SESSIONS_LOG_MAX_AGE`: a positive number and one unit of `Y M D h m s` (RabbitMQ's
/// `x-max-age` notation).
fn log_max_age(raw: Option<String>) -> Result<String, ConfigError> {
    let value = raw.unwrap_or_else(|| "7D".into()).trim().to_owned();
    let (number, unit) = value.split_at(value.len().saturating_sub(1));
    let valid = ["Y", "M", "D", "h", "m", "s"].contains(&unit)
        && number.parse::<u32>().is_ok_and(|number| number > 0);
    if valid {
        Ok(value)
    } else {
        Err(ConfigError {
            variable: "SESSIONS_LOG_MAX_AGE",
            message: format!(
                "{value:?}: must be a positive number and one unit of Y M D h m s, e.g. 7D or 24h"
            ),
        })
    }
}

/// `SESSIONS_LOG_SEGMENT_BYTES`, at most a quarter of `SESSIONS_LOG_MAX_BYTES` (retention removes
/// whole segments, so a log of one segment would never shrink).
fn log_segment_bytes(get: impl Fn(&str) -> Option<String>) -> Result<u64, ConfigError> {
    let max_bytes: u64 = parse(
        "SESSIONS_LOG_MAX_BYTES",
        get("SESSIONS_LOG_MAX_BYTES"),
        256 << 20,
    )?;
    let default = (max_bytes / 16).clamp(64 << 10, 64 << 20);
    let segment = parse(
        "SESSIONS_LOG_SEGMENT_BYTES",
        get("SESSIONS_LOG_SEGMENT_BYTES"),
        default,
    )?;
    in_range(
        "SESSIONS_LOG_SEGMENT_BYTES",
        segment,
        64 << 10,
        (max_bytes / 4).max(64 << 10),
    )
}

/// File descriptors the api keeps for its own work (database pool, broker, listeners, files).
const RESERVED_FILE_DESCRIPTORS: usize = 256;

/// The soft open-files limit of this process (`/proc/self/limits`), `None` where it cannot be read.
pub fn open_files_soft_limit() -> Option<usize> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|line| line.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The default connection budget: the soft open-files limit (1,024 where it cannot be read)
/// minus [`RESERVED_FILE_DESCRIPTORS`], at least 64.
fn default_max_connections() -> usize {
    open_files_soft_limit()
        .unwrap_or(1024)
        .saturating_sub(RESERVED_FILE_DESCRIPTORS)
        .max(64)
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let worker_count = in_range(
            "WORKER_COUNT",
            parse("WORKER_COUNT", get("WORKER_COUNT"), 1)?,
            1,
            1024,
        )?;
        let worker_index: u16 = parse("WORKER_INDEX", get("WORKER_INDEX"), 0)?;
        let (rate_limit_per_second, rate_limit_burst) = rate_limit(get)?;
        if worker_index >= worker_count {
            return Err(ConfigError {
                variable: "WORKER_INDEX",
                message: format!(
                    "{worker_index} must be below WORKER_COUNT ({worker_count}): workers are numbered from 0"
                ),
            });
        }
        Ok(Self {
            database_url: url_with_scheme(
                "DATABASE_URL",
                get("DATABASE_URL")
                    .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/sessions".into()),
                &["postgres://", "postgresql://", "sqlite:"],
            )?,
            amqp_url: amqp_urls(
                get("AMQP_URL")
                    .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10".into()),
            )?,
            log_replicas: log_replicas(get)?,
            log_max_bytes: in_range(
                "SESSIONS_LOG_MAX_BYTES",
                parse(
                    "SESSIONS_LOG_MAX_BYTES",
                    get("SESSIONS_LOG_MAX_BYTES"),
                    256_u64 << 20,
                )?,
                1 << 20,
                1 << 50,
            )?,
            log_max_age: log_max_age(get("SESSIONS_LOG_MAX_AGE"))?,
            log_segment_bytes: log_segment_bytes(get)?,
            redis_url: url_with_scheme(
                "REDIS_URL",
                get("REDIS_URL").unwrap_or_else(|| "redis://127.0.0.1:6379/".into()),
                &["redis://"],
            )?,
            http_addr: parse(
                "SESSIONS_HTTP_ADDR",
                get("SESSIONS_HTTP_ADDR"),
                SocketAddr::from(([127, 0, 0, 1], 3030)),
            )?,
            metrics_addr: get("SESSIONS_METRICS_ADDR")
                .map(|raw| {
                    parse(
                        "SESSIONS_METRICS_ADDR",
                        Some(raw),
                        SocketAddr::from(([0; 4], 0)),
                    )
                })
                .transpose()?,
            worker_http_addr: parse(
                "SESSIONS_WORKER_HTTP_ADDR",
                get("SESSIONS_WORKER_HTTP_ADDR"),
                SocketAddr::from(([127, 0, 0, 1], 3031)),
            )?,
            partitions: in_range(
                "SESSIONS_PARTITIONS",
                parse("SESSIONS_PARTITIONS", get("SESSIONS_PARTITIONS"), 8)?,
                1,
                1024,
            )?,
            broker_prefix: name_prefix(
                "SESSIONS_BROKER_PREFIX",
                get("SESSIONS_BROKER_PREFIX").unwrap_or_else(|| "sessions".into()),
            )?,
            redis_prefix: name_prefix(
                "SESSIONS_REDIS_PREFIX",
                get("SESSIONS_REDIS_PREFIX").unwrap_or_else(|| "sessions".into()),
            )?,
            confirm_timeout: millis(
                "SESSIONS_CONFIRM_TIMEOUT_MS",
                get("SESSIONS_CONFIRM_TIMEOUT_MS"),
                5_000,
            )?,
            reply_timeout: millis(
                "SESSIONS_REPLY_TIMEOUT_MS",
                get("SESSIONS_REPLY_TIMEOUT_MS"),
                15_000,
            )?,
            in_append_wait: millis(
                "SESSIONS_IN_APPEND_WAIT_MS",
                get("SESSIONS_IN_APPEND_WAIT_MS"),
                2_000,
            )?,
            writer_token_ttl: Duration::from_secs(in_range(
                "SESSIONS_WRITER_TOKEN_TTL_SECONDS",
                parse(
                    "SESSIONS_WRITER_TOKEN_TTL_SECONDS",
                    get("SESSIONS_WRITER_TOKEN_TTL_SECONDS"),
                    86_400_u64,
                )?,
                60,
                30 * 86_400,
            )?),
            writer_ack_wait: millis(
                "SESSIONS_WRITER_ACK_WAIT_MS",
                get("SESSIONS_WRITER_ACK_WAIT_MS"),
                4_000,
            )?,
            writer_idle_timeout: millis(
                "SESSIONS_WRITER_IDLE_TIMEOUT_MS",
                get("SESSIONS_WRITER_IDLE_TIMEOUT_MS"),
                60_000,
            )?,
            http2_idle_timeout: millis(
                "SESSIONS_HTTP2_IDLE_TIMEOUT_MS",
                get("SESSIONS_HTTP2_IDLE_TIMEOUT_MS"),
                2_000,
            )?,
            header_read_timeout: millis(
                "SESSIONS_HTTP_HEADER_READ_TIMEOUT_MS",
                get("SESSIONS_HTTP_HEADER_READ_TIMEOUT_MS"),
                30_000,
            )?,
            body_idle_timeout: millis(
                "SESSIONS_HTTP_BODY_IDLE_TIMEOUT_MS",
                get("SESSIONS_HTTP_BODY_IDLE_TIMEOUT_MS"),
                30_000,
            )?,
            body_read_timeout: millis(
                "SESSIONS_HTTP_BODY_READ_TIMEOUT_MS",
                get("SESSIONS_HTTP_BODY_READ_TIMEOUT_MS"),
                120_000,
            )?,
            max_connections: in_range(
                "SESSIONS_MAX_CONNECTIONS",
                parse(
                    "SESSIONS_MAX_CONNECTIONS",
                    get("SESSIONS_MAX_CONNECTIONS"),
                    default_max_connections(),
                )?,
                1,
                10_000_000,
            )?,
            max_sse_per_environment: in_range(
                "SESSIONS_MAX_SSE_PER_ENVIRONMENT",
                parse(
                    "SESSIONS_MAX_SSE_PER_ENVIRONMENT",
                    get("SESSIONS_MAX_SSE_PER_ENVIRONMENT"),
                    10_000,
                )?,
                1,
                10_000_000,
            )?,
            max_sse_per_token: in_range(
                "SESSIONS_MAX_SSE_PER_TOKEN",
                parse(
                    "SESSIONS_MAX_SSE_PER_TOKEN",
                    get("SESSIONS_MAX_SSE_PER_TOKEN"),
                    32,
                )?,
                1,
                1_000_000,
            )?,
            max_appends_in_flight: in_range(
                "SESSIONS_MAX_APPENDS_IN_FLIGHT",
                parse(
                    "SESSIONS_MAX_APPENDS_IN_FLIGHT",
                    get("SESSIONS_MAX_APPENDS_IN_FLIGHT"),
                    1_000,
                )?,
                1,
                1_000_000,
            )?,
            http2_max_concurrent_streams: in_range(
                "SESSIONS_HTTP2_MAX_CONCURRENT_STREAMS",
                parse(
                    "SESSIONS_HTTP2_MAX_CONCURRENT_STREAMS",
                    get("SESSIONS_HTTP2_MAX_CONCURRENT_STREAMS"),
                    256,
                )?,
                1,
                100_000,
            )?,
            http2_keep_alive: millis(
                "SESSIONS_HTTP2_KEEPALIVE_MS",
                get("SESSIONS_HTTP2_KEEPALIVE_MS"),
                20_000,
            )?,
            max_append_bytes: in_range(
                "SESSIONS_MAX_APPEND_BYTES",
                parse(
                    "SESSIONS_MAX_APPEND_BYTES",
                    get("SESSIONS_MAX_APPEND_BYTES"),
                    1 << 20,
                )?,
                1,
                16 << 20,
            )?,
            max_json_bytes: in_range(
                "SESSIONS_MAX_JSON_BYTES",
                parse(
                    "SESSIONS_MAX_JSON_BYTES",
                    get("SESSIONS_MAX_JSON_BYTES"),
                    256 << 10,
                )?,
                1024,
                16 << 20,
            )?,
            max_snapshot_bytes: in_range(
                "SESSIONS_MAX_SNAPSHOT_BYTES",
                parse(
                    "SESSIONS_MAX_SNAPSHOT_BYTES",
                    get("SESSIONS_MAX_SNAPSHOT_BYTES"),
                    10 << 20,
                )?,
                1,
                256 << 20,
            )?,
            max_discard_bytes: in_range(
                "SESSIONS_MAX_DISCARD_BYTES",
                parse(
                    "SESSIONS_MAX_DISCARD_BYTES",
                    get("SESSIONS_MAX_DISCARD_BYTES"),
                    16_u64 << 20,
                )?,
                0,
                1 << 30,
            )?,
            discard_timeout: Duration::from_millis(in_range(
                "SESSIONS_DISCARD_TIMEOUT_MS",
                parse(
                    "SESSIONS_DISCARD_TIMEOUT_MS",
                    get("SESSIONS_DISCARD_TIMEOUT_MS"),
                    10_000_u64,
                )?,
                0,
                600_000,
            )?),
            publish_batch_max: in_range(
                "SESSIONS_PUBLISH_BATCH_MAX",
                parse(
                    "SESSIONS_PUBLISH_BATCH_MAX",
                    get("SESSIONS_PUBLISH_BATCH_MAX"),
                    200,
                )?,
                1,
                10_000,
            )?,
            publish_linger: Duration::from_micros(in_range(
                "SESSIONS_PUBLISH_LINGER_US",
                parse(
                    "SESSIONS_PUBLISH_LINGER_US",
                    get("SESSIONS_PUBLISH_LINGER_US"),
                    500_u64,
                )?,
                0,
                100_000,
            )?),
            worker_batch_max: in_range(
                "SESSIONS_WORKER_BATCH_MAX",
                parse(
                    "SESSIONS_WORKER_BATCH_MAX",
                    get("SESSIONS_WORKER_BATCH_MAX"),
                    512,
                )?,
                1,
                10_000,
            )?,
            retention_after_close: match in_range(
                "SESSIONS_RETENTION_AFTER_CLOSE_SECONDS",
                parse(
                    "SESSIONS_RETENTION_AFTER_CLOSE_SECONDS",
                    get("SESSIONS_RETENTION_AFTER_CLOSE_SECONDS"),
                    0_u64,
                )?,
                0,
                100 * 365 * 24 * 3600,
            )? {
                0 => None,
                seconds => Some(Duration::from_secs(seconds)),
            },
            worker_batch_linger: Duration::from_millis(in_range(
                "SESSIONS_WORKER_BATCH_LINGER_MS",
                parse(
                    "SESSIONS_WORKER_BATCH_LINGER_MS",
                    get("SESSIONS_WORKER_BATCH_LINGER_MS"),
                    0_u64,
                )?,
                0,
                1_000,
            )?),
            worker_prefetch: in_range(
                "SESSIONS_WORKER_PREFETCH",
                parse(
                    "SESSIONS_WORKER_PREFETCH",
                    get("SESSIONS_WORKER_PREFETCH"),
                    500_u16,
                )?,
                1,
                u16::MAX,
            )?,
            worker_apply_lanes: in_range(
                "SESSIONS_WORKER_APPLY_LANES",
                parse(
                    "SESSIONS_WORKER_APPLY_LANES",
                    get("SESSIONS_WORKER_APPLY_LANES"),
                    2,
                )?,
                1,
                64,
            )?,
            claim_ttl: millis(
                "SESSIONS_CLAIM_TTL_MS",
                get("SESSIONS_CLAIM_TTL_MS"),
                30_000,
            )?,
            retry_budget: millis(
                "SESSIONS_RETRY_BUDGET_MS",
                get("SESSIONS_RETRY_BUDGET_MS"),
                60_000,
            )?,
            worker_index,
            worker_count,
            worker_standby_delay: millis(
                "SESSIONS_WORKER_STANDBY_DELAY_MS",
                get("SESSIONS_WORKER_STANDBY_DELAY_MS"),
                5_000,
            )?,
            partition_lease: Duration::from_millis(in_range(
                "SESSIONS_PARTITION_LEASE_MS",
                parse(
                    "SESSIONS_PARTITION_LEASE_MS",
                    get("SESSIONS_PARTITION_LEASE_MS"),
                    5_000_u64,
                )?,
                300,
                600_000,
            )?),
            drain_legacy_queues: match get("SESSIONS_DRAIN_LEGACY_QUEUES").as_deref() {
                None | Some("0" | "false") => false,
                Some("1" | "true") => true,
                Some(other) => {
                    return Err(ConfigError {
                        variable: "SESSIONS_DRAIN_LEGACY_QUEUES",
                        message: format!("{other:?}: must be 1 or 0"),
                    });
                }
            },
            session_cache_ttl: Duration::from_millis(in_range(
                "SESSIONS_SESSION_CACHE_TTL_MS",
                parse(
                    "SESSIONS_SESSION_CACHE_TTL_MS",
                    get("SESSIONS_SESSION_CACHE_TTL_MS"),
                    1_000_u64,
                )?,
                0,
                60_000,
            )?),
            auth_cache_ttl: Duration::from_millis(in_range(
                "SESSIONS_AUTH_CACHE_TTL_MS",
                parse(
                    "SESSIONS_AUTH_CACHE_TTL_MS",
                    get("SESSIONS_AUTH_CACHE_TTL_MS"),
                    1_000_u64,
                )?,
                0,
                60_000,
            )?),
            db_max_connections: in_range(
                "SESSIONS_DB_MAX_CONNECTIONS",
                parse(
                    "SESSIONS_DB_MAX_CONNECTIONS",
                    get("SESSIONS_DB_MAX_CONNECTIONS"),
                    10,
                )?,
                1,
                1000,
            )?,
            jwt_issuer: get("SESSIONS_JWT_ISSUER")
                .unwrap_or_else(|| "https://id.trigger.dev".into()),
            jwt_audience: get("SESSIONS_JWT_AUDIENCE")
                .unwrap_or_else(|| "https://api.trigger.dev".into()),
            master_key: match get("SESSIONS_MASTER_KEY") {
                None => DEVELOPMENT_MASTER_KEY,
                Some(text) => parse_master_key(&text)?,
            },
            master_key_is_default: get("SESSIONS_MASTER_KEY").is_none(),
            public_url: get("SESSIONS_PUBLIC_URL")
                .map(|url| url_with_scheme("SESSIONS_PUBLIC_URL", url, &["http://", "https://"]))
                .transpose()?,
            rate_limit_per_second,
            rate_limit_burst,
        })
    }

    /// The environment variables that reproduce these settings ([`Settings::from_lookup`] of
    /// them gives the same settings back): how a process hands its configuration to a process
    /// it starts (the test harness's child apis, workers and admin commands). Carries the
    /// secrets as they are (URLs with passwords, a master key that is not the default): for a
    /// child's environment, never for a log.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        // Destructured, so that a new field fails to compile until it is listed here.
        let Self {
            database_url,
            amqp_url,
            log_replicas,
            log_max_bytes,
            log_max_age,
            log_segment_bytes,
            redis_url,
            http_addr,
            metrics_addr,
            worker_http_addr,
            partitions,
            broker_prefix,
            redis_prefix,
            confirm_timeout,
            reply_timeout,
            in_append_wait,
            writer_token_ttl,
            writer_ack_wait,
            writer_idle_timeout,
            http2_idle_timeout,
            header_read_timeout,
            body_idle_timeout,
            body_read_timeout,
            max_connections,
            http2_max_concurrent_streams,
            http2_keep_alive,
            max_sse_per_environment,
            max_sse_per_token,
            max_appends_in_flight,
            max_append_bytes,
            max_json_bytes,
            max_snapshot_bytes,
            max_discard_bytes,
            discard_timeout,
            publish_batch_max,
            publish_linger,
            worker_batch_max,
            worker_batch_linger,
            retention_after_close,
            worker_prefetch,
            worker_apply_lanes,
            claim_ttl,
            retry_budget,
            worker_index,
            worker_count,
            worker_standby_delay,
            partition_lease,
            drain_legacy_queues,
            auth_cache_ttl,
            session_cache_ttl,
            db_max_connections,
            jwt_issuer,
            jwt_audience,
            public_url,
            master_key,
            master_key_is_default,
            rate_limit_per_second,
            rate_limit_burst,
        } = self;
        let millis = |duration: &Duration| duration.as_millis().to_string();
        let mut env = vec![
            ("DATABASE_URL", database_url.clone()),
            ("AMQP_URL", amqp_url.clone()),
            ("SESSIONS_LOG_MAX_BYTES", log_max_bytes.to_string()),
            ("SESSIONS_LOG_MAX_AGE", log_max_age.clone()),
            ("SESSIONS_LOG_SEGMENT_BYTES", log_segment_bytes.to_string()),
            ("REDIS_URL", redis_url.clone()),
            ("SESSIONS_HTTP_ADDR", http_addr.to_string()),
            ("SESSIONS_WORKER_HTTP_ADDR", worker_http_addr.to_string()),
            ("SESSIONS_PARTITIONS", partitions.to_string()),
            ("SESSIONS_BROKER_PREFIX", broker_prefix.clone()),
            ("SESSIONS_REDIS_PREFIX", redis_prefix.clone()),
            ("SESSIONS_CONFIRM_TIMEOUT_MS", millis(confirm_timeout)),
            ("SESSIONS_REPLY_TIMEOUT_MS", millis(reply_timeout)),
            ("SESSIONS_IN_APPEND_WAIT_MS", millis(in_append_wait)),
            (
                "SESSIONS_WRITER_TOKEN_TTL_SECONDS",
                writer_token_ttl.as_secs().to_string(),
            ),
            ("SESSIONS_WRITER_ACK_WAIT_MS", millis(writer_ack_wait)),
            (
                "SESSIONS_WRITER_IDLE_TIMEOUT_MS",
                millis(writer_idle_timeout),
            ),
            ("SESSIONS_HTTP2_IDLE_TIMEOUT_MS", millis(http2_idle_timeout)),
            (
                "SESSIONS_HTTP_HEADER_READ_TIMEOUT_MS",
                millis(header_read_timeout),
            ),
            (
                "SESSIONS_HTTP_BODY_IDLE_TIMEOUT_MS",
                millis(body_idle_timeout),
            ),
            (
                "SESSIONS_HTTP_BODY_READ_TIMEOUT_MS",
                millis(body_read_timeout),
            ),
            ("SESSIONS_MAX_CONNECTIONS", max_connections.to_string()),
            (
                "SESSIONS_HTTP2_MAX_CONCURRENT_STREAMS",
                http2_max_concurrent_streams.to_string(),
            ),
            ("SESSIONS_HTTP2_KEEPALIVE_MS", millis(http2_keep_alive)),
            (
                "SESSIONS_MAX_SSE_PER_ENVIRONMENT",
                max_sse_per_environment.to_string(),
            ),
            ("SESSIONS_MAX_SSE_PER_TOKEN", max_sse_per_token.to_string()),
            (
                "SESSIONS_MAX_APPENDS_IN_FLIGHT",
                max_appends_in_flight.to_string(),
            ),
            ("SESSIONS_MAX_APPEND_BYTES", max_append_bytes.to_string()),
            ("SESSIONS_MAX_JSON_BYTES", max_json_bytes.to_string()),
            (
                "SESSIONS_MAX_SNAPSHOT_BYTES",
                max_snapshot_bytes.to_string(),
            ),
            ("SESSIONS_MAX_DISCARD_BYTES", max_discard_bytes.to_string()),
            ("SESSIONS_DISCARD_TIMEOUT_MS", millis(discard_timeout)),
            ("SESSIONS_PUBLISH_BATCH_MAX", publish_batch_max.to_string()),
            (
                "SESSIONS_PUBLISH_LINGER_US",
                publish_linger.as_micros().to_string(),
            ),
            ("SESSIONS_WORKER_BATCH_MAX", worker_batch_max.to_string()),
            (
                "SESSIONS_WORKER_BATCH_LINGER_MS",
                millis(worker_batch_linger),
            ),
            (
                "SESSIONS_RETENTION_AFTER_CLOSE_SECONDS",
                retention_after_close
                    .map_or(0, |after| after.as_secs())
                    .to_string(),
            ),
            ("SESSIONS_WORKER_PREFETCH", worker_prefetch.to_string()),
            (
                "SESSIONS_WORKER_APPLY_LANES",
                worker_apply_lanes.to_string(),
            ),
            ("SESSIONS_CLAIM_TTL_MS", millis(claim_ttl)),
            ("SESSIONS_RETRY_BUDGET_MS", millis(retry_budget)),
            ("WORKER_INDEX", worker_index.to_string()),
            ("WORKER_COUNT", worker_count.to_string()),
            (
                "SESSIONS_WORKER_STANDBY_DELAY_MS",
                millis(worker_standby_delay),
            ),
            ("SESSIONS_PARTITION_LEASE_MS", millis(partition_lease)),
            (
                "SESSIONS_DRAIN_LEGACY_QUEUES",
                if *drain_legacy_queues { "1" } else { "0" }.to_owned(),
            ),
            ("SESSIONS_AUTH_CACHE_TTL_MS", millis(auth_cache_ttl)),
            ("SESSIONS_SESSION_CACHE_TTL_MS", millis(session_cache_ttl)),
            (
                "SESSIONS_DB_MAX_CONNECTIONS",
                db_max_connections.to_string(),
            ),
            ("SESSIONS_JWT_ISSUER", jwt_issuer.clone()),
            ("SESSIONS_JWT_AUDIENCE", jwt_audience.clone()),
            (
                "SESSIONS_RATE_LIMIT_PER_SECOND",
                rate_limit_per_second.to_string(),
            ),
            ("SESSIONS_RATE_LIMIT_BURST", rate_limit_burst.to_string()),
        ];
        if let Some(replicas) = log_replicas {
            env.push(("SESSIONS_LOG_REPLICAS", replicas.to_string()));
        }
        if let Some(address) = metrics_addr {
            env.push(("SESSIONS_METRICS_ADDR", address.to_string()));
        }
        if let Some(url) = public_url {
            env.push(("SESSIONS_PUBLIC_URL", url.clone()));
        }
        // Unset means the development key (and the warning that goes with it).
        if !master_key_is_default {
            env.push(("SESSIONS_MASTER_KEY", hex::encode(master_key)));
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_carries_no_secret() {
        let mut settings = Settings::from_lookup(|_| None).expect("defaults");
        settings.database_url = "postgres://app:db-pass-123@db.internal:5432/sessions".into();
        settings.amqp_url =
            "amqp://mq:mq-pass-456@a:5672/%2f,amqps://mq:mq-pass-789@b:5671/%2f".into();
        settings.redis_url = "redis://:cache-pass-000@cache:6379".into();
        settings.master_key = [0xAB; 32];
        settings.master_key_is_default = false;
        let shown = format!("{settings:?}");
        for secret in [
            "db-pass-123",
            "mq-pass-456",
            "mq-pass-789",
            "cache-pass-000",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            !shown.contains("171, 171"),
            "the master key's bytes in {shown}"
        );
        assert!(!shown.to_lowercase().contains(&"ab".repeat(32)));
        assert!(
            shown.contains(r#""SESSIONS_MASTER_KEY": "[redacted]""#),
            "{shown}"
        );
        // What is not secret is still there to debug with.
        assert!(shown.contains("postgres://***@db.internal:5432/sessions"));
        assert!(shown.contains("amqp://***@a:5672/%2f,amqps://***@b:5671/%2f"));
        assert!(shown.contains(r#""SESSIONS_PARTITIONS": "8""#), "{shown}");
    }

    /// `to_env` then `from_lookup` gives the same settings, for the defaults and for settings
    /// where every optional value is set and the others differ from their defaults.
    #[test]
    fn settings_survive_the_trip_through_environment_variables() {
        let mut changed = Settings::from_lookup(|_| None).expect("defaults");
        changed.database_url = "postgres://app:db-pass@db.internal:5432/other".into();
        changed.amqp_url = "amqp://mq:mq-pass@a:5672/%2f,amqp://mq:mq-pass@b:5672/%2f".into();
        changed.redis_url = "redis://:cache-pass@cache:6379/2".into();
        changed.log_replicas = Some(3);
        changed.log_max_age = "24h".into();
        changed.metrics_addr = Some(SocketAddr::from(([0, 0, 0, 0], 3032)));
        changed.http_addr = SocketAddr::from(([10, 0, 0, 1], 8080));
        changed.partitions = 16;
        changed.reply_timeout = Duration::from_millis(1234);
        changed.writer_token_ttl = Duration::from_secs(3600);
        changed.discard_timeout = Duration::ZERO;
        changed.worker_batch_linger = Duration::from_millis(5);
        changed.publish_linger = Duration::from_micros(1_750);
        changed.retention_after_close = Some(Duration::from_secs(86_400));
        changed.worker_index = 2;
        changed.worker_count = 3;
        changed.drain_legacy_queues = true;
        changed.session_cache_ttl = Duration::ZERO;
        changed.public_url = Some("https://sessions.example.com/prefix".into());
        changed.master_key = [0xAB; 32];
        changed.master_key_is_default = false;
        changed.rate_limit_per_second = 0;
        changed.rate_limit_burst = 7;
        for original in [Settings::from_lookup(|_| None).expect("defaults"), changed] {
            let env: HashMap<&str, String> = original.to_env().into_iter().collect();
            let back = Settings::from_lookup(|name| env.get(name).cloned())
                .unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(format!("{back:?}"), format!("{original:?}"));
            // What `Debug` redacts, compared directly.
            assert_eq!(back.database_url, original.database_url);
            assert_eq!(back.amqp_url, original.amqp_url);
            assert_eq!(back.redis_url, original.redis_url);
            assert_eq!(back.master_key, original.master_key);
        }
    }

    #[test]
    fn urls_without_credentials_stay_as_they_are() {
        assert_eq!(
            without_credentials("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(
            without_credentials("redis://user@host:6379/0?x=a@b"),
            "redis://***@host:6379/0?x=a@b"
        );
        assert_eq!(
            without_credentials("postgres://localhost/db?user=a@b"),
            "postgres://localhost/db?user=a@b"
        );
    }
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_are_loopback() {
        let settings = settings(&[]).expect("defaults");
        assert_eq!(settings.http_addr.to_string(), "127.0.0.1:3030");
        assert_eq!(settings.metrics_addr, None);
        assert!(settings.database_url.contains("127.0.0.1"));
        assert_eq!(settings.partitions, 8);
        assert_eq!(settings.max_append_bytes, 1 << 20);
    }

    #[test]
    fn errors_name_the_variable() {
        let error = settings(&[("SESSIONS_PARTITIONS", "zero")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_PARTITIONS");
        let error = settings(&[("SESSIONS_PARTITIONS", "0")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_PARTITIONS");
        let error = settings(&[("AMQP_URL", "http://x")]).expect_err("bad");
        assert!(error.to_string().contains("AMQP_URL"));
        let error = settings(&[("AMQP_URL", "amqp://a/,http://b/")]).expect_err("bad");
        assert_eq!(error.variable, "AMQP_URL");
        let error = settings(&[("AMQP_URL", "amqp://a/,,amqp://c/")]).expect_err("bad");
        assert_eq!(error.variable, "AMQP_URL");
        let error = settings(&[("SESSIONS_QUORUM_GROUP_SIZE", "0")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_QUORUM_GROUP_SIZE");
        let error = settings(&[("SESSIONS_LOG_REPLICAS", "three")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_LOG_REPLICAS");
        let error = settings(&[("SESSIONS_LOG_MAX_AGE", "7 days")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_LOG_MAX_AGE");
        let error = settings(&[("SESSIONS_LOG_MAX_AGE", "0D")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_LOG_MAX_AGE");
        let error = settings(&[
            ("SESSIONS_LOG_MAX_BYTES", "10000000"),
            ("SESSIONS_LOG_SEGMENT_BYTES", "5000000"),
        ])
        .expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_LOG_SEGMENT_BYTES");
        let error = settings(&[("SESSIONS_WORKER_PREFETCH", "0")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_WORKER_PREFETCH");
        let error = settings(&[("SESSIONS_HTTP_ADDR", "nowhere")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_HTTP_ADDR");
        let error = settings(&[("SESSIONS_METRICS_ADDR", "3032")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_METRICS_ADDR");
        let error = settings(&[("SESSIONS_MASTER_KEY", "abcd")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_MASTER_KEY");
        let error = settings(&[("WORKER_COUNT", "3"), ("WORKER_INDEX", "3")]).expect_err("bad");
        assert_eq!(error.variable, "WORKER_INDEX");
        let error = settings(&[("WORKER_COUNT", "0")]).expect_err("bad");
        assert_eq!(error.variable, "WORKER_COUNT");
        let error = settings(&[("SESSIONS_BROKER_PREFIX", "a b")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_BROKER_PREFIX");
        let error = settings(&[("SESSIONS_RATE_LIMIT_PER_SECOND", "-1")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_RATE_LIMIT_PER_SECOND");
        let error = settings(&[("SESSIONS_RATE_LIMIT_BURST", "0")]).expect_err("bad");
        assert_eq!(error.variable, "SESSIONS_RATE_LIMIT_BURST");
    }

    #[test]
    fn amqp_url_takes_one_url_or_a_list() {
        let single = settings(&[]).expect("defaults");
        assert_eq!(
            single.amqp_url,
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10"
        );
        assert_eq!(single.log_replicas, None);
        assert_eq!(single.log_max_age, "7D");
        assert_eq!(single.log_max_bytes, 256 << 20);
        assert_eq!(single.log_segment_bytes, 16 << 20);
        let list = "amqp://guest:guest@127.0.0.1:5701/%2f,amqps://guest:guest@127.0.0.1:5702/%2f";
        let cluster =
            settings(&[("AMQP_URL", list), ("SESSIONS_LOG_REPLICAS", "3")]).expect("a list");
        assert_eq!(cluster.amqp_url, list);
        assert_eq!(cluster.log_replicas, Some(3));
        let renamed = settings(&[("SESSIONS_QUORUM_GROUP_SIZE", "2")]).expect("old name");
        assert_eq!(renamed.log_replicas, Some(2));
    }

    #[test]
    fn the_rate_limit_burst_defaults_to_twice_the_rate() {
        let defaults = settings(&[]).expect("defaults");
        assert_eq!(
            (defaults.rate_limit_per_second, defaults.rate_limit_burst),
            (1000, 2000)
        );
        let custom = settings(&[("SESSIONS_RATE_LIMIT_PER_SECOND", "7")]).expect("custom");
        assert_eq!(
            (custom.rate_limit_per_second, custom.rate_limit_burst),
            (7, 14)
        );
        let disabled = settings(&[("SESSIONS_RATE_LIMIT_PER_SECOND", "0")]).expect("disabled");
        assert_eq!(
            (disabled.rate_limit_per_second, disabled.rate_limit_burst),
            (0, 1)
        );
        let burst = settings(&[
            ("SESSIONS_RATE_LIMIT_PER_SECOND", "10"),
            ("SESSIONS_RATE_LIMIT_BURST", "3"),
        ])
        .expect("burst");
        assert_eq!(burst.rate_limit_burst, 3);
    }

    #[test]
    fn unread_bodies_are_discarded_within_bounds() {
        let defaults = settings(&[]).expect("defaults");
        assert_eq!(defaults.max_discard_bytes, 16 << 20);
        assert_eq!(defaults.discard_timeout, Duration::from_secs(10));
        let custom = settings(&[
            ("SESSIONS_MAX_DISCARD_BYTES", "0"),
            ("SESSIONS_DISCARD_TIMEOUT_MS", "250"),
        ])
        .expect("custom");
        assert_eq!(custom.max_discard_bytes, 0);
        assert_eq!(custom.discard_timeout, Duration::from_millis(250));
        for (variable, value) in [
            ("SESSIONS_MAX_DISCARD_BYTES", "-1"),
            ("SESSIONS_MAX_DISCARD_BYTES", "16MiB"),
            ("SESSIONS_MAX_DISCARD_BYTES", "1073741825"),
            ("SESSIONS_DISCARD_TIMEOUT_MS", "ten"),
            ("SESSIONS_DISCARD_TIMEOUT_MS", "600001"),
        ] {
            let error = settings(&[(variable, value)]).expect_err(value);
            assert_eq!(error.variable, variable, "{value}");
            assert!(error.to_string().contains(variable));
        }
    }
}
