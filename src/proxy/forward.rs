//! The upstream side: a pooled keep-alive client (plain HTTP or rustls), the request
//! target, and the timeouts that turn upstream trouble into 502 or 504.
//!
//! It sends what the pipeline prepared and classifies failures; header policy lives in
//! `headers`, and it never reads or buffers a body. With per-core workers each worker
//! has a client (and so a connection pool) of its own: a pooled connection is driven by
//! the runtime that opened it, so sharing one pool would wake other threads per request.

use std::time::Duration;

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::LimitedBody;
use super::error::Reject;
use crate::config::UpstreamConfig;

pub type UpstreamBody = LimitedBody<Incoming>;

type UpstreamClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

pub struct Upstream {
    /// One per worker (`workers::current()` picks); one in all for the shared runtime.
    clients: Vec<UpstreamClient>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Base path without a trailing slash; empty for the root.
    base_path: String,
    response_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("cannot load TLS roots: {0}")]
    Tls(String),
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, workers: usize) -> Result<Self, UpstreamSetupError> {
        let clients = (0..workers.max(1)).map(|_| client(cfg)).collect::<Result<_, _>>()?;
        let base = cfg.url.path().trim_end_matches('/').to_string();
        Ok(Upstream {
            clients,
            scheme: cfg.url.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP),
            authority: cfg
                .url
                .authority()
                .cloned()
                .ok_or_else(|| UpstreamSetupError::Tls("upstream has no host".into()))?,
            base_path: base,
            response_timeout: cfg.response_timeout,
        })
    }
}

/// A pooled keep-alive client for the upstream.
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
    pub fn target(&self, pq: Option<&PathAndQuery>) -> Result<Uri, Reject> {
        let pq = pq.map_or("/", PathAndQuery::as_str);
        let joined = if self.base_path.is_empty() {
            pq.to_string()
        } else {
            format!("{}{pq}", self.base_path)
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(joined)
            .build()
            .map_err(|_| Reject::UpstreamUnavailable)
    }

    /// Sends a prepared request. Errors are classified, never described to the client.
    pub async fn send(&self, mut req: Request<UpstreamBody>) -> Result<Response<Incoming>, SendError> {
        // The pooled client picks HTTP/1.1 or h2 per connection; the client's version
        // says nothing about the upstream's.
        *req.version_mut() = Version::HTTP_11;
        let client = &self.clients[super::workers::current() % self.clients.len()];
        match tokio::time::timeout(self.response_timeout, client.request(req)).await {
            Err(_) => Err(SendError::Timeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => {
                tracing::warn!(error = %e, "upstream connect failed");
                Err(SendError::Connect)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upstream request failed");
                Err(SendError::Other)
            }
        }
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
