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
//!   a QUIC bidirectional stream).
//! - [`session`]: what outlives a connection; [`persist`] keeps persistent
//!   sessions and retained messages in the store.
//! - [`subs`]: the subscription trie.
//! - [`listen`]: the TCP, TLS, QUIC and WebSocket listeners; [`websocket`]
//!   the upgrade and the byte stream, [`handshakes`] the bound on upgrades
//!   in progress.

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

mod principals;
mod routing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use holdfast_mqtt::{QoS, topic};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;
use tokio::sync::watch;

use self::persist::{Persist, SessionRecord};
use self::session::{Inflight, Msg, Outgoing, Session};
use self::subs::{Sub, SubTree};
use crate::config::MqttConfig;
use holdfast_metrics::{self as metrics, ActionLabels, Metrics, QosLabels, ReasonLabels};
use holdfast_model::Message;
use holdfast_model::Source;
use holdfast_model::policy::{Action, Policy, RouteOutcome};
use holdfast_outbox::{AppendError, MessageId, Outbox};
use holdfast_store::{Store, StoreError};

/// Milliseconds since the Unix epoch.
pub use holdfast_model::unix_ms as now_ms;

/// Metric handles taken once, for the hot paths.
pub(crate) struct Counters {
    received: [Counter; 3],
    sent: [Counter; 3],
    routed_upstream: Counter,
    routed_local: Counter,
}

impl Counters {
    fn new(m: &Metrics) -> Counters {
        let q = |f, qos| metrics::handle(f, &QosLabels { qos });
        Counters {
            received: [q(&m.mqtt_received, 0), q(&m.mqtt_received, 1), q(&m.mqtt_received, 2)],
            sent: [q(&m.mqtt_sent, 0), q(&m.mqtt_sent, 1), q(&m.mqtt_sent, 2)],
            routed_upstream: metrics::handle(&m.mqtt_routed, &ActionLabels { action: "upstream" }),
            routed_local: metrics::handle(&m.mqtt_routed, &ActionLabels { action: "local" }),
        }
    }
}

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
}

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

/// The broker.
pub struct Broker {
    config: MqttConfig,
    pub(crate) policy: Arc<dyn Policy>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    counters: Counters,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    subs: RwLock<SubTree>,
    retained: RwLock<HashMap<String, Arc<Msg>>>,
    persist: Persist,
    connections: AtomicUsize,
    /// Limits a config reload changes (`apply_limits`).
    max_connections: AtomicU64,
    max_queued_messages: AtomicU64,
    max_retained: AtomicU64,
    /// How long a connection waits at shutdown for its appends, ms
    /// (`set_shutdown_wait`).
    shutdown_wait_ms: AtomicU64,
    /// Router drop reasons seen (bounded; see `count_router_drop`).
    drop_reasons: Mutex<std::collections::HashSet<String>>,
    next_conn_id: AtomicU64,
    stop: watch::Receiver<bool>,
    /// The identities clients authenticate as.
    pub(crate) registry: Arc<holdfast_registry::Registry>,
    /// Twins, direct methods, property bags.
    pub(crate) dialect: Arc<dyn Dialect>,
    /// Connections by principal id, for revocation.
    principals: Mutex<HashMap<String, HashMap<u64, Arc<tokio::sync::Notify>>>>,
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
/// the `Arc<Broker>` it is given once the broker is open.
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
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// The identities clients authenticate as (revocations, CA-signed certificates).
    pub registry: Arc<holdfast_registry::Registry>,
    /// The topic dialect (IoT Hub).
    pub dialect: Arc<dyn Dialect>,
}

impl Broker {
    /// Opens the broker's storage and restores persistent sessions and
    /// retained messages.
    ///
    /// # Errors
    /// Storage errors.
    pub fn open(
        config: MqttConfig,
        parts: Parts,
        store: &Store,
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<Broker>, StoreError> {
        let Parts {
            policy,
            outbox,
            metrics,
            registry,
            dialect,
        } = parts;
        let persist = Persist::open(store)?;
        let (loaded, retained, damaged) = persist.load()?;
        if damaged > 0 {
            tracing::warn!(damaged, "skipped damaged broker records");
            metrics::handle(&metrics.mqtt_dropped, &ReasonLabels { reason: "damaged" }).inc_by(damaged as u64);
        }
        let counters = Counters::new(&metrics);
        let broker = Arc::new(Broker {
            counters,
            sessions: Mutex::new(HashMap::new()),
            subs: RwLock::new(SubTree::default()),
            retained: RwLock::new(HashMap::new()),
            persist,
            connections: AtomicUsize::new(0),
            max_connections: AtomicU64::new(config.max_connections as u64),
            max_queued_messages: AtomicU64::new(config.max_queued_messages as u64),
            max_retained: AtomicU64::new(config.max_retained as u64),
            drop_reasons: Mutex::default(),
            shutdown_wait_ms: AtomicU64::new(5_000),
            next_conn_id: AtomicU64::new(1),
            stop,
            registry,
            dialect,
            principals: Mutex::new(HashMap::new()),
            throttle: throttle::Throttle::new(
                config.auth_backoff_after_failures,
                Duration::from_millis(config.auth_backoff_initial_ms),
                Duration::from_millis(config.auth_backoff_max_ms),
            ),
            config,
            policy,
            outbox,
            metrics,
        });
        let now = now_ms();
        let mut restored = 0;
        for s in loaded {
            let r = &s.record;
            let since = r.disconnected_at_ms.unwrap_or(now);
            if since.saturating_add(u64::from(r.expiry_s) * 1000) <= now {
                if let Err(e) = broker.persist.delete_session(&s.client_id) {
                    tracing::warn!(error = %e, "cannot delete an expired session");
                }
                continue;
            }
            let id: Arc<str> = s.client_id.as_str().into();
            let session = Arc::new(Session::new(id.clone(), r.expiry_s, r.version()));
            {
                let mut st = session.lock();
                st.disconnected_at_ms = Some(since);
                for (filter, sub) in r.sub_records() {
                    broker.index_sub(&session, &filter, sub.options, sub.id);
                    st.subs.insert(filter, sub);
                }
                for (out, released) in s.queue {
                    st.next_seq = st.next_seq.max(out.seq + 1);
                    match released {
                        // The client has it; PUBREL goes again on reconnect.
                        Some(pkid) => st.inflight.push_back(Inflight {
                            pkid,
                            out,
                            released: true,
                        }),
                        None => st.queue.push_back(out),
                    }
                }
            }
            let remaining = (since + u64::from(r.expiry_s) * 1000).saturating_sub(now);
            broker.schedule_expiry(&session, Duration::from_millis(remaining));
            broker.sessions_lock().insert(id, session);
            restored += 1;
        }
        {
            let mut map = broker.retained.write().unwrap_or_else(|p| p.into_inner());
            for m in retained {
                map.insert(m.topic.clone(), Arc::new(m));
            }
            broker.metrics.mqtt_retained.set(map.len() as i64);
        }
        broker.metrics.mqtt_sessions.set(restored as i64);
        if restored > 0 {
            tracing::info!(sessions = restored, "restored persistent MQTT sessions");
        }
        Ok(broker)
    }

    /// The broker's configuration.
    pub fn config(&self) -> &MqttConfig {
        &self.config
    }

    /// Figures for the admin API.
    pub fn stats(&self) -> BrokerStats {
        BrokerStats {
            connections: self.connections.load(Ordering::Relaxed),
            sessions: self.sessions_lock().len(),
            subscriptions: self.subs.read().unwrap_or_else(|p| p.into_inner()).len(),
            retained: self.retained.read().unwrap_or_else(|p| p.into_inner()).len(),
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
                &self.max_queued_messages,
                new.max_queued_messages as u64,
            ),
            ("mqtt.max_retained", &self.max_retained, new.max_retained as u64),
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

    /// Most concurrent connections now.
    pub(crate) fn max_connections(&self) -> u64 {
        self.max_connections.load(Ordering::Relaxed)
    }

    /// Connected clients, by client id, at most `limit` of them. Only those
    /// listed have their session locked.
    pub fn clients(&self, limit: usize) -> Vec<ClientInfo> {
        let mut connected: Vec<Arc<Session>> = self
            .sessions_lock()
            .values()
            .filter(|s| s.is_connected())
            .cloned()
            .collect();
        if connected.len() > limit {
            connected.select_nth_unstable_by(limit, |a, b| a.client_id.cmp(&b.client_id));
            connected.truncate(limit);
        }
        connected.sort_unstable_by(|a, b| a.client_id.cmp(&b.client_id));
        connected
            .iter()
            .map(|s| {
                let st = s.lock();
                ClientInfo {
                    client_id: s.client_id.to_string(),
                    protocol: match st.version {
                        holdfast_mqtt::Version::V31 => "3.1",
                        holdfast_mqtt::Version::V311 => "3.1.1",
                        holdfast_mqtt::Version::V5 => "5",
                    },
                    subscriptions: st.subs.len(),
                    queued: st.queue.len(),
                    in_flight: st.inflight.len(),
                    persistent: st.expiry_s > 0,
                }
            })
            .collect()
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
            let b = self.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || b.persist.sync()).await {
                tracing::error!(error = %e, "syncing MQTT sessions failed");
            }
        }
        if let Err(e) = self.persist.sync() {
            tracing::error!(error = %e, "syncing MQTT sessions failed");
        }
    }

    fn sessions_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        holdfast_model::lock(&self.sessions)
    }

    pub(crate) fn drop_reason(&self, reason: &'static str) {
        metrics::handle(&self.metrics.mqtt_dropped, &ReasonLabels { reason }).inc();
    }

    /// Counts a router drop by the plugin's reason. Reasons are plugin
    /// data: cut to 64 characters of `[a-z0-9_.-]` (others become `_`), and
    /// after 64 distinct ones, counted as `other`.
    fn count_router_drop(&self, reason: &str) {
        let mut clean: String = reason
            .chars()
            .take(64)
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if clean.is_empty() {
            clean.push_str("unspecified");
        }
        {
            let mut seen = holdfast_model::lock(&self.drop_reasons);
            if !seen.contains(&clean) {
                if seen.len() >= 64 {
                    clean = "other".to_string();
                } else {
                    seen.insert(clean.clone());
                }
            }
        }
        self.metrics
            .router_drops
            .get_or_create(&holdfast_metrics::RouterDropLabels { reason: clean })
            .inc();
    }

    pub(crate) fn bad_tls(&self, result: &'static str) {
        metrics::handle(&self.metrics.mqtt_connects, &holdfast_metrics::ResultLabels { result }).inc();
    }

    /// Connected clients now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    pub(crate) fn deny_reason(&self, reason: &'static str) {
        metrics::handle(&self.metrics.mqtt_denied, &ReasonLabels { reason }).inc();
    }

    /// Adds a subscription to the index.
    pub(crate) fn index_sub(
        &self,
        session: &Arc<Session>,
        filter: &str,
        options: holdfast_mqtt::SubOptions,
        id: Option<u32>,
    ) {
        let (group, inner) = split_shared(filter);
        let sub = Sub {
            session: session.clone(),
            options,
            id,
        };
        self.subs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(&session.client_id, group, inner, sub);
    }

    /// Removes a subscription from the index; true if it existed.
    pub(crate) fn unindex_sub(&self, client: &str, filter: &str) -> bool {
        let (group, inner) = split_shared(filter);
        self.subs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(client, group, inner)
    }

    pub(crate) fn save_session(&self, session: &Session) {
        let record = {
            let st = session.lock();
            if !st.persistent() {
                return;
            }
            SessionRecord::of(&st)
        };
        if let Err(e) = self.persist.save_session(&session.client_id, &record) {
            tracing::error!(error = %e, client = %session.client_id, "cannot store a session");
        }
    }

    pub(crate) fn del_queued(&self, session: &Session, seq: u64) {
        if seq != 0
            && let Err(e) = self.persist.del_queued(&session.client_id, seq)
        {
            tracing::error!(error = %e, client = %session.client_id, "cannot remove a delivered message");
        }
    }

    pub(crate) fn put_released(&self, session: &Session, out: &Outgoing, pkid: u16) {
        if out.seq != 0
            && let Err(e) = self.persist.put_queued(&session.client_id, out, Some(pkid))
        {
            tracing::error!(error = %e, client = %session.client_id, "cannot store a released message");
        }
    }

    /// Ends a session: its subscriptions and stored state go.
    fn end_session(&self, session: &Arc<Session>) {
        {
            let mut map = self.sessions_lock();
            if map.get(&session.client_id).is_some_and(|s| Arc::ptr_eq(s, session)) {
                map.remove(&session.client_id);
            }
            self.metrics.mqtt_sessions.set(map.len() as i64);
        }
        let (filters, persistent) = {
            let mut st = session.lock();
            let filters: Vec<String> = st.subs.drain().map(|(f, _)| f).collect();
            st.queue.clear();
            st.inflight.clear();
            (filters, st.persistent())
        };
        for f in filters {
            self.unindex_sub(&session.client_id, &f);
        }
        if persistent && let Err(e) = self.persist.delete_session(&session.client_id) {
            tracing::error!(error = %e, client = %session.client_id, "cannot delete a session");
        }
    }

    /// Ends `session` after `delay` unless a connection attaches first.
    fn schedule_expiry(self: &Arc<Self>, session: &Arc<Session>, delay: Duration) {
        let generation = session.generation.load(Ordering::Acquire);
        let broker = Arc::downgrade(self);
        let session = Arc::downgrade(session);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let (Some(broker), Some(session)) = (broker.upgrade(), session.upgrade()) else {
                return;
            };
            if session.generation.load(Ordering::Acquire) == generation && !session.is_connected() {
                tracing::debug!(client = %session.client_id, "session expired");
                broker.end_session(&session);
            }
        });
    }

    fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Splits `$share/group/filter` into the group and the filter.
fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match topic::parse_shared(filter) {
        Some(Ok((g, f))) => (Some(g), f),
        _ => (None, filter),
    }
}

/// The message the router plugin sees.
fn plugin_message(msg: &Msg, principal: Option<&str>) -> Message {
    Message {
        topic: msg.topic.clone(),
        payload: msg.payload.clone(),
        qos: msg.qos as u8,
        retain: msg.retain,
        content_type: msg.properties.content_type.clone(),
        properties: msg.properties.user_properties.clone(),
        source: Source {
            client_id: msg.publisher.as_deref().unwrap_or("").to_string(),
            principal: principal.map(str::to_string),
            path: Vec::new(),
        },
        origin: None,
        delivered_locally: false,
    }
}
