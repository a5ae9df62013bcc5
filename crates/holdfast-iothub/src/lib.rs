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
//! Across the link, the service stream ([`service::Svc`]) carries desired
//! properties down, reported patches up, method calls down and their
//! answers up, and cloud-to-device messages down.
//!
//! [`Hub`] is a facade over parts that each own their state:
//!
//! - [`twin::Twins`], the twins, and the device side of them (GET, reported
//!   patches, desired changes sent to devices connected here);
//! - the method calls waiting for their answers;
//! - [`c2d::C2d`], the durable cloud-to-device queues, and the delivery
//!   that hands them on and records their feedback;
//! - the link's service streams of the child gateways and of the parent.
//!
//! It reaches the broker's clients through [`clients::Clients`], the port
//! it is made with; the broker reaches it as its [`holdfast_broker::Dialect`].

pub mod c2d;
mod c2d_delivery;
pub mod clients;
pub mod config;
mod device_twins;
mod dialect;
mod link_service;
mod links;
mod methods;
mod metrics;
pub mod service;
pub mod twin;

use std::sync::{Arc, Weak};
use std::time::Duration;

use holdfast_broker::session::Msg;
use holdfast_mqtt::Properties;
use holdfast_registry::Registry;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

pub use self::c2d_delivery::C2dError;
pub use self::dialect::{annotate, is_inbound, is_request, with_bag};
pub use self::methods::{DEFAULT_METHOD_TIMEOUT, MAX_METHOD_TIMEOUT, MAX_WAITING_CALLS, MethodError, MethodResult};

use self::c2d::{C2d, C2dMessage, Feedback, Outcome};
use self::c2d_delivery::C2dDelivery;
use self::clients::{Clients, Port};
use self::device_twins::DeviceTwins;
use self::dialect::Request;
use self::links::Links;
use self::methods::Methods;
pub use self::metrics::IothubMetrics;
use self::service::Svc;
use self::twin::Twins;

/// What a [`Hub`] is made with.
pub struct HubParts {
    /// The node's twins.
    pub twins: Arc<Twins>,
    /// The node's durable cloud-to-device queues.
    pub c2d: Arc<C2d>,
    /// Time-to-live of a cloud-to-device message that names none
    /// (`iothub.c2d_default_ttl_seconds`).
    pub c2d_default_ttl: Duration,
    /// The identities in this node's scope, and where each is reached.
    pub registry: Arc<Registry>,
    /// What the hub counts.
    pub metrics: IothubMetrics,
    /// The broker's clients, held weakly (the broker holds the hub); on a
    /// node without a broker, [`clients::none`].
    pub clients: Weak<dyn Clients>,
}

/// The dialect's state on this node.
pub struct Hub {
    /// Twins.
    pub twins: Arc<Twins>,
    registry: Arc<Registry>,
    events: IothubMetrics,
    device_twins: Arc<DeviceTwins>,
    methods: Arc<Methods>,
    c2d: Arc<C2dDelivery>,
    links: Arc<Links>,
    clients: Port,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("twins", &self.twins)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub made of `parts`.
    pub fn new(parts: HubParts) -> Hub {
        let HubParts {
            twins,
            c2d,
            c2d_default_ttl,
            registry,
            metrics,
            clients,
        } = parts;
        let (events, clients, links) = (metrics, Port::new(clients), Arc::new(Links::default()));
        Hub {
            device_twins: Arc::new(DeviceTwins::new(
                twins.clone(),
                registry.clone(),
                clients.clone(),
                events.clone(),
            )),
            methods: Arc::new(Methods::new(
                registry.clone(),
                clients.clone(),
                links.clone(),
                events.clone(),
            )),
            c2d: Arc::new(C2dDelivery::new(
                c2d,
                c2d_default_ttl,
                registry.clone(),
                clients.clone(),
                links.clone(),
                events.clone(),
            )),
            clients,
            twins,
            registry,
            events,
            links,
        }
    }

    /// The node's registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Handles a PUBLISH on `$iothub/…` or `$holdfast/methods/…` from
    /// `client_id`, authenticated as `principal`. Answers go to that client.
    pub fn device_request(&self, client_id: &str, principal: Option<&str>, topic: &str, payload: &[u8]) {
        // A twin is the caller's own: the identity it authenticated as.
        let own = principal.filter(|p| *p != "anonymous");
        match Request::parse(topic) {
            Request::TwinGet { rid } => self.device_twins.get(client_id, own, &rid),
            Request::TwinPatchReported { rid } => self.device_twins.patch_reported(client_id, own, rid, payload),
            Request::MethodAnswer { rid, status } => self.methods.device_answered(own, &rid, status, payload),
            Request::MethodCall {
                rid,
                target,
                name,
                timeout,
            } => self
                .methods
                .call_for_client(client_id, rid, target, name, timeout, payload),
            Request::Unknown => {
                self.events.count("unknown");
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
        &self,
        target: &str,
        name: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<MethodResult, MethodError> {
        self.methods.invoke(target, name, payload, timeout).await
    }

    /// Child gateway `child` answered call `call`.
    pub fn method_answered(&self, child: &str, call: u64, result: Result<MethodResult, MethodError>) {
        self.methods.child_answered(child, call, result);
    }

    /// Registers a child gateway's service stream (`v2`: it speaks
    /// link/2), then sends it the cloud-to-device messages waiting for it.
    pub fn add_downlink(&self, child: &str, tx: mpsc::UnboundedSender<Svc>, v2: bool) {
        self.links.add_downlink(child, tx, v2);
        self.c2d.flush_child(child);
    }

    /// Forgets a child gateway's service stream, if it is still `tx`.
    pub fn remove_downlink(&self, child: &str, tx: &mpsc::UnboundedSender<Svc>) {
        self.links.remove_downlink(child, tx);
    }

    /// The parent's service stream (link/2): feedback waiting to go up is
    /// sent now, and from now on as it comes.
    pub fn set_uplink(&self, tx: mpsc::UnboundedSender<Svc>) {
        self.c2d.resend_feedback(&tx);
        self.links.set_uplink(tx);
    }

    /// The parent's service stream `tx` ended (a newer one stays).
    pub fn clear_uplink(&self, tx: &mpsc::UnboundedSender<Svc>) {
        self.links.clear_uplink(tx);
    }

    /// Takes a cloud-to-device or module-input message for a device or
    /// module in this node's scope into its durable queue ([`c2d`]): it
    /// is then not for this node's subscribers. True if it took it (it is
    /// being stored).
    pub fn forward_down(&self, msg: &Msg) -> bool {
        self.c2d.take(msg).is_some()
    }

    /// The durable cloud-to-device queues.
    pub fn c2d(&self) -> &Arc<C2d> {
        self.c2d.queues()
    }

    /// A cloud-to-device message made here from a broker message for
    /// `device`, with `ttl` (or the default).
    pub fn c2d_message(&self, device: &str, msg: &Msg, ttl: Option<Duration>) -> C2dMessage {
        self.c2d.message(device, msg, ttl)
    }

    /// Sends a cloud-to-device message: queued durably here, then handed on
    /// as far as it can go now. Returns whether it was delivered at once
    /// (its feedback says `delivered`): a device connected here has it only
    /// once it acknowledges it, so this is mostly false (`queued`).
    ///
    /// # Errors
    /// Unknown device, its queue full, or storage failed.
    pub fn c2d_send(&self, m: C2dMessage) -> Result<bool, C2dError> {
        self.c2d.send(m)
    }

    /// Hands `device`'s queued messages on, in order, as far as they go now.
    pub fn c2d_flush(&self, device: &str) {
        self.c2d.flush(device);
    }

    /// Child gateway `child` has stored message `id`: it is off this queue.
    pub fn c2d_acked(&self, child: &str, id: &str) {
        self.c2d.acked(child, id);
    }

    /// A message from the parent (link/2): stored here, then handed on.
    /// Returns the acknowledgement for the parent.
    pub fn c2d_from_parent(&self, m: C2dMessage) -> Svc {
        self.c2d.from_parent(m)
    }

    /// Feedback from a child (link/2): recorded here or sent on up.
    pub fn c2d_feedback_from_child(&self, f: Feedback) -> Svc {
        self.c2d.feedback_from_child(f)
    }

    /// The parent has feedback `id` with `outcome`.
    pub fn c2d_up_acked(&self, id: &str, outcome: Outcome) {
        self.c2d.up_acked(id, outcome);
    }

    /// Runs until `stop`: expires queued messages whose time-to-live passed.
    pub async fn c2d_task(self: Arc<Self>, stop: watch::Receiver<bool>) {
        self.c2d.clone().run(stop).await;
    }

    /// Runs until `stop`: sends desired changes to the devices connected
    /// here, and drops the twins of identities removed from the registry.
    pub async fn desired_task(self: Arc<Self>, stop: watch::Receiver<bool>) {
        self.device_twins.clone().run(stop).await;
    }

    /// Delivers a message that came down from the parent to this node's
    /// subscribers (or further down).
    pub fn deliver_from_parent(&self, m: holdfast_model::Message) {
        self.clients.deliver(Arc::new(Msg {
            topic: m.topic,
            payload: m.payload,
            qos: holdfast_mqtt::QoS::from_u8(m.qos).unwrap_or(holdfast_mqtt::QoS::AtLeastOnce),
            retain: m.retain,
            properties: holdfast_mqtt::Properties {
                content_type: m.content_type,
                user_properties: m.properties,
                ..Default::default()
            },
            expires_at_ms: None,
            publisher: None,
        }));
    }
}

impl holdfast_broker::Dialect for Hub {
    fn is_request(&self, topic: &str) -> bool {
        is_request(topic)
    }

    fn device_request(&self, client_id: &str, principal: Option<&str>, topic: &str, payload: &[u8]) {
        Hub::device_request(self, client_id, principal, topic, payload);
    }

    fn annotate(&self, msg: &mut Msg) -> Result<(), String> {
        annotate(msg).map_err(|e| e.to_string())
    }

    fn with_bag(&self, topic: String, props: &Properties) -> String {
        with_bag(topic, props)
    }

    fn forward_down(&self, msg: &Msg) -> bool {
        self.c2d.take(msg).is_some()
    }

    fn take_device_bound(&self, msg: &Msg) -> Option<holdfast_broker::Stored> {
        self.c2d.take(msg)
    }

    fn client_ready(&self, client_id: &str) {
        self.c2d.client_ready(client_id);
    }
}

#[cfg(test)]
mod tests;
