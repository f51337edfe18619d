//! `JsonScan` on random JSON documents (nested values, escapes, every literal, decoy
//! keys inside strings and nested objects, `response` objects to look into), cut at
//! random points: it must report exactly the values the generator put where it looks,
//! each parsing (serde_json) equal to what was written.

use serde_json::Value;

use super::json_scan::{Field, JsonScan, KEY_MAX};
use super::tests::Rng;

const WANTED: &[Field] = &[Field::Usage, Field::Model, Field::Message, Field::Response];

/// A random JSON value of at most `depth` levels; keys are drawn so that wanted names
/// also appear where they must not be captured (nested, or as string values).
fn value(rng: &mut Rng, depth: usize, out: &mut String) {
    let ws = |rng: &mut Rng, out: &mut String| {
        for _ in 0..rng.below(3) {
            out.push([' ', '\n', '\t', '\r'][rng.below(4)]);
        }
    };
    match rng.below(if depth == 0 { 5 } else { 7 }) {
        0 => out.push_str(["true", "false", "null"][rng.below(3)]),
        1 => out.push_str(&format!("{}", rng.below(1_000_000) as i64 - 500)),
        2 => out.push_str(["-0.5e3", "12.25", "1E-7", "0"][rng.below(4)]),
        3 | 4 => string(rng, out),
        5 => {
            out.push('[');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                ws(rng, out);
                value(rng, depth - 1, out);
                ws(rng, out);
            }
            out.push(']');
        }
        _ => object(rng, depth - 1, out),
    }
}

fn string(rng: &mut Rng, out: &mut String) {
    const PARTS: [&str; 11] = [
        "usage",
        "model",
        "message",
        "response",
        "\\\"usage\\\":{",
        "x",
        "é",
        "\\\\",
        "\\u0041",
        "\\n",
        "{\\\"a\\\":[1]}",
    ];
    out.push('"');
    for _ in 0..rng.below(5) {
        out.push_str(PARTS[rng.below(PARTS.len())]);
    }
    out.push('"');
}

const KEYS: [&str; 9] = [
    "usage",
    "model",
    "message",
    "response",
    "id",
    "choices",
    "usag",
    "models",
    "responses",
];

/// An object nobody looks into (a nested value).
fn object(rng: &mut Rng, depth: usize, out: &mut String) {
    members(rng, depth, out, None);
}

/// An object's members. With `level` (1 for a document, 2 for a `response` object in
/// one) it is looked into, and the reports the scanner must make are pushed in order.
fn members(rng: &mut Rng, depth: usize, out: &mut String, mut level: Option<(u8, &mut Reports)>) {
    out.push('{');
    for i in 0..rng.below(6) {
        if i > 0 {
            out.push(',');
        }
        let key = KEYS[rng.below(KEYS.len())];
        out.push_str(&format!(" \"{key}\" :"));
        let start = out.len();
        match level.as_mut() {
            // Any object there is looked into; half the time it is something else.
            Some((1, reports)) if key == "response" => {
                if rng.below(2) == 0 {
                    members(rng, depth.saturating_sub(1), out, Some((2, reports)));
                } else {
                    value(rng, 0, out);
                }
            }
            _ => value(rng, depth, out),
        }
        let field = match (key, level.as_ref().map(|(l, _)| *l)) {
            ("usage", Some(_)) => Some(Field::Usage),
            ("model", Some(_)) => Some(Field::Model),
            ("message", Some(1)) => Some(Field::Message),
            _ => None,
        };
        let raw = &out[start..];
        if let (Some(f), Some((l, reports))) = (field, level.as_mut()) {
            if raw.len() <= f.cap() {
                reports.push((*l, f, serde_json::from_str(raw).expect("generated JSON is valid")));
            }
        }
    }
    out.push('}');
}

/// What the scanner must report, in order, with the level each value was found at.
type Reports = Vec<(u8, Field, Value)>;

/// A document, what the scanner must report for it (the last value per field), and
/// whether that includes a value from inside a `response` object.
fn document(rng: &mut Rng, out: &mut String) -> (Vec<(Field, Value)>, bool) {
    let mut reports = Reports::new();
    members(rng, 3, out, Some((1, &mut reports)));
    let mut found: Vec<(u8, Field, Value)> = Vec::new();
    for (l, f, v) in reports {
        found.retain(|(_, g, _)| *g != f);
        found.push((l, f, v));
    }
    let inner = found.iter().any(|(l, _, _)| *l == 2);
    let mut found: Vec<(Field, Value)> = found.into_iter().map(|(_, f, v)| (f, v)).collect();
    found.sort_by_key(|(f, _)| *f as u8);
    (found, inner)
}

/// What the scanner reports for `doc` fed in `cuts`: the last value per field, parsed.
fn scanned(doc: &[u8], cuts: &[usize]) -> Vec<(Field, Value)> {
    let mut scan = JsonScan::new(WANTED);
    let mut found: Vec<(Field, Value)> = Vec::new();
    let mut sink = |f: Field, raw: &[u8]| {
        let v: Value = serde_json::from_slice(raw).expect("a captured value is the raw JSON of the value");
        found.retain(|(g, _)| *g != f);
        found.push((f, v));
    };
    let mut at = 0;
    for &c in cuts.iter().chain(std::iter::once(&doc.len())) {
        scan.feed(&doc[at..c], &mut sink);
        at = c;
    }
    found.sort_by_key(|(f, _)| *f as u8);
    found
}

#[test]
fn random_documents_yield_what_was_put_there_however_they_are_cut() {
    let mut rng = Rng::new(0x5eed_1234);
    let mut looked_into = 0;
    for _ in 0..4_000 {
        let mut doc = String::new();
        let (want, inner) = document(&mut rng, &mut doc);
        looked_into += usize::from(inner);
        let bytes = doc.as_bytes();
        let mut cuts: Vec<usize> = (0..rng.below(6)).map(|_| rng.below(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        assert_eq!(scanned(bytes, &[]), want, "{doc}");
        assert_eq!(scanned(bytes, &cuts), want, "{doc} cut at {cuts:?}");
        let every: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(scanned(bytes, &every), want, "{doc} byte by byte");
    }
    assert!(
        looked_into > 150,
        "only {looked_into} documents reported from inside `response`"
    );
}

#[test]
fn every_field_is_named_by_its_key_and_nothing_else_is() {
    // Every field the meter can want, in JSON bodies or in SSE events.
    let wanted = super::JSON_FIELDS.iter().chain(super::SSE_FIELDS);
    for &f in wanted {
        assert_eq!(Field::named(f.key()), Some(f), "{f:?}");
        // Every key fits the buffer a key cut by a chunk's end is kept in.
        assert!(f.key().len() <= KEY_MAX, "{f:?}");
        let mut longer = f.key().to_vec();
        longer.push(b's');
        assert_eq!(Field::named(&longer), None);
        assert_eq!(Field::named(&f.key()[1..]), None);
        assert_eq!(Field::named(&f.key().to_ascii_uppercase()), None);
    }
    assert_eq!(Field::named(b""), None);
}

/// What `scanned` reports for a body with `WANTED`, fed whole, cut at every point, and
/// byte by byte: all three must agree.
fn scanned_every_way(doc: &str) -> Vec<(Field, Value)> {
    let bytes = doc.as_bytes();
    let whole = scanned(bytes, &[]);
    for c in 0..=bytes.len() {
        assert_eq!(scanned(bytes, &[c]), whole, "{doc} cut at {c}");
    }
    let every: Vec<usize> = (1..bytes.len()).collect();
    assert_eq!(scanned(bytes, &every), whole, "{doc} byte by byte");
    whole
}

#[test]
fn keys_are_compared_as_written_wherever_a_chunk_cuts_them() {
    let usage = || serde_json::json!({ "total_tokens": 3 });
    // The name as written, once with an escaped letter: names are compared undecoded, as
    // the scan always has, so only the plain one is found.
    let found = scanned_every_way(r#"{"us\u0061ge":{"total_tokens":9},"usage":{"total_tokens":3}}"#);
    assert_eq!(found, vec![(Field::Usage, usage())]);
    // An escaped quote in a key does not end it, at its end or its start.
    let found = scanned_every_way(r#"{"usage\"":{"total_tokens":9},"\"usage":1,"usage":{"total_tokens":3}}"#);
    assert_eq!(found, vec![(Field::Usage, usage())]);
    // Longer than any wanted key, with a wanted one at its start, and the other way round.
    let found = scanned_every_way(
        r#"{"usageusageusageusage":{"total_tokens":9},"usag":2,"sage":2,"usage":{"total_tokens":3}}"#,
    );
    assert_eq!(found, vec![(Field::Usage, usage())]);
    // The longest names, kept across a cut (nothing in WANTED wants them: not reported).
    let found = scanned_every_way(r#"{"prompt_eval_count":1,"model":"m","usageMetadata":{}}"#);
    assert_eq!(found, vec![(Field::Model, serde_json::json!("m"))]);
}
