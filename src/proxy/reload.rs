//! Config hot reload on SIGHUP: the reloadable part of the config as one immutable
//! snapshot ([`Reloadable`]) behind an `ArcSwap`, and the task that re-reads the file,
//! validates it fully and swaps the snapshot in, or keeps the old one.
//!
//! Owns which settings may change while serving ([`RELOADABLE`]), which need a restart
//! ([`restart_needed`]), and the reload's logs and metric. The request path loads the
//! snapshot once per request and never sees a half-applied file. It does not own
//! parsing or validation (`config`) nor what the settings do (`pipeline`).
//!
//! Everything else (listeners, TLS, pools, the database, caches, background tasks)
//! is built once at start: changing those on a running process would need draining
//! and rebuilding, which is what a restart already does safely.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use http::{HeaderName, HeaderValue};
use tokio_util::sync::CancellationToken;

use super::routes::Routes;
use crate::config::{Config, ConfigError, IdentityHeaders, KeySource, Pricing};

/// Config keys (or key prefixes) a SIGHUP applies; every other key needs a restart.
/// `docs/configuration.md` is tested against this list.
pub const RELOADABLE: &[&str] = &[
    "server.trusted_proxies",
    "server.max_body_bytes",
    "server.body_idle_timeout",
    "upstream.forward_api_key",
    "upstream.headers",
    "auth.key_headers",
    "auth.fail_open",
    "limits.enabled",
    "identity_headers",
    "routes[]",
    "usage.tokens_header",
    "usage.inject_stream_usage",
    "pricing",
    "log.access_log",
];

/// Whether `key` (as written in the reference, e.g. `routes[].scopes`) is reloadable.
pub fn is_reloadable(key: &str) -> bool {
    RELOADABLE
        .iter()
        .any(|p| key == *p || key.strip_prefix(p).is_some_and(|rest| rest.starts_with('.')))
}

/// The settings a request reads that a reload may change, as one consistent snapshot.
pub struct Reloadable {
    /// 1 at start, +1 for each applied reload.
    pub generation: u64,
    pub loaded_at: DateTime<Utc>,
    pub key_sources: Vec<KeySource>,
    pub fail_open: bool,
    pub identity: IdentityHeaders,
    pub routes: Routes,
    pub limits_enabled: bool,
    pub pricing: Arc<Pricing>,
    pub tokens_header: Option<HeaderName>,
    pub inject_stream_usage: bool,
    pub access_log: bool,
    pub upstream_headers: Vec<(HeaderName, HeaderValue)>,
    pub forward_api_key: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_body_bytes: u64,
    pub body_idle_timeout: Duration,
}

/// Shared by the proxy (per request), `/readyz` and the reload task.
pub type Live = Arc<ArcSwap<Reloadable>>;

impl Reloadable {
    /// Fails only when the file has no `[upstream]`, which serving needs.
    pub fn new(cfg: &Config, generation: u64) -> Result<Self, ConfigError> {
        let upstream = cfg.upstream()?;
        Ok(Reloadable {
            generation,
            loaded_at: Utc::now(),
            key_sources: cfg.auth.key_sources.clone(),
            fail_open: cfg.auth.fail_open,
            identity: cfg.identity_headers.clone(),
            routes: Routes::new(cfg.routes.clone()),
            limits_enabled: cfg.limits.enabled,
            pricing: Arc::new(cfg.pricing.clone()),
            tokens_header: cfg.usage.tokens_header.clone(),
            inject_stream_usage: cfg.usage.inject_stream_usage,
            access_log: cfg.log.access_log,
            upstream_headers: upstream.headers.clone(),
            forward_api_key: upstream.forward_api_key,
            trusted_proxies: cfg.server.trusted_proxies.clone(),
            max_body_bytes: cfg.server.max_body_bytes,
            body_idle_timeout: cfg.server.body_idle_timeout,
        })
    }

    pub fn live(cfg: &Config) -> Result<Live, ConfigError> {
        Ok(Arc::new(ArcSwap::from_pointee(Self::new(cfg, 1)?)))
    }
}

/// Pushes `section.field` for each listed field that differs. Config keys are the
/// typed fields' names, so the key reported cannot drift from the field compared.
macro_rules! changed {
    ($out:ident, $section:literal, $old:expr, $new:expr, [$($field:ident),+ $(,)?]) => {
        $(if $old.$field != $new.$field {
            $out.push(concat!($section, ".", stringify!($field)));
        })+
    };
}

/// The restart-only keys whose values differ between the running config and `new`.
pub fn restart_needed(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let (o, n) = (&running.server, &new.server);
    changed!(
        out,
        "server",
        o,
        n,
        [listen, admin_listen, http2, keepalive, header_read_timeout]
    );
    changed!(
        out,
        "server",
        o,
        n,
        [max_header_bytes, max_connections, shutdown_grace, tls]
    );
    changed!(out, "server", o, n, [request_timeout, runtime]);
    if let (Some(o), Some(n)) = (&running.upstream, &new.upstream) {
        changed!(out, "upstream", o, n, [url, connect_timeout, response_timeout]);
        changed!(out, "upstream", o, n, [pool_idle_timeout, pool_max_idle_per_host]);
    }
    let (o, n) = (&running.database, &new.database);
    changed!(
        out,
        "database",
        o,
        n,
        [url, pool_size, connect_timeout, pool_wait_timeout, statement_timeout]
    );
    let (o, n) = (&running.auth, &new.auth);
    changed!(
        out,
        "auth",
        o,
        n,
        [cache_ttl, negative_cache_ttl, max_concurrent_lookups, preload]
    );
    changed!(
        out,
        "auth",
        o,
        n,
        [
            listen_notify,
            failed_auth_per_minute,
            max_unknown_lookups_per_second,
            lookup_timeout
        ]
    );
    changed!(out, "auth", o, n, [serve_stale_for, breaker_failures, breaker_cooldown]);
    changed!(
        out,
        "limits",
        running.limits,
        new.limits,
        [flush_interval, tracking_retention, max_concurrent_per_key]
    );
    let (o, n) = (&running.usage, &new.usage);
    changed!(
        out,
        "usage",
        o,
        n,
        [enabled, queue_capacity, batch_size, flush_interval]
    );
    changed!(
        out,
        "usage",
        o,
        n,
        [pool_size, spool_dir, max_spool_bytes, fold_interval]
    );
    changed!(out, "log", running.log, new.log, [format, level]);
    changed!(out, "admin", running.admin, new.admin, [token]);
    // The two lists must not overlap, or the docs would promise what a reload skips.
    debug_assert!(out.iter().all(|k| !is_reloadable(k)), "{out:?}");
    out
}

/// Waits for SIGHUP until `stop`; each one re-reads `path`. `running` is the config the
/// process started with: restart-only settings are compared with it, not with the last
/// reload, so a pending restart keeps being reported until it happens.
#[cfg(unix)]
pub async fn run(
    mut hup: tokio::signal::unix::Signal,
    path: Option<PathBuf>,
    running: Arc<Config>,
    live: Live,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            () = stop.cancelled() => return,
        }
        let Some(path) = path.clone() else {
            tracing::warn!("SIGHUP: keygate was started without --config; there is no file to reload");
            continue;
        };
        let (running, live) = (running.clone(), live.clone());
        let shown = path.display().to_string();
        // Reading the file (and any TLS files it names) is blocking I/O.
        let outcome = tokio::task::spawn_blocking(move || reload(&path, &running, &live)).await;
        match outcome {
            Ok(Ok((generation, restart))) => {
                crate::telemetry::config_reload(true);
                tracing::info!(path = %shown, generation, "config reloaded");
                if !restart.is_empty() {
                    tracing::warn!(
                        settings = %restart.join(", "),
                        "config reload: these settings changed but need a restart; they keep their running values"
                    );
                }
            }
            Ok(Err(e)) => {
                crate::telemetry::config_reload(false);
                tracing::error!(path = %shown, error = %e, "config reload refused; still serving the previous config");
            }
            Err(e) => {
                crate::telemetry::config_reload(false);
                tracing::error!(error = %e, "config reload failed; still serving the previous config");
            }
        }
    }
}

/// Validates the whole file before touching anything, then swaps in one step.
fn reload(path: &Path, running: &Config, live: &ArcSwap<Reloadable>) -> Result<(u64, Vec<&'static str>), ConfigError> {
    let new = Config::load(path)?;
    let generation = live.load().generation + 1;
    let next = Reloadable::new(&new, generation)?;
    let restart = restart_needed(running, &new);
    live.store(Arc::new(next));
    Ok((generation, restart))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!("[upstream]\nurl = \"http://127.0.0.1:1\"\n{extra}");
        let env = |n: &str| (n == "DATABASE_URL").then(|| "postgres://u@h/db".to_string());
        Config::parse_with_env(&text, Path::new("t.toml"), &env).expect("valid config")
    }

    #[test]
    fn reloadable_changes_need_no_restart() {
        let old = cfg("");
        let new = cfg(
            "[[routes]]\nprefix = \"/echo\"\nscopes = [\"admin\"]\n[identity_headers]\nkey_id = \"x-kg-key\"\n\
             [pricing.default]\nprompt_per_1k = 1.0\n[limits]\nenabled = false\n[log]\naccess_log = false\n\
             [server]\ntrusted_proxies = [\"10.0.0.0/8\"]\nmax_body_bytes = \"1MiB\"\n",
        );
        assert!(
            restart_needed(&old, &new).is_empty(),
            "{:?}",
            restart_needed(&old, &new)
        );
        let live = Reloadable::new(&new, 2).expect("snapshot");
        assert_eq!(live.identity.key_id.as_str(), "x-kg-key");
        assert!(!live.limits_enabled && !live.access_log);
    }

    #[test]
    fn restart_only_changes_are_named() {
        let old = cfg("");
        let new =
            cfg("[server]\nlisten = \"127.0.0.1:1\"\n[database]\npool_size = 3\n[limits]\nflush_interval = \"2s\"\n");
        assert_eq!(
            restart_needed(&old, &new),
            ["server.listen", "database.pool_size", "limits.flush_interval"]
        );
    }

    #[test]
    fn prefixes_cover_their_keys() {
        assert!(is_reloadable("routes[].scopes"));
        assert!(is_reloadable("pricing.models.<name>.prompt_per_1k"));
        assert!(is_reloadable("upstream.headers.<name>"));
        assert!(!is_reloadable("upstream.url"));
        assert!(!is_reloadable("auth.key_headers_extra"));
    }
}
