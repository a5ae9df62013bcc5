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
pub mod rfc9111;
pub mod upstream;

mod blocks;
mod fill;
mod manage;
mod origin;

use self::blocks::{failed, read_file_range};

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
use self::rfc9111::{Freshness, RequestRules, Vary};
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
    /// The source's TTL when it was fetched, seconds.
    pub ttl: u32,
    /// Freshness lifetime and age (RFC 9111 §4.2).
    pub freshness: Freshness,
    /// The origin's end-to-end response fields, passed on with every
    /// response from this version (RFC 9111 §3.1).
    pub headers: Arc<Vec<(String, String)>>,
    /// The request fields this response was selected by (`Vary`).
    pub vary: Option<Vary>,
}

impl Meta {
    /// Whether this stored response was selected for requests like one
    /// whose upstream fields are `sent` (RFC 9111 §4.1).
    pub(crate) fn selected_for(&self, sent: &hyper::HeaderMap) -> bool {
        self.vary
            .as_ref()
            .is_none_or(|v| rfc9111::selecting_values(&v.names, sent) == v.values)
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
    /// The key the plugin gave, before `Vary` selected a variant.
    pub primary: String,
    /// The request's fields as a fill sends them upstream (end-to-end
    /// fields without Range and conditionals; `Accept-Encoding: identity`).
    pub fields: hyper::HeaderMap,
    /// The request's `Cache-Control`.
    pub rules: RequestRules,
    /// The request carried `Authorization`.
    pub authorized: bool,
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
        /// Its other end-to-end fields.
        headers: Vec<(String, String)>,
        /// Its body (at most 64 KiB).
        body: Bytes,
    },
    /// The range starts past the end of an object of this length.
    Unsatisfiable(u64),
    /// The object cannot be cached (no strong validator, too large, no
    /// length, a response that must not be stored): pass the request
    /// through. The fill's own response, when it can be handed to the
    /// request that started the fill, so a miss costs one upstream request.
    Uncacheable(String, Handoff),
    /// The object changed while a response for the old version was going out.
    VersionChanged,
}

/// An upstream response a fill could not store, kept for the request that
/// started the fill (taken once).
#[derive(Clone, Default)]
pub struct Handoff(Arc<Mutex<Option<(usize, Passed)>>>);

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handoff")
    }
}

impl Handoff {
    /// A response for the request whose fill is `owner` (its address).
    fn new(owner: usize, p: Passed) -> Handoff {
        Handoff(Arc::new(Mutex::new(Some((owner, p)))))
    }

    /// Takes the response for the request owning `fill`: only the request
    /// that started the fill gets it (it answers that request's fields).
    pub(crate) fn take(&self, fill: Option<&Arc<Fill>>) -> Option<Passed> {
        let fill = fill?;
        let mut slot = lock(&self.0);
        match &*slot {
            Some((owner, _)) if *owner == Arc::as_ptr(fill) as usize => slot.take().map(|(_, p)| p),
            _ => None,
        }
    }
}

/// An upstream response head and its body, which starts at byte `start` of
/// the object (`Content-Range` of a 206, 0 for a 200).
pub(crate) struct Passed {
    pub(crate) head: hyper::http::response::Parts,
    pub(crate) body: hyper::body::Incoming,
    /// The byte range the body holds and the object length, when known.
    pub(crate) range: Option<(u64, u64, Option<u64>)>,
}

/// How a revalidation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Revalidation {
    /// The origin confirmed the stored version: it is fresh again.
    Validated,
    /// The origin has another version, or none: the object was dropped.
    Invalidated,
    /// The upstream could not be reached or failed: nothing changed.
    Unreachable,
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
    revalidating: Option<watch::Receiver<Option<Revalidation>>>,
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
            freshness: Some(meta.freshness),
            headers: (*meta.headers).clone(),
            vary: meta.vary.clone(),
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
    /// The `Vary` field names last seen per plugin key (RFC 9111 §4.1).
    vary_specs: Mutex<HashMap<String, Vec<String>>>,
    /// Object lengths learned from answers that were not stored.
    lengths: Mutex<HashMap<String, u64>>,
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

/// Separates a plugin key from the selecting values of a variant.
pub(crate) const VARY_SEP: char = '\u{1f}';

/// The plugin's key of a storage key (without a variant's values).
pub(crate) fn primary_key(key: &str) -> &str {
    key.split_once(VARY_SEP).map_or(key, |(p, _)| p)
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
        let mut vary_specs = HashMap::new();
        for (key, rec, _) in &objects {
            if let Some(v) = &rec.vary {
                vary_specs.insert(primary_key(key).to_string(), v.names.clone());
            }
        }
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
                    // Records written before freshness was kept: as then.
                    freshness: rec
                        .freshness
                        .unwrap_or_else(|| Freshness::legacy(rec.fetched_at, rec.ttl, rec.class == Class::Immutable)),
                    headers: Arc::new(rec.headers),
                    vary: rec.vary,
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
            vary_specs: Mutex::new(vary_specs),
            lengths: Mutex::new(HashMap::new()),
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

    /// The length of the object under `key`, when known without storage.
    pub(crate) fn length_hint(&self, key: &str) -> Option<u64> {
        lock(&self.lengths).get(key).copied()
    }

    /// Remembers an object's length learned from an answer not stored.
    pub(crate) fn learn_length(&self, key: &str, len: u64) {
        let mut l = lock(&self.lengths);
        if l.len() >= MAX_UNCACHEABLE {
            l.clear();
        }
        l.insert(key.to_string(), len);
    }

    /// Records the `Vary` names a response for `primary` carried.
    pub(crate) fn learn_vary(&self, primary: &str, names: &[String]) {
        let mut specs = lock(&self.vary_specs);
        if specs.get(primary).is_none_or(|n| n != names) {
            if specs.len() >= MAX_UNCACHEABLE {
                specs.clear();
            }
            specs.insert(primary.to_string(), names.to_vec());
        }
    }

    /// The storage key for a request under the plugin's key `primary`,
    /// whose upstream fields are `sent`: `primary` unless responses for it
    /// vary and the one stored there was selected by other values; then
    /// a key naming the values (RFC 9111 §4.1: one stored response per
    /// combination of the selecting fields).
    pub(crate) fn variant_key(&self, primary: &str, sent: &hyper::HeaderMap) -> String {
        let Some(names) = lock(&self.vary_specs).get(primary).cloned() else {
            return primary.to_string();
        };
        let stored_matches = self.meta_of(primary).is_none_or(|m| m.selected_for(sent));
        if stored_matches {
            return primary.to_string();
        }
        let mut key = format!("{primary}{VARY_SEP}");
        for (n, v) in names.iter().zip(rfc9111::selecting_values(&names, sent)) {
            key.push_str(n);
            match v {
                Some(v) => {
                    key.push('=');
                    key.push_str(&v);
                }
                None => key.push('!'),
            }
            key.push(';');
        }
        key
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
}
