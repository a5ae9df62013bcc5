//! One client connection: a single task that owns the socket, reads and
//! writes, and keeps time for keep-alive. CONNECT is its own phase
//! ([`handshake`]); after it, the client's protocol ([`client`]) takes the
//! packets read and leaves what to write in its [`outbound`] buffer.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use holdfast_model::policy::Transport;
use holdfast_mqtt::{DecodeError, Disconnect, Packet, Properties, Version, reason};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use self::client::Client;
use self::handshake::{Handshake, Registration};
use self::outbound::HIGH_WATER;
use super::Broker;
use super::session::Msg;

mod acks;
mod authz;
mod client;
mod handshake;
mod outbound;

/// After the server ends a connection with an error, how long it reads (and
/// discards) what the client is still sending, and how much at most. Closing
/// a socket with unread data makes the kernel answer with a reset, and a
/// client still writing would see a broken pipe instead of the reason code.
/// A WebSocket does the same after every close, in its closing handshake
/// (`websocket::CLOSE_GRACE` for each of its phases).
const DRAIN_GRACE: Duration = Duration::from_millis(500);
const DRAIN_MAX: usize = 1 << 20;

/// Who is on the other end of a new connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// Listener kind.
    pub transport: Transport,
    /// SHA-256 thumbprint (hex) of a verified client certificate.
    pub cert_thumbprint: Option<String>,
    /// Common name of a verified client certificate.
    pub cert_common_name: Option<String>,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// DISCONNECT with reason 0: no will.
    Clean,
    /// DISCONNECT with reason 0x04, or the socket closed: the will goes out.
    Unclean(&'static str),
    /// The server closes the connection with a reason code; the will goes out.
    Error(u8, &'static str),
    /// Another connection took the session over.
    TakenOver,
    /// The node is shutting down.
    Shutdown,
}

/// A will registered at CONNECT.
struct WillInfo {
    msg: Msg,
    delay_s: u32,
}

/// Logs and counts a packet that could not be decoded.
fn bad_packet(broker: &Broker, peer: SocketAddr, e: &DecodeError) {
    tracing::debug!(peer = %peer, error = %e, "closing connection on a bad packet");
    broker.metrics.bad_packet(e.kind());
}

/// Serves one connection until it ends. Never panics on client input; every
/// refusal and protocol error is answered with a reason code and counted.
pub async fn serve<S>(broker: Arc<Broker>, stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let transport = peer.transport.as_str();
    let gauge = broker.metrics.connections(transport);
    let (conn_id, over) = broker.admit();
    gauge.inc();
    let (rd, wr) = tokio::io::split(stream);
    let mut conn = Conn {
        broker: broker.clone(),
        rd,
        wr,
        rbuf: BytesMut::new(),
        peer,
        conn_id,
        registration: None,
        client: None,
        will: None,
        keep_alive: Duration::ZERO,
    };
    let served = CatchPanic(Box::pin(async {
        // The handshake's state is boxed: it is not carried for the life of
        // the connection.
        match Box::pin(conn.handshake(over)).await {
            Ok(()) => conn.run().await,
            Err(e) => e,
        }
    }))
    .await;
    // A bug that panics while serving one client must not leave its
    // connection half-registered (counted, its client id held): the
    // connection ends like any other, with 0x80, and the panic is logged.
    let exit = served.unwrap_or_else(|what| {
        tracing::error!(peer = %conn.peer.addr, "connection task panicked: {what}");
        Exit::Error(reason::UNSPECIFIED, "internal-error")
    });
    // Boxed: its state (the closing writes, the drain) is only needed at
    // the end, not carried by every idle connection's task.
    Box::pin(conn.finish(exit)).await;
    // The socket closes before the connection stops counting: a node that
    // stops waits for the count, not for this task.
    drop(conn);
    broker.release();
    gauge.dec();
}

/// Reads what the client sent into `buf`. With less than 256 bytes of room
/// in `buf` (an idle connection has none), it reads into a buffer on the
/// stack, only while polled, and copies what came: a connection waiting for
/// its client holds no read buffer.
fn read_some<'a, R: AsyncRead + Unpin>(
    rd: &'a mut R,
    buf: &'a mut BytesMut,
) -> impl Future<Output = std::io::Result<usize>> + 'a {
    poll_fn(move |cx| {
        let room = buf.capacity() - buf.len();
        if room >= 256 {
            let start = buf.len();
            buf.resize(start + room.min(64 << 10), 0);
            let mut rb = tokio::io::ReadBuf::new(&mut buf[start..]);
            let r = Pin::new(&mut *rd).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            buf.truncate(start + n);
            return r.map_ok(|()| n);
        }
        let mut tmp = [0u8; 1024];
        let mut rb = tokio::io::ReadBuf::new(&mut tmp);
        let r = Pin::new(&mut *rd).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        buf.extend_from_slice(rb.filled());
        r.map_ok(|()| n)
    })
}

/// Resolves to the future's output, or to the panic's message if polling it
/// panicked.
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(holdfast_model::panic_message(&*panic))),
        }
    }
}

/// The connection's task: the socket and the timers around a [`Client`].
struct Conn<S> {
    broker: Arc<Broker>,
    rd: tokio::io::ReadHalf<S>,
    wr: tokio::io::WriteHalf<S>,
    rbuf: BytesMut,
    peer: Peer,
    conn_id: u64,
    /// Registered as its principal (from authentication until it ends).
    registration: Option<Registration>,
    /// The client's protocol, once CONNECT is accepted (boxed, like the
    /// will, so the task of a connection stays small).
    client: Option<Box<Client>>,
    will: Option<Box<WillInfo>>,
    keep_alive: Duration,
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Conn<S> {
    /// Reads CONNECT, authenticates, attaches the session, sends CONNACK,
    /// and resends what the resumed session had in flight.
    async fn handshake(&mut self, over_limit: bool) -> Result<(), Exit> {
        let connected = Handshake {
            broker: &self.broker,
            rd: &mut self.rd,
            wr: &mut self.wr,
            rbuf: &mut self.rbuf,
            peer: &self.peer,
            conn_id: self.conn_id,
            registration: &mut self.registration,
            version: Version::V311,
        }
        .run(over_limit)
        .await?;
        self.will = connected.will.map(Box::new);
        self.keep_alive = connected.keep_alive;
        let client = self.client.insert(Box::new(connected.client));
        // Resume: unacknowledged messages go again, in order.
        client.outbound.resend(&client.session);
        // A resumed session may already be subscribed to what waits for it.
        if connected.present {
            self.broker.dialect.client_ready(&client.session.client_id);
        }
        Ok(())
    }

    /// The main loop.
    async fn run(&mut self) -> Exit {
        let broker = self.broker.clone();
        let Some(session) = self.client.as_ref().map(|c| c.session.clone()) else {
            return Exit::Error(reason::UNSPECIFIED, "no-session");
        };
        let revoked = self.registration.as_ref().map(|r| r.revoked.clone());
        let mut stop = broker.stop.clone();
        let mut last_rx = Instant::now();
        let mut busy = false;
        let keep_alive = self.keep_alive;
        loop {
            let Conn {
                rd, wr, rbuf, client, ..
            } = self;
            let Some(client) = client else {
                return Exit::Error(reason::UNSPECIFIED, "no-session");
            };
            if client.paused_until.is_some_and(|t| t <= Instant::now()) {
                client.paused_until = None;
            }
            // Whole packets in the buffer (including any that came with
            // CONNECT), unless paused by backpressure.
            if client.paused_until.is_none()
                && !rbuf.is_empty()
                && let Some(exit) = client.process(rbuf)
            {
                return exit;
            }
            if client.outbound.buf.len() < HIGH_WATER {
                client.outbound.flush_session(&session);
            }
            let paused_until = client.paused_until;
            let reading = client.reading();
            let deadline = last_rx + keep_alive;
            let timer = match (paused_until, keep_alive.is_zero()) {
                (Some(p), true) => Some(p),
                (Some(p), false) => Some(p.min(deadline)),
                (None, false) => Some(deadline),
                (None, true) => None,
            };
            // No buffer while idle (a read waits with none and lands in a
            // buffer on the stack, see `read_some`); a large one while the
            // client keeps it full. An idle connection holds no write
            // buffer either.
            if rbuf.is_empty() && !busy && rbuf.capacity() > 0 {
                *rbuf = BytesMut::new();
            }
            if busy && rbuf.capacity() - rbuf.len() < 256 {
                rbuf.reserve(16 << 10);
            }
            if client.outbound.buf.is_empty() && !busy && client.outbound.buf.capacity() > 0 {
                client.outbound.buf = BytesMut::new();
            }
            let Client { outbound, pending, .. } = &mut **client;
            let out = &mut outbound.buf;
            let ack_ready = poll_fn(|cx| match pending.front_mut() {
                Some(p) => p.poll(cx),
                None => Poll::Pending,
            });
            tokio::select! {
                biased;
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
                    return Box::pin(client.finish_in_flight(Instant::now() + broker.shutdown_wait())).await;
                }
                _ = session.kick.notified() => {
                    if session.kick_pending.swap(false, Ordering::AcqRel) {
                        return Exit::TakenOver;
                    }
                }
                _ = async { match &revoked { Some(r) => r.notified().await, None => std::future::pending().await } } => {
                    broker.metrics.revoked();
                    return Exit::Error(reason::NOT_AUTHORIZED, "revoked");
                }
                r = wr.write_buf(out), if !out.is_empty() => {
                    if r.is_err() || r.is_ok_and(|n| n == 0) {
                        return Exit::Unclean("write-failed");
                    }
                    if out.is_empty() && let Err(_e) = wr.flush().await {
                        return Exit::Unclean("write-failed");
                    }
                }
                code = ack_ready => {
                    if let Some(exit) = client.acknowledge_ready(code) {
                        return exit;
                    }
                }
                r = read_some(rd, rbuf), if reading => {
                    match r {
                        Ok(0) | Err(_) => return Exit::Unclean("closed"),
                        Ok(n) => {
                            busy = n >= 1024;
                            last_rx = Instant::now();
                        }
                    }
                }
                _ = session.wake.notified() => {}
                // One timer for the end of a pause and the keep-alive.
                _ = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                    if !keep_alive.is_zero() && Instant::now() >= last_rx + keep_alive {
                        return Exit::Error(reason::KEEP_ALIVE_TIMEOUT, "keep-alive-timeout");
                    }
                }
            }
        }
    }

    /// Ends the connection: tells the client why, detaches the session,
    /// publishes the will if it is due, then closes the stream (over a
    /// WebSocket, the closing handshake).
    async fn finish(&mut self, exit: Exit) {
        // Revocations no longer reach it.
        self.registration.take();
        let reason_label = match exit {
            Exit::Clean => "client-disconnect",
            Exit::Unclean(r) => r,
            Exit::Error(_, r) => r,
            Exit::TakenOver => "session-taken-over",
            Exit::Shutdown => "server-shutdown",
        };
        self.broker.metrics.disconnected(reason_label);
        let code = match exit {
            Exit::Error(code, _) => Some(code),
            Exit::TakenOver => Some(reason::SESSION_TAKEN_OVER),
            Exit::Shutdown => Some(reason::SERVER_SHUTTING_DOWN),
            _ => None,
        };
        if let Some(client) = &mut self.client {
            if let Some(code) = code
                && client.version.is_v5()
            {
                client.outbound.send(&Packet::Disconnect(Disconnect {
                    code,
                    properties: Properties::default(),
                }));
            }
            let write = async {
                while !client.outbound.buf.is_empty() {
                    self.wr.write_buf(&mut client.outbound.buf).await?;
                }
                self.wr.flush().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
        }
        if let Some(client) = self.client.take() {
            let will = match exit {
                Exit::Clean | Exit::Shutdown => None,
                _ => self.will.take(),
            };
            let session = &client.session;
            if let Some(expiry_s) = self.broker.sessions.detach(session, self.conn_id)
                && let Some(w) = will
            {
                let principal = Some(client.principal.id.clone());
                self.broker
                    .router
                    .publish_will(w.msg, principal, w.delay_s.min(expiry_s), session);
            }
        }
        // The session is let go first: a reconnect (a takeover) does not
        // wait for the close. Over a WebSocket the shutdown is the closing
        // handshake, bounded by its own grace (see `websocket::stream`).
        let shutdown_bound = match self.peer.transport {
            Transport::Websocket => crate::websocket::CLOSE_LIMIT + Duration::from_millis(200),
            _ => Duration::from_millis(200),
        };
        let _ = tokio::time::timeout(shutdown_bound, self.wr.shutdown()).await;
        if matches!(exit, Exit::Error(..)) {
            self.drain_input().await;
        }
    }

    /// Reads and discards what the client still sends, until it closes, for
    /// at most [`DRAIN_GRACE`] and [`DRAIN_MAX`] bytes, so the reason code
    /// written before reaches it (see [`DRAIN_GRACE`]). The session is
    /// already detached: a reconnect does not wait for this.
    async fn drain_input(&mut self) {
        let deadline = Instant::now() + DRAIN_GRACE;
        let mut left = DRAIN_MAX;
        let mut buf = vec![0u8; 8192];
        while left > 0 {
            match tokio::time::timeout_at(deadline, self.rd.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    }
}
