//! One handler per admin operation: JSON in, a `db` call, JSON out.
//!
//! Owns the request and response shapes. It holds no storage rules: every operation is
//! the same `crate::db` function the CLI calls (key caps, rotation, the report's period
//! and grouping all live there), so the two can never drift apart. Token checks, routing
//! and body limits are `super`'s.

use chrono::Utc;
use http::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::error::AdminError;
use super::query;
use super::routes::{Op, Param};
use crate::config::{units::parse_duration, DatabaseConfig};
use crate::db::{self, keys::KeySpec, orgs, report};
use crate::keys::Environment;
use crate::model::{ApiKey, KeyStatus, Plan};

/// What handlers need: the pool they check connections out of.
pub struct Ctx {
    pub pool: deadpool_postgres::Pool,
    pub db: DatabaseConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateOrg {
    name: String,
    slug: String,
    email: Option<String>,
    plan: Option<String>,
    monthly_request_limit: Option<i64>,
    rate_limit_per_minute: Option<i64>,
    max_api_keys: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateOrg {
    name: Option<String>,
    email: Option<String>,
    plan: Option<String>,
    monthly_request_limit: Option<i64>,
    rate_limit_per_minute: Option<i64>,
    max_api_keys: Option<i64>,
    is_active: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    description: Option<String>,
    environment: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    rate_limit: Option<i64>,
    /// A humantime lifetime such as `90d` or `12h`, as the CLI's `--expires-in`.
    expires_in: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateKey {
    grace: Option<String>,
}

/// Operations that take no fields still refuse a body with any, so a typo is not
/// silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// A key as listed: the stored fields (never the hash or plaintext) plus its status now.
#[derive(Debug, Serialize)]
struct KeyView<'a> {
    #[serde(flatten)]
    key: &'a ApiKey,
    status: KeyStatus,
    display_hint: String,
}

fn view(key: &ApiKey) -> KeyView<'_> {
    KeyView {
        key,
        status: key.status(Utc::now()),
        display_hint: key.display_hint(),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Value, AdminError> {
    serde_json::to_value(v).map_err(|e| {
        tracing::error!(error = %e, "admin API: cannot serialise a response");
        AdminError::Internal
    })
}

/// Parses a JSON body; an empty one counts as `{}` for types that allow it.
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AdminError> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| AdminError::Invalid(format!("request body: {e}")))
}

fn plan(s: Option<&str>) -> Result<Option<Plan>, AdminError> {
    s.map(|p| p.parse().map_err(AdminError::Invalid)).transpose()
}

fn key_id(p: Param<'_>) -> Result<Uuid, AdminError> {
    Uuid::parse_str(p.value()).map_err(|_| AdminError::Invalid(format!("`{}` is not an API key id", p.value())))
}

pub async fn dispatch(
    ctx: &Ctx,
    op: Op,
    param: Param<'_>,
    query: Option<&str>,
    bytes: &[u8],
) -> Result<(StatusCode, Value), AdminError> {
    if op != Op::UsageReport && query.is_some_and(|q| !q.is_empty()) {
        return Err(AdminError::Invalid("this operation takes no query parameters".into()));
    }
    // Bodies are parsed before a connection is checked out, so a bad request is a 400
    // even while the database is down, and holds no pooled connection.
    let conn = || async { db::checkout(&ctx.pool, &ctx.db).await.map_err(AdminError::from) };
    let ok = |v: Value| Ok((StatusCode::OK, v));
    match op {
        Op::CreateOrg => {
            let req: CreateOrg = body(bytes)?;
            let new = orgs::NewOrganization {
                name: req.name,
                slug: req.slug,
                email: req.email,
                // The CLI's default plan.
                plan: plan(req.plan.as_deref())?.unwrap_or(Plan::Free),
                monthly_request_limit: req.monthly_request_limit,
                rate_limit_per_minute: req.rate_limit_per_minute,
                max_api_keys: req.max_api_keys,
            };
            let o = orgs::create(&**conn().await?, &new).await?;
            tracing::info!(target: "keygate::admin", org = %o.slug, id = %o.id, "created organization");
            Ok((StatusCode::CREATED, to_json(&o)?))
        }
        Op::ListOrgs => {
            body::<NoFields>(bytes)?;
            ok(json!({ "organizations": to_json(&orgs::list(&**conn().await?).await?)? }))
        }
        Op::GetOrg => {
            body::<NoFields>(bytes)?;
            ok(to_json(&orgs::get_by_slug(&**conn().await?, param.value()).await?)?)
        }
        Op::UpdateOrg => {
            let req: UpdateOrg = body(bytes)?;
            let u = orgs::OrgUpdate {
                name: req.name,
                email: req.email,
                plan: plan(req.plan.as_deref())?,
                monthly_request_limit: req.monthly_request_limit,
                rate_limit_per_minute: req.rate_limit_per_minute,
                max_api_keys: req.max_api_keys,
                is_active: req.is_active,
            };
            let o = orgs::update(&**conn().await?, param.value(), &u).await?;
            tracing::info!(target: "keygate::admin", org = %o.slug, active = o.is_active, "updated organization");
            ok(to_json(&o)?)
        }
        Op::DisableOrg => {
            body::<NoFields>(bytes)?;
            let o = orgs::disable(&**conn().await?, param.value()).await?;
            tracing::info!(target: "keygate::admin", org = %o.slug, "disabled organization");
            ok(to_json(&o)?)
        }
        Op::CreateKey => {
            let req: CreateKey = body(bytes)?;
            let expires_in = req
                .expires_in
                .as_deref()
                .map(|s| parse_duration(s).map_err(AdminError::Invalid))
                .transpose()?;
            let spec = KeySpec {
                name: req.name,
                description: req.description,
                // The CLI's default environment.
                environment: match req.environment.as_deref() {
                    Some(e) => e.parse::<Environment>().map_err(AdminError::Invalid)?,
                    None => Environment::Test,
                },
                scopes: req.scopes,
                custom_rate_limit: req.rate_limit,
                expires_at: db::keys::expiry(Utc::now(), expires_in)?,
            };
            let (key, secret) = db::keys::create(&mut **conn().await?, param.value(), &spec).await?;
            tracing::info!(target: "keygate::admin", org = param.value(), key_id = %key.id, key = %key.display_hint(), "created API key");
            Ok((
                StatusCode::CREATED,
                json!({ "key": secret.reveal(), "api_key": to_json(&view(&key))? }),
            ))
        }
        Op::ListKeys => {
            body::<NoFields>(bytes)?;
            let client = conn().await?;
            let o = orgs::get_by_slug(&**client, param.value()).await?;
            let all = db::keys::list(&**client, o.id).await?;
            let views: Vec<KeyView<'_>> = all.iter().map(view).collect();
            ok(json!({ "api_keys": to_json(&views)? }))
        }
        Op::RevokeKey => {
            body::<NoFields>(bytes)?;
            let id = key_id(param)?;
            let (k, changed) = db::keys::revoke(&**conn().await?, id).await?;
            tracing::info!(target: "keygate::admin", key_id = %k.id, key = %k.display_hint(), changed, "revoked API key");
            ok(json!({ "api_key": to_json(&view(&k))?, "already_revoked": !changed }))
        }
        Op::RotateKey => {
            let req: RotateKey = body(bytes)?;
            let grace = parse_duration(req.grace.as_deref().unwrap_or(db::keys::DEFAULT_ROTATION_GRACE))
                .map_err(AdminError::Invalid)?;
            let id = key_id(param)?;
            let (old, new, secret) = db::keys::rotate(&mut **conn().await?, id, grace).await?;
            tracing::info!(target: "keygate::admin", key_id = %old.id, new_key_id = %new.id, key = %new.display_hint(), "rotated API key");
            ok(json!({
                "key": secret.reveal(),
                "api_key": to_json(&view(&new))?,
                "previous": to_json(&view(&old))?,
            }))
        }
        Op::UsageReport => {
            body::<NoFields>(bytes)?;
            let q = query::UsageQuery::parse(query)?;
            let (from, to) = report::period(q.from, q.to, Utc::now())?;
            let client = conn().await?;
            let o = orgs::get_by_slug(&**client, param.value()).await?;
            let rows = report::usage(&**client, o.id, from, to, q.by).await?;
            ok(json!({
                "organization": o.slug,
                "from": from.to_rfc3339(),
                "to": to.to_rfc3339(),
                "by": q.by.as_str(),
                "rows": to_json(&rows)?,
            }))
        }
        // Served by `super` without a database; listed here so the match stays total.
        Op::OpenApi => Err(AdminError::Internal),
    }
}
