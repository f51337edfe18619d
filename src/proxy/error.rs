//! The one place where a failed request becomes a response.
//!
//! Every refusal keygate makes is a [`Reject`] variant with a stable `code`; the JSON body
//! never carries key material, database text or upstream text. What the upstream itself
//! answers (including its errors) is passed through untouched and is not handled here.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::{full, ProxyBody};
use super::headers::RateHeaders;

/// Why keygate answered instead of the upstream. Cheap to build: no strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("missing API key")]
    MissingKey,
    /// Malformed, unknown or presented with the wrong scheme: one answer for all, so a
    /// probe learns nothing from the difference.
    #[error("invalid API key")]
    InvalidKey,
    #[error("API key revoked")]
    KeyRevoked,
    #[error("API key expired")]
    KeyExpired,
    #[error("API key disabled")]
    KeyDisabled,
    #[error("organization disabled")]
    OrganizationDisabled,
    #[error("missing scope")]
    MissingScope,
    #[error("rate limit exceeded")]
    RateLimited { retry_after_secs: u64 },
    #[error("monthly quota exceeded")]
    QuotaExceeded { retry_after_secs: u64 },
    #[error("too many concurrent requests")]
    TooManyConcurrent,
    #[error("too many failed authentications")]
    TooManyFailures { retry_after_secs: u64 },
    /// An uncached key while this second's lookups have found too many unknown keys,
    /// from all clients together: a flood, answered like the per-client limit above
    /// (429, so a flood sees 401 or 429 only), not as an outage.
    #[error("too many unknown keys")]
    TooManyUnknownKeys,
    #[error("API key in query string")]
    KeyInQuery,
    #[error("malformed request path")]
    PathMalformed,
    #[error("CONNECT refused")]
    Tunnel,
    #[error("request body too large")]
    BodyTooLarge,
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("request body timed out")]
    BodyTimeout,
    #[error("malformed request body")]
    BodyMalformed,
    /// A streaming request's body names `stream`, `stream_options` or `include_usage`
    /// twice: parsers disagree on which counts, so its usage could go unbilled.
    #[error("ambiguous request body")]
    BodyAmbiguous,
    #[error("key store unavailable")]
    StoreUnavailable,
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    #[error("upstream timed out")]
    UpstreamTimeout,
}

impl Reject {
    pub fn status(self) -> StatusCode {
        use Reject::*;
        match self {
            MissingKey | InvalidKey | KeyRevoked | KeyExpired | KeyDisabled => StatusCode::UNAUTHORIZED,
            OrganizationDisabled | MissingScope => StatusCode::FORBIDDEN,
            RateLimited { .. }
            | QuotaExceeded { .. }
            | TooManyFailures { .. }
            | TooManyUnknownKeys
            | TooManyConcurrent => StatusCode::TOO_MANY_REQUESTS,
            KeyInQuery | PathMalformed | BodyMalformed | BodyAmbiguous => StatusCode::BAD_REQUEST,
            Tunnel => StatusCode::NOT_IMPLEMENTED,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stable machine-readable code; clients and usage rows rely on these.
    pub fn code(self) -> &'static str {
        use Reject::*;
        match self {
            MissingKey => "missing_api_key",
            InvalidKey => "invalid_api_key",
            KeyRevoked => "key_revoked",
            KeyExpired => "key_expired",
            KeyDisabled => "key_disabled",
            OrganizationDisabled => "organization_disabled",
            MissingScope => "insufficient_scope",
            RateLimited { .. } => "rate_limit_exceeded",
            QuotaExceeded { .. } => "monthly_quota_exceeded",
            TooManyFailures { .. } => "too_many_failed_authentications",
            TooManyUnknownKeys => "too_many_unknown_keys",
            TooManyConcurrent => "too_many_concurrent_requests",
            KeyInQuery => "api_key_in_query",
            PathMalformed => "malformed_request_path",
            Tunnel => "method_not_supported",
            BodyTooLarge => "payload_too_large",
            HeadersTooLarge => "headers_too_large",
            BodyTimeout => "request_timeout",
            BodyMalformed => "malformed_request_body",
            BodyAmbiguous => "ambiguous_request_body",
            StoreUnavailable => "key_store_unavailable",
            UpstreamUnavailable => "upstream_unavailable",
            UpstreamTimeout => "upstream_timeout",
        }
    }

    pub fn message(self) -> &'static str {
        use Reject::*;
        match self {
            MissingKey => "Send your API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
            InvalidKey => "The API key is not valid.",
            KeyRevoked => "The API key has been revoked.",
            KeyExpired => "The API key has expired.",
            KeyDisabled => "The API key is disabled.",
            OrganizationDisabled => "The organization that owns this API key is disabled.",
            MissingScope => "The API key lacks a scope this route requires.",
            RateLimited { .. } => "Too many requests for this API key; retry after the time in Retry-After.",
            QuotaExceeded { .. } => "The organization's monthly request quota is used up.",
            TooManyFailures { .. } => "Too many requests with invalid API keys from this client; retry later.",
            TooManyUnknownKeys => {
                "Too many requests with unknown API keys are arriving; a key not used recently must retry shortly."
            }
            TooManyConcurrent => "This API key has too many requests in flight; retry when one finishes.",
            KeyInQuery => "Send the API key in a header, never in the URL; rotate a key that was sent in one.",
            PathMalformed => "The request path has a malformed `%` escape, or one of a control character.",
            Tunnel => "This gateway forwards requests to its upstream; it does not open tunnels.",
            BodyTooLarge => "The request body is larger than this gateway accepts.",
            HeadersTooLarge => "The request headers are larger than this gateway accepts.",
            BodyTimeout => "The request body stopped arriving.",
            BodyMalformed => "The request body is not valid HTTP framing.",
            BodyAmbiguous => "The request body gives `stream`, `stream_options` or `include_usage` more than once.",
            StoreUnavailable => "Keys cannot be verified right now; retry shortly.",
            UpstreamUnavailable => "The upstream service could not be reached.",
            UpstreamTimeout => "The upstream service did not answer in time.",
        }
    }

    fn retry_after(self) -> Option<u64> {
        match self {
            Reject::RateLimited { retry_after_secs }
            | Reject::QuotaExceeded { retry_after_secs }
            | Reject::TooManyFailures { retry_after_secs } => Some(retry_after_secs.max(1)),
            Reject::StoreUnavailable | Reject::TooManyUnknownKeys | Reject::TooManyConcurrent => Some(1),
            _ => None,
        }
    }

    /// The response for this refusal, with rate-limit headers when a limit was checked.
    pub fn into_response(self, rate: Option<&RateHeaders>) -> Response<ProxyBody> {
        let body = format!(
            r#"{{"error":{{"code":"{}","message":"{}"}}}}"#,
            self.code(),
            self.message()
        );
        let mut resp = Response::new(full(Bytes::from(body)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, Reject::MissingKey | Reject::InvalidKey) {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(rate) = rate {
            rate.apply(h, &mut super::header_text::HeaderText::new());
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_with_stable_codes() {
        let all = [
            Reject::MissingKey,
            Reject::InvalidKey,
            Reject::KeyRevoked,
            Reject::KeyExpired,
            Reject::KeyDisabled,
            Reject::OrganizationDisabled,
            Reject::MissingScope,
            Reject::RateLimited { retry_after_secs: 3 },
            Reject::QuotaExceeded { retry_after_secs: 0 },
            Reject::TooManyFailures { retry_after_secs: 9 },
            Reject::TooManyUnknownKeys,
            Reject::TooManyConcurrent,
            Reject::KeyInQuery,
            Reject::PathMalformed,
            Reject::Tunnel,
            Reject::BodyTooLarge,
            Reject::HeadersTooLarge,
            Reject::BodyTimeout,
            Reject::BodyMalformed,
            Reject::BodyAmbiguous,
            Reject::StoreUnavailable,
            Reject::UpstreamUnavailable,
            Reject::UpstreamTimeout,
        ];
        for r in all {
            let body = format!(r#"{{"error":{{"code":"{}","message":"{}"}}}}"#, r.code(), r.message());
            let v: serde_json::Value = serde_json::from_str(&body).expect("valid json");
            assert_eq!(v["error"]["code"], r.code());
            let resp = r.into_response(None);
            assert_eq!(resp.status(), r.status());
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        }
        let resp = Reject::QuotaExceeded { retry_after_secs: 0 }.into_response(None);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }
}
