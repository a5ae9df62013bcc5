//! The object table: every cached object in memory, by key: its version,
//! which blocks are stored (and their lengths), which are being fetched,
//! its readers, its place in the LRU order, and the bytes stored and
//! reserved for blocks being written. Files and the index are the block
//! store's; this is what they hold, looked up under one lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use holdfast_model::lock;
use tokio::sync::watch;

use crate::block::{Block, Source};
use crate::disk::{Class, ObjRecord};
use crate::metrics::CacheMetrics;
use crate::range::Validator;
use crate::rfc9111::Freshness;
use crate::{Meta, ObjectInfo, Revalidation, now_secs};

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
struct Table {
    objects: HashMap<String, Obj>,
    lru: BTreeSet<(u64, String)>,
    tick: u64,
    stored_bytes: u64,
    reserved_bytes: u64,
    next_id: u64,
}

impl Table {
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

    /// True when `key`'s current version is `validator`'s.
    fn same_version(&self, key: &str, validator: &Validator) -> bool {
        self.objects
            .get(key)
            .and_then(|o| o.meta.as_ref())
            .is_some_and(|m| m.validator.same_version(validator))
    }
}

/// What [`Objects::find`] found for a block.
pub(crate) enum Found {
    /// Stored, or being fetched: read it.
    Source(Source),
    /// Neither: the caller now holds `block` in flight for object `obj_id`
    /// and fetches it, up to `end_byte`.
    Claimed {
        block: Arc<Block>,
        obj_id: u64,
        end_byte: Option<u64>,
    },
}

/// What [`Objects::claim`] gave a fill for its next block.
pub(crate) enum Claim {
    /// Stored or fetched into storage by this fill.
    Public(Arc<Block>),
    /// Fetched for this fill's reader only.
    Private,
    /// Someone else has it, or nobody needs it: the fill ends.
    Stop,
}

/// How [`Objects::bind`] bound an object to the version a fill got.
pub(crate) struct Bound {
    /// The object's id now (`u64::MAX` when it is gone).
    pub(crate) obj_id: u64,
    /// An older version's id whose blocks are to be deleted.
    pub(crate) doomed: Option<u64>,
    /// The record to write to the index, when the version or its fields changed.
    pub(crate) record: Option<ObjRecord>,
}

/// Where a revalidation's outcome is announced (`None` while it runs).
pub(crate) type Outcome = watch::Receiver<Option<Revalidation>>;

/// Sizes for the admin API's totals.
pub(crate) struct Totals {
    pub(crate) objects: usize,
    pub(crate) stored_bytes: u64,
    pub(crate) reserved_bytes: u64,
}

/// The object table (see the module docs).
pub(crate) struct Objects {
    table: Mutex<Table>,
    block_size: u64,
    metrics: Arc<CacheMetrics>,
}

/// Clears a reader's pin on an object when dropped.
pub(crate) struct Pin {
    objects: Arc<Objects>,
    key: String,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut t = self.objects.lock();
        if let Some(o) = t.objects.get_mut(&self.key) {
            o.readers = o.readers.saturating_sub(1);
        }
        t.forget_if_empty(&self.key);
    }
}

impl Objects {
    /// The table of the objects the index holds, given least recently
    /// used first (the LRU order is built from it); new ids start at
    /// `next_id`.
    pub(crate) fn load(
        objects: Vec<(String, ObjRecord, BTreeMap<u32, u64>)>,
        next_id: u64,
        block_size: u64,
        metrics: Arc<CacheMetrics>,
    ) -> Objects {
        let mut t = Table {
            next_id,
            ..Table::default()
        };
        for (key, rec, stored) in objects {
            t.tick += 1;
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
                tick: t.tick,
                persisted_use: rec.last_used,
                ..Obj::default()
            };
            t.stored_bytes += obj.stored_bytes();
            t.lru.insert((t.tick, key.clone()));
            t.objects.insert(key, obj);
        }
        let objects = Objects {
            table: Mutex::new(t),
            block_size,
            metrics,
        };
        objects.update_gauges();
        objects
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// Sets the stored-bytes and objects gauges.
    pub(crate) fn update_gauges(&self) {
        let t = self.lock();
        self.metrics.set_stored_bytes(t.stored_bytes);
        self.metrics.set_objects(t.objects.len());
    }

    /// Pins `key` for a reader (no eviction while pinned) and touches it.
    /// Also the record to write when its last use was persisted more than
    /// a minute ago.
    pub(crate) fn pin(self: &Arc<Self>, key: &str) -> (Pin, Option<ObjRecord>) {
        let mut t = self.lock();
        t.entry(key);
        t.touch(key);
        let mut persist = None;
        if let Some(o) = t.objects.get_mut(key) {
            o.readers += 1;
            let now = now_secs();
            if let Some(m) = &o.meta
                && now >= o.persisted_use + 60
            {
                o.persisted_use = now;
                persist = Some(o.record(m, self.block_size));
            }
        }
        self.metrics.set_objects(t.objects.len());
        drop(t);
        let pin = Pin {
            objects: self.clone(),
            key: key.to_string(),
        };
        (pin, persist)
    }

    /// The version stored or being fetched under `key`.
    pub(crate) fn meta_of(&self, key: &str) -> Option<Arc<Meta>> {
        self.lock().objects.get(key).and_then(|o| o.meta.clone())
    }

    /// For `meta`'s version: `Ok(object id)` when every block of `spans`
    /// (byte ranges, end exclusive) is stored; otherwise the first block
    /// that is not, with the last byte of its span.
    pub(crate) fn coverage(&self, key: &str, meta: &Meta, spans: &[(u64, u64)]) -> Result<u64, (u32, u64)> {
        let bs = self.block_size;
        let t = self.lock();
        let o = t.objects.get(key).filter(|o| {
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

    /// Finds block `k` of `key`: stored (of whatever version: the caller
    /// compares), in flight, or claimed for the caller to fetch up to
    /// `end_byte` and no further than the next block held.
    pub(crate) fn find(&self, key: &str, k: u32, end_byte: Option<u64>) -> Found {
        let mut t = self.lock();
        let o = t.entry(key);
        // A stored block of another version is returned as it is: the
        // reader sees the version differs and never mixes the two.
        if let Some(meta) = &o.meta
            && o.stored.contains_key(&k)
        {
            return Found::Source(Source::Stored {
                id: o.id,
                meta: meta.clone(),
            });
        }
        if let Some(b) = o.inflight.get(&k) {
            return Found::Source(Source::Block(b.clone()));
        }
        // Fetch only up to the next block already stored or being fetched.
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
                let before = u64::from(n) * self.block_size - 1;
                Some(end_byte.map_or(before, |e| e.min(before)))
            }
            None => end_byte,
        };
        let block = Block::new();
        o.inflight.insert(k, block.clone());
        Found::Claimed {
            block,
            obj_id: o.id,
            end_byte,
        }
    }

    /// Claims block `k` for a fill of object `obj_id`: public if the object
    /// is still that version and nobody holds `k`; stop if someone does;
    /// private if the object moved on (then only the fill's reader reads it).
    pub(crate) fn claim(&self, key: &str, k: u32, obj_id: u64) -> Claim {
        let mut t = self.lock();
        match t.objects.get_mut(key) {
            Some(o) if o.id == obj_id => {
                if o.stored.contains_key(&k) || o.inflight.contains_key(&k) {
                    return Claim::Stop;
                }
                let block = Block::new();
                o.inflight.insert(k, block.clone());
                Claim::Public(block)
            }
            _ => Claim::Private,
        }
    }

    /// Claims blocks `from..=to` of object `obj_id` that nobody holds, for
    /// a fill of the whole object: the blocks of a version without a strong
    /// validator can only come from the fill that fetched it, so readers
    /// must wait for that fill instead of starting their own.
    pub(crate) fn claim_run(&self, key: &str, obj_id: u64, from: u32, to: u32) -> BTreeMap<u32, Arc<Block>> {
        let mut out = BTreeMap::new();
        let mut t = self.lock();
        if let Some(o) = t.objects.get_mut(key)
            && o.id == obj_id
        {
            for k in from..=to {
                if !o.stored.contains_key(&k) && !o.inflight.contains_key(&k) {
                    let b = Block::new();
                    o.inflight.insert(k, b.clone());
                    out.insert(k, b);
                }
            }
        }
        out
    }

    /// True when `key` holds `validator`'s version with blocks missing and
    /// none being fetched: for a version that cannot be combined with
    /// another fetch, nothing will complete it.
    pub(crate) fn stalled(&self, key: &str, validator: &Validator) -> bool {
        let t = self.lock();
        let Some(o) = t.objects.get(key) else {
            return false;
        };
        let blocks = validator.length.div_ceil(self.block_size);
        o.meta.as_ref().is_some_and(|m| m.validator.same_version(validator))
            && o.inflight.is_empty()
            && (o.stored.len() as u64) < blocks
    }

    /// True when `block` is object `obj_id`'s block `k` in flight.
    pub(crate) fn holds(&self, key: &str, obj_id: u64, k: u32, block: &Arc<Block>) -> bool {
        self.lock()
            .objects
            .get(key)
            .is_some_and(|o| o.id == obj_id && o.inflight.get(&k).is_some_and(|b| Arc::ptr_eq(b, block)))
    }

    /// Takes `block` out of flight (it will not be stored).
    pub(crate) fn unclaim(&self, key: &str, k: u32, block: &Arc<Block>) {
        let mut t = self.lock();
        if let Some(o) = t.objects.get_mut(key)
            && o.inflight.get(&k).is_some_and(|b| Arc::ptr_eq(b, block))
        {
            o.inflight.remove(&k);
        }
    }

    /// Takes failed blocks out of flight after a fill failed.
    pub(crate) fn forget_failed(&self, key: &str) {
        let mut t = self.lock();
        if let Some(o) = t.objects.get_mut(key) {
            o.inflight.retain(|_, b| !b.failed());
        }
        t.forget_if_empty(key);
    }

    /// Binds `key` to the version a fill that started under object id
    /// `obj_id` got (`meta`): an object of another version is invalidated
    /// (`invalidated` is called); the stored version is refreshed when it
    /// is new or revalidated. A fill that started before an invalidation it
    /// caused claims its first block again under the new id.
    pub(crate) fn bind(
        &self,
        key: &str,
        meta: &Arc<Meta>,
        obj_id: u64,
        first: u32,
        first_block: &Arc<Block>,
        invalidated: impl FnOnce(),
    ) -> Bound {
        let mut t = self.lock();
        let mut doomed = None;
        let same = t
            .objects
            .get(key)
            .and_then(|o| o.meta.as_ref())
            .map(|m| m.validator.same_version(&meta.validator));
        if same == Some(false) {
            doomed = t.invalidate(key);
            invalidated();
        }
        match t.objects.get_mut(key) {
            Some(o) => {
                let refresh = same != Some(true) || meta.class == Class::Revalidate;
                if refresh {
                    o.meta = Some(meta.clone());
                }
                if o.id != obj_id && same != Some(true) {
                    o.inflight.entry(first).or_insert_with(|| first_block.clone());
                }
                let record = refresh.then(|| o.record(meta, self.block_size));
                Bound {
                    obj_id: o.id,
                    doomed,
                    record,
                }
            }
            None => Bound {
                obj_id: u64::MAX,
                doomed,
                record: None,
            },
        }
    }

    /// Reserves `len` bytes for a block being written, evicting least
    /// recently used objects (not `key`, not pinned, not being fetched)
    /// while the total would pass `max_size` or until `need_free` bytes are
    /// freed. Returns whether it fits, and the evicted objects' keys and ids.
    pub(crate) fn reserve(&self, key: &str, len: u64, max_size: u64, mut need_free: u64) -> (bool, Vec<(String, u64)>) {
        let mut victims = Vec::new();
        let mut t = self.lock();
        let ok = loop {
            let over = (t.stored_bytes + t.reserved_bytes + len).saturating_sub(max_size);
            if over == 0 && need_free == 0 {
                t.reserved_bytes += len;
                break true;
            }
            let victim = t
                .lru
                .iter()
                .find(|(_, k)| {
                    k != key
                        && t.objects
                            .get(k)
                            .is_some_and(|o| o.readers == 0 && o.inflight.is_empty() && !o.stored.is_empty())
                })
                .cloned();
            let Some((tick, vkey)) = victim else {
                break false;
            };
            t.lru.remove(&(tick, vkey.clone()));
            if let Some(o) = t.objects.remove(&vkey) {
                let bytes = o.stored_bytes();
                t.stored_bytes -= bytes;
                need_free = need_free.saturating_sub(bytes);
                self.metrics.evicted(bytes);
                victims.push((vkey, o.id));
            }
        };
        (ok, victims)
    }

    /// Evicts least recently used objects (not pinned, not being fetched)
    /// until `need` bytes of stored blocks are freed or none is left:
    /// the bytes freed, and the evicted objects' keys and ids (their files
    /// are the caller's to delete).
    pub(crate) fn evict(&self, need: u64) -> (u64, Vec<(String, u64)>) {
        let mut victims = Vec::new();
        let mut freed = 0;
        let mut t = self.lock();
        while freed < need {
            let victim = t
                .lru
                .iter()
                .find(|(_, k)| {
                    t.objects
                        .get(k)
                        .is_some_and(|o| o.readers == 0 && o.inflight.is_empty() && !o.stored.is_empty())
                })
                .cloned();
            let Some((tick, vkey)) = victim else {
                break;
            };
            t.lru.remove(&(tick, vkey.clone()));
            if let Some(o) = t.objects.remove(&vkey) {
                let bytes = o.stored_bytes();
                t.stored_bytes -= bytes;
                freed += bytes;
                self.metrics.evicted(bytes);
                victims.push((vkey, o.id));
            }
        }
        (freed, victims)
    }

    /// Gives back `len` reserved bytes.
    pub(crate) fn unreserve(&self, len: u64) {
        let mut t = self.lock();
        t.reserved_bytes = t.reserved_bytes.saturating_sub(len);
    }

    /// A block's file was synced (`synced`) or not: gives back its
    /// reservation, and when `block` is still object `obj_id`'s block `k`
    /// in flight, takes it out of flight and, if synced, counts it stored.
    /// True when it is stored.
    pub(crate) fn stored(&self, key: &str, obj_id: u64, k: u32, block: &Arc<Block>, len: u64, synced: bool) -> bool {
        let mut t = self.lock();
        t.reserved_bytes = t.reserved_bytes.saturating_sub(len);
        let mut stored = false;
        let mut replaced = 0;
        if let Some(o) = t.objects.get_mut(key)
            && o.id == obj_id
            && o.inflight.get(&k).is_some_and(|b| Arc::ptr_eq(b, block))
        {
            o.inflight.remove(&k);
            if synced {
                replaced = o.stored.insert(k, len).unwrap_or(0);
                stored = true;
            }
        }
        if stored {
            t.stored_bytes = t.stored_bytes + len - replaced;
        }
        stored
    }

    /// Forgets a stored block whose file could not be read.
    pub(crate) fn drop_stored(&self, key: &str, id: u64, k: u32) {
        let mut t = self.lock();
        let mut freed = 0;
        if let Some(o) = t.objects.get_mut(key)
            && o.id == id
            && let Some(len) = o.stored.remove(&k)
        {
            freed = len;
        }
        t.stored_bytes -= freed;
    }

    /// Starts a revalidation of `key`: `Err(sender)` when the caller is to
    /// do it and send the outcome, `Ok(receiver)` when one is running;
    /// `None` when the object is gone.
    pub(crate) fn revalidating(&self, key: &str) -> Option<Result<Outcome, watch::Sender<Option<Revalidation>>>> {
        let mut t = self.lock();
        let o = t.objects.get_mut(key)?;
        Some(match &o.revalidating {
            Some(rx) => Ok(rx.clone()),
            None => {
                let (tx, rx) = watch::channel(None);
                o.revalidating = Some(rx);
                Err(tx)
            }
        })
    }

    /// Ends the revalidation of `key`.
    pub(crate) fn revalidated(&self, key: &str) {
        if let Some(o) = self.lock().objects.get_mut(key) {
            o.revalidating = None;
        }
    }

    /// Replaces the stored version's fields with `fresh`'s when it is still
    /// `fresh`'s version; the record to write then.
    pub(crate) fn refresh(&self, key: &str, fresh: &Arc<Meta>) -> Option<ObjRecord> {
        let mut t = self.lock();
        let o = t.objects.get_mut(key)?;
        let same = o
            .meta
            .as_ref()
            .is_some_and(|m| m.validator.same_version(&fresh.validator));
        same.then(|| {
            o.meta = Some(fresh.clone());
            o.record(fresh, self.block_size)
        })
    }

    /// Invalidates `key` when it still holds `validator`'s version; the old
    /// id whose blocks are to be deleted.
    pub(crate) fn invalidate_version(&self, key: &str, validator: &Validator) -> Option<u64> {
        let mut t = self.lock();
        if t.same_version(key, validator) {
            t.invalidate(key)
        } else {
            None
        }
    }

    /// Drops every object whose key passes `which`. Returns the keys and
    /// old ids of those that had a version (their blocks are to be
    /// deleted), and the bytes they held.
    pub(crate) fn remove_where(&self, which: impl Fn(&str) -> bool) -> (Vec<(String, u64)>, u64) {
        let mut removed = Vec::new();
        let mut bytes = 0;
        let mut t = self.lock();
        let keys: Vec<String> = t.objects.keys().filter(|k| which(k)).cloned().collect();
        for k in keys {
            let had_meta = t.objects.get(&k).is_some_and(|o| o.meta.is_some());
            bytes += t.objects.get(&k).map_or(0, Obj::stored_bytes);
            if let Some(old) = t.invalidate(&k)
                && had_meta
            {
                removed.push((k.clone(), old));
            }
            t.forget_if_empty(&k);
        }
        (removed, bytes)
    }

    /// Stored objects, largest first, at most `limit`.
    pub(crate) fn list(&self, limit: usize) -> Vec<ObjectInfo> {
        let t = self.lock();
        let mut out: Vec<ObjectInfo> = t
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

    /// Objects with a version, bytes stored and reserved.
    pub(crate) fn totals(&self) -> Totals {
        let t = self.lock();
        Totals {
            objects: t.objects.values().filter(|o| o.meta.is_some()).count(),
            stored_bytes: t.stored_bytes,
            reserved_bytes: t.reserved_bytes,
        }
    }
}
