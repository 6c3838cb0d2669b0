//! `sessions-worker`: reads configuration, builds the worker, runs it until SIGTERM/SIGINT.

use shared::config::Settings;
use tokio::sync::watch;

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
    if !arguments.is_empty() {
        return admin(&settings, &arguments).await;
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
    let health = worker.health_router();
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, health).await {
            tracing::warn!(%error, "health listener stopped");
        }
    });
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested; finishing the current batch");
        let _ = stop.send(true);
    });
    worker.run_until_stopped(stopped).await;
    std::process::ExitCode::SUCCESS
}

const USAGE: &str = "usage:
  sessions-worker
  sessions-worker admin dead-letters list
  sessions-worker admin dead-letters replay <message id> | --all";

/// `admin dead-letters list|replay`: inspect and re-publish dead-lettered commands.
async fn admin(settings: &Settings, arguments: &[String]) -> std::process::ExitCode {
    let words: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let link = shared::broker::BrokerLink::new(
        shared::broker::BrokerConfig::from_settings(settings, "sessions-worker-admin".into(), None),
        None,
    );
    let result = match words.as_slice() {
        ["admin", "dead-letters", "list"] => link.dead_letters().await.map(|letters| {
            let now = chrono::Utc::now().timestamp_millis();
            for letter in letters {
                println!(
                    "{}",
                    serde_json::json!({
                        "messageId": letter.message_id,
                        "reason": letter.reason,
                        "partition": letter.partition,
                        "session": letter.session_id,
                        "ageSeconds": letter.dead_lettered_at_ms.map(|at| (now - at) / 1000),
                    })
                );
            }
        }),
        ["admin", "dead-letters", "replay", "--all"] => link
            .replay_dead_letters(None)
            .await
            .map(|count| println!("{}", serde_json::json!({ "replayed": count }))),
        ["admin", "dead-letters", "replay", id] => link
            .replay_dead_letters(Some(id))
            .await
            .map(|count| println!("{}", serde_json::json!({ "replayed": count }))),
        _ => {
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
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

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
