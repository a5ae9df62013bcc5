//! The IDS frame body (`holdfast-link/4`): the hop ids of the batch that
//! follows it on a lane stream (see [`holdfast_model::hop`]).
//!
//! ```text
//! IDS  u64 epoch, u32 count, u64 first seq, then count - 1 LEB128 deltas (each ≥ 1)
//! ```
//!
//! A batch comes from one lane in order, so its sequence numbers rise; the
//! deltas are 1 unless the sender's outbox dropped or expired something in
//! between, so an IDS frame costs about one byte a message.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::wire::WireError;

/// The hop ids of one batch: one epoch, rising sequence numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchIds {
    /// The sender's epoch.
    pub epoch: u64,
    /// The sequence numbers, one per record of the batch, rising.
    pub seqs: Vec<u64>,
}

impl BatchIds {
    pub(crate) fn encode(&self, out: &mut BytesMut) -> Result<(), WireError> {
        let count = u32::try_from(self.seqs.len()).map_err(|_| WireError::TooLong("ids"))?;
        out.put_u64_le(self.epoch);
        out.put_u32_le(count);
        let Some((&first, rest)) = self.seqs.split_first() else {
            return Ok(());
        };
        out.put_u64_le(first);
        let mut prev = first;
        for &s in rest {
            let delta = s
                .checked_sub(prev)
                .filter(|d| *d > 0)
                .ok_or(WireError::TooLong("ids (not rising)"))?;
            put_varint(out, delta);
            prev = s;
        }
        Ok(())
    }

    pub(crate) fn decode(b: &mut Bytes) -> Result<BatchIds, WireError> {
        let bad = || WireError::Malformed("ids");
        if b.remaining() < 12 {
            return Err(bad());
        }
        let epoch = b.get_u64_le();
        let count = b.get_u32_le() as usize;
        if count == 0 {
            return Ok(BatchIds {
                epoch,
                seqs: Vec::new(),
            });
        }
        // The first takes 8 bytes, each delta at least one.
        if b.remaining() < 8 || count - 1 > b.remaining() - 8 {
            return Err(bad());
        }
        let mut seqs = Vec::with_capacity(count);
        let mut prev = b.get_u64_le();
        seqs.push(prev);
        for _ in 1..count {
            let delta = get_varint(b).filter(|d| *d > 0).ok_or_else(bad)?;
            prev = prev.checked_add(delta).ok_or_else(bad)?;
            seqs.push(prev);
        }
        Ok(BatchIds { epoch, seqs })
    }
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

fn get_varint(b: &mut Bytes) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        if !b.has_remaining() {
            return None;
        }
        let byte = b.get_u8();
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return None;
        }
        v |= bits << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(ids: BatchIds) {
        let mut out = BytesMut::new();
        ids.encode(&mut out).unwrap();
        let mut b = out.freeze();
        assert_eq!(BatchIds::decode(&mut b).unwrap(), ids);
        assert!(!b.has_remaining());
    }

    #[test]
    fn ids_round_trip_and_cost_a_byte_a_message() {
        round_trip(BatchIds { epoch: 1, seqs: vec![] });
        round_trip(BatchIds {
            epoch: u64::MAX,
            seqs: vec![0, 1, 2, 200, 70_000, u64::MAX],
        });
        let seqs: Vec<u64> = (1000..2000).collect();
        let mut out = BytesMut::new();
        BatchIds { epoch: 3, seqs }.encode(&mut out).unwrap();
        assert_eq!(out.len(), 8 + 4 + 8 + 999);
    }

    #[test]
    fn falling_repeated_or_truncated_ids_are_refused() {
        let mut out = BytesMut::new();
        assert!(
            BatchIds {
                epoch: 1,
                seqs: vec![5, 5]
            }
            .encode(&mut out)
            .is_err()
        );
        assert!(
            BatchIds {
                epoch: 1,
                seqs: vec![5, 4]
            }
            .encode(&mut out)
            .is_err()
        );
        for body in [
            &[0u8; 11][..],
            // count 3, first seq, one delta missing
            &[1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1][..],
            // a zero delta
            &[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0][..],
            // a delta that overflows
            &[
                1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1,
            ][..],
            // a count far beyond the body
            &[1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 9, 0, 0, 0, 0, 0, 0, 0][..],
        ] {
            assert!(BatchIds::decode(&mut Bytes::copy_from_slice(body)).is_err(), "{body:?}");
        }
    }
}
