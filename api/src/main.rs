//! `sessions-api`: the HTTP server, and the admin CLI.
//!
//! ```text
//! sessions-api                                   serve HTTP on SESSIONS_HTTP_ADDR
//! sessions-api admin create-environment --project <slug> --environment <slug>
//! sessions-api admin rotate-key|list-keys|revoke-key --project <slug> --environment <slug> …
//! ```

use std::process::ExitCode;

use serde_json::json;
use shared::config::Settings;
use shared::storage::Store;

const USAGE: &str = "usage:
  sessions-api [--mode embedded|production]
  sessions-api admin create-environment --project <slug> --environment <slug>
  sessions-api admin rotate-key --project <slug> --environment <slug> [--grace-seconds N (default 3600)]
  sessions-api admin list-keys --project <slug> --environment <slug>
  sessions-api admin revoke-key --project <slug> --environment <slug> --key-id <id>";

#[tokio::main]
async fn main() -> ExitCode {
    shared::telemetry::init_logging();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("sessions-api: {error}");
            return ExitCode::from(2);
        }
    };
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match arguments.first().map(String::as_str) {
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("admin") => admin(settings, &arguments[1..]).await,
        None | Some("--mode") => match mode(&arguments) {
            Ok(Mode::Production) => serve(settings).await,
            Ok(Mode::Embedded) => serve_embedded(settings).await,
            Err(message) => {
                eprintln!("sessions-api: {message}\n{USAGE}");
                ExitCode::from(2)
            }
        },
        Some(_) => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

enum Mode {
    Production,
    Embedded,
}

/// `--mode` or `SESSIONS_MODE` (`embedded` | `production`); without either, production if any of
/// `DATABASE_URL`, `AMQP_URL`, `REDIS_URL` is set, else embedded.
fn mode(arguments: &[String]) -> Result<Mode, String> {
    let chosen = flag_value(arguments, "--mode")
        .cloned()
        .or_else(|| std::env::var("SESSIONS_MODE").ok())
        .filter(|mode| !mode.trim().is_empty());
    match chosen.as_deref().map(str::trim) {
        Some("embedded") => Ok(Mode::Embedded),
        Some("production") => Ok(Mode::Production),
        Some(other) => Err(format!(
            "--mode / SESSIONS_MODE must be embedded or production, not {other:?}"
        )),
        None => {
            let configured = ["DATABASE_URL", "AMQP_URL", "REDIS_URL"]
                .iter()
                .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()));
            Ok(if configured {
                Mode::Production
            } else {
                Mode::Embedded
            })
        }
    }
}

async fn serve_embedded(settings: Settings) -> ExitCode {
    shared::telemetry::prometheus();
    let data_dir = std::env::var("SESSIONS_DATA_DIR")
        .ok()
        .filter(|dir| !dir.trim().is_empty())
        .unwrap_or_else(|| "data".into());
    let embedded =
        match api::embedded::Embedded::build(settings, std::path::Path::new(&data_dir)).await {
            Ok(embedded) => embedded,
            Err(error) => {
                eprintln!("sessions-api: cannot start the embedded server: {error}");
                return ExitCode::FAILURE;
            }
        };
    println!(
        "sessions (embedded: SQLite in {data_dir}/, no external services) listening on http://{}",
        embedded.local_addr()
    );
    println!("environment: {}", embedded.environment_id());
    println!("secret key:  {}", embedded.secret_key());
    let shutdown = shared::shutdown::token_cancelled_on_signal("finishing in-flight requests");
    match embedded.run_until_stopped(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sessions-api: server error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> ExitCode {
    shared::telemetry::prometheus();
    if settings.master_key_is_default {
        tracing::warn!(
            "SESSIONS_MASTER_KEY is not set: using the built-in development master key; set your own (64 hex characters) before production"
        );
    }
    let application = match api::Application::build(settings).await {
        Ok(application) => application,
        Err(error) => {
            eprintln!("sessions-api: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "sessions-api listening on http://{}",
        application.local_addr()
    );
    if let Some(metrics) = application.metrics_addr() {
        eprintln!("sessions-api metrics on http://{metrics}/metrics");
    }
    let shutdown = shared::shutdown::token_cancelled_on_signal("finishing in-flight requests");
    match application.run_until_stopped(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sessions-api: server error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A slug: 1–64 characters of `[a-z0-9-]`.
fn slug<'a>(flag: &str, value: Option<&'a String>) -> Result<&'a str, String> {
    let value = value.ok_or_else(|| format!("{flag} is required"))?;
    let valid = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
        Ok(value)
    } else {
        Err(format!("{flag} must be 1–64 characters of [a-z0-9-]"))
    }
}

fn flag_value<'a>(arguments: &'a [String], flag: &str) -> Option<&'a String> {
    arguments
        .iter()
        .position(|argument| argument == flag)
        .and_then(|index| arguments.get(index + 1))
}

async fn admin(settings: Settings, arguments: &[String]) -> ExitCode {
    let command = arguments.first().map(String::as_str).unwrap_or("");
    if !matches!(
        command,
        "create-environment" | "rotate-key" | "list-keys" | "revoke-key"
    ) {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let (project, environment) = match (
        slug("--project", flag_value(arguments, "--project")),
        slug("--environment", flag_value(arguments, "--environment")),
    ) {
        (Ok(project), Ok(environment)) => (project, environment),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("sessions-api admin: {error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let store = match Store::connect(&settings.database_url, 2).await {
        Ok(store) => store,
        Err(error) => {
            eprintln!("sessions-api admin: cannot open the database: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        "create-environment" => create_environment(&store, &settings, project, environment).await,
        other => manage_keys(&store, &settings, other, arguments, project, environment).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(AdminError::Usage(message)) => {
            eprintln!("sessions-api admin: {message}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(AdminError::Failed(message)) => {
            eprintln!("sessions-api admin: {message}");
            ExitCode::FAILURE
        }
    }
}

enum AdminError {
    Usage(String),
    Failed(String),
}

impl From<shared::storage::StorageError> for AdminError {
    fn from(error: shared::storage::StorageError) -> Self {
        AdminError::Failed(error.to_string())
    }
}

async fn create_environment(
    store: &Store,
    settings: &Settings,
    project: &str,
    environment: &str,
) -> Result<(), AdminError> {
    let created = store
        .create_environment(project, environment, &settings.master_key)
        .await?;
    println!(
        "{}",
        json!({
            "project": project,
            "environment": environment,
            "environmentId": created.environment.public_id,
            "created": created.secret_key.is_some(),
            "secretKey": created.secret_key,
        })
    );
    if created.secret_key.is_none() {
        eprintln!(
            "the environment already existed; its secret key was shown when it was created (rotate-key makes a new one)"
        );
    }
    Ok(())
}

async fn manage_keys(
    store: &Store,
    settings: &Settings,
    command: &str,
    arguments: &[String],
    project: &str,
    environment: &str,
) -> Result<(), AdminError> {
    let environment = store
        .find_environment(project, environment)
        .await?
        .ok_or_else(|| AdminError::Failed(format!("no environment {project}/{environment}")))?;
    match command {
        "rotate-key" => {
            let grace_seconds: i64 = match flag_value(arguments, "--grace-seconds") {
                None => 3600,
                Some(text) => text
                    .parse()
                    .ok()
                    .filter(|seconds| (0..=30 * 86_400).contains(seconds))
                    .ok_or_else(|| AdminError::Usage("--grace-seconds must be 0–2592000".into()))?,
            };
            let key = store
                .rotate_secret_key(
                    environment.id,
                    chrono::TimeDelta::seconds(grace_seconds),
                    &settings.master_key,
                )
                .await?;
            println!(
                "{}",
                json!({
                    "environmentId": environment.public_id,
                    "secretKey": key,
                    "previousKeysStopAt": chrono::Utc::now() + chrono::TimeDelta::seconds(grace_seconds),
                })
            );
        }
        "list-keys" => {
            for (id, created_at, revoked_at) in store.list_secret_keys(environment.id).await? {
                println!(
                    "{}",
                    json!({ "keyId": id, "createdAt": created_at, "revokedAt": revoked_at })
                );
            }
        }
        _ => {
            let key_id = flag_value(arguments, "--key-id")
                .and_then(|text| uuid::Uuid::parse_str(text).ok())
                .ok_or_else(|| {
                    AdminError::Usage("--key-id <id from list-keys> is required".into())
                })?;
            if !store.revoke_secret_key(environment.id, key_id).await? {
                return Err(AdminError::Failed(format!(
                    "no live key {key_id} in this environment"
                )));
            }
            println!("{}", json!({ "keyId": key_id, "revoked": true }));
        }
    }
    Ok(())
}
