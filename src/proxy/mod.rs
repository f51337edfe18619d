//! `keygate serve`: wires the pipeline, the listeners and the background tasks, and
//! runs them until SIGTERM/SIGINT, then shuts down in order. SIGHUP reloads what can
//! change safely (`reload`).
//!
//! Shutdown order matters: stop accepting → let in-flight requests finish (within the
//! grace period) → stop background tasks, each of which flushes once more → exit.
//! Nothing on the request path lives here; see `pipeline`.

pub(crate) mod access_log;
mod authorise;
mod balance;
mod body;
mod bounded;
mod error;
mod forward;
mod guard;
mod h1pool;
mod header_text;
mod headers;
mod health;
mod listener;
mod metering;
mod overrides;
pub mod path;
mod pipeline;
pub(crate) mod reload;
mod routes;
mod stream_usage;
mod trace;
mod workers;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use body::{full, ProxyBody};
pub use error::Reject;
pub use pipeline::Proxy;
/// Public for benches/hot_path.rs, which times its response headers.
pub use trace::Trace;

use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::db::{self, DbError};
use crate::limits::Limiter;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream client: {0}")]
    Upstream(#[from] forward::UpstreamSetupError),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
}

/// Runs the proxy until `shutdown` resolves (the CLI passes the signal handler).
/// `config_path` is the file `cfg` came from, re-read on SIGHUP.
pub async fn serve(
    cfg: Config,
    config_path: Option<PathBuf>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Before anything can be ready: SIGHUP's default action would kill the process.
    #[cfg(unix)]
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| tracing::warn!(error = %e, "cannot handle SIGHUP; config reload is off"))
        .ok();
    let live = reload::Reloadable::live(&cfg)?;
    let workers = match cfg.server.runtime {
        crate::config::Runtime::PerCore { workers } => {
            Some(workers::Workers::start(workers).map_err(ServeError::Workers)?)
        }
        crate::config::Runtime::Shared => None,
    };
    let upstream = forward::Upstream::new(cfg.upstream()?, workers.as_ref().map_or(1, workers::Workers::count))?;
    let pool = db::pool(&cfg.database, cfg.database.pool_size)?;
    {
        let client = db::checkout(&pool, &cfg.database).await?;
        db::migrate::ensure_current(&client).await?;
    }
    let auth = Arc::new(Authenticator::new(&cfg.auth, pool.clone()));
    if cfg.auth.preload {
        let n = auth.preload().await?;
        tracing::info!(keys = n, "preloaded keys");
    }
    let limiter = Arc::new(Limiter::new());
    // A key's lookup reads its limit counters in the same statement; seeding from them
    // saves the second round trip `ensure_seeded` would make on a cache miss.
    let limits_on = live.clone();
    auth.set_on_load(limiter.clone().seed_on_lookup(move || limits_on.load().limits_enabled));
    // Usage rows get their own pool, so a stuck writer cannot starve key lookups.
    let usage = if cfg.usage.enabled {
        let (sink, writer) = crate::usage::writer::channel(&cfg.usage);
        Some((sink, writer, db::pool(&cfg.database, cfg.usage.pool_size)?))
    } else {
        None
    };

    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })
    };
    let main_listener = bind(cfg.server.listen).await?;
    let admin_listener = match cfg.server.admin_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };

    // `stop` ends accepting; `background` ends the periodic tasks once requests drained.
    let stop = CancellationToken::new();
    let background = CancellationToken::new();
    let tracker = TaskTracker::new();
    if cfg.auth.listen_notify || cfg.auth.preload {
        tracker.spawn(auth.clone().run_sync(cfg.database.clone(), background.clone()));
    }
    tracker.spawn(crate::maintenance::run(
        pool.clone(),
        cfg.limits.tracking_retention,
        background.clone(),
    ));
    let mut usage_stats = None;
    let usage_sink = match usage {
        Some((sink, writer, writer_pool)) => {
            usage_stats = Some(writer.stats());
            // The last fold waits for the writer's last batch, so a clean stop leaves
            // nothing pending.
            let written = CancellationToken::new();
            tracker.spawn(crate::usage::fold::run(
                writer_pool.clone(),
                cfg.usage.fold_interval,
                written.clone(),
            ));
            let run = writer.run(writer_pool, background.clone(), cfg.server.shutdown_grace);
            tracker.spawn(async move {
                run.await;
                written.cancel();
            });
            Some(sink)
        }
        None => {
            // Counts a run with recording on left pending still reach `api_keys`.
            tracker.spawn(crate::usage::fold::run(
                pool.clone(),
                cfg.usage.fold_interval,
                background.clone(),
            ));
            None
        }
    };
    // Always running, because a reload may turn limits on; with nothing counted a
    // flush touches no database.
    tracker.spawn(
        limiter
            .clone()
            .run_flusher(pool.clone(), cfg.limits.flush_interval, background.clone()),
    );

    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = |pool: &deadpool_postgres::Pool| health::Health {
        pool: pool.clone(),
        auth: auth.clone(),
        listen_notify: cfg.auth.listen_notify,
        draining: draining.clone(),
        stale_budget: cfg.auth.serve_stale_for,
        down_since: std::sync::Mutex::new(None),
        live: live.clone(),
    };
    let proxy = Arc::new(Proxy {
        server: cfg.server.clone(),
        live: live.clone(),
        auth: auth.clone(),
        limiter: limiter.clone(),
        concurrency: crate::limits::Concurrency::default(),
        max_concurrent_per_key: cfg.limits.max_concurrent_per_key,
        pool: pool.clone(),
        upstream,
        health: health(&pool),
        usage: usage_sink,
        failed_auth: guard::FailedAuth::new(cfg.auth.failed_auth_per_minute),
        stream_support: Default::default(),
    });

    let grace = cfg.server.shutdown_grace;
    if let Some(admin) = admin_listener {
        let admin_health = Arc::new(health(&pool));
        let metrics = crate::telemetry::install().map(|handle| {
            crate::telemetry::config_reload_series();
            let sources = crate::telemetry::Sources {
                auth: auth.clone(),
                limiter: limiter.clone(),
                usage: usage_stats.clone(),
            };
            Arc::new((handle, sources))
        });
        // The admin API is off unless [admin] token is set; when on, /admin/ paths are its.
        let admin_api = cfg
            .admin
            .token
            .as_ref()
            .map(|token| Arc::new(crate::admin::AdminApi::new(token, pool.clone(), cfg.database.clone())));
        let handler = move |req: http::Request<hyper::body::Incoming>, _peer| {
            let (h, metrics, api) = (admin_health.clone(), metrics.clone(), admin_api.clone());
            async move {
                if let Some(api) = api.filter(|_| crate::admin::owns(req.uri().path())) {
                    return Ok(api.handle(req).await);
                }
                if req.uri().path() == "/metrics" {
                    if let Some(m) = metrics {
                        return Ok(health::metrics(crate::telemetry::render(&m.0, &m.1)));
                    }
                }
                Ok::<_, std::convert::Infallible>(h.answer(&req).await.unwrap_or_else(health::not_found))
            }
        };
        // The admin listener outlives the main one, so /readyz can say "draining" to
        // probes while in-flight requests finish. It stays plain HTTP under
        // [server.tls]: probes, scrapers and `keygate healthcheck` speak plain HTTP.
        let cfg_server = crate::config::ServerConfig {
            tls: None,
            ..cfg.server.clone()
        };
        let stop = background.clone();
        tracing::info!(addr = %admin.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "admin listener up");
        tracker.spawn(async move { listener::serve(admin, &cfg_server, handler, stop, grace, None).await });
    } else if cfg.admin.token.is_some() {
        tracing::warn!("[admin] token is set but server.admin_listen is off: the admin API is not served");
    }
    #[cfg(unix)]
    if let Some(hangup) = hangup {
        let running = Arc::new(cfg.clone());
        tracker.spawn(reload::run(hangup, config_path, running, live, stop.clone()));
    }
    #[cfg(not(unix))]
    let _ = (config_path, live);
    {
        let (stop, draining) = (stop.clone(), draining.clone());
        tokio::spawn(async move {
            shutdown.await;
            draining.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("shutting down: no new connections; finishing in-flight requests");
            stop.cancel();
        });
    }
    tracing::info!(
        addr = %main_listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        upstream = %cfg.upstream()?.url,
        tls = cfg.server.tls.is_some(),
        "keygate listening"
    );
    let handler = move |req, peer| proxy.clone().handle(req, peer);
    listener::serve(
        main_listener,
        &cfg.server,
        handler,
        stop.clone(),
        grace,
        workers.as_ref(),
    )
    .await;

    background.cancel();
    tracker.close();
    // Every task flushes once more; a database that is frozen rather than down could
    // hold a flush forever, so shutdown waits a bounded time (the usage writer spools
    // what it cannot write well within this).
    if tokio::time::timeout(grace + std::time::Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not finish in time; exiting anyway");
    }
    // Last: database connections that requests opened on a worker are driven there, and
    // the final flushes above may have used them.
    if let Some(w) = workers {
        let _ = tokio::task::spawn_blocking(move || w.stop()).await;
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
