//! What the cache counts: requests and bytes by source and result, events,
//! upstream requests and bytes (the metrics), and the same totals summed
//! over all sources for the status page. The `source` label is capped in
//! number.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use holdfast_metrics::EventLabels;
use holdfast_model::lock;

use crate::metrics::{CacheLabels, CacheMetrics, UpstreamLabels};

/// Most distinct `source` label values; more are counted as `other`.
const MAX_SOURCES: usize = 64;

/// Request and byte totals since start, all sources together (the metrics
/// have them by source; these are summed for the status page).
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) requests: AtomicU64,
    pub(crate) hit_requests: AtomicU64,
    pub(crate) hit_bytes: AtomicU64,
    pub(crate) miss_bytes: AtomicU64,
    pub(crate) upstream_bytes: AtomicU64,
}

/// The cache's counters (see the module docs).
pub(crate) struct Counters {
    metrics: Arc<CacheMetrics>,
    totals: Totals,
    sources: Mutex<BTreeSet<String>>,
}

impl Counters {
    pub(crate) fn new(metrics: Arc<CacheMetrics>) -> Counters {
        Counters {
            metrics,
            totals: Totals::default(),
            sources: Mutex::new(BTreeSet::new()),
        }
    }

    /// A fill started (`holdfast_cache_fills_in_flight`).
    pub(crate) fn fill_started(&self) {
        self.metrics.fills.inc();
    }

    /// A fill ended.
    pub(crate) fn fill_ended(&self) {
        self.metrics.fills.dec();
    }

    /// Fills running.
    pub(crate) fn fills_in_flight(&self) -> i64 {
        self.metrics.fills.get()
    }

    pub(crate) fn totals(&self) -> &Totals {
        &self.totals
    }

    /// Counts an event (`holdfast_cache_events_total{event}`).
    pub(crate) fn event(&self, event: &'static str) {
        self.metrics.events.get_or_create(&EventLabels { event }).inc();
    }

    /// Counts a request by its result (`hit`, `miss`, `partial`, `pass`,
    /// `denied`, `error`, …).
    pub(crate) fn request(&self, source: &str, client: &'static str, result: &'static str) {
        self.metrics
            .requests
            .get_or_create(&CacheLabels {
                source: source.to_string(),
                client,
                result,
            })
            .inc();
        if matches!(result, "hit" | "miss" | "partial") {
            self.totals.requests.fetch_add(1, Ordering::Relaxed);
        }
        if result == "hit" {
            self.totals.hit_requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts bytes sent to a client from storage (`hit`) and from fills
    /// (`miss`).
    pub(crate) fn served(&self, source: &str, client: &'static str, hit: u64, miss: u64) {
        for (result, n) in [("hit", hit), ("miss", miss)] {
            if n > 0 {
                self.metrics
                    .bytes
                    .get_or_create(&CacheLabels {
                        source: source.to_string(),
                        client,
                        result,
                    })
                    .inc_by(n);
            }
        }
        self.totals.hit_bytes.fetch_add(hit, Ordering::Relaxed);
        self.totals.miss_bytes.fetch_add(miss, Ordering::Relaxed);
    }

    /// Counts one request sent upstream.
    pub(crate) fn upstream_request(&self, labels: &UpstreamLabels) {
        self.metrics.upstream_requests.get_or_create(labels).inc();
    }

    /// Counts body bytes a fill received from upstream.
    pub(crate) fn upstream_bytes(&self, labels: &UpstreamLabels, n: u64) {
        self.metrics.upstream_bytes.get_or_create(labels).inc_by(n);
        self.totals.upstream_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// The `source` label for a key: its namespace before `:`, capped in
    /// number.
    pub(crate) fn source_label(&self, key: &str) -> String {
        let name = key.split_once(':').map_or("default", |(n, _)| n);
        let name: String = name.chars().take(40).collect();
        let mut s = lock(&self.sources);
        if s.contains(&name) {
            return name;
        }
        if s.len() >= MAX_SOURCES {
            return "other".into();
        }
        s.insert(name.clone());
        name
    }
}
