//! Configuration: one TOML file, `${VAR}` interpolation, validated once into typed values.
//!
//! Owns loading, defaults and validation. It does not own what the values mean at run
//! time; each subsystem takes its typed section. Every error names the offending key.

mod interpolate;
mod raw;
mod tls;
pub mod units;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Uri};

pub use raw::RawConfig;
pub use tls::TlsSettings;
pub use validate::log_filter;

/// The environment variable that overrides `[database] url`.
pub const DATABASE_URL_ENV: &str = "DATABASE_URL";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("no database configured: pass --config FILE with [database] url, or set DATABASE_URL")]
    NoDatabase,
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// Required to serve; admin commands run without it.
    pub upstream: Option<UpstreamConfig>,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub identity_headers: IdentityHeaders,
    pub routes: Vec<RouteRule>,
    pub log: LogConfig,
    pub usage: UsageConfig,
    pub pricing: Pricing,
    pub admin: AdminConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `None` when set to `""`: no admin listener.
    pub admin_listen: Option<SocketAddr>,
    pub http2: bool,
    pub keepalive: bool,
    pub header_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    /// The whole exchange, response streaming included: past it the response is cut off.
    pub request_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed when recording the client's address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `Some`: the main listener speaks TLS only (the admin listener stays plain).
    pub tls: Option<TlsSettings>,
    /// How client connections are spread over threads.
    pub runtime: Runtime,
}

/// `server.runtime` with `server.workers` resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// One single-threaded runtime per worker thread; each client connection, its
    /// requests and the upstream connections they use stay on one thread.
    PerCore { workers: usize },
    /// Everything on tokio's shared work-stealing runtime.
    Shared,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Scheme and authority, plus an optional base path (no trailing slash, no query).
    pub url: Uri,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub forward_api_key: bool,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Clone)]
pub struct DatabaseConfig {
    pub url: String,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub pool_wait_timeout: Duration,
    pub statement_timeout: Duration,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &crate::db::mask_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_wait_timeout", &self.pool_wait_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .finish()
    }
}

/// Where a request carries its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// The whole value of a named header, such as `X-API-Key`.
    Header(HeaderName),
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub key_sources: Vec<KeySource>,
    pub cache_ttl: Duration,
    pub negative_cache_ttl: Duration,
    pub max_concurrent_lookups: usize,
    pub preload: bool,
    pub listen_notify: bool,
    pub fail_open: bool,
    /// Invalid keys one client may present per minute before it gets 429; 0 is off.
    pub failed_auth_per_minute: u32,
    /// Lookups per second, across all clients, that may find no key before uncached
    /// keys get 429 for the rest of that second; 0 is off.
    pub max_unknown_lookups_per_second: u32,
    /// Budget for one key lookup (pool wait included); past it the request gets 503.
    pub lookup_timeout: Duration,
    /// How long past its freshness a cached record may still be served while the
    /// database cannot be asked; zero never serves stale. Also how long readiness
    /// tolerates an unreachable database.
    pub serve_stale_for: Duration,
    /// Consecutive failed lookups that open the circuit breaker; 0 turns it off.
    pub breaker_failures: u32,
    /// How long an open breaker answers without asking the database, before one probe.
    pub breaker_cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub enabled: bool,
    pub flush_interval: Duration,
    /// Minute windows in `rate_limit_tracking` older than this are pruned.
    pub tracking_retention: Duration,
    /// Requests one key may have in flight (streams included); 0 is unlimited.
    pub max_concurrent_per_key: u32,
}

#[derive(Debug, Clone)]
pub struct UsageConfig {
    pub enabled: bool,
    /// Rows waiting for the writer; past this they go to the spool.
    pub queue_capacity: usize,
    /// Rows per COPY batch; a batch is also written when `flush_interval` passes.
    pub batch_size: usize,
    pub flush_interval: Duration,
    /// Connections of the writer's own pool, apart from the lookup pool.
    pub pool_size: usize,
    pub spool_dir: PathBuf,
    pub max_spool_bytes: u64,
    /// A response header carrying total tokens, read when the body has no `usage`.
    pub tokens_header: Option<HeaderName>,
    /// Ask streamed OpenAI-style completions for their usage when the client did not
    /// (`stream_options.include_usage`), and take the extra chunk out of the answer.
    pub inject_stream_usage: bool,
    /// How often the cluster folds the writers' pending per-key counts into
    /// `api_keys.total_requests` and `last_used_at`: how far those may lag for readers
    /// outside keygate. Each fold updates every key used since the last one.
    pub fold_interval: Duration,
}

/// US dollars per 1,000 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Price {
    pub prompt_per_1k: f64,
    pub completion_per_1k: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Pricing {
    pub default: Price,
    pub models: std::collections::HashMap<String, Price>,
}

impl Pricing {
    /// The price for `model`, else the default.
    pub fn price(&self, model: Option<&str>) -> Price {
        model.and_then(|m| self.models.get(m)).copied().unwrap_or(self.default)
    }
}

/// The admin HTTP API (`/admin/v1/...` on the admin listener).
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// `None` (absent or `""`): the admin API is off and its paths answer 404.
    pub token: Option<AdminToken>,
}

/// The bearer token the admin API requires. `Debug` redacts it, so printing a config
/// (or an error holding one) never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// The token itself, for the one comparison that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    pub organization_id: HeaderName,
    pub key_id: HeaderName,
    pub plan: HeaderName,
    pub scopes: HeaderName,
}

/// Requests whose path starts with `prefix` (and whose method is listed, when any are)
/// need every scope in `scopes`. The longest matching prefix wins.
#[derive(Debug, Clone)]
pub struct RouteRule {
    pub prefix: String,
    pub methods: Vec<Method>,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    /// One line per request at info level, target `keygate::access`.
    pub access_log: bool,
}

impl Config {
    /// Reads, interpolates and validates `path`, with the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, &|name| std::env::var(name).ok())
    }

    pub fn load_with_env(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with_env(&text, path, env)
    }

    pub fn parse_with_env(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        interpolate::interpolate(&mut value, &mut Vec::new(), env)?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::invalid(if key == "." { String::new() } else { key }, e.into_inner().to_string())
        })?;
        validate::validate(raw, env)
    }

    /// For admin commands run with no file: defaults plus `DATABASE_URL`.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        validate::validate(RawConfig::default(), env)
    }

    pub fn upstream(&self) -> Result<&UpstreamConfig, ConfigError> {
        self.upstream
            .as_ref()
            .ok_or_else(|| ConfigError::invalid("upstream.url", "is required to serve"))
    }
}

#[cfg(test)]
mod reference_tests;
#[cfg(test)]
mod tests;
