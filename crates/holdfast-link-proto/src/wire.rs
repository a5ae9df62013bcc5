//! Frames of the QUIC parent link (ALPN `holdfast-link/1` to `/4`), without
//! I/O: encoding, decoding and the lane streams' zstd contexts.
//!
//! Every frame is `u32 length (LE)`, then `u8 type`, then the body; the length
//! counts the type byte and the body. Integers are little endian; `str16` is
//! a u16 length and UTF-8 bytes.
//!
//! ```text
//! control stream (the first bidirectional stream, opened by the child)
//!   child  → HELLO    magic "HFLK", u16 version, str16 node id, u64 outbox instance
//!   parent → WELCOME  u16 version, str16 parent node id
//!          | REFUSE   u16 code, str16 reason        (then the parent closes)
//! lane stream (one bidirectional stream per outbox lane, opened by the child)
//!   child  → LANE     u8 lane                        (first frame)
//!   child  → BATCH    u32 count, then count × (u32 length, outbox record)
//!   child  → ZBATCH   u32 count, u32 raw length, zstd data       (link/2 and later)
//!   child  → IDS      u64 epoch, u32 count, u64 first seq, LEB128 deltas
//!                     (link/4: the hop ids of the batch that follows, see `ids`)
//!   parent → ACK      u64 messages stored so far on this stream (cumulative)
//! scope stream (one unidirectional stream, opened by the parent after WELCOME)
//!   parent → SCOPE    u8 part, JSON body
//!            part 1: some identities of a full sync, more follow
//!            part 2: the last identities of a full sync, and the CAs
//!            part 3: an incremental change (upserts, removals, CAs)
//! service stream (one bidirectional stream, opened by the child after WELCOME)
//!   both   → SVC      JSON body: twins, direct methods, cloud-to-device
//!                     messages (see `service.rs`); the child's first is a hello
//! deploy stream (link/3: one bidirectional stream, opened by the child)
//!   both   → DEPLOY   JSON body: fleet deployments, component requests,
//!                     node reports (`holdfast_deploy::proto`); the child's
//!                     first is a hello
//!   parent → BLOB     raw component bytes, after a DEPLOY naming the component
//! ```
//!
//! A full sync goes out on every connection; incremental changes follow
//! while it lasts. JSON keeps the identity records readable in a capture
//! and lets fields be added without a new frame.
//!
//! Two versions are negotiated by ALPN: `holdfast-link/2` adds the durable
//! cloud-to-device service messages (`holdfast_iothub::service::Svc::C2d`
//! and its acks and feedback) and ZBATCH, a
//! BATCH body (the `count × (u32 length, record)` part) compressed with
//! zstd. One compression context lives per lane stream on each side, and
//! each ZBATCH is flushed whole, so a batch can refer to the ones before it
//! on the same stream (small JSON telemetry compresses well against the
//! messages already sent). A node that offers both and meets a peer with
//! only `holdfast-link/1` sends BATCH frames.
//!
//! `holdfast-link/3` adds the deploy stream. A parent offering link/3 also
//! offers link/2 and link/1, and a child offers all three, so every pair
//! of versions meets on the highest both speak.
//!
//! `holdfast-link/4` makes each hop idempotent: every batch is preceded by
//! an IDS frame giving each record's hop id (the child outbox's epoch and
//! the record's sequence number, [`holdfast_model::hop`]); the parent
//! stores a record only if it has not stored it before, and acknowledges
//! it either way.
//!
//! A batch carries outbox records ([`holdfast_outbox::record`]) whose
//! time-to-live is what remains of it and whose origin id is set, so a
//! message keeps its identity and its deadline across every hop.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use crate::compress::{Compressor, DECOMPRESSOR_MAX_BYTES, Decompressor, ZSTD_WINDOW_LOG};
pub use crate::ids::BatchIds;

/// The ALPN protocol of the link.
pub const ALPN: &[u8] = b"holdfast-link/1";
/// The ALPN protocol of the link with compressed batches.
pub const ALPN_V2: &[u8] = b"holdfast-link/2";
/// The ALPN protocol of the link with the deploy stream.
pub const ALPN_V3: &[u8] = b"holdfast-link/3";
/// The ALPN protocol of the link with idempotent lanes (IDS frames).
pub const ALPN_V4: &[u8] = b"holdfast-link/4";
/// The highest link version this build speaks.
pub const LATEST: u16 = 4;
/// The protocol version a node speaks.
pub const VERSION: u16 = 1;
const MAGIC: &[u8; 4] = b"HFLK";

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_REFUSE: u8 = 3;
const T_LANE: u8 = 10;
const T_BATCH: u8 = 11;
const T_ACK: u8 = 12;
const T_ZBATCH: u8 = 13;
const T_IDS: u8 = 14;
const T_SCOPE: u8 = 20;
const T_SVC: u8 = 30;
const T_DEPLOY: u8 = 40;
const T_BLOB: u8 = 41;

/// Parts of a scope sync (see the module docs); scope sync itself is
/// the registry's, through [`holdfast_model::ports::LinkService`].
pub use holdfast_model::ports::scope_part as scope;

/// Why the parent refused a child.
pub mod refuse {
    /// The protocol version is not supported.
    pub const VERSION: u16 = 1;
    /// The certificate does not name a registered child gateway of this node.
    pub const NOT_A_CHILD: u16 = 2;
    /// The hello's node id differs from the certificate's.
    pub const IDENTITY_MISMATCH: u16 = 3;
    /// Too many children are connected.
    pub const BUSY: u16 = 4;
    /// The hello was malformed.
    pub const PROTOCOL: u16 = 5;
}

/// QUIC application error codes used when closing a connection or stream.
pub mod close {
    /// Normal shutdown.
    pub const DONE: u32 = 0;
    /// The peer sent something malformed.
    pub const PROTOCOL: u32 = 1;
    /// Refused at hello (see the REFUSE frame).
    pub const REFUSED: u32 = 2;
    /// The parent cannot store more now (quota or disk); retry later.
    pub const FULL: u32 = 3;
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 4;
}

/// A link frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Child → parent, first frame of the control stream.
    Hello {
        /// Protocol version.
        version: u16,
        /// The child's node id.
        node_id: String,
        /// The child's outbox instance id.
        instance: u64,
    },
    /// Parent → child: accepted.
    Welcome {
        /// Protocol version.
        version: u16,
        /// The parent's node id.
        node_id: String,
    },
    /// Parent → child: refused (see [`refuse`]).
    Refuse {
        /// Code.
        code: u16,
        /// Reason for people.
        reason: String,
    },
    /// Child → parent: the lane this stream carries.
    Lane(u8),
    /// Child → parent: encoded outbox records, in order.
    Batch(Vec<Bytes>),
    /// Parent → child: messages stored so far on this stream.
    Ack(u64),
    /// Child → parent (link/2): a BATCH body compressed on the stream's
    /// zstd context ([`Compressor`], [`Decompressor`]).
    ZBatch {
        /// Records in it.
        count: u32,
        /// Bytes of the body uncompressed.
        raw_len: u32,
        /// The compressed body.
        data: Bytes,
    },
    /// Child → parent (link/4): the hop ids of the batch that follows.
    Ids(BatchIds),
    /// Parent → child: part of a scope sync (see [`scope`]), JSON.
    Scope {
        /// Which part.
        part: u8,
        /// JSON body.
        body: Bytes,
    },
    /// Either way on the service stream: a JSON message (see
    /// `holdfast_iothub::service::Svc`).
    Svc(Bytes),
    /// Either way on the deploy stream (link/3): a JSON message (see
    /// `holdfast_deploy::proto::Msg`).
    Deploy(Bytes),
    /// Parent → child on the deploy stream (link/3): component bytes.
    Blob(Bytes),
}

/// A frame that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Longer than allowed.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Unknown type byte.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Truncated, trailing bytes, a bad magic or bad UTF-8.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    /// A field is longer than its length prefix allows (nothing is sent).
    #[error("{0} is too long for a frame")]
    TooLong(&'static str),
    /// A ZBATCH stream's zstd frame declares a window larger than
    /// [`ZSTD_WINDOW_LOG`] allows: decoding it would make the receiver
    /// hold that much memory for the life of the stream.
    #[error(
        "compressed batch declares a zstd window over the link's limit of {} KiB",
        (1u32 << ZSTD_WINDOW_LOG) >> 10
    )]
    WindowTooLarge,
}

fn put_str16(out: &mut BytesMut, s: &str, what: &'static str) -> Result<(), WireError> {
    holdfast_model::codec::put_str16(out, s, what).map_err(|e| WireError::TooLong(e.0))
}

fn get_str16(b: &mut Bytes, what: &'static str) -> Result<String, WireError> {
    if b.remaining() < 2 {
        return Err(WireError::Malformed(what));
    }
    let n = b.get_u16_le() as usize;
    if b.remaining() < n {
        return Err(WireError::Malformed(what));
    }
    String::from_utf8(b.split_to(n).to_vec()).map_err(|_| WireError::Malformed(what))
}

impl Frame {
    /// The frame's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "HELLO",
            Frame::Welcome { .. } => "WELCOME",
            Frame::Refuse { .. } => "REFUSE",
            Frame::Lane(_) => "LANE",
            Frame::Batch(_) => "BATCH",
            Frame::Ack(_) => "ACK",
            Frame::ZBatch { .. } => "ZBATCH",
            Frame::Ids(_) => "IDS",
            Frame::Scope { .. } => "SCOPE",
            Frame::Svc(_) => "SVC",
            Frame::Deploy(_) => "DEPLOY",
            Frame::Blob(_) => "BLOB",
        }
    }

    /// Appends the encoded frame to `out`.
    ///
    /// # Errors
    /// A node id or reason longer than 65,535 bytes: `out` is left as it was.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), WireError> {
        let start = out.len();
        let result = self.encode_into(out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_into(&self, out: &mut BytesMut) -> Result<(), WireError> {
        let start = out.len();
        out.put_u32_le(0);
        match self {
            Frame::Hello {
                version,
                node_id,
                instance,
            } => {
                out.put_u8(T_HELLO);
                out.put_slice(MAGIC);
                out.put_u16_le(*version);
                put_str16(out, node_id, "node id")?;
                out.put_u64_le(*instance);
            }
            Frame::Welcome { version, node_id } => {
                out.put_u8(T_WELCOME);
                out.put_u16_le(*version);
                put_str16(out, node_id, "node id")?;
            }
            Frame::Refuse { code, reason } => {
                out.put_u8(T_REFUSE);
                out.put_u16_le(*code);
                put_str16(out, reason, "reason")?;
            }
            Frame::Lane(l) => {
                out.put_u8(T_LANE);
                out.put_u8(*l);
            }
            Frame::Batch(records) => {
                out.put_u8(T_BATCH);
                out.put_u32_le(records.len() as u32);
                for r in records {
                    out.put_u32_le(r.len() as u32);
                    out.put_slice(r);
                }
            }
            Frame::Ack(n) => {
                out.put_u8(T_ACK);
                out.put_u64_le(*n);
            }
            Frame::ZBatch { count, raw_len, data } => {
                out.put_u8(T_ZBATCH);
                out.put_u32_le(*count);
                out.put_u32_le(*raw_len);
                out.put_slice(data);
            }
            Frame::Ids(ids) => {
                out.put_u8(T_IDS);
                ids.encode(out)?;
            }
            Frame::Scope { part, body } => {
                out.put_u8(T_SCOPE);
                out.put_u8(*part);
                out.put_slice(body);
            }
            Frame::Svc(body) => {
                out.put_u8(T_SVC);
                out.put_slice(body);
            }
            Frame::Deploy(body) => {
                out.put_u8(T_DEPLOY);
                out.put_slice(body);
            }
            Frame::Blob(body) => {
                out.put_u8(T_BLOB);
                out.put_slice(body);
            }
        }
        let len = u32::try_from(out.len() - start - 4).map_err(|_| WireError::TooLong("frame"))?;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        Ok(())
    }

    /// A BATCH frame of records given in two parts each (everything up to
    /// the payload, then the payload), as chunks to write in order. Only
    /// the small heads are copied; each payload is sent from the `Bytes` it
    /// is stored in. The chunks concatenate to [`Frame::Batch`] of the
    /// joined records.
    ///
    /// # Errors
    /// A record or the frame is longer than its length prefix allows.
    pub fn batch_chunks(records: Vec<(Vec<u8>, Bytes)>) -> Result<Vec<Bytes>, WireError> {
        let too_long = |_| WireError::TooLong("batch");
        let count = u32::try_from(records.len()).map_err(too_long)?;
        let mut total: u64 = 1 + 4;
        let mut chunks = Vec::with_capacity(1 + 2 * records.len());
        let mut parts = Vec::with_capacity(records.len());
        for (head, payload) in records {
            let len = u32::try_from(head.len() + payload.len()).map_err(too_long)?;
            total += 4 + u64::from(len);
            let mut h = BytesMut::with_capacity(4 + head.len());
            h.put_u32_le(len);
            h.put_slice(&head);
            parts.push((h.freeze(), payload));
        }
        let mut first = BytesMut::with_capacity(9);
        first.put_u32_le(u32::try_from(total).map_err(too_long)?);
        first.put_u8(T_BATCH);
        first.put_u32_le(count);
        chunks.push(first.freeze());
        for (h, payload) in parts {
            chunks.push(h);
            if !payload.is_empty() {
                chunks.push(payload);
            }
        }
        Ok(chunks)
    }

    /// Decodes one frame body (type byte and body, without the length).
    ///
    /// # Errors
    /// Unknown type or malformed body.
    pub fn decode(mut b: Bytes) -> Result<Frame, WireError> {
        if b.is_empty() {
            return Err(WireError::Malformed("empty"));
        }
        let t = b.get_u8();
        let frame = match t {
            T_HELLO => {
                if b.remaining() < 6 || &b[..4] != MAGIC {
                    return Err(WireError::Malformed("hello"));
                }
                b.advance(4);
                let version = b.get_u16_le();
                let node_id = get_str16(&mut b, "hello")?;
                if b.remaining() < 8 {
                    return Err(WireError::Malformed("hello"));
                }
                Frame::Hello {
                    version,
                    node_id,
                    instance: b.get_u64_le(),
                }
            }
            T_WELCOME => {
                if b.remaining() < 2 {
                    return Err(WireError::Malformed("welcome"));
                }
                let version = b.get_u16_le();
                Frame::Welcome {
                    version,
                    node_id: get_str16(&mut b, "welcome")?,
                }
            }
            T_REFUSE => {
                if b.remaining() < 2 {
                    return Err(WireError::Malformed("refuse"));
                }
                let code = b.get_u16_le();
                Frame::Refuse {
                    code,
                    reason: get_str16(&mut b, "refuse")?,
                }
            }
            T_LANE => {
                if b.remaining() < 1 {
                    return Err(WireError::Malformed("lane"));
                }
                Frame::Lane(b.get_u8())
            }
            T_BATCH => {
                if b.remaining() < 4 {
                    return Err(WireError::Malformed("batch"));
                }
                let n = b.get_u32_le();
                Frame::Batch(records_of(&mut b, n)?)
            }
            T_ZBATCH => {
                if b.remaining() < 8 {
                    return Err(WireError::Malformed("zbatch"));
                }
                let count = b.get_u32_le();
                let raw_len = b.get_u32_le();
                Frame::ZBatch {
                    count,
                    raw_len,
                    data: b.split_off(0),
                }
            }
            T_IDS => Frame::Ids(BatchIds::decode(&mut b)?),
            T_ACK => {
                if b.remaining() < 8 {
                    return Err(WireError::Malformed("ack"));
                }
                Frame::Ack(b.get_u64_le())
            }
            T_SCOPE => {
                if b.remaining() < 1 {
                    return Err(WireError::Malformed("scope"));
                }
                let part = b.get_u8();
                if !(scope::FULL_PART..=scope::DELTA).contains(&part) {
                    return Err(WireError::Malformed("scope"));
                }
                let body = b.split_off(0);
                Frame::Scope { part, body }
            }
            T_SVC => Frame::Svc(b.split_off(0)),
            T_DEPLOY => Frame::Deploy(b.split_off(0)),
            T_BLOB => Frame::Blob(b.split_off(0)),
            other => return Err(WireError::UnknownType(other)),
        };
        if b.has_remaining() {
            return Err(WireError::Malformed("trailing bytes"));
        }
        Ok(frame)
    }
}

/// The ALPN protocols offered up to `version`, highest first.
pub fn alpn_up_to(version: u16) -> Vec<Vec<u8>> {
    [(4, ALPN_V4), (3, ALPN_V3), (2, ALPN_V2), (1, ALPN)]
        .into_iter()
        .filter(|(v, _)| *v <= version.max(1))
        .map(|(_, p)| p.to_vec())
        .collect()
}

/// Splits `n` records (`u32 length, record` each) off a batch body.
///
/// # Errors
/// The body does not hold `n` records.
pub fn records_of(b: &mut Bytes, n: u32) -> Result<Vec<Bytes>, WireError> {
    let n = n as usize;
    // Each record takes at least its 4-byte length.
    if n > b.remaining() / 4 {
        return Err(WireError::Malformed("batch"));
    }
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        if b.remaining() < 4 {
            return Err(WireError::Malformed("batch"));
        }
        let len = b.get_u32_le() as usize;
        if b.remaining() < len {
            return Err(WireError::Malformed("batch"));
        }
        records.push(b.split_to(len));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(f: Frame) {
        let mut out = BytesMut::new();
        f.encode(&mut out).unwrap();
        let len = u32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - 4);
        assert_eq!(Frame::decode(out.freeze().slice(4..)).unwrap(), f);
    }

    #[test]
    fn batch_chunks_concatenate_to_the_batch_frame() {
        let records = vec![
            (b"head-1".to_vec(), Bytes::from_static(b"payload-1")),
            (b"h2".to_vec(), Bytes::new()),
            (Vec::new(), Bytes::from_static(b"only payload")),
        ];
        let joined: Vec<Bytes> = records
            .iter()
            .map(|(h, p)| Bytes::from([h.as_slice(), p].concat()))
            .collect();
        let mut expected = BytesMut::new();
        Frame::Batch(joined).encode(&mut expected).unwrap();
        let payload_ptr = records[0].1.as_ptr();
        let chunks = Frame::batch_chunks(records).unwrap();
        assert!(
            chunks.iter().any(|c| c.as_ptr() == payload_ptr),
            "payloads are not copied"
        );
        assert_eq!(chunks.concat(), expected.to_vec());
    }

    #[test]
    fn an_overlong_reason_is_an_error_not_a_cut_string() {
        let mut out = BytesMut::from(&b"kept"[..]);
        let reason = "é".repeat(40_000);
        let err = Frame::Refuse { code: 1, reason }.encode(&mut out).unwrap_err();
        assert!(matches!(err, WireError::TooLong("reason")));
        assert_eq!(&out[..], b"kept");
    }

    #[test]
    fn every_frame_round_trips() {
        round_trip(Frame::Svc(Bytes::from_static(br#"{"t":"hello"}"#)));
        round_trip(Frame::Scope {
            part: scope::DELTA,
            body: Bytes::from_static(b"{}"),
        });
        round_trip(Frame::Hello {
            version: VERSION,
            node_id: "gw-1".into(),
            instance: 0xdead_beef,
        });
        round_trip(Frame::Welcome {
            version: VERSION,
            node_id: "root".into(),
        });
        round_trip(Frame::Refuse {
            code: refuse::NOT_A_CHILD,
            reason: "gw-9 is not a child of root".into(),
        });
        round_trip(Frame::Lane(7));
        round_trip(Frame::Batch(vec![Bytes::from_static(b"abc"), Bytes::new()]));
        round_trip(Frame::Ack(u64::MAX));
        round_trip(Frame::ZBatch {
            count: 2,
            raw_len: 10,
            data: Bytes::from_static(b"zstd"),
        });
    }

    fn telemetry(i: u32) -> (Vec<u8>, Bytes) {
        let json = format!(
            r#"{{"deviceId":"sensor-{}","temperature":{}.{},"humidity":{},"ts":"2026-12-04T08:{:02}:{:02}Z"}}"#,
            i % 7,
            20 + i % 9,
            i % 10,
            40 + i % 30,
            i % 60,
            (i * 7) % 60
        );
        (format!("head-{i}").into_bytes(), Bytes::from(json))
    }

    #[test]
    fn zbatches_round_trip_and_share_the_stream_context() {
        let mut c = Compressor::new(3).unwrap();
        let mut d = Decompressor::new().unwrap();
        let mut sizes = Vec::new();
        for round in 0..3u32 {
            let records: Vec<(Vec<u8>, Bytes)> = (0..50).map(|i| telemetry(round * 50 + i)).collect();
            let frame = c.zbatch(&records).unwrap();
            let mut out = BytesMut::new();
            frame.encode(&mut out).unwrap();
            let Frame::ZBatch { count, raw_len, data } = Frame::decode(out.freeze().slice(4..)).unwrap() else {
                panic!()
            };
            sizes.push((raw_len, data.len()));
            let got = d.records(count, raw_len, &data, 1 << 20).unwrap();
            let want: Vec<Bytes> = records
                .iter()
                .map(|(h, p)| Bytes::from([h.as_slice(), p].concat()))
                .collect();
            assert_eq!(got, want);
        }
        // Later batches compress better: they refer to the earlier ones.
        assert!(sizes[2].1 < sizes[0].1, "{sizes:?}");
        assert!(sizes.iter().all(|(raw, z)| z * 3 < *raw as usize), "{sizes:?}");
    }

    #[test]
    fn a_lying_or_bombing_zbatch_is_refused() {
        let mut c = Compressor::new(3).unwrap();
        let records: Vec<(Vec<u8>, Bytes)> = vec![(vec![0; 10], Bytes::from(vec![b'a'; 100_000]))];
        let Frame::ZBatch { count, raw_len, data } = c.zbatch(&records).unwrap() else {
            panic!()
        };
        assert!(data.len() < 1000);
        // Over the limit: refused before anything is decompressed.
        assert!(matches!(
            Decompressor::new().unwrap().records(count, raw_len, &data, 50_000),
            Err(WireError::TooLarge(_))
        ));
        // It announces less than it holds.
        assert!(
            Decompressor::new()
                .unwrap()
                .records(count, raw_len - 1, &data, 1 << 20)
                .is_err()
        );
        // More than it holds.
        assert!(
            Decompressor::new()
                .unwrap()
                .records(count, raw_len + 1, &data, 1 << 20)
                .is_err()
        );
        // Not zstd.
        assert!(
            Decompressor::new()
                .unwrap()
                .records(1, 8, b"garbage!", 1 << 20)
                .is_err()
        );
        // The wrong count.
        assert!(
            Decompressor::new()
                .unwrap()
                .records(2, raw_len, &data, 1 << 20)
                .is_err()
        );
    }

    /// `data`, the start of a lane stream's zstd frame, made to declare a
    /// window of 2^`log` bytes. The blocks after the header stay valid: a
    /// window only bounds how far back they may refer.
    fn declaring_window(data: &[u8], log: u8) -> Vec<u8> {
        let mut data = data.to_vec();
        assert_eq!(data[..4], 0xFD2F_B528u32.to_le_bytes(), "a zstd frame");
        assert_eq!(data[4] & 0x20, 0, "not single-segment: a window descriptor follows");
        data[5] = (log - 10) << 3;
        data
    }

    #[test]
    fn a_frame_declaring_a_huge_window_is_refused_before_zstd_allocates_it() {
        let records: Vec<(Vec<u8>, Bytes)> = (0..50).map(telemetry).collect();
        let Frame::ZBatch { count, raw_len, data } = Compressor::new(3).unwrap().zbatch(&records).unwrap() else {
            panic!()
        };
        assert_eq!(
            data[5],
            ((ZSTD_WINDOW_LOG - 10) as u8) << 3,
            "the honest sender's window"
        );
        // One over the limit, zstd's default limit (128 MiB: what a child
        // could make its parent hold per stream), and the largest there is.
        for log in [ZSTD_WINDOW_LOG as u8 + 1, 27, 31] {
            let hostile = declaring_window(&data, log);
            let mut d = Decompressor::new().unwrap();
            let r = d.records(count, raw_len, &hostile, 1 << 20);
            assert!(
                d.memory() <= DECOMPRESSOR_MAX_BYTES,
                "window 2^{log}: the context holds {} bytes",
                d.memory()
            );
            assert!(matches!(r, Err(WireError::WindowTooLarge)), "window 2^{log}: {r:?}");
        }
        // A single-segment frame's window is its content size: 64 MiB
        // announced, then one RLE block of 100 bytes.
        let mut single = 0xFD2F_B528u32.to_le_bytes().to_vec();
        single.push(0xE0); // 8-byte content size, single segment
        single.extend_from_slice(&(64u64 << 20).to_le_bytes());
        let block = (100u32 << 3) | (1 << 1); // RLE, not the last block
        single.extend_from_slice(&block.to_le_bytes()[..3]);
        single.push(b'a');
        let mut d = Decompressor::new().unwrap();
        let r = d.records(0, 100, &single, 1 << 20);
        assert!(d.memory() <= DECOMPRESSOR_MAX_BYTES, "{} bytes", d.memory());
        assert!(matches!(r, Err(WireError::WindowTooLarge)), "{r:?}");
        // The same header with a window at the limit is decoded.
        let ok = declaring_window(&data, ZSTD_WINDOW_LOG as u8);
        assert_eq!(
            Decompressor::new()
                .unwrap()
                .records(count, raw_len, &ok, 1 << 20)
                .unwrap()
                .len(),
            50
        );
    }

    #[test]
    fn every_level_stays_within_the_window_the_receiver_accepts() {
        // 2 MiB of varied telemetry, more than the window, in batches.
        let records: Vec<(Vec<u8>, Bytes)> = (0..20_000).map(telemetry).collect();
        for level in [1, 3, 7, 19] {
            let mut c = Compressor::new(level).unwrap();
            let mut d = Decompressor::new().unwrap();
            for batch in records.chunks(500).take(if level >= 19 { 8 } else { 40 }) {
                let Frame::ZBatch { count, raw_len, data } = c.zbatch(batch).unwrap() else {
                    panic!()
                };
                let got = d.records(count, raw_len, &data, 1 << 20);
                assert!(got.is_ok(), "level {level}: {got:?}");
                assert!(
                    d.memory() <= DECOMPRESSOR_MAX_BYTES,
                    "level {level}: the context holds {} bytes",
                    d.memory()
                );
            }
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        for bad in [
            &b""[..],
            &[99],
            &[T_HELLO, b'X', b'F', b'L', b'K', 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[T_BATCH, 0xff, 0xff, 0xff, 0xff],
            &[T_BATCH, 1, 0, 0, 0, 9, 0, 0, 0, 1],
            &[T_ACK, 1, 2],
            &[T_LANE, 1, 2],
        ] {
            assert!(Frame::decode(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(Bytes::from(b));
        }
    }
}
