//! `[mqtt]` of the node's configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[mqtt]`: the MQTT broker for child devices and modules.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Run the broker. Default true.
    pub enabled: bool,
    /// `[mqtt.tcp]`: plain TCP. Default on, `0.0.0.0:1883`.
    pub tcp: TcpListenerConfig,
    /// `[mqtt.tls]`: TLS over TCP. Default off, `0.0.0.0:8883`.
    pub tls: TlsListenerConfig,
    /// `[mqtt.quic]`: MQTT over QUIC (ALPN `mqtt`). Default off, UDP `0.0.0.0:14567`
    /// (also when the table is given without `listen`).
    #[serde(deserialize_with = "quic_listener")]
    pub quic: TlsListenerConfig,
    /// `[mqtt.ws]`: MQTT over WebSockets, plain. Default off, `0.0.0.0:8083`.
    pub ws: WsListenerConfig,
    /// `[mqtt.wss]`: MQTT over WebSockets over TLS (`cert` and `key`
    /// required). Default off, `0.0.0.0:8084`; the IoT Hub device SDKs use
    /// port 443 when asked for WebSockets (also when the table is given
    /// without `listen`).
    #[serde(deserialize_with = "wss_listener")]
    pub wss: WssListenerConfig,
    /// Largest packet accepted or sent, bytes. Default 1 MiB.
    pub max_packet_size: u32,
    /// Longest topic name or filter, bytes. Default 1024.
    pub max_topic_length: usize,
    /// Subscriptions one client may hold. Default 100.
    pub max_subscriptions_per_client: usize,
    /// Unacknowledged QoS 1/2 messages per direction per client: the receive
    /// maximum announced to clients and the most sent to one before it acks.
    /// Default 64.
    pub max_inflight: u16,
    /// Messages queued for one session (offline, or beyond the in-flight
    /// window) before new ones are dropped and counted. Default 10000.
    pub max_queued_messages: usize,
    /// Concurrent client connections over all listeners. Default 100000.
    pub max_connections: usize,
    /// A socket that has not sent a complete CONNECT by then is closed, ms. Default 10000.
    pub connect_timeout_ms: u64,
    /// Keep-alive ceiling, seconds: a client asking for more (or for none) is
    /// told this (MQTT 5 server keep-alive). 0 = accept what the client asks. Default 0.
    pub max_keep_alive_seconds: u16,
    /// Ceiling on a session's expiry interval, seconds. Default 604800 (7 days).
    pub max_session_expiry_seconds: u32,
    /// Topic aliases a client may use towards the broker (MQTT 5). Default 64.
    pub topic_alias_maximum: u16,
    /// Longest client identifier accepted. Default 256.
    pub max_client_id_length: usize,
    /// Retained messages kept (new topics beyond this are refused and counted). Default 100000.
    pub max_retained: usize,
    /// How often session and retained-message writes are synced to disk, ms.
    /// They are written through at once (surviving a process crash) and
    /// synced (surviving power loss) on this interval. Default 1000.
    pub sync_interval_ms: u64,
    /// Failed authentications from one IP address before its CONNECTs are
    /// slowed down. 0 = never. Default 3.
    pub auth_backoff_after_failures: u32,
    /// The first delay imposed, ms; it doubles with each further failure. Default 250.
    pub auth_backoff_initial_ms: u64,
    /// The longest delay, ms. Default 10000.
    pub auth_backoff_max_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: true,
            tcp: TcpListenerConfig::default(),
            tls: TlsListenerConfig::with_port(8883),
            quic: TlsListenerConfig::with_port(MQTT_QUIC_PORT),
            ws: WsListenerConfig::default(),
            wss: WssListenerConfig::default(),
            max_packet_size: 1 << 20,
            max_topic_length: 1024,
            max_subscriptions_per_client: 100,
            max_inflight: 64,
            max_queued_messages: 10_000,
            max_connections: 100_000,
            connect_timeout_ms: 10_000,
            max_keep_alive_seconds: 0,
            max_session_expiry_seconds: 604_800,
            topic_alias_maximum: 64,
            max_client_id_length: 256,
            max_retained: 100_000,
            sync_interval_ms: 1000,
            auth_backoff_after_failures: 3,
            auth_backoff_initial_ms: 250,
            auth_backoff_max_ms: 10_000,
        }
    }
}

/// `[mqtt.tcp]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpListenerConfig {
    /// Listen. Default true.
    pub enabled: bool,
    /// Address. Default `0.0.0.0:1883`.
    pub listen: SocketAddr,
}

impl Default for TcpListenerConfig {
    fn default() -> Self {
        TcpListenerConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
        }
    }
}

/// `[mqtt.tls]` and `[mqtt.quic]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsListenerConfig {
    /// Listen. Default false.
    pub enabled: bool,
    /// Address (UDP for QUIC). Default `0.0.0.0:8883` (TLS), `0.0.0.0:14567` (QUIC).
    pub listen: SocketAddr,
    /// Server certificate chain, PEM. Required when enabled.
    pub cert: Option<PathBuf>,
    /// Server private key, PEM. Required when enabled.
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates are verified against. When
    /// set, clients may present a certificate and the auth plugin sees its
    /// SHA-256 thumbprint and common name.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a valid certificate. Default false.
    pub require_client_cert: bool,
}

/// `[mqtt.ws]`: MQTT over WebSockets (RFC 6455, subprotocol `mqtt`), plain.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsListenerConfig {
    /// Listen. Default false.
    pub enabled: bool,
    /// Address. Default `0.0.0.0:8083`.
    pub listen: SocketAddr,
    /// Request paths upgraded to MQTT. Default `["/mqtt",
    /// "/$iothub/websocket"]` (the second is the IoT Hub device SDKs').
    pub paths: Vec<String>,
    /// Connections whose upgrade is in progress (TLS handshake and HTTP
    /// request head not finished), at most; a quarter of them is kept for
    /// client addresses with none in progress. More are answered 503.
    /// Default 1024.
    pub max_handshakes: usize,
    /// Upgrades in progress from one client address (an IPv6 client: its
    /// /64), at most; more are answered 429. Default 64.
    pub max_handshakes_per_ip: usize,
}

impl Default for WsListenerConfig {
    fn default() -> Self {
        WsListenerConfig {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 8083)),
            paths: default_ws_paths(),
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_ip: DEFAULT_MAX_HANDSHAKES_PER_IP,
        }
    }
}

const DEFAULT_MAX_HANDSHAKES: usize = 1024;
const DEFAULT_MAX_HANDSHAKES_PER_IP: usize = 64;

fn default_ws_paths() -> Vec<String> {
    vec!["/mqtt".to_string(), "/$iothub/websocket".to_string()]
}

/// `[mqtt.wss]`: MQTT over WebSockets over TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WssListenerConfig {
    /// Listen. Default false.
    pub enabled: bool,
    /// Address. Default `0.0.0.0:8084`.
    pub listen: SocketAddr,
    /// Request paths upgraded to MQTT, as for `[mqtt.ws]`.
    pub paths: Vec<String>,
    /// Upgrades in progress at most, as for `[mqtt.ws]`. Default 1024.
    pub max_handshakes: usize,
    /// Upgrades in progress from one client address at most, as for
    /// `[mqtt.ws]`. Default 64.
    pub max_handshakes_per_ip: usize,
    /// Server certificate chain, PEM. Required when enabled.
    pub cert: Option<PathBuf>,
    /// Server private key, PEM. Required when enabled.
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) for client certificates, as for `[mqtt.tls]`.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a valid certificate. Default false.
    pub require_client_cert: bool,
}

impl Default for WssListenerConfig {
    fn default() -> Self {
        WssListenerConfig {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 8084)),
            paths: default_ws_paths(),
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_ip: DEFAULT_MAX_HANDSHAKES_PER_IP,
            cert: None,
            key: None,
            client_ca: None,
            require_client_cert: false,
        }
    }
}

impl WssListenerConfig {
    /// The TLS part, as a TLS listener's.
    pub fn tls(&self) -> TlsListenerConfig {
        TlsListenerConfig {
            enabled: self.enabled,
            listen: self.listen,
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: self.client_ca.clone(),
            require_client_cert: self.require_client_cert,
        }
    }
}

/// The QUIC listener's default port (UDP).
const MQTT_QUIC_PORT: u16 = 14567;

/// Reads `[mqtt.quic]`: a table without `listen` gets the QUIC port, not
/// the TLS listener's.
fn quic_listener<'de, D: serde::Deserializer<'de>>(d: D) -> Result<TlsListenerConfig, D::Error> {
    use serde::de::Error as _;
    let mut table = toml::Table::deserialize(d)?;
    table
        .entry("listen")
        .or_insert_with(|| toml::Value::String(format!("0.0.0.0:{MQTT_QUIC_PORT}")));
    TlsListenerConfig::deserialize(toml::Value::Table(table)).map_err(D::Error::custom)
}

/// Reads `[mqtt.wss]`: a table without `listen` gets the WSS port, not
/// the plain WebSocket listener's.
fn wss_listener<'de, D: serde::Deserializer<'de>>(d: D) -> Result<WssListenerConfig, D::Error> {
    use serde::de::Error as _;
    let mut table = toml::Table::deserialize(d)?;
    table
        .entry("listen")
        .or_insert_with(|| toml::Value::String("0.0.0.0:8084".to_string()));
    WssListenerConfig::deserialize(toml::Value::Table(table)).map_err(D::Error::custom)
}

impl TlsListenerConfig {
    fn with_port(port: u16) -> Self {
        TlsListenerConfig {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], port)),
            cert: None,
            key: None,
            client_ca: None,
            require_client_cert: false,
        }
    }
}

impl Default for TlsListenerConfig {
    fn default() -> Self {
        Self::with_port(8883)
    }
}

impl MqttConfig {
    /// Checks the values; on error the key at fault and why.
    ///
    /// # Errors
    /// A value out of range.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let m = self;
        if !(64..=268_435_455).contains(&m.max_packet_size) {
            return Err(("mqtt.max_packet_size".to_string(), "must be 64-268435455".to_string()));
        }
        if !(1..=65_535).contains(&m.max_topic_length) {
            return Err(("mqtt.max_topic_length".to_string(), "must be 1-65535".to_string()));
        }
        if m.max_inflight == 0 {
            return Err(("mqtt.max_inflight".to_string(), "must be 1-65535".to_string()));
        }
        for (key, v) in [
            ("mqtt.max_subscriptions_per_client", m.max_subscriptions_per_client),
            ("mqtt.max_queued_messages", m.max_queued_messages),
            ("mqtt.max_connections", m.max_connections),
            ("mqtt.max_client_id_length", m.max_client_id_length),
        ] {
            if v == 0 {
                return Err((key.to_string(), "must be at least 1".to_string()));
            }
        }
        if m.max_client_id_length > 65_535 {
            return Err(("mqtt.max_client_id_length".to_string(), "must be 1-65535".to_string()));
        }
        if m.connect_timeout_ms < 100 {
            return Err((
                "mqtt.connect_timeout_ms".to_string(),
                "must be at least 100".to_string(),
            ));
        }
        if m.sync_interval_ms < 10 {
            return Err(("mqtt.sync_interval_ms".to_string(), "must be at least 10".to_string()));
        }
        for (name, paths) in [("ws", &m.ws.paths), ("wss", &m.wss.paths)] {
            if paths.is_empty() || paths.iter().any(|p| !p.starts_with('/')) {
                return Err((
                    format!("mqtt.{name}.paths"),
                    "must name at least one path, each starting with /".to_string(),
                ));
            }
        }
        for (key, v) in [
            ("mqtt.ws.max_handshakes", m.ws.max_handshakes),
            ("mqtt.ws.max_handshakes_per_ip", m.ws.max_handshakes_per_ip),
            ("mqtt.wss.max_handshakes", m.wss.max_handshakes),
            ("mqtt.wss.max_handshakes_per_ip", m.wss.max_handshakes_per_ip),
        ] {
            if v == 0 {
                return Err((key.to_string(), "must be at least 1".to_string()));
            }
        }
        let wss = m.wss.tls();
        for (name, l) in [("tls", &m.tls), ("quic", &m.quic), ("wss", &wss)] {
            if l.enabled && (l.cert.is_none() || l.key.is_none()) {
                return Err((
                    format!("mqtt.{name}.cert"),
                    "cert and key are required when the listener is enabled".to_string(),
                ));
            }
            if l.require_client_cert && l.client_ca.is_none() {
                return Err((
                    format!("mqtt.{name}.client_ca"),
                    "is required when require_client_cert is true".to_string(),
                ));
            }
        }
        Ok(())
    }
}
