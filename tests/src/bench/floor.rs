//! The minimal pipeline floor: the same shape as the project (confirmed publish → one RabbitMQ
//! quorum queue → consumer → Redis claim → Postgres), written by hand with none of its logic
//! (no auth, no validation, no partitions, no ordering, no apply). What it sustains on this
//! machine is the best a design of this shape can hope for.
//!
//! Publishers: `publishers` closed-loop tasks, each publishes one `message_bytes` message and
//! waits for its confirm before the next, like an HTTP handler publishing one confirmed message
//! per request. One consumer (prefetch [`PREFETCH`]) takes whatever is ready as a batch, claims
//! every message id with `SET NX PX` in one Redis pipeline, inserts the claimed ones with one
//! multi-row `INSERT`, then acks the batch (`multiple`).
//!
//! The run owns its resources and removes them at the end: a quorum queue
//! `bench_<name>.floor` (with `x-expires` in case the run crashes), a database
//! `sessions_<name>_floor` (the harness sweeps crashed ones by that name), Redis keys
//! `bench:<name>:floor:*` (with a TTL too).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rand::RngCore;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use tokio::sync::watch;

use super::report::{Latencies, ThroughputReport};

/// The consumer's prefetch, which also bounds one batch.
pub const PREFETCH: u16 = 500;
/// How long a claim lives in Redis (the run deletes its keys anyway).
const CLAIM_TTL_MS: u64 = 600_000;
/// A crashed run's queue disappears this long after its last use.
const QUEUE_EXPIRES_MS: i64 = 1_800_000;
/// A publish whose confirm takes longer counts as an error.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// After the window, how long the consumer may take to persist what was confirmed.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct FloorConfig {
    pub amqp_url: String,
    pub redis_url: String,
    /// The server without a database, e.g. `postgres://postgres@127.0.0.1:5432`.
    pub postgres_server: String,
    pub duration: Duration,
    pub publishers: usize,
    pub message_bytes: usize,
}

/// Runs the floor for `config.duration` and reports the records persisted in Postgres during
/// that window per second, with the publish→confirm latency. Whether the consumer kept up is
/// in the workload string: how many messages were ready in the queue when the window closed,
/// the backlog (confirmed but not yet persisted) at that moment, and how long the consumer
/// then took to persist it.
pub async fn run_pipeline_floor(config: &FloorConfig) -> Result<ThroughputReport, String> {
    if config.publishers == 0 {
        return Err("the floor needs at least one publisher".into());
    }
    let resources = Resources::create(config).await?;
    let outcome = measure(config, &resources).await;
    let cleaned = resources.remove().await;
    let report = outcome?;
    cleaned?;
    Ok(report)
}

/// What one run creates, and removes at the end whatever happened.
struct Resources {
    queue: String,
    redis_prefix: String,
    database: String,
    postgres_server: String,
    publisher_connection: Connection,
    consumer_connection: Connection,
    redis: redis::aio::MultiplexedConnection,
    db: sea_orm::DatabaseConnection,
}

impl Resources {
    async fn create(config: &FloorConfig) -> Result<Self, String> {
        let name = crate::unique_name();
        let queue = format!("bench_{name}.floor");
        let redis_prefix = format!("bench:{name}:floor:");
        let database = format!("sessions_{name}_floor");

        let maintenance = connect_postgres(&format!("{}/postgres", config.postgres_server)).await?;
        maintenance
            .execute_unprepared(&format!("CREATE DATABASE \"{database}\""))
            .await
            .map_err(|error| format!("creating database {database}: {error}"))?;
        let _ = maintenance.close().await;
        let db = connect_postgres(&format!("{}/{database}", config.postgres_server)).await?;
        db.execute_unprepared(
            "CREATE TABLE records (message_id TEXT PRIMARY KEY, payload BYTEA NOT NULL, \
             persisted_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .map_err(|error| format!("creating the records table: {error}"))?;

        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|error| format!("redis url: {error}"))?;
        let redis = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|error| format!("connecting to redis: {error}"))?;

        let publisher_connection = connect_amqp(&config.amqp_url, "floor publishers").await?;
        let consumer_connection = connect_amqp(&config.amqp_url, "floor consumer").await?;
        let channel = publisher_connection
            .create_channel()
            .await
            .map_err(|error| format!("amqp channel: {error}"))?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(QUEUE_EXPIRES_MS));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(|error| format!("declaring {queue}: {error}"))?;
        let _ = channel.close(200, "declared".into()).await;

        Ok(Self {
            queue,
            redis_prefix,
            database,
            postgres_server: config.postgres_server.clone(),
            publisher_connection,
            consumer_connection,
            redis,
            db,
        })
    }

    /// Deletes the queue, the Redis keys and the database; reports the first failure.
    async fn remove(self) -> Result<(), String> {
        let mut failures = Vec::new();
        match self.publisher_connection.create_channel().await {
            Ok(channel) => {
                if let Err(error) = channel
                    .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                {
                    failures.push(format!("deleting {}: {error}", self.queue));
                }
            }
            Err(error) => failures.push(format!("amqp channel for cleanup: {error}")),
        }
        let _ = self.consumer_connection.close(200, "done".into()).await;
        let _ = self.publisher_connection.close(200, "done".into()).await;

        if let Err(error) = delete_keys(self.redis.clone(), &self.redis_prefix).await {
            failures.push(format!(
                "deleting redis keys {}*: {error}",
                self.redis_prefix
            ));
        }

        let _ = self.db.close().await;
        match connect_postgres(&format!("{}/postgres", self.postgres_server)).await {
            Ok(maintenance) => {
                if let Err(error) = maintenance
                    .execute_unprepared(&format!(
                        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                        self.database
                    ))
                    .await
                {
                    failures.push(format!("dropping {}: {error}", self.database));
                }
                let _ = maintenance.close().await;
            }
            Err(error) => failures.push(error),
        }
        match failures.into_iter().next() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }
}

async fn connect_postgres(url: &str) -> Result<sea_orm::DatabaseConnection, String> {
    let mut options = sea_orm::ConnectOptions::new(url);
    options.max_connections(2).sqlx_logging(false);
    sea_orm::Database::connect(options)
        .await
        .map_err(|error| format!("connecting to {url}: {error}"))
}

async fn connect_amqp(url: &str, name: &str) -> Result<Connection, String> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, properties),
    )
    .await
    .map_err(|_| "connecting to rabbitmq timed out".to_owned())?
    .map_err(|error| format!("connecting to rabbitmq: {error}"))
}

/// Counters shared by the publishers, the consumer and the clock.
#[derive(Default)]
struct Counters {
    confirmed: AtomicU64,
    publish_errors: AtomicU64,
    persisted: AtomicU64,
    consume_errors: AtomicU64,
}

async fn measure(config: &FloorConfig, resources: &Resources) -> Result<ThroughputReport, String> {
    let counters = Arc::new(Counters::default());
    let (stop_consumer, stop_signal) = watch::channel(false);
    let consumer = {
        let channel = resources
            .consumer_connection
            .create_channel()
            .await
            .map_err(|error| format!("consumer channel: {error}"))?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(|error| format!("basic.qos: {error}"))?;
        let deliveries = channel
            .basic_consume(
                resources.queue.as_str().into(),
                "floor".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|error| format!("basic.consume: {error}"))?;
        tokio::spawn(consume(
            channel,
            deliveries,
            resources.redis.clone(),
            resources.redis_prefix.clone(),
            resources.db.clone(),
            counters.clone(),
            stop_signal,
        ))
    };

    let mut payload = vec![0_u8; config.message_bytes];
    rand::rng().fill_bytes(&mut payload);
    let payload: Arc<[u8]> = payload.into();
    // Every publisher's channel is open before the window starts.
    let mut channels = Vec::with_capacity(config.publishers);
    for _ in 0..config.publishers {
        let channel = resources
            .publisher_connection
            .create_channel()
            .await
            .map_err(|error| format!("publisher channel: {error}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|error| format!("confirm.select: {error}"))?;
        channels.push(channel);
    }
    let started = Instant::now();
    let deadline = started + config.duration;
    let publishers: Vec<_> = channels
        .into_iter()
        .enumerate()
        .map(|(publisher, channel)| {
            tokio::spawn(publish(
                channel,
                resources.queue.clone(),
                publisher,
                payload.clone(),
                deadline,
                counters.clone(),
            ))
        })
        .collect();

    tokio::time::sleep_until(deadline.into()).await;
    let persisted_in_window = counters.persisted.load(Ordering::SeqCst);
    let elapsed = started.elapsed();
    let ready_at_end =
        crate::queue_message_count(&resources.publisher_connection, &resources.queue).await;

    let mut latencies = Latencies::default();
    for publisher in publishers {
        let publisher_latencies = publisher
            .await
            .map_err(|error| format!("a publisher panicked: {error}"))?;
        latencies.merge(&publisher_latencies);
    }
    let confirmed = counters.confirmed.load(Ordering::SeqCst);
    let backlog = confirmed.saturating_sub(persisted_in_window);

    let drain_started = Instant::now();
    while counters.persisted.load(Ordering::SeqCst) < confirmed
        && drain_started.elapsed() < DRAIN_LIMIT
        && !consumer.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = counters.persisted.load(Ordering::SeqCst) >= confirmed;
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    let _ = stop_consumer.send(true);
    let consumer_result = consumer
        .await
        .map_err(|error| format!("the consumer panicked: {error}"))?;
    consumer_result?;

    let left = match ready_at_end {
        Some(ready) => format!("{ready} ready in queue"),
        None => "queue depth unknown".to_owned(),
    };
    let drain = if drained {
        format!("persisted {drain_seconds:.1} s after")
    } else {
        format!("NOT persisted {drain_seconds:.0} s after")
    };
    let workload = format!(
        "{} publishers, {} B, prefetch {PREFETCH}; at end: {left}, backlog {backlog} ({drain})",
        config.publishers, config.message_bytes
    );
    let errors = counters.publish_errors.load(Ordering::SeqCst)
        + counters.consume_errors.load(Ordering::SeqCst);
    Ok(ThroughputReport::new(
        "pipeline floor",
        &workload,
        persisted_in_window,
        errors,
        elapsed,
        &latencies,
    ))
}

/// One closed-loop publisher: publish, wait for the confirm, repeat until `deadline`.
async fn publish(
    channel: Channel,
    queue: String,
    publisher: usize,
    payload: Arc<[u8]>,
    deadline: Instant,
    counters: Arc<Counters>,
) -> Latencies {
    let mut latencies = Latencies::default();
    let mut sequence: u64 = 0;
    while Instant::now() < deadline {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("{publisher}-{sequence}").into());
        sequence += 1;
        let sent = Instant::now();
        let confirmed = async {
            let pending = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    properties,
                )
                .await
                .map_err(|error| error.to_string())?;
            let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, pending)
                .await
                .map_err(|_| "confirm timed out".to_owned())?
                .map_err(|error| error.to_string())?;
            if confirmation.is_ack() {
                Ok(())
            } else {
                Err("nacked".to_owned())
            }
        }
        .await;
        match confirmed {
            Ok(()) => {
                latencies.record(sent.elapsed());
                counters.confirmed.fetch_add(1, Ordering::SeqCst);
            }
            Err(error) => {
                counters.publish_errors.fetch_add(1, Ordering::SeqCst);
                if !channel.status().connected() {
                    tracing::warn!(publisher, %error, "floor publisher channel closed");
                    break;
                }
            }
        }
    }
    let _ = channel.close(200, "done".into()).await;
    latencies
}

/// The consumer: batch what is ready (≤ prefetch), claim in Redis, insert in Postgres, ack.
async fn consume(
    channel: Channel,
    mut deliveries: lapin::Consumer,
    mut redis: redis::aio::MultiplexedConnection,
    redis_prefix: String,
    db: sea_orm::DatabaseConnection,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut batch: Vec<lapin::message::Delivery> = Vec::with_capacity(usize::from(PREFETCH));
    loop {
        let first = tokio::select! {
            _ = stop.changed() => break,
            next = deliveries.next() => next,
        };
        match first {
            Some(Ok(delivery)) => batch.push(delivery),
            Some(Err(error)) => return Err(format!("consuming: {error}")),
            None => return Err("the consumer was cancelled".into()),
        }
        while batch.len() < usize::from(PREFETCH) {
            match futures_lite::future::poll_once(deliveries.next()).await {
                Some(Some(Ok(delivery))) => batch.push(delivery),
                Some(Some(Err(error))) => return Err(format!("consuming: {error}")),
                _ => break,
            }
        }
        let last_tag = batch.last().map_or(0, |delivery| delivery.delivery_tag);
        match persist(&batch, &mut redis, &redis_prefix, &db).await {
            Ok(inserted) => {
                channel
                    .basic_ack(last_tag, BasicAckOptions { multiple: true })
                    .await
                    .map_err(|error| format!("acking: {error}"))?;
                counters.persisted.fetch_add(inserted, Ordering::SeqCst);
            }
            Err(error) => {
                tracing::warn!(%error, "floor batch failed");
                counters
                    .consume_errors
                    .fetch_add(batch.len() as u64, Ordering::SeqCst);
                channel
                    .basic_nack(
                        last_tag,
                        BasicNackOptions {
                            multiple: true,
                            requeue: true,
                        },
                    )
                    .await
                    .map_err(|error| format!("nacking: {error}"))?;
            }
        }
        batch.clear();
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(())
}

/// Claims the batch's message ids, inserts the claimed ones; returns the rows inserted.
async fn persist(
    batch: &[lapin::message::Delivery],
    redis: &mut redis::aio::MultiplexedConnection,
    redis_prefix: &str,
    db: &sea_orm::DatabaseConnection,
) -> Result<u64, String> {
    let ids: Vec<String> = batch
        .iter()
        .map(|delivery| {
            delivery.properties.message_id().as_ref().map_or_else(
                || format!("tag-{}", delivery.delivery_tag),
                |id| id.to_string(),
            )
        })
        .collect();
    let mut pipeline = redis::pipe();
    for id in &ids {
        pipeline
            .cmd("SET")
            .arg(format!("{redis_prefix}{id}"))
            .arg("1")
            .arg("NX")
            .arg("PX")
            .arg(CLAIM_TTL_MS);
    }
    let claims: Vec<Option<String>> = pipeline
        .query_async(redis)
        .await
        .map_err(|error| format!("claiming in redis: {error}"))?;
    let mut values = Vec::with_capacity(ids.len() * 2);
    for ((id, delivery), claim) in ids.into_iter().zip(batch).zip(claims) {
        if claim.is_some() {
            values.push(sea_orm::Value::from(id));
            values.push(sea_orm::Value::from(delivery.data.clone()));
        }
    }
    let rows = values.len() / 2;
    if rows == 0 {
        return Ok(0);
    }
    let inserted = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            insert_sql(rows),
            values,
        ))
        .await
        .map_err(|error| format!("inserting: {error}"))?;
    Ok(inserted.rows_affected())
}

/// `INSERT … VALUES ($1, $2), ($3, $4), … ON CONFLICT DO NOTHING` for `rows` records.
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from("INSERT INTO records (message_id, payload) VALUES ");
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("(${}, ${})", 2 * row + 1, 2 * row + 2));
    }
    sql.push_str(" ON CONFLICT (message_id) DO NOTHING");
    sql
}

/// Deletes every key starting with `prefix` (SCAN + UNLINK, a page at a time).
async fn delete_keys(
    mut redis: redis::aio::MultiplexedConnection,
    prefix: &str,
) -> Result<(), redis::RedisError> {
    let pattern = format!("{prefix}*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await?;
        if !keys.is_empty() {
            let _: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut redis)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insert_numbers_two_parameters_per_row() {
        assert_eq!(
            insert_sql(1),
            "INSERT INTO records (message_id, payload) VALUES ($1, $2) \
             ON CONFLICT (message_id) DO NOTHING"
        );
        assert!(insert_sql(3).contains("($1, $2), ($3, $4), ($5, $6) ON CONFLICT"));
    }
}
