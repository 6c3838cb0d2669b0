//! Partition logs: where a worker resumes reading, and how the first message it reads proves
//! that nothing was skipped.
//!
//! A partition is an append-only log (a RabbitMQ stream, or the embedded default's in-process
//! log) whose messages carry an increasing offset. Offsets are NOT contiguous: RabbitMQ leaves
//! holes (measured on 3.10.8: offsets 2431 and 2999 were never delivered in a stream of 3,000
//! messages). So "nothing was skipped" cannot be checked by counting. Instead the database keeps
//! the offset *and message id* of the last message applied from each log, a reader starts
//! exactly at that offset, and the first message it receives must be that very message (which it
//! then skips, as already applied). If the log no longer holds it (retention removed it, or the
//! log was deleted and declared anew), the first message is another one, and the partition stops
//! instead of silently skipping whatever was lost.
//!
//! Nothing here does IO.

/// Where a reader starts on a partition log, from the position stored with the records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumePoint {
    /// Nothing was ever applied from this log: read from offset 0, whose message must come first.
    Beginning,
    /// `offset` (message `message_id`) was the last message applied: read from `offset`; that
    /// message must come first and is skipped.
    AfterApplied {
        offset: i64,
        message_id: Option<String>,
    },
    /// An operator accepted a gap (`sessions-worker admin logs accept-gap`): read from the
    /// first message the log still holds and apply whatever comes first.
    FirstAvailable,
}

impl ResumePoint {
    /// The last applied offset as stored (the compare-and-set's expected value): `None` when
    /// nothing was applied since the log started or since a gap was accepted.
    pub fn applied_offset(&self) -> Option<i64> {
        match self {
            ResumePoint::AfterApplied { offset, .. } => Some(*offset),
            ResumePoint::Beginning | ResumePoint::FirstAvailable => None,
        }
    }
}

/// What to do with the first message a new reader receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstMessage {
    /// A message not applied yet: apply it (and everything after it).
    Apply,
    /// The last applied message itself: skip it, apply what follows.
    AlreadyApplied,
    /// Messages between the resume point and this one may be lost: stop the partition.
    Gap { expected: String, found: String },
}

/// Judges the first message (`offset`, `message_id`) a reader received after resuming at `resume`.
pub fn judge_first_message(
    resume: &ResumePoint,
    offset: i64,
    message_id: Option<&str>,
) -> FirstMessage {
    match resume {
        ResumePoint::FirstAvailable => FirstMessage::Apply,
        ResumePoint::Beginning if offset == 0 => FirstMessage::Apply,
        ResumePoint::Beginning => FirstMessage::Gap {
            expected: "offset 0 (nothing applied yet)".into(),
            found: format!("offset {offset}"),
        },
        ResumePoint::AfterApplied {
            offset: applied,
            message_id: applied_id,
        } => {
            let same_message = match (applied_id.as_deref(), message_id) {
                (Some(expected), Some(found)) => expected == found,
                // A message without an id (none of ours) can only be matched by its offset.
                (None, _) => true,
                (Some(_), None) => false,
            };
            if offset == *applied && same_message {
                FirstMessage::AlreadyApplied
            } else {
                FirstMessage::Gap {
                    expected: format!(
                        "offset {applied} (message {})",
                        applied_id.as_deref().unwrap_or("without id")
                    ),
                    found: format!(
                        "offset {offset} (message {})",
                        message_id.unwrap_or("without id")
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(offset: i64, id: &str) -> ResumePoint {
        ResumePoint::AfterApplied {
            offset,
            message_id: Some(id.into()),
        }
    }

    #[test]
    fn a_new_log_must_start_at_offset_zero() {
        assert_eq!(
            judge_first_message(&ResumePoint::Beginning, 0, Some("a")),
            FirstMessage::Apply
        );
        assert!(matches!(
            judge_first_message(&ResumePoint::Beginning, 2361, Some("a")),
            FirstMessage::Gap { .. }
        ));
    }

    #[test]
    fn the_last_applied_message_is_skipped_and_anything_else_is_a_gap() {
        assert_eq!(
            judge_first_message(&after(10, "m10"), 10, Some("m10")),
            FirstMessage::AlreadyApplied
        );
        // Retention removed offset 10: the log starts later.
        assert!(matches!(
            judge_first_message(&after(10, "m10"), 2361, Some("x")),
            FirstMessage::Gap { .. }
        ));
        // The log was deleted and declared anew: offset 10 exists but is another message.
        assert!(matches!(
            judge_first_message(&after(10, "m10"), 10, Some("other")),
            FirstMessage::Gap { .. }
        ));
        assert!(matches!(
            judge_first_message(&after(10, "m10"), 10, None),
            FirstMessage::Gap { .. }
        ));
    }

    #[test]
    fn an_accepted_gap_applies_whatever_comes_first() {
        assert_eq!(
            judge_first_message(&ResumePoint::FirstAvailable, 5000, None),
            FirstMessage::Apply
        );
        assert_eq!(ResumePoint::FirstAvailable.applied_offset(), None);
        assert_eq!(after(7, "m").applied_offset(), Some(7));
    }
}
