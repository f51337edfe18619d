//! The SQL of usage metering: writing a batch of `api_key_usage` rows and making the
//! month partitions they land in.
//!
//! Owns every statement the usage writer sends, and nothing else: batching, retrying,
//! spooling and scheduling are `crate::usage::writer`'s. A batch is one transaction:
//! a binary COPY into a per-session temporary staging table, then one statement that
//! inserts the rows not already present and adds exactly the inserted ones to
//! `api_keys.total_requests`. Row ids are made by keygate, so writing the same batch
//! twice (a retry after a lost commit acknowledgement, a replayed spool file) inserts
//! and counts nothing the second time.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};

use super::copy_rows::{copy_rows, CostColumn};
use super::DbError;
use crate::model::ip_text::IpText;
use crate::usage::{self, UsageRecord};

/// The session's staging table. `ON COMMIT DELETE ROWS` empties it at every commit,
/// so a pooled connection reuses it without any cleanup statement. Strings are `text`
/// and cost is integer micro-dollars, so the COPY itself can never refuse a value; the
/// conversion to the real column types happens in [`INSERT`].
const STAGE: &str = "SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS keygate_usage_staging (
    id uuid, api_key_id uuid, organization_id uuid, \"timestamp\" timestamptz,
    endpoint text, method text, status_code int4, response_time_ms int4,
    prompt_tokens int4, completion_tokens int4, tokens_used int4, cost_micros int8,
    model text, ip_address text, user_agent text, error_code text, error_message text
) ON COMMIT DELETE ROWS";

const COPY: &str = "COPY keygate_usage_staging (id, api_key_id, organization_id, \"timestamp\", endpoint, \
    method, status_code, response_time_ms, prompt_tokens, completion_tokens, tokens_used, cost_micros, model, \
    ip_address, user_agent, error_code, error_message) FROM STDIN (FORMAT binary)";

/// One statement per batch. Rows whose key or organisation is gone are filtered out
/// (the reference check would otherwise refuse the whole batch on every retry, forever);
/// `ON CONFLICT DO NOTHING` skips rows a previous attempt already committed, and only
/// the rows `RETURNING` reports as new reach the key's counter. The cost is clamped to
/// what `numeric(12,6)` holds, for the same reason: a value the column refuses would
/// fail the batch on every retry. `GREATEST` skips NULLs, so a row without a cost is
/// kept NULL explicitly rather than clamped to the lower bound. The counts go where the
/// fast path puts them (migration 13's `keygate_key_counters`, folded into `api_keys`
/// later), upserted in key order, so two batches that touch the same keys queue behind
/// each other instead of deadlocking.
const INSERT: &str = "WITH ins AS (
    INSERT INTO api_key_usage (id, api_key_id, organization_id, \"timestamp\", endpoint, method, status_code,
        response_time_ms, prompt_tokens, completion_tokens, tokens_used, cost_usd, model, ip_address, user_agent,
        error_code, error_message)
    SELECT id, api_key_id, organization_id, \"timestamp\", endpoint, method, status_code,
        response_time_ms, prompt_tokens, completion_tokens, tokens_used,
        CASE WHEN cost_micros IS NOT NULL
            THEN round(least(greatest(cost_micros, -999999999999), 999999999999)::numeric / 1000000, 6) END,
        model, ip_address, user_agent, error_code, error_message
    FROM keygate_usage_staging s
    WHERE EXISTS (SELECT 1 FROM api_keys k WHERE k.id = s.api_key_id)
      AND EXISTS (SELECT 1 FROM organizations o WHERE o.id = s.organization_id)
    ON CONFLICT (id, \"timestamp\") DO NOTHING
    RETURNING api_key_id, \"timestamp\"
), per_key AS (
    SELECT api_key_id, count(*) AS n, max(\"timestamp\") AS last_used FROM ins GROUP BY api_key_id
), bumped AS (
    INSERT INTO keygate_key_counters AS c (api_key_id, pending_requests, last_used_at)
    SELECT api_key_id, n, last_used FROM per_key ORDER BY api_key_id
    ON CONFLICT (api_key_id) DO UPDATE
        SET pending_requests = c.pending_requests + EXCLUDED.pending_requests,
            last_used_at = greatest(c.last_used_at, EXCLUDED.last_used_at)
)
SELECT coalesce(sum(n), 0)::int8 FROM per_key";

/// Only asked when a batch inserted fewer rows than it staged, to tell rows already
/// stored from rows whose key is gone. Keys of inserted rows cannot vanish meanwhile:
/// the reference check (migration 7) holds a `FOR KEY SHARE` lock on them until commit.
const ORPHANS: &str = "SELECT count(*) FROM keygate_usage_staging s
WHERE NOT EXISTS (SELECT 1 FROM api_keys k WHERE k.id = s.api_key_id)
   OR NOT EXISTS (SELECT 1 FROM organizations o WHERE o.id = s.organization_id)";

/// What one committed batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// New rows, each also counted in its key's `total_requests`.
    pub inserted: u64,
    /// Rows an earlier attempt or replay had already stored.
    pub duplicates: u64,
    /// Rows whose key or organisation no longer exists; not stored.
    pub orphaned: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UsageWriteError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// The connection was closed: the batch may or may not have committed.
    #[error("usage batch did not finish within {0:?}; its outcome is unknown")]
    TimedOut(Duration),
}

impl From<tokio_postgres::Error> for UsageWriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        UsageWriteError::Db(DbError::Query(e))
    }
}

impl From<deadpool_postgres::PoolError> for UsageWriteError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        UsageWriteError::Db(DbError::from(e))
    }
}

/// Writes `rows` in one transaction, within `limit` including the pool checkout.
/// On any error nothing is known to be stored and the caller retries the same rows.
/// Idempotent: rows already stored are skipped and counted nowhere.
pub async fn write_batch(pool: &Pool, rows: &[UsageRecord], limit: Duration) -> Result<BatchOutcome, UsageWriteError> {
    write_with(pool, rows, limit, false).await
}

/// [`write_batch`] for rows never sent before (a live batch's first attempt): a COPY
/// straight into the table (`usage_direct`), falling back to the staging path when the
/// COPY is refused for a row (a key deleted meanwhile). Never for retries or replays.
pub async fn write_fresh_batch(
    pool: &Pool,
    rows: &[UsageRecord],
    limit: Duration,
) -> Result<BatchOutcome, UsageWriteError> {
    write_with(pool, rows, limit, true).await
}

async fn write_with(
    pool: &Pool,
    rows: &[UsageRecord],
    limit: Duration,
    fresh: bool,
) -> Result<BatchOutcome, UsageWriteError> {
    if rows.is_empty() {
        return Ok(BatchOutcome::default());
    }
    let started = Instant::now();
    let mut client = tokio::time::timeout(limit, pool.get())
        .await
        .map_err(|_| UsageWriteError::TimedOut(limit))??;
    let left = limit.saturating_sub(started.elapsed());
    let work = async {
        if fresh {
            match write_direct(&mut client, rows).await {
                Err(e) if refused_row(&e) => {
                    tracing::debug!(error = %e, "usage COPY refused a row; writing the batch through staging");
                }
                other => return other.map_err(UsageWriteError::from),
            }
        }
        write_in(&mut client, rows).await
    };
    match tokio::time::timeout(left, work).await {
        Ok(result) => result,
        Err(_) => {
            // The session may be mid-COPY or mid-transaction: it must not go back to
            // the pool. Dropping it closes the socket and the server rolls back.
            drop(Object::take(client));
            Err(UsageWriteError::TimedOut(limit))
        }
    }
}

async fn write_direct(client: &mut Object, rows: &[UsageRecord]) -> Result<BatchOutcome, tokio_postgres::Error> {
    // Dropping `tx` on an error path sends ROLLBACK, so the staging path starts clean.
    let tx = client.transaction().await?;
    let inserted = super::usage_direct::copy_batch(&tx, rows).await?;
    tx.commit().await?;
    Ok(BatchOutcome {
        inserted,
        ..BatchOutcome::default()
    })
}

/// A row the table refused (its key or organisation gone, an id already stored): the
/// staging path sorts such rows out; anything else is the database's trouble.
fn refused_row(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code()
        .is_some_and(|c| *c == SqlState::FOREIGN_KEY_VIOLATION || *c == SqlState::UNIQUE_VIOLATION)
}

/// A row's text fields made to fit their columns, shared by both COPY paths.
pub(super) struct Cleaned<'a> {
    pub(super) endpoint: Cow<'a, str>,
    pub(super) method: Cow<'a, str>,
    pub(super) model: Option<Cow<'a, str>>,
    /// Always fits `ip_address`, `varchar(45)`.
    ip: Option<IpText>,
    pub(super) agent: Option<Cow<'a, str>>,
    pub(super) code: Option<Cow<'a, str>>,
    pub(super) message: Option<Cow<'a, str>>,
}

impl<'a> Cleaned<'a> {
    pub(super) fn new(r: &'a UsageRecord) -> Self {
        Cleaned {
            endpoint: clean(&r.endpoint, usage::ENDPOINT_MAX),
            method: clean(&r.method, usage::METHOD_MAX),
            model: r.model.as_deref().map(|s| clean(s, usage::MODEL_MAX)),
            ip: r.ip_address.map(IpText::new),
            agent: r.user_agent.as_deref().map(|s| clean(s, usage::USER_AGENT_MAX)),
            code: r.error_code.as_deref().map(|s| clean(s, usage::ERROR_CODE_MAX)),
            message: r.error_message.as_deref().map(|s| clean(s, usize::MAX)),
        }
    }

    /// The client address as the column's text.
    pub(super) fn ip(&self) -> Option<&str> {
        self.ip.as_ref().map(IpText::as_str)
    }
}

async fn write_in(client: &mut Object, rows: &[UsageRecord]) -> Result<BatchOutcome, UsageWriteError> {
    // Dropping `tx` on an error path sends ROLLBACK, so the session is clean for reuse.
    let tx = client.transaction().await?;
    tx.batch_execute(STAGE).await?;
    let copy = tx.prepare_cached(COPY).await?;
    let staged = copy_rows(tx.copy_in(&copy).await?, rows, CostColumn::Micros).await?;
    let insert = tx.prepare_cached(INSERT).await?;
    let inserted: i64 = tx.query_one(&insert, &[]).await?.try_get(0)?;
    let inserted = inserted.max(0) as u64;
    let orphaned = if inserted < staged {
        let orphans = tx.prepare_cached(ORPHANS).await?;
        let n: i64 = tx.query_one(&orphans, &[]).await?.try_get(0)?;
        n.max(0) as u64
    } else {
        0
    };
    tx.commit().await?;
    Ok(BatchOutcome {
        inserted,
        duplicates: staged.saturating_sub(inserted + orphaned),
        orphaned,
    })
}

/// Makes a value fit its column: cut to `max` bytes (so at most `max` characters) and
/// without NUL, which PostgreSQL text cannot hold. Either would otherwise fail the
/// whole batch on every retry.
fn clean(s: &str, max: usize) -> Cow<'_, str> {
    let cut = usage::truncate(s, max);
    if cut.contains('\0') {
        Cow::Owned(cut.replace('\0', ""))
    } else {
        Cow::Borrowed(cut)
    }
}

/// Creates the partition for the month containing `at`, if missing; returns its name.
/// Rows of a month without one still land in the default partition, so a failure
/// here costs speed, never rows.
pub async fn ensure_partition(pool: &Pool, at: DateTime<Utc>, limit: Duration) -> Result<String, UsageWriteError> {
    let work = async {
        let client = pool.get().await?;
        let row = client.query_one("SELECT keygate_usage_partition($1)", &[&at]).await?;
        Ok::<_, UsageWriteError>(row.try_get::<_, String>(0)?)
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| UsageWriteError::TimedOut(limit))?
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn values_are_made_to_fit() {
        assert_eq!(clean("abc", 2), "ab");
        assert_eq!(clean("a\0b", 10), "ab");
        assert_eq!(clean("é", 1), "");
    }
}
