//! `/healthz` (the process is alive) and `/readyz` (it can do its job), on both listeners.
//!
//! Ready means: not draining, and the database answers or has been unreachable for less
//! than `auth.serve_stale_for` (cached keys keep working through a short outage, so
//! pulling every replica out of rotation at once would turn a blip into an outage).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use super::body::{full, ProxyBody};
use crate::auth::Authenticator;

pub const HEALTH: &str = "/healthz";
pub const READY: &str = "/readyz";

pub struct Health {
    pub pool: deadpool_postgres::Pool,
    pub auth: Arc<Authenticator>,
    pub listen_notify: bool,
    /// Set when shutdown begins, so load balancers stop sending before we stop accepting.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// How long readiness tolerates an unreachable database.
    pub stale_budget: Duration,
    /// When readiness first saw the database unreachable, since it last answered.
    pub down_since: Mutex<Option<Instant>>,
    /// For the config generation and load time.
    pub live: super::reload::Live,
}

impl Health {
    /// Answers health paths; `None` for every other request.
    /// Whether `answer` would answer: a cheap check, so the caller awaits (and holds
    /// the readiness probe's future) only for probes.
    pub fn is_probe<B>(req: &Request<B>) -> bool {
        (req.method() == Method::GET || req.method() == Method::HEAD) && matches!(req.uri().path(), HEALTH | READY)
    }

    pub async fn answer<B>(&self, req: &Request<B>) -> Option<Response<ProxyBody>> {
        if !Self::is_probe(req) {
            return None;
        }
        match req.uri().path() {
            HEALTH => Some(json(StatusCode::OK, r#"{"status":"ok"}"#.to_string())),
            READY => Some(self.ready().await),
            _ => None,
        }
    }

    async fn ready(&self) -> Response<ProxyBody> {
        let db_ok = tokio::time::timeout(Duration::from_secs(1), crate::db::ping(&self.pool))
            .await
            .is_ok_and(|r| r.is_ok());
        let stats = self.auth.stats();
        let listener_ok = !self.listen_notify || stats.listener_connected;
        let draining = self.draining.load(std::sync::atomic::Ordering::Relaxed);
        let down_for = self.down_for(db_ok);
        let ready = !draining && down_for.is_none_or(|d| d < self.stale_budget);
        let config = self.live.load();
        let body = serde_json::json!({
            "status": if draining { "draining" } else if ready { "ready" } else { "not_ready" },
            "database": if db_ok { "ok" } else { "unreachable" },
            "database_down_secs": down_for.map(|d| d.as_secs()),
            "breaker": stats.breaker.as_str(),
            "cache": {
                "keys": stats.cached,
                "negative": stats.negative,
                "hits": stats.hits,
                "misses": stats.misses,
                "lookups": stats.db_lookups,
                "stale_served": stats.stale_served,
                "shed": stats.shed,
            },
            "notify_listener": if listener_ok { "ok" } else { "disconnected" },
            "config": {
                "generation": config.generation,
                "loaded_at": config.loaded_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            },
        });
        json(
            if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            body.to_string(),
        )
    }
}

impl Health {
    fn down_for(&self, db_ok: bool) -> Option<Duration> {
        let mut since = self
            .down_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if db_ok {
            *since = None;
            return None;
        }
        Some(since.get_or_insert_with(Instant::now).elapsed())
    }
}

fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub fn not_found() -> Response<ProxyBody> {
    json(
        StatusCode::NOT_FOUND,
        r#"{"error":{"code":"not_found","message":"No such admin path."}}"#.to_string(),
    )
}

pub fn metrics(text: String) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(text)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
