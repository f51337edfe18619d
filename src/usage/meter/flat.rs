//! A fast path for the two captured values nearly every response carries: a `usage`
//! object of small non-negative integer counts (with `*_details` objects, strings,
//! literals and integers beside them) and a model name without escapes.
//!
//! serde (`wire`) stays the definition of what a value means: this module answers only
//! for input whose meaning it is sure of, and says `None` ("ask serde") for everything
//! else: escapes, non-ASCII text, fractions and exponents, negative or long numbers,
//! duplicate known keys, deep nesting, anything malformed. So where it answers, it
//! answers as serde would (`flat_tests` checks that against serde on random input), and
//! where it does not, nothing changes. Why: serde's generic decode of a 62-byte usage
//! object and a model name cost about 3,000 instructions per response under callgrind,
//! a twentieth of the whole proxied request.

use super::wire::{Count, WireUsage};

/// Nesting kept by the fast path inside an ignored value; deeper goes to serde.
const MAX_DEPTH: usize = 4;
/// Digits of an integer the fast path reads: any 18-digit number fits an `i64`.
const MAX_DIGITS: usize = 18;

/// The `usage` object, when its meaning is plain; `None` means "decode with serde".
pub(super) fn usage(raw: &[u8]) -> Option<WireUsage> {
    let mut p = Cursor { b: raw, i: 0 };
    let mut u = WireUsage::default();
    // One bit per known field: serde refuses a struct with a field given twice.
    let mut seen = 0u8;
    p.ws();
    p.eat(b'{')?;
    p.ws();
    if !p.eat_if(b'}') {
        loop {
            let key = p.plain_string()?;
            p.ws();
            p.eat(b':')?;
            p.ws();
            match field(key) {
                Some(k) => {
                    if seen & (1 << k) != 0 {
                        return None;
                    }
                    seen |= 1 << k;
                    let count = if p.eat_literal(b"null") {
                        Count(None)
                    } else {
                        Count(Some(p.count()?))
                    };
                    *slot(&mut u, k) = count;
                }
                None => p.skip(0)?,
            }
            p.ws();
            match p.next()? {
                b',' => p.ws(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    p.ws();
    p.at_end().then_some(u)
}

/// A model name that is a plain ASCII string; `None` means "decode with serde".
pub(super) fn model(raw: &[u8]) -> Option<String> {
    let mut p = Cursor { b: raw, i: 0 };
    p.ws();
    let name = p.plain_string()?;
    p.ws();
    if !p.at_end() {
        return None;
    }
    // Plain strings are printable ASCII, so this never fails.
    std::str::from_utf8(name).ok().map(str::to_owned)
}

fn field(key: &[u8]) -> Option<u8> {
    Some(match key {
        b"prompt_tokens" => 0,
        b"completion_tokens" => 1,
        b"total_tokens" => 2,
        b"input_tokens" => 3,
        b"output_tokens" => 4,
        b"cache_creation_input_tokens" => 5,
        b"cache_read_input_tokens" => 6,
        _ => return None,
    })
}

fn slot(u: &mut WireUsage, k: u8) -> &mut Count {
    match k {
        0 => &mut u.prompt_tokens,
        1 => &mut u.completion_tokens,
        2 => &mut u.total_tokens,
        3 => &mut u.input_tokens,
        4 => &mut u.output_tokens,
        5 => &mut u.cache_creation_input_tokens,
        _ => &mut u.cache_read_input_tokens,
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn at_end(&self) -> bool {
        self.i == self.b.len()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.eat_if(c).then_some(())
    }

    fn eat_if(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += usize::from(hit);
        hit
    }

    fn eat_literal(&mut self, lit: &[u8]) -> bool {
        let hit = self.b.get(self.i..).is_some_and(|rest| rest.starts_with(lit));
        if hit {
            self.i += lit.len();
        }
        hit
    }

    /// JSON's four whitespace bytes, and no others.
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.i += 1;
        }
    }

    /// A string of printable ASCII without escapes; its contents, without the quotes.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let rest = self.b.get(self.i..)?;
        // One tight scan to the first byte that is not plain text.
        let len = rest
            .iter()
            .position(|&c| !(0x20..0x7f).contains(&c) || c == b'"' || c == b'\\')?;
        let (text, after) = rest.split_at(len);
        if after.first() != Some(&b'"') {
            return None;
        }
        self.i += len + 1;
        Some(text)
    }

    /// A non-negative integer of at most 18 digits, with nothing after it that would
    /// make it a fraction or an exponent, and no leading zero (which JSON forbids).
    fn count(&mut self) -> Option<i64> {
        let rest = self.b.get(self.i..)?;
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        let text = rest.get(..digits)?;
        let leading_zero = digits > 1 && text.first() == Some(&b'0');
        let continues = matches!(rest.get(digits), Some(b'.' | b'e' | b'E'));
        if digits == 0 || digits > MAX_DIGITS || leading_zero || continues {
            return None;
        }
        self.i += digits;
        Some(text.iter().fold(0, |n, &d| n * 10 + i64::from(d - b'0')))
    }

    /// Steps over a value the fast path can vouch for: a literal, a plain string, an
    /// optionally negative integer, or an object or array of those, `MAX_DEPTH` deep.
    fn skip(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.plain_string().map(drop),
            b'-' => {
                self.i += 1;
                self.count().map(drop)
            }
            b'0'..=b'9' => self.count().map(drop),
            b't' => self.eat_literal(b"true").then_some(()),
            b'f' => self.eat_literal(b"false").then_some(()),
            b'n' => self.eat_literal(b"null").then_some(()),
            b'{' if depth < MAX_DEPTH => self.skip_container(depth, b'}', true),
            b'[' if depth < MAX_DEPTH => self.skip_container(depth, b']', false),
            _ => None,
        }
    }

    fn skip_container(&mut self, depth: usize, close: u8, keyed: bool) -> Option<()> {
        self.i += 1;
        self.ws();
        if self.eat_if(close) {
            return Some(());
        }
        loop {
            if keyed {
                self.plain_string()?;
                self.ws();
                self.eat(b':')?;
                self.ws();
            }
            self.skip(depth + 1)?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                c if c == close => return Some(()),
                _ => return None,
            }
        }
    }
}
