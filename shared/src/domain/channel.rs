//! The two channels of a session.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// `in` carries user → agent records, `out` agent → user records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Io {
    In,
    Out,
}

impl Io {
    pub const fn as_str(self) -> &'static str {
        match self {
            Io::In => "in",
            Io::Out => "out",
        }
    }
}

impl fmt::Display for Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The path segment was neither `in` nor `out`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown channel {0:?}: expected \"in\" or \"out\"")]
pub struct UnknownIo(pub String);

impl FromStr for Io {
    type Err = UnknownIo;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "in" => Ok(Io::In),
            "out" => Ok(Io::Out),
            other => Err(UnknownIo(other.chars().take(16).collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_in_and_out() {
        assert_eq!("in".parse::<Io>(), Ok(Io::In));
        assert_eq!("out".parse::<Io>(), Ok(Io::Out));
        assert!("IN".parse::<Io>().is_err());
        assert!("inout".parse::<Io>().is_err());
        assert_eq!(Io::Out.to_string(), "out");
    }
}
