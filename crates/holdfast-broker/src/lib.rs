//! # holdfast-broker
//!
//! The MQTT 3.1.1/5 broker for child devices and modules.
//!
//! Every CONNECT is decided by the auth policy and every PUBLISH and
//! SUBSCRIBE by its authorization. Every received PUBLISH goes through the
//! router policy ([`holdfast_model::policy::Policy`], which the node's plugin
//! slots implement): `upstream(lane)` appends it to the outbox (the PUBACK or
//! PUBREC waits until the append is durable), `local(topic)` delivers it to
//! this node's subscribers, `drop` counts it.
//!
//! - [`conn`]: one task per connection, generic over the stream (TCP, TLS,
//!   a QUIC bidirectional stream): the CONNECT phase, then the client's
//!   protocol (packets in, acknowledgements and deliveries out) without
//!   the socket.
//! - [`session`]: what outlives a connection; [`persist`] keeps persistent
//!   sessions and retained messages in the store.
//! - [`subs`]: the subscription trie.
//! - [`listen`]: the TCP, TLS, QUIC and WebSocket listeners; [`websocket`]
//!   the upgrade and the byte stream, [`handshakes`] the bound on upgrades
//!   in progress.
//!
//! Inside, each part owns its state and is made with what it needs: the
//! session registry (`sessions`), the retained messages (`retained`), the
//! router that carries out the policy's actions and delivers (`routing`),
//! the connections by principal for revocation (`principals`), and what the
//! broker counts (`metrics`). [`Broker`] wires them and is the facade the
//! node, the link and the dialect use.

pub mod config;
pub mod conn;
pub mod handshakes;
pub mod listen;
pub mod persist;
pub mod quic;
pub mod session;
pub mod subs;
pub mod throttle;
pub mod websocket;

mod metrics;
mod principals;
mod retained;
mod routing;
mod sessions;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use holdfast_model::policy::Policy;
use holdfast_outbox::Outbox;
/// What a [`Stored`] resolves to (an outbox append's answer).
pub use holdfast_outbox::{AppendError, MessageId};
use holdfast_store::{Store, StoreError};
use tokio::sync::oneshot;
use tokio::sync::watch;

pub use self::metrics::BrokerMetrics;
use self::persist::Persist;
use self::principals::Principals;
use self::retained::Retained;
use self::routing::{Router, RouterParts};
use self::session::{Delivery, Msg};
use self::sessions::Sessions;
use self::subs::Subscriptions;
use crate::config::MqttConfig;

/// Milliseconds since the Unix epoch.
pub use holdfast_model::unix_ms as now_ms;

/// What routing a message produced for its publisher's acknowledgement.
#[derive(Debug, Default)]
pub struct Routed {
    /// Outbox appends to wait for before acknowledging.
    pub waits: Vec<oneshot::Receiver<Result<MessageId, AppendError>>>,
    /// An append refused at once: its MQTT 5 reason code.
    pub refusal: Option<u8>,
    /// The deepest queue of a connected subscriber the message went to; the
    /// publisher's connection slows down when it is deep.
    pub backlog: usize,
    /// A traced message's store span, ended when the appends are durable
    /// (or when dropped, for a publisher that does not wait).
    pub store_span: Option<StoreSpan>,
}

/// The store span of a traced message (`holdfast_model::trace`): it ends
/// when [`StoreSpan::finish`] is called with the append's outcome, or when
/// it is dropped unfinished.
#[derive(Debug)]
pub struct StoreSpan(
    Option<(
        &'static holdfast_model::trace::Tracer,
        holdfast_model::trace::Started,
        u8,
    )>,
);

impl StoreSpan {
    pub(crate) fn new(
        tracer: &'static holdfast_model::trace::Tracer,
        span: holdfast_model::trace::Started,
        lane: u8,
    ) -> StoreSpan {
        StoreSpan(Some((tracer, span, lane)))
    }

    /// Ends it: the appends finished with MQTT reason `code` (0x80 and up: failed).
    pub fn finish(mut self, code: u8) {
        self.end(code);
    }

    fn end(&mut self, code: u8) {
        use holdfast_model::trace::{AttrValue, SpanKind};
        if let Some((tracer, span, lane)) = self.0.take() {
            span.finish(
                tracer,
                "store",
                SpanKind::Internal,
                vec![("holdfast.lane", AttrValue::Int(i64::from(lane)))],
                (code >= 0x80).then(|| format!("the append failed with reason code 0x{code:02x}")),
            );
        }
    }
}

impl Drop for StoreSpan {
    fn drop(&mut self) {
        self.end(0);
    }
}

/// Resolves once a message a [`Dialect`] took for a device is stored (the
/// same answer an outbox append gives, so the publisher's PUBACK waits for
/// it as for an append).
pub type Stored = oneshot::Receiver<Result<MessageId, AppendError>>;

/// Why [`Broker::deliver_with_receipt`] did not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotTaken {
    /// The client is not connected, or not subscribed to the topic.
    #[error("the client is not connected and subscribed")]
    Offline,
    /// The client's session queue is at `mqtt.max_queued_messages`.
    #[error("the client's queue is full (mqtt.max_queued_messages)")]
    QueueFull,
}

/// The broker: its parts, each with its own state, and what a connection
/// needs to be admitted and authenticated. The methods here are the facade
/// the node, the link and the dialect use.
pub struct Broker {
    config: MqttConfig,
    /// Authentication and authorization (the router policy is the router's).
    pub(crate) policy: Arc<dyn Policy>,
    pub(crate) metrics: Arc<BrokerMetrics>,
    /// Sessions by client id.
    pub(crate) sessions: Arc<Sessions>,
    /// The subscription index.
    pub(crate) subs: Arc<Subscriptions>,
    /// Retained messages.
    pub(crate) retained: Arc<Retained>,
    /// Routes and delivers messages.
    pub(crate) router: Arc<Router>,
    /// Connections by principal id, for revocation.
    pub(crate) principals: Arc<Principals>,
    persist: Arc<Persist>,
    connections: AtomicUsize,
    /// `mqtt.max_connections` (a reload changes it).
    max_connections: AtomicU64,
    /// How long a connection waits at shutdown for its appends, ms
    /// (`set_shutdown_wait`).
    shutdown_wait_ms: AtomicU64,
    next_conn_id: AtomicU64,
    pub(crate) stop: watch::Receiver<bool>,
    /// The identities clients authenticate as.
    pub(crate) registry: Arc<holdfast_registry::Registry>,
    /// Twins, direct methods, property bags.
    pub(crate) dialect: Arc<dyn Dialect>,
    /// Per-source back-off for failed authentication.
    pub(crate) throttle: throttle::Throttle,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("connections", &self.connections.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Broker figures for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrokerStats {
    /// Connected clients.
    pub connections: usize,
    /// Sessions kept.
    pub sessions: usize,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Retained messages.
    pub retained: usize,
}

/// A connected client, for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientInfo {
    /// Client identifier.
    pub client_id: String,
    /// MQTT protocol version: `3.1.1` or `5`.
    pub protocol: &'static str,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Messages waiting to be sent to it.
    pub queued: usize,
    /// Sent to it and not yet acknowledged.
    pub in_flight: usize,
    /// Whether the session outlives the connection.
    pub persistent: bool,
}

/// What a topic dialect (the IoT Hub one, `holdfast-iothub`) does inside
/// the broker: it answers twin and method requests itself, checks and
/// annotates the property bag of what devices publish, adds it back to
/// what is delivered to them, and forwards messages for devices behind a
/// child gateway. The broker calls it; it reaches the broker back through
/// the `Weak<Broker>` [`Broker::open`] makes it with.
pub trait Dialect: Send + Sync + 'static {
    /// True when `topic` is a request the dialect answers (never routed).
    fn is_request(&self, topic: &str) -> bool;
    /// Answers a request published by `client_id`.
    fn device_request(&self, client_id: &str, principal: Option<&str>, topic: &str, payload: &[u8]);
    /// Checks and annotates a message a device published.
    ///
    /// # Errors
    /// A malformed property bag: the publish is refused.
    fn annotate(&self, msg: &mut Msg) -> Result<(), String>;
    /// The topic a message is delivered on, with its property bag.
    fn with_bag(&self, topic: String, props: &holdfast_mqtt::Properties) -> String;
    /// True when the message was handed to the child gateway that reaches
    /// its device, instead of local subscribers.
    fn forward_down(&self, msg: &Msg) -> bool;
    /// Takes a message for a device or module into the dialect's durable
    /// queue instead of handing it to local subscribers: `None` when it is
    /// not the dialect's, else what resolves once it is stored (the
    /// publisher is acknowledged then). The default is
    /// [`Dialect::forward_down`], stored at once.
    fn take_device_bound(&self, msg: &Msg) -> Option<Stored> {
        if !self.forward_down(msg) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(MessageId {
            instance: 0,
            lane: 0,
            seq: 0,
        }));
        Some(rx)
    }
    /// A client connected or subscribed: what waits for it may go now.
    fn client_ready(&self, client_id: &str) {
        let _ = client_id;
    }
}

/// What the broker works with, from the node that composes it.
pub struct Parts {
    /// Routing and authentication.
    pub policy: Arc<dyn Policy>,
    /// Where upstream-bound messages are appended.
    pub outbox: Arc<Outbox>,
    /// What the broker counts.
    pub metrics: Arc<BrokerMetrics>,
    /// The identities clients authenticate as (revocations, CA-signed certificates).
    pub registry: Arc<holdfast_registry::Registry>,
}

impl Broker {
    /// Opens the broker's storage and restores persistent sessions and
    /// retained messages. The dialect is made by `make_dialect`, with the
    /// broker it reaches clients through, held weakly (the broker holds the
    /// dialect); it is returned with the broker.
    ///
    /// # Errors
    /// Storage errors.
    pub fn open<D: Dialect>(
        config: MqttConfig,
        parts: Parts,
        store: &Store,
        stop: watch::Receiver<bool>,
        make_dialect: impl FnOnce(Weak<Broker>) -> Arc<D>,
    ) -> Result<(Arc<Broker>, Arc<D>), StoreError> {
        let Parts {
            policy,
            outbox,
            metrics,
            registry,
        } = parts;
        let persist = Arc::new(Persist::open(store)?);
        let (loaded, retained, damaged) = persist.load()?;
        if damaged > 0 {
            tracing::warn!(damaged, "skipped damaged broker records");
            metrics.dropped_n("damaged", damaged as u64);
        }
        let subs = Arc::new(Subscriptions::default());
        let sessions = Sessions::new(
            subs.clone(),
            persist.clone(),
            metrics.clone(),
            config.max_queued_messages,
        );
        let retained = Arc::new(Retained::new(
            retained,
            config.max_retained,
            persist.clone(),
            metrics.clone(),
        ));
        let mut made = None;
        let broker = Arc::new_cyclic(|me: &Weak<Broker>| {
            let typed = make_dialect(me.clone());
            let dialect: Arc<dyn Dialect> = typed.clone();
            made = Some(typed);
            let router = Arc::new(Router::new(
                RouterParts {
                    policy: policy.clone(),
                    outbox,
                    dialect: dialect.clone(),
                    sessions: sessions.clone(),
                    subs: subs.clone(),
                    retained: retained.clone(),
                    metrics: metrics.clone(),
                },
                &config,
            ));
            Broker {
                metrics,
                sessions: sessions.clone(),
                subs,
                retained,
                router,
                principals: Arc::new(Principals::new(registry.clone())),
                persist,
                connections: AtomicUsize::new(0),
                max_connections: AtomicU64::new(config.max_connections as u64),
                shutdown_wait_ms: AtomicU64::new(5_000),
                next_conn_id: AtomicU64::new(1),
                stop,
                registry,
                dialect,
                throttle: throttle::Throttle::new(
                    config.auth_backoff_after_failures,
                    Duration::from_millis(config.auth_backoff_initial_ms),
                    Duration::from_millis(config.auth_backoff_max_ms),
                ),
                config,
                policy,
            }
        });
        let restored = sessions.restore(loaded);
        if restored > 0 {
            tracing::info!(sessions = restored, "restored persistent MQTT sessions");
        }
        // `Arc::new_cyclic` calls its function once: the dialect is there.
        let dialect = made.ok_or_else(|| StoreError::Other("the broker's dialect was not made".into()))?;
        Ok((broker, dialect))
    }

    /// The broker's configuration.
    pub fn config(&self) -> &MqttConfig {
        &self.config
    }

    /// PUBLISH packets received from clients and sent to them since start
    /// (`holdfast_mqtt_messages_received_total`, `..._sent_total`).
    pub fn message_counts(&self) -> (u64, u64) {
        self.metrics.message_totals()
    }

    /// Figures for the admin API.
    pub fn stats(&self) -> BrokerStats {
        BrokerStats {
            connections: self.connections.load(Ordering::Relaxed),
            sessions: self.sessions.len(),
            subscriptions: self.subs.len(),
            retained: self.retained.len(),
        }
    }

    /// The limits a running broker can change: `mqtt.max_connections`,
    /// `mqtt.max_queued_messages` and `mqtt.max_retained`. They apply from
    /// the next connection, queued message or retained message; nothing
    /// connected or stored is dropped. Returns the keys that changed.
    pub fn apply_limits(&self, new: &MqttConfig) -> Vec<String> {
        holdfast_model::store_limits(&[
            (
                "mqtt.max_connections",
                &self.max_connections,
                new.max_connections as u64,
            ),
            (
                "mqtt.max_queued_messages",
                &self.sessions.max_queued,
                new.max_queued_messages as u64,
            ),
            ("mqtt.max_retained", &self.retained.max, new.max_retained as u64),
        ])
    }

    /// Sets how long each connection waits, once the node stops, for the
    /// appends it already handed to the outbox before it acknowledges them
    /// and closes (5 s unless set).
    pub fn set_shutdown_wait(&self, wait: Duration) {
        self.shutdown_wait_ms
            .store(wait.as_millis().try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub(crate) fn shutdown_wait(&self) -> Duration {
        Duration::from_millis(self.shutdown_wait_ms.load(Ordering::Relaxed))
    }

    /// A connection opens: its id, and whether it is over `mqtt.max_connections`.
    pub(crate) fn admit(&self) -> (u64, bool) {
        let over =
            self.connections.fetch_add(1, Ordering::AcqRel) as u64 >= self.max_connections.load(Ordering::Relaxed);
        (self.next_conn_id.fetch_add(1, Ordering::Relaxed), over)
    }

    /// A connection admitted with [`Broker::admit`] closed.
    pub(crate) fn release(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }

    /// Connected clients, by client id, at most `limit` of them. Only those
    /// listed have their session locked.
    pub fn clients(&self, limit: usize) -> Vec<ClientInfo> {
        self.sessions.clients(limit)
    }

    /// Syncs session and retained writes now.
    ///
    /// # Errors
    /// Storage errors.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.persist.sync()
    }

    /// Syncs session and retained writes every `mqtt.sync_interval_ms`
    /// until stopped, then once more.
    pub async fn sync_task(self: Arc<Self>) {
        let mut stop = self.stop.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.sync_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            let persist = self.persist.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || persist.sync()).await {
                tracing::error!(error = %e, "syncing MQTT sessions failed");
            }
        }
        if let Err(e) = self.persist.sync() {
            tracing::error!(error = %e, "syncing MQTT sessions failed");
        }
    }

    /// A TLS or QUIC handshake failed before CONNECT.
    pub(crate) fn bad_tls(&self, result: &'static str) {
        self.metrics.connect(result);
    }

    /// Connected clients now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Disconnects every connection authenticated as one of `ids`; returns
    /// how many were told to leave.
    pub fn revoke(&self, ids: &[String]) -> usize {
        self.principals.revoke(ids)
    }

    /// Disconnects connections whose identity is gone or disabled (after
    /// revocations were missed).
    pub fn revoke_stale(&self) -> usize {
        self.principals.revoke_stale()
    }

    /// Runs until `stop`: disconnects clients whose credentials the
    /// registry revokes.
    pub async fn revocation_task(self: Arc<Self>) {
        self.principals.watch_revocations(self.stop.clone()).await;
    }

    /// Routes a received message through the router plugin and acts on
    /// every action. `principal` is the authenticated identity.
    pub fn route(&self, msg: &Arc<Msg>, principal: Option<&str>) -> Routed {
        self.router.route(msg, principal)
    }

    /// Delivers a message to this node's subscribers (and stores it if it is
    /// retained). Used for the router's `local` action; the link reaches it
    /// through [`LocalDelivery`]. Returns the deepest queue of a connected
    /// subscriber after the delivery.
    pub fn deliver(&self, msg: Arc<Msg>) -> usize {
        self.router.deliver(msg)
    }

    /// Delivers `msg` to client `client_id` alone (twin and method
    /// traffic): only if it is connected and subscribed to a matching
    /// filter, at the highest QoS of those subscriptions.
    pub fn deliver_to_client(&self, client_id: &str, msg: Arc<Msg>) -> bool {
        self.router.deliver_to_client(client_id, msg)
    }

    /// Delivers `msg` to client `client_id` alone, as
    /// [`Broker::deliver_to_client`] does, and tells what became of it: the
    /// receiver gets [`Delivery::Delivered`] once the client acknowledged
    /// it (at QoS 0: once it was written to the connection), a refusal or
    /// "too large" when it cannot go, and is closed without a verdict when
    /// the client does not get it (its session ended first). The sender
    /// keeps the message durable: the session does not store it.
    ///
    /// # Errors
    /// The client is not connected and subscribed ([`NotTaken::Offline`]),
    /// or its queue is at `mqtt.max_queued_messages`
    /// ([`NotTaken::QueueFull`]; [`Dialect::client_ready`] is called once
    /// it has room again).
    pub fn deliver_with_receipt(
        &self,
        client_id: &str,
        msg: Arc<Msg>,
    ) -> Result<oneshot::Receiver<Delivery>, NotTaken> {
        self.router.deliver_with_receipt(client_id, msg)
    }
}

/// The link's way to this node's subscribers: a root draining its outbox,
/// the MQTT bridge's `in` mappings.
impl holdfast_model::ports::LocalDelivery for Broker {
    fn deliver(&self, local: holdfast_model::ports::LocalMessage) -> usize {
        let holdfast_model::ports::LocalMessage {
            message: m,
            expires_at_ms,
            publisher,
            reply,
        } = local;
        self.router.deliver(local_msg(m, expires_at_ms, publisher, reply))
    }

    fn deliver_stored(
        &self,
        local: holdfast_model::ports::LocalMessage,
    ) -> holdfast_model::ports::BoxFuture<'static, Result<usize, u8>> {
        let holdfast_model::ports::LocalMessage {
            message: m,
            expires_at_ms,
            publisher,
            reply,
        } = local;
        let (backlog, stored) = self
            .router
            .deliver_stored(local_msg(m, expires_at_ms, publisher, reply));
        Box::pin(async move {
            match stored {
                None => Ok(backlog),
                Some(rx) => match rx.await {
                    Ok(Ok(_)) => Ok(backlog),
                    Ok(Err(e)) => Err(e.mqtt_reason_code()),
                    Err(_) => Err(holdfast_mqtt::reason::UNSPECIFIED),
                },
            }
        })
    }
}

/// The broker's message for what the link delivers here.
fn local_msg(
    m: holdfast_model::Message,
    expires_at_ms: Option<u64>,
    publisher: Option<String>,
    reply: holdfast_model::ports::ReplyProperties,
) -> Arc<Msg> {
    let qos = holdfast_mqtt::QoS::from_u8(m.qos.min(2)).unwrap_or(holdfast_mqtt::QoS::ExactlyOnce);
    Arc::new(Msg {
        topic: m.topic,
        payload: m.payload,
        qos,
        retain: m.retain,
        properties: holdfast_mqtt::Properties {
            payload_format_indicator: reply.payload_format_indicator,
            content_type: m.content_type,
            response_topic: reply.response_topic,
            correlation_data: reply.correlation_data,
            user_properties: m.properties,
            ..holdfast_mqtt::Properties::default()
        },
        expires_at_ms,
        publisher: publisher.map(Arc::from),
    })
}
