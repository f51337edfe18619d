//! Turns a [`RawConfig`] into a typed [`Config`]: every default and every rule lives here.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Uri};

use super::raw::*;
use super::units::{parse_duration, parse_size};
use super::*;

type R<T> = Result<T, ConfigError>;

pub fn validate(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> R<Config> {
    let auth = auth(raw.auth)?;
    let identity_headers = identity(raw.identity_headers, &auth.key_sources)?;
    Ok(Config {
        server: server(raw.server)?,
        upstream: raw.upstream.map(upstream).transpose()?,
        database: database(raw.database, env)?,
        auth,
        limits: limits(raw.limits)?,
        identity_headers,
        routes: raw
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| route(i, r))
            .collect::<R<_>>()?,
        log: log(raw.log)?,
        usage: usage(raw.usage)?,
        pricing: pricing(raw.pricing)?,
        admin: admin(raw.admin)?,
    })
}

fn server(s: RawServer) -> R<ServerConfig> {
    let admin_listen = match s.admin_listen.as_deref() {
        Some("") => None,
        other => Some(addr("server.admin_listen", other.unwrap_or("127.0.0.1:9090"))?),
    };
    let http2 = s.http2.unwrap_or(false);
    Ok(ServerConfig {
        listen: addr("server.listen", s.listen.as_deref().unwrap_or("0.0.0.0:8080"))?,
        admin_listen,
        http2,
        keepalive: s.keepalive.unwrap_or(true),
        header_read_timeout: positive("server.header_read_timeout", s.header_read_timeout, "10s")?,
        body_idle_timeout: positive("server.body_idle_timeout", s.body_idle_timeout, "30s")?,
        max_header_bytes: size_in("server.max_header_bytes", s.max_header_bytes, "16KiB", 1024, 1 << 20)? as usize,
        max_body_bytes: size_in("server.max_body_bytes", s.max_body_bytes, "10MiB", 1, u64::MAX)?,
        max_connections: count("server.max_connections", s.max_connections, 10_000)?,
        shutdown_grace: duration("server.shutdown_grace", s.shutdown_grace, "30s")?,
        request_timeout: positive("server.request_timeout", s.request_timeout, "10m")?,
        trusted_proxies: s
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .map(|c| {
                cidr(c).ok_or_else(|| {
                    ConfigError::invalid(
                        "server.trusted_proxies",
                        format!("`{c}` is not an address or CIDR range"),
                    )
                })
            })
            .collect::<R<_>>()?,
        tls: super::tls::tls(s.tls, http2)?,
        runtime: runtime(s.runtime.as_deref(), s.workers)?,
    })
}

/// `workers = 0` (the default) is one per CPU the process may use.
fn runtime(kind: Option<&str>, workers: Option<i64>) -> R<Runtime> {
    let workers = match workers {
        None | Some(0) => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        Some(n @ 1..=1024) => n as usize,
        Some(_) => return Err(ConfigError::invalid("server.workers", "must be between 0 and 1024")),
    };
    match kind.unwrap_or("per-core") {
        "per-core" => Ok(Runtime::PerCore { workers }),
        "shared" => Ok(Runtime::Shared),
        other => Err(ConfigError::invalid(
            "server.runtime",
            format!("`{other}` is not one of `per-core`, `shared`"),
        )),
    }
}

fn upstream(u: RawUpstream) -> R<UpstreamConfig> {
    let url = u
        .url
        .ok_or_else(|| ConfigError::invalid("upstream.url", "is required"))?;
    let uri =
        Uri::from_str(&url).map_err(|e| ConfigError::invalid("upstream.url", format!("`{url}` is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(ConfigError::invalid(
                "upstream.url",
                format!("`{url}` must start with http:// or https://"),
            ))
        }
    }
    if uri.authority().is_none() {
        return Err(ConfigError::invalid("upstream.url", format!("`{url}` has no host")));
    }
    if uri.query().is_some() {
        return Err(ConfigError::invalid("upstream.url", "must not have a query string"));
    }
    // Keep the base path without a trailing slash so joining with a request path is
    // plain concatenation.
    let base = uri.path().trim_end_matches('/');
    let url = Uri::builder()
        .scheme(uri.scheme_str().unwrap_or("http"))
        .authority(uri.authority().map(|a| a.as_str()).unwrap_or_default())
        .path_and_query(if base.is_empty() { "/" } else { base })
        .build()
        .map_err(|e| ConfigError::invalid("upstream.url", e.to_string()))?;
    let mut headers = Vec::with_capacity(u.headers.len());
    for (name, value) in u.headers {
        let key = format!("upstream.headers.{name}");
        let n = HeaderName::from_str(&name).map_err(|_| ConfigError::invalid(&key, "is not a valid header name"))?;
        let mut v =
            HeaderValue::from_str(&value).map_err(|_| ConfigError::invalid(&key, "is not a valid header value"))?;
        v.set_sensitive(true);
        headers.push((n, v));
    }
    Ok(UpstreamConfig {
        url,
        connect_timeout: positive("upstream.connect_timeout", u.connect_timeout, "5s")?,
        response_timeout: positive("upstream.response_timeout", u.response_timeout, "60s")?,
        pool_idle_timeout: positive("upstream.pool_idle_timeout", u.pool_idle_timeout, "90s")?,
        pool_max_idle_per_host: count("upstream.pool_max_idle_per_host", u.pool_max_idle_per_host, 256)?,
        forward_api_key: u.forward_api_key.unwrap_or(false),
        headers,
    })
}

fn database(d: RawDatabase, env: &dyn Fn(&str) -> Option<String>) -> R<DatabaseConfig> {
    let url = env(DATABASE_URL_ENV)
        .filter(|v| !v.is_empty())
        .or(d.url)
        .filter(|v| !v.is_empty());
    let url = url.ok_or(ConfigError::NoDatabase)?;
    tokio_postgres::Config::from_str(&url).map_err(|e| {
        ConfigError::invalid(
            "database.url",
            format!("`{}` is not a PostgreSQL URL: {e}", crate::db::mask_url(&url)),
        )
    })?;
    Ok(DatabaseConfig {
        url,
        pool_size: count("database.pool_size", d.pool_size, 16)?,
        connect_timeout: positive("database.connect_timeout", d.connect_timeout, "5s")?,
        pool_wait_timeout: positive("database.pool_wait_timeout", d.pool_wait_timeout, "2s")?,
        statement_timeout: positive("database.statement_timeout", d.statement_timeout, "5s")?,
    })
}

fn auth(a: RawAuth) -> R<AuthConfig> {
    let names = a
        .key_headers
        .unwrap_or_else(|| vec!["authorization".into(), "x-api-key".into()]);
    if names.is_empty() {
        return Err(ConfigError::invalid(
            "auth.key_headers",
            "must name at least one header",
        ));
    }
    let key_sources = names
        .iter()
        .map(|n| match HeaderName::from_str(n) {
            Ok(h) if h == http::header::AUTHORIZATION => Ok(KeySource::Bearer),
            Ok(h) => Ok(KeySource::Header(h)),
            Err(_) => Err(ConfigError::invalid(
                "auth.key_headers",
                format!("`{n}` is not a valid header name"),
            )),
        })
        .collect::<R<Vec<_>>>()?;
    Ok(AuthConfig {
        key_sources,
        cache_ttl: positive("auth.cache_ttl", a.cache_ttl, "60s")?,
        negative_cache_ttl: positive("auth.negative_cache_ttl", a.negative_cache_ttl, "5s")?,
        max_concurrent_lookups: count("auth.max_concurrent_lookups", a.max_concurrent_lookups, 16)?,
        preload: a.preload.unwrap_or(false),
        listen_notify: a.listen_notify.unwrap_or(true),
        fail_open: a.fail_open.unwrap_or(false),
        lookup_timeout: positive("auth.lookup_timeout", a.lookup_timeout, "2s")?,
        failed_auth_per_minute: small("auth.failed_auth_per_minute", a.failed_auth_per_minute, 60)?,
        max_unknown_lookups_per_second: small(
            "auth.max_unknown_lookups_per_second",
            a.max_unknown_lookups_per_second,
            1_000,
        )?,
        serve_stale_for: duration("auth.serve_stale_for", a.serve_stale_for, "1h")?,
        breaker_failures: small("auth.breaker_failures", a.breaker_failures, 5)?,
        breaker_cooldown: positive("auth.breaker_cooldown", a.breaker_cooldown, "2s")?,
    })
}

fn limits(l: RawLimits) -> R<LimitsConfig> {
    let flush_interval = positive("limits.flush_interval", l.flush_interval, "1s")?;
    if flush_interval < Duration::from_millis(50) || flush_interval > Duration::from_secs(60) {
        return Err(ConfigError::invalid(
            "limits.flush_interval",
            "must be between 50ms and 60s",
        ));
    }
    Ok(LimitsConfig {
        enabled: l.enabled.unwrap_or(true),
        flush_interval,
        tracking_retention: positive("limits.tracking_retention", l.tracking_retention, "1d")?,
        max_concurrent_per_key: small("limits.max_concurrent_per_key", l.max_concurrent_per_key, 0)?,
    })
}

fn identity(h: RawIdentityHeaders, sources: &[KeySource]) -> R<IdentityHeaders> {
    let one = |key: &str, v: Option<String>, default: &str| -> R<HeaderName> {
        let s = v.unwrap_or_else(|| default.to_string());
        let name = HeaderName::from_str(&s)
            .map_err(|_| ConfigError::invalid(key, format!("`{s}` is not a valid header name")))?;
        if name == http::header::AUTHORIZATION || sources.contains(&KeySource::Header(name.clone())) {
            return Err(ConfigError::invalid(key, "must not be a header that carries API keys"));
        }
        Ok(name)
    };
    let out = IdentityHeaders {
        organization_id: one(
            "identity_headers.organization_id",
            h.organization_id,
            "x-keygate-organization-id",
        )?,
        key_id: one("identity_headers.key_id", h.key_id, "x-keygate-key-id")?,
        plan: one("identity_headers.plan", h.plan, "x-keygate-plan")?,
        scopes: one("identity_headers.scopes", h.scopes, "x-keygate-scopes")?,
    };
    let all = [&out.organization_id, &out.key_id, &out.plan, &out.scopes];
    for (i, a) in all.iter().enumerate() {
        if all[..i].contains(a) {
            return Err(ConfigError::invalid("identity_headers", format!("`{a}` is used twice")));
        }
    }
    Ok(out)
}

fn route(i: usize, r: RawRoute) -> R<RouteRule> {
    let key = |f: &str| format!("routes[{i}].{f}");
    let prefix = r
        .prefix
        .ok_or_else(|| ConfigError::invalid(key("prefix"), "is required"))?;
    if !prefix.starts_with('/') {
        return Err(ConfigError::invalid(
            key("prefix"),
            format!("`{prefix}` must start with /"),
        ));
    }
    normalized_prefix(&prefix).map_err(|why| ConfigError::invalid(key("prefix"), why))?;
    let methods = r
        .methods
        .iter()
        .map(|m| {
            Method::from_str(&m.to_ascii_uppercase())
                .map_err(|_| ConfigError::invalid(key("methods"), format!("`{m}` is not an HTTP method")))
        })
        .collect::<R<Vec<_>>>()?;
    if r.scopes.iter().any(|s| s.trim().is_empty() || s.contains(',')) {
        return Err(ConfigError::invalid(
            key("scopes"),
            "scopes must be non-empty and contain no commas",
        ));
    }
    Ok(RouteRule {
        prefix,
        methods,
        scopes: r.scopes,
    })
}

/// Paths are matched after `proxy::path` normalized them, so a prefix in any other
/// spelling could never match: an operator's typo that would silently guard nothing.
fn normalized_prefix(prefix: &str) -> Result<(), String> {
    use crate::proxy::path;
    match path::normalize(prefix) {
        Err(_) => Err(format!(
            "`{prefix}` has a malformed `%` escape or an escaped control character"
        )),
        Ok(n) if n != prefix => Err(format!("`{prefix}` is matched as `{n}`; write that")),
        Ok(_) if path::lenient_view(prefix).is_some() => Err(format!(
            "`{prefix}` has `//`, `\\`, `;` or an escaped separator, which requests are also read without"
        )),
        Ok(_) => Ok(()),
    }
}

fn log(l: RawLog) -> R<LogConfig> {
    let format = match l.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(ConfigError::invalid(
                "log.format",
                format!("`{other}` is not text or json"),
            ))
        }
    };
    let level = l.level.unwrap_or_else(|| "info".into());
    log_filter(&level).map_err(|e| ConfigError::invalid("log.level", format!("`{level}` is not a log filter: {e}")))?;
    Ok(LogConfig {
        format,
        level,
        access_log: l.access_log.unwrap_or(true),
    })
}

/// Why a log filter was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    #[error("{0}")]
    Parse(#[from] tracing_subscriber::filter::ParseError),
    #[error("field filters (`{{…}}`) are not supported")]
    FieldFilter,
}

/// The one way a log filter is built, for the config and for `RUST_LOG`. Both kinds of
/// field filter (`target[span{field=value}]`) are refused, each found by the
/// config-loader fuzz target: with regexes, `{x=a.......}` compiles a DFA that doubles
/// with each `.`, so loading the config hangs and eats memory; without, two such
/// directives for one target and span break an ordering invariant tracing-subscriber
/// asserts in debug builds (0.3.23), a panic on a config a test loads.
pub fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, LogFilterError> {
    if level.contains('{') {
        return Err(LogFilterError::FieldFilter);
    }
    Ok(tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(level)?)
}

fn addr(key: &str, s: &str) -> R<SocketAddr> {
    SocketAddr::from_str(s).map_err(|_| ConfigError::invalid(key, format!("`{s}` is not an address like 0.0.0.0:8080")))
}

fn duration(key: &str, v: Option<String>, default: &str) -> R<Duration> {
    parse_duration(v.as_deref().unwrap_or(default)).map_err(|m| ConfigError::invalid(key, m))
}

fn positive(key: &str, v: Option<String>, default: &str) -> R<Duration> {
    let d = duration(key, v, default)?;
    if d.is_zero() {
        return Err(ConfigError::invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

fn size_in(key: &str, v: Option<String>, default: &str, min: u64, max: u64) -> R<u64> {
    let n = parse_size(v.as_deref().unwrap_or(default)).map_err(|m| ConfigError::invalid(key, m))?;
    if n < min || n > max {
        return Err(ConfigError::invalid(
            key,
            format!("must be between {min} and {max} bytes"),
        ));
    }
    Ok(n)
}

fn count(key: &str, v: Option<i64>, default: usize) -> R<usize> {
    match v {
        None => Ok(default),
        Some(n) if n >= 1 => usize::try_from(n).map_err(|_| ConfigError::invalid(key, "is too large")),
        Some(_) => Err(ConfigError::invalid(key, "must be at least 1")),
    }
}

/// A count where 0 means "off".
fn small(key: &str, v: Option<i64>, default: u32) -> R<u32> {
    match v {
        None => Ok(default),
        Some(n) => u32::try_from(n).map_err(|_| ConfigError::invalid(key, "must be between 0 and 4294967295")),
    }
}

fn cidr(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

fn usage(u: RawUsage) -> R<UsageConfig> {
    let tokens_header = match u.tokens_header.as_deref() {
        Some("") => None,
        other => Some(
            HeaderName::from_str(other.unwrap_or("x-usage-tokens"))
                .map_err(|_| ConfigError::invalid("usage.tokens_header", "is not a valid header name"))?,
        ),
    };
    let spool_dir = u.spool_dir.unwrap_or_else(|| "/var/lib/keygate/spool".into());
    if spool_dir.is_empty() {
        return Err(ConfigError::invalid("usage.spool_dir", "must name a directory"));
    }
    let fold_interval = positive("usage.fold_interval", u.fold_interval, "30s")?;
    if fold_interval < Duration::from_secs(1) || fold_interval > Duration::from_secs(3600) {
        return Err(ConfigError::invalid("usage.fold_interval", "must be between 1s and 1h"));
    }
    Ok(UsageConfig {
        enabled: u.enabled.unwrap_or(true),
        queue_capacity: count("usage.queue_capacity", u.queue_capacity, 65_536)?,
        batch_size: count("usage.batch_size", u.batch_size, 2_000)?,
        flush_interval: positive("usage.flush_interval", u.flush_interval, "1s")?,
        pool_size: count("usage.pool_size", u.pool_size, 4)?,
        spool_dir: spool_dir.into(),
        max_spool_bytes: size_in("usage.max_spool_bytes", u.max_spool_bytes, "1GiB", 1 << 20, u64::MAX)?,
        tokens_header,
        inject_stream_usage: u.inject_stream_usage.unwrap_or(true),
        fold_interval,
    })
}

fn price(key: &str, p: Option<RawPrice>) -> R<Price> {
    let p = p.unwrap_or_default();
    let check = |field: &str, v: Option<f64>| -> R<f64> {
        let v = v.unwrap_or(0.0);
        if !v.is_finite() || v < 0.0 {
            return Err(ConfigError::invalid(
                format!("{key}.{field}"),
                "must be a non-negative number",
            ));
        }
        Ok(v)
    };
    Ok(Price {
        prompt_per_1k: check("prompt_per_1k", p.prompt_per_1k)?,
        completion_per_1k: check("completion_per_1k", p.completion_per_1k)?,
    })
}

fn pricing(p: RawPricing) -> R<Pricing> {
    let mut models = std::collections::HashMap::new();
    for (name, raw) in p.models {
        let key = format!("pricing.models.{name}");
        models.insert(name, price(&key, Some(raw))?);
    }
    Ok(Pricing {
        default: price("pricing.default", p.default)?,
        models,
    })
}

/// Shortest admin token accepted: 16 characters keeps guessing out of reach even for a
/// token typed by hand, while a generated one (`openssl rand -hex 32`) is far longer.
pub const ADMIN_TOKEN_MIN_LEN: usize = 16;

fn admin(a: RawAdmin) -> R<AdminConfig> {
    // Empty means off, so `${KEYGATE_ADMIN_TOKEN:-}` leaves the API off when unset.
    let token = match a.token {
        None => None,
        Some(t) if t.is_empty() => None,
        Some(t) => {
            // Messages never include the value: it is a secret.
            if t.len() < ADMIN_TOKEN_MIN_LEN {
                return Err(ConfigError::invalid(
                    "admin.token",
                    format!("must be at least {ADMIN_TOKEN_MIN_LEN} characters, or empty to turn the admin API off"),
                ));
            }
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::invalid(
                    "admin.token",
                    "must be printable ASCII without spaces, so it fits in an Authorization header",
                ));
            }
            Some(AdminToken(t))
        }
    };
    Ok(AdminConfig { token })
}
