//! Message bytes read as text. What a span reads of a message (a method, a path, a host, a
//! status) is ASCII nearly always: checked a word at a time it is a `str` at once, where
//! `from_utf8` walks a short text byte by byte and `str::trim` sets up a pattern per call (the
//! two were 4% of a gRPC call's instructions in the tracing sink). Anything else is validated
//! and trimmed exactly as before.

/// `b` as text if it is UTF-8: `std::str::from_utf8(b).ok()`.
#[inline]
pub fn utf8(b: &[u8]) -> Option<&str> {
    if b.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(b) })
    } else {
        std::str::from_utf8(b).ok()
    }
}

/// `s.trim()`: the same text, found at once when neither end is whitespace.
#[inline]
pub fn trim(s: &str) -> &str {
    match (s.as_bytes().first(), s.as_bytes().last()) {
        (Some(&first), Some(&last)) if solid(first) && solid(last) => s,
        _ => s.trim(),
    }
}

/// An ASCII byte that is not whitespace: a text ending in one has nothing to trim there.
/// (`char::is_whitespace` in ASCII is tab to carriage return, and space.)
#[inline(always)]
fn solid(b: u8) -> bool {
    b.is_ascii() && !matches!(b, b'\t'..=b'\r' | b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_trimming_agree_with_std_on_every_kind_of_edge() {
        let samples: [&[u8]; 16] = [
            b"",
            b"POST",
            b"/pkg.Service/Method",
            b"  host:80 ",
            b"\x0bvt\x0b",
            b"\x0cff",
            b"tab\t",
            b"\r\n",
            "caf\u{e9}".as_bytes(),
            "\u{a0}nbsp\u{a0}".as_bytes(),
            "\u{2003}em".as_bytes(),
            "x\u{85}".as_bytes(),
            b"caf\xe9",
            b"\xff",
            b"a very long ascii value that crosses several machine words",
            "a long value that is not ascii at the very end \u{3000}".as_bytes(),
        ];
        for b in samples {
            assert_eq!(utf8(b), std::str::from_utf8(b).ok(), "{b:?}");
            if let Some(s) = utf8(b) {
                assert_eq!(trim(s), s.trim(), "{s:?}");
            }
        }
        // Every single byte, as a text of its own and at either end of one.
        for c in 0..=u8::MAX {
            for b in [vec![c], vec![c, b'a'], vec![b'a', c]] {
                assert_eq!(utf8(&b), std::str::from_utf8(&b).ok(), "{b:?}");
                if let Some(s) = utf8(&b) {
                    assert_eq!(trim(s), s.trim(), "{s:?}");
                }
            }
        }
    }
}
