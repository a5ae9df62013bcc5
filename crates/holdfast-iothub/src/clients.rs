//! What the hub needs of the MQTT broker: handing a message to one
//! connected client (answers, method calls, desired changes and
//! cloud-to-device messages), or to every subscriber (what comes down the
//! link). The broker implements it; the hub is made with it.
//!
//! The broker holds the hub (it is its [`holdfast_broker::Dialect`]), so
//! the hub holds the broker weakly: a [`Port`] made from the `Weak` that
//! [`holdfast_broker::Broker::open`] hands the dialect it makes. A node
//! without a broker gives the hub [`none`], which reaches no client.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use holdfast_broker::session::{Delivery, Msg};
use holdfast_broker::{Broker, NotTaken};
use holdfast_mqtt::{Properties, QoS};
use tokio::sync::oneshot;

/// The clients of this node's MQTT broker, as the hub reaches them.
pub trait Clients: Send + Sync + 'static {
    /// Hands `msg` to client `client_id` alone: true if it is connected and
    /// subscribed to a matching filter.
    fn deliver_to_client(&self, client_id: &str, msg: Arc<Msg>) -> bool;

    /// Hands `msg` to client `client_id` alone; the receiver tells what
    /// became of it (closed without a verdict if the client never got it).
    ///
    /// # Errors
    /// The client is not connected and subscribed, or its queue is full.
    fn deliver_with_receipt(&self, client_id: &str, msg: Arc<Msg>) -> Result<oneshot::Receiver<Delivery>, NotTaken>;

    /// Delivers `msg` to this node's subscribers.
    fn deliver(&self, msg: Arc<Msg>);
}

impl Clients for Broker {
    fn deliver_to_client(&self, client_id: &str, msg: Arc<Msg>) -> bool {
        Broker::deliver_to_client(self, client_id, msg)
    }

    fn deliver_with_receipt(&self, client_id: &str, msg: Arc<Msg>) -> Result<oneshot::Receiver<Delivery>, NotTaken> {
        Broker::deliver_with_receipt(self, client_id, msg)
    }

    fn deliver(&self, msg: Arc<Msg>) {
        Broker::deliver(self, msg);
    }
}

/// No clients: for a node without an MQTT broker.
pub fn none() -> Weak<dyn Clients> {
    Weak::<Broker>::new()
}

/// The clients as the hub's parts hold them: weakly, each use upgrading.
#[derive(Clone)]
pub(crate) struct Port(Weak<dyn Clients>);

impl Port {
    pub(crate) fn new(clients: Weak<dyn Clients>) -> Port {
        Port(clients)
    }

    /// Sends `payload` on `topic` to client `client_id` only, at QoS 1 (or
    /// its subscription's), if it is connected and subscribed to a
    /// matching filter.
    pub(crate) fn send_to(&self, client_id: &str, topic: String, payload: Vec<u8>) -> bool {
        let Some(clients) = self.0.upgrade() else {
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
        clients.deliver_to_client(client_id, Arc::new(msg))
    }

    /// [`Clients::deliver_with_receipt`]; no broker is [`NotTaken::Offline`].
    pub(crate) fn deliver_with_receipt(
        &self,
        client_id: &str,
        msg: Arc<Msg>,
    ) -> Result<oneshot::Receiver<Delivery>, NotTaken> {
        match self.0.upgrade() {
            Some(clients) => clients.deliver_with_receipt(client_id, msg),
            None => Err(NotTaken::Offline),
        }
    }

    /// [`Clients::deliver`], if there is a broker.
    pub(crate) fn deliver(&self, msg: Arc<Msg>) {
        if let Some(clients) = self.0.upgrade() {
            clients.deliver(msg);
        }
    }
}
