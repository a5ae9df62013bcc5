//! `[fleet]`, `[link]` and `[upstream]` of the node's configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The sections of the node's configuration the link reads.
#[derive(Debug, Clone, Copy)]
pub struct Sections<'a> {
    /// `[fleet]`
    pub fleet: &'a FleetConfig,
    /// `[link]`
    pub link: &'a LinkConfig,
    /// `[upstream]`
    pub upstream: &'a UpstreamConfig,
}

/// `[fleet]`: the certificates that place this node in a fleet. Used by the
/// QUIC link in both directions (`holdfast cert ca` / `holdfast cert node`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// The fleet CA certificate, PEM. Peers are verified against it.
    pub ca: Option<PathBuf>,
    /// This node's certificate chain, PEM, issued for its `node.id`.
    pub cert: Option<PathBuf>,
    /// This node's private key, PEM.
    pub key: Option<PathBuf>,
}

/// `[link]`: the QUIC listener that child gateways connect to. A child is
/// let in only if its certificate (issued by the fleet CA) names an
/// identity of kind `gateway` whose parent is this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// Listen for child gateways. Default false.
    pub enabled: bool,
    /// UDP address. Default `0.0.0.0:15600`.
    pub listen: SocketAddr,
    /// Concurrent child connections. Default 1000.
    pub max_children: usize,
    /// Largest batch a child may send, bytes (uncompressed, for compressed
    /// batches). Default 16 MiB.
    pub max_batch_bytes: u32,
    /// The highest link protocol offered to children: 4 (idempotent
    /// lanes: nothing a child sends is stored twice), 3 (fleet
    /// deployments), 2 (compressed batches, durable cloud-to-device with
    /// delivery reports) or 1 (as the first nodes). Default 4.
    pub version: u16,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 15600)),
            max_children: 1000,
            max_batch_bytes: 16 << 20,
            version: 4,
        }
    }
}

/// Where the outbox drains to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamKind {
    /// Root role: what reaches the outbox is delivered to local subscribers.
    #[default]
    None,
    /// A parent Holdfast node over QUIC (`[upstream.quic]`).
    Quic,
    /// Any MQTT broker through the bridge (`[upstream.mqtt]`).
    Mqtt,
    /// A NATS JetStream stream (`[upstream.nats]`), exactly once through
    /// its de-duplication window.
    Nats,
}

/// `[upstream]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `none` (root), `quic`, `mqtt` or `nats`. Default `none`.
    pub kind: UpstreamKind,
    /// Messages sent per batch. Default 512.
    pub batch_messages: usize,
    /// Unacknowledged messages per lane before the sender waits (QUIC), or
    /// the in-flight ceiling (bridge, further capped by the broker's receive
    /// maximum). Default 8192 (QUIC) / 100 (bridge: `upstream.mqtt.inflight`).
    pub window_messages: usize,
    /// First reconnect delay, ms. Default 100.
    pub backoff_initial_ms: u64,
    /// Reconnect delay ceiling, ms (full jitter below it). Default 30000.
    pub backoff_max_ms: u64,
    /// While disconnected, how often to check whether the parent answers
    /// again, ms; an answer reconnects at once. 0 turns probing off. Default 100.
    pub probe_interval_ms: u64,
    /// Reconnect at once when the machine's addresses or routes change
    /// (Linux netlink). Default true.
    pub watch_network: bool,
    /// A connection attempt that has not completed by then fails, ms. Default 5000.
    pub connect_timeout_ms: u64,
    /// QUIC: compress batches with zstd when the parent speaks
    /// `holdfast-link/2` (an older parent gets plain batches). Default true.
    pub compression: bool,
    /// zstd level, 1-19. Default 3.
    pub compression_level: i32,
    /// Cap on the bytes per second sent upstream (batch frames on the QUIC
    /// link, PUBLISH packets on the bridge); 0 for none. Applied live by a
    /// reload. Default 0.
    pub max_bytes_per_second: u64,
    /// `[upstream.quic]`
    pub quic: UpstreamQuicConfig,
    /// `[upstream.mqtt]`
    pub mqtt: BridgeConfig,
    /// `[upstream.nats]`
    pub nats: crate::nats::NatsConfig,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            kind: UpstreamKind::None,
            batch_messages: 512,
            window_messages: 8192,
            backoff_initial_ms: 100,
            backoff_max_ms: 30_000,
            probe_interval_ms: 100,
            watch_network: true,
            connect_timeout_ms: 5000,
            compression: true,
            compression_level: 3,
            max_bytes_per_second: 0,
            quic: UpstreamQuicConfig::default(),
            mqtt: BridgeConfig::default(),
            nats: crate::nats::NatsConfig::default(),
        }
    }
}

/// `[upstream.quic]`: the parent Holdfast node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamQuicConfig {
    /// The parent's link address, `host:port` (UDP).
    pub parent: String,
    /// The parent's node id: its certificate must be issued for it.
    pub parent_id: String,
    /// Keep-alive interval, ms. Default 1000.
    pub keep_alive_ms: u64,
    /// A link silent for this long is dead (half-open detection), ms. Default 5000.
    pub idle_timeout_ms: u64,
}

impl Default for UpstreamQuicConfig {
    fn default() -> Self {
        UpstreamQuicConfig {
            parent: String::new(),
            parent_id: String::new(),
            keep_alive_ms: 1000,
            idle_timeout_ms: 5000,
        }
    }
}

/// MQTT protocol version the bridge speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BridgeProtocol {
    /// MQTT 3.1.1
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.0
    #[default]
    #[serde(rename = "5")]
    V5,
}

/// `[upstream.mqtt]`: the bridge to an MQTT broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// Broker host name or address.
    pub host: String,
    /// Broker port. Default 1883 (8883 is usual with TLS).
    pub port: u16,
    /// Several brokers of a cluster, `host:port` each (`host` alone takes
    /// `port`); when set, `host` is not used. A broker that cannot be
    /// reached or drops the bridge is followed by the next in the list;
    /// back-off starts only when all of them failed in turn.
    pub servers: Vec<String>,
    /// `false`: the first server is the main one; while connected to
    /// another, the bridge probes it and goes back to it when it answers.
    /// `true`: the servers are equals, taken in turn. Default false.
    pub round_robin: bool,
    /// `"3.1.1"` or `"5"`. Default `"5"`.
    pub protocol: BridgeProtocol,
    /// Client id. Default: `node.id`.
    pub client_id: Option<String>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Keep-alive, seconds. Default 30.
    pub keep_alive_seconds: u16,
    /// Start a clean session on every connect. false keeps the session
    /// (for `in` subscriptions) for 7 days. Default true.
    pub clean_start: bool,
    /// In-flight QoS 1 window, capped by the broker's receive maximum. Default 100.
    pub inflight: u16,
    /// Use TLS. Default false.
    pub tls: bool,
    /// CA bundle for the broker's certificate, PEM. Default: the fleet CA if
    /// set, else none (TLS needs one).
    pub ca: Option<PathBuf>,
    /// Name expected in the broker's certificate. Default: `host`.
    pub server_name: Option<String>,
    /// Client certificate chain, PEM (certificate authentication).
    pub cert: Option<PathBuf>,
    /// Client private key, PEM.
    pub key: Option<PathBuf>,
    /// Outgoing topic mapping: strip this prefix from local topics...
    pub strip_prefix: String,
    /// ...then add this one.
    pub add_prefix: String,
    /// `[[upstream.mqtt.in]]`: remote topics brought down to local subscribers.
    #[serde(rename = "in")]
    pub inbound: Vec<BridgeInConfig>,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            host: String::new(),
            port: 1883,
            servers: Vec::new(),
            round_robin: false,
            protocol: BridgeProtocol::V5,
            client_id: None,
            username: None,
            password: None,
            keep_alive_seconds: 30,
            clean_start: true,
            inflight: 100,
            tls: false,
            ca: None,
            server_name: None,
            cert: None,
            key: None,
            strip_prefix: String::new(),
            add_prefix: String::new(),
            inbound: Vec::new(),
        }
    }
}

impl BridgeConfig {
    /// The brokers as `host:port`, in order: `servers`, or `host:port`.
    pub fn targets(&self) -> Vec<String> {
        if self.servers.is_empty() {
            return vec![format!("{}:{}", self.host, self.port)];
        }
        self.servers.iter().map(|s| with_port(s, self.port)).collect()
    }
}

/// `host:port` from `host` or `host:port` (`[v6]:port` too).
pub(crate) fn with_port(server: &str, port: u16) -> String {
    let bracketed_v6 = server.starts_with('[') && server.ends_with(']');
    let has_port = !bracketed_v6
        && server
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if has_port {
        server.to_string()
    } else {
        format!("{server}:{port}")
    }
}

/// `[[upstream.mqtt.in]]`: one remote filter delivered locally.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeInConfig {
    /// Topic filter subscribed to on the remote broker.
    pub filter: String,
    /// QoS of the subscription (0 or 1). Default 1.
    pub qos: Option<u8>,
    /// Strip this prefix from remote topics...
    pub strip_prefix: String,
    /// ...then add this one before local delivery.
    pub add_prefix: String,
}
