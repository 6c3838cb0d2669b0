//! Waitpoint rules: durations, statuses, outputs and event payloads.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};

use super::ValidationError;

pub const WAITPOINT_PREFIX: &str = "waitpoint_";
pub const STATUS_WAITING: &str = "WAITING";
pub const STATUS_COMPLETED: &str = "COMPLETED";
pub const STATUS_TIMED_OUT: &str = "TIMED_OUT";
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
            "status": if self.kind == WAITPOINT_COMPLETED { STATUS_COMPLETED } else { STATUS_TIMED_OUT },
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
