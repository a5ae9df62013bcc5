//! The range cache's metric families (`holdfast_cache_*`): requests and
//! bytes by source, client kind and result, upstream requests and bytes,
//! events, fills in flight, what is stored and what was evicted.
//! [`Counters`](crate::counters::Counters) counts into them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use holdfast_metrics::{EventLabels, Registry};

/// Labels of range cache requests and bytes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLabels {
    /// The source (the cache key's namespace, e.g. `debian`).
    pub(crate) source: String,
    /// Who asked: `client` or `child-cache` (a nested node's cache).
    pub(crate) client: &'static str,
    /// `hit`, `miss`, `partial`, `pass`, `deny`, `not-modified`, `error`.
    pub(crate) result: &'static str,
}

/// Labels of range cache fetches from upstream.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpstreamLabels {
    /// The source.
    pub(crate) source: String,
    /// `origin` or `parent`.
    pub(crate) upstream: &'static str,
}

/// The range cache's metric families.
#[derive(Debug)]
pub struct CacheMetrics {
    /// `holdfast_cache_requests_total{source,client,result}`
    pub(crate) requests: Family<CacheLabels, Counter>,
    /// `holdfast_cache_bytes_total{source,client,result}`: body bytes sent
    /// from stored blocks (`hit`) and from blocks being fetched (`miss`).
    pub(crate) bytes: Family<CacheLabels, Counter>,
    /// `holdfast_cache_upstream_requests_total{source,upstream}`
    pub(crate) upstream_requests: Family<UpstreamLabels, Counter>,
    /// `holdfast_cache_upstream_bytes_total{source,upstream}`
    pub(crate) upstream_bytes: Family<UpstreamLabels, Counter>,
    /// `holdfast_cache_fills_in_flight`
    pub(crate) fills: Gauge,
    /// `holdfast_cache_stored_bytes`
    stored_bytes: Gauge,
    /// `holdfast_cache_objects`
    objects: Gauge,
    /// `holdfast_cache_evictions_total`: objects evicted for space.
    evictions: Counter,
    /// `holdfast_cache_evicted_bytes_total`
    evicted_bytes: Counter,
    /// `holdfast_cache_events_total{event}`: invalidations, revalidations,
    /// refused admissions, aborted responses, loops, bad requests.
    pub(crate) events: Family<EventLabels, Counter>,
}

impl Default for CacheMetrics {
    /// Families registered nowhere (for tests that do not read them).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

impl CacheMetrics {
    /// Creates the `holdfast_cache_*` families and registers them in `registry`.
    pub fn new(registry: &Registry) -> CacheMetrics {
        let requests = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Range cache requests by source, client kind and result",
            requests.clone(),
        );
        let bytes = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_bytes",
            "Range cache body bytes sent, from stored blocks (hit) or blocks being fetched (miss)",
            bytes.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "cache_upstream_requests",
            "Requests the range cache sent to the origin or its parent",
            upstream_requests.clone(),
        );
        let upstream_bytes = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "cache_upstream_bytes",
            "Body bytes the range cache received from the origin or its parent",
            upstream_bytes.clone(),
        );
        let fills = Gauge::default();
        registry.register("cache_fills_in_flight", "Upstream fills running", fills.clone());
        let stored_bytes = Gauge::default();
        registry.register(
            "cache_stored_bytes",
            "Bytes of blocks stored by the range cache",
            stored_bytes.clone(),
        );
        let objects = Gauge::default();
        registry.register("cache_objects", "Objects known to the range cache", objects.clone());
        let evictions = Counter::default();
        registry.register("cache_evictions", "Objects evicted for space", evictions.clone());
        let evicted_bytes = Counter::default();
        registry.register(
            "cache_evicted_bytes",
            "Bytes of blocks evicted for space",
            evicted_bytes.clone(),
        );
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "cache_events",
            "Range cache events: invalidations, revalidations, refused admissions, aborted responses, loops, bad requests",
            events.clone(),
        );
        CacheMetrics {
            requests,
            bytes,
            upstream_requests,
            upstream_bytes,
            fills,
            stored_bytes,
            objects,
            evictions,
            evicted_bytes,
            events,
        }
    }

    /// Sets the stored-bytes gauge.
    pub(crate) fn set_stored_bytes(&self, n: u64) {
        self.stored_bytes.set(n as i64);
    }

    /// Sets the objects gauge.
    pub(crate) fn set_objects(&self, n: usize) {
        self.objects.set(n as i64);
    }

    /// An object of `bytes` evicted for space.
    pub(crate) fn evicted(&self, bytes: u64) {
        self.evictions.inc();
        self.evicted_bytes.inc_by(bytes);
    }
}
