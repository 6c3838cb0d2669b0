//! Signed snapshot URLs (the `snapshot-url` route): a URL that lets its holder GET or PUT one
//! session's chat snapshot until it expires, bound by an HMAC-SHA256 signature to the
//! environment, the session, the method and the expiry.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// How long a snapshot URL is valid.
pub const SNAPSHOT_URL_SECONDS: i64 = 300;

type HmacSha256 = Hmac<Sha256>;

/// The signing key, derived from the master key (never the master key itself).
fn signing_key(master_key: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"sessions snapshot-url signing key v1");
    hasher.update(master_key);
    hasher.finalize().into()
}

fn mac(
    master_key: &[u8; 32],
    environment: &str,
    session: &str,
    method: &str,
    expires: i64,
) -> HmacSha256 {
    // HMAC accepts keys of any length; 32 bytes cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&signing_key(master_key))
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    for part in [environment, session, method, &expires.to_string()] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part.as_bytes());
    }
    mac
}

/// The hex signature of `(environment, session, method, expires)`.
pub fn sign(
    master_key: &[u8; 32],
    environment: &str,
    session: &str,
    method: &str,
    expires: i64,
) -> String {
    hex::encode(
        mac(master_key, environment, session, method, expires)
            .finalize()
            .into_bytes(),
    )
}

/// Whether `signature` signs exactly these values (constant-time comparison).
pub fn verify(
    master_key: &[u8; 32],
    environment: &str,
    session: &str,
    method: &str,
    expires: i64,
    signature: &str,
) -> bool {
    let Ok(bytes) = hex::decode(signature) else {
        return false;
    };
    mac(master_key, environment, session, method, expires)
        .verify_slice(&bytes)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_every_part() {
        let key = [1_u8; 32];
        let signature = sign(&key, "env_a", "session_x", "GET", 1000);
        assert!(verify(&key, "env_a", "session_x", "GET", 1000, &signature));
        assert!(!verify(&key, "env_b", "session_x", "GET", 1000, &signature));
        assert!(!verify(&key, "env_a", "session_y", "GET", 1000, &signature));
        assert!(!verify(&key, "env_a", "session_x", "PUT", 1000, &signature));
        assert!(!verify(&key, "env_a", "session_x", "GET", 1001, &signature));
        assert!(!verify(
            &[2_u8; 32],
            "env_a",
            "session_x",
            "GET",
            1000,
            &signature
        ));
        assert!(!verify(&key, "env_a", "session_x", "GET", 1000, "zz"));
    }
}
