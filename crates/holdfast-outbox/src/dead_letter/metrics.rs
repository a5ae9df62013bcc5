//! What the dead-letter store counts (`holdfast_dead_letter_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::Reason;
use holdfast_metrics::Registry;

/// Labels carrying why a message was dead-lettered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    /// `router-failure`, `expired`, `upstream-refused`, `quota`.
    reason: &'static str,
}

/// The dead-letter store's metric families.
#[derive(Debug, Clone)]
pub struct DeadLetterMetrics {
    /// `holdfast_dead_letter_messages`
    messages: Gauge,
    /// `holdfast_dead_letter_bytes`
    bytes: Gauge,
    /// `holdfast_dead_letter_total{reason}`
    total: Family<ReasonLabels, Counter>,
    /// `holdfast_dead_letter_evicted_total`
    evicted: Counter,
    /// `holdfast_dead_letter_replayed_total`
    replayed: Counter,
    /// `holdfast_dead_letter_purged_total`
    purged: Counter,
}

impl Default for DeadLetterMetrics {
    /// Families registered nowhere (for tests that do not read them).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

impl DeadLetterMetrics {
    /// Creates the `holdfast_dead_letter_*` families and registers them in `registry`.
    pub fn new(registry: &Registry) -> DeadLetterMetrics {
        let messages = Gauge::default();
        registry.register(
            "dead_letter_messages",
            "Messages kept in the dead-letter store",
            messages.clone(),
        );
        let bytes = Gauge::default();
        registry.register(
            "dead_letter_bytes",
            "Bytes kept in the dead-letter store (stored size)",
            bytes.clone(),
        );
        let total = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "dead_letter",
            "Messages set aside in the dead-letter store, by reason",
            total.clone(),
        );
        // Every reason is shown from the start, at 0.
        for r in Reason::ALL {
            let _ = total.get_or_create(&ReasonLabels { reason: r.as_str() });
        }
        let evicted = Counter::default();
        registry.register(
            "dead_letter_evicted",
            "Dead letters removed, oldest first, to keep within [dead_letter] max_messages and max_bytes",
            evicted.clone(),
        );
        let replayed = Counter::default();
        registry.register(
            "dead_letter_replayed",
            "Dead letters replayed (and removed from the store)",
            replayed.clone(),
        );
        let purged = Counter::default();
        registry.register(
            "dead_letter_purged",
            "Dead letters purged by an operator",
            purged.clone(),
        );
        DeadLetterMetrics {
            messages,
            bytes,
            total,
            evicted,
            replayed,
            purged,
        }
    }

    pub(crate) fn set(&self, messages: u64, bytes: u64) {
        self.messages.set(messages as i64);
        self.bytes.set(bytes as i64);
    }

    pub(crate) fn added(&self, reason: Reason) {
        self.total
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Evictions counted so far.
    pub fn evicted_total(&self) -> u64 {
        self.evicted.get()
    }

    pub(crate) fn evicted(&self, n: u64) {
        self.evicted.inc_by(n);
    }

    pub(crate) fn replayed(&self) {
        self.replayed.inc();
    }

    pub(crate) fn purged(&self, n: u64) {
        self.purged.inc_by(n);
    }
}
