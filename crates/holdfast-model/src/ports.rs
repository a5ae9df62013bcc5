//! Ports: what the link needs from the rest of the node, as traits the
//! node's crates implement. The link (`holdfast-link`) depends on these and
//! on nothing above it; the host plugs the broker, the IoT Hub dialect, the
//! deployer and the registry in.
//!
//! - [`LocalDelivery`]: hands a [`Message`] to this node's local
//!   subscribers (a root draining its outbox, the MQTT bridge's `in`
//!   mappings). The broker implements it.
//! - [`LinkService`]: a service carried on its own stream of each link
//!   connection (twins and methods, fleet deployments, scope sync). The
//!   link opens and accepts the streams and frames what goes over them; the
//!   service's crate runs the conversation on a [`ServiceStream`].
//!
//! No runtime here: futures are boxed `std` futures, so the traits stay
//! usable from any executor and from tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::Message;

/// A boxed future that can move between threads.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A message for this node's local subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMessage {
    /// The message: topic, payload, QoS, retain, content type, user
    /// properties.
    pub message: Message,
    /// When it expires, ms since the Unix epoch (MQTT 5 message expiry).
    pub expires_at_ms: Option<u64>,
    /// The client id of the publisher when it is one of this node's own
    /// clients (its no-local subscriptions do not get it back).
    pub publisher: Option<String>,
    /// MQTT 5 properties a stored [`Message`] does not carry, passed
    /// through to subscribers (a message bridged in from a broker).
    pub reply: ReplyProperties,
}

/// The MQTT 5 request/response properties a message may carry to local
/// subscribers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyProperties {
    /// Payload format indicator (1: UTF-8).
    pub payload_format_indicator: Option<u8>,
    /// Response topic.
    pub response_topic: Option<String>,
    /// Correlation data.
    pub correlation_data: Option<Bytes>,
}

impl LocalMessage {
    /// `message` with no expiry, no publisher and no reply properties.
    pub fn new(message: Message) -> LocalMessage {
        LocalMessage {
            message,
            expires_at_ms: None,
            publisher: None,
            reply: ReplyProperties::default(),
        }
    }
}

/// Delivery to this node's local subscribers.
pub trait LocalDelivery: Send + Sync {
    /// Hands `msg` to every matching subscription (and keeps it as the
    /// retained message of its topic when it has the retain flag). Returns
    /// the deepest queue of a session it went to, so a caller draining a
    /// backlog can let slow subscribers catch up.
    fn deliver(&self, msg: LocalMessage) -> usize;

    /// [`LocalDelivery::deliver`], resolving once what must be stored
    /// before its sender is acknowledged is stored (a message for a device
    /// goes through the node's durable device queue): the deepest queue,
    /// or the MQTT reason code of a refusal. The default stores nothing.
    fn deliver_stored(&self, msg: LocalMessage) -> BoxFuture<'static, Result<usize, u8>> {
        let backlog = self.deliver(msg);
        Box::pin(std::future::ready(Ok(backlog)))
    }
}

/// One message on a service stream; the link frames it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMsg {
    /// A message of the service's own protocol (JSON): a SVC frame on the
    /// twins stream, a DEPLOY frame on the deploy stream.
    Msg(Bytes),
    /// Bytes following a message (BLOB frames: a component's chunks on the
    /// deploy stream).
    Blob(Bytes),
    /// A numbered part (SCOPE frames: see [`scope_part`]).
    Part(u8, Bytes),
}

/// The part numbers of scope sync's SCOPE frames.
pub mod scope_part {
    /// A piece of a full sync; more follow.
    pub const FULL_PART: u8 = 1;
    /// The last (or only) piece of a full sync.
    pub const FULL_END: u8 = 2;
    /// An incremental change.
    pub const DELTA: u8 = 3;
}

/// The stream has ended: the peer finished it or the connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamClosed;

impl std::fmt::Display for StreamClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the link stream has ended")
    }
}

impl std::error::Error for StreamClosed {}

/// The sending half of a service stream.
pub trait StreamSend: Send {
    /// Sends `msg`, waiting while the peer's flow control is full.
    fn send(&mut self, msg: StreamMsg) -> BoxFuture<'_, Result<(), StreamClosed>>;
}

/// The receiving half of a service stream.
pub trait StreamRecv: Send {
    /// The next message. `Ok(None)` when the stream or the connection has
    /// ended (on a stream that carries nothing this way, only then); `Err`
    /// with the reason when the peer sent something that is not a frame of
    /// this stream. Cancel-safe: a `select!` may drop it between messages
    /// without losing one.
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<StreamMsg>, String>>;
}

/// The link connection a service stream belongs to.
pub trait LinkPeer: Send + Sync {
    /// The node id at the other end (from its certificate).
    fn peer_id(&self) -> &str;
    /// The link protocol version both ends agreed on (1, 2, 3…).
    fn version(&self) -> u16;
    /// Closes the connection because the peer broke the protocol; the
    /// child reconnects.
    fn protocol_error(&self, reason: &str);
    /// Closes the connection because the peer is no longer allowed here
    /// (a child gateway disabled, removed or moved); counted as refused.
    fn revoke(&self, reason: &str);
}

/// One stream of one link connection, handed to a [`LinkService`].
pub struct ServiceStream {
    /// The connection.
    pub peer: Arc<dyn LinkPeer>,
    /// What goes to the peer. On a stream that only carries messages the
    /// other way, every send fails with [`StreamClosed`].
    pub send: Box<dyn StreamSend>,
    /// What comes from the peer. On a stream that only carries messages the
    /// other way, it yields `Ok(None)` once the connection has ended.
    pub recv: Box<dyn StreamRecv>,
}

impl std::fmt::Debug for ServiceStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceStream")
            .field("peer", &self.peer.peer_id())
            .field("version", &self.peer.version())
            .finish_non_exhaustive()
    }
}

/// A service carried on the link: for every connection, its parent end
/// runs [`LinkService::parent_end`] and its child end
/// [`LinkService::child_end`], each until its stream ends.
pub trait LinkService: Send + Sync {
    /// Whether `first`, the first message on a stream a child opened, is
    /// this service's hello (the parent then runs
    /// [`parent_end`](LinkService::parent_end) on the rest of the stream).
    /// A service on a stream the parent opens never sees one: `false`.
    fn is_hello(&self, first: &StreamMsg) -> bool;

    /// The largest frame this service's stream accepts, in bytes; the link
    /// refuses a larger one as a protocol error.
    fn max_frame(&self) -> usize;

    /// The parent's end, for the child `stream.peer`.
    fn parent_end(self: Arc<Self>, stream: ServiceStream) -> BoxFuture<'static, ()>;

    /// The child's end, towards the parent `stream.peer`. On a stream the
    /// child opens, it sends its hello first.
    fn child_end(self: Arc<Self>, stream: ServiceStream) -> BoxFuture<'static, ()>;
}
