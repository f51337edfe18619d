//! Moving the usage writer's pending per-key counts into `api_keys` (migration 13's
//! `keygate_fold_key_counters`, in key order since migration 15), and reading a key's
//! counters with what is pending.
//!
//! Owns these statements, and the cluster-wide claim that spaces folds (migration
//! 14); when a replica tries to fold is `usage::fold`'s, and the writer's own upsert
//! is `usage_direct`'s.

use std::time::Duration;

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::DbError;

/// Keys folded per statement, so one fold never holds many row locks for long.
pub const FOLD_BATCH: usize = 5_000;

/// Folds every pending count that no writer holds right now. Returns the keys folded.
///
/// It lists the pending keys first, in id order, and folds them a batch at a time,
/// going up the list, so its locks follow the writers' order (migration 15) even
/// inside one transaction. A key that becomes pending after the list was read waits
/// for the next fold.
pub async fn fold(c: &impl GenericClient) -> Result<u64, DbError> {
    let keys: Vec<Uuid> = c.query_one("SELECT keygate_pending_key_ids()", &[]).await?.try_get(0)?;
    let mut total = 0;
    for batch in keys.chunks(FOLD_BATCH) {
        let n: i64 = c
            .query_one("SELECT keygate_fold_key_counters($1::uuid[])", &[&batch])
            .await?
            .try_get(0)?;
        total += u64::try_from(n).unwrap_or(0);
    }
    Ok(total)
}

/// Folds, as [`fold`], if no replica (this one included) claimed a fold within
/// `min_interval`; `None` when another did. The claim commits on its own, before the
/// fold, so replicas whose timers fire together fold once between them.
pub async fn fold_if_due(c: &impl GenericClient, min_interval: Duration) -> Result<Option<u64>, DbError> {
    let millis = i64::try_from(min_interval.as_millis()).unwrap_or(i64::MAX);
    let claimed: bool = c
        .query_one(
            "SELECT keygate_fold_claim($1::bigint * interval '1 millisecond')",
            &[&millis],
        )
        .await?
        .try_get(0)?;
    if !claimed {
        return Ok(None);
    }
    fold(c).await.map(Some)
}

/// `api_keys` as keygate's key listings read it: `total_requests` and `last_used_at`
/// include what is pending, so they are exact whenever they are read.
pub(super) const KEYS_WITH_PENDING: &str = "(SELECT k.id, k.organization_id, k.key_prefix, k.key_hint, k.name,
        k.description, k.environment, k.is_active, k.expires_at, k.revoked_at, k.scopes, k.custom_rate_limit,
        k.total_requests + coalesce(c.pending_requests, 0) AS total_requests,
        greatest(k.last_used_at, c.last_used_at) AS last_used_at, k.created_at, k.replaced_by
    FROM api_keys k LEFT JOIN keygate_key_counters c ON c.api_key_id = k.id) AS api_keys";
