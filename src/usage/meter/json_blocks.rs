//! The bitmask half of the JSON scan: for 64 bytes at a time, where the quotes,
//! backslashes, brackets and separators are, which bytes a backslash escapes, and which
//! lie inside strings, with what carries from one block to the next (and from one chunk
//! to the next). The approach is simdjson's stage 1 (Langdale and Lemire, "Parsing
//! gigabytes of JSON per second", 2019), in safe code: SSE2 through `safe_arch` on
//! x86-64, eight bytes at a time in a `u64` elsewhere.
//!
//! [`Marks`] is what the scan visits of a block. This module does not know about keys,
//! depth or values (`json_scan` does), and it does not validate: a backslash escapes
//! the next byte wherever it stands, as only garbage puts one outside a string.

/// Bytes per block: one bit each in a `u64`.
pub(super) const BLOCK: usize = 64;

/// One block's bytes of interest, bit `i` for byte `i`. Brackets and separators are
/// found inside strings too; [`Strings::inside`] tells them apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Classes {
    pub(super) quote: u64,
    pub(super) backslash: u64,
    /// `{` `}` `[` `]`.
    pub(super) bracket: u64,
    /// `,` `:`.
    pub(super) separator: u64,
}

impl Classes {
    /// SSE2 is part of x86-64 itself, so this needs no run-time check.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    pub(super) fn of(block: &[u8; BLOCK]) -> Self {
        use safe_arch::{
            bitor_m128i, cmp_eq_mask_i8_m128i, load_unaligned_m128i, move_mask_i8_m128i, set_splat_i8_m128i,
        };
        let splat = |b: u8| set_splat_i8_m128i(i8::from_ne_bytes([b]));
        let (quote, backslash, open, close) = (splat(b'"'), splat(b'\\'), splat(b'{'), splat(b'}'));
        let (comma, colon, case) = (splat(b','), splat(b':'), splat(0x20));
        let mut c = Classes::default();
        let mut shift = 0;
        for lane in block.chunks_exact(16) {
            let Ok(lane) = <&[u8; 16]>::try_from(lane) else {
                continue;
            };
            let v = load_unaligned_m128i(lane);
            // `[` and `]` are `{` and `}` with bit 5 clear, and no other byte becomes
            // either when it is set.
            let folded = bitor_m128i(v, case);
            let bits = |m| u64::from(move_mask_i8_m128i(m) as u16) << shift;
            c.quote |= bits(cmp_eq_mask_i8_m128i(v, quote));
            c.backslash |= bits(cmp_eq_mask_i8_m128i(v, backslash));
            c.bracket |= bits(bitor_m128i(
                cmp_eq_mask_i8_m128i(folded, open),
                cmp_eq_mask_i8_m128i(folded, close),
            ));
            c.separator |= bits(bitor_m128i(
                cmp_eq_mask_i8_m128i(v, comma),
                cmp_eq_mask_i8_m128i(v, colon),
            ));
            shift += 16;
        }
        c
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    pub(super) fn of(block: &[u8; BLOCK]) -> Self {
        Self::of_words(block)
    }

    /// Eight bytes at a time: the portable build's way, and the tests' check on SSE2's.
    #[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
    pub(super) fn of_words(block: &[u8; BLOCK]) -> Self {
        const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
        const LOW7: u64 = u64::from_ne_bytes([0x7f; 8]);
        // Bit 7 of each byte of `v` equal to `b`, exactly (no borrow between bytes).
        let eq = |v: u64, b: u8| {
            let x = v ^ (ONES * u64::from(b));
            !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7)
        };
        // Bit 7 of byte i to bit i: the multiplier's partial products never overlap.
        let gather = |m: u64| (m >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56;
        let mut c = Classes::default();
        let mut shift = 0;
        for word in block.chunks_exact(8) {
            let Ok(word) = <[u8; 8]>::try_from(word) else { continue };
            let v = u64::from_le_bytes(word);
            let folded = v | (ONES * 0x20);
            c.quote |= gather(eq(v, b'"')) << shift;
            c.backslash |= gather(eq(v, b'\\')) << shift;
            c.bracket |= gather(eq(folded, b'{') | eq(folded, b'}')) << shift;
            c.separator |= gather(eq(v, b',') | eq(v, b':')) << shift;
            shift += 8;
        }
        c
    }
}

/// What carries from the end of one block (or chunk) to the start of the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Carry {
    /// The next byte is inside a string (its quote, if it is one, closes it).
    pub(super) in_string: bool,
    /// The next byte is escaped by an odd run of backslashes before it.
    pub(super) escaped: bool,
}

/// The strings of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Strings {
    /// The quotes that open or close a string (not escaped).
    pub(super) quotes: u64,
    /// Bytes inside strings, opening quotes included and closing ones not: a quote at a
    /// set bit opens a string, at a clear bit closes one.
    pub(super) inside: u64,
}

/// The strings of a block whose first `len` bytes are real (the rest zeros, which are
/// none of the classes), given the carry from before it; `carry` becomes the carry
/// after byte `len - 1`.
pub(super) fn strings(c: &Classes, len: usize, carry: &mut Carry) -> Strings {
    const EVEN: u64 = 0x5555_5555_5555_5555;
    let prior = u64::from(carry.escaped);
    // simdjson's branch-free escapes: a backslash run's length is odd where adding its
    // start to it carries past its end onto an odd bit.
    let backslash = c.backslash & !prior;
    let follows = (backslash << 1) | prior;
    let odd_starts = backslash & !EVEN & !follows;
    let (even_starts, overflow) = odd_starts.overflowing_add(backslash);
    let escaped = (EVEN ^ (even_starts << 1)) & follows;
    let quotes = c.quote & !escaped;
    let inside = prefix_xor(quotes) ^ 0u64.wrapping_sub(u64::from(carry.in_string));
    let last = len.clamp(1, BLOCK) - 1;
    carry.in_string = (inside >> last) & 1 != 0;
    carry.escaped = if len >= BLOCK {
        overflow
    } else {
        // The padding's first zero byte is where the next real byte would be.
        (escaped >> len) & 1 != 0
    };
    Strings { quotes, inside }
}

/// The bits of a block after bit `p`.
pub(super) fn above(p: u32) -> u64 {
    u64::MAX.checked_shl(p + 1).unwrap_or(0)
}

/// One block's bytes that can matter to the scan, as bits.
pub(super) struct Marks {
    /// The quotes that open or close a string.
    pub(super) quotes: u64,
    /// Set from a string's opening quote up to its closing one (which is clear).
    pub(super) inside: u64,
    /// Brackets outside strings.
    pub(super) brackets: u64,
    /// Brackets, commas and colons outside strings.
    structural: u64,
}

impl Marks {
    /// The block's marks, its first `len` bytes real; `carry` as for [`strings`].
    pub(super) fn of(block: &[u8; BLOCK], len: usize, carry: &mut Carry) -> Self {
        let classes = Classes::of(block);
        let strings = strings(&classes, len, carry);
        let outside = !strings.inside;
        Self {
            quotes: strings.quotes,
            inside: strings.inside,
            brackets: classes.bracket & outside,
            structural: (classes.bracket | classes.separator) & outside,
        }
    }

    /// The bytes worth a visit at the key depth: the quotes only while a key is
    /// expected or being read (`keys`), as a value's string needs none.
    pub(super) fn at_keys(&self, keys: bool) -> u64 {
        if keys {
            self.quotes | self.structural
        } else {
            self.structural
        }
    }
}

/// Bit `i` is the parity of bits `0..=i`.
fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}
