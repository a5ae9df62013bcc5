//! The fill coordinator: one upstream request per aligned run of missing
//! blocks. A fill claims each block only when it reaches it, streams the
//! bytes into the block's buffer (readers follow its `watch`), commits
//! each complete block to the block store, and stops where another fill
//! already holds the next block, when its reader is gone and it has
//! fetched `cache.orphan_fill_bytes` more, or at the end of what was asked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use holdfast_model::lock;
use http_body_util::BodyExt;

use crate::block::{Block, BlockData, BlockState, Buf, Fill, Source};
use crate::counters::Counters;
use crate::disk::Class;
use crate::learned::Learned;
use crate::objects::{Claim, Found, Objects};
use crate::origin::Origin;
use crate::range::{self, Validator};
use crate::rfc9111::{self, Freshness, RequestRules, Vary};
use crate::statuses::{Answer, Head, Statuses};
use crate::store::BlockStore;
use crate::{FillError, Handoff, Meta, Passed, Plan, now_secs};

/// Largest body of another status than 200/206 that a fill reads and
/// passes to every request waiting on it.
const STATUS_BODY_CAP: usize = 64 << 10;

/// Most private (unstored) blocks a fill keeps ahead of its reader.
const PRIVATE_AHEAD: usize = 2;

/// Starts and runs fills (see the module docs).
pub(crate) struct Fills {
    objects: Arc<Objects>,
    store: Arc<BlockStore>,
    origin: Arc<Origin>,
    learned: Arc<Learned>,
    counters: Arc<Counters>,
    statuses: Arc<Statuses>,
    /// `cache.targeted_cache_control` (RFC 9213).
    targeted: Arc<[hyper::header::HeaderName]>,
    block_size: u64,
    /// `cache.orphan_fill_bytes`, which a config reload changes.
    orphan_fill_bytes: AtomicU64,
}

/// The parts of the cache a fill works with.
pub(crate) struct FillParts {
    pub(crate) objects: Arc<Objects>,
    pub(crate) store: Arc<BlockStore>,
    pub(crate) origin: Arc<Origin>,
    pub(crate) learned: Arc<Learned>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) statuses: Arc<Statuses>,
    /// `cache.targeted_cache_control` (RFC 9213).
    pub(crate) targeted: Arc<[hyper::header::HeaderName]>,
}

/// A claimed block being written: the block, its data, bytes written.
type Writing = (Arc<Block>, BlockData, u64);

impl Fills {
    pub(crate) fn new(parts: FillParts, block_size: u64, orphan_fill_bytes: u64) -> Fills {
        let FillParts {
            objects,
            store,
            origin,
            learned,
            counters,
            statuses,
            targeted,
        } = parts;
        Fills {
            objects,
            store,
            origin,
            learned,
            counters,
            statuses,
            targeted,
            block_size,
            orphan_fill_bytes: AtomicU64::new(orphan_fill_bytes),
        }
    }

    /// The limit a reload changes.
    pub(crate) fn orphan_fill_bytes(&self) -> &AtomicU64 {
        &self.orphan_fill_bytes
    }

    /// Finds block `k`: stored (of whatever version: the caller compares),
    /// in flight, or by starting a fill for `k..=end_byte` (which becomes
    /// the reader's own fill).
    pub(crate) fn acquire(
        self: &Arc<Self>,
        plan: &Arc<Plan>,
        k: u32,
        end_byte: Option<u64>,
        own: &mut Option<Arc<Fill>>,
    ) -> Source {
        let (block, obj_id, end_byte) = match self.objects.find(&plan.key, k, end_byte) {
            Found::Source(s) => return s,
            Found::Claimed {
                block,
                obj_id,
                end_byte,
            } => (block, obj_id, end_byte),
        };
        let fill = Fill::new(k, block.clone());
        *own = Some(fill.clone());
        let fills = self.clone();
        let plan = plan.clone();
        let first = block.clone();
        self.counters.fill_started();
        tokio::spawn(async move {
            let result = fills.run(&plan, &fill, k, end_byte, obj_id, &first).await;
            if let Err(e) = result {
                fills.release_failed(&plan.key, &fill, &first, e);
            }
            fill.stop();
            fills.counters.fill_ended();
        });
        Source::Block(block)
    }

    /// Fails a block that was not finished; gives back the room reserved for
    /// it and deletes its `.part` file.
    fn abandon(&self, block: &Block, e: &Arc<FillError>) {
        let part = match &*block.state.borrow() {
            BlockState::Writing {
                data:
                    BlockData {
                        buf: Buf::File(_, path),
                        len,
                        ..
                    },
                ..
            } => Some((path.clone(), *len)),
            _ => None,
        };
        if let Some((path, len)) = part {
            self.objects.unreserve(len);
            let _ = std::fs::remove_file(&*path);
        }
        block.fail(e);
    }

    /// After a fill failed: fails the block it was writing (and its first
    /// block, if it never got the upstream's answer), and takes failed
    /// blocks out of the object. Blocks it finished stay: they are being
    /// stored.
    fn release_failed(&self, key: &str, fill: &Fill, first: &Block, e: FillError) {
        let e = Arc::new(e);
        let writing = lock(&fill.writing).take();
        if let Some(b) = writing {
            self.abandon(&b, &e);
        }
        self.abandon(first, &e);
        self.objects.forget_failed(key);
    }

    /// The fill task: one upstream request for blocks `first..` (to
    /// `end_byte`), claimed one at a time.
    async fn run(
        &self,
        plan: &Arc<Plan>,
        fill: &Arc<Fill>,
        first: u32,
        end_byte: Option<u64>,
        obj_id: u64,
        first_block: &Arc<Block>,
    ) -> Result<(), FillError> {
        let bs = self.block_size;
        let start = u64::from(first) * bs;
        let range = match end_byte {
            Some(e) => format!("bytes={start}-{e}"),
            None => format!("bytes={start}-"),
        };
        let labels = self.origin.labels(plan);
        let request_time = now_secs();
        let resp = self
            .origin
            .send(plan, hyper::Method::GET, (hyper::header::RANGE, range))
            .await
            .map_err(|e| FillError::Upstream(e.to_string()))?;
        let response_time = now_secs();
        let times = (request_time, response_time);
        let status = resp.status().as_u16();
        // The fields whose caching directives rule here (RFC 9213).
        let ruling = rfc9111::targeted(resp.headers(), &self.targeted).into_owned();
        let header = |name: hyper::header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header(hyper::header::CONTENT_TYPE);
        let cr = header(hyper::header::CONTENT_RANGE).unwrap_or_default();
        let content_range = range::parse_content_range(&cr);
        let content_length = header(hyper::header::CONTENT_LENGTH).and_then(|l| l.parse::<u64>().ok());
        // What the body holds: (first byte, end exclusive, object length).
        let held = match (status, content_range) {
            (206, Some((a, b, len))) => Some((a, b + 1, len)),
            (200, _) => content_length.map(|len| (0, len, Some(len))),
            _ => None,
        };
        // A response the cache cannot store goes to the request that started
        // the fill instead of being asked for again.
        let owner = Arc::as_ptr(fill) as usize;
        let hand_off = |resp: hyper::Response<hyper::body::Incoming>, why: String| {
            let (head, body) = resp.into_parts();
            let range = held;
            FillError::Uncacheable(why, Handoff::new(owner, Passed { head, body, range }))
        };
        let (body_start, body_end, length) = match (status, held) {
            (206 | 200, Some((a, e, Some(len)))) if a <= start && len > 0 => (a, e, len),
            (206 | 200, Some((_, _, None))) => {
                return Err(hand_off(resp, "upstream sent no object length".into()));
            }
            (206, Some((a, _, _))) => {
                // The origin skipped bytes the fill asked for: not stored.
                return Err(hand_off(
                    resp,
                    format!("upstream answered from byte {a} for a request from byte {start}"),
                ));
            }
            (206, None) => return Err(hand_off(resp, format!("upstream 206 with Content-Range {cr:?}"))),
            (200, None) => return Err(hand_off(resp, "upstream sent no Content-Length".into())),
            (416, _) => {
                let len = header(hyper::header::CONTENT_RANGE)
                    .and_then(|v| range::parse_unsatisfied(&v))
                    .unwrap_or(0);
                // An empty object has no byte 0 to ask for: pass it through.
                if len == 0 {
                    return Err(FillError::Uncacheable("empty object".into(), Handoff::default()));
                }
                return Err(FillError::Unsatisfiable(len));
            }
            // Another status: relayed with every end-to-end field. A body
            // known to be small goes to every request waiting on the fill;
            // a larger one, or one of unknown length, streams to the
            // request that started it (the others ask again).
            // An empty 200 has no byte range to store: kept as an answer.
            (204 | 304, _) | (200, Some((0, 0, Some(0)))) => {
                let headers = rfc9111::relayed_fields(resp.headers());
                self.keep_answer(plan, status, &headers, &ruling, Bytes::new(), times);
                return Err(FillError::Status {
                    status,
                    headers,
                    body: Bytes::new(),
                });
            }
            _ if content_length.is_some_and(|l| l <= STATUS_BODY_CAP as u64) => {
                let headers = rfc9111::relayed_fields(resp.headers());
                let body = read_capped(resp.into_body(), STATUS_BODY_CAP, self.origin.timeout()).await;
                if content_length == Some(body.len() as u64) {
                    self.keep_answer(plan, status, &headers, &ruling, body.clone(), times);
                }
                return Err(FillError::Status { status, headers, body });
            }
            _ => {
                return Err(hand_off(
                    resp,
                    format!("status {status}, body of unknown or large size"),
                ));
            }
        };
        // RFC 9111 §3: what a shared cache must not store. A reason in the
        // response holds for everyone for a while; one in the request only
        // for this request.
        if let Some(why) = rfc9111::not_storable(status, &ruling, &RequestRules::default(), false) {
            self.learned.mark_uncacheable(&plan.key);
            return Err(hand_off(resp, why));
        }
        if let Some(why) = rfc9111::not_storable(status, &ruling, &plan.rules, plan.authorized) {
            return Err(hand_off(resp, why));
        }
        let validator = Validator::of_response(
            header(hyper::header::ETAG).as_deref(),
            header(hyper::header::LAST_MODIFIED).as_deref(),
            length,
            plan.class == Class::Immutable,
            holdfast_model::random_u64(),
        );
        if plan.max_object_size.is_some_and(|m| length > m) {
            self.learned.mark_uncacheable(&plan.key);
            return Err(hand_off(
                resp,
                format!("object of {length} bytes is larger than max_object_size"),
            ));
        }
        if length == 0 {
            return Err(hand_off(resp, "empty object".into()));
        }
        if length.div_ceil(bs) > u64::from(u32::MAX) {
            return Err(hand_off(resp, format!("object of {length} bytes has too many blocks")));
        }
        if start >= length {
            return Err(FillError::Unsatisfiable(length));
        }
        // Without a strong validator the blocks of one version can only come
        // from one response (RFC 9111 §3.4): stored when this response holds
        // the whole object, else passed on and the next fill asks for all.
        if !validator.combinable() {
            self.learned.learn_whole(&plan.key);
            self.learned.learn_length(&plan.key, length);
            if start != 0 || body_start != 0 || body_end != length {
                return Err(hand_off(
                    resp,
                    "no strong validator: stored only when fetched whole".into(),
                ));
            }
        }
        let vary = rfc9111::vary_names(resp.headers()).map(|names| {
            self.learned.learn_vary(&plan.primary, &names);
            let values = rfc9111::selecting_values(&names, &plan.fields);
            Vary { names, values }
        });
        let meta = Arc::new(Meta {
            validator,
            content_type,
            fetched_at: response_time,
            class: plan.class,
            ttl: plan.ttl,
            freshness: Freshness::compute(
                &ruling,
                request_time,
                response_time,
                rfc9111::Operator {
                    immutable: plan.class == Class::Immutable,
                    ttl: u64::from(plan.ttl),
                },
            ),
            headers: Arc::new({
                let mut fields = rfc9111::stored_fields(resp.headers());
                rfc9111::age::record_date_in(&mut fields, response_time);
                fields
            }),
            vary,
        });
        let withheld = rfc9111::withheld_fields(resp.headers());
        if !withheld.is_empty() {
            *lock(&fill.withheld) = rfc9111::end_to_end(resp.headers())
                .filter(|(k, _)| withheld.iter().any(|w| w == k.as_str()))
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
        }
        // Bind the object to this version.
        let bound = self.objects.bind(&plan.key, &meta, obj_id, first, first_block, || {
            self.counters.event("invalidated");
        });
        let obj_id = bound.obj_id;
        // An answer of another status stored under the key is replaced.
        if self.statuses.get(&plan.key).is_some() {
            self.statuses.remove_where(|k| k == plan.key);
        }
        if let Some(rec) = bound.record {
            self.store.put_object(&plan.key, &rec);
        }
        if let Some(old) = bound.doomed {
            self.store.delete_later(None, old);
            self.objects.update_gauges();
        }
        // A version that cannot be combined with another fetch: this fill
        // claims all its blocks now, so readers wait for them.
        let whole = !meta.validator.combinable();
        let mut ahead = Ahead {
            objects: &self.objects,
            key: &plan.key,
            blocks: if !whole {
                Default::default()
            } else {
                let last = u32::try_from((length - 1) / bs).unwrap_or(u32::MAX);
                self.objects.claim_run(&plan.key, obj_id, first + 1, last)
            },
        };
        // Stream the body into blocks.
        let mut body = resp.into_body();
        let mut pos = body_start;
        // A 206 may end before what was asked, even inside a block: the
        // blocks it completes are stored; the one it leaves short fails, and
        // its readers start a new fill there.
        let end = body_end;
        let mut k = first;
        let public = self.objects.holds(&plan.key, obj_id, k, first_block);
        let mut current = Some(self.open_claimed(plan, fill, k, first_block.clone(), (&meta, obj_id, length), public));
        let mut orphan_bytes = 0u64;
        let timeout = self.origin.timeout();
        while pos < end {
            let frame = match tokio::time::timeout(timeout, body.frame()).await {
                Err(_) => {
                    return Err(FillError::Upstream(format!(
                        "upstream body stalled for {} ms",
                        timeout.as_millis()
                    )));
                }
                Ok(None) => {
                    return Err(FillError::Upstream(format!(
                        "upstream body ended at byte {pos} of {end}"
                    )));
                }
                Ok(Some(Err(e))) => return Err(FillError::Upstream(format!("upstream body: {e}"))),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            self.counters.upstream_bytes(&labels, data.len() as u64);
            // A 200 from an origin that ignores ranges: skip to our start.
            if pos < start {
                let skip = (start - pos).min(data.len() as u64) as usize;
                pos += skip as u64;
                let _ = data.split_to(skip);
            }
            while !data.is_empty() {
                let Some((block, bdata, written)) = current.as_mut() else {
                    return Ok(());
                };
                let block_start = u64::from(k) * bs;
                let take = (bdata.len - *written).min(data.len() as u64) as usize;
                let chunk = data.split_to(take);
                if let Err(e) = bdata.buf.write(*written, &chunk) {
                    self.counters.event("write-failed");
                    return Err(FillError::Upstream(format!("cache write: {e}")));
                }
                *written += take as u64;
                pos = block_start + *written;
                let w = *written;
                if w < bdata.len {
                    let d = bdata.clone();
                    block
                        .state
                        .send_modify(|s| *s = BlockState::Writing { data: d, written: w });
                    continue;
                }
                // The block is complete. Claim the next one before saying
                // so: a reader finishing this block must find the next one
                // taken by this fill, not start a second fetch for it.
                let (done, done_data) = (block.clone(), bdata.clone());
                let mut next = Claim::Stop;
                if pos < end {
                    let orphaned = Arc::strong_count(fill) == 1 && {
                        orphan_bytes += bs;
                        orphan_bytes > self.orphan_fill_bytes.load(Ordering::Relaxed)
                    };
                    if !orphaned {
                        next = match ahead.blocks.remove(&(k + 1)) {
                            Some(b) if self.objects.holds(&plan.key, obj_id, k + 1, &b) => Claim::Public(b),
                            Some(_) => Claim::Private,
                            None => match self.objects.claim(&plan.key, k + 1, obj_id) {
                                // Held by a fill of another version: this
                                // fill's reader still gets its bytes.
                                Claim::Stop if whole => Claim::Private,
                                c => c,
                            },
                        };
                        if matches!(next, Claim::Stop) {
                            fill.stop();
                        }
                    }
                }
                let d = done_data.clone();
                done.state.send_modify(|s| *s = BlockState::Done(d));
                if matches!(done_data.buf, Buf::File(..)) {
                    self.store.commit(
                        &self.objects,
                        &self.counters,
                        plan.key.clone(),
                        (obj_id, k),
                        done,
                        done_data,
                    );
                }
                k += 1;
                current = match next {
                    Claim::Stop => return Ok(()),
                    Claim::Public(b) => Some(self.open_claimed(plan, fill, k, b, (&meta, obj_id, length), true)),
                    Claim::Private => {
                        if !self.private_room(fill).await {
                            return Ok(());
                        }
                        Some(self.open_claimed(plan, fill, k, Block::new(), (&meta, obj_id, length), false))
                    }
                };
            }
        }
        match current {
            Some((_, bdata, written)) if written < bdata.len => Err(FillError::Upstream(format!(
                "upstream sent bytes {body_start}-{} of {length}; block {k} is fetched again",
                end.saturating_sub(1)
            ))),
            _ => Ok(()),
        }
    }

    /// Stores an answer that is not a byte range of an object (another
    /// status, or an empty 200) when RFC 9111 §3 allows; what the origin
    /// says now replaces an object stored under the key.
    fn keep_answer(
        &self,
        plan: &Plan,
        status: u16,
        relayed: &hyper::HeaderMap,
        ruling: &hyper::HeaderMap,
        body: Bytes,
        (request_time, response_time): (u64, u64),
    ) {
        if rfc9111::not_storable(status, ruling, &plan.rules, plan.authorized).is_some() {
            return;
        }
        let vary = rfc9111::vary_names(relayed).map(|names| {
            self.learned.learn_vary(&plan.primary, &names);
            let values = rfc9111::selecting_values(&names, &plan.fields);
            Vary { names, values }
        });
        let withheld = rfc9111::withheld_fields(relayed);
        let mut headers: Vec<(String, String)> = relayed
            .iter()
            .filter(|(k, _)| *k != hyper::header::AGE && !withheld.iter().any(|w| w == k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        rfc9111::age::record_date_in(&mut headers, response_time);
        let freshness = Freshness::compute(
            ruling,
            request_time,
            response_time,
            rfc9111::Operator {
                immutable: plan.class == Class::Immutable,
                ttl: u64::from(plan.ttl),
            },
        );
        let evicted = self.statuses.put(
            &plan.key,
            Answer {
                head: Head {
                    status,
                    headers,
                    freshness,
                    vary,
                },
                body,
            },
        );
        self.counters.event("stored-answer");
        for _ in 0..evicted {
            self.counters.event("evicted-answer");
        }
        let (removed, _) = self.objects.remove_where(|k| k == plan.key);
        for (k, id) in removed {
            self.store.delete_later(Some(k), id);
            self.objects.update_gauges();
        }
    }

    /// Waits until the fill's reader has taken enough private blocks; false
    /// when the reader is gone (nobody else can use them).
    async fn private_room(&self, fill: &Arc<Fill>) -> bool {
        let mut rx = fill.cursor.subscribe();
        loop {
            if Arc::strong_count(fill) == 1 {
                return false;
            }
            if lock(&fill.blocks).len() < PRIVATE_AHEAD {
                return true;
            }
            // The reader takes blocks; poll its progress without spinning.
            let _ = tokio::time::timeout(Duration::from_millis(20), rx.changed()).await;
        }
    }

    /// Gives claimed block `k` of version `meta`, object `obj_id` (`length`
    /// bytes long), its buffer (a file when `public` and admitted) and makes it visible to
    /// readers.
    fn open_claimed(
        &self,
        plan: &Plan,
        fill: &Fill,
        k: u32,
        block: Arc<Block>,
        (meta, obj_id, length): (&Arc<Meta>, u64, u64),
        public: bool,
    ) -> Writing {
        let bs = self.block_size;
        let len = (length - u64::from(k) * bs).min(bs);
        let buf = self
            .store
            .buffer(&self.objects, &self.counters, &plan.key, (obj_id, k, len), public);
        if public && !matches!(buf, Buf::File(..)) {
            self.objects.unclaim(&plan.key, k, &block);
        }
        let data = BlockData {
            meta: meta.clone(),
            len,
            buf,
        };
        let d = data.clone();
        block
            .state
            .send_modify(|s| *s = BlockState::Writing { data: d, written: 0 });
        lock(&fill.blocks).insert(k, block.clone());
        *lock(&fill.writing) = Some(block.clone());
        fill.cursor.send_modify(|c| c.0 = c.0.max(k + 1));
        (block, data, 0)
    }
}

/// Up to `cap` bytes of a body, as they come within `timeout` each.
async fn read_capped(mut body: hyper::body::Incoming, cap: usize, timeout: Duration) -> Bytes {
    let mut out = Vec::new();
    while out.len() < cap {
        match tokio::time::timeout(timeout, body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    let take = d.len().min(cap - out.len());
                    out.extend_from_slice(&d[..take]);
                }
            }
            _ => break,
        }
    }
    Bytes::from(out)
}

/// The blocks a fill of a whole object claimed ahead and has not reached:
/// failed and given back when the fill ends, so their readers ask again.
struct Ahead<'a> {
    objects: &'a Objects,
    key: &'a str,
    blocks: std::collections::BTreeMap<u32, Arc<Block>>,
}

impl Drop for Ahead<'_> {
    fn drop(&mut self) {
        if self.blocks.is_empty() {
            return;
        }
        let e = Arc::new(FillError::Upstream("the fill stopped before this block".into()));
        for (k, b) in std::mem::take(&mut self.blocks) {
            b.fail(&e);
            self.objects.unclaim(self.key, k, &b);
        }
    }
}
