//! HTTP range requests (RFC 9110 §14): parsing `Range`, resolving it against
//! an object's length, `Content-Range`, and the conditional headers the cache
//! evaluates (`If-Range`, `If-None-Match`, `If-Modified-Since`).
//!
//! Everything here is pure so it can be unit-, property- and fuzz-tested.

/// Most ranges one request may ask for; more are answered with the whole
/// object (RFC 9110 §14.2 lets a server ignore a Range header).
pub const MAX_RANGES: usize = 64;

/// One range as the client wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// `first-` or `first-last`.
    From {
        /// First byte.
        first: u64,
        /// Last byte, inclusive, if given.
        last: Option<u64>,
    },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// Why a `Range` header was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeError {
    /// Not `bytes=` or not a valid range set: the header is ignored (RFC 9110
    /// §14.2: a server MAY ignore a syntactically invalid Range).
    Invalid(String),
    /// More than [`MAX_RANGES`] ranges: the header is ignored.
    TooMany,
}

/// Parses a `Range` header value.
///
/// # Errors
/// [`RangeError`] when the value is not a valid `bytes` range set.
pub fn parse(value: &str) -> Result<Vec<Spec>, RangeError> {
    let value = value.trim();
    let Some(set) = value
        .get(..6)
        .filter(|u| u.eq_ignore_ascii_case("bytes="))
        .map(|_| &value[6..])
    else {
        return Err(RangeError::Invalid("unit is not bytes".into()));
    };
    let mut out = Vec::new();
    for part in set.split(',') {
        let part = part.trim_matches([' ', '\t']);
        if part.is_empty() {
            // Empty list elements are allowed (RFC 9110 §5.6.1).
            continue;
        }
        if out.len() == MAX_RANGES {
            return Err(RangeError::TooMany);
        }
        let Some((a, b)) = part.split_once('-') else {
            return Err(RangeError::Invalid(format!("{part:?} has no '-'")));
        };
        let num = |s: &str| -> Result<u64, RangeError> {
            if s.is_empty() || s.len() > 19 || !s.bytes().all(|c| c.is_ascii_digit()) {
                return Err(RangeError::Invalid(format!("{s:?} is not a byte position")));
            }
            s.parse::<u64>()
                .map_err(|_| RangeError::Invalid(format!("{s:?} is too large")))
        };
        if a.is_empty() {
            out.push(Spec::Suffix(num(b)?));
        } else {
            let first = num(a)?;
            let last = if b.is_empty() { None } else { Some(num(b)?) };
            if let Some(l) = last
                && l < first
            {
                return Err(RangeError::Invalid(format!("{part:?}: last is before first")));
            }
            out.push(Spec::From { first, last });
        }
    }
    if out.is_empty() {
        return Err(RangeError::Invalid("empty range set".into()));
    }
    Ok(out)
}

/// A satisfiable range of an object: `start..end` (end exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// Its length.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether it is empty (never, for a resolved range).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// `bytes first-last/length`.
    pub fn content_range(&self, length: u64) -> String {
        format!("bytes {}-{}/{length}", self.start, self.end - 1)
    }
}

/// Resolves specs against an object of `length` bytes. Unsatisfiable specs
/// are dropped; an empty result means 416.
///
/// Ranges that overlap or touch are coalesced (RFC 9110 §15.3.7.2), so the
/// ranges of one answer never cover a byte twice: however many ranges a
/// request names, the parts of a `multipart/byteranges` answer add up to at
/// most the object's length (the amplification of CVE-2011-3192, where
/// `bytes=0-,0-,…` multiplied the object, cannot happen). When nothing
/// overlaps the ranges are kept in the order asked (clients such as Delivery
/// Optimization ask for what they need, in their order); otherwise they come
/// back sorted.
pub fn resolve(specs: &[Spec], length: u64) -> Vec<ByteRange> {
    coalesce(resolve_each(specs, length))
}

/// Merges overlapping or adjacent ranges; see [`resolve`].
pub fn coalesce(mut ranges: Vec<ByteRange>) -> Vec<ByteRange> {
    if ranges.len() < 2 {
        return ranges;
    }
    let mut sorted = ranges.clone();
    sorted.sort_unstable_by_key(|r| (r.start, r.end));
    if sorted.windows(2).all(|w| w[0].end < w[1].start) {
        return ranges;
    }
    ranges.clear();
    for r in sorted {
        match ranges.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => ranges.push(r),
        }
    }
    ranges
}

fn resolve_each(specs: &[Spec], length: u64) -> Vec<ByteRange> {
    let mut out = Vec::with_capacity(specs.len());
    for s in specs {
        let r = match *s {
            Spec::From { first, last } => {
                if first >= length {
                    continue;
                }
                let end = last.map_or(length, |l| l.saturating_add(1).min(length));
                ByteRange { start: first, end }
            }
            Spec::Suffix(n) => {
                if n == 0 || length == 0 {
                    continue;
                }
                ByteRange {
                    start: length - n.min(length),
                    end: length,
                }
            }
        };
        out.push(r);
    }
    out
}

/// The first byte a spec needs when the length is not yet known, if it can be
/// told without the length (a suffix cannot).
pub fn known_start(specs: &[Spec]) -> Option<u64> {
    match specs {
        [Spec::From { first, .. }] => Some(*first),
        _ => None,
    }
}

/// What binds a cached object to one version at the origin.
///
/// Usually a strong validator: a strong `ETag` or `Last-Modified`, and the
/// length. Blocks of such an object can be fetched by separate range
/// requests and combined (RFC 9111 §3.4).
///
/// A response without one is still stored (§3 asks for a validator only to
/// combine partial responses). Its version is then the fill that fetched it
/// ([`Validator::fetch`], a number drawn for that fill): two fetches are
/// never taken for the same version, so its blocks all come from one
/// upstream response and are never combined with another's. An object the
/// content source calls immutable needs no validator at all: its name is
/// its version, and its blocks may come from separate fetches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Validator {
    /// Strong ETag, with quotes, if the origin sent one.
    pub etag: Option<String>,
    /// `Last-Modified`, as the origin wrote it.
    pub last_modified: Option<String>,
    /// Object length in bytes.
    pub length: u64,
    /// For a response stored without a strong validator (and not
    /// immutable): the fill that fetched it. Absent in records written
    /// before such responses were stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<u64>,
    /// A weak `ETag` the origin sent instead of a strong one: used to
    /// revalidate the complete response and for `If-None-Match` (weak
    /// comparison), never for `If-Range` or to combine parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weak_etag: Option<String>,
}

impl Validator {
    /// Builds a validator from response headers. `None` when there is no
    /// strong validator (no strong ETag and no Last-Modified).
    pub fn new(etag: Option<&str>, last_modified: Option<&str>, length: u64) -> Option<Validator> {
        let etag = etag.map(str::trim).filter(|e| is_strong_etag(e)).map(str::to_string);
        let last_modified = last_modified
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string);
        if etag.is_none() && last_modified.is_none() {
            return None;
        }
        Some(Validator {
            etag,
            last_modified,
            length,
            fetch: None,
            weak_etag: None,
        })
    }

    /// The version of a response of `length` bytes: its strong validator,
    /// or else, for an immutable object, its name (no validator), or else
    /// the fill `fetch` that fetched it. A weak `ETag` is kept.
    pub fn of_response(
        etag: Option<&str>,
        last_modified: Option<&str>,
        length: u64,
        immutable: bool,
        fetch: u64,
    ) -> Validator {
        if let Some(v) = Validator::new(etag, last_modified, length) {
            return v;
        }
        let weak_etag = etag
            .map(str::trim)
            .filter(|e| e.starts_with("W/") && is_strong_etag(&e[2..]))
            .map(str::to_string);
        Validator {
            etag: None,
            last_modified: None,
            length,
            fetch: (!immutable).then_some(fetch),
            weak_etag,
        }
    }

    /// Whether blocks of this version may be fetched by separate upstream
    /// requests and combined: under a strong validator, or an immutable
    /// name; not for a response stored without a validator.
    pub fn combinable(&self) -> bool {
        self.fetch.is_none()
    }

    /// Whether two responses are the same version: equal ETags when both have
    /// one, else equal Last-Modified; the length must match either way. A
    /// response without a strong validator is only the same version as
    /// itself (the same fill); an immutable one without any validator is
    /// the same as another without one.
    pub fn same_version(&self, other: &Validator) -> bool {
        if self.length != other.length || self.fetch != other.fetch {
            return false;
        }
        if self.fetch.is_some() {
            return true;
        }
        match (&self.etag, &other.etag) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.last_modified == other.last_modified,
            _ => false,
        }
    }

    /// Evaluates `If-Range` (RFC 9110 §13.1.5): true when the range applies.
    /// An entity tag matches only by strong comparison; a date only when it is
    /// exactly our Last-Modified.
    pub fn if_range_matches(&self, value: &str) -> bool {
        let value = value.trim();
        if value.starts_with('"') || value.starts_with("W/") {
            return is_strong_etag(value) && self.etag.as_deref() == Some(value);
        }
        self.last_modified.as_deref() == Some(value)
    }

    /// Evaluates `If-None-Match` (weak comparison): true when the client's
    /// copy is current (answer 304).
    pub fn none_match(&self, value: &str) -> bool {
        self.etag
            .as_ref()
            .or(self.weak_etag.as_ref())
            .is_some_and(|ours| weak_match(ours, value))
    }

    /// Evaluates `If-Modified-Since`: true when not modified since (answer
    /// 304). Compared as HTTP dates.
    pub fn not_modified_since(&self, value: &str) -> bool {
        let (Some(ours), Some(theirs)) = (
            self.last_modified.as_deref().and_then(parse_http_date),
            parse_http_date(value),
        ) else {
            return false;
        };
        ours <= theirs
    }
}

/// Whether the entity tag `ours` matches an `If-None-Match` value by weak
/// comparison (RFC 9110 §8.8.3.2), or the value is `*`.
pub fn weak_match(ours: &str, if_none_match: &str) -> bool {
    let ours = ours.trim().trim_start_matches("W/");
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == ours)
}

/// Whether `tag` is a strong entity tag: `"..."` with no `W/` prefix.
pub fn is_strong_etag(tag: &str) -> bool {
    tag.len() >= 2
        && tag.starts_with('"')
        && tag.ends_with('"')
        && tag[1..tag.len() - 1]
            .bytes()
            .all(|c| c == 0x21 || (0x23..=0x7e).contains(&c) || c >= 0x80)
}

/// Parses an HTTP-date to Unix seconds: an IMF-fixdate (`Sun, 06 Nov 1994
/// 08:49:37 GMT`), or one of the obsolete formats a recipient must accept
/// (RFC 9110 §5.6.7; [`crate::rfc9111::age::parse_obsolete_date`]).
pub fn parse_http_date(s: &str) -> Option<i64> {
    imf_fixdate(s).or_else(|| {
        let this_year = holdfast_model::civil_from_days(crate::now_secs() as i64 / 86_400).0;
        crate::rfc9111::age::parse_obsolete_date(s, this_year)
    })
}

fn imf_fixdate(s: &str) -> Option<i64> {
    let s = s.trim();
    let (_, rest) = s.split_once(", ")?;
    let mut it = rest.split(' ');
    // IMF-fixdate: `day` and the time fields are 2DIGIT, `year` is 4DIGIT.
    let digits = |s: &str, n: usize| -> Option<i64> {
        (s.len() == n && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse().ok())?
    };
    let day = digits(it.next()?, 2)?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year = digits(it.next()?, 4)?;
    let mut hms = it.next()?.split(':');
    let h = digits(hms.next()?, 2)?;
    let m = digits(hms.next()?, 2)?;
    let sec = digits(hms.next()?, 2)?;
    if hms.next().is_some()
        || it.next()? != "GMT"
        || it.next().is_some()
        || !(1..=31).contains(&day)
        || h > 23
        || m > 59
        || sec > 60
    {
        return None;
    }
    Some(holdfast_model::days_from_civil(year, month, day as u32) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Formats Unix seconds as an IMF-fixdate.
pub fn format_http_date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, mo, d) = holdfast_model::civil_from_days(days);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(mo - 1) as usize];
    format!(
        "{wd}, {d:02} {mon} {y:04} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses an upstream `Content-Range: bytes a-b/len` into `(a, b, len)`;
/// `len` is `None` for `*`.
pub fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, len) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    let b: u64 = b.trim().parse().ok()?;
    let len = if len.trim() == "*" {
        None
    } else {
        Some(len.trim().parse().ok()?)
    };
    if b < a || len.is_some_and(|l| b >= l) {
        return None;
    }
    Some((a, b, len))
}

/// Parses `Content-Range: bytes */len` of a 416.
pub fn parse_unsatisfied(value: &str) -> Option<u64> {
    value.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    #[test]
    fn every_range_form() {
        let len = 1000;
        let cases: &[(&str, Vec<ByteRange>)] = &[
            ("bytes=0-499", vec![r(0, 500)]),
            ("bytes=500-", vec![r(500, 1000)]),
            ("bytes=-200", vec![r(800, 1000)]),
            ("bytes=-5000", vec![r(0, 1000)]),
            ("bytes=900-5000", vec![r(900, 1000)]),
            ("bytes=0-0,-1", vec![r(0, 1), r(999, 1000)]),
            ("BYTES = 1-2", vec![]),
            ("bytes=1-2, 4-5 ,", vec![r(1, 3), r(4, 6)]),
            ("bytes=1000-", vec![]),
            ("bytes=-0", vec![]),
            ("bytes=2000-3000,0-1", vec![r(0, 2)]),
            // Kept in the order asked when nothing overlaps.
            ("bytes=500-599,0-99", vec![r(500, 600), r(0, 100)]),
            // Overlapping or adjacent ranges are merged (and sorted).
            ("bytes=0-,0-,0-", vec![r(0, 1000)]),
            ("bytes=500-599,0-99,100-199", vec![r(0, 200), r(500, 600)]),
            ("bytes=10-20,15-30,-1", vec![r(10, 31), r(999, 1000)]),
            ("bytes=0-0,1-1,2-2", vec![r(0, 3)]),
        ];
        for (h, want) in cases {
            match parse(h) {
                Ok(specs) => assert_eq!(&resolve(&specs, len), want, "{h}"),
                Err(_) => assert!(want.is_empty(), "{h} should parse"),
            }
        }
        assert_eq!(r(0, 500).content_range(1000), "bytes 0-499/1000");
    }

    #[test]
    fn bad_headers_are_refused() {
        for h in [
            "",
            "bytes=",
            "bytes=a-b",
            "bytes=5-1",
            "items=0-1",
            "bytes=--1",
            "bytes=1",
            "bytes=99999999999999999999-",
            "bytes=+1-2",
        ] {
            assert!(matches!(parse(h), Err(RangeError::Invalid(_))), "{h}");
        }
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(parse(&many), Err(RangeError::TooMany));
    }

    #[test]
    fn validators_and_conditionals() {
        let v = Validator::new(Some("\"abc\""), Some("Sun, 06 Nov 1994 08:49:37 GMT"), 10).unwrap();
        assert!(Validator::new(Some("W/\"abc\""), None, 10).is_none());
        assert!(v.if_range_matches("\"abc\""));
        assert!(!v.if_range_matches("W/\"abc\""));
        assert!(!v.if_range_matches("\"abd\""));
        assert!(v.if_range_matches("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert!(v.none_match("W/\"abc\", \"x\""));
        assert!(v.none_match("*"));
        assert!(!v.none_match("\"x\""));
        assert!(v.not_modified_since("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert!(v.not_modified_since("Mon, 07 Nov 1994 08:49:37 GMT"));
        assert!(!v.not_modified_since("Sat, 05 Nov 1994 08:49:37 GMT"));
        let lm_only = Validator::new(None, Some("Sun, 06 Nov 1994 08:49:37 GMT"), 10).unwrap();
        assert!(lm_only.same_version(&lm_only.clone()));
        assert!(!lm_only.same_version(&Validator {
            length: 11,
            ..lm_only.clone()
        }));
        assert!(!v.same_version(&lm_only));
    }

    #[test]
    fn responses_without_a_strong_validator_are_their_own_version() {
        let a = Validator::of_response(None, None, 10, false, 1);
        let b = Validator::of_response(None, None, 10, false, 2);
        assert!(!a.combinable());
        assert!(a.same_version(&a.clone()));
        assert!(!a.same_version(&b), "two fetches are two versions");
        let weak = Validator::of_response(Some("W/\"w1\""), None, 10, false, 3);
        assert_eq!(weak.weak_etag.as_deref(), Some("W/\"w1\""));
        assert!(weak.none_match("\"w1\""), "If-None-Match compares weakly");
        assert!(!weak.if_range_matches("W/\"w1\""), "If-Range never matches a weak tag");
        // Immutable: the name is the version; blocks may be combined.
        let i1 = Validator::of_response(None, None, 10, true, 4);
        let i2 = Validator::of_response(None, None, 10, true, 5);
        assert!(i1.combinable() && i1.same_version(&i2));
        assert!(!i1.same_version(&Validator::of_response(None, None, 11, true, 6)));
        // A strong validator wins over the fetch.
        let s = Validator::of_response(Some("\"s\""), None, 10, false, 7);
        assert!(s.combinable() && s.same_version(&Validator::new(Some("\"s\""), None, 10).unwrap()));
        // Records written before these fields existed read as before.
        let old: Validator = serde_json::from_str(r#"{"etag":"\"e\"","last_modified":null,"length":3}"#).unwrap();
        assert!(old.combinable() && old.weak_etag.is_none());
    }

    #[test]
    fn http_dates_round_trip() {
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(format_http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        // RFC 9110 §5.6.7: the obsolete formats are accepted too.
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(784_111_777));
        // Found by the fuzzer: a year of 30 digits overflowed the day count.
        assert_eq!(
            parse_http_date("x, 06 Oct 000000000000000000000097000000000097 08:49:37 GMT"),
            None
        );
        assert_eq!(parse_http_date("Sun, 6 Nov 1994 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 -8:49:37 GMT"), None);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 9, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes 5-10/10"), None);
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_unsatisfied("bytes */77"), Some(77));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn any_header_parses_or_is_refused(h in "\\PC{0,40}") {
            let _ = parse(&h);
            let _ = parse_content_range(&h);
            let _ = parse_http_date(&h);
        }

        #[test]
        fn resolved_ranges_lie_inside_the_object(
            specs in proptest::collection::vec((0u64..3000, proptest::option::of(0u64..3000), any::<bool>()), 1..64),
            len in 0u64..2000,
        ) {
            let specs: Vec<Spec> = specs
                .into_iter()
                .map(|(a, b, suffix)| if suffix { Spec::Suffix(a) } else { Spec::From { first: a, last: b.map(|b| b.max(a)) } })
                .collect();
            let resolved = resolve(&specs, len);
            let mut total = 0u64;
            for r in &resolved {
                prop_assert!(r.start < r.end && r.end <= len);
                total += r.len();
            }
            // No byte is answered twice, so a multipart answer never outgrows the object.
            prop_assert!(total <= len);
            let mut sorted = resolved.clone();
            sorted.sort_by_key(|r| r.start);
            prop_assert!(sorted.windows(2).all(|w| w[0].end < w[1].start));
            // Every byte any spec asked for is still covered.
            for r in resolve_each(&specs, len) {
                for b in [r.start, r.end - 1] {
                    prop_assert!(resolved.iter().any(|c| c.start <= b && b < c.end));
                }
            }
        }

        #[test]
        fn dates_round_trip(secs in 0i64..8_000_000_000) {
            prop_assert_eq!(parse_http_date(&format_http_date(secs)), Some(secs));
        }
    }
}
