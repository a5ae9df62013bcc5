//! What the broker keeps on disk: persistent sessions (their subscriptions
//! and queued QoS 1/2 messages) in the `sessions` space and retained
//! messages in the `retained` space.
//!
//! Writes go through at once with [`Durability::Buffered`] (they survive a
//! process crash) and a background task syncs them every
//! `mqtt.sync_interval_ms` (then they survive power loss too).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, BufMut, BytesMut};
use holdfast_mqtt::{Packet, Publish, QoS, SubOptions, Version};
use serde::{Deserialize, Serialize};

use super::session::{Msg, Outgoing, SessionState, SubRecord};
use holdfast_store::{Durability, Space, Store, StoreError};

const FORMAT: u8 = 2;

/// A stored session record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Expiry interval, seconds.
    pub expiry_s: u32,
    /// Protocol level of the last connection.
    pub level: u8,
    /// When the last connection ended, ms since the epoch (None while connected).
    pub disconnected_at_ms: Option<u64>,
    /// Subscriptions: filter, qos, no-local, retain-as-published, retain-handling, id.
    pub subs: Vec<(String, u8, bool, bool, u8, Option<u32>)>,
}

impl SessionRecord {
    /// The record of `state`.
    pub fn of(state: &SessionState) -> SessionRecord {
        SessionRecord {
            expiry_s: state.expiry_s,
            level: state.version.level(),
            disconnected_at_ms: state.disconnected_at_ms,
            subs: state
                .subs
                .iter()
                .map(|(f, s)| {
                    let o = s.options;
                    (
                        f.clone(),
                        o.qos as u8,
                        o.no_local,
                        o.retain_as_published,
                        o.retain_handling,
                        s.id,
                    )
                })
                .collect(),
        }
    }

    /// The version.
    pub fn version(&self) -> Version {
        match self.level {
            3 => Version::V31,
            4 => Version::V311,
            _ => Version::V5,
        }
    }

    /// The subscriptions as the session keeps them.
    pub fn sub_records(&self) -> impl Iterator<Item = (String, SubRecord)> + '_ {
        self.subs.iter().map(|(f, q, nl, rap, rh, id)| {
            (
                f.clone(),
                SubRecord {
                    options: SubOptions {
                        qos: QoS::from_u8(*q).unwrap_or(QoS::AtMostOnce),
                        no_local: *nl,
                        retain_as_published: *rap,
                        retain_handling: *rh,
                    },
                    id: *id,
                },
            )
        })
    }
}

/// A loaded session.
#[derive(Debug)]
pub struct LoadedSession {
    /// Client id.
    pub client_id: String,
    /// Its record.
    pub record: SessionRecord,
    /// Queued messages in order; for one whose PUBREC was received, its
    /// packet identifier (only PUBREL/PUBCOMP was outstanding).
    pub queue: Vec<(Outgoing, Option<u16>)>,
}

/// Errors decoding stored entries: the entry is skipped and counted.
#[derive(Debug, thiserror::Error)]
#[error("damaged broker record: {0}")]
pub struct Damaged(&'static str);

/// The broker's storage.
pub struct Persist {
    store: Store,
    sessions: Space,
    retained: Space,
    dirty: AtomicBool,
}

impl std::fmt::Debug for Persist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persist").finish_non_exhaustive()
    }
}

fn session_key(client: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + client.len());
    k.push(b's');
    k.extend_from_slice(client.as_bytes());
    k
}

fn queue_prefix(client: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + client.len() + 8);
    k.push(b'q');
    k.extend_from_slice(&(client.len() as u16).to_be_bytes());
    k.extend_from_slice(client.as_bytes());
    k
}

fn queue_key(client: &str, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(client);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Encodes a message with its delivery details; `released` is the packet id
/// of a QoS 2 delivery whose PUBREC was received.
pub fn encode_msg(out: &Outgoing, released: Option<u16>) -> Vec<u8> {
    let m = &out.msg;
    let mut b = BytesMut::with_capacity(64 + m.topic.len() + m.payload.len());
    b.put_u8(FORMAT);
    b.put_u8(u8::from(m.expires_at_ms.is_some()) | u8::from(released.is_some()) << 1 | u8::from(out.retain) << 2);
    b.put_u8(out.qos as u8);
    b.put_u64(m.expires_at_ms.unwrap_or(0));
    let publisher = m.publisher.as_deref().unwrap_or("");
    b.put_u16(publisher.len() as u16);
    b.put_slice(publisher.as_bytes());
    b.put_u8(out.sub_ids.len().min(255) as u8);
    for id in out.sub_ids.iter().take(255) {
        b.put_u32(*id);
    }
    b.put_u16(released.unwrap_or(0));
    let publish = Publish {
        dup: false,
        qos: m.qos,
        retain: m.retain,
        topic: m.topic.clone(),
        pkid: if m.qos == QoS::AtMostOnce { 0 } else { 1 },
        payload: m.payload.clone(),
        properties: m.properties.clone(),
    };
    holdfast_mqtt::encode(&Packet::Publish(publish), Version::V5, &mut b);
    b.to_vec()
}

/// Decodes [`encode_msg`]'s output.
///
/// # Errors
/// The bytes are not such a record.
pub fn decode_msg(value: &[u8]) -> Result<(Outgoing, Option<u16>), Damaged> {
    let mut b = value;
    if b.remaining() < 13 || b.get_u8() != FORMAT {
        return Err(Damaged("unknown format"));
    }
    let flags = b.get_u8();
    let qos = QoS::from_u8(b.get_u8()).ok_or(Damaged("bad qos"))?;
    let expires = b.get_u64();
    let plen = b.get_u16() as usize;
    if b.remaining() < plen + 1 {
        return Err(Damaged("short"));
    }
    let publisher = std::str::from_utf8(&b[..plen]).map_err(|_| Damaged("publisher not utf-8"))?;
    let publisher: Option<Arc<str>> = (!publisher.is_empty()).then(|| publisher.into());
    b.advance(plen);
    let n = b.get_u8() as usize;
    if b.remaining() < n * 4 + 2 {
        return Err(Damaged("short"));
    }
    let sub_ids = (0..n).map(|_| b.get_u32()).collect();
    let pkid = b.get_u16();
    let released = if flags & 2 != 0 {
        if pkid == 0 {
            return Err(Damaged("released without a packet id"));
        }
        Some(pkid)
    } else {
        None
    };
    let mut rest = BytesMut::from(b);
    let Ok(Some(Packet::Publish(p))) = holdfast_mqtt::decode(&mut rest, Some(Version::V5), usize::MAX) else {
        return Err(Damaged("stored publish does not decode"));
    };
    let msg = Msg {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties: p.properties,
        expires_at_ms: (flags & 1 != 0).then_some(expires),
        publisher,
    };
    Ok((
        Outgoing {
            msg: Arc::new(msg),
            qos,
            retain: flags & 4 != 0,
            sub_ids,
            seq: 0,
            receipt: None,
        },
        released,
    ))
}

impl Persist {
    /// Opens the broker's spaces.
    ///
    /// # Errors
    /// Storage errors.
    pub fn open(store: &Store) -> Result<Persist, StoreError> {
        Ok(Persist {
            store: store.clone(),
            sessions: store.space("sessions")?,
            retained: store.space("retained")?,
            dirty: AtomicBool::new(false),
        })
    }

    fn commit(&self, f: impl FnOnce(&mut holdfast_store::Batch)) -> Result<(), StoreError> {
        let mut batch = self.store.batch();
        f(&mut batch);
        batch.commit(Durability::Buffered)?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes a session record.
    ///
    /// # Errors
    /// Storage errors.
    pub fn save_session(&self, client: &str, record: &SessionRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).unwrap_or_default();
        self.commit(|b| b.insert(&self.sessions, session_key(client), value))
    }

    /// Removes a session record and its queue.
    ///
    /// # Errors
    /// Storage errors.
    pub fn delete_session(&self, client: &str) -> Result<(), StoreError> {
        let prefix = queue_prefix(client);
        let mut end = prefix.clone();
        end.extend_from_slice(&[0xFF; 9]);
        let keys: Vec<Vec<u8>> = self
            .sessions
            .range(prefix..end)
            .filter_map(|r| r.ok().map(|(k, _)| k))
            .collect();
        self.commit(|b| {
            b.remove(&self.sessions, session_key(client));
            for k in keys {
                b.remove(&self.sessions, k);
            }
        })
    }

    /// Stores a queued message.
    ///
    /// # Errors
    /// Storage errors.
    pub fn put_queued(&self, client: &str, out: &Outgoing, released: Option<u16>) -> Result<(), StoreError> {
        let value = encode_msg(out, released);
        self.commit(|b| b.insert(&self.sessions, queue_key(client, out.seq), value))
    }

    /// Removes a queued message.
    ///
    /// # Errors
    /// Storage errors.
    pub fn del_queued(&self, client: &str, seq: u64) -> Result<(), StoreError> {
        self.commit(|b| b.remove(&self.sessions, queue_key(client, seq)))
    }

    /// Stores (or, with an empty payload, removes) a retained message.
    ///
    /// # Errors
    /// Storage errors.
    pub fn put_retained(&self, msg: &Arc<Msg>) -> Result<(), StoreError> {
        let key = msg.topic.as_bytes().to_vec();
        if msg.payload.is_empty() {
            return self.commit(|b| b.remove(&self.retained, key));
        }
        let out = Outgoing {
            msg: msg.clone(),
            qos: msg.qos,
            retain: true,
            sub_ids: Vec::new(),
            seq: 0,
            receipt: None,
        };
        let value = encode_msg(&out, None);
        self.commit(|b| b.insert(&self.retained, key, value))
    }

    /// Everything stored: sessions with their queues, retained messages,
    /// and the number of damaged entries skipped.
    ///
    /// # Errors
    /// Storage errors.
    pub fn load(&self) -> Result<(Vec<LoadedSession>, Vec<Msg>, usize), StoreError> {
        let mut damaged = 0;
        let mut sessions: Vec<LoadedSession> = Vec::new();
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for entry in self.sessions.range(vec![b's']..vec![b't']) {
            let (k, v) = entry?;
            let client = String::from_utf8_lossy(&k[1..]).into_owned();
            match serde_json::from_slice::<SessionRecord>(&v) {
                Ok(record) => {
                    index.insert(client.clone(), sessions.len());
                    sessions.push(LoadedSession {
                        client_id: client,
                        record,
                        queue: Vec::new(),
                    });
                }
                Err(_) => damaged += 1,
            }
        }
        for entry in self.sessions.range(vec![b'q']..vec![b'r']) {
            let (k, v) = entry?;
            let mut key = &k[1..];
            if key.len() < 2 {
                damaged += 1;
                continue;
            }
            let n = key.get_u16() as usize;
            if key.len() != n + 8 {
                damaged += 1;
                continue;
            }
            let client = String::from_utf8_lossy(&key[..n]).into_owned();
            let seq = u64::from_be_bytes(key[n..].try_into().unwrap_or_default());
            let Some(&i) = index.get(&client) else {
                damaged += 1;
                continue;
            };
            match decode_msg(&v) {
                Ok((mut out, released)) => {
                    out.seq = seq;
                    sessions[i].queue.push((out, released));
                }
                Err(_) => damaged += 1,
            }
        }
        let mut retained = Vec::new();
        for entry in self.retained.range::<std::ops::RangeFull>(..) {
            let (_, v) = entry?;
            match decode_msg(&v) {
                Ok((out, _)) => retained.push(Arc::unwrap_or_clone(out.msg)),
                Err(_) => damaged += 1,
            }
        }
        Ok((sessions, retained, damaged))
    }

    /// Syncs what was written since the last sync.
    ///
    /// # Errors
    /// Storage errors.
    pub fn sync(&self) -> Result<(), StoreError> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            self.store.persist(Durability::SyncData)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn messages_round_trip() {
        let msg = Msg {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: holdfast_mqtt::Properties {
                content_type: Some("text/plain".into()),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            },
            expires_at_ms: Some(1234),
            publisher: Some("pub".into()),
        };
        let out = Outgoing {
            msg: Arc::new(msg.clone()),
            qos: QoS::AtLeastOnce,
            retain: false,
            sub_ids: vec![3, 9],
            seq: 0,
            receipt: None,
        };
        let (back, released) = decode_msg(&encode_msg(&out, Some(42))).unwrap();
        assert_eq!(released, Some(42));
        assert_eq!(*back.msg, msg);
        assert_eq!(back.sub_ids, vec![3, 9]);
        assert_eq!(back.qos, QoS::AtLeastOnce);
        assert!(decode_msg(&[1, 2, 3]).is_err());
        assert_eq!(decode_msg(&encode_msg(&out, None)).unwrap().1, None);
        let mut bad = encode_msg(&out, None);
        bad.truncate(bad.len() - 2);
        assert!(decode_msg(&bad).is_err());
    }
}
