//! `GET /api/v1/sessions`: filtered, cursor-paginated listing, newest first.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use super::entities::{runs, sessions};
use super::{Session, StorageError, Store};
use crate::domain::session::SessionItem;

/// The status filter values of the list route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFilter {
    Active,
    Closed,
    Expired,
}

/// Where a page starts: strictly older (`After`) or strictly newer (`Before`) than a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageCursor {
    After(String),
    Before(String),
}

/// Filters and page of a listing. Empty lists mean "no filter".
#[derive(Clone, Debug, Default)]
pub struct SessionListQuery {
    pub environment_id: Uuid,
    pub types: Vec<String>,
    pub tags: Vec<String>,
    pub task_identifiers: Vec<String>,
    pub external_ids: Vec<String>,
    pub statuses: Vec<StatusFilter>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub cursor: Option<PageCursor>,
    pub size: u64,
}

/// One page, newest first, with the friendly ids to continue from.
#[derive(Clone, Debug)]
pub struct SessionPage {
    pub items: Vec<SessionItem>,
    pub next: Option<String>,
    pub previous: Option<String>,
}

/// Why a listing was refused.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("page cursor does not name a session of this environment")]
    UnknownCursor,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<sea_orm::DbErr> for ListError {
    fn from(error: sea_orm::DbErr) -> Self {
        ListError::Storage(error.into())
    }
}

impl Store {
    pub async fn list_sessions(&self, query: &SessionListQuery) -> Result<SessionPage, ListError> {
        let now = Utc::now();
        let mut filter =
            Condition::all().add(sessions::Column::EnvironmentId.eq(query.environment_id));
        if !query.types.is_empty() {
            filter = filter.add(sessions::Column::SessionType.is_in(query.types.clone()));
        }
        if !query.task_identifiers.is_empty() {
            filter =
                filter.add(sessions::Column::TaskIdentifier.is_in(query.task_identifiers.clone()));
        }
        if !query.external_ids.is_empty() {
            filter = filter.add(sessions::Column::ExternalId.is_in(query.external_ids.clone()));
        }
        if !query.tags.is_empty() {
            let mut any_tag = Condition::any();
            for tag in &query.tags {
                any_tag = any_tag.add(if self.is_postgres() {
                    // sea-query numbers `$N` placeholders for Postgres (a bare `?` is a jsonb operator there).
                    Expr::cust_with_values(
                        "\"tags\" @> ($1)::jsonb",
                        [serde_json::json!([tag]).to_string()],
                    )
                } else {
                    Expr::cust_with_values(
                        "EXISTS (SELECT 1 FROM json_each(\"tags\") WHERE json_each.value = ?)",
                        [tag.clone()],
                    )
                });
            }
            filter = filter.add(any_tag);
        }
        if !query.statuses.is_empty() {
            let mut any_status = Condition::any();
            for status in &query.statuses {
                any_status = any_status.add(match status {
                    StatusFilter::Closed => {
                        Condition::all().add(sessions::Column::ClosedAt.is_not_null())
                    }
                    StatusFilter::Expired => Condition::all()
                        .add(sessions::Column::ClosedAt.is_null())
                        .add(sessions::Column::ExpiresAt.lte(now)),
                    StatusFilter::Active => Condition::all()
                        .add(sessions::Column::ClosedAt.is_null())
                        .add(
                            Condition::any()
                                .add(sessions::Column::ExpiresAt.is_null())
                                .add(sessions::Column::ExpiresAt.gt(now)),
                        ),
                });
            }
            filter = filter.add(any_status);
        }
        if let Some(from) = query.created_from {
            filter = filter.add(sessions::Column::CreatedAt.gte(from));
        }
        if let Some(to) = query.created_to {
            filter = filter.add(sessions::Column::CreatedAt.lte(to));
        }
        let anchor = match &query.cursor {
            None => None,
            Some(PageCursor::After(id) | PageCursor::Before(id)) => Some(
                sessions::Entity::find()
                    .filter(sessions::Column::EnvironmentId.eq(query.environment_id))
                    .filter(sessions::Column::FriendlyId.eq(id.as_str()))
                    .one(self.connection())
                    .await?
                    .ok_or(ListError::UnknownCursor)?,
            ),
        };
        let before = matches!(query.cursor, Some(PageCursor::Before(_)));
        if let Some(anchor) = &anchor {
            let (created_at, id) = (anchor.created_at, anchor.id);
            filter = filter.add(if before {
                Condition::any()
                    .add(sessions::Column::CreatedAt.gt(created_at))
                    .add(
                        Condition::all()
                            .add(sessions::Column::CreatedAt.eq(created_at))
                            .add(sessions::Column::Id.gt(id)),
                    )
            } else {
                Condition::any()
                    .add(sessions::Column::CreatedAt.lt(created_at))
                    .add(
                        Condition::all()
                            .add(sessions::Column::CreatedAt.eq(created_at))
                            .add(sessions::Column::Id.lt(id)),
                    )
            });
        }
        let select = sessions::Entity::find().filter(filter);
        let select = if before {
            select
                .order_by_asc(sessions::Column::CreatedAt)
                .order_by_asc(sessions::Column::Id)
        } else {
            select
                .order_by_desc(sessions::Column::CreatedAt)
                .order_by_desc(sessions::Column::Id)
        };
        let mut rows: Vec<Session> = select
            .limit(query.size + 1)
            .all(self.connection())
            .await?
            .into_iter()
            .map(super::rows::session_from_row)
            .collect::<Result<_, _>>()?;
        let more = rows.len() as u64 > query.size;
        rows.truncate(usize::try_from(query.size).unwrap_or(usize::MAX));
        if before {
            rows.reverse();
        }
        let (next, previous) = match (&query.cursor, more) {
            (None, more) => (more.then(|| rows.last()).flatten(), None),
            (Some(PageCursor::After(_)), more) => {
                (more.then(|| rows.last()).flatten(), rows.first())
            }
            (Some(PageCursor::Before(_)), more) => {
                (rows.last(), more.then(|| rows.first()).flatten())
            }
        };
        let (next, previous) = (
            next.map(|row| row.friendly_id.clone()),
            previous.map(|row| row.friendly_id.clone()),
        );
        // currentRunId: one query per page, in this environment only (a stale pointer to
        // another environment's run resolves to null).
        let run_ids: Vec<Uuid> = rows.iter().filter_map(|row| row.current_run_id).collect();
        let runs_by_id: std::collections::HashMap<Uuid, String> = if run_ids.is_empty() {
            Default::default()
        } else {
            runs::Entity::find()
                .filter(runs::Column::EnvironmentId.eq(query.environment_id))
                .filter(runs::Column::Id.is_in(run_ids))
                .all(self.connection())
                .await?
                .into_iter()
                .map(|run| (run.id, run.friendly_id))
                .collect()
        };
        let items = rows
            .iter()
            .map(|row| {
                row.to_item(
                    row.current_run_id
                        .and_then(|id| runs_by_id.get(&id).cloned()),
                )
            })
            .collect();
        Ok(SessionPage {
            items,
            next,
            previous,
        })
    }
}
