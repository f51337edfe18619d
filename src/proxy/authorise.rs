//! The authorisation step: a key's status and its organisation's, and the scopes every
//! rule a router might match the request to requires (`routes`), for every spelling of
//! its path (`path`) and every method it names (`overrides`).
//!
//! It owns the decision, not the rules' matching nor the path's normalization.

use chrono::{DateTime, Utc};
use http::Request;

use super::error::Reject;
use super::overrides;
use super::routes::{covers, Routes};
use crate::model::{AuthRecord, KeyStatus};

/// A request needs the scopes of every rule a router might match it to: its normalized
/// path and that path's lenient reading, each case-sensitively and not, for its own
/// method and every method it names in an override. No spelling of a request reaches a
/// route more cheaply than the route's own.
pub fn authorise<B>(
    rec: &AuthRecord,
    req: &Request<B>,
    lenient: Option<&str>,
    routes: &Routes,
    now: DateTime<Utc>,
) -> Result<(), Reject> {
    match rec.status(now) {
        KeyStatus::Active => {}
        KeyStatus::Revoked => return Err(Reject::KeyRevoked),
        KeyStatus::Expired => return Err(Reject::KeyExpired),
        KeyStatus::Inactive => return Err(Reject::KeyDisabled),
    }
    if !rec.org_active {
        return Err(Reject::OrganizationDisabled);
    }
    if routes.is_empty() {
        return Ok(());
    }
    let granted = rec.scopes();
    let overrides = overrides::method_overrides(req.headers(), req.uri().query());
    for method in std::iter::once(req.method()).chain(&overrides) {
        for path in std::iter::once(req.uri().path()).chain(lenient) {
            let needed = [routes.required(method, path), routes.required_any_case(method, path)];
            if !needed.iter().all(|n| covers(granted, n)) {
                return Err(Reject::MissingScope);
            }
        }
    }
    Ok(())
}
