//! The cache's HTTP/1.1 listener: which requests it takes (a configured
//! source's Host, `cacheHostOrigin`, or an absolute URI as a forward proxy),
//! the content-source plugin's decision, the loop guard, and the responses:
//! 200, 206 (single range or `multipart/byteranges`), 304, 416.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use crate::block::{Block, BlockState, Fill, Source};
use crate::disk::Class;
use crate::origin::Forward;
use crate::path;
use crate::rfc9111::{self, RequestRules};
use crate::upstream::Endpoint;
use crate::{Cache, FillError, Meta, Plan};
use holdfast_model::{ContentClass, ContentDecision, ContentPolicy, RequestHead};

/// Response body.
pub type Body = BoxBody<Bytes, std::io::Error>;

pub mod admission;
mod cached;
mod listen;

use self::cached::{Served, align_end, serve_cached};
pub use self::listen::{Listeners, serve, tls_config};

fn full(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// A body fed by a channel; an `Err` aborts the response (the connection is
/// closed, so the client sees an incomplete transfer, never a spliced one).
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// Where a request is going: host, port, path and query.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// Host, lowercase.
    pub host: String,
    /// Explicit port.
    pub port: Option<u16>,
    /// Path and query.
    pub path_and_query: String,
}

/// The target of a request: its absolute URI (forward proxy) or Host header.
pub fn target(parts: &Parts) -> Option<Target> {
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let (host, port) = match parts.uri.authority() {
        Some(a) => (a.host().to_string(), a.port_u16()),
        None => {
            let h = parts.headers.get(header::HOST)?.to_str().ok()?;
            let auth: hyper::http::uri::Authority = h.parse().ok()?;
            (auth.host().to_string(), auth.port_u16())
        }
    };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if host.is_empty() || !path_and_query.starts_with('/') {
        return None;
    }
    Some(Target {
        host,
        port,
        path_and_query,
    })
}

fn header_str<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Whether `token` appears in the request's `Via` or `CDN-Loop`.
fn is_loop(h: &HeaderMap, token: &str) -> bool {
    let listed = |name: &str| {
        h.get_all(name).iter().filter_map(|v| v.to_str().ok()).any(|v| {
            v.split(',').any(|e| {
                let e = e.trim();
                // CDN-Loop: `token[; params]`; Via: `1.1 token [comment]`.
                e.split([';', ' ']).any(|w| w.eq_ignore_ascii_case(token))
            })
        })
    };
    listed("cdn-loop") || listed("via")
}

fn client_kind(h: &HeaderMap) -> &'static str {
    let from_cache = h
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("holdfast-"));
    if from_cache { "child-cache" } else { "client" }
}

/// Answers with a 5xx the cache produces itself, logging why (every one
/// is logged) and counting it as `upstream-failed` or `refused`.
pub(crate) fn server_error(cache: &Cache, status: StatusCode, key: &str, why: &str) -> Response<Body> {
    tracing::warn!(status = status.as_u16(), key = %key, why = %why, "cache: answering with a server error");
    cache.counters.event(if status == StatusCode::LOOP_DETECTED {
        "loop"
    } else {
        "server-error"
    });
    let mut r = full(status, format!("{why}\n"));
    // RFC 9211: an answer the cache made itself says why (an sf-string:
    // printable ASCII, quotes and backslashes escaped).
    let detail: String = why
        .chars()
        .take(200)
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect::<String>()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    add_cache_headers(r.headers_mut(), cache, &format!("detail=\"{detail}\""));
    r
}

async fn handle(cache: Arc<Cache>, policy: Arc<dyn ContentPolicy>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let kind = client_kind(&parts.headers);
    let count = |source: &str, result: &'static str| cache.counters.request(source, kind, result);
    if is_loop(&parts.headers, cache.token()) {
        count("none", "error");
        return server_error(
            &cache,
            StatusCode::LOOP_DETECTED,
            "",
            &format!("request loop: it already passed through {}", cache.token()),
        );
    }
    if parts.method == Method::CONNECT {
        count("none", "deny");
        return full(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served: the cache cannot store what it cannot read\n".into(),
        );
    }
    let Some(mut t) = target(&parts) else {
        cache.counters.event("bad-request");
        count("none", "error");
        return full(
            StatusCode::BAD_REQUEST,
            "the request names no host (Host header or absolute URI)\n".into(),
        );
    };
    // The plugin's rules, the cache key and the request sent upstream all
    // see the normalised path (docs/cache.md, "Request paths").
    t.path_and_query = match path::normalize(&t.path_and_query) {
        Ok(p) => p,
        Err(e) => {
            cache.counters.event("bad-path");
            count("none", "error");
            return full(StatusCode::BAD_REQUEST, format!("bad request path: {e}\n"));
        }
    };
    let head = request_head(&parts.method, &t, &parts.headers);
    // A plugin call is bounded by the slot's deadline (10 ms by default);
    // typically microseconds, so it runs on this task like the broker's.
    let decision = policy.classify(&head);
    let cacheable_method = parts.method == Method::GET || parts.method == Method::HEAD;
    match decision {
        ContentDecision::Deny(reason) => {
            count("none", "deny");
            full(StatusCode::FORBIDDEN, format!("{reason}\n"))
        }
        ContentDecision::PassThrough(origin) => match Endpoint::parse(&origin) {
            Ok(origin) => {
                count("none", "pass");
                let body = (!cacheable_method).then_some(body);
                pass_through(&cache, &origin, &t.path_and_query, &parts, body).await
            }
            Err(e) => {
                count("none", "error");
                server_error(
                    &cache,
                    StatusCode::BAD_GATEWAY,
                    "",
                    &format!("content-source plugin: bad origin: {e}"),
                )
            }
        },
        ContentDecision::Cache(p) => {
            let origin = match Endpoint::parse(&p.origin) {
                Ok(o) => o,
                Err(e) => {
                    count("none", "error");
                    return server_error(
                        &cache,
                        StatusCode::BAD_GATEWAY,
                        &p.key,
                        &format!("content-source plugin: bad origin: {e}"),
                    );
                }
            };
            if !p.origin_path.starts_with('/') {
                count("none", "error");
                return server_error(
                    &cache,
                    StatusCode::BAD_GATEWAY,
                    &p.key,
                    &format!(
                        "content-source plugin: origin path {:?} must start with /",
                        p.origin_path
                    ),
                );
            }
            if !cacheable_method {
                // Other methods go to the origin with their bodies and
                // answers, uncached (RFC 9111 §4.4 for what they invalidate).
                let source = cache.source_label(&p.key);
                count(&source, "pass");
                let resp = pass_through(&cache, &origin, &p.origin_path, &parts, Some(body)).await;
                if unsafe_method(&parts.method) && (resp.status().is_success() || resp.status().is_redirection()) {
                    invalidate_after(&cache, policy.as_ref(), &p.key, &t, &resp);
                }
                return resp;
            }
            let fields = cache.origin.forward_fields(&parts.headers, Forward::Fill);
            let mut plan = Plan {
                source: cache.source_label(&p.key),
                origin,
                origin_path: p.origin_path,
                key: p.key.clone(),
                class: match p.class {
                    ContentClass::Immutable => Class::Immutable,
                    ContentClass::Revalidate => Class::Revalidate,
                },
                ttl: p.ttl_seconds,
                max_object_size: p.max_object_size,
                primary: p.key,
                rules: RequestRules::of(&parts.headers),
                authorized: parts.headers.contains_key(header::AUTHORIZATION),
                fields,
            };
            // A stored response selected by other `Vary` values is not
            // used for this request: it gets its own variant (at most twice
            // when the origin changes what it varies on meanwhile).
            for _ in 0..2 {
                plan.key = cache
                    .learned
                    .variant_key(&plan.primary, &plan.fields, |k| cache.objects.meta_of(k));
                match serve_cached(&cache, Arc::new(plan.clone()), &parts, kind).await {
                    Served::Response(r) => return r,
                    Served::Reselect => {}
                }
            }
            count(&plan.source, "pass");
            pass_through(&cache, &plan.origin, &plan.origin_path, &parts, None).await
        }
    }
}

/// The request as the content-source policy sees it.
fn request_head(method: &Method, t: &Target, headers: &HeaderMap) -> RequestHead {
    RequestHead {
        method: method.as_str().to_string(),
        host: t.host.clone(),
        port: t.port,
        path_and_query: t.path_and_query.clone(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    }
}

/// Whether a method is unsafe (or of unknown safety) for RFC 9111 §4.4.
fn unsafe_method(m: &Method) -> bool {
    !matches!(m.as_str(), "GET" | "HEAD" | "OPTIONS" | "TRACE")
}

/// After an unsafe method succeeded: invalidates the target URI's stored
/// responses, and those of `Location` and `Content-Location` when they name
/// the same host (RFC 9111 §4.4).
fn invalidate_after(cache: &Arc<Cache>, policy: &dyn ContentPolicy, key: &str, t: &Target, resp: &Response<Body>) {
    let mut n = cache.invalidate_uri(key);
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(loc) = header_str(resp.headers(), &name) else {
            continue;
        };
        let Some(path) = same_origin_path(loc, t) else {
            continue;
        };
        let Ok(path) = path::normalize(&path) else {
            continue;
        };
        let head = request_head(
            &Method::GET,
            &Target {
                host: t.host.clone(),
                port: t.port,
                path_and_query: path,
            },
            &HeaderMap::new(),
        );
        if let ContentDecision::Cache(p) = policy.classify(&head) {
            n += cache.invalidate_uri(&p.key);
        }
    }
    tracing::debug!(key = %key, removed = n, "cache: invalidated after an unsafe method");
}

/// The path of a `Location`-style reference when it names the request's
/// host (relative references always do).
fn same_origin_path(loc: &str, t: &Target) -> Option<String> {
    let loc = loc.trim();
    if loc.starts_with('/') && !loc.starts_with("//") {
        return Some(loc.to_string());
    }
    let uri: hyper::Uri = loc.parse().ok()?;
    let auth = uri.authority()?;
    let same = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .eq_ignore_ascii_case(&t.host)
        && auth.port_u16() == t.port;
    same.then(|| uri.path_and_query().map_or("/", |p| p.as_str()).to_string())
}

/// Forwards the request uncached, with its body when it has one, and
/// streams the answer back with its end-to-end fields.
async fn pass_through(
    cache: &Arc<Cache>,
    origin: &Endpoint,
    path: &str,
    parts: &Parts,
    body: Option<Incoming>,
) -> Response<Body> {
    let fields = cache.origin.forward_fields(&parts.headers, Forward::Pass);
    match cache.client().send(&parts.method, origin, path, &fields, body).await {
        Ok(resp) => {
            let (up, body) = resp.into_parts();
            let mut r = Response::new(body.map_err(std::io::Error::other).boxed());
            *r.status_mut() = up.status;
            for (k, v) in rfc9111::end_to_end(&up.headers) {
                r.headers_mut().append(k.clone(), v.clone());
            }
            // The body keeps its framing: hyper sets it from the length.
            if let Some(len) = up.headers.get(header::CONTENT_LENGTH) {
                r.headers_mut().insert(header::CONTENT_LENGTH, len.clone());
            }
            // RFC 9211: other methods are forwarded as `method`; a GET or
            // HEAD that is not stored as `uri-miss`.
            let fwd = if parts.method == Method::GET || parts.method == Method::HEAD {
                "uri-miss"
            } else {
                "method"
            };
            add_cache_headers(
                r.headers_mut(),
                cache,
                &format!("fwd={fwd}; fwd-status={}", up.status.as_u16()),
            );
            r
        }
        Err(e) => server_error(cache, StatusCode::BAD_GATEWAY, path, &e.to_string()),
    }
}

fn add_cache_headers(h: &mut HeaderMap, cache: &Cache, status: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!("1.1 {}", cache.token())) {
        h.append(header::VIA, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{}; {status}", cache.token())) {
        h.append(HeaderName::from_static("cache-status"), v);
    }
}

enum ReadEnd {
    /// The client went away.
    Closed,
    /// The bytes cannot be had for this version.
    Failed(Arc<FillError>),
}

/// Streams byte ranges of one version of an object to a client.
struct Reader<'a> {
    cache: &'a Arc<Cache>,
    plan: &'a Arc<Plan>,
    meta: &'a Arc<Meta>,
    own: Option<Arc<Fill>>,
    tx: &'a mpsc::Sender<Result<Bytes, std::io::Error>>,
    hit: u64,
    miss: u64,
}

impl Reader<'_> {
    async fn send(&self, b: Bytes) -> Result<(), ReadEnd> {
        self.tx.send(Ok(b)).await.map_err(|_| ReadEnd::Closed)
    }

    /// Sends bytes `start..end`.
    async fn copy(&mut self, start: u64, end: u64) -> Result<(), ReadEnd> {
        let bs = self.cache.block_size();
        let length = self.meta.validator.length;
        let fill_end = align_end(end, bs).min(length.saturating_sub(1));
        let mut pos = start;
        while pos < end {
            let k64 = pos / bs;
            let Ok(k) = u32::try_from(k64) else {
                return Err(ReadEnd::Failed(Arc::new(FillError::Upstream(
                    "object too large".into(),
                ))));
            };
            let bstart = k64 * bs;
            let to = end.min(bstart + bs);
            let mut failures = 0;
            while pos < to {
                let mine = match &self.own {
                    Some(f) => f.take(k).await,
                    None => None,
                };
                let src = match mine {
                    Some(b) => Source::Block(b),
                    None => self.cache.fills.acquire(self.plan, k, Some(fill_end), &mut self.own),
                };
                let outcome = match src {
                    Source::Stored { id, meta } => {
                        if !meta.validator.same_version(&self.meta.validator) {
                            return Err(ReadEnd::Failed(Arc::new(FillError::VersionChanged)));
                        }
                        match self.cache.store.read(id, k, pos - bstart, to - bstart).await {
                            Ok(b) => {
                                self.hit += b.len() as u64;
                                pos = to;
                                self.send(b).await?;
                                Ok(())
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, key = %self.plan.key, block = k, "cache: stored block unreadable; fetching it again");
                                self.cache.objects.drop_stored(&self.plan.key, id, k);
                                self.cache.counters.event("block-unreadable");
                                continue;
                            }
                        }
                    }
                    Source::Block(b) => match b.meta().await {
                        Ok(m) if !m.validator.same_version(&self.meta.validator) => {
                            return Err(ReadEnd::Failed(Arc::new(FillError::VersionChanged)));
                        }
                        Ok(_) => self.stream(&b, &mut pos, bstart, to).await,
                        Err(e) => Err(ReadEnd::Failed(e)),
                    },
                };
                match outcome {
                    Ok(()) => {}
                    Err(ReadEnd::Closed) => return Err(ReadEnd::Closed),
                    Err(ReadEnd::Failed(e)) => {
                        failures += 1;
                        if failures >= 3 || matches!(*e, FillError::VersionChanged) {
                            return Err(ReadEnd::Failed(e));
                        }
                        // The next acquire starts a new fill from here.
                    }
                }
            }
        }
        Ok(())
    }

    /// Streams `pos..to` of a block as its bytes arrive.
    async fn stream(&mut self, block: &Block, pos: &mut u64, bstart: u64, to: u64) -> Result<(), ReadEnd> {
        let mut rx = block.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            let (data, avail) = match state {
                BlockState::Waiting => (None, 0),
                BlockState::Writing { data, written } => (Some(data), written),
                BlockState::Done(data) => {
                    let len = data.len;
                    (Some(data), len)
                }
                BlockState::Failed(e) => return Err(ReadEnd::Failed(e)),
            };
            if let Some(d) = data {
                let from = *pos - bstart;
                let upto = avail.min(to - bstart);
                if upto > from {
                    let bytes = d
                        .buf
                        .read(from, upto)
                        .map_err(|e| ReadEnd::Failed(Arc::new(FillError::Upstream(format!("cache read: {e}")))))?;
                    self.miss += bytes.len() as u64;
                    *pos = bstart + upto;
                    self.send(bytes).await?;
                }
                if *pos >= to {
                    return Ok(());
                }
                if avail >= d.len {
                    return Err(ReadEnd::Failed(Arc::new(FillError::Upstream(
                        "block shorter than expected".into(),
                    ))));
                }
            }
            if rx.changed().await.is_err() {
                return Err(ReadEnd::Failed(Arc::new(FillError::Upstream("fill ended".into()))));
            }
        }
    }
}

#[cfg(test)]
mod tests;
