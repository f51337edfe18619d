//! Prometheus metrics: the recorder, the names, and the scrape that turns the other
//! subsystems' own counters (auth cache, limiter, usage writer) into metrics.
//!
//! Owns metric names and the `/metrics` text. Hot-path code records counters through
//! handles each thread keeps (one atomic add; see `cached`), and into the fixed-bucket
//! [`Histogram`]s here for latencies; everything that already keeps its own counters is
//! read only at scrape time, so it costs nothing per request.

mod histogram;

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, Counter};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub use histogram::Histogram;

use crate::auth::Authenticator;
use crate::limits::Limiter;
use crate::usage::UsageStats;

pub const REQUESTS: &str = "keygate_requests_total";
pub const OVERHEAD: &str = "keygate_overhead_seconds";
pub const UPSTREAM: &str = "keygate_upstream_seconds";
pub const RATE_DECISIONS: &str = "keygate_rate_limit_decisions_total";
pub const CONFIG_RELOADS: &str = "keygate_config_reloads_total";
pub const STREAM_USAGE: &str = "keygate_stream_usage_requests_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "keygate_tls_handshake_failures_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// keygate's own share of a request's time, to the response head.
pub static OVERHEAD_SECONDS: Histogram = Histogram::new();
/// From sending the request upstream to the upstream's response head.
pub static UPSTREAM_SECONDS: Histogram = Histogram::new();
/// One key lookup in PostgreSQL, pool wait and retries included.
pub static DB_LOOKUP_SECONDS: Histogram = Histogram::new();
/// One usage batch written (or failed), pool wait included.
pub static USAGE_FLUSH_SECONDS: Histogram = Histogram::new();

/// Every histogram with its name and help text, in the order `/metrics` shows them.
fn histograms() -> [(&'static str, &'static str, &'static Histogram); 4] {
    [
        (
            OVERHEAD,
            "keygate's own share of a request's latency, to the response head",
            &OVERHEAD_SECONDS,
        ),
        (
            UPSTREAM,
            "upstream latency, request sent to response head",
            &UPSTREAM_SECONDS,
        ),
        (
            "keygate_auth_db_lookup_seconds",
            "key lookups in PostgreSQL, pool wait included",
            &DB_LOOKUP_SECONDS,
        ),
        (
            "keygate_usage_flush_seconds",
            "usage batch writes, pool wait included",
            &USAGE_FLUSH_SECONDS,
        ),
    ]
}

/// Installs the process-wide recorder once; later calls reuse it.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            // Counters and gauges only: they hold no per-sample state, so the recorder
            // needs no upkeep task. Latencies are this module's `Histogram`s.
            PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()
        })
        .clone()
}

/// What the scrape reads besides the recorder's own metrics.
pub struct Sources {
    pub auth: Arc<Authenticator>,
    pub limiter: Arc<Limiter>,
    pub usage: Option<Arc<UsageStats>>,
}

/// The `/metrics` body.
pub fn render(handle: &PrometheusHandle, s: &Sources) -> String {
    let a = s.auth.stats();
    gauge!("keygate_auth_cache_entries", "kind" => "positive").set(a.cached as f64);
    gauge!("keygate_auth_cache_entries", "kind" => "negative").set(a.negative as f64);
    counter!("keygate_auth_cache_hits_total").absolute(a.hits);
    counter!("keygate_auth_cache_misses_total").absolute(a.misses);
    counter!("keygate_auth_db_lookups_total").absolute(a.db_lookups);
    counter!("keygate_auth_db_reloads_total").absolute(a.db_reloads);
    counter!("keygate_auth_stale_served_total").absolute(a.stale_served);
    counter!("keygate_auth_refreshes_total").absolute(a.refreshes);
    counter!("keygate_auth_invalidations_total").absolute(a.invalidations);
    gauge!("keygate_auth_breaker_open").set(match a.breaker {
        crate::auth::BreakerState::Closed => 0.0,
        crate::auth::BreakerState::Open | crate::auth::BreakerState::HalfOpen => 1.0,
    });
    counter!("keygate_auth_breaker_opened_total").absolute(a.breaker_opened);
    counter!("keygate_auth_lookups_shed_total").absolute(a.shed);
    gauge!("keygate_notify_listener_connected").set(if a.listener_connected { 1.0 } else { 0.0 });
    let t = s.limiter.tracked();
    gauge!("keygate_rate_limit_tracked", "kind" => "keys").set(t.keys as f64);
    gauge!("keygate_rate_limit_tracked", "kind" => "orgs").set(t.orgs as f64);
    counter!("keygate_rate_limit_seeds_total", "source" => "lookup").absolute(t.seeded_from_lookup);
    counter!("keygate_rate_limit_seeds_total", "source" => "query").absolute(t.seeded_by_query);
    counter!("keygate_rate_limit_seeds_total", "source" => "failed").absolute(t.seed_failures);
    if let Some(u) = &s.usage {
        let u = u.snapshot();
        gauge!("keygate_usage_queue_depth").set(u.queued as f64);
        counter!("keygate_usage_rows_total", "result" => "written").absolute(u.written);
        counter!("keygate_usage_rows_total", "result" => "duplicate").absolute(u.duplicates);
        counter!("keygate_usage_rows_total", "result" => "spooled").absolute(u.spooled);
        counter!("keygate_usage_rows_total", "result" => "replayed").absolute(u.replayed);
        counter!("keygate_usage_rows_total", "result" => "dropped").absolute(u.dropped);
        counter!("keygate_usage_failed_batches_total").absolute(u.failed_batches);
        gauge!("keygate_usage_last_flush_timestamp_seconds").set(u.last_flush_ms as f64 / 1000.0);
    }
    let mut text = handle.render();
    for (name, help, h) in histograms() {
        h.render(name, help, &mut text);
    }
    text
}

/// One finished request, at response-head time. `outcome` is keygate's error code, or
/// "proxied" for an upstream answer.
pub fn request(outcome: &'static str, status: u16, overhead: Duration, upstream: Option<Duration>) {
    let status = status_label(status);
    cached(
        &REQUEST_COUNTERS,
        outcome,
        status,
        || counter!(REQUESTS, "outcome" => outcome, "status" => status),
    );
    OVERHEAD_SECONDS.record(overhead);
    if let Some(u) = upstream {
        UPSTREAM_SECONDS.record(u);
    }
}

/// A rate-limit decision; "near_limit" when at most a tenth of the minute's budget is left.
pub fn rate_decision(allowed: bool, limit: i64, remaining: i64) {
    let decision = match (allowed, remaining * 10 <= limit) {
        (false, _) => "limited",
        (true, true) => "near_limit",
        (true, false) => "allowed",
    };
    cached(
        &RATE_COUNTERS,
        decision,
        "",
        || counter!(RATE_DECISIONS, "decision" => decision),
    );
}

type CounterCache = RefCell<Vec<(&'static str, &'static str, Counter)>>;

thread_local! {
    static REQUEST_COUNTERS: CounterCache = const { RefCell::new(Vec::new()) };
    static RATE_COUNTERS: CounterCache = const { RefCell::new(Vec::new()) };
}

/// Increments a per-request counter through a handle this thread keeps. The `counter!`
/// macro builds its key, labels and all, on every call (two allocations per request
/// in the malloc profile) and looks it up in the recorder's registry; a handle is one
/// atomic add. Label values come from fixed sets, so each cache stays a few entries.
fn cached(
    cache: &'static std::thread::LocalKey<CounterCache>,
    a: &'static str,
    b: &'static str,
    make: impl FnOnce() -> Counter,
) {
    // No recorder (metrics off, or not yet installed): nothing would be kept, and a
    // handle made now would stay a no-op after an install, so nothing is done at all.
    if !matches!(HANDLE.get(), Some(Some(_))) {
        return;
    }
    cache.with(|c| {
        let Ok(mut c) = c.try_borrow_mut() else {
            // Re-entered from inside `make` (a recorder that records): count directly.
            return make().increment(1);
        };
        if let Some((_, _, counter)) = c.iter().find(|(x, y, _)| *x == a && *y == b) {
            return counter.increment(1);
        }
        let counter = make();
        counter.increment(1);
        c.push((a, b, counter));
    });
}

/// A SIGHUP reload: applied (`ok`) or refused and the old config kept (`error`).
pub fn config_reload(ok: bool) {
    counter!(CONFIG_RELOADS, "result" => if ok { "ok" } else { "error" }).increment(1);
}

/// Both series exist from start-up, so an alert on `error` sees a zero before the first
/// failure rather than no series at all.
pub fn config_reload_series() {
    counter!(CONFIG_RELOADS, "result" => "ok").increment(0);
    counter!(CONFIG_RELOADS, "result" => "error").increment(0);
}

/// A streaming completion request whose body keygate read for `include_usage`:
/// `asked` (keygate asked on the client's behalf), `client_asked`, or `unchanged`
/// (not a stream keygate could read).
pub fn stream_usage(outcome: &'static str) {
    counter!(STREAM_USAGE, "outcome" => outcome).increment(1);
}

/// A client connection that never completed its TLS handshake: `timeout` (silent past
/// `server.header_read_timeout`) or `error` (not TLS, no shared cipher, bad hello).
pub fn tls_handshake_failed(reason: &'static str) {
    counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
}

fn status_label(status: u16) -> &'static str {
    // A fixed label set keeps the series count bounded whatever upstreams answer.
    match status {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        413 => "413",
        429 => "429",
        431 => "431",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}
