//! Public access token scopes: `action:type[:id]` with actions `read`, `write`,
//! `admin`. Bare `admin` matches everything; `action:type` any id of that type; `action:type:id`
//! only that id (the id may itself contain `:`). `admin` on a type or id covers every action on
//! it; `write` does not imply `read`.

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

/// Whether one scope allows `action` on the session.
fn scope_allows(scope: &str, action: Action, session: SessionNames<'_>) -> bool {
    if scope == "admin" {
        return true;
    }
    let mut parts = scope.splitn(3, ':');
    let (Some(scope_action), Some(scope_type)) = (parts.next(), parts.next()) else {
        return false;
    };
    if scope_type != "sessions" {
        return false;
    }
    if scope_action != action.as_str() && scope_action != "admin" {
        return false;
    }
    match parts.next() {
        None => true,
        Some(id) => session.is_named(id),
    }
}

/// Whether any of `scopes` allows `action` on the session.
pub fn allows(scopes: &[String], action: Action, session: SessionNames<'_>) -> bool {
    scopes
        .iter()
        .any(|scope| scope_allows(scope, action, session))
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
