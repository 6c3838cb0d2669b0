//! Record headers: an ordered list of `[name, value]` pairs of UTF-8 text stored with a record
//! and returned wherever it is read (the records route, the SSE `batch` event). Two kinds of
//! records are told apart by them, as on the reference server:
//! - a *command record* has a first header with an empty name (e.g. `["", "trim"]`): the records
//!   route skips it, SSE passes it through so that clients advance their cursor;
//! - a *control record* carries `trigger-control` (e.g. `turn-complete`) and usually no body.
//!
//! Headers arrive as text: a writer that receives bytes that are not UTF-8 refuses them (400)
//! rather than storing a lossy copy.

/// One record's headers, in order.
pub type RecordHeaders = Vec<(String, String)>;

/// The header of control records.
pub const CONTROL_HEADER: &str = "trigger-control";
/// The control value that ends an agent's turn (what `X-Peek-Settled` looks for).
pub const TURN_COMPLETE: &str = "turn-complete";

/// Whether the record is a command record (first header name empty).
pub fn is_command_record(headers: &[(String, String)]) -> bool {
    headers.first().is_some_and(|(name, _)| name.is_empty())
}

/// Whether the record is a `turn-complete` control record.
pub fn is_turn_complete(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(name, value)| name == CONTROL_HEADER && value == TURN_COMPLETE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> RecordHeaders {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn command_records_start_with_an_empty_name() {
        assert!(is_command_record(&headers(&[("", "trim")])));
        assert!(!is_command_record(&headers(&[("x", ""), ("", "trim")])));
        assert!(!is_command_record(&[]));
    }

    #[test]
    fn turn_complete_is_a_control_header_value() {
        assert!(is_turn_complete(&headers(&[(
            "trigger-control",
            "turn-complete"
        )])));
        assert!(is_turn_complete(&headers(&[
            ("a", "b"),
            ("trigger-control", "turn-complete")
        ])));
        assert!(!is_turn_complete(&headers(&[("trigger-control", "other")])));
        assert!(!is_turn_complete(&headers(&[(
            "turn-complete",
            "trigger-control"
        )])));
    }
}
