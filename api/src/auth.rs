//! Who is calling, and what they may do: THE authentication and authorization rules.
//!
//! Credentials: a secret key (digest lookup; full access to its environment) or a
//! public access token (HS256 JWT signed with one of the environment's secret keys; `pub: true`;
//! scopes). A token's `sub` names its environment; it is verified only with that environment's
//! own unrevoked keys, so a token can never act in another environment.
//!
//! Every handler authenticates through [`Caller`] (or [`SecretKeyCaller`] for secret-key-only
//! routes) before it reads anything, and authorizes with [`Caller::authorize`] before it
//! writes, publishes or returns data. A token that does not cover a session gets 403 whether or
//! not that session exists, so tokens cannot probe for sessions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use shared::domain::SessionAddress;
use shared::domain::ids::SECRET_KEY_PREFIX;
use shared::domain::scopes::{Action, SessionNames, Target, allows_on};
use shared::domain::tokens::{
    decrypt_secret, secret_key_digest, unverified_subject, verify_public_token, verify_writer_token,
};
use shared::domain::{Io, Stream};
use shared::storage::{Environment, LiveKey, Session};
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;

/// How long decrypted verification keys are reused before the database is asked again (also
/// how long a revoked key can still verify tokens on an instance).
const KEY_CACHE_TTL: Duration = Duration::from_secs(10);

/// The credential a request presented.
#[derive(Clone, Debug)]
pub enum Credential {
    /// A secret key (kept only to sign the tokens this request mints; never logged or stored).
    SecretKey(String),
    /// A verified public access token's scopes, and its digest (for per-token limits).
    PublicToken {
        scopes: Vec<String>,
        token_digest: String,
    },
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub environment: Environment,
    pub credential: Credential,
}

/// A caller that presented a secret key (routes that need one answer 403 to tokens).
#[derive(Clone, Debug)]
pub struct SecretKeyCaller {
    pub environment: Environment,
    pub secret_key: String,
}

/// Decrypted verification keys per environment, for [`KEY_CACHE_TTL`], and environments by
/// public id for as long (writer tokens are verified without a database read).
#[derive(Debug, Default)]
pub struct VerificationKeys {
    entries: Mutex<HashMap<Uuid, (Instant, Vec<String>)>>,
    environments: Mutex<HashMap<String, (Instant, Environment)>>,
}

/// Most environments remembered by public id; past it the cache starts over.
const ENVIRONMENT_CACHE_CAPACITY: usize = 10_000;

impl VerificationKeys {
    /// The environment with this public id, from the cache when fresh.
    async fn environment(
        &self,
        state: &AppState,
        public_id: &str,
    ) -> Result<Option<Environment>, ApiError> {
        {
            let environments = self
                .environments
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((fetched, environment)) = environments.get(public_id)
                && fetched.elapsed() < KEY_CACHE_TTL
            {
                return Ok(Some(environment.clone()));
            }
        }
        let Some(environment) = state.store.environment_by_public_id(public_id).await? else {
            return Ok(None);
        };
        let mut environments = self
            .environments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if environments.len() >= ENVIRONMENT_CACHE_CAPACITY {
            environments.clear();
        }
        environments.insert(public_id.to_owned(), (Instant::now(), environment.clone()));
        Ok(Some(environment))
    }

    async fn for_environment(
        &self,
        state: &AppState,
        environment_id: Uuid,
    ) -> Result<Vec<String>, ApiError> {
        {
            let entries = self
                .entries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((fetched, keys)) = entries.get(&environment_id)
                && fetched.elapsed() < KEY_CACHE_TTL
            {
                return Ok(keys.clone());
            }
        }
        let keys: Vec<String> = state
            .store
            .encrypted_verification_keys(environment_id)
            .await?
            .iter()
            .filter_map(|sealed| decrypt_secret(&state.settings.master_key, sealed))
            .collect();
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(environment_id, (Instant::now(), keys.clone()));
        Ok(keys)
    }
}

/// Most secret keys remembered by [`SecretKeyLookups`]; past it the cache starts over (it only
/// saves reads, so forgetting is always safe).
const SECRET_KEY_CACHE_CAPACITY: usize = 10_000;

/// Live secret keys (by digest) and their environments, reused for `SESSIONS_AUTH_CACHE_TTL_MS`
/// so that a stream of appends does not read the key table once per request. A key's own end
/// (`revoked_at`, e.g. the end of a rotation's grace period) is checked on every use; only a
/// revocation made after the lookup waits for the entry to age out. Unknown keys are never
/// cached.
#[derive(Debug, Default)]
pub struct SecretKeyLookups {
    entries: Mutex<HashMap<String, (Instant, LiveKey)>>,
}

impl SecretKeyLookups {
    async fn environment(
        &self,
        state: &AppState,
        digest: String,
    ) -> Result<Option<Environment>, ApiError> {
        let ttl = state.settings.auth_cache_ttl;
        if !ttl.is_zero() {
            let entries = self.lock();
            if let Some((fetched, live_key)) = entries.get(&digest)
                && fetched.elapsed() < ttl
            {
                let still_live = live_key
                    .revoked_at
                    .is_none_or(|revoked_at| revoked_at > chrono::Utc::now());
                return Ok(still_live.then(|| live_key.environment.clone()));
            }
        }
        let Some(live_key) = state.store.live_key(&digest).await? else {
            return Ok(None);
        };
        let environment = live_key.environment.clone();
        if !ttl.is_zero() {
            let mut entries = self.lock();
            if entries.len() >= SECRET_KEY_CACHE_CAPACITY {
                entries.clear();
            }
            entries.insert(digest, (Instant::now(), live_key));
        }
        Ok(Some(environment))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, LiveKey)>> {
        // A poisoned lock only means another request panicked mid-insert; the map is still valid.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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

const INVALID_TOKEN: &str = "Invalid public access token";

/// The session `address` names in `environment_id`, from the api instance's session cache when
/// it holds it (no database read), read and cached otherwise. No authorization: callers check.
pub async fn cached_session(
    state: &AppState,
    environment_id: Uuid,
    address: &SessionAddress,
) -> Result<Option<std::sync::Arc<Session>>, ApiError> {
    if let Some(session) = state.sessions.get(environment_id, address) {
        return Ok(Some(session));
    }
    let Some(session) = state.store.find_session(environment_id, address).await? else {
        return Ok(None);
    };
    let session = std::sync::Arc::new(session);
    state.sessions.put(environment_id, address, session.clone());
    Ok(Some(session))
}

/// A caller of the writer endpoint: a verified writer access token (see
/// `shared::domain::tokens::WriterTokenClaims`).
#[derive(Clone, Debug)]
pub struct WriterCaller {
    pub environment: Environment,
    /// The one stream name the token may append to and trim.
    pub stream_name: String,
}

/// Why a writer request was refused before it touched anything.
#[derive(Debug)]
pub enum WriterAuthError {
    /// No, a malformed, an expired or a forged token, or one whose key was revoked (401).
    Unauthenticated,
    /// Storage could not be read (503).
    Unavailable,
}

/// Verifies the writer access token of a request: the environment and keys come from caches
/// refreshed every [`KEY_CACHE_TTL`], so a revoked key stops verifying within that time.
pub async fn authenticate_writer(
    parts: &Parts,
    state: &AppState,
) -> Result<WriterCaller, WriterAuthError> {
    let token = bearer(parts)
        .filter(|token| !token.is_empty() && token.len() <= 8192)
        .ok_or(WriterAuthError::Unauthenticated)?;
    let (environment, keys) = token_environment(state, token)
        .await
        .map_err(|_| WriterAuthError::Unavailable)?
        .ok_or(WriterAuthError::Unauthenticated)?;
    let claims = keys
        .iter()
        .find_map(|key| verify_writer_token(token, key, &state.settings.jwt_issuer).ok())
        .ok_or(WriterAuthError::Unauthenticated)?;
    if claims.sub != environment.public_id {
        return Err(WriterAuthError::Unauthenticated);
    }
    Ok(WriterCaller {
        environment,
        stream_name: claims.stream,
    })
}

/// The environment a token's `sub` names (read WITHOUT verifying the token: only to know whose
/// keys verify it) and that environment's live keys, both from the caches. `None`: a malformed
/// token or an unknown environment. Both kinds of token go through here.
async fn token_environment(
    state: &AppState,
    token: &str,
) -> Result<Option<(Environment, Vec<String>)>, ApiError> {
    let Ok(subject) = unverified_subject(token) else {
        return Ok(None);
    };
    if subject.len() > 128 {
        return Ok(None);
    }
    let Some(environment) = state.verification_keys.environment(state, &subject).await? else {
        return Ok(None);
    };
    let keys = state
        .verification_keys
        .for_environment(state, environment.id)
        .await?;
    Ok(Some((environment, keys)))
}

async fn authenticate_token(state: &AppState, token: &str) -> Result<Caller, ApiError> {
    let (environment, keys) = token_environment(state, token)
        .await?
        .ok_or(ApiError::Unauthorized(INVALID_TOKEN))?;
    let claims = keys
        .iter()
        .find_map(|key| {
            verify_public_token(
                token,
                key,
                &state.settings.jwt_issuer,
                &state.settings.jwt_audience,
            )
            .ok()
        })
        .ok_or(ApiError::Unauthorized(INVALID_TOKEN))?;
    if !claims.public || claims.sub != environment.public_id {
        return Err(ApiError::Unauthorized(INVALID_TOKEN));
    }
    Ok(Caller {
        environment,
        credential: Credential::PublicToken {
            scopes: claims.scopes,
            token_digest: secret_key_digest(token),
        },
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    /// Authenticates, then counts the request against the caller's environment (429 when its
    /// rate limit is exhausted); failed authentications count against no environment.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = authenticate(parts, state).await?;
        state.rate_limits.check(caller.environment.id)?;
        Ok(caller)
    }
}

/// Who the bearer credential of the request is (no rate limit counted yet).
async fn authenticate(parts: &Parts, state: &AppState) -> Result<Caller, ApiError> {
    let token = bearer(parts).ok_or(ApiError::Unauthorized(
        "Missing or malformed Authorization header: expected 'Bearer <secret key or public access token>'",
    ))?;
    if token.is_empty() || token.len() > 8192 {
        return Err(ApiError::Unauthorized("Invalid API key"));
    }
    if !token.starts_with(SECRET_KEY_PREFIX) && token.split('.').count() == 3 {
        return authenticate_token(state, token).await;
    }
    let environment = state
        .secret_keys
        .environment(state, secret_key_digest(token))
        .await?
        .ok_or(ApiError::Unauthorized("Invalid API key"))?;
    Ok(Caller {
        environment,
        credential: Credential::SecretKey(token.to_owned()),
    })
}

impl FromRequestParts<AppState> for SecretKeyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        match caller.credential {
            Credential::SecretKey(secret_key) => Ok(Self {
                environment: caller.environment,
                secret_key,
            }),
            Credential::PublicToken { .. } => Err(ApiError::Forbidden(
                "This route needs a secret key; public access tokens are not allowed".into(),
            )),
        }
    }
}

impl Caller {
    /// The digest of the caller's public access token (`None` for a secret key).
    pub fn token_digest(&self) -> Option<&str> {
        match &self.credential {
            Credential::PublicToken { token_digest, .. } => Some(token_digest),
            Credential::SecretKey(_) => None,
        }
    }

    pub fn is_secret_key(&self) -> bool {
        matches!(self.credential, Credential::SecretKey(_))
    }

    /// Allows `action` on the session `address` names (found as `session`, or missing). Secret
    /// keys may do everything in their environment; tokens need a covering scope, and get the
    /// same 403 whether the session exists or not.
    pub fn authorize(
        &self,
        action: Action,
        address: &SessionAddress,
        session: Option<&Session>,
    ) -> Result<(), ApiError> {
        self.authorize_on(action, address, session, Target::Session)
    }

    /// As [`Caller::authorize`], for one part of the session (a channel's scope folds count).
    pub fn authorize_on(
        &self,
        action: Action,
        address: &SessionAddress,
        session: Option<&Session>,
        target: Target<'_>,
    ) -> Result<(), ApiError> {
        let Credential::PublicToken { scopes, .. } = &self.credential else {
            return Ok(());
        };
        let names = match session {
            Some(session) => SessionNames {
                friendly_id: &session.friendly_id,
                external_id: session.external_id.as_deref(),
            },
            None => SessionNames {
                friendly_id: address.as_str(),
                external_id: Some(address.as_str()),
            },
        };
        if allows_on(scopes, action, names, target) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "This token does not allow {} on this session",
                match action {
                    Action::Read => "read",
                    Action::Write => "write",
                    Action::Admin => "admin",
                }
            )))
        }
    }

    /// The session `address` names in the caller's environment, after authorizing `action` on
    /// it; `None` if it does not exist (and the caller may learn that).
    pub async fn find_session(
        &self,
        state: &AppState,
        action: Action,
        address: &SessionAddress,
    ) -> Result<Option<Session>, ApiError> {
        self.find_session_on(state, action, address, Target::Session)
            .await
    }

    /// As [`Caller::find_session`], authorizing `action` on `target` of the session.
    pub async fn find_session_on(
        &self,
        state: &AppState,
        action: Action,
        address: &SessionAddress,
        target: Target<'_>,
    ) -> Result<Option<Session>, ApiError> {
        let session = state
            .store
            .find_session(self.environment.id, address)
            .await?;
        self.authorize_on(action, address, session.as_ref(), target)?;
        Ok(session)
    }

    /// As [`Caller::session`] for the append route: served from the api instance's session
    /// cache when it holds the session (no database read), read and cached otherwise. The
    /// authorization check runs either way.
    pub async fn session_for_append(
        &self,
        state: &AppState,
        address: &SessionAddress,
        stream: &Stream,
    ) -> Result<std::sync::Arc<Session>, ApiError> {
        let session = cached_session(state, self.environment.id, address).await?;
        self.authorize_on(
            Action::Write,
            address,
            session.as_deref(),
            Target::of_stream(stream),
        )?;
        session.ok_or(ApiError::NotFound("Session not found"))
    }

    /// As [`Caller::find_session`], with 404 for a missing session.
    pub async fn session(
        &self,
        state: &AppState,
        action: Action,
        address: &SessionAddress,
    ) -> Result<Session, ApiError> {
        self.find_session(state, action, address)
            .await?
            .ok_or(ApiError::NotFound("Session not found"))
    }

    /// A secret key of the caller's environment to sign tokens with: the caller's own, or for a
    /// token caller one of the environment's live keys (any of them verifies).
    pub async fn signing_key(&self, state: &AppState) -> Result<String, ApiError> {
        if let Credential::SecretKey(key) = &self.credential {
            return Ok(key.clone());
        }
        state
            .verification_keys
            .for_environment(state, self.environment.id)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                ApiError::Internal("the environment has no live key to sign with".into())
            })
    }

    /// Reading an `in` stream (user messages, or a side channel's input) needs a secret key:
    /// public tokens read `out` and append to `in` (the policy of the reference server since
    /// 4.6 for the reserved channel; applied to side channels too here).
    pub fn require_secret_key_to_read(&self, stream: &Stream) -> Result<(), ApiError> {
        match stream.io {
            Io::In => self.require_secret_key("Reading the in channel"),
            Io::Out => Ok(()),
        }
    }

    /// Only a secret key may do this (e.g. append to `out`).
    pub fn require_secret_key(&self, what: &str) -> Result<(), ApiError> {
        if self.is_secret_key() {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("{what} needs a secret key")))
        }
    }
}
