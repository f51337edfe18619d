//! The hand-written access line against `tracing-subscriber`'s own formatting of the
//! same event, in both formats: operators' parsers must not see a difference.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use tracing_subscriber::fmt::MakeWriter;

use super::*;
use crate::model::{AuthFields, AuthRecord, Plan};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// The line `tracing` makes of `e`, as `serve`'s subscriber is configured.
fn via_tracing(format: LogFormat, e: &Entry<'_>) -> String {
    let out = Captured::default();
    let builder = tracing_subscriber::fmt().with_writer(out.clone()).with_ansi(false);
    match format {
        LogFormat::Json => tracing::subscriber::with_default(builder.json().finish(), || through_tracing(e)),
        LogFormat::Text => tracing::subscriber::with_default(builder.finish(), || through_tracing(e)),
    }
    let bytes = out.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    String::from_utf8(bytes).expect("utf-8")
}

fn by_hand(format: LogFormat, e: &Entry<'_>) -> String {
    let mut out = Vec::new();
    super::format(&mut out, format, SystemTime::now(), e);
    String::from_utf8(out).expect("utf-8")
}

/// The line with its timestamp replaced: the two were made at different instants.
fn without_time(format: LogFormat, line: &str) -> String {
    let (at, len) = match format {
        LogFormat::Json => (line.find("\"timestamp\":\"").expect("timestamp") + 13, 27),
        LogFormat::Text => (0, 27),
    };
    let stamp = &line[at..at + len];
    assert!(
        chrono::DateTime::parse_from_rfc3339(stamp).is_ok() && stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.',
        "{line}"
    );
    format!("{}TS{}", &line[..at], &line[at + len..])
}

fn record(prefix: &str, hint: &str) -> AuthRecord {
    AuthRecord::new(AuthFields {
        key_id: uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
        organization_id: uuid::Uuid::from_u128(0xfedc_ba98_7654_3210_fedc_ba98_7654_3210),
        key_prefix: prefix,
        key_hint: hint,
        key_active: true,
        expires_at: None,
        revoked_at: None,
        scopes: &["chat"],
        custom_rate_limit: None,
        org_active: true,
        plan: Plan::Pro,
        org_rate_limit_per_minute: 60,
        monthly_request_limit: 1000,
    })
}

#[test]
fn the_hand_written_line_is_the_line_tracing_would_write() {
    let ok = record("pk_test_", "zh3g");
    let odd = record("pk_\"x\\_", "é\n");
    let micros = |n| Duration::from_micros(n);
    let mut cases = Vec::new();
    for rec in [None, Some(&ok), Some(&odd)] {
        for (error, upstream) in [(None, Some(micros(10_250))), (Some("rate_limit_exceeded"), None)] {
            for path in ["/v1/chat/completions", "/a\"b\\c", "/caf\u{e9}\t/\u{7f}"] {
                cases.push((rec, error, upstream, path));
            }
        }
    }
    for (rec, error, upstream, path) in cases {
        for (total, overhead) in [
            (micros(0), micros(0)),
            (Duration::from_nanos(528_777), Duration::from_nanos(2_072)),
            (micros(1_500), micros(2_000)),
            (micros(123_456_789), micros(10)),
        ] {
            let e = Entry {
                request_id: "01a236d0-b0c2-706d-b073-4ce404b056f6",
                method: &Method::POST,
                path,
                status: StatusCode::TOO_MANY_REQUESTS,
                error,
                record: rec,
                total,
                upstream,
                overhead,
            };
            for format in [LogFormat::Text, LogFormat::Json] {
                let (theirs, ours) = (via_tracing(format, &e), by_hand(format, &e));
                assert_eq!(without_time(format, &ours), without_time(format, &theirs), "{format:?}");
            }
        }
    }
}

#[test]
fn milliseconds_print_as_the_formatters_print_the_float() {
    for us in (0..3_000_000u64)
        .step_by(7)
        .chain([999, 1_000, 1_001, 10_000, 100_100, 1 << 40])
    {
        let d = Duration::from_micros(us);
        let mut text = Line {
            out: &mut Vec::new(),
            json: false,
            first: true,
        };
        text.millis("m", d);
        let text = String::from_utf8(text.out.clone()).expect("ascii");
        assert_eq!(text, format!("m={:?}", ms(d)), "{us} µs");
        let decimals = text.split_once('.').map_or(0, |(_, f)| f.len());
        assert!(decimals <= 3, "{us} µs printed as {text}");
    }
    let mut json = Line {
        out: &mut Vec::new(),
        json: true,
        first: true,
    };
    json.millis("m", Duration::from_micros(2_000));
    assert_eq!(json.out.as_slice(), b"\"m\":2.0");
    assert_eq!(serde_json::to_string(&2.0f64).expect("json"), "2.0");
    assert_eq!(ms(Duration::from_nanos(2_072)).to_string(), "0.002");
}

#[test]
fn timestamps_are_rfc3339_microseconds_in_utc() {
    for secs in [
        0u64,
        951_782_400,
        1_700_000_000,
        1_798_761_599,
        4_102_444_800,
        253_402_300_799,
    ] {
        for micros in [0u32, 7, 130_532, 999_999] {
            let at = SystemTime::UNIX_EPOCH + Duration::new(secs, micros * 1000 + 999);
            let mut out = Vec::new();
            timestamp(&mut out, at);
            let expected = chrono::DateTime::<chrono::Utc>::from(at)
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            assert_eq!(String::from_utf8(out).expect("ascii"), expected);
        }
    }
    for day in (0..800_000).step_by(13) {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(day * 86_400);
        let mut out = Vec::new();
        timestamp(&mut out, at);
        let expected = chrono::DateTime::<chrono::Utc>::from(at)
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        assert_eq!(String::from_utf8(out).expect("ascii"), expected, "day {day}");
    }
}
