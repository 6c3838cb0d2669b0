//! Test-only fault injection, compiled in only with the `test-failpoints` feature (which the
//! test harness turns on; production builds of this package do not have this module at all).
//! `SESSIONS_TEST_FAILPOINT=abort_after_commit` makes the worker abort right after a batch that
//! appended records commits, before its events, replies and acknowledgements.

use std::sync::OnceLock;

/// Aborts the process if `SESSIONS_TEST_FAILPOINT=abort_after_commit` is set.
pub fn abort_after_commit() {
    static ARMED: OnceLock<bool> = OnceLock::new();
    let armed = *ARMED.get_or_init(|| {
        std::env::var("SESSIONS_TEST_FAILPOINT").as_deref() == Ok("abort_after_commit")
    });
    if armed {
        tracing::error!("SESSIONS_TEST_FAILPOINT=abort_after_commit: aborting");
        std::process::abort();
    }
}
