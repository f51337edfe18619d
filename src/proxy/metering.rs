//! Turning a finished exchange into one usage row: the response body is wrapped so
//! that when it ends, fails, or is dropped because the client went away, exactly one
//! [`UsageRecord`] goes to the writer, with tokens seen in the body so far.
//!
//! A client that hangs up mid-answer does not take the tokens with it: the upstream's
//! body is read on for up to [`DRAIN`] after it left, so a stream whose usage comes last
//! (OpenAI's usage chunk, after the finish chunk a client may stop at) is still billed.
//!
//! Owns what a row says about a request (client address, truncations, error class).
//! It does not write rows (`usage::writer`) or read tokens (`usage::meter`).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body::{Body, Frame, SizeHint};

use super::body::{BoxError, ProxyBody};
use super::bounded::DeadlineExceeded;
use crate::config::Pricing;
use crate::model::AuthRecord;
use crate::usage::meter::{cost_micros, TokenMeter};
use crate::usage::writer::UsageSink;
use crate::usage::{self, UsageRecord};

/// Everything about a request that its usage row needs, captured once the key is known.
pub struct PendingUsage {
    started: Instant,
    record: UsageRecord,
}

impl PendingUsage {
    /// Runs once per identified request: it copies only what must outlive the request
    /// (path, user agent) and reads the clock once, for both the timestamp and the id.
    pub fn new<B>(req: &Request<B>, rec: &AuthRecord, ip: IpAddr, started: Instant, at: DateTime<Utc>) -> Self {
        let ua = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok());
        PendingUsage {
            started,
            record: UsageRecord {
                id: usage_id(at),
                api_key_id: rec.key_id,
                organization_id: rec.organization_id,
                timestamp: at,
                endpoint: usage::truncate(req.uri().path(), usage::ENDPOINT_MAX).to_string(),
                method: method_text(req.method()),
                status_code: 0,
                response_time_ms: 0,
                prompt_tokens: None,
                completion_tokens: None,
                tokens_used: None,
                cost_micros: None,
                model: None,
                ip_address: Some(ip),
                user_agent: ua.map(|u| usage::truncate(u, usage::USER_AGENT_MAX).to_string()),
                error_code: None,
                error_message: None,
            },
        }
    }

    /// The client went away before the response began (the request's future was
    /// dropped): the row still goes in, as 499 the way nginx logs it.
    pub fn abandoned(mut self, sink: &UsageSink) {
        self.record.status_code = 499;
        self.record.response_time_ms = i32::try_from(self.started.elapsed().as_millis()).unwrap_or(i32::MAX);
        if self.record.error_code.is_none() {
            self.set_error("client_disconnected", "the client went away before the response began");
        }
        sink.record(self.record);
    }

    /// keygate refused or failed the request itself.
    pub fn set_error(&mut self, code: &'static str, message: &'static str) {
        self.record.error_code = Some(Cow::Borrowed(code));
        self.record.error_message = Some(Cow::Borrowed(message));
    }
}

/// A UUID v7 from the request's own timestamp. No shared context: the process-wide
/// one `Uuid::now_v7` uses is a lock every request thread would contend on, and ids
/// need only be unique (74 random bits per millisecond), not ordered within one.
fn usage_id(at: DateTime<Utc>) -> uuid::Uuid {
    let secs = u64::try_from(at.timestamp()).unwrap_or(0);
    uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        secs,
        at.timestamp_subsec_nanos(),
    ))
}

/// The method as the column takes it; borrowed for every standard method.
fn method_text(m: &Method) -> Cow<'static, str> {
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    match STANDARD.iter().find(|(s, _)| s == m) {
        Some((_, text)) => Cow::Borrowed(text),
        None => Cow::Owned(usage::truncate(m.as_str(), usage::METHOD_MAX).to_owned()),
    }
}

/// The client's address: the peer, unless the peer is a trusted proxy, in which case
/// the nearest `X-Forwarded-For` hop that is not itself trusted. An untrusted peer's
/// `X-Forwarded-For` decides nothing.
pub fn client_ip(peer: SocketAddr, h: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut ip = peer.ip();
    if !is_trusted(&ip) {
        return ip;
    }
    let hops: Vec<&str> = h
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(hop_ip) => {
                ip = hop_ip;
                if !is_trusted(&hop_ip) {
                    break;
                }
            }
            // A garbled hop: stop at the last address we could believe.
            Err(_) => break,
        }
    }
    ip
}

/// The failure class of an upstream answer, for `error_code`.
fn upstream_class(status: StatusCode) -> Option<(&'static str, &'static str)> {
    if status.is_server_error() {
        Some(("upstream_error", "the upstream answered with a server error"))
    } else if status.is_client_error() {
        Some(("upstream_client_error", "the upstream refused the request"))
    } else {
        None
    }
}

/// How long an upstream answer is read on after its client hung up, for its usage: long
/// enough for a usage chunk that follows the finish chunk, short enough that the
/// upstream is still told of the hang-up within a second (the generation it is asked
/// to stop costs the operator too).
pub const DRAIN: std::time::Duration = std::time::Duration::from_millis(500);

const CLIENT_GONE: (&str, &str) = (
    "client_disconnected",
    "the client closed the connection before the response ended",
);

/// A response body that records its request's usage row exactly once. Generic over
/// the body it wraps so an upstream body is boxed once, as `Metered<Bounded<_>>`, not
/// once as itself and again as this.
pub struct Metered<B = ProxyBody>
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
{
    /// `None` once handed to the drain task.
    inner: Option<B>,
    meter: Option<TokenMeter>,
    pending: Option<PendingUsage>,
    sink: UsageSink,
    pricing: Arc<Pricing>,
    /// The client has gone and this is the drain: the row says so however it ends.
    gone: bool,
}

impl<B> Metered<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
{
    /// `from_upstream`: the body is the upstream's (tokens are read from it, and its
    /// status classifies the row); otherwise keygate answered and `pending` holds why.
    pub fn wrap(
        resp: http::Response<B>,
        mut pending: PendingUsage,
        from_upstream: bool,
        tokens_header: Option<&http::HeaderName>,
        sink: UsageSink,
        pricing: Arc<Pricing>,
    ) -> http::Response<ProxyBody> {
        let status = resp.status();
        pending.record.status_code = i32::from(status.as_u16());
        let meter = from_upstream.then(|| {
            let header_total = tokens_header
                .and_then(|n| resp.headers().get(n))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<i64>().ok());
            // An encoded body (an upstream that compresses unasked, or one asked to by
            // `[upstream.headers]`) is passed on untouched and not read: its row gets
            // only the tokens header's total.
            let plain = resp
                .headers()
                .get(header::CONTENT_ENCODING)
                .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
            let content_type = resp.headers().get(header::CONTENT_TYPE).filter(|_| plain);
            TokenMeter::new(content_type, header_total)
        });
        if from_upstream {
            if let Some((code, message)) = upstream_class(status) {
                pending.set_error(code, message);
            }
        }
        resp.map(|inner| {
            http_body_util::BodyExt::boxed_unsync(Metered {
                inner: Some(inner),
                meter,
                pending: Some(pending),
                sink,
                pricing,
                gone: false,
            })
        })
    }

    fn ended(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    /// The client has gone mid-answer: reads on for [`DRAIN`] in a task of its own,
    /// feeding the meter, and records when the answer ends or the time is up. `false`
    /// when there is nothing to read for (keygate's own answer, or a body the meter
    /// does not read, such as a download) or no runtime to read on.
    fn drain(&mut self) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        if !self.meter.as_ref().is_some_and(TokenMeter::reads_body) || self.gone {
            return false;
        }
        let Some(inner) = self.inner.take() else {
            return false;
        };
        let mut rest = Metered {
            inner: Some(inner),
            meter: self.meter.take(),
            pending: self.pending.take(),
            sink: self.sink.clone(),
            pricing: self.pricing.clone(),
            gone: true,
        };
        rt.spawn(async move {
            let read = async { while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut rest).await {} };
            let _ = tokio::time::timeout(DRAIN, read).await;
            // Dropping `rest` records the row, with whatever the meter read.
        });
        true
    }
}

impl<B> Metered<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
{
    fn finish(&mut self, failure: Option<(&'static str, &'static str)>) {
        let Some(PendingUsage { started, mut record }) = self.pending.take() else {
            return;
        };
        record.response_time_ms = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
        if let Some((code, message)) = failure {
            record.error_code = Some(Cow::Borrowed(code));
            record.error_message = Some(Cow::Borrowed(message));
        }
        if let Some(meter) = self.meter.take() {
            let tokens = meter.into_tokens();
            record.cost_micros = cost_micros(&self.pricing, &tokens);
            record.prompt_tokens = tokens.prompt.and_then(|n| i32::try_from(n).ok());
            record.completion_tokens = tokens.completion.and_then(|n| i32::try_from(n).ok());
            record.tokens_used = tokens.total.and_then(|n| i32::try_from(n).ok());
            record.model = tokens.model.map(|mut m| {
                let keep = usage::truncate(&m, usage::MODEL_MAX).len();
                m.truncate(keep);
                m
            });
        }
        self.sink.record(record);
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let end = this.gone.then_some(CLIENT_GONE);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(meter), Some(data)) = (this.meter.as_mut(), frame.data_ref()) {
                    meter.feed(data);
                }
                if inner.is_end_stream() {
                    this.finish(end);
                }
            }
            Poll::Ready(Some(Err(e))) if e.is::<DeadlineExceeded>() => this.finish(Some((
                "request_timeout",
                "the response ran past the request's total deadline",
            ))),
            Poll::Ready(Some(Err(_))) => this.finish(Some((
                "upstream_stream_error",
                "the upstream broke off the response body",
            ))),
            Poll::Ready(None) => this.finish(end),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(Body::size_hint).unwrap_or_default()
    }
}

impl<B> Drop for Metered<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
{
    fn drop(&mut self) {
        if self.pending.is_none() {
            return;
        }
        // Dropped before the end: the client went away (or the connection died). The
        // row still goes in, with what was streamed so far, or after the drain, with
        // what came in the meantime.
        if self.ended() {
            self.finish(self.gone.then_some(CLIENT_GONE));
        } else if !self.drain() {
            self.finish(Some(CLIENT_GONE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", v.parse().expect("value"));
        h
    }

    /// An answer whose client hung up is read on only when the meter reads its kind of
    /// body: a download is let go at once, an event stream's row waits for the drain.
    #[tokio::test]
    async fn only_a_body_the_meter_reads_is_drained() {
        let url = "postgres://keygate@127.0.0.1:1/none".to_string();
        let cfg =
            crate::config::Config::from_env(&move |n| (n == "DATABASE_URL").then(|| url.clone())).expect("config");
        for (content_type, drained) in [("application/octet-stream", false), ("text/event-stream", true)] {
            let (sink, _writer) = crate::usage::channel(&cfg.usage);
            let stats = sink.stats();
            let rec = AuthRecord::new(crate::model::test_fields("tstA", &["chat"]));
            let req = Request::post("/v1/x").body(()).expect("request");
            let pending = PendingUsage::new(&req, &rec, [127, 0, 0, 1].into(), Instant::now(), Utc::now());
            let first =
                futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"data: 1\n\n")))]);
            let body =
                http_body_util::StreamBody::new(futures_util::StreamExt::chain(first, futures_util::stream::pending()));
            let resp = http::Response::builder()
                .header(header::CONTENT_TYPE, content_type)
                .body(body)
                .expect("response");
            let resp = Metered::wrap(resp, pending, true, None, sink, Arc::new(Pricing::default()));
            let mut body = resp.into_body();
            assert!(http_body_util::BodyExt::frame(&mut body).await.is_some());
            drop(body);
            let recorded_now = stats.snapshot().queued;
            assert_eq!(
                recorded_now,
                u64::from(!drained),
                "{content_type}: recorded at the hang-up"
            );
            tokio::time::sleep(DRAIN + std::time::Duration::from_millis(300)).await;
            assert_eq!(stats.snapshot().queued, 1, "{content_type}: one row in the end");
        }
    }

    #[test]
    fn untrusted_peers_forwarded_for_decides_nothing() {
        let peer: SocketAddr = "203.0.113.9:5000".parse().expect("addr");
        assert_eq!(
            client_ip(peer, &xff("1.2.3.4"), &nets(&["10.0.0.0/8"])).to_string(),
            "203.0.113.9"
        );
    }

    #[test]
    fn trusted_peers_yield_the_nearest_untrusted_hop() {
        let peer: SocketAddr = "10.0.0.5:5000".parse().expect("addr");
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(peer, &xff("6.6.6.6, 198.51.100.7, 10.1.1.1"), &trusted).to_string(),
            "198.51.100.7"
        );
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted).to_string(), "10.0.0.5");
        assert_eq!(
            client_ip(peer, &xff("garbage, 10.2.2.2"), &trusted).to_string(),
            "10.2.2.2"
        );
    }
}
