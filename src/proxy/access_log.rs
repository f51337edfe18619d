//! The access-log line: one per request, at info, target `keygate::access`.
//!
//! `serve`'s buffered logger installs a sink here ([`install`]); a line then is written
//! by hand, in exactly the bytes `tracing-subscriber`'s text or JSON formatter would
//! make of the same event (`tests` compares the two), and appended to the log buffer.
//! Through `tracing` it cost about 3 µs per request (field visitors, `core::fmt`, float
//! formatting): a fifth of keygate's whole CPU per request. Without a sink (a terminal,
//! which gets colours, the library in tests), the line goes through `tracing` itself.
//! Either way, `RUST_LOG`/`log.level` filtering applies as for any event.
//!
//! Owns the line's fields and both formats. Not where bytes go (`cli::logging`) or
//! whether the log is on (`log.access_log`, `Trace::access`).

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};

use crate::config::LogFormat;
use crate::model::AuthRecord;

/// Takes one finished line, newline included.
pub type WriteLine = Box<dyn Fn(&[u8]) + Send + Sync>;

/// Where finished lines go, and in which format they are made.
pub struct Sink {
    pub format: LogFormat,
    pub write: WriteLine,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends access lines to `sink` instead of through `tracing`. Once per process, by the
/// logger that owns the subscriber (which must then format without colours); returns
/// false if a sink was already installed.
pub fn install(sink: Sink) -> bool {
    SINK.set(sink).is_ok()
}

/// One request's line.
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub method: &'a Method,
    pub path: &'a str,
    pub status: StatusCode,
    pub error: Option<&'static str>,
    pub record: Option<&'a AuthRecord>,
    pub total: Duration,
    pub upstream: Option<Duration>,
    pub overhead: Duration,
}

/// Logs `e` if info is enabled for `keygate::access`.
pub fn write(e: &Entry<'_>) {
    if !tracing::enabled!(target: "keygate::access", tracing::Level::INFO) {
        return;
    }
    let Some(sink) = SINK.get() else {
        return through_tracing(e);
    };
    thread_local! {
        static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    LINE.with_borrow_mut(|line| {
        line.clear();
        format(line, sink.format, SystemTime::now(), e);
        (sink.write)(line);
    });
}

fn through_tracing(e: &Entry<'_>) {
    let (org, key) = (e.record.map(|r| r.organization_id), e.record.map(|r| r.key_id));
    tracing::info!(
        target: "keygate::access",
        request_id = e.request_id,
        method = %e.method,
        path = e.path,
        status = e.status.as_u16(),
        error = e.error,
        org = org.map(tracing::field::display),
        key_id = key.map(tracing::field::display),
        key = e.record.map(|r| tracing::field::display(r.display_hint())),
        total_ms = ms(e.total),
        upstream_ms = e.upstream.map(ms),
        overhead_ms = ms(e.overhead),
    );
}

/// `d` in milliseconds, rounded to the microsecond: a float that prints as at most
/// three decimals (`0.002`), where `as_secs_f64() * 1000.0` printed binary noise
/// (`0.0020719999999999996`).
pub(super) fn ms(d: Duration) -> f64 {
    // The quotient is the double nearest to n/1000, which prints back as n/1000.
    micros(d) as f64 / 1000.0
}

pub(super) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().saturating_add(500) / 1000).unwrap_or(u64::MAX)
}

/// The line for `e` logged at `at`, newline included, appended to `out`.
fn format(out: &mut Vec<u8>, format: LogFormat, at: SystemTime, e: &Entry<'_>) {
    let mut line = Line {
        out,
        json: format == LogFormat::Json,
        first: true,
    };
    line.start(at);
    line.str("request_id", e.request_id);
    line.raw("method", e.method.as_str().as_bytes());
    line.str("path", e.path);
    line.number("status", u64::from(e.status.as_u16()));
    if let Some(error) = e.error {
        line.str("error", error);
    }
    if let Some(r) = e.record {
        let mut uuid = uuid::Uuid::encode_buffer();
        line.raw("org", r.organization_id.hyphenated().encode_lower(&mut uuid).as_bytes());
        line.raw("key_id", r.key_id.hyphenated().encode_lower(&mut uuid).as_bytes());
        line.hint("key", r.key_prefix(), r.key_hint());
    }
    line.millis("total_ms", e.total);
    if let Some(up) = e.upstream {
        line.millis("upstream_ms", up);
    }
    line.millis("overhead_ms", e.overhead);
    line.end();
}

/// A line being written: `key=value` pairs after `…  INFO keygate::access: ` in text,
/// members of `"fields"` in JSON.
struct Line<'a> {
    out: &'a mut Vec<u8>,
    json: bool,
    first: bool,
}

impl Line<'_> {
    fn start(&mut self, at: SystemTime) {
        if self.json {
            self.out.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(self.out, at);
            self.out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{");
        } else {
            timestamp(self.out, at);
            self.out.extend_from_slice(b"  INFO keygate::access: ");
        }
    }

    fn end(&mut self) {
        if self.json {
            self.out.extend_from_slice(b"},\"target\":\"keygate::access\"}\n");
        } else {
            self.out.push(b'\n');
        }
    }

    fn name(&mut self, name: &str) {
        if !std::mem::take(&mut self.first) {
            self.out.push(if self.json { b',' } else { b' ' });
        }
        if self.json {
            self.out.push(b'"');
            self.out.extend_from_slice(name.as_bytes());
            self.out.extend_from_slice(b"\":");
        } else {
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(b'=');
        }
    }

    /// A string field: quoted in both formats, escaped as each formatter escapes.
    fn str(&mut self, name: &str, v: &str) {
        self.name(name);
        if plain(v) {
            self.out.push(b'"');
            self.out.extend_from_slice(v.as_bytes());
            self.out.push(b'"');
        } else if self.json {
            let _ = serde_json::to_writer(&mut *self.out, v);
        } else {
            let _ = write!(self.out, "{v:?}");
        }
    }

    /// A `Display` field whose text needs no escaping (ASCII tokens, UUIDs): bare in
    /// text, a JSON string.
    fn raw(&mut self, name: &str, v: &[u8]) {
        self.name(name);
        if self.json {
            self.out.push(b'"');
            self.out.extend_from_slice(v);
            self.out.push(b'"');
        } else {
            self.out.extend_from_slice(v);
        }
    }

    /// `pk_test_…zh3g`, as `AuthRecord::display_hint` shows it: bare in text (a
    /// `Display` field), a JSON string.
    fn hint(&mut self, name: &str, prefix: &str, hint: &str) {
        if self.json && !(plain(prefix) && plain(hint)) {
            return self.str(name, &format!("{prefix}…{hint}"));
        }
        self.name(name);
        if self.json {
            self.out.push(b'"');
        }
        self.out.extend_from_slice(prefix.as_bytes());
        self.out.extend_from_slice("…".as_bytes());
        self.out.extend_from_slice(hint.as_bytes());
        if self.json {
            self.out.push(b'"');
        }
    }

    fn number(&mut self, name: &str, v: u64) {
        self.name(name);
        self.out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }

    /// `d` as [`ms`] prints it (`{:?}` in text, as serde_json does in JSON): `0.529`,
    /// `1.5`, `2.0`.
    fn millis(&mut self, name: &str, d: Duration) {
        self.name(name);
        let us = micros(d);
        if us >= 1 << 53 {
            // Past what the float holds exactly: let the formatter decide.
            let v = ms(d);
            if self.json {
                let _ = serde_json::to_writer(&mut *self.out, &v);
            } else {
                let _ = write!(self.out, "{v:?}");
            }
            return;
        }
        self.out
            .extend_from_slice(itoa::Buffer::new().format(us / 1000).as_bytes());
        let frac = us % 1000;
        let digits = [
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ];
        let keep = match frac {
            0 => 1,
            f if f % 100 == 0 => 1,
            f if f % 10 == 0 => 2,
            _ => 3,
        };
        self.out.push(b'.');
        self.out.extend_from_slice(&digits[..keep]);
    }
}

/// Printable ASCII without quote or backslash: written as is, quoted, by both
/// formatters (anything else goes through their own escaping).
fn plain(s: &str) -> bool {
    s.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

/// RFC 3339 in UTC with microseconds, as `tracing-subscriber`'s `SystemTime` timer
/// writes it: `2026-12-02T12:52:56.130532Z`.
fn timestamp(out: &mut Vec<u8>, at: SystemTime) {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX));
    let two = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&[b'0' + (v / 10 % 10) as u8, b'0' + (v % 10) as u8]);
    let _ = write!(out, "{y:04}");
    out.push(b'-');
    two(out, m);
    out.push(b'-');
    two(out, d);
    out.push(b'T');
    two(out, rem / 3600);
    out.push(b':');
    two(out, rem / 60 % 60);
    out.push(b':');
    two(out, rem % 60);
    out.push(b'.');
    let us = u64::from(since.subsec_micros());
    let mut digits = [b'0'; 6];
    for (i, slot) in digits.iter_mut().enumerate() {
        *slot = b'0' + (us / 10u64.pow(5 - i as u32) % 10) as u8;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = i64::try_from(yoe).unwrap_or(0) + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
#[path = "access_log_tests.rs"]
mod tests;
