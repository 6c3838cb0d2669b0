//! The waitpoint timer: once a second, times out waiting waitpoints whose `timeout_at` passed
//! (`TIMED_OUT`, the client's timeout error as output, a `waitpoint.timed_out` event).
//!
//! Every worker runs it; the `status = 'WAITING'` guard on each update makes a time-out and a
//! completion mutually exclusive, and makes concurrent timers harmless.

use std::sync::Arc;
use std::time::Duration;

use shared::shutdown::CancellationToken;

use crate::apply::time_out;
use crate::consumer::{WorkerContext, publish_outbox};

const TICK: Duration = Duration::from_secs(1);
const PER_TICK: u64 = 500;

pub async fn run(context: Arc<WorkerContext>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = chrono::Utc::now();
        match context
            .store
            .time_out_waitpoints(now, PER_TICK, |waitpoint| time_out(waitpoint, now))
            .await
        {
            Ok(events) if !events.is_empty() => {
                crate::signals::waitpoints_timed_out(events.len());
                publish_outbox(&context, events).await;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "waitpoint timer failed; retrying next tick"),
        }
    }
}
