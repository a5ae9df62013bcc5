//! What the outbox counts, per lane: appends, deliveries, expiries, drops
//! and refusals, the depth gauges, and the group commits
//! (`holdfast_outbox_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicU64;

use crate::LaneStats;
use holdfast_metrics::{Registry, handle};

/// Labels carrying an outbox lane.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabels {
    /// Lane 0-9.
    lane: u8,
}

/// Labels of outbox removals that are not deliveries.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneReasonLabels {
    /// Lane 0-9.
    lane: u8,
    /// Why: `quota`, `disk`, `ttl`, `damaged`, `invalid`.
    reason: &'static str,
}

/// The outbox's metric families.
#[derive(Debug)]
pub struct OutboxMetrics {
    /// `holdfast_outbox_enqueued_total{lane}`
    enqueued: Family<LaneLabels, Counter>,
    /// `holdfast_outbox_delivered_total{lane}`: acknowledged by the upstream and deleted.
    delivered: Family<LaneLabels, Counter>,
    /// `holdfast_outbox_expired_total{lane}`
    expired: Family<LaneLabels, Counter>,
    /// `holdfast_outbox_dropped_total{lane,reason}`: queued messages removed undelivered.
    dropped: Family<LaneReasonLabels, Counter>,
    /// `holdfast_outbox_rejected_total{lane,reason}`: appends refused.
    rejected: Family<LaneReasonLabels, Counter>,
    /// `holdfast_outbox_depth_messages{lane}`
    depth: Family<LaneLabels, Gauge>,
    /// `holdfast_outbox_depth_bytes{lane}`
    bytes: Family<LaneLabels, Gauge>,
    /// `holdfast_outbox_oldest_age_seconds{lane}`
    oldest_age: Family<LaneLabels, Gauge>,
    /// `holdfast_outbox_commits_total`: group commits (one sync each when they hold appends).
    commits: Counter,
    /// `holdfast_outbox_duplicates_total{lane}`: messages a child gateway
    /// sent again that this outbox had stored already (acknowledged, not
    /// stored twice).
    duplicates: Family<LaneLabels, Counter>,
    /// `holdfast_outbox_storage_failed`: 1 while the store refuses writes
    /// (a write or sync failed; it reopens by itself once there is room).
    storage_failed: Gauge,
    /// `holdfast_outbox_storage_failures_total`
    storage_failures: Counter,
    /// `holdfast_outbox_storage_recoveries_total`
    storage_recoveries: Counter,
    /// `holdfast_outbox_space_given_bytes_total`: disk space donors (the
    /// range cache) freed for appends.
    space_given: Counter,
    /// `holdfast_outbox_max_bytes`: the byte quota now (follows the free space).
    max_bytes: Gauge,
    /// `holdfast_outbox_drain_messages_per_second{lane}`: smoothed over about a minute.
    drain_rate: Family<LaneLabels, Gauge<f64, AtomicU64>>,
    /// `holdfast_outbox_time_to_drain_seconds{lane}`: backlog / drain rate; absent
    /// while the lane holds messages and nothing drains.
    time_to_drain: Family<LaneLabels, Gauge<f64, AtomicU64>>,
    /// `holdfast_outbox_stuck{lane}`: 1 while the lane's oldest message has not moved
    /// for `outbox.stuck_after_seconds` with the link up.
    stuck: Family<LaneLabels, Gauge>,
    /// `holdfast_outbox_stuck_episodes_total{lane}`: times the lane became stuck.
    stuck_episodes: Family<LaneLabels, Counter>,
}

impl Default for OutboxMetrics {
    /// Families registered nowhere (for tests that do not read them).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

impl OutboxMetrics {
    /// Creates the `holdfast_outbox_*` families and registers them in `registry`.
    pub fn new(registry: &Registry) -> OutboxMetrics {
        let enqueued = Family::<LaneLabels, Counter>::default();
        registry.register(
            "outbox_enqueued",
            "Messages appended to the outbox, by lane",
            enqueued.clone(),
        );
        let delivered = Family::<LaneLabels, Counter>::default();
        registry.register(
            "outbox_delivered",
            "Messages acknowledged by the upstream and deleted, by lane",
            delivered.clone(),
        );
        let expired = Family::<LaneLabels, Counter>::default();
        registry.register(
            "outbox_expired",
            "Messages removed after their time-to-live",
            expired.clone(),
        );
        let dropped = Family::<LaneReasonLabels, Counter>::default();
        registry.register(
            "outbox_dropped",
            "Queued messages removed undelivered (quota: drop-oldest; damaged: quarantined)",
            dropped.clone(),
        );
        let rejected = Family::<LaneReasonLabels, Counter>::default();
        registry.register(
            "outbox_rejected",
            "Appends refused (quota, disk, invalid)",
            rejected.clone(),
        );
        let depth = Family::<LaneLabels, Gauge>::default();
        registry.register("outbox_depth_messages", "Messages queued, by lane", depth.clone());
        let bytes = Family::<LaneLabels, Gauge>::default();
        registry.register(
            "outbox_depth_bytes",
            "Bytes queued (stored size), by lane",
            bytes.clone(),
        );
        let oldest_age = Family::<LaneLabels, Gauge>::default();
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest queued message on the outbox clock, by lane",
            oldest_age.clone(),
        );
        let commits = Counter::default();
        registry.register("outbox_commits", "Outbox group commits", commits.clone());
        let duplicates = Family::<LaneLabels, Counter>::default();
        registry.register(
            "outbox_duplicates",
            "Messages a child gateway sent again that were stored already (acknowledged, not stored twice), by lane",
            duplicates.clone(),
        );
        let storage_failed = Gauge::default();
        registry.register(
            "outbox_storage_failed",
            "1 while the store refuses writes after a failed write or sync (it reopens by itself once the disk has room)",
            storage_failed.clone(),
        );
        let storage_failures = Counter::default();
        registry.register(
            "outbox_storage_failures",
            "Times the store failed (a write or sync failed)",
            storage_failures.clone(),
        );
        let storage_recoveries = Counter::default();
        registry.register(
            "outbox_storage_recoveries",
            "Times the store reopened by itself after failing",
            storage_recoveries.clone(),
        );
        let space_given = Counter::default();
        registry.register(
            "outbox_space_given_bytes",
            "Disk space the range cache freed because the outbox needed it",
            space_given.clone(),
        );
        let max_bytes = Gauge::default();
        registry.register(
            "outbox_max_bytes",
            "The outbox's byte quota now: outbox.max_bytes or its share of the disk, whichever is smaller",
            max_bytes.clone(),
        );
        let drain_rate = Family::<LaneLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "outbox_drain_messages_per_second",
            "Messages acknowledged upstream per second, smoothed over about a minute, by lane",
            drain_rate.clone(),
        );
        let time_to_drain = Family::<LaneLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "outbox_time_to_drain_seconds",
            "Backlog divided by the drain rate, by lane: 0 when empty, absent while messages wait and none drain",
            time_to_drain.clone(),
        );
        let stuck = Family::<LaneLabels, Gauge>::default();
        registry.register(
            "outbox_stuck",
            "1 while the lane's oldest message has not moved for outbox.stuck_after_seconds with the link up",
            stuck.clone(),
        );
        let stuck_episodes = Family::<LaneLabels, Counter>::default();
        registry.register(
            "outbox_stuck_episodes",
            "Times the lane became stuck",
            stuck_episodes.clone(),
        );
        OutboxMetrics {
            drain_rate,
            time_to_drain,
            stuck,
            stuck_episodes,
            storage_failed,
            storage_failures,
            storage_recoveries,
            space_given,
            max_bytes,
            enqueued,
            delivered,
            expired,
            dropped,
            rejected,
            depth,
            bytes,
            oldest_age,
            commits,
            duplicates,
        }
    }

    /// The counters the writer moves for `lane`.
    pub(crate) fn lane(&self, lane: u8) -> LaneCounters {
        let reason = |r: &'static str| LaneReasonLabels { lane, reason: r };
        LaneCounters {
            enqueued: handle(&self.enqueued, &LaneLabels { lane }),
            delivered: handle(&self.delivered, &LaneLabels { lane }),
            expired: handle(&self.expired, &LaneLabels { lane }),
            dropped_quota: handle(&self.dropped, &reason("quota")),
            dropped_damaged: handle(&self.dropped, &reason("damaged")),
            rejected_quota: handle(&self.rejected, &reason("quota")),
            rejected_disk: handle(&self.rejected, &reason("disk")),
            duplicates: handle(&self.duplicates, &LaneLabels { lane }),
        }
    }

    /// Appends to `lane` refused as invalid.
    pub(crate) fn rejected_invalid(&self, lane: u8) -> Counter {
        handle(
            &self.rejected,
            &LaneReasonLabels {
                lane,
                reason: "invalid",
            },
        )
    }

    /// Follows `store`'s health in the storage gauges and counters.
    pub(crate) fn watch_store(&self, store: &holdfast_store::Store) {
        let (failed, failures, recoveries) = (
            self.storage_failed.clone(),
            self.storage_failures.clone(),
            self.storage_recoveries.clone(),
        );
        if store.failure().is_some() {
            failed.set(1);
        }
        store.observe(std::sync::Arc::new(move |e| match e {
            holdfast_store::HealthEvent::Failed { .. } => {
                failed.set(1);
                failures.inc();
            }
            holdfast_store::HealthEvent::Recovered { .. } => {
                failed.set(0);
                recoveries.inc();
            }
        }));
    }

    /// The counter of space donors gave.
    pub(crate) fn space_given(&self) -> Counter {
        self.space_given.clone()
    }

    /// Sets the byte-quota gauge.
    pub(crate) fn set_max_bytes(&self, bytes: u64) {
        self.max_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The group-commit counter.
    pub(crate) fn commits(&self) -> Counter {
        self.commits.clone()
    }

    /// Sets the watch's gauges of `lane` to `h`.
    pub(crate) fn set_health(&self, lane: u8, h: &crate::watch::LaneHealth) {
        let labels = LaneLabels { lane };
        self.drain_rate.get_or_create(&labels).set(h.drain_per_s);
        // Unknown (messages wait and none drain) is no sample at all: the text
        // format has no infinity that every parser takes.
        match h.time_to_drain_s {
            Some(s) => {
                self.time_to_drain.get_or_create(&labels).set(s);
            }
            None => {
                self.time_to_drain.remove(&labels);
            }
        }
        self.stuck.get_or_create(&labels).set(i64::from(h.stuck));
    }

    /// Counts a stuck episode of `lane`.
    pub(crate) fn stuck_episode(&self, lane: u8) {
        self.stuck_episodes.get_or_create(&LaneLabels { lane }).inc();
    }

    /// Messages `lane` has delivered since start.
    pub(crate) fn delivered(&self, lane: u8) -> u64 {
        self.delivered.get_or_create(&LaneLabels { lane }).get()
    }

    /// Sets the depth and age gauges of `lane` to `s`.
    pub(crate) fn set_depth(&self, lane: u8, s: &LaneStats) {
        let labels = LaneLabels { lane };
        self.depth.get_or_create(&labels).set(s.messages as i64);
        self.bytes.get_or_create(&labels).set(s.bytes as i64);
        self.oldest_age
            .get_or_create(&labels)
            .set(s.oldest_age_ms.map(|a| (a / 1000) as i64).unwrap_or(0));
    }
}

/// The counters the writer moves, per lane.
pub(crate) struct LaneCounters {
    pub(crate) enqueued: Counter,
    pub(crate) delivered: Counter,
    pub(crate) expired: Counter,
    pub(crate) dropped_quota: Counter,
    pub(crate) dropped_damaged: Counter,
    pub(crate) rejected_quota: Counter,
    pub(crate) rejected_disk: Counter,
    pub(crate) duplicates: Counter,
}
