//! Normalising a request's path before anything decides on it (RFC 3986
//! §6.2.2): percent-encoded unreserved characters are decoded, the hex digits
//! of the remaining percent-encodings are upper-cased, and dot segments are
//! removed (§5.2.4). The content-source plugin's path rules, the cache key
//! and the request forwarded upstream all see the same normalised path, so
//! `/public/../private/x.bin` or `/public/%2e%2e/private/x.bin` cannot slip
//! past a rule for `/public/**`.
//!
//! Unlike §5.2.4, which silently drops a `..` at the root, a path that climbs
//! above the root is refused: no client asks for one in good faith.

/// Why a request target was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    BadPercent,
    /// A `..` segment that climbs above the root.
    EscapesRoot,
    /// The path does not start with `/`.
    NotAbsolute,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::BadPercent => "malformed percent-encoding in the path",
            PathError::EscapesRoot => "the path climbs above the root with '..'",
            PathError::NotAbsolute => "the path does not start with '/'",
        })
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes percent-encoded unreserved characters and upper-cases the hex
/// digits of the others (RFC 3986 §6.2.2.1–2). Everything else is kept.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            // Copy the run up to the next '%' as it is (it may hold UTF-8).
            let next = b[i..].iter().position(|&c| c == b'%').map_or(b.len(), |p| i + p);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) else {
            return Err(PathError::BadPercent);
        };
        let (Some(hv), Some(lv)) = (hex(h), hex(l)) else {
            return Err(PathError::BadPercent);
        };
        let byte = hv << 4 | lv;
        if is_unreserved(byte) {
            out.push(byte as char);
        } else {
            out.push('%');
            out.push(h.to_ascii_uppercase() as char);
            out.push(l.to_ascii_uppercase() as char);
        }
        i += 3;
    }
    Ok(out)
}

/// Removes `.` and `..` segments (RFC 3986 §5.2.4), refusing a `..` that
/// would climb above the root. A trailing `.` or `..` leaves a trailing `/`,
/// as in the RFC.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotAbsolute);
    };
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                if kept.pop().is_none() {
                    return Err(PathError::EscapesRoot);
                }
                trailing_slash = i == last;
            }
            s => {
                kept.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Normalises a request's `path[?query]`: the path as described in the
/// module docs, the query kept as sent.
///
/// # Errors
/// [`PathError`] for a path that cannot be normalised or escapes the root.
pub fn normalize(path_and_query: &str) -> Result<String, PathError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let decoded = decode_unreserved(path)?;
    let mut out = remove_dot_segments(&decoded)?;
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_removed() {
        for (input, want) in [
            ("/", "/"),
            ("/a/b/c", "/a/b/c"),
            ("/a/./b", "/a/b"),
            ("/a/b/../c", "/a/c"),
            ("/public/../private/x.bin", "/private/x.bin"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a//b", "/a//b"),
            ("/a/b/", "/a/b/"),
            ("/..a/b..", "/..a/b.."),
            ("/a/.../b", "/a/.../b"),
            ("/pool/x.deb?a=/../b", "/pool/x.deb?a=/../b"),
        ] {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn unreserved_characters_are_decoded_and_others_kept() {
        for (input, want) in [
            ("/public/%2e%2e/private/x.bin", "/private/x.bin"),
            ("/public/%2E%2e/private/x.bin", "/private/x.bin"),
            ("/public/.%2E/private", "/private"),
            ("/%7euser/%41b", "/~user/Ab"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%20b", "/a%20b"),
            ("/caf%c3%a9", "/caf%C3%A9"),
        ] {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn escaping_and_malformed_paths_are_refused() {
        assert_eq!(normalize("/.."), Err(PathError::EscapesRoot));
        assert_eq!(normalize("/../etc/passwd"), Err(PathError::EscapesRoot));
        assert_eq!(normalize("/a/../../b"), Err(PathError::EscapesRoot));
        assert_eq!(normalize("/%2e%2e/b"), Err(PathError::EscapesRoot));
        assert_eq!(normalize("/a%2"), Err(PathError::BadPercent));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadPercent));
        assert_eq!(normalize("a/b"), Err(PathError::NotAbsolute));
    }

    proptest::proptest! {
        /// Whatever comes in: no panic; a normalised path starts with '/',
        /// has no dot segment, no encoded unreserved character, and
        /// normalising it again changes nothing.
        #[test]
        fn normalising_is_idempotent_and_leaves_no_dot_segments(
            p in "/([a-z.%2eE/]|%2[eE]|%2[fF]|\\.\\.|\\.){0,24}(\\?[a-z./]{0,6})?"
        ) {
            if let Ok(n) = normalize(&p) {
                let path = n.split('?').next().unwrap_or_default();
                proptest::prop_assert!(path.starts_with('/'));
                proptest::prop_assert!(!path.split('/').any(|s| s == "." || s == ".."), "{}", n);
                proptest::prop_assert!(!path.contains("%2e") && !path.contains("%2E"));
                proptest::prop_assert_eq!(normalize(&n), Ok(n.clone()));
            }
        }
    }
}
