//! Serving a request from the cache: freshness, ranges, conditional requests, multipart answers, fills for what is missing.

use std::sync::Arc;

use bytes::Bytes;
use holdfast_model::lock;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode};
use tokio::sync::mpsc;

use super::{
    Body, ChannelBody, ReadEnd, Reader, add_cache_headers, empty, full, header_str, pass_through, server_error,
};
use crate::block::{Fill, Source};
use crate::range::{self, ByteRange, Spec};
use crate::rfc9111;
use crate::statuses::Answer;
use crate::{Cache, FillError, Meta, Passed, Plan, Revalidation, now_secs};

/// What [`serve_cached`] did.
pub(crate) enum Served {
    /// The answer.
    Response(Response<Body>),
    /// The response found is selected by other `Vary` values than this
    /// request's: choose the key again.
    Reselect,
}

/// Serves a cacheable request.
pub(crate) async fn serve_cached(cache: &Arc<Cache>, plan: Arc<Plan>, parts: &Parts, kind: &'static str) -> Served {
    let count = |result: &'static str| cache.counters.request(&plan.source, kind, result);
    if cache.learned.uncacheable(&plan.key) && !plan.rules.only_if_cached {
        count("pass");
        return Served::Response(pass_through(cache, &plan.origin, &plan.origin_path, parts, None).await);
    }
    let pin = cache.pin(&plan.key);
    let bs = cache.block_size();
    let mut specs = match header_str(&parts.headers, &header::RANGE).map(range::parse) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            // RFC 9110 §14.2: an invalid Range is ignored.
            tracing::debug!(error = ?e, "cache: ignoring a Range header");
            cache.counters.event("bad-range");
            None
        }
    };
    // An answer of another status stored under this key (RFC 9111 §3).
    if let Some(a) = cache.statuses.get(&plan.key)
        && a.selected_for(&plan.fields)
    {
        let now = now_secs();
        let f = &a.head.freshness;
        if f.usable(now, &plan.rules) {
            count("hit");
            return Served::Response(answer_stored(cache, &a, parts, &hit_status(f, now)));
        }
        if f.serve_while_revalidating(now, &plan.rules) {
            count("hit");
            cache.counters.event("served-stale-while-revalidate");
            refetch_in_background(cache, &plan);
            return Served::Response(answer_stored(cache, &a, parts, &hit_status(f, now)));
        }
        if !plan.rules.only_if_cached {
            // Stale: asked for again below, and stored again or replaced.
            cache.statuses.remove_where(|k| k == plan.key);
        }
    }
    // RFC 9111 §4: a stored response is used while fresh enough for this
    // request, else validated with the origin; served stale only when the
    // origin cannot be reached and neither side forbids it (§4.2.4), or
    // within its stale-while-revalidate or stale-if-error window (RFC 5861).
    let mut status = Status::default();
    if let Some(m) = cache.objects.meta_of(&plan.key) {
        let now = now_secs();
        if !m.freshness.usable(now, &plan.rules) {
            if plan.rules.only_if_cached {
                count("error");
                return Served::Response(only_if_cached_miss(cache, &plan, "the stored response is stale"));
            }
            if m.freshness.serve_while_revalidating(now, &plan.rules) {
                cache.counters.event("served-stale-while-revalidate");
                let (c, p, stale) = (cache.clone(), plan.clone(), m.clone());
                tokio::spawn(async move {
                    c.revalidator.revalidate(&p, &stale).await;
                });
            } else {
                status.fwd = Some(if plan.rules.no_cache || plan.rules.max_age.is_some() {
                    "request"
                } else {
                    "stale"
                });
                match cache.revalidator.revalidate(&plan, &m).await {
                    Revalidation::Validated => status.fwd_status = Some(304),
                    Revalidation::Invalidated => {}
                    Revalidation::Unreachable => {
                        if !m.freshness.may_serve_stale(&plan.rules) {
                            count("error");
                            return Served::Response(server_error(
                                cache,
                                StatusCode::GATEWAY_TIMEOUT,
                                &plan.key,
                                "the origin cannot be reached and the stored response may not be served stale",
                            ));
                        }
                        cache.counters.event("served-stale");
                        status.fwd = None;
                    }
                    Revalidation::Failed => {
                        if !m.freshness.serve_on_error(now_secs(), &plan.rules) {
                            // Not allowed stale: the client gets the
                            // origin's own answer.
                            count("pass");
                            return Served::Response(
                                pass_through(cache, &plan.origin, &plan.origin_path, parts, None).await,
                            );
                        }
                        cache.counters.event("served-stale-if-error");
                        status.fwd = None;
                    }
                }
            }
        }
    }
    if plan.rules.only_if_cached {
        let stored = cache.objects.meta_of(&plan.key).filter(|m| {
            let ranges = match &specs {
                Some(s) => range::resolve(s, m.validator.length),
                None => vec![ByteRange {
                    start: 0,
                    end: m.validator.length,
                }],
            };
            let spans: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.end)).collect();
            cache.objects.coverage(&plan.key, m, &spans).is_ok()
        });
        if stored.is_none() {
            count("error");
            return Served::Response(only_if_cached_miss(cache, &plan, "not stored"));
        }
    }
    let mut own: Option<Arc<Fill>> = None;
    let mut stored = cache.objects.meta_of(&plan.key);
    if let Some(m) = &stored
        && !m.validator.combinable()
        && cache.objects.stalled(&plan.key, &m.validator)
    {
        // Part of a version without a strong validator (its fill stopped):
        // no other fetch can complete it, so it is fetched again whole.
        if let Some(old) = cache.objects.invalidate_version(&plan.key, &m.validator) {
            cache.store.delete_later(Some(plan.key.clone()), old);
            cache.objects.update_gauges();
        }
        cache.counters.event("refetched-incomplete");
        stored = None;
    }
    let mut meta = match stored {
        Some(m) => m,
        None => {
            status.fwd.get_or_insert("uri-miss");
            let hint = cache.learned.length_hint(&plan.key);
            let whole = cache.learned.whole(&plan.key);
            if let Some([Spec::Suffix(n)]) = specs.as_deref()
                && hint.is_none()
                && !whole
            {
                // The last n bytes of an object of unknown length: asked for
                // as they are (one request); the length it tells makes the
                // next such request an aligned, stored fill.
                return Served::Response(suffix_miss(cache, &plan, parts, *n, count).await);
            }
            // Responses without a strong validator are stored only when
            // fetched whole.
            let (first, end) = if whole {
                (0, None)
            } else {
                cold_target(specs.as_deref(), bs, hint)
            };
            let Ok(first) = u32::try_from(first) else {
                count("error");
                return Served::Response(full(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range starts past any object\n".into(),
                ));
            };
            match cache.fills.acquire(&plan, first, end, &mut own) {
                Source::Stored { meta, .. } => meta,
                Source::Block(b) => match b.meta().await {
                    Ok(m) => m,
                    Err(e) => return Served::Response(failed_fill(cache, &plan, parts, &e, own.as_ref(), count).await),
                },
            }
        }
    };
    // The head names one version. When blocks must be fetched, the first
    // one's fill tells whether the origin still has that version; if not,
    // the object was invalidated and the response is built for the new one.
    let mut checks = 0;
    let if_range = header_str(&parts.headers, &header::IF_RANGE);
    let ranges = loop {
        // If-Range (strong comparison) decides whether the Range applies.
        if if_range.is_some_and(|ir| !meta.validator.if_range_matches(ir)) {
            specs = None;
        }
        let ranges: Vec<ByteRange> = match &specs {
            None => vec![ByteRange {
                start: 0,
                end: meta.validator.length,
            }],
            Some(s) => range::resolve(s, meta.validator.length),
        };
        let spans: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.end)).collect();
        let Err((k, last)) = cache.objects.coverage(&plan.key, &meta, &spans) else {
            break ranges;
        };
        if checks == 3 || parts.method == Method::HEAD {
            break ranges;
        }
        checks += 1;
        let end = align_end(last.saturating_add(1), bs).min(meta.validator.length.saturating_sub(1));
        let src = match &own {
            Some(f) => f.take(k).await.map(Source::Block),
            None => None,
        };
        let src = src.unwrap_or_else(|| cache.fills.acquire(&plan, k, Some(end), &mut own));
        if let Source::Stored { meta: m, .. } = &src
            && !m.validator.same_version(&meta.validator)
        {
            // The object moved on since this request looked it up.
            meta = m.clone();
            continue;
        }
        if let Source::Block(b) = src {
            match b.meta().await {
                Ok(m) if m.validator.same_version(&meta.validator) => {
                    // Keep the block for the reader.
                    if let Some(f) = &own {
                        f.keep(k, b);
                    }
                    break ranges;
                }
                Ok(m) => {
                    cache.counters.event("version-changed-before-head");
                    meta = m;
                    if let Some(f) = &own {
                        f.keep(k, b);
                    }
                }
                Err(e) => return Served::Response(failed_fill(cache, &plan, parts, &e, own.as_ref(), count).await),
            }
        }
    };
    status.ttl = meta.freshness.ttl(now_secs());
    if !meta.selected_for(&plan.fields) {
        // Stored for, or being fetched for, other `Vary` values.
        drop(pin);
        return Served::Reselect;
    }
    let v = &meta.validator;
    let length = v.length;
    // Conditionals (RFC 9110 §13.2.2): If-None-Match, else If-Modified-Since.
    let not_modified = match header_str(&parts.headers, &header::IF_NONE_MATCH) {
        Some(inm) => v.none_match(inm),
        None => header_str(&parts.headers, &header::IF_MODIFIED_SINCE).is_some_and(|ims| v.not_modified_since(ims)),
    };
    if not_modified {
        count("not-modified");
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        stored_headers(r.headers_mut(), &meta);
        validator_headers(r.headers_mut(), &meta);
        add_cache_headers(r.headers_mut(), cache, &status.render(true));
        return Served::Response(r);
    }
    if specs.is_some() && ranges.is_empty() {
        count("error");
        return Served::Response(unsatisfiable(length));
    }
    let ranged = specs.is_some();
    let ct = meta
        .content_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".into());
    // Response layout: one body, or multipart parts with their headers.
    let mut parts_out: Vec<(Option<Bytes>, ByteRange)> = Vec::new();
    let mut trailer = None;
    let mut total: u64 = 0;
    let boundary = format!("holdfast{:016x}", boundary_seed(cache));
    if ranges.len() > 1 {
        for (i, r) in ranges.iter().enumerate() {
            let lead = if i == 0 { "" } else { "\r\n" };
            let h = format!(
                "{lead}--{boundary}\r\nContent-Type: {ct}\r\nContent-Range: {}\r\n\r\n",
                r.content_range(length)
            );
            total += h.len() as u64 + r.len();
            parts_out.push((Some(Bytes::from(h)), *r));
        }
        let t = format!("\r\n--{boundary}--\r\n");
        total += t.len() as u64;
        trailer = Some(Bytes::from(t));
    } else {
        total = ranges[0].len();
        parts_out.push((None, ranges[0]));
    }
    let spans: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.end)).collect();
    let hit = cache.objects.coverage(&plan.key, &meta, &spans).is_ok();
    let mut resp = Response::new(empty());
    {
        let h = resp.headers_mut();
        stored_headers(h, &meta);
        // Fields not stored go to the request whose fill received them.
        if let Some(f) = &own {
            for (k, v) in lock(&f.withheld).iter() {
                if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                    h.append(k, v);
                }
            }
        }
        validator_headers(h, &meta);
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
        if ranges.len() > 1 {
            if let Ok(v) = HeaderValue::from_str(&format!("multipart/byteranges; boundary={boundary}")) {
                h.insert(header::CONTENT_TYPE, v);
            }
        } else {
            if let Ok(v) = HeaderValue::from_str(&ct) {
                h.insert(header::CONTENT_TYPE, v);
            }
            if ranged && let Ok(v) = HeaderValue::from_str(&ranges[0].content_range(length)) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        add_cache_headers(h, cache, &status.render(hit));
    }
    *resp.status_mut() = if ranged {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    if parts.method == Method::HEAD {
        count(if hit { "hit" } else { "miss" });
        return Served::Response(resp);
    }
    // A small hit in one range is read here and sent whole: no task, no
    // channel.
    if hit
        && parts_out.len() == 1
        && let Some(bytes) = cache
            .store
            .read_small(&cache.objects, &plan.key, &meta, ranges[0].start, ranges[0].end)
    {
        count("hit");
        cache.counters.served(&plan.source, kind, bytes.len() as u64, 0);
        *resp.body_mut() = Full::new(bytes).map_err(|e| match e {}).boxed();
        drop(pin);
        return Served::Response(resp);
    }
    let (tx, rx) = mpsc::channel(8);
    *resp.body_mut() = BodyExt::boxed(ChannelBody { rx });
    let cache = cache.clone();
    tokio::spawn(async move {
        let mut reader = Reader {
            cache: &cache,
            plan: &plan,
            meta: &meta,
            own,
            tx: &tx,
            hit: 0,
            miss: 0,
        };
        let mut result = Ok(());
        for (head, r) in &parts_out {
            if let Some(h) = head
                && tx.send(Ok(h.clone())).await.is_err()
            {
                result = Err(ReadEnd::Closed);
                break;
            }
            result = reader.copy(r.start, r.end).await;
            if result.is_err() {
                break;
            }
        }
        if result.is_ok()
            && let Some(t) = trailer
        {
            let _ = tx.send(Ok(t)).await;
        }
        let (hit_bytes, miss_bytes) = (reader.hit, reader.miss);
        let outcome = match &result {
            Err(ReadEnd::Failed(e)) => {
                let why = match &**e {
                    FillError::VersionChanged => "aborted-version-changed",
                    _ => "aborted-upstream-failed",
                };
                cache.counters.event(why);
                tracing::info!(key = %plan.key, error = ?e, "cache: response aborted after its head was sent");
                let _ = tx
                    .send(Err(std::io::Error::other(format!(
                        "{why}: the response cannot be completed"
                    ))))
                    .await;
                "error"
            }
            _ if miss_bytes == 0 => "hit",
            _ if hit_bytes == 0 => "miss",
            _ => "partial",
        };
        cache.counters.request(&plan.source, kind, outcome);
        cache.counters.served(&plan.source, kind, hit_bytes, miss_bytes);
        drop(pin);
    });
    Served::Response(resp)
}

/// The stored response's fields (RFC 9111 §3.1) and its `Age` (§5.1).
pub(crate) fn stored_headers(h: &mut HeaderMap, meta: &Meta) {
    for (k, v) in meta.headers.iter() {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            h.append(k, v);
        }
    }
    h.insert(header::AGE, HeaderValue::from(meta.freshness.age(now_secs())));
}

/// What `Cache-Status` (RFC 9211) says of an answer from an object.
#[derive(Default)]
struct Status {
    /// Why the request went upstream (`uri-miss`, `stale`, `request`), if
    /// it did before the answer's head.
    fwd: Option<&'static str>,
    /// The status the upstream answered a validation with.
    fwd_status: Option<u16>,
    /// Freshness left (negative: stale).
    ttl: i64,
}

impl Status {
    /// The parameters after the cache's name: `hit` when every byte came
    /// from storage without asking upstream, else `fwd=…`; blocks fetched
    /// for an object already partly stored are `fwd=partial`.
    fn render(&self, hit: bool) -> String {
        let mut out = match (self.fwd, hit) {
            (None, true) => "hit".to_string(),
            (None, false) => "fwd=partial; stored".to_string(),
            (Some(f), _) => format!("fwd={f}; stored"),
        };
        if let Some(s) = self.fwd_status {
            out.push_str(&format!("; fwd-status={s}"));
        }
        if self.ttl != i64::MAX {
            out.push_str(&format!("; ttl={}", self.ttl));
        }
        out
    }
}

/// `hit` with the freshness left.
fn hit_status(f: &rfc9111::Freshness, now: u64) -> String {
    match f.ttl(now) {
        i64::MAX => "hit".to_string(),
        t => format!("hit; ttl={t}"),
    }
}

/// Asks the origin again for `plan`'s key in the background (a stored
/// answer served while revalidating): its answer is stored as usual.
fn refetch_in_background(cache: &Arc<Cache>, plan: &Arc<Plan>) {
    let (cache, plan) = (cache.clone(), plan.clone());
    tokio::spawn(async move {
        let mut own = None;
        if let Source::Block(b) = cache.fills.acquire(&plan, 0, None, &mut own) {
            let _ = b.meta().await;
        }
    });
}

/// The answer from a stored answer of another status: its status, fields
/// and body, `Age`; a 304 for a 2xx whose `ETag` the request's
/// `If-None-Match` names (RFC 9110 §13.2.1: preconditions apply to 2xx).
pub(crate) fn answer_stored(cache: &Cache, a: &Answer, parts: &Parts, cache_status: &str) -> Response<Body> {
    let code = StatusCode::from_u16(a.head.status).unwrap_or(StatusCode::OK);
    let not_modified = code.is_success()
        && match (a.field("etag"), header_str(&parts.headers, &header::IF_NONE_MATCH)) {
            (Some(tag), Some(inm)) => range::weak_match(tag, inm),
            _ => false,
        };
    let mut r = Response::new(empty());
    for (k, v) in &a.head.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            r.headers_mut().append(k, v);
        }
    }
    r.headers_mut()
        .insert(header::AGE, HeaderValue::from(a.head.freshness.age(now_secs())));
    add_cache_headers(r.headers_mut(), cache, cache_status);
    if not_modified {
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        return r;
    }
    *r.status_mut() = code;
    if code != StatusCode::NO_CONTENT && code != StatusCode::NOT_MODIFIED {
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(a.body.len()));
        if parts.method != Method::HEAD {
            *r.body_mut() = Full::new(a.body.clone()).map_err(|e| match e {}).boxed();
        }
    }
    r
}

/// 504 for `only-if-cached` when storage cannot answer (RFC 9111 §5.2.1.7).
fn only_if_cached_miss(cache: &Cache, plan: &Plan, why: &str) -> Response<Body> {
    server_error(
        cache,
        StatusCode::GATEWAY_TIMEOUT,
        &plan.key,
        &format!("only-if-cached: {why}"),
    )
}

pub(crate) fn boundary_seed(cache: &Cache) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ cache.boundary_seq().rotate_left(32)
}

pub(crate) fn validator_headers(h: &mut HeaderMap, meta: &Meta) {
    if let Some(e) = meta
        .validator
        .etag
        .as_deref()
        .and_then(|e| HeaderValue::from_str(e).ok())
    {
        h.insert(header::ETAG, e);
    }
    if let Some(l) = meta
        .validator
        .last_modified
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        h.insert(header::LAST_MODIFIED, l);
    }
}

/// The first block and the fill's last byte for a cold object: one fill
/// from the first block asked for to the last (the object's length, when a
/// suffix is asked for, from `hint` or else from block 0).
pub(crate) fn cold_target(specs: Option<&[Spec]>, bs: u64, hint: Option<u64>) -> (u64, Option<u64>) {
    let Some(s) = specs else {
        return (0, None);
    };
    if let Some(len) = hint {
        let r = range::resolve(s, len);
        if let (Some(start), Some(end)) = (r.iter().map(|r| r.start).min(), r.iter().map(|r| r.end).max()) {
            return (start / bs, Some(align_end(end, bs)));
        }
    }
    let froms: Option<Vec<(u64, Option<u64>)>> = s
        .iter()
        .map(|x| match x {
            Spec::From { first, last } => Some((*first, *last)),
            Spec::Suffix(_) => None,
        })
        .collect();
    match froms {
        Some(f) if !f.is_empty() => {
            let start = f.iter().map(|(a, _)| *a).min().unwrap_or(0);
            let last = f
                .iter()
                .map(|(_, l)| *l)
                .collect::<Option<Vec<u64>>>()
                .and_then(|l| l.into_iter().max())
                .map(|l| align_end(l.saturating_add(1), bs));
            (start / bs, last)
        }
        // A suffix among several ranges: learn the length from block 0.
        _ => (0, Some(bs - 1)),
    }
}

/// A cold suffix request (`bytes=-n`) of an object of unknown length: one
/// upstream request for exactly that, answered as it comes; not stored
/// (its start is not aligned), but the length is remembered.
async fn suffix_miss(
    cache: &Arc<Cache>,
    plan: &Plan,
    parts: &Parts,
    n: u64,
    count: impl Fn(&'static str),
) -> Response<Body> {
    let resp = match cache
        .origin
        .send(plan, Method::GET, (header::RANGE, format!("bytes=-{n}")))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            count("error");
            return server_error(cache, StatusCode::BAD_GATEWAY, &plan.key, &e.to_string());
        }
    };
    let (head, body) = resp.into_parts();
    let text = |name| head.headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let range = match head.status.as_u16() {
        206 => range::parse_content_range(text(header::CONTENT_RANGE).unwrap_or("")).map(|(a, b, len)| (a, b + 1, len)),
        200 => text(header::CONTENT_LENGTH)
            .and_then(|l| l.parse::<u64>().ok())
            .map(|l| (0, l, Some(l))),
        _ => None,
    };
    if let Some((_, _, Some(len))) = range {
        cache.learned.learn_length(&plan.key, len);
    }
    count("miss");
    let passed = Passed { head, body, range };
    match answer_from(cache, passed, parts) {
        Some(r) => r,
        None => server_error(
            cache,
            StatusCode::BAD_GATEWAY,
            &plan.key,
            "upstream answered a suffix range with another range",
        ),
    }
}

/// The last byte of the block holding byte `end - 1`.
pub(crate) fn align_end(end: u64, bs: u64) -> u64 {
    end.div_ceil(bs).saturating_mul(bs).saturating_sub(1)
}

pub(crate) fn fill_error_response(cache: &Cache, key: &str, e: &FillError) -> Response<Body> {
    match e {
        FillError::Upstream(m) => server_error(cache, StatusCode::BAD_GATEWAY, key, m),
        FillError::Status { status, headers, body } => {
            let mut r = Response::new(Full::new(body.clone()).map_err(|e| match e {}).boxed());
            *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            *r.headers_mut() = headers.clone();
            if *status >= 500 {
                tracing::info!(key = %key, status, "cache: passing on the upstream's server error");
            }
            let stored = cache.statuses.get(key).is_some_and(|a| a.head.status == *status);
            let cs = format!(
                "fwd=uri-miss{}; fwd-status={status}",
                if stored { "; stored" } else { "" }
            );
            add_cache_headers(r.headers_mut(), cache, &cs);
            r
        }
        FillError::Unsatisfiable(len) => unsatisfiable(*len),
        FillError::Uncacheable(m, _) => server_error(cache, StatusCode::BAD_GATEWAY, key, m),
        FillError::VersionChanged => server_error(cache, StatusCode::BAD_GATEWAY, key, "the object changed upstream"),
    }
}

pub(crate) fn unsatisfiable(len: u64) -> Response<Body> {
    let mut r = full(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n".into());
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
        r.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    r
}

/// Answers a request whose fill failed before it had a version. An
/// uncacheable response goes to the request that started the fill as it
/// came (one upstream request per miss); other requests waiting on that
/// fill, and a response that cannot answer the client's range, are passed
/// through. Other failures are reported.
pub(crate) async fn failed_fill(
    cache: &Arc<Cache>,
    plan: &Plan,
    parts: &Parts,
    e: &FillError,
    own: Option<&Arc<Fill>>,
    count: impl Fn(&'static str),
) -> Response<Body> {
    if let FillError::Uncacheable(why, handoff) = e {
        tracing::debug!(key = %plan.key, why = %why, "cache: not stored; passing through");
        count("pass");
        if let Some(passed) = handoff.take(own)
            && let Some(r) = answer_from(cache, passed, parts)
        {
            return r;
        }
        return pass_through(cache, &plan.origin, &plan.origin_path, parts, None).await;
    }
    count("error");
    fill_error_response(cache, &plan.key, e)
}

/// The client's answer made from the fill's upstream response, which holds
/// bytes `a..e` of the object: as it is for a 200, whole as a 200 when it
/// holds the whole object, as a 206 when it holds the one range asked for.
/// `None` when it cannot answer the request (the request is then sent on).
fn answer_from(cache: &Cache, passed: Passed, parts: &Parts) -> Option<Response<Body>> {
    let Passed { head, body, range } = passed;
    let client_range = header_str(&parts.headers, &header::RANGE).and_then(|r| range::parse(r).ok());
    let (status, skip, take, content_range) = match (head.status.as_u16(), range, client_range.as_deref()) {
        (200, _, _) => (StatusCode::OK, 0, None, None),
        (s, _, _) if s != 206 => (head.status, 0, None, None),
        (206, Some((0, e, Some(len))), None) if e == len => (StatusCode::OK, 0, Some(len), None),
        (206, Some((a, e, len)), Some(specs)) => {
            let total = len?;
            let want = match range::resolve(specs, total).as_slice() {
                [one] => *one,
                _ => return None,
            };
            if want.start < a || want.end > e {
                return None;
            }
            (
                StatusCode::PARTIAL_CONTENT,
                want.start - a,
                Some(want.len()),
                Some(want.content_range(total)),
            )
        }
        _ => return None,
    };
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    for (k, v) in rfc9111::end_to_end(&head.headers) {
        if k != header::CONTENT_LENGTH && k != header::CONTENT_RANGE {
            r.headers_mut().append(k.clone(), v.clone());
        }
    }
    match take {
        Some(n) => {
            r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            if let Some(l) = head.headers.get(header::CONTENT_LENGTH) {
                r.headers_mut().insert(header::CONTENT_LENGTH, l.clone());
            }
        }
    }
    if let Some(cr) = content_range.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::CONTENT_RANGE, cr);
    }
    add_cache_headers(
        r.headers_mut(),
        cache,
        &format!("fwd=uri-miss; fwd-status={}", head.status.as_u16()),
    );
    if parts.method == Method::HEAD {
        return Some(r);
    }
    if skip == 0 && take.is_none() {
        *r.body_mut() = body.map_err(std::io::Error::other).boxed();
        return Some(r);
    }
    // Cut the client's range out of the body as it streams.
    let (tx, rx) = mpsc::channel(8);
    *r.body_mut() = BodyExt::boxed(ChannelBody { rx });
    let timeout = cache.client().timeout();
    tokio::spawn(async move {
        let mut body = body;
        let (mut skip, mut left) = (skip, take.unwrap_or(u64::MAX));
        while left > 0 {
            let frame = match tokio::time::timeout(timeout, body.frame()).await {
                Ok(Some(Ok(f))) => f,
                Ok(Some(Err(e))) => {
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
                _ => {
                    let _ = tx.send(Err(std::io::Error::other("upstream body ended early"))).await;
                    return;
                }
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            let s = skip.min(data.len() as u64);
            skip -= s;
            let _ = data.split_to(s as usize);
            let n = left.min(data.len() as u64);
            left -= n;
            data.truncate(n as usize);
            if !data.is_empty() && tx.send(Ok(data)).await.is_err() {
                return;
            }
        }
    });
    Some(r)
}
