//! Keeping stored history bounded: month partitions of `api_key_usage` made ahead of
//! time and dropped on request, and old minute windows of `rate_limit_tracking` deleted.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use super::DbError;

/// Makes the month partitions for `at` and the two months after, so rows never pile
/// up in the default partition.
pub async fn ensure_usage_partitions(c: &impl GenericClient, at: DateTime<Utc>) -> Result<(), DbError> {
    c.execute(
        "SELECT keygate_usage_partition($1::timestamptz + make_interval(months => m)) FROM generate_series(0, 2) AS m",
        &[&at],
    )
    .await?;
    Ok(())
}

/// Deletes minute windows that ended before `before`, at most `batch` rows at a time
/// so a large backlog never holds long locks. Returns the rows deleted.
pub async fn prune_rate_windows(c: &impl GenericClient, before: DateTime<Utc>, batch: i64) -> Result<u64, DbError> {
    let mut total = 0;
    loop {
        let n = c
            .execute(
                "DELETE FROM rate_limit_tracking WHERE id IN (
                     SELECT id FROM rate_limit_tracking WHERE window_end < $1 LIMIT $2)",
                &[&before, &batch],
            )
            .await?;
        total += n;
        if n < batch.unsigned_abs() {
            return Ok(total);
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneOutcome {
    pub dropped_partitions: Vec<String>,
    pub deleted_rows: u64,
}

/// Removes usage rows older than `before`: whole month partitions that end on or before
/// it are dropped; rows before it in a partly covered month (or the default
/// partition) are deleted. With `dry_run`, reports what would go and changes nothing.
pub async fn prune_usage(
    c: &mut tokio_postgres::Client,
    before: DateTime<Utc>,
    dry_run: bool,
) -> Result<(PruneOutcome, u64), DbError> {
    let tx = c.transaction().await?;
    let parts = tx
        .query(
            r#"SELECT child.relname::text,
                      (regexp_match(pg_get_expr(child.relpartbound, child.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz
               FROM pg_inherits i
               JOIN pg_class parent ON parent.oid = i.inhparent
               JOIN pg_class child ON child.oid = i.inhrelid
               WHERE parent.relname = 'api_key_usage'"#,
            &[],
        )
        .await?;
    let mut out = PruneOutcome::default();
    let mut rows_in_dropped: u64 = 0;
    for p in &parts {
        let name: String = p.try_get(0)?;
        let upper: Option<DateTime<Utc>> = p.try_get(1)?;
        if upper.is_some_and(|u| u <= before) {
            let n: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {}", quote_ident(&name)), &[])
                .await?
                .try_get(0)?;
            rows_in_dropped += n.unsigned_abs();
            if !dry_run {
                tx.batch_execute(&format!("DROP TABLE {}", quote_ident(&name))).await?;
            }
            out.dropped_partitions.push(name);
        }
    }
    let remaining_sql = r#"FROM api_key_usage WHERE "timestamp" < $1"#;
    out.deleted_rows = if dry_run {
        let n: i64 = tx
            .query_one(&format!("SELECT count(*) {remaining_sql}"), &[&before])
            .await?
            .try_get(0)?;
        n.unsigned_abs().saturating_sub(rows_in_dropped)
    } else {
        tx.execute(&format!("DELETE {remaining_sql}"), &[&before]).await?
    };
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok((out, rows_in_dropped))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
