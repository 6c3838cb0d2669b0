//! Stopping, one way for both binaries: the OS signal they wait for ([`signal`]), the
//! [`CancellationToken`] every long-running task watches (cancelled once, seen by every clone),
//! and the [`TaskTracker`] a process waits on so that its background tasks end on their own
//! instead of being aborted mid-statement.

pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM (what systemd, Docker and Kubernetes send).
pub async fn signal() {
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

/// A token cancelled when [`signal`] resolves; `what` says in the log what the process does then.
pub fn token_cancelled_on_signal(what: &'static str) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown requested; {what}");
        cancel.cancel();
    });
    token
}
