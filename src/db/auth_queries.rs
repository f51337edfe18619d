//! Bulk and by-id loads of authentication records, for the auth cache's preload and
//! its targeted reloads after a change notification.
//!
//! Owns the columns of an authentication record (a key joined with its organisation)
//! and their row mapping, shared with `db::keys::lookup`, and the three loads built on
//! them. It does not own the lookup by digest (`db::keys`), caching, or when to reload.

use futures_util::TryStreamExt;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use super::DbError;
use crate::keys::KeyDigest;
use crate::model::{AuthFields, AuthRecord};

/// The columns of an authentication record over `api_keys k` and `organizations o`, in
/// [`record_from_row`]'s order. A macro so `db::keys::lookup` can build its statement
/// (which adds the limit counters) as a constant too.
macro_rules! record_columns {
    () => {
        "k.key_hash, k.id, k.organization_id, k.key_prefix, k.key_hint, k.is_active,
        k.expires_at, k.revoked_at, k.scopes, k.custom_rate_limit::bigint, o.is_active, o.plan,
        o.rate_limit_per_minute::bigint, o.monthly_request_limit::bigint"
    };
}
pub(super) use record_columns;

/// How many columns [`record_columns`] names; what a statement adds comes after.
pub(super) const RECORD_COLUMNS: usize = 14;

/// An authentication record's SELECT; the loads below add their WHERE.
const SELECT: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM api_keys k JOIN organizations o ON o.id = k.organization_id"
);

/// Which records to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    All,
    Key(Uuid),
    Organization(Uuid),
}

/// Streams every record the selector matches into `f`, without holding the whole key
/// table in memory at once. Returns how many records were passed on.
///
/// A row whose stored hash is not 64 hex digits is skipped with a warning rather than
/// failing the load: one bad row must not leave a preloaded cache empty. (Migration 2's
/// check constraint makes such rows impossible on a migrated database.)
pub async fn for_each_record(
    c: &impl GenericClient,
    selector: Selector,
    mut f: impl FnMut(KeyDigest, AuthRecord),
) -> Result<usize, DbError> {
    let (sql, params): (String, Vec<Uuid>) = match selector {
        Selector::All => (SELECT.to_string(), Vec::new()),
        Selector::Key(id) => (format!("{SELECT} WHERE k.id = $1"), vec![id]),
        Selector::Organization(id) => (format!("{SELECT} WHERE k.organization_id = $1"), vec![id]),
    };
    let stream = c.query_raw(sql.as_str(), params).await?;
    let mut stream = std::pin::pin!(stream);
    let mut count = 0;
    while let Some(row) = stream.try_next().await? {
        match record_from_row(&row)? {
            Some((digest, record)) => {
                f(digest, record);
                count += 1;
            }
            None => tracing::warn!("skipping an api_keys row whose key_hash is not a SHA-256 hex digest"),
        }
    }
    Ok(count)
}

/// Maps one row of [`SELECT`]; `None` when the stored hash is malformed.
pub(super) fn record_from_row(r: &Row) -> Result<Option<(KeyDigest, AuthRecord)>, DbError> {
    let stored: String = r.try_get(0)?;
    let Some(digest) = KeyDigest::from_hex(&stored) else {
        return Ok(None);
    };
    let plan: String = r.try_get(11)?;
    let key_prefix: &str = r.try_get(3)?;
    let key_hint: &str = r.try_get(4)?;
    let scopes = super::keys::scopes_from(r.try_get(8)?);
    // Read as `bigint` (an adopted schema may have widened the columns); the record keeps
    // the migrated schema's `integer` width and saturates anything wider.
    let custom_rate_limit: Option<i64> = r.try_get(9)?;
    let org_rate_limit_per_minute: i64 = r.try_get(12)?;
    let monthly_request_limit: i64 = r.try_get(13)?;
    let record = AuthRecord::new(AuthFields {
        key_id: r.try_get(1)?,
        organization_id: r.try_get(2)?,
        key_prefix,
        key_hint,
        key_active: r.try_get(5)?,
        expires_at: r.try_get(6)?,
        revoked_at: r.try_get(7)?,
        scopes: &scopes,
        custom_rate_limit,
        org_active: r.try_get(10)?,
        plan: plan.parse().map_err(DbError::Invalid)?,
        org_rate_limit_per_minute,
        monthly_request_limit,
    });
    let saturated = record.custom_rate_limit() != custom_rate_limit
        || record.org_rate_limit_per_minute() != org_rate_limit_per_minute
        || record.monthly_request_limit() != monthly_request_limit;
    // Once per process: every periodic reload reads the same rows again.
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if saturated && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(key_id = %record.key_id, "a limit is outside the 32-bit range of the migrated schema; it is capped (warned once)");
    }
    Ok(Some((digest, record)))
}
