//! HTTP caching rules (RFC 9111) as pure functions: `Cache-Control` parsing,
//! which responses a shared cache may store, freshness lifetime and age,
//! request directives, which header fields are hop-by-hop, and how a 304
//! updates a stored response. No I/O and no clock: times are inputs.

use hyper::header::{self, HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};

use super::range::parse_http_date;

pub mod age;

/// Parsed `Cache-Control` directives (names lowercase; a repeated directive
/// keeps its first value).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives(Vec<(String, Option<String>)>);

impl Directives {
    /// Parses every `Cache-Control` field of `h` (RFC 9111 §5.2: a
    /// comma-separated list of `token [= (token / quoted-string)]`).
    pub fn of(h: &HeaderMap) -> Directives {
        let mut out = Directives::default();
        for v in h.get_all(header::CACHE_CONTROL) {
            if let Ok(v) = v.to_str() {
                out.parse_into(v);
            }
        }
        out
    }

    /// Parses one field value.
    pub fn parse(value: &str) -> Directives {
        let mut out = Directives::default();
        out.parse_into(value);
        out
    }

    fn parse_into(&mut self, value: &str) {
        let b = value.as_bytes();
        let mut i = 0;
        while i < b.len() {
            // Skip separators and whitespace.
            while i < b.len() && (b[i] == b',' || b[i] == b' ' || b[i] == b'\t') {
                i += 1;
            }
            let start = i;
            while i < b.len() && b[i] != b'=' && b[i] != b',' {
                i += 1;
            }
            let name = value[start..i].trim().to_ascii_lowercase();
            let mut arg = None;
            if i < b.len() && b[i] == b'=' {
                i += 1;
                if i < b.len() && b[i] == b'"' {
                    // quoted-string with backslash escapes
                    i += 1;
                    let mut s = String::new();
                    while i < b.len() && b[i] != b'"' {
                        if b[i] == b'\\' && i + 1 < b.len() {
                            i += 1;
                        }
                        let ch_len = utf8_len(b[i]);
                        s.push_str(value.get(i..i + ch_len).unwrap_or(""));
                        i += ch_len;
                    }
                    i += 1; // closing quote
                    while i < b.len() && b[i] != b',' {
                        i += 1;
                    }
                    arg = Some(s);
                } else {
                    let s = i;
                    while i < b.len() && b[i] != b',' {
                        i += 1;
                    }
                    arg = Some(value[s..i].trim().to_string());
                }
            }
            if !name.is_empty() && !self.0.iter().any(|(n, _)| *n == name) {
                self.0.push((name, arg));
            }
        }
    }

    /// Whether the directive is present.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    /// A delta-seconds argument (§1.2.2): `Some(Ok(n))`, `Some(Err(()))` when
    /// present but invalid, `None` when absent. Values too large saturate.
    pub fn seconds(&self, name: &str) -> Option<Result<u64, ()>> {
        let (_, arg) = self.0.iter().find(|(n, _)| n == name)?;
        let Some(a) = arg.as_deref() else {
            return Some(Err(()));
        };
        if a.is_empty() || !a.bytes().all(|c| c.is_ascii_digit()) {
            return Some(Err(()));
        }
        Some(Ok(a.parse::<u64>().unwrap_or(u64::MAX)))
    }

    /// Whether the directive is present without an argument (`no-cache`,
    /// not `no-cache="set-cookie"`).
    pub fn unqualified(&self, name: &str) -> bool {
        self.0.iter().any(|(n, a)| n == name && a.is_none())
    }

    /// The field names a qualified directive lists (`private="a, b"`),
    /// lowercase; empty when absent or unqualified.
    pub fn fields(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, a)| a.as_deref())
            .map(|a| {
                a.split(',')
                    .map(|f| f.trim().to_ascii_lowercase())
                    .filter(|f| !f.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A delta-seconds argument that is valid, `None` otherwise.
    pub fn valid_seconds(&self, name: &str) -> Option<u64> {
        self.seconds(name).and_then(Result::ok)
    }

    /// Whether there is no directive at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// What a request asks of the cache (RFC 9111 §5.2.1).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestRules {
    /// `no-cache` (or `Pragma: no-cache` without `Cache-Control`): validate
    /// before using a stored response.
    pub no_cache: bool,
    /// `no-store`: store nothing of this exchange.
    pub no_store: bool,
    /// `max-age`: accept no response older than this.
    pub max_age: Option<u64>,
    /// `max-stale`: accept a stale response up to this much past its
    /// lifetime (`u64::MAX` without an argument).
    pub max_stale: Option<u64>,
    /// `min-fresh`: the response must stay fresh at least this long.
    pub min_fresh: Option<u64>,
    /// `only-if-cached`: answer from storage or with 504.
    pub only_if_cached: bool,
    /// `stale-if-error` (RFC 5861 §4): a stale response this much past its
    /// lifetime is acceptable when the origin fails.
    pub stale_if_error: Option<u64>,
}

impl RequestRules {
    /// The rules of a request's header fields.
    pub fn of(h: &HeaderMap) -> RequestRules {
        let d = Directives::of(h);
        let pragma_no_cache = d.is_empty()
            && h.get_all(header::PRAGMA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("no-cache")));
        RequestRules {
            no_cache: d.has("no-cache") || pragma_no_cache,
            no_store: d.has("no-store"),
            // An invalid max-age asks for a fresh response: treat as 0.
            max_age: d.seconds("max-age").map(|r| r.unwrap_or(0)),
            max_stale: d.seconds("max-stale").map(|r| r.unwrap_or(u64::MAX)),
            min_fresh: d.seconds("min-fresh").map(|r| r.unwrap_or(0)),
            only_if_cached: d.has("only-if-cached"),
            stale_if_error: d.valid_seconds("stale-if-error"),
        }
    }
}

/// The statuses RFC 9110 §15.1 calls heuristically cacheable: stored
/// without explicit freshness.
pub const HEURISTICALLY_CACHEABLE: [u16; 12] = [200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];

/// Whether the cache knows what a final status means well enough to store
/// it (`must-understand`, §5.2.2.3): the final statuses RFC 9110 defines,
/// 304 (a validation answer) excepted.
pub fn understood(status: u16) -> bool {
    matches!(status, 200..=206 | 300..=303 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 500..=505)
}

/// Why a response may not be stored, or `None` when it may (RFC 9111 §3 for
/// a shared cache). `authorized`: the request carried `Authorization`.
/// `response` holds the fields that rule (see [`targeted`]).
///
/// Every final status may be stored when the response gives explicit
/// freshness (`max-age`, `s-maxage`, `Expires`) or says `public`; without,
/// only the [`HEURISTICALLY_CACHEABLE`] ones. `private` and `no-cache` with
/// field names store the response without those fields ([`stored_fields`]).
pub fn not_storable(status: u16, response: &HeaderMap, request: &RequestRules, authorized: bool) -> Option<String> {
    let d = Directives::of(response);
    if request.no_store {
        return Some("the request said no-store".into());
    }
    if !(200..600).contains(&status) || status == 304 {
        return Some(format!("status {status} is not stored"));
    }
    // §5.2.2.3: with must-understand, a cache that understands the status
    // ignores no-store; one that does not must not store.
    let must_understand = d.has("must-understand");
    if must_understand && !understood(status) {
        return Some(format!("must-understand, and status {status} is not understood here"));
    }
    if d.has("no-store") && !must_understand {
        return Some("the response said no-store".into());
    }
    if d.unqualified("private") {
        return Some("the response is private".into());
    }
    if authorized && !(d.has("public") || d.has("s-maxage") || d.has("must-revalidate")) {
        return Some("the request carried Authorization and the response is not marked public".into());
    }
    // A cookie is one client's: stored only when the origin says the
    // response is for everyone (the choice of nginx and Varnish; RFC 9111
    // allows storing it), or withholds the cookie from what is stored.
    let withheld = withheld_fields(response);
    if response.contains_key(header::SET_COOKIE)
        && !(d.has("public") || d.has("s-maxage"))
        && !withheld.iter().any(|f| f == "set-cookie")
    {
        return Some("the response sets a cookie".into());
    }
    let explicit = d.has("max-age") || d.has("s-maxage") || d.has("public") || response.contains_key(header::EXPIRES);
    if !explicit && !HEURISTICALLY_CACHEABLE.contains(&status) {
        return Some(format!(
            "status {status} is not heuristically cacheable and the response gives no explicit freshness"
        ));
    }
    if response
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim() == "*"))
    {
        return Some("the response has Vary: *".into());
    }
    None
}

/// The fields a shared cache must not store or reuse without validation:
/// those named by `private="…"` (§5.2.2.7) and `no-cache="…"` (§5.2.2.4),
/// lowercase. The rest of the response is stored.
pub fn withheld_fields(response: &HeaderMap) -> Vec<String> {
    let d = Directives::of(response);
    let mut out = d.fields("private");
    out.extend(d.fields("no-cache"));
    out
}

/// The fields whose caching directives rule for this cache (RFC 9213): when
/// the response carries one of the `targeted` fields (in order of the list)
/// with a valid, non-empty value, that value replaces `Cache-Control` and
/// `Expires` is ignored; otherwise the response as it is.
pub fn targeted<'a>(response: &'a HeaderMap, targeted: &[HeaderName]) -> std::borrow::Cow<'a, HeaderMap> {
    for name in targeted {
        let value = response
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        if value.trim().is_empty() || Directives::parse(&value).is_empty() {
            continue;
        }
        let mut h = response.clone();
        h.remove(header::EXPIRES);
        h.remove(header::CACHE_CONTROL);
        if let Ok(v) = hyper::header::HeaderValue::from_str(&value) {
            h.insert(header::CACHE_CONTROL, v);
        }
        return std::borrow::Cow::Owned(h);
    }
    std::borrow::Cow::Borrowed(response)
}

/// A stored response's freshness information (RFC 9111 §4.2), fixed when it
/// was received or last validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freshness {
    /// When it was received (or last validated), Unix seconds.
    pub response_time: u64,
    /// Its corrected initial age then, seconds (§4.2.3).
    pub initial_age: u64,
    /// Its freshness lifetime, seconds.
    pub lifetime: u64,
    /// `no-cache`: every use needs a successful validation.
    pub no_cache: bool,
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`: never served
    /// stale, not even when the origin cannot be reached.
    pub must_revalidate: bool,
    /// Where the lifetime came from: `explicit`, `heuristic`, `operator`
    /// (the source's TTL) or `immutable`.
    pub basis: Basis,
    /// `stale-while-revalidate` (RFC 5861 §3): seconds past its lifetime
    /// during which it is served while validated in the background.
    #[serde(default)]
    pub stale_while_revalidate: u64,
    /// `stale-if-error` (RFC 5861 §4): seconds past its lifetime during
    /// which it is served when the origin answers with an error.
    #[serde(default)]
    pub stale_if_error: u64,
}

/// Where a freshness lifetime came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Basis {
    /// `s-maxage`, `max-age` or `Expires`.
    Explicit,
    /// 10 % of the time since Last-Modified (§4.2.2).
    Heuristic,
    /// The source's TTL, used when the origin gave no lifetime and no
    /// Last-Modified, or as a cap.
    Operator,
    /// The source's class says the content never changes.
    Immutable,
}

/// How a source's plan bounds freshness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operator {
    /// Never revalidate (the class `immutable`).
    pub immutable: bool,
    /// The source's TTL: an upper bound on any lifetime, and the lifetime
    /// when the origin gives none (0: no bound, no default).
    pub ttl: u64,
}

impl Freshness {
    /// Computes the freshness of a response received at `response_time`
    /// for a request sent at `request_time` (Unix seconds).
    pub fn compute(response: &HeaderMap, request_time: u64, response_time: u64, op: Operator) -> Freshness {
        let d = Directives::of(response);
        // §5.1: an invalid Age is ignored; RFC 9110 §6.6.1: a response
        // without a valid Date was generated when it was received.
        let date = age::date_value(response);
        let age_value = age::age_value(response).unwrap_or(0);
        // §4.2.3
        let apparent_age = date.map_or(0, |d| response_time.saturating_sub(d));
        let response_delay = response_time.saturating_sub(request_time);
        let corrected_age_value = age_value.saturating_add(response_delay);
        let initial_age = apparent_age.max(corrected_age_value);
        let must_revalidate = d.has("must-revalidate") || d.has("proxy-revalidate") || d.has("s-maxage");
        // `no-cache="field"` withholds the field instead (§5.2.2.4).
        let no_cache = d.unqualified("no-cache");
        if op.immutable {
            return Freshness {
                response_time,
                initial_age,
                lifetime: u64::MAX,
                no_cache: false,
                must_revalidate,
                basis: Basis::Immutable,
                stale_while_revalidate: 0,
                stale_if_error: 0,
            };
        }
        // §4.2.1: s-maxage, then max-age, then Expires - Date. An invalid
        // value makes the response stale (lifetime 0).
        let explicit = match (d.seconds("s-maxage"), d.seconds("max-age")) {
            (Some(v), _) | (None, Some(v)) => Some(v.unwrap_or(0)),
            (None, None) => match response.get(header::EXPIRES) {
                Some(e) => {
                    let exp = e.to_str().ok().and_then(parse_http_date).map(|s| s.max(0) as u64);
                    let base = date.unwrap_or(response_time);
                    Some(exp.map_or(0, |x| x.saturating_sub(base)))
                }
                None => None,
            },
        };
        let cap = |v: u64| if op.ttl > 0 { v.min(op.ttl) } else { v };
        let (lifetime, basis) = match explicit {
            Some(v) => (
                cap(v),
                if op.ttl > 0 && v > op.ttl {
                    Basis::Operator
                } else {
                    Basis::Explicit
                },
            ),
            None => match header_date(response, &header::LAST_MODIFIED) {
                // §4.2.2: a fraction of the time since it last changed.
                Some(lm) => {
                    let h = date.unwrap_or(response_time).saturating_sub(lm) / 10;
                    (
                        cap(h),
                        if op.ttl > 0 && h > op.ttl {
                            Basis::Operator
                        } else {
                            Basis::Heuristic
                        },
                    )
                }
                None => (op.ttl, Basis::Operator),
            },
        };
        Freshness {
            response_time,
            initial_age,
            lifetime,
            no_cache,
            must_revalidate,
            basis,
            stale_while_revalidate: d.valid_seconds("stale-while-revalidate").unwrap_or(0),
            stale_if_error: d.valid_seconds("stale-if-error").unwrap_or(0),
        }
    }

    /// The freshness of a record written before freshness was kept: its TTL
    /// from when it was fetched, as it was computed then.
    pub fn legacy(fetched_at: u64, ttl: u32, immutable: bool) -> Freshness {
        Freshness {
            response_time: fetched_at,
            initial_age: 0,
            lifetime: if immutable { u64::MAX } else { u64::from(ttl) },
            no_cache: false,
            must_revalidate: false,
            basis: if immutable { Basis::Immutable } else { Basis::Operator },
            stale_while_revalidate: 0,
            stale_if_error: 0,
        }
    }

    /// The age at `now` (§4.2.3 `current_age`).
    pub fn age(&self, now: u64) -> u64 {
        self.initial_age.saturating_add(now.saturating_sub(self.response_time))
    }

    /// Whether a stored response may be used for a request with `req`
    /// without contacting the origin (§4.2, §5.2.1).
    pub fn usable(&self, now: u64, req: &RequestRules) -> bool {
        if self.basis == Basis::Immutable {
            return true;
        }
        if self.no_cache || req.no_cache {
            return false;
        }
        let age = self.age(now);
        if req.max_age.is_some_and(|m| age > m) {
            return false;
        }
        let needed = age.saturating_add(req.min_fresh.unwrap_or(0));
        if needed < self.lifetime {
            return true;
        }
        // Stale: only when the client accepts it and the response allows.
        match req.max_stale {
            Some(s) if !self.must_revalidate => age.saturating_sub(self.lifetime) <= s,
            _ => false,
        }
    }

    /// Whether a stale response may be served when the origin cannot be
    /// reached (§4.2.4): not when the response or the request forbids it.
    pub fn may_serve_stale(&self, req: &RequestRules) -> bool {
        !(self.no_cache || self.must_revalidate || req.no_cache)
    }

    /// How long past its lifetime it is at `now` (0 while fresh).
    pub fn staleness(&self, now: u64) -> u64 {
        self.age(now).saturating_sub(self.lifetime)
    }

    /// Whether a stale response may be served at once while it is validated
    /// in the background (`stale-while-revalidate`, RFC 5861 §3): within its
    /// window, and not when either side requires validation first.
    pub fn serve_while_revalidating(&self, now: u64, req: &RequestRules) -> bool {
        self.stale_while_revalidate > 0
            && self.may_serve_stale(req)
            && req.max_age.is_none()
            && self.staleness(now) <= self.stale_while_revalidate
    }

    /// Whether a stale response may be served because the origin answered
    /// with an error (`stale-if-error` of the response or the request, RFC
    /// 5861 §4; the request's wins).
    pub fn serve_on_error(&self, now: u64, req: &RequestRules) -> bool {
        let window = req.stale_if_error.unwrap_or(self.stale_if_error);
        window > 0 && !(self.no_cache || self.must_revalidate) && self.staleness(now) <= window
    }

    /// Seconds of freshness left at `now`, negative once stale (RFC 9211
    /// `ttl`).
    pub fn ttl(&self, now: u64) -> i64 {
        if self.basis == Basis::Immutable {
            return i64::MAX;
        }
        let age = i64::try_from(self.age(now)).unwrap_or(i64::MAX);
        i64::try_from(self.lifetime).unwrap_or(i64::MAX).saturating_sub(age)
    }
}

fn header_date(h: &HeaderMap, name: &HeaderName) -> Option<u64> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date)
        .map(|s| s.max(0) as u64)
}

/// Whether a field is hop-by-hop (RFC 9110 §7.6.1) or one the cache sets
/// itself on a forwarded message: never forwarded, never stored.
pub fn hop_by_hop(name: &HeaderName, connection: &HeaderMap) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    ) || connection
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(name.as_str())))
}

/// The end-to-end fields of a message: hop-by-hop ones and those named by
/// its `Connection` removed.
pub fn end_to_end(h: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &hyper::header::HeaderValue)> {
    h.iter().filter(move |(k, _)| !hop_by_hop(k, h))
}

/// The fields of an answer relayed as it came, stored or not: every
/// end-to-end field, hop-by-hop ones removed (RFC 9110 §7.6.1), and
/// `Content-Length`, which the relayed body's framing sets.
pub fn relayed_fields(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(h.len());
    for (k, v) in end_to_end(h) {
        if k != header::CONTENT_LENGTH {
            out.append(k.clone(), v.clone());
        }
    }
    out
}

/// Response fields the cache writes itself when it answers from storage
/// (framing, validators, range, its own status), not taken from storage.
pub fn generated_response_field(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "content-length"
            | "content-range"
            | "content-type"
            | "etag"
            | "last-modified"
            | "accept-ranges"
            | "age"
            | "cache-status"
    )
}

/// The stored fields of a response: its end-to-end fields that are not
/// generated, as text (values that are not visible ASCII are dropped).
pub fn stored_fields(h: &HeaderMap) -> Vec<(String, String)> {
    let withheld = withheld_fields(h);
    end_to_end(h)
        .filter(|(k, _)| !generated_response_field(k))
        .filter(|(k, _)| !withheld.iter().any(|w| w == k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// Applies a 304 (or a HEAD's 200) to stored fields (§4.3.4): every field
/// the new response carries replaces the stored ones of that name.
pub fn update_fields(stored: &[(String, String)], fresh: &HeaderMap) -> Vec<(String, String)> {
    let new = stored_fields(fresh);
    let mut out: Vec<(String, String)> = stored
        .iter()
        .filter(|(k, _)| !new.iter().any(|(n, _)| n == k))
        .cloned()
        .collect();
    out.extend(new);
    out
}

/// The request fields a stored response was selected by (RFC 9111 §4.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vary {
    /// The field names of its `Vary`, lowercase, sorted.
    pub names: Vec<String>,
    /// Their values in the request it answered.
    pub values: Vec<Option<String>>,
}

/// The field names a response varies on, lowercase and sorted (`None`
/// without `Vary`).
pub fn vary_names(h: &HeaderMap) -> Option<Vec<String>> {
    let mut names: Vec<String> = h
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    names.sort();
    names.dedup();
    (!names.is_empty()).then_some(names)
}

/// The values of `names` in a request, each normalised (fields of one name
/// joined with ", ", whitespace around commas removed), `None` where absent
/// (§4.1).
pub fn selecting_values(names: &[String], request: &HeaderMap) -> Vec<Option<String>> {
    names
        .iter()
        .map(|n| {
            let vals: Vec<String> = request
                .get_all(n.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|t| t.trim().to_string())
                .collect();
            (!vals.is_empty()).then(|| vals.join(", "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn map(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const OP: Operator = Operator {
        immutable: false,
        ttl: 0,
    };

    #[test]
    fn directives_parse_tokens_quoted_strings_and_repeats() {
        let d = Directives::parse(r#"max-age=60, no-cache="Set-Cookie, X", Private ,s-maxage="30""#);
        assert_eq!(d.seconds("max-age"), Some(Ok(60)));
        assert!(d.has("no-cache") && d.has("private"));
        // §5.2: recipients accept the quoted form of a token argument.
        assert_eq!(d.seconds("s-maxage"), Some(Ok(30)));
        assert_eq!(Directives::parse("max-age=ab").seconds("max-age"), Some(Err(())));
        assert_eq!(
            Directives::parse("max-age=5, max-age=9").seconds("max-age"),
            Some(Ok(5))
        );
        assert_eq!(
            Directives::parse("max-age=99999999999999999999999").seconds("max-age"),
            Some(Ok(u64::MAX))
        );
        let h = map(&[("cache-control", "public"), ("cache-control", "max-age=3")]);
        assert!(Directives::of(&h).has("public"));
        assert_eq!(Directives::of(&h).seconds("max-age"), Some(Ok(3)));
    }

    #[test]
    fn lifetime_prefers_s_maxage_then_max_age_then_expires() {
        let f = |fields: &[(&str, &str)]| Freshness::compute(&map(fields), 1000, 1000, OP).lifetime;
        assert_eq!(f(&[("cache-control", "max-age=60, s-maxage=10")]), 10);
        assert_eq!(f(&[("cache-control", "max-age=60")]), 60);
        let date = super::super::range::format_http_date(1000);
        let exp = super::super::range::format_http_date(1300);
        assert_eq!(f(&[("date", &date), ("expires", &exp)]), 300);
        assert_eq!(
            f(&[("date", &date), ("expires", "0")]),
            0,
            "an invalid Expires is in the past"
        );
        assert_eq!(f(&[("cache-control", "max-age=x")]), 0);
        let lm = super::super::range::format_http_date(0);
        let h = Freshness::compute(&map(&[("date", &date), ("last-modified", &lm)]), 1000, 1000, OP);
        assert_eq!((h.lifetime, h.basis), (100, Basis::Heuristic));
        assert_eq!(f(&[]), 0, "no information, no TTL: stale at once");
    }

    #[test]
    fn the_operator_ttl_caps_and_defaults_and_immutable_overrides() {
        let op = Operator {
            immutable: false,
            ttl: 30,
        };
        let f = |fields: &[(&str, &str)]| Freshness::compute(&map(fields), 0, 0, op);
        assert_eq!(f(&[("cache-control", "max-age=600")]).lifetime, 30);
        assert_eq!(f(&[("cache-control", "max-age=6")]).lifetime, 6);
        assert_eq!(f(&[]).lifetime, 30);
        let imm = Freshness::compute(
            &map(&[("cache-control", "max-age=0")]),
            0,
            0,
            Operator {
                immutable: true,
                ttl: 0,
            },
        );
        assert!(imm.usable(1 << 40, &RequestRules::of(&map(&[("cache-control", "no-cache")]))));
    }

    #[test]
    fn age_counts_date_age_header_and_delay() {
        let date = super::super::range::format_http_date(900);
        let f = Freshness::compute(
            &map(&[("date", &date), ("age", "30"), ("cache-control", "max-age=200")]),
            995,
            1000,
            OP,
        );
        // apparent 100, corrected age 30 + 5: the larger.
        assert_eq!(f.initial_age, 100);
        assert_eq!(f.age(1050), 150);
        assert!(f.usable(1050, &RequestRules::default()));
        assert!(!f.usable(1100, &RequestRules::default()));
    }

    #[test]
    fn request_directives() {
        let f = Freshness::compute(&map(&[("cache-control", "max-age=100")]), 0, 0, OP);
        let r = |v: &str| RequestRules::of(&map(&[("cache-control", v)]));
        assert!(f.usable(50, &RequestRules::default()));
        assert!(!f.usable(50, &r("no-cache")));
        assert!(!f.usable(50, &r("max-age=10")));
        assert!(f.usable(50, &r("max-age=60")));
        assert!(!f.usable(50, &r("min-fresh=60")));
        assert!(f.usable(150, &r("max-stale=60")));
        assert!(f.usable(150, &r("max-stale")));
        assert!(!f.usable(200, &r("max-stale=60")));
        assert!(RequestRules::of(&map(&[("pragma", "no-cache")])).no_cache);
        assert!(!RequestRules::of(&map(&[("pragma", "no-cache"), ("cache-control", "max-age=5")])).no_cache);
        assert!(r("only-if-cached").only_if_cached);
        let strict = Freshness::compute(&map(&[("cache-control", "max-age=100, must-revalidate")]), 0, 0, OP);
        assert!(!strict.usable(150, &r("max-stale")));
        assert!(!strict.may_serve_stale(&RequestRules::default()));
        assert!(f.may_serve_stale(&RequestRules::default()));
        let nc = Freshness::compute(&map(&[("cache-control", "no-cache, max-age=100")]), 0, 0, OP);
        assert!(!nc.usable(1, &RequestRules::default()));
    }

    #[test]
    fn what_a_shared_cache_may_store() {
        let none = RequestRules::default();
        let ok = |fields: &[(&str, &str)], status, auth| not_storable(status, &map(fields), &none, auth).is_none();
        assert!(ok(&[], 200, false));
        assert!(ok(&[], 206, false));
        assert!(!ok(&[("cache-control", "no-store")], 200, false));
        assert!(!ok(&[("cache-control", "private")], 200, false));
        assert!(!ok(&[], 200, true));
        assert!(ok(&[("cache-control", "public")], 200, true));
        assert!(ok(&[("cache-control", "s-maxage=5")], 200, true));
        // Explicit freshness stores any final status; without it only the
        // heuristically cacheable ones (RFC 9110 §15.1).
        assert!(ok(&[("cache-control", "max-age=60")], 302, false));
        assert!(ok(&[("expires", "Sun, 06 Nov 2094 08:49:37 GMT")], 500, false));
        assert!(ok(&[("cache-control", "public")], 403, false));
        for s in HEURISTICALLY_CACHEABLE {
            assert!(ok(&[], s, false), "{s}");
        }
        for s in [201, 202, 302, 303, 307, 403, 500, 502, 503] {
            assert!(!ok(&[], s, false), "{s}");
        }
        assert!(!ok(&[("cache-control", "max-age=60")], 304, false));
        assert!(!ok(&[("cache-control", "max-age=60")], 103, false));
        // must-understand: a known status ignores no-store; an unknown one
        // is never stored.
        assert!(ok(
            &[("cache-control", "must-understand, no-store, max-age=60")],
            200,
            false
        ));
        assert!(!ok(
            &[("cache-control", "must-understand, no-store, max-age=60")],
            299,
            false
        ));
        assert!(!ok(&[("cache-control", "must-understand, max-age=60")], 299, false));
        // Qualified private / no-cache withhold fields, not the response.
        assert!(ok(&[("cache-control", "private=\"x-user\"")], 200, false));
        assert!(ok(
            &[
                ("set-cookie", "id=1"),
                ("cache-control", "no-cache=\"set-cookie\", max-age=60")
            ],
            200,
            false
        ));
        let h = map(&[
            ("cache-control", "private=\"X-User, x-other\", no-cache=\"x-fresh\""),
            ("x-user", "alice"),
            ("x-other", "1"),
            ("x-fresh", "2"),
            ("x-kept", "3"),
        ]);
        let kept: Vec<String> = stored_fields(&h).into_iter().map(|(k, _)| k).collect();
        assert_eq!(kept, ["cache-control", "x-kept"]);
        let f = Freshness::compute(
            &h,
            0,
            0,
            Operator {
                immutable: false,
                ttl: 0,
            },
        );
        assert!(!f.no_cache, "qualified no-cache does not make every use validate");
        assert!(!ok(&[("vary", "Accept, *")], 200, false));
        assert!(ok(&[("vary", "accept-language")], 200, false));
        assert!(!ok(&[("set-cookie", "id=1")], 200, false));
        assert!(ok(&[("set-cookie", "id=1"), ("cache-control", "public")], 200, false));
        let no_store = RequestRules::of(&map(&[("cache-control", "no-store")]));
        assert!(not_storable(200, &HeaderMap::new(), &no_store, false).is_some());
    }

    #[test]
    fn stale_while_revalidate_and_stale_if_error() {
        let op = Operator {
            immutable: false,
            ttl: 0,
        };
        let f = Freshness::compute(
            &map(&[(
                "cache-control",
                "max-age=10, stale-while-revalidate=20, stale-if-error=100",
            )]),
            1000,
            1000,
            op,
        );
        let none = RequestRules::default();
        assert_eq!(f.ttl(1004), 6);
        assert!(f.serve_while_revalidating(1025, &none));
        assert!(!f.serve_while_revalidating(1031, &none), "past the window");
        assert_eq!(f.ttl(1031), -21);
        assert!(f.serve_on_error(1100, &none) && !f.serve_on_error(1111, &none));
        // The request's stale-if-error wins; no-cache forbids both.
        let strict = RequestRules::of(&map(&[("cache-control", "stale-if-error=0")]));
        assert!(!f.serve_on_error(1015, &strict));
        let nc = RequestRules::of(&map(&[("cache-control", "no-cache")]));
        assert!(!f.serve_while_revalidating(1015, &nc));
        let mr = Freshness::compute(
            &map(&[(
                "cache-control",
                "max-age=10, must-revalidate, stale-while-revalidate=20, stale-if-error=20",
            )]),
            1000,
            1000,
            op,
        );
        assert!(!mr.serve_while_revalidating(1015, &none) && !mr.serve_on_error(1015, &none));
        // Records written before these fields existed read as before.
        let old: Freshness = serde_json::from_str(
            r#"{"response_time":1,"initial_age":0,"lifetime":5,"no_cache":false,"must_revalidate":false,"basis":"explicit"}"#,
        )
        .unwrap();
        assert_eq!((old.stale_while_revalidate, old.stale_if_error), (0, 0));
    }

    #[test]
    fn targeted_fields_rule_over_cache_control_and_expires() {
        let cdn = [HeaderName::from_static("cdn-cache-control")];
        let h = map(&[
            ("cache-control", "no-store"),
            ("expires", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ("cdn-cache-control", "max-age=600"),
        ]);
        let t = targeted(&h, &cdn);
        assert_eq!(t.get(header::CACHE_CONTROL).unwrap(), "max-age=600");
        assert!(t.get(header::EXPIRES).is_none());
        assert!(not_storable(200, &t, &RequestRules::default(), false).is_none());
        // Not on the list, empty, or absent: Cache-Control rules.
        assert!(matches!(targeted(&h, &[]), std::borrow::Cow::Borrowed(_)));
        let empty = map(&[("cache-control", "max-age=5"), ("cdn-cache-control", "")]);
        assert_eq!(targeted(&empty, &cdn).get(header::CACHE_CONTROL).unwrap(), "max-age=5");
    }

    #[test]
    fn hop_by_hop_fields_include_those_connection_names() {
        let h = map(&[
            ("connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("x-custom", "yes"),
            ("authorization", "Bearer t"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
        ]);
        let kept: Vec<&str> = end_to_end(&h).map(|(k, _)| k.as_str()).collect();
        assert_eq!(kept, ["x-custom", "authorization"]);
    }

    #[test]
    fn a_304_replaces_the_fields_it_carries() {
        let stored = vec![
            ("cache-control".to_string(), "max-age=1".to_string()),
            ("x-a".to_string(), "old".to_string()),
            ("x-keep".to_string(), "k".to_string()),
        ];
        let up = update_fields(
            &stored,
            &map(&[("cache-control", "max-age=60"), ("x-a", "new"), ("content-length", "0")]),
        );
        assert_eq!(
            up,
            [
                ("x-keep".to_string(), "k".to_string()),
                ("cache-control".to_string(), "max-age=60".to_string()),
                ("x-a".to_string(), "new".to_string()),
            ]
        );
    }

    proptest::proptest! {
        #[test]
        fn any_cache_control_value_parses_without_panicking(v in "\\PC{0,60}") {
            let d = Directives::parse(&v);
            let _ = d.seconds("max-age");
        }
    }

    #[test]
    fn vary_selects_normalised_values() {
        let names = vary_names(&map(&[("vary", "Accept-Language, accept"), ("vary", "accept")])).unwrap();
        assert_eq!(names, ["accept", "accept-language"]);
        let req = map(&[("accept-language", "en,  fr"), ("accept-language", "de")]);
        assert_eq!(selecting_values(&names, &req), [None, Some("en, fr, de".to_string())]);
    }
}
