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
//! [`ChildLane`] turns records into frames and acks into the ids they
//! cover; [`ParentLane`] turns frames into records, and [`Acker`] the
//! driver's "stored" into acks. The drivers own the streams, the outbox and
//! the clock.

use bytes::{Bytes, BytesMut};

use crate::window::{AckError, LaneWindow};
use crate::wire::{Compressor, Decompressor, Frame, WireError};
use holdfast_model::MessageId;

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
    /// flight from now on.
    ///
    /// # Errors
    /// A record or the batch is too long for the frame format, or zstd failed.
    pub fn send(&mut self, records: Vec<(MessageId, Vec<u8>, Bytes)>) -> Result<Outgoing, LaneError> {
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

/// The parent's end of one lane stream, after its LANE frame.
#[derive(Debug)]
pub struct ParentLane {
    lane: u8,
    max_batch: usize,
    decompressor: Option<Decompressor>,
    received: u64,
}

impl ParentLane {
    /// The stream of `lane`; a compressed batch may be at most `max_batch`
    /// bytes once decompressed.
    pub fn new(lane: u8, max_batch: usize) -> ParentLane {
        ParentLane {
            lane,
            max_batch,
            decompressor: None,
            received: 0,
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

    /// A frame from the child: the records of a batch, to store in this
    /// order before the [`Acker`] acknowledges them.
    ///
    /// # Errors
    /// Anything but a batch; a batch that does not decode, or declares a
    /// zstd window over the link's limit ([`WireError::WindowTooLarge`]).
    pub fn receive(&mut self, frame: Frame) -> Result<Vec<Bytes>, LaneError> {
        let records = match frame {
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
        self.received += records.len() as u64;
        Ok(records)
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
                other => got.extend(parent.receive(other).unwrap()),
            }
        }
        got
    }

    #[test]
    fn batches_cross_plain_and_compressed_and_acks_free_the_window() {
        for compression in [None, Some(3)] {
            let mut child = ChildLane::new(2, 5, compression).unwrap();
            let mut parent = ParentLane::new(2, 1 << 20);
            let mut acker = Acker::default();
            let out = child.send(records(0..3)).unwrap();
            assert_eq!((out.records, child.room()), (3, 2));
            let got = through(&out, &mut parent, true);
            assert_eq!(got.len(), 3);
            assert_eq!(&got[1][..], b"head1payload 1");
            let ack = acker.stored(3);
            assert_eq!(child.receive(ack).unwrap(), vec![id(0), id(1), id(2)]);
            let out = child.send(records(3..5)).unwrap();
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
        let mut parent = ParentLane::new(0, 1 << 20);
        assert!(matches!(parent.receive(Frame::Ack(1)), Err(LaneError::Unexpected(_))));
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
}
