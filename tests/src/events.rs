//! A test consumer on the deployment's events exchange (`<prefix>.events`): binds an exclusive
//! queue to every routing key and collects the JSON payloads.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;

pub struct EventTap {
    _connection: Connection,
    consumer: lapin::Consumer,
}

impl EventTap {
    /// Binds before the events of interest happen (earlier events are not seen).
    pub async fn bind(prefix: &str) -> Self {
        let connection = Connection::connect(crate::AMQP_URL, ConnectionProperties::default())
            .await
            .expect("tap connects");
        let channel = connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue");
        channel
            .queue_bind(
                queue.name().clone(),
                format!("{prefix}.events").as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        Self {
            _connection: connection,
            consumer,
        }
    }

    /// Collects events until `done` says so or `wait` passes; returns all collected.
    pub async fn collect_until(
        &mut self,
        wait: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while !done(&events) {
            match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    events.push(serde_json::from_slice(&delivery.data).unwrap_or(Value::Null));
                }
                _ => break,
            }
        }
        events
    }
}
