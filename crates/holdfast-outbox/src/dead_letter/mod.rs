//! The dead-letter store: messages the node could not route or deliver,
//! kept durably with why, where and when, within a quota of its own, for an
//! operator to list, inspect, replay or purge.
//!
//! What goes here: a message the router plugin failed on when its slot's
//! policy is `dead-letter`; a message whose time-to-live ran out in the
//! outbox; one the upstream refused for good (the MQTT bridge); one a full
//! outbox removed under `when_full = "drop-oldest"`. The outbox's writer puts
//! the last three here in the same commit that removes them from their lane
//! ([`crate::Outbox::open_with`]), so a crash cannot lose a message between
//! the two.
//!
//! Layout in the `dead-letter` space: `r` + big-endian id per entry (ids
//! grow, so key order is age order), and `c` the counters (next id, count,
//! bytes), written in the same batch as every change. When an entry would
//! take the store past `max_messages` or `max_bytes`, the oldest entries are
//! removed (evicted, counted) in that same batch.

mod entry;
mod metrics;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use holdfast_store::{Batch, Durability, Space, Store, StoreError};

pub use self::entry::{DeadLetter, Reason};
pub use self::metrics::DeadLetterMetrics;
use crate::record::DecodeError;

/// The `[dead_letter]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Most entries kept; the oldest are evicted past it. Default 100 000.
    pub max_messages: u64,
    /// Most bytes kept (stored size); the oldest are evicted past it.
    /// Default 256 MiB.
    pub max_bytes: u64,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            max_messages: 100_000,
            max_bytes: 256 << 20,
        }
    }
}

/// Errors reading or changing the dead-letter store.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An entry is damaged (it can still be purged).
    #[error("dead letter {0} is damaged: {1}")]
    Damaged(u64, DecodeError),
}

/// One entry as listed: everything but the payload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Its id in the store.
    pub id: u64,
    /// Why it is here.
    pub reason: Reason,
    /// More about why.
    pub detail: String,
    /// Its original topic.
    pub topic: String,
    /// The outbox lane it was in, if it reached the outbox.
    pub lane: Option<u8>,
    /// When it was set aside: wall clock, ms since the Unix epoch.
    pub at_ms: u64,
    /// Payload bytes.
    pub payload_bytes: usize,
}

/// One entry with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its id in the store.
    pub id: u64,
    /// The letter.
    pub letter: DeadLetter,
}

impl Entry {
    /// What a listing shows of it.
    pub fn summary(&self) -> Summary {
        let l = &self.letter;
        Summary {
            id: self.id,
            reason: l.reason,
            detail: l.detail.clone(),
            topic: l.record.message.topic.clone(),
            lane: l.lane,
            at_ms: l.at_ms,
            payload_bytes: l.record.message.payload.len(),
        }
    }
}

/// The store's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetterStats {
    /// Entries kept.
    pub messages: u64,
    /// Bytes kept (stored size).
    pub bytes: u64,
    /// `[dead_letter] max_messages` in force.
    pub max_messages: u64,
    /// `[dead_letter] max_bytes` in force.
    pub max_bytes: u64,
}

/// The counters as stored.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    next_id: u64,
    count: u64,
    bytes: u64,
    /// No entry below this id exists.
    head: u64,
}

const COUNTERS: &[u8] = b"c";

fn key(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'r');
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn parse_key(k: &[u8]) -> Option<u64> {
    match k {
        [b'r', rest @ ..] if rest.len() == 8 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(rest);
            Some(u64::from_be_bytes(a))
        }
        _ => None,
    }
}

/// The counters as stored: the same three big-endian u64s as a lane's.
fn encode_totals(t: &Totals) -> Vec<u8> {
    crate::layout::encode_lane_meta(t.next_id, t.count, t.bytes)
}

fn decode_totals(b: &[u8]) -> Option<(u64, u64, u64)> {
    crate::layout::decode_lane_meta(b)
}

/// The dead-letter store. Every change holds its lock until committed, so
/// the counters stay exact whoever writes (the outbox's writer, an operator).
pub struct DeadLetters {
    store: Store,
    space: Space,
    state: Mutex<Totals>,
    max_messages: AtomicU64,
    max_bytes: AtomicU64,
    metrics: DeadLetterMetrics,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").finish_non_exhaustive()
    }
}

/// Entries added to a batch, not yet committed: the store stays locked
/// until [`Staged::done`] (or its drop, which counts as a failed commit).
pub(crate) struct Staged<'a> {
    store: &'a DeadLetters,
    guard: MutexGuard<'a, Totals>,
    after: Totals,
    added: Vec<Reason>,
    evicted: u64,
    /// The id each letter got, in order (`None`: larger than the store).
    pub(crate) ids: Vec<Option<u64>>,
}

impl Staged<'_> {
    /// The batch was committed (`ok`) or not.
    pub(crate) fn done(mut self, ok: bool) {
        if !ok {
            return;
        }
        *self.guard = self.after;
        let m = &self.store.metrics;
        for r in &self.added {
            m.added(*r);
        }
        m.evicted(self.evicted);
        m.set(self.after.count, self.after.bytes);
    }
}

impl DeadLetters {
    /// Opens the store in `store`'s `dead-letter` space.
    ///
    /// # Errors
    /// Storage errors.
    pub fn open(
        store: &Store,
        config: &DeadLetterConfig,
        metrics: DeadLetterMetrics,
    ) -> Result<DeadLetters, StoreError> {
        let space = store.space("dead-letter")?;
        let mut t = Totals::default();
        if let Some((next_id, count, bytes)) = space.get(COUNTERS)?.and_then(|b| decode_totals(&b)) {
            (t.next_id, t.count, t.bytes) = (next_id, count, bytes);
        }
        t.head = match space.range(key(0)..key(u64::MAX)).next().transpose()? {
            Some((k, _)) => parse_key(&k).unwrap_or(t.next_id),
            None => t.next_id,
        };
        metrics.set(t.count, t.bytes);
        Ok(DeadLetters {
            store: store.clone(),
            space,
            state: Mutex::new(t),
            max_messages: AtomicU64::new(config.max_messages),
            max_bytes: AtomicU64::new(config.max_bytes),
            metrics,
        })
    }

    /// Adds `letters` to `batch`, evicting the oldest entries as the quota
    /// needs. A letter larger than `max_bytes` alone is not kept (counted
    /// as evicted). The store stays locked until the returned value's
    /// [`Staged::done`].
    pub(crate) fn stage(&self, batch: &mut Batch, letters: Vec<DeadLetter>) -> Staged<'_> {
        let guard = holdfast_model::lock(&self.state);
        let mut after = *guard;
        let max_messages = self.max_messages.load(Ordering::Relaxed);
        let max_bytes = self.max_bytes.load(Ordering::Relaxed);
        let mut evicted = 0;
        let mut ids = vec![None; letters.len()];
        // Encoded; those that cannot be are logged and left out.
        let mut values: Vec<(usize, Reason, Vec<u8>)> = Vec::with_capacity(letters.len());
        for (i, l) in letters.into_iter().enumerate() {
            match l.encode() {
                Ok(v) => values.push((i, l.reason, v)),
                Err(e) => tracing::error!(topic = %l.record.message.topic, "dead letter not kept: {e}"),
            }
        }
        // Only the newest that fit on their own are kept.
        let (mut n, mut b) = (0u64, 0u64);
        let mut keep_from = values.len();
        for (j, (_, _, v)) in values.iter().enumerate().rev() {
            if n + 1 > max_messages || b + v.len() as u64 > max_bytes {
                break;
            }
            n += 1;
            b += v.len() as u64;
            keep_from = j;
        }
        evicted += keep_from as u64;
        let kept = values.split_off(keep_from);
        // The oldest stored entries go until the new ones fit.
        let over = |t: &Totals| t.count + n > max_messages || t.bytes + b > max_bytes;
        if over(&after) {
            for entry in self.space.range(key(after.head)..key(u64::MAX)) {
                if !over(&after) {
                    break;
                }
                let Ok((k, v)) = entry else { break };
                let Some(id) = parse_key(&k) else { continue };
                batch.remove(&self.space, k);
                after.count = after.count.saturating_sub(1);
                after.bytes = after.bytes.saturating_sub(v.len() as u64);
                after.head = id + 1;
                evicted += 1;
            }
        }
        let mut added = Vec::with_capacity(kept.len());
        for (i, reason, v) in kept {
            let id = after.next_id;
            after.next_id += 1;
            after.count += 1;
            after.bytes += v.len() as u64;
            batch.insert(&self.space, key(id), v);
            ids[i] = Some(id);
            added.push(reason);
        }
        if after.count == 0 {
            after.head = after.next_id;
        }
        batch.insert(&self.space, COUNTERS.to_vec(), encode_totals(&after));
        Staged {
            store: self,
            guard,
            after,
            added,
            evicted,
            ids,
        }
    }

    /// Keeps `letters` now (synced); the ids they got (`None`: not kept,
    /// larger than the store's byte quota).
    ///
    /// # Errors
    /// Storage errors; nothing was kept.
    pub fn put(&self, letters: Vec<DeadLetter>) -> Result<Vec<Option<u64>>, StoreError> {
        let mut batch = self.store.batch();
        let staged = self.stage(&mut batch, letters);
        let ids = staged.ids.clone();
        let result = batch.commit(Durability::SyncData);
        staged.done(result.is_ok());
        result.map(|()| ids)
    }

    /// Up to `limit` entries with ids above `after` (all when `None`),
    /// oldest first. Damaged entries are skipped and logged (`purge`
    /// removes them).
    ///
    /// # Errors
    /// Storage errors.
    pub fn list(&self, after: Option<u64>, limit: usize) -> Result<Vec<Summary>, StoreError> {
        let from = after.map(|a| a.saturating_add(1)).unwrap_or(0);
        let mut out = Vec::new();
        for entry in self.space.range(key(from)..key(u64::MAX)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry?;
            let Some(id) = parse_key(&k) else { continue };
            match DeadLetter::decode(&v.into()) {
                Ok(letter) => out.push(Entry { id, letter }.summary()),
                Err(e) => tracing::warn!(id, "dead letter is damaged: {e}"),
            }
        }
        Ok(out)
    }

    /// The entry `id`, with its message.
    ///
    /// # Errors
    /// Storage errors, a damaged entry.
    pub fn get(&self, id: u64) -> Result<Option<Entry>, DeadLetterError> {
        let Some(v) = self.space.get(&key(id))? else {
            return Ok(None);
        };
        let letter = DeadLetter::decode(&v.into()).map_err(|e| DeadLetterError::Damaged(id, e))?;
        Ok(Some(Entry { id, letter }))
    }

    /// Removes the entries `ids` (unknown ids are passed over); how many
    /// were removed. `replayed` says why, for the metrics.
    fn remove(&self, ids: &[u64], replayed: bool) -> Result<u64, StoreError> {
        let mut guard = holdfast_model::lock(&self.state);
        let mut after = *guard;
        let mut batch = self.store.batch();
        let mut n = 0;
        for &id in ids {
            if let Some(v) = self.space.get(&key(id))? {
                batch.remove(&self.space, key(id));
                after.count = after.count.saturating_sub(1);
                after.bytes = after.bytes.saturating_sub(v.len() as u64);
                n += 1;
            }
        }
        if n == 0 {
            return Ok(0);
        }
        if after.count == 0 {
            after.head = after.next_id;
        }
        batch.insert(&self.space, COUNTERS.to_vec(), encode_totals(&after));
        batch.commit(Durability::SyncData)?;
        *guard = after;
        if replayed {
            (0..n).for_each(|_| self.metrics.replayed());
        } else {
            self.metrics.purged(n);
        }
        self.metrics.set(after.count, after.bytes);
        Ok(n)
    }

    /// Purges the entries `ids`; how many there were.
    ///
    /// # Errors
    /// Storage errors; nothing was removed.
    pub fn purge(&self, ids: &[u64]) -> Result<u64, StoreError> {
        self.remove(ids, false)
    }

    /// Purges every entry; how many there were.
    ///
    /// # Errors
    /// Storage errors; nothing was removed.
    pub fn purge_all(&self) -> Result<u64, StoreError> {
        let ids: Vec<u64> = self
            .space
            .range(key(0)..key(u64::MAX))
            .filter_map(|e| e.ok().and_then(|(k, _)| parse_key(&k)))
            .collect();
        self.remove(&ids, false)
    }

    /// Removes entry `id` once it has been replayed; false when it was gone.
    ///
    /// # Errors
    /// Storage errors.
    pub fn replayed(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.remove(&[id], true)? > 0)
    }

    /// The store's figures.
    pub fn stats(&self) -> DeadLetterStats {
        let t = *holdfast_model::lock(&self.state);
        DeadLetterStats {
            messages: t.count,
            bytes: t.bytes,
            max_messages: self.max_messages.load(Ordering::Relaxed),
            max_bytes: self.max_bytes.load(Ordering::Relaxed),
        }
    }

    /// Takes `max_messages` and `max_bytes` of `new`; returns the keys that
    /// changed. A lowered quota evicts the oldest entries now.
    ///
    /// # Errors
    /// Storage errors evicting (the new quota is in force all the same).
    pub fn apply_limits(&self, new: &DeadLetterConfig) -> Result<Vec<String>, StoreError> {
        let changed = holdfast_model::store_limits(&[
            ("dead_letter.max_messages", &self.max_messages, new.max_messages),
            ("dead_letter.max_bytes", &self.max_bytes, new.max_bytes),
        ]);
        if !changed.is_empty() {
            self.put(Vec::new())?;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests;
