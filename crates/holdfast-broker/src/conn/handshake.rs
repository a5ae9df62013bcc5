//! CONNECT: limits, authentication, the session taken over or resumed,
//! CONNACK. The phase before a connection has a [`Client`]: it reads from
//! the socket itself and answers a refusal itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use holdfast_model::policy::{ConnectInfo, RefusalCode};
use holdfast_mqtt::{
    ConnAck, Connect, DecodeError, Packet, Properties, Version, decode, decode_connect_prefix, reason,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::authz::Authz;
use super::client::{Accepted, Client};
use super::outbound::Outbound;
use super::{Exit, Peer, WillInfo, bad_packet};
use crate::Broker;
use crate::principals::Principals;
use crate::session::Msg;

/// A connection registered as authenticated as a principal, so a
/// revocation reaches it; dropping it forgets the connection.
pub(super) struct Registration {
    principals: Arc<Principals>,
    principal: String,
    conn_id: u64,
    /// Fires when the principal's credentials are revoked.
    pub(super) revoked: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.principals.unregister(&self.principal, self.conn_id);
    }
}

/// What an accepted CONNECT leaves the connection with.
pub(super) struct Connected {
    pub(super) client: Client,
    /// Whether the session was resumed.
    pub(super) present: bool,
    pub(super) will: Option<WillInfo>,
    /// How long the connection may stay silent.
    pub(super) keep_alive: Duration,
}

/// The CONNECT phase of one connection.
pub(super) struct Handshake<'a, S> {
    pub(super) broker: &'a Arc<Broker>,
    pub(super) rd: &'a mut ReadHalf<S>,
    pub(super) wr: &'a mut WriteHalf<S>,
    pub(super) rbuf: &'a mut BytesMut,
    pub(super) peer: &'a Peer,
    pub(super) conn_id: u64,
    /// Where the connection's registration goes as soon as it exists.
    pub(super) registration: &'a mut Option<Registration>,
    /// The protocol the client speaks, once known.
    pub(super) version: Version,
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Handshake<'_, S> {
    fn count_connect(&self, result: &'static str) {
        self.broker.metrics.connect(result);
    }

    /// Refuses the CONNECT with `code` and ends the connection.
    async fn refuse(&mut self, code: u8, result: &'static str) -> Exit {
        self.count_connect(result);
        let mut out = BytesMut::new();
        holdfast_mqtt::encode(
            &Packet::ConnAck(ConnAck {
                session_present: false,
                code,
                properties: Properties::default(),
            }),
            self.version,
            &mut out,
        );
        let write = async {
            self.wr.write_all(&out).await?;
            self.wr.flush().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
        Exit::Error(code, result)
    }

    /// Reads CONNECT, authenticates, attaches the session, sends CONNACK.
    pub(super) async fn run(mut self, over_limit: bool) -> Result<Connected, Exit> {
        let broker = self.broker.clone();
        let cfg = &broker.config;
        let deadline = Instant::now() + Duration::from_millis(cfg.connect_timeout_ms);
        let connect = loop {
            let prefix = decode_connect_prefix(self.rbuf);
            match decode(self.rbuf, None, cfg.max_packet_size as usize) {
                Ok(Some(Packet::Connect(c))) => break c,
                Ok(Some(_)) => return Err(Exit::Error(reason::PROTOCOL_ERROR, "protocol")),
                Ok(None) => {}
                Err(e) => {
                    bad_packet(self.broker, self.peer.addr, &e);
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
            match tokio::time::timeout_at(deadline, self.rd.read_buf(self.rbuf)).await {
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
            broker.metrics.auth_delayed();
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
        *self.registration = Some(Registration {
            principals: broker.principals.clone(),
            principal: principal.id.clone(),
            conn_id: self.conn_id,
            revoked: broker.principals.register(&principal.id, self.conn_id),
        });
        let mut authz = Authz::default();
        if let Some(w) = &c.will
            && !authz.allowed(&*broker.policy, &principal, false, &w.topic)
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
        let keep_alive = Duration::from_millis(u64::from(keep_alive) * 1500);
        // Session expiry: MQTT 5 asks; 3.1.1 persistent sessions get the ceiling.
        let asked = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry = asked.min(cfg.max_session_expiry_seconds);
        let client_max_packet = c.properties.maximum_packet_size.unwrap_or(u32::MAX);
        let receive_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
        let outbound_window = usize::from(receive_max.min(cfg.max_inflight));
        let will = c.will.take().map(|w| WillInfo {
            delay_s: w.properties.will_delay_interval.unwrap_or(0),
            msg: Msg::received(
                w.topic,
                w.payload,
                w.qos,
                w.retain,
                &w.properties,
                c.client_id.as_str().into(),
            ),
        });
        let client_id: Arc<str> = c.client_id.as_str().into();
        let (session, present) = match broker
            .sessions
            .attach(&client_id, c.clean_start, expiry, self.conn_id)
            .await
        {
            Some(s) => s,
            None => return Err(self.refuse(reason::SERVER_BUSY, "takeover-timeout").await),
        };
        {
            let mut st = session.lock();
            st.version = c.version;
            st.client_receive_max = receive_max;
            st.client_max_packet = client_max_packet;
        }
        let mut client = Client::new(
            broker.clone(),
            Accepted {
                session,
                principal,
                version: c.version,
                peer: self.peer.addr,
                outbound: Outbound::new(&broker, c.version, outbound_window, client_max_packet),
                authz,
            },
        );
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
        client.outbound.send(&Packet::ConnAck(ConnAck {
            session_present: present,
            code: reason::SUCCESS,
            properties: props,
        }));
        tracing::debug!(client = %client_id, peer = %self.peer.addr, version = ?c.version, present, "client connected");
        Ok(Connected {
            client,
            present,
            will,
            keep_alive,
        })
    }
}
