//! The command line: argument parsing and dispatch to one handler per subcommand.
//!
//! Owns what operators type and read. It holds no business rules: handlers call `db`
//! and the proxy, and every failure comes back as one [`CliError`] printed on one line.

/// Opt-in (`--features mimalloc`): 7–9% less CPU per proxied request than glibc's
/// malloc in benches/load.sh, for about 10 MB more RSS (docs/performance.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod healthcheck;
mod logging;
mod migrate;
mod output;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, ConfigError};
use crate::db::DbError;

#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version,
    about = "API-key gateway: auth, rate limits, quotas and usage metering"
)]
pub struct Cli {
    /// The TOML config file. Admin commands can run on DATABASE_URL alone.
    #[arg(long, short, global = true, env = "KEYGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log output format (overrides [log] format).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve {
        /// Apply pending migrations first (under the advisory lock, so replicas that
        /// all do this are safe); for single-replica and compose setups.
        #[arg(long, env = "KEYGATE_MIGRATE")]
        migrate: bool,
    },
    /// Run the OpenAI-compatible demo chat upstream (for the quick start and tests).
    DemoUpstream(crate::demo::DemoArgs),
    /// Probe a running keygate: exit 0 if /healthz (or /readyz) answers 200.
    Healthcheck {
        /// Full URL to probe; default: the admin listener from the config.
        #[arg(long)]
        url: Option<String>,
        /// Probe /readyz instead of /healthz.
        #[arg(long)]
        ready: bool,
        #[arg(long, default_value = "2s", value_parser = crate::config::units::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Validate the config file and exit.
    CheckConfig,
    /// Apply, roll back or list schema migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Create the default organization and test key, once (as the seed scripts did).
    Seed {
        /// Scopes for the seeded key.
        #[arg(long, value_delimiter = ',', default_value = "chat")]
        scopes: Vec<String>,
    },
    /// Manage organizations.
    Orgs {
        #[command(subcommand)]
        action: admin::OrgsAction,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        action: admin::KeysAction,
    },
    /// Report on and prune usage records.
    Usage {
        #[command(subcommand)]
        action: usage::UsageAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Roll back the newest migrations.
    Down {
        /// How many to roll back.
        #[arg(long, default_value_t = 1, conflicts_with = "all")]
        steps: usize,
        /// Roll back every migration, dropping keygate's tables.
        #[arg(long)]
        all: bool,
    },
    /// List applied and pending migrations.
    Status,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Serve(crate::proxy::ServeError),
}

impl Cli {
    /// The config from `--config`, or defaults plus DATABASE_URL when no file is given.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        match &self.config {
            Some(path) => Config::load(path),
            None => Config::from_env(&|name| std::env::var(name).ok()),
        }
    }
}

/// Runs a parsed command line and maps the outcome to an exit code.
pub fn main(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::Serve { migrate } => {
            let cfg = cli.load_config()?;
            let format = match cli.log_format {
                Some(LogFormatArg::Json) => crate::config::LogFormat::Json,
                Some(LogFormatArg::Text) => crate::config::LogFormat::Text,
                None => cfg.log.format,
            };
            // Held until serving is over: dropping it writes out the buffered lines.
            let _log = logging::init(format, &cfg.log.level, true);
            if *migrate {
                let mut client = crate::db::connect(&cfg.database).await?;
                for step in crate::db::migrate::up(&mut client).await? {
                    tracing::info!(version = step.version, name = step.name, outcome = ?step.outcome, "migration");
                }
            }
            crate::proxy::serve(cfg, cli.config.clone(), crate::proxy::shutdown_signal())
                .await
                .map_err(CliError::Serve)
        }
        Command::DemoUpstream(args) => {
            let _log = logging::init(crate::config::LogFormat::Text, "info", false);
            crate::demo::run(args.clone(), crate::proxy::shutdown_signal())
                .await
                .map_err(CliError::Io)
        }
        Command::Healthcheck { url, ready, timeout } => {
            let _log = logging::init(crate::config::LogFormat::Text, "warn", false);
            // Without a config file the probe still works from --url, or the defaults.
            let cfg = match (&cli.config, url) {
                (None, Some(_)) | (None, None) => Config::from_env(&|n| {
                    std::env::var(n)
                        .ok()
                        .or_else(|| (n == crate::config::DATABASE_URL_ENV).then(|| "postgres://unused/x".into()))
                })?,
                _ => cli.load_config()?,
            };
            healthcheck::run(&cfg, url.as_deref(), *ready, *timeout).await
        }
        Command::CheckConfig => {
            let _log = logging::init(crate::config::LogFormat::Text, "warn", false);
            let path = cli
                .config
                .as_ref()
                .ok_or_else(|| CliError::Usage("check-config needs --config FILE".into()))?;
            let cfg = Config::load(path)?;
            cfg.upstream()?;
            eprintln!("{}: ok", path.display());
            Ok(())
        }
        Command::Migrate { action } => {
            let _log = logging::init(crate::config::LogFormat::Text, "warn", false);
            migrate::run(&cli.load_config()?, action).await
        }
        Command::Seed { scopes } => {
            let _log = logging::init(crate::config::LogFormat::Text, "warn", false);
            migrate::seed(&cli.load_config()?, scopes).await
        }
        Command::Orgs { action } => {
            let _log = logging::init(crate::config::LogFormat::Text, "warn", false);
            admin::orgs(&cli.load_config()?, action).await
        }
        Command::Keys { action } => {
            let _log = logging::init(crate::config::LogFormat::Text, "warn", false);
            admin::keys(&cli.load_config()?, action).await
        }
        Command::Usage { action } => {
            let _log = logging::init(crate::config::LogFormat::Text, "warn", false);
            usage::run(&cli.load_config()?, action).await
        }
    }
}
