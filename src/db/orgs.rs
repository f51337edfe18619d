//! Queries for organisations.

use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use super::DbError;
use crate::model::{Organization, Plan};

const COLUMNS: &str = "id, name, slug, email, plan, is_active, monthly_request_limit::bigint,
    rate_limit_per_minute::bigint, max_api_keys::bigint, created_at, updated_at";

#[derive(Debug, Clone)]
pub struct NewOrganization {
    pub name: String,
    pub slug: String,
    pub email: Option<String>,
    pub plan: Plan,
    pub monthly_request_limit: Option<i64>,
    pub rate_limit_per_minute: Option<i64>,
    pub max_api_keys: Option<i64>,
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct OrgUpdate {
    pub name: Option<String>,
    pub email: Option<String>,
    pub plan: Option<Plan>,
    pub monthly_request_limit: Option<i64>,
    pub rate_limit_per_minute: Option<i64>,
    pub max_api_keys: Option<i64>,
    pub is_active: Option<bool>,
}

pub(crate) fn from_row(r: &Row) -> Result<Organization, DbError> {
    let plan: String = r.try_get(4)?;
    Ok(Organization {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        slug: r.try_get(2)?,
        email: r.try_get(3)?,
        plan: plan.parse().map_err(DbError::Invalid)?,
        is_active: r.try_get(5)?,
        monthly_request_limit: r.try_get(6)?,
        rate_limit_per_minute: r.try_get(7)?,
        max_api_keys: r.try_get(8)?,
        created_at: r.try_get(9)?,
        updated_at: r.try_get(10)?,
    })
}

fn check_limits(values: &[(&str, Option<i64>)]) -> Result<(), DbError> {
    for (name, v) in values {
        if let Some(n) = v {
            if *n < 0 || *n > i64::from(i32::MAX) {
                return Err(DbError::Invalid(format!("{name} must be between 0 and {}", i32::MAX)));
            }
        }
    }
    Ok(())
}

fn limit_args(monthly: Option<i64>, rpm: Option<i64>, max_keys: Option<i64>) -> Result<[Option<i32>; 3], DbError> {
    check_limits(&[
        ("monthly request limit", monthly),
        ("rate limit", rpm),
        ("max keys", max_keys),
    ])?;
    // Bounds were checked above, so the narrowing cannot fail.
    let narrow = |v: Option<i64>| v.and_then(|n| i32::try_from(n).ok());
    Ok([narrow(monthly), narrow(rpm), narrow(max_keys)])
}

pub fn validate_slug(slug: &str) -> Result<(), DbError> {
    let ok = !slug.is_empty()
        && slug.len() <= 100
        && slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !slug.starts_with('-')
        && !slug.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(DbError::Invalid(format!(
            "slug `{slug}` must be 1-100 lowercase letters, digits and inner dashes"
        )))
    }
}

pub async fn create(c: &impl GenericClient, o: &NewOrganization) -> Result<Organization, DbError> {
    validate_slug(&o.slug)?;
    if o.name.trim().is_empty() {
        return Err(DbError::Invalid("organization name must not be empty".into()));
    }
    let [monthly, rpm, max_keys] = limit_args(o.monthly_request_limit, o.rate_limit_per_minute, o.max_api_keys)?;
    let sql = format!(
        "INSERT INTO organizations (id, name, slug, email, plan, monthly_request_limit, rate_limit_per_minute, max_api_keys)
         VALUES ($1, $2, $3, $4, $5, COALESCE($6, 10000), COALESCE($7, 60), COALESCE($8, 10))
         ON CONFLICT (slug) DO NOTHING
         RETURNING {COLUMNS}"
    );
    let row = c
        .query_opt(
            &sql,
            &[
                &Uuid::now_v7(),
                &o.name,
                &o.slug,
                &o.email,
                &o.plan.as_str(),
                &monthly,
                &rpm,
                &max_keys,
            ],
        )
        .await?;
    match row {
        Some(r) => from_row(&r),
        None => Err(DbError::OrgExists(o.slug.clone())),
    }
}

pub async fn list(c: &impl GenericClient) -> Result<Vec<Organization>, DbError> {
    let rows = c
        .query(
            &format!("SELECT {COLUMNS} FROM organizations ORDER BY created_at, slug"),
            &[],
        )
        .await?;
    rows.iter().map(from_row).collect()
}

pub async fn find_by_slug(c: &impl GenericClient, slug: &str) -> Result<Option<Organization>, DbError> {
    let row = c
        .query_opt(
            &format!("SELECT {COLUMNS} FROM organizations WHERE slug = $1"),
            &[&slug],
        )
        .await?;
    row.as_ref().map(from_row).transpose()
}

pub async fn get_by_slug(c: &impl GenericClient, slug: &str) -> Result<Organization, DbError> {
    find_by_slug(c, slug)
        .await?
        .ok_or_else(|| DbError::OrgNotFound(slug.to_string()))
}

pub async fn update(c: &impl GenericClient, slug: &str, u: &OrgUpdate) -> Result<Organization, DbError> {
    let [monthly, rpm, max_keys] = limit_args(u.monthly_request_limit, u.rate_limit_per_minute, u.max_api_keys)?;
    if u.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(DbError::Invalid("organization name must not be empty".into()));
    }
    let sql = format!(
        "UPDATE organizations SET
            name = COALESCE($2, name),
            email = COALESCE($3, email),
            plan = COALESCE($4, plan),
            monthly_request_limit = COALESCE($5, monthly_request_limit),
            rate_limit_per_minute = COALESCE($6, rate_limit_per_minute),
            max_api_keys = COALESCE($7, max_api_keys),
            is_active = COALESCE($8, is_active)
         WHERE slug = $1
         RETURNING {COLUMNS}"
    );
    let plan = u.plan.map(Plan::as_str);
    let row = c
        .query_opt(
            &sql,
            &[&slug, &u.name, &u.email, &plan, &monthly, &rpm, &max_keys, &u.is_active],
        )
        .await?;
    row.as_ref()
        .map(from_row)
        .transpose()?
        .ok_or_else(|| DbError::OrgNotFound(slug.to_string()))
}

/// Disables an organisation: every one of its keys is refused (403) from then on. The
/// CLI's `orgs disable` and the admin API's `POST /orgs/{slug}/disable` both land here.
pub async fn disable(c: &impl GenericClient, slug: &str) -> Result<Organization, DbError> {
    let u = OrgUpdate {
        is_active: Some(false),
        ..Default::default()
    };
    update(c, slug, &u).await
}
