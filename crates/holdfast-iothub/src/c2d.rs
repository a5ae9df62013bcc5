//! Durable cloud-to-device queues, and the feedback their senders get.
//!
//! A cloud-to-device message is queued, in the node's store, at the node
//! nearest its device that cannot hand it on yet: the device is registered
//! here but not connected (or not subscribed to its `devicebound` topic),
//! or the child gateway it is behind is not connected. It waits there, in
//! order per device, until the device or the gateway returns, or its
//! time-to-live passes, or it is refused because the device's queue is at
//! `iothub.c2d_max_queued_per_device`. A message handed to a child gateway
//! stays queued here until the child has stored it (it acknowledges), so
//! a link that breaks loses nothing.
//!
//! A message for a device connected here leaves the queue only when the
//! device has it (its PUBACK), not when its MQTT session was handed it: a
//! session that lets it go undelivered (its queue full, the connection
//! gone) leaves it queued here.
//!
//! Whatever becomes of a message (delivered to the device, expired,
//! refused) is a feedback record for its owner, the node where it
//! was sent; a node below sends its feedback up the link, again durably
//! until the parent acknowledges it.
//!
//! A node takes each message once: the id of every message it queued (or
//! refused) is kept, in the same commit as the queue insert, until the
//! message's time-to-live (and [`SEEN_GRACE_MS`] for clocks that differ)
//! has passed, so a parent that sends it again because the acknowledgement
//! was lost gets the acknowledgement again, and the message is not queued
//! (nor delivered) a second time. At most [`MAX_SEEN`] ids are kept; the
//! ones whose time is nearest go first.
//!
//! Space `c2d`: `q\0<seq u64 BE>` queued messages, `u\0<seq>` feedback
//! waiting to go up, `f\0<time ms BE><id>` feedback recorded here (the last
//! [`MAX_FEEDBACK`]), `s\0<id>` the ids taken (value: until when, ms BE).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use holdfast_model::lock;
use holdfast_store::{Durability, Space, Store, StoreError};

/// Feedback records a node keeps (the oldest go first).
pub const MAX_FEEDBACK: usize = 10_000;

/// Ids of messages taken that a node keeps (see the module's docs).
pub const MAX_SEEN: usize = 100_000;

/// How long after a message's expiry its id is kept: a parent whose clock
/// is behind this node's may send it again until its own clock says it
/// expired.
pub const SEEN_GRACE_MS: u64 = 3_600_000;

/// What [`C2d::enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued now.
    New,
    /// Taken before (it is queued, or was delivered, refused or expired):
    /// not queued again.
    Again,
}

/// A cloud-to-device message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct C2dMessage {
    /// Its id (the owner makes it).
    pub id: String,
    /// The device.
    pub device: String,
    /// The topic it is delivered on (`devices/{d}/messages/devicebound/…`).
    pub topic: String,
    /// Payload, base64.
    pub payload: String,
    /// Content type.
    pub content_type: Option<String>,
    /// User properties.
    pub properties: Vec<(String, String)>,
    /// When it was sent, ms since the Unix epoch.
    pub enqueued_ms: u64,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
    /// The node that records its feedback.
    pub owner: String,
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The device has it: it acknowledged it (PUBACK; at QoS 0, it was
    /// written to its connection), or an older child gateway was handed it.
    Delivered,
    /// Its time-to-live passed before the device could get it.
    Expired,
    /// Refused: the device's queue was full, or it is unknown, or it can
    /// never reach the device (larger than its Maximum Packet Size, or
    /// refused by its PUBACK).
    Rejected,
}

/// A feedback record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    /// The message's id.
    pub id: String,
    /// The device.
    pub device: String,
    /// What became of it.
    pub outcome: Outcome,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// The node where it happened.
    pub node: String,
    /// Why, for `rejected` and `expired`.
    pub reason: Option<String>,
    /// The node that records it.
    pub owner: String,
}

/// Why a message was not queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The device's queue is full.
    #[error("the queue of {device} holds {max} messages (iothub.c2d_max_queued_per_device)")]
    Full {
        /// Device.
        device: String,
        /// The cap.
        max: usize,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Default)]
struct Inner {
    /// Per device: sequence → message, in order.
    queues: HashMap<String, BTreeMap<u64, C2dMessage>>,
    /// Feedback waiting to go up: sequence → record.
    up: BTreeMap<u64, Feedback>,
    /// Feedback recorded here, oldest first (keys).
    recorded: std::collections::VecDeque<Vec<u8>>,
    /// Ids taken: id → kept until (ms).
    seen: HashMap<String, u64>,
    /// The same, by time.
    seen_by_time: BTreeSet<(u64, String)>,
    next_seq: u64,
}

impl Inner {
    /// Records `id` as taken (kept until `until`) in batch `b`, forgetting
    /// the oldest beyond [`MAX_SEEN`]; applied to memory by the caller
    /// after the commit, with [`Inner::seen_applied`].
    fn remember(&self, space: &Space, b: &mut holdfast_store::Batch, id: &str, until: u64) -> Vec<(u64, String)> {
        b.insert(space, seen_key(id), until.to_be_bytes().to_vec());
        let over = (self.seen.len() + 1).saturating_sub(MAX_SEEN);
        let evicted: Vec<(u64, String)> = self.seen_by_time.iter().take(over).cloned().collect();
        for (_, old) in &evicted {
            b.remove(space, seen_key(old));
        }
        evicted
    }

    fn seen_applied(&mut self, id: &str, until: u64, evicted: Vec<(u64, String)>) {
        for (t, old) in evicted {
            self.seen_by_time.remove(&(t, old.clone()));
            self.seen.remove(&old);
        }
        if let Some(t) = self.seen.insert(id.to_string(), until) {
            self.seen_by_time.remove(&(t, id.to_string()));
        }
        self.seen_by_time.insert((until, id.to_string()));
    }
}

fn seen_key(id: &str) -> Vec<u8> {
    let mut k = vec![b's', 0];
    k.extend_from_slice(id.as_bytes());
    k
}

/// The queues of one node.
pub struct C2d {
    store: Store,
    space: Space,
    node: String,
    max_per_device: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for C2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("C2d").field("node", &self.node).finish_non_exhaustive()
    }
}

fn key(prefix: u8, seq: u64) -> Vec<u8> {
    let mut k = vec![prefix, 0];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl C2d {
    /// Opens the `c2d` space of node `node`.
    ///
    /// # Errors
    /// Storage errors.
    pub fn open(store: &Store, node: &str, max_per_device: usize) -> Result<C2d, StoreError> {
        let space = store.space("c2d")?;
        let mut inner = Inner::default();
        for item in space.range(b"q\0".to_vec()..b"q\x01".to_vec()) {
            let (k, v) = item?;
            let Some(seq) = k.get(2..10).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) else {
                continue;
            };
            if let Ok(m) = serde_json::from_slice::<C2dMessage>(&v) {
                inner.next_seq = inner.next_seq.max(seq + 1);
                inner.queues.entry(m.device.clone()).or_default().insert(seq, m);
            }
        }
        for item in space.range(b"u\0".to_vec()..b"u\x01".to_vec()) {
            let (k, v) = item?;
            let Some(seq) = k.get(2..10).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) else {
                continue;
            };
            if let Ok(f) = serde_json::from_slice::<Feedback>(&v) {
                inner.next_seq = inner.next_seq.max(seq + 1);
                inner.up.insert(seq, f);
            }
        }
        for item in space.range(b"f\0".to_vec()..b"f\x01".to_vec()) {
            let (k, _) = item?;
            inner.recorded.push_back(k);
        }
        for item in space.range(b"s\0".to_vec()..b"s\x01".to_vec()) {
            let (k, v) = item?;
            let (Some(id), Some(until)) = (
                k.get(2..).and_then(|b| std::str::from_utf8(b).ok()),
                v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes),
            ) else {
                continue;
            };
            inner.seen.insert(id.to_string(), until);
            inner.seen_by_time.insert((until, id.to_string()));
        }
        Ok(C2d {
            store: store.clone(),
            space,
            node: node.to_string(),
            max_per_device: max_per_device.max(1),
            inner: Mutex::new(inner),
        })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Queues a message behind the device's others, durably, once: a
    /// message taken before (its id is known) is not queued again.
    ///
    /// # Errors
    /// The device's queue is full (its id is then known: sent again, it is
    /// [`Enqueued::Again`]), or storage failed (nothing is recorded).
    pub fn enqueue(&self, m: C2dMessage) -> Result<Enqueued, QueueError> {
        let mut inner = lock(&self.inner);
        // Taken before (resent over a new link after a lost
        // acknowledgement): queued, delivered or refused already.
        if inner.seen.contains_key(&m.id)
            || inner
                .queues
                .get(&m.device)
                .is_some_and(|q| q.values().any(|x| x.id == m.id))
        {
            return Ok(Enqueued::Again);
        }
        let until = m.expires_ms.saturating_add(SEEN_GRACE_MS);
        let mut b = self.store.batch();
        let evicted = inner.remember(&self.space, &mut b, &m.id, until);
        let queued = inner.queues.get(&m.device).map_or(0, BTreeMap::len);
        if queued >= self.max_per_device {
            b.commit(Durability::SyncAll)?;
            inner.seen_applied(&m.id, until, evicted);
            return Err(QueueError::Full {
                device: m.device,
                max: self.max_per_device,
            });
        }
        let seq = inner.next_seq;
        b.insert(&self.space, key(b'q', seq), serde_json::to_vec(&m).unwrap_or_default());
        b.commit(Durability::SyncAll)?;
        inner.seen_applied(&m.id, until, evicted);
        inner.next_seq += 1;
        inner.queues.entry(m.device.clone()).or_default().insert(seq, m);
        Ok(Enqueued::New)
    }

    /// Whether message `id` was taken here (queued or refused) and its id
    /// is still kept.
    pub fn taken(&self, id: &str) -> bool {
        lock(&self.inner).seen.contains_key(id)
    }

    /// Forgets the ids of messages whose time (expiry and
    /// [`SEEN_GRACE_MS`]) passed at `now_ms`.
    ///
    /// # Errors
    /// Storage failed (they are kept).
    pub fn forget_taken(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut inner = lock(&self.inner);
        let old: Vec<(u64, String)> = inner
            .seen_by_time
            .iter()
            .take_while(|(t, _)| *t <= now_ms)
            .take(10_000)
            .cloned()
            .collect();
        if old.is_empty() {
            return Ok(0);
        }
        let mut b = self.store.batch();
        for (_, id) in &old {
            b.remove(&self.space, seen_key(id));
        }
        b.commit(Durability::SyncAll)?;
        for (t, id) in &old {
            inner.seen_by_time.remove(&(*t, id.clone()));
            inner.seen.remove(id);
        }
        Ok(old.len())
    }

    /// The device's queued messages, in order.
    pub fn queued(&self, device: &str) -> Vec<C2dMessage> {
        lock(&self.inner)
            .queues
            .get(device)
            .map(|q| q.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `device` has messages queued here.
    pub fn has_queued(&self, device: &str) -> bool {
        lock(&self.inner).queues.get(device).is_some_and(|q| !q.is_empty())
    }

    /// Devices with queued messages, and how many.
    pub fn queues(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = lock(&self.inner)
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(d, q)| (d.clone(), q.len()))
            .collect();
        v.sort();
        v
    }

    /// Takes message `id` of `device` off its queue.
    ///
    /// # Errors
    /// Storage failed (it stays queued).
    pub fn remove(&self, device: &str, id: &str) -> Result<Option<C2dMessage>, StoreError> {
        let mut inner = lock(&self.inner);
        let Some(q) = inner.queues.get_mut(device) else {
            return Ok(None);
        };
        let Some(seq) = q.iter().find(|(_, m)| m.id == id).map(|(s, _)| *s) else {
            return Ok(None);
        };
        let mut b = self.store.batch();
        b.remove(&self.space, key(b'q', seq));
        b.commit(Durability::SyncAll)?;
        let m = q.remove(&seq);
        if q.is_empty() {
            inner.queues.remove(device);
        }
        Ok(m)
    }

    /// Takes every message whose time-to-live passed at `now_ms` off the queues.
    ///
    /// # Errors
    /// Storage failed (they stay queued).
    pub fn take_expired(&self, now_ms: u64) -> Result<Vec<C2dMessage>, StoreError> {
        let mut inner = lock(&self.inner);
        let gone: Vec<(String, u64)> = inner
            .queues
            .iter()
            .flat_map(|(d, q)| {
                q.iter()
                    .filter(|(_, m)| m.expires_ms <= now_ms)
                    .map(|(s, _)| (d.clone(), *s))
                    .collect::<Vec<_>>()
            })
            .collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let mut b = self.store.batch();
        for (_, seq) in &gone {
            b.remove(&self.space, key(b'q', *seq));
        }
        b.commit(Durability::SyncAll)?;
        let mut out = Vec::new();
        for (d, seq) in gone {
            if let Some(q) = inner.queues.get_mut(&d) {
                if let Some(m) = q.remove(&seq) {
                    out.push(m);
                }
                if q.is_empty() {
                    inner.queues.remove(&d);
                }
            }
        }
        Ok(out)
    }

    /// Keeps a feedback record: here when this node owns the message, else
    /// as waiting to go up (returned, to send now if the link is up).
    ///
    /// # Errors
    /// Storage failed.
    pub fn feedback(&self, f: Feedback) -> Result<Option<Feedback>, StoreError> {
        let mut inner = lock(&self.inner);
        let mut b = self.store.batch();
        if f.owner == self.node {
            let mut k = key(b'f', f.at_ms);
            k.extend_from_slice(f.id.as_bytes());
            b.insert(&self.space, k.clone(), serde_json::to_vec(&f).unwrap_or_default());
            while inner.recorded.len() >= MAX_FEEDBACK {
                if let Some(old) = inner.recorded.pop_front() {
                    b.remove(&self.space, old);
                }
            }
            b.commit(Durability::SyncAll)?;
            inner.recorded.push_back(k);
            Ok(None)
        } else {
            // Sent again (its acknowledgement was lost): already waiting.
            if inner.up.values().any(|x| x.id == f.id && x.outcome == f.outcome) {
                return Ok(Some(f));
            }
            let seq = inner.next_seq;
            b.insert(&self.space, key(b'u', seq), serde_json::to_vec(&f).unwrap_or_default());
            b.commit(Durability::SyncAll)?;
            inner.next_seq += 1;
            inner.up.insert(seq, f.clone());
            Ok(Some(f))
        }
    }

    /// Feedback waiting to go up, oldest first.
    pub fn pending_up(&self) -> Vec<Feedback> {
        lock(&self.inner).up.values().cloned().collect()
    }

    /// The parent has feedback `id` of `device` with `outcome`: forget it here.
    ///
    /// # Errors
    /// Storage failed.
    pub fn up_acknowledged(&self, id: &str, outcome: Outcome) -> Result<(), StoreError> {
        let mut inner = lock(&self.inner);
        let seqs: Vec<u64> = inner
            .up
            .iter()
            .filter(|(_, f)| f.id == id && f.outcome == outcome)
            .map(|(s, _)| *s)
            .collect();
        if seqs.is_empty() {
            return Ok(());
        }
        let mut b = self.store.batch();
        for s in &seqs {
            b.remove(&self.space, key(b'u', *s));
        }
        b.commit(Durability::SyncAll)?;
        for s in seqs {
            inner.up.remove(&s);
        }
        Ok(())
    }

    /// Feedback recorded here, newest first, at most `limit`.
    ///
    /// # Errors
    /// Storage failed.
    pub fn recorded(&self, limit: usize) -> Result<Vec<Feedback>, StoreError> {
        let mut out = Vec::new();
        for item in self.space.range_rev(b"f\0".to_vec()..b"f\x01".to_vec()) {
            let (_, v) = item?;
            if let Ok(f) = serde_json::from_slice::<Feedback>(&v) {
                out.push(f);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, device: &str, expires_ms: u64) -> C2dMessage {
        C2dMessage {
            id: id.into(),
            device: device.into(),
            topic: format!("devices/{device}/messages/devicebound/"),
            payload: String::new(),
            content_type: None,
            properties: Vec::new(),
            enqueued_ms: 0,
            expires_ms,
            owner: "root".into(),
        }
    }

    #[test]
    fn queues_survive_a_reopen_in_order_with_a_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let q = C2d::open(&store, "gw", 3).unwrap();
        for id in ["a", "b", "c"] {
            q.enqueue(msg(id, "d1", 100)).unwrap();
        }
        assert!(matches!(
            q.enqueue(msg("d", "d1", 100)),
            Err(QueueError::Full { max: 3, .. })
        ));
        assert_eq!(q.enqueue(msg("a", "d1", 100)).unwrap(), Enqueued::Again);
        q.enqueue(msg("x", "d2", 50)).unwrap();
        q.remove("d1", "b").unwrap();
        drop(q);
        let q = C2d::open(&store, "gw", 3).unwrap();
        let ids: Vec<String> = q.queued("d1").into_iter().map(|m| m.id).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(q.enqueue(msg("a", "d1", 100)).unwrap(), Enqueued::Again);
        assert_eq!(q.queued("d1").len(), 2, "a message queued again keeps its place");
        let expired = q.take_expired(60).unwrap();
        assert_eq!(expired.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["x"]);
        assert_eq!(q.queues(), [("d1".to_string(), 2)]);
    }

    #[test]
    fn a_message_is_taken_once_across_reopens_until_its_time_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let q = C2d::open(&store, "gw", 1).unwrap();
        assert_eq!(q.enqueue(msg("a", "d1", 100)).unwrap(), Enqueued::New);
        // Delivered: off the queue.
        q.remove("d1", "a").unwrap();
        assert_eq!(q.enqueue(msg("a", "d1", 100)).unwrap(), Enqueued::Again, "sent again");
        assert!(q.queued("d1").is_empty());
        // Refused (the queue is full): sent again, it is not queued either.
        q.enqueue(msg("b", "d1", 100)).unwrap();
        assert!(matches!(q.enqueue(msg("c", "d1", 100)), Err(QueueError::Full { .. })));
        q.remove("d1", "b").unwrap();
        assert_eq!(q.enqueue(msg("c", "d1", 100)).unwrap(), Enqueued::Again);
        drop(q);
        let q = C2d::open(&store, "gw", 1).unwrap();
        for id in ["a", "b", "c"] {
            assert!(q.taken(id), "{id} is known after a reopen");
        }
        assert_eq!(q.enqueue(msg("a", "d1", 100)).unwrap(), Enqueued::Again);
        // Kept until the expiry and the grace, then forgotten, durably.
        assert_eq!(q.forget_taken(100 + SEEN_GRACE_MS - 1).unwrap(), 0);
        assert_eq!(q.forget_taken(100 + SEEN_GRACE_MS).unwrap(), 3);
        drop(q);
        let q = C2d::open(&store, "gw", 1).unwrap();
        assert!(!q.taken("a"));
        assert_eq!(q.enqueue(msg("a", "d1", 100)).unwrap(), Enqueued::New);
    }

    #[test]
    fn feedback_is_recorded_by_the_owner_and_sent_up_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let gw = C2d::open(&store, "gw", 50).unwrap();
        let f = Feedback {
            id: "m1".into(),
            device: "d1".into(),
            outcome: Outcome::Delivered,
            at_ms: 5,
            node: "gw".into(),
            reason: None,
            owner: "root".into(),
        };
        assert!(gw.feedback(f.clone()).unwrap().is_some());
        drop(gw);
        let gw = C2d::open(&store, "gw", 50).unwrap();
        assert_eq!(gw.pending_up(), std::slice::from_ref(&f));
        gw.up_acknowledged("m1", Outcome::Delivered).unwrap();
        assert!(gw.pending_up().is_empty());
        let dir2 = tempfile::tempdir().unwrap();
        let root = C2d::open(&Store::open(dir2.path()).unwrap(), "root", 50).unwrap();
        assert!(root.feedback(f.clone()).unwrap().is_none());
        assert_eq!(root.recorded(10).unwrap(), [f]);
    }
}
