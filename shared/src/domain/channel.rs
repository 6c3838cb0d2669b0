//! Where a session's records live: the two reserved channels (`in`, `out`) and the two
//! directions of any number of named side channels (`channels/{name}/{in|out}`).

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

/// The name of a side channel: 1–128 of `A-Z a-z 0-9 . _ -` (as the reference server has it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelName(String);

/// A channel name that breaks the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("channel name must be 1–128 characters of A-Z a-z 0-9 . _ -")]
pub struct InvalidChannelName;

impl ChannelName {
    pub const MAX_CHARS: usize = 128;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ChannelName {
    type Error = InvalidChannelName;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        let valid = !value.is_empty()
            && value.len() <= Self::MAX_CHARS
            && value
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
        if valid {
            Ok(Self(value))
        } else {
            Err(InvalidChannelName)
        }
    }
}

impl From<ChannelName> for String {
    fn from(name: ChannelName) -> Self {
        name.0
    }
}

impl FromStr for ChannelName {
    type Err = InvalidChannelName;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One ordered sequence of records of a session: a reserved channel (`channel: None`) or one
/// direction of a named side channel. Each has its own gapless seqNums from 0.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Stream {
    pub channel: Option<ChannelName>,
    pub io: Io,
}

impl Stream {
    /// The reserved channel `io`.
    pub const fn reserved(io: Io) -> Self {
        Self { channel: None, io }
    }

    pub fn named(channel: ChannelName, io: Io) -> Self {
        Self {
            channel: Some(channel),
            io,
        }
    }

    pub fn is_reserved(&self) -> bool {
        self.channel.is_none()
    }

    /// How the stream is stored and keyed: `in`, `out`, or `channels/{name}/{io}`. (The
    /// reserved keys are what every earlier version stored.)
    pub fn key(&self) -> String {
        match &self.channel {
            None => self.io.as_str().to_owned(),
            Some(name) => format!("channels/{name}/{}", self.io),
        }
    }

    /// The stream a [`Stream::key`] names.
    pub fn from_key(key: &str) -> Option<Self> {
        if let Ok(io) = key.parse() {
            return Some(Self::reserved(io));
        }
        let rest = key.strip_prefix("channels/")?;
        let (name, io) = rest.rsplit_once('/')?;
        Some(Self::named(name.parse().ok()?, io.parse().ok()?))
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_the_reference_rule() {
        assert!("notes".parse::<ChannelName>().is_ok());
        assert!("a.b_c-D9".parse::<ChannelName>().is_ok());
        assert!("x".repeat(128).parse::<ChannelName>().is_ok());
        assert!("x".repeat(129).parse::<ChannelName>().is_err());
        assert!("".parse::<ChannelName>().is_err());
        assert!("with space".parse::<ChannelName>().is_err());
        assert!("slash/no".parse::<ChannelName>().is_err());
        assert!("é".parse::<ChannelName>().is_err());
        assert!(serde_json::from_str::<ChannelName>("\"bad name\"").is_err());
    }

    #[test]
    fn stream_keys_round_trip_and_keep_the_reserved_keys() {
        assert_eq!(Stream::reserved(Io::In).key(), "in");
        assert_eq!(Stream::reserved(Io::Out).key(), "out");
        let named = Stream::named("notes.v1".parse().expect("name"), Io::Out);
        assert_eq!(named.key(), "channels/notes.v1/out");
        for stream in [Stream::reserved(Io::In), Stream::reserved(Io::Out), named] {
            assert_eq!(Stream::from_key(&stream.key()), Some(stream));
        }
        assert_eq!(Stream::from_key("channels/a/sideways"), None);
        assert_eq!(Stream::from_key("channels/bad name/in"), None);
        assert_eq!(Stream::from_key("inout"), None);
    }

    #[test]
    fn parses_only_in_and_out() {
        assert_eq!("in".parse::<Io>(), Ok(Io::In));
        assert_eq!("out".parse::<Io>(), Ok(Io::Out));
        assert!("IN".parse::<Io>().is_err());
        assert!("inout".parse::<Io>().is_err());
        assert_eq!(Io::Out.to_string(), "out");
    }
}
