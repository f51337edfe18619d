//! The counters behind the limits engine: per-key minute windows in
//! `rate_limit_tracking` and per-organisation calendar months in
//! `organization_monthly_usage`.
//!
//! Owns every statement on those counters: the batched delta upserts that return the
//! totals of all replicas, the batched read-back, and the snapshot a replica seeds a key
//! with. It does not count, decide or schedule; `crate::limits` does. Window starts are
//! computed by the caller's clock (via `limits::window`), never the database's, so a
//! replica's windows match the rows it writes.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::DbError;
use crate::limits::window;

/// One counter cell: whose (key or organisation id), which window, how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowCount {
    pub id: Uuid,
    pub window_start: DateTime<Utc>,
    pub count: i64,
}

/// The totals a key starts from when a replica first sees it: its current and previous
/// minute, and its organisation's current month, as all replicas have flushed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// The minute the counts were read for; `minute_count` belongs to it.
    pub minute_start: DateTime<Utc>,
    pub minute_count: i64,
    pub previous_minute_count: i64,
    pub month_start: DateTime<Utc>,
    pub month_count: i64,
}

impl Snapshot {
    /// Nothing counted yet, as of `now`.
    pub fn empty(now: DateTime<Utc>) -> Self {
        Snapshot {
            minute_start: window::minute_start_of(now),
            minute_count: 0,
            previous_minute_count: 0,
            month_start: window::month_start_of(now),
            month_count: 0,
        }
    }

    /// The start of the minute before `minute_start`: the second window a snapshot reads.
    pub(super) fn previous_minute_start(&self) -> DateTime<Utc> {
        window::minute_start(window::minute_of(self.minute_start.timestamp_millis()).0 - 1).unwrap_or(self.minute_start)
    }

    /// This (empty) snapshot's windows with the three counts read from `row`, starting at
    /// column `at`: current minute, previous minute, month, as `bigint`s.
    pub(super) fn read_from(self, row: &tokio_postgres::Row, at: usize) -> Result<Snapshot, DbError> {
        Ok(Snapshot {
            minute_count: row.try_get(at)?,
            previous_minute_count: row.try_get(at + 1)?,
            month_count: row.try_get(at + 2)?,
            ..self
        })
    }
}

fn split(rows: &[WindowCount]) -> (Vec<Uuid>, Vec<DateTime<Utc>>, Vec<i64>) {
    let mut out = (
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
    );
    for r in rows {
        out.0.push(r.id);
        out.1.push(r.window_start);
        out.2.push(r.count);
    }
    out
}

fn to_counts(rows: &[tokio_postgres::Row]) -> Result<Vec<WindowCount>, DbError> {
    rows.iter()
        .map(|r| {
            Ok(WindowCount {
                id: r.try_get(0)?,
                window_start: r.try_get(1)?,
                count: r.try_get(2)?,
            })
        })
        .collect()
}

// Rows for keys or organisations deleted since they were counted are skipped by the
// joins rather than failing the whole batch forever on the foreign key. ORDER BY makes
// concurrent replicas lock overlapping rows in the same order, so they cannot
// deadlock. The read half sees the table as it was before the write half, which is
// why callers never list a cell in both. Setting `updated_at` here spares every updated
// row the touch trigger's PL/pgSQL call (migration 10), for the value it would write.
const ADD_KEY_MINUTES: &str = "
WITH written AS (
    INSERT INTO rate_limit_tracking (id, api_key_id, window_start, window_end, request_count)
    SELECT d.id, d.api_key_id, d.window_start, d.window_start + interval '1 minute', d.delta
    FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::bigint[])
             AS d(id, api_key_id, window_start, delta)
    JOIN api_keys k ON k.id = d.api_key_id
    ORDER BY d.api_key_id, d.window_start
    ON CONFLICT (api_key_id, window_start) DO UPDATE
        SET request_count = rate_limit_tracking.request_count + EXCLUDED.request_count,
            updated_at = now()
    RETURNING api_key_id, window_start, request_count
)
SELECT api_key_id, window_start, request_count FROM written
UNION ALL
SELECT t.api_key_id, t.window_start, t.request_count
FROM unnest($5::uuid[], $6::timestamptz[]) AS r(api_key_id, window_start)
JOIN rate_limit_tracking t ON t.api_key_id = r.api_key_id AND t.window_start = r.window_start";

const ADD_ORG_MONTHS: &str = "
WITH written AS (
    INSERT INTO organization_monthly_usage (organization_id, month_start, request_count)
    SELECT d.organization_id, d.month_start, d.delta
    FROM unnest($1::uuid[], $2::timestamptz[], $3::bigint[]) AS d(organization_id, month_start, delta)
    JOIN organizations o ON o.id = d.organization_id
    ORDER BY d.organization_id, d.month_start
    ON CONFLICT (organization_id, month_start) DO UPDATE
        SET request_count = organization_monthly_usage.request_count + EXCLUDED.request_count,
            updated_at = now()
    RETURNING organization_id, month_start, request_count
)
SELECT organization_id, month_start, request_count FROM written
UNION ALL
SELECT m.organization_id, m.month_start, m.request_count
FROM unnest($4::uuid[], $5::timestamptz[]) AS r(organization_id, month_start)
JOIN organization_monthly_usage m
  ON m.organization_id = r.organization_id AND m.month_start = r.month_start";

/// Adds per-key minute deltas and reads other minutes back, in one statement. Returns
/// the total (all replicas) of every written cell and of every read cell that exists.
/// Each (id, window_start) must appear at most once across `deltas` and `reads`.
pub async fn add_key_minutes(
    c: &impl GenericClient,
    deltas: &[WindowCount],
    reads: &[(Uuid, DateTime<Utc>)],
) -> Result<Vec<WindowCount>, DbError> {
    let (keys, starts, counts) = split(deltas);
    // Row ids are only ever read by people; v7 keeps them time-ordered like the rest.
    let ids: Vec<Uuid> = deltas.iter().map(|_| Uuid::now_v7()).collect();
    let (read_ids, read_starts): (Vec<Uuid>, Vec<DateTime<Utc>>) = reads.iter().copied().unzip();
    let rows = c
        .query(
            ADD_KEY_MINUTES,
            &[&ids, &keys, &starts, &counts, &read_ids, &read_starts],
        )
        .await?;
    to_counts(&rows)
}

/// Adds per-organisation month deltas and reads other months back, in one statement;
/// as [`add_key_minutes`].
pub async fn add_org_months(
    c: &impl GenericClient,
    deltas: &[WindowCount],
    reads: &[(Uuid, DateTime<Utc>)],
) -> Result<Vec<WindowCount>, DbError> {
    let (orgs, starts, counts) = split(deltas);
    let (read_ids, read_starts): (Vec<Uuid>, Vec<DateTime<Utc>>) = reads.iter().copied().unzip();
    let rows = c
        .query(ADD_ORG_MONTHS, &[&orgs, &starts, &counts, &read_ids, &read_starts])
        .await?;
    to_counts(&rows)
}

const LOAD: &str = "
SELECT q.key_id,
       COALESCE(cur.request_count, 0)::bigint,
       COALESCE(prev.request_count, 0)::bigint,
       COALESCE(m.request_count, 0)::bigint
FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS q(key_id, org_id, n)
LEFT JOIN rate_limit_tracking cur
       ON cur.api_key_id = q.key_id AND cur.window_start = $3::timestamptz
LEFT JOIN rate_limit_tracking prev
       ON prev.api_key_id = q.key_id AND prev.window_start = $4::timestamptz
LEFT JOIN organization_monthly_usage m
       ON m.organization_id = q.org_id AND m.month_start = $5::timestamptz
ORDER BY q.n";

/// `LOAD` for one pair, as a statement the connection keeps prepared.
const LOAD_ONE: &str = "
SELECT COALESCE((SELECT request_count FROM rate_limit_tracking
                 WHERE api_key_id = $1::uuid AND window_start = $3::timestamptz), 0)::bigint,
       COALESCE((SELECT request_count FROM rate_limit_tracking
                 WHERE api_key_id = $1::uuid AND window_start = $4::timestamptz), 0)::bigint,
       COALESCE((SELECT request_count FROM organization_monthly_usage
                 WHERE organization_id = $2::uuid AND month_start = $5::timestamptz), 0)::bigint";

/// The snapshot for one key and its organisation as of `now`, in one round trip on a
/// prepared statement: a key's first request after the limiter forgot it waits on it.
/// Counts nobody has flushed yet read as 0.
pub async fn load(
    c: &deadpool_postgres::Client,
    key_id: Uuid,
    org_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Snapshot, DbError> {
    let empty = Snapshot::empty(now);
    let rows = super::cached::query(
        c,
        LOAD_ONE,
        &[
            &key_id,
            &org_id,
            &empty.minute_start,
            &empty.previous_minute_start(),
            &empty.month_start,
        ],
    )
    .await?;
    match rows.first() {
        Some(row) => empty.read_from(row, 0),
        None => Ok(empty),
    }
}

/// Snapshots for many (key id, organisation id) pairs in one query, for preloading.
/// One entry per pair, in the order given.
pub async fn load_many(
    c: &impl GenericClient,
    pairs: &[(Uuid, Uuid)],
    now: DateTime<Utc>,
) -> Result<Vec<(Uuid, Snapshot)>, DbError> {
    let empty = Snapshot::empty(now);
    let (keys, orgs): (Vec<Uuid>, Vec<Uuid>) = pairs.iter().copied().unzip();
    let rows = c
        .query(
            LOAD,
            &[
                &keys,
                &orgs,
                &empty.minute_start,
                &empty.previous_minute_start(),
                &empty.month_start,
            ],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, empty.read_from(r, 1)?)))
        .collect()
}
