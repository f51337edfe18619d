//! `keygate usage report` and `keygate usage prune`.

use std::io::Write;

use chrono::{DateTime, Utc};
use clap::{Subcommand, ValueEnum};

use super::{CliError, Format as ListFormat};
use crate::config::Config;
use crate::db::{self, orgs, report, retention};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum By {
    Day,
    Key,
    Endpoint,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum ReportFormat {
    #[default]
    Table,
    Json,
    Csv,
}

#[derive(Debug, Subcommand)]
pub enum UsageAction {
    /// Requests, errors, rate-limited, tokens, cost and latency for an organization.
    Report {
        #[arg(long)]
        org: String,
        /// First day (UTC, YYYY-MM-DD or RFC 3339). Default: the start of this month.
        #[arg(long, value_parser = report::parse_from)]
        from: Option<DateTime<Utc>>,
        /// Last day, inclusive (UTC, YYYY-MM-DD), or an RFC 3339 instant (exclusive).
        /// Default: now.
        #[arg(long, value_parser = report::parse_to)]
        to: Option<DateTime<Utc>>,
        #[arg(long, value_enum, default_value = "day")]
        by: By,
        #[arg(long, value_enum, default_value_t)]
        format: ReportFormat,
    },
    /// Delete usage rows older than a date (whole months are dropped as partitions).
    Prune {
        /// UTC date (YYYY-MM-DD) or RFC 3339 instant; rows before it go.
        #[arg(long, value_parser = report::parse_from)]
        before: DateTime<Utc>,
        /// Report what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(cfg: &Config, action: &UsageAction) -> Result<(), CliError> {
    let mut client = db::connect(&cfg.database).await?;
    db::migrate::ensure_current(&client).await?;
    match action {
        UsageAction::Report {
            org,
            from,
            to,
            by,
            format,
        } => {
            let o = orgs::get_by_slug(&client, org).await?;
            let (from, to) = report::period(*from, *to, Utc::now())?;
            let group = match by {
                By::Day => report::GroupBy::Day,
                By::Key => report::GroupBy::Key,
                By::Endpoint => report::GroupBy::Endpoint,
            };
            let rows = report::usage(&client, o.id, from, to, group).await?;
            eprintln!(
                "usage of `{}` from {} to {} (UTC, end exclusive)",
                o.slug,
                from.to_rfc3339(),
                to.to_rfc3339()
            );
            print_report(*format, by, &rows)?;
        }
        UsageAction::Prune { before, dry_run } => {
            let (outcome, rows_in_dropped) = retention::prune_usage(&mut client, *before, *dry_run).await?;
            let verb = if *dry_run { "would remove" } else { "removed" };
            eprintln!(
                "{verb} {} rows before {}: {} in dropped partitions ({}), {} deleted from partly covered ones",
                rows_in_dropped + outcome.deleted_rows,
                before.to_rfc3339(),
                rows_in_dropped,
                if outcome.dropped_partitions.is_empty() {
                    "none".to_string()
                } else {
                    outcome.dropped_partitions.join(", ")
                },
                outcome.deleted_rows
            );
        }
    }
    Ok(())
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

fn print_report(format: ReportFormat, by: &By, rows: &[report::ReportRow]) -> Result<(), CliError> {
    let head = match by {
        By::Day => "DAY",
        By::Key => "KEY",
        By::Endpoint => "ENDPOINT",
    };
    let header = [
        head,
        "REQUESTS",
        "ERRORS",
        "RATE-LIMITED",
        "TOKENS",
        "COST-USD",
        "P50-MS",
        "P95-MS",
    ];
    let cells = |r: &report::ReportRow| {
        vec![
            r.group.clone(),
            r.requests.to_string(),
            r.errors.to_string(),
            r.rate_limited.to_string(),
            r.tokens.to_string(),
            r.cost_usd.clone(),
            ms(r.p50_ms),
            ms(r.p95_ms),
        ]
    };
    match format {
        ReportFormat::Json => super::output::print(ListFormat::Json, &header, Vec::new(), rows),
        ReportFormat::Table => super::output::print(ListFormat::Table, &header, rows.iter().map(cells).collect(), rows),
        ReportFormat::Csv => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", header.join(",").to_ascii_lowercase())?;
            for r in rows {
                let line: Vec<String> = cells(r).into_iter().map(|c| csv_field(&c)).collect();
                writeln!(out, "{}", line.join(","))?;
            }
            Ok(())
        }
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
