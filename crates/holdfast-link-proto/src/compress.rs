//! The lane streams' zstd contexts (ZBATCH, link/2 and later): one per
//! stream on each side, with a bounded window on both.

use bytes::{Buf, Bytes};

use crate::wire::{Frame, WireError, records_of};

/// The zstd window of a lane stream, as a power of two: 2^20, 1 MiB.
///
/// A lane stream keeps one zstd frame open for its whole life, and the
/// receiver keeps the frame's window (the history later batches may refer
/// to) for as long as the stream lives. The sender compresses with this
/// window whatever its level, and the receiver refuses a frame declaring a
/// larger one ([`WireError::WindowTooLarge`]) before it allocates anything
/// for it, so one stream's context stays near [`DECOMPRESSOR_MAX_BYTES`].
/// zstd's own default limit is 2^27 (128 MiB), which a hostile child could
/// make the parent hold on every stream.
pub const ZSTD_WINDOW_LOG: u32 = 20;

/// The most a lane stream's [`Decompressor`] holds: the window, the
/// buffers zstd keeps beside it (a block of input, two blocks of output
/// margin) and its tables. Checked against zstd's own accounting by the
/// tests.
pub const DECOMPRESSOR_MAX_BYTES: usize = (1 << ZSTD_WINDOW_LOG) + (512 << 10);

/// The sending side of a lane stream's zstd context (link/2).
pub struct Compressor {
    enc: zstd::stream::raw::Encoder<'static>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Compressor {
    /// A context compressing at `level` (1-19) with a window of
    /// 2^[`ZSTD_WINDOW_LOG`] bytes whatever the level (zstd's levels 4 and
    /// up would pick a larger one, which the receiver refuses).
    ///
    /// # Errors
    /// zstd could not make the context.
    pub fn new(level: i32) -> std::io::Result<Compressor> {
        let mut enc = zstd::stream::raw::Encoder::new(level)?;
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(ZSTD_WINDOW_LOG))?;
        Ok(Compressor {
            enc,
            buf: vec![0; 64 << 10],
        })
    }

    /// A ZBATCH of records given in two parts each (as for
    /// [`Frame::batch_chunks`]), compressed and flushed on this context.
    ///
    /// # Errors
    /// A record or the batch is too long for its length prefix, or zstd failed.
    pub fn zbatch(&mut self, records: &[(Vec<u8>, Bytes)]) -> Result<Frame, WireError> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let too_long = |_| WireError::TooLong("batch");
        let count = u32::try_from(records.len()).map_err(too_long)?;
        let mut raw_len: u64 = 0;
        let mut out = Vec::new();
        let zerr = |_| WireError::Malformed("compression failed");
        let mut feed = |enc: &mut zstd::stream::raw::Encoder<'static>, buf: &mut [u8], data: &[u8]| {
            let mut input = InBuffer::around(data);
            while input.pos() < data.len() {
                let mut o = OutBuffer::around(&mut *buf);
                enc.run(&mut input, &mut o).map_err(zerr)?;
                let n = o.pos();
                out.extend_from_slice(&buf[..n]);
            }
            Ok::<(), WireError>(())
        };
        for (head, payload) in records {
            let len = u32::try_from(head.len() + payload.len()).map_err(too_long)?;
            raw_len += 4 + u64::from(len);
            feed(&mut self.enc, &mut self.buf, &len.to_le_bytes())?;
            feed(&mut self.enc, &mut self.buf, head)?;
            feed(&mut self.enc, &mut self.buf, payload)?;
        }
        loop {
            let mut o = OutBuffer::around(&mut self.buf[..]);
            let left = self.enc.flush(&mut o).map_err(zerr)?;
            let n = o.pos();
            out.extend_from_slice(&self.buf[..n]);
            if left == 0 {
                break;
            }
        }
        Ok(Frame::ZBatch {
            count,
            raw_len: u32::try_from(raw_len).map_err(too_long)?,
            data: Bytes::from(out),
        })
    }
}

/// The receiving side of a lane stream's zstd context (link/2). Its memory
/// is bounded by [`DECOMPRESSOR_MAX_BYTES`]: a frame declaring a window over
/// 2^[`ZSTD_WINDOW_LOG`] is refused before zstd allocates for it.
pub struct Decompressor {
    dec: zstd::zstd_safe::DCtx<'static>,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    /// A fresh context accepting windows up to 2^[`ZSTD_WINDOW_LOG`].
    ///
    /// # Errors
    /// zstd could not make the context.
    pub fn new() -> std::io::Result<Decompressor> {
        let zerr = |code| std::io::Error::other(zstd::zstd_safe::get_error_name(code));
        let mut dec = zstd::zstd_safe::DCtx::try_create()
            .ok_or_else(|| std::io::Error::other("zstd cannot allocate a context"))?;
        dec.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(ZSTD_WINDOW_LOG))
            .map_err(zerr)?;
        Ok(Decompressor { dec })
    }

    /// The bytes the context holds now (zstd's own accounting): at most
    /// [`DECOMPRESSOR_MAX_BYTES`].
    pub fn memory(&self) -> usize {
        self.dec.sizeof()
    }

    /// The records of a ZBATCH. `max` bounds the announced uncompressed
    /// size (the output buffer is never larger, so a compression bomb
    /// fails instead of growing).
    ///
    /// # Errors
    /// The size is over `max`, the frame declares a window over
    /// 2^[`ZSTD_WINDOW_LOG`] ([`WireError::WindowTooLarge`]), the data does
    /// not decompress to exactly `raw_len` bytes, or they do not hold
    /// `count` records.
    pub fn records(&mut self, count: u32, raw_len: u32, data: &[u8], max: usize) -> Result<Vec<Bytes>, WireError> {
        use zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode;
        use zstd::zstd_safe::{InBuffer, OutBuffer};
        let raw_len = raw_len as usize;
        if raw_len > max {
            return Err(WireError::TooLarge(raw_len));
        }
        // zstd reports an error as the negated code.
        let bad = |code: usize| {
            if 0usize.wrapping_sub(code) == ZSTD_ErrorCode::ZSTD_error_frameParameter_windowTooLarge as usize {
                WireError::WindowTooLarge
            } else {
                WireError::Malformed("zbatch data")
            }
        };
        let mut out = vec![0u8; raw_len];
        let mut input = InBuffer::around(data);
        let mut o = OutBuffer::around(&mut out[..]);
        loop {
            let (before_in, before_out) = (input.pos(), o.pos());
            self.dec.decompress_stream(&mut o, &mut input).map_err(bad)?;
            if input.pos() == data.len() && o.pos() == before_out {
                break;
            }
            if o.pos() == raw_len && input.pos() < data.len() {
                return Err(WireError::Malformed("zbatch larger than announced"));
            }
            if (input.pos(), o.pos()) == (before_in, before_out) {
                break;
            }
        }
        if o.pos() != raw_len || input.pos() != data.len() {
            return Err(WireError::Malformed("zbatch size"));
        }
        let mut body = Bytes::from(out);
        let records = records_of(&mut body, count)?;
        if body.has_remaining() {
            return Err(WireError::Malformed("zbatch trailing bytes"));
        }
        Ok(records)
    }
}
