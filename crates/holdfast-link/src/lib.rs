//! # holdfast-link
//!
//! The upstream link: how a node's outbox drains, and how a parent takes in
//! what its children send.
//!
//! - [`child`]: QUIC to a parent Holdfast node (mutual TLS with fleet
//!   certificates, a control stream and one stream per outbox lane carrying
//!   batches with cumulative acks).
//! - [`parent`]: the QUIC listener children connect to. Every message is
//!   stored in this node's outbox before the child is acknowledged.
//! - [`bridge`]: MQTT to any broker (a list of them, with failover), QoS 1
//!   with an in-flight window.
//! - [`nats`]: a NATS JetStream stream, exactly once through its
//!   de-duplication window; cloud-to-device from a durable consumer.
//! - [`streams`]: the service streams of a connection (scope sync, twins
//!   and methods, deployments), run by the crates that own those services
//!   through the [`LinkService`](holdfast_model::ports::LinkService) port.
//! - [`root`]: no upstream: what reaches the outbox is delivered to local
//!   subscribers through the
//!   [`LocalDelivery`](holdfast_model::ports::LocalDelivery) port.
//! - [`rate`]: the upstream byte-rate cap, shared by the lanes in priority
//!   order.
//! - [`reconnect`]: capped exponential back-off with full jitter, and the
//!   two things that cut it short: the parent answering a probe, and the
//!   machine's network changing.
//!
//! Only this module touches quinn for the link.

pub mod bridge;
pub mod child;
pub mod config;
mod metrics;
pub mod nats;
pub mod parent;
pub mod rate;
pub mod reconnect;
pub mod root;
pub mod streams;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use crate::config::Sections;
pub use crate::metrics::LinkMetrics;
pub use crate::streams::Services;
use holdfast_model::Message;
use holdfast_model::ports::LocalMessage;
use holdfast_outbox::Leased;
use holdfast_outbox::record::Record;

/// Why the link could not start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Certificates or keys could not be used.
    #[error("link TLS: {0}")]
    Tls(String),
    /// The listener could not bind.
    #[error("link listener cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl From<holdfast_tls::PemError> for LinkError {
    fn from(e: holdfast_tls::PemError) -> Self {
        LinkError::Tls(e.to_string())
    }
}

/// What every kind of upstream needs.
pub struct Ctx {
    /// This node's id.
    pub node_id: String,
    /// `[upstream]`
    pub config: crate::config::UpstreamConfig,
    /// The outbox it drains.
    pub outbox: Arc<holdfast_outbox::Outbox>,
    /// Shared status.
    pub status: Arc<Status>,
    /// What the link counts.
    pub metrics: Arc<LinkMetrics>,
    /// Scope sync, twins and deployments with the parent (QUIC child only).
    pub services: Services,
    /// `upstream.max_bytes_per_second`, changed live by a reload.
    pub rate: Arc<rate::RateLimit>,
}

/// TLS client settings of an upstream (the bridge, JetStream): the servers'
/// certificates verified against `ca`, and a client certificate if given.
pub(crate) fn client_tls(
    ca: &std::path::Path,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, LinkError> {
    let builder = rustls::ClientConfig::builder_with_provider(holdfast_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError::Tls(e.to_string()))?
        .with_root_certificates(holdfast_tls::load_roots(ca)?);
    match (cert, key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(holdfast_tls::load_certs(cert)?, holdfast_tls::load_key(key)?)
            .map_err(|e| LinkError::Tls(e.to_string())),
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// This node's fleet TLS material: the CA roots, its certificate chain and key.
pub(crate) type FleetMaterial = (
    Arc<rustls::RootCertStore>,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// Loads `[fleet]`, as both ends of the QUIC link use it.
pub(crate) fn fleet_material(config: Sections<'_>) -> Result<FleetMaterial, LinkError> {
    let f = &config.fleet;
    let (Some(ca), Some(cert), Some(key)) = (&f.ca, &f.cert, &f.key) else {
        return Err(LinkError::Tls("fleet.ca, fleet.cert and fleet.key are required".into()));
    };
    Ok((
        holdfast_tls::load_roots(ca)?,
        holdfast_tls::load_certs(cert)?,
        holdfast_tls::load_key(key)?,
    ))
}

/// State of the upstream link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// Root role: there is no upstream.
    Root,
    /// Trying to connect.
    Connecting,
    /// Connected and draining.
    Up,
    /// Not connected; waiting to retry.
    Down,
}

/// A connected child gateway.
#[derive(Debug, Clone, Serialize)]
pub struct ChildInfo {
    /// Its address.
    pub addr: String,
    /// Connected since, ms since the Unix epoch.
    pub since_ms: u64,
    /// Messages stored from it on this connection.
    pub received: u64,
    /// Which connection this entry belongs to.
    #[serde(skip)]
    pub(crate) conn_id: usize,
}

/// What the admin API shows about the link.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    /// `none` (root), `quic`, `mqtt` or `nats`.
    pub kind: &'static str,
    /// The parent or broker address.
    pub target: String,
    /// State now.
    pub state: LinkState,
    /// In this state since, ms since the Unix epoch.
    pub since_ms: u64,
    /// Connections established since start.
    pub connects: u64,
    /// Failed attempts and lost links since start.
    pub failures: u64,
    /// The last error.
    pub last_error: Option<String>,
    /// Messages sent upstream (resends included) and acknowledged, since start.
    pub sent: u64,
    /// Acknowledged.
    pub acked: u64,
    /// The in-flight window in force (the bridge: capped by the broker's receive maximum).
    pub window: usize,
    /// Connected child gateways by node id.
    pub children: BTreeMap<String, ChildInfo>,
}

impl LinkStatus {
    /// Messages can leave now: the link is up, or this node is a root.
    pub fn is_up(&self) -> bool {
        matches!(self.state, LinkState::Up | LinkState::Root)
    }
}

/// The link's shared status.
#[derive(Debug)]
pub struct Status(Mutex<LinkStatus>);

impl Status {
    /// A status for `config`'s upstream.
    pub fn new(config: Sections<'_>) -> Status {
        use crate::config::UpstreamKind;
        let (kind, target, state) = match config.upstream.kind {
            UpstreamKind::None => ("none", String::new(), LinkState::Root),
            UpstreamKind::Quic => ("quic", config.upstream.quic.parent.clone(), LinkState::Connecting),
            UpstreamKind::Mqtt => ("mqtt", config.upstream.mqtt.targets().join(","), LinkState::Connecting),
            UpstreamKind::Nats => ("nats", config.upstream.nats.targets().join(","), LinkState::Connecting),
        };
        Status(Mutex::new(LinkStatus {
            kind,
            target,
            state,
            since_ms: holdfast_model::unix_ms(),
            connects: 0,
            failures: 0,
            last_error: None,
            sent: 0,
            acked: 0,
            window: 0,
            children: BTreeMap::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkStatus> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy for display.
    pub fn snapshot(&self) -> LinkStatus {
        self.lock().clone()
    }

    pub(crate) fn set_state(&self, state: LinkState, error: Option<String>) {
        let mut s = self.lock();
        if s.state != state {
            s.since_ms = holdfast_model::unix_ms();
        }
        match state {
            LinkState::Up => s.connects += 1,
            LinkState::Down => s.failures += 1,
            _ => {}
        }
        s.state = state;
        if error.is_some() {
            s.last_error = error;
        }
    }

    /// True when `child` may connect: it is connected already (a
    /// reconnect), or fewer than `max` children are.
    pub(crate) fn has_room_for(&self, child: &str, max: usize) -> bool {
        let s = self.lock();
        s.children.contains_key(child) || s.children.len() < max
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut LinkStatus)) {
        f(&mut self.lock());
    }
}

/// A leased outbox message encoded to leave this node: its origin id set
/// (its own id if it entered here), its time-to-live what remains of it, the
/// delivered flag cleared. `None` if it has expired meanwhile.
/// Encoded in two parts (see [`Record::encode_parts`]): the payload is not copied.
#[allow(clippy::type_complexity)]
pub(crate) fn outgoing(
    item: &Leased,
    clock_ms: u64,
) -> Option<Result<(Vec<u8>, Bytes), holdfast_outbox::record::EncodeError>> {
    let age = clock_ms.saturating_sub(item.record.enqueued_clock_ms);
    let left = item.record.ttl_ms.checked_sub(age).filter(|l| *l > 0)?;
    let record = Record {
        enqueued_clock_ms: 0,
        enqueued_wall_ms: item.record.enqueued_wall_ms,
        ttl_ms: left,
        message: item.record.message.clone(),
    };
    Some(record.encode_parts(Some(origin_id(item)), false))
}

/// The stable id a message is known by up the tree.
pub fn origin_id(item: &Leased) -> holdfast_outbox::MessageId {
    item.record.message.origin.unwrap_or(item.id)
}

/// User properties a root or the bridge adds so consumers can recognise a
/// redelivered duplicate and see where a message came from.
pub const PROP_ID: &str = "holdfast-id";
/// `client/gw1/gw2`: the publishing client, then the gateways it crossed.
pub const PROP_PATH: &str = "holdfast-path";

/// The `holdfast-path` value of a message.
pub fn path_of(m: &Message) -> String {
    let mut p = m.source.client_id.clone();
    for hop in &m.source.path {
        p.push('/');
        p.push_str(hop);
    }
    p
}

/// A stored message for local delivery, stamped with its id and path; it
/// expires when its time-to-live runs out.
pub(crate) fn to_local(m: &Message, id: holdfast_outbox::MessageId, ttl_left_ms: Option<u64>) -> LocalMessage {
    let mut message = m.clone();
    message.properties.push((PROP_ID.to_string(), id.to_string()));
    message.properties.push((PROP_PATH.to_string(), path_of(m)));
    LocalMessage {
        expires_at_ms: ttl_left_ms.map(|t| holdfast_model::unix_ms() + t),
        // A message from this node's own client keeps no-local semantics.
        publisher: m.source.path.is_empty().then(|| m.source.client_id.clone()),
        message,
        reply: Default::default(),
    }
}

/// QUIC transport settings of the link, both ends.
pub(crate) fn transport(keep_alive: Duration, idle: Duration) -> Result<quinn::TransportConfig, LinkError> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle).map_err(|e| LinkError::Tls(e.to_string()))?,
    ));
    // One control stream, up to ten lanes, the service and deploy streams.
    t.max_concurrent_bidi_streams(16u32.into());
    // The parent opens one stream towards the child: scope sync.
    t.max_concurrent_uni_streams(1u32.into());
    // Room for a long fat pipe: 8 MiB per stream, 32 MiB per connection.
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    Ok(t)
}
