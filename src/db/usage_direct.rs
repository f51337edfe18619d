//! The fast path for a batch's first attempt: one binary COPY straight into
//! `api_key_usage`, then one call of `keygate_bump_key_counters` with the per-key counts
//! taken in memory (since migration 13 they wait in `keygate_key_counters` for the fold).
//!
//! Safe only for rows that cannot be stored yet: ids made by keygate for this batch,
//! never sent before. Everything else (a retry after an unknown outcome, a spool replay)
//! takes `usage`'s staging path, whose `ON CONFLICT DO NOTHING` makes it idempotent. A
//! COPY refuses the whole batch on one bad row (a key deleted meanwhile: 23503 from
//! migration 7's check), and the caller then falls back to the staging path, which filters
//! such rows out. Owns this path's statements and the binary `numeric` encoding of cost.

use std::collections::HashMap;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::copy_rows::{copy_rows, CostColumn};
use crate::usage::UsageRecord;

const COPY: &str = "COPY api_key_usage (id, api_key_id, organization_id, \"timestamp\", endpoint, \
    method, status_code, response_time_ms, prompt_tokens, completion_tokens, tokens_used, cost_usd, model, \
    ip_address, user_agent, error_code, error_message) FROM STDIN (FORMAT binary)";

/// One visit per key, locked in id order (migrations 12 and 13), so two batches touching
/// the same keys queue instead of deadlocking.
const BUMP: &str = "SELECT keygate_bump_key_counters($1::uuid[], $2::int8[], $3::timestamptz[])";

/// Copies `rows` and bumps their keys' counters inside `tx`; returns the rows stored
/// (all of them, or an error and nothing).
pub(super) async fn copy_batch(tx: &Transaction<'_>, rows: &[UsageRecord]) -> Result<u64, tokio_postgres::Error> {
    let copy = tx.prepare_cached(COPY).await?;
    let stored = copy_rows(tx.copy_in(&copy).await?, rows, CostColumn::Numeric).await?;
    let mut per_key: HashMap<Uuid, (i64, DateTime<Utc>)> = HashMap::new();
    for r in rows {
        let e = per_key.entry(r.api_key_id).or_insert((0, r.timestamp));
        e.0 += 1;
        e.1 = e.1.max(r.timestamp);
    }
    let (mut ids, mut counts, mut last) = (Vec::new(), Vec::new(), Vec::new());
    for (id, (n, at)) in per_key {
        ids.push(id);
        counts.push(n);
        last.push(at);
    }
    let bump = tx.prepare_cached(BUMP).await?;
    tx.execute(&bump, &[&ids, &counts, &last]).await?;
    Ok(stored)
}

/// What `numeric(12,6)` holds, in micro-units: ±999,999.999999.
const MICROS_MAX: i64 = 999_999_999_999;

/// A cost in micro-dollars, sent as a binary `numeric` with scale 6 and clamped to what
/// the column holds, as the staging path's SQL does: a value the column refused would
/// fail the batch on every retry.
#[derive(Debug, Clone, Copy)]
pub(super) struct Micros(pub i64);

impl Micros {
    /// PostgreSQL's binary numeric: digit count, weight of the first base-10000 digit,
    /// sign, display scale, then the digits, most significant first, without leading or
    /// trailing zero digits.
    pub(super) fn encode(self, out: &mut BytesMut) {
        let m = self.0.clamp(-MICROS_MAX, MICROS_MAX);
        let abs = m.unsigned_abs();
        let (int, frac) = (abs / 1_000_000, abs % 1_000_000);
        // Weight 1, 0, -1, -2: the fraction's six digits fill two base-10000 digits.
        let digits = [int / 10_000, int % 10_000, frac / 100, (frac % 100) * 100];
        let first = digits.iter().position(|&d| d != 0);
        let last = digits.iter().rposition(|&d| d != 0);
        let (sign, weight, used): (u16, i16, &[u64]) = match (first, last) {
            (Some(f), Some(l)) => (if m < 0 { 0x4000 } else { 0 }, 1 - f as i16, &digits[f..=l]),
            _ => (0, 0, &[]),
        };
        out.put_i16(used.len() as i16);
        out.put_i16(weight);
        out.put_u16(sign);
        out.put_u16(6);
        for &d in used {
            out.put_i16(d as i16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Micros;

    fn enc(m: i64) -> Vec<i16> {
        let mut b = bytes::BytesMut::new();
        Micros(m).encode(&mut b);
        b.chunks(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect()
    }

    #[test]
    fn costs_encode_as_postgres_numeric() {
        // [ndigits, weight, sign, dscale, digits...]
        assert_eq!(enc(0), [0, 0, 0, 6]);
        assert_eq!(enc(1), [1, -2, 0, 6, 100]); // 0.000001 = 0.0000|0100
        assert_eq!(enc(1_000_000), [1, 0, 0, 6, 1]); // 1
        assert_eq!(enc(123_456_789), [3, 0, 0, 6, 123, 4567, 8900]); // 123.456789
        assert_eq!(enc(-5_000), [1, -1, 0x4000, 6, 50]); // -0.005
        assert_eq!(enc(10_000_000_000), [1, 1, 0, 6, 1]); // 10000
        assert_eq!(enc(999_999_999_999), [4, 1, 0, 6, 99, 9999, 9999, 9900]);
        // Clamped to what numeric(12,6) holds.
        assert_eq!(enc(i64::MAX), enc(999_999_999_999));
        assert_eq!(enc(i64::MIN)[..4], [4, 1, 0x4000, 6]);
    }
}
