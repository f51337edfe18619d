//! Statements prepared once per pooled connection, for the queries a request can wait
//! on (the key lookup, the limiter's seed snapshot).
//!
//! An unprepared `query` costs two round trips and a parse and plan on every call;
//! deadpool's per-connection statement cache makes it one round trip, and after a few
//! runs PostgreSQL reuses a generic plan. Owns recovering from a cached statement the
//! server stopped accepting; it does not own any SQL.

use deadpool_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::DbError;

/// The rows of `sql`, prepared through the connection's statement cache.
pub(super) async fn query(c: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, DbError> {
    match run(c, sql, params).await {
        Err(e) if is_stale(&e) => {
            // A migration changed a column the statement returns, or something (a
            // pooler's DISCARD ALL) deallocated it: prepare afresh, once.
            c.statement_cache.clear();
            Ok(run(c, sql, params).await?)
        }
        other => Ok(other?),
    }
}

async fn run(c: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = c.prepare_cached(sql).await?;
    c.query(&statement, params).await
}

fn is_stale(e: &tokio_postgres::Error) -> bool {
    // 0A000 is "cached plan must not change result type"; 26000 an unknown statement.
    e.code()
        .is_some_and(|c| *c == SqlState::FEATURE_NOT_SUPPORTED || *c == SqlState::INVALID_SQL_STATEMENT_NAME)
}
