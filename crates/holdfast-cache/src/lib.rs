//! # holdfast-cache
//!
//! The in-network HTTP range cache (ARCHITECTURE §8, docs/cache.md).
//!
//! Objects are stored in fixed aligned blocks. A request is served block by
//! block: a stored block is read from its file; a block being fetched is
//! streamed from the fill writing it (readers wait on a `watch` of the bytes
//! written, no polling); a missing block starts a fill. A fill is one
//! upstream request for an aligned run of blocks; it claims each block only
//! when it reaches it, so a client asking for a later part of the same cold
//! object starts its own fill there instead of waiting, and a fill stops
//! where another one already holds the next block. Concurrent misses for the
//! same block therefore become one upstream fetch.
//!
//! Every object is bound to a strong validator. A fill whose response names
//! another version invalidates the object (new id, old blocks deleted); a
//! reader pinned to the old version never reads a block of the new one. A
//! fill that started under the old version keeps streaming it to the client
//! that started it, without storing it.

pub mod config;
pub mod disk;
pub mod http;
pub mod path;
pub mod range;
pub mod upstream;

use holdfast_model::lock;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::watch;

use self::disk::{Class, Index, ObjRecord};
use self::range::Validator;
use self::upstream::{Client, Endpoint};
use crate::config::CacheConfig;
use holdfast_metrics::{CacheLabels, CacheUpstreamLabels, EventLabels, Metrics};
use holdfast_store::{Store, StoreError};

/// How long an object found uncacheable (no validator, too large) is passed
/// through without trying to cache it again.
const UNCACHEABLE_FOR: Duration = Duration::from_secs(60);
/// Most keys remembered as uncacheable at once.
const MAX_UNCACHEABLE: usize = 4096;
/// Most distinct `source` label values; more are counted as `other`.
const MAX_SOURCES: usize = 64;
/// Reads of stored blocks up to this size are done on the async task.
const SMALL_READ: u64 = 1 << 20;
/// Most private (unstored) blocks a fill keeps ahead of its reader.
const PRIVATE_AHEAD: usize = 2;

/// The version an object's blocks belong to, and how it is kept fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Strong validator and length.
    pub validator: Validator,
    /// Content-Type from the origin.
    pub content_type: Option<String>,
    /// When the origin last confirmed it, Unix seconds.
    pub fetched_at: u64,
    /// Freshness class.
    pub class: Class,
    /// Freshness lifetime for `revalidate`, seconds.
    pub ttl: u32,
}

impl Meta {
    fn fresh(&self, now: u64) -> bool {
        self.class == Class::Immutable || now < self.fetched_at.saturating_add(u64::from(self.ttl))
    }
}

/// How the content-source plugin said to cache a request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where to fetch from.
    pub origin: Endpoint,
    /// Path and query at the origin.
    pub origin_path: String,
    /// Cache key.
    pub key: String,
    /// Freshness class.
    pub class: Class,
    /// Freshness lifetime, seconds.
    pub ttl: u32,
    /// Larger objects are passed through.
    pub max_object_size: Option<u64>,
    /// The `source` metric label.
    pub source: String,
}

/// Why a fill produced no data.
#[derive(Debug, Clone)]
pub enum FillError {
    /// The upstream could not be reached or failed mid-way.
    Upstream(String),
    /// The upstream answered with an error status; passed on as-is.
    Status {
        /// Status code.
        status: u16,
        /// Its Content-Type.
        content_type: Option<String>,
        /// Its body (at most 64 KiB).
        body: Bytes,
    },
    /// The range starts past the end of an object of this length.
    Unsatisfiable(u64),
    /// The object cannot be cached (no strong validator, too large, no
    /// length): pass the request through.
    Uncacheable(String),
    /// The object changed while a response for the old version was going out.
    VersionChanged,
}

/// Where a block's bytes are while it is being fetched.
#[derive(Clone)]
enum Buf {
    /// A `.part` file (stored once complete), and its path.
    File(Arc<File>, Arc<PathBuf>),
    /// Memory, for a block that is not stored (version changed, no room).
    Mem(Arc<RwLock<Vec<u8>>>),
}

impl Buf {
    fn read(&self, from: u64, to: u64) -> std::io::Result<Bytes> {
        match self {
            Buf::File(f, _) => {
                let mut v = vec![0u8; (to - from) as usize];
                f.read_exact_at(&mut v, from)?;
                Ok(Bytes::from(v))
            }
            Buf::Mem(m) => {
                let m = m.read().unwrap_or_else(|p| p.into_inner());
                Ok(Bytes::copy_from_slice(&m[from as usize..to as usize]))
            }
        }
    }

    fn write(&self, at: u64, data: &[u8]) -> std::io::Result<()> {
        match self {
            Buf::File(f, _) => f.write_all_at(data, at),
            Buf::Mem(m) => {
                m.write().unwrap_or_else(|p| p.into_inner()).extend_from_slice(data);
                Ok(())
            }
        }
    }
}

/// The data of a block once its fill has the upstream's answer.
#[derive(Clone)]
struct BlockData {
    meta: Arc<Meta>,
    len: u64,
    buf: Buf,
}

#[derive(Clone)]
enum BlockState {
    /// The fill is waiting for the upstream's response head.
    Waiting,
    /// Bytes `0..written` are in `data`.
    Writing { data: BlockData, written: u64 },
    /// All bytes are in `data`.
    Done(BlockData),
    /// The fill failed before finishing this block.
    Failed(Arc<FillError>),
}

/// A block being fetched.
struct Block {
    state: watch::Sender<BlockState>,
}

impl Block {
    fn new() -> Arc<Block> {
        Arc::new(Block {
            state: watch::Sender::new(BlockState::Waiting),
        })
    }

    fn fail(&self, e: &Arc<FillError>) {
        self.state.send_if_modified(|s| {
            if matches!(s, BlockState::Done(_) | BlockState::Failed(_)) {
                false
            } else {
                *s = BlockState::Failed(e.clone());
                true
            }
        });
    }

    /// Waits for the response head: the version, or the failure.
    async fn meta(&self) -> Result<Arc<Meta>, Arc<FillError>> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                BlockState::Waiting => {}
                BlockState::Writing { data, .. } | BlockState::Done(data) => return Ok(data.meta.clone()),
                BlockState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(Arc::new(FillError::Upstream("fill ended".into())));
            }
        }
    }
}

/// One upstream request filling a run of blocks.
struct Fill {
    /// Blocks this fill claimed (public and private) that its reader has
    /// not taken yet.
    blocks: Mutex<BTreeMap<u32, Arc<Block>>>,
    /// Next block it will claim, and whether it stopped.
    cursor: watch::Sender<(u32, bool)>,
    /// The block it is writing: failed if the fill fails.
    writing: Mutex<Option<Arc<Block>>>,
}

impl Fill {
    /// Puts back a block the reader looked at before it needs it.
    fn keep(&self, k: u32, block: Arc<Block>) {
        lock(&self.blocks).insert(k, block);
    }

    /// The block `k` if this fill claims it (waiting until it gets there);
    /// `None` once it stopped before `k`.
    async fn take(&self, k: u32) -> Option<Arc<Block>> {
        let mut rx = self.cursor.subscribe();
        loop {
            let (next, stopped) = *rx.borrow_and_update();
            if next > k || stopped || rx.changed().await.is_err() {
                let mut blocks = lock(&self.blocks);
                let b = blocks.remove(&k);
                // The reader moves forward: earlier blocks are not wanted.
                blocks.retain(|&i, _| i > k);
                return b;
            }
        }
    }
}

/// What a fill may do with its next block.
enum Claim {
    /// Stored or fetched into storage by this fill.
    Public(Arc<Block>),
    /// Fetched for this fill's reader only.
    Private,
    /// Someone else has it, or nobody needs it: the fill ends.
    Stop,
}

/// One cached object in memory.
#[derive(Default)]
struct Obj {
    id: u64,
    meta: Option<Arc<Meta>>,
    stored: BTreeMap<u32, u64>,
    inflight: HashMap<u32, Arc<Block>>,
    readers: usize,
    tick: u64,
    persisted_use: u64,
    revalidating: Option<watch::Receiver<bool>>,
}

impl Obj {
    fn stored_bytes(&self) -> u64 {
        self.stored.values().sum()
    }

    fn record(&self, meta: &Meta, block_size: u64) -> ObjRecord {
        ObjRecord {
            id: self.id,
            validator: meta.validator.clone(),
            content_type: meta.content_type.clone(),
            fetched_at: meta.fetched_at,
            class: meta.class,
            ttl: meta.ttl,
            last_used: now_secs(),
            block_size,
        }
    }
}

#[derive(Default)]
struct Inner {
    objects: HashMap<String, Obj>,
    lru: BTreeSet<(u64, String)>,
    tick: u64,
    stored_bytes: u64,
    reserved_bytes: u64,
    next_id: u64,
}

impl Inner {
    fn touch(&mut self, key: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(o) = self.objects.get_mut(key) {
            self.lru.remove(&(o.tick, key.to_string()));
            o.tick = tick;
            self.lru.insert((tick, key.to_string()));
        }
    }

    /// The object under `key`, created (empty, with a fresh id) if absent.
    fn entry(&mut self, key: &str) -> &mut Obj {
        let next_id = &mut self.next_id;
        self.objects.entry(key.to_string()).or_insert_with(|| {
            let id = *next_id;
            *next_id += 1;
            Obj { id, ..Obj::default() }
        })
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Drops the object's blocks and version; returns the old id to delete.
    fn invalidate(&mut self, key: &str) -> Option<u64> {
        let id = self.new_id();
        let o = self.objects.get_mut(key)?;
        let old = o.id;
        self.stored_bytes -= o.stored_bytes();
        o.stored.clear();
        o.inflight.clear();
        o.meta = None;
        o.id = id;
        Some(old)
    }

    /// Removes an object that holds nothing and nobody uses.
    fn forget_if_empty(&mut self, key: &str) {
        let empty = self
            .objects
            .get(key)
            .is_some_and(|o| o.readers == 0 && o.meta.is_none() && o.inflight.is_empty() && o.stored.is_empty());
        if empty && let Some(o) = self.objects.remove(key) {
            self.lru.remove(&(o.tick, key.to_string()));
        }
    }
}

/// What a reader gets for one block.
enum Source {
    Stored { id: u64, meta: Arc<Meta> },
    Block(Arc<Block>),
}

/// A stored-object summary for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObjectInfo {
    /// Cache key.
    pub key: String,
    /// Object length, if known.
    pub length: Option<u64>,
    /// ETag.
    pub etag: Option<String>,
    /// Bytes stored.
    pub stored_bytes: u64,
    /// Blocks stored.
    pub blocks: usize,
    /// `immutable` or `revalidate`.
    pub class: Option<Class>,
}

/// Cache totals for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    /// Where the listener is bound.
    pub listen: Option<String>,
    /// Block size.
    pub block_size: u64,
    /// Objects.
    pub objects: usize,
    /// Bytes stored.
    pub stored_bytes: u64,
    /// Bytes of blocks being fetched into storage.
    pub reserved_bytes: u64,
    /// `cache.max_size`.
    pub max_size: u64,
    /// `cache.min_free`.
    pub min_free: u64,
    /// Free bytes on the cache's file system.
    pub free_bytes: Option<u64>,
    /// Fills running.
    pub fills_in_flight: i64,
    /// The parent cache, if any.
    pub parent: Option<String>,
    /// Requests answered from storage or through a fill since start (not
    /// counted: refused, passed through, failed).
    pub requests: u64,
    /// Of those, answered wholly from storage.
    pub hit_requests: u64,
    /// Bytes sent to clients from storage since start.
    pub hit_bytes: u64,
    /// Bytes sent to clients as they were fetched since start.
    pub miss_bytes: u64,
    /// Bytes fetched from origins or the parent for storage since start.
    pub upstream_bytes: u64,
    /// `hit_bytes / (hit_bytes + miss_bytes)`; `None` before the first byte.
    pub byte_hit_ratio: Option<f64>,
    /// Bytes sent to clients that did not cross the upstream link for
    /// them: what was served from storage (`hit_bytes`). Bytes a client read
    /// from a fill another client started are not counted, so this is a
    /// lower bound.
    pub saved_bytes: u64,
}

/// The range cache.
pub struct Cache {
    cfg: CacheConfig,
    dir: PathBuf,
    index: Index,
    inner: Mutex<Inner>,
    client: Client,
    metrics: Arc<Metrics>,
    /// This node's `CDN-Loop` / `Via` token.
    token: String,
    sources: Mutex<BTreeSet<String>>,
    listen: Mutex<Option<String>>,
    /// Objects found uncacheable, until when.
    uncacheable: Mutex<HashMap<String, Instant>>,
    /// Makes multipart boundaries unique.
    boundary_seq: AtomicU64,
    /// Totals since start for the status page.
    totals: Totals,
    /// `cache.max_size`, `cache.min_free` and `cache.orphan_fill_bytes`,
    /// which a config reload changes (`apply_limits`).
    max_size: AtomicU64,
    min_free: AtomicU64,
    orphan_fill_bytes: AtomicU64,
}

/// Request and byte totals since start, all sources together (the metrics
/// have them by source; these are summed for the status page).
#[derive(Debug, Default)]
struct Totals {
    requests: AtomicU64,
    hit_requests: AtomicU64,
    hit_bytes: AtomicU64,
    miss_bytes: AtomicU64,
    upstream_bytes: AtomicU64,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Errors opening the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The index.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The block directory or the TLS roots.
    #[error("cache: {0}")]
    Setup(String),
}

/// Clears a reader's pin on an object when dropped.
struct Pin {
    cache: Arc<Cache>,
    key: String,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut inner = lock(&self.cache.inner);
        if let Some(o) = inner.objects.get_mut(&self.key) {
            o.readers = o.readers.saturating_sub(1);
        }
        inner.forget_if_empty(&self.key);
    }
}

impl Cache {
    /// Opens the index and block directory (blocking: call from a blocking
    /// task) and deletes block files the index does not name.
    ///
    /// # Errors
    /// [`CacheError`].
    pub fn open(
        cfg: &CacheConfig,
        dir: PathBuf,
        store: &Store,
        node_id: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Cache, CacheError> {
        std::fs::create_dir_all(&dir).map_err(|e| CacheError::Setup(format!("{}: {e}", dir.display())))?;
        let index = Index::open(store)?;
        let loaded = disk::load(&index, &dir, cfg.block_size)?;
        if loaded.removed_files > 0 {
            tracing::info!(
                removed = loaded.removed_files,
                "cache: deleted block files the index does not name"
            );
        }
        let mut inner = Inner {
            next_id: loaded.next_id,
            ..Inner::default()
        };
        let mut objects = loaded.objects;
        objects.sort_by_key(|(_, rec, _)| rec.last_used);
        for (key, rec, stored) in objects {
            inner.tick += 1;
            let obj = Obj {
                id: rec.id,
                meta: Some(Arc::new(Meta {
                    validator: rec.validator,
                    content_type: rec.content_type,
                    fetched_at: rec.fetched_at,
                    class: rec.class,
                    ttl: rec.ttl,
                })),
                stored,
                tick: inner.tick,
                persisted_use: rec.last_used,
                ..Obj::default()
            };
            inner.stored_bytes += obj.stored_bytes();
            inner.lru.insert((inner.tick, key.clone()));
            inner.objects.insert(key, obj);
        }
        let parent = match &cfg.parent {
            Some(p) => Some(Endpoint::parse(p).map_err(CacheError::Setup)?),
            None => None,
        };
        let client = Client::new(
            parent,
            Duration::from_millis(cfg.upstream_timeout_ms),
            cfg.ca_file.as_deref(),
        )
        .map_err(CacheError::Setup)?;
        metrics.cache_stored_bytes.set(inner.stored_bytes as i64);
        metrics.cache_objects.set(inner.objects.len() as i64);
        let token: String = node_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Ok(Cache {
            cfg: cfg.clone(),
            dir,
            index,
            inner: Mutex::new(inner),
            client,
            metrics,
            token: format!("holdfast-{token}"),
            sources: Mutex::new(BTreeSet::new()),
            listen: Mutex::new(None),
            uncacheable: Mutex::new(HashMap::new()),
            boundary_seq: AtomicU64::new(0),
            totals: Totals::default(),
            max_size: AtomicU64::new(cfg.max_size),
            min_free: AtomicU64::new(cfg.min_free),
            orphan_fill_bytes: AtomicU64::new(cfg.orphan_fill_bytes),
        })
    }

    /// The block size.
    pub fn block_size(&self) -> u64 {
        self.cfg.block_size
    }

    /// The upstream client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// This node's loop-guard token (`holdfast-<node id>`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Records where the listener is bound.
    pub fn set_listen(&self, addr: String) {
        *lock(&self.listen) = Some(addr);
    }

    pub(crate) fn event(&self, event: &'static str) {
        self.metrics.cache_events.get_or_create(&EventLabels { event }).inc();
    }

    /// Applies the limits a running cache can change: `cache.max_size`,
    /// `cache.min_free` (both checked as each block is admitted; a lower
    /// budget evicts as new blocks come in) and `cache.orphan_fill_bytes`.
    /// Returns the keys that changed.
    pub fn apply_limits(&self, new: &CacheConfig) -> Vec<String> {
        holdfast_model::store_limits(&[
            // At least one block of the size this cache runs with.
            ("cache.max_size", &self.max_size, new.max_size.max(self.cfg.block_size)),
            ("cache.min_free", &self.min_free, new.min_free),
            (
                "cache.orphan_fill_bytes",
                &self.orphan_fill_bytes,
                new.orphan_fill_bytes,
            ),
        ])
    }

    /// Counts a request by its result (`hit`, `miss`, `partial`, `pass`,
    /// `denied`, `error`, …).
    pub(crate) fn count_request(&self, source: &str, client: &'static str, result: &'static str) {
        self.metrics
            .cache_requests
            .get_or_create(&CacheLabels {
                source: source.to_string(),
                client,
                result,
            })
            .inc();
        if matches!(result, "hit" | "miss" | "partial") {
            self.totals.requests.fetch_add(1, Ordering::Relaxed);
        }
        if result == "hit" {
            self.totals.hit_requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts bytes sent to a client from storage (`hit`) and from fills
    /// (`miss`).
    pub(crate) fn count_served(&self, source: &str, client: &'static str, hit: u64, miss: u64) {
        for (result, n) in [("hit", hit), ("miss", miss)] {
            if n > 0 {
                self.metrics
                    .cache_bytes
                    .get_or_create(&CacheLabels {
                        source: source.to_string(),
                        client,
                        result,
                    })
                    .inc_by(n);
            }
        }
        self.totals.hit_bytes.fetch_add(hit, Ordering::Relaxed);
        self.totals.miss_bytes.fetch_add(miss, Ordering::Relaxed);
    }

    /// The `source` label for a key: its namespace before `:`, capped in
    /// number.
    pub fn source_label(&self, key: &str) -> String {
        let name = key.split_once(':').map_or("default", |(n, _)| n);
        let name: String = name.chars().take(40).collect();
        let mut s = lock(&self.sources);
        if s.contains(&name) {
            return name;
        }
        if s.len() >= MAX_SOURCES {
            return "other".into();
        }
        s.insert(name.clone());
        name
    }

    fn upstream_label(&self) -> &'static str {
        if self.client.via_parent() { "parent" } else { "origin" }
    }

    /// Headers every upstream request carries: the loop guard, identity
    /// encoding (ranges of an encoded body are not ranges of the object).
    pub fn upstream_headers(
        &self,
        via: Option<&str>,
        cdn_loop: Option<&str>,
    ) -> Vec<(hyper::header::HeaderName, String)> {
        let mine_via = format!("1.1 {}", self.token);
        let via = match via {
            Some(v) if !v.is_empty() => format!("{v}, {mine_via}"),
            _ => mine_via,
        };
        let cdn = match cdn_loop {
            Some(v) if !v.is_empty() => format!("{v}, {}", self.token),
            _ => self.token.clone(),
        };
        vec![
            (hyper::header::VIA, via),
            (hyper::header::HeaderName::from_static("cdn-loop"), cdn),
            (hyper::header::ACCEPT_ENCODING, "identity".into()),
            (
                hyper::header::USER_AGENT,
                concat!("holdfast/", env!("CARGO_PKG_VERSION")).into(),
            ),
        ]
    }

    fn upstream_labels(&self, plan: &Plan) -> CacheUpstreamLabels {
        CacheUpstreamLabels {
            source: plan.source.clone(),
            upstream: self.upstream_label(),
        }
    }

    /// Sends one request for the plan's object upstream (counted), with the
    /// standard headers and one more.
    async fn upstream(
        &self,
        plan: &Plan,
        method: hyper::Method,
        extra: (hyper::header::HeaderName, String),
    ) -> Result<hyper::Response<hyper::body::Incoming>, upstream::UpstreamError> {
        let mut headers = self.upstream_headers(None, None);
        headers.push(extra);
        self.metrics
            .cache_upstream_requests
            .get_or_create(&self.upstream_labels(plan))
            .inc();
        self.client
            .send(&method, &plan.origin, &plan.origin_path, &headers)
            .await
    }

    /// Pins `key` for a reader (no eviction while pinned) and touches it.
    fn pin(self: &Arc<Self>, key: &str) -> Pin {
        let mut inner = lock(&self.inner);
        inner.entry(key);
        inner.touch(key);
        let mut persist = None;
        if let Some(o) = inner.objects.get_mut(key) {
            o.readers += 1;
            let now = now_secs();
            if let Some(m) = &o.meta
                && now >= o.persisted_use + 60
            {
                o.persisted_use = now;
                persist = Some(o.record(m, self.cfg.block_size));
            }
        }
        self.metrics.cache_objects.set(inner.objects.len() as i64);
        drop(inner);
        if let Some(rec) = persist {
            let _ = disk::put_object(&self.index, key, &rec);
        }
        Pin {
            cache: self.clone(),
            key: key.to_string(),
        }
    }

    fn meta_of(&self, key: &str) -> Option<Arc<Meta>> {
        lock(&self.inner).objects.get(key).and_then(|o| o.meta.clone())
    }

    fn uncacheable(&self, key: &str) -> bool {
        lock(&self.uncacheable).get(key).is_some_and(|t| Instant::now() < *t)
    }

    fn mark_uncacheable(&self, key: &str) {
        let mut m = lock(&self.uncacheable);
        if m.len() >= MAX_UNCACHEABLE {
            let now = Instant::now();
            m.retain(|_, t| now < *t);
            if m.len() >= MAX_UNCACHEABLE {
                m.clear();
            }
        }
        m.insert(key.to_string(), Instant::now() + UNCACHEABLE_FOR);
    }

    /// For `meta`'s version: `Ok(object id)` when every block of `spans`
    /// (byte ranges, end exclusive) is stored; otherwise the first block
    /// that is not, with the last byte of its span.
    fn coverage(&self, key: &str, meta: &Meta, spans: &[(u64, u64)]) -> Result<u64, (u32, u64)> {
        let bs = self.cfg.block_size;
        let inner = lock(&self.inner);
        let o = inner.objects.get(key).filter(|o| {
            o.meta
                .as_deref()
                .is_some_and(|m| m.validator.same_version(&meta.validator))
        });
        for &(s, e) in spans {
            for k in s / bs..=(e.max(s + 1) - 1) / bs {
                // Objects of more than u32::MAX blocks are never cached.
                let k = u32::try_from(k).unwrap_or(u32::MAX);
                if !o.is_some_and(|o| o.stored.contains_key(&k)) {
                    return Err((k, e.saturating_sub(1)));
                }
            }
        }
        Ok(o.map_or(0, |o| o.id))
    }

    /// Bytes `start..end` (at most [`SMALL_READ`]) when every block holding
    /// them is stored for `meta`'s version, read here and now; `None`
    /// otherwise (the caller streams instead).
    pub(crate) fn read_small(&self, key: &str, meta: &Meta, start: u64, end: u64) -> Option<Bytes> {
        if end <= start || end - start > SMALL_READ {
            return None;
        }
        let id = self.coverage(key, meta, &[(start, end)]).ok()?;
        let bs = self.cfg.block_size;
        let mut parts = Vec::new();
        for k in start / bs..=(end - 1) / bs {
            let b0 = k * bs;
            let (from, to) = (start.max(b0) - b0, end.min(b0 + bs) - b0);
            parts.push(read_file_range(&disk::block_path(&self.dir, id, u32::try_from(k).ok()?), from, to).ok()?);
        }
        if parts.len() == 1 {
            return parts.pop();
        }
        Some(Bytes::from(parts.concat()))
    }

    /// Finds block `k`: stored (of whatever version: the caller compares),
    /// in flight, or by starting a fill for `k..=end_byte` (which becomes
    /// the reader's own fill).
    fn acquire(
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
    fn release_failed(&self, key: &str, fill: &Fill, first: &Block, e: FillError) {
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
    async fn run_fill(
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
        let resp = self
            .upstream(plan, hyper::Method::GET, (hyper::header::RANGE, range))
            .await
            .map_err(|e| FillError::Upstream(e.to_string()))?;
        let status = resp.status().as_u16();
        let header = |name: hyper::header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header(hyper::header::CONTENT_TYPE);
        let (body_start, body_end, length) = match status {
            206 => {
                let cr = header(hyper::header::CONTENT_RANGE).unwrap_or_default();
                match range::parse_content_range(&cr) {
                    Some((a, b, Some(len))) if a == start => (a, b + 1, len),
                    Some((_, _, None)) => return Err(FillError::Uncacheable("upstream sent no object length".into())),
                    _ => {
                        return Err(FillError::Upstream(format!(
                            "upstream answered range {cr:?} for {start}-"
                        )));
                    }
                }
            }
            200 => match header(hyper::header::CONTENT_LENGTH).and_then(|l| l.parse::<u64>().ok()) {
                Some(len) => (0, len, len),
                None => return Err(FillError::Uncacheable("upstream sent no Content-Length".into())),
            },
            416 => {
                let len = header(hyper::header::CONTENT_RANGE)
                    .and_then(|v| range::parse_unsatisfied(&v))
                    .unwrap_or(0);
                // An empty object has no byte 0 to ask for: pass it through.
                if len == 0 {
                    return Err(FillError::Uncacheable("empty object".into()));
                }
                return Err(FillError::Unsatisfiable(len));
            }
            _ => {
                let body = read_capped(resp.into_body(), 64 << 10, self.client.timeout()).await;
                return Err(FillError::Status {
                    status,
                    content_type,
                    body,
                });
            }
        };
        let Some(validator) = Validator::new(
            header(hyper::header::ETAG).as_deref(),
            header(hyper::header::LAST_MODIFIED).as_deref(),
            length,
        ) else {
            self.mark_uncacheable(&plan.key);
            return Err(FillError::Uncacheable("upstream sent no strong validator".into()));
        };
        if plan.max_object_size.is_some_and(|m| length > m) {
            self.mark_uncacheable(&plan.key);
            return Err(FillError::Uncacheable(format!(
                "object of {length} bytes is larger than max_object_size"
            )));
        }
        if length == 0 {
            return Err(FillError::Uncacheable("empty object".into()));
        }
        if length.div_ceil(bs) > u64::from(u32::MAX) {
            return Err(FillError::Uncacheable(format!(
                "object of {length} bytes has too many blocks"
            )));
        }
        if start >= length {
            return Err(FillError::Unsatisfiable(length));
        }
        let meta = Arc::new(Meta {
            validator,
            content_type,
            fetched_at: now_secs(),
            class: plan.class,
            ttl: plan.ttl,
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
        // A 206 may end before what was asked (never after); the last block
        // it covers must still be whole unless it is the object's last.
        let end = body_end;
        if end < length && end % bs != 0 {
            return Err(FillError::Upstream(format!(
                "upstream answered a range ending at byte {end}, not on a block boundary"
            )));
        }
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
        Ok(())
    }

    /// A buffer for block `k`: a `.part` file when it will be stored (room
    /// admitted), memory otherwise.
    fn buffer(&self, plan: &Plan, k: u32, meta: &Arc<Meta>, obj_id: u64, length: u64, public: bool) -> BlockData {
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
    fn try_claim(&self, plan: &Plan, fill: &Fill, k: u32, obj_id: u64) -> Claim {
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

    /// Gives a claimed block its buffer (a file when `public` and admitted)
    /// and makes it visible to readers.
    #[allow(clippy::too_many_arguments)]
    fn open_claimed(
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

    /// Reserves room for `len` bytes, evicting least recently used objects
    /// if needed. False when there is no room (the block is not stored).
    fn admit(&self, key: &str, len: u64) -> bool {
        let free = rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
        let mut victims = Vec::new();
        let ok = {
            let mut inner = lock(&self.inner);
            let mut need_free = free.map_or(0, |f| {
                self.min_free
                    .load(Ordering::Relaxed)
                    .saturating_add(len)
                    .saturating_sub(f)
            });
            loop {
                let over = (inner.stored_bytes + inner.reserved_bytes + len)
                    .saturating_sub(self.max_size.load(Ordering::Relaxed));
                if over == 0 && need_free == 0 {
                    inner.reserved_bytes += len;
                    break true;
                }
                let victim = inner
                    .lru
                    .iter()
                    .find(|(_, k)| {
                        k != key
                            && inner
                                .objects
                                .get(k)
                                .is_some_and(|o| o.readers == 0 && o.inflight.is_empty() && !o.stored.is_empty())
                    })
                    .cloned();
                let Some((tick, vkey)) = victim else {
                    break false;
                };
                inner.lru.remove(&(tick, vkey.clone()));
                if let Some(o) = inner.objects.remove(&vkey) {
                    let bytes = o.stored_bytes();
                    inner.stored_bytes -= bytes;
                    need_free = need_free.saturating_sub(bytes);
                    self.metrics.cache_evictions.inc();
                    self.metrics.cache_evicted_bytes.inc_by(bytes);
                    victims.push((vkey, o.id));
                }
            }
        };
        self.update_gauges();
        for (vkey, id) in victims {
            tracing::debug!(key = %vkey, "cache: evicted");
            // Deleting now (not later) so the free space is back for this block.
            if let Err(e) = disk::remove_object(&self.index, &self.dir, Some(&vkey), id) {
                tracing::warn!(error = %e, "cache: cannot remove an evicted object's index records");
            }
        }
        if !ok {
            self.event("admission-refused");
        }
        ok
    }

    fn update_gauges(&self) {
        let inner = lock(&self.inner);
        self.metrics.cache_stored_bytes.set(inner.stored_bytes as i64);
        self.metrics.cache_objects.set(inner.objects.len() as i64);
    }

    /// Syncs a complete block, renames it into place and indexes it.
    fn commit_block(self: &Arc<Self>, key: String, obj_id: u64, k: u32, block: Arc<Block>, data: BlockData) {
        let cache = self.clone();
        tokio::spawn(async move {
            let Buf::File(file, part) = data.buf else {
                return;
            };
            let (dir, len) = (cache.dir.clone(), data.len);
            let part_path = part.clone();
            let synced = tokio::task::spawn_blocking(move || {
                file.sync_data()?;
                std::fs::rename(&*part_path, disk::block_path(&dir, obj_id, k))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
            let stored = {
                let mut inner = lock(&cache.inner);
                inner.reserved_bytes = inner.reserved_bytes.saturating_sub(len);
                let mut stored = false;
                let mut replaced = 0;
                if let Some(o) = inner.objects.get_mut(&key)
                    && o.id == obj_id
                    && o.inflight.get(&k).is_some_and(|b| Arc::ptr_eq(b, &block))
                {
                    o.inflight.remove(&k);
                    if synced.is_ok() {
                        replaced = o.stored.insert(k, len).unwrap_or(0);
                        stored = true;
                    }
                }
                if stored {
                    inner.stored_bytes = inner.stored_bytes + len - replaced;
                }
                stored
            };
            match (&synced, stored) {
                (Ok(()), true) => {
                    if let Err(e) = disk::put_block(&cache.index, obj_id, k, len) {
                        tracing::warn!(error = %e, "cache: cannot index a block");
                    }
                }
                (Ok(()), false) => {
                    let _ = std::fs::remove_file(disk::block_path(&cache.dir, obj_id, k));
                }
                (Err(e), _) => {
                    tracing::warn!(error = %e, "cache: cannot sync a block; not stored");
                    cache.event("write-failed");
                    let _ = std::fs::remove_file(&*part);
                }
            }
            cache.update_gauges();
        });
    }

    /// Deletes an old version's blocks in the background.
    fn delete_later(self: &Arc<Self>, key: Option<String>, id: u64) {
        let (index, dir) = (self.index.clone(), self.dir.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = disk::remove_object(&index, &dir, key.as_deref(), id) {
                tracing::warn!(error = %e, "cache: cannot remove an old object version");
            }
        });
        self.update_gauges();
    }

    /// Reads bytes `from..to` of a stored block.
    async fn read_stored(&self, id: u64, k: u32, from: u64, to: u64) -> std::io::Result<Bytes> {
        let path = disk::block_path(&self.dir, id, k);
        if to - from <= SMALL_READ {
            // Small reads come from the page cache in microseconds: a
            // blocking-pool round trip would cost more than the read.
            return read_file_range(&path, from, to);
        }
        tokio::task::spawn_blocking(move || read_file_range(&path, from, to))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    /// Forgets a stored block whose file could not be read.
    fn drop_stored(&self, key: &str, id: u64, k: u32) {
        let mut inner = lock(&self.inner);
        let mut freed = 0;
        if let Some(o) = inner.objects.get_mut(key)
            && o.id == id
            && let Some(len) = o.stored.remove(&k)
        {
            freed = len;
        }
        inner.stored_bytes -= freed;
        self.event("block-unreadable");
    }

    /// Revalidates a stale `revalidate` object with the upstream (one
    /// request for any number of waiting clients). The object is kept on
    /// 304 or an unchanged validator, invalidated on a new one, and served
    /// stale when the upstream cannot be reached.
    async fn revalidate(self: &Arc<Self>, plan: &Plan, meta: &Arc<Meta>) {
        let waiting = {
            let mut inner = lock(&self.inner);
            let Some(o) = inner.objects.get_mut(&plan.key) else {
                return;
            };
            match &o.revalidating {
                Some(rx) => Ok(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(false);
                    o.revalidating = Some(rx);
                    Err(tx)
                }
            }
        };
        match waiting {
            Ok(mut rx) => {
                let _ = rx.wait_for(|done| *done).await;
            }
            Err(tx) => {
                self.revalidate_now(plan, meta).await;
                if let Some(o) = lock(&self.inner).objects.get_mut(&plan.key) {
                    o.revalidating = None;
                }
                let _ = tx.send(true);
            }
        }
    }

    async fn revalidate_now(self: &Arc<Self>, plan: &Plan, meta: &Arc<Meta>) {
        let condition = match (&meta.validator.etag, &meta.validator.last_modified) {
            (Some(e), _) => (hyper::header::IF_NONE_MATCH, e.clone()),
            (None, Some(lm)) => (hyper::header::IF_MODIFIED_SINCE, lm.clone()),
            // A validator always has one of the two.
            (None, None) => return,
        };
        let resp = self.upstream(plan, hyper::Method::HEAD, condition).await;
        let unchanged = match &resp {
            Ok(r) if r.status().as_u16() == 304 => Some(true),
            Ok(r) if r.status().is_success() => {
                let h = |n: hyper::header::HeaderName| r.headers().get(n).and_then(|v| v.to_str().ok());
                let len = h(hyper::header::CONTENT_LENGTH)
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(u64::MAX);
                let v = Validator::new(h(hyper::header::ETAG), h(hyper::header::LAST_MODIFIED), len);
                Some(v.is_some_and(|v| v.same_version(&meta.validator)))
            }
            Ok(r) if r.status().as_u16() == 404 || r.status().as_u16() == 410 => Some(false),
            _ => None,
        };
        match unchanged {
            Some(true) => {
                self.event("revalidated");
                let rec = {
                    let mut inner = lock(&self.inner);
                    let bs = self.cfg.block_size;
                    inner.objects.get_mut(&plan.key).and_then(|o| {
                        let fresh = Arc::new(Meta {
                            fetched_at: now_secs(),
                            ..(**meta).clone()
                        });
                        let same = o
                            .meta
                            .as_ref()
                            .is_some_and(|m| m.validator.same_version(&meta.validator));
                        same.then(|| {
                            o.meta = Some(fresh.clone());
                            o.record(&fresh, bs)
                        })
                    })
                };
                if let Some(rec) = rec {
                    let _ = disk::put_object(&self.index, &plan.key, &rec);
                }
            }
            Some(false) => {
                self.event("invalidated");
                let old = {
                    let mut inner = lock(&self.inner);
                    let same = inner
                        .objects
                        .get(&plan.key)
                        .and_then(|o| o.meta.as_ref())
                        .is_some_and(|m| m.validator.same_version(&meta.validator));
                    if same { inner.invalidate(&plan.key) } else { None }
                };
                if let Some(old) = old {
                    self.delete_later(Some(plan.key.clone()), old);
                }
            }
            None => {
                if let Err(e) = &resp {
                    tracing::info!(key = %plan.key, error = %e, "cache: upstream unreachable; serving the stale copy");
                }
                self.event("served-stale");
            }
        }
    }

    /// Removes objects whose key is `key`, starts with `prefix`, or all.
    /// Returns (objects, bytes) removed.
    pub fn purge(self: &Arc<Self>, key: Option<&str>, prefix: Option<&str>) -> (usize, u64) {
        let mut removed = Vec::new();
        let mut bytes = 0;
        {
            let mut inner = lock(&self.inner);
            let keys: Vec<String> = inner
                .objects
                .keys()
                .filter(|k| match (key, prefix) {
                    (Some(key), _) => k.as_str() == key,
                    (None, Some(p)) => k.starts_with(p),
                    (None, None) => true,
                })
                .cloned()
                .collect();
            for k in keys {
                let had_meta = inner.objects.get(&k).is_some_and(|o| o.meta.is_some());
                bytes += inner.objects.get(&k).map_or(0, Obj::stored_bytes);
                if let Some(old) = inner.invalidate(&k)
                    && had_meta
                {
                    removed.push((k.clone(), old));
                }
                inner.forget_if_empty(&k);
            }
        }
        let n = removed.len();
        for (k, id) in removed {
            self.delete_later(Some(k), id);
        }
        self.event("purged");
        (n, bytes)
    }

    /// Stored objects, largest first, at most `limit`.
    pub fn objects(&self, limit: usize) -> Vec<ObjectInfo> {
        let inner = lock(&self.inner);
        let mut out: Vec<ObjectInfo> = inner
            .objects
            .iter()
            .filter(|(_, o)| o.meta.is_some())
            .map(|(k, o)| ObjectInfo {
                key: k.clone(),
                length: o.meta.as_ref().map(|m| m.validator.length),
                etag: o.meta.as_ref().and_then(|m| m.validator.etag.clone()),
                stored_bytes: o.stored_bytes(),
                blocks: o.stored.len(),
                class: o.meta.as_ref().map(|m| m.class),
            })
            .collect();
        out.sort_by(|a, b| b.stored_bytes.cmp(&a.stored_bytes).then(a.key.cmp(&b.key)));
        out.truncate(limit);
        out
    }

    /// Totals.
    pub fn stats(&self) -> Stats {
        let free = rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
        let t = &self.totals;
        let (hit_bytes, miss_bytes) = (
            t.hit_bytes.load(Ordering::Relaxed),
            t.miss_bytes.load(Ordering::Relaxed),
        );
        let upstream_bytes = t.upstream_bytes.load(Ordering::Relaxed);
        let served = hit_bytes + miss_bytes;
        let inner = lock(&self.inner);
        Stats {
            listen: lock(&self.listen).clone(),
            block_size: self.cfg.block_size,
            objects: inner.objects.values().filter(|o| o.meta.is_some()).count(),
            stored_bytes: inner.stored_bytes,
            reserved_bytes: inner.reserved_bytes,
            max_size: self.max_size.load(Ordering::Relaxed),
            min_free: self.min_free.load(Ordering::Relaxed),
            free_bytes: free,
            fills_in_flight: self.metrics.cache_fills.get(),
            parent: self.cfg.parent.clone(),
            requests: t.requests.load(Ordering::Relaxed),
            hit_requests: t.hit_requests.load(Ordering::Relaxed),
            hit_bytes,
            miss_bytes,
            upstream_bytes,
            byte_hit_ratio: (served > 0).then(|| hit_bytes as f64 / served as f64),
            saved_bytes: hit_bytes,
        }
    }
}

/// Reads bytes `from..to` of a file into a buffer that is not zero-filled first.
fn read_file_range(path: &std::path::Path, from: u64, to: u64) -> std::io::Result<Bytes> {
    use std::io::{Read, Seek};
    let mut f = File::open(path)?;
    f.seek(std::io::SeekFrom::Start(from))?;
    let want = (to - from) as usize;
    let mut v = Vec::with_capacity(want);
    f.take(want as u64).read_to_end(&mut v)?;
    if v.len() != want {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "block file is short",
        ));
    }
    Ok(Bytes::from(v))
}

fn failed(b: &Block) -> bool {
    matches!(&*b.state.borrow(), BlockState::Failed(_))
}

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
