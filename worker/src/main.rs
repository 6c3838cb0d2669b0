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
