//! The request path, as a pipeline: health → extract key → authenticate → authorise →
//! limit → forward. Each step either passes the request on or returns a [`Reject`];
//! [`Proxy::handle`] is the single place a rejection becomes a response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{BodyVerdict, LimitedBody, ProxyBody};
use super::error::Reject;
use super::forward::{SendError, Upstream};
use super::guard::{key_in_query, FailedAuth};
use super::headers::{self, RateHeaders};
use super::health::Health;
use super::metering::{client_ip, Metered, PendingUsage};
use super::routes::{covers, Routes};
use super::trace::Trace;
use crate::auth::{AuthError, Authenticator};
use crate::config::{AuthConfig, IdentityHeaders, Pricing, ServerConfig};
use crate::keys::PresentedKey;
use crate::limits::{Decision, KeyLimits, LimitKind, Limiter};
use crate::model::{AuthRecord, KeyStatus};
use crate::usage::writer::UsageSink;

pub struct Proxy {
    pub server: ServerConfig,
    pub auth_cfg: AuthConfig,
    pub identity: IdentityHeaders,
    pub routes: Routes,
    pub limits_enabled: bool,
    pub auth: Arc<Authenticator>,
    pub limiter: Arc<Limiter>,
    /// For seeding a key's counters the first time this process sees it.
    pub pool: deadpool_postgres::Pool,
    pub upstream: Upstream,
    pub health: Health,
    /// `None` when usage metering is off.
    pub usage: Option<UsageSink>,
    pub pricing: Arc<Pricing>,
    pub tokens_header: Option<http::HeaderName>,
    pub access_log: bool,
    pub failed_auth: FailedAuth,
}

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
    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        if let Some(resp) = self.health.answer(&req).await {
            return resp;
        }
        let mut trace = Trace::begin(req.headers_mut());
        let method = req.method().clone();
        // A clone shares the request line's bytes: no copy of the path per request.
        let uri = self.access_log.then(|| req.uri().clone());
        // Set once the key is identified: from then on every exit records a usage row.
        let mut pending = None;
        let (mut resp, from_upstream, error) = match self.proxy(req, peer, &mut trace, &mut pending).await {
            Ok(resp) => (resp, true, None),
            Err(f) => {
                if let Some(p) = pending.as_mut() {
                    p.set_error(f.reject.code(), f.reject.message());
                }
                (f.reject.into_response(f.rate.as_ref()), false, Some(f.reject.code()))
            }
        };
        let now = Instant::now();
        trace.stamp(resp.headers_mut(), now);
        crate::telemetry::request(
            error.unwrap_or("proxied"),
            resp.status().as_u16(),
            trace.overhead(now).as_secs_f64(),
            trace.upstream().map(|d| d.as_secs_f64()),
        );
        if let Some(uri) = &uri {
            trace.log(&method, uri.path(), resp.status(), error, now);
        }
        match (pending, &self.usage) {
            (Some(p), Some(sink)) => Metered::wrap(
                resp,
                p,
                from_upstream,
                self.tokens_header.as_ref(),
                sink.clone(),
                self.pricing.clone(),
            ),
            _ => resp,
        }
    }

    async fn proxy(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        trace: &mut Trace,
        pending: &mut Option<PendingUsage>,
    ) -> Result<Response<ProxyBody>, Failure> {
        check_head_size(&req, self.server.max_header_bytes)?;
        if key_in_query(req.uri().query()) {
            return Err(Reject::KeyInQuery.into());
        }
        let ip = client_ip(peer, req.headers(), &self.server.trusted_proxies);
        let record = self.identify(req.headers(), ip).await?;
        let Some(record) = record else {
            // Fail-open: the store is down and the operator chose availability.
            return Ok(self.forward(req, None, peer, trace).await?);
        };
        trace.record = Some(record.clone());
        if self.usage.is_some() {
            *pending = Some(PendingUsage::new(&req, &record, ip, trace.started, Utc::now()));
        }
        authorise(&record, &req, &self.routes)?;
        check_content_length(req.headers(), self.server.max_body_bytes)?;
        let rate = self.limit(&record).await?;
        let mut resp = self
            .forward(req, Some(&record), peer, trace)
            .await
            .map_err(|reject| Failure { reject, rate })?;
        if let Some(rate) = rate {
            rate.apply(resp.headers_mut());
        }
        Ok(resp)
    }

    /// Extract and authenticate. `Ok(None)` only when failing open. A client that has
    /// presented too many invalid keys this minute gets no further database lookups
    /// (keys already cached still work, so a flood behind a shared address does not
    /// lock out its legitimate neighbours).
    async fn identify(&self, h: &HeaderMap, ip: std::net::IpAddr) -> Result<Option<Arc<AuthRecord>>, Reject> {
        let now = Utc::now().timestamp();
        let minute = now.div_euclid(60);
        let invalid = || {
            self.failed_auth.record(ip, minute);
            Reject::InvalidKey
        };
        let raw = headers::extract_key(h, &self.auth_cfg.key_sources)?;
        let presented = PresentedKey::parse(raw).map_err(|_| invalid())?;
        let digest = presented.digest();
        let answer = match self.auth.cached(&digest) {
            Some(answer) => answer,
            None if self.failed_auth.blocked(ip, minute) => {
                let retry_after_secs = u64::try_from(60 - now.rem_euclid(60)).unwrap_or(60);
                return Err(Reject::TooManyFailures { retry_after_secs });
            }
            None => self.auth.authenticate(&digest).await,
        };
        match answer {
            Ok(rec) => Ok(Some(rec)),
            Err(AuthError::Unknown) => Err(invalid()),
            Err(AuthError::StoreUnavailable) if self.auth_cfg.fail_open => {
                tracing::warn!(key = %presented.hint(), "key store unavailable; failing open");
                Ok(None)
            }
            Err(AuthError::StoreUnavailable) => Err(Reject::StoreUnavailable),
        }
    }

    async fn limit(&self, rec: &AuthRecord) -> Result<Option<RateHeaders>, Failure> {
        if !self.limits_enabled {
            return Ok(None);
        }
        let limits = KeyLimits::from_auth(rec);
        let now = Utc::now();
        self.limiter.ensure_seeded(&self.pool, &limits, now).await;
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
        req: Request<Incoming>,
        rec: Option<&AuthRecord>,
        peer: SocketAddr,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, Reject> {
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
        h.remove(header::HOST);
        headers::strip_identity(h, &self.identity);
        if !self.upstream.forward_api_key {
            headers::strip_key(h, &self.auth_cfg.key_sources);
        }
        headers::set_forwarded(h, peer.ip(), host);
        for (name, value) in &self.upstream.extra_headers {
            h.insert(name.clone(), value.clone());
        }
        if let Some(rec) = rec {
            headers::add_identity(h, &self.identity, rec);
        }
        let verdict = Arc::new(BodyVerdict::default());
        let body = LimitedBody::new(
            body,
            self.server.max_body_bytes,
            self.server.body_idle_timeout,
            verdict.clone(),
        );
        trace.forwarded = Some(Instant::now());
        let sent = self.upstream.send(Request::from_parts(parts, body)).await;
        trace.answered = Some(Instant::now());
        let resp = sent.map_err(|e| {
            if verdict.too_large() {
                Reject::BodyTooLarge
            } else if verdict.idle() {
                Reject::BodyTimeout
            } else if e == SendError::Timeout {
                Reject::UpstreamTimeout
            } else {
                Reject::UpstreamUnavailable
            }
        })?;
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.map_err(Into::into).boxed_unsync()))
    }
}

fn authorise<B>(rec: &AuthRecord, req: &Request<B>, routes: &Routes) -> Result<(), Reject> {
    match rec.status(Utc::now()) {
        KeyStatus::Active => {}
        KeyStatus::Revoked => return Err(Reject::KeyRevoked),
        KeyStatus::Expired => return Err(Reject::KeyExpired),
        KeyStatus::Inactive => return Err(Reject::KeyDisabled),
    }
    if !rec.org_active {
        return Err(Reject::OrganizationDisabled);
    }
    if !covers(&rec.scopes, routes.required(req.method(), req.uri().path())) {
        return Err(Reject::MissingScope);
    }
    Ok(())
}

/// hyper's own limit is a backstop that answers without a body; this one answers JSON.
fn check_head_size<B>(req: &Request<B>, max: usize) -> Result<(), Reject> {
    let uri = req.uri();
    let mut size = uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + req.method().as_str().len()
        + 12;
    for (name, value) in req.headers() {
        size += name.as_str().len() + value.len() + 4;
        if size > max {
            return Err(Reject::HeadersTooLarge);
        }
    }
    Ok(())
}

fn check_content_length(h: &HeaderMap, max: u64) -> Result<(), Reject> {
    match h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(n) if n > max => Err(Reject::BodyTooLarge),
        _ => Ok(()),
    }
}
