//! `keygate healthcheck`: a container probe that needs no curl in the image.

use std::time::Duration;

use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::CliError;
use crate::config::Config;

/// GETs `/healthz` (or `/readyz` with `ready`) on the admin listener, else the main
/// one; succeeds only on a 200 within `timeout`.
pub async fn run(cfg: &Config, url: Option<&str>, ready: bool, timeout: Duration) -> Result<(), CliError> {
    let path = if ready { "/readyz" } else { "/healthz" };
    let url = match url {
        Some(u) => u.to_string(),
        None => {
            let mut addr = cfg.server.admin_listen.unwrap_or(cfg.server.listen);
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}{path}")
        }
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|_| CliError::Usage(format!("`{url}` is not a URL")))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let resp = tokio::time::timeout(timeout, client.get(uri))
        .await
        .map_err(|_| CliError::Usage(format!("{url}: no answer within {timeout:?}")))?
        .map_err(|e| CliError::Usage(format!("{url}: {e}")))?;
    if resp.status() == http::StatusCode::OK {
        eprintln!("{url}: ok");
        Ok(())
    } else {
        Err(CliError::Usage(format!("{url}: status {}", resp.status())))
    }
}
