//! What the broker counts: handles taken once for the hot paths, drop and
//! denial reasons, and the router plugin's drop reasons (bounded).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use holdfast_metrics::{self as metrics, ActionLabels, Metrics, QosLabels, ReasonLabels, ResultLabels};
use holdfast_mqtt::QoS;
use prometheus_client::metrics::counter::Counter;

/// The broker's counters, shared by its parts.
pub(crate) struct BrokerMetrics {
    /// The node's metrics, for the gauges and counters used off the hot path.
    pub(crate) node: Arc<Metrics>,
    received: [Counter; 3],
    sent: [Counter; 3],
    routed_upstream: Counter,
    routed_local: Counter,
    /// Router drop reasons seen (bounded; see [`BrokerMetrics::router_drop`]).
    drop_reasons: Mutex<HashSet<String>>,
}

impl BrokerMetrics {
    /// Takes the broker's handles from the node's metrics.
    pub(crate) fn new(node: Arc<Metrics>) -> BrokerMetrics {
        let q = |f, qos| metrics::handle(f, &QosLabels { qos });
        BrokerMetrics {
            received: [
                q(&node.mqtt_received, 0),
                q(&node.mqtt_received, 1),
                q(&node.mqtt_received, 2),
            ],
            sent: [q(&node.mqtt_sent, 0), q(&node.mqtt_sent, 1), q(&node.mqtt_sent, 2)],
            routed_upstream: metrics::handle(&node.mqtt_routed, &ActionLabels { action: "upstream" }),
            routed_local: metrics::handle(&node.mqtt_routed, &ActionLabels { action: "local" }),
            drop_reasons: Mutex::default(),
            node,
        }
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
        metrics::handle(&self.node.mqtt_dropped, &ReasonLabels { reason }).inc();
    }

    /// A publish, subscription or retained message refused, by reason.
    pub(crate) fn denied(&self, reason: &'static str) {
        metrics::handle(&self.node.mqtt_denied, &ReasonLabels { reason }).inc();
    }

    /// A connection attempt's result (CONNECT, or a TLS handshake that failed).
    pub(crate) fn connect(&self, result: &'static str) {
        metrics::handle(&self.node.mqtt_connects, &ResultLabels { result }).inc();
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
        self.node
            .router_drops
            .get_or_create(&holdfast_metrics::RouterDropLabels { reason: clean })
            .inc();
    }
}
