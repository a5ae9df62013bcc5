//! Sessions: what the broker keeps for a client between its connections —
//! subscriptions, the queue of messages to send, and QoS 1/2 state.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use holdfast_mqtt::{Properties, QoS, SubOptions, Version};
use tokio::sync::Notify;

/// A message inside the broker, shared by every subscriber it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// MQTT 5 properties passed through to subscribers: payload format,
    /// content type, response topic, correlation data, user properties.
    pub properties: Properties,
    /// When it expires, ms since the Unix epoch (MQTT 5 message expiry).
    pub expires_at_ms: Option<u64>,
    /// Client id of the publisher, for no-local.
    pub publisher: Option<Arc<str>>,
}

impl Msg {
    /// A message as a client sent it (PUBLISH or will): expiry made
    /// absolute, only the properties that travel to subscribers kept.
    pub(crate) fn received(
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        p: &Properties,
        publisher: Arc<str>,
    ) -> Msg {
        Msg {
            expires_at_ms: p.message_expiry_interval.map(|s| crate::now_ms() + u64::from(s) * 1000),
            properties: Properties {
                payload_format_indicator: p.payload_format_indicator,
                content_type: p.content_type.clone(),
                response_topic: p.response_topic.clone(),
                correlation_data: p.correlation_data.clone(),
                user_properties: p.user_properties.clone(),
                ..Properties::default()
            },
            topic,
            payload,
            qos,
            retain,
            publisher: Some(publisher),
        }
    }
}

/// A message waiting to be sent to one session.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The message.
    pub msg: Arc<Msg>,
    /// QoS granted for this delivery.
    pub qos: QoS,
    /// Retain flag on this delivery.
    pub retain: bool,
    /// Subscription identifiers to attach.
    pub sub_ids: Vec<u32>,
    /// Key of its stored copy (persistent sessions, QoS 1/2), else 0.
    pub seq: u64,
    /// Told what became of it, when its sender asked
    /// ([`Broker::deliver_with_receipt`](crate::Broker::deliver_with_receipt)).
    pub receipt: Option<Receipt>,
}

/// What became of a delivery that asked for a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The client has it: it acknowledged it (PUBACK at QoS 1, PUBCOMP at
    /// QoS 2), or, at QoS 0, it was written to its connection.
    Delivered,
    /// The client refused it: the reason code of its PUBACK or PUBREC.
    Refused(u8),
    /// It cannot go to this client: the PUBLISH would be `size` bytes,
    /// more than the Maximum Packet Size `max` the client connected with.
    TooLarge {
        /// The packet's size, bytes.
        size: usize,
        /// The client's Maximum Packet Size, bytes.
        max: u32,
    },
}

/// Tells a delivery's sender, once, what became of it. A receipt dropped
/// without a verdict (the session ended, or dropped the message with its
/// QoS 0 messages when the client went away) closes the channel: the
/// client does not have it.
#[derive(Debug, Clone)]
pub struct Receipt(Arc<Mutex<Option<tokio::sync::oneshot::Sender<Delivery>>>>);

impl Receipt {
    /// A receipt and the receiver its verdict arrives on.
    pub fn new() -> (Receipt, tokio::sync::oneshot::Receiver<Delivery>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Receipt(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Gives the verdict (only the first counts).
    pub fn settle(&self, verdict: Delivery) {
        if let Some(tx) = holdfast_model::lock(&self.0).take() {
            let _ = tx.send(verdict);
        }
    }
}

impl Outgoing {
    /// Gives the verdict to the sender, if it asked for one.
    pub(crate) fn settle(&self, verdict: Delivery) {
        if let Some(r) = &self.receipt {
            r.settle(verdict);
        }
    }
}

/// A QoS 1/2 message sent and not yet acknowledged.
#[derive(Debug, Clone)]
pub struct Inflight {
    /// Packet identifier.
    pub pkid: u16,
    /// What was sent.
    pub out: Outgoing,
    /// PUBREC received; waiting for PUBCOMP.
    pub released: bool,
}

/// A subscription as the session remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRecord {
    /// Options.
    pub options: SubOptions,
    /// Subscription identifier.
    pub id: Option<u32>,
}

/// The mutable part of a session.
#[derive(Debug)]
pub struct SessionState {
    /// Session expiry interval, seconds; 0 ends the session with the connection.
    pub expiry_s: u32,
    /// Subscriptions by full filter (including `$share/…`).
    pub subs: HashMap<String, SubRecord>,
    /// Messages waiting to be sent.
    pub queue: VecDeque<Outgoing>,
    /// Sent, not yet acknowledged, in send order.
    pub inflight: VecDeque<Inflight>,
    /// Last packet identifier used.
    pub last_pkid: u16,
    /// QoS 2 packet ids received and PUBREC'd, waiting for PUBREL.
    pub incoming_qos2: HashSet<u16>,
    /// Id of the connection attached, 0 when none.
    pub conn_id: u64,
    /// Protocol of the current or last connection.
    pub version: Version,
    /// Most QoS 1/2 messages the client accepts unacknowledged.
    pub client_receive_max: u16,
    /// Largest packet the client accepts.
    pub client_max_packet: u32,
    /// When the last connection ended, ms since the Unix epoch.
    pub disconnected_at_ms: Option<u64>,
    /// Next sequence number for stored queue entries.
    pub next_seq: u64,
    /// A delivery with a receipt was refused because the queue was full:
    /// the dialect is told ([`crate::Dialect::client_ready`]) once the
    /// connection has taken messages off it.
    pub wants_room: bool,
}

/// A session.
#[derive(Debug)]
pub struct Session {
    /// Client identifier.
    pub client_id: Arc<str>,
    state: Mutex<SessionState>,
    /// Woken when there is something to send.
    pub wake: Notify,
    /// Woken to tell the attached connection another one takes over.
    pub kick: Notify,
    /// Set with `kick`; a connection woken without it ignores the wake-up.
    pub kick_pending: AtomicBool,
    connected: AtomicBool,
    /// Bumped whenever a connection attaches; a pending will or expiry
    /// timer checks it to know whether the client came back.
    pub generation: AtomicU64,
}

impl Session {
    /// A new, empty session.
    pub fn new(client_id: Arc<str>, expiry_s: u32, version: Version) -> Session {
        Session {
            client_id,
            state: Mutex::new(SessionState {
                expiry_s,
                subs: HashMap::new(),
                queue: VecDeque::new(),
                inflight: VecDeque::new(),
                last_pkid: 0,
                incoming_qos2: HashSet::new(),
                conn_id: 0,
                version,
                client_receive_max: u16::MAX,
                client_max_packet: u32::MAX,
                disconnected_at_ms: None,
                next_seq: 1,
                wants_room: false,
            }),
            wake: Notify::new(),
            kick: Notify::new(),
            kick_pending: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        }
    }

    /// Locks the state. A panic while it was held cannot leave it half
    /// written in a way that matters more than losing the connection, so a
    /// poisoned lock is taken over.
    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        holdfast_model::lock(&self.state)
    }

    /// Whether a connection is attached.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub(crate) fn set_connected(&self, on: bool) {
        self.connected.store(on, Ordering::Release);
    }
}

impl SessionState {
    /// Whether the session outlives its connection.
    pub fn persistent(&self) -> bool {
        self.expiry_s > 0
    }

    /// The next packet identifier not in flight.
    pub fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1);
            if self.last_pkid == 0 {
                self.last_pkid = 1;
            }
            let id = self.last_pkid;
            if !self.inflight.iter().any(|i| i.pkid == id) {
                return id;
            }
        }
    }

    /// Removes the in-flight entry `pkid`.
    pub fn take_inflight(&mut self, pkid: u16) -> Option<Inflight> {
        let pos = self.inflight.iter().position(|i| i.pkid == pkid)?;
        self.inflight.remove(pos)
    }
}
