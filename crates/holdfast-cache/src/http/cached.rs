//! Serving a request from the cache: ranges, conditional requests, multipart answers, fills for what is missing.

#[allow(unused_imports)]
use super::*;

/// Serves a cacheable request.
pub(crate) async fn serve_cached(
    cache: &Arc<Cache>,
    plan: Arc<Plan>,
    parts: &Parts,
    kind: &'static str,
) -> Response<Body> {
    let count = |result: &'static str| cache.count_request(&plan.source, kind, result);
    if cache.uncacheable(&plan.key) {
        count("pass");
        return pass_through(cache, &plan.origin, &plan.origin_path, parts).await;
    }
    let pin = cache.pin(&plan.key);
    let bs = cache.block_size();
    let mut specs = match header_str(&parts.headers, &header::RANGE).map(range::parse) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            // RFC 9110 §14.2: an invalid Range is ignored.
            tracing::debug!(error = ?e, "cache: ignoring a Range header");
            cache.event("bad-range");
            None
        }
    };
    if let Some(m) = cache.meta_of(&plan.key)
        && !m.fresh(now_secs())
    {
        cache.revalidate(&plan, &m).await;
    }
    let mut own: Option<Arc<Fill>> = None;
    let mut meta = match cache.meta_of(&plan.key) {
        Some(m) => m,
        None => {
            let (first, end) = cold_target(specs.as_deref(), bs);
            let Ok(first) = u32::try_from(first) else {
                count("error");
                return full(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range starts past any object\n".into(),
                );
            };
            match cache.acquire(&plan, first, end, &mut own) {
                Source::Stored { meta, .. } => meta,
                Source::Block(b) => match b.meta().await {
                    Ok(m) => m,
                    Err(e) => return failed_fill(cache, &plan, parts, &e, count).await,
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
        let Err((k, last)) = cache.coverage(&plan.key, &meta, &spans) else {
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
        let src = src.unwrap_or_else(|| cache.acquire(&plan, k, Some(end), &mut own));
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
                    cache.event("version-changed-before-head");
                    meta = m;
                    if let Some(f) = &own {
                        f.keep(k, b);
                    }
                }
                Err(e) => return failed_fill(cache, &plan, parts, &e, count).await,
            }
        }
    };
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
        validator_headers(r.headers_mut(), &meta);
        add_cache_headers(r.headers_mut(), cache, "hit");
        return r;
    }
    if specs.is_some() && ranges.is_empty() {
        count("error");
        return unsatisfiable(length);
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
    let hit = cache.coverage(&plan.key, &meta, &spans).is_ok();
    let mut resp = Response::new(empty());
    {
        let h = resp.headers_mut();
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
        add_cache_headers(h, cache, if hit { "hit" } else { "fwd=miss" });
    }
    *resp.status_mut() = if ranged {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    if parts.method == Method::HEAD {
        count(if hit { "hit" } else { "miss" });
        return resp;
    }
    // A small hit in one range is read here and sent whole: no task, no
    // channel.
    if hit
        && parts_out.len() == 1
        && let Some(bytes) = cache.read_small(&plan.key, &meta, ranges[0].start, ranges[0].end)
    {
        count("hit");
        cache.count_served(&plan.source, kind, bytes.len() as u64, 0);
        *resp.body_mut() = Full::new(bytes).map_err(|e| match e {}).boxed();
        drop(pin);
        return resp;
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
                cache.event(why);
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
        cache.count_request(&plan.source, kind, outcome);
        cache.count_served(&plan.source, kind, hit_bytes, miss_bytes);
        drop(pin);
    });
    resp
}

pub(crate) fn boundary_seed(cache: &Cache) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ cache
            .boundary_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .rotate_left(32)
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

/// The first block and the fill's last byte for a cold object.
pub(crate) fn cold_target(specs: Option<&[Spec]>, bs: u64) -> (u64, Option<u64>) {
    match specs {
        None => (0, None),
        Some(s) => match range::known_start(s) {
            Some(start) => {
                let last = match s {
                    [Spec::From { last: Some(l), .. }] => Some(align_end(l.saturating_add(1), bs)),
                    _ => None,
                };
                (start / bs, last)
            }
            // A suffix or several ranges: learn the length from block 0.
            None => (0, Some(bs - 1)),
        },
    }
}

/// The last byte of the block holding byte `end - 1`.
pub(crate) fn align_end(end: u64, bs: u64) -> u64 {
    end.div_ceil(bs).saturating_mul(bs).saturating_sub(1)
}

pub(crate) fn fill_error_response(cache: &Cache, e: &FillError) -> Response<Body> {
    match e {
        FillError::Upstream(m) => full(StatusCode::BAD_GATEWAY, format!("{m}\n")),
        FillError::Status {
            status,
            content_type,
            body,
        } => {
            let mut r = Response::new(Full::new(body.clone()).map_err(|e| match e {}).boxed());
            *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            if let Some(ct) = content_type.as_deref().and_then(|c| HeaderValue::from_str(c).ok()) {
                r.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            add_cache_headers(r.headers_mut(), cache, "fwd=miss");
            r
        }
        FillError::Unsatisfiable(len) => unsatisfiable(*len),
        FillError::Uncacheable(m) => full(StatusCode::BAD_GATEWAY, format!("{m}\n")),
        FillError::VersionChanged => full(StatusCode::BAD_GATEWAY, "the object changed upstream\n".into()),
    }
}

pub(crate) fn unsatisfiable(len: u64) -> Response<Body> {
    let mut r = full(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n".into());
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
        r.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    r
}

/// Answers a request whose fill failed before it had a version: passes an
/// uncacheable object through, otherwise reports the failure.
pub(crate) async fn failed_fill(
    cache: &Arc<Cache>,
    plan: &Plan,
    parts: &Parts,
    e: &FillError,
    count: impl Fn(&'static str),
) -> Response<Body> {
    if let FillError::Uncacheable(why) = e {
        tracing::debug!(key = %plan.key, why = %why, "cache: passing through");
        count("pass");
        return pass_through(cache, &plan.origin, &plan.origin_path, parts).await;
    }
    count("error");
    fill_error_response(cache, e)
}
