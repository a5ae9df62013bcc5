//! Length-prefixed fields shared by the stored record format and the link's
//! frames.

use bytes::BufMut;

/// A field longer than its length prefix can express.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong(pub &'static str);

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is too long to encode", self.0)
    }
}

impl std::error::Error for TooLong {}

/// Appends `s` as a little-endian u16 length and its UTF-8 bytes.
///
/// # Errors
/// `s` is longer than 65,535 bytes: nothing is written (a string is never
/// cut, so never cut inside a character).
pub fn put_str16(out: &mut impl BufMut, s: &str, what: &'static str) -> Result<(), TooLong> {
    let len = u16::try_from(s.len()).map_err(|_| TooLong(what))?;
    out.put_u16_le(len);
    out.put_slice(s.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_does_not_fit_and_writes_nothing() {
        let mut out = Vec::new();
        put_str16(&mut out, "héllo", "x").unwrap();
        assert_eq!(out, [6, 0, b'h', 0xc3, 0xa9, b'l', b'l', b'o']);
        let long = "é".repeat(40_000);
        let mut out = Vec::new();
        assert_eq!(put_str16(&mut out, &long, "reason"), Err(TooLong("reason")));
        assert!(out.is_empty());
        put_str16(&mut out, &"a".repeat(65_535), "max").unwrap();
        assert_eq!(out.len(), 65_537);
    }
}
