//! What the link counts (`holdfast_link_*`): the upstream link's state,
//! attempts, losses and early wake-ups, messages and bytes sent and
//! acknowledged, time throttled; children connected, messages received
//! from them and refusals; what a root does with its outbox.

use holdfast_metrics::{Counter, Family, Gauge, ReasonLabels, Registry, ResultLabels};

/// The link's metric families.
#[derive(Debug)]
pub struct LinkMetrics {
    /// `holdfast_link_up`: 1 while the upstream link is connected (always 1 at a root).
    pub(crate) link_up: Gauge,
    /// `holdfast_link_connects_total{result}`: upstream connection attempts.
    pub(crate) link_connects: Family<ResultLabels, Counter>,
    /// `holdfast_link_disconnects_total{reason}`: established upstream links lost.
    pub(crate) link_disconnects: Family<ReasonLabels, Counter>,
    /// `holdfast_link_wakeups_total{reason}`: reconnects started before the back-off
    /// timer because the parent answered a probe or the network changed.
    pub(crate) link_wakeups: Family<ReasonLabels, Counter>,
    /// `holdfast_link_messages_sent_total`: messages sent upstream (resends included).
    pub(crate) link_sent: Counter,
    /// `holdfast_link_messages_acked_total`: messages the upstream acknowledged.
    pub(crate) link_acked: Counter,
    /// `holdfast_link_batch_bytes_total`: bytes of the batches sent upstream
    /// before compression (record lengths and records).
    pub(crate) link_batch_bytes: Counter,
    /// `holdfast_link_wire_bytes_total`: bytes of the batch frames written to
    /// the upstream link (compressed when the link compresses).
    pub(crate) link_wire_bytes: Counter,
    /// `holdfast_link_throttled_seconds_total`: time senders waited for the
    /// upstream byte-rate cap.
    pub(crate) link_throttled_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// `holdfast_link_children`: connected child gateways.
    pub(crate) link_children: Gauge,
    /// `holdfast_link_messages_received_total`: messages stored from child gateways.
    pub(crate) link_received: Counter,
    /// `holdfast_link_refused_total{reason}`: child connections and frames refused.
    pub(crate) link_refused: Family<ReasonLabels, Counter>,
    /// `holdfast_link_root_messages_total{result}`: what a root did with messages
    /// reaching its outbox (delivered, already-delivered, no-broker).
    pub(crate) link_root: Family<ResultLabels, Counter>,
    /// `holdfast_link_upstream_duplicates_total`: sends the upstream recognised
    /// as duplicates of what it already stored (JetStream's de-duplication).
    pub(crate) link_duplicates: Counter,
    /// `holdfast_link_dedup_window_seconds`: the JetStream stream's
    /// de-duplication window, read at connect.
    pub(crate) link_dedup_window: Gauge,
    /// `holdfast_link_c2d_messages_total{result}`: cloud-to-device messages taken
    /// from the upstream's durable consumer (stored, refused, retried).
    pub(crate) link_c2d: Family<ResultLabels, Counter>,
}

impl Default for LinkMetrics {
    /// Families registered nowhere (for tests that do not read them).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

impl LinkMetrics {
    /// Creates the `holdfast_link_*` families and registers them in `registry`.
    pub fn new(registry: &Registry) -> LinkMetrics {
        let link_up = Gauge::default();
        registry.register(
            "link_up",
            "1 while the upstream link is connected (always 1 at a root)",
            link_up.clone(),
        );
        let link_connects = Family::<ResultLabels, Counter>::default();
        registry.register(
            "link_connects",
            "Upstream connection attempts, by result",
            link_connects.clone(),
        );
        let link_disconnects = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "link_disconnects",
            "Established upstream links lost, by reason",
            link_disconnects.clone(),
        );
        let link_wakeups = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "link_wakeups",
            "Reconnects started early: the parent answered a probe, or the network changed",
            link_wakeups.clone(),
        );
        let link_sent = Counter::default();
        registry.register(
            "link_messages_sent",
            "Messages sent upstream, resends included",
            link_sent.clone(),
        );
        let link_acked = Counter::default();
        registry.register(
            "link_messages_acked",
            "Messages the upstream acknowledged",
            link_acked.clone(),
        );
        let link_batch_bytes = Counter::default();
        registry.register(
            "link_batch_bytes",
            "Bytes of the batches sent upstream before compression",
            link_batch_bytes.clone(),
        );
        let link_wire_bytes = Counter::default();
        registry.register(
            "link_wire_bytes",
            "Bytes of the batch frames written to the upstream link",
            link_wire_bytes.clone(),
        );
        let link_throttled_seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "link_throttled_seconds",
            "Time senders waited for the upstream byte-rate cap",
            link_throttled_seconds.clone(),
        );
        let link_children = Gauge::default();
        registry.register("link_children", "Connected child gateways", link_children.clone());
        let link_received = Counter::default();
        registry.register(
            "link_messages_received",
            "Messages stored from child gateways",
            link_received.clone(),
        );
        let link_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "link_refused",
            "Child connections and frames refused, by reason",
            link_refused.clone(),
        );
        let link_root = Family::<ResultLabels, Counter>::default();
        registry.register(
            "link_root_messages",
            "Messages reaching a root's outbox, by what was done with them",
            link_root.clone(),
        );
        let link_duplicates = Counter::default();
        registry.register(
            "link_upstream_duplicates",
            "Sends the upstream recognised as duplicates of what it had stored (JetStream de-duplication)",
            link_duplicates.clone(),
        );
        let link_dedup_window = Gauge::default();
        registry.register(
            "link_dedup_window_seconds",
            "The JetStream stream's de-duplication window, read at connect",
            link_dedup_window.clone(),
        );
        let link_c2d = Family::<ResultLabels, Counter>::default();
        registry.register(
            "link_c2d_messages",
            "Cloud-to-device messages taken from the upstream's durable consumer, by result",
            link_c2d.clone(),
        );
        LinkMetrics {
            link_duplicates,
            link_dedup_window,
            link_c2d,
            link_up,
            link_connects,
            link_disconnects,
            link_wakeups,
            link_sent,
            link_acked,
            link_batch_bytes,
            link_wire_bytes,
            link_throttled_seconds,
            link_children,
            link_received,
            link_refused,
            link_root,
        }
    }
}
