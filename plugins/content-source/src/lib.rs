//! Holdfast's default content-source plugin: a table of package-repository
//! sources for the range cache.
//!
//! Each source names the hostnames it answers for (aliases share one cache
//! namespace), the origin to fetch from, and path patterns for immutable
//! content (packages) and for index files that must be revalidated. Patterns
//! are globs: `*` matches within one path segment, `**` across segments.
//! A request for an unknown host is denied with 403; so is a path that
//! matches neither class when `other = "deny"`.
//!
//! Delivery Optimization clients send the real host in the
//! `cacheHostOrigin` query parameter; it is honoured and removed from the
//! cache key.
//!
//! ```toml
//! [[plugins.content-source.config.sources]]
//! name = "debian"
//! hosts = ["deb.debian.org", "ftp.debian.org"]
//! origin = "https://deb.debian.org"
//! immutable = ["/**/*.deb", "/**/by-hash/**"]
//! revalidate = ["/**/InRelease", "/**/Release", "/**/Packages*"]
//! other = "revalidate"        # revalidate | pass-through | deny
//! ttl_seconds = 300           # cap on the origin's freshness (0: none, the default)
//! max_object_size = 4294967296
//! ```

use holdfast_sdk::Config;
use holdfast_sdk::content::{CachePlan, ContentClass, ContentSource, Decision, RequestHead};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    sources: Vec<Source>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Other {
    Revalidate,
    PassThrough,
    Deny,
}

fn default_other() -> Other {
    Other::Revalidate
}

fn default_ttl() -> u32 {
    // No bound: `revalidate` content follows the origin's Cache-Control,
    // Expires and Last-Modified (RFC 9111).
    0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    name: String,
    hosts: Vec<String>,
    origin: String,
    #[serde(default)]
    immutable: Vec<String>,
    #[serde(default)]
    revalidate: Vec<String>,
    #[serde(default = "default_other")]
    other: Other,
    #[serde(default = "default_ttl")]
    ttl_seconds: u32,
    max_object_size: Option<u64>,
    /// The origin's host and port, filled in by `init`: a request for the
    /// origin itself (as a child cache sends) belongs to this source.
    #[serde(skip)]
    origin_authority: (String, u16),
    /// `immutable` and `revalidate`, compiled by `init`.
    #[serde(skip)]
    immutable_globs: Vec<Glob>,
    #[serde(skip)]
    revalidate_globs: Vec<Glob>,
}

/// Host and port of an `http(s)://host[:port]` URL.
fn authority_of(url: &str) -> Option<(String, u16)> {
    let (default, rest) = match url.split_once("://")? {
        ("http", r) => (80, r),
        ("https", r) => (443, r),
        _ => return None,
    };
    let auth = rest.split('/').next()?;
    if let Some(v6) = auth.strip_prefix('[') {
        let (h, p) = v6.split_once(']')?;
        let port = p.strip_prefix(':').map_or(Some(default), |p| p.parse().ok())?;
        return Some((h.to_ascii_lowercase(), port));
    }
    match auth.rsplit_once(':') {
        Some((h, p)) => Some((h.to_ascii_lowercase(), p.parse().ok()?)),
        None => Some((auth.to_ascii_lowercase(), default)),
    }
}

/// The default content-source plugin.
#[derive(Debug)]
pub struct DefaultContentSource {
    sources: Vec<Source>,
}

/// One element of a compiled glob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// This byte.
    Byte(u8),
    /// `*`: any run of bytes other than `/`, possibly empty.
    Star,
    /// `**`: any run of bytes, possibly empty. Followed by `/`, it may also
    /// match zero segments (`/**/x` matches `/x`).
    Stars,
}

/// A path glob, compiled once: `*` stays within a segment, `**` crosses
/// segments. Matching simulates the glob as a nondeterministic automaton
/// over the set of pattern positions it can be at, one path byte at a time:
/// the work is at most (path length + 1) × (pattern length + 1) steps,
/// whatever the pattern and path. A backtracking matcher takes time exponential in
/// the number of `**` for a crafted path, which a client controls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    toks: Vec<Tok>,
    /// The same automaton as bit sets, for patterns of fewer than 64
    /// elements (all in practice): a byte costs a few word operations.
    bits: Option<Box<Bits>>,
}

/// Bit `j` stands for pattern position `j`; bit `len` for the end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits {
    /// Positions holding each byte.
    byte: [u64; 256],
    /// Positions holding `*`.
    star: u64,
    /// Positions holding `**`.
    stars: u64,
    /// Positions holding `**` followed by `/`.
    stars_slash: u64,
    /// The end of the pattern.
    end: u64,
}

impl Bits {
    fn new(toks: &[Tok]) -> Option<Box<Bits>> {
        if toks.len() >= 64 {
            return None;
        }
        let mut b = Box::new(Bits {
            byte: [0; 256],
            star: 0,
            stars: 0,
            stars_slash: 0,
            end: 1 << toks.len(),
        });
        for (j, t) in toks.iter().enumerate() {
            match t {
                Tok::Byte(c) => b.byte[usize::from(*c)] |= 1 << j,
                Tok::Star => b.star |= 1 << j,
                Tok::Stars => {
                    b.stars |= 1 << j;
                    if toks.get(j + 1) == Some(&Tok::Byte(b'/')) {
                        b.stars_slash |= 1 << j;
                    }
                }
            }
        }
        Some(b)
    }

    /// Positions `entered` and everything reachable from them without
    /// consuming a byte (what follows a star; past `**/` for an entered `**`).
    fn closure(&self, mut entered: u64) -> u64 {
        loop {
            let more = entered | ((entered & (self.star | self.stars)) << 1) | ((entered & self.stars_slash) << 2);
            if more == entered {
                return entered;
            }
            entered = more;
        }
    }

    fn run(&self, path: &[u8]) -> bool {
        let mut now = self.closure(1);
        for &c in path {
            // Stars consume the byte and stay (no zero-segment skip)…
            let stay = (now & self.stars) | if c == b'/' { 0 } else { now & self.star };
            // …and enter what follows them, as a matching byte does.
            let entered = ((now & self.byte[usize::from(c)]) << 1) | (stay << 1);
            now = stay | self.closure(entered);
            if now == 0 {
                return false;
            }
        }
        now & self.end != 0
    }
}

impl Glob {
    /// Compiles `pattern`.
    pub fn new(pattern: &str) -> Glob {
        let b = pattern.as_bytes();
        let mut toks = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'*' {
                if b.get(i + 1) == Some(&b'*') {
                    toks.push(Tok::Stars);
                    i += 2;
                } else {
                    toks.push(Tok::Star);
                    i += 1;
                }
            } else {
                toks.push(Tok::Byte(b[i]));
                i += 1;
            }
        }
        let bits = Bits::new(&toks);
        Glob { toks, bits }
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match &self.bits {
            Some(bits) => bits.run(path.as_bytes()),
            None => self.run(path.as_bytes()),
        }
    }

    /// Adds position `j`, entered from the position before it, to the
    /// positions reached after `step` bytes, with everything reachable from
    /// it without consuming a byte. `seen[j] == step` marks `j` as reached.
    fn enter(&self, set: &mut Vec<usize>, seen: &mut [usize], step: usize, mut j: usize) {
        loop {
            let tok = self.toks.get(j);
            // Zero segments: `**/` skips its `/` when it matched nothing.
            // Done on every entry, even into a position already reached by
            // a star staying on itself, which does not skip.
            if tok == Some(&Tok::Stars) && self.toks.get(j + 1) == Some(&Tok::Byte(b'/')) {
                self.enter(set, seen, step, j + 2);
            }
            if seen[j] == step {
                return;
            }
            seen[j] = step;
            set.push(j);
            match tok {
                Some(Tok::Star | Tok::Stars) => j += 1,
                Some(Tok::Byte(_)) | None => return,
            }
        }
    }

    /// The automaton for any pattern length: positions are kept as a list
    /// of those reached (at most pattern length + 1), so a byte costs only
    /// as much as the positions it moves.
    fn run(&self, path: &[u8]) -> bool {
        let n = self.toks.len();
        let mut seen = vec![usize::MAX; n + 1];
        let mut now = Vec::with_capacity(n + 1);
        let mut next = Vec::with_capacity(n + 1);
        self.enter(&mut now, &mut seen, 0, 0);
        for (i, &c) in path.iter().enumerate() {
            let step = i + 1;
            next.clear();
            for &j in &now {
                match self.toks.get(j) {
                    Some(Tok::Byte(b)) if *b == c => self.enter(&mut next, &mut seen, step, j + 1),
                    Some(Tok::Star) if c == b'/' => {}
                    // A star consumes the byte and stays: it and what follows
                    // it, but not the zero-segment skip.
                    Some(Tok::Star | Tok::Stars) => {
                        if seen[j] != step {
                            seen[j] = step;
                            next.push(j);
                            self.enter(&mut next, &mut seen, step, j + 1);
                        }
                    }
                    Some(Tok::Byte(_)) | None => {}
                }
            }
            if next.is_empty() {
                return false;
            }
            std::mem::swap(&mut now, &mut next);
        }
        now.contains(&n)
    }
}

/// Matches a path against a glob where `*` stays within a segment and `**`
/// crosses segments. Compiles the pattern each time: see [`Glob`] to keep it.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    Glob::new(pattern).matches(path)
}

fn strip_param(path_and_query: &str, name: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| p.split('=').next() != Some(name) && !p.is_empty())
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

impl ContentSource for DefaultContentSource {
    fn init(config: &Config) -> Result<Self, String> {
        let mut settings: Settings = config.deserialize()?;
        for (i, s) in settings.sources.iter_mut().enumerate() {
            let what = format!("sources[{i}] ({})", s.name);
            if s.hosts.is_empty() {
                return Err(format!("{what}: hosts is empty"));
            }
            if !(s.origin.starts_with("http://") || s.origin.starts_with("https://")) {
                return Err(format!(
                    "{what}: origin must start with http:// or https://, got {:?}",
                    s.origin
                ));
            }
            s.origin_authority =
                authority_of(&s.origin).ok_or_else(|| format!("{what}: origin {:?} is not a URL", s.origin))?;
            for p in s.immutable.iter().chain(&s.revalidate) {
                if !p.starts_with('/') {
                    return Err(format!("{what}: pattern {p:?} must start with /"));
                }
            }
            s.immutable_globs = s.immutable.iter().map(|p| Glob::new(p)).collect();
            s.revalidate_globs = s.revalidate.iter().map(|p| Glob::new(p)).collect();
        }
        Ok(DefaultContentSource {
            sources: settings.sources,
        })
    }

    fn classify(&self, request: &RequestHead) -> Decision {
        // Every method is classified alike: the cache stores GET and HEAD
        // answers, and passes other methods to the plan's origin uncached
        // (invalidating what it stored for the target, RFC 9111 §4.4).
        let host = request
            .query_param("cacheHostOrigin")
            .map(|h| h.to_ascii_lowercase())
            .unwrap_or_else(|| request.host.clone());
        let Some(source) = self.sources.iter().find(|s| {
            s.hosts.iter().any(|h| h.eq_ignore_ascii_case(&host))
                || (s.origin_authority.0 == host && request.port.is_none_or(|p| p == s.origin_authority.1))
        }) else {
            return Decision::Deny(format!("host {host:?} is not a configured source"));
        };
        let origin_path = strip_param(&request.path_and_query, "cacheHostOrigin");
        let path = origin_path.split('?').next().unwrap_or("");
        let class = if source.immutable_globs.iter().any(|g| g.matches(path)) {
            ContentClass::Immutable
        } else if source.revalidate_globs.iter().any(|g| g.matches(path)) {
            ContentClass::Revalidate
        } else {
            match source.other {
                Other::Revalidate => ContentClass::Revalidate,
                Other::PassThrough => return Decision::PassThrough(source.origin.clone()),
                Other::Deny => return Decision::Deny(format!("path {path:?} is not served for {}", source.name)),
            }
        };
        Decision::Cache(CachePlan {
            origin: source.origin.trim_end_matches('/').to_string(),
            key: format!("{}:{}", source.name, origin_path),
            origin_path,
            class,
            ttl_seconds: source.ttl_seconds,
            max_object_size: source.max_object_size,
        })
    }
}

holdfast_sdk::export_content_source!(DefaultContentSource);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> DefaultContentSource {
        DefaultContentSource::init(
            &Config::parse(
                r#"{"sources":[{"name":"debian","hosts":["deb.debian.org","ftp.debian.org"],
                "origin":"https://deb.debian.org/","immutable":["/**/*.deb"],
                "revalidate":["/**/InRelease"],"other":"deny","max_object_size":100}]}"#,
            )
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn aliases_share_a_namespace_and_classes_follow_patterns() {
        let p = plugin();
        let a = p.classify(&RequestHead::get(
            "deb.debian.org",
            "/debian/pool/main/c/curl/curl_8.deb",
        ));
        let b = p.classify(&RequestHead::get(
            "ftp.debian.org",
            "/debian/pool/main/c/curl/curl_8.deb",
        ));
        assert_eq!(a, b);
        let Decision::Cache(plan) = a else { panic!("{a:?}") };
        assert_eq!(plan.class, ContentClass::Immutable);
        assert_eq!(plan.key, "debian:/debian/pool/main/c/curl/curl_8.deb");
        assert_eq!(plan.origin, "https://deb.debian.org");
        assert_eq!(plan.max_object_size, Some(100));
        let Decision::Cache(idx) = p.classify(&RequestHead::get("deb.debian.org", "/debian/dists/bookworm/InRelease"))
        else {
            panic!()
        };
        assert_eq!(idx.class, ContentClass::Revalidate);
        assert!(matches!(
            p.classify(&RequestHead::get("deb.debian.org", "/x.txt")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            p.classify(&RequestHead::get("evil.example", "/a.deb")),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn cache_host_origin_is_honoured_and_not_part_of_the_key() {
        let p = plugin();
        let d = p.classify(&RequestHead::get(
            "10.0.0.1",
            "/pool/x.deb?cacheHostOrigin=deb.debian.org&a=1",
        ));
        let Decision::Cache(plan) = d else { panic!("{d:?}") };
        assert_eq!(plan.origin_path, "/pool/x.deb?a=1");
        assert_eq!(plan.key, "debian:/pool/x.deb?a=1");
    }

    #[test]
    fn a_request_for_the_origin_itself_belongs_to_its_source() {
        let p = DefaultContentSource::init(
            &Config::parse(
                r#"{"sources":[{"name":"t","hosts":["repo.test"],"origin":"http://127.0.0.1:8999","immutable":["/**"]}]}"#,
            )
            .unwrap(),
        )
        .unwrap();
        let mut head = RequestHead::get("127.0.0.1", "/a.deb");
        head.port = Some(8999);
        assert!(matches!(p.classify(&head), Decision::Cache(_)));
        head.port = Some(9000);
        assert!(matches!(p.classify(&head), Decision::Deny(_)));
        head.port = None;
        assert!(matches!(p.classify(&head), Decision::Cache(_)));
        assert_eq!(authority_of("https://[::1]/"), Some(("::1".into(), 443)));
        assert_eq!(
            authority_of("http://Deb.Debian.org"),
            Some(("deb.debian.org".into(), 80))
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("/**/*.deb", "/a/b/c.deb"));
        assert!(glob_match("/**/*.deb", "/c.deb"));
        assert!(!glob_match("/*.deb", "/a/c.deb"));
        assert!(glob_match("/dists/*/InRelease", "/dists/stable/InRelease"));
        assert!(!glob_match("/dists/*/InRelease", "/dists/a/b/InRelease"));
        assert!(glob_match("/**/pool/**/*.deb", "/debian/pool/main/c/curl/c.deb"));
        assert!(glob_match("/**/pool/**/*.deb", "/pool/c.deb"));
        assert!(!glob_match("/**/pool/**/*.deb", "/poolx/c.deb"));
        assert!(glob_match("/**", "/"));
        assert!(glob_match("/a**", "/a/b/c"));
        assert!(!glob_match("/**/x", "/abx"), "`**/` skips its slash only when empty");
        assert!(glob_match("/**/x", "//x"));
        assert!(glob_match("/**/**/x", "/x"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "/"));
    }

    /// The backtracking matcher the plugin used before: the reference for
    /// what a glob means (it is exponential in the number of `**`).
    fn reference(p: &[u8], s: &[u8]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                let rest = &p[2..];
                let rest_noslash = rest.strip_prefix(b"/").unwrap_or(rest);
                (0..=s.len()).any(|i| reference(rest, &s[i..]) || (i == 0 && reference(rest_noslash, s)))
            }
            Some(b'*') => {
                let rest = &p[1..];
                for i in 0..=s.len() {
                    if reference(rest, &s[i..]) {
                        return true;
                    }
                    if i < s.len() && s[i] == b'/' {
                        break;
                    }
                }
                false
            }
            Some(c) => s.first() == Some(c) && reference(&p[1..], &s[1..]),
        }
    }

    #[test]
    fn the_automaton_agrees_with_the_backtracking_reference() {
        // Every short pattern and path over a small alphabet, plus random
        // longer ones (xorshift, fixed seed).
        fn all(alphabet: &[u8], max: usize) -> Vec<Vec<u8>> {
            let mut out = vec![Vec::new()];
            let mut last = vec![Vec::new()];
            for _ in 0..max {
                let mut grown = Vec::new();
                for w in &last {
                    for &c in alphabet {
                        let mut v: Vec<u8> = w.clone();
                        v.push(c);
                        grown.push(v);
                    }
                }
                out.extend(grown.iter().cloned());
                last = grown;
            }
            out
        }
        let patterns = all(b"*/a", 5);
        let paths = all(b"/ab", 5);
        let mut checked = 0;
        for p in &patterns {
            let glob = Glob::new(std::str::from_utf8(p).unwrap());
            for s in &paths {
                let want = reference(p, s);
                assert_eq!(
                    (glob.matches(std::str::from_utf8(s).unwrap()), glob.run(s)),
                    (want, want),
                    "pattern {:?} path {:?} (bit sets, list)",
                    String::from_utf8_lossy(p),
                    String::from_utf8_lossy(s)
                );
                checked += 1;
            }
        }
        assert!(checked > 100_000, "{checked}");
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rand = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for _ in 0..20_000 {
            let p: Vec<u8> = (0..rand(10)).map(|_| b"*/ab."[rand(5)]).collect();
            let s: Vec<u8> = (0..rand(14)).map(|_| b"/ab."[rand(4)]).collect();
            let glob = Glob::new(std::str::from_utf8(&p).unwrap());
            let want = reference(&p, &s);
            assert_eq!(
                (glob.matches(std::str::from_utf8(&s).unwrap()), glob.run(&s)),
                (want, want),
                "pattern {:?} path {:?}",
                String::from_utf8_lossy(&p),
                String::from_utf8_lossy(&s)
            );
        }
    }

    /// Issue 28, item 4: a crafted path against a pattern with two `**`
    /// made the backtracking matcher run for longer than any plugin
    /// deadline (the test did not finish with it). The automaton answers
    /// 64 KiB paths at once.
    #[test]
    fn adversarial_64_kib_paths_do_not_blow_up() {
        const LEN: usize = 64 << 10;
        let pad = |unit: &str, tail: &str| {
            let mut s = String::from("/");
            while s.len() + unit.len() + tail.len() <= LEN {
                s.push_str(unit);
            }
            s.push_str(tail);
            s
        };
        let cases = [
            ("/**/pool/**/*.deb", pad("pool/", "x.deb/"), false),
            ("/**/pool/**/*.deb", pad("pool/", "x.deb"), true),
            ("/**/pool/**/*.deb", pad("a/pool/", "x.de"), false),
            ("/**/by-hash/**", pad("by-hash/", ""), true),
            ("/**/a/**/a/**/a/**/b", pad("a/", "c"), false),
            ("/**a**a**a**a**b", pad("a", ""), false),
            ("/*a*a*a*a*b", pad("a", ""), false),
        ];
        for (pattern, path, want) in cases {
            assert!(path.len() >= LEN - 16 && path.len() <= LEN, "{}", path.len());
            let glob = Glob::new(pattern);
            assert!(glob.bits.is_some());
            assert_eq!(glob.matches(&path), want, "{pattern}");
            assert_eq!(glob.run(path.as_bytes()), want, "{pattern} (list)");
        }
        // A pattern too long for the bit sets is matched by the list.
        let long = format!("/**{}/**/*.deb", "/pool".repeat(40));
        let glob = Glob::new(&long);
        assert!(glob.bits.is_none());
        assert!(!glob.matches(&pad("pool/", "x.deb/")));
        assert!(glob.matches(&pad("pool/", "x.deb")));
        // Through the plugin, as a client would send it.
        let p = DefaultContentSource::init(
            &Config::parse(
                r#"{"sources":[{"name":"d","hosts":["repo.test"],"origin":"http://o.test",
                "immutable":["/**/pool/**/*.deb"],"other":"deny"}]}"#,
            )
            .unwrap(),
        )
        .unwrap();
        let d = p.classify(&RequestHead::get("repo.test", pad("pool/", "x.deb/")));
        assert!(matches!(d, Decision::Deny(_)), "{d:?}");
    }

    #[test]
    fn bad_config_is_rejected() {
        let bad = r#"{"sources":[{"name":"x","hosts":[],"origin":"https://a"}]}"#;
        assert!(
            DefaultContentSource::init(&Config::parse(bad).unwrap())
                .unwrap_err()
                .contains("hosts is empty")
        );
        let bad = r#"{"sources":[{"name":"x","hosts":["a"],"origin":"ftp://a"}]}"#;
        assert!(
            DefaultContentSource::init(&Config::parse(bad).unwrap())
                .unwrap_err()
                .contains("origin must")
        );
    }
}
