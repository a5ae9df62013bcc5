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

use super::session::{Inflight, Msg, Outgoing, Session, SubRecord};
use super::{Broker, Routed, now_ms};
use holdfast_metrics::{self as metrics, ReasonLabels, ResultLabels, TransportLabels};
use holdfast_model::policy::{AuthzDecision, ConnectInfo, Operation, Principal, RefusalCode, Transport};
use holdfast_outbox::{AppendError, MessageId};

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

fn transport_name(t: Transport) -> &'static str {
    t.as_str()
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
    let transport = transport_name(peer.transport);
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

    fn count_connect(&self, result: &'static str) {
        metrics::handle(&self.broker.metrics.mqtt_connects, &ResultLabels { result }).inc();
    }

    fn bad_packet(&self, e: &DecodeError) {
        tracing::debug!(peer = %self.peer.addr, error = %e, "closing connection on a bad packet");
        metrics::handle(
            &self.broker.metrics.mqtt_bad_packets,
            &ReasonLabels { reason: e.kind() },
        )
        .inc();
    }

    /// Refuses the CONNECT with `code` and ends the connection.
    async fn refuse(&mut self, code: u8, result: &'static str) -> Exit {
        self.count_connect(result);
        self.send(&Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: Properties::default(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(1), self.write_out()).await;
        Exit::Error(code, result)
    }

    /// Reads CONNECT, authenticates, attaches the session, sends CONNACK.
    async fn handshake(&mut self, over_limit: bool) -> Result<(), Exit> {
        let broker = self.broker.clone();
        let cfg = &broker.config;
        let deadline = Instant::now() + Duration::from_millis(cfg.connect_timeout_ms);
        let connect = loop {
            let prefix = decode_connect_prefix(&self.rbuf);
            match decode(&mut self.rbuf, None, cfg.max_packet_size as usize) {
                Ok(Some(Packet::Connect(c))) => break c,
                Ok(Some(_)) => return Err(Exit::Error(reason::PROTOCOL_ERROR, "protocol")),
                Ok(None) => {}
                Err(e) => {
                    self.bad_packet(&e);
                    self.count_connect(e.kind());
                    // Answer in the client's protocol when it can be told.
                    self.version = prefix.unwrap_or(Version::V311);
                    if matches!(e, DecodeError::UnsupportedVersion { .. }) || prefix.is_some() {
                        return Err(self.refuse(e.reason_code(), "bad-connect").await);
                    }
                    return Err(Exit::Error(e.reason_code(), "bad-connect"));
                }
            }
            self.rbuf.reserve(256);
            match tokio::time::timeout_at(deadline, self.rd.read_buf(&mut self.rbuf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Exit::Unclean("closed-before-connect")),
                Ok(Ok(_)) => {}
                Err(_) => {
                    self.count_connect("timeout");
                    return Err(Exit::Unclean("connect-timeout"));
                }
            }
        };
        let mut c: Connect = *connect;
        self.version = c.version;
        let v5 = c.version.is_v5();
        if over_limit {
            return Err(self.refuse(reason::SERVER_BUSY, "connection-limit").await);
        }
        if c.properties.authentication_method.is_some() {
            return Err(self.refuse(reason::BAD_AUTHENTICATION_METHOD, "bad-auth-method").await);
        }
        let mut assigned = None;
        if c.client_id.is_empty() {
            if !c.clean_start && !v5 {
                return Err(self.refuse(reason::CLIENT_ID_NOT_VALID, "bad-client-id").await);
            }
            let id = format!("holdfast-{:016x}", holdfast_model::random_u64());
            c.client_id = id.clone();
            assigned = Some(id);
        }
        if c.client_id.len() > cfg.max_client_id_length {
            return Err(self.refuse(reason::CLIENT_ID_NOT_VALID, "bad-client-id").await);
        }
        // The auth plugin decides; it may hash passwords, so off the reactor.
        let info = ConnectInfo {
            client_id: c.client_id.clone(),
            username: c.username.clone(),
            password: c.password.as_ref().map(|p| p.to_vec()),
            protocol_version: c.version.level(),
            transport: self.peer.transport,
            peer_addr: self.peer.addr.to_string(),
            cert_thumbprint: self.peer.cert_thumbprint.clone(),
            cert_common_name: self.peer.cert_common_name.clone(),
        };
        // A source that keeps failing waits before it is answered.
        let ip = self.peer.addr.ip();
        if let Some(delay) = broker.throttle.delay(ip, std::time::Instant::now()) {
            broker.metrics.mqtt_auth_delayed.inc();
            tokio::time::sleep(delay).await;
        }
        let policy = broker.policy.clone();
        let answer = tokio::task::spawn_blocking(move || policy.authenticate(&info)).await;
        let principal = match answer {
            Ok(Ok(p)) => {
                broker.throttle.success(ip);
                p
            }
            Ok(Err(refusal)) => {
                tracing::info!(client = %c.client_id, peer = %self.peer.addr, reason = %refusal.reason, "connection refused by the auth plugin");
                let failure = broker.throttle.failure(ip, std::time::Instant::now());
                if let Some(delay) = failure.delay {
                    // Logged when back-off starts and then every tenth failure.
                    if failure.failures == broker.config.auth_backoff_after_failures
                        || failure.failures.is_multiple_of(10)
                    {
                        tracing::warn!(source = %ip, failures = failure.failures, delay_ms = delay.as_millis() as u64, "repeated authentication failures: slowing this source down");
                    }
                }
                let (code, result) = match refusal.code {
                    RefusalCode::BadCredentials => (reason::BAD_USERNAME_OR_PASSWORD, "bad-credentials"),
                    RefusalCode::NotAuthorized => (reason::NOT_AUTHORIZED, "not-authorized"),
                    RefusalCode::BadClientId => (reason::CLIENT_ID_NOT_VALID, "bad-client-id"),
                    RefusalCode::Banned => (reason::BANNED, "banned"),
                };
                return Err(self.refuse(code, result).await);
            }
            Err(_) => return Err(self.refuse(reason::UNSPECIFIED, "auth-failed").await),
        };
        self.revoked = Some(broker.register_principal(&principal.id, self.conn_id));
        self.principal = Some(principal);
        if let Some(w) = &c.will
            && !self.authorized(false, &w.topic)
        {
            return Err(self.refuse(reason::NOT_AUTHORIZED, "will-not-authorized").await);
        }
        // Keep-alive, possibly lowered by the server.
        let mut keep_alive = c.keep_alive;
        let mut server_keep_alive = None;
        if cfg.max_keep_alive_seconds > 0 && (keep_alive == 0 || keep_alive > cfg.max_keep_alive_seconds) {
            keep_alive = cfg.max_keep_alive_seconds;
            server_keep_alive = Some(keep_alive);
        }
        self.keep_alive = Duration::from_millis(u64::from(keep_alive) * 1500);
        // Session expiry: MQTT 5 asks; 3.1.1 persistent sessions get the ceiling.
        let asked = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry = asked.min(cfg.max_session_expiry_seconds);
        self.client_max_packet = c.properties.maximum_packet_size.unwrap_or(u32::MAX);
        let receive_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
        self.outbound_window = usize::from(receive_max.min(cfg.max_inflight));
        if let Some(w) = c.will.take() {
            self.will = Some(WillInfo {
                delay_s: w.properties.will_delay_interval.unwrap_or(0),
                msg: received(
                    w.topic,
                    w.payload,
                    w.qos,
                    w.retain,
                    &w.properties,
                    c.client_id.as_str().into(),
                ),
            });
        }
        let client_id: Arc<str> = c.client_id.as_str().into();
        let (session, present) = match broker.attach(&client_id, c.clean_start, expiry, self.conn_id).await {
            Some(s) => s,
            None => return Err(self.refuse(reason::SERVER_BUSY, "takeover-timeout").await),
        };
        {
            let mut st = session.lock();
            st.version = c.version;
            st.client_receive_max = receive_max;
            st.client_max_packet = self.client_max_packet;
        }
        self.session = Some(session.clone());
        self.count_connect("accepted");
        let mut props = Properties::default();
        if v5 {
            props.assigned_client_identifier = assigned;
            props.receive_maximum = Some(cfg.max_inflight);
            props.maximum_packet_size = Some(cfg.max_packet_size);
            props.topic_alias_maximum = Some(cfg.topic_alias_maximum);
            props.retain_available = Some(1);
            props.wildcard_subscription_available = Some(1);
            props.subscription_identifiers_available = Some(1);
            props.shared_subscription_available = Some(1);
            props.server_keep_alive = server_keep_alive;
            if asked != expiry {
                props.session_expiry_interval = Some(expiry);
            }
        }
        self.send(&Packet::ConnAck(ConnAck {
            session_present: present,
            code: reason::SUCCESS,
            properties: props,
        }));
        // Resume: unacknowledged messages go again, in order.
        let resend: Vec<Inflight> = session.lock().inflight.iter().cloned().collect();
        for i in resend {
            if i.released {
                self.send(&Packet::PubRel(Ack::new(i.pkid)));
            } else {
                self.encode_delivery(&i.out, i.pkid, true, now_ms());
            }
        }
        tracing::debug!(client = %client_id, peer = %self.peer.addr, version = ?c.version, present, "client connected");
        Ok(())
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

    /// Decodes and handles every whole packet in the read buffer.
    fn process(&mut self, session: &Arc<Session>) -> Option<Exit> {
        // Stops early when a publish asked for backpressure; the rest waits.
        while self.paused_until.is_none() {
            let max = self.broker.config.max_packet_size as usize;
            match decode(&mut self.rbuf, Some(self.version), max) {
                Ok(None) => return None,
                Ok(Some(p)) => {
                    if let Some(exit) = self.handle(session, p) {
                        return Some(exit);
                    }
                }
                Err(e) => {
                    self.bad_packet(&e);
                    return Some(Exit::Error(e.reason_code(), e.kind()));
                }
            }
        }
        None
    }

    fn handle(&mut self, session: &Arc<Session>, packet: Packet) -> Option<Exit> {
        match packet {
            Packet::Publish(p) => return self.on_publish(session, p),
            Packet::PubAck(a) => {
                let done = session.lock().take_inflight(a.pkid);
                if let Some(i) = done {
                    self.broker.del_queued(session, i.out.seq);
                }
            }
            Packet::PubRec(a) => {
                let mut st = session.lock();
                let found = st.inflight.iter_mut().find(|i| i.pkid == a.pkid).map(|i| {
                    if a.code < 0x80 {
                        i.released = true;
                    }
                    i.out.clone()
                });
                match found {
                    None => {
                        drop(st);
                        let mut rel = Ack::new(a.pkid);
                        rel.code = reason::PACKET_ID_NOT_FOUND;
                        self.send(&Packet::PubRel(rel));
                    }
                    Some(out) if a.code >= 0x80 => {
                        // The client refused it: the flow ends here.
                        st.take_inflight(a.pkid);
                        drop(st);
                        self.broker.del_queued(session, out.seq);
                    }
                    Some(out) => {
                        drop(st);
                        self.broker.put_released(session, &out, a.pkid);
                        self.send(&Packet::PubRel(Ack::new(a.pkid)));
                    }
                }
            }
            Packet::PubComp(a) => {
                let done = session.lock().take_inflight(a.pkid);
                if let Some(i) = done {
                    self.broker.del_queued(session, i.out.seq);
                }
            }
            Packet::PubRel(a) => {
                let known = session.lock().incoming_qos2.remove(&a.pkid);
                let mut comp = Ack::new(a.pkid);
                if !known {
                    comp.code = reason::PACKET_ID_NOT_FOUND;
                }
                self.send(&Packet::PubComp(comp));
            }
            Packet::Subscribe(s) => return self.on_subscribe(session, s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(session, u),
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval {
                    let mut st = session.lock();
                    if st.expiry_s == 0 && e > 0 {
                        drop(st);
                        return Some(Exit::Error(reason::PROTOCOL_ERROR, "protocol-error"));
                    }
                    st.expiry_s = e.min(self.broker.config.max_session_expiry_seconds);
                }
                return Some(if d.code == reason::DISCONNECT_WITH_WILL {
                    Exit::Unclean("disconnect-with-will")
                } else {
                    Exit::Clean
                });
            }
            Packet::Connect(_) | Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                let e = DecodeError::Protocol("a client sent a server-only packet");
                self.bad_packet(&e);
                return Some(Exit::Error(reason::PROTOCOL_ERROR, "protocol-error"));
            }
            Packet::Auth(_) => {
                let e = DecodeError::Protocol("AUTH without enhanced authentication");
                self.bad_packet(&e);
                return Some(Exit::Error(reason::PROTOCOL_ERROR, "protocol-error"));
            }
        }
        None
    }

    fn on_publish(&mut self, session: &Arc<Session>, mut p: Publish) -> Option<Exit> {
        let broker = self.broker.clone();
        broker.counters.received[p.qos as usize].inc();
        let v5 = self.version.is_v5();
        if p.qos != QoS::AtMostOnce {
            let in_flight = self.pending.len() + session.lock().incoming_qos2.len();
            if v5 && in_flight >= usize::from(broker.config.max_inflight) {
                broker.deny_reason("receive-maximum");
                return Some(Exit::Error(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "receive-maximum-exceeded",
                ));
            }
        }
        if let Some(alias) = p.properties.topic_alias.take() {
            let slot = usize::from(alias);
            if alias == 0 || alias > broker.config.topic_alias_maximum {
                return Some(Exit::Error(reason::TOPIC_ALIAS_INVALID, "topic-alias-invalid"));
            }
            if self.aliases.len() < slot {
                // Grown on use, so connections without aliases pay nothing.
                self.aliases.resize(slot, None);
            }
            if p.topic.is_empty() {
                match &self.aliases[slot - 1] {
                    Some(t) => p.topic = t.clone(),
                    None => return Some(Exit::Error(reason::PROTOCOL_ERROR, "unknown-topic-alias")),
                }
            } else {
                self.aliases[slot - 1] = Some(p.topic.clone());
            }
        }
        if p.topic.len() > broker.config.max_topic_length || !topic::valid_name(&p.topic) {
            broker.deny_reason("topic-invalid");
            return Some(Exit::Error(reason::TOPIC_NAME_INVALID, "topic-name-invalid"));
        }
        if p.qos == QoS::ExactlyOnce {
            if session.lock().incoming_qos2.contains(&p.pkid) {
                // A resend of one already stored: acknowledge again, once.
                self.send(&Packet::PubRec(Ack::new(p.pkid)));
                return None;
            }
            if self
                .pending
                .iter()
                .any(|a| a.pkid == p.pkid && a.qos == QoS::ExactlyOnce)
            {
                return None;
            }
        }
        if !self.authorized(false, &p.topic) {
            broker.deny_reason("publish-not-authorized");
            self.ack_now(p.pkid, p.qos, if v5 { reason::NOT_AUTHORIZED } else { 0 });
            return None;
        }
        let principal = self.principal.as_ref().map(|p| p.id.clone());
        if broker.dialect.is_request(&p.topic) {
            // Twin and method traffic is answered here, never routed.
            broker
                .dialect
                .device_request(&session.client_id, principal.as_deref(), &p.topic, &p.payload);
            self.ack_now(p.pkid, p.qos, reason::SUCCESS);
            return None;
        }
        let mut msg = received(
            p.topic,
            p.payload,
            p.qos,
            p.retain,
            &p.properties,
            session.client_id.clone(),
        );
        if let Err(e) = broker.dialect.annotate(&mut msg) {
            broker.deny_reason("bad-property-bag");
            tracing::debug!(client = %session.client_id, topic = %msg.topic, error = %e, "publish refused");
            self.ack_now(p.pkid, p.qos, if v5 { reason::PAYLOAD_FORMAT_INVALID } else { 0 });
            return None;
        }
        let msg = Arc::new(msg);
        let Routed {
            waits,
            refusal,
            backlog,
        } = broker.route(&msg, principal.as_deref());
        if backlog > BACKPRESSURE_DEPTH {
            self.paused_until = Some(Instant::now() + BACKPRESSURE_PAUSE);
        }
        if p.qos == QoS::AtMostOnce {
            return None;
        }
        let code = refusal.unwrap_or(reason::SUCCESS);
        if waits.is_empty() && self.pending.is_empty() {
            return self.acknowledge(session, p.pkid, p.qos, code);
        }
        self.pending.push_back(PendingAck {
            pkid: p.pkid,
            qos: p.qos,
            waits,
            code,
        });
        None
    }

    /// Acknowledges a received QoS 1/2 PUBLISH once it is stored.
    fn acknowledge(&mut self, session: &Arc<Session>, pkid: u16, qos: QoS, code: u8) -> Option<Exit> {
        if code >= 0x80 && !self.version.is_v5() {
            // MQTT 3.1.1 cannot refuse a PUBLISH; closing makes the client
            // keep it and try again later.
            self.broker.deny_reason("not-stored");
            return Some(Exit::Error(code, "not-stored"));
        }
        if qos == QoS::ExactlyOnce && code < 0x80 {
            session.lock().incoming_qos2.insert(pkid);
        }
        self.ack_now(pkid, qos, code);
        None
    }

    fn ack_now(&mut self, pkid: u16, qos: QoS, code: u8) {
        let ack = Ack {
            pkid,
            code,
            properties: Properties::default(),
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(&Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send(&Packet::PubRec(ack)),
        }
    }

    fn on_subscribe(&mut self, session: &Arc<Session>, s: Subscribe) -> Option<Exit> {
        let broker = self.broker.clone();
        let cfg = &broker.config;
        let id = s.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained: Vec<(Arc<Msg>, QoS, bool, Option<u32>)> = Vec::new();
        let mut changed = false;
        for (filter, options) in s.filters {
            let shared = topic::parse_shared(&filter);
            let valid = filter.len() <= cfg.max_topic_length
                && match shared {
                    Some(Ok(_)) => true,
                    Some(Err(())) => false,
                    None => topic::valid_filter(&filter),
                };
            if !valid {
                broker.deny_reason("filter-invalid");
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            }
            if shared.is_some() && options.no_local {
                return Some(Exit::Error(reason::PROTOCOL_ERROR, "no-local-on-shared"));
            }
            let exists = session.lock().subs.contains_key(&filter);
            if !exists && session.lock().subs.len() >= cfg.max_subscriptions_per_client {
                broker.deny_reason("subscription-limit");
                codes.push(reason::QUOTA_EXCEEDED);
                continue;
            }
            let inner = match shared {
                Some(Ok((_, f))) => f,
                _ => filter.as_str(),
            };
            if !self.authorized(true, inner) {
                broker.deny_reason("subscribe-not-authorized");
                codes.push(reason::NOT_AUTHORIZED);
                continue;
            }
            broker.index_sub(session, &filter, options, id);
            session.lock().subs.insert(filter.clone(), SubRecord { options, id });
            changed = true;
            codes.push(options.qos as u8);
            let send_retained = shared.is_none()
                && match options.retain_handling {
                    0 => true,
                    1 => !exists,
                    _ => false,
                };
            if send_retained {
                for m in broker.retained_for(&filter) {
                    retained.push((m, options.qos, options.retain_as_published, id));
                }
            }
        }
        if changed {
            broker.save_session(session);
        }
        self.send(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            codes,
            properties: Properties::default(),
        }));
        for (m, qos, _rap, id) in retained {
            let out = Outgoing {
                qos: m.qos.min(qos),
                retain: true,
                sub_ids: id.into_iter().collect(),
                msg: m,
                seq: 0,
            };
            broker.enqueue(session, out);
        }
        None
    }

    fn on_unsubscribe(&mut self, session: &Arc<Session>, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let had = session.lock().subs.remove(f).is_some();
            if had {
                self.broker.unindex_sub(&session.client_id, f);
                codes.push(reason::SUCCESS);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        self.broker.save_session(session);
        self.send(&Packet::UnsubAck(SubAck {
            pkid: u.pkid,
            codes,
            properties: Properties::default(),
        }));
    }

    /// Asks the auth plugin (or this connection's cache of its answers)
    /// whether the principal may publish (`subscribe` false) or subscribe.
    fn authorized(&mut self, subscribe: bool, topic: &str) -> bool {
        let policy = &self.broker.policy;
        let version = policy.auth_version();
        if self.authz_version.as_ref().is_none_or(|v| !Arc::ptr_eq(v, &version)) {
            // A different auth plugin answers now: forget the old answers.
            self.authz.iter_mut().for_each(HashMap::clear);
            self.authz_version = Some(version);
        }
        let cache = &mut self.authz[usize::from(subscribe)];
        if let Some(&allowed) = cache.get(topic) {
            return allowed;
        }
        let Some(principal) = &self.principal else {
            return false;
        };
        let op = if subscribe {
            Operation::Subscribe
        } else {
            Operation::Publish
        };
        let answer = policy.authorize(principal, op, topic);
        let allowed = match &answer.decision {
            AuthzDecision::Allow => true,
            AuthzDecision::Deny(why) => {
                tracing::debug!(principal = %principal.id, topic, why = %why, subscribe, "denied by the auth plugin");
                false
            }
        };
        if answer.cacheable {
            if cache.len() >= AUTHZ_CACHE {
                cache.clear();
            }
            cache.insert(topic.to_string(), allowed);
        }
        allowed
    }

    /// Moves queued messages into the write buffer, within the client's
    /// receive maximum and the buffer's high-water mark.
    fn flush_session(&mut self, session: &Arc<Session>) {
        let now = now_ms();
        let mut st = session.lock();
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
            if out.msg.expires_at_ms.is_some_and(|e| e <= now) {
                self.broker.drop_reason("expired");
                self.broker.del_queued(session, out.seq);
                continue;
            }
            let pkid = if out.qos == QoS::AtMostOnce { 0 } else { st.next_pkid() };
            if !self.encode_delivery(&out, pkid, false, now) {
                self.broker.drop_reason("too-large-for-client");
                self.broker.del_queued(session, out.seq);
                continue;
            }
            if out.qos != QoS::AtMostOnce {
                st.inflight.push_back(Inflight {
                    pkid,
                    out,
                    released: false,
                });
            }
        }
    }

    /// Encodes a delivery; false if it exceeds the client's maximum packet size.
    fn encode_delivery(&mut self, out: &Outgoing, pkid: u16, dup: bool, now: u64) -> bool {
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
        if self.out.len() - before > self.client_max_packet as usize {
            self.out.truncate(before);
            return false;
        }
        self.broker.counters.sent[out.qos as usize].inc();
        true
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

impl Broker {
    /// Attaches connection `conn_id` to the session of `client_id`, taking
    /// it over from another connection if need be. Returns the session and
    /// whether it was resumed; `None` if the old connection would not let go.
    async fn attach(
        self: &Arc<Self>,
        client_id: &Arc<str>,
        clean_start: bool,
        expiry_s: u32,
        conn_id: u64,
    ) -> Option<(Arc<Session>, bool)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let existing = self.sessions_lock().get(client_id).cloned();
            if let Some(s) = &existing
                && s.is_connected()
            {
                // Session takeover: ask the current connection to leave.
                s.kick_pending.store(true, Ordering::Release);
                s.kick.notify_one();
                if Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            let mut map = self.sessions_lock();
            let current = map.get(client_id).cloned();
            if current.as_ref().is_some_and(|s| s.is_connected()) {
                continue;
            }
            let (session, present) = match current {
                Some(s) if !clean_start => (s, true),
                other => {
                    if let Some(old) = other {
                        drop(map);
                        self.end_session(&old);
                        map = self.sessions_lock();
                    }
                    let s = Arc::new(Session::new(client_id.clone(), expiry_s, holdfast_mqtt::Version::V5));
                    map.insert(client_id.clone(), s.clone());
                    (s, false)
                }
            };
            self.metrics.mqtt_sessions.set(map.len() as i64);
            session.generation.fetch_add(1, Ordering::AcqRel);
            session.set_connected(true);
            session.kick_pending.store(false, Ordering::Release);
            drop(map);
            let was_persistent = {
                let mut st = session.lock();
                let was = st.persistent();
                st.conn_id = conn_id;
                st.expiry_s = expiry_s;
                st.disconnected_at_ms = None;
                was
            };
            if was_persistent && expiry_s == 0 {
                // Resumed as a non-persistent session: its stored copy goes.
                if let Err(e) = self.persist.delete_session(client_id) {
                    tracing::error!(error = %e, "cannot delete a session");
                }
            } else {
                self.save_session(&session);
            }
            return Some((session, present));
        }
    }

    /// Detaches connection `conn_id` from `session`: a non-persistent
    /// session ends, a persistent one waits for its expiry. The will is
    /// published now, or after its delay unless the client comes back.
    fn detach(
        self: &Arc<Self>,
        session: &Arc<Session>,
        conn_id: u64,
        will: Option<(Msg, u32)>,
        principal: Option<String>,
    ) {
        let expiry_s = {
            let mut st = session.lock();
            if st.conn_id != conn_id {
                return;
            }
            st.conn_id = 0;
            st.disconnected_at_ms = Some(now_ms());
            // QoS 0 messages are not kept for an offline client.
            st.queue.retain(|o| o.qos != QoS::AtMostOnce);
            st.expiry_s
        };
        session.set_connected(false);
        // A takeover may be waiting for this connection to let go.
        session.wake.notify_one();
        if expiry_s == 0 {
            self.end_session(session);
        } else {
            self.save_session(session);
            self.schedule_expiry(session, Duration::from_secs(u64::from(expiry_s)));
        }
        if let Some((msg, delay_s)) = will {
            let delay = delay_s.min(expiry_s);
            if delay == 0 {
                self.publish_will(msg, principal.as_deref());
            } else {
                let generation = session.generation.load(Ordering::Acquire);
                let broker = Arc::downgrade(self);
                // Held strongly: the session may end (expiry) at the same
                // moment, and its will must still go out.
                let session = session.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
                    let Some(broker) = broker.upgrade() else {
                        return;
                    };
                    if session.generation.load(Ordering::Acquire) == generation {
                        broker.publish_will(msg, principal.as_deref());
                    }
                });
            }
        }
    }

    fn publish_will(&self, msg: Msg, principal: Option<&str>) {
        if msg.expires_at_ms.is_some_and(|e| e <= now_ms()) {
            self.drop_reason("expired");
            return;
        }
        tracing::debug!(topic = %msg.topic, "publishing a will");
        // Not waited for: there is no publisher left to acknowledge.
        let _ = self.route(&Arc::new(msg), principal);
    }
}

/// A message as a client sent it (PUBLISH or will): expiry made absolute,
/// only the properties that travel to subscribers kept.
fn received(topic: String, payload: bytes::Bytes, qos: QoS, retain: bool, p: &Properties, publisher: Arc<str>) -> Msg {
    Msg {
        expires_at_ms: p.message_expiry_interval.map(|s| now_ms() + u64::from(s) * 1000),
        properties: pass_through(p),
        topic,
        payload,
        qos,
        retain,
        publisher: Some(publisher),
    }
}

/// The MQTT 5 properties that travel with a message to its subscribers.
fn pass_through(p: &Properties) -> Properties {
    Properties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        ..Properties::default()
    }
}
