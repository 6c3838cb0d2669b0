//! Rate limits per environment (`SESSIONS_RATE_LIMIT_PER_SECOND`, `SESSIONS_RATE_LIMIT_BURST`):
//! a keyed GCRA limiter (`governor`) with one bucket per environment id, in memory per api
//! instance.
//!
//! A request counts once its credential identified the environment (a secret key, a public
//! token, or a signed snapshot URL), before the handler reads its body, publishes or writes
//! anything. Requests that fail authentication count against no environment.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use shared::config::Settings;
use uuid::Uuid;

use crate::error::ApiError;

/// Stale buckets (environments that have been quiet for a full bucket period) are dropped after
/// this many checks, so the map holds only recently active environments.
const SWEEP_EVERY_CHECKS: u64 = 10_000;

/// The per-environment limiter; `None` inside when rate limiting is disabled.
#[derive(Debug)]
pub struct RateLimits {
    limiter: Option<DefaultKeyedRateLimiter<Uuid>>,
    checks: std::sync::atomic::AtomicU64,
}

impl RateLimits {
    pub fn from_settings(settings: &Settings) -> Self {
        let limiter = NonZeroU32::new(settings.rate_limit_per_second).map(|per_second| {
            let burst = NonZeroU32::new(settings.rate_limit_burst).unwrap_or(per_second);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        Self {
            limiter,
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Counts one request of `environment_id`; 429 (with the wait in whole seconds) when its
    /// bucket is empty.
    pub fn check(&self, environment_id: Uuid) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let checks = self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if checks % SWEEP_EVERY_CHECKS == SWEEP_EVERY_CHECKS - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter.check_key(&environment_id).map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            let retry_after_seconds = retry_after_seconds(wait);
            crate::signals::rate_limited(retry_after_seconds);
            ApiError::TooManyRequests {
                retry_after_seconds,
            }
        })
    }
}

/// `Retry-After` in whole seconds: the wait rounded up, at least 1.
fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_second: &str, burst: &str) -> RateLimits {
        let variables = [
            ("SESSIONS_RATE_LIMIT_PER_SECOND", per_second),
            ("SESSIONS_RATE_LIMIT_BURST", burst),
        ];
        let settings = Settings::from_lookup(|name| {
            variables
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        })
        .expect("settings");
        RateLimits::from_settings(&settings)
    }

    #[test]
    fn retry_after_is_whole_seconds_and_at_least_one() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(90)), 90);
    }

    #[test]
    fn each_environment_has_its_own_bucket() {
        let limits = limits("1", "3");
        let (busy, quiet) = (Uuid::now_v7(), Uuid::now_v7());
        for _ in 0..3 {
            limits.check(busy).expect("within the burst");
        }
        match limits.check(busy) {
            Err(ApiError::TooManyRequests {
                retry_after_seconds,
            }) => assert_eq!(retry_after_seconds, 1),
            other => panic!("expected 429, got {other:?}"),
        }
        limits
            .check(quiet)
            .expect("another environment is not limited");
    }

    #[test]
    fn zero_disables_the_limit() {
        let limits = limits("0", "");
        let environment = Uuid::now_v7();
        for _ in 0..10_000 {
            limits.check(environment).expect("no limit");
        }
    }
}

/// Live SSE streams per environment and per public access token
/// (`SESSIONS_MAX_SSE_PER_ENVIRONMENT`, `SESSIONS_MAX_SSE_PER_TOKEN`), in memory per api
/// instance: requests are counted above, but a stream holds a connection and a task for as long
/// as it lasts. Past a cap the stream is refused with 429 and `Retry-After` (the official client
/// retries it with backoff). Secret keys count only against their environment.
#[derive(Debug)]
pub struct LiveStreamSlots {
    per_environment: usize,
    per_token: usize,
    counts: std::sync::Mutex<std::collections::HashMap<SlotKey, usize>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum SlotKey {
    Environment(Uuid),
    /// A public access token, by its digest.
    Token(String),
}

/// A live stream's slots, given back when it ends (dropped).
#[derive(Debug)]
pub struct LiveStreamSlot {
    slots: std::sync::Arc<LiveStreamSlots>,
    keys: Vec<SlotKey>,
}

impl Drop for LiveStreamSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.lock();
        for key in &self.keys {
            if let Some(count) = counts.get_mut(key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(key);
                }
            }
        }
    }
}

/// How long a refused stream is told to wait.
const LIVE_STREAM_RETRY_AFTER_SECONDS: u64 = 1;

impl LiveStreamSlots {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            per_environment: settings.max_sse_per_environment,
            per_token: settings.max_sse_per_token,
            counts: std::sync::Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<SlotKey, usize>> {
        // A poisoned lock only means another request panicked mid-update; the map is valid.
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a slot of `environment_id` and, for a public token, of `token_digest`; 429 when
    /// either is full (then nothing is taken).
    pub fn acquire(
        self: &std::sync::Arc<Self>,
        environment_id: Uuid,
        token_digest: Option<&str>,
    ) -> Result<LiveStreamSlot, ApiError> {
        let mut keys = vec![(SlotKey::Environment(environment_id), self.per_environment)];
        if let Some(digest) = token_digest {
            keys.push((SlotKey::Token(digest.to_owned()), self.per_token));
        }
        let mut counts = self.lock();
        for (key, cap) in &keys {
            if counts.get(key).copied().unwrap_or(0) >= *cap {
                crate::signals::live_stream_refused(match key {
                    SlotKey::Environment(_) => "environment",
                    SlotKey::Token(_) => "token",
                });
                return Err(ApiError::TooManyRequests {
                    retry_after_seconds: LIVE_STREAM_RETRY_AFTER_SECONDS,
                });
            }
        }
        for (key, _) in &keys {
            *counts.entry(key.clone()).or_insert(0) += 1;
        }
        Ok(LiveStreamSlot {
            slots: self.clone(),
            keys: keys.into_iter().map(|(key, _)| key).collect(),
        })
    }
}

#[cfg(test)]
mod live_stream_tests {
    use super::*;

    fn slots(per_environment: usize, per_token: usize) -> std::sync::Arc<LiveStreamSlots> {
        std::sync::Arc::new(LiveStreamSlots {
            per_environment,
            per_token,
            counts: std::sync::Mutex::default(),
        })
    }

    #[test]
    fn a_token_and_an_environment_each_have_a_cap_and_slots_come_back() {
        let slots = slots(3, 2);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let first = slots.acquire(a, Some("t1")).expect("1st");
        let _second = slots.acquire(a, Some("t1")).expect("2nd");
        assert!(slots.acquire(a, Some("t1")).is_err(), "the token's cap");
        let _third = slots.acquire(a, Some("t2")).expect("another token");
        assert!(slots.acquire(a, None).is_err(), "the environment's cap");
        assert!(slots.acquire(b, Some("t3")).is_ok(), "another environment");
        drop(first);
        assert!(slots.acquire(a, Some("t1")).is_ok(), "a slot came back");
    }
}
