//! A direct reader for the shape nearly every event has: one JSON object whose
//! values are strings without escapes, integers, booleans, nulls, and (for
//! memo columns) a nested object kept as text. It skips serde's visitor
//! machinery, the largest cost of decoding after the content digest. A
//! context object that is itself flat and compact is recognized in the same
//! pass, so it is neither validated nor compacted a second time.
//!
//! It never decides anything on its own: whatever falls outside that shape
//! (escapes, fractions, exponents, nested values elsewhere, any syntax
//! error) makes it answer `None`, and the caller reads the payload with
//! serde_json, which stays the reference for every accepted and refused
//! document. A property test holds the two to the same fields.

use std::borrow::Cow;

use crate::normalize::FieldValue;

/// The fields of a flat object, in document order, or `None` when the text
/// is not of the simple shape (the caller then parses it with serde_json).
/// `is_memo` tells which keys may carry an object stored as text.
pub(crate) fn read_flat_object<'a>(
    text: &'a str,
    is_memo: impl Fn(&str) -> bool,
) -> Option<Vec<(Cow<'a, str>, FieldValue<'a>)>> {
    let mut r = Reader { text, bytes: text.as_bytes(), pos: 0 };
    r.skip_ws();
    r.expect(b'{')?;
    let mut fields = Vec::with_capacity(16);
    r.skip_ws();
    if r.peek()? == b'}' {
        r.pos += 1;
    } else {
        loop {
            let key = r.string()?;
            r.skip_ws();
            r.expect(b':')?;
            r.skip_ws();
            let value = match r.peek()? {
                b'"' => FieldValue::Str(Cow::Borrowed(r.string()?)),
                b'{' if is_memo(key) => {
                    let start = r.pos;
                    match r.compact_flat_object() {
                        Some(text) => FieldValue::CompactObject(text),
                        None => {
                            r.pos = start;
                            FieldValue::RawObject(r.raw_object()?)
                        }
                    }
                }
                b'-' | b'0'..=b'9' => FieldValue::Int(r.integer()?),
                b't' => r.literal("true", FieldValue::Bool)?,
                b'f' => r.literal("false", FieldValue::Bool)?,
                b'n' => r.literal("null", FieldValue::Null)?,
                _ => return None,
            };
            fields.push((Cow::Borrowed(key), value));
            r.skip_ws();
            match r.next()? {
                b',' => r.skip_ws(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    r.skip_ws();
    (r.pos == r.bytes.len()).then_some(fields)
}

/// Most keys of a context object read by [`Reader::compact_flat_object`]:
/// past them a repeat is looked for by `compact_json`'s hash set instead.
const COMPACT_OBJECT_KEYS: usize = 16;

struct Reader<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    /// JSON's four whitespace bytes.
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// A string without escapes or control characters, borrowed. The text is
    /// valid UTF-8 and both ends are ASCII quotes, so the slice is too.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.pos;
        let rest = &self.bytes[start..];
        let len = string_end(rest)?;
        if rest[len] != b'"' {
            return None;
        }
        self.pos = start + len + 1;
        self.text.get(start..start + len)
    }

    /// `-? (0 | [1-9][0-9]*)` fitting an i64 and not followed by a fraction
    /// or exponent (serde reads those as floats).
    fn integer(&mut self) -> Option<i64> {
        let negative = self.peek()? == b'-';
        if negative {
            self.pos += 1;
        }
        let digits = self.whole_digits()?;
        if negative && digits == b"0" {
            // serde_json reads `-0` as the float -0.0.
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.peek() {
            return None;
        }
        let magnitude = digits.iter().fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
        Some(if negative { -magnitude } else { magnitude })
    }

    /// The digits from here on.
    fn digits(&mut self) -> &'a [u8] {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        &self.bytes[start..self.pos]
    }

    /// A number's whole part as JSON writes it, `0 | [1-9][0-9]*`, of at most
    /// 18 digits (within i64 whatever they are); anything else (empty, a
    /// leading zero, possibly beyond i64) is serde's to decide.
    fn whole_digits(&mut self) -> Option<&'a [u8]> {
        let digits = self.digits();
        let valid = !digits.is_empty() && digits.len() <= 18 && (digits.len() == 1 || digits[0] != b'0');
        valid.then_some(digits)
    }

    fn literal<T>(&mut self, word: &str, value: T) -> Option<T> {
        let end = self.pos + word.len();
        (self.bytes.get(self.pos..end)? == word.as_bytes()).then(|| {
            self.pos = end;
            value
        })
    }

    /// A nested object that is already compact, as its text: one level of
    /// plain strings, numbers without exponents, booleans and nulls, no
    /// whitespace, at most [`COMPACT_OBJECT_KEYS`] keys and none twice (the
    /// usual context object). Such text is exactly what `compact_json` would
    /// make of it, so it is stored as sent with no second scan. Anything
    /// else answers `None` (the position is then the caller's to reset) and
    /// goes through [`Reader::raw_object`] and `compact_json`.
    fn compact_flat_object(&mut self) -> Option<&'a str> {
        let start = self.pos;
        self.expect(b'{')?;
        if self.peek()? == b'}' {
            self.pos += 1;
            return self.text.get(start..self.pos);
        }
        let mut keys = [""; COMPACT_OBJECT_KEYS];
        let mut count = 0;
        loop {
            let key = self.string()?;
            if count == COMPACT_OBJECT_KEYS || keys[..count].contains(&key) {
                return None;
            }
            keys[count] = key;
            count += 1;
            self.expect(b':')?;
            match self.peek()? {
                b'"' => {
                    self.string()?;
                }
                b'-' | b'0'..=b'9' => self.plain_number()?,
                b't' => self.literal("true", ())?,
                b'f' => self.literal("false", ())?,
                b'n' => self.literal("null", ())?,
                _ => return None,
            }
            match self.next()? {
                b',' => {}
                b'}' => return self.text.get(start..self.pos),
                _ => return None,
            }
        }
    }

    /// Steps over `-? (0 | [1-9][0-9]*) (. [0-9]+)?` of at most 18 digits on
    /// each side: a JSON number whatever reads it. Exponents and longer
    /// numbers are left to serde_json.
    fn plain_number(&mut self) -> Option<()> {
        if self.peek()? == b'-' {
            self.pos += 1;
        }
        self.whole_digits()?;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            let fraction = self.digits().len();
            if fraction == 0 || fraction > 18 {
                return None;
            }
        }
        match self.peek()? {
            b'e' | b'E' => None,
            _ => Some(()),
        }
    }

    /// A nested object as its text, validated by serde_json (which also
    /// bounds its depth).
    fn raw_object(&mut self) -> Option<&'a str> {
        let rest = self.text.get(self.pos..)?;
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<&serde_json::value::RawValue>();
        let raw = values.next()?.ok()?;
        self.pos += values.byte_offset();
        Some(raw.get())
    }
}

/// Index of the first byte that ends a plain string (a quote) or needs
/// serde's handling (a backslash, a control character). Strings are most of
/// an event's bytes, so they are scanned sixteen bytes at a time with SSE2
/// (part of every x86-64 CPU), then eight at a time, then byte by byte. A
/// string is followed by the rest of the payload, so the wide scans rarely
/// fall through to the narrow ones.
pub(crate) fn string_end(bytes: &[u8]) -> Option<usize> {
    match wide_prefix(bytes) {
        Ok(found) => Some(found),
        Err(scanned) => word_scan(bytes, scanned),
    }
}

/// Scans whole 16-byte blocks: the index of the first match, or `Err` with
/// how far it got (the caller scans the rest).
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
fn wide_prefix(bytes: &[u8]) -> Result<usize, usize> {
    // SAFETY: the only requirement is SSE2, which this build targets (the
    // cfg above); it is part of the x86-64 baseline. Memory is only read
    // through bounds-checked slices.
    unsafe { sse2_prefix(bytes) }
}

#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[target_feature(enable = "sse2")]
fn sse2_prefix(bytes: &[u8]) -> Result<usize, usize> {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set_epi64x, _mm_set1_epi8,
    };
    let quote = _mm_set1_epi8(b'"' as i8);
    let backslash = _mm_set1_epi8(b'\\' as i8);
    let last_control = _mm_set1_epi8(0x1f);
    let mut at = 0;
    while let Some(block) = bytes.get(at..at + 16) {
        let half = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&block[i..i + 8]);
            i64::from_le_bytes(word)
        };
        let v = _mm_set_epi64x(half(8), half(0));
        // A byte is at most 0x1f exactly when its unsigned minimum with 0x1f is itself.
        let control = _mm_cmpeq_epi8(_mm_min_epu8(v, last_control), v);
        let flagged = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)), control);
        let mask = _mm_movemask_epi8(flagged);
        if mask != 0 {
            return Ok(at + mask.trailing_zeros() as usize);
        }
        at += 16;
    }
    Err(at)
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
fn wide_prefix(_: &[u8]) -> Result<usize, usize> {
    Err(0)
}

/// The eight-at-a-time scan from `at`: in each word a byte's high bit is set
/// where it is a quote, a backslash or below 0x20. The lowest flagged byte is
/// always a true match (the subtraction's borrow can only flag bytes above
/// one), and words are read little-endian, so the lowest flagged byte comes
/// first.
fn word_scan(bytes: &[u8], mut at: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let mut word_bytes = [0u8; 8];
        word_bytes.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word_bytes);
        let flagged =
            below(word ^ (ONES * u64::from(b'"')), 1) | below(word ^ (ONES * u64::from(b'\\')), 1) | below(word, 0x20);
        if flagged != 0 {
            return Some(at + (flagged.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let tail = bytes.get(at..)?;
    tail.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).map(|i| at + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The block and word scans find what a byte-at-a-time scan finds.
        #[test]
        fn string_end_matches_a_bytewise_scan(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let bytewise = bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            proptest::prop_assert_eq!(string_end(&bytes), bytewise);
        }

        /// Same, on text where matches are rare and sit anywhere in a word.
        #[test]
        fn string_end_finds_sparse_matches(len in 0usize..80, at in 0usize..80, byte in proptest::prelude::prop_oneof![
            proptest::prelude::Just(b'"'), proptest::prelude::Just(b'\\'), 0u8..0x20
        ]) {
            let mut bytes = vec![b'a'; len];
            if at < len {
                bytes[at] = byte;
                // A byte just above each threshold right after the match must not hide it.
                if at + 1 < len {
                    bytes[at + 1] = 0x80;
                }
            }
            proptest::prop_assert_eq!(string_end(&bytes), (at < len).then_some(at));
        }
    }
}
