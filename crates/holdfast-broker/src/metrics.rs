//! What the broker counts (`holdfast_mqtt_*`, `holdfast_router_drops_total`):
//! the families, handles taken once for the hot paths, drop and denial
//! reasons, and the router plugin's drop reasons (bounded).

use std::collections::HashSet;
use std::sync::Mutex;

use holdfast_metrics::{ReasonLabels, Registry, ResultLabels, handle};
use holdfast_mqtt::QoS;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// Labels carrying an MQTT QoS.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QosLabels {
    /// 0, 1 or 2.
    qos: u8,
}

/// Labels of routed messages.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    /// `upstream` or `local`.
    action: &'static str,
}

/// Labels of MQTT connections by transport.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    /// `tcp`, `tls` or `quic`.
    transport: &'static str,
}

/// Labels of messages a router plugin dropped: the reason it gave.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouterDropLabels {
    /// The plugin's reason, cleaned up (see [`BrokerMetrics::router_drop`]).
    reason: String,
}

/// The broker's metric families, and the handles its hot paths hold.
#[derive(Debug)]
pub struct BrokerMetrics {
    /// `holdfast_mqtt_connections{transport}`: connected MQTT clients.
    connections: Family<TransportLabels, Gauge>,
    /// `holdfast_mqtt_sessions`: sessions kept (connected or persistent).
    sessions: Gauge,
    /// `holdfast_mqtt_retained_messages`
    retained: Gauge,
    /// `holdfast_mqtt_connects_total{result}`
    connects: Family<ResultLabels, Counter>,
    /// `holdfast_mqtt_disconnects_total{reason}`
    disconnects: Family<ReasonLabels, Counter>,
    /// `holdfast_mqtt_bad_packets_total{reason}`: malformed input and protocol errors.
    bad_packets: Family<ReasonLabels, Counter>,
    /// `holdfast_mqtt_messages_dropped_total{reason}`
    dropped: Family<ReasonLabels, Counter>,
    /// `holdfast_mqtt_denied_total{reason}`: PUBLISH/SUBSCRIBE refused by authorization or limits.
    denied: Family<ReasonLabels, Counter>,
    /// `holdfast_router_drops_total{reason}`: messages the router plugin
    /// dropped, by the reason it gave.
    router_drops: Family<RouterDropLabels, Counter>,
    /// `holdfast_mqtt_auth_delayed_total`: CONNECTs held back by the per-source auth back-off.
    auth_delayed: Counter,
    /// `holdfast_mqtt_revoked_total`: connections closed because their credentials were revoked.
    revoked: Counter,
    /// `holdfast_mqtt_messages_received_total{qos}`, by QoS.
    received: [Counter; 3],
    /// `holdfast_mqtt_messages_sent_total{qos}`, by QoS.
    sent: [Counter; 3],
    /// `holdfast_mqtt_messages_routed_total{action="upstream"}`
    routed_upstream: Counter,
    /// `holdfast_mqtt_messages_routed_total{action="local"}`
    routed_local: Counter,
    /// Router drop reasons seen (bounded; see [`BrokerMetrics::router_drop`]).
    drop_reasons: Mutex<HashSet<String>>,
}

impl Default for BrokerMetrics {
    /// Families registered nowhere (for tests that do not read them).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

impl BrokerMetrics {
    /// Creates the broker's families, registers them in `registry` and
    /// takes the hot paths' handles.
    pub fn new(registry: &Registry) -> BrokerMetrics {
        let connections = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "mqtt_connections",
            "Connected MQTT clients, by transport",
            connections.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "mqtt_sessions",
            "MQTT sessions kept (connected, or persistent and waiting)",
            sessions.clone(),
        );
        let retained = Gauge::default();
        registry.register("mqtt_retained_messages", "Retained messages", retained.clone());
        let connects = Family::<ResultLabels, Counter>::default();
        registry.register(
            "mqtt_connects",
            "CONNECT attempts, by result (accepted or the refusal reason)",
            connects.clone(),
        );
        let disconnects = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mqtt_disconnects",
            "MQTT connections ended, by reason",
            disconnects.clone(),
        );
        let bad_packets = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mqtt_bad_packets",
            "Connections closed for malformed packets or protocol errors, by reason",
            bad_packets.clone(),
        );
        let received = Family::<QosLabels, Counter>::default();
        registry.register(
            "mqtt_messages_received",
            "PUBLISH packets received from clients, by QoS",
            received.clone(),
        );
        let sent = Family::<QosLabels, Counter>::default();
        registry.register(
            "mqtt_messages_sent",
            "PUBLISH packets sent to clients, by QoS",
            sent.clone(),
        );
        let routed = Family::<ActionLabels, Counter>::default();
        registry.register(
            "mqtt_messages_routed",
            "Router actions taken on received messages: upstream (outbox) or local delivery",
            routed.clone(),
        );
        let dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mqtt_messages_dropped",
            "Messages dropped, by reason (router drop, no route, queue full, expired, too large, ...)",
            dropped.clone(),
        );
        let denied = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mqtt_denied",
            "PUBLISH and SUBSCRIBE refused by authorization or limits, by reason",
            denied.clone(),
        );
        let router_drops = Family::<RouterDropLabels, Counter>::default();
        registry.register(
            "router_drops",
            "Messages the router plugin dropped, by the reason it gave (at most 64 reasons; more count as other)",
            router_drops.clone(),
        );
        let auth_delayed = Counter::default();
        registry.register(
            "mqtt_auth_delayed",
            "CONNECTs held back by the per-source authentication back-off",
            auth_delayed.clone(),
        );
        let revoked = Counter::default();
        registry.register(
            "mqtt_revoked",
            "Connections closed because their credentials were revoked",
            revoked.clone(),
        );
        let q = |f, qos| handle(f, &QosLabels { qos });
        BrokerMetrics {
            received: [q(&received, 0), q(&received, 1), q(&received, 2)],
            sent: [q(&sent, 0), q(&sent, 1), q(&sent, 2)],
            routed_upstream: handle(&routed, &ActionLabels { action: "upstream" }),
            routed_local: handle(&routed, &ActionLabels { action: "local" }),
            drop_reasons: Mutex::default(),
            connections,
            sessions,
            retained,
            connects,
            disconnects,
            bad_packets,
            dropped,
            denied,
            router_drops,
            auth_delayed,
            revoked,
        }
    }

    /// The gauge of clients connected over `transport`.
    pub(crate) fn connections(&self, transport: &'static str) -> Gauge {
        handle(&self.connections, &TransportLabels { transport })
    }

    /// Sets the number of sessions kept.
    pub(crate) fn set_sessions(&self, n: usize) {
        self.sessions.set(n as i64);
    }

    /// Sets the number of retained messages.
    pub(crate) fn set_retained(&self, n: usize) {
        self.retained.set(n as i64);
    }

    /// A connection closed on a packet that could not be decoded, by reason.
    pub(crate) fn bad_packet(&self, reason: &'static str) {
        handle(&self.bad_packets, &ReasonLabels { reason }).inc();
    }

    /// A connection ended, by reason.
    pub(crate) fn disconnected(&self, reason: &'static str) {
        handle(&self.disconnects, &ReasonLabels { reason }).inc();
    }

    /// A CONNECT held back by the per-source authentication back-off.
    pub(crate) fn auth_delayed(&self) {
        self.auth_delayed.inc();
    }

    /// A connection closed because its credentials were revoked.
    pub(crate) fn revoked(&self) {
        self.revoked.inc();
    }

    /// PUBLISH packets received from clients and sent to them, since start.
    pub(crate) fn message_totals(&self) -> (u64, u64) {
        (
            self.received.iter().map(Counter::get).sum(),
            self.sent.iter().map(Counter::get).sum(),
        )
    }

    /// A PUBLISH received at `qos`.
    pub(crate) fn received(&self, qos: QoS) {
        self.received[qos as usize].inc();
    }

    /// A PUBLISH sent at `qos`.
    pub(crate) fn sent(&self, qos: QoS) {
        self.sent[qos as usize].inc();
    }

    /// A message routed upstream (appended to the outbox).
    pub(crate) fn routed_upstream(&self) {
        self.routed_upstream.inc();
    }

    /// A message routed to local subscribers.
    pub(crate) fn routed_local(&self) {
        self.routed_local.inc();
    }

    /// A message dropped, by reason.
    pub(crate) fn dropped(&self, reason: &'static str) {
        self.dropped_n(reason, 1);
    }

    /// `n` messages dropped, by reason.
    pub(crate) fn dropped_n(&self, reason: &'static str, n: u64) {
        handle(&self.dropped, &ReasonLabels { reason }).inc_by(n);
    }

    /// A publish, subscription or retained message refused, by reason.
    pub(crate) fn denied(&self, reason: &'static str) {
        handle(&self.denied, &ReasonLabels { reason }).inc();
    }

    /// A connection attempt's result (CONNECT, or a TLS handshake that failed).
    pub(crate) fn connect(&self, result: &'static str) {
        handle(&self.connects, &ResultLabels { result }).inc();
    }

    /// Counts a router drop by the plugin's reason. Reasons are plugin
    /// data: cut to 64 characters of `[a-z0-9_.-]` (others become `_`), and
    /// after 64 distinct ones, counted as `other`.
    pub(crate) fn router_drop(&self, reason: &str) {
        let mut clean: String = reason
            .chars()
            .take(64)
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if clean.is_empty() {
            clean.push_str("unspecified");
        }
        {
            let mut seen = holdfast_model::lock(&self.drop_reasons);
            if !seen.contains(&clean) {
                if seen.len() >= 64 {
                    clean = "other".to_string();
                } else {
                    seen.insert(clean.clone());
                }
            }
        }
        self.router_drops
            .get_or_create(&RouterDropLabels { reason: clean })
            .inc();
    }
}
