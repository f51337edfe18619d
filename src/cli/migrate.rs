//! `keygate migrate …` and `keygate seed`.

use std::io::Write;

use super::{output, CliError, MigrateAction};
use crate::config::Config;
use crate::db::{self, keys::KeySpec, migrate::Outcome, orgs};
use crate::keys::Environment;
use crate::model::Plan;

pub async fn run(cfg: &Config, action: &MigrateAction) -> Result<(), CliError> {
    let mut client = db::connect(&cfg.database).await?;
    match action {
        MigrateAction::Up => {
            let steps = db::migrate::up(&mut client).await?;
            if steps.is_empty() {
                eprintln!("schema is up to date (version {})", db::migrate::latest_version());
            }
            for s in steps {
                let verb = if s.outcome == Outcome::Adopted {
                    "adopted existing"
                } else {
                    "applied"
                };
                eprintln!("{verb} {:04}_{}", s.version, s.name);
            }
        }
        MigrateAction::Down { steps, all } => {
            let n = if *all { usize::MAX } else { *steps };
            let done = db::migrate::down(&mut client, n).await?;
            if done.is_empty() {
                eprintln!("no migrations applied; nothing to roll back");
            }
            for s in done {
                eprintln!("rolled back {:04}_{}", s.version, s.name);
            }
        }
        MigrateAction::Status => {
            let rows = db::migrate::status(&client).await?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:<8}  {:<12}  {:<8}  applied at", "version", "name", "state")?;
            for r in rows {
                let state = match (r.applied_at.is_some(), r.unknown, r.modified, r.adopted) {
                    (_, true, _, _) => "unknown",
                    (true, _, true, _) => "modified",
                    (true, _, _, true) => "adopted",
                    (true, _, _, _) => "applied",
                    (false, ..) => "pending",
                };
                writeln!(
                    out,
                    "{:<8}  {:<12}  {:<8}  {}",
                    format!("{:04}", r.version),
                    r.name,
                    state,
                    output::time(r.applied_at)
                )?;
            }
        }
    }
    Ok(())
}

const SEED_ORG_SLUG: &str = "default";
const SEED_ORG_NAME: &str = "Default Organization";
const SEED_KEY_NAME: &str = "Default Test Key";

/// Creates whatever of the seed data is missing, under a transaction-scoped advisory
/// lock so two seeds at once cannot both create. Prints a key only when it makes one.
pub async fn seed(cfg: &Config, scopes: &[String]) -> Result<(), CliError> {
    let mut client = db::connect(&cfg.database).await?;
    db::migrate::ensure_current(&client).await?;
    let tx = client.transaction().await.map_err(db::DbError::from)?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('keygate-seed'))", &[])
        .await
        .map_err(db::DbError::from)?;
    let (org, org_created) = match orgs::find_by_slug(&tx, SEED_ORG_SLUG).await? {
        Some(o) => (o, false),
        None => {
            let new = orgs::NewOrganization {
                name: SEED_ORG_NAME.into(),
                slug: SEED_ORG_SLUG.into(),
                email: None,
                plan: Plan::Free,
                monthly_request_limit: None,
                rate_limit_per_minute: None,
                max_api_keys: None,
            };
            (orgs::create(&tx, &new).await?, true)
        }
    };
    let has_key = db::keys::list(&tx, org.id)
        .await?
        .iter()
        .any(|k| k.name == SEED_KEY_NAME);
    let created_key = if has_key {
        None
    } else {
        let spec = KeySpec {
            name: SEED_KEY_NAME.into(),
            description: Some("Created by keygate seed".into()),
            environment: Environment::Test,
            scopes: scopes.to_vec(),
            custom_rate_limit: None,
            expires_at: None,
        };
        Some(db::keys::insert_unchecked(&tx, org.id, &spec).await?)
    };
    tx.commit().await.map_err(db::DbError::from)?;
    if org_created {
        eprintln!(
            "created organization `{}` ({}, plan {}, {} requests/month, {}/minute)",
            org.slug, org.name, org.plan, org.monthly_request_limit, org.rate_limit_per_minute
        );
    }
    match created_key {
        Some((key, secret)) => {
            eprintln!(
                "created key {} ({}) \"{}\"; it is shown once, below:",
                key.id,
                key.display_hint(),
                key.name
            );
            println!("{}", secret.reveal());
        }
        None => eprintln!(
            "already seeded: organization `{SEED_ORG_SLUG}` and key \"{SEED_KEY_NAME}\" exist; nothing created"
        ),
    }
    Ok(())
}
