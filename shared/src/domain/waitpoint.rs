//! Waitpoint rules: durations, statuses, outputs and event payloads.

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Io, ValidationError};

pub const WAITPOINT_PREFIX: &str = "waitpoint_";

/// Where a waitpoint is in its life; shown to clients as `WAITING`, `COMPLETED`, `TIMED_OUT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WaitpointStatus {
    Waiting,
    Completed,
    TimedOut,
}

impl WaitpointStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            WaitpointStatus::Waiting => "WAITING",
            WaitpointStatus::Completed => "COMPLETED",
            WaitpointStatus::TimedOut => "TIMED_OUT",
        }
    }

    /// The status [`as_str`](Self::as_str) wrote, `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Waiting, Self::Completed, Self::TimedOut]
            .into_iter()
            .find(|status| status.as_str() == text)
    }
}

/// A waitpoint: a run waiting for the next record of a session's `in` or `out` channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Waitpoint {
    pub id: Uuid,
    pub friendly_id: String,
    pub environment_id: Uuid,
    pub environment_public_id: String,
    pub run_id: Uuid,
    pub run_friendly_id: String,
    pub session_id: Uuid,
    pub session_friendly_id: String,
    pub io: Io,
    /// Completes with the first record whose seqNum is greater than this.
    pub after_seq: i64,
    pub status: WaitpointStatus,
    pub output: Option<String>,
    pub output_is_error: bool,
    pub completed_by_seq: Option<i64>,
    pub completed_at: Option<DateTime<Utc>>,
    pub timeout_at: Option<DateTime<Utc>>,
    pub tags: Value,
    pub idempotency_key: Option<String>,
    pub idempotency_key_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}
pub const OUTPUT_TYPE: &str = "application/json";
/// The code the client's `isWaitpointOutputTimeout` looks for.
pub const TIMEOUT_ERROR_CODE: &str = "TRIGGER_WAITPOINT_TIMEOUT";
pub const WAITPOINT_COMPLETED: &str = "waitpoint.completed";
pub const WAITPOINT_TIMED_OUT: &str = "waitpoint.timed_out";
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 2048;
/// Longest accepted `timeout` / `idempotencyKeyTTL`.
pub const MAX_DURATION: TimeDelta = TimeDelta::days(365);

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`, `"1w"` (a positive integer and a unit).
pub fn parse_duration(field: &'static str, text: &str) -> Result<TimeDelta, ValidationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        ValidationError::new(
            field,
            "must be a positive integer with a unit: ms, s, m, h, d or w (e.g. \"30s\")",
        )
    };
    let amount: i64 = number.parse().map_err(|_| bad())?;
    if amount <= 0 {
        return Err(bad());
    }
    let duration = match unit {
        "ms" => TimeDelta::try_milliseconds(amount),
        "s" => TimeDelta::try_seconds(amount),
        "m" => TimeDelta::try_minutes(amount),
        "h" => TimeDelta::try_hours(amount),
        "d" => TimeDelta::try_days(amount),
        "w" => TimeDelta::try_weeks(amount),
        _ => None,
    }
    .ok_or_else(bad)?;
    if duration > MAX_DURATION {
        return Err(ValidationError::new(field, "must be at most 365 days"));
    }
    Ok(duration)
}

/// The error output of a timed-out waitpoint, as the client recognises it.
pub fn timeout_output(timeout_at: DateTime<Utc>) -> String {
    json!({
        "code": TIMEOUT_ERROR_CODE,
        "message": format!("Waitpoint timed out at {}", timeout_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    })
    .to_string()
}

/// What a runner needs to resume the run a waitpoint belongs to.
pub struct WaitpointEvent<'a> {
    pub kind: &'static str,
    pub waitpoint_friendly_id: &'a str,
    pub run_friendly_id: &'a str,
    pub session_friendly_id: &'a str,
    pub environment_public_id: &'a str,
    pub io: &'a str,
    pub output: &'a str,
    pub output_is_error: bool,
    pub at: DateTime<Utc>,
}

impl WaitpointEvent<'_> {
    pub fn payload(&self) -> Value {
        json!({
            "type": self.kind,
            "waitpointId": self.waitpoint_friendly_id,
            "runId": self.run_friendly_id,
            "sessionId": self.session_friendly_id,
            "environmentId": self.environment_public_id,
            "io": self.io,
            "status": if self.kind == WAITPOINT_COMPLETED { WaitpointStatus::Completed } else { WaitpointStatus::TimedOut },
            "output": self.output,
            "outputType": OUTPUT_TYPE,
            "outputIsError": self.output_is_error,
            "completedAt": self.at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_back_what_they_write() {
        for status in [
            WaitpointStatus::Waiting,
            WaitpointStatus::Completed,
            WaitpointStatus::TimedOut,
        ] {
            assert_eq!(WaitpointStatus::parse(status.as_str()), Some(status));
            assert_eq!(json!(status), json!(status.as_str()));
        }
        assert_eq!(WaitpointStatus::parse("waiting"), None);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(
            parse_duration("timeout", "500ms"),
            Ok(TimeDelta::milliseconds(500))
        );
        assert_eq!(parse_duration("timeout", "30s"), Ok(TimeDelta::seconds(30)));
        assert_eq!(parse_duration("timeout", "5m"), Ok(TimeDelta::minutes(5)));
        assert_eq!(parse_duration("timeout", "2h"), Ok(TimeDelta::hours(2)));
        assert_eq!(parse_duration("timeout", "1d"), Ok(TimeDelta::days(1)));
        for bad in [
            "",
            "s",
            "10",
            "0s",
            "-1s",
            "1y",
            "1.5s",
            "99999999999999999999s",
            "400d",
        ] {
            assert!(parse_duration("timeout", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn timeout_output_carries_the_client_code() {
        let output = timeout_output(DateTime::from_timestamp(1_900_000_000, 0).unwrap_or_default());
        let parsed: Value = serde_json::from_str(&output).unwrap_or_default();
        assert_eq!(parsed["code"], TIMEOUT_ERROR_CODE);
    }
}
