//! PostgreSQL access. The only module that talks to tokio-postgres.
//!
//! Owns connecting (pool and single sessions), the schema migrations and the queries
//! behind organisations and keys. It does not decide policy: callers say what to do,
//! this module says how it is stored.

pub mod auth_queries;
mod cached;
mod copy_rows;
pub mod counters;
pub mod key_counters;
pub mod keys;
mod mask;
pub mod migrate;
pub mod notify;
pub mod orgs;
pub mod report;
pub mod retention;
pub mod usage;
mod usage_direct;

pub use mask::mask_url;

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseConfig;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to database {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("database schema is not ready ({0}): run `keygate migrate up`")]
    SchemaNotReady(String),
    #[error("database schema is at version {found}, newer than this keygate knows ({known}); upgrade keygate")]
    SchemaTooNew { found: i32, known: i32 },
    #[error("database schema does not match the seed's: {0}")]
    SchemaMismatch(String),
    #[error("organization `{0}` not found")]
    OrgNotFound(String),
    #[error("organization `{0}` already exists")]
    OrgExists(String),
    #[error("API key {0} not found")]
    KeyNotFound(String),
    #[error("API key {0} is revoked")]
    KeyRevoked(String),
    #[error("organization `{slug}` already has {max} active keys, its max_api_keys; revoke one or raise the limit")]
    KeyLimitReached { slug: String, max: i64 },
    #[error("{0}")]
    Invalid(String),
    #[error("could not generate a key: {0}")]
    Entropy(String),
    #[error("database error: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(String),
}

impl DbError {
    /// The session died under the statement (terminated backend, failover, a pooled
    /// connection that broke while idle): the same statement on a fresh connection may
    /// well succeed.
    pub fn is_lost_connection(&self) -> bool {
        match self {
            DbError::Query(e) => {
                e.is_closed()
                    || e.code().is_none()
                    || e.code().is_some_and(|c| {
                        *c == tokio_postgres::error::SqlState::ADMIN_SHUTDOWN
                            || *c == tokio_postgres::error::SqlState::CRASH_SHUTDOWN
                    })
            }
            _ => false,
        }
    }

    /// Whether the failure is the database being unreachable or slow rather than a
    /// statement it refused: callers treat these as "store down".
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Unreachable { .. } | DbError::Pool(_) => true,
            DbError::Query(e) => e.is_closed() || e.code().is_none(),
            _ => false,
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::Pool(e.to_string())
    }
}

fn pg_config(cfg: &DatabaseConfig) -> Result<tokio_postgres::Config, DbError> {
    let mut pg = tokio_postgres::Config::from_str(&cfg.url).map_err(|e| DbError::Unreachable {
        url: mask_url(&cfg.url),
        reason: e.to_string(),
    })?;
    if pg.get_application_name().is_none() {
        pg.application_name("keygate");
    }
    pg.connect_timeout(cfg.connect_timeout);
    // UTC sessions make month and minute windows mean the same on every replica.
    pg.options(format!(
        "-c timezone=UTC -c statement_timeout={}",
        cfg.statement_timeout.as_millis()
    ));
    Ok(pg)
}

/// A pool for the serving path and the admin commands.
pub fn pool(cfg: &DatabaseConfig, size: usize) -> Result<Pool, DbError> {
    let mgr = Manager::from_config(
        pg_config(cfg)?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(cfg.pool_wait_timeout),
            create: Some(cfg.connect_timeout + Duration::from_millis(500)),
            recycle: Some(cfg.connect_timeout),
        })
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// One dedicated session, for work that needs session state (advisory locks, LISTEN).
/// The connection task ends when the returned client is dropped.
pub async fn connect(cfg: &DatabaseConfig) -> Result<Client, DbError> {
    let pg = pg_config(cfg)?;
    let unreachable = |e: tokio_postgres::Error| DbError::Unreachable {
        url: mask_url(&cfg.url),
        reason: root_cause(&e),
    };
    let (client, conn) = tokio::time::timeout(cfg.connect_timeout + Duration::from_millis(500), pg.connect(NoTls))
        .await
        .map_err(|_| DbError::Unreachable {
            url: mask_url(&cfg.url),
            reason: "timed out".into(),
        })?
        .map_err(unreachable)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database session ended");
        }
    });
    Ok(client)
}

/// Checks out a pooled client, reporting an unreachable database by its masked URL.
pub async fn checkout(pool: &Pool, cfg: &DatabaseConfig) -> Result<deadpool_postgres::Object, DbError> {
    pool.get().await.map_err(|e| DbError::Unreachable {
        url: mask_url(&cfg.url),
        reason: pool_reason(&e),
    })
}

fn pool_reason(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(pe) => root_cause(pe),
        deadpool_postgres::PoolError::Timeout(_) => "timed out".into(),
        other => other.to_string(),
    }
}

/// tokio-postgres wraps I/O errors; the innermost message is the useful one
/// ("Connection refused"), and it never contains the password.
fn root_cause(e: &tokio_postgres::Error) -> String {
    let mut msg = e.to_string();
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        msg = s.to_string();
        src = s.source();
    }
    msg
}

/// A cheap round trip through the pool, for readiness.
pub async fn ping(pool: &Pool) -> Result<(), DbError> {
    let client = pool.get().await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}
