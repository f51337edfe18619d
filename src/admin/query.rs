//! Query strings of admin requests: percent-decoding and the usage report's parameters.
//!
//! Owns turning `?from=…&to=…&by=…` into typed values with the same parsers the CLI's
//! `usage report` flags use (`db::report`). It does not run the report.

use chrono::{DateTime, Utc};

use super::error::AdminError;
use crate::db::report::{self, GroupBy};

/// `GET /admin/v1/orgs/{slug}/usage`'s parameters; absent ones take the report's defaults.
#[derive(Debug, PartialEq)]
pub struct UsageQuery {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub by: GroupBy,
}

impl UsageQuery {
    pub fn parse(query: Option<&str>) -> Result<Self, AdminError> {
        let mut q = UsageQuery {
            from: None,
            to: None,
            by: GroupBy::Day,
        };
        let mut seen = Vec::new();
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(name)?;
            if seen.contains(&name) {
                return Err(AdminError::Invalid(format!("query parameter `{name}` is given twice")));
            }
            let value = decode(raw)?;
            let bad = |m: String| AdminError::Invalid(format!("query parameter `{name}`: {m}"));
            match name.as_str() {
                "from" => q.from = Some(report::parse_from(&value).map_err(bad)?),
                "to" => q.to = Some(report::parse_to(&value).map_err(bad)?),
                "by" => q.by = value.parse().map_err(bad)?,
                _ => {
                    return Err(AdminError::Invalid(format!(
                        "unknown query parameter `{name}` (expected from, to or by)"
                    )))
                }
            }
            seen.push(name);
        }
        Ok(q)
    }
}

/// Percent-decodes one query component. `+` is kept as is rather than read as a space:
/// no parameter here holds a space, and an RFC 3339 offset such as `+02:00` written
/// unencoded then still means what it says.
fn decode(s: &str) -> Result<String, AdminError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| AdminError::Invalid("query string has a malformed %-escape".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| AdminError::Invalid("query string is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_report_parameters_like_the_cli() {
        let q = UsageQuery::parse(Some("from=2024-03-01&to=2024-03-31&by=key")).expect("valid");
        assert_eq!(
            q.from.map(|t| t.to_rfc3339()).as_deref(),
            Some("2024-03-01T00:00:00+00:00")
        );
        // A day as `to` is inclusive, as on the command line.
        assert_eq!(
            q.to.map(|t| t.to_rfc3339()).as_deref(),
            Some("2024-04-01T00:00:00+00:00")
        );
        assert_eq!(q.by, GroupBy::Key);
        let q = UsageQuery::parse(Some("to=2024-03-05T10:00:00%2B02:00")).expect("encoded offset");
        assert_eq!(
            q.to.map(|t| t.to_rfc3339()).as_deref(),
            Some("2024-03-05T08:00:00+00:00")
        );
        let q = UsageQuery::parse(Some("to=2024-03-05T10:00:00+02:00")).expect("raw offset");
        assert_eq!(
            q.to.map(|t| t.to_rfc3339()).as_deref(),
            Some("2024-03-05T08:00:00+00:00")
        );
        assert_eq!(UsageQuery::parse(None).expect("defaults").by, GroupBy::Day);
    }

    #[test]
    fn refuses_unknown_repeated_and_malformed_parameters() {
        for q in [
            "by=week",
            "from=yesterday",
            "group=day",
            "by=day&by=key",
            "from=%zz",
            "by=%ff",
        ] {
            assert!(matches!(UsageQuery::parse(Some(q)), Err(AdminError::Invalid(_))), "{q}");
        }
    }
}
