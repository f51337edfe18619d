//! [`ask`] on the shapes clients send, and on random request bodies whose outcome the
//! generator knows: the member names it wrote (some escaped), duplicates, whitespace,
//! `stream_options` of every type, decoys nested where they must not count, and cuts
//! that leave the JSON broken. A rewritten body must parse as the input with
//! `include_usage` set, and differ from it by one splice.

use serde_json::{json, Value};

use super::{ask, parse_and_ask, Asked};
use crate::usage::meter::tests::Rng;

fn rewritten(body: &str) -> Value {
    match ask(body.as_bytes()) {
        Asked::Rewritten(out) => serde_json::from_slice(&out).expect("a rewritten body parses"),
        other => panic!("{body}: {other:?}"),
    }
}

#[test]
fn a_stream_that_does_not_ask_is_made_to() {
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let Asked::Rewritten(out) = ask(body.as_bytes()) else {
        panic!("not rewritten")
    };
    assert_eq!(
        String::from_utf8(out).expect("utf-8"),
        r#"{"stream_options":{"include_usage":true},"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}"#
    );
    assert_eq!(
        rewritten(r#" {"stream": true, "stream_options": null} "#),
        json!({"stream": true, "stream_options": {"include_usage": true}})
    );
    assert_eq!(
        rewritten(r#"{"stream":true,"stream_options":{ }}"#),
        json!({"stream": true, "stream_options": {"include_usage": true}})
    );
    assert_eq!(
        rewritten(r#"{"stream":true,"stream_options":{"continuous_usage_stats":true}}"#),
        json!({"stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}})
    );
    // A client that says no is overruled: the row needs the tokens, and the chunk it
    // did not want is taken out of its answer.
    for no in ["false", "null", "0", "\"\""] {
        assert_eq!(
            rewritten(&format!(
                r#"{{"stream":true,"stream_options":{{"include_usage":{no}}}}}"#
            )),
            json!({"stream": true, "stream_options": {"include_usage": true}})
        );
    }
    // Escaped names are the same names to the upstream.
    assert_eq!(
        rewritten(r#"{"str\u0065am":true,"stream_opti\u006fns":{"include_\u0075sage":false}}"#),
        json!({"stream": true, "stream_options": {"include_usage": true}})
    );
    // Even when the word itself is nowhere in the body, in either case of hex digit.
    for body in [
        r#"{"\u0073tream":true}"#,
        r#"{"strea\u006D":true,"model":"m"}"#,
        r#"{"model":"caf\u00e9","\u0073\u0074\u0072\u0065\u0061\u006d":true}"#,
    ] {
        assert_eq!(
            rewritten(body)["stream_options"],
            json!({"include_usage": true}),
            "{body}"
        );
    }
}

#[test]
fn a_body_that_never_says_stream_is_not_parsed_and_comes_out_the_same() {
    for body in [
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"caf\u00e9 \u4f60\u597d"}]}"#,
        r#"{"model":"m","STREAM":true,"Stream":true}"#,
        r#"not json at all"#,
    ] {
        assert!(!super::may_stream(body.as_bytes()), "{body}");
        assert_eq!(ask(body.as_bytes()), Asked::Unchanged, "{body}");
        assert_eq!(ask(body.as_bytes()), parse_and_ask(body.as_bytes()), "{body}");
    }
    // An escaped backslash before `u0073` looks like an escaped letter: it costs the
    // parse, which finds no `stream` either.
    let body = r#"{"model":"m","messages":[],"note":"\\u0073tream is not a name"}"#;
    assert!(super::may_stream(body.as_bytes()));
    assert_eq!(ask(body.as_bytes()), Asked::Unchanged);
    assert_eq!(ask(b"{\"model\":\"\xff\"}"), Asked::Unchanged);
}

#[test]
fn one_stream_that_is_not_true_is_not_parsed_and_comes_out_the_same() {
    for body in [
        r#"{"model":"m","messages":[],"stream":false}"#,
        r#"{"model":"m","stream" : null,"n":1}"#,
        r#"{"stream_options":{"include_usage":true},"model":"m"}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"a stream of words"}]}"#,
        r#"{"stream":"true"}"#,
    ] {
        assert!(!super::may_stream(body.as_bytes()), "{body}");
        assert_eq!(ask(body.as_bytes()), Asked::Unchanged, "{body}");
        assert_eq!(ask(body.as_bytes()), parse_and_ask(body.as_bytes()), "{body}");
    }
    // Whatever could stream, or be given twice, is parsed.
    for body in [
        r#"{"stream":true}"#,
        "{\"stream\"\n:\ttrue}",
        r#"{"stream":false,"stream":false}"#,
        r#"{"stream":false,"stream_options":null}"#,
        r#"{"stream":false,"note":"caf\u0065"}"#,
        r#"{"upstream":true}"#,
    ] {
        assert!(super::may_stream(body.as_bytes()), "{body}");
    }
    assert_eq!(ask(b"{\"stream\":false,\"x\":\"\xff\"}"), Asked::Unchanged);
    assert_eq!(ask(br#"{"stream":false,"stream":false}"#), Asked::Ambiguous);
}

#[test]
fn what_is_not_a_stream_without_usage_goes_as_it_came() {
    for body in [
        r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
        r#"{"stream_options":{"include_usage" : true},"stream":true}"#,
    ] {
        assert_eq!(ask(body.as_bytes()), Asked::AlreadyAsked, "{body}");
    }
    for body in [
        r#"{"model":"m","messages":[]}"#,
        r#"{"stream":false}"#,
        r#"{"stream":"true"}"#,
        r#"{"stream":1}"#,
        r#"{"stream":true,"stream_options":"yes"}"#,
        r#"{"stream":true,"stream_options":[]}"#,
        r#"{"messages":[{"stream":true}]}"#,
        r#"[{"stream":true}]"#,
        r#"{"stream":true"#,
        r#"{"stream":true} x"#,
        r#"{"stream":true,}"#,
        "\u{feff}{\"stream\":true}",
        "",
        "model=gpt&stream=true",
    ] {
        assert_eq!(ask(body.as_bytes()), Asked::Unchanged, "{body}");
    }
    assert_eq!(ask(b"{\"stream\":true,\"x\":\"\xff\"}"), Asked::Unchanged);
}

#[test]
fn a_member_given_twice_is_refused() {
    for body in [
        r#"{"stream":false,"stream":true}"#,
        r#"{"stream":true,"str\u0065am":false}"#,
        r#"{"stream":false,"str\u0065am":true}"#,
        r#"{"stream":true,"stream_options":null,"stream_options":{"include_usage":true}}"#,
        r#"{"stream":true,"stream_options":{"include_usage":true,"include_usage":false}}"#,
    ] {
        assert_eq!(ask(body.as_bytes()), Asked::Ambiguous, "{body}");
    }
    // Twice inside another member is not twice.
    assert!(matches!(
        ask(br#"{"stream":true,"meta":{"stream":1,"stream":2}}"#),
        Asked::Rewritten(_)
    ));
}

/// What the generator knows a body should come to.
#[derive(Debug, PartialEq)]
enum Expect {
    Unchanged,
    AlreadyAsked,
    Rewritten,
    Ambiguous,
}

struct Gen<'a> {
    rng: &'a mut Rng,
    out: String,
}

impl Gen<'_> {
    fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
        from[self.rng.below(from.len())]
    }
    fn ws(&mut self) {
        for _ in 0..self.rng.below(3) {
            let c = self.pick(&[" ", "\n", "\t", "\r\n"]);
            self.out.push_str(c);
        }
    }
    /// A name as written, and what it decodes to.
    fn name(&mut self, decoded: &str) {
        let spelled = match (decoded, self.rng.below(4)) {
            ("stream", 0) => self
                .pick(&[r#""str\u0065am""#, r#""\u0073tream""#, r#""strea\u006D""#])
                .to_string(),
            ("stream_options", 0) => r#""stream\u005foptions""#.to_string(),
            ("include_usage", 0) => r#""include_usag\u0065""#.to_string(),
            (d, _) => format!("\"{d}\""),
        };
        self.out.push_str(&spelled);
        self.ws();
        self.out.push(':');
        self.ws();
    }
    fn filler(&mut self) {
        let v = self.pick(&[
            r#""gpt-4o-mini""#,
            r#"[{"role":"user","content":"say \"stream\":true"}]"#,
            r#"{"stream":true,"stream_options":null}"#,
            "0.7",
            "null",
            r#"{"include_usage":true}"#,
        ]);
        self.out.push_str(v);
    }
    fn object(&mut self, members: &[(&str, String)]) {
        self.out.push('{');
        self.ws();
        for (i, (name, value)) in members.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
                self.ws();
            }
            self.name(name);
            if value.is_empty() {
                self.filler();
            } else {
                self.out.push_str(value);
            }
            self.ws();
        }
        self.out.push('}');
    }
}

/// A random body and its expected outcome, decided from what was written. Each wanted
/// member is usually there once, sometimes twice, in random order among fillers.
fn body(rng: &mut Rng) -> (String, Expect) {
    let times = |rng: &mut Rng| [0, 1, 1, 1, 1, 1, 2][rng.below(7)];
    let mut g = Gen {
        rng,
        out: String::new(),
    };
    let mut top: Vec<(&str, String)> = Vec::new();
    let (mut streams, mut options) = (Vec::new(), Vec::new());
    for _ in 0..times(g.rng) {
        let v = g.pick(&["true", "true", "true", "false", "null", "\"true\""]);
        streams.push(v);
        top.push(("stream", v.to_string()));
    }
    for _ in 0..times(g.rng) {
        let mut inner: Vec<(&str, String)> = Vec::new();
        let mut asks = Vec::new();
        for _ in 0..times(g.rng) {
            let v = g.pick(&["true", "true", "false", "null", "1"]);
            asks.push(v);
            inner.push(("include_usage", v.to_string()));
        }
        for _ in 0..g.rng.below(3) {
            inner.insert(g.rng.below(inner.len() + 1), ("continuous_usage_stats", String::new()));
        }
        let kind = g.rng.below(6);
        let text = match kind {
            0 => "null".to_string(),
            1 => "\"x\"".to_string(),
            _ => {
                let mut sub = Gen {
                    rng: g.rng,
                    out: String::new(),
                };
                sub.object(&inner);
                sub.out
            }
        };
        options.push((kind, asks));
        top.push(("stream_options", text));
    }
    for _ in 0..g.rng.below(4) {
        let name = g.pick(&["model", "messages", "temperature", "streams", "x"]);
        top.insert(g.rng.below(top.len() + 1), (name, String::new()));
    }
    // Wanted members in any order, not only as written above.
    for i in (1..top.len()).rev() {
        top.swap(i, g.rng.below(i + 1));
    }
    g.ws();
    g.object(&top);
    g.ws();
    let expect = if streams.len() > 1 || options.len() > 1 {
        Expect::Ambiguous
    } else if streams.first() != Some(&"true") {
        Expect::Unchanged
    } else {
        match options.first() {
            None | Some((0, _)) => Expect::Rewritten,
            Some((1, _)) => Expect::Unchanged,
            Some((_, asks)) if asks.len() > 1 => Expect::Ambiguous,
            Some((_, asks)) if asks.first() == Some(&"true") => Expect::AlreadyAsked,
            Some(_) => Expect::Rewritten,
        }
    };
    (g.out, expect)
}

/// The input's JSON with `stream_options.include_usage` set to `true`.
fn with_usage_asked(input: &str) -> Value {
    let mut v: Value = serde_json::from_str(input).expect("the generator writes JSON");
    let opts = &mut v["stream_options"];
    if !opts.is_object() {
        *opts = json!({});
    }
    opts["include_usage"] = json!(true);
    v
}

#[test]
fn random_bodies_come_out_as_the_generator_says() {
    let mut rng = Rng::new(0x5eed_1234);
    let mut seen = [0usize; 4];
    for _ in 0..20_000 {
        let (input, expect) = body(&mut rng);
        let got = ask(input.as_bytes());
        // The shortcut for bodies that never say `stream` answers as the parse does.
        assert_eq!(got, parse_and_ask(input.as_bytes()), "{input}");
        match (&expect, &got) {
            (Expect::Rewritten, Asked::Rewritten(out)) => {
                seen[0] += 1;
                let parsed: Value = serde_json::from_slice(out).expect("parses");
                assert_eq!(parsed, with_usage_asked(&input), "{input}");
                let same_start = input.bytes().zip(out).take_while(|(a, b)| a == *b).count();
                let same_end = input
                    .bytes()
                    .rev()
                    .zip(out.iter().rev())
                    .take_while(|(a, b)| a == *b)
                    .count();
                // One splice, replacing at most a literal or an empty object.
                let replaced = input.len().saturating_sub(same_start + same_end);
                assert!(replaced <= 10, "more than one splice: {input}");
            }
            (Expect::Unchanged, Asked::Unchanged) => seen[1] += 1,
            (Expect::AlreadyAsked, Asked::AlreadyAsked) => seen[2] += 1,
            (Expect::Ambiguous, Asked::Ambiguous) => seen[3] += 1,
            _ => panic!("{input}: expected {expect:?}, got {got:?}"),
        }
        // Any cut of the body is not JSON, or is the same JSON with less whitespace.
        let cut = rng.below(input.len().max(1));
        if input.is_char_boundary(cut) && serde_json::from_str::<Value>(&input[..cut]).is_err() {
            assert_eq!(ask(&input.as_bytes()[..cut]), Asked::Unchanged, "{}", &input[..cut]);
        }
    }
    eprintln!("rewritten, unchanged, already asked, ambiguous: {seen:?}");
    assert!(seen.iter().all(|&n| n > 500), "every outcome drawn often: {seen:?}");
}

/// Bodies of the shape real clients send, mostly not streams, with the pieces that
/// decide the shortcut in random places: the word in content and in other names,
/// `stream` with every kind of value and spacing, once or twice, escapes of letters and
/// of other text, an escaped backslash, cuts. The shortcut and the parse must agree.
#[test]
fn random_chat_bodies_get_the_same_answer_with_and_without_the_shortcut() {
    let pieces = [
        "hello ",
        "caf\\u00e9 ",
        "\\u4f60",
        "\\u0041",
        "\\u0073",
        "\\u006D",
        "\\\\u0073",
        "stream",
        "STREAM",
        "\\\"",
        "strea",
        "m",
        "\\u00",
        "6",
        "7",
    ];
    let names = [
        "\"model\"",
        "\"messages\"",
        "\"stream\"",
        "\"stream_options\"",
        "\"upstream\"",
        "\"\\u0073tream\"",
        "\"max_tokens\"",
        "\"user\"",
    ];
    let mut rng = Rng::new(0x5eed_4321);
    let (mut shortcut, mut outcomes) = (0, [0usize; 4]);
    for _ in 0..40_000 {
        let mut body = String::from("{");
        for i in 0..1 + rng.below(4) {
            if i > 0 {
                body.push(',');
            }
            // Mostly names that are not `stream`, so most bodies take the shortcut.
            let name = if rng.below(3) == 0 {
                names[rng.below(names.len())]
            } else {
                names[rng.below(2)]
            };
            body.push_str(name);
            body.push_str([":", " : ", ":\n\t"][rng.below(3)]);
            match rng.below(3) {
                // A literal, as `stream` has; a string otherwise.
                0 => body.push_str(["true", "false", "null", "tru", "1"][rng.below(5)]),
                _ => {
                    body.push('"');
                    for _ in 0..rng.below(6) {
                        body.push_str(pieces[rng.below(pieces.len())]);
                    }
                    body.push('"');
                }
            }
        }
        body.push('}');
        let cut = if rng.below(4) == 0 {
            rng.below(body.len())
        } else {
            body.len()
        };
        let input = &body.as_bytes()[..cut];
        assert_eq!(ask(input), parse_and_ask(input), "{}", String::from_utf8_lossy(input));
        shortcut += usize::from(!super::may_stream(input));
        outcomes[match ask(input) {
            Asked::Unchanged => 0,
            Asked::Rewritten(_) => 1,
            Asked::AlreadyAsked => 2,
            Asked::Ambiguous => 3,
        }] += 1;
    }
    eprintln!("unchanged, rewritten, already asked, ambiguous: {outcomes:?}; shortcut {shortcut}");
    assert!(shortcut > 10_000, "the shortcut was taken often: {shortcut}");
    assert!(
        outcomes[1] > 150 && outcomes[3] > 150,
        "streams and duplicates drawn: {outcomes:?}"
    );
}
