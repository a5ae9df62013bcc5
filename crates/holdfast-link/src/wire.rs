//! The link's frames on QUIC streams: reading them (through the sans-IO
//! [`FrameDecoder`], so a read is cancel-safe), and the version a
//! connection agreed on. The frames themselves, their encoding and the
//! lane streams' zstd contexts are in [`holdfast_link_proto::wire`].

pub use holdfast_link_proto::decode::FrameDecoder;
pub use holdfast_link_proto::wire::*;

/// The link protocol version a connection agreed on by ALPN (1 to 4).
pub fn negotiated(conn: &quinn::Connection) -> u16 {
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    match alpn.as_deref() {
        Some(p) if p == ALPN_V4 => 4,
        Some(p) if p == ALPN_V3 => 3,
        Some(p) if p == ALPN_V2 => 2,
        _ => 1,
    }
}

/// Whether a link connection agreed on `holdfast-link/2` or later.
pub fn is_v2(conn: &quinn::Connection) -> bool {
    negotiated(conn) >= 2
}

/// The frames of a QUIC receive stream. Reading is cancel-safe: quinn's
/// `read_chunk` is, and the bytes of a frame not yet whole wait in the
/// [`FrameDecoder`], so a `select!` that drops a [`FramedRecv::next`] in
/// the middle of a frame loses nothing.
#[derive(Debug)]
pub struct FramedRecv {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

/// Bytes asked of quinn per read.
const READ_CHUNK: usize = 64 << 10;

impl FramedRecv {
    /// Frames of `recv`, each at most `max` bytes.
    pub fn new(recv: quinn::RecvStream, max: usize) -> FramedRecv {
        FramedRecv {
            recv,
            decoder: FrameDecoder::new(max),
        }
    }

    /// Changes the limit for the frames still to come.
    pub fn set_max(&mut self, max: usize) {
        self.decoder.set_max(max);
    }

    /// The next frame; `Ok(None)` at a clean end of the stream.
    ///
    /// # Errors
    /// A frame over the limit, a malformed or truncated frame, or a stream
    /// error.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(f) = self.decoder.next_frame()? {
                return Ok(Some(f));
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The stream or connection failed.
    #[error(transparent)]
    Stream(#[from] quinn::ReadError),
}
