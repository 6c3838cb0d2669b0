//! Environments: the tenant boundary. Every session, record, run and waitpoint belongs to one,
//! and a secret key or token works in exactly one.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A stored environment of a project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Environment {
    pub id: Uuid,
    /// `env_…`, what public tokens name.
    pub public_id: String,
    pub project_id: Uuid,
    /// The environment's slug within its project (`dev`, `prod`, …).
    pub slug: String,
    pub created_at: DateTime<Utc>,
}
