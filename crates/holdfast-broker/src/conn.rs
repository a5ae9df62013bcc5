//! One client connection: CONNECT and authentication, then a single task
//! that reads packets, writes acknowledgements and deliveries, and keeps
//! time for keep-alive.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use holdfast_mqtt::{
    Ack, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, Publish, QoS, SubAck, Subscribe, Unsubscribe,
    Version, decode, decode_connect_prefix, encode, reason, topic,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::session::{Delivery, Inflight, Msg, Outgoing, Session, SubRecord};
use super::{Broker, Routed, now_ms};
use holdfast_metrics::{self as metrics, ReasonLabels, ResultLabels, TransportLabels};
use holdfast_model::policy::{AuthzDecision, ConnectInfo, Operation, Principal, RefusalCode, Transport};
use holdfast_outbox::{AppendError, MessageId};

mod handshake;
mod packets;
mod sessions;

use self::sessions::received;

/// Bytes buffered for the socket beyond which the session queue is not
/// drained further until the client reads.
const HIGH_WATER: usize = 256 << 10;

/// A publisher whose message lands in a connected subscriber's queue deeper
/// than this pauses reading for [`BACKPRESSURE_PAUSE`], so a fast publisher
/// cannot outrun a slow subscriber into ever-growing queues.
const BACKPRESSURE_DEPTH: usize = 256;
const BACKPRESSURE_PAUSE: Duration = Duration::from_millis(1);
/// Most authorization decisions cached per connection and operation.
const AUTHZ_CACHE: usize = 1024;
/// After the server ends a connection with an error, how long it reads (and
/// discards) what the client is still sending, and how much at most. Closing
/// a socket with unread data makes the kernel answer with a reset, and a
/// client still writing would see a broken pipe instead of the reason code.
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

/// A received QoS 1/2 PUBLISH waiting for its outbox appends.
struct PendingAck {
    pkid: u16,
    qos: QoS,
    waits: Vec<oneshot::Receiver<Result<MessageId, AppendError>>>,
    code: u8,
}

impl PendingAck {
    /// The reason code if every append has finished, without waiting.
    fn try_ready(&mut self) -> Option<u8> {
        while let Some(rx) = self.waits.last_mut() {
            match rx.try_recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self.code = e.mqtt_reason_code(),
                Err(oneshot::error::TryRecvError::Closed) => self.code = reason::UNSPECIFIED,
                Err(oneshot::error::TryRecvError::Empty) => return None,
            }
            self.waits.pop();
        }
        Some(self.code)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<u8> {
        while let Some(rx) = self.waits.last_mut() {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(Ok(_))) => {}
                Poll::Ready(Ok(Err(e))) => self.code = e.mqtt_reason_code(),
                Poll::Ready(Err(_)) => self.code = reason::UNSPECIFIED,
                Poll::Pending => return Poll::Pending,
            }
            self.waits.pop();
        }
        Poll::Ready(self.code)
    }
}

/// Serves one connection until it ends. Never panics on client input; every
/// refusal and protocol error is answered with a reason code and counted.
pub async fn serve<S>(broker: Arc<Broker>, stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let transport = peer.transport.as_str();
    let gauge = metrics::handle(&broker.metrics.mqtt_connections, &TransportLabels { transport });
    let over = broker.connections.fetch_add(1, Ordering::AcqRel) as u64 >= broker.max_connections();
    gauge.inc();
    let (rd, wr) = tokio::io::split(stream);
    let mut conn = Conn {
        broker: broker.clone(),
        rd,
        wr,
        rbuf: BytesMut::new(),
        out: BytesMut::new(),
        peer,
        version: Version::V311,
        session: None,
        conn_id: broker.next_conn_id(),
        principal: None,
        keep_alive: Duration::ZERO,
        aliases: Vec::new(),
        pending: VecDeque::new(),
        authz: [HashMap::new(), HashMap::new()],
        authz_version: None,
        will: None,
        outbound_window: 1,
        client_max_packet: u32::MAX,
        paused_until: None,
        revoked: None,
    };
    let served = CatchPanic(Box::pin(async {
        match conn.handshake(over).await {
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
    conn.finish(exit).await;
    broker.connections.fetch_sub(1, Ordering::AcqRel);
    gauge.dec();
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

struct Conn<S> {
    broker: Arc<Broker>,
    rd: tokio::io::ReadHalf<S>,
    wr: tokio::io::WriteHalf<S>,
    rbuf: BytesMut,
    out: BytesMut,
    peer: Peer,
    version: Version,
    session: Option<Arc<Session>>,
    conn_id: u64,
    principal: Option<Principal>,
    keep_alive: Duration,
    aliases: Vec<Option<String>>,
    pending: VecDeque<PendingAck>,
    /// Cached authorization answers by topic: `[publish, subscribe]`.
    authz: [HashMap<String, bool>; 2],
    authz_version: Option<Arc<str>>,
    will: Option<WillInfo>,
    outbound_window: usize,
    client_max_packet: u32,
    /// Reading is paused until then (backpressure from slow subscribers).
    paused_until: Option<Instant>,
    /// Fires when the principal's credentials are revoked.
    revoked: Option<Arc<tokio::sync::Notify>>,
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Conn<S> {
    fn send(&mut self, p: &Packet) {
        encode(p, self.version, &mut self.out);
    }

    async fn write_out(&mut self) -> std::io::Result<()> {
        while !self.out.is_empty() {
            self.wr.write_buf(&mut self.out).await?;
        }
        self.wr.flush().await
    }

    /// On shutdown: reads nothing more, waits (at most
    /// [`Broker::shutdown_wait`]) for the appends this connection already
    /// handed to the outbox, and
    /// acknowledges them, so a client is not left to resend what was
    /// stored. The exit then sends DISCONNECT (0x8B, server shutting down).
    async fn finish_in_flight(&mut self, session: &Arc<Session>) -> Exit {
        let deadline = Instant::now() + self.broker.shutdown_wait();
        while let Some(front) = self.pending.front_mut() {
            let Ok(code) = tokio::time::timeout_at(deadline, poll_fn(|cx| front.poll(cx))).await else {
                tracing::debug!(peer = %self.peer.addr, unacknowledged = self.pending.len(), "shutdown: appends still waiting at the limit");
                break;
            };
            if let Some(p) = self.pending.pop_front()
                && let Some(exit) = self.acknowledge(session, p.pkid, p.qos, code)
            {
                return exit;
            }
        }
        Exit::Shutdown
    }

    fn bad_packet(&self, e: &DecodeError) {
        tracing::debug!(peer = %self.peer.addr, error = %e, "closing connection on a bad packet");
        metrics::handle(
            &self.broker.metrics.mqtt_bad_packets,
            &ReasonLabels { reason: e.kind() },
        )
        .inc();
    }

    /// The main loop.
    async fn run(&mut self) -> Exit {
        let broker = self.broker.clone();
        let Some(session) = self.session.clone() else {
            return Exit::Error(reason::UNSPECIFIED, "no-session");
        };
        let mut stop = broker.stop.clone();
        let mut last_rx = Instant::now();
        let mut busy = false;
        loop {
            if self.paused_until.is_some_and(|t| t <= Instant::now()) {
                self.paused_until = None;
            }
            // Whole packets in the buffer (including any that came with
            // CONNECT), unless paused by backpressure.
            if self.paused_until.is_none()
                && !self.rbuf.is_empty()
                && let Some(exit) = self.process(&session)
            {
                return exit;
            }
            if self.out.len() < HIGH_WATER {
                self.flush_session(&session);
            }
            let paused_until = self.paused_until;
            let reading = paused_until.is_none() && self.pending.len() < usize::from(broker.config.max_inflight) * 4;
            let keep_alive = self.keep_alive;
            let deadline = last_rx + keep_alive;
            // Small while idle, larger while the client keeps the buffer full.
            if self.rbuf.capacity() - self.rbuf.len() < 256 {
                self.rbuf.reserve(if busy { 16 << 10 } else { 1024 });
            }
            let revoked = self.revoked.clone();
            let Conn {
                rd,
                wr,
                rbuf,
                out,
                pending,
                ..
            } = self;
            let ack_ready = poll_fn(|cx| match pending.front_mut() {
                Some(p) => p.poll(cx),
                None => Poll::Pending,
            });
            tokio::select! {
                biased;
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => return self.finish_in_flight(&session).await,
                _ = session.kick.notified() => {
                    if session.kick_pending.swap(false, Ordering::AcqRel) {
                        return Exit::TakenOver;
                    }
                }
                _ = async { match &revoked { Some(r) => r.notified().await, None => std::future::pending().await } } => {
                    broker.metrics.mqtt_revoked.inc();
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
                    if let Some(p) = self.pending.pop_front()
                        && let Some(exit) = self.acknowledge(&session, p.pkid, p.qos, code)
                    {
                        return exit;
                    }
                    // Every acknowledgement that is ready too, in order, so
                    // they leave in one write.
                    while let Some(code) = self.pending.front_mut().and_then(PendingAck::try_ready) {
                        if let Some(p) = self.pending.pop_front()
                            && let Some(exit) = self.acknowledge(&session, p.pkid, p.qos, code)
                        {
                            return exit;
                        }
                    }
                }
                r = rd.read_buf(rbuf), if reading => {
                    match r {
                        Ok(0) | Err(_) => return Exit::Unclean("closed"),
                        Ok(n) => {
                            busy = n >= 1024;
                            last_rx = Instant::now();
                        }
                    }
                }
                _ = session.wake.notified() => {}
                _ = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)), if paused_until.is_some() => {}
                _ = tokio::time::sleep_until(deadline), if !keep_alive.is_zero() => {
                    if Instant::now() >= last_rx + keep_alive {
                        return Exit::Error(reason::KEEP_ALIVE_TIMEOUT, "keep-alive-timeout");
                    }
                }
            }
        }
    }

    /// Moves queued messages into the write buffer, within the client's
    /// receive maximum and the buffer's high-water mark.
    fn flush_session(&mut self, session: &Arc<Session>) {
        let now = now_ms();
        let mut st = session.lock();
        let mut took = false;
        while self.out.len() < HIGH_WATER {
            let Some(front) = st.queue.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce && st.inflight.len() >= self.outbound_window {
                break;
            }
            let Some(out) = st.queue.pop_front() else {
                break;
            };
            took = true;
            if out.msg.expires_at_ms.is_some_and(|e| e <= now) {
                self.broker.drop_reason("expired");
                self.broker.del_queued(session, out.seq);
                continue;
            }
            let pkid = if out.qos == QoS::AtMostOnce { 0 } else { st.next_pkid() };
            if let Err(size) = self.encode_delivery(&out, pkid, false, now) {
                self.too_large(session, &out, size);
                continue;
            }
            if out.qos == QoS::AtMostOnce {
                out.settle(Delivery::Delivered);
            } else {
                st.inflight.push_back(Inflight {
                    pkid,
                    out,
                    released: false,
                });
            }
        }
        let room = took && std::mem::take(&mut st.wants_room);
        drop(st);
        if room {
            // A delivery refused for a full queue may try again.
            self.broker.dialect.client_ready(&session.client_id);
        }
    }

    /// A message that exceeds the client's Maximum Packet Size: dropped,
    /// counted, and its sender told.
    fn too_large(&self, session: &Session, out: &Outgoing, size: usize) {
        self.broker.drop_reason("too-large-for-client");
        self.broker.del_queued(session, out.seq);
        out.settle(Delivery::TooLarge {
            size,
            max: self.client_max_packet,
        });
    }

    /// Encodes a delivery; if it exceeds the client's maximum packet size,
    /// encodes nothing and returns the size it would have had.
    fn encode_delivery(&mut self, out: &Outgoing, pkid: u16, dup: bool, now: u64) -> Result<(), usize> {
        let m = &out.msg;
        let mut properties = Properties::default();
        if self.version.is_v5() {
            properties = m.properties.clone();
            properties.subscription_identifiers = out.sub_ids.clone();
            if let Some(e) = m.expires_at_ms {
                properties.message_expiry_interval = Some(e.saturating_sub(now).div_ceil(1000) as u32);
            }
        }
        let p = Publish {
            dup,
            qos: out.qos,
            retain: out.retain,
            topic: m.topic.clone(),
            pkid,
            payload: m.payload.clone(),
            properties,
        };
        let before = self.out.len();
        encode(&Packet::Publish(p), self.version, &mut self.out);
        let size = self.out.len() - before;
        if size > self.client_max_packet as usize {
            self.out.truncate(before);
            return Err(size);
        }
        self.broker.counters.sent[out.qos as usize].inc();
        Ok(())
    }

    /// Ends the connection: tells the client why, detaches the session,
    /// publishes the will if it is due.
    async fn finish(&mut self, exit: Exit) {
        if let (Some(_), Some(p)) = (self.revoked.take(), &self.principal) {
            self.broker.unregister_principal(&p.id, self.conn_id);
        }
        let reason_label = match exit {
            Exit::Clean => "client-disconnect",
            Exit::Unclean(r) => r,
            Exit::Error(_, r) => r,
            Exit::TakenOver => "session-taken-over",
            Exit::Shutdown => "server-shutdown",
        };
        metrics::handle(
            &self.broker.metrics.mqtt_disconnects,
            &ReasonLabels { reason: reason_label },
        )
        .inc();
        let code = match exit {
            Exit::Error(code, _) => Some(code),
            Exit::TakenOver => Some(reason::SESSION_TAKEN_OVER),
            Exit::Shutdown => Some(reason::SERVER_SHUTTING_DOWN),
            _ => None,
        };
        if let Some(code) = code
            && self.version.is_v5()
            && self.session.is_some()
        {
            self.send(&Packet::Disconnect(Disconnect {
                code,
                properties: Properties::default(),
            }));
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.write_out()).await;
        let _ = tokio::time::timeout(Duration::from_millis(200), self.wr.shutdown()).await;
        if let Some(session) = self.session.take() {
            let will = match exit {
                Exit::Clean | Exit::Shutdown => None,
                _ => self.will.take(),
            };
            let principal = self.principal.as_ref().map(|p| p.id.clone());
            self.broker
                .detach(&session, self.conn_id, will.map(|w| (w.msg, w.delay_s)), principal);
        }
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
        let mut buf = [0u8; 8192];
        while left > 0 {
            match tokio::time::timeout_at(deadline, self.rd.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    }
}

impl Broker {}
