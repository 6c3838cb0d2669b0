//! Idempotency keys and body fingerprints for `X-Part-Id` dedup.
//!
//! A dedup key names `(environment, session, stream, partId)` (the stream being `in`, `out` or
//! a named channel's direction, by its storage key). Its string form is used as a cache key,
//! so its components are length-prefixed: no two distinct tuples can share a key
//! (`("chat:in","in","p")` and `("chat","in","in:p")` encode differently).

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::Stream;

/// Encodes components injectively: each is written as `<byte length>:<bytes>`.
pub fn encode_components(components: &[&str]) -> String {
    let mut encoded = String::with_capacity(components.iter().map(|c| c.len() + 4).sum());
    for component in components {
        encoded.push_str(&component.len().to_string());
        encoded.push(':');
        encoded.push_str(component);
    }
    encoded
}

/// The identity of one idempotent append.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub environment_id: Uuid,
    pub session_id: Uuid,
    pub stream: Stream,
    pub part_id: String,
}

impl DedupKey {
    /// The injective string form, without any deployment prefix.
    pub fn encoded(&self) -> String {
        encode_components(&[
            &self.environment_id.to_string(),
            &self.session_id.to_string(),
            &self.stream.key(),
            &self.part_id,
        ])
    }
}

/// SHA-256 of the raw body, hex. Tells a duplicate (same body) from a conflict (other body).
pub fn body_fingerprint(body: &str) -> String {
    hex::encode(Sha256::digest(body.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colon_bearing_components_do_not_collide() {
        let a = encode_components(&["chat:in", "in", "p"]);
        let b = encode_components(&["chat", "in", "in:p"]);
        assert_ne!(a, b);
        assert_eq!(a, "7:chat:in2:in1:p");
    }

    #[test]
    fn empty_components_are_distinguished() {
        assert_ne!(encode_components(&["", "a"]), encode_components(&["a", ""]));
    }

    #[test]
    fn fingerprint_is_sha256_hex() {
        assert_eq!(
            body_fingerprint("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
