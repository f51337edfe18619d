//! The upstream side: which pooled client sends (keygate's own HTTP/1 pool for plain
//! HTTP, `h1pool`; hyper-util's client for TLS, with h2 by ALPN), the request target,
//! and the timeouts that turn upstream trouble into 502 or 504.
//!
//! It sends what the pipeline prepared and classifies failures; header policy lives in
//! `headers`, and it never reads or buffers a body. With per-core workers each worker
//! has a pool of its own: a pooled connection is driven by the runtime that opened it,
//! so sharing one pool would wake other threads per request.

use std::sync::Arc;
use std::time::Duration;

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use super::body::UpstreamBody;
use super::error::Reject;
use super::h1pool::{H1Pool, PoolBody, PoolError};
use crate::config::UpstreamConfig;

type UpstreamClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// One per worker (`workers::current()` picks); one in all for the shared runtime.
enum Clients {
    /// Plain HTTP: keygate's own HTTP/1.1 keep-alive pool.
    Plain(Vec<Arc<H1Pool>>),
    /// TLS: hyper-util's pooled client, which negotiates h2 or HTTP/1.1 by ALPN.
    Tls(Vec<UpstreamClient>),
}

pub struct Upstream {
    clients: Clients,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Base path without a trailing slash; empty for the root.
    base_path: String,
    /// The `Host` the upstream gets, made once: the client's is not forwarded, and the
    /// pooled client would otherwise format this from the URI on every request.
    host: http::HeaderValue,
    response_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("cannot load TLS roots: {0}")]
    Tls(String),
    #[error("upstream URL: {0}")]
    Url(&'static str),
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, workers: usize) -> Result<Self, UpstreamSetupError> {
        let base = cfg.url.path().trim_end_matches('/').to_string();
        let scheme = cfg.url.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP);
        let authority = cfg.url.authority().cloned().ok_or(UpstreamSetupError::Url("no host"))?;
        let workers = workers.max(1);
        let clients = if scheme == http::uri::Scheme::HTTPS {
            Clients::Tls((0..workers).map(|_| client(cfg)).collect::<Result<_, _>>()?)
        } else {
            // `[::1]` in a URL is `::1` to connect to.
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = authority.port_u16().unwrap_or(80);
            let pool = || {
                let p = H1Pool::new(
                    host.clone(),
                    port,
                    cfg.connect_timeout,
                    cfg.pool_idle_timeout,
                    cfg.pool_max_idle_per_host,
                );
                Arc::new(p)
            };
            Clients::Plain((0..workers).map(|_| pool()).collect())
        };
        let host =
            host_header(&scheme, &authority).ok_or(UpstreamSetupError::Url("the host is not a valid Host header"))?;
        Ok(Upstream {
            clients,
            scheme,
            authority,
            base_path: base,
            host,
            response_timeout: cfg.response_timeout,
        })
    }
}

/// `Host` as hyper-util's client writes it: the host, and the port unless it is the
/// scheme's default. Userinfo never goes into `Host`.
fn host_header(scheme: &http::uri::Scheme, authority: &http::uri::Authority) -> Option<http::HeaderValue> {
    let default = if *scheme == http::uri::Scheme::HTTPS { 443 } else { 80 };
    let text = match authority.port_u16() {
        Some(p) if p != default => format!("{}:{p}", authority.host()),
        _ => authority.host().to_string(),
    };
    http::HeaderValue::from_str(&text).ok()
}

/// hyper-util's pooled keep-alive client, for a TLS upstream.
fn client(cfg: &UpstreamConfig) -> Result<UpstreamClient, UpstreamSetupError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| UpstreamSetupError::Tls(e.to_string()))?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .build(connector))
}

impl Upstream {
    /// The upstream URI for a client's path and query: base path + path, query kept.
    /// With no base path the client's own path is reused: it shares hyper's read
    /// buffer, so this is reference counts, not a copy (the pooled client clones the URI
    /// again, which for a fresh `String` would allocate once more).
    pub fn target(&self, pq: Option<&PathAndQuery>) -> Result<Uri, Reject> {
        let pq = match pq {
            Some(pq) if self.base_path.is_empty() => pq.clone(),
            None if self.base_path.is_empty() => PathAndQuery::from_static("/"),
            pq => {
                let pq = pq.map_or("/", PathAndQuery::as_str);
                PathAndQuery::from_maybe_shared(bytes::Bytes::from(format!("{}{pq}", self.base_path)))
                    .map_err(|_| Reject::UpstreamUnavailable)?
            }
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).map_err(|_| Reject::UpstreamUnavailable)
    }

    pub fn host(&self) -> http::HeaderValue {
        self.host.clone()
    }

    /// Sends a prepared request. Errors are classified, never described to the client.
    pub async fn send(&self, mut req: Request<UpstreamBody>) -> Result<Response<PoolBody>, SendError> {
        // The upstream's version is the pool's business; the client's says nothing
        // about it.
        *req.version_mut() = Version::HTTP_11;
        let worker = super::workers::current();
        match &self.clients {
            Clients::Plain(pools) => {
                // An HTTP/1.1 request line carries the origin form; hyper's connection
                // API writes the URI as it is given.
                let pq = req.uri().path_and_query().cloned();
                *req.uri_mut() = pq.map_or_else(|| Uri::from_static("/"), Uri::from);
                let pool = &pools[worker % pools.len()];
                // Boxed, as hyper-util's response future is: inline it would grow the
                // request future that hyper moves into its connection state.
                match tokio::time::timeout(self.response_timeout, Box::pin(pool.send(req))).await {
                    Err(_) => Err(SendError::Timeout),
                    Ok(Ok(resp)) => Ok(resp),
                    Ok(Err(e)) => Err(failed(matches!(e, PoolError::Connect(_)), &e)),
                }
            }
            Clients::Tls(clients) => {
                let client = &clients[worker % clients.len()];
                match tokio::time::timeout(self.response_timeout, client.request(req)).await {
                    Err(_) => Err(SendError::Timeout),
                    Ok(Ok(resp)) => Ok(resp.map(PoolBody::unpooled)),
                    Ok(Err(e)) => Err(failed(e.is_connect(), &e)),
                }
            }
        }
    }
}

/// Logs an upstream failure (the text stays in the log) and classifies it.
fn failed(connect: bool, e: &dyn std::fmt::Display) -> SendError {
    if connect {
        tracing::warn!(error = %e, "upstream connect failed");
        SendError::Connect
    } else {
        tracing::warn!(error = %e, "upstream request failed");
        SendError::Other
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    Connect,
    Timeout,
    /// Failed after connecting: the request body may have been cut off by its limits,
    /// or the upstream broke the exchange.
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Upstream {
        let cfg = UpstreamConfig {
            url: url.parse().expect("url"),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_host: 1,
            forward_api_key: false,
            headers: Vec::new(),
        };
        Upstream::new(&cfg, 1).expect("upstream")
    }

    #[test]
    fn targets_keep_the_query_and_join_the_base_path() {
        let pq = |s: &str| PathAndQuery::from_maybe_shared(bytes::Bytes::copy_from_slice(s.as_bytes())).expect("pq");
        let root = upstream("http://127.0.0.1:9000");
        let t = root.target(Some(&pq("/v1/chat?x=1"))).expect("target");
        assert_eq!(t, "http://127.0.0.1:9000/v1/chat?x=1");
        assert_eq!(root.target(None).expect("target"), "http://127.0.0.1:9000/");
        let based = upstream("https://api.example/base/");
        let t = based.target(Some(&pq("/v1/chat?x=1"))).expect("target");
        assert_eq!(t, "https://api.example/base/v1/chat?x=1");
        assert_eq!(based.target(None).expect("target"), "https://api.example/base/");
    }

    #[test]
    fn host_names_the_port_only_when_it_is_not_the_default() {
        assert_eq!(upstream("http://127.0.0.1:9000").host(), "127.0.0.1:9000");
        assert_eq!(upstream("http://up.internal:80").host(), "up.internal");
        assert_eq!(upstream("https://api.example").host(), "api.example");
        assert_eq!(upstream("https://api.example:8443/v1").host(), "api.example:8443");
        assert_eq!(upstream("http://[::1]:8080").host(), "[::1]:8080");
    }
}
