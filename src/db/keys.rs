//! Queries for API keys: creation under the organisation's key cap, listing, revocation,
//! rotation, and the lookup by digest that authentication uses.

use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use super::counters::Snapshot;
use super::key_counters::KEYS_WITH_PENDING;
use super::DbError;
use crate::keys::{Environment, KeyDigest, NewKey};
use crate::model::{ApiKey, AuthRecord};

const COLUMNS: &str = "id, organization_id, key_prefix, key_hint, name, description, environment, is_active,
    expires_at, revoked_at, scopes, custom_rate_limit::bigint, total_requests::bigint, last_used_at, created_at,
    replaced_by";

#[derive(Debug, Clone)]
pub struct KeySpec {
    pub name: String,
    pub description: Option<String>,
    pub environment: Environment,
    pub scopes: Vec<String>,
    pub custom_rate_limit: Option<i64>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// How long a rotated key keeps working when the caller names no grace period (the
/// CLI's `--grace` default and the admin API's `grace` default).
pub const DEFAULT_ROTATION_GRACE: &str = "24h";

/// The instant a key created at `now` with a lifetime of `expires_in` expires; `None`
/// for a key that never does. Refuses lifetimes past what a timestamp can hold.
pub fn expiry(now: DateTime<Utc>, expires_in: Option<std::time::Duration>) -> Result<Option<DateTime<Utc>>, DbError> {
    expires_in
        .map(|d| {
            chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .ok_or_else(|| DbError::Invalid("expires_in is too far in the future".into()))
        })
        .transpose()
}

/// A JSON array of strings; anything else (the seed allowed any JSON) means no scopes.
pub(super) fn scopes_from(v: serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn from_row(r: &Row) -> Result<ApiKey, DbError> {
    Ok(ApiKey {
        id: r.try_get(0)?,
        organization_id: r.try_get(1)?,
        key_prefix: r.try_get(2)?,
        key_hint: r.try_get(3)?,
        name: r.try_get(4)?,
        description: r.try_get(5)?,
        environment: r.try_get(6)?,
        is_active: r.try_get(7)?,
        expires_at: r.try_get(8)?,
        revoked_at: r.try_get(9)?,
        scopes: scopes_from(r.try_get(10)?),
        custom_rate_limit: r.try_get(11)?,
        total_requests: r.try_get(12)?,
        last_used_at: r.try_get(13)?,
        created_at: r.try_get(14)?,
        replaced_by: r.try_get(15)?,
    })
}

fn validate(spec: &KeySpec) -> Result<Option<i32>, DbError> {
    if spec.name.trim().is_empty() {
        return Err(DbError::Invalid("key name must not be empty".into()));
    }
    if let Some(s) = spec.scopes.iter().find(|s| s.trim().is_empty() || s.contains(',')) {
        return Err(DbError::Invalid(format!(
            "scope `{s}` must be non-empty and contain no commas"
        )));
    }
    spec.custom_rate_limit
        .map(|n| {
            i32::try_from(n)
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| DbError::Invalid("rate limit must be between 0 and 2147483647".into()))
        })
        .transpose()
}

/// Inserts a key without checking the organisation's cap; callers hold the reasons.
pub async fn insert_unchecked(
    c: &impl GenericClient,
    org_id: Uuid,
    spec: &KeySpec,
) -> Result<(ApiKey, NewKey), DbError> {
    let rate = validate(spec)?;
    let key = NewKey::generate(spec.environment).map_err(|e| DbError::Entropy(e.to_string()))?;
    let sql = format!(
        "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name, description,
                               environment, scopes, custom_rate_limit, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         RETURNING {COLUMNS}"
    );
    let scopes = serde_json::Value::from(spec.scopes.clone());
    let row = c
        .query_one(
            &sql,
            &[
                &Uuid::now_v7(),
                &org_id,
                &key.prefix(),
                &key.digest.to_hex(),
                &key.hint(),
                &spec.name,
                &spec.description,
                &spec.environment.as_str(),
                &scopes,
                &rate,
                &spec.expires_at,
            ],
        )
        .await?;
    Ok((from_row(&row)?, key))
}

/// Keys that count against `max_api_keys`: usable now or later.
const COUNTED: &str = "revoked_at IS NULL AND is_active AND (expires_at IS NULL OR expires_at > now())";

/// Creates a key, holding the organisation's row lock so concurrent creations cannot
/// both slip under `max_api_keys`.
pub async fn create(
    c: &mut tokio_postgres::Client,
    org_slug: &str,
    spec: &KeySpec,
) -> Result<(ApiKey, NewKey), DbError> {
    let tx = c.transaction().await?;
    let org = tx
        .query_opt(
            "SELECT id, max_api_keys::bigint FROM organizations WHERE slug = $1 FOR UPDATE",
            &[&org_slug],
        )
        .await?
        .ok_or_else(|| DbError::OrgNotFound(org_slug.to_string()))?;
    let (org_id, max): (Uuid, i64) = (org.try_get(0)?, org.try_get(1)?);
    let count: i64 = tx
        .query_one(
            &format!("SELECT count(*) FROM api_keys WHERE organization_id = $1 AND {COUNTED}"),
            &[&org_id],
        )
        .await?
        .try_get(0)?;
    if count >= max {
        return Err(DbError::KeyLimitReached {
            slug: org_slug.to_string(),
            max,
        });
    }
    let out = insert_unchecked(&tx, org_id, spec).await?;
    tx.commit().await?;
    Ok(out)
}

pub async fn list(c: &impl GenericClient, org_id: Uuid) -> Result<Vec<ApiKey>, DbError> {
    let rows = c
        .query(
            &format!("SELECT {COLUMNS} FROM {KEYS_WITH_PENDING} WHERE organization_id = $1 ORDER BY created_at, id"),
            &[&org_id],
        )
        .await?;
    rows.iter().map(from_row).collect()
}

pub async fn get(c: &impl GenericClient, id: Uuid) -> Result<ApiKey, DbError> {
    let row = c
        .query_opt(
            &format!("SELECT {COLUMNS} FROM {KEYS_WITH_PENDING} WHERE id = $1"),
            &[&id],
        )
        .await?;
    row.as_ref()
        .map(from_row)
        .transpose()?
        .ok_or_else(|| DbError::KeyNotFound(id.to_string()))
}

/// Revokes a key. Revoking a revoked key changes nothing and reports `false`.
pub async fn revoke(c: &impl GenericClient, id: Uuid) -> Result<(ApiKey, bool), DbError> {
    let row = c
        .query_opt(
            "UPDATE api_keys SET revoked_at = now(), is_active = false WHERE id = $1 AND revoked_at IS NULL RETURNING id",
            &[&id],
        )
        .await?;
    // Read back through `get`, whose counters include what is pending.
    Ok((get(c, id).await?, row.is_some()))
}

/// Issues a successor with the same name, scopes and limits, and lets the old key live
/// for `grace` more (never longer than it already would). Not counted against
/// `max_api_keys`: the old key is on its way out.
pub async fn rotate(
    c: &mut tokio_postgres::Client,
    id: Uuid,
    grace: std::time::Duration,
) -> Result<(ApiKey, ApiKey, NewKey), DbError> {
    let tx = c.transaction().await?;
    let row = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1 FOR UPDATE"),
            &[&id],
        )
        .await?
        .ok_or_else(|| DbError::KeyNotFound(id.to_string()))?;
    let old = from_row(&row)?;
    if old.revoked_at.is_some() {
        return Err(DbError::KeyRevoked(id.to_string()));
    }
    let spec = KeySpec {
        name: old.name.clone(),
        description: old.description.clone(),
        environment: old.environment.parse().map_err(DbError::Invalid)?,
        scopes: old.scopes.clone(),
        custom_rate_limit: old.custom_rate_limit,
        expires_at: None,
    };
    let (new, key) = insert_unchecked(&tx, old.organization_id, &spec).await?;
    let grace_ms = i64::try_from(grace.as_millis()).map_err(|_| DbError::Invalid("grace period is too long".into()))?;
    let row = tx
        .query_one(
            &format!(
                "UPDATE api_keys SET replaced_by = $2,
                    expires_at = LEAST(COALESCE(expires_at, 'infinity'), now() + make_interval(secs => $3::bigint / 1000.0))
                 WHERE id = $1 RETURNING {COLUMNS}"
            ),
            &[&id, &new.id, &grace_ms],
        )
        .await?;
    let old = from_row(&row)?;
    tx.commit().await?;
    Ok((old, new, key))
}

/// A key found by its digest, with the limit counters the limiter seeds it from.
#[derive(Debug, Clone, Copy)]
pub struct Found {
    pub record: AuthRecord,
    /// As of the lookup's `now`: a key seen for the first time needs no second query.
    pub counters: Snapshot,
}

/// The lookup by hash and the key's counter snapshot (`db::counters::load`'s three
/// cells) in one statement, so a cache miss costs one round trip.
const LOOKUP: &str = concat!(
    "SELECT ",
    super::auth_queries::record_columns!(),
    ",
       COALESCE((SELECT request_count FROM rate_limit_tracking
                 WHERE api_key_id = k.id AND window_start = $2::timestamptz), 0)::bigint,
       COALESCE((SELECT request_count FROM rate_limit_tracking
                 WHERE api_key_id = k.id AND window_start = $3::timestamptz), 0)::bigint,
       COALESCE((SELECT request_count FROM organization_monthly_usage
                 WHERE organization_id = k.organization_id AND month_start = $4::timestamptz), 0)::bigint
     FROM api_keys k JOIN organizations o ON o.id = k.organization_id
     WHERE k.key_hash = $1"
);

/// The authentication lookup: one indexed query by hash, joined with the organisation,
/// in the same shape as the auth cache's bulk loads (`db::auth_queries`), on a statement
/// the connection keeps prepared. The stored hash is compared with the computed one in
/// constant time before the row is trusted.
pub async fn lookup(
    c: &deadpool_postgres::Client,
    digest: &KeyDigest,
    now: DateTime<Utc>,
) -> Result<Option<Found>, DbError> {
    let empty = Snapshot::empty(now);
    let rows = super::cached::query(
        c,
        LOOKUP,
        &[
            &digest.to_hex(),
            &empty.minute_start,
            &empty.previous_minute_start(),
            &empty.month_start,
        ],
    )
    .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    match super::auth_queries::record_from_row(row)? {
        Some((stored, record)) if stored.ct_eq(digest) => Ok(Some(Found {
            record,
            counters: empty.read_from(row, super::auth_queries::RECORD_COLUMNS)?,
        })),
        _ => Ok(None),
    }
}
