//! Pure domain rules and the domain's data: identifiers, channels and streams, validation, dedup
//! key encoding, partitioning, body fingerprints, token minting, and the structs storage reads
//! and writes (`Session`, `Run`, `StoredRecord`, `Environment`, `Waitpoint`). Nothing in here
//! performs IO; the rules are unit-tested.

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
