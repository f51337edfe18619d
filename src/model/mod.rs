//! The domain records keygate works with: organisations, plans and keys.
//!
//! Plain data with the rules that need no I/O (a key's status at an instant). How they
//! are stored is `db`'s business; how they are cached is the proxy's. The compact
//! authentication record the cache holds is in `auth_record`, the interner it shares
//! prefixes and scopes through in `intern`, an address's text in `ip_text`.

mod auth_record;
pub mod intern;
pub mod ip_text;

#[cfg(test)]
pub(crate) use auth_record::test_fields;
pub use auth_record::{AuthFields, AuthRecord};

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    Free,
    Pro,
    Enterprise,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
        }
    }
}

impl FromStr for Plan {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "free" => Ok(Plan::Free),
            "pro" => Ok(Plan::Pro),
            "enterprise" => Ok(Plan::Enterprise),
            other => Err(format!("unknown plan `{other}` (expected free, pro or enterprise)")),
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Organization {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    pub email: Option<String>,
    pub plan: Plan,
    pub is_active: bool,
    pub monthly_request_limit: i64,
    pub rate_limit_per_minute: i64,
    pub max_api_keys: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A key as operators see it: never the hash, never the plaintext.
#[derive(Debug, Clone, Serialize)]
pub struct ApiKey {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub key_prefix: String,
    pub key_hint: String,
    pub name: String,
    pub description: Option<String>,
    pub environment: String,
    pub is_active: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub scopes: Vec<String>,
    pub custom_rate_limit: Option<i64>,
    pub total_requests: i64,
    pub last_used_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub replaced_by: Option<Uuid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Inactive,
    Revoked,
    Expired,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Inactive => "inactive",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }
}

/// The status rule shared by the CLI listing and the proxy: revoked beats expired
/// beats inactive.
pub fn key_status(
    revoked_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    is_active: bool,
    now: DateTime<Utc>,
) -> KeyStatus {
    if revoked_at.is_some_and(|t| t <= now) {
        KeyStatus::Revoked
    } else if expires_at.is_some_and(|t| t <= now) {
        KeyStatus::Expired
    } else if !is_active {
        KeyStatus::Inactive
    } else {
        KeyStatus::Active
    }
}

impl ApiKey {
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        key_status(self.revoked_at, self.expires_at, self.is_active, now)
    }

    /// `pk_test_…zh3g`: how a key is named to people and in logs.
    pub fn display_hint(&self) -> String {
        format!("{}…{}", self.key_prefix, self.key_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn status_precedence() {
        let now = Utc::now();
        let past = Some(now - Duration::seconds(1));
        let future = Some(now + Duration::seconds(60));
        assert_eq!(key_status(None, None, true, now), KeyStatus::Active);
        assert_eq!(key_status(None, future, true, now), KeyStatus::Active);
        assert_eq!(key_status(None, past, true, now), KeyStatus::Expired);
        assert_eq!(key_status(past, past, false, now), KeyStatus::Revoked);
        assert_eq!(key_status(None, None, false, now), KeyStatus::Inactive);
        assert_eq!(key_status(None, past, false, now), KeyStatus::Expired);
    }

    #[test]
    fn plans_round_trip() {
        for p in [Plan::Free, Plan::Pro, Plan::Enterprise] {
            assert_eq!(p.as_str().parse::<Plan>(), Ok(p));
        }
        assert!("gold".parse::<Plan>().is_err());
    }
}
