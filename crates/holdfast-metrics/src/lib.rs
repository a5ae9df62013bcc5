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

/// Labels of messages a router plugin dropped: the reason it gave.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouterDropLabels {
    /// The plugin's reason, cleaned up (see `Broker::count_router_drop`).
    pub reason: String,
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

/// Labels of range cache requests and bytes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// The source (the cache key's namespace, e.g. `debian`).
    pub source: String,
    /// Who asked: `client` or `child-cache` (a nested node's cache).
    pub client: &'static str,
    /// `hit`, `miss`, `partial`, `pass`, `deny`, `not-modified`, `error`.
    pub result: &'static str,
}

/// Labels of range cache fetches from upstream.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheUpstreamLabels {
    /// The source.
    pub source: String,
    /// `origin` or `parent`.
    pub upstream: &'static str,
}

/// Labels carrying an MQTT QoS.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QosLabels {
    /// 0, 1 or 2.
    pub qos: u8,
}

/// Labels of routed messages.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// `upstream` or `local`.
    pub action: &'static str,
}

/// Labels of MQTT connections by transport.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `tcp`, `tls` or `quic`.
    pub transport: &'static str,
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
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).register(name, help, metric);
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
    /// `holdfast_mqtt_connections{transport}`: connected MQTT clients.
    pub mqtt_connections: Family<TransportLabels, Gauge>,
    /// `holdfast_mqtt_sessions`: sessions kept (connected or persistent).
    pub mqtt_sessions: Gauge,
    /// `holdfast_mqtt_retained_messages`
    pub mqtt_retained: Gauge,
    /// `holdfast_mqtt_connects_total{result}`
    pub mqtt_connects: Family<ResultLabels, Counter>,
    /// `holdfast_mqtt_disconnects_total{reason}`
    pub mqtt_disconnects: Family<ReasonLabels, Counter>,
    /// `holdfast_mqtt_bad_packets_total{reason}`: malformed input and protocol errors.
    pub mqtt_bad_packets: Family<ReasonLabels, Counter>,
    /// `holdfast_mqtt_messages_received_total{qos}`
    pub mqtt_received: Family<QosLabels, Counter>,
    /// `holdfast_mqtt_messages_sent_total{qos}`
    pub mqtt_sent: Family<QosLabels, Counter>,
    /// `holdfast_mqtt_messages_routed_total{action}`
    pub mqtt_routed: Family<ActionLabels, Counter>,
    /// `holdfast_mqtt_messages_dropped_total{reason}`
    pub mqtt_dropped: Family<ReasonLabels, Counter>,
    /// `holdfast_mqtt_denied_total{reason}`: PUBLISH/SUBSCRIBE refused by authorization or limits.
    pub mqtt_denied: Family<ReasonLabels, Counter>,
    /// Messages the router plugin dropped, by the reason it gave.
    pub router_drops: Family<RouterDropLabels, Counter>,
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
    /// `holdfast_mqtt_auth_delayed_total`: CONNECTs held back by the per-source auth back-off.
    pub mqtt_auth_delayed: Counter,
    /// `holdfast_mqtt_revoked_total`: connections closed because their credentials were revoked.
    pub mqtt_revoked: Counter,
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
    /// `holdfast_cache_requests_total{source,client,result}`
    pub cache_requests: Family<CacheLabels, Counter>,
    /// `holdfast_cache_bytes_total{source,client,result}`: body bytes sent
    /// from stored blocks (`hit`) and from blocks being fetched (`miss`).
    pub cache_bytes: Family<CacheLabels, Counter>,
    /// `holdfast_cache_upstream_requests_total{source,upstream}`
    pub cache_upstream_requests: Family<CacheUpstreamLabels, Counter>,
    /// `holdfast_cache_upstream_bytes_total{source,upstream}`
    pub cache_upstream_bytes: Family<CacheUpstreamLabels, Counter>,
    /// `holdfast_cache_fills_in_flight`
    pub cache_fills: Gauge,
    /// `holdfast_cache_stored_bytes`
    pub cache_stored_bytes: Gauge,
    /// `holdfast_cache_objects`
    pub cache_objects: Gauge,
    /// `holdfast_cache_evictions_total`: objects evicted for space.
    pub cache_evictions: Counter,
    /// `holdfast_cache_evicted_bytes_total`
    pub cache_evicted_bytes: Counter,
    /// `holdfast_cache_events_total{event}`: invalidations, revalidations,
    /// refused admissions, aborted responses, loops, bad requests.
    pub cache_events: Family<EventLabels, Counter>,
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
        let mqtt_connections = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "mqtt_connections",
            "Connected MQTT clients, by transport",
            mqtt_connections.clone(),
        );
        let mqtt_sessions = Gauge::default();
        registry.register(
            "mqtt_sessions",
            "MQTT sessions kept (connected, or persistent and waiting)",
            mqtt_sessions.clone(),
        );
        let mqtt_retained = Gauge::default();
        registry.register("mqtt_retained_messages", "Retained messages", mqtt_retained.clone());
        let mqtt_connects = Family::<ResultLabels, Counter>::default();
        registry.register(
            "mqtt_connects",
            "CONNECT attempts, by result (accepted or the refusal reason)",
            mqtt_connects.clone(),
        );
        let mqtt_disconnects = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mqtt_disconnects",
            "MQTT connections ended, by reason",
            mqtt_disconnects.clone(),
        );
        let mqtt_bad_packets = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mqtt_bad_packets",
            "Connections closed for malformed packets or protocol errors, by reason",
            mqtt_bad_packets.clone(),
        );
        let mqtt_received = Family::<QosLabels, Counter>::default();
        registry.register(
            "mqtt_messages_received",
            "PUBLISH packets received from clients, by QoS",
            mqtt_received.clone(),
        );
        let mqtt_sent = Family::<QosLabels, Counter>::default();
        registry.register(
            "mqtt_messages_sent",
            "PUBLISH packets sent to clients, by QoS",
            mqtt_sent.clone(),
        );
        let mqtt_routed = Family::<ActionLabels, Counter>::default();
        registry.register(
            "mqtt_messages_routed",
            "Router actions taken on received messages: upstream (outbox) or local delivery",
            mqtt_routed.clone(),
        );
        let mqtt_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mqtt_messages_dropped",
            "Messages dropped, by reason (router drop, no route, queue full, expired, too large, ...)",
            mqtt_dropped.clone(),
        );
        let mqtt_denied = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mqtt_denied",
            "PUBLISH and SUBSCRIBE refused by authorization or limits, by reason",
            mqtt_denied.clone(),
        );
        let router_drops = Family::<RouterDropLabels, Counter>::default();
        registry.register(
            "router_drops",
            "Messages the router plugin dropped, by the reason it gave (at most 64 reasons; more count as other)",
            router_drops.clone(),
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
        let mqtt_auth_delayed = Counter::default();
        registry.register(
            "mqtt_auth_delayed",
            "CONNECTs held back by the per-source authentication back-off",
            mqtt_auth_delayed.clone(),
        );
        let mqtt_revoked = Counter::default();
        registry.register(
            "mqtt_revoked",
            "Connections closed because their credentials were revoked",
            mqtt_revoked.clone(),
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
        let cache_requests = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Range cache requests by source, client kind and result",
            cache_requests.clone(),
        );
        let cache_bytes = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_bytes",
            "Range cache body bytes sent, from stored blocks (hit) or blocks being fetched (miss)",
            cache_bytes.clone(),
        );
        let cache_upstream_requests = Family::<CacheUpstreamLabels, Counter>::default();
        registry.register(
            "cache_upstream_requests",
            "Requests the range cache sent to the origin or its parent",
            cache_upstream_requests.clone(),
        );
        let cache_upstream_bytes = Family::<CacheUpstreamLabels, Counter>::default();
        registry.register(
            "cache_upstream_bytes",
            "Body bytes the range cache received from the origin or its parent",
            cache_upstream_bytes.clone(),
        );
        let cache_fills = Gauge::default();
        registry.register("cache_fills_in_flight", "Upstream fills running", cache_fills.clone());
        let cache_stored_bytes = Gauge::default();
        registry.register(
            "cache_stored_bytes",
            "Bytes of blocks stored by the range cache",
            cache_stored_bytes.clone(),
        );
        let cache_objects = Gauge::default();
        registry.register(
            "cache_objects",
            "Objects known to the range cache",
            cache_objects.clone(),
        );
        let cache_evictions = Counter::default();
        registry.register("cache_evictions", "Objects evicted for space", cache_evictions.clone());
        let cache_evicted_bytes = Counter::default();
        registry.register(
            "cache_evicted_bytes",
            "Bytes of blocks evicted for space",
            cache_evicted_bytes.clone(),
        );
        let cache_events = Family::<EventLabels, Counter>::default();
        registry.register(
            "cache_events",
            "Range cache events: invalidations, revalidations, refused admissions, aborted responses, loops, bad requests",
            cache_events.clone(),
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
            mqtt_connections,
            mqtt_sessions,
            mqtt_retained,
            mqtt_connects,
            mqtt_disconnects,
            mqtt_bad_packets,
            mqtt_received,
            mqtt_sent,
            mqtt_routed,
            mqtt_dropped,
            mqtt_denied,
            router_drops,
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
            mqtt_auth_delayed,
            mqtt_revoked,
            registry_identities,
            registry_syncs,
            iothub_events,
            deploy_events,
            deploy_component_bytes,
            cache_requests,
            cache_bytes,
            cache_upstream_requests,
            cache_upstream_bytes,
            cache_fills,
            cache_stored_bytes,
            cache_objects,
            cache_evictions,
            cache_evicted_bytes,
            cache_events,
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
