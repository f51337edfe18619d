//! The admin API's failures and the one place they become responses.
//!
//! Every failure is an [`AdminError`] with a stable `code`, answered as
//! `{"error":{"code","message"}}` like the proxy's refusals. Owns the mapping from
//! [`DbError`]: what the caller did wrong is said plainly (its own slug or id, a field
//! rule), while database, pool and connection text is logged here and never sent.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};

use crate::db::DbError;
use crate::proxy::{full, ProxyBody};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("Send the admin token as `Authorization: Bearer <token>`.")]
    MissingToken,
    /// One answer for every wrong token, so a probe learns nothing from the difference.
    #[error("The admin token is not valid.")]
    WrongToken,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    KeyLimitReached(String),
    #[error("{0}")]
    Invalid(String),
    #[error("The request body is larger than {0} bytes.")]
    TooLarge(usize),
    #[error("This path does not accept that method.")]
    MethodNotAllowed(Vec<Method>),
    #[error("The database is unavailable; retry shortly.")]
    Unavailable,
    #[error("The request could not be completed.")]
    Internal,
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::MissingToken | AdminError::WrongToken => StatusCode::UNAUTHORIZED,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) | AdminError::KeyLimitReached(_) => StatusCode::CONFLICT,
            AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
            AdminError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable code, documented in `docs/admin-openapi.json`.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::MissingToken | AdminError::WrongToken => "unauthorized",
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::KeyLimitReached(_) => "key_limit_reached",
            AdminError::Invalid(_) => "invalid_request",
            AdminError::TooLarge(_) => "payload_too_large",
            AdminError::MethodNotAllowed(_) => "method_not_allowed",
            AdminError::Unavailable => "unavailable",
            AdminError::Internal => "internal",
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let body = serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut resp = json_response(self.status(), &body);
        match &self {
            AdminError::MissingToken | AdminError::WrongToken => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate-admin\""),
                );
            }
            AdminError::MethodNotAllowed(methods) => {
                let allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
                if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
                    resp.headers_mut().insert(header::ALLOW, v);
                }
            }
            _ => {}
        }
        resp
    }
}

impl From<DbError> for AdminError {
    fn from(e: DbError) -> Self {
        match e {
            // These messages name only what the caller sent (a slug, an id, a field rule).
            DbError::OrgNotFound(_) | DbError::KeyNotFound(_) => AdminError::NotFound(e.to_string()),
            DbError::OrgExists(_) | DbError::KeyRevoked(_) => AdminError::Conflict(e.to_string()),
            DbError::KeyLimitReached { .. } => AdminError::KeyLimitReached(e.to_string()),
            DbError::Invalid(m) => AdminError::Invalid(m),
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "admin API: database unavailable");
                AdminError::Unavailable
            }
            DbError::SchemaNotReady(_) | DbError::SchemaTooNew { .. } | DbError::SchemaMismatch(_) => {
                tracing::error!(error = %e, "admin API: database schema is not usable");
                AdminError::Unavailable
            }
            DbError::Query(q) if refused_value(&q) => {
                // A value the schema's own rules refused (too long, out of range, a
                // check): the caller's fault, but PostgreSQL's text stays in the log.
                tracing::info!(error = %q, "admin API: the database refused a value");
                AdminError::Invalid("A field's value is not accepted (too long, or out of range).".into())
            }
            e => {
                tracing::error!(error = %e, "admin API: request failed");
                AdminError::Internal
            }
        }
    }
}

/// SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation).
fn refused_value(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let c = c.code();
        c.starts_with("22") || c.starts_with("23")
    })
}

/// A JSON response that no cache keeps: some carry a plaintext key, shown once.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
