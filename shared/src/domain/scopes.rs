//! Public access token scopes: `action:type[:id]` with actions `read`, `write`, `trigger`,
//! `admin`. Bare `admin` matches everything; `action:type` any id of that type; `action:type:id`
//! only that id (the id may itself contain `:`). `admin` on a type or id covers every action on
//! it; `write` does not imply `read`, nor `trigger`.
//!
//! Stream folds (as the reference server has them since 4.6): on a session's reserved channel,
//! `{name}:{io}` covers just that channel, so `read:sessions:chat-1:out` reads `.out` and
//! nothing else; on a named side channel `{name}:channels:{channel}` covers both its directions
//! and `{name}:channels:{channel}:{io}` one of them (`{name}:{io}` covers no side channel). Names that contain `:channels:` or end in `:in`/`:out` would be ambiguous in
//! that grammar; they never match on the channel routes (new sessions cannot be given such an
//! externalId).

use super::{ChannelName, Io, Stream};

/// What a route wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Read,
    Write,
    Admin,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Write => "write",
            Action::Admin => "admin",
        }
    }
}

/// The two names a session answers to: its friendly id and, if set, its externalId.
#[derive(Clone, Copy, Debug)]
pub struct SessionNames<'a> {
    pub friendly_id: &'a str,
    pub external_id: Option<&'a str>,
}

impl SessionNames<'_> {
    fn is_named(&self, id: &str) -> bool {
        id == self.friendly_id || self.external_id == Some(id)
    }
}

/// What part of a session a route touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// The session itself (retrieve, update, close, snapshots, waitpoints).
    Session,
    /// One of its reserved channels (`in` / `out`): records, SSE and append.
    Stream(Io),
    /// One direction of a named side channel: records, SSE and append.
    Channel(&'a ChannelName, Io),
}

impl<'a> Target<'a> {
    /// The target of a route on `stream`.
    pub fn of_stream(stream: &'a Stream) -> Self {
        match &stream.channel {
            None => Target::Stream(stream.io),
            Some(channel) => Target::Channel(channel, stream.io),
        }
    }
}

/// Whether a session name may take part in the stream folds (see the module doc).
fn foldable(name: &str) -> bool {
    !name.contains(":channels:") && !name.ends_with(":in") && !name.ends_with(":out")
}

/// A scope split into action, type and optional id; `None` for anything that is not one.
fn parse_scope(scope: &str) -> Option<(&str, &str, Option<&str>)> {
    let mut parts = scope.splitn(3, ':');
    let (action, kind) = (parts.next()?, parts.next()?);
    Some((action, kind, parts.next()))
}

/// Whether one scope allows `action` on `target` of the session.
fn scope_allows(
    scope: &str,
    action: Action,
    session: SessionNames<'_>,
    target: Target<'_>,
) -> bool {
    if scope == "admin" {
        return true;
    }
    let Some((scope_action, "sessions", id)) = parse_scope(scope) else {
        return false;
    };
    if scope_action != action.as_str() && scope_action != "admin" {
        return false;
    }
    let Some(id) = id else { return true };
    if target == Target::Session {
        return session.is_named(id);
    }
    [Some(session.friendly_id), session.external_id]
        .into_iter()
        .flatten()
        .filter(|name| foldable(name))
        .any(|name| {
            let Some(rest) = id.strip_prefix(name) else {
                return false;
            };
            let Some(rest) = rest.strip_prefix(':') else {
                return rest.is_empty();
            };
            match target {
                Target::Session => false,
                // `{name}:{io}`
                Target::Stream(io) => rest == io.as_str(),
                // `{name}:channels:{channel}` or `{name}:channels:{channel}:{io}`
                Target::Channel(channel, io) => rest
                    .strip_prefix("channels:")
                    .and_then(|rest| rest.strip_prefix(channel.as_str()))
                    .is_some_and(|rest| {
                        rest.is_empty()
                            || rest
                                .strip_prefix(':')
                                .is_some_and(|rest| rest == io.as_str())
                    }),
            }
        })
}

/// Whether any of `scopes` allows `action` on the session itself.
pub fn allows(scopes: &[String], action: Action, session: SessionNames<'_>) -> bool {
    allows_on(scopes, action, session, Target::Session)
}

/// Whether any of `scopes` allows `action` on `target` of the session.
pub fn allows_on(
    scopes: &[String],
    action: Action,
    session: SessionNames<'_>,
    target: Target<'_>,
) -> bool {
    scopes
        .iter()
        .any(|scope| scope_allows(scope, action, session, target))
}

/// Whether any of `scopes` may trigger runs of `task_identifier`: `trigger:tasks:{task}`,
/// `trigger:tasks`, `admin:tasks[:{task}]` or `admin`. (`write:…` never grants it.)
pub fn allows_trigger(scopes: &[String], task_identifier: &str) -> bool {
    any_grants(scopes, "trigger", "tasks", Some(task_identifier))
}

/// Whether any of `scopes` may create a session with `external_id` (none: a session only a
/// bare `write:sessions` covers): `write:sessions`, `write:sessions:{externalId}`, their
/// `admin` forms, or `admin`.
pub fn allows_session_create(scopes: &[String], external_id: Option<&str>) -> bool {
    any_grants(scopes, "write", "sessions", external_id)
}

/// Whether any of `scopes` is `admin`, or `action` (or `admin`) on `kind` with no id or with
/// exactly `id` (plain matching, no session names or folds).
fn any_grants(scopes: &[String], action: &str, kind: &str, id: Option<&str>) -> bool {
    scopes.iter().any(|scope| {
        scope == "admin"
            || parse_scope(scope).is_some_and(|(scope_action, scope_kind, scope_id)| {
                (scope_action == action || scope_action == "admin")
                    && scope_kind == kind
                    && scope_id.is_none_or(|scope_id| Some(scope_id) == id)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: SessionNames<'static> = SessionNames {
        friendly_id: "session_abc",
        external_id: Some("chat:42"),
    };

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn either_name_of_the_session_matches() {
        assert!(allows(
            &scopes(&["read:sessions:chat:42"]),
            Action::Read,
            SESSION
        ));
        assert!(allows(
            &scopes(&["read:sessions:session_abc"]),
            Action::Read,
            SESSION
        ));
        assert!(!allows(
            &scopes(&["read:sessions:chat"]),
            Action::Read,
            SESSION
        ));
        assert!(!allows(
            &scopes(&["read:sessions:other"]),
            Action::Read,
            SESSION
        ));
    }

    #[test]
    fn actions_do_not_imply_each_other_except_admin() {
        assert!(!allows(
            &scopes(&["write:sessions:chat:42"]),
            Action::Read,
            SESSION
        ));
        assert!(!allows(
            &scopes(&["read:sessions:chat:42"]),
            Action::Write,
            SESSION
        ));
        assert!(allows(
            &scopes(&["admin:sessions:chat:42"]),
            Action::Write,
            SESSION
        ));
        assert!(allows(&scopes(&["admin"]), Action::Admin, SESSION));
        assert!(allows(&scopes(&["write:sessions"]), Action::Write, SESSION));
        assert!(!allows(&scopes(&["write:runs"]), Action::Write, SESSION));
        assert!(!allows(&scopes(&["admin:runs"]), Action::Read, SESSION));
        assert!(!allows(&scopes(&["read"]), Action::Read, SESSION));
        assert!(!allows(&[], Action::Read, SESSION));
    }

    #[test]
    fn stream_folds_narrow_a_scope_to_one_channel() {
        let read_out = scopes(&["read:sessions:chat:42:out"]);
        assert!(allows_on(
            &read_out,
            Action::Read,
            SESSION,
            Target::Stream(Io::Out)
        ));
        assert!(!allows_on(
            &read_out,
            Action::Read,
            SESSION,
            Target::Stream(Io::In)
        ));
        assert!(!allows(&read_out, Action::Read, SESSION));
        let whole = scopes(&["read:sessions:session_abc"]);
        assert!(allows_on(
            &whole,
            Action::Read,
            SESSION,
            Target::Stream(Io::In)
        ));
        let write_in = scopes(&["write:sessions:session_abc:in"]);
        assert!(allows_on(
            &write_in,
            Action::Write,
            SESSION,
            Target::Stream(Io::In)
        ));
        assert!(!allows_on(
            &write_in,
            Action::Write,
            SESSION,
            Target::Stream(Io::Out)
        ));
        assert!(!allows_on(
            &scopes(&["read:sessions:chat:42:outx"]),
            Action::Read,
            SESSION,
            Target::Stream(Io::Out)
        ));
    }

    #[test]
    fn channel_folds_cover_one_side_channel_or_one_direction_of_it() {
        let notes: ChannelName = "notes".parse().expect("name");
        let other: ChannelName = "other".parse().expect("name");
        let on = |scope: &str, channel: &ChannelName, io: Io| {
            allows_on(
                &scopes(&[scope]),
                Action::Write,
                SESSION,
                Target::Channel(channel, io),
            )
        };
        assert!(on("write:sessions:chat:42", &notes, Io::In));
        assert!(on(
            "write:sessions:session_abc:channels:notes",
            &notes,
            Io::Out
        ));
        assert!(on(
            "write:sessions:chat:42:channels:notes:in",
            &notes,
            Io::In
        ));
        assert!(!on(
            "write:sessions:chat:42:channels:notes:in",
            &notes,
            Io::Out
        ));
        assert!(!on("write:sessions:chat:42:channels:notes", &other, Io::In));
        assert!(!on("write:sessions:chat:42:channels:note", &notes, Io::In));
        assert!(!on("write:sessions:chat:42:in", &notes, Io::In));
        assert!(!on(
            "write:sessions:chat:42:channels:notes:in:x",
            &notes,
            Io::In
        ));
        // A channel scope covers neither the session nor its reserved channels.
        let channel_scope = scopes(&["write:sessions:chat:42:channels:notes"]);
        assert!(!allows(&channel_scope, Action::Write, SESSION));
        assert!(!allows_on(
            &channel_scope,
            Action::Write,
            SESSION,
            Target::Stream(Io::In)
        ));
    }

    #[test]
    fn ambiguous_names_never_match_on_streams() {
        let ambiguous = SessionNames {
            friendly_id: "session_q",
            external_id: Some("room:in"),
        };
        let token = scopes(&["read:sessions:room:in"]);
        assert!(!allows_on(
            &token,
            Action::Read,
            ambiguous,
            Target::Stream(Io::In)
        ));
        // The same scope does name the *stream* `in` of a session called `room`.
        let room = SessionNames {
            friendly_id: "session_r",
            external_id: Some("room"),
        };
        assert!(allows_on(
            &token,
            Action::Read,
            room,
            Target::Stream(Io::In)
        ));
        // Session routes still match the exact name.
        assert!(allows(&token, Action::Read, ambiguous));
    }

    #[test]
    fn trigger_needs_a_trigger_or_admin_scope_on_tasks() {
        assert!(allows_trigger(&scopes(&["trigger:tasks:agent"]), "agent"));
        assert!(allows_trigger(&scopes(&["trigger:tasks"]), "agent"));
        assert!(allows_trigger(&scopes(&["admin:tasks:agent"]), "agent"));
        assert!(allows_trigger(&scopes(&["admin"]), "agent"));
        assert!(!allows_trigger(&scopes(&["trigger:tasks:other"]), "agent"));
        assert!(!allows_trigger(&scopes(&["write:tasks:agent"]), "agent"));
        assert!(!allows_trigger(&scopes(&["write:all"]), "agent"));
        assert!(!allows_trigger(&scopes(&["trigger:sessions"]), "agent"));
    }

    #[test]
    fn session_create_needs_write_on_the_external_id_or_all_sessions() {
        assert!(allows_session_create(&scopes(&["write:sessions"]), None));
        assert!(allows_session_create(
            &scopes(&["write:sessions:chat-1"]),
            Some("chat-1")
        ));
        assert!(!allows_session_create(
            &scopes(&["write:sessions:chat-1"]),
            Some("chat-2")
        ));
        assert!(!allows_session_create(
            &scopes(&["write:sessions:chat-1"]),
            None
        ));
        assert!(!allows_session_create(&scopes(&["read:sessions"]), None));
        assert!(allows_session_create(
            &scopes(&["admin:sessions"]),
            Some("x")
        ));
    }

    #[test]
    fn a_session_without_external_id_matches_only_its_friendly_id() {
        let anonymous = SessionNames {
            friendly_id: "session_x",
            external_id: None,
        };
        assert!(allows(
            &scopes(&["read:sessions:session_x"]),
            Action::Read,
            anonymous
        ));
        assert!(!allows(
            &scopes(&["read:sessions:"]),
            Action::Read,
            anonymous
        ));
    }
}
