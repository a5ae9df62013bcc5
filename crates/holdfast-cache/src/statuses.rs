//! Stored answers that are not byte ranges of an object: other statuses
//! than 200 and 206 (203, 204, 300, 301, 308, 404, 405, 410, 414, 501
//! heuristically; any final status with explicit freshness; RFC 9111 §3,
//! RFC 9110 §15.1) and empty 200s. Each is small (the fill reads at most
//! 64 KiB of such a body), kept whole in memory and in the index
//! (`s\0<key>` → a JSON head, its length first, then the body), bounded in
//! number and bytes, the oldest dropped first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use holdfast_model::lock;
use holdfast_store::{Durability, Space, Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::rfc9111::{Freshness, Vary};

/// Most answers kept.
pub(crate) const MAX_ANSWERS: usize = 10_000;
/// Most bytes of answers (bodies and fields) kept.
pub(crate) const MAX_BYTES: u64 = 32 << 20;

/// A stored answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) head: Head,
    pub(crate) body: Bytes,
}

/// Its status, fields and freshness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Head {
    pub(crate) status: u16,
    /// End-to-end fields but `Content-Length` and `Age`.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) freshness: Freshness,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) vary: Option<Vary>,
}

impl Answer {
    fn size(&self, key: &str) -> u64 {
        let fields: usize = self.head.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        (key.len() + fields + self.body.len()) as u64
    }

    /// Whether it was selected for requests like one whose upstream fields
    /// are `sent` (RFC 9111 §4.1).
    pub(crate) fn selected_for(&self, sent: &hyper::HeaderMap) -> bool {
        self.head
            .vary
            .as_ref()
            .is_none_or(|v| crate::rfc9111::selecting_values(&v.names, sent) == v.values)
    }

    /// The value of a stored field.
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.head
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn encode(&self) -> Vec<u8> {
        let head = serde_json::to_vec(&self.head).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + head.len() + self.body.len());
        out.extend_from_slice(&u32::try_from(head.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&head);
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(v: &[u8]) -> Option<Answer> {
        let n = u32::from_le_bytes(v.get(..4)?.try_into().ok()?) as usize;
        let head = serde_json::from_slice(v.get(4..4 + n)?).ok()?;
        Some(Answer {
            head,
            body: Bytes::copy_from_slice(&v[4 + n..]),
        })
    }
}

#[derive(Default)]
struct Table {
    answers: HashMap<String, Arc<Answer>>,
    /// Keys, oldest first (a key may appear again after its answer was
    /// replaced; stale entries are skipped).
    order: VecDeque<(String, u64)>,
    bytes: u64,
    seq: u64,
    /// The `seq` each key was stored under.
    stamps: HashMap<String, u64>,
}

/// The stored answers (see the module docs).
pub(crate) struct Statuses {
    store: Store,
    space: Space,
    table: Mutex<Table>,
}

fn skey(key: &str) -> Vec<u8> {
    let mut k = b"s\0".to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

impl Statuses {
    /// Loads the stored answers from the index space `cache-index`.
    pub(crate) fn open(store: &Store) -> Result<Statuses, StoreError> {
        let space = store.space("cache-index")?;
        let s = Statuses {
            store: store.clone(),
            space,
            table: Mutex::new(Table::default()),
        };
        let mut bad = Vec::new();
        let mut loaded = Vec::new();
        for item in s.space.range(b"s\0".to_vec()..b"s\x01".to_vec()) {
            let (k, v) = item?;
            match (std::str::from_utf8(&k[2..]), Answer::decode(&v)) {
                (Ok(key), Some(a)) => loaded.push((key.to_string(), a)),
                _ => bad.push(k),
            }
        }
        if !bad.is_empty() {
            let mut b = s.store.batch();
            for k in bad {
                b.remove(&s.space, k);
            }
            b.commit(Durability::Buffered)?;
        }
        // Oldest first, so eviction order survives a restart roughly.
        loaded.sort_by_key(|(_, a)| a.head.freshness.response_time);
        let mut t = lock(&s.table);
        for (key, a) in loaded {
            Self::insert(&mut t, key, Arc::new(a));
        }
        drop(t);
        Ok(s)
    }

    fn insert(t: &mut Table, key: String, a: Arc<Answer>) {
        if let Some(old) = t.answers.remove(&key) {
            t.bytes = t.bytes.saturating_sub(old.size(&key));
        }
        t.seq += 1;
        let seq = t.seq;
        t.bytes += a.size(&key);
        t.stamps.insert(key.clone(), seq);
        t.order.push_back((key.clone(), seq));
        t.answers.insert(key, a);
    }

    /// The answer stored for `key`.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Answer>> {
        lock(&self.table).answers.get(key).cloned()
    }

    /// Stores `answer` for `key` (replacing what was there), dropping the
    /// oldest answers past the bounds. Returns how many were dropped.
    pub(crate) fn put(&self, key: &str, answer: Answer) -> usize {
        let value = answer.encode();
        let mut dropped = Vec::new();
        {
            let mut t = lock(&self.table);
            Self::insert(&mut t, key.to_string(), Arc::new(answer));
            while t.answers.len() > MAX_ANSWERS || t.bytes > MAX_BYTES {
                let Some((k, seq)) = t.order.pop_front() else {
                    break;
                };
                // The answer just stored is the newest: it goes last, and
                // one answer (at most 64 KiB of body) is within the bounds.
                if t.stamps.get(&k) != Some(&seq) {
                    continue;
                }
                t.stamps.remove(&k);
                if let Some(a) = t.answers.remove(&k) {
                    t.bytes = t.bytes.saturating_sub(a.size(&k));
                }
                dropped.push(k);
            }
            // Entries of replaced answers are skipped when they come up;
            // keep the queue from growing without bound.
            if t.order.len() > 2 * t.answers.len() + 64 {
                let Table { order, stamps, .. } = &mut *t;
                order.retain(|(k, s)| stamps.get(k) == Some(s));
            }
        }
        let mut b = self.store.batch();
        b.insert(&self.space, skey(key), value);
        for k in &dropped {
            b.remove(&self.space, skey(k));
        }
        if let Err(e) = b.commit(Durability::Buffered) {
            tracing::warn!(error = %e, key, "cache: could not record a stored answer");
        }
        dropped.len()
    }

    /// Drops what is stored for every key passing `which`; how many.
    pub(crate) fn remove_where(&self, which: impl Fn(&str) -> bool) -> usize {
        let removed: Vec<String> = {
            let mut t = lock(&self.table);
            let keys: Vec<String> = t.answers.keys().filter(|k| which(k)).cloned().collect();
            for k in &keys {
                t.stamps.remove(k);
                if let Some(a) = t.answers.remove(k) {
                    t.bytes = t.bytes.saturating_sub(a.size(k));
                }
            }
            keys
        };
        if !removed.is_empty() {
            let mut b = self.store.batch();
            for k in &removed {
                b.remove(&self.space, skey(k));
            }
            if let Err(e) = b.commit(Durability::Buffered) {
                tracing::warn!(error = %e, "cache: could not remove stored answers");
            }
        }
        removed.len()
    }

    /// Answers stored, and their bytes.
    pub(crate) fn totals(&self) -> (usize, u64) {
        let t = lock(&self.table);
        (t.answers.len(), t.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rfc9111::{Freshness, Operator};

    fn answer(status: u16, body: &[u8]) -> Answer {
        Answer {
            head: Head {
                status,
                headers: vec![("location".into(), "/x".into())],
                freshness: Freshness::compute(
                    &hyper::HeaderMap::new(),
                    1,
                    1,
                    Operator {
                        immutable: false,
                        ttl: 60,
                    },
                ),
                vary: None,
            },
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn answers_survive_a_reopen_and_are_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("s")).unwrap();
        let s = Statuses::open(&store).unwrap();
        s.put("a", answer(301, b""));
        s.put("b", answer(404, b"not here"));
        s.put("a", answer(410, b"gone"));
        assert_eq!(s.get("a").unwrap().head.status, 410);
        drop(s);
        let s = Statuses::open(&store).unwrap();
        assert_eq!(s.get("a").unwrap().body, Bytes::from_static(b"gone"));
        assert_eq!(s.get("b").unwrap().field("Location"), Some("/x"));
        assert_eq!(s.remove_where(|k| k == "b"), 1);
        assert!(s.get("b").is_none());
        // Past the byte bound the oldest go first.
        let big = vec![7u8; 60 << 10];
        for i in 0..600 {
            s.put(&format!("k{i}"), answer(404, &big));
        }
        let (n, bytes) = s.totals();
        assert!(bytes <= MAX_BYTES && n < 600, "{n} answers, {bytes} bytes");
        assert!(s.get("k0").is_none() && s.get("k599").is_some());
        assert!(s.get("a").is_none(), "the oldest went first");
        let _ = std::fs::remove_dir_all(tmp.path());
    }
}
