//! The config file as written: every field optional, unknown fields refused.
//!
//! Nothing here is validated; `super::validate` turns these into typed values and owns
//! every default. Keeping the two apart lets the error for a bad value name its key.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub upstream: Option<RawUpstream>,
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub identity_headers: RawIdentityHeaders,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub usage: RawUsage,
    #[serde(default)]
    pub pricing: RawPricing,
    #[serde(default)]
    pub admin: RawAdmin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub http2: Option<bool>,
    pub keepalive: Option<bool>,
    pub header_read_timeout: Option<String>,
    pub body_idle_timeout: Option<String>,
    pub max_header_bytes: Option<String>,
    pub max_body_bytes: Option<String>,
    pub max_connections: Option<i64>,
    pub shutdown_grace: Option<String>,
    pub request_timeout: Option<String>,
    pub trusted_proxies: Option<Vec<String>>,
    pub tls: Option<RawTls>,
    pub runtime: Option<String>,
    pub workers: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_path: Option<String>,
    pub key_path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Option<String>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub pool_idle_timeout: Option<String>,
    pub pool_max_idle_per_host: Option<i64>,
    pub forward_api_key: Option<bool>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: Option<String>,
    pub pool_size: Option<i64>,
    pub connect_timeout: Option<String>,
    pub pool_wait_timeout: Option<String>,
    pub statement_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub key_headers: Option<Vec<String>>,
    pub cache_ttl: Option<String>,
    pub negative_cache_ttl: Option<String>,
    pub max_concurrent_lookups: Option<i64>,
    pub preload: Option<bool>,
    pub listen_notify: Option<bool>,
    pub fail_open: Option<bool>,
    pub failed_auth_per_minute: Option<i64>,
    pub max_unknown_lookups_per_second: Option<i64>,
    pub lookup_timeout: Option<String>,
    pub serve_stale_for: Option<String>,
    pub breaker_failures: Option<i64>,
    pub breaker_cooldown: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub enabled: Option<bool>,
    pub flush_interval: Option<String>,
    pub tracking_retention: Option<String>,
    pub max_concurrent_per_key: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentityHeaders {
    pub organization_id: Option<String>,
    pub key_id: Option<String>,
    pub plan: Option<String>,
    pub scopes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub prefix: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsage {
    pub enabled: Option<bool>,
    pub queue_capacity: Option<i64>,
    pub batch_size: Option<i64>,
    pub flush_interval: Option<String>,
    pub pool_size: Option<i64>,
    pub spool_dir: Option<String>,
    pub max_spool_bytes: Option<String>,
    pub tokens_header: Option<String>,
    pub inject_stream_usage: Option<bool>,
    pub fold_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    pub default: Option<RawPrice>,
    #[serde(default)]
    pub models: BTreeMap<String, RawPrice>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub prompt_per_1k: Option<f64>,
    pub completion_per_1k: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub token: Option<String>,
}
