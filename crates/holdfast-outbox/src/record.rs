//! The on-disk form of a queued message.
//!
//! ```text
//! u8   format version (2; version 1 lacks the origin and delivered flags)
//! u32  CRC-32 of everything after it (little endian)
//! u64  enqueue time on the outbox clock, ms        } all integers
//! u64  enqueue wall time, ms since the Unix epoch  } little endian
//! u64  time-to-live, ms
//! u8   qos        u8 flags (1 retain, 2 content type, 4 principal,
//!                           8 origin id, 16 delivered locally)
//! [u64 origin instance, u8 origin lane, u64 origin sequence]
//! str16 topic     [str16 content type]   str16 client id   [str16 principal]
//! u16  path length, then str16 each
//! u16  property count, then str16 name, str32 value each
//! bytes32 payload
//! ```
//! `str16`/`str32` are a u16/u32 length then UTF-8 bytes. Decoding checks
//! every length against what is left, the CRC and the UTF-8.

use std::sync::Arc;

use super::MessageId;
use holdfast_model::{Message, Source};

const VERSION: u8 = 2;
const F_RETAIN: u8 = 1;
const F_CONTENT_TYPE: u8 = 2;
const F_PRINCIPAL: u8 = 4;
const F_ORIGIN: u8 = 8;
const F_DELIVERED: u8 = 16;

/// A message as stored in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Enqueue time on the outbox clock, ms.
    pub enqueued_clock_ms: u64,
    /// Enqueue wall time, ms since the Unix epoch (informational).
    pub enqueued_wall_ms: u64,
    /// Time-to-live, ms.
    pub ttl_ms: u64,
    /// The message.
    pub message: Arc<Message>,
}

/// Why a stored record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Unknown format version.
    #[error("unknown record version {0}")]
    Version(u8),
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// The record ends early or has bytes left over.
    #[error("truncated or malformed record")]
    Malformed,
    /// A string is not UTF-8.
    #[error("string is not UTF-8")]
    Utf8,
}

/// Why a message cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A field is longer than its length prefix allows.
    #[error("{0} is too long to store")]
    TooLong(&'static str),
}

fn put_str16(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), EncodeError> {
    holdfast_model::codec::put_str16(out, s, what).map_err(|e| EncodeError::TooLong(e.0))
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8], what: &'static str) -> Result<(), EncodeError> {
    let len = u32::try_from(b.len()).map_err(|_| EncodeError::TooLong(what))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
    Ok(())
}

impl Record {
    /// Encodes the record.
    ///
    /// # Errors
    /// A field exceeds its length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        self.encode_with(self.message.origin, self.message.delivered_locally)
    }

    /// Encodes the record with the message's origin id and delivered flag
    /// replaced, without copying the message (how a message leaves a node).
    ///
    /// # Errors
    /// A field exceeds its length prefix.
    pub fn encode_with(&self, origin: Option<MessageId>, delivered_locally: bool) -> Result<Vec<u8>, EncodeError> {
        let mut out = self.encode_head(origin, delivered_locally, self.message.payload.len())?;
        out.extend_from_slice(&self.message.payload);
        Ok(out)
    }

    /// [`Record::encode_with`] in two parts: everything up to the payload
    /// (its CRC already covers the payload), then the payload itself, shared
    /// and not copied. Their concatenation is the record; the link sends the
    /// two parts as separate chunks.
    ///
    /// # Errors
    /// A field exceeds its length prefix.
    pub fn encode_parts(
        &self,
        origin: Option<MessageId>,
        delivered_locally: bool,
    ) -> Result<(Vec<u8>, bytes::Bytes), EncodeError> {
        let head = self.encode_head(origin, delivered_locally, 0)?;
        Ok((head, self.message.payload.clone()))
    }

    /// Everything up to the payload, with room for `extra` more bytes.
    fn encode_head(
        &self,
        origin: Option<MessageId>,
        delivered_locally: bool,
        extra: usize,
    ) -> Result<Vec<u8>, EncodeError> {
        let m = &self.message;
        let strings = m.topic.len()
            + m.content_type.as_ref().map_or(0, String::len)
            + m.source.client_id.len()
            + m.source.principal.as_ref().map_or(0, String::len)
            + m.source.path.iter().map(|p| 2 + p.len()).sum::<usize>()
            + m.properties.iter().map(|(k, v)| 6 + k.len() + v.len()).sum::<usize>();
        let mut out = Vec::with_capacity(64 + strings + extra);
        out.push(VERSION);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.enqueued_clock_ms.to_le_bytes());
        out.extend_from_slice(&self.enqueued_wall_ms.to_le_bytes());
        out.extend_from_slice(&self.ttl_ms.to_le_bytes());
        out.push(m.qos);
        let mut flags = 0;
        if m.retain {
            flags |= F_RETAIN;
        }
        if m.content_type.is_some() {
            flags |= F_CONTENT_TYPE;
        }
        if m.source.principal.is_some() {
            flags |= F_PRINCIPAL;
        }
        if origin.is_some() {
            flags |= F_ORIGIN;
        }
        if delivered_locally {
            flags |= F_DELIVERED;
        }
        out.push(flags);
        if let Some(o) = &origin {
            out.extend_from_slice(&o.instance.to_le_bytes());
            out.push(o.lane);
            out.extend_from_slice(&o.seq.to_le_bytes());
        }
        put_str16(&mut out, &m.topic, "topic")?;
        if let Some(ct) = &m.content_type {
            put_str16(&mut out, ct, "content type")?;
        }
        put_str16(&mut out, &m.source.client_id, "client id")?;
        if let Some(p) = &m.source.principal {
            put_str16(&mut out, p, "principal")?;
        }
        let path_len = u16::try_from(m.source.path.len()).map_err(|_| EncodeError::TooLong("source path"))?;
        out.extend_from_slice(&path_len.to_le_bytes());
        for hop in &m.source.path {
            put_str16(&mut out, hop, "source path entry")?;
        }
        let props = u16::try_from(m.properties.len()).map_err(|_| EncodeError::TooLong("property list"))?;
        out.extend_from_slice(&props.to_le_bytes());
        for (k, v) in &m.properties {
            put_str16(&mut out, k, "property name")?;
            put_bytes32(&mut out, v.as_bytes(), "property value")?;
        }
        let len = u32::try_from(m.payload.len()).map_err(|_| EncodeError::TooLong("payload"))?;
        out.extend_from_slice(&len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out[5..]);
        crc.update(&m.payload);
        let crc = crc.finalize();
        out[1..5].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes a record; its payload is copied out of `b`.
    ///
    /// # Errors
    /// Any damage: version, checksum, lengths, UTF-8.
    pub fn decode(b: &[u8]) -> Result<Record, DecodeError> {
        Record::decode_with(b, bytes::Bytes::copy_from_slice)
    }

    /// Decodes a record held in `b`; its payload is a slice of `b` (no copy).
    ///
    /// # Errors
    /// Any damage: version, checksum, lengths, UTF-8.
    pub fn decode_shared(b: &bytes::Bytes) -> Result<Record, DecodeError> {
        Record::decode_with(b, |payload| b.slice_ref(payload))
    }

    fn decode_with(b: &[u8], payload_of: impl FnOnce(&[u8]) -> bytes::Bytes) -> Result<Record, DecodeError> {
        let (&version, rest) = b.split_first().ok_or(DecodeError::Malformed)?;
        if version != VERSION && version != 1 {
            return Err(DecodeError::Version(version));
        }
        if rest.len() < 4 {
            return Err(DecodeError::Malformed);
        }
        let (crc, body) = rest.split_at(4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(DecodeError::Checksum);
        }
        let mut r = Reader { b: body };
        let enqueued_clock_ms = r.u64()?;
        let enqueued_wall_ms = r.u64()?;
        let ttl_ms = r.u64()?;
        let qos = r.u8()?;
        let flags = r.u8()?;
        if version == 1 && flags & (F_ORIGIN | F_DELIVERED) != 0 {
            return Err(DecodeError::Malformed);
        }
        let origin = if flags & F_ORIGIN != 0 {
            Some(MessageId {
                instance: r.u64()?,
                lane: r.u8()?,
                seq: r.u64()?,
            })
        } else {
            None
        };
        let topic = r.str16()?;
        let content_type = if flags & F_CONTENT_TYPE != 0 {
            Some(r.str16()?)
        } else {
            None
        };
        let client_id = r.str16()?;
        let principal = if flags & F_PRINCIPAL != 0 {
            Some(r.str16()?)
        } else {
            None
        };
        let path_len = r.u16()?;
        let mut path = Vec::with_capacity(path_len.min(64) as usize);
        for _ in 0..path_len {
            path.push(r.str16()?);
        }
        let props = r.u16()?;
        let mut properties = Vec::with_capacity(props.min(64) as usize);
        for _ in 0..props {
            let k = r.str16()?;
            let v = String::from_utf8(r.bytes32()?.to_vec()).map_err(|_| DecodeError::Utf8)?;
            properties.push((k, v));
        }
        let payload = payload_of(r.bytes32()?);
        if !r.b.is_empty() {
            return Err(DecodeError::Malformed);
        }
        Ok(Record {
            enqueued_clock_ms,
            enqueued_wall_ms,
            ttl_ms,
            message: Arc::new(Message {
                topic,
                payload,
                qos,
                retain: flags & F_RETAIN != 0,
                content_type,
                properties,
                source: Source {
                    client_id,
                    principal,
                    path,
                },
                origin,
                delivered_locally: flags & F_DELIVERED != 0,
            }),
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Malformed);
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn str16(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError::Utf8)
    }
    fn bytes32(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Record {
        let mut m = Message::new("devices/d1/messages/events/", b"hello".to_vec(), "d1");
        m.qos = 1;
        m.retain = true;
        m.content_type = Some("application/json".into());
        m.properties = vec![("$.mid".into(), "42".into()), ("k".into(), "v".into())];
        m.source.principal = Some("d1".into());
        m.source.path = vec!["gw-a".into(), "gw-b".into()];
        m.origin = Some(MessageId {
            instance: 0xfeed,
            lane: 3,
            seq: 99,
        });
        m.delivered_locally = true;
        Record {
            enqueued_clock_ms: 12_345,
            enqueued_wall_ms: 1_700_000_000_000,
            ttl_ms: 7_200_000,
            message: Arc::new(m),
        }
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(Record::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn parts_concatenate_to_the_record() {
        let r = sample();
        let (head, payload) = r.encode_parts(None, true).unwrap();
        let mut whole = head;
        whole.extend_from_slice(&payload);
        assert_eq!(whole, r.encode_with(None, true).unwrap());
        assert!(
            std::ptr::eq(payload.as_ptr(), r.message.payload.as_ptr()),
            "the payload is shared"
        );
    }

    #[test]
    fn decode_shared_slices_the_payload() {
        let r = sample();
        let stored = bytes::Bytes::from(r.encode().unwrap());
        let back = Record::decode_shared(&stored).unwrap();
        assert_eq!(back, Record::decode(&stored).unwrap());
        let at = back.message.payload.as_ptr() as usize - stored.as_ptr() as usize;
        assert_eq!(
            at,
            stored.len() - r.message.payload.len(),
            "the payload is a slice of the stored bytes"
        );
    }

    #[test]
    fn encode_with_replaces_origin_and_flag_only() {
        let r = sample();
        let id = MessageId {
            instance: 7,
            lane: 1,
            seq: 2,
        };
        let back = Record::decode(&r.encode_with(Some(id), false).unwrap()).unwrap();
        assert_eq!(back.message.origin, Some(id));
        assert!(!back.message.delivered_locally);
        assert_eq!(back.message.payload, r.message.payload);
        assert_eq!(back.message.source, r.message.source);
    }

    #[test]
    fn version_1_records_still_decode() {
        // A version 1 record written before origin ids existed.
        let mut r = sample();
        let m = Arc::make_mut(&mut r.message);
        m.origin = None;
        m.delivered_locally = false;
        let mut b = r.encode().unwrap();
        b[0] = 1;
        let crc = crc32fast::hash(&b[5..]);
        b[1..5].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Record::decode(&b).unwrap(), r);
    }

    #[test]
    fn every_single_byte_flip_and_truncation_is_detected() {
        let bytes = sample().encode().unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Record::decode(&b).is_err(), "flip at {i} not detected");
            assert!(Record::decode(&bytes[..i]).is_err(), "truncation at {i} not detected");
        }
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Record::decode(&b);
        }

        #[test]
        fn arbitrary_messages_round_trip(topic in ".{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..300),
                                         props in proptest::collection::vec((".{0,8}", ".{0,8}"), 0..4), ttl in any::<u64>()) {
            let mut m = Message::new(topic, payload, "c");
            m.properties = props;
            let r = Record { enqueued_clock_ms: 1, enqueued_wall_ms: 2, ttl_ms: ttl, message: Arc::new(m) };
            prop_assert_eq!(Record::decode(&r.encode().unwrap()).unwrap(), r);
        }
    }
}
