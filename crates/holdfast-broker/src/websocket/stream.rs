//! The MQTT byte stream carried by a WebSocket, and how it closes.
//!
//! Reading gives the payloads of binary messages in order; each write is
//! one binary message. Shutting it down is the whole closing handshake of
//! RFC 6455 §7, whoever started it: the Close frame (or the answer to the
//! client's), the client's Close awaited while what it still sends is read
//! and discarded, then the transport's write side shut (TLS `close_notify`,
//! TCP FIN), then the client's end of stream awaited, so that the socket is
//! closed with nothing unread in it. A socket closed with unread data makes
//! the kernel send a reset, and a client answering the Close (paho-mqtt's
//! websocket transport, which the IoT Hub device SDKs use) then loses its
//! network thread to "connection reset by peer". Bounded by
//! [`CLOSE_GRACE`] per phase and since the last bytes the client sent (a
//! client still sending is slow, not gone), [`CLOSE_LIMIT`] in all, and
//! [`CLOSE_MAX`] bytes: a client that never answers is let go.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// How long each phase of a close may wait (for our Close to be sent, for
/// the client's Close, for the shutdown, for the client's end of stream):
/// the grace after an error DISCONNECT (`conn::DRAIN_GRACE`), per phase.
pub const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// The longest a close takes: four phases of [`CLOSE_GRACE`].
pub const CLOSE_LIMIT: Duration = CLOSE_GRACE.saturating_mul(4);

/// How many bytes a close reads and discards at most while it waits (a
/// client that keeps sending more is let go).
pub const CLOSE_MAX: usize = 1 << 20;

/// Where the closing handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Sending our Close frame (or the answer to the client's) and flushing
    /// what was written before it.
    Sending,
    /// Ours is sent: reading, and discarding data, until the client's Close.
    AwaitingClose,
    /// Shutting the transport's write side: TLS `close_notify`, TCP FIN.
    ShuttingDown,
    /// Reading, and discarding, until the client's end of stream.
    AwaitingEof,
    /// Over: the socket can be closed.
    Closed(Ended),
}

/// How a close ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both Close frames crossed and both ends of the stream closed.
    Clean,
    /// The grace period or the byte budget ran out first.
    GaveUp,
    /// The connection failed (reset, broken pipe) on the way.
    Failed,
}

/// What one step of a close gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The step's write is done: our Close sent, the transport shut.
    Done,
    /// This many bytes arrived and were discarded.
    Discarded(usize),
    /// The WebSocket has nothing more to give: the client's Close frame
    /// (possibly received before the close started), or a frame after
    /// which none is read (paho answers a Close unmasked).
    PeerClosed,
    /// The client's end of stream.
    Eof,
    /// An I/O error.
    Failed,
    /// [`CLOSE_GRACE`] has passed.
    Expired,
}

/// The closing handshake as a state machine: the phase and the bytes that
/// may still be discarded. No I/O: [`WsStream`]'s shutdown drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    /// Where it is.
    pub phase: Phase,
    /// Bytes that may still be read and discarded.
    pub left: usize,
}

impl Closing {
    /// A close that starts now.
    pub fn start() -> Closing {
        Closing {
            phase: Phase::Sending,
            left: CLOSE_MAX,
        }
    }

    /// The phase after `step`, given whether the client's Close frame had
    /// arrived before (`peer_closed`).
    pub fn next(&mut self, step: Step, peer_closed: bool) -> Phase {
        use Phase::*;
        self.phase = match (self.phase, step) {
            (Closed(e), _) => Closed(e),
            (_, Step::Expired) => Closed(Ended::GaveUp),
            (_, Step::Failed) => Closed(Ended::Failed),
            (phase, Step::Discarded(n)) => {
                self.left = self.left.saturating_sub(n);
                if self.left == 0 { Closed(Ended::GaveUp) } else { phase }
            }
            (Sending, Step::Done) if !peer_closed => AwaitingClose,
            (Sending | AwaitingClose, Step::Done | Step::PeerClosed | Step::Eof) => ShuttingDown,
            (ShuttingDown, Step::Done) => AwaitingEof,
            (AwaitingEof, Step::Eof) => Closed(Ended::Clean),
            // A transport shut down a second time, a frame after the end:
            // nothing to wait for any more.
            (ShuttingDown | AwaitingEof, Step::PeerClosed | Step::Eof | Step::Done) => Closed(Ended::Clean),
        };
        self.phase
    }
}

/// The MQTT byte stream carried by a WebSocket (see the module).
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// What is left of the message being read.
    pending: Bytes,
    /// The peer closed (or the connection ended).
    eof: bool,
    /// The client's Close frame arrived.
    peer_closed: bool,
    /// The close, once started, and its deadline.
    closing: Option<(Closing, Pin<Box<tokio::time::Sleep>>, tokio::time::Instant)>,
}

impl<S> WsStream<S> {
    /// Wraps an accepted WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> WsStream<S> {
        WsStream {
            ws,
            pending: Bytes::new(),
            eof: false,
            peer_closed: false,
            closing: None,
        }
    }

    /// How the close ended, once it has.
    pub fn ended(&self) -> Option<Ended> {
        match self.closing {
            Some((
                Closing {
                    phase: Phase::Closed(e),
                    ..
                },
                _,
                _,
            )) => Some(e),
            _ => None,
        }
    }
}

fn ws_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::Error::from(io::ErrorKind::BrokenPipe),
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Runs one step of the close in `phase`.
    fn poll_step(&mut self, phase: Phase, cx: &mut Context<'_>) -> Poll<Step> {
        match phase {
            Phase::Sending => match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
                Ok(()) => Poll::Ready(Step::Done),
                Err(WsError::Io(_)) => Poll::Ready(Step::Failed),
                // Already closed, or a protocol error seen before.
                Err(_) => Poll::Ready(Step::PeerClosed),
            },
            Phase::AwaitingClose => match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Close(_))) | None => Poll::Ready(Step::PeerClosed),
                Some(Ok(m)) => Poll::Ready(Step::Discarded(m.len().max(1))),
                Some(Err(WsError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Step::Eof),
                Some(Err(WsError::Io(_))) => Poll::Ready(Step::Failed),
                Some(Err(WsError::Protocol(
                    tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ))) => Poll::Ready(Step::Eof),
                // paho answers a Close with an unmasked frame, which
                // tungstenite refuses: the WebSocket is done either way, and
                // what follows is read below it.
                Some(Err(_)) => Poll::Ready(Step::PeerClosed),
            },
            Phase::ShuttingDown => match ready!(Pin::new(self.ws.get_mut()).poll_shutdown(cx)) {
                Ok(()) => Poll::Ready(Step::Done),
                Err(_) => Poll::Ready(Step::Failed),
            },
            Phase::AwaitingEof => {
                let mut room = [0u8; 2048];
                let mut buf = ReadBuf::new(&mut room);
                match ready!(Pin::new(self.ws.get_mut()).poll_read(cx, &mut buf)) {
                    Ok(()) if buf.filled().is_empty() => Poll::Ready(Step::Eof),
                    Ok(()) => Poll::Ready(Step::Discarded(buf.filled().len())),
                    // A TLS client that ends without close_notify.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Step::Eof),
                    Err(_) => Poll::Ready(Step::Failed),
                }
            }
            Phase::Closed(_) => Poll::Ready(Step::Done),
        }
    }

    /// Drives the close to its end (see the module).
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        let (mut closing, mut deadline, limit) = match self.closing.take() {
            Some(c) => c,
            None => (
                Closing::start(),
                Box::pin(tokio::time::sleep(CLOSE_GRACE)),
                tokio::time::Instant::now() + CLOSE_LIMIT,
            ),
        };
        let polled = loop {
            let phase = closing.phase;
            if let Phase::Closed(ended) = phase {
                break Poll::Ready(ended);
            }
            // What is ready is done before the deadline is looked at: a node
            // too busy to poll in time does not cut short a client that
            // answered in time.
            let step = match self.poll_step(phase, cx) {
                Poll::Ready(step) => step,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => Step::Expired,
                Poll::Pending => break Poll::Pending,
            };
            match closing.next(step, self.peer_closed) {
                Phase::Closed(ended @ (Ended::GaveUp | Ended::Failed)) => {
                    tracing::debug!(?ended, ?phase, ?step, "WebSocket close cut short");
                }
                // Each of the client's parts gets its own grace, and so does
                // each piece the client still sends (a busy client is slow,
                // not gone); never past CLOSE_LIMIT from the start.
                next if next != phase || matches!(step, Step::Discarded(_)) => deadline
                    .as_mut()
                    .reset((tokio::time::Instant::now() + CLOSE_GRACE).min(limit)),
                _ => {}
            }
        };
        self.closing = Some((closing, deadline, limit));
        polled
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                if this.pending.is_empty() {
                    // An empty slice of the message would still hold the
                    // WebSocket's read buffer it was cut from.
                    this.pending = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            // After the close started, what arrives is the close's to discard.
            if this.eof || this.closing.is_some() {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    // MQTT 5.0 §6: data is sent in binary frames only.
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text WebSocket message: MQTT uses binary messages",
                    )));
                }
                Some(Ok(Message::Close(_))) => {
                    // tungstenite has queued the answer; the shutdown sends it.
                    this.peer_closed = true;
                    this.eof = true;
                }
                None => this.eof = true,
                // Pings are answered by the WebSocket layer.
                Some(Ok(_)) => {}
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => this.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(ws_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closing.is_some() {
            return Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe)));
        }
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_io)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.ws).poll_flush(cx).map_err(ws_io)
    }

    /// The whole closing handshake (see the module); never an error: a
    /// close that fails or runs out of time ends all the same.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let ended = ready!(this.poll_closing(cx));
        tracing::trace!(?ended, "WebSocket closed");
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (
        WsStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        (WsStream::new(server), client)
    }

    #[tokio::test]
    async fn bytes_cross_message_boundaries_both_ways() {
        let (mut s, mut client) = pair().await;
        // One packet split over three messages, then two in one message.
        for part in [&b"\x10\x0a"[..], b"\x00\x04MQ", b"TT\x05\x02\x00\x3c\x00"] {
            client
                .send(Message::Binary(Bytes::copy_from_slice(part)))
                .await
                .unwrap();
        }
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        client
            .send(Message::Binary(Bytes::from_static(b"\xc0\x00\xc0\x00")))
            .await
            .unwrap();
        let mut got = vec![0u8; 16];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x10\x0a\x00\x04MQTT\x05\x02\x00\x3c\x00\xc0\x00\xc0");
        let mut last = [0u8; 1];
        s.read_exact(&mut last).await.unwrap();
        s.write_all(b"\x20\x03\x00\x00\x00").await.unwrap();
        s.flush().await.unwrap();
        // The ping's pong, then the write as one binary message.
        let mut binaries = Vec::new();
        while binaries.is_empty() {
            match client.next().await.unwrap().unwrap() {
                Message::Binary(b) => binaries.push(b),
                Message::Pong(_) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(&binaries[0][..], b"\x20\x03\x00\x00\x00");
        // A text message is a protocol error; a close is the end.
        client.send(Message::Text("hi".into())).await.unwrap();
        assert_eq!(s.read(&mut last).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        client.close(None).await.unwrap();
    }

    #[test]
    fn the_close_waits_for_the_close_then_the_end_of_stream() {
        use Phase::*;
        // Server first: Close, the client's Close (after data it had sent),
        // our FIN, its FIN.
        let mut c = Closing::start();
        assert_eq!(c.next(Step::Done, false), AwaitingClose);
        assert_eq!(c.next(Step::Discarded(100), false), AwaitingClose);
        assert_eq!(c.next(Step::PeerClosed, false), ShuttingDown);
        assert_eq!(c.next(Step::Done, false), AwaitingEof);
        assert_eq!(c.next(Step::Discarded(10), false), AwaitingEof);
        assert_eq!(c.next(Step::Eof, false), Closed(Ended::Clean));
        assert_eq!(c.next(Step::Failed, false), Closed(Ended::Clean), "over is over");
        // Client first: our Close is the answer; nothing more to wait for.
        let mut c = Closing::start();
        assert_eq!(c.next(Step::Done, true), ShuttingDown);
        // A client that ends the stream without a Close.
        let mut c = Closing::start();
        c.next(Step::Done, false);
        assert_eq!(c.next(Step::Eof, false), ShuttingDown);
        assert_eq!(c.next(Step::Done, false), AwaitingEof);
        assert_eq!(c.next(Step::Eof, false), Closed(Ended::Clean));
        // Bounded in time, in bytes, and a reset ends it.
        for phase_steps in [vec![], vec![Step::Done], vec![Step::Done, Step::PeerClosed, Step::Done]] {
            let mut c = Closing::start();
            for s in &phase_steps {
                c.next(*s, false);
            }
            let (mut late, mut reset, mut flood) = (c, c, c);
            assert_eq!(late.next(Step::Expired, false), Closed(Ended::GaveUp));
            assert_eq!(reset.next(Step::Failed, false), Closed(Ended::Failed));
            assert_eq!(flood.next(Step::Discarded(CLOSE_MAX), false), Closed(Ended::GaveUp));
        }
    }

    /// The client keeps sending until it reads the server's Close; the
    /// server's shutdown ends only once the client answered and closed.
    #[tokio::test]
    async fn a_server_close_reads_until_the_client_has_answered_and_gone() {
        let (mut s, mut client) = pair().await;
        for i in 0..50u8 {
            client.send(Message::Binary(Bytes::from(vec![i; 300]))).await.unwrap();
        }
        let server = tokio::spawn(async move {
            s.shutdown().await.unwrap();
            s
        });
        // The Close arrives; tungstenite answers it on the next read.
        match client.next().await.unwrap().unwrap() {
            Message::Close(None) => {}
            other => panic!("{other:?}"),
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!server.is_finished(), "the server closed before the client's Close");
        // The answer goes out, then the server's end of stream comes in.
        assert!(client.next().await.is_none());
        drop(client);
        let s = server.await.unwrap();
        assert_eq!(s.ended(), Some(Ended::Clean));
    }

    /// A client that closes first gets its Close answered, then the end of
    /// the stream.
    #[tokio::test]
    async fn a_client_close_is_answered_then_the_stream_ends() {
        let (mut s, mut client) = pair().await;
        client
            .send(Message::Binary(Bytes::from_static(b"\xc0\x00")))
            .await
            .unwrap();
        client.send(Message::Close(None)).await.unwrap();
        let mut got = Vec::new();
        assert_eq!(s.read_to_end(&mut got).await.unwrap(), 2);
        let server = tokio::spawn(async move {
            s.shutdown().await.unwrap();
            s
        });
        // The answer, then the end of the stream.
        match client.next().await.unwrap().unwrap() {
            Message::Close(None) => {}
            other => panic!("{other:?}"),
        }
        assert!(client.next().await.is_none());
        drop(client);
        assert_eq!(server.await.unwrap().ended(), Some(Ended::Clean));
    }

    /// A client that never answers (nor reads) is let go after the grace.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_let_go_after_the_grace() {
        let (mut s, client) = pair().await;
        s.shutdown().await.unwrap();
        assert_eq!(s.ended(), Some(Ended::GaveUp));
        drop(client);
    }
}
