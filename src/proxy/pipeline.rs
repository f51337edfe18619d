//! The request path, as a pipeline: health → guards → normalize the path → extract key
//! → authenticate → authorise → limit → (for a streamed completion, ask for its usage)
//! → forward. Each step either passes the request on or returns a [`Reject`];
//! [`Proxy::handle`] is the single place a rejection becomes a response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::authorise::authorise;
use super::body::{BodyVerdict, LimitedBody, ProxyBody, UpstreamBody};
use super::bounded::Bounded;
use super::error::Reject;
use super::forward::{SendError, Upstream};
use super::guard::{check_content_length, check_head_size, key_in_query, FailedAuth};
use super::headers::{self, RateHeaders};
use super::health::Health;
use super::metering::{client_ip, Metered, PendingUsage};
use super::overrides;
use super::path;
use super::reload::{Live, Reloadable};
use super::stream_usage::{self, Prepared};
use super::trace::Trace;
use crate::auth::{AuthError, Authenticator};
use crate::config::ServerConfig;
use crate::keys::PresentedKey;
use crate::limits::{Concurrency, Decision, KeyLimits, LimitKind, Limiter, Slot};
use crate::model::AuthRecord;
use crate::usage::writer::UsageSink;

pub struct Proxy {
    /// Restart-only settings; what a SIGHUP may change is in `live`.
    pub server: ServerConfig,
    pub live: Live,
    pub auth: Arc<Authenticator>,
    pub limiter: Arc<Limiter>,
    /// In-flight requests per key, for `limits.max_concurrent_per_key` (0: not counted).
    pub concurrency: Concurrency,
    pub max_concurrent_per_key: u32,
    /// For seeding a key's counters the first time this process sees it.
    pub pool: deadpool_postgres::Pool,
    pub upstream: Upstream,
    pub health: Health,
    /// `None` when usage metering is off.
    pub usage: Option<UsageSink>,
    pub failed_auth: FailedAuth,
    /// Whether the upstream takes `stream_options` (`usage.inject_stream_usage`).
    pub stream_support: stream_usage::Support,
}

/// The upstream's answer on its way out, not yet metered or boxed.
type FromUpstream = Bounded<super::h1pool::PoolBody>;

/// A refusal, with the rate-limit state to report when a limit was consulted.
struct Failure {
    reject: Reject,
    rate: Option<RateHeaders>,
}

impl From<Reject> for Failure {
    fn from(reject: Reject) -> Self {
        Failure { reject, rate: None }
    }
}

impl Proxy {
    /// Never fails: every refusal is a response. The `Result` is hyper's service shape,
    /// returned from here so no wrapper future has to hold this one.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, std::convert::Infallible> {
        // The cold paths below are boxed (probes, key lookups, limiter seeding): their
        // futures are large, and inline they made this one 4 KiB, which hyper moves.
        if Health::is_probe(&req) {
            if let Some(resp) = Box::pin(self.health.answer(&req)).await {
                return Ok(resp);
            }
        }
        let mut trace = Trace::begin(req.headers_mut());
        // One snapshot for the whole request: a reload mid-request cannot mix two configs.
        let live = self.live.load_full();
        if live.access_log {
            trace.access = Some((req.method().clone(), req.uri().clone()));
        }
        // Set once the key is identified: from then on every exit records a usage row,
        // including the client going away while this future waits (the guard's drop).
        let mut pending = Unanswered(None, self.usage.as_ref());
        Ok(match self.proxy(req, peer, &live, &mut trace, &mut pending.0).await {
            // keygate asked for the usage chunk, so it is not the client's to see; the
            // meter inside has read it by then.
            Ok((resp, true)) => stream_usage::without_usage_chunk(self.finish(resp, None, trace, pending, &live)),
            Ok((resp, false)) => self.finish(resp, None, trace, pending, &live),
            Err(f) => {
                if let Some(p) = pending.0.as_mut() {
                    p.set_error(f.reject.code(), f.reject.message());
                }
                let code = Some(f.reject.code());
                let resp = f.reject.into_response(f.rate.as_ref());
                self.finish(resp, code, trace, pending, &live)
            }
        })
    }

    /// Every answer's last step, the upstream's (`error` is `None`) and keygate's own:
    /// timing headers, metrics, the access log, and the usage row's body wrapper.
    /// Generic so an upstream body is boxed once, with its meter around it.
    fn finish<B>(
        &self,
        mut resp: Response<B>,
        error: Option<&'static str>,
        mut trace: Trace,
        mut pending: Unanswered<'_>,
        live: &Reloadable,
    ) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = bytes::Bytes, Error = super::body::BoxError> + Send + Unpin + 'static,
    {
        let now = Instant::now();
        trace.stamp(resp.headers_mut(), now);
        crate::telemetry::request(
            error.unwrap_or("proxied"),
            resp.status().as_u16(),
            trace.overhead(now),
            trace.upstream(),
        );
        trace.log(resp.status(), error, now);
        match (pending.0.take(), &self.usage) {
            (Some(p), Some(sink)) => Metered::wrap(
                resp,
                p,
                error.is_none(),
                live.tokens_header.as_ref(),
                sink.clone(),
                live.pricing.clone(),
            ),
            _ => resp.map(BodyExt::boxed_unsync),
        }
    }

    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        live: &Reloadable,
        trace: &mut Trace,
        pending: &mut Option<PendingUsage>,
    ) -> Result<(Response<FromUpstream>, bool), Failure> {
        check_head_size(&req, self.server.max_header_bytes)?;
        if key_in_query(req.uri().query()) {
            return Err(Reject::KeyInQuery.into());
        }
        // A reverse proxy has no use for a tunnel, and an upstream that answered one
        // with 2xx would leave the connection's bytes unexamined (Envoy refuses too).
        if req.method() == http::Method::CONNECT {
            return Err(Reject::Tunnel.into());
        }
        // From here on, scopes, the usage row and the upstream all see one path.
        let lenient = path::normalize_request(&mut req).map_err(|_| Reject::PathMalformed)?;
        let ip = client_ip(peer, req.headers(), &live.trusted_proxies);
        // One clock read for the whole request: the failed-key minute, the key's
        // status, the limiter's window and the usage row all see its arrival.
        let now = Utc::now();
        let record = self.identify(req.headers(), ip, live, now).await?;
        let Some(record) = record else {
            // Fail-open: the store is down and the operator chose availability.
            let req = self.streaming(req, live);
            return Ok((self.forward(req, None, peer, live, trace, None).await?, false));
        };
        trace.record = Some(record);
        if self.usage.is_some() {
            *pending = Some(PendingUsage::new(&req, &record, ip, trace.started, now));
        }
        authorise(&record, &req, lenient.as_deref(), &live.routes, now)?;
        check_content_length(req.headers(), live.max_body_bytes)?;
        // Before the rate check, so a request refused here consumes no rate budget.
        let slot = self.take_slot(&record)?;
        let rate = self.limit(&record, live.limits_enabled, now).await?;
        let fail = |reject| Failure { reject, rate };
        let billed = pending.is_some();
        let Prepared {
            req,
            mut strip,
            original,
        } = self
            .prepare(req, lenient.as_deref(), billed, live, trace)
            .await
            .map_err(fail)?;
        let support = &self.stream_support;
        let mut resp = self
            .forward(req, Some(&record), peer, live, trace, slot)
            .await
            .map_err(fail)?;
        // The upstream may refuse `stream_options`: the client's own body then goes once
        // more, in place of the refused answer, which nobody has read.
        if let Some(original) = original.filter(|_| support.retry(resp.status())) {
            resp = Box::pin(self.unasked(*original, resp, &record, peer, live, trace))
                .await
                .map_err(fail)?;
            strip = false;
        }
        if let Some(rate) = rate {
            rate.apply(resp.headers_mut(), &mut trace.text);
        }
        Ok((resp, strip))
    }

    /// The request body for the upstream: streamed through, or, for a streamed
    /// completion with a usage row to bill (its tokens come only if asked for), read
    /// whole so `stream_usage` can ask for them.
    async fn prepare(
        &self,
        req: Request<Incoming>,
        lenient: Option<&str>,
        billed: bool,
        live: &Reloadable,
        trace: &Trace,
    ) -> Result<Prepared, Reject> {
        let support = &self.stream_support;
        if billed
            && live.inject_stream_usage
            && !http_body::Body::is_end_stream(req.body())
            && support.worth_asking()
            && stream_usage::eligible(req.uri().path(), lenient)
        {
            let deadline = tokio::time::Instant::from_std(trace.started + self.server.request_timeout);
            let (max, idle) = (live.max_body_bytes, live.body_idle_timeout);
            return Box::pin(stream_usage::ask(req, max, idle, deadline, support.learning())).await;
        }
        Ok(Prepared {
            req: self.streaming(req, live),
            strip: false,
            original: None,
        })
    }

    /// Sends the client's own request in place of `refused`, the answer to the one that
    /// asked for usage, and learns from the two answers whether the upstream takes
    /// `stream_options`. Cold, and boxed by its caller.
    async fn unasked(
        &self,
        original: Request<bytes::Bytes>,
        mut refused: Response<FromUpstream>,
        rec: &AuthRecord,
        peer: SocketAddr,
        live: &Reloadable,
        trace: &mut Trace,
    ) -> Result<Response<FromUpstream>, Reject> {
        let slot = refused.body_mut().take_slot();
        let named = stream_usage::names_stream_options(refused.into_body()).await;
        let req = original.map(|body| UpstreamBody::Whole(Some(body)));
        let resp = self.forward(req, Some(rec), peer, live, trace, slot).await?;
        self.stream_support.retried(named, resp.status());
        Ok(resp)
    }

    /// The client's body as it streams to the upstream, within the body limit and the
    /// idle timeout.
    fn streaming(&self, req: Request<Incoming>, live: &Reloadable) -> Request<UpstreamBody> {
        req.map(|body| {
            let verdict = Arc::new(BodyVerdict::default());
            UpstreamBody::Streaming(LimitedBody::new(
                body,
                live.max_body_bytes,
                live.body_idle_timeout,
                verdict,
            ))
        })
    }

    /// Extract and authenticate. `Ok(None)` only when failing open. A client that has
    /// presented too many invalid keys this minute gets no further database lookups
    /// (keys already cached still work, so a flood behind a shared address does not
    /// lock out its legitimate neighbours).
    async fn identify(
        &self,
        h: &HeaderMap,
        ip: std::net::IpAddr,
        live: &Reloadable,
        now: DateTime<Utc>,
    ) -> Result<Option<AuthRecord>, Reject> {
        let now = now.timestamp();
        let minute = now.div_euclid(60);
        let invalid = || {
            self.failed_auth.record(ip, minute);
            Reject::InvalidKey
        };
        let raw = headers::extract_key(h, &live.key_sources)?;
        let presented = PresentedKey::parse(raw).map_err(|_| invalid())?;
        let digest = presented.digest();
        let answer = match self.auth.cached(&digest) {
            Some(answer) => answer,
            None if self.failed_auth.blocked(ip, minute) => {
                let retry_after_secs = u64::try_from(60 - now.rem_euclid(60)).unwrap_or(60);
                return Err(Reject::TooManyFailures { retry_after_secs });
            }
            None => Box::pin(self.auth.authenticate(&digest)).await,
        };
        match answer {
            Ok(rec) => Ok(Some(rec)),
            Err(AuthError::Unknown) => Err(invalid()),
            Err(AuthError::StoreUnavailable) if live.fail_open => {
                tracing::warn!(key = %presented.hint(), "key store unavailable; failing open");
                Ok(None)
            }
            Err(AuthError::StoreUnavailable) => Err(Reject::StoreUnavailable),
            // Never failing open here: the flood being shed is one of random keys.
            Err(AuthError::Shed) => Err(Reject::TooManyUnknownKeys),
        }
    }

    fn take_slot(&self, rec: &AuthRecord) -> Result<Option<Slot>, Reject> {
        if self.max_concurrent_per_key == 0 {
            return Ok(None);
        }
        match self.concurrency.acquire(rec.key_id, self.max_concurrent_per_key) {
            Some(slot) => Ok(Some(slot)),
            None => Err(Reject::TooManyConcurrent),
        }
    }

    async fn limit(&self, rec: &AuthRecord, enabled: bool, now: DateTime<Utc>) -> Result<Option<RateHeaders>, Failure> {
        if !enabled {
            return Ok(None);
        }
        let limits = KeyLimits::from_auth(rec);
        if !self.limiter.is_known(&limits) {
            Box::pin(self.limiter.ensure_seeded(&self.pool, &limits, now)).await;
        }
        let decision = self.limiter.check(&limits, now);
        let info = decision.info();
        crate::telemetry::rate_decision(decision.is_allowed(), info.limit, info.remaining);
        let rate = Some(RateHeaders {
            limit: info.limit,
            remaining: info.remaining,
            reset_secs: info.reset_secs,
            reset_at_unix: now.timestamp() + i64::try_from(info.reset_secs).unwrap_or(0),
        });
        match decision {
            Decision::Allowed(_) => Ok(rate),
            Decision::Limited {
                which: LimitKind::PerMinute,
                retry_after_secs,
                ..
            } => Err(Failure {
                reject: Reject::RateLimited { retry_after_secs },
                rate,
            }),
            Decision::Limited {
                which: LimitKind::Monthly,
                retry_after_secs,
                ..
            } => Err(Failure {
                reject: Reject::QuotaExceeded { retry_after_secs },
                rate,
            }),
        }
    }

    async fn forward(
        &self,
        req: Request<UpstreamBody>,
        rec: Option<&AuthRecord>,
        peer: SocketAddr,
        live: &Reloadable,
        trace: &mut Trace,
        slot: Option<Slot>,
    ) -> Result<Response<FromUpstream>, Reject> {
        let (mut parts, body) = req.into_parts();
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        parts.uri = self.upstream.target(parts.uri.path_and_query())?;
        let h = &mut parts.headers;
        headers::strip_hop_by_hop(h);
        h.insert(header::HOST, self.upstream.host());
        headers::strip_identity(h, &live.identity);
        overrides::strip_path_overrides(h);
        if !live.forward_api_key {
            headers::strip_key(h, &live.key_sources);
        }
        headers::set_forwarded(h, peer.ip(), host, &mut trace.text);
        // The meter reads tokens from the body as it passes, which it cannot do once
        // compressed (the OpenAI SDKs' HTTP client asks for gzip). An operator
        // who wants compression anyway sets `accept-encoding` in `[upstream.headers]`.
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        for (name, value) in &live.upstream_headers {
            h.insert(name.clone(), value.clone());
        }
        if let Some(rec) = rec {
            headers::add_identity(h, &live.identity, rec, &mut trace.text);
        }
        let verdict = body.verdict();
        trace.forwarded = Some(Instant::now());
        let sent = self.upstream.send(Request::from_parts(parts, body)).await;
        trace.answered = Some(Instant::now());
        let resp = sent.map_err(|e| {
            if let Some(cut) = verdict.filter(|v| v.too_large() || v.idle() || v.malformed()) {
                cut.reject()
            } else if e == SendError::Timeout {
                Reject::UpstreamTimeout
            } else {
                Reject::UpstreamUnavailable
            }
        })?;
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        let deadline = tokio::time::Instant::from_std(trace.started + self.server.request_timeout);
        Ok(Response::from_parts(parts, Bounded::new(body, deadline, slot)))
    }
}

/// The usage row of a request whose future may be dropped mid-await (the client went
/// away): whatever is still here when it drops is recorded as abandoned.
struct Unanswered<'a>(Option<PendingUsage>, Option<&'a UsageSink>);

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let (Some(p), Some(sink)) = (self.0.take(), self.1) {
            p.abandoned(sink);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper stores the request future in its connection state and moves it there, so
    /// its size is a per-request `memcpy`. It was 8 KiB (an `async` wrapper holding a
    /// 4 KiB future with the cold paths inline) and is under 4 KiB; this keeps it from
    /// creeping back.
    #[test]
    #[allow(unreachable_code, unused_variables, clippy::diverging_sub_expression)]
    fn the_request_future_stays_small() {
        fn size_of_output<F>(_: &dyn Fn() -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size_of_output(&|| {
            let proxy: Arc<Proxy> = unimplemented!("only the type is needed");
            let req: Request<Incoming> = unimplemented!("only the type is needed");
            proxy.handle(req, SocketAddr::from(([127, 0, 0, 1], 0)))
        });
        eprintln!("request future: {size} bytes");
        assert!(size <= 4096, "the request future grew to {size} bytes");
    }
}
