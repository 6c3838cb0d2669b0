//! Secret key digests and public access tokens.
//!
//! Secret keys are 40 random alphanumerics, so a plain SHA-256 digest is a safe lookup key (no
//! password stretching needed). Public access tokens are HS256 JWTs signed with the environment's
//! secret key bytes.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Clock leeway when checking `exp` (and `nbf`, `iat`): a few seconds, not jsonwebtoken's 60.
pub const TOKEN_LEEWAY_SECONDS: u64 = 5;

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
    /// `pub: true` marks a public access token; anything else is refused.
    #[serde(rename = "pub", default)]
    pub public: bool,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `generateJWT` may omit it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
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
    sign_hs256(claims, secret_key)
}

/// Both kinds of token: HS256 over the secret key's bytes.
fn sign_hs256(
    claims: &impl Serialize,
    secret_key: &str,
) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret_key.as_bytes()),
    )
}

/// Verifies either kind of token: HS256 pinned, `exp`, `iss`, `aud` and `sub` required, `iss`
/// and `aud` checked, [`TOKEN_LEEWAY_SECONDS`] of leeway.
fn verify_hs256<Claims: serde::de::DeserializeOwned>(
    token: &str,
    secret_key: &str,
    issuer: &str,
    audience: &str,
) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms = vec![Algorithm::HS256];
    validation.leeway = TOKEN_LEEWAY_SECONDS;
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret_key.as_bytes()),
        &validation,
    )
    .map(|data| data.claims)
    .map_err(|_| TokenError::Invalid)
}

/// The audience of writer access tokens: never a public access token's, so neither kind is
/// accepted as the other.
pub const WRITER_TOKEN_AUDIENCE: &str = "sessions:s2-writer";

/// Claims of a writer access token (the `x-s2-access-token` that initializing a stream hands
/// out): it may append to (and trim) exactly one stream of one session in one environment, until
/// `exp`. Signed like public access tokens, with one of the environment's secret keys, so it is
/// verified without a database read (keys are cached) and dies with the key that signed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterTokenClaims {
    pub iss: String,
    /// Always [`WRITER_TOKEN_AUDIENCE`].
    pub aud: String,
    /// The environment's public id.
    pub sub: String,
    /// The stream name it may write: `sessions/{session friendly id}/{stream key}`.
    pub stream: String,
    pub iat: i64,
    pub exp: i64,
}

/// Signs writer claims with HS256 and the environment's secret key bytes.
pub fn mint_writer_token(
    claims: &WriterTokenClaims,
    secret_key: &str,
) -> Result<String, jsonwebtoken::errors::Error> {
    sign_hs256(claims, secret_key)
}

/// Verifies a writer token with one candidate secret key (HS256 pinned, `exp`, `iss` and the
/// writer audience checked).
pub fn verify_writer_token(
    token: &str,
    secret_key: &str,
    issuer: &str,
) -> Result<WriterTokenClaims, TokenError> {
    verify_hs256(token, secret_key, issuer, WRITER_TOKEN_AUDIENCE)
}

/// Why a public access token was refused. Deliberately coarse: callers get one message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's signature, algorithm, issuer, audience or expiry is invalid")]
    Invalid,
}

/// The `sub` claim of a token, read WITHOUT verifying it: only to find which environment's keys
/// to verify it with. Never trust anything else from it.
pub fn unverified_subject(token: &str) -> Result<String, TokenError> {
    let payload = token.split('.').nth(1).ok_or(TokenError::Malformed)?;
    let bytes = base64_url_decode(payload).ok_or(TokenError::Malformed)?;
    #[derive(Deserialize)]
    struct Subject {
        sub: String,
    }
    serde_json::from_slice::<Subject>(&bytes)
        .map(|subject| subject.sub)
        .map_err(|_| TokenError::Malformed)
}

fn base64_url_decode(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut output = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0_u32, 0_u32);
    for byte in text.trim_end_matches('=').bytes() {
        let value = ALPHABET.iter().position(|c| *c == byte)?;
        buffer = (buffer << 6) | u32::try_from(value).ok()?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            output.push(u8::try_from((buffer >> bits) & 0xff).ok()?);
        }
    }
    Some(output)
}

/// Verifies an HS256 token with one candidate secret key: algorithm pinned, `exp` required,
/// `iss`/`aud` checked, [`TOKEN_LEEWAY_SECONDS`] of leeway.
pub fn verify_public_token(
    token: &str,
    secret_key: &str,
    issuer: &str,
    audience: &str,
) -> Result<PublicTokenClaims, TokenError> {
    verify_hs256(token, secret_key, issuer, audience)
}

/// Encrypts a secret key for storage (ChaCha20-Poly1305 under the master key; hex of
/// nonce ‖ ciphertext). The database never holds the plaintext.
pub fn encrypt_secret(master_key: &[u8; 32], plaintext: &str) -> String {
    let cipher = ChaCha20Poly1305::new(&Key::from(*master_key));
    let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
    // Encryption with a valid key and nonce cannot fail for in-memory buffers.
    let ciphertext = cipher
        .encrypt(&nonce, plaintext.as_bytes())
        .unwrap_or_default();
    let mut sealed = nonce.to_vec();
    sealed.extend_from_slice(&ciphertext);
    hex::encode(sealed)
}

/// Decrypts what [`encrypt_secret`] produced; `None` if the master key is wrong or the data
/// damaged.
pub fn decrypt_secret(master_key: &[u8; 32], sealed: &str) -> Option<String> {
    let bytes = hex::decode(sealed).ok()?;
    if bytes.len() < 12 {
        return None;
    }
    let (nonce, ciphertext) = bytes.split_at(12);
    let cipher = ChaCha20Poly1305::new(&Key::from(*master_key));
    let nonce = Nonce::from(<[u8; 12]>::try_from(nonce).ok()?);
    let plaintext = cipher.decrypt(&nonce, ciphertext).ok()?;
    String::from_utf8(plaintext).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_only_under_the_same_master_key() {
        let master = [7_u8; 32];
        let sealed = encrypt_secret(&master, "tr_sk_secret");
        assert!(!sealed.contains("tr_sk_secret"));
        assert_ne!(
            sealed,
            encrypt_secret(&master, "tr_sk_secret"),
            "fresh nonce each time"
        );
        assert_eq!(
            decrypt_secret(&master, &sealed).as_deref(),
            Some("tr_sk_secret")
        );
        assert_eq!(decrypt_secret(&[8_u8; 32], &sealed), None);
        assert_eq!(decrypt_secret(&master, "zz"), None);
    }

    fn claims(exp: i64) -> PublicTokenClaims {
        PublicTokenClaims {
            iss: "https://id.trigger.dev".into(),
            aud: "https://api.trigger.dev".into(),
            sub: "env_1".into(),
            public: true,
            scopes: vec!["read:sessions".into()],
            iat: None,
            exp,
        }
    }

    #[test]
    fn verification_pins_hs256_and_checks_expiry_issuer_and_audience() {
        let now = chrono::Utc::now().timestamp();
        let good = mint_public_token(&claims(now + 60), "k").expect("mint");
        let (iss, aud) = ("https://id.trigger.dev", "https://api.trigger.dev");
        assert!(verify_public_token(&good, "k", iss, aud).is_ok());
        assert_eq!(unverified_subject(&good).as_deref(), Ok("env_1"));
        assert!(verify_public_token(&good, "other", iss, aud).is_err());
        assert!(verify_public_token(&good, "k", "https://evil", aud).is_err());
        assert!(verify_public_token(&good, "k", iss, "https://evil").is_err());
        let just_expired = mint_public_token(&claims(now - 10), "k").expect("mint");
        assert!(verify_public_token(&just_expired, "k", iss, aud).is_err());
        let within_leeway = mint_public_token(&claims(now - 2), "k").expect("mint");
        assert!(verify_public_token(&within_leeway, "k", iss, aud).is_ok());
        // alg: none, with the same claims.
        let parts: Vec<&str> = good.split('.').collect();
        let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(verify_public_token(&unsigned, "k", iss, aud).is_err());
        assert!(unverified_subject("garbage").is_err());
    }

    #[test]
    fn minted_token_verifies_with_the_same_key_only() {
        let claims = PublicTokenClaims {
            iss: "https://id.trigger.dev".into(),
            aud: "https://api.trigger.dev".into(),
            sub: "env_1".into(),
            public: true,
            scopes: session_token_scopes("chat-1"),
            iat: Some(1_900_000_000),
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
    fn writer_tokens_and_public_tokens_are_never_taken_for_each_other() {
        let (iss, aud) = ("https://id.trigger.dev", "https://api.trigger.dev");
        let now = chrono::Utc::now().timestamp();
        let writer = WriterTokenClaims {
            iss: iss.into(),
            aud: WRITER_TOKEN_AUDIENCE.into(),
            sub: "env_1".into(),
            stream: "sessions/session_1/out".into(),
            iat: now,
            exp: now + 60,
        };
        let token = mint_writer_token(&writer, "k").expect("mint");
        assert_eq!(verify_writer_token(&token, "k", iss), Ok(writer.clone()));
        assert!(verify_writer_token(&token, "other", iss).is_err());
        assert!(verify_public_token(&token, "k", iss, aud).is_err());
        let public = mint_public_token(&claims(now + 60), "k").expect("mint");
        assert!(verify_writer_token(&public, "k", iss).is_err());
        let expired = mint_writer_token(
            &WriterTokenClaims {
                exp: now - 10,
                ..writer
            },
            "k",
        )
        .expect("mint");
        assert!(verify_writer_token(&expired, "k", iss).is_err());
    }

    #[test]
    fn digest_is_stable_and_not_the_key() {
        let digest = secret_key_digest("tr_sk_x");
        assert_eq!(digest, secret_key_digest("tr_sk_x"));
        assert!(!digest.contains("tr_sk_x"));
        assert_eq!(digest.len(), 64);
    }
}
