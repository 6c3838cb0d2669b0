//! Secret key digests and public access tokens (SPEC §2).
//!
//! Secret keys are 40 random alphanumerics, so a plain SHA-256 digest is a safe lookup key (no
//! password stretching needed). Public access tokens are HS256 JWTs signed with the environment's
//! secret key bytes.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The digest under which a secret key is stored and looked up.
pub fn secret_key_digest(secret_key: &str) -> String {
    hex::encode(Sha256::digest(secret_key.as_bytes()))
}

/// Claims of a public access token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicTokenClaims {
    pub iss: String,
    pub aud: String,
    /// The environment's public id.
    pub sub: String,
    #[serde(rename = "pub")]
    pub public: bool,
    pub scopes: Vec<String>,
    pub iat: i64,
    pub exp: i64,
}

/// Scopes of the token returned by session create: read and write on the session's addressing key.
pub fn session_token_scopes(addressing_key: &str) -> Vec<String> {
    vec![
        format!("read:sessions:{addressing_key}"),
        format!("write:sessions:{addressing_key}"),
    ]
}

/// Signs `claims` with HS256 and the environment's secret key bytes.
pub fn mint_public_token(
    claims: &PublicTokenClaims,
    secret_key: &str,
) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret_key.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn minted_token_verifies_with_the_same_key_only() {
        let claims = PublicTokenClaims {
            iss: "https://id.trigger.dev".into(),
            aud: "https://api.trigger.dev".into(),
            sub: "env_1".into(),
            public: true,
            scopes: session_token_scopes("chat-1"),
            iat: 1_900_000_000,
            exp: 4_000_000_000,
        };
        let token = mint_public_token(&claims, "tr_sk_a").expect("mint");
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&["https://api.trigger.dev"]);
        validation.set_issuer(&["https://id.trigger.dev"]);
        let decoded = jsonwebtoken::decode::<PublicTokenClaims>(
            &token,
            &DecodingKey::from_secret(b"tr_sk_a"),
            &validation,
        )
        .expect("verify");
        assert_eq!(decoded.claims, claims);
        assert!(
            jsonwebtoken::decode::<PublicTokenClaims>(
                &token,
                &DecodingKey::from_secret(b"tr_sk_b"),
                &validation
            )
            .is_err()
        );
    }

    #[test]
    fn digest_is_stable_and_not_the_key() {
        let digest = secret_key_digest("tr_sk_x");
        assert_eq!(digest, secret_key_digest("tr_sk_x"));
        assert!(!digest.contains("tr_sk_x"));
        assert_eq!(digest.len(), 64);
    }
}
