//! The usage report's query: requests, errors, rate-limited, tokens, cost and latency
//! percentiles over `api_key_usage`, grouped by day, key or endpoint.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::DbError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Day,
    Key,
    Endpoint,
}

impl std::str::FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "day" => Ok(GroupBy::Day),
            "key" => Ok(GroupBy::Key),
            "endpoint" => Ok(GroupBy::Endpoint),
            other => Err(format!("`{other}` is not a grouping (expected day, key or endpoint)")),
        }
    }
}

impl GroupBy {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Day => "day",
            GroupBy::Key => "key",
            GroupBy::Endpoint => "endpoint",
        }
    }
}

fn parse_day(s: &str) -> Option<DateTime<Utc>> {
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0)?))
}

/// The start of a report period: a UTC day (`YYYY-MM-DD`, its midnight) or an RFC 3339
/// instant. Shared by `keygate usage report --from` and the admin API's `from`.
pub fn parse_from(s: &str) -> Result<DateTime<Utc>, String> {
    parse_day(s)
        .or_else(|| DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc)))
        .ok_or_else(|| format!("`{s}` is not a date (YYYY-MM-DD) or RFC 3339 time"))
}

/// The end of a report period: a UTC day is inclusive (its end is the next midnight);
/// an RFC 3339 instant is exclusive.
pub fn parse_to(s: &str) -> Result<DateTime<Utc>, String> {
    match parse_day(s) {
        Some(day) => Ok(day + chrono::Duration::days(1)),
        None => parse_from(s),
    }
}

fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(now)
}

/// The `[from, to)` a report covers: by default from the start of this month (UTC) to
/// just past `now`, so a row written this second is included.
pub fn period(
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), DbError> {
    let from = from.unwrap_or_else(|| month_start(now));
    let to = to.unwrap_or(now + chrono::Duration::seconds(1));
    if from >= to {
        return Err(DbError::Invalid(
            "the period's start (from) must be before its end (to)".into(),
        ));
    }
    Ok((from, to))
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReportRow {
    pub group: String,
    pub requests: i64,
    /// Status 400 and above, keygate's refusals included.
    pub errors: i64,
    pub rate_limited: i64,
    pub tokens: i64,
    /// Dollars, exact (NUMERIC rendered as text).
    pub cost_usd: String,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
}

pub async fn usage(
    c: &impl GenericClient,
    org_id: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    by: GroupBy,
) -> Result<Vec<ReportRow>, DbError> {
    let group = match by {
        GroupBy::Day => r#"to_char(u."timestamp" AT TIME ZONE 'UTC', 'YYYY-MM-DD')"#,
        GroupBy::Key => r#"coalesce(k.name || ' (' || k.key_prefix || '…' || k.key_hint || ')', u.api_key_id::text)"#,
        GroupBy::Endpoint => "u.method || ' ' || u.endpoint",
    };
    // One pass with GROUPING SETS gives the groups and the total together, so the
    // total is computed from exactly the same rows.
    let sql = format!(
        r#"SELECT grouping({group}) = 1 AS is_total, {group} AS grp,
                  count(*), count(*) FILTER (WHERE u.status_code >= 400), count(*) FILTER (WHERE u.status_code = 429),
                  coalesce(sum(u.tokens_used), 0)::bigint, coalesce(sum(u.cost_usd), 0)::numeric(20, 6)::text,
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY u.response_time_ms),
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY u.response_time_ms)
           FROM api_key_usage u LEFT JOIN api_keys k ON k.id = u.api_key_id
           WHERE u.organization_id = $1 AND u."timestamp" >= $2 AND u."timestamp" < $3
           GROUP BY GROUPING SETS (({group}), ())
           ORDER BY is_total, grp"#
    );
    let rows = c.query(&sql, &[&org_id, &from, &to]).await?;
    rows.iter()
        .map(|r| {
            let is_total: bool = r.try_get(0)?;
            Ok(ReportRow {
                group: if is_total {
                    "TOTAL".into()
                } else {
                    r.try_get::<_, Option<String>>(1)?.unwrap_or_default()
                },
                requests: r.try_get(2)?,
                errors: r.try_get(3)?,
                rate_limited: r.try_get(4)?,
                tokens: r.try_get(5)?,
                cost_usd: r.try_get(6)?,
                p50_ms: r.try_get(7)?,
                p95_ms: r.try_get(8)?,
            })
        })
        .collect()
}
