//! The `shared` crate: everything the `api` and the `worker` both need.
//!
//! - [`domain`]: pure rules (ids, channels, validation, dedup keys, partitioning, tokens). No IO.
//! - [`commands`]: the versioned command envelope that travels from the api to the worker.
//! - [`config`]: typed configuration read from environment variables.
//! - [`storage`]: sea-orm entities, migrations and queries (Postgres, and SQLite for the embedded path).
//! - [`broker`]: the RabbitMQ adapter (lapin): topology, confirmed publishing, partition consumers.
//! - [`cache`]: the Redis adapter: dedup claims with owner tokens.
//! - [`telemetry`]: logging and the Prometheus recorder.
//!
//! What is deliberately not here: HTTP (lives in `api`) and the apply logic of commands (lives in `worker`).

pub mod broker;
pub mod cache;
pub mod commands;
pub mod config;
pub mod domain;
pub mod shutdown;
pub mod storage;
pub mod telemetry;
