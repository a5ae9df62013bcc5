//! What the broker asks its routing and authentication policy, and the
//! answers.
//!
//! The broker owns these types. The node's router and auth plugin slots
//! implement [`Policy`]; the plugin runtime converts to and from the WIT
//! types of `holdfast:gateway/routing` and `holdfast:gateway/authn` at its
//! edge, so the broker needs no WebAssembly runtime (its tests use a policy
//! written in Rust).

use std::sync::Arc;

use crate::Message;

/// How a client connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// QUIC.
    Quic,
    /// WebSocket.
    Websocket,
}

impl Transport {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Quic => "quic",
            Transport::Websocket => "websocket",
        }
    }
}

/// What a client presented when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// MQTT client identifier.
    pub client_id: String,
    /// User name, if given.
    pub username: Option<String>,
    /// Password, if given.
    pub password: Option<Vec<u8>>,
    /// MQTT protocol level (4 or 5).
    pub protocol_version: u8,
    /// How it connected.
    pub transport: Transport,
    /// Peer address, `ip:port`.
    pub peer_addr: String,
    /// SHA-256 thumbprint (lowercase hex) of the client certificate.
    pub cert_thumbprint: Option<String>,
    /// Common name of the client certificate.
    pub cert_common_name: Option<String>,
}

/// Who a connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Identity id (device id, `{device}/{module}`, gateway id, username, or `anonymous`).
    pub id: String,
    /// Device id, when the principal is a device or module.
    pub device_id: Option<String>,
    /// Module id, when the principal is a module.
    pub module_id: Option<String>,
    /// Free-form attributes the policy wants to keep with the connection.
    pub attributes: Vec<(String, String)>,
}

/// Why a connection is refused (mapped to a CONNACK reason code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// Bad user name or password.
    BadCredentials,
    /// Not authorized.
    NotAuthorized,
    /// Client identifier not valid.
    BadClientId,
    /// Banned.
    Banned,
}

/// A refused connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code.
    pub code: RefusalCode,
    /// Why, for the log.
    pub reason: String,
}

/// What an authorization check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Publishing to a topic.
    Publish,
    /// Subscribing to a filter.
    Subscribe,
}

/// An authorization answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthzDecision {
    /// Allowed.
    Allow,
    /// Denied, with why.
    Deny(String),
}

/// Send the message upstream through the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAction {
    /// Outbox lane 0-9.
    pub lane: u8,
    /// Time-to-live, seconds; the outbox default when absent.
    pub ttl_seconds: Option<u32>,
    /// Replacement topic.
    pub topic: Option<String>,
    /// Replacement payload (a `Vec`, as the policy produced it: the
    /// conversion from the plugin's action then reuses its allocation).
    pub payload: Option<Vec<u8>>,
    /// User properties to add.
    pub add_properties: Vec<(String, String)>,
}

/// Deliver the message to this node's subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAction {
    /// Replacement topic.
    pub topic: Option<String>,
    /// Replacement payload (a `Vec`, as the policy produced it: the
    /// conversion from the plugin's action then reuses its allocation).
    pub payload: Option<Vec<u8>>,
    /// User properties to add.
    pub add_properties: Vec<(String, String)>,
}

/// One thing to do with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Through the outbox, upstream.
    Upstream(UpstreamAction),
    /// To local subscribers.
    Local(LocalAction),
    /// Drop, with the reason it is counted under.
    Drop(String),
}

/// The router's answer for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteOutcome {
    /// The router's actions; an empty list means drop with reason `no-route`.
    Actions(Vec<Action>),
    /// The router failed and the policy is `dead-letter`: keep the message aside.
    DeadLetter(String),
    /// The router failed and the policy is `drop`.
    Drop(String),
}

/// An authorization answer and whether it may be cached (an answer given
/// by a failure policy is not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// The decision.
    pub decision: AuthzDecision,
    /// False when the policy failed and its failure policy answered.
    pub cacheable: bool,
}

/// Routing and authentication for the broker. A failing policy answers with
/// its failure policy, so these never fail.
pub trait Policy: Send + Sync + 'static {
    /// Where `msg` goes.
    fn route(&self, msg: Arc<Message>) -> RouteOutcome;
    /// Who a connecting client is, or why it is refused.
    fn authenticate(&self, info: &ConnectInfo) -> Result<Principal, Refusal>;
    /// Whether `who` may `op` on `topic`.
    fn authorize(&self, who: &Principal, op: Operation, topic: &str) -> Authorized;
    /// The version of the authorization policy: when it changes, cached
    /// answers are forgotten.
    fn auth_version(&self) -> Arc<str>;
}
