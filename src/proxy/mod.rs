//! `keygate serve`: wires the pipeline, the listeners and the background tasks, and
//! runs them until SIGTERM/SIGINT, then shuts down in order.
//!
//! Shutdown order matters: stop accepting → let in-flight requests finish (within the
//! grace period) → stop background tasks, each of which flushes once more → exit.
//! Nothing on the request path lives here; see `pipeline`.

mod body;
mod error;
mod forward;
mod guard;
mod headers;
mod health;
mod listener;
mod metering;
mod pipeline;
mod routes;
mod trace;

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
}

/// Runs the proxy until `shutdown` resolves (the CLI passes the signal handler).
pub async fn serve(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let upstream = forward::Upstream::new(cfg.upstream()?)?;
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
            tracker.spawn(writer.run(writer_pool, background.clone(), cfg.server.shutdown_grace));
            Some(sink)
        }
        None => None,
    };
    if cfg.limits.enabled {
        tracker.spawn(
            limiter
                .clone()
                .run_flusher(pool.clone(), cfg.limits.flush_interval, background.clone()),
        );
    }

    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = |pool: &deadpool_postgres::Pool| health::Health {
        pool: pool.clone(),
        auth: auth.clone(),
        listen_notify: cfg.auth.listen_notify,
        draining: draining.clone(),
    };
    let proxy = Arc::new(Proxy {
        server: cfg.server.clone(),
        auth_cfg: cfg.auth.clone(),
        identity: cfg.identity_headers.clone(),
        routes: routes::Routes::new(cfg.routes.clone()),
        limits_enabled: cfg.limits.enabled,
        auth: auth.clone(),
        limiter: limiter.clone(),
        pool: pool.clone(),
        upstream,
        health: health(&pool),
        usage: usage_sink,
        pricing: Arc::new(cfg.pricing.clone()),
        tokens_header: cfg.usage.tokens_header.clone(),
        access_log: cfg.log.access_log,
        failed_auth: guard::FailedAuth::new(cfg.auth.failed_auth_per_minute),
    });

    let grace = cfg.server.shutdown_grace;
    if let Some(admin) = admin_listener {
        let admin_health = Arc::new(health(&pool));
        let metrics = crate::telemetry::install().map(|handle| {
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
                    return api.handle(req).await;
                }
                if req.uri().path() == "/metrics" {
                    if let Some(m) = metrics {
                        return health::metrics(crate::telemetry::render(&m.0, &m.1));
                    }
                }
                h.answer(&req).await.unwrap_or_else(health::not_found)
            }
        };
        // The admin listener outlives the main one, so /readyz can say "draining" to
        // probes while in-flight requests finish.
        let (cfg_server, stop) = (cfg.server.clone(), background.clone());
        tracing::info!(addr = %admin.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "admin listener up");
        tracker.spawn(async move { listener::serve(admin, &cfg_server, handler, stop, grace).await });
    } else if cfg.admin.token.is_some() {
        tracing::warn!("[admin] token is set but server.admin_listen is off: the admin API is not served");
    }
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
        "keygate listening"
    );
    let handler = move |req, peer| proxy.clone().handle(req, peer);
    listener::serve(main_listener, &cfg.server, handler, stop.clone(), grace).await;

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
