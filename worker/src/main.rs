//! `sessions-worker`: reads configuration, builds the worker, runs it until SIGTERM/SIGINT.

use shared::config::Settings;
use shared::shutdown::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shared::telemetry::init_logging();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("sessions-worker: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = arguments.iter().map(String::as_str).collect();
    // The arguments are read before anything is opened: a mistyped command or `--help` must
    // not connect to (and migrate) the database.
    match words.as_slice() {
        [] => {}
        ["--help" | "-h" | "help"] => {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        words => {
            return match AdminCommand::parse(words) {
                Some(command) => admin(&settings, command).await,
                None => {
                    eprintln!("{USAGE}");
                    std::process::ExitCode::from(2)
                }
            };
        }
    }
    shared::telemetry::prometheus();
    let worker_http_addr = settings.worker_http_addr;
    let worker = match worker::Worker::build(settings).await {
        Ok(worker) => worker,
        Err(error) => {
            eprintln!("sessions-worker: cannot start: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(worker_http_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "sessions-worker: cannot bind SESSIONS_WORKER_HTTP_ADDR {worker_http_addr}: {error}"
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = shared::shutdown::token_cancelled_on_signal("finishing the current batch");
    let health = worker.health_router();
    // The health listener answers until the worker has stopped (a stopping worker still says
    // why it is not ready).
    let health_stop = CancellationToken::new();
    let health_task =
        shared::telemetry::serve_probes(listener, health, health_stop.clone(), "health listener");
    worker.run_until_stopped(shutdown).await;
    health_stop.cancel();
    let _ = health_task.await;
    std::process::ExitCode::SUCCESS
}

const USAGE: &str = "usage:
  sessions-worker
  sessions-worker admin dead-letters list
  sessions-worker admin dead-letters replay <message id or dead letter id> | --all
  sessions-worker admin logs positions
  sessions-worker admin logs accept-gap --partition <n>";

/// What `sessions-worker admin …` was asked to do.
enum AdminCommand<'a> {
    ListDeadLetters,
    /// The dead letter with this message id or dead letter id (`None`: all of them).
    ReplayDeadLetters(Option<&'a str>),
    LogPositions,
    /// The partition number as typed (checked against `SESSIONS_PARTITIONS` when run).
    AcceptGap(&'a str),
}

impl<'a> AdminCommand<'a> {
    fn parse(words: &[&'a str]) -> Option<Self> {
        Some(match words {
            ["admin", "dead-letters", "list"] => Self::ListDeadLetters,
            ["admin", "dead-letters", "replay", "--all"] => Self::ReplayDeadLetters(None),
            ["admin", "dead-letters", "replay", id] => Self::ReplayDeadLetters(Some(id)),
            ["admin", "logs", "positions"] => Self::LogPositions,
            ["admin", "logs", "accept-gap", "--partition", partition] => Self::AcceptGap(partition),
            _ => return None,
        })
    }
}

/// `admin dead-letters list|replay` and `admin logs positions|accept-gap`: inspect and re-publish
/// dead-lettered commands; see where each partition log is applied up to, and restart a
/// partition stopped at a gap.
async fn admin(settings: &Settings, command: AdminCommand<'_>) -> std::process::ExitCode {
    let store = match shared::storage::Store::connect(&settings.database_url, 2).await {
        Ok(store) => store,
        Err(error) => {
            eprintln!("sessions-worker admin: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let link = shared::broker::BrokerLink::new(
        shared::broker::BrokerConfig::from_settings(settings, "sessions-worker-admin".into(), None),
        None,
    );
    let result: Result<(), String> = match command {
        AdminCommand::ListDeadLetters => list_dead_letters(&store).await,
        AdminCommand::ReplayDeadLetters(id) => replay_dead_letters(&store, &link, id).await,
        AdminCommand::LogPositions => log_positions(settings, &store).await,
        AdminCommand::AcceptGap(partition) => accept_gap(settings, &store, partition).await,
    };
    link.close().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sessions-worker admin: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn list_dead_letters(store: &shared::storage::Store) -> Result<(), String> {
    let letters = store
        .dead_letters()
        .await
        .map_err(|error| error.to_string())?;
    let now = chrono::Utc::now();
    for letter in letters {
        let session = shared::commands::Envelope::decode(&letter.payload)
            .ok()
            .and_then(|envelope| envelope.commands.first().map(|command| command.session_id));
        println!(
            "{}",
            serde_json::json!({
                "id": letter.id,
                "messageId": letter.message_id,
                "reason": letter.reason,
                "partition": letter.partition,
                "log": letter.log,
                "offset": letter.offset,
                "session": session,
                "ageSeconds": (now - letter.created_at).num_seconds(),
            })
        );
    }
    Ok(())
}

/// Publishes the dead letters matching `id` (all with `None`) to their partitions again, then
/// marks them replayed. A replayed command that still cannot be applied comes back as a new
/// dead letter.
async fn replay_dead_letters(
    store: &shared::storage::Store,
    link: &shared::broker::BrokerLink,
    id: Option<&str>,
) -> Result<(), String> {
    let letters = store
        .dead_letters()
        .await
        .map_err(|error| error.to_string())?;
    let mut replayed = 0;
    for letter in letters {
        let matches = id.is_none_or(|id| {
            letter.message_id.as_deref() == Some(id) || letter.id.to_string() == id
        });
        if !matches {
            continue;
        }
        let message_id = uuid::Uuid::now_v7().to_string();
        link.publish_commands(letter.partition, &message_id, None, &letter.payload)
            .await
            .map_err(|error| error.to_string())?;
        store
            .mark_dead_letter_replayed(letter.id)
            .await
            .map_err(|error| error.to_string())?;
        replayed += 1;
    }
    println!("{}", serde_json::json!({ "replayed": replayed }));
    Ok(())
}

fn partition_log_names(settings: &Settings) -> Vec<String> {
    let names = shared::broker::BrokerNames {
        prefix: settings.broker_prefix.clone(),
        partitions: settings.partitions,
    };
    (0..settings.partitions)
        .map(|partition| names.partition_log(partition))
        .collect()
}

async fn log_positions(settings: &Settings, store: &shared::storage::Store) -> Result<(), String> {
    let names = partition_log_names(settings);
    let positions = store
        .log_positions(&names)
        .await
        .map_err(|error| error.to_string())?;
    for (partition, name) in names.iter().enumerate() {
        let (applied_offset, resume) = match positions.get(name) {
            Some(shared::domain::log::ResumePoint::AfterApplied { offset, .. }) => {
                (Some(*offset), "after-applied")
            }
            Some(shared::domain::log::ResumePoint::FirstAvailable) => (None, "first-available"),
            _ => (None, "beginning"),
        };
        println!(
            "{}",
            serde_json::json!({
                "partition": partition,
                "log": name,
                "appliedOffset": applied_offset,
                "resume": resume,
            })
        );
    }
    Ok(())
}

async fn accept_gap(
    settings: &Settings,
    store: &shared::storage::Store,
    partition: &str,
) -> Result<(), String> {
    let partition: u16 = partition
        .parse()
        .ok()
        .filter(|partition| *partition < settings.partitions)
        .ok_or_else(|| {
            format!(
                "--partition must be a number below SESSIONS_PARTITIONS ({})",
                settings.partitions
            )
        })?;
    let name = &partition_log_names(settings)[usize::from(partition)];
    let known = store
        .accept_log_gap(name)
        .await
        .map_err(|error| error.to_string())?;
    println!(
        "{}",
        serde_json::json!({ "partition": partition, "log": name, "accepted": known })
    );
    Ok(())
}
