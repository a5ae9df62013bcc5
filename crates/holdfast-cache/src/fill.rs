//! Fills: claiming blocks, fetching an aligned run from upstream, streaming it to readers and committing it.

#[allow(unused_imports)]
use super::*;

impl Cache {
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
        let mut guard = lock(&self.inner);
        let o = guard.entry(&plan.key);
        // A stored block of another version is returned as it is: the
        // reader sees the version differs and never mixes the two.
        if let Some(meta) = &o.meta
            && o.stored.contains_key(&k)
        {
            return Source::Stored {
                id: o.id,
                meta: meta.clone(),
            };
        }
        if let Some(b) = o.inflight.get(&k) {
            return Source::Block(b.clone());
        }
        // Fetch only up to the next block already stored or being fetched.
        let bs = self.cfg.block_size;
        let next_held = o
            .stored
            .range(k + 1..)
            .next()
            .map(|(i, _)| *i)
            .into_iter()
            .chain(o.inflight.keys().copied().filter(|&i| i > k))
            .min();
        let end_byte = match next_held {
            Some(n) => {
                let before = u64::from(n) * bs - 1;
                Some(end_byte.map_or(before, |e| e.min(before)))
            }
            None => end_byte,
        };
        let block = Block::new();
        o.inflight.insert(k, block.clone());
        let obj_id = o.id;
        drop(guard);
        let fill = Arc::new(Fill {
            blocks: Mutex::new(BTreeMap::from([(k, block.clone())])),
            cursor: watch::Sender::new((k + 1, false)),
            writing: Mutex::new(None),
        });
        *own = Some(fill.clone());
        let cache = self.clone();
        let plan = plan.clone();
        let first = block.clone();
        self.metrics.cache_fills.inc();
        tokio::spawn(async move {
            let result = cache.run_fill(&plan, &fill, k, end_byte, obj_id, &first).await;
            if let Err(e) = result {
                cache.release_failed(&plan.key, &fill, &first, e);
            }
            fill.cursor.send_modify(|c| c.1 = true);
            cache.metrics.cache_fills.dec();
        });
        Source::Block(block)
    }

    /// Fails a block that was not finished; gives back the room reserved for
    /// it and deletes its `.part` file.
    pub(crate) fn abandon(&self, block: &Block, e: &Arc<FillError>) {
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
            let mut inner = lock(&self.inner);
            inner.reserved_bytes = inner.reserved_bytes.saturating_sub(len);
            drop(inner);
            let _ = std::fs::remove_file(&*path);
        }
        block.fail(e);
    }

    /// After a fill failed: fails the block it was writing (and its first
    /// block, if it never got the upstream's answer), and takes failed
    /// blocks out of the object. Blocks it finished stay: they are being
    /// stored.
    pub(crate) fn release_failed(&self, key: &str, fill: &Fill, first: &Block, e: FillError) {
        let e = Arc::new(e);
        let writing = lock(&fill.writing).take();
        if let Some(b) = writing {
            self.abandon(&b, &e);
        }
        self.abandon(first, &e);
        let mut inner = lock(&self.inner);
        if let Some(o) = inner.objects.get_mut(key) {
            o.inflight.retain(|_, b| !failed(b));
        }
        inner.forget_if_empty(key);
    }

    /// The fill task: one upstream request for blocks `first..` (to
    /// `end_byte`), claimed one at a time.
    pub(crate) async fn run_fill(
        self: &Arc<Self>,
        plan: &Arc<Plan>,
        fill: &Arc<Fill>,
        first: u32,
        end_byte: Option<u64>,
        obj_id: u64,
        first_block: &Arc<Block>,
    ) -> Result<(), FillError> {
        let bs = self.cfg.block_size;
        let start = u64::from(first) * bs;
        let range = match end_byte {
            Some(e) => format!("bytes={start}-{e}"),
            None => format!("bytes={start}-"),
        };
        let labels = self.upstream_labels(plan);
        let request_time = now_secs();
        let resp = self
            .upstream(plan, hyper::Method::GET, (hyper::header::RANGE, range))
            .await
            .map_err(|e| FillError::Upstream(e.to_string()))?;
        let response_time = now_secs();
        let status = resp.status().as_u16();
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
            (206 | 200, Some((a, e, Some(len)))) if a <= start => (a, e, len),
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
            _ => {
                let headers = rfc9111::stored_fields(resp.headers());
                let body = read_capped(resp.into_body(), 64 << 10, self.client.timeout()).await;
                return Err(FillError::Status {
                    status,
                    content_type,
                    headers,
                    body,
                });
            }
        };
        // RFC 9111 §3: what a shared cache must not store. A reason in the
        // response holds for everyone for a while; one in the request only
        // for this request.
        if let Some(why) = rfc9111::not_storable(status, resp.headers(), &RequestRules::default(), false) {
            self.mark_uncacheable(&plan.key);
            return Err(hand_off(resp, why));
        }
        if let Some(why) = rfc9111::not_storable(status, resp.headers(), &plan.rules, plan.authorized) {
            return Err(hand_off(resp, why));
        }
        let Some(validator) = Validator::new(
            header(hyper::header::ETAG).as_deref(),
            header(hyper::header::LAST_MODIFIED).as_deref(),
            length,
        ) else {
            self.mark_uncacheable(&plan.key);
            return Err(hand_off(resp, "upstream sent no strong validator".into()));
        };
        if plan.max_object_size.is_some_and(|m| length > m) {
            self.mark_uncacheable(&plan.key);
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
        let vary = rfc9111::vary_names(resp.headers()).map(|names| {
            self.learn_vary(&plan.primary, &names);
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
                resp.headers(),
                request_time,
                response_time,
                rfc9111::Operator {
                    immutable: plan.class == Class::Immutable,
                    ttl: u64::from(plan.ttl),
                },
            ),
            headers: Arc::new(rfc9111::stored_fields(resp.headers())),
            vary,
        });
        // Bind the object to this version.
        let (obj_id, doomed, record) = {
            let mut inner = lock(&self.inner);
            let mut doomed = None;
            let same = inner
                .objects
                .get(&plan.key)
                .and_then(|o| o.meta.as_ref())
                .map(|m| m.validator.same_version(&meta.validator));
            if same == Some(false) {
                doomed = inner.invalidate(&plan.key);
                self.event("invalidated");
            }
            let bs = self.cfg.block_size;
            match inner.objects.get_mut(&plan.key) {
                Some(o) => {
                    let refresh = same != Some(true) || plan.class == Class::Revalidate;
                    if refresh {
                        o.meta = Some(meta.clone());
                    }
                    // A fill that started before an invalidation it caused
                    // claims its first block again under the new id.
                    if o.id != obj_id && same != Some(true) {
                        o.inflight.entry(first).or_insert_with(|| first_block.clone());
                    }
                    let record = refresh.then(|| o.record(&meta, bs));
                    (o.id, doomed, record)
                }
                None => (u64::MAX, doomed, None),
            }
        };
        if let Some(rec) = record {
            let _ = disk::put_object(&self.index, &plan.key, &rec);
        }
        if let Some(old) = doomed {
            self.delete_later(None, old);
        }
        // Stream the body into blocks.
        let mut body = resp.into_body();
        let mut pos = body_start;
        // A 206 may end before what was asked, even inside a block: the
        // blocks it completes are stored; the one it leaves short fails, and
        // its readers start a new fill there.
        let end = body_end;
        let mut k = first;
        let public = {
            let inner = lock(&self.inner);
            inner
                .objects
                .get(&plan.key)
                .is_some_and(|o| o.id == obj_id && o.inflight.get(&k).is_some_and(|b| Arc::ptr_eq(b, first_block)))
        };
        let mut current = Some(self.open_claimed(plan, fill, k, first_block.clone(), &meta, obj_id, length, public));
        let mut orphan_bytes = 0u64;
        let timeout = self.client.timeout();
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
            self.metrics
                .cache_upstream_bytes
                .get_or_create(&labels)
                .inc_by(data.len() as u64);
            self.totals
                .upstream_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
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
                    self.event("write-failed");
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
                        next = self.try_claim(plan, fill, k + 1, obj_id);
                    }
                }
                let d = done_data.clone();
                done.state.send_modify(|s| *s = BlockState::Done(d));
                if matches!(done_data.buf, Buf::File(..)) {
                    self.commit_block(plan.key.clone(), obj_id, k, done, done_data);
                }
                k += 1;
                current = match next {
                    Claim::Stop => return Ok(()),
                    Claim::Public(b) => Some(self.open_claimed(plan, fill, k, b, &meta, obj_id, length, true)),
                    Claim::Private => {
                        if !self.private_room(fill).await {
                            return Ok(());
                        }
                        Some(self.open_claimed(plan, fill, k, Block::new(), &meta, obj_id, length, false))
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

    /// A buffer for block `k`: a `.part` file when it will be stored (room
    /// admitted), memory otherwise.
    pub(crate) fn buffer(
        &self,
        plan: &Plan,
        k: u32,
        meta: &Arc<Meta>,
        obj_id: u64,
        length: u64,
        public: bool,
    ) -> BlockData {
        let bs = self.cfg.block_size;
        let len = (length - u64::from(k) * bs).min(bs);
        let buf = if public && self.admit(&plan.key, len) {
            let path = disk::part_path(&self.dir, obj_id, k);
            let file = std::fs::create_dir_all(disk::obj_dir(&self.dir, obj_id)).and_then(|()| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
            });
            match file {
                Ok(f) => Buf::File(Arc::new(f), Arc::new(path)),
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "cache: cannot create block file; serving without storing");
                    self.event("write-failed");
                    lock(&self.inner).reserved_bytes -= len;
                    Buf::Mem(Arc::new(RwLock::new(Vec::with_capacity(len as usize))))
                }
            }
        } else {
            Buf::Mem(Arc::new(RwLock::new(Vec::with_capacity(len as usize))))
        };
        BlockData {
            meta: meta.clone(),
            len,
            buf,
        }
    }

    /// Claims block `k` for the fill: public if the object is still this
    /// version and nobody holds `k`; stop if someone does; private if the
    /// object moved on (then only this fill's reader reads it).
    pub(crate) fn try_claim(&self, plan: &Plan, fill: &Fill, k: u32, obj_id: u64) -> Claim {
        let mut inner = lock(&self.inner);
        match inner.objects.get_mut(&plan.key) {
            Some(o) if o.id == obj_id => {
                if o.stored.contains_key(&k) || o.inflight.contains_key(&k) {
                    drop(inner);
                    fill.cursor.send_modify(|c| c.1 = true);
                    return Claim::Stop;
                }
                let block = Block::new();
                o.inflight.insert(k, block.clone());
                Claim::Public(block)
            }
            _ => Claim::Private,
        }
    }

    /// Waits until the fill's reader has taken enough private blocks; false
    /// when the reader is gone (nobody else can use them).
    pub(crate) async fn private_room(&self, fill: &Arc<Fill>) -> bool {
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

    /// Gives a claimed block its buffer (a file when `public` and admitted)
    /// and makes it visible to readers.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open_claimed(
        &self,
        plan: &Plan,
        fill: &Fill,
        k: u32,
        block: Arc<Block>,
        meta: &Arc<Meta>,
        obj_id: u64,
        length: u64,
        public: bool,
    ) -> (Arc<Block>, BlockData, u64) {
        let data = self.buffer(plan, k, meta, obj_id, length, public);
        if public && !matches!(data.buf, Buf::File(..)) {
            let mut inner = lock(&self.inner);
            if let Some(o) = inner.objects.get_mut(&plan.key)
                && o.inflight.get(&k).is_some_and(|b| Arc::ptr_eq(b, &block))
            {
                o.inflight.remove(&k);
            }
        }
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

pub(crate) async fn read_capped(mut body: hyper::body::Incoming, cap: usize, timeout: Duration) -> Bytes {
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
