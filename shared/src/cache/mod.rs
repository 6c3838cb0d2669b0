//! The Redis adapter: the only module that names `redis`.
//!
//! Today it holds the dedup claims (the first, cheap layer of X-Part-Id dedup; the database fence is the second): `SET key owner NX PX ttl`,
//! released only by its owner through a compare-and-delete script, so a late release by an
//! expired holder can never remove a newer holder's claim. Claims are a fast path; the durable
//! fence is the database's unique constraint, so losing Redis loses no correctness.
//!
//! The embedded default keeps the same claims in memory ([`Cache::in_memory`]).
//!
//! Every key starts with the configured prefix; key components are encoded injectively
//! ([`crate::domain::dedup::encode_components`]).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

use crate::domain::dedup::DedupKey;

/// Deletes the key only if it still holds the caller's owner token.
const RELEASE_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("REDIS_URL is invalid: {0}")]
    InvalidUrl(String),
    #[error("redis unavailable: {0}")]
    Unavailable(String),
}

impl From<redis::RedisError> for CacheError {
    fn from(error: redis::RedisError) -> Self {
        CacheError::Unavailable(error.to_string())
    }
}

/// A lazily connected, self-reconnecting Redis handle with the deployment's key prefix, or,
/// for the embedded default, the same claims in this process's memory.
pub struct Cache {
    prefix: String,
    backend: Backend,
}

enum Backend {
    Redis {
        client: redis::Client,
        manager: Mutex<Option<ConnectionManager>>,
    },
    /// key → (owner, expiry).
    Memory(std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>),
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Parses the URL; connects on first use.
    pub fn new(url: &str, prefix: &str) -> Result<Self, CacheError> {
        let client =
            redis::Client::open(url).map_err(|error| CacheError::InvalidUrl(error.to_string()))?;
        Ok(Self {
            prefix: prefix.to_owned(),
            backend: Backend::Redis {
                client,
                manager: Mutex::new(None),
            },
        })
    }

    /// Claims in this process's memory (the embedded default: one process, no Redis).
    pub fn in_memory(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            backend: Backend::Memory(std::sync::Mutex::default()),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        let Backend::Redis { client, manager } = &self.backend else {
            return Err(CacheError::Unavailable("no Redis in embedded mode".into()));
        };
        let mut guard = manager.lock().await;
        if let Some(manager) = guard.as_ref() {
            return Ok(manager.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = client.get_connection_manager_with_config(config).await?;
        *guard = Some(manager.clone());
        Ok(manager)
    }

    /// The claim key of an idempotent append.
    pub fn claim_key(&self, key: &DedupKey) -> String {
        format!("{}:claim:{}", self.prefix, key.encoded())
    }

    /// Tries to claim every `(key, owner)` in one pipeline. `true` = this owner holds it now.
    pub async fn claim_many(
        &self,
        claims: &[(String, String)],
        ttl: Duration,
    ) -> Result<Vec<bool>, CacheError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        if let Backend::Memory(memory) = &self.backend {
            let now = std::time::Instant::now();
            let mut held = memory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            held.retain(|_, (_, expiry)| *expiry > now);
            return Ok(claims
                .iter()
                .map(|(key, owner)| {
                    if held.contains_key(key) {
                        false
                    } else {
                        held.insert(key.clone(), (owner.clone(), now + ttl));
                        true
                    }
                })
                .collect());
        }
        let mut connection = self.connection().await?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipeline = redis::pipe();
        for (key, owner) in claims {
            pipeline
                .cmd("SET")
                .arg(key)
                .arg(owner)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms);
        }
        let results: Vec<Option<String>> = pipeline.query_async(&mut connection).await?;
        Ok(results.into_iter().map(|reply| reply.is_some()).collect())
    }

    /// Releases every `(key, owner)` whose key still holds that owner, in one pipeline.
    /// `true` = released; `false` = the key belonged to someone else or had expired.
    pub async fn release_many(&self, claims: &[(String, String)]) -> Result<Vec<bool>, CacheError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        if let Backend::Memory(memory) = &self.backend {
            let now = std::time::Instant::now();
            let mut held = memory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            return Ok(claims
                .iter()
                .map(|(key, owner)| {
                    let mine = held
                        .get(key)
                        .is_some_and(|(holder, expiry)| holder == owner && *expiry > now);
                    if mine {
                        held.remove(key);
                    }
                    mine
                })
                .collect());
        }
        let mut connection = self.connection().await?;
        let mut pipeline = redis::pipe();
        for (key, owner) in claims {
            pipeline
                .cmd("EVAL")
                .arg(RELEASE_SCRIPT)
                .arg(1)
                .arg(key)
                .arg(owner);
        }
        let results: Vec<i64> = pipeline.query_async(&mut connection).await?;
        Ok(results.into_iter().map(|deleted| deleted == 1).collect())
    }

    /// Claims one key.
    pub async fn claim(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, CacheError> {
        let claims = [(key.to_owned(), owner.to_owned())];
        Ok(self
            .claim_many(&claims, ttl)
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// Releases one key if `owner` holds it.
    pub async fn release(&self, key: &str, owner: &str) -> Result<bool, CacheError> {
        let claims = [(key.to_owned(), owner.to_owned())];
        Ok(self
            .release_many(&claims)
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// The current holder of a claim, if any.
    pub async fn claim_holder(&self, key: &str) -> Result<Option<String>, CacheError> {
        if let Backend::Memory(memory) = &self.backend {
            let now = std::time::Instant::now();
            let held = memory
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            return Ok(held
                .get(key)
                .filter(|(_, expiry)| *expiry > now)
                .map(|(owner, _)| owner.clone()));
        }
        let mut connection = self.connection().await?;
        Ok(redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await?)
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), CacheError> {
        if matches!(self.backend, Backend::Memory(_)) {
            return Ok(());
        }
        let mut connection = self.connection().await?;
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        Ok(())
    }
}
