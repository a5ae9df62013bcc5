//! A message as the node carries it from the socket to the outbox and up
//! the tree.

use bytes::Bytes;

/// A stable message id: the outbox instance, lane and sequence number. It
/// never repeats within an outbox and survives restarts, so an upstream can
/// drop a duplicate redelivered after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// Random id of this outbox, chosen when it was created.
    pub instance: u64,
    /// Lane 0-9.
    pub lane: u8,
    /// Sequence number within the lane.
    pub seq: u64,
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}-{}-{}", self.instance, self.lane, self.seq)
    }
}

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    /// MQTT client identifier.
    pub client_id: String,
    /// The authenticated principal id, if the client authenticated.
    pub principal: Option<String>,
    /// The chain of node ids the message has passed through, nearest last
    /// (empty for a message from a client directly connected to this node).
    pub path: Vec<String>,
}

/// A message to route and store. The payload is one shared [`Bytes`]: it is
/// handed from the socket to the router, the outbox and the link without a
/// copy (a plugin that asks for the payload gets its own copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS 0-2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// User properties in order.
    pub properties: Vec<(String, String)>,
    /// Where it came from.
    pub source: Source,
    /// The id the outbox of the node where it entered gave it, once it has
    /// left that node: it travels with the message up the tree so the top
    /// can recognise a redelivered duplicate. Host-only (not seen by plugins).
    pub origin: Option<MessageId>,
    /// True when the router of the node holding it also delivered it to that
    /// node's local subscribers, so a root does not deliver it twice.
    /// Host-only; cleared when the message moves to another node.
    pub delivered_locally: bool,
}

impl Message {
    /// A QoS 0 message from client `client_id` with no properties.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>, client_id: &str) -> Self {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos: 0,
            retain: false,
            content_type: None,
            properties: Vec::new(),
            source: Source {
                client_id: client_id.to_string(),
                principal: None,
                path: Vec::new(),
            },
            origin: None,
            delivered_locally: false,
        }
    }
}
