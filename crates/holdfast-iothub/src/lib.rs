//! # holdfast-iothub
//!
//! The IoT Hub device dialect on this node: property bags, twins, direct
//! methods and cloud-to-device messages.
//!
//! The broker hands every PUBLISH on `$iothub/…` and `$holdfast/methods/…`
//! to [`Hub::device_request`] instead of routing it, and every message on a
//! telemetry topic through [`annotate`] (its property bag becomes user
//! properties the router can match). Answers go to the requesting client
//! only, on the topics IoT Hub uses:
//!
//! | the device publishes | it gets |
//! |---|---|
//! | `$iothub/twin/GET/?$rid={rid}` | `$iothub/twin/res/200/?$rid={rid}` with `{"desired", "reported"}` |
//! | `$iothub/twin/PATCH/properties/reported/?$rid={rid}` | `$iothub/twin/res/204/?$rid={rid}&$version={v}` |
//! | (desired changes) | `$iothub/twin/PATCH/properties/desired/?$version={v}` with the patch |
//! | (a method call) | `$iothub/methods/POST/{name}/?$rid={rid}` |
//! | `$iothub/methods/res/{status}/?$rid={rid}` | (the caller gets the answer) |
//! | `$holdfast/methods/POST/{device}[/{module}]/{name}/?$rid={rid}` | `$holdfast/methods/res/{status}/?$rid={rid}` |
//!
//! Across the link, [`crate::link::service`] carries desired properties
//! down, reported patches up, method calls down and their answers up, and
//! cloud-to-device messages down.

pub mod c2d;
pub mod config;
pub mod service;
pub mod twin;

use holdfast_model::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use holdfast_mqtt::{Properties, QoS};
use holdfast_sdk::iothub::{self, Topic, system};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use self::c2d::{C2d, C2dMessage, Feedback, Outcome};
use self::twin::{DesiredChange, Twins};
use crate::service::Svc;
use holdfast_broker::session::Delivery;
use holdfast_broker::session::Msg;
use holdfast_broker::{Broker, NotTaken};
use holdfast_metrics::{EventLabels, Metrics};
use holdfast_registry::{Hop, Registry};

/// Longest a method call may wait for its answer.
pub const MAX_METHOD_TIMEOUT: Duration = Duration::from_secs(300);
/// What a method call waits for when the caller does not say.
pub const DEFAULT_METHOD_TIMEOUT: Duration = Duration::from_secs(30);
/// Calls that may wait for answers at once on a node.
pub const MAX_WAITING_CALLS: usize = 4096;

/// Parses the property bag of a telemetry or output message into user
/// properties; the content type also becomes the MQTT 5 content type, and
/// `$.cdid`/`$.cmid` name the sender.
///
/// # Errors
/// A malformed bag.
pub fn annotate(msg: &mut Msg) -> Result<(), iothub::BagError> {
    let Some(t) = iothub::parse(&msg.topic).filter(Topic::is_outbound) else {
        return Ok(());
    };
    let mut pairs = iothub::parse_bag(t.bag())?;
    if let Topic::Output { output, .. } = t
        && !pairs.iter().any(|(k, _)| k == system::OUTPUT)
    {
        pairs.push((system::OUTPUT.into(), output.to_string()));
    }
    pairs.push((system::CONNECTION_DEVICE.into(), t.device().to_string()));
    if let Some(m) = t.module() {
        pairs.push((system::CONNECTION_MODULE.into(), m.to_string()));
    }
    let props = &mut msg.properties;
    if props.content_type.is_none()
        && let Some((_, ct)) = pairs.iter().find(|(k, _)| k == system::CONTENT_TYPE)
    {
        props.content_type = Some(ct.clone());
    }
    props.user_properties.extend(pairs);
    Ok(())
}

/// True for a topic the hub answers instead of routing (`$iothub/…`,
/// `$holdfast/methods/…`).
pub fn is_request(topic: &str) -> bool {
    topic.starts_with("$iothub/") || topic.starts_with("$holdfast/methods/")
}

/// True for a cloud-to-device or module-input topic.
pub fn is_inbound(topic: &str) -> bool {
    iothub::parse(topic).is_some_and(|t| !t.is_outbound())
}

/// The topic a message is delivered on when the router sends it to a
/// module input or a device's cloud-to-device topic without a property
/// bag: the bag is added from the message's properties, so IoT Hub SDK
/// clients see them.
pub fn with_bag(topic: String, props: &Properties) -> String {
    let bare = match iothub::parse(&topic) {
        Some(t @ (Topic::Input { .. } | Topic::DeviceBound { .. })) => t.bag().is_empty(),
        _ => false,
    };
    if !bare {
        return topic;
    }
    let mut pairs = props.user_properties.clone();
    if let Some(ct) = &props.content_type
        && !pairs.iter().any(|(k, _)| k == system::CONTENT_TYPE)
    {
        pairs.push((system::CONTENT_TYPE.into(), ct.clone()));
    }
    let mut out = topic;
    if !out.ends_with('/') {
        out.push('/');
    }
    out.push_str(&iothub::encode_bag(&pairs));
    out
}

/// Why a cloud-to-device message was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum C2dError {
    /// No such device in this node's scope.
    #[error("no device {0} in this node's scope")]
    NotFound(String),
    /// The device's queue is full.
    #[error("{0}")]
    Full(String),
    /// This node keeps no queues.
    #[error("cloud-to-device queues are not available on this node")]
    Unavailable,
    /// Storage failed.
    #[error("cannot store the message: {0}")]
    Store(String),
}

fn c2d_now_ms() -> u64 {
    holdfast_model::unix_ms()
}

/// A method's answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MethodResult {
    /// The status the device answered with.
    pub status: i32,
    /// The JSON payload it answered with.
    pub payload: Value,
}

/// Why a method call got no answer from the device.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MethodError {
    /// Not registered here.
    #[error("no identity {0} in this node's scope")]
    NotFound(String),
    /// Registered, not connected (or not subscribed to methods).
    #[error("{0} is not online (not connected, or not subscribed to $iothub/methods/POST/#)")]
    NotOnline(String),
    /// The child gateway the device is behind is not connected.
    #[error("gateway offline: {target} is behind {gateway}, which is not connected")]
    GatewayOffline {
        /// The device or module called.
        target: String,
        /// Its gateway.
        gateway: String,
    },
    /// No answer in time.
    #[error("{target} did not answer {name} within {ms} ms")]
    Timeout {
        /// Target.
        target: String,
        /// Method.
        name: String,
        /// The timeout.
        ms: u64,
    },
    /// Bad request.
    #[error("{0}")]
    Invalid(String),
    /// Too many calls are waiting for answers on this node.
    #[error("too many method calls are waiting ({0}); try again later")]
    Busy(usize),
    /// A child gateway could not call the device: its status and reason.
    #[error("{1}")]
    Downstream(u16, String),
}

impl MethodError {
    /// The status IoT Hub would answer with.
    pub fn status(&self) -> u16 {
        match self {
            MethodError::NotFound(_) | MethodError::NotOnline(_) | MethodError::GatewayOffline { .. } => 404,
            MethodError::Timeout { .. } => 504,
            MethodError::Invalid(_) => 400,
            MethodError::Busy(_) => 429,
            MethodError::Downstream(status, _) => *status,
        }
    }

    /// The answer a local caller gets on `$holdfast/methods/res/{status}/`.
    pub fn as_result(&self) -> MethodResult {
        MethodResult {
            status: i32::from(self.status()),
            payload: serde_json::json!({ "error": self.to_string() }),
        }
    }
}

/// Who may answer a call.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answerer {
    /// The identity called, connected here (it answers on `$iothub/methods/res`).
    Device(String),
    /// The child gateway it is behind (it answers on the link).
    Child(String),
}

/// A call waiting for its answer.
struct Waiting {
    answerer: Answerer,
    tx: oneshot::Sender<Result<MethodResult, MethodError>>,
}

/// The dialect's state on this node.
pub struct Hub {
    /// Twins.
    pub twins: Arc<Twins>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    broker: OnceLock<Weak<Broker>>,
    /// This hub, for the tasks a request spawns.
    me: Weak<Hub>,
    next_call: AtomicU64,
    /// Calls waiting for an answer, by call id (a device's `$rid` is it in hex).
    calls: Mutex<HashMap<u64, Waiting>>,
    /// Connected child gateways' service streams.
    downlinks: Mutex<HashMap<String, Downlink>>,
    /// Durable cloud-to-device queues, once attached.
    c2d: OnceLock<Arc<C2d>>,
    /// `iothub.c2d_default_ttl_seconds`, ms.
    c2d_ttl_ms: AtomicU64,
    /// Ids of messages handed to their device's session here, waiting for
    /// what became of them.
    c2d_handed: Mutex<std::collections::HashSet<String>>,
    /// Held while messages are handed to a device's session.
    c2d_flushing: Mutex<()>,
    /// The parent's service stream, on a link/2 link.
    uplink: Mutex<Option<mpsc::UnboundedSender<Svc>>>,
}

/// A connected child gateway's service stream.
#[derive(Clone)]
struct Downlink {
    tx: mpsc::UnboundedSender<Svc>,
    /// It speaks link/2: durable cloud-to-device with acks and feedback.
    v2: bool,
    /// Messages sent down on this connection and not yet acknowledged.
    sent: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("twins", &self.twins)
            .finish_non_exhaustive()
    }
}

/// Splits `…/?$rid=…` into the path and its query pairs.
fn path_and_query(topic: &str) -> (&str, Vec<(String, String)>) {
    let path = topic.split_once('?').map_or(topic, |(p, _)| p);
    (path.trim_end_matches('/'), iothub::query(topic))
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

impl Hub {
    /// A hub over `twins`.
    pub fn new(twins: Arc<Twins>, registry: Arc<Registry>, metrics: Arc<Metrics>) -> Arc<Hub> {
        Arc::new_cyclic(|me| Hub {
            twins,
            registry,
            metrics,
            broker: OnceLock::new(),
            me: me.clone(),
            next_call: AtomicU64::new(1),
            calls: Mutex::new(HashMap::new()),
            downlinks: Mutex::new(HashMap::new()),
            c2d: OnceLock::new(),
            c2d_ttl_ms: AtomicU64::new(3_600_000),
            c2d_handed: Mutex::default(),
            c2d_flushing: Mutex::default(),
            uplink: Mutex::new(None),
        })
    }

    /// Connects the hub to the broker it answers through.
    pub fn attach(&self, broker: &Arc<Broker>) {
        let _ = self.broker.set(Arc::downgrade(broker));
    }

    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    fn count(&self, what: &'static str) {
        holdfast_metrics::handle(&self.metrics.iothub_events, &EventLabels { event: what }).inc();
    }

    /// Sends `payload` on `topic` to client `client_id` only, if it is
    /// connected and subscribed to a matching filter.
    fn send_to(&self, client_id: &str, topic: String, payload: Vec<u8>) -> bool {
        let Some(broker) = self.broker() else {
            return false;
        };
        let msg = Msg {
            topic,
            payload: Bytes::from(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
            expires_at_ms: None,
            publisher: None,
        };
        broker.deliver_to_client(client_id, Arc::new(msg))
    }

    /// Handles a PUBLISH on `$iothub/…` or `$holdfast/methods/…` from
    /// `client_id`, authenticated as `principal`. Answers go to that client.
    pub fn device_request(self: &Arc<Self>, client_id: &str, principal: Option<&str>, topic: &str, payload: &[u8]) {
        let (path, query) = path_and_query(topic);
        let rid = param(&query, "$rid").unwrap_or("").to_string();
        let levels: Vec<&str> = path.split('/').collect();
        // A twin is the caller's own: the identity it authenticated as.
        let own = principal.filter(|p| *p != "anonymous");
        match levels.as_slice() {
            ["$iothub", "twin", "GET"] => {
                self.count("twin-get");
                let (status, body) = match own {
                    Some(id) => (200, self.twins.get(id).device_view().to_string()),
                    None => (401, r#"{"error":"anonymous clients have no twin"}"#.to_string()),
                };
                self.send_to(
                    client_id,
                    format!("$iothub/twin/res/{status}/?$rid={rid}"),
                    body.into_bytes(),
                );
            }
            ["$iothub", "twin", "PATCH", "properties", "reported"] => {
                self.count("twin-patch-reported");
                let parsed = serde_json::from_slice::<Value>(payload);
                let (hub, client, own) = (self.clone(), client_id.to_string(), own.map(str::to_string));
                // The patch is fsynced before it is answered. On the multi-thread
                // runtime the connection waits for it (its other work moves to
                // another thread), so its next request sees the patch; otherwise
                // it goes to a blocking thread.
                let work = move || {
                    let result = match (own, parsed) {
                        (None, _) => Err((401, "anonymous clients have no twin".to_string())),
                        (_, Err(e)) => Err((400, format!("the patch is not JSON: {e}"))),
                        (Some(id), Ok(patch)) => hub
                            .twins
                            .patch_reported(&id, &patch)
                            .map_err(|e| (e.status(), e.to_string())),
                    };
                    let (topic, body) = match result {
                        Ok(version) => (
                            format!("$iothub/twin/res/204/?$rid={rid}&$version={version}"),
                            Vec::new(),
                        ),
                        Err((status, why)) => {
                            hub.count("twin-refused");
                            tracing::debug!(client = %client, %why, "twin: reported patch refused");
                            let body = serde_json::json!({ "error": why }).to_string();
                            (format!("$iothub/twin/res/{status}/?$rid={rid}"), body.into_bytes())
                        }
                    };
                    hub.send_to(&client, topic, body);
                };
                let multi = tokio::runtime::Handle::try_current()
                    .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
                if multi {
                    tokio::task::block_in_place(work);
                } else {
                    tokio::task::spawn_blocking(work);
                }
            }
            ["$iothub", "methods", "res", status] => {
                self.count("method-response");
                let status = status.parse::<i32>().unwrap_or(500);
                let payload = serde_json::from_slice(payload)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
                match (own, u64::from_str_radix(&rid, 16)) {
                    (Some(own), Ok(call)) => self.answered(
                        &Answerer::Device(own.to_string()),
                        call,
                        Ok(MethodResult { status, payload }),
                    ),
                    _ => self.count("method-response-late"),
                }
            }
            ["$holdfast", "methods", "POST", target @ .., name] if (1..=2).contains(&target.len()) => {
                self.count("method-invoke-local");
                let target = target.join("/");
                let name = name.to_string();
                let timeout = param(&query, "$timeout")
                    .and_then(|s| s.parse::<u64>().ok())
                    .map_or(DEFAULT_METHOD_TIMEOUT, Duration::from_secs);
                let payload = serde_json::from_slice::<Value>(payload);
                let (hub, client) = (self.clone(), client_id.to_string());
                tokio::spawn(async move {
                    let result = match payload {
                        Ok(p) => hub.invoke(&target, &name, p, timeout).await,
                        Err(e) => Err(MethodError::Invalid(format!("the payload is not JSON: {e}"))),
                    };
                    let r = result.unwrap_or_else(|e| e.as_result());
                    hub.send_to(
                        &client,
                        format!("$holdfast/methods/res/{}/?$rid={rid}", r.status),
                        r.payload.to_string().into_bytes(),
                    );
                });
            }
            _ => {
                self.count("unknown");
                tracing::debug!(client = client_id, topic, "dialect: unknown $iothub topic ignored");
            }
        }
    }

    /// Calls method `name` on `target` (a device or `device/module`) with
    /// a JSON payload: on a client connected here, or through the child
    /// gateway it is behind.
    ///
    /// # Errors
    /// Unknown, not online, or no answer in time.
    pub async fn invoke(
        self: &Arc<Self>,
        target: &str,
        name: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<MethodResult, MethodError> {
        if name.is_empty() || name.contains(['/', '+', '#', '?']) {
            return Err(MethodError::Invalid(format!("bad method name {name:?}")));
        }
        if timeout > MAX_METHOD_TIMEOUT {
            return Err(MethodError::Invalid(format!(
                "the timeout may be at most {} s",
                MAX_METHOD_TIMEOUT.as_secs()
            )));
        }
        let waiting = lock(&self.calls).len();
        if waiting >= MAX_WAITING_CALLS {
            self.count("method-busy");
            return Err(MethodError::Busy(waiting));
        }
        let answerer = match self.registry.next_hop(target) {
            Hop::Unknown => return Err(MethodError::NotFound(target.to_string())),
            Hop::Here => Answerer::Device(target.to_string()),
            Hop::Child(gw) => Answerer::Child(gw),
        };
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.calls).insert(
            id,
            Waiting {
                answerer: answerer.clone(),
                tx,
            },
        );
        let sent = match &answerer {
            Answerer::Device(device) => {
                let topic = format!("$iothub/methods/POST/{name}/?$rid={id:x}");
                if self.send_to(device, topic, payload.to_string().into_bytes()) {
                    Ok(())
                } else {
                    Err(MethodError::NotOnline(target.to_string()))
                }
            }
            Answerer::Child(gw) => {
                let call = Svc::Method {
                    call: id,
                    target: target.to_string(),
                    name: name.to_string(),
                    payload,
                    timeout_ms: timeout.as_millis() as u64,
                };
                match lock(&self.downlinks).get(gw).map(|down| down.tx.send(call)) {
                    Some(Ok(())) => Ok(()),
                    _ => {
                        self.count("method-gateway-offline");
                        Err(MethodError::GatewayOffline {
                            target: target.to_string(),
                            gateway: gw.clone(),
                        })
                    }
                }
            }
        };
        let answer = match sent {
            Ok(()) => tokio::time::timeout(timeout, rx).await,
            Err(e) => {
                lock(&self.calls).remove(&id);
                return Err(e);
            }
        };
        lock(&self.calls).remove(&id);
        match answer {
            Ok(Ok(r)) => r,
            _ => Err(MethodError::Timeout {
                target: target.to_string(),
                name: name.to_string(),
                ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// Child gateway `child` answered call `call`.
    pub fn method_answered(&self, child: &str, call: u64, result: Result<MethodResult, MethodError>) {
        self.answered(&Answerer::Child(child.to_string()), call, result);
    }

    /// `by` answered call `call`: passed to the caller if `by` is who was
    /// asked, else ignored and counted.
    fn answered(&self, by: &Answerer, call: u64, result: Result<MethodResult, MethodError>) {
        let mut calls = lock(&self.calls);
        match calls.remove(&call) {
            Some(w) if w.answerer == *by => {
                let _ = w.tx.send(result);
            }
            Some(w) => {
                calls.insert(call, w);
                self.count("method-response-foreign");
            }
            None => self.count("method-response-late"),
        }
    }

    /// Registers a child gateway's service stream (`v2`: it speaks
    /// link/2), then sends it the cloud-to-device messages waiting for it.
    pub fn add_downlink(&self, child: &str, tx: mpsc::UnboundedSender<Svc>, v2: bool) {
        let down = Downlink {
            tx,
            v2,
            sent: Arc::default(),
        };
        lock(&self.downlinks).insert(child.to_string(), down);
        self.c2d_flush_child(child);
    }

    /// Forgets a child gateway's service stream, if it is still `tx`.
    pub fn remove_downlink(&self, child: &str, tx: &mpsc::UnboundedSender<Svc>) {
        let mut map = lock(&self.downlinks);
        if map.get(child).is_some_and(|d| d.tx.same_channel(tx)) {
            map.remove(child);
        }
    }

    /// Sends a cloud-to-device or module-input message down to the child
    /// gateway its device is behind. True if it is for a child (it is then
    /// not for this node's subscribers). A device-bound message is queued
    /// durably here until the child has it ([`c2d`]).
    pub fn forward_down(&self, msg: &Msg) -> bool {
        let Some(t) = iothub::parse(&msg.topic).filter(|t| !t.is_outbound()) else {
            return false;
        };
        let Hop::Child(gw) = self.registry.next_hop(t.device()) else {
            return false;
        };
        if matches!(t, Topic::DeviceBound { .. }) && self.c2d.get().is_some() {
            let m = self.c2d_message(t.device(), msg, None);
            let topic = msg.topic.clone();
            let send = move |hub: &Hub| {
                if let Err(e) = hub.c2d_send(m) {
                    tracing::info!(topic = %topic, error = %e, "dialect: a cloud-to-device message was not queued");
                }
            };
            // Queuing syncs the store: not on the routing task.
            match (tokio::runtime::Handle::try_current(), self.me.upgrade()) {
                (Ok(rt), Some(hub)) => {
                    rt.spawn_blocking(move || send(&hub));
                }
                _ => send(self),
            }
            return true;
        }
        let down = lock(&self.downlinks).get(&gw).map(|d| d.tx.clone());
        let Some(down) = down else {
            self.count("c2d-child-offline");
            tracing::debug!(topic = %msg.topic, gateway = %gw, "dialect: a device's gateway is not connected; message dropped");
            return true;
        };
        use base64::Engine as _;
        let sent = down.send(Svc::Message {
            topic: msg.topic.clone(),
            payload: base64::engine::general_purpose::STANDARD.encode(&msg.payload),
            content_type: msg.properties.content_type.clone(),
            properties: msg.properties.user_properties.clone(),
        });
        self.count(if sent.is_ok() {
            "c2d-forwarded"
        } else {
            "c2d-child-offline"
        });
        true
    }

    /// Attaches the durable cloud-to-device queues; `default_ttl` is for
    /// messages that name none.
    pub fn attach_c2d(&self, c2d: Arc<C2d>, default_ttl: Duration) {
        self.c2d_ttl_ms.store(default_ttl.as_millis() as u64, Ordering::Relaxed);
        let _ = self.c2d.set(c2d);
    }

    /// The durable cloud-to-device queues.
    pub fn c2d(&self) -> Option<&Arc<C2d>> {
        self.c2d.get()
    }

    /// A cloud-to-device message made here from a broker message for
    /// `device`, with `ttl` (or the default).
    pub fn c2d_message(&self, device: &str, msg: &Msg, ttl: Option<Duration>) -> C2dMessage {
        use base64::Engine as _;
        let now = c2d_now_ms();
        let ttl = ttl.map_or(self.c2d_ttl_ms.load(Ordering::Relaxed), |t| t.as_millis() as u64);
        let node = self.c2d.get().map_or("", |c| c.node()).to_string();
        C2dMessage {
            id: format!(
                "{:016x}{:08x}",
                holdfast_model::random_u64(),
                self.next_call.fetch_add(1, Ordering::Relaxed) as u32
            ),
            device: device.to_string(),
            topic: msg.topic.clone(),
            payload: base64::engine::general_purpose::STANDARD.encode(&msg.payload),
            content_type: msg.properties.content_type.clone(),
            properties: msg.properties.user_properties.clone(),
            enqueued_ms: now,
            expires_ms: now.saturating_add(ttl),
            owner: node,
        }
    }

    /// Sends a cloud-to-device message: queued durably here, then handed on
    /// as far as it can go now. Returns whether it was delivered at once
    /// (its feedback says `delivered`): a device connected here has it only
    /// once it acknowledges it, so this is mostly false (`queued`).
    ///
    /// # Errors
    /// Unknown device, its queue full, no queues, or storage failed.
    pub fn c2d_send(&self, m: C2dMessage) -> Result<bool, C2dError> {
        let Some(q) = self.c2d.get() else {
            return Err(C2dError::Unavailable);
        };
        if self.registry.next_hop(&m.device) == Hop::Unknown {
            return Err(C2dError::NotFound(m.device));
        }
        let (device, id) = (m.device.clone(), m.id.clone());
        match q.enqueue(m.clone()) {
            Ok(()) => {
                self.count("c2d-queued");
            }
            Err(e @ c2d::QueueError::Full { .. }) => {
                self.c2d_outcome(&m, Outcome::Rejected, Some(e.to_string()));
                return Err(C2dError::Full(e.to_string()));
            }
            Err(c2d::QueueError::Store(e)) => return Err(C2dError::Store(e.to_string())),
        }
        self.c2d_flush(&device);
        // Delivered at once only when its feedback says so (an older child
        // gateway was handed it); a message off the queue may also have
        // been rejected, or be on its way to its feedback record.
        if q.queued(&device).iter().any(|x| x.id == id) {
            return Ok(false);
        }
        let recorded = q.recorded(64).map_err(|e| C2dError::Store(e.to_string()))?;
        Ok(recorded.iter().any(|f| f.id == id && f.outcome == Outcome::Delivered))
    }

    /// Records what became of a message (here, or for its owner up the tree).
    fn c2d_outcome(&self, m: &C2dMessage, outcome: Outcome, reason: Option<String>) {
        let Some(q) = self.c2d.get() else { return };
        self.count(match outcome {
            Outcome::Delivered => "c2d-delivered",
            Outcome::Expired => "c2d-expired",
            Outcome::Rejected => "c2d-rejected",
        });
        let f = Feedback {
            id: m.id.clone(),
            device: m.device.clone(),
            outcome,
            at_ms: c2d_now_ms(),
            node: q.node().to_string(),
            reason,
            owner: m.owner.clone(),
        };
        match q.feedback(f) {
            Ok(Some(up)) => {
                if let Some(tx) = lock(&self.uplink).as_ref() {
                    let _ = tx.send(Svc::C2dFeedback { feedback: Box::new(up) });
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "c2d: cannot store a feedback record"),
        }
    }

    /// Hands `device`'s queued messages on, in order, as far as they go now.
    pub fn c2d_flush(&self, device: &str) {
        let Some(q) = self.c2d.get() else { return };
        let queued = q.queued(device);
        if queued.is_empty() {
            return;
        }
        match self.registry.next_hop(device) {
            Hop::Unknown => {
                for m in queued {
                    if let Ok(Some(m)) = q.remove(device, &m.id) {
                        self.c2d_outcome(
                            &m,
                            Outcome::Rejected,
                            Some("no such device in this node's scope".into()),
                        );
                    }
                }
            }
            Hop::Here => {
                use base64::Engine as _;
                let (Some(broker), Some(hub), Ok(rt)) =
                    (self.broker(), self.me.upgrade(), tokio::runtime::Handle::try_current())
                else {
                    return;
                };
                // One hand-over at a time, so two flushes keep the order;
                // the queue as it is now (a message settled meanwhile is
                // off it, see `c2d_settled`).
                let _order = lock(&self.c2d_flushing);
                for m in q.queued(device) {
                    // Already with the device's session, waiting for its PUBACK.
                    if !lock(&self.c2d_handed).insert(m.id.clone()) {
                        continue;
                    }
                    let payload = base64::engine::general_purpose::STANDARD
                        .decode(&m.payload)
                        .unwrap_or_default();
                    let msg = Msg {
                        topic: m.topic.clone(),
                        payload: Bytes::from(payload),
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        properties: Properties {
                            content_type: m.content_type.clone(),
                            user_properties: m.properties.clone(),
                            ..Properties::default()
                        },
                        expires_at_ms: None,
                        publisher: None,
                    };
                    match broker.deliver_with_receipt(device, Arc::new(msg)) {
                        Ok(receipt) => {
                            let hub = hub.clone();
                            rt.spawn(async move {
                                let verdict = receipt.await.ok();
                                // Dequeuing syncs the store.
                                let _ = tokio::task::spawn_blocking(move || hub.c2d_settled(&m, verdict)).await;
                            });
                        }
                        // In order: the first that cannot go holds the rest.
                        // A full session queue calls `client_ready` again
                        // once the device has taken messages off it.
                        Err(why) => {
                            lock(&self.c2d_handed).remove(&m.id);
                            if why == NotTaken::QueueFull {
                                self.count("c2d-device-busy");
                            }
                            return;
                        }
                    }
                }
            }
            Hop::Child(gw) => {
                let down = lock(&self.downlinks).get(&gw).cloned();
                let Some(down) = down else { return };
                for m in queued {
                    if down.v2 {
                        if !lock(&down.sent).insert(m.id.clone()) {
                            continue;
                        }
                        if down.tx.send(Svc::C2d { message: Box::new(m) }).is_err() {
                            return;
                        }
                        self.count("c2d-forwarded");
                    } else {
                        // An older child: handed over without a receipt.
                        let sent = down.tx.send(Svc::Message {
                            topic: m.topic.clone(),
                            payload: m.payload.clone(),
                            content_type: m.content_type.clone(),
                            properties: m.properties.clone(),
                        });
                        if sent.is_err() {
                            return;
                        }
                        if let Ok(Some(m)) = q.remove(device, &m.id) {
                            self.c2d_outcome(
                                &m,
                                Outcome::Delivered,
                                Some(format!("handed to {gw}, an older gateway that reports no further")),
                            );
                        }
                    }
                }
            }
        }
    }

    /// What became of a message handed to the device's session: it leaves
    /// the queue when the device has it (`delivered`) or can never take it
    /// (`rejected`, with the reason); otherwise (`None`: the session let it
    /// go undelivered) it stays queued for the device's next session.
    fn c2d_settled(&self, m: &C2dMessage, verdict: Option<Delivery>) {
        let Some(q) = self.c2d.get() else { return };
        let (outcome, reason) = match verdict {
            None => {
                lock(&self.c2d_handed).remove(&m.id);
                self.c2d_flush(&m.device);
                return;
            }
            Some(Delivery::Delivered) => (Outcome::Delivered, None),
            Some(Delivery::TooLarge { size, max }) => (
                Outcome::Rejected,
                Some(format!(
                    "too large for the device: a {size}-byte PUBLISH, and the device's Maximum Packet Size is {max} bytes"
                )),
            ),
            Some(Delivery::Refused(code)) => (
                Outcome::Rejected,
                Some(format!("the device refused it (PUBACK reason code 0x{code:02x})")),
            ),
        };
        {
            // Off the queue and off the handed set together, so a flush
            // sees it in one or the other and never sends it again.
            let _order = lock(&self.c2d_flushing);
            let removed = q.remove(&m.device, &m.id);
            lock(&self.c2d_handed).remove(&m.id);
            match removed {
                // Gone already: its time-to-live passed meanwhile (and said so).
                Ok(None) => {}
                Ok(Some(m)) => self.c2d_outcome(&m, outcome, reason),
                Err(e) => tracing::error!(error = %e, "c2d: cannot dequeue a delivered message; it goes again"),
            }
        }
        if outcome == Outcome::Rejected {
            // It held the rest back.
            self.c2d_flush(&m.device);
        }
    }

    /// Sends what waits for child gateway `child`'s devices.
    fn c2d_flush_child(&self, child: &str) {
        let Some(q) = self.c2d.get() else { return };
        for (device, _) in q.queues() {
            if self.registry.next_hop(&device) == Hop::Child(child.to_string()) {
                self.c2d_flush(&device);
            }
        }
    }

    /// Child gateway `child` has stored message `id`: it is off this queue.
    pub fn c2d_acked(&self, child: &str, id: &str) {
        let Some(q) = self.c2d.get() else { return };
        let down = lock(&self.downlinks).get(child).cloned();
        if let Some(d) = down {
            lock(&d.sent).remove(id);
        }
        for (device, _) in q.queues() {
            if let Ok(Some(_)) = q.remove(&device, id) {
                return;
            }
        }
    }

    /// A message from the parent (link/2): stored here, then handed on.
    /// Returns the acknowledgement for the parent.
    pub fn c2d_from_parent(&self, m: C2dMessage) -> Svc {
        let id = m.id.clone();
        let Some(q) = self.c2d.get() else {
            return Svc::C2dAck { id };
        };
        match q.enqueue(m.clone()) {
            Ok(()) => {
                self.count("c2d-queued");
                self.c2d_flush(&m.device);
                Svc::C2dAck { id }
            }
            Err(e @ c2d::QueueError::Full { .. }) => {
                self.c2d_outcome(&m, Outcome::Rejected, Some(e.to_string()));
                Svc::C2dAck { id }
            }
            // Not stored: no ack, the parent sends it again on the next link.
            Err(c2d::QueueError::Store(e)) => {
                tracing::error!(error = %e, "c2d: cannot store a message from the parent");
                Svc::Hello
            }
        }
    }

    /// Feedback from a child (link/2): recorded here or sent on up.
    pub fn c2d_feedback_from_child(&self, f: Feedback) -> Svc {
        let (id, outcome) = (f.id.clone(), f.outcome);
        if let Some(q) = self.c2d.get() {
            match q.feedback(f) {
                Ok(Some(up)) => {
                    if let Some(tx) = lock(&self.uplink).as_ref() {
                        let _ = tx.send(Svc::C2dFeedback { feedback: Box::new(up) });
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "c2d: cannot store a child's feedback");
                    return Svc::Hello;
                }
            }
        }
        Svc::C2dFeedbackAck { id, outcome }
    }

    /// The parent's service stream (link/2): feedback waiting to go up is
    /// sent now, and from now on as it comes.
    pub fn set_uplink(&self, tx: mpsc::UnboundedSender<Svc>) {
        if let Some(q) = self.c2d.get() {
            for f in q.pending_up() {
                let _ = tx.send(Svc::C2dFeedback { feedback: Box::new(f) });
            }
        }
        *lock(&self.uplink) = Some(tx);
    }

    /// The parent's service stream `tx` ended (a newer one stays).
    pub fn clear_uplink(&self, tx: &mpsc::UnboundedSender<Svc>) {
        let mut up = lock(&self.uplink);
        if up.as_ref().is_some_and(|u| u.same_channel(tx)) {
            *up = None;
        }
    }

    /// The parent has feedback `id` with `outcome`.
    pub fn c2d_up_acked(&self, id: &str, outcome: Outcome) {
        if let Some(q) = self.c2d.get()
            && let Err(e) = q.up_acknowledged(id, outcome)
        {
            tracing::error!(error = %e, "c2d: cannot forget acknowledged feedback");
        }
    }

    /// Runs until `stop`: expires queued messages whose time-to-live passed.
    pub async fn c2d_task(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            let hub = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let Some(q) = hub.c2d.get() else { return };
                match q.take_expired(c2d_now_ms()) {
                    Ok(gone) => {
                        for m in gone {
                            hub.c2d_outcome(&m, Outcome::Expired, Some("its time-to-live passed".into()));
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "c2d: cannot expire messages"),
                }
            })
            .await;
        }
    }

    /// Tells a device connected here about a desired change.
    fn notify_desired(&self, change: &DesiredChange) {
        let mut body = change.patch.clone();
        body.insert("$version".into(), Value::from(change.version));
        if self.send_to(
            &change.id,
            format!("$iothub/twin/PATCH/properties/desired/?$version={}", change.version),
            Value::Object(body).to_string().into_bytes(),
        ) {
            self.count("twin-desired-notified");
        }
    }

    /// Runs until `stop`: sends desired changes to the devices connected
    /// here, and drops the twins of identities removed from the registry.
    pub async fn desired_task(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut changes = self.twins.desired_changes();
        let mut registry = self.registry.changes();
        registry.mark_changed();
        loop {
            let mut removals = false;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = registry.changed() => match r {
                    Ok(()) => removals = true,
                    Err(_) => return,
                },
                c = changes.recv() => match c {
                    Ok(change) => self.notify_desired(&change),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "twins: desired changes were missed; devices get them at their next GET");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
            if removals {
                let hub = self.clone();
                let removed = tokio::task::spawn_blocking(move || {
                    use holdfast_model::identity::IdentityDirectory as _;
                    hub.twins.retain(|id| hub.registry.lookup(id).is_some())
                })
                .await;
                match removed {
                    Ok(Ok(n)) if n > 0 => tracing::info!(twins = n, "twins of removed identities deleted"),
                    Ok(Err(e)) => tracing::error!(error = %e, "twins: cannot delete the twins of removed identities"),
                    _ => {}
                }
            }
        }
    }

    /// The node's registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Delivers a message that came down from the parent to this node's
    /// subscribers (or further down).
    pub fn deliver_from_parent(&self, msg: Msg) {
        if let Some(b) = self.broker() {
            b.deliver(Arc::new(msg));
        }
    }
}

impl holdfast_broker::Dialect for Hub {
    fn is_request(&self, topic: &str) -> bool {
        is_request(topic)
    }

    fn device_request(&self, client_id: &str, principal: Option<&str>, topic: &str, payload: &[u8]) {
        // Answers are published through the broker from tasks the hub
        // spawns; they hold the hub through the broker's reference.
        if let Some(hub) = self.me.upgrade() {
            hub.device_request(client_id, principal, topic, payload);
        }
    }

    fn annotate(&self, msg: &mut Msg) -> Result<(), String> {
        annotate(msg).map_err(|e| e.to_string())
    }

    fn with_bag(&self, topic: String, props: &Properties) -> String {
        with_bag(topic, props)
    }

    fn forward_down(&self, msg: &Msg) -> bool {
        Hub::forward_down(self, msg)
    }

    fn client_ready(&self, client_id: &str) {
        let waiting = self.c2d.get().is_some_and(|q| q.has_queued(client_id));
        if waiting && let Some(hub) = self.me.upgrade() {
            // Dequeuing syncs the store: not on the connection's task.
            let id = client_id.to_string();
            tokio::task::spawn_blocking(move || hub.c2d_flush(&id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str) -> Msg {
        Msg {
            topic: topic.into(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
            expires_at_ms: None,
            publisher: None,
        }
    }

    #[test]
    fn telemetry_bags_become_properties() {
        let mut m = msg("devices/d/modules/m/messages/events/%24.ct=application%2Fjson&%24.on=out1&temp=31");
        annotate(&mut m).unwrap();
        assert_eq!(m.properties.content_type.as_deref(), Some("application/json"));
        let props = &m.properties.user_properties;
        for (k, v) in [("$.on", "out1"), ("temp", "31"), ("$.cdid", "d"), ("$.cmid", "m")] {
            assert!(props.iter().any(|(a, b)| a == k && b == v), "{k} in {props:?}");
        }
        let mut out = msg("devices/d/modules/m/outputs/o2");
        annotate(&mut out).unwrap();
        assert!(
            out.properties
                .user_properties
                .iter()
                .any(|(a, b)| a == "$.on" && b == "o2")
        );
        let mut plain = msg("plant/1");
        annotate(&mut plain).unwrap();
        assert!(plain.properties.user_properties.is_empty());
        assert!(annotate(&mut msg("devices/d/messages/events/a=%zz")).is_err());
    }

    #[test]
    fn inputs_get_a_bag_from_the_properties() {
        let mut p = Properties::default();
        p.user_properties.push(("temp".into(), "31 C".into()));
        p.content_type = Some("application/json".into());
        assert_eq!(
            with_bag("devices/d/modules/f/inputs/in1".into(), &p),
            "devices/d/modules/f/inputs/in1/temp=31%20C&%24.ct=application%2Fjson"
        );
        assert_eq!(
            with_bag("devices/d/messages/devicebound/x=1".into(), &p),
            "devices/d/messages/devicebound/x=1"
        );
        assert_eq!(with_bag("plant/1".into(), &p), "plant/1");
    }
}
