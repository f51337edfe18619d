//! `JsonScan` against serde_json as the oracle: random JSON documents (nested values,
//! escapes, every literal, decoy keys inside strings and nested objects), cut at random
//! points, must yield exactly the top-level values serde_json finds, parsed equal.

use serde_json::Value;

use super::json_scan::{Field, JsonScan};
use super::tests::Rng;

const WANTED: &[Field] = &[Field::Usage, Field::Model, Field::Message];

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
    const PARTS: [&str; 10] = [
        "usage",
        "model",
        "message",
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

fn object(rng: &mut Rng, depth: usize, out: &mut String) {
    const KEYS: [&str; 7] = ["usage", "model", "message", "id", "choices", "usag", "models"];
    out.push('{');
    for i in 0..rng.below(6) {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(" \"{}\" :", KEYS[rng.below(KEYS.len())]));
        value(rng, depth, out);
    }
    out.push('}');
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

/// What serde_json finds: the wanted keys of the top-level object, last one winning
/// (serde_json's map keeps the last duplicate too); values past the capture caps are
/// dropped by the scanner, so here too.
fn oracle(doc: &str) -> Vec<(Field, Value)> {
    let Value::Object(map) = serde_json::from_str::<Value>(doc).expect("generated JSON is valid") else {
        return Vec::new();
    };
    let mut found: Vec<(Field, Value)> = WANTED
        .iter()
        .filter_map(|f| {
            let name = match f {
                Field::Usage => "usage",
                Field::Model => "model",
                Field::Message => "message",
            };
            map.get(name).map(|v| (*f, v.clone()))
        })
        .filter(|(f, v)| serde_json::to_vec(v).map(|b| b.len() < f.cap()).unwrap_or(false))
        .collect();
    found.sort_by_key(|(f, _)| *f as u8);
    found
}

#[test]
fn random_documents_yield_what_serde_json_finds_however_they_are_cut() {
    let mut rng = Rng::new(0x5eed_1234);
    for _ in 0..4_000 {
        let mut doc = String::new();
        object(&mut rng, 3, &mut doc);
        let want = oracle(&doc);
        let bytes = doc.as_bytes();
        let mut cuts: Vec<usize> = (0..rng.below(6)).map(|_| rng.below(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        assert_eq!(scanned(bytes, &[]), want, "{doc}");
        assert_eq!(scanned(bytes, &cuts), want, "{doc} cut at {cuts:?}");
        let every: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(scanned(bytes, &every), want, "{doc} byte by byte");
    }
}

#[test]
fn string_runs_stop_at_the_first_quote_or_backslash() {
    let naive = |b: &[u8]| b.iter().position(|&c| c == b'"' || c == b'\\').unwrap_or(b.len());
    // Bytes next to the two stops and the ones the word trick borrows across.
    const ALPHABET: [u8; 12] = [b'"', b'\\', b'a', 0x00, 0x01, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xff];
    let mut rng = Rng::new(77);
    for _ in 0..20_000 {
        let len = rng.below(40);
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                if rng.below(6) == 0 {
                    ALPHABET[rng.below(2)]
                } else {
                    ALPHABET[2 + rng.below(ALPHABET.len() - 2)]
                }
            })
            .collect();
        assert_eq!(super::json_scan::string_run(&bytes), naive(&bytes), "{bytes:?}");
    }
}
