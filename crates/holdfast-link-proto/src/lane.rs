//! One outbox lane on the link, both ends, without I/O.
//!
//! The child opens a stream per lane, says which lane with a LANE frame,
//! and sends batches of outbox records (BATCH, or ZBATCH on link/2 with a
//! zstd context per stream). The parent stores each batch and answers with
//! the cumulative count of records it holds (`ACK n`). The child keeps at
//! most `window` records unacknowledged and deletes a record only when an
//! ack covers it; records a broken stream left unacknowledged are sent
//! again on the next one.
//!
//! On `holdfast-link/4` each batch is preceded by an IDS frame naming each
//! record's hop id (the child outbox's epoch and the record's sequence
//! number): the parent stores a record it has stored before only once, and
//! acknowledges it either way, so a batch sent again after a lost ack is
//! not stored twice ([`holdfast_model::hop`]).
//!
//! [`ChildLane`] turns records into frames and acks into the ids they
//! cover; [`ParentLane`] turns frames into records, and [`Acker`] the
//! driver's "stored" into acks. The drivers own the streams, the outbox and
//! the clock.

use bytes::{Bytes, BytesMut};

use crate::window::{AckError, LaneWindow};
use crate::wire::{BatchIds, Compressor, Decompressor, Frame, WireError};
use holdfast_model::{HopId, MessageId};

/// Why a lane stream must close (a protocol error).
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// An ack that goes backwards or covers what was never sent.
    #[error(transparent)]
    Ack(#[from] AckError),
    /// A frame that has no place on a lane stream.
    #[error("unexpected {0} frame on a lane stream")]
    Unexpected(&'static str),
    /// A batch that does not decode (or decompress).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// zstd could not make a context.
    #[error("zstd: {0}")]
    Compression(String),
    /// IDS frames missing, repeated or not matching their batch.
    #[error("{0}")]
    Ids(&'static str),
}

/// A batch ready to write: its frames and what they carry.
#[derive(Debug)]
pub struct Outgoing {
    /// Frames, in order (the stream's LANE frame first, on its first batch).
    pub frames: Vec<Bytes>,
    /// Records in the batch.
    pub records: u64,
    /// The batch's records as encoded, uncompressed (length prefixes included).
    pub raw_bytes: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
}

/// The child's end of one lane stream.
#[derive(Debug)]
pub struct ChildLane {
    lane: u8,
    window: LaneWindow,
    opened: bool,
    compressor: Option<Compressor>,
}

impl ChildLane {
    /// A fresh stream for `lane` with at most `window` records
    /// unacknowledged, compressing at `compression` (a zstd level) when
    /// given.
    ///
    /// # Errors
    /// zstd could not make a context.
    pub fn new(lane: u8, window: usize, compression: Option<i32>) -> Result<ChildLane, LaneError> {
        let compressor = compression
            .map(Compressor::new)
            .transpose()
            .map_err(|e| LaneError::Compression(e.to_string()))?;
        Ok(ChildLane {
            lane,
            window: LaneWindow::new(window),
            opened: false,
            compressor,
        })
    }

    /// The lane.
    pub fn lane(&self) -> u8 {
        self.lane
    }

    /// How many more records may be sent now.
    pub fn room(&self) -> usize {
        self.window.room()
    }

    /// Records sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.window.in_flight()
    }

    /// The frames of a batch of records (`(id, head, payload)`, in lane
    /// order, at most [`ChildLane::room`] of them); they count as in
    /// flight from now on. With `epoch` (link/4) an IDS frame goes first,
    /// naming each record by `epoch` and its sequence number: every record
    /// of the batch must belong to that epoch.
    ///
    /// # Errors
    /// A record or the batch is too long for the frame format, or zstd failed.
    pub fn send(
        &mut self,
        records: Vec<(MessageId, Vec<u8>, Bytes)>,
        epoch: Option<u64>,
    ) -> Result<Outgoing, LaneError> {
        let n = records.len() as u64;
        let raw_bytes: u64 = records.iter().map(|(_, h, p)| 4 + (h.len() + p.len()) as u64).sum();
        let (ids, parts): (Vec<MessageId>, Vec<(Vec<u8>, Bytes)>) =
            records.into_iter().map(|(id, h, p)| (id, (h, p))).unzip();
        let mut frames = Vec::new();
        if !self.opened {
            let mut buf = BytesMut::new();
            Frame::Lane(self.lane).encode(&mut buf)?;
            frames.push(buf.freeze());
        }
        if let Some(epoch) = epoch {
            let mut buf = BytesMut::new();
            let seqs = ids.iter().map(|id| id.seq).collect();
            Frame::Ids(BatchIds { epoch, seqs }).encode(&mut buf)?;
            frames.push(buf.freeze());
        }
        match self.compressor.as_mut() {
            Some(c) => {
                let mut out = BytesMut::new();
                c.zbatch(&parts)?.encode(&mut out)?;
                frames.push(out.freeze());
            }
            None => frames.extend(Frame::batch_chunks(parts)?),
        }
        self.opened = true;
        self.window.sent(ids);
        let wire_bytes = frames.iter().map(|f| f.len() as u64).sum();
        Ok(Outgoing {
            frames,
            records: n,
            raw_bytes,
            wire_bytes,
        })
    }

    /// A frame from the parent on this stream: the ids an ack newly
    /// covers, oldest first (delete them now).
    ///
    /// # Errors
    /// Anything but a valid cumulative ack.
    pub fn receive(&mut self, frame: Frame) -> Result<Vec<MessageId>, LaneError> {
        match frame {
            Frame::Ack(n) => Ok(self.window.ack(n)?),
            other => Err(LaneError::Unexpected(other.name())),
        }
    }
}

/// A batch as the parent receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The encoded outbox records, in order.
    pub records: Vec<Bytes>,
    /// Each record's hop id (link/4), in the same order.
    pub ids: Option<Vec<HopId>>,
}

/// The parent's end of one lane stream, after its LANE frame.
#[derive(Debug)]
pub struct ParentLane {
    lane: u8,
    max_batch: usize,
    decompressor: Option<Decompressor>,
    received: u64,
    /// Each batch comes with its IDS (link/4).
    with_ids: bool,
    ids: Option<BatchIds>,
}

impl ParentLane {
    /// The stream of `lane`; a compressed batch may be at most `max_batch`
    /// bytes once decompressed. With `with_ids` (link/4) every batch must
    /// come right after its IDS frame; without, there is none.
    pub fn new(lane: u8, max_batch: usize, with_ids: bool) -> ParentLane {
        ParentLane {
            lane,
            max_batch,
            decompressor: None,
            received: 0,
            with_ids,
            ids: None,
        }
    }

    /// The lane.
    pub fn lane(&self) -> u8 {
        self.lane
    }

    /// Records received on the stream so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// A frame from the child: a batch, to store in this order (each
    /// record not stored before, by its hop id) before the [`Acker`]
    /// acknowledges all of it; `None` for an IDS frame (its batch follows).
    ///
    /// # Errors
    /// Anything but a batch or, on link/4, its IDS; a batch that does not
    /// decode, or declares a zstd window over the link's limit
    /// ([`WireError::WindowTooLarge`]); IDS that do not match their batch.
    pub fn receive(&mut self, frame: Frame) -> Result<Option<Received>, LaneError> {
        let records = match frame {
            Frame::Ids(ids) if self.with_ids => {
                if self.ids.replace(ids).is_some() {
                    return Err(LaneError::Ids("two IDS frames in a row"));
                }
                return Ok(None);
            }
            Frame::Batch(records) => records,
            Frame::ZBatch { count, raw_len, data } => {
                let d = match self.decompressor.as_mut() {
                    Some(d) => d,
                    None => {
                        let d = Decompressor::new().map_err(|e| LaneError::Compression(e.to_string()))?;
                        self.decompressor.insert(d)
                    }
                };
                d.records(count, raw_len, &data, self.max_batch)?
            }
            other => return Err(LaneError::Unexpected(other.name())),
        };
        let ids = match (self.with_ids, self.ids.take()) {
            (false, _) => None,
            (true, None) => return Err(LaneError::Ids("a batch without its IDS frame")),
            (true, Some(ids)) if ids.seqs.len() != records.len() => {
                return Err(LaneError::Ids("IDS and batch counts differ"));
            }
            (true, Some(ids)) => Some(
                ids.seqs
                    .into_iter()
                    .map(|seq| HopId { epoch: ids.epoch, seq })
                    .collect(),
            ),
        };
        self.received += records.len() as u64;
        Ok(Some(Received { records, ids }))
    }
}

/// The parent's acks of one lane stream: cumulative counts of the records
/// stored, in the order the batches came.
#[derive(Debug, Default)]
pub struct Acker {
    stored: u64,
}

impl Acker {
    /// The driver stored the next `n` records of the stream: the ack to send.
    pub fn stored(&mut self, n: u64) -> Frame {
        self.stored += n;
        Frame::Ack(self.stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::FrameDecoder;

    fn id(seq: u64) -> MessageId {
        MessageId {
            instance: 7,
            lane: 2,
            seq,
        }
    }

    fn records(range: std::ops::Range<u64>) -> Vec<(MessageId, Vec<u8>, Bytes)> {
        range
            .map(|i| {
                (
                    id(i),
                    format!("head{i}").into_bytes(),
                    Bytes::from(format!("payload {i}")),
                )
            })
            .collect()
    }

    fn through(out: &Outgoing, parent: &mut ParentLane, first: bool) -> Vec<Bytes> {
        let mut d = FrameDecoder::new(1 << 20);
        for f in &out.frames {
            d.push(f);
        }
        let mut got = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            match f {
                Frame::Lane(l) => {
                    assert!(first, "LANE only opens a stream");
                    assert_eq!(l, parent.lane());
                }
                other => {
                    if let Some(r) = parent.receive(other).unwrap() {
                        got.extend(r.records);
                    }
                }
            }
        }
        got
    }

    #[test]
    fn batches_cross_plain_and_compressed_and_acks_free_the_window() {
        for compression in [None, Some(3)] {
            let mut child = ChildLane::new(2, 5, compression).unwrap();
            let mut parent = ParentLane::new(2, 1 << 20, false);
            let mut acker = Acker::default();
            let out = child.send(records(0..3), None).unwrap();
            assert_eq!((out.records, child.room()), (3, 2));
            let got = through(&out, &mut parent, true);
            assert_eq!(got.len(), 3);
            assert_eq!(&got[1][..], b"head1payload 1");
            let ack = acker.stored(3);
            assert_eq!(child.receive(ack).unwrap(), vec![id(0), id(1), id(2)]);
            let out = child.send(records(3..5), None).unwrap();
            assert!(!out.frames.is_empty());
            let got = through(&out, &mut parent, false);
            assert_eq!(&got[1][..], b"head4payload 4");
            assert_eq!(parent.received(), 5);
            assert_eq!(child.receive(acker.stored(2)).unwrap(), vec![id(3), id(4)]);
            assert_eq!(child.room(), 5);
        }
    }

    #[test]
    fn frames_out_of_place_are_protocol_errors() {
        let mut child = ChildLane::new(0, 5, None).unwrap();
        assert!(matches!(child.receive(Frame::Lane(0)), Err(LaneError::Unexpected(_))));
        assert!(matches!(child.receive(Frame::Ack(1)), Err(LaneError::Ack(_))));
        let mut parent = ParentLane::new(0, 1 << 20, false);
        assert!(matches!(parent.receive(Frame::Ack(1)), Err(LaneError::Unexpected(_))));
        let ids = |n: u64| {
            Frame::Ids(BatchIds {
                epoch: 1,
                seqs: (0..n).collect(),
            })
        };
        assert!(matches!(parent.receive(ids(1)), Err(LaneError::Unexpected("IDS"))));
        let bomb = Frame::ZBatch {
            count: 1,
            raw_len: 2 << 20,
            data: Bytes::from_static(b"x"),
        };
        assert!(matches!(
            parent.receive(bomb),
            Err(LaneError::Wire(WireError::TooLarge(_)))
        ));
    }

    #[test]
    fn on_link4_each_batch_names_its_records() {
        let mut child = ChildLane::new(2, 10, Some(3)).unwrap();
        let mut parent = ParentLane::new(2, 1 << 20, true);
        let out = child.send(records(4..7), Some(99)).unwrap();
        let mut d = FrameDecoder::new(1 << 20);
        for f in &out.frames {
            d.push(f);
        }
        let mut got = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            if let Frame::Lane(_) = f {
                continue;
            }
            if let Some(r) = parent.receive(f).unwrap() {
                got.push(r);
            }
        }
        assert_eq!(got.len(), 1);
        let hop = |seq| HopId { epoch: 99, seq };
        assert_eq!(got[0].ids, Some(vec![hop(4), hop(5), hop(6)]));
        assert_eq!(&got[0].records[2][..], b"head6payload 6");
    }

    #[test]
    fn ids_must_come_once_before_each_batch_and_match_it() {
        let ids = |n: u64| {
            Frame::Ids(BatchIds {
                epoch: 1,
                seqs: (0..n).collect(),
            })
        };
        let batch = |n: usize| Frame::Batch(vec![Bytes::from_static(b"r"); n]);
        let mut parent = ParentLane::new(0, 1 << 20, true);
        assert!(matches!(parent.receive(batch(1)), Err(LaneError::Ids(_))));
        let mut parent = ParentLane::new(0, 1 << 20, true);
        assert_eq!(parent.receive(ids(2)).unwrap(), None);
        assert!(matches!(parent.receive(ids(2)), Err(LaneError::Ids(_))));
        let mut parent = ParentLane::new(0, 1 << 20, true);
        parent.receive(ids(2)).unwrap();
        assert!(matches!(parent.receive(batch(3)), Err(LaneError::Ids(_))));
    }
}
