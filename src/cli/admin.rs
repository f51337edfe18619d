//! `keygate orgs …` and `keygate keys …`: what an operator does by hand.
//!
//! Plaintext keys go to stdout alone, once; everything meant for people goes to stderr,
//! so `KEY=$(keygate keys create …)` captures exactly the key.

use std::time::Duration;

use clap::Subcommand;
use uuid::Uuid;

use super::{output, CliError, Format};
use crate::config::{units::parse_duration, Config};
use crate::db::{self, keys::KeySpec, orgs};
use crate::keys::Environment;
use crate::model::Plan;

#[derive(Debug, Subcommand)]
pub enum OrgsAction {
    /// Create an organization.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        slug: String,
        #[arg(long)]
        email: Option<String>,
        #[arg(long, default_value = "free", value_parser = parse_plan)]
        plan: Plan,
        /// Requests a calendar month (UTC). Default 10000.
        #[arg(long)]
        monthly_limit: Option<i64>,
        /// Requests a minute per key, unless the key has its own. Default 60.
        #[arg(long)]
        rate_limit: Option<i64>,
        /// Keys that may be usable at once. Default 10.
        #[arg(long)]
        max_keys: Option<i64>,
    },
    /// List organizations.
    List {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Change an organization's name, email, plan or limits.
    Update {
        slug: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        email: Option<String>,
        #[arg(long, value_parser = parse_plan)]
        plan: Option<Plan>,
        #[arg(long)]
        monthly_limit: Option<i64>,
        #[arg(long)]
        rate_limit: Option<i64>,
        #[arg(long)]
        max_keys: Option<i64>,
        /// Re-enable a disabled organization.
        #[arg(long)]
        enable: bool,
    },
    /// Disable an organization: every one of its keys is refused (403).
    Disable { slug: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create a key and print it, once, on stdout.
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, default_value = "test", value_parser = parse_env)]
        env: Environment,
        /// Comma-separated scopes, e.g. chat,admin.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Requests a minute for this key, instead of the organization's.
        #[arg(long)]
        rate_limit: Option<i64>,
        /// Lifetime, e.g. 90d or 12h.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
    },
    /// List an organization's keys (hints only; never a key or hash).
    List {
        #[arg(long)]
        org: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Revoke a key at once.
    Revoke { id: Uuid },
    /// Issue a successor key; the old one keeps working for the grace period.
    Rotate {
        id: Uuid,
        #[arg(long, value_parser = parse_duration, default_value = db::keys::DEFAULT_ROTATION_GRACE)]
        grace: Duration,
    },
}

fn parse_plan(s: &str) -> Result<Plan, String> {
    s.parse()
}

fn parse_env(s: &str) -> Result<Environment, String> {
    s.parse()
}

async fn session(cfg: &Config) -> Result<tokio_postgres::Client, CliError> {
    let client = db::connect(&cfg.database).await?;
    db::migrate::ensure_current(&client).await?;
    Ok(client)
}

pub async fn orgs(cfg: &Config, action: &OrgsAction) -> Result<(), CliError> {
    let client = session(cfg).await?;
    match action {
        OrgsAction::Create {
            name,
            slug,
            email,
            plan,
            monthly_limit,
            rate_limit,
            max_keys,
        } => {
            let new = orgs::NewOrganization {
                name: name.clone(),
                slug: slug.clone(),
                email: email.clone(),
                plan: *plan,
                monthly_request_limit: *monthly_limit,
                rate_limit_per_minute: *rate_limit,
                max_api_keys: *max_keys,
            };
            let o = orgs::create(&client, &new).await?;
            eprintln!(
                "created organization `{}` ({}): plan {}, {} requests/month, {}/minute, up to {} keys",
                o.slug, o.id, o.plan, o.monthly_request_limit, o.rate_limit_per_minute, o.max_api_keys
            );
        }
        OrgsAction::List { format } => {
            let all = orgs::list(&client).await?;
            let rows = all
                .iter()
                .map(|o| {
                    vec![
                        o.slug.clone(),
                        o.name.clone(),
                        o.plan.to_string(),
                        if o.is_active { "active" } else { "disabled" }.into(),
                        o.monthly_request_limit.to_string(),
                        o.rate_limit_per_minute.to_string(),
                        o.max_api_keys.to_string(),
                        o.email.clone().unwrap_or_else(|| "-".into()),
                        o.id.to_string(),
                    ]
                })
                .collect();
            output::print(
                *format,
                &[
                    "SLUG", "NAME", "PLAN", "STATUS", "MONTHLY", "PER-MIN", "MAX-KEYS", "EMAIL", "ID",
                ],
                rows,
                &all,
            )?;
        }
        OrgsAction::Update {
            slug,
            name,
            email,
            plan,
            monthly_limit,
            rate_limit,
            max_keys,
            enable,
        } => {
            let u = orgs::OrgUpdate {
                name: name.clone(),
                email: email.clone(),
                plan: *plan,
                monthly_request_limit: *monthly_limit,
                rate_limit_per_minute: *rate_limit,
                max_api_keys: *max_keys,
                is_active: enable.then_some(true),
            };
            let o = orgs::update(&client, slug, &u).await?;
            eprintln!(
                "updated organization `{}`: plan {}, {} requests/month, {}/minute, up to {} keys, {}",
                o.slug,
                o.plan,
                o.monthly_request_limit,
                o.rate_limit_per_minute,
                o.max_api_keys,
                if o.is_active { "active" } else { "disabled" }
            );
        }
        OrgsAction::Disable { slug } => {
            orgs::disable(&client, slug).await?;
            eprintln!("disabled organization `{slug}`: its keys are now refused");
        }
    }
    Ok(())
}

pub async fn keys(cfg: &Config, action: &KeysAction) -> Result<(), CliError> {
    let mut client = session(cfg).await?;
    let now = chrono::Utc::now();
    match action {
        KeysAction::Create {
            org,
            name,
            description,
            env,
            scopes,
            rate_limit,
            expires_in,
        } => {
            let expires_at = db::keys::expiry(now, *expires_in)?;
            let spec = KeySpec {
                name: name.clone(),
                description: description.clone(),
                environment: *env,
                scopes: scopes.clone(),
                custom_rate_limit: *rate_limit,
                expires_at,
            };
            let (key, secret) = db::keys::create(&mut client, org, &spec).await?;
            eprintln!(
                "created key {} ({}) \"{}\" for `{org}`; it is shown once, below:",
                key.id,
                key.display_hint(),
                key.name
            );
            println!("{}", secret.reveal());
        }
        KeysAction::List { org, format } => {
            let o = orgs::get_by_slug(&client, org).await?;
            let all = db::keys::list(&client, o.id).await?;
            let rows = all
                .iter()
                .map(|k| {
                    vec![
                        k.id.to_string(),
                        k.name.clone(),
                        k.display_hint(),
                        k.environment.clone(),
                        k.status(now).as_str().into(),
                        output::time(k.expires_at),
                        output::time(k.last_used_at),
                        if k.scopes.is_empty() {
                            "-".into()
                        } else {
                            k.scopes.join(",")
                        },
                        k.custom_rate_limit.map_or_else(|| "-".into(), |n| n.to_string()),
                    ]
                })
                .collect();
            output::print(
                *format,
                &[
                    "ID",
                    "NAME",
                    "KEY",
                    "ENV",
                    "STATUS",
                    "EXPIRES",
                    "LAST-USED",
                    "SCOPES",
                    "PER-MIN",
                ],
                rows,
                &all,
            )?;
        }
        KeysAction::Revoke { id } => {
            let (k, changed) = db::keys::revoke(&client, *id).await?;
            if changed {
                eprintln!("revoked key {} ({})", k.id, k.display_hint());
            } else {
                eprintln!("key {} ({}) was already revoked", k.id, k.display_hint());
            }
        }
        KeysAction::Rotate { id, grace } => {
            let (old, new, secret) = db::keys::rotate(&mut client, *id, *grace).await?;
            eprintln!(
                "rotated key {} ({}): it stops working at {}; the new key {} ({}) is shown once, below:",
                old.id,
                old.display_hint(),
                output::time(old.expires_at),
                new.id,
                new.display_hint()
            );
            println!("{}", secret.reveal());
        }
    }
    Ok(())
}
