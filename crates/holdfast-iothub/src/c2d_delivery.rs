//! Cloud-to-device messages on their way: queued durably ([`C2d`]) at the
//! node nearest their device, handed to the device's MQTT session here or
//! down the link to the child gateway it is behind, and what became of
//! them recorded as feedback for their owner (here, or up the link).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use holdfast_broker::session::{Delivery, Msg};
use holdfast_broker::{AppendError, MessageId, NotTaken};
use holdfast_model::lock;
use holdfast_mqtt::{Properties, QoS};
use holdfast_registry::{Hop, Registry};
use holdfast_sdk::iothub::{self, Topic};
use holdfast_store::StoreError;
use tokio::sync::mpsc;

use crate::c2d::{C2d, C2dMessage, Enqueued, Feedback, Outcome, QueueError};
use crate::clients::Port;
use crate::links::Links;
use crate::metrics::IothubMetrics;
use crate::service::Svc;

/// Why a cloud-to-device message was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum C2dError {
    /// No such device in this node's scope.
    #[error("no device {0} in this node's scope")]
    NotFound(String),
    /// The device's queue is full.
    #[error("{0}")]
    Full(String),
    /// Storage failed.
    #[error("cannot store the message: {0}")]
    Store(String),
}

fn now_ms() -> u64 {
    holdfast_model::unix_ms()
}

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Hands this node's queued cloud-to-device messages on, and keeps their
/// feedback.
pub(crate) struct C2dDelivery {
    queues: Arc<C2d>,
    /// `iothub.c2d_default_ttl_seconds`, ms.
    default_ttl_ms: u64,
    registry: Arc<Registry>,
    clients: Port,
    links: Arc<Links>,
    events: IothubMetrics,
    /// Makes message ids unique on this node (with a random part).
    next_id: AtomicU64,
    /// Ids of messages handed to their device's session here, waiting for
    /// what became of them.
    handed: Mutex<HashSet<String>>,
    /// Held while messages are handed to a device's session.
    flushing: Mutex<()>,
}

impl C2dDelivery {
    /// Delivery from `queues`, to devices through `clients` and to child
    /// gateways through `links`; `default_ttl` is for messages that name none.
    pub(crate) fn new(
        queues: Arc<C2d>,
        default_ttl: Duration,
        registry: Arc<Registry>,
        clients: Port,
        links: Arc<Links>,
        events: IothubMetrics,
    ) -> C2dDelivery {
        C2dDelivery {
            queues,
            default_ttl_ms: default_ttl.as_millis() as u64,
            registry,
            clients,
            links,
            events,
            next_id: AtomicU64::new(1),
            handed: Mutex::default(),
            flushing: Mutex::default(),
        }
    }

    /// The durable queues.
    pub(crate) fn queues(&self) -> &Arc<C2d> {
        &self.queues
    }

    /// A cloud-to-device message made here from a broker message for
    /// `device`, with `ttl` (or the default).
    pub(crate) fn message(&self, device: &str, msg: &Msg, ttl: Option<Duration>) -> C2dMessage {
        let now = now_ms();
        let ttl = ttl.map_or(self.default_ttl_ms, |t| t.as_millis() as u64);
        C2dMessage {
            id: format!(
                "{:016x}{:08x}",
                holdfast_model::random_u64(),
                self.next_id.fetch_add(1, Ordering::Relaxed) as u32
            ),
            device: device.to_string(),
            topic: msg.topic.clone(),
            payload: BASE64.encode(&msg.payload),
            content_type: msg.properties.content_type.clone(),
            properties: msg.properties.user_properties.clone(),
            enqueued_ms: now,
            expires_ms: now.saturating_add(ttl),
            owner: self.queues.node().to_string(),
        }
    }

    /// Sends a cloud-to-device message: queued durably here, then handed on
    /// as far as it can go now. Returns whether it was delivered at once
    /// (its feedback says `delivered`): a device connected here has it only
    /// once it acknowledges it, so this is mostly false (`queued`).
    ///
    /// # Errors
    /// Unknown device, its queue full, or storage failed.
    pub(crate) fn send(self: &Arc<Self>, m: C2dMessage) -> Result<bool, C2dError> {
        let (device, id) = (m.device.clone(), m.id.clone());
        self.submit(m)?;
        // Delivered at once only when its feedback says so (an older child
        // gateway was handed it); a message off the queue may also have
        // been rejected, or be on its way to its feedback record.
        if self.queues.queued(&device).iter().any(|x| x.id == id) {
            return Ok(false);
        }
        let recorded = self.queues.recorded(64).map_err(|e| C2dError::Store(e.to_string()))?;
        Ok(recorded.iter().any(|f| f.id == id && f.outcome == Outcome::Delivered))
    }

    /// Queues `m` durably here, then hands it on as far as it can go now.
    ///
    /// # Errors
    /// Unknown device, its queue full, or storage failed.
    fn submit(self: &Arc<Self>, m: C2dMessage) -> Result<(), C2dError> {
        if self.registry.next_hop(&m.device) == Hop::Unknown {
            return Err(C2dError::NotFound(m.device));
        }
        match self.queues.enqueue(m.clone()) {
            Ok(Enqueued::New) => self.events.count("c2d-queued"),
            Ok(Enqueued::Again) => self.events.count("c2d-duplicate"),
            Err(e @ QueueError::Full { .. }) => {
                self.outcome(&m, Outcome::Rejected, Some(e.to_string()));
                return Err(C2dError::Full(e.to_string()));
            }
            Err(QueueError::Store(e)) => return Err(C2dError::Store(e.to_string())),
        }
        self.flush(&m.device);
        Ok(())
    }

    /// Takes a cloud-to-device or module-input message for a device or
    /// module in this node's scope (here or behind a child gateway) into
    /// its durable queue, instead of this node's subscribers: `None` when
    /// it is not one. What it returns resolves once the message is stored
    /// (the publisher is acknowledged then), or with why it was not.
    pub(crate) fn take(self: &Arc<Self>, msg: &Msg) -> Option<holdfast_broker::Stored> {
        let t = iothub::parse(&msg.topic).filter(|t| !t.is_outbound())?;
        let target = match t {
            Topic::Input { device, module, .. } => format!("{device}/{module}"),
            _ => t.device().to_string(),
        };
        if self.registry.next_hop(&target) == Hop::Unknown {
            // A module the registry does not know, of a device behind a
            // child gateway: handed down as it is, if the child is there.
            return self.forward_unknown_module(&t, msg).then(|| stored(Ok(())));
        }
        let ttl = msg
            .expires_at_ms
            .map(|e| Duration::from_millis(e.saturating_sub(now_ms()).max(1)));
        let m = self.message(&target, msg, ttl);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let topic = msg.topic.clone();
        let submit = move |me: &Arc<C2dDelivery>| {
            let r = me.submit(m);
            if let Err(e) = &r {
                tracing::info!(topic = %topic, error = %e, "dialect: a device-bound message was not queued");
            }
            let _ = tx.send(append_result(r));
        };
        // Queuing syncs the store: not on the routing task.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let me = self.clone();
                rt.spawn_blocking(move || submit(&me));
            }
            Err(_) => submit(self),
        }
        Some(rx)
    }

    /// A module-input message for a module the registry does not know, of
    /// a device behind a child gateway: sent down as it is (not queued).
    /// True if it is for a child.
    fn forward_unknown_module(&self, t: &Topic<'_>, msg: &Msg) -> bool {
        if !matches!(t, Topic::Input { .. }) {
            return false;
        }
        let Hop::Child(gw) = self.registry.next_hop(t.device()) else {
            return false;
        };
        let Some(down) = self.links.downlink(&gw) else {
            self.events.count("c2d-child-offline");
            tracing::debug!(topic = %msg.topic, gateway = %gw, "dialect: a device's gateway is not connected; message dropped");
            return true;
        };
        let sent = down.tx.send(Svc::Message {
            topic: msg.topic.clone(),
            payload: BASE64.encode(&msg.payload),
            content_type: msg.properties.content_type.clone(),
            properties: msg.properties.user_properties.clone(),
        });
        self.events.count(if sent.is_ok() {
            "c2d-forwarded"
        } else {
            "c2d-child-offline"
        });
        true
    }

    /// Records what became of a message (here, or for its owner up the tree).
    fn outcome(&self, m: &C2dMessage, outcome: Outcome, reason: Option<String>) {
        self.events.count(match outcome {
            Outcome::Delivered => "c2d-delivered",
            Outcome::Expired => "c2d-expired",
            Outcome::Rejected => "c2d-rejected",
        });
        let f = Feedback {
            id: m.id.clone(),
            device: m.device.clone(),
            outcome,
            at_ms: now_ms(),
            node: self.queues.node().to_string(),
            reason,
            owner: m.owner.clone(),
        };
        match self.queues.feedback(f) {
            Ok(Some(up)) => self.links.send_up(Svc::C2dFeedback { feedback: Box::new(up) }),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "c2d: cannot store a feedback record"),
        }
    }

    /// A client connected or subscribed: what waits for it goes now.
    pub(crate) fn client_ready(self: &Arc<Self>, client_id: &str) {
        if self.queues.has_queued(client_id) {
            // Dequeuing syncs the store: not on the connection's task.
            let (me, id) = (self.clone(), client_id.to_string());
            tokio::task::spawn_blocking(move || me.flush(&id));
        }
    }

    /// Hands `device`'s queued messages on, in order, as far as they go now.
    pub(crate) fn flush(self: &Arc<Self>, device: &str) {
        let queued = self.queues.queued(device);
        if queued.is_empty() {
            return;
        }
        match self.registry.next_hop(device) {
            Hop::Unknown => {
                for m in queued {
                    if let Ok(Some(m)) = self.queues.remove(device, &m.id) {
                        self.outcome(
                            &m,
                            Outcome::Rejected,
                            Some("no such device in this node's scope".into()),
                        );
                    }
                }
            }
            Hop::Here => self.hand_to_session(device),
            Hop::Child(gw) => self.hand_to_child(device, &gw, queued),
        }
    }

    /// Hands `device`'s queued messages to its MQTT session here; each
    /// leaves the queue once the session says what became of it.
    fn hand_to_session(self: &Arc<Self>, device: &str) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // One hand-over at a time, so two flushes keep the order; the
        // queue as it is now (a message settled meanwhile is off it, see
        // `settled`).
        let _order = lock(&self.flushing);
        for m in self.queues.queued(device) {
            // Already with the device's session, waiting for its PUBACK.
            if !lock(&self.handed).insert(m.id.clone()) {
                continue;
            }
            let msg = Msg {
                topic: m.topic.clone(),
                payload: Bytes::from(BASE64.decode(&m.payload).unwrap_or_default()),
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
            match self.clients.deliver_with_receipt(device, Arc::new(msg)) {
                Ok(receipt) => {
                    let me = self.clone();
                    rt.spawn(async move {
                        let verdict = receipt.await.ok();
                        // Dequeuing syncs the store.
                        let _ = tokio::task::spawn_blocking(move || me.settled(&m, verdict)).await;
                    });
                }
                // In order: the first that cannot go holds the rest. A
                // full session queue calls `client_ready` again once the
                // device has taken messages off it.
                Err(why) => {
                    lock(&self.handed).remove(&m.id);
                    if why == NotTaken::QueueFull {
                        self.events.count("c2d-device-busy");
                    }
                    return;
                }
            }
        }
    }

    /// Sends `device`'s queued messages down to child gateway `gw`: a
    /// link/2 child keeps them until it acknowledges them, an older one is
    /// handed them without a receipt.
    fn hand_to_child(&self, device: &str, gw: &str, queued: Vec<C2dMessage>) {
        let Some(down) = self.links.downlink(gw) else { return };
        for m in queued {
            if down.v2 {
                if !lock(&down.sent).insert(m.id.clone()) {
                    continue;
                }
                if down.tx.send(Svc::C2d { message: Box::new(m) }).is_err() {
                    return;
                }
                self.events.count("c2d-forwarded");
            } else {
                let sent = down.tx.send(Svc::Message {
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                    content_type: m.content_type.clone(),
                    properties: m.properties.clone(),
                });
                if sent.is_err() {
                    return;
                }
                if let Ok(Some(m)) = self.queues.remove(device, &m.id) {
                    self.outcome(
                        &m,
                        Outcome::Delivered,
                        Some(format!("handed to {gw}, an older gateway that reports no further")),
                    );
                }
            }
        }
    }

    /// What became of a message handed to the device's session: it leaves
    /// the queue when the device has it (`delivered`) or can never take it
    /// (`rejected`, with the reason); otherwise (`None`: the session let it
    /// go undelivered) it stays queued for the device's next session.
    fn settled(self: &Arc<Self>, m: &C2dMessage, verdict: Option<Delivery>) {
        let (outcome, reason) = match verdict {
            None => {
                lock(&self.handed).remove(&m.id);
                self.flush(&m.device);
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
            let _order = lock(&self.flushing);
            let removed = self.queues.remove(&m.device, &m.id);
            lock(&self.handed).remove(&m.id);
            match removed {
                // Gone already: its time-to-live passed meanwhile (and said so).
                Ok(None) => {}
                Ok(Some(m)) => self.outcome(&m, outcome, reason),
                Err(e) => tracing::error!(error = %e, "c2d: cannot dequeue a delivered message; it goes again"),
            }
        }
        if outcome == Outcome::Rejected {
            // It held the rest back.
            self.flush(&m.device);
        }
    }

    /// Sends what waits for child gateway `child`'s devices.
    pub(crate) fn flush_child(self: &Arc<Self>, child: &str) {
        for (device, _) in self.queues.queues() {
            if self.registry.next_hop(&device) == Hop::Child(child.to_string()) {
                self.flush(&device);
            }
        }
    }

    /// Child gateway `child` has stored message `id`: it is off this queue.
    pub(crate) fn acked(&self, child: &str, id: &str) {
        if let Some(d) = self.links.downlink(child) {
            lock(&d.sent).remove(id);
        }
        for (device, _) in self.queues.queues() {
            if let Ok(Some(_)) = self.queues.remove(&device, id) {
                return;
            }
        }
    }

    /// A message from the parent (link/2): stored here, then handed on.
    /// Returns the acknowledgement for the parent. One this node took
    /// before (the parent sends it again because the acknowledgement was
    /// lost) is acknowledged again, not queued again.
    pub(crate) fn from_parent(self: &Arc<Self>, m: C2dMessage) -> Svc {
        let id = m.id.clone();
        match self.queues.enqueue(m.clone()) {
            Ok(Enqueued::New) => {
                self.events.count("c2d-queued");
                self.flush(&m.device);
                Svc::C2dAck { id }
            }
            Ok(Enqueued::Again) => {
                self.events.count("c2d-duplicate");
                Svc::C2dAck { id }
            }
            Err(e @ QueueError::Full { .. }) => {
                self.outcome(&m, Outcome::Rejected, Some(e.to_string()));
                Svc::C2dAck { id }
            }
            // Not stored: no ack, the parent sends it again on the next link.
            Err(QueueError::Store(e)) => {
                tracing::error!(error = %e, "c2d: cannot store a message from the parent");
                Svc::Hello
            }
        }
    }

    /// Feedback from a child (link/2): recorded here or sent on up.
    pub(crate) fn feedback_from_child(&self, f: Feedback) -> Svc {
        let (id, outcome) = (f.id.clone(), f.outcome);
        match self.queues.feedback(f) {
            Ok(Some(up)) => self.links.send_up(Svc::C2dFeedback { feedback: Box::new(up) }),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "c2d: cannot store a child's feedback");
                return Svc::Hello;
            }
        }
        Svc::C2dFeedbackAck { id, outcome }
    }

    /// Queues the feedback waiting to go up on the parent's new stream `tx`.
    pub(crate) fn resend_feedback(&self, tx: &mpsc::UnboundedSender<Svc>) {
        for f in self.queues.pending_up() {
            let _ = tx.send(Svc::C2dFeedback { feedback: Box::new(f) });
        }
    }

    /// The parent has feedback `id` with `outcome`.
    pub(crate) fn up_acked(&self, id: &str, outcome: Outcome) {
        if let Err(e) = self.queues.up_acknowledged(id, outcome) {
            tracing::error!(error = %e, "c2d: cannot forget acknowledged feedback");
        }
    }

    /// Runs until `stop`: expires queued messages whose time-to-live passed.
    pub(crate) async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                match me.queues.take_expired(now_ms()) {
                    Ok(gone) => {
                        for m in gone {
                            me.outcome(&m, Outcome::Expired, Some("its time-to-live passed".into()));
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "c2d: cannot expire messages"),
                }
                if let Err(e) = me.queues.forget_taken(now_ms()) {
                    tracing::error!(error = %e, "c2d: cannot forget the ids of expired messages");
                }
            })
            .await;
        }
    }
}

/// An outbox-style answer for a message taken into a device's queue (the
/// broker waits for it as for an append before it acknowledges).
fn append_result(r: Result<(), C2dError>) -> Result<MessageId, AppendError> {
    match r {
        Ok(()) => Ok(MessageId {
            instance: 0,
            lane: 0,
            seq: 0,
        }),
        // 0x97, quota exceeded: the device's queue is full.
        Err(C2dError::Full(_)) => Err(AppendError::QuotaExceeded("iothub.c2d_max_queued_per_device")),
        Err(C2dError::NotFound(d)) => Err(AppendError::Store(StoreError::Other(format!("no device {d}")))),
        Err(C2dError::Store(e)) => Err(AppendError::Store(StoreError::Other(e))),
    }
}

/// A [`holdfast_broker::Stored`] that has resolved.
fn stored(r: Result<(), C2dError>) -> holdfast_broker::Stored {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = tx.send(append_result(r));
    rx
}
