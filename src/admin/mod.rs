//! The admin HTTP API: organisations, keys and usage reports over JSON, under
//! `/admin/v1/` on the admin listener, described by `docs/admin-openapi.json`.
//!
//! Owns the admin token check (constant time), routing, the request body cap and the
//! request log line. It is off unless `[admin] token` is set: `proxy::serve` only hands
//! `/admin/` paths here when it is. It owns no storage rules: handlers call the same
//! `crate::db` functions as the CLI. Plaintext keys appear only in the one response
//! that creates them; neither keys nor the token are ever logged.

mod error;
mod handlers;
mod query;
pub mod routes;

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use error::AdminError;
pub use routes::{Op, Route, PREFIX, ROUTES};

use crate::config::{AdminToken, DatabaseConfig};
use crate::proxy::{full, ProxyBody};

/// The OpenAPI document, served at `GET /admin/v1/openapi.json` (token required, like
/// every admin path) and checked against [`ROUTES`] by a test.
pub const OPENAPI: &str = include_str!("../../docs/admin-openapi.json");

/// Largest request body accepted; admin requests are a few small JSON fields.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A whole request body must arrive within this, so a stalled client cannot keep a
/// request open indefinitely (bodies are read before any database work).
const BODY_DEADLINE: Duration = Duration::from_secs(10);

pub struct AdminApi {
    /// SHA-256 of the token: comparing digests takes the same time whatever the
    /// presented token's length, which comparing the strings would not.
    token_digest: [u8; 32],
    ctx: handlers::Ctx,
}

/// Whether `path` belongs to the admin API (when it is on).
pub fn owns(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

impl AdminApi {
    pub fn new(token: &AdminToken, pool: deadpool_postgres::Pool, db: DatabaseConfig) -> Self {
        AdminApi {
            token_digest: Sha256::digest(token.expose().as_bytes()).into(),
            ctx: handlers::Ctx { pool, db },
        }
    }

    /// Answers one admin request. Never fails: every error is a JSON response.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let resp = match self.answer(req).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
        // Method, path and status are enough to audit; never headers or bodies, which
        // carry the token and, in responses, plaintext keys.
        tracing::info!(target: "keygate::admin", %method, %path, status = resp.status().as_u16(), "admin request");
        resp
    }

    async fn answer<B>(&self, req: Request<B>) -> Result<Response<ProxyBody>, AdminError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // The token is checked before routing, so without it every path looks alike.
        authorize(&self.token_digest, req.headers())?;
        let (parts, body) = req.into_parts();
        let (op, param) = match routes::resolve(&parts.method, parts.uri.path()) {
            routes::Resolution::Found(op, param) => (op, param),
            routes::Resolution::MethodNotAllowed(allow) => return Err(AdminError::MethodNotAllowed(allow)),
            routes::Resolution::NotFound => return Err(AdminError::NotFound("No such admin path.".into())),
        };
        if op == Op::OpenApi {
            let mut resp = Response::new(full(Bytes::from_static(OPENAPI.as_bytes())));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(resp);
        }
        let bytes = read_body(&parts.headers, body).await?;
        let (status, value) = handlers::dispatch(&self.ctx, op, param, parts.uri.query(), &bytes).await?;
        Ok(error::json_response(status, &value))
    }
}

/// Accepts exactly one `Authorization: Bearer <token>` whose token is the admin token.
fn authorize(expected: &[u8; 32], headers: &HeaderMap) -> Result<(), AdminError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AdminError::MissingToken);
    };
    if values.next().is_some() {
        return Err(AdminError::WrongToken);
    }
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or(AdminError::WrongToken)?;
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    if bool::from(digest.ct_eq(expected)) {
        Ok(())
    } else {
        Err(AdminError::WrongToken)
    }
}

/// Collects a body of at most [`MAX_BODY_BYTES`] within [`BODY_DEADLINE`].
async fn read_body<B>(headers: &HeaderMap, body: B) -> Result<Bytes, AdminError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(AdminError::TooLarge(MAX_BODY_BYTES));
    }
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_DEADLINE, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(AdminError::TooLarge(MAX_BODY_BYTES)),
        Ok(Err(_)) => Err(AdminError::Invalid("the request body could not be read".into())),
        Err(_) => Err(AdminError::Invalid(format!(
            "the request body did not arrive within {}s",
            BODY_DEADLINE.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let token = "0123456789abcdef-admin";
        let expected: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        assert!(authorize(&expected, &headers(&[&format!("Bearer {token}")])).is_ok());
        assert!(authorize(&expected, &headers(&[&format!("bearer {token}")])).is_ok());
        assert!(matches!(
            authorize(&expected, &headers(&[])),
            Err(AdminError::MissingToken)
        ));
        let same_length = format!("Bearer {}", "x".repeat(token.len()));
        for bad in [
            same_length.as_str(),
            "Bearer ",
            "Bearer",
            &format!("Basic {token}"),
            &format!("Bearer {token}x"),
            &format!("Bearer {}", &token[1..]),
        ] {
            assert!(
                matches!(authorize(&expected, &headers(&[bad])), Err(AdminError::WrongToken)),
                "{bad:?}"
            );
        }
        let twice = format!("Bearer {token}");
        assert!(authorize(&expected, &headers(&[&twice, &twice])).is_err());
    }

    #[test]
    fn errors_never_echo_what_was_presented() {
        let body = AdminError::WrongToken.into_response();
        assert_eq!(body.status(), StatusCode::UNAUTHORIZED);
        assert!(body.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(AdminError::WrongToken.to_string(), "The admin token is not valid.");
    }

    #[test]
    fn the_openapi_document_is_json() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    }
}
