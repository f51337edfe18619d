//! Usage metering: what one request cost, recorded once, written in batches, never lost.
//!
//! Owns the [`UsageRecord`] (one `api_key_usage` row), the non-blocking hand-off from
//! the request path, the batching writer, the spool that holds rows while PostgreSQL is
//! away, and the token/cost accounting read from response bodies as they stream past.
//! It does not decide what a request is allowed to do, and the SQL lives in `db::usage`.

mod flight;
pub mod fold;
pub mod include_usage;
mod partitions;
mod replay;
mod sink;
mod spill;
pub mod spool;
pub mod usage_chunk;
pub mod writer;

pub use writer::{channel, UsageCounts, UsageSink, UsageStats, UsageWriter};

use std::borrow::Cow;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod meter;

/// One row of `api_key_usage`. Immutable once built: its `id` (UUID v7, made by
/// keygate) and `timestamp` identify it, so a retried or replayed write of the same
/// record can never count twice.
///
/// Built once per proxied request, so what is nearly always a constant (the method,
/// keygate's own error texts) is borrowed, and the client address stays an `IpAddr`
/// until the writer formats it. The spool's JSON is the same as with owned strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub id: Uuid,
    pub api_key_id: Uuid,
    pub organization_id: Uuid,
    /// When the request arrived.
    pub timestamp: DateTime<Utc>,
    /// Path without the query string, at most 255 bytes.
    pub endpoint: String,
    pub method: Cow<'static, str>,
    pub status_code: i32,
    /// From arrival to the last byte of the response (or its failure).
    pub response_time_ms: i32,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub tokens_used: Option<i32>,
    /// Cost in millionths of a US dollar; stored as NUMERIC(12,6) dollars.
    pub cost_micros: Option<i64>,
    pub model: Option<String>,
    pub ip_address: Option<IpAddr>,
    /// At most 500 bytes.
    pub user_agent: Option<String>,
    /// keygate's own code (`rate_limit_exceeded`, …) or the upstream failure class.
    pub error_code: Option<Cow<'static, str>>,
    pub error_message: Option<Cow<'static, str>>,
}

/// Column limits of the seed's schema; values are cut to fit rather than refused.
pub const ENDPOINT_MAX: usize = 255;
pub const USER_AGENT_MAX: usize = 500;
pub const METHOD_MAX: usize = 10;
pub const MODEL_MAX: usize = 255;
pub const ERROR_CODE_MAX: usize = 50;

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("aé", 2), "a");
    }
}
