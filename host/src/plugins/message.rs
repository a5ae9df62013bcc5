//! The message handed to router plugins as a WIT resource.

use std::sync::Arc;

use super::bindings::Source;
use crate::outbox::MessageId;

/// A message to route. The router plugin sees it through the `message`
/// resource and copies out only the parts it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
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
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>, client_id: &str) -> Self {
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

/// What the resource table holds for the duration of one `route` call: a
/// shared reference, so handing the message to the plugin copies nothing.
#[derive(Debug, Clone)]
pub struct MessageRep(pub Arc<Message>);
