//! `json_blocks` against a reading one byte at a time: the classes (SSE2 and the
//! eight-byte words, on bytes next to the ones they look for) and the strings and
//! escapes of random text, however it is cut into chunks.

use super::json_blocks::{self, Carry, Classes, Strings, BLOCK};
use super::tests::Rng;

/// The bytes looked for, and the ones a bit away from them (`[` is `{` without bit 5,
/// and `0x02`, `0x0c`, `0x1a` are `"`, `,`, `:` without it).
const ALPHABET: [u8; 24] = [
    b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', 0x02, 0x0c, 0x1a, 0x1c, 0x3b, 0x7c, 0x5a, 0x7a, 0x5e, 0x7e, 0xa2,
    0xdc, 0xfb, 0x00, 0xff, b'a',
];

fn naive_classes(block: &[u8; BLOCK]) -> Classes {
    let mut c = Classes::default();
    for (i, &b) in block.iter().enumerate() {
        let bit = 1u64 << i;
        match b {
            b'"' => c.quote |= bit,
            b'\\' => c.backslash |= bit,
            b'{' | b'}' | b'[' | b']' => c.bracket |= bit,
            b',' | b':' => c.separator |= bit,
            _ => {}
        }
    }
    c
}

#[test]
fn classes_match_a_byte_by_byte_reading() {
    let mut rng = Rng::new(0xb10c);
    for _ in 0..20_000 {
        let mut block = [0u8; BLOCK];
        for b in &mut block {
            *b = ALPHABET[rng.below(ALPHABET.len())];
        }
        let want = naive_classes(&block);
        assert_eq!(Classes::of(&block), want, "{block:?}");
        assert_eq!(Classes::of_words(&block), want, "{block:?}");
    }
}

/// Byte by byte, with a backslash escaping the next byte wherever it stands: after each
/// byte, whether the text is inside a string, and which bytes are quotes that count.
struct Naive {
    in_string: bool,
    escaped: bool,
}

impl Naive {
    fn byte(&mut self, b: u8) -> (bool, bool) {
        let quote = !self.escaped && b == b'"';
        self.escaped = !self.escaped && b == b'\\';
        self.in_string ^= quote;
        (self.in_string, quote)
    }
}

/// `text` fed in `cuts`, each chunk cut into blocks as the scan does: per byte, inside
/// and quote bits, and the carry after each chunk.
fn by_blocks(text: &[u8], cuts: &[usize]) -> (Vec<(bool, bool)>, Vec<Carry>) {
    let mut carry = Carry::default();
    let (mut bits, mut carries) = (Vec::new(), Vec::new());
    let mut at = 0;
    for &end in cuts.iter().chain(std::iter::once(&text.len())) {
        for block in text[at..end].chunks(BLOCK) {
            let mut padded = [0u8; BLOCK];
            padded[..block.len()].copy_from_slice(block);
            let Strings { quotes, inside } = json_blocks::strings(&Classes::of(&padded), block.len(), &mut carry);
            for i in 0..block.len() {
                bits.push(((inside >> i) & 1 != 0, (quotes >> i) & 1 != 0));
            }
        }
        carries.push(carry);
        at = end;
    }
    (bits, carries)
}

#[test]
fn strings_and_escapes_match_a_byte_by_byte_reading_however_cut() {
    // Runs of backslashes of every length, next to quotes, across block and chunk ends.
    const TEXT: [u8; 6] = [b'"', b'\\', b'\\', b'\\', b'a', b'{'];
    let mut rng = Rng::new(0x5_77e5);
    for round in 0..3_000 {
        let len = rng.below(if round % 10 == 0 { 400 } else { 140 });
        let text: Vec<u8> = (0..len).map(|_| TEXT[rng.below(TEXT.len())]).collect();
        let mut naive = Naive {
            in_string: false,
            escaped: false,
        };
        let want: Vec<(bool, bool)> = text.iter().map(|&b| naive.byte(b)).collect();
        let mut cuts: Vec<usize> = (0..rng.below(5)).map(|_| rng.below(len + 1)).collect();
        cuts.sort_unstable();
        let (bits, carries) = by_blocks(&text, &cuts);
        assert_eq!(bits, want, "{:?} cut at {cuts:?}", String::from_utf8_lossy(&text));
        // The carry after each chunk is the reading's state at that point.
        for (&end, carry) in cuts.iter().chain(std::iter::once(&len)).zip(&carries) {
            let mut naive = Naive {
                in_string: false,
                escaped: false,
            };
            for &b in &text[..end] {
                naive.byte(b);
            }
            let state = Carry {
                in_string: naive.in_string,
                escaped: naive.escaped,
            };
            assert_eq!(*carry, state, "{:?} at {end}", String::from_utf8_lossy(&text));
        }
    }
}

#[test]
fn a_run_of_backslashes_across_a_block_end_escapes_by_its_length() {
    // 63 plain bytes, then n backslashes and a quote: the quote counts when n is even.
    for n in 0..6 {
        let mut text = vec![b'a'; 63];
        text.extend(std::iter::repeat_n(b'\\', n));
        text.push(b'"');
        let (bits, _) = by_blocks(&text, &[]);
        let (_, quote) = bits[text.len() - 1];
        assert_eq!(quote, n % 2 == 0, "{n} backslashes");
    }
}
