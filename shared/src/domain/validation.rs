//! Input validation rules of the session, channel and waitpoint routes. Each failure names the field.

use super::ids::SESSION_PREFIX;

/// A client input that breaks a rule. Always answered with a 4xx that carries the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

pub const MAX_EXTERNAL_ID_CHARS: usize = 256;
pub const MAX_PART_ID_BYTES: usize = 255;
pub const MAX_TYPE_CHARS: usize = 64;
pub const MAX_TASK_IDENTIFIER_CHARS: usize = 128;
pub const MAX_TAGS: usize = 10;
pub const MAX_TAG_CHARS: usize = 128;
pub const MAX_CLOSE_REASON_CHARS: usize = 256;
/// A `:session` path segment longer than this cannot name anything (ids and externalIds are shorter).
pub const MAX_SESSION_SEGMENT_CHARS: usize = 256;

fn char_len_between(
    field: &'static str,
    value: &str,
    min: usize,
    max: usize,
) -> Result<(), ValidationError> {
    let len = value.chars().count();
    if len < min || len > max {
        return Err(ValidationError::new(
            field,
            format!("must be {min}–{max} characters, got {len}"),
        ));
    }
    Ok(())
}

/// Trims and checks an `externalId` (1–256 chars after trim, not starting with `session_`).
pub fn external_id(value: &str) -> Result<String, ValidationError> {
    let trimmed = value.trim();
    char_len_between("externalId", trimmed, 1, MAX_EXTERNAL_ID_CHARS)?;
    if trimmed.starts_with(SESSION_PREFIX) {
        return Err(ValidationError::new(
            "externalId",
            "must not start with 'session_' (reserved for friendly ids)",
        ));
    }
    Ok(trimmed.to_owned())
}

/// Whether an externalId can name a session without colliding with the channel scope grammar
/// (`{key}:{io}`, `{key}:channels:{name}`): no `:channels:` inside, no `:in`/`:out` at the end.
/// Create refuses the others with 422, as the reference server does.
pub fn is_unambiguous_external_id(value: &str) -> bool {
    !value.contains(":channels:") && !value.ends_with(":in") && !value.ends_with(":out")
}

/// Checks an `X-Part-Id` header value: 1–255 bytes.
pub fn part_id(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() || value.len() > MAX_PART_ID_BYTES {
        return Err(ValidationError::new(
            "X-Part-Id",
            format!("must be 1–{MAX_PART_ID_BYTES} bytes, got {}", value.len()),
        ));
    }
    Ok(())
}

pub fn session_type(value: &str) -> Result<(), ValidationError> {
    char_len_between("type", value, 1, MAX_TYPE_CHARS)
}

pub fn task_identifier(value: &str) -> Result<(), ValidationError> {
    char_len_between("taskIdentifier", value, 1, MAX_TASK_IDENTIFIER_CHARS)
}

pub fn tags(values: &[String]) -> Result<(), ValidationError> {
    if values.len() > MAX_TAGS {
        return Err(ValidationError::new(
            "tags",
            format!("at most {MAX_TAGS} tags, got {}", values.len()),
        ));
    }
    for tag in values {
        char_len_between("tags", tag, 0, MAX_TAG_CHARS)?;
    }
    Ok(())
}

/// `triggerConfig.tags`, when present: an array of at most 10 strings of at most 128 characters.
pub fn trigger_config_tags(value: Option<&serde_json::Value>) -> Result<(), ValidationError> {
    let Some(value) = value else { return Ok(()) };
    let invalid = || ValidationError::new("triggerConfig.tags", "must be an array of strings");
    let tags = value.as_array().ok_or_else(invalid)?;
    if tags.len() > MAX_TAGS {
        return Err(ValidationError::new(
            "triggerConfig.tags",
            format!("at most {MAX_TAGS} tags, got {}", tags.len()),
        ));
    }
    for tag in tags {
        char_len_between(
            "triggerConfig.tags",
            tag.as_str().ok_or_else(invalid)?,
            0,
            MAX_TAG_CHARS,
        )?;
    }
    Ok(())
}

pub fn close_reason(value: &str) -> Result<(), ValidationError> {
    char_len_between("reason", value, 0, MAX_CLOSE_REASON_CHARS)
}

/// Checks the `:session` path segment before any lookup.
pub fn session_segment(value: &str) -> Result<(), ValidationError> {
    char_len_between("session", value, 1, MAX_SESSION_SEGMENT_CHARS)
}

/// Refuses U+0000 in a client string: the database's text and JSON types cannot hold it, so a
/// command carrying one could never be applied.
pub fn no_nul(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if value.contains('\0') {
        return Err(ValidationError::new(
            field,
            "must not contain NUL (U+0000) characters",
        ));
    }
    Ok(())
}

/// [`no_nul`] for every string and object key of a JSON document.
pub fn json_without_nul(
    field: &'static str,
    value: &serde_json::Value,
) -> Result<(), ValidationError> {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            serde_json::Value::String(text) => no_nul(field, text)?,
            serde_json::Value::Array(items) => pending.extend(items),
            serde_json::Value::Object(fields) => {
                for (key, item) in fields {
                    no_nul(field, key)?;
                    pending.push(item);
                }
            }
            serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {
            }
        }
    }
    Ok(())
}

/// Refuses dates outside the years 1–9999 (the database cannot store or compare all of
/// chrono's range, and no session needs more).
pub fn storable_date(
    field: &'static str,
    date: chrono::DateTime<chrono::Utc>,
) -> Result<chrono::DateTime<chrono::Utc>, ValidationError> {
    use chrono::Datelike;
    if (1..=9999).contains(&date.year()) {
        Ok(date)
    } else {
        Err(ValidationError::new(
            field,
            "must be a date in the years 1–9999",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_id_is_trimmed_and_bounded() {
        assert_eq!(external_id("  chat-1 ").as_deref(), Ok("chat-1"));
        assert!(external_id("   ").is_err());
        assert!(external_id(&"x".repeat(257)).is_err());
        assert!(external_id(&"é".repeat(256)).is_ok());
        assert!(external_id("session_abc").is_err());
    }

    #[test]
    fn part_id_is_bounded_in_bytes() {
        assert!(part_id("p").is_ok());
        assert!(part_id("").is_err());
        assert!(part_id(&"x".repeat(255)).is_ok());
        assert!(part_id(&"x".repeat(256)).is_err());
        assert!(part_id(&"é".repeat(128)).is_err());
    }

    #[test]
    fn nul_is_refused_anywhere_in_json() {
        assert!(no_nul("x", "fine").is_ok());
        assert!(no_nul("x", "a\0b").is_err());
        let clean = serde_json::json!({ "a": [1, "b", { "c": null }] });
        assert!(json_without_nul("body", &clean).is_ok());
        let nested = serde_json::json!({ "a": [1, "b", { "c": "d\u{0}" }] });
        assert!(json_without_nul("body", &nested).is_err());
        let key = serde_json::json!({ "k\u{0}": 1 });
        assert!(json_without_nul("body", &key).is_err());
    }

    #[test]
    fn dates_stay_within_four_digit_years() {
        let ok = chrono::DateTime::from_timestamp_millis(0).expect("epoch");
        assert!(storable_date("d", ok).is_ok());
        let ancient =
            chrono::DateTime::from_timestamp_millis(-8_000_000_000_000_000).expect("date");
        assert!(storable_date("d", ancient).is_err());
        let far = chrono::DateTime::from_timestamp_millis(8_000_000_000_000_000).expect("date");
        assert!(storable_date("d", far).is_err());
    }

    #[test]
    fn tags_are_bounded() {
        assert!(tags(&vec!["a".to_owned(); 10]).is_ok());
        assert!(tags(&vec!["a".to_owned(); 11]).is_err());
        assert!(tags(&["x".repeat(129)]).is_err());
    }

    #[test]
    fn external_ids_that_look_like_channel_scopes_are_ambiguous() {
        assert!(is_unambiguous_external_id("chat-1"));
        assert!(is_unambiguous_external_id("inbox:intro"));
        assert!(!is_unambiguous_external_id("chat-1:in"));
        assert!(!is_unambiguous_external_id("chat-1:out"));
        assert!(!is_unambiguous_external_id("chat-1:channels:notes"));
    }

    #[test]
    fn trigger_config_tags_are_optional_and_bounded() {
        use serde_json::json;
        assert!(trigger_config_tags(None).is_ok());
        assert!(trigger_config_tags(Some(&json!(vec!["a"; 10]))).is_ok());
        assert!(trigger_config_tags(Some(&json!(vec!["a"; 11]))).is_err());
        assert!(trigger_config_tags(Some(&json!([1]))).is_err());
        assert!(trigger_config_tags(Some(&json!("a"))).is_err());
        assert!(trigger_config_tags(Some(&json!(["x".repeat(129)]))).is_err());
    }
}
