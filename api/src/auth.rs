//! Who is calling: secret keys today (digest lookup in the caller's environment).
//!
//! Public access tokens (JWTs) are minted at session create; verifying them on routes is not
//! built yet, so a JWT bearer is answered 401 with a message that says so.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use shared::domain::tokens::secret_key_digest;
use shared::storage::EnvironmentRow;

use crate::AppState;
use crate::error::ApiError;

/// A caller authenticated by a secret key: full access to its environment.
#[derive(Clone, Debug)]
pub struct SecretKeyCaller {
    pub environment: EnvironmentRow,
    /// The presented key; signs the public tokens this request mints. Never logged or stored.
    pub secret_key: String,
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl FromRequestParts<AppState> for SecretKeyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized(
            "Missing or malformed Authorization header: expected 'Bearer <secret key>'",
        ))?;
        if token.is_empty() || token.len() > 512 {
            return Err(ApiError::Unauthorized("Invalid API key"));
        }
        if token.matches('.').count() == 2
            && !token.starts_with(shared::domain::ids::SECRET_KEY_PREFIX)
        {
            return Err(ApiError::Unauthorized(
                "Public access tokens are not accepted on this route yet; use a secret key",
            ));
        }
        let environment = state
            .store
            .environment_for_key_digest(&secret_key_digest(token))
            .await?
            .ok_or(ApiError::Unauthorized("Invalid API key"))?;
        Ok(Self {
            environment,
            secret_key: token.to_owned(),
        })
    }
}
