//! Prometheus metrics, exposed at `/metrics` of the admin listener.
//!
//! Every subsystem registers its families here. Hot paths hold cloned
//! handles (an `Arc` to the atomic) instead of looking labels up per event.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Metric;

/// Labels of admin requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// HTTP status code.
    pub code: u16,
}

/// Labels of events counted by outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `accepted`, or why not.
    pub result: &'static str,
}

/// Labels of events counted by reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

/// Labels of events counted by kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// What happened.
    pub event: &'static str,
}

/// Labels of the build-info gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// Crate version.
    pub version: String,
}

/// The node's one metric registry: every crate registers its own families
/// here (each crate's metrics struct takes a `&Registry` in its
/// constructor), and the admin listener serves [`Registry::render`] at
/// `/metrics`. Names get the `holdfast_` prefix.
pub struct Registry {
    inner: Mutex<prometheus_client::registry::Registry>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry whose metric names start with `holdfast_`.
    pub fn new() -> Registry {
        Registry {
            inner: Mutex::new(prometheus_client::registry::Registry::with_prefix("holdfast")),
        }
    }

    /// Registers `metric` (a counter, gauge, histogram or family of them,
    /// whose clones share its value) as `holdfast_<name>` with `help`.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(name, help, metric);
    }

    /// Renders every registered family in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// The metric for `labels` in `family`, as an owned handle.
///
/// `Family::get_or_create` returns a read guard. Taking a second metric from
/// the same family while one is alive (e.g. two in one struct literal)
/// deadlocks when the second must be created. This drops the guard before
/// returning.
pub fn handle<L, M, C>(family: &Family<L, M, C>, labels: &L) -> M
where
    L: Clone + std::hash::Hash + Eq,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    family.get_or_create(labels).clone()
}

/// All metric families.
pub struct Metrics {
    registry: Registry,
    /// `holdfast_admin_requests_total{code}`
    pub admin_requests: Family<StatusLabels, Counter>,
    /// `holdfast_link_up`: 1 while the upstream link is connected (always 1 at a root).
    pub link_up: Gauge,
    /// `holdfast_link_connects_total{result}`: upstream connection attempts.
    pub link_connects: Family<ResultLabels, Counter>,
    /// `holdfast_link_disconnects_total{reason}`: established upstream links lost.
    pub link_disconnects: Family<ReasonLabels, Counter>,
    /// `holdfast_link_wakeups_total{reason}`: reconnects started before the back-off
    /// timer because the parent answered a probe or the network changed.
    pub link_wakeups: Family<ReasonLabels, Counter>,
    /// `holdfast_link_messages_sent_total`: messages sent upstream (resends included).
    pub link_sent: Counter,
    /// `holdfast_link_messages_acked_total`: messages the upstream acknowledged.
    pub link_acked: Counter,
    /// `holdfast_link_batch_bytes_total`: bytes of the batches sent upstream
    /// before compression (record lengths and records).
    pub link_batch_bytes: Counter,
    /// `holdfast_link_wire_bytes_total`: bytes of the batch frames written to
    /// the upstream link (compressed when the link compresses).
    pub link_wire_bytes: Counter,
    /// `holdfast_link_throttled_seconds_total`: time senders waited for the
    /// upstream byte-rate cap.
    pub link_throttled_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// `holdfast_link_children`: connected child gateways.
    pub link_children: Gauge,
    /// `holdfast_link_messages_received_total`: messages stored from child gateways.
    pub link_received: Counter,
    /// `holdfast_link_refused_total{reason}`: child connections and frames refused.
    pub link_refused: Family<ReasonLabels, Counter>,
    /// `holdfast_link_root_messages_total{result}`: what a root did with messages
    /// reaching its outbox (delivered, already-delivered, no-broker).
    pub link_root: Family<ResultLabels, Counter>,
    /// `holdfast_registry_identities`: identities this node can authenticate.
    pub registry_identities: Gauge,
    /// `holdfast_registry_syncs_total{result}`: scope syncs sent (`sent-full`, `sent-delta`) and applied (`full`, `delta`, `failed`).
    pub registry_syncs: Family<ResultLabels, Counter>,
    /// `holdfast_iothub_events_total{event}`: twin requests, method calls and
    /// answers, cloud-to-device forwarding, twin and method traffic on the link.
    pub iothub_events: Family<EventLabels, Counter>,
    /// `holdfast_deploy_events_total{event}`: deployments created, applied,
    /// failed, rolled back, refused (signature, hash), waves released, halts.
    pub deploy_events: Family<EventLabels, Counter>,
    /// `holdfast_deploy_component_bytes_total{event}`: component bytes
    /// `sent` to child gateways and `received` from the parent.
    pub deploy_component_bytes: Family<EventLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let registry = Registry::new();
        let admin_requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "admin_requests",
            "Admin API requests, by status code",
            admin_requests.clone(),
        );
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
        let registry_identities = Gauge::default();
        registry.register(
            "registry_identities",
            "Identities this node can authenticate",
            registry_identities.clone(),
        );
        let iothub_events = Family::<EventLabels, Counter>::default();
        registry.register(
            "iothub_events",
            "IoT Hub dialect events: twin requests, method calls and answers, cloud-to-device and link traffic",
            iothub_events.clone(),
        );
        let deploy_events = Family::<EventLabels, Counter>::default();
        registry.register(
            "deploy_events",
            "Fleet deployment events: created, applied, failed, rolled back, refused, waves released, halts",
            deploy_events.clone(),
        );
        let deploy_component_bytes = Family::<EventLabels, Counter>::default();
        registry.register(
            "deploy_component_bytes",
            "Deployment component bytes sent to child gateways and received from the parent",
            deploy_component_bytes.clone(),
        );
        let registry_syncs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "registry_syncs",
            "Scope syncs sent to children and applied from the parent, by result",
            registry_syncs.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("build_info", "Holdfast build information", build_info);
        Metrics {
            registry,
            admin_requests,
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
            registry_identities,
            registry_syncs,
            iothub_events,
            deploy_events,
            deploy_component_bytes,
        }
    }

    /// The registry the families are in, for the crates that register
    /// their own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}
