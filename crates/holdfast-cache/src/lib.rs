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

//!
//! The parts, each a type with its own state: the object table
//! (`objects`: versions, stored and in-flight blocks, LRU), the block store
//! (`store`: block files, the index, the disk budget), the fill coordinator
//! (`fill`), revalidation (`revalidate`), the way upstream (`origin`), what
//! was learned about keys (`learned`) and the counters (`counters`). The
//! HTTP side (`http`) serves requests with them; [`Cache`] builds them and
//! is what the node and the admin API hold.

pub mod config;
pub mod disk;
pub mod http;
pub mod path;
pub mod range;
pub mod rfc9111;
pub mod upstream;

mod block;
mod counters;
mod fill;
mod learned;
mod metrics;
mod objects;
mod origin;
mod revalidate;
mod statuses;
mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use holdfast_model::lock;
use holdfast_store::{Store, StoreError};

use self::block::Fill;
use self::counters::Counters;
use self::disk::{Class, Index};
use self::fill::{FillParts, Fills};
use self::learned::Learned;
pub use self::metrics::CacheMetrics;
use self::objects::{Objects, Pin};
use self::origin::Origin;
use self::range::Validator;
use self::revalidate::Revalidator;
use self::rfc9111::{Freshness, RequestRules, Vary};
use self::statuses::Statuses;
use self::store::BlockStore;
use self::upstream::{Client, Endpoint};
use crate::config::CacheConfig;

/// Reads of stored blocks up to this size are done on the async task.
const SMALL_READ: u64 = 1 << 20;

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
    /// The upstream answered with another status (203, 204, 3xx, 4xx,
    /// 5xx, …) and a body of known length of at most 64 KiB; passed on
    /// as-is to every request waiting on the fill.
    Status {
        /// Status code.
        status: u16,
        /// Its end-to-end fields but `Content-Length` (RFC 9110 §7.6.1;
        /// [`rfc9111::relayed_fields`]).
        headers: hyper::HeaderMap,
        /// Its body.
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
    /// The upstream could not be reached: nothing changed.
    Unreachable,
    /// The upstream answered with an error (5xx, or another status that
    /// neither confirms nor replaces it): nothing changed.
    Failed,
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
    /// Stored answers that are not byte ranges of an object (301, 404,
    /// 410, empty 200s, …).
    pub stored_answers: usize,
    /// Their bytes (fields and bodies).
    pub stored_answer_bytes: u64,
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

/// The range cache: its parts, built from the configuration by
/// [`Cache::open`], and what the node and the admin API ask of it.
pub struct Cache {
    cfg: CacheConfig,
    pub(crate) objects: Arc<Objects>,
    pub(crate) store: Arc<BlockStore>,
    pub(crate) fills: Arc<Fills>,
    pub(crate) revalidator: Revalidator,
    pub(crate) origin: Arc<Origin>,
    pub(crate) learned: Arc<Learned>,
    pub(crate) counters: Arc<Counters>,
    /// Stored answers that are not byte ranges (other statuses).
    pub(crate) statuses: Arc<Statuses>,
    listen: Mutex<Option<String>>,
    /// Makes multipart boundaries unique.
    boundary_seq: AtomicU64,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("dir", &self.store.dir())
            .finish_non_exhaustive()
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
        metrics: Arc<CacheMetrics>,
    ) -> Result<Cache, CacheError> {
        std::fs::create_dir_all(&dir).map_err(|e| CacheError::Setup(format!("{}: {e}", dir.display())))?;
        let index = Index::open(store)?;
        let statuses = Arc::new(Statuses::open(store)?);
        let loaded = disk::load(&index, &dir, cfg.block_size)?;
        if loaded.removed_files > 0 {
            tracing::info!(
                removed = loaded.removed_files,
                "cache: deleted block files the index does not name"
            );
        }
        let mut objects = loaded.objects;
        // Least recently used first: the later of two variants' `Vary`
        // names wins, and the LRU order is rebuilt in this order.
        objects.sort_by_key(|(_, rec, _)| rec.last_used);
        let mut vary_specs = HashMap::new();
        for (key, rec, _) in &objects {
            if let Some(v) = &rec.vary {
                vary_specs.insert(primary_key(key).to_string(), v.names.clone());
            }
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
        let objects = Arc::new(Objects::load(objects, loaded.next_id, cfg.block_size, metrics.clone()));
        let store = Arc::new(BlockStore::new(dir, index, cfg.block_size, cfg.max_size, cfg.min_free));
        let counters = Arc::new(Counters::new(metrics));
        let targeted: Arc<[hyper::header::HeaderName]> = cfg.targeted_fields().into();
        let origin = Arc::new(Origin::new(client, node_id, counters.clone()));
        let learned = Arc::new(Learned::new(vary_specs));
        let fills = Arc::new(Fills::new(
            FillParts {
                objects: objects.clone(),
                store: store.clone(),
                origin: origin.clone(),
                learned: learned.clone(),
                counters: counters.clone(),
                statuses: statuses.clone(),
                targeted: targeted.clone(),
            },
            cfg.block_size,
            cfg.orphan_fill_bytes,
        ));
        let revalidator = Revalidator::new(
            objects.clone(),
            store.clone(),
            origin.clone(),
            counters.clone(),
            targeted,
        );
        Ok(Cache {
            cfg: cfg.clone(),
            objects,
            store,
            fills,
            revalidator,
            origin,
            learned,
            counters,
            statuses,
            listen: Mutex::new(None),
            boundary_seq: AtomicU64::new(0),
        })
    }

    /// The block size.
    pub fn block_size(&self) -> u64 {
        self.cfg.block_size
    }

    /// The upstream client.
    pub fn client(&self) -> &Client {
        self.origin.client()
    }

    /// This node's loop-guard token (`holdfast-<node id>`).
    pub fn token(&self) -> &str {
        self.origin.token()
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Records where the listener is bound.
    pub fn set_listen(&self, addr: String) {
        *lock(&self.listen) = Some(addr);
    }

    /// Applies the limits a running cache can change: `cache.max_size`,
    /// `cache.min_free` (both checked as each block is admitted; a lower
    /// budget evicts as new blocks come in) and `cache.orphan_fill_bytes`.
    /// Returns the keys that changed.
    pub fn apply_limits(&self, new: &CacheConfig) -> Vec<String> {
        holdfast_model::store_limits(&[
            // At least one block of the size this cache runs with.
            (
                "cache.max_size",
                self.store.max_size(),
                new.max_size.max(self.cfg.block_size),
            ),
            ("cache.min_free", self.store.min_free(), new.min_free),
            (
                "cache.orphan_fill_bytes",
                self.fills.orphan_fill_bytes(),
                new.orphan_fill_bytes,
            ),
        ])
    }

    /// Gives disk space to the outbox: evicts least recently used objects
    /// (none being read or fetched) until about `bytes` are freed; the
    /// bytes freed. The outbox has priority for the disk: its messages
    /// cannot be fetched again, this content can. Blocks briefly on file
    /// deletions. Counted as `holdfast_cache_events_total{event="yielded-to-outbox"}`
    /// and in the evicted bytes.
    pub fn give_space(&self, bytes: u64) -> u64 {
        self.store.give_space(&self.objects, &self.counters, bytes)
    }

    /// The `source` label for a key: its namespace before `:`, capped in
    /// number.
    pub fn source_label(&self, key: &str) -> String {
        self.counters.source_label(key)
    }

    /// Pins `key` for a reader (no eviction while pinned) and touches it,
    /// persisting its last use at most once a minute.
    pub(crate) fn pin(&self, key: &str) -> Pin {
        let (pin, persist) = self.objects.pin(key);
        if let Some(rec) = persist {
            self.store.put_object(key, &rec);
        }
        pin
    }

    /// A number for a multipart boundary, unique within this cache.
    pub(crate) fn boundary_seq(&self) -> u64 {
        self.boundary_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Invalidates what is stored for `key` and every variant of it (RFC
    /// 9111 §4.4, after an unsafe method succeeded). Returns the objects
    /// removed.
    pub fn invalidate_uri(&self, key: &str) -> usize {
        let variants = format!("{key}{VARY_SEP}");
        let (n, _) = self.remove_where(|k| k == key || k.starts_with(&variants));
        if n > 0 {
            self.counters.event("invalidated-by-method");
        }
        n
    }

    /// Removes objects whose key is `key`, starts with `prefix`, or all.
    /// Returns (objects, bytes) removed.
    pub fn purge(&self, key: Option<&str>, prefix: Option<&str>) -> (usize, u64) {
        let removed = self.remove_where(|k| match (key, prefix) {
            (Some(key), _) => k == key,
            (None, Some(p)) => k.starts_with(p),
            (None, None) => true,
        });
        self.counters.event("purged");
        removed
    }

    /// Drops every object whose key passes `which` (its blocks are deleted
    /// in the background). Returns (objects that had a version, bytes).
    fn remove_where(&self, which: impl Fn(&str) -> bool) -> (usize, u64) {
        let answers = self.statuses.remove_where(&which);
        let (removed, bytes) = self.objects.remove_where(which);
        let n = removed.len();
        for (k, id) in removed {
            self.store.delete_later(Some(k), id);
            self.objects.update_gauges();
        }
        (n + answers, bytes)
    }

    /// Stored objects, largest first, at most `limit`.
    pub fn objects(&self, limit: usize) -> Vec<ObjectInfo> {
        self.objects.list(limit)
    }

    /// Totals.
    pub fn stats(&self) -> Stats {
        let free = self.store.free_bytes();
        let t = self.counters.totals();
        let (hit_bytes, miss_bytes) = (
            t.hit_bytes.load(Ordering::Relaxed),
            t.miss_bytes.load(Ordering::Relaxed),
        );
        let upstream_bytes = t.upstream_bytes.load(Ordering::Relaxed);
        let served = hit_bytes + miss_bytes;
        let sizes = self.objects.totals();
        let (stored_answers, stored_answer_bytes) = self.statuses.totals();
        Stats {
            listen: lock(&self.listen).clone(),
            block_size: self.cfg.block_size,
            objects: sizes.objects,
            stored_bytes: sizes.stored_bytes,
            reserved_bytes: sizes.reserved_bytes,
            stored_answers,
            stored_answer_bytes,
            max_size: self.store.max_size().load(Ordering::Relaxed),
            min_free: self.store.min_free().load(Ordering::Relaxed),
            free_bytes: free,
            fills_in_flight: self.counters.fills_in_flight(),
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
