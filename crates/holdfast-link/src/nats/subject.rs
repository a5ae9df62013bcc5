//! MQTT topics as NATS subjects, and back.
//!
//! A topic's levels become a subject's tokens: `site/line1/temp` under the
//! prefix `holdfast.gw1.0` is `holdfast.gw1.0.site.line1.temp`. What a
//! subject token cannot hold is escaped as `%XX` (upper-case hex): `.`,
//! `*`, `>`, `%`, white space and control characters. An empty level (as in
//! `a//b`) is the token `%`. The mapping is reversible: [`topic_of`] gives
//! the topic back, so a backend can restore it (it also travels in the
//! `holdfast-topic` header).

/// Appends `level` to `out` as one subject token.
pub fn push_token(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push('%');
        return;
    }
    for c in level.chars() {
        match c {
            '.' | '*' | '>' | '%' => push_escaped(out, c as u8),
            c if c.is_ascii_whitespace() || c.is_ascii_control() => push_escaped(out, c as u8),
            c => out.push(c),
        }
    }
}

fn push_escaped(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// The subject of `topic` under `prefix` (already a valid subject).
pub fn subject_of(prefix: &str, topic: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + topic.len() + 8);
    s.push_str(prefix);
    for level in topic.split('/') {
        if !s.is_empty() {
            s.push('.');
        }
        push_token(&mut s, level);
    }
    s
}

/// The topic of the subject tokens `rest` (what follows the prefix and its
/// dot); `None` when a token is not a valid escape.
pub fn topic_of(rest: &str) -> Option<String> {
    let mut topic = String::with_capacity(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            topic.push('/');
        }
        if token == "%" {
            continue;
        }
        let mut bytes = Vec::with_capacity(token.len());
        let mut it = token.bytes();
        while let Some(b) = it.next() {
            if b == b'%' {
                let hi = hex(it.next()?)?;
                let lo = hex(it.next()?)?;
                bytes.push(hi << 4 | lo);
            } else {
                bytes.push(b);
            }
        }
        topic.push_str(&String::from_utf8(bytes).ok()?);
    }
    Some(topic)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Fills `{node}` and `{lane}` in a prefix template; the node id is escaped
/// as a token.
pub fn prefix(template: &str, node: &str, lane: u8) -> String {
    let mut node_token = String::new();
    push_token(&mut node_token, node);
    template
        .replace("{node}", &node_token)
        .replace("{lane}", &lane.to_string())
}

/// True for a subject a publisher may use: tokens non-empty, no
/// wildcards, no white space.
pub fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty() && t != "*" && t != ">" && !t.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        })
}

/// A header name from a user property name: characters a NATS header name
/// cannot hold (`:`, white space, control and non-ASCII characters, `%`)
/// are escaped as `%XX` per UTF-8 byte. A name starting with `Nats-` (any
/// case) has its first letter escaped: those headers are JetStream's
/// controls (`Nats-Rollup` purges a subject, `Nats-Expected-*` makes every
/// publish fail), never a device's to set.
pub fn header_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let control = name.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("nats-"));
    for (i, c) in name.chars().enumerate() {
        if i == 0 && control {
            push_escaped(&mut out, c as u8);
        } else if c.is_ascii_graphic() && c != ':' && c != '%' {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                push_escaped(&mut out, b);
            }
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out
}

/// A header value: CR and LF (which a header cannot hold) are escaped as
/// `%0D` and `%0A`.
pub fn header_value(value: &str) -> String {
    if !value.contains(['\r', '\n']) {
        return value.to_string();
    }
    value.replace('\r', "%0D").replace('\n', "%0A")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_to_subjects_and_back() {
        let cases = [
            "site/line1/temp",
            "a//b",
            "/leading",
            "trailing/",
            "dots.in/a level",
            "wild*/card>/100%",
            "ünïcode/ok",
            "tab\there",
        ];
        for t in cases {
            let s = subject_of("holdfast.gw1.0", t);
            assert!(valid_subject(&s), "{t:?} gave the invalid subject {s:?}");
            let rest = s.strip_prefix("holdfast.gw1.0.").unwrap();
            assert_eq!(topic_of(rest).as_deref(), Some(t), "{s}");
        }
        assert_eq!(subject_of("p", "site/line1/temp"), "p.site.line1.temp");
        assert_eq!(subject_of("p", "a//b"), "p.a.%.b");
        assert_eq!(subject_of("p", "x.y"), "p.x%2Ey");
        assert_eq!(subject_of("", "a/b"), "a.b");
    }

    #[test]
    fn bad_escapes_are_refused() {
        assert_eq!(topic_of("a.%4"), None);
        assert_eq!(topic_of("a.%zz"), None);
        assert_eq!(topic_of("%FF%FE"), None);
        assert_eq!(topic_of("a.%2e").as_deref(), Some("a/."));
    }

    #[test]
    fn prefixes_fill_node_and_lane() {
        assert_eq!(prefix("holdfast.{node}.{lane}", "gw-1", 3), "holdfast.gw-1.3");
        assert_eq!(prefix("x.{node}", "a.b", 0), "x.a%2Eb");
        assert!(valid_subject("holdfast.gw1.0.a"));
        assert!(!valid_subject("holdfast..a"));
        assert!(!valid_subject("holdfast.*.a"));
        assert!(!valid_subject("a b"));
    }

    #[test]
    fn header_names_and_values_are_escaped() {
        assert_eq!(header_name("plain-name"), "plain-name");
        assert_eq!(header_name("with space:colon"), "with%20space%3Acolon");
        assert_eq!(header_name("é"), "%C3%A9");
        assert_eq!(header_name(""), "%");
        assert_eq!(header_name("Nats-Rollup"), "%4Eats-Rollup");
        assert_eq!(header_name("nats-expected-stream"), "%6Eats-expected-stream");
        assert_eq!(header_name("Natsu"), "Natsu");
        assert_eq!(header_value("a\r\nb"), "a%0D%0Ab");
        assert_eq!(header_value("100%"), "100%");
    }
}
