//! [`AuthRecord`], the compact form of a key joined with its organisation that the auth
//! cache holds for every key, and [`AuthFields`], the row it is built from.
//!
//! Owns the record's layout and the exact conversions into it. Why compact: the cache
//! holds one per key, a million of them at the memory target (docs/performance.md,
//! section 5). The record is `Copy` and has no heap allocation of its own: the prefix
//! and scopes are interned (`intern`), the hint is inline, and the limits are the
//! columns' `integer` width. Nothing the database can hold is lost: times keep chrono's
//! type, limits beyond `i32` (possible only on an adopted schema whose columns are
//! `bigint`) saturate, and a hint that does not fit inline goes to the interner.

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::intern::{intern, KeyClass};
use super::{key_status, KeyStatus, Plan};

/// Bytes of a hint kept inline. keygate's hints are 4 ASCII characters; the column
/// allows 8 characters, which in ASCII still fit.
const INLINE_HINT: usize = 8;

/// A database row's columns, as the query gives them, to build an [`AuthRecord`] from.
#[derive(Debug, Clone)]
pub struct AuthFields<'a, S> {
    pub key_id: Uuid,
    pub organization_id: Uuid,
    pub key_prefix: &'a str,
    pub key_hint: &'a str,
    pub key_active: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub scopes: &'a [S],
    pub custom_rate_limit: Option<i64>,
    pub org_active: bool,
    pub plan: Plan,
    pub org_rate_limit_per_minute: i64,
    pub monthly_request_limit: i64,
}

/// Everything the proxy needs to decide on a request: the key joined with its
/// organisation, as one row. Loaded by digest; cached by the proxy, which hands out
/// copies (about a hundred bytes, no refcount).
#[derive(Clone, Copy)]
pub struct AuthRecord {
    pub key_id: Uuid,
    pub organization_id: Uuid,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    class: &'static KeyClass,
    /// The hint's bytes, zero-padded: PostgreSQL text cannot hold NUL, so the first zero
    /// ends it. Unused (all zero) when the hint lives in `class`.
    hint: [u8; INLINE_HINT],
    custom_rate_limit: Option<i32>,
    org_rate_limit_per_minute: i32,
    monthly_request_limit: i32,
    pub key_active: bool,
    pub org_active: bool,
    pub plan: Plan,
}

/// The columns are `integer`, so this is exact for every value a migrated database holds;
/// an adopted `bigint` column's larger values saturate rather than wrap.
fn narrow(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(if v < 0 { i32::MIN } else { i32::MAX })
}

impl AuthRecord {
    pub fn new<S: AsRef<str>>(f: AuthFields<'_, S>) -> Self {
        let mut hint = [0u8; INLINE_HINT];
        let inline = f.key_hint.len() <= INLINE_HINT && !f.key_hint.contains('\0');
        if inline {
            hint[..f.key_hint.len()].copy_from_slice(f.key_hint.as_bytes());
        }
        AuthRecord {
            key_id: f.key_id,
            organization_id: f.organization_id,
            expires_at: f.expires_at,
            revoked_at: f.revoked_at,
            class: intern(f.key_prefix, f.scopes, (!inline).then_some(f.key_hint)),
            hint,
            custom_rate_limit: f.custom_rate_limit.map(narrow),
            org_rate_limit_per_minute: narrow(f.org_rate_limit_per_minute),
            monthly_request_limit: narrow(f.monthly_request_limit),
            key_active: f.key_active,
            org_active: f.org_active,
            plan: f.plan,
        }
    }

    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        key_status(self.revoked_at, self.expires_at, self.key_active, now)
    }

    /// Requests per minute for this key: its own limit, else its organisation's.
    pub fn rate_limit_per_minute(&self) -> i64 {
        i64::from(self.custom_rate_limit.unwrap_or(self.org_rate_limit_per_minute))
    }

    pub fn custom_rate_limit(&self) -> Option<i64> {
        self.custom_rate_limit.map(i64::from)
    }

    pub fn org_rate_limit_per_minute(&self) -> i64 {
        i64::from(self.org_rate_limit_per_minute)
    }

    pub fn monthly_request_limit(&self) -> i64 {
        i64::from(self.monthly_request_limit)
    }

    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.expires_at
    }

    pub fn revoked_at(&self) -> Option<DateTime<Utc>> {
        self.revoked_at
    }

    /// The scopes as stored, in order. Shared by every key with the same set.
    pub fn scopes(&self) -> &'static [Box<str>] {
        &self.class.scopes
    }

    /// [`Self::scopes`] joined with commas, made once per distinct set.
    pub fn scopes_joined(&self) -> &'static str {
        &self.class.scopes_joined
    }

    pub fn key_prefix(&self) -> &'static str {
        &self.class.prefix
    }

    /// The last characters of the key, as shown to operators (never the key itself).
    pub fn key_hint(&self) -> &str {
        if let Some(long) = self.class.long_hint.as_deref() {
            return long;
        }
        let len = self.hint.iter().position(|&b| b == 0).unwrap_or(INLINE_HINT);
        // Copied whole from a `&str`, so always UTF-8; the fallback is unreachable.
        self.hint
            .get(..len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or_default()
    }

    /// `pk_test_…zh3g`: how the key is named in logs, formatted without allocating.
    pub fn display_hint(&self) -> impl fmt::Display + '_ {
        DisplayHint(self)
    }
}

struct DisplayHint<'a>(&'a AuthRecord);

impl fmt::Display for DisplayHint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…{}", self.0.key_prefix(), self.0.key_hint())
    }
}

impl fmt::Debug for AuthRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only what operators already see: the hint, never key material.
        f.debug_struct("AuthRecord")
            .field("key_id", &self.key_id)
            .field("organization_id", &self.organization_id)
            .field("key", &format_args!("{}", self.display_hint()))
            .field("key_active", &self.key_active)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at)
            .field("scopes", &self.scopes())
            .field("custom_rate_limit", &self.custom_rate_limit)
            .field("org_active", &self.org_active)
            .field("plan", &self.plan)
            .field("org_rate_limit_per_minute", &self.org_rate_limit_per_minute)
            .field("monthly_request_limit", &self.monthly_request_limit)
            .finish()
    }
}

/// An active pro key of an active organisation, for tests across the crate.
#[cfg(test)]
pub(crate) fn test_fields<'a>(hint: &'a str, scopes: &'a [&'a str]) -> AuthFields<'a, &'a str> {
    AuthFields {
        key_id: Uuid::new_v4(),
        organization_id: Uuid::new_v4(),
        key_prefix: "pk_test_",
        key_hint: hint,
        key_active: true,
        expires_at: None,
        revoked_at: None,
        scopes,
        custom_rate_limit: None,
        org_active: true,
        plan: Plan::Pro,
        org_rate_limit_per_minute: 60,
        monthly_request_limit: 10_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_exact() {
        assert!(
            std::mem::size_of::<AuthRecord>() <= 104,
            "{}",
            std::mem::size_of::<AuthRecord>()
        );
        let at = DateTime::from_timestamp(1_700_000_000, 123_456_789);
        let r = AuthRecord::new(AuthFields {
            expires_at: at,
            revoked_at: None,
            custom_rate_limit: Some(7),
            ..test_fields("zh3g", &["chat", "embed"])
        });
        assert_eq!((r.key_hint(), r.key_prefix()), ("zh3g", "pk_test_"));
        assert_eq!(r.display_hint().to_string(), "pk_test_…zh3g");
        assert_eq!(r.expires_at(), at, "nanoseconds survive");
        assert_eq!(r.scopes().iter().map(|s| &**s).collect::<Vec<_>>(), ["chat", "embed"]);
        assert_eq!((r.custom_rate_limit(), r.rate_limit_per_minute()), (Some(7), 7));
        assert_eq!((r.org_rate_limit_per_minute(), r.monthly_request_limit()), (60, 10_000));
        let dbg = format!("{r:?}");
        assert!(dbg.contains("pk_test_…zh3g") && dbg.contains("chat"), "{dbg}");
    }

    #[test]
    fn hints_of_any_length_survive() {
        for hint in ["", "a", "abcdefgh", "abcdefghi", "ünïcødé!", "a\0b"] {
            assert_eq!(AuthRecord::new(test_fields(hint, &[])).key_hint(), hint);
        }
    }

    #[test]
    fn wide_limits_saturate_instead_of_wrapping() {
        let r = AuthRecord::new(AuthFields {
            custom_rate_limit: Some(-5_000_000_000),
            org_rate_limit_per_minute: i64::from(i32::MAX),
            monthly_request_limit: 5_000_000_000,
            ..test_fields("abcd", &[])
        });
        assert_eq!(r.custom_rate_limit(), Some(i64::from(i32::MIN)));
        assert_eq!(r.org_rate_limit_per_minute(), i64::from(i32::MAX));
        assert_eq!(r.monthly_request_limit(), i64::from(i32::MAX));
    }

    #[test]
    fn keys_with_the_same_scopes_share_them() {
        let a = AuthRecord::new(test_fields("aaaa", &["chat"]));
        let b = AuthRecord::new(test_fields("bbbb", &["chat"]));
        assert!(std::ptr::eq(a.scopes(), b.scopes()));
    }
}
