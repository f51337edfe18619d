//! Schema migrations embedded in the binary: apply, roll back, report, adopt.
//!
//! Each migration runs in its own transaction together with its bookkeeping row, and
//! the whole run holds a session advisory lock, so replicas that start together apply
//! each migration exactly once. A database made by the seed's Alembic migration is
//! adopted: its columns are checked and the baseline is recorded instead of run.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::DbError;

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

macro_rules! migration {
    ($version:expr, $name:literal, $file:literal) => {
        Migration {
            version: $version,
            name: $name,
            up: include_str!(concat!("../../sql/", $file, ".up.sql")),
            down: include_str!(concat!("../../sql/", $file, ".down.sql")),
        }
    };
}

/// Every migration, in order. A test checks this list against the files in `sql/`.
pub static MIGRATIONS: &[Migration] = &[
    migration!(1, "baseline", "0001_baseline"),
    migration!(2, "integrity", "0002_integrity"),
    migration!(3, "quotas", "0003_quotas"),
    migration!(4, "notify", "0004_notify"),
    migration!(5, "usage_partitions", "0005_usage_partitions"),
    migration!(6, "notify_columns", "0006_notify_columns"),
    migration!(7, "usage_reference_checks", "0007_usage_reference_checks"),
    migration!(
        8,
        "usage_reference_checks_indexed",
        "0008_usage_reference_checks_indexed"
    ),
    migration!(9, "counter_fillfactor", "0009_counter_fillfactor"),
    migration!(10, "touch_when_unset", "0010_touch_when_unset"),
    migration!(11, "usage_partition_checks", "0011_usage_partition_checks"),
    migration!(12, "bump_in_key_order", "0012_bump_in_key_order"),
    migration!(13, "key_counters", "0013_key_counters"),
    migration!(14, "fold_cadence", "0014_fold_cadence"),
    migration!(15, "fold_in_key_order", "0015_fold_in_key_order"),
];

pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Arbitrary but fixed: "keygate" in ASCII. Shared by every replica.
const LOCK_KEY: i64 = 0x006b_6579_6761_7465;

const TABLE: &str = "keygate_schema_migrations";

/// The columns of the seed's tables that keygate reads or writes.
const SEED_COLUMNS: &[(&str, &[&str])] = &[
    (
        "organizations",
        &[
            "id",
            "name",
            "slug",
            "email",
            "plan",
            "is_active",
            "monthly_request_limit",
            "rate_limit_per_minute",
            "max_api_keys",
            "created_at",
            "updated_at",
        ],
    ),
    (
        "api_keys",
        &[
            "id",
            "organization_id",
            "key_prefix",
            "key_hash",
            "key_hint",
            "name",
            "description",
            "environment",
            "is_active",
            "expires_at",
            "revoked_at",
            "scopes",
            "custom_rate_limit",
            "total_requests",
            "last_used_at",
            "created_at",
        ],
    ),
    (
        "api_key_usage",
        &[
            "id",
            "api_key_id",
            "organization_id",
            "timestamp",
            "endpoint",
            "method",
            "status_code",
            "response_time_ms",
            "tokens_used",
            "cost_usd",
            "ip_address",
            "user_agent",
            "error_message",
            "error_code",
        ],
    ),
    (
        "rate_limit_tracking",
        &[
            "id",
            "api_key_id",
            "window_start",
            "window_end",
            "request_count",
            "created_at",
            "updated_at",
        ],
    ),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Adopted,
    RolledBack,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub version: i32,
    pub name: &'static str,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub struct StatusRow {
    pub version: i32,
    pub name: String,
    pub applied_at: Option<chrono::DateTime<chrono::Utc>>,
    pub adopted: bool,
    /// The embedded SQL differs from what was applied.
    pub modified: bool,
    /// Applied in the database but unknown to this binary.
    pub unknown: bool,
}

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

async fn with_lock<T>(
    client: &mut Client,
    f: impl AsyncFnOnce(&mut Client) -> Result<T, DbError>,
) -> Result<T, DbError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY]).await?;
    let out = f(client).await;
    // The lock is also released when the session ends, so a failed unlock is harmless.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]).await;
    out
}

async fn ensure_table(client: &Client) -> Result<(), DbError> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                adopted    boolean NOT NULL DEFAULT false,
                applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await?;
    Ok(())
}

async fn applied_versions(client: &Client) -> Result<Vec<i32>, DbError> {
    let rows = client
        .query(&format!("SELECT version FROM {TABLE} ORDER BY version"), &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Applies every pending migration. Returns what it did, in order.
pub async fn up(client: &mut Client) -> Result<Vec<Step>, DbError> {
    with_lock(client, async |client: &mut Client| {
        ensure_table(client).await?;
        let mut applied = applied_versions(client).await?;
        let mut steps = Vec::new();
        if let Some(&max) = applied.last() {
            if max > latest_version() {
                return Err(DbError::SchemaTooNew {
                    found: max,
                    known: latest_version(),
                });
            }
        }
        if applied.is_empty() && adopt_seed_schema(client).await? {
            applied.push(1);
            steps.push(Step {
                version: 1,
                name: MIGRATIONS[0].name,
                outcome: Outcome::Adopted,
            });
        }
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            let tx = client.transaction().await?;
            tx.batch_execute(m.up).await.map_err(|e| migration_failed(m, "up", e))?;
            tx.execute(
                &format!("INSERT INTO {TABLE} (version, name, checksum) VALUES ($1, $2, $3)"),
                &[&m.version, &m.name, &checksum(m.up)],
            )
            .await?;
            tx.commit().await?;
            steps.push(Step {
                version: m.version,
                name: m.name,
                outcome: Outcome::Applied,
            });
        }
        Ok(steps)
    })
    .await
}

/// Rolls back the newest `steps` applied migrations (all of them with `usize::MAX`).
pub async fn down(client: &mut Client, steps: usize) -> Result<Vec<Step>, DbError> {
    with_lock(client, async |client: &mut Client| {
        ensure_table(client).await?;
        let applied = applied_versions(client).await?;
        let mut done = Vec::new();
        for &v in applied.iter().rev().take(steps) {
            let m = MIGRATIONS
                .iter()
                .find(|m| m.version == v)
                .ok_or(DbError::SchemaTooNew {
                    found: v,
                    known: latest_version(),
                })?;
            let tx = client.transaction().await?;
            tx.batch_execute(m.down)
                .await
                .map_err(|e| migration_failed(m, "down", e))?;
            tx.execute(&format!("DELETE FROM {TABLE} WHERE version = $1"), &[&v])
                .await?;
            tx.commit().await?;
            done.push(Step {
                version: v,
                name: m.name,
                outcome: Outcome::RolledBack,
            });
        }
        Ok(done)
    })
    .await
}

/// Every known and every applied migration, in version order.
pub async fn status(client: &Client) -> Result<Vec<StatusRow>, DbError> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&TABLE])
        .await?
        .get(0);
    let applied = if exists {
        client
            .query(
                &format!("SELECT version, name, checksum, adopted, applied_at FROM {TABLE} ORDER BY version"),
                &[],
            )
            .await?
    } else {
        Vec::new()
    };
    let mut rows: Vec<StatusRow> = MIGRATIONS
        .iter()
        .map(|m| {
            let row = applied.iter().find(|r| r.get::<_, i32>(0) == m.version);
            StatusRow {
                version: m.version,
                name: m.name.to_string(),
                applied_at: row.map(|r| r.get(4)),
                adopted: row.is_some_and(|r| r.get(3)),
                modified: row.is_some_and(|r| !r.get::<_, bool>(3) && r.get::<_, String>(2) != checksum(m.up)),
                unknown: false,
            }
        })
        .collect();
    for r in &applied {
        let v: i32 = r.get(0);
        if !MIGRATIONS.iter().any(|m| m.version == v) {
            rows.push(StatusRow {
                version: v,
                name: r.get(1),
                applied_at: Some(r.get(4)),
                adopted: r.get(3),
                modified: false,
                unknown: true,
            });
        }
    }
    Ok(rows)
}

/// Fails unless every embedded migration is applied: the check the serving path and
/// the admin commands make before touching a table.
pub async fn ensure_current(client: &Client) -> Result<(), DbError> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&TABLE])
        .await?
        .get(0);
    if !exists {
        return Err(DbError::SchemaNotReady("no migrations applied".into()));
    }
    let max: Option<i32> = client
        .query_one(&format!("SELECT max(version) FROM {TABLE}"), &[])
        .await?
        .get(0);
    match max {
        None => Err(DbError::SchemaNotReady("no migrations applied".into())),
        Some(v) if v < latest_version() => Err(DbError::SchemaNotReady(format!(
            "at version {v} of {}",
            latest_version()
        ))),
        Some(v) if v > latest_version() => Err(DbError::SchemaTooNew {
            found: v,
            known: latest_version(),
        }),
        Some(_) => Ok(()),
    }
}

/// Records the baseline as applied when the seed's tables are already there.
/// Returns false when there is nothing to adopt (a fresh database).
async fn adopt_seed_schema(client: &Client) -> Result<bool, DbError> {
    let mut present = Vec::new();
    for (table, _) in SEED_COLUMNS {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[table])
            .await?
            .get(0);
        if exists {
            present.push(*table);
        }
    }
    if present.is_empty() {
        return Ok(false);
    }
    let mut problems = Vec::new();
    for (table, wanted) in SEED_COLUMNS {
        if !present.contains(table) {
            problems.push(format!("table {table} is missing"));
            continue;
        }
        let rows = client
            .query(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1",
                &[table],
            )
            .await?;
        let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|c| !have.iter().any(|h| h == c))
            .collect();
        if !missing.is_empty() {
            problems.push(format!("{table} lacks {}", missing.join(", ")));
        }
    }
    if !problems.is_empty() {
        return Err(DbError::SchemaMismatch(problems.join("; ")));
    }
    let alembic: bool = client
        .query_one("SELECT to_regclass('alembic_version') IS NOT NULL", &[])
        .await?
        .get(0);
    tracing::info!(alembic, "adopting existing seed schema as migration 1");
    client
        .execute(
            &format!("INSERT INTO {TABLE} (version, name, checksum, adopted) VALUES (1, $1, $2, true)"),
            &[&MIGRATIONS[0].name, &checksum(MIGRATIONS[0].up)],
        )
        .await?;
    Ok(true)
}

fn migration_failed(m: &Migration, direction: &str, e: tokio_postgres::Error) -> DbError {
    let detail = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string());
    DbError::Invalid(format!(
        "migration {:04}_{} ({direction}) failed: {detail}",
        m.version, m.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sql_file_is_embedded_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("sql dir")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(".up.sql"))
            .collect();
        files.sort();
        assert_eq!(
            files.len(),
            MIGRATIONS.len(),
            "every sql/*.up.sql must be listed in MIGRATIONS"
        );
        for (i, (file, m)) in files.iter().zip(MIGRATIONS).enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert_eq!(file, &format!("{:04}_{}.up.sql", m.version, m.name));
            assert!(!m.down.trim().is_empty(), "{file} needs a down migration");
        }
    }
}
