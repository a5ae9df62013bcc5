//! Bytes in, frames out: the receiving side of any link stream, without
//! I/O. A driver hands it whatever the transport delivered, in pieces of
//! any size, and takes whole frames out. The bytes of a frame not yet
//! complete stay in the decoder, so a driver whose read is interrupted
//! (a `select!` that picked another branch) loses nothing: reading is
//! cancel-safe by construction.

use bytes::{Buf, BytesMut};

use crate::wire::{Frame, WireError};

/// Reassembles frames (`u32 length, body`) from a byte stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder refusing frames over `max` bytes (the length prefix's
    /// count: type byte and body).
    pub fn new(max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::new(),
            max,
            failed: false,
        }
    }

    /// Changes the limit for the frames still to come (a stream whose
    /// first frame says what kind it is).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Adds bytes the transport delivered.
    pub fn push(&mut self, data: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(data);
        }
    }

    /// Bytes held that do not make a whole frame yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, if one is buffered.
    ///
    /// # Errors
    /// A frame over the limit (refused from its length prefix, before its
    /// body is buffered) or a malformed frame. The stream cannot be read
    /// further after an error: every later call fails too.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.failed {
            return Err(WireError::Malformed("stream after an error"));
        }
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            self.failed = true;
            self.buf = BytesMut::new();
            return Err(WireError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            // Room for the rest of it, once.
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(4);
        let body = self.buf.split_to(len).freeze();
        Frame::decode(body).map(Some).inspect_err(|_| {
            self.failed = true;
        })
    }

    /// At the end of the stream: `Ok` when it ended between frames.
    ///
    /// # Errors
    /// The stream ended inside a frame.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed("truncated"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Lane(3),
            Frame::Ack(42),
            Frame::Svc(Bytes::from_static(b"{\"type\":\"hello\"}")),
            Frame::Batch(vec![Bytes::from_static(b"one"), Bytes::from_static(b"")]),
        ]
    }

    fn encoded(frames: &[Frame]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for f in frames {
            f.encode(&mut out).unwrap();
        }
        out.to_vec()
    }

    proptest! {
        #[test]
        fn frames_come_out_whole_however_the_bytes_are_cut(cuts in proptest::collection::vec(1usize..40, 1..30)) {
            let bytes = encoded(&frames());
            let mut d = FrameDecoder::new(1 << 20);
            let (mut at, mut out) = (0, Vec::new());
            for c in cuts.iter().cycle() {
                if at >= bytes.len() {
                    break;
                }
                let end = (at + c).min(bytes.len());
                d.push(&bytes[at..end]);
                at = end;
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(f);
                }
            }
            prop_assert_eq!(out, frames());
            prop_assert!(d.finish().is_ok());
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_prefix_and_a_cut_one_is_truncated() {
        let mut d = FrameDecoder::new(16);
        d.push(&1_000_000u32.to_le_bytes());
        assert_eq!(d.next_frame(), Err(WireError::TooLarge(1_000_000)));
        assert_eq!(d.buffered(), 0, "nothing of it is kept");
        assert!(d.next_frame().is_err(), "the stream is done");
        let mut d = FrameDecoder::new(1 << 20);
        let bytes = encoded(&[Frame::Ack(7)]);
        d.push(&bytes[..bytes.len() - 1]);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(d.finish().is_err());
    }
}
