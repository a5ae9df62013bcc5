//! One dead letter as stored in the `dead-letter` space.
//!
//! ```text
//! u8   format version (1)
//! u32  CRC-32 of everything after it (little endian)
//! u64  when it was dead-lettered, wall clock, ms since the Unix epoch (LE)
//! u8   reason (1 router-failure, 2 expired, 3 upstream-refused, 4 quota)
//! u8   lane (255: none, it never reached the outbox)
//! str16 detail
//! the message as an outbox record (crate::record, with its own CRC)
//! ```

use std::sync::Arc;

use holdfast_model::Message;

use crate::record::{DecodeError, EncodeError, Record};

const VERSION: u8 = 1;
const NO_LANE: u8 = u8::MAX;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The router plugin failed (trap, timeout, out of memory) and its
    /// slot's `on_failure` is `dead-letter`.
    RouterFailure,
    /// Its time-to-live ran out before the upstream took it.
    Expired,
    /// The upstream refused it for good (the MQTT bridge's broker answered
    /// with a failure reason code, or it is larger than that broker takes).
    UpstreamRefused,
    /// Removed from a full outbox to make room (`when_full = "drop-oldest"`).
    Quota,
}

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 4] = [
        Reason::RouterFailure,
        Reason::Expired,
        Reason::UpstreamRefused,
        Reason::Quota,
    ];

    /// Its name in metrics, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RouterFailure => "router-failure",
            Reason::Expired => "expired",
            Reason::UpstreamRefused => "upstream-refused",
            Reason::Quota => "quota",
        }
    }

    fn code(self) -> u8 {
        match self {
            Reason::RouterFailure => 1,
            Reason::Expired => 2,
            Reason::UpstreamRefused => 3,
            Reason::Quota => 4,
        }
    }

    fn from_code(c: u8) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == c)
    }
}

/// A message set aside, with why, where and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Why.
    pub reason: Reason,
    /// More about why, e.g. `router-failure:trap`, `broker-refused:0x87`.
    pub detail: String,
    /// The outbox lane it was in, if it reached the outbox.
    pub lane: Option<u8>,
    /// When it was set aside: wall clock, ms since the Unix epoch.
    pub at_ms: u64,
    /// The message with its enqueue time and time-to-live (zero when it
    /// never reached the outbox).
    pub record: Record,
}

impl DeadLetter {
    /// A message that never reached the outbox, set aside at `at_ms`.
    pub fn of_message(message: Arc<Message>, reason: Reason, detail: String, at_ms: u64) -> DeadLetter {
        DeadLetter {
            reason,
            detail,
            lane: None,
            at_ms,
            record: Record {
                enqueued_clock_ms: 0,
                enqueued_wall_ms: at_ms,
                ttl_ms: 0,
                message,
            },
        }
    }

    /// Encodes it.
    ///
    /// # Errors
    /// A field exceeds its length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let record = self.record.encode()?;
        let mut out = Vec::with_capacity(5 + 8 + 2 + 2 + self.detail.len() + record.len());
        out.push(VERSION);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.at_ms.to_le_bytes());
        out.push(self.reason.code());
        out.push(self.lane.unwrap_or(NO_LANE));
        holdfast_model::codec::put_str16(&mut out, &self.detail, "detail").map_err(|e| EncodeError::TooLong(e.0))?;
        out.extend_from_slice(&record);
        let crc = crc32fast::hash(&out[5..]);
        out[1..5].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes what [`DeadLetter::encode`] wrote; the payload shares `b`.
    ///
    /// # Errors
    /// Unknown version, checksum mismatch, truncation, bad UTF-8.
    pub fn decode(b: &bytes::Bytes) -> Result<DeadLetter, DecodeError> {
        if b.len() < 5 + 8 + 2 + 2 {
            return Err(DecodeError::Malformed);
        }
        if b[0] != VERSION {
            return Err(DecodeError::Version(b[0]));
        }
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&b[1..5]);
        if crc32fast::hash(&b[5..]) != u32::from_le_bytes(crc) {
            return Err(DecodeError::Checksum);
        }
        let mut at = [0u8; 8];
        at.copy_from_slice(&b[5..13]);
        let reason = Reason::from_code(b[13]).ok_or(DecodeError::Malformed)?;
        let lane = match b[14] {
            NO_LANE => None,
            l => Some(l),
        };
        let len = usize::from(u16::from_le_bytes([b[15], b[16]]));
        let end = 17usize
            .checked_add(len)
            .filter(|e| *e <= b.len())
            .ok_or(DecodeError::Malformed)?;
        let detail = std::str::from_utf8(&b[17..end])
            .map_err(|_| DecodeError::Utf8)?
            .to_string();
        let record = Record::decode_shared(&b.slice(end..))?;
        Ok(DeadLetter {
            reason,
            detail,
            lane,
            at_ms: u64::from_le_bytes(at),
            record,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter() -> DeadLetter {
        let mut m = Message::new("plant/line1/temp", b"21.5".to_vec(), "sensor-1");
        m.content_type = Some("text/plain".into());
        m.properties = vec![("unit".into(), "C".into())];
        DeadLetter {
            reason: Reason::Expired,
            detail: "expired".into(),
            lane: Some(3),
            at_ms: 1_700_000_000_123,
            record: Record {
                enqueued_clock_ms: 5,
                enqueued_wall_ms: 6,
                ttl_ms: 7,
                message: Arc::new(m),
            },
        }
    }

    #[test]
    fn round_trips_with_properties_lane_and_reason() {
        let l = letter();
        let b = bytes::Bytes::from(l.encode().unwrap());
        assert_eq!(DeadLetter::decode(&b).unwrap(), l);
        let none = DeadLetter::of_message(
            l.record.message.clone(),
            Reason::RouterFailure,
            "router-failure:trap".into(),
            9,
        );
        let b = bytes::Bytes::from(none.encode().unwrap());
        let back = DeadLetter::decode(&b).unwrap();
        assert_eq!((back.lane, back.reason), (None, Reason::RouterFailure));
    }

    #[test]
    fn damage_is_detected_not_trusted() {
        let mut b = letter().encode().unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        assert_eq!(DeadLetter::decode(&b.clone().into()), Err(DecodeError::Checksum));
        assert!(DeadLetter::decode(&bytes::Bytes::from_static(b"\x01abc")).is_err());
        for cut in 0..n {
            let _ = DeadLetter::decode(&bytes::Bytes::from(b[..cut].to_vec()));
        }
    }
}
