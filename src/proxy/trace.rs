//! Per-request identity and timing: the request id (taken from a well-formed client
//! `X-Request-Id` or made as a UUID v7), keygate's own share of the latency, the
//! `Server-Timing` / `X-Keygate-Overhead-Ms` response headers, and the access-log line.
//!
//! Logs name keys by prefix and hint only; the plaintext key never reaches this module.

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::header_text::HeaderText;
use crate::model::AuthRecord;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const OVERHEAD: HeaderName = HeaderName::from_static("x-keygate-overhead-ms");
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

pub struct Trace {
    pub id: HeaderValue,
    pub started: Instant,
    /// When the request was handed to the upstream client.
    pub forwarded: Option<Instant>,
    /// When the upstream's response headers arrived.
    pub answered: Option<Instant>,
    pub record: Option<AuthRecord>,
    /// Where this request's header values are written (`header_text`).
    pub text: HeaderText,
    /// The request line for the access log, kept only when the log is on. The URI is
    /// a clone sharing the request line's bytes, not a copy of the path.
    pub access: Option<(Method, http::Uri)>,
}

impl Trace {
    /// Starts a trace, adopting the client's request id when it is a sane token, and
    /// writes the id into the request headers so the upstream sees the same one.
    pub fn begin(headers: &mut HeaderMap) -> Trace {
        let mut text = HeaderText::new();
        // A client's value is a slice of hyper's read buffer, so the clone is a
        // reference count, as is the generated one's (it lives in `text`).
        let id = headers
            .get(&REQUEST_ID)
            .filter(|v| acceptable_id(v.as_bytes()))
            .cloned()
            .unwrap_or_else(|| {
                // No shared context: `now_v7`'s is a lock every request thread takes.
                let id = uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext));
                text.uuid(id).unwrap_or(HeaderValue::from_static("-"))
            });
        headers.insert(REQUEST_ID, id.clone());
        Trace {
            id,
            started: Instant::now(),
            forwarded: None,
            answered: None,
            record: None,
            text,
            access: None,
        }
    }

    /// keygate's own time: everything but the wait for the upstream's headers.
    pub fn overhead(&self, now: Instant) -> Duration {
        match (self.forwarded, self.answered) {
            (Some(f), Some(a)) => (f - self.started) + now.saturating_duration_since(a),
            (Some(f), None) => f - self.started,
            _ => now - self.started,
        }
    }

    pub fn upstream(&self) -> Option<Duration> {
        Some(self.answered? - self.forwarded?)
    }

    /// Adds the request id and timing headers to a response. Milliseconds with three
    /// decimals, written from integer microseconds: float formatting and two `String`s
    /// per header showed in the profile.
    pub fn stamp(&mut self, h: &mut HeaderMap, now: Instant) {
        h.insert(REQUEST_ID, self.id.clone());
        let overhead = self.overhead(now);
        let upstream = self.upstream();
        if let Some(v) = self.text.value(|b| millis(b, overhead)) {
            h.insert(OVERHEAD, v);
        }
        let timing = self.text.value(|b| {
            b.put_slice(b"keygate;dur=");
            millis(b, overhead);
            if let Some(up) = upstream {
                b.put_slice(b", upstream;dur=");
                millis(b, up);
            }
        });
        if let Some(v) = timing {
            h.append(SERVER_TIMING, v);
        }
    }

    /// One access-log line, at response-head time.
    pub fn log(&self, status: StatusCode, error: Option<&'static str>, now: Instant) {
        let Some((method, uri)) = &self.access else { return };
        super::access_log::write(&super::access_log::Entry {
            request_id: self.id.to_str().unwrap_or("-"),
            method,
            path: uri.path(),
            status,
            error,
            record: self.record.as_ref(),
            total: now - self.started,
            upstream: self.upstream(),
            overhead: self.overhead(now),
        });
    }
}

/// `d` in milliseconds with three decimals, rounded to the microsecond.
fn millis(b: &mut BytesMut, d: Duration) {
    let micros = super::access_log::micros(d);
    b.put_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
    let frac = micros % 1000;
    // Three digits, zero-padded: 7 µs is ".007".
    b.put_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// A client id is adopted only if it is short, visible ASCII: anything else could be
/// used to inject into logs or the upstream's headers.
fn acceptable_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopts_sane_ids_and_replaces_others() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(Trace::begin(&mut h).id, "abc-123");
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        let t = Trace::begin(&mut h);
        assert_ne!(t.id, "has space");
        assert_eq!(h[REQUEST_ID], t.id);
        let mut h = HeaderMap::new();
        let t = Trace::begin(&mut h);
        assert_eq!(t.id.len(), 36);
    }

    #[test]
    fn stamps_timing_headers() {
        let mut h = HeaderMap::new();
        let mut t = Trace::begin(&mut h);
        t.forwarded = Some(t.started + Duration::from_millis(1));
        t.answered = Some(t.started + Duration::from_millis(11));
        let mut out = HeaderMap::new();
        t.stamp(&mut out, t.started + Duration::from_millis(12));
        assert_eq!(out[OVERHEAD], "2.000");
        assert_eq!(out[SERVER_TIMING], "keygate;dur=2.000, upstream;dur=10.000");
    }

    #[test]
    fn milliseconds_keep_three_decimals() {
        let ms = |d: Duration| {
            let mut b = BytesMut::new();
            millis(&mut b, d);
            String::from_utf8(b.to_vec()).expect("ascii")
        };
        assert_eq!(ms(Duration::ZERO), "0.000");
        assert_eq!(ms(Duration::from_nanos(7_499)), "0.007");
        assert_eq!(ms(Duration::from_nanos(7_500)), "0.008");
        assert_eq!(ms(Duration::from_micros(12_345_678)), "12345.678");
        assert_eq!(ms(Duration::MAX), "18446744073709551.615", "saturates, never panics");
    }
}
