//! Pure domain rules: identifiers, channels, validation, dedup key encoding, partitioning,
//! body fingerprints and token minting. Nothing in here performs IO; everything is unit-tested.

pub mod channel;
pub mod dedup;
pub mod environment;
pub mod headers;
pub mod ids;
pub mod log;
pub mod partition;
pub mod record;
pub mod scopes;
pub mod session;
pub mod snapshots;
pub mod tokens;
pub mod validation;
pub mod waitpoint;

pub use channel::{ChannelName, Io, Stream};
pub use ids::SessionAddress;
pub use validation::ValidationError;
